//! Aggregates: what a query computes over the events of one key's window.
//!
//! | `fn` | of | result | state |
//! |---|---|---|---|
//! | `count` | optional: counts events that have the field | `values[name]` | a counter |
//! | `sum`, `avg`, `min`, `max` | a number | `values[name]` | sum and count / extreme |
//! | `stddev` | a number | population standard deviation | Welford's running moments |
//! | `zscore` | a number | the newest value's z-score against the window's earlier values | moments + the newest z |
//! | `distinct` | any value | estimated distinct count | HyperLogLog++ (`hyperloglogplus`), `precision` 4–18 |
//! | `top_k` | any value | `items[name]`: the `k` heaviest with estimated counts | Space-Saving ([`crate::sketch`]) |
//! | `percentiles` | a number | `values[<name>_]p50`, … per quantile | DDSketch (`sketches-ddsketch`), `relative_accuracy` |
//! | `sample` | any value | `items[name]`: a uniform sample of `size` values | bottom-k by position hash |
//! | `new_items` | any value | how many events brought a value not seen before for this key | a Bloom filter per partition (`bloomfilter`) |
//! | `score` | a text (default `type`) | `1 − e^(−Σ weight)`, in [0, 1) | the weight sum |
//!
//! Every state is serialisable (it goes into checkpoints) and mergeable (session windows
//! merge). All but `zscore`'s "newest value" and Space-Saving's tie-breaks are independent
//! of the order events arrive in; within a partition that order is fixed by the broker,
//! so results are the same after a crash.

use crate::path::{FieldRef, Scalar};
use crate::sketch::{BottomK, SpaceSaving};
use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use runnel_proto::v1::{RankedItem, RankedItems};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// An aggregate function's name in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Events (with the field, if `of` is given).
    Count,
    /// Sum of a number.
    Sum,
    /// Mean of a number.
    Avg,
    /// Smallest number.
    Min,
    /// Largest number.
    Max,
    /// Population standard deviation of a number.
    Stddev,
    /// The z-score of the newest number against the window's earlier ones.
    Zscore,
    /// Estimated distinct values (HyperLogLog++).
    Distinct,
    /// The heaviest values with estimated counts (Space-Saving).
    TopK,
    /// Quantiles of a number (DDSketch).
    Percentiles,
    /// A uniform random sample of values.
    Sample,
    /// Events whose value this key had not seen before (Bloom filter).
    NewItems,
    /// A saturating weighted score in [0, 1).
    Score,
}

impl Function {
    fn default_name(self) -> &'static str {
        match self {
            Function::Count => "count",
            Function::Sum => "sum",
            Function::Avg => "avg",
            Function::Min => "min",
            Function::Max => "max",
            Function::Stddev => "stddev",
            Function::Zscore => "zscore",
            Function::Distinct => "distinct",
            Function::TopK => "top_k",
            Function::Percentiles => "",
            Function::Sample => "sample",
            Function::NewItems => "new_items",
            Function::Score => "score",
        }
    }

    /// Whether the function reads a number (so `of` defaults to the query's `value`).
    fn numeric(self) -> bool {
        matches!(
            self,
            Function::Sum
                | Function::Avg
                | Function::Min
                | Function::Max
                | Function::Stddev
                | Function::Zscore
                | Function::Percentiles
        )
    }
}

/// One aggregate as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The function.
    #[serde(rename = "fn")]
    pub function: Function,
    /// The field it reads (see the field names in `docs/queries.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<String>,
    /// The name of its value in results (default: the function's name; percentiles:
    /// `p50`, … or `<name>_p50`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `top_k`: how many items (1–1000, default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// `top_k`: counters kept (default 10 × k): estimates are off by at most n / counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<usize>,
    /// `distinct`: HyperLogLog precision, 4–18 (default 14: 0.8 % standard error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<u8>,
    /// `percentiles`: the quantiles, in (0, 1) (default 0.5, 0.9, 0.99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantiles: Option<Vec<f64>>,
    /// `percentiles`: the relative accuracy of every quantile (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_accuracy: Option<f64>,
    /// `sample`: how many values (1–1000, default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    /// `new_items`: distinct (key, value) pairs the Bloom filter is sized for, per
    /// partition (default 100 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
    /// `new_items`: the false-positive rate at `capacity` (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub false_positive_rate: Option<f64>,
    /// `score`: the weight of each value (by its text); others weigh 0. Weights are ≥ 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<BTreeMap<String, f64>>,
}

