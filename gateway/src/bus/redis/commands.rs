//! `Commands`: the pool of command connections to Redis (deadpool), shared by the request
//! handlers and the subscriber task: `FCALL`s with a timeout, the function library loaded again
//! when Redis lost it, and pipelined reads of many topics. The only place that runs commands.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool;
use redis::Value;
use ssegw_protocol::script;
use ssegw_protocol::{StreamId, Topic};

use super::reply::{classify, malformed, parse_page, unavailable};
use crate::bus::{BusError, Page};

/// `FCALL ssegw_read 1 <topic> <after> <count>`; without `after`, only the head is asked for.
pub(super) fn read_cmd(topic: &Topic, after: Option<StreamId>, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(script::READ_FUNCTION)
        .arg(1)
        .arg(topic.as_str())
        .arg(after.map_or(String::new(), |id| id.to_string()))
        .arg(count);
    cmd
}

/// Command-connection work shared by request handlers and the subscriber task.
#[derive(Clone)]
pub(super) struct Commands {
    pub(super) pool: Pool,
    pub(super) library: Arc<str>,
    /// `--redis-install-functions`: load the library when it is missing, or only say so.
    pub(super) install_functions: bool,
    pub(super) timeout: Duration,
}

impl Commands {
    pub(super) async fn connection(&self) -> Result<deadpool_redis::Connection, BusError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_redis::PoolError::Backend(e) => unavailable(e),
            other => BusError::Unavailable(other.to_string()),
        })
    }

    /// Runs an `FCALL`, loading the library first if Redis lost it (a restart without
    /// persistence, `FUNCTION FLUSH`).
    pub(super) async fn fcall<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, BusError> {
        let mut conn = self.connection().await?;
        self.fcall_on(&mut conn, cmd).await
    }

    pub(super) async fn fcall_on<T: redis::FromRedisValue>(
        &self,
        conn: &mut deadpool_redis::Connection,
        cmd: &redis::Cmd,
    ) -> Result<T, BusError> {
        match self.query(cmd, conn).await {
            Err(BusError::Rejected(msg)) if msg.contains("Function not found") => {
                self.load_library(conn).await?;
                self.query(cmd, conn).await
            }
            other => other,
        }
    }

    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        conn: &mut deadpool_redis::Connection,
    ) -> Result<T, BusError> {
        match tokio::time::timeout(self.timeout, cmd.query_async(conn)).await {
            Err(_) => Err(BusError::Unavailable("Redis did not answer in time".into())),
            Ok(Err(e)) => Err(classify(e)),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// Makes sure Redis has the function library: loads it (`FUNCTION LOAD REPLACE`), or,
    /// with `--redis-install-functions false`, only checks that an administrator did.
    pub(super) async fn load_library(
        &self,
        conn: &mut deadpool_redis::Connection,
    ) -> Result<(), BusError> {
        if !self.install_functions {
            let mut cmd = redis::cmd("FUNCTION");
            cmd.arg("LIST").arg("LIBRARYNAME").arg(script::LIBRARY_NAME);
            let libraries: Vec<Value> = self.query(&cmd, conn).await?;
            return match libraries.is_empty() {
                false => Ok(()),
                true => Err(BusError::Unavailable(format!(
                    "the {} function library is not in Redis, and --redis-install-functions is \
                     false: load it once with `sse-gateway script | redis-cli -x FUNCTION LOAD \
                     REPLACE`",
                    script::LIBRARY_NAME
                ))),
            };
        }
        let mut cmd = redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(&*self.library);
        self.query::<String>(&cmd, conn).await.map(drop)
    }

    /// Reads several topics in one pipelined round trip: `count` events after each position,
    /// or only the head where no position is given.
    pub(super) async fn read_many(
        &self,
        requests: &[(&Topic, Option<StreamId>)],
        count: usize,
    ) -> Result<Vec<Page>, BusError> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        for (topic, after) in requests {
            pipe.add_command(read_cmd(topic, *after, count));
        }
        let replies: Vec<Value> =
            match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
                Err(_) => return Err(BusError::Unavailable("Redis did not answer in time".into())),
                Ok(result) => result.map_err(classify)?,
            };
        replies
            .into_iter()
            .map(parse_page)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(malformed)
    }
}
