//! The `refbus` command.
//!
//! - `refbus serve SERVICE` and `refbus tracker` run one service each.
//! - `refbus up` runs every agency service, the lawyer service and the
//!   tracker in one process, for a single-machine deployment, against the
//!   RabbitMQ at `AMQP_URL`.
//! - `refbus topology` prints the bus topology as RabbitMQ definitions
//!   (the source of `deploy/rabbitmq/definitions.json`).
//! - `refbus directory check` validates an agency directory.
//! - `refbus keys generate` makes the Ed25519 signing keys of a deployment.
//! - `refbus send`, `inbox`, `ack`, `feedback`, `status`, `overdue`,
//!   `report`: a desk's or supervisor's work against a running bus
//!   ([`client`]); `refbus policy check` and `refbus audit verify`.
//! - `refbus dead-letter list` and `replay`: the dead-letter queue for an
//!   operator ([`dead_letter`]).

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

pub mod client;
pub mod dead_letter;
pub mod lawyers;

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
    about = "refbus: the inter-agency referral and notification bus.",
    after_help = client::EXIT_CODES
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
    /// Run one agency service (as its own binary would).
    ///
    /// Example: refbus serve legal-aid --listen 127.0.0.1:50053
    Serve {
        /// Which agency service.
        #[arg(value_enum)]
        service: AgencyService,
        #[command(flatten)]
        args: Box<refbus_gateway::cli::ServiceArgs>,
    },
    /// Run the tracker alone (as `tracker run` would).
    ///
    /// Example: DATABASE_URL=postgres://ledger@db/refbus refbus tracker
    Tracker {
        #[command(flatten)]
        bus: Box<BusSettings>,
        #[command(flatten)]
        tracker: Box<TrackerSettings>,
    },
    /// Print the bus topology as RabbitMQ definitions JSON.
    Topology(BusNames),
    /// Print a script that creates the RabbitMQ user of each agency service
    /// and of the tracker, with least privilege (issue 5): each reads only
    /// its own agencies' inboxes, writes only to the bus's exchanges,
    /// configures nothing. Passwords come from REFBUS_BROKER_PASSWORD_<USER>
    /// (e.g. REFBUS_BROKER_PASSWORD_LEGAL_AID), else are generated and printed.
    ///
    /// Example: refbus broker-users > deploy/rabbitmq/users.sh
    BrokerUsers(BusNames),
    /// Send a referral or notice from a JSON or TOML envelope file (several
    /// files: in one SubmitBatch call, each answered on its own).
    ///
    /// Example: refbus send -a dz-detention-centre request.json --key req-17 --clock-started 2026-11-23T08:00:00Z
    /// Example: refbus send -a dz-detention-centre requests/*.json
    #[command(after_help = SEND_HELP)]
    Send(client::SendArgs),
    /// Follow an agency's inbox, acknowledging each delivery as it is printed.
    ///
    /// Example: refbus inbox -a dz-duty-desk            (follow; Ctrl-C stops)
    /// Example: refbus inbox -a dz-duty-desk --no-ack --idle 5s -o json
    Inbox(client::InboxArgs),
    /// Acknowledge deliveries held on an open Inbox stream (`inbox --no-ack`).
    ///
    /// Example: refbus ack -a dz-duty-desk 5f3a09c1-3-1-17 5f3a09c1-3-1-18
    Ack(client::AckArgs),
    /// Answer a referral: the feedback goes back to its sender.
    ///
    /// Example: refbus feedback -a dz-duty-desk 0193... --outcome lawyer-assigned --summary "Lawyer Wang assigned"
    Feedback(client::FeedbackArgs),
    /// A referral's timeline and obligations, from the tracker.
    ///
    /// Example: refbus status -a dz-detention-centre 0193...
    Status(client::StatusArgs),
    /// Your agency's overdue obligations (with --all, every unmet one).
    ///
    /// Example: refbus overdue -a dz-duty-desk --rule CQ-1.1b
    Overdue(client::OverdueArgs),
    /// The compliance report (CQ-3.11) for a period: table, CSV or an HTML page with a chart.
    ///
    /// Example: refbus report -a dz-justice-bureau --from 2026-10-01 --to 2026-11-01 --format html --out october.html
    Report(client::ReportArgs),
    /// Check the policy catalogue against the directory.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Audit the tracker's ledger.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Validate an agency directory and list its agencies.
    Directory {
        #[command(subcommand)]
        action: DirectoryAction,
    },
    /// The dead-letter queue: what consumers could not decode, verify or
    /// store, each with the reason. List it; replay what was fixed.
    ///
    /// Example: refbus dead-letter list
    /// Example: refbus dead-letter replay --all
    DeadLetter {
        #[command(subcommand)]
        action: dead_letter::DeadLetterAction,
    },
    /// Lawyers on the bus: letter keys, meeting requests, the inbox (sealed
    /// letters opened locally), complaints, ratings; and, for a bar
    /// association or justice bureau, registering and suspending lawyers.
    ///
    /// Example: refbus lawyer keygen --out letters.key
    /// Example: refbus lawyer inbox -l 15001201910000001 --token $T --identity letters.key --idle 5s
    Lawyer {
        #[command(subcommand)]
        action: lawyers::LawyerAction,
    },
    /// A detention centre answers a lawyer's meeting request: arrange,
    /// refuse (with a reason from the closed list), record held (CQ-1.3a).
    ///
    /// Example: refbus meeting held -a dz-detention-centre 0193...
    Meeting {
        #[command(subcommand)]
        action: lawyers::MeetingAction,
    },
    /// A detention centre forwards a detainee's letter, sealed to the
    /// lawyer (CQ-1.1c).
    ///
    /// Example: refbus letter forward -a dz-detention-centre --lawyer 15001201910000001 --detainee 张三 --file letter.txt --key l-1
    Letter {
        #[command(subcommand)]
        action: lawyers::LetterAction,
    },
    /// Signing keys (Ed25519) of the agencies and the tracker.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Make a new random key for every agency of the directory and for the
    /// tracker, one `<signer>.key` file each (mode 0600, never overwritten),
    /// and print the `public_key` line to put in each directory entry.
    /// Services then run with REFBUS_SIGNING_KEYS=<out>.
    ///
    /// Example: refbus keys generate --out /etc/refbus/keys
    Generate {
        /// Where the key files go.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Only these signers (agency ids, or refbus-tracker).
        signers: Vec<String>,
        #[arg(
            long,
            env = "REFBUS_DIRECTORY",
            default_value = "deploy/local/directory.toml"
        )]
        directory: std::path::PathBuf,
    },
    /// Print the public keys of the development keys (derived from the ids,
    /// hence public: for `refbus up` and tests only), as the shipped
    /// directory lists them.
    Development {
        #[arg(
            long,
            env = "REFBUS_DIRECTORY",
            default_value = "deploy/local/directory.toml"
        )]
        directory: std::path::PathBuf,
    },
}

