//! Retention: how many events a topic's stream keeps, how long it lives without a publish and
//! the largest event it accepts, as a default and per namespace (a topic prefix). The fleet's
//! table lives in Redis, compiled into the function library (`script`); this is the table, its
//! text form (what `FCALL ssegw_retention 0` answers) and the rule that picks a topic's limits.
//! Pure, no I/O.

use std::collections::BTreeMap;
use std::fmt;

use crate::topic::{is_topic_char, MAX_TOPIC_LEN};

/// Largest `max_data_bytes` accepted: 16 MiB.
pub const MAX_DATA_BYTES_LIMIT: usize = 16 << 20;

/// The limits of one namespace, or the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Events kept per topic stream.
    pub max_len: u64,
    /// A stream expires after this many seconds without a publish.
    pub ttl_secs: u64,
    /// Largest `data` accepted, in bytes.
    pub max_data_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_len: 1000,
            ttl_secs: 86_400,
            max_data_bytes: 65_536,
        }
    }
}

impl Limits {
    pub fn check(&self) -> Result<(), RetentionError> {
        if self.max_len < 1 {
            return Err(RetentionError::Invalid("max-len must be at least 1".into()));
        }
        if self.ttl_secs < 1 {
            return Err(RetentionError::Invalid("ttl must be at least 1s".into()));
        }
        if !(1..=MAX_DATA_BYTES_LIMIT).contains(&self.max_data_bytes) {
            return Err(RetentionError::Invalid(format!(
                "max-event-bytes must be between 1 and {MAX_DATA_BYTES_LIMIT}"
            )));
        }
        Ok(())
    }

    /// Events a stream may hold beyond `max_len` before the publish function trims it back:
    /// trimming then runs once per `slack` publishes instead of on every one.
    pub fn slack(&self) -> u64 {
        (self.max_len / 8).max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error("{0}")]
    Invalid(String),
    #[error("malformed retention table: {0}")]
    Malformed(String),
}

/// The fleet's retention table. `generation` orders tables: of two, the one with the higher
/// generation is the newer (each change takes a generation above the one it changed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    generation: u64,
    default: Limits,
    /// Keyed by prefix.
    namespaces: BTreeMap<String, Limits>,
}

const HEADER: &str = "ssegw-retention 1";

impl Retention {
    pub fn new(default: Limits, generation: u64) -> Retention {
        Retention {
            generation,
            default,
            namespaces: BTreeMap::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn default_limits(&self) -> &Limits {
        &self.default
    }

    /// The namespaces, by prefix.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &Limits)> {
        self.namespaces.iter().map(|(p, l)| (p.as_str(), l))
    }

    /// The limits of the longest namespace prefix `topic` starts with, and that prefix; else
    /// the default and `None`. The Lua publish function applies the same rule.
    pub fn limits_for(&self, topic: &str) -> (Option<&str>, &Limits) {
        self.namespaces
            .iter()
            .filter(|(prefix, _)| topic.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or((None, &self.default), |(p, l)| (Some(p.as_str()), l))
    }

    /// The largest event any namespace accepts.
    pub fn max_data_bytes(&self) -> usize {
        self.namespaces
            .values()
            .map(|l| l.max_data_bytes)
            .fold(self.default.max_data_bytes, usize::max)
    }

    /// Sets the limits of `prefix` (the default for `None`), as a change of generation
    /// `generation`.
    pub fn set(
        &mut self,
        prefix: Option<&str>,
        limits: Limits,
        generation: u64,
    ) -> Result<(), RetentionError> {
        limits.check()?;
        match prefix {
            None => self.default = limits,
            Some(prefix) => {
                check_prefix(prefix)?;
                self.namespaces.insert(prefix.to_string(), limits);
            }
        }
        self.generation = generation;
        Ok(())
    }

    /// Removes the namespace `prefix`; its topics fall back to a shorter prefix or the default.
    /// False when there was no such namespace.
    pub fn remove(&mut self, prefix: &str, generation: u64) -> bool {
        let removed = self.namespaces.remove(prefix).is_some();
        if removed {
            self.generation = generation;
        }
        removed
    }

    /// The text form: a header line, `generation <n>`, `default <max_len> <ttl_secs>
    /// <max_data_bytes>`, then one `namespace <prefix> <max_len> <ttl_secs> <max_data_bytes>`
    /// per namespace.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{HEADER}\ngeneration {}\ndefault {}\n",
            self.generation,
            limits_text(&self.default)
        );
        for (prefix, limits) in &self.namespaces {
            out.push_str(&format!("namespace {prefix} {}\n", limits_text(limits)));
        }
        out
    }

