//! Who may subscribe and publish. Anonymous access exists only where configured; otherwise a
//! JWT is verified with the configured keys and algorithms (the token's header picks among
//! them, never beyond them), and its claims name the topics it grants. Keys are loaded once at
//! start-up; afterwards nothing here does I/O. Tokens are never logged or echoed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ssegw_protocol::{Scope, Topic, TopicPattern};

/// What a request wants to do with its topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe",
            Action::Publish => "publish",
        }
    }
}

/// A key that verifies token signatures, as configured.
#[derive(Clone)]
pub struct VerifyingKey {
    key: DecodingKey,
    /// The algorithm a JWK names for itself; other keys serve every configured algorithm of
    /// their family.
    algorithm: Option<Algorithm>,
    kid: Option<String>,
    /// Where the key came from, for start-up messages (never the key itself).
    source: String,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("family", &self.key.family())
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field("source", &self.source)
            .finish()
    }
}

impl VerifyingKey {
    /// An HMAC secret (HS256/384/512).
    pub fn secret(secret: &[u8], source: &str) -> Result<VerifyingKey, String> {
        if secret.len() < 32 {
            return Err(format!(
                "{source}: an HMAC secret must be at least 32 bytes (it is {})",
                secret.len()
            ));
        }
        Ok(VerifyingKey {
            key: DecodingKey::from_secret(secret),
            algorithm: None,
            kid: None,
            source: source.to_string(),
        })
    }

    /// A PEM public key: RSA (RS*/PS*) or EC (ES256/ES384).
    pub fn public_pem(pem: &[u8], source: &str) -> Result<VerifyingKey, String> {
        let key = DecodingKey::from_rsa_pem(pem)
            .or_else(|_| DecodingKey::from_ec_pem(pem))
            .map_err(|e| format!("{source}: not an RSA or EC public key in PEM form: {e}"))?;
        Ok(VerifyingKey {
            key,
            algorithm: None,
            kid: None,
            source: source.to_string(),
        })
    }

    /// Every signing key of a JWKS document.
    pub fn jwks(json: &[u8], source: &str) -> Result<Vec<VerifyingKey>, String> {
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|e| format!("{source}: not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let name = match &jwk.common.key_id {
                Some(kid) => format!("{source} key {kid:?}"),
                None => format!("{source} key #{i}"),
            };
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let algorithm = match jwk.common.key_algorithm {
                Some(alg) => Some(
                    Algorithm::try_from(alg)
                        .map_err(|_| format!("{name}: algorithm {alg:?} cannot sign tokens"))?,
                ),
                None => None,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{name}: {e}"))?;
            if key.family() == jsonwebtoken::AlgorithmFamily::Hmac
                && key.try_get_as_bytes().map_or(0, <[u8]>::len) < 32
            {
                return Err(format!("{name}: an HMAC key must be at least 32 bytes"));
            }
            keys.push(VerifyingKey {
                key,
                algorithm,
                kid: jwk.common.key_id.clone(),
                source: name,
            });
        }
        if keys.is_empty() {
            return Err(format!("{source}: the JWKS holds no signing key"));
        }
        Ok(keys)
    }

    /// Where the key came from (a flag and file), for messages; never the key itself.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }

    /// Whether this key may verify a token of `algorithm` naming key `kid`.
    pub(crate) fn serves(&self, algorithm: Algorithm, kid: Option<&str>) -> bool {
        let algorithm_fits = match self.algorithm {
            Some(own) => own == algorithm,
            None => self.key.family() == algorithm.family(),
        };
        // A token naming a key id is checked with that key only; a key without an id serves
        // any token of its algorithm.
        let kid_fits = match (kid, &self.kid) {
            (Some(wanted), Some(own)) => wanted == own,
            _ => true,
        };
        algorithm_fits && kid_fits
    }
}

/// Checked settings: built by `config`, used by `Auth`.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub keys: Vec<VerifyingKey>,
    /// The algorithms accepted at all; a token naming another is refused before any key is
    /// tried.
    pub algorithms: Vec<Algorithm>,
    pub audience: Vec<String>,
    pub issuer: Vec<String>,
    pub leeway: Duration,
    /// The claim holding `{"subscribe": [...], "publish": [...]}`.
    pub claim: String,
    pub anonymous_subscribe: Scope,
    pub anonymous_publish: Scope,
    /// The cookie a subscriber's token may come in; `None`: no cookie source.
    pub cookie: Option<String>,
    /// Whether a subscriber's token may come in the `access_token` query parameter.
    pub query_token: bool,
    pub close_on_expiry: bool,
}

