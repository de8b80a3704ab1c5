//! Limits that protect a replica: connections beyond the maximum get 503 with Retry-After,
//! oversized request heads get 431, and neither harms the streams already open.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use support::{Gateway, Sse};

/// Sends a raw request head; returns the status and the headers and body as text.
fn raw_request(addr: SocketAddr, head: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(support::WAIT)).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the end of the head and the body of a small error reply, or the close.
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&reply);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|l| l.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if reply.len() >= end + 4 + length {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    (text[9..12].parse().expect("status line"), text)
}

#[actix_web::test]
async fn beyond_the_connection_limit_subscribers_get_503_with_retry_after() {
    let gw = Gateway::start(&["--max-connections", "2"]);
    let mut first = Sse::open(&gw, "topic=a", None).await;
    let second = Sse::open(&gw, "topic=b", None).await;

    let (status, reply) = raw_request(
        gw.addr,
        "GET /events?topic=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 503, "{reply}");
    let retry_after: u64 = reply
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("Retry-After header")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after));
    assert!(reply.contains("limit of 2 connections"), "{reply}");
    // Other requests are not limited, and the open streams are unharmed.
    let id = support::http_publish(&gw, "a", "still flowing", None).await;
    assert_eq!(first.next().await.id, id);

    drop(second);
    support::wait_until("a slot to free up", || {
        support::get_json(gw.addr, "/status").1["connections"] == 1
    });
    let _third = Sse::open(&gw, "topic=c", None).await;
    let (_, status) = support::get_json(gw.addr, "/status");
    assert_eq!(status["rejected_at_limit"], 1, "{status}");
    assert_eq!(status["connections"], 2, "{status}");
}

#[actix_web::test]
async fn oversized_request_heads_get_431_and_harm_no_one_else() {
    let gw = Gateway::start(&[]);
    let mut sse = Sse::open(&gw, "topic=h", None).await;

    let huge = format!(
        "GET /events?topic=h HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "f".repeat(200_000)
    );
    assert_eq!(raw_request(gw.addr, &huge).0, 431);

    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /events?topic=h HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(raw_request(gw.addr, &many).0, 431);

    let id = support::http_publish(&gw, "h", "unharmed", None).await;
    assert_eq!(sse.next().await.id, id);
    sse.assert_quiet(Duration::from_millis(100)).await;
}

/// `(soft, hard)` "Max open files" of process `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

#[test]
fn the_gateway_raises_its_open_file_limit_to_the_hard_limit() {
    let port = support::free_port();
    // Started with a soft limit of 256, as a container runtime might.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} --listen 127.0.0.1:{port} --drain-window 0s \\
             --anonymous-subscribe '*'",
            env!("CARGO_BIN_EXE_sse-gateway")
        ))
        .env("SSEGW_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    support::wait_until("the gateway answers", || {
        support::http_status(addr, "GET", "/healthz") == Some(200)
    });
    let (soft, hard) = open_file_limits(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(hard, "256", "the test needs a hard limit above 256");
    assert_eq!(soft, hard, "soft limit not raised");
}
