//! refbus on AMQP (RabbitMQ, through lapin).
//!
//! # Layout
//! - [`topology`]: the exchanges, queues and bindings of the bus, declared
//!   idempotently at start-up and exported as RabbitMQ definitions.
//! - [`connection`]: [`Bus`], a connection that survives the broker going
//!   away: a supervisor reconnects with backoff, re-declares the topology
//!   and resumes every subscription; while it is down, publishing fails at
//!   once with [`BusError::Unavailable`].
//! - [`envelopes`]: signed envelopes published alone, or batched per route
//!   behind publishes waiting for their confirms.
//! - [`subscription`]: a consumer on one queue with manual acks and a bounded
//!   prefetch, resumed on every new connection or channel; batches come out
//!   one envelope at a time.
//! - [`dead_letter`]: the dead-letter queue for an operator: depth, listing
//!   (metadata only), replay to the queue a message came from.

#![forbid(unsafe_code)]

pub mod connection;
pub mod dead_letter;
pub mod envelopes;
pub mod metrics;
pub mod subscription;
pub mod topology;

pub use connection::{Bus, BusConfig, ConnectionWatch, Outgoing};
pub use dead_letter::{DeadLetter, DeadLetterError, Replayed};
pub use envelopes::EnvelopeOut;
pub use metrics::BusMetrics;
pub use subscription::{Acker, Incoming, Part, QUEUE_HEADER, REASON_HEADER, Subscription};
pub use topology::Topology;

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker cannot be reached now; nothing was published.
    #[error("the message broker is unavailable: {0}")]
    Unavailable(String),
    /// The broker could not route the message to any queue.
    #[error(
        "the broker could not route the message (exchange `{exchange}`, routing key `{routing_key}`)"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    /// The broker refused to take responsibility for the message.
    #[error("the broker refused the message (negative confirm)")]
    Nacked,
    /// Declaring the topology failed (e.g. a queue exists with other arguments).
    #[error("declaring {what} failed: {source}")]
    Topology { what: String, source: lapin::Error },
    /// The first connection could not be made.
    #[error("cannot reach RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
}

/// Hides the password of an AMQP URL for messages and logs.
#[must_use]
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
