//! Issue 5: signed envelopes. Everything an agency service publishes is
//! signed with its agency's Ed25519 key (public keys in the directory). A
//! forged, altered or unsigned message, put on the bus by someone holding
//! broker credentials but not the sender's key, is refused by the
//! recipient's `Inbox` and by the tracker: dead-lettered with the reason,
//! and an alert notice to the supervising justice bureau.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use prost::Message;
use refbus_bus::subscription::header_text;
use refbus_core::envelope::timestamp;
use refbus_core::signing::Signed;
use refbus_core::{KindExt, MessageKind};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{Envelope, Hop, HopReport};
use refbus_tests::fixtures::{BUREAU, CENTRE, DESK, legal_help_at, published_legal_help, submit};
use refbus_tests::tracker::{Db, TestTracker, eventually, ledger_settings};
use refbus_tests::{Amqp, Inbox, TestBus, acknowledge, signed_properties, within};
use refbus_tracker::Clock;

async fn publish(
    amqp: &Amqp,
    bus: &TestBus,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let exchange = bus.shared.bus.topology().deliveries_exchange();
    amqp.channel
        .basic_publish(
            exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

fn header(message: &lapin::message::BasicGetMessage, name: &str) -> String {
    header_text(&message.delivery.properties, name).unwrap_or_else(|| panic!("no {name} header"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_and_unsigned_messages_are_refused_dead_lettered_and_reported() {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    let amqp = Amqp::connect().await;
    let to_desk = format!("{DESK}.{}", MessageKind::LegalHelpRequest.code());

    // Forged: claims the detention centre, signed with another agency's key.
    let forged = published_legal_help("forged");
    let body = forged.encode_to_vec();
    publish(
        &amqp,
        &bus,
        &to_desk,
        &body,
        signed_properties("dz-court", Signed::Envelope, &body),
    )
    .await;
    // Altered: signed by the detention centre, then its matter changed.
    let altered = published_legal_help("altered");
    let signed_body = altered.encode_to_vec();
    let mut changed = altered.clone();
    if let Some(Payload::LegalHelpRequest(p)) = &mut changed.payload {
        p.matter = "a different matter".into();
    }
    let body = changed.encode_to_vec();
    publish(
        &amqp,
        &bus,
        &to_desk,
        &body,
        signed_properties(CENTRE, Signed::Envelope, &signed_body),
    )
    .await;
    // Unsigned.
    let unsigned = published_legal_help("unsigned");
    publish(
        &amqp,
        &bus,
        &to_desk,
        &unsigned.encode_to_vec(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
    // Validly signed, but addressed to another desk: replayed onto this
    // desk's routing key. The desk refuses it; the tracker, for which it is
    // a genuine message of the centre, records it.
    let mut elsewhere = published_legal_help("misaddressed");
    elsewhere.recipient = "yb-duty-desk".into();
    let body = elsewhere.encode_to_vec();
    publish(
        &amqp,
        &bus,
        &to_desk,
        &body,
        signed_properties(CENTRE, Signed::Envelope, &body),
    )
    .await;

    // A genuine request, submitted through the service.
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let genuine = centre
        .submit(submit(legal_help_at("genuine", Utc::now())))
        .await
        .unwrap()
        .into_inner();

    // The desk is handed only the genuine one, and acknowledges it.
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let delivery = inbox.next().await;
    assert_eq!(
        delivery.envelope.as_ref().unwrap().id,
        genuine.id,
        "only the genuine request is handed over"
    );
    acknowledge(&mut desk, DESK, delivery.delivery_token).await;

    // A forged hop report: someone claiming the desk answered the request.
    let report = HopReport {
        id: "forged-hop".into(),
        referral_id: genuine.id.clone(),
        hop: Hop::Answered as i32,
        agency: DESK.into(),
        at: Some(timestamp(Utc::now())),
    };
    let body = report.encode_to_vec();
    publish(
        &amqp,
        &bus,
        "event.answered",
        &body,
        signed_properties("dz-court", Signed::HopReport, &body),
    )
    .await;

    // The supervising justice bureau is alerted once per refused message,
    // whether the desk's service or the tracker saw it first.
    let mut bureau = bus.gateway_as("justice-bureau", BUREAU).await;
    let mut alerts_inbox = Inbox::open(&mut bureau, BUREAU).await;
    let mut alerts = BTreeMap::new();
    within("five forgery alerts", async {
        while alerts.len() < 5 {
            let delivery = alerts_inbox.next().await;
            let envelope = delivery.envelope.unwrap();
            assert_eq!(envelope.kind, MessageKind::ForgeryAlert as i32);
            assert_eq!(envelope.recipient, BUREAU);
            let Some(Payload::ForgeryAlert(alert)) = envelope.payload else {
                panic!("not an alert");
            };
            assert!(
                envelope.sender == DESK || envelope.sender == refbus_core::signing::TRACKER_ID,
                "raised by the desk's service or the tracker, signed as such: {}",
                envelope.sender
            );
            assert_eq!(alert.addressed_to, DESK);
            assert!(
                alerts.insert(alert.claimed_id.clone(), alert).is_none(),
                "one alert per refused message"
            );
            acknowledge(&mut bureau, BUREAU, delivery.delivery_token).await;
        }
    })
    .await;
    let reason = |id: &str| alerts[id].reason.clone();
    assert!(
        reason(&forged.id).contains("forged or altered"),
        "{}",
        reason(&forged.id)
    );
    assert!(reason(&forged.id).contains(CENTRE));
    assert!(reason(&altered.id).contains("forged or altered"));
    assert!(reason(&unsigned.id).contains("signature: missing"));
    assert!(
        reason(&elsewhere.id).contains("misaddressed"),
        "{}",
        reason(&elsewhere.id)
    );
    assert!(reason("forged-hop").contains("forged or altered"));
    assert_eq!(alerts[&unsigned.id].claimed_sender, CENTRE);
    assert_eq!(
        alerts["forged-hop"].detected_by,
        refbus_core::signing::TRACKER_ID
    );

    // Every refused copy is in the dead-letter queue with its reason: the
    // three bad envelopes from the desk's inbox and from the tap, the
    // misaddressed one from the inbox, the forged hop report from the tap.
    let dead_letter = bus.shared.bus.topology().dead_letter();
    let mut dead = BTreeSet::new();
    within("eight dead letters", async {
        while dead.len() < 8 {
            match amqp.get(&dead_letter).await {
                Some(message) => {
                    let queue = header(&message, "x-refbus-queue");
                    let reason = header(&message, "x-refbus-reason");
                    let id = match Envelope::decode(message.delivery.data.as_slice()) {
                        Ok(e) if !e.id.is_empty() => e.id,
                        _ => {
                            HopReport::decode(message.delivery.data.as_slice())
                                .unwrap()
                                .id
                        }
                    };
                    assert!(
                        reason.starts_with("signature: ") || reason.starts_with("misaddressed"),
                        "{reason}"
                    );
                    assert!(dead.insert((id, queue.rsplit('.').next().unwrap().to_owned())));
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let expected: BTreeSet<(String, String)> = [
        (forged.id.clone(), DESK),
        (forged.id.clone(), "tap"),
        (altered.id.clone(), DESK),
        (altered.id.clone(), "tap"),
        (unsigned.id.clone(), DESK),
        (unsigned.id.clone(), "tap"),
        (elsewhere.id.clone(), DESK),
        ("forged-hop".to_owned(), "tap"),
    ]
    .into_iter()
    .map(|(id, q)| (id, q.to_owned()))
    .collect();
    assert_eq!(dead, expected);

    // The tracker recorded none of the forgeries: the genuine request is
    // acknowledged but not answered.
    let status = eventually("the acknowledgement to be recorded", || async {
        let status = tracker.status(CENTRE, &genuine.id).await.ok()?;
        status
            .timeline
            .iter()
            .any(|h| h.hop == Hop::Acknowledged as i32)
            .then_some(status)
    })
    .await;
    assert!(
        !status
            .timeline
            .iter()
            .any(|h| h.hop == Hop::Answered as i32),
        "the forged hop report changed nothing"
    );
    for refused in [&forged.id, &altered.id, &unsigned.id] {
        assert_eq!(
            tracker.status(CENTRE, refused).await.unwrap_err().code(),
            tonic::Code::NotFound,
            "a refused message is not in the ledger"
        );
    }
    assert_eq!(
        tracker
            .metrics
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );

    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    refbus_tests::tracker::drop_ledger(&settings).await;
}
