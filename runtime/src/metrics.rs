//! The Prometheus endpoint both binaries share: a plain HTTP `GET /metrics` on `METRICS_ADDR`, off
//! when the setting is empty (the default).
//!
//! Each binary keeps its own registry in its `metrics` module and hands this one an
//! [`Exposition`] that renders it: what is only known at scrape time (gauges read from shared
//! state, a queue depth counted by the database) is refreshed there, in `render`. The text is
//! `prometheus-client`'s OpenMetrics encoding, which Prometheus scrapes natively.
//!
//! Like the health port, the endpoint belongs on a private network, but it is bounded all the
//! same: at most [`MAX_CONNECTIONS`] open at once (newcomers wait in the kernel's backlog) and
//! each closed after [`IDLE_TIMEOUT`] without a byte from its client, so idle or slow sockets
//! cannot hold file descriptors for ever. A scraper reconnects at its next scrape.

use std::{
    future::{Future, IntoFuture as _},
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{http::header, routing::get, Router};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{sleep, Instant, Sleep},
};

use crate::listener::{self, ListenError};

/// What Prometheus is told it gets.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Connections open at once on `METRICS_ADDR`: a few scrapers and a curl, with room to spare.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends nothing for this long is closed: longer than a scraper takes to
/// send its request, shorter than a typical scrape interval's idle keep-alive is worth holding.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long open scrapes may go on after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A binary's metrics, rendered for one scrape.
pub trait Exposition: Send + Sync + 'static {
    /// The whole text of the registry, after refreshing what is read at scrape time.
    fn render(&self) -> impl Future<Output = String> + Send;
}

/// The OpenMetrics text of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail, and every metric we register encodes.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(%error, "encoding the metrics failed");
    }
    text
}

/// Binds `METRICS_ADDR` (port 0 allowed: the bound address is logged and written to
/// `address_file`, as for the gRPC listeners); `None` when `addr` is empty: metrics are off.
pub async fn bind(
    addr: &str,
    address_file: Option<&Path>,
) -> Result<Option<TcpListener>, ListenError> {
    if addr.trim().is_empty() {
        return Ok(None);
    }
    listener::bind(addr, "METRICS_ADDR", address_file)
        .await
        .map(Some)
}

/// Serves `GET /metrics` from `exposition` on `listener` until `shutdown` completes.
pub async fn serve<E: Exposition>(
    listener: TcpListener,
    exposition: Arc<E>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || async move {
            (
                [(header::CONTENT_TYPE, CONTENT_TYPE)],
                exposition.render().await,
            )
        }),
    );
    // Open scrapes may finish after `shutdown`, within SHUTDOWN_GRACE: one waiting on a busy
    // database, or a client slow to read, must not hold up the process's exit.
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    let server = axum::serve(Bounded::new(listener), app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping.send(true);
    });
    tokio::select! {
        result = server.into_future() => result,
        _ = async {
            // The sender lives inside the server future: it is there while this waits.
            let _ = stopped.wait_for(|stopped| *stopped).await;
            sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

/// The metrics listener under its bounds: at most [`MAX_CONNECTIONS`] open, each closed after
/// [`IDLE_TIMEOUT`] of silence.
struct Bounded {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl Bounded {
    fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

/// First pause after a failed accept (out of file descriptors), doubled up to a second.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl axum::serve::Listener for Bounded {
    type Io = IdleLimited;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            match self.listener.accept().await {
                Ok((socket, remote)) => {
                    return (
                        IdleLimited {
                            socket,
                            idle: Box::pin(sleep(IDLE_TIMEOUT)),
                            _permit: permit,
                        },
                        remote,
                    )
                }
                Err(error) => {
                    tracing::warn!(%error, pause_ms = backoff.as_millis() as u64, "accepting a metrics connection failed; pausing");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A metrics connection: reading fails with `TimedOut` once the client has sent nothing for
/// [`IDLE_TIMEOUT`], which makes the server drop it (and free its place).
struct IdleLimited {
    socket: TcpStream,
    /// Reset whenever bytes arrive.
    idle: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for IdleLimited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.socket).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "metrics connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleLimited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    struct Fixed(Registry);

    impl Exposition for Fixed {
        async fn render(&self) -> String {
            encode(&self.0)
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), socket.read_to_string(&mut reply))
            .await
            .expect("a reply within 10 s")
            .unwrap();
        reply
    }

    #[tokio::test]
    async fn an_empty_address_turns_metrics_off() {
        assert!(bind("", None).await.unwrap().is_none());
        assert!(bind("  ", None).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn serves_the_registry_on_port_zero_and_reports_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metrics.address");
        let listener = bind("127.0.0.1:0", Some(&file)).await.unwrap().unwrap();
        let addr: SocketAddr = std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(addr, listener.local_addr().unwrap());

        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("probes", "Probes seen", counter.clone());
        counter.inc_by(3);
        let stop = shutdown_trigger();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed(registry)), stop.1));

        let reply = get(addr, "/metrics").await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(CONTENT_TYPE), "{reply}");
        assert!(reply.contains("\nprobes_total 3\n"), "{reply}");
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));

        stop.0.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops on shutdown")
            .unwrap()
            .unwrap();
    }

    /// A shutdown future and its trigger.
    fn shutdown_trigger() -> (
        tokio::sync::oneshot::Sender<()>,
        impl Future<Output = ()> + Send + 'static,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (tx, async move {
            let _ = rx.await;
        })
    }

    /// A registry whose rendering never ends (a scrape waiting on a stuck database).
    struct Stuck(tokio::sync::Notify);

    impl Exposition for Stuck {
        async fn render(&self) -> String {
            self.0.notify_one();
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_scrape_that_never_ends_does_not_hold_up_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, signal) = shutdown_trigger();
        let stuck = Arc::new(Stuck(tokio::sync::Notify::new()));
        let server = tokio::spawn(serve(listener, stuck.clone(), signal));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), stuck.0.notified())
            .await
            .expect("the scrape reaches the registry");

        stop.send(()).unwrap();
        tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), server)
            .await
            .expect("the server stops within its shutdown grace")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut bounded = Bounded::new(listener);
        let (mut connection, _) = axum::serve::Listener::accept(&mut bounded).await;
        let mut buf = [0u8; 8];
        // The paused clock jumps to the timer once nothing else can run.
        let error = connection.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    }
}