/// What a function needs besides its input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Params {
    Plain,
    Distinct {
        precision: u8,
    },
    TopK {
        k: usize,
        counters: usize,
    },
    Percentiles {
        quantiles: Vec<(f64, String)>,
        alpha: f64,
    },
    Sample {
        size: usize,
    },
    NewItems {
        capacity: usize,
        fpp: f64,
    },
    Score {
        weights: HashMap<String, f64>,
    },
}

/// A checked aggregate.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Aggregate {
    pub(crate) function: Function,
    pub(crate) name: String,
    /// What it reads; `None` only for a `count` of events.
    pub(crate) input: Option<FieldRef>,
    pub(crate) params: Params,
}

impl AggregateConfig {
    /// Checks the aggregate; `key` names it in errors, `value` is the query's default
    /// number.
    pub(crate) fn compile(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Aggregate, (String, String)> {
        let f = self.function;
        let err = |field: &str, why: &str| Err((format!("{key}.{field}"), why.to_owned()));
        let allowed: &[&str] = match f {
            Function::TopK => &["k", "counters"],
            Function::Distinct => &["precision"],
            Function::Percentiles => &["quantiles", "relative_accuracy"],
            Function::Sample => &["size"],
            Function::NewItems => &["capacity", "false_positive_rate"],
            Function::Score => &["weights"],
            _ => &[],
        };
        let given = [
            ("k", self.k.is_some()),
            ("counters", self.counters.is_some()),
            ("precision", self.precision.is_some()),
            ("quantiles", self.quantiles.is_some()),
            ("relative_accuracy", self.relative_accuracy.is_some()),
            ("size", self.size.is_some()),
            ("capacity", self.capacity.is_some()),
            ("false_positive_rate", self.false_positive_rate.is_some()),
            ("weights", self.weights.is_some()),
        ];
        if let Some((option, _)) = given.iter().find(|(o, set)| *set && !allowed.contains(o)) {
            return err(
                option,
                &format!("does not apply to fn = {:?}", f.default_name_or_kind()),
            );
        }
        let of = match (&self.of, f) {
            (Some(of), _) => Some(of.as_str()),
            (None, Function::Count) => None,
            (None, Function::Score) => Some("type"),
            (None, f) if f.numeric() => match value {
                Some(value) => Some(value),
                None => return err("of", "is required (or set the query's value)"),
            },
            (None, _) => return err("of", "is required"),
        };
        let input = of
            .map(FieldRef::parse)
            .transpose()
            .map_err(|why| (format!("{key}.of"), why))?;
        let params = match f {
            Function::Distinct => {
                let precision = self.precision.unwrap_or(14);
                if !(4..=18).contains(&precision) {
                    return err("precision", "must be between 4 and 18");
                }
                Params::Distinct { precision }
            }
            Function::TopK => {
                let k = self.k.unwrap_or(10);
                if !(1..=1000).contains(&k) {
                    return err("k", "must be between 1 and 1000");
                }
                let counters = self.counters.unwrap_or(10 * k);
                if !(k..=100_000).contains(&counters) {
                    return err("counters", "must be between k and 100000");
                }
                Params::TopK { k, counters }
            }
            Function::Percentiles => {
                let quantiles = self
                    .quantiles
                    .clone()
                    .unwrap_or_else(|| vec![0.5, 0.9, 0.99]);
                if quantiles.is_empty() || quantiles.len() > 16 {
                    return err("quantiles", "give 1-16 quantiles");
                }
                let prefix = self
                    .name
                    .as_ref()
                    .map(|n| format!("{n}_"))
                    .unwrap_or_default();
                let mut named = Vec::new();
                for q in quantiles {
                    if !(q > 0.0 && q < 1.0) {
                        return err("quantiles", "each must be in (0, 1)");
                    }
                    named.push((q, format!("{prefix}p{}", (q * 1000.0).round() / 10.0)));
                }
                let alpha = self.relative_accuracy.unwrap_or(0.01);
                if !(0.0001..=0.5).contains(&alpha) {
                    return err("relative_accuracy", "must be between 0.0001 and 0.5");
                }
                Params::Percentiles {
                    quantiles: named,
                    alpha,
                }
            }
            Function::Sample => {
                let size = self.size.unwrap_or(10);
                if !(1..=1000).contains(&size) {
                    return err("size", "must be between 1 and 1000");
                }
                Params::Sample { size }
            }
            Function::NewItems => {
                let capacity = self.capacity.unwrap_or(100_000);
                if !(1..=100_000_000).contains(&capacity) {
                    return err("capacity", "must be between 1 and 100000000");
                }
                let fpp = self.false_positive_rate.unwrap_or(0.01);
                if !(fpp > 0.0 && fpp < 0.5) {
                    return err("false_positive_rate", "must be in (0, 0.5)");
                }
                Params::NewItems { capacity, fpp }
            }
            Function::Score => {
                let Some(weights) = &self.weights else {
                    return err("weights", "is required: the weight of each value");
                };
                if weights.is_empty() || weights.values().any(|w| !(w.is_finite() && *w >= 0.0)) {
                    return err(
                        "weights",
                        "give at least one weight, each a finite number >= 0",
                    );
                }
                Params::Score {
                    weights: weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                }
            }
            _ => Params::Plain,
        };
        Ok(Aggregate {
            function: f,
            name: self
                .name
                .clone()
                .unwrap_or_else(|| f.default_name().to_owned()),
            input,
            params,
        })
    }
}

impl Function {
    fn default_name_or_kind(self) -> &'static str {
        match self {
            Function::Percentiles => "percentiles",
            other => other.default_name(),
        }
    }
}

