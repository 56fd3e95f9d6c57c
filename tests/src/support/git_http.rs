//! A git server over HTTP that requires a token, like GitHub for a private repository: `git
//! http-backend` (git's own smart-HTTP CGI, run with argv and an environment, no shell) behind a
//! small axum server that checks `Authorization: Basic base64(x-access-token:<token>)` first and
//! answers 401 with a `WWW-Authenticate` challenge otherwise.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::Response,
    Router,
};
use tokio::{io::AsyncWriteExt, net::TcpListener, process::Command};

/// The header value git must send, for `token`.
pub fn basic_authorization(token: &str) -> String {
    use base64::Engine;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
    format!("Basic {encoded}")
}

struct ServerState {
    project_root: PathBuf,
    expected: String,
    authorized: AtomicUsize,
    refused: AtomicUsize,
}

/// The running server; stops when dropped.
pub struct GitHttpServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl GitHttpServer {
    /// Serves the bare repositories under `project_root` to clients presenting `token`.
    pub async fn start(project_root: &Path, token: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test git server");
        let addr = listener.local_addr().expect("the git server's address");
        let state = Arc::new(ServerState {
            project_root: project_root.to_path_buf(),
            expected: basic_authorization(token),
            authorized: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(serve).with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the git server runs");
        });
        Self { addr, state, task }
    }

    /// `http://127.0.0.1:<port>/`: the REPO_ALLOWLIST prefix, and the base of the clone URLs.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Requests that carried the right token.
    pub fn authorized_requests(&self) -> usize {
        self.state.authorized.load(Ordering::SeqCst)
    }

    /// Requests refused for a missing or wrong token.
    pub fn refused_requests(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    State(state): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if presented != Some(state.expected.as_str()) {
        state.refused.fetch_add(1, Ordering::SeqCst);
        return axum::http::Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("WWW-Authenticate", "Basic realm=\"fondation-test\"")
            .body(Body::from("authentication required\n"))
            .expect("a valid response");
    }
    state.authorized.fetch_add(1, Ordering::SeqCst);
    match http_backend(&state.project_root, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(error) => axum::http::Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from(format!("git http-backend: {error}\n")))
            .expect("a valid response"),
    }
}

/// Runs `git http-backend` for one request (CGI: request in the environment and on stdin,
/// response headers then body on stdout).
async fn http_backend(
    root: &Path,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut command = Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", root)
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let writer = tokio::spawn(async move {
        // The backend may stop reading early (an error): a broken pipe then is not ours to report.
        let _ = stdin.write_all(&body).await;
    });
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting: {e}"))?;
    let _ = writer.await;
    if !output.status.success() && output.stdout.is_empty() {
        return Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    cgi_response(&output.stdout)
}

/// Splits a CGI reply into status, headers and body.
fn cgi_response(stdout: &[u8]) -> Result<Response, String> {
    let (head, body) = match find(stdout, b"\r\n\r\n") {
        Some(at) => (&stdout[..at], &stdout[at + 4..]),
        None => match find(stdout, b"\n\n") {
            Some(at) => (&stdout[..at], &stdout[at + 2..]),
            None => return Err("no end of headers".into()),
        },
    };
    let head = String::from_utf8_lossy(head);
    let mut response = axum::http::Response::builder().status(StatusCode::OK);
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|code| code.parse::<u16>().ok())
                .ok_or_else(|| format!("bad status {value:?}"))?;
            response = response.status(code);
        } else if let Ok(value) = HeaderValue::from_str(value) {
            response = response.header(name.trim(), value);
        }
    }
    response
        .body(Body::from(body.to_vec()))
        .map_err(|e| e.to_string())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
