//! `ssegw-floor`: the least work a server can do to push an event to its subscribers, done as
//! `../shared/bench/floor` does it: a fixed response head, then one `write` per socket per
//! event from `--writers` threads that each own a share of the sockets; no HTTP framing, no
//! event loop, no wake-ups. Beside that, only what the load tester needs to drive it as it
//! drives its other targets: a topic per subscriber (`GET /events?topic=T`), publishing by
//! pipelined `POST /publish?topic=T` (the body is the event's data, answered
//! `{"receivers":n}` once every writer has written it), and `GET /readyz`.
//! `ssegw-loadtest --target floor` measures it with the same client, publisher and accounting
//! as the gateway and `--target actix`, so that the ratio of each to the floor comes from one
//! client.
//!
//! Like the reference, it measures the cost of a write and queues nothing: a socket whose send
//! buffer is full misses the event (its write would block), one that takes part of it is
//! dropped.
//!
//! One difference, at rates where one `write` per socket per event is more than the writers
//! can do: the reference then publishes late (it stamps each event when the previous one is
//! written, so its latencies leave the wait out), while the harness stamps an event when it is
//! due, so here the backlog is measured. A writer that finds several events queued writes
//! each socket all of its topic's queued events in one `write` (one `write` per socket per
//! pass), which is the least work at those rates; with only one event queued, which is always
//! the case while the writers keep up, that is the reference's one `write` per event.
//! `--one-write-per-event` turns the batching off.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "ssegw-floor",
    version,
    about = "Floor SSE server for ssegw-loadtest --target floor: one write per socket per event \
             from a few threads, nothing else"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: SocketAddr,
    /// Writer threads, each owning a share of the subscribers' sockets.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    writers: u16,
    /// Write each event to each socket in a call of its own, even when several are queued
    /// (the reference's way; by default a writer that is behind writes what queued at once).
    #[arg(long)]
    one_write_per_event: bool,
}

/// The head of every stream: the reference floor's, no chunked encoding (the body ends when the
/// connection does).
const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\nretry: 1000\n\n";

/// One writer's sockets, by topic.
type Sockets = Arc<Mutex<HashMap<String, Vec<TcpStream>>>>;

/// An event for one writer: the frame to write to the topic's sockets, and where to say to
/// how many it went.
struct Job {
    topic: Arc<str>,
    frame: Arc<[u8]>,
    done: mpsc::Sender<usize>,
}

fn main() {
    let args = Args::parse();
    let listener = match TcpListener::bind(args.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("ssegw-floor: cannot listen on {}: {e}", args.listen);
            std::process::exit(2);
        }
    };
    let batch = if args.one_write_per_event {
        1
    } else {
        MAX_BATCH
    };
    serve(listener, args.writers, batch);
}

/// The most queued events a writer takes in one pass.
const MAX_BATCH: usize = 256;

/// Accepts connections for ever, each read by a thread of its own until its first request is
/// in (a publishing connection may stay silent a while after it connects): streams go to the
/// writers in turn, and a publishing connection keeps its thread.
fn serve(listener: TcpListener, writer_threads: u16, batch: usize) {
    let mut shares = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..writer_threads {
        let sockets = Sockets::default();
        let (jobs, queue) = mpsc::channel::<Job>();
        let mine = sockets.clone();
        std::thread::spawn(move || write_events(&mine, &queue, batch));
        shares.push(sockets);
        writers.push(jobs);
    }
    let (writers, shares) = (Arc::new(writers), Arc::new(shares));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(socket) = conn else { continue };
        let (writers, shares, next) = (writers.clone(), shares.clone(), next.clone());
        // A connection the machine has no thread for is dropped (the client sees it closed).
        let _ = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || accepted(socket, &writers, &shares, &next));
    }
}

