//! Test support: a real `redis-server` per test on a free port, gateway replicas started
//! through the library's `run`, and an SSE client that keeps the raw bytes and parses them
//! with an independent parser (`eventsource-stream`).
#![allow(dead_code)]

pub mod browser;
pub mod failover;
pub mod nginx;
pub mod otlp;
pub mod proxy;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use std::collections::VecDeque;

use futures_util::stream::{LocalBoxStream, StreamExt};
use sse_gateway::config::Config;
use ssegw_testkit::Standalone;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `ready` until it holds; panics naming `what` after `WAIT`.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Settings the gateway reads from the environment alone, with no flag (docs/configuration.md,
/// "Environment only").
pub const ENV_ONLY: [&str; 4] = [
    "SSEGW_LOG",
    "SSEGW_LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
];

/// The repository's root.
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A new directory under the system's temporary one, named for the test.
pub fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ssegw-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    ssegw_testkit::free_port().expect("no free port")
}

/// A `redis-server` on a free port (the testkit's `Standalone`); killed on drop.
pub struct RedisServer {
    pub port: u16,
    redis: Standalone,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let redis = Standalone::start().unwrap_or_else(|e| redis_failed(e));
        RedisServer {
            port: redis.server().port(),
            redis,
        }
    }

    /// Kills the server (SIGKILL): every connection to it drops at once.
    pub fn kill(&mut self) {
        self.redis.server_mut().kill();
    }

    /// Starts an empty server again on the same port.
    pub fn restart(&mut self) {
        self.redis
            .server_mut()
            .restart()
            .unwrap_or_else(|e| redis_failed(e));
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.redis.server().pause().expect("SIGSTOP redis-server");
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        self.redis.server().resume().expect("SIGCONT redis-server");
    }

    pub fn addr(&self) -> SocketAddr {
        self.redis.server().addr()
    }

    pub fn url(&self) -> String {
        self.redis.url()
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// Runs a command on a fresh blocking connection.
    pub fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        cmd.query(&mut self.client().get_connection()?)
    }

    /// `FCALL ssegw_publish 1 <topic> <data> [<event>]`, the documented publish command.
    pub fn fcall_publish(&self, topic: &str, data: &str, event: Option<&str>) -> String {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("ssegw_publish").arg(1).arg(topic).arg(data);
        if let Some(event) = event {
            cmd.arg(event);
        }
        self.cmd(&cmd).expect("FCALL ssegw_publish failed")
    }
}

/// A missing `redis-server` fails the test, saying so, rather than skipping it.
fn redis_failed(error: ssegw_testkit::Error) -> ! {
    match error {
        ssegw_testkit::Error::Spawn { .. } => panic!(
            "redis-server is required for the integration tests (apt-get install redis-server): {error}"
        ),
        error => panic!("{error}"),
    }
}

/// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) to a process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Where a test client connects: an in-process replica or a replica process.
pub trait Replica {
    fn addr(&self) -> SocketAddr;

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Waits until `/readyz` answers `status`; panics after `WAIT`.
    fn wait_readyz(&self, status: u16) {
        let addr = self.addr();
        wait_until(&format!("/readyz {status} from {addr}"), || {
            http_status(addr, "GET", "/readyz") == Some(status)
        });
    }
}

impl Replica for SocketAddr {
    fn addr(&self) -> SocketAddr {
        *self
    }
}

/// Test flags unless the test sets them: no drain window, so that dropping a replica is quick.
/// Test replicas drain at once, run two workers, and let anyone subscribe and publish, unless
/// the test sets these itself (any `--jwt-*` or `--anonymous-*` flag: the test is about auth).
fn with_test_defaults(flags: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    for (flag, value) in [("--drain-window", "0s"), ("--workers", "2")] {
        if !flags.contains(&flag) {
            all.extend([flag.to_string(), value.to_string()]);
        }
    }
    let sets_auth = flags
        .iter()
        .any(|f| f.starts_with("--jwt-") || f.starts_with("--anonymous-"));
    if !sets_auth {
        all.extend(["--anonymous-subscribe=*", "--anonymous-publish=*"].map(String::from));
    }
    all
}

/// A replica as its own `sse-gateway` process, for faults that hit a whole process (SIGKILL,
/// SIGTERM). Killed on drop.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    child: Child,
}

impl GatewayProcess {
    /// Starts the binary with these flags on a free port and waits until it is ready.
    pub fn start(redis_url: &str, flags: &[&str]) -> GatewayProcess {
        GatewayProcess::spawn(redis_url, flags, &[("SSEGW_LOG", "warn")], None)
    }

