//! The tracker as a service of its own: what `tracker run` and
//! `refbus tracker` both run.

use refbus_gateway::BusSettings;
use refbus_gateway::app::{Shared, shutdown_on_signal};
use tokio_util::sync::CancellationToken;

use crate::{Clock, Tracker, TrackerSettings};

/// Validates the configuration, connects, and records, scans and serves
/// until SIGINT or SIGTERM.
///
/// # Errors
/// A start-up error naming the file, the database or the port.
pub async fn run(bus: BusSettings, tracker: TrackerSettings) -> anyhow::Result<()> {
    // Bad configuration stops start-up before anything is declared on the broker.
    let directory = refbus_core::Directory::load(&bus.directory)?;
    refbus_core::policy::PolicyCatalogue::load(&tracker.policy, &directory)?;
    let shutdown = CancellationToken::new();
    let shared = Shared::connect(bus, shutdown.clone()).await?;
    let built = Tracker::build(&tracker, &shared, Clock::System).await?;
    println!(
        "tracker serving on {}://{} (dashboard and metrics: http://{}/)",
        shared.auth.scheme(),
        built.local_addr()?,
        built.http_addr()?
    );
    tokio::spawn(shutdown_on_signal(shutdown));
    built.run().await?;
    shared.bus.close().await;
    Ok(())
}
