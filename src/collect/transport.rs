//! Delivery of one batch to a collector: the event form both transports
//! take, their shared error type, and the `https` transport, which POSTs a
//! JSON array and counts a 2xx status as the acknowledgement.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use super::syslog::SyslogClient;
use crate::config::{CollectorConfig, CollectorTarget};

/// One spooled event: its JSON text as stored, and the parsed form that
/// the syslog header is built from.
#[derive(Debug, Clone)]
pub struct SpooledEvent {
    pub json: Vec<u8>,
    pub value: serde_json::Value,
}

/// The reason a batch was not delivered. Every case leaves the batch in the spool.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{0}")]
    Io(io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("{0} timed out")]
    TimedOut(&'static str),
    #[error("\"{0}\" is not a valid TLS server name")]
    InvalidName(String),
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("collector answered HTTP status {0}")]
    Status(u16),
}

/// Opens a TCP connection to `host:port` within `timeout`.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, DeliveryError> {
    let connect = TcpStream::connect((host, port));
    let stream = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| DeliveryError::TimedOut("TCP connect"))?
        .map_err(DeliveryError::Io)?;
    stream.set_nodelay(true).map_err(DeliveryError::Io)?;
    Ok(stream)
}

/// A collector's transport, holding its connection between batches.
pub enum Transport {
    Https(HttpsClient),
    Syslog(SyslogClient),
}

impl Transport {
    /// Builds the transport of `config`, reading its TLS files.
    pub fn new(config: &CollectorConfig) -> io::Result<Transport> {
        let tls = super::tls::client_config(&config.tls)?;
        Ok(match &config.target {
            CollectorTarget::Https {
                url,
                host,
                port,
                path,
                ..
            } => Transport::Https(HttpsClient::new(
                host.clone(),
                *port,
                path.clone(),
                url.clone(),
                tls,
                config.timeout,
            )),
            CollectorTarget::SyslogTls { host, port } => {
                Transport::Syslog(SyslogClient::new(host.clone(), *port, tls, config.timeout))
            }
        })
    }

    pub async fn deliver(&mut self, events: &[SpooledEvent]) -> Result<(), DeliveryError> {
        match self {
            Transport::Https(client) => client.deliver(events).await,
            Transport::Syslog(client) => client.deliver(events).await,
        }
    }

    pub async fn close(&mut self) {
        match self {
            Transport::Https(client) => client.close(),
            Transport::Syslog(client) => client.close().await,
        }
    }
}

/// An HTTP/1.1 connection over TLS to an `https` collector, opened on first
/// use and again after a failure.
pub struct HttpsClient {
    host: String,
    port: u16,
    path: String,
    url: String,
    connector: TlsConnector,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpsClient {
    pub fn new(
        host: String,
        port: u16,
        path: String,
        url: String,
        tls: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Self {
        HttpsClient {
            host,
            port,
            path,
            url,
            connector: TlsConnector::from(tls),
            timeout,
            sender: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, DeliveryError> {
        let tcp = connect_tcp(&self.host, self.port, self.timeout).await?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| DeliveryError::InvalidName(self.host.clone()))?;
        let tls = tokio::time::timeout(self.timeout, self.connector.connect(name, tcp))
            .await
            .map_err(|_| DeliveryError::TimedOut("TLS handshake"))?
            .map_err(DeliveryError::Tls)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let host = self.host.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%host, %error, "collector connection ended");
            }
        });
        Ok(sender)
    }

    /// POSTs the batch as one JSON array.
    pub async fn deliver(&mut self, events: &[SpooledEvent]) -> Result<(), DeliveryError> {
        let request = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, self.authority())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(json_array(events)))
            .expect("request parts are valid");
        let previous = self.sender.take().filter(|sender| !sender.is_closed());
        let exchange = async {
            let mut sender = match previous {
                Some(sender) => sender,
                None => self.connect().await?,
            };
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, DeliveryError>((sender, status))
        };
        let (sender, status) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| DeliveryError::TimedOut("HTTPS delivery"))??;
        self.sender = Some(sender);
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(status.as_u16()))
        }
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn close(&mut self) {
        self.sender = None;
    }
}

/// Joins the events' JSON texts into one JSON array.
pub fn json_array(events: &[SpooledEvent]) -> Bytes {
    let size = events
        .iter()
        .map(|event| event.json.len() + 1)
        .sum::<usize>()
        + 2;
    let mut body = Vec::with_capacity(size);
    body.push(b'[');
    for (index, event) in events.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&event.json);
    }
    body.push(b']');
    Bytes::from(body)
}
