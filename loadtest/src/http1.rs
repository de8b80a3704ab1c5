//! The client side of HTTP/1.1 the harness needs, without I/O: base URLs, request bytes for
//! each `--target`, response heads (`httparse`), chunked transfer decoding and pipelined
//! responses with a `Content-Length`. No TLS, no redirects, no compression: the harness only
//! talks to servers it was pointed at.

use anyhow::{bail, Context};

use crate::target::Target;

/// A server's base URL, `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host:port`, for connecting and for the `Host` header.
    pub authority: String,
    /// Path prefix without a trailing slash (empty for the root).
    pub prefix: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> anyhow::Result<BaseUrl> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("{url:?}: only http:// URLs are supported");
        };
        let (authority, prefix) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            bail!("{url:?}: no host");
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(BaseUrl {
            authority,
            prefix: prefix.to_string(),
        })
    }

    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

/// The subscribe request for `target`: the gateway's `GET <prefix>/events?topic=a&topic=b`
/// (with `Last-Event-ID` when resuming), actix's `GET <prefix>/events?topic=a`, nchan's
/// `GET <prefix>/sub/a`. Topic names of a run need no percent-encoding (`layout` makes them of
/// letters, digits and dots); a baseline gets one topic and never a `Last-Event-ID`.
pub fn subscribe_request(
    base: &BaseUrl,
    target: Target,
    topics: &[String],
    last_event_id: Option<&str>,
) -> Vec<u8> {
    let mut out = format!("GET {}", base.prefix);
    match target {
        Target::Gateway => {
            out.push_str("/events?");
            for (i, topic) in topics.iter().enumerate() {
                if i > 0 {
                    out.push('&');
                }
                out.push_str("topic=");
                out.push_str(topic);
            }
        }
        // The reference holds any GET as a stream.
        Target::Actix | Target::Floor | Target::Reference => {
            out.push_str("/events?topic=");
            out.push_str(&topics[0]);
        }
        Target::Nchan => {
            out.push_str("/sub/");
            out.push_str(&topics[0]);
        }
        Target::Mercure => {
            out.push_str("/.well-known/mercure?topic=");
            out.push_str(&topics[0]);
        }
    }
    out.push_str(" HTTP/1.1\r\nHost: ");
    out.push_str(&base.authority);
    out.push_str("\r\nAccept: text/event-stream\r\n");
    if let (Some(id), true) = (last_event_id, target.resumes()) {
        out.push_str("Last-Event-ID: ");
        out.push_str(id);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The publish request for `target`, keeping the connection open for the next one: the
/// gateway's `POST <prefix>/publish` with a JSON body `{"topic","data"}`; for the baselines,
/// `data` as the raw body of actix's `POST <prefix>/publish?topic=NAME` or nchan's
/// `POST <prefix>/pub/NAME`.
pub fn publish_request(base: &BaseUrl, target: Target, topic: &str, data: &str) -> Vec<u8> {
    let (path, content_type, body) = match target {
        Target::Gateway => (
            "/publish".to_string(),
            "application/json",
            serde_json::json!({ "topic": topic, "data": data }).to_string(),
        ),
        // The reference is published to with `go_request` instead, never event by event.
        Target::Actix | Target::Floor | Target::Reference => (
            format!("/publish?topic={topic}"),
            "text/plain",
            data.to_string(),
        ),
        Target::Nchan => (format!("/pub/{topic}"), "text/plain", data.to_string()),
        Target::Mercure => (
            "/.well-known/mercure".to_string(),
            "application/x-www-form-urlencoded",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("topic", topic)
                .append_pair("data", data)
                .finish(),
        ),
    };
    let authorization = match target {
        Target::Mercure => format!("Authorization: Bearer {}\r\n", crate::target::MERCURE_TOKEN),
        _ => String::new(),
    };
    format!(
        "POST {}{path} HTTP/1.1\r\nHost: {}\r\n{authorization}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        base.prefix,
        base.authority,
        body.len()
    )
    .into_bytes()
}

/// `../shared/bench/floor`'s one publish request of a run: `count` events at `rate` a second,
/// answered once the last is written, then closed.
pub fn go_request(base: &BaseUrl, count: u64, rate: u64) -> Vec<u8> {
    format!(
        "POST {}/go?count={count}&rate={rate} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
        base.prefix, base.authority
    )
    .into_bytes()
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    /// Until the server closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// Bytes of the input the head took.
    pub len: usize,
}

/// Parses a response head from the start of `buf`; `None` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> anyhow::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf).context("malformed response head")? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let mut framing = Framing::Close;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if header.value.eq_ignore_ascii_case(b"chunked") {
                framing = Framing::Chunked;
            }
        } else if header.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked
        {
            let text = std::str::from_utf8(header.value).unwrap_or("");
            framing = Framing::Length(text.trim().parse().context("bad Content-Length")?);
        }
    }
    Ok(Some(Head {
        status: response.code.unwrap_or(0),
        framing,
        len,
    }))
}

