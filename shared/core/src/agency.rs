//! Agency kinds, organ systems and administrative levels (DOMAIN.md,
//! "Participants").

use serde::Deserialize;
use std::fmt;

/// What an agency is, which decides what it may send and receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum AgencyKind {
    /// 看守所: holds detainees.
    DetentionCentre,
    /// 办案单位: police investigation unit, procuratorate, court, state security.
    CaseUnit,
    /// 法律援助机构.
    LegalAidOffice,
    /// 驻所值班律师工作站: duty lawyers stationed at a detention centre.
    DutyLawyerDesk,
    /// 司法局: supervises lawyers.
    JusticeBureau,
    /// 律师协会 and its district working committees (律工委).
    BarAssociation,
    /// The lawyer service: lawyers' inboxes and submissions behind one
    /// agency of the bus (DOMAIN.md, "Lawyers are participants too").
    LawyerService,
}

impl AgencyKind {
    pub const ALL: [AgencyKind; 7] = [
        AgencyKind::DetentionCentre,
        AgencyKind::CaseUnit,
        AgencyKind::LegalAidOffice,
        AgencyKind::DutyLawyerDesk,
        AgencyKind::JusticeBureau,
        AgencyKind::BarAssociation,
        AgencyKind::LawyerService,
    ];

    /// The code name used in the directory and in messages.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            AgencyKind::DetentionCentre => "detention_centre",
            AgencyKind::CaseUnit => "case_unit",
            AgencyKind::LegalAidOffice => "legal_aid_office",
            AgencyKind::DutyLawyerDesk => "duty_lawyer_desk",
            AgencyKind::JusticeBureau => "justice_bureau",
            AgencyKind::BarAssociation => "bar_association",
            AgencyKind::LawyerService => "lawyer_service",
        }
    }

    /// The organ systems an agency of this kind may belong to.
    #[must_use]
    pub fn systems(self) -> &'static [OrganSystem] {
        match self {
            AgencyKind::DetentionCentre => &[OrganSystem::Police],
            AgencyKind::CaseUnit => &[
                OrganSystem::Court,
                OrganSystem::Procuratorate,
                OrganSystem::Police,
                OrganSystem::StateSecurity,
            ],
            AgencyKind::LegalAidOffice | AgencyKind::DutyLawyerDesk => &[OrganSystem::LegalAid],
            AgencyKind::JusticeBureau => &[OrganSystem::Justice],
            AgencyKind::BarAssociation | AgencyKind::LawyerService => &[OrganSystem::Bar],
        }
    }
}

impl fmt::Display for AgencyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The organ system an agency belongs to (DZ-7 routes within a system).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrganSystem {
    Court,
    Procuratorate,
    Police,
    StateSecurity,
    Justice,
    Bar,
    LegalAid,
}

impl OrganSystem {
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            OrganSystem::Court => "court",
            OrganSystem::Procuratorate => "procuratorate",
            OrganSystem::Police => "police",
            OrganSystem::StateSecurity => "state_security",
            OrganSystem::Justice => "justice",
            OrganSystem::Bar => "bar",
            OrganSystem::LegalAid => "legal_aid",
        }
    }
}

impl fmt::Display for OrganSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Administrative level. Same-level means same region and same level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Municipal,
    District,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Municipal => "municipal",
            Level::District => "district",
        })
    }
}

/// Whether `id` is a valid agency id: lowercase ASCII letters, digits and
/// hyphens, starting with a letter or digit, at most 64 characters. Ids are
/// AMQP routing-key words, so they may not contain dots, and `event` is
/// taken by the gateways' hop reports.
#[must_use]
pub fn is_valid_agency_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && id != "event"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agency_ids_are_routing_key_words() {
        assert!(is_valid_agency_id("dz-detention-centre"));
        assert!(!is_valid_agency_id("dz.detention"));
        assert!(!is_valid_agency_id("DZ"));
        assert!(!is_valid_agency_id(""));
        assert!(!is_valid_agency_id("-x"));
        assert!(!is_valid_agency_id(&"a".repeat(65)));
    }
}
