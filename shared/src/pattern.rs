//! Topic patterns: how a token's claims (and the anonymous-access settings) name the topics
//! they grant. A pattern is checked when parsed; matching compares a validated `Topic` with
//! it byte for byte, so nothing a client sends is ever interpreted as a pattern.

use std::fmt;

use crate::topic::{Topic, MAX_TOPIC_LEN};

/// One pattern of the documented grammar:
///
/// * `orders.eu`: exactly that topic;
/// * `orders.*`: a prefix wildcard, every topic that starts with `orders.` and has at least
///   one more character (`orders.eu`, `orders.eu.paris`; not `orders` nor `orders.`);
/// * `*`: every topic.
///
/// The part before `*` uses the topic charset; `*` may only end a pattern. Topics cannot
/// contain `*`, so a client can never ask for a topic that looks like a pattern.
#[derive(Clone, PartialEq, Eq)]
pub enum TopicPattern {
    Exact(Topic),
    /// Any topic longer than, and starting with, this prefix (empty: every topic).
    Prefix(Box<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern must not be empty")]
    Empty,
    #[error("pattern is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("'*' may only end a pattern (a prefix wildcard such as \"orders.*\")")]
    InnerWildcard,
    #[error(
        "pattern contains {0:?}; allowed are ASCII letters, digits, - _ . : / @ and a final *"
    )]
    BadChar(char),
}

impl TopicPattern {
    pub fn new(text: &str) -> Result<TopicPattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_TOPIC_LEN {
            return Err(PatternError::TooLong);
        }
        let (prefix, wildcard) = match text.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (text, false),
        };
        if prefix.contains('*') {
            return Err(PatternError::InnerWildcard);
        }
        if let Some(bad) = prefix.chars().find(|&c| !crate::topic::is_topic_char(c)) {
            return Err(PatternError::BadChar(bad));
        }
        Ok(if wildcard {
            TopicPattern::Prefix(prefix.into())
        } else {
            TopicPattern::Exact(Topic::new(prefix).expect("checked above"))
        })
    }

    pub fn matches(&self, topic: &Topic) -> bool {
        match self {
            TopicPattern::Exact(exact) => exact == topic,
            TopicPattern::Prefix(prefix) => {
                let name = topic.as_str();
                name.len() > prefix.len() && name.starts_with(&**prefix)
            }
        }
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicPattern::Exact(topic) => write!(f, "{topic}"),
            TopicPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicPattern({self})")
    }
}

impl std::str::FromStr for TopicPattern {
    type Err = PatternError;
    fn from_str(s: &str) -> Result<TopicPattern, PatternError> {
        TopicPattern::new(s)
    }
}

/// A set of patterns: a topic is in scope when any pattern matches it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope(Vec<TopicPattern>);

impl Scope {
    pub fn new(patterns: Vec<TopicPattern>) -> Scope {
        Scope(patterns)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn allows(&self, topic: &Topic) -> bool {
        self.0.iter().any(|p| p.matches(topic))
    }

    pub fn patterns(&self) -> &[TopicPattern] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn check(pattern: &str, topic: &str, expected: bool) {
        let p = TopicPattern::new(pattern).unwrap();
        let t = Topic::new(topic).unwrap();
        assert_eq!(p.matches(&t), expected, "{pattern} vs {topic}");
    }

    #[test]
    fn matching() {
        check("orders.eu", "orders.eu", true);
        check("orders.eu", "orders.eu.x", false);
        check("orders.eu", "Orders.eu", false);
        check("orders.*", "orders.eu", true);
        check("orders.*", "orders.eu.paris", true);
        check("orders.*", "orders", false);
        check("orders.*", "orders.", false);
        check("orders.*", "ordersx", false);
        check("orders.*", "orders:eu", false);
        check("orders.*", "order.s", false);
        check("orders*", "orders", false);
        check("orders*", "orders.eu", true);
        check("orders*", "ordersx", true);
        // No path semantics: this is a topic of its own, not `admin`.
        check("orders/*", "orders/../admin", true);
        check("orders.*", "orders/../admin", false);
        check("*", "anything", true);
        check("*", "a", true);
    }

    #[test]
    fn grammar() {
        for (text, error) in [
            ("", PatternError::Empty),
            ("orders.*.created", PatternError::InnerWildcard),
            ("**", PatternError::InnerWildcard),
            ("*.eu", PatternError::InnerWildcard),
            ("orders.{x}*", PatternError::BadChar('{')),
            ("orders eu", PatternError::BadChar(' ')),
        ] {
            assert_eq!(TopicPattern::new(text), Err(error), "{text:?}");
        }
        assert_eq!(
            TopicPattern::new(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(PatternError::TooLong)
        );
        for text in ["*", "orders.*", "a", "x:y/z@w_v-u*"] {
            assert_eq!(TopicPattern::new(text).unwrap().to_string(), text);
        }
    }

    proptest! {
        /// An exact pattern grants its topic and nothing else; a prefix pattern grants exactly
        /// the longer topics that start with it.
        #[test]
        fn patterns_grant_only_their_topics(
            granted in "[a-z.:/@_-]{1,12}",
            asked in "[a-z.:/@_-]{1,16}",
        ) {
            let asked_topic = Topic::new(&asked).unwrap();
            let exact = TopicPattern::new(&granted).unwrap();
            prop_assert_eq!(exact.matches(&asked_topic), asked == granted);
            let prefix = TopicPattern::new(&format!("{granted}*")).unwrap();
            prop_assert_eq!(
                prefix.matches(&asked_topic),
                asked.len() > granted.len() && asked.starts_with(&granted)
            );
        }
    }
}
