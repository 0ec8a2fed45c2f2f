//! Issue 5: no personal data in logs. `refbus up` (every agency service and
//! the tracker, the real binary) runs a full scenario with seeded detainee
//! names, ID numbers, letter text and lawyer details at `debug` level; its
//! whole output is then scanned for them.

use chrono::Utc;
use refbus_core::envelope::timestamp;
use refbus_proto::v1::bar_association_client::BarAssociationClient;
use refbus_proto::v1::detention_centre_client::DetentionCentreClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::forward_letter_request::Disposition as Requested;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::lawyer_registry_client::LawyerRegistryClient;
use refbus_proto::v1::lawyer_service_client::LawyerServiceClient;
use refbus_proto::v1::tracker_client::TrackerClient;
use refbus_proto::v1::{
    AcknowledgeRequest, Detainee, Envelope, Feedback, FeedbackRequest, ForwardLetterRequest,
    GetLawyerRequest, GetReferralRequest, Lawyer, LawyerAcknowledgeRequest, LawyerInboxRequest,
    LegalHelpRequest, Outcome, RegisterLawyerRequest,
};
use refbus_tests::fixtures::{CENTRE, DESK, submit};
use refbus_tests::up::LoggedUp;
use refbus_tests::{Amqp, as_agency, test_settings, within};

/// What must never reach a log line.
const SEEDED: [&str; 7] = [
    "隐私甲乙丙",
    "110101199001019999",
    "PIIMATTER-ask-for-bail",
    "PIILETTER-dear-counsel",
    "PIILAWYER-钱丁戊",
    "15001201899990001",
    "PIISUMMARY-assigned",
];

fn detainee() -> Detainee {
    Detainee {
        name: SEEDED[0].into(),
        id_number: SEEDED[1].into(),
        custody_number: "DZ-PII-1".into(),
    }
}

