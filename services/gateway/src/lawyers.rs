//! The lawyer service: lawyers as participants (DOMAIN.md, "Lawyers are
//! participants too"). Lawyers are too many for a broker queue each, so one
//! agency of the bus, `lawyer-service`, keeps every registered lawyer's
//! inbox behind it and submits for lawyers what they submit, signed as
//! itself with `from_lawyer` naming the lawyer.
//!
//! - Its broker inbox queue carries registrations (from the bar association
//!   or justice bureau of the lawyer's region, [`registration`]) and
//!   everything addressed to lawyers by licence number (`to_lawyers`):
//!   [`consumer`] checks each signature as an agency's `Inbox` does, applies
//!   or files it in the lawyers' inboxes ([`store`], SQLite) and acks it to
//!   the broker only once that is committed.
//! - `LawyerService` ([`service`]) authenticates the lawyer ([`auth`]) on
//!   every call, streams the lawyer's own inbox with the guarantees of an
//!   agency's ([`streams`]: at least once, each delivery acknowledged,
//!   never handed over again once acknowledged) and submits meeting
//!   requests (CQ-1.3a, checked against CQ-1.2), rights complaints
//!   (CQ-3.13) and meeting ratings (CQ-3.11b) through
//!   [`GatewayCore::submit`], so that the core's validation runs.
//! - `LawyerRegistry` answers anyone with a lawyer's public entry and the
//!   registration as its registrar signed it.
//!
//! Letters reach the lawyer sealed to their keys (CQ-1.1c): this service
//! stores and hands over the envelope as it arrived and never reads it.

