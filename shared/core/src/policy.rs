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
//! met_by = "delivered"        # delivered | acknowledged | feedback
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
}

impl MetBy {
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            MetBy::Delivered => "delivered",
            MetBy::Acknowledged => "acknowledged",
            MetBy::Feedback => "feedback",
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
        let mut files = Vec::new();
        for path in toml_files(dir, "the policy directory")? {
            let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
                path: path.clone(),
                what: "the policy file",
                source,
            })?;
            let file: PolicyFile =
                toml::from_str(&text).map_err(|e| PolicyError::parse(&path, &e))?;
            files.push((path, text, file));
        }
        if files.is_empty() {
            return Err(PolicyError::Unusable {
                path: dir.to_path_buf(),
                problem: "no policy files (*.toml) in this directory".into(),
            });
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
        let mut rule_at: HashMap<(String, MessageKind), String> = HashMap::new();
        let mut notices: Vec<Notice> = Vec::new();
        let mut notice_at: HashMap<MessageKind, String> = HashMap::new();
        let mut obligation_at: HashMap<MessageKind, String> = HashMap::new();
        for (path, text, file) in &files {
            let here = Here { path, text };
            for entry in &file.obligation {
                let rule = parse_obligation(entry, &durations, directory, &here)?;
                let at = entry.rule.span().start;
                let key = (rule.rule.clone(), rule.kind);
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

        Ok(Self {
            rules,
            notices,
            durations,
            calendars,
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
    /// entry, or it is a reply kind (acknowledgement, feedback, overdue_notice).
    #[must_use]
    pub fn knows(&self, kind: MessageKind) -> bool {
        kind.is_reply()
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
        _ => {
            return Err(field(
                &entry.met_by,
                "met_by",
                "\"delivered\", \"acknowledged\" or \"feedback\"",
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