/// Which bus: its directory, namespace and virtual host.
#[derive(Debug, clap::Args)]
pub struct BusNames {
    #[arg(
        long,
        env = "REFBUS_DIRECTORY",
        default_value = "deploy/local/directory.toml"
    )]
    pub directory: std::path::PathBuf,
    #[arg(long, env = "REFBUS_NAMESPACE", default_value = "refbus")]
    pub namespace: String,
    #[arg(long, default_value = "/")]
    pub vhost: String,
}

const SEND_HELP: &str = r#"The file is a refbus.v1.Envelope in protobuf's JSON mapping, e.g.:
  {
    "recipient": "dz-duty-desk",
    "idempotency_key": "req-17",
    "clock_started_at": "2026-11-23T08:00:00Z",
    "legal_help_request": {
      "detention_centre": "dz-detention-centre",
      "detainee": {"name": "...", "id_number": "...", "custody_number": "DZ-1"},
      "matter": "..."
    }
  }
`sender` defaults to --agency. Prints the receipt (the message id, to follow with `refbus status`)."#;

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Load and validate the catalogue; exit 7 naming the file, line and problem.
    ///
    /// Example: refbus policy check deploy/policy
    Check {
        #[arg(default_value = "deploy/policy")]
        dir: std::path::PathBuf,
        #[arg(
            long,
            env = "REFBUS_DIRECTORY",
            default_value = "deploy/local/directory.toml"
        )]
        directory: std::path::PathBuf,
        #[arg(long, short = 'o', value_enum, default_value = "auto")]
        output: client::Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Walk the ledger's hash chain; exit 7 naming the first broken link.
    ///
    /// Example: DATABASE_URL=postgres://ledger@db/refbus refbus audit verify
    Verify {
        #[command(flatten)]
        tracker: Box<TrackerSettings>,
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
    /// The first of seven consecutive ports (detention-centre, case-unit,
    /// legal-aid, justice-bureau, bar-association, tracker, lawyer-service);
    /// 0 picks free ports.
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
    // The agency services check against the tracker's policy catalogue.
    args.bus.policy.clone_from(&args.tracker.policy);
    let mut shared = match Shared::connect(args.bus, shutdown.clone()).await {
        Ok(shared) => shared,
        Err(StartError::Bus(BusError::Connect { url, reason })) => {
            anyhow::bail!(broker_unreachable(&url, &reason))
        }
        Err(e) => return Err(e.into()),
    };
    let mut apps = Vec::new();
    // The lawyer service first: the others look lawyers up in its
    // register, at the address it is bound to (a free port too).
    let mut services = AgencyService::ALL.to_vec();
    services.sort_by_key(|s| *s != AgencyService::Lawyer);
    for service in services {
        // Each service at its usual offset from the first (the lawyer
        // service after the tracker's port).
        let port = if args.port_base == 0 {
            0
        } else {
            args.port_base
                + (service.default_port() - AgencyService::DetentionCentre.default_port())
        };
        let app =
            Application::build(service, &shared, SocketAddr::new(args.host, port), &[]).await?;
        if service == AgencyService::Lawyer
            && shared.settings.lawyer_service.url
                == refbus_gateway::settings::DEFAULT_LAWYER_SERVICE
        {
            shared.settings.lawyer_service.url =
                format!("{}://{}", shared.auth.scheme(), app.local_addr()?);
            // Under mutual TLS, one CA issues the services' certificates
            // and the callers' (deploy/dev-certs.sh): the register's too.
            if shared.settings.lawyer_service.ca.is_none() {
                shared
                    .settings
                    .lawyer_service
                    .ca
                    .clone_from(&shared.settings.auth.tls_client_ca);
            }
        }
        apps.push(app);
    }
    // Printed in the usual order.
    apps.sort_by_key(|app| {
        AgencyService::ALL
            .iter()
            .position(|s| *s == app.service())
            .unwrap_or(usize::MAX)
    });
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
        "  {:<17} http://{}/  (web dashboard; /metrics, /healthz)",
        "dashboard",
        tracker.http_addr()?
    );
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

