//! Issue 17, envelopes batched on the wire: under load, the envelopes of one
//! route (routing key and CC) that wait behind a publish in flight go out
//! as one `refbus.v1.EnvelopeBatch` message, still through the deliveries
//! exchange, so that the broker's fan-out puts every one in the inbox and
//! in the tracker's tap alike. Each envelope keeps its own signature and
//! is judged on its own wherever it arrives. Against the real RabbitMQ and
//! SQLite: a burst of submissions costs few publishes and every referral is
//! handed over and recorded once; a plain AMQP publisher's batch holding a
//! forgery, a misaddressed envelope and bytes that are no envelope among
//! genuine ones has each refused alone, the genuine ones delivered and
//! recorded; a batch that cannot be unpacked is dead-lettered whole while
//! other traffic flows; an inbox stream's window counts envelopes, not AMQP
//! messages; a stream closed half-way through a batch loses nothing and
//! hands nothing acknowledged over again.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use prost::Message;
use refbus_bus::Topology;
use refbus_bus::subscription::{
    ENVELOPE_BATCH_CONTENT_TYPE, ENVELOPE_BATCH_TYPE, MAX_BATCH_ENVELOPES, QUEUE_HEADER,
    REASON_HEADER, header_text,
};
use refbus_core::signing::{
    DIGEST_INDEX_HEADER, DIGESTS_HEADER, DIGESTS_SIGNATURE_HEADER, SIGNATURE_HEADER, Signed,
    development_signature, digest_list,
};
use refbus_proto::v1::{
    Envelope, EnvelopeBatch, SignedEnvelope, SubmitBatchRequest, submit_result,
};
use refbus_tests::fixtures::{BUREAU, CENTRE, DESK, legal_help, published_legal_help};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::{Amqp, TestBus, acknowledge_all, inbox_stream, metric_sample, within};
use refbus_tracker::Clock;
use refbus_tracker::audit::{self, Verdict};
use refbus_tracker::ledger::Ledger;

const KIND: &str = "legal_help_request";

/// The desk's routing key for legal-help requests.
fn desk_key() -> String {
    Topology::routing_key(DESK, KIND)
}

/// A bus, a tracker recording on SQLite, and raw AMQP access.
struct World {
    bus: TestBus,
    tracker: TestTracker,
    amqp: Amqp,
}

impl World {
    async fn start() -> Self {
        let bus = TestBus::spawn().await;
        let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
        let amqp = Amqp::connect().await;
        Self { bus, tracker, amqp }
    }

    async fn stop(self, ledger: Ledger) {
        ledger.close().await;
        self.amqp.close().await;
        let settings = self.tracker.stop().await.0;
        self.bus.stop().await;
        drop_ledger(&settings).await;
    }
}

/// `envelope` as an item of a batch, signed by `signer`'s development key.
fn signed_by(envelope: &Envelope, signer: &str) -> SignedEnvelope {
    let body = envelope.encode_to_vec();
    SignedEnvelope {
        signature: development_signature(signer, Signed::Envelope, &body),
        envelope: body,
        id: envelope.id.clone(),
        kind: KIND.into(),
    }
}

/// `envelopes` as a batch signed once by `signer`: no signature per
/// envelope, one over their digests.
fn signed_once(envelopes: &[&Envelope], signer: &str) -> EnvelopeBatch {
    let items: Vec<SignedEnvelope> = envelopes
        .iter()
        .map(|e| SignedEnvelope {
            signature: String::new(),
            ..signed_by(e, signer)
        })
        .collect();
    let digests = digest_list(items.iter().map(|i| i.envelope.as_slice()));
    EnvelopeBatch {
        envelopes: items,
        digests_signature: development_signature(signer, Signed::EnvelopeDigests, &digests),
        digests,
    }
}

/// Publishes `body` as an `envelope_batch` message on the deliveries
/// exchange under `key`, as a plain AMQP publisher holding broker
/// credentials would.
async fn publish_batch_bytes(amqp: &Amqp, bus: &TestBus, key: &str, body: &[u8]) {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_type(ENVELOPE_BATCH_TYPE.into())
        .with_content_type(ENVELOPE_BATCH_CONTENT_TYPE.into());
    amqp.publish_on_bus(bus, key, body, properties).await;
}

