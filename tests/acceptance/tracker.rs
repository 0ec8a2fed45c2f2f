//! Issue 3: the tracker. Every obligation, its deadline, its feedback, and
//! who is told when it is late; against the real RabbitMQ, SQLite and
//! PostgreSQL, with an injected clock (no test sleeps for a deadline).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use prost::Message;
use refbus_core::envelope::{from_timestamp, timestamp};
use refbus_core::signing::Signed;
use refbus_proto::v1::detention_centre_client::DetentionCentreClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::justice_bureau_client::JusticeBureauClient;
use refbus_proto::v1::misconduct_lead::Subject;
use refbus_proto::v1::route_hop::Duty;
use refbus_proto::v1::{
    ComplianceReportRequest, Envelope, Feedback, GetReferralRequest, Hop, HopReport,
    JudicialOfficer, LawyerViolationNotice, MessageKind, MisconductLead,
    NotifyLawyerViolationRequest, ObligationState, Outcome, ReferralStatus, ReportFormat,
    ReportHandlingResultRequest, RightsComplaint, RouteHop,
};
use refbus_tests::fixtures::{BUREAU, CENTRE, DESK, legal_help_at, submit, violation};
use refbus_tests::signed_properties;
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::{Amqp, Inbox, TestBus, acknowledge, publish_hop};
use refbus_tracker::Clock;
use refbus_tracker::audit::{self, Verdict};
use tonic::Code;

/// How many messages the tracker has recorded, and how many it has seen
/// again (duplicates).
fn recorded_and_repeated(tracker: &TestTracker) -> (u64, u64) {
    let m = &tracker.metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    (load(&m.recorded), load(&m.duplicates))
}

/// Waits for the tracker to have seen as many messages as `expected`
/// (recorded, repeated) counts, checks it counted them so, stops it, and
/// opens its ledger.
async fn settled_at(
    tracker: TestTracker,
    expected: (u64, u64),
    why: &str,
) -> (
    refbus_tracker::TrackerSettings,
    refbus_tracker::ledger::Ledger,
) {
    eventually("every message to be seen", || async {
        let (recorded, repeated) = recorded_and_repeated(&tracker);
        (recorded + repeated >= expected.0 + expected.1).then_some(())
    })
    .await;
    assert_eq!(recorded_and_repeated(&tracker), expected, "{why}");
    let settings = tracker.stop().await.0;
    let ledger = TestTracker::ledger(&settings).await;
    (settings, ledger)
}

async fn status(tracker: &TestTracker, asker: &str, id: &str) -> Option<ReferralStatus> {
    tracker.status(asker, id).await.ok()
}

fn state(s: &ReferralStatus, rule: &str) -> Option<ObligationState> {
    s.obligations
        .iter()
        .find(|o| o.rule == rule)
        .and_then(|o| ObligationState::try_from(o.state).ok())
}