impl Aggregate {
    /// The value and item names this aggregate writes in results.
    pub(crate) fn output_names(&self) -> Vec<String> {
        match &self.params {
            Params::Percentiles { quantiles, .. } => {
                quantiles.iter().map(|(_, n)| n.clone()).collect()
            }
            _ => vec![self.name.clone()],
        }
    }

    /// A fresh state.
    pub(crate) fn state(&self) -> AggState {
        match (&self.function, &self.params) {
            (Function::Count, _) => AggState::Count(0),
            (Function::Sum | Function::Avg, _) => AggState::Sum { sum: 0.0, n: 0 },
            (Function::Min, _) => AggState::Min(None),
            (Function::Max, _) => AggState::Max(None),
            (Function::Stddev, _) => AggState::Moments(Moments::default()),
            (Function::Zscore, _) => AggState::Zscore {
                moments: Moments::default(),
                newest: None,
            },
            (Function::Distinct, Params::Distinct { precision }) => AggState::Distinct(Box::new(
                HyperLogLogPlus::new(*precision, FixedHasher).unwrap_or_else(|_| {
                    // Precision is checked at start-up; 14 is always valid.
                    HyperLogLogPlus::new(14, FixedHasher).expect("precision 14 is valid")
                }),
            )),
            (Function::TopK, Params::TopK { counters, .. }) => {
                AggState::TopK(SpaceSaving::new(*counters))
            }
            (Function::Percentiles, Params::Percentiles { alpha, .. }) => {
                AggState::Percentiles(Box::new(Quantiles(sketches_ddsketch::DDSketch::new(
                    sketches_ddsketch::Config::new(*alpha, 2048, 1e-9),
                ))))
            }
            (Function::Sample, Params::Sample { size }) => AggState::Sample(BottomK::new(*size)),
            (Function::NewItems, _) => AggState::Count(0),
            (Function::Score, _) => AggState::Score(0.0),
            _ => AggState::Count(0),
        }
    }
}

