//! The policy catalogue: the obligations each message kind creates, their
//! deadlines and whom to notify when overdue; the territory each entry binds;
//! the reasons a meeting may be refused; the order centres serve in.
//!
//! Regional policy is data, not code (DOMAIN.md, SH-2012 §2): the catalogue is
//! loaded from a directory (`deploy/policy/`) and validated against the agency
//! directory before anything starts. Every `*.toml` directly in it is a policy
//! file; `calendars/*.toml` are region calendars ([`crate::calendar`]).
//!
//! # Who binds where (DOMAIN.md)
//! Every entry names the `territory` it binds, a region code of the
//! directory: it binds that region and its districts, and nowhere else. An
//! obligation arises only when the *region of the matter*
//! ([`region_of_matter`]) lies in its territory: for a misconduct lead, the
//! region of its finder (`found_by`); for a message the lawyer service sends
//! on a lawyer's behalf, the recipient's region; otherwise the sender's. A
//! region no entry binds has no obligation from it, never another region's.
//!
//! ```toml
//! [durations]                 # "promptly" (及时) has no number in the sources
//! promptly = "2 working days"
//!
//! [[obligation]]
//! rule = "CQ-1.1b"            # DOMAIN.md rule id
//! territory = "500000"        # a region code: it and its districts
//! kind = "legal_help_request" # MessageKind code name
//! duty = "hand the detainee's legal-help request to a duty lawyer"
//! bearer = "sender"           # sender | recipient
//! clock = "requested"         # requested (the envelope's clock_started_at) | submitted
//! deadline = "24h"            # <n>h | <n>m | <n>d | "<n> working hours" | "<n> working days" | a [durations] name
//! met_by = "delivered"        # delivered | acknowledged | feedback | relayed | hearing | held
//! when = "hearing_requested"  # optional: hearing_requested (CQ-3.13) | temporarily_held_ordinary (CQ-1.3e)
//! notify = ["sender", "supervisor"]   # sender | recipient | bearer | supervisor | an agency id
//!
//! [[notice]]                  # a kind that is known but creates no obligation
//! kind = "booked_slot_notice"
//! rule = "SH-2.8"
//! territory = "310000"
//!
//! [[refusal]]                 # a reason a meeting may be refused for (CQ-1.3a)
//! reason = "no_booking"       # RefusalReason code name
//! rule = "CQ-2.5"
//! territory = "500000"
//! allowed = false             # optional, default true: false forbids the reason there
//! lawful = true               # required when allowed: a lawful refusal meets the 48-hour duty
//!
//! [[order]]                   # the centre serves these kinds in order of acceptance
//! rule = "CQ-1.3b"
//! kinds = ["lawyer_meeting_request", "interrogation_request"]
//! territory = "500000"
//! ```
//!
//! `met_by = "held"` (CQ-1.3a, CQ-1.3e) is met by the centre's feedback with
//! outcome `OUTCOME_HELD`, or by a refusal whose reason is lawful in the
//! refusing centre's region ([`PolicyCatalogue::refusal`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use toml::Spanned;

use crate::agency::{AgencyKind, Level, OrganSystem};
use crate::calendar::{Calendar, line_of};
use crate::directory::{Agency, Directory};
use crate::kind::KindExt;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{CaseType, Envelope, MessageKind, RefusalReason};

/// A policy or calendar file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read {what}: {source}")]
    Read {
        path: PathBuf,
        /// What was being read, e.g. "the policy directory".
        what: &'static str,
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape; the
    /// message carries toml's own line and column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {problem}")]
    Invalid {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    /// A problem with no line, e.g. a policy directory with no policy files.
    #[error("{path}: {problem}")]
    Unusable { path: PathBuf, problem: String },
}

impl PolicyError {
    pub(crate) fn parse(path: &Path, error: &toml::de::Error) -> Self {
        PolicyError::Parse {
            path: path.to_path_buf(),
            message: error.to_string().trim_end().replace('\n', "\n  "),
        }
    }
}

/// One side of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Party {
    Sender,
    Recipient,
}

impl Party {
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Party::Sender => "sender",
            Party::Recipient => "recipient",
        }
    }
}

/// What starts an obligation's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClockStart {
    /// The envelope's `clock_started_at`, e.g. when the detainee asked (CQ-1.1b).
    Requested,
    /// When the message was submitted to the bus.
    Submitted,
}

impl ClockStart {
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            ClockStart::Requested => "requested",
            ClockStart::Submitted => "submitted",
        }
    }
}

/// How long an obligation may stay open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Deadline {
    /// Calendar time: "24h" is exactly 24 hours, nights and holidays included.
    Calendar(TimeDelta),
    /// Hours of reception on working days of the bearer's region.
    WorkingHours(u32),
    /// Until the close of reception on the n-th working day after the start.
    WorkingDays(u32),
}

/// What meets an obligation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetBy {
    /// The message reached the recipient's system.
    Delivered,
    /// A person at the recipient acknowledged it.
    Acknowledged,
    /// The recipient answered (feedback).
    Feedback,
    /// The recipient passed a misconduct lead on to the next organ of its
    /// route (DZ-7 relay up or transfer). Misconduct-lead rules met this way
    /// bind a relay; the others bind the handling organ.
    Relayed,
    /// The recipient heard the complainant in person: a feedback whose
    /// outcome is `OUTCOME_HEARD` (CQ-3.13).
    Hearing,
    /// The meeting (or interrogation) took place: a feedback whose outcome
    /// is `OUTCOME_HELD`, or a refusal whose reason is lawful in the
    /// refusing centre's region (CQ-1.3a: "within 48 hours"; CQ-1.3e).
    Held,
}

/// When a rule applies, beyond its message kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Condition {
    /// The rights complaint asks for the lawyer to be heard in person (CQ-3.13).
    HearingRequested,
    /// The meeting request is for a temporarily held person suspected of an
    /// ordinary offence (CQ-1.3e: the meeting is arranged promptly).
    TemporarilyHeldOrdinary,
}

impl Condition {
    /// The code name used in policy files.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Condition::HearingRequested => "hearing_requested",
            Condition::TemporarilyHeldOrdinary => "temporarily_held_ordinary",
        }
    }

    /// Whether the condition holds of a message's payload.
    #[must_use]
    pub fn holds(self, payload: Option<&Payload>) -> bool {
        match (self, payload) {
            (Condition::HearingRequested, Some(Payload::RightsComplaint(c))) => c.hearing_requested,
            (Condition::TemporarilyHeldOrdinary, Some(Payload::LawyerMeetingRequest(r))) => {
                r.temporarily_held && r.case_type == CaseType::Ordinary as i32
            }
            _ => false,
        }
    }
}

impl MetBy {
    /// Every way an obligation is met.
    pub const ALL: [MetBy; 6] = [
        MetBy::Delivered,
        MetBy::Acknowledged,
        MetBy::Feedback,
        MetBy::Relayed,
        MetBy::Hearing,
        MetBy::Held,
    ];

    /// The way with this code ([`MetBy::code`]).
    #[must_use]
    pub fn from_code(code: &str) -> Option<MetBy> {
        MetBy::ALL.into_iter().find(|m| m.code() == code)
    }

    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            MetBy::Delivered => "delivered",
            MetBy::Acknowledged => "acknowledged",
            MetBy::Feedback => "feedback",
            MetBy::Relayed => "relayed",
            MetBy::Hearing => "hearing",
            MetBy::Held => "held",
        }
    }
}

/// Who is told when an obligation is overdue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NotifyTarget {
    Sender,
    Recipient,
    /// The party bearing the obligation.
    Bearer,
    /// The body supervising the bearer ([`supervisor_of`]): a detention
    /// centre's police organ, a judicial organ's organ above, a lawyers'
    /// body's justice bureau (DOMAIN.md, "Who supervises whom").
    Supervisor,
    /// A fixed agency, by id (checked against the directory on load).
    Agency(String),
}

/// One obligation a message kind creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObligationRule {
    /// The DOMAIN.md rule id, e.g. "CQ-1.1b".
    pub rule: String,
    pub kind: MessageKind,
    /// What the bearer must do, in words.
    pub duty: String,
    pub bearer: Party,
    pub clock: ClockStart,
    /// The deadline, named durations resolved.
    pub deadline: Deadline,
    /// The text as written, e.g. "promptly" or "24h".
    pub deadline_text: String,
    pub met_by: MetBy,
    pub notify: Vec<NotifyTarget>,
    /// Applies only when this holds of the payload.
    pub when: Option<Condition>,
    /// The region code it binds, with its districts (module docs).
    pub territory: String,
}

/// A kind that is known but creates no obligation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub rule: String,
    pub kind: MessageKind,
    /// The region code it binds, with its districts.
    pub territory: String,
}

/// What a territory says of one reason to refuse a meeting (CQ-1.3a: the
/// lawyer is told why, from a closed list; CQ-2.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalRule {
    pub reason: RefusalReason,
    /// The DOMAIN.md rule that allows, forbids or excuses it, e.g. "CQ-1.2";
    /// empty when no refusal entry binds the region.
    pub rule: String,
    /// The region code it binds, with its districts; empty when none does.
    pub territory: String,
    /// A lawful refusal meets the 48-hour duty (`met_by = "held"`); any
    /// other only tells the lawyer why.
    pub lawful: bool,
    /// False: the reason may not be given there (CQ-2.5).
    pub allowed: bool,
}

