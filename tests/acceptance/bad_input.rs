//! Issue 5: bad input at scale. 10,000 random byte strings published to an
//! agency's routing key reach both the agency's inbox and the tracker's tap;
//! every copy of every one of them ends in the dead-letter queue, and every
//! service keeps running: a genuine request submitted afterwards is
//! delivered and recorded.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use refbus_core::{KindExt, MessageKind};
use refbus_proto::v1::InboxRequest;
use refbus_tests::fixtures::{CENTRE, DESK, legal_help, submit};
use refbus_tests::tracker::{Db, TestTracker, eventually, ledger_settings};
use refbus_tests::{Amqp, Inbox, TestBus};
use refbus_tracker::Clock;

const STRINGS: usize = 10_000;

/// A deterministic stream of random bytes (xorshift64*), so that a failure
/// can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A byte string of 0 to 1,024 random bytes.
    fn bytes(&mut self) -> Vec<u8> {
        let len = usize::try_from(self.next() % 1025).unwrap();
        (0..len).map(|_| self.next().to_le_bytes()[3]).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_byte_strings_all_end_in_the_dead_letter_queue() {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;

    // Published with confirms, on the routing key of a legal-help request
    // to the duty desk: a copy in its inbox and one in the tap.
    let amqp = Amqp::connect().await;
    amqp.channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let exchange = bus.shared.bus.topology().deliveries_exchange();
    let routing_key = format!("{DESK}.{}", MessageKind::LegalHelpRequest.code());
    let mut random = Random(0x5eed_0fba_5e00_u64);
    let mut sent: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut confirms = Vec::with_capacity(STRINGS);
    for _ in 0..STRINGS {
        let bytes = random.bytes();
        confirms.push(
            amqp.channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &bytes,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
        );
        *sent.entry(bytes).or_default() += 2;
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }

    // Every copy reaches the dead-letter queue, with a reason and the
    // queue it came from.
    let dead_letter = bus.shared.bus.topology().dead_letter();
    let reader = amqp.connection.create_channel().await.unwrap();
    let mut consumer = reader
        .basic_consume(
            dead_letter.as_str().into(),
            "bad-input".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut from_queue: HashMap<String, usize> = HashMap::new();
    let expected = 2 * STRINGS;
    let mut received = 0;
    // A bound, not a timing assertion: the services dead-letter one message
    // at a time, each with a confirmed publish.
    tokio::time::timeout(Duration::from_secs(180), async {
        while received < expected {
            let delivery = consumer.next().await.unwrap().unwrap();
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            assert!(
                headers.inner().contains_key("x-refbus-reason"),
                "every dead letter says why"
            );
            let queue =
                refbus_bus::subscription::header_text(&delivery.properties, "x-refbus-queue")
                    .unwrap();
            *from_queue.entry(queue).or_default() += 1;
            let left = sent
                .get_mut(&delivery.data)
                .expect("a dead letter is one of the strings sent, unchanged");
            *left -= 1;
            received += 1;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{received} of {expected} dead letters after 180 s"));
    assert!(
        sent.values().all(|&left| left == 0),
        "both copies of every string"
    );
    assert_eq!(from_queue[&bus.inbox_queue(DESK)], STRINGS);
    assert_eq!(from_queue[&bus.shared.bus.topology().tap_queue()], STRINGS);
    println!(
        "bad input: {STRINGS} random byte strings, {expected} copies dead-lettered ({} from the desk's inbox, {} from the tap)",
        from_queue[&bus.inbox_queue(DESK)],
        from_queue[&bus.shared.bus.topology().tap_queue()]
    );

    // Every service still runs: a genuine request is delivered on the same
    // stream and recorded, and each agency service opens an inbox.
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let genuine = centre
        .submit(submit(legal_help("after-random-bytes")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.next().await.envelope.unwrap().id, genuine.id);
    eventually("the genuine request to be recorded", || async {
        tracker.status(CENTRE, &genuine.id).await.ok()
    })
    .await;
    for (service, agency) in [
        ("detention-centre", CENTRE),
        ("case-unit", "dz-court"),
        ("legal-aid", DESK),
        ("justice-bureau", "dz-justice-bureau"),
        ("bar-association", "cq-bar-association"),
    ] {
        let mut client = bus.gateway_as(service, agency).await;
        client
            .inbox(InboxRequest {
                agency: agency.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{service} still serves: {e}"));
    }

    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    refbus_tests::tracker::drop_ledger(&settings).await;
}
