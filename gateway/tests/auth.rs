//! Who may subscribe and publish, end to end against replicas on a real Redis: tokens of every
//! configured kind, every way a token can be wrong, topic escalation, each token source, CORS,
//! and streams that end when their token expires. Every refusal is checked for its exact
//! status and for the absence of any event.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, get_current_timestamp, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{Gateway, GatewayProcess, RedisServer, Replica, Sse};

const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
const AUDIENCE: &str = "sse-gateway";
const ISSUER: &str = "https://issuer.test";
const ORIGIN: &str = "https://app.test";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// How a test token is signed.
#[derive(Clone, Copy)]
enum Signer {
    Hs256,
    Rs256,
    Es256,
    /// RS256 with a key the gateway does not know.
    OtherRs256,
}

impl Signer {
    fn algorithm(self) -> Algorithm {
        match self {
            Signer::Hs256 => Algorithm::HS256,
            Signer::Rs256 | Signer::OtherRs256 => Algorithm::RS256,
            Signer::Es256 => Algorithm::ES256,
        }
    }

    fn key(self) -> EncodingKey {
        match self {
            Signer::Hs256 => EncodingKey::from_secret(SECRET.as_bytes()),
            Signer::Rs256 => EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).unwrap(),
            Signer::OtherRs256 => EncodingKey::from_rsa_pem(&pem("other-rsa-private.pem")).unwrap(),
            Signer::Es256 => EncodingKey::from_ec_pem(&pem("ec-private.pem")).unwrap(),
        }
    }
}

fn now() -> u64 {
    get_current_timestamp()
}

/// Standard claims for this gateway: valid for a minute, granting `subscribe` and `publish`.
fn claims(subscribe: &[&str], publish: &[&str]) -> Value {
    json!({
        "sub": "user-1",
        "aud": AUDIENCE,
        "iss": ISSUER,
        "exp": now() + 60,
        "ssegw": {"subscribe": subscribe, "publish": publish},
    })
}

fn sign(signer: Signer, claims: &Value) -> String {
    encode(&Header::new(signer.algorithm()), claims, &signer.key()).unwrap()
}

fn token(subscribe: &[&str]) -> String {
    sign(Signer::Hs256, &claims(subscribe, &[]))
}

/// A gateway that knows the HS secret and the RSA and EC public keys, checks audience and
/// issuer with no leeway, lets anyone subscribe to `public.*`, and allows one CORS origin.
fn gateway(redis: &RedisServer, extra: &[&str]) -> Gateway {
    let keys = format!(
        "{},{}",
        fixture("rsa-public.pem").display(),
        fixture("ec-public.pem").display()
    );
    let mut flags = vec![
        "--jwt-secret",
        SECRET,
        "--jwt-public-key",
        &keys,
        "--jwt-audience",
        AUDIENCE,
        "--jwt-issuer",
        ISSUER,
        "--jwt-leeway",
        "0s",
        "--anonymous-subscribe",
        "public.*",
        "--cors-origins",
        ORIGIN,
    ];
    flags.extend_from_slice(extra);
    Gateway::with_redis(redis, &flags)
}

/// A response read to its end (refusals are short JSON bodies).
struct Reply {
    status: u16,
    headers: actix_web::http::header::HeaderMap,
    body: String,
}

async fn request(
    gw: &impl Replica,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let client = awc::Client::default();
    let mut req = client.request(method.parse().unwrap(), gw.url(path));
    for &header in headers {
        req = req.insert_header(header);
    }
    let mut response = match body {
        Some(body) => req.send_json(body).await,
        None => req.send().await,
    }
    .expect("request");
    let body = response.body().await.expect("a complete body");
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `GET /events` that must be refused with `status` and a message containing `message`: a
/// JSON error, a Bearer challenge, and no stream and no event.
async fn assert_refused(
    gw: &impl Replica,
    query: &str,
    headers: &[(&str, &str)],
    status: u16,
    message: &str,
) {
    let reply = request(gw, "GET", &format!("/events?{query}"), headers, None).await;
    assert_eq!(reply.status, status, "{query}: {}", reply.body);
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        "application/json",
        "{query}"
    );
    let error: Value = serde_json::from_str(&reply.body).unwrap();
    let text = error["error"].as_str().unwrap();
    assert!(
        text.contains(message),
        "{query}: {text:?} lacks {message:?}"
    );
    if status == 401 || status == 403 {
        let challenge = reply
            .headers
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
    }
    assert!(
        !reply.body.contains("data:"),
        "an event leaked: {}",
        reply.body
    );
}

