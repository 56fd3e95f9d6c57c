//! Bearer-token checks for agents (`AGENT_TOKEN`) and state-changing admin calls (`ADMIN_TOKEN`).

use tonic::{metadata::MetadataMap, Status};

/// Ok when no token is configured, or the request carries `authorization: Bearer <token>`.
pub fn check_bearer(
    metadata: &MetadataMap,
    expected: Option<&str>,
    variable: &str,
) -> Result<(), Status> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let presented = metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
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
}
