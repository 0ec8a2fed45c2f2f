//! The dead-letter queue as an operator sees it (issue 16): its depth as a
//! metric, what is in it (metadata only: never a message's content, which
//! may hold personal data), and replay of chosen messages to the queue each
//! came from, once whatever refused them is fixed.
//!
//! A message is dead-lettered by a consumer with the reason in
//! [`REASON_HEADER`] and its queue in [`QUEUE_HEADER`] (see
//! [`Bus::dead_letter`]), or by the broker itself, which records both in
//! `x-death`. Listing takes messages with `basic.get` and returns them all
//! (`nack` with requeue; the dead-letter queue has no delivery limit), so it
//! changes nothing. Replay publishes a copy, confirmed, with the message's
//! own properties (its signature headers included: its own signature, or its
//! entry in a batch's digest list signed once, so that the consumer
//! verifies it again), and only then acks the dead letter: a replay that
//! fails half-way leaves the message where it was.

use std::time::Duration;

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use crate::subscription::{Acker, header_text, return_to_queue, string_headers};
use crate::{Bus, BusError, Outgoing, QUEUE_HEADER, REASON_HEADER};

/// One message in the dead-letter queue, as listed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// Its position in this listing (1 = the oldest).
    pub position: usize,
    /// AMQP `message-id` (an envelope or hop-report id), if it had one.
    pub message_id: Option<String>,
    /// AMQP `type`: the message kind, or `hop_report`.
    pub kind: Option<String>,
    /// The queue it was dead-lettered from.
    pub queue: Option<String>,
    /// Why.
    pub reason: String,
    /// Its size in bytes.
    pub bytes: usize,
    /// Times it was listed or replayed and came back before.
    pub redelivered: bool,
}

/// What one replay did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Replayed {
    pub message_id: Option<String>,
    /// The queue it went back to.
    pub queue: String,
}

/// Why a dead letter cannot be replayed or listed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("the dead-letter queue `{queue}`: {source}")]
    Amqp { queue: String, source: lapin::Error },
    /// The message names no queue to go back to.
    #[error("dead letter {position} ({id}) names no queue it came from; it stays")]
    NoOrigin { position: usize, id: String },
}

fn describe(position: usize, message: &BasicGetMessage) -> DeadLetter {
    let properties = &message.delivery.properties;
    let death = first_death(properties);
    DeadLetter {
        position,
        message_id: properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        kind: properties.kind().as_ref().map(|s| s.as_str().to_owned()),
        queue: header_text(properties, QUEUE_HEADER)
            .or_else(|| death.as_ref().map(|d| d.0.clone())),
        reason: header_text(properties, REASON_HEADER)
            .or_else(|| death.map(|d| format!("dead-lettered by the broker: {}", d.1)))
            .unwrap_or_else(|| "(no reason recorded)".to_owned()),
        bytes: message.delivery.data.len(),
        redelivered: message.delivery.redelivered,
    }
}

/// (queue, reason) of the broker's first `x-death` entry.
fn first_death(properties: &BasicProperties) -> Option<(String, String)> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |key: &str| match first.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some((text("queue")?, text("reason").unwrap_or_default()))
}

impl Bus {
    /// Messages waiting in the dead-letter queue.
    ///
    /// # Errors
    /// When the broker cannot be asked.
    pub async fn dead_letter_depth(&self) -> Result<u32, BusError> {
        let (_, channel) = self.channel().await?;
        let depth = passive_depth(&channel, &self.topology().dead_letter()).await;
        let _ = channel.close(200, "depth read".into()).await;
        depth
    }

