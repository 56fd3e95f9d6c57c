//! GitHub tokens as the web app stores them (`users:getGitHubToken`, `DESIGN.md` section 2),
//! turned back into the token git sends for a private repository.
//!
//! The web app's `encryption.ts` writes `enc_v1_<iv hex>:<tag hex>:<ciphertext hex>`: AES-256-GCM
//! with a random 16-byte IV (not GCM's usual 12 bytes, hence the `Aes256Gcm` variant with a U16
//! nonce) under `ENCRYPTION_KEY` (64 hex characters). Older users may still have the legacy
//! `obf_<base64>`, and the oldest plain text; the web app reads all three, so do we.
//!
//! Only the coordinator holds `ENCRYPTION_KEY`. A decrypted token lives in a
//! [`CloneCredential`], whose `Debug` redacts it, and goes nowhere but into the assignment of the
//! job it belongs to.

use std::{fmt, str::FromStr};

use aes_gcm::{
    aead::{consts::U16, Aead, KeyInit},
    aes::Aes256,
    AesGcm, Nonce,
};
use base64::Engine;

pub use fondation_proto::model::CloneCredential;

/// The old worker's message for a stored token that cannot be read, kept word for word: the web
/// app shows it to the user, who can fix it by connecting GitHub again.
pub const INVALID_TOKEN_MESSAGE: &str =
    "Invalid GitHub token format. Please reconnect your GitHub account.";

/// AES-256-GCM with the web app's 16-byte IV.
type WebAppCipher = AesGcm<Aes256, U16>;

const ENCRYPTED_PREFIX: &str = "enc_v1_";
const OBFUSCATED_PREFIX: &str = "obf_";
const IV_BYTES: usize = 16;
const TAG_BYTES: usize = 16;

/// `ENCRYPTION_KEY`: the web app's 32-byte key, given as 64 hex characters.
#[derive(Clone)]
pub struct EncryptionKey([u8; 32]);

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

/// Why `ENCRYPTION_KEY` was refused (the value itself is never quoted).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "must be 64 hex characters (32 bytes, e.g. from `openssl rand -hex 32`), got {len} characters"
)]
pub struct InvalidKey {
    len: usize,
}

impl FromStr for EncryptionKey {
    type Err = InvalidKey;

    fn from_str(text: &str) -> Result<Self, InvalidKey> {
        let text = text.trim();
        let mut key = [0u8; 32];
        hex::decode_to_slice(text, &mut key).map_err(|_| InvalidKey { len: text.len() })?;
        Ok(EncryptionKey(key))
    }
}

/// Why a stored token could not be turned into a token. The messages say which format failed,
/// never anything of the stored value.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is encrypted (enc_v1_) but ENCRYPTION_KEY is not set")]
    NoKey,
    #[error("the encrypted token (enc_v1_) is malformed: {0}")]
    Malformed(&'static str),
    #[error("the encrypted token (enc_v1_) does not decrypt with ENCRYPTION_KEY")]
    Decrypt,
    #[error("the legacy token (obf_) is not valid base64 of UTF-8 text")]
    Legacy,
    #[error("the stored token is empty or not a usable HTTP credential")]
    Unusable,
}

/// The token in `stored`, whichever of the web app's formats it is in.
pub fn decode_stored_token(
    stored: &str,
    key: Option<&EncryptionKey>,
) -> Result<CloneCredential, TokenError> {
    let token = if let Some(rest) = stored.strip_prefix(ENCRYPTED_PREFIX) {
        decrypt(rest, key.ok_or(TokenError::NoKey)?)?
    } else if let Some(rest) = stored.strip_prefix(OBFUSCATED_PREFIX) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .map_err(|_| TokenError::Legacy)?;
        String::from_utf8(bytes).map_err(|_| TokenError::Legacy)?
    } else {
        stored.to_owned()
    };
    usable(token)
}

/// Turns an operator's `GITHUB_TOKEN` into a credential, refusing what cannot be sent.
pub fn plain_token(token: &str) -> Result<CloneCredential, TokenError> {
    usable(token.trim().to_owned())
}