/// Opens a stream that must be accepted, publishes to its topic and checks the event arrives.
async fn assert_streams(
    gw: &impl Replica,
    redis: &RedisServer,
    topic: &str,
    query: &str,
    headers: &[(&str, &str)],
) {
    let mut sse = Sse::open_with(gw, query, headers).await;
    sse.baseline().await;
    let id = redis.fcall_publish(topic, "hello", None);
    let event = sse.next().await;
    assert_eq!(event.data, "hello", "{query}");
    // A one-topic stream's ids are the stream ids; several topics' are cursors.
    if query.matches("topic=").count() == 1 {
        assert_eq!(event.id, id, "{query}");
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[actix_web::test]
async fn valid_tokens_of_each_algorithm_subscribe() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    for signer in [Signer::Hs256, Signer::Rs256, Signer::Es256] {
        let t = sign(signer, &claims(&["orders.*"], &[]));
        assert_streams(
            &gw,
            &redis,
            "orders.eu",
            "topic=orders.eu",
            &[("Authorization", &bearer(&t))],
        )
        .await;
    }
}

#[actix_web::test]
async fn a_jwks_key_is_picked_by_kid() {
    let redis = RedisServer::start();
    let dir = tempdir("jwks");
    let public = jsonwebtoken::DecodingKey::from_rsa_pem(&pem("other-rsa-public.pem")).unwrap();
    let mut jwk = Jwk::from_decoding_key(&public, Some(Algorithm::RS256)).unwrap();
    jwk.common.key_id = Some("k2".into());
    let jwks = dir.join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_vec(&JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    let gw = Gateway::with_redis(&redis, &["--jwt-jwks", jwks.to_str().unwrap()]);
    let signed = |kid: &str| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        encode(&header, &claims(&["t"], &[]), &Signer::OtherRs256.key()).unwrap()
    };
    assert_streams(
        &gw,
        &redis,
        "t",
        "topic=t",
        &[("Authorization", &bearer(&signed("k2")))],
    )
    .await;
    assert_refused(
        &gw,
        "topic=t",
        &[("Authorization", &bearer(&signed("k9")))],
        401,
        "no RS256 key with the token's kid",
    )
    .await;
    // The JWKS key is the only key: the gateway's HS secret is not configured here.
    assert_refused(
        &gw,
        "topic=t",
        &[("Authorization", &bearer(&token(&["t"])))],
        401,
        "no HS256 key is configured",
    )
    .await;
}

/// A key that cannot verify a token (an EC key of the other curve, listed first) does not hide
/// the key that can.
#[actix_web::test]
async fn every_configured_key_of_the_algorithm_is_tried() {
    let redis = RedisServer::start();
    let keys = format!(
        "{},{}",
        fixture("ec384-public.pem").display(),
        fixture("ec-public.pem").display()
    );
    let gw = Gateway::with_redis(&redis, &["--jwt-public-key", &keys]);
    let t = sign(Signer::Es256, &claims(&["t"], &[]));
    assert_streams(
        &gw,
        &redis,
        "t",
        "topic=t",
        &[("Authorization", &bearer(&t))],
    )
    .await;
    let other = sign(Signer::OtherRs256, &claims(&["t"], &[]));
    assert_refused(
        &gw,
        "topic=t",
        &[("Authorization", &bearer(&other))],
        401,
        "no RS256 key",
    )
    .await;
}

#[actix_web::test]
async fn invalid_tokens_are_refused_with_401() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let grant = json!({"subscribe": ["*"]});
    let base = claims(&["*"], &[]);
    let with = |changes: Value| {
        let mut c = base.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c["ssegw"] = grant.clone();
        sign(Signer::Hs256, &c)
    };
    // `alg: none`, unsigned.
    let b64 = |v: &Value| base64_url(serde_json::to_vec(v).unwrap());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&base)
    );
    // HS256 keyed with the RSA public key the gateway trusts: the classic confusion.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &base,
        &EncodingKey::from_secret(&pem("rsa-public.pem")),
    )
    .unwrap();
    // A valid token whose payload was swapped for one granting more.
    let valid = sign(Signer::Rs256, &claims(&["orders.eu"], &[]));
    let parts: Vec<&str> = valid.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims(&["*"], &[])), parts[2]);
    let cases = [
        (with(json!({"exp": now() - 10})), "invalid token: expired"),
        (with(json!({"nbf": now() + 60})), "not valid yet (nbf)"),
        (with(json!({"aud": "someone-else"})), "wrong audience (aud)"),
        (with(json!({"aud": null})), "missing claim aud"),
        (
            with(json!({"iss": "https://evil.test"})),
            "wrong issuer (iss)",
        ),
        (with(json!({"exp": null})), "missing claim exp"),
        (sign(Signer::OtherRs256, &base), "signature does not verify"),
        (none, "unsupported or malformed header"),
        (confused, "signature does not verify"),
        (tampered, "signature does not verify"),
        ("not.a.token".to_string(), "malformed"),
        ("garbage".to_string(), "malformed token"),
    ];
    for (t, message) in &cases {
        assert_refused(
            &gw,
            "topic=orders.eu",
            &[("Authorization", &bearer(t))],
            401,
            message,
        )
        .await;
    }
    assert_refused(
        &gw,
        "topic=orders.eu",
        &[("Authorization", "Basic dXNlcjpwdw==")],
        401,
        "must be \"Bearer <token>\"",
    )
    .await;
    // A configured algorithm list is the only one: an RS256 token is refused unread where
    // RS256 is not listed.
    let hs_only = Gateway::with_redis(
        &redis,
        &["--jwt-secret", SECRET, "--jwt-algorithms", "HS256"],
    );
    assert_refused(
        &hs_only,
        "topic=orders.eu",
        &[("Authorization", &bearer(&valid))],
        401,
        "algorithm RS256 is not accepted (accepted: HS256)",
    )
    .await;
}