impl AuthConfig {
    /// Refuses settings under which keys cannot do their job: keys no accepted algorithm uses,
    /// or nothing at all that could ever be allowed. (An accepted algorithm without a key only
    /// refuses its tokens, with a message saying so.)
    pub fn check(&self) -> Result<(), String> {
        if self.keys.is_empty()
            && self.anonymous_subscribe.is_empty()
            && self.anonymous_publish.is_empty()
        {
            return Err(
                "no JWT key and no anonymous access: nothing could subscribe or publish. \
                 Configure a key (--jwt-secret, --jwt-public-key or --jwt-jwks) or allow \
                 anonymous access explicitly (e.g. --anonymous-subscribe '*' for development)"
                    .into(),
            );
        }
        for key in &self.keys {
            if !self.algorithms.iter().any(|&alg| key.serves(alg, None)) {
                return Err(format!(
                    "{}: none of the accepted algorithms (--jwt-algorithms {}) uses this key",
                    key.source,
                    names(&self.algorithms)
                ));
            }
        }
        Ok(())
    }
}

fn names(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401: no token, and anonymous access does not cover the request.
    #[error("{0}")]
    Missing(String),
    /// 401: a token was sent but is not acceptable.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// 403: a valid token (or anonymous access) that does not grant this topic.
    #[error("{0}")]
    Forbidden(String),
}

/// What a request was allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// When the token that allowed it expires (seconds since the Unix epoch); `None` for
    /// anonymous access.
    pub expires: Option<u64>,
}

