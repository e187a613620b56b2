//! Authorisation: what an authenticated caller may do to which topic or query, decided in
//! one place.
//!
//! The grants come from configuration ([`GrantConfig`]); the authentication layer puts a
//! [`Caller`] — who is calling, and the policy that applies — into every request's
//! extensions, and a service asks [`Caller::authorize`] at the point where a request names
//! a topic or a query. Nothing is allowed that no grant allows; with authentication off the
//! policy is open and every check passes.
//!
//! Principals are typed — `token:<name>`, `jwt:<subject>`, `cert:<common name>` — so a
//! static token, a JWT subject and a certificate spelled alike are three callers, never
//! one ([`PrincipalKind`]).
//!
//! Two namespaces are **reserved** for the pipeline's own services: topics whose names
//! start with `_` (`_analyzer.…`, `_store.…`, `_gateway.…`) and consumer groups whose
//! names start with `runnel-` (`runnel-analyzer.…`, `runnel-gateway.webhooks`). A
//! wildcard (`*`, `sensors.*`) never reaches into them: only a grant that names a reserved
//! name, or a prefix inside the namespace (`_analyzer.*`), does — as NATS keeps `>` out
//! of `$SYS`. So a client granted every topic and every group cannot read the results log,
//! take the analyzer's partitions or commit its offsets.

use crate::config::GrantConfig;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Something a caller may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Write events to a topic (collector `Ingest`, broker `Produce`; creating the topic
    /// on first use when the broker auto-creates topics).
    Produce,
    /// Read a topic (broker `Fetch`, `Subscribe`, `CommitOffsets`); on a consumer group:
    /// join it, commit its offsets, write fenced by it, and see it described.
    Consume,
    /// Read a query's results (store and gateway `Get`, `Range`, `Watch`).
    ReadResults,
    /// Write a query's results (store `Put`: the analyzer).
    WriteResults,
    /// Administer a topic (`CreateTopic`) or a query.
    Manage,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Produce => "produce to",
            Action::Consume => "consume from",
            Action::ReadResults => "read the results of",
            Action::WriteResults => "write the results of",
            Action::Manage => "manage",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Produce => "produce",
            Action::Consume => "consume",
            Action::ReadResults => "read_results",
            Action::WriteResults => "write_results",
            Action::Manage => "manage",
        })
    }
}

/// What an action is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// One topic.
    Topic(&'a str),
    /// One query's results.
    Query(&'a str),
    /// Every topic (e.g. a listing).
    AnyTopic,
    /// Every query's results (e.g. a `Watch` without a query name).
    AnyQuery,
    /// One consumer group.
    Group(&'a str),
}

impl<'a> Resource<'a> {
    /// A query by name, where an empty name (a watch filter that matches everything)
    /// means every query.
    pub fn query_or_any(name: &'a str) -> Resource<'a> {
        if name.is_empty() {
            Resource::AnyQuery
        } else {
            Resource::Query(name)
        }
    }
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Topic(name) => write!(f, "topic {name:?}"),
            Resource::Query(name) => write!(f, "query {name:?}"),
            Resource::AnyTopic => f.write_str("every topic"),
            Resource::AnyQuery => f.write_str("every query"),
            Resource::Group(name) => write!(f, "consumer group {name:?}"),
        }
    }
}

/// The kind of credential that named a caller: the first part of its principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A static bearer token (`auth.tokens`): `token:<its principal>`.
    Token,
    /// A JWT: `jwt:<its principal claim>`.
    Jwt,
    /// A client certificate verified by mutual TLS: `cert:<its common name>`.
    Cert,
}

impl PrincipalKind {
    const ALL: [PrincipalKind; 3] = [
        PrincipalKind::Token,
        PrincipalKind::Jwt,
        PrincipalKind::Cert,
    ];

