//! The HTTP surface: the route table, and what it is made of: the handlers of the API
//! (`api`; the reads `presence` and `history`), the one error type that maps to responses
//! (`error`), what every handler shares (`state`), the built-in pages, the listener that hands
//! event streams off (`handoff`) and TLS. Handlers validate everything before touching the hub or the bus; nothing here frames
//! events or talks to Redis directly.

pub mod api;
pub mod error;
pub mod handoff;
pub mod history;
pub mod pages;
pub mod pipeline;
pub mod presence;
pub mod state;
pub mod tls;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};

pub use api::{PublishBody, PublishRequest, SubscribeRequest};
pub use error::ApiError;
pub use state::AppState;

use api::{events, healthz, metrics, publish, readyz, status};
use error::only;

/// Every route; with `pages`, also the demo and status pages (`pages::routes`); with
/// `mercure`, the Mercure hub (`mercure::routes`).
pub fn routes(cfg: &mut web::ServiceConfig, pages: bool, mercure: bool) {
    if mercure {
        crate::mercure::routes(cfg);
    }
    cfg.service(only(
        web::resource("/events").route(web::get().to(events)),
        "GET",
    ))
    .service(only(
        web::resource("/publish").route(web::post().to(publish)),
        "POST",
    ))
    .service(only(
        web::resource("/presence").route(web::get().to(presence::presence)),
        "GET",
    ))
    .service(only(
        web::resource("/history").route(web::get().to(history::history)),
        "GET",
    ))
    .service(only(
        web::resource("/healthz").route(web::get().to(healthz)),
        "GET",
    ))
    .service(only(
        web::resource("/readyz").route(web::get().to(readyz)),
        "GET",
    ))
    .service(only(
        web::resource("/status").route(web::get().to(status)),
        "GET",
    ))
    .service(only(
        web::resource("/metrics").route(web::get().to(metrics)),
        "GET",
    ));
    if pages {
        pages::routes(cfg);
    }
    cfg.default_service(web::to(move |req: HttpRequest| async move {
        let pages = if pages {
            " and the pages /, /status/page (with /status/stream)"
        } else {
            ""
        };
        Err::<HttpResponse, _>(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no route for {}; see /events, /publish, /presence, /history, /healthz, /readyz, \
                 /status, /metrics{pages}",
                req.path()
            ),
        ))
    }));
}