/// The claims the gateway reads.
#[derive(serde::Deserialize)]
struct Claims {
    exp: Option<u64>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// The verifier, built once and shared by every worker.
pub struct Auth {
    config: AuthConfig,
    /// What each accepted algorithm's tokens are checked for, built once.
    validations: Vec<(Algorithm, Validation)>,
}

impl Auth {
    pub fn new(config: AuthConfig) -> Auth {
        let validations = config
            .algorithms
            .iter()
            .map(|&algorithm| (algorithm, validation(&config, algorithm)))
            .collect();
        Auth {
            config,
            validations,
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Allows `action` on every one of `topics`, or says why not. `token` is the bearer token
    /// the request carried, if any.
    pub fn authorize<'a>(
        &self,
        action: Action,
        token: Option<&str>,
        topics: impl IntoIterator<Item = &'a Topic>,
    ) -> Result<Grant, AuthError> {
        let anonymous = match action {
            Action::Subscribe => &self.config.anonymous_subscribe,
            Action::Publish => &self.config.anonymous_publish,
        };
        let Some(token) = token else {
            if let Some(topic) = topics.into_iter().find(|t| !anonymous.allows(t)) {
                return Err(AuthError::Missing(format!(
                    "missing token: {} on topic {:?} needs one ({})",
                    action.as_str(),
                    topic.as_str(),
                    self.sources(action)
                )));
            }
            return Ok(Grant { expires: None });
        };
        let (granted, expires) = self.verify(token, action)?;
        // A valid token adds to what anonymous access allows; it never takes away.
        if let Some(topic) = topics
            .into_iter()
            .find(|t| !granted.allows(t) && !anonymous.allows(t))
        {
            return Err(AuthError::Forbidden(format!(
                "the token does not grant {} on topic {:?}",
                action.as_str(),
                topic.as_str()
            )));
        }
        Ok(Grant { expires })
    }

    /// Where a token may come from, for messages.
    fn sources(&self, action: Action) -> String {
        let mut sources = vec!["Authorization: Bearer <token>".to_string()];
        if action == Action::Subscribe {
            if let Some(cookie) = &self.config.cookie {
                sources.push(format!("the {cookie} cookie"));
            }
            if self.config.query_token {
                sources.push("the access_token query parameter".to_string());
            }
        }
        format!("send {}", sources.join(" or "))
    }

    /// Checks the signature and the registered claims; returns the scope the token grants for
    /// `action` and its expiry.
    fn verify(&self, token: &str, action: Action) -> Result<(Scope, Option<u64>), AuthError> {
        let invalid = |message: &str| AuthError::Invalid(message.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // `alg: none` and algorithms the library does not know land here.
            ErrorKind::Json(_) => invalid(
                "unsupported or malformed header (alg must be one of the accepted algorithms)",
            ),
            _ => invalid("malformed token"),
        })?;
        let algorithm = header.alg;
        // Only the configured algorithms have a validation.
        let Some(validation) = self
            .validations
            .iter()
            .find_map(|(a, v)| (*a == algorithm).then_some(v))
        else {
            return Err(AuthError::Invalid(format!(
                "algorithm {algorithm:?} is not accepted (accepted: {})",
                names(&self.config.algorithms)
            )));
        };
        let kid = header.kid.as_deref();
        let mut candidates = self
            .config
            .keys
            .iter()
            .filter(|k| k.serves(algorithm, kid))
            .peekable();
        if candidates.peek().is_none() {
            return Err(AuthError::Invalid(match kid {
                Some(_) => format!("no {algorithm:?} key with the token's kid"),
                None => format!("no {algorithm:?} key is configured"),
            }));
        }
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, validation) {
                Ok(data) => {
                    let scope = self.scope(&data.claims, action)?;
                    return Ok((scope, data.claims.exp));
                }
                // Another key of the same algorithm (a rotation, or an EC key of the other
                // curve) may still verify it; only a verified token's claims are final.
                Err(e) if key_error(e.kind()) => {
                    if last.as_ref().is_none_or(|l: &jsonwebtoken::errors::Error| {
                        *l.kind() != ErrorKind::InvalidSignature
                    }) {
                        last = Some(e);
                    }
                }
                Err(e) => return Err(invalid(&describe(e.kind()))),
            }
        }
        Err(invalid(&describe(last.expect("one key was tried").kind())))
    }

    /// The topics the token's claim grants for `action`. Entries that are not valid patterns
    /// grant nothing (a typo must not widen access).
    fn scope(&self, claims: &Claims, action: Action) -> Result<Scope, AuthError> {
        let Some(claim) = claims.rest.get(&self.config.claim) else {
            return Ok(Scope::default());
        };
        let entries = match claim.get(action.as_str()) {
            None => return Ok(Scope::default()),
            Some(serde_json::Value::Array(entries)) => entries,
            Some(_) => {
                return Err(AuthError::Invalid(format!(
                    "claim {}.{} must be an array of topic patterns",
                    self.config.claim,
                    action.as_str()
                )))
            }
        };
        let patterns = entries
            .iter()
            .filter_map(|entry| {
                let pattern = entry.as_str().and_then(|p| TopicPattern::new(p).ok());
                if pattern.is_none() {
                    tracing::debug!(claim = %self.config.claim, "ignoring an invalid topic pattern in a token");
                }
                pattern
            })
            .collect();
        Ok(Scope::new(patterns))
    }

    /// The token a subscriber sent: the `Authorization` header, else the `access_token` query
    /// parameter (when enabled), else the cookie (when configured). An explicit token wins
    /// over the ambient cookie, which may be stale.
    pub fn subscriber_token(
        &self,
        req: &HttpRequest,
        query_token: Option<&str>,
    ) -> Result<Option<String>, AuthError> {
        if let Some(token) = bearer(req)? {
            return Ok(Some(token));
        }
        if let Some(token) = query_token {
            if !self.config.query_token {
                return Err(AuthError::Invalid(
                    "the access_token query parameter is disabled on this gateway; send \
                     Authorization: Bearer <token> or the cookie"
                        .into(),
                ));
            }
            return Ok(Some(token.to_string()));
        }
        if let Some(name) = &self.config.cookie {
            if let Some(cookie) = req.cookie(name) {
                return Ok(Some(cookie.value().to_string()));
            }
        }
        Ok(None)
    }

    /// When a stream allowed by `grant` must close, if it must.
    pub fn closes_at(&self, grant: &Grant) -> Option<SystemTime> {
        if !self.config.close_on_expiry {
            return None;
        }
        // The leeway that let the token in also lets it stay; closing earlier would let a
        // client reconnect into an immediate close again until the leeway ran out.
        // An `exp` too far out to represent never comes: no close.
        let exp = grant.expires?;
        UNIX_EPOCH.checked_add(Duration::from_secs(exp).checked_add(self.config.leeway)?)
    }
}

/// The bearer token of the `Authorization` header, if there is one.
pub fn bearer(req: &HttpRequest) -> Result<Option<String>, AuthError> {
    let Some(value) = req.headers().get(actix_web::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::Invalid("the Authorization header is not text".into()))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_string()))
        }
        _ => Err(AuthError::Invalid(
            "the Authorization header must be \"Bearer <token>\"".into(),
        )),
    }
}