    fn prefix(self) -> &'static str {
        match self {
            PrincipalKind::Token => "token:",
            PrincipalKind::Jwt => "jwt:",
            PrincipalKind::Cert => "cert:",
        }
    }

    /// The principal of a caller of this kind named `name`.
    pub fn principal(self, name: &str) -> Arc<str> {
        Arc::from(format!("{}{name}", self.prefix()))
    }

    /// The kind and the name of a typed principal (`cert:analyzer`), if it is one.
    pub fn split(principal: &str) -> Option<(PrincipalKind, &str)> {
        PrincipalKind::ALL.into_iter().find_map(|kind| {
            principal
                .strip_prefix(kind.prefix())
                .filter(|name| !name.is_empty())
                .map(|name| (kind, name))
        })
    }

    /// Why `principal` cannot name a grant's caller, with how to write it instead: it must
    /// be `*` or typed.
    pub fn check_grant_principal(principal: &str) -> Result<(), String> {
        if principal == "*" || PrincipalKind::split(principal).is_some() {
            return Ok(());
        }
        Err(format!(
            "{principal:?} does not say what kind of caller it is: write \"cert:{principal}\" \
             (client certificate), \"token:{principal}\" (static token) or \"jwt:{principal}\" \
             (JWT subject), or \"*\" for every caller"
        ))
    }
}

/// The start of every topic name reserved for the pipeline's own services.
pub const RESERVED_TOPIC_PREFIX: &str = "_";
/// The start of every consumer group name reserved for the pipeline's own services.
pub const RESERVED_GROUP_PREFIX: &str = "runnel-";

/// A name, a prefix (`sensors.*`) or everything (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
    All,
}

impl Pattern {
    fn parse(text: &str) -> Pattern {
        match text.strip_suffix('*') {
            Some("") => Pattern::All,
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(text.to_owned()),
        }
    }

    /// Whether the pattern covers `name`; `None` asks whether it covers every name. Names
    /// starting with `reserved` are covered only by their exact name or by a prefix that
    /// itself starts with `reserved`: a wildcard never reaches into the namespace.
    fn covers(&self, name: Option<&str>, reserved: Option<&str>) -> bool {
        let inside = |text: &str| reserved.is_some_and(|r| text.starts_with(r));
        match (self, name) {
            (Pattern::All, None) => true,
            (Pattern::All, Some(name)) => !inside(name),
            (Pattern::Exact(exact), Some(name)) => exact == name,
            (Pattern::Prefix(prefix), Some(name)) => {
                name.starts_with(prefix.as_str()) && (!inside(name) || inside(prefix))
            }
            (Pattern::Exact(_) | Pattern::Prefix(_), None) => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Grant {
    /// `None`: every authenticated caller.
    principal: Option<String>,
    allow: Vec<Action>,
    topics: Vec<Pattern>,
    queries: Vec<Pattern>,
    groups: Vec<Pattern>,
}

/// The grants of one service.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Open: authentication is off and everything is allowed.
    open: bool,
    grants: Vec<Grant>,
}

impl Policy {
    /// Everything allowed to everyone: authentication is off.
    pub fn open() -> Policy {
        Policy {
            open: true,
            grants: Vec::new(),
        }
    }

    /// Only what `grants` allow.
    pub fn from_grants(grants: &[GrantConfig]) -> Policy {
        Policy {
            open: false,
            grants: grants
                .iter()
                .map(|g| Grant {
                    principal: (g.principal != "*").then(|| g.principal.clone()),
                    allow: g.allow.clone(),
                    topics: g.topics.iter().map(|t| Pattern::parse(t)).collect(),
                    queries: g.queries.iter().map(|q| Pattern::parse(q)).collect(),
                    groups: g.groups.iter().map(|q| Pattern::parse(q)).collect(),
                })
                .collect(),
        }
    }

    /// Whether the policy checks anything (authentication is on).
    pub fn is_open(&self) -> bool {
        self.open
    }

    fn permits(&self, principal: Option<&str>, action: Action, resource: Resource<'_>) -> bool {
        if self.open {
            return true;
        }
        let Some(principal) = principal else {
            return false;
        };
        let (patterns, name, reserved): (fn(&Grant) -> &[Pattern], _, _) = match resource {
            Resource::Topic(name) => (|g| &g.topics, Some(name), Some(RESERVED_TOPIC_PREFIX)),
            Resource::AnyTopic => (|g| &g.topics, None, None),
            Resource::Query(name) => (|g| &g.queries, Some(name), None),
            Resource::AnyQuery => (|g| &g.queries, None, None),
            Resource::Group(name) => (|g| &g.groups, Some(name), Some(RESERVED_GROUP_PREFIX)),
        };
        self.grants.iter().any(|grant| {
            grant.principal.as_deref().is_none_or(|p| p == principal)
                && grant.allow.contains(&action)
                && patterns(grant).iter().any(|p| p.covers(name, reserved))
        })
    }
}

/// A call that the policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{principal} may not {verb} {resource}")]
pub struct AccessDenied {
    principal: String,
    verb: &'static str,
    resource: String,
}

impl From<AccessDenied> for tonic::Status {
    fn from(denied: AccessDenied) -> tonic::Status {
        metrics::counter!("runnel_security_denied_total").increment(1);
        tonic::Status::permission_denied(denied.to_string())
    }
}

/// Who is calling, and the policy that decides what they may do. The authentication
/// layer puts one into every request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    principal: Option<Arc<str>>,
    policy: Arc<Policy>,
}

impl Caller {
    /// A caller known as `principal` (`None`: not authenticated, for an open policy).
    pub fn new(principal: Option<Arc<str>>, policy: Arc<Policy>) -> Caller {
        Caller { principal, policy }
    }

