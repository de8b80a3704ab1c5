//! Exactness accounting, without I/O. While a run goes, each connection keeps a `TopicTrack`
//! per topic (sequence numbers seen, holes, repeats); at the end `reconcile` compares it with
//! the publisher's `AckLog` (which sequence numbers Redis stored, under which stream id) to
//! count what the connection should have seen and what it lost.
//!
//! This relies on each topic's events being published in sequence order (the publisher keeps
//! every topic on one ordered Redis connection or pipelined HTTP connection), so a topic's
//! stream ids grow with its sequence numbers.

use serde::{Deserialize, Serialize};
use ssegw_protocol::StreamId;

/// Holes kept per topic of a connection; beyond that, missing events are only counted.
const MAX_HOLES: usize = 32;

/// What one connection saw of one topic, across all its reconnections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicTrack {
    pub topic: u32,
    /// The topic's position given in the preamble of the connection's first (fresh) response:
    /// every event stored after it is owed to this connection.
    pub baseline: Option<StreamIdRepr>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Events received in order or filling a hole, each counted once.
    pub received: u64,
    pub duplicates: u64,
    /// Events that arrived after a later one (they filled a hole).
    pub late: u64,
    /// Ranges of sequence numbers skipped between events received (inclusive, ascending).
    pub holes: Vec<(u64, u64)>,
    /// Skipped sequence numbers beyond `MAX_HOLES` ranges, counted as lost outright.
    pub unrecorded_missing: u64,
}

/// A `StreamId` as `(ms, seq)`, for the worker-to-parent JSON.
pub type StreamIdRepr = (u64, u64);

impl TopicTrack {
    pub fn new(topic: u32) -> TopicTrack {
        TopicTrack {
            topic,
            ..TopicTrack::default()
        }
    }

    pub fn set_baseline(&mut self, id: StreamId) {
        if self.baseline.is_none() {
            self.baseline = Some((id.ms, id.seq));
        }
    }

    /// Accounts for an event with sequence number `seq`.
    pub fn on_event(&mut self, seq: u64) {
        let Some(last) = self.last_seq else {
            self.first_seq = Some(seq);
            self.last_seq = Some(seq);
            self.received += 1;
            return;
        };
        if seq > last {
            if seq > last + 1 {
                if self.holes.len() < MAX_HOLES {
                    self.holes.push((last + 1, seq - 1));
                } else {
                    self.unrecorded_missing += seq - last - 1;
                }
            }
            self.last_seq = Some(seq);
            self.received += 1;
        } else if self.fill_hole(seq) {
            self.late += 1;
            self.received += 1;
        } else {
            self.duplicates += 1;
        }
    }

    fn fill_hole(&mut self, seq: u64) -> bool {
        let Some(i) = self.holes.iter().position(|&(a, b)| a <= seq && seq <= b) else {
            return false;
        };
        let (a, b) = self.holes[i];
        match (seq == a, seq == b) {
            (true, true) => {
                self.holes.remove(i);
            }
            (true, false) => self.holes[i].0 = seq + 1,
            (false, true) => self.holes[i].1 = seq - 1,
            (false, false) => {
                self.holes[i].1 = seq - 1;
                self.holes.insert(i + 1, (seq + 1, b));
            }
        }
        true
    }

    /// True once the connection saw the topic's last stored event (`last`: its sequence
    /// number and stream id), or was owed nothing: nothing was stored, or only before the
    /// connection's baseline.
    pub fn caught_up(&self, last: Option<(u64, StreamIdRepr)>) -> bool {
        match last {
            None => true,
            Some((seq, id)) => {
                self.last_seq.is_some_and(|seen| seen >= seq)
                    || self.baseline.is_some_and(|b| b >= id)
            }
        }
    }
}

/// The events of one topic Redis stored: `(seq, stream id)` in sequence order. Publishes
/// that failed are absent, so they are owed to nobody.
#[derive(Debug, Default, Clone)]
pub struct AckLog {
    pub acked: Vec<(u64, StreamId)>,
}

impl AckLog {
    /// The last stored event: its sequence number and stream id.
    pub fn last(&self) -> Option<(u64, StreamIdRepr)> {
        self.acked.last().map(|&(seq, id)| (seq, (id.ms, id.seq)))
    }

    /// Acknowledged events with sequence numbers in `from..=to`.
    fn count(&self, from: u64, to: u64) -> u64 {
        if from > to {
            return 0;
        }
        let lo = self.acked.partition_point(|&(s, _)| s < from);
        let hi = self.acked.partition_point(|&(s, _)| s <= to);
        (hi - lo) as u64
    }
}