    pub fn parse(text: &str) -> Result<Retention, RetentionError> {
        let malformed = |what: &str| RetentionError::Malformed(what.to_string());
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(malformed("unknown header"));
        }
        let generation = lines
            .next()
            .and_then(|l| l.strip_prefix("generation "))
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| malformed("no generation"))?;
        let default = lines
            .next()
            .and_then(|l| l.strip_prefix("default "))
            .ok_or_else(|| malformed("no default"))
            .and_then(parse_limits)?;
        let mut retention = Retention::new(default, generation);
        for line in lines.filter(|l| !l.is_empty()) {
            let rest = line
                .strip_prefix("namespace ")
                .ok_or_else(|| malformed(line))?;
            let (prefix, limits) = rest.split_once(' ').ok_or_else(|| malformed(line))?;
            check_prefix(prefix)?;
            retention
                .namespaces
                .insert(prefix.to_string(), parse_limits(limits)?);
        }
        Ok(retention)
    }
}

impl Default for Retention {
    fn default() -> Retention {
        Retention::new(Limits::default(), 0)
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

fn limits_text(l: &Limits) -> String {
    format!("{} {} {}", l.max_len, l.ttl_secs, l.max_data_bytes)
}

fn parse_limits(text: &str) -> Result<Limits, RetentionError> {
    let numbers: Vec<u64> = text
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| RetentionError::Malformed(text.to_string()))?;
    let [max_len, ttl_secs, max_data_bytes] = numbers[..] else {
        return Err(RetentionError::Malformed(text.to_string()));
    };
    let limits = Limits {
        max_len,
        ttl_secs,
        max_data_bytes: max_data_bytes as usize,
    };
    limits.check()?;
    Ok(limits)
}

/// A namespace is a non-empty topic prefix: it is compiled into Lua source between quotes, so
/// only the topic charset gets in.
pub fn check_prefix(prefix: &str) -> Result<(), RetentionError> {
    if prefix.is_empty() || prefix.len() > MAX_TOPIC_LEN || !prefix.chars().all(is_topic_char) {
        return Err(RetentionError::Invalid(format!(
            "namespace {prefix:?} is not a topic prefix (1 to {MAX_TOPIC_LEN} bytes of ASCII \
             letters, digits and - _ . : / @)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_len: u64) -> Limits {
        Limits {
            max_len,
            ..Limits::default()
        }
    }

    #[test]
    fn the_longest_prefix_wins() {
        let mut r = Retention::default();
        r.set(Some("chat."), limits(100), 1).unwrap();
        r.set(Some("chat.vip."), limits(5000), 2).unwrap();
        r.set(Some("orders"), limits(10_000), 3).unwrap();
        let check = |r: &Retention, topic: &str, expected: (Option<&str>, u64)| {
            let (ns, l) = r.limits_for(topic);
            assert_eq!((ns, l.max_len), expected, "{topic}");
        };
        check(&r, "chat.room1", (Some("chat."), 100));
        check(&r, "chat.vip.room1", (Some("chat.vip."), 5000));
        check(&r, "chat", (None, 1000));
        check(&r, "orders.eu", (Some("orders"), 10_000));
        check(&r, "other", (None, 1000));
        assert_eq!(r.generation(), 3);
        assert!(r.remove("chat.vip.", 4));
        assert!(!r.remove("chat.vip.", 5));
        assert_eq!(r.generation(), 4);
        check(&r, "chat.vip.room1", (Some("chat."), 100));
    }

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        let mut r = Retention::new(limits(7), 42);
        r.set(
            Some("a/b:c@d-e_f."),
            Limits {
                max_len: 1,
                ttl_secs: 2,
                max_data_bytes: 3,
            },
            43,
        )
        .unwrap();
        assert_eq!(Retention::parse(&r.to_text()), Ok(r.clone()));
        for bad in [
            "",
            "ssegw-retention 2\ngeneration 1\ndefault 1 1 1\n",
            "ssegw-retention 1\ndefault 1 1 1\n",
            "ssegw-retention 1\ngeneration 1\ndefault 1 1\n",
            "ssegw-retention 1\ngeneration 1\ndefault 0 1 1\n",
            "ssegw-retention 1\ngeneration 1\ndefault 1 1 1\nnamespace a{b} 1 1 1\n",
            "ssegw-retention 1\ngeneration 1\ndefault 1 1 1\nother\n",
        ] {
            assert!(Retention::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_are_checked() {
        let mut r = Retention::default();
        assert!(r.set(None, limits(0), 1).is_err());
        assert!(r.set(Some(""), limits(1), 1).is_err());
        assert!(r.set(Some("a b"), limits(1), 1).is_err());
        assert!(r
            .set(
                None,
                Limits {
                    max_data_bytes: MAX_DATA_BYTES_LIMIT + 1,
                    ..Limits::default()
                },
                1
            )
            .is_err());
        assert_eq!(r, Retention::default(), "a refused change changes nothing");
        assert_eq!(r.max_data_bytes(), 65_536);
        r.set(
            Some("big."),
            Limits {
                max_data_bytes: 1 << 20,
                ..Limits::default()
            },
            1,
        )
        .unwrap();
        assert_eq!(r.max_data_bytes(), 1 << 20);
        assert_eq!((limits(1).slack(), limits(1000).slack()), (1, 125));
    }
}
