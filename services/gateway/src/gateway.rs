//! `Submit`, `Inbox`, `Acknowledge` and `Feedback`: the gateway every agency
//! service serves.
//!
//! `SubmitBatch` is `Submit` for many envelopes in one call: each envelope
//! goes the whole of `Submit`'s way on its own (checks, sealing, signing,
//! its own publish and its own confirm), all of them at once, so that the
//! publishes go out back to back on the publishing channel and the confirms
//! are awaited together instead of one round trip each.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use prost::Message;
use refbus_bus::{Acker, Bus, EnvelopeOut, Incoming, Topology};
use refbus_core::envelope::{self, timestamp};
use refbus_core::kind::hop_code;
use refbus_core::policy::PolicyCatalogue;
use refbus_core::rules::{self, RuleViolation};
use refbus_core::signing::{self, Signed, SigningKeys};
use refbus_core::{AgencyKind, Directory, KindExt, MessageKind, SubmitError};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::gateway_server::Gateway;
use refbus_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Delivery, Envelope, FeedbackRequest, Hop, HopReport,
    InboxRequest, Receipt, RelayRequest, SubmitBatchRequest, SubmitBatchResponse, SubmitRequest,
    SubmitResult, submit_result,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::GatewayError;
use crate::acknowledged::Acknowledged;
use crate::auth::Caller;
use crate::forgery::{self, Refusal};
use crate::hops::HopBatcher;
use crate::inbox::{Handed, Offer, Received, Sessions};
use crate::observe::ServiceMetrics;
use crate::registry::LawyerRegister;
use crate::settings::AgencyService;

/// What one agency service needs to serve its agencies.
pub struct GatewayCore {
    pub service: AgencyService,
    pub directory: Arc<Directory>,
    pub bus: Bus,
    /// The agencies this service acts for.
    pub served: BTreeSet<String>,
    /// Their signing keys: everything published is signed by its sender.
    pub signing: Arc<SigningKeys>,
    /// What this service counts (shared by the process's services).
    pub metrics: ServiceMetrics,
    pub prefetch: u16,
    pub sessions: Arc<Sessions>,
    /// What each agency's system acknowledged: never handed over again.
    pub acknowledged: Arc<Acknowledged>,
    /// The policy catalogue (`REFBUS_POLICY`), validated against the
    /// directory at start-up: what each territory's rules say.
    pub policy: Arc<PolicyCatalogue>,
    /// The lawyer service's public register, checked against each
    /// registrar's signature.
    pub lawyers: LawyerRegister,
    /// The process's hop batcher: what [`GatewayCore::report_hop`] feeds.
    pub hops: HopBatcher,
    pub shutdown: CancellationToken,
}

impl GatewayCore {
    fn served_list(&self) -> String {
        let list: Vec<_> = self.served.iter().map(String::as_str).collect();
        format!("{} serves: {}", self.service.name(), list.join(", "))
    }

    /// Checks that this service acts for `agency`.
    ///
    /// # Errors
    /// `NotOwnAgency` (PERMISSION_DENIED) or `UnknownAgency` (NOT_FOUND).
    pub fn own_agency(&self, field: &str, agency: &str) -> Result<(), GatewayError> {
        if agency.is_empty() {
            return Err(SubmitError::invalid(field, "required").into());
        }
        if self.served.contains(agency) {
            return Ok(());
        }
        if self.directory.get(agency).is_none() {
            return Err(SubmitError::UnknownAgency {
                field: field.into(),
                id: agency.into(),
            }
            .into());
        }
        Err(SubmitError::NotOwnAgency {
            field: field.into(),
            agency: agency.into(),
            served: self.served_list(),
        }
        .into())
    }

    /// Validates an envelope, publishes it and waits for the broker's confirm.
    ///
    /// # Errors
    /// Validation errors (nothing is published) or `Unavailable`.
    pub async fn submit(&self, envelope: Envelope) -> Result<Receipt, GatewayError> {
        self.submit_with(envelope, None).await
    }

    /// [`GatewayCore::submit`], with what the sender received of the
    /// referral the envelope replies to or relays, when the caller already
    /// looked it up.
    async fn submit_with(
        &self,
        envelope: Envelope,
        mut known: Option<Received>,
    ) -> Result<Receipt, GatewayError> {
        let mut envelope = envelope;
        // Receipt before anything the client's copy of a lead could decide.
        if known.is_none()
            && !envelope.relay_of.is_empty()
            && self.served.contains(&envelope.sender)
        {
            known = Some(
                self.received("envelope.relay_of", &envelope.sender, &envelope.relay_of)
                    .await?,
            );
        }
        // A reply to the lawyer service is addressed to the lawyer who sent
        // the referral: found from the delivery, before it is accepted.
        if known.is_none()
            && envelope.relay_of.is_empty()
            && is_reply(&envelope)
            && self.served.contains(&envelope.sender)
            && self.is_lawyer_service(&envelope.recipient)
        {
            let received = self
                .received(
                    "envelope.in_reply_to",
                    &envelope.sender,
                    &envelope.in_reply_to,
                )
                .await?;
            address_lawyer(&mut envelope, &received);
            known = Some(received);
        }
        let mut accepted = self.accept(envelope)?;
        self.check_reply(&mut accepted, known).await?;
        self.publish(accepted.envelope, accepted.kind).await
    }

