//! A worker's relay writes the caught-up streams of a topic itself, one sweep per delivery,
//! instead of waking each stream's task (`gateway/src/fanout/sweep.rs`). A swept stream must look
//! exactly like any other on the wire, and leave the sweep whenever it needs its own task: a
//! client that stops reading, one that leaves, a token that expires, a drain.
//!
//! The first eight members of a topic on a replica receive from its channel directly
//! (`hub::DIRECT_MEMBERS`); only the members after them go through a worker's relay. Each test
//! therefore opens eight "fillers" first. Clients here are blocking sockets read by the test
//! thread; the gateway runs in-process with one worker, so every relayed client shares one
//! relay.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{blocking_http_publish_as, get_json, wait_until, Gateway, WAIT};

/// Members of a topic that receive from its channel before relays take over.
const FILLERS: usize = 8;

/// One SSE client on a raw socket: HTTP/1.1 (chunked) or HTTP/1.0 (the bare stream).
struct Client {
    reader: BufReader<TcpStream>,
    chunked: bool,
    /// Text received but not yet parsed into events.
    text: String,
    /// The stream ended (the last chunk, or the close).
    ended: bool,
}

/// An SSE event as the client parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

impl Client {
    fn open(addr: SocketAddr, query: &str) -> Client {
        Client::open_with(addr, query, Options::default())
    }

    fn open_with(addr: SocketAddr, query: &str, options: Options) -> Client {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if let Some(bytes) = options.receive_buffer {
            // Before connecting, so that the window the client offers is small from the start.
            socket.set_recv_buffer_size(bytes).unwrap();
        }
        socket.connect(&addr.into()).expect("connect");
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let version = if options.http10 { "1.0" } else { "1.1" };
        let auth = options
            .token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET /events?{query} HTTP/{version}\r\nHost: x\r\n{auth}\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.contains(" 200 "), "{head}");
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        assert_eq!(chunked, !options.http10, "{head}");
        let mut client = Client {
            reader,
            chunked,
            text: String::new(),
            ended: false,
        };
        let preamble = client.next_block().expect("the preamble");
        assert!(preamble.starts_with("retry: "), "{preamble}");
        client
    }

    /// The next block of lines up to a blank line, or `None` once the stream ended.
    fn next_block(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block = self.text[..end].to_string();
                self.text.drain(..end + 2);
                return Some(block);
            }
            if self.ended || !self.read_more() {
                self.ended = true;
                return None;
            }
        }
    }

    /// Reads one chunk (or what the socket has, for HTTP/1.0); false at the end.
    fn read_more(&mut self) -> bool {
        if !self.chunked {
            let mut buf = [0u8; 64 * 1024];
            let n = self.reader.read(&mut buf).expect("read");
            self.text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            return n > 0;
        }
        let mut line = String::new();
        if self.reader.read_line(&mut line).expect("chunk size") == 0 {
            return false;
        }
        let size = usize::from_str_radix(line.trim_end(), 16).expect("a chunk size line");
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).unwrap();
        assert_eq!(&chunk[size..], b"\r\n", "chunk terminator");
        chunk.truncate(size);
        self.text.push_str(std::str::from_utf8(&chunk).unwrap());
        size > 0
    }

    /// The next event with data (comments and field-only blocks skipped), or `None` at the end.
    fn next_event(&mut self) -> Option<Event> {
        loop {
            let block = self.next_block()?;
            let mut event = Event {
                id: None,
                event: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    event.id = Some(id.to_string());
                } else if let Some(name) = line.strip_prefix("event: ") {
                    event.event = Some(name.to_string());
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event.data.push_str(data);
                    has_data = true;
                }
            }
            if has_data {
                return Some(event);
            }
        }
    }

    /// The next `n` events; panics if the stream ends first.
    fn events(&mut self, n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                self.next_event()
                    .unwrap_or_else(|| panic!("the stream ended after {i} of {n} events"))
            })
            .collect()
    }

    /// Reads to the end of the stream; returns the events on the way.
    fn rest(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.next_event()).collect()
    }

    /// Closes the sending side, as a client that leaves does (its FIN).
    fn leave(&self) {
        self.reader
            .get_ref()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
    }
}

#[derive(Default)]
struct Options {
    http10: bool,
    /// SO_RCVBUF before connecting: a small window, so that the gateway's writes fill it.
    receive_buffer: Option<usize>,
    token: Option<String>,
}

fn status(gw: &Gateway, counter: &str) -> u64 {
    let (_, status) = get_json(gw.addr, "/status");
    status[counter]
        .as_u64()
        .unwrap_or_else(|| panic!("no {counter} in {status}"))
}

/// The fillers: the first members of `topic`, which receive from its channel directly.
fn fillers(addr: SocketAddr, topic: &str) -> Vec<Client> {
    (0..FILLERS)
        .map(|_| Client::open(addr, &format!("topic={topic}")))
        .collect()
}

