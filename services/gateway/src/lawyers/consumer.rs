//! The lawyer service's broker inbox: every message to `lawyer-service`.
//!
//! Each delivery is believed as an agency's `Inbox` believes one (signed by
//! its sender with the directory's key over the exact bytes, and addressed
//! to this agency), else refused as a forgery: an alert to the supervising
//! justice bureau, the delivery to the dead-letter queue. A registration is
//! applied if its registrar is entitled ([`super::registration`]), else
//! dead-lettered with the reason naming the rule; anything else is filed in
//! the inbox of each lawyer in `to_lawyers`. A delivery is acked to the
//! broker only once what it changed is committed; if the store fails, it
//! goes back to the queue and comes again (nothing is lost, and the
//! inbox's primary key stores a redelivered message once).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use prost::Message;
use refbus_bus::Incoming;
use refbus_core::envelope::tracking_id;
use refbus_core::signing::{self, SIGNATURE_HEADER, Signed};
use refbus_core::{KindExt, MessageKind};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{Envelope, LawyerRegistration};

use super::registration::{self, Change};
use super::store::InboxRow;
use super::{LawyerCore, now_ms};
use crate::forgery::{self, Refusal};

/// What became of one delivery.
enum Outcome {
    /// Committed: ack it.
    Done,
    /// Refused for good: dead-letter it with the reason.
    Refused(String),
    /// The store failed: return it to the queue.
    Retry(String),
}

impl LawyerCore {
    /// Consumes the lawyer service's inbox queue until shutdown.
    pub async fn consume(self: Arc<Self>) {
        let queue = self.core.bus.topology().inbox_queue(&self.agency);
        let mut subscription = self.core.bus.subscribe(queue.clone(), self.core.prefetch);
        let shutdown = self.core.shutdown.clone();
        tracing::info!(%queue, "lawyer service consuming its inbox");
        loop {
            let incoming = tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = subscription.next() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            self.take(&queue, incoming).await;
        }
    }