    /// What `agency` received of `referral`: from a delivery pending on an
    /// open stream, or acknowledged (kept on disk).
    ///
    /// # Errors
    /// [`GatewayError::NotReceived`] (NOT_FOUND) when it received no such
    /// referral: the same answer whether the id exists or not, so that a
    /// reply is no way to learn of a referral (DOMAIN.md, Confidentiality).
    async fn received(
        &self,
        field: &'static str,
        agency: &str,
        referral: &str,
    ) -> Result<Received, GatewayError> {
        envelope::check_referral_id(field, referral)?;
        if let Some(received) = self.sessions.received(agency, referral) {
            return Ok(received);
        }
        match self.acknowledged.received(agency, referral).await {
            Ok(Some(received)) => Ok(received),
            Ok(None) => Err(GatewayError::NotReceived {
                field,
                agency: agency.to_owned(),
                referral: referral.to_owned(),
            }),
            Err(e) => Err(GatewayError::Bus(refbus_bus::BusError::Unavailable(
                format!("cannot read what `{agency}` received ({e}); nothing was published"),
            ))),
        }
    }

    /// A reply counts only from an agency the referral was delivered to
    /// (DOMAIN.md, Confidentiality), whatever RPC carries it: an
    /// acknowledgement or feedback goes to where the referral's answer goes
    /// (its sender, a lead's finder with its relays, DZ-8), and a relayed
    /// lead is the lead exactly as delivered (DZ-7).
    ///
    /// `known` is what the sender received of that referral, when already
    /// looked up (it counts only if it is the same referral).
    ///
    /// # Errors
    /// `NotReceived` (NOT_FOUND) or a rule violation (PERMISSION_DENIED).
    async fn check_reply(
        &self,
        accepted: &mut envelope::Accepted,
        known: Option<Received>,
    ) -> Result<(), GatewayError> {
        let envelope = &mut accepted.envelope;
        let referral = if envelope.relay_of.is_empty() {
            &envelope.in_reply_to
        } else {
            &envelope.relay_of
        };
        let known = known.filter(|r| r.referral == *referral);
        if !envelope.relay_of.is_empty() {
            let received = match known {
                Some(received) => received,
                None => {
                    self.received("envelope.relay_of", &envelope.sender, &envelope.relay_of)
                        .await?
                }
            };
            if envelope.payload.as_ref().map(payload_digest).as_deref()
                != Some(received.payload_digest.as_str())
            {
                return Err(RuleViolation {
                    rule: "DZ-7",
                    reason: format!(
                        "`{}` relays lead `{}` changed: a relay passes the lead on exactly as delivered",
                        envelope.sender, envelope.relay_of
                    ),
                }
                .into());
            }
            return Ok(());
        }
        if !matches!(
            accepted.kind,
            MessageKind::Acknowledgement | MessageKind::Feedback
        ) {
            return Ok(());
        }
        let received = match known {
            Some(received) => received,
            None => {
                self.received(
                    "envelope.in_reply_to",
                    &envelope.sender,
                    &envelope.in_reply_to,
                )
                .await?
            }
        };
        let rule = MessageKind::from_code(&received.kind).map_or("DZ-8", rules::rule_of);
        if accepted.kind == MessageKind::Feedback && !received.answers {
            return Err(RuleViolation {
                rule: "DZ-8",
                reason: format!(
                    "`{}` passes lead `{}` on; its handling organ feeds back",
                    envelope.sender, envelope.in_reply_to
                ),
            }
            .into());
        }
        if envelope.recipient != received.reply_to {
            return Err(RuleViolation {
                rule,
                reason: format!(
                    "an answer to `{}` goes to `{}`, which sent it (or found the lead), not to `{}`",
                    envelope.in_reply_to, received.reply_to, envelope.recipient
                ),
            }
            .into());
        }
        if self.is_lawyer_service(&envelope.recipient)
            && (received.from_lawyer.is_empty()
                || envelope.to_lawyers != [received.from_lawyer.clone()])
        {
            return Err(RuleViolation {
                rule,
                reason: format!(
                    "an answer to `{}` goes to the lawyer who sent it through `{}`: to_lawyers is [{}]",
                    envelope.in_reply_to, envelope.recipient, received.from_lawyer
                ),
            }
            .into());
        }
        if accepted.kind == MessageKind::Feedback {
            envelope.also_to.clone_from(&received.relays);
            self.feed_back_to_complainant(envelope, &received).await;
        }
        Ok(())
    }

    /// CQ-3.13: the result of a rights complaint a body entered for a
    /// registered lawyer is fed back to the lawyer too, through the lawyer
    /// service (a further recipient, with the lawyer in `to_lawyers`). Set
    /// once the feedback is accepted: addressed to the body, it would
    /// otherwise name a lawyer on a message to an agency.
    ///
    /// Only a licence the register says nobody registered is left out.
    /// When the register cannot be asked (or its entry not believed), the
    /// result still goes to the lawyer service for the lawyer: the body's
    /// answer does not wait on the lawyer service, and the lawyer's copy is
    /// never lost; the lawyer service holds it for a registered lawyer only.
    async fn feed_back_to_complainant(&self, envelope: &mut Envelope, received: &Received) {
        if received.complainant.is_empty()
            || received.kind != MessageKind::RightsComplaint.code()
            || self.is_lawyer_service(&envelope.recipient)
        {
            return;
        }
        let Some(lawyer_service) = self.lawyer_service() else {
            return;
        };
        match self
            .lawyers
            .get(
                "rights_complaint.complainant.licence_number",
                &received.complainant,
            )
            .await
        {
            Ok(_) => {}
            // Filed for a lawyer who is not on the bus: the body's answer only.
            Err(GatewayError::LawyerNotRegistered { .. }) => return,
            Err(GatewayError::RegisterUnavailable(reason)) => {
                tracing::warn!(%reason, referral = %received.referral, "CQ-3.13: the register could not be asked for the complainant; the result goes to the lawyer service for them all the same");
            }
            Err(_) => {
                tracing::warn!(referral = %received.referral, "CQ-3.13: the register's entry of the complainant cannot be believed; the result goes to the lawyer service for them all the same");
            }
        }
        if !envelope.also_to.iter().any(|a| a == lawyer_service) {
            envelope.also_to.push(lawyer_service.to_owned());
        }
        envelope.to_lawyers = vec![received.complainant.clone()];
    }