/// A fixed hash for HyperLogLog: the same value hashes the same in every process, so a
/// restored sketch goes on counting the same registers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct FixedHasher;

impl BuildHasher for FixedHasher {
    type Hasher = xxhash_rust::xxh3::Xxh3;

    fn build_hasher(&self) -> Self::Hasher {
        xxhash_rust::xxh3::Xxh3::with_seed(0x72_75_6e_6e_65_6c)
    }
}

/// A DDSketch (which has no `Debug` of its own).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Quantiles(sketches_ddsketch::DDSketch);

impl std::fmt::Debug for Quantiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DDSketch({} values)", self.0.count())
    }
}

/// Running mean and variance (Welford), mergeable (Chan et al.).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn add(&mut self, x: f64) {
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (x - self.mean);
    }

    fn merge(&mut self, o: &Moments) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *o;
            return;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        self.mean += delta * o.n as f64 / n as f64;
        self.m2 += o.m2 + delta * delta * (self.n as f64 * o.n as f64) / n as f64;
        self.n = n;
    }

    fn stddev(&self) -> Option<f64> {
        (self.n > 0).then(|| (self.m2 / self.n as f64).max(0.0).sqrt())
    }
}

/// The state of one aggregate in one window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum AggState {
    Count(u64),
    Sum {
        sum: f64,
        n: u64,
    },
    Min(Option<f64>),
    Max(Option<f64>),
    Moments(Moments),
    Zscore {
        moments: Moments,
        newest: Option<f64>,
    },
    Distinct(Box<HyperLogLogPlus<String, FixedHasher>>),
    TopK(SpaceSaving),
    Percentiles(Box<Quantiles>),
    Sample(BottomK),
    Score(f64),
}

impl AggState {
    /// Counts an event for an aggregate without input (`count` of events).
    pub(crate) fn add_event(&mut self) {
        if let AggState::Count(n) = self {
            *n += 1;
        }
    }

    /// Adds one value. `rank` identifies the event (for samples); a `new_items` value has
    /// already been turned into 1 (new) or 0 by the partition's Bloom filter.
    pub(crate) fn add(&mut self, spec: &Aggregate, value: &Scalar<'_>, rank: u64) {
        match self {
            AggState::Count(n) => {
                *n += match spec.function {
                    Function::NewItems => value.number().unwrap_or(0.0) as u64,
                    _ => 1,
                }
            }
            AggState::Sum { sum, n } => {
                if let Some(x) = value.number() {
                    *sum += x;
                    *n += 1;
                }
            }
            AggState::Min(m) => {
                if let Some(x) = value.number() {
                    *m = Some(m.map_or(x, |m| m.min(x)));
                }
            }
            AggState::Max(m) => {
                if let Some(x) = value.number() {
                    *m = Some(m.map_or(x, |m| m.max(x)));
                }
            }
            AggState::Moments(moments) => {
                if let Some(x) = value.number() {
                    moments.add(x);
                }
            }
            AggState::Zscore { moments, newest } => {
                if let Some(x) = value.number() {
                    *newest = Some(match moments.stddev() {
                        Some(sd) if moments.n >= 2 && sd > 0.0 => (x - moments.mean) / sd,
                        _ => 0.0,
                    });
                    moments.add(x);
                }
            }
            AggState::Distinct(hll) => hll.insert(value.text().as_ref()),
            AggState::TopK(summary) => summary.add(&value.text()),
            AggState::Percentiles(sketch) => {
                if let Some(x) = value.number() {
                    sketch.0.add(x);
                }
            }
            AggState::Sample(sample) => sample.offer(rank, &value.text()),
            AggState::Score(sum) => {
                if let Params::Score { weights } = &spec.params {
                    *sum += weights.get(value.text().as_ref()).copied().unwrap_or(0.0);
                }
            }
        }
    }

