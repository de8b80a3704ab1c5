//! Pipelined publishing: on the plain listener, a connection whose first request is
//! `POST /publish` is read here, and each of its publishes is handed to the app as soon as it
//! is read, many at once, with the answers written back in order, several per write.
//!
//! actix-http's HTTP/1 dispatcher calls the app for one request of a connection at a time: the
//! next request waits until the previous answer is out. A service that pipelines its publishes
//! on a few connections then has a few publishes in flight, each waiting for its Redis round
//! trip, and the worker sleeps and wakes about three times per event (BENCHMARKS.md,
//! "pipelined publishing"). Here a connection's publishes run together, so their Redis calls
//! share writes and the worker's wake-ups, as they would from many connections.
//!
//! Only what is plainly a publish is served here: `POST /publish` in HTTP/1.1 with its body
//! whole in `Content-Length` (at most [`MAX_BODY`]), no `Expect`, `Upgrade` or
//! `Transfer-Encoding`. The first request that is anything else, or that does not parse, waits
//! for the answers before it and then gets the connection, with every byte not yet used, handed
//! to actix-http for the rest of the connection's life. The requests go to the same app (a
//! second instance of it on the worker, sharing its state) with the same head, body and peer
//! address, so handlers, middleware and errors are the same either way.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use actix_http::body::{BoxBody, MessageBody};
use actix_http::header::{HeaderName, HeaderValue};
use actix_http::{ConnectionType, Method, Payload, Request, Response, Uri, Version};
use actix_service::Service;
use actix_web::rt::net::TcpStream;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};

/// The start of a connection that is served here.
const PUBLISH: &[u8] = b"POST /publish";

/// Bytes of a connection's start to peek at before choosing (`PUBLISH` and what follows it).
pub const PEEK: usize = PUBLISH.len() + 1;

/// The largest body taken here: a larger one is actix-http's to stream (and refuse).
pub const MAX_BODY: usize = 64 * 1024;

/// Publishes of one connection in flight at once, at most (unless the listener says fewer);
/// beyond that the connection is not read until answers go out.
pub const MAX_IN_FLIGHT: usize = 256;

/// Headers a request may have to be served here.
const MAX_HEADERS: usize = 64;

/// How long a connection may stay idle between requests (actix-http's keep-alive), and how long a
/// request's head and body may take to arrive (its request timeout).
const IDLE: Duration = Duration::from_secs(5);

/// Whether a connection that starts with `first` is served here.
pub fn starts_publishing(first: &[u8]) -> bool {
    first.len() == PEEK && first.starts_with(PUBLISH) && matches!(first[PUBLISH.len()], b' ' | b'?')
}

/// How a connection served here ended.
pub enum Ended {
    /// Closed (the client left, asked to close, timed out, or a write failed).
    Closed,
    /// For actix-http from here on: the socket, and the bytes read from it but not yet used.
    HandOver(TcpStream, Bytes),
}

/// An answer, encoded, and whether the connection closes after it.
struct Answer {
    bytes: Bytes,
    close: bool,
}

type Pending = Pin<Box<dyn Future<Output = Answer>>>;

