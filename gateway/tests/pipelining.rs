//! Pipelined publishing on the plain listener: a connection that starts with `POST /publish`
//! has its publishes served together and answered in order (`http::pipeline`), and is handed
//! to actix-http at its first request that is anything else, with nothing lost or reordered.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Gateway, RedisServer, Sse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer read off the connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn publish(topic: &str, data: &str, extra: &str) -> String {
    let body = serde_json::json!({ "topic": topic, "data": data }).to_string();
    format!(
        "POST /publish HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{extra}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads `n` answers (each with a `content-length`); panics if they do not come in 10 s.
async fn answers(socket: &mut TcpStream, n: usize, input: &mut Vec<u8>) -> Vec<Answer> {
    let mut out = Vec::new();
    let read = async {
        while out.len() < n {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(input).unwrap() {
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8(h.value.to_vec()).unwrap();
                        (h.name.to_string(), value)
                    })
                    .collect();
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .expect("an answer with a content-length");
                if input.len() >= head + length {
                    let body = String::from_utf8(input[head..head + length].to_vec()).unwrap();
                    out.push(Answer {
                        status: response.code.unwrap(),
                        headers,
                        body,
                    });
                    input.drain(..head + length);
                    continue;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let got = socket.read(&mut chunk).await.expect("read");
            assert!(got > 0, "the connection closed after {} answers", out.len());
            input.extend_from_slice(&chunk[..got]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the answers within 10 s");
    out
}

/// The connection is closed by the gateway (after what was already read) within `limit`.
async fn closes(socket: &mut TcpStream, limit: Duration) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, socket.read_to_end(&mut rest))
        .await
        .expect("the gateway closes the connection");
    assert!(
        read.is_ok() && rest.is_empty(),
        "{read:?}: {}",
        String::from_utf8_lossy(&rest)
    );
}

/// A hundred publishes written at once on one connection, one of them invalid: each answered
/// in its place, the valid ones stored and delivered in the order sent; then, on the same
/// connection, a request of another kind (served by actix-http from there on), more publishes
/// and one that asks to close.
async fn pipelined(gw: &Gateway, redis: Option<&RedisServer>) {
    let mut sse = Sse::open(gw, "topic=piped", None).await;
    sse.baseline().await;
    let mut socket = TcpStream::connect(gw.addr).await.unwrap();
    let mut requests = String::new();
    for i in 0..100 {
        requests += &if i == 50 {
            publish("not a topic!", "refused", "")
        } else {
            publish(
                "piped",
                &format!("event {i}"),
                &format!("X-Request-Id: r{i}\r\n"),
            )
        };
    }
    socket.write_all(requests.as_bytes()).await.unwrap();
    let mut input = Vec::new();
    let answered = answers(&mut socket, 100, &mut input).await;
    let mut ids = Vec::new();
    for (i, answer) in answered.iter().enumerate() {
        if i == 50 {
            assert_eq!(answer.status, 400, "{answer:?}");
            assert!(answer.json()["error"].as_str().unwrap().contains("topic"));
            continue;
        }
        assert_eq!(answer.status, 200, "{i}: {answer:?}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert!(answer.header("date").is_some(), "{answer:?}");
        ids.push(answer.json()["id"].as_str().unwrap().to_string());
    }
    let events = sse.take(99).await;
    let delivered: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.id.as_str(), e.data.as_str()))
        .collect();
    let expected: Vec<String> = (0..100)
        .filter(|&i| i != 50)
        .map(|i| format!("event {i}"))
        .collect();
    let expected: Vec<(&str, &str)> = ids
        .iter()
        .map(String::as_str)
        .zip(expected.iter().map(String::as_str))
        .collect();
    assert_eq!(
        delivered, expected,
        "delivered in the order sent, with the answered ids"
    );
    if let Some(redis) = redis {
        let stored: Vec<(String, Vec<(String, String)>)> = redis
            .cmd(
                redis::cmd("XRANGE")
                    .arg("ssegw:s:{piped}")
                    .arg("-")
                    .arg("+"),
            )
            .unwrap();
        let stored: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(stored, ids, "stored once each, in the order sent");
    }

    // Another kind of request, then publishes again: actix-http's from the health check on.
    let more = "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n".to_string()
        + &publish("piped", "after", "")
        + &publish("piped", "last", "Connection: close\r\n");
    socket.write_all(more.as_bytes()).await.unwrap();
    let answered = answers(&mut socket, 3, &mut input).await;
    let statuses: Vec<u16> = answered.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 200], "{answered:?}");
    let after: Vec<String> = sse.take(2).await.into_iter().map(|e| e.data).collect();
    assert_eq!(after, ["after", "last"]);
    assert_eq!(answered[2].header("connection"), Some("close"));
    assert!(input.is_empty());
    closes(&mut socket, Duration::from_secs(5)).await;
}

