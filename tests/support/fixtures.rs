//! Messages the tests send, with seeded personal data.

use chrono::{DateTime, TimeZone, Utc};
use refbus_core::envelope::timestamp;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::misconduct_lead::Subject;
use refbus_proto::v1::{
    CaseType, Credential, Detainee, Envelope, Feedback, JudicialOfficer, Lawyer,
    LawyerMeetingRequest, LawyerRole, LawyerViolationNotice, LegalHelpRequest, MeetingRefusal,
    MessageKind, MisconductLead, Outcome, RefusalReason, SubmitRequest,
};

pub const CENTRE: &str = "dz-detention-centre";
pub const DESK: &str = "dz-duty-desk";
pub const BUREAU: &str = "dz-justice-bureau";

/// A legal-help request (CQ-1.1b) from the Dazu detention centre to its
/// duty desk, the detainee having asked at `asked_at`.
#[must_use]
pub fn legal_help_at(key: &str, asked_at: DateTime<Utc>) -> Envelope {
    Envelope {
        sender: CENTRE.into(),
        recipient: DESK.into(),
        clock_started_at: Some(timestamp(asked_at)),
        idempotency_key: key.into(),
        payload: Some(Payload::LegalHelpRequest(LegalHelpRequest {
            detainee: Some(Detainee {
                name: "李四".into(),
                id_number: "500225199001011234".into(),
                custody_number: "DZ-2026-0417".into(),
            }),
            detention_centre: CENTRE.into(),
            matter: "想了解取保候审的条件".into(),
        })),
        ..Envelope::default()
    }
}

/// [`legal_help_at`] with a fixed request time.
#[must_use]
pub fn legal_help(key: &str) -> Envelope {
    legal_help_at(key, Utc.with_ymd_and_hms(2026, 11, 20, 8, 30, 0).unwrap())
}

/// A legal-help request asked now, as the detention centre's service
/// publishes it (id, kind and submission time filled in), for tests that
/// publish on the broker behind the services' backs.
#[must_use]
pub fn published_legal_help(key: &str) -> Envelope {
    let mut envelope = legal_help_at(key, Utc::now());
    envelope.id = refbus_core::envelope::envelope_id(CENTRE, key);
    envelope.kind = refbus_proto::v1::MessageKind::LegalHelpRequest as i32;
    envelope.submitted_at = Some(timestamp(Utc::now()));
    envelope
}

/// A lawyer-violation notice (CQ-3.14) from the Dazu detention centre to
/// the Dazu justice bureau.
#[must_use]
pub fn violation(key: &str) -> Envelope {
    Envelope {
        sender: CENTRE.into(),
        recipient: BUREAU.into(),
        idempotency_key: key.into(),
        payload: Some(Payload::LawyerViolationNotice(LawyerViolationNotice {
            lawyer: Some(Lawyer {
                name: "钱律师".into(),
                licence_number: "15001201810000002".into(),
                law_firm: "某律师事务所".into(),
            }),
            occurred_at: None,
            description: "会见中违规传递物品".into(),
            measures_taken: "当即制止".into(),
        })),
        ..Envelope::default()
    }
}

/// DZ-7 (1): a lead the Dazu justice bureau found on a judge of the Dazu
/// court, routed straight to the court.
#[must_use]
pub fn dz_court_lead(key: &str) -> Envelope {
    Envelope {
        sender: BUREAU.into(),
        idempotency_key: key.into(),
        payload: Some(Payload::MisconductLead(MisconductLead {
            subject: Some(Subject::Officer(JudicialOfficer {
                name: "王某".into(),
                organ: "dz-court".into(),
                position: "审判员".into(),
            })),
            description: "与律师私下会面并收受财物".into(),
            ..MisconductLead::default()
        })),
        ..Envelope::default()
    }
}

#[must_use]
pub fn submit(envelope: Envelope) -> SubmitRequest {
    SubmitRequest {
        envelope: Some(envelope),
    }
}

/// The lawyer service's agency id (DOMAIN.md, "Lawyers are participants too").
pub const LAWYER_SERVICE: &str = "lawyer-service";
/// A lawyer's practice licence number (seeded).
pub const LICENCE: &str = "15001201810000001";

/// A fresh referral id, as the bus makes them (a canonical UUID).
#[must_use]
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// An envelope as it travels on the bus (id, kind, times set), for tests
/// that seed the tracker's tap directly.
#[must_use]
pub fn on_bus(
    kind: MessageKind,
    sender: &str,
    recipient: &str,
    at: DateTime<Utc>,
    payload: Payload,
) -> Envelope {
    let id = new_id();
    Envelope {
        idempotency_key: id.clone(),
        id,
        kind: kind as i32,
        sender: sender.into(),
        recipient: recipient.into(),
        clock_started_at: Some(timestamp(at)),
        submitted_at: Some(timestamp(at)),
        payload: Some(payload),
        ..Envelope::default()
    }
}

/// CQ-1.3a: a defence lawyer's meeting request to `centre`, as the lawyer
/// service submits it (signed by the service, `from_lawyer` set, accepted
/// at `at`); CQ-1.3e when `temporarily_held`.
#[must_use]
pub fn meeting_request(
    centre: &str,
    at: DateTime<Utc>,
    temporarily_held: bool,
    case_type: CaseType,
) -> Envelope {
    let mut envelope = on_bus(
        MessageKind::LawyerMeetingRequest,
        LAWYER_SERVICE,
        centre,
        at,
        Payload::LawyerMeetingRequest(LawyerMeetingRequest {
            lawyer: Some(Lawyer {
                name: "赵律师".into(),
                licence_number: LICENCE.into(),
                law_firm: "某律师事务所".into(),
            }),
            role: LawyerRole::DefenceLawyer as i32,
            detainee: Some(Detainee {
                name: "李四".into(),
                id_number: "500225199001011234".into(),
                custody_number: "DZ-2026-0417".into(),
            }),
            credentials: vec![
                Credential::PracticeLicence as i32,
                Credential::LawFirmLetter as i32,
                Credential::CommissionOrAidLetter as i32,
            ],
            case_type: case_type as i32,
            temporarily_held,
            detention_centre: centre.into(),
            ..LawyerMeetingRequest::default()
        }),
    );
    envelope.from_lawyer = LICENCE.into();
    envelope
}

/// The centre's answer to `request` at `at` (a feedback in reply, to the
/// lawyer service for the lawyer, or to a case unit's interrogation's
/// sender), with a refusal's reason when `outcome` is refused.
#[must_use]
pub fn centre_answer(
    request: &Envelope,
    at: DateTime<Utc>,
    outcome: Outcome,
    reason: Option<RefusalReason>,
) -> Envelope {
    let mut envelope = on_bus(
        MessageKind::Feedback,
        &request.recipient,
        &request.sender,
        at,
        Payload::Feedback(Feedback {
            outcome: outcome as i32,
            summary: "会见安排情况".into(),
            refusal: reason.map(|r| MeetingRefusal {
                reason: r as i32,
                explanation: "见说明".into(),
                ..MeetingRefusal::default()
            }),
            ..Feedback::default()
        }),
    );
    envelope.in_reply_to = request.id.clone();
    if request.sender == LAWYER_SERVICE {
        envelope.to_lawyers = vec![LICENCE.into()];
    }
    envelope
}
