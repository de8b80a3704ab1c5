//! How to reach Redis: the URL, the credentials and TLS, as flags shared by `serve` and
//! `publish` (`RedisArgs`), checked once at start-up into a `RedisTarget`. Files are read and
//! certificates parsed here, so a setting that can never work exits 2 before any port is bound.
//! Secrets never leave this module in text: `RedisTarget`'s `Debug` and `address` show none.

use std::path::{Path, PathBuf};

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};
use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{check, ConfigError, Redacted};

/// The Redis connection flags of `serve` and `publish`.
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis URL: redis://[user:password@]host:port[/db], or rediss://... for TLS. Without it
    /// the gateway runs as a single node with an embedded in-memory bus and history (and
    /// `publish` goes through --url).
    #[arg(long, env = "SSEGW_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Redacted>,
    /// Redis ACL user, instead of one in the URL.
    #[arg(long, env = "SSEGW_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// File holding the Redis password (trailing line breaks are ignored), instead of one in
    /// the URL.
    #[arg(long, env = "SSEGW_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file with the certificates that may sign the Redis server's certificate (rediss://
    /// only). Without it, the system's roots are trusted.
    #[arg(long, env = "SSEGW_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM file with a client certificate chain for mutual TLS with Redis (rediss:// only).
    /// Needs --redis-client-key.
    #[arg(long, env = "SSEGW_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM file with the private key of --redis-client-cert.
    #[arg(long, env = "SSEGW_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,
    /// Accept any certificate from Redis, unverified (rediss:// only). For a test bench, never
    /// for production: anyone on the path can read and change every event. Logged as a
    /// warning at start-up.
    #[arg(long, env = "SSEGW_REDIS_TLS_SKIP_VERIFY", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub redis_tls_skip_verify: bool,
}

/// A checked Redis address with its credentials and TLS settings.
#[derive(Clone)]
pub struct RedisTarget {
    info: redis::ConnectionInfo,
    /// `host:port` (or the socket path), with no credentials: what logs and errors name.
    address: String,
    tls: Option<TlsMode>,
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Verified,
    /// `--redis-tls-skip-verify`.
    Unverified,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = self.info.redis_settings();
        f.debug_struct("RedisTarget")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("username", &settings.username().is_some())
            .field("password", &settings.password().is_some())
            .finish()
    }
}

impl RedisTarget {
    /// What the connections are opened with (the credentials and TLS parameters included).
    pub fn connection_info(&self) -> &redis::ConnectionInfo {
        &self.info
    }

    /// A client for one more connection to the same server.
    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        redis::Client::open(self.info.clone())
    }

    /// `host:port`, never with credentials.
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn tls(&self) -> Option<TlsMode> {
        self.tls
    }
}

