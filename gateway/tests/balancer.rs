//! The load balancer of `docker-compose.yml` is the file tested: `deploy/nginx.conf`, run by the
//! real nginx with only its listen port and replica addresses replaced by loopback ones, in front
//! of three replica processes and Redis. Events pass through it unbuffered (as fast as direct, to
//! within a few milliseconds), new connections spread over the replicas, and a client whose
//! replica is SIGKILLed resumes through it on another, losing nothing.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssegw_protocol::StreamId;
use support::{GatewayProcess, RedisServer, Replica, Sse};

/// The configuration that `docker-compose.yml` mounts into its `lb` service.
const NGINX_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nginx.conf");
/// The replicas named in it, in order (compose services `gateway-1` ...).
const REPLICAS: usize = 3;

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

/// `deploy/nginx.conf` with `listen 8080` and each `gateway-N:8080` replaced by loopback
/// addresses: nothing else changes. Each of them must occur exactly once, so that the file
/// cannot drift away from what this test runs.
fn balancer_conf(listen: SocketAddr, replicas: &[SocketAddr]) -> String {
    let mut conf = std::fs::read_to_string(NGINX_CONF)
        .unwrap_or_else(|e| panic!("cannot read {NGINX_CONF}: {e}"));
    let mut replace = |from: &str, to: &str| {
        let found = conf.matches(from).count();
        assert_eq!(found, 1, "{NGINX_CONF} must name `{from}` exactly once");
        conf = conf.replace(from, to);
    };
    replace("listen 8080;", &format!("listen {listen};"));
    for (i, replica) in replicas.iter().enumerate() {
        replace(
            &format!("server gateway-{}:8080", i + 1),
            &format!("server {replica}"),
        );
    }
    let more = conf
        .match_indices("gateway-")
        .any(|(at, m)| conf[at + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
    assert!(
        !more,
        "{NGINX_CONF} names more replicas than the {} this test starts",
        replicas.len()
    );
    conf
}

/// The nginx binary: on PATH, else where Debian installs it.
fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("nginx"));
    on_path
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
        .expect("nginx is required for the balancer test (apt-get install nginx)")
}

/// nginx running `deploy/nginx.conf` unprivileged: its prefix (pid file, temporary files) is a
/// directory of its own, as the tmpfs is in compose. Stopped on drop.
struct Nginx {
    addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    fn start(replicas: &[SocketAddr]) -> Nginx {
        let addr = SocketAddr::from(([127, 0, 0, 1], support::free_port()));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "balancer-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, balancer_conf(addr, replicas)).unwrap();
        let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let mut prefix = dir.clone().into_os_string();
        prefix.push("/");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&prefix)
            .args(["-e", "stderr", "-c"])
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { addr, dir, child };
        let deadline = Instant::now() + support::WAIT;
        while support::http_status(addr, "GET", "/healthz") != Some(200) {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                panic!("nginx exited with {status}: {}", nginx.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx not answering: {}",
                nginx.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Replica for Nginx {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running). Not
        // `support::signal`, which panics if nginx is gone already: a panic while a failed
        // test unwinds would abort it and leave the replicas and Redis running.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis, the replicas of the compose file and nginx in front of them.
struct Fleet {
    // Dropped in this order: nginx, the replicas, then Redis (so no replica sees Redis go).
    nginx: Nginx,
    replicas: Vec<GatewayProcess>,
    redis: RedisServer,
}

impl Fleet {
    fn start() -> Fleet {
        let redis = RedisServer::start();
        let replicas: Vec<GatewayProcess> = (0..REPLICAS)
            .map(|_| GatewayProcess::start(&redis.url(), &[]))
            .collect();
        let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        let nginx = Nginx::start(&addrs);
        Fleet {
            nginx,
            replicas,
            redis,
        }
    }

    /// Open SSE streams on each replica, by its `/status` (none on a replica that is gone).
    fn connections(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|r| {
                if std::net::TcpStream::connect(r.addr).is_err() {
                    return 0;
                }
                let (status, body) = support::get_json(r.addr, "/status");
                assert_eq!(status, 200);
                body["connections"]
                    .as_u64()
                    .expect("connections in /status")
            })
            .collect()
    }

    /// Waits until the replicas hold `expected` streams in all; returns them per replica.
    fn wait_connections(&self, expected: u64) -> Vec<u64> {
        support::wait_until(&format!("{expected} streams on the replicas"), || {
            self.connections().iter().sum::<u64>() == expected
        });
        self.connections()
    }
}

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
    let fleet = Fleet::start();
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
    let fleet = Fleet::start();
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
    let fleet = Fleet::start();
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
