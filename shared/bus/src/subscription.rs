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
//!
//! An `envelope_batch` message (`refbus.v1.EnvelopeBatch`, issue 17) comes
//! out as one [`Incoming`] per envelope, each with the envelope's own bytes
//! and its proof ([`Incoming::proof`]: its own signature, or its entry in
//! the batch's digest list signed once), as if it had been published alone;
//! they share the AMQP
//! delivery through their [`Acker`]s, which ack it once every envelope is
//! acked and return it whole when any one goes back. A batch that does not
//! decode, is empty or holds more than [`MAX_BATCH_ENVELOPES`] is
//! dead-lettered whole, with the reason, before anyone sees it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use prost::Message;
use refbus_core::signing::{
    DIGEST_INDEX_HEADER, DIGEST_LEN, DIGESTS_HEADER, DIGESTS_SIGNATURE_HEADER, Proof,
    SIGNATURE_HEADER, SignedDigests,
};
use refbus_proto::v1::EnvelopeBatch;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::connection::State;
use crate::{Bus, BusMetrics, Outgoing};

/// The AMQP header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-refbus-reason";
/// The AMQP header naming the queue a dead-lettered message came from.
pub const QUEUE_HEADER: &str = "x-refbus-queue";

/// The AMQP `type` of a [`EnvelopeBatch`] message.
pub const ENVELOPE_BATCH_TYPE: &str = "envelope_batch";
/// The content type of a [`EnvelopeBatch`] message.
pub const ENVELOPE_BATCH_CONTENT_TYPE: &str =
    "application/x-protobuf; proto=refbus.v1.EnvelopeBatch";
/// The content type of an envelope alone.
pub const ENVELOPE_CONTENT_TYPE: &str = "application/x-protobuf; proto=refbus.v1.Envelope";
/// The most envelopes a consumer takes from one batch message; a larger
/// batch is dead-lettered whole (what one delivery may unpack into memory).
pub const MAX_BATCH_ENVELOPES: usize = 1000;

/// Settles one delivery with the broker: a message alone, or one envelope
/// of an `envelope_batch` message. A batch's AMQP delivery is acked once
/// every one of its envelopes is, and goes back to the queue whole as soon
/// as one of them does (lapin's acker is spent by the first settlement, so
/// later ones change nothing). An acker from an earlier connection does
/// nothing, and the broker redelivers that message instead.
#[derive(Debug)]
pub struct Acker {
    delivery: lapin::Acker,
    /// For an envelope of a batch: the envelopes of its delivery not yet acked.
    unacked: Option<Arc<AtomicUsize>>,
}

impl Acker {
    pub(crate) fn whole(delivery: lapin::Acker) -> Self {
        Self {
            delivery,
            unacked: None,
        }
    }

    fn parts(delivery: &lapin::Acker, count: usize) -> impl Iterator<Item = Self> + '_ {
        let unacked = Arc::new(AtomicUsize::new(count));
        (0..count).map(move |_| Self {
            delivery: delivery.clone(),
            unacked: Some(unacked.clone()),
        })
    }

    /// Whether this settles a whole AMQP delivery (not one envelope of a
    /// batch): only such an acker may ack with `multiple`.
    #[must_use]
    pub fn is_whole(&self) -> bool {
        self.unacked.is_none()
    }

    /// Acks the delivery; for an envelope of a batch, counts it, and acks
    /// the batch's delivery with the last.
    ///
    /// # Errors
    /// When the broker ack cannot be sent (the channel is gone: the broker
    /// redelivers).
    pub async fn ack(self) -> Result<(), lapin::Error> {
        if let Some(unacked) = &self.unacked
            && unacked.fetch_sub(1, Ordering::AcqRel) != 1
        {
            return Ok(());
        }
        self.delivery
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
    }

    /// Acks this delivery and every earlier one of its channel, in one
    /// frame; for an envelope of a batch, as [`Acker::ack`] (a part never
    /// acks what it does not hold).
    ///
    /// # Errors
    /// As [`Acker::ack`].
    pub async fn ack_through(self) -> Result<(), lapin::Error> {
        if self.unacked.is_some() {
            return self.ack().await;
        }
        self.delivery
            .ack(BasicAckOptions { multiple: true })
            .await
            .map(|_| ())
    }

    /// Returns the delivery to its queue (a nack with requeue), to come
    /// again; for an envelope of a batch, the whole batch.
    ///
    /// # Errors
    /// When the nack cannot be sent (the channel is gone, and with it the
    /// delivery went back to the queue anyway).
    pub async fn requeue(self) -> Result<(), lapin::Error> {
        self.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .map(|_| ())
    }

    /// Hands the delivery to the broker's dead-lettering (a reject without
    /// requeue). An envelope of a batch goes back to the queue instead: the
    /// other envelopes of its batch must not be dead-lettered with it.
    ///
    /// # Errors
    /// As [`Acker::requeue`].
    pub async fn reject(self) -> Result<(), lapin::Error> {
        if self.unacked.is_some() {
            return self.requeue().await;
        }
        self.delivery
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(|_| ())
    }
}

