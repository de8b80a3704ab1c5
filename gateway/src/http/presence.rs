//! `GET /presence?topic=T[&topic=U...]`: how many subscribers each topic has across the fleet,
//! and how fresh the figure is, authorized as subscribing to those topics is. The figures come
//! from the bus (`bus::presence`); here the request is parsed and the answer written.

use std::collections::BTreeSet;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use ssegw_protocol::Topic;

use super::api::{subscriber_grant, topic_param};
use super::error::ApiError;
use super::state::AppState;
use crate::bus::TopicPresence;
use crate::config::Redacted;

/// Most distinct topics one request may ask about.
pub const MAX_TOPICS: usize = 100;

/// The parsed query of `GET /presence`.
#[derive(Debug)]
pub struct PresenceRequest {
    /// Sorted, without repeats.
    pub topics: Vec<Topic>,
    /// The `access_token` query parameter, if sent.
    pub access_token: Option<Redacted>,
}

impl PresenceRequest {
    /// `topic=` (repeatable, at least one, at most `MAX_TOPICS` distinct) and `access_token=`;
    /// other parameters are ignored.
    pub fn parse(query: &str) -> Result<PresenceRequest, ApiError> {
        let mut topics = BTreeSet::new();
        let mut access_token = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "topic" => {
                    topics.insert(topic_param(&value)?);
                    if topics.len() > MAX_TOPICS {
                        return Err(ApiError::bad_request(format!(
                            "too many topics: at most {MAX_TOPICS} per request"
                        )));
                    }
                }
                "access_token" if !value.is_empty() => {
                    access_token = Some(Redacted(value.into_owned()))
                }
                _ => {}
            }
        }
        if topics.is_empty() {
            return Err(ApiError::bad_request(
                "missing topic: add ?topic=<name> (repeatable)",
            ));
        }
        Ok(PresenceRequest {
            topics: topics.into_iter().collect(),
            access_token,
        })
    }
}

/// `GET /presence`. Answers 404 when `--presence-interval 0` turned presence off: a replica
/// that does not report cannot give the fleet's figure.
pub(super) async fn presence(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let Some(config) = state.presence else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "presence is off on this replica (--presence-interval 0)",
        ));
    };
    let request = PresenceRequest::parse(req.query_string())?;
    subscriber_grant(
        &req,
        request.access_token.as_ref(),
        request.topics.iter(),
        &state,
    )?;
    let figures = state.bus.presence(&request.topics).await?;
    // The embedded bus counts when asked: nothing is reported, nothing expires.
    let (interval, expiry) = match state.bus.describe() {
        "embedded" => (0, 0),
        _ => (
            config.interval.as_millis() as u64,
            config.expiry().as_millis() as u64,
        ),
    };
    Ok(HttpResponse::Ok().json(answer(&request.topics, &figures, interval, expiry)))
}

/// The JSON answer: per topic its figure, then the reporting interval and expiry that bound
/// how fresh every figure is.
fn answer(
    topics: &[Topic],
    figures: &[TopicPresence],
    interval_ms: u64,
    expiry_ms: u64,
) -> serde_json::Value {
    let topics: serde_json::Map<String, serde_json::Value> = topics
        .iter()
        .zip(figures)
        .map(|(topic, figure)| {
            let age_ms = figure.age.map(|age| age.as_millis() as u64);
            let figure = serde_json::json!({
                "subscribers": figure.subscribers,
                "replicas": figure.replicas,
                "age_ms": age_ms,
            });
            (topic.as_str().to_string(), figure)
        })
        .collect();
    serde_json::json!({
        "topics": topics,
        "interval_ms": interval_ms,
        "expiry_ms": expiry_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(query: &str, expected: Result<&[&str], &str>) {
        match (PresenceRequest::parse(query), expected) {
            (Ok(request), Ok(topics)) => {
                let names: Vec<&str> = request.topics.iter().map(Topic::as_str).collect();
                assert_eq!(names, topics, "{query}");
            }
            (Err(e), Err(part)) => assert!(e.message().contains(part), "{query}: {}", e.message()),
            (got, _) => panic!("{query}: unexpected {got:?}"),
        }
    }

    #[test]
    fn parses_presence_queries() {
        check("topic=b&topic=a&topic=b", Ok(&["a", "b"]));
        check("topic=a&access_token=x&other=1", Ok(&["a"]));
        check("", Err("missing topic"));
        check("access_token=x", Err("missing topic"));
        check("topic=a%7Bb%7D", Err("invalid topic \"a{b}\""));
        let many: Vec<String> = (0..=MAX_TOPICS).map(|i| format!("topic=t{i}")).collect();
        check(&many.join("&"), Err("too many topics: at most 100"));
        let enough: Vec<String> = (0..MAX_TOPICS).map(|i| format!("topic=t{i}")).collect();
        assert!(PresenceRequest::parse(&enough.join("&")).is_ok());
    }

    #[test]
    fn answers_per_topic_with_the_bounds() {
        let topics = [Topic::new("a").unwrap(), Topic::new("b").unwrap()];
        let figures = [
            TopicPresence {
                subscribers: 5,
                replicas: 2,
                age: Some(std::time::Duration::from_millis(120)),
            },
            TopicPresence::default(),
        ];
        assert_eq!(
            answer(&topics, &figures, 2000, 6000),
            serde_json::json!({
                "topics": {
                    "a": {"subscribers": 5, "replicas": 2, "age_ms": 120},
                    "b": {"subscribers": 0, "replicas": 0, "age_ms": null},
                },
                "interval_ms": 2000,
                "expiry_ms": 6000,
            })
        );
    }
}
