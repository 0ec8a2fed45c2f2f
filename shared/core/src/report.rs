//! The joint-meeting compliance report (CQ-3.11): per agency and rule,
//! counts, on-time rates and time to meet, as rows, a terminal table, CSV
//! and a self-contained HTML page with a chart.
//!
//! Definitions (`from`, `to` and `as_of` are the arguments of [`compile`]):
//! - an obligation is in the report when `from <= clock_started_at < to`;
//! - *met*: `met_at` is set and `met_at <= as_of`; an obligation met after
//!   `as_of` counts as not yet met;
//! - *met on time*: met and `met_at <= due_at` (met exactly at the deadline
//!   is on time); *met late*: met and `met_at > due_at`;
//! - *still open*: not met and `due_at > as_of`; *overdue*: not met and
//!   `due_at <= as_of` (due exactly at `as_of` is overdue). So
//!   `count = met_on_time + met_late + still_open + overdue`;
//! - *time to meet* = `met_at - clock_started_at`, over met obligations (on
//!   time or late); median and 95th percentile by the nearest-rank method:
//!   the p-th percentile is the value at rank `ceil(p/100 * n)` (1-based) of
//!   the sorted values, the median is p50 by the same rule; `None` when
//!   nothing was met;
//! - *on-time rate* = `met_on_time / count`.
//!
//! Rows are sorted by agency, then rule; [`ComplianceReport::totals`] gives
//! one row per agency over all its rules (rule `"all"`), same definitions.
//!
//! Two sections follow the rows when the caller gives them
//! ([`ComplianceReport::with_meetings`]): the services out of order of
//! acceptance (CQ-1.3b, [`OutOfOrder`]), each a request a centre served while
//! an earlier-accepted one of its queue was still waiting, naming both; and
//! the lawyers' ratings of each centre's meetings (CQ-3.11b,
//! [`CentreRatings`]). Both only for the centres the viewer may see.
//!
//! Confidentiality (DZ-6): [`compile`] counts every outcome it is given, so
//! the caller gives only what the viewer may see. The tracker
//! (`refbus_tracker::query`) leaves out every obligation filed under a
//! misconduct lead whose route the viewer is not on: no row, count, rate or
//! percentile of any agency then includes it, and an organ that bears
//! nothing else in the period has no row at all.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Duration, Utc};

/// The rule id of the rows of [`ComplianceReport::totals`].
pub const ALL_RULES: &str = "all";

/// One obligation as the report sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObligationOutcome {
    /// The agency bearing the obligation.
    pub agency: String,
    /// DOMAIN.md rule id, e.g. "CQ-1.1b".
    pub rule: String,
    /// When the obligation's clock started: decides the period it is in.
    pub clock_started_at: DateTime<Utc>,
    /// Its deadline.
    pub due_at: DateTime<Utc>,
    /// When it was met, if it was.
    pub met_at: Option<DateTime<Utc>>,
}

/// One agency's figures for one rule (or for all its rules: rule
/// [`ALL_RULES`]). See the module documentation for the definitions.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ComplianceRow {
    pub agency: String,
    pub rule: String,
    /// Obligations whose clock started in the period.
    pub count: u64,
    /// Met by `as_of`, at or before the deadline.
    pub met_on_time: u64,
    /// Met by `as_of`, after the deadline.
    pub met_late: u64,
    /// Not met by `as_of`, due after `as_of`.
    pub still_open: u64,
    /// Not met by `as_of`, due at or before `as_of`.
    pub overdue: u64,
    /// Median time from clock start to meeting (nearest rank), `None` when
    /// nothing was met.
    pub median_to_meet: Option<Duration>,
    /// 95th percentile of the time to meet (nearest rank), `None` when
    /// nothing was met.
    pub p95_to_meet: Option<Duration>,
}

/// CQ-1.3b: a request a centre served (in the period) while one it had
/// accepted earlier was still waiting (neither served nor refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfOrder {
    pub detention_centre: String,
    /// The rule that orders the centre's queue, e.g. "CQ-1.3b" or "SH-2.7".
    pub rule: String,
    /// The request served out of order: id, kind code, accepted, served.
    pub served_id: String,
    pub served_kind: String,
    pub served_accepted_at: DateTime<Utc>,
    pub served_at: DateTime<Utc>,
    /// The earlier request it overtook: id, kind code, accepted.
    pub overtaken_id: String,
    pub overtaken_kind: String,
    pub overtaken_accepted_at: DateTime<Utc>,
}

/// CQ-3.11b: the lawyers' ratings of one centre's meetings in the period.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CentreRatings {
    pub detention_centre: String,
    /// How many ratings gave each score, 1 to 5.
    pub by_score: [u64; 5],
}

impl CentreRatings {
    /// How many ratings.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.by_score.iter().sum()
    }

    /// The mean score, 1 to 5; 0 when there are none.
    #[must_use]
    pub fn mean(&self) -> f64 {
        let count = self.count();
        if count == 0 {
            return 0.0;
        }
        let total: u64 = self
            .by_score
            .iter()
            .zip(1_u64..)
            .map(|(n, score)| n * score)
            .sum();
        total as f64 / count as f64
    }
}

