//! Misconduct leads between judicial personnel and lawyers (DZ-2021): the
//! route a lead takes from the unit that found it to the organ that handles it.
//!
//! - DZ-6: courts, procuratorates, police, justice bureaus and bar
//!   associations find leads and notify each other.
//! - DZ-7: a justice bureau routes a lead on a judicial officer to the
//!   officer's organ directly (same level), through the same-level organ of
//!   the same system relaying it up (municipal officer), or through the
//!   same-level organ transferring it across (officer in another district).
//! - DZ-8: a bar association follows DZ-7 (1) and (3) and has no rule for a
//!   municipal-level officer; a judicial organ sends a lead on a lawyer to the
//!   same-level justice bureau, or to the bar association, which reports it on.
//! - DZ-14: judicial personnel are staff of courts, procuratorates, police and
//!   justice administration.
//!
//! DZ-2021 binds Dazu District only (arts. 2-3; DOMAIN.md, "Who binds
//! where"): statutory routes exist only for a finder inside
//! [`DZ_2021_TERRITORY`]. A finder elsewhere (Yubei, the municipality,
//! Shanghai) gets [`LeadError::NoStatutoryRoute`] citing DZ-2021, and may
//! still name a route; no DZ-2021 obligation then arises in the tracker,
//! since the lead's matter (its finder's region) lies outside the territory.
//!
//! Where the rules give no route the bus says so ([`LeadError::NoStatutoryRoute`])
//! and a person names one, which [`check_explicit_route`] checks. It never
//! guesses. [`resolve_route`] is what a gateway calls.
//!
//! A route is a list of [`RouteHop`]s: every hop but the last passes the lead
//! on (relay up, transfer, report to the justice bureau), the last handles it.
//! Same level means same region and same level (DOMAIN.md, "Participants").

use std::collections::HashSet;
use std::fmt;

use refbus_proto::v1::RouteHop;
use refbus_proto::v1::route_hop::Duty;

use crate::agency::{AgencyKind, Level, OrganSystem};
use crate::directory::{Agency, Directory};

/// The territory DZ-2021 binds: Dazu District (and the districts of it,
/// which it has none of). Must equal `territory` of `deploy/policy/dz-2021.toml`
/// (a unit test checks).
pub const DZ_2021_TERRITORY: &str = "500111";

/// Who a lead is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A judicial officer (DZ-14), by the agency id of the organ (or unit of
    /// an organ) that employs them.
    Officer { organ: &'a str },
    /// A lawyer.
    Lawyer,
}

/// A route: hops in order; the last hop's duty is Handle; `rule` is the
/// DOMAIN rule that gave it, e.g. "DZ-7(2)".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub rule: &'static str,
    pub hops: Vec<RouteHop>,
}

impl Route {
    /// The agency the lead is sent to first.
    ///
    /// # Panics
    /// If `hops` is empty, which no route from this module is.
    #[must_use]
    pub fn first(&self) -> &RouteHop {
        &self.hops[0]
    }

    /// The agency that handles the lead (the last hop).
    ///
    /// # Panics
    /// If `hops` is empty, which no route from this module is.
    #[must_use]
    pub fn handler(&self) -> &RouteHop {
        &self.hops[self.hops.len() - 1]
    }

    /// The position of `agency` in the hops.
    #[must_use]
    pub fn position(&self, agency: &str) -> Option<usize> {
        self.hops.iter().position(|h| h.agency == agency)
    }

    /// The hop after `agency`: where `agency` passes the lead on to.
    #[must_use]
    pub fn next_after(&self, agency: &str) -> Option<&RouteHop> {
        self.position(agency).and_then(|i| self.hops.get(i + 1))
    }

    /// The agencies that pass the lead on (all but the handler).
    pub fn relays(&self) -> impl Iterator<Item = &RouteHop> {
        self.hops.iter().take(self.hops.len().saturating_sub(1))
    }
}

/// "dz-psb (relay up) → cq-psb (handle)".
impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, hop) in self.hops.iter().enumerate() {
            if i > 0 {
                f.write_str(" → ")?;
            }
            write!(f, "{} ({})", hop.agency, duty_label(hop.duty))?;
        }
        Ok(())
    }
}

fn duty_label(duty: i32) -> &'static str {
    match Duty::try_from(duty) {
        Ok(Duty::Handle) => "handle",
        Ok(Duty::RelayUp) => "relay up",
        Ok(Duty::Transfer) => "transfer",
        Ok(Duty::ReportToJusticeBureau) => "report to justice bureau",
        Ok(Duty::Unspecified) => "unspecified duty",
        Err(_) => "unknown duty",
    }
}

/// Why a lead cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeadError {
    /// The statute gives no route; a person must name one (DZ-8).
    #[error("{rule}: no statutory route: {reason}; name the route explicitly")]
    NoStatutoryRoute { rule: &'static str, reason: String },
    /// Bad input: unknown finder or organ, organ not judicial (DZ-14), an
    /// invalid explicit route, a named route that is not the statutory one.
    #[error("{rule}: {reason}")]
    Invalid { rule: &'static str, reason: String },
}

impl LeadError {
    /// The DOMAIN rule the error cites.
    #[must_use]
    pub fn rule(&self) -> &'static str {
        match self {
            LeadError::NoStatutoryRoute { rule, .. } | LeadError::Invalid { rule, .. } => rule,
        }
    }
}

fn invalid(rule: &'static str, reason: impl Into<String>) -> LeadError {
    LeadError::Invalid {
        rule,
        reason: reason.into(),
    }
}

fn no_route(rule: &'static str, reason: impl Into<String>) -> LeadError {
    LeadError::NoStatutoryRoute {
        rule,
        reason: reason.into(),
    }
}

fn hop(agency: &Agency, duty: Duty) -> RouteHop {
    RouteHop {
        agency: agency.id.clone(),
        duty: duty as i32,
    }
}

/// The agency kinds that find leads and take part in their routes (DZ-6).
const LEAD_KINDS: [AgencyKind; 3] = [
    AgencyKind::CaseUnit,
    AgencyKind::JusticeBureau,
    AgencyKind::BarAssociation,
];

/// The organ systems whose staff are judicial personnel (DZ-14).
const JUDICIAL_SYSTEMS: [OrganSystem; 4] = [
    OrganSystem::Court,
    OrganSystem::Procuratorate,
    OrganSystem::Police,
    OrganSystem::Justice,
];

/// The finder, which must be in the directory and of a kind DZ-6 names.
fn finder_in<'d>(directory: &'d Directory, finder: &str) -> Result<&'d Agency, LeadError> {
    let agency = directory.get(finder).ok_or_else(|| {
        invalid(
            "DZ-6",
            format!("finder `{finder}` is not in the agency directory"),
        )
    })?;
    if !LEAD_KINDS.contains(&agency.kind) {
        return Err(invalid(
            "DZ-6",
            format!(
                "finder `{finder}` is a {}; only a case unit, a justice bureau or a bar association finds misconduct leads",
                agency.kind
            ),
        ));
    }
    if agency.system == OrganSystem::StateSecurity {
        return Err(invalid(
            "DZ-6",
            format!(
                "finder `{finder}` is a state-security organ; DZ-6 names courts, procuratorates, police, justice bureaus and the bar association"
            ),
        ));
    }
    Ok(agency)
}

