//! Issue 18: lawyers on the bus, through the lawyer service. Lawyers are
//! registered, suspended and reinstated by signed `LawyerRegistration`
//! envelopes from their region's bar association or justice bureau; they
//! authenticate with the token issued at registration; their inboxes keep an
//! agency inbox's guarantees (at least once, acknowledged, never handed over
//! again, also after a restart); what they submit is checked by the core
//! (CQ-1.2) before anything is published. Against the real RabbitMQ.

use std::time::Duration;

use refbus_core::lawyer::required_credentials;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{
    CaseType, Companion, Credential, Detainee, DetaineeUnavailableNotice, Envelope, Feedback,
    FileComplaintRequest, GetLawyerRequest, InboxRequest, LawyerInboxRequest, LawyerMeetingRequest,
    LawyerRole, LawyerStatus, Outcome, ProceduralStage, RateMeetingRequest, RequestMeetingRequest,
    UnavailabilityReason,
};
use refbus_tests::as_agency;
use refbus_tests::lawyers::{
    LAWYER_SERVICE, LawyerInbox, LawyerWorld, RegisteredLawyer, acknowledge_lawyer, as_lawyer,
};
use tonic::Code;

const CENTRE: &str = "dz-detention-centre";
const DZ_BAR: &str = "dz-bar-committee";
const DZ_BUREAU: &str = "dz-justice-bureau";
const DAZU: &str = "500111";

fn detainee() -> Detainee {
    Detainee {
        name: "李四".into(),
        id_number: "500225199001011234".into(),
        custody_number: "DZ-2026-0417".into(),
    }
}

/// What `role` must show in `case_type` at `stage`: one credential per requirement.
fn shown(role: LawyerRole, case_type: CaseType, stage: ProceduralStage) -> Vec<i32> {
    required_credentials(role, case_type, stage)
        .iter()
        .map(|r| r.any_of[0] as i32)
        .collect()
}

/// A defence lawyer's meeting request at the Dazu centre, with every credential.
fn meeting(case_type: CaseType, stage: ProceduralStage) -> LawyerMeetingRequest {
    LawyerMeetingRequest {
        role: LawyerRole::DefenceLawyer as i32,
        detainee: Some(detainee()),
        credentials: shown(LawyerRole::DefenceLawyer, case_type, stage),
        case_type: case_type as i32,
        stage: stage as i32,
        detention_centre: CENTRE.into(),
        ..LawyerMeetingRequest::default()
    }
}

fn ask(
    lawyer: &RegisteredLawyer,
    meeting: LawyerMeetingRequest,
    key: &str,
) -> tonic::Request<RequestMeetingRequest> {
    lawyer.request(RequestMeetingRequest {
        licence_number: lawyer.licence.clone(),
        meeting: Some(meeting),
        idempotency_key: key.into(),
    })
}

/// An SH-2.5 notice from the Dazu centre to `lawyers`, published onto the
/// lawyer service's queue as the centre's service would.
fn unavailable(key: &str, lawyers: &[&RegisteredLawyer]) -> Envelope {
    Envelope {
        sender: CENTRE.into(),
        idempotency_key: key.into(),
        to_lawyers: lawyers.iter().map(|l| l.licence.clone()).collect(),
        payload: Some(Payload::DetaineeUnavailableNotice(
            DetaineeUnavailableNotice {
                detainee: Some(detainee()),
                booking_reference: key.into(),
                reason: UnavailabilityReason::CourtHearing as i32,
                ..DetaineeUnavailableNotice::default()
            },
        )),
        ..Envelope::default()
    }
}

fn id_of(delivery: &refbus_proto::v1::LawyerDelivery) -> String {
    delivery
        .envelope
        .as_ref()
        .map(|e| e.id.clone())
        .unwrap_or_default()
}

