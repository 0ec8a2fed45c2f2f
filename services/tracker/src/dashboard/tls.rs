//! The dashboard's port over TLS, for a tracker whose gRPC runs with
//! mutual TLS: the same certificate and client CA as gRPC, a client
//! certificate asked for but not required (a browser without one signs in
//! with a bearer token; `/metrics` stays reachable), and the certificate a
//! connection presented handed to the dashboard as [`PeerCertificate`], so
//! that the agency it names can sign in with it.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;

use super::PeerCertificate;

/// How long a client may take over the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the dashboard's TLS configuration cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A server configuration from PEM: the server's certificate chain and
/// key, and (with mutual TLS) the CA whose client certificates name
/// agencies. A client certificate is verified when presented, not
/// required; without a client CA none is asked for (bearer tokens over
/// TLS).
///
/// # Errors
/// [`TlsError`] naming the PEM that does not parse, or the configuration.
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<ServerConfig, TlsError> {
    let pem = |what| {
        move |e: tokio_rustls::rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            reason: e.to_string(),
        }
    };
    let config = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(pem("key"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config(&e))?;
    let builder = match client_ca_pem {
        Some(client_ca_pem) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(client_ca_pem) {
                roots
                    .add(ca.map_err(pem("client CA"))?)
                    .map_err(|e| config(&e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| config(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| config(&e))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(server)
}

/// Serves `router` over TLS on `listener` until `shutdown`; each request
/// carries the connection's client certificate, if any.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    tls: Arc<ServerConfig>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let tcp = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, router, shutdown) = (acceptor.clone(), router.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "dashboard: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| PeerCertificate(leaf.as_ref().to_vec()));
            let app = match certificate {
                Some(certificate) => router.layer(Extension(certificate)),
                None => router,
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            tokio::select! {
                served = connection => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "dashboard: connection ended");
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
    }
}
