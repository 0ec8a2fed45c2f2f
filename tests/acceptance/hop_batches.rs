//! Issue 17, hop reports batched: a gateway reports many hops in one signed
//! `HopBatch` (routing key `event.batch`), and the tracker records each hop
//! as it records a single report, with its own id and time. Against the
//! real RabbitMQ, SQLite and PostgreSQL: a burst of acknowledgements costs
//! few publishes and every hop is in the ledger; a batch naming another
//! agency's hop is refused whole; a batch delivered twice is recorded once.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use lapin::options::BasicPublishOptions;
use prost::Message;
use refbus_bus::topology::HOP_BATCH_KEY;
use refbus_core::envelope::{from_timestamp, hop_report_id, timestamp};
use refbus_core::kind::hop_code;
use refbus_core::signing::Signed;
use refbus_proto::v1::{
    AcknowledgeRequest, Hop, HopBatch, HopReport, InboxRequest, ObligationState, ReferralStatus,
};
use refbus_tests::fixtures::{BUREAU, CENTRE, DESK, legal_help_at, submit};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::{Amqp, TestBus, signed_properties, within};
use refbus_tracker::Clock;
use refbus_tracker::audit::{self, Verdict};
use refbus_tracker::ledger::Ledger;

/// Referrals in the burst: as many as one Inbox stream holds (the test
/// settings' prefetch).
const BURST: usize = 50;

/// What the spy saw: (hop messages, the hops they carried).
async fn spied(amqp: &Amqp, queue: &str) -> (usize, Vec<HopReport>) {
    let mut messages = 0;
    let mut hops = Vec::new();
    while let Some(message) = amqp.get(queue).await {
        let key = message.delivery.routing_key.as_str();
        let data = message.delivery.data.as_slice();
        if key == HOP_BATCH_KEY {
            messages += 1;
            hops.extend(HopBatch::decode(data).unwrap().hops);
        } else if key != "event.recorded_through" {
            messages += 1;
            hops.push(HopReport::decode(data).unwrap());
        }
    }
    (messages, hops)
}

fn time(t: Option<&prost_types::Timestamp>) -> DateTime<Utc> {
    from_timestamp(t.unwrap()).unwrap()
}

fn met(s: &ReferralStatus) -> bool {
    s.obligations.iter().any(|o| {
        o.rule == "CQ-1.1b"
            && matches!(
                ObligationState::try_from(o.state),
                Ok(ObligationState::MetOnTime)
            )
    })
}

fn hop_at(s: &ReferralStatus, hop: Hop) -> Option<DateTime<Utc>> {
    s.timeline
        .iter()
        .find(|t| t.hop == hop as i32 && t.agency == DESK)
        .map(|t| time(t.at.as_ref()))
}

async fn count(ledger: &Ledger, sql: &str, bind: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(&ledger.pool)
        .await
        .unwrap()
}

/// How many ledger events record hop `id`: a single report's event (under
/// its id), or a batch's (`hop_batch`, one per delivery, listing each hop
/// it recorded; issue 17). And how many rows of `hops` it has.
async fn hop_recorded(ledger: &Ledger, id: &str) -> (i64, i64) {
    let events = count(
        ledger,
        "SELECT COUNT(*) FROM ledger_events
         WHERE (event = 'hop_report' AND chained_id = $1)
            OR (event = 'hop_batch' AND body LIKE '%\"id\":\"' || $1 || '\"%')",
        id,
    )
    .await;
    let rows = count(
        ledger,
        "SELECT COUNT(*) FROM hops WHERE message_id = $1",
        id,
    )
    .await;
    (events, rows)
}

