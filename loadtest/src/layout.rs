//! The shape of a run, as pure functions of a connection's index: its topics, the gateway it
//! opens first (round-robin, like a load balancer) and its local source address. Every process
//! of a run computes the same answers from the same `Layout`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    /// Makes this run's topic names unique, so history left in Redis by an earlier run is never
    /// read back.
    pub run_id: String,
    /// Topics in the run, `K`.
    pub topics: u32,
    /// Topics each connection subscribes to, `M <= K`.
    pub topics_per_conn: u32,
    /// Gateway base URLs, in round-robin order.
    pub urls: Vec<String>,
    /// Local addresses client sockets bind to before connecting, round-robin; empty: the
    /// kernel chooses.
    pub source_addrs: Vec<IpAddr>,
}

impl Layout {
    pub fn topic_name(&self, topic: u32) -> String {
        format!("lt.{}.{topic}", self.run_id)
    }

    /// The topic index of one of this run's topic names.
    pub fn topic_index(&self, name: &str) -> Option<u32> {
        let rest = name
            .strip_prefix("lt.")?
            .strip_prefix(self.run_id.as_str())?;
        rest.strip_prefix('.')?
            .parse()
            .ok()
            .filter(|t| *t < self.topics)
    }

    /// Connection `conn` subscribes to `M` consecutive topics starting at `conn * M`, wrapping
    /// around: with one topic per connection that spreads connections evenly over the topics,
    /// and with several each topic is shared by about `N * M / K` connections.
    pub fn topics_of(&self, conn: u64) -> impl Iterator<Item = u32> + '_ {
        let k = u64::from(self.topics);
        let m = u64::from(self.topics_per_conn);
        (0..m).map(move |j| ((conn * m + j) % k) as u32)
    }

    /// Index into `urls` of the gateway this connection opens first.
    pub fn first_url(&self, conn: u64) -> usize {
        (conn % self.urls.len() as u64) as usize
    }

    pub fn source_addr(&self, conn: u64) -> Option<IpAddr> {
        if self.source_addrs.is_empty() {
            return None;
        }
        // Consecutive connections go to the same gateway (round-robin above), so spread them
        // over source addresses in blocks of `urls.len()` to give each (source, gateway) pair
        // the same share of ephemeral ports.
        let block = conn / self.urls.len() as u64;
        Some(self.source_addrs[(block % self.source_addrs.len() as u64) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(topics: u32, per_conn: u32) -> Layout {
        Layout {
            run_id: "r1".into(),
            topics,
            topics_per_conn: per_conn,
            urls: vec!["http://a".into(), "http://b".into()],
            source_addrs: vec![],
        }
    }

    fn check(topics: u32, per_conn: u32, conn: u64, expected: &[u32]) {
        let got: Vec<u32> = layout(topics, per_conn).topics_of(conn).collect();
        assert_eq!(got, expected, "K={topics} M={per_conn} conn={conn}");
    }

    #[test]
    fn topics_spread_and_wrap() {
        check(1, 1, 0, &[0]);
        check(1, 1, 7, &[0]);
        check(10, 1, 13, &[3]);
        check(10, 3, 0, &[0, 1, 2]);
        check(10, 3, 3, &[9, 0, 1]);
        check(3, 3, 5, &[0, 1, 2]);
    }

    #[test]
    fn topic_names_round_trip() {
        let l = layout(10, 1);
        assert_eq!(l.topic_index(&l.topic_name(9)), Some(9));
        assert_eq!(l.topic_index("lt.r1.10"), None);
        assert_eq!(l.topic_index("lt.r2.1"), None);
        assert_eq!(l.topic_index("orders"), None);
    }

    #[test]
    fn urls_and_sources_round_robin() {
        let mut l = layout(1, 1);
        l.source_addrs = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        let got: Vec<(usize, String)> = (0..6)
            .map(|c| (l.first_url(c), l.source_addr(c).unwrap().to_string()))
            .collect();
        let want = [
            (0, "127.0.0.1"),
            (1, "127.0.0.1"),
            (0, "127.0.0.2"),
            (1, "127.0.0.2"),
            (0, "127.0.0.1"),
            (1, "127.0.0.1"),
        ];
        assert_eq!(got, want.map(|(u, s)| (u, s.to_string())));
    }
}
