//! `Target`: the kind of server under test (the gateway, or a baseline) and what differs
//! between them that the config, the request builder and the publisher must know. No I/O.

use clap::ValueEnum;

/// The server under test. The baselines answer the same question with the same client,
/// publisher and accounting, so the gateway can be compared with them in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// sse-gateway replicas.
    Gateway,
    /// `ssegw-baseline`: a plain actix-web handler streaming from a tokio broadcast channel
    /// (no Redis, no ids).
    Actix,
    /// `ssegw-floor`: the least work any server can do here, as `../shared/bench/floor` does
    /// it (one `write` per socket per event from two threads, nothing else): the ratio of the
    /// gateway's latency to the floor's is what the machine leaves to improve.
    Floor,
    /// `../shared/bench/floor` itself (`--gateway-bin` names its build): held streams, and
    /// publishing is its own `POST /go?count=N&rate=R`, which stamps each event as its writes
    /// begin and starts the next once they are done. So what it reports leaves out the time an
    /// event waits for the ones before it, and where its writes take longer than the period it
    /// publishes fewer events a second than asked: the harness reports the rate it reached.
    Reference,
    /// nginx with the nchan module, storing messages in Redis.
    Nchan,
    /// sse-gateway replicas as a Mercure hub (`--mercure true`): subscribe to and publish at
    /// `/.well-known/mercure`. Measured as the baselines are (fan-out, one topic per
    /// connection, no resumes), to compare the Mercure path with the native one in one run.
    Mercure,
}

/// The HMAC key the harness gives a spawned Mercure hub (`--mercure-jwt-secret`): the one the
/// Mercure hub's own conformance suite uses. A load-test key, for nothing else.
pub const MERCURE_SECRET: &str = "!ChangeThisMercureHubJWTSecretKey!";
/// A token signed with `MERCURE_SECRET`, no expiry, claim
/// `{"mercure":{"publish":["*"],"subscribe":["*"]}}`: the publisher's `Authorization`.
pub const MERCURE_TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdLCJzdWJzY3JpYmUiOlsiKiJdfX0.bVXdlWXwfw9ySx7-iV5OpUSHo34RkjUdVzDLBcc6l_g";

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Gateway => "gateway",
            Target::Actix => "actix",
            Target::Floor => "floor",
            Target::Reference => "reference",
            Target::Nchan => "nchan",
            Target::Mercure => "mercure",
        }
    }

    /// Whether a reconnecting client can resume with `Last-Event-ID` and be owed what it
    /// missed. Only the gateway promises that; the harness resumes nowhere else.
    pub fn resumes(self) -> bool {
        self == Target::Gateway
    }
}
