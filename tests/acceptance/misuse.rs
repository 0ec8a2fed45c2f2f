//! Issue 16, trust under misuse, the gateway's half: no reply without
//! receipt (DOMAIN.md, Confidentiality; DZ-6), no loss from a careless
//! client, delivery tokens that survive a channel the broker closed, bad
//! reply ids refused at the edge, and the dead-letter queue an operator
//! can list and replay. Against the real RabbitMQ (and SQLite ledger).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use prost::Message;
use refbus_core::envelope::envelope_id;
use refbus_proto::v1::Outcome;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::{
    AcknowledgeRequest, Delivery, Envelope, Feedback, FeedbackRequest, Hop, RelayRequest,
};
use refbus_tests::broker::BrokerNode;
use refbus_tests::fixtures::dz_court_lead as lead;
use refbus_tests::fixtures::{BUREAU, legal_help, submit};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::{Amqp, Inbox, TestBus, acknowledge, inbox_stream, test_settings, within};
use refbus_tracker::Clock;
use tonic::Code;
use tonic::transport::Channel;

const COURT: &str = "dz-court";
const OFF_ROUTE: &str = "yb-court";

fn feedback(outcome: Outcome) -> Option<Feedback> {
    Some(Feedback {
        outcome: outcome as i32,
        summary: "查实".into(),
        ..Feedback::default()
    })
}

fn reply(
    sender: &str,
    recipient: &str,
    in_reply_to: &str,
    key: &str,
    payload: Payload,
) -> Envelope {
    Envelope {
        sender: sender.into(),
        recipient: recipient.into(),
        in_reply_to: in_reply_to.into(),
        idempotency_key: key.into(),
        payload: Some(payload),
        ..Envelope::default()
    }
}

/// Stops what a test started and removes its queues and ledger.
async fn finish(amqp: Amqp, tracker: Option<TestTracker>, bus: TestBus) {
    amqp.close().await;
    if let Some(tracker) = tracker {
        let (settings, _) = tracker.stop().await;
        bus.stop().await;
        drop_ledger(&settings).await;
    } else {
        bus.stop().await;
    }
}

/// Checks a refusal's code and the start of its message.
#[track_caller]
fn refused(err: &tonic::Status, code: Code, starts: &str, what: &str) {
    assert_eq!(err.code(), code, "{what}: {}", err.message());
    assert!(
        err.message().starts_with(starts),
        "{what}: {}",
        err.message()
    );
}

async fn ready(amqp: &Amqp, queue: &str) -> u32 {
    amqp.counts(queue).await.0
}