/// The kinds a centre serves in order of acceptance (CQ-1.3b, SH-2.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRule {
    pub rule: String,
    pub kinds: Vec<MessageKind>,
    /// The region code it binds, with its districts.
    pub territory: String,
}

/// A refusal the policy does not allow, naming the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {problem}")]
pub struct RuleViolation {
    /// The DOMAIN.md rule, e.g. "CQ-2.5".
    pub rule: String,
    pub problem: String,
}

/// The validated policy catalogue: obligations, notices, refusal reasons,
/// service order, named durations and region calendars.
#[derive(Clone, Debug)]
pub struct PolicyCatalogue {
    rules: Vec<ObligationRule>,
    notices: Vec<Notice>,
    refusals: Vec<RefusalRule>,
    orders: Vec<OrderRule>,
    durations: BTreeMap<String, (Deadline, String)>,
    calendars: BTreeMap<String, Calendar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    durations: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    obligation: Vec<ObligationEntry>,
    #[serde(default)]
    notice: Vec<NoticeEntry>,
    #[serde(default)]
    refusal: Vec<RefusalEntry>,
    #[serde(default)]
    order: Vec<OrderEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObligationEntry {
    rule: Spanned<String>,
    kind: Spanned<String>,
    duty: Spanned<String>,
    bearer: Spanned<String>,
    clock: Spanned<String>,
    deadline: Spanned<String>,
    met_by: Spanned<String>,
    notify: Spanned<Vec<Spanned<String>>>,
    when: Option<Spanned<String>>,
    territory: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoticeEntry {
    kind: Spanned<String>,
    rule: Spanned<String>,
    territory: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefusalEntry {
    reason: Spanned<String>,
    rule: Spanned<String>,
    territory: Spanned<String>,
    lawful: Option<Spanned<bool>>,
    allowed: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderEntry {
    rule: Spanned<String>,
    kinds: Spanned<Vec<Spanned<String>>>,
    territory: Spanned<String>,
}

const DEADLINE_SHAPES: &str =
    "<n>h, <n>m, <n>d, \"<n> working hours\", \"<n> working days\" or a name from [durations]";
const DURATION_SHAPES: &str = "<n>h, <n>m, <n>d, \"<n> working hours\" or \"<n> working days\"";

impl PolicyCatalogue {
    /// Reads and validates `dir/*.toml` and `dir/calendars/*.toml` against the directory.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file, the line and what is wrong.
    pub fn load(dir: &Path, directory: &Directory) -> Result<Self, PolicyError> {
        let mut texts = Vec::new();
        for path in toml_files(dir, "the policy directory")? {
            let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
                path: path.clone(),
                what: "the policy file",
                source,
            })?;
            texts.push((path, text));
        }
        if texts.is_empty() {
            return Err(PolicyError::Unusable {
                path: dir.to_path_buf(),
                problem: "no policy files (*.toml) in this directory".into(),
            });
        }
        let mut catalogue = Self::parse(texts, directory)?;
        catalogue.calendars = load_calendars(dir, directory)?;
        Ok(catalogue)
    }

    /// Validates policy files given as (path, text), without calendars; the
    /// paths only name the files in errors. What [`PolicyCatalogue::load`]
    /// does once it has read them (and what the fuzz target drives).
    ///
    /// # Errors
    /// [`PolicyError`] naming the file, the line and what is wrong.
    pub fn parse(
        texts: Vec<(PathBuf, String)>,
        directory: &Directory,
    ) -> Result<Self, PolicyError> {
        let mut files = Vec::new();
        for (path, text) in texts {
            let file: PolicyFile =
                toml::from_str(&text).map_err(|e| PolicyError::parse(&path, &e))?;
            files.push((path, text, file));
        }

        // Named durations first, so that any file may use a name from any other.
        let mut durations: BTreeMap<String, (Deadline, String)> = BTreeMap::new();
        let mut duration_at: HashMap<String, String> = HashMap::new();
        for (path, text, file) in &files {
            for (name, value) in &file.durations {
                let here = Here { path, text };
                let at = value.span().start;
                if !is_duration_name(name) {
                    return Err(here.invalid(
                        at,
                        format!(
                            "durations.{name}: a name is lowercase letters, digits and underscores, starting with a letter"
                        ),
                    ));
                }
                let deadline = parse_literal(value.get_ref())
                    .ok_or_else(|| {
                        here.invalid(
                            at,
                            format!(
                                "durations.{name} {:?}: expected {DURATION_SHAPES}",
                                value.get_ref()
                            ),
                        )
                    })?
                    .map_err(|why| {
                        here.invalid(at, format!("durations.{name} {:?}: {why}", value.get_ref()))
                    })?;
                if let Some(first) = duration_at.get(name) {
                    return Err(here.invalid(
                        at,
                        format!("durations.{name} is already defined at {first}"),
                    ));
                }
                duration_at.insert(name.clone(), here.at(at));
                durations.insert(name.clone(), (deadline, value.get_ref().clone()));
            }
        }

        let mut rules: Vec<ObligationRule> = Vec::new();
        let mut rule_at: HashMap<(String, MessageKind, MetBy), String> = HashMap::new();
        let mut notices: Vec<Notice> = Vec::new();
        let mut notice_at: HashMap<(MessageKind, String), String> = HashMap::new();
        let mut refusals: Vec<RefusalRule> = Vec::new();
        let mut refusal_at: HashMap<(RefusalReason, String), String> = HashMap::new();
        let mut orders: Vec<OrderRule> = Vec::new();
        let mut order_at: HashMap<(MessageKind, String), String> = HashMap::new();
        let mut obligation_at: HashMap<MessageKind, String> = HashMap::new();
        for (path, text, file) in &files {
            let here = Here { path, text };
            for entry in &file.obligation {
                let rule = parse_obligation(entry, &durations, directory, &here)?;
                let at = entry.rule.span().start;
                // One obligation per rule, kind and what meets it (its id in the ledger).
                let key = (rule.rule.clone(), rule.kind, rule.met_by);
                if let Some(first) = rule_at.get(&key) {
                    return Err(here.invalid(
                        at,
                        format!(
                            "obligation {} for {} is already defined at {first}",
                            rule.rule,
                            rule.kind.code()
                        ),
                    ));
                }
                rule_at.insert(key, here.at(at));
                obligation_at
                    .entry(rule.kind)
                    .or_insert_with(|| here.at(entry.kind.span().start));
                rules.push(rule);
            }
            for entry in &file.notice {
                let rule = entry.rule.get_ref().trim();
                if rule.is_empty() {
                    return Err(here.invalid(
                        entry.rule.span().start,
                        "notice: rule is empty: cite a DOMAIN.md rule id".into(),
                    ));
                }
                let name = format!("notice {rule}");
                let kind = parse_kind(&entry.kind, &name, &here)?;
                let territory = parse_territory(&entry.territory, &name, directory, &here)?;
                let at = entry.kind.span().start;
                let key = (kind, territory.clone());
                if let Some(first) = notice_at.get(&key) {
                    return Err(here.invalid(
                        at,
                        format!(
                            "notice {rule}: {} is already a notice in territory {territory} at {first}",
                            kind.code()
                        ),
                    ));
                }
                notice_at.insert(key, here.at(at));
                notices.push(Notice {
                    rule: rule.to_owned(),
                    kind,
                    territory,
                });
            }
            for entry in &file.refusal {
                let refusal = parse_refusal(entry, directory, &here)?;
                let key = (refusal.reason, refusal.territory.clone());
                let at = entry.reason.span().start;
                if let Some(first) = refusal_at.get(&key) {
                    return Err(here.invalid(
                        at,
                        format!(
                            "refusal {}: reason {} is already listed for territory {} at {first}",
                            refusal.rule,
                            reason_code(refusal.reason),
                            refusal.territory
                        ),
                    ));
                }
                refusal_at.insert(key, here.at(at));
                refusals.push(refusal);
            }
            for entry in &file.order {
                let order = parse_order(entry, directory, &here)?;
                for (kind, spanned) in order.kinds.iter().zip(entry.kinds.get_ref()) {
                    let key = (*kind, order.territory.clone());
                    if let Some(first) = order_at.get(&key) {
                        return Err(here.invalid(
                            spanned.span().start,
                            format!(
                                "order {}: {} is already ordered in territory {} at {first}",
                                order.rule,
                                kind.code(),
                                order.territory
                            ),
                        ));
                    }
                    order_at.insert(key, here.at(spanned.span().start));
                }
                orders.push(order);
            }
        }
        // A kind is a notice (no obligation) or has obligations, never both.
        for (path, text, file) in &files {
            let here = Here { path, text };
            for entry in &file.notice {
                let Some(kind) = MessageKind::from_code(entry.kind.get_ref()) else {
                    continue;
                };
                if let Some(obligation) = obligation_at.get(&kind) {
                    return Err(here.invalid(
                        entry.kind.span().start,
                        format!(
                            "notice {}: {} creates an obligation at {obligation}, so it is not a notice",
                            entry.rule.get_ref().trim(),
                            kind.code()
                        ),
                    ));
                }
            }
        }

        Ok(Self {
            rules,
            notices,
            refusals,
            orders,
            durations,
            calendars: BTreeMap::new(),
        })
    }

    /// Every obligation rule, in file-name then file order.
    #[must_use]
    pub fn rules(&self) -> &[ObligationRule] {
        &self.rules
    }

    /// The obligations a message of `kind` creates, in file-name then file order.
    pub fn rules_for(&self, kind: MessageKind) -> impl Iterator<Item = &ObligationRule> {
        self.rules.iter().filter(move |r| r.kind == kind)
    }

    /// The obligations a message of `kind` creates when the region of its
    /// matter ([`region_of_matter`]) is `region`: those whose territory
    /// binds it, in file-name then file order.
    pub fn rules_binding<'a>(
        &'a self,
        kind: MessageKind,
        region: &'a str,
        directory: &'a Directory,
    ) -> impl Iterator<Item = &'a ObligationRule> + 'a {
        self.rules_for(kind)
            .filter(move |r| binds(&r.territory, region, directory))
    }

    /// The kinds that are known but create no obligation.
    #[must_use]
    pub fn notices(&self) -> &[Notice] {
        &self.notices
    }

    /// Every `[[refusal]]` entry, in file-name then file order.
    #[must_use]
    pub fn refusals(&self) -> &[RefusalRule] {
        &self.refusals
    }

    /// Every `[[order]]` entry, in file-name then file order.
    #[must_use]
    pub fn orders(&self) -> &[OrderRule] {
        &self.orders
    }

    /// The service-order rule binding a centre in `region` (CQ-1.3b,
    /// SH-2.7): the one of its own region before its municipality's.
    #[must_use]
    pub fn order_for(&self, region: &str, directory: &Directory) -> Option<&OrderRule> {
        self.orders
            .iter()
            .filter(|o| binds(&o.territory, region, directory))
            .max_by_key(|o| o.territory == region)
    }

    /// What the policy of `region` (the refusing centre's) says of refusing
    /// a meeting for `reason` (CQ-1.3a, CQ-2.5): its rule and whether it is
    /// lawful (a lawful refusal meets the 48-hour duty). A region's own
    /// entries come before its municipality's. A region no refusal entry
    /// binds accepts every reason as not lawful (rule and territory empty).
    ///
    /// # Errors
    /// [`RuleViolation`] for an unspecified reason; for a reason forbidden
    /// there (naming the rule that forbids it, e.g. CQ-2.5 for `no_booking`
    /// in Chongqing); and for a reason the region's list leaves out (naming
    /// the rule that has the lawyer told why: the territory's
    /// "told why" obligation on a meeting request, else its first refusal
    /// entry's rule).
    pub fn refusal(
        &self,
        reason: RefusalReason,
        region: &str,
        directory: &Directory,
    ) -> Result<RefusalRule, RuleViolation> {
        let binding: Vec<&RefusalRule> = self
            .refusals
            .iter()
            .filter(|r| binds(&r.territory, region, directory))
            .collect();
        let told_why = || {
            self.rules_binding(MessageKind::LawyerMeetingRequest, region, directory)
                .find(|r| r.met_by == MetBy::Feedback)
                .map(|r| r.rule.clone())
                .or_else(|| binding.first().map(|r| r.rule.clone()))
                .unwrap_or_else(|| "CQ-1.3a".to_owned())
        };
        if reason == RefusalReason::Unspecified {
            return Err(RuleViolation {
                rule: told_why(),
                problem: "a refusal names its reason, from the closed list of RefusalReason".into(),
            });
        }
        if binding.is_empty() {
            return Ok(RefusalRule {
                reason,
                rule: String::new(),
                territory: String::new(),
                lawful: false,
                allowed: true,
            });
        }
        let found = binding
            .iter()
            .filter(|r| r.reason == reason)
            .max_by_key(|r| r.territory == region);
        match found {
            Some(r) if r.allowed => Ok((*r).clone()),
            Some(r) => Err(RuleViolation {
                rule: r.rule.clone(),
                problem: format!(
                    "`{}` is no reason to refuse a meeting in region {region} (territory {})",
                    reason_code(reason),
                    r.territory
                ),
            }),
            None => {
                let mut listed: Vec<String> = binding
                    .iter()
                    .filter(|r| r.allowed)
                    .map(|r| reason_code(r.reason))
                    .collect();
                listed.sort();
                listed.dedup();
                Err(RuleViolation {
                    rule: told_why(),
                    problem: format!(
                        "`{}` is not a reason listed for region {region} (listed: {})",
                        reason_code(reason),
                        listed.join(", ")
                    ),
                })
            }
        }
    }

    /// A named duration from `[durations]`, e.g. "promptly".
    #[must_use]
    pub fn duration(&self, name: &str) -> Option<Deadline> {
        self.durations.get(name).map(|(d, _)| *d)
    }

    /// Whether the catalogue knows the kind: it has an obligation or notice
    /// entry, it is a reply kind (acknowledgement, feedback, overdue_notice),
    /// or the bus raises it itself (forgery_alert).
    #[must_use]
    pub fn knows(&self, kind: MessageKind) -> bool {
        kind.is_reply()
            || kind == MessageKind::ForgeryAlert
            || self.rules.iter().any(|r| r.kind == kind)
            || self.notices.iter().any(|n| n.kind == kind)
    }

    /// The calendar of a region (own, else its municipality's, else
    /// [`Calendar::always_open`]).
    #[must_use]
    pub fn calendar_for(&self, region: &str, directory: &Directory) -> Cow<'_, Calendar> {
        if let Some(own) = self.calendars.get(region) {
            return Cow::Borrowed(own);
        }
        directory
            .region(region)
            .and_then(|r| r.parent.as_deref())
            .and_then(|parent| self.calendars.get(parent))
            .map_or_else(|| Cow::Owned(Calendar::always_open(region)), Cow::Borrowed)
    }

