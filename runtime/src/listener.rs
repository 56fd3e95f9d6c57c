//! The gRPC listeners of both binaries: binding (port 0 allowed, the chosen address reported)
//! and the one accept loop every server of ours runs.
//!
//! Tonic applies its own socket options (`tcp_nodelay`, keepalive) only to listeners it binds
//! itself; with `serve_with_incoming_shutdown` and a listener of ours they are ignored. Without
//! TCP_NODELAY a small reply (an acknowledgement, a health answer) waits for the peer's delayed
//! ACK, about 40 ms, so the accept loop sets it on every accepted socket. Later limits on
//! connections (count, idle time) belong here too, the one place every accepted socket passes.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use tokio::net::TcpListener;
use tonic::transport::server::{Router, TcpIncoming};

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot bind {variable} {addr}: {source}")]
    Bind {
        variable: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot write the bound address to {path} (ADDRESS_FILE): {source}")]
    AddressFile {
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

/// The sockets `listener` accepts, each with TCP_NODELAY set.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `router` on the connections `listener` accepts until `shutdown` completes, then lets
/// the open connections finish their calls and returns.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;
    use tokio_stream::StreamExt as _;

    use super::*;

    /// Accepts one connection from `listener` through `accept` and returns the server's socket.
    async fn accepted<S>(listener_addr: SocketAddr, accept: &mut S) -> TcpStream
    where
        S: tokio_stream::Stream<Item = std::io::Result<TcpStream>> + Unpin,
    {
        let _client = TcpStream::connect(listener_addr).await.expect("connecting");
        accept
            .next()
            .await
            .expect("the listener is open")
            .expect("accepting")
    }

    #[tokio::test]
    async fn accepted_sockets_have_tcp_nodelay() {
        // Control: a plain accept leaves Nagle's algorithm on, so the check below can fail.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut plain = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let socket = accepted(addr, &mut plain).await;
        assert!(
            !socket.nodelay().unwrap(),
            "the kernel's default is Nagle on"
        );

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut ours = incoming(listener);
        for _ in 0..2 {
            // `nodelay()` reads the option back with getsockopt on the server's socket.
            let socket = accepted(addr, &mut ours).await;
            assert!(
                socket.nodelay().unwrap(),
                "TCP_NODELAY on an accepted socket"
            );
        }
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
