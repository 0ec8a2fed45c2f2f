//! Issue 18, the agency side of lawyers: registration at the bar association
//! or justice bureau of the lawyer's region, and answers that go back to
//! lawyers through the lawyer service. Against the real broker, through the
//! real justice-bureau and bar-association services; what reaches the
//! lawyer service is read off its inbox queue.

use prost::Message;
use refbus_core::signing::{self, Signed};
use refbus_core::{Directory, MessageKind, envelope_id};
use refbus_gateway::GatewayError;
use refbus_gateway::registry::{LawyerRegister, token_sha256};
use refbus_gateway::settings::LawyerServiceSettings;
use refbus_proto::v1::bar_association_client::BarAssociationClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::justice_bureau_client::JusticeBureauClient;
use refbus_proto::v1::{
    Acknowledgement, ChangeLawyerStatusRequest, EnterRightsComplaintRequest, Envelope,
    FileRightsComplaintRequest, Lawyer, LawyerStatus, Outcome, RegisterLawyerRequest,
    ReportHandlingResultRequest, RightsComplaint, SubmitRequest,
};
use refbus_tests::register::{PublishedRegister, entry_of, signature_of};
use refbus_tests::{Amqp, Inbox, TestBus, acknowledge, free_port, repo_root, test_settings};
use tonic::Code;
use tonic::transport::Channel;

const BAR: &str = "dz-bar-committee";
const BUREAU: &str = "dz-justice-bureau";
const LAWYER_SERVICE: &str = "lawyer-service";
const LICENCE: &str = "15001201910123456";
const UNREGISTERED: &str = "15001201910999999";

fn directory() -> Directory {
    Directory::load(repo_root().join("deploy/local/directory.toml")).unwrap()
}

fn letter_key() -> String {
    age::x25519::Identity::generate().to_public().to_string()
}

fn lawyer(licence: &str) -> Lawyer {
    Lawyer {
        name: "Wang Li".into(),
        licence_number: licence.into(),
        law_firm: "Dazu Lawyers".into(),
    }
}

fn registration(
    registrar: &str,
    region: &str,
    keys: Vec<String>,
    key: &str,
) -> RegisterLawyerRequest {
    RegisterLawyerRequest {
        registrar: registrar.into(),
        lawyer: Some(lawyer(LICENCE)),
        region: region.into(),
        letter_keys: keys,
        idempotency_key: key.into(),
    }
}

async fn bar_as(bus: &TestBus, agency: &str) -> BarAssociationClient<Channel> {
    BarAssociationClient::new(bus.channel_as("bar-association", agency).await)
}

async fn bureau_as(bus: &TestBus, agency: &str) -> JusticeBureauClient<Channel> {
    JusticeBureauClient::new(bus.channel_as("justice-bureau", agency).await)
}

/// A bus whose agency services ask `register` for lawyers.
async fn bus_with(register: &PublishedRegister) -> TestBus {
    let mut settings = test_settings(refbus_tests::amqp_url());
    settings.lawyer_service.url = register.url();
    TestBus::spawn_with(settings).await
}