async fn teardown(amqp: Amqp, tracker: TestTracker, bus: TestBus) {
    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

/// A burst of acknowledgements from one agency (the duty desk, one
/// Acknowledge call per delivery, all at once): far fewer hop messages
/// reach the tap than hops, and every hop is in the ledger with its own
/// time (delivered when handed over, acknowledged when acknowledged) and
/// meets what it meets (CQ-1.1b, met by delivery).
async fn a_burst_of_acknowledgements_costs_few_publishes(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let amqp = Amqp::connect().await;
    // A copy of every hop message (and the tracker's markers) on the bus.
    let spy = amqp.spy(&bus, "event.#").await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut referrals = Vec::with_capacity(BURST);
    for i in 0..BURST {
        let receipt = centre
            .submit(submit(legal_help_at(
                &format!("burst-{i}"),
                Utc::now() - Duration::hours(1),
            )))
            .await
            .unwrap()
            .into_inner();
        referrals.push(receipt.id);
    }
    let desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = desk
        .clone()
        .inbox(InboxRequest {
            agency: DESK.into(),
            window: BURST as u32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut tokens = Vec::with_capacity(BURST);
    for _ in 0..BURST {
        let delivery = within("an inbox delivery", inbox.message()).await;
        tokens.push(delivery.unwrap().unwrap().delivery_token);
    }
    // Every delivery was handed over before this; every acknowledgement
    // comes after it (to the ledger's millisecond).
    let handed_by = Utc::now();
    let acks = tokens.into_iter().map(|token| {
        let mut desk = desk.clone();
        async move {
            desk.acknowledge(AcknowledgeRequest {
                agency: DESK.into(),
                delivery_token: token,
                ..AcknowledgeRequest::default()
            })
            .await
            .unwrap();
        }
    });
    within("the acknowledgements", futures_util::future::join_all(acks)).await;

    let handed_ms = handed_by.timestamp_millis();
    for id in &referrals {
        let s = eventually("each referral delivered, acknowledged and met", || async {
            let s = tracker.status(CENTRE, id).await.ok()?;
            (met(&s) && hop_at(&s, Hop::Acknowledged).is_some()).then_some(s)
        })
        .await;
        let delivered = hop_at(&s, Hop::Delivered).expect("delivered hop");
        let acknowledged = hop_at(&s, Hop::Acknowledged).expect("acknowledged hop");
        assert!(
            delivered.timestamp_millis() <= handed_ms
                && acknowledged.timestamp_millis() >= handed_ms,
            "each hop its own time: delivered {delivered}, acknowledged {acknowledged}, handed by {handed_by}"
        );
        let o = s.obligations.iter().find(|o| o.rule == "CQ-1.1b").unwrap();
        assert_eq!(
            time(o.met_at.as_ref()),
            delivered,
            "CQ-1.1b met when delivered"
        );
    }

    let (messages, hops) = spied(&amqp, &spy).await;
    let ids: HashSet<&str> = hops.iter().map(|h| h.id.as_str()).collect();
    let expected: HashSet<String> = referrals
        .iter()
        .flat_map(|r| {
            [Hop::Delivered, Hop::Acknowledged].map(|h| hop_report_id(r, hop_code(h), DESK))
        })
        .collect();
    assert_eq!(
        ids,
        expected.iter().map(String::as_str).collect(),
        "every hop published once, under its own id"
    );
    assert_eq!(hops.len(), 2 * BURST, "no hop published twice");
    eprintln!(
        "hop traffic: {} hops of {BURST} referrals in {messages} publishes ({:.3} per referral)",
        hops.len(),
        messages as f64 / BURST as f64
    );
    assert!(
        messages * 4 <= hops.len(),
        "{} hops in {messages} publishes: far fewer publishes than hops",
        hops.len()
    );
    let ledger = TestTracker::ledger(&tracker.settings).await;
    for id in &expected {
        assert_eq!(
            hop_recorded(&ledger, id).await,
            (1, 1),
            "each hop in one ledger event and one row of hops"
        );
    }
    let batch_events = count(
        &ledger,
        "SELECT COUNT(*) FROM ledger_events WHERE event = 'hop_batch' OR event = $1",
        "hop_report",
    )
    .await;
    assert!(
        batch_events <= i64::try_from(messages).unwrap(),
        "one ledger event per delivery of hops, not per hop: {batch_events} events for {messages} publishes"
    );
    let verdict = audit::verify(&ledger).await.unwrap();
    assert!(matches!(verdict, Verdict::Intact { .. }), "{verdict}");
    ledger.close().await;
    teardown(amqp, tracker, bus).await;
}

on_both_ledgers!(a_burst_of_acknowledgements_costs_few_publishes);

fn report(referral: &str, hop: Hop, agency: &str) -> HopReport {
    HopReport {
        id: hop_report_id(referral, hop_code(hop), agency),
        referral_id: referral.into(),
        hop: hop as i32,
        agency: agency.into(),
        at: Some(timestamp(Utc::now())),
    }
}

/// Publishes a batch onto the bus as a gateway would (broker credentials),
/// signed by `signer`, and waits for the broker's confirm.
async fn publish_batch(amqp: &Amqp, bus: &TestBus, signer: &str, hops: Vec<HopReport>) -> Vec<u8> {
    let body = HopBatch { hops }.encode_to_vec();
    amqp.channel
        .basic_publish(
            bus.shared
                .bus
                .topology()
                .deliveries_exchange()
                .as_str()
                .into(),
            HOP_BATCH_KEY.into(),
            BasicPublishOptions::default(),
            &body,
            signed_properties(signer, Signed::HopBatch, &body),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    body
}

/// A raw AMQP connection whose publishes wait for the broker's confirm.
async fn confirmed_amqp() -> Amqp {
    let amqp = Amqp::connect().await;
    amqp.channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    amqp
}

/// A referral from the centre to the desk, recorded by the tracker.
async fn referral(bus: &TestBus, tracker: &TestTracker, key: &str) -> String {
    let id = bus
        .gateway_as("detention-centre", CENTRE)
        .await
        .submit(submit(legal_help_at(key, Utc::now() - Duration::hours(1))))
        .await
        .unwrap()
        .into_inner()
        .id;
    eventually("the referral recorded", || async {
        tracker.status(CENTRE, &id).await.ok()
    })
    .await;
    id
}

/// The reason the dead-letter queue gives for the message of these bytes.
async fn dead_letter_reason(amqp: &Amqp, bus: &TestBus, body: &[u8]) -> String {
    let queue = bus.shared.bus.topology().dead_letter();
    within("the batch dead-lettered", async {
        loop {
            match amqp.get(&queue).await {
                Some(m) if m.delivery.data == body => {
                    return refbus_bus::subscription::header_text(
                        &m.delivery.properties,
                        "x-refbus-reason",
                    )
                    .unwrap_or_default();
                }
                Some(_) => {}
                None => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    })
    .await
}

/// A batch signed by the duty desk that also names the justice bureau's
/// hop is refused whole, and so is one signed by the desk naming only the
/// bureau's hops (the bureau's key does not verify it): nothing of either
/// is recorded, while the desk's own batch after them is.
async fn a_batch_naming_another_agencys_hop_is_refused(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let amqp = confirmed_amqp().await;
    let id = referral(&bus, &tracker, "mixed").await;

    let mixed = vec![
        HopReport {
            id: uuid::Uuid::now_v7().to_string(),
            ..report(&id, Hop::Delivered, DESK)
        },
        report(&id, Hop::Acknowledged, BUREAU),
    ];
    let refused: Vec<String> = mixed.iter().map(|h| h.id.clone()).collect();
    let body = publish_batch(&amqp, &bus, DESK, mixed).await;
    let reason = dead_letter_reason(&amqp, &bus, &body).await;
    assert!(reason.contains("more than one agency"), "{reason}");

    let theirs = vec![report(&id, Hop::Answered, BUREAU)];
    let forged: Vec<String> = theirs.iter().map(|h| h.id.clone()).collect();
    let body = publish_batch(&amqp, &bus, DESK, theirs).await;
    let reason = dead_letter_reason(&amqp, &bus, &body).await;
    assert!(reason.contains("forged or altered"), "{reason}");

    // The desk's own hops, after them on the tap: once these are in, the
    // refused batches were seen.
    publish_batch(
        &amqp,
        &bus,
        DESK,
        vec![
            report(&id, Hop::Delivered, DESK),
            report(&id, Hop::Acknowledged, DESK),
        ],
    )
    .await;
    let s = eventually("the desk's own batch recorded", || async {
        let s = tracker.status(CENTRE, &id).await.ok()?;
        (hop_at(&s, Hop::Acknowledged).is_some() && met(&s)).then_some(s)
    })
    .await;
    assert!(
        s.timeline.iter().all(|t| t.agency != BUREAU),
        "nothing of the bureau's: {:?}",
        s.timeline
    );
    let ledger = TestTracker::ledger(&tracker.settings).await;
    for hop in refused.iter().chain(&forged) {
        assert_eq!(
            hop_recorded(&ledger, hop).await,
            (0, 0),
            "a hop of a refused batch is not in the ledger"
        );
    }
    assert_eq!(
        count(
            &ledger,
            "SELECT COUNT(*) FROM hops WHERE agency = $1",
            BUREAU
        )
        .await,
        0,
        "no hop of the bureau's"
    );
    assert_eq!(
        count(
            &ledger,
            "SELECT COUNT(*) FROM hops WHERE referral_id = $1",
            &id
        )
        .await,
        3,
        "submitted, and the desk's own two hops: nothing of the refused batches"
    );
    ledger.close().await;
    teardown(amqp, tracker, bus).await;
}

on_both_ledgers!(a_batch_naming_another_agencys_hop_is_refused);

/// The same signed batch delivered twice (and one of its hops once more
/// alone): each hop is recorded once, the chain intact.
async fn a_batch_delivered_twice_is_recorded_once(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let amqp = confirmed_amqp().await;
    let id = referral(&bus, &tracker, "twice").await;
    let hops = vec![
        report(&id, Hop::Delivered, DESK),
        report(&id, Hop::Acknowledged, DESK),
    ];
    publish_batch(&amqp, &bus, DESK, hops.clone()).await;
    publish_batch(&amqp, &bus, DESK, hops.clone()).await;
    refbus_tests::publish_hop(&amqp, &bus, &hops[0]).await;
    let duplicates = eventually("the repeats seen", || async {
        let d = tracker
            .metrics
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed);
        (d >= 3).then_some(d)
    })
    .await;
    assert_eq!(duplicates, 3, "two hops again, one hop a third time");
    let s = tracker.status(CENTRE, &id).await.unwrap();
    assert!(met(&s), "CQ-1.1b met by the delivered hop");
    let ledger = TestTracker::ledger(&tracker.settings).await;
    for hop in &hops {
        assert_eq!(
            hop_recorded(&ledger, &hop.id).await,
            (1, 1),
            "each hop in one ledger event, however often delivered"
        );
    }
    assert_eq!(
        count(
            &ledger,
            "SELECT COUNT(*) FROM hops WHERE referral_id = $1",
            &id
        )
        .await,
        3,
        "submitted, delivered, acknowledged: once each"
    );
    let verdict = audit::verify(&ledger).await.unwrap();
    assert!(matches!(verdict, Verdict::Intact { .. }), "{verdict}");
    ledger.close().await;
    teardown(amqp, tracker, bus).await;
}

on_both_ledgers!(a_batch_delivered_twice_is_recorded_once);
