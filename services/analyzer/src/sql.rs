//! Continuous queries in SQL: a front end that compiles one `SELECT` into the same
//! [`QueryConfig`] the table form gives — and so into the same [`Plan`](crate::plan::Plan)
//! and the same operators. There is no second engine.
//!
//! ```sql
//! SELECT key, count(*) AS events, avg(payload.value) AS avg
//! FROM events
//! WHERE type IN ('reading', 'sample') AND payload.value >= 0
//! GROUP BY key, TUMBLE(event_time, INTERVAL '1' MINUTE)
//! HAVING max(payload.value) > 120
//! EMIT ON UPDATE
//! WITH (out_of_orderness = '5s', allowed_lateness = '1m')
//! ```
//!
//! - `FROM <topic>`, optionally `CROSS JOIN UNNEST(<array field>) AS t` (or `, UNNEST(…)
//!   AS t`): one result key per element, `t.<field>` naming a field of each element (the
//!   table form's `payload.a[].b`).
//! - Fields: `key`, `id`, `type`, `source`, `event_time`, `attributes['name']` (or
//!   `attributes.name`), `payload.a.b` — a JSON path in dot notation — and `CAST(… AS
//!   DOUBLE)` or any other numeric type, which reads the field as a number.
//! - `GROUP BY` the result key and exactly one window: `TUMBLE(time, size)`,
//!   `HOP(time, slide, size)` (sliding) or `SESSION(time, gap)`, with `INTERVAL '1'
//!   MINUTE`, `INTERVAL '30 seconds'` or `'30s'` for the durations; `time` is `event_time`
//!   or a field holding Unix milliseconds or RFC 3339 text.
//! - Aggregates: `count(*)`, `count(x)`, `sum`, `avg`, `min`, `max`, `stddev`, `zscore`,
//!   `approx_count_distinct(x)` (HyperLogLog), `approx_percentile(x, q, …)`
//!   (`percentile_approx`; DDSketch), `top_k(x, k)`, `sample(x, n)`, `new_items(x)` (Bloom
//!   filter), `weighted_score(x, 'value', weight, …)`. A column's alias names its value.
//! - `WHERE` and `HAVING`: `=`, `<>`/`!=`, `<`, `<=`, `>`, `>=`, `BETWEEN`, `IN (…)`, `LIKE
//!   'prefix%'`, `IS [NOT] NULL`, `AND`, `OR`, `NOT`. `HAVING` compares aggregates of the
//!   `SELECT` list, by alias or written again.
//! - After the statement: `EMIT ON CLOSE` (the default) or `EMIT ON UPDATE`, and
//!   `WITH (name = value, …)` for `out_of_orderness`, `allowed_lateness`, `idle_timeout`,
//!   `output_topic`, `late_topic` and `max_open_windows`.
//!
//! Anything else is refused with where it is and what is not supported (`line 1, column
//! 40: window functions other than TUMBLE, HOP and SESSION are not supported`), never
//! guessed at. A query must name a window in `GROUP BY`: without one its state would grow
//! without bound.

use crate::aggregate::{AggregateConfig, Function};
use crate::config::{QueryConfig, WindowConfig, count_sum_avg_min_max};
use crate::filter::{Literal, Predicate};
use crate::window::EmitMode;
use sqlparser::ast::{
    AccessExpr, BinaryOperator, CastKind, DataType, Expr, FunctionArg, FunctionArgExpr,
    FunctionArguments, GroupByExpr, Ident, InTarget, JoinOperator, ObjectName, ObjectNamePart,
    SelectItem, SetExpr, Spanned, Statement, Subscript, TableFactor, UnaryOperator, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Tokenizer};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Longest SQL text accepted.
pub(crate) const MAX_SQL_BYTES: usize = 16 * 1024;
/// How deeply expressions may nest: bounds the parser's recursion on hostile input.
const RECURSION_LIMIT: usize = 32;

/// Why a SQL query was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SqlError {
    /// Line and column (from 1) of what is at fault; 0 when it concerns the whole query.
    pub(crate) line: u64,
    /// See `line`.
    pub(crate) column: u64,
    /// What is wrong.
    pub(crate) message: String,
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(
                f,
                "line {}, column {}: {}",
                self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for SqlError {}

type Result<T> = std::result::Result<T, SqlError>;

fn at(span: Span, message: impl Into<String>) -> SqlError {
    at_location(span.start, message)
}

fn at_location(location: Location, message: impl Into<String>) -> SqlError {
    SqlError {
        line: location.line,
        column: location.column,
        message: message.into(),
    }
}

fn whole(message: impl Into<String>) -> SqlError {
    SqlError {
        line: 0,
        column: 0,
        message: message.into(),
    }
}

/// Compiles `sql` into the table form of query `name`.
pub(crate) fn compile(name: &str, sql: &str) -> Result<QueryConfig> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(whole(format!(
            "the query has {} bytes; at most {MAX_SQL_BYTES} are accepted",
            sql.len()
        )));
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| at_location(e.location, e.message))?;
    let (statement, tail) = split_tail(tokens);
    let mut statements = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens_with_locations(statement)
        .parse_statements()
        .map_err(parser_error)?;
    let statement = match statements.len() {
        1 => statements.remove(0),
        0 => return Err(whole("no SELECT statement")),
        _ => return Err(at(statements[1].span(), "one statement per query")),
    };
    let mut query = Compiler::select(name, &statement)?;
    Tail::parse(&tail)?.apply(&mut query)?;
    Ok(query)
}

/// sqlparser's messages end with their position (`… at Line: 1, Column: 8`): say it first,
/// as every other error here does.
fn parser_error(error: sqlparser::parser::ParserError) -> SqlError {
    let text = match error {
        sqlparser::parser::ParserError::TokenizerError(t)
        | sqlparser::parser::ParserError::ParserError(t) => t,
        sqlparser::parser::ParserError::RecursionLimitExceeded => {
            return whole("the query nests too deeply");
        }
    };
    if let Some((message, position)) = text.rsplit_once(" at Line: ")
        && let Some((line, column)) = position.split_once(", Column: ")
        && let (Ok(line), Ok(column)) = (line.trim().parse(), column.trim().parse())
    {
        return SqlError {
            line,
            column,
            message: message.to_owned(),
        };
    }
    whole(text)
}

