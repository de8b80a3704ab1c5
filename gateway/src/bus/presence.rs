//! Presence: how many subscribers each topic has across the fleet (`GET /presence`). Every
//! `--presence-interval` each replica reports its hub's member count per topic, with an expiry
//! of `EXPIRY_INTERVALS` intervals, and a read sums the live reports. This module holds what
//! does not depend on where reports are kept: the settings, one report's difference from the
//! last (`Reporter`), the stored value and the sum a read makes (`tally`). The Redis commands
//! are in `bus/redis/presence.rs`; the embedded bus answers from its hub. No I/O here.

use std::collections::HashSet;
use std::time::Duration;

use ssegw_protocol::Topic;

/// A report counts for this many reporting intervals: a replica may miss two reports (a slow
/// Redis) without its subscribers dropping out, and one that died drops out within three.
pub const EXPIRY_INTERVALS: u32 = 3;

/// `--presence-interval`, when presence is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    /// How often a replica reports its counts.
    pub interval: Duration,
}

impl PresenceConfig {
    /// How long a report counts after it was made: the bound on how long a replica that died
    /// is still counted, and so on how long its clients, resumed elsewhere, count twice.
    pub fn expiry(&self) -> Duration {
        self.interval * EXPIRY_INTERVALS
    }
}

/// One topic's figure across the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicPresence {
    /// Subscribers, summed over the replicas whose reports are live.
    pub subscribers: u64,
    /// Replicas whose live reports have subscribers of the topic.
    pub replicas: u32,
    /// The age of the oldest report in the sum; `None` when no replica reports the topic.
    pub age: Option<Duration>,
}

/// What one report writes: the topics with local subscribers, and the topics whose earlier
/// report it removes because they have none any more.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub counts: Vec<(Topic, u64)>,
    pub gone: Vec<Topic>,
}

/// What a replica may have reported to Redis, so that a topic that lost its last local
/// subscriber has its report removed once, instead of written every interval or left to
/// expire.
#[derive(Debug, Default)]
pub struct Reporter {
    reported: HashSet<Topic>,
}

impl Reporter {
    /// The next report, from the local counts now (topics with subscribers only).
    pub fn next(&self, counts: Vec<(Topic, u64)>) -> Report {
        let now: HashSet<&Topic> = counts.iter().map(|(topic, _)| topic).collect();
        let mut gone: Vec<Topic> = self
            .reported
            .iter()
            .filter(|topic| !now.contains(topic))
            .cloned()
            .collect();
        gone.sort();
        Report { counts, gone }
    }

    /// `report` is in Redis: its topics are what this replica has reported.
    pub fn written(&mut self, report: &Report) {
        self.reported = report.counts.iter().map(|(t, _)| t.clone()).collect();
    }

    /// `report` failed, in whole or in part: what it wrote may be in Redis, and what it
    /// removed may still be. Both stay on record, so a later report removes them.
    pub fn failed(&mut self, report: &Report) {
        self.reported
            .extend(report.counts.iter().map(|(t, _)| t.clone()));
    }

    /// A report removing everything this replica may have reported: its last, at shutdown.
    pub fn withdrawal(&mut self) -> Report {
        let mut gone: Vec<Topic> = self.reported.drain().collect();
        gone.sort();
        Report {
            counts: Vec::new(),
            gone,
        }
    }
}

/// The value of a replica's report of a topic: `<subscribers> <reported-at ms>`, the time as
/// Redis tells it (see `bus/redis/presence.rs`), never a replica's own clock.
pub fn value(subscribers: u64, reported_at_ms: u64) -> String {
    format!("{subscribers} {reported_at_ms}")
}

fn parse_value(value: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (subscribers, at) = text.split_once(' ')?;
    Some((subscribers.parse().ok()?, at.parse().ok()?))
}

/// The sum of a topic's live reports (one value per replica that has one; expired reports are
/// gone from Redis by then), at `now_ms` by the same clock the reports were stamped with. A
/// value that does not parse (not written by a gateway) is left out.
pub fn tally<'a>(now_ms: u64, values: impl IntoIterator<Item = &'a [u8]>) -> TopicPresence {
    let mut presence = TopicPresence::default();
    let mut oldest: Option<u64> = None;
    for (subscribers, at) in values.into_iter().filter_map(parse_value) {
        presence.subscribers += subscribers;
        presence.replicas += 1;
        oldest = Some(oldest.map_or(at, |o| o.min(at)));
    }
    presence.age = oldest.map(|at| Duration::from_millis(now_ms.saturating_sub(at)));
    presence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    fn names(topics: &[Topic]) -> Vec<&str> {
        topics.iter().map(Topic::as_str).collect()
    }

    #[test]
    fn a_topic_is_removed_once_after_its_last_subscriber_left() {
        let mut reporter = Reporter::default();
        let first = reporter.next(vec![(topic("a"), 2), (topic("b"), 1)]);
        assert!(first.gone.is_empty());
        reporter.written(&first);
        let second = reporter.next(vec![(topic("a"), 3)]);
        assert_eq!(names(&second.gone), ["b"]);
        reporter.written(&second);
        let third = reporter.next(vec![(topic("a"), 3)]);
        assert!(third.gone.is_empty(), "removed once, not every interval");
    }

    #[test]
    fn what_a_failed_report_touched_is_removed_later() {
        let mut reporter = Reporter::default();
        let first = reporter.next(vec![(topic("a"), 1)]);
        reporter.written(&first);
        // Fails: `b` may be in Redis now, and `a` may still be.
        let failed = reporter.next(vec![(topic("b"), 1)]);
        assert_eq!(names(&failed.gone), ["a"]);
        reporter.failed(&failed);
        let next = reporter.next(vec![]);
        assert_eq!(names(&next.gone), ["a", "b"]);
        reporter.failed(&next);
        assert_eq!(names(&reporter.withdrawal().gone), ["a", "b"]);
        assert!(reporter.withdrawal().gone.is_empty());
    }

    fn check(now_ms: u64, values: &[&str], expected: (u64, u32, Option<u64>)) {
        let got = tally(now_ms, values.iter().map(|v| v.as_bytes()));
        let got = (
            got.subscribers,
            got.replicas,
            got.age.map(|a| a.as_millis() as u64),
        );
        assert_eq!(got, expected, "{values:?}");
    }

    #[test]
    fn a_read_sums_the_reports_and_ages_by_the_oldest() {
        check(1000, &[], (0, 0, None));
        check(1000, &["3 900"], (3, 1, Some(100)));
        check(1000, &["3 900", "4 700", "1 1000"], (8, 3, Some(300)));
        // A report stamped after the reader's instant (another node's clock): age 0.
        check(1000, &["2 1200"], (2, 1, Some(0)));
        check(1000, &["x 900", "3", "", "2 950"], (2, 1, Some(50)));
        assert_eq!(value(7, 1234), "7 1234");
    }

    #[test]
    fn the_expiry_is_three_intervals() {
        let config = PresenceConfig {
            interval: Duration::from_millis(250),
        };
        assert_eq!(config.expiry(), Duration::from_millis(750));
    }
}