/// Decodes a chunked body incrementally: bytes in, body bytes out, with only the few bytes of
/// a chunk-size line that straddles two reads kept between calls.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// A chunk-size or trailer line split across reads (a few bytes).
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    /// The CRLF after a chunk's data; the number is how many of its bytes are still due.
    DataEnd(u8),
    Trailers,
    Done,
}

impl Chunked {
    /// Feeds `input`, handing each piece of body to `body`. Returns true once the last chunk
    /// and trailers went by (the response is complete).
    pub fn feed(&mut self, mut input: &[u8], body: &mut impl FnMut(&[u8])) -> anyhow::Result<bool> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size | ChunkState::Trailers => {
                    let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                        self.take_partial_line(input)?;
                        return Ok(false);
                    };
                    let line = self.complete_line(&input[..=nl]);
                    input = &input[nl + 1..];
                    self.state = match self.state {
                        ChunkState::Size => match httparse::parse_chunk_size(&line) {
                            Ok(httparse::Status::Complete((_, 0))) => ChunkState::Trailers,
                            Ok(httparse::Status::Complete((_, size))) => ChunkState::Data(size),
                            _ => bail!("malformed chunk size line"),
                        },
                        _ if line == b"\r\n" || line == b"\n" => ChunkState::Done,
                        _ => ChunkState::Trailers,
                    };
                    self.line.clear();
                }
                ChunkState::Data(left) => {
                    let take = left.min(input.len() as u64) as usize;
                    body(&input[..take]);
                    input = &input[take..];
                    self.state = match left - take as u64 {
                        0 => ChunkState::DataEnd(2),
                        left => ChunkState::Data(left),
                    };
                }
                ChunkState::DataEnd(due) => {
                    let expected: &[u8] = if due == 2 { b"\r\n" } else { b"\n" };
                    if input[0] != expected[0] {
                        bail!("chunk data not followed by CRLF");
                    }
                    input = &input[1..];
                    self.state = if due == 2 {
                        ChunkState::DataEnd(1)
                    } else {
                        ChunkState::Size
                    };
                }
                ChunkState::Done => bail!("bytes after the end of a chunked body"),
            }
        }
        Ok(self.state == ChunkState::Done)
    }

    fn take_partial_line(&mut self, input: &[u8]) -> anyhow::Result<()> {
        if self.line.len() + input.len() > 4096 {
            bail!("chunk size or trailer line too long");
        }
        self.line.extend_from_slice(input);
        Ok(())
    }

    fn complete_line(&mut self, end: &[u8]) -> Vec<u8> {
        let mut line = std::mem::take(&mut self.line);
        line.extend_from_slice(end);
        line
    }
}

