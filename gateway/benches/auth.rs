//! What authorizing one subscription costs: verifying its token with each kind of key (and
//! anonymous access, for comparison). Run with `cargo bench -p sse-gateway --bench auth`;
//! figures in BENCHMARKS.md.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, get_current_timestamp, Algorithm, EncodingKey, Header};
use sse_gateway::auth::{Action, Auth, AuthConfig, VerifyingKey};
use ssegw_protocol::{Scope, Topic, TopicPattern};

const SECRET: &[u8] = b"bench-secret-0123456789abcdef-0123456789";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name),
    )
    .unwrap()
}

fn auth() -> Auth {
    let keys = vec![
        VerifyingKey::secret(SECRET, "bench").unwrap(),
        VerifyingKey::public_pem(&fixture("rsa-public.pem"), "bench").unwrap(),
        VerifyingKey::public_pem(&fixture("ec-public.pem"), "bench").unwrap(),
    ];
    Auth::new(AuthConfig {
        keys,
        algorithms: vec![Algorithm::HS256, Algorithm::RS256, Algorithm::ES256],
        audience: vec![],
        issuer: vec![],
        leeway: Duration::from_secs(5),
        claim: "ssegw".into(),
        anonymous_subscribe: Scope::new(vec![TopicPattern::new("public.*").unwrap()]),
        anonymous_publish: Scope::default(),
        cookie: None,
        query_token: true,
        close_on_expiry: true,
    })
}

fn token(algorithm: Algorithm, key: &EncodingKey) -> String {
    let claims = serde_json::json!({
        "sub": "user-1",
        "exp": get_current_timestamp() + 3600,
        "ssegw": {"subscribe": ["orders.*", "users/42", "news"]},
    });
    encode(&Header::new(algorithm), &claims, key).unwrap()
}

fn authorize(c: &mut Criterion) {
    let auth = auth();
    let topic = Topic::new("orders.eu").unwrap();
    let public = Topic::new("public.news").unwrap();
    let cases = [
        (
            "HS256",
            token(Algorithm::HS256, &EncodingKey::from_secret(SECRET)),
        ),
        (
            "RS256",
            token(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(&fixture("rsa-private.pem")).unwrap(),
            ),
        ),
        (
            "ES256",
            token(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(&fixture("ec-private.pem")).unwrap(),
            ),
        ),
    ];
    let mut group = c.benchmark_group("authorize a subscription");
    for (name, token) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| {
                auth.authorize(Action::Subscribe, Some(black_box(token)), [&topic])
                    .unwrap()
            })
        });
    }
    group.bench_function("anonymous", |b| {
        b.iter(|| {
            auth.authorize(Action::Subscribe, None, [black_box(&public)])
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, authorize);
criterion_main!(benches);