pub use refbus_gateway::settings::broker_users;

/// A bash script of `rabbitmqctl` commands that creates [`broker_users`].
#[must_use]
pub fn broker_users_script(directory: &Directory, namespace: &str, vhost: &str) -> String {
    let exchange = Topology::new(namespace, Vec::new()).deliveries_exchange();
    let mut script = format!(
        r#"#!/usr/bin/env bash
# The RabbitMQ users of the refbus services, namespace `{namespace}`, vhost `{vhost}`
# (made by `refbus broker-users`; issue 5). Least privilege: a service reads
# only its own agencies' inbox queues, writes only to {namespace}.deliveries
# and {namespace}.dead-letter, with routing keys that name an agency of the
# directory or a hop report, and configures nothing: import the topology
# first (deploy/rabbitmq/definitions.json, `refbus topology`) and run the
# services with REFBUS_DECLARE_TOPOLOGY=false.
#
# Passwords: REFBUS_BROKER_PASSWORD_<USER> (e.g. REFBUS_BROKER_PASSWORD_LEGAL_AID),
# else generated and printed as `user password`.
set -euo pipefail
vhost='{vhost}'
exchange='{exchange}'
# user NAME PASSWORD-VARIABLE CONFIGURE WRITE READ TOPIC-WRITE
user() {{
  local name=$1 var=REFBUS_BROKER_PASSWORD_$2 password
  password=${{!var:-}}
  [ -n "$password" ] || password=$(openssl rand -hex 16)
  rabbitmqctl -q add_user "$name" "$password" >/dev/null 2>&1     || rabbitmqctl -q change_password "$name" "$password" >/dev/null
  rabbitmqctl -q set_permissions -p "$vhost" "$name" "$3" "$4" "$5" >/dev/null
  rabbitmqctl -q set_topic_permissions -p "$vhost" "$name" "$exchange" "$6" '^$' >/dev/null
  [ -n "${{!var:-}}" ] || echo "$name $password"
}}
"#
    );
    for (user, variable, p) in broker_users(directory, namespace) {
        script.push_str(&format!(
            "user '{user}' {variable} '{}' '{}' '{}' '{}'
",
            p.configure, p.write, p.read, p.topic_write
        ));
    }
    script
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
        Command::Serve { service, args } => refbus_gateway::cli::serve(service, *args),
        Command::Tracker { bus, tracker } => {
            telemetry::init("info");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(refbus_tracker::cli::run(*bus, *tracker))
        }
        Command::Topology(BusNames {
            directory,
            namespace,
            vhost,
        }) => {
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
        Command::BrokerUsers(BusNames {
            directory,
            namespace,
            vhost,
        }) => {
            let directory = Directory::load(directory)?;
            print!("{}", broker_users_script(&directory, &namespace, &vhost));
            Ok(())
        }
        Command::Keys { action } => keys(action),
        Command::DeadLetter { action } => client_command(dead_letter::run(action)),
        Command::Send(args) => client_command(client::send(args)),
        Command::Inbox(args) => client_command(client::inbox(args)),
        Command::Ack(args) => client_command(client::ack(args)),
        Command::Feedback(args) => client_command(client::feedback(args)),
        Command::Lawyer { action } => client_command(lawyers::lawyer(action)),
        Command::Meeting { action } => client_command(lawyers::meeting(action)),
        Command::Letter { action } => client_command(lawyers::letter(action)),
        Command::Status(args) => client_command(client::status(args)),
        Command::Overdue(args) => client_command(client::overdue(args)),
        Command::Report(args) => client_command(client::report(args)),
        Command::Policy {
            action:
                PolicyAction::Check {
                    dir,
                    directory,
                    output,
                },
        } => Ok(client::policy_check(&dir, &directory, output)?),
        Command::Audit {
            action: AuditAction::Verify { tracker },
        } => client_command(async move { client::audit_verify(&tracker).await }),
        Command::Directory {
            action: DirectoryAction::Check { path },
        } => {
            let directory = Directory::load(&path)
                .map_err(|e| client::Failure::new(client::ExitCode::CheckFailed, e.to_string()))?;
            println!(
                "{}: {} agencies, valid",
                path.display(),
                directory.agencies().len()
            );
            Ok(())
        }
    }
}

