//! Envelope ids and the validation of a submission: everything the gateway
//! checks before it publishes, so that bad input is refused with a message
//! naming the field or the rule, and nothing is published.

use chrono::{DateTime, Duration, Utc};
use prost::Message;
use refbus_proto::v1::{Envelope, MessageKind, envelope::Payload, letter::Disposition};
use uuid::Uuid;

use crate::directory::{Agency, Directory};
use crate::kind::KindExt;
use crate::lead::{self, LeadError};
use crate::routing::NoRoute;
use crate::rules::{self, RuleViolation};

/// The largest envelope the bus accepts, encoded.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// The longest agency id accepted in an envelope field (the directory's
/// ids are far shorter; the limit keeps a hostile value out of indexes).
pub const MAX_AGENCY_ID: usize = 128;

/// How a sealed letter begins: the age format's header line.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// How far in the future a clock start may lie (clock skew between agencies).
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Namespace of envelope ids (UUIDv5 over sender and idempotency key).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1b_3c2e_9a4d_4e57_b0c1_72f3_a8d6_e915);

/// Why a submission is refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A required field is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// An agency id names no agency in the directory.
    #[error("{field}: `{id}` is not in the agency directory")]
    UnknownAgency { field: String, id: String },
    /// The caller may not act as this agency.
    #[error("{field}: `{agency}` is not one of this service's agencies ({served})")]
    NotOwnAgency {
        field: String,
        agency: String,
        served: String,
    },
    /// A rule of DOMAIN.md forbids the message.
    #[error(transparent)]
    Forbidden(#[from] RuleViolation),
    /// The envelope is over [`MAX_ENVELOPE_BYTES`].
    #[error("envelope: {size} bytes is over the 1 MiB limit")]
    TooLarge { size: usize },
    /// The rules give no recipient for this message.
    #[error(transparent)]
    NoRoute(#[from] NoRoute),
    /// A misconduct lead's route (DZ-7, DZ-8): none in the statute and none
    /// named, or a named or relayed route that is wrong.
    #[error(transparent)]
    Lead(#[from] LeadError),
}

impl SubmitError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SubmitError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The id of the message `sender` submits under `idempotency_key`: the same
/// pair always gives the same id.
#[must_use]
pub fn envelope_id(sender: &str, idempotency_key: &str) -> String {
    let mut name = Vec::with_capacity(sender.len() + idempotency_key.len() + 1);
    name.extend_from_slice(sender.as_bytes());
    name.push(0x1f);
    name.extend_from_slice(idempotency_key.as_bytes());
    Uuid::new_v5(&ID_NAMESPACE, &name).to_string()
}

/// The id of a hop report: the same referral, hop and agency always give the
/// same id, so a repeated report (a redelivery) is recognised.
#[must_use]
pub fn hop_report_id(referral_id: &str, hop: &str, agency: &str) -> String {
    let name = format!("hop\u{1f}{referral_id}\u{1f}{hop}\u{1f}{agency}");
    Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).to_string()
}

/// The AMQP message id of a batch of hop reports, derived from its hops'
/// ids. The tracker chains the batch's new hops in one ledger event under
/// this id, and keeps each hop's own id in its row of `hops`.
#[must_use]
pub fn hop_batch_id<'a>(hop_ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut name = String::from("hop-batch");
    for id in hop_ids {
        name.push('\u{1f}');
        name.push_str(id);
    }
    Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).to_string()
}

/// The id of the forgery alert about the refused bytes whose SHA-256 is
/// `body_sha256`, reached at `addressed_to`: the recipient's service and the
/// tracker, refusing the same message, raise the same alert.
#[must_use]
pub fn forgery_alert_id(body_sha256: &str, addressed_to: &str) -> String {
    let name = format!("forgery\u{1f}{body_sha256}\u{1f}{addressed_to}");
    Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).to_string()
}

/// Converts a chrono time to a protobuf timestamp.
#[must_use]
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf timestamp to a chrono time, if it is in range.
#[must_use]
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// A submission that passed every check, ready to publish.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub envelope: Envelope,
    pub kind: MessageKind,
}

