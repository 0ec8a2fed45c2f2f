//! Statutory recipients: where the rules say a message goes, so that an
//! agency's system need not know the directory.

use crate::agency::AgencyKind;
use crate::directory::{Agency, Directory};

/// No recipient exists for a message, with the rule that needed one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {reason}")]
pub struct NoRoute {
    pub rule: &'static str,
    pub reason: String,
}

/// CQ-1.1b: a legal-help request goes to the duty lawyer desk stationed at
/// the detainee's detention centre when the directory has one, otherwise to
/// the legal aid office of the centre's region (then of its municipality).
///
/// # Errors
/// [`NoRoute`] when `detention_centre` is not a detention centre, or no desk
/// or legal aid office serves it.
pub fn legal_help_recipient<'d>(
    directory: &'d Directory,
    detention_centre: &str,
) -> Result<&'d Agency, NoRoute> {
    let centre = detention_centre_in(directory, detention_centre, "CQ-1.1b")?;
    directory
        .duty_desk_of(&centre.id)
        .or_else(|| directory.nearest_of_kind(AgencyKind::LegalAidOffice, &centre.region))
        .ok_or_else(|| NoRoute {
            rule: "CQ-1.1b",
            reason: format!(
                "`{}` has no duty lawyer desk and region {} has no legal aid office",
                centre.id, centre.region
            ),
        })
}

/// CQ-3.14: a lawyer's violation is notified to the justice bureau of the
/// detention centre's region (then of its municipality).
///
/// # Errors
/// [`NoRoute`] when `detention_centre` is not a detention centre or no
/// justice bureau supervises its region.
pub fn violation_recipient<'d>(
    directory: &'d Directory,
    detention_centre: &str,
) -> Result<&'d Agency, NoRoute> {
    let centre = detention_centre_in(directory, detention_centre, "CQ-3.14")?;
    directory
        .nearest_of_kind(AgencyKind::JusticeBureau, &centre.region)
        .ok_or_else(|| NoRoute {
            rule: "CQ-3.14",
            reason: format!("no justice bureau supervises region {}", centre.region),
        })
}

/// CQ-3.15: a joint notice goes to the police, the justice bureau and the
/// bar association of the detention centre's region (each, when the region
/// has none, of its municipality): police organ first, then the bureau, then
/// the bar association.
///
/// # Errors
/// [`NoRoute`] when `detention_centre` is not a detention centre or one of
/// the three is missing.
pub fn joint_notice_recipients<'d>(
    directory: &'d Directory,
    detention_centre: &str,
) -> Result<[&'d Agency; 3], NoRoute> {
    let centre = detention_centre_in(directory, detention_centre, "CQ-3.15")?;
    let police_in = |region: &str| {
        directory.agencies().iter().find(|a| {
            a.kind == AgencyKind::CaseUnit
                && a.system == crate::agency::OrganSystem::Police
                && a.organ
                && a.region == region
        })
    };
    let police = police_in(&centre.region).or_else(|| {
        let parent = directory.region(&centre.region)?.parent.as_deref()?;
        police_in(parent)
    });
    let missing = |what: &str| NoRoute {
        rule: "CQ-3.15",
        reason: format!("region {} has no {what}", centre.region),
    };
    Ok([
        police.ok_or_else(|| missing("police organ"))?,
        directory
            .nearest_of_kind(AgencyKind::JusticeBureau, &centre.region)
            .ok_or_else(|| missing("justice bureau"))?,
        directory
            .nearest_of_kind(AgencyKind::BarAssociation, &centre.region)
            .ok_or_else(|| missing("bar association"))?,
    ])
}

fn detention_centre_in<'d>(
    directory: &'d Directory,
    id: &str,
    rule: &'static str,
) -> Result<&'d Agency, NoRoute> {
    match directory.get(id) {
        Some(a) if a.kind == AgencyKind::DetentionCentre => Ok(a),
        Some(a) => Err(NoRoute {
            rule,
            reason: format!("`{id}` is a {}, not a detention centre", a.kind),
        }),
        None => Err(NoRoute {
            rule,
            reason: format!("`{id}` is not in the agency directory"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        crate::directory::shipped()
    }

    #[test]
    fn cq_1_1b_goes_to_the_centres_duty_desk_when_it_has_one() {
        let d = directory();
        assert_eq!(
            legal_help_recipient(&d, "dz-detention-centre").unwrap().id,
            "dz-duty-desk"
        );
    }

    #[test]
    fn cq_1_1b_goes_to_the_regions_legal_aid_office_otherwise() {
        let d = directory();
        assert_eq!(
            legal_help_recipient(&d, "yb-detention-centre").unwrap().id,
            "yb-legal-aid-centre"
        );
        assert_eq!(
            legal_help_recipient(&d, "sh-first-detention-centre")
                .unwrap()
                .id,
            "sh-legal-aid-centre"
        );
    }

    #[test]
    fn cq_1_1b_from_something_that_is_not_a_centre_has_no_route() {
        let d = directory();
        let e = legal_help_recipient(&d, "dz-court").unwrap_err();
        assert_eq!(
            e.to_string(),
            "CQ-1.1b: `dz-court` is a case_unit, not a detention centre"
        );
    }

    #[test]
    fn cq_3_15_joint_notices_go_to_the_regions_police_bureau_and_bar() {
        let d = directory();
        let ids = joint_notice_recipients(&d, "dz-detention-centre")
            .unwrap()
            .map(|a| a.id.as_str());
        assert_eq!(ids, ["dz-psb", "dz-justice-bureau", "dz-bar-committee"]);
        let ids = joint_notice_recipients(&d, "sh-first-detention-centre")
            .unwrap()
            .map(|a| a.id.as_str());
        assert_eq!(ids, ["sh-psb", "sh-justice-bureau", "sh-bar-association"]);
        assert_eq!(
            joint_notice_recipients(&d, "dz-psb").unwrap_err().rule,
            "CQ-3.15"
        );
    }

    #[test]
    fn cq_3_14_violations_go_to_the_regions_justice_bureau() {
        let d = directory();
        assert_eq!(
            violation_recipient(&d, "dz-detention-centre").unwrap().id,
            "dz-justice-bureau"
        );
        assert_eq!(
            violation_recipient(&d, "cq-detention-centre").unwrap().id,
            "cq-justice-bureau"
        );
    }
}
