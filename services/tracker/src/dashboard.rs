//! The tracker's web dashboard, for supervisors and desks: overdue
//! obligations per agency, one referral's timeline, the monthly compliance
//! chart (CQ-3.11). Read-only, served on the tracker's HTTP port beside
//! `/metrics`.
//!
//! Authenticated like the gRPC API: the caller is the agency whose bearer
//! token comes in an `Authorization: Bearer` header, or in the
//! `refbus_token` cookie that signing in at `/login` sets (HttpOnly,
//! SameSite=Strict). Each page shows only what the gRPC queries would
//! return to that agency: its own obligations, or for a justice bureau
//! those of the agencies of its region; never a payload (a bureau sees
//! metadata only, and the dashboard shows no payload to anyone).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use refbus_core::envelope::{from_timestamp, timestamp};
use refbus_core::kind::{hop_code_of, kind_code, obligation_state_text};
use refbus_core::report::html_escape;
use refbus_core::{KindExt, MessageKind};
use refbus_gateway::auth::Authenticator;
use refbus_proto::v1::{
    ComplianceReportRequest, ListObligationsRequest, Obligation, ObligationFilter, ObligationState,
    ReportFormat,
};

use crate::query::Queries;

/// The cookie that carries the signed-in agency's token.
pub const TOKEN_COOKIE: &str = "refbus_token";

/// What every handler needs.
#[derive(Clone)]
struct Dashboard {
    queries: Queries,
    auth: Arc<Authenticator>,
}

/// The dashboard's routes: `/`, `/referrals/{id}`, `/report`,
/// `/report.csv`, `/login`, `/logout`.
pub fn router(queries: Queries, auth: Arc<Authenticator>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/referrals/{id}", get(referral))
        .route("/report", get(report))
        .route("/report.csv", get(report_csv))
        .route("/login", get(login_form).post(login))
        .route("/logout", get(logout))
        .with_state(Dashboard { queries, auth })
}

/// Why a page is not shown.
enum PageError {
    /// Not signed in: to the sign-in page.
    SignIn,
    /// A query's refusal, shown with its status.
    Status(tonic::Status),
}

impl From<tonic::Status> for PageError {
    fn from(status: tonic::Status) -> Self {
        PageError::Status(status)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn => Redirect::to("/login").into_response(),
            PageError::Status(status) => {
                let code = match status.code() {
                    tonic::Code::NotFound => StatusCode::NOT_FOUND,
                    tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                    tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                    tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                let body = format!(
                    "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/\">Back to the overview</a></p>",
                    code.canonical_reason().unwrap_or("Error"),
                    html_escape(status.message())
                );
                (code, page("refbus", None, &body)).into_response()
            }
        }
    }
}

impl Dashboard {
    /// The agency the request is signed in as.
    fn caller(&self, headers: &HeaderMap) -> Result<String, PageError> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let token = bearer
            .map(str::to_owned)
            .or_else(|| cookie(headers, TOKEN_COOKIE));
        token
            .and_then(|t| self.auth.agency_of_token(&t))
            .ok_or(PageError::SignIn)
    }
}

