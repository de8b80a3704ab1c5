//! The wire contract of sse-gateway, shared by the gateway, the load tester and any Rust
//! service: topic names, event ids and resume cursors, SSE framing, and the Redis layout and
//! Lua publish logic. No async runtime, web framework or Redis client in here.

pub mod cursor;
pub mod event_id;
pub mod frame;
pub mod script;
pub mod topic;

pub use event_id::StreamId;
pub use topic::{Topic, TopicSet};