pub mod auth;
pub mod consumer;
pub mod registration;
pub mod service;
pub mod store;
pub mod streams;

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use prost::Message;
use refbus_core::envelope::{self, timestamp};
use refbus_core::lawyer::check_licence;
use refbus_core::{AgencyKind, KindExt, MessageKind, SubmitError};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{
    Envelope, FileComplaintRequest, Hop, Lawyer, LawyerAcknowledgeRequest, LawyerDelivery,
    LawyerEntry, LawyerRegistration, LawyerStatus, MeetingRating, Outcome, RateMeetingRequest,
    Receipt, RequestMeetingRequest, RightsComplaint,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use crate::{GatewayCore, GatewayError};
use auth::Credential;
use store::{LawyerRecord, LawyerStore, StoreError};
use streams::Streams;

/// The window of a lawyer's `Inbox` stream that asks for none.
pub const DEFAULT_WINDOW: usize = crate::gateway::DEFAULT_WINDOW as usize;
/// The largest window a lawyer's stream gets.
pub const MAX_WINDOW: usize = 500;
/// The longest idempotency key a lawyer may give (the service prefixes it
/// with the licence number, within the bus's limit).
pub const MAX_LAWYER_KEY: usize = 150;

/// Everything a lawyer-service call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LawyerError {
    /// Validation, publishing, a delivery token not pending: as the gateway's.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// No credential, or a malformed one.
    #[error("{0}")]
    Unauthenticated(String),
    /// Not registered, suspended, or acting for another lawyer.
    #[error("{0}")]
    Denied(String),
    /// Nobody registered this licence.
    #[error("{0}")]
    NotFound(String),
    /// A rule of DOMAIN.md is not met yet (e.g. CQ-3.11b: no held meeting).
    #[error("{rule}: {reason}")]
    Precondition { rule: &'static str, reason: String },
    /// The service's own state could not be read or written.
    #[error("the lawyer service's state is unavailable ({0}); nothing was changed: try again")]
    Store(String),
}

impl From<SubmitError> for LawyerError {
    fn from(e: SubmitError) -> Self {
        LawyerError::Gateway(GatewayError::Submit(e))
    }
}

impl From<sqlx::Error> for LawyerError {
    fn from(e: sqlx::Error) -> Self {
        LawyerError::Store(e.to_string())
    }
}

impl From<LawyerError> for Status {
    fn from(error: LawyerError) -> Self {
        let message = error.to_string();
        match error {
            LawyerError::Gateway(e) => Status::from(e),
            LawyerError::Unauthenticated(_) => Status::unauthenticated(message),
            LawyerError::Denied(_) => Status::permission_denied(message),
            LawyerError::NotFound(_) => Status::not_found(message),
            LawyerError::Precondition { .. } => Status::failed_precondition(message),
            LawyerError::Store(_) => Status::unavailable(message),
        }
    }
}

/// Why the lawyer service could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the lawyer service acts for exactly one lawyer_service agency, not: {0}")]
    Agencies(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the lawyer service needs: the gateway core it submits through, its
/// store and its open streams.
pub struct LawyerCore {
    pub core: Arc<GatewayCore>,
    /// The lawyer service's agency id (`lawyer-service`).
    pub agency: String,
    pub store: LawyerStore,
    pub streams: Arc<Streams>,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn lawyer_of(record: &LawyerRecord) -> Lawyer {
    Lawyer {
        name: record.name.clone(),
        licence_number: record.licence.clone(),
        law_firm: record.law_firm.clone(),
    }
}

fn suspended(record: &LawyerRecord) -> Option<LawyerError> {
    (record.status != LawyerStatus::Active as i32).then(|| {
        LawyerError::Denied(format!(
            "lawyer `{}` is suspended (by `{}`): {}",
            record.licence,
            record.status_by,
            if record.status_reason.is_empty() {
                "no reason given"
            } else {
                &record.status_reason
            }
        ))
    })
}

impl LawyerCore {
    /// Opens the lawyer service's store beside `inbox_db` for the one
    /// lawyer_service agency `core` serves.
    ///
    /// # Errors
    /// [`OpenError`].
    pub async fn open(core: Arc<GatewayCore>, inbox_db: &Path) -> Result<Arc<Self>, OpenError> {
        let agency = match core.served.iter().collect::<Vec<_>>().as_slice() {
            [one] => (*one).clone(),
            other => {
                return Err(OpenError::Agencies(if other.is_empty() {
                    "none in the directory".into()
                } else {
                    other
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }));
            }
        };
        let store = LawyerStore::open(&store::path_beside(inbox_db)).await?;
        Ok(Arc::new(Self {
            core,
            agency,
            store,
            streams: Arc::new(Streams::default()),
        }))
    }

    /// The registered, active lawyer `licence` (the value of `field`), if
    /// the request's credential is theirs.
    ///
    /// # Errors
    /// UNAUTHENTICATED without a credential; INVALID_ARGUMENT for a
    /// malformed licence; PERMISSION_DENIED naming the licence when it is
    /// not registered, the credential is not that lawyer's (another
    /// lawyer's included) or the lawyer is suspended.
    pub async fn authenticate<T>(
        &self,
        request: &Request<T>,
        field: &'static str,
        licence: &str,
    ) -> Result<(LawyerRecord, Credential), LawyerError> {
        let credential = auth::credential_of(request)?;
        check_licence(field, licence)?;
        let record = self.store.lawyer(licence).await?;
        let own = match &credential {
            Credential::Token(digest) => match &record {
                Some(r) if r.token_sha256 == *digest => None,
                _ => Some(self.store.licence_of_token(digest).await?),
            },
            Credential::Certificate(named) if named == licence => None,
            Credential::Certificate(named) => Some(Some(named.clone())),
        };
        let record = match (own, record) {
            (None, Some(record)) => record,
            (Some(Some(other)), _) if other != licence => {
                return Err(LawyerError::Denied(format!(
                    "{field}: the caller is lawyer `{other}` and acts only for themselves, not for lawyer `{licence}`"
                )));
            }
            (_, None) => {
                return Err(LawyerError::Denied(format!(
                    "lawyer `{licence}` is not registered: a lawyer is registered by the bar association or justice bureau of their region"
                )));
            }
            (Some(_), Some(_)) => {
                return Err(LawyerError::Denied(format!(
                    "lawyer `{licence}`: the credential shown is not that lawyer's (the token issued at registration, or a certificate naming `{}{licence}`)",
                    auth::LAWYER_URI_PREFIX
                )));
            }
        };
        if let Some(denied) = suspended(&record) {
            return Err(denied);
        }
        Ok((record, credential))
    }

    /// `licence`'s idempotency key, namespaced so that two lawyers' keys
    /// never give the same envelope id.
    fn key(licence: &str, key: &str) -> Result<String, LawyerError> {
        if key.is_empty() {
            return Err(SubmitError::invalid(
                "idempotency_key",
                "required: a retried call carries the same key and so gets the same id",
            )
            .into());
        }
        if key.len() > MAX_LAWYER_KEY || key.contains('\0') {
            return Err(SubmitError::invalid(
                "idempotency_key",
                format!("at most {MAX_LAWYER_KEY} bytes, no NUL"),
            )
            .into());
        }
        Ok(format!("lawyer/{licence}/{key}"))
    }

    /// Submits `payload` for `lawyer` to `recipient` through the gateway
    /// core, and remembers that the lawyer submitted it.
    async fn submit(
        &self,
        lawyer: &LawyerRecord,
        recipient: String,
        payload: Payload,
        key: &str,
    ) -> Result<Receipt, LawyerError> {
        let kind = MessageKind::of_payload(&payload);
        let receipt = self
            .core
            .submit(Envelope {
                sender: self.agency.clone(),
                recipient,
                from_lawyer: lawyer.licence.clone(),
                idempotency_key: Self::key(&lawyer.licence, key)?,
                payload: Some(payload),
                ..Envelope::default()
            })
            .await?;
        if let Err(e) = self
            .store
            .submitted(
                &lawyer.licence,
                &receipt.id,
                kind.code(),
                &receipt.recipient,
                now_ms(),
            )
            .await
        {
            tracing::warn!(error = %e, id = %receipt.id, "published, but not recorded as the lawyer's own submission");
        }
        Ok(receipt)
    }

    /// CQ-1.3a: a meeting request to a detention centre, the lawyer filled
    /// in from the register; CQ-1.2 is checked by the core before anything
    /// is published.
    ///
    /// # Errors
    /// INVALID_ARGUMENT (a missing credential names it and CQ-1.2),
    /// NOT_FOUND for an unknown centre; as [`GatewayCore::submit`].
    pub async fn request_meeting(
        &self,
        lawyer: &LawyerRecord,
        request: RequestMeetingRequest,
    ) -> Result<Receipt, LawyerError> {
        let Some(mut meeting) = request.meeting else {
            return Err(SubmitError::invalid("meeting", "required").into());
        };
        let centre = meeting.detention_centre.clone();
        if centre.is_empty() {
            return Err(SubmitError::invalid(
                "meeting.detention_centre",
                "required: the detention centre asked (agency id)",
            )
            .into());
        }
        let Some(agency) = self.core.directory.get(&centre) else {
            return Err(SubmitError::UnknownAgency {
                field: "meeting.detention_centre".into(),
                id: centre,
            }
            .into());
        };
        if agency.kind != AgencyKind::DetentionCentre {
            return Err(SubmitError::invalid(
                "meeting.detention_centre",
                format!("`{centre}` is a {}, not a detention centre", agency.kind),
            )
            .into());
        }
        if !meeting.case_unit.is_empty() && self.core.directory.get(&meeting.case_unit).is_none() {
            return Err(SubmitError::UnknownAgency {
                field: "meeting.case_unit".into(),
                id: meeting.case_unit,
            }
            .into());
        }
        meeting.lawyer = Some(lawyer_of(lawyer));
        self.submit(
            lawyer,
            centre,
            Payload::LawyerMeetingRequest(meeting),
            &request.idempotency_key,
        )
        .await
    }

    /// CQ-3.13: a rights complaint to the police, the justice bureau or the
    /// bar association, the complainant filled in from the register.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown body; as [`GatewayCore::submit`] (CQ-3.13
    /// names who takes complaints).
    pub async fn file_complaint(
        &self,
        lawyer: &LawyerRecord,
        request: FileComplaintRequest,
    ) -> Result<Receipt, LawyerError> {
        if request.investigated_by.is_empty() {
            return Err(SubmitError::invalid(
                "investigated_by",
                "required (CQ-3.13): a police unit, a justice bureau or a bar association",
            )
            .into());
        }
        for (field, id) in [
            ("investigated_by", &request.investigated_by),
            ("respondent", &request.respondent),
        ] {
            if !id.is_empty() && self.core.directory.get(id).is_none() {
                return Err(SubmitError::UnknownAgency {
                    field: field.into(),
                    id: id.clone(),
                }
                .into());
            }
        }
        self.submit(
            lawyer,
            request.investigated_by,
            Payload::RightsComplaint(RightsComplaint {
                complainant: Some(lawyer_of(lawyer)),
                respondent: request.respondent,
                description: request.description,
                hearing_requested: request.hearing_requested,
            }),
            &request.idempotency_key,
        )
        .await
    }

    /// CQ-3.11b: a rating of the lawyer's own meeting, once the centre's
    /// feedback recording it held reached the lawyer's inbox; to that centre.
    ///
    /// # Errors
    /// FAILED_PRECONDITION naming CQ-3.11b when the meeting is not the
    /// lawyer's or not recorded held; as [`GatewayCore::submit`].
    pub async fn rate_meeting(
        &self,
        lawyer: &LawyerRecord,
        request: RateMeetingRequest,
    ) -> Result<Receipt, LawyerError> {
        let id = request.meeting_request_id;
        envelope::check_referral_id("meeting_request_id", &id)?;
        let own = self.store.submission(&lawyer.licence, &id).await?;
        if own.is_none_or(|(kind, _)| kind != MessageKind::LawyerMeetingRequest.code()) {
            return Err(LawyerError::Precondition {
                rule: "CQ-3.11b",
                reason: format!(
                    "`{id}` is not a meeting request lawyer `{}` made: a lawyer rates their own meetings",
                    lawyer.licence
                ),
            });
        }
        let held_by = self
            .store
            .replies_to(&lawyer.licence, &id)
            .await?
            .into_iter()
            .filter_map(|bytes| Envelope::decode(bytes.as_slice()).ok())
            .find_map(|reply| match reply.payload {
                Some(Payload::Feedback(f)) if f.outcome == Outcome::Held as i32 => {
                    Some(reply.sender)
                }
                _ => None,
            });
        let Some(centre) = held_by else {
            return Err(LawyerError::Precondition {
                rule: "CQ-3.11b",
                reason: format!(
                    "no record that meeting `{id}` was held has reached lawyer `{}`'s inbox: a meeting is rated once its centre recorded it held",
                    lawyer.licence
                ),
            });
        };
        let key = if request.idempotency_key.is_empty() {
            format!("rating/{id}")
        } else {
            request.idempotency_key
        };
        self.submit(
            lawyer,
            centre,
            Payload::MeetingRating(MeetingRating {
                meeting_request_id: id,
                score: request.score,
                comment: request.comment,
            }),
            &key,
        )
        .await
    }

    /// Whether the lawyer a stream was opened for may still read it: still
    /// registered with the same credential, and not suspended.
    async fn still_entitled(&self, licence: &str, credential: &Credential) -> Result<(), Status> {
        let record = self
            .store
            .lawyer(licence)
            .await
            .map_err(|e| Status::from(LawyerError::from(e)))?;
        let Some(record) = record else {
            return Err(Status::permission_denied(format!(
                "lawyer `{licence}` is not registered"
            )));
        };
        if let Credential::Token(digest) = credential
            && record.token_sha256 != *digest
        {
            return Err(Status::permission_denied(format!(
                "lawyer `{licence}`: registered again with a new token; the stream's token is no longer theirs"
            )));
        }
        match suspended(&record) {
            Some(denied) => Err(denied.into()),
            None => Ok(()),
        }
    }

    /// Streams `licence`'s inbox, oldest first, at most `window`
    /// deliveries unacknowledged, new ones as they arrive, until the client
    /// goes away, the service shuts down or the lawyer is suspended; what
    /// is unacknowledged then comes again on the next stream.
    #[must_use]
    pub fn inbox(
        self: &Arc<Self>,
        licence: String,
        credential: Credential,
        window: u32,
    ) -> ReceiverStream<Result<LawyerDelivery, Status>> {
        let window = match usize::try_from(window) {
            Ok(0) => DEFAULT_WINDOW,
            Ok(w) => w.min(MAX_WINDOW),
            Err(_) => MAX_WINDOW,
        };
        // A slot for each delivery the window allows, as an agency's
        // `Inbox` has (`GatewayCore::inbox`): what is held for the stream
        // never exceeds the window, and what is ready goes out in one frame.
        let (tx, rx) = mpsc::channel(window);
        let this = self.clone();
        tokio::spawn(async move {
            let shutdown = this.core.shutdown.clone();
            let (guard, notify) = this.streams.open(&licence);
            tracing::debug!(session = guard.id, window, "lawyer inbox stream opened");
            'stream: loop {
                let notified = notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Err(status) = this.still_entitled(&licence, &credential).await {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                let room = window.saturating_sub(this.streams.outstanding(guard.id));
                let mut handed = 0;
                if room > 0 {
                    let limit = room + this.streams.held_of(&licence);
                    let open = match this.store.open_deliveries(&licence, limit).await {
                        Ok(open) => open,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read a lawyer's inbox; trying again");
                            tokio::select! {
                                () = shutdown.cancelled() => break,
                                () = tx.closed() => break,
                                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                            }
                        }
                    };
                    for delivery in open {
                        if handed == room {
                            break;
                        }
                        let Some(token) = this.streams.hold(
                            guard.id,
                            &delivery.envelope_id,
                            &delivery.referral,
                            &delivery.kind,
                        ) else {
                            continue;
                        };
                        let Ok(envelope) = Envelope::decode(delivery.envelope.as_slice()) else {
                            // Stored only after it decoded: not reached.
                            this.streams.release(&token);
                            continue;
                        };
                        // Read before an acknowledgement of it (on an
                        // earlier stream) landed: not handed over again.
                        match this
                            .store
                            .handed(&licence, &delivery.envelope_id, now_ms())
                            .await
                        {
                            Ok(true) => {}
                            Ok(false) => {
                                this.streams.release(&token);
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "hand-over time not recorded; handing over");
                            }
                        }
                        let submitted_at = envelope
                            .submitted_at
                            .as_ref()
                            .and_then(envelope::from_timestamp);
                        let message = LawyerDelivery {
                            delivery_token: token.clone(),
                            envelope: Some(envelope),
                            redelivered: delivery.handed_before,
                        };
                        let sent = tokio::select! {
                            () = shutdown.cancelled() => false,
                            sent = tx.send(Ok(message)) => sent.is_ok(),
                        };
                        if !sent {
                            this.streams.release(&token);
                            break 'stream;
                        }
                        this.core.metrics.handed_over(submitted_at);
                        handed += 1;
                    }
                }
                if handed > 0 {
                    continue;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    () = &mut notified => {}
                }
            }
            tracing::debug!(session = guard.id, "lawyer inbox stream closed");
            drop(guard);
        });
        ReceiverStream::new(rx)
    }

    /// Acknowledges deliveries handed to `licence` on an open stream:
    /// recorded on disk first (never handed over again), then the hops
    /// `delivered` (at the hand-over) and `acknowledged` are reported for
    /// the lawyer service. Returns the tokens of a multi-token call that
    /// were not pending.
    ///
    /// # Errors
    /// FAILED_PRECONDITION for a single token not pending on an open stream
    /// of this lawyer; INVALID_ARGUMENT without a token; UNAVAILABLE when
    /// the acknowledgement cannot be recorded (the deliveries stay pending).
    pub async fn acknowledge(
        &self,
        licence: &str,
        request: LawyerAcknowledgeRequest,
    ) -> Result<Vec<String>, LawyerError> {
        let mut tokens = request.delivery_tokens;
        if !request.delivery_token.is_empty() {
            tokens.insert(0, request.delivery_token);
        }
        let gone = |token: &str| {
            let shown: String = token.chars().take(80).collect();
            LawyerError::Gateway(GatewayError::DeliveryGone(format!(
                "`{shown}` is not pending on an open Inbox stream of lawyer `{licence}`: already acknowledged, or its stream ended (it comes again on the next)"
            )))
        };
        let mut taken = Vec::with_capacity(tokens.len());
        let mut not_pending = Vec::new();
        match tokens.as_slice() {
            [] => {
                return Err(SubmitError::invalid(
                    "delivery_token",
                    "required: the token of a delivery handed over on the Inbox stream",
                )
                .into());
            }
            [token] => taken.push(
                self.streams
                    .take(licence, token)
                    .map(|p| (token.clone(), p))
                    .ok_or_else(|| gone(token))?,
            ),
            _ => {
                for token in tokens {
                    match self.streams.take(licence, &token) {
                        Some(p) => taken.push((token, p)),
                        None => not_pending.push(token),
                    }
                }
            }
        }
        let taken_tokens: Vec<String> = taken.iter().map(|(t, _)| t.clone()).collect();
        let ids: Vec<String> = taken.iter().map(|(_, p)| p.envelope_id.clone()).collect();
        if let Err(e) = self.store.acknowledge(licence, &ids, now_ms()).await {
            self.streams.undo(&taken_tokens);
            return Err(LawyerError::Store(format!(
                "{e}; the deliveries stay pending: acknowledge them again"
            )));
        }
        self.streams.done(&taken_tokens);
        self.core.metrics.acknowledged.inc_by(taken.len() as u64);
        let now = Utc::now();
        for (_, pending) in taken {
            self.core.metrics.delivered(&pending.kind);
            self.core.report_hop(
                pending.referral.clone(),
                Hop::Delivered,
                self.agency.clone(),
                pending.handed_at,
            );
            self.core.report_hop(
                pending.referral,
                Hop::Acknowledged,
                self.agency.clone(),
                now,
            );
        }
        Ok(not_pending)
    }

    /// The public entry of `licence`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a malformed licence; NOT_FOUND for one nobody
    /// registered.
    pub async fn entry(&self, licence: &str) -> Result<LawyerEntry, LawyerError> {
        check_licence("licence_number", licence)?;
        let Some(record) = self.store.lawyer(licence).await? else {
            return Err(LawyerError::NotFound(format!(
                "licence_number: no lawyer `{licence}` is registered"
            )));
        };
        let signed = Envelope::decode(record.registration.as_slice()).ok();
        let mut registration = match signed.and_then(|e| e.payload) {
            Some(Payload::LawyerRegistration(r)) => r,
            _ => LawyerRegistration::default(),
        };
        registration.lawyer = Some(lawyer_of(&record));
        registration.region.clone_from(&record.region);
        registration.letter_keys.clone_from(&record.letter_keys);
        registration.status = record.status;
        registration.reason.clone_from(&record.status_reason);
        // The register shows no credential, not even its digest.
        registration.token_sha256.clear();
        Ok(LawyerEntry {
            registration: Some(registration),
            registered_by: record.registered_by,
            signed_registration: record.registration,
            signature: record.signature,
            updated_at: chrono::DateTime::from_timestamp_millis(record.updated_at_ms)
                .map(timestamp),
        })
    }
}