/// The value of cookie `name`, if sent.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1d1d1f}\
header{background:#17324d;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;align-items:baseline}\
header a{color:#cfe3ff}header .who{margin-left:auto}main{padding:1em 1.5em}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccd;padding:4px 8px;text-align:left}\
th{background:#eef2f7}.overdue{color:#b71c1c;font-weight:600}.met{color:#2e7d32}\
.count{font-size:1.6em;font-weight:700}.cards{display:flex;flex-wrap:wrap;gap:1em;margin-bottom:1em}\
.card{border:1px solid #ccd;border-radius:6px;padding:.6em 1em;min-width:12em}\
.card.late{border-color:#b71c1c;background:#fff3f3}.error{color:#b71c1c}\
form.login{display:flex;flex-direction:column;gap:.6em;max-width:28em}";

/// A whole page: header with navigation, then `body`.
fn page(title: &str, agency: Option<&str>, body: &str) -> String {
    let nav = match agency {
        Some(agency) => format!(
            "<a href=\"/\">Overdue</a><a href=\"/report\">Compliance</a>\
             <span class=\"who\">signed in as <b id=\"agency\">{}</b> · <a href=\"/logout\">sign out</a></span>",
            html_escape(agency)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <header><b>refbus tracker</b>{nav}</header>\n<main>\n{body}</main>\n</body>\n</html>\n",
        html_escape(title)
    )
}

fn html(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(from_timestamp)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// `/`: for each agency the caller may see, its open and overdue
/// obligations, then every overdue one.
async fn overview(State(d): State<Dashboard>, headers: HeaderMap) -> Result<Response, PageError> {
    let asker = d.caller(&headers)?;
    let lead = MessageKind::MisconductLead.code();
    let mut cards = String::new();
    let mut overdue_rows: Vec<Obligation> = Vec::new();
    for agency in d.queries.visible_agencies(&asker)? {
        let mut open = 0_usize;
        let mut overdue = 0_usize;
        let mut page_token = String::new();
        loop {
            let listed = d
                .queries
                .obligations(ListObligationsRequest {
                    agency: agency.clone(),
                    filter: ObligationFilter::Unspecified as i32,
                    page_size: 1000,
                    page_token: page_token.clone(),
                    ..ListObligationsRequest::default()
                })
                .await?;
            for o in listed.obligations {
                // A lead is seen only on its route (DZ-6), not by a supervisor.
                if agency != asker && kind_code(o.kind) == lead {
                    continue;
                }
                if o.state == ObligationState::Overdue as i32 {
                    overdue += 1;
                    overdue_rows.push(o);
                } else {
                    open += 1;
                }
            }
            if listed.next_page_token.is_empty() {
                break;
            }
            page_token = listed.next_page_token;
        }
        let name = d
            .queries
            .directory
            .get(&agency)
            .map_or(agency.as_str(), |a| a.name.as_str());
        let _ = write!(
            cards,
            "<div class=\"card{}\" data-agency=\"{id}\"><div>{}</div><div><span class=\"count overdue-count\">{overdue}</span> overdue · {open} open</div><small>{id}</small></div>",
            if overdue > 0 { " late" } else { "" },
            html_escape(name),
            id = html_escape(&agency),
        );
    }
    overdue_rows.sort_by(|a, b| {
        (a.due_at.as_ref().map(|t| (t.seconds, t.nanos)), &a.id)
            .cmp(&(b.due_at.as_ref().map(|t| (t.seconds, t.nanos)), &b.id))
    });
    let mut body = format!(
        "<h1>Overdue obligations</h1>\n<p>As of {}. Each agency you may see, with its obligations not yet met.</p>\n<div class=\"cards\">{cards}</div>\n",
        d.queries.clock.now().format("%Y-%m-%d %H:%M UTC")
    );
    if overdue_rows.is_empty() {
        body.push_str("<p id=\"none-overdue\">No obligation is overdue.</p>\n");
    } else {
        body.push_str(
            "<table id=\"overdue\">\n<tr><th>bearer</th><th>rule</th><th>duty</th><th>kind</th><th>due</th><th>referral</th><th>notified</th></tr>\n",
        );
        for o in &overdue_rows {
            let _ = writeln!(
                body,
                "<tr class=\"overdue\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/referrals/{id}\">{id}</a></td><td>{}</td></tr>",
                html_escape(&o.bearer),
                html_escape(&o.rule),
                html_escape(&o.duty),
                kind_code(o.kind),
                when(o.due_at.as_ref()),
                html_escape(&o.notify.join(", ")),
                id = html_escape(&o.referral_id),
            );
        }
        body.push_str("</table>\n");
    }
    Ok(html(page(
        "refbus: overdue obligations",
        Some(&asker),
        &body,
    )))
}

/// `/referrals/{id}`: the referral's metadata, timeline and obligations.
async fn referral(
    State(d): State<Dashboard>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let asker = d.caller(&headers)?;
    let status = d.queries.referral(&asker, &id).await?;
    let mut body = format!(
        "<h1>Referral <code>{}</code></h1>\n<table id=\"referral\">\n\
         <tr><th>kind</th><td>{}</td></tr><tr><th>from</th><td>{}</td></tr><tr><th>to</th><td>{}</td></tr>\
         <tr><th>clock started</th><td>{}</td></tr><tr><th>submitted</th><td>{}</td></tr>{}\n</table>\n\
         <h2>Timeline</h2>\n<table id=\"timeline\">\n<tr><th>at</th><th>hop</th><th>agency</th></tr>\n",
        html_escape(&status.id),
        kind_code(status.kind),
        html_escape(&status.sender),
        html_escape(&status.recipient),
        when(status.clock_started_at.as_ref()),
        when(status.submitted_at.as_ref()),
        if status.in_reply_to.is_empty() {
            String::new()
        } else {
            format!(
                "<tr><th>in reply to</th><td><a href=\"/referrals/{0}\">{0}</a></td></tr>",
                html_escape(&status.in_reply_to)
            )
        },
    );
    for entry in &status.timeline {
        let _ = writeln!(
            body,
            "<tr class=\"hop\"><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(entry.at.as_ref()),
            hop_code_of(entry.hop),
            html_escape(&entry.agency)
        );
    }
    body.push_str("</table>\n<h2>Obligations</h2>\n");
    if status.obligations.is_empty() {
        body.push_str("<p>This message creates no obligation.</p>\n");
    } else {
        body.push_str(
            "<table id=\"obligations\">\n<tr><th>rule</th><th>duty</th><th>bearer</th><th>due</th><th>met</th><th>state</th></tr>\n",
        );
        for o in &status.obligations {
            let state = obligation_state_text(o.state);
            let class = match ObligationState::try_from(o.state) {
                Ok(ObligationState::Overdue | ObligationState::MetLate) => "overdue",
                Ok(ObligationState::MetOnTime) => "met",
                _ => "",
            };
            let _ = writeln!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{state}</td></tr>",
                html_escape(&o.rule),
                html_escape(&o.duty),
                html_escape(&o.bearer),
                when(o.due_at.as_ref()),
                when(o.met_at.as_ref()),
            );
        }
        body.push_str("</table>\n");
    }
    body.push_str(
        "<p><small>The dashboard never shows a message's content; a party reads it over the gRPC API.</small></p>\n",
    );
    Ok(html(page(
        &format!("refbus: referral {id}"),
        Some(&asker),
        &body,
    )))
}

/// `?month=YYYY-MM`.
#[derive(serde::Deserialize)]
struct MonthQuery {
    month: Option<String>,
}

/// The month asked for (default: the tracker clock's current month), as
/// its first instant and the first instant of the next month.
fn month_bounds(
    month: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), PageError> {
    let first = match month {
        None | Some("") => NaiveDate::from_ymd_opt(now.year(), now.month(), 1),
        Some(m) => NaiveDate::parse_from_str(&format!("{m}-01"), "%Y-%m-%d").ok(),
    }
    .ok_or_else(|| {
        PageError::Status(tonic::Status::invalid_argument(
            "month: expected YYYY-MM, e.g. 2026-10",
        ))
    })?;
    let next = first
        .checked_add_months(chrono::Months::new(1))
        .ok_or_else(|| PageError::Status(tonic::Status::invalid_argument("month: out of range")))?;
    let start = |d: NaiveDate| Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN));
    Ok((start(first), start(next)))
}

async fn compliance(
    d: &Dashboard,
    asker: &str,
    month: Option<&str>,
    format: ReportFormat,
) -> Result<(String, DateTime<Utc>), PageError> {
    let (from, to) = month_bounds(month, d.queries.clock.now())?;
    let report = d
        .queries
        .report(ComplianceReportRequest {
            agency: asker.to_owned(),
            from: Some(timestamp(from)),
            to: Some(timestamp(to)),
            format: format as i32,
        })
        .await?;
    Ok((report.rendered, from))
}

/// `/report?month=YYYY-MM`: the monthly compliance chart and table.
async fn report(
    State(d): State<Dashboard>,
    Query(q): Query<MonthQuery>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let asker = d.caller(&headers)?;
    let (fragment, from) = compliance(&d, &asker, q.month.as_deref(), ReportFormat::Html).await?;
    let month = |d: Option<NaiveDate>| d.map(|d| d.format("%Y-%m").to_string());
    let this = from.date_naive();
    let prev = month(this.checked_sub_months(chrono::Months::new(1))).unwrap_or_default();
    let next = month(this.checked_add_months(chrono::Months::new(1))).unwrap_or_default();
    let current = this.format("%Y-%m");
    let body = format!(
        "<p><a href=\"/report?month={prev}\">&larr; {prev}</a> · <b>{current}</b> · <a href=\"/report?month={next}\">{next} &rarr;</a> · <a href=\"/report.csv?month={current}\">CSV</a></p>\n<div id=\"report\">{fragment}</div>\n"
    );
    Ok(html(page(
        &format!("refbus: compliance {current}"),
        Some(&asker),
        &body,
    )))
}

/// `/report.csv?month=YYYY-MM`: the same report as CSV.
async fn report_csv(
    State(d): State<Dashboard>,
    Query(q): Query<MonthQuery>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let asker = d.caller(&headers)?;
    let (csv, from) = compliance(&d, &asker, q.month.as_deref(), ReportFormat::Csv).await?;
    let disposition = format!(
        "attachment; filename=\"refbus-compliance-{}.csv\"",
        from.format("%Y-%m")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        csv,
    )
        .into_response())
}

const LOGIN_FORM: &str = "<h1>Sign in</h1>\n<form class=\"login\" method=\"post\" action=\"/login\">\n\
<label for=\"token\">Your agency's bearer token</label>\n\
<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\n\
<button id=\"sign-in\" type=\"submit\">Sign in</button>\n</form>\n";

async fn login_form() -> Response {
    html(page("refbus: sign in", None, LOGIN_FORM))
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// Checks the token and, if it names an agency, keeps it in a cookie.
async fn login(State(d): State<Dashboard>, Form(login): Form<Login>) -> Response {
    let token = login.token.trim();
    let valid = !token.contains([';', ',', ' ', '"']) && d.auth.agency_of_token(token).is_some();
    if !valid {
        let body = format!(
            "<p class=\"error\" id=\"error\">That token names no agency (tokens file of this tracker).</p>\n{LOGIN_FORM}"
        );
        return (
            StatusCode::UNAUTHORIZED,
            html(page("refbus: sign in", None, &body)),
        )
            .into_response();
    }
    let cookie = format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn logout() -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("refbus_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_calendar_months() {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap();
        let (from, to) = month_bounds(None, now).map_err(|_| ()).unwrap();
        assert_eq!(from, Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
        assert_eq!(to, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        let (from, to) = month_bounds(Some("2026-12"), now).map_err(|_| ()).unwrap();
        assert_eq!(from, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(to, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        assert!(month_bounds(Some("2026-13"), now).is_err());
        assert!(month_bounds(Some("October"), now).is_err());
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; refbus_token=dev-x; b=2"),
        );
        assert_eq!(cookie(&headers, TOKEN_COOKIE).as_deref(), Some("dev-x"));
        assert_eq!(cookie(&headers, "c"), None);
    }
}
