//! Issue 4: misconduct leads, violation notices, complaints, joint notices,
//! verification queries and letters, each test named after the rule it
//! checks; against the real RabbitMQ and a real tracker on SQLite.

use std::collections::HashSet;

use refbus_proto::v1::case_unit_client::CaseUnitClient;
use refbus_proto::v1::detention_centre_client::DetentionCentreClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::justice_bureau_client::JusticeBureauClient;
use refbus_proto::v1::letter::Disposition;
use refbus_proto::v1::misconduct_lead::Subject;
use refbus_proto::v1::route_hop::Duty;
use refbus_proto::v1::{
    AcknowledgeRequest, AnswerVerificationQueryRequest, Delivery, Detainee, Envelope, Feedback,
    FeedbackRequest, Hop, JointNotice, JudicialOfficer, Lawyer, Letter, MessageKind,
    MisconductLead, NotifyJointActionRequest, NotifyLawyerViolationRequest, ObligationState,
    Outcome, ReferralStatus, RelayRequest, ReportHandlingResultRequest, RightsComplaint, RouteHop,
    VerificationQuery,
};
use refbus_tests::fixtures::{BUREAU, CENTRE, submit};
use refbus_tests::tracker::{Db, TestTracker, eventually, ledger_settings};
use refbus_tests::{Amqp, Inbox, TestBus};
use refbus_tracker::Clock;
use tonic::Code;
use tonic::transport::Channel;

const DZ_BAR: &str = "dz-bar-committee";
const DZ_COURT: &str = "dz-court";
const DZ_PSB: &str = "dz-psb";

/// Gateway service of each agency used here.
fn service_of(agency: &str) -> &'static str {
    match agency {
        a if a.ends_with("justice-bureau") => "justice-bureau",
        a if a.ends_with("bar-committee") || a.ends_with("bar-association") => "bar-association",
        a if a.ends_with("detention-centre") => "detention-centre",
        a if a.contains("legal-aid") || a.ends_with("duty-desk") => "legal-aid",
        _ => "case-unit",
    }
}

/// A running bus with a tracker on SQLite.
struct World {
    bus: TestBus,
    tracker: TestTracker,
}

impl World {
    async fn start() -> Self {
        let bus = TestBus::spawn().await;
        let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
        Self { bus, tracker }
    }

    async fn gateway(&self, agency: &str) -> GatewayClient<Channel> {
        self.bus.gateway_as(service_of(agency), agency).await
    }

    /// Opens `agency`'s inbox and takes the next delivery, acknowledged.
    async fn receive(&self, agency: &str) -> Envelope {
        let mut client = self.gateway(agency).await;
        let mut inbox = Inbox::open(&mut client, agency).await;
        let Delivery {
            delivery_token,
            envelope,
            ..
        } = inbox.next().await;
        client
            .acknowledge(AcknowledgeRequest {
                agency: agency.into(),
                delivery_token,
                ..Default::default()
            })
            .await
            .unwrap();
        envelope.unwrap()
    }

    async fn status(&self, asker: &str, id: &str) -> Result<ReferralStatus, tonic::Status> {
        self.tracker.status(asker, id).await
    }

    /// Waits until the tracker shows `id` to `asker` with `check` true.
    async fn status_when(
        &self,
        what: &str,
        asker: &str,
        id: &str,
        check: impl Fn(&ReferralStatus) -> bool,
    ) -> ReferralStatus {
        eventually(what, || async {
            self.status(asker, id).await.ok().filter(|s| check(s))
        })
        .await
    }

    async fn stop(self) {
        self.tracker.stop().await;
        self.bus.stop().await;
    }
}

fn officer_lead(finder: &str, organ: &str, key: &str, route: Vec<RouteHop>) -> Envelope {
    Envelope {
        sender: finder.into(),
        idempotency_key: key.into(),
        payload: Some(Payload::MisconductLead(MisconductLead {
            subject: Some(Subject::Officer(JudicialOfficer {
                name: "王某".into(),
                organ: organ.into(),
                position: "审判员".into(),
            })),
            description: "与律师私下会面并收受财物".into(),
            route,
            ..MisconductLead::default()
        })),
        ..Envelope::default()
    }
}

