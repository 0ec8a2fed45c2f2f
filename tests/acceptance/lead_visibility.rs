//! Issue 16, acceptance 1 (the query half): a misconduct lead stays hidden
//! from every agency off its route (DZ-6, DOMAIN.md "Confidentiality"),
//! even when hops and an obligation were filed under it in an outsider's
//! name. `GetReferral` answers such an agency exactly as for an id that
//! does not exist; `ListObligations`, the compliance report in every format
//! and the dashboard's pages show no id, no organ, no count of it. The same
//! queries on the route do show it, so what is proved is filtering, not
//! emptiness. Against the real RabbitMQ and a real tracker, on SQLite and
//! on PostgreSQL.

use chrono::{Datelike, Duration, TimeZone, Utc};
use refbus_core::envelope::timestamp;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::misconduct_lead::Subject;
use refbus_proto::v1::{
    ComplianceReportRequest, Envelope, JudicialOfficer, ListObligationsRequest, MisconductLead,
    ReportFormat,
};
use refbus_tests::TestBus;
use refbus_tests::fixtures::{BUREAU, submit};
use refbus_tests::tracker::{
    Db, TestTracker, bearer_dashboard, drop_ledger, eventually, ledger_settings,
};
use refbus_tests::up::http_get;
use refbus_tracker::Clock;
use tonic::Code;

const COURT: &str = "dz-court";
/// Off the route: the court that forged a reply, the municipal bureau that
/// supervises Dazu, and the bureau that supervises the forger.
const OUTSIDERS: [&str; 3] = ["yb-court", "cq-justice-bureau", "yb-justice-bureau"];

fn lead() -> Envelope {
    Envelope {
        sender: BUREAU.into(),
        idempotency_key: "hidden-lead".into(),
        payload: Some(Payload::MisconductLead(MisconductLead {
            subject: Some(Subject::Officer(JudicialOfficer {
                name: "王某".into(),
                organ: COURT.into(),
                position: "审判员".into(),
            })),
            description: "与律师私下会面并收受财物".into(),
            ..MisconductLead::default()
        })),
        ..Envelope::default()
    }
}

