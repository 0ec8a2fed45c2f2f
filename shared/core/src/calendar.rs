//! Region calendars: working days, holidays and reception hours (SH-3.3), for deadlines counted in working time.
//!
//! One calendar per region, loaded from `deploy/policy/calendars/*.toml` by the
//! policy catalogue ([`crate::policy`]):
//!
//! ```toml
//! region = "310000"                 # administrative division code (a region in the directory)
//! name = "上海市"
//! utc_offset = "+08:00"
//! working_days = ["mon", "tue", "wed", "thu", "fri"]
//! holidays_file = "holidays-cn-2026.txt"   # relative to this file; one YYYY-MM-DD a line, `#` comments
//! extra_working_days = ["2026-10-10"]      # 调休: weekend days worked to make up for a holiday
//! reception_hours = ["08:30-11:00", "13:30-16:30"]   # SH-3.3
//! ```
//!
//! Working time counts only inside reception hours on working days, in local
//! time at the calendar's UTC offset. A region with no calendar of its own uses
//! its municipality's, else [`Calendar::always_open`] ("calendar time").

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{
    DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta,
    Timelike, Utc, Weekday,
};
use serde::Deserialize;
use toml::Spanned;

use crate::directory::Directory;
use crate::policy::PolicyError;

const DAY_SECONDS: u32 = 24 * 3600;

/// The working time of one region: which days are working days and when
/// agencies receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    region: String,
    name: String,
    offset: FixedOffset,
    /// Indexed by `Weekday::num_days_from_monday`.
    weekdays: [bool; 7],
    holidays: BTreeSet<NaiveDate>,
    /// 调休: days worked although their weekday is not a working day.
    extra_working_days: BTreeSet<NaiveDate>,
    /// Reception intervals in seconds after local midnight, sorted, disjoint,
    /// never empty; an end of 86 400 is midnight at the end of the day.
    reception: Vec<(u32, u32)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CalendarFile {
    region: Spanned<String>,
    name: String,
    utc_offset: Spanned<String>,
    working_days: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    holidays_file: Option<Spanned<String>>,
    #[serde(default)]
    extra_working_days: Vec<Spanned<String>>,
    reception_hours: Spanned<Vec<Spanned<String>>>,
}

