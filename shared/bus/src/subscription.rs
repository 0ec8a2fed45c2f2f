//! [`Subscription`]: a consumer on one queue that outlives broker outages.
//!
//! A task opens a channel on the live connection, sets the prefetch, and
//! forwards deliveries. When the connection fails, or the broker closes the
//! channel alone (a consumer timeout, a channel error), it waits for the
//! next connection and consumes again; the broker redelivers what was
//! unacknowledged. When the subscription is dropped or the bus shuts down,
//! the channel is closed, so unacknowledged deliveries return to the queue
//! at once.
//!
//! Delivery tags restart at 1 on every channel, so a tag alone does not
//! name a delivery: each channel the process opens gets a process-wide
//! [`Incoming::channel`] number, and a delivery is (channel, tag).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::connection::State;
use crate::{Bus, BusMetrics, Outgoing};

/// The AMQP header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-refbus-reason";
/// The AMQP header naming the queue a dead-lettered message came from.
pub const QUEUE_HEADER: &str = "x-refbus-queue";

/// One delivery from a subscribed queue. Acknowledge it with `acker` once
/// it is safely handed on; an acker from an earlier connection fails, and
/// the broker redelivers that message instead.
#[derive(Debug)]
pub struct Incoming {
    pub data: Vec<u8>,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub redelivered: bool,
    pub delivery_tag: u64,
    /// The connection generation the delivery came on.
    pub generation: u64,
    /// The channel it came on: unique in this process, never reused, so
    /// that (channel, delivery tag) names one delivery even after the
    /// broker closed a channel and the subscription opened another.
    pub channel: u64,
    pub acker: Acker,
}

/// Numbers every consumer channel this process opens.
static CHANNELS: AtomicU64 = AtomicU64::new(0);

/// Returns a delivery to its queue (a nack with requeue), to come again.
/// A failure is ignored: the channel is gone, and with it the delivery
/// went back to the queue anyway.
pub async fn return_to_queue(acker: &Acker) {
    let _ = acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}

impl Incoming {
    /// The text of an AMQP header, if the message carries it as a string.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<String> {
        header_text(&self.properties, name)
    }
}

