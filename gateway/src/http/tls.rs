//! TLS for the listener (`--tls-cert`, `--tls-key`): loads the PEM files into a rustls server
//! configuration once at start-up, so that a bad file is a config error before any port is
//! bound. HTTP/2 comes with it: actix offers `h2` and `http/1.1` by ALPN.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A rustls server configuration for this certificate chain and private key, with ring's
/// cryptography and rustls's safe default protocol versions (TLS 1.2 and 1.3).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("no certificate found in {}", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "{} and {} do not make a usable certificate and key: {e}",
                cert.display(),
                key.display()
            )
        })
}

/// The TCP socket under an accepted TLS connection, as actix hands it to `on_connect`.
pub fn tcp_socket(connection: &dyn std::any::Any) -> Option<&actix_web::rt::net::TcpStream> {
    use actix_tls::accept::rustls_0_23::TlsStream;
    use actix_web::rt::net::TcpStream;
    connection
        .downcast_ref::<TlsStream<TcpStream>>()
        .map(|tls| tls.get_ref().0)
}
