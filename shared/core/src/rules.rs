//! Who may send which kind of message, and who may receive it: the sending
//! and receiving rules the gateway enforces before anything is published.
//! Each rule names the DOMAIN.md rule it comes from.

use refbus_proto::v1::MessageKind;

use crate::agency::{AgencyKind, OrganSystem};
use crate::directory::Agency;

/// A message the rules do not allow, with the rule that says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {reason}")]
pub struct RuleViolation {
    /// The DOMAIN.md rule id, e.g. "CQ-1.1c".
    pub rule: &'static str,
    pub reason: String,
}

use AgencyKind::{
    BarAssociation as Bar, CaseUnit, DetentionCentre as Centre, DutyLawyerDesk as Desk,
    JusticeBureau as Bureau, LawyerService as Lawyers, LegalAidOffice as LegalAid,
};

/// (kind, rule, senders, recipients). Replies (acknowledgement, feedback)
/// flow between any agencies and are checked against the referral instead.
const MATRIX: &[(MessageKind, &str, &[AgencyKind], &[AgencyKind])] = &[
    (
        MessageKind::LegalHelpRequest,
        "CQ-1.1b",
        &[Centre],
        &[Desk, LegalAid],
    ),
    (
        MessageKind::DefenceCommissionRequest,
        "CQ-1.1a",
        &[Centre],
        &[CaseUnit, LegalAid],
    ),
    (
        MessageKind::LegalAidApplication,
        "CQ-1.1a",
        &[Centre],
        &[LegalAid, CaseUnit],
    ),
    // CQ-1.1c: to the addressed lawyer, whose inbox is behind the lawyer
    // service; no intermediary holds the letter.
    (MessageKind::Letter, "CQ-1.1c", &[Centre], &[Lawyers]),
    // CQ-1.3a: the lawyer asks, through the lawyer service.
    (
        MessageKind::LawyerMeetingRequest,
        "CQ-1.3a",
        &[Lawyers],
        &[Centre],
    ),
    (
        MessageKind::InterrogationRequest,
        "CQ-1.3b",
        &[CaseUnit],
        &[Centre],
    ),
    (
        MessageKind::VerificationQuery,
        "CQ-1.3d",
        &[Centre],
        &[CaseUnit],
    ),
    (
        MessageKind::LawyerViolationNotice,
        "CQ-3.14",
        &[Centre],
        &[Bureau],
    ),
    // CQ-3.13: from the lawyer, or entered by the body that took it at its
    // own window (a police unit, a justice bureau, a bar association).
    (
        MessageKind::RightsComplaint,
        "CQ-3.13",
        &[Lawyers, Bar, Bureau, CaseUnit],
        &[CaseUnit, Bureau, Bar],
    ),
    (
        MessageKind::MisconductLead,
        "DZ-6",
        &[CaseUnit, Bureau, Bar],
        &[CaseUnit, Bureau, Bar],
    ),
    // SH-2.5: to the lawyers concerned, by licence number.
    (
        MessageKind::DetaineeUnavailableNotice,
        "SH-2.5",
        &[Centre],
        &[Lawyers],
    ),
    (
        MessageKind::BookedSlotNotice,
        "SH-2.8",
        &[Centre],
        &[CaseUnit],
    ),
    (
        MessageKind::JointNotice,
        "CQ-3.15",
        &[Centre, CaseUnit, Bureau, Bar],
        &[CaseUnit, Bureau, Bar],
    ),
    // Lawyers are registered, suspended and reinstated by the bar
    // association or justice bureau of their region.
    (
        MessageKind::LawyerRegistration,
        "registry",
        &[Bar, Bureau],
        &[Lawyers],
    ),
    (
        MessageKind::MeetingRating,
        "CQ-3.11b",
        &[Lawyers],
        &[Centre],
    ),
];

fn kinds(list: &[AgencyKind]) -> String {
    list.iter().map(|k| k.code()).collect::<Vec<_>>().join(", ")
}