    /// Folds `other` (the same aggregate's state in another window) in.
    pub(crate) fn merge(&mut self, other: &AggState) {
        match (self, other) {
            (AggState::Count(a), AggState::Count(b)) => *a += b,
            (AggState::Sum { sum, n }, AggState::Sum { sum: s, n: m }) => {
                *sum += s;
                *n += m;
            }
            (AggState::Min(a), AggState::Min(b)) => *a = min_opt(*a, *b, f64::min),
            (AggState::Max(a), AggState::Max(b)) => *a = min_opt(*a, *b, f64::max),
            (AggState::Moments(a), AggState::Moments(b)) => a.merge(b),
            (
                AggState::Zscore { moments, newest },
                AggState::Zscore {
                    moments: m,
                    newest: n,
                },
            ) => {
                moments.merge(m);
                // The later window's newest value stays the newest.
                if n.is_some() {
                    *newest = *n;
                }
            }
            (AggState::Distinct(a), AggState::Distinct(b)) => {
                // Same precision: both come from one aggregate's configuration.
                let _ = a.merge(b.as_ref());
            }
            (AggState::TopK(a), AggState::TopK(b)) => a.merge(b),
            (AggState::Percentiles(a), AggState::Percentiles(b)) => {
                // Same accuracy: both come from one aggregate's configuration.
                let _ = a.0.merge(&b.0);
            }
            (AggState::Sample(a), AggState::Sample(b)) => a.merge(b),
            (AggState::Score(a), AggState::Score(b)) => *a += b,
            _ => {}
        }
    }

    /// Writes the aggregate's result into `values` and `items`.
    pub(crate) fn report(
        &mut self,
        spec: &Aggregate,
        values: &mut HashMap<String, f64>,
        items: &mut HashMap<String, RankedItems>,
    ) {
        let name = || spec.name.clone();
        match self {
            AggState::Count(n) => {
                values.insert(name(), *n as f64);
            }
            AggState::Sum { sum, n } => {
                if spec.function == Function::Avg {
                    if *n > 0 {
                        values.insert(name(), *sum / *n as f64);
                    }
                } else {
                    values.insert(name(), *sum);
                }
            }
            AggState::Min(m) | AggState::Max(m) => {
                if let Some(m) = m {
                    values.insert(name(), *m);
                }
            }
            AggState::Moments(moments) => {
                if let Some(sd) = moments.stddev() {
                    values.insert(name(), sd);
                }
            }
            AggState::Zscore { newest, .. } => {
                if let Some(z) = newest {
                    values.insert(name(), *z);
                }
            }
            AggState::Distinct(hll) => {
                values.insert(name(), hll.count().round());
            }
            AggState::TopK(summary) => {
                let k = match spec.params {
                    Params::TopK { k, .. } => k,
                    _ => 10,
                };
                let ranked = summary
                    .top(k)
                    .into_iter()
                    .map(|c| RankedItem {
                        item: c.item,
                        value: c.count as f64,
                    })
                    .collect();
                items.insert(name(), RankedItems { items: ranked });
            }
            AggState::Percentiles(sketch) => {
                if let Params::Percentiles { quantiles, .. } = &spec.params {
                    for (q, n) in quantiles {
                        if let Ok(Some(v)) = sketch.0.quantile(*q) {
                            values.insert(n.clone(), v);
                        }
                    }
                }
            }
            AggState::Sample(sample) => {
                let ranked = sample
                    .items()
                    .map(|item| RankedItem {
                        item: item.to_owned(),
                        value: 1.0,
                    })
                    .collect();
                items.insert(name(), RankedItems { items: ranked });
            }
            AggState::Score(sum) => {
                values.insert(name(), 1.0 - (-*sum).exp());
            }
        }
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::borrow::Cow;

    fn config(toml_text: &str) -> AggregateConfig {
        toml::from_str(toml_text).expect("toml")
    }

    fn compile(toml_text: &str) -> Aggregate {
        config(toml_text)
            .compile("aggregates[0]", Some("payload.value"))
            .unwrap()
    }

    fn run(
        spec: &Aggregate,
        values: &[Scalar<'_>],
    ) -> (HashMap<String, f64>, HashMap<String, RankedItems>) {
        let mut state = spec.state();
        for (i, v) in values.iter().enumerate() {
            state.add(
                spec,
                v,
                xxhash_rust::xxh3::xxh3_64(&(i as u64).to_le_bytes()),
            );
        }
        let (mut values, mut items) = (HashMap::new(), HashMap::new());
        state.report(spec, &mut values, &mut items);
        (values, items)
    }

    fn nums(xs: &[f64]) -> Vec<Scalar<'static>> {
        xs.iter().map(|x| Scalar::Num(*x)).collect()
    }

    fn texts(xs: &[&str]) -> Vec<Scalar<'static>> {
        xs.iter()
            .map(|x| Scalar::Text(Cow::Owned((*x).to_owned())))
            .collect()
    }

