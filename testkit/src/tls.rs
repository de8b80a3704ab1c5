//! Certificates for TLS servers in tests: a certificate authority made on the spot, a server
//! certificate it signs for 127.0.0.1 and localhost, and a client certificate for mutual TLS,
//! written as PEM files into a directory of the caller's.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::Error;

/// A certificate authority and the server and client certificates it signed, as PEM files.
#[derive(Clone, Debug)]
pub struct Authority {
    /// The CA's certificate: what a client that trusts this authority is given.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Authority {
    /// Makes a CA named `name` and its two certificates, and writes them into `dir` (which
    /// must exist) as `<name>-ca.pem`, `<name>-server.pem`, `<name>-server-key.pem`,
    /// `<name>-client.pem` and `<name>-client-key.pem`.
    pub fn create(dir: &Path, name: &str) -> Result<Authority, Error> {
        let tls = |e: rcgen::Error| Error::Tls(e.to_string());
        let ca_key = KeyPair::generate().map_err(tls)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).map_err(tls)?;
        let leaf = |cn: &str| -> Result<(String, String), Error> {
            let key = KeyPair::generate().map_err(tls)?;
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                    .map_err(tls)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &ca, &ca_key).map_err(tls)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf("redis-server")?;
        let (client_cert, client_key) = leaf("sse-gateway")?;
        let write = |suffix: &str, pem: &str| -> Result<PathBuf, Error> {
            let path = dir.join(format!("{name}-{suffix}.pem"));
            std::fs::write(&path, pem)
                .map_err(|e| Error::Tls(format!("cannot write {}: {e}", path.display())))?;
            Ok(path)
        };
        Ok(Authority {
            ca: write("ca", &ca.pem())?,
            server_cert: write("server", &server_cert)?,
            server_key: write("server-key", &server_key)?,
            client_cert: write("client", &client_cert)?,
            client_key: write("client-key", &client_key)?,
        })
    }
}

/// A server that speaks TLS only (`--port 0 --tls-port P`), with these certificates.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    pub authority: Authority,
    /// Clients must present a certificate the authority signed (mutual TLS).
    pub require_client_cert: bool,
}
