//! The gRPC listeners of both binaries: binding (port 0 allowed, the chosen address reported)
//! and the one accept loop every server of ours runs.
//!
//! Tonic applies its own socket options (`tcp_nodelay`, keepalive) only to listeners it binds
//! itself; with `serve_with_incoming_shutdown` and a listener of ours they are ignored. Without
//! TCP_NODELAY a small reply (an acknowledgement, a health answer) waits for the peer's delayed
//! ACK, about 40 ms, so the accept loop sets it on every accepted socket. It also bounds the
//! connections (`MAX_CONNECTIONS` open at once, with a WARN line when the bound is hit), closes the
//! ones that start no request within `IDLE_CONNECTION_TIMEOUT`, and pauses after a failed accept
//! (EMFILE) instead of spinning. A connection counts as started when the server's request hook
//! ([`Connections::server`]) sees its first request, so TLS or not, only a real call keeps it.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tonic::transport::server::{Connected, Router, Server, TcpConnectInfo, TlsConnectInfo};

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot bind {variable} {addr}: {source}")]
    Bind {
        variable: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot write the bound {variable} address to {path}: {source}")]
    AddressFile {
        variable: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Binds `addr` (the value of the setting `variable`); a port of 0 lets the system choose. The
/// bound address is logged and, when `address_file` is given, written there (replacing the
/// file at once, so a reader never sees half of it), for whoever started us to dial it.
pub async fn bind(
    addr: &str,
    variable: &'static str,
    address_file: Option<&Path>,
) -> Result<TcpListener, ListenError> {
    let bind_error = |source| ListenError::Bind {
        variable,
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    tracing::info!(setting = variable, address = %bound, "listening");
    if let Some(path) = address_file {
        write_address_file(path, bound).map_err(|source| ListenError::AddressFile {
            variable,
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(listener)
}

fn write_address_file(path: &Path, bound: SocketAddr) -> std::io::Result<()> {
    let mut partial = PathBuf::from(path);
    partial.as_mut_os_string().push(".partial");
    std::fs::write(&partial, format!("{bound}\n"))?;
    std::fs::rename(&partial, path)
}

/// Bounds on the connections one server accepts (`MAX_CONNECTIONS`, `IDLE_CONNECTION_TIMEOUT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; at the bound, accepting pauses (the kernel's backlog holds
    /// newcomers) until one closes.
    pub max_connections: usize,
    /// A connection on which no request started within this time after accept is closed: an idle
    /// socket costs a file descriptor and memory, and a flood of them would starve real clients.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// `MAX_CONNECTIONS` by default.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
    /// `IDLE_CONNECTION_TIMEOUT` by default: far above a real client's delay between connecting
    /// and its first call.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// First wait after a failed accept (EMFILE, ENFILE, ENOBUFS...), doubled up to
/// [`ACCEPT_BACKOFF_MAX`]: retrying at once would spin a core while nothing can be accepted.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Which accepted connections have started a request, by peer address (unique per open TCP
/// connection on one listener). The server marks them from its request hook
/// ([`Connections::server`]), the connections read their mark.
type StartedMap = Arc<Mutex<HashMap<SocketAddr, Arc<AtomicBool>>>>;

/// The connection bookkeeping of one server: its limits, the permits of open connections and
/// which of them started a request.
#[derive(Clone)]
pub struct Connections {
    limits: ConnectionLimits,
    permits: Arc<Semaphore>,
    started: StartedMap,
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            started: StartedMap::default(),
        }
    }

    /// A server builder whose request hook marks a connection as started at its first request
    /// (before routing, so any call counts: health, reflection, a session). Build the router
    /// from it and serve it with [`serve`].
    pub fn server(&self) -> Server {
        let started = self.started.clone();
        Server::builder().trace_fn(move |request| {
            let extensions = request.extensions();
            let remote = extensions
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
                .or_else(|| {
                    extensions
                        .get::<TlsConnectInfo<TcpConnectInfo>>()
                        .and_then(|info| info.get_ref().remote_addr())
                });
            if let Some(remote) = remote {
                if let Some(flag) = lock(&started).get(&remote) {
                    flag.store(true, Ordering::Relaxed);
                }
            }
            tracing::Span::none()
        })
    }

    /// The connections `listener` accepts: TCP_NODELAY set, at most `max_connections` open at
    /// once, each closed when no request started within `idle_timeout`. Failed accepts are
    /// logged and retried after a growing pause.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<LimitedStream, std::io::Error>> + Send + 'static {
        let state = AcceptState {
            connections: self.clone(),
            listener,
            backoff: ACCEPT_BACKOFF_MIN,
            warned_at: None,
        };
        futures::stream::unfold(state, |mut state| async move {
            let permit = match state.connections.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if state
                        .warned_at
                        .is_none_or(|at| at.elapsed() >= LIMIT_WARNING_INTERVAL)
                    {
                        state.warned_at = Some(tokio::time::Instant::now());
                        tracing::warn!(
                            max_connections = state.connections.limits.max_connections,
                            "connection limit reached (MAX_CONNECTIONS); new connections wait \
                             until one closes"
                        );
                    }
                    state
                        .connections
                        .permits
                        .clone()
                        .acquire_owned()
                        .await
                        .ok()?
                }
            };
            loop {
                match state.listener.accept().await {
                    Ok((socket, remote)) => {
                        if let Err(error) = socket.set_nodelay(true) {
                            tracing::debug!(%error, "cannot set TCP_NODELAY");
                        }
                        let stream = state.connections.wrap(socket, remote, permit);
                        state.backoff = ACCEPT_BACKOFF_MIN;
                        return Some((Ok(stream), state));
                    }
                    Err(error) => {
                        let pause = state.backoff;
                        tracing::warn!(%error, pause_ms = pause.as_millis() as u64, "accepting a connection failed; pausing before the next accept");
                        tokio::time::sleep(pause).await;
                        state.backoff = (pause * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                }
            }
        })
    }

    fn wrap(
        &self,
        socket: TcpStream,
        remote: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> LimitedStream {
        let started = Arc::new(AtomicBool::new(false));
        lock(&self.started).insert(remote, started.clone());
        LimitedStream {
            inner: socket,
            idle: Some(Box::pin(tokio::time::sleep(self.limits.idle_timeout))),
            started,
            _registration: Registration {
                map: self.started.clone(),
                remote,
                _permit: permit,
            },
        }
    }
}

/// At most one "limit reached" line per this interval, however long the flood.
const LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// What the accept loop carries from one accepted connection to the next.
struct AcceptState {
    connections: Connections,
    listener: TcpListener,
    /// The pause after the next failed accept.
    backoff: Duration,
    warned_at: Option<tokio::time::Instant>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: a panic elsewhere leaves it usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frees a connection's place when it closes.
struct Registration {
    map: StartedMap,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.map).remove(&self.remote);
    }
}

/// An accepted connection under [`ConnectionLimits`]: reading or writing fails with `TimedOut`
/// once the idle timeout passed without a request, which makes the server drop it.
pub struct LimitedStream {
    inner: TcpStream,
    /// Until the first request; None once one started.
    idle: Option<Pin<Box<Sleep>>>,
    started: Arc<AtomicBool>,
    _registration: Registration,
}

impl LimitedStream {
    /// Err once the connection stayed idle past its timeout; arms the timer's wake-up otherwise.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        let Some(idle) = self.idle.as_mut() else {
            return Ok(());
        };
        if self.started.load(Ordering::Relaxed) {
            self.idle = None;
            return Ok(());
        }
        match idle.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within IDLE_CONNECTION_TIMEOUT",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Err(error) = self.check_idle(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(error) = self.check_idle(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Err(error) = self.check_idle(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves `router` (built from [`Connections::server`]) on the connections `listener` accepts
/// until `shutdown` completes, then lets the open connections finish their calls and returns.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    connections: &Connections,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(connections.incoming(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;
    use tokio_stream::StreamExt as _;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    async fn next<S>(accept: &mut S) -> LimitedStream
    where
        S: Stream<Item = std::io::Result<LimitedStream>> + Unpin,
    {
        tokio::time::timeout(DEADLINE, accept.next())
            .await
            .expect("a connection accepted within 10 s")
            .expect("the listener is open")
            .expect("accepting")
    }

    #[tokio::test]
    async fn accepted_sockets_have_tcp_nodelay() {
        // Control: a plain accept leaves Nagle's algorithm on, so the check below can fail.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (plain, _) = listener.accept().await.unwrap();
        assert!(
            !plain.nodelay().unwrap(),
            "the kernel's default is Nagle on"
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut ours = Box::pin(Connections::new(ConnectionLimits::default()).incoming(listener));
        for _ in 0..2 {
            let _client = TcpStream::connect(addr).await.unwrap();
            // `nodelay()` reads the option back with getsockopt on the server's socket.
            let socket = next(&mut ours).await;
            assert!(
                socket.inner.nodelay().unwrap(),
                "TCP_NODELAY on an accepted socket"
            );
        }
    }

    #[tokio::test]
    async fn connections_are_bounded_and_idle_ones_time_out() {
        let limits = ConnectionLimits {
            max_connections: 2,
            idle_timeout: Duration::from_millis(300),
        };
        let connections = Connections::new(limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accept = Box::pin(connections.incoming(listener));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut first = next(&mut accept).await;
        let mut second = next(&mut accept).await;
        // The third waits in the backlog while two are open.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), accept.next())
                .await
                .is_err(),
            "a third connection was accepted over MAX_CONNECTIONS"
        );

        // Marked as started (what the server's request hook does): it outlives the timeout.
        let remote = first.inner.peer_addr().unwrap();
        lock(&connections.started)[&remote].store(true, Ordering::Relaxed);
        let mut buf = [0u8; 8];
        let idle = tokio::time::timeout(DEADLINE, second.read(&mut buf))
            .await
            .expect("the idle connection ends within 10 s")
            .unwrap_err();
        assert_eq!(idle.kind(), std::io::ErrorKind::TimedOut, "{idle}");
        drop(second);
        let _third = next(&mut accept).await;

        clients[0].try_write(b"x").unwrap();
        let read = tokio::time::timeout(DEADLINE, first.read(&mut buf))
            .await
            .expect("the started connection reads")
            .expect("a started connection is not timed out");
        assert_eq!(read, 1);
        assert_eq!(
            lock(&connections.started).len(),
            2,
            "closed connections are forgotten"
        );
    }

    #[tokio::test]
    async fn port_zero_is_bound_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("address");
        let listener = bind("127.0.0.1:0", "LISTEN_ADDR", Some(&file))
            .await
            .unwrap();
        let bound = listener.local_addr().unwrap();
        assert_ne!(bound.port(), 0);
        let reported = std::fs::read_to_string(&file).unwrap();
        assert_eq!(reported.trim().parse::<SocketAddr>().unwrap(), bound);

        let taken = bind(&bound.to_string(), "LISTEN_ADDR", None).await;
        let message = taken.unwrap_err().to_string();
        assert!(
            message.starts_with("cannot bind LISTEN_ADDR 127.0.0.1:"),
            "{message}"
        );
    }
}