    /// The authenticated name, if any.
    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// Whether the policy allows `action` on `resource`.
    pub fn may(&self, action: Action, resource: Resource<'_>) -> bool {
        self.policy
            .permits(self.principal.as_deref(), action, resource)
    }

    /// `Ok` if the policy allows `action` on `resource`; the error says what was refused
    /// to whom, and converts to `PERMISSION_DENIED`.
    pub fn authorize(&self, action: Action, resource: Resource<'_>) -> Result<(), AccessDenied> {
        if self.may(action, resource) {
            return Ok(());
        }
        tracing::debug!(principal = ?self.principal, %action, %resource, "permission denied");
        Err(AccessDenied {
            principal: self.principal.as_deref().map_or_else(
                || "an unauthenticated caller".to_owned(),
                |p| format!("{p:?}"),
            ),
            verb: action.verb(),
            resource: resource.to_string(),
        })
    }
}

/// The caller of a gRPC request, as the authentication layer recorded it. A request that
/// did not pass through the layer has none, and is refused: a service wired without the
/// layer fails closed rather than open.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Caller, tonic::Status> {
    request.extensions().get::<Caller>().ok_or_else(|| {
        tracing::error!("a request reached a service without passing the authentication layer");
        tonic::Status::permission_denied("the caller is not known")
    })
}

