//! Issue 18: a lawyer's meeting at a detention centre, end to end through
//! `refbus up` (the real binary: the agency services, the lawyer service
//! and the tracker). Lawyers are registered by their region's bar
//! association and answered in their own inbox: a refusal with its reason
//! (CQ-1.3a, CQ-2.5), a detainee's written refusal sealed to them (CQ-1.3c),
//! the unavailability notice by licence (SH-2.5); interrogations queue at
//! the centre (CQ-1.3b) and a verification query names the meeting it holds
//! up (CQ-1.3d); a lawyer's complaint is answered in their inbox (CQ-3.13).
//! The `refbus` command drives the flow the README shows.

use std::time::Duration;

use refbus_proto::v1::bar_association_client::BarAssociationClient;
use refbus_proto::v1::case_unit_client::CaseUnitClient;
use refbus_proto::v1::detention_centre_client::DetentionCentreClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::justice_bureau_client::JusticeBureauClient;
use refbus_proto::v1::lawyer_registry_client::LawyerRegistryClient;
use refbus_proto::v1::lawyer_service_client::LawyerServiceClient;
use refbus_proto::v1::tracker_client::TrackerClient;
use refbus_proto::v1::{
    ArrangeMeetingRequest, CaseType, Credential, Detainee, DetaineeUnavailableNotice, Envelope,
    FileComplaintRequest, GetLawyerRequest, GetReferralRequest, InboxRequest, InterrogationRequest,
    Lawyer, LawyerAcknowledgeRequest, LawyerInboxRequest, LawyerMeetingRequest, LawyerRole,
    NotifyDetaineeUnavailableRequest, ObligationState, Outcome, ProceduralStage, RecordHeldRequest,
    RefusalReason, RefuseMeetingRequest, RegisterLawyerRequest, ReportHandlingResultRequest,
    RequestInterrogationRequest, RequestMeetingRequest, UnavailabilityReason, VerifyOffenceRequest,
};
use refbus_tests::fixtures::CENTRE;
use refbus_tests::up::Up;
use refbus_tests::{as_agency, within};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

const LAWYER: &str = "15001201910000021";

fn channel(up: &Up, service: &str) -> Channel {
    Channel::from_shared(up.url(service).to_owned())
        .unwrap()
        .connect_lazy()
}

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A registered lawyer: their licence, token and letter identity.
struct Registered {
    licence: String,
    token: String,
    identity: age::x25519::Identity,
}

