//! A real `redis-server` under each control of `Standalone`: kill, restart, pause, resume,
//! stop, drop; and the errors of a server that cannot start.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ssegw_testkit::{Error, ServerOptions, Standalone};

/// Long enough for an idle local server to answer, short enough for a test to wait out.
const SHORT: Duration = Duration::from_millis(300);

fn start() -> Standalone {
    Standalone::start().expect("redis-server is required for these tests")
}

/// Sends one inline command and returns the first line of the reply.
fn command(redis: &Standalone, line: &str) -> String {
    reply_lines(redis, line, 1).remove(0)
}

/// A setting's value, from the five lines of `CONFIG GET name`'s reply.
fn config_get(redis: &Standalone, name: &str) -> String {
    let reply = reply_lines(redis, &format!("CONFIG GET {name}"), 5);
    assert_eq!(
        reply[..3],
        ["*2".to_string(), format!("${}", name.len()), name.into()]
    );
    reply[4].clone()
}

/// Sends one inline command and returns the first `n` lines of the reply.
fn reply_lines(redis: &Standalone, line: &str, n: usize) -> Vec<String> {
    let mut stream = TcpStream::connect(redis.server().addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    (0..n)
        .map(|_| {
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            reply.trim_end().to_string()
        })
        .collect()
}

#[test]
fn a_started_server_answers_on_its_port() {
    let redis = start();
    let port = redis.server().port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(redis.server().addr().port(), port);
    assert!(redis.server().ping(SHORT));
    assert_eq!(config_get(&redis, "bind"), "127.0.0.1");
    assert_eq!(config_get(&redis, "save"), "");
    assert_eq!(config_get(&redis, "appendonly"), "no");
    assert_eq!(command(&redis, "SET k v"), "+OK");
}

#[test]
fn a_killed_server_is_gone_and_a_restarted_one_is_empty_on_the_same_port() {
    let mut redis = start();
    let (port, pid) = (redis.server().port(), redis.server().pid());
    assert_eq!(command(&redis, "SET k v"), "+OK");
    redis.server_mut().kill();
    assert!(!redis.server().ping(SHORT));
    assert!(matches!(
        redis.server().pause(),
        Err(Error::NotRunning { .. })
    ));
    redis.server_mut().restart().unwrap();
    assert_eq!(redis.server().port(), port);
    assert_ne!(redis.server().pid(), pid);
    assert!(redis.server().ping(SHORT));
    assert_eq!(command(&redis, "EXISTS k"), ":0");
}

#[test]
fn a_paused_server_answers_nothing_until_resumed_and_keeps_its_data() {
    let redis = start();
    assert_eq!(command(&redis, "SET k v"), "+OK");
    redis.server().pause().unwrap();
    assert!(!redis.server().ping(SHORT));
    redis.server().resume().unwrap();
    assert!(redis.server().ping(SHORT));
    assert_eq!(command(&redis, "EXISTS k"), ":1");
}

#[test]
fn a_stopped_server_exits_on_sigterm_within_the_grace() {
    let mut redis = start();
    let began = Instant::now();
    redis.server_mut().stop(Duration::from_secs(10));
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(!redis.server().ping(SHORT));
    // Stopping again, or killing, is harmless.
    redis.server_mut().stop(Duration::from_secs(1));
    redis.server_mut().kill();
}

#[test]
fn a_paused_server_is_still_stopped_after_the_grace() {
    let mut redis = start();
    redis.server().pause().unwrap();
    redis.server_mut().stop(Duration::from_millis(200));
    assert!(!redis.server().ping(SHORT));
}

#[test]
fn a_dropped_server_is_killed() {
    let redis = start();
    let addr = redis.server().addr();
    drop(redis);
    assert!(TcpStream::connect_timeout(&addr, SHORT).is_err());
}

#[test]
fn a_missing_program_is_a_spawn_error_naming_it() {
    let error = Standalone::start_with(ServerOptions {
        binary: "ssegw-testkit-no-such-server".into(),
        ..ServerOptions::default()
    })
    .err()
    .expect("started a program that does not exist");
    assert!(matches!(error, Error::Spawn { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("cannot start ssegw-testkit-no-such-server: "),
        "{error}"
    );
}

#[test]
fn a_server_that_exits_at_once_fails_early_naming_its_log() {
    let log = std::env::temp_dir().join(format!("ssegw-testkit-{}.log", std::process::id()));
    let began = Instant::now();
    let error = Standalone::start_with(ServerOptions {
        args: vec!["--no-such-directive".into(), "yes".into()],
        log: Some(log.clone()),
        ready_timeout: Duration::from_secs(30),
        ..ServerOptions::default()
    })
    .err()
    .expect("started with a bad directive");
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    assert!(matches!(error, Error::Exited { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .ends_with(&format!("; see {}", log.display())),
        "{error}"
    );
    let written = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(written.contains("no-such-directive"), "{written}");
}

#[test]
fn a_tls_server_answers_over_tls_only_and_counts_as_up_behind_acl_users() {
    let dir = std::env::temp_dir().join(format!("ssegw-testkit-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("redis.log");
    let authority = ssegw_testkit::Authority::create(&dir, "t").unwrap();
    let redis = Standalone::start_with(ServerOptions {
        // One flag's words as separate arguments: redis-server joins them into the line.
        args: "--user default off --user admin on >pw ~* &* +@all"
            .split(' ')
            .map(String::from)
            .collect(),
        log: Some(log.clone()),
        tls: Some(ssegw_testkit::TlsOptions {
            authority,
            require_client_cert: true,
        }),
        ..ServerOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default()));
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));
    assert!(redis.server().ping(SHORT));
    // Plain text on the TLS port gets no Redis answer.
    let mut plain = TcpStream::connect(redis.server().addr()).unwrap();
    plain.set_read_timeout(Some(SHORT)).unwrap();
    plain.write_all(b"PING\r\n").unwrap();
    let mut line = String::new();
    let _ = BufReader::new(plain).read_line(&mut line);
    assert!(
        !line.starts_with("+PONG") && !line.starts_with("-NOAUTH"),
        "{line:?}"
    );
    redis.server().pause().unwrap();
    assert!(!redis.server().ping(SHORT));
    redis.server().resume().unwrap();
    assert!(redis.server().ping(SHORT));
    std::fs::remove_dir_all(&dir).unwrap();
}