/// Acceptance 1 (CQ-1.1b): a legal-help request whose detainee asked 25 h
/// before it reached the duty desk is met late; one at 23 h is met on time.
async fn cq_1_1b_met_late_at_25_hours_on_time_at_23(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let late = centre
        .submit(submit(legal_help_at(
            "late",
            Utc::now() - Duration::hours(25),
        )))
        .await
        .unwrap()
        .into_inner();
    let on_time = centre
        .submit(submit(legal_help_at(
            "on-time",
            Utc::now() - Duration::hours(23),
        )))
        .await
        .unwrap()
        .into_inner();

    // The request reaches the desk's system when its Inbox hands it over.
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    for _ in 0..2 {
        let d = inbox.next().await;
        acknowledge(&mut desk, DESK, d.delivery_token).await;
    }
    for (id, expected) in [
        (&late.id, ObligationState::MetLate),
        (&on_time.id, ObligationState::MetOnTime),
    ] {
        let got = eventually("the CQ-1.1b obligation to be met", || async {
            let s = status(&tracker, CENTRE, id).await?;
            state(&s, "CQ-1.1b")
                .filter(|st| matches!(st, ObligationState::MetLate | ObligationState::MetOnTime))
        })
        .await;
        assert_eq!(got, expected, "referral {id}");
    }
    let s = status(&tracker, CENTRE, &late.id).await.unwrap();
    let o = &s.obligations[0];
    assert_eq!(o.bearer, CENTRE);
    let clock = from_timestamp(o.clock_started_at.as_ref().unwrap()).unwrap();
    let due = from_timestamp(o.due_at.as_ref().unwrap()).unwrap();
    assert_eq!(
        due - clock,
        Duration::hours(24),
        "CQ-1.1b: 24 h from the detainee's request"
    );
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(cq_1_1b_met_late_at_25_hours_on_time_at_23);

/// The overdue notices in an inbox, acknowledged as read, until one about
/// `until` (a referral id) arrives; returns the referral ids they were about.
async fn overdue_notices_until(
    inbox: &mut Inbox,
    client: &mut refbus_proto::v1::gateway_client::GatewayClient<tonic::transport::Channel>,
    agency: &str,
    until: &str,
) -> Vec<String> {
    let mut about = Vec::new();
    loop {
        let d = inbox.next().await;
        acknowledge(client, agency, d.delivery_token).await;
        let e = d.envelope.unwrap();
        if let Some(Payload::OverdueNotice(n)) = e.payload {
            assert_eq!(n.rule_id, "CQ-3.14");
            about.push(n.referral_id.clone());
            if n.referral_id == until {
                return about;
            }
        }
    }
}

/// Acceptance 2 (CQ-3.14): an unanswered lawyer-violation notice becomes
/// overdue at its deadline, and exactly one overdue notice reaches each
/// agency the policy names (the centre that sent it, and the bureau's
/// supervisor), also across a tracker restart.
async fn cq_3_14_unanswered_violation_is_overdue_once_per_named_agency(db: Db) {
    let bus = TestBus::spawn().await;
    let start = Utc::now();
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::manual(start)).await;
    let mut dc = DetentionCentreClient::new(bus.channel_as("detention-centre", CENTRE).await);
    let notify = |key: &str| NotifyLawyerViolationRequest {
        detention_centre: CENTRE.into(),
        notice: Some(LawyerViolationNotice {
            description: "会见中违规".into(),
            lawyer: violation(key).payload.and_then(|p| match p {
                Payload::LawyerViolationNotice(v) => v.lawyer,
                _ => None,
            }),
            ..Default::default()
        }),
        idempotency_key: key.into(),
    };
    let first = dc
        .notify_lawyer_violation(notify("v-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.recipient, BUREAU,
        "CQ-3.14: to the justice bureau of the centre's region"
    );
    let obligation = eventually("the CQ-3.14 obligation", || async {
        status(&tracker, CENTRE, &first.id)
            .await?
            .obligations
            .into_iter()
            .find(|o| o.rule == "CQ-3.14")
    })
    .await;
    assert_eq!(obligation.bearer, BUREAU);
    assert_eq!(obligation.notify, [CENTRE, "cq-justice-bureau"]);
    let due = from_timestamp(obligation.due_at.as_ref().unwrap()).unwrap();
    assert_eq!(
        ObligationState::try_from(obligation.state).unwrap(),
        ObligationState::Open
    );

    // The clock passes the deadline by the gateways' confirm timeout (the
    // engine marks only what the tracker has recorded through, issue 16):
    // the engine wakes and marks it.
    tracker.clock.set(due - Duration::seconds(1));
    tracker
        .clock
        .set(due + Duration::from_std(bus.shared.settings.confirm_timeout).unwrap());
    let overdue = eventually("the obligation to be marked overdue", || async {
        let s = status(&tracker, CENTRE, &first.id).await?;
        (state(&s, "CQ-3.14") == Some(ObligationState::Overdue)
            && s.obligations[0].overdue_at.is_some())
        .then_some(s)
    })
    .await;
    let marked = from_timestamp(overdue.obligations[0].overdue_at.as_ref().unwrap()).unwrap();
    assert!(marked >= due);

    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut bureau = bus.gateway_as("justice-bureau", "cq-justice-bureau").await;
    let mut centre_inbox = Inbox::open(&mut centre, CENTRE).await;
    let mut supervisor_inbox = Inbox::open(&mut bureau, "cq-justice-bureau").await;
    assert_eq!(
        overdue_notices_until(&mut centre_inbox, &mut centre, CENTRE, &first.id).await,
        vec![first.id.clone()]
    );
    assert_eq!(
        overdue_notices_until(
            &mut supervisor_inbox,
            &mut bureau,
            "cq-justice-bureau",
            &first.id
        )
        .await,
        vec![first.id.clone()]
    );

    // Restart the tracker on the same ledger; more scans happen. A sentinel
    // violation made overdue after the restart must be the next notice in
    // both inboxes: had the first been sent again, it would come before.
    let (settings, clock) = tracker.stop().await;
    let tracker = TestTracker::start(&bus, settings, clock).await;
    tracker.clock.advance(Duration::days(1));
    let sentinel = dc
        .notify_lawyer_violation(notify("v-2"))
        .await
        .unwrap()
        .into_inner();
    let sentinel_due = eventually("the sentinel's obligation", || async {
        let s = status(&tracker, CENTRE, &sentinel.id).await?;
        s.obligations
            .first()
            .and_then(|o| from_timestamp(o.due_at.as_ref()?))
    })
    .await;
    tracker.clock.set(sentinel_due + Duration::minutes(1));
    assert_eq!(
        overdue_notices_until(&mut centre_inbox, &mut centre, CENTRE, &sentinel.id).await,
        vec![sentinel.id.clone()]
    );
    assert_eq!(
        overdue_notices_until(
            &mut supervisor_inbox,
            &mut bureau,
            "cq-justice-bureau",
            &sentinel.id
        )
        .await,
        vec![sentinel.id.clone()]
    );
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(cq_3_14_unanswered_violation_is_overdue_once_per_named_agency);

/// Acceptance 3 and 7: feedback closes the obligation and the timeline shows
/// every hop with its time; an agency that is not a party is refused, and
/// the supervising justice bureau sees the metadata but not the payload.
async fn feedback_closes_the_obligation_and_the_timeline_shows_every_hop(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let referral = centre
        .submit(submit(violation("fb-1")))
        .await
        .unwrap()
        .into_inner();

    let mut bureau = bus.gateway_as("justice-bureau", BUREAU).await;
    let mut inbox = Inbox::open(&mut bureau, BUREAU).await;
    let d = inbox.next().await;
    acknowledge(&mut bureau, BUREAU, d.delivery_token).await;
    let mut jb = JusticeBureauClient::new(bus.channel_as("justice-bureau", BUREAU).await);
    jb.report_handling_result(ReportHandlingResultRequest {
        justice_bureau: BUREAU.into(),
        referral: d.envelope.clone(),
        outcome: Outcome::Sanctioned as i32,
        summary: "已立案处理".into(),
        idempotency_key: "fb-answer".into(),
    })
    .await
    .unwrap();

    let closed = eventually("feedback to close the obligation", || async {
        let s = status(&tracker, CENTRE, &referral.id).await?;
        let hops: HashSet<i32> = s.timeline.iter().map(|t| t.hop).collect();
        let complete = [
            Hop::Submitted,
            Hop::Delivered,
            Hop::Acknowledged,
            Hop::Answered,
        ]
        .iter()
        .all(|h| hops.contains(&(*h as i32)));
        (complete && state(&s, "CQ-3.14") == Some(ObligationState::MetOnTime)).then_some(s)
    })
    .await;
    let timeline: Vec<(Hop, String)> = closed
        .timeline
        .iter()
        .map(|t| (Hop::try_from(t.hop).unwrap(), t.agency.clone()))
        .collect();
    assert_eq!(
        timeline,
        [
            (Hop::Submitted, CENTRE.into()),
            (Hop::Delivered, BUREAU.into()),
            (Hop::Acknowledged, BUREAU.into()),
            (Hop::Answered, BUREAU.into())
        ]
    );
    let times: Vec<DateTime<Utc>> = closed
        .timeline
        .iter()
        .map(|t| from_timestamp(t.at.as_ref().unwrap()).unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "hops in time order: {times:?}"
    );
    let met = from_timestamp(closed.obligations[0].met_at.as_ref().unwrap()).unwrap();
    assert_eq!(met, times[3], "met when the feedback was submitted");
    assert!(
        closed.envelope.is_some() && !closed.payload_withheld,
        "a party sees the payload"
    );

    // Acceptance 7: not a party.
    let err = tracker
        .client_as("yb-court")
        .await
        .get_referral(GetReferralRequest {
            agency: "yb-court".into(),
            referral_id: referral.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let err = tracker
        .client_as("sh-justice-bureau")
        .await
        .get_referral(GetReferralRequest {
            agency: "sh-justice-bureau".into(),
            referral_id: referral.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "another region's bureau"
    );
    // The municipal justice bureau supervises Dazu: metadata, no payload.
    let supervisor = status(&tracker, "cq-justice-bureau", &referral.id)
        .await
        .unwrap();
    assert!(supervisor.payload_withheld && supervisor.envelope.is_none());
    assert_eq!(supervisor.timeline.len(), 4);
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(feedback_closes_the_obligation_and_the_timeline_shows_every_hop);

/// An envelope as a gateway would publish it, for seeding the tap directly.
fn seeded(
    id: &str,
    kind: MessageKind,
    sender: &str,
    recipient: &str,
    clock: DateTime<Utc>,
    payload: Payload,
) -> Envelope {
    Envelope {
        id: id.into(),
        kind: kind as i32,
        sender: sender.into(),
        recipient: recipient.into(),
        clock_started_at: Some(timestamp(clock)),
        submitted_at: Some(timestamp(clock)),
        in_reply_to: String::new(),
        idempotency_key: id.into(),
        payload: Some(payload),
        ..Envelope::default()
    }
}

fn hop(referral: &str, hop: Hop, agency: &str, at: DateTime<Utc>) -> HopReport {
    HopReport {
        id: format!("{referral}/{}", hop as i32),
        referral_id: referral.into(),
        hop: hop as i32,
        agency: agency.into(),
        at: Some(timestamp(at)),
    }
}

/// (count, on time, late, open, overdue, seconds to meet) of one agency.
type Expected = (u64, u64, u64, u64, u64, Vec<i64>);

/// Acceptance 5: the compliance report for a seeded month equals counts
/// computed independently here, from the seed and the rules (CQ-1.1b: 24 h
/// from the request, met on delivery, borne by the centre).
async fn compliance_report_for_a_seeded_month_matches_independent_counts(db: Db) {
    let bus = TestBus::spawn().await;
    let as_of = Utc.with_ymd_and_hms(2026, 11, 3, 12, 0, 0).unwrap();
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::manual(as_of)).await;
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let from = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
    let to = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();

    // Seed: 60 legal-help requests from two centres, from 2026-09-30 to
    // 2026-11-02 (a few outside the month); delivered after 0..47 hours,
    // or never (every seventh).
    let centres = [
        (CENTRE, DESK),
        ("yb-detention-centre", "yb-legal-aid-centre"),
    ];
    let mut expected: BTreeMap<&str, Expected> = BTreeMap::new();
    let mut ids = Vec::new();
    for i in 0..60_i64 {
        let (centre, desk) = centres[(i % 2) as usize];
        let clock = Utc.with_ymd_and_hms(2026, 9, 30, 6, 0, 0).unwrap() + Duration::hours(i * 13);
        let id = format!("00000000-0000-4000-8000-{i:012}");
        let payload = legal_help_at(&id, clock).payload.unwrap();
        let e = seeded(
            &id,
            MessageKind::LegalHelpRequest,
            centre,
            desk,
            clock,
            payload,
        );
        amqp.publish_envelope(&tap, &e).await;
        let delivered = (i % 7 != 0).then(|| clock + Duration::hours((i * 5) % 48));
        if let Some(at) = delivered {
            let report = hop(&id, Hop::Delivered, desk, at);
            publish_hop(&amqp, &bus, &report).await;
        }
        ids.push(id);
        if clock < from || clock >= to {
            continue;
        }
        let due = clock + Duration::hours(24);
        let row = expected.entry(centre).or_default();
        row.0 += 1;
        match delivered.filter(|at| *at <= as_of) {
            Some(at) if at <= due => {
                row.1 += 1;
                row.5.push((at - clock).num_seconds());
            }
            Some(at) => {
                row.2 += 1;
                row.5.push((at - clock).num_seconds());
            }
            None if due > as_of => row.3 += 1,
            None => row.4 += 1,
        }
    }
    // Everything seeded is recorded (the hop reports of the last requests
    // are the last messages).
    let last = ids.last().unwrap().clone();
    eventually("the seed to be recorded", || async {
        let s = status(&tracker, "yb-detention-centre", &last).await?;
        (s.timeline.len() == 2).then_some(())
    })
    .await;

    for asker in [CENTRE, "yb-detention-centre"] {
        let report = tracker
            .client_as(asker)
            .await
            .compliance_report(ComplianceReportRequest {
                agency: asker.into(),
                from: Some(timestamp(from)),
                to: Some(timestamp(to)),
                format: ReportFormat::Csv as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(report.rows.len(), 1, "an agency sees its own rows");
        let row = &report.rows[0];
        let (count, on_time, late, open, overdue, mut times) = expected[asker].clone();
        assert_eq!((row.agency.as_str(), row.rule.as_str()), (asker, "CQ-1.1b"));
        assert_eq!(
            (
                row.count,
                row.met_on_time,
                row.met_late,
                row.still_open,
                row.overdue
            ),
            (count, on_time, late, open, overdue),
            "{asker}"
        );
        times.sort_unstable();
        let rank = |p: f64| times[((p / 100.0 * times.len() as f64).ceil() as usize).max(1) - 1];
        assert_eq!(row.median_seconds_to_meet, Some(rank(50.0)));
        assert_eq!(row.p95_seconds_to_meet, Some(rank(95.0)));
        assert!(
            report.rendered.lines().any(|l| l.starts_with(&format!(
                "{asker},CQ-1.1b,{count},{on_time},{late},{open},{overdue},"
            ))),
            "{}",
            report.rendered
        );
    }
    // The supervising municipal bureau sees both districts; HTML renders.
    let report = tracker
        .client_as("cq-justice-bureau")
        .await
        .compliance_report(ComplianceReportRequest {
            agency: "cq-justice-bureau".into(),
            from: Some(timestamp(from)),
            to: Some(timestamp(to)),
            format: ReportFormat::Html as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.rows.len(), 2);
    assert!(report.rendered.contains("<svg") && report.rendered.starts_with("<!doctype html>"));
    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(compliance_report_for_a_seeded_month_matches_independent_counts);

/// Acceptance 6: changing one ledger row behind the tracker's back makes
/// verify name that row. Also: a kind the policy does not know is recorded
/// and flagged, never dropped; the same message twice changes nothing.
async fn verify_names_the_changed_row(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            centre
                .submit(submit(legal_help_at(&format!("a-{i}"), Utc::now())))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    // Unknown kind (a newer sender's), and a duplicate of the first envelope.
    let mut unknown = seeded(
        "00000000-0000-4000-9000-000000000001",
        MessageKind::Unspecified,
        CENTRE,
        DESK,
        Utc::now(),
        legal_help_at("u", Utc::now()).payload.unwrap(),
    );
    unknown.kind = 99;
    amqp.publish_envelope(&tap, &unknown).await;
    let flagged = eventually("the unknown kind to be recorded", || async {
        status(&tracker, CENTRE, &unknown.id).await
    })
    .await;
    assert!(!flagged.kind_known);
    assert!(flagged.obligations.is_empty());
    assert_eq!(
        tracker
            .metrics
            .unknown_kinds
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let settings = tracker.stop().await.0;
    let ledger = TestTracker::ledger(&settings).await;
    let events = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM ledger_events")
            .fetch_one(&ledger.pool)
            .await
            .unwrap()
    };
    let before = events().await;
    assert_eq!(
        audit::verify(&ledger).await.unwrap(),
        Verdict::Intact {
            events: before,
            envelopes: 6
        }
    );

    // Replaying a recorded message changes nothing.
    let tracker = TestTracker::start(&bus, settings.clone(), Clock::System).await;
    let row = sqlx::query_scalar::<_, String>("SELECT envelope FROM referrals WHERE id = $1")
        .bind(&ids[0])
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
    use base64::Engine;
    amqp.publish_signed(
        &tap,
        CENTRE,
        Signed::Envelope,
        &base64::engine::general_purpose::STANDARD
            .decode(row)
            .unwrap(),
    )
    .await;
    eventually("the duplicate to be seen", || async {
        (tracker
            .metrics
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1)
            .then_some(())
    })
    .await;
    tracker.stop().await;
    assert_eq!(
        events().await,
        before,
        "the same message twice changes nothing"
    );

    // A tracker recording while the audit runs: here the head moves on
    // after the audit read the chain. The audit reads one snapshot, so it
    // finds the ledger intact as it was when it began...
    let moved = std::sync::atomic::AtomicBool::new(false);
    let verdict = audit::verify_reporting(&ledger, &|_| {
        if !moved.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    sqlx::query("UPDATE ledger_head SET seq = seq + 1 WHERE id = 1")
                        .execute(&ledger.pool)
                        .await
                        .unwrap();
                });
            });
        }
    })
    .await
    .unwrap();
    assert!(moved.into_inner(), "the head moved during the audit");
    assert!(matches!(verdict, Verdict::Intact { .. }), "{verdict}");
    // ...and names a head that is wrong when nothing is recording.
    let verdict = audit::verify(&ledger).await.unwrap();
    assert!(
        matches!(
            &verdict,
            Verdict::Broken {
                table: "ledger_head",
                ..
            }
        ),
        "{verdict}"
    );
    sqlx::query("UPDATE ledger_head SET seq = seq - 1 WHERE id = 1")
        .execute(&ledger.pool)
        .await
        .unwrap();

    // Change one event's body.
    sqlx::query(
        "UPDATE ledger_events SET body = REPLACE(body, 'dz-duty-desk', 'yb-court') WHERE seq = 3",
    )
    .execute(&ledger.pool)
    .await
    .unwrap();
    let message: String = sqlx::query_scalar("SELECT chained_id FROM ledger_events WHERE seq = 3")
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
    let verdict = audit::verify(&ledger).await.unwrap();
    assert_eq!(
        verdict,
        Verdict::Broken {
            table: "ledger_events",
            row: format!("seq 3 (message {message})"),
            problem: "its contents do not match its hash".into()
        }
    );
    assert!(verdict.to_string().contains("seq 3"));
    sqlx::query(
        "UPDATE ledger_events SET body = REPLACE(body, 'yb-court', 'dz-duty-desk') WHERE seq = 3",
    )
    .execute(&ledger.pool)
    .await
    .unwrap();
    assert_intact(&ledger).await;

    // Change one referral's stored envelope.
    let original: String = sqlx::query_scalar("SELECT envelope FROM referrals WHERE id = $1")
        .bind(&ids[1])
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
    let other = seeded(
        &ids[1],
        MessageKind::LegalHelpRequest,
        CENTRE,
        "yb-court",
        Utc::now(),
        legal_help_at("x", Utc::now()).payload.unwrap(),
    );
    let changed = base64::engine::general_purpose::STANDARD.encode(other.encode_to_vec());
    set_envelope(&ledger, &ids[1], &changed).await;
    verify_names_referral(&ledger, &ids[1], "does not match the hash").await;
    set_envelope(&ledger, &ids[1], &original).await;
    assert_intact(&ledger).await;

    // Add a referral row no event chained (the event leads to its row
    // through `referrals.id`; migration 0006).
    let added = "00000000-0000-4000-e000-0000000000ad";
    sqlx::query(
        "INSERT INTO referrals (id, kind, sender, recipient, in_reply_to, sender_region, recipient_region,
                                clock_started_at, submitted_at, kind_known, envelope)
         SELECT $1, kind, sender, recipient, in_reply_to, sender_region, recipient_region,
                clock_started_at, submitted_at, kind_known, envelope
         FROM referrals WHERE id = $2",
    )
    .bind(added)
    .bind(&ids[1])
    .execute(&ledger.pool)
    .await
    .unwrap();
    verify_names_referral(&ledger, added, "without its event").await;
    delete_referral(&ledger, added).await;

    // Delete a referral row its event chained.
    delete_referral(&ledger, &ids[1]).await;
    verify_names_referral(&ledger, &ids[1], "missing: ledger_events seq").await;
    ledger.close().await;
    amqp.close().await;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(verify_names_the_changed_row);

/// Asserts that the audit names referral `id` as the first broken row,
/// with a problem that says `problem` (its start, for a missing row).
async fn verify_names_referral(ledger: &refbus_tracker::ledger::Ledger, id: &str, problem: &str) {
    let verdict = audit::verify(ledger).await.unwrap();
    assert!(
        matches!(&verdict, Verdict::Broken { table: "referrals", row, problem: said }
            if *row == format!("id {id}") && said.contains(problem)),
        "{verdict}"
    );
}

/// A bus, an AMQP client, its tap queue, and ledger settings on `db` that
/// record each message in a batch of its own (each commits before the
/// next is seen).
async fn one_message_per_batch(db: Db) -> (TestBus, refbus_tracker::TrackerSettings, Amqp, String) {
    let bus = TestBus::spawn().await;
    let mut settings = ledger_settings(db);
    settings.batch = 1;
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    (bus, settings, amqp, tap)
}

/// Asserts that the audit finds the ledger intact.
async fn assert_intact(ledger: &refbus_tracker::ledger::Ledger) {
    let verdict = audit::verify(ledger).await.unwrap();
    assert!(matches!(verdict, Verdict::Intact { .. }), "{verdict}");
}

/// Stores `envelope` (base64, as the ledger keeps it) as referral `id`'s.
async fn set_envelope(ledger: &refbus_tracker::ledger::Ledger, id: &str, envelope: &str) {
    sqlx::query("UPDATE referrals SET envelope = $1 WHERE id = $2")
        .bind(envelope)
        .bind(id)
        .execute(&ledger.pool)
        .await
        .unwrap();
}

async fn delete_referral(ledger: &refbus_tracker::ledger::Ledger, id: &str) {
    sqlx::query("DELETE FROM referrals WHERE id = $1")
        .bind(id)
        .execute(&ledger.pool)
        .await
        .unwrap();
}

/// Runs the `tracker` binary on `bus`'s namespace and `ledger`.
fn spawn_tracker(bus: &TestBus, ledger: &refbus_tracker::TrackerSettings) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(refbus_tests::tracker::tracker_binary());
    command
        .arg("run")
        .env("AMQP_URL", &bus.shared.settings.amqp_url)
        .env("REFBUS_NAMESPACE", bus.namespace())
        .env("REFBUS_QUEUE_EXPIRES", "60s")
        .env("REFBUS_DIRECTORY", &bus.shared.settings.directory)
        .env("REFBUS_POLICY", &ledger.policy)
        .env("REFBUS_DATA_DIR", &ledger.data_dir)
        .env("REFBUS_TRACKER_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(refbus_tests::mtls_env())
        .env_remove("DATABASE_URL")
        .env_remove("REFBUS_DATABASE_SCHEMA")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = &ledger.database_url {
        command.env("DATABASE_URL", url);
    }
    if let Some(schema) = &ledger.database_schema {
        command.env("REFBUS_DATABASE_SCHEMA", schema);
    }
    command.spawn().expect("tracker binary runs")
}

/// Acceptance 4: the tracker killed with SIGKILL in the middle of a burst of
/// 10,000 messages and restarted: the ledger holds each message exactly once.
async fn sigkill_mid_burst_leaves_each_message_recorded_exactly_once(db: Db) {
    const BURST: i64 = 10_000;
    let bus = TestBus::spawn().await;
    let settings = ledger_settings(db);
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let clock = Utc::now();
    for i in 0..BURST {
        let id = format!("00000000-0000-4000-a000-{i:012}");
        let e = seeded(
            &id,
            MessageKind::LegalHelpRequest,
            CENTRE,
            DESK,
            clock,
            legal_help_at(&id, clock).payload.unwrap(),
        );
        amqp.channel
            .basic_publish(
                "".into(),
                tap.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &e.encode_to_vec(),
                signed_properties(&e.sender, Signed::Envelope, &e.encode_to_vec()),
            )
            .await
            .unwrap();
    }
    eventually("the burst to be queued", || async {
        (amqp.counts(&tap).await.0 as i64 == BURST).then_some(())
    })
    .await;

    let mut child = spawn_tracker(&bus, &settings);
    let ledger = eventually("the ledger to exist", || async {
        // The child creates the schema; connect once it has migrated.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        Some(TestTracker::ledger(&settings).await)
    })
    .await;
    let count = |sql: &'static str| {
        let pool = ledger.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap_or(0)
        }
    };
    let at_kill = eventually("the tracker to be part-way through the burst", || async {
        let n = count("SELECT COUNT(*) FROM ledger_events").await;
        (n >= 500).then_some(n)
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(
        at_kill < BURST,
        "killed in the middle of the burst ({at_kill} recorded)"
    );

    let mut child = spawn_tracker(&bus, &settings);
    eventually("the whole burst to be recorded", || async {
        (count("SELECT COUNT(*) FROM ledger_events").await == BURST).then_some(())
    })
    .await;
    eventually("the tap to drain", || async {
        (amqp.counts(&tap).await.0 == 0).then_some(())
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_eq!(count("SELECT COUNT(*) FROM ledger_events").await, BURST);
    assert_eq!(
        count("SELECT COUNT(DISTINCT chained_id) FROM ledger_events").await,
        BURST
    );
    assert_eq!(count("SELECT COUNT(*) FROM referrals").await, BURST);
    assert_eq!(
        count("SELECT COUNT(*) FROM obligations").await,
        BURST,
        "one CQ-1.1b obligation each"
    );
    intact_then_close(ledger, amqp, bus, &settings, BURST, BURST).await;
}

/// Asserts that the chain holds `events` events, `envelopes` of them
/// envelopes, and is intact; then closes everything and drops the ledger.
/// Migration 0005: once its referral is recorded, every hop and obligation
/// filed under it is keyed by the referral's time, none left waiting at 0
/// (where a row filed before its referral waits).
async fn every_row_keyed_by_its_referral(ledger: &refbus_tracker::ledger::Ledger) {
    for table in ["hops", "obligations"] {
        let astray: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {table} x JOIN referrals r ON r.id = x.referral_id
             WHERE x.referral_at <> r.submitted_at"
        ))
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
        assert_eq!(
            astray, 0,
            "{table}: every row of a recorded referral is keyed by its time"
        );
    }
}

async fn intact_then_close(
    ledger: refbus_tracker::ledger::Ledger,
    amqp: Amqp,
    bus: TestBus,
    settings: &refbus_tracker::TrackerSettings,
    events: i64,
    envelopes: i64,
) {
    assert_eq!(
        audit::verify(&ledger).await.unwrap(),
        Verdict::Intact { events, envelopes }
    );
    ledger.close().await;
    amqp.close().await;
    bus.stop().await;
    drop_ledger(settings).await;
}

on_both_ledgers!(sigkill_mid_burst_leaves_each_message_recorded_exactly_once);

/// Messages repeated a batch later, and hop reports a batch before or after
/// the referral they meet, are recorded as if the batches had been written
/// one after the other, although on PostgreSQL the tracker writes two at
/// once (the next batch's rows go in before the one before it commits):
/// each message once, each repeat counted as a duplicate, every CQ-1.1b
/// obligation met by its delivery, the chain intact.
async fn adjacent_batches_record_as_if_written_one_after_the_other(db: Db) {
    const REQUESTS: usize = 300;
    const BATCH: usize = 30;
    let bus = TestBus::spawn().await;
    let mut settings = ledger_settings(db);
    settings.batch = BATCH;
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let clock = Utc::now();
    // Each request, its copy about one batch later, and its delivery about
    // one batch earlier (even requests) or later (odd ones).
    let apart = BATCH as f64 / 3.0;
    let mut order: Vec<(f64, usize, &str)> = Vec::with_capacity(3 * REQUESTS);
    for i in 0..REQUESTS {
        let at = i as f64;
        order.push((at, i, "request"));
        order.push((at + apart + 0.1, i, "copy"));
        let delivered = if i % 2 == 0 { at - apart } else { at + apart };
        order.push((delivered + 0.2, i, "delivered"));
    }
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let id = |i: usize| format!("00000000-0000-4000-c000-{i:012}");
    for (_, i, what) in &order {
        if *what == "delivered" {
            publish_hop(&amqp, &bus, &hop(&id(*i), Hop::Delivered, DESK, clock)).await;
        } else {
            let e = seeded(
                &id(*i),
                MessageKind::LegalHelpRequest,
                CENTRE,
                DESK,
                clock,
                legal_help_at(&id(*i), clock).payload.unwrap(),
            );
            amqp.publish_envelope(&tap, &e).await;
        }
    }
    eventually("the messages to be queued", || async {
        (amqp.counts(&tap).await.0 == 3 * REQUESTS as u32).then_some(())
    })
    .await;

    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let seen = || recorded_and_repeated(&tracker);
    eventually("every message to be recorded or seen again", || async {
        let (recorded, duplicates) = seen();
        (recorded + duplicates >= 3 * REQUESTS as u64).then_some(())
    })
    .await;
    assert_eq!(
        seen(),
        (2 * REQUESTS as u64, REQUESTS as u64),
        "each request and delivery recorded, each copy seen as a duplicate"
    );
    let settings = tracker.stop().await.0;
    // Everything acked; at most the tracker's own last recorded-through
    // marker, published as it stopped, is left.
    while let Some(left) = amqp.get(&tap).await {
        assert_eq!(
            left.routing_key.as_str(),
            refbus_tracker::record::MARKER_ROUTING_KEY,
            "everything acked"
        );
    }
    let ledger = TestTracker::ledger(&settings).await;
    let count = |sql: &'static str| {
        let pool = ledger.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let requests = REQUESTS as i64;
    assert_eq!(
        count("SELECT COUNT(*) FROM ledger_events").await,
        2 * requests
    );
    assert_eq!(count("SELECT COUNT(*) FROM referrals").await, requests);
    assert_eq!(
        count("SELECT COUNT(*) FROM hops WHERE hop = 'delivered'").await,
        requests
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM obligations WHERE rule = 'CQ-1.1b' AND met_at IS NOT NULL")
            .await,
        requests,
        "every CQ-1.1b obligation met by its delivery, before or after it"
    );
    every_row_keyed_by_its_referral(&ledger).await;
    intact_then_close(ledger, amqp, bus, &settings, 2 * requests, requests).await;
}

on_both_ledgers!(adjacent_batches_record_as_if_written_one_after_the_other);

/// Trackers sharing a ledger record in any order: an answer recorded before
/// the complaint it answers (CQ-3.13, a hearing asked for) meets, when the
/// complaint's obligations come, what it met. Hearing the lawyer meets the
/// hearing and leaves the feedback open; a result meets the feedback and
/// leaves the hearing open.
async fn answers_recorded_before_their_complaint_meet_what_they_answered(db: Db) {
    const DZ_BAR: &str = "dz-bar-committee";
    const DZ_PSB: &str = "dz-psb";
    // Each message in a batch of its own: each answer has committed before
    // its complaint is seen.
    let (bus, settings, amqp, tap) = one_message_per_batch(db).await;
    let at = Utc::now();
    let complaint = |id: &str| {
        seeded(
            id,
            MessageKind::RightsComplaint,
            DZ_BAR,
            DZ_PSB,
            at,
            Payload::RightsComplaint(RightsComplaint {
                complainant: None,
                respondent: CENTRE.into(),
                description: "会见申请被无故拒绝".into(),
                hearing_requested: true,
            }),
        )
    };
    let answer = |id: &str, complaint: &str, outcome: Outcome| Envelope {
        in_reply_to: complaint.into(),
        ..seeded(
            id,
            MessageKind::Feedback,
            DZ_PSB,
            DZ_BAR,
            at + Duration::minutes(5),
            Payload::Feedback(Feedback {
                outcome: outcome as i32,
                summary: "已处理".into(),
                ..Feedback::default()
            }),
        )
    };
    let heard = "00000000-0000-4000-d000-000000000001";
    let answered = "00000000-0000-4000-d000-000000000002";
    for envelope in [
        answer(
            "00000000-0000-4000-d000-000000000011",
            heard,
            Outcome::Heard,
        ),
        answer(
            "00000000-0000-4000-d000-000000000012",
            answered,
            Outcome::Substantiated,
        ),
        complaint(heard),
        complaint(answered),
    ] {
        amqp.publish_envelope(&tap, &envelope).await;
    }
    eventually("the messages to be queued", || async {
        (amqp.counts(&tap).await.0 == 4).then_some(())
    })
    .await;

    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let cq_3_13 = |s: &ReferralStatus, met_by: &str| {
        s.obligations
            .iter()
            .find(|o| o.rule == "CQ-3.13" && o.id.ends_with(&format!("/{met_by}")))
            .and_then(|o| ObligationState::try_from(o.state).ok())
    };
    for (complaint, met, open) in [
        (heard, "hearing", "feedback"),
        (answered, "feedback", "hearing"),
    ] {
        let s = eventually("the complaint and its obligations", || async {
            status(&tracker, DZ_BAR, complaint)
                .await
                .filter(|s| cq_3_13(s, met).is_some() && cq_3_13(s, open).is_some())
        })
        .await;
        assert_eq!(
            cq_3_13(&s, met),
            Some(ObligationState::MetOnTime),
            "CQ-3.13: the {met}, met by the answer recorded before the complaint"
        );
        assert_eq!(
            cq_3_13(&s, open),
            Some(ObligationState::Open),
            "CQ-3.13: an answer that met the {met} leaves the {open} open"
        );
    }
    let settings = tracker.stop().await.0;
    let ledger = TestTracker::ledger(&settings).await;
    every_row_keyed_by_its_referral(&ledger).await;
    intact_then_close(ledger, amqp, bus, &settings, 4, 4).await;
}

on_both_ledgers!(answers_recorded_before_their_complaint_meet_what_they_answered);

/// A relay recorded before the lead it passes on (DZ-7(2), trackers
/// sharing a ledger record in any order): its hop and the handling organ's
/// obligations, filed under the lead, wait keyed at 0 (migration 0005)
/// and move to the lead's time when the lead comes; the lead's status then
/// shows them, and the relayed hop meets what it met.
async fn a_relay_recorded_before_its_lead_is_filed_under_it_when_it_comes(db: Db) {
    const DZ_COURT: &str = "dz-court";
    const HIGH_COURT: &str = "cq-high-court";
    let (bus, settings, amqp, tap) = one_message_per_batch(db).await;
    let at = Utc::now();
    let lead_id = "00000000-0000-4000-e000-000000000001";
    let payload = Payload::MisconductLead(MisconductLead {
        subject: Some(Subject::Officer(JudicialOfficer {
            name: "王某".into(),
            organ: HIGH_COURT.into(),
            position: "审判员".into(),
        })),
        description: "与律师私下会面".into(),
        route: vec![
            RouteHop {
                agency: DZ_COURT.into(),
                duty: Duty::RelayUp as i32,
            },
            RouteHop {
                agency: HIGH_COURT.into(),
                duty: Duty::Handle as i32,
            },
        ],
        found_by: BUREAU.into(),
        route_rule: "DZ-7(2)".into(),
        ..MisconductLead::default()
    });
    let lead = seeded(
        lead_id,
        MessageKind::MisconductLead,
        BUREAU,
        DZ_COURT,
        at,
        payload.clone(),
    );
    let relay = Envelope {
        relay_of: lead_id.into(),
        ..seeded(
            "00000000-0000-4000-e000-000000000002",
            MessageKind::MisconductLead,
            DZ_COURT,
            HIGH_COURT,
            at + Duration::minutes(10),
            payload,
        )
    };
    // Each twice, a batch apart: a relay has no referral row of its own
    // and is told new by its `relayed` hop (migration 0006).
    for envelope in [&relay, &lead, &relay, &lead] {
        amqp.publish_envelope(&tap, envelope).await;
    }
    eventually("the messages to be queued", || async {
        (amqp.counts(&tap).await.0 == 4).then_some(())
    })
    .await;

    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let s = eventually("the lead with the relay's obligations", || async {
        status(&tracker, BUREAU, lead_id)
            .await
            .filter(|s| s.obligations.iter().any(|o| o.bearer == HIGH_COURT))
    })
    .await;
    assert!(
        s.timeline
            .iter()
            .any(|h| h.hop == Hop::Relayed as i32 && h.agency == DZ_COURT),
        "the relayed hop, recorded first, is on the lead's timeline: {:?}",
        s.timeline
    );
    let relayed_by_court: Vec<_> = s
        .obligations
        .iter()
        .filter(|o| o.bearer == DZ_COURT && o.id.ends_with("/relayed"))
        .collect();
    assert!(
        !relayed_by_court.is_empty(),
        "DZ-7: the relay bears passing the lead on: {:?}",
        s.obligations
    );
    for o in &relayed_by_court {
        assert_eq!(
            ObligationState::try_from(o.state),
            Ok(ObligationState::MetOnTime),
            "DZ-7: the relay, recorded before the lead, meets the duty to pass it on: {o:?}"
        );
    }
    let (settings, ledger) = settled_at(
        tracker,
        (2, 2),
        "each recorded once, each repeat a duplicate",
    )
    .await;
    every_row_keyed_by_its_referral(&ledger).await;
    let relayed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM hops WHERE hop = 'relayed'")
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
    assert_eq!(relayed, 1, "the relay repeated is one hop");
    // Two events, the repeats none; one envelope row: a relay is filed
    // under its lead.
    intact_then_close(ledger, amqp, bus, &settings, 2, 1).await;
}

on_both_ledgers!(a_relay_recorded_before_its_lead_is_filed_under_it_when_it_comes);

/// A connection to a new ledger migrated through the migrations before
/// `first_not_run` only (the files of `services/tracker/migrations/` whose
/// names sort before it, e.g. "0005"), as an older tracker left it.
async fn migrated_before(
    settings: &refbus_tracker::TrackerSettings,
    first_not_run: &str,
) -> sqlx::AnyConnection {
    use sqlx::{Connection, Executor};
    let migrations = refbus_tests::repo_root().join("services/tracker/migrations");
    let folder = settings.data_dir.join(format!("before-{first_not_run}"));
    std::fs::create_dir_all(&folder).unwrap();
    for file in std::fs::read_dir(&migrations).unwrap() {
        let name = file.unwrap().file_name();
        if name.to_string_lossy().as_ref() < first_not_run {
            std::fs::copy(migrations.join(&name), folder.join(&name)).unwrap();
        }
    }
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&settings.database().unwrap())
        .await
        .unwrap();
    if let Some(schema) = &settings.database_schema {
        conn.execute(format!("CREATE SCHEMA \"{schema}\"").as_str())
            .await
            .unwrap();
        conn.execute(format!("SET search_path TO \"{schema}\"").as_str())
            .await
            .unwrap();
    }
    sqlx::migrate::Migrator::new(folder.as_path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    conn
}

/// A ledger recorded before hops said what they meet (migration 0002):
/// its hops meet, after the migration, what their names said.
async fn hops_recorded_before_the_meets_column_meet_what_their_name_says(db: Db) {
    use sqlx::Connection;
    let settings = ledger_settings(db);
    let mut conn = migrated_before(&settings, "0002").await;
    for hop in [
        "submitted",
        "delivered",
        "acknowledged",
        "answered",
        "relayed",
        "overdue_notified",
    ] {
        sqlx::query("INSERT INTO hops (referral_id, hop, agency, at, message_id) VALUES ('r', $1, 'a', 1, $2)")
            .bind(hop)
            .bind(format!("m-{hop}"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn.close().await.unwrap();

    let ledger = TestTracker::ledger(&settings).await;
    let meets: BTreeMap<String, String> = sqlx::query_as("SELECT hop, meets FROM hops")
        .fetch_all(&ledger.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let expected: BTreeMap<String, String> = [
        ("submitted", ""),
        ("delivered", "delivered"),
        ("acknowledged", "acknowledged"),
        ("answered", "feedback"),
        ("relayed", "relayed"),
        ("overdue_notified", ""),
    ]
    .into_iter()
    .map(|(h, m)| (h.to_owned(), m.to_owned()))
    .collect();
    assert_eq!(meets, expected);
    ledger.close().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(hops_recorded_before_the_meets_column_meet_what_their_name_says);

/// A ledger recorded before migration 0005: each hop, reply right,
/// obligation and overdue notice comes out keyed by its referral's time,
/// a row whose referral is not recorded at 0, and the status, the deadline
/// engine's look-ups and the notices' join find them.
async fn rows_recorded_before_migration_0005_are_keyed_by_their_referrals_time(db: Db) {
    use sqlx::{Connection, Executor};
    let settings = ledger_settings(db);
    let mut conn = migrated_before(&settings, "0005").await;
    const SUBMITTED: i64 = 1_767_225_600_000;
    for sql in [
        format!(
            "INSERT INTO referrals VALUES ('r', 'legal_help_request', '{CENTRE}', '{DESK}', '', 'dz', 'dz', {SUBMITTED}, {SUBMITTED}, 1, '')"
        ),
        format!(
            "INSERT INTO hops VALUES ('r', 'delivered', '{DESK}', {SUBMITTED}, 'm1', 'delivered')"
        ),
        format!(
            "INSERT INTO hops VALUES ('unrecorded', 'delivered', '{DESK}', 1, 'm2', 'delivered')"
        ),
        format!("INSERT INTO reply_rights VALUES ('r', '{DESK}', 'receive')"),
        format!(
            "INSERT INTO obligations VALUES ('r/CQ-1.1b/delivered', 'r', 'CQ-1.1b', 'legal_help_request', 'd', '{CENTRE}', '{DESK}', 'delivered', {SUBMITTED}, {SUBMITTED}, NULL, {SUBMITTED}, '{CENTRE}')"
        ),
        format!(
            "INSERT INTO overdue_notices VALUES ('n', 'r/CQ-1.1b/delivered', '{CENTRE}', NULL)"
        ),
    ] {
        conn.execute(sql.as_str()).await.unwrap();
    }
    conn.close().await.unwrap();

    let ledger = TestTracker::ledger(&settings).await;
    let keys = |sql: &'static str| {
        let pool = ledger.pool.clone();
        async move {
            sqlx::query_as::<_, (i64, String)>(sql)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        keys("SELECT referral_at, referral_id FROM hops ORDER BY referral_at").await,
        [(0, "unrecorded".to_owned()), (SUBMITTED, "r".to_owned())],
        "a hop of a recorded referral at its time, one of an unrecorded one at 0"
    );
    for sql in [
        "SELECT referral_at, referral_id FROM reply_rights",
        "SELECT referral_at, referral_id FROM obligations",
        "SELECT referral_at, referral_id FROM overdue_notices",
    ] {
        assert_eq!(keys(sql).await, [(SUBMITTED, "r".to_owned())], "{sql}");
    }
    assert_eq!(
        ledger.reply_rights(&["r"]).await.unwrap(),
        [("r".to_owned(), DESK.to_owned(), "receive".to_owned())],
        "the rights found through the referral"
    );
    // The overdue notice still finds its obligation (the deadline engine's join).
    let joined: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM overdue_notices n JOIN obligations o ON o.referral_at = n.referral_at
           AND o.referral_id = n.referral_id AND o.id = n.obligation_id",
    )
    .fetch_one(&ledger.pool)
    .await
    .unwrap();
    assert_eq!(joined, 1);
    ledger.close().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(rows_recorded_before_migration_0005_are_keyed_by_their_referrals_time);

/// A ledger recorded before migration 0006, when an envelope's id was
/// indexed twice: its events keep their chain, an envelope it holds is
/// still told a repeat (by its `referrals` row), and the events' message
/// ids are no longer indexed (only `seq` is).
async fn events_recorded_before_migration_0006_keep_their_chain_and_their_envelopes_repeats(
    db: Db,
) {
    use base64::Engine;
    use refbus_tracker::ledger::{chain_hash, sha256_hex};
    use sqlx::{Connection, Executor};
    let (bus, settings, amqp, tap) = one_message_per_batch(db).await;
    let at = Utc::now();
    let held = seeded(
        "00000000-0000-4000-e000-000000000601",
        MessageKind::LegalHelpRequest,
        CENTRE,
        DESK,
        at,
        legal_help_at("x", at).payload.unwrap(),
    );
    let later = seeded(
        "00000000-0000-4000-e000-000000000602",
        MessageKind::LegalHelpRequest,
        CENTRE,
        DESK,
        at,
        legal_help_at("y", at).payload.unwrap(),
    );
    let mut conn = migrated_before(&settings, "0006").await;
    let encoded = held.encode_to_vec();
    let body =
        serde_json::json!({"id": held.id, "envelope_sha256": sha256_hex(&encoded)}).to_string();
    let millis = at.timestamp_millis();
    let hash = chain_hash(
        1,
        &held.id,
        "legal_help_request",
        &held.id,
        millis,
        &body,
        "",
    );
    for sql in [
        format!(
            "INSERT INTO referrals VALUES ('{id}', 'legal_help_request', '{CENTRE}', '{DESK}', '', 'dz', 'dz', {millis}, {millis}, 1, '{envelope}')",
            id = held.id,
            envelope = base64::engine::general_purpose::STANDARD.encode(&encoded),
        ),
        format!(
            "INSERT INTO ledger_events VALUES (1, '{id}', 'legal_help_request', '{id}', {millis}, '{body}', '', '{hash}')",
            id = held.id,
        ),
        format!("UPDATE ledger_head SET seq = 1, hash = '{hash}' WHERE id = 1"),
    ] {
        conn.execute(sql.as_str()).await.unwrap();
    }
    conn.close().await.unwrap();

    for envelope in [&held, &later] {
        amqp.publish_envelope(&tap, envelope).await;
    }
    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let (settings, ledger) = settled_at(
        tracker,
        (1, 1),
        "the envelope the old ledger held is a repeat",
    )
    .await;
    let indexed: Vec<String> = match db {
        Db::Sqlite => sqlx::query_scalar(
            "SELECT ii.name FROM pragma_index_list('ledger_events') AS il,
                    pragma_index_info(il.name) AS ii ORDER BY ii.name",
        ),
        Db::Postgres => sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = 'ledger_events'::regclass ORDER BY a.attname",
        ),
    }
    .fetch_all(&ledger.pool)
    .await
    .unwrap();
    assert_eq!(
        indexed,
        ["seq"],
        "an envelope's id is indexed in referrals only (chained_id, once message_id, is not)"
    );
    intact_then_close(ledger, amqp, bus, &settings, 2, 2).await;
}

on_both_ledgers!(
    events_recorded_before_migration_0006_keep_their_chain_and_their_envelopes_repeats
);

/// A rolling upgrade of trackers sharing a ledger: a newer tracker has
/// migrated the ledger past this one's code, and this one's rows no longer
/// fit (here: a constraint standing in for the new schema's, and the newer
/// migration's row). It dead-letters nothing and acks nothing: the message
/// waits on the tap, and is recorded once the ledger takes this tracker's
/// rows again.
async fn a_ledger_migrated_past_the_trackers_code_dead_letters_nothing(db: Db) {
    let bus = TestBus::spawn().await;
    let settings = ledger_settings(db);
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let ledger = TestTracker::ledger(&tracker.settings).await;
    let (newer, older) = match db {
        Db::Sqlite => (
            [
                "CREATE TRIGGER newer_schema BEFORE INSERT ON referrals BEGIN SELECT RAISE(ABORT, 'a newer schema'); END",
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99990101000000, 'newer', 1, X'00', 0)",
            ],
            [
                "DROP TRIGGER newer_schema",
                "DELETE FROM _sqlx_migrations WHERE version = 99990101000000",
            ],
        ),
        Db::Postgres => (
            [
                "ALTER TABLE referrals ADD CONSTRAINT newer_schema CHECK (kind = 'none') NOT VALID",
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99990101000000, 'newer', TRUE, '\\x00', 0)",
            ],
            [
                "ALTER TABLE referrals DROP CONSTRAINT newer_schema",
                "DELETE FROM _sqlx_migrations WHERE version = 99990101000000",
            ],
        ),
    };
    for sql in newer {
        sqlx::query(sql).execute(&ledger.pool).await.unwrap();
    }
    let id = "00000000-0000-4000-f000-000000000001";
    let at = Utc::now();
    let envelope = seeded(
        id,
        MessageKind::LegalHelpRequest,
        CENTRE,
        DESK,
        at,
        legal_help_at(id, at).payload.unwrap(),
    );
    amqp.publish_envelope(&tap, &envelope).await;
    // Tried and refused a few times (backoff 100 ms, 200 ms, ...).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let unstorable = || {
        tracker
            .metrics
            .unstorable
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(unstorable(), 0, "nothing dead-lettered for a newer ledger");
    assert!(
        status(&tracker, CENTRE, id).await.is_none(),
        "not recorded while the ledger refuses this tracker's rows"
    );
    for sql in older {
        sqlx::query(sql).execute(&ledger.pool).await.unwrap();
    }
    eventually("the waiting message to be recorded", || async {
        status(&tracker, CENTRE, id).await
    })
    .await;
    assert_eq!(unstorable(), 0);
    let settings = tracker.stop().await.0;
    intact_then_close(ledger, amqp, bus, &settings, 1, 1).await;
}

on_both_ledgers!(a_ledger_migrated_past_the_trackers_code_dead_letters_nothing);

/// The ledger's row encodings (PostgreSQL: binary arrays expanded by
/// `unnest`; SQLite: `VALUES` of `?`) give back exactly what went in, for
/// text that array literals and JSON treat specially.
async fn ledger_rows_round_trip_awkward_text(db: Db) {
    use refbus_tracker::ledger::Value;
    let settings = ledger_settings(db);
    let ledger = TestTracker::ledger(&settings).await;
    let awkward = [
        "",
        "NULL",
        "null",
        "a,b",
        "{x}",
        "\"quoted\"",
        "back\\slash",
        "trailing\\",
        " spaced ",
        "张三 500225199001011234",
        "line\nbreak\ttab",
        "'single'",
    ];
    let rows: Vec<[Value; 6]> = awkward
        .iter()
        .enumerate()
        .map(|(i, text)| {
            [
                Value::Int(0),
                format!("awkward-{i}").into(),
                (*text).into(),
                "dz-duty-desk".into(),
                Value::Int(i64::MAX - i as i64),
                format!("m{i}").into(),
            ]
        })
        .collect();
    const INSERT: &str = "INSERT INTO hops (referral_at, referral_id, hop, agency, at, message_id)";
    let mut tx = ledger.begin_write().await.unwrap();
    tx.insert_rows(INSERT, "ON CONFLICT DO NOTHING", &rows)
        .await
        .unwrap();
    // Again: the conflict clause makes the second insert a no-op.
    tx.insert_rows(INSERT, "ON CONFLICT DO NOTHING", &rows)
        .await
        .unwrap();
    let wanted: Vec<[Value; 1]> = (0..awkward.len())
        .map(|i| [format!("awkward-{i}").into()])
        .collect();
    let got: Vec<(String, String, i64)> = tx
        .fetch_with(
            |ids| format!("SELECT referral_id, hop, at FROM hops WHERE referral_id IN (SELECT column1 FROM {ids} AS v) ORDER BY at DESC"),
            &wanted,
        )
        .await
        .unwrap();
    assert_eq!(got.len(), awkward.len(), "each row once");
    for (i, (referral, hop, at)) in got.into_iter().enumerate() {
        assert_eq!(referral, format!("awkward-{i}"));
        assert_eq!(hop, awkward[i]);
        assert_eq!(at, i64::MAX - i as i64);
    }
    tx.commit().await.unwrap();
    ledger.close().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(ledger_rows_round_trip_awkward_text);