async fn publish_batch(amqp: &Amqp, bus: &TestBus, key: &str, envelopes: Vec<SignedEnvelope>) {
    let body = EnvelopeBatch {
        envelopes,
        ..EnvelopeBatch::default()
    }
    .encode_to_vec();
    publish_batch_bytes(amqp, bus, key, &body).await;
}

/// Every dead letter now in the queue: (the queue it came from, its
/// reason, its body, its properties).
async fn dead_letters(
    amqp: &Amqp,
    bus: &TestBus,
) -> Vec<(String, String, Vec<u8>, BasicProperties)> {
    let queue = bus.shared.bus.topology().dead_letter();
    let mut all = Vec::new();
    while let Some(message) = amqp.get(&queue).await {
        let properties = message.delivery.properties.clone();
        all.push((
            header_text(&properties, QUEUE_HEADER).unwrap_or_default(),
            header_text(&properties, REASON_HEADER).unwrap_or_default(),
            message.delivery.data.clone(),
            properties,
        ));
    }
    all
}

/// Waits until the dead-letter queue holds `count` messages.
async fn dead_lettered(amqp: &Amqp, bus: &TestBus, count: u32) {
    let queue = bus.shared.bus.topology().dead_letter();
    within("the dead letters", async {
        while amqp.counts(&queue).await.0 < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

async fn events_of(ledger: &Ledger, id: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM ledger_events WHERE chained_id = $1")
        .bind(id)
        .fetch_one(&ledger.pool)
        .await
        .unwrap()
}

/// Takes `count` deliveries from `agency`'s stream: (ids, tokens).
async fn take(
    stream: &mut tonic::Streaming<refbus_proto::v1::Delivery>,
    count: usize,
) -> (Vec<String>, Vec<String>) {
    let mut ids = Vec::with_capacity(count);
    let mut tokens = Vec::with_capacity(count);
    within("the deliveries", async {
        while ids.len() < count {
            let delivery = stream.message().await.unwrap().unwrap();
            ids.push(delivery.envelope.unwrap().id);
            tokens.push(delivery.delivery_token);
        }
    })
    .await;
    (ids, tokens)
}

async fn nothing_more(stream: &mut tonic::Streaming<refbus_proto::v1::Delivery>, what: &str) {
    if let Ok(Ok(Some(delivery))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        panic!(
            "{what}: {} handed over",
            delivery.envelope.map(|e| e.id).unwrap_or_default()
        );
    }
}

/// Ends `stream` once it has handed over all there was: nothing more comes
/// (`what`), `tokens` are acknowledged, the stream closes, and `inbox`
/// holds nothing unsettled after.
async fn acknowledge_and_settle(
    amqp: &Amqp,
    desk: &mut refbus_proto::v1::gateway_client::GatewayClient<tonic::transport::Channel>,
    mut stream: tonic::Streaming<refbus_proto::v1::Delivery>,
    tokens: Vec<String>,
    inbox: &str,
    what: &str,
) {
    nothing_more(&mut stream, what).await;
    acknowledge_all(desk, DESK, tokens).await;
    drop(stream);
    assert_eq!(
        amqp.settled_count(inbox).await,
        0,
        "{what}: every message settled"
    );
}

/// A burst of 200 referrals in one `SubmitBatch` (each on `Submit`'s own
/// path, all at once): far fewer AMQP messages reach the route than
/// envelopes, each envelope once; every referral is handed over to the desk
/// once and recorded by the tracker once, the chain intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_submissions_travels_in_few_messages_and_each_arrives_once() {
    const BURST: usize = 200;
    let world = World::start().await;
    let (bus, tracker, amqp) = (&world.bus, &world.tracker, &world.amqp);
    let spy = amqp.spy(bus, &desk_key()).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let response = centre
        .submit_batch(SubmitBatchRequest {
            envelopes: (0..BURST)
                .map(|i| legal_help(&format!("wire-burst-{i}")))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = response
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(submit_result::Result::Receipt(receipt)) => receipt.id,
            other => panic!("not a receipt: {other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), BURST);

    // On the wire: few messages, every envelope once, each with its
    // sender's signature.
    let mut messages = 0;
    let mut carried = Vec::new();
    within("the burst on the spy", async {
        while carried.len() < BURST {
            let Some(message) = amqp.get(&spy).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            messages += 1;
            let properties = &message.delivery.properties;
            if properties.kind().as_ref().map(|k| k.as_str()) == Some(ENVELOPE_BATCH_TYPE) {
                let batch = EnvelopeBatch::decode(message.delivery.data.as_slice()).unwrap();
                // Signed once, by the centre, over the envelopes' digests.
                let bodies = batch.envelopes.iter().map(|e| e.envelope.as_slice());
                assert_eq!(batch.digests, digest_list(bodies), "the envelopes' digests");
                assert_eq!(
                    batch.digests_signature,
                    development_signature(CENTRE, Signed::EnvelopeDigests, &batch.digests),
                    "the batch signed once by its sender"
                );
                for item in batch.envelopes {
                    assert!(item.signature.is_empty(), "no signature per envelope");
                    carried.push(Envelope::decode(item.envelope.as_slice()).unwrap().id);
                }
            } else {
                assert!(header_text(properties, SIGNATURE_HEADER).is_some());
                carried.push(
                    Envelope::decode(message.delivery.data.as_slice())
                        .unwrap()
                        .id,
                );
            }
        }
    })
    .await;
    eprintln!("{BURST} envelopes in {messages} AMQP messages");
    assert_eq!(
        carried.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>(),
        "every envelope on the wire"
    );
    assert_eq!(carried.len(), BURST, "none twice");
    assert!(
        messages * 4 <= BURST,
        "{BURST} envelopes in {messages} messages: batched"
    );
    let scrape = bus.shared.telemetry.encode();
    assert!(metric_sample(&scrape, "refbus_bus_envelope_batches_total") >= 1.0);
    assert!(metric_sample(&scrape, "refbus_bus_batched_envelopes_total") >= (BURST / 2) as f64);

    // The desk gets each once.
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut stream = inbox_stream(&mut desk, DESK, 50).await;
    let mut handed = Vec::new();
    while handed.len() < BURST {
        let (got, tokens) = take(&mut stream, 50.min(BURST - handed.len())).await;
        assert_eq!(
            tokens.iter().collect::<HashSet<_>>().len(),
            tokens.len(),
            "a token per envelope"
        );
        acknowledge_all(&mut desk, DESK, tokens).await;
        handed.extend(got);
    }
    assert_eq!(
        handed.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    nothing_more(&mut stream, "nothing handed over twice").await;
    drop(stream);
    assert_eq!(amqp.settled_count(&bus.inbox_queue(DESK)).await, 0);

    // The tracker recorded each once, from its own copy.
    let ledger = TestTracker::ledger(&tracker.settings).await;
    for id in &ids {
        eventually("the referral recorded", || async {
            (events_of(&ledger, id).await == 1).then_some(())
        })
        .await;
    }
    let verdict = audit::verify(&ledger).await.unwrap();
    assert!(matches!(verdict, Verdict::Intact { .. }), "{verdict}");
    world.stop(ledger).await;
}

/// A plain AMQP publisher holding broker credentials and the centre's key
/// publishes one batch on the desk's route: two genuine requests around a
/// forgery (the centre's claim, the court's key), a request the centre
/// genuinely signed for the justice bureau, bytes that are no envelope and
/// an item with no signature, then a genuine one under a 3 KB id label and
/// a NUL kind label. The desk gets the two genuine ones; the
/// inbox refuses each of the others alone, with its reason; the tracker
/// records the genuine ones and refuses what is not signed by its sender;
/// a dead-lettered item is an envelope alone, replayable as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_batch_is_judged_envelope_by_envelope() {
    let world = World::start().await;
    let (bus, amqp) = (&world.bus, &world.amqp);
    let inbox = bus.inbox_queue(DESK);
    let tap = bus.shared.bus.topology().tap_queue();

    let first = published_legal_help("hostile-first");
    let forged = published_legal_help("hostile-forged");
    let mut elsewhere = published_legal_help("hostile-elsewhere");
    elsewhere.recipient = BUREAU.into();
    let last = published_legal_help("hostile-last");
    let unsigned = published_legal_help("hostile-unsigned");
    let mut unsigned_item = signed_by(&unsigned, CENTRE);
    unsigned_item.signature.clear();
    let garbage = b"\0\xff\xfe not an envelope".to_vec();
    publish_batch(
        amqp,
        bus,
        &desk_key(),
        vec![
            signed_by(&first, CENTRE),
            signed_by(&forged, "dz-court"),
            signed_by(&elsewhere, CENTRE),
            SignedEnvelope {
                signature: development_signature(CENTRE, Signed::Envelope, &garbage),
                envelope: garbage,
                id: "hostile-garbage".into(),
                kind: KIND.into(),
            },
            unsigned_item,
            // Labels are not believed: a 3 KB id and a NUL kind change
            // nothing for the genuine envelope they label.
            SignedEnvelope {
                id: "x".repeat(3000),
                kind: "\0".into(),
                ..signed_by(&last, CENTRE)
            },
        ],
    )
    .await;

    let ledger = only_the_genuine_reach_the_desk(&world, [&first, &last], &elsewhere).await;
    // The inbox refused four, the tracker three (it records an envelope
    // its sender signed wherever it was addressed, and the garbage, the
    // forgery and the unsigned item are refused there too).
    dead_lettered(amqp, bus, 7).await;
    let letters = dead_letters(amqp, bus).await;
    let from = |queue: &str| -> Vec<&(String, String, Vec<u8>, BasicProperties)> {
        letters.iter().filter(|l| l.0 == queue).collect()
    };
    let reasons =
        |queue: &str| -> Vec<String> { from(queue).iter().map(|l| l.1.clone()).collect() };
    let inbox_reasons = reasons(&inbox);
    assert_eq!(inbox_reasons.len(), 4, "{inbox_reasons:?}");
    for expected in [
        "forged or altered",
        "misaddressed",
        "not a refbus.v1.Envelope",
        "unsigned",
    ] {
        assert!(
            inbox_reasons.iter().any(|r| r.contains(expected)),
            "`{expected}` among the inbox's reasons {inbox_reasons:?}"
        );
    }
    let tap_reasons = reasons(&tap);
    assert_eq!(tap_reasons.len(), 3, "{tap_reasons:?}");
    for id in [&forged.id, &unsigned.id] {
        assert_eq!(events_of(&ledger, id).await, 0, "refused, not recorded");
    }
    // A dead letter is the item alone: its envelope's bytes, its own
    // signature header, its id and kind, replayable as one envelope.
    let forged_copy = from(&inbox)
        .into_iter()
        .find(|l| l.1.contains("forged or altered"))
        .unwrap();
    let envelope = Envelope::decode(forged_copy.2.as_slice()).unwrap();
    assert_eq!(envelope.id, forged.id);
    assert_eq!(
        header_text(&forged_copy.3, SIGNATURE_HEADER),
        Some(development_signature(
            "dz-court",
            Signed::Envelope,
            &forged_copy.2
        ))
    );
    assert_eq!(
        forged_copy.3.message_id().as_ref().map(|m| m.to_string()),
        Some(forged.id.clone())
    );
    assert_eq!(
        forged_copy.3.kind().as_ref().map(|k| k.to_string()),
        Some(KIND.to_owned())
    );

    world.stop(ledger).await;
}

/// The desk's inbox hands over `genuine`, in order, and nothing else, and
/// every message on its queue settles (acked or dead-lettered); the tracker
/// records each of them and `misaddressed` (genuinely signed by its sender,
/// for another agency) once. Returns the tracker's ledger.
async fn only_the_genuine_reach_the_desk(
    world: &World,
    genuine: [&Envelope; 2],
    misaddressed: &Envelope,
) -> Ledger {
    let (bus, amqp) = (&world.bus, &world.amqp);
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut stream = inbox_stream(&mut desk, DESK, 10).await;
    let (ids, tokens) = take(&mut stream, 2).await;
    assert_eq!(
        ids,
        genuine.map(|e| e.id.clone()),
        "the genuine ones, in order"
    );
    // Every message settled: every item acked or dead-lettered.
    acknowledge_and_settle(
        amqp,
        &mut desk,
        stream,
        tokens,
        &bus.inbox_queue(DESK),
        "nothing refused is handed over",
    )
    .await;
    let ledger = TestTracker::ledger(&world.tracker.settings).await;
    for envelope in genuine.iter().chain([&misaddressed]) {
        eventually("what its sender signed recorded", || async {
            (events_of(&ledger, &envelope.id).await == 1).then_some(())
        })
        .await;
    }
    ledger
}

/// The reasons of the dead letters from `queue`.
fn reasons_from(
    letters: &[(String, String, Vec<u8>, BasicProperties)],
    queue: &str,
) -> Vec<String> {
    letters
        .iter()
        .filter(|l| l.0 == queue)
        .map(|l| l.1.clone())
        .collect()
}

/// Issue 17, batches signed once: a plain AMQP publisher holding broker
/// credentials and the centre's key publishes, on the desk's route, a batch
/// the centre signed once (two genuine requests around one changed after
/// signing, one claiming the court as sender, and one genuinely signed for
/// the justice bureau), then a batch whose list the court signed for
/// envelopes that claim the centre. The desk gets the two genuine ones; the
/// inbox refuses the others each alone, with its reason; the tracker
/// records what its sender signed and refuses the rest. The misaddressed
/// one's dead letter keeps its proof (its entry, the list and the list's
/// signature, and no signature of its own), and published alone with it
/// to the bureau it is believed there, as the original was; with its index,
/// its list or one of the three headers changed, it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_signed_once_believes_each_envelope_by_its_entry_alone() {
    let world = World::start().await;
    let (bus, amqp) = (&world.bus, &world.amqp);
    let inbox = bus.inbox_queue(DESK);
    let bureau_inbox = bus.inbox_queue(BUREAU);
    let tap = bus.shared.bus.topology().tap_queue();

    let first = published_legal_help("once-first");
    let altered = published_legal_help("once-altered");
    let mut by_court = published_legal_help("once-court");
    by_court.sender = "dz-court".into();
    let mut elsewhere = published_legal_help("once-elsewhere");
    elsewhere.recipient = BUREAU.into();
    let last = published_legal_help("once-last");
    let mut batch = signed_once(&[&first, &altered, &by_court, &elsewhere, &last], CENTRE);
    // Changed after the list was signed: its digest is no longer its entry.
    let mut changed = altered.clone();
    changed.idempotency_key.push('!');
    batch.envelopes[1].envelope = changed.encode_to_vec();
    publish_batch_bytes(amqp, bus, &desk_key(), &batch.encode_to_vec()).await;
    // The court's signature over a list of envelopes that claim the centre.
    let forged_a = published_legal_help("once-forged-a");
    let forged_b = published_legal_help("once-forged-b");
    let mut forged = signed_once(&[&forged_a, &forged_b], CENTRE);
    forged.digests_signature = signed_once(&[&forged_a, &forged_b], "dz-court").digests_signature;
    publish_batch_bytes(amqp, bus, &desk_key(), &forged.encode_to_vec()).await;

    let ledger = only_the_genuine_reach_the_desk(&world, [&first, &last], &elsewhere).await;
    // The inbox refused five (altered, the court's, misaddressed, the two
    // forged), the tracker four (it records the misaddressed one).
    dead_lettered(amqp, bus, 9).await;
    let letters = dead_letters(amqp, bus).await;
    let reasons = |queue: &str| reasons_from(&letters, queue);
    let inbox_reasons = reasons(&inbox);
    assert_eq!(inbox_reasons.len(), 5, "{inbox_reasons:?}");
    let count =
        |reasons: &[String], what: &str| reasons.iter().filter(|r| r.contains(what)).count();
    assert_eq!(
        count(&inbox_reasons, "not entry 1 of the digest list"),
        1,
        "{inbox_reasons:?}"
    );
    assert_eq!(
        count(&inbox_reasons, "public key of `dz-court`"),
        1,
        "{inbox_reasons:?}"
    );
    assert_eq!(
        count(&inbox_reasons, &format!("public key of `{CENTRE}`")),
        2,
        "the forged list: {inbox_reasons:?}"
    );
    assert_eq!(
        count(&inbox_reasons, "misaddressed"),
        1,
        "{inbox_reasons:?}"
    );
    let tap_reasons = reasons(&tap);
    assert_eq!(tap_reasons.len(), 4, "{tap_reasons:?}");
    for id in [&altered.id, &by_court.id, &forged_a.id, &forged_b.id] {
        assert_eq!(events_of(&ledger, id).await, 0, "refused, not recorded");
    }

    // The misaddressed one's dead letter: its bytes alone and its proof.
    let misaddressed = letters
        .iter()
        .find(|l| l.0 == inbox && l.1.contains("misaddressed"))
        .unwrap();
    assert_eq!(misaddressed.2, elsewhere.encode_to_vec());
    let properties = &misaddressed.3;
    assert_eq!(header_text(properties, SIGNATURE_HEADER), None);
    assert_eq!(
        header_text(properties, DIGESTS_SIGNATURE_HEADER),
        Some(batch.digests_signature.clone())
    );
    assert_eq!(
        header_text(properties, DIGEST_INDEX_HEADER).as_deref(),
        Some("3")
    );
    let digests = header_text(properties, DIGESTS_HEADER).unwrap();

    // Published alone to the bureau, with its proof headers, changed or not.
    let alone = |index: &str, digests: &str, with_signature: bool| {
        let mut headers = lapin::types::FieldTable::default();
        let mut put = |name: &str, value: &str| {
            headers.insert(
                name.into(),
                lapin::types::AMQPValue::LongString(value.as_bytes().to_vec().into()),
            );
        };
        if with_signature {
            put(DIGESTS_SIGNATURE_HEADER, &batch.digests_signature);
        }
        put(DIGESTS_HEADER, digests);
        put(DIGEST_INDEX_HEADER, index);
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(elsewhere.id.as_str().into())
            .with_headers(headers)
    };
    let bureau_key = Topology::routing_key(BUREAU, KIND);
    let body = elsewhere.encode_to_vec();
    let mut flipped = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&digests)
            .unwrap()
    };
    flipped[0] ^= 1; // entry 0, not its own: the list's signature fails
    let flipped = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&flipped)
    };
    for properties in [
        alone("2", &digests, true),
        alone("3", &flipped, true),
        alone("3", &digests, false),
        alone("3", &digests, true),
    ] {
        amqp.publish_on_bus(bus, &bureau_key, &body, properties)
            .await;
    }
    let mut bureau = bus.gateway_as("justice-bureau", BUREAU).await;
    let mut stream = inbox_stream(&mut bureau, BUREAU, 50).await;
    // The bureau also gets the forgery alerts about the desk's inbox.
    within("the replayed envelope at the bureau", async {
        loop {
            let delivery = stream.message().await.unwrap().unwrap();
            let envelope = delivery.envelope.unwrap();
            acknowledge_all(&mut bureau, BUREAU, vec![delivery.delivery_token]).await;
            if envelope.id == elsewhere.id {
                assert_eq!(
                    envelope, elsewhere,
                    "believed by its entry, as the original"
                );
                break;
            }
            assert!(
                matches!(
                    envelope.payload,
                    Some(refbus_proto::v1::envelope::Payload::ForgeryAlert(_))
                ),
                "only forgery alerts besides it: {envelope:?}"
            );
        }
    })
    .await;
    drop(stream);
    // Refused by the bureau's inbox and by the tracker alike.
    dead_lettered(amqp, bus, 6).await;
    let letters = dead_letters(amqp, bus).await;
    assert_eq!(reasons_from(&letters, &tap).len(), 3, "{letters:?}");
    let bureau_reasons: Vec<String> = letters
        .iter()
        .filter(|l| l.0 == bureau_inbox)
        .map(|l| l.1.clone())
        .collect();
    assert_eq!(bureau_reasons.len(), 3, "{bureau_reasons:?}");
    for expected in [
        "not entry 2 of the digest list",
        &format!("public key of `{CENTRE}`"),
        "malformed batch proof: one of the three headers is missing",
    ] {
        assert_eq!(
            count(&bureau_reasons, expected),
            1,
            "`{expected}` among {bureau_reasons:?}"
        );
    }
    assert_eq!(
        events_of(&ledger, &elsewhere.id).await,
        1,
        "still recorded once"
    );

    world.stop(ledger).await;
}