/// The text of an AMQP header of `properties`, if it is a string.
#[must_use]
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Every header of `properties` whose value is a string, as text.
#[must_use]
pub fn string_headers(properties: &BasicProperties) -> Vec<(String, String)> {
    use lapin::types::AMQPValue;
    properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(key, value)| match value {
                    AMQPValue::LongString(s) => Some((
                        key.as_str().to_owned(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    )),
                    AMQPValue::ShortString(s) => {
                        Some((key.as_str().to_owned(), s.as_str().to_owned()))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A live consumer on one queue; dropping it closes its channel.
pub struct Subscription {
    deliveries: mpsc::Receiver<Incoming>,
    _stop: DropGuard,
}

impl Subscription {
    /// The next delivery; `None` once the bus shut down.
    pub async fn next(&mut self) -> Option<Incoming> {
        self.deliveries.recv().await
    }

    /// A delivery already waiting, if any (for batching).
    pub fn try_next(&mut self) -> Option<Incoming> {
        self.deliveries.try_recv().ok()
    }
}

impl Bus {
    /// Consumes `queue` with manual acks and at most `prefetch` unacknowledged
    /// deliveries, resuming after every reconnection.
    #[must_use]
    pub fn subscribe(&self, queue: String, prefetch: u16) -> Subscription {
        self.subscribe_with_buffer(queue, prefetch, usize::from(prefetch.max(1)))
    }

    /// As [`Bus::subscribe`], with at most `buffer` deliveries waiting
    /// between the consumer and [`Subscription::next`] (the rest wait in
    /// the channel, unacknowledged, within the prefetch).
    #[must_use]
    pub fn subscribe_with_buffer(
        &self,
        queue: String,
        prefetch: u16,
        buffer: usize,
    ) -> Subscription {
        let stop = self.shutdown_token().child_token();
        let (tx, rx) = mpsc::channel(buffer.max(1));
        tokio::spawn(consume(self.clone(), queue, prefetch, tx, stop.clone()));
        Subscription {
            deliveries: rx,
            _stop: stop.drop_guard(),
        }
    }
}

impl Bus {
    /// Moves a delivery that cannot be handled to the dead-letter exchange
    /// with the reason in a header, then acks it. If that publish fails, it
    /// rejects the delivery so that the broker dead-letters it
    /// (at-least-once) instead: either way nothing is lost and nothing loops.
    pub async fn dead_letter(&self, queue: &str, incoming: Incoming, reason: String) {
        use lapin::options::{BasicAckOptions, BasicRejectOptions};
        let exchange = self.topology().dead_letter();
        // The message's own headers (its signature, above all) go with it,
        // so that a replay is verified like the original.
        let kept: Vec<(String, String)> = string_headers(&incoming.properties)
            .into_iter()
            .filter(|(key, _)| key != REASON_HEADER && key != QUEUE_HEADER)
            .collect();
        let mut message = Outgoing::new(&exchange, queue, &incoming.data);
        message.content_type = incoming
            .properties
            .content_type()
            .as_ref()
            .map_or("application/octet-stream", |s| s.as_str());
        message.message_id = incoming
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str());
        message.kind = incoming.properties.kind().as_ref().map(|s| s.as_str());
        message.headers = kept.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        message.headers.push((REASON_HEADER, reason.clone()));
        message.headers.push((QUEUE_HEADER, queue.to_owned()));
        match self.publish(message).await {
            Ok(()) => {
                self.metrics()
                    .dead_lettered
                    .get_or_create(&BusMetrics::queue_role(&self.topology().namespace, queue))
                    .inc();
                tracing::warn!(%queue, %reason, bytes = incoming.data.len(), "dead-lettered a delivery that cannot be handled");
                if let Err(e) = incoming.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(%queue, error = %e, "ack after dead-lettering failed; the broker will redeliver it");
                }
            }
            Err(e) => {
                tracing::warn!(%queue, error = %e, "cannot dead-letter with a reason; rejecting to the broker's dead-letter exchange");
                let _ = incoming
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await;
            }
        }
    }
}

async fn consume(
    bus: Bus,
    queue: String,
    prefetch: u16,
    tx: mpsc::Sender<Incoming>,
    stop: CancellationToken,
) {
    let mut state = bus.watch_state();
    let mut retry = Duration::from_millis(100);
    loop {
        // Wait for a live connection.
        let up = tokio::select! {
            () = stop.cancelled() => return,
            () = tx.closed() => return,
            up = state.wait_for(|s| !matches!(s, State::Down { .. })) => up.map(|s| matches!(*s, State::Up(_))),
        };
        if !matches!(up, Ok(true)) {
            return; // closed
        }
        match open(&bus, &queue, prefetch).await {
            Ok((generation, channel, mut consumer)) => {
                retry = Duration::from_millis(100);
                let number = CHANNELS.fetch_add(1, Ordering::Relaxed) + 1;
                let ended = forward(generation, number, &mut consumer, &tx, &stop).await;
                // Cancel the consumer and wait for the broker's cancel-ok
                // before closing the channel. Dropped instead, lapin cancels
                // it from a task of its own, whose `basic.cancel` could reach
                // the broker after the `channel.close`: a frame on a channel
                // the broker has closed is a connection error ("expected
                // 'channel.open'"), which would take every other channel of
                // the connection with it (seen once in CI, after an `Inbox`
                // stream was killed).
                if channel.status().connected() {
                    let cancel =
                        channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
                    let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
                }
                drop(consumer);
                let _ = channel.close(200, "subscription ended".into()).await;
                if ended {
                    return;
                }
                bus.metrics()
                    .consumer_interrupted
                    .get_or_create(&BusMetrics::queue_role(&bus.topology().namespace, &queue))
                    .inc();
                tracing::info!(%queue, generation, channel = number, "consumer channel lost; consuming again on a new channel");
            }
            Err(e) => {
                tracing::debug!(%queue, error = %e, "cannot consume yet");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(2));
    }
}

async fn open(
    bus: &Bus,
    queue: &str,
    prefetch: u16,
) -> Result<(u64, Channel, lapin::Consumer), String> {
    let (generation, channel) = bus.channel().await.map_err(|e| e.to_string())?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((generation, channel, consumer))
}

/// Forwards deliveries until the consumer fails (returns false) or the
/// subscription ends (returns true).
async fn forward(
    generation: u64,
    channel: u64,
    consumer: &mut lapin::Consumer,
    tx: &mpsc::Sender<Incoming>,
    stop: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            () = stop.cancelled() => return true,
            () = tx.closed() => return true,
            next = consumer.next() => match next {
                Some(Ok(d)) => {
                    let incoming = Incoming {
                        data: d.data,
                        routing_key: d.routing_key.to_string(),
                        properties: d.properties,
                        redelivered: d.redelivered,
                        delivery_tag: d.delivery_tag,
                        generation,
                        channel,
                        acker: d.acker,
                    };
                    if tx.send(incoming).await.is_err() {
                        return true;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "consumer error");
                    return false;
                }
                None => return false,
            }
        }
    }
}
