//! The agency directory: every agency on the bus with its kind, organ system,
//! level and region, loaded from TOML and validated before anything starts.
//!
//! ```toml
//! [[region]]
//! code = "500111"
//! name = "大足区"
//! level = "district"
//! parent = "500000"
//!
//! [[agency]]
//! id = "dz-detention-centre"
//! name = "重庆市大足区看守所"
//! kind = "detention_centre"
//! system = "police"
//! level = "district"
//! region = "500111"
//! public_key = "…"   # Ed25519, base64 (crate::signing)
//! supervised_by = "dz-psb"   # optional: the body told of its overdue duties
//!                            # (crate::policy::supervisor_of), when not the default
//!
//! [tracker]
//! public_key = "…"   # signs overdue notices and forgery alerts
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::agency::{AgencyKind, Level, OrganSystem, is_valid_agency_id};
use crate::signing::{self, TRACKER_ID, VerifyingKey};

/// A directory file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("{path}: cannot read the agency directory: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {entry}: {problem}")]
    Invalid {
        path: PathBuf,
        line: usize,
        /// The entry at fault, e.g. "agency `dz-duty-desk`".
        entry: String,
        problem: String,
    },
}

/// An administrative division (region code, e.g. 500111 for Dazu District).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub code: String,
    pub name: String,
    pub level: Level,
    /// The municipal region a district belongs to.
    #[serde(default)]
    pub parent: Option<String>,
}

/// One agency on the bus.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Agency {
    /// Stable id, also the AMQP routing-key word of its inbox.
    pub id: String,
    /// The official Chinese name.
    pub name: String,
    pub kind: AgencyKind,
    pub system: OrganSystem,
    pub level: Level,
    /// Administrative division code.
    pub region: String,
    /// The head organ of its system in its region (the court, procuratorate,
    /// public security bureau, justice bureau or bar association itself, as
    /// opposed to one of its units). DZ-7 routes leads to organs.
    #[serde(default)]
    pub organ: bool,
    /// For a duty lawyer desk: the detention centre it is stationed at.
    #[serde(default)]
    pub stationed_at: Option<String>,
    /// The Ed25519 public key its messages are verified with, base64
    /// ([`crate::signing`]). An agency without one can neither send nor be
    /// believed.
    #[serde(default)]
    pub public_key: Option<String>,
    /// The agency that supervises this one, when it is not the one the
    /// rules give ([`crate::policy::supervisor_of`], DOMAIN.md "Who
    /// supervises whom"): its overdue duties are told there. Checked to be
    /// another agency of the directory.
    #[serde(default)]
    pub supervised_by: Option<String>,
}

/// The tracker's entry: the key its overdue notices and alerts are verified with.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct TrackerEntry {
    public_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    #[serde(default)]
    region: Vec<Spanned<Region>>,
    #[serde(default)]
    agency: Vec<Spanned<Agency>>,
    #[serde(default)]
    tracker: Option<Spanned<TrackerEntry>>,
}

/// The validated agency directory.
#[derive(Clone, Debug)]
pub struct Directory {
    regions: BTreeMap<String, Region>,
    agencies: Vec<Agency>,
    by_id: HashMap<String, usize>,
    /// Public keys by signer: agency ids and [`TRACKER_ID`].
    public_keys: HashMap<String, VerifyingKey>,
}

