//! Who may publish and subscribe on the Mercure hub: the token's source (the `Authorization`
//! header, else the `authorization` query parameter, else the cookie, as the Mercure spec
//! orders them), its signature and registered claims (`exp` and `nbf` checked when present,
//! never required), and its `mercure` claim read into selectors. No I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use jsonwebtoken::{errors::ErrorKind, Algorithm, Validation};
use ssegw_protocol::mercure::selector::Selector;

use crate::auth::{bearer, AuthError};
use crate::config::MercureConfig;

/// Most selectors a token may list per claim, as the Mercure hub.
const MAX_CLAIM_SELECTORS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Subscriber,
}

/// What a verified token grants.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    /// `mercure.publish`: the topics it may publish to; `None` when absent.
    pub publish: Option<Vec<Selector>>,
    /// `mercure.subscribe`: the topics whose private updates it receives.
    pub subscribe: Option<Vec<Selector>>,
    /// `exp`, seconds since the epoch.
    pub expires: Option<u64>,
    /// `mercure.payload`: shown in the subscriber's subscription documents.
    pub payload: Option<serde_json::Value>,
}

impl Claims {
    /// Every topic matches one of the token's `mercure.publish` selectors.
    pub fn may_publish<'a>(&self, mut topics: impl Iterator<Item = &'a str>) -> bool {
        let selectors = self.publish.as_deref().unwrap_or_default();
        topics.all(|topic| selectors.iter().any(|s| s.matches(topic)))
    }
}

#[derive(serde::Deserialize)]
struct Token {
    exp: Option<u64>,
    mercure: Option<serde_json::Value>,
    #[serde(rename = "https://mercure.rocks/")]
    namespaced: Option<serde_json::Value>,
}

pub struct MercureAuth {
    config: MercureConfig,
    validations: Vec<(Algorithm, Validation)>,
}