/// The head organ of `system` in `region`.
fn organ_of<'d>(directory: &'d Directory, system: OrganSystem, region: &str) -> Option<&'d Agency> {
    directory
        .agencies()
        .iter()
        .find(|a| a.organ && a.system == system && a.region == region)
}

/// The organ of a judicial officer: the agency itself when it is an organ,
/// else the organ of its system in its region (DZ-7 routes leads to organs).
fn officer_organ<'d>(directory: &'d Directory, organ: &str) -> Result<&'d Agency, LeadError> {
    let agency = directory.get(organ).ok_or_else(|| {
        invalid(
            "DZ-7",
            format!("subject organ `{organ}` is not in the agency directory"),
        )
    })?;
    if !JUDICIAL_SYSTEMS.contains(&agency.system) {
        return Err(invalid(
            "DZ-14",
            format!(
                "`{organ}` belongs to the {} system; judicial personnel are staff of courts, procuratorates, police and justice administration",
                agency.system
            ),
        ));
    }
    if agency.organ {
        return Ok(agency);
    }
    organ_of(directory, agency.system, &agency.region).ok_or_else(|| {
        invalid(
            "DZ-7",
            format!(
                "`{organ}` is not an organ and region {} has no {} organ it belongs to",
                agency.region, agency.system
            ),
        )
    })
}

fn same_level(a: &Agency, b: &Agency) -> bool {
    a.region == b.region && a.level == b.level
}

/// How the officer's organ stands to the finder (DZ-7's three cases).
enum Relation {
    /// (1) same region and level.
    SameLevel,
    /// (2) the officer's organ is municipal, the finder in one of its districts.
    Up,
    /// (3) the officer's organ is in another district of the same municipality.
    Across,
    /// None of the three, with a description for the error.
    Other(String),
}

fn relation(directory: &Directory, finder: &Agency, organ: &Agency) -> Relation {
    if same_level(finder, organ) {
        return Relation::SameLevel;
    }
    let parent_of = |a: &Agency| directory.region(&a.region).and_then(|r| r.parent.clone());
    let finder_parent = parent_of(finder);
    let organ_parent = parent_of(organ);
    match (finder.level, organ.level) {
        (Level::District, Level::Municipal) if finder_parent.as_deref() == Some(&organ.region) => {
            Relation::Up
        }
        (Level::District, Level::District)
            if finder_parent.is_some() && finder_parent == organ_parent =>
        {
            Relation::Across
        }
        (Level::Municipal, Level::District) if organ_parent.as_deref() == Some(&finder.region) => {
            Relation::Other(format!(
                "the finder `{}` is municipal and the officer's organ `{}` is in its district {}; the rules route a lead only from the district level, up or across",
                finder.id, organ.id, organ.region
            ))
        }
        _ => Relation::Other(format!(
            "the officer's organ `{}` (region {}) is outside the municipality of the finder `{}` (region {})",
            organ.id, organ.region, finder.id, finder.region
        )),
    }
}

/// DZ-7 (2) and (3): the same-level organ of the officer's system passes the
/// lead on with `duty`; when that organ is the finder itself, it sends the
/// lead straight to the officer's organ.
fn through_same_level_organ(
    directory: &Directory,
    finder: &Agency,
    organ: &Agency,
    duty: Duty,
    rule: &'static str,
) -> Result<Route, LeadError> {
    let relay = organ_of(directory, organ.system, &finder.region).ok_or_else(|| {
        no_route(
            rule,
            format!(
                "region {} of the finder `{}` has no {} organ to pass the lead on ({}) to `{}`",
                finder.region,
                finder.id,
                organ.system,
                duty_label(duty as i32),
                organ.id
            ),
        )
    })?;
    let hops = if relay.id == finder.id {
        vec![hop(organ, Duty::Handle)]
    } else {
        vec![hop(relay, duty), hop(organ, Duty::Handle)]
    };
    Ok(Route { rule, hops })
}

/// DZ-7: a justice bureau's lead on a judicial officer.
fn justice_bureau_officer(
    directory: &Directory,
    finder: &Agency,
    organ: &Agency,
) -> Result<Route, LeadError> {
    match relation(directory, finder, organ) {
        Relation::SameLevel if organ.id == finder.id => Err(invalid(
            "DZ-7(1)",
            format!(
                "the officer's organ is the finder `{}` itself, which handles the lead; nothing to route",
                finder.id
            ),
        )),
        Relation::SameLevel => Ok(Route {
            rule: "DZ-7(1)",
            hops: vec![hop(organ, Duty::Handle)],
        }),
        Relation::Up => {
            through_same_level_organ(directory, finder, organ, Duty::RelayUp, "DZ-7(2)")
        }
        Relation::Across => {
            through_same_level_organ(directory, finder, organ, Duty::Transfer, "DZ-7(3)")
        }
        Relation::Other(reason) => Err(no_route("DZ-7", reason)),
    }
}

const NO_MUNICIPAL_RULE: &str =
    "DZ-8 gives a bar association no rule for a municipal-level officer";

/// DZ-8: a bar association's lead on a judicial officer follows DZ-7 (1) and (3).
fn bar_association_officer(
    directory: &Directory,
    finder: &Agency,
    organ: &Agency,
) -> Result<Route, LeadError> {
    match relation(directory, finder, organ) {
        Relation::SameLevel => Ok(Route {
            rule: "DZ-8/DZ-7(1)",
            hops: vec![hop(organ, Duty::Handle)],
        }),
        Relation::Across => {
            through_same_level_organ(directory, finder, organ, Duty::Transfer, "DZ-8/DZ-7(3)")
        }
        Relation::Up => Err(no_route("DZ-8", NO_MUNICIPAL_RULE)),
        Relation::Other(_) if organ.level == Level::Municipal => {
            Err(no_route("DZ-8", NO_MUNICIPAL_RULE))
        }
        Relation::Other(reason) => Err(no_route(
            "DZ-8",
            format!("DZ-8 follows only DZ-7 (1) and (3): {reason}"),
        )),
    }
}