impl RedisArgs {
    /// The Redis to use, or `None` without --redis-url. Reads the password and certificate
    /// files.
    pub fn target(&self) -> Result<Option<RedisTarget>, ConfigError> {
        let Some(Redacted(url)) = &self.redis_url else {
            let given = [
                ("--redis-username", self.redis_username.is_some()),
                ("--redis-password-file", self.redis_password_file.is_some()),
                ("--redis-ca-file", self.redis_ca_file.is_some()),
                ("--redis-client-cert", self.redis_client_cert.is_some()),
                ("--redis-client-key", self.redis_client_key.is_some()),
                ("--redis-tls-skip-verify", self.redis_tls_skip_verify),
            ];
            return match given.iter().find(|(_, set)| *set) {
                Some((flag, _)) => Err(ConfigError(format!(
                    "{flag} is a setting of the Redis connection: give --redis-url \
                     (SSEGW_REDIS_URL) too"
                ))),
                None => Ok(None),
            };
        };
        // The parser's message never repeats the URL, which may hold a password.
        let mut info = url.as_str().into_connection_info().map_err(|e| {
            ConfigError(format!(
                "--redis-url (SSEGW_REDIS_URL) is not a Redis URL \
                 (redis://[user:password@]host:port[/db] or rediss://...): {}",
                e.detail().unwrap_or("it does not parse")
            ))
        })?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.redis_username {
            check(
                !user.is_empty(),
                "--redis-username (SSEGW_REDIS_USERNAME) is empty",
            )?;
            settings = settings.set_username(user);
        }
        if let Some(path) = &self.redis_password_file {
            let text = read(path, "--redis-password-file (SSEGW_REDIS_PASSWORD_FILE)")?;
            let password = String::from_utf8(text)
                .map_err(|_| {
                    ConfigError(format!(
                        "--redis-password-file (SSEGW_REDIS_PASSWORD_FILE) {}: not UTF-8 text",
                        path.display()
                    ))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string();
            check(
                !password.is_empty(),
                &format!(
                    "--redis-password-file (SSEGW_REDIS_PASSWORD_FILE) {} is empty",
                    path.display()
                ),
            )?;
            settings = settings.set_password(password);
        }
        check(
            settings.username().is_none() || settings.password().is_some(),
            "a Redis user needs a password: in the URL or in --redis-password-file \
             (SSEGW_REDIS_PASSWORD_FILE)",
        )?;
        info = info.set_redis_settings(settings);
        let (address, tls) = match info.addr().clone() {
            ConnectionAddr::Tcp(host, port) => {
                let tls_flags = [
                    ("--redis-ca-file", self.redis_ca_file.is_some()),
                    ("--redis-client-cert", self.redis_client_cert.is_some()),
                    ("--redis-client-key", self.redis_client_key.is_some()),
                    ("--redis-tls-skip-verify", self.redis_tls_skip_verify),
                ];
                if let Some((flag, _)) = tls_flags.iter().find(|(_, set)| *set) {
                    return Err(ConfigError(format!(
                        "{flag} is a TLS setting, and --redis-url (SSEGW_REDIS_URL) is not a \
                         rediss:// URL"
                    )));
                }
                (format!("{host}:{port}"), None)
            }
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                tls_params,
            } => {
                check(
                    !insecure,
                    "--redis-url (SSEGW_REDIS_URL): skipping certificate verification takes \
                     the explicit flag --redis-tls-skip-verify, not #insecure in the URL",
                )?;
                let address = format!("{host}:{port}");
                info = info.set_addr(ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: self.redis_tls_skip_verify,
                    tls_params,
                });
                let certificates = self.tls_certificates()?;
                if certificates.root_cert.is_some() || certificates.client_tls.is_some() {
                    info = redis::Client::build_with_tls(info, certificates)
                        .map_err(|e| {
                            ConfigError(format!(
                                "--redis-ca-file/--redis-client-cert/--redis-client-key: {}",
                                e.detail().unwrap_or("the certificates are not usable")
                            ))
                        })?
                        .get_connection_info()
                        .clone();
                }
                let mode = if self.redis_tls_skip_verify {
                    TlsMode::Unverified
                } else {
                    TlsMode::Verified
                };
                (address, Some(mode))
            }
            ConnectionAddr::Unix(path) => {
                check(
                    self.redis_ca_file.is_none()
                        && self.redis_client_cert.is_none()
                        && self.redis_client_key.is_none()
                        && !self.redis_tls_skip_verify,
                    "the --redis-* TLS settings need a rediss:// URL, not a Unix socket",
                )?;
                (path.display().to_string(), None)
            }
            _ => {
                return Err(ConfigError(
                    "--redis-url (SSEGW_REDIS_URL): a kind of address this build does not \
                     support"
                        .into(),
                ))
            }
        };
        Ok(Some(RedisTarget { info, address, tls }))
    }