    /// Handles one delivery: believed, then applied or filed, then acked;
    /// or refused.
    async fn take(&self, queue: &str, incoming: Incoming) {
        let envelope = match Envelope::decode(incoming.data.as_slice()) {
            Ok(envelope) if envelope.payload.is_none() => Err("envelope has no payload".to_owned()),
            Ok(envelope) if envelope.id.is_empty() => Err("envelope has no id".to_owned()),
            Ok(envelope) => Ok(envelope),
            Err(e) => Err(format!("not a refbus.v1.Envelope: {e}")),
        };
        let envelope = match envelope {
            Ok(envelope) => envelope,
            Err(reason) => {
                self.core.bus.dead_letter(queue, incoming, reason).await;
                return;
            }
        };
        let signature = incoming.header(SIGNATURE_HEADER);
        if let Err(reason) = self.believe(&envelope, &incoming, signature.as_deref()) {
            self.core.metrics.refused.inc();
            let refusal = Refusal {
                queue: queue.to_owned(),
                detected_by: self.agency.clone(),
                addressed_to: self.agency.clone(),
                claimed_id: envelope.id,
                claimed_sender: envelope.sender,
                reason,
            };
            forgery::refuse(
                &self.core.bus,
                &self.core.signing,
                &self.core.directory,
                incoming,
                refusal,
            )
            .await;
            return;
        }
        let outcome = match &envelope.payload {
            Some(Payload::LawyerRegistration(r)) => {
                self.register(
                    &envelope,
                    r,
                    &incoming.data,
                    signature.as_deref().unwrap_or(""),
                )
                .await
            }
            _ => self.file(&envelope, &incoming.data).await,
        };
        match outcome {
            Outcome::Done => {
                if let Err(e) = incoming.acker.ack(BasicAckOptions::default()).await {
                    // Committed: a redelivery is stored once (or applied again, the same).
                    tracing::debug!(error = %e, "broker ack failed after commit");
                }
            }
            Outcome::Refused(reason) => {
                tracing::warn!(id = %envelope.id, sender = %envelope.sender, %reason, "lawyer service refused a delivery");
                self.core.bus.dead_letter(queue, incoming, reason).await;
            }
            Outcome::Retry(reason) => {
                tracing::warn!(id = %envelope.id, %reason, "lawyer service state not written; the delivery goes back to the queue");
                tokio::select! {
                    () = self.core.shutdown.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let _ = incoming
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
    }

    /// Signed by its sender over the bytes received, and addressed to
    /// this agency.
    fn believe(
        &self,
        envelope: &Envelope,
        incoming: &Incoming,
        signature: Option<&str>,
    ) -> Result<(), String> {
        signing::verify(
            &self.core.directory,
            &envelope.sender,
            Signed::Envelope,
            &incoming.data,
            signature,
        )
        .map_err(|e| e.to_string())?;
        if envelope.recipient != self.agency && !envelope.also_to.contains(&self.agency) {
            return Err(format!(
                "misaddressed: the envelope is addressed to `{}`, not to `{}`, whose inbox it reached",
                envelope.recipient, self.agency
            ));
        }
        Ok(())
    }

    /// Applies a registration from an entitled registrar.
    async fn register(
        &self,
        envelope: &Envelope,
        registration: &LawyerRegistration,
        bytes: &[u8],
        signature: &str,
    ) -> Outcome {
        let licence = registration
            .lawyer
            .as_ref()
            .map_or("", |l| l.licence_number.as_str());
        let existing = match self.store.lawyer(licence).await {
            Ok(existing) => existing,
            Err(e) => return Outcome::Retry(e.to_string()),
        };
        let received = registration::Received {
            sender: &envelope.sender,
            bytes,
            signature,
            at_ms: now_ms(),
        };
        let change = match registration::decide(
            &self.core.directory,
            registration,
            existing.as_ref(),
            &received,
        ) {
            Ok(change) => change,
            Err(reason) => return Outcome::Refused(reason),
        };
        let applied = match &change {
            Change::Register(record) => self.store.register(record).await,
            Change::Status {
                licence,
                status,
                reason,
            } => {
                self.store
                    .set_status(licence, *status, reason, &envelope.sender, received.at_ms)
                    .await
            }
        };
        if let Err(e) = applied {
            return Outcome::Retry(e.to_string());
        }
        tracing::info!(registrar = %envelope.sender, change = match change { Change::Register(_) => "registered", Change::Status { .. } => "status" }, "lawyer register changed");
        // An open stream of a lawyer now suspended (or with a new token) ends.
        self.streams.notify(licence);
        Outcome::Done
    }

    /// Files an envelope in the inbox of each lawyer it names.
    /// What a publisher with a valid key of its own still may not put in
    /// a lawyer's inbox: a kind its sender may not send to lawyers (a
    /// letter from anything but a detention centre, CQ-1.1c), or a letter
    /// or written refusal that is not sealed.
    fn may_reach_lawyers(&self, envelope: &Envelope, kind: MessageKind) -> Result<(), String> {
        use refbus_proto::v1::letter::Disposition;
        let (Some(sender), Some(lawyers)) = (
            self.core.directory.get(&envelope.sender),
            self.core.directory.get(&self.agency),
        ) else {
            return Err(format!(
                "envelope.sender: `{}` is not in the agency directory",
                envelope.sender
            ));
        };
        if !kind.is_reply() {
            refbus_core::rules::check(kind, sender, lawyers).map_err(|e| e.to_string())?;
        }
        let sealed =
            |bytes: &[u8]| bytes.is_empty() || bytes.starts_with(refbus_core::envelope::AGE_MAGIC);
        match &envelope.payload {
            Some(Payload::Letter(letter)) => match &letter.disposition {
                Some(Disposition::SealedContent(bytes)) if sealed(bytes) => Ok(()),
                Some(Disposition::WithheldOn(_)) => Ok(()),
                _ => Err("CQ-1.1c: a letter reaches a lawyer only sealed to their keys (age) or as a withholding notice".into()),
            },
            Some(Payload::Feedback(feedback)) => match &feedback.refusal {
                Some(refusal)
                    if !refusal.written_refusal.is_empty()
                        || !sealed(&refusal.sealed_written_refusal) =>
                {
                    Err("CQ-1.3c: a written refusal reaches a lawyer only sealed to their keys (age)".into())
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    async fn file(&self, envelope: &Envelope, bytes: &[u8]) -> Outcome {
        if envelope.to_lawyers.is_empty() {
            return Outcome::Refused(
                "to_lawyers: names no lawyer; a message to the lawyer service is for lawyers named by licence number".into(),
            );
        }
        for (i, licence) in envelope.to_lawyers.iter().enumerate() {
            if let Err(e) = refbus_core::lawyer::check_licence(&format!("to_lawyers[{i}]"), licence)
            {
                return Outcome::Refused(e.to_string());
            }
        }
        let kind = MessageKind::try_from(envelope.kind)
            .ok()
            .filter(|k| *k != MessageKind::Unspecified)
            .or_else(|| envelope.payload.as_ref().map(MessageKind::of_payload))
            .unwrap_or(MessageKind::Unspecified);
        if let Err(reason) = self.may_reach_lawyers(envelope, kind) {
            return Outcome::Refused(reason);
        }
        let rows: Vec<InboxRow> = envelope
            .to_lawyers
            .iter()
            .map(|licence| InboxRow {
                licence: licence.clone(),
                envelope_id: envelope.id.clone(),
                envelope: bytes.to_vec(),
                kind: kind.code().to_owned(),
                sender: envelope.sender.clone(),
                referral: tracking_id(envelope).to_owned(),
                in_reply_to: envelope.in_reply_to.clone(),
            })
            .collect();
        if let Err(e) = self.store.deliver(&rows, now_ms()).await {
            return Outcome::Retry(e.to_string());
        }
        tracing::debug!(id = %envelope.id, kind = kind.code(), lawyers = rows.len(), "filed in lawyers' inboxes");
        for licence in &envelope.to_lawyers {
            self.streams.notify(licence);
        }
        Outcome::Done
    }
}