#[actix_web::test]
async fn tokens_grant_only_their_topics() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let t = token(&["orders.*", "users/42"]);
    let auth = bearer(&t);
    let h = [("Authorization", auth.as_str())];
    assert_streams(&gw, &redis, "orders.eu.paris", "topic=orders.eu.paris", &h).await;
    // Percent-encoded separators decode to the same, granted, topic.
    assert_streams(&gw, &redis, "orders.eu", "topic=orders%2Eeu", &h).await;
    for (query, status, message) in [
        ("topic=orders", 403, "subscribe on topic \"orders\""),
        ("topic=ordersx", 403, "topic \"ordersx\""),
        ("topic=Orders.eu", 403, "topic \"Orders.eu\""),
        ("topic=orders/../admin", 403, "topic \"orders/../admin\""),
        ("topic=users/42/admin", 403, "topic \"users/42/admin\""),
        (
            "topic=users%2F42%2F..%2F43",
            403,
            "topic \"users/42/../43\"",
        ),
        // One topic outside the grant refuses the whole connection.
        ("topic=orders.eu&topic=admin", 403, "topic \"admin\""),
        // A client cannot send a pattern, encoded or not: topics have no `*`.
        ("topic=orders.*", 400, "invalid topic"),
        ("topic=orders%2E%2A", 400, "invalid topic"),
        ("topic=%2A", 400, "invalid topic"),
        // Nor reach another topic's keys through hash-tag braces.
        ("topic=orders.%7Beu%7D", 400, "invalid topic"),
    ] {
        assert_refused(&gw, query, &h, status, message).await;
    }
    assert_eq!(gw_counter(&gw, "forbidden"), 7);
}

