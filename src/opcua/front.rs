//! The TCP front of an OPC UA listener: accepts client connections on the
//! listener's address and passes each byte stream to the async-opcua server
//! on its internal loopback port. async-opcua 0.19 only serves a whole
//! `TcpListener` (`Server::run_with`), so this is where sluice reads a
//! connection's bytes and peer address before the server does.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::modbus::listener::ACCEPT_ERROR_PAUSE;

/// Accepts connections until `shutdown` is cancelled.
pub async fn serve(
    name: Arc<str>,
    socket: TcpListener,
    server: SocketAddr,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(relay(name.clone(), stream, peer, server, shutdown.clone()));
            }
            Err(error) => {
                tracing::warn!(listener = %name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Passes one client connection to the server until either side closes.
async fn relay(
    name: Arc<str>,
    mut client: TcpStream,
    peer: SocketAddr,
    server: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut upstream = match TcpStream::connect(server).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(listener = %name, %error, "cannot reach the internal OPC UA server");
            return;
        }
    };
    tracing::debug!(listener = %name, %peer, "OPC UA connection accepted");
    // TODO: the OPC UA Connection Protocol framing guard and the client
    // application certificate check go here: the client's bytes must pass
    // them before they reach the server. Until then they are copied as is.
    tokio::select! {
        _ = shutdown.cancelled() => {}
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                tracing::debug!(listener = %name, %peer, %error, "OPC UA connection ended");
            }
        }
    }
}