/// Batches that cannot be unpacked (bytes that are no `EnvelopeBatch`, an
/// empty one, one over [`MAX_BATCH_ENVELOPES`], one signed once whose
/// digest list is not one entry per envelope) are dead-lettered whole,
/// with the reason, from the inbox and from the tap, and nothing of them
/// is handed over; a genuine request published after them arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_be_unpacked_is_dead_lettered_whole() {
    let world = World::start().await;
    let (bus, tracker, amqp) = (&world.bus, &world.tracker, &world.amqp);
    let inbox = bus.inbox_queue(DESK);
    let tap = bus.shared.bus.topology().tap_queue();

    publish_batch_bytes(amqp, bus, &desk_key(), b"\xff\xff\xff\xff not a batch").await;
    publish_batch(amqp, bus, &desk_key(), Vec::new()).await;
    let one = signed_by(&published_legal_help("too-many"), CENTRE);
    publish_batch(amqp, bus, &desk_key(), vec![one; MAX_BATCH_ENVELOPES + 1]).await;
    // Signed once, with a digest list one entry short of its envelopes.
    let short = published_legal_help("short-list");
    let mut short_list = signed_once(&[&short, &published_legal_help("short-list-2")], CENTRE);
    short_list.digests.truncate(32);
    publish_batch_bytes(amqp, bus, &desk_key(), &short_list.encode_to_vec()).await;
    let after = published_legal_help("after-the-bad-batches");
    publish_batch(amqp, bus, &desk_key(), vec![signed_by(&after, CENTRE)]).await;

    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut stream = inbox_stream(&mut desk, DESK, 10).await;
    let (ids, tokens) = take(&mut stream, 1).await;
    assert_eq!(ids, std::slice::from_ref(&after.id));
    acknowledge_and_settle(
        amqp,
        &mut desk,
        stream,
        tokens,
        &inbox,
        "nothing of a bad batch",
    )
    .await;

    let ledger = TestTracker::ledger(&tracker.settings).await;
    eventually("the good one recorded", || async {
        (events_of(&ledger, &after.id).await == 1).then_some(())
    })
    .await;
    dead_lettered(amqp, bus, 8).await;
    let letters = dead_letters(amqp, bus).await;
    assert_eq!(letters.len(), 8, "four from each queue, whole");
    for queue in [&inbox, &tap] {
        let reasons: Vec<&str> = letters
            .iter()
            .filter(|l| &l.0 == queue)
            .map(|l| l.1.as_str())
            .collect();
        assert_eq!(reasons.len(), 4, "{queue}: {reasons:?}");
        for expected in [
            "not a refbus.v1.EnvelopeBatch",
            "no envelope",
            "over the limit of 1000",
            "digest list holds 32 bytes, not 32 for each of its 2 envelopes",
        ] {
            assert!(
                reasons.iter().any(|r| r.contains(expected)),
                "{queue}: `{expected}` among {reasons:?}"
            );
        }
    }
    for letter in &letters {
        assert_eq!(
            letter.3.kind().as_ref().map(|k| k.to_string()),
            Some(ENVELOPE_BATCH_TYPE.to_owned()),
            "dead-lettered whole, as it came"
        );
    }
    for refused in [published_legal_help("too-many"), short] {
        assert_eq!(events_of(&ledger, &refused.id).await, 0);
    }

    world.stop(ledger).await;
}