#[actix_web::test]
async fn missing_tokens_in_each_mode() {
    let redis = RedisServer::start();
    // Token required for everything (no anonymous access): 401 naming every token source.
    let strict = Gateway::with_redis(&redis, &["--jwt-secret", SECRET]);
    assert_refused(&strict, "topic=t", &[], 401, "missing token: subscribe on topic \"t\" needs one (send Authorization: Bearer <token> or the ssegw_token cookie or the access_token query parameter)").await;
    let reply = request(
        &strict,
        "POST",
        "/publish",
        &[],
        Some(&json!({"topic": "t", "data": "x"})),
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("missing token: publish on topic \\\"t\\\""),
        "{}",
        reply.body
    );

    // Anonymous subscribing to some topics: those need no token, the others still do.
    let gw = gateway(&redis, &[]);
    assert_streams(&gw, &redis, "public.news", "topic=public.news", &[]).await;
    assert_refused(&gw, "topic=private", &[], 401, "missing token").await;
    assert_refused(
        &gw,
        "topic=public.news&topic=private",
        &[],
        401,
        "topic \"private\"",
    )
    .await;
    // A token adds to anonymous access: one granting `a` opens `a` together with `public.*`.
    let a = bearer(&token(&["a"]));
    assert_streams(
        &gw,
        &redis,
        "a",
        "topic=a&topic=public.x",
        &[("Authorization", &a)],
    )
    .await;
    // An invalid token is refused even where anonymous access would do.
    assert_refused(
        &gw,
        "topic=public.news",
        &[("Authorization", "Bearer junk")],
        401,
        "malformed",
    )
    .await;

    // Anonymous everything, explicitly: no token needed anywhere.
    let open = Gateway::with_redis(
        &redis,
        &["--anonymous-subscribe", "*", "--anonymous-publish", "*"],
    );
    assert_streams(&open, &redis, "any", "topic=any", &[]).await;
    let reply = request(
        &open,
        "POST",
        "/publish",
        &[],
        Some(&json!({"topic": "any", "data": "x"})),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[actix_web::test]
async fn publishing_needs_a_publish_grant_in_the_header() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let mut sse = Sse::open(&gw, "topic=public.feed", None).await;
    sse.baseline().await;
    let publisher = sign(Signer::Rs256, &claims(&[], &["public.*"]));
    let subscriber = token(&["public.*"]);
    let body = json!({"topic": "public.feed", "data": "granted"});
    let post = |headers: Vec<(&'static str, String)>, body: Value| {
        let gw = &gw;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(gw, "POST", "/publish", &headers, Some(&body)).await
        }
    };
    let refused = [
        (vec![], 401, "missing token"),
        (
            vec![("Authorization", bearer(&subscriber))],
            403,
            "does not grant publish on topic \"public.feed\"",
        ),
        // Cookies and the query parameter are for subscribers only.
        (
            vec![("Cookie", format!("ssegw_token={publisher}"))],
            401,
            "missing token",
        ),
    ];
    for (headers, status, message) in refused {
        let reply = post(headers, body.clone()).await;
        assert_eq!(reply.status, status, "{}", reply.body);
        assert!(
            reply.body.contains(&message.replace('"', "\\\"")),
            "{}",
            reply.body
        );
    }
    let reply = request(
        &gw,
        "POST",
        &format!("/publish?access_token={publisher}"),
        &[],
        Some(&body),
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let reply = post(
        vec![("Authorization", bearer(&publisher))],
        json!({"topic": "public.other.x", "data": "granted"}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = post(
        vec![("Authorization", bearer(&publisher))],
        json!({"topic": "orders", "data": "no"}),
    )
    .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    // Of all these, the subscriber saw only what was allowed through.
    let reply = post(vec![("Authorization", bearer(&publisher))], body.clone()).await;
    assert_eq!(reply.status, 200);
    let event = sse.next().await;
    assert_eq!(event.data, "granted");
    sse.assert_quiet(Duration::from_millis(200)).await;
}

#[actix_web::test]
async fn cookie_and_query_tokens() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &["--auth-cookie", "session_jwt"]);
    let t = token(&["t"]);
    assert_streams(
        &gw,
        &redis,
        "t",
        "topic=t",
        &[("Cookie", &format!("other=1; session_jwt={t}"))],
    )
    .await;
    assert_streams(&gw, &redis, "t", &format!("topic=t&access_token={t}"), &[]).await;
    // The header wins over the others: a bad header is not rescued by a good cookie.
    assert_refused(
        &gw,
        "topic=t",
        &[
            ("Authorization", "Bearer junk"),
            ("Cookie", &format!("session_jwt={t}")),
        ],
        401,
        "malformed",
    )
    .await;
    // An explicit query token wins over a stale cookie.
    let stale = sign(
        Signer::Hs256,
        &json!({"aud": AUDIENCE, "iss": ISSUER, "exp": now() - 5, "ssegw": {"subscribe": ["t"]}}),
    );
    assert_streams(
        &gw,
        &redis,
        "t",
        &format!("topic=t&access_token={t}"),
        &[("Cookie", &format!("session_jwt={stale}"))],
    )
    .await;
    // The default cookie name is not read once another is configured.
    assert_refused(
        &gw,
        "topic=t",
        &[("Cookie", &format!("ssegw_token={t}"))],
        401,
        "missing token",
    )
    .await;

    let no_query = gateway(&redis, &["--query-token", "false", "--auth-cookie", ""]);
    assert_refused(
        &no_query,
        &format!("topic=t&access_token={t}"),
        &[],
        401,
        "access_token query parameter is disabled",
    )
    .await;
    assert_refused(
        &no_query,
        "topic=t",
        &[("Cookie", &format!("ssegw_token={t}"))],
        401,
        "missing token: subscribe on topic \"t\" needs one (send Authorization: Bearer <token>)",
    )
    .await;
}

#[actix_web::test]
async fn cors_allows_the_configured_origin_only() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &["--anonymous-publish", "public.*"]);
    let preflight = |origin: &'static str| {
        let gw = &gw;
        async move {
            let headers = [
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization,content-type",
                ),
            ];
            request(gw, "OPTIONS", "/publish", &headers, None).await
        }
    };
    let allowed = preflight(ORIGIN).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let h = |name: &str| {
        allowed
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(h("access-control-allow-origin").as_deref(), Some(ORIGIN));
    assert_eq!(
        h("access-control-allow-credentials").as_deref(),
        Some("true")
    );
    let methods = h("access-control-allow-methods").unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = h("access-control-allow-headers").unwrap().to_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{headers}"
    );

    let denied = preflight("https://evil.test").await;
    assert_eq!(denied.status, 400, "{}", denied.body);
    assert!(no_cors_headers(&denied.headers), "{:?}", denied.headers);

    // Actual requests: the allowed origin is named with credentials; another gets nothing the
    // browser would accept (and no event: its stream is the same for the page, but unreadable).
    let publish = json!({"topic": "public.x", "data": "x"});
    let ok = request(
        &gw,
        "POST",
        "/publish",
        &[("Origin", ORIGIN)],
        Some(&publish),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.headers.get("access-control-allow-origin").unwrap(),
        ORIGIN
    );
    assert_eq!(
        ok.headers.get("access-control-allow-credentials").unwrap(),
        "true"
    );
    let other = request(
        &gw,
        "POST",
        "/publish",
        &[("Origin", "https://evil.test")],
        Some(&publish),
    )
    .await;
    assert!(no_cors_headers(&other.headers), "{:?}", other.headers);
    // An EventSource with withCredentials from the allowed origin: its stream names the origin.
    let stream = awc::Client::default()
        .get(gw.url("/events?topic=public.x"))
        .insert_header(("Origin", ORIGIN))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers().get("access-control-allow-origin").unwrap(),
        ORIGIN
    );
    assert_eq!(
        stream
            .headers()
            .get("access-control-allow-credentials")
            .unwrap(),
        "true"
    );
    drop(stream);
    let stream = awc::Client::default()
        .get(gw.url("/events?topic=public.x"))
        .insert_header(("Origin", "https://evil.test"))
        .send()
        .await
        .unwrap();
    assert!(no_cors_headers(stream.headers()), "{:?}", stream.headers());
    drop(stream);

    // Without --cors-origins, no CORS headers at all and no preflight.
    let same_origin = Gateway::with_redis(&redis, &["--anonymous-publish", "*"]);
    let reply = request(
        &same_origin,
        "OPTIONS",
        "/publish",
        &[
            ("Origin", ORIGIN),
            ("Access-Control-Request-Method", "POST"),
        ],
        None,
    )
    .await;
    assert_eq!(reply.status, 405);
    assert!(no_cors_headers(&reply.headers));
    let reply = request(
        &same_origin,
        "POST",
        "/publish",
        &[("Origin", ORIGIN)],
        Some(&publish),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert!(no_cors_headers(&reply.headers));
}