    /// Whether `agency` is a lawyer service (where lawyers' inboxes are).
    fn is_lawyer_service(&self, agency: &str) -> bool {
        self.directory
            .get(agency)
            .is_some_and(|a| a.kind == AgencyKind::LawyerService)
    }

    /// The directory's lawyer service, if it has one.
    #[must_use]
    pub fn lawyer_service(&self) -> Option<&str> {
        self.directory
            .of_kind(AgencyKind::LawyerService)
            .next()
            .map(|a| a.id.as_str())
    }

    fn accept(&self, envelope: Envelope) -> Result<envelope::Accepted, GatewayError> {
        Ok(envelope::accept(
            envelope,
            &self.directory,
            |sender| self.served.contains(sender),
            &self.served_list(),
            Utc::now(),
        )?)
    }

    /// Publishes an accepted envelope, once, to its recipient and to every
    /// agency in `also_to`, and waits for the broker's confirm.
    async fn publish(
        &self,
        envelope: Envelope,
        kind: MessageKind,
    ) -> Result<Receipt, GatewayError> {
        debug_assert_eq!(
            envelope.kind, kind as i32,
            "accepted envelopes carry their kind"
        );
        let routing_key = publish_signed(&self.bus, &self.signing, &envelope).await?;
        self.metrics.submitted(kind.code());
        tracing::info!(id = %envelope.id, kind = kind.code(), sender = %envelope.sender, recipient = %envelope.recipient, also_to = envelope.also_to.len(), "submitted");
        Ok(Receipt {
            id: envelope.id,
            submitted_at: envelope.submitted_at,
            recipient: envelope.recipient,
            routing_key,
            also_to: envelope.also_to,
        })
    }

    /// Answers a referral: a feedback envelope to the referral's sender; for
    /// a misconduct lead, to its finder, with a copy to every relay it passed
    /// (DZ-8). Only an agency the referral was addressed to may answer it.
    ///
    /// # Errors
    /// As [`GatewayCore::submit`]; `Forbidden` naming the rule when `agency`
    /// was not asked.
    pub async fn feedback(&self, request: FeedbackRequest) -> Result<Receipt, GatewayError> {
        self.feedback_also_to(request, Vec::new()).await
    }

    /// [`GatewayCore::feedback`], with further recipients of the same
    /// answer (a meeting refusal's copy to the centre's supervisor,
    /// CQ-1.3a), each once.
    ///
    /// # Errors
    /// As [`GatewayCore::feedback`].
    pub async fn feedback_also_to(
        &self,
        request: FeedbackRequest,
        also_to: Vec<String>,
    ) -> Result<Receipt, GatewayError> {
        self.own_agency("agency", &request.agency)?;
        let Some(referral) = request.referral else {
            return Err(GatewayError::Invalid {
                field: "referral",
                reason: "required: the referral answered, as delivered".into(),
            });
        };
        let Some(feedback) = request.feedback else {
            return Err(GatewayError::Invalid {
                field: "feedback",
                reason: "required".into(),
            });
        };
        let Some(payload) = referral.payload.as_ref() else {
            return Err(GatewayError::Invalid {
                field: "referral.payload",
                reason: "required: the referral as delivered".into(),
            });
        };
        if referral.id.trim().is_empty() {
            return Err(GatewayError::Invalid {
                field: "referral.id",
                reason: "required: the referral as delivered".into(),
            });
        }
        let kind = MessageKind::of_payload(payload);
        if !kind.is_referral() {
            return Err(GatewayError::Invalid {
                field: "referral",
                reason: format!("a {} asks for no answer", kind.code()),
            });
        }
        let agency = request.agency;
        let referral_id = envelope::tracking_id(&referral).to_owned();
        let received = self.received("referral.id", &agency, &referral_id).await?;
        if payload_digest(payload) != received.payload_digest {
            return Err(RuleViolation {
                rule: rules::rule_of(kind),
                reason: format!(
                    "the referral passed back is not `{referral_id}` as it was delivered to `{agency}`"
                ),
            }
            .into());
        }
        // Where the answer goes comes from the delivery, not from the copy
        // the client passed back.
        let mut envelope = Envelope {
            sender: agency,
            recipient: received.reply_to.clone(),
            in_reply_to: referral_id,
            idempotency_key: request.idempotency_key,
            payload: Some(Payload::Feedback(feedback)),
            ..Envelope::default()
        };
        if self.is_lawyer_service(&envelope.recipient) {
            address_lawyer(&mut envelope, &received);
        }
        let mut accepted = self.accept(envelope)?;
        self.check_reply(&mut accepted, Some(received)).await?;
        for agency in also_to {
            if agency != accepted.envelope.recipient && !accepted.envelope.also_to.contains(&agency)
            {
                accepted.envelope.also_to.push(agency);
            }
        }
        self.publish(accepted.envelope, accepted.kind).await
    }