fn expected(published: &[(String, String)]) -> Vec<Event> {
    published
        .iter()
        .map(|(id, data)| Event {
            id: Some(id.clone()),
            event: None,
            data: data.clone(),
        })
        .collect()
}

/// `n` streams of `topic` past the fillers (relayed, so swept), HTTP/1.1 and HTTP/1.0 alternating.
fn relayed(addr: SocketAddr, topic: &str, n: usize) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let options = Options {
                http10: i % 2 == 1,
                ..Options::default()
            };
            Client::open_with(addr, &format!("topic={topic}"), options)
        })
        .collect()
}

/// Publishes "event 0" .. "event {n-1}" to `topic` over HTTP: (id, data) of each.
fn publish_numbered(addr: SocketAddr, topic: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let data = format!("event {i}");
            (blocking_http_publish_as(addr, topic, &data, None), data)
        })
        .collect()
}

#[test]
fn swept_streams_get_every_event_once_and_in_order() {
    let gw = Gateway::start(&["--workers", "1"]);
    let mut fillers = fillers(gw.addr, "s");
    // Relayed: HTTP/1.1 and HTTP/1.0 alike.
    let mut swept = relayed(gw.addr, "s", 16);
    let published = publish_numbered(gw.addr, "s", 40);
    let expected = expected(&published);
    for client in fillers.iter_mut().chain(&mut swept) {
        assert_eq!(client.events(40), expected);
    }
    // Every delivery to a relayed stream went out in the sweep; none to the fillers.
    assert_eq!(status(&gw, "events_delivered"), 24 * 40);
    assert_eq!(status(&gw, "events_swept"), 16 * 40);
}

/// More swept streams than a round writes in one step, so every round pauses at least once.
const MANY: usize = sse_gateway::fanout::sweep::STREAMS_PER_STEP + 52;

#[test]
fn a_round_over_more_streams_than_one_step_writes_every_event_once_and_in_order() {
    // Both ends of every connection live in this process.
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("the open-file limit");
    assert!(
        limit >= 3 * MANY as u64,
        "this test needs {} open files; the hard limit is {limit}",
        3 * MANY
    );
    let max_connections = (2 * MANY).to_string();
    let gw = Gateway::start(&["--workers", "1", "--max-connections", &max_connections]);
    let mut fillers = fillers(gw.addr, "many");
    let mut swept = relayed(gw.addr, "many", MANY);
    let published = publish_numbered(gw.addr, "many", 20);
    let expected = expected(&published);
    for client in fillers.iter_mut().chain(&mut swept) {
        assert_eq!(client.events(20), expected);
    }
    assert_eq!(
        status(&gw, "events_delivered"),
        (FILLERS + MANY) as u64 * 20
    );
    assert_eq!(status(&gw, "events_swept"), MANY as u64 * 20);
}

/// Events of 60 KiB published while one client reads nothing.
const SLOW_EVENTS: usize = 100;

#[test]
fn a_stream_that_stops_reading_leaves_the_sweep_and_misses_nothing() {
    let gw = Gateway::start(&["--workers", "1", "--client-buffer", "256"]);
    let mut fillers = fillers(gw.addr, "slow");
    // A client that reads as events come.
    let mut reader = Client::open(gw.addr, "topic=slow");
    let reading = std::thread::spawn(move || {
        let events = reader.events(SLOW_EVENTS);
        (reader, events)
    });
    // A client with a small window that reads nothing until everything is published: the
    // sweep's writes fill its socket, and its own task takes over from there.
    let mut stalled = Client::open_with(
        gw.addr,
        "topic=slow",
        Options {
            receive_buffer: Some(4096),
            ..Options::default()
        },
    );
    // More than the gateway's socket buffer for the client can hold (4 MiB at most here).
    let padding = "x".repeat(60 * 1024);
    let published: Vec<(String, String)> = (0..SLOW_EVENTS)
        .map(|i| {
            let data = format!("{i} {padding}");
            (blocking_http_publish_as(gw.addr, "slow", &data, None), data)
        })
        .collect();
    let expected = expected(&published);
    let (mut reader, events) = reading.join().unwrap();
    assert_eq!(events, expected);
    assert_eq!(
        stalled.events(SLOW_EVENTS),
        expected,
        "the stalled client, once it reads"
    );
    for filler in &mut fillers {
        assert_eq!(filler.events(SLOW_EVENTS), expected);
    }
    let swept = status(&gw, "events_swept") as usize;
    assert!(
        (1..2 * SLOW_EVENTS).contains(&swept),
        "some events swept, not all the stalled client's: {swept}"
    );
    // Caught up again, the stalled client goes on like the others.
    let more: Vec<(String, String)> = (0..5)
        .map(|i| {
            let data = format!("more {i}");
            (blocking_http_publish_as(gw.addr, "slow", &data, None), data)
        })
        .collect();
    let expected = self::expected(&more);
    assert_eq!(reader.events(5), expected);
    assert_eq!(stalled.events(5), expected);
}