fn no_cors_headers(headers: &actix_web::http::header::HeaderMap) -> bool {
    headers
        .keys()
        .all(|k| !k.as_str().starts_with("access-control-"))
}

#[actix_web::test]
async fn a_stream_ends_when_its_token_expires() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let mut c = claims(&["t"], &[]);
    let exp = now() + 2;
    c["exp"] = exp.into();
    let t = sign(Signer::Es256, &c);
    let mut sse = Sse::open_with(&gw, "topic=t", &[("Authorization", &bearer(&t))]).await;
    sse.baseline().await;
    redis.fcall_publish("t", "before", None);
    assert_eq!(sse.next().await.data, "before");
    let expired = sse.next().await;
    let ended = std::time::SystemTime::now();
    assert_eq!(expired.event, "ssegw-expired");
    assert_eq!(expired.data, r#"{"reason":"token-expired"}"#);
    assert!(
        ended >= std::time::UNIX_EPOCH + Duration::from_secs(exp),
        "closed before the token expired"
    );
    assert!(
        sse.try_next().await.is_none(),
        "the stream goes on after expiry"
    );
    assert_eq!(gw_counter(&gw, "expired"), 1);
    // Reconnecting with the same token is refused: the revoked user stays out.
    assert_refused(
        &gw,
        "topic=t",
        &[("Authorization", &bearer(&t))],
        401,
        "expired",
    )
    .await;

    // An expiry thirty thousand years out (a trusted issuer's mistake) is no timer trouble.
    let mut c = claims(&["far"], &[]);
    c["exp"] = 1_000_000_000_000u64.into();
    let far = bearer(&sign(Signer::Hs256, &c));
    assert_streams(&gw, &redis, "far", "topic=far", &[("Authorization", &far)]).await;

    // Switched off, the stream outlives its token.
    let lenient = gateway(&redis, &["--close-on-expiry", "false"]);
    let mut c = claims(&["t"], &[]);
    c["exp"] = (now() + 1).into();
    let t = sign(Signer::Hs256, &c);
    let mut sse = Sse::open_with(&lenient, "topic=t", &[("Authorization", &bearer(&t))]).await;
    sse.baseline().await;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    redis.fcall_publish("t", "after", None);
    assert_eq!(sse.next().await.data, "after");
}

