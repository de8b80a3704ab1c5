//! Redis as production runs it: TLS only (a CA made in the test, mutual TLS), the default user
//! off and an ACL user for the gateway. Subscribing, publishing over HTTP and with `FCALL`, and
//! resuming work over `rediss://`; a wrong password, an untrusted CA, a missing permission and
//! functions an administrator has not loaded each leave the replica not ready, with a log line
//! that names the cause; settings that can never work exit 2 before the port is bound.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ssegw_testkit::{Authority, ServerOptions, Standalone, TlsOptions};
use support::{get_json, http_publish, tempdir, wait_until, Gateway, GatewayProcess, Replica, Sse};

const ADMIN_PASSWORD: &str = "admin-pw-5b1e";
const GATEWAY_PASSWORD: &str = "gateway-pw-8c2d";
const PUBLISHER_PASSWORD: &str = "publisher-pw-3e7a";

/// What the gateway needs, and nothing more (docs/deploy.md, "Least privilege"): its functions,
/// pub/sub on topic channels and its canary, the commands the functions run, the connection
/// pool's `UNWATCH`, the presence reports and their registry, and as keys the topics' streams
/// and idempotency records and the presence keys only: its `FCALL`s declare the stream key,
/// never the topic.
const GATEWAY_ACL: &str = "resetkeys ~ssegw:s:* ~ssegw:i:* ~ssegw:p:* resetchannels &ssegw:c:* \
     &ssegw:canary:* -@all +fcall +fcall_ro +function|load +subscribe +unsubscribe \
     +publish +ping +unwatch +xadd +xrange +xrevrange +xlen +xtrim +xdel +xinfo|stream +exists \
     +pttl +expire +time +get +set +mget +del +zadd +zrem +zrange +zremrangebyscore";

/// What the Mercure hub adds, with its active subscriptions (docs/deploy.md, "Least
/// privilege").
const MERCURE_ACL: &str = "~ssegw:m:* +hsetnx +hget +hlen +unlink +hset +hdel +hrandfield +hvals \
     +zscore +zrangebyscore";

/// What a service that only publishes needs (docs/deploy.md, "Least privilege").
const PUBLISHER_ACL: &str = "resetkeys ~ssegw:s:* ~ssegw:i:* ~orders ~t resetchannels &ssegw:c:* -@all \
     +fcall +publish +xadd +xrange +xrevrange +xlen +xtrim +xdel +exists +pttl +expire +time +get +set";

/// A TLS-only Redis whose default user is off, with an administrator and, when `gateway_acl` is
/// given, a `gateway` user with those rules.
struct SecureRedis {
    redis: Standalone,
    authority: Authority,
    dir: PathBuf,
}

impl SecureRedis {
    fn start(require_client_cert: bool, gateway_acl: &str) -> SecureRedis {
        let dir = tempdir("redis-tls");
        let authority = Authority::create(&dir, "redis").expect("test certificates");
        // redis-server joins the words after `--user` into one configuration line.
        let args = format!(
            "--user default off --user admin on >{ADMIN_PASSWORD} ~* &* +@all \
             --user gateway on >{GATEWAY_PASSWORD} {gateway_acl} \
             --user publisher on >{PUBLISHER_PASSWORD} {PUBLISHER_ACL}"
        );
        let redis = Standalone::start_with(ServerOptions {
            args: args.split_whitespace().map(String::from).collect(),
            tls: Some(TlsOptions {
                authority: authority.clone(),
                require_client_cert,
            }),
            log: Some(dir.join("redis.log")),
            ..ServerOptions::default()
        })
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            panic!("redis-server with TLS is required for these tests: {e}\n{log}")
        });
        SecureRedis {
            redis,
            authority,
            dir,
        }
    }

    fn url(&self) -> String {
        self.redis.url()
    }

    fn password_file(&self, password: &str) -> PathBuf {
        let path = self.dir.join(format!("password-{}", fastrand::u32(..)));
        std::fs::write(&path, format!("{password}\n")).unwrap();
        path
    }

    /// A blocking client of `user`, trusting the test CA and presenting the client certificate.
    fn client(&self, user: &str, password: &str) -> redis::Client {
        let info = redis::IntoConnectionInfo::into_connection_info(self.url().as_str()).unwrap();
        let settings = info
            .redis_settings()
            .clone()
            .set_username(user)
            .set_password(password);
        let info = info.set_redis_settings(settings);
        let certificates = redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(&self.authority.client_cert).unwrap(),
                client_key: std::fs::read(&self.authority.client_key).unwrap(),
            }),
            root_cert: Some(std::fs::read(&self.authority.ca).unwrap()),
        };
        redis::Client::build_with_tls(info, certificates).unwrap()
    }

    fn admin<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        cmd.query(&mut self.client("admin", ADMIN_PASSWORD).get_connection()?)
    }

    /// The gateway's flags for this server: its user and password file, the test CA and the
    /// client certificate.
    fn flags(&self, password_file: &Path) -> Vec<String> {
        let a = &self.authority;
        [
            ("--redis-url", self.url().into()),
            ("--redis-username", "gateway".into()),
            ("--redis-password-file", password_file.to_path_buf()),
            ("--redis-ca-file", a.ca.clone()),
            ("--redis-client-cert", a.client_cert.clone()),
            ("--redis-client-key", a.client_key.clone()),
        ]
        .into_iter()
        .flat_map(|(flag, value): (&str, PathBuf)| [flag.to_string(), value.display().to_string()])
        .collect()
    }
}