    /// Checks that `agency` received `referral` as `delivered` carries it
    /// (its payload unchanged): what a centre's request about a referral
    /// it holds (a CQ-1.3d verification) needs.
    ///
    /// # Errors
    /// `NotReceived` (NOT_FOUND, as for an unknown id) or a rule violation
    /// when the payload passed back is not the one delivered.
    pub async fn check_received(
        &self,
        field: &'static str,
        agency: &str,
        referral: &str,
        delivered: &Envelope,
    ) -> Result<(), GatewayError> {
        let received = self.received(field, agency, referral).await?;
        let digest = delivered.payload.as_ref().map(payload_digest);
        if digest.as_deref() != Some(received.payload_digest.as_str()) {
            let kind = MessageKind::from_code(&received.kind).unwrap_or(MessageKind::Unspecified);
            return Err(RuleViolation {
                rule: rules::rule_of(kind),
                reason: format!(
                    "the referral passed back is not `{referral}` as it was delivered to `{agency}`"
                ),
            }
            .into());
        }
        Ok(())
    }

    /// Passes a misconduct lead on to the next organ of its route (DZ-7).
    ///
    /// # Errors
    /// As [`GatewayCore::submit`]; `Forbidden` naming DZ-7 when `agency` was
    /// not sent the lead or is not a relay of its route.
    pub async fn relay(&self, request: RelayRequest) -> Result<Receipt, GatewayError> {
        self.own_agency("agency", &request.agency)?;
        let Some(lead) = request.lead else {
            return Err(GatewayError::Invalid {
                field: "lead",
                reason: "required: the lead as delivered".into(),
            });
        };
        let Some(Payload::MisconductLead(payload)) = lead.payload.clone() else {
            return Err(GatewayError::Invalid {
                field: "lead.payload",
                reason: "DZ-7: only a misconduct lead is relayed".into(),
            });
        };
        if lead.id.trim().is_empty() {
            return Err(GatewayError::Invalid {
                field: "lead.id",
                reason: "required: the lead as delivered".into(),
            });
        }
        let original = envelope::tracking_id(&lead).to_owned();
        // Only the agency the lead was delivered to passes it on, and the
        // lead as delivered (DZ-7): receipt here, the payload in `submit_with`.
        let received = self.received("lead.id", &request.agency, &original).await?;
        let idempotency_key = if request.idempotency_key.is_empty() {
            format!("relay/{original}")
        } else {
            request.idempotency_key
        };
        self.submit_with(
            Envelope {
                sender: request.agency,
                relay_of: original,
                clock_started_at: lead.clock_started_at,
                idempotency_key,
                payload: Some(Payload::MisconductLead(payload)),
                ..Envelope::default()
            },
            Some(received),
        )
        .await
    }

