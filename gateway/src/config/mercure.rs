//! The Mercure hub's flags (`--mercure*`, docs/mercure.md), checked into `MercureConfig`: its
//! own keys for publishers and subscribers (separate from the native API's), anonymous
//! subscribers, the cookie and the origins allowed to publish with it. Key files are read here,
//! once; a bad key or a hub that could serve no one is an error before any port is bound.

use std::time::Duration;

use clap::{ArgAction, Args};
use jsonwebtoken::Algorithm;

use super::{ConfigError, Redacted};
use crate::auth::VerifyingKey;

#[derive(Args, Debug, Clone)]
pub struct MercureArgs {
    /// Serve the Mercure protocol at /.well-known/mercure (subscribe with GET, publish with
    /// POST), beside the native API. See docs/mercure.md.
    #[arg(long, env = "SSEGW_MERCURE", default_value_t = false, action = ArgAction::Set)]
    pub mercure: bool,
    /// HMAC secret (at least 32 bytes) verifying both publishers' and subscribers' Mercure
    /// tokens, like the Mercure hub's MERCURE_PUBLISHER_JWT_KEY and MERCURE_SUBSCRIBER_JWT_KEY
    /// set to one value.
    #[arg(long, env = "SSEGW_MERCURE_JWT_SECRET", hide_env_values = true)]
    pub mercure_jwt_secret: Option<Redacted>,
    /// HMAC secret for publishers' tokens only.
    #[arg(
        long,
        env = "SSEGW_MERCURE_PUBLISHER_JWT_SECRET",
        hide_env_values = true
    )]
    pub mercure_publisher_jwt_secret: Option<Redacted>,
    /// HMAC secret for subscribers' tokens only.
    #[arg(
        long,
        env = "SSEGW_MERCURE_SUBSCRIBER_JWT_SECRET",
        hide_env_values = true
    )]
    pub mercure_subscriber_jwt_secret: Option<Redacted>,
    /// PEM files with RSA or EC public keys for publishers' tokens (RS*, PS*, ES256, ES384),
    /// comma-separated.
    #[arg(
        long,
        env = "SSEGW_MERCURE_PUBLISHER_JWT_PUBLIC_KEY",
        value_delimiter = ','
    )]
    pub mercure_publisher_jwt_public_key: Vec<std::path::PathBuf>,
    /// PEM files with RSA or EC public keys for subscribers' tokens, comma-separated.
    #[arg(
        long,
        env = "SSEGW_MERCURE_SUBSCRIBER_JWT_PUBLIC_KEY",
        value_delimiter = ','
    )]
    pub mercure_subscriber_jwt_public_key: Vec<std::path::PathBuf>,
    /// The algorithms Mercure tokens may use, comma-separated.
    #[arg(
        long,
        env = "SSEGW_MERCURE_JWT_ALGORITHMS",
        value_delimiter = ',',
        default_value = "HS256,RS256,ES256"
    )]
    pub mercure_jwt_algorithms: Vec<String>,
    /// Whether subscribers without a token are served (public updates only), as the Mercure
    /// hub's `anonymous` directive.
    #[arg(long, env = "SSEGW_MERCURE_ANONYMOUS", default_value_t = false, action = ArgAction::Set)]
    pub mercure_anonymous: bool,
    /// The cookie a Mercure token may come in.
    #[arg(
        long,
        env = "SSEGW_MERCURE_COOKIE_NAME",
        default_value = "mercureAuthorization"
    )]
    pub mercure_cookie_name: String,
    /// Origins allowed to publish with the cookie (a defence against cross-site request
    /// forgery), comma-separated, `*` for any. Empty (the default): a publish must send its
    /// token in the Authorization header or the authorization query parameter.
    #[arg(long, env = "SSEGW_MERCURE_PUBLISH_ORIGINS", value_delimiter = ',')]
    pub mercure_publish_origins: Vec<String>,
    /// Publish an update whenever a subscription starts or ends, and serve the subscriptions
    /// API at /.well-known/mercure/subscriptions, across the fleet (the Mercure hub's
    /// `subscriptions` directive). Needs a subscriber key: the API and the updates are for
    /// token holders only. Replicas beat every --presence-interval (2 s when presence is off).
    #[arg(long, env = "SSEGW_MERCURE_SUBSCRIPTIONS", default_value_t = false, action = ArgAction::Set)]
    pub mercure_subscriptions: bool,
}

/// The checked Mercure settings; present in `Config` only with `--mercure true`.
#[derive(Clone, Debug)]
pub struct MercureConfig {
    pub publisher_keys: Vec<VerifyingKey>,
    pub subscriber_keys: Vec<VerifyingKey>,
    pub algorithms: Vec<Algorithm>,
    pub anonymous: bool,
    pub cookie: String,
    /// `None`: any origin (`*`).
    pub publish_origins: Option<Vec<String>>,
    /// Clock skew allowed on `exp` and `nbf` (the native `--jwt-leeway`).
    pub leeway: Duration,
    /// `--mercure-subscriptions`: subscription updates and the subscriptions API.
    pub subscriptions: bool,
}