fn pairs(events: &[eventsource_stream::Event]) -> Vec<(&str, &str)> {
    events
        .iter()
        .map(|e| (e.id.as_str(), e.data.as_str()))
        .collect()
}

fn as_strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

#[actix_web::test]
async fn subscribe_publish_and_resume_over_tls_as_an_acl_user() {
    let redis = SecureRedis::start(true, GATEWAY_ACL);
    let password = redis.password_file(GATEWAY_PASSWORD);
    let flags = redis.flags(&password);
    let mut serve = as_strs(&flags);
    serve.extend(["--presence-interval", "200ms"]);
    let a = Gateway::start(&serve);
    let b = Gateway::start(&serve);

    let mut sse = Sse::open(&a, "topic=orders", None).await;
    sse.baseline().await;
    let over_http = http_publish(&a, "orders", "one", None).await;
    let mut fcall = redis::cmd("FCALL");
    fcall.arg("ssegw_publish").arg(1).arg("orders").arg("two");
    let publisher = redis.client("publisher", PUBLISHER_PASSWORD);
    let over_fcall: String = fcall
        .query(&mut publisher.get_connection().unwrap())
        .expect("FCALL as a publishing service's user");
    // The CLI takes the same connection flags.
    let cli = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args(["publish", "--topic", "orders", "--data", "from the CLI"])
        .args(&flags)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let over_cli = String::from_utf8(cli.stdout).unwrap().trim().to_string();
    assert_eq!(
        pairs(&sse.take(3).await),
        [
            (over_http.as_str(), "one"),
            (over_fcall.as_str(), "two"),
            (over_cli.as_str(), "from the CLI")
        ]
    );
    // Presence and history within the ACL: B counts A's subscriber, and reads the newest.
    wait_until("B to count A's subscriber", || {
        let (status, body) = get_json(b.addr(), "/presence?topic=orders");
        status == 200 && body["topics"]["orders"]["subscribers"] == 1
    });
    let (status, history) = get_json(b.addr(), "/history?topic=orders&limit=2");
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["next"].as_str(), Some(over_cli.as_str()));
    assert_eq!(history["events"][0]["data"], "two");
    drop(sse);

    let missed = http_publish(&b, "orders", "three", None).await;
    let mut resumed = Sse::open(&b, "topic=orders", Some(&over_http)).await;
    assert_eq!(
        pairs(&resumed.take(3).await),
        [
            (over_fcall.as_str(), "two"),
            (over_cli.as_str(), "from the CLI"),
            (missed.as_str(), "three")
        ]
    );

    // The retention table changed with the same flags (the gateway's user may load
    // functions): publishes then trim, and keyed publishes keep their records, within the ACL.
    let set = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .args(["namespace", "set", "--default", "--max-len", "2"])
        .args(&flags)
        .output()
        .unwrap();
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    for i in 0..6 {
        http_publish(&b, "orders", &format!("trimmed {i}"), None).await;
    }
    let len: u64 = redis::cmd("XLEN")
        .arg("ssegw:s:{orders}")
        .query(&mut publisher.get_connection().unwrap())
        .unwrap();
    assert!(len <= 3, "{len} events kept of a table keeping 2");
    let mut keyed = redis::cmd("FCALL");
    keyed
        .arg("ssegw_publish")
        .arg(1)
        .arg("orders")
        .arg("once")
        .arg("")
        .arg("")
        .arg("order-1");
    let first: String = keyed
        .query(&mut publisher.get_connection().unwrap())
        .expect("a keyed FCALL as a publishing service's user");
    let again: String = keyed
        .query(&mut publisher.get_connection().unwrap())
        .unwrap();
    assert_eq!(first, again);

    // The credentials appear nowhere the replica shows.
    let (_, status) = get_json(a.addr(), "/status");
    let (code, _, body) = support::get_text(a.addr(), "/metrics");
    assert_eq!(code, 200);
    for text in [status.to_string(), body] {
        assert!(!text.contains(GATEWAY_PASSWORD), "{text}");
    }
}