impl MercureAuth {
    pub fn new(config: MercureConfig) -> MercureAuth {
        let validations = config
            .algorithms
            .iter()
            .map(|&algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.leeway = config.leeway.as_secs();
                validation.reject_tokens_expiring_in_less_than = 1;
                validation.validate_nbf = true;
                validation.validate_aud = false;
                // As the Mercure hub: `exp` is checked when present, not required.
                validation.set_required_spec_claims::<&str>(&[]);
                (algorithm, validation)
            })
            .collect();
        MercureAuth {
            config,
            validations,
        }
    }

    pub fn anonymous(&self) -> bool {
        self.config.anonymous
    }

    /// The request's token: the `Authorization` header when there is one (then nothing else),
    /// else the `authorization` query parameter, else the cookie. A publisher's cookie counts
    /// only from an origin allowed to publish with it (`--mercure-publish-origins`): a page on
    /// another site could otherwise publish in the user's name.
    pub fn token(
        &self,
        req: &HttpRequest,
        query_token: Option<&str>,
        role: Role,
    ) -> Result<Option<String>, AuthError> {
        if let Some(token) = bearer(req)? {
            return Ok(Some(token));
        }
        if let Some(token) = query_token {
            return Ok(Some(token.to_string()));
        }
        let Some(cookie) = req.cookie(&self.config.cookie) else {
            return Ok(None);
        };
        if role == Role::Publisher && !self.origin_may_publish(req) {
            return Err(AuthError::Invalid(format!(
                "the {} cookie publishes only from an origin in --mercure-publish-origins; send \
                 Authorization: Bearer <token> instead",
                self.config.cookie
            )));
        }
        Ok(Some(cookie.value().to_string()))
    }

    /// The request's `Origin`, or its `Referer`'s origin, is one allowed to publish with the
    /// cookie.
    fn origin_may_publish(&self, req: &HttpRequest) -> bool {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let origin = header("origin").map(str::to_string).or_else(|| {
            let referer = header("referer")?;
            let (scheme, rest) = referer.split_once("://")?;
            let authority = rest.split(['/', '?', '#']).next()?;
            Some(format!("{scheme}://{authority}"))
        });
        let Some(origin) = origin else {
            return false;
        };
        match &self.config.publish_origins {
            None => true,
            Some(allowed) => allowed.contains(&origin),
        }
    }

    /// Checks the token's signature against the keys of `role` and its registered claims,
    /// and reads its `mercure` claim (or the `https://mercure.rocks/` one); `selector`
    /// compiles (or finds) the claim's selectors.
    pub fn verify(
        &self,
        token: &str,
        role: Role,
        selector: impl Fn(&str) -> Selector,
    ) -> Result<Claims, AuthError> {
        let invalid = |message: String| AuthError::Invalid(message);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("malformed token or unsupported algorithm".into()))?;
        let algorithm = header.alg;
        let Some(validation) = self
            .validations
            .iter()
            .find_map(|(a, v)| (*a == algorithm).then_some(v))
        else {
            return Err(invalid(format!(
                "algorithm {algorithm:?} is not accepted (--mercure-jwt-algorithms)"
            )));
        };
        let keys = match role {
            Role::Publisher => &self.config.publisher_keys,
            Role::Subscriber => &self.config.subscriber_keys,
        };
        let mut last = None;
        for key in keys
            .iter()
            .filter(|k| k.serves(algorithm, header.kid.as_deref()))
        {
            match jsonwebtoken::decode::<Token>(token, key.decoding_key(), validation) {
                Ok(data) => return claims(data.claims, &selector),
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => last = Some(e),
                Err(e) => return Err(invalid(describe(e.kind()))),
            }
        }
        Err(match last {
            Some(e) => invalid(describe(e.kind())),
            None => invalid(format!("no {algorithm:?} key is configured for this")),
        })
    }

    /// When a stream opened with `claims` must close: at the token's `exp` (and the leeway
    /// that let it in).
    pub fn closes_at(&self, claims: &Claims) -> Option<SystemTime> {
        let exp = claims.expires?;
        UNIX_EPOCH.checked_add(Duration::from_secs(exp).checked_add(self.config.leeway)?)
    }
}

fn claims(token: Token, selector: &impl Fn(&str) -> Selector) -> Result<Claims, AuthError> {
    let Some(claim) = token.mercure.or(token.namespaced) else {
        return Ok(Claims {
            expires: token.exp,
            ..Claims::default()
        });
    };
    let list = |name: &str| -> Result<Option<Vec<Selector>>, AuthError> {
        match claim.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Array(entries)) if entries.len() <= MAX_CLAIM_SELECTORS => {
                Ok(Some(
                    entries
                        .iter()
                        .filter_map(|e| e.as_str().map(selector))
                        .collect(),
                ))
            }
            Some(_) => Err(AuthError::Invalid(format!(
                "claim mercure.{name} must be an array of at most {MAX_CLAIM_SELECTORS} topic selectors"
            ))),
        }
    };
    let payload = match claim.get("payload") {
        None | Some(serde_json::Value::Null) => None,
        Some(payload) => {
            let bytes = serde_json::to_string(payload).map_or(usize::MAX, |s| s.len());
            if bytes > super::subscriptions::MAX_PAYLOAD_BYTES {
                return Err(AuthError::Invalid(format!(
                    "claim mercure.payload is larger than {} bytes",
                    super::subscriptions::MAX_PAYLOAD_BYTES
                )));
            }
            Some(payload.clone())
        }
    };
    Ok(Claims {
        publish: list("publish")?,
        subscribe: list("subscribe")?,
        expires: token.exp,
        payload,
    })
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)".into(),
        ErrorKind::InvalidSignature => "token signature does not verify".into(),
        ErrorKind::InvalidClaimFormat(claim) => format!("token claim {claim} has the wrong type"),
        _ => "invalid token".into(),
    }
}
