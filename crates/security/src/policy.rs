//! Authorisation: what an authenticated caller may do to which topic or query, decided in
//! one place.
//!
//! The grants come from configuration ([`GrantConfig`]); the authentication layer puts a
//! [`Caller`] — who is calling, and the policy that applies — into every request's
//! extensions, and a service asks [`Caller::authorize`] at the point where a request names
//! a topic or a query. Nothing is allowed that no grant allows; with authentication off the
//! policy is open and every check passes.

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
    /// Read a topic (broker `Fetch`, `Subscribe`, `CommitOffsets`).
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
        }
    }
}

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

    /// Whether the pattern covers `name`; `None` asks whether it covers every name.
    fn covers(&self, name: Option<&str>) -> bool {
        match (self, name) {
            (Pattern::All, _) => true,
            (Pattern::Exact(exact), Some(name)) => exact == name,
            (Pattern::Prefix(prefix), Some(name)) => name.starts_with(prefix.as_str()),
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
        self.grants.iter().any(|grant| {
            grant.principal.as_deref().is_none_or(|p| p == principal)
                && grant.allow.contains(&action)
                && match resource {
                    Resource::Topic(name) => grant.topics.iter().any(|p| p.covers(Some(name))),
                    Resource::Query(name) => grant.queries.iter().any(|p| p.covers(Some(name))),
                    Resource::AnyTopic => grant.topics.iter().any(|p| p.covers(None)),
                    Resource::AnyQuery => grant.queries.iter().any(|p| p.covers(None)),
                }
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
        }
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