/// Publishes `n` legal-help requests to the desk in one signed AMQP batch
/// message, ids `{name}-0` .. ; returns their envelope ids in order.
async fn publish_requests_in_one_batch(
    amqp: &Amqp,
    bus: &TestBus,
    n: usize,
    name: &str,
) -> Vec<String> {
    let requests: Vec<Envelope> = (0..n)
        .map(|i| published_legal_help(&format!("{name}-{i}")))
        .collect();
    publish_batch(
        amqp,
        bus,
        &desk_key(),
        requests.iter().map(|e| signed_by(e, CENTRE)).collect(),
    )
    .await;
    requests.iter().map(|e| e.id.clone()).collect()
}

/// Issue 17: a batch handed over is all in the stream's channel at once
/// (a slot for each delivery the window allows). A careless client that
/// reads three of twenty and closes the stream loses none of them: the
/// seventeen it never read, queued for the transport, go back with the
/// three it read, and a new stream hands over all twenty, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_closed_after_reading_part_of_a_batch_loses_none_of_what_it_did_not_read() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let inbox = bus.inbox_queue(DESK);
    let expected = publish_requests_in_one_batch(&amqp, &bus, 20, "unread").await;

    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut stream = inbox_stream(&mut desk, DESK, 20).await;
    let (ids, _) = take(&mut stream, 3).await;
    assert_eq!(ids, expected[..3]);
    drop(stream);

    let mut stream = inbox_stream(&mut desk, DESK, 20).await;
    let (ids, tokens) = take(&mut stream, 20).await;
    assert_eq!(ids, expected, "all twenty again, in order");
    acknowledge_and_settle(&amqp, &mut desk, stream, tokens, &inbox, "each once").await;
    amqp.close().await;
    bus.stop().await;
}

