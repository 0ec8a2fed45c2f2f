//! Issue 7: the tracker's web dashboard, end to end in headless Chromium
//! (Debian's `chromium`, driven through `chromedriver` by fantoccini)
//! against a bus seeded with requests met on time, met late, still open
//! and overdue: signing in with a bearer token, the overdue obligations
//! per agency, one referral's timeline, the monthly compliance chart, and
//! a screenshot of the chart whose colours the test counts.
//!
//! Issue 16: the dashboard secure outside a laptop: an opaque session in
//! the cookie (never the token), CSRF tokens on every POST, a content
//! security policy on every page, every value escaped.

use std::time::Duration;

use chrono::{Datelike, Utc};
use fantoccini::{ClientBuilder, Locator};
use refbus_tests::fixtures::{CENTRE, DESK, legal_help_at, submit};
use refbus_tests::tracker::{Db, TestTracker, bearer_dashboard, drop_ledger, ledger_settings};
use refbus_tests::up::{Up, eventually, http_get};
use refbus_tests::{as_agency, take_and_acknowledge};
use refbus_tracker::Clock;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Types `token` into the sign-in form and submits it.
async fn sign_in(browser: &fantoccini::Client, token: &str) {
    let field = browser.find(Locator::Id("token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    browser
        .find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Pixels of `colour` (within a small tolerance) in a PNG.
fn pixels_of(png_bytes: &[u8], colour: [u8; 3]) -> usize {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buffer).unwrap();
    let channels = info.color_type.samples();
    buffer[..info.buffer_size()]
        .chunks(channels)
        .filter(|p| p.len() >= 3 && p[..3].iter().zip(colour).all(|(a, b)| a.abs_diff(b) <= 8))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_overdue_timeline_and_monthly_chart_in_chromium() {
    assert!(
        std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists(),
        "Debian's chromium and chromium-driver are needed (`.ci/run` installs them)"
    );
    let up = Up::start().await;
    let mut centre = up.gateway("detention-centre");
    let mut desk = up.gateway("legal-aid");
    let now = Utc::now();
    let hours_ago = |h: i64| now - chrono::Duration::hours(h);

    // Taken by the desk: asked 1 h ago (met on time), 25 h ago (met late).
    let mut ids = Vec::new();
    for (key, asked) in [("d-on-time", hours_ago(1)), ("d-late", hours_ago(25))] {
        let receipt = centre
            .submit(as_agency(CENTRE, submit(legal_help_at(key, asked))))
            .await
            .unwrap()
            .into_inner();
        ids.push(receipt.id);
    }
    take_and_acknowledge(&mut desk, DESK, 2).await;
    // Not taken: asked 30 h ago (overdue), and just now (open).
    let overdue_id = centre
        .submit(as_agency(
            CENTRE,
            submit(legal_help_at("d-overdue", hours_ago(30))),
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    let open_id = centre
        .submit(as_agency(CENTRE, submit(legal_help_at("d-open", now))))
        .await
        .unwrap()
        .into_inner()
        .id;
    // The tracker has recorded all four, both acknowledgements and the
    // overdue notices about the unanswered one (to the centre and the bureau).
    // `localhost`: a browser keeps the session's Secure cookie over plain
    // HTTP only there.
    let dashboard = up.url("dashboard").replace("127.0.0.1", "localhost");
    let page = |id: &str| {
        http_get(
            &format!("{dashboard}/referrals/{id}"),
            Some("dev-dz-justice-bureau"),
        )
    };
    eventually("the tracker to record the seeded requests", || async {
        let taken = ids
            .iter()
            .all(|id| page(id).1.contains("<td>acknowledged</td>"));
        let notified = page(&overdue_id)
            .1
            .matches("<td>overdue_notified</td>")
            .count()
            == 2;
        let open = page(&open_id).0 == 200;
        (taken && notified && open).then_some(())
    })
    .await;

    // chromedriver on a free port, Chromium headless with the flags this
    // machine's closed network needs.
    let port = refbus_tests::free_port();
    let mut driver = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let profile = up.data_dir.join("chromium-profile");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let browser = eventually("chromedriver to start a session", || {
        let capabilities = capabilities.clone();
        async move {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
                .ok()
        }
    })
    .await;

    // Not signed in: the sign-in page. A wrong token is refused.
    browser.goto(&format!("{dashboard}/")).await.unwrap();
    assert_eq!(browser.current_url().await.unwrap().path(), "/login");
    sign_in(&browser, "dev-nobody").await;
    let error = browser
        .wait()
        .for_element(Locator::Id("error"))
        .await
        .unwrap();
    let text = error.text().await.unwrap();
    assert!(text.contains("names no agency"), "{text}");
    // The Dazu justice bureau signs in: it supervises the centre's region.
    sign_in(&browser, "dev-dz-justice-bureau").await;
    let who = browser
        .wait()
        .for_element(Locator::Id("agency"))
        .await
        .unwrap();
    assert_eq!(who.text().await.unwrap(), "dz-justice-bureau");

    // Overdue per agency: the centre has 1 overdue, the desk none.
    let count = |agency: &str| format!("div.card[data-agency=\"{agency}\"] .overdue-count");
    let centre_count = browser.find(Locator::Css(&count(CENTRE))).await.unwrap();
    assert_eq!(centre_count.text().await.unwrap(), "1");
    let desk_count = browser.find(Locator::Css(&count(DESK))).await.unwrap();
    assert_eq!(desk_count.text().await.unwrap(), "0");
    let overdue_rows = browser
        .find_all(Locator::Css("table#overdue tr.overdue"))
        .await
        .unwrap();
    assert_eq!(overdue_rows.len(), 1);
    let row = overdue_rows[0].text().await.unwrap();
    assert!(row.contains("CQ-1.1b") && row.contains(CENTRE), "{row}");
    let overview_png = browser.screenshot().await.unwrap();

    // The referral's timeline, by its link.
    browser
        .find(Locator::LinkText(&overdue_id))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let timeline = browser
        .wait()
        .for_element(Locator::Id("timeline"))
        .await
        .unwrap();
    assert_eq!(
        browser.current_url().await.unwrap().path(),
        format!("/referrals/{overdue_id}")
    );
    // Submitted, then the overdue notices (to the centre and its
    // supervising bureau); never delivered nor acknowledged.
    let mut hops = Vec::new();
    for row in timeline.find_all(Locator::Css("tr.hop")).await.unwrap() {
        hops.push(row.text().await.unwrap());
    }
    assert!(
        hops[0].contains("submitted") && hops[0].contains(CENTRE),
        "{hops:?}"
    );
    assert_eq!(
        hops.iter()
            .filter(|h| h.contains("overdue_notified"))
            .count(),
        2,
        "{hops:?}"
    );
    assert!(
        !hops
            .iter()
            .any(|h| h.contains("delivered") || h.contains("acknowledged")),
        "nobody took it: {hops:?}"
    );
    let obligations = browser.find(Locator::Id("obligations")).await.unwrap();
    let text = obligations.text().await.unwrap();
    assert!(
        text.contains("CQ-1.1b") && text.contains("overdue"),
        "{text}"
    );
    // No payload on the page: the detainee's data stays off the dashboard.
    let source = browser.source().await.unwrap();
    assert!(!source.contains("李四") && !source.contains("500225199001011234"));

    // The monthly compliance chart, for the month the overdue request's clock started.
    let month = hours_ago(30);
    let month_text = format!("{:04}-{:02}", month.year(), month.month());
    browser
        .goto(&format!("{dashboard}/report?month={month_text}"))
        .await
        .unwrap();
    let report = browser
        .wait()
        .for_element(Locator::Css("#report svg"))
        .await
        .unwrap();
    let label = report.attr("aria-label").await.unwrap();
    assert_eq!(label.as_deref(), Some("obligations per agency by outcome"));
    let table = browser.find(Locator::Css("#report table")).await.unwrap();
    assert!(table.text().await.unwrap().contains(CENTRE));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let chart_png = browser.screenshot().await.unwrap();
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(shots.join("dashboard-overview.png"), &overview_png).unwrap();
    std::fs::write(shots.join("dashboard-report.png"), &chart_png).unwrap();

    // The chart's colours are on screen: overdue red always; met on time
    // green, met late amber and still open blue when all four clocks
    // started in the same month (every day but the first hours of a month).
    let red = pixels_of(&chart_png, [0xc6, 0x28, 0x28]);
    assert!(red > 500, "overdue red: {red} pixels");
    if hours_ago(30).month() == now.month() {
        for (name, colour) in [
            ("met on time", [0x2e, 0x7d, 0x32]),
            ("met late", [0xf9, 0xa8, 0x25]),
            ("still open", [0x15, 0x65, 0xc0]),
        ] {
            let n = pixels_of(&chart_png, colour);
            assert!(n > 500, "{name}: {n} pixels");
        }
    }
    // The overview marks the late agency's card.
    let late_card = pixels_of(&overview_png, [0xff, 0xf3, 0xf3]);
    assert!(
        late_card > 1000,
        "the late card's background: {late_card} pixels"
    );

    // No cookie the browser holds carries the token (WebDriver does not
    // list a Secure cookie on an http page; the attributes are checked in
    // the_dashboard_session_is_opaque_and_its_forms_are_csrf_protected).
    for cookie in browser.get_all_cookies().await.unwrap() {
        assert!(!cookie.value().contains("dev-"), "{cookie:?}");
    }
    // Signing out (a POST with the session's CSRF token) ends the session.
    browser.goto(&format!("{dashboard}/")).await.unwrap();
    browser
        .find(Locator::Id("sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait()
        .for_element(Locator::Id("sign-in"))
        .await
        .unwrap();
    browser.goto(&format!("{dashboard}/")).await.unwrap();
    assert_eq!(browser.current_url().await.unwrap().path(), "/login");

    browser.close().await.unwrap();
    let _ = driver.start_kill();
    let _ = driver.wait().await;
    up.stop().await;
}

/// The dashboard shows each agency only what the gRPC queries would: a
/// court cannot read a referral it is not party to; no token, no page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_refuses_what_the_api_refuses() {
    let up = Up::start().await;
    let mut centre = up.gateway("detention-centre");
    let id = centre
        .submit(as_agency(
            CENTRE,
            submit(legal_help_at("d-refuse", Utc::now())),
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    let dashboard = up.url("dashboard").to_owned();
    let page = format!("{dashboard}/referrals/{id}");
    eventually("the referral in the ledger", || async {
        let (status, _) = http_get(&page, Some("dev-dz-detention-centre"));
        (status == 200).then_some(())
    })
    .await;
    let (status, body) = http_get(&page, Some("dev-dz-court"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("is not a party"), "{body}");
    let (status, body) = http_get(&page, None);
    assert_eq!(status, 200, "redirected to the sign-in page");
    assert!(body.contains("id=\"sign-in\""), "{body}");
    let (status, _) = http_get(
        &format!("{dashboard}/report?month=October"),
        Some("dev-dz-justice-bureau"),
    );
    assert_eq!(status, 400);
    up.stop().await;
}

/// A plain HTTP client that follows no redirect and keeps no cookie.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .build()
        .into()
}

/// Status, `Set-Cookie` headers and body of a response.
fn parts(mut response: ureq::http::Response<ureq::Body>) -> (u16, Vec<String>, String) {
    let cookies = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let body = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), cookies, body)
}

/// The `name=value` pair of cookie `name` among `Set-Cookie` headers, and
/// its whole header.
fn set_cookie<'a>(cookies: &'a [String], name: &str) -> (String, &'a str) {
    let header = cookies
        .iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie in {cookies:?}"));
    (header.split(';').next().unwrap().to_owned(), header)
}

/// The value of the hidden `csrf` field of a page.
fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no csrf field in {page}"))
        .to_owned()
}

/// Issue 16: the session cookie holds an opaque id (never the token) with
/// HttpOnly, Secure, SameSite=Strict and Path=/; signing in and out
/// without the form's CSRF token, or from another site, is refused (403)
/// and changes nothing; every page carries the security policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_session_is_opaque_and_its_forms_are_csrf_protected() {
    let bus = refbus_tests::TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    let dashboard = bearer_dashboard(&bus, &tracker).await;
    let http = agent();
    let token = "dev-dz-detention-centre";

    // The sign-in form binds its CSRF token to a cookie of its own.
    let (status, cookies, form) = parts(http.get(&format!("{dashboard}/login")).call().unwrap());
    assert_eq!(status, 200);
    let (signin, header) = set_cookie(&cookies, "refbus_signin");
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(header.contains(attribute), "{attribute}: {header}");
    }
    let csrf = csrf_of(&form);
    assert_eq!(signin, format!("refbus_signin={csrf}"));

    let sign_in = |cookie: Option<&str>, origin: Option<&str>, fields: &[(&str, &str)]| {
        let mut request = http.post(&format!("{dashboard}/login"));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        parts(request.send_form(fields.iter().copied()).unwrap())
    };
    // Without the token, with another's, without the cookie, from another
    // site: 403, and no session.
    let own_origin = dashboard.as_str();
    for (cookie, origin, fields) in [
        (Some(signin.as_str()), None, vec![("token", token)]),
        (
            Some(signin.as_str()),
            None,
            vec![("token", token), ("csrf", "0000")],
        ),
        (None, None, vec![("token", token), ("csrf", csrf.as_str())]),
        (
            Some(signin.as_str()),
            Some("http://evil.example"),
            vec![("token", token), ("csrf", csrf.as_str())],
        ),
    ] {
        let (status, cookies, body) = sign_in(cookie, origin, &fields);
        assert_eq!(status, 403, "{cookie:?} {origin:?} {fields:?}: {body}");
        assert!(body.contains("CSRF"), "{body}");
        assert!(
            !cookies.iter().any(|c| c.starts_with("refbus_session=")),
            "{cookies:?}"
        );
    }

    // With it: a session whose cookie holds no token.
    let (status, cookies, _) = sign_in(
        Some(&signin),
        Some(own_origin),
        &[("token", token), ("csrf", &csrf)],
    );
    assert_eq!(status, 303);
    let (session, header) = set_cookie(&cookies, "refbus_session");
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(header.contains(attribute), "{attribute}: {header}");
    }
    assert!(
        !cookies
            .iter()
            .any(|c| c.contains(token) || c.contains("dev-")),
        "no token in any cookie: {cookies:?}"
    );
    let value = session.trim_start_matches("refbus_session=");
    assert_eq!(value.len(), 64, "{value}");
    assert!(value.chars().all(|c| c.is_ascii_hexdigit()), "{value}");

    let overview = || {
        parts(
            http.get(&format!("{dashboard}/"))
                .header("cookie", &session)
                .call()
                .unwrap(),
        )
    };
    let (status, _, page) = overview();
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("<b id=\"agency\">dz-detention-centre</b>"),
        "{page}"
    );
    let session_csrf = csrf_of(&page);
    assert_ne!(session_csrf, csrf);

    // Every page and error carries the policy and the other headers.
    for path in [
        "/",
        "/login",
        "/report",
        "/report.csv",
        "/dashboard.css",
        "/referrals/x",
    ] {
        let response = http
            .get(&format!("{dashboard}{path}"))
            .header("cookie", &session)
            .call()
            .unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let csp = header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "style-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {directive} in {csp:?}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("script-src"),
            "{csp}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "same-origin", "{path}");
    }
    // No inline style or script is needed: the policy breaks nothing.
    assert!(!page.contains("<style") && !page.contains("style=") && !page.contains("<script"));

    // Signing out without the session's CSRF token: 403, still signed in.
    let sign_out = |fields: &[(&str, &str)]| {
        parts(
            http.post(&format!("{dashboard}/logout"))
                .header("cookie", &session)
                .send_form(fields.iter().copied())
                .unwrap(),
        )
    };
    let (status, _, body) = sign_out(&[]);
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = sign_out(&[("csrf", &csrf)]);
    assert_eq!(
        status, 403,
        "the sign-in token is not the session's: {body}"
    );
    assert_eq!(overview().0, 200);
    // A GET cannot sign out.
    let (status, _, _) = parts(
        http.get(&format!("{dashboard}/logout"))
            .header("cookie", &session)
            .call()
            .unwrap(),
    );
    assert_eq!(status, 405);
    assert_eq!(overview().0, 200);
    // With it: the session is over, its cookie worth nothing.
    let (status, cookies, _) = sign_out(&[("csrf", &session_csrf)]);
    assert_eq!(status, 303);
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with("refbus_session=;") && c.contains("Max-Age=0")),
        "{cookies:?}"
    );
    let (status, _, _) = overview();
    assert_eq!(status, 303, "to the sign-in page");

    let (settings, _) = tracker.stop().await;
    bus.stop().await;
    drop_ledger(&settings).await;
}