/// The report for the obligations whose clock started in `[from, to)`,
/// judged as of `as_of`. Built by [`compile`].
#[derive(Clone, Debug, PartialEq)]
pub struct ComplianceReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    /// Sorted by agency, then rule.
    pub rows: Vec<ComplianceRow>,
    /// CQ-1.3b: services out of order, by centre then service time.
    pub out_of_order: Vec<OutOfOrder>,
    /// CQ-3.11b: ratings per centre, by centre.
    pub ratings: Vec<CentreRatings>,
    /// Per agency, the sorted times to meet over all its rules: what
    /// [`ComplianceReport::totals`] takes its percentiles from.
    times_by_agency: BTreeMap<String, Vec<Duration>>,
}

/// The value at nearest rank `ceil(p/100 * n)` (1-based) of `sorted`;
/// `None` when it is empty. `percentile` is capped at 100.
fn nearest_rank(sorted: &[Duration], percentile: usize) -> Option<Duration> {
    let n = sorted.len();
    let rank = (percentile.min(100) * n).div_ceil(100).clamp(1, n.max(1));
    sorted.get(rank - 1).copied()
}

/// The counts of one row being built, and its times to meet.
#[derive(Default)]
struct Tally {
    count: u64,
    met_on_time: u64,
    met_late: u64,
    still_open: u64,
    overdue: u64,
    times: Vec<Duration>,
}

impl Tally {
    /// Counts `o` as of `as_of`; returns its time to meet if it was met.
    fn add(&mut self, o: &ObligationOutcome, as_of: DateTime<Utc>) -> Option<Duration> {
        self.count += 1;
        match o.met_at.filter(|met| *met <= as_of) {
            Some(met) => {
                if met <= o.due_at {
                    self.met_on_time += 1;
                } else {
                    self.met_late += 1;
                }
                let time = met - o.clock_started_at;
                self.times.push(time);
                Some(time)
            }
            None if o.due_at > as_of => {
                self.still_open += 1;
                None
            }
            None => {
                self.overdue += 1;
                None
            }
        }
    }

    fn into_row(mut self, agency: String, rule: String) -> ComplianceRow {
        self.times.sort_unstable();
        ComplianceRow {
            agency,
            rule,
            count: self.count,
            met_on_time: self.met_on_time,
            met_late: self.met_late,
            still_open: self.still_open,
            overdue: self.overdue,
            median_to_meet: nearest_rank(&self.times, 50),
            p95_to_meet: nearest_rank(&self.times, 95),
        }
    }
}

/// Builds the report for obligations whose clock started in `[from, to)`
/// (`from <= clock_started_at < to`), judged as of `as_of`: one row per
/// agency and rule that has at least one, sorted by agency then rule.
/// Outcomes outside the period are ignored; `to <= from` gives no rows.
pub fn compile(
    outcomes: impl IntoIterator<Item = ObligationOutcome>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    as_of: DateTime<Utc>,
) -> ComplianceReport {
    let mut tallies: BTreeMap<(String, String), Tally> = BTreeMap::new();
    let mut times_by_agency: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for o in outcomes {
        if o.clock_started_at < from || o.clock_started_at >= to {
            continue;
        }
        let time = tallies
            .entry((o.agency.clone(), o.rule.clone()))
            .or_default()
            .add(&o, as_of);
        let times = times_by_agency.entry(o.agency).or_default();
        times.extend(time);
    }
    for times in times_by_agency.values_mut() {
        times.sort_unstable();
    }
    let rows = tallies
        .into_iter()
        .map(|((agency, rule), tally)| tally.into_row(agency, rule))
        .collect();
    ComplianceReport {
        from,
        to,
        as_of,
        rows,
        out_of_order: Vec::new(),
        ratings: Vec::new(),
        times_by_agency,
    }
}

/// Hours with 2 decimals; empty for `None`.
fn hours(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}", d.num_milliseconds() as f64 / 3_600_000.0))
        .unwrap_or_default()
}

/// `met_on_time / count` with 3 decimals; empty when `count` is 0.
fn rate(r: &ComplianceRow) -> String {
    if r.count == 0 {
        String::new()
    } else {
        format!("{:.3}", r.met_on_time as f64 / r.count as f64)
    }
}

