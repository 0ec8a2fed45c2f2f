//! `tracker`: the refbus tracker as its own service (`tracker run`), and
//! the audit of its ledger (`tracker verify`). See `tracker --help`.

use clap::{Parser, Subcommand};
use refbus_gateway::app::{Shared, shutdown_on_signal};
use refbus_gateway::{BusSettings, telemetry};
use refbus_tracker::{Clock, Tracker, TrackerSettings};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "The refbus tracker: ledger, deadlines, overdue notices, compliance reports."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Consume the bus's tap, keep the ledger, run the deadline engine, serve queries.
    Run {
        #[command(flatten)]
        bus: BusSettings,
        #[command(flatten)]
        tracker: TrackerSettings,
    },
    /// Walk the ledger's hash chain; exit 1 naming the first broken link.
    Verify {
        #[command(flatten)]
        tracker: TrackerSettings,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init("info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { bus, tracker } => {
                // Bad configuration stops start-up before anything is declared on the broker.
                let directory = refbus_core::Directory::load(&bus.directory)?;
                refbus_core::policy::PolicyCatalogue::load(&tracker.policy, &directory)?;
                let shutdown = CancellationToken::new();
                let shared = Shared::connect(bus, shutdown.clone()).await?;
                let built = Tracker::build(&tracker, &shared, Clock::System).await?;
                println!(
                    "tracker serving on {}://{}",
                    shared.auth.scheme(),
                    built.local_addr()?
                );
                tokio::spawn(shutdown_on_signal(shutdown));
                built.run().await?;
                shared.bus.close().await;
                Ok(())
            }
            Command::Verify { tracker } => {
                let ledger = refbus_tracker::ledger::Ledger::connect(
                    &tracker.database()?,
                    tracker.database_schema.as_deref(),
                )
                .await?;
                let verdict = refbus_tracker::audit::verify(&ledger).await?;
                println!("{verdict}");
                if matches!(verdict, refbus_tracker::audit::Verdict::Broken { .. }) {
                    std::process::exit(1);
                }
                Ok(())
            }
        }
    })
}