    /// Streams `agency`'s inbox until the client goes away or the service
    /// shuts down; then every unacknowledged delivery returns to the queue.
    ///
    /// The stream holds at most `window` deliveries unacknowledged (the
    /// channel's prefetch, and as many places on the stream: an envelope
    /// of a batch message takes one, see [`crate::inbox`]). Deliveries are
    /// taken from the broker as they
    /// arrive, in batches of whatever is already there (at most `window`):
    /// a batch is decoded, its signatures checked with one batch
    /// verification and its ids looked up in the acknowledged store with
    /// one query, then handed over one by one as the client's transport
    /// takes them (issue 17). The next batch is taken only once the
    /// transport took the last of this one, so what waits in the service is
    /// never more than the window the client asked for, and all of it is
    /// still unacknowledged on the broker. Closing the stream costs the
    /// messages nothing (the queue has no delivery limit); only what cannot
    /// be decoded or believed is dead-lettered.
    ///
    /// # Errors
    /// When `agency` is not one of this service's agencies.
    pub fn inbox(
        self: &Arc<Self>,
        agency: String,
        window: u32,
    ) -> Result<ReceiverStream<Result<Delivery, Status>>, GatewayError> {
        self.own_agency("agency", &agency)?;
        let window = match u16::try_from(window) {
            Ok(0) => DEFAULT_WINDOW.min(self.prefetch.max(1)),
            Ok(w) => w.min(self.prefetch.max(1)),
            Err(_) => self.prefetch.max(1),
        };
        // A slot for each delivery the window allows (the window's places
        // bound what is handed over and unacknowledged, so the channel never
        // holds more): a batch handed over is all ready for the transport
        // at once, and tonic encodes what is ready into one frame, one
        // write. With one slot, every delivery was a frame and a `writev`
        // of its own (issue 17). What the transport never took when the
        // stream closes is returned to the queue with the session's rest.
        let (tx, rx) = mpsc::channel(usize::from(window));
        let core = self.clone();
        tokio::spawn(async move {
            let guard = core.sessions.open(&agency);
            let queue = core.bus.topology().inbox_queue(&agency);
            let batch_max = usize::from(window);
            // The window in deliveries: the prefetch counts AMQP messages,
            // and one batch message carries many envelopes.
            let places = Arc::new(Semaphore::new(batch_max));
            let mut subscription = core
                .bus
                .subscribe_with_buffer(queue.clone(), window, batch_max);
            tracing::debug!(%agency, session = guard.id, window, "inbox stream opened");
            'stream: loop {
                let place = tokio::select! {
                    () = core.shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    place = places.clone().acquire_owned() => match place {
                        Ok(place) => place,
                        Err(_) => break,
                    },
                };
                let first = tokio::select! {
                    () = core.shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    incoming = subscription.next() => match incoming {
                        Some(incoming) => incoming,
                        None => break,
                    },
                };
                let mut incomings = vec![(first, place)];
                while incomings.len() < batch_max
                    && let Ok(place) = places.clone().try_acquire_owned()
                {
                    let Some(incoming) = subscription.try_next() else {
                        break;
                    };
                    incomings.push((incoming, place));
                }
                #[allow(clippy::cast_precision_loss)]
                core.metrics
                    .inbox_batch_deliveries
                    .observe(incomings.len() as f64);
                for delivery in core.hand_over(guard.id, &agency, &queue, incomings).await {
                    let submitted_at = delivery
                        .envelope
                        .as_ref()
                        .and_then(|e| e.submitted_at.as_ref())
                        .and_then(envelope::from_timestamp);
                    if tx.send(Ok(delivery)).await.is_err() {
                        break 'stream;
                    }
                    core.metrics.handed_over(submitted_at);
                }
            }
            tracing::debug!(%agency, session = guard.id, "inbox stream closed");
            // Ending the session returns what its deliveries held, its
            // nacks sent first; then dropping the subscription closes its
            // channel, and the broker returns every unacknowledged delivery
            // to the queue (with any of the last batch the transport never
            // took).
            guard.end().await;
            drop(subscription);
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Decodes a batch of deliveries for the client, dead-lettering with
    /// the reason what does not decode or cannot be believed. A copy of a
    /// message the agency already acknowledged (a second publish of a
    /// retried submission, a redelivery whose broker ack was lost) is acked
    /// to the broker and not handed over. A copy of one pending on an open
    /// stream is held with it, unacknowledged, and acked when the client
    /// acknowledges the pending one. Returns what is handed over, in order.
    async fn hand_over(
        &self,
        session: u64,
        agency: &str,
        queue: &str,
        incomings: Vec<(Incoming, OwnedSemaphorePermit)>,
    ) -> Vec<Delivery> {
        // Places are interchangeable: as many as the deliveries handed over
        // are kept, the rest given back when this returns.
        let (incomings, mut places): (Vec<Incoming>, Vec<OwnedSemaphorePermit>) =
            incomings.into_iter().unzip();
        let believed = self.believed(agency, queue, incomings).await;
        // Copies of what is pending on an open stream are held with it.
        let mut fresh = Vec::with_capacity(believed.len());
        for (incoming, envelope) in believed {
            let Incoming {
                acker,
                channel,
                delivery_tag,
                redelivered,
                part,
                ..
            } = incoming;
            match self.sessions.offer(agency, &envelope.id, acker) {
                Offer::Held => {
                    tracing::debug!(%agency, id = %envelope.id, "pending on an open stream; held with it, not handed over again");
                }
                Offer::New(acker) => {
                    fresh.push((acker, channel, delivery_tag, part, redelivered, envelope))
                }
            }
        }
        let ids: Vec<&str> = fresh.iter().map(|f| f.5.id.as_str()).collect();
        let acknowledged = match self.acknowledged.contains_any(agency, &ids).await {
            Ok(acknowledged) => acknowledged,
            // Unsure: hand them over (at least once) rather than lose them.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the acknowledged ids; handing the deliveries over");
                std::collections::HashSet::new()
            }
        };
        let mut handed = Vec::with_capacity(fresh.len());
        for (acker, channel, delivery_tag, part, redelivered, envelope) in fresh {
            if acknowledged.contains(envelope.id.as_str()) {
                tracing::debug!(%agency, id = %envelope.id, "already acknowledged; not handed over again");
                if let Err(e) = acker.ack().await {
                    tracing::debug!(error = %e, "ack of a duplicate failed; it comes again and is dropped again");
                }
                continue;
            }
            let Some(token) = self.sessions.register(
                session,
                Handed {
                    channel,
                    delivery_tag,
                    part,
                    acker,
                    window: places.pop(),
                    message_id: envelope.id.clone(),
                    received: received_from(agency, &envelope),
                },
            ) else {
                continue;
            };
            handed.push(Delivery {
                delivery_token: token,
                envelope: Some(envelope),
                redelivered,
            });
        }
        handed
    }

    /// Decodes a batch of deliveries from `agency`'s inbox `queue` and
    /// checks their signatures in one batch verification
    /// ([`GatewayCore::believe`]): what does not decode is dead-lettered
    /// with the reason, what cannot be believed is refused as a forgery
    /// (dead-lettered, the sender's supervisor alerted). Returns the rest,
    /// in order. Shared by the agencies' `Inbox` streams and the lawyer
    /// service's broker inbox (issue 17: inboxes verify in batches).
    pub(crate) async fn believed(
        &self,
        agency: &str,
        queue: &str,
        incomings: Vec<Incoming>,
    ) -> Vec<(Incoming, Envelope)> {
        let mut decoded = Vec::with_capacity(incomings.len());
        for incoming in incomings {
            let envelope = Envelope::decode(incoming.data.as_slice())
                .map_err(|e| format!("not a refbus.v1.Envelope: {e}"))
                .and_then(|envelope| {
                    if envelope.payload.is_none() {
                        Err("envelope has no payload".to_owned())
                    } else if envelope.id.is_empty() {
                        Err("envelope has no id".to_owned())
                    } else {
                        // Every id the bus gives is a UUID's canonical
                        // text: anything else (a NUL, 3 KB, an id in the
                        // acknowledged store's own `received:` form) is
                        // refused before it reaches the store or a client.
                        envelope::check_referral_id("envelope.id", &envelope.id)
                            .map_err(|e| e.to_string())
                            .map(|()| envelope)
                    }
                });
            match envelope {
                Ok(envelope) => decoded.push((incoming, envelope)),
                Err(reason) => self.bus.dead_letter(queue, incoming, reason).await,
            }
        }
        let verdicts = self.believe(agency, &decoded);
        let mut believed = Vec::with_capacity(decoded.len());
        for ((incoming, envelope), verdict) in decoded.into_iter().zip(verdicts) {
            let Err(reason) = verdict else {
                believed.push((incoming, envelope));
                continue;
            };
            self.metrics.refused.inc();
            let refusal = Refusal {
                queue: queue.to_owned(),
                detected_by: agency.to_owned(),
                addressed_to: agency.to_owned(),
                claimed_id: envelope.id,
                claimed_sender: envelope.sender,
                reason,
            };
            forgery::refuse(&self.bus, &self.signing, &self.directory, incoming, refusal).await;
        }
        believed
    }

    /// Whether each decoded delivery can be believed: signed by its sender
    /// with the key the directory publishes, over the exact bytes received
    /// (one batch verification for them all), and addressed to the agency
    /// whose inbox it reached. One verdict per delivery, in order: the
    /// reason it is refused, if it is.
    fn believe(&self, agency: &str, decoded: &[(Incoming, Envelope)]) -> Vec<Result<(), String>> {
        let proofs: Vec<signing::Proof> = decoded
            .iter()
            .map(|(incoming, _)| incoming.proof())
            .collect();
        let claims: Vec<signing::Claim<'_>> = decoded
            .iter()
            .zip(&proofs)
            .map(|((incoming, envelope), proof)| signing::Claim {
                signer: &envelope.sender,
                what: Signed::Envelope,
                body: &incoming.data,
                seal: proof.as_seal(),
            })
            .collect();
        signing::verify_many(&self.directory, &claims)
            .into_iter()
            .zip(decoded)
            .map(|(verdict, (_, envelope))| {
                verdict.map_err(|e| e.to_string())?;
                if envelope.recipient != agency && !envelope.also_to.iter().any(|a| a == agency) {
                    return Err(format!(
                        "misaddressed: the envelope is addressed to `{}`, not to `{agency}`, whose inbox it reached",
                        envelope.recipient
                    ));
                }
                Ok(())
            })
            .collect()
    }

    /// Acknowledges deliveries of an open stream: `delivery_token` and
    /// every one of `delivery_tokens`. Returns the tokens of a multi-token
    /// call that were not pending.
    ///
    /// # Errors
    /// `DeliveryGone` when a single token is not pending on an open stream;
    /// `Invalid` when no token is given; `Bus` when the acknowledgements
    /// cannot be recorded (they will be delivered again).
    pub async fn acknowledge(
        &self,
        request: AcknowledgeRequest,
    ) -> Result<Vec<String>, GatewayError> {
        self.own_agency("agency", &request.agency)?;
        let agency = request.agency;
        let mut tokens = request.delivery_tokens;
        if !request.delivery_token.is_empty() {
            tokens.insert(0, request.delivery_token);
        }
        let mut taken = Vec::with_capacity(tokens.len());
        let mut not_pending = Vec::new();
        match tokens.as_slice() {
            [] => {
                return Err(GatewayError::Invalid {
                    field: "delivery_token",
                    reason: "required: the token of a delivery handed over on the Inbox stream"
                        .into(),
                });
            }
            [token] => taken.push(self.sessions.take(&agency, token)?),
            _ => {
                for token in tokens {
                    match self.sessions.take(&agency, &token) {
                        Ok(t) => taken.push(t),
                        Err(_) => not_pending.push(token),
                    }
                }
            }
        }
        // Remembered first: once the system has acknowledged an id, no later
        // delivery of it is handed over, whatever happens to the broker ack;
        // with it, what the agency received (its proof of receipt for a
        // reply). Recorded concurrently, the ids share one transaction.
        let recorded = futures_util::future::join_all(taken.iter().map(|t| {
            self.acknowledged
                .record(&agency, &t.message_id, Some(t.received.clone()))
        }))
        .await;
        if let Some(Err(e)) = recorded.into_iter().find(Result::is_err) {
            for t in taken {
                self.sessions.not_acknowledged(t);
            }
            return Err(GatewayError::Bus(refbus_bus::BusError::Unavailable(
                format!(
                    "cannot record the acknowledgement ({e}); the deliveries stay pending: acknowledge them again"
                ),
            )));
        }
        self.metrics.acknowledged.inc_by(taken.len() as u64);
        let now = Utc::now();
        let mut ackers = Vec::with_capacity(taken.len());
        // Held until the acks are out: the stream's channel stays open
        // until then (`SessionGuard::end`).
        let mut in_flight = Vec::with_capacity(taken.len());
        for mut t in taken {
            in_flight.push(t.in_flight);
            // Copies that arrived while the record was being written.
            t.ackers.extend(self.sessions.acknowledged(&t.token));
            ackers.append(&mut t.ackers);
            self.metrics.delivered(&t.received.kind);
            // "Delivered" means the agency's system has it: reported only
            // now, never for a delivery that went back to the queue, at the
            // time it was handed over.
            self.report_hop(
                t.received.referral.clone(),
                Hop::Delivered,
                agency.clone(),
                t.handed_at,
            );
            self.report_hop(t.received.referral, Hop::Acknowledged, agency.clone(), now);
        }
        // Every broker ack at once: they go out together instead of one
        // round trip of the connection's I/O loop each.
        let acks = futures_util::future::join_all(ackers.into_iter().map(Acker::ack)).await;
        drop(in_flight);
        if let Some(Err(e)) = acks.into_iter().find(Result::is_err) {
            // Recorded: the broker's redelivery is recognised and dropped.
            tracing::debug!(error = %e, "broker ack failed after the acknowledgement was recorded");
        }
        Ok(not_pending)
    }

    /// Reports a hop to the tracker: queued for the next signed batch of
    /// `agency`'s hops (see [`crate::hops`]), published in the background
    /// and retried while the broker is away. The report's id is derived
    /// from (referral, hop, agency), so a retry or a redelivery is
    /// recorded once.
    pub fn report_hop(&self, referral_id: String, hop: Hop, agency: String, at: DateTime<Utc>) {
        self.hops.report(HopReport {
            id: envelope::hop_report_id(&referral_id, hop_code(hop), &agency),
            referral_id,
            hop: hop as i32,
            agency,
            at: Some(timestamp(at)),
        });
    }
}

/// Publishes an envelope signed by its sender, once, to its recipient and to
/// every agency in `also_to` (alone, or in a batch with others of its route
/// under load: [`refbus_bus::envelopes`]), and waits for the broker's
/// confirm of the message that carries it: the one
/// way every envelope goes on the bus (submissions, feedback, relays,
/// forgery alerts, overdue notices). Returns the routing key.
///
/// # Errors
/// `Signing` when this process holds no key for the sender; `Bus` when the
/// broker does not confirm.
pub async fn publish_signed(
    bus: &Bus,
    signing: &SigningKeys,
    envelope: &Envelope,
) -> Result<String, GatewayError> {
    let kind = MessageKind::try_from(envelope.kind)
        .unwrap_or(MessageKind::Unspecified)
        .code();
    let routing_key = Topology::routing_key(&envelope.recipient, kind);
    let body = envelope.encode_to_vec();
    let key = signing.key(&envelope.sender)?;
    bus.publish_envelope(EnvelopeOut {
        routing_key: routing_key.clone(),
        cc: envelope
            .also_to
            .iter()
            .map(|agency| Topology::routing_key(agency, kind))
            .collect(),
        id: envelope.id.clone(),
        kind: kind.to_owned(),
        body,
        key,
        // The register keeps a registration with its registrar's own
        // signature, as proof on its own.
        keeps_own_signature: matches!(envelope.payload, Some(Payload::LawyerRegistration(_))),
    })
    .await?;
    Ok(routing_key)
}

/// The most envelopes one `SubmitBatch` call carries; a larger batch is
/// refused whole (INVALID_ARGUMENT), nothing published.
pub const MAX_BATCH: usize = 500;

/// The tonic face of [`GatewayCore`].
#[derive(Clone)]
pub struct GatewayService(pub Arc<GatewayCore>);

impl GatewayService {
    /// What `Submit` does with one envelope from `caller`, and
    /// `SubmitBatch` with each of its envelopes: the sender must be the
    /// caller; CQ-1.1c: a letter submitted with its content is sealed here,
    /// as ForwardLetter seals it; lawyers are addressed only as registered
    /// (NOT_FOUND otherwise); then validated, published and confirmed.
    async fn submit_as(&self, caller: &Caller, mut envelope: Envelope) -> Result<Receipt, Status> {
        caller.acts_as("envelope.sender", &envelope.sender)?;
        crate::letters::seal_submitted_letter(&self.0, &mut envelope).await?;
        crate::letters::check_registered(&self.0, &envelope).await?;
        Ok(self.0.submit(envelope).await?)
    }

