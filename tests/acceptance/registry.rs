//! Issue 18, the agency side of lawyers: registration at the bar association
//! or justice bureau of the lawyer's region, and answers that go back to
//! lawyers through the lawyer service. Against the real broker, through the
//! real justice-bureau and bar-association services. What is published to
//! the lawyer service is read off its inbox queue where no lawyer service
//! runs (the five agency services only), and off a tap queue bound beside
//! it where the real lawyer service keeps the register; what reaches a
//! lawyer is read from their own inbox at the real lawyer service.

use prost::Message;
use refbus_core::Directory;
use refbus_core::MessageKind;
use refbus_core::signing::{self, Signed};
use refbus_gateway::registry::{LawyerRegister, token_sha256};
use refbus_gateway::settings::LawyerServiceSettings;
use refbus_gateway::{AgencyService, GatewayError};
use refbus_proto::v1::bar_association_client::BarAssociationClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::justice_bureau_client::JusticeBureauClient;
use refbus_proto::v1::lawyer_service_client::LawyerServiceClient;
use refbus_proto::v1::{
    AcknowledgeRequest, Acknowledgement, ChangeLawyerStatusRequest, Delivery,
    EnterRightsComplaintRequest, Envelope, FileComplaintRequest, FileRightsComplaintRequest,
    GetLawyerRequest, Lawyer, LawyerEntry, LawyerInboxRequest, LawyerStatus, Outcome,
    RegisterLawyerRequest, ReportHandlingResultRequest, RightsComplaint, SubmitRequest,
};
use refbus_tests::lawyers::{LawyerInbox, LawyerWorld, RegisteredLawyer, plain_channel};
use refbus_tests::{Amqp, TestBus, as_agency, free_port, repo_root, test_settings, within};
use tonic::Code;
use tonic::transport::Channel;

const BAR: &str = "dz-bar-committee";
const BUREAU: &str = "dz-justice-bureau";
const LAWYER_SERVICE: &str = "lawyer-service";
const LICENCE: &str = "15001201910123456";
const UNREGISTERED: &str = "15001201910999999";
/// Another Dazu lawyer, registered where a test needs two.
const OTHER: &str = "15001201910654321";

/// The five agency services: nothing consumes the lawyer service's queue.
const AGENCY_SERVICES: [AgencyService; 5] = [
    AgencyService::DetentionCentre,
    AgencyService::CaseUnit,
    AgencyService::LegalAid,
    AgencyService::JusticeBureau,
    AgencyService::BarAssociation,
];

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

/// The five agency services, without the lawyer service.
async fn agency_services() -> TestBus {
    TestBus::spawn_services(test_settings(refbus_tests::amqp_url()), &AGENCY_SERVICES).await
}

async fn bar_as(bus: &TestBus, agency: &str) -> BarAssociationClient<Channel> {
    BarAssociationClient::new(bus.channel_as("bar-association", agency).await)
}

/// A bar-association client of a [`LawyerWorld`] (calls carry [`as_agency`]).
async fn bar_of(world: &LawyerWorld) -> BarAssociationClient<Channel> {
    BarAssociationClient::new(plain_channel(world.bus.addr("bar-association")).await)
}

/// A justice-bureau client of a [`LawyerWorld`] (calls carry [`as_agency`]).
async fn bureau_of(world: &LawyerWorld) -> JusticeBureauClient<Channel> {
    JusticeBureauClient::new(plain_channel(world.bus.addr("justice-bureau")).await)
}

