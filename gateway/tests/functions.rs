//! The function library's version during a rolling upgrade: a replica upgrades an older
//! library in Redis, never replaces a newer one with its own (it says so in its log, `/status`
//! and a metric, and keeps working against it), and with `--redis-install-functions false`
//! refuses to be ready on an older one.

mod support;

use std::process::Command;

use support::{get_json, tempdir, Gateway, GatewayProcess, RedisServer, Replica, Sse};

/// `sse-gateway script`, the library this build loads.
fn our_library() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .arg("script")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn our_version() -> u64 {
    ssegw_protocol::script::LIBRARY_VERSION
}

/// The same library claiming another version, or (for `None`) the library from before
/// `ssegw_version` existed.
fn library_claiming(version: Option<u64>) -> String {
    let ours = our_library();
    let marker = format!("return {} end", our_version());
    assert!(ours.contains(&marker), "no version function in {ours}");
    match version {
        Some(version) => ours.replace(&marker, &format!("return {version} end")),
        None => ours
            .lines()
            .filter(|line| !line.contains("ssegw_version"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn load(redis: &RedisServer, library: &str) {
    let _: String = redis
        .cmd(
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(library),
        )
        .expect("FUNCTION LOAD");
}

fn version_in(redis: &RedisServer) -> Option<u64> {
    redis
        .cmd(redis::cmd("FCALL").arg("ssegw_version").arg(0))
        .ok()
}

fn mismatch_metric(gw: &impl Replica) -> String {
    let (status, _, body) = support::get_text(gw.addr(), "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find(|line| line.starts_with("ssegw_function_library_mismatch "))
        .unwrap_or_else(|| panic!("no mismatch gauge in {body}"))
        .to_string()
}

#[actix_web::test]
async fn an_older_library_is_upgraded() {
    let redis = RedisServer::start();
    load(&redis, &library_claiming(None));
    assert_eq!(version_in(&redis), None);
    let gw = Gateway::with_redis(&redis, &[]);
    assert_eq!(version_in(&redis), Some(our_version()));
    let (_, status) = get_json(gw.addr(), "/status");
    assert_eq!(status["function_library"]["redis"], our_version());
    assert_eq!(status["function_library"]["replica"], our_version());
    assert_eq!(mismatch_metric(&gw), "ssegw_function_library_mismatch 0");
}

#[actix_web::test]
async fn a_newer_library_is_kept_and_the_mismatch_shown() {
    let redis = RedisServer::start();
    let newer = our_version() + 1;
    load(&redis, &library_claiming(Some(newer)));
    let log = tempdir("functions").join("gateway.log");
    let gw = GatewayProcess::spawn(&redis.url(), &[], &[("SSEGW_LOG", "info")], Some(&log));
    assert_eq!(
        version_in(&redis),
        Some(newer),
        "the newer library was replaced"
    );
    let (_, status) = get_json(gw.addr(), "/status");
    assert_eq!(status["function_library"]["redis"], newer);
    assert_eq!(status["function_library"]["replica"], our_version());
    assert_eq!(mismatch_metric(&gw), "ssegw_function_library_mismatch 1");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("newer ssegw function library"), "{text}");
    // It still works against the newer library.
    let mut sse = Sse::open(&gw.addr(), "topic=t", None).await;
    sse.baseline().await;
    let id = support::blocking_http_publish(gw.addr(), "t", "on the newer library");
    let event = sse.next().await;
    assert_eq!(
        (event.id, event.data.as_str()),
        (id, "on the newer library")
    );
    // Redis losing it (a restart) brings the replica's own back.
    let _: String = redis.cmd(redis::cmd("FUNCTION").arg("FLUSH")).unwrap();
    support::blocking_http_publish(gw.addr(), "t", "after a flush");
    assert_eq!(version_in(&redis), Some(our_version()));
}

#[actix_web::test]
async fn without_installing_an_older_library_keeps_the_replica_not_ready() {
    let redis = RedisServer::start();
    load(&redis, &library_claiming(Some(our_version() - 1)));
    let log = tempdir("functions-old").join("gateway.log");
    let gw = GatewayProcess::launch(
        &redis.url(),
        &["--redis-install-functions", "false"],
        &[("SSEGW_LOG", "info")],
        Some(&log),
    );
    support::wait_until("the log to say the library is too old", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("older than this replica's"))
    });
    gw.wait_readyz(503);
    assert_eq!(version_in(&redis), Some(our_version() - 1));
    load(&redis, &our_library());
    gw.wait_readyz(200);
}
