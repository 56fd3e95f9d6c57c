//! The `users` functions the worker reads (`users:getUserById`, `users:getGitHubToken`), and the
//! fake-only `users:create`. Tokens are returned exactly as stored (`enc_v1_...`, `obf_...` or
//! plain text): decrypting them is the worker's job.

use serde::Deserialize;
use serde_json::Value;

use super::{
    functions::{parse, to_value, FunctionError},
    store::{Store, UserDoc},
    FakeOptions,
};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateArgs {
    github_id: String,
    github_access_token: Option<String>,
}

pub(super) fn create(
    store: &mut Store,
    _: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: CreateArgs = parse(args)?;
    let id = store.new_id("users");
    let user = UserDoc {
        id: id.clone(),
        creation_time: store.creation_time(),
        github_id: args.github_id,
        github_access_token: args.github_access_token,
    };
    store.users.insert(id.clone(), user);
    Ok(Value::String(id))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserIdArgs {
    user_id: String,
}

pub(super) fn get_by_id(
    store: &mut Store,
    _: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: UserIdArgs = parse(args)?;
    match store.users.get(&args.user_id) {
        Some(user) => to_value(user),
        None => Ok(Value::Null),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GithubIdArgs {
    github_id: String,
}

/// The stored token of the first user with this `githubId`, or `null`.
pub(super) fn github_token(
    store: &mut Store,
    _: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: GithubIdArgs = parse(args)?;
    let token = store
        .users
        .values()
        .find(|user| user.github_id == args.github_id)
        .and_then(|user| user.github_access_token.clone());
    Ok(token.map_or(Value::Null, Value::String))
}