    /// Keeps [`crate::BusMetrics::dead_letter_depth`] current, reading the
    /// depth every `every` until the bus shuts down.
    pub fn watch_dead_letter_depth(&self, every: Duration) {
        let bus = self.clone();
        tokio::spawn(async move {
            let stop = bus.shutdown_token().clone();
            loop {
                match bus.dead_letter_depth().await {
                    Ok(depth) => {
                        bus.metrics().dead_letter_depth.set(i64::from(depth));
                    }
                    Err(e) => tracing::debug!(error = %e, "dead-letter depth not read"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// Lists up to `limit` dead letters, oldest first, and leaves them all
    /// where they are.
    ///
    /// # Errors
    /// When the broker cannot be reached or the queue does not exist.
    pub async fn list_dead_letters(
        &self,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let (_, channel) = self.channel().await?;
        let queue = self.topology().dead_letter();
        let taken = take(&channel, &queue, limit).await?;
        let listed = taken
            .iter()
            .enumerate()
            .map(|(i, m)| describe(i + 1, m))
            .collect();
        give_back(&channel, taken).await;
        let _ = channel.close(200, "listed".into()).await;
        Ok(listed)
    }

    /// Replays the dead letters `choose` picks (among the first `limit`) to
    /// the queues they came from: each is published again, confirmed, with
    /// its own properties and headers (not the dead-letter ones), and only
    /// then removed from the dead-letter queue. The others stay.
    ///
    /// # Errors
    /// The first that could not be replayed; those replayed before it stay
    /// replayed, the rest stay dead letters.
    pub async fn replay_dead_letters(
        &self,
        limit: usize,
        choose: impl Fn(&DeadLetter) -> bool,
    ) -> Result<Vec<Replayed>, DeadLetterError> {
        let (_, channel) = self.channel().await?;
        let queue = self.topology().dead_letter();
        let taken = take(&channel, &queue, limit).await?;
        let mut replayed = Vec::new();
        let mut kept = Vec::new();
        let mut failure = None;
        for (i, message) in taken.into_iter().enumerate() {
            let letter = describe(i + 1, &message);
            if failure.is_some() || !choose(&letter) {
                kept.push(message);
                continue;
            }
            match self.replay_one(&letter, &message).await {
                Ok(done) => {
                    if let Err(e) = message.delivery.acker.ack(BasicAckOptions::default()).await {
                        // Replayed but still a dead letter: a second replay
                        // is a duplicate, which the consumers drop by id.
                        tracing::warn!(error = %e, "replayed dead letter not removed");
                    }
                    replayed.push(done);
                }
                Err(e) => {
                    failure = Some(e);
                    kept.push(message);
                }
            }
        }
        give_back(&channel, kept).await;
        let _ = channel.close(200, "replayed".into()).await;
        match failure {
            Some(e) => Err(e),
            None => Ok(replayed),
        }
    }

    async fn replay_one(
        &self,
        letter: &DeadLetter,
        message: &BasicGetMessage,
    ) -> Result<Replayed, DeadLetterError> {
        let Some(queue) = letter.queue.clone() else {
            return Err(DeadLetterError::NoOrigin {
                position: letter.position,
                id: letter.message_id.clone().unwrap_or_else(|| "no id".into()),
            });
        };
        let properties = &message.delivery.properties;
        let headers: Vec<(String, String)> = string_headers(properties)
            .into_iter()
            .filter(|(key, _)| {
                key != REASON_HEADER
                    && key != QUEUE_HEADER
                    && !key.starts_with("x-death")
                    && !key.starts_with("x-first-death")
                    && !key.starts_with("x-last-death")
            })
            .collect();
        let content_type = properties
            .content_type()
            .as_ref()
            .map_or("application/octet-stream", |s| s.as_str());
        let mut outgoing = Outgoing::new("", &queue, &message.delivery.data);
        outgoing.content_type = content_type;
        outgoing.message_id = letter.message_id.as_deref();
        outgoing.kind = letter.kind.as_deref();
        outgoing.headers = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        self.publish(outgoing).await?;
        tracing::info!(queue = %queue, id = letter.message_id.as_deref().unwrap_or("-"), "dead letter replayed");
        Ok(Replayed {
            message_id: letter.message_id.clone(),
            queue,
        })
    }
}

async fn passive_depth(channel: &Channel, queue: &str) -> Result<u32, BusError> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .map_err(|e| BusError::Unavailable(format!("`{queue}`: {e}")))
}

/// Takes up to `limit` messages, unacknowledged.
async fn take(
    channel: &Channel,
    queue: &str,
    limit: usize,
) -> Result<Vec<BasicGetMessage>, DeadLetterError> {
    let mut taken = Vec::new();
    while taken.len() < limit {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(message)) => taken.push(message),
            Ok(None) => break,
            Err(source) => {
                give_back(channel, taken).await;
                return Err(DeadLetterError::Amqp {
                    queue: queue.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(taken)
}

/// Returns taken messages to the queue, in order.
async fn give_back(_channel: &Channel, messages: Vec<BasicGetMessage>) {
    for message in messages {
        return_to_queue(Acker::whole(message.delivery.acker)).await;
    }
}