/// Acceptance line 1, the gateway: a reply counts only from an agency the
/// referral was delivered to, whatever RPC carries it; a referral nobody
/// sent gets the same answer as one the caller never received.
#[tokio::test]
async fn forged_replies_to_a_lead_are_refused_at_the_gateway_whatever_rpc_carries_them() {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    let amqp = Amqp::connect().await;
    let lead_id = bus
        .gateway_as("justice-bureau", BUREAU)
        .await
        .submit(submit(lead("lead-16")))
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut off_route = bus.gateway_as("case-unit", OFF_ROUTE).await;
    let not_delivered = format!("was not delivered to `{OFF_ROUTE}`");

    // Plain Submit: a feedback, and an acknowledgement, to the finder.
    let forged_feedback = off_route
        .submit(submit(reply(
            OFF_ROUTE,
            BUREAU,
            &lead_id,
            "forged-fb",
            Payload::Feedback(feedback(Outcome::Unsubstantiated).unwrap()),
        )))
        .await
        .unwrap_err();
    assert_eq!(
        forged_feedback.code(),
        Code::NotFound,
        "{}",
        forged_feedback.message()
    );
    assert!(
        forged_feedback.message().contains(&not_delivered),
        "{}",
        forged_feedback.message()
    );
    assert!(
        forged_feedback.message().contains("Confidentiality"),
        "names the rule: {}",
        forged_feedback.message()
    );
    let forged_ack = off_route
        .submit(submit(reply(
            OFF_ROUTE,
            BUREAU,
            &lead_id,
            "forged-ack",
            Payload::Acknowledgement(Default::default()),
        )))
        .await
        .unwrap_err();
    assert_eq!(
        forged_ack.code(),
        Code::NotFound,
        "{}",
        forged_ack.message()
    );

    // The Feedback RPC with a copy of the lead made up to name yb-court.
    let mut made_up = lead("lead-16");
    made_up.id.clone_from(&lead_id);
    made_up.recipient = OFF_ROUTE.into();
    if let Some(Payload::MisconductLead(l)) = &mut made_up.payload {
        l.found_by = BUREAU.into();
        l.route = vec![refbus_proto::v1::RouteHop {
            agency: OFF_ROUTE.into(),
            duty: refbus_proto::v1::route_hop::Duty::Handle as i32,
        }];
    }
    let err = off_route
        .feedback(FeedbackRequest {
            agency: OFF_ROUTE.into(),
            referral: Some(made_up.clone()),
            feedback: feedback(Outcome::Substantiated),
            idempotency_key: "forged-rpc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    // The Relay RPC, and a relayed lead through plain Submit.
    let err = off_route
        .relay(RelayRequest {
            agency: OFF_ROUTE.into(),
            lead: Some(made_up.clone()),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let mut relayed = made_up.clone();
    relayed.id.clear();
    relayed.relay_of.clone_from(&lead_id);
    relayed.sender = OFF_ROUTE.into();
    relayed.recipient.clear();
    relayed.idempotency_key = "forged-relay".into();
    let err = off_route.submit(submit(relayed)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    // A referral that does not exist: the same answer, so that a reply is
    // no way to learn whether an id exists.
    let nobody_sent = envelope_id("dz-detention-centre", "never-sent");
    let err = off_route
        .submit(submit(reply(
            OFF_ROUTE,
            BUREAU,
            &nobody_sent,
            "forged-fb-2",
            Payload::Feedback(feedback(Outcome::Unsubstantiated).unwrap()),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), forged_feedback.code());
    assert_eq!(
        err.message().replace(&nobody_sent, "ID"),
        forged_feedback.message().replace(&lead_id, "ID")
    );

    // Nothing was published: the finder's inbox holds nothing, and the
    // handling organ holds only the lead.
    assert_eq!(
        ready(&amqp, &bus.inbox_queue(BUREAU)).await,
        0,
        "no forged reply published"
    );
    assert_eq!(
        ready(&amqp, &bus.inbox_queue(COURT)).await,
        1,
        "only the lead"
    );
    // The tracker does not count yb-court a party: it reads nothing.
    let seen = tracker.status(OFF_ROUTE, &lead_id).await;
    assert!(seen.is_err(), "yb-court reads the lead: {seen:?}");

    // The organ the lead was delivered to answers it; not with a changed
    // copy, and not to anyone but the finder.
    let mut court = bus.gateway_as("case-unit", COURT).await;
    let mut inbox = Inbox::open(&mut court, COURT).await;
    let Delivery {
        delivery_token,
        envelope,
        ..
    } = inbox.next().await;
    let delivered = envelope.unwrap();
    assert_eq!(delivered.id, lead_id);
    let mut altered = delivered.clone();
    if let Some(Payload::MisconductLead(l)) = &mut altered.payload {
        l.description = "另一件事".into();
    }
    let err = court
        .feedback(FeedbackRequest {
            agency: COURT.into(),
            referral: Some(altered),
            feedback: feedback(Outcome::Substantiated),
            idempotency_key: "altered".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().starts_with("DZ-"),
        "names the rule: {}",
        err.message()
    );
    let err = court
        .submit(submit(reply(
            COURT,
            OFF_ROUTE,
            &lead_id,
            "misdirected",
            Payload::Feedback(feedback(Outcome::Substantiated).unwrap()),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    // Pending on the stream (not yet acknowledged) is received: it may answer.
    court
        .feedback(FeedbackRequest {
            agency: COURT.into(),
            referral: Some(delivered),
            feedback: feedback(Outcome::Substantiated),
            idempotency_key: "genuine".into(),
        })
        .await
        .unwrap();
    acknowledge(&mut court, COURT, delivery_token).await;
    drop(inbox);
    // Acknowledged (on disk): still received, after the stream ended.
    court
        .submit(submit(reply(
            COURT,
            BUREAU,
            &lead_id,
            "genuine-2",
            Payload::Feedback(feedback(Outcome::Substantiated).unwrap()),
        )))
        .await
        .unwrap();
    assert_eq!(
        within("the genuine answers", async {
            loop {
                let n = ready(&amqp, &bus.inbox_queue(BUREAU)).await;
                if n >= 2 {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await,
        2
    );

    finish(amqp, Some(tracker), bus).await;
}

/// Acceptance line 3, the gateway: a NUL byte or a 3 KB value where a
/// referral id belongs is refused with the field named, and nothing is
/// published.
#[tokio::test]
async fn malformed_reply_ids_are_refused_at_the_gateway_naming_the_field() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut desk = bus.gateway_as("legal-aid", "dz-duty-desk").await;
    let genuine = envelope_id("dz-detention-centre", "x");
    for (what, value) in [
        ("a NUL byte", format!("{genuine}\0")),
        ("3 KB", "7".repeat(3 * 1024)),
        ("invalid UTF-8 made lossy", "\u{fffd}".repeat(12)),
    ] {
        let err = desk
            .submit(submit(reply(
                "dz-duty-desk",
                "dz-detention-centre",
                &value,
                &format!("bad-{}", value.len()),
                Payload::Feedback(feedback(Outcome::LawyerAssigned).unwrap()),
            )))
            .await
            .unwrap_err();
        refused(
            &err,
            Code::InvalidArgument,
            "envelope.in_reply_to: not a referral id",
            what,
        );
        assert!(
            err.message().len() < 300,
            "{what}: the value is not echoed whole"
        );
        let mut relayed = legal_help("relay-bad");
        relayed.relay_of.clone_from(&value);
        let err = bus
            .gateway_as("detention-centre", "dz-detention-centre")
            .await
            .submit(submit(relayed))
            .await
            .unwrap_err();
        refused(&err, Code::InvalidArgument, "envelope.relay_of: ", what);
        // The Feedback RPC's referral id too.
        let mut referral = legal_help("fb-bad");
        referral.id.clone_from(&value);
        let err = desk
            .feedback(FeedbackRequest {
                agency: "dz-duty-desk".into(),
                referral: Some(referral),
                feedback: feedback(Outcome::LawyerAssigned),
                idempotency_key: "fb-bad".into(),
            })
            .await
            .unwrap_err();
        refused(&err, Code::InvalidArgument, "referral.id: ", what);
    }
    // A 3 KB delivery token is refused, briefly.
    let err = desk
        .acknowledge(AcknowledgeRequest {
            agency: "dz-duty-desk".into(),
            delivery_token: "9".repeat(3 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().len() < 400, "{}", err.message());
    assert_eq!(
        ready(&amqp, &bus.inbox_queue("dz-detention-centre")).await,
        0
    );
    finish(amqp, None, bus).await;
}

fn legal_help_to(key: &str, centre: &str, office: &str) -> Envelope {
    let mut e = legal_help(key);
    e.sender = centre.into();
    e.recipient = office.into();
    if let Some(Payload::LegalHelpRequest(p)) = &mut e.payload {
        p.detention_centre = centre.into();
    }
    e
}

/// The hops (`Hop` values) the ledger shows `asker` for `id`.
async fn hops(tracker: &TestTracker, asker: &str, id: &str) -> BTreeSet<i32> {
    tracker
        .status(asker, id)
        .await
        .map(|s| s.timeline.iter().map(|t| t.hop).collect())
        .unwrap_or_default()
}

/// Acceptance line 2: a desk that looks at its inbox seven times, reading
/// one delivery each time, loses nothing; the ledger shows "delivered"
/// only for what the client received (acknowledged).
#[tokio::test]
async fn seven_looks_at_an_inbox_lose_nothing_and_delivered_means_received() {
    const CENTRE: &str = "yb-detention-centre";
    const AID: &str = "yb-legal-aid-centre";
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    let amqp = Amqp::connect().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            centre
                .submit(submit(legal_help_to(&format!("look-{i}"), CENTRE, AID)))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let queue = bus.inbox_queue(AID);
    let mut desk = bus.gateway_as("legal-aid", AID).await;
    let mut acknowledged = Vec::new();
    for look in 0..7 {
        let mut inbox = Inbox::open(&mut desk, AID).await;
        let delivery = inbox.next().await;
        let id = delivery.envelope.unwrap().id;
        // Four looks only read (a client that reconnects); three read and
        // acknowledge, as `refbus inbox --count 1` does.
        if look >= 4 {
            acknowledge(&mut desk, AID, delivery.delivery_token).await;
            acknowledged.push(id);
        }
        drop(inbox);
        amqp.settled_count(&queue).await;
    }
    let dead_letters = bus.shared.bus.topology().dead_letter();
    assert_eq!(
        ready(&amqp, &dead_letters).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        ready(&amqp, &queue).await,
        17,
        "every unacknowledged one is back in the queue"
    );
    // The ledger: delivered for the three received, for none of the others.
    for id in &acknowledged {
        eventually("delivered and acknowledged recorded", || async {
            let hops = hops(&tracker, CENTRE, id).await;
            (hops.contains(&(Hop::Delivered as i32)) && hops.contains(&(Hop::Acknowledged as i32)))
                .then_some(())
        })
        .await;
    }
    for id in ids.iter().filter(|id| !acknowledged.contains(id)) {
        let hops = hops(&tracker, CENTRE, id).await;
        assert!(hops.contains(&(Hop::Submitted as i32)), "{id} recorded");
        assert!(
            !hops.contains(&(Hop::Delivered as i32)),
            "{id} went back to the queue, yet the ledger shows it delivered"
        );
    }
    // Then the desk reads everything: all 20 delivered and acknowledged, once.
    let mut inbox = Inbox::open(&mut desk, AID).await;
    for _ in 0..17 {
        let delivery = inbox.next().await;
        let id = delivery.envelope.unwrap().id;
        assert!(
            !acknowledged.contains(&id),
            "{id} handed over again after its acknowledgement"
        );
        acknowledge(&mut desk, AID, delivery.delivery_token).await;
        acknowledged.push(id);
    }
    drop(inbox);
    let got: BTreeSet<&String> = acknowledged.iter().collect();
    assert_eq!(got.len(), 20, "each of the 20 acknowledged once");
    assert_eq!(got, ids.iter().collect());
    assert_eq!(amqp.settled_count(&queue).await, 0);
    assert_eq!(
        ready(&amqp, &dead_letters).await,
        0,
        "nothing dead-lettered"
    );
    for id in &ids {
        eventually("every request delivered", || async {
            hops(&tracker, CENTRE, id)
                .await
                .contains(&(Hop::Delivered as i32))
                .then_some(())
        })
        .await;
    }
    finish(amqp, Some(tracker), bus).await;
}

/// A stream holds only its window of unacknowledged deliveries, not the
/// service's whole prefetch.
#[tokio::test]
async fn an_inbox_stream_holds_only_its_window() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut centre = bus
        .gateway_as("detention-centre", "dz-detention-centre")
        .await;
    for i in 0..12 {
        centre
            .submit(submit(legal_help(&format!("w-{i}"))))
            .await
            .unwrap();
    }
    let queue = bus.inbox_queue("dz-duty-desk");
    let mut desk = bus.gateway_as("legal-aid", "dz-duty-desk").await;
    let mut stream = inbox_stream(&mut desk, "dz-duty-desk", 3).await;
    let first = refbus_tests::next_message("a delivery", &mut stream).await;
    // The broker hands this stream three, and keeps the other nine.
    eventually("the window taken", || async {
        (ready(&amqp, &queue).await == 9).then_some(())
    })
    .await;
    // An acknowledgement makes room for one more.
    acknowledge(&mut desk, "dz-duty-desk", first.delivery_token).await;
    eventually("one more taken", || async {
        (ready(&amqp, &queue).await == 8).then_some(())
    })
    .await;
    drop(stream);
    assert_eq!(
        amqp.settled_count(&queue).await,
        11,
        "what the stream held is back"
    );
    finish(amqp, None, bus).await;
}

/// Reads `n` deliveries: (token, id) each.
async fn read(stream: &mut tonic::Streaming<Delivery>, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let d = refbus_tests::next_message("a delivery", stream).await;
        got.push((d.delivery_token, d.envelope.unwrap().id));
    }
    got
}

async fn ack(client: &mut GatewayClient<Channel>, token: &str) -> Result<(), tonic::Status> {
    client
        .acknowledge(AcknowledgeRequest {
            agency: "dz-duty-desk".into(),
            delivery_token: token.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// Acceptance line 4: the broker closes a consumer channel while
/// deliveries are outstanding on an open stream (a node of the test's own
/// with a 1.5 s consumer timeout, checked every 200 ms); the service opens
/// another. Old tokens still name their own messages, new deliveries get
/// tokens of their own, nothing is acked that the client did not
/// acknowledge, nothing is lost, nothing is handed over twice.
#[tokio::test]
async fn delivery_tokens_survive_a_consumer_channel_the_broker_closed() {
    if std::env::var_os("TEST_LOG").is_some() {
        refbus_gateway::telemetry::init("info");
    }
    let node = BrokerNode::start_configured(
        "consumer_timeout = 1500",
        Some("[{rabbit, [{channel_tick_interval, 200}]}].\n"),
    )
    .await;
    let bus = TestBus::spawn_with(test_settings(node.amqp_url())).await;
    let amqp = Amqp::connect_to(&node.amqp_url()).await;
    let queue = bus.inbox_queue("dz-duty-desk");
    let mut centre = bus
        .gateway_as("detention-centre", "dz-detention-centre")
        .await;
    let mut submitted = Vec::new();
    for i in 0..6 {
        submitted.push(
            centre
                .submit(submit(legal_help(&format!("held-{i}"))))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let mut desk = bus.gateway_as("legal-aid", "dz-duty-desk").await;
    let mut stream = inbox_stream(&mut desk, "dz-duty-desk", 0).await;
    let first = read(&mut stream, 6).await;
    // The client holds all six unacknowledged past the consumer timeout:
    // the broker closes the channel, the service consumes again.
    let interrupted = || {
        bus.shared
            .bus
            .metrics()
            .consumer_interrupted
            .get_or_create(&refbus_bus::metrics::QueueLabel {
                queue: "inbox".into(),
            })
            .get()
    };
    eventually("the broker to close the consumer channel", || async {
        (interrupted() >= 1).then_some(())
    })
    .await;
    // New messages come on the new channel, whose delivery tags restart.
    for i in 0..2 {
        submitted.push(
            centre
                .submit(submit(legal_help(&format!("new-{i}"))))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    let second = read(&mut stream, 2).await;
    let tokens: BTreeSet<&String> = first.iter().chain(&second).map(|(t, _)| t).collect();
    assert_eq!(
        tokens.len(),
        8,
        "every delivery has a token of its own: {tokens:?}"
    );
    let handed: Vec<&String> = first.iter().chain(&second).map(|(_, id)| id).collect();
    let distinct: BTreeSet<&String> = handed.iter().copied().collect();
    assert_eq!(distinct.len(), 8, "nothing handed over twice: {handed:?}");
    // The client acknowledges five of the first six by their old tokens,
    // and the two new ones; it never acknowledges the sixth.
    for (token, _) in first.iter().take(5).chain(&second) {
        ack(&mut desk, token)
            .await
            .unwrap_or_else(|e| panic!("{token}: {}", e.message()));
    }
    let never_acknowledged = &first[5].1;
    drop(stream);
    // The sixth is still in the queue: nothing acked that the client did
    // not acknowledge. The seven acknowledged are gone for good.
    assert_eq!(
        amqp.settled_count(&queue).await,
        1,
        "only the unacknowledged one is left"
    );
    let mut stream = inbox_stream(&mut desk, "dz-duty-desk", 0).await;
    let again = read(&mut stream, 1).await;
    assert_eq!(&again[0].1, never_acknowledged);
    ack(&mut desk, &again[0].0).await.unwrap();
    drop(stream);
    assert_eq!(amqp.settled_count(&queue).await, 0);
    let dead_letters = bus.shared.bus.topology().dead_letter();
    assert_eq!(
        ready(&amqp, &dead_letters).await,
        0,
        "nothing dead-lettered"
    );
    amqp.close().await;
    bus.stop().await;
    drop(node);
}

/// `refbus dead-letter list` shows what waits there (ids, reasons, never
/// content); `replay` sends a message back to its queue, where it is
/// handled again; the depth is on `/metrics`.
#[tokio::test]
async fn dead_letters_are_listed_replayed_and_counted() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue("dz-duty-desk");
    // A genuine request dead-lettered by a consumer with a reason (as one
    // the tracker could not store would be), and undecodable bytes.
    let mut genuine = legal_help("dl-1");
    genuine.id = envelope_id("dz-detention-centre", "dl-1");
    genuine.kind = refbus_proto::v1::MessageKind::LegalHelpRequest as i32;
    let bytes = genuine.encode_to_vec();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        refbus_core::signing::SIGNATURE_HEADER.into(),
        lapin::types::AMQPValue::LongString(
            refbus_core::signing::development_signature(
                "dz-detention-centre",
                refbus_core::signing::Signed::Envelope,
                &bytes,
            )
            .as_str()
            .into(),
        ),
    );
    for (key, value) in [
        (refbus_bus::REASON_HEADER, "the ledger refused it: test"),
        (refbus_bus::QUEUE_HEADER, queue.as_str()),
    ] {
        headers.insert(
            key.into(),
            lapin::types::AMQPValue::LongString(value.into()),
        );
    }
    let dead_letters = bus.shared.bus.topology().dead_letter();
    amqp.channel
        .basic_publish(
            dead_letters.as_str().into(),
            "".into(),
            Default::default(),
            &bytes,
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(genuine.id.as_str().into())
                .with_type("legal_help_request".into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    amqp.publish_raw(&queue, b"\x00\x01 not an envelope").await;
    let mut desk = bus.gateway_as("legal-aid", "dz-duty-desk").await;
    // The inbox dead-letters the undecodable bytes on the way.
    let mut stream = inbox_stream(&mut desk, "dz-duty-desk", 0).await;
    eventually("two dead letters", || async {
        (ready(&amqp, &dead_letters).await == 2).then_some(())
    })
    .await;
    let cli = |args: &[&str]| {
        std::process::Command::new(refbus_tests::refbus_binary())
            .args(args)
            .env("AMQP_URL", refbus_tests::amqp_url())
            .env("REFBUS_NAMESPACE", bus.namespace())
            .output()
            .unwrap()
    };
    let listed = cli(&["dead-letter", "list", "-o", "json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let by_id: HashMap<String, &serde_json::Value> = lines
        .iter()
        .map(|l| (l["message_id"].as_str().unwrap_or("-").to_owned(), l))
        .collect();
    let ours = by_id[&genuine.id];
    assert_eq!(ours["reason"], "the ledger refused it: test");
    assert_eq!(ours["queue"], queue.as_str());
    let other = by_id["-"];
    assert!(
        other["reason"]
            .as_str()
            .unwrap()
            .starts_with("not a refbus.v1.Envelope"),
        "{other}"
    );
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !text.contains("李四") && !text.contains("500225199001011234"),
        "no content listed"
    );
    // Listing changed nothing: both are back once the broker has taken
    // the listing's returns (a quorum queue requeues them a moment after
    // the command's channel closed).
    eventually("both dead letters back after listing", || async {
        (ready(&amqp, &dead_letters).await == 2).then_some(())
    })
    .await;
    // The depth is a metric.
    eventually("the depth on /metrics", || async {
        let text = bus.shared.telemetry.encode();
        text.contains("refbus_bus_dead_letter_depth 2")
            .then_some(())
    })
    .await;
    // Replay an id that is not there: exit 5, nothing moved.
    let missing = cli(&["dead-letter", "replay", &envelope_id("x", "y")]);
    assert_eq!(missing.status.code(), Some(5));
    assert_eq!(ready(&amqp, &dead_letters).await, 2);
    // Replay the genuine one: it reaches the desk, verified as ever.
    let replayed = cli(&["dead-letter", "replay", &genuine.id]);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let d = refbus_tests::next_message("the replayed delivery", &mut stream).await;
    assert_eq!(d.envelope.unwrap().id, genuine.id);
    assert_eq!(ready(&amqp, &dead_letters).await, 1, "the other stays");
    drop(stream);
    finish(amqp, None, bus).await;
}
