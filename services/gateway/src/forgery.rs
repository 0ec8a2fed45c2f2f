//! Refusing what cannot be believed: a delivery whose signature does not
//! verify (unsigned, forged, altered), or that reached an inbox it is not
//! addressed to. The agency services' `Inbox` and the tracker both refuse
//! such a delivery the same way: a [`ForgeryAlert`] to the justice bureau
//! supervising the agency it reached, then the delivery to the dead-letter
//! queue with the reason. Nothing is acked before both are confirmed.

use chrono::Utc;
use refbus_bus::subscription::return_to_queue;
use refbus_bus::{Bus, Incoming};

use crate::gateway::publish_signed;
use refbus_core::envelope::{forgery_alert_id, timestamp};
use refbus_core::policy::justice_bureau_of;
use refbus_core::signing::SigningKeys;
use refbus_core::{Directory, MessageKind};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{Envelope, ForgeryAlert};
use sha2::{Digest, Sha256};

/// A delivery being refused, and why.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The queue it came from.
    pub queue: String,
    /// Who refuses it: the agency whose inbox it reached, or the tracker.
    pub detected_by: String,
    /// The agency it reached (or whose routing key it carried).
    pub addressed_to: String,
    /// The envelope id and sender it claimed, if it decoded.
    pub claimed_id: String,
    pub claimed_sender: String,
    pub reason: String,
}

/// Where the alert about a delivery refused at `addressed_to` goes: the
/// justice bureau supervising it, or, for an agency no bureau supervises
/// (a municipal justice bureau), that agency itself.
#[must_use]
pub fn alert_recipient<'d>(directory: &'d Directory, addressed_to: &str) -> Option<&'d str> {
    let agency = directory.get(addressed_to)?;
    Some(justice_bureau_of(agency, directory).map_or(agency.id.as_str(), |a| a.id.as_str()))
}

/// Alerts the supervising justice bureau, then dead-letters the delivery
/// with the reason. If the alert cannot be published, the delivery goes back
/// to its queue (nack with requeue) and is refused again when it returns;
/// the alert's id depends only on the refused bytes and the agency reached,
/// so a repeat is recognised.
pub async fn refuse(
    bus: &Bus,
    signing: &SigningKeys,
    directory: &Directory,
    incoming: Incoming,
    refusal: Refusal,
) {
    let body_sha256 = hex::encode(Sha256::digest(&incoming.data));
    if let Some(recipient) = alert_recipient(directory, &refusal.addressed_to) {
        let now = Some(timestamp(Utc::now()));
        let envelope = Envelope {
            id: forgery_alert_id(&body_sha256, &refusal.addressed_to),
            kind: MessageKind::ForgeryAlert as i32,
            sender: refusal.detected_by.clone(),
            recipient: recipient.to_owned(),
            submitted_at: now,
            payload: Some(Payload::ForgeryAlert(ForgeryAlert {
                body_sha256,
                claimed_id: refusal.claimed_id.clone(),
                claimed_sender: refusal.claimed_sender.clone(),
                addressed_to: refusal.addressed_to.clone(),
                detected_by: refusal.detected_by.clone(),
                reason: refusal.reason.clone(),
                detected_at: now,
            })),
            ..Envelope::default()
        };
        if let Err(e) = publish_signed(bus, signing, &envelope).await {
            tracing::warn!(queue = %refusal.queue, error = %e, "forgery alert not published; the refused delivery goes back to its queue");
            return_to_queue(incoming.acker).await;
            return;
        }
        tracing::warn!(queue = %refusal.queue, alert = %envelope.id, to = %recipient, reason = %refusal.reason, "refused a delivery; supervising justice bureau alerted");
    } else {
        tracing::warn!(queue = %refusal.queue, reason = %refusal.reason, "refused a delivery addressed to no agency in the directory; no one to alert");
    }
    bus.dead_letter(&refusal.queue, incoming, refusal.reason)
        .await;
}
