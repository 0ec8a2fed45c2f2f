//! Issue 18, CQ-1.1c: a detainee's letter reaches only its lawyer. `refbus
//! up` (the real binary: every service, the lawyer service and the tracker)
//! carries a letter from a Dazu centre to a registered lawyer, sealed by the
//! centre's service; the lawyer opens it with their own identity. Then
//! every place it passed is searched byte for byte for its plaintext (also
//! in base64 and hex): a copy of everything published on the bus's
//! exchange, the dead-letter queue (with a tampered copy forced into it),
//! every file the bus wrote (the SQLite ledger, the lawyer service's store,
//! the inbox state) and the logs at debug level.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use refbus_core::envelope::timestamp;
use refbus_proto::v1::bar_association_client::BarAssociationClient;
use refbus_proto::v1::detention_centre_client::DetentionCentreClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::forward_letter_request::Disposition as Requested;
use refbus_proto::v1::lawyer_registry_client::LawyerRegistryClient;
use refbus_proto::v1::lawyer_service_client::LawyerServiceClient;
use refbus_proto::v1::letter::Disposition;
use refbus_proto::v1::tracker_client::TrackerClient;
use refbus_proto::v1::{
    Detainee, ForwardLetterRequest, GetLawyerRequest, GetReferralRequest, Lawyer,
    LawyerAcknowledgeRequest, LawyerDelivery, LawyerInboxRequest, ObligationState,
    RegisterLawyerRequest, WithholdingGround,
};
use refbus_tests::fixtures::CENTRE;
use refbus_tests::up::LoggedUp;
use refbus_tests::{Amqp, as_agency, test_settings, within};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// The letter: nothing on the way may hold it readable.
const LETTER: &str = "PIILETTER-律师您好，我要求更换辩护人并申请取保候审-0042";
const REGISTRAR: &str = "dz-bar-committee";
const ADDRESSEE: &str = "15001201910000011";
const OTHER: &str = "15001201910000012";