    /// Like `start`, with these environment variables, and its log (stdout and stderr) written
    /// to `log` when given.
    pub fn spawn(
        redis_url: &str,
        flags: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> GatewayProcess {
        let process = GatewayProcess::launch(redis_url, flags, env, log);
        process.wait_readyz(200);
        process
    }

    /// Like `spawn`, without waiting until the replica is ready: for one that must not be.
    pub fn launch(
        redis_url: &str,
        flags: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> GatewayProcess {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_sse-gateway"));
        command
            .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
            .args(with_test_defaults(flags))
            .envs(env.iter().copied())
            .stdout(Stdio::null());
        if let Some(log) = log {
            command
                .stdout(std::fs::File::create(log).expect("log file"))
                .stderr(
                    std::fs::File::options()
                        .append(true)
                        .open(log)
                        .expect("log file"),
                );
        }
        let child = command.spawn().expect("start sse-gateway");
        GatewayProcess { addr, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit without blocking the test's runtime; panics after `limit`.
    pub async fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "replica still running after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl GatewayProcess {
    /// Like `start`, with the most verbose log (`SSEGW_LOG=trace`) written to `log`.
    pub fn start_logging(redis_url: &str, flags: &[&str], log: &std::path::Path) -> GatewayProcess {
        GatewayProcess::spawn(redis_url, flags, &[("SSEGW_LOG", "trace")], Some(log))
    }
}

impl Replica for GatewayProcess {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flags built as `String`s, as `Gateway::start` takes them.
pub fn strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// With `SSEGW_TEST_LOG` set (a filter such as `sse_gateway=debug`), the in-process replicas
/// log to the test's output: for finding out why a test failed.
fn test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("SSEGW_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// One gateway replica served by `sse_gateway::run` on its own runtime thread.
pub struct Gateway {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// Starts a replica with these flags (plus a free loopback listener) and waits until
    /// `/readyz` answers 200.
    pub fn start(flags: &[&str]) -> Gateway {
        let gateway = Gateway::start_unchecked(flags);
        gateway.wait_ready();
        gateway
    }

    /// Starts a replica without waiting for it: for listeners the plain-HTTP readiness probe
    /// cannot reach (TLS). Connections wait in the listen queue until it serves.
    pub fn start_unchecked(flags: &[&str]) -> Gateway {
        test_log();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config::from_flags(with_test_defaults(flags)).expect("test config");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime
                .block_on(sse_gateway::run(listener, config, token))
                .expect("gateway failed");
        });
        Gateway {
            addr,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn with_redis(redis: &RedisServer, flags: &[&str]) -> Gateway {
        let url = redis.url();
        let mut all = vec!["--redis-url", url.as_str()];
        all.extend_from_slice(flags);
        Gateway::start(&all)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn wait_ready(&self) {
        self.wait_readyz(200);
    }

    /// Starts the drain, as SIGTERM does, without waiting for it.
    pub fn begin_drain(&self) {
        self.shutdown.cancel();
    }

    /// Stops the replica: it drains as configured and returns once `run` has.
    pub fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("gateway thread panicked");
        }
    }
}

impl Replica for Gateway {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, as PEM files for `--tls-cert` and
/// `--tls-key`, and as DER for a client to trust.
pub struct Certificate {
    pub cert_path: String,
    pub key_path: String,
    pub der: rustls::pki_types::CertificateDer<'static>,
}

impl Certificate {
    /// A new one, in a directory of the test's own under the target directory.
    pub fn self_signed(name: &str) -> Certificate {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        let path = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
        Certificate {
            cert_path: path(cert),
            key_path: path(key),
            der: certified.cert.der().clone(),
        }
    }
}

/// Status of a bodyless request, over a plain blocking socket (usable outside any runtime).
pub fn http_status(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The events of a running cluster: either Redis with replicas, or one embedded node.
pub struct Cluster {
    pub redis: Option<RedisServer>,
    pub replicas: Vec<Gateway>,
}

impl Cluster {
    /// Two replicas sharing one Redis.
    pub fn redis(flags: &[&str]) -> Cluster {
        let redis = RedisServer::start();
        let replicas = vec![
            Gateway::with_redis(&redis, flags),
            Gateway::with_redis(&redis, flags),
        ];
        Cluster {
            redis: Some(redis),
            replicas,
        }
    }

    /// A single node on the embedded bus (no Redis).
    pub fn embedded(flags: &[&str]) -> Cluster {
        Cluster {
            redis: None,
            replicas: vec![Gateway::start(flags)],
        }
    }

    /// Replica `i`, wrapping around (the embedded cluster has one).
    pub fn replica(&self, i: usize) -> &Gateway {
        &self.replicas[i % self.replicas.len()]
    }

    /// Publishes through the documented path: `FCALL` on Redis, `POST /publish` when embedded.
    pub async fn publish(&self, topic: &str, data: &str) -> String {
        match &self.redis {
            Some(redis) => redis.fcall_publish(topic, data, None),
            None => http_publish(self.replica(0), topic, data, None).await,
        }
    }
}

/// `POST /publish`; returns the id.
pub async fn http_publish(gw: &Gateway, topic: &str, data: &str, event: Option<&str>) -> String {
    let body = serde_json::json!({ "topic": topic, "data": data, "event": event });
    let mut response = awc::Client::default()
        .post(gw.url("/publish"))
        .send_json(&body)
        .await
        .expect("POST /publish");
    assert_eq!(response.status(), 200, "publish failed");
    let reply: serde_json::Value = response.json().await.unwrap();
    reply["id"].as_str().unwrap().to_string()
}

/// An open SSE stream (driven on the single-threaded actix test runtime that opened it).
pub struct Sse {
    events: LocalBoxStream<'static, Result<Event, String>>,
    /// Events already pulled off the stream but not yet handed out.
    pending: VecDeque<Event>,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl Sse {
    /// `GET /events?<query>`, optionally with `Last-Event-ID`; asserts the SSE headers.
    pub async fn open(gw: &impl Replica, query: &str, last_event_id: Option<&str>) -> Sse {
        let id = last_event_id.map(|id| ("Last-Event-ID", id));
        Sse::open_with(gw, query, id.as_slice()).await
    }

    /// `GET /events?<query>` with these request headers; asserts the SSE headers, and that the
    /// stream is not compressed (a compressor holds events back until its buffer fills).
    pub async fn open_with(gw: &impl Replica, query: &str, headers: &[(&str, &str)]) -> Sse {
        let mut request = awc::Client::builder()
            .disable_timeout()
            .finish()
            .get(gw.url(&format!("/events?{query}")));
        for &header in headers {
            request = request.insert_header(header);
        }
        let response = request.send().await.expect("GET /events");
        assert_eq!(response.status(), 200, "GET /events?{query}");
        let headers = response.headers();
        assert_eq!(headers.get("content-type").unwrap(), "text/event-stream");
        assert_eq!(headers.get("cache-control").unwrap(), "no-cache");
        assert_eq!(headers.get("x-accel-buffering").unwrap(), "no");
        assert_eq!(
            headers.get("content-encoding"),
            None,
            "a compressed event stream"
        );
        let raw = Arc::new(Mutex::new(Vec::new()));
        let tap = raw.clone();
        let body = response.map(move |chunk| {
            let chunk: Bytes = chunk.map_err(|e| e.to_string())?;
            tap.lock().unwrap().extend_from_slice(&chunk);
            Ok::<_, String>(chunk)
        });
        let events = body
            .eventsource()
            .map(|e| e.map_err(|e| e.to_string()))
            .boxed_local();
        Sse {
            events,
            pending: VecDeque::new(),
            raw,
        }
    }

    /// The next event; panics after `WAIT`.
    pub async fn next(&mut self) -> Event {
        if let Some(event) = self.pending.pop_front() {
            return event;
        }
        match tokio::time::timeout(WAIT, self.events.next()).await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(e))) => panic!("stream error: {e}"),
            Ok(None) => panic!("stream ended"),
            Err(_) => panic!("no event within {WAIT:?}"),
        }
    }

    /// The next event, or `None` once the stream has ended; panics after `WAIT`.
    pub async fn try_next(&mut self) -> Option<Event> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        match tokio::time::timeout(WAIT, self.events.next()).await {
            Ok(Some(Ok(event))) => Some(event),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no event and no end within {WAIT:?}"),
        }
    }

    pub async fn take(&mut self, n: usize) -> Vec<Event> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next().await);
        }
        events
    }

    /// Every event until none arrives for `quiet` (or the stream ends).
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Event> {
        let mut events: Vec<Event> = self.pending.drain(..).collect();
        while let Ok(Some(Ok(event))) = tokio::time::timeout(quiet, self.events.next()).await {
            events.push(event);
        }
        events
    }

    /// Asserts that no event arrives within `quiet`.
    pub async fn assert_quiet(&mut self, quiet: Duration) {
        assert!(
            self.pending.is_empty(),
            "unexpected event {:?}",
            self.pending
        );
        if let Ok(Some(event)) = tokio::time::timeout(quiet, self.events.next()).await {
            panic!("unexpected event {event:?}");
        }
    }

    /// Everything received so far, as text.
    pub fn raw(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).into_owned()
    }