/// Runs a client command on a small runtime of its own.
fn client_command(
    command: impl std::future::Future<Output = Result<(), client::Failure>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(command)?)
}

/// The exit code for a command's error: a [`client::Failure`]'s own, else 1.
#[must_use]
pub fn exit_code(error: &anyhow::Error) -> i32 {
    error
        .downcast_ref::<client::Failure>()
        .map_or(1, |f| f.code as i32)
}

fn keys(action: KeysAction) -> anyhow::Result<()> {
    use refbus_core::signing::{self, TRACKER_ID};
    let (directory, signers, out) = match &action {
        KeysAction::Generate {
            out,
            signers,
            directory,
        } => (directory, signers.clone(), Some(out)),
        KeysAction::Development { directory } => (directory, Vec::new(), None),
    };
    let directory = Directory::load(directory)?;
    let signers = if signers.is_empty() {
        directory
            .agencies()
            .iter()
            .map(|a| a.id.clone())
            .chain([TRACKER_ID.to_owned()])
            .collect()
    } else {
        for signer in &signers {
            if signer != TRACKER_ID && directory.get(signer).is_none() {
                anyhow::bail!("`{signer}` is not an agency in the directory, nor {TRACKER_ID}");
            }
        }
        signers
    };
    let public = match out {
        Some(out) => signing::generate(out, &signers)?,
        None => signers
            .iter()
            .map(|s| {
                let key = signing::verifying_key(&signing::development_key(s));
                (s.clone(), signing::public_key_text(&key))
            })
            .collect(),
    };
    for (signer, key) in public {
        println!("{signer}\tpublic_key = \"{key}\"");
    }
    Ok(())
}