impl Calendar {
    /// Every day a working day, reception all day, UTC+8: "calendar time".
    #[must_use]
    pub fn always_open(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            name: String::new(),
            offset: china_standard_time(),
            weekdays: [true; 7],
            holidays: BTreeSet::new(),
            extra_working_days: BTreeSet::new(),
            reception: vec![(0, DAY_SECONDS)],
        }
    }

    /// Reads and validates a calendar file and the holidays file it names.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file (the holidays file for a bad holiday),
    /// the line and what is wrong.
    pub fn load(path: &Path, directory: &Directory) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            what: "the calendar file",
            source,
        })?;
        Self::parse(&text, path, directory)
    }

    /// Parses and validates calendar text. `path` names the file in errors,
    /// and `holidays_file` is read relative to its directory.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file, the line and what is wrong.
    pub fn parse(text: &str, path: &Path, directory: &Directory) -> Result<Self, PolicyError> {
        let file: CalendarFile = toml::from_str(text).map_err(|e| PolicyError::parse(path, &e))?;
        let invalid = |offset: usize, problem: String| PolicyError::Invalid {
            path: path.to_path_buf(),
            line: line_of(text, offset),
            problem,
        };

        let region = file.region.get_ref().clone();
        if directory.region(&region).is_none() {
            return Err(invalid(
                file.region.span().start,
                format!("region `{region}` is not a region in the directory"),
            ));
        }
        let offset = parse_offset(file.utc_offset.get_ref()).ok_or_else(|| {
            invalid(
                file.utc_offset.span().start,
                format!(
                    "utc_offset {:?}: expected +HH:MM or -HH:MM, e.g. \"+08:00\"",
                    file.utc_offset.get_ref()
                ),
            )
        })?;

        let mut weekdays = [false; 7];
        for day in file.working_days.get_ref() {
            let weekday = parse_weekday(day.get_ref()).ok_or_else(|| {
                invalid(
                    day.span().start,
                    format!(
                        "working_days {:?}: expected mon, tue, wed, thu, fri, sat or sun",
                        day.get_ref()
                    ),
                )
            })?;
            weekdays[weekday.num_days_from_monday() as usize] = true;
        }
        if !weekdays.contains(&true) {
            return Err(invalid(
                file.working_days.span().start,
                "working_days is empty: name at least one weekday".into(),
            ));
        }

        let mut reception: Vec<(u32, u32)> = Vec::new();
        for range in file.reception_hours.get_ref() {
            let interval = parse_range(range.get_ref()).map_err(|why| {
                invalid(
                    range.span().start,
                    format!("reception_hours {:?}: {why}", range.get_ref()),
                )
            })?;
            reception.push(interval);
        }
        if reception.is_empty() {
            return Err(invalid(
                file.reception_hours.span().start,
                "reception_hours is empty: name at least one range, e.g. \"08:30-11:00\"".into(),
            ));
        }
        reception.sort_unstable();
        if let Some(pair) = reception.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(invalid(
                file.reception_hours.span().start,
                format!(
                    "reception_hours: {} and {} overlap",
                    format_range(pair[0]),
                    format_range(pair[1])
                ),
            ));
        }

        let mut holidays = BTreeSet::new();
        if let Some(name) = &file.holidays_file {
            let holidays_path = path
                .parent()
                .unwrap_or_else(|| Path::new(""))
                .join(name.get_ref());
            let list = std::fs::read_to_string(&holidays_path).map_err(|e| {
                invalid(
                    name.span().start,
                    format!(
                        "holidays_file {:?}: cannot read {}: {e}",
                        name.get_ref(),
                        holidays_path.display()
                    ),
                )
            })?;
            holidays = parse_holidays(&list, &holidays_path)?;
        }

        let mut extra_working_days = BTreeSet::new();
        for day in &file.extra_working_days {
            let date = parse_date(day.get_ref()).ok_or_else(|| {
                invalid(
                    day.span().start,
                    format!(
                        "extra_working_days {:?} is not a date (expected YYYY-MM-DD)",
                        day.get_ref()
                    ),
                )
            })?;
            if holidays.contains(&date) {
                return Err(invalid(
                    day.span().start,
                    format!("extra_working_days {date} is also listed as a holiday"),
                ));
            }
            extra_working_days.insert(date);
        }

        Ok(Self {
            region,
            name: file.name,
            offset,
            weekdays,
            holidays,
            extra_working_days,
            reception,
        })
    }

    /// The region code this calendar belongs to.
    #[must_use]
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The region's name as written in the calendar file (empty for
    /// [`Calendar::always_open`]).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offset of local time from UTC.
    #[must_use]
    pub fn utc_offset(&self) -> FixedOffset {
        self.offset
    }

    /// Whether agencies work on `date`: its weekday is a working day and it is
    /// not a holiday, or it is an extra (make-up) working day.
    #[must_use]
    pub fn is_working_day(&self, date: NaiveDate) -> bool {
        self.extra_working_days.contains(&date)
            || (self.weekdays[date.weekday().num_days_from_monday() as usize]
                && !self.holidays.contains(&date))
    }

    /// Whether `at` falls inside reception hours on a working day.
    #[must_use]
    pub fn is_open(&self, at: DateTime<Utc>) -> bool {
        let local = self.local(at);
        let second = local.time().num_seconds_from_midnight();
        self.is_working_day(local.date())
            && self
                .reception
                .iter()
                .any(|&(open, close)| open <= second && second < close)
    }

    /// `start` plus `hours` of working time: time counts only inside reception
    /// hours on working days (local time at the calendar's UTC offset). A start
    /// outside hours begins counting at the next opening. Zero hours is `start`.
    #[must_use]
    pub fn add_working_hours(&self, start: DateTime<Utc>, hours: u32) -> DateTime<Utc> {
        if hours == 0 {
            return start;
        }
        let mut remaining = TimeDelta::seconds(i64::from(hours) * 3600);
        let now = self.local(start);
        let mut day = now.date();
        loop {
            if self.is_working_day(day) {
                for &(open, close) in &self.reception {
                    let open = at_second(day, open);
                    let close = at_second(day, close);
                    let begin = open.max(now);
                    if begin >= close {
                        continue;
                    }
                    let available = close - begin;
                    if remaining <= available {
                        return self.to_utc(begin + remaining);
                    }
                    remaining -= available;
                }
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => return DateTime::<Utc>::MAX_UTC,
            }
        }
    }

    /// The close of reception on the `days`-th working day after the local date
    /// of `start` (days >= 1; the day of start does not count). Zero days is
    /// `start`.
    #[must_use]
    pub fn add_working_days(&self, start: DateTime<Utc>, days: u32) -> DateTime<Utc> {
        if days == 0 {
            return start;
        }
        let mut day = self.local(start).date();
        let mut counted = 0;
        while counted < days {
            match day.succ_opt() {
                Some(next) => day = next,
                None => return DateTime::<Utc>::MAX_UTC,
            }
            if self.is_working_day(day) {
                counted += 1;
            }
        }
        let close = self
            .reception
            .last()
            .map_or(DAY_SECONDS, |&(_, close)| close);
        self.to_utc(at_second(day, close))
    }

    fn local(&self, at: DateTime<Utc>) -> NaiveDateTime {
        at.with_timezone(&self.offset).naive_local()
    }

    fn to_utc(&self, local: NaiveDateTime) -> DateTime<Utc> {
        (local - TimeDelta::seconds(i64::from(self.offset.local_minus_utc()))).and_utc()
    }
}

