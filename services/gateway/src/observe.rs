//! What operators see of a running service: Prometheus metrics on HTTP
//! `/metrics` (with `/healthz` beside it), the standard gRPC health service
//! and gRPC server reflection (v1 and v1alpha) on every gRPC port
//! ([`crate::server`] adds them to each server).
//!
//! One [`Telemetry`] per process holds the registry every component
//! registers its metrics in: the bus (published, confirmed,
//! dead-lettered), the agency services ([`GatewayMetrics`]) and the
//! tracker. Labels are services, message kinds, queue roles and gRPC
//! codes: never an id, a name or anything of a message's content.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use refbus_bus::{Bus, ConnectionWatch};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The Prometheus registry of one process.
#[derive(Default)]
pub struct Telemetry {
    registry: Mutex<Registry>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Telemetry {
    /// Lets a component register its metrics.
    pub fn register(&self, with: impl FnOnce(&mut Registry)) {
        let mut registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        with(&mut registry);
    }

    /// The metrics in Prometheus's text exposition format.
    #[must_use]
    pub fn encode(&self) -> String {
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Label: which agency service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

/// Labels: which agency service, which message kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceKind {
    pub service: String,
    pub kind: String,
}

/// Labels: which agency service, which RPC, which gRPC code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceCode {
    pub service: String,
    pub rpc: String,
    pub code: String,
}

type Seconds = Family<ServiceLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

fn batch_histogram() -> Histogram {
    // 1 to 4,096 deliveries.
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// What the agency services count. Cheap to clone (shared handles).
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    /// Envelopes published and confirmed for an agency's system
    /// (submissions, feedback, relays), by kind.
    pub submitted: Family<ServiceKind, Counter>,
    /// Calls refused, by RPC and gRPC code.
    pub rejected: Family<ServiceCode, Counter>,
    /// Deliveries an agency's system has (acknowledged), by kind.
    pub delivered: Family<ServiceKind, Counter>,
    /// Deliveries an agency's system acknowledged.
    pub acknowledged: Family<ServiceLabel, Counter>,
    /// Deliveries refused as unsigned, forged, altered or misaddressed.
    pub refused: Family<ServiceLabel, Counter>,
    /// How long a `Submit` took: validation, signing, the broker's confirm.
    pub submit_seconds: Seconds,
    /// From an envelope's `submitted_at` to its hand-over on an `Inbox`
    /// stream: the bus's end-to-end latency.
    pub delivery_seconds: Seconds,
    /// How many deliveries each batch an `Inbox` stream took from the
    /// broker held (one signature check and one id look-up per batch).
    pub inbox_batch_deliveries: Family<ServiceLabel, Histogram, fn() -> Histogram>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            submitted: Family::default(),
            rejected: Family::default(),
            delivered: Family::default(),
            acknowledged: Family::default(),
            refused: Family::default(),
            submit_seconds: Family::new_with_constructor(latency_histogram),
            delivery_seconds: Family::new_with_constructor(latency_histogram),
            inbox_batch_deliveries: Family::new_with_constructor(batch_histogram),
        }
    }
}

impl GatewayMetrics {
    /// Registers the metrics (as `refbus_gateway_*`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("refbus_gateway");
        r.register(
            "submitted",
            "Envelopes published and confirmed for agency systems, by kind",
            self.submitted.clone(),
        );
        r.register(
            "rejected",
            "Calls refused, by RPC and gRPC code",
            self.rejected.clone(),
        );
        r.register(
            "delivered",
            "Deliveries agency systems have (handed over and acknowledged), by kind",
            self.delivered.clone(),
        );
        r.register(
            "acknowledged",
            "Deliveries acknowledged by agency systems",
            self.acknowledged.clone(),
        );
        r.register(
            "refused",
            "Deliveries refused as unsigned, forged, altered or misaddressed",
            self.refused.clone(),
        );
        r.register(
            "submit_seconds",
            "Submit latency: validation, signing and the broker's confirm",
            self.submit_seconds.clone(),
        );
        r.register(
            "delivery_seconds",
            "From an envelope's submitted_at to its hand-over on an Inbox stream",
            self.delivery_seconds.clone(),
        );
        r.register(
            "inbox_batch_deliveries",
            "Deliveries in each batch an Inbox stream took from the broker",
            self.inbox_batch_deliveries.clone(),
        );
    }

    /// The metrics of one agency service, its service-labelled series
    /// resolved once (no look-up or allocation per call for those).
    #[must_use]
    pub fn for_service(&self, service: &'static str) -> ServiceMetrics {
        let label = ServiceLabel {
            service: service.to_owned(),
        };
        ServiceMetrics {
            service,
            all: self.clone(),
            acknowledged: self.acknowledged.get_or_create_owned(&label),
            refused: self.refused.get_or_create_owned(&label),
            submit_seconds: self.submit_seconds.get_or_create_owned(&label),
            delivery_seconds: self.delivery_seconds.get_or_create_owned(&label),
            inbox_batch_deliveries: self.inbox_batch_deliveries.get_or_create_owned(&label),
        }
    }
}

/// What one agency service counts (see [`GatewayMetrics`]).
#[derive(Clone, Debug)]
pub struct ServiceMetrics {
    service: &'static str,
    all: GatewayMetrics,
    pub acknowledged: Counter,
    pub refused: Counter,
    pub submit_seconds: Histogram,
    pub delivery_seconds: Histogram,
    pub inbox_batch_deliveries: Histogram,
}