/// Validates a submitted envelope against the directory and the rules, and
/// fills in what the bus owns: id, kind, submission time and (when absent)
/// the clock start. `sender_is_own` says whether the caller may act as the
/// sender.
///
/// # Errors
/// [`SubmitError`] naming the first field or rule at fault.
pub fn accept(
    mut envelope: Envelope,
    directory: &Directory,
    sender_is_own: impl Fn(&str) -> bool,
    served: &str,
    now: DateTime<Utc>,
) -> Result<Accepted, SubmitError> {
    let Some(payload) = envelope.payload.as_ref() else {
        return Err(SubmitError::invalid(
            "envelope.payload",
            "required: one of the message kinds",
        ));
    };
    let kind = MessageKind::of_payload(payload);
    if envelope.kind != MessageKind::Unspecified as i32 && envelope.kind != kind as i32 {
        let given = MessageKind::try_from(envelope.kind).map_or("unknown", KindExt::code);
        return Err(SubmitError::invalid(
            "envelope.kind",
            format!(
                "`{given}` does not match the payload, which is a {}",
                kind.code()
            ),
        ));
    }
    required(&envelope.sender, "envelope.sender")?;
    if !sender_is_own(&envelope.sender) {
        return Err(SubmitError::NotOwnAgency {
            field: "envelope.sender".into(),
            agency: envelope.sender.clone(),
            served: served.into(),
        });
    }
    route_lead(&mut envelope, directory)?;
    required(&envelope.recipient, "envelope.recipient")?;
    required(&envelope.idempotency_key, "envelope.idempotency_key")?;
    if envelope.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(SubmitError::invalid(
            "envelope.idempotency_key",
            format!("longer than {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    if envelope.idempotency_key.contains('\0') {
        return Err(SubmitError::invalid(
            "envelope.idempotency_key",
            "contains a NUL byte",
        ));
    }
    if kind.is_reply() {
        required(&envelope.in_reply_to, "envelope.in_reply_to")?;
    }
    if !envelope.in_reply_to.is_empty() {
        check_referral_id("envelope.in_reply_to", &envelope.in_reply_to)?;
    }
    if !envelope.relay_of.is_empty() {
        check_referral_id("envelope.relay_of", &envelope.relay_of)?;
    }
    if let Some(clock) = &envelope.clock_started_at {
        let at = from_timestamp(clock)
            .ok_or_else(|| SubmitError::invalid("envelope.clock_started_at", "out of range"))?;
        if at > now + CLOCK_SKEW {
            return Err(SubmitError::invalid(
                "envelope.clock_started_at",
                "lies in the future",
            ));
        }
    }
    if let Some(payload) = envelope.payload.as_ref() {
        validate_payload(payload, &envelope)?;
    }

    let sender = agency(directory, &envelope.sender, "envelope.sender")?;
    let recipient = agency(directory, &envelope.recipient, "envelope.recipient")?;
    rules::check(kind, sender, recipient)?;
    if !envelope.relay_of.is_empty() && kind != MessageKind::MisconductLead {
        return Err(SubmitError::invalid(
            "envelope.relay_of",
            "DZ-7: only a misconduct lead is relayed",
        ));
    }
    check_also_to(&envelope, kind, sender, directory)?;
    check_lawyers(&envelope, kind, sender, recipient)?;

    envelope.id = envelope_id(&envelope.sender, &envelope.idempotency_key);
    envelope.kind = kind as i32;
    envelope.submitted_at = Some(timestamp(now));
    if envelope.clock_started_at.is_none() {
        envelope.clock_started_at = envelope.submitted_at;
    }
    let size = envelope.encoded_len();
    if size > MAX_ENVELOPE_BYTES {
        return Err(SubmitError::TooLarge { size });
    }
    Ok(Accepted { envelope, kind })
}

/// Checks that `value` is a well-formed referral id: the canonical text of
/// a UUID (36 characters, lower-case hex with hyphens), as the bus derives
/// every envelope id. Anything else (a NUL byte, a 3 KB string, another
/// spelling of the same UUID) is refused before it reaches a queue or an
/// index, by the gateway and by the tracker alike.
///
/// # Errors
/// [`SubmitError::Invalid`] naming `field`.
pub fn check_referral_id(field: &str, value: &str) -> Result<(), SubmitError> {
    let canonical = value.len() == 36
        && Uuid::try_parse(value).is_ok_and(|id| id.hyphenated().to_string() == value);
    if canonical {
        return Ok(());
    }
    let shown: String = value
        .chars()
        .take(40)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    Err(SubmitError::invalid(
        field,
        format!(
            "not a referral id (the 36-character UUID the bus gave the referral): `{shown}`{} ({} bytes)",
            if value.chars().count() > 40 {
                "…"
            } else {
                ""
            },
            value.len()
        ),
    ))
}

/// Checks that an agency id taken from a message is one a ledger can
/// index: not empty, at most [`MAX_AGENCY_ID`] bytes, no control character.
///
/// # Errors
/// [`SubmitError::Invalid`] naming `field`.
pub fn check_agency_id(field: &str, value: &str) -> Result<(), SubmitError> {
    if value.is_empty() {
        return Err(SubmitError::invalid(field, "required"));
    }
    if value.len() > MAX_AGENCY_ID {
        return Err(SubmitError::invalid(
            field,
            format!(
                "{} bytes is over the {MAX_AGENCY_ID}-byte limit of an agency id",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(SubmitError::invalid(field, "contains a control character"));
    }
    Ok(())
}

/// The id the tracker files a message under: a relayed lead's original id,
/// else the message's own.
#[must_use]
pub fn tracking_id(envelope: &Envelope) -> &str {
    if envelope.relay_of.is_empty() {
        &envelope.id
    } else {
        &envelope.relay_of
    }
}

/// DZ-7, DZ-8: a new lead gets its route (statutory, or the one a person
/// named where the statute gives none) and its first hop as recipient; a
/// relayed lead must come from a relay on its route and go to the next hop.
fn route_lead(envelope: &mut Envelope, directory: &Directory) -> Result<(), SubmitError> {
    let sender = envelope.sender.clone();
    let relayed = !envelope.relay_of.is_empty();
    let Some(Payload::MisconductLead(lead)) = envelope.payload.as_mut() else {
        return Ok(());
    };
    if relayed {
        let Some(at) = lead.route.iter().position(|hop| hop.agency == sender) else {
            return Err(RuleViolation {
                rule: "DZ-7",
                reason: format!(
                    "`{sender}` is not on the lead's route: only the next hop relays it"
                ),
            }
            .into());
        };
        let Some(next) = lead.route.get(at + 1) else {
            return Err(RuleViolation {
                rule: "DZ-8",
                reason: format!(
                    "`{sender}` handles the lead: it feeds the result back to the finder, it does not relay"
                ),
            }
            .into());
        };
        if envelope.recipient.is_empty() {
            envelope.recipient.clone_from(&next.agency);
        } else if envelope.recipient != next.agency {
            return Err(RuleViolation {
                rule: "DZ-7",
                reason: format!(
                    "`{sender}` passes the lead to `{}`, the next hop of its route, not to `{}`",
                    next.agency, envelope.recipient
                ),
            }
            .into());
        }
        return Ok(());
    }
    if !lead.found_by.is_empty() && lead.found_by != sender {
        return Err(SubmitError::invalid(
            "misconduct_lead.found_by",
            "DZ-8: the finder is the sender of a new lead",
        ));
    }
    let organ;
    let subject = match &lead.subject {
        Some(refbus_proto::v1::misconduct_lead::Subject::Officer(officer)) => {
            required(&officer.organ, "misconduct_lead.officer.organ")?;
            organ = officer.organ.clone();
            lead::Subject::Officer { organ: &organ }
        }
        Some(refbus_proto::v1::misconduct_lead::Subject::Lawyer(_)) => lead::Subject::Lawyer,
        None => return Err(SubmitError::invalid("misconduct_lead.subject", "required")),
    };
    let (route, chosen) = lead::resolve_route(directory, &sender, &subject, &lead.route)?;
    let first = route.first().agency.clone();
    if !envelope.recipient.is_empty() && envelope.recipient != first {
        return Err(LeadError::Invalid {
            rule: route.rule,
            reason: format!(
                "the lead's route starts at `{first}`, not at `{}`",
                envelope.recipient
            ),
        }
        .into());
    }
    envelope.recipient = first;
    lead.found_by = sender;
    lead.route_chosen_by_person = chosen;
    lead.route_rule = route.rule.to_owned();
    lead.route = route.hops;
    Ok(())
}

/// CQ-3.15: the further recipients of a joint notice, each one the rules
/// allow, none twice. No other kind is submitted with further recipients.
fn check_also_to(
    envelope: &Envelope,
    kind: MessageKind,
    sender: &Agency,
    directory: &Directory,
) -> Result<(), SubmitError> {
    if envelope.also_to.is_empty() {
        return Ok(());
    }
    if kind != MessageKind::JointNotice {
        return Err(SubmitError::invalid(
            "envelope.also_to",
            format!(
                "only a joint notice (CQ-3.15) has further recipients, not a {}",
                kind.code()
            ),
        ));
    }
    let mut seen = vec![envelope.recipient.as_str()];
    for (i, id) in envelope.also_to.iter().enumerate() {
        let field = format!("envelope.also_to[{i}]");
        if seen.contains(&id.as_str()) {
            return Err(SubmitError::invalid(
                field,
                format!("`{id}` is named twice"),
            ));
        }
        seen.push(id);
        let recipient = agency(directory, id, &field)?;
        rules::check(kind, sender, recipient)?;
    }
    Ok(())
}

/// Lawyers are reached and heard through the lawyer service (DOMAIN.md,
/// "Lawyers are participants too"): `to_lawyers` names registered licence
/// numbers and only on a message to the lawyer service, which gets one on
/// everything but a registry entry; `from_lawyer` only on a message from
/// it, which always names its lawyer.
fn check_lawyers(
    envelope: &Envelope,
    kind: MessageKind,
    sender: &Agency,
    recipient: &Agency,
) -> Result<(), SubmitError> {
    use crate::agency::AgencyKind::LawyerService;
    for (i, licence) in envelope.to_lawyers.iter().enumerate() {
        crate::lawyer::check_licence(&format!("envelope.to_lawyers[{i}]"), licence)?;
        if envelope.to_lawyers[..i].contains(licence) {
            return Err(SubmitError::invalid(
                format!("envelope.to_lawyers[{i}]"),
                format!("`{licence}` is named twice"),
            ));
        }
    }
    if recipient.kind == LawyerService {
        if envelope.to_lawyers.is_empty() && kind != MessageKind::LawyerRegistration {
            return Err(SubmitError::invalid(
                "envelope.to_lawyers",
                "required: a message to the lawyer service names the lawyers it is for, by licence number",
            ));
        }
    } else if !envelope.to_lawyers.is_empty() {
        return Err(SubmitError::invalid(
            "envelope.to_lawyers",
            format!(
                "only a message to the lawyer service is addressed to lawyers; `{}` is a {}",
                recipient.id, recipient.kind
            ),
        ));
    }
    if sender.kind == LawyerService {
        crate::lawyer::check_licence("envelope.from_lawyer", &envelope.from_lawyer)?;
    } else if !envelope.from_lawyer.is_empty() {
        return Err(SubmitError::invalid(
            "envelope.from_lawyer",
            "set only by the lawyer service, for the lawyer it authenticated",
        ));
    }
    if let Some(Payload::Letter(letter)) = &envelope.payload {
        let licence = letter
            .addressee
            .as_ref()
            .map_or("", |l| l.licence_number.as_str());
        if envelope.to_lawyers.len() != 1 || envelope.to_lawyers[0] != licence {
            return Err(SubmitError::invalid(
                "envelope.to_lawyers",
                "CQ-1.1c: a letter goes to its addressee alone: to_lawyers is [letter.addressee.licence_number]",
            ));
        }
    }
    Ok(())
}

fn agency<'d>(directory: &'d Directory, id: &str, field: &str) -> Result<&'d Agency, SubmitError> {
    directory.get(id).ok_or_else(|| SubmitError::UnknownAgency {
        field: field.into(),
        id: id.into(),
    })
}

fn required(value: &str, field: &str) -> Result<(), SubmitError> {
    if value.trim().is_empty() {
        Err(SubmitError::invalid(field, "required"))
    } else {
        Ok(())
    }
}

fn present<T>(value: Option<&T>, field: &str) -> Result<(), SubmitError> {
    value
        .map(|_| ())
        .ok_or_else(|| SubmitError::invalid(field, "required"))
}

/// Checks the fields each kind of payload needs.
fn validate_payload(payload: &Payload, envelope: &Envelope) -> Result<(), SubmitError> {
    let detainee =
        |d: Option<&refbus_proto::v1::Detainee>, field: &str| -> Result<(), SubmitError> {
            let d = d.ok_or_else(|| SubmitError::invalid(field, "required"))?;
            required(&d.name, &format!("{field}.name"))
        };
    let lawyer = |l: Option<&refbus_proto::v1::Lawyer>, field: &str| -> Result<(), SubmitError> {
        let l = l.ok_or_else(|| SubmitError::invalid(field, "required"))?;
        required(&l.name, &format!("{field}.name"))
    };
    match payload {
        Payload::LegalHelpRequest(p) => {
            detainee(p.detainee.as_ref(), "legal_help_request.detainee")?;
            required(&p.matter, "legal_help_request.matter")?;
            if envelope.clock_started_at.is_none() {
                return Err(SubmitError::invalid(
                    "envelope.clock_started_at",
                    "CQ-1.1b: required for a legal-help request: the 24 h clock starts when the detainee made the request",
                ));
            }
            if !p.detention_centre.is_empty() && p.detention_centre != envelope.sender {
                return Err(SubmitError::invalid(
                    "legal_help_request.detention_centre",
                    "must be the sending detention centre",
                ));
            }
        }
        Payload::DefenceCommissionRequest(p) => {
            detainee(p.detainee.as_ref(), "defence_commission_request.detainee")?;
        }
        Payload::LegalAidApplication(p) => {
            detainee(p.detainee.as_ref(), "legal_aid_application.detainee")?;
        }
        Payload::Letter(p) => {
            detainee(p.detainee.as_ref(), "letter.detainee")?;
            let addressee = p
                .addressee
                .as_ref()
                .ok_or_else(|| SubmitError::invalid("letter.addressee", "required"))?;
            crate::lawyer::check_licence(
                "letter.addressee.licence_number",
                &addressee.licence_number,
            )?;
            match &p.disposition {
                None => {
                    return Err(SubmitError::invalid(
                        "letter.disposition",
                        "required: content (sealed by the centre's service) or withheld_on",
                    ));
                }
                Some(Disposition::Content(_)) => {
                    return Err(SubmitError::invalid(
                        "letter.content",
                        "CQ-1.1c: a letter travels only sealed to its lawyer's keys; the centre's own service seals it, nothing publishes it readable",
                    ));
                }
                Some(Disposition::SealedContent(sealed)) if !sealed.starts_with(AGE_MAGIC) => {
                    return Err(SubmitError::invalid(
                        "letter.sealed_content",
                        "CQ-1.1c: not sealed in the age format (age-encryption.org/v1)",
                    ));
                }
                Some(Disposition::WithheldOn(ground))
                    if *ground <= 0
                        || refbus_proto::v1::WithholdingGround::try_from(*ground).is_err() =>
                {
                    return Err(SubmitError::invalid(
                        "letter.withheld_on",
                        "CQ-1.1c: a letter may be withheld only on national security, public safety, serious danger to a person, or collusion/destruction of evidence",
                    ));
                }
                Some(_) => {}
            }
        }
        Payload::LawyerMeetingRequest(p) => {
            lawyer(p.lawyer.as_ref(), "lawyer_meeting_request.lawyer")?;
            detainee(p.detainee.as_ref(), "lawyer_meeting_request.detainee")?;
            crate::lawyer::check_meeting_request(p)?;
            let licence = p.lawyer.as_ref().map_or("", |l| l.licence_number.as_str());
            if licence != envelope.from_lawyer {
                return Err(SubmitError::invalid(
                    "lawyer_meeting_request.lawyer.licence_number",
                    "must be the lawyer who asks (envelope.from_lawyer)",
                ));
            }
            if !p.detention_centre.is_empty() && p.detention_centre != envelope.recipient {
                return Err(SubmitError::invalid(
                    "lawyer_meeting_request.detention_centre",
                    "must be the recipient",
                ));
            }
        }
        Payload::InterrogationRequest(p) => {
            detainee(p.detainee.as_ref(), "interrogation_request.detainee")?;
        }
        Payload::VerificationQuery(p) => {
            detainee(p.detainee.as_ref(), "verification_query.detainee")?;
            required(&p.question, "verification_query.question")?;
            if !p.meeting_request_id.is_empty() {
                check_referral_id(
                    "verification_query.meeting_request_id",
                    &p.meeting_request_id,
                )?;
            }
        }
        Payload::LawyerRegistration(p) => {
            let l = p
                .lawyer
                .as_ref()
                .ok_or_else(|| SubmitError::invalid("lawyer_registration.lawyer", "required"))?;
            crate::lawyer::check_licence(
                "lawyer_registration.lawyer.licence_number",
                &l.licence_number,
            )?;
            required(&l.name, "lawyer_registration.lawyer.name")?;
            if p.status <= 0 || refbus_proto::v1::LawyerStatus::try_from(p.status).is_err() {
                return Err(SubmitError::invalid(
                    "lawyer_registration.status",
                    "required: active or suspended",
                ));
            }
        }
        Payload::MeetingRating(p) => {
            check_referral_id("meeting_rating.meeting_request_id", &p.meeting_request_id)?;
            if !(1..=5).contains(&p.score) {
                return Err(SubmitError::invalid(
                    "meeting_rating.score",
                    "CQ-3.11b: a score from 1 to 5",
                ));
            }
        }
        Payload::LawyerViolationNotice(p) => {
            lawyer(p.lawyer.as_ref(), "lawyer_violation_notice.lawyer")?;
            required(&p.description, "lawyer_violation_notice.description")?;
        }
        Payload::RightsComplaint(p) => {
            lawyer(p.complainant.as_ref(), "rights_complaint.complainant")?;
            required(&p.description, "rights_complaint.description")?;
            let licence = p
                .complainant
                .as_ref()
                .map_or("", |l| l.licence_number.as_str());
            if !envelope.from_lawyer.is_empty() && licence != envelope.from_lawyer {
                return Err(SubmitError::invalid(
                    "rights_complaint.complainant.licence_number",
                    "must be the lawyer who complains (envelope.from_lawyer)",
                ));
            }
        }
        Payload::MisconductLead(p) => {
            present(p.subject.as_ref(), "misconduct_lead.subject")?;
            required(&p.description, "misconduct_lead.description")?;
        }
        Payload::DetaineeUnavailableNotice(p) => {
            detainee(p.detainee.as_ref(), "detainee_unavailable_notice.detainee")?;
            if p.reason <= 0 {
                return Err(SubmitError::invalid(
                    "detainee_unavailable_notice.reason",
                    "required (SH-2.5)",
                ));
            }
        }
        Payload::BookedSlotNotice(p) => {
            lawyer(p.lawyer.as_ref(), "booked_slot_notice.lawyer")?;
            present(p.slot_start.as_ref(), "booked_slot_notice.slot_start")?;
        }
        Payload::Acknowledgement(_) => {}
        Payload::Feedback(p) => {
            if p.outcome <= 0 {
                return Err(SubmitError::invalid("feedback.outcome", "required"));
            }
            if let Some(refusal) = &p.refusal {
                if p.outcome != refbus_proto::v1::Outcome::Refused as i32 {
                    return Err(SubmitError::invalid(
                        "feedback.refusal",
                        "only with outcome refused (CQ-1.3a)",
                    ));
                }
                if refusal.reason <= 0
                    || refbus_proto::v1::RefusalReason::try_from(refusal.reason).is_err()
                {
                    return Err(SubmitError::invalid(
                        "feedback.refusal.reason",
                        "CQ-1.3a: a reason from the closed list (RefusalReason)",
                    ));
                }
                if !refusal.written_refusal.is_empty() {
                    return Err(SubmitError::invalid(
                        "feedback.refusal.written_refusal",
                        "CQ-1.3c: the written refusal travels only sealed to the lawyer's keys; the centre's own service seals it",
                    ));
                }
                if !refusal.sealed_written_refusal.is_empty()
                    && !refusal.sealed_written_refusal.starts_with(AGE_MAGIC)
                {
                    return Err(SubmitError::invalid(
                        "feedback.refusal.sealed_written_refusal",
                        "not sealed in the age format (age-encryption.org/v1)",
                    ));
                }
            }
        }
        Payload::OverdueNotice(_) | Payload::ForgeryAlert(_) => {}
        Payload::JointNotice(p) => {
            required(&p.subject, "joint_notice.subject")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use refbus_proto::v1::{Detainee, LegalHelpRequest};

    fn directory() -> Directory {
        crate::directory::shipped()
    }

    fn legal_help(key: &str) -> Envelope {
        Envelope {
            sender: "dz-detention-centre".into(),
            recipient: "dz-duty-desk".into(),
            idempotency_key: key.into(),
            clock_started_at: Some(timestamp(Utc::now() - Duration::hours(2))),
            payload: Some(Payload::LegalHelpRequest(LegalHelpRequest {
                detainee: Some(Detainee {
                    name: "张三".into(),
                    ..Default::default()
                }),
                detention_centre: "dz-detention-centre".into(),
                matter: "bail".into(),
            })),
            ..Default::default()
        }
    }

    fn accept_it(e: Envelope) -> Result<Accepted, SubmitError> {
        accept(e, &directory(), |_| true, "all", Utc::now())
    }

    #[test]
    fn the_same_sender_and_key_give_the_same_id() {
        assert_eq!(envelope_id("a", "k"), envelope_id("a", "k"));
        assert_ne!(envelope_id("a", "k"), envelope_id("b", "k"));
        assert_ne!(envelope_id("a", "bk"), envelope_id("ab", "k"));
        let one = accept_it(legal_help("k1")).unwrap();
        let two = accept_it(legal_help("k1")).unwrap();
        assert_eq!(one.envelope.id, two.envelope.id);
        assert_eq!(one.kind, MessageKind::LegalHelpRequest);
    }

    #[test]
    fn missing_fields_are_named() {
        let mut e = legal_help("k");
        e.idempotency_key.clear();
        assert_eq!(
            accept_it(e).unwrap_err().to_string(),
            "envelope.idempotency_key: required"
        );
        let mut e = legal_help("k");
        e.clock_started_at = None;
        assert!(accept_it(e).unwrap_err().to_string().contains("CQ-1.1b"));
        let mut e = legal_help("k");
        e.payload = None;
        assert!(
            accept_it(e)
                .unwrap_err()
                .to_string()
                .starts_with("envelope.payload")
        );
    }

    #[test]
    fn unknown_recipients_and_forbidden_kinds_are_refused() {
        let mut e = legal_help("k");
        e.recipient = "nowhere".into();
        assert!(matches!(
            accept_it(e).unwrap_err(),
            SubmitError::UnknownAgency { .. }
        ));
        let mut e = legal_help("k");
        e.recipient = "dz-court".into();
        assert!(matches!(
            accept_it(e).unwrap_err(),
            SubmitError::Forbidden(_)
        ));
    }

    #[test]
    fn reply_and_relay_ids_must_be_referral_ids() {
        let good = envelope_id("dz-detention-centre", "k");
        assert!(check_referral_id("f", &good).is_ok());
        for bad in [
            String::new(),
            format!("{good}\0"),
            "a".repeat(3 * 1024),
            good.to_uppercase(),
            good.replace('-', ""),
            format!("{{{good}}}"),
        ] {
            let e = check_referral_id("envelope.in_reply_to", &bad).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("envelope.in_reply_to: not a referral id"),
                "{e}"
            );
        }
        let mut e = legal_help("k");
        e.in_reply_to = format!("{good}\0");
        let err = accept_it(e).unwrap_err().to_string();
        assert!(err.contains("envelope.in_reply_to"), "{err}");
        let mut e = legal_help("k");
        e.relay_of = "x".repeat(3000);
        assert!(
            accept_it(e)
                .unwrap_err()
                .to_string()
                .contains("envelope.relay_of")
        );
        let mut e = legal_help("k\0");
        e.idempotency_key = "k\0".into();
        assert!(accept_it(e).unwrap_err().to_string().contains("NUL"));
        assert!(check_agency_id("a", &"x".repeat(129)).is_err());
        assert!(check_agency_id("a", "dz\0").is_err());
        assert!(check_agency_id("a", "dz-court").is_ok());
    }

    #[test]
    fn over_one_mib_is_refused() {
        let mut e = legal_help("k");
        if let Some(Payload::LegalHelpRequest(p)) = &mut e.payload {
            p.matter = "x".repeat(MAX_ENVELOPE_BYTES);
        }
        assert!(matches!(
            accept_it(e).unwrap_err(),
            SubmitError::TooLarge { .. }
        ));
    }
}
