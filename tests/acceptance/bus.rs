//! Issue 2: a legal-help request from a detention centre to a duty lawyer
//! desk over RabbitMQ, and everything the bus must do around it.

use std::time::Duration;

use chrono::Utc;
use prost::Message;
use refbus_core::envelope::timestamp;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{
    AcknowledgeRequest, AssignDutyLawyerRequest, Detainee, Envelope, Feedback, FeedbackRequest,
    ForwardLegalHelpRequestRequest, Lawyer, MessageKind, Outcome,
    detention_centre_client::DetentionCentreClient, legal_aid_client::LegalAidClient,
};
use refbus_tests::proxy::Proxy;
use refbus_tests::{Amqp, Inbox, TestBus, acknowledge, test_settings, within};
use tonic::Code;

use refbus_tests::fixtures::{CENTRE, DESK, legal_help, submit};

/// Acceptance 1: a legal-help request (CQ-1.1b) submitted to the Dazu
/// detention centre's service arrives on the Dazu duty desk's Inbox with
/// every field intact; after Acknowledge it is gone from the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_1b_legal_help_request_reaches_the_duty_desk_intact_and_acknowledge_removes_it() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;

    let sent = legal_help("req-1");
    let receipt = centre
        .submit(submit(sent.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, DESK);
    assert_eq!(receipt.routing_key, format!("{DESK}.legal_help_request"));

    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let delivery = inbox.next().await;
    assert!(!delivery.redelivered);
    let got = delivery.envelope.clone().unwrap();
    let expected = Envelope {
        id: receipt.id.clone(),
        kind: MessageKind::LegalHelpRequest as i32,
        submitted_at: receipt.submitted_at,
        ..sent
    };
    assert_eq!(got, expected, "every field arrives intact");

    acknowledge(&mut desk, DESK, delivery.delivery_token.clone()).await;
    drop(inbox);
    assert_eq!(
        amqp.settled_count(&bus.inbox_queue(DESK)).await,
        0,
        "acknowledged: gone from the queue"
    );

    // The same token cannot be acknowledged twice.
    let again = desk
        .acknowledge(AcknowledgeRequest {
            agency: DESK.into(),
            delivery_token: delivery.delivery_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    bus.stop().await;
}

/// CQ-1.1b routing through the detention centre's own RPC: to the duty desk
/// when the centre has one, otherwise to the legal aid office of its region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_1b_forwarding_routes_to_the_desk_or_else_the_regions_legal_aid_office() {
    let bus = TestBus::spawn().await;
    let mut centre = DetentionCentreClient::new(bus.channel_as("detention-centre", CENTRE).await);
    let request = |centre_id: &str, key: &str| ForwardLegalHelpRequestRequest {
        detention_centre: centre_id.into(),
        detainee: Some(Detainee {
            name: "王五".into(),
            ..Detainee::default()
        }),
        matter: "会见律师".into(),
        requested_at: Some(timestamp(Utc::now() - chrono::Duration::hours(3))),
        idempotency_key: key.into(),
    };
    let to_desk = centre
        .forward_legal_help_request(request(CENTRE, "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(to_desk.recipient, DESK);
    let mut yb_centre = DetentionCentreClient::new(
        bus.channel_as("detention-centre", "yb-detention-centre")
            .await,
    );
    let to_office = yb_centre
        .forward_legal_help_request(request("yb-detention-centre", "b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(to_office.recipient, "yb-legal-aid-centre");

    let mut legal_aid = bus.gateway_as("legal-aid", "yb-legal-aid-centre").await;
    let mut inbox = Inbox::open(&mut legal_aid, "yb-legal-aid-centre").await;
    let got = inbox.next().await.envelope.unwrap();
    assert_eq!(got.id, to_office.id);
    assert_eq!(got.sender, "yb-detention-centre");

    // An agency this service does not serve is refused, even when it is
    // the caller.
    let mut court =
        DetentionCentreClient::new(bus.channel_as("detention-centre", "dz-court").await);
    let err = court
        .forward_legal_help_request(request("dz-court", "c"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("detention-centre serves"),
        "{}",
        err.message()
    );
    bus.stop().await;
}

/// Acceptance 2: a delivery not acknowledged before the client disconnects
/// is delivered again on the next Inbox stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_delivery_is_delivered_again_on_the_next_stream() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let receipt = centre
        .submit(submit(legal_help("req-2")))
        .await
        .unwrap()
        .into_inner();

    let mut first = Inbox::open(&mut desk, DESK).await;
    let delivery = first.next().await;
    assert_eq!(delivery.envelope.unwrap().id, receipt.id);
    drop(first); // disconnect without acknowledging
    assert_eq!(
        amqp.settled_count(&bus.inbox_queue(DESK)).await,
        1,
        "back in the queue"
    );

    let mut second = Inbox::open(&mut desk, DESK).await;
    let again = second.next().await;
    assert_eq!(again.envelope.unwrap().id, receipt.id);
    assert!(again.redelivered);
    // A token from the ended stream is refused: its message came back.
    let stale = desk
        .acknowledge(AcknowledgeRequest {
            agency: DESK.into(),
            delivery_token: delivery.delivery_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    acknowledge(&mut desk, DESK, again.delivery_token).await;
    bus.stop().await;
}

/// The number of messages in every queue of the test's namespace.
async fn messages_anywhere(bus: &TestBus, amqp: &Amqp) -> u32 {
    let topology = bus.shared.bus.topology();
    let mut queues: Vec<String> = topology
        .agencies
        .iter()
        .map(|a| topology.inbox_queue(a))
        .collect();
    queues.extend([
        topology.tap_queue(),
        topology.unroutable(),
        topology.dead_letter(),
    ]);
    let mut total = 0;
    for q in queues {
        total += amqp.counts(&q).await.0;
    }
    total
}

/// Acceptance 3 and the bad input: each refused with the right code
/// and a message naming the field or the rule; nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_are_refused_with_the_field_or_rule_and_nothing_is_published() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;

    // Acceptance 3: unknown recipient.
    let mut e = legal_help("bad-1");
    e.recipient = "nowhere-legal-aid".into();
    let err = centre.submit(submit(e)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "envelope.recipient: `nowhere-legal-aid` is not in the agency directory"
    );

    // Missing required field.
    let mut e = legal_help("bad-2");
    e.sender.clear();
    let err = centre.submit(submit(e)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "envelope.sender: required")
    );
    let mut e = legal_help("bad-3");
    e.clock_started_at = None;
    let err = centre.submit(submit(e)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("CQ-1.1b"), "{}", err.message());

    // A sender other than the caller (issue 5: a caller acts only as its
    // own agency).
    let mut e = legal_help("bad-4");
    e.sender = "yb-detention-centre".into();
    let err = centre.submit(submit(e.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with(
            "envelope.sender: the caller is authenticated as `dz-detention-centre` and may act only as that agency"
        ),
        "{}",
        err.message()
    );

    // A sender that is not one of the service's own agencies, even when it
    // is the caller.
    e.sender = "yb-court".into();
    let mut court = bus.gateway_as("detention-centre", "yb-court").await;
    let err = court.submit(submit(e)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .starts_with("envelope.sender: `yb-court` is not one of this service's agencies"),
        "{}",
        err.message()
    );

    // A kind the sender's agency kind may not send (CQ-1.1b: legal-help goes
    // to a duty desk or legal aid office, not to a court).
    let mut e = legal_help("bad-5");
    e.recipient = "dz-court".into();
    let err = centre.submit(submit(e)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().starts_with("CQ-1.1b:"), "{}", err.message());
    // Overdue notices come only from the tracker.
    let mut e = legal_help("bad-6");
    e.in_reply_to = refbus_core::envelope::envelope_id("dz-detention-centre", "bad-5");
    e.payload = Some(Payload::OverdueNotice(Default::default()));
    let err = centre.submit(submit(e)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // Over 1 MiB.
    let mut e = legal_help("bad-7");
    if let Some(Payload::LegalHelpRequest(p)) = &mut e.payload {
        p.matter = "x".repeat(1024 * 1024 + 1);
    }
    let err = centre.submit(submit(e)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("over the 1 MiB limit"),
        "{}",
        err.message()
    );

    assert_eq!(
        messages_anywhere(&bus, &amqp).await,
        0,
        "nothing was published"
    );
    bus.stop().await;
}

/// Acceptance 4: feedback on a referral arrives in the original sender's
/// inbox, correlated to the referral.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_reaches_the_referrals_sender_correlated_to_it() {
    let bus = TestBus::spawn().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let referral = centre
        .submit(submit(legal_help("req-4")))
        .await
        .unwrap()
        .into_inner();

    let mut desk_inbox = Inbox::open(&mut desk, DESK).await;
    let delivered = desk_inbox.next().await;
    let env = delivered.envelope.unwrap();
    acknowledge(&mut desk, DESK, delivered.delivery_token).await;

    let answer = desk
        .feedback(FeedbackRequest {
            agency: DESK.into(),
            referral: Some(env.clone()),
            feedback: Some(Feedback {
                outcome: Outcome::LawyerAssigned as i32,
                summary: "值班律师已接待".into(),
                ..Feedback::default()
            }),
            idempotency_key: "fb-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.recipient, CENTRE);

    // The legal-aid service's own RPC does the same.
    let mut legal_aid = LegalAidClient::new(bus.channel_as("legal-aid", DESK).await);
    legal_aid
        .assign_duty_lawyer(AssignDutyLawyerRequest {
            agency: DESK.into(),
            request: Some(env.clone()),
            lawyer: Some(Lawyer {
                name: "赵律师".into(),
                licence_number: "15001201910000001".into(),
                law_firm: String::new(),
            }),
            idempotency_key: "fb-2".into(),
        })
        .await
        .unwrap();

    let mut centre_inbox = Inbox::open(&mut centre, CENTRE).await;
    for expected in [Outcome::LawyerAssigned, Outcome::LawyerAssigned] {
        let fb = centre_inbox.next().await.envelope.unwrap();
        assert_eq!(fb.in_reply_to, referral.id, "correlated to the referral");
        assert_eq!(fb.sender, DESK);
        assert_eq!(fb.kind, MessageKind::Feedback as i32);
        let Some(Payload::Feedback(f)) = fb.payload else {
            panic!("feedback payload")
        };
        assert_eq!(f.outcome, expected as i32);
    }
    assert_eq!(answer.id.len(), 36);

    // Feedback needs to say what it answers.
    let err = desk
        .feedback(FeedbackRequest {
            agency: DESK.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "referral: required: the referral answered, as delivered"
        )
    );
    bus.stop().await;
}

/// Acceptance 5: two submissions with the same idempotency key carry the
/// same id; another key gives another id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_gives_the_same_id() {
    let bus = TestBus::spawn().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let one = centre
        .submit(submit(legal_help("same")))
        .await
        .unwrap()
        .into_inner();
    let two = centre
        .submit(submit(legal_help("same")))
        .await
        .unwrap()
        .into_inner();
    let other = centre
        .submit(submit(legal_help("other")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.id, two.id);
    assert_ne!(one.id, other.id);

    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    // Both submissions were published, under the same id; the Inbox hands
    // the id over once (issue 5: exactly once after deduplication).
    let ids: Vec<String> = [inbox.next().await, inbox.next().await]
        .into_iter()
        .map(|d| d.envelope.unwrap().id)
        .collect();
    assert_eq!(
        ids,
        [one.id, other.id],
        "the second copy is not handed over"
    );
    bus.stop().await;
}

/// Acceptance 6: garbage bytes published straight onto an inbox queue end
/// up in the dead-letter queue with a reason (an envelope whose id no
/// refbus gives too); the next valid message is
/// still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_an_inbox_is_dead_lettered_with_a_reason_and_the_consumer_keeps_running() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;

    let garbage = b"\xff\xfe not protobuf \x00\x01".to_vec();
    amqp.publish_raw(&bus.inbox_queue(DESK), &garbage).await;
    // Decodes as protobuf, but is no envelope: no id, no payload.
    amqp.publish_raw(&bus.inbox_queue(DESK), &Envelope::default().encode_to_vec())
        .await;
    // An envelope whose id is not the canonical text of a UUID, as no id
    // the bus gives is: here the form the acknowledged store keeps moved
    // receipts under, which would read as acknowledged already.
    let mut odd_id = legal_help("odd-id");
    odd_id.id = "received:0193d5c8-0000-7000-8000-000000000001".into();
    amqp.publish_raw(&bus.inbox_queue(DESK), &odd_id.encode_to_vec())
        .await;
    let valid = centre
        .submit(submit(legal_help("after-garbage")))
        .await
        .unwrap()
        .into_inner();

    let delivery = inbox.next().await;
    assert_eq!(
        delivery.envelope.unwrap().id,
        valid.id,
        "the next valid message is delivered"
    );

    let dead_letter = bus.shared.bus.topology().dead_letter();
    let mut reasons = Vec::new();
    within("the three dead letters", async {
        while reasons.len() < 3 {
            match amqp.get(&dead_letter).await {
                Some(message) => {
                    let reason = refbus_bus::subscription::header_text(
                        &message.delivery.properties,
                        "x-refbus-reason",
                    )
                    .expect("a reason header");
                    if reasons.is_empty() {
                        assert_eq!(message.delivery.data, garbage);
                    }
                    reasons.push(reason);
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert!(
        reasons[0].starts_with("not a refbus.v1.Envelope"),
        "{}",
        reasons[0]
    );
    assert_eq!(reasons[1], "envelope has no payload");
    assert!(reasons[2].contains("envelope.id"), "{}", reasons[2]);
    bus.stop().await;
}

/// Acceptance 7: with the broker connection cut by a proxy, Submit fails
/// with UNAVAILABLE; once restored, without restarting the service, Submit
/// works again, the Inbox stream that was open across the outage resumes,
/// and no confirmed message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_gives_unavailable_then_recovers_without_losing_confirmed_messages() {
    let broker: std::net::SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let proxy = Proxy::start(broker).await;
    let bus = TestBus::spawn_with(test_settings(proxy.amqp_url())).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let mut confirmed = Vec::new();
    for i in 0..20 {
        confirmed.push(
            centre
                .submit(submit(legal_help(&format!("before-{i}"))))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }
    // Half of them are received and acknowledged before the outage; the
    // rest wait, unacknowledged or undelivered, across it.
    let mut received = std::collections::HashSet::new();
    for _ in 0..10 {
        let d = inbox.next().await;
        received.insert(d.envelope.unwrap().id);
        acknowledge(&mut desk, DESK, d.delivery_token).await;
    }

    proxy.cut();
    for i in 0..5 {
        let result = within(
            "Submit during the outage",
            centre.submit(submit(legal_help(&format!("during-{i}")))),
        )
        .await;
        let err = result.expect_err("no Submit succeeds while the broker is cut off");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    }

    proxy.restore();
    // The bus reconnects by itself; Submit works again once it has.
    let recovered = within("Submit to work again", async {
        loop {
            match centre.submit(submit(legal_help("after-0"))).await {
                Ok(r) => return r.into_inner().id,
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    confirmed.push(recovered);
    for i in 1..10 {
        confirmed.push(
            centre
                .submit(submit(legal_help(&format!("after-{i}"))))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }

    // The same stream resumes: everything confirmed arrives.
    while received.len() < confirmed.len() {
        let d = inbox.next().await;
        received.insert(d.envelope.unwrap().id);
        let ack = desk
            .acknowledge(AcknowledgeRequest {
                agency: DESK.into(),
                delivery_token: d.delivery_token,
                ..Default::default()
            })
            .await;
        // A delivery handed over just before the cut cannot be acknowledged
        // on the old connection; it comes again, which is what we want.
        if let Err(e) = ack {
            assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        }
    }
    for id in &confirmed {
        assert!(received.contains(id), "confirmed message {id} was lost");
    }
    bus.stop().await;
}

/// Acceptance 8: `refbus up` runs as a child process, serves, and exits 0
/// on SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refbus_up_serves_and_exits_0_on_sigint() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let binary = refbus_tests::refbus_binary();
    let settings = test_settings(refbus_tests::amqp_url());
    let data_dir = std::env::temp_dir().join(format!("refbus-up-{}", settings.namespace));
    let mut child = refbus_tests::refbus_up(&settings, &data_dir, "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut centre_addr = None;
    within("refbus up to print its addresses", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"detention-centre") {
                centre_addr = Some(words[1].to_owned());
            }
            if words.first() == Some(&"tracker") {
                break;
            }
        }
    })
    .await;
    let addr = centre_addr.expect("refbus up printed the detention-centre address");
    let mut centre = refbus_proto::v1::gateway_client::GatewayClient::connect(addr)
        .await
        .unwrap();
    // `refbus up` authenticates with the development bearer tokens
    // (deploy/local/tokens.toml): none is UNAUTHENTICATED.
    let err = centre
        .submit(submit(legal_help("via-up")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    let mut request = tonic::Request::new(submit(legal_help("via-up")));
    request.metadata_mut().insert(
        "authorization",
        "Bearer dev-dz-detention-centre".parse().unwrap(),
    );
    let receipt = centre.submit(request).await.unwrap().into_inner();
    assert_eq!(receipt.recipient, DESK);

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = within("refbus up to exit", child.wait()).await.unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    refbus_tests::delete_namespace(&refbus_tests::topology_of(&settings.namespace)).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    refbus_tests::remove_inbox_db(&settings);
}

/// Acknowledging several deliveries in one call: each pending one is
/// acknowledged (gone from the queue, not delivered again); a token that
/// is not pending is returned, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_deliveries_are_acknowledged_in_one_call() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    for key in ["batch-1", "batch-2", "batch-3"] {
        centre.submit(submit(legal_help(key))).await.unwrap();
    }
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(inbox.next().await.delivery_token);
    }
    let stale = "999-1-1".to_owned();
    let response = desk
        .acknowledge(AcknowledgeRequest {
            agency: DESK.into(),
            delivery_tokens: [tokens.clone(), vec![stale.clone()]].concat(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.not_pending, [stale]);
    drop(inbox);
    assert_eq!(
        amqp.settled_count(&bus.inbox_queue(DESK)).await,
        0,
        "all three acknowledged"
    );
    // None of them is pending any more.
    let again = desk
        .acknowledge(AcknowledgeRequest {
            agency: DESK.into(),
            delivery_tokens: tokens.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.not_pending, tokens);
    bus.stop().await;
}

/// A careless client never lets go: it watches the tracker's and the
/// centre's health (a stream that never ends by itself), and holds the
/// desk's `Inbox` open without reading. `refbus up` still stops on SIGINT,
/// exits 0, and says which services it stopped waiting for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refbus_up_stops_on_sigint_while_clients_hold_streams_open() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let settings = test_settings(refbus_tests::amqp_url());
    let data_dir = std::env::temp_dir().join(format!("refbus-held-{}", settings.namespace));
    let up = refbus_tests::up::LoggedUp::start(&settings, &data_dir, "info").await;
    let mut watches = Vec::new();
    for service in ["tracker", "detention-centre"] {
        let mut watch = HealthClient::new(up.channel(service))
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = refbus_tests::next_message("the first health status", &mut watch).await;
        assert_eq!(first.status, 1, "{service} SERVING: {first:?}");
        watches.push(watch);
    }
    let mut desk = refbus_proto::v1::gateway_client::GatewayClient::new(up.channel("legal-aid"));
    let held_inbox = refbus_tests::inbox_stream_as(&mut desk, DESK).await;
    let (stdout, log) = up.stop().await;
    assert!(stdout.iter().any(|l| l == "refbus stopped."), "{stdout:?}");
    for held in ["the agency services", "the tracker's gRPC server"] {
        assert!(
            log.contains(&format!("{held} did not stop within 10s")),
            "{held} named as held open: {log}"
        );
    }
    assert!(!log.contains("did not close within"), "{log}");
    drop((watches, held_inbox));
    refbus_tests::delete_namespace(&refbus_tests::topology_of(&settings.namespace)).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    refbus_tests::remove_inbox_db(&settings);
}
