//! The `refbus` command.
//!
//! - `refbus up` runs every agency service in one process, for a
//!   single-machine deployment, against the RabbitMQ at `AMQP_URL`.
//! - `refbus topology` prints the bus topology as RabbitMQ definitions
//!   (the source of `deploy/rabbitmq/definitions.json`).
//! - `refbus directory check` validates an agency directory.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use clap::{Parser, Subcommand};
use refbus_bus::{BusError, Topology, redact_url};
use refbus_core::Directory;
use refbus_gateway::app::{Application, Shared, StartError, serve_all, shutdown_on_signal};
use refbus_gateway::auth::AuthMode;
use refbus_gateway::{AgencyService, BusSettings, telemetry};
use refbus_tracker::{Clock, Tracker, TrackerSettings};
use tokio_util::sync::CancellationToken;

/// Command-line interface.
#[derive(Debug, Parser)]
#[command(
    name = "refbus",
    version,
    about = "refbus: the inter-agency referral and notification bus."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every agency service in this process (single-machine deployment).
    ///
    /// Example: AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f refbus up
    Up(Box<UpArgs>),
    /// Print the bus topology as RabbitMQ definitions JSON.
    Topology {
        #[arg(
            long,
            env = "REFBUS_DIRECTORY",
            default_value = "deploy/local/directory.toml"
        )]
        directory: std::path::PathBuf,
        #[arg(long, env = "REFBUS_NAMESPACE", default_value = "refbus")]
        namespace: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Validate an agency directory and list its agencies.
    Directory {
        #[command(subcommand)]
        action: DirectoryAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum DirectoryAction {
    /// Check a directory file: exits 1 with the line and the problem if it is invalid.
    Check {
        #[arg(default_value = "deploy/local/directory.toml")]
        path: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub bus: BusSettings,
    /// The address the agency services listen on.
    #[arg(long, env = "REFBUS_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// The first of five consecutive ports (detention-centre, case-unit,
    /// legal-aid, justice-bureau, bar-association); 0 picks free ports.
    #[arg(long, env = "REFBUS_PORT_BASE", default_value_t = 50051)]
    pub port_base: u16,
    #[command(flatten)]
    pub tracker: TrackerSettings,
}

/// What `refbus up` prints when the broker cannot be reached: one line.
#[must_use]
pub fn broker_unreachable(url: &str, reason: &str) -> String {
    format!(
        "cannot reach RabbitMQ at {url} ({reason}); start one with `rabbitmq-server -detached` (Debian package rabbitmq-server) or `docker compose -f deploy/compose.yaml up -d rabbitmq`, or set AMQP_URL"
    )
}

/// Runs `refbus up` until SIGINT or SIGTERM.
///
/// # Errors
/// A one-line start-up error (directory, broker, port).
pub async fn up(mut args: Box<UpArgs>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let url = redact_url(&args.bus.amqp_url);
    let namespace = args.bus.namespace.clone();
    let auth = args.bus.auth.clone();
    let shared = match Shared::connect(args.bus, shutdown.clone()).await {
        Ok(shared) => shared,
        Err(StartError::Bus(BusError::Connect { url, reason })) => {
            anyhow::bail!(broker_unreachable(&url, &reason))
        }
        Err(e) => return Err(e.into()),
    };
    let mut apps = Vec::new();
    for (i, service) in AgencyService::ALL.into_iter().enumerate() {
        let port = if args.port_base == 0 {
            0
        } else {
            args.port_base + u16::try_from(i)?
        };
        apps.push(
            Application::build(service, &shared, SocketAddr::new(args.host, port), &[]).await?,
        );
    }
    if args.tracker.listen.is_none() {
        let port = if args.port_base == 0 {
            0
        } else {
            args.port_base + 5
        };
        args.tracker.listen = Some(SocketAddr::new(args.host, port));
    }
    let ledger = args.tracker.database_url.clone().map_or_else(
        || format!("SQLite in {}", args.tracker.data_dir.display()),
        |url| redact_url(&url),
    );
    let tracker = Tracker::build(&args.tracker, &shared, Clock::System).await?;
    let scheme = shared.auth.scheme();
    println!(
        "refbus is up on {url} (namespace `{namespace}`, {} agencies)",
        shared.directory.agencies().len()
    );
    for app in &apps {
        println!(
            "  {:<17} {scheme}://{}  ({} agencies)",
            app.service().name(),
            app.local_addr()?,
            app.core().served.len()
        );
    }
    println!(
        "  {:<17} {scheme}://{}  (ledger: {ledger})",
        "tracker",
        tracker.local_addr()?
    );
    match auth.mode {
        AuthMode::Bearer => println!(
            "Callers authenticate with a bearer token from {} (development: `authorization: Bearer dev-<agency id>`).",
            auth.tokens.display()
        ),
        AuthMode::Mtls => println!(
            "Callers authenticate with a client certificate naming their agency (mutual TLS)."
        ),
    }
    println!("Ctrl-C stops it; unacknowledged deliveries return to their queues.");
    tokio::spawn(shutdown_on_signal(shutdown));
    let tracked = tokio::spawn(tracker.run());
    serve_all(apps, &shared).await?;
    tracked.await??;
    println!("refbus stopped.");
    Ok(())
}

/// Runs the parsed command.
///
/// # Errors
/// Whatever the command failed with, as one line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => {
            telemetry::init("info");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(up(args))
        }
        Command::Topology {
            directory,
            namespace,
            vhost,
        } => {
            let directory = Directory::load(directory)?;
            let topology = Topology::new(
                namespace,
                directory.agencies().iter().map(|a| a.id.clone()).collect(),
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&topology.definitions(&vhost))?
            );
            Ok(())
        }
        Command::Directory {
            action: DirectoryAction::Check { path },
        } => {
            let directory = Directory::load(&path)?;
            println!(
                "{}: {} agencies, valid",
                path.display(),
                directory.agencies().len()
            );
            Ok(())
        }
    }
}
