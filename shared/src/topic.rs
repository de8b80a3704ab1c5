//! Topic names: validated once, when a `Topic` is built; nobody checks them again.
//! Topic names become part of Redis keys and channels, so the charset excludes everything
//! that could reach another topic's keys (hash-tag braces, whitespace, wildcards).

use std::fmt;

/// Longest topic name accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 128;

/// A topic name that satisfies the documented grammar: 1 to [`MAX_TOPIC_LEN`] bytes of
/// ASCII letters, digits and `- _ . : / @`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic must not be empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("topic contains {0:?}; allowed are ASCII letters, digits and - _ . : / @")]
    BadChar(char),
}

impl Topic {
    pub fn new(name: &str) -> Result<Topic, TopicError> {
        if name.is_empty() {
            return Err(TopicError::Empty);
        }
        if name.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong);
        }
        if let Some(bad) = name.chars().find(|&c| !is_topic_char(c)) {
            return Err(TopicError::BadChar(bad));
        }
        Ok(Topic(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The topic charset; the Lua publish function enforces the same set (`TOPIC_PATTERN`).
pub(crate) fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@')
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({})", self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Topic, TopicError> {
        Topic::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<(), TopicError>) {
        assert_eq!(Topic::new(input).map(|_| ()), expected, "input {input:?}");
    }

    #[test]
    fn grammar() {
        check("orders", Ok(()));
        check("orders.eu-1:v2/x@y_z", Ok(()));
        check(&"a".repeat(MAX_TOPIC_LEN), Ok(()));
        check("", Err(TopicError::Empty));
        check(&"a".repeat(MAX_TOPIC_LEN + 1), Err(TopicError::TooLong));
        check("a{b}", Err(TopicError::BadChar('{')));
        check("a b", Err(TopicError::BadChar(' ')));
        check("orders.*", Err(TopicError::BadChar('*')));
        check("caf\u{e9}", Err(TopicError::BadChar('\u{e9}')));
        check("a\nb", Err(TopicError::BadChar('\n')));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_accepts_only_the_charset(s in "\\PC{0,140}") {
            if let Ok(t) = Topic::new(&s) {
                proptest::prop_assert!(t.as_str().chars().all(is_topic_char));
                proptest::prop_assert!(!t.as_str().is_empty() && t.as_str().len() <= MAX_TOPIC_LEN);
            }
        }
    }
}

/// The topics of one connection: non-empty, sorted and without duplicates, so that the same
/// set always yields the same order (cursor positions are kept in this order).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TopicSet(Vec<Topic>);

impl TopicSet {
    /// Sorts and deduplicates; `None` when `topics` is empty.
    pub fn new(mut topics: Vec<Topic>) -> Option<TopicSet> {
        topics.sort();
        topics.dedup();
        (!topics.is_empty()).then_some(TopicSet(topics))
    }

    pub fn as_slice(&self) -> &[Topic] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Topic> {
        self.0.iter()
    }
}

#[cfg(test)]
mod topic_set_tests {
    use super::*;

    #[test]
    fn sorted_and_deduplicated() {
        let t = |s: &str| Topic::new(s).unwrap();
        let set = TopicSet::new(vec![t("b"), t("a"), t("b")]).unwrap();
        assert_eq!(set.as_slice(), &[t("a"), t("b")]);
        assert_eq!(TopicSet::new(Vec::new()), None);
    }
}