fn lawyer_lead(finder: &str, key: &str) -> Envelope {
    Envelope {
        sender: finder.into(),
        idempotency_key: key.into(),
        payload: Some(Payload::MisconductLead(MisconductLead {
            subject: Some(Subject::Lawyer(lawyer())),
            description: "律师向承办人员输送利益".into(),
            ..MisconductLead::default()
        })),
        ..Envelope::default()
    }
}

fn lawyer() -> Lawyer {
    Lawyer {
        name: "孙律师".into(),
        licence_number: "15001201710000003".into(),
        law_firm: "某律师事务所".into(),
    }
}

fn hop(agency: &str, duty: Duty) -> RouteHop {
    RouteHop {
        agency: agency.into(),
        duty: duty as i32,
    }
}

fn lead_of(envelope: &Envelope) -> &MisconductLead {
    match &envelope.payload {
        Some(Payload::MisconductLead(lead)) => lead,
        other => panic!("not a lead: {other:?}"),
    }
}

fn feedback(outcome: Outcome, summary: &str) -> Option<Feedback> {
    Some(Feedback {
        outcome: outcome as i32,
        summary: summary.into(),
        ..Feedback::default()
    })
}

fn state(s: &ReferralStatus, rule: &str, bearer: &str) -> Option<ObligationState> {
    s.obligations
        .iter()
        .find(|o| o.rule == rule && o.bearer == bearer)
        .and_then(|o| ObligationState::try_from(o.state).ok())
}

fn met(s: &ReferralStatus, rule: &str, bearer: &str) -> bool {
    state(s, rule, bearer) == Some(ObligationState::MetOnTime)
}

/// Ready messages in `agency`'s inbox queue.
async fn waiting(world: &World, amqp: &Amqp, agency: &str) -> u32 {
    amqp.counts(&world.bus.inbox_queue(agency)).await.0
}

/// Submits a lead, receives it at the only hop, answers it, and checks that
/// the finder gets the feedback and the tracker closes the DZ-8 obligation.
async fn direct_lead_is_handled_and_answered(
    world: &World,
    lead: Envelope,
    handler: &str,
    rule: &str,
) {
    let finder = lead.sender.clone();
    let receipt = world
        .gateway(&finder)
        .await
        .submit(submit(lead))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, handler, "{rule}: the first hop");
    let got = world.receive(handler).await;
    let l = lead_of(&got);
    assert_eq!(l.route, [hop(handler, Duty::Handle)]);
    assert_eq!(l.route_rule, rule);
    assert_eq!(l.found_by, finder);
    assert!(!l.route_chosen_by_person);
    world
        .gateway(handler)
        .await
        .feedback(FeedbackRequest {
            agency: handler.into(),
            referral: Some(got.clone()),
            feedback: feedback(Outcome::Substantiated, "经查属实"),
            idempotency_key: format!("fb-{}", receipt.id),
        })
        .await
        .unwrap();
    let answer = world.receive(&finder).await;
    assert_eq!(answer.in_reply_to, receipt.id);
    assert_eq!(answer.sender, handler);
    world
        .status_when("the DZ-8 obligation met", &finder, &receipt.id, |s| {
            met(s, "DZ-8", handler)
        })
        .await;
}

#[tokio::test]
async fn dz_7_1_a_justice_bureau_notifies_a_same_level_organ_directly() {
    let world = World::start().await;
    let lead = officer_lead(BUREAU, DZ_COURT, "dz71", Vec::new());
    direct_lead_is_handled_and_answered(&world, lead, DZ_COURT, "DZ-7(1)").await;
    world.stop().await;
}