fn lawyer_request<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The forms the plaintext could be stored in: as is, base64 (at each of
/// the three alignments, trimmed of the ragged edges) and hex.
fn forms(plain: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = vec![plain.to_vec()];
    for skip in 0..3 {
        let encoded = base64::engine::general_purpose::STANDARD.encode(&plain[skip..]);
        forms.push(encoded.as_bytes()[4..encoded.len() - 4].to_vec());
    }
    forms.push(
        plain
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
    );
    forms
}

fn holds(haystack: &[u8], forms: &[Vec<u8>]) -> bool {
    forms
        .iter()
        .any(|f| haystack.windows(f.len()).any(|w| w == f.as_slice()))
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

async fn register(
    bar: &mut BarAssociationClient<Channel>,
    registry: &mut LawyerRegistryClient<Channel>,
    licence: &str,
    identity: &age::x25519::Identity,
) -> String {
    let token = bar
        .register_lawyer(as_agency(
            REGISTRAR,
            RegisterLawyerRequest {
                registrar: REGISTRAR.into(),
                lawyer: Some(Lawyer {
                    name: format!("律师{licence}"),
                    licence_number: licence.into(),
                    law_firm: "重庆某某律师事务所".into(),
                }),
                region: "500111".into(),
                letter_keys: vec![identity.to_public().to_string()],
                idempotency_key: format!("register-{licence}"),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    within("the lawyer service to apply the registration", async {
        while registry
            .get_lawyer(GetLawyerRequest {
                licence_number: licence.into(),
            })
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_1c_a_letter_reaches_only_its_lawyer_and_no_readable_copy_is_anywhere() {
    let settings = test_settings(refbus_tests::amqp_url());
    let data_dir = std::env::temp_dir().join(format!("refbus-letter-{}", settings.namespace));
    let up = LoggedUp::start(&settings, &data_dir, "debug").await;
    let channel = |service: &str| up.channel(service);

    // A copy of everything published on the bus's exchange.
    let amqp = Amqp::connect().await;
    let topology = refbus_tests::topology_of(&settings.namespace);
    let spy = format!("{}.spy", settings.namespace);
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(120_000));
    amqp.channel
        .queue_declare(
            spy.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .unwrap();
    amqp.channel
        .queue_bind(
            spy.as_str().into(),
            topology.deliveries_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let mut bar = BarAssociationClient::new(channel("bar-association"));
    let mut registry = LawyerRegistryClient::new(channel("lawyer-service"));
    let addressee = age::x25519::Identity::generate();
    let other = age::x25519::Identity::generate();
    let token = register(&mut bar, &mut registry, ADDRESSEE, &addressee).await;
    let other_token = register(&mut bar, &mut registry, OTHER, &other).await;

    let mut centre = DetentionCentreClient::new(channel("detention-centre"));
    let detainee = Detainee {
        name: "隐私甲乙丙".into(),
        custody_number: "DZ-2026-0042".into(),
        ..Detainee::default()
    };
    let forward = |key: &str, licence: &str, disposition: Requested| {
        as_agency(
            CENTRE,
            ForwardLetterRequest {
                detention_centre: CENTRE.into(),
                detainee: Some(detainee.clone()),
                lawyer_licence: licence.into(),
                disposition: Some(disposition),
                handed_over_at: Some(timestamp(Utc::now())),
                idempotency_key: key.into(),
            },
        )
    };
    // To a licence number nobody registered: NOT_FOUND, nothing published.
    let err = centre
        .forward_letter(forward(
            "letter-nobody",
            "15001201999999999",
            Requested::Content(LETTER.as_bytes().to_vec()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("15001201999999999"), "{err:?}");
    let sealed_id = centre
        .forward_letter(forward(
            "letter-1",
            ADDRESSEE,
            Requested::Content(LETTER.as_bytes().to_vec()),
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    let withheld_id = centre
        .forward_letter(forward(
            "letter-2",
            ADDRESSEE,
            Requested::WithheldOn(WithholdingGround::CollusionOrEvidenceDestruction as i32),
        ))
        .await
        .unwrap()
        .into_inner()
        .id;

    // Only the addressee reads it.
    let mut lawyers = LawyerServiceClient::new(channel("lawyer-service"));
    let err = lawyers
        .inbox(lawyer_request(
            &other_token,
            LawyerInboxRequest {
                licence_number: ADDRESSEE.into(),
                window: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut inbox = lawyers
        .inbox(lawyer_request(
            &token,
            LawyerInboxRequest {
                licence_number: ADDRESSEE.into(),
                window: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got: HashMap<String, LawyerDelivery> = HashMap::new();
    while got.len() < 2 {
        let delivery = within("a delivery to the lawyer", inbox.next())
            .await
            .unwrap()
            .unwrap();
        let id = delivery.envelope.as_ref().unwrap().id.clone();
        lawyers
            .acknowledge(lawyer_request(
                &token,
                LawyerAcknowledgeRequest {
                    licence_number: ADDRESSEE.into(),
                    delivery_token: delivery.delivery_token.clone(),
                    ..LawyerAcknowledgeRequest::default()
                },
            ))
            .await
            .unwrap();
        got.insert(id, delivery);
    }
    drop(inbox);
    let letter = |id: &str| match got[id].envelope.as_ref().unwrap().payload.clone() {
        Some(Payload::Letter(letter)) => letter,
        other => panic!("a letter: {other:?}"),
    };
    let Some(Disposition::SealedContent(sealed)) = letter(&sealed_id).disposition else {
        panic!("sealed")
    };
    assert_eq!(
        refbus_tests::open_sealed(&sealed, &addressee).as_deref(),
        Some(LETTER.as_bytes()),
        "the addressee opens it with their own identity"
    );
    assert_eq!(
        refbus_tests::open_sealed(&sealed, &other),
        None,
        "another lawyer cannot open it"
    );
    assert_eq!(
        letter(&withheld_id).disposition,
        Some(Disposition::WithheldOn(
            WithholdingGround::CollusionOrEvidenceDestruction as i32
        )),
        "a withheld letter reaches the lawyer as a notice without content"
    );
    // The other lawyer's own inbox holds nothing of it.
    let mut theirs = lawyers
        .inbox(lawyer_request(
            &other_token,
            LawyerInboxRequest {
                licence_number: OTHER.into(),
                window: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), theirs.next())
            .await
            .is_err(),
        "nothing for the other lawyer"
    );
    drop(theirs);

    // A tampered copy of the sealed letter, as a hostile publisher would
    // put it on the lawyer service's queue: dead-lettered, still sealed.
    let spied = within("the spy queue to hold the letter", async {
        loop {
            if let Some(message) = amqp.get(&spy).await {
                if message
                    .delivery
                    .data
                    .windows(sealed.len())
                    .any(|w| w == sealed.as_slice())
                {
                    return message.delivery.data.clone();
                }
                amqp.publish_raw(&spy, &message.delivery.data).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    amqp.publish_signed(
        &topology.inbox_queue("lawyer-service"),
        "dz-court",
        refbus_core::signing::Signed::Envelope,
        &spied,
    )
    .await;
    amqp.publish_raw(&spy, &spied).await;
    within("the tampered copy to be dead-lettered", async {
        while amqp.counts(&topology.dead_letter()).await.0 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The ledger: the sealed letter forwarded on time; the withheld one not.
    let mut tracker = TrackerClient::new(channel("tracker"));
    within("the tracker to record the letter delivered", async {
        loop {
            let status = tracker
                .get_referral(as_agency(
                    CENTRE,
                    GetReferralRequest {
                        agency: CENTRE.into(),
                        referral_id: sealed_id.clone(),
                    },
                ))
                .await;
            if let Ok(status) = status
                && status
                    .get_ref()
                    .obligations
                    .iter()
                    .any(|o| o.rule == "CQ-1.1c" && o.state == ObligationState::MetOnTime as i32)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let withheld = tracker
        .get_referral(as_agency(
            CENTRE,
            GetReferralRequest {
                agency: CENTRE.into(),
                referral_id: withheld_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let forwarding = withheld
        .obligations
        .iter()
        .find(|o| o.rule == "CQ-1.1c")
        .expect("the withheld letter's forwarding duty");
    assert!(
        ![
            ObligationState::MetOnTime as i32,
            ObligationState::MetLate as i32
        ]
        .contains(&forwarding.state),
        "a withheld letter does not count as forwarded: {forwarding:?}"
    );

    // Stop the bus, then search everything it carried and wrote.
    let (stdout, stderr) = up.stop().await;
    let forms = forms(LETTER.as_bytes());
    let mut published = 0;
    while let Some(message) = amqp.get(&spy).await {
        published += 1;
        assert!(
            !holds(&message.delivery.data, &forms),
            "a readable copy went over the broker"
        );
    }
    assert!(
        published >= 3,
        "the spy saw the bus's traffic ({published})"
    );
    let mut dead = 0;
    while let Some(message) = amqp.get(&topology.dead_letter()).await {
        dead += 1;
        assert!(
            !holds(&message.delivery.data, &forms),
            "a readable copy in the dead-letter queue"
        );
    }
    assert!(dead >= 1);
    let mut files = Vec::new();
    files_under(&data_dir, &mut files);
    // The inbox state and, beside it, the lawyer service's store.
    let stem = settings
        .inbox_db
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for entry in std::fs::read_dir(settings.inbox_db.parent().unwrap())
        .unwrap()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&stem) {
            files.push(entry.path());
        }
    }
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().ends_with("-lawyers.db")),
        "the lawyer service's store is searched: {files:?}"
    );
    // The search is of the right files: the sealed letter is in them.
    let sealed_form = [sealed.clone()];
    assert!(
        files
            .iter()
            .any(|f| std::fs::read(f).is_ok_and(|bytes| holds(&bytes, &sealed_form))),
        "the sealed letter is stored somewhere searched: {files:?}"
    );
    let mut searched = 0;
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        searched += 1;
        assert!(
            !holds(&bytes, &forms),
            "a readable copy in {}",
            file.display()
        );
    }
    assert!(
        searched >= 3,
        "the ledger, the inbox state and the lawyer service's store: {files:?}"
    );
    let logs = format!("{}\n{stderr}", stdout.join("\n"));
    assert!(logs.contains(&sealed_id), "the logs saw the letter's id");
    assert!(
        !holds(logs.as_bytes(), &forms),
        "a readable copy in the logs"
    );

    amqp.close().await;
    refbus_tests::delete_namespace(&topology).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    refbus_tests::remove_inbox_db(&settings);
}

/// A hostile publisher with broker credentials and a valid key of its own
/// still cannot put a letter in a lawyer's inbox unless it is the centre,
/// nor a readable one even then: both dead-lettered, the inbox empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_1c_a_published_letter_from_no_centre_or_unsealed_never_reaches_the_lawyer() {
    use refbus_tests::lawyers::{LawyerInbox, LawyerWorld};
    let world = LawyerWorld::start().await;
    let lawyer = world.register(REGISTRAR, ADDRESSEE, "500111").await;
    let letter = |sender: &str, key: &str, disposition: Disposition| refbus_proto::v1::Envelope {
        sender: sender.into(),
        to_lawyers: vec![ADDRESSEE.into()],
        idempotency_key: key.into(),
        payload: Some(Payload::Letter(refbus_proto::v1::Letter {
            detainee: Some(Detainee {
                name: "隐私甲乙丙".into(),
                ..Detainee::default()
            }),
            addressee: Some(lawyer.lawyer()),
            disposition: Some(disposition),
        })),
        ..refbus_proto::v1::Envelope::default()
    };
    let sealed = refbus_gateway::letters::seal(
        &[lawyer.identity.to_public().to_string()],
        LETTER.as_bytes(),
    )
    .unwrap();
    let from_court = world
        .publish_to_lawyer_service(letter(
            "dz-court",
            "hostile-1",
            Disposition::SealedContent(sealed),
        ))
        .await;
    let unsealed = world
        .publish_to_lawyer_service(letter(
            CENTRE,
            "hostile-2",
            Disposition::Content(LETTER.as_bytes().to_vec()),
        ))
        .await;
    let reason = world.dead_letter_reason(&from_court).await;
    assert!(reason.contains("CQ-1.1c"), "{reason}");
    let reason = world.dead_letter_reason(&unsealed).await;
    assert!(reason.contains("only sealed"), "{reason}");
    let mut client = world.lawyers().await;
    let mut inbox = LawyerInbox::open(&mut client, &lawyer).await;
    assert!(
        inbox
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing reached the lawyer"
    );
    drop(inbox);
    world.stop().await;
}
