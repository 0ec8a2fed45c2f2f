//! Refusing development credentials off loopback. The development signing
//! keys are derived from the agency ids and the development bearer tokens
//! are `dev-<agency>`: both are public, as is any token sent over plaintext
//! gRPC. That is fine on 127.0.0.1, where `refbus up` runs; on any other
//! address a service or the tracker with such credentials refuses to start,
//! naming each reason and its setting, unless the deployment says it is one
//! for development (`--development`, `REFBUS_DEVELOPMENT=true`).

use std::net::SocketAddr;
use std::path::Path;

use refbus_core::signing::DEVELOPMENT;

use crate::BusSettings;
use crate::auth::Authenticator;

/// Which kind of listener a service opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The gRPC port: the RPCs, authenticated with the process's credentials.
    Grpc,
    /// The HTTP port: `/metrics`, `/healthz` and the tracker's dashboard,
    /// which signs in with a bearer token.
    Http,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Listener::Grpc => "gRPC",
            Listener::Http => "HTTP",
        })
    }
}

/// A listener off loopback with development credentials.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to serve {listener} on {addr}, which is not a loopback address, with development credentials: {}. For a development deployment, say so with --development (REFBUS_DEVELOPMENT=true)",
    reasons.join("; ")
)]
pub struct Exposed {
    pub listener: Listener,
    pub addr: SocketAddr,
    /// Each reason, naming its setting.
    pub reasons: Vec<String>,
}

/// Whether only this machine can reach `addr` (127.0.0.0/8, ::1, and
/// IPv4-mapped loopback). `0.0.0.0` and `::` are every address: not loopback.
#[must_use]
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Why `listener` on `addr` may not serve with these credentials: every
/// development credential in use, when `addr` is not loopback and the
/// deployment is not declared a development one.
///
/// # Errors
/// [`Exposed`] with a reason for each development credential.
pub fn check(
    settings: &BusSettings,
    auth: &Authenticator,
    listener: Listener,
    addr: SocketAddr,
) -> Result<(), Exposed> {
    if settings.development || is_loopback(addr) {
        return Ok(());
    }
    let mut reasons = Vec::new();
    if settings.signing_keys == Path::new(DEVELOPMENT) {
        reasons.push(
            "REFBUS_SIGNING_KEYS=development: the development signing keys are derived from the agency ids, so anyone can sign as any agency (make the deployment's own with `refbus keys generate`)"
                .to_owned(),
        );
    }
    let development_tokens = auth.development_tokens();
    if let Some(first) = development_tokens.first() {
        reasons.push(format!(
            "REFBUS_TOKENS={}: the public development bearer tokens `dev-<agency>` let anyone act as {} agencies (`{first}` first); give the deployment tokens of its own",
            settings.auth.tokens.display(),
            development_tokens.len()
        ));
    }
    if listener == Listener::Grpc && auth.plaintext_bearer() {
        reasons.push(
            "REFBUS_AUTH=bearer without REFBUS_TLS_CERT and REFBUS_TLS_KEY: bearer tokens would cross the network in plaintext gRPC (give the services a certificate, or use REFBUS_AUTH=mtls)"
                .to_owned(),
        );
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(Exposed {
            listener,
            addr,
            reasons,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_loopback() {
        for loopback in [
            "127.0.0.1:50051",
            "127.0.0.2:0",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
        ] {
            assert!(is_loopback(loopback.parse().unwrap()), "{loopback}");
        }
        for exposed in [
            "0.0.0.0:50051",
            "[::]:0",
            "10.0.0.5:50051",
            "[::ffff:10.0.0.5]:0",
        ] {
            assert!(!is_loopback(exposed.parse().unwrap()), "{exposed}");
        }
    }
}
