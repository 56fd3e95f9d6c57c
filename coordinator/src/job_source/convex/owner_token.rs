//! The GitHub token of a repository's owner, for cloning a private repository: the repository's
//! `userId` -> `users:getUserById` (`githubId`) -> `users:getGitHubToken` -> decrypted with
//! `ENCRYPTION_KEY` (`crate::github_token`).
//!
//! An owner without a user document, a `githubId` or a stored token is not an error: the job is
//! cloned with `GITHUB_TOKEN` or anonymously (public repositories need nothing), and a private one
//! then fails at the clone with the web app's "reconnect" message. A stored token that cannot be
//! read fails the job at once with the old worker's message. Nothing of a stored or decrypted
//! token ever goes into a log line or an error: errors of the token's own call are reported by
//! kind only.

use tracing::{debug, warn};

use super::{
    client::CallError,
    functions::{GetGitHubToken, GetUserById, GithubIdArgs, UserIdArgs},
    ConvexSource,
};
use crate::github_token::{decode_stored_token, CloneCredential, INVALID_TOKEN_MESSAGE};

impl ConvexSource {
    /// The owner's token, `None` when there is none to use, or the job's failure message.
    pub(super) async fn owner_credential(
        &self,
        repository_id: &str,
        user_id: Option<&str>,
    ) -> Result<Option<CloneCredential>, String> {
        let Some(user_id) = user_id.filter(|id| !id.is_empty()) else {
            debug!(
                repository_id,
                "repository has no owner; no token to clone with"
            );
            return Ok(None);
        };
        let user = match self
            .client
            .call::<GetUserById>(&UserIdArgs { user_id })
            .await
        {
            Ok(user) => user,
            Err(error) => {
                return Err(format!(
                    "cannot read the owner of repository {repository_id}: {error}"
                ))
            }
        };
        let Some(github_id) = user
            .and_then(|user| user.github_id)
            .and_then(|id| id.as_arg())
        else {
            debug!(
                repository_id,
                user_id, "owner has no GitHub id; no token to clone with"
            );
            return Ok(None);
        };
        let stored = match self
            .client
            .call::<GetGitHubToken>(&GithubIdArgs {
                github_id: &github_id,
            })
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                // The reply of this call may hold a token: its error is reported by kind only.
                let kind = call_error_kind(&error);
                warn!(repository_id, user_id, kind, "users:getGitHubToken failed");
                return Err(format!(
                    "cannot read the GitHub token of the owner of repository {repository_id} \
                     (users:getGitHubToken: {kind})"
                ));
            }
        };
        let Some(stored) = stored.filter(|stored| !stored.0.is_empty()) else {
            debug!(repository_id, user_id, "owner has no stored GitHub token");
            return Ok(None);
        };
        match decode_stored_token(&stored.0, self.encryption_key.as_ref()) {
            Ok(credential) => Ok(Some(credential)),
            Err(error) => {
                warn!(repository_id, user_id, %error, "the owner's stored GitHub token cannot be read");
                Err(INVALID_TOKEN_MESSAGE.to_owned())
            }
        }
    }
}

/// What kind of failure a call had, without any of its details.
fn call_error_kind(error: &CallError) -> &'static str {
    match error {
        CallError::Function { .. } => "refused by the deployment",
        CallError::Ambiguous { .. } | CallError::Unavailable { .. } => "deployment unavailable",
        CallError::Request { .. } => "request refused",
        CallError::InvalidReply { .. } => "invalid reply",
        CallError::Setup { .. } => "request not sent",
    }
}
