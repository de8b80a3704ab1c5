//! `ssegw-baseline`: a measuring stick for the gateway, not a product. A plain actix-web
//! handler streams each connection from a tokio broadcast channel per topic: no Redis, no event
//! ids, no resume, no history. `ssegw-loadtest --target actix` measures it with the same client,
//! publisher and accounting as the gateway; keep it as small as a first SSE server would be.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Parser;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

/// Connections a worker accepts at most (actix's default, 25,000, stated here because the
/// harness opens 20,000 per worker and more).
const MAX_CONNECTIONS_PER_WORKER: usize = 25_000;

#[derive(Parser, Debug)]
#[command(
    name = "ssegw-baseline",
    version,
    about = "Baseline SSE server for ssegw-loadtest --target actix: actix-web streaming from a \
             tokio broadcast channel per topic (no Redis, no ids)"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// actix worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// Messages each topic's broadcast channel holds.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    capacity: u32,
}

/// One broadcast channel per topic, created by its first subscriber and never removed (a
/// measuring stick holds its topics for one run). `POST /publish` sends; each `GET /events`
/// connection holds a receiver. A receiver more than `capacity` messages behind skips ahead to
/// the oldest one still held; a publish to a topic nobody subscribed reaches nobody.
struct Topics {
    capacity: usize,
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<str>>>>,
}

impl Topics {
    fn subscribe(&self, topic: String) -> broadcast::Receiver<Arc<str>> {
        let mut channels = self.channels.lock().expect("topics poisoned");
        channels
            .entry(topic)
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .subscribe()
    }

    /// Sends `message` to the topic's receivers; returns how many there were.
    fn publish(&self, topic: &str, message: Arc<str>) -> usize {
        let channels = self.channels.lock().expect("topics poisoned");
        channels
            .get(topic)
            .and_then(|sender| sender.send(message).ok())
            .unwrap_or(0)
    }
}

#[derive(serde::Deserialize)]
struct TopicQuery {
    topic: Option<String>,
}

/// One SSE event, formatted for each connection.
fn frame(message: &str) -> web::Bytes {
    web::Bytes::from(format!("data: {message}\n\n"))
}

/// `GET /events?topic=NAME`: an endless `text/event-stream` of the topic's messages.
async fn events(topics: web::Data<Topics>, query: web::Query<TopicQuery>) -> HttpResponse {
    let Some(topic) = query.into_inner().topic else {
        return HttpResponse::BadRequest().body("give ?topic=NAME\n");
    };
    let messages = BroadcastStream::new(topics.subscribe(topic));
    // An error is a lagged receiver, which has already skipped ahead: go on with the next.
    let body = messages
        .filter_map(|message| async move { message.ok().map(|m| Ok::<_, Infallible>(frame(&m))) });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}

/// `POST /publish?topic=NAME` with the message as the body: `{"receivers":n}`.
async fn publish(
    topics: web::Data<Topics>,
    query: web::Query<TopicQuery>,
    body: web::Bytes,
) -> HttpResponse {
    let Some(topic) = query.into_inner().topic else {
        return HttpResponse::BadRequest().body("give ?topic=NAME\n");
    };
    let message = match std::str::from_utf8(&body) {
        Ok(text) if !text.contains(['\n', '\r']) => text,
        _ => return HttpResponse::BadRequest().body("the body must be one line of UTF-8 text\n"),
    };
    let receivers = topics.publish(&topic, message.into());
    HttpResponse::Ok().json(serde_json::json!({ "receivers": receivers }))
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/events", web::get().to(events))
        .route("/publish", web::post().to(publish))
        .route("/readyz", web::get().to(HttpResponse::Ok));
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    ssegw_loadtest::raise_open_file_limit();
    // Built once, outside the factory, which runs once per worker.
    let topics = web::Data::new(Topics {
        capacity: args.capacity as usize,
        channels: Mutex::default(),
    });
    // No compression middleware: it would hold SSE frames back.
    HttpServer::new(move || App::new().app_data(topics.clone()).configure(routes))
        .workers(args.workers.into())
        .backlog(4096)
        .max_connections(MAX_CONNECTIONS_PER_WORKER)
        // Streams never end by themselves: don't wait for them on SIGTERM.
        .shutdown_timeout(1)
        .bind(args.listen)?
        .run()
        .await
}

#[cfg(test)]
mod tests {
    use actix_web::body::MessageBody;
    use actix_web::test::{call_and_read_body_json, call_service, init_service, TestRequest};

    use super::*;

    #[test]
    fn frames() {
        assert_eq!(frame(r#"{"t":0}"#), "data: {\"t\":0}\n\n");
    }

    #[actix_web::test]
    async fn publish_reaches_subscribers() {
        let topics = web::Data::new(Topics {
            capacity: 4,
            channels: Mutex::default(),
        });
        let app = init_service(App::new().app_data(topics).configure(routes)).await;
        let request = |method: TestRequest, uri: &str, body: &'static [u8]| {
            method.uri(uri).set_payload(body).to_request()
        };

        let unheard = request(TestRequest::post(), "/publish?topic=a", b"early");
        let answer: serde_json::Value = call_and_read_body_json(&app, unheard).await;
        assert_eq!(answer["receivers"], 0);

        let stream = request(TestRequest::get(), "/events?topic=a", b"");
        let response = call_service(&app, stream).await;
        assert_eq!(response.status(), 200);
        let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok());
        assert_eq!(header("content-type"), Some("text/event-stream"));
        assert_eq!(header("cache-control"), Some("no-cache"));
        let mut body = Box::pin(response.into_body());

        let heard = request(TestRequest::post(), "/publish?topic=a", b"hello");
        let answer: serde_json::Value = call_and_read_body_json(&app, heard).await;
        assert_eq!(answer["receivers"], 1);
        let chunk = std::future::poll_fn(|cx| body.as_mut().poll_next(cx)).await;
        assert_eq!(
            chunk.expect("a frame").expect("no error"),
            "data: hello\n\n"
        );

        for (uri, payload) in [
            ("/publish", &b"x"[..]),
            ("/publish?topic=a", b"\xff"),
            ("/publish?topic=a", b"two\nlines"),
        ] {
            let bad = request(TestRequest::post(), uri, payload);
            let status = call_service(&app, bad).await.status();
            assert_eq!(status, 400, "{uri} {payload:?}");
        }
        let no_topic = request(TestRequest::get(), "/events", b"");
        assert_eq!(call_service(&app, no_topic).await.status(), 400);
        let ready = request(TestRequest::get(), "/readyz", b"");
        assert_eq!(call_service(&app, ready).await.status(), 200);
    }
}
