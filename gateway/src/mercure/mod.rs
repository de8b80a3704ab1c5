//! The Mercure hub (docs/mercure.md): the Mercure protocol at `/.well-known/mercure`, served by
//! every replica from one update log per fleet. The log is the native topic
//! `mercure::update::LOG_TOPIC` (which the native API refuses): updates are appended to it by
//! `FCALL ssegw_m_publish` (`publish`), each replica follows it as any topic, and each
//! subscription filters it (`subscribe`). Tokens have their own keys and rules (`auth`). The
//! native API and its ids are untouched.

pub mod auth;
pub mod publish;
pub mod subscribe;

use actix_web::web;
use ssegw_protocol::mercure::update::LOG_TOPIC;
use ssegw_protocol::Topic;

use crate::config::MercureConfig;
use crate::http::AppState;

/// Most topics an update may carry and most selectors a subscription may give, as the Mercure
/// hub.
pub const MAX_TOPICS: usize = 1000;

/// What the Mercure handlers share.
pub struct Mercure {
    pub auth: auth::MercureAuth,
    /// The hub's update log.
    pub log: Topic,
}

impl Mercure {
    pub fn new(config: MercureConfig) -> Mercure {
        Mercure {
            auth: auth::MercureAuth::new(config),
            log: Topic::new(LOG_TOPIC).expect("the log topic is a valid topic"),
        }
    }

    /// The largest update accepted (its topics and data together): the log's limit in the
    /// fleet's retention table (the namespace `ssegw.mercure`, else the default).
    pub fn max_update_bytes(&self, state: &AppState) -> usize {
        state
            .bus
            .retention()
            .map_or(state.stream.max_event_bytes, |r| {
                r.limits_for(self.log.as_str()).1.max_data_bytes
            })
    }
}

/// `/.well-known/mercure`: GET subscribes, POST publishes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::http::error::only(
        web::resource("/.well-known/mercure")
            .route(web::get().to(subscribe::subscribe))
            .route(web::post().to(publish::publish)),
        "GET, POST",
    ));
}