    /// The deadline of `rule` for an obligation borne by `bearer` whose clock
    /// started at `start` (working time on the bearer's region's calendar).
    #[must_use]
    pub fn due_at(
        &self,
        rule: &ObligationRule,
        start: DateTime<Utc>,
        bearer: &Agency,
        directory: &Directory,
    ) -> DateTime<Utc> {
        match rule.deadline {
            Deadline::Calendar(span) => start
                .checked_add_signed(span)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            Deadline::WorkingHours(hours) => self
                .calendar_for(&bearer.region, directory)
                .add_working_hours(start, hours),
            Deadline::WorkingDays(days) => self
                .calendar_for(&bearer.region, directory)
                .add_working_days(start, days),
        }
    }

    /// The agency ids to notify when `rule`'s obligation is overdue, resolved
    /// and deduplicated, in the order written. A supervisor that does not
    /// exist is skipped.
    #[must_use]
    pub fn notify_agencies(
        &self,
        rule: &ObligationRule,
        sender: &Agency,
        recipient: &Agency,
        directory: &Directory,
    ) -> Vec<String> {
        let bearer = match rule.bearer {
            Party::Sender => sender,
            Party::Recipient => recipient,
        };
        let mut ids: Vec<String> = Vec::new();
        for target in &rule.notify {
            let id = match target {
                NotifyTarget::Sender => Some(sender.id.as_str()),
                NotifyTarget::Recipient => Some(recipient.id.as_str()),
                NotifyTarget::Bearer => Some(bearer.id.as_str()),
                NotifyTarget::Supervisor => supervisor_of(bearer, directory).map(|a| a.id.as_str()),
                NotifyTarget::Agency(id) => Some(id.as_str()),
            };
            if let Some(id) = id
                && !ids.iter().any(|seen| seen == id)
            {
                ids.push(id.to_owned());
            }
        }
        ids
    }
}

/// The body that supervises `agency` (DOMAIN.md, "Who supervises whom"),
/// told of its overdue duties ([`NotifyTarget::Supervisor`]):
/// - the agency's own `supervised_by`, when the directory names one;
/// - a detention centre: the police organ of its region, else of its parent
///   region (its public security bureau's detention management, SH-4.3);
/// - a case unit that is an organ: the organ of its system in the parent
///   region (a municipal organ has none); one that is not an organ: its
///   system's organ in its own region;
/// - a justice bureau: the justice bureau of the parent region (a municipal
///   one has none);
/// - a district bar committee: the municipal bar association; a municipal
///   bar association: the justice bureau of its region (CQ-3.14);
/// - a legal aid office or duty lawyer desk: the justice bureau of its
///   region, else of its parent region;
/// - the lawyer service: none.
#[must_use]
pub fn supervisor_of<'d>(agency: &Agency, directory: &'d Directory) -> Option<&'d Agency> {
    if let Some(id) = &agency.supervised_by {
        return directory.get(id);
    }
    let parent = directory.parent_of(&agency.region);
    match agency.kind {
        AgencyKind::DetentionCentre => directory
            .organ_of(OrganSystem::Police, &agency.region)
            .or_else(|| directory.organ_of(OrganSystem::Police, parent?)),
        AgencyKind::CaseUnit if agency.organ => directory.organ_of(agency.system, parent?),
        AgencyKind::CaseUnit => directory
            .organ_of(agency.system, &agency.region)
            .filter(|organ| organ.id != agency.id),
        AgencyKind::JusticeBureau => directory.nearest_of_kind(AgencyKind::JusticeBureau, parent?),
        AgencyKind::BarAssociation if agency.level == Level::District => {
            directory.nearest_of_kind(AgencyKind::BarAssociation, parent?)
        }
        AgencyKind::BarAssociation => directory
            .of_kind(AgencyKind::JusticeBureau)
            .find(|a| a.region == agency.region),
        AgencyKind::LegalAidOffice | AgencyKind::DutyLawyerDesk => {
            directory.nearest_of_kind(AgencyKind::JusticeBureau, &agency.region)
        }
        AgencyKind::LawyerService => None,
    }
}

