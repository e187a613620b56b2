//! The names the contract carries — topics, consumer groups and their members, queries —
//! and the one rule for each, so that every service refuses the same names with the same
//! message.
//!
//! - A **topic** name is 1–249 characters from `[a-zA-Z0-9._-]`, and not `.` or `..`: the
//!   broker uses it as a directory name as is, so the rule is also what keeps its paths
//!   inside the data directory (249 leaves room under the usual 255-byte file name limit).
//! - A **group** name or **member** id is 1–249 bytes of any text: the broker only keys
//!   committed offsets and assignments by it (JetStream keys encode it).
//! - A **query** name is 1–128 characters from `[a-zA-Z0-9._-]`, not starting with `.`
//!   and without `..`: it is part of URLs (`/v1/queries/<name>/…`) and of the analyzer's
//!   internal topics and groups, where `..` separates a created query's name from its
//!   incarnation (so that no name can stand for another's).

/// The longest topic name, in characters.
pub const MAX_TOPIC_LEN: usize = 249;
/// The longest consumer-group name or member id, in bytes.
pub const MAX_GROUP_LEN: usize = 249;
/// The longest query name, in characters.
pub const MAX_QUERY_LEN: usize = 128;

/// What kind of name a [`NameError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A topic.
    Topic,
    /// A consumer group.
    Group,
    /// A member of a consumer group.
    Member,
    /// A query.
    Query,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Topic => "topic name",
            NameKind::Group => "group name",
            NameKind::Member => "member id",
            NameKind::Query => "query name",
        })
    }
}

/// A name its rule refuses: `topic name "a b" is invalid: use 1-249 characters from
/// [a-zA-Z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?} is invalid: {rule}")]
pub struct NameError {
    /// What the name was for.
    pub kind: NameKind,
    /// The name as given.
    pub name: String,
    /// The part of the rule it breaks.
    pub rule: &'static str,
}

/// Whether every byte of `text` is one of `[a-zA-Z0-9._-]`, the alphabet of topic and
/// query names (and of anything else that ends up in a path or a URL unescaped).
pub fn is_name_alphabet(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn refuse(kind: NameKind, name: &str, rule: &'static str) -> Result<(), NameError> {
    Err(NameError {
        kind,
        name: name.to_owned(),
        rule,
    })
}

/// Checks a topic name: 1–249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_TOPIC_LEN || !is_name_alphabet(name) {
        return refuse(
            NameKind::Topic,
            name,
            "use 1-249 characters from [a-zA-Z0-9._-]",
        );
    }
    if name == "." || name == ".." {
        return refuse(NameKind::Topic, name, "\".\" and \"..\" are reserved");
    }
    Ok(())
}

/// Checks a consumer-group name: 1–249 bytes.
pub fn validate_group_name(name: &str) -> Result<(), NameError> {
    group_rule(NameKind::Group, name)
}

/// Checks a consumer-group member id: 1–249 bytes, as group names.
pub fn validate_member_id(id: &str) -> Result<(), NameError> {
    group_rule(NameKind::Member, id)
}

fn group_rule(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_GROUP_LEN {
        return refuse(kind, name, "use 1-249 bytes");
    }
    Ok(())
}

