//! The write side of an upstream connection, plain TCP or MODBUS/TCP
//! Security. The connection task writes without waiting and waits only for
//! the socket to take more, so both kinds offer a non-blocking write and a
//! wait for room.

use std::future::Future;
use std::io;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::WriteHalf;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The write half of one upstream connection.
pub(super) trait UpstreamWriter {
    /// Writes as much of `buffer` as the connection takes without waiting.
    fn write_pending(&mut self, buffer: &mut BytesMut) -> io::Result<()>;

    /// Returns true while bytes accepted earlier still wait to be sent.
    fn has_unsent(&self) -> bool;

    /// Completes when the connection can take more bytes.
    fn ready(&mut self) -> impl Future<Output = io::Result<()>>;
}

impl UpstreamWriter for WriteHalf<'_> {
    fn write_pending(&mut self, buffer: &mut BytesMut) -> io::Result<()> {
        if buffer.is_empty() {
            return Ok(());
        }
        match self.try_write(buffer) {
            Ok(written) => {
                buffer.advance(written);
                Ok(())
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn has_unsent(&self) -> bool {
        false
    }

    async fn ready(&mut self) -> io::Result<()> {
        self.writable().await
    }
}

/// The write half of a TLS connection. rustls takes plaintext into its own
/// buffer and sends records as the socket allows, so a write that could not
/// send everything leaves `unsent` set until a flush completes.
pub(super) struct TlsWriter<'a> {
    pub inner: tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>,
    pub unsent: bool,
}

impl UpstreamWriter for TlsWriter<'_> {
    fn write_pending(&mut self, buffer: &mut BytesMut) -> io::Result<()> {
        if !buffer.is_empty() {
            match self.inner.write(buffer).now_or_never() {
                Some(Ok(written)) => buffer.advance(written),
                Some(Err(error)) => return Err(error),
                None => {
                    self.unsent = true;
                    return Ok(());
                }
            }
        }
        match self.inner.flush().now_or_never() {
            Some(Ok(())) => self.unsent = false,
            Some(Err(error)) => return Err(error),
            None => self.unsent = true,
        }
        Ok(())
    }

    fn has_unsent(&self) -> bool {
        self.unsent
    }

    async fn ready(&mut self) -> io::Result<()> {
        self.inner.flush().await?;
        self.unsent = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use bytes::Bytes;
    use tokio::net::TcpListener;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio_rustls::TlsAcceptor;

    use crate::config::{DeviceTls, TlsClient};
    use crate::events::Emitter;
    use crate::identity::certificate::CertificateIdentity;
    use crate::identity::test_pki::{Leaf, TestCa};
    use crate::modbus::pdu::Request;
    use crate::modbus::sim::SimPlc;
    use crate::modbus::upstream::{Pool, UpstreamSettings};

    fn der_pair(leaf: &Leaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![CertificateDer::from(leaf.der.clone())],
            PrivateKeyDer::try_from(leaf.key_der.clone()).unwrap(),
        )
    }

    fn roots(ca: &TestCa) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der.clone())).unwrap();
        Arc::new(roots)
    }

    /// Starts a simulated PLC behind a TLS front that requires a client
    /// certificate of `ca`. Returns its address and a channel that receives
    /// the common name of each client certificate.
    async fn tls_plc(
        ca: &TestCa,
        plc_leaf: &Leaf,
    ) -> (SocketAddr, tokio::sync::mpsc::Receiver<Option<String>>) {
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_address = plain.local_addr().unwrap();
        tokio::spawn(SimPlc::new().serve(plain));

        let verifier = WebPkiClientVerifier::builder(roots(ca)).build().unwrap();
        let (chain, key) = der_pair(plc_leaf);
        let config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = front.local_addr().unwrap();
        let (names, received) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((stream, _)) = front.accept().await {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    continue;
                };
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let name = CertificateIdentity::from_der(&peer).unwrap().subject_cn;
                let _ = names.send(name).await;
                let mut plc = tokio::net::TcpStream::connect(plain_address).await.unwrap();
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plc).await;
                });
            }
        });
        (address, received)
    }

    #[tokio::test]
    async fn pool_reads_through_tls_device_with_client_certificate() {
        let ca = TestCa::new("plant CA");
        let plc_leaf = ca.leaf("plc", &["plc.plant.example"], None, 1);
        let sluice_leaf = ca.leaf("sluice", &[], None, 2);
        let (address, mut names) = tls_plc(&ca, &plc_leaf).await;

        let (chain, key) = der_pair(&sluice_leaf);
        let client = ClientConfig::builder()
            .with_root_certificates(roots(&ca))
            .with_client_auth_cert(chain, key)
            .unwrap();
        let mut settings = UpstreamSettings::new("press-1", address);
        settings.max_in_flight = 4;
        settings.tls = Some(DeviceTls {
            client: TlsClient(Arc::new(client)),
            server_name: ServerName::try_from("plc.plant.example").unwrap(),
        });
        let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
        let pool = Pool::new(settings, emitter);

        let read = |address| Request::ReadHoldingRegisters {
            address,
            quantity: 2,
        };
        let (at_10, at_20) = (read(10), read(20));
        let (first, second) = tokio::join!(pool.call(1, &at_10), pool.call(1, &at_20));
        assert_eq!(first.unwrap(), Bytes::from_static(&[3, 4, 0, 10, 0, 11]));
        assert_eq!(second.unwrap(), Bytes::from_static(&[3, 4, 0, 20, 0, 21]));
        assert_eq!(names.recv().await, Some(Some("sluice".to_owned())));
        pool.shutdown();
    }

    #[tokio::test]
    async fn tls_device_with_unknown_certificate_is_unreachable() {
        let ca = TestCa::new("plant CA");
        let other = TestCa::new("other CA");
        let plc_leaf = other.leaf("plc", &["plc.plant.example"], None, 1);
        let sluice_leaf = ca.leaf("sluice", &[], None, 2);
        let (address, _names) = tls_plc(&ca, &plc_leaf).await;

        let (chain, key) = der_pair(&sluice_leaf);
        let client = ClientConfig::builder()
            .with_root_certificates(roots(&ca))
            .with_client_auth_cert(chain, key)
            .unwrap();
        let mut settings = UpstreamSettings::new("press-1", address);
        settings.tls = Some(DeviceTls {
            client: TlsClient(Arc::new(client)),
            server_name: ServerName::try_from("plc.plant.example").unwrap(),
        });
        let (emitter, _events) = Emitter::new(Arc::from("edge-01"));
        let pool = Pool::new(settings, emitter);
        let error = pool
            .call(
                1,
                &Request::ReadHoldingRegisters {
                    address: 0,
                    quantity: 1,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("device press-1 at {address} unreachable: TLS handshake failed: invalid peer certificate: UnknownIssuer")
        );
        pool.shutdown();
    }
}