#[actix_web::test]
async fn pipelined_publishes_on_redis() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &[]);
    pipelined(&gw, Some(&redis)).await;
}

/// A connection's pipelined publishes are in flight together: with Redis holding writes back
/// (`CLIENT PAUSE WRITE`), the first `FCALL` waits in Redis and the others have reached it
/// behind it, on the same connection, instead of each waiting for the answer before it; once
/// Redis goes on, each is answered in order.
#[actix_web::test]
async fn pipelined_publishes_reach_redis_together() {
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &[]);
    let mut sse = Sse::open(&gw, "topic=together", None).await;
    sse.baseline().await;
    let () = redis
        .cmd(redis::cmd("CLIENT").arg("PAUSE").arg(10_000).arg("WRITE"))
        .unwrap();
    let mut socket = TcpStream::connect(gw.addr).await.unwrap();
    let requests: String = (0..10)
        .map(|i| publish("together", &format!("e{i}"), ""))
        .collect();
    socket.write_all(requests.as_bytes()).await.unwrap();
    // Redis stops reading a client whose command is held: the rest stay in its query buffer.
    support::wait_until("publishes queued in Redis behind the held one", || {
        let clients: String = redis.cmd(redis::cmd("CLIENT").arg("LIST")).unwrap();
        clients.lines().any(|client| {
            client.contains("cmd=fcall")
                && client
                    .split(' ')
                    .find_map(|field| field.strip_prefix("qbuf="))
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|queued| queued > 0)
        })
    });
    let () = redis.cmd(redis::cmd("CLIENT").arg("UNPAUSE")).unwrap();
    let answered = answers(&mut socket, 10, &mut Vec::new()).await;
    assert!(answered.iter().all(|a| a.status == 200), "{answered:?}");
    let data: Vec<String> = sse.take(10).await.into_iter().map(|e| e.data).collect();
    let sent: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    assert_eq!(data, sent);
}

#[actix_web::test]
async fn pipelined_publishes_on_the_embedded_bus() {
    let gw = Gateway::start(&[]);
    pipelined(&gw, None).await;
}

/// A publish sent a byte at a time is served, and so is one whose parts come further apart in
/// all than the keep-alive; one whose body is larger than the pipeline takes goes to
/// actix-http, which answers it as it answers any; a connection that sends part of a request
/// and stops is answered 408 and closed; one that goes idle is closed.
#[actix_web::test]
async fn slow_large_and_idle_publishers() {
    let gw = Gateway::start(&["--max-event-bytes", "1000"]);
    let mut input = Vec::new();

    let mut socket = TcpStream::connect(gw.addr).await.unwrap();
    for byte in publish("slow", "one byte at a time", "").bytes() {
        socket.write_all(&[byte]).await.unwrap();
        socket.flush().await.unwrap();
    }
    let answered = answers(&mut socket, 1, &mut input).await;
    assert_eq!(answered[0].status, 200, "{answered:?}");
    // Idle after its answers: closed after the keep-alive (5 s).
    closes(&mut socket, Duration::from_secs(8)).await;

    // Slower than the keep-alive as a whole, but never idle that long: served.
    let mut socket = TcpStream::connect(gw.addr).await.unwrap();
    let trickled = publish("trickled", "in three parts, 3 s apart", "");
    let third = trickled.len() / 3;
    for part in [
        &trickled[..third],
        &trickled[third..2 * third],
        &trickled[2 * third..],
    ] {
        socket.write_all(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let answered = answers(&mut socket, 1, &mut input).await;
    assert_eq!(answered[0].status, 200, "{answered:?}");

    let mut socket = TcpStream::connect(gw.addr).await.unwrap();
    let large = "x".repeat(70 * 1024);
    let requests = publish("large", "small", "") + &publish("large", &large, "");
    socket.write_all(requests.as_bytes()).await.unwrap();
    let answered = answers(&mut socket, 2, &mut input).await;
    assert_eq!(answered[0].status, 200, "{answered:?}");
    assert_eq!(answered[1].status, 413, "{:?}", answered[1].body);

    let mut socket = TcpStream::connect(gw.addr).await.unwrap();
    let partial = publish("cut", "short", "");
    socket
        .write_all(&partial.as_bytes()[..partial.len() - 3])
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), socket.read_to_end(&mut rest))
        .await
        .expect("closed within 8 s")
        .unwrap();
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 408 "), "{rest}");
}