/// A field quoted as RFC 4180 asks: in double quotes, with quotes doubled,
/// when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Text safe in HTML content and attribute values.
#[must_use]
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text safe on a terminal: control characters (escape sequences, line
/// breaks) are shown escaped instead of acting.
fn terminal_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Columns a character takes on a terminal: 2 for East Asian wide
/// characters (CJK, Hangul, full-width forms), 1 otherwise.
fn char_width(c: char) -> usize {
    let wide = matches!(u32::from(c),
        0x1100..=0x115F
        | 0x2E80..=0x303E
        | 0x3041..=0x33FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xA000..=0xA4CF
        | 0xAC00..=0xD7A3
        | 0xF900..=0xFAFF
        | 0xFE30..=0xFE4F
        | 0xFF00..=0xFF60
        | 0xFFE0..=0xFFE6
        | 0x1F300..=0x1F64F
        | 0x20000..=0x3FFFD);
    if wide { 2 } else { 1 }
}

fn display_width(text: &str) -> usize {
    text.chars().map(char_width).sum()
}

/// The period as people read it.
fn period(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    format!(
        "{} to {} UTC",
        from.format("%Y-%m-%d %H:%M"),
        to.format("%Y-%m-%d %H:%M")
    )
}

/// The figures of a row as text, in column order.
fn cells(r: &ComplianceRow) -> [String; 10] {
    [
        r.agency.clone(),
        r.rule.clone(),
        r.count.to_string(),
        r.met_on_time.to_string(),
        r.met_late.to_string(),
        r.still_open.to_string(),
        r.overdue.to_string(),
        rate(r),
        hours(r.median_to_meet),
        hours(r.p95_to_meet),
    ]
}

/// The time as the sections show it.
fn minute(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

/// The cells of an out-of-order service, in column order.
fn out_of_order_cells(o: &OutOfOrder) -> [String; 9] {
    [
        o.detention_centre.clone(),
        o.rule.clone(),
        o.served_id.clone(),
        o.served_kind.clone(),
        minute(o.served_accepted_at),
        minute(o.served_at),
        o.overtaken_id.clone(),
        o.overtaken_kind.clone(),
        minute(o.overtaken_accepted_at),
    ]
}

const OUT_OF_ORDER_HEADER: [&str; 9] = [
    "detention_centre",
    "rule",
    "served",
    "served_kind",
    "served_accepted_at",
    "served_at",
    "overtaken",
    "overtaken_kind",
    "overtaken_accepted_at",
];

/// The cells of a centre's ratings, in column order.
fn rating_cells(r: &CentreRatings) -> [String; 8] {
    let [one, two, three, four, five] = r.by_score.map(|n| n.to_string());
    [
        r.detention_centre.clone(),
        r.count().to_string(),
        format!("{:.2}", r.mean()),
        one,
        two,
        three,
        four,
        five,
    ]
}

const RATINGS_HEADER: [&str; 8] = [
    "detention_centre",
    "ratings",
    "mean_score",
    "score_1",
    "score_2",
    "score_3",
    "score_4",
    "score_5",
];

/// A plain-text table: header, dashes, rows; left-aligned, control
/// characters escaped, wide characters counted two columns.
fn text_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let body: Vec<[String; N]> = rows
        .iter()
        .map(|r| r.clone().map(|c| terminal_text(&c)))
        .collect();
    let mut widths = header.map(display_width);
    for row in &body {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(display_width(c));
        }
    }
    let mut out = String::new();
    let mut line = |row: &[String]| {
        let mut text = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(c);
            text.push_str(&" ".repeat(w.saturating_sub(display_width(c))));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(str::to_owned));
    line(&widths.map(|w| "-".repeat(w)));
    for row in &body {
        line(row);
    }
    out
}

impl ComplianceReport {
    /// The report with its meeting sections (module docs): the services
    /// out of order (CQ-1.3b) and the ratings per centre (CQ-3.11b), each
    /// sorted by centre.
    #[must_use]
    pub fn with_meetings(
        mut self,
        mut out_of_order: Vec<OutOfOrder>,
        mut ratings: Vec<CentreRatings>,
    ) -> Self {
        out_of_order.sort_by(|a, b| {
            (
                &a.detention_centre,
                a.served_at,
                &a.served_id,
                a.overtaken_accepted_at,
            )
                .cmp(&(
                    &b.detention_centre,
                    b.served_at,
                    &b.served_id,
                    b.overtaken_accepted_at,
                ))
        });
        ratings.sort_by(|a, b| a.detention_centre.cmp(&b.detention_centre));
        self.out_of_order = out_of_order;
        self.ratings = ratings;
        self
    }

    /// One row per agency over all its rules (rule [`ALL_RULES`]), with the
    /// same definitions: the counts are the sums of the agency's rows, the
    /// median and 95th percentile are taken over all its met obligations.
    /// Sorted by agency.
    #[must_use]
    pub fn totals(&self) -> Vec<ComplianceRow> {
        let mut by_agency: BTreeMap<&str, ComplianceRow> = BTreeMap::new();
        for r in &self.rows {
            let t = by_agency.entry(&r.agency).or_insert_with(|| ComplianceRow {
                agency: r.agency.clone(),
                rule: ALL_RULES.to_owned(),
                ..ComplianceRow::default()
            });
            t.count += r.count;
            t.met_on_time += r.met_on_time;
            t.met_late += r.met_late;
            t.still_open += r.still_open;
            t.overdue += r.overdue;
        }
        by_agency
            .into_values()
            .map(|mut t| {
                let times = self
                    .times_by_agency
                    .get(&t.agency)
                    .map_or(&[][..], Vec::as_slice);
                t.median_to_meet = nearest_rank(times, 50);
                t.p95_to_meet = nearest_rank(times, 95);
                t
            })
            .collect()
    }

