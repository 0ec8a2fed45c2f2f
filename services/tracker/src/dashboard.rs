//! The tracker's web dashboard, for supervisors and desks: overdue
//! obligations per agency, one referral's timeline, the monthly compliance
//! chart (CQ-3.11). Read-only, served on the tracker's HTTP port beside
//! `/metrics`.
//!
//! # Who is looking
//! Signing in at `/login` with the agency's bearer token (or, where the
//! port is served over TLS with client certificates, with the certificate:
//! [`PeerCertificate`]) opens a session: a random id kept here, in memory,
//! for [`SESSION_TTL`], mapped to the agency, and given to the browser in
//! the `refbus_session` cookie (HttpOnly, Secure, SameSite=Strict, Path=/).
//! The token itself never goes into a cookie. Signing out (a POST) ends the
//! session; so does a restart of the tracker. A program may instead send
//! `Authorization: Bearer <token>` with each GET.
//!
//! # What it protects against
//! - Cross-site requests: every form POST (sign-in, sign-out) carries a
//!   CSRF token, the session's own (or, for signing in, one bound to a
//!   short-lived `refbus_signin` cookie), compared in constant time; a POST
//!   whose `Origin` (or `Referer`) is another site, or that is marked
//!   `Sec-Fetch-Site: cross-site`, is refused too (403).
//! - Injection: the HTML is rendered with `maud`, which escapes every value
//!   (agency names, ids, rule ids, ledger values, the URL's id); the
//!   compliance chart is the escaped fragment of `refbus_core::report`.
//!   Every response carries a Content-Security-Policy allowing only the
//!   dashboard's own stylesheet (`/dashboard.css`) and SVG: no script at
//!   all, no inline style, no framing (`frame-ancestors 'none'`), forms
//!   only to itself; and `X-Content-Type-Options: nosniff`,
//!   `Referrer-Policy: same-origin` (not `no-referrer`, under which a
//!   browser sends `Origin: null` with the dashboard's own forms), `Cache-Control: no-store`.
//!
//! # What it shows
//! Each page shows only what the gRPC queries would return to that agency:
//! its own obligations, or for a justice bureau those of the agencies of
//! its region; never a payload; and nothing of a misconduct lead the
//! agency is not on the route of (DZ-6, see `query`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use refbus_core::envelope::from_timestamp;
use refbus_core::kind::{hop_code_of, kind_code, obligation_state_text};
use refbus_core::report::ComplianceReport;
use refbus_gateway::auth::{Authenticator, agency_of_certificate};
use refbus_proto::v1::{ListObligationsRequest, Obligation, ObligationFilter, ObligationState};

use crate::query::Queries;

mod tls;
pub use tls::{TlsError, serve_tls, tls_config};

/// The cookie that carries the session id (never a token).
pub const SESSION_COOKIE: &str = "refbus_session";
/// The cookie that binds the sign-in form's CSRF token to the browser.
pub const SIGNIN_COOKIE: &str = "refbus_signin";
/// How long a session lasts after signing in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// How long a sign-in form may be submitted after it was served.
const SIGNIN_TTL_SECONDS: u64 = 600;
/// At most this many sessions are kept; the oldest goes first.
const MAX_SESSIONS: usize = 10_000;

/// The Content-Security-Policy of every response: nothing but the
/// dashboard's own stylesheet, and forms posted to itself.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A client certificate (DER) the connection presented, put in the
/// request's extensions by a server that serves the port over TLS with
/// client certificates; the dashboard signs in as the agency it names.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub Vec<u8>);

/// One signed-in browser.
#[derive(Clone)]
struct Session {
    agency: String,
    /// The token every form POST of this session carries.
    csrf: String,
    expires: Instant,
}