impl MercureArgs {
    pub fn config(&self, leeway: Duration) -> Result<Option<MercureConfig>, ConfigError> {
        if !self.mercure {
            return Ok(None);
        }
        let secret = |secret: &Option<Redacted>,
                      flag: &str|
         -> Result<Vec<VerifyingKey>, ConfigError> {
            secret
                .iter()
                .map(|Redacted(s)| VerifyingKey::secret(s.as_bytes(), flag).map_err(ConfigError))
                .collect()
        };
        let pems =
            |paths: &[std::path::PathBuf], flag: &str| -> Result<Vec<VerifyingKey>, ConfigError> {
                paths
                    .iter()
                    .map(|path| {
                        let pem = std::fs::read(path)
                            .map_err(|e| ConfigError(format!("{flag} {}: {e}", path.display())))?;
                        VerifyingKey::public_pem(&pem, &format!("{flag} {}", path.display()))
                            .map_err(ConfigError)
                    })
                    .collect()
            };
        let shared = secret(
            &self.mercure_jwt_secret,
            "--mercure-jwt-secret (SSEGW_MERCURE_JWT_SECRET)",
        )?;
        let mut publisher_keys = shared.clone();
        publisher_keys.extend(secret(
            &self.mercure_publisher_jwt_secret,
            "--mercure-publisher-jwt-secret (SSEGW_MERCURE_PUBLISHER_JWT_SECRET)",
        )?);
        publisher_keys.extend(pems(
            &self.mercure_publisher_jwt_public_key,
            "--mercure-publisher-jwt-public-key (SSEGW_MERCURE_PUBLISHER_JWT_PUBLIC_KEY)",
        )?);
        let mut subscriber_keys = shared;
        subscriber_keys.extend(secret(
            &self.mercure_subscriber_jwt_secret,
            "--mercure-subscriber-jwt-secret (SSEGW_MERCURE_SUBSCRIBER_JWT_SECRET)",
        )?);
        subscriber_keys.extend(pems(
            &self.mercure_subscriber_jwt_public_key,
            "--mercure-subscriber-jwt-public-key (SSEGW_MERCURE_SUBSCRIBER_JWT_PUBLIC_KEY)",
        )?);
        let algorithms = self
            .mercure_jwt_algorithms
            .iter()
            .map(|name| {
                name.trim().parse::<Algorithm>().map_err(|_| {
                    ConfigError(format!(
                        "--mercure-jwt-algorithms (SSEGW_MERCURE_JWT_ALGORITHMS): unknown algorithm {name:?}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(ConfigError(
                "--mercure-jwt-algorithms (SSEGW_MERCURE_JWT_ALGORITHMS) must name at least one algorithm".into(),
            ));
        }
        for key in publisher_keys.iter().chain(&subscriber_keys) {
            if !algorithms.iter().any(|&alg| key.serves(alg, None)) {
                return Err(ConfigError(format!(
                    "{}: none of --mercure-jwt-algorithms uses this key",
                    key.source()
                )));
            }
        }
        if publisher_keys.is_empty() {
            return Err(ConfigError(
                "--mercure true needs a key for publishers: --mercure-jwt-secret, \
                 --mercure-publisher-jwt-secret or --mercure-publisher-jwt-public-key"
                    .into(),
            ));
        }
        if subscriber_keys.is_empty() && !self.mercure_anonymous {
            return Err(ConfigError(
                "--mercure true serves no subscriber: give a subscriber key (--mercure-jwt-secret, \
                 --mercure-subscriber-jwt-secret or --mercure-subscriber-jwt-public-key) or \
                 --mercure-anonymous true"
                    .into(),
            ));
        }
        if self.mercure_subscriptions && subscriber_keys.is_empty() {
            return Err(ConfigError(
                "--mercure-subscriptions true needs a subscriber key (--mercure-jwt-secret, \
                 --mercure-subscriber-jwt-secret or --mercure-subscriber-jwt-public-key): \
                 subscription updates are private and the subscriptions API answers only tokens"
                    .into(),
            ));
        }
        if self.mercure_cookie_name.is_empty()
            || !self
                .mercure_cookie_name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
        {
            return Err(ConfigError(
                "--mercure-cookie-name (SSEGW_MERCURE_COOKIE_NAME) must be a cookie name".into(),
            ));
        }
        let origins: Vec<String> = self
            .mercure_publish_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        let publish_origins = if origins.iter().any(|o| o == "*") {
            None
        } else {
            Some(origins)
        };
        Ok(Some(MercureConfig {
            publisher_keys,
            subscriber_keys,
            algorithms,
            anonymous: self.mercure_anonymous,
            cookie: self.mercure_cookie_name.clone(),
            publish_origins,
            leeway,
            subscriptions: self.mercure_subscriptions,
        }))
    }
}