/// UTC+8, the offset of every region on the bus.
fn china_standard_time() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| Utc.fix())
}

/// Local midnight of `day` plus `second` seconds (86 400 is the next midnight).
fn at_second(day: NaiveDate, second: u32) -> NaiveDateTime {
    day.and_time(NaiveTime::MIN) + TimeDelta::seconds(i64::from(second))
}

/// The 1-based line of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn parse_offset(text: &str) -> Option<FixedOffset> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let (hours, minutes) = rest.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let hours: i32 = parse_digits(hours)?.try_into().ok()?;
    let minutes: i32 = parse_digits(minutes)?.try_into().ok()?;
    if hours > 14 || minutes > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60))
}

fn parse_weekday(text: &str) -> Option<Weekday> {
    Some(match text {
        "mon" => Weekday::Mon,
        "tue" => Weekday::Tue,
        "wed" => Weekday::Wed,
        "thu" => Weekday::Thu,
        "fri" => Weekday::Fri,
        "sat" => Weekday::Sat,
        "sun" => Weekday::Sun,
        _ => return None,
    })
}

fn parse_digits(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// "HH:MM" as seconds after midnight; "24:00" is allowed (the end of the day).
fn parse_time(text: &str) -> Option<u32> {
    let (hours, minutes) = text.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let (hours, minutes) = (parse_digits(hours)?, parse_digits(minutes)?);
    if minutes > 59 || hours > 24 || (hours == 24 && minutes > 0) {
        return None;
    }
    Some(hours * 3600 + minutes * 60)
}

fn parse_range(text: &str) -> Result<(u32, u32), &'static str> {
    const SHAPE: &str = "expected HH:MM-HH:MM, e.g. \"08:30-11:00\"";
    let (open, close) = text.split_once('-').ok_or(SHAPE)?;
    let open = parse_time(open.trim()).ok_or(SHAPE)?;
    let close = parse_time(close.trim()).ok_or(SHAPE)?;
    if close <= open {
        return Err("the end is not after the start");
    }
    Ok((open, close))
}

