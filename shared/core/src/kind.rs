//! Message kinds: their wire names (routing-key words), whether they create
//! an obligation (referrals) or only inform (notices), and which payload
//! carries them.

use refbus_proto::v1::{Hop, MessageKind, ObligationState, envelope::Payload};

/// The code of a kind as it comes on the wire (an `i32`); `unspecified`
/// for a number this build does not know.
#[must_use]
pub fn kind_code(kind: i32) -> &'static str {
    MessageKind::try_from(kind)
        .unwrap_or(MessageKind::Unspecified)
        .code()
}

/// The code of a hop as it comes on the wire (an `i32`).
#[must_use]
pub fn hop_code_of(hop: i32) -> &'static str {
    hop_code(Hop::try_from(hop).unwrap_or(Hop::Unspecified))
}

/// An obligation's state in words, as the CLI and the dashboard show it.
#[must_use]
pub fn obligation_state_text(state: i32) -> &'static str {
    match ObligationState::try_from(state).unwrap_or(ObligationState::Unspecified) {
        ObligationState::Open => "open",
        ObligationState::Overdue => "overdue",
        ObligationState::MetOnTime => "met on time",
        ObligationState::MetLate => "met late",
        ObligationState::Unspecified => "",
    }
}

/// The name of a hop, in routing keys (`event.<hop>`) and in the ledger.
#[must_use]
pub fn hop_code(hop: Hop) -> &'static str {
    match hop {
        Hop::Unspecified => "unspecified",
        Hop::Submitted => "submitted",
        Hop::Delivered => "delivered",
        Hop::Acknowledged => "acknowledged",
        Hop::Relayed => "relayed",
        Hop::Answered => "answered",
        Hop::OverdueNotified => "overdue_notified",
    }
}

/// The hop with this name.
#[must_use]
pub fn hop_from_code(code: &str) -> Hop {
    [
        Hop::Submitted,
        Hop::Delivered,
        Hop::Acknowledged,
        Hop::Relayed,
        Hop::Answered,
        Hop::OverdueNotified,
    ]
    .into_iter()
    .find(|h| hop_code(*h) == code)
    .unwrap_or(Hop::Unspecified)
}

/// Domain facts about a [`MessageKind`].
pub trait KindExt: Sized {
    /// The snake-case name used in routing keys and logs, e.g. `legal_help_request`.
    fn code(self) -> &'static str;
    /// The kind with this code name.
    fn from_code(code: &str) -> Option<Self>;
    /// The kind a payload carries.
    fn of_payload(payload: &Payload) -> Self;
    /// Whether a message of this kind creates an obligation on its recipient.
    fn is_referral(&self) -> bool;
    /// Whether this kind answers an earlier message (needs `in_reply_to`).
    fn is_reply(&self) -> bool;
}

const KINDS: [(MessageKind, &str); 19] = [
    (MessageKind::LegalHelpRequest, "legal_help_request"),
    (
        MessageKind::DefenceCommissionRequest,
        "defence_commission_request",
    ),
    (MessageKind::LegalAidApplication, "legal_aid_application"),
    (MessageKind::Letter, "letter"),
    (MessageKind::LawyerMeetingRequest, "lawyer_meeting_request"),
    (MessageKind::VerificationQuery, "verification_query"),
    (
        MessageKind::LawyerViolationNotice,
        "lawyer_violation_notice",
    ),
    (MessageKind::RightsComplaint, "rights_complaint"),
    (MessageKind::MisconductLead, "misconduct_lead"),
    (
        MessageKind::DetaineeUnavailableNotice,
        "detainee_unavailable_notice",
    ),
    (MessageKind::BookedSlotNotice, "booked_slot_notice"),
    (MessageKind::Acknowledgement, "acknowledgement"),
    (MessageKind::Feedback, "feedback"),
    (MessageKind::OverdueNotice, "overdue_notice"),
    (MessageKind::JointNotice, "joint_notice"),
    (MessageKind::ForgeryAlert, "forgery_alert"),
    (MessageKind::InterrogationRequest, "interrogation_request"),
    (MessageKind::LawyerRegistration, "lawyer_registration"),
    (MessageKind::MeetingRating, "meeting_rating"),
];

impl KindExt for MessageKind {
    fn code(self) -> &'static str {
        KINDS
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("unspecified", |(_, c)| c)
    }

    fn from_code(code: &str) -> Option<Self> {
        KINDS.iter().find(|(_, c)| *c == code).map(|(k, _)| *k)
    }

    fn of_payload(payload: &Payload) -> Self {
        match payload {
            Payload::LegalHelpRequest(_) => MessageKind::LegalHelpRequest,
            Payload::DefenceCommissionRequest(_) => MessageKind::DefenceCommissionRequest,
            Payload::LegalAidApplication(_) => MessageKind::LegalAidApplication,
            Payload::Letter(_) => MessageKind::Letter,
            Payload::LawyerMeetingRequest(_) => MessageKind::LawyerMeetingRequest,
            Payload::VerificationQuery(_) => MessageKind::VerificationQuery,
            Payload::LawyerViolationNotice(_) => MessageKind::LawyerViolationNotice,
            Payload::RightsComplaint(_) => MessageKind::RightsComplaint,
            Payload::MisconductLead(_) => MessageKind::MisconductLead,
            Payload::DetaineeUnavailableNotice(_) => MessageKind::DetaineeUnavailableNotice,
            Payload::BookedSlotNotice(_) => MessageKind::BookedSlotNotice,
            Payload::Acknowledgement(_) => MessageKind::Acknowledgement,
            Payload::Feedback(_) => MessageKind::Feedback,
            Payload::OverdueNotice(_) => MessageKind::OverdueNotice,
            Payload::JointNotice(_) => MessageKind::JointNotice,
            Payload::ForgeryAlert(_) => MessageKind::ForgeryAlert,
            Payload::InterrogationRequest(_) => MessageKind::InterrogationRequest,
            Payload::LawyerRegistration(_) => MessageKind::LawyerRegistration,
            Payload::MeetingRating(_) => MessageKind::MeetingRating,
        }
    }

    fn is_referral(&self) -> bool {
        matches!(
            *self,
            MessageKind::LegalHelpRequest
                | MessageKind::DefenceCommissionRequest
                | MessageKind::LegalAidApplication
                | MessageKind::Letter
                | MessageKind::LawyerMeetingRequest
                | MessageKind::VerificationQuery
                | MessageKind::LawyerViolationNotice
                | MessageKind::RightsComplaint
                | MessageKind::MisconductLead
                | MessageKind::InterrogationRequest
        )
    }

    fn is_reply(&self) -> bool {
        matches!(
            *self,
            MessageKind::Acknowledgement | MessageKind::Feedback | MessageKind::OverdueNotice
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_unique_code_that_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for (kind, code) in KINDS {
            assert_eq!(kind.code(), code);
            assert_eq!(MessageKind::from_code(code), Some(kind));
            assert!(seen.insert(code));
            assert!(!code.contains('.'), "codes are routing-key words");
        }
        assert_eq!(MessageKind::Unspecified.code(), "unspecified");
        assert_eq!(MessageKind::from_code("unspecified"), None);
    }
}