/// Serves `socket`'s publishes with `app`, at most `max_in_flight` at once, until the connection
/// ends or a request that is not a plain publish comes.
///
/// A topic's events are stored in the order their requests came: each publish is started in
/// turn and reaches its Redis call without waiting for anything (its body is whole), and the
/// calls go out on the bus's connection in that order (tokio's channels and semaphores serve
/// waiters first come, first served). The listener passes `max_in_flight` 1 where that does not hold
/// (`--publish-replicas`: each publish waits for a connection of its own).
pub async fn serve<S, B>(
    socket: TcpStream,
    peer: Option<SocketAddr>,
    app: Rc<S>,
    max_in_flight: usize,
) -> Ended
where
    S: Service<Request> + 'static,
    S::Response: Into<Response<B>>,
    S::Error: Into<Response<BoxBody>>,
    S::Future: 'static,
    B: MessageBody + 'static,
{
    let mut input = BytesMut::with_capacity(8 * 1024);
    let mut output = BytesMut::new();
    let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
    // No more requests are taken: the next one is actix-http's, or the client asked to close
    // or stopped sending.
    let mut done_reading = false;
    let mut hand_over = false;
    let mut closing = false;
    let mut deadline = tokio::time::Instant::now() + IDLE;
    loop {
        while !done_reading && in_flight.len() < max_in_flight {
            match parse(&input, peer) {
                Parsed::Partial => break,
                Parsed::NotHere => {
                    (done_reading, hand_over) = (true, true);
                }
                Parsed::Publish {
                    request,
                    used,
                    close,
                } => {
                    input.advance(used);
                    done_reading = close;
                    let call = app.call(request);
                    in_flight.push_back(Box::pin(answer(call, close)));
                    deadline = tokio::time::Instant::now() + IDLE;
                }
            }
        }
        if in_flight.is_empty() && output.is_empty() && (done_reading || closing) {
            return if hand_over && !closing {
                Ended::HandOver(socket, input.freeze())
            } else {
                Ended::Closed
            };
        }
        // Idle (nothing owed) with nothing or part of a request in: it has until the deadline.
        let waiting = in_flight.is_empty() && output.is_empty();
        tokio::select! {
            Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                let mut answer = first;
                loop {
                    output.extend_from_slice(&answer.bytes);
                    if answer.close {
                        // Nothing after it is answered; what is in flight is dropped.
                        (closing, done_reading) = (true, true);
                        in_flight = FuturesOrdered::new();
                        break;
                    }
                    // Every answer already done goes out in the same write.
                    match futures_util::FutureExt::now_or_never(in_flight.next()) {
                        Some(Some(next)) => answer = next,
                        _ => break,
                    }
                }
                deadline = tokio::time::Instant::now() + IDLE;
            }
            writable = socket.writable(), if !output.is_empty() => {
                if writable.is_err() {
                    return Ended::Closed;
                }
                match socket.try_write(&output) {
                    Ok(n) => output.advance(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Ended::Closed,
                }
            }
            readable = socket.readable(), if !done_reading && in_flight.len() < max_in_flight => {
                if readable.is_err() {
                    return Ended::Closed;
                }
                input.reserve(8 * 1024);
                match socket.try_read_buf(&mut input) {
                    // The client stopped sending: what it sent is still answered.
                    Ok(0) => done_reading = true,
                    // A request still coming in has until the input stops for `IDLE`.
                    Ok(_) => deadline = tokio::time::Instant::now() + IDLE,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Ended::Closed,
                }
            }
            () = tokio::time::sleep_until(deadline), if waiting => {
                if !input.is_empty() {
                    // Part of a request, too slow: actix-http's answer to that.
                    let _ = socket.try_write(
                        b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                }
                return Ended::Closed;
            }
        }
    }
}

/// What the start of `input` is.
enum Parsed {
    /// Not all of it is in yet.
    Partial,
    /// Not a plain publish (or not HTTP): actix-http's.
    NotHere,
    /// A whole publish, `used` bytes of the input; the connection closes after its answer.
    Publish {
        request: Request,
        used: usize,
        close: bool,
    },
}

fn parse(input: &[u8], peer: Option<SocketAddr>) -> Parsed {
    if input.is_empty() {
        return Parsed::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let head_len = match head.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        // A head longer than actix-http's buffer is actix-http's to refuse.
        Ok(httparse::Status::Partial) if input.len() < 32 * 1024 => return Parsed::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Parsed::NotHere,
    };
    let is_publish = head.method == Some("POST")
        && head.version == Some(1)
        && head
            .path
            .is_some_and(|path| path == "/publish" || path.starts_with("/publish?"));
    if !is_publish {
        return Parsed::NotHere;
    }
    let mut body_len = None;
    let mut close = false;
    for header in head.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match (length, body_len) {
                (Some(length), None) if length <= MAX_BODY => body_len = Some(length),
                // Too large, repeated or not a number: actix-http streams, refuses or answers.
                _ => return Parsed::NotHere,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::NotHere;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in String::from_utf8_lossy(header.value).split(',') {
                match token.trim().to_ascii_lowercase().as_str() {
                    "close" => close = true,
                    "keep-alive" | "" => {}
                    _ => return Parsed::NotHere,
                }
            }
        }
    }
    let body_len = body_len.unwrap_or(0);
    if input.len() < head_len + body_len {
        return Parsed::Partial;
    }
    let Some(uri) = head.path.and_then(|path| Uri::try_from(path).ok()) else {
        return Parsed::NotHere;
    };
    let body = Bytes::copy_from_slice(&input[head_len..head_len + body_len]);
    let mut request = Request::with_payload(Payload::from(body));
    let request_head = request.head_mut();
    request_head.method = Method::POST;
    request_head.uri = uri;
    request_head.version = Version::HTTP_11;
    request_head.peer_addr = peer;
    for header in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return Parsed::NotHere;
        };
        request_head.headers.append(name, value);
    }
    if close {
        request_head.set_connection_type(ConnectionType::Close);
    }
    Parsed::Publish {
        request,
        used: head_len + body_len,
        close,
    }
}

