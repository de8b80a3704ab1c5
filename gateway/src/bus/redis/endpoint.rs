//! `Endpoint`: where the Redis primary is now. With `--redis-url` it is one fixed address;
//! with `--redis-sentinels` it is whichever node the sentinels name, asked again whenever the
//! primary may have changed: a connection error, a `READONLY` reply, a canary that finds its
//! node demoted, or the sentinels' own `+switch-master`. Each such hint bumps the endpoint's
//! epoch, which the command pool and the subscriber watch: neither keeps talking to a node
//! once it may no longer be the primary.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::reply::explain;
use crate::bus::BusError;
use crate::config::{RedisTarget, SentinelTarget, Topology};

pub(super) struct Endpoint {
    target: RedisTarget,
    timeout: Duration,
    /// Bumped each time the primary may have changed. Sent by whoever notices (commands,
    /// the canary, the `+switch-master` watch); received by the command pool (which asks
    /// again before its next connection) and the subscriber (which reconnects and
    /// backfills). Never bumped for a standalone address, which cannot move.
    epoch: watch::Sender<u64>,
}

impl Endpoint {
    pub(super) fn new(target: RedisTarget, timeout: Duration) -> Endpoint {
        Endpoint {
            target,
            timeout,
            epoch: watch::channel(0).0,
        }
    }

    /// `host:port`, or the master name and its sentinels: for the log.
    pub(super) fn address(&self) -> &str {
        self.target.address()
    }

    pub(super) fn is_sentinel(&self) -> bool {
        matches!(self.target.topology(), Topology::Sentinel(_))
    }

    /// How to connect to the primary now: the fixed address, or the node the sentinels name.
    pub(super) async fn primary(&self) -> Result<redis::ConnectionInfo, BusError> {
        match self.target.topology() {
            Topology::Standalone(info) => Ok(info.clone()),
            Topology::Sentinel(sentinel) => self.ask_sentinels(sentinel).await,
            Topology::Cluster(_) => Err(BusError::Unavailable(
                "a cluster has no single primary".into(),
            )),
        }
    }

    /// Asks the sentinels in turn for the primary's address; the first that answers wins.
    async fn ask_sentinels(
        &self,
        target: &SentinelTarget,
    ) -> Result<redis::ConnectionInfo, BusError> {
        let mut failures = Vec::new();
        for (info, address) in target.sentinels.iter().zip(&target.sentinel_addresses) {
            let mut ask = redis::cmd("SENTINEL");
            ask.arg("get-master-addr-by-name").arg(&target.master_name);
            let answer = async {
                let client = redis::Client::open(info.clone())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                ask.query_async::<Option<(String, u16)>>(&mut conn).await
            };
            match tokio::time::timeout(self.timeout, answer).await {
                Ok(Ok(Some((host, port)))) => {
                    return target.node(&host, port).map_err(|e| {
                        BusError::Unavailable(format!("primary {host}:{port}: {}", explain(&e)))
                    })
                }
                Ok(Ok(None)) => failures.push(format!(
                    "{address} does not know the master {:?}",
                    target.master_name
                )),
                Ok(Err(e)) => failures.push(format!("{address}: {}", explain(&e))),
                Err(_) => failures.push(format!("{address}: no answer in time")),
            }
        }
        Err(BusError::Unavailable(format!(
            "no sentinel names the primary: {}",
            failures.join("; ")
        )))
    }

    /// The primary may have changed: everyone asks again. A standalone address cannot move.
    pub(super) fn moved(&self, why: &str) {
        if self.is_sentinel() {
            tracing::info!(redis = %self.address(), %why, "asking the sentinels for the primary again");
            self.epoch.send_modify(|epoch| *epoch += 1);
        }
    }

    pub(super) fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// A receiver that sees every later `moved`.
    pub(super) fn watch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Follows the sentinels' `+switch-master` announcements until `shutdown`, so that a
    /// failover is acted on at once rather than at the next error or canary. Does nothing for
    /// a standalone address.
    pub(super) async fn watch_switches(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let Topology::Sentinel(target) = self.target.topology() else {
            return;
        };
        let mut next = 0;
        loop {
            let info = target.sentinels[next % target.sentinels.len()].clone();
            next += 1;
            let follow = async {
                let client = redis::Client::open(info)?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    // "<master name> <old ip> <old port> <new ip> <new port>"
                    let text = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                    if text.split(' ').next() == Some(target.master_name.as_str()) {
                        self.moved("the sentinels switched the primary");
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = follow => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}