/// One complete response with a `Content-Length` at the start of `buf`: its status, its body
/// and the bytes it took; `None` while incomplete. For pipelined `POST /publish` answers.
pub fn parse_sized_response(buf: &[u8]) -> anyhow::Result<Option<(u16, &[u8], usize)>> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let Framing::Length(length) = head.framing else {
        bail!("publish answer without Content-Length");
    };
    let end = head.len + length as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((head.status, &buf[head.len..end], end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_url(input: &str, expected: Option<(&str, &str)>) {
        let got = BaseUrl::parse(input).ok();
        let got = got
            .as_ref()
            .map(|u| (u.authority.as_str(), u.prefix.as_str()));
        assert_eq!(got, expected, "input {input:?}");
    }

    #[test]
    fn base_urls() {
        check_url("http://127.0.0.1:8080", Some(("127.0.0.1:8080", "")));
        check_url("http://127.0.0.1:8080/", Some(("127.0.0.1:8080", "")));
        check_url("http://gw.local/sse/", Some(("gw.local:80", "/sse")));
        check_url("https://gw.local", None);
        check_url("http://", None);
    }

    fn check_request(request: Vec<u8>, start: &str, end: &str) {
        let text = String::from_utf8(request).unwrap();
        assert!(
            text.starts_with(start),
            "{text:?} should start with {start:?}"
        );
        assert!(text.ends_with(end), "{text:?} should end with {end:?}");
    }

    #[test]
    fn subscribe_requests_per_target() {
        let base = BaseUrl::parse("http://h:1/p").unwrap();
        let topics = ["a".to_string(), "b".to_string()];
        check_request(
            subscribe_request(&base, Target::Gateway, &topics, Some("5-0")),
            "GET /p/events?topic=a&topic=b HTTP/1.1\r\nHost: h:1\r\n",
            "Accept: text/event-stream\r\nLast-Event-ID: 5-0\r\n\r\n",
        );
        check_request(
            subscribe_request(&base, Target::Actix, &topics[..1], Some("5-0")),
            "GET /p/events?topic=a HTTP/1.1\r\nHost: h:1\r\n",
            "Accept: text/event-stream\r\n\r\n",
        );
        check_request(
            subscribe_request(&base, Target::Nchan, &topics[..1], None),
            "GET /p/sub/a HTTP/1.1\r\nHost: h:1\r\n",
            "Accept: text/event-stream\r\n\r\n",
        );
        check_request(
            subscribe_request(&base, Target::Mercure, &topics[..1], Some("x")),
            "GET /p/.well-known/mercure?topic=a HTTP/1.1\r\nHost: h:1\r\n",
            "Accept: text/event-stream\r\n\r\n",
        );
    }

    #[test]
    fn the_references_publish_request() {
        let base = BaseUrl::parse("http://h:1/p").unwrap();
        check_request(
            go_request(&base, 1000, 50),
            "POST /p/go?count=1000&rate=50 HTTP/1.1\r\nHost: h:1\r\n",
            "Content-Length: 0\r\n\r\n",
        );
    }

    #[test]
    fn publish_requests_per_target() {
        let base = BaseUrl::parse("http://h:1").unwrap();
        let json = r#"{"data":"{\"t\":0}","topic":"lt.x.0"}"#;
        check_request(
            publish_request(&base, Target::Gateway, "lt.x.0", r#"{"t":0}"#),
            "POST /publish HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json\r\n",
            &format!("Content-Length: {}\r\n\r\n{json}", json.len()),
        );
        check_request(
            publish_request(&base, Target::Actix, "lt.x.0", r#"{"t":0}"#),
            "POST /publish?topic=lt.x.0 HTTP/1.1\r\nHost: h:1\r\nContent-Type: text/plain\r\n",
            "Content-Length: 7\r\n\r\n{\"t\":0}",
        );
        check_request(
            publish_request(&base, Target::Nchan, "lt.x.0", r#"{"t":0}"#),
            "POST /pub/lt.x.0 HTTP/1.1\r\nHost: h:1\r\nContent-Type: text/plain\r\n",
            "Content-Length: 7\r\n\r\n{\"t\":0}",
        );
        let form = "topic=lt.x.0&data=%7B%22t%22%3A0%7D";
        check_request(
            publish_request(&base, Target::Mercure, "lt.x.0", r#"{"t":0}"#),
            &format!(
                "POST /.well-known/mercure HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer {}\r\n",
                crate::target::MERCURE_TOKEN
            ),
            &format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
                form.len()
            ),
        );
    }

    #[test]
    fn heads() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\nrest";
        let head = parse_head(chunked).unwrap().unwrap();
        assert_eq!(
            (head.status, head.framing, &chunked[head.len..]),
            (200, Framing::Chunked, &b"rest"[..])
        );
        let sized = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            parse_head(sized).unwrap().unwrap().framing,
            Framing::Length(2)
        );
        // nchan's EventSource answer: neither chunked nor sized, the body runs until close.
        let nchan = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/event-stream; charset=utf-8\r\nConnection: keep-alive\r\n\r\n: hi\n\n";
        let head = parse_head(nchan).unwrap().unwrap();
        assert_eq!(
            (head.status, head.framing, &nchan[head.len..]),
            (200, Framing::Close, &b": hi\n\n"[..])
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nx: y\r\n").unwrap(), None);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    /// Decodes `wire` fed in pieces of every size from 1 to its length.
    fn check_chunked(wire: &[u8], expected: &[u8], complete: bool) {
        for step in 1..=wire.len() {
            let mut decoder = Chunked::default();
            let mut body = Vec::new();
            let mut done = false;
            for piece in wire.chunks(step) {
                done = decoder
                    .feed(piece, &mut |b| body.extend_from_slice(b))
                    .unwrap();
            }
            assert_eq!((body.as_slice(), done), (expected, complete), "step {step}");
        }
    }

    #[test]
    fn chunked_bodies_in_any_pieces() {
        check_chunked(b"5\r\nhello\r\n", b"hello", false);
        check_chunked(
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
            b"hello world",
            true,
        );
        check_chunked(
            b"a\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"0123456789",
            true,
        );
        let mut decoder = Chunked::default();
        assert!(decoder.feed(b"3\r\nabcX", &mut |_| {}).is_err());
        assert!(Chunked::default().feed(b"zz\r\n", &mut |_| {}).is_err());
    }

    #[test]
    fn pipelined_sized_responses() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n{\"id\":1}HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n{\"id\":";
        let (status, body, used) = parse_sized_response(wire).unwrap().unwrap();
        assert_eq!((status, body), (200, &b"{\"id\":1}"[..]));
        assert_eq!(parse_sized_response(&wire[used..]).unwrap(), None);
    }
}