    /// The id of the preamble (`retry:` block): the position a fresh connection starts at.
    pub async fn baseline(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let raw = self.raw();
            if let Some(block) = raw.split("\n\n").next().filter(|_| raw.contains("\n\n")) {
                assert!(block.starts_with("retry: "), "preamble {block:?}");
                return block
                    .lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .expect("fresh connections carry a baseline id")
                    .to_string();
            }
            assert!(Instant::now() < deadline, "no preamble");
            // Poll the stream so that bytes arrive, keeping any event for `next`.
            if let Ok(Some(Ok(event))) =
                tokio::time::timeout(Duration::from_millis(20), self.events.next()).await
            {
                self.pending.push_back(event);
            }
        }
    }
}

/// `GET <path>` over a blocking socket: the status, the response head and the body.
pub fn get_text(addr: SocketAddr, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().expect("status line");
    let (head, body) = reply.split_once("\r\n\r\n").expect("no body");
    (status, head.to_string(), body.to_string())
}

/// `GET <path>` over a blocking socket: the status and the JSON body.
pub fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = get_text(addr, path);
    (status, serde_json::from_str(&body).expect("JSON body"))
}

/// A response read raw, HTTP chunk by HTTP chunk: each chunk is one write of the gateway's
/// body, so tests can see how the gateway groups what it writes.
pub struct RawChunks {
    reader: std::io::BufReader<std::net::TcpStream>,
    /// The response head, lines ending in CRLF, without the blank line.
    pub head: String,
}

