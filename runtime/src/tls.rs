//! TLS material for the agent <-> coordinator link, read from PEM files named in the settings.
//! TLS is off unless certificates are given; then the coordinator serves TLS on LISTEN_ADDR and,
//! with a client CA, requires agents to present a certificate signed by it (mTLS).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
#[error("cannot read {what} from {path}: {source}; point {variable} at a readable PEM file")]
pub struct TlsFileError {
    what: &'static str,
    variable: &'static str,
    path: String,
    source: std::io::Error,
}

/// Reads one PEM file, naming the setting it came from when it cannot.
pub fn read_pem(
    path: &Path,
    what: &'static str,
    variable: &'static str,
) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError {
        what,
        variable,
        path: path.display().to_string(),
        source,
    })
}

/// Client-side TLS: trust `ca` (else the public web roots), verify the server as `domain` (else
/// the URL's host), and present `identity` when mutual TLS is wanted.
pub fn client_config(
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<&str>,
) -> ClientTlsConfig {
    let mut config = ClientTlsConfig::new();
    config = match ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
        None => config.with_webpki_roots(),
    };
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    config
}
