//! The wire contract of sse-gateway, shared by the gateway, the load tester and any Rust
//! service: topic names and the patterns tokens grant them by, event ids and resume cursors,
//! SSE framing, and the Redis layout and Lua publish logic. No async runtime, web framework or
//! Redis client in here.

pub mod cursor;
pub mod event_id;
pub mod frame;
pub mod mercure;
pub mod pattern;
pub mod retention;
pub mod script;
pub mod topic;
pub mod trace;

pub use event_id::StreamId;
pub use pattern::{Scope, TopicPattern};
pub use topic::{Topic, TopicSet};
pub use trace::Traceparent;