/// Registers [`LICENCE`] of Dazu (500111) with `keys` through Dazu's bar
/// committee's `RegisterLawyer`, and waits until the lawyer service's
/// register shows them: the lawyer, with the token the RPC issued and
/// `identity` (whose public key is the first of `keys`).
async fn register_through_the_bar(
    world: &LawyerWorld,
    identity: age::x25519::Identity,
    keys: Vec<String>,
) -> RegisteredLawyer {
    assert_eq!(keys[0], identity.to_public().to_string());
    let registered = bar_of(world)
        .await
        .register_lawyer(as_agency(BAR, registration(BAR, "500111", keys, "reg-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.receipt.unwrap().recipient, LAWYER_SERVICE);
    world.wait_for_status(LICENCE, LawyerStatus::Active).await;
    let lawyer = lawyer(LICENCE);
    RegisteredLawyer {
        licence: lawyer.licence_number,
        name: lawyer.name,
        law_firm: lawyer.law_firm,
        region: "500111".into(),
        token: registered.token,
        identity,
    }
}

/// `licence`'s entry in the real lawyer service's register.
async fn entry(world: &LawyerWorld, licence: &str) -> LawyerEntry {
    world
        .registry()
        .await
        .get_lawyer(GetLawyerRequest {
            licence_number: licence.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The signature header of a message taken off a queue.
fn signature_of(message: &lapin::message::BasicGetMessage) -> String {
    let headers = message.properties.headers().clone().unwrap_or_default();
    match headers.inner().get(signing::SIGNATURE_HEADER) {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("no signature header: {other:?}"),
    }
}

/// The one message `queue` holds, checked to be signed by its sender, and
/// the envelope; panics on none or more.
async fn only_message_on(amqp: &Amqp, queue: &str) -> (lapin::message::BasicGetMessage, Envelope) {
    let message = within("a message to the lawyer service", async {
        loop {
            if let Some(message) = amqp.get(queue).await {
                return message;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(amqp.counts(queue).await.0, 0, "exactly one message");
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

/// The one message the lawyer service's inbox queue holds (no lawyer
/// service running).
async fn only_message_to_lawyers(
    amqp: &Amqp,
    bus: &TestBus,
) -> (lapin::message::BasicGetMessage, Envelope) {
    only_message_on(amqp, &bus.inbox_queue(LAWYER_SERVICE)).await
}

/// A queue of the test's own bound beside the lawyer service's inbox queue
/// (routing keys `lawyer-service.*`): a copy of everything published to the
/// lawyer service while the real one consumes its queue. Exclusive to
/// `amqp`'s connection, gone with it.
async fn tap_to_lawyers(amqp: &Amqp, bus: &TestBus) -> String {
    amqp.spy(bus, &format!("{LAWYER_SERVICE}.*")).await
}

/// An agency's open `Inbox` (bearer token).
struct AgencyInbox {
    agency: &'static str,
    client: GatewayClient<Channel>,
    stream: tonic::Streaming<Delivery>,
}

impl AgencyInbox {
    async fn open(world: &LawyerWorld, service: &str, agency: &'static str) -> Self {
        let mut client = world.gateway(service).await;
        let stream = refbus_tests::inbox_stream_as(&mut client, agency).await;
        Self {
            agency,
            client,
            stream,
        }
    }

    /// The next delivery's envelope, acknowledged.
    async fn next(&mut self) -> Envelope {
        let delivery = within("an inbox delivery", self.stream.message())
            .await
            .expect("inbox stream healthy")
            .expect("inbox stream open");
        self.client
            .acknowledge(as_agency(
                self.agency,
                AcknowledgeRequest {
                    agency: self.agency.into(),
                    delivery_token: delivery.delivery_token,
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        delivery.envelope.expect("an envelope")
    }
}

/// The next envelope in `lawyer`'s inbox at the lawyer service, acknowledged.
async fn next_to_the_lawyer(
    client: &mut LawyerServiceClient<Channel>,
    inbox: &mut LawyerInbox,
    lawyer: &RegisteredLawyer,
) -> Envelope {
    let delivery = inbox.next().await;
    refbus_tests::lawyers::acknowledge_lawyer(client, lawyer, delivery.delivery_token).await;
    delivery.envelope.expect("an envelope")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_registration_publishes_the_tokens_hash_only_and_a_retry_answers_the_same() {
    let bus = agency_services().await;
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
    let bus = agency_services().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_3_13_the_result_of_a_lawyers_complaint_goes_back_to_the_lawyer() {
    let world = LawyerWorld::start().await;
    let tap = tap_to_lawyers(&world.amqp, &world.bus).await;
    let identity = age::x25519::Identity::generate();
    let keys = vec![identity.to_public().to_string()];
    let lawyer = register_through_the_bar(&world, identity, keys).await;
    only_message_on(&world.amqp, &tap).await; // the registration
    let mut lawyers = world.lawyers().await;
    let mut to_lawyer = LawyerInbox::open(&mut lawyers, &lawyer).await;

    // The lawyer files the complaint through the lawyer service.
    let filed = lawyers
        .file_complaint(lawyer.request(FileComplaintRequest {
            licence_number: LICENCE.into(),
            investigated_by: BUREAU.into(),
            respondent: "dz-detention-centre".into(),
            description: "refused a meeting without reason".into(),
            hearing_requested: true,
            idempotency_key: "c-1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filed.recipient, BUREAU);
    let mut at_bureau = AgencyInbox::open(&world, "justice-bureau", BUREAU).await;
    let complaint = at_bureau.next().await;
    assert_eq!(complaint.id, filed.id);
    assert_eq!(complaint.sender, LAWYER_SERVICE);
    assert_eq!(complaint.from_lawyer, LICENCE);
    assert!(
        matches!(&complaint.payload, Some(Payload::RightsComplaint(c)) if c.complainant == Some(lawyer.lawyer()))
    );

    // An acknowledgement to the lawyer service is addressed to the lawyer
    // who complained, found from the delivery; no other lawyer may be named.
    let mut gateway = world.gateway("justice-bureau").await;
    let ack = |key: &str, to_lawyers: Vec<String>| {
        as_agency(
            BUREAU,
            SubmitRequest {
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
            },
        )
    };
    let other = world.register(BAR, OTHER, "500111").await;
    let mut to_other = LawyerInbox::open(&mut lawyers, &other).await;
    let e = gateway
        .submit(ack("ack-other", vec![OTHER.into()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("CQ-3.13:"), "{}", e.message());
    let e = gateway
        .submit(ack("ack-nobody", vec![UNREGISTERED.into()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    gateway.submit(ack("ack-1", Vec::new())).await.unwrap();
    let (_, published) = only_message_on(&world.amqp, &tap).await;
    assert_eq!(published.to_lawyers, [LICENCE]);
    let acknowledgement = next_to_the_lawyer(&mut lawyers, &mut to_lawyer, &lawyer).await;
    assert_eq!(acknowledgement.id, published.id);
    assert_eq!(acknowledgement.to_lawyers, [LICENCE]);
    assert_eq!(acknowledgement.in_reply_to, complaint.id);
    assert!(matches!(
        acknowledgement.payload,
        Some(Payload::Acknowledgement(_))
    ));

    // The result, reported by the bureau: to the lawyer service, for the lawyer.
    let receipt = bureau_of(&world)
        .await
        .report_handling_result(as_agency(
            BUREAU,
            ReportHandlingResultRequest {
                justice_bureau: BUREAU.into(),
                outcome: Outcome::Substantiated as i32,
                summary: "the centre is told to arrange meetings at once".into(),
                idempotency_key: "result-1".into(),
                referral: Some(complaint.clone()),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, LAWYER_SERVICE);
    let (_, published) = only_message_on(&world.amqp, &tap).await;
    assert_eq!(published.id, receipt.id);
    let feedback = next_to_the_lawyer(&mut lawyers, &mut to_lawyer, &lawyer).await;
    assert_eq!(feedback.id, receipt.id);
    assert_eq!(feedback.sender, BUREAU);
    assert_eq!(feedback.to_lawyers, [LICENCE]);
    assert_eq!(feedback.in_reply_to, complaint.id);
    assert!(
        matches!(feedback.payload, Some(Payload::Feedback(f)) if f.outcome == Outcome::Substantiated as i32)
    );
    assert_eq!(world.amqp.counts(&tap).await.0, 0, "nothing else published");
    assert!(
        to_other
            .next_within(std::time::Duration::from_millis(500))
            .await
            .is_none(),
        "one lawyer never sees another's"
    );

    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_3_13_a_complaint_taken_at_the_window_reaches_the_body_and_its_result_the_lawyer() {
    let world = LawyerWorld::start().await;
    let tap = tap_to_lawyers(&world.amqp, &world.bus).await;
    let mut bureau = bureau_of(&world).await;
    let window = |licence: &str, key: &str| {
        as_agency(
            BUREAU,
            EnterRightsComplaintRequest {
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
            },
        )
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
    assert_eq!(world.amqp.counts(&world.bus.inbox_queue(BUREAU)).await.0, 0);

    // Registered by Dazu's bar committee, through its RPC; the real lawyer
    // service's register serves what it signed.
    let identity = age::x25519::Identity::generate();
    let keys = vec![identity.to_public().to_string()];
    let wang = register_through_the_bar(&world, identity, keys).await;
    only_message_on(&world.amqp, &tap).await; // the registration
    let mut lawyers = world.lawyers().await;
    let mut to_lawyer = LawyerInbox::open(&mut lawyers, &wang).await;

    let receipt = bureau
        .enter_rights_complaint(window(LICENCE, "w-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        receipt.recipient, BUREAU,
        "investigated by the body that took it"
    );
    let mut inbox = AgencyInbox::open(&world, "justice-bureau", BUREAU).await;
    let complaint = inbox.next().await;
    assert_eq!(
        complaint.id, receipt.id,
        "the first: nothing of w-0 before it"
    );
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

    // The result goes to the body, and to the lawyer through the lawyer service.
    let receipt = bureau
        .report_handling_result(as_agency(
            BUREAU,
            ReportHandlingResultRequest {
                justice_bureau: BUREAU.into(),
                outcome: Outcome::Heard as i32,
                summary: "heard in person; the centre is told".into(),
                idempotency_key: "w-result".into(),
                referral: Some(complaint.clone()),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, BUREAU);
    assert_eq!(receipt.also_to, [LAWYER_SERVICE]);
    let (_, published) = only_message_on(&world.amqp, &tap).await;
    assert_eq!(published.id, receipt.id);
    let feedback = next_to_the_lawyer(&mut lawyers, &mut to_lawyer, &wang).await;
    assert_eq!(feedback.id, receipt.id);
    assert_eq!(feedback.to_lawyers, [LICENCE]);
    assert_eq!(feedback.in_reply_to, complaint.id);
    assert!(
        matches!(feedback.payload, Some(Payload::Feedback(f)) if f.outcome == Outcome::Heard as i32)
    );
    let copy = inbox.next().await;
    assert_eq!(copy.id, receipt.id, "the body has the result too");

    // A complaint filed for a lawyer nobody registered: the body's answer only.
    let filed = bar_of(&world)
        .await
        .file_rights_complaint(as_agency(
            BAR,
            FileRightsComplaintRequest {
                bar_association: BAR.into(),
                investigated_by: BUREAU.into(),
                complaint: Some(RightsComplaint {
                    complainant: Some(lawyer(UNREGISTERED)),
                    respondent: "dz-detention-centre".into(),
                    description: "searched before a meeting".into(),
                    hearing_requested: false,
                }),
                idempotency_key: "filed-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let delivered = inbox.next().await;
    assert_eq!(delivered.id, filed.id);
    let answer = bureau
        .report_handling_result(as_agency(
            BUREAU,
            ReportHandlingResultRequest {
                justice_bureau: BUREAU.into(),
                outcome: Outcome::Unsubstantiated as i32,
                summary: "no search took place".into(),
                idempotency_key: "filed-result".into(),
                referral: Some(delivered),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.recipient, BAR);
    assert!(answer.also_to.is_empty(), "{:?}", answer.also_to);
    assert_eq!(world.amqp.counts(&tap).await.0, 0, "nothing to lawyers");
    assert!(
        to_lawyer
            .next_within(std::time::Duration::from_millis(500))
            .await
            .is_none(),
        "nothing more to the registered lawyer"
    );

    world.stop().await;
}

/// The registration envelope `entry` holds, checked against its registrar's
/// signature.
fn signed_registration(entry: &LawyerEntry) -> Envelope {
    signing::verify(
        &directory(),
        &entry.registered_by,
        Signed::Envelope,
        &entry.signed_registration,
        Some(&entry.signature),
    )
    .expect("signed by its registrar");
    Envelope::decode(entry.signed_registration.as_slice()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_suspension_and_reinstatement_come_from_the_lawyers_registrar() {
    let world = LawyerWorld::start().await;
    let tap = tap_to_lawyers(&world.amqp, &world.bus).await;
    let mut bar = bar_of(&world).await;
    let change = |registrar: &str, licence: &str, key: &str| {
        as_agency(
            registrar,
            ChangeLawyerStatusRequest {
                registrar: registrar.into(),
                licence_number: licence.into(),
                reason: "under investigation".into(),
                idempotency_key: key.into(),
            },
        )
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

    let identity = age::x25519::Identity::generate();
    let keys = vec![identity.to_public().to_string(), letter_key()];
    let lawyer = register_through_the_bar(&world, identity, keys.clone()).await;
    only_message_on(&world.amqp, &tap).await; // the registration
    let mut lawyers = world.lawyers().await;
    let inbox_of = |lawyer: &RegisteredLawyer| {
        lawyer.request(LawyerInboxRequest {
            licence_number: lawyer.licence.clone(),
            window: 0,
        })
    };
    lawyers.inbox(inbox_of(&lawyer)).await.expect("active");

    // Yubei's committee does not suspend a Dazu lawyer.
    let mut yubei = bar_of(&world).await;
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
    assert_eq!(world.amqp.counts(&tap).await.0, 0, "nothing published");

    let suspension = bar
        .suspend_lawyer(change(BAR, LICENCE, "s-1"))
        .await
        .unwrap()
        .into_inner();
    let (_, published) = only_message_on(&world.amqp, &tap).await;
    assert_eq!(published.id, suspension.id);
    assert_eq!(published.sender, BAR);
    let Some(Payload::LawyerRegistration(suspended)) = &published.payload else {
        panic!("a lawyer registration");
    };
    assert_eq!(suspended.status, LawyerStatus::Suspended as i32);
    assert_eq!(suspended.letter_keys, keys);
    assert_eq!(suspended.region, "500111");
    assert!(suspended.token_sha256.is_empty());
    assert_eq!(suspended.reason, "under investigation");
    // The real lawyer service applies it: the register shows the lawyer
    // suspended, with the keys their registrar signed, and refuses them.
    world
        .wait_for_status(LICENCE, LawyerStatus::Suspended)
        .await;
    let suspended = entry(&world, LICENCE).await;
    assert_eq!(suspended.registered_by, BAR);
    assert_eq!(suspended.registration.as_ref().unwrap().letter_keys, keys);
    signed_registration(&suspended);
    let e = lawyers.inbox(inbox_of(&lawyer)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "suspended: {e:?}");
    assert!(e.message().contains(LICENCE), "{}", e.message());

    // The municipal bureau covers Dazu too.
    let reinstatement = bureau_of(&world)
        .await
        .reinstate_lawyer(change("cq-justice-bureau", LICENCE, "r-1"))
        .await
        .unwrap()
        .into_inner();
    let (_, published) = only_message_on(&world.amqp, &tap).await;
    assert_eq!(published.id, reinstatement.id);
    assert_eq!(published.sender, "cq-justice-bureau");
    assert!(matches!(
        published.payload,
        Some(Payload::LawyerRegistration(r)) if r.status == LawyerStatus::Active as i32 && r.letter_keys == keys
    ));
    world.wait_for_status(LICENCE, LawyerStatus::Active).await;
    let reinstated = entry(&world, LICENCE).await;
    assert_eq!(reinstated.registration.as_ref().unwrap().letter_keys, keys);
    signed_registration(&reinstated);
    // The token the registration issued works again.
    lawyers.inbox(inbox_of(&lawyer)).await.expect("reinstated");

    world.stop().await;
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

/// Issue 17: the register keeps a registration with its registrar's own
/// signature, as the entry's proof. A plain AMQP publisher with the bar's
/// key puts a genuine registration in a batch signed once, with no
/// signature of its own: the lawyer service refuses it with the reason,
/// the register unchanged; the same registration alone, with its own
/// signature, is registered. (refbus's own lanes give a registration its
/// own signature in a batch too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_a_registration_only_listed_in_a_batch_signed_once_is_refused() {
    use lapin::BasicProperties;
    use refbus_bus::Topology;
    use refbus_bus::subscription::{
        ENVELOPE_BATCH_CONTENT_TYPE, ENVELOPE_BATCH_TYPE, REASON_HEADER, header_text,
    };
    use refbus_core::signing::development_signature;
    use refbus_proto::v1::{EnvelopeBatch, SignedEnvelope};

    let world = LawyerWorld::start().await;
    let spy = tap_to_lawyers(&world.amqp, &world.bus).await;
    let identity = age::x25519::Identity::generate();
    let keys = vec![identity.to_public().to_string()];
    register_through_the_bar(&world, identity, keys).await;
    let (_, genuine) = only_message_on(&world.amqp, &spy).await;
    // Another lawyer's registration, genuinely the bar's (its key signs it).
    let mut other = genuine.clone();
    other.id = refbus_core::envelope::envelope_id(BAR, "reg-other-listed");
    other.idempotency_key = "reg-other-listed".into();
    let Some(Payload::LawyerRegistration(registration)) = other.payload.as_mut() else {
        panic!("a lawyer registration");
    };
    registration.lawyer = Some(lawyer(OTHER));
    let body = other.encode_to_vec();
    let digests = signing::digest_list([body.as_slice()]);
    let batch = EnvelopeBatch {
        envelopes: vec![SignedEnvelope {
            envelope: body.clone(),
            signature: String::new(),
            id: other.id.clone(),
            kind: "lawyer_registration".into(),
        }],
        digests_signature: development_signature(BAR, Signed::EnvelopeDigests, &digests),
        digests,
    };
    let key = Topology::routing_key(LAWYER_SERVICE, "lawyer_registration");
    world
        .amqp
        .publish_on_bus(
            &world.bus,
            &key,
            &batch.encode_to_vec(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_type(ENVELOPE_BATCH_TYPE.into())
                .with_content_type(ENVELOPE_BATCH_CONTENT_TYPE.into()),
        )
        .await;
    let dead_letters = world.bus.shared.bus.topology().dead_letter();
    let refused = within("the listed registration refused", async {
        loop {
            if let Some(message) = world.amqp.get(&dead_letters).await {
                return message;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let reason = header_text(&refused.properties, REASON_HEADER).unwrap_or_default();
    assert!(
        reason.contains("must carry its registrar's own signature"),
        "{reason}"
    );
    assert_eq!(refused.data, body, "the registration alone");
    let missing = world
        .registry()
        .await
        .get_lawyer(GetLawyerRequest {
            licence_number: OTHER.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "the register unchanged");

    // Alone, with its own signature: registered.
    let mut own_signature = lapin::types::FieldTable::default();
    own_signature.insert(
        signing::SIGNATURE_HEADER.into(),
        lapin::types::AMQPValue::LongString(
            development_signature(BAR, Signed::Envelope, &body).into(),
        ),
    );
    world
        .amqp
        .publish_on_bus(
            &world.bus,
            &key,
            &body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(other.id.as_str().into())
                .with_headers(own_signature),
        )
        .await;
    world.wait_for_status(OTHER, LawyerStatus::Active).await;
    world.stop().await;
}
