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
    serve(listener, args.writers);
}

/// Accepts connections for ever, each read by a thread of its own until its first request is
/// in (a publishing connection may stay silent a while after it connects): streams go to the
/// writers in turn, and a publishing connection keeps its thread.
fn serve(listener: TcpListener, writer_threads: u16) {
    let mut shares = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..writer_threads {
        let sockets = Sockets::default();
        let (jobs, queue) = mpsc::channel::<Job>();
        let mine = sockets.clone();
        std::thread::spawn(move || write_events(&mine, queue));
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

/// A writer: each event, one `write` to each of its sockets of the event's topic.
fn write_events(sockets: &Sockets, queue: mpsc::Receiver<Job>) {
    for job in queue {
        let mut written = 0;
        let mut sockets = sockets.lock().expect("sockets poisoned");
        if let Some(list) = sockets.get_mut(&*job.topic) {
            list.retain_mut(|s| match s.write(&job.frame) {
                Ok(n) if n == job.frame.len() => {
                    written += 1;
                    true
                }
                Ok(_) => false,
                Err(e) => e.kind() == ErrorKind::WouldBlock,
            });
        }
        drop(sockets);
        let _ = job.done.send(written);
    }
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

/// Serves a publishing connection: each request in turn, its body written as one event to the
/// topic's subscribers by every writer, then answered.
fn publish(
    mut socket: TcpStream,
    mut request: Request,
    mut buf: Vec<u8>,
    writers: &[mpsc::Sender<Job>],
) {
    let _ = socket.set_nodelay(true);
    loop {
        while buf.len() < request.content_length {
            let mut chunk = [0u8; 8192];
            match socket.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let rest = buf.split_off(request.content_length);
        let answer = if request.method == "POST" && request.path() == "/publish" {
            let receivers = send(writers, request.topic().into(), &buf);
            let body = format!("{{\"receivers\":{receivers}}}");
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
        };
        if socket.write_all(answer.as_bytes()).is_err() {
            return;
        }
        match read_head(&mut socket, rest) {
            Some((next, rest)) => (request, buf) = (next, rest),
            None => return,
        }
    }
}

/// Hands the event to every writer and waits until each has written it; how many sockets
/// took it.
fn send(writers: &[mpsc::Sender<Job>], topic: Arc<str>, data: &[u8]) -> usize {
    let frame: Arc<[u8]> = frame(data).into();
    let (done, written) = mpsc::channel();
    for writer in writers {
        let _ = writer.send(Job {
            topic: topic.clone(),
            frame: frame.clone(),
            done: done.clone(),
        });
    }
    drop(done);
    written.iter().sum()
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
        std::thread::spawn(move || serve(listener, 2));
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
}