/// What `asker` can learn of the lead through every query but GetReferral:
/// `(ListObligations of asker, report in each format, dashboard pages)`.
async fn everything_seen_by(
    tracker: &TestTracker,
    dashboard: &str,
    asker: &str,
) -> Vec<(String, String)> {
    let mut client = tracker.client_as(asker).await;
    let mut seen = Vec::new();
    let listed = client
        .list_obligations(ListObligationsRequest {
            agency: asker.into(),
            ..ListObligationsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    seen.push(("ListObligations".to_owned(), format!("{listed:?}")));
    let now = Utc::now();
    let month = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    for format in [
        ReportFormat::Unspecified,
        ReportFormat::Table,
        ReportFormat::Csv,
        ReportFormat::Html,
    ] {
        let report = client
            .compliance_report(ComplianceReportRequest {
                agency: asker.into(),
                from: Some(timestamp(month - Duration::days(40))),
                to: Some(timestamp(now + Duration::days(40))),
                format: format as i32,
            })
            .await
            .unwrap()
            .into_inner();
        seen.push((format!("report {format:?}"), format!("{report:?}")));
    }
    let token = format!("dev-{asker}");
    for page in ["/", "/report", "/report.csv"] {
        let (status, body) = http_get(&format!("{dashboard}{page}"), Some(&token));
        assert_eq!(status, 200, "{asker} {page}: {body}");
        seen.push((format!("dashboard {page}"), body));
    }
    seen
}

/// The number in the `class` span of agency `agency`'s card on the overview.
fn card_count(overview: &str, agency: &str, class: &str) -> Option<u32> {
    let card = overview
        .split(&format!("data-agency=\"{agency}\""))
        .nth(1)?;
    let count = card.split(&format!("class=\"{class}\">")).nth(1)?;
    count.split('<').next()?.parse().ok()
}

async fn dz_6_a_lead_shows_nothing_off_its_route_whatever_hops_name(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let receipt = bus
        .gateway_as("justice-bureau", BUREAU)
        .await
        .submit(submit(lead()))
        .await
        .unwrap()
        .into_inner();
    let id = receipt.id;
    assert_eq!(receipt.recipient, COURT, "DZ-7(1): straight to the organ");
    eventually("the lead's DZ-8 obligation recorded", || async {
        let s = tracker.status(COURT, &id).await.ok()?;
        s.obligations.iter().any(|o| o.rule == "DZ-8").then_some(())
    })
    .await;

    // Forged behind the gateways' back: an answer and an acknowledgement
    // filed under the lead in the names of agencies off its route, and an
    // obligation on the lead borne by the forger (what a forged relay would
    // file). None of it may make anyone a party.
    let ledger = TestTracker::ledger(&tracker.settings).await;
    let at = Utc::now().timestamp_millis();
    for (hop, agency, meets) in [
        ("answered", "yb-court", "feedback"),
        ("acknowledged", "cq-justice-bureau", "acknowledged"),
        ("delivered", "yb-justice-bureau", "delivered"),
    ] {
        sqlx::query(
            "INSERT INTO hops (referral_at, referral_id, hop, agency, at, message_id, meets)
             SELECT submitted_at, $1, $2, $3, $4, $5, $6 FROM referrals WHERE id = $1",
        )
        .bind(&id)
        .bind(hop)
        .bind(agency)
        .bind(at)
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(meets)
        .execute(&ledger.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO obligations (referral_at, id, referral_id, rule, kind, duty, bearer, meets_agency, met_by,
                                  clock_started_at, due_at, met_at, overdue_at, notify)
         SELECT submitted_at, $1, $2, 'DZ-8', 'misconduct_lead', 'investigate and feed back', 'yb-court',
                 'yb-court', 'feedback', $3, $4, NULL, NULL, '' FROM referrals WHERE id = $2",
    )
    .bind(format!("{id}/DZ-8/feedback/yb-court"))
    .bind(&id)
    .bind(at)
    .bind(at + 7 * 24 * 3_600_000)
    .execute(&ledger.pool)
    .await
    .unwrap();
    ledger.close().await;

    // GetReferral off the route: exactly what an unknown id gets.
    let unknown = uuid::Uuid::now_v7().to_string();
    let dashboard = bearer_dashboard(&bus, &tracker).await;
    for outsider in OUTSIDERS {
        let err = tracker.status(outsider, &id).await.unwrap_err();
        let none = tracker.status(outsider, &unknown).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{outsider}: {}", err.message());
        assert_eq!(
            err.message().replace(&id, "ID"),
            none.message().replace(&unknown, "ID"),
            "{outsider}: no existence oracle"
        );
        let token = format!("dev-{outsider}");
        let (status, page) = http_get(&format!("{dashboard}/referrals/{id}"), Some(&token));
        let (none_status, none_page) =
            http_get(&format!("{dashboard}/referrals/{unknown}"), Some(&token));
        assert_eq!((status, none_status), (404, 404), "{outsider}: {page}");
        assert_eq!(
            page.replace(&id, "ID"),
            none_page.replace(&unknown, "ID"),
            "{outsider}"
        );

        // Nothing anywhere else: no id, no DZ rule, no row of the organ
        // concerned, no count of it on a card.
        for (query, text) in everything_seen_by(&tracker, &dashboard, outsider).await {
            for trace in [id.as_str(), "DZ-8", "DZ-7", "王某"] {
                assert!(
                    !text.contains(trace),
                    "{outsider} {query}: {trace} in {text}"
                );
            }
            if query.starts_with("report") || query.starts_with("dashboard /report") {
                for organ in [COURT, "yb-court"].into_iter().filter(|o| *o != outsider) {
                    assert!(
                        !text.contains(organ),
                        "{outsider} {query}: {organ} in {text}"
                    );
                }
            }
            if query == "dashboard /" {
                for organ in [COURT, "yb-court"] {
                    for class in ["open-count", "count overdue-count"] {
                        assert!(
                            card_count(&text, organ, class).is_none_or(|n| n == 0),
                            "{outsider}: {organ}'s {class} counts the lead: {text}"
                        );
                    }
                }
            }
        }
    }

    // On the route the same queries show it: the finder (a justice bureau
    // supervising the court) and the court.
    let status = tracker.status(BUREAU, &id).await.unwrap();
    assert!(matches!(
        status.envelope.and_then(|e| e.payload),
        Some(Payload::MisconductLead(_))
    ));
    assert!(tracker.status(COURT, &id).await.is_ok());
    let court = everything_seen_by(&tracker, &dashboard, COURT).await;
    assert!(
        court[0].1.contains(&id),
        "the court's own DZ-8 duty: {court:?}"
    );
    let finder = everything_seen_by(&tracker, &dashboard, BUREAU).await;
    for (query, text) in &finder {
        match query.as_str() {
            "ListObligations" => {} // the finder bears nothing of it
            "dashboard /" => {
                assert_eq!(card_count(text, COURT, "open-count"), Some(1), "{text}");
            }
            "dashboard /report.csv" | "report Csv" => {
                assert!(text.contains("dz-court,DZ-8,1,"), "{query}: {text}");
            }
            _ => assert!(
                text.contains("DZ-8") && text.contains(COURT),
                "{query}: {text}"
            ),
        }
    }
    let (status, page) = http_get(
        &format!("{dashboard}/referrals/{id}"),
        Some(&format!("dev-{BUREAU}")),
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("DZ-8") && !page.contains("王某"), "{page}");

    let (settings, _) = tracker.stop().await;
    bus.stop().await;
    drop_ledger(&settings).await;
}
on_both_ledgers!(dz_6_a_lead_shows_nothing_off_its_route_whatever_hops_name);