/// Issue 16: what the dashboard shows is escaped: a crafted id in the URL,
/// a ledger value (an agency written into a hop behind the tracker's
/// back) and the agencies' Chinese names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_escapes_every_value() {
    let bus = refbus_tests::TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    let dashboard = bearer_dashboard(&bus, &tracker).await;
    let id = bus
        .gateway_as("detention-centre", CENTRE)
        .await
        .submit(submit(legal_help_at("escaped", Utc::now())))
        .await
        .unwrap()
        .into_inner()
        .id;
    let page = format!("{dashboard}/referrals/{id}");
    eventually("the referral in the ledger", || async {
        (http_get(&page, Some("dev-dz-detention-centre")).0 == 200).then_some(())
    })
    .await;

    // A crafted id in the URL.
    let (status, body) = http_get(
        &format!("{dashboard}/referrals/%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
        Some("dev-dz-detention-centre"),
    );
    assert_eq!(status, 400, "not a referral id: {body}");
    assert!(
        body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{body}"
    );
    assert!(!body.contains("<script"), "{body}");

    // A ledger value.
    let ledger = TestTracker::ledger(&tracker.settings).await;
    sqlx::query(
        "INSERT INTO hops (referral_at, referral_id, hop, agency, at, message_id, meets)
         SELECT submitted_at, $1, 'delivered', $2, $3, 'forged', '' FROM referrals WHERE id = $1",
    )
    .bind(&id)
    .bind("<script>alert(\"hop\")</script><img src=x>")
    .bind(Utc::now().timestamp_millis())
    .execute(&ledger.pool)
    .await
    .unwrap();
    ledger.close().await;
    let (status, body) = http_get(&page, Some("dev-dz-detention-centre"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("&lt;script&gt;alert(&quot;hop&quot;)&lt;/script&gt;&lt;img src=x&gt;"),
        "{body}"
    );
    assert!(
        !body.contains("<script") && !body.contains("<img"),
        "{body}"
    );

    // The Chinese names, as they are.
    let (status, body) = http_get(&format!("{dashboard}/"), Some("dev-dz-justice-bureau"));
    assert_eq!(status, 200);
    assert!(body.contains("看守所"), "{body}");

    let (settings, _) = tracker.stop().await;
    bus.stop().await;
    drop_ledger(&settings).await;
}

/// `curl` over TLS with the development CA, as `agency`'s client
/// certificate if given, keeping cookies in `jar`: status, headers, body.
fn curl(agency: Option<&str>, jar: &std::path::Path, args: &[&str]) -> (u16, String, String) {
    let dir = refbus_tests::tls_dir();
    let mut command = std::process::Command::new("curl");
    command
        .args(["-s", "-i", "--cacert"])
        .arg(dir.join("ca.pem"))
        .arg("-c")
        .arg(jar)
        .arg("-b")
        .arg(jar);
    if let Some(agency) = agency {
        command
            .arg("--cert")
            .arg(dir.join(format!("agencies/{agency}.pem")))
            .arg("--key")
            .arg(dir.join(format!("agencies/{agency}.key")));
    }
    let out = command.args(args).output().unwrap();
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// Issue 16: with the services under mutual TLS, the dashboard's port is
/// served over TLS with the same CA: a browser with an agency's client
/// certificate signs in as that agency (through the CSRF-protected form,
/// into an opaque session); one without a certificate is asked to sign in
/// and cannot with a certificate it does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_with_a_client_certificate_over_tls() {
    let bus = refbus_tests::TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    // The tracker's own HTTP port: under mutual TLS it serves the
    // dashboard over TLS with the gRPC certificate, asking for a client's.
    let dashboard = format!("https://localhost:{}", tracker.http.port());
    let jars = tempdir_for("dashboard-tls");
    let jar = jars.join("with-cert");

    let (status, _, form) = curl(Some(CENTRE), &jar, &[&format!("{dashboard}/login")]);
    assert_eq!(status, 200, "{form}");
    assert!(
        form.contains("id=\"sign-in-certificate\"")
            && form.contains("Continue as dz-detention-centre"),
        "{form}"
    );
    let csrf = csrf_of(&form);
    // Without the form's token: refused.
    let (status, _, _) = curl(
        Some(CENTRE),
        &jar,
        &["-d", "csrf=0", &format!("{dashboard}/login")],
    );
    assert_eq!(status, 403);
    let (status, head, _) = curl(
        Some(CENTRE),
        &jar,
        &["-d", &format!("csrf={csrf}"), &format!("{dashboard}/login")],
    );
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("refbus_session="), "{head}");
    let (status, _, page) = curl(Some(CENTRE), &jar, &[&format!("{dashboard}/")]);
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("<b id=\"agency\">dz-detention-centre</b>"),
        "{page}"
    );

    // No certificate: to the sign-in page, which offers none, and a
    // certificate sign-in without one names no agency.
    let bare = jars.join("without-cert");
    let (status, _, _) = curl(None, &bare, &[&format!("{dashboard}/")]);
    assert_eq!(status, 303);
    let (_, _, form) = curl(None, &bare, &[&format!("{dashboard}/login")]);
    assert!(!form.contains("sign-in-certificate"), "{form}");
    let (status, head, _) = curl(
        None,
        &bare,
        &[
            "-d",
            &format!("csrf={}", csrf_of(&form)),
            &format!("{dashboard}/login"),
        ],
    );
    assert_eq!(status, 401, "{head}");
    assert!(!head.contains("refbus_session="), "{head}");

    let _ = std::fs::remove_dir_all(&jars);
    let (settings, _) = tracker.stop().await;
    bus.stop().await;
    drop_ledger(&settings).await;
}

/// A fresh directory for one test's files.
fn tempdir_for(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("refbus-{name}-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