/// Messages waiting in the centre's inbox queue (no consumer reads it here).
async fn queued(world: &LawyerWorld, agency: &str) -> u32 {
    world.amqp.counts(&world.bus.inbox_queue(agency)).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_refuses_the_lawyer_and_reinstating_restores_them() {
    let world = LawyerWorld::start().await;
    let lawyer = world.register(DZ_BAR, "15001201910000001", DAZU).await;
    let mut client = world.lawyers().await;
    let trial = || meeting(CaseType::Ordinary, ProceduralStage::Trial);
    client
        .request_meeting(ask(&lawyer, trial(), "m1"))
        .await
        .unwrap();

    world
        .set_status(
            DZ_BUREAU,
            &lawyer.licence,
            LawyerStatus::Suspended,
            "会见中违规",
        )
        .await;
    let refused = client
        .request_meeting(ask(&lawyer, trial(), "m2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains(&format!(
            "lawyer `{}` is suspended (by `{DZ_BUREAU}`): 会见中违规",
            lawyer.licence
        )),
        "{}",
        refused.message()
    );
    let inbox = client
        .inbox(lawyer.request(LawyerInboxRequest {
            licence_number: lawyer.licence.clone(),
            window: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(inbox.code(), Code::PermissionDenied);

    world
        .set_status(DZ_BAR, &lawyer.licence, LawyerStatus::Active, "处分期满")
        .await;
    client
        .request_meeting(ask(&lawyer, trial(), "m3"))
        .await
        .unwrap();
    // Nothing refused was published: the requests before and after.
    let centre = world.bus.inbox_queue(CENTRE);
    refbus_tests::tracker::eventually("both requests at the centre", || async {
        (world.amqp.counts(&centre).await.0 == 2).then_some(())
    })
    .await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_2_each_role_missing_a_credential_is_refused_naming_it_and_nothing_is_published() {
    let world = LawyerWorld::start().await;
    let lawyer = world.register(DZ_BAR, "15001201910000002", DAZU).await;
    let mut client = world.lawyers().await;
    let (ordinary, trial) = (CaseType::Ordinary, ProceduralStage::Trial);
    let mut refused = 0;
    for role in [LawyerRole::DefenceLawyer, LawyerRole::DutyLawyer] {
        let needed = required_credentials(role, ordinary, trial);
        for leave_out in 0..needed.len() {
            let mut request = meeting(ordinary, trial);
            request.role = role as i32;
            request.credentials = shown(role, ordinary, trial);
            let gone = request.credentials.remove(leave_out);
            let e = client
                .request_meeting(ask(&lawyer, request, &format!("{role:?}-{leave_out}")))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{role:?}: {e:?}");
            let name = Credential::try_from(gone).unwrap().as_str_name();
            assert!(
                e.message().contains("CQ-1.2") && e.message().contains(name),
                "{role:?} without {name}: {}",
                e.message()
            );
            refused += 1;
        }
    }
    for role in [
        LawyerRole::Assistant,
        LawyerRole::Intern,
        LawyerRole::Translator,
    ] {
        let needed = required_credentials(role, ordinary, trial);
        for leave_out in 0..needed.len() {
            let mut credentials = shown(role, ordinary, trial);
            let gone = credentials.remove(leave_out);
            let mut request = meeting(ordinary, trial);
            request.companions = vec![Companion {
                role: role as i32,
                name: "王助理".into(),
                credentials,
            }];
            let e = client
                .request_meeting(ask(&lawyer, request, &format!("{role:?}-{leave_out}")))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{role:?}: {e:?}");
            let name = Credential::try_from(gone).unwrap().as_str_name();
            assert!(
                e.message()
                    .starts_with("lawyer_meeting_request.companions[0].credentials: CQ-1.2")
                    && e.message().contains(name),
                "{role:?} without {name}: {}",
                e.message()
            );
            refused += 1;
        }
    }
    assert!(
        refused >= 10,
        "every role's credentials were left out in turn"
    );
    // One request with everything, so that the queue count means something.
    client
        .request_meeting(ask(&lawyer, meeting(ordinary, trial), "complete"))
        .await
        .unwrap();
    let centre = world.bus.inbox_queue(CENTRE);
    refbus_tests::tracker::eventually("the complete request at the centre", || async {
        (world.amqp.counts(&centre).await.0 >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        queued(&world, CENTRE).await,
        1,
        "nothing refused was published"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_2_the_ns_and_terror_permission_is_needed_exactly_in_the_investigation_stage() {
    let world = LawyerWorld::start().await;
    let lawyer = world.register(DZ_BAR, "15001201910000003", DAZU).await;
    let mut client = world.lawyers().await;
    let mut accepted = 0;
    for case_type in [
        CaseType::Ordinary,
        CaseType::NationalSecurity,
        CaseType::Terrorism,
    ] {
        for stage in [
            ProceduralStage::Investigation,
            ProceduralStage::ProsecutionReview,
            ProceduralStage::Trial,
        ] {
            // Everything an ordinary case needs, without the permission.
            let mut request = meeting(case_type, stage);
            request.credentials = shown(LawyerRole::DefenceLawyer, CaseType::Ordinary, stage);
            let result = client
                .request_meeting(ask(
                    &lawyer,
                    request.clone(),
                    &format!("{case_type:?}-{stage:?}"),
                ))
                .await;
            let guarded =
                case_type != CaseType::Ordinary && stage == ProceduralStage::Investigation;
            match result {
                Ok(_) => {
                    assert!(
                        !guarded,
                        "{case_type:?} {stage:?}: accepted without the permission"
                    );
                    accepted += 1;
                }
                Err(e) => {
                    assert!(guarded, "{case_type:?} {stage:?}: {e:?}");
                    assert_eq!(e.code(), Code::InvalidArgument);
                    assert!(
                        e.message().contains("CQ-1.2")
                            && e.message()
                                .contains("CREDENTIAL_INVESTIGATING_ORGAN_PERMISSION"),
                        "{}",
                        e.message()
                    );
                    request
                        .credentials
                        .push(Credential::InvestigatingOrganPermission as i32);
                    client
                        .request_meeting(ask(
                            &lawyer,
                            request,
                            &format!("{case_type:?}-{stage:?}-permitted"),
                        ))
                        .await
                        .unwrap();
                    accepted += 1;
                }
            }
        }
    }
    let centre = world.bus.inbox_queue(CENTRE);
    refbus_tests::tracker::eventually("every accepted request at the centre", || async {
        (world.amqp.counts(&centre).await.0 == accepted).then_some(())
    })
    .await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_lawyers_and_other_lawyers_inboxes_are_refused_naming_the_licence() {
    let world = LawyerWorld::start().await;
    let one = world.register(DZ_BAR, "15001201910000004", DAZU).await;
    let other = world.register(DZ_BAR, "15001201910000005", DAZU).await;
    let mut client = world.lawyers().await;

    // Not registered: a licence nobody registered, whatever the token.
    let stranger = "15001201910099999";
    let e = client
        .request_meeting(as_lawyer(
            &one.token,
            RequestMeetingRequest {
                licence_number: stranger.into(),
                meeting: Some(meeting(CaseType::Ordinary, ProceduralStage::Trial)),
                idempotency_key: "k".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains(stranger), "{}", e.message());
    let e = client
        .inbox(as_lawyer(
            "a-token-nobody-was-issued",
            LawyerInboxRequest {
                licence_number: stranger.into(),
                window: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains(&format!("lawyer `{stranger}` is not registered")),
        "{}",
        e.message()
    );
    // A registered licence with a token that is not theirs.
    let e = client
        .inbox(as_lawyer(
            "a-token-nobody-was-issued",
            LawyerInboxRequest {
                licence_number: one.licence.clone(),
                window: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains(&one.licence), "{}", e.message());

    // One lawyer reading another's inbox, or acknowledging there.
    world
        .publish_to_lawyer_service(unavailable("for-other", &[&other]))
        .await;
    let e = client
        .inbox(one.request(LawyerInboxRequest {
            licence_number: other.licence.clone(),
            window: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains(&one.licence) && e.message().contains(&other.licence),
        "{}",
        e.message()
    );
    let mut theirs = LawyerInbox::open(&mut client, &other).await;
    let delivery = theirs.next().await;
    let e = client
        .acknowledge(one.request(refbus_proto::v1::LawyerAcknowledgeRequest {
            licence_number: one.licence.clone(),
            delivery_token: delivery.delivery_token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "another's token is not pending for one"
    );
    // And one's own inbox holds nothing of the other's.
    let mut own = LawyerInbox::open(&mut client, &one).await;
    assert!(own.next_within(Duration::from_millis(500)).await.is_none());

    // No credentials at all.
    let e = client
        .inbox(tonic::Request::new(LawyerInboxRequest {
            licence_number: one.licence.clone(),
            window: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The register: NOT_FOUND for an unknown licence, INVALID_ARGUMENT for a malformed one.
    let mut registry = world.registry().await;
    let e = registry
        .get_lawyer(GetLawyerRequest {
            licence_number: stranger.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains(stranger));
    let e = registry
        .get_lawyer(GetLawyerRequest {
            licence_number: "15\0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let entry = registry
        .get_lawyer(GetLawyerRequest {
            licence_number: one.licence.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entry.registered_by, DZ_BAR);
    let registration = entry.registration.unwrap();
    assert_eq!(
        registration.letter_keys,
        vec![one.identity.to_public().to_string()]
    );
    assert!(
        registration.token_sha256.is_empty(),
        "the register shows no credential"
    );
    // The registration as its registrar signed it: verifies with the registrar's key.
    let directory =
        refbus_core::Directory::load(refbus_tests::repo_root().join("deploy/local/directory.toml"))
            .unwrap();
    refbus_core::signing::verify(
        &directory,
        DZ_BAR,
        refbus_core::signing::Signed::Envelope,
        &entry.signed_registration,
        Some(&entry.signature),
    )
    .unwrap();
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_comes_again_and_acknowledged_never_also_after_a_restart() {
    let mut world = LawyerWorld::start().await;
    let lawyer = world.register(DZ_BAR, "15001201910000006", DAZU).await;
    let first = unavailable("n1", &[&lawyer]);
    let n1 = world.publish_to_lawyer_service(first.clone()).await;
    let n2 = world
        .publish_to_lawyer_service(unavailable("n2", &[&lawyer]))
        .await;
    let mut client = world.lawyers().await;

    // Read without acknowledging, and close.
    let mut inbox = LawyerInbox::open(&mut client, &lawyer).await;
    let (a, b) = (inbox.next().await, inbox.next().await);
    assert_eq!(
        (id_of(&a), id_of(&b)),
        (n1.clone(), n2.clone()),
        "oldest first"
    );
    assert!(!a.redelivered && !b.redelivered);
    drop(inbox);

    // Reopened: both again, redelivered; the first acknowledged.
    let mut inbox = LawyerInbox::open(&mut client, &lawyer).await;
    let (a, b) = (inbox.next().await, inbox.next().await);
    assert_eq!((id_of(&a), id_of(&b)), (n1.clone(), n2.clone()));
    assert!(a.redelivered && b.redelivered);
    acknowledge_lawyer(&mut client, &lawyer, a.delivery_token).await;
    drop(inbox);

    // After a restart: only the second; the first never again, not even
    // when the broker delivers it once more.
    world.restart_lawyer_service().await;
    let mut client = world.lawyers().await;
    world.publish_to_lawyer_service(first).await;
    let mut inbox = LawyerInbox::open(&mut client, &lawyer).await;
    let b = inbox.next().await;
    assert_eq!(id_of(&b), n2);
    assert!(b.redelivered);
    acknowledge_lawyer(&mut client, &lawyer, b.delivery_token).await;
    // New ones arrive on the open stream as they come.
    let n3 = world
        .publish_to_lawyer_service(unavailable("n3", &[&lawyer]))
        .await;
    let c = inbox.next().await;
    assert_eq!(id_of(&c), n3, "nothing acknowledged is handed over again");
    assert!(!c.redelivered);
    acknowledge_lawyer(&mut client, &lawyer, c.delivery_token).await;
    drop(inbox);
    let mut inbox = LawyerInbox::open(&mut client, &lawyer).await;
    assert!(
        inbox
            .next_within(Duration::from_millis(500))
            .await
            .is_none()
    );
    // Every broker message was acked once stored.
    let queue = world.lawyer_queue();
    refbus_tests::tracker::eventually("every message acked to the broker", || async {
        (world.amqp.counts(&queue).await.0 == 0).then_some(())
    })
    .await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_two_lawyers_reaches_each_once() {
    let world = LawyerWorld::start().await;
    let one = world.register(DZ_BAR, "15001201910000007", DAZU).await;
    let two = world.register(DZ_BUREAU, "15001201910000008", DAZU).await;
    let both = unavailable("both", &[&one, &two]);
    let id = world.publish_to_lawyer_service(both.clone()).await;
    world.publish_to_lawyer_service(both).await; // the broker's copy again
    let mut client = world.lawyers().await;
    for lawyer in [&one, &two] {
        let end = world
            .publish_to_lawyer_service(unavailable(&format!("end-{}", lawyer.licence), &[lawyer]))
            .await;
        let mut inbox = LawyerInbox::open(&mut client, lawyer).await;
        let got = inbox.next().await;
        assert_eq!(id_of(&got), id, "{}", lawyer.licence);
        acknowledge_lawyer(&mut client, lawyer, got.delivery_token).await;
        let next = inbox.next().await;
        assert_eq!(
            id_of(&next),
            end,
            "{}: the message once, then the next",
            lawyer.licence
        );
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_from_a_registrar_of_another_region_is_not_applied() {
    let world = LawyerWorld::start().await;
    let (_, registration) = LawyerWorld::new_lawyer("15001201910000009", DAZU);
    let id = world
        .publish_registration("yb-bar-committee", registration)
        .await;
    let reason = world.dead_letter_reason(&id).await;
    assert!(
        reason.starts_with("registry: `yb-bar-committee` (region 500112) may not register"),
        "{reason}"
    );
    let e = world
        .registry()
        .await
        .get_lawyer(GetLawyerRequest {
            licence_number: "15001201910000009".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "not applied");

    // A status change from another region's bureau is not applied either.
    let lawyer = world.register(DZ_BAR, "15001201910000010", DAZU).await;
    let id = world
        .publish_status(
            "yb-justice-bureau",
            &lawyer.licence,
            LawyerStatus::Suspended,
            "x",
        )
        .await;
    let reason = world.dead_letter_reason(&id).await;
    assert!(reason.contains("may not suspend"), "{reason}");
    world
        .lawyers()
        .await
        .request_meeting(ask(
            &lawyer,
            meeting(CaseType::Ordinary, ProceduralStage::Trial),
            "still",
        ))
        .await
        .unwrap();
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_3a_a_lawyers_meeting_request_reaches_the_centre_with_the_lawyer_from_the_registry() {
    let world = LawyerWorld::start().await;
    let lawyer = world.register(DZ_BAR, "15001201910000011", DAZU).await;
    let mut client = world.lawyers().await;
    let mut request = meeting(CaseType::Ordinary, ProceduralStage::Trial);
    request.lawyer = Some(refbus_proto::v1::Lawyer {
        name: "冒名者".into(),
        licence_number: "15001201910000099".into(),
        law_firm: "假律所".into(),
    });
    let receipt = client
        .request_meeting(ask(&lawyer, request, "meet"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, CENTRE);

    let mut gateway = world.gateway("detention-centre").await;
    let mut stream = gateway
        .inbox(as_agency(
            CENTRE,
            InboxRequest {
                agency: CENTRE.into(),
                window: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let delivery = refbus_tests::next_message("the request at the centre", &mut stream).await;
    let envelope = delivery.envelope.unwrap();
    assert_eq!(envelope.id, receipt.id);
    assert_eq!(envelope.sender, LAWYER_SERVICE);
    assert_eq!(envelope.from_lawyer, lawyer.licence);
    let Some(Payload::LawyerMeetingRequest(asked)) = envelope.payload else {
        panic!("a meeting request");
    };
    assert_eq!(
        asked.lawyer,
        Some(lawyer.lawyer()),
        "filled in from the register"
    );

    // A complaint goes to the justice bureau with the complainant from the register.
    let complaint = client
        .file_complaint(lawyer.request(FileComplaintRequest {
            licence_number: lawyer.licence.clone(),
            investigated_by: DZ_BUREAU.into(),
            respondent: CENTRE.into(),
            description: "会见被无故拖延".into(),
            hearing_requested: true,
            idempotency_key: "c1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(complaint.recipient, DZ_BUREAU);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_3_11b_a_lawyer_rates_only_their_own_meeting_once_recorded_held() {
    let world = LawyerWorld::start().await;
    let lawyer = world.register(DZ_BAR, "15001201910000012", DAZU).await;
    let other = world.register(DZ_BAR, "15001201910000013", DAZU).await;
    let mut client = world.lawyers().await;
    let asked = client
        .request_meeting(ask(
            &lawyer,
            meeting(CaseType::Ordinary, ProceduralStage::Trial),
            "held",
        ))
        .await
        .unwrap()
        .into_inner();
    let rate = |who: &RegisteredLawyer| {
        who.request(RateMeetingRequest {
            licence_number: who.licence.clone(),
            meeting_request_id: asked.id.clone(),
            score: 5,
            comment: "安排及时".into(),
            idempotency_key: String::new(),
        })
    };
    let e = client.rate_meeting(rate(&lawyer)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().starts_with("CQ-3.11b"), "{}", e.message());

    // The centre records the meeting held; the feedback reaches the lawyer.
    world
        .publish_to_lawyer_service(Envelope {
            sender: CENTRE.into(),
            idempotency_key: "held-feedback".into(),
            in_reply_to: asked.id.clone(),
            to_lawyers: vec![lawyer.licence.clone()],
            payload: Some(Payload::Feedback(Feedback {
                outcome: Outcome::Held as i32,
                summary: "会见已进行".into(),
                ..Feedback::default()
            })),
            ..Envelope::default()
        })
        .await;
    let mut inbox = LawyerInbox::open(&mut client, &lawyer).await;
    let held = inbox.next().await;
    assert_eq!(held.envelope.unwrap().in_reply_to, asked.id);
    let rated = client
        .rate_meeting(rate(&lawyer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rated.recipient, CENTRE, "to the centre that recorded it");
    let e = client.rate_meeting(rate(&other)).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "not the other lawyer's meeting"
    );
    assert!(e.message().contains("CQ-3.11b"));
    world.stop().await;
}
