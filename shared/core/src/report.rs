//! The joint-meeting compliance report (CQ-3.11): per agency and rule,
//! counts, on-time rates and time to meet, as rows, a terminal table, CSV
//! and a self-contained HTML page with a chart.
//!
//! Definitions:
//! - an obligation is in the report when `from <= clock_started_at < to`;
//! - *met on time*: met (by `as_of`) no later than its deadline; *met late*:
//!   met after it;
//! - *still open*: not met by `as_of` and due after `as_of`; *overdue*: not
//!   met and due at or before `as_of`. So count = the four added up;
//! - *time to meet* = met - clock start, over met obligations; median and
//!   95th percentile by the nearest-rank method (the value at rank
//!   ceil(p/100 * n) of the sorted values).

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{DateTime, Duration, Utc};

/// One obligation as the report sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObligationOutcome {
    /// The agency bearing the obligation.
    pub agency: String,
    /// DOMAIN.md rule id, e.g. "CQ-1.1b".
    pub rule: String,
    pub clock_started_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub met_at: Option<DateTime<Utc>>,
}

/// One agency's figures for one rule (or for all its rules: rule "all").
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ComplianceRow {
    pub agency: String,
    pub rule: String,
    pub count: u64,
    pub met_on_time: u64,
    pub met_late: u64,
    pub still_open: u64,
    pub overdue: u64,
    pub median_to_meet: Option<Duration>,
    pub p95_to_meet: Option<Duration>,
}

/// The report for a period, judged as of a moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComplianceReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
    /// Sorted by agency, then rule.
    pub rows: Vec<ComplianceRow>,
}

/// The value at nearest rank ceil(p/100 * n) of sorted `values`.
#[must_use]
pub fn nearest_rank(sorted: &[Duration], percentile: u32) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (usize::try_from(percentile).unwrap_or(100) * n)
        .div_ceil(100)
        .clamp(1, n);
    sorted.get(rank - 1).copied()
}

fn row(
    agency: &str,
    rule: &str,
    outcomes: &[&ObligationOutcome],
    as_of: DateTime<Utc>,
) -> ComplianceRow {
    let mut r = ComplianceRow {
        agency: agency.to_owned(),
        rule: rule.to_owned(),
        ..ComplianceRow::default()
    };
    let mut times = Vec::new();
    for o in outcomes {
        r.count += 1;
        match o.met_at.filter(|met| *met <= as_of) {
            Some(met) => {
                if met <= o.due_at {
                    r.met_on_time += 1;
                } else {
                    r.met_late += 1;
                }
                times.push(met - o.clock_started_at);
            }
            None if o.due_at > as_of => r.still_open += 1,
            None => r.overdue += 1,
        }
    }
    times.sort_unstable();
    r.median_to_meet = nearest_rank(&times, 50);
    r.p95_to_meet = nearest_rank(&times, 95);
    r
}

/// Builds the report for obligations whose clock started in `[from, to)`,
/// judged as of `as_of`.
pub fn compile(
    outcomes: impl IntoIterator<Item = ObligationOutcome>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    as_of: DateTime<Utc>,
) -> ComplianceReport {
    let mut groups: BTreeMap<(String, String), Vec<ObligationOutcome>> = BTreeMap::new();
    for o in outcomes {
        if o.clock_started_at >= from && o.clock_started_at < to {
            groups
                .entry((o.agency.clone(), o.rule.clone()))
                .or_default()
                .push(o);
        }
    }
    let rows = groups
        .iter()
        .map(|((agency, rule), list)| row(agency, rule, &list.iter().collect::<Vec<_>>(), as_of))
        .collect();
    ComplianceReport {
        from,
        to,
        as_of,
        rows,
    }
}

fn hours(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}", d.num_seconds() as f64 / 3600.0))
        .unwrap_or_default()
}

fn rate(r: &ComplianceRow) -> String {
    if r.count == 0 {
        String::new()
    } else {
        format!("{:.3}", r.met_on_time as f64 / r.count as f64)
    }
}

