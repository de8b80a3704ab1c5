//! The fault-injection proxy of the test support, proven against a real `redis-server`:
//! plain forwarding, cut, blackhole, delay and the connection count.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{wait_until, RedisServer};

/// Longer than any step of these tests should take; a failure is reported well before it.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long silence must last to count as "nothing gets through".
const QUIET: Duration = Duration::from_millis(300);

fn start() -> (RedisServer, Proxy) {
    let redis = RedisServer::start();
    let upstream: SocketAddr = ([127, 0, 0, 1], redis.port).into();
    let proxy = Proxy::start(upstream);
    (redis, proxy)
}

fn connect(proxy: &Proxy) -> redis::RedisResult<redis::Connection> {
    let conn = redis::Client::open(proxy.redis_url())?.get_connection_with_timeout(TIMEOUT)?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    Ok(conn)
}

fn ping(conn: &mut redis::Connection) -> redis::RedisResult<String> {
    redis::cmd("PING").query(conn)
}

/// A plain socket through the proxy, for watching bytes that the redis client would hide.
fn raw(proxy: &Proxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr).expect("connect to proxy");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

/// Reads exactly `expected.len()` bytes and asserts they are `expected`.
fn expect_bytes(stream: &mut TcpStream, expected: &str) {
    let mut buf = vec![0; expected.len()];
    stream
        .read_exact(&mut buf)
        .expect("reply through the proxy");
    assert_eq!(String::from_utf8_lossy(&buf), expected);
}

/// Asserts that nothing arrives within `QUIET` and that the connection is still open.
fn expect_silence(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Ok(0) => panic!("connection closed, expected silence"),
        Ok(n) => panic!("received {:?}, expected silence", &buf[..n]),
        Err(e) => panic!("read failed ({e}), expected silence"),
    }
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
}

#[test]
fn ping_and_a_large_value_pass_through_intact() {
    let (_redis, proxy) = start();
    let mut conn = connect(&proxy).unwrap();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");

    // 1 MiB that is not periodic in any chunk size, so reordered or lost chunks show.
    let value: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let () = redis::cmd("SET")
        .arg("big")
        .arg(&value)
        .query(&mut conn)
        .unwrap();
    let back: Vec<u8> = redis::cmd("GET").arg("big").query(&mut conn).unwrap();
    assert!(back == value, "1 MiB value came back altered");
}

#[test]
fn cut_closes_open_connections_and_refuses_new_ones_until_restore() {
    let (_redis, proxy) = start();
    let mut conn = connect(&proxy).unwrap();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");

    proxy.cut();
    assert_eq!(proxy.open_connections(), 0);
    let started = Instant::now();
    let err = ping(&mut conn).expect_err("a command on a cut connection fails");
    assert!(
        !err.is_timeout() && started.elapsed() < Duration::from_secs(1),
        "the cut connection should fail at once, not time out: {err} after {:?}",
        started.elapsed()
    );
    assert!(
        connect(&proxy).and_then(|mut c| ping(&mut c)).is_err(),
        "new connections fail while cut"
    );

    proxy.restore();
    let mut fresh = connect(&proxy).unwrap();
    assert_eq!(ping(&mut fresh).unwrap(), "PONG");
}

#[test]
fn blackhole_times_out_commands_but_keeps_the_connection_open() {
    let (_redis, proxy) = start();
    let mut conn = connect(&proxy).unwrap();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");

    proxy.blackhole();
    conn.set_read_timeout(Some(QUIET)).unwrap();
    let err = ping(&mut conn).expect_err("no reply through a blackhole");
    assert!(err.is_timeout(), "expected a timeout, got {err}");
    assert_eq!(proxy.open_connections(), 1, "a blackhole closes nothing");

    // After a read timeout the client may be out of step with the stream; a new connection
    // shows that the link works again.
    proxy.restore();
    let mut fresh = connect(&proxy).unwrap();
    assert_eq!(ping(&mut fresh).unwrap(), "PONG");
}