    /// The CA and client certificate files, read and parsed.
    fn tls_certificates(&self) -> Result<TlsCertificates, ConfigError> {
        let root_cert = match &self.redis_ca_file {
            None => None,
            Some(path) => {
                let flag = "--redis-ca-file (SSEGW_REDIS_CA_FILE)";
                let pem = read(path, flag)?;
                let certs = certificates(&pem)
                    .map_err(|e| ConfigError(format!("{flag} {}: {e}", path.display())))?;
                check(
                    certs > 0,
                    &format!("{flag} {}: no PEM certificate in it", path.display()),
                )?;
                Some(pem)
            }
        };
        let client_tls = match (&self.redis_client_cert, &self.redis_client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let flag = "--redis-client-cert (SSEGW_REDIS_CLIENT_CERT)";
                let client_cert = read(cert, flag)?;
                match certificates(&client_cert) {
                    Ok(n) if n > 0 => {}
                    Ok(_) => {
                        return Err(ConfigError(format!(
                            "{flag} {}: no PEM certificate in it",
                            cert.display()
                        )))
                    }
                    Err(e) => return Err(ConfigError(format!("{flag} {}: {e}", cert.display()))),
                }
                let flag = "--redis-client-key (SSEGW_REDIS_CLIENT_KEY)";
                let client_key = read(key, flag)?;
                PrivateKeyDer::from_pem_slice(&client_key).map_err(|_| {
                    ConfigError(format!(
                        "{flag} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
                        key.display()
                    ))
                })?;
                Some(ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
            _ => {
                return Err(ConfigError(
                    "--redis-client-cert (SSEGW_REDIS_CLIENT_CERT) and --redis-client-key \
                     (SSEGW_REDIS_CLIENT_KEY) go together: give both or neither"
                        .into(),
                ))
            }
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// How many PEM certificates `pem` holds; an error for a malformed one.
fn certificates(pem: &[u8]) -> Result<usize, String> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| format!("not a PEM certificate: {e:?}"))?;
        count += 1;
    }
    Ok(count)
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError(format!("{flag} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn target(flags: &[&str]) -> Result<Option<RedisTarget>, String> {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            redis: RedisArgs,
        }
        let args = std::iter::once("test").chain(flags.iter().copied());
        let flags = Flags::try_parse_from(args).map_err(|e| e.to_string())?;
        flags.redis.target().map_err(|e| e.to_string())
    }

    #[test]
    fn credentials_come_from_the_url_or_the_flags_and_never_show() {
        let dir = std::env::temp_dir().join(format!("ssegw-redis-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "fl4g-pw\r\n").unwrap();

        let from_url = target(&["--redis-url", "redis://alice:url-pw@10.0.0.1:6380/2"])
            .unwrap()
            .unwrap();
        let settings = from_url.connection_info().redis_settings();
        assert_eq!(
            (settings.username(), settings.password(), settings.db()),
            (Some("alice"), Some("url-pw"), 2)
        );
        assert_eq!(
            (from_url.address(), from_url.tls()),
            ("10.0.0.1:6380", None)
        );

        let from_flags = target(&[
            "--redis-url",
            "redis://:url-pw@10.0.0.1:6380",
            "--redis-username",
            "gateway",
            "--redis-password-file",
            file.to_str().unwrap(),
        ])
        .unwrap()
        .unwrap();
        let settings = from_flags.connection_info().redis_settings();
        assert_eq!(
            (settings.username(), settings.password()),
            (Some("gateway"), Some("fl4g-pw"))
        );
        for shown in [format!("{from_url:?}"), format!("{from_flags:?}")] {
            assert!(!shown.contains("pw"), "{shown}");
            assert!(shown.contains("10.0.0.1:6380"), "{shown}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_is_verified_unless_the_flag_says_otherwise() {
        let verified = target(&["--redis-url", "rediss://redis.example:6380"]).unwrap();
        assert_eq!(verified.unwrap().tls(), Some(TlsMode::Verified));
        let unverified = target(&[
            "--redis-url",
            "rediss://redis.example:6380",
            "--redis-tls-skip-verify",
            "true",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(unverified.tls(), Some(TlsMode::Unverified));
        assert!(matches!(
            unverified.connection_info().addr(),
            ConnectionAddr::TcpTls { insecure: true, .. }
        ));
        assert!(target(&[]).unwrap().is_none());
    }
}
