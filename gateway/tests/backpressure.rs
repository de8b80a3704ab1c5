//! Slow consumers: a client that reads too slowly has its stream ended (it can resume from
//! history) and is counted, and a client that stops reading altogether is dropped after the
//! dead-peer timeout, while a fast client on the same topic receives every event.

mod support;

use std::time::{Duration, Instant};

use support::{Gateway, RedisServer, Sse, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[actix_web::test]
async fn a_slow_reader_is_cut_off_while_a_fast_reader_gets_everything() {
    // More than the kernel buffers one connection on loopback (tcp_wmem max, 4 MiB here), the
    // hub's per-topic buffer (64 events) and actix's write buffer together.
    const EVENTS: usize = 800;
    let redis = RedisServer::start();
    let gw = Gateway::with_redis(&redis, &["--client-buffer", "64"]);

    // The slow client: a tiny receive window, and it reads a little now and then.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /events?topic=firehose HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut slow_raw = Vec::new();
    let mut buf = vec![0u8; 1024];
    while !String::from_utf8_lossy(&slow_raw).contains("retry:") {
        let n = tokio::time::timeout(WAIT, slow.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "slow client closed before its preamble");
        slow_raw.extend_from_slice(&buf[..n]);
    }
    let mut fast = Sse::open(&gw, "topic=firehose", None).await;

    let client = redis.client();
    let publisher = std::thread::spawn(move || {
        let mut conn = client.get_connection().unwrap();
        let padding = "p".repeat(8192);
        for seq in 0..EVENTS {
            let _: String = redis::cmd("FCALL")
                .arg("ssegw_publish")
                .arg(1)
                .arg("firehose")
                .arg(format!("seq:{seq}:{padding}"))
                .query(&mut conn)
                .unwrap();
            // Paced so that the fast reader, a debug build, keeps up.
            std::thread::sleep(Duration::from_millis(1));
        }
    });

    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let slow_task = actix_web::rt::spawn(async move {
        // Reads nothing until the fast reader has everything, then drains what is left.
        let _ = done_rx.await;
        let deadline = Instant::now() + WAIT;
        while !slow_raw.ends_with(b"\r\n0\r\n\r\n") && Instant::now() < deadline {
            match tokio::time::timeout(WAIT, slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => slow_raw.extend_from_slice(&buf[..n]),
            }
        }
        slow_raw
    });

    for seq in 0..EVENTS {
        let event = fast.next().await;
        assert!(
            event.data.starts_with(&format!("seq:{seq}:")),
            "fast reader: expected {seq}"
        );
    }
    publisher.join().unwrap();
    done_tx.send(()).unwrap();

    let slow_raw = slow_task.await.unwrap();
    assert!(
        slow_raw.ends_with(b"\r\n0\r\n\r\n"),
        "the slow client's stream was never ended ({} bytes read)",
        slow_raw.len()
    );
    let text = String::from_utf8_lossy(&slow_raw);
    let seen: Vec<usize> = text
        .split("data: seq:")
        .skip(1)
        .map(|rest| rest.split(':').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        seen.len() < EVENTS,
        "the slow client got everything; it was not slow"
    );
    assert_eq!(
        seen,
        (0..seen.len()).collect::<Vec<_>>(),
        "the slow client saw a gap"
    );
    let (_, status) = support::get_json(gw.addr, "/status");
    assert_eq!(status["slow_disconnects"], 1, "{status}");
}

#[actix_web::test]
async fn a_client_that_stops_reading_is_dropped_after_the_dead_peer_timeout() {
    let gw = Gateway::start(&["--dead-peer-timeout", "1s"]);
    // A stalled client: it sends its request and never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gw.addr).await.unwrap();
    stalled
        .write_all(b"GET /events?topic=stall HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut fast = Sse::open(&gw, "topic=stall", None).await;
    let open = || support::get_json(gw.addr, "/status").1["connections"].clone();
    support::wait_until("both streams open", || open() == 2);

    // Enough to fill every buffer between the replica and the stalled client, but fewer
    // events than the hub buffers, so that only the kernel can tell it is stuck.
    let padding = "p".repeat(60_000);
    for seq in 0..200 {
        support::http_publish(&gw, "stall", &format!("{seq}:{padding}"), None).await;
        assert!(fast.next().await.data.starts_with(&format!("{seq}:")));
    }
    let started = Instant::now();
    support::wait_until("the stalled connection to be dropped", || open() == 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "dropped after {:?}",
        started.elapsed()
    );
    support::http_publish(&gw, "stall", "still here", None).await;
    assert_eq!(fast.next().await.data, "still here");
}
