//! The `main` of the five agency-service binaries and the lawyer service's: flags and environment,
//! telemetry, build, serve until a signal, report how it ended.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::app::{Application, Shared, serve_all, shutdown_on_signal};
use crate::{AgencyService, BusSettings, observe, telemetry};

/// Flags of an agency-service binary.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "A refbus agency service: the gateway for the agencies of one kind (or the lawyer service)."
)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub bus: BusSettings,
    /// Where to serve gRPC (default: 127.0.0.1 and the service's port, 50051-50055; the lawyer service 50057).
    #[arg(long, env = "REFBUS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where to serve `/metrics` and `/healthz` over HTTP (default: the
    /// gRPC address's port + 1000, e.g. 51053 for legal-aid).
    #[arg(long, env = "REFBUS_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Act only for these agencies (comma-separated ids); default: every
    /// agency of the service's kinds in the directory.
    #[arg(long, env = "REFBUS_AGENCIES", value_delimiter = ',')]
    pub agencies: Vec<String>,
    #[command(flatten)]
    pub policy: crate::settings::PolicySetting,
}

/// Runs one agency service until SIGINT or SIGTERM.
///
/// # Errors
/// A start-up error naming what is wrong (directory entry, broker URL, port).
pub fn run(service: AgencyService) -> anyhow::Result<()> {
    serve(service, ServiceArgs::parse())
}

/// Runs one agency service with parsed `args` until SIGINT or SIGTERM (the
/// agency-service binaries, and `refbus serve`).
///
/// # Errors
/// As [`run`].
pub fn serve(service: AgencyService, mut args: ServiceArgs) -> anyhow::Result<()> {
    args.bus.policy.clone_from(&args.policy.policy);
    telemetry::init("info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let shared = Shared::connect(args.bus, shutdown.clone()).await?;
        let listen = args
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], service.default_port())));
        let mut app = Application::build(service, &shared, listen, &args.agencies).await?;
        let addr = app.local_addr().context("reading the bound address")?;
        let http = app
            .serve_http_on(
                args.http_listen
                    .unwrap_or_else(|| observe::default_http_addr(addr)),
            )
            .await?;
        println!(
            "{} serving {} agencies on {}://{addr} (metrics: http://{http}/metrics)",
            service.name(),
            app.core().served.len(),
            shared.auth.scheme()
        );
        tokio::spawn(shutdown_on_signal(shutdown));
        serve_all(vec![app], &shared).await?;
        tracing::info!(service = service.name(), "stopped");
        Ok(())
    })
}