    /// Runs one call, counting it in `rejected` if it fails.
    ///
    /// A plain function around `call`, not an `async fn`: an `async fn`
    /// keeps its argument and the future it awaits side by side, so every
    /// RPC's future held its call twice (Submit's, 18 KB in a debug build),
    /// and tonic's boxing copied all of it per call (issue 17).
    fn counted<'a, T: 'a>(
        &'a self,
        rpc: &'static str,
        call: impl Future<Output = Result<T, Status>> + 'a,
    ) -> impl Future<Output = Result<Response<T>, Status>> + 'a {
        call.map(move |result| {
            if let Err(status) = &result {
                self.0.metrics.reject(rpc, status);
            }
            result.map(Response::new)
        })
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<Receipt>, Status> {
        let started = std::time::Instant::now();
        let result = self
            .counted("Submit", async {
                let caller = Caller::of(&request)?;
                let Some(envelope) = request.into_inner().envelope else {
                    return Err(Status::invalid_argument("envelope: required"));
                };
                self.submit_as(&caller, envelope).await
            })
            .await;
        self.0
            .metrics
            .submit_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn submit_batch(
        &self,
        request: Request<SubmitBatchRequest>,
    ) -> Result<Response<SubmitBatchResponse>, Status> {
        let started = std::time::Instant::now();
        let mut count = 0;
        let result = self
            .counted("SubmitBatch", async {
                let caller = Caller::of(&request)?;
                let envelopes = request.into_inner().envelopes;
                if envelopes.len() > MAX_BATCH {
                    return Err(Status::invalid_argument(format!(
                        "envelopes: {} envelopes, over the limit of {MAX_BATCH} per call; nothing was published",
                        envelopes.len()
                    )));
                }
                count = envelopes.len();
                // Every envelope on Submit's own path, all at once: each
                // publish goes out without waiting for the confirms of the
                // others, and each receipt waits for its own confirm.
                let outcomes = futures_util::future::join_all(
                    envelopes.into_iter().map(|e| self.submit_as(&caller, e)),
                )
                .await;
                let results = outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        Ok(receipt) => submit_result::Result::Receipt(receipt),
                        Err(status) => {
                            self.0.metrics.reject("SubmitBatch", &status);
                            submit_result::Result::Error(refbus_proto::v1::SubmitError {
                                code: status.code() as i32,
                                message: status.message().to_owned(),
                            })
                        }
                    })
                    .map(|result| SubmitResult {
                        result: Some(result),
                    })
                    .collect();
                Ok(SubmitBatchResponse { results })
            })
            .await;
        // Each envelope's receipt (or refusal) came after the whole call:
        // its submit latency, as a Submit of its own would have observed.
        let seconds = started.elapsed().as_secs_f64();
        for _ in 0..count {
            self.0.metrics.submit_seconds.observe(seconds);
        }
        result
    }

