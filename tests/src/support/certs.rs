//! A throwaway PKI for TLS tests: a CA, a server certificate for localhost/127.0.0.1, a fleet
//! client certificate (no agent name) and one naming agent [`NAMED_AGENT`]
//! (`urn:fondation:agent:<id>`), all written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

/// The agent id the named client certificate is issued for.
pub const NAMED_AGENT: &str = "named-agent";

pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Issued for agent [`NAMED_AGENT`] only.
    pub named_client_cert: PathBuf,
    pub named_client_key: PathBuf,
}

impl TestPki {
    pub fn write(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("creating the PKI folder");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Fondation test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signing the CA");

        let issue = |names: Vec<String>, common_name: &str| {
            let key = KeyPair::generate().expect("a key pair");
            let mut params = CertificateParams::new(names).expect("certificate parameters");
            if common_name == NAMED_AGENT {
                let uri = format!("urn:fondation:agent:{NAMED_AGENT}");
                params
                    .subject_alt_names
                    .push(SanType::URI(uri.as_str().try_into().expect("an IA5 URI")));
            }
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            let cert = params.signed_by(&key, &ca).expect("signing a certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) =
            issue(vec!["localhost".into(), "127.0.0.1".into()], "coordinator");
        let (client_cert, client_key) = issue(vec!["agent.fondation.test".into()], "agent");
        let (named_client_cert, named_client_key) =
            issue(vec!["agent.fondation.test".into()], NAMED_AGENT);

        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("writing a PEM file");
            path
        };
        Self {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            named_client_cert: write("named-client.pem", &named_client_cert),
            named_client_key: write("named-client-key.pem", &named_client_key),
        }
    }

    /// Client TLS trusting this CA, verifying the server as `localhost`.
    pub fn client_tls(&self) -> tonic::transport::ClientTlsConfig {
        let ca = std::fs::read(&self.ca).expect("reading the CA");
        fondation_runtime::tls::client_config(Some(ca), None, Some("localhost"))
    }
}