/// The justice bureau over `agency`: for an agency that is not a justice
/// bureau, the justice bureau of its region, else of its parent region; for
/// a justice bureau, the justice bureau of its parent region (a municipal
/// justice bureau has none). Where forgery alerts go, whoever the agency
/// answers to for its duties ([`supervisor_of`]).
#[must_use]
pub fn justice_bureau_of<'d>(agency: &Agency, directory: &'d Directory) -> Option<&'d Agency> {
    if agency.kind == AgencyKind::JusticeBureau {
        let parent = directory.parent_of(&agency.region)?;
        directory.nearest_of_kind(AgencyKind::JusticeBureau, parent)
    } else {
        directory.nearest_of_kind(AgencyKind::JusticeBureau, &agency.region)
    }
}

/// Whether an entry whose territory is `territory` binds `region`: the
/// region itself, or one of its districts.
#[must_use]
pub fn binds(territory: &str, region: &str, directory: &Directory) -> bool {
    region == territory || directory.parent_of(region) == Some(territory)
}

/// The region of a message's matter, which decides which entries bind it
/// (module docs, "Who binds where"): for a misconduct lead, its finder's
/// region; for a message the lawyer service sends (for a lawyer), the
/// recipient's region; otherwise the sender's. `None` when the agency it
/// depends on is not in the directory.
#[must_use]
pub fn region_of_matter<'d>(envelope: &Envelope, directory: &'d Directory) -> Option<&'d str> {
    if let Some(Payload::MisconductLead(lead)) = &envelope.payload
        && !lead.found_by.is_empty()
    {
        return directory.get(&lead.found_by).map(|a| a.region.as_str());
    }
    let sender = directory.get(&envelope.sender)?;
    if sender.kind == AgencyKind::LawyerService {
        return directory
            .get(&envelope.recipient)
            .map(|a| a.region.as_str());
    }
    Some(sender.region.as_str())
}

