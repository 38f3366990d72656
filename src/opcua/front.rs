//! The TCP front of an OPC UA listener: accepts client connections on the
//! listener's address, runs each client's bytes through a `guard::Guard`
//! and passes the chunks it returns to the async-opcua server on its
//! internal loopback port. async-opcua 0.19 only serves a whole
//! `TcpListener` (`Server::run_with`), so this is where sluice reads a
//! connection's bytes and peer address before the server does. The front
//! also owns the listener's trust store, which a reload replaces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::framing::{Acknowledge, FramingLimits, ACKNOWLEDGE_LEN, HEADER_LEN};
use super::guard::{Guard, OpenRateLimiter, Rejection};
use super::trust::TrustStore;
use crate::config::OpcuaListenerConfig;
use crate::events::{Event, EventType};
use crate::modbus::generation::Shared;
use crate::modbus::listener::ACCEPT_ERROR_PAUSE;

/// Bytes read from either side at once. The guard buffers at most one
/// chunk beyond this between reads.
const READ_BUFFER: usize = 0x4000;
/// Most source addresses whose OpenSecureChannel buckets are tracked.
const MAX_RATE_SOURCES: usize = 4096;
/// Length of the secure conversation header: message header and
/// SecureChannelId.
const CHANNEL_HEADER_LEN: usize = HEADER_LEN + 4;

/// The peer address of each open secure channel of one listener, by the
/// SecureChannelId the server assigned in its OpenSecureChannel response.
#[derive(Debug, Default)]
pub struct ChannelPeers {
    peers: Mutex<HashMap<u32, SocketAddr>>,
}

impl ChannelPeers {
    /// Returns the client address of secure channel `id`.
    pub fn peer(&self, id: u32) -> Option<SocketAddr> {
        self.lock().get(&id).copied()
    }

    fn insert(&self, id: u32, peer: SocketAddr) {
        self.lock().insert(id, peer);
    }