impl Directory {
    /// Reads and validates a directory file.
    ///
    /// # Errors
    /// [`DirectoryError`] naming the file, the line, the entry and what is wrong.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, DirectoryError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| DirectoryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates directory text; `path` is only used in errors.
    ///
    /// # Errors
    /// [`DirectoryError`] naming the file, the line, the entry and what is wrong.
    pub fn parse(text: &str, path: &Path) -> Result<Self, DirectoryError> {
        let file: DirectoryFile = toml::from_str(text).map_err(|e| DirectoryError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let invalid = |offset: usize, entry: String, problem: String| DirectoryError::Invalid {
            path: path.to_path_buf(),
            line: line_of(offset),
            entry,
            problem,
        };

        let mut regions = BTreeMap::new();
        for spanned in &file.region {
            let region = spanned.get_ref();
            let entry = format!("region `{}`", region.code);
            let at = spanned.span().start;
            if region.code.len() != 6 || !region.code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    at,
                    entry,
                    "code must be a six-digit administrative division code".into(),
                ));
            }
            if region.name.trim().is_empty() {
                return Err(invalid(at, entry, "name is empty".into()));
            }
            match (region.level, &region.parent) {
                (Level::District, None) => {
                    return Err(invalid(
                        at,
                        entry,
                        "a district region needs `parent`, its municipal region".into(),
                    ));
                }
                (Level::Municipal, Some(_)) => {
                    return Err(invalid(
                        at,
                        entry,
                        "a municipal region has no `parent`".into(),
                    ));
                }
                _ => {}
            }
            if regions
                .insert(region.code.clone(), region.clone())
                .is_some()
            {
                return Err(invalid(at, entry, "region code listed twice".into()));
            }
        }
        for spanned in &file.region {
            let region = spanned.get_ref();
            if let Some(parent) = &region.parent {
                match regions.get(parent) {
                    Some(p) if p.level == Level::Municipal => {}
                    Some(_) => {
                        return Err(invalid(
                            spanned.span().start,
                            format!("region `{}`", region.code),
                            format!("parent `{parent}` is not a municipal region"),
                        ));
                    }
                    None => {
                        return Err(invalid(
                            spanned.span().start,
                            format!("region `{}`", region.code),
                            format!("parent `{parent}` is not a region in this directory"),
                        ));
                    }
                }
            }
        }

        let mut by_id = HashMap::new();
        let mut organs = HashSet::new();
        let mut public_keys = HashMap::new();
        if let Some(tracker) = &file.tracker {
            let key =
                signing::parse_public_key(&tracker.get_ref().public_key).map_err(|problem| {
                    invalid(
                        tracker.span().start,
                        "[tracker]".into(),
                        format!("public_key: {problem}"),
                    )
                })?;
            public_keys.insert(TRACKER_ID.to_owned(), key);
        }
        for (index, spanned) in file.agency.iter().enumerate() {
            let agency = spanned.get_ref();
            let entry = format!("agency `{}`", agency.id);
            let at = spanned.span().start;
            if agency.id == TRACKER_ID {
                return Err(invalid(
                    at,
                    entry,
                    format!("id `{TRACKER_ID}` is the tracker's, the signer of overdue notices"),
                ));
            }
            if !is_valid_agency_id(&agency.id) {
                return Err(invalid(
                    at,
                    entry,
                    "id must be lowercase letters, digits and hyphens (at most 64), with no dots"
                        .into(),
                ));
            }
            if by_id.insert(agency.id.clone(), index).is_some() {
                return Err(invalid(at, entry, "id listed twice".into()));
            }
            if agency.name.trim().is_empty() {
                return Err(invalid(at, entry, "name is empty".into()));
            }
            if !agency.kind.systems().contains(&agency.system) {
                let allowed: Vec<_> = agency.kind.systems().iter().map(|s| s.code()).collect();
                return Err(invalid(
                    at,
                    entry,
                    format!(
                        "kind `{}` belongs to system {}, not `{}`",
                        agency.kind,
                        allowed.join(" or "),
                        agency.system
                    ),
                ));
            }
            let Some(region) = regions.get(&agency.region) else {
                return Err(invalid(
                    at,
                    entry,
                    format!(
                        "region `{}` is not a region in this directory",
                        agency.region
                    ),
                ));
            };
            if region.level != agency.level {
                return Err(invalid(
                    at,
                    entry,
                    format!(
                        "level `{}` does not match region `{}`, which is {}",
                        agency.level, region.code, region.level
                    ),
                ));
            }
            if agency.organ && !organs.insert((agency.system, agency.region.clone())) {
                return Err(invalid(
                    at,
                    entry,
                    format!(
                        "a second organ of system `{}` in region `{}`",
                        agency.system, agency.region
                    ),
                ));
            }
            match (agency.kind, &agency.stationed_at) {
                (AgencyKind::DutyLawyerDesk, None) => {
                    return Err(invalid(
                        at,
                        entry,
                        "a duty lawyer desk needs `stationed_at`, the detention centre it serves"
                            .into(),
                    ));
                }
                (AgencyKind::DutyLawyerDesk, Some(_)) => {}
                (_, Some(_)) => {
                    return Err(invalid(
                        at,
                        entry,
                        "only a duty lawyer desk has `stationed_at`".into(),
                    ));
                }
                (_, None) => {}
            }
            if let Some(text) = &agency.public_key {
                let key = signing::parse_public_key(text)
                    .map_err(|problem| invalid(at, entry, format!("public_key: {problem}")))?;
                public_keys.insert(agency.id.clone(), key);
            }
        }
        let agencies: Vec<Agency> = file.agency.iter().map(|s| s.get_ref().clone()).collect();
        for (spanned, agency) in file.agency.iter().zip(&agencies) {
            if let Some(centre) = &agency.stationed_at {
                let ok = by_id
                    .get(centre)
                    .is_some_and(|&i| agencies[i].kind == AgencyKind::DetentionCentre);
                if !ok {
                    return Err(invalid(
                        spanned.span().start,
                        format!("agency `{}`", agency.id),
                        format!(
                            "stationed_at `{centre}` is not a detention centre in this directory"
                        ),
                    ));
                }
            }
            if let Some(supervisor) = &agency.supervised_by {
                let problem = if supervisor == &agency.id {
                    Some("supervised_by names the agency itself".to_owned())
                } else if !by_id.contains_key(supervisor) {
                    Some(format!(
                        "supervised_by `{supervisor}` is not an agency in this directory"
                    ))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(invalid(
                        spanned.span().start,
                        format!("agency `{}`", agency.id),
                        problem,
                    ));
                }
            }
        }
        Ok(Self {
            regions,
            agencies,
            by_id,
            public_keys,
        })
    }

    /// The key that verifies what `signer` (an agency id or [`TRACKER_ID`]) signs.
    #[must_use]
    pub fn public_key(&self, signer: &str) -> Option<&VerifyingKey> {
        self.public_keys.get(signer)
    }

    /// Every agency, in file order.
    #[must_use]
    pub fn agencies(&self) -> &[Agency] {
        &self.agencies
    }

    /// The agency with this id.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&Agency> {
        self.by_id.get(id).map(|&i| &self.agencies[i])
    }

    #[must_use]
    pub fn region(&self, code: &str) -> Option<&Region> {
        self.regions.get(code)
    }

    /// The agencies of one kind, in file order.
    pub fn of_kind(&self, kind: AgencyKind) -> impl Iterator<Item = &Agency> {
        self.agencies.iter().filter(move |a| a.kind == kind)
    }

    /// The agency of `kind` in `region`, then in its parent region.
    #[must_use]
    pub fn nearest_of_kind(&self, kind: AgencyKind, region: &str) -> Option<&Agency> {
        let here = self.of_kind(kind).find(|a| a.region == region);
        here.or_else(|| {
            let parent = self.regions.get(region)?.parent.as_deref()?;
            self.of_kind(kind).find(|a| a.region == parent)
        })
    }

    /// The head organ (`organ = true`) of `system` in `region`.
    #[must_use]
    pub fn organ_of(&self, system: OrganSystem, region: &str) -> Option<&Agency> {
        self.agencies
            .iter()
            .find(|a| a.organ && a.system == system && a.region == region)
    }

    /// The municipal region `region` belongs to (`None` for a municipal one).
    #[must_use]
    pub fn parent_of(&self, region: &str) -> Option<&str> {
        self.regions.get(region)?.parent.as_deref()
    }

    /// The duty lawyer desk stationed at a detention centre, if it has one.
    #[must_use]
    pub fn duty_desk_of(&self, detention_centre: &str) -> Option<&Agency> {
        self.of_kind(AgencyKind::DutyLawyerDesk)
            .find(|a| a.stationed_at.as_deref() == Some(detention_centre))
    }
}