fn format_range((open, close): (u32, u32)) -> String {
    format!(
        "\"{:02}:{:02}-{:02}:{:02}\"",
        open / 3600,
        open % 3600 / 60,
        close / 3600,
        close % 3600 / 60
    )
}

fn parse_date(text: &str) -> Option<NaiveDate> {
    let bytes = text.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

/// A holidays file: one `YYYY-MM-DD` a line; `#` starts a comment.
fn parse_holidays(text: &str, path: &Path) -> Result<BTreeSet<NaiveDate>, PolicyError> {
    let mut holidays = BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let date = parse_date(entry).ok_or_else(|| PolicyError::Invalid {
            path: path.to_path_buf(),
            line: index + 1,
            problem: format!("{entry:?} is not a date (expected YYYY-MM-DD)"),
        })?;
        holidays.insert(date);
    }
    Ok(holidays)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRECTORY: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/local/directory.toml"
    );
    const CALENDARS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy/calendars");

    fn shipped(file: &str) -> Calendar {
        let directory = Directory::load(DIRECTORY).unwrap();
        Calendar::load(&Path::new(CALENDARS).join(file), &directory).unwrap()
    }

    /// An instant written in local time, e.g. "2026-11-20 16:00 +08:00".
    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_str(text, "%Y-%m-%d %H:%M %:z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn sh_3_3_working_hours_carry_over_the_weekend() {
        let sh = shipped("shanghai.toml");
        assert_eq!(sh.region(), "310000");
        // Friday: 16:00-16:30 is half an hour; Monday 08:30 + 1.5 h.
        assert_eq!(
            sh.add_working_hours(at("2026-11-20 16:00 +08:00"), 2),
            at("2026-11-23 10:00 +08:00")
        );
        // Across lunch: 10:30-11:00, then 13:30-14:00.
        assert_eq!(
            sh.add_working_hours(at("2026-11-20 10:30 +08:00"), 1),
            at("2026-11-20 14:00 +08:00")
        );
        // Ending exactly at a close stays on that close.
        assert_eq!(
            sh.add_working_hours(at("2026-11-20 15:30 +08:00"), 1),
            at("2026-11-20 16:30 +08:00")
        );
        // The same instant written in UTC counts the same.
        assert_eq!(
            sh.add_working_hours(at("2026-11-20 08:00 +00:00"), 2),
            at("2026-11-23 10:00 +08:00")
        );
    }

    #[test]
    fn sh_3_3_a_start_before_opening_counts_from_the_opening() {
        let sh = shipped("shanghai.toml");
        assert_eq!(
            sh.add_working_hours(at("2026-11-23 07:00 +08:00"), 1),
            at("2026-11-23 09:30 +08:00")
        );
        // After closing: the next working day's opening.
        assert_eq!(
            sh.add_working_hours(at("2026-11-23 18:00 +08:00"), 1),
            at("2026-11-24 09:30 +08:00")
        );
        // On a Sunday: Monday's opening.
        assert_eq!(
            sh.add_working_hours(at("2026-11-22 10:00 +08:00"), 3),
            at("2026-11-23 14:00 +08:00")
        );
    }

    #[test]
    fn sh_3_3_a_start_at_lunch_counts_from_the_afternoon_opening() {
        let sh = shipped("shanghai.toml");
        assert_eq!(
            sh.add_working_hours(at("2026-11-23 12:00 +08:00"), 1),
            at("2026-11-23 14:30 +08:00")
        );
        assert!(!sh.is_open(at("2026-11-23 12:00 +08:00")));
        assert!(sh.is_open(at("2026-11-23 13:30 +08:00")));
        assert!(!sh.is_open(at("2026-11-23 16:30 +08:00")));
    }

    #[test]
    fn holidays_are_skipped() {
        let sh = shipped("shanghai.toml");
        for day in 1..=7 {
            assert!(!sh.is_working_day(date(&format!("2026-10-0{day}"))));
        }
        assert!(sh.is_working_day(date("2026-10-08")));
        // Wednesday 30 September: half an hour, then National Day, then Thursday 8 October.
        assert_eq!(
            sh.add_working_hours(at("2026-09-30 16:00 +08:00"), 2),
            at("2026-10-08 10:00 +08:00")
        );
    }

    #[test]
    fn an_extra_working_day_counts() {
        let sh = shipped("shanghai.toml");
        // Saturday 10 October 2026 is worked to make up for National Day.
        assert!(sh.is_working_day(date("2026-10-10")));
        assert!(!sh.is_working_day(date("2026-10-11")));
        assert!(!sh.is_working_day(date("2026-10-17")));
        assert_eq!(
            sh.add_working_hours(at("2026-10-09 16:00 +08:00"), 1),
            at("2026-10-10 09:00 +08:00")
        );
        assert_eq!(
            sh.add_working_days(at("2026-10-09 10:00 +08:00"), 1),
            at("2026-10-10 16:30 +08:00")
        );
    }

    #[test]
    fn working_days_end_at_the_close_of_reception() {
        let sh = shipped("shanghai.toml");
        // Thursday + 2: Friday, then Monday (the weekend does not count).
        assert_eq!(
            sh.add_working_days(at("2026-11-19 10:00 +08:00"), 2),
            at("2026-11-23 16:30 +08:00")
        );
        // The day of start does not count, even when it starts before opening.
        assert_eq!(
            sh.add_working_days(at("2026-11-23 07:00 +08:00"), 1),
            at("2026-11-24 16:30 +08:00")
        );
        // Across Mid-Autumn (25-27 September): Thursday 24 + 1 is Monday 28.
        assert_eq!(
            sh.add_working_days(at("2026-09-24 10:00 +08:00"), 1),
            at("2026-09-28 16:30 +08:00")
        );
        // Across National Day.
        assert_eq!(
            sh.add_working_days(at("2026-09-30 10:00 +08:00"), 1),
            at("2026-10-08 16:30 +08:00")
        );
    }

    #[test]
    fn cq_2_8_chongqing_receives_one_hour_longer() {
        let cq = shipped("chongqing.toml");
        assert_eq!(cq.region(), "500000");
        assert_eq!(
            cq.add_working_hours(at("2026-11-20 17:00 +08:00"), 1),
            at("2026-11-23 09:00 +08:00")
        );
        assert_eq!(
            cq.add_working_days(at("2026-11-20 17:00 +08:00"), 1),
            at("2026-11-23 17:30 +08:00")
        );
    }

    #[test]
    fn always_open_is_calendar_time() {
        let open = Calendar::always_open("440000");
        assert_eq!(open.region(), "440000");
        let start = at("2026-10-01 23:15 +08:00");
        assert_eq!(
            open.add_working_hours(start, 24),
            start + TimeDelta::hours(24)
        );
        assert_eq!(
            open.add_working_hours(start, 100),
            start + TimeDelta::hours(100)
        );
        assert_eq!(open.add_working_hours(start, 0), start);
        assert_eq!(
            open.add_working_days(start, 2),
            at("2026-10-04 00:00 +08:00")
        );
        assert!(open.is_open(start));
    }

    #[test]
    fn times_and_ranges_parse_strictly() {
        assert_eq!(parse_range("08:30-11:00"), Ok((30_600, 39_600)));
        assert_eq!(parse_range("00:00-24:00"), Ok((0, DAY_SECONDS)));
        assert_eq!(
            parse_range("11:00-08:30"),
            Err("the end is not after the start")
        );
        assert!(parse_range("8:30-11:00").is_err());
        assert!(parse_range("08:30-24:30").is_err());
        assert_eq!(parse_offset("+08:00"), FixedOffset::east_opt(8 * 3600));
        assert_eq!(
            parse_offset("-03:30"),
            FixedOffset::east_opt(-(3 * 3600 + 1800))
        );
        assert!(parse_offset("08:00").is_none());
        assert!(parse_date("2026-2-03").is_none());
        assert!(parse_date("2026-02-30").is_none());
    }
}