/// Checks a query name: 1–128 characters from `[a-zA-Z0-9._-]`, not starting with `.`,
/// without `..`.
pub fn validate_query_name(name: &str) -> Result<(), NameError> {
    if name.is_empty()
        || name.len() > MAX_QUERY_LEN
        || !is_name_alphabet(name)
        || name.starts_with('.')
        || name.contains("..")
    {
        return refuse(
            NameKind::Query,
            name,
            "use 1-128 characters from [a-zA-Z0-9._-], not starting with '.', without '..'",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topic_names() {
        let long = "x".repeat(MAX_TOPIC_LEN);
        let too_long = "x".repeat(MAX_TOPIC_LEN + 1);
        let cases: &[(&str, bool)] = &[
            ("events", true),
            ("a", true),
            ("Sensor.Readings_v2-eu", true),
            ("...", true),
            (".hidden", true),
            (&long, true),
            ("", false),
            (".", false),
            ("..", false),
            (&too_long, false),
            ("a b", false),
            ("a/b", false),
            ("../etc", false),
            ("a\\b", false),
            ("tab\t", false),
            ("émoji", false),
            ("a\0b", false),
        ];
        for &(name, ok) in cases {
            let result = validate_topic_name(name);
            assert_eq!(result.is_ok(), ok, "{name:?}: {result:?}");
        }
    }

    #[test]
    fn errors_name_the_kind_the_name_and_the_rule() {
        assert_eq!(
            validate_topic_name("a b").unwrap_err().to_string(),
            "topic name \"a b\" is invalid: use 1-249 characters from [a-zA-Z0-9._-]"
        );
        assert_eq!(
            validate_topic_name("..").unwrap_err().to_string(),
            "topic name \"..\" is invalid: \".\" and \"..\" are reserved"
        );
        assert_eq!(
            validate_group_name("").unwrap_err().to_string(),
            "group name \"\" is invalid: use 1-249 bytes"
        );
        assert_eq!(
            validate_member_id("").unwrap_err().to_string(),
            "member id \"\" is invalid: use 1-249 bytes"
        );
        assert_eq!(
            validate_query_name(".q").unwrap_err().to_string(),
            "query name \".q\" is invalid: use 1-128 characters from [a-zA-Z0-9._-], not \
             starting with '.', without '..'"
        );
    }

    #[test]
    fn group_names_and_member_ids_are_any_text_of_1_to_249_bytes() {
        validate_group_name("a group / with anything: ü").unwrap();
        validate_member_id(&"m".repeat(MAX_GROUP_LEN)).unwrap();
        assert!(validate_group_name(&"g".repeat(MAX_GROUP_LEN + 1)).is_err());
        // Bytes, not characters: 125 two-byte characters are 250 bytes.
        assert!(validate_member_id(&"ü".repeat(125)).is_err());
    }

    #[test]
    fn query_names() {
        for ok in [
            "avg_value_per_key",
            "q",
            "top-pages.v2",
            &"q".repeat(MAX_QUERY_LEN),
        ] {
            validate_query_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "a b",
            "a/b",
            "a..b",
            "q..7",
            "ü",
            &"q".repeat(MAX_QUERY_LEN + 1),
        ] {
            assert!(validate_query_name(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn every_name_the_topic_rule_describes_is_accepted(name in "[a-zA-Z0-9._-]{1,249}") {
            prop_assume!(name != "." && name != "..");
            prop_assert_eq!(validate_topic_name(&name), Ok(()));
        }

        #[test]
        fn every_name_the_query_rule_describes_is_accepted(name in "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,127}") {
            prop_assume!(!name.contains(".."));
            prop_assert_eq!(validate_query_name(&name), Ok(()));
        }

        #[test]
        fn a_name_outside_the_alphabet_is_refused_with_the_rule(
            head in "[a-z]{0,10}",
            odd in "[^a-zA-Z0-9._-]",
            tail in "[a-z]{0,10}",
        ) {
            let name = format!("{head}{odd}{tail}");
            let topic = validate_topic_name(&name).unwrap_err();
            prop_assert_eq!(topic.kind, NameKind::Topic);
            prop_assert_eq!(&topic.name, &name);
            prop_assert_eq!(
                topic.to_string(),
                format!("topic name {name:?} is invalid: use 1-249 characters from [a-zA-Z0-9._-]")
            );
            prop_assert!(validate_query_name(&name).is_err());
            // Groups take any text.
            prop_assert!(validate_group_name(&name).is_ok());
        }

        #[test]
        fn an_accepted_topic_name_is_one_plain_path_component(
            name in prop_oneof!["[a-z./\\\\-]{1,4}", "\\PC{0,300}"],
        ) {
            // The broker makes a directory of the name as is: whatever the rule lets
            // through must stay inside the data directory.
            if validate_topic_name(&name).is_ok() {
                let parts: Vec<_> = std::path::Path::new(&name).components().collect();
                prop_assert_eq!(parts.len(), 1, "{:?}", name);
                prop_assert!(matches!(parts[0], std::path::Component::Normal(_)), "{:?}", name);
            } else {
                prop_assert_eq!(&validate_topic_name(&name).unwrap_err().name, &name);
            }
        }
    }
}