/// A replica process against `redis` with these flags, its log at the most verbose level.
fn unready_replica(flags: &[String], log: &Path) -> GatewayProcess {
    let url = flags.iter().position(|f| f == "--redis-url").unwrap();
    let rest: Vec<&str> = flags
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != url && *i != url + 1)
        .map(|(_, f)| f.as_str())
        .collect();
    let process =
        GatewayProcess::launch(&flags[url + 1], &rest, &[("SSEGW_LOG", "debug")], Some(log));
    wait_until("the replica to answer /readyz", || {
        support::http_status(process.addr(), "GET", "/readyz").is_some()
    });
    process
}

/// Waits until the replica's log says `cause`, then checks it is not ready and the log holds
/// no password.
fn assert_not_ready_because(process: &GatewayProcess, log: &Path, cause: &str) {
    wait_until(&format!("a log line naming {cause:?}"), || {
        std::fs::read_to_string(log).is_ok_and(|text| text.contains(cause))
    });
    let (status, body) = get_json(process.addr(), "/readyz");
    assert_eq!((status, body["status"].as_str()), (503, Some("not ready")));
    let text = std::fs::read_to_string(log).unwrap();
    assert!(!text.contains(GATEWAY_PASSWORD) && !text.contains(ADMIN_PASSWORD));
}

#[actix_web::test]
async fn a_wrong_password_an_untrusted_ca_and_a_missing_permission_are_named() {
    let redis = SecureRedis::start(false, GATEWAY_ACL);
    let dir = tempdir("redis-causes");

    // Nothing listens there (yet).
    let mut flags = redis.flags(&redis.password_file(GATEWAY_PASSWORD));
    let url = flags.iter().position(|f| f == "--redis-url").unwrap() + 1;
    flags[url] = format!("rediss://127.0.0.1:{}", support::free_port());
    let log = dir.join("unreachable.log");
    let process = unready_replica(&flags, &log);
    assert_not_ready_because(&process, &log, "Redis is unreachable");
    drop(process);

    let wrong = redis.password_file("not-the-password");
    let log = dir.join("wrong-password.log");
    let process = unready_replica(&redis.flags(&wrong), &log);
    assert_not_ready_because(&process, &log, "wrong username or password");
    drop(process);

    let other = Authority::create(&dir, "other").unwrap();
    let mut flags = redis.flags(&redis.password_file(GATEWAY_PASSWORD));
    let ca = flags.iter().position(|f| f == "--redis-ca-file").unwrap() + 1;
    flags[ca] = other.ca.display().to_string();
    let log = dir.join("untrusted.log");
    let process = unready_replica(&flags, &log);
    assert_not_ready_because(&process, &log, "certificate is not trusted");
    drop(process);

    // The same user without the right to load functions.
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("gateway").arg("-function|load");
    let () = redis.admin(&setuser).unwrap();
    let log = dir.join("noperm.log");
    let process = unready_replica(&redis.flags(&redis.password_file(GATEWAY_PASSWORD)), &log);
    assert_not_ready_because(&process, &log, "function|load");

    // Given the right again, the replica that kept retrying becomes ready.
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("gateway").arg("+function|load");
    let () = redis.admin(&setuser).unwrap();
    process.wait_readyz(200);
}

