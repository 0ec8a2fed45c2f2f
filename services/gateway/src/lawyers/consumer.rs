//! The lawyer service's broker inbox: every message to `lawyer-service`.
//!
//! Deliveries are taken in batches and believed as an agency's `Inbox`
//! believes them (one batch verification: each signed by its sender with
//! the directory's key over the exact bytes, and addressed to this agency),
//! else refused, each alone, as a forgery: an alert to the supervising
//! justice bureau, the delivery to the dead-letter queue. A registration is
//! applied if its registrar is entitled ([`super::registration`]), else
//! dead-lettered with the reason naming the rule; anything else is filed in
//! the inbox of each lawyer in `to_lawyers`. A delivery is acked to the
//! broker only once what it changed is committed; if the store fails, it
//! goes back to the queue and comes again (nothing is lost, and the
//! inbox's primary key stores a redelivered message once).

use refbus_bus::subscription::return_to_queue;
use std::sync::Arc;
use std::time::Duration;

use refbus_bus::Incoming;
use refbus_core::envelope::tracking_id;
use refbus_core::signing::SIGNATURE_HEADER;
use refbus_core::{KindExt, MessageKind};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{Envelope, LawyerRegistration};

use super::registration::{self, Change};
use super::store::InboxRow;
use super::{LawyerCore, now_ms};

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
    /// Consumes the lawyer service's inbox queue until shutdown, in
    /// batches: whatever the broker has already handed over, up to the
    /// prefetch, verified in one batch (issue 17) and then applied one by
    /// one in queue order.
    pub async fn consume(self: Arc<Self>) {
        let queue = self.core.bus.topology().inbox_queue(&self.agency);
        let batch_max = usize::from(self.core.prefetch.max(1));
        let mut subscription = self.core.bus.subscribe(queue.clone(), self.core.prefetch);
        let shutdown = self.core.shutdown.clone();
        tracing::info!(%queue, "lawyer service consuming its inbox");
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = subscription.next() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let mut incomings = vec![first];
            while incomings.len() < batch_max
                && let Some(incoming) = subscription.try_next()
            {
                incomings.push(incoming);
            }
            #[allow(clippy::cast_precision_loss)]
            self.core
                .metrics
                .inbox_batch_deliveries
                .observe(incomings.len() as f64);
            self.take(&queue, incomings).await;
        }
    }

    /// Handles a batch of deliveries: believed (decoded, signed by their
    /// senders, addressed here: else dead-lettered or refused as forgeries,
    /// each alone), then each applied or filed and acked, or refused. Once
    /// the store fails, that delivery and the rest of the batch go back to
    /// the queue.
    async fn take(&self, queue: &str, incomings: Vec<Incoming>) {
        let believed = self.core.believed(&self.agency, queue, incomings).await;
        let mut believed = believed.into_iter();
        while let Some((incoming, envelope)) = believed.next() {
            let outcome = match &envelope.payload {
                // The register keeps the registrar's own signature as the
                // entry's proof: a registration believed only by its entry
                // in a batch's digest list cannot be kept so.
                Some(Payload::LawyerRegistration(r)) => match incoming.header(SIGNATURE_HEADER) {
                    Some(signature) => {
                        self.register(&envelope, r, &incoming.data, &signature)
                            .await
                    }
                    None => Outcome::Refused(format!(
                        "a lawyer registration must carry its registrar's own signature ({SIGNATURE_HEADER}), which the register keeps as its proof; an entry in a batch signed once is not enough"
                    )),
                },
                _ => self.file(&envelope, &incoming.data).await,
            };
            match outcome {
                Outcome::Done => {
                    if let Err(e) = incoming.acker.ack().await {
                        // Committed: a redelivery is stored once (or applied again, the same).
                        tracing::debug!(error = %e, "broker ack failed after commit");
                    }
                }
                Outcome::Refused(reason) => {
                    tracing::warn!(id = %envelope.id, sender = %envelope.sender, %reason, "lawyer service refused a delivery");
                    self.core.bus.dead_letter(queue, incoming, reason).await;
                }
                Outcome::Retry(reason) => {
                    tracing::warn!(id = %envelope.id, %reason, "lawyer service state not written; the delivery and the rest of its batch go back to the queue");
                    tokio::select! {
                        () = self.core.shutdown.cancelled() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    for incoming in std::iter::once(incoming).chain(believed.map(|(i, _)| i)) {
                        return_to_queue(incoming.acker).await;
                    }
                    return;
                }
            }
        }
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
