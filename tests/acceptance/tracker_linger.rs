//! Issue 17, the tracker's batches under a light load: a batch that is not
//! full waits `REFBUS_TRACKER_LINGER` after its first delivery for more,
//! so that messages coming a little apart share one transaction instead
//! of one commit each. Against the real RabbitMQ and SQLite.

use chrono::{Duration, Utc};
use prometheus_client::registry::Registry;
use refbus_tests::TestBus;
use refbus_tests::fixtures::{CENTRE, legal_help_at, submit};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tracker::Clock;

/// (batches recorded, batches of more than one delivery), read off the
/// tracker's `refbus_tracker_batch_deliveries` histogram.
fn batches(tracker: &TestTracker) -> (u64, u64) {
    let mut registry = Registry::default();
    registry.register(
        "batch_deliveries",
        "deliveries per batch",
        tracker.metrics.batch_deliveries.clone(),
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |sample: &str| refbus_tests::metric_sample(&text, sample) as u64;
    let count = value("batch_deliveries_count");
    let single = value("batch_deliveries_bucket{le=\"1.0\"}");
    (count, count - single)
}

/// Two referrals submitted 300 ms apart, with a linger of 2 s, are
/// recorded in one batch (without the linger the first is recorded alone,
/// long before the second comes); both are in the ledger, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_load_shares_one_transaction_within_the_linger() {
    let bus = TestBus::spawn().await;
    let mut settings = ledger_settings(Db::Sqlite);
    settings.linger = std::time::Duration::from_secs(2);
    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    // The tracker's own markers (one at start) may come first: wait until
    // they are recorded, so that the referrals start a batch of their own.
    eventually("the start-up marker recorded", || async {
        (batches(&tracker).0 > 0).then_some(())
    })
    .await;
    let (_, multi_before) = batches(&tracker);
    let mut ids = Vec::new();
    for key in ["linger-a", "linger-b"] {
        let receipt = centre
            .submit(submit(legal_help_at(
                key,
                Utc::now() - Duration::minutes(1),
            )))
            .await
            .unwrap()
            .into_inner();
        ids.push(receipt.id);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    for id in &ids {
        eventually("each referral recorded", || async {
            tracker.status(CENTRE, id).await.ok().map(|_| ())
        })
        .await;
    }
    let (_, multi_after) = batches(&tracker);
    assert!(
        multi_after > multi_before,
        "the two referrals, 300 ms apart, shared a batch within the 2 s linger"
    );
    let ledger = refbus_tests::tracker::TestTracker::ledger(&tracker.settings).await;
    let events: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM ledger_events WHERE chained_id IN (?, ?)")
            .bind(&ids[0])
            .bind(&ids[1])
            .fetch_one(&ledger.pool)
            .await
            .unwrap();
    assert_eq!(events, 2, "each recorded once");
    ledger.close().await;
    let (settings, _) = tracker.stop().await;
    drop_ledger(&settings).await;
}