/// The sessions, in memory: lost (everyone signs in again) on restart.
#[derive(Default)]
struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves no half-made session.
        self.by_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new session for `agency`: its id and CSRF token.
    fn start(&self, agency: String) -> Result<(String, Session), PageError> {
        let id = random_token()?;
        let session = Session {
            agency,
            csrf: random_token()?,
            expires: Instant::now() + SESSION_TTL,
        };
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        while sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(oldest) => sessions.remove(&oldest),
                None => break,
            };
        }
        sessions.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    fn get(&self, id: &str) -> Option<Session> {
        let mut sessions = self.lock();
        match sessions.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    fn end(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// 32 random bytes, hexadecimal.
fn random_token() -> Result<String, PageError> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        tracing::error!(error = %e, "no randomness for a dashboard session");
        PageError::Status(tonic::Status::unavailable(
            "the dashboard cannot make a session now",
        ))
    })?;
    Ok(hex::encode(bytes))
}

/// Equal, in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0_u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// What every handler needs.
#[derive(Clone)]
struct Dashboard {
    queries: Queries,
    auth: Arc<Authenticator>,
    sessions: Arc<Sessions>,
}

/// The dashboard's routes: `/`, `/referrals/{id}`, `/report`,
/// `/report.csv`, `/login` (GET the form, POST to sign in), `/logout`
/// (POST), `/dashboard.css`; every response with the security headers.
pub fn router(queries: Queries, auth: Arc<Authenticator>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/referrals/{id}", get(referral))
        .route("/report", get(report))
        .route("/report.csv", get(report_csv))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/dashboard.css", get(stylesheet))
        .with_state(Dashboard {
            queries,
            auth,
            sessions: Arc::default(),
        })
        .layer(axum::middleware::map_response(security_headers))
}

/// The headers of every dashboard response.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Why a page is not shown.
enum PageError {
    /// Not signed in: to the sign-in page.
    SignIn,
    /// A POST without a valid CSRF token, or from another site.
    Forbidden(&'static str),
    /// A query's refusal, shown with its status.
    Status(tonic::Status),
}

impl From<tonic::Status> for PageError {
    fn from(status: tonic::Status) -> Self {
        PageError::Status(status)
    }
}

fn error_page(code: StatusCode, message: &str) -> Response {
    let body = html! {
        h1 { (code.canonical_reason().unwrap_or("Error")) }
        p.error id="error" { (message) }
        p { a href="/" { "Back to the overview" } }
    };
    (code, html_response(page("refbus", None, &body))).into_response()
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn => Redirect::to("/login").into_response(),
            PageError::Forbidden(why) => error_page(StatusCode::FORBIDDEN, why),
            PageError::Status(status) => {
                let code = match status.code() {
                    tonic::Code::NotFound => StatusCode::NOT_FOUND,
                    tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                    tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                    tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                error_page(code, status.message())
            }
        }
    }
}

/// The signed-in agency, and the CSRF token of its session (none when it
/// came with a bearer header or a certificate on this request).
struct Who {
    agency: String,
    csrf: Option<String>,
}

impl Dashboard {
    /// Who the request is signed in as: its session, else its bearer
    /// header, else its client certificate.
    fn caller(
        &self,
        headers: &HeaderMap,
        cert: Option<&PeerCertificate>,
    ) -> Result<Who, PageError> {
        if let Some(session) = cookie(headers, SESSION_COOKIE).and_then(|id| self.sessions.get(&id))
        {
            return Ok(Who {
                agency: session.agency,
                csrf: Some(session.csrf),
            });
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| self.auth.agency_of_token(t));
        bearer
            .or_else(|| cert.and_then(|c| self.agency_of_certificate(c)))
            .map(|agency| Who { agency, csrf: None })
            .ok_or(PageError::SignIn)
    }

    fn agency_of_certificate(&self, cert: &PeerCertificate) -> Option<String> {
        agency_of_certificate(&cert.0)
            .ok()
            .filter(|a| self.queries.directory.get(a).is_some())
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

/// A `Set-Cookie` value with the attributes every dashboard cookie has.
fn set_cookie(name: &str, value: &str, max_age: Option<u64>) -> Option<HeaderValue> {
    let age = max_age
        .map(|s| format!("; Max-Age={s}"))
        .unwrap_or_default();
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{age}"
    ))
    .ok()
}

