//! The `syslog-tls` transport: RFC 5424 messages in RFC 5425 octet-counted
//! frames over TLS. Syslog has no application acknowledgement, so a batch
//! counts as delivered once it is written and flushed into the TLS stream.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use super::transport::{connect_tcp, DeliveryError, SpooledEvent};

/// Facility local0 (16), shifted as RFC 5424 section 6.2.1 computes PRI.
const FACILITY_LOCAL0: u8 = 16 * 8;
/// RFC 5424 severities used by sluice.
const CRITICAL: u8 = 2;
const ERROR: u8 = 3;
const WARNING: u8 = 4;
const NOTICE: u8 = 5;
const INFORMATIONAL: u8 = 6;
/// Longest HOSTNAME field, RFC 5424 section 6.2.4.
const MAX_HOSTNAME: usize = 255;
/// Longest MSGID field, RFC 5424 section 6.2.7.
const MAX_MSGID: usize = 32;

/// Returns the RFC 5424 severity of an event: an anomaly's severity mapped
/// from critical (2) to low (5), a denial 5, everything else 6.
pub fn severity(event: &serde_json::Value) -> u8 {
    if let Some(severity) = event
        .get("anomaly")
        .and_then(|anomaly| anomaly.get("severity"))
        .and_then(|severity| severity.as_str())
    {
        return match severity {
            "critical" => CRITICAL,
            "high" => ERROR,
            "medium" => WARNING,
            _ => NOTICE,
        };
    }
    match event.get("decision").and_then(|decision| decision.as_str()) {
        Some("deny") => NOTICE,
        _ => INFORMATIONAL,
    }
}

/// Keeps the printable US-ASCII characters of a header field, RFC 5424
/// section 6, and returns the nil value `-` for an empty one.
fn header_field(text: Option<&str>, max: usize) -> String {
    let field: String = text
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if field.is_empty() {
        "-".to_owned()
    } else {
        field
    }
}

/// Formats one event as an RFC 5425 frame: `LEN SP MSG`, where MSG is
/// `<PRI>1 TIMESTAMP HOSTNAME sluice - EVENT_TYPE - JSON`. HOSTNAME is the
/// event's `gateway` and TIMESTAMP its `timestamp`.
pub fn frame(event: &SpooledEvent) -> Vec<u8> {
    let text = |key: &str| event.value.get(key).and_then(|value| value.as_str());
    let header = format!(
        "<{}>1 {} {} sluice - {} - ",
        FACILITY_LOCAL0 + severity(&event.value),
        header_field(text("timestamp"), MAX_HOSTNAME),
        header_field(text("gateway"), MAX_HOSTNAME),
        header_field(text("event_type"), MAX_MSGID),
    );
    let length = header.len() + event.json.len();
    let mut frame = format!("{length} {header}").into_bytes();
    frame.extend_from_slice(&event.json);
    frame
}

/// A connection to a syslog receiver, opened on first use and again after
/// a failure.
pub struct SyslogClient {
    host: String,
    port: u16,
    connector: TlsConnector,
    timeout: Duration,
    /// Boxed because a TLS stream is large and idles between batches.
    stream: Option<Box<TlsStream<TcpStream>>>,
}

impl SyslogClient {
    pub fn new(host: String, port: u16, tls: Arc<ClientConfig>, timeout: Duration) -> Self {
        SyslogClient {
            host,
            port,
            connector: TlsConnector::from(tls),
            timeout,
            stream: None,
        }
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, DeliveryError> {
        let tcp = connect_tcp(&self.host, self.port, self.timeout).await?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| DeliveryError::InvalidName(self.host.clone()))?;
        let handshake = self.connector.connect(name, tcp);
        tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| DeliveryError::TimedOut("TLS handshake"))?
            .map_err(DeliveryError::Tls)
    }

    /// Writes every event of the batch and flushes the stream.
    pub async fn deliver(&mut self, events: &[SpooledEvent]) -> Result<(), DeliveryError> {
        if self.stream.as_deref_mut().is_some_and(peer_closed) {
            tracing::debug!(host = %self.host, port = self.port, "syslog receiver closed the connection");
            self.stream = None;
        }
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => Box::new(self.connect().await?),
        };
        let mut buffer = Vec::new();
        for event in events {
            buffer.extend_from_slice(&frame(event));
        }
        let write = async {
            stream.write_all(&buffer).await?;
            stream.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| DeliveryError::TimedOut("syslog write"))?
            .map_err(DeliveryError::Io)?;
        self.stream = Some(stream);
        Ok(())
    }

    /// Closes the connection with a TLS close_notify.
    pub async fn close(&mut self) {
        if let Some(mut stream) = self.stream.take() {
            let _ = tokio::time::timeout(self.timeout, stream.shutdown()).await;
        }
    }
}

/// Returns true when the receiver has closed the connection. Syslog
/// receivers send nothing, so any readable data or end of stream means the
/// connection is no longer usable; this catches a receiver restart before a
/// batch is written into a dead connection.
fn peer_closed(stream: &mut TlsStream<TcpStream>) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).now_or_never() {
        None => false,
        Some(Ok(_)) | Some(Err(_)) => true,
    }
}

impl From<io::Error> for DeliveryError {
    fn from(error: io::Error) -> Self {
        DeliveryError::Io(error)
    }
}
