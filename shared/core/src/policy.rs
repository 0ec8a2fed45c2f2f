//! The policy catalogue: the obligations each message kind creates, their deadlines and whom to notify when overdue.
//!
//! Regional policy is data, not code (DOMAIN.md, SH-2012 §2): the catalogue is
//! loaded from a directory (`deploy/policy/`) and validated against the agency
//! directory before anything starts. Every `*.toml` directly in it is a policy
//! file; `calendars/*.toml` are region calendars ([`crate::calendar`]).
//!
//! ```toml
//! [durations]                 # "promptly" (及时) has no number in the sources
//! promptly = "2 working days"
//!
//! [[obligation]]
//! rule = "CQ-1.1b"            # DOMAIN.md rule id
//! kind = "legal_help_request" # MessageKind code name
//! duty = "hand the detainee's legal-help request to a duty lawyer"
//! bearer = "sender"           # sender | recipient
//! clock = "requested"         # requested (the envelope's clock_started_at) | submitted
//! deadline = "24h"            # <n>h | <n>m | <n>d | "<n> working hours" | "<n> working days" | a [durations] name
//! met_by = "delivered"        # delivered | acknowledged | feedback | relayed | hearing
//! when = "hearing_requested"  # optional: only when the payload asks for it (CQ-3.13)
//! notify = ["sender", "supervisor"]   # sender | recipient | bearer | supervisor | an agency id
//!
//! [[notice]]                  # a kind that is known but creates no obligation
//! kind = "booked_slot_notice"
//! rule = "SH-2.8"
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use toml::Spanned;

use crate::agency::AgencyKind;
use crate::calendar::{Calendar, line_of};
use crate::directory::{Agency, Directory};
use crate::kind::KindExt;
use refbus_proto::v1::MessageKind;

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
}

/// When a rule applies, beyond its message kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Condition {
    /// The rights complaint asks for the lawyer to be heard in person (CQ-3.13).
    HearingRequested,
}

impl MetBy {
    /// Every way an obligation is met.
    pub const ALL: [MetBy; 5] = [
        MetBy::Delivered,
        MetBy::Acknowledged,
        MetBy::Feedback,
        MetBy::Relayed,
        MetBy::Hearing,
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
    /// The justice bureau supervising the bearer ([`supervisor_of`]).
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
}

/// A kind that is known but creates no obligation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub rule: String,
    pub kind: MessageKind,
}

/// The validated policy catalogue: obligations, notices, named durations and
/// region calendars.
#[derive(Clone, Debug)]
pub struct PolicyCatalogue {
    rules: Vec<ObligationRule>,
    notices: Vec<Notice>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoticeEntry {
    kind: Spanned<String>,
    rule: Spanned<String>,
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
        let mut notice_at: HashMap<MessageKind, String> = HashMap::new();
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
                let kind = parse_kind(&entry.kind, &format!("notice {rule}"), &here)?;
                let at = entry.kind.span().start;
                if let Some(first) = notice_at.get(&kind) {
                    return Err(here.invalid(
                        at,
                        format!(
                            "notice {rule}: {} is already a notice at {first}",
                            kind.code()
                        ),
                    ));
                }
                notice_at.insert(kind, here.at(at));
                notices.push(Notice {
                    rule: rule.to_owned(),
                    kind,
                });
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

    /// The kinds that are known but create no obligation.
    #[must_use]
    pub fn notices(&self) -> &[Notice] {
        &self.notices
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

/// The justice bureau supervising `agency`: for an agency that is not a
/// justice bureau, the justice bureau of its region, else of its parent region;
/// for a justice bureau, the justice bureau of its parent region (so
/// dz-justice-bureau's supervisor is cq-justice-bureau, and a municipal
/// justice bureau has none).
#[must_use]
pub fn supervisor_of<'d>(agency: &Agency, directory: &'d Directory) -> Option<&'d Agency> {
    if agency.kind == AgencyKind::JusticeBureau {
        let parent = directory.region(&agency.region)?.parent.as_deref()?;
        directory.nearest_of_kind(AgencyKind::JusticeBureau, parent)
    } else {
        directory.nearest_of_kind(AgencyKind::JusticeBureau, &agency.region)
    }
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
        "relayed" | "hearing" => {
            return Err(here.invalid(
                entry.met_by.span().start,
                format!(
                    "{name}: met_by {:?} applies only to a {}",
                    entry.met_by.get_ref(),
                    if entry.met_by.get_ref() == "relayed" {
                        "misconduct_lead (DZ-7)"
                    } else {
                        "rights_complaint (CQ-3.13)"
                    }
                ),
            ));
        }
        _ => {
            return Err(field(
                &entry.met_by,
                "met_by",
                "\"delivered\", \"acknowledged\", \"feedback\", \"relayed\" or \"hearing\"",
            ));
        }
    };
    let when = match entry.when.as_ref() {
        None => None,
        Some(w) if w.get_ref() == "hearing_requested" && kind == MessageKind::RightsComplaint => {
            Some(Condition::HearingRequested)
        }
        Some(w) => {
            return Err(here.invalid(
                w.span().start,
                format!(
                    "{name}: when {:?}: expected \"hearing_requested\", on a rights_complaint (CQ-3.13)",
                    w.get_ref()
                ),
            ));
        }
    };

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
        // Ten kinds, plus the DZ-7 relay's and the CQ-3.13 hearing's own.
        assert_eq!(catalogue.rules().len(), 12);
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
        assert_eq!(catalogue.notices().len(), 2);
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
    fn supervisor_is_the_bearers_justice_bureau_or_its_parent() {
        let directory = directory();
        let supervisor =
            |id: &str| supervisor_of(directory.get(id).unwrap(), &directory).map(|a| a.id.clone());
        assert_eq!(
            supervisor("dz-detention-centre").as_deref(),
            Some("dz-justice-bureau")
        );
        assert_eq!(
            supervisor("dz-justice-bureau").as_deref(),
            Some("cq-justice-bureau")
        );
        assert_eq!(supervisor("cq-justice-bureau"), None);
        assert_eq!(
            supervisor("sh-first-detention-centre").as_deref(),
            Some("sh-justice-bureau")
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
                "met_by \"read\": expected \"delivered\", \"acknowledged\", \"feedback\", \"relayed\" or \"hearing\"",
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
                "{}:12: obligation CQ-1.1b: when \"hearing_requested\": expected \"hearing_requested\", on a rights_complaint (CQ-3.13)",
                t.path("cq.toml")
            )
        );
        t.write("cq.toml", &format!("{once}{once}"));
        assert_eq!(
            t.error(),
            format!(
                "{}:15: obligation CQ-1.1b for legal_help_request is already defined at {}:4",
                t.path("cq.toml"),
                t.path("cq.toml")
            )
        );
        t.write("cq.toml", &format!("{once}colour = \"red\"\n"));
        let e = t.error();
        assert!(
            e.starts_with(&format!(
                "{}: TOML parse error at line 12",
                t.path("cq.toml")
            )),
            "{e}"
        );
        assert!(e.contains("unknown field `colour`"), "{e}");
        t.write(
            "cq.toml",
            &format!("{once}\n[[notice]]\nkind = \"legal_help_request\"\nrule = \"SH-2.8\"\n"),
        );
        assert_eq!(
            t.error(),
            format!(
                "{}:14: notice SH-2.8: legal_help_request creates an obligation at {}:6, so it is not a notice",
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