/// Exactness figures of one connection-topic, or summed over many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Stored events the connection was owed.
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.expected += o.expected;
        self.received += o.received;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
    }
}

/// What `track` should have seen of its topic, given what was stored (`log`).
pub fn reconcile(track: &TopicTrack, log: &AckLog) -> Tally {
    let Some((ms, seq)) = track.baseline else {
        // The connection never opened: it was owed nothing (counted as a connect failure).
        return Tally {
            received: track.received,
            duplicates: track.duplicates,
            ..Tally::default()
        };
    };
    let baseline = StreamId::new(ms, seq);
    // The first stored event after the baseline position is the first one owed.
    let owed_from = log.acked.partition_point(|&(_, id)| id <= baseline);
    let Some(&(start, _)) = log.acked.get(owed_from) else {
        return Tally {
            received: track.received,
            duplicates: track.duplicates,
            ..Tally::default()
        };
    };
    let expected = (log.acked.len() - owed_from) as u64;
    let lost = match (track.first_seq, track.last_seq) {
        (Some(first), Some(last)) => {
            let head = if first > start {
                log.count(start, first - 1)
            } else {
                0
            };
            let holes: u64 = track
                .holes
                .iter()
                .map(|&(a, b)| log.count(a.max(start), b))
                .sum();
            head + holes + track.unrecorded_missing + log.count(last + 1, u64::MAX)
        }
        _ => expected,
    };
    Tally {
        expected,
        received: track.received,
        lost,
        duplicates: track.duplicates,
        out_of_order: track.late,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log where seq `s` got stream id `100 + s` (`failed` seqs are absent).
    fn log(last: u64, failed: &[u64]) -> AckLog {
        AckLog {
            acked: (0..=last)
                .filter(|s| !failed.contains(s))
                .map(|s| (s, StreamId::new(100 + s, 0)))
                .collect(),
        }
    }

    fn check(baseline_ms: u64, seen: &[u64], log: &AckLog, expected: (u64, u64, u64, u64, u64)) {
        let mut track = TopicTrack::new(0);
        track.set_baseline(StreamId::new(baseline_ms, 0));
        seen.iter().for_each(|&s| track.on_event(s));
        let t = reconcile(&track, log);
        assert_eq!(
            (t.expected, t.received, t.lost, t.duplicates, t.out_of_order),
            expected,
            "baseline {baseline_ms}, seen {seen:?}"
        );
    }

    #[test]
    fn exact_delivery() {
        check(0, &[0, 1, 2, 3], &log(3, &[]), (4, 4, 0, 0, 0));
        // Joined after seq 1 was stored: owed 2 and 3 only.
        check(101, &[2, 3], &log(3, &[]), (2, 2, 0, 0, 0));
        // An in-flight event at or before the baseline is not owed, nor counted as lost.
        check(101, &[1, 2, 3], &log(3, &[]), (2, 3, 0, 0, 0));
    }

    #[test]
    fn losses_at_start_middle_and_end() {
        check(0, &[1, 2, 3], &log(3, &[]), (4, 3, 1, 0, 0));
        check(0, &[0, 3], &log(3, &[]), (4, 2, 2, 0, 0));
        check(0, &[0, 1], &log(3, &[]), (4, 2, 2, 0, 0));
        check(0, &[], &log(3, &[]), (4, 0, 4, 0, 0));
    }

    #[test]
    fn failed_publishes_are_owed_to_nobody() {
        check(0, &[0, 2, 3], &log(3, &[1]), (3, 3, 0, 0, 0));
        check(0, &[0, 1, 2], &log(3, &[3]), (3, 3, 0, 0, 0));
    }

    #[test]
    fn repeats_and_late_events() {
        check(0, &[0, 1, 1, 2, 0], &log(2, &[]), (3, 3, 0, 2, 0));
        check(0, &[0, 2, 1, 3], &log(3, &[]), (4, 4, 0, 0, 1));
        check(0, &[0, 4, 2, 5], &log(5, &[]), (6, 4, 2, 0, 1));
    }

    #[test]
    fn caught_up() {
        let mut track = TopicTrack::new(0);
        track.set_baseline(StreamId::new(100, 0));
        assert!(track.caught_up(None));
        assert!(
            track.caught_up(Some((0, (100, 0)))),
            "stored before the baseline"
        );
        assert!(!track.caught_up(Some((0, (101, 0)))));
        track.on_event(0);
        assert!(track.caught_up(Some((0, (101, 0)))));
        assert!(!track.caught_up(Some((1, (102, 0)))));
    }
}