/// RFC 4180 quoting.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

impl ComplianceReport {
    /// One row per agency over all its rules (rule "all").
    #[must_use]
    pub fn totals(&self) -> Vec<ComplianceRow> {
        let mut by_agency: BTreeMap<&str, ComplianceRow> = BTreeMap::new();
        for r in &self.rows {
            let t = by_agency.entry(&r.agency).or_insert_with(|| ComplianceRow {
                agency: r.agency.clone(),
                rule: "all".into(),
                ..ComplianceRow::default()
            });
            t.count += r.count;
            t.met_on_time += r.met_on_time;
            t.met_late += r.met_late;
            t.still_open += r.still_open;
            t.overdue += r.overdue;
        }
        by_agency.into_values().collect()
    }

    /// The rows as CSV, with a header line.
    #[must_use]
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "agency,rule,count,met_on_time,met_late,still_open,overdue,on_time_rate,median_hours_to_meet,p95_hours_to_meet\n",
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{}",
                csv_field(&r.agency),
                csv_field(&r.rule),
                r.count,
                r.met_on_time,
                r.met_late,
                r.still_open,
                r.overdue,
                rate(r),
                hours(r.median_to_meet),
                hours(r.p95_to_meet)
            );
        }
        out
    }

    /// The rows as an aligned plain-text table.
    #[must_use]
    pub fn to_table(&self) -> String {
        let header = [
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
        let cells: Vec<[String; 10]> = self
            .rows
            .iter()
            .map(|r| {
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
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = format!(
            "Compliance report {} to {} (as of {})\n",
            self.from.to_rfc3339(),
            self.to.to_rfc3339(),
            self.as_of.to_rfc3339()
        );
        let line = |out: &mut String, row: &[String]| {
            let padded: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", padded.join("  ").trim_end());
        };
        line(&mut out, &header.map(str::to_owned));
        line(&mut out, &widths.map(|w| "-".repeat(w)));
        for row in &cells {
            line(&mut out, row);
        }
        out
    }

    /// A self-contained HTML page: the table and a stacked-bar chart per
    /// agency (inline SVG; no scripts, styles or fonts from elsewhere).
    #[must_use]
    pub fn to_html(&self) -> String {
        let period = format!(
            "{} – {}",
            self.from.format("%Y-%m-%d"),
            self.to.format("%Y-%m-%d")
        );
        let mut out = String::new();
        let _ = write!(
            out,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>refbus compliance report {p}</title>\
             <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}</style>\
             </head><body>\n<h1>refbus compliance report {p}</h1>\n<p>Joint-meeting report (CQ-3.11), as of {asof}.</p>\n",
            p = html_escape(&period),
            asof = html_escape(&self.as_of.to_rfc3339())
        );
        let totals = self.totals();
        let segments = [
            ("met on time", "#2e7d32"),
            ("met late", "#f9a825"),
            ("still open", "#1565c0"),
            ("overdue", "#c62828"),
        ];
        let bar_width = 500.0;
        let height = 30 * totals.len() + 50;
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"820\" height=\"{height}\" role=\"img\" aria-label=\"obligations per agency\">"
        );
        for (i, t) in totals.iter().enumerate() {
            let y = 30 * i + 10;
            let _ = write!(
                out,
                "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text>",
                y + 14,
                html_escape(&t.agency)
            );
            let values = [t.met_on_time, t.met_late, t.still_open, t.overdue];
            let mut x = 220.0;
            for ((name, colour), value) in segments.iter().zip(values) {
                if t.count == 0 || value == 0 {
                    continue;
                }
                let w = bar_width * value as f64 / t.count as f64;
                let _ = write!(
                    out,
                    "<rect x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"20\" fill=\"{colour}\"><title>{}: {name} {value} of {}</title></rect>",
                    html_escape(&t.agency),
                    t.count
                );
                x += w;
            }
            out.push('\n');
        }
        let y = 30 * totals.len() + 25;
        for (i, (name, colour)) in segments.iter().enumerate() {
            let x = 220 + i * 130;
            let _ = write!(
                out,
                "<rect x=\"{x}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{name}</text>",
                x + 16,
                y + 11
            );
        }
        out.push_str("\n</svg>\n<table>\n<tr><th>agency</th><th>rule</th><th>count</th><th>met on time</th><th>met late</th><th>still open</th><th>overdue</th><th>on-time rate</th><th>median hours to meet</th><th>p95 hours to meet</th></tr>\n");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&r.agency),
                html_escape(&r.rule),
                r.count,
                r.met_on_time,
                r.met_late,
                r.still_open,
                r.overdue,
                rate(r),
                hours(r.median_to_meet),
                hours(r.p95_to_meet)
            );
        }
        out.push_str("</table>\n</body></html>\n");
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

    fn o(agency: &str, clock: DateTime<Utc>, due_h: i64, met_h: Option<i64>) -> ObligationOutcome {
        ObligationOutcome {
            agency: agency.into(),
            rule: "CQ-1.1b".into(),
            clock_started_at: clock,
            due_at: clock + Duration::hours(due_h),
            met_at: met_h.map(|h| clock + Duration::hours(h)),
        }
    }

    #[test]
    fn cq_3_11_counts_each_category_with_its_boundaries() {
        let (from, to, as_of) = (at(1, 0), at(31, 6), at(31, 12));
        let outcomes = vec![
            o("a", at(1, 0), 24, Some(24)), // on time exactly at the deadline; clock at `from` is in
            o("a", at(2, 0), 24, Some(25)), // late
            o("a", at(31, 0), 24, None),    // due after as_of: still open
            o("a", at(31, 0), 24, Some(13)), // met after as_of: not yet met, so open
            o("a", at(30, 12), 24, None),   // due exactly at as_of: overdue
            o("a", at(31, 6), 24, Some(1)), // clock at `to`: out
        ];
        let report = compile(outcomes, from, to, as_of);
        assert_eq!(report.rows.len(), 1);
        let r = &report.rows[0];
        assert_eq!(
            (r.count, r.met_on_time, r.met_late, r.still_open, r.overdue),
            (5, 1, 1, 2, 1)
        );
        assert_eq!(r.median_to_meet, Some(Duration::hours(24)));
        assert_eq!(r.p95_to_meet, Some(Duration::hours(25)));
    }

    #[test]
    fn cq_3_11_percentiles_are_nearest_rank() {
        let outcomes: Vec<_> = (1..=20).map(|h| o("a", at(1, 0), 100, Some(h))).collect();
        let report = compile(outcomes, at(1, 0), at(2, 0), at(20, 0));
        assert_eq!(report.rows[0].median_to_meet, Some(Duration::hours(10)));
        assert_eq!(report.rows[0].p95_to_meet, Some(Duration::hours(19)));
        let none = compile(
            vec![o("a", at(1, 0), 1, None)],
            at(1, 0),
            at(2, 0),
            at(20, 0),
        );
        assert_eq!(none.rows[0].median_to_meet, None);
    }

    #[test]
    fn csv_table_and_html_render_safely() {
        let outcomes = vec![
            o("a,\"b\"", at(1, 0), 24, Some(2)),
            o("<script>", at(1, 0), 24, None),
        ];
        let report = compile(outcomes, at(1, 0), at(2, 0), at(20, 0));
        let csv = report.to_csv();
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.starts_with("agency,rule,count,"));
        assert!(
            csv.contains("\"a,\"\"b\"\"\",CQ-1.1b,1,1,0,0,0,1.000,2.00,2.00"),
            "{csv}"
        );
        let html = report.to_html();
        assert!(html.starts_with("<!doctype html>") && html.contains("<svg"));
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"));
        assert!(!html.contains("src=") && !html.contains("href="));
        assert!(report.to_table().lines().count() >= 4);
        assert_eq!(report.totals().len(), 2);
    }
}
