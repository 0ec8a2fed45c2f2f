//! Hop reports, batched: the hops a process's agency services report
//! (delivered, acknowledged) are gathered per reporting agency and
//! published as one signed `refbus.v1.HopBatch` on
//! [`HOP_BATCH_KEY`] when the window closes (`REFBUS_HOP_BATCH_WINDOW`,
//! counted from the oldest hop waiting) or when an agency's batch is full
//! (`REFBUS_HOP_BATCH_SIZE`), instead of one publish and one confirm per hop.
//!
//! Each hop keeps its own id (`hop_report_id`, from referral, hop and
//! agency) and its own time, so the tracker records each hop once whether
//! it came alone, in a batch, or in a batch published again. A batch that
//! the broker does not confirm is retried with backoff while the process
//! runs; at shutdown what is still waiting is published once, best effort
//! (the agency's acknowledgement is recorded either way: a lost hop is an
//! obligation left open, never a delivery handed over twice).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use refbus_bus::topology::HOP_BATCH_KEY;
use refbus_bus::{Bus, Outgoing};
use refbus_core::envelope::hop_batch_id;
use refbus_core::signing::{SIGNATURE_HEADER, Signed, SigningKeys};
use refbus_proto::v1::{HopBatch, HopReport};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::settings::HopBatchSettings;

/// The hop batcher of a process, shared by its agency services: cheap to
/// clone, fed by [`HopBatcher::report`].
#[derive(Clone, Debug)]
pub struct HopBatcher {
    reports: mpsc::UnboundedSender<HopReport>,
}

impl HopBatcher {
    /// Starts gathering hops for `bus`, signing each batch with the key of
    /// the agency its hops name; stops, publishing what waits, on `shutdown`.
    #[must_use]
    pub fn start(
        bus: Bus,
        signing: Arc<SigningKeys>,
        settings: &HopBatchSettings,
        shutdown: CancellationToken,
    ) -> Self {
        let (reports, received) = mpsc::unbounded_channel();
        let publisher = Publisher {
            bus,
            signing,
            shutdown,
        };
        tokio::spawn(gather(
            received,
            publisher,
            settings.window,
            usize::from(settings.size.max(1)),
        ));
        Self { reports }
    }

    /// Queues a hop for the next batch of its agency (never waits).
    pub fn report(&self, report: HopReport) {
        if let Err(mpsc::error::SendError(report)) = self.reports.send(report) {
            tracing::warn!(referral = %report.referral_id, "shutting down before a hop report was published");
        }
    }
}

/// Gathers hops per agency and hands each batch to the publisher when its
/// window closes or it is full.
async fn gather(
    mut received: mpsc::UnboundedReceiver<HopReport>,
    publisher: Publisher,
    window: Duration,
    size: usize,
) {
    let mut waiting: HashMap<String, Vec<HopReport>> = HashMap::new();
    // When the oldest waiting hop's window closes.
    let mut closes: Option<Instant> = None;
    loop {
        let window_closed = async {
            match closes {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = publisher.shutdown.cancelled() => break,
            () = window_closed => {
                for (_, hops) in waiting.drain() {
                    publisher.spawn(hops);
                }
                closes = None;
            }
            report = received.recv() => {
                let Some(report) = report else { break };
                let hops = waiting.entry(report.agency.clone()).or_default();
                hops.push(report);
                if hops.len() >= size {
                    publisher.spawn(std::mem::take(hops));
                    waiting.retain(|_, hops| !hops.is_empty());
                }
                closes = if waiting.is_empty() {
                    None
                } else {
                    closes.or_else(|| Some(Instant::now() + window))
                };
            }
        }
    }
    // Shutdown: what was reported before it is published once, best effort.
    received.close();
    while let Ok(report) = received.try_recv() {
        waiting
            .entry(report.agency.clone())
            .or_default()
            .push(report);
    }
    let last = waiting
        .into_values()
        .flat_map(|hops| {
            let chunks: Vec<Vec<HopReport>> = hops.chunks(size).map(<[_]>::to_vec).collect();
            chunks
        })
        .map(|hops| publisher.publish(hops));
    futures_util::future::join_all(last).await;
}

/// Signs and publishes batches, each with the broker's confirm.
#[derive(Clone)]
struct Publisher {
    bus: Bus,
    signing: Arc<SigningKeys>,
    shutdown: CancellationToken,
}

impl Publisher {
    /// Publishes a batch in the background (batches confirm concurrently).
    fn spawn(&self, hops: Vec<HopReport>) {
        if hops.is_empty() {
            return;
        }
        let publisher = self.clone();
        tokio::spawn(async move { publisher.publish(hops).await });
    }

    /// Publishes one agency's batch, retried with backoff while the broker
    /// is away, given up only at shutdown.
    async fn publish(&self, hops: Vec<HopReport>) {
        let Some(agency) = hops.first().map(|h| h.agency.clone()) else {
            return;
        };
        let id = hop_batch_id(hops.iter().map(|h| h.id.as_str()));
        let count = hops.len();
        let body = HopBatch { hops }.encode_to_vec();
        let signature = match self.signing.sign(&agency, Signed::HopBatch, &body) {
            Ok(signature) => signature,
            Err(e) => {
                tracing::error!(error = %e, hops = count, "hop batch not signed; not published");
                return;
            }
        };
        let exchange = self.bus.topology().deliveries_exchange();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut message = Outgoing::new(&exchange, HOP_BATCH_KEY, &body);
            message.message_id = Some(&id);
            message.kind = Some("hop_batch");
            message.content_type = "application/x-protobuf; proto=refbus.v1.HopBatch";
            message.headers = vec![(SIGNATURE_HEADER, signature.clone())];
            match self.bus.publish(message).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(error = %e, hops = count, "hop batch not published yet; retrying");
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    tracing::warn!(hops = count, "shutting down before a hop batch was published");
                    return;
                }
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