/// DZ-7 (2): a municipal officer's lead goes to the same-level organ of the
/// officer's system, which relays it up. The handling organ's feedback goes
/// back to the finder, and the relay sees it pass; every hop is recorded.
#[tokio::test]
async fn dz_7_2_a_municipal_officer_is_relayed_up_and_feedback_returns_through_the_relay() {
    let world = World::start().await;
    let amqp = Amqp::connect().await;
    let receipt = world
        .gateway(BUREAU)
        .await
        .submit(submit(officer_lead(
            BUREAU,
            "cq-high-court",
            "dz72",
            Vec::new(),
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, DZ_COURT);
    let at_relay = world.receive(DZ_COURT).await;
    assert_eq!(
        lead_of(&at_relay).route,
        [
            hop(DZ_COURT, Duty::RelayUp),
            hop("cq-high-court", Duty::Handle)
        ]
    );
    assert_eq!(lead_of(&at_relay).route_rule, "DZ-7(2)");

    // Nobody but the next hop may pass it on, and the relay may not answer.
    let mut case_units = world.gateway(DZ_COURT).await;
    let err = world
        .gateway("yb-court")
        .await
        .relay(RelayRequest {
            agency: "yb-court".into(),
            lead: Some(at_relay.clone()),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    // Issue 16: `yb-court` never received the lead, so it cannot relay it;
    // the answer is the one an unknown id gets (no existence oracle).
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(
        err.message().contains("was not delivered to `yb-court`"),
        "{}",
        err.message()
    );
    let err = case_units
        .feedback(FeedbackRequest {
            agency: DZ_COURT.into(),
            referral: Some(at_relay.clone()),
            feedback: feedback(Outcome::Substantiated, "x"),
            idempotency_key: "too-early".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().starts_with("DZ-8: "), "{}", err.message());
    assert_eq!(waiting(&world, &amqp, "cq-high-court").await, 0);
    assert_eq!(waiting(&world, &amqp, BUREAU).await, 0, "nothing published");

    // One RPC relays it.
    let relayed = case_units
        .relay(RelayRequest {
            agency: DZ_COURT.into(),
            lead: Some(at_relay.clone()),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(relayed.recipient, "cq-high-court");
    let at_handler = world.receive("cq-high-court").await;
    assert_eq!(at_handler.relay_of, receipt.id);
    assert_eq!(at_handler.sender, DZ_COURT);
    assert_eq!(lead_of(&at_handler).found_by, BUREAU);

    world
        .gateway("cq-high-court")
        .await
        .feedback(FeedbackRequest {
            agency: "cq-high-court".into(),
            referral: Some(at_handler),
            feedback: feedback(Outcome::Sanctioned, "已给予处分 (DZ-13)"),
            idempotency_key: "dz72-fb".into(),
        })
        .await
        .unwrap();
    let at_finder = world.receive(BUREAU).await;
    assert_eq!(at_finder.in_reply_to, receipt.id);
    assert_eq!(at_finder.sender, "cq-high-court");
    let seen_by_relay = world.receive(DZ_COURT).await;
    assert_eq!(seen_by_relay.id, at_finder.id, "the relay sees it pass");
    assert_eq!(seen_by_relay.kind, MessageKind::Feedback as i32);

    let expected = [
        (Hop::Submitted, BUREAU),
        (Hop::Delivered, DZ_COURT),
        (Hop::Relayed, DZ_COURT),
        (Hop::Delivered, "cq-high-court"),
        (Hop::Answered, "cq-high-court"),
    ];
    let hops_of = |s: &ReferralStatus| -> HashSet<(i32, String)> {
        s.timeline
            .iter()
            .map(|t| (t.hop, t.agency.clone()))
            .collect()
    };
    // The high court's Delivered hop comes in its gateway's next hop batch
    // (within REFBUS_HOP_BATCH_WINDOW), which may reach the tracker after
    // its Feedback: waited for with the obligations.
    let s = world
        .status_when(
            "the lead's hops and obligations",
            BUREAU,
            &receipt.id,
            |s| {
                let hops = hops_of(s);
                met(s, "DZ-7", DZ_COURT)
                    && met(s, "DZ-8", "cq-high-court")
                    && expected
                        .iter()
                        .all(|(h, a)| hops.contains(&(*h as i32, (*a).to_owned())))
            },
        )
        .await;
    let hops = hops_of(&s);
    for (h, agency) in expected {
        assert!(
            hops.contains(&(h as i32, agency.to_owned())),
            "{h:?} by {agency} in {hops:?}"
        );
    }
    // The relay and the handler read the lead in the tracker too.
    for agency in [DZ_COURT, "cq-high-court"] {
        assert!(world.status(agency, &receipt.id).await.is_ok(), "{agency}");
    }
    amqp.close().await;
    world.stop().await;
}

#[tokio::test]
async fn dz_7_3_another_districts_officer_is_transferred_across() {
    let world = World::start().await;
    let receipt = world
        .gateway(BUREAU)
        .await
        .submit(submit(officer_lead(BUREAU, "yb-court", "dz73", Vec::new())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, DZ_COURT);
    let at_relay = world.receive(DZ_COURT).await;
    assert_eq!(
        lead_of(&at_relay).route,
        [hop(DZ_COURT, Duty::Transfer), hop("yb-court", Duty::Handle)]
    );
    assert_eq!(lead_of(&at_relay).route_rule, "DZ-7(3)");
    world
        .gateway(DZ_COURT)
        .await
        .relay(RelayRequest {
            agency: DZ_COURT.into(),
            lead: Some(at_relay),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let at_handler = world.receive("yb-court").await;
    assert_eq!(at_handler.relay_of, receipt.id);
    world
        .status_when("the transfer recorded", BUREAU, &receipt.id, |s| {
            met(s, "DZ-7", DZ_COURT) && state(s, "DZ-8", "yb-court") == Some(ObligationState::Open)
        })
        .await;
    world.stop().await;
}

#[tokio::test]
async fn dz_8_a_bar_association_follows_dz_7_1() {
    let world = World::start().await;
    let lead = officer_lead(DZ_BAR, DZ_PSB, "dz8-bar", Vec::new());
    direct_lead_is_handled_and_answered(&world, lead, DZ_PSB, "DZ-8/DZ-7(1)").await;
    world.stop().await;
}

#[tokio::test]
async fn dz_8_a_judicial_organ_reports_a_lawyer_to_the_same_level_justice_bureau() {
    let world = World::start().await;
    let lead = lawyer_lead(DZ_COURT, "dz8-lawyer");
    direct_lead_is_handled_and_answered(&world, lead, BUREAU, "DZ-8").await;
    world.stop().await;
}

/// DZ-8 gives a bar association no rule for a municipal officer: the bus
/// says so and publishes nothing; a route a person names is then taken, and
/// the lead records that a person chose it.
#[tokio::test]
async fn dz_8_no_statutory_route_for_a_bar_association_and_a_municipal_officer_then_an_explicit_route()
 {
    let world = World::start().await;
    let amqp = Amqp::connect().await;
    let mut bar = world.gateway(DZ_BAR).await;
    let err = bar
        .submit(submit(officer_lead(
            DZ_BAR,
            "cq-psb",
            "dz8-none",
            Vec::new(),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("DZ-8: no statutory route: DZ-8 gives a bar association no rule for a municipal-level officer"),
        "{}",
        err.message()
    );
    assert_eq!(waiting(&world, &amqp, DZ_PSB).await, 0);
    assert_eq!(waiting(&world, &amqp, "cq-psb").await, 0);

    let named = vec![hop(DZ_PSB, Duty::RelayUp), hop("cq-psb", Duty::Handle)];
    let receipt = bar
        .submit(submit(officer_lead(
            DZ_BAR,
            "cq-psb",
            "dz8-named",
            named.clone(),
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, DZ_PSB);
    let got = world.receive(DZ_PSB).await;
    let lead = lead_of(&got);
    assert!(lead.route_chosen_by_person);
    assert_eq!(lead.route, named);
    assert_eq!(lead.route_rule, "DZ-6 (named by a person)");
    amqp.close().await;
    world.stop().await;
}

#[tokio::test]
async fn dz_7_a_lead_on_an_organ_not_in_the_directory_is_refused() {
    let world = World::start().await;
    let err = world
        .gateway(BUREAU)
        .await
        .submit(submit(officer_lead(
            BUREAU,
            "nowhere-court",
            "dz7-unknown",
            Vec::new(),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("DZ-7: "), "{}", err.message());
    assert!(err.message().contains("nowhere-court"), "{}", err.message());
    world.stop().await;
}

/// DZ-6 and Confidentiality: a lead reaches only the agencies on its route;
/// nobody else reads it, from an inbox or from the tracker, not even the
/// justice bureau supervising the region.
#[tokio::test]
async fn dz_6_a_lead_cannot_be_read_off_its_route() {
    let world = World::start().await;
    let amqp = Amqp::connect().await;
    let receipt = world
        .gateway(BUREAU)
        .await
        .submit(submit(officer_lead(BUREAU, DZ_COURT, "dz6", Vec::new())))
        .await
        .unwrap()
        .into_inner();
    let got = world.receive(DZ_COURT).await;
    assert_eq!(got.id, receipt.id);
    world
        .status_when("the lead delivered", DZ_COURT, &receipt.id, |s| {
            s.timeline.iter().any(|t| t.hop == Hop::Delivered as i32)
        })
        .await;
    for outsider in [
        "cq-justice-bureau",
        "yb-justice-bureau",
        DZ_PSB,
        "dz-procuratorate",
        DZ_BAR,
    ] {
        // DZ-6: not even its existence (issue 16): NOT_FOUND, as for an unknown id.
        let err = world.status(outsider, &receipt.id).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{outsider}");
        assert!(err.message().contains("no referral"), "{}", err.message());
        assert_eq!(waiting(&world, &amqp, outsider).await, 0, "{outsider}");
    }
    amqp.close().await;
    world.stop().await;
}

fn letter(recipient: &str, key: &str, disposition: Disposition) -> Envelope {
    Envelope {
        sender: CENTRE.into(),
        recipient: recipient.into(),
        idempotency_key: key.into(),
        payload: Some(Payload::Letter(Letter {
            detainee: Some(Detainee {
                name: "周五".into(),
                id_number: "500225199202023456".into(),
                custody_number: "DZ-2026-0501".into(),
            }),
            addressee: Some(lawyer()),
            disposition: Some(disposition),
        })),
        ..Envelope::default()
    }
}

#[tokio::test]
async fn cq_1_1c_a_letter_addressed_to_a_case_unit_is_rejected() {
    let world = World::start().await;
    let amqp = Amqp::connect().await;
    let err = world
        .gateway(CENTRE)
        .await
        .submit(submit(letter(
            DZ_PSB,
            "letter-to-police",
            // Sealed, as a hostile client could send it: still never to a
            // case unit.
            Disposition::SealedContent(
                [
                    refbus_core::envelope::AGE_MAGIC,
                    b"-> X25519 ...".as_slice(),
                ]
                .concat(),
            ),
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().starts_with("CQ-1.1c: "), "{}", err.message());
    assert_eq!(waiting(&world, &amqp, DZ_PSB).await, 0);
    amqp.close().await;
    world.stop().await;
}

/// CQ-1.1c: a letter is withheld only on a ground of the closed list; the
/// withholding notice carries the ground and no content.
#[tokio::test]
async fn cq_1_1c_a_letter_withheld_without_a_valid_ground_is_rejected() {
    let world = World::start().await;
    let amqp = Amqp::connect().await;
    let mut centre = world.gateway(CENTRE).await;
    for ground in [0, 99] {
        let err = centre
            .submit(submit(letter(
                "dz-legal-aid-centre",
                &format!("withheld-{ground}"),
                Disposition::WithheldOn(ground),
            )))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("letter.withheld_on: CQ-1.1c: "),
            "{}",
            err.message()
        );
    }
    assert_eq!(waiting(&world, &amqp, "dz-legal-aid-centre").await, 0);
    // A valid ground reaches the lawyer as a notice without content:
    // letters.rs, through the lawyer service.
    amqp.close().await;
    world.stop().await;
}

/// CQ-3.14 and CQ-3.13: a violation notice and a rights complaint, each
/// answered and closed in the tracker; the hearing a lawyer asked for is an
/// obligation of its own; an agency that was not asked cannot answer.
#[tokio::test]
async fn cq_3_14_and_cq_3_13_a_violation_notice_and_a_complaint_are_answered_and_closed() {
    let world = World::start().await;
    // CQ-3.14
    let notice = DetentionCentreClient::new(world.bus.channel_as("detention-centre", CENTRE).await)
        .notify_lawyer_violation(NotifyLawyerViolationRequest {
            detention_centre: CENTRE.into(),
            notice: Some(refbus_proto::v1::LawyerViolationNotice {
                lawyer: Some(lawyer()),
                occurred_at: None,
                description: "会见中违规使用通讯设备".into(),
                measures_taken: "当即制止".into(),
            }),
            idempotency_key: "cq314".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let delivered = world.receive(BUREAU).await;
    let err = JusticeBureauClient::new(
        world
            .bus
            .channel_as("justice-bureau", "yb-justice-bureau")
            .await,
    )
    .report_handling_result(ReportHandlingResultRequest {
        justice_bureau: "yb-justice-bureau".into(),
        referral: Some(delivered.clone()),
        outcome: Outcome::Sanctioned as i32,
        summary: "x".into(),
        idempotency_key: "cq314-wrong".into(),
    })
    .await
    .unwrap_err();
    // Issue 16: only the bureau the notice was delivered to answers it.
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert!(
        err.message()
            .contains("was not delivered to `yb-justice-bureau`"),
        "{}",
        err.message()
    );
    JusticeBureauClient::new(world.bus.channel_as("justice-bureau", BUREAU).await)
        .report_handling_result(ReportHandlingResultRequest {
            justice_bureau: BUREAU.into(),
            referral: Some(delivered),
            outcome: Outcome::Sanctioned as i32,
            summary: "已立案处理".into(),
            idempotency_key: "cq314-fb".into(),
        })
        .await
        .unwrap();
    assert_eq!(world.receive(CENTRE).await.in_reply_to, notice.id);
    world
        .status_when("CQ-3.14 closed", CENTRE, &notice.id, |s| {
            met(s, "CQ-3.14", BUREAU)
        })
        .await;

    // CQ-3.13, with a hearing asked for.
    let complaint = world
        .gateway(DZ_BAR)
        .await
        .submit(submit(Envelope {
            sender: DZ_BAR.into(),
            recipient: DZ_PSB.into(),
            idempotency_key: "cq313".into(),
            payload: Some(Payload::RightsComplaint(RightsComplaint {
                complainant: Some(lawyer()),
                respondent: CENTRE.into(),
                description: "会见申请被无故拒绝".into(),
                hearing_requested: true,
            })),
            ..Envelope::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let delivered = world.receive(DZ_PSB).await;
    let s = world
        .status_when("two CQ-3.13 obligations", DZ_BAR, &complaint.id, |s| {
            s.obligations.iter().filter(|o| o.rule == "CQ-3.13").count() == 2
        })
        .await;
    assert!(
        s.obligations
            .iter()
            .all(|o| o.state == ObligationState::Open as i32)
    );
    let mut police = world.gateway(DZ_PSB).await;
    police
        .feedback(FeedbackRequest {
            agency: DZ_PSB.into(),
            referral: Some(delivered.clone()),
            feedback: feedback(Outcome::Heard, "已当面听取律师意见"),
            idempotency_key: "cq313-heard".into(),
        })
        .await
        .unwrap();
    let s = world
        .status_when("the hearing met", DZ_BAR, &complaint.id, |s| {
            s.obligations
                .iter()
                .any(|o| o.id.ends_with("/hearing") && o.state == ObligationState::MetOnTime as i32)
        })
        .await;
    assert!(
        s.obligations
            .iter()
            .any(|o| o.id.ends_with("/feedback") && o.state == ObligationState::Open as i32),
        "hearing the lawyer does not answer the complaint"
    );
    police
        .feedback(FeedbackRequest {
            agency: DZ_PSB.into(),
            referral: Some(delivered),
            feedback: feedback(Outcome::Substantiated, "投诉属实，已整改"),
            idempotency_key: "cq313-result".into(),
        })
        .await
        .unwrap();
    world
        .status_when("CQ-3.13 closed", DZ_BAR, &complaint.id, |s| {
            s.obligations
                .iter()
                .all(|o| o.state == ObligationState::MetOnTime as i32)
        })
        .await;
    world.stop().await;
}

/// CQ-3.15: one notice to the region's police, justice bureau and bar
/// association; each acknowledges it on its own.
#[tokio::test]
async fn cq_3_15_a_joint_notice_is_acknowledged_by_each_recipient_on_its_own() {
    let world = World::start().await;
    let receipt =
        DetentionCentreClient::new(world.bus.channel_as("detention-centre", CENTRE).await)
            .notify_joint_action(NotifyJointActionRequest {
                detention_centre: CENTRE.into(),
                notice: Some(JointNotice {
                    subject: "看守所周边非法揽业".into(),
                    description: "门口有人冒充律师揽业".into(),
                }),
                idempotency_key: "cq315".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(receipt.recipient, DZ_PSB);
    assert_eq!(receipt.also_to, [BUREAU, DZ_BAR]);
    for agency in [DZ_PSB, BUREAU] {
        assert_eq!(world.receive(agency).await.id, receipt.id);
    }
    let s = world
        .status_when("two of three acknowledged", CENTRE, &receipt.id, |s| {
            met(s, "CQ-3.15", DZ_PSB) && met(s, "CQ-3.15", BUREAU)
        })
        .await;
    assert_eq!(
        state(&s, "CQ-3.15", DZ_BAR),
        Some(ObligationState::Open),
        "the bar association has not acknowledged yet"
    );
    assert_eq!(world.receive(DZ_BAR).await.id, receipt.id);
    world
        .status_when("all three acknowledged", CENTRE, &receipt.id, |s| {
            met(s, "CQ-3.15", DZ_BAR)
        })
        .await;
    world.stop().await;
}

#[tokio::test]
async fn cq_1_3d_a_verification_query_is_answered_and_closed() {
    let world = World::start().await;
    let query = world
        .gateway(CENTRE)
        .await
        .submit(submit(Envelope {
            sender: CENTRE.into(),
            recipient: "dz-psb-investigation".into(),
            idempotency_key: "cq13d".into(),
            payload: Some(Payload::VerificationQuery(VerificationQuery {
                detainee: Some(Detainee {
                    name: "吴六".into(),
                    id_number: "500225199303034567".into(),
                    custody_number: "DZ-2026-0602".into(),
                }),
                case_reference: "大公刑2026-88".into(),
                question: "临时寄押人员涉嫌罪名不明，请核实".into(),
                ..VerificationQuery::default()
            })),
            ..Envelope::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let delivered = world.receive("dz-psb-investigation").await;
    CaseUnitClient::new(
        world
            .bus
            .channel_as("case-unit", "dz-psb-investigation")
            .await,
    )
    .answer_verification_query(AnswerVerificationQueryRequest {
        case_unit: "dz-psb-investigation".into(),
        query: Some(delivered),
        answer: "涉嫌盗窃罪".into(),
        idempotency_key: "cq13d-answer".into(),
    })
    .await
    .unwrap();
    assert_eq!(world.receive(CENTRE).await.in_reply_to, query.id);
    world
        .status_when("CQ-1.3d closed", CENTRE, &query.id, |s| {
            met(s, "CQ-1.3d", "dz-psb-investigation")
        })
        .await;
    world.stop().await;
}