    type InboxStream = ReceiverStream<Result<Delivery, Status>>;

    async fn inbox(
        &self,
        request: Request<InboxRequest>,
    ) -> Result<Response<Self::InboxStream>, Status> {
        self.counted("Inbox", async {
            let caller = Caller::of(&request)?;
            let InboxRequest { agency, window } = request.into_inner();
            caller.acts_as("agency", &agency)?;
            Ok(self.0.inbox(agency, window)?)
        })
        .await
    }

    async fn acknowledge(
        &self,
        request: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        self.counted("Acknowledge", async {
            let caller = Caller::of(&request)?;
            let request = request.into_inner();
            caller.acts_as("agency", &request.agency)?;
            let not_pending = self.0.acknowledge(request).await?;
            Ok(AcknowledgeResponse { not_pending })
        })
        .await
    }

    async fn feedback(
        &self,
        request: Request<FeedbackRequest>,
    ) -> Result<Response<Receipt>, Status> {
        self.counted("Feedback", async {
            let caller = Caller::of(&request)?;
            let request = request.into_inner();
            caller.acts_as("agency", &request.agency)?;
            Ok(self.0.feedback(request).await?)
        })
        .await
    }

    async fn relay(&self, request: Request<RelayRequest>) -> Result<Response<Receipt>, Status> {
        self.counted("Relay", async {
            let caller = Caller::of(&request)?;
            let request = request.into_inner();
            caller.acts_as("agency", &request.agency)?;
            Ok(self.0.relay(request).await?)
        })
        .await
    }
}

