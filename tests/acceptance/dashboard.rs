//! Issue 7: the tracker's web dashboard, end to end in headless Chromium
//! (Debian's `chromium`, driven through `chromedriver` by fantoccini)
//! against a bus seeded with requests met on time, met late, still open
//! and overdue: signing in with a bearer token, the overdue obligations
//! per agency, one referral's timeline, the monthly compliance chart, and
//! a screenshot of the chart whose colours the test counts.

use std::time::Duration;

use chrono::{Datelike, Utc};
use fantoccini::{ClientBuilder, Locator};
use refbus_tests::fixtures::{CENTRE, DESK, legal_help_at, submit};
use refbus_tests::up::{Up, eventually, http_get};
use refbus_tests::{as_agency, take_and_acknowledge};

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
    let dashboard = up.url("dashboard").to_owned();
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
    assert!(error.text().await.unwrap().contains("names no agency"));
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

    // Signing out forgets the token.
    browser.goto(&format!("{dashboard}/logout")).await.unwrap();
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
