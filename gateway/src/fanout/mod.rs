//! The delivery engine: everything between the bus and the client's socket on this replica.
//! The bus hands each event to the `hub` once (`event`), the hub's per-topic channels and
//! per-worker relays carry it to every local subscriber, the `sweep` writes it to caught-up
//! handed-off streams, and each client's `sse::Connection` replays history, follows the live
//! channel and turns gaps, keep-alives, expiry and drain into frames. Nothing here talks to
//! Redis or parses HTTP: history comes through the `Bus`, sockets through the HTTP layer.

pub mod broadcast;
pub mod event;
pub mod hub;
pub mod sse;
pub mod sweep;
