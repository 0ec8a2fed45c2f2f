//! Lawyers on the bus: how they are named (practice licence numbers) and
//! what a meeting request must show (CQ-1.2).
//!
//! A lawyer is a participant, not an agency (DOMAIN.md, "Lawyers are
//! participants too"): messages reach a lawyer through the lawyer service,
//! addressed by licence number, and a lawyer's meeting request is checked
//! here against the credentials its role needs, before anything is
//! published. Nothing beyond these may be demanded (CQ-1.2).

use refbus_proto::v1::{CaseType, Credential, LawyerMeetingRequest, LawyerRole, ProceduralStage};

use crate::envelope::SubmitError;

/// The longest practice licence number accepted (the national format has
/// 17 digits; the limit keeps a hostile value out of indexes).
pub const MAX_LICENCE: usize = 32;

/// Checks that `value` can be a practice licence number (执业证号): 4 to
/// [`MAX_LICENCE`] ASCII letters and digits.
///
/// # Errors
/// [`SubmitError::Invalid`] naming `field`.
pub fn check_licence(field: &str, value: &str) -> Result<(), SubmitError> {
    if value.is_empty() {
        return Err(SubmitError::invalid(
            field,
            "required: the lawyer's practice licence number",
        ));
    }
    let ok = (4..=MAX_LICENCE).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric());
    if ok {
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
            "`{shown}` ({} bytes) is not a practice licence number: 4 to {MAX_LICENCE} ASCII letters and digits",
            value.len()
        ),
    ))
}

/// One thing a role must show: any one of these credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// In words, for the error ("the law firm's letter").
    pub what: &'static str,
    pub any_of: &'static [Credential],
}

const LICENCE: Requirement = Requirement {
    what: "the practice licence (律师执业证书)",
    any_of: &[Credential::PracticeLicence],
};
const FIRM_LETTER: Requirement = Requirement {
    what: "the law firm's letter (律师事务所证明)",
    any_of: &[Credential::LawFirmLetter],
};
const COMMISSION: Requirement = Requirement {
    what: "the commission or the legal aid letter (委托书或法律援助公函)",
    any_of: &[Credential::CommissionOrAidLetter],
};
const DUTY_LICENCE: Requirement = Requirement {
    what: "the practice licence, or a legal aid office lawyer's work card (律师工作证)",
    any_of: &[Credential::PracticeLicence, Credential::LegalAidWorkCard],
};
const DUTY_GROUND: Requirement = Requirement {
    what: "the detainee's legal-help request, or the notice of a court, procuratorate or police organ (通知书, CQ-1.2b)",
    any_of: &[Credential::LegalHelpRequest, Credential::DutyNotice],
};
const ASSISTANT_STANDING: Requirement = Requirement {
    what: "a practice licence or an intern certificate (实习证)",
    any_of: &[Credential::PracticeLicence, Credential::InternCertificate],
};
const TRANSLATOR_PERMISSION: Requirement = Requirement {
    what: "the case organ's permission (办案机关许可决定文书)",
    any_of: &[Credential::CaseOrganPermission],
};
const IDENTITY: Requirement = Requirement {
    what: "a valid identity document (本人有效身份证明)",
    any_of: &[Credential::IdentityDocument],
};
const NS_PERMISSION: Requirement = Requirement {
    what: "the investigating organ's permission to meet (侦查机关许可会见文书), needed in the investigation stage of a national-security or terrorism case",
    any_of: &[Credential::InvestigatingOrganPermission],
};

/// What a person of `role` must show to meet a detainee in a case of
/// `case_type` at `stage` (CQ-1.2, CQ-1.2b). Nothing else may be demanded.
#[must_use]
pub fn required_credentials(
    role: LawyerRole,
    case_type: CaseType,
    stage: ProceduralStage,
) -> Vec<Requirement> {
    let mut needed = match role {
        LawyerRole::DefenceLawyer => vec![LICENCE, FIRM_LETTER, COMMISSION],
        LawyerRole::DutyLawyer => vec![DUTY_LICENCE, DUTY_GROUND],
        LawyerRole::Assistant | LawyerRole::Intern => vec![FIRM_LETTER, ASSISTANT_STANDING],
        LawyerRole::Translator => vec![TRANSLATOR_PERMISSION, IDENTITY],
        LawyerRole::Unspecified => Vec::new(),
    };
    let lawyer = matches!(role, LawyerRole::DefenceLawyer | LawyerRole::DutyLawyer);
    let guarded = matches!(case_type, CaseType::NationalSecurity | CaseType::Terrorism);
    if lawyer && guarded && stage == ProceduralStage::Investigation {
        needed.push(NS_PERMISSION);
    }
    needed
}