/// Which envelope of a batch message an [`Incoming`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// From 0.
    pub index: usize,
    /// How many the batch holds.
    pub of: usize,
}

/// One delivery from a subscribed queue: a message, or one envelope of a
/// batch message (see the module's doc). Acknowledge it with `acker` once
/// it is safely handed on.
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
    /// Set for one envelope of a batch message (which shares its delivery
    /// tag with the batch's other envelopes).
    pub part: Option<Part>,
    /// For an envelope of a batch signed once that has no signature of its
    /// own: the batch's digest list (shared by its envelopes) and its entry.
    pub listed: Option<(Arc<SignedDigests>, usize)>,
    pub acker: Acker,
}

/// Numbers every consumer channel this process opens.
static CHANNELS: AtomicU64 = AtomicU64::new(0);

/// Returns a delivery to its queue (a nack with requeue), to come again.
/// A failure is ignored: the channel is gone, and with it the delivery
/// went back to the queue anyway.
pub async fn return_to_queue(acker: Acker) {
    let _ = acker.requeue().await;
}

impl Incoming {
    /// The text of an AMQP header, if the message carries it as a string.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<String> {
        header_text(&self.properties, name)
    }

    /// What the message's signature claim is checked with: its entry in
    /// its batch's digest list, or what its headers carry (its own
    /// signature; the three headers of a dead-lettered envelope of a batch
    /// signed once, replayed alone; or nothing).
    #[must_use]
    pub fn proof(&self) -> Proof {
        if let Some((list, index)) = &self.listed {
            return Proof::Listed {
                list: list.clone(),
                index: *index,
            };
        }
        Proof::from_headers(
            self.header(SIGNATURE_HEADER),
            self.header(DIGESTS_SIGNATURE_HEADER),
            self.header(DIGESTS_HEADER),
            self.header(DIGEST_INDEX_HEADER),
        )
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
        // An envelope of a batch signed once keeps its entry in the list.
        if incoming.listed.is_some() {
            message.headers.extend(incoming.proof().list_headers());
        }
        message.headers.push((REASON_HEADER, reason.clone()));
        message.headers.push((QUEUE_HEADER, queue.to_owned()));
        match self.publish(message).await {
            Ok(()) => {
                self.metrics()
                    .dead_lettered
                    .get_or_create(&BusMetrics::queue_role(&self.topology().namespace, queue))
                    .inc();
                tracing::warn!(%queue, %reason, bytes = incoming.data.len(), "dead-lettered a delivery that cannot be handled");
                if let Err(e) = incoming.acker.ack().await {
                    tracing::warn!(%queue, error = %e, "ack after dead-lettering failed; the broker will redeliver it");
                }
            }
            Err(e) => {
                // An envelope of a batch goes back to the queue with its
                // batch instead (see [`Acker::reject`]), to be refused again.
                tracing::warn!(%queue, error = %e, "cannot dead-letter with a reason; rejecting to the broker's dead-letter exchange");
                let _ = incoming.acker.reject().await;
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
                let ended =
                    forward(&bus, &queue, generation, number, &mut consumer, &tx, &stop).await;
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
/// subscription ends (returns true). A batch message is forwarded one
/// envelope at a time, or dead-lettered whole when it cannot be unpacked.
async fn forward(
    bus: &Bus,
    queue: &str,
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
                    let is_batch = d
                        .properties
                        .kind()
                        .as_ref()
                        .is_some_and(|kind| kind.as_str() == ENVELOPE_BATCH_TYPE);
                    let incoming = Incoming {
                        data: d.data,
                        routing_key: d.routing_key.to_string(),
                        properties: d.properties,
                        redelivered: d.redelivered,
                        delivery_tag: d.delivery_tag,
                        generation,
                        channel,
                        part: None,
                        listed: None,
                        acker: Acker::whole(d.acker),
                    };
                    if !is_batch {
                        if tx.send(incoming).await.is_err() {
                            return true;
                        }
                        continue;
                    }
                    // The envelopes share the batch's delivery through
                    // their ackers; the batch's own acker is not used.
                    match unpack(&incoming) {
                        Ok(parts) => {
                            for part in parts {
                                if tx.send(part).await.is_err() {
                                    return true;
                                }
                            }
                        }
                        Err(reason) => bus.dead_letter(queue, incoming, reason).await,
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

/// The envelopes of a batch message, each an [`Incoming`] as if it had come
/// alone: its bytes, its signature header, its id and kind as labels, the
/// batch's routing key and delivery; or why it cannot be unpacked.
fn unpack(batch: &Incoming) -> Result<Vec<Incoming>, String> {
    let decoded = EnvelopeBatch::decode(batch.data.as_slice())
        .map_err(|e| format!("not a refbus.v1.EnvelopeBatch: {e}"))?;
    let count = decoded.envelopes.len();
    if count == 0 {
        return Err("an envelope batch with no envelope".into());
    }
    if count > MAX_BATCH_ENVELOPES {
        return Err(format!(
            "an envelope batch of {count} envelopes, over the limit of {MAX_BATCH_ENVELOPES}"
        ));
    }
    // A label longer than an AMQP short string is dropped, not believed anyway.
    let label =
        |text: &str| (!text.is_empty() && text.len() <= 255).then(|| ShortString::from(text));
    // Signed once: the list of the envelopes' digests, shared by them all
    // (each is checked against its entry when it is believed).
    let list = if decoded.digests_signature.is_empty() {
        None
    } else {
        let entries = decoded.digests.len() / DIGEST_LEN;
        if decoded.digests.len() % DIGEST_LEN != 0 || entries != count {
            return Err(format!(
                "an envelope batch signed once whose digest list holds {} bytes, not {DIGEST_LEN} for each of its {count} envelopes",
                decoded.digests.len()
            ));
        }
        Some(Arc::new(SignedDigests {
            signature: decoded.digests_signature,
            digests: decoded.digests,
        }))
    };
    let ackers = Acker::parts(&batch.acker.delivery, count);
    Ok(decoded
        .envelopes
        .into_iter()
        .zip(ackers)
        .enumerate()
        .map(|(index, (envelope, acker))| {
            let mut headers = FieldTable::default();
            if !envelope.signature.is_empty() {
                headers.insert(
                    ShortString::from(SIGNATURE_HEADER),
                    AMQPValue::LongString(LongString::from(envelope.signature.as_str())),
                );
            }
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ENVELOPE_CONTENT_TYPE.into())
                .with_headers(headers);
            if let Some(id) = label(&envelope.id) {
                properties = properties.with_message_id(id);
            }
            if let Some(kind) = label(&envelope.kind) {
                properties = properties.with_type(kind);
            }
            Incoming {
                data: envelope.envelope,
                routing_key: batch.routing_key.clone(),
                properties,
                redelivered: batch.redelivered,
                delivery_tag: batch.delivery_tag,
                generation: batch.generation,
                channel: batch.channel,
                part: Some(Part { index, of: count }),
                listed: if envelope.signature.is_empty() {
                    list.clone().map(|list| (list, index))
                } else {
                    None
                },
                acker,
            }
        })
        .collect())
}