#[test]
fn blackhole_holds_bytes_both_ways_and_delivers_them_on_restore() {
    let (redis, proxy) = start();

    // Client to Redis, on a connection opened before the blackhole and on one opened during it.
    let mut before = raw(&proxy);
    before.write_all(b"PING\r\n").unwrap();
    expect_bytes(&mut before, "+PONG\r\n");
    proxy.blackhole();
    let mut during = raw(&proxy);
    before.write_all(b"PING\r\n").unwrap();
    during.write_all(b"ECHO held\r\n").unwrap();
    expect_silence(&mut before);
    expect_silence(&mut during);
    proxy.restore();
    expect_bytes(&mut before, "+PONG\r\n");
    expect_bytes(&mut during, "$4\r\nheld\r\n");

    // Redis to client: a message published while the link is down arrives after it heals.
    let mut subscriber = raw(&proxy);
    subscriber.write_all(b"SUBSCRIBE news\r\n").unwrap();
    expect_bytes(
        &mut subscriber,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n",
    );
    proxy.blackhole();
    let receivers: i64 = redis
        .cmd(redis::cmd("PUBLISH").arg("news").arg("hello"))
        .unwrap();
    assert_eq!(receivers, 1, "Redis still sees the subscriber");
    expect_silence(&mut subscriber);
    assert_eq!(proxy.open_connections(), 3);
    proxy.restore();
    expect_bytes(
        &mut subscriber,
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n",
    );

    // The connections carry on.
    before.write_all(b"PING\r\n").unwrap();
    expect_bytes(&mut before, "+PONG\r\n");
}

#[test]
fn delay_adds_latency_both_ways_and_keeps_order() {
    let (_redis, proxy) = start();
    let mut conn = connect(&proxy).unwrap();
    let latency = Duration::from_millis(200);

    proxy.delay(latency);
    let started = Instant::now();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");
    let round_trip = started.elapsed();
    assert!(
        round_trip >= 2 * latency,
        "a round trip crosses the delay twice, took {round_trip:?}"
    );

    // A pipeline of many commands and replies comes through delayed, whole and in order.
    let mut pipe = redis::pipe();
    for _ in 0..200 {
        pipe.cmd("INCR").arg("counter");
    }
    let started = Instant::now();
    let counts: Vec<i64> = pipe.query(&mut conn).unwrap();
    assert_eq!(counts, (1..=200).collect::<Vec<_>>());
    assert!(started.elapsed() >= 2 * latency);

    proxy.delay(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(ping(&mut conn).unwrap(), "PONG");
    assert!(
        started.elapsed() < latency,
        "without delay a PING is fast, took {:?}",
        started.elapsed()
    );
}

#[test]
fn open_connections_counts_connections_and_drops_to_zero_on_cut() {
    let (_redis, proxy) = start();
    assert_eq!(proxy.open_connections(), 0);

    // A reply proves the proxy has registered the connection it came through.
    let mut first = connect(&proxy).unwrap();
    let mut second = connect(&proxy).unwrap();
    assert_eq!(ping(&mut first).unwrap(), "PONG");
    assert_eq!(ping(&mut second).unwrap(), "PONG");
    assert_eq!(proxy.open_connections(), 2);

    drop(first);
    wait_until("the closed connection to leave the count", || {
        proxy.open_connections() == 1
    });

    proxy.cut();
    assert_eq!(proxy.open_connections(), 0);
    assert!(ping(&mut second).is_err());
}

#[test]
fn dropping_the_proxy_closes_its_connections() {
    let (_redis, proxy) = start();
    let mut stream = raw(&proxy);
    stream.write_all(b"PING\r\n").unwrap();
    expect_bytes(&mut stream, "+PONG\r\n");

    let addr = proxy.addr;
    drop(proxy);
    let mut buf = [0; 16];
    let read = stream.read(&mut buf);
    assert!(
        matches!(read, Ok(0)) || matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "expected the connection closed, got {read:?}"
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens after drop"
    );
}