/// Checks that `sender` may send a message of `kind` to `recipient`.
///
/// # Errors
/// A [`RuleViolation`] naming the rule broken.
pub fn check(kind: MessageKind, sender: &Agency, recipient: &Agency) -> Result<(), RuleViolation> {
    use crate::kind::KindExt;
    match kind {
        MessageKind::Unspecified => Err(RuleViolation {
            rule: "envelope",
            reason: "the message has no kind".into(),
        }),
        MessageKind::OverdueNotice => Err(RuleViolation {
            rule: "tracking",
            reason: "overdue notices are raised only by the tracker, never submitted by an agency"
                .into(),
        }),
        MessageKind::ForgeryAlert => Err(RuleViolation {
            rule: "signatures",
            reason: "forgery alerts are raised only by the service or tracker that refused a message, never submitted".into(),
        }),
        MessageKind::Acknowledgement | MessageKind::Feedback => Ok(()),
        _ => {
            let Some((_, rule, senders, recipients)) = MATRIX.iter().find(|(k, ..)| *k == kind)
            else {
                return Err(RuleViolation {
                    rule: "envelope",
                    reason: format!("no rule for `{}`", kind.code()),
                });
            };
            if !senders.contains(&sender.kind) {
                return Err(RuleViolation {
                    rule,
                    reason: format!(
                        "a {} may not send a {}; it is sent by: {}",
                        sender.kind,
                        kind.code(),
                        kinds(senders)
                    ),
                });
            }
            if kind == MessageKind::Letter && recipient.kind == CaseUnit {
                return Err(RuleViolation {
                    rule: "CQ-1.1c",
                    reason: "a detainee's letter is never given to the case unit".into(),
                });
            }
            if !recipients.contains(&recipient.kind) {
                return Err(RuleViolation {
                    rule,
                    reason: format!(
                        "a {} is not sent to a {}; it goes to: {}",
                        kind.code(),
                        recipient.kind,
                        kinds(recipients)
                    ),
                });
            }
            if kind == MessageKind::RightsComplaint
                && ((recipient.kind == CaseUnit && recipient.system != OrganSystem::Police)
                    || (sender.kind == CaseUnit && sender.system != OrganSystem::Police))
            {
                return Err(RuleViolation {
                    rule: "CQ-3.13",
                    reason: "a rights complaint is taken by and goes to the police, the justice bureau or the bar association".into(),
                });
            }
            Ok(())
        }
    }
}

/// The DOMAIN.md rule a kind of referral or notice comes from ("CQ-3.14"),
/// for error messages; "tracking" for replies.
#[must_use]
pub fn rule_of(kind: MessageKind) -> &'static str {
    MATRIX
        .iter()
        .find(|(k, ..)| *k == kind)
        .map_or("tracking", |(_, rule, ..)| rule)
}

/// Whether an agency of `kind` may send messages of `message` at all.
#[must_use]
pub fn may_send(kind: AgencyKind, message: MessageKind) -> bool {
    match message {
        MessageKind::Acknowledgement | MessageKind::Feedback => true,
        _ => MATRIX
            .iter()
            .any(|(k, _, senders, _)| *k == message && senders.contains(&kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agency::Level;

    fn agency(kind: AgencyKind, system: OrganSystem) -> Agency {
        Agency {
            id: "x".into(),
            name: "x".into(),
            kind,
            system,
            level: Level::District,
            region: "500111".into(),
            organ: false,
            stationed_at: None,
            public_key: None,
            supervised_by: None,
        }
    }

    #[test]
    fn cq_1_1b_legal_help_goes_from_a_centre_to_a_desk_or_legal_aid() {
        let centre = agency(Centre, OrganSystem::Police);
        let desk = agency(Desk, OrganSystem::LegalAid);
        let court = agency(CaseUnit, OrganSystem::Court);
        assert!(check(MessageKind::LegalHelpRequest, &centre, &desk).is_ok());
        let e = check(MessageKind::LegalHelpRequest, &centre, &court).unwrap_err();
        assert_eq!(e.rule, "CQ-1.1b");
        let e = check(MessageKind::LegalHelpRequest, &court, &desk).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("CQ-1.1b: a case_unit may not send"),
            "{e}"
        );
    }

    #[test]
    fn cq_1_1c_a_letter_never_goes_to_a_case_unit() {
        let centre = agency(Centre, OrganSystem::Police);
        let police = agency(CaseUnit, OrganSystem::Police);
        let e = check(MessageKind::Letter, &centre, &police).unwrap_err();
        assert_eq!(e.rule, "CQ-1.1c");
        assert!(e.reason.contains("never given to the case unit"));
    }

    #[test]
    fn cq_3_13_complaints_go_to_police_not_to_a_court() {
        let bar = agency(Bar, OrganSystem::Bar);
        assert!(
            check(
                MessageKind::RightsComplaint,
                &bar,
                &agency(CaseUnit, OrganSystem::Police)
            )
            .is_ok()
        );
        assert!(
            check(
                MessageKind::RightsComplaint,
                &bar,
                &agency(CaseUnit, OrganSystem::Court)
            )
            .is_err()
        );
    }

    #[test]
    fn overdue_notices_are_never_submitted() {
        let bureau = agency(Bureau, OrganSystem::Justice);
        assert!(check(MessageKind::OverdueNotice, &bureau, &bureau).is_err());
        assert!(!may_send(Bureau, MessageKind::OverdueNotice));
        assert!(may_send(Bureau, MessageKind::Feedback));
    }
}