    /// The rows as CSV: the header
    /// `agency,rule,count,met_on_time,met_late,still_open,overdue,on_time_rate,median_hours_to_meet,p95_hours_to_meet`
    /// then one line per row. `on_time_rate` has 3 decimals and is empty
    /// when `count` is 0; hours have 2 decimals and are empty when nothing
    /// was met. Fields with a comma, a quote or a line break are quoted as
    /// RFC 4180 asks. Lines end in `\n`.
    #[must_use]
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "agency,rule,count,met_on_time,met_late,still_open,overdue,on_time_rate,median_hours_to_meet,p95_hours_to_meet\n",
        );
        for r in &self.rows {
            let fields: Vec<String> = cells(r).iter().map(|c| csv_field(c)).collect();
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        let mut section = |title: &str, header: &[&str], rows: Vec<Vec<String>>| {
            if rows.is_empty() {
                return;
            }
            out.push('\n');
            out.push_str(title);
            out.push('\n');
            out.push_str(&header.join(","));
            out.push('\n');
            for row in rows {
                let fields: Vec<String> = row.iter().map(|c| csv_field(c)).collect();
                out.push_str(&fields.join(","));
                out.push('\n');
            }
        };
        section(
            "# out of order (CQ-1.3b)",
            &OUT_OF_ORDER_HEADER,
            self.out_of_order
                .iter()
                .map(|o| out_of_order_cells(o).to_vec())
                .collect(),
        );
        section(
            "# ratings (CQ-3.11b)",
            &RATINGS_HEADER,
            self.ratings
                .iter()
                .map(|r| rating_cells(r).to_vec())
                .collect(),
        );
        out
    }

    /// The rows as a plain-text table for a terminal: a title line with
    /// the period, a header line, a rule of dashes, then one line per row;
    /// text columns left-aligned, figures right-aligned, `-` where the CSV
    /// would be empty. Control characters in agency or rule ids are shown
    /// escaped; East Asian wide characters count two columns.
    #[must_use]
    pub fn to_table(&self) -> String {
        const HEADER: [&str; 10] = [
            "agency",
            "rule",
            "count",
            "on time",
            "late",
            "open",
            "overdue",
            "on-time rate",
            "median h",
            "p95 h",
        ];
        let body: Vec<[String; 10]> = self
            .rows
            .iter()
            .map(|r| {
                cells(r).map(|c| {
                    if c.is_empty() {
                        "-".to_owned()
                    } else {
                        terminal_text(&c)
                    }
                })
            })
            .collect();
        let mut widths = HEADER.map(display_width);
        for row in &body {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(display_width(c));
            }
        }
        let mut out = format!(
            "refbus compliance report, {} (as of {})\n",
            period(self.from, self.to),
            self.as_of.format("%Y-%m-%d %H:%M UTC")
        );
        let mut line = |row: &[String]| {
            let mut text = String::new();
            for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
                let pad = " ".repeat(w.saturating_sub(display_width(c)));
                if i > 0 {
                    text.push_str("  ");
                }
                if i < 2 {
                    text.push_str(c);
                    text.push_str(&pad);
                } else {
                    text.push_str(&pad);
                    text.push_str(c);
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&HEADER.map(str::to_owned));
        line(&widths.map(|w| "-".repeat(w)));
        for row in &body {
            line(row);
        }
        if !self.out_of_order.is_empty() {
            out.push_str("\nServed out of order of acceptance (CQ-1.3b)\n");
            let rows: Vec<[String; 9]> = self.out_of_order.iter().map(out_of_order_cells).collect();
            out.push_str(&text_table(OUT_OF_ORDER_HEADER, &rows));
        }
        if !self.ratings.is_empty() {
            out.push_str("\nMeeting ratings per centre (CQ-3.11b)\n");
            let rows: Vec<[String; 8]> = self.ratings.iter().map(rating_cells).collect();
            out.push_str(&text_table(RATINGS_HEADER, &rows));
        }
        out
    }

    /// A complete, self-contained HTML page (no external scripts, styles,
    /// fonts or images; no links at all): the title with the period, an
    /// inline SVG chart with one horizontal stacked bar per agency (from
    /// [`ComplianceReport::totals`]: met on time, met late, still open,
    /// overdue, each segment with a `<title>` tooltip, and a legend), then
    /// the table of the rows. All text is HTML-escaped.
    #[must_use]
    pub fn to_html(&self) -> String {
        let title = html_escape(&format!(
            "refbus compliance report, {}",
            period(self.from, self.to)
        ));
        format!(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>{title}</title>\n\
             <style>body{{font-family:sans-serif;margin:2em}}\
             table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
             td:nth-child(-n+2),th:nth-child(-n+2){{text-align:left}}</style>\n\
             </head>\n<body>\n{}</body>\n</html>\n",
            self.to_html_fragment()
        )
    }

    /// The report as an HTML fragment (heading, chart, table) to embed in
    /// a page, such as the tracker's dashboard.
    #[must_use]
    pub fn to_html_fragment(&self) -> String {
        const LABEL_WIDTH: usize = 220;
        const BAR_WIDTH: f64 = 500.0;
        const ROW_HEIGHT: usize = 30;
        const SEGMENTS: [(&str, &str); 4] = [
            ("met on time", "#2e7d32"),
            ("met late", "#f9a825"),
            ("still open", "#1565c0"),
            ("overdue", "#c62828"),
        ];
        let title = html_escape(&format!(
            "refbus compliance report, {}",
            period(self.from, self.to)
        ));
        let mut out = String::new();
        let _ = write!(
            out,
            "<h1>{title}</h1>\n\
             <p>Joint-meeting report (CQ-3.11): obligations whose clock started in the period, \
             judged as of {as_of}.</p>\n",
            as_of = html_escape(&self.as_of.format("%Y-%m-%d %H:%M UTC").to_string())
        );

        let totals = self.totals();
        let height = ROW_HEIGHT * totals.len() + 50;
        let width = LABEL_WIDTH + 600;
        let _ = writeln!(
            out,
            "<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
             role=\"img\" aria-label=\"obligations per agency by outcome\">"
        );
        for (i, t) in totals.iter().enumerate() {
            let y = ROW_HEIGHT * i + 10;
            let agency = html_escape(&t.agency);
            let _ = write!(
                out,
                "<text x=\"0\" y=\"{}\" font-size=\"12\">{agency}<title>{agency}: {} obligations</title></text>",
                y + 14,
                t.count
            );
            let values = [t.met_on_time, t.met_late, t.still_open, t.overdue];
            let mut x = LABEL_WIDTH as f64;
            for ((name, colour), value) in SEGMENTS.iter().zip(values) {
                if t.count == 0 || value == 0 {
                    continue;
                }
                let share = value as f64 / t.count as f64;
                let w = BAR_WIDTH * share;
                let _ = write!(
                    out,
                    "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"20\" fill=\"{colour}\">\
                     <title>{agency}: {} {value} of {} ({:.1}%)</title></rect>",
                    html_escape(name),
                    t.count,
                    share * 100.0
                );
                x += w;
            }
            out.push('\n');
        }
        let y = ROW_HEIGHT * totals.len() + 25;
        for (i, (name, colour)) in SEGMENTS.iter().enumerate() {
            let x = LABEL_WIDTH + i * 130;
            let _ = write!(
                out,
                "<rect x=\"{x}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
                 <text x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>",
                x + 16,
                y + 11,
                html_escape(name)
            );
        }
        out.push_str("\n</svg>\n");

        out.push_str(
            "<table>\n<tr><th>agency</th><th>rule</th><th>count</th><th>met on time</th>\
             <th>met late</th><th>still open</th><th>overdue</th><th>on-time rate</th>\
             <th>median hours to meet</th><th>p95 hours to meet</th></tr>\n",
        );
        for r in &self.rows {
            out.push_str("<tr>");
            for c in cells(r) {
                let _ = write!(out, "<td>{}</td>", html_escape(&c));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
        let mut section = |id: &str, title: &str, header: &[&str], rows: Vec<Vec<String>>| {
            if rows.is_empty() {
                return;
            }
            let _ = write!(
                out,
                "<h2 id=\"{id}\">{}</h2>\n<table class=\"{id}\">\n<tr>",
                html_escape(title)
            );
            for h in header {
                let _ = write!(out, "<th>{}</th>", html_escape(&h.replace('_', " ")));
            }
            out.push_str("</tr>\n");
            for row in rows {
                out.push_str("<tr class=\"section\">");
                for c in row {
                    let _ = write!(out, "<td>{}</td>", html_escape(&c));
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</table>\n");
        };
        section(
            "out-of-order",
            "Served out of order of acceptance (CQ-1.3b)",
            &OUT_OF_ORDER_HEADER,
            self.out_of_order
                .iter()
                .map(|o| out_of_order_cells(o).to_vec())
                .collect(),
        );
        section(
            "ratings",
            "Meeting ratings per centre (CQ-3.11b)",
            &RATINGS_HEADER,
            self.ratings
                .iter()
                .map(|r| rating_cells(r).to_vec())
                .collect(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 10, day, hour, 0, 0).unwrap()
    }

    /// An obligation of `agency` under `rule`, due `due_h` hours after its
    /// clock start and met `met_h` hours after it.
    fn ob(
        agency: &str,
        rule: &str,
        clock: DateTime<Utc>,
        due_h: i64,
        met_h: Option<i64>,
    ) -> ObligationOutcome {
        ObligationOutcome {
            agency: agency.into(),
            rule: rule.into(),
            clock_started_at: clock,
            due_at: clock + Duration::hours(due_h),
            met_at: met_h.map(|h| clock + Duration::hours(h)),
        }
    }

    fn o(agency: &str, clock: DateTime<Utc>, due_h: i64, met_h: Option<i64>) -> ObligationOutcome {
        ob(agency, "CQ-1.1b", clock, due_h, met_h)
    }

    fn counts(r: &ComplianceRow) -> (u64, u64, u64, u64, u64) {
        (r.count, r.met_on_time, r.met_late, r.still_open, r.overdue)
    }

    /// Parses RFC 4180 CSV (quoted fields, doubled quotes, line breaks in
    /// quotes) into records.
    fn parse_csv(text: &str) -> Vec<Vec<String>> {
        let mut records = Vec::new();
        let mut record = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') => {
                    assert!(field.is_empty(), "quote inside an unquoted field");
                    quoted = true;
                }
                (false, ',') => record.push(std::mem::take(&mut field)),
                (false, '\n') => {
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                (false, c) => field.push(c),
            }
        }
        assert!(
            !quoted && field.is_empty() && record.is_empty(),
            "unterminated: {text}"
        );
        records
    }

    #[test]
    fn cq_3_11_counts_each_category_with_its_boundaries() {
        let (from, to, as_of) = (at(1, 0), at(31, 6), at(31, 12));
        let outcomes = vec![
            o("a", at(1, 0), 24, Some(24)), // clock exactly at `from`: in; met exactly at due: on time
            o("a", at(2, 0), 24, Some(3)),  // on time
            o("a", at(2, 0), 24, Some(25)), // late
            o("a", at(31, 0), 24, None),    // due after as_of: still open
            o("a", at(31, 0), 24, Some(13)), // met after as_of, due after: still open
            o("a", at(30, 0), 24, Some(40)), // met after as_of, due before: overdue
            o("a", at(30, 12), 24, None),   // due exactly at as_of: overdue
            o("a", at(31, 6), 24, Some(1)), // clock exactly at `to`: out
            o("a", at(1, 0) - Duration::seconds(1), 24, Some(1)), // before `from`: out
        ];
        let report = compile(outcomes, from, to, as_of);
        assert_eq!((report.from, report.to, report.as_of), (from, to, as_of));
        assert_eq!(report.rows.len(), 1);
        let r = &report.rows[0];
        assert_eq!((r.agency.as_str(), r.rule.as_str()), ("a", "CQ-1.1b"));
        assert_eq!(counts(r), (7, 2, 1, 2, 2));
        assert_eq!(
            r.count,
            r.met_on_time + r.met_late + r.still_open + r.overdue
        );
        // Met: 3 h, 24 h, 25 h.
        assert_eq!(r.median_to_meet, Some(Duration::hours(24)));
        assert_eq!(r.p95_to_meet, Some(Duration::hours(25)));
    }

    #[test]
    fn cq_3_11_met_exactly_at_as_of_is_met() {
        let report = compile(
            vec![o("a", at(1, 0), 24, Some(48))],
            at(1, 0),
            at(2, 0),
            at(3, 0),
        );
        assert_eq!(counts(&report.rows[0]), (1, 0, 1, 0, 0));
    }

    #[test]
    fn cq_3_11_rows_are_sorted_by_agency_then_rule() {
        let outcomes = vec![
            ob("b", "CQ-1.1b", at(1, 0), 1, None),
            ob("a", "SH-2.5", at(1, 0), 1, None),
            ob("a", "CQ-3.14", at(1, 0), 1, None),
            ob("b", "CQ-1.1b", at(1, 0), 1, None),
            ob("a", "CQ-1.1b", at(1, 0), 1, None),
        ];
        let report = compile(outcomes, at(1, 0), at(2, 0), at(5, 0));
        let keys: Vec<_> = report
            .rows
            .iter()
            .map(|r| (r.agency.as_str(), r.rule.as_str(), r.count))
            .collect();
        assert_eq!(
            keys,
            [
                ("a", "CQ-1.1b", 1),
                ("a", "CQ-3.14", 1),
                ("a", "SH-2.5", 1),
                ("b", "CQ-1.1b", 2)
            ]
        );
    }

    #[test]
    fn cq_3_11_percentiles_are_nearest_rank() {
        // 20 values, 1..=20 hours, given out of order: median = rank 10,
        // p95 = rank ceil(19.0) = 19.
        let outcomes: Vec<_> = (1..=20)
            .rev()
            .map(|h| o("a", at(1, 0), 100, Some(h)))
            .collect();
        let report = compile(outcomes, at(1, 0), at(2, 0), at(20, 0));
        assert_eq!(report.rows[0].median_to_meet, Some(Duration::hours(10)));
        assert_eq!(report.rows[0].p95_to_meet, Some(Duration::hours(19)));

        // Late meets count in the time to meet; 3 values: median rank 2, p95 rank 3.
        let outcomes = vec![
            o("a", at(1, 0), 1, Some(5)),
            o("a", at(1, 0), 10, Some(1)),
            o("a", at(1, 0), 10, Some(2)),
            o("a", at(1, 0), 10, None),
        ];
        let report = compile(outcomes, at(1, 0), at(2, 0), at(20, 0));
        assert_eq!(report.rows[0].median_to_meet, Some(Duration::hours(2)));
        assert_eq!(report.rows[0].p95_to_meet, Some(Duration::hours(5)));

        // One value is every percentile.
        let one = [Duration::minutes(7)];
        assert_eq!(nearest_rank(&one, 50), Some(Duration::minutes(7)));
        assert_eq!(nearest_rank(&one, 95), Some(Duration::minutes(7)));
        assert_eq!(nearest_rank(&[], 50), None);
        assert_eq!(nearest_rank(&one, usize::MAX), Some(Duration::minutes(7)));
    }

    #[test]
    fn cq_3_11_no_time_to_meet_when_nothing_was_met() {
        let report = compile(
            vec![
                o("a", at(1, 0), 1, None),
                o("a", at(1, 0), 1, Some(500)), // met after as_of
            ],
            at(1, 0),
            at(2, 0),
            at(20, 0),
        );
        let r = &report.rows[0];
        assert_eq!(counts(r), (2, 0, 0, 0, 2));
        assert_eq!((r.median_to_meet, r.p95_to_meet), (None, None));
        assert_eq!(report.totals()[0].median_to_meet, None);
    }

    #[test]
    fn cq_3_11_totals_are_per_agency_over_all_rules() {
        let mut outcomes: Vec<_> = (1..=10)
            .map(|h| ob("a", "CQ-1.1b", at(1, 0), 5, Some(h)))
            .collect();
        outcomes.extend((11..=20).map(|h| ob("a", "SH-2.5", at(1, 0), 100, Some(h))));
        outcomes.push(ob("a", "SH-2.5", at(1, 0), 100, None));
        outcomes.push(ob("b", "CQ-3.14", at(1, 0), 1, None));
        let report = compile(outcomes, at(1, 0), at(2, 0), at(2, 0));
        let totals = report.totals();
        assert_eq!(totals.len(), 2);
        let a = &totals[0];
        assert_eq!((a.agency.as_str(), a.rule.as_str()), ("a", ALL_RULES));
        assert_eq!(counts(a), (21, 15, 5, 1, 0));
        // Over the 20 met obligations of both rules, not of either row.
        assert_eq!(a.median_to_meet, Some(Duration::hours(10)));
        assert_eq!(a.p95_to_meet, Some(Duration::hours(19)));
        let b = &totals[1];
        assert_eq!((b.agency.as_str(), counts(b)), ("b", (1, 0, 0, 0, 1)));
        assert_eq!(b.median_to_meet, None);
    }

    #[test]
    fn cq_3_11_empty_period_gives_no_rows() {
        let report = compile(
            vec![o("a", at(5, 0), 1, None)],
            at(1, 0),
            at(2, 0),
            at(3, 0),
        );
        assert!(report.rows.is_empty() && report.totals().is_empty());
        assert_eq!(report.to_csv().lines().count(), 1);
        assert!(report.to_html().contains("<svg"));
    }

    #[test]
    fn csv_round_trips_with_quoting() {
        let outcomes = vec![
            o("a,\"b\"", at(1, 0), 24, Some(2)),
            o("c", at(1, 0), 24, None),
            o("c", at(1, 0), 24, Some(1)),
            o("c", at(1, 0), 1, Some(2)),
            ob("d", "line\nbreak", at(1, 0), 1, Some(1)),
        ];
        let report = compile(outcomes, at(1, 0), at(2, 0), at(1, 12));
        let csv = report.to_csv();
        assert!(
            csv.starts_with(
                "agency,rule,count,met_on_time,met_late,still_open,overdue,on_time_rate,median_hours_to_meet,p95_hours_to_meet\n"
            ),
            "{csv}"
        );
        assert!(
            csv.contains("\"a,\"\"b\"\"\",CQ-1.1b,1,1,0,0,0,1.000,2.00,2.00\n"),
            "{csv}"
        );
        assert!(
            csv.contains("d,\"line\nbreak\",1,1,0,0,0,1.000,1.00,1.00\n"),
            "{csv}"
        );

        let records = parse_csv(&csv);
        assert_eq!(records.len(), 1 + report.rows.len());
        assert!(records.iter().all(|r| r.len() == 10));
        for (record, row) in records[1..].iter().zip(&report.rows) {
            assert_eq!(record[0], row.agency);
            assert_eq!(record[1], row.rule);
            assert_eq!(record[2], row.count.to_string());
        }
        assert_eq!(
            records[2],
            [
                "c", "CQ-1.1b", "3", "1", "1", "1", "0", "0.333", "1.00", "2.00"
            ]
        );
    }

    #[test]
    fn csv_leaves_time_to_meet_empty_when_nothing_was_met() {
        let report = compile(
            vec![o("a", at(1, 0), 1, None)],
            at(1, 0),
            at(2, 0),
            at(3, 0),
        );
        assert!(report.to_csv().ends_with("\na,CQ-1.1b,1,0,0,0,1,0.000,,\n"));
    }

    #[test]
    fn table_is_aligned_and_safe_on_a_terminal() {
        let outcomes = vec![
            o("cq-jlz-kss", at(1, 0), 24, Some(2)),
            o("渝北区看守所", at(1, 0), 24, None),
            o("esc\u{1b}[2J", at(1, 0), 24, None),
        ];
        let report = compile(outcomes, at(1, 0), at(2, 0), at(20, 0));
        let table = report.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3 + report.rows.len(), "{table}");
        assert!(
            lines[0]
                .starts_with("refbus compliance report, 2026-10-01 00:00 to 2026-10-02 00:00 UTC")
        );
        assert!(lines[1].starts_with("agency") && lines[1].ends_with("p95 h"));
        assert!(lines[2].starts_with("---") && !lines[2].contains(|c| c != '-' && c != ' '));
        // The last column is right-aligned, so every line has the same width.
        let width = display_width(lines[1]);
        assert!(
            lines[1..].iter().all(|l| display_width(l) == width),
            "{table}"
        );
        assert!(!table.contains('\u{1b}') && table.contains("esc\\u{1b}[2J"));
    }

    #[test]
    fn html_is_self_contained_with_a_chart_and_escapes_all_text() {
        let outcomes = vec![
            o("<script>alert('x')</script>", at(1, 0), 24, None),
            o("a&b \"q\"", at(1, 0), 24, Some(2)),
            o("a&b \"q\"", at(1, 0), 1, Some(2)),
            o("a&b \"q\"", at(1, 0), 1, None),
            o("a&b \"q\"", at(1, 0), 100, None),
        ];
        let report = compile(outcomes, at(1, 0), at(2, 0), at(3, 0));
        let html = report.to_html();
        assert!(html.starts_with("<!doctype html>"));
        assert!(html.contains("<meta charset=\"utf-8\">"));
        assert!(html.contains(
            "<title>refbus compliance report, 2026-10-01 00:00 to 2026-10-02 00:00 UTC</title>"
        ));
        assert!(html.contains("<svg") && html.contains("</svg>"));
        assert!(html.trim_end().ends_with("</html>"));
        // Self-contained: nothing fetched, no addresses at all.
        for banned in [
            "http", "src=", "href=", "url(", "@import", "<script", "<link", "<img",
        ] {
            assert!(!html.contains(banned), "{banned} in {html}");
        }
        // Escaped wherever it appears (chart labels, tooltips, table).
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(html.contains("a&amp;b &quot;q&quot;"));
        assert!(!html.contains("a&b"));
        // One tooltip per non-empty segment: a has one of each, the script agency one overdue.
        for segment in [
            "met on time 1 of 4",
            "met late 1 of 4",
            "still open 1 of 4",
            "overdue 1 of 4",
        ] {
            assert!(
                html.contains(&format!("a&amp;b &quot;q&quot;: {segment} (25.0%)</title>")),
                "{segment}"
            );
        }
        assert!(html.contains(": overdue 1 of 1 (100.0%)</title>"));
        // The legend names every segment.
        for name in [
            "met on time</text>",
            "met late</text>",
            "still open</text>",
            "overdue</text>",
        ] {
            assert!(html.contains(name), "{name}");
        }
        assert_eq!(html.matches("<tr><td>").count(), report.rows.len());
    }

    #[test]
    fn cq_1_3b_and_cq_3_11b_sections_in_every_format() {
        let report = compile(
            vec![o("dz-detention-centre", at(1, 0), 24, Some(2))],
            at(1, 0),
            at(2, 0),
            at(3, 0),
        )
        .with_meetings(
            vec![OutOfOrder {
                detention_centre: "dz-detention-centre".into(),
                rule: "CQ-1.3b".into(),
                served_id: "s".into(),
                served_kind: "interrogation_request".into(),
                served_accepted_at: at(1, 2),
                served_at: at(1, 3),
                overtaken_id: "<e>".into(),
                overtaken_kind: "lawyer_meeting_request".into(),
                overtaken_accepted_at: at(1, 1),
            }],
            vec![CentreRatings {
                detention_centre: "dz-detention-centre".into(),
                by_score: [0, 0, 1, 0, 2],
            }],
        );
        assert_eq!(report.ratings[0].count(), 3);
        assert!((report.ratings[0].mean() - 13.0 / 3.0).abs() < 1e-9);
        assert_eq!(CentreRatings::default().mean(), 0.0);
        let csv = report.to_csv();
        assert!(
            csv.contains("\n# out of order (CQ-1.3b)\ndetention_centre,rule,served,"),
            "{csv}"
        );
        assert!(csv.contains("dz-detention-centre,CQ-1.3b,s,interrogation_request,2026-10-01 02:00,2026-10-01 03:00,<e>,lawyer_meeting_request,2026-10-01 01:00\n"), "{csv}");
        assert!(csv.contains("# ratings (CQ-3.11b)\ndetention_centre,ratings,mean_score,score_1,score_2,score_3,score_4,score_5\ndz-detention-centre,3,4.33,0,0,1,0,2\n"), "{csv}");
        let table = report.to_table();
        assert!(
            table.contains("Served out of order of acceptance (CQ-1.3b)"),
            "{table}"
        );
        assert!(
            table.contains("Meeting ratings per centre (CQ-3.11b)"),
            "{table}"
        );
        let html = report.to_html();
        assert!(
            html.contains("<h2 id=\"out-of-order\">") && html.contains("<td>&lt;e&gt;</td>"),
            "{html}"
        );
        assert!(
            html.contains("<h2 id=\"ratings\">") && html.contains("<td>4.33</td>"),
            "{html}"
        );
        assert!(!html.contains("http"));
        // Without them, no section.
        let plain = compile(Vec::new(), at(1, 0), at(2, 0), at(3, 0));
        assert!(!plain.to_csv().contains('#') && !plain.to_html().contains("<h2"));
    }
}
