//! `POST /.well-known/mercure`: a form-encoded Mercure update (`topic`, repeatable, the first
//! canonical; `data`, `id`, `type`, `retry`, `private`), checked, authorized against the
//! token's `mercure.publish` selectors, encoded once and appended to the hub's log. Answers
//! 200 with the update's id as `text/plain`.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use ssegw_protocol::mercure::update::{self, Update};
use ssegw_protocol::Traceparent;

use super::auth::Role;
use super::MAX_TOPICS;
use crate::auth::AuthError;
use crate::http::api::read_body;
use crate::http::{ApiError, AppState};

/// The form fields of an update, as sent.
#[derive(Debug, Default)]
pub struct PublishForm {
    pub topics: Vec<String>,
    pub data: Option<String>,
    pub id: Option<String>,
    pub kind: Option<String>,
    pub retry: Option<String>,
    pub private: bool,
}

impl PublishForm {
    /// The fields of a form body. The first of a repeated single-valued field counts, as Go's
    /// `PostForm.Get` takes it in the Mercure hub.
    pub fn parse(body: &[u8]) -> PublishForm {
        let mut form = PublishForm::default();
        for (key, value) in form_urlencoded::parse(body) {
            match &*key {
                "topic" => form.topics.push(value.into_owned()),
                "data" if form.data.is_none() => form.data = Some(value.into_owned()),
                "id" if form.id.is_none() => form.id = Some(value.into_owned()),
                "type" if form.kind.is_none() => form.kind = Some(value.into_owned()),
                "retry" if form.retry.is_none() => form.retry = Some(value.into_owned()),
                // Present, with any value (even empty): private.
                "private" => form.private = true,
                _ => {}
            }
        }
        form
    }

    /// The update these fields make, or what is wrong with them (400 or 403). Without an `id`,
    /// the hub generates one, `urn:uuid:` and a UUID v7, as the Mercure hub does.
    pub fn into_update(self) -> Result<Update, ApiError> {
        if self.topics.is_empty() {
            return Err(ApiError::bad_request("Missing \"topic\" parameter"));
        }
        if self.topics.len() > MAX_TOPICS {
            return Err(ApiError::bad_request(format!(
                "too many topics in update: at most {MAX_TOPICS}"
            )));
        }
        if self
            .topics
            .iter()
            .any(|t| t.contains("/.well-known/mercure"))
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "topics under /.well-known/mercure are reserved to the hub",
            ));
        }
        let id = match self.id.filter(|id| !id.is_empty()) {
            Some(id) => {
                update::check_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
                id
            }
            None => format!("urn:uuid:{}", uuid::Uuid::now_v7()),
        };
        let kind = self.kind.filter(|k| !k.is_empty());
        if let Some(kind) = &kind {
            update::check_type(kind).map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        let retry = match self.retry.as_deref() {
            None | Some("") => None,
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                ApiError::bad_request("Invalid \"retry\" parameter: a whole number of milliseconds")
            })?),
        };
        Ok(Update {
            id,
            topics: self.topics,
            private: self.private,
            kind,
            retry,
            data: self.data.unwrap_or_default(),
        })
    }
}

pub(crate) async fn publish(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let Some(mercure) = &state.mercure else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "the Mercure hub is off",
        ));
    };
    // The token first, as the Mercure hub does: nothing is read for an unauthorized caller.
    let query_token = form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, v)| k == "authorization" && !v.is_empty())
        .map(|(_, v)| v.into_owned());
    let token = mercure
        .auth
        .token(&req, query_token.as_deref(), Role::Publisher)
        .map_err(|e| ApiError::auth(e, &state.stats))?
        .ok_or_else(|| {
            ApiError::auth(
                AuthError::Missing("publishing needs a token: Authorization: Bearer <JWS>".into()),
                &state.stats,
            )
        })?;
    let claims = mercure
        .auth
        .verify(&token, Role::Publisher, |text| mercure.selector(text))
        .map_err(|e| ApiError::auth(e, &state.stats))?;
    if claims.publish.as_ref().is_none_or(Vec::is_empty) {
        return Err(ApiError::auth(
            AuthError::Invalid("the token has no mercure.publish claim".into()),
            &state.stats,
        ));
    }
    match req.mime_type() {
        Ok(Some(mime)) if mime.essence_str() == "application/x-www-form-urlencoded" => {}
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/x-www-form-urlencoded",
            ))
        }
    }
    let max_bytes = mercure.max_update_bytes(&state);
    // Percent-encoding triples a byte at most.
    let body = read_body(payload, max_bytes.saturating_mul(3) + 4096).await?;
    let update = PublishForm::parse(&body).into_update()?;
    if !claims.may_publish(update.topics.iter().map(String::as_str)) {
        return Err(ApiError::auth(
            AuthError::Forbidden(
                "the token's mercure.publish selectors do not match every topic of the update"
                    .into(),
            ),
            &state.stats,
        ));
    }
    let blob = update::encode(&update);
    if blob.len() > max_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the update is larger than {max_bytes} bytes (topics and data together)"),
        ));
    }
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| Traceparent::new(t.trim()).ok());
    state
        .bus
        .mercure_publish(&mercure.log, &update.id, &blob, traceparent.as_ref())
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"))
        .body(update.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(body: &str) -> Result<Update, u16> {
        PublishForm::parse(body.as_bytes())
            .into_update()
            .map_err(|e| e.status().as_u16())
    }

    #[test]
    fn forms_make_updates() {
        let u = update(
            "topic=a&topic=https%3A%2F%2Fex.com%2F1&data=x%0Ay&id=i1&type=t&retry=5&private=",
        )
        .unwrap();
        assert_eq!(u.topics, ["a", "https://ex.com/1"]);
        assert_eq!((u.data.as_str(), u.id.as_str()), ("x\ny", "i1"));
        assert_eq!(
            (u.kind.as_deref(), u.retry, u.private),
            (Some("t"), Some(5), true)
        );
        let generated = update("topic=a").unwrap();
        assert!(generated.id.starts_with("urn:uuid:"), "{}", generated.id);
        assert_eq!(
            uuid::Uuid::parse_str(&generated.id["urn:uuid:".len()..])
                .unwrap()
                .get_version_num(),
            7
        );
        assert!(!generated.private);
        assert_eq!(generated.data, "");
    }

    #[test]
    fn bad_forms_are_refused() {
        assert_eq!(update("data=x").unwrap_err(), 400);
        assert_eq!(update("topic=a&retry=abc").unwrap_err(), 400);
        assert_eq!(update("topic=a&retry=-1").unwrap_err(), 400);
        assert_eq!(update("topic=a&id=a%0Ab").unwrap_err(), 400);
        assert_eq!(update("topic=a&id=%23x").unwrap_err(), 400);
        assert_eq!(update("topic=a&id=earliest").unwrap_err(), 400);
        assert_eq!(update("topic=a&type=a%0Db").unwrap_err(), 400);
        assert_eq!(
            update("topic=%2F.well-known%2Fmercure%2Fsubscriptions%2Fx").unwrap_err(),
            403
        );
        let many = (0..=MAX_TOPICS)
            .map(|i| format!("topic={i}"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(update(&many).unwrap_err(), 400);
    }
}
