//! Messages the tests send, with seeded personal data.

use chrono::{DateTime, TimeZone, Utc};
use refbus_core::envelope::timestamp;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::misconduct_lead::Subject;
use refbus_proto::v1::{
    Detainee, Envelope, JudicialOfficer, Lawyer, LawyerViolationNotice, LegalHelpRequest,
    MisconductLead, SubmitRequest,
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