#[test]
fn a_client_that_leaves_while_swept_is_closed_and_the_others_go_on() {
    let gw = Gateway::start(&["--workers", "1"]);
    let _fillers = fillers(gw.addr, "leave");
    let mut clients: Vec<Client> = (0..4)
        .map(|_| Client::open(gw.addr, "topic=leave"))
        .collect();
    let first = blocking_http_publish_as(gw.addr, "leave", "before", None);
    for client in &mut clients {
        assert_eq!(client.events(1)[0].id.as_deref(), Some(first.as_str()));
    }
    let open = status(&gw, "connections");
    let mut leaving = clients.remove(0);
    leaving.leave();
    assert!(leaving.rest().is_empty(), "nothing after its FIN");
    wait_until("the stream to close", || {
        status(&gw, "connections") == open - 1
    });
    assert_eq!(status(&gw, "client_left"), 1);
    let second = blocking_http_publish_as(gw.addr, "leave", "after", None);
    for client in &mut clients {
        assert_eq!(client.events(1)[0].id.as_deref(), Some(second.as_str()));
    }
}

#[test]
fn a_swept_stream_ends_when_its_token_expires() {
    const SECRET: &str = "sweep-test-secret-0123456789abcdef";
    let gw = Gateway::start(&[
        "--workers",
        "1",
        "--jwt-secret",
        SECRET,
        "--jwt-leeway",
        "0s",
    ]);
    let token = |expires_in: u64| {
        let claims = serde_json::json!({
            "exp": jsonwebtoken::get_current_timestamp() + expires_in,
            "ssegw": {"subscribe": ["expiry"], "publish": ["expiry"]},
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let open = |expires_in| {
        Client::open_with(
            gw.addr,
            "topic=expiry",
            Options {
                token: Some(token(expires_in)),
                ..Options::default()
            },
        )
    };
    let mut fillers: Vec<Client> = (0..FILLERS).map(|_| open(600)).collect();
    let mut expiring: Vec<Client> = (0..4).map(|_| open(2)).collect();
    let publisher = token(600);
    let id = blocking_http_publish_as(gw.addr, "expiry", "while valid", Some(&publisher));
    let started = Instant::now();
    for client in &mut expiring {
        assert_eq!(client.events(1)[0].id.as_deref(), Some(id.as_str()));
    }
    assert_eq!(
        status(&gw, "events_swept"),
        4,
        "the expiring streams are swept"
    );
    for client in &mut expiring {
        let rest = client.rest();
        assert_eq!(rest.len(), 1, "{rest:?}");
        assert_eq!(rest[0].event.as_deref(), Some("ssegw-expired"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed {:?} after the event",
        started.elapsed()
    );
    assert_eq!(status(&gw, "expired"), 4);
    let later = blocking_http_publish_as(gw.addr, "expiry", "after", Some(&publisher));
    for filler in &mut fillers {
        let got: Vec<Option<String>> = filler.events(2).into_iter().map(|e| e.id).collect();
        assert_eq!(got, [Some(id.clone()), Some(later.clone())]);
    }
}

/// Also: a stream leaves the sweep with a receiver that starts after the sweep's last delivery.
/// One that kept its receiver from before would find it more than `--client-buffer` behind
/// and end as a slow client instead of draining.
#[test]
fn a_drain_ends_swept_streams_within_its_window() {
    let gw = Gateway::start(&[
        "--workers",
        "1",
        "--drain-window",
        "2s",
        "--client-buffer",
        "16",
    ]);
    let _fillers = fillers(gw.addr, "drain");
    let mut clients: Vec<Client> = (0..8)
        .map(|_| Client::open(gw.addr, "topic=drain"))
        .collect();
    let published: Vec<(String, String)> = (0..40)
        .map(|i| {
            let data = format!("before the drain {i}");
            (
                blocking_http_publish_as(gw.addr, "drain", &data, None),
                data,
            )
        })
        .collect();
    let expected = expected(&published);
    for client in &mut clients {
        assert_eq!(client.events(40), expected);
    }
    assert_eq!(status(&gw, "events_swept"), 8 * 40);
    let started = Instant::now();
    gw.begin_drain();
    for client in &mut clients {
        let hint = client.next_block().expect("a reconnection delay");
        assert!(hint.starts_with("retry: "), "{hint}");
        assert_eq!(client.next_block(), None, "the end after it");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "ended {:?} after the drain began",
        started.elapsed()
    );
}
