//! On a plain-HTTP listener an event stream leaves actix-http once its head is out, and the
//! gateway writes its chunks itself (`gateway/src/http/handoff.rs`). What clients see on the wire:
//! a chunked HTTP/1.1 response that ends with the last chunk, after other requests on the same
//! connection too; HTTP/1.0 clients, which have no chunks, get the bare stream, ended by the
//! close. Both on a plain listener and on one that also takes h2c.

mod support;

use std::io::{BufRead, BufReader, Read, Write};

use support::{get_json, http_publish, Gateway, RawChunks};

const SUBSCRIBE: &str = "GET /events?topic=wire HTTP/1.1\r\nHost: x\r\n";

fn text(chunk: Vec<u8>) -> String {
    String::from_utf8(chunk).expect("UTF-8 chunk")
}

#[actix_web::test]
async fn a_stream_is_chunked_and_ends_with_the_last_chunk_and_a_close() {
    chunked_stream_ending_with_a_close(&["--drain-window", "1s"]).await;
}

/// An h2c listener tells HTTP/1 from HTTP/2 by the first bytes and hands HTTP/1.1 streams off
/// all the same (`tests/http2.rs` runs HTTP/2 on it).
#[actix_web::test]
async fn http11_streams_on_an_h2c_listener_are_handed_off_too() {
    chunked_stream_ending_with_a_close(&["--drain-window", "1s", "--h2c", "true"]).await;
}

async fn chunked_stream_ending_with_a_close(flags: &[&str]) {
    let gw = Gateway::start(flags);
    let mut stream = RawChunks::open(gw.addr, SUBSCRIBE);
    assert!(
        stream.head.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        stream.head
    );
    assert_eq!(stream.header("transfer-encoding"), Some("chunked"));
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("cache-control"), Some("no-cache"));
    assert_eq!(stream.header("connection"), Some("close"));
    assert_eq!(stream.header("content-length"), None);

    let preamble = text(stream.next());
    assert!(preamble.starts_with("retry: "), "{preamble}");
    for data in ["one", "two"] {
        let id = http_publish(&gw, "wire", data, None).await;
        assert_eq!(text(stream.next()), format!("id: {id}\ndata: {data}\n\n"));
    }

    gw.begin_drain();
    let hint = text(stream.next());
    assert!(
        hint.starts_with("retry: "),
        "the drain's reconnection delay: {hint}"
    );
    assert_eq!(stream.next(), b"", "the last chunk");
    assert!(
        stream.at_end(),
        "the connection closes after the last chunk"
    );
}

#[actix_web::test]
async fn a_connection_that_served_other_requests_then_streams() {
    let gw = Gateway::start(&[]);
    let socket = std::net::TcpStream::connect(gw.addr).unwrap();
    socket.set_read_timeout(Some(support::WAIT)).unwrap();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut writer = socket;

    // Two requests on the connection, each answered in full, before it subscribes.
    for _ in 0..2 {
        writer
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let head = read_head(&mut reader);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "kept alive: {head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a sized reply")
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        assert!(String::from_utf8(body).unwrap().contains("alive"));
    }

    writer
        .write_all(format!("{SUBSCRIBE}\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut reader);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let preamble = read_chunk(&mut reader);
    assert!(preamble.starts_with("retry: "), "{preamble}");
    let id = http_publish(&gw, "wire", "after two requests", None).await;
    assert_eq!(
        read_chunk(&mut reader),
        format!("id: {id}\ndata: after two requests\n\n")
    );
}

#[actix_web::test]
async fn http10_clients_get_a_stream_that_ends_at_the_close() {
    let gw = Gateway::start(&["--drain-window", "1s"]);
    let mut socket = std::net::TcpStream::connect(gw.addr).unwrap();
    socket.set_read_timeout(Some(support::WAIT)).unwrap();
    socket
        .write_all(b"GET /events?topic=wire HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(socket);
    let head = read_head(&mut reader);
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(
        !head.contains("transfer-encoding"),
        "no chunks for HTTP/1.0: {head}"
    );
    assert!(!head.contains("content-length"), "{head}");
    let mut preamble = String::new();
    while preamble.is_empty() || !preamble.ends_with("\n\n") {
        reader.read_line(&mut preamble).unwrap();
    }
    assert!(preamble.starts_with("retry: "), "{preamble}");

    let id = http_publish(&gw, "wire", "one-oh", None).await;
    let mut event = String::new();
    while !event.ends_with("\n\n") {
        reader.read_line(&mut event).unwrap();
    }
    assert_eq!(event, format!("id: {id}\ndata: one-oh\n\n"));

    gw.begin_drain();
    let mut rest = String::new();
    reader
        .read_to_string(&mut rest)
        .expect("the close ends the stream");
    assert!(
        rest.starts_with("retry: "),
        "the drain's reconnection delay: {rest:?}"
    );
    assert!(rest.ends_with("\n\n"), "{rest:?}");
}

#[actix_web::test]
async fn a_client_that_closes_its_side_ends_its_stream() {
    let gw = Gateway::start(&[]);
    let mut stream = RawChunks::open(gw.addr, SUBSCRIBE);
    stream.next();
    assert_eq!(get_json(gw.addr, "/status").1["connections"], 1);

    stream.stop_sending();
    support::wait_until("the stream to close", || {
        let status = get_json(gw.addr, "/status").1;
        status["connections"] == 0 && status["client_left"] == 1
    });
    assert!(stream.at_end(), "the gateway closes its side too");
    // The replica goes on serving.
    let mut next = RawChunks::open(gw.addr, SUBSCRIBE);
    next.next();
    let id = http_publish(&gw, "wire", "still here", None).await;
    assert_eq!(text(next.next()), format!("id: {id}\ndata: still here\n\n"));
}

/// Reads a response head, up to and without the blank line.
fn read_head(reader: &mut impl BufRead) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            return head;
        }
        head.push_str(&line);
    }
}

/// Reads one HTTP/1.1 chunk's data as text.
fn read_chunk(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let size = usize::from_str_radix(line.trim_end(), 16).expect("a chunk size line");
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).unwrap();
    chunk.truncate(size);
    String::from_utf8(chunk).unwrap()
}