/// Serves an accepted connection by its first request.
fn accepted(
    mut socket: TcpStream,
    writers: &[mpsc::Sender<Job>],
    shares: &[Sockets],
    next: &std::sync::atomic::AtomicUsize,
) {
    let Some((request, rest)) = read_head(&mut socket, Vec::new()) else {
        return;
    };
    match (request.method.as_str(), request.path()) {
        ("GET", "/readyz") => {
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        ("GET", "/events") => {
            let subscribed = socket.write_all(HEAD).is_ok()
                && socket.set_nodelay(true).is_ok()
                && socket.set_nonblocking(true).is_ok();
            if subscribed {
                let turn = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                shares[turn % shares.len()]
                    .lock()
                    .expect("sockets poisoned")
                    .entry(request.topic())
                    .or_default()
                    .push(socket);
            }
        }
        ("POST", "/publish") => publish(socket, request, rest, writers),
        _ => {
            let _ = socket.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    }
}

/// A writer: takes the events queued for it (at most `batch`) and writes each socket of a
/// topic its events among them in one `write`; with one event queued, one `write` per socket
/// per event.
fn write_events(sockets: &Sockets, queue: &mpsc::Receiver<Job>, batch: usize) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < batch {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut sockets = sockets.lock().expect("sockets poisoned");
        for (topic, jobs) in by_topic(jobs) {
            let text: Vec<u8>;
            let frame: &[u8] = if let [job] = jobs.as_slice() {
                &job.frame
            } else {
                text = jobs
                    .iter()
                    .flat_map(|job| job.frame.iter().copied())
                    .collect();
                &text
            };
            let mut written = 0;
            if let Some(list) = sockets.get_mut(&*topic) {
                list.retain_mut(|s| match s.write(frame) {
                    Ok(n) if n == frame.len() => {
                        written += 1;
                        true
                    }
                    Ok(_) => false,
                    Err(e) => e.kind() == ErrorKind::WouldBlock,
                });
            }
            for job in jobs {
                let _ = job.done.send(written);
            }
        }
    }
}

/// Jobs grouped by topic, each group in the order the jobs came, the groups in the order of
/// their first job.
fn by_topic(jobs: Vec<Job>) -> Vec<(Arc<str>, Vec<Job>)> {
    let mut groups: Vec<(Arc<str>, Vec<Job>)> = Vec::new();
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    for job in jobs {
        match index.get(&job.topic) {
            Some(&at) => groups[at].1.push(job),
            None => {
                index.insert(job.topic.clone(), groups.len());
                groups.push((job.topic.clone(), vec![job]));
            }
        }
    }
    groups
}

/// A request head: its method, target and body length.
struct Request {
    method: String,
    target: String,
    content_length: usize,
}

impl Request {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The `topic` query parameter, as sent (the harness's topics need no decoding).
    fn topic(&self) -> String {
        self.target
            .split_once('?')
            .map(|(_, query)| query)
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("topic="))
            .unwrap_or("")
            .to_string()
    }
}

/// Reads until a whole request head is in `buf`; the head and the bytes after it, or `None`
/// when the connection ends, times out or sends no HTTP.
fn read_head(socket: &mut TcpStream, mut buf: Vec<u8>) -> Option<(Request, Vec<u8>)> {
    loop {
        if let Some((request, used)) = parse_head(&buf)? {
            return Some((request, buf.split_off(used)));
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 8192];
        match socket.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `Some(None)` while the head is incomplete, `None` if it is not HTTP.
fn parse_head(buf: &[u8]) -> Option<Option<(Request, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let used = match request.parse(buf).ok()? {
        httparse::Status::Partial => return Some(None),
        httparse::Status::Complete(used) => used,
    };
    let content_length = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    Some(Some((
        Request {
            method: request.method?.to_string(),
            target: request.path?.to_string(),
            content_length,
        },
        used,
    )))
}

/// Serves a publishing connection: each request's body handed to every writer as one event to
/// the topic's subscribers as soon as it is read, and answered in turn, by a thread of the
/// connection's own, once every writer has written it (so the writers can be behind by more
/// than one event, as the harness's pipelined publishing allows).
fn publish(
    mut socket: TcpStream,
    mut request: Request,
    mut buf: Vec<u8>,
    writers: &[mpsc::Sender<Job>],
) {
    let _ = socket.set_nodelay(true);
    let Ok(mut answers) = socket.try_clone() else {
        return;
    };
    // Each request in turn: how many sockets took its event, once known (`None`: not a publish).
    let (pending, waiting) = mpsc::channel::<Option<mpsc::Receiver<usize>>>();
    let answering = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            for written in waiting {
                let answer = match written {
                    Some(written) => {
                        let body = format!("{{\"receivers\":{}}}", written.iter().sum::<usize>());
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    }
                    None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                };
                if answers.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        });
    if answering.is_err() {
        return;
    }
    loop {
        while buf.len() < request.content_length {
            let mut chunk = [0u8; 8192];
            match socket.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let rest = buf.split_off(request.content_length);
        let written = (request.method == "POST" && request.path() == "/publish")
            .then(|| send(writers, request.topic().into(), &buf));
        if pending.send(written).is_err() {
            return;
        }
        match read_head(&mut socket, rest) {
            Some((next, rest)) => (request, buf) = (next, rest),
            None => return,
        }
    }
}

/// Hands the event to every writer; where each says how many of its sockets took it.
fn send(writers: &[mpsc::Sender<Job>], topic: Arc<str>, data: &[u8]) -> mpsc::Receiver<usize> {
    let frame: Arc<[u8]> = frame(data).into();
    let (done, written) = mpsc::channel();
    for writer in writers {
        let _ = writer.send(Job {
            topic: topic.clone(),
            frame: frame.clone(),
            done: done.clone(),
        });
    }
    written
}

/// The event's SSE frame: a `data:` line per line of the data.
fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    for line in data.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn frames_and_heads() {
        assert_eq!(frame(br#"{"t":0}"#), b"data: {\"t\":0}\n\n");
        assert_eq!(frame(b"a\nb"), b"data: a\ndata: b\n\n");
        let (request, used) = parse_head(
            b"POST /publish?topic=lt.x.3 HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{\"t\":0}",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                request.method.as_str(),
                request.path(),
                request.topic().as_str()
            ),
            ("POST", "/publish", "lt.x.3")
        );
        assert_eq!((request.content_length, used), (7, 67));
        assert!(parse_head(b"GET /events?topic=a HTTP/1.1\r\n")
            .unwrap()
            .is_none());
        assert!(parse_head(b"\x16\x03\x01 not http\r\n\r\n").is_none());
    }

    /// A subscriber gets the head, then each event published on its topic, and a subscriber of
    /// another topic gets nothing; pipelined publishes are answered in turn; a connection that
    /// sends nothing yet (a publisher's, between connecting and its first event) holds up no
    /// other.
    #[test]
    fn publish_reaches_the_topics_subscribers() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener, 2, MAX_BATCH));
        let connect = || TcpStream::connect(addr).unwrap();
        let _silent = connect();
        let subscribe = |topic: &str| {
            let mut s = connect();
            s.write_all(
                format!("GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut head = vec![0u8; HEAD.len()];
            s.read_exact(&mut head).unwrap();
            assert_eq!(head, HEAD);
            s
        };
        let (mut a1, mut a2, mut b) = (subscribe("a"), subscribe("a"), subscribe("b"));
        let mut publisher = connect();
        let post = |data: &str| {
            format!(
                "POST /publish?topic=a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{data}",
                data.len()
            )
        };
        publisher
            .write_all((post("one") + &post("two")).as_bytes())
            .unwrap();
        publisher
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"receivers\":2}";
        let mut answers = vec![0u8; 2 * answer.len()];
        publisher.read_exact(&mut answers).unwrap();
        assert_eq!(String::from_utf8(answers).unwrap(), answer.repeat(2));
        for s in [&mut a1, &mut a2] {
            let expected = b"data: one\n\ndata: two\n\n";
            let mut events = vec![0u8; expected.len()];
            s.read_exact(&mut events).unwrap();
            assert_eq!(events, expected);
        }
        b.set_nonblocking(true).unwrap();
        let mut nothing = [0u8; 16];
        assert_eq!(
            b.read(&mut nothing).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock),
            "a subscriber of another topic got bytes"
        );
        let mut ready = connect();
        ready
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut status = String::new();
        ready.read_to_string(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200 OK"), "{status}");
    }

    /// Events queued for a writer before it runs are written in one pass, each socket its
    /// topic's events in order, and each event is told how many sockets took it; one at a time
    /// (`batch` 1) the same bytes arrive.
    #[test]
    fn queued_events_are_written_together_in_order() {
        for batch in [MAX_BATCH, 1] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let accept = |topic: &str, sockets: &Sockets| {
                let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (server, _) = listener.accept().unwrap();
                sockets
                    .lock()
                    .unwrap()
                    .entry(topic.to_string())
                    .or_default()
                    .push(server);
                client
            };
            let sockets = Sockets::default();
            let (mut a, mut b) = (accept("a", &sockets), accept("b", &sockets));
            let (jobs, queue) = mpsc::channel();
            let (done, counts) = mpsc::channel();
            for (topic, data) in [("a", "1"), ("b", "x"), ("a", "2"), ("c", "-"), ("a", "3")] {
                jobs.send(Job {
                    topic: topic.into(),
                    frame: frame(data.as_bytes()).into(),
                    done: done.clone(),
                })
                .unwrap();
            }
            drop((jobs, done));
            write_events(&sockets, &queue, batch);
            let mut counts: Vec<usize> = counts.iter().collect();
            counts.sort_unstable();
            assert_eq!(counts, [0, 1, 1, 1, 1], "batch {batch}");
            for (s, expected) in [
                (&mut a, &b"data: 1\n\ndata: 2\n\ndata: 3\n\n"[..]),
                (&mut b, b"data: x\n\n"),
            ] {
                let mut got = vec![0u8; expected.len()];
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s.read_exact(&mut got).unwrap();
                assert_eq!(got, expected, "batch {batch}");
            }
        }
    }
}