/// One AMQP message carrying ten requests, and a stream with a window of 2:
/// the stream holds at most two unacknowledged, whatever the prefetch
/// counts. Closed after five are acknowledged and a sixth handed over, it
/// loses nothing: a new stream hands over the other five, none of the
/// acknowledged ones again, and the batch settles once all ten are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_counts_envelopes_and_a_closed_stream_loses_none_of_a_batch() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let inbox = bus.inbox_queue(DESK);
    let expected = publish_requests_in_one_batch(&amqp, &bus, 10, "window").await;

    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut stream = inbox_stream(&mut desk, DESK, 2).await;
    let mut acknowledged = Vec::new();
    let (ids, mut tokens) = take(&mut stream, 2).await;
    assert_eq!(ids, expected[..2]);
    nothing_more(&mut stream, "the window is full at two").await;
    assert!(
        tokens.iter().all(|t| t.contains('.')),
        "a token names its envelope: {tokens:?}"
    );
    acknowledge_all(&mut desk, DESK, vec![tokens.remove(0)]).await;
    acknowledged.push(ids[0].clone());
    let mut held = ids[1].clone();
    let mut held_token = tokens.remove(0);
    while acknowledged.len() < 5 {
        let (next, mut next_token) = take(&mut stream, 1).await;
        nothing_more(&mut stream, "still two at most").await;
        acknowledge_all(&mut desk, DESK, vec![held_token]).await;
        acknowledged.push(held);
        held = next[0].clone();
        held_token = next_token.remove(0);
    }
    assert_eq!(acknowledged, expected[..5]);
    // The sixth is handed over, not acknowledged, and the stream closes.
    assert_eq!(held, expected[5]);
    drop(stream);
    assert_eq!(
        amqp.settled_count(&inbox).await,
        1,
        "the batch is back in the queue, whole"
    );

    let mut stream = inbox_stream(&mut desk, DESK, 10).await;
    let (ids, tokens) = take(&mut stream, 5).await;
    assert_eq!(ids, expected[5..], "the rest, and none acknowledged again");
    acknowledge_and_settle(
        &amqp,
        &mut desk,
        stream,
        tokens,
        &inbox,
        "none acknowledged again",
    )
    .await;
    amqp.close().await;
    bus.stop().await;
}