fn role_name(role: LawyerRole) -> &'static str {
    match role {
        LawyerRole::DefenceLawyer => "a defence lawyer",
        LawyerRole::DutyLawyer => "a duty lawyer",
        LawyerRole::Assistant => "a lawyer's assistant",
        LawyerRole::Intern => "an intern",
        LawyerRole::Translator => "a translator",
        LawyerRole::Unspecified => "someone with no role",
    }
}

fn credential_name(credential: Credential) -> &'static str {
    credential.as_str_name()
}

/// The first requirement `shown` does not meet, if any.
fn missing(needed: &[Requirement], shown: &[i32]) -> Option<Requirement> {
    needed
        .iter()
        .find(|r| !r.any_of.iter().any(|c| shown.contains(&(*c as i32))))
        .copied()
}

fn missing_error(field: &str, role: LawyerRole, requirement: Requirement) -> SubmitError {
    let names: Vec<&str> = requirement
        .any_of
        .iter()
        .map(|c| credential_name(*c))
        .collect();
    SubmitError::invalid(
        field,
        format!(
            "CQ-1.2: {} shows {}; missing: {}",
            role_name(role),
            requirement.what,
            names.join(" or ")
        ),
    )
}

/// Checks a lawyer's meeting request against CQ-1.2: the asker is a defence
/// or duty lawyer, each companion an assistant, intern or translator, the
/// case type given (and the stage, where the type makes it matter), and
/// everyone shows what their role needs.
///
/// # Errors
/// [`SubmitError::Invalid`] naming the field and, for a missing credential,
/// the credential and CQ-1.2.
pub fn check_meeting_request(request: &LawyerMeetingRequest) -> Result<(), SubmitError> {
    let role = LawyerRole::try_from(request.role).unwrap_or(LawyerRole::Unspecified);
    match role {
        LawyerRole::DefenceLawyer | LawyerRole::DutyLawyer => {}
        LawyerRole::Intern => {
            return Err(SubmitError::invalid(
                "lawyer_meeting_request.role",
                "SH-3.5: an intern does not meet a detainee alone; name them as a companion of the lawyer",
            ));
        }
        LawyerRole::Assistant | LawyerRole::Translator => {
            return Err(SubmitError::invalid(
                "lawyer_meeting_request.role",
                "CQ-1.2: an assistant or translator comes with the lawyer (随同参加); name them as a companion",
            ));
        }
        LawyerRole::Unspecified => {
            return Err(SubmitError::invalid(
                "lawyer_meeting_request.role",
                "required (CQ-1.2): defence lawyer or duty lawyer",
            ));
        }
    }
    let case_type = CaseType::try_from(request.case_type).unwrap_or(CaseType::Unspecified);
    if case_type == CaseType::Unspecified {
        return Err(SubmitError::invalid(
            "lawyer_meeting_request.case_type",
            "required (CQ-1.2): a national-security or terrorism case in the investigation stage needs the investigating organ's permission",
        ));
    }
    let stage = ProceduralStage::try_from(request.stage).unwrap_or(ProceduralStage::Unspecified);
    if matches!(case_type, CaseType::NationalSecurity | CaseType::Terrorism)
        && stage == ProceduralStage::Unspecified
    {
        return Err(SubmitError::invalid(
            "lawyer_meeting_request.stage",
            "required for a national-security or terrorism case (CQ-1.2: in the investigation stage the investigating organ's permission is needed)",
        ));
    }
    if let Some(requirement) = missing(
        &required_credentials(role, case_type, stage),
        &request.credentials,
    ) {
        return Err(missing_error(
            "lawyer_meeting_request.credentials",
            role,
            requirement,
        ));
    }
    for (i, companion) in request.companions.iter().enumerate() {
        let role = LawyerRole::try_from(companion.role).unwrap_or(LawyerRole::Unspecified);
        if !matches!(
            role,
            LawyerRole::Assistant | LawyerRole::Intern | LawyerRole::Translator
        ) {
            return Err(SubmitError::invalid(
                format!("lawyer_meeting_request.companions[{i}].role"),
                "CQ-1.2: a companion is an assistant, an intern or a translator",
            ));
        }
        if companion.name.trim().is_empty() {
            return Err(SubmitError::invalid(
                format!("lawyer_meeting_request.companions[{i}].name"),
                "required",
            ));
        }
        if let Some(requirement) = missing(
            &required_credentials(role, case_type, stage),
            &companion.credentials,
        ) {
            return Err(missing_error(
                &format!("lawyer_meeting_request.companions[{i}].credentials"),
                role,
                requirement,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use refbus_proto::v1::Companion;

    fn request(role: LawyerRole, credentials: &[Credential]) -> LawyerMeetingRequest {
        LawyerMeetingRequest {
            role: role as i32,
            case_type: CaseType::Ordinary as i32,
            stage: ProceduralStage::Investigation as i32,
            credentials: credentials.iter().map(|c| *c as i32).collect(),
            ..LawyerMeetingRequest::default()
        }
    }

    fn shown(needed: &[Requirement]) -> Vec<Credential> {
        needed.iter().map(|r| r.any_of[0]).collect()
    }

    #[test]
    fn cq_1_2_each_role_missing_one_credential_is_refused_naming_it() {
        for role in [LawyerRole::DefenceLawyer, LawyerRole::DutyLawyer] {
            let needed = required_credentials(role, CaseType::Ordinary, ProceduralStage::Trial);
            assert!(check_meeting_request(&request(role, &shown(&needed))).is_ok());
            for leave_out in 0..needed.len() {
                let mut all = shown(&needed);
                let gone = all.remove(leave_out);
                let e = check_meeting_request(&request(role, &all))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("CQ-1.2"), "{e}");
                assert!(e.contains(gone.as_str_name()), "{e}");
            }
        }
        for role in [
            LawyerRole::Assistant,
            LawyerRole::Intern,
            LawyerRole::Translator,
        ] {
            let lawyer = shown(&required_credentials(
                LawyerRole::DefenceLawyer,
                CaseType::Ordinary,
                ProceduralStage::Trial,
            ));
            let needed = required_credentials(role, CaseType::Ordinary, ProceduralStage::Trial);
            for leave_out in 0..needed.len() {
                let mut all = shown(&needed);
                let gone = all.remove(leave_out);
                let mut r = request(LawyerRole::DefenceLawyer, &lawyer);
                r.companions = vec![Companion {
                    role: role as i32,
                    name: "x".into(),
                    credentials: all.iter().map(|c| *c as i32).collect(),
                }];
                let e = check_meeting_request(&r).unwrap_err().to_string();
                assert!(
                    e.starts_with("lawyer_meeting_request.companions[0].credentials: CQ-1.2"),
                    "{e}"
                );
                assert!(e.contains(gone.as_str_name()), "{e}");
            }
        }
    }

    #[test]
    fn cq_1_2_a_duty_lawyer_may_show_either_alternative() {
        let r = request(
            LawyerRole::DutyLawyer,
            &[Credential::LegalAidWorkCard, Credential::DutyNotice],
        );
        assert!(check_meeting_request(&r).is_ok());
    }

    #[test]
    fn cq_1_2_ns_and_terror_permission_exactly_in_the_investigation_stage() {
        for case_type in [
            CaseType::Ordinary,
            CaseType::NationalSecurity,
            CaseType::Terrorism,
            CaseType::Unclear,
        ] {
            for stage in [
                ProceduralStage::Investigation,
                ProceduralStage::ProsecutionReview,
                ProceduralStage::Trial,
            ] {
                let needed = required_credentials(LawyerRole::DefenceLawyer, case_type, stage);
                let wants = needed.contains(&NS_PERMISSION);
                let guarded = matches!(case_type, CaseType::NationalSecurity | CaseType::Terrorism);
                assert_eq!(
                    wants,
                    guarded && stage == ProceduralStage::Investigation,
                    "{case_type:?} {stage:?}"
                );
            }
        }
        let mut r = request(
            LawyerRole::DefenceLawyer,
            &shown(&required_credentials(
                LawyerRole::DefenceLawyer,
                CaseType::Ordinary,
                ProceduralStage::Investigation,
            )),
        );
        r.case_type = CaseType::Terrorism as i32;
        let e = check_meeting_request(&r).unwrap_err().to_string();
        assert!(
            e.contains("CREDENTIAL_INVESTIGATING_ORGAN_PERMISSION"),
            "{e}"
        );
        r.stage = ProceduralStage::Trial as i32;
        assert!(check_meeting_request(&r).is_ok());
    }

    #[test]
    fn an_intern_never_asks_alone_and_licences_are_short_and_plain() {
        let e = check_meeting_request(&request(LawyerRole::Intern, &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SH-3.5"), "{e}");
        assert!(check_licence("l", "15001201910000001").is_ok());
        assert!(check_licence("l", "").is_err());
        assert!(check_licence("l", "1500\0").is_err());
        assert!(check_licence("l", &"1".repeat(3000)).is_err());
        assert!(
            check_licence("l", "１５００１").is_err(),
            "full-width digits"
        );
    }
}
