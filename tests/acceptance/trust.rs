//! Issue 16, the tracker under misuse, against the real RabbitMQ, SQLite and
//! PostgreSQL: a reply counts only from whoever received the referral, even
//! when a publisher holds broker credentials and a valid signature
//! (acceptance 1, the tracker's side); one message never stops the ledger
//! (acceptance 3); no false overdue notice after a restart with a backlog
//! or a database outage (acceptance 5).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prost::Message;
use refbus_core::envelope::timestamp;
use refbus_gateway::forgery::alert_recipient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{
    Envelope, Feedback, ForgeryAlert, Hop, HopReport, MessageKind, ObligationState, Outcome,
};
use refbus_tests::fixtures::dz_court_lead as lead;
use refbus_tests::fixtures::{BUREAU, CENTRE, DESK, legal_help_at, submit};
use refbus_tests::proxy::Proxy;
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::{Amqp, TestBus, publish_hop, within};
use refbus_tracker::Clock;
use refbus_tracker::audit::{self, Verdict};
use refbus_tracker::ledger::Ledger;
use sqlx::Row;

/// An agency of another district, on no Dazu lead's route.
const YB_COURT: &str = "yb-court";
/// The handling organ of a Dazu justice bureau's lead on a Dazu judge.
const DZ_COURT: &str = "dz-court";

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A feedback envelope as an agency service would publish it.
fn feedback(sender: &str, recipient: &str, in_reply_to: &str) -> Envelope {
    Envelope {
        id: new_id(),
        kind: MessageKind::Feedback as i32,
        sender: sender.into(),
        recipient: recipient.into(),
        in_reply_to: in_reply_to.into(),
        submitted_at: Some(timestamp(Utc::now())),
        idempotency_key: new_id(),
        payload: Some(Payload::Feedback(Feedback {
            outcome: Outcome::Substantiated as i32,
            summary: "查实".into(),
            ..Feedback::default()
        })),
        ..Envelope::default()
    }
}

fn hop_report(referral: &str, hop: Hop, agency: &str, at: DateTime<Utc>) -> HopReport {
    HopReport {
        id: new_id(),
        referral_id: referral.into(),
        hop: hop as i32,
        agency: agency.into(),
        at: Some(timestamp(at)),
    }
}

/// A legal-help request (CQ-1.1b, 24 h from `asked`) as the centre's
/// service would publish it, for seeding the tap directly.
fn request(id: &str, asked: DateTime<Utc>) -> Envelope {
    Envelope {
        id: id.into(),
        kind: MessageKind::LegalHelpRequest as i32,
        submitted_at: Some(timestamp(asked)),
        ..legal_help_at(id, asked)
    }
}

/// A raw AMQP connection whose publishes wait for the broker's confirm,
/// as a gateway's do: once published, a message is on its queue.
async fn confirmed_amqp() -> Amqp {
    let amqp = Amqp::connect().await;
    amqp.channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    amqp
}

fn header(message: &lapin::message::BasicGetMessage, name: &str) -> String {
    refbus_bus::subscription::header_text(&message.delivery.properties, name).unwrap_or_default()
}