    #[test]
    fn plain_aggregates_compute_exactly() {
        let xs = nums(&[4.0, 1.0, 7.0, 4.0]);
        for (text, expected) in [
            ("fn = \"sum\"", 16.0),
            ("fn = \"avg\"", 4.0),
            ("fn = \"min\"", 1.0),
            ("fn = \"max\"", 7.0),
            ("fn = \"stddev\"", (4.5f64).sqrt()),
            ("fn = \"count\"\nof = \"payload.value\"", 4.0),
        ] {
            let spec = compile(text);
            let (values, _) = run(&spec, &xs);
            assert!(
                (values[&spec.name] - expected).abs() < 1e-12,
                "{text}: {values:?}"
            );
        }
        // The z-score of 10 against 1, 2, 3 (mean 2, population sd 0.8165).
        let spec = compile("fn = \"zscore\"");
        let (values, _) = run(&spec, &nums(&[1.0, 2.0, 3.0, 10.0]));
        assert!(
            (values["zscore"] - 8.0 / (2.0f64 / 3.0).sqrt()).abs() < 1e-9,
            "{values:?}"
        );
        let spec = compile("fn = \"score\"\nweights = { click = 0.1, cart = 1.0, purchase = 3.0 }");
        let (values, _) = run(&spec, &texts(&["click", "cart", "view"]));
        assert!((values["score"] - (1.0 - (-1.1f64).exp())).abs() < 1e-12);
    }

    #[test]
    fn options_that_do_not_apply_or_are_out_of_range_are_named() {
        let cases = [
            ("fn = \"sum\"\nk = 3", "aggregates[0].k"),
            ("fn = \"top_k\"\nof = \"key\"\nk = 0", "aggregates[0].k"),
            ("fn = \"distinct\"", "aggregates[0].of"),
            (
                "fn = \"distinct\"\nof = \"key\"\nprecision = 30",
                "aggregates[0].precision",
            ),
            (
                "fn = \"percentiles\"\nquantiles = [1.5]",
                "aggregates[0].quantiles",
            ),
            ("fn = \"score\"", "aggregates[0].weights"),
            (
                "fn = \"score\"\nweights = { a = -1 }",
                "aggregates[0].weights",
            ),
            ("fn = \"max\"\nof = \"nope\"", "aggregates[0].of"),
        ];
        for (text, key) in cases {
            let (found, why) = config(text)
                .compile("aggregates[0]", Some("payload.value"))
                .unwrap_err();
            assert_eq!(found, key, "{text}: {why}");
        }
        let (found, _) = config("fn = \"max\"")
            .compile("aggregates[0]", None)
            .unwrap_err();
        assert_eq!(found, "aggregates[0].of");
        assert!(toml::from_str::<AggregateConfig>("fn = \"median\"").is_err());
    }

    #[test]
    fn percentiles_are_named_by_quantile() {
        let spec = compile("fn = \"percentiles\"\nname = \"latency\"\nquantiles = [0.5, 0.999]");
        assert_eq!(spec.output_names(), ["latency_p50", "latency_p99.9"]);
        assert_eq!(
            compile("fn = \"percentiles\"").output_names(),
            ["p50", "p90", "p99"]
        );
    }

