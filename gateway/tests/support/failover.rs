//! Shared by the failover suites (Sentinel, Cluster): a publisher thread that keeps what was
//! acknowledged, a watch of the replicas' readiness, and the check of what one client received
//! against what was acknowledged and what Redis kept.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssegw_testkit::Reply;

use super::try_blocking_http_publish;

/// The entries of an `XRANGE` reply: (id, data) in order.
pub fn entries(reply: &Reply) -> Vec<(String, String)> {
    let text = |r: &Reply| {
        String::from_utf8_lossy(match r {
            Reply::Bulk(bytes) => bytes,
            other => panic!("not a bulk string: {other:?}"),
        })
        .into_owned()
    };
    reply
        .as_array()
        .expect("XRANGE answers an array")
        .iter()
        .map(|entry| {
            let parts = entry.as_array().unwrap();
            let fields = parts[1].as_array().unwrap();
            let data = fields
                .chunks(2)
                .find(|pair| text(&pair[0]) == "d")
                .map(|pair| text(&pair[1]))
                .unwrap();
            (text(&parts[0]), data)
        })
        .collect()
}

/// A publisher thread: one event at a time, over HTTP, topics and replicas in turn, until
/// stopped. Keeps what was acknowledged (topic, id, data) and every refusal's reply.
#[derive(Default)]
pub struct Publisher {
    topics: Vec<String>,
    pub acked: Mutex<Vec<(String, String, String)>>,
    pub refused: Mutex<Vec<String>>,
    pub stop: AtomicBool,
}

impl Publisher {
    /// Publishes to `topics` in turn through `replicas` in turn, every 15 ms.
    pub fn start(
        topics: &[&str],
        replicas: Vec<SocketAddr>,
    ) -> (Arc<Publisher>, std::thread::JoinHandle<()>) {
        let publisher = Arc::new(Publisher {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            ..Publisher::default()
        });
        let running = publisher.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0usize;
            while !running.stop.load(Ordering::Acquire) {
                let topic = &running.topics[n % running.topics.len()];
                let data = format!("{topic}-{n}");
                match try_blocking_http_publish(replicas[n % replicas.len()], topic, &data, None) {
                    Ok(id) => running
                        .acked
                        .lock()
                        .unwrap()
                        .push((topic.clone(), id, data)),
                    Err(reply) => running.refused.lock().unwrap().push(reply),
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(15));
            }
        });
        (publisher, thread)
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops publishing and returns what was acknowledged, by topic: (id, data) in order.
    pub fn finish(
        &self,
        thread: std::thread::JoinHandle<()>,
    ) -> BTreeMap<String, Vec<(String, String)>> {
        self.stop.store(true, Ordering::Release);
        thread.join().unwrap();
        let mut by_topic: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for topic in &self.topics {
            by_topic.entry(topic.clone()).or_default();
        }
        for (topic, id, data) in self.acked.lock().unwrap().iter() {
            by_topic
                .entry(topic.clone())
                .or_default()
                .push((id.clone(), data.clone()));
        }
        by_topic
    }

    /// Waits until `more` publishes past the current count were acknowledged.
    pub fn wait_for(&self, more: usize, what: &str) {
        let target = self.acked() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "publishes did not succeed {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Polls each replica's `/readyz` until stopped; remembers which were ever not ready.
pub fn watch_readiness(
    replicas: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<bool>> {
    std::thread::spawn(move || {
        let mut unready = vec![false; replicas.len()];
        while !stop.load(Ordering::Acquire) {
            for (i, addr) in replicas.iter().enumerate() {
                if super::http_status(*addr, "GET", "/readyz") != Some(200) {
                    unready[i] = true;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        unready
    })
}

/// What one client of `topic` received, checked against what was acknowledged and what the
/// primary holds in the end: in order, no duplicates between gaps, nothing acknowledged and
/// kept missing, and anything acknowledged but lost either received or announced by a `lost`
/// gap.
pub fn check_client(
    who: &str,
    events: &[eventsource_stream::Event],
    topic: &str,
    acked: &[(String, String)],
    kept: &[(String, String)],
) {
    let mut segments: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for event in events {
        if event.event == "ssegw-gap" {
            assert!(event.data.contains("\"lost\""), "{who}: {}", event.data);
            segments.push(Vec::new());
        } else {
            segments
                .last_mut()
                .unwrap()
                .push((event.id.clone(), event.data.clone()));
        }
    }
    let order = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse().unwrap(), seq.parse().unwrap())
    };
    for segment in &segments {
        for pair in segment.windows(2) {
            assert!(
                order(&pair[0].0) < order(&pair[1].0),
                "{who}: {topic} out of order or twice: {:?} then {:?}",
                pair[0],
                pair[1]
            );
        }
    }
    let received: Vec<&(String, String)> = segments.iter().flatten().collect();
    let gapped = segments.len() > 1;
    for event in acked {
        let got = received.contains(&event);
        if kept.contains(event) {
            assert!(
                got,
                "{who}: acknowledged {event:?} of {topic} never arrived"
            );
        } else {
            assert!(
                got || gapped,
                "{who}: acknowledged {event:?} of {topic} was lost in the failover without a gap"
            );
        }
    }
    for event in &received {
        assert!(
            acked.contains(event) || kept.contains(event),
            "{who}: {event:?} of {topic} was never published"
        );
    }
}