/// A token goes into an HTTP header: no control characters (a newline would inject a header),
/// nothing empty, nothing absurdly long.
fn usable(token: String) -> Result<CloneCredential, TokenError> {
    const MAX_TOKEN_BYTES: usize = 1024;
    if token.is_empty()
        || token.len() > MAX_TOKEN_BYTES
        || token.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(TokenError::Unusable);
    }
    Ok(CloneCredential::new(token))
}

fn decrypt(rest: &str, key: &EncryptionKey) -> Result<String, TokenError> {
    let mut parts = rest.split(':');
    let (Some(iv), Some(tag), Some(ciphertext), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected <iv>:<tag>:<ciphertext>"));
    };
    let mut iv_bytes = [0u8; IV_BYTES];
    hex::decode_to_slice(iv, &mut iv_bytes)
        .map_err(|_| TokenError::Malformed("the IV is not 16 bytes of hex"))?;
    let mut tag_bytes = [0u8; TAG_BYTES];
    hex::decode_to_slice(tag, &mut tag_bytes)
        .map_err(|_| TokenError::Malformed("the tag is not 16 bytes of hex"))?;
    // RustCrypto takes the ciphertext with its tag appended.
    let mut sealed =
        hex::decode(ciphertext).map_err(|_| TokenError::Malformed("the ciphertext is not hex"))?;
    sealed.extend_from_slice(&tag_bytes);

    let cipher = WebAppCipher::new(&key.0.into());
    let plain = cipher
        .decrypt(Nonce::<U16>::from_slice(&iv_bytes), sealed.as_slice())
        .map_err(|_| TokenError::Decrypt)?;
    String::from_utf8(plain).map_err(|_| TokenError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by `tests/fixtures/github-token/make-vector.js` with Node's `crypto`, exactly as the
    /// web app encrypts.
    const VECTOR: &str = include_str!("../../tests/fixtures/github-token/vector.json");

    fn vector(field: &str) -> String {
        let json: serde_json::Value = serde_json::from_str(VECTOR).expect("vector.json parses");
        json[field].as_str().expect("vector field").to_owned()
    }

    fn key(field: &str) -> EncryptionKey {
        vector(field).parse().expect("a valid key")
    }

    #[test]
    fn decrypts_the_web_apps_known_answer_vector() {
        let token = decode_stored_token(&vector("encrypted"), Some(&key("encryption_key")))
            .expect("decrypts");
        assert_eq!(token.expose(), vector("token"));
    }

    #[test]
    fn reads_the_legacy_and_plain_formats() {
        let legacy = decode_stored_token(&vector("obfuscated"), None).expect("legacy");
        assert_eq!(legacy.expose(), vector("token"));
        let plain = decode_stored_token("ghp_plain", None).expect("plain");
        assert_eq!(plain.expose(), "ghp_plain");
    }

    #[test]
    fn a_wrong_key_a_missing_key_or_tampering_fails_without_quoting_the_value() {
        let encrypted = vector("encrypted");
        assert_eq!(
            decode_stored_token(&encrypted, Some(&key("wrong_key"))),
            Err(TokenError::Decrypt)
        );
        assert_eq!(
            decode_stored_token(&encrypted, None),
            Err(TokenError::NoKey)
        );
        // Flip one hex digit of the ciphertext: the tag no longer matches.
        let mut tampered = encrypted.clone();
        let last = tampered.pop().expect("non-empty");
        tampered.push(if last == '0' { '1' } else { '0' });
        let error = decode_stored_token(&tampered, Some(&key("encryption_key"))).unwrap_err();
        assert_eq!(error, TokenError::Decrypt);
        assert!(!error.to_string().contains(&tampered[7..20]));
        assert!(matches!(
            decode_stored_token("enc_v1_00:11", Some(&key("encryption_key"))),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(
            decode_stored_token("obf_%%%", None),
            Err(TokenError::Legacy)
        );
        assert_eq!(
            decode_stored_token("a\r\nX-Injected: 1", None),
            Err(TokenError::Unusable)
        );
    }

    #[test]
    fn keys_are_64_hex_characters_and_never_printed() {
        assert!("00".parse::<EncryptionKey>().is_err());
        assert!("zz".repeat(32).parse::<EncryptionKey>().is_err());
        let key = key("encryption_key");
        assert_eq!(format!("{key:?}"), "EncryptionKey(<redacted>)");
    }
}