    fn remove(&self, ids: &[u32]) {
        let mut peers = self.lock();
        for id in ids {
            peers.remove(id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, SocketAddr>> {
        // A poisoned lock only means a connection task panicked between
        // two map operations; each operation leaves the map consistent.
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The state that every connection of one listener shares.
pub struct Front {
    pub name: Arc<str>,
    pub shared: Arc<Shared>,
    /// The internal address of the async-opcua server.
    pub server: SocketAddr,
    pub limits: FramingLimits,
    pub trust: Arc<ArcSwap<TrustStore>>,
    pub limiter: Arc<OpenRateLimiter>,
    pub channels: Arc<ChannelPeers>,
}

impl Front {
    /// Builds the front of a listener from its `opcua` table, loading the
    /// trust store from `client_ca` and `crl`.
    pub fn new(
        name: Arc<str>,
        shared: Arc<Shared>,
        server: SocketAddr,
        config: &OpcuaListenerConfig,
    ) -> Result<Front, String> {
        let trust = load_trust(config)?;
        let guard = &config.guard;
        Ok(Front {
            name,
            shared,
            server,
            limits: FramingLimits {
                max_chunk_size: guard.max_chunk_size,
                max_chunk_count: guard.max_chunk_count,
                max_message_size: guard.max_message_size,
            },
            trust: Arc::new(ArcSwap::from_pointee(trust)),
            limiter: Arc::new(OpenRateLimiter::new(
                guard.open_rate,
                guard.open_burst,
                MAX_RATE_SOURCES,
            )),
            channels: Arc::new(ChannelPeers::default()),
        })
    }
}

/// Loads the trust store of a listener: its `client_ca` bundle and `crl`
/// files. Without `client_ca` the store is empty, which only a listener
/// that offers no security policy may have.
pub fn load_trust(config: &OpcuaListenerConfig) -> Result<TrustStore, String> {
    let cas: Vec<&std::path::Path> = config.client_ca.iter().map(AsRef::as_ref).collect();
    TrustStore::load(&cas, &config.crl).map_err(|error| error.to_string())
}

/// Accepts connections until `shutdown` is cancelled.
pub async fn serve(front: Arc<Front>, socket: TcpListener, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(relay(front.clone(), stream, peer, shutdown.clone()));
            }
            Err(error) => {
                tracing::warn!(listener = %front.name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Passes one client connection to the server until either side closes or
/// the guard rejects the client's bytes.
async fn relay(
    front: Arc<Front>,
    mut client: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut upstream = match TcpStream::connect(front.server).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(listener = %front.name, %error, "cannot reach the internal OPC UA server");
            return;
        }
    };
    tracing::debug!(listener = %front.name, %peer, "OPC UA connection accepted");
    let mut guard = Guard::new(
        peer.ip(),
        front.limits,
        front.trust.clone(),
        front.limiter.clone(),
    );
    let mut responses = ServerStream::default();
    let mut channels = Vec::new();
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = upstream.split();
    let mut from_client = vec![0u8; READ_BUFFER];
    let mut from_server = vec![0u8; READ_BUFFER];
    let outcome: std::io::Result<Option<Rejection>> = async {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                read = client_read.read(&mut from_client) => {
                    let n = read?;
                    if n == 0 {
                        return Ok(None);
                    }
                    match guard.on_client_bytes(&from_client[..n]) {
                        Ok(frames) => {
                            for frame in frames {
                                server_write.write_all(&frame.bytes).await?;
                            }
                        }
                        Err(rejection) => {
                            client_write.write_all(&rejection.error_message).await?;
                            client_write.shutdown().await?;
                            return Ok(Some(rejection));
                        }
                    }
                }
                read = server_read.read(&mut from_server) => {
                    let n = read?;
                    if n == 0 {
                        return Ok(None);
                    }
                    for seen in responses.push(&from_server[..n]) {
                        match seen {
                            ServerMessage::Acknowledge(ack) => guard.on_acknowledge(&ack),
                            ServerMessage::OpenResponse(id) => {
                                front.channels.insert(id, peer);
                                channels.push(id);
                            }
                        }
                    }
                    client_write.write_all(&from_server[..n]).await?;
                }
            }
        }
    }
    .await;
    front.channels.remove(&channels);
    match outcome {
        Ok(Some(rejection)) => record_rejection(&front, peer, rejection).await,
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(listener = %front.name, %peer, %error, "OPC UA connection ended");
        }
    }
}

/// Records a connection closed by the guard: a session `reject` event and
/// an anomaly with the status code and the client certificate.
async fn record_rejection(front: &Front, peer: SocketAddr, rejection: Rejection) {
    tracing::debug!(listener = %front.name, %peer, kind = rejection.kind, reason = %rejection.reason, "OPC UA connection rejected");
    front
        .shared
        .metrics
        .opcua()
        .count_guard_rejection(&front.name, rejection.kind);
    let mut event = Event::new(EventType::Session);
    event.action = Some("reject");
    event.listener = Some(front.name.clone());
    event.src_ip = Some(peer.ip());
    event.src_port = Some(peer.port());
    event.reason = Some(rejection.reason.clone());
    emit(&front.shared, event).await;
    let mut detail = serde_json::json!({ "status": format!("0x{:08X}", rejection.status) });
    if let Some(certificate) = &rejection.certificate {
        detail["certificate"] = serde_json::json!({
            "thumbprint": certificate.thumbprint_hex(),
            "subject": certificate.subject,
            "application_uri": certificate.application_uri,
        });
    }
    let mut anomaly = Event::anomaly(rejection.kind, rejection.severity, rejection.reason);
    anomaly.listener = Some(front.name.clone());
    anomaly.src_ip = Some(peer.ip());
    anomaly.src_port = Some(peer.port());
    anomaly.detail = Some(detail);
    emit(&front.shared, anomaly).await;
}

async fn emit(shared: &Shared, event: Event) {
    if let Err(error) = shared.emitter.emit(event).await {
        tracing::error!(%error, "event not recorded");
    }
}

/// A message of the server-to-client stream that the front acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ServerMessage {
    /// The server's Acknowledge, which lowers the guard's limits.
    Acknowledge(Acknowledge),
    /// An OpenSecureChannel response with the channel's SecureChannelId.
    OpenResponse(u32),
}

/// Walks the chunk headers of the server-to-client stream. It reads the
/// first 12 bytes of each chunk (the whole ACK) and skips the rest, so it
/// buffers at most 28 bytes.
#[derive(Debug, Default)]
struct ServerStream {
    /// Bytes of the current chunk's header read so far.
    head: Vec<u8>,
    /// Bytes of the current chunk still to skip after its header.
    skip: usize,
    /// Set once the stream stops making sense as chunks; the front then
    /// only copies bytes.
    lost: bool,
}

impl ServerStream {
    fn push(&mut self, mut bytes: &[u8]) -> Vec<ServerMessage> {
        let mut seen = Vec::new();
        while !bytes.is_empty() && !self.lost {
            if self.skip > 0 {
                let skipped = self.skip.min(bytes.len());
                self.skip -= skipped;
                bytes = &bytes[skipped..];
                continue;
            }
            let expected = if self.head.starts_with(b"ACK") {
                ACKNOWLEDGE_LEN
            } else {
                CHANNEL_HEADER_LEN
            };
            let copied = (expected - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..copied]);
            bytes = &bytes[copied..];
            if self.head.len() < expected {
                continue;
            }
            if self.head.starts_with(b"ACK") && expected == CHANNEL_HEADER_LEN {
                // The ACK is longer than a channel header: read on.
                continue;
            }
            let size = u32::from_le_bytes([self.head[4], self.head[5], self.head[6], self.head[7]])
                as usize;
            if size < self.head.len() {
                self.lost = true;
                break;
            }
            if self.head.starts_with(b"ACKF") {
                if let Some(ack) = Acknowledge::parse(&self.head) {
                    seen.push(ServerMessage::Acknowledge(ack));
                }
            } else if self.head.starts_with(b"OPNF") {
                let id = [self.head[8], self.head[9], self.head[10], self.head[11]];
                seen.push(ServerMessage::OpenResponse(u32::from_le_bytes(id)));
            }
            self.skip = size - self.head.len();
            self.head.clear();
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(code: &[u8; 4], channel: u32, body_len: usize) -> Vec<u8> {
        let mut bytes = code.to_vec();
        bytes.extend_from_slice(&((CHANNEL_HEADER_LEN + body_len) as u32).to_le_bytes());
        bytes.extend_from_slice(&channel.to_le_bytes());
        bytes.resize(CHANNEL_HEADER_LEN + body_len, 0xAB);
        bytes
    }

    fn ack() -> Vec<u8> {
        let mut bytes = b"ACKF".to_vec();
        bytes.extend_from_slice(&28u32.to_le_bytes());
        for field in [0u32, 8192, 8192, 0x10_0000, 16] {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn server_stream_reports_ack_and_open_response_across_split_reads() {
        let mut stream = ack();
        stream.extend(chunk(b"OPNF", 7, 100));
        stream.extend(chunk(b"MSGF", 7, 40));
        stream.extend(chunk(b"OPNF", 7, 3));
        let mut walker = ServerStream::default();
        let mut seen = Vec::new();
        for piece in stream.chunks(5) {
            seen.extend(walker.push(piece));
        }
        assert_eq!(
            seen,
            [
                ServerMessage::Acknowledge(Acknowledge {
                    protocol_version: 0,
                    receive_buffer_size: 8192,
                    send_buffer_size: 8192,
                    max_message_size: 0x10_0000,
                    max_chunk_count: 16,
                }),
                ServerMessage::OpenResponse(7),
                ServerMessage::OpenResponse(7),
            ]
        );
    }

    #[test]
    fn server_stream_stops_at_a_size_below_the_header() {
        let mut walker = ServerStream::default();
        let mut stream = b"MSGF".to_vec();
        stream.extend_from_slice(&4u32.to_le_bytes());
        stream.extend_from_slice(&[0; 4]);
        stream.extend(chunk(b"OPNF", 9, 10));
        assert_eq!(walker.push(&stream), []);
        assert!(walker.lost);
    }

    #[test]
    fn channel_peers_forget_removed_channels() {
        let peers = ChannelPeers::default();
        let peer = SocketAddr::from(([127, 0, 0, 1], 40_000));
        peers.insert(3, peer);
        peers.insert(4, peer);
        peers.remove(&[3]);
        assert_eq!(peers.peer(3), None);
        assert_eq!(peers.peer(4), Some(peer));
    }
}
