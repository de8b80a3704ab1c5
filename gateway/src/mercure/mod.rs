//! The Mercure hub (docs/mercure.md): the Mercure protocol at `/.well-known/mercure`, served by
//! every replica from one update log per fleet. The log is the native topic
//! `mercure::update::LOG_TOPIC` (which the native API refuses): updates are appended to it by
//! `FCALL ssegw_m_publish` (`publish`), each replica follows it as any topic, and each
//! subscription filters it (`subscribe`). Tokens have their own keys and rules (`auth`). The
//! native API and its ids are untouched.

pub mod auth;
pub mod publish;
pub mod router;
pub mod subscribe;
pub mod subscriptions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix_web::web;
use ssegw_protocol::mercure::selector::Selector;
use ssegw_protocol::mercure::update::LOG_TOPIC;
use ssegw_protocol::Topic;

use crate::config::MercureConfig;
use crate::http::AppState;

/// Most topics an update may carry and most selectors a subscription may give, as the Mercure
/// hub.
pub const MAX_TOPICS: usize = 1000;
/// Most bytes of selectors a subscription may give. A URI template compiles to a regular
/// expression, which costs some microseconds per byte, and selectors come from anonymous
/// clients: this bounds what one request can make a replica compile.
pub const MAX_SELECTOR_BYTES: usize = 16 * 1024;
/// Distinct selectors kept compiled (`Mercure::selector`); the cache starts over when full.
const SELECTOR_CACHE: usize = 10_000;

/// What the Mercure handlers share.
pub struct Mercure {
    pub auth: auth::MercureAuth,
    /// The hub's update log.
    pub log: Topic,
    /// Selectors compiled once for every subscription and token that names them, as the
    /// Mercure hub caches them. Held only to look up or insert, never across an `.await`.
    selectors: Mutex<HashMap<Box<str>, Selector>>,
    /// The fleet's registry of active subscriptions, with `--mercure-subscriptions true`.
    pub subscriptions: Option<Arc<subscriptions::Registry>>,
}

impl Mercure {
    /// The hub of `config`; with `subscriptions`, its registry of active subscriptions.
    pub fn new(
        config: MercureConfig,
        subscriptions: Option<Arc<subscriptions::Registry>>,
    ) -> Mercure {
        Mercure {
            auth: auth::MercureAuth::new(config),
            log: log_topic(),
            selectors: Mutex::new(HashMap::new()),
            subscriptions,
        }
    }

    /// The selector `text`, compiled at most once while it stays in the cache.
    pub fn selector(&self, text: &str) -> Selector {
        if let Some(selector) = self.cached(text) {
            return selector;
        }
        // Compiled outside the lock: other requests need not wait for it.
        let selector = Selector::new(text);
        let mut cache = self.selectors.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= SELECTOR_CACHE {
            cache.clear();
        }
        cache.insert(text.into(), selector.clone());
        selector
    }

    fn cached(&self, text: &str) -> Option<Selector> {
        let cache = self.selectors.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(text).cloned()
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

/// The hub's update log.
pub fn log_topic() -> Topic {
    Topic::new(LOG_TOPIC).expect("the log topic is a valid topic")
}

/// `/.well-known/mercure`: GET subscribes (HEAD answers its head), POST publishes; GET
/// `/.well-known/mercure/subscriptions...` lists active subscriptions.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(crate::http::error::only(
        web::resource("/.well-known/mercure")
            .route(web::get().to(subscribe::subscribe))
            .route(web::head().to(subscribe::head))
            .route(web::post().to(publish::publish)),
        "GET, HEAD, POST",
    ))
    .service(crate::http::error::only(
        web::resource([
            subscriptions::API_PATH,
            "/.well-known/mercure/subscriptions/{rest:.*}",
        ])
        .route(web::get().to(subscriptions::api)),
        "GET",
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Mercure {
        Mercure::new(
            MercureConfig {
                publisher_keys: Vec::new(),
                subscriber_keys: Vec::new(),
                algorithms: vec![jsonwebtoken::Algorithm::HS256],
                anonymous: true,
                cookie: "mercureAuthorization".into(),
                publish_origins: Some(Vec::new()),
                leeway: std::time::Duration::ZERO,
                subscriptions: false,
            },
            None,
        )
    }

    #[test]
    fn selectors_are_compiled_once_and_the_cache_is_bounded() {
        let hub = hub();
        let a = hub.selector("https://ex.com/books/{id}");
        assert!(a.matches("https://ex.com/books/1"));
        assert_eq!(hub.selectors.lock().unwrap().len(), 1);
        let again = hub.selector("https://ex.com/books/{id}");
        assert!(again.matches("https://ex.com/books/2"));
        assert_eq!(hub.selectors.lock().unwrap().len(), 1);
        for i in 0..SELECTOR_CACHE + 5 {
            hub.selector(&format!("t{i}"));
        }
        assert!(hub.selectors.lock().unwrap().len() <= SELECTOR_CACHE);
    }
}
