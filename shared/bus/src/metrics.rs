//! What the bus counts, for the Prometheus metrics every service exposes:
//! messages published and confirmed, by AMQP `type` (the message kind, or
//! `hop_report`), and deliveries dead-lettered, by the queue's role.
//! Labels are kinds and roles only: nothing of a message's content.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The label of a published message: its AMQP `type`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// The label of a dead-lettered delivery: the queue it came from, by role
/// (`inbox`, `tap`), never the agency's queue name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

/// The bus's counters. Cheap to clone (shared handles).
#[derive(Clone, Debug, Default)]
pub struct BusMetrics {
    /// Publishes attempted.
    pub published: Family<KindLabel, Counter>,
    /// Publishes the broker confirmed (routed to at least one queue).
    pub confirmed: Family<KindLabel, Counter>,
    /// Publishes that failed: unavailable, unroutable or nacked.
    pub publish_failed: Family<KindLabel, Counter>,
    /// `envelope_batch` messages confirmed, and the envelopes they carried
    /// (also counted, by kind, in `published` and `confirmed`).
    pub envelope_batches: Counter,
    pub batched_envelopes: Counter,
    /// Deliveries moved to the dead-letter queue with a reason.
    pub dead_lettered: Family<QueueLabel, Counter>,
    /// Consumers whose channel was lost (the broker closed it, or the
    /// connection failed) and that consumed again on a new channel.
    pub consumer_interrupted: Family<QueueLabel, Counter>,
    /// Messages waiting in the dead-letter queue, read from the broker
    /// every few seconds: what an operator must look at
    /// (`refbus dead-letter list`, `refbus dead-letter replay`).
    pub dead_letter_depth: Gauge,
}

impl BusMetrics {
    /// Registers the counters (as `refbus_bus_*`).
    pub fn register(&self, registry: &mut Registry) {
        let bus = registry.sub_registry_with_prefix("refbus_bus");
        bus.register(
            "published",
            "Messages published to the broker (attempts), by kind",
            self.published.clone(),
        );
        bus.register(
            "confirmed",
            "Messages the broker confirmed, by kind",
            self.confirmed.clone(),
        );
        bus.register(
            "envelope_batches",
            "Batches of envelopes (refbus.v1.EnvelopeBatch) the broker confirmed",
            self.envelope_batches.clone(),
        );
        bus.register(
            "batched_envelopes",
            "Envelopes that went out inside a confirmed batch",
            self.batched_envelopes.clone(),
        );
        bus.register(
            "publish_failed",
            "Publishes not confirmed (broker away, unroutable, nacked), by kind",
            self.publish_failed.clone(),
        );
        bus.register(
            "dead_lettered",
            "Deliveries moved to the dead-letter queue, by queue role (inbox, tap)",
            self.dead_lettered.clone(),
        );
        bus.register(
            "consumer_interrupted",
            "Consumer channels lost (closed by the broker, or the connection failed) and reopened, by queue role",
            self.consumer_interrupted.clone(),
        );
        bus.register(
            "dead_letter_depth",
            "Messages waiting in the dead-letter queue (refbus dead-letter list)",
            self.dead_letter_depth.clone(),
        );
    }

    pub(crate) fn kind(kind: Option<&str>) -> KindLabel {
        KindLabel {
            kind: kind.unwrap_or("other").to_owned(),
        }
    }

    /// The role of a queue of `namespace`: `tap`, `inbox` or `other`.
    pub(crate) fn queue_role(namespace: &str, queue: &str) -> QueueLabel {
        let rest = queue
            .strip_prefix(namespace)
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or(queue);
        let role = if rest == "tap" {
            "tap"
        } else if rest.starts_with("inbox.") {
            "inbox"
        } else {
            "other"
        };
        QueueLabel {
            queue: role.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_roles_name_no_agency() {
        assert_eq!(BusMetrics::queue_role("refbus", "refbus.tap").queue, "tap");
        assert_eq!(
            BusMetrics::queue_role("refbus", "refbus.inbox.dz-duty-desk").queue,
            "inbox"
        );
        assert_eq!(BusMetrics::queue_role("refbus", "elsewhere").queue, "other");
    }
}