/// Takes `n` messages from the dead-letter queue: id -> (queue, reason).
async fn dead_letters(amqp: &Amqp, bus: &TestBus, n: usize) -> BTreeMap<String, (String, String)> {
    let queue = bus.shared.bus.topology().dead_letter();
    let mut dead = BTreeMap::new();
    within("the dead letters", async {
        while dead.len() < n {
            match amqp.get(&queue).await {
                Some(message) => {
                    let data = message.delivery.data.as_slice();
                    let id = match Envelope::decode(data) {
                        Ok(e) if !e.id.is_empty() => e.id,
                        _ => HopReport::decode(data).unwrap().id,
                    };
                    dead.insert(
                        id,
                        (
                            header(&message, "x-refbus-queue"),
                            header(&message, "x-refbus-reason"),
                        ),
                    );
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    dead
}

/// Reads `queue` empty: the envelopes in it.
async fn drain(amqp: &Amqp, queue: &str) -> Vec<Envelope> {
    let mut envelopes = Vec::new();
    while let Some(message) = amqp.get(queue).await {
        envelopes.push(Envelope::decode(message.delivery.data.as_slice()).unwrap());
    }
    envelopes
}

async fn count(ledger: &Ledger, sql: &str, bind: &str) -> i64 {
    let n: i64 = sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
    n
}

async fn recorded(ledger: &Ledger, message_id: &str) -> bool {
    count(
        ledger,
        "SELECT COUNT(*) FROM ledger_events WHERE chained_id = $1",
        message_id,
    )
    .await
        == 1
}

/// A bus, a tracker on a fresh ledger of `db` with the system clock, a
/// confirmed raw AMQP connection, and the tap's name.
async fn start(db: Db) -> (TestBus, TestTracker, Amqp, String) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let amqp = confirmed_amqp().await;
    let tap = bus.shared.bus.topology().tap_queue();
    (bus, tracker, amqp, tap)
}

/// Closes everything and drops the test's ledger.
async fn teardown(ledger: Ledger, amqp: Amqp, tracker: TestTracker, bus: TestBus) {
    ledger.close().await;
    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

async fn assert_intact(ledger: &Ledger) {
    let verdict = audit::verify(ledger).await.unwrap();
    assert!(matches!(verdict, Verdict::Intact { .. }), "{verdict}");
}

/// Acceptance 1, the tracker's side: `yb-court`, off the route of a lead
/// the Dazu justice bureau found, publishes straight onto the broker, with
/// broker credentials and its own valid signature, a feedback on the lead
/// and "acknowledged" and "answered" hop reports. The tracker refuses all
/// three as it refuses a forgery: not recorded, dead-lettered with the
/// reason, a forgery alert to the supervising justice bureau; the lead
/// keeps its open obligations, and `yb-court` has no hop on it. The
/// handling organ's own acknowledgement, after them, is recorded.
async fn a_reply_from_off_the_route_is_refused_by_the_tracker(db: Db) {
    let (bus, tracker, amqp, tap) = start(db).await;
    let topology = bus.shared.bus.topology().clone();
    let receipt = bus
        .gateway_as("justice-bureau", BUREAU)
        .await
        .submit(submit(lead("off-route")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, DZ_COURT, "DZ-7 (1)");
    let before = eventually("the lead's obligations", || async {
        let s = tracker.status(BUREAU, &receipt.id).await.ok()?;
        (!s.obligations.is_empty()).then_some(s)
    })
    .await;
    let states = |s: &refbus_proto::v1::ReferralStatus| -> Vec<(String, i32)> {
        s.obligations
            .iter()
            .map(|o| (o.rule.clone(), o.state))
            .collect()
    };
    assert!(
        before
            .obligations
            .iter()
            .all(|o| o.state == ObligationState::Open as i32)
    );

    let forged = feedback(YB_COURT, BUREAU, &receipt.id);
    amqp.publish_envelope(&tap, &forged).await;
    let acknowledged = hop_report(&receipt.id, Hop::Acknowledged, YB_COURT, Utc::now());
    let answered = hop_report(&receipt.id, Hop::Answered, YB_COURT, Utc::now());
    publish_hop(&amqp, &bus, &acknowledged).await;
    publish_hop(&amqp, &bus, &answered).await;
    let genuine = hop_report(&receipt.id, Hop::Acknowledged, DZ_COURT, Utc::now());
    publish_hop(&amqp, &bus, &genuine).await;

    let ledger = TestTracker::ledger(&tracker.settings).await;
    eventually("the handling organ's acknowledgement", || async {
        recorded(&ledger, &genuine.id).await.then_some(())
    })
    .await;
    let dead = dead_letters(&amqp, &bus, 3).await;
    let refused: BTreeSet<&str> = [&forged.id, &acknowledged.id, &answered.id]
        .into_iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        dead.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        refused
    );
    for (id, (queue, reason)) in &dead {
        assert_eq!(queue, &tap, "{id}");
        assert!(
            reason.starts_with("a reply counts only from an agency the referral was addressed to")
                && reason.contains("`yb-court` may not")
                && reason.contains(&receipt.id),
            "{reason}"
        );
    }
    assert!(
        dead[&forged.id].1.contains("DZ-8"),
        "feedback: the handling organ's"
    );
    for id in &refused {
        assert!(!recorded(&ledger, id).await, "{id} is not in the ledger");
    }
    assert_eq!(
        count(
            &ledger,
            "SELECT COUNT(*) FROM hops WHERE agency = $1",
            YB_COURT
        )
        .await,
        0,
        "a refused reply makes nobody a party"
    );

    // Alerted as a forgery: the feedback at the bureau supervising the
    // agency it was addressed to, the hop reports at yb-court's.
    let directory = &bus.shared.directory;
    let alert_queues: BTreeSet<String> = [BUREAU, YB_COURT]
        .iter()
        .map(|a| topology.inbox_queue(alert_recipient(directory, a).unwrap()))
        .collect();
    let mut alerts: BTreeMap<String, ForgeryAlert> = BTreeMap::new();
    within("three forgery alerts", async {
        while !refused.iter().all(|id| alerts.contains_key(*id)) {
            for queue in &alert_queues {
                for e in drain(&amqp, queue).await {
                    if let Some(Payload::ForgeryAlert(alert)) = e.payload {
                        alerts.insert(alert.claimed_id.clone(), alert);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for id in &refused {
        assert_eq!(alerts[*id].claimed_sender, YB_COURT);
        assert_eq!(alerts[*id].detected_by, refbus_core::signing::TRACKER_ID);
    }

    let after = tracker.status(BUREAU, &receipt.id).await.unwrap();
    assert_eq!(
        states(&after),
        states(&before),
        "the lead keeps its open obligations"
    );
    assert_eq!(
        tracker
            .metrics
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_intact(&ledger).await;
    teardown(ledger, amqp, tracker, bus).await;
}

on_both_ledgers!(a_reply_from_off_the_route_is_refused_by_the_tracker);

/// A reply that reaches the tracker before its referral (trackers sharing a
/// ledger record in any order) is recorded as it comes; when the referral
/// comes, a reply from an agency with no right to it is refused in the
/// ledger: moved to `refused_replies` with a `reply_refused` event, meeting
/// nothing and on no timeline. The duty desk's early delivery, a party's,
/// still meets the CQ-1.1b duty.
async fn a_reply_recorded_before_its_referral_meets_nothing_unless_from_a_party(db: Db) {
    let (bus, tracker, amqp, tap) = start(db).await;
    let id = new_id();
    let asked = Utc::now() - chrono::Duration::hours(1);
    let answer = feedback(YB_COURT, CENTRE, &id);
    amqp.publish_envelope(&tap, &answer).await;
    let intruder = hop_report(&id, Hop::Delivered, YB_COURT, asked);
    let delivered = hop_report(&id, Hop::Delivered, DESK, asked);
    publish_hop(&amqp, &bus, &intruder).await;
    publish_hop(&amqp, &bus, &delivered).await;
    let ledger = TestTracker::ledger(&tracker.settings).await;
    for early in [&answer.id, &intruder.id, &delivered.id] {
        eventually("the early replies to be recorded", || async {
            recorded(&ledger, early).await.then_some(())
        })
        .await;
    }

    amqp.publish_envelope(&tap, &request(&id, asked)).await;
    eventually("the off-party replies to be refused", || async {
        (count(
            &ledger,
            "SELECT COUNT(*) FROM refused_replies WHERE referral_id = $1",
            &id,
        )
        .await
            == 2)
            .then_some(())
    })
    .await;
    let refused: Vec<(String, String)> =
        sqlx::query("SELECT hop, agency FROM refused_replies WHERE referral_id = $1 ORDER BY hop")
            .bind(&id)
            .fetch_all(&ledger.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("hop"), r.get("agency")))
            .collect();
    assert_eq!(
        refused,
        [
            ("answered".to_owned(), YB_COURT.to_owned()),
            ("delivered".to_owned(), YB_COURT.to_owned())
        ]
    );
    let agencies: BTreeSet<String> =
        sqlx::query_scalar("SELECT agency FROM hops WHERE referral_id = $1")
            .bind(&id)
            .fetch_all(&ledger.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        agencies,
        [CENTRE.to_owned(), DESK.to_owned()].into(),
        "submitted by the centre, delivered to the desk; nothing of yb-court"
    );
    assert_eq!(
        count(
            &ledger,
            "SELECT COUNT(*) FROM ledger_events WHERE event = 'reply_refused' AND referral_id = $1",
            &id
        )
        .await,
        2
    );
    let met = tracker.status(CENTRE, &id).await.unwrap();
    assert_eq!(
        met.obligations
            .iter()
            .find(|o| o.rule == "CQ-1.1b")
            .map(|o| o.state),
        Some(ObligationState::MetOnTime as i32),
        "the desk's early delivery meets CQ-1.1b"
    );
    assert_intact(&ledger).await;
    teardown(ledger, amqp, tracker, bus).await;
}

on_both_ledgers!(a_reply_recorded_before_its_referral_meets_nothing_unless_from_a_party);

/// Acceptance 3, the tracker's side: a feedback whose `in_reply_to` holds a
/// NUL byte, one whose `in_reply_to` is 3 KB, and a hop report whose
/// referral id holds a NUL, each validly signed by the claimed sender and
/// published straight onto the tap, are dead-lettered by the tracker with
/// the reason naming the field (invalid messages, no forgery alert); a
/// legal-help request submitted after them through the gateway is recorded.
async fn poison_values_on_the_tap_cost_those_messages_only(db: Db) {
    let (bus, tracker, amqp, tap) = start(db).await;
    let nul = feedback(DESK, CENTRE, &format!("{}\0", new_id()));
    let long = feedback(DESK, CENTRE, &"7".repeat(3 * 1024));
    let hop = hop_report(&format!("{}\0", new_id()), Hop::Delivered, DESK, Utc::now());
    amqp.publish_envelope(&tap, &nul).await;
    amqp.publish_envelope(&tap, &long).await;
    publish_hop(&amqp, &bus, &hop).await;

    let receipt = bus
        .gateway_as("detention-centre", CENTRE)
        .await
        .submit(submit(legal_help_at("after-the-poison", Utc::now())))
        .await
        .unwrap()
        .into_inner();
    eventually("the request after the poison to be recorded", || async {
        tracker.status(CENTRE, &receipt.id).await.ok()
    })
    .await;
    let dead = dead_letters(&amqp, &bus, 3).await;
    for (id, field) in [
        (&nul.id, "envelope.in_reply_to"),
        (&long.id, "envelope.in_reply_to"),
        (&hop.id, "hop_report.referral_id"),
    ] {
        let (queue, reason) = &dead[id];
        assert_eq!(queue, &tap);
        assert!(
            reason.starts_with(&format!("{field}: not a referral id")),
            "{reason}"
        );
    }
    assert!(
        dead[&long.id].1.contains("(3072 bytes)"),
        "{}",
        dead[&long.id].1
    );
    let ledger = TestTracker::ledger(&tracker.settings).await;
    for id in [&nul.id, &long.id, &hop.id] {
        assert!(!recorded(&ledger, id).await);
    }
    let metrics = &tracker.metrics;
    assert_eq!(
        metrics.invalid.load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(
        metrics.refused.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no forgery"
    );
    teardown(ledger, amqp, tracker, bus).await;
}

on_both_ledgers!(poison_values_on_the_tap_cost_those_messages_only);

/// Acceptance 3, the batch split on its own, against the real PostgreSQL:
/// values that pass every check before storage but that PostgreSQL cannot
/// store (an envelope id of 3.2 KB, over the 2.7 KB of a btree index
/// entry; one with a NUL byte), each in a batch of 500 among 2,000 good
/// messages. The batch is split until each culprit stands alone; each is
/// dead-lettered with the database's reason and counted, everything else
/// is recorded, in order, the chain intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_postgresql_refuses_is_split_until_the_culprit_stands_alone() {
    const GOOD: usize = 2000;
    let bus = TestBus::spawn().await;
    let settings = ledger_settings(Db::Postgres);
    let amqp = confirmed_amqp().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let asked = Utc::now();
    // Random hex, so that PostgreSQL cannot compress it under the limit.
    let too_long: String = (0..50_u8)
        .map(|i| refbus_tracker::ledger::sha256_hex(&[i]))
        .collect();
    let with_nul = format!("{}\0", new_id());
    let mut good = Vec::new();
    for i in 0..GOOD {
        if i == 1250 {
            amqp.publish_envelope(&tap, &request(&too_long, asked))
                .await;
        }
        if i == 1750 {
            amqp.publish_envelope(&tap, &request(&with_nul, asked))
                .await;
        }
        let id = new_id();
        amqp.publish_envelope(&tap, &request(&id, asked)).await;
        good.push(id);
    }
    // Everything is waiting when the tracker starts: after its first
    // batch, each batch is a full 500, the culprits in two of them.
    let started = Instant::now();
    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let ledger = TestTracker::ledger(&tracker.settings).await;
    eventually("the good messages to be recorded", || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM referrals")
            .fetch_one(&ledger.pool)
            .await
            .unwrap();
        (n == i64::try_from(GOOD).unwrap()).then_some(())
    })
    .await;
    println!(
        "{GOOD} messages and 2 that PostgreSQL refuses: all recorded or dead-lettered {:?} after the tracker started",
        started.elapsed()
    );
    let dead = dead_letters(&amqp, &bus, 2).await;
    let (queue, reason) = &dead[&too_long];
    assert_eq!(queue, &tap);
    assert!(
        reason.starts_with("the ledger cannot store it: ") && reason.contains("54000"),
        "{reason}"
    );
    let (_, reason) = &dead[&with_nul];
    assert!(
        reason.starts_with("the ledger cannot store it: ") && reason.contains("22021"),
        "{reason}"
    );
    assert_eq!(
        tracker
            .metrics
            .unstorable
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // In the order they came: the chain's sequence follows the tap's.
    let order: Vec<String> = sqlx::query_scalar(
        "SELECT chained_id FROM ledger_events WHERE event = 'legal_help_request' ORDER BY seq",
    )
    .fetch_all(&ledger.pool)
    .await
    .unwrap();
    assert_eq!(order, good);
    assert_intact(&ledger).await;
    // And recording goes on.
    let receipt = bus
        .gateway_as("detention-centre", CENTRE)
        .await
        .submit(submit(legal_help_at("after-the-split", Utc::now())))
        .await
        .unwrap()
        .into_inner();
    eventually("a request after the split", || async {
        tracker.status(CENTRE, &receipt.id).await.ok()
    })
    .await;
    teardown(ledger, amqp, tracker, bus).await;
}

/// Seeds `n` CQ-1.1b requests the detainees made an hour before `start`
/// (due 23 h after it), and a sentinel no one delivers; waits until the
/// tracker has their obligations. Returns (the requests, the sentinel).
async fn seed_requests(
    amqp: &Amqp,
    bus: &TestBus,
    ledger: &Ledger,
    start: DateTime<Utc>,
    n: usize,
) -> (Vec<String>, String) {
    let tap = bus.shared.bus.topology().tap_queue();
    let asked = start - chrono::Duration::hours(1);
    let ids: Vec<String> = (0..n).map(|_| new_id()).collect();
    let sentinel = new_id();
    for id in ids.iter().chain([&sentinel]) {
        amqp.publish_envelope(&tap, &request(id, asked)).await;
    }
    eventually("the requests' obligations", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM obligations WHERE rule = 'CQ-1.1b' AND met_at IS NULL",
        )
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
        (open == i64::try_from(n).unwrap() + 1).then_some(())
    })
    .await;
    (ids, sentinel)
}

/// Waits until the sentinel is overdue and its notices published (the
/// gate opened), then checks that none of `met` was marked and that the
/// inboxes of the agencies the policy tells hold overdue notices about the
/// sentinel only.
async fn only_the_sentinel_is_overdue(
    amqp: &Amqp,
    bus: &TestBus,
    ledger: &Ledger,
    met: &[String],
    sentinel: &str,
) {
    let notify: String = eventually("the sentinel to be marked overdue and told", || async {
        let row = sqlx::query(
            "SELECT o.notify FROM obligations o
             WHERE o.referral_id = $1 AND o.overdue_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM overdue_notices n
                               WHERE n.obligation_id = o.id AND n.published_at IS NULL)
               AND EXISTS (SELECT 1 FROM overdue_notices n WHERE n.obligation_id = o.id)",
        )
        .bind(sentinel)
        .fetch_optional(&ledger.pool)
        .await
        .unwrap()?;
        Some(row.get::<String, _>("notify"))
    })
    .await;
    for id in met {
        let row = sqlx::query(
            "SELECT met_at, overdue_at FROM obligations WHERE referral_id = $1 AND rule = 'CQ-1.1b'",
        )
        .bind(id)
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
        assert!(row.get::<Option<i64>, _>("met_at").is_some(), "{id} met");
        assert_eq!(
            row.get::<Option<i64>, _>("overdue_at"),
            None,
            "{id} never overdue"
        );
    }
    let told: BTreeSet<String> = notify.split(',').map(str::to_owned).collect();
    assert!(!told.is_empty());
    for agency in &told {
        let about: Vec<String> = drain(amqp, &bus.inbox_queue(agency))
            .await
            .into_iter()
            .filter_map(|e| match e.payload {
                Some(Payload::OverdueNotice(n)) => Some(n.referral_id),
                _ => None,
            })
            .collect();
        assert_eq!(
            about,
            [sentinel.to_owned()],
            "overdue notices in {agency}'s inbox"
        );
    }
}

/// Acceptance 5: the tracker records CQ-1.1b requests and stops. While it
/// is down, a backlog queues on the tap: 2,000 other messages, then the
/// duty desk's deliveries of the requests, an hour after the requests,
/// well before their due time. The clock moves past the due times and the
/// tracker restarts on the same ledger and queue. No overdue notice is
/// sent for any delivered request (the engine waits until the tracker has
/// recorded through the due time); the sentinel, which nobody delivered,
/// is marked overdue and told, so the gate opens.
async fn a_restarted_tracker_with_a_backlog_sends_no_false_overdue_notice(db: Db) {
    const REQUESTS: usize = 5;
    let bus = TestBus::spawn().await;
    let start = Utc::now();
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::manual(start)).await;
    let amqp = confirmed_amqp().await;
    let ledger = TestTracker::ledger(&tracker.settings).await;
    let (ids, sentinel) = seed_requests(&amqp, &bus, &ledger, start, REQUESTS).await;
    let (settings, clock) = tracker.stop().await;

    let delivered = start + chrono::Duration::minutes(5);
    for _ in 0..2000 {
        publish_hop(
            &amqp,
            &bus,
            &hop_report(&new_id(), Hop::Delivered, DESK, delivered),
        )
        .await;
    }
    for id in &ids {
        publish_hop(
            &amqp,
            &bus,
            &hop_report(id, Hop::Delivered, DESK, delivered),
        )
        .await;
    }
    clock.set(start + chrono::Duration::hours(25));
    let tracker = TestTracker::start(&bus, settings, clock).await;
    only_the_sentinel_is_overdue(&amqp, &bus, &ledger, &ids, &sentinel).await;

    teardown(ledger, amqp, tracker, bus).await;
}

on_both_ledgers!(a_restarted_tracker_with_a_backlog_sends_no_false_overdue_notice);

/// Acceptance 3 and 5 during a database outage (a proxy in front of
/// PostgreSQL cuts every connection): the deliveries that meet the duties
/// queue while the ledger is unreachable and the clock passes the due
/// times. Nothing is dead-lettered (the database is down, it refuses no
/// row), and once it is back no overdue notice goes out for a delivered
/// request; the undelivered sentinel is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_database_outage_nothing_is_dead_lettered_and_no_false_overdue_notice() {
    const REQUESTS: usize = 5;
    let bus = TestBus::spawn().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let direct = ledger_settings(Db::Postgres);
    let mut through_proxy = direct.clone();
    let url = refbus_tests::tracker::postgres_url();
    let after_host = url.split_once('@').map_or("", |(_, rest)| rest);
    let database = after_host.split_once('/').map_or("test", |(_, db)| db);
    through_proxy.database_url = Some(format!("postgres://postgres@{}/{database}", proxy.addr));
    let start = Utc::now();
    let tracker = TestTracker::start(&bus, through_proxy, Clock::manual(start)).await;
    let amqp = confirmed_amqp().await;
    let ledger = TestTracker::ledger(&direct).await;
    let (ids, sentinel) = seed_requests(&amqp, &bus, &ledger, start, REQUESTS).await;

    proxy.cut();
    let delivered = start + chrono::Duration::minutes(5);
    for id in &ids {
        publish_hop(
            &amqp,
            &bus,
            &hop_report(id, Hop::Delivered, DESK, delivered),
        )
        .await;
    }
    tracker.clock.set(start + chrono::Duration::hours(25));
    // The outage lasts: ingest and the engine fail and retry meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    only_the_sentinel_is_overdue(&amqp, &bus, &ledger, &ids, &sentinel).await;
    let (dead, _) = amqp.counts(&bus.shared.bus.topology().dead_letter()).await;
    assert_eq!(dead, 0, "nothing dead-lettered while the database was down");
    assert_eq!(
        tracker
            .metrics
            .unstorable
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    ledger.close().await;
    amqp.close().await;
    tracker.stop().await;
    bus.stop().await;
    drop_ledger(&direct).await;
}
