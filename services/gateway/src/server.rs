//! How every refbus gRPC port is served, the agency services' and the
//! tracker's alike: TLS when the process has a certificate, HTTP/2 and TCP
//! keepalives, and server reflection (`grpc.reflection.v1` and `v1alpha`)
//! answering without credentials.
//!
//! Keepalives matter for the `Inbox` stream: a client whose machine or
//! network vanished without closing its connection (half-open) would
//! otherwise hold its unacknowledged deliveries until the kernel gives up on
//! the socket, hours later. The server pings every client connection that
//! has been quiet for [`Keepalive::interval`]; one that does not answer
//! within [`Keepalive::timeout`] is closed, its streams end and their
//! unacknowledged deliveries return to the queue.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};

use crate::auth::Authenticator;
use crate::observe;
use crate::settings::parse_duration;

/// TCP keepalive probes, once the connection has been idle for
/// [`Keepalive::tcp`]: one every this long ...
const TCP_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// ... and the connection is dropped after this many unanswered.
const TCP_PROBES: u32 = 3;

/// Keepalive settings of the gRPC servers of a process (`0s` turns one off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct Keepalive {
    /// HTTP/2 PING a client connection after this long without a frame from it.
    #[arg(
        long = "grpc-keepalive-interval",
        env = "REFBUS_GRPC_KEEPALIVE_INTERVAL",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub interval: Duration,
    /// Close a client connection whose PING goes unanswered this long (its
    /// Inbox streams end; unacknowledged deliveries return to the queue).
    #[arg(
        long = "grpc-keepalive-timeout",
        env = "REFBUS_GRPC_KEEPALIVE_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub timeout: Duration,
    /// TCP keepalive: probe a client connection idle this long (then every
    /// 10 s, dropping it after 3 unanswered probes).
    #[arg(
        long = "tcp-keepalive",
        env = "REFBUS_TCP_KEEPALIVE",
        default_value = "60s",
        value_parser = parse_duration
    )]
    pub tcp: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            tcp: Duration::from_secs(60),
        }
    }
}

fn enabled(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

impl Keepalive {
    /// A server builder with these HTTP/2 keepalives.
    #[must_use]
    pub fn apply(&self, server: Server) -> Server {
        server
            .http2_keepalive_interval(enabled(self.interval))
            .http2_keepalive_timeout(enabled(self.timeout))
    }

    /// The accepted connections of `listener`, with TCP keepalive set on
    /// each (tonic's own `tcp_keepalive` does not apply to a listener bound
    /// beforehand).
    #[must_use]
    pub fn incoming(&self, listener: TcpListener) -> TcpIncoming {
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        match enabled(self.tcp) {
            Some(idle) => incoming
                .with_keepalive(Some(idle))
                .with_keepalive_interval(Some(TCP_PROBE_INTERVAL))
                .with_keepalive_retries(Some(TCP_PROBES)),
            None => incoming,
        }
    }
}

/// The gRPC server every refbus port starts from: TLS when `auth` has a
/// certificate (mutual TLS, or TLS with bearer tokens), the keepalives of
/// `auth`'s settings, and server reflection v1 and v1alpha. The caller adds
/// its health service and its authenticated services, then serves
/// [`incoming`].
///
/// # Errors
/// A TLS configuration tonic refuses (checked at start-up already, by
/// [`Authenticator::load`]).
pub fn grpc_server(auth: &Authenticator) -> Result<Router, tonic::transport::Error> {
    grpc_server_for(auth, false)
}

/// [`grpc_server`]; with `public`, a client certificate is optional under
/// mutual TLS: the lawyer service's public register (`LawyerRegistry`) is
/// asked by the agency services, which hold no client certificate, while
/// its lawyers' calls are authenticated per call (certificate or token).
///
/// # Errors
/// As [`grpc_server`].
pub fn grpc_server_for(
    auth: &Authenticator,
    public: bool,
) -> Result<Router, tonic::transport::Error> {
    let mut server = auth.keepalive().apply(Server::builder());
    if let Some(tls) = auth.server_tls() {
        server = server.tls_config(tls.client_auth_optional(public))?;
    }
    // Reflection answers without credentials, as health does: it describes
    // the contract, which is public (proto/), and carries no data.
    let (v1, v1alpha) = match observe::reflection_services() {
        Ok((v1, v1alpha)) => (Some(v1), Some(v1alpha)),
        Err(e) => {
            tracing::error!(error = %e, "gRPC reflection unavailable");
            (None, None)
        }
    };
    Ok(server
        .add_optional_service(v1)
        .add_optional_service(v1alpha))
}

/// The connections `listener` accepts, with `auth`'s TCP keepalive.
#[must_use]
pub fn incoming(listener: TcpListener, auth: &Authenticator) -> TcpIncoming {
    auth.keepalive().incoming(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        keepalive: Keepalive,
    }

    #[test]
    fn keepalives_are_on_by_default_and_configurable() {
        let defaults = Flags::try_parse_from(["x"]).unwrap().keepalive;
        assert_eq!(defaults, Keepalive::default());
        assert_eq!(enabled(defaults.interval), Some(Duration::from_secs(30)));
        assert_eq!(enabled(defaults.timeout), Some(Duration::from_secs(10)));
        assert_eq!(enabled(defaults.tcp), Some(Duration::from_secs(60)));
        let set = Flags::try_parse_from([
            "x",
            "--grpc-keepalive-interval",
            "500ms",
            "--grpc-keepalive-timeout",
            "1s",
            "--tcp-keepalive",
            "0s",
        ])
        .unwrap()
        .keepalive;
        assert_eq!(set.interval, Duration::from_millis(500));
        assert_eq!(set.timeout, Duration::from_secs(1));
        assert_eq!(enabled(set.tcp), None, "0s turns TCP keepalive off");
    }
}