    proptest! {
        /// DDSketch quantiles are within the configured relative accuracy of the exact
        /// ones (the value of rank ⌊q (n − 1)⌋, as the sketch defines them).
        #[test]
        fn percentiles_are_within_their_relative_accuracy(mut xs in proptest::collection::vec(-1.0e6f64..1.0e6, 1..500)) {
            let spec = compile("fn = \"percentiles\"\nquantiles = [0.1, 0.5, 0.9, 0.99]\nrelative_accuracy = 0.01");
            let (values, _) = run(&spec, &nums(&xs));
            xs.sort_by(f64::total_cmp);
            for (q, name) in [(0.1, "p10"), (0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
                let exact = xs[(q * (xs.len() - 1) as f64) as usize];
                let found = values[name];
                prop_assert!((found - exact).abs() <= 0.01 * exact.abs() + 1e-6, "{name}: {found} vs {exact}");
            }
        }

        /// HyperLogLog++ at precision 14 is within 4 % (five standard errors) of the exact
        /// distinct count, and exact enough for small sets (sparse representation).
        #[test]
        fn distinct_counts_are_within_the_documented_error(n in 1usize..20_000, dup in 1usize..4) {
            let spec = compile("fn = \"distinct\"\nof = \"key\"");
            let items: Vec<Scalar<'static>> = (0..n * dup).map(|i| Scalar::Text(Cow::Owned(format!("user-{}", i % n)))).collect();
            let (values, _) = run(&spec, &items);
            let estimate = values["distinct"];
            let tolerance = if n < 1000 { 0.01 * n as f64 + 1.0 } else { 0.04 * n as f64 };
            prop_assert!((estimate - n as f64).abs() <= tolerance, "{estimate} for {n}");
        }

        /// Merging two windows' states gives the state of their union.
        #[test]
        fn merged_states_report_the_union(a in proptest::collection::vec(-100i32..100, 0..50), b in proptest::collection::vec(-100i32..100, 0..50)) {
            for text in ["fn = \"count\"", "fn = \"sum\"", "fn = \"min\"", "fn = \"max\"", "fn = \"stddev\"", "fn = \"distinct\"\nof = \"key\"", "fn = \"percentiles\""] {
                let spec = compile(text);
                let fill = |xs: &[i32], base: usize| {
                    let mut s = spec.state();
                    for (i, x) in xs.iter().enumerate() {
                        if spec.input.is_none() { s.add_event() } else { s.add(&spec, &Scalar::Num(f64::from(*x)), (base + i) as u64) }
                    }
                    s
                };
                let (mut left, right) = (fill(&a, 0), fill(&b, a.len()));
                left.merge(&right);
                let whole: Vec<i32> = a.iter().chain(&b).copied().collect();
                let mut together = fill(&whole, 0);
                let (mut v1, mut i1, mut v2, mut i2) = (HashMap::new(), HashMap::new(), HashMap::new(), HashMap::new());
                left.report(&spec, &mut v1, &mut i1);
                together.report(&spec, &mut v2, &mut i2);
                prop_assert_eq!(v1.keys().collect::<std::collections::BTreeSet<_>>(), v2.keys().collect());
                for (name, x) in &v1 {
                    prop_assert!((x - v2[name]).abs() <= 1e-9 * (1.0 + x.abs()), "{text}: {name} {x} vs {}", v2[name]);
                }
            }
        }
    }

    #[test]
    fn states_survive_a_checkpoint_round_trip() {
        let spec = compile("fn = \"distinct\"\nof = \"key\"");
        let mut state = spec.state();
        for i in 0..5000 {
            state.add(&spec, &Scalar::Text(Cow::Owned(format!("u{i}"))), 0);
        }
        let json = serde_json::to_vec(&state).unwrap();
        let mut restored: AggState = serde_json::from_slice(&json).unwrap();
        let (mut a, mut b, mut items) = (HashMap::new(), HashMap::new(), HashMap::new());
        state.report(&spec, &mut a, &mut items);
        restored.report(&spec, &mut b, &mut items);
        assert_eq!(a, b);
        // And goes on counting the same registers after the restore.
        restored.add(&spec, &Scalar::Text(Cow::Borrowed("u1")), 0);
        restored.report(&spec, &mut b, &mut items);
        assert_eq!(a, b);
    }
}