/// The window of an `Inbox` stream that asks for none.
pub const DEFAULT_WINDOW: u16 = 32;

/// SHA-256 (hex) of a payload's encoding: a payload passed back is the one
/// delivered only if it encodes to the same bytes.
#[must_use]
pub fn payload_digest(payload: &Payload) -> String {
    use sha2::{Digest, Sha256};
    let mut bytes = Vec::with_capacity(payload.encoded_len());
    payload.encode(&mut bytes);
    hex::encode(Sha256::digest(&bytes))
}

/// What a verified delivery to `agency` says about answering it.
fn received_from(agency: &str, envelope: &Envelope) -> Received {
    let kind = MessageKind::try_from(envelope.kind).unwrap_or(MessageKind::Unspecified);
    let digest = envelope
        .payload
        .as_ref()
        .map(payload_digest)
        .unwrap_or_default();
    let (reply_to, relays, answers) = match &envelope.payload {
        Some(Payload::MisconductLead(lead)) => {
            let handles = lead.route.last().is_some_and(|hop| hop.agency == agency);
            let relays = if handles {
                lead.route[..lead.route.len() - 1]
                    .iter()
                    .rev()
                    .map(|hop| hop.agency.clone())
                    .filter(|relay| *relay != lead.found_by && relay != agency)
                    .collect()
            } else {
                Vec::new()
            };
            (lead.found_by.clone(), relays, handles)
        }
        _ => (envelope.sender.clone(), Vec::new(), kind.is_referral()),
    };
    // A complaint the lawyer service sent names its lawyer in from_lawyer
    // (core checks that they are the complainant); one a body entered
    // names the lawyer only as the complainant.
    let complainant = match &envelope.payload {
        Some(Payload::RightsComplaint(complaint)) if envelope.from_lawyer.is_empty() => complaint
            .complainant
            .as_ref()
            .map(|l| l.licence_number.clone())
            .unwrap_or_default(),
        _ => String::new(),
    };
    Received {
        referral: envelope::tracking_id(envelope).to_owned(),
        kind: kind.code().to_owned(),
        reply_to,
        relays,
        answers,
        payload_digest: digest,
        from_lawyer: envelope.from_lawyer.clone(),
        complainant,
    }
}

/// Whether an envelope is an acknowledgement or feedback.
fn is_reply(envelope: &Envelope) -> bool {
    matches!(
        envelope.payload,
        Some(Payload::Acknowledgement(_) | Payload::Feedback(_))
    )
}

/// Addresses a reply to the lawyer service to the lawyer who sent the
/// referral, when the client named none (a different list is refused by
/// `check_reply`).
fn address_lawyer(envelope: &mut Envelope, received: &Received) {
    if envelope.to_lawyers.is_empty() && !received.from_lawyer.is_empty() {
        envelope.to_lawyers = vec![received.from_lawyer.clone()];
    }
}

/// Converts the current time for envelopes built by agency-specific RPCs.
#[must_use]
pub fn now() -> prost_types::Timestamp {
    timestamp(Utc::now())
}
