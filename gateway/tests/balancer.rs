//! The load balancer of `docker-compose.yml` is the file tested: `deploy/nginx.conf`, run by the
//! real nginx with only its listen port and replica addresses replaced by loopback ones, in front
//! of three replica processes and Redis. Events pass through it unbuffered (as fast as direct, to
//! within a few milliseconds), new connections spread over the replicas, and a client whose
//! replica is SIGKILLed resumes through it on another, losing nothing.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssegw_protocol::StreamId;
use support::nginx::{Fleet, REPLICAS};
use support::{RedisServer, Sse};

/// The request headers of a browser's `EventSource`.
const BROWSER: &[(&str, &str)] = &[
    ("Accept", "text/event-stream"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Cache-Control", "no-cache"),
];

/// Longest an event may take through the balancer before it counts as held back.
const UNBUFFERED: Duration = Duration::from_secs(2);
/// How much slower than direct the balancer may be, in the median of `LATENCY_SAMPLES`.
const LATENCY_ALLOWANCE: Duration = Duration::from_millis(5);
const LATENCY_SAMPLES: usize = 50;

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Awaits `event` and notes when it came.
async fn timed<T>(event: impl std::future::Future<Output = T>) -> (T, Instant) {
    let value = event.await;
    (value, Instant::now())
}

#[actix_web::test]
async fn events_come_through_the_balancer_unbuffered_and_as_fast_as_direct() {
    let fleet = Fleet::start(&[]);
    let mut redis = fleet
        .redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut direct = Sse::open(&fleet.replicas[0], "topic=latency", None).await;
    // Asked as a browser asks, compression welcome: the headers must come back as from the
    // replica (`X-Accel-Buffering: no` passed on), and the stream uncompressed.
    let mut through = tokio::time::timeout(
        UNBUFFERED,
        Sse::open_with(&fleet.nginx, "topic=latency", BROWSER),
    )
    .await
    .unwrap_or_else(|_| panic!("no response head through the balancer within {UNBUFFERED:?}"));
    direct.baseline().await;
    through.baseline().await;

    let (mut direct_ms, mut through_ms) = (Vec::new(), Vec::new());
    // One event at a time: each must arrive on both streams before the next is published, so a
    // balancer that holds events back until more come (a buffer to fill) never passes.
    for n in 0..=LATENCY_SAMPLES {
        let data = format!("e{n}");
        let published = Instant::now();
        let publish = async {
            redis::cmd("FCALL")
                .arg("ssegw_publish")
                .arg(1)
                .arg("latency")
                .arg(&data)
                .query_async::<String>(&mut redis)
                .await
                .expect("FCALL ssegw_publish")
        };
        let through_event = async {
            tokio::time::timeout(UNBUFFERED, through.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("event {n} not through the balancer within {UNBUFFERED:?}: it buffers")
                })
        };
        let (id, (d, direct_at), (t, through_at)) =
            futures_util::join!(publish, timed(direct.next()), timed(through_event));
        assert_eq!(
            (d.data.as_str(), d.id.as_str()),
            (data.as_str(), id.as_str())
        );
        assert_eq!(
            (t.data.as_str(), t.id.as_str()),
            (data.as_str(), id.as_str())
        );
        // The first round warms up connections and the replicas' subscriptions.
        if n > 0 {
            direct_ms.push(direct_at - published);
            through_ms.push(through_at - published);
        }
    }
    let (direct_median, through_median) = (median(&mut direct_ms), median(&mut through_ms));
    assert!(
        through_median < direct_median + LATENCY_ALLOWANCE,
        "median publish-to-receive latency through the balancer {through_median:?}, direct \
         {direct_median:?}: more than {LATENCY_ALLOWANCE:?} apart"
    );
}

#[actix_web::test]
async fn new_connections_spread_over_the_replicas() {
    let fleet = Fleet::start(&[]);
    let mut streams = Vec::new();
    for _ in 0..3 * REPLICAS {
        streams.push(Sse::open(&fleet.nginx, "topic=spread", None).await);
    }
    let per_replica = fleet.wait_connections(streams.len() as u64);
    let (least, most) = (
        per_replica.iter().min().unwrap(),
        per_replica.iter().max().unwrap(),
    );
    assert!(
        most - least <= 1,
        "streams per replica {per_replica:?}: not spread"
    );
}

/// Publishes `p<n>` on a topic every few milliseconds through `FCALL` until stopped, then
/// `end`; records what Redis acknowledged, in order.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    published: Arc<Mutex<Vec<(StreamId, String)>>>,
}

impl Publisher {
    fn start(redis: &RedisServer, topic: &'static str) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(Mutex::new(Vec::new()));
        let mut conn = redis.client().get_connection().unwrap();
        let (flag, log) = (stop.clone(), published.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            loop {
                let data = if flag.load(Ordering::Relaxed) {
                    "end".to_string()
                } else {
                    format!("p{n}")
                };
                let id: String = redis::cmd("FCALL")
                    .arg("ssegw_publish")
                    .arg(1)
                    .arg(topic)
                    .arg(&data)
                    .query(&mut conn)
                    .expect("FCALL ssegw_publish");
                log.lock()
                    .unwrap()
                    .push((StreamId::parse(&id).unwrap(), data.clone()));
                if data == "end" {
                    return;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Publisher {
            stop,
            thread,
            published,
        }
    }

    /// How many events have been published so far.
    fn count(&self) -> usize {
        self.published.lock().unwrap().len()
    }

    /// Stops after one last event, `end`; returns everything published.
    fn finish(self) -> Vec<(StreamId, String)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("publisher panicked");
        std::mem::take(&mut *self.published.lock().unwrap())
    }
}

#[actix_web::test]
async fn a_client_of_a_killed_replica_resumes_through_the_balancer_without_loss() {
    let fleet = Fleet::start(&[]);
    let mut sse = Sse::open(&fleet.nginx, "topic=failover", None).await;
    let start = StreamId::parse(&sse.baseline().await).unwrap();
    let on = fleet
        .wait_connections(1)
        .iter()
        .position(|&n| n == 1)
        .unwrap();

    let publisher = Publisher::start(&fleet.redis, "failover");
    let mut received: Vec<(String, String)> = Vec::new();
    while received.len() < 20 {
        let event = sse.next().await;
        received.push((event.id, event.data));
    }
    support::signal(fleet.replicas[on].pid(), "KILL");
    while let Some(event) = sse.try_next().await {
        received.push((event.id, event.data));
    }

    // What a browser does: wait for the `retry:` delay, then reconnect to the same address
    // with the last id it saw. Events published meanwhile must come from the replay.
    let at_end = publisher.count();
    support::wait_until("events published while the client is away", || {
        publisher.count() > at_end + 10
    });
    let last = received.last().unwrap().0.clone();
    let mut sse = Sse::open(&fleet.nginx, "topic=failover", Some(&last)).await;
    // On a replica that is alive (the killed one counts none).
    fleet.wait_connections(1);
    // And live again after the replay.
    let at_resume = publisher.count();
    support::wait_until("events published after the resume", || {
        publisher.count() > at_resume + 10
    });
    let published = publisher.finish();
    loop {
        let event = sse.next().await;
        received.push((event.id, event.data.clone()));
        if event.data == "end" {
            break;
        }
    }

    let expected: Vec<(String, String)> = published
        .into_iter()
        .filter(|(id, _)| *id > start)
        .map(|(id, data)| (id.to_string(), data))
        .collect();
    assert_eq!(
        received, expected,
        "every event, exactly once and in order, across the kill"
    );
}