/// The host a URL (an `Origin` or a `Referer`) names.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
}

/// A POST from another site: by `Sec-Fetch-Site`, or an `Origin` (else a
/// `Referer`) whose host is not this request's `Host`. A request with
/// none of them (not a browser) relies on the CSRF token alone.
fn cross_site(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if text(header::HeaderName::from_static("sec-fetch-site")) == Some("cross-site") {
        return true;
    }
    let Some(from) = text(header::ORIGIN).or_else(|| text(header::REFERER)) else {
        return false;
    };
    host_of(from).is_none_or(|host| Some(host) != text(header::HOST))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1d1d1f}\n\
header{background:#17324d;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;align-items:baseline}\n\
header a{color:#cfe3ff}header .who{margin-left:auto}main{padding:1em 1.5em}\n\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccd;padding:4px 8px;text-align:left}\n\
th{background:#eef2f7}.overdue{color:#b71c1c;font-weight:600}.met{color:#2e7d32}\n\
.count{font-size:1.6em;font-weight:700}.cards{display:flex;flex-wrap:wrap;gap:1em;margin-bottom:1em}\n\
.card{border:1px solid #ccd;border-radius:6px;padding:.6em 1em;min-width:12em}\n\
.card.late{border-color:#b71c1c;background:#fff3f3}.error{color:#b71c1c}\n\
form.login{display:flex;flex-direction:column;gap:.6em;max-width:28em}\n\
form.signout{display:inline}form.signout button{background:none;border:0;padding:0;color:#cfe3ff;text-decoration:underline;cursor:pointer;font:inherit}\n";

/// `/dashboard.css`: the one stylesheet the policy allows.
async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

/// A whole page: header with navigation (and the sign-out form, when the
/// viewer has a session), then `body`.
fn page(title: &str, who: Option<&Who>, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href="/dashboard.css";
            }
            body {
                header {
                    b { "refbus tracker" }
                    @if let Some(who) = who {
                        a href="/" { "Overdue" }
                        a href="/report" { "Compliance" }
                        span.who {
                            "signed in as " b id="agency" { (who.agency) }
                            @if let Some(csrf) = &who.csrf {
                                " · "
                                form.signout method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button id="sign-out" type="submit" { "sign out" }
                                }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn html_response(markup: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(from_timestamp)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// One agency's card on the overview.
struct Card {
    id: String,
    name: String,
    open: usize,
    overdue: usize,
}

/// `/`: for each agency the caller may see, its open and overdue
/// obligations, then every overdue one.
async fn overview(
    State(d): State<Dashboard>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let who = d.caller(&headers, cert.as_deref())?;
    let mut cards = Vec::new();
    let mut overdue_rows: Vec<Obligation> = Vec::new();
    for agency in d.queries.visible_agencies(&who.agency)? {
        let mut card = Card {
            name: d
                .queries
                .directory
                .get(&agency)
                .map_or_else(|| agency.clone(), |a| a.name.clone()),
            id: agency,
            open: 0,
            overdue: 0,
        };
        let mut page_token = String::new();
        loop {
            // As the signed-in agency sees them: nothing of a lead it is
            // not on the route of (DZ-6).
            let listed = d
                .queries
                .obligations_seen_by(
                    &who.agency,
                    ListObligationsRequest {
                        agency: card.id.clone(),
                        filter: ObligationFilter::Unspecified as i32,
                        page_size: 1000,
                        page_token: page_token.clone(),
                        ..ListObligationsRequest::default()
                    },
                )
                .await?;
            for o in listed.obligations {
                if o.state == ObligationState::Overdue as i32 {
                    card.overdue += 1;
                    overdue_rows.push(o);
                } else {
                    card.open += 1;
                }
            }
            if listed.next_page_token.is_empty() {
                break;
            }
            page_token = listed.next_page_token;
        }
        cards.push(card);
    }
    overdue_rows.sort_by(|a, b| {
        (a.due_at.as_ref().map(|t| (t.seconds, t.nanos)), &a.id)
            .cmp(&(b.due_at.as_ref().map(|t| (t.seconds, t.nanos)), &b.id))
    });
    let as_of = d
        .queries
        .clock
        .now()
        .format("%Y-%m-%d %H:%M UTC")
        .to_string();
    let body = html! {
        h1 { "Overdue obligations" }
        p { "As of " (as_of) ". Each agency you may see, with its obligations not yet met." }
        div.cards {
            @for card in &cards {
                div.card.late[card.overdue > 0] data-agency=(card.id) {
                    div { (card.name) }
                    div {
                        span.count.overdue-count { (card.overdue) }
                        " overdue · "
                        span.open-count { (card.open) }
                        " open"
                    }
                    small { (card.id) }
                }
            }
        }
        @if overdue_rows.is_empty() {
            p id="none-overdue" { "No obligation is overdue." }
        } @else {
            table id="overdue" {
                tr { th { "bearer" } th { "rule" } th { "duty" } th { "kind" } th { "due" } th { "referral" } th { "notified" } }
                @for o in &overdue_rows {
                    tr.overdue {
                        td { (o.bearer) }
                        td { (o.rule) }
                        td { (o.duty) }
                        td { (kind_code(o.kind)) }
                        td { (when(o.due_at.as_ref())) }
                        td { a href={ "/referrals/" (o.referral_id) } { (o.referral_id) } }
                        td { (o.notify.join(", ")) }
                    }
                }
            }
        }
    };
    Ok(html_response(page(
        "refbus: overdue obligations",
        Some(&who),
        &body,
    )))
}

/// `/referrals/{id}`: the referral's metadata, timeline and obligations.
async fn referral(
    State(d): State<Dashboard>,
    Path(id): Path<String>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let who = d.caller(&headers, cert.as_deref())?;
    let status = d.queries.referral(&who.agency, &id).await?;
    let body = html! {
        h1 { "Referral " code { (status.id) } }
        table id="referral" {
            tr { th { "kind" } td { (kind_code(status.kind)) } }
            tr { th { "from" } td { (status.sender) } }
            tr { th { "to" } td { (status.recipient) } }
            tr { th { "clock started" } td { (when(status.clock_started_at.as_ref())) } }
            tr { th { "submitted" } td { (when(status.submitted_at.as_ref())) } }
            @if !status.in_reply_to.is_empty() {
                tr {
                    th { "in reply to" }
                    td { a href={ "/referrals/" (status.in_reply_to) } { (status.in_reply_to) } }
                }
            }
        }
        h2 { "Timeline" }
        table id="timeline" {
            tr { th { "at" } th { "hop" } th { "agency" } }
            @for entry in &status.timeline {
                tr.hop {
                    td { (when(entry.at.as_ref())) }
                    td { (hop_code_of(entry.hop)) }
                    td { (entry.agency) }
                }
            }
        }
        h2 { "Obligations" }
        @if status.obligations.is_empty() {
            p { "This message creates no obligation." }
        } @else {
            table id="obligations" {
                tr { th { "rule" } th { "duty" } th { "bearer" } th { "due" } th { "met" } th { "state" } }
                @for o in &status.obligations {
                    @let class = match ObligationState::try_from(o.state) {
                        Ok(ObligationState::Overdue | ObligationState::MetLate) => "overdue",
                        Ok(ObligationState::MetOnTime) => "met",
                        _ => "",
                    };
                    tr {
                        td { (o.rule) }
                        td { (o.duty) }
                        td { (o.bearer) }
                        td { (when(o.due_at.as_ref())) }
                        td { (when(o.met_at.as_ref())) }
                        td class=(class) { (obligation_state_text(o.state)) }
                    }
                }
            }
        }
        p { small { "The dashboard never shows a message's content; a party reads it over the gRPC API." } }
    };
    Ok(html_response(page(
        &format!("refbus: referral {}", status.id),
        Some(&who),
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
) -> Result<(ComplianceReport, DateTime<Utc>), PageError> {
    let (from, to) = month_bounds(month, d.queries.clock.now())?;
    Ok((d.queries.compile_report(asker, from, to).await?, from))
}

/// `/report?month=YYYY-MM`: the monthly compliance chart and table.
async fn report(
    State(d): State<Dashboard>,
    Query(q): Query<MonthQuery>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let who = d.caller(&headers, cert.as_deref())?;
    let (compiled, from) = compliance(&d, &who.agency, q.month.as_deref()).await?;
    let month = |d: Option<NaiveDate>| d.map(|d| d.format("%Y-%m").to_string());
    let this = from.date_naive();
    let prev = month(this.checked_sub_months(chrono::Months::new(1))).unwrap_or_default();
    let next = month(this.checked_add_months(chrono::Months::new(1))).unwrap_or_default();
    let current = this.format("%Y-%m").to_string();
    let body = html! {
        p {
            a href={ "/report?month=" (prev) } { "← " (prev) }
            " · " b { (current) } " · "
            a href={ "/report?month=" (next) } { (next) " →" }
            " · "
            a href={ "/report.csv?month=" (current) } { "CSV" }
        }
        // Escaped where it is made: every text of the fragment goes
        // through `refbus_core::report::html_escape`.
        div id="report" { (PreEscaped(compiled.to_html_fragment())) }
    };
    Ok(html_response(page(
        &format!("refbus: compliance {current}"),
        Some(&who),
        &body,
    )))
}

/// `/report.csv?month=YYYY-MM`: the same report as CSV.
async fn report_csv(
    State(d): State<Dashboard>,
    Query(q): Query<MonthQuery>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let who = d.caller(&headers, cert.as_deref())?;
    let (compiled, from) = compliance(&d, &who.agency, q.month.as_deref()).await?;
    let csv = compiled.to_csv();
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

/// The sign-in form, with a fresh CSRF token bound to the browser by the
/// `refbus_signin` cookie; `certificate` names the agency a client
/// certificate presented, which may sign in without a token.
fn signin_page(status: StatusCode, error: Option<&str>, certificate: Option<&str>) -> Response {
    let csrf = match random_token() {
        Ok(csrf) => csrf,
        Err(e) => return e.into_response(),
    };
    let body = html! {
        h1 { "Sign in" }
        @if let Some(error) = error {
            p.error id="error" { (error) }
        }
        @if let Some(agency) = certificate {
            form.login method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                button id="sign-in-certificate" type="submit" { "Continue as " (agency) " (client certificate)" }
            }
        }
        form.login method="post" action="/login" {
            input type="hidden" name="csrf" value=(csrf);
            label for="token" { "Your agency's bearer token" }
            input id="token" name="token" type="password" autocomplete="current-password" required;
            button id="sign-in" type="submit" { "Sign in" }
        }
    };
    let mut response =
        (status, html_response(page("refbus: sign in", None, &body))).into_response();
    if let Some(value) = set_cookie(SIGNIN_COOKIE, &csrf, Some(SIGNIN_TTL_SECONDS)) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

async fn login_form(
    State(d): State<Dashboard>,
    cert: Option<Extension<PeerCertificate>>,
) -> Response {
    let agency = cert.and_then(|c| d.agency_of_certificate(&c));
    signin_page(StatusCode::OK, None, agency.as_deref())
}

#[derive(serde::Deserialize)]
struct Login {
    #[serde(default)]
    csrf: String,
    /// Absent: sign in with the connection's client certificate.
    token: Option<String>,
}

/// Checks the CSRF token, then the token (or the certificate), and opens
/// a session for the agency it names.
async fn login(
    State(d): State<Dashboard>,
    cert: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    Form(login): Form<Login>,
) -> Result<Response, PageError> {
    let bound = cookie(&headers, SIGNIN_COOKIE).unwrap_or_default();
    if cross_site(&headers) || bound.is_empty() || !same_secret(&bound, &login.csrf) {
        return Err(PageError::Forbidden(
            "This sign-in did not come from this dashboard's own form (CSRF check). Open /login and sign in again.",
        ));
    }
    let certificate = cert.as_deref().and_then(|c| d.agency_of_certificate(c));
    let agency = match login.token.as_deref().map(str::trim) {
        Some(token) if !token.is_empty() => d.auth.agency_of_token(token),
        _ => certificate.clone(),
    };
    let Some(agency) = agency else {
        return Ok(signin_page(
            StatusCode::UNAUTHORIZED,
            Some("That token names no agency (tokens file of this tracker)."),
            certificate.as_deref(),
        ));
    };
    let (id, _) = d.sessions.start(agency)?;
    let mut response = Redirect::to("/").into_response();
    let headers = response.headers_mut();
    headers.extend(
        [
            set_cookie(SESSION_COOKIE, &id, None),
            set_cookie(SIGNIN_COOKIE, "", Some(0)),
        ]
        .into_iter()
        .flatten()
        .map(|v| (header::SET_COOKIE, v)),
    );
    Ok(response)
}

#[derive(serde::Deserialize)]
struct Logout {
    #[serde(default)]
    csrf: String,
}

/// Ends the session whose CSRF token the form carries.
async fn logout(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Form(form): Form<Logout>,
) -> Result<Response, PageError> {
    let id = cookie(&headers, SESSION_COOKIE).unwrap_or_default();
    let session = d.sessions.get(&id).ok_or(PageError::SignIn)?;
    if cross_site(&headers) || !same_secret(&session.csrf, &form.csrf) {
        return Err(PageError::Forbidden(
            "This sign-out did not come from this dashboard's own page (CSRF check).",
        ));
    }
    d.sessions.end(&id);
    let mut response = Redirect::to("/login").into_response();
    if let Some(value) = set_cookie(SESSION_COOKIE, "", Some(0)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
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
            HeaderValue::from_static("a=1; refbus_session=abc; b=2"),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&headers, "c"), None);
    }

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::default();
        let (id, session) = sessions.start("dz-court".into()).map_err(|_| ()).unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(id, session.csrf);
        assert_eq!(
            sessions.get(&id).map(|s| s.agency).as_deref(),
            Some("dz-court")
        );
        sessions.end(&id);
        assert!(sessions.get(&id).is_none());
        let (id, _) = sessions.start("dz-court".into()).map_err(|_| ()).unwrap();
        if let Some(s) = sessions.lock().get_mut(&id) {
            s.expires = Instant::now();
        }
        assert!(sessions.get(&id).is_none(), "expired");
    }

    #[test]
    fn posts_from_another_site_are_cross_site() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let host = ("host", "127.0.0.1:51056");
        assert!(!cross_site(&headers(&[host])));
        assert!(!cross_site(&headers(&[
            host,
            ("origin", "http://127.0.0.1:51056")
        ])));
        assert!(cross_site(&headers(&[
            host,
            ("origin", "https://evil.example")
        ])));
        assert!(cross_site(&headers(&[host, ("origin", "null")])));
        assert!(cross_site(&headers(&[
            host,
            ("referer", "http://evil.example/127.0.0.1:51056")
        ])));
        assert!(cross_site(&headers(&[
            host,
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("a", "ab"));
    }

    #[test]
    fn every_value_is_escaped() {
        let who = Who {
            agency: "<script>alert(1)</script>".into(),
            csrf: Some("\"><script>".into()),
        };
        let body = html! { p { "大足区看守所 & <b>" } };
        let text = page("<title>", Some(&who), &body).into_string();
        assert!(!text.contains("<script>"), "{text}");
        assert!(
            text.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{text}"
        );
        assert!(text.contains("大足区看守所 &amp; &lt;b&gt;"), "{text}");
        assert!(
            !text.contains("<style") && !text.contains("style="),
            "{text}"
        );
    }
}