/// A refusal reason's code name in policy files, e.g. `no_booking`.
#[must_use]
pub fn reason_code(reason: RefusalReason) -> String {
    let name = reason.as_str_name();
    name.strip_prefix("REFUSAL_REASON_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The refusal reason with this code name (not `unspecified`).
#[must_use]
pub fn reason_from_code(code: &str) -> Option<RefusalReason> {
    (1..64)
        .filter_map(|n| RefusalReason::try_from(n).ok())
        .find(|r| reason_code(*r) == code)
}

/// A file being validated, for errors with a line.
struct Here<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Here<'_> {
    fn invalid(&self, offset: usize, problem: String) -> PolicyError {
        PolicyError::Invalid {
            path: self.path.to_path_buf(),
            line: line_of(self.text, offset),
            problem,
        }
    }

    /// "file:line", for "already defined at ...".
    fn at(&self, offset: usize) -> String {
        format!("{}:{}", self.path.display(), line_of(self.text, offset))
    }
}

/// The `*.toml` files directly in `dir`, sorted by name.
/// The region calendars in `dir/calendars/*.toml`, one per region.
fn load_calendars(
    dir: &Path,
    directory: &Directory,
) -> Result<BTreeMap<String, Calendar>, PolicyError> {
    let mut calendars: BTreeMap<String, Calendar> = BTreeMap::new();
    let mut calendar_at: HashMap<String, PathBuf> = HashMap::new();
    let calendar_dir = dir.join("calendars");
    if calendar_dir.is_dir() {
        for path in toml_files(&calendar_dir, "the calendar directory")? {
            let calendar = Calendar::load(&path, directory)?;
            if let Some(first) = calendar_at.get(calendar.region()) {
                return Err(PolicyError::Unusable {
                    path,
                    problem: format!(
                        "region `{}` already has a calendar in {}",
                        calendar.region(),
                        first.display()
                    ),
                });
            }
            calendar_at.insert(calendar.region().to_owned(), path);
            calendars.insert(calendar.region().to_owned(), calendar);
        }
    }

    Ok(calendars)
}

fn toml_files(dir: &Path, what: &'static str) -> Result<Vec<PathBuf>, PolicyError> {
    let read_error = |source| PolicyError::Read {
        path: dir.to_path_buf(),
        what,
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_kind(
    code: &Spanned<String>,
    entry: &str,
    here: &Here<'_>,
) -> Result<MessageKind, PolicyError> {
    MessageKind::from_code(code.get_ref()).ok_or_else(|| {
        here.invalid(
            code.span().start,
            format!(
                "{entry}: kind {:?} is not a message kind (e.g. legal_help_request, lawyer_violation_notice)",
                code.get_ref()
            ),
        )
    })
}

fn parse_obligation(
    entry: &ObligationEntry,
    durations: &BTreeMap<String, (Deadline, String)>,
    directory: &Directory,
    here: &Here<'_>,
) -> Result<ObligationRule, PolicyError> {
    let rule = entry.rule.get_ref().trim().to_owned();
    if rule.is_empty() {
        return Err(here.invalid(
            entry.rule.span().start,
            "obligation: rule is empty: cite a DOMAIN.md rule id".into(),
        ));
    }
    let name = format!("obligation {rule}");
    let field = |value: &Spanned<String>, field: &str, expected: &str| {
        here.invalid(
            value.span().start,
            format!("{name}: {field} {:?}: expected {expected}", value.get_ref()),
        )
    };

    let kind = parse_kind(&entry.kind, &name, here)?;
    let duty = entry.duty.get_ref().trim().to_owned();
    if duty.is_empty() {
        return Err(here.invalid(
            entry.duty.span().start,
            format!("{name}: duty is empty: say what the bearer must do"),
        ));
    }
    let bearer = match entry.bearer.get_ref().as_str() {
        "sender" => Party::Sender,
        "recipient" => Party::Recipient,
        _ => {
            return Err(field(
                &entry.bearer,
                "bearer",
                "\"sender\" or \"recipient\"",
            ));
        }
    };
    let clock = match entry.clock.get_ref().as_str() {
        "requested" => ClockStart::Requested,
        "submitted" => ClockStart::Submitted,
        _ => {
            return Err(field(
                &entry.clock,
                "clock",
                "\"requested\" or \"submitted\"",
            ));
        }
    };
    let met_by = match entry.met_by.get_ref().as_str() {
        "delivered" => MetBy::Delivered,
        "acknowledged" => MetBy::Acknowledged,
        "feedback" => MetBy::Feedback,
        "relayed" if kind == MessageKind::MisconductLead => MetBy::Relayed,
        "hearing" if kind == MessageKind::RightsComplaint => MetBy::Hearing,
        "held"
            if matches!(
                kind,
                MessageKind::LawyerMeetingRequest | MessageKind::InterrogationRequest
            ) =>
        {
            MetBy::Held
        }
        "relayed" | "hearing" | "held" => {
            return Err(here.invalid(
                entry.met_by.span().start,
                format!(
                    "{name}: met_by {:?} applies only to a {}",
                    entry.met_by.get_ref(),
                    match entry.met_by.get_ref().as_str() {
                        "relayed" => "misconduct_lead (DZ-7)",
                        "hearing" => "rights_complaint (CQ-3.13)",
                        _ => "lawyer_meeting_request or interrogation_request (CQ-1.3a)",
                    }
                ),
            ));
        }
        _ => {
            return Err(field(
                &entry.met_by,
                "met_by",
                "\"delivered\", \"acknowledged\", \"feedback\", \"relayed\", \"hearing\" or \"held\"",
            ));
        }
    };
    let when = match entry.when.as_ref() {
        None => None,
        Some(w) if w.get_ref() == "hearing_requested" && kind == MessageKind::RightsComplaint => {
            Some(Condition::HearingRequested)
        }
        Some(w)
            if w.get_ref() == "temporarily_held_ordinary"
                && kind == MessageKind::LawyerMeetingRequest =>
        {
            Some(Condition::TemporarilyHeldOrdinary)
        }
        Some(w) => {
            return Err(here.invalid(
                w.span().start,
                format!(
                    "{name}: when {:?}: expected \"hearing_requested\" on a rights_complaint (CQ-3.13) or \"temporarily_held_ordinary\" on a lawyer_meeting_request (CQ-1.3e)",
                    w.get_ref()
                ),
            ));
        }
    };
    let territory = parse_territory(&entry.territory, &name, directory, here)?;

    let deadline_text = entry.deadline.get_ref().trim().to_owned();
    let deadline = match parse_literal(&deadline_text) {
        Some(Ok(deadline)) => deadline,
        Some(Err(why)) => {
            return Err(here.invalid(
                entry.deadline.span().start,
                format!("{name}: deadline {deadline_text:?}: {why}"),
            ));
        }
        None if is_duration_name(&deadline_text) => {
            match durations.get(&deadline_text) {
                Some((deadline, _)) => *deadline,
                None => {
                    let known: Vec<&str> = durations.keys().map(String::as_str).collect();
                    let known = if known.is_empty() {
                        "none is defined".to_owned()
                    } else {
                        format!("defined: {}", known.join(", "))
                    };
                    return Err(here.invalid(
                    entry.deadline.span().start,
                    format!("{name}: deadline {deadline_text:?} is not a name in [durations] ({known})"),
                ));
                }
            }
        }
        None => return Err(field(&entry.deadline, "deadline", DEADLINE_SHAPES)),
    };

    let mut notify = Vec::new();
    for target in entry.notify.get_ref() {
        let id = target.get_ref().as_str();
        let resolved = match id {
            "sender" => NotifyTarget::Sender,
            "recipient" => NotifyTarget::Recipient,
            "bearer" => NotifyTarget::Bearer,
            "supervisor" => NotifyTarget::Supervisor,
            _ if directory.get(id).is_some() => NotifyTarget::Agency(id.to_owned()),
            _ => {
                return Err(here.invalid(
                    target.span().start,
                    format!(
                        "{name}: notify {id:?}: expected \"sender\", \"recipient\", \"bearer\", \"supervisor\" or an agency id in the directory"
                    ),
                ));
            }
        };
        notify.push(resolved);
    }
    if notify.is_empty() {
        return Err(here.invalid(
            entry.notify.span().start,
            format!("{name}: notify is empty: an overdue obligation must be told to someone"),
        ));
    }

    Ok(ObligationRule {
        rule,
        kind,
        duty,
        bearer,
        clock,
        deadline,
        deadline_text,
        met_by,
        notify,
        when,
        territory,
    })
}

/// A `territory`: a region code of the directory.
fn parse_territory(
    value: &Spanned<String>,
    name: &str,
    directory: &Directory,
    here: &Here<'_>,
) -> Result<String, PolicyError> {
    let code = value.get_ref().trim();
    if directory.region(code).is_none() {
        return Err(here.invalid(
            value.span().start,
            format!(
                "{name}: territory {code:?} is not a region in the directory (a region code, e.g. 500000)"
            ),
        ));
    }
    Ok(code.to_owned())
}

fn parse_refusal(
    entry: &RefusalEntry,
    directory: &Directory,
    here: &Here<'_>,
) -> Result<RefusalRule, PolicyError> {
    let rule = entry.rule.get_ref().trim().to_owned();
    if rule.is_empty() {
        return Err(here.invalid(
            entry.rule.span().start,
            "refusal: rule is empty: cite a DOMAIN.md rule id".into(),
        ));
    }
    let name = format!("refusal {rule}");
    let reason = reason_from_code(entry.reason.get_ref()).ok_or_else(|| {
        let known: Vec<String> = (1..64)
            .filter_map(|n| RefusalReason::try_from(n).ok())
            .map(reason_code)
            .collect();
        here.invalid(
            entry.reason.span().start,
            format!(
                "{name}: reason {:?} is not a refusal reason (one of {})",
                entry.reason.get_ref(),
                known.join(", ")
            ),
        )
    })?;
    let territory = parse_territory(&entry.territory, &name, directory, here)?;
    let allowed = entry.allowed.as_ref().is_none_or(|a| *a.get_ref());
    let lawful = match (&entry.lawful, allowed) {
        (Some(l), true) => *l.get_ref(),
        (None, true) => {
            return Err(here.invalid(
                entry.reason.span().start,
                format!(
                    "{name}: lawful is required for an allowed reason (true when the refusal meets the 48-hour duty, CQ-1.3a)"
                ),
            ));
        }
        (Some(l), false) if *l.get_ref() => {
            return Err(here.invalid(
                l.span().start,
                format!("{name}: a reason that is not allowed cannot be lawful"),
            ));
        }
        (_, false) => false,
    };
    Ok(RefusalRule {
        reason,
        rule,
        territory,
        lawful,
        allowed,
    })
}

fn parse_order(
    entry: &OrderEntry,
    directory: &Directory,
    here: &Here<'_>,
) -> Result<OrderRule, PolicyError> {
    let rule = entry.rule.get_ref().trim().to_owned();
    if rule.is_empty() {
        return Err(here.invalid(
            entry.rule.span().start,
            "order: rule is empty: cite a DOMAIN.md rule id".into(),
        ));
    }
    let name = format!("order {rule}");
    let mut kinds = Vec::new();
    for kind in entry.kinds.get_ref() {
        kinds.push(parse_kind(kind, &name, here)?);
    }
    if kinds.is_empty() {
        return Err(here.invalid(
            entry.kinds.span().start,
            format!("{name}: kinds is empty: name the kinds served in order"),
        ));
    }
    let territory = parse_territory(&entry.territory, &name, directory, here)?;
    Ok(OrderRule {
        rule,
        kinds,
        territory,
    })
}

/// A name in `[durations]`: lowercase letters, digits and underscores,
/// starting with a letter.
fn is_duration_name(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_lowercase())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A deadline written as a number: `None` if it does not have that shape,
/// `Some(Err)` if it does but cannot be used.
fn parse_literal(text: &str) -> Option<Result<Deadline, &'static str>> {
    let text = text.trim();
    let number = |digits: &str| -> Option<u32> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let deadline = if let Some(n) = text
        .strip_suffix(" working hours")
        .or_else(|| text.strip_suffix(" working hour"))
    {
        Deadline::WorkingHours(number(n.trim_end())?)
    } else if let Some(n) = text
        .strip_suffix(" working days")
        .or_else(|| text.strip_suffix(" working day"))
    {
        Deadline::WorkingDays(number(n.trim_end())?)
    } else {
        let unit = text.chars().last()?;
        let n = i64::from(number(&text[..text.len() - unit.len_utf8()])?);
        let span = match unit {
            'h' => TimeDelta::try_hours(n),
            'm' => TimeDelta::try_minutes(n),
            'd' => TimeDelta::try_days(n),
            _ => return None,
        };
        match span {
            Some(span) => Deadline::Calendar(span),
            None => return Some(Err("too long")),
        }
    };
    let zero = match deadline {
        Deadline::Calendar(span) => span.is_zero(),
        Deadline::WorkingHours(n) | Deadline::WorkingDays(n) => n == 0,
    };
    Some(if zero {
        Err("a deadline must be longer than zero")
    } else {
        Ok(deadline)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRECTORY: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/local/directory.toml"
    );
    const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy");

    fn directory() -> Directory {
        Directory::load(DIRECTORY).unwrap()
    }

    fn shipped() -> (PolicyCatalogue, Directory) {
        let directory = directory();
        (
            PolicyCatalogue::load(Path::new(POLICY), &directory).unwrap(),
            directory,
        )
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_str(text, "%Y-%m-%d %H:%M %:z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn rule<'c>(catalogue: &'c PolicyCatalogue, id: &str, kind: MessageKind) -> &'c ObligationRule {
        catalogue.rules_for(kind).find(|r| r.rule == id).unwrap()
    }

    /// A policy directory under the temp dir, removed on drop.
    struct TempPolicy(PathBuf);

    impl TempPolicy {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("refbus-policy-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("calendars")).unwrap();
            Self(dir)
        }

        fn write(&self, file: &str, text: &str) -> &Self {
            std::fs::write(self.0.join(file), text).unwrap();
            self
        }

        fn error(&self) -> String {
            PolicyCatalogue::load(&self.0, &directory())
                .unwrap_err()
                .to_string()
        }

        fn path(&self, file: &str) -> String {
            self.0.join(file).display().to_string()
        }
    }

    impl Drop for TempPolicy {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const DEFAULTS: &str = "[durations]\npromptly = \"2 working days\"\n";

    /// CQ-1.1b with one field replaced; the replaced field is on line 5.
    fn obligation(field: &str, value: &str) -> String {
        let mut fields = vec![
            ("kind", "\"legal_help_request\""),
            ("duty", "\"hand it to a duty lawyer\""),
            ("bearer", "\"sender\""),
            ("clock", "\"requested\""),
            ("deadline", "\"24h\""),
            ("met_by", "\"delivered\""),
            ("notify", "[\"sender\", \"supervisor\"]"),
            ("territory", "\"500000\""),
        ];
        let i = fields.iter().position(|(f, _)| *f == field).unwrap();
        let replaced = fields.remove(i);
        fields.insert(0, (replaced.0, value));
        let mut text = "# test\n\n[[obligation]]\nrule = \"CQ-1.1b\"\n".to_owned();
        for (f, v) in fields {
            text.push_str(&format!("{f} = {v}\n"));
        }
        text
    }

    const CALENDAR: &str = "region = \"310000\"\nname = \"上海市\"\nutc_offset = \"+08:00\"\nworking_days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]\n";

    #[test]
    fn the_shipped_policy_loads_against_the_shipped_directory() {
        let (catalogue, directory) = shipped();
        // Every referral kind creates an obligation, every other kind is known.
        for code in [
            "legal_help_request",
            "defence_commission_request",
            "legal_aid_application",
            "letter",
            "lawyer_meeting_request",
            "verification_query",
            "lawyer_violation_notice",
            "rights_complaint",
            "misconduct_lead",
            "joint_notice",
        ] {
            let kind = MessageKind::from_code(code).unwrap();
            assert!(catalogue.rules_for(kind).count() >= 1, "{code}");
            assert!(catalogue.knows(kind), "{code}");
        }
        for rule in catalogue.rules() {
            assert!(catalogue.knows(rule.kind));
        }
        // Ten kinds, plus the DZ-7 relay's, the CQ-3.13 hearing's, and
        // CQ-1.3a's 48 hours and CQ-1.3e's own.
        assert_eq!(catalogue.rules().len(), 14);
        let hearing = catalogue
            .rules_for(MessageKind::RightsComplaint)
            .find(|r| r.met_by == MetBy::Hearing)
            .unwrap();
        assert_eq!(hearing.when, Some(Condition::HearingRequested));
        assert!(
            catalogue
                .rules_for(MessageKind::MisconductLead)
                .any(|r| r.rule == "DZ-7" && r.met_by == MetBy::Relayed)
        );
        assert_eq!(
            catalogue.duration("promptly"),
            Some(Deadline::WorkingDays(2))
        );
        // Dazu has no calendar of its own: Chongqing's applies.
        assert_eq!(
            catalogue.calendar_for("500111", &directory).region(),
            "500000"
        );
        assert_eq!(
            catalogue.calendar_for("310000", &directory).region(),
            "310000"
        );
        assert_eq!(
            *catalogue.calendar_for("440000", &directory),
            Calendar::always_open("440000")
        );
    }

    #[test]
    fn knows_notices_and_replies() {
        let (catalogue, _) = shipped();
        assert!(catalogue.knows(MessageKind::BookedSlotNotice)); // SH-2.8
        assert!(catalogue.knows(MessageKind::DetaineeUnavailableNotice)); // SH-2.5
        assert!(catalogue.knows(MessageKind::Feedback));
        assert!(catalogue.knows(MessageKind::Acknowledgement));
        assert!(catalogue.knows(MessageKind::OverdueNotice));
        assert!(!catalogue.knows(MessageKind::Unspecified));
        assert_eq!(
            catalogue.rules_for(MessageKind::BookedSlotNotice).count(),
            0
        );
        assert!(catalogue.knows(MessageKind::InterrogationRequest)); // CQ-1.3b
        assert!(catalogue.knows(MessageKind::MeetingRating)); // CQ-3.11b
        assert!(catalogue.knows(MessageKind::LawyerRegistration));
        assert_eq!(catalogue.rules_for(MessageKind::MeetingRating).count(), 0);
        assert_eq!(catalogue.notices().len(), 6);
    }

    #[test]
    fn cq_1_1b_is_due_exactly_24_hours_after_the_request() {
        let (catalogue, directory) = shipped();
        let rule = rule(&catalogue, "CQ-1.1b", MessageKind::LegalHelpRequest);
        assert_eq!(rule.bearer, Party::Sender);
        assert_eq!(rule.clock, ClockStart::Requested);
        assert_eq!(rule.met_by, MetBy::Delivered);
        assert_eq!(rule.deadline_text, "24h");
        let centre = directory.get("dz-detention-centre").unwrap();
        // Saturday night, in a holiday week: calendar time all the same.
        let start = at("2026-10-03 22:10 +08:00");
        assert_eq!(
            catalogue.due_at(rule, start, centre, &directory),
            start + TimeDelta::hours(24)
        );
    }

    #[test]
    fn cq_3_14_overdue_feedback_is_told_to_the_centre_and_the_municipal_bureau() {
        let (catalogue, directory) = shipped();
        let rule = rule(&catalogue, "CQ-3.14", MessageKind::LawyerViolationNotice);
        assert_eq!(rule.bearer, Party::Recipient);
        assert_eq!(rule.met_by.code(), "feedback");
        let centre = directory.get("dz-detention-centre").unwrap();
        let bureau = directory.get("dz-justice-bureau").unwrap();
        assert_eq!(
            catalogue.notify_agencies(rule, centre, bureau, &directory),
            ["dz-detention-centre", "cq-justice-bureau"]
        );
    }

    #[test]
    fn supervisor_is_who_supervises_the_bearer() {
        let directory = directory();
        let supervisor =
            |id: &str| supervisor_of(directory.get(id).unwrap(), &directory).map(|a| a.id.clone());
        for (agency, expected) in [
            // A detention centre: its public security bureau (SH-4.3).
            ("dz-detention-centre", Some("dz-psb")),
            ("yb-detention-centre", Some("yb-psb")),
            ("cq-detention-centre", Some("cq-psb")),
            ("sh-first-detention-centre", Some("sh-psb")),
            // A judicial organ: its organ at the level above.
            ("dz-court", Some("cq-high-court")),
            ("dz-procuratorate", Some("cq-procuratorate")),
            ("dz-psb", Some("cq-psb")),
            ("cq-high-court", None),
            // A unit of an organ: its organ.
            ("dz-psb-investigation", Some("dz-psb")),
            // Justice bureaus, the bar, legal aid (CQ-3.14).
            ("dz-justice-bureau", Some("cq-justice-bureau")),
            ("cq-justice-bureau", None),
            ("dz-bar-committee", Some("cq-bar-association")),
            ("cq-bar-association", Some("cq-justice-bureau")),
            ("sh-bar-association", Some("sh-justice-bureau")),
            ("dz-legal-aid-centre", Some("dz-justice-bureau")),
            ("dz-duty-desk", Some("dz-justice-bureau")),
            ("sh-legal-aid-centre", Some("sh-justice-bureau")),
            ("lawyer-service", None),
        ] {
            assert_eq!(supervisor(agency).as_deref(), expected, "{agency}");
        }
        // Forgery alerts still go to the justice bureau.
        let bureau = |id: &str| {
            justice_bureau_of(directory.get(id).unwrap(), &directory).map(|a| a.id.clone())
        };
        assert_eq!(
            bureau("dz-detention-centre").as_deref(),
            Some("dz-justice-bureau")
        );
        assert_eq!(
            bureau("dz-justice-bureau").as_deref(),
            Some("cq-justice-bureau")
        );
        assert_eq!(bureau("cq-justice-bureau"), None);
    }

    #[test]
    fn supervisor_named_in_the_directory_comes_first() {
        let text = std::fs::read_to_string(DIRECTORY).unwrap().replacen(
            "id = \"yb-detention-centre\"\n",
            "id = \"yb-detention-centre\"\nsupervised_by = \"cq-psb\"\n",
            1,
        );
        let directory = Directory::parse(&text, Path::new("directory.toml")).unwrap();
        let centre = directory.get("yb-detention-centre").unwrap();
        assert_eq!(
            supervisor_of(centre, &directory).map(|a| a.id.as_str()),
            Some("cq-psb")
        );
        let (catalogue, _) = shipped();
        let rule = rule(&catalogue, "CQ-1.1b", MessageKind::LegalHelpRequest);
        let desk = directory.get("yb-legal-aid-centre").unwrap();
        assert_eq!(
            catalogue.notify_agencies(rule, centre, desk, &directory),
            ["yb-detention-centre", "cq-psb"]
        );
    }

    #[test]
    fn cq_1_1b_notify_skips_a_missing_supervisor_and_deduplicates() {
        let (catalogue, directory) = shipped();
        let rule = ObligationRule {
            notify: vec![
                NotifyTarget::Supervisor,
                NotifyTarget::Bearer,
                NotifyTarget::Sender,
                NotifyTarget::Agency("cq-bar-association".into()),
                NotifyTarget::Recipient,
            ],
            bearer: Party::Recipient,
            ..rule(&catalogue, "CQ-1.1b", MessageKind::LegalHelpRequest).clone()
        };
        let centre = directory.get("cq-detention-centre").unwrap();
        let bureau = directory.get("cq-justice-bureau").unwrap();
        assert_eq!(
            catalogue.notify_agencies(&rule, centre, bureau, &directory),
            [
                "cq-justice-bureau",
                "cq-detention-centre",
                "cq-bar-association"
            ]
        );
    }

    #[test]
    fn cq_1_1a_promptly_uses_the_bearers_region_calendar() {
        let (catalogue, directory) = shipped();
        let rule = rule(&catalogue, "CQ-1.1a", MessageKind::DefenceCommissionRequest);
        assert_eq!(rule.deadline_text, "promptly");
        assert_eq!(rule.deadline, Deadline::WorkingDays(2));
        let start = at("2026-11-20 10:00 +08:00"); // a Friday
        // Shanghai (SH-3.3): Monday, Tuesday, to the 16:30 close.
        let shanghai = directory.get("sh-first-detention-centre").unwrap();
        assert_eq!(
            catalogue.due_at(rule, start, shanghai, &directory),
            at("2026-11-24 16:30 +08:00")
        );
        // Dazu uses Chongqing's calendar (CQ-2.8): the 17:30 close.
        let dazu = directory.get("dz-detention-centre").unwrap();
        assert_eq!(
            catalogue.due_at(rule, start, dazu, &directory),
            at("2026-11-24 17:30 +08:00")
        );
    }

    #[test]
    fn cq_1_1b_a_bad_deadline_names_the_file_and_line() {
        let t = TempPolicy::new("bad-deadline");
        t.write("defaults.toml", DEFAULTS)
            .write("cq.toml", &obligation("deadline", "\"24 hours\""));
        assert_eq!(
            t.error(),
            format!(
                "{}:5: obligation CQ-1.1b: deadline \"24 hours\": expected <n>h, <n>m, <n>d, \"<n> working hours\", \"<n> working days\" or a name from [durations]",
                t.path("cq.toml")
            )
        );
        t.write("cq.toml", &obligation("deadline", "\"soon\""));
        assert_eq!(
            t.error(),
            format!(
                "{}:5: obligation CQ-1.1b: deadline \"soon\" is not a name in [durations] (defined: promptly)",
                t.path("cq.toml")
            )
        );
        t.write("cq.toml", &obligation("deadline", "\"0 working days\""));
        assert_eq!(
            t.error(),
            format!(
                "{}:5: obligation CQ-1.1b: deadline \"0 working days\": a deadline must be longer than zero",
                t.path("cq.toml")
            )
        );
        t.write("defaults.toml", "[durations]\npromptly = \"promptly\"\n");
        assert_eq!(
            t.error(),
            format!(
                "{}:2: durations.promptly \"promptly\": expected <n>h, <n>m, <n>d, \"<n> working hours\" or \"<n> working days\"",
                t.path("defaults.toml")
            )
        );
    }

    #[test]
    fn cq_1_1b_an_unknown_kind_names_the_file_and_line() {
        let t = TempPolicy::new("unknown-kind");
        t.write("cq.toml", &obligation("kind", "\"legal_hlp_request\""));
        assert_eq!(
            t.error(),
            format!(
                "{}:5: obligation CQ-1.1b: kind \"legal_hlp_request\" is not a message kind (e.g. legal_help_request, lawyer_violation_notice)",
                t.path("cq.toml")
            )
        );
    }

    #[test]
    fn cq_1_1b_an_unknown_notify_agency_names_the_file_and_line() {
        let t = TempPolicy::new("unknown-notify");
        t.write(
            "cq.toml",
            &obligation("notify", "[\"sender\", \"xx-bureau\"]"),
        );
        assert_eq!(
            t.error(),
            format!(
                "{}:5: obligation CQ-1.1b: notify \"xx-bureau\": expected \"sender\", \"recipient\", \"bearer\", \"supervisor\" or an agency id in the directory",
                t.path("cq.toml")
            )
        );
        // A directory agency is a valid target.
        t.write("cq.toml", &obligation("notify", "[\"cq-justice-bureau\"]"));
        let catalogue = PolicyCatalogue::load(&t.0, &directory()).unwrap();
        assert_eq!(
            catalogue.rules()[0].notify,
            [NotifyTarget::Agency("cq-justice-bureau".into())]
        );
    }

    #[test]
    fn cq_1_1b_bad_field_values_and_duplicates_are_rejected() {
        let t = TempPolicy::new("bad-fields");
        for (field, value, expected) in [
            (
                "bearer",
                "\"lawyer\"",
                "bearer \"lawyer\": expected \"sender\" or \"recipient\"",
            ),
            (
                "clock",
                "\"asked\"",
                "clock \"asked\": expected \"requested\" or \"submitted\"",
            ),
            (
                "met_by",
                "\"read\"",
                "met_by \"read\": expected \"delivered\", \"acknowledged\", \"feedback\", \"relayed\", \"hearing\" or \"held\"",
            ),
            (
                "met_by",
                "\"relayed\"",
                "met_by \"relayed\" applies only to a misconduct_lead (DZ-7)",
            ),
            (
                "met_by",
                "\"hearing\"",
                "met_by \"hearing\" applies only to a rights_complaint (CQ-3.13)",
            ),
            (
                "met_by",
                "\"held\"",
                "met_by \"held\" applies only to a lawyer_meeting_request or interrogation_request (CQ-1.3a)",
            ),
            (
                "territory",
                "\"440000\"",
                "territory \"440000\" is not a region in the directory (a region code, e.g. 500000)",
            ),
        ] {
            t.write("cq.toml", &obligation(field, value));
            assert_eq!(
                t.error(),
                format!("{}:5: obligation CQ-1.1b: {expected}", t.path("cq.toml"))
            );
        }
        let once = obligation("deadline", "\"24h\"");
        t.write("cq.toml", &format!("{once}when = \"hearing_requested\"\n"));
        assert_eq!(
            t.error(),
            format!(
                "{}:13: obligation CQ-1.1b: when \"hearing_requested\": expected \"hearing_requested\" on a rights_complaint (CQ-3.13) or \"temporarily_held_ordinary\" on a lawyer_meeting_request (CQ-1.3e)",
                t.path("cq.toml")
            )
        );
        t.write("cq.toml", &format!("{once}{once}"));
        assert_eq!(
            t.error(),
            format!(
                "{}:16: obligation CQ-1.1b for legal_help_request is already defined at {}:4",
                t.path("cq.toml"),
                t.path("cq.toml")
            )
        );
        t.write("cq.toml", &format!("{once}colour = \"red\"\n"));
        let e = t.error();
        assert!(
            e.starts_with(&format!(
                "{}: TOML parse error at line 13",
                t.path("cq.toml")
            )),
            "{e}"
        );
        assert!(e.contains("unknown field `colour`"), "{e}");
        t.write(
            "cq.toml",
            &format!("{once}\n[[notice]]\nkind = \"legal_help_request\"\nrule = \"SH-2.8\"\nterritory = \"310000\"\n"),
        );
        assert_eq!(
            t.error(),
            format!(
                "{}:15: notice SH-2.8: legal_help_request creates an obligation at {}:6, so it is not a notice",
                t.path("cq.toml"),
                t.path("cq.toml")
            )
        );
    }

    #[test]
    fn sh_3_3_bad_reception_hours_name_the_calendar_and_line() {
        let t = TempPolicy::new("bad-hours");
        t.write("cq.toml", &obligation("deadline", "\"24h\""))
            .write(
                "calendars/sh.toml",
                &format!("{CALENDAR}reception_hours = [\"11:00-08:30\", \"13:30-16:30\"]\n"),
            );
        assert_eq!(
            t.error(),
            format!(
                "{}:5: reception_hours \"11:00-08:30\": the end is not after the start",
                t.path("calendars/sh.toml")
            )
        );
        t.write(
            "calendars/sh.toml",
            &format!("{CALENDAR}reception_hours = [\"08:30-11:00\", \"10:30-16:30\"]\n"),
        );
        assert_eq!(
            t.error(),
            format!(
                "{}:5: reception_hours: \"08:30-11:00\" and \"10:30-16:30\" overlap",
                t.path("calendars/sh.toml")
            )
        );
        t.write(
            "calendars/sh.toml",
            &format!(
                "{}reception_hours = [\"08:30-11:00\"]\n",
                CALENDAR.replace("310000", "320000")
            ),
        );
        assert_eq!(
            t.error(),
            format!(
                "{}:1: region `320000` is not a region in the directory",
                t.path("calendars/sh.toml")
            )
        );
    }

    #[test]
    fn sh_3_3_a_bad_holiday_date_names_the_holidays_file_and_line() {
        let t = TempPolicy::new("bad-holiday");
        t.write("cq.toml", &obligation("deadline", "\"24h\""))
            .write(
                "calendars/sh.toml",
                &format!(
                    "{CALENDAR}holidays_file = \"holidays.txt\"\nreception_hours = [\"08:30-11:00\"]\n"
                ),
            )
            .write(
                "calendars/holidays.txt",
                "# 2026\n2026-10-01  # National Day\n\n2026-02-30\n",
            );
        assert_eq!(
            t.error(),
            format!(
                "{}:4: \"2026-02-30\" is not a date (expected YYYY-MM-DD)",
                t.path("calendars/holidays.txt")
            )
        );
        t.write("calendars/holidays.txt", "2026-10-01 # National Day\n");
        let catalogue = PolicyCatalogue::load(&t.0, &directory()).unwrap();
        let sh = catalogue.calendar_for("310000", &directory()).into_owned();
        assert!(!sh.is_working_day(chrono::NaiveDate::from_ymd_opt(2026, 10, 1).unwrap()));
        std::fs::remove_file(t.0.join("calendars/holidays.txt")).unwrap();
        let e = t.error();
        assert!(
            e.starts_with(&format!(
                "{}:5: holidays_file \"holidays.txt\": cannot read",
                t.path("calendars/sh.toml")
            )),
            "{e}"
        );
    }

    #[test]
    fn who_binds_where_an_entry_binds_its_territory_and_its_districts() {
        let (catalogue, directory) = shipped();
        let kinds = |region: &str, kind| {
            catalogue
                .rules_binding(kind, region, &directory)
                .map(|r| r.rule.clone())
                .collect::<Vec<_>>()
        };
        // CQ-2020 binds Chongqing and its districts, not Shanghai.
        assert_eq!(kinds("500000", MessageKind::LegalHelpRequest), ["CQ-1.1b"]);
        assert_eq!(kinds("500111", MessageKind::LegalHelpRequest), ["CQ-1.1b"]);
        assert_eq!(kinds("500112", MessageKind::LegalHelpRequest), ["CQ-1.1b"]);
        assert!(kinds("310000", MessageKind::LegalHelpRequest).is_empty());
        // DZ-2021 binds Dazu only.
        assert_eq!(kinds("500111", MessageKind::MisconductLead).len(), 2);
        assert!(kinds("500112", MessageKind::MisconductLead).is_empty());
        assert!(kinds("500000", MessageKind::MisconductLead).is_empty());
        assert_eq!(
            crate::lead::DZ_2021_TERRITORY,
            rule(&catalogue, "DZ-8", MessageKind::MisconductLead).territory
        );
        for rule in catalogue.rules() {
            assert!(directory.region(&rule.territory).is_some(), "{}", rule.rule);
        }
    }

    #[test]
    fn who_binds_where_the_region_of_the_matter() {
        let directory = directory();
        let envelope = |sender: &str, recipient: &str, payload| Envelope {
            sender: sender.into(),
            recipient: recipient.into(),
            payload,
            ..Envelope::default()
        };
        let region = |e: &Envelope| region_of_matter(e, &directory).map(str::to_owned);
        assert_eq!(
            region(&envelope(
                "sh-first-detention-centre",
                "sh-legal-aid-centre",
                None
            ))
            .as_deref(),
            Some("310000")
        );
        // The lawyer service sends for a lawyer: the centre's region.
        assert_eq!(
            region(&envelope("lawyer-service", "dz-detention-centre", None)).as_deref(),
            Some("500111")
        );
        // A lead: its finder's, whoever relays it.
        let lead = Payload::MisconductLead(refbus_proto::v1::MisconductLead {
            found_by: "yb-justice-bureau".into(),
            ..Default::default()
        });
        assert_eq!(
            region(&envelope("dz-court", "cq-high-court", Some(lead))).as_deref(),
            Some("500112")
        );
        assert_eq!(region(&envelope("nobody", "dz-court", None)), None);
    }

    #[test]
    fn cq_1_3a_two_duties_on_the_centre_and_cq_1_3e_promptly() {
        let (catalogue, directory) = shipped();
        let rules: Vec<&ObligationRule> = catalogue
            .rules_binding(MessageKind::LawyerMeetingRequest, "500111", &directory)
            .collect();
        let told_why = rules
            .iter()
            .find(|r| r.rule == "CQ-1.3a" && r.met_by == MetBy::Feedback)
            .unwrap();
        assert_eq!(told_why.deadline_text, "at_once");
        assert_eq!(told_why.deadline, Deadline::Calendar(TimeDelta::hours(1)));
        assert_eq!(told_why.bearer, Party::Recipient);
        assert_eq!(told_why.clock, ClockStart::Submitted);
        let held = rules
            .iter()
            .find(|r| r.rule == "CQ-1.3a" && r.met_by == MetBy::Held)
            .unwrap();
        assert_eq!(held.deadline, Deadline::Calendar(TimeDelta::hours(48)));
        assert_eq!(held.when, None);
        let promptly = rules.iter().find(|r| r.rule == "CQ-1.3e").unwrap();
        assert_eq!(
            (
                promptly.met_by,
                promptly.when,
                promptly.deadline_text.as_str()
            ),
            (
                MetBy::Held,
                Some(Condition::TemporarilyHeldOrdinary),
                "promptly_arranged"
            )
        );
        let request = |held, case_type: CaseType| {
            Payload::LawyerMeetingRequest(refbus_proto::v1::LawyerMeetingRequest {
                temporarily_held: held,
                case_type: case_type as i32,
                ..Default::default()
            })
        };
        let when = Condition::TemporarilyHeldOrdinary;
        assert!(when.holds(Some(&request(true, CaseType::Ordinary))));
        assert!(!when.holds(Some(&request(false, CaseType::Ordinary))));
        assert!(!when.holds(Some(&request(true, CaseType::Unclear))));
        assert!(!when.holds(Some(&request(true, CaseType::NationalSecurity))));
        assert!(!when.holds(None));
        // Shanghai has no 48-hour rule of its own.
        assert_eq!(
            catalogue
                .rules_binding(MessageKind::LawyerMeetingRequest, "310000", &directory)
                .count(),
            0
        );
    }

    #[test]
    fn cq_2_5_refusal_reasons_are_policy_data_per_territory() {
        let (catalogue, directory) = shipped();
        let refusal = |reason, region: &str| catalogue.refusal(reason, region, &directory);
        // Chongqing and its districts.
        for region in ["500000", "500111"] {
            for (reason, rule, lawful) in [
                (RefusalReason::CredentialsNotValid, "CQ-1.2", true),
                (RefusalReason::PermissionNotGiven, "CQ-1.2", true),
                (RefusalReason::DetaineeRefusesInWriting, "CQ-1.3c", true),
                (RefusalReason::DetaineeUnavailable, "CQ-1.3a", false),
                (RefusalReason::VerificationPending, "CQ-1.3d", false),
                (RefusalReason::NoRoomAvailable, "CQ-1.3a", false),
            ] {
                let r = refusal(reason, region).unwrap();
                assert_eq!((r.rule.as_str(), r.lawful), (rule, lawful), "{reason:?}");
                assert_eq!(r.territory, "500000");
            }
            let e = refusal(RefusalReason::NoBooking, region).unwrap_err();
            assert_eq!(e.rule, "CQ-2.5");
            assert_eq!(
                e.to_string(),
                format!(
                    "CQ-2.5: `no_booking` is no reason to refuse a meeting in region {region} (territory 500000)"
                )
            );
        }
        // Shanghai: a booking is required (SH-2.3), so its lack is lawful.
        let r = refusal(RefusalReason::NoBooking, "310000").unwrap();
        assert_eq!((r.rule.as_str(), r.lawful), ("SH-2.3", true));
        assert!(
            !refusal(RefusalReason::NoRoomAvailable, "310000")
                .unwrap()
                .lawful
        );
        // A region no refusal entry binds: every reason, none lawful.
        let r = refusal(RefusalReason::NoBooking, "440000").unwrap();
        assert_eq!((r.rule.as_str(), r.lawful, r.allowed), ("", false, true));
        let e = refusal(RefusalReason::Unspecified, "500111").unwrap_err();
        assert_eq!(e.rule, "CQ-1.3a");
        assert_eq!(
            reason_code(RefusalReason::DetaineeRefusesInWriting),
            "detainee_refuses_in_writing"
        );
        assert_eq!(
            reason_from_code("no_booking"),
            Some(RefusalReason::NoBooking)
        );
        assert_eq!(reason_from_code("unspecified"), None);
    }

    #[test]
    fn cq_2_5_a_reason_left_off_a_territorys_list_is_refused() {
        let t = TempPolicy::new("refusal-unlisted");
        t.write("defaults.toml", DEFAULTS).write(
            "cq.toml",
            "[[refusal]]\nreason = \"credentials_not_valid\"\nrule = \"CQ-1.2\"\nterritory = \"500000\"\nlawful = true\n",
        );
        let catalogue = PolicyCatalogue::load(&t.0, &directory()).unwrap();
        let e = catalogue
            .refusal(RefusalReason::NoRoomAvailable, "500112", &directory())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CQ-1.2: `no_room_available` is not a reason listed for region 500112 (listed: credentials_not_valid)"
        );
    }

    #[test]
    fn cq_1_3b_service_order_is_per_territory() {
        let (catalogue, directory) = shipped();
        let cq = catalogue.order_for("500111", &directory).unwrap();
        assert_eq!(cq.rule, "CQ-1.3b");
        assert_eq!(
            cq.kinds,
            [
                MessageKind::LawyerMeetingRequest,
                MessageKind::InterrogationRequest
            ]
        );
        let sh = catalogue.order_for("310000", &directory).unwrap();
        assert_eq!(
            (sh.rule.as_str(), sh.kinds.as_slice()),
            ("SH-2.7", &[MessageKind::LawyerMeetingRequest][..])
        );
        assert!(catalogue.order_for("440000", &directory).is_none());
    }

    #[test]
    fn bad_territories_refusals_and_orders_name_the_file_and_line() {
        let t = TempPolicy::new("bad-entries");
        t.write("defaults.toml", DEFAULTS);
        for (text, expected) in [
            (
                "[[notice]]\nkind = \"booked_slot_notice\"\nrule = \"SH-2.8\"\nterritory = \"999999\"\n",
                "4: notice SH-2.8: territory \"999999\" is not a region in the directory (a region code, e.g. 500000)",
            ),
            (
                "[[refusal]]\nreason = \"no_parking\"\nrule = \"CQ-2.5\"\nterritory = \"500000\"\nlawful = true\n",
                "2: refusal CQ-2.5: reason \"no_parking\" is not a refusal reason (one of credentials_not_valid, permission_not_given, detainee_refuses_in_writing, detainee_unavailable, verification_pending, no_booking, no_room_available)",
            ),
            (
                "[[refusal]]\nreason = \"no_booking\"\nrule = \"CQ-2.5\"\nterritory = \"500000\"\n",
                "2: refusal CQ-2.5: lawful is required for an allowed reason (true when the refusal meets the 48-hour duty, CQ-1.3a)",
            ),
            (
                "[[refusal]]\nreason = \"no_booking\"\nrule = \"CQ-2.5\"\nterritory = \"500000\"\nallowed = false\nlawful = true\n",
                "6: refusal CQ-2.5: a reason that is not allowed cannot be lawful",
            ),
            (
                "[[refusal]]\nreason = \"no_booking\"\nrule = \"CQ-2.5\"\nterritory = \"500000\"\nallowed = false\n\n[[refusal]]\nreason = \"no_booking\"\nrule = \"CQ-2.5\"\nterritory = \"500000\"\nlawful = false\n",
                "8: refusal CQ-2.5: reason no_booking is already listed for territory 500000 at ",
            ),
            (
                "[[order]]\nrule = \"CQ-1.3b\"\nkinds = [\"lawyer_meeting_request\", \"lawyer_meeting_request\"]\nterritory = \"500000\"\n",
                "3: order CQ-1.3b: lawyer_meeting_request is already ordered in territory 500000 at ",
            ),
            (
                "[[order]]\nrule = \"CQ-1.3b\"\nkinds = []\nterritory = \"500000\"\n",
                "3: order CQ-1.3b: kinds is empty: name the kinds served in order",
            ),
        ] {
            t.write("cq.toml", text);
            let e = t.error();
            assert!(
                e.starts_with(&format!("{}:{expected}", t.path("cq.toml"))),
                "{e}"
            );
        }
    }

    #[test]
    fn an_empty_policy_directory_is_an_error() {
        let t = TempPolicy::new("empty");
        assert_eq!(
            t.error(),
            format!(
                "{}: no policy files (*.toml) in this directory",
                t.0.display()
            )
        );
    }
}
