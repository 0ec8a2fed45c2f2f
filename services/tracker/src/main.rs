//! `tracker`: the refbus tracker as its own service (`tracker run`), and
//! the audit of its ledger (`tracker verify`). See `tracker --help`.

use clap::{Parser, Subcommand};
use refbus_gateway::{BusSettings, telemetry};
use refbus_tracker::TrackerSettings;

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
            Command::Run { bus, tracker } => refbus_tracker::cli::run(bus, tracker).await,
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