/// The app's answer to a request, encoded as HTTP/1.1 (an error is answered as actix-http would,
/// from its response). `close`: the client asked to close after it.
async fn answer<F, R, E, B>(call: F, close: bool) -> Answer
where
    F: Future<Output = Result<R, E>>,
    R: Into<Response<B>>,
    E: Into<Response<BoxBody>>,
    B: MessageBody,
{
    match call.await {
        Ok(response) => encode(response.into(), close).await,
        Err(error) => encode(error.into(), close).await,
    }
}

async fn encode<B: MessageBody>(response: Response<B>, close: bool) -> Answer {
    let (response, body) = response.into_parts();
    let close = close || response.head().connection_type() == ConnectionType::Close;
    let Ok(body) = actix_http::body::to_bytes(body).await else {
        // The body failed half-way: as actix-http, the connection ends.
        return Answer {
            bytes: Bytes::new(),
            close: true,
        };
    };
    let head = response.head();
    let mut out = BytesMut::with_capacity(160 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(head.reason().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.headers.iter() {
        if name == actix_http::header::CONTENT_LENGTH
            || name == actix_http::header::CONNECTION
            || name == actix_http::header::TRANSFER_ENCODING
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
    Answer {
        bytes: out.freeze(),
        close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_publishes_are_served_here() {
        assert!(starts_publishing(b"POST /publish?"));
        assert!(starts_publishing(b"POST /publish "));
        assert!(!starts_publishing(b"POST /publishe"));
        assert!(!starts_publishing(b"POST /publish"));
        assert!(!starts_publishing(b"GET /events?to"));

        let publish = |extra: &str, body: &str| {
            format!(
                "POST /publish?topic=a HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let text = publish("X-Request-Id: 7\r\n", r#"{"data":1}"#);
        match parse(text.as_bytes(), None) {
            Parsed::Publish {
                request,
                used,
                close,
            } => {
                assert_eq!(used, text.len());
                assert!(!close);
                assert_eq!(request.method(), Method::POST);
                assert_eq!(request.uri().query(), Some("topic=a"));
                assert_eq!(request.head().headers.get("x-request-id").unwrap(), "7");
            }
            _ => panic!("a plain publish is served here"),
        }
        // Parts of one: wait for the rest.
        for cut in [1, 20, text.len() - 1] {
            assert!(matches!(
                parse(&text.as_bytes()[..cut], None),
                Parsed::Partial
            ));
        }
        assert!(matches!(
            parse(publish("Connection: close\r\n", "{}").as_bytes(), None),
            Parsed::Publish { close: true, .. }
        ));
        for not_here in [
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            "POST /publish HTTP/1.0\r\nContent-Length: 0\r\n\r\n".to_string(),
            "POST /publishers HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_string(),
            publish("Expect: 100-continue\r\n", "{}"),
            publish("Transfer-Encoding: chunked\r\n", "{}"),
            publish("Content-Length: 2\r\n", "{}"),
            publish("Connection: upgrade\r\n", "{}"),
            format!(
                "POST /publish?topic=a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            ),
            "\x16\x03\x01\x02\x00 not http\r\n\r\n".to_string(),
        ] {
            assert!(
                matches!(parse(not_here.as_bytes(), None), Parsed::NotHere),
                "{not_here:?}"
            );
        }
    }
}