#[actix_web::test]
async fn without_installing_functions_a_replica_waits_for_an_administrator() {
    let redis = SecureRedis::start(false, GATEWAY_ACL);
    let dir = tempdir("redis-functions");
    let mut flags = redis.flags(&redis.password_file(GATEWAY_PASSWORD));
    flags.extend(["--redis-install-functions".into(), "false".into()]);
    let log = dir.join("functions.log");
    let process = unready_replica(&flags, &log);
    assert_not_ready_because(&process, &log, "--redis-install-functions is false");
    // Nothing was loaded behind the administrator's back.
    let mut list = redis::cmd("FUNCTION");
    list.arg("LIST");
    let libraries: Vec<redis::Value> = redis.admin(&list).unwrap();
    assert!(libraries.is_empty());

    // The documented way: `sse-gateway script | redis-cli -x FUNCTION LOAD REPLACE`.
    let script = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .arg("script")
        .output()
        .unwrap();
    assert!(script.status.success());
    let mut load = redis::cmd("FUNCTION");
    load.arg("LOAD").arg("REPLACE").arg(script.stdout);
    let name: String = redis.admin(&load).unwrap();
    assert_eq!(name, "ssegw");
    process.wait_readyz(200);
    let mut sse = Sse::open(&process.addr(), "topic=t", None).await;
    sse.baseline().await;
    let id = support::blocking_http_publish(process.addr(), "t", "after the administrator");
    let event = sse.next().await;
    assert_eq!(
        (event.id, event.data.as_str()),
        (id, "after the administrator")
    );
}

/// Settings that can never work: exit 2 before binding, saying which setting and why, and
/// never printing the password.
#[test]
fn settings_that_can_never_work_exit_2_before_binding() {
    let dir = tempdir("redis-settings");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let authority = Authority::create(&dir, "ok").unwrap();
    let empty = dir.join("empty-password");
    std::fs::write(&empty, "\n").unwrap();
    let ca = authority.ca.display().to_string();
    let cert = authority.client_cert.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--redis-url",
                "rediss://127.0.0.1:1",
                "--redis-ca-file",
                garbage.to_str().unwrap(),
            ],
            "--redis-ca-file (SSEGW_REDIS_CA_FILE)",
        ),
        (
            &[
                "--redis-url",
                "rediss://127.0.0.1:1",
                "--redis-ca-file",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
        (
            &["--redis-url", "redis://127.0.0.1:1", "--redis-ca-file", &ca],
            "the connection is not TLS",
        ),
        (
            &[
                "--redis-url",
                "rediss://127.0.0.1:1",
                "--redis-client-cert",
                &cert,
            ],
            "go together",
        ),
        (
            &["--redis-url", "rediss://127.0.0.1:1/#insecure"],
            "--redis-tls-skip-verify",
        ),
        (
            &[
                "--redis-url",
                "redis://127.0.0.1:1",
                "--redis-password-file",
                empty.to_str().unwrap(),
            ],
            "is empty",
        ),
        (&["--redis-username", "gateway"], "give --redis-url"),
        (
            &["--redis-url", "redis://gateway@127.0.0.1:1"],
            "needs a password",
        ),
        (
            &["--redis-url", "redis://:s3cret-in-url@127.0.0.1:1/not-a-db"],
            "--redis-url (SSEGW_REDIS_URL) is not a Redis URL",
        ),
    ];
    for (flags, expected) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
            .args(["--listen", "127.0.0.1:1", "--anonymous-subscribe", "*"])
            .args(*flags)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!stderr.contains("s3cret-in-url"), "{flags:?}: {stderr}");
    }
}

/// Skipping verification is never silent: an explicit flag, and a warning at start-up; the
/// replica then connects to a server whose certificate it cannot verify.
#[actix_web::test]
async fn skipping_verification_takes_a_flag_and_warns() {
    let redis = SecureRedis::start(false, GATEWAY_ACL);
    let dir = tempdir("redis-skip-verify");
    let password = redis.password_file(GATEWAY_PASSWORD);
    let url = redis.url();
    let password = password.display().to_string();
    let flags: Vec<String> = [
        "--redis-url",
        &url,
        "--redis-username",
        "gateway",
        "--redis-password-file",
        &password,
        "--redis-tls-skip-verify",
        "true",
    ]
    .map(String::from)
    .to_vec();
    let log = dir.join("skip.log");
    let process = unready_replica(&flags, &log);
    process.wait_readyz(200);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("--redis-tls-skip-verify"), "{text}");
    assert!(text.contains("WARN"), "{text}");
}