/// The one message the lawyer service's queue holds, checked to be signed
/// by its sender, and the envelope; panics on none or more.
async fn only_message_to_lawyers(
    amqp: &Amqp,
    bus: &TestBus,
) -> (lapin::message::BasicGetMessage, Envelope) {
    let queue = bus.inbox_queue(LAWYER_SERVICE);
    let message = amqp
        .get(&queue)
        .await
        .expect("a message to the lawyer service");
    assert_eq!(amqp.counts(&queue).await.0, 0, "exactly one message");
    let envelope = Envelope::decode(message.data.as_slice()).unwrap();
    signing::verify(
        &directory(),
        &envelope.sender,
        Signed::Envelope,
        &message.data,
        Some(&signature_of(&message)),
    )
    .expect("signed by its sender");
    (message, envelope)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_registration_publishes_the_tokens_hash_only_and_a_retry_answers_the_same() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut bar = bar_as(&bus, BAR).await;
    let keys = vec![letter_key(), letter_key()];

    let first = bar
        .register_lawyer(registration(BAR, "500111", keys.clone(), "reg-wang"))
        .await
        .unwrap()
        .into_inner();
    let receipt = first.receipt.unwrap();
    assert_eq!(receipt.recipient, LAWYER_SERVICE);
    assert!(first.token.starts_with("rbl_"), "{}", first.token);

    let (message, envelope) = only_message_to_lawyers(&amqp, &bus).await;
    assert_eq!(envelope.id, receipt.id);
    assert_eq!(envelope.sender, BAR);
    assert_eq!(envelope.kind, MessageKind::LawyerRegistration as i32);
    let Some(Payload::LawyerRegistration(registered)) = envelope.payload else {
        panic!("a lawyer registration");
    };
    assert_eq!(registered.lawyer, Some(lawyer(LICENCE)));
    assert_eq!(registered.region, "500111");
    assert_eq!(registered.letter_keys, keys);
    assert_eq!(registered.status, LawyerStatus::Active as i32);
    assert_eq!(registered.token_sha256, token_sha256(&first.token));
    // The token itself travels nowhere: not in the body, not in a header.
    assert!(!contains(&message.data, first.token.as_bytes()));
    assert!(!contains(
        &message.data,
        first.token.trim_start_matches("rbl_").as_bytes()
    ));
    let headers = format!("{:?}", message.properties.headers());
    assert!(!headers.contains(first.token.trim_start_matches("rbl_")));

    // A retry: the same registration, the same token.
    let again = bar
        .register_lawyer(registration(BAR, "500111", keys.clone(), "reg-wang"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.token, first.token);
    assert_eq!(again.receipt.unwrap().id, receipt.id);
    let (_, copy) = only_message_to_lawyers(&amqp, &bus).await;
    assert_eq!(copy.id, receipt.id);
    // Another key: another registration, another token.
    let other = bar
        .register_lawyer(registration(BAR, "500111", keys, "reg-wang-2"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.token, first.token);
    assert_ne!(other.receipt.unwrap().id, receipt.id);

    amqp.close().await;
    bus.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_refused_registrations_publish_nothing() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue(LAWYER_SERVICE);
    let mut bar = bar_as(&bus, BAR).await;

    // CQ-1.1c: a key no letter can be sealed to.
    let e = bar
        .register_lawyer(registration(
            BAR,
            "500111",
            vec![letter_key(), "age1notakey".into()],
            "bad-key",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("letter_keys[1]:"),
        "{}",
        e.message()
    );
    let e = bar
        .register_lawyer(registration(BAR, "500111", Vec::new(), "no-key"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("letter_keys:"), "{}", e.message());

    // A registrar of another region: Dazu's committee registers Dazu's lawyers.
    for region in ["500112", "310000", "500000"] {
        let e = bar
            .register_lawyer(registration(BAR, region, vec![letter_key()], "elsewhere"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message()
                .starts_with("registry: `dz-bar-committee` registers lawyers of 500111 only"),
            "{}",
            e.message()
        );
    }

    // Acting as another agency: Dazu's committee is not Yubei's.
    let e = bar
        .register_lawyer(registration(
            "yb-bar-committee",
            "500112",
            vec![letter_key()],
            "as-yubei",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("registrar:"), "{}", e.message());

    // A malformed licence, and no name.
    let mut bad = registration(BAR, "500111", vec![letter_key()], "bad-licence");
    bad.lawyer.as_mut().unwrap().licence_number = "15-0012".into();
    let e = bar.register_lawyer(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("lawyer.licence_number:"),
        "{}",
        e.message()
    );
    let mut nameless = registration(BAR, "500111", vec![letter_key()], "nameless");
    nameless.lawyer.as_mut().unwrap().name = " ".into();
    let e = bar.register_lawyer(nameless).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    assert_eq!(
        amqp.counts(&queue).await.0,
        0,
        "nothing refused is published"
    );
    amqp.close().await;
    bus.stop().await;
}

/// A rights complaint the lawyer filed through the lawyer service, signed
/// by it, as it reaches the justice bureau's inbox.
fn complaint_from_the_lawyer(key: &str) -> Envelope {
    Envelope {
        id: envelope_id(LAWYER_SERVICE, key),
        kind: MessageKind::RightsComplaint as i32,
        sender: LAWYER_SERVICE.into(),
        recipient: BUREAU.into(),
        submitted_at: Some(refbus_gateway::gateway::now()),
        clock_started_at: Some(refbus_gateway::gateway::now()),
        idempotency_key: key.into(),
        from_lawyer: LICENCE.into(),
        payload: Some(Payload::RightsComplaint(RightsComplaint {
            complainant: Some(lawyer(LICENCE)),
            respondent: "dz-detention-centre".into(),
            description: "refused a meeting without reason".into(),
            hearing_requested: true,
        })),
        ..Envelope::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_3_13_the_result_of_a_lawyers_complaint_goes_back_to_the_lawyer() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    amqp.publish_envelope(&bus.inbox_queue(BUREAU), &complaint_from_the_lawyer("c-1"))
        .await;
    let mut gateway = bus.gateway_as("justice-bureau", BUREAU).await;
    let mut inbox = Inbox::open(&mut gateway, BUREAU).await;
    let delivery = inbox.next().await;
    let complaint = delivery.envelope.clone().unwrap();
    acknowledge(&mut gateway, BUREAU, delivery.delivery_token).await;

    // An acknowledgement to the lawyer service is addressed to the lawyer
    // who complained, found from the delivery; no other lawyer may be named.
    let ack = |key: &str, to_lawyers: Vec<String>| SubmitRequest {
        envelope: Some(Envelope {
            sender: BUREAU.into(),
            recipient: LAWYER_SERVICE.into(),
            in_reply_to: complaint.id.clone(),
            idempotency_key: key.into(),
            to_lawyers,
            payload: Some(Payload::Acknowledgement(Acknowledgement {
                note: "taken in hand".into(),
            })),
            ..Envelope::default()
        }),
    };
    let e = gateway
        .submit(ack("ack-other", vec![UNREGISTERED.into()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("CQ-3.13:"), "{}", e.message());
    gateway.submit(ack("ack-1", Vec::new())).await.unwrap();
    let (_, acknowledgement) = only_message_to_lawyers(&amqp, &bus).await;
    assert_eq!(acknowledgement.to_lawyers, [LICENCE]);
    assert_eq!(acknowledgement.in_reply_to, complaint.id);

    // The result, reported by the bureau: to the lawyer service, for the lawyer.
    let mut bureau = bureau_as(&bus, BUREAU).await;
    let receipt = bureau
        .report_handling_result(ReportHandlingResultRequest {
            justice_bureau: BUREAU.into(),
            outcome: Outcome::Substantiated as i32,
            summary: "the centre is told to arrange meetings at once".into(),
            idempotency_key: "result-1".into(),
            referral: Some(complaint.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, LAWYER_SERVICE);
    let (_, feedback) = only_message_to_lawyers(&amqp, &bus).await;
    assert_eq!(feedback.id, receipt.id);
    assert_eq!(feedback.sender, BUREAU);
    assert_eq!(feedback.to_lawyers, [LICENCE]);
    assert_eq!(feedback.in_reply_to, complaint.id);
    assert!(
        matches!(feedback.payload, Some(Payload::Feedback(f)) if f.outcome == Outcome::Substantiated as i32)
    );

    amqp.close().await;
    bus.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_3_13_a_complaint_taken_at_the_window_reaches_the_body_and_its_result_the_lawyer() {
    let register = PublishedRegister::start().await;
    let bus = bus_with(&register).await;
    let amqp = Amqp::connect().await;
    let mut bar = bar_as(&bus, BAR).await;
    let mut bureau = bureau_as(&bus, BUREAU).await;
    let window = |licence: &str, key: &str| EnterRightsComplaintRequest {
        agency: BUREAU.into(),
        investigated_by: String::new(),
        complaint: Some(RightsComplaint {
            // Only the licence: the rest comes from the register.
            complainant: Some(Lawyer {
                licence_number: licence.into(),
                ..Lawyer::default()
            }),
            respondent: "dz-detention-centre".into(),
            description: "made to wait two days for a meeting".into(),
            hearing_requested: false,
        }),
        idempotency_key: key.into(),
    };

    // Nobody registered the lawyer yet: NOT_FOUND, nothing published.
    let e = bureau
        .enter_rights_complaint(window(LICENCE, "w-0"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "complaint.complainant.licence_number: lawyer `{LICENCE}` is not registered on the bus"
        )
    );
    assert_eq!(amqp.counts(&bus.inbox_queue(BUREAU)).await.0, 0);

    // Registered by Dazu's bar committee; the register serves what it signed.
    let keys = vec![letter_key()];
    bar.register_lawyer(registration(BAR, "500111", keys.clone(), "reg-1"))
        .await
        .unwrap();
    let (message, _) = only_message_to_lawyers(&amqp, &bus).await;
    register.insert(entry_of(&message));

    let receipt = bureau
        .enter_rights_complaint(window(LICENCE, "w-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        receipt.recipient, BUREAU,
        "investigated by the body that took it"
    );
    let mut gateway = bus.gateway_as("justice-bureau", BUREAU).await;
    let mut inbox = Inbox::open(&mut gateway, BUREAU).await;
    let delivery = inbox.next().await;
    let complaint = delivery.envelope.clone().unwrap();
    assert_eq!(complaint.id, receipt.id);
    assert_eq!(complaint.sender, BUREAU);
    assert!(complaint.from_lawyer.is_empty());
    let Some(Payload::RightsComplaint(entered)) = &complaint.payload else {
        panic!("a rights complaint");
    };
    assert_eq!(
        entered.complainant,
        Some(lawyer(LICENCE)),
        "from the register"
    );
    acknowledge(&mut gateway, BUREAU, delivery.delivery_token).await;

    // The result goes to the body, and to the lawyer through the lawyer service.
    let receipt = bureau
        .report_handling_result(ReportHandlingResultRequest {
            justice_bureau: BUREAU.into(),
            outcome: Outcome::Heard as i32,
            summary: "heard in person; the centre is told".into(),
            idempotency_key: "w-result".into(),
            referral: Some(complaint.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, BUREAU);
    assert_eq!(receipt.also_to, [LAWYER_SERVICE]);
    let (_, feedback) = only_message_to_lawyers(&amqp, &bus).await;
    assert_eq!(feedback.id, receipt.id);
    assert_eq!(feedback.to_lawyers, [LICENCE]);
    assert_eq!(feedback.in_reply_to, complaint.id);
    let copy = inbox.next().await;
    assert_eq!(
        copy.envelope.unwrap().id,
        receipt.id,
        "the body has the result too"
    );
    acknowledge(&mut gateway, BUREAU, copy.delivery_token).await;

    // A complaint filed for a lawyer nobody registered: the body's answer only.
    let filed = bar
        .file_rights_complaint(FileRightsComplaintRequest {
            bar_association: BAR.into(),
            investigated_by: BUREAU.into(),
            complaint: Some(RightsComplaint {
                complainant: Some(lawyer(UNREGISTERED)),
                respondent: "dz-detention-centre".into(),
                description: "searched before a meeting".into(),
                hearing_requested: false,
            }),
            idempotency_key: "filed-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let delivered = inbox.next().await.envelope.unwrap();
    assert_eq!(delivered.id, filed.id);
    let answer = bureau
        .report_handling_result(ReportHandlingResultRequest {
            justice_bureau: BUREAU.into(),
            outcome: Outcome::Unsubstantiated as i32,
            summary: "no search took place".into(),
            idempotency_key: "filed-result".into(),
            referral: Some(delivered),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.recipient, BAR);
    assert!(answer.also_to.is_empty(), "{:?}", answer.also_to);
    assert_eq!(amqp.counts(&bus.inbox_queue(LAWYER_SERVICE)).await.0, 0);

    register.stop();
    amqp.close().await;
    bus.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_suspension_and_reinstatement_come_from_the_lawyers_registrar() {
    let register = PublishedRegister::start().await;
    let bus = bus_with(&register).await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue(LAWYER_SERVICE);
    let mut bar = bar_as(&bus, BAR).await;
    let change = |registrar: &str, licence: &str, key: &str| ChangeLawyerStatusRequest {
        registrar: registrar.into(),
        licence_number: licence.into(),
        reason: "under investigation".into(),
        idempotency_key: key.into(),
    };

    let e = bar
        .suspend_lawyer(change(BAR, LICENCE, "s-0"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        e.message(),
        format!("licence_number: lawyer `{LICENCE}` is not registered on the bus")
    );

    let keys = vec![letter_key(), letter_key()];
    bar.register_lawyer(registration(BAR, "500111", keys.clone(), "reg-1"))
        .await
        .unwrap();
    let (message, _) = only_message_to_lawyers(&amqp, &bus).await;
    register.insert(entry_of(&message));

    // Yubei's committee does not suspend a Dazu lawyer.
    let mut yubei = bar_as(&bus, "yb-bar-committee").await;
    let e = yubei
        .suspend_lawyer(change("yb-bar-committee", LICENCE, "s-yb"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .starts_with("registry: `yb-bar-committee` registers lawyers of 500112 only"),
        "{}",
        e.message()
    );
    assert_eq!(amqp.counts(&queue).await.0, 0);

    bar.suspend_lawyer(change(BAR, LICENCE, "s-1"))
        .await
        .unwrap();
    let (message, suspension) = only_message_to_lawyers(&amqp, &bus).await;
    let Some(Payload::LawyerRegistration(suspended)) = &suspension.payload else {
        panic!("a lawyer registration");
    };
    assert_eq!(suspended.status, LawyerStatus::Suspended as i32);
    assert_eq!(suspended.letter_keys, keys);
    assert_eq!(suspended.region, "500111");
    assert!(suspended.token_sha256.is_empty());
    assert_eq!(suspended.reason, "under investigation");
    register.insert(entry_of(&message));

    // The municipal bureau covers Dazu too.
    let mut cq = bureau_as(&bus, "cq-justice-bureau").await;
    cq.reinstate_lawyer(change("cq-justice-bureau", LICENCE, "r-1"))
        .await
        .unwrap();
    let (_, reinstatement) = only_message_to_lawyers(&amqp, &bus).await;
    assert_eq!(reinstatement.sender, "cq-justice-bureau");
    assert!(matches!(
        reinstatement.payload,
        Some(Payload::LawyerRegistration(r)) if r.status == LawyerStatus::Active as i32 && r.letter_keys == keys
    ));

    register.stop();
    amqp.close().await;
    bus.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_a_register_out_of_reach_is_unavailable_and_a_malformed_licence_invalid() {
    let directory = std::sync::Arc::new(directory());
    let settings = LawyerServiceSettings {
        url: format!("http://127.0.0.1:{}", free_port()),
        ..LawyerServiceSettings::default()
    };
    let register = LawyerRegister::connect(&settings, &directory).unwrap();
    let e = register.get("licence_number", LICENCE).await.unwrap_err();
    assert!(matches!(e, GatewayError::RegisterUnavailable(_)), "{e:?}");
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().ends_with("nothing was published"),
        "{}",
        status.message()
    );
    let e = register.get("licence_number", "x").await.unwrap_err();
    assert_eq!(tonic::Status::from(e).code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agency_service_refuses_to_start_on_a_bad_policy_naming_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("refbus-policy-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("defaults.toml");
    std::fs::write(
        &file,
        "[durations]\npromptly = \"2 working days\"\nfast = \"soon\"\n",
    )
    .unwrap();
    let mut settings = test_settings(refbus_tests::amqp_url());
    settings.policy.clone_from(&dir);
    let shared =
        refbus_gateway::Shared::connect(settings, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
    let e = refbus_gateway::Application::build(
        refbus_gateway::AgencyService::JusticeBureau,
        &shared,
        "127.0.0.1:0".parse().unwrap(),
        &[],
    )
    .await
    .err()
    .expect("a bad policy stops start-up");
    let message = e.to_string();
    assert!(message.starts_with("REFBUS_POLICY: "), "{message}");
    assert!(
        message.contains(&format!("{}:3", file.display())),
        "{message}"
    );
    shared.shutdown.cancel();
    shared.bus.close().await;
    refbus_tests::delete_namespace(shared.bus.topology()).await;
    refbus_tests::remove_inbox_db(&shared.settings);
    let _ = std::fs::remove_dir_all(&dir);
}