/// Splits the tokens at the first top-level `EMIT` or `WITH` after the first token: the
/// statement, and the clauses that follow it.
fn split_tail(mut tokens: Vec<TokenWithSpan>) -> (Vec<TokenWithSpan>, Vec<TokenWithSpan>) {
    let mut depth = 0i32;
    let mut seen = false;
    // A word after a `.` is a field's name (`payload.emit`), not a clause.
    let mut after_period = false;
    let split = tokens.iter().position(|t| {
        match &t.token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Word(w)
                if depth == 0
                    && seen
                    && !after_period
                    && w.quote_style.is_none()
                    && (w.value.eq_ignore_ascii_case("emit")
                        || w.value.eq_ignore_ascii_case("with")) =>
            {
                return true;
            }
            Token::Whitespace(_) => return false,
            _ => {}
        }
        seen = true;
        after_period = t.token == Token::Period;
        false
    });
    let tail = match split {
        Some(i) => tokens.split_off(i),
        None => Vec::new(),
    };
    (tokens, tail)
}

/// `EMIT ON CLOSE | UPDATE` and `WITH (name = value, …)`.
#[derive(Default)]
struct Tail {
    emit: Option<EmitMode>,
    options: Vec<(TokenWithSpan, TokenWithSpan)>,
}

impl Tail {
    fn parse(tokens: &[TokenWithSpan]) -> Result<Tail> {
        let mut tail = Tail::default();
        let mut rest = tokens
            .iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_) | Token::SemiColon))
            .peekable();
        let word = |t: &TokenWithSpan, expected: &str| matches!(&t.token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(expected));
        let end = || whole("the query ends early after EMIT or WITH");
        while let Some(token) = rest.next() {
            if word(token, "emit") {
                if tail.emit.is_some() {
                    return Err(at(token.span, "EMIT is given twice"));
                }
                let on = rest.next().ok_or_else(end)?;
                if !word(on, "on") {
                    return Err(at(on.span, "expected EMIT ON CLOSE or EMIT ON UPDATE"));
                }
                let mode = rest.next().ok_or_else(end)?;
                tail.emit = Some(if word(mode, "close") {
                    EmitMode::OnClose
                } else if word(mode, "update") {
                    EmitMode::OnUpdate
                } else {
                    return Err(at(mode.span, "expected EMIT ON CLOSE or EMIT ON UPDATE"));
                });
            } else if word(token, "with") {
                if !tail.options.is_empty() {
                    return Err(at(token.span, "WITH is given twice"));
                }
                let open = rest.next().ok_or_else(end)?;
                if open.token != Token::LParen {
                    return Err(at(open.span, "expected WITH (name = value, …)"));
                }
                loop {
                    let name = rest.next().ok_or_else(end)?;
                    let equals = rest.next().ok_or_else(end)?;
                    let value = rest.next().ok_or_else(end)?;
                    if equals.token != Token::Eq {
                        return Err(at(equals.span, "expected name = value"));
                    }
                    tail.options.push((name.clone(), value.clone()));
                    let next = rest.next().ok_or_else(end)?;
                    match next.token {
                        Token::Comma => continue,
                        Token::RParen => break,
                        _ => return Err(at(next.span, "expected , or ) in WITH (…)")),
                    }
                }
            } else {
                return Err(at(
                    token.span,
                    format!(
                        "unexpected {} after the statement: only EMIT ON CLOSE | UPDATE and WITH (…) may follow it",
                        token.token
                    ),
                ));
            }
        }
        Ok(tail)
    }

    fn apply(self, query: &mut QueryConfig) -> Result<()> {
        if let Some(emit) = self.emit {
            query.emit = emit;
        }
        for (name, value) in self.options {
            let key = match &name.token {
                Token::Word(w) => w.value.to_ascii_lowercase(),
                other => return Err(at(name.span, format!("{other} is not an option name"))),
            };
            let text = match &value.token {
                Token::SingleQuotedString(s) => s.clone(),
                Token::Number(n, _) => n.clone(),
                other => {
                    return Err(at(
                        value.span,
                        format!("{other} is not a value: quote it, as in '5s'"),
                    ));
                }
            };
            let duration = || {
                humantime::parse_duration(&text).map_err(|e| {
                    at(
                        value.span,
                        format!("{key}: {text:?} is not a duration: {e}"),
                    )
                })
            };
            match key.as_str() {
                "out_of_orderness" => query.out_of_orderness = duration()?,
                "allowed_lateness" => query.allowed_lateness = duration()?,
                "idle_timeout" => query.idle_timeout = duration()?,
                "output_topic" => query.output_topic = Some(text),
                "late_topic" => query.late_topic = Some(text),
                "max_open_windows" => {
                    query.max_open_windows = text.parse().map_err(|_| {
                        at(
                            value.span,
                            format!("max_open_windows: {text:?} is not a whole number"),
                        )
                    })?;
                }
                _ => {
                    return Err(at(
                        name.span,
                        format!(
                            "unknown option {key:?}: use out_of_orderness, allowed_lateness, idle_timeout, output_topic, late_topic or max_open_windows"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An aggregate of the `SELECT` list: its configuration, and the name of its value.
struct Selected {
    config: AggregateConfig,
    value_name: String,
}

/// Turns one `SELECT` into a query.
struct Compiler {
    /// The alias of the `UNNEST` and the array field it takes apart.
    unnest: Option<(String, String)>,
}

impl Compiler {
    fn select(name: &str, statement: &Statement) -> Result<QueryConfig> {
        let Statement::Query(query) = statement else {
            return Err(at(
                statement.span(),
                "only SELECT is supported: a continuous query is one SELECT … GROUP BY",
            ));
        };
        let unsupported = |span: Span, what: &str| {
            Err(at(
                span,
                format!("{what} is not supported in a continuous query"),
            ))
        };
        if let Some(with) = &query.with {
            return unsupported(with.span(), "WITH (a common table expression)");
        }
        if let Some(order) = &query.order_by {
            return unsupported(order.span(), "ORDER BY");
        }
        if let Some(limit) = &query.limit_clause {
            return unsupported(limit.span(), "LIMIT");
        }
        if query.fetch.is_some() || !query.locks.is_empty() || query.for_clause.is_some() {
            return unsupported(query.span(), "FETCH, FOR and locking clauses");
        }
        if query.settings.is_some()
            || query.format_clause.is_some()
            || !query.pipe_operators.is_empty()
        {
            return unsupported(query.span(), "SETTINGS, FORMAT and pipe operators");
        }
        let SetExpr::Select(select) = query.body.as_ref() else {
            return unsupported(
                query.body.span(),
                "UNION, INTERSECT, EXCEPT, VALUES and nested queries",
            );
        };
        if select.distinct.is_some() {
            return unsupported(select.span(), "SELECT DISTINCT");
        }
        if select.top.is_some() || select.into.is_some() || select.exclude.is_some() {
            return unsupported(select.span(), "TOP, INTO and EXCLUDE");
        }
        if !select.lateral_views.is_empty()
            || select.prewhere.is_some()
            || !select.connect_by.is_empty()
            || !select.cluster_by.is_empty()
            || !select.distribute_by.is_empty()
            || !select.sort_by.is_empty()
            || !select.named_window.is_empty()
            || select.qualify.is_some()
        {
            return unsupported(
                select.span(),
                "LATERAL VIEW, PREWHERE, CONNECT BY, CLUSTER/DISTRIBUTE/SORT BY, WINDOW and QUALIFY",
            );
        }

        // FROM <topic> [CROSS JOIN UNNEST(<array>) AS t]
        let mut relations = Vec::new();
        for from in &select.from {
            relations.push((&from.relation, None));
            for join in &from.joins {
                relations.push((&join.relation, Some(&join.join_operator)));
            }
        }
        let Some(((first, _), rest)) = relations.split_first() else {
            return Err(at(
                select.span(),
                "FROM is missing: name the topic the query reads",
            ));
        };
        let topic = match first {
            TableFactor::Table {
                name,
                alias: None,
                args: None,
                ..
            } => object_name(name)?,
            other => {
                return Err(at(
                    other.span(),
                    "FROM takes a topic name (quote names with other characters: \"my-topic\")",
                ));
            }
        };
        let mut compiler = Compiler { unnest: None };
        match rest {
            [] => {}
            [(unnest, operator)] => {
                if let Some(operator) = operator
                    && !matches!(operator, JoinOperator::CrossJoin(_))
                {
                    return Err(at(
                        unnest.span(),
                        "only CROSS JOIN UNNEST(…) is supported: joins of topics are not",
                    ));
                }
                let TableFactor::UNNEST {
                    alias: Some(alias),
                    array_exprs,
                    with_offset: false,
                    with_ordinality: false,
                    ..
                } = unnest
                else {
                    return Err(at(
                        unnest.span(),
                        "only CROSS JOIN UNNEST(<array field>) AS <name> is supported: joins of topics are not",
                    ));
                };
                let [array] = array_exprs.as_slice() else {
                    return Err(at(unnest.span(), "UNNEST takes one array field"));
                };
                let array = compiler.field(array)?;
                if array.contains("[]") {
                    return Err(at(unnest.span(), "one UNNEST per query"));
                }
                compiler.unnest = Some((alias.name.value.clone(), array));
            }
            [_, (extra, _), ..] => {
                return Err(at(
                    extra.span(),
                    "a query reads one topic (and at most one UNNEST of it)",
                ));
            }
        }

        // GROUP BY <key>, TUMBLE | HOP | SESSION (…)
        let GroupByExpr::Expressions(groups, modifiers) = &select.group_by else {
            return Err(at(
                select.span(),
                "GROUP BY ALL is not supported: group by the key and a window",
            ));
        };
        if !modifiers.is_empty() {
            return unsupported(select.span(), "ROLLUP, CUBE and GROUPING SETS");
        }
        let mut key: Option<String> = None;
        let mut time_window: Option<(String, WindowConfig)> = None;
        for group in groups {
            if let Some(window) = compiler.window(group)? {
                if time_window.is_some() {
                    return Err(at(group.span(), "GROUP BY takes one window"));
                }
                time_window = Some(window);
            } else {
                if key.is_some() {
                    return Err(at(
                        group.span(),
                        "GROUP BY takes one key besides the window: combine fields into one upstream",
                    ));
                }
                key = Some(compiler.field(group)?);
            }
        }
        let Some((time, window)) = time_window else {
            return Err(at(
                select.span(),
                "GROUP BY needs a window — TUMBLE(…), HOP(…) or SESSION(…): without one the query's state would grow without bound",
            ));
        };
        let Some(key) = key else {
            return Err(at(
                select.span(),
                "GROUP BY needs the key results are grouped by besides the window (e.g. GROUP BY key, TUMBLE(…))",
            ));
        };
        if let Some((_, array)) = &compiler.unnest
            && !key.starts_with(&format!("{array}[]"))
        {
            return Err(at(
                select.span(),
                "with UNNEST, GROUP BY the unnested element (or a field of it)",
            ));
        }

        // SELECT <key>, <aggregates>
        let mut selected: Vec<Selected> = Vec::new();
        for item in &select.projection {
            let (expr, alias) = match item {
                SelectItem::UnnamedExpr(expr) => (expr, None),
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
                other => {
                    return Err(at(
                        other.span(),
                        "SELECT * is not supported: name the key and the aggregates",
                    ));
                }
            };
            if let Some(aggregate) = compiler.aggregate(expr, alias)? {
                selected.push(aggregate);
                continue;
            }
            if let Expr::Identifier(ident) = expr
                && matches!(
                    ident.value.to_ascii_lowercase().as_str(),
                    "window_start" | "window_end"
                )
            {
                continue; // every result carries its window's bounds
            }
            let field = compiler.field(expr).map_err(|_| {
                at(
                    expr.span(),
                    "a SELECT column is the GROUP BY key, an aggregate, window_start or window_end",
                )
            })?;
            if field != key {
                return Err(at(
                    expr.span(),
                    format!(
                        "{field} is neither the GROUP BY key ({key}) nor an aggregate: group by it or aggregate it"
                    ),
                ));
            }
        }
        if selected.is_empty() {
            return Err(at(
                select.span(),
                "SELECT needs at least one aggregate (e.g. count(*))",
            ));
        }

        let filter = match &select.selection {
            None => Vec::new(),
            Some(condition) => compiler.conditions(condition, &|expr| compiler.field(expr))?,
        };
        let having = match &select.having {
            None => Vec::new(),
            Some(condition) => {
                let value = |expr: &Expr| compiler.value_name(expr, &selected);
                compiler.conditions(condition, &value)?
            }
        };
        Ok(QueryConfig {
            name: name.to_owned(),
            topic,
            key,
            time,
            filter,
            value: None,
            window,
            aggregates: selected.into_iter().map(|s| s.config).collect(),
            having,
            ..QueryConfig::default()
        })
    }

    /// The field an expression names (`payload.a.b`, `attributes.x`, `t.name`), checked.
    fn field(&self, expr: &Expr) -> Result<String> {
        let path = self.path(expr)?;
        crate::path::FieldRef::parse(&path).map_err(|why| at(expr.span(), why))?;
        Ok(path)
    }

    /// The path an expression spells, unchecked (`attributes` on its way to
    /// `attributes.x`).
    fn path(&self, expr: &Expr) -> Result<String> {
        Ok(match expr {
            Expr::Identifier(ident) => self.resolve(std::slice::from_ref(ident)),
            Expr::CompoundIdentifier(parts) => self.resolve(parts),
            Expr::Nested(inner) => self.path(inner)?,
            Expr::Cast {
                kind: CastKind::Cast | CastKind::TryCast | CastKind::DoubleColon,
                expr,
                data_type,
                ..
            } => {
                if !numeric(data_type) {
                    return Err(at(
                        expr.span(),
                        format!(
                            "casts to {data_type} are not supported: fields are read as they are, or as numbers (CAST(… AS DOUBLE))"
                        ),
                    ));
                }
                self.path(expr)?
            }
            Expr::CompoundFieldAccess { root, access_chain } => {
                let mut path = self.path(root)?;
                for access in access_chain {
                    let segment = match access {
                        AccessExpr::Dot(Expr::Identifier(ident)) => ident.value.clone(),
                        AccessExpr::Subscript(Subscript::Index { index }) => match index {
                            Expr::Value(v) => match &v.value {
                                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => {
                                    s.clone()
                                }
                                Value::Number(n, _) if n.parse::<u64>().is_ok() => n.clone(),
                                _ => {
                                    return Err(at(
                                        index.span(),
                                        "a subscript is a quoted name or a whole number",
                                    ));
                                }
                            },
                            other => {
                                return Err(at(
                                    other.span(),
                                    "a subscript is a quoted name or a whole number",
                                ));
                            }
                        },
                        other => {
                            return Err(at(
                                other.span(),
                                "only .name and ['name'] reach into a field",
                            ));
                        }
                    };
                    path.push('.');
                    path.push_str(&segment);
                }
                path
            }
            other => {
                return Err(at(
                    other.span(),
                    "expected a field: key, id, type, source, event_time, attributes['name'] or payload.<path>",
                ));
            }
        })
    }

    /// A name's path, the `UNNEST` alias standing for every element of its array.
    fn resolve(&self, parts: &[Ident]) -> String {
        let names: Vec<&str> = parts.iter().map(|p| p.value.as_str()).collect();
        match (&self.unnest, names.split_first()) {
            (Some((alias, array)), Some((first, rest))) if first == alias => {
                let mut path = format!("{array}[]");
                for part in rest {
                    path.push('.');
                    path.push_str(part);
                }
                path
            }
            _ => names.join("."),
        }
    }

    /// `TUMBLE`, `HOP` or `SESSION` in `GROUP BY`: the time field and the window.
    fn window(&self, expr: &Expr) -> Result<Option<(String, WindowConfig)>> {
        let Expr::Function(function) = expr else {
            return Ok(None);
        };
        let name = function_name(&function.name)?;
        let args = arguments(function)?;
        let time = |args: &[&Expr]| -> Result<String> {
            let path = self.field(args[0])?;
            Ok(path)
        };
        let window = match name.as_str() {
            "tumble" => {
                let [_, size] = args.as_slice() else {
                    return Err(at(function.span(), "TUMBLE(time, size)"));
                };
                WindowConfig::Tumbling {
                    size: interval(size)?,
                }
            }
            "hop" => {
                let [_, slide, size] = args.as_slice() else {
                    return Err(at(function.span(), "HOP(time, slide, size)"));
                };
                WindowConfig::Sliding {
                    size: interval(size)?,
                    slide: interval(slide)?,
                }
            }
            "session" => {
                let [_, gap] = args.as_slice() else {
                    return Err(at(function.span(), "SESSION(time, gap)"));
                };
                WindowConfig::Session {
                    gap: interval(gap)?,
                }
            }
            "cumulate" | "over" | "row_number" | "rank" | "lag" | "lead" => {
                return Err(at(
                    function.span(),
                    "window functions other than TUMBLE, HOP and SESSION are not supported",
                ));
            }
            _ => return Ok(None),
        };
        Ok(Some((time(&args)?, window)))
    }

    /// An aggregate of the `SELECT` list, or `None` if `expr` is not a function call.
    fn aggregate(&self, expr: &Expr, alias: Option<&Ident>) -> Result<Option<Selected>> {
        let Expr::Function(function) = expr else {
            return Ok(None);
        };
        if function.over.is_some() {
            return Err(at(
                function.span(),
                "OVER (…) is not supported: windows are given in GROUP BY",
            ));
        }
        if function.filter.is_some() || !function.within_group.is_empty() {
            return Err(at(
                function.span(),
                "FILTER and WITHIN GROUP are not supported: filter in WHERE",
            ));
        }
        let name = function_name(&function.name)?;
        if let FunctionArguments::List(list) = &function.args
            && (list.duplicate_treatment.is_some() || !list.clauses.is_empty())
        {
            return Err(at(
                function.span(),
                format!(
                    "{name}(DISTINCT …) and clauses inside the call are not supported (approx_count_distinct counts distinct values)"
                ),
            ));
        }
        let span = function.span();
        let mut config = count_sum_avg_min_max(None)[0].clone();
        let field_of = |args: &[&Expr]| -> Result<String> {
            match args.first() {
                Some(arg) => self.field(arg),
                None => Err(at(span, format!("{name} needs the field it aggregates"))),
            }
        };
        let count_arg = |args: &[&Expr], i: usize, what: &str| -> Result<usize> {
            let arg = args
                .get(i)
                .ok_or_else(|| at(span, format!("{name} needs {what}")))?;
            number(arg)
                .filter(|n| n.fract() == 0.0 && *n >= 1.0 && *n <= 1e6)
                .map(|n| n as usize)
                .ok_or_else(|| at(arg.span(), format!("{what} must be a whole number")))
        };
        let star = is_count_star(function);
        let args = if star {
            Vec::new()
        } else {
            arguments(function)?
        };
        let exact = |n: usize| -> Result<()> {
            if args.len() == n {
                Ok(())
            } else {
                Err(at(
                    span,
                    format!("{name} takes {n} argument{}", if n == 1 { "" } else { "s" }),
                ))
            }
        };
        config.function = match name.as_str() {
            "count" if star => Function::Count,
            "count" => {
                exact(1)?;
                config.of = Some(field_of(&args)?);
                Function::Count
            }
            "sum" | "avg" | "min" | "max" | "stddev" | "stddev_pop" | "zscore" => {
                exact(1)?;
                config.of = Some(field_of(&args)?);
                match name.as_str() {
                    "sum" => Function::Sum,
                    "avg" => Function::Avg,
                    "min" => Function::Min,
                    "max" => Function::Max,
                    "zscore" => Function::Zscore,
                    _ => Function::Stddev,
                }
            }
            "approx_count_distinct" => {
                exact(1)?;
                config.of = Some(field_of(&args)?);
                Function::Distinct
            }
            "approx_percentile" | "percentile_approx" => {
                if args.len() < 2 {
                    return Err(at(span, format!("{name}(field, quantile, …)")));
                }
                config.of = Some(field_of(&args)?);
                let quantiles = args[1..]
                    .iter()
                    .map(|q| {
                        number(q).ok_or_else(|| at(q.span(), "a quantile is a number in (0, 1)"))
                    })
                    .collect::<Result<Vec<f64>>>()?;
                config.quantiles = Some(quantiles);
                Function::Percentiles
            }
            "top_k" => {
                exact(2)?;
                config.of = Some(field_of(&args)?);
                config.k = Some(count_arg(&args, 1, "k, how many items")?);
                Function::TopK
            }
            "sample" => {
                exact(2)?;
                config.of = Some(field_of(&args)?);
                config.size = Some(count_arg(&args, 1, "the sample size")?);
                Function::Sample
            }
            "new_items" => {
                exact(1)?;
                config.of = Some(field_of(&args)?);
                Function::NewItems
            }
            "weighted_score" => {
                if args.len() < 3 || args.len().is_multiple_of(2) {
                    return Err(at(span, "weighted_score(field, 'value', weight, …)"));
                }
                config.of = Some(field_of(&args)?);
                let mut weights = BTreeMap::new();
                for pair in args[1..].chunks(2) {
                    let value = text(pair[0])
                        .ok_or_else(|| at(pair[0].span(), "a weighted value is quoted text"))?;
                    let weight = number(pair[1])
                        .ok_or_else(|| at(pair[1].span(), "a weight is a number"))?;
                    weights.insert(value, weight);
                }
                config.weights = Some(weights);
                Function::Score
            }
            "tumble" | "hop" | "session" => {
                return Err(at(
                    span,
                    "a window goes in GROUP BY; SELECT window_start or window_end for its bounds",
                ));
            }
            other => {
                return Err(at(
                    span,
                    format!(
                        "{other} is not a supported aggregate: use count, sum, avg, min, max, stddev, zscore, approx_count_distinct, approx_percentile, top_k, sample, new_items or weighted_score"
                    ),
                ));
            }
        };
        config.name = alias.map(|a| a.value.clone());
        let value_name = match (&config.name, config.function) {
            (Some(name), _) => name.clone(),
            (None, function) => serde_json::to_value(function)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        };
        Ok(Some(Selected { config, value_name }))
    }

    /// In `HAVING`: the name of the result value an expression stands for — an alias, a
    /// value's name, or an aggregate written as in the `SELECT` list.
    fn value_name(&self, expr: &Expr, selected: &[Selected]) -> Result<String> {
        match expr {
            Expr::Identifier(ident) => Ok(ident.value.clone()),
            Expr::Nested(inner) => self.value_name(inner, selected),
            Expr::Function(_) => {
                let Some(wanted) = self.aggregate(expr, None)? else {
                    return Err(at(expr.span(), "expected an aggregate"));
                };
                selected
                    .iter()
                    .find(|s| {
                        s.config.function == wanted.config.function
                            && s.config.of == wanted.config.of
                            && s.config.quantiles == wanted.config.quantiles
                    })
                    .map(|s| s.value_name.clone())
                    .ok_or_else(|| {
                        at(
                            expr.span(),
                            "HAVING compares aggregates of the SELECT list: select this one too",
                        )
                    })
            }
            other => Err(at(
                other.span(),
                "HAVING compares aggregates (by alias, or written as in SELECT)",
            )),
        }
    }

    /// A `WHERE` or `HAVING` condition as predicates that must all hold; `operand` names
    /// what a comparison tests.
    fn conditions(
        &self,
        condition: &Expr,
        operand: &dyn Fn(&Expr) -> Result<String>,
    ) -> Result<Vec<Predicate>> {
        match condition {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                let mut all = self.conditions(left, operand)?;
                all.extend(self.conditions(right, operand)?);
                Ok(all)
            }
            Expr::Nested(inner) => self.conditions(inner, operand),
            Expr::Between {
                expr,
                negated: false,
                low,
                high,
            } => Ok(between(operand(expr)?, low, high)?.to_vec()),
            other => Ok(vec![self.predicate(other, operand)?]),
        }
    }

    /// One condition as a predicate. `AND` below an `OR` or a `NOT` is `NOT (ANY (NOT a,
    /// NOT b))`: the predicates have `any` and `not`, which say everything.
    fn predicate(
        &self,
        condition: &Expr,
        operand: &dyn Fn(&Expr) -> Result<String>,
    ) -> Result<Predicate> {
        let negate = |p: Predicate| Predicate {
            not: Some(Box::new(p)),
            ..Predicate::default()
        };
        let on = |field: String| Predicate {
            field: Some(field),
            ..Predicate::default()
        };
        Ok(match condition {
            Expr::Nested(inner) => self.predicate(inner, operand)?,
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => all(vec![
                self.predicate(left, operand)?,
                self.predicate(right, operand)?,
            ]),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Or,
                right,
            } => {
                let mut any = Vec::new();
                for side in [left, right] {
                    let p = self.predicate(side, operand)?;
                    match p {
                        Predicate {
                            any: Some(inner), ..
                        } if p.field.is_none() && p.not.is_none() => any.extend(inner),
                        p => any.push(p),
                    }
                }
                Predicate {
                    any: Some(any),
                    ..Predicate::default()
                }
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => negate(self.predicate(expr, operand)?),
            Expr::BinaryOp { left, op, right } => {
                // field OP literal, or literal OP field (flipped).
                let (field, op, literal) = match literal(right) {
                    Some(_) => (left, op.clone(), right),
                    None => (right, flip(op), left),
                };
                let mut p = on(operand(field)?);
                let lit = literal_of(literal)?;
                let num = || match &lit {
                    Literal::Number(n) => Ok(*n),
                    _ => Err(at(literal.span(), format!("{op} compares with a number"))),
                };
                match op {
                    BinaryOperator::Eq => p.eq = Some(lit.clone()),
                    BinaryOperator::NotEq => p.ne = Some(lit.clone()),
                    BinaryOperator::Gt => p.gt = Some(num()?),
                    BinaryOperator::GtEq => p.ge = Some(num()?),
                    BinaryOperator::Lt => p.lt = Some(num()?),
                    BinaryOperator::LtEq => p.le = Some(num()?),
                    other => {
                        return Err(at(
                            condition.span(),
                            format!(
                                "the operator {other} is not supported: use =, <>, <, <=, >, >=, BETWEEN, IN, LIKE 'prefix%', IS [NOT] NULL, AND, OR, NOT"
                            ),
                        ));
                    }
                }
                p
            }
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let within = all(between(operand(expr)?, low, high)?.to_vec());
                if *negated { negate(within) } else { within }
            }
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated,
                ..
            } => {
                let mut p = on(operand(expr)?);
                p.one_of = Some(list.iter().map(literal_of).collect::<Result<_>>()?);
                if *negated { negate(p) } else { p }
            }
            Expr::Like {
                negated,
                any: false,
                expr,
                pattern,
                escape_char: None,
            } => {
                let mut p = on(operand(expr)?);
                let prefix = text(pattern)
                    .and_then(|t| t.strip_suffix('%').map(str::to_owned))
                    .filter(|t| !t.contains(['%', '_']))
                    .ok_or_else(|| {
                        at(
                            pattern.span(),
                            "LIKE takes a prefix pattern, 'text%' (no other wildcards)",
                        )
                    })?;
                p.prefix = Some(prefix);
                if *negated { negate(p) } else { p }
            }
            Expr::IsNull(expr) => Predicate {
                exists: Some(false),
                ..on(operand(expr)?)
            },
            Expr::IsNotNull(expr) => Predicate {
                exists: Some(true),
                ..on(operand(expr)?)
            },
            other => {
                return Err(at(
                    other.span(),
                    "not a supported condition: compare a field with a literal (=, <>, <, <=, >, >=, BETWEEN, IN, LIKE 'prefix%', IS [NOT] NULL), combined with AND, OR, NOT",
                ));
            }
        })
    }
}

/// Predicates that must all hold, as one: `NOT (ANY (NOT a, NOT b, …))` — a predicate
/// has `any` and `not`, which say everything.
fn all(parts: Vec<Predicate>) -> Predicate {
    let not = |p: Predicate| Predicate {
        not: Some(Box::new(p)),
        ..Predicate::default()
    };
    not(Predicate {
        any: Some(parts.into_iter().map(not).collect()),
        ..Predicate::default()
    })
}

/// `field BETWEEN low AND high`: two predicates (one holds one test), both to hold.
fn between(field: String, low: &Expr, high: &Expr) -> Result<[Predicate; 2]> {
    let bound = |e: &Expr| number(e).ok_or_else(|| at(e.span(), "BETWEEN takes numbers"));
    Ok([
        Predicate {
            field: Some(field.clone()),
            ge: Some(bound(low)?),
            ..Predicate::default()
        },
        Predicate {
            field: Some(field),
            le: Some(bound(high)?),
            ..Predicate::default()
        },
    ])
}

/// The comparison with its sides swapped: `3 < x` is `x > 3`.
fn flip(op: &BinaryOperator) -> BinaryOperator {
    match op {
        BinaryOperator::Gt => BinaryOperator::Lt,
        BinaryOperator::GtEq => BinaryOperator::LtEq,
        BinaryOperator::Lt => BinaryOperator::Gt,
        BinaryOperator::LtEq => BinaryOperator::GtEq,
        other => other.clone(),
    }
}

/// A literal's value, if `expr` is one (a negative number included).
fn literal(expr: &Expr) -> Option<Literal> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok().map(Literal::Number),
            Value::SingleQuotedString(s) => Some(Literal::Text(s.clone())),
            Value::Boolean(b) => Some(Literal::Bool(*b)),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match literal(expr)? {
            Literal::Number(n) => Some(Literal::Number(-n)),
            _ => None,
        },
        Expr::Nested(inner) => literal(inner),
        _ => None,
    }
}

fn literal_of(expr: &Expr) -> Result<Literal> {
    literal(expr).ok_or_else(|| {
        at(
            expr.span(),
            "expected a literal: a number, 'quoted text', true or false",
        )
    })
}

fn number(expr: &Expr) -> Option<f64> {
    match literal(expr)? {
        Literal::Number(n) if n.is_finite() => Some(n),
        _ => None,
    }
}

fn text(expr: &Expr) -> Option<String> {
    match literal(expr)? {
        Literal::Text(t) => Some(t),
        _ => None,
    }
}

fn numeric(data_type: &DataType) -> bool {
    let text = data_type.to_string().to_ascii_lowercase();
    [
        "double", "float", "real", "int", "bigint", "smallint", "tinyint", "decimal", "numeric",
    ]
    .iter()
    .any(|t| text.starts_with(t))
}

/// A topic's name: its parts joined by dots (`sensors.a`).
fn object_name(name: &ObjectName) -> Result<String> {
    name.0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => Ok(ident.value.clone()),
            ObjectNamePart::Function(f) => Err(at(f.name.span, "expected a topic name")),
        })
        .collect::<Result<Vec<_>>>()
        .map(|parts| parts.join("."))
}