/// DZ-8: a lead on a lawyer goes to the finder's same-level justice bureau;
/// a judicial organ may instead send it through the same-level bar
/// association, which reports it to the justice bureau.
fn lawyer_routes(directory: &Directory, finder: &Agency) -> Result<Vec<Route>, LeadError> {
    if finder.kind == AgencyKind::JusticeBureau {
        return Err(invalid(
            "DZ-8",
            format!(
                "the justice bureau `{}` handles leads on lawyers itself; nothing to route",
                finder.id
            ),
        ));
    }
    let same_level_organ =
        |system| organ_of(directory, system, &finder.region).filter(|a| same_level(a, finder));
    let bureau = same_level_organ(OrganSystem::Justice).ok_or_else(|| {
        no_route(
            "DZ-8",
            format!(
                "region {} of the finder `{}` has no same-level justice bureau",
                finder.region, finder.id
            ),
        )
    })?;
    let mut routes = vec![Route {
        rule: "DZ-8",
        hops: vec![hop(bureau, Duty::Handle)],
    }];
    if finder.kind == AgencyKind::CaseUnit
        && let Some(bar) = same_level_organ(OrganSystem::Bar)
    {
        routes.push(Route {
            rule: "DZ-8",
            hops: vec![
                hop(bar, Duty::ReportToJusticeBureau),
                hop(bureau, Duty::Handle),
            ],
        });
    }
    Ok(routes)
}

/// The statutory routes for a lead found by `finder` about `subject`,
/// default first (never empty on Ok).
///
/// # Errors
/// [`LeadError::Invalid`] for an unknown or wrong-kind finder (DZ-6), an
/// unknown subject organ (DZ-7), an organ whose staff are not judicial
/// personnel (DZ-14), or a lead there is nothing to route for (the finder
/// handles it itself); [`LeadError::NoStatutoryRoute`] where the rules give
/// no route and a person must name one.
pub fn statutory_routes(
    directory: &Directory,
    finder: &str,
    subject: &Subject,
) -> Result<Vec<Route>, LeadError> {
    let finder = finder_in(directory, finder)?;
    // Bad input is bad input anywhere; a route exists only in the territory.
    match routes_anywhere(directory, finder, subject) {
        Err(e @ LeadError::Invalid { .. }) => Err(e),
        _ if !in_dz_2021_territory(directory, finder) => Err(no_route(
            "DZ-2021",
            format!(
                "DZ-2021 binds Dazu District ({DZ_2021_TERRITORY}) only, and the finder `{}` is in region {}",
                finder.id, finder.region
            ),
        )),
        routes => routes,
    }
}

/// The statutory routes as if DZ-2021 bound the finder's region.
fn routes_anywhere(
    directory: &Directory,
    finder: &Agency,
    subject: &Subject,
) -> Result<Vec<Route>, LeadError> {
    match *subject {
        Subject::Lawyer => lawyer_routes(directory, finder),
        Subject::Officer { organ } => {
            let organ = officer_organ(directory, organ)?;
            let route = match finder.kind {
                AgencyKind::JusticeBureau => justice_bureau_officer(directory, finder, organ),
                AgencyKind::BarAssociation => bar_association_officer(directory, finder, organ),
                _ => Err(no_route(
                    "DZ-6",
                    "DZ-7 and DZ-8 route only leads found by a justice bureau or a bar association",
                )),
            }?;
            Ok(vec![route])
        }
    }
}

/// Whether `finder` is inside [`DZ_2021_TERRITORY`] (the region or one of its
/// districts).
fn in_dz_2021_territory(directory: &Directory, finder: &Agency) -> bool {
    finder.region == DZ_2021_TERRITORY
        || directory.parent_of(&finder.region) == Some(DZ_2021_TERRITORY)
}

/// Checks a route a person named (DZ-6): at least one hop; every hop in the
/// directory, of kind case unit, justice bureau or bar association, and not
/// the finder; no agency twice; only the last hop has duty Handle and every
/// other hop a relay duty (relay up, transfer, report to justice bureau).
///
/// # Errors
/// [`LeadError::Invalid`] with rule "DZ-6" naming the first fault.
pub fn check_explicit_route(
    directory: &Directory,
    finder: &str,
    hops: &[RouteHop],
) -> Result<Route, LeadError> {
    const RULE: &str = "DZ-6";
    let finder = finder_in(directory, finder)?;
    if hops.is_empty() {
        return Err(invalid(RULE, "the named route has no hops"));
    }
    let last = hops.len() - 1;
    let mut seen = HashSet::new();
    for (i, h) in hops.iter().enumerate() {
        let n = i + 1;
        let agency = directory.get(&h.agency).ok_or_else(|| {
            invalid(
                RULE,
                format!("hop {n}: `{}` is not in the agency directory", h.agency),
            )
        })?;
        if agency.id == finder.id {
            return Err(invalid(
                RULE,
                format!(
                    "hop {n}: `{}` is the finder; a lead is not sent to its finder",
                    h.agency
                ),
            ));
        }
        if !LEAD_KINDS.contains(&agency.kind) {
            return Err(invalid(
                RULE,
                format!(
                    "hop {n}: `{}` is a {}; leads pass only between case units, justice bureaus and bar associations",
                    h.agency, agency.kind
                ),
            ));
        }
        if !seen.insert(agency.id.as_str()) {
            return Err(invalid(
                RULE,
                format!("hop {n}: `{}` is on the route twice", h.agency),
            ));
        }
        let duty = Duty::try_from(h.duty).ok();
        if i == last {
            if duty != Some(Duty::Handle) {
                return Err(invalid(
                    RULE,
                    format!(
                        "hop {n}: the last hop `{}` must handle the lead, not {}",
                        h.agency,
                        duty_label(h.duty)
                    ),
                ));
            }
        } else if !matches!(
            duty,
            Some(Duty::RelayUp | Duty::Transfer | Duty::ReportToJusticeBureau)
        ) {
            return Err(invalid(
                RULE,
                format!(
                    "hop {n}: `{}` is not the last hop, so it must relay up, transfer or report to the justice bureau, not {}",
                    h.agency,
                    duty_label(h.duty)
                ),
            ));
        }
    }
    Ok(Route {
        rule: "DZ-6 (named by a person)",
        hops: hops.to_vec(),
    })
}