impl RawChunks {
    /// Sends `head` (the request line and headers, each ending in CRLF) and reads past the
    /// response head.
    pub fn open(addr: SocketAddr, head: &str) -> RawChunks {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        write!(stream, "{head}\r\n").unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        RawChunks { reader, head }
    }

    /// The response head's value of `name` (lowercase), if it has the header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// Closes the sending side, as a client that leaves does (its FIN).
    pub fn stop_sending(&self) {
        self.reader
            .get_ref()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
    }

    /// Whether the server closed the connection, with nothing more sent.
    pub fn at_end(&mut self) -> bool {
        use std::io::Read;
        let mut rest = Vec::new();
        matches!(self.reader.read_to_end(&mut rest), Ok(0))
    }

    /// The next chunk's data (a hex size line, the data, CRLF on the wire).
    pub fn next(&mut self) -> Vec<u8> {
        use std::io::{BufRead, Read};
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let size = usize::from_str_radix(line.trim_end(), 16).expect("a chunk size line");
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).unwrap();
        chunk.truncate(size);
        chunk
    }
}

/// `POST /publish` over a blocking socket, for publisher threads outside the test runtime.
pub fn blocking_http_publish(addr: SocketAddr, topic: &str, data: &str) -> String {
    blocking_http_publish_as(addr, topic, data, None)
}

/// `blocking_http_publish` with a bearer token, if given; the event's id.
pub fn blocking_http_publish_as(
    addr: SocketAddr,
    topic: &str,
    data: &str,
    token: Option<&str>,
) -> String {
    try_blocking_http_publish(addr, topic, data, token)
        .unwrap_or_else(|reply| panic!("publish failed: {reply}"))
}

/// `POST /publish` over a blocking socket: the event's id, or the whole reply when it is not a
/// 200 (or none came).
pub fn try_blocking_http_publish(
    addr: SocketAddr,
    topic: &str,
    data: &str,
    token: Option<&str>,
) -> Result<String, String> {
    use std::io::{Read, Write};
    let body = serde_json::json!({ "topic": topic, "data": data }).to_string();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    write!(
        stream,
        "POST /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    if !reply.starts_with("HTTP/1.1 200") {
        return Err(reply);
    }
    let json = &reply[reply.find("\r\n\r\n").expect("no body") + 4..];
    let value: serde_json::Value = serde_json::from_str(json).expect("publish reply");
    Ok(value["id"].as_str().unwrap().to_string())
}

impl Cluster {
    /// A publisher usable from a plain thread: `FCALL` on Redis, HTTP when embedded.
    pub fn blocking_publisher(&self) -> impl Fn(&str, &str) -> String + Send + 'static {
        let redis = self.redis.as_ref().map(RedisServer::client);
        let addr = self.replica(0).addr;
        move |topic, data| match &redis {
            Some(client) => {
                let mut conn = client.get_connection().expect("redis connection");
                redis::cmd("FCALL")
                    .arg("ssegw_publish")
                    .arg(1)
                    .arg(topic)
                    .arg(data)
                    .query(&mut conn)
                    .expect("FCALL ssegw_publish")
            }
            None => blocking_http_publish(addr, topic, data),
        }
    }
}