/// The Mercure hub within the documented ACL: publishing, resuming by an update id (the id
/// index), and the registry of active subscriptions (its heartbeat, its changes, a listing).
#[actix_web::test]
async fn the_mercure_hub_runs_as_an_acl_user() {
    use futures_util::StreamExt;
    const SECRET: &str = "a-mercure-secret-of-at-least-32-bytes!";
    let redis = SecureRedis::start(false, &format!("{GATEWAY_ACL} {MERCURE_ACL}"));
    let password = redis.password_file(GATEWAY_PASSWORD);
    let flags = redis.flags(&password);
    let mut serve = as_strs(&flags);
    serve.extend([
        "--presence-interval",
        "200ms",
        "--mercure",
        "true",
        "--mercure-jwt-secret",
        SECRET,
        "--mercure-anonymous",
        "true",
        "--mercure-subscriptions",
        "true",
    ]);
    let gw = Gateway::start(&serve);
    let token = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let publisher = token(serde_json::json!({"mercure": {"publish": ["*"]}}));
    let mut ids = Vec::new();
    for data in ["one", "two"] {
        let mut response = awc::Client::default()
            .post(gw.url("/.well-known/mercure"))
            .insert_header(("authorization", format!("Bearer {publisher}")))
            .send_form(&[("topic", "urn:t"), ("data", data)])
            .await
            .unwrap();
        let body = response.body().await.unwrap();
        assert_eq!(response.status(), 200, "{}", String::from_utf8_lossy(&body));
        ids.push(String::from_utf8(body.to_vec()).unwrap());
    }
    let response = awc::Client::builder()
        .disable_timeout()
        .finish()
        .get(gw.url("/.well-known/mercure?topic=urn:t"))
        .insert_header(("last-event-id", ids[0].as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("last-event-id").unwrap(),
        ids[0].as_str(),
        "the id was found in the index"
    );
    let mut events = eventsource_stream::Eventsource::eventsource(response);
    let event = tokio::time::timeout(support::WAIT, events.next())
        .await
        .expect("the resumed update")
        .unwrap()
        .unwrap();
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (ids[1].as_str(), "two")
    );
    let reader = token(serde_json::json!({"mercure": {"subscribe": ["*"]}}));
    wait_until("the subscription to be listed", || {
        let mut request = std::net::TcpStream::connect(gw.addr()).unwrap();
        use std::io::{Read, Write};
        write!(
            request,
            "GET /.well-known/mercure/subscriptions HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {reader}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        request.read_to_string(&mut reply).unwrap();
        reply.starts_with("HTTP/1.1 200") && reply.contains("\"topic\": \"urn:t\"")
    });
    drop(events);
    wait_until("the subscription to end", || {
        let stored: u64 = redis
            .admin(redis::cmd("HLEN").arg(format!(
                "ssegw:m:{{ssegw.mercure}}:subs:r:{}",
                get_json(gw.addr(), "/status").1["replica"].as_str().unwrap()
            )))
            .unwrap();
        stored == 0
    });
    // A replica that died with a subscription: this one ends it within the ACL.
    let dead = "ssegw:m:{ssegw.mercure}:subs:r:dead";
    let _: () = redis
        .admin(
            redis::cmd("HSET")
                .arg(dead)
                .arg("/.well-known/mercure/subscriptions/urn%3Ax/urn%3Auuid%3Ad")
                .arg(r#"{"id":"/.well-known/mercure/subscriptions/urn%3Ax/urn%3Auuid%3Ad","type":"Subscription","subscriber":"urn:uuid:d","topic":"urn:x","active":true}"#),
        )
        .unwrap();
    let _: () = redis
        .admin(
            redis::cmd("ZADD")
                .arg("ssegw:m:{ssegw.mercure}:subs")
                .arg(1)
                .arg("dead"),
        )
        .unwrap();
    wait_until("the dead replica to be reaped", || {
        let listed: Option<f64> = redis
            .admin(
                redis::cmd("ZSCORE")
                    .arg("ssegw:m:{ssegw.mercure}:subs")
                    .arg("dead"),
            )
            .unwrap();
        let stored: bool = redis.admin(redis::cmd("EXISTS").arg(dead)).unwrap();
        listed.is_none() && !stored
    });
}