/// A function's name, lower case.
fn function_name(name: &ObjectName) -> Result<String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Ok(ident.value.to_ascii_lowercase()),
        _ => Err(at(name.span(), "expected a function name")),
    }
}

fn is_count_star(function: &sqlparser::ast::Function) -> bool {
    matches!(&function.args, FunctionArguments::List(list)
        if matches!(list.args.as_slice(), [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)]))
}

/// A call's positional arguments.
fn arguments(function: &sqlparser::ast::Function) -> Result<Vec<&Expr>> {
    match &function.args {
        FunctionArguments::None => Ok(Vec::new()),
        FunctionArguments::Subquery(q) => Err(at(q.span(), "subqueries are not supported")),
        FunctionArguments::List(list) => list
            .args
            .iter()
            .map(|arg| match arg {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Ok(expr),
                other => Err(at(
                    other.span(),
                    "only plain arguments are supported (no *, no named arguments)",
                )),
            })
            .collect(),
    }
}

/// A duration: `INTERVAL '1' MINUTE`, `INTERVAL '30 seconds'`, or `'30s'`.
fn interval(expr: &Expr) -> Result<Duration> {
    use sqlparser::ast::DateTimeField as F;
    let bad = |why: String| at(expr.span(), why);
    let (amount, unit) = match expr {
        Expr::Interval(interval) => {
            if interval.last_field.is_some() {
                return Err(bad("interval ranges (… TO …) are not supported".into()));
            }
            let amount = match literal(&interval.value) {
                Some(Literal::Text(t)) => t,
                Some(Literal::Number(n)) => n.to_string(),
                _ => return Err(bad("an interval's amount is a number or quoted text".into())),
            };
            let unit = match &interval.leading_field {
                None => None,
                Some(F::Millisecond | F::Milliseconds) => Some("ms"),
                Some(F::Second | F::Seconds) => Some("s"),
                Some(F::Minute | F::Minutes) => Some("m"),
                Some(F::Hour | F::Hours) => Some("h"),
                Some(F::Day | F::Days) => Some("days"),
                Some(F::Week(_) | F::Weeks) => Some("weeks"),
                Some(other) => {
                    return Err(bad(format!(
                        "{other} intervals are not supported: use milliseconds to weeks"
                    )));
                }
            };
            (amount, unit)
        }
        other => match literal(other) {
            Some(Literal::Text(t)) => (t, None),
            _ => {
                return Err(bad(
                    "expected a duration: INTERVAL '1' MINUTE, INTERVAL '30 seconds' or '30s'"
                        .into(),
                ));
            }
        },
    };
    let text = match unit {
        Some(unit) => format!("{}{unit}", amount.trim()),
        None => amount,
    };
    humantime::parse_duration(text.trim()).map_err(|e| bad(format!("{text:?}: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::default_queries;

    /// The query with its aggregates as they run: `count, sum, avg, min, max` of the value
    /// when none are given, numeric aggregates reading the value when they name no field,
    /// and names left out where they are the function's own.
    fn resolved(mut query: QueryConfig) -> QueryConfig {
        if query.aggregates.is_empty() {
            query.aggregates = count_sum_avg_min_max(query.value.as_deref());
        }
        for aggregate in &mut query.aggregates {
            use Function::*;
            let numeric = matches!(
                aggregate.function,
                Sum | Avg | Min | Max | Stddev | Zscore | Percentiles
            );
            if aggregate.of.is_none() && numeric {
                aggregate.of = query.value.clone();
            }
            let own = serde_json::to_value(aggregate.function).unwrap();
            if aggregate.name.as_deref() == own.as_str() {
                aggregate.name = None;
            }
        }
        query.value = None;
        query.sql = None;
        query
    }

    /// The ```sql blocks of docs/queries.md that start with `-- name: <query>`.
    pub(crate) fn documented() -> Vec<(String, String)> {
        let docs = include_str!("../../../docs/queries.md");
        docs.split("```sql\n")
            .skip(1)
            .filter_map(|block| {
                let sql = block.split("```").next()?;
                let name = sql.lines().next()?.strip_prefix("-- name: ")?;
                Some((name.trim().to_owned(), sql.to_owned()))
            })
            .collect()
    }

    #[test]
    fn every_shipped_query_in_sql_is_its_table_form() {
        let shipped = default_queries();
        let documented = documented();
        for table in &shipped {
            let Some((_, sql)) = documented.iter().find(|(name, _)| *name == table.name) else {
                panic!("docs/queries.md has no SQL for {}", table.name);
            };
            let compiled =
                compile(&table.name, sql).unwrap_or_else(|e| panic!("{}: {e}", table.name));
            assert_eq!(
                resolved(compiled),
                resolved(table.clone()),
                "{}",
                table.name
            );
        }
    }

    /// The README's example query is the shipped `avg_value_per_key`, in SQL.
    #[test]
    fn the_readme_s_query_is_the_shipped_one() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("[[analyzer.queries]]")
            .expect("the README's query");
        let end = start
            + readme[start..]
                .find("[store]")
                .expect("the section after it");
        #[derive(serde::Deserialize)]
        struct Queries {
            analyzer: crate::config::AnalyzerConfig,
        }
        let text = format!("[analyzer]\n{}", &readme[start..end]);
        let parsed: Queries = toml::from_str(&text).unwrap();
        let [query] = parsed.analyzer.queries.as_slice() else {
            panic!("one query in the README");
        };
        let compiled = compile(&query.name, query.sql.as_deref().unwrap()).unwrap();
        assert_eq!(resolved(compiled), resolved(default_queries()[0].clone()));
    }

    /// `DescribeQuery` explains a query in words: every part of it.
    #[test]
    fn a_query_is_explained_in_words() {
        let plan = compile(
            "q",
            "SELECT key, count(*) AS n, max(payload.v) FROM t \
             WHERE type IN ('a', 'b') AND NOT source LIKE 'test-%' \
             GROUP BY key, HOP(payload.ts, INTERVAL '1' MINUTE, INTERVAL '5' MINUTE) \
             HAVING n > 2 OR max < 1 EMIT ON UPDATE WITH (late_topic = 'late')",
        )
        .unwrap()
        .compile(0)
        .unwrap();
        assert_eq!(
            plan.definition,
            "count as n, max(payload.v) per key of topic t of events where type in (\"a\", \"b\") \
             and not (source starts with \"test-\") in sliding 5m every 1m event-time windows \
             (time from payload.ts), 5s out-of-orderness, 0s allowed lateness, emitted on every \
             update, only where (n > 2 or max < 1); late events to topic late"
        );
    }

    fn error(sql: &str) -> String {
        compile("q", sql).unwrap_err().to_string()
    }

    #[test]
    fn fields_filters_windows_and_options_compile_to_the_table_form() {
        let query = compile(
            "q",
            "SELECT CAST(attributes['region'] AS VARCHAR) AS region FROM x GROUP BY 1, TUMBLE(event_time, '1m')",
        );
        assert!(query.is_err(), "a text cast is refused");
        let query = compile(
            "q",
            "SELECT attributes['region'], count(*), approx_percentile(CAST(payload.ms AS DOUBLE), 0.5, 0.99) AS latency, \
             top_k(payload.path, 5), sample(payload.id, 3), new_items(payload.user), sum(payload.n) AS total \
             FROM \"sensors.a\" \
             WHERE type = 'reading' AND (payload.n BETWEEN 1 AND 10 OR source LIKE 'edge-%') \
               AND NOT attributes.test IS NOT NULL AND 3 < payload.n AND payload.kind IN ('a', 'b') \
             GROUP BY attributes['region'], HOP(payload.ts, INTERVAL '30' SECOND, INTERVAL '2 minutes') \
             HAVING total >= 2 AND count(*) > 1 \
             EMIT ON UPDATE WITH (out_of_orderness = '2s', allowed_lateness = '1m', late_topic = 'late', max_open_windows = 500);",
        )
        .unwrap();
        assert_eq!(query.topic, "sensors.a");
        assert_eq!(query.key, "attributes.region");
        assert_eq!(query.time, "payload.ts");
        assert_eq!(
            query.window,
            WindowConfig::Sliding {
                size: Duration::from_secs(120),
                slide: Duration::from_secs(30)
            }
        );
        assert_eq!(query.emit, EmitMode::OnUpdate);
        assert_eq!(query.out_of_orderness, Duration::from_secs(2));
        assert_eq!(query.allowed_lateness, Duration::from_secs(60));
        assert_eq!(query.late_topic.as_deref(), Some("late"));
        assert_eq!(query.max_open_windows, 500);
        let functions: Vec<_> = query.aggregates.iter().map(|a| a.function).collect();
        use Function::*;
        assert_eq!(functions, [Count, Percentiles, TopK, Sample, NewItems, Sum]);
        assert_eq!(query.aggregates[1].of.as_deref(), Some("payload.ms"));
        assert_eq!(query.aggregates[1].quantiles, Some(vec![0.5, 0.99]));
        assert_eq!(query.aggregates[1].name.as_deref(), Some("latency"));
        assert_eq!(query.aggregates[2].k, Some(5));
        assert_eq!(query.aggregates[3].size, Some(3));
        // WHERE: AND at the top is one predicate each; below OR, ranges and prefixes.
        let filter = serde_json::to_value(&query.filter).unwrap();
        assert_eq!(
            filter,
            serde_json::json!([
                { "field": "type", "eq": "reading" },
                { "any": [
                    { "not": { "any": [
                        { "not": { "field": "payload.n", "ge": 1.0 } },
                        { "not": { "field": "payload.n", "le": 10.0 } },
                    ] } },
                    { "field": "source", "prefix": "edge-" },
                ] },
                { "not": { "field": "attributes.test", "exists": true } },
                { "field": "payload.n", "gt": 3.0 },
                { "field": "payload.kind", "in": ["a", "b"] },
            ])
        );
        let having = serde_json::to_value(&query.having).unwrap();
        assert_eq!(
            having,
            serde_json::json!([
                { "field": "total", "ge": 2.0 },
                { "field": "count", "gt": 1.0 },
            ])
        );
        // The compiled query is a valid plan.
        query.compile(0).unwrap();
    }

    #[test]
    fn fields_named_like_clauses_are_fields() {
        let query = compile(
            "q",
            "SELECT payload.emit, sum(payload.with) AS total FROM t \
             GROUP BY payload.emit, TUMBLE(event_time, '1m') EMIT ON UPDATE",
        )
        .unwrap();
        assert_eq!(query.key, "payload.emit");
        assert_eq!(query.aggregates[0].of.as_deref(), Some("payload.with"));
        assert_eq!(query.emit, EmitMode::OnUpdate);
    }

    #[test]
    fn and_below_or_is_kept_exactly() {
        let query = compile(
            "q",
            "SELECT key, count(*) FROM t WHERE (type = 'a' AND payload.v > 1) OR type = 'b' \
             GROUP BY key, TUMBLE(event_time, INTERVAL '1' SECOND)",
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&query.filter).unwrap(),
            serde_json::json!([{ "any": [
                { "not": { "any": [
                    { "not": { "field": "type", "eq": "a" } },
                    { "not": { "field": "payload.v", "gt": 1.0 } },
                ] } },
                { "field": "type", "eq": "b" },
            ] }])
        );
    }

    #[test]
    fn bad_sql_is_refused_with_where_and_why() {
        let cases = [
            (
                "SELECT key, count(*) FROM t GROUP BY key",
                "GROUP BY needs a window",
            ),
            (
                "SELECT key, count(*) FROM t GROUP BY key, CUMULATE(event_time, '1m')",
                "line 1, column 43: window functions other than TUMBLE, HOP and SESSION are not supported",
            ),
            (
                "SELECT count(*) FROM t GROUP BY TUMBLE(event_time, '1m')",
                "GROUP BY needs the key",
            ),
            (
                "SELECT key, payload.v, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m')",
                "line 1, column 13: payload.v is neither the GROUP BY key",
            ),
            (
                "SELECT key, median(payload.v) FROM t GROUP BY key, TUMBLE(event_time, '1m')",
                "median is not a supported aggregate",
            ),
            (
                "SELECT key, count(*) FROM t JOIN u ON t.a = u.a GROUP BY key, TUMBLE(event_time, '1m')",
                "joins of topics are not",
            ),
            (
                "SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m') ORDER BY key",
                "ORDER BY is not supported",
            ),
            (
                "SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m') EMIT SOMETIMES",
                "expected EMIT ON CLOSE or EMIT ON UPDATE",
            ),
            (
                "SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m') WITH (speed = '1')",
                "unknown option \"speed\"",
            ),
            ("SELEC key FROM t", "line 1, column 1: "),
            (
                "SELECT key, count(*) FROM t\nWHERE payload.v LIKE '%x%'\nGROUP BY key, TUMBLE(event_time, '1m')",
                "line 2, column 22: LIKE takes a prefix pattern",
            ),
            (
                "SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, INTERVAL '1' YEAR)",
                "intervals are not supported",
            ),
            ("DELETE FROM t", "only SELECT is supported"),
            (
                "SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m'); SELECT 1",
                "one statement per query",
            ),
            (
                "SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m') HAVING max(payload.v) > 1",
                "HAVING compares aggregates of the SELECT list",
            ),
        ];
        for (sql, expected) in cases {
            let message = error(sql);
            assert!(
                message.contains(expected),
                "{sql}\n  gave: {message}\n  want: {expected}"
            );
        }
        let deep = format!(
            "SELECT key, count(*) FROM t WHERE {}type = 'a'{} GROUP BY key, TUMBLE(event_time, '1m')",
            "(".repeat(200),
            ")".repeat(200)
        );
        assert!(
            error(&deep).contains("nests too deeply"),
            "{}",
            error(&deep)
        );
        assert!(error(&"x".repeat(MAX_SQL_BYTES + 1)).contains("at most"));
    }

    #[test]
    fn a_query_in_sql_cannot_also_set_table_fields() {
        let query = QueryConfig {
            name: "q".into(),
            sql: Some("SELECT key, count(*) FROM t GROUP BY key, TUMBLE(event_time, '1m')".into()),
            topic: "other".into(),
            ..QueryConfig::default()
        };
        let error = query.compile(3).unwrap_err().to_string();
        assert!(
            error.contains("queries[3].sql") && error.contains("not both"),
            "{error}"
        );
        let only = QueryConfig {
            name: "q".into(),
            sql: query.sql.clone(),
            ..QueryConfig::default()
        };
        assert_eq!(only.compile(0).unwrap().topic, "t");
    }

    proptest::proptest! {
        /// Whatever the text, the front end answers with a query or an error, never a panic.
        #[test]
        fn any_text_compiles_or_is_refused(text in "\\PC{0,200}") {
            let _ = compile("q", &text);
        }

        /// Shuffled pieces of valid queries: near-misses reach deep into the compiler.
        #[test]
        fn near_misses_compile_or_are_refused(
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "SELECT", "key", ",", "count(*)", "FROM", "t", "WHERE", "payload.v", ">", "1",
                "GROUP BY", "TUMBLE(event_time, '1m')", "HOP(event_time, '1s', '2s')", "(", ")",
                "AND", "OR", "NOT", "IN ('a')", "HAVING", "EMIT ON UPDATE", "WITH (a = '1')",
                "CROSS JOIN UNNEST(payload.a) AS u", "u.b", "LIKE 'a%'", "IS NULL", "'x'", "-2",
                "attributes['a']", "CAST(payload.v AS DOUBLE)", "approx_percentile(payload.v, 0.5)",
            ]), 0..24)
        ) {
            let _ = compile("q", &pieces.join(" "));
        }
    }
}