/// The shipped directory, `deploy/local/directory.toml`, for unit tests.
#[cfg(test)]
pub(crate) fn shipped() -> Directory {
    #[allow(clippy::unwrap_used)]
    Directory::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/local/directory.toml"
    ))
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGIONS: &str = r#"
[[region]]
code = "500000"
name = "重庆市"
level = "municipal"

[[region]]
code = "500111"
name = "大足区"
level = "district"
parent = "500000"
"#;

    fn parse(agencies: &str) -> Result<Directory, DirectoryError> {
        Directory::parse(&format!("{REGIONS}{agencies}"), Path::new("dir.toml"))
    }

    #[test]
    fn the_shipped_directory_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        );
        let dir = Directory::load(path).unwrap();
        assert!(dir.get("dz-detention-centre").is_some());
        assert_eq!(
            dir.duty_desk_of("dz-detention-centre").unwrap().id,
            "dz-duty-desk"
        );
        // A second Chongqing district and a Shanghai detention centre (issue 2).
        assert!(dir.agencies().iter().any(|a| a.region == "500112"));
        assert!(
            dir.agencies()
                .iter()
                .any(|a| a.region.starts_with("31") && a.kind == AgencyKind::DetentionCentre)
        );
    }

    #[test]
    fn an_error_names_the_line_the_entry_and_the_problem() {
        let err = parse(
            r#"
[[agency]]
id = "dz-court"
name = "大足区人民法院"
kind = "detention_centre"
system = "court"
level = "district"
region = "500111"
"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "dir.toml:13: agency `dz-court`: kind `detention_centre` belongs to system police, not `court`"
        );
    }

    #[test]
    fn unknown_region_duplicate_ids_and_bad_desks_are_rejected() {
        let base = |region: &str, id: &str| {
            format!(
                "[[agency]]\nid = \"{id}\"\nname = \"x\"\nkind = \"justice_bureau\"\nsystem = \"justice\"\nlevel = \"district\"\nregion = \"{region}\"\n"
            )
        };
        let e = parse(&base("500999", "a")).unwrap_err().to_string();
        assert!(e.contains("region `500999` is not a region"), "{e}");
        let e = parse(&format!("{}{}", base("500111", "a"), base("500111", "a")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("agency `a`: id listed twice"), "{e}");
        let e = parse(&base("500111", "A.b")).unwrap_err().to_string();
        assert!(e.contains("no dots"), "{e}");
        let e = parse("[[agency]]\nid = \"d\"\nname = \"x\"\nkind = \"duty_lawyer_desk\"\nsystem = \"legal_aid\"\nlevel = \"district\"\nregion = \"500111\"\nstationed_at = \"nowhere\"\n").unwrap_err().to_string();
        assert!(
            e.contains("stationed_at `nowhere` is not a detention centre"),
            "{e}"
        );
        let e = parse("[[agency]]\nid = \"d\"\nname = \"x\"\nkind = \"justice_bureau\"\nsystem = \"justice\"\nlevel = \"municipal\"\nregion = \"500111\"\n").unwrap_err().to_string();
        assert!(
            e.contains("level `municipal` does not match region `500111`"),
            "{e}"
        );
        let e = parse(&format!(
            "{}supervised_by = \"nobody\"\n",
            base("500111", "a")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("agency `a`: supervised_by `nobody` is not an agency in this directory"),
            "{e}"
        );
        let e = parse(&format!("{}supervised_by = \"a\"\n", base("500111", "a")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("supervised_by names the agency itself"), "{e}");
        let d = parse(&format!(
            "{}{}supervised_by = \"a\"\n",
            base("500111", "a"),
            base("500111", "b")
        ))
        .unwrap();
        assert_eq!(d.get("b").unwrap().supervised_by.as_deref(), Some("a"));
        let e = parse("[[agency]]\nid = \"d\"\nkind = \"justice_bureau\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("dir.toml: "), "{e}");
        assert!(e.contains("missing field"), "{e}");
    }
}
