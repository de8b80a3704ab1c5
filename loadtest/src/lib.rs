//! ssegw-loadtest: the load-test harness of sse-gateway. `run::run` carries out one checked
//! `config::Plan` and returns its `report::Report`; `worker::main` is the same harness running
//! one shard of connections for a parent. Talks to gateways only through their public contract
//! (HTTP, and `FCALL ssegw_publish` on Redis).

pub mod chart;
pub mod client;
pub mod config;
pub mod fleet;
pub mod http1;
pub mod latency;
pub mod layout;
pub mod payload;
pub mod procstat;
pub mod publisher;
pub mod report;
pub mod run;
pub mod sse;
pub mod target;
pub mod tracking;
pub mod worker;

/// Raises this process's open-file limit to its hard limit: every connection is a file.
pub fn raise_open_file_limit() {
    // Best effort: a run that needs more files than it gets reports the connect errors.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
}
