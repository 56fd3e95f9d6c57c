//! Who may call: bearer tokens for agents (`AGENT_TOKEN`) and Admin calls (`ADMIN_TOKEN` for
//! every call, `ADMIN_READ_TOKEN` for read-only ones), and the agent id a client certificate
//! names.
//!
//! A client certificate names an agent with a URI subject alternative name
//! `urn:fondation:agent:<agent id>` ([`AGENT_SAN_PREFIX`]). URI names, not DNS names: fleet
//! certificates carry DNS names for their hosts, which must not be read as agent ids. A
//! certificate with such names admits only those agent ids; one without (a fleet certificate
//! shared by replicas) admits any.

use tonic::{metadata::MetadataMap, Status};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The URI subject alternative name prefix that names an agent in its client certificate.
pub const AGENT_SAN_PREFIX: &str = "urn:fondation:agent:";

/// The agent ids a client certificate (DER) names; empty for a fleet certificate.
pub fn certificate_agent_ids(der: &[u8]) -> Result<Vec<String>, Status> {
    let unreadable = |error: String| {
        Status::unauthenticated(format!("the client certificate cannot be read: {error}"))
    };
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|error| unreadable(error.to_string()))?;
    let Some(san) = certificate
        .subject_alternative_name()
        .map_err(|error| unreadable(error.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(AGENT_SAN_PREFIX).map(str::to_string),
            _ => None,
        })
        .collect())
}

/// Ok when the certificate names no agent, or names `agent_id`.
pub fn check_certificate_names(names: &[String], agent_id: &str) -> Result<(), Status> {
    if names.is_empty() || names.iter().any(|name| name == agent_id) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "agent id {agent_id} does not match the client certificate, which is issued for agent \
         {} ({AGENT_SAN_PREFIX}<id>); set AGENT_ID to the certificate's agent id",
        names.join(", ")
    )))
}

/// What an Admin call does: reads may use `ADMIN_READ_TOKEN`, writes need `ADMIN_TOKEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Ok when the Admin call may go ahead: nothing is required without `ADMIN_TOKEN` (the
/// configuration refuses `ADMIN_READ_TOKEN` alone); otherwise the bearer must be `ADMIN_TOKEN`,
/// or `ADMIN_READ_TOKEN` for a read.
pub fn check_admin(
    metadata: &MetadataMap,
    admin_token: Option<&str>,
    read_token: Option<&str>,
    access: Access,
) -> Result<(), Status> {
    if admin_token.is_none() {
        return Ok(());
    }
    let read_token = read_token.filter(|_| access == Access::Read);
    let presented = bearer(metadata);
    let matches = |token: Option<&str>| {
        token.is_some_and(|t| constant_time_eq(presented.as_bytes(), t.as_bytes()))
    };
    if matches(admin_token) || matches(read_token) {
        return Ok(());
    }
    Err(Status::unauthenticated(match access {
        Access::Write => {
            "missing or wrong bearer token: this Admin call changes state and needs \
             `authorization: Bearer <ADMIN_TOKEN>`"
        }
        Access::Read => {
            "missing or wrong bearer token: send `authorization: Bearer <ADMIN_TOKEN>` or \
             `<ADMIN_READ_TOKEN>`"
        }
    }))
}

fn bearer(metadata: &MetadataMap) -> &str {
    metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
}

/// Ok when no token is configured, or the request carries `authorization: Bearer <token>`.
pub fn check_bearer(
    metadata: &MetadataMap,
    expected: Option<&str>,
    variable: &str,
) -> Result<(), Status> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let presented = bearer(metadata);
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated(format!(
            "missing or wrong bearer token: send `authorization: Bearer <{variable}>`"
        )))
    }
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let mut metadata = MetadataMap::new();
        assert!(check_bearer(&metadata, None, "T").is_ok());
        assert!(check_bearer(&metadata, Some("s3cret"), "T").is_err());
        metadata.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(check_bearer(&metadata, Some("s3cret"), "T").is_ok());
        assert!(check_bearer(&metadata, Some("s3cre"), "T").is_err());
    }

    #[test]
    fn admin_tokens() {
        let none = MetadataMap::new();
        let mut admin = MetadataMap::new();
        admin.insert("authorization", "Bearer all".parse().unwrap());
        let mut reader = MetadataMap::new();
        reader.insert("authorization", "Bearer read".parse().unwrap());
        use Access::{Read, Write};
        assert!(check_admin(&none, None, None, Write).is_ok());
        for access in [Read, Write] {
            assert!(check_admin(&none, Some("all"), Some("read"), access).is_err());
            assert!(check_admin(&admin, Some("all"), Some("read"), access).is_ok());
        }
        assert!(check_admin(&reader, Some("all"), Some("read"), Read).is_ok());
        let refused = check_admin(&reader, Some("all"), Some("read"), Write).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            refused.message().contains("ADMIN_TOKEN"),
            "{}",
            refused.message()
        );
    }

    #[test]
    fn certificate_names_admit_their_agent_only() {
        let named = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(check_certificate_names(&[], "any").is_ok());
        assert!(check_certificate_names(&named(&["a", "b"]), "b").is_ok());
        let refused = check_certificate_names(&named(&["a"]), "b").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("issued for agent a"),
            "{}",
            refused.message()
        );
    }
}