/// Checks that the caller of `request` may do `action` on `resource`.
pub fn authorize<T>(
    request: &tonic::Request<T>,
    action: Action,
    resource: Resource<'_>,
) -> Result<(), tonic::Status> {
    Ok(caller(request)?.authorize(action, resource)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(principal: &str, allow: &[Action], topics: &[&str], queries: &[&str]) -> GrantConfig {
        GrantConfig {
            principal: principal.into(),
            allow: allow.to_vec(),
            topics: topics.iter().map(|s| s.to_string()).collect(),
            queries: queries.iter().map(|s| s.to_string()).collect(),
            groups: Vec::new(),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn caller(principal: &str, policy: &Arc<Policy>) -> Caller {
        Caller::new(Some(principal.into()), Arc::clone(policy))
    }

    #[test]
    fn grants_allow_exactly_what_they_name() {
        let policy = Arc::new(Policy::from_grants(&[
            grant("sensors", &[Action::Produce], &["sensors.*"], &[]),
            grant(
                "analyst",
                &[Action::ReadResults],
                &[],
                &["avg_value_per_key"],
            ),
            grant("ops", &[Action::Manage, Action::Consume], &["*"], &["*"]),
            grant("*", &[Action::Consume], &["public"], &[]),
        ]));
        let sensors = caller("sensors", &policy);
        assert!(sensors.may(Action::Produce, Resource::Topic("sensors.a")));
        assert!(!sensors.may(Action::Produce, Resource::Topic("sensorsX")));
        assert!(!sensors.may(Action::Produce, Resource::Topic("events")));
        assert!(!sensors.may(Action::Consume, Resource::Topic("sensors.a")));
        assert!(!sensors.may(Action::Produce, Resource::AnyTopic));
        assert!(sensors.may(Action::Consume, Resource::Topic("public")));

        let analyst = caller("analyst", &policy);
        assert!(analyst.may(Action::ReadResults, Resource::Query("avg_value_per_key")));
        assert!(!analyst.may(Action::ReadResults, Resource::Query("other")));
        assert!(!analyst.may(Action::ReadResults, Resource::AnyQuery));
        assert!(!analyst.may(Action::WriteResults, Resource::Query("avg_value_per_key")));
        // A query grant says nothing about a topic of the same name.
        assert!(!analyst.may(Action::ReadResults, Resource::Topic("avg_value_per_key")));

        assert!(!analyst.may(Action::ReadResults, Resource::query_or_any("")));
        assert!(analyst.may(
            Action::ReadResults,
            Resource::query_or_any("avg_value_per_key")
        ));

        let ops = caller("ops", &policy);
        assert!(ops.may(Action::Manage, Resource::AnyTopic));
        assert!(ops.may(Action::Manage, Resource::Query("q")));
        assert!(!ops.may(Action::Produce, Resource::Topic("t")));

        let stranger = caller("stranger", &policy);
        assert!(!stranger.may(Action::Produce, Resource::Topic("sensors.a")));
        assert!(stranger.may(Action::Consume, Resource::Topic("public")));
        let anonymous = Caller::new(None, Arc::clone(&policy));
        assert!(!anonymous.may(Action::Consume, Resource::Topic("public")));
    }

    #[test]
    fn groups_need_their_own_grant_and_wildcards_stay_out_of_reserved_names() {
        let mut everything = grant("cert:client", &[Action::Consume], &["*"], &[]);
        everything.groups = strings(&["*"]);
        let mut dashboards = grant("token:dash", &[Action::Consume], &["events"], &[]);
        dashboards.groups = strings(&["dashboards.*"]);
        let mut analyzer = grant(
            "cert:analyzer",
            &[Action::Consume],
            &["*", "_analyzer.*"],
            &[],
        );
        analyzer.groups = strings(&["runnel-analyzer.*"]);
        let policy = Arc::new(Policy::from_grants(&[
            everything,
            dashboards,
            analyzer,
            grant("token:reader", &[Action::Consume], &["events"], &[]),
            grant("token:prefix", &[Action::Consume], &["_*"], &[]),
        ]));

        // Consuming a topic says nothing about the groups on it.
        let reader = caller("token:reader", &policy);
        assert!(reader.may(Action::Consume, Resource::Topic("events")));
        assert!(!reader.may(Action::Consume, Resource::Group("runnel-analyzer.q")));
        assert!(!reader.may(Action::Consume, Resource::Group("anything")));

        let dash = caller("token:dash", &policy);
        assert!(dash.may(Action::Consume, Resource::Group("dashboards.live")));
        assert!(!dash.may(Action::Consume, Resource::Group("runnel-analyzer.q")));

        // `*` covers every group and topic but the reserved ones.
        let client = caller("cert:client", &policy);
        assert!(client.may(Action::Consume, Resource::Group("mine")));
        assert!(client.may(Action::Consume, Resource::Topic("events")));
        assert!(!client.may(Action::Consume, Resource::Group("runnel-analyzer.q")));
        assert!(!client.may(Action::Consume, Resource::Group("runnel-gateway.webhooks")));
        assert!(!client.may(Action::Consume, Resource::Topic("_store.results")));
        assert!(!client.may(Action::Consume, Resource::Topic("_analyzer.q.keyed")));

        // Only a grant naming the reserved prefix reaches inside it.
        let analyzer = caller("cert:analyzer", &policy);
        assert!(analyzer.may(Action::Consume, Resource::Group("runnel-analyzer.q")));
        assert!(analyzer.may(Action::Consume, Resource::Topic("_analyzer.q.keyed")));
        assert!(analyzer.may(Action::Consume, Resource::Topic("events")));
        assert!(!analyzer.may(Action::Consume, Resource::Group("runnel-gateway.webhooks")));
        assert!(!analyzer.may(Action::Consume, Resource::Topic("_store.results")));
        let prefix = caller("token:prefix", &policy);
        assert!(prefix.may(Action::Consume, Resource::Topic("_store.results")));
        assert!(!prefix.may(Action::Consume, Resource::Topic("events")));

        let denied = reader
            .authorize(Action::Consume, Resource::Group("runnel-analyzer.q"))
            .unwrap_err();
        assert_eq!(
            denied.to_string(),
            "\"token:reader\" may not consume from consumer group \"runnel-analyzer.q\""
        );
    }

    #[test]
    fn principals_are_typed_and_untyped_grant_principals_say_how_to_migrate() {
        assert_eq!(&*PrincipalKind::Cert.principal("analyzer"), "cert:analyzer");
        assert_eq!(
            PrincipalKind::split("jwt:analyzer"),
            Some((PrincipalKind::Jwt, "analyzer"))
        );
        assert_eq!(PrincipalKind::split("token:"), None);
        assert_eq!(PrincipalKind::split("analyzer"), None);
        PrincipalKind::check_grant_principal("*").unwrap();
        PrincipalKind::check_grant_principal("token:ops").unwrap();
        let error = PrincipalKind::check_grant_principal("analyzer").unwrap_err();
        assert!(error.contains("\"cert:analyzer\""), "{error}");
        assert!(!error.contains('\n'), "one line: {error}");

        // The same name under another kind gets nothing.
        let policy = Arc::new(Policy::from_grants(&[grant(
            "cert:analyzer",
            &[Action::WriteResults],
            &[],
            &["*"],
        )]));
        assert!(caller("cert:analyzer", &policy).may(Action::WriteResults, Resource::Query("q")));
        assert!(!caller("jwt:analyzer", &policy).may(Action::WriteResults, Resource::Query("q")));
        assert!(!caller("token:analyzer", &policy).may(Action::WriteResults, Resource::Query("q")));
    }

    #[test]
    fn an_open_policy_allows_everything_and_an_empty_one_nothing() {
        let open = Caller::new(None, Arc::new(Policy::open()));
        assert!(open.may(Action::Manage, Resource::AnyTopic));
        let closed = caller("p", &Arc::new(Policy::from_grants(&[])));
        assert!(!closed.may(Action::Consume, Resource::Topic("t")));
    }

    #[test]
    fn a_denial_is_permission_denied_and_says_what_was_refused() {
        let policy = Arc::new(Policy::from_grants(&[]));
        let denied = caller("sensors", &policy)
            .authorize(Action::Produce, Resource::Topic("events"))
            .unwrap_err();
        assert_eq!(
            denied.to_string(),
            "\"sensors\" may not produce to topic \"events\""
        );
        let status = tonic::Status::from(denied);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_request_without_a_caller_is_refused() {
        let request = tonic::Request::new(());
        let status = authorize(&request, Action::Consume, Resource::Topic("t")).unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let mut request = tonic::Request::new(());
        request
            .extensions_mut()
            .insert(Caller::new(None, Arc::new(Policy::open())));
        authorize(&request, Action::Consume, Resource::Topic("t")).unwrap();
    }
}