/// What the gateway calls. With `named` empty: the default statutory route.
/// With `named` non-empty: where statutory routes exist it must be one of
/// them; where none exists it is checked by [`check_explicit_route`]. The
/// `bool` is true when a person chose the route (no statutory route exists).
///
/// # Errors
/// [`LeadError::NoStatutoryRoute`] when `named` is empty and the rules give
/// no route; [`LeadError::Invalid`] for bad input, for a named route that
/// differs from the statutory ones (citing the rule and naming the
/// statutory route), or for an invalid explicit route.
pub fn resolve_route(
    directory: &Directory,
    finder: &str,
    subject: &Subject,
    named: &[RouteHop],
) -> Result<(Route, bool), LeadError> {
    match statutory_routes(directory, finder, subject) {
        Ok(routes) => {
            if named.is_empty() {
                return routes
                    .into_iter()
                    .next()
                    .map(|r| (r, false))
                    .ok_or_else(|| invalid("DZ-7", "no statutory route was found"));
            }
            if let Some(route) = routes.iter().find(|r| r.hops == named) {
                return Ok((route.clone(), false));
            }
            let rule = routes.first().map_or("DZ-7", |r| r.rule);
            let listed: Vec<String> = routes.iter().map(ToString::to_string).collect();
            let reason = match listed.as_slice() {
                [one] => format!("the statutory route is {one}"),
                many => format!("the statutory routes are {}", many.join("; or ")),
            };
            Err(invalid(rule, reason))
        }
        Err(LeadError::NoStatutoryRoute { .. }) if !named.is_empty() => {
            check_explicit_route(directory, finder, named).map(|r| (r, true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn directory() -> Directory {
        crate::directory::shipped()
    }

    /// A small directory: Chongqing with district 500111 and 500112, and
    /// the agencies given.
    fn small_directory(agencies: &[(&str, &str, &str, &str, bool)]) -> Directory {
        let mut text = String::from(
            "[[region]]\ncode = \"500000\"\nname = \"c\"\nlevel = \"municipal\"\n\n\
             [[region]]\ncode = \"500111\"\nname = \"d\"\nlevel = \"district\"\nparent = \"500000\"\n\n\
             [[region]]\ncode = \"500112\"\nname = \"y\"\nlevel = \"district\"\nparent = \"500000\"\n\n",
        );
        for (id, kind, system, region, organ) in agencies {
            let level = if region.ends_with("0000") {
                "municipal"
            } else {
                "district"
            };
            text.push_str(&format!(
                "[[agency]]\nid = \"{id}\"\nname = \"x\"\nkind = \"{kind}\"\nsystem = \"{system}\"\nlevel = \"{level}\"\nregion = \"{region}\"\norgan = {organ}\n\n"
            ));
        }
        Directory::parse(&text, Path::new("small.toml")).unwrap()
    }

    /// The routes as DZ-7 and DZ-8 read, as if DZ-2021 bound `finder`'s region.
    fn anywhere(d: &Directory, finder: &str, subject: &Subject) -> Result<Vec<Route>, LeadError> {
        routes_anywhere(d, finder_in(d, finder)?, subject)
    }

    fn h(agency: &str, duty: Duty) -> RouteHop {
        RouteHop {
            agency: agency.into(),
            duty: duty as i32,
        }
    }

    fn officer(organ: &str) -> Subject<'_> {
        Subject::Officer { organ }
    }

    fn only_route(d: &Directory, finder: &str, subject: &Subject) -> Route {
        let routes = statutory_routes(d, finder, subject).unwrap();
        assert_eq!(routes.len(), 1, "{routes:?}");
        routes.into_iter().next().unwrap()
    }

    fn no_route_rule(e: &LeadError) -> Option<&'static str> {
        match e {
            LeadError::NoStatutoryRoute { rule, .. } => Some(rule),
            LeadError::Invalid { .. } => None,
        }
    }

    fn invalid_rule(e: &LeadError) -> Option<&'static str> {
        match e {
            LeadError::Invalid { rule, .. } => Some(rule),
            LeadError::NoStatutoryRoute { .. } => None,
        }
    }

    #[test]
    fn dz_7_1_same_level_organ_is_notified_directly() {
        let d = directory();
        let r = only_route(&d, "dz-justice-bureau", &officer("dz-court"));
        assert_eq!(r.rule, "DZ-7(1)");
        assert_eq!(r.hops, vec![h("dz-court", Duty::Handle)]);
        assert_eq!(r.first(), r.handler());
        assert_eq!(r.relays().count(), 0);
        let r = only_route(&d, "dz-bar-committee", &officer("dz-court"));
        assert_eq!(
            (r.rule, r.hops),
            ("DZ-8/DZ-7(1)", vec![h("dz-court", Duty::Handle)])
        );
        // The municipal bureau is outside DZ-2021's territory.
        let e =
            statutory_routes(&d, "cq-justice-bureau", &officer("cq-procuratorate")).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-2021"), "{e}");
    }

    #[test]
    fn dz_2021_binds_dazu_district_only() {
        let d = directory();
        // The same kind of lead as Dazu's DZ-7 (2), found in Yubei.
        let e = statutory_routes(&d, "yb-justice-bureau", &officer("cq-high-court")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "DZ-2021: no statutory route: DZ-2021 binds Dazu District (500111) only, and the finder `yb-justice-bureau` is in region 500112; name the route explicitly"
        );
        for (finder, subject) in [
            ("yb-justice-bureau", officer("dz-justice-bureau")),
            ("cq-bar-association", officer("cq-high-court")),
            ("sh-psb", Subject::Lawyer),
            ("yb-court", Subject::Lawyer),
        ] {
            let e = statutory_routes(&d, finder, &subject).unwrap_err();
            assert_eq!(no_route_rule(&e), Some("DZ-2021"), "{finder}: {e}");
            assert_eq!(resolve_route(&d, finder, &subject, &[]).unwrap_err(), e);
        }
        // A route a person names is still taken (DZ-6).
        let named = [
            h("yb-court", Duty::RelayUp),
            h("cq-high-court", Duty::Handle),
        ];
        let (route, by_person) =
            resolve_route(&d, "yb-justice-bureau", &officer("cq-high-court"), &named).unwrap();
        assert!(by_person);
        assert_eq!(route.hops, named);
        // Bad input stays bad input outside the territory.
        let e =
            statutory_routes(&d, "yb-justice-bureau", &officer("cq-state-security")).unwrap_err();
        assert_eq!(invalid_rule(&e), Some("DZ-14"), "{e}");
    }

    #[test]
    fn dz_2021_territory_is_the_policy_files() {
        let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy");
        let read = |file: &str| {
            let path = Path::new(policy).join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        };
        let catalogue = crate::policy::PolicyCatalogue::parse(
            vec![read("defaults.toml"), read("dz-2021.toml")],
            &directory(),
        )
        .unwrap();
        assert!(!catalogue.rules().is_empty());
        for rule in catalogue.rules() {
            assert_eq!(rule.territory, DZ_2021_TERRITORY, "{}", rule.rule);
        }
    }

    #[test]
    fn dz_7_a_unit_of_an_organ_is_routed_to_its_organ() {
        let d = directory();
        for unit in ["dz-psb-investigation", "dz-detention-centre"] {
            let r = only_route(&d, "dz-justice-bureau", &officer(unit));
            assert_eq!(
                (r.rule, r.hops.clone()),
                ("DZ-7(1)", vec![h("dz-psb", Duty::Handle)])
            );
        }
        let r = only_route(&d, "dz-justice-bureau", &officer("cq-detention-centre"));
        assert_eq!(
            r.hops,
            vec![h("dz-psb", Duty::RelayUp), h("cq-psb", Duty::Handle)]
        );
    }

    #[test]
    fn dz_7_1_a_lead_on_the_finders_own_staff_has_nothing_to_route() {
        let d = directory();
        let e =
            statutory_routes(&d, "dz-justice-bureau", &officer("dz-justice-bureau")).unwrap_err();
        assert_eq!(invalid_rule(&e), Some("DZ-7(1)"), "{e}");
        assert!(e.to_string().contains("nothing to route"), "{e}");
    }

    #[test]
    fn dz_7_2_municipal_officer_is_relayed_up_by_the_same_level_organ() {
        let d = directory();
        let r = only_route(&d, "dz-justice-bureau", &officer("cq-psb"));
        assert_eq!(r.rule, "DZ-7(2)");
        assert_eq!(
            r.hops,
            vec![h("dz-psb", Duty::RelayUp), h("cq-psb", Duty::Handle)]
        );
        assert_eq!(r.to_string(), "dz-psb (relay up) → cq-psb (handle)");
        assert_eq!(r.first().agency, "dz-psb");
        assert_eq!(r.handler().agency, "cq-psb");
        assert_eq!(r.position("cq-psb"), Some(1));
        assert_eq!(r.position("dz-justice-bureau"), None);
        assert_eq!(r.next_after("dz-psb"), Some(&h("cq-psb", Duty::Handle)));
        assert_eq!(r.next_after("cq-psb"), None);
        assert_eq!(r.next_after("yb-psb"), None);
        assert_eq!(
            r.relays().collect::<Vec<_>>(),
            vec![&h("dz-psb", Duty::RelayUp)]
        );
        let r = only_route(&d, "dz-justice-bureau", &officer("cq-high-court"));
        assert_eq!(
            (r.rule, r.hops),
            (
                "DZ-7(2)",
                vec![
                    h("dz-court", Duty::RelayUp),
                    h("cq-high-court", Duty::Handle)
                ]
            )
        );
    }

    #[test]
    fn dz_7_2_a_municipal_justice_officer_is_sent_up_by_the_finder_itself() {
        let d = directory();
        let r = only_route(&d, "dz-justice-bureau", &officer("cq-justice-bureau"));
        assert_eq!(
            (r.rule, r.hops),
            ("DZ-7(2)", vec![h("cq-justice-bureau", Duty::Handle)])
        );
    }

    #[test]
    fn dz_7_2_without_a_same_level_organ_of_the_system_there_is_no_statutory_route() {
        let d = small_directory(&[
            ("cq-court", "case_unit", "court", "500000", true),
            ("dz-jb", "justice_bureau", "justice", "500111", true),
            ("yb-court", "case_unit", "court", "500112", true),
        ]);
        let e = statutory_routes(&d, "dz-jb", &officer("cq-court")).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-7(2)"), "{e}");
        assert_eq!(
            e.to_string(),
            "DZ-7(2): no statutory route: region 500111 of the finder `dz-jb` has no court organ to pass the lead on (relay up) to `cq-court`; name the route explicitly"
        );
        let e = statutory_routes(&d, "dz-jb", &officer("yb-court")).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-7(3)"), "{e}");
    }

    #[test]
    fn dz_7_3_other_district_officer_is_transferred_across() {
        let d = directory();
        let r = only_route(&d, "dz-justice-bureau", &officer("yb-court"));
        assert_eq!(r.rule, "DZ-7(3)");
        assert_eq!(
            r.hops,
            vec![h("dz-court", Duty::Transfer), h("yb-court", Duty::Handle)]
        );
        assert_eq!(r.to_string(), "dz-court (transfer) → yb-court (handle)");
        let r = only_route(&d, "dz-justice-bureau", &officer("yb-justice-bureau"));
        assert_eq!(
            (r.rule, r.hops),
            ("DZ-7(3)", vec![h("yb-justice-bureau", Duty::Handle)])
        );
    }

    #[test]
    fn dz_7_gives_no_route_down_or_out_of_the_municipality() {
        let d = directory();
        for (finder, organ) in [
            ("cq-justice-bureau", "dz-court"),
            ("sh-justice-bureau", "cq-psb"),
            ("dz-justice-bureau", "sh-psb"),
            ("cq-justice-bureau", "sh-psb"),
        ] {
            // As DZ-7 reads; outside Dazu, DZ-2021 binds nothing anyway.
            let e = anywhere(&d, finder, &officer(organ)).unwrap_err();
            assert_eq!(no_route_rule(&e), Some("DZ-7"), "{finder} {organ}: {e}");
            assert!(
                e.to_string().ends_with("; name the route explicitly"),
                "{e}"
            );
        }
        let e = anywhere(&d, "cq-justice-bureau", &officer("dz-court")).unwrap_err();
        assert!(e.to_string().contains("is municipal"), "{e}");
        let e = statutory_routes(&d, "dz-justice-bureau", &officer("sh-psb")).unwrap_err();
        assert!(e.to_string().contains("outside the municipality"), "{e}");
    }

    #[test]
    fn dz_8_bar_association_follows_dz_7_1_and_3() {
        let d = directory();
        let r = only_route(&d, "dz-bar-committee", &officer("dz-procuratorate"));
        assert_eq!(
            (r.rule, r.hops),
            ("DZ-8/DZ-7(1)", vec![h("dz-procuratorate", Duty::Handle)])
        );
        let r = only_route(&d, "dz-bar-committee", &officer("yb-psb"));
        assert_eq!(
            (r.rule, r.hops),
            (
                "DZ-8/DZ-7(3)",
                vec![h("dz-psb", Duty::Transfer), h("yb-psb", Duty::Handle)]
            )
        );
        let e = statutory_routes(&d, "cq-bar-association", &officer("cq-high-court")).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-2021"), "{e}");
    }

    #[test]
    fn dz_8_bar_association_has_no_rule_for_a_municipal_officer() {
        let d = directory();
        let e = statutory_routes(&d, "dz-bar-committee", &officer("cq-psb")).unwrap_err();
        assert_eq!(
            e,
            LeadError::NoStatutoryRoute {
                rule: "DZ-8",
                reason: "DZ-8 gives a bar association no rule for a municipal-level officer".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "DZ-8: no statutory route: DZ-8 gives a bar association no rule for a municipal-level officer; name the route explicitly"
        );
        assert_eq!(e.rule(), "DZ-8");
        // The gateway asks for a route, then takes the one a person names.
        assert_eq!(
            resolve_route(&d, "dz-bar-committee", &officer("cq-psb"), &[]).unwrap_err(),
            e
        );
        let named = [h("dz-psb", Duty::RelayUp), h("cq-psb", Duty::Handle)];
        let (route, by_person) =
            resolve_route(&d, "dz-bar-committee", &officer("cq-psb"), &named).unwrap();
        assert!(by_person);
        assert_eq!(route.rule, "DZ-6 (named by a person)");
        assert_eq!(route.hops, named);
        // A Shanghai officer is municipal too.
        let e = statutory_routes(&d, "dz-bar-committee", &officer("sh-psb")).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-8"));
        // A municipal bar association and a district officer: no rule either.
        let e = anywhere(&d, "cq-bar-association", &officer("dz-court")).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-8"), "{e}");
    }

    #[test]
    fn dz_8_judicial_organ_finder_with_lawyer_subject_goes_to_the_justice_bureau() {
        let d = directory();
        let routes = statutory_routes(&d, "dz-court", &Subject::Lawyer).unwrap();
        assert_eq!(
            routes,
            vec![
                Route {
                    rule: "DZ-8",
                    hops: vec![h("dz-justice-bureau", Duty::Handle)]
                },
                Route {
                    rule: "DZ-8",
                    hops: vec![
                        h("dz-bar-committee", Duty::ReportToJusticeBureau),
                        h("dz-justice-bureau", Duty::Handle)
                    ]
                },
            ]
        );
        // Default first; the bar association route when a person names it.
        let (r, by_person) = resolve_route(&d, "dz-court", &Subject::Lawyer, &[]).unwrap();
        assert_eq!((&r, by_person), (&routes[0], false));
        let (r, by_person) =
            resolve_route(&d, "dz-court", &Subject::Lawyer, &routes[1].hops).unwrap();
        assert_eq!((&r, by_person), (&routes[1], false));
        assert_eq!(
            r.next_after("dz-bar-committee").unwrap().agency,
            "dz-justice-bureau"
        );
        // A unit, not an organ, finds leads too.
        let r = &statutory_routes(&d, "dz-psb-investigation", &Subject::Lawyer).unwrap()[0];
        assert_eq!(r.hops, vec![h("dz-justice-bureau", Duty::Handle)]);
        let e = statutory_routes(&d, "sh-psb", &Subject::Lawyer).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-2021"), "{e}");
    }

    #[test]
    fn dz_8_bar_association_finder_with_lawyer_subject_goes_to_the_justice_bureau() {
        let d = directory();
        let r = only_route(&d, "dz-bar-committee", &Subject::Lawyer);
        assert_eq!(
            (r.rule, r.hops),
            ("DZ-8", vec![h("dz-justice-bureau", Duty::Handle)])
        );
    }

    #[test]
    fn dz_8_justice_bureau_finder_with_lawyer_subject_has_nothing_to_route() {
        let d = directory();
        let e = statutory_routes(&d, "dz-justice-bureau", &Subject::Lawyer).unwrap_err();
        assert_eq!(invalid_rule(&e), Some("DZ-8"), "{e}");
        let e = resolve_route(
            &d,
            "dz-justice-bureau",
            &Subject::Lawyer,
            &[h("dz-bar-committee", Duty::Handle)],
        )
        .unwrap_err();
        assert_eq!(invalid_rule(&e), Some("DZ-8"), "{e}");
    }

    #[test]
    fn dz_8_lawyer_leads_without_a_bar_or_a_bureau() {
        let d = small_directory(&[
            ("dz-court", "case_unit", "court", "500111", true),
            ("dz-jb", "justice_bureau", "justice", "500111", true),
            ("yb-court", "case_unit", "court", "500112", true),
            ("cq-jb", "justice_bureau", "justice", "500000", true),
        ]);
        let r = only_route(&d, "dz-court", &Subject::Lawyer);
        assert_eq!(r.hops, vec![h("dz-jb", Duty::Handle)]);
        // The municipal bureau is not the same level as a district court.
        let d = small_directory(&[
            ("dz-court", "case_unit", "court", "500111", true),
            ("cq-jb", "justice_bureau", "justice", "500000", true),
        ]);
        let e = statutory_routes(&d, "dz-court", &Subject::Lawyer).unwrap_err();
        assert_eq!(no_route_rule(&e), Some("DZ-8"), "{e}");
    }

    #[test]
    fn dz_6_a_case_unit_finder_has_no_statutory_route_for_an_officer() {
        let d = directory();
        let e = statutory_routes(&d, "dz-court", &officer("dz-psb")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "DZ-6: no statutory route: DZ-7 and DZ-8 route only leads found by a justice bureau or a bar association; name the route explicitly"
        );
        let named = [h("dz-psb", Duty::Handle)];
        let (r, by_person) = resolve_route(&d, "dz-court", &officer("dz-psb"), &named).unwrap();
        assert!(by_person);
        assert_eq!(r.hops, named);
    }

    #[test]
    fn dz_6_the_finder_must_be_known_and_find_leads() {
        let d = directory();
        let e = statutory_routes(&d, "nobody", &Subject::Lawyer).unwrap_err();
        assert_eq!(
            e.to_string(),
            "DZ-6: finder `nobody` is not in the agency directory"
        );
        for finder in ["dz-detention-centre", "dz-legal-aid-centre", "dz-duty-desk"] {
            let e = statutory_routes(&d, finder, &officer("dz-court")).unwrap_err();
            assert_eq!(invalid_rule(&e), Some("DZ-6"), "{e}");
        }
    }

    #[test]
    fn dz_7_unknown_subject_organ_is_rejected() {
        let d = directory();
        let e = statutory_routes(&d, "dz-justice-bureau", &officer("dz-nowhere")).unwrap_err();
        assert_eq!(
            e,
            LeadError::Invalid {
                rule: "DZ-7",
                reason: "subject organ `dz-nowhere` is not in the agency directory".into()
            }
        );
        // A named route does not get round it.
        let e = resolve_route(
            &d,
            "dz-justice-bureau",
            &officer("dz-nowhere"),
            &[h("dz-court", Duty::Handle)],
        )
        .unwrap_err();
        assert_eq!(invalid_rule(&e), Some("DZ-7"));
    }

    #[test]
    fn dz_7_a_unit_whose_system_has_no_organ_in_its_region_is_rejected() {
        let d = small_directory(&[
            ("dz-unit", "case_unit", "police", "500111", false),
            ("dz-jb", "justice_bureau", "justice", "500111", true),
        ]);
        let e = statutory_routes(&d, "dz-jb", &officer("dz-unit")).unwrap_err();
        assert_eq!(invalid_rule(&e), Some("DZ-7"), "{e}");
    }

    #[test]
    fn dz_14_staff_of_non_judicial_organs_are_not_judicial_personnel() {
        let d = directory();
        for organ in [
            "cq-state-security",
            "dz-bar-committee",
            "dz-legal-aid-centre",
            "dz-duty-desk",
        ] {
            for finder in ["dz-justice-bureau", "dz-bar-committee", "dz-court"] {
                let e = statutory_routes(&d, finder, &officer(organ)).unwrap_err();
                assert_eq!(invalid_rule(&e), Some("DZ-14"), "{finder} {organ}: {e}");
            }
        }
        let e =
            statutory_routes(&d, "dz-justice-bureau", &officer("cq-state-security")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("DZ-14: `cq-state-security` belongs to the state_security system"),
            "{e}"
        );
    }

    #[test]
    fn a_named_route_must_be_the_statutory_one_where_there_is_one() {
        let d = directory();
        let subject = officer("cq-psb");
        let (r, by_person) = resolve_route(&d, "dz-justice-bureau", &subject, &[]).unwrap();
        assert!(!by_person);
        assert_eq!(r.rule, "DZ-7(2)");
        let (same, by_person) = resolve_route(&d, "dz-justice-bureau", &subject, &r.hops).unwrap();
        assert_eq!((same, by_person), (r, false));
        let e = resolve_route(
            &d,
            "dz-justice-bureau",
            &subject,
            &[h("cq-psb", Duty::Handle)],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "DZ-7(2): the statutory route is dz-psb (relay up) → cq-psb (handle)"
        );
        let e = resolve_route(
            &d,
            "dz-court",
            &Subject::Lawyer,
            &[h("cq-justice-bureau", Duty::Handle)],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "DZ-8: the statutory routes are dz-justice-bureau (handle); or dz-bar-committee (report to justice bureau) → dz-justice-bureau (handle)"
        );
    }

    #[test]
    fn dz_6_explicit_route_is_accepted() {
        let d = directory();
        let hops = [
            h("dz-psb", Duty::RelayUp),
            h("cq-psb", Duty::Transfer),
            h("cq-justice-bureau", Duty::Handle),
        ];
        let r = check_explicit_route(&d, "dz-bar-committee", &hops).unwrap();
        assert_eq!(r.rule, "DZ-6 (named by a person)");
        assert_eq!(r.hops, hops);
        assert_eq!(r.relays().count(), 2);
        let r = check_explicit_route(
            &d,
            "dz-bar-committee",
            &[h("cq-bar-association", Duty::Handle)],
        )
        .unwrap();
        assert_eq!(r.handler().agency, "cq-bar-association");
    }

    #[test]
    fn dz_6_explicit_route_rejections() {
        let d = directory();
        let bad: Vec<(&str, Vec<RouteHop>, &str)> = vec![
            ("dz-bar-committee", vec![], "no hops"),
            (
                "dz-bar-committee",
                vec![h("cq-nowhere", Duty::Handle)],
                "hop 1: `cq-nowhere` is not in the agency directory",
            ),
            (
                "dz-bar-committee",
                vec![
                    h("dz-bar-committee", Duty::RelayUp),
                    h("cq-psb", Duty::Handle),
                ],
                "hop 1: `dz-bar-committee` is the finder",
            ),
            (
                "dz-bar-committee",
                vec![h("dz-detention-centre", Duty::Handle)],
                "hop 1: `dz-detention-centre` is a detention_centre",
            ),
            (
                "dz-bar-committee",
                vec![
                    h("dz-psb", Duty::RelayUp),
                    h("cq-psb", Duty::Transfer),
                    h("dz-psb", Duty::Handle),
                ],
                "hop 3: `dz-psb` is on the route twice",
            ),
            (
                "dz-bar-committee",
                vec![h("dz-psb", Duty::RelayUp), h("cq-psb", Duty::RelayUp)],
                "hop 2: the last hop `cq-psb` must handle the lead, not relay up",
            ),
            (
                "dz-bar-committee",
                vec![h("dz-psb", Duty::Handle), h("cq-psb", Duty::Handle)],
                "hop 1: `dz-psb` is not the last hop, so it must relay up, transfer or report to the justice bureau, not handle",
            ),
            (
                "dz-bar-committee",
                vec![h("dz-psb", Duty::Unspecified), h("cq-psb", Duty::Handle)],
                "not unspecified duty",
            ),
            (
                "dz-bar-committee",
                vec![RouteHop {
                    agency: "cq-psb".into(),
                    duty: 99,
                }],
                "not unknown duty",
            ),
            (
                "dz-duty-desk",
                vec![h("cq-psb", Duty::Handle)],
                "finder `dz-duty-desk` is a duty_lawyer_desk",
            ),
            (
                "nobody",
                vec![h("cq-psb", Duty::Handle)],
                "finder `nobody` is not in the agency directory",
            ),
        ];
        for (finder, hops, want) in bad {
            let e = check_explicit_route(&d, finder, &hops).unwrap_err();
            assert_eq!(invalid_rule(&e), Some("DZ-6"), "{e}");
            assert!(e.to_string().contains(want), "{hops:?}: {e}");
            // Where there is no statutory route, the gateway applies the same checks.
            if !hops.is_empty() {
                let e2 = resolve_route(&d, finder, &officer("cq-psb"), &hops).unwrap_err();
                if finder == "dz-bar-committee" {
                    assert_eq!(e2, e);
                } else {
                    assert_eq!(invalid_rule(&e2), Some("DZ-6"), "{e2}");
                }
            }
        }
    }

    /// What the rule table says a lead from `finder` about `subject` gets,
    /// worked out from levels and regions independently of the code above.
    #[derive(Debug, PartialEq)]
    enum Expect {
        /// The default route's rule, its hop count, and how many routes.
        Route(&'static str, usize, usize),
        NoRoute(&'static str),
        Invalid(&'static str),
    }

    const JUDICIAL: [OrganSystem; 4] = [
        OrganSystem::Court,
        OrganSystem::Procuratorate,
        OrganSystem::Police,
        OrganSystem::Justice,
    ];

    fn organ_in<'d>(d: &'d Directory, system: OrganSystem, region: &str) -> Option<&'d Agency> {
        d.agencies()
            .iter()
            .find(|a| a.organ && a.system == system && a.region == region)
    }

    fn expected(d: &Directory, finder: &Agency, subject: Option<&Agency>) -> Expect {
        match expected_anywhere(d, finder, subject) {
            Expect::Invalid(rule) => Expect::Invalid(rule),
            _ if finder.region != "500111" => Expect::NoRoute("DZ-2021"),
            other => other,
        }
    }

    /// [`expected`] as if DZ-2021 bound every region.
    fn expected_anywhere(d: &Directory, finder: &Agency, subject: Option<&Agency>) -> Expect {
        if finder.system == OrganSystem::StateSecurity {
            return Expect::Invalid("DZ-6");
        }
        let Some(a) = subject else {
            if finder.kind == AgencyKind::JusticeBureau {
                return Expect::Invalid("DZ-8");
            }
            let Some(_) = organ_in(d, OrganSystem::Justice, &finder.region) else {
                return Expect::NoRoute("DZ-8");
            };
            let bar = finder.kind == AgencyKind::CaseUnit
                && organ_in(d, OrganSystem::Bar, &finder.region).is_some();
            return Expect::Route("DZ-8", 1, 1 + usize::from(bar));
        };
        if !JUDICIAL.contains(&a.system) {
            return Expect::Invalid("DZ-14");
        }
        let organ = if a.organ {
            a
        } else {
            match organ_in(d, a.system, &a.region) {
                Some(o) => o,
                None => return Expect::Invalid("DZ-7"),
            }
        };
        let bureau = match finder.kind {
            AgencyKind::CaseUnit => return Expect::NoRoute("DZ-6"),
            AgencyKind::JusticeBureau => true,
            _ => false,
        };
        let finder_parent = d.region(&finder.region).unwrap().parent.clone();
        let organ_parent = d.region(&organ.region).unwrap().parent.clone();
        let same = finder.region == organ.region;
        let up = finder_parent.as_deref() == Some(organ.region.as_str());
        let across = !same && finder_parent.is_some() && finder_parent == organ_parent;
        let relay = organ_in(d, organ.system, &finder.region);
        let relayed = |rule| match relay {
            Some(r) if r.id == finder.id => Expect::Route(rule, 1, 1),
            Some(_) => Expect::Route(rule, 2, 1),
            None => Expect::NoRoute(rule),
        };
        match (bureau, same, up, across) {
            (true, true, ..) if organ.id == finder.id => Expect::Invalid("DZ-7(1)"),
            (true, true, ..) => Expect::Route("DZ-7(1)", 1, 1),
            (true, _, true, _) => relayed("DZ-7(2)"),
            (true, _, _, true) => relayed("DZ-7(3)"),
            (true, ..) => Expect::NoRoute("DZ-7"),
            (false, true, ..) => Expect::Route("DZ-8/DZ-7(1)", 1, 1),
            (false, _, _, true) => relayed("DZ-8/DZ-7(3)"),
            (false, ..) => Expect::NoRoute("DZ-8"),
        }
    }

    fn check_invariants(d: &Directory, finder: &Agency, subject: Option<&Agency>, route: &Route) {
        let ctx = format!("{} about {:?}: {route}", finder.id, subject.map(|a| &a.id));
        assert!(!route.hops.is_empty(), "{ctx}");
        assert_eq!(route.handler().duty, Duty::Handle as i32, "{ctx}");
        let handler = d.get(&route.handler().agency).unwrap();
        match subject {
            Some(a) => {
                assert_eq!(handler.system, a.system, "{ctx}");
                assert_eq!(handler.region, a.region, "{ctx}");
                assert!(handler.organ, "{ctx}");
            }
            None => {
                assert_eq!(handler.kind, AgencyKind::JusticeBureau, "{ctx}");
                assert_eq!(handler.region, finder.region, "{ctx}");
            }
        }
        let mut seen = HashSet::new();
        for hop in &route.hops {
            assert_ne!(hop.agency, finder.id, "{ctx}");
            assert!(seen.insert(&hop.agency), "{ctx}");
        }
        for relay in route.relays() {
            assert_ne!(relay.duty, Duty::Handle as i32, "{ctx}");
            let agency = d.get(&relay.agency).unwrap();
            assert!(agency.organ, "{ctx}");
            assert_eq!(agency.region, finder.region, "{ctx}");
            match subject {
                Some(a) => {
                    assert_eq!(agency.system, a.system, "{ctx}");
                    let want = if route.rule.ends_with("(2)") {
                        Duty::RelayUp
                    } else {
                        Duty::Transfer
                    };
                    assert_eq!(relay.duty, want as i32, "{ctx}");
                }
                None => {
                    assert_eq!(agency.kind, AgencyKind::BarAssociation, "{ctx}");
                    assert_eq!(relay.duty, Duty::ReportToJusticeBureau as i32, "{ctx}");
                }
            }
        }
        // A statutory route is also a valid route for a person to name.
        let checked = check_explicit_route(d, &finder.id, &route.hops).unwrap();
        assert_eq!(checked.hops, route.hops, "{ctx}");
    }

    #[test]
    fn exhaustive_every_finder_and_every_subject_follows_the_rule_table() {
        let d = directory();
        let finders: Vec<&Agency> = d
            .agencies()
            .iter()
            .filter(|a| LEAD_KINDS.contains(&a.kind))
            .collect();
        let subjects: Vec<Option<&Agency>> = d
            .agencies()
            .iter()
            .map(Some)
            .chain(std::iter::once(None))
            .collect();
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for finder in &finders {
            for &subject in &subjects {
                let s = subject.map_or(Subject::Lawyer, |a| officer(&a.id));
                let want = expected(&d, finder, subject);
                let got = statutory_routes(&d, &finder.id, &s);
                let ctx = format!("{} about {s:?}: {got:?}", finder.id);
                match (&want, &got) {
                    (Expect::Route(rule, hops, count), Ok(routes)) => {
                        assert_eq!(routes.len(), *count, "{ctx}");
                        assert_eq!(routes[0].rule, *rule, "{ctx}");
                        assert_eq!(routes[0].hops.len(), *hops, "{ctx}");
                        for route in routes {
                            check_invariants(&d, finder, subject, route);
                            let (r, by_person) =
                                resolve_route(&d, &finder.id, &s, &route.hops).unwrap();
                            assert_eq!((&r, by_person), (route, false), "{ctx}");
                        }
                        let (r, by_person) = resolve_route(&d, &finder.id, &s, &[]).unwrap();
                        assert_eq!((&r, by_person), (&routes[0], false), "{ctx}");
                    }
                    (Expect::NoRoute(rule), Err(e)) => {
                        assert_eq!(no_route_rule(e), Some(*rule), "{ctx}");
                        assert_eq!(resolve_route(&d, &finder.id, &s, &[]).as_ref(), Err(e));
                    }
                    (Expect::Invalid(rule), Err(e)) => {
                        assert_eq!(invalid_rule(e), Some(*rule), "{ctx}");
                        let named = [h("cq-psb", Duty::Handle)];
                        assert_eq!(resolve_route(&d, &finder.id, &s, &named).as_ref(), Err(e));
                    }
                    _ => panic!("expected {want:?}, got {ctx}"),
                }
                let key = match &want {
                    Expect::Route(rule, ..) => format!("route {rule}"),
                    Expect::NoRoute(rule) => format!("no route {rule}"),
                    Expect::Invalid(rule) => format!("invalid {rule}"),
                };
                *seen.entry(key).or_default() += 1;
            }
        }
        assert_eq!(seen.values().sum::<usize>(), finders.len() * subjects.len());
        // Every line of the rule table that the shipped directory can reach
        // was reached.
        for key in [
            "route DZ-7(1)",
            "route DZ-7(2)",
            "route DZ-7(3)",
            "route DZ-8/DZ-7(1)",
            "route DZ-8/DZ-7(3)",
            "route DZ-8",
            "no route DZ-6",
            "no route DZ-7",
            "no route DZ-8",
            "no route DZ-2021",
            "invalid DZ-7(1)",
            "invalid DZ-8",
            "invalid DZ-14",
        ] {
            assert!(seen.contains_key(key), "{key} never reached: {seen:?}");
        }
    }
}