/// What tokens of `algorithm` are checked for under `config`.
fn validation(config: &AuthConfig, algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = config.leeway.as_secs();
    // RFC 7519: a token is expired from its `exp` second on (the library would still take
    // it during that second). `closes_at` ends streams at the same instant.
    validation.reject_tokens_expiring_in_less_than = 1;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    // Without a configured audience a token's `aud` is someone else's business.
    validation.validate_aud = !config.audience.is_empty();
    if !config.audience.is_empty() {
        validation.set_audience(&config.audience);
        required.push("aud");
    }
    if !config.issuer.is_empty() {
        validation.set_issuer(&config.issuer);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// An error that says this key does not verify the token, not that the token is bad.
fn key_error(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidAlgorithm
    )
}

/// The client's reason, short and without the token.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "wrong audience (aud)".into(),
        ErrorKind::InvalidIssuer => "wrong issuer (iss)".into(),
        ErrorKind::InvalidSignature => "signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        ErrorKind::InvalidClaimFormat(claim) => format!("claim {claim} has the wrong type"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
            "algorithm does not fit the key".into()
        }
        _ => "malformed token".into(),
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn auth(anonymous_subscribe: &[&str]) -> Auth {
        Auth::new(AuthConfig {
            keys: vec![VerifyingKey::secret(SECRET, "test").unwrap()],
            algorithms: vec![Algorithm::HS256],
            audience: vec![],
            issuer: vec![],
            leeway: Duration::from_secs(5),
            claim: "ssegw".into(),
            anonymous_subscribe: Scope::new(
                anonymous_subscribe
                    .iter()
                    .map(|p| TopicPattern::new(p).unwrap())
                    .collect(),
            ),
            anonymous_publish: Scope::default(),
            cookie: None,
            query_token: true,
            close_on_expiry: true,
        })
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    #[test]
    fn claims_grant_their_topics_only() {
        let auth = auth(&["public.*"]);
        let exp = now() + 60;
        let t = token(json!({"exp": exp, "ssegw": {"subscribe": ["orders.*", "bad*pattern", 7]}}));
        let check = |token: Option<&str>, name: &str| {
            auth.authorize(Action::Subscribe, token, [&topic(name)])
        };
        assert_eq!(
            check(Some(&t), "orders.eu"),
            Ok(Grant { expires: Some(exp) })
        );
        assert_eq!(
            check(Some(&t), "public.news"),
            Ok(Grant { expires: Some(exp) })
        );
        assert!(matches!(
            check(Some(&t), "orders"),
            Err(AuthError::Forbidden(_))
        ));
        assert!(matches!(
            check(Some(&t), "bad"),
            Err(AuthError::Forbidden(_))
        ));
        assert_eq!(check(None, "public.news"), Ok(Grant { expires: None }));
        assert!(matches!(
            check(None, "orders.eu"),
            Err(AuthError::Missing(_))
        ));
        // The subscribe claim grants nothing to publish.
        assert!(matches!(
            auth.authorize(Action::Publish, Some(&t), [&topic("orders.eu")]),
            Err(AuthError::Forbidden(_))
        ));
    }

    #[test]
    fn registered_claims_are_checked() {
        let auth = auth(&[]);
        let grant = json!({"subscribe": ["*"]});
        let check = |claims: serde_json::Value, expected: &str| {
            let got = auth.authorize(Action::Subscribe, Some(&token(claims)), [&topic("t")]);
            assert_eq!(got, Err(AuthError::Invalid(expected.into())));
        };
        check(json!({"exp": now() - 60, "ssegw": grant}), "expired");
        check(json!({"ssegw": grant}), "missing claim exp");
        check(
            json!({"exp": now() + 60, "nbf": now() + 60, "ssegw": grant}),
            "not valid yet (nbf)",
        );
        check(json!({"exp": "soon", "ssegw": grant}), "malformed token");
        // Within the leeway is still valid.
        let fresh = token(json!({"exp": now() - 2, "ssegw": grant}));
        assert!(auth
            .authorize(Action::Subscribe, Some(&fresh), [&topic("t")])
            .is_ok());
    }

    #[test]
    fn expiry_sets_the_close_even_far_out() {
        let auth = auth(&[]);
        let exp = now() + 60;
        let closes = auth.closes_at(&Grant { expires: Some(exp) }).unwrap();
        assert_eq!(closes, UNIX_EPOCH + Duration::from_secs(exp + 5));
        assert_eq!(auth.closes_at(&Grant { expires: None }), None);
        // A trusted issuer's absurd `exp` is accepted, and nothing overflows.
        let t = token(json!({"exp": u64::MAX, "ssegw": {"subscribe": ["t"]}}));
        let grant = auth
            .authorize(Action::Subscribe, Some(&t), [&topic("t")])
            .unwrap();
        let _ = auth.closes_at(&grant);
    }

    #[test]
    fn settings_that_allow_nothing_are_refused() {
        let mut config = auth(&[]).config.clone();
        config.keys.clear();
        assert!(config.check().unwrap_err().contains("no JWT key"));
        let mut config = auth(&[]).config.clone();
        config.algorithms = vec![Algorithm::RS256];
        assert!(config.check().unwrap_err().contains("uses this key"));
        assert!(VerifyingKey::secret(b"short", "x").is_err());
    }
}