async fn register(up: &Up, registrar: &str, region: &str, licence: &str) -> Registered {
    let identity = age::x25519::Identity::generate();
    let token = BarAssociationClient::new(channel(up, "bar-association"))
        .register_lawyer(as_agency(
            registrar,
            RegisterLawyerRequest {
                registrar: registrar.into(),
                lawyer: Some(Lawyer {
                    name: format!("律师{licence}"),
                    licence_number: licence.into(),
                    law_firm: "某某律师事务所".into(),
                }),
                region: region.into(),
                letter_keys: vec![identity.to_public().to_string()],
                idempotency_key: format!("register-{licence}"),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut registry = LawyerRegistryClient::new(channel(up, "lawyer-service"));
    within("the registration to apply", async {
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
    Registered {
        licence: licence.into(),
        token,
        identity,
    }
}

fn defence_request(centre: &str) -> LawyerMeetingRequest {
    LawyerMeetingRequest {
        role: LawyerRole::DefenceLawyer as i32,
        detainee: Some(Detainee {
            name: "张三".into(),
            custody_number: "DZ-2026-0101".into(),
            ..Detainee::default()
        }),
        credentials: vec![
            Credential::PracticeLicence as i32,
            Credential::LawFirmLetter as i32,
            Credential::CommissionOrAidLetter as i32,
        ],
        case_type: CaseType::Ordinary as i32,
        stage: ProceduralStage::Investigation as i32,
        detention_centre: centre.into(),
        case_unit: "dz-psb-investigation".into(),
        ..LawyerMeetingRequest::default()
    }
}

async fn request_meeting(up: &Up, lawyer: &Registered, meeting: LawyerMeetingRequest, key: &str) {
    LawyerServiceClient::new(channel(up, "lawyer-service"))
        .request_meeting(with_token(
            &lawyer.token,
            RequestMeetingRequest {
                licence_number: lawyer.licence.clone(),
                meeting: Some(meeting),
                idempotency_key: key.into(),
            },
        ))
        .await
        .unwrap();
}

/// The next delivery to an agency, acknowledged.
async fn agency_takes(up: &Up, service: &str, agency: &str) -> Envelope {
    let mut client = up.gateway(service);
    let mut inbox = client
        .inbox(as_agency(
            agency,
            InboxRequest {
                agency: agency.into(),
                window: 1,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let delivery = within("a delivery to the agency", inbox.next())
        .await
        .unwrap()
        .unwrap();
    client
        .acknowledge(as_agency(
            agency,
            refbus_proto::v1::AcknowledgeRequest {
                agency: agency.into(),
                delivery_token: delivery.delivery_token,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    delivery.envelope.unwrap()
}

/// The next delivery to a lawyer, acknowledged; `None` if nothing comes
/// within `wait`.
async fn lawyer_takes(up: &Up, lawyer: &Registered, wait: Duration) -> Option<Envelope> {
    let mut client = LawyerServiceClient::new(channel(up, "lawyer-service"));
    let mut inbox = client
        .inbox(with_token(
            &lawyer.token,
            LawyerInboxRequest {
                licence_number: lawyer.licence.clone(),
                window: 1,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let delivery = tokio::time::timeout(wait, inbox.next())
        .await
        .ok()??
        .unwrap();
    client
        .acknowledge(with_token(
            &lawyer.token,
            LawyerAcknowledgeRequest {
                licence_number: lawyer.licence.clone(),
                delivery_token: delivery.delivery_token,
                ..LawyerAcknowledgeRequest::default()
            },
        ))
        .await
        .unwrap();
    delivery.envelope
}

fn feedback(envelope: &Envelope) -> &refbus_proto::v1::Feedback {
    match &envelope.payload {
        Some(Payload::Feedback(f)) => f,
        other => panic!("a feedback: {other:?}"),
    }
}

fn refuse(
    request: &Envelope,
    reason: RefusalReason,
    key: &str,
) -> tonic::Request<RefuseMeetingRequest> {
    as_agency(
        CENTRE,
        RefuseMeetingRequest {
            detention_centre: CENTRE.into(),
            request: Some(request.clone()),
            reason: reason as i32,
            explanation: "会见室已满，明日上午安排".into(),
            written_refusal: Vec::new(),
            idempotency_key: key.into(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_3a_a_refusal_reaches_the_lawyer_with_its_reason_and_the_centres_supervisor() {
    let up = Up::start().await;
    let lawyer = register(&up, "dz-bar-committee", "500111", LAWYER).await;
    request_meeting(&up, &lawyer, defence_request(CENTRE), "m-refused").await;
    let request = agency_takes(&up, "detention-centre", CENTRE).await;
    assert_eq!(request.from_lawyer, LAWYER);
    let Some(Payload::LawyerMeetingRequest(meeting)) = &request.payload else {
        panic!("a meeting request")
    };
    assert_eq!(
        meeting.lawyer.as_ref().map(|l| l.licence_number.as_str()),
        Some(LAWYER),
        "the lawyer as the register has them"
    );
    let mut centre = DetentionCentreClient::new(channel(&up, "detention-centre"));

    // Only the centre the request was delivered to answers it: another
    // centre of the same service gets NOT_FOUND, as for an unknown id;
    // acting as another centre is PERMISSION_DENIED.
    let mut elsewhere = refuse(&request, RefusalReason::NoRoomAvailable, "refuse-yb");
    elsewhere.get_mut().detention_centre = "yb-detention-centre".into();
    let mut as_yubei = tonic::Request::new(elsewhere.into_inner());
    as_yubei.metadata_mut().insert(
        "authorization",
        "Bearer dev-yb-detention-centre".parse().unwrap(),
    );
    let err = centre.refuse_meeting(as_yubei).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut impostor = refuse(&request, RefusalReason::NoRoomAvailable, "refuse-impostor");
    impostor.metadata_mut().insert(
        "authorization",
        "Bearer dev-yb-detention-centre".parse().unwrap(),
    );
    let err = centre.refuse_meeting(impostor).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // CQ-2.5: "no booking" is no reason in Chongqing; nor is none at all.
    for (reason, names) in [
        (RefusalReason::NoBooking, "CQ-2.5"),
        (RefusalReason::Unspecified, "CQ-1.3a"),
    ] {
        let err = centre
            .refuse_meeting(refuse(&request, reason, &format!("refuse-{reason:?}")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(names), "{err:?}");
    }
    // A reason the territory allows: the lawyer is told why.
    centre
        .refuse_meeting(refuse(
            &request,
            RefusalReason::NoRoomAvailable,
            "refuse-room",
        ))
        .await
        .unwrap();
    let told = lawyer_takes(&up, &lawyer, Duration::from_secs(20))
        .await
        .expect("the refusal reaches the lawyer");
    assert_eq!(told.in_reply_to, request.id);
    let answer = feedback(&told);
    assert_eq!(answer.outcome, Outcome::Refused as i32);
    let refusal = answer.refusal.as_ref().unwrap();
    assert_eq!(refusal.reason, RefusalReason::NoRoomAvailable as i32);
    assert_eq!(refusal.explanation, "会见室已满，明日上午安排");
    assert!(
        lawyer_takes(&up, &lawyer, Duration::from_millis(500))
            .await
            .is_none(),
        "the refused reasons published nothing"
    );
    // ... and so is the centre's supervisor, its public security bureau.
    let copy = agency_takes(&up, "case-unit", "dz-psb").await;
    assert_eq!(copy.id, told.id);
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_3c_the_written_refusal_reaches_the_lawyers_inbox() {
    let up = Up::start().await;
    let lawyer = register(&up, "dz-bar-committee", "500111", LAWYER).await;
    let mut meeting = defence_request(CENTRE);
    meeting.to_confirm_termination = true;
    request_meeting(&up, &lawyer, meeting, "m-termination").await;
    let request = agency_takes(&up, "detention-centre", CENTRE).await;
    let mut centre = DetentionCentreClient::new(channel(&up, "detention-centre"));
    // The reason needs the written refusal itself.
    let err = centre
        .refuse_meeting(refuse(
            &request,
            RefusalReason::DetaineeRefusesInWriting,
            "refuse-no-paper",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("CQ-1.3c"), "{err:?}");
    let scan = "%PDF-1.4 本人拒绝会见，不同意解除委托确认。张三 2026-12-02".as_bytes();
    let mut with_paper = refuse(
        &request,
        RefusalReason::DetaineeRefusesInWriting,
        "refuse-in-writing",
    );
    with_paper.get_mut().written_refusal = scan.to_vec();
    centre.refuse_meeting(with_paper).await.unwrap();
    let told = lawyer_takes(&up, &lawyer, Duration::from_secs(20))
        .await
        .expect("the written refusal reaches the lawyer");
    let refusal = feedback(&told).refusal.clone().unwrap();
    assert_eq!(
        refusal.reason,
        RefusalReason::DetaineeRefusesInWriting as i32
    );
    assert!(refusal.written_refusal.is_empty(), "never in the clear");
    let opened =
        refbus_tests::open_sealed(&refusal.sealed_written_refusal, &lawyer.identity).unwrap();
    assert_eq!(
        opened, scan,
        "the lawyer opens the detainee's written refusal"
    );
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_3a_arranged_then_held_meets_both_duties_and_the_lawyer_is_told() {
    let up = Up::start().await;
    let lawyer = register(&up, "dz-bar-committee", "500111", LAWYER).await;
    request_meeting(&up, &lawyer, defence_request(CENTRE), "m-held").await;
    let request = agency_takes(&up, "detention-centre", CENTRE).await;
    let mut centre = DetentionCentreClient::new(channel(&up, "detention-centre"));
    centre
        .arrange_meeting(as_agency(
            CENTRE,
            ArrangeMeetingRequest {
                detention_centre: CENTRE.into(),
                request: Some(request.clone()),
                arranged_for: Some(refbus_core::envelope::timestamp(
                    chrono::Utc::now() + chrono::Duration::hours(2),
                )),
                note: "2号会见室".into(),
                idempotency_key: "arrange".into(),
            },
        ))
        .await
        .unwrap();
    let arranged = lawyer_takes(&up, &lawyer, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(feedback(&arranged).outcome, Outcome::Arranged as i32);
    assert!(feedback(&arranged).arranged_for.is_some());
    centre
        .record_held(as_agency(
            CENTRE,
            RecordHeldRequest {
                detention_centre: CENTRE.into(),
                request: Some(request.clone()),
                note: String::new(),
                idempotency_key: "held".into(),
            },
        ))
        .await
        .unwrap();
    let held = lawyer_takes(&up, &lawyer, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(feedback(&held).outcome, Outcome::Held as i32);
    let mut tracker = TrackerClient::new(channel(&up, "tracker"));
    within("both CQ-1.3a duties met on time", async {
        loop {
            if let Ok(status) = tracker
                .get_referral(as_agency(
                    CENTRE,
                    GetReferralRequest {
                        agency: CENTRE.into(),
                        referral_id: request.id.clone(),
                    },
                ))
                .await
            {
                let duties: Vec<_> = status
                    .get_ref()
                    .obligations
                    .iter()
                    .filter(|o| o.rule == "CQ-1.3a")
                    .collect();
                if duties.len() == 2
                    && duties
                        .iter()
                        .all(|o| o.state == ObligationState::MetOnTime as i32)
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_3b_an_interrogation_is_requested_queued_and_served() {
    let up = Up::start().await;
    let unit = "dz-psb-investigation";
    let mut case_unit = CaseUnitClient::new(channel(&up, "case-unit"));
    // Only to a detention centre.
    let err = case_unit
        .request_interrogation(as_agency(
            unit,
            RequestInterrogationRequest {
                case_unit: unit.into(),
                detention_centre: "dz-court".into(),
                request: Some(InterrogationRequest::default()),
                idempotency_key: "i-0".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    case_unit
        .request_interrogation(as_agency(
            unit,
            RequestInterrogationRequest {
                case_unit: unit.into(),
                detention_centre: CENTRE.into(),
                request: Some(InterrogationRequest {
                    detainee: Some(Detainee {
                        name: "李四".into(),
                        ..Detainee::default()
                    }),
                    case_reference: "大公刑2026-17".into(),
                    purpose: "提讯".into(),
                    ..InterrogationRequest::default()
                }),
                idempotency_key: "i-1".into(),
            },
        ))
        .await
        .unwrap();
    let request = agency_takes(&up, "detention-centre", CENTRE).await;
    assert!(matches!(
        request.payload,
        Some(Payload::InterrogationRequest(_))
    ));
    DetentionCentreClient::new(channel(&up, "detention-centre"))
        .record_held(as_agency(
            CENTRE,
            RecordHeldRequest {
                detention_centre: CENTRE.into(),
                request: Some(request.clone()),
                note: String::new(),
                idempotency_key: "served".into(),
            },
        ))
        .await
        .unwrap();
    let served = agency_takes(&up, "case-unit", unit).await;
    assert_eq!(served.in_reply_to, request.id);
    assert_eq!(feedback(&served).outcome, Outcome::Held as i32);
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_1_3d_a_verification_query_names_the_meeting_it_holds_up() {
    let up = Up::start().await;
    let lawyer = register(&up, "dz-bar-committee", "500111", LAWYER).await;
    let mut meeting = defence_request(CENTRE);
    meeting.temporarily_held = true;
    meeting.case_type = CaseType::Unclear as i32;
    request_meeting(&up, &lawyer, meeting, "m-unclear").await;
    let request = agency_takes(&up, "detention-centre", CENTRE).await;
    let mut centre = DetentionCentreClient::new(channel(&up, "detention-centre"));
    let verify = |request: Envelope, key: &str| {
        as_agency(
            CENTRE,
            VerifyOffenceRequest {
                detention_centre: CENTRE.into(),
                case_unit: String::new(),
                meeting_request: Some(request),
                question: "临时寄押人员涉嫌罪名不明，请核实".into(),
                case_reference: "大公刑2026-88".into(),
                idempotency_key: key.into(),
            },
        )
    };
    // A meeting request the centre never received: NOT_FOUND.
    let mut forged = request.clone();
    forged.id = "01a233bc-4bdf-7330-982c-01e2e29d356a".into();
    let err = centre
        .verify_offence(verify(forged, "v-0"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    centre
        .verify_offence(verify(request.clone(), "v-1"))
        .await
        .unwrap();
    let query = agency_takes(&up, "case-unit", "dz-psb-investigation").await;
    let Some(Payload::VerificationQuery(q)) = query.payload else {
        panic!("a verification query")
    };
    assert_eq!(q.meeting_request_id, request.id);
    assert_eq!(q.detainee.unwrap().name, "张三");
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sh_2_5_an_unavailable_detainee_is_told_to_the_lawyers_concerned_by_licence() {
    let up = Up::start().await;
    let first = register(&up, "sh-bar-association", "310000", "13101201910000031").await;
    let second = register(&up, "sh-bar-association", "310000", "13101201910000032").await;
    let centre_id = "sh-first-detention-centre";
    let mut centre = DetentionCentreClient::new(channel(&up, "detention-centre"));
    let notify = |lawyers: Vec<String>, key: &str| {
        as_agency(
            centre_id,
            NotifyDetaineeUnavailableRequest {
                detention_centre: centre_id.into(),
                notice: Some(DetaineeUnavailableNotice {
                    detainee: Some(Detainee {
                        name: "王五".into(),
                        ..Detainee::default()
                    }),
                    booking_reference: "SH-BK-2026-7".into(),
                    reason: UnavailabilityReason::CourtHearing as i32,
                    ..DetaineeUnavailableNotice::default()
                }),
                lawyer_licences: lawyers,
                idempotency_key: key.into(),
            },
        )
    };
    let err = centre
        .notify_detainee_unavailable(notify(
            vec![first.licence.clone(), "13101201999999999".into()],
            "u-0",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    centre
        .notify_detainee_unavailable(notify(
            vec![first.licence.clone(), second.licence.clone()],
            "u-1",
        ))
        .await
        .unwrap();
    for lawyer in [&first, &second] {
        let notice = lawyer_takes(&up, lawyer, Duration::from_secs(20))
            .await
            .expect("each lawyer concerned is told");
        assert!(matches!(
            notice.payload,
            Some(Payload::DetaineeUnavailableNotice(_))
        ));
        assert!(
            lawyer_takes(&up, lawyer, Duration::from_millis(300))
                .await
                .is_none(),
            "once, and nothing of the refused notice"
        );
    }
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cq_3_13_a_lawyers_complaint_to_the_justice_bureau_is_answered_back_to_the_lawyer() {
    let up = Up::start().await;
    let lawyer = register(&up, "dz-bar-committee", "500111", LAWYER).await;
    LawyerServiceClient::new(channel(&up, "lawyer-service"))
        .file_complaint(with_token(
            &lawyer.token,
            FileComplaintRequest {
                licence_number: lawyer.licence.clone(),
                investigated_by: "dz-justice-bureau".into(),
                respondent: CENTRE.into(),
                description: "会见申请被拖延三日".into(),
                hearing_requested: false,
                idempotency_key: "complaint-1".into(),
            },
        ))
        .await
        .unwrap();
    let complaint = agency_takes(&up, "justice-bureau", "dz-justice-bureau").await;
    assert_eq!(complaint.from_lawyer, LAWYER);
    JusticeBureauClient::new(channel(&up, "justice-bureau"))
        .report_handling_result(as_agency(
            "dz-justice-bureau",
            ReportHandlingResultRequest {
                justice_bureau: "dz-justice-bureau".into(),
                outcome: Outcome::Substantiated as i32,
                summary: "已责令看守所整改".into(),
                idempotency_key: "result-1".into(),
                referral: Some(complaint.clone()),
            },
        ))
        .await
        .unwrap();
    let result = lawyer_takes(&up, &lawyer, Duration::from_secs(20))
        .await
        .expect("the result reaches the complaining lawyer");
    assert_eq!(result.in_reply_to, complaint.id);
    assert_eq!(feedback(&result).outcome, Outcome::Substantiated as i32);
    assert_eq!(feedback(&result).summary, "已责令看守所整改");
    up.stop().await;
}

/// `refbus ARGS` as the centre's desk would run it (lawyer commands carry
/// their own `--server`).
async fn run(up: &Up, args: Vec<String>) -> refbus_tests::up::Ran {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    up.refbus("detention-centre", CENTRE, &args).await
}

/// The README's flow, with the `refbus` command: keygen, register,
/// request, arrange, held, a letter, the lawyer's inbox opening it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meeting_flow_end_to_end_with_the_refbus_command() {
    let up = Up::start().await;
    let key_file = up.data_dir.join("letters.key");
    let keygen = up
        .refbus(
            "bar-association",
            "dz-bar-committee",
            &["lawyer", "keygen", "--out", key_file.to_str().unwrap()],
        )
        .await;
    assert_eq!(keygen.code, 0, "{keygen:?}");
    let public = keygen.stdout.trim().to_owned();
    assert!(public.starts_with("age1"), "{keygen:?}");
    let registered = up
        .refbus(
            "bar-association",
            "dz-bar-committee",
            &[
                "lawyer",
                "register",
                "--licence",
                LAWYER,
                "--name",
                "王律师",
                "--firm",
                "重庆某某律师事务所",
                "--region",
                "500111",
                "--key",
                &public,
            ],
        )
        .await;
    assert_eq!(registered.code, 0, "{registered:?}");
    let token = registered
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("token\t"))
        .unwrap()
        .to_owned();
    let mut registry = LawyerRegistryClient::new(channel(&up, "lawyer-service"));
    within("the registration to apply", async {
        while registry
            .get_lawyer(GetLawyerRequest {
                licence_number: LAWYER.into(),
            })
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let lawyer_args = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend([
            "--licence".into(),
            LAWYER.into(),
            "--token".into(),
            token.clone(),
            "--server".into(),
            up.url("lawyer-service").to_owned(),
        ]);
        all
    };
    // A request missing a credential its role needs: refused, exit 3.
    let missing = run(
        &up,
        lawyer_args(&[
            "lawyer",
            "request-meeting",
            "--centre",
            CENTRE,
            "--role",
            "defence-lawyer",
            "--case-type",
            "ordinary",
            "--detainee",
            "张三",
            "--key",
            "cli-m-0",
            "--credential",
            "practice-licence",
            "--credential",
            "law-firm-letter",
        ]),
    )
    .await;
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(
        missing
            .stderr
            .contains("CREDENTIAL_COMMISSION_OR_AID_LETTER"),
        "{missing:?}"
    );
    let asked = run(
        &up,
        lawyer_args(&[
            "lawyer",
            "request-meeting",
            "--centre",
            CENTRE,
            "--role",
            "defence-lawyer",
            "--case-type",
            "ordinary",
            "--detainee",
            "张三",
            "--key",
            "cli-m-1",
            "--credential",
            "practice-licence",
            "--credential",
            "law-firm-letter",
            "--credential",
            "commission-or-aid-letter",
        ]),
    )
    .await;
    assert_eq!(asked.code, 0, "{asked:?}");
    let inbox = up
        .refbus(
            "detention-centre",
            CENTRE,
            &["inbox", "--count", "1", "--idle", "20s"],
        )
        .await;
    assert_eq!(inbox.code, 0, "{inbox:?}");
    let id = inbox
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .to_owned();
    let tracker_knows = || async {
        let mut tracker = TrackerClient::new(channel(&up, "tracker"));
        within("the tracker to record the request", async {
            while tracker
                .get_referral(as_agency(
                    CENTRE,
                    GetReferralRequest {
                        agency: CENTRE.into(),
                        referral_id: id.clone(),
                    },
                ))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    };
    tracker_knows().await;
    for args in [
        vec![
            "meeting",
            "arrange",
            id.as_str(),
            "--at",
            "2030-01-01T01:00:00Z",
        ],
        vec!["meeting", "held", id.as_str()],
    ] {
        let done = up.refbus("detention-centre", CENTRE, &args).await;
        assert_eq!(done.code, 0, "{done:?}");
    }
    let letter_file = up.data_dir.join("letter.txt");
    std::fs::write(&letter_file, "律师您好，请尽快来见我。").unwrap();
    let forwarded = up
        .refbus(
            "detention-centre",
            CENTRE,
            &[
                "letter",
                "forward",
                "--lawyer",
                LAWYER,
                "--detainee",
                "张三",
                "--file",
                letter_file.to_str().unwrap(),
                "--key",
                "cli-l-1",
            ],
        )
        .await;
    assert_eq!(forwarded.code, 0, "{forwarded:?}");
    let read = run(
        &up,
        lawyer_args(&[
            "lawyer",
            "inbox",
            "--identity",
            key_file.to_str().unwrap(),
            "--count",
            "3",
            "--idle",
            "20s",
        ]),
    )
    .await;
    assert_eq!(read.code, 0, "{read:?}");
    assert!(read.stdout.contains("OUTCOME_ARRANGED"), "{read:?}");
    assert!(read.stdout.contains("OUTCOME_HELD"), "{read:?}");
    assert!(
        read.stdout.contains("letter: 律师您好，请尽快来见我。"),
        "the letter opened with the lawyer's key: {read:?}"
    );
    let rated = run(
        &up,
        lawyer_args(&["lawyer", "rate", id.as_str(), "--score", "5"]),
    )
    .await;
    assert_eq!(rated.code, 0, "{rated:?}");
    let status = up
        .refbus("detention-centre", CENTRE, &["status", id.as_str()])
        .await;
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.contains("CQ-1.3a"), "{status:?}");
    let help = up
        .refbus("detention-centre", CENTRE, &["lawyer", "--help"])
        .await;
    assert!(help.stdout.contains("Example: refbus lawyer"), "{help:?}");
    up.stop().await;
}
