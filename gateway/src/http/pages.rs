//! The built-in pages (`--pages`, on by default): the demo at `/`, where a newcomer subscribes,
//! watches events, resumes and publishes, and the live status page at `/status/page`, fed by
//! `/status/stream`. Their HTML, JS and CSS live in `gateway/assets/` and are compiled into the
//! binary, so nothing needs building or installing to see them. The pages talk to the gateway
//! only through its public API; the status stream only reads the replica's counters.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use ssegw_protocol::frame;

use super::error::{only, ApiError};
use super::state::{status_json, AppState};

/// How often `/status/stream` sends the replica's status.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Most `/status/stream` responses open at once on a replica: the status page is for people,
/// a few at a time.
pub const MAX_STATUS_STREAMS: usize = 64;

/// Every page and static file, by the path it is served at.
const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../assets/demo.html"),
    },
    Asset {
        path: "/status/page",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../assets/status.html"),
    },
    Asset {
        path: "/assets/demo.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/demo.js"),
    },
    Asset {
        path: "/assets/status.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/status.js"),
    },
    Asset {
        path: "/assets/pages.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/pages.css"),
    },
    Asset {
        path: "/assets/icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../assets/icon.svg"),
    },
];

/// The pages load only their own scripts and styles and connect only to this origin, so a
/// strict policy holds; it also keeps them out of other sites' frames.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; base-uri 'none'; form-action 'none'; \
                                       frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

impl Asset {
    /// A validator that changes whenever the file does: browsers revalidate (`no-cache`) and
    /// get a `304` while the binary is the same, and the new file right after an upgrade.
    fn etag(&self) -> String {
        let mut hasher = std::hash::DefaultHasher::new();
        self.body.hash(&mut hasher);
        format!("\"{}-{:016x}\"", env!("CARGO_PKG_VERSION"), hasher.finish())
    }
}

/// Registers the pages, their files and `/status/stream`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    for asset in ASSETS {
        let etag = asset.etag();
        cfg.service(only(
            web::resource(asset.path).route(web::get().to(move |req: HttpRequest| {
                let response = serve(asset, &etag, &req);
                async move { response }
            })),
            "GET",
        ));
    }
    cfg.service(only(
        web::resource("/status/stream").route(web::get().to(status_stream)),
        "GET",
    ));
}

fn serve(asset: &Asset, etag: &str, req: &HttpRequest) -> HttpResponse {
    let unchanged = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag));
    let mut response = if unchanged {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::ETAG, etag))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY));
    if unchanged {
        response.finish()
    } else {
        response
            .content_type(asset.content_type)
            .body(Bytes::from_static(asset.body))
    }
}

/// `GET /status/stream`: this replica's `/status` JSON as an SSE event every second, plus
/// `delivery_rate`, the events written to clients per second since the previous one (`null`
/// in the first). It ends when the replica drains, so it never holds up a shutdown; the
/// browser then reconnects, to another replica behind a balancer. It is not counted among the
/// replica's `connections`, which are event streams; at most `MAX_STATUS_STREAMS` are open.
async fn status_stream(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // Held by the response body until it ends.
    let place = state
        .status_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::unavailable(format!(
                "{MAX_STATUS_STREAMS} status streams are open on this replica, retry later"
            ))
        })?;
    let state = state.into_inner();
    let draining = state.drain.clone().cancelled_owned();
    let mut ticks = tokio::time::interval(STATUS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry_ms = state.stream.retry.as_millis() as u64;
    let updates = futures_util::stream::unfold(
        (ticks, None::<(Instant, u64)>),
        move |(mut ticks, previous)| {
            let state = state.clone();
            async move {
                ticks.tick().await;
                let now = Instant::now();
                let delivered = state.stats.delivered();
                let mut body = status_json(&state);
                body["delivery_rate"] = match previous {
                    Some((then, before)) => {
                        let seconds = now.duration_since(then).as_secs_f64().max(1e-3);
                        let rate = delivered.saturating_sub(before) as f64 / seconds;
                        ((rate * 10.0).round() / 10.0).into()
                    }
                    None => serde_json::Value::Null,
                };
                let frame = frame::event_body(None, &body.to_string());
                Some((frame, (ticks, Some((now, delivered)))))
            }
        },
    );
    let body = futures_util::stream::once(async move { frame::preamble(retry_ms, None) })
        .chain(updates)
        .take_until(draining)
        .map(move |frame| {
            let _held = &place;
            Ok::<_, std::convert::Infallible>(frame)
        });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_have_distinct_paths_and_etags() {
        let mut paths: Vec<_> = ASSETS.iter().map(|a| a.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), ASSETS.len(), "a path is served twice");
        let mut etags: Vec<_> = ASSETS.iter().map(Asset::etag).collect();
        etags.sort_unstable();
        etags.dedup();
        assert_eq!(etags.len(), ASSETS.len(), "two assets share an ETag");
        assert!(ASSETS.iter().all(|a| !a.body.is_empty()));
    }

    #[test]
    fn pages_reference_only_served_files() {
        // Every `/assets/...` the HTML and JS name must be served, or the page breaks silently.
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).unwrap();
            for (at, _) in text.match_indices("\"/assets/") {
                let referenced = &text[at + 1..];
                let referenced = &referenced[..referenced.find('"').unwrap()];
                assert!(
                    ASSETS.iter().any(|a| a.path == referenced),
                    "{} references {referenced}, which is not served",
                    asset.path
                );
            }
        }
    }
}
