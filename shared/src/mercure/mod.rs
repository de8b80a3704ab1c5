//! The Mercure protocol's wire contract: updates as they are stored and framed (`update`).

pub mod selector;
pub mod update;