fn lawyer() -> Lawyer {
    Lawyer {
        name: SEEDED[4].into(),
        licence_number: SEEDED[5].into(),
        law_firm: "某律师事务所".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_personal_data_reaches_the_logs() {
    let settings = test_settings(refbus_tests::amqp_url());
    let data_dir = std::env::temp_dir().join(format!("refbus-pii-{}", settings.namespace));
    let up = LoggedUp::start(&settings, &data_dir, "debug").await;
    let channel = |service: &str| up.channel(service);
    let mut centre = GatewayClient::new(channel("detention-centre"));
    let mut desk = GatewayClient::new(channel("legal-aid"));

    // A legal-help request and a letter, both with the detainee's data.
    let request = Envelope {
        sender: CENTRE.into(),
        recipient: DESK.into(),
        clock_started_at: Some(timestamp(Utc::now())),
        idempotency_key: "pii-1".into(),
        payload: Some(Payload::LegalHelpRequest(LegalHelpRequest {
            detainee: Some(detainee()),
            detention_centre: CENTRE.into(),
            matter: SEEDED[2].into(),
        })),
        ..Envelope::default()
    };
    // The lawyer is registered; the letter goes to them through the
    // centre's ForwardLetter, sealed (CQ-1.1c).
    let identity = age::x25519::Identity::generate();
    let token = BarAssociationClient::new(channel("bar-association"))
        .register_lawyer(as_agency(
            "dz-bar-committee",
            RegisterLawyerRequest {
                registrar: "dz-bar-committee".into(),
                lawyer: Some(lawyer()),
                region: "500111".into(),
                letter_keys: vec![identity.to_public().to_string()],
                idempotency_key: "pii-register".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut registry = LawyerRegistryClient::new(channel("lawyer-service"));
    within("the registration to apply", async {
        while registry
            .get_lawyer(GetLawyerRequest {
                licence_number: SEEDED[5].into(),
            })
            .await
            .is_err()
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut sent = Vec::new();
    sent.push(
        centre
            .submit(as_agency(CENTRE, submit(request.clone())))
            .await
            .unwrap()
            .into_inner()
            .id,
    );
    sent.push(
        DetentionCentreClient::new(channel("detention-centre"))
            .forward_letter(as_agency(
                CENTRE,
                ForwardLetterRequest {
                    detention_centre: CENTRE.into(),
                    detainee: Some(detainee()),
                    lawyer_licence: SEEDED[5].into(),
                    disposition: Some(Requested::Content(SEEDED[3].as_bytes().to_vec())),
                    handed_over_at: Some(timestamp(Utc::now())),
                    idempotency_key: "pii-2".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .id,
    );
    // Refused submissions with the same data: the errors go to the caller.
    let mut bad = request.clone();
    bad.recipient = "dz-court".into();
    bad.idempotency_key = "pii-3".into();
    assert!(
        centre
            .submit(as_agency(CENTRE, submit(bad.clone())))
            .await
            .is_err()
    );
    assert!(
        centre.submit(as_agency(DESK, submit(bad))).await.is_err(),
        "acting as another agency"
    );
    // Bytes that are not an envelope, carrying a name, on the desk's inbox.
    let amqp = Amqp::connect().await;
    let inbox_queue = format!("{}.inbox.{DESK}", settings.namespace);
    amqp.publish_raw(
        &inbox_queue,
        format!("{} {}", SEEDED[0], SEEDED[1]).as_bytes(),
    )
    .await;

    // The desk receives the request, acknowledges it, and answers it.
    let mut stream = refbus_tests::inbox_stream_as(&mut desk, DESK).await;
    let mut received = Vec::new();
    while received.is_empty() {
        let delivery = refbus_tests::next_message("a delivery", &mut stream).await;
        desk.acknowledge(as_agency(
            DESK,
            AcknowledgeRequest {
                agency: DESK.into(),
                delivery_token: delivery.delivery_token,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
        received.push(delivery.envelope.unwrap());
    }
    let referral = received.into_iter().find(|e| e.id == sent[0]).unwrap();
    // The lawyer takes the letter and acknowledges it (the lawyer service's
    // paths are in the scan too).
    let mut lawyers = LawyerServiceClient::new(channel("lawyer-service"));
    let bearer = |message| {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let mut letters = lawyers
        .inbox(bearer(LawyerInboxRequest {
            licence_number: SEEDED[5].into(),
            window: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let letter = refbus_tests::next_message("the letter", &mut letters).await;
    let mut ack = tonic::Request::new(LawyerAcknowledgeRequest {
        licence_number: SEEDED[5].into(),
        delivery_token: letter.delivery_token,
        ..Default::default()
    });
    ack.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    lawyers.acknowledge(ack).await.unwrap();
    drop(letters);
    desk.feedback(as_agency(
        DESK,
        FeedbackRequest {
            agency: DESK.into(),
            referral: Some(referral),
            feedback: Some(Feedback {
                outcome: Outcome::LawyerAssigned as i32,
                summary: format!("{} {}", SEEDED[6], SEEDED[4]),
                ..Feedback::default()
            }),
            idempotency_key: "pii-fb".into(),
        },
    ))
    .await
    .unwrap();
    // The tracker has recorded the request and its feedback.
    let mut tracker = TrackerClient::new(channel("tracker"));
    within("the tracker to record the feedback", async {
        loop {
            let status = tracker
                .get_referral(as_agency(
                    CENTRE,
                    GetReferralRequest {
                        agency: CENTRE.into(),
                        referral_id: sent[0].clone(),
                    },
                ))
                .await;
            if let Ok(status) = status
                && status
                    .into_inner()
                    .timeline
                    .iter()
                    .any(|t| t.hop == refbus_proto::v1::Hop::Answered as i32)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(stream);

    let (stdout, stderr) = up.stop().await;
    let logs = format!("{}\n{stderr}", stdout.join("\n"));

    // Standard error is a file, not a terminal: every log line is a JSON
    // object with its level and message (issue 7, structured logs).
    assert!(stderr.lines().count() > 10, "{stderr}");
    for line in stderr.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["timestamp"].is_string(),
            "{line}"
        );
        // Ours carry a message; sqlx's statement events a summary.
        assert!(
            event["message"].is_string() || event["summary"].is_string(),
            "{line}"
        );
    }

    // The scan sees the scenario: its ids are logged ...
    for id in &sent {
        assert!(logs.contains(id.as_str()), "the log mentions referral {id}");
    }
    assert!(
        logs.contains("dead-lettered"),
        "the garbage was dead-lettered"
    );
    // ... and none of the personal data.
    for seeded in SEEDED {
        let line = logs.lines().find(|l| l.contains(seeded));
        assert!(
            line.is_none(),
            "personal data `{seeded}` in a log line: {line:?}"
        );
    }
    amqp.close().await;
    refbus_tests::delete_namespace(&refbus_tests::topology_of(&settings.namespace)).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    refbus_tests::remove_inbox_db(&settings);
}