/// Tokens, cookies and payloads never reach the log, even at the most verbose level.
#[actix_web::test]
async fn logs_hold_no_tokens_cookies_or_payloads() {
    let redis = RedisServer::start();
    let log = tempdir("log").join("gateway.log");
    let process = GatewayProcess::start_logging(
        &redis.url(),
        &["--jwt-secret", SECRET, "--anonymous-publish", "*"],
        &log,
    );
    let gw = process.addr;
    let good = token(&["t"]);
    let expired = sign(
        Signer::Hs256,
        &json!({"exp": now() - 100, "ssegw": {"subscribe": ["t"]}}),
    );
    let payload = "PAYLOAD-4f1c9a";
    let mut sse = Sse::open_with(&gw, "topic=t", &[("Authorization", &bearer(&good))]).await;
    sse.baseline().await;
    let reply = request(
        &gw,
        "POST",
        "/publish",
        &[],
        Some(&json!({"topic": "t", "data": payload})),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(sse.next().await.data, payload);
    for headers in [
        vec![("Authorization", bearer(&expired))],
        vec![("Cookie", format!("ssegw_token={expired}"))],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = request(&gw, "GET", "/events?topic=t", &headers, None).await;
        assert_eq!(reply.status, 401);
    }
    let reply = request(
        &gw,
        "GET",
        &format!("/events?topic=t&access_token={expired}"),
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 401);
    drop(sse);
    drop(process);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TRACE"), "the log was not verbose:\n{text}");
    for secret in [good.as_str(), expired.as_str(), payload] {
        // The signature part is what makes a token usable; no part may appear.
        for part in secret.split('.') {
            assert!(!text.contains(part), "the log holds {part:?}");
        }
    }
}

fn gw_counter(gw: &impl Replica, name: &str) -> u64 {
    let (status, body) = support::get_json(gw.addr(), "/status");
    assert_eq!(status, 200);
    body[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {body}"))
}

fn base64_url(bytes: Vec<u8>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn tempdir(name: &str) -> PathBuf {
    support::tempdir(&format!("auth-{name}"))
}

/// The documented way to mint a token (docs/authorization.md, "Try it": `deploy/mint-token.sh`,
/// bash and openssl) makes tokens this gateway accepts, for subscribing and for publishing.
#[actix_web::test]
async fn the_mint_script_makes_tokens_the_gateway_accepts() {
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let mint = |args: &[&str]| {
        let output = std::process::Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mint-token.sh"))
            .args(args)
            .args(["--aud", AUDIENCE, "--iss", ISSUER])
            .env("SSEGW_JWT_SECRET", SECRET)
            .output()
            .expect("run deploy/mint-token.sh");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    let t = mint(&[
        "--subscribe",
        "orders.*,news",
        "--publish",
        "orders.eu",
        "--ttl",
        "5m",
    ]);
    let auth = bearer(&t);
    let mut sse = Sse::open_with(
        &gw,
        "topic=orders.eu&topic=news",
        &[("Authorization", &auth)],
    )
    .await;
    sse.baseline().await;
    let body = json!({"topic": "orders.eu", "data": "minted"});
    let reply = request(
        &gw,
        "POST",
        "/publish",
        &[("Authorization", &auth)],
        Some(&body),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(sse.next().await.data, "minted");
    let body = json!({"topic": "news", "data": "not granted"});
    let reply = request(
        &gw,
        "POST",
        "/publish",
        &[("Authorization", &auth)],
        Some(&body),
    )
    .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_refused(
        &gw,
        "topic=orders",
        &[("Authorization", &auth)],
        403,
        "topic \"orders\"",
    )
    .await;
    // Its lifetime is the one asked for.
    let claims = t.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    let ttl = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(ttl, 300);
}

/// A stream that is still replaying history when its token expires ends then too: a slow
/// resuming client cannot stretch a replay past its token's lifetime.
#[actix_web::test]
async fn a_replay_ends_when_its_token_expires() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EVENTS: usize = 300;
    let redis = RedisServer::start();
    let gw = gateway(&redis, &[]);
    let padding = "p".repeat(60_000);
    let first = redis.fcall_publish("t", "first", None);
    for i in 0..EVENTS {
        redis.fcall_publish("t", &format!("{i}:{padding}"), None);
    }
    let mut c = claims(&["t"], &[]);
    let exp = now() + 2;
    c["exp"] = exp.into();
    let t = sign(Signer::Hs256, &c);
    // A reader with a tiny receive window that reads nothing until the token has expired.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gw.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /events?topic=t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
                 Last-Event-ID: {first}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    while std::time::SystemTime::now() < std::time::UNIX_EPOCH + Duration::from_secs(exp) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while !raw.ends_with(b"\r\n0\r\n\r\n") {
        match tokio::time::timeout(support::WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => panic!("the stream did not end after its token expired"),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let expired_at = text
        .find("event: ssegw-expired")
        .expect("an ssegw-expired event");
    let replayed = text[..expired_at].matches("\ndata: ").count();
    assert!(
        replayed < EVENTS,
        "the whole replay ({replayed} events) went out after the token expired"
    );
    assert_eq!(
        text[expired_at..].matches("\ndata: ").count(),
        1,
        "events after the expiry"
    );
}