impl ServiceMetrics {
    fn by_kind(&self, kind: &str) -> ServiceKind {
        ServiceKind {
            service: self.service.to_owned(),
            kind: kind.to_owned(),
        }
    }

    /// An envelope published and confirmed for an agency's system.
    pub fn submitted(&self, kind: &str) {
        self.all.submitted.get_or_create(&self.by_kind(kind)).inc();
    }

    /// A delivery the agency's system has: handed over and acknowledged.
    pub fn delivered(&self, kind: &str) {
        self.all.delivered.get_or_create(&self.by_kind(kind)).inc();
    }

    /// A delivery handed over on an `Inbox` stream, submitted at
    /// `submitted_at` (when known): the bus's end-to-end latency.
    pub fn handed_over(&self, submitted_at: Option<chrono::DateTime<chrono::Utc>>) {
        if let Some(at) = submitted_at {
            #[allow(clippy::cast_precision_loss)]
            let seconds = (chrono::Utc::now() - at)
                .num_microseconds()
                .unwrap_or(0)
                .max(0) as f64
                / 1e6;
            self.delivery_seconds.observe(seconds);
        }
    }

    /// A call refused with `status`.
    pub fn reject(&self, rpc: &str, status: &tonic::Status) {
        self.all
            .rejected
            .get_or_create(&ServiceCode {
                service: self.service.to_owned(),
                rpc: rpc.to_owned(),
                code: format!("{:?}", status.code()),
            })
            .inc();
    }
}

/// `/metrics` and `/healthz`, the HTTP side every service serves.
pub fn metrics_router(telemetry: Arc<Telemetry>, bus: Bus) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(telemetry)
        .route(
            "/healthz",
            get(move || {
                let up = bus.is_up();
                async move {
                    if up {
                        (StatusCode::OK, "ok: connected to the broker\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the broker is unreachable\n",
                        )
                    }
                }
            }),
        )
}

async fn metrics(State(telemetry): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        telemetry.encode(),
    )
}

/// Binds the HTTP listener.
///
/// # Errors
/// The bind error.
pub async fn bind_http(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve_http(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let addr = listener.local_addr().ok();
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, ?addr, "HTTP server stopped");
    }
}

/// The default HTTP address of a service whose gRPC address is `grpc`: the
/// same host, port + 1000; any free port when the gRPC port is 0 or above
/// 64535.
#[must_use]
pub fn default_http_addr(grpc: SocketAddr) -> SocketAddr {
    let port = match grpc.port() {
        0 => 0,
        p => p.checked_add(1000).unwrap_or(0),
    };
    SocketAddr::new(grpc.ip(), port)
}

/// The gRPC health service, kept in step with the broker connection: every
/// service in `names` (and the server as a whole, "") is SERVING while the
/// bus is connected, NOT_SERVING while it is not. Every status is set
/// before this returns, so that a probe of a named service right after
/// start-up never finds it unregistered (NOT_FOUND).
pub async fn health_service(
    bus: Bus,
    names: Vec<&'static str>,
    shutdown: CancellationToken,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let connection = bus.connection();
    report(&reporter, &names, connection.is_up()).await;
    tokio::spawn(follow_bus(reporter, connection, names, shutdown));
    service
}

/// Sets every one of `names` and the server as a whole ("") to SERVING
/// when `up`, else NOT_SERVING.
async fn report(reporter: &HealthReporter, names: &[&'static str], up: bool) {
    let status = if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
    reporter.set_service_status("", status).await;
}

async fn follow_bus(
    reporter: HealthReporter,
    mut connection: ConnectionWatch,
    names: Vec<&'static str>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = connection.changed() => if !changed { break },
        }
        report(&reporter, &names, connection.is_up()).await;
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

/// gRPC server reflection over the refbus contract and the health service,
/// so `grpcurl` works without the proto files: `grpc.reflection.v1` and
/// `grpc.reflection.v1alpha` (which Python's grpcio-reflection, Postman and
/// older grpcurl speak), from the same descriptors.
///
/// # Errors
/// When the embedded descriptor sets do not decode (a build defect).
pub fn reflection_services() -> Result<
    (
        tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<
            impl tonic_reflection::pb::v1::server_reflection_server::ServerReflection,
        >,
        tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer<
            impl tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(refbus_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_port_is_grpc_port_plus_1000() {
        let grpc: SocketAddr = "127.0.0.1:50053".parse().unwrap();
        assert_eq!(default_http_addr(grpc).port(), 51053);
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(default_http_addr(any).port(), 0);
        let high: SocketAddr = "127.0.0.1:65000".parse().unwrap();
        assert_eq!(default_http_addr(high).port(), 0);
    }

    #[test]
    fn metrics_encode_with_labels_and_no_content() {
        let telemetry = Telemetry::default();
        let gateway = GatewayMetrics::default();
        telemetry.register(|r| gateway.register(r));
        gateway
            .delivered
            .get_or_create(&ServiceKind {
                service: "legal-aid".into(),
                kind: "legal_help_request".into(),
            })
            .inc_by(3);
        gateway
            .delivery_seconds
            .get_or_create(&ServiceLabel {
                service: "legal-aid".into(),
            })
            .observe(0.004);
        let text = telemetry.encode();
        assert!(
            text.contains(
                "refbus_gateway_delivered_total{service=\"legal-aid\",kind=\"legal_help_request\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("refbus_gateway_delivery_seconds_count{service=\"legal-aid\"} 1"),
            "{text}"
        );
    }
}
