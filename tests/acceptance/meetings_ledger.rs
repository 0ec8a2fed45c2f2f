//! Issue 18: the tracker's ledger of lawyers' meetings. CQ-1.3a's two
//! duties (told why at once, met within 48 hours), lawful and unlawful
//! refusals, CQ-1.3e, the CQ-1.3b service order, CQ-1.1c withheld and sealed
//! letters, CQ-3.11b ratings and the CQ-1.3d link. Envelopes are seeded on
//! the tracker's tap signed with the development keys (as
//! `tests/acceptance/tracker.rs` does), on the real RabbitMQ and both
//! ledgers, with the tracker's injected clock.

use chrono::{DateTime, Duration, TimeZone, Utc};
use refbus_core::envelope::{from_timestamp, timestamp};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::letter::Disposition;
use refbus_proto::v1::{
    CaseType, ComplianceReportRequest, ComplianceReportResponse, Detainee, Envelope, Hop,
    HopReport, InterrogationRequest, Lawyer, Letter, MeetingRating, MessageKind, Obligation,
    ObligationState, Outcome, RefusalReason, ReportFormat, VerificationQuery, WithholdingGround,
};
use refbus_tests::fixtures::{
    CENTRE, LAWYER_SERVICE, LICENCE, centre_answer, meeting_request, new_id, on_bus,
};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::{Amqp, TestBus, publish_hop};
use refbus_tracker::Clock;

/// When the seeded requests are accepted (a Monday).
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 1, 0, 0).unwrap()
}

/// A bus, a tracker whose clock reads `now`, and the tap to seed.
struct World {
    bus: TestBus,
    tracker: TestTracker,
    amqp: Amqp,
    tap: String,
}

impl World {
    async fn start(db: Db, now: DateTime<Utc>) -> Self {
        let bus = TestBus::spawn().await;
        let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::manual(now)).await;
        let amqp = Amqp::connect().await;
        let tap = bus.shared.bus.topology().tap_queue();
        Self {
            bus,
            tracker,
            amqp,
            tap,
        }
    }

    /// Publishes envelopes on the tap, in order, signed by their senders.
    async fn seed(&self, envelopes: &[&Envelope]) {
        for e in envelopes {
            self.amqp.publish_envelope(&self.tap, e).await;
        }
    }

    /// `agency` reports `referral` delivered at `at`.
    async fn delivered(&self, referral: &str, agency: &str, at: DateTime<Utc>) {
        let report = HopReport {
            id: new_id(),
            referral_id: referral.into(),
            hop: Hop::Delivered as i32,
            agency: agency.into(),
            at: Some(timestamp(at)),
        };
        publish_hop(&self.amqp, &self.bus, &report).await;
    }

    /// The obligations of `id` as `asker` sees them, once `ready` holds.
    async fn obligations(
        &self,
        asker: &str,
        id: &str,
        ready: impl Fn(&[Obligation]) -> bool,
    ) -> Vec<Obligation> {
        eventually("the obligations to be recorded", || async {
            let s = self.tracker.status(asker, id).await.ok()?;
            ready(&s.obligations).then_some(s.obligations)
        })
        .await
    }

    async fn report(
        &self,
        asker: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        format: ReportFormat,
    ) -> ComplianceReportResponse {
        self.tracker
            .client_as(asker)
            .await
            .compliance_report(ComplianceReportRequest {
                agency: asker.into(),
                from: Some(timestamp(from)),
                to: Some(timestamp(to)),
                format: format as i32,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(self) {
        self.amqp.close().await;
        let settings = self.tracker.stop().await.0;
        self.bus.stop().await;
        drop_ledger(&settings).await;
    }
}

/// The obligation whose id ends in `/<rule>/<met_by>`.
fn find<'o>(obligations: &'o [Obligation], rule: &str, met_by: &str) -> Option<&'o Obligation> {
    let suffix = format!("/{rule}/{met_by}");
    obligations.iter().find(|o| o.id.ends_with(&suffix))
}

fn state_of(obligations: &[Obligation], rule: &str, met_by: &str) -> Option<ObligationState> {
    find(obligations, rule, met_by).and_then(|o| ObligationState::try_from(o.state).ok())
}

fn met_at(o: &Obligation) -> Option<DateTime<Utc>> {
    o.met_at.as_ref().and_then(from_timestamp)
}

/// Both CQ-1.3a duties are met (or, with `held` false, the first only).
fn answered(obligations: &[Obligation], held: bool) -> bool {
    let met = |met_by| find(obligations, "CQ-1.3a", met_by).is_some_and(|o| o.met_at.is_some());
    met("feedback") && (!held || met("held"))
}

/// CQ-1.3a: the lawyer told why within the hour (at once), but the meeting
/// held 49 hours after the request: on time on the first duty, late on the
/// 48-hour one.
async fn cq_1_3a_told_why_in_time_but_met_after_49_hours_is_late_on_the_48_hour_duty(db: Db) {
    let world = World::start(db, t0() + Duration::hours(60)).await;
    let request = meeting_request(CENTRE, t0(), false, CaseType::Ordinary);
    let told_why = centre_answer(
        &request,
        t0() + Duration::minutes(30),
        Outcome::Refused,
        Some(RefusalReason::NoRoomAvailable),
    );
    let held = centre_answer(&request, t0() + Duration::hours(49), Outcome::Held, None);
    world.seed(&[&request, &told_why, &held]).await;

    let obligations = world
        .obligations(CENTRE, &request.id, |o| answered(o, true))
        .await;
    let at_once = find(&obligations, "CQ-1.3a", "feedback").unwrap();
    assert_eq!(at_once.bearer, CENTRE);
    assert_eq!(
        from_timestamp(at_once.due_at.as_ref().unwrap()).unwrap() - t0(),
        Duration::hours(1),
        "at once: the configured `at_once`"
    );
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "feedback"),
        Some(ObligationState::MetOnTime)
    );
    let within_48 = find(&obligations, "CQ-1.3a", "held").unwrap();
    assert_eq!(
        from_timestamp(within_48.due_at.as_ref().unwrap()).unwrap() - t0(),
        Duration::hours(48)
    );
    assert_eq!(met_at(within_48), Some(t0() + Duration::hours(49)));
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "held"),
        Some(ObligationState::MetLate)
    );
    assert_eq!(
        within_48.notify,
        [LAWYER_SERVICE, "dz-psb"],
        "told to the lawyer's side and the centre's police organ"
    );
    // Not a temporarily held person: no CQ-1.3e duty.
    assert!(obligations.iter().all(|o| o.rule != "CQ-1.3e"));
    world.stop().await;
}

on_both_ledgers!(cq_1_3a_told_why_in_time_but_met_after_49_hours_is_late_on_the_48_hour_duty);

/// CQ-1.3a: arranged within the hour and held at 47 hours: on time on both
/// duties; the arrangement meets only the first.
async fn cq_1_3a_arranged_and_held_at_47_hours_is_on_time_on_both(db: Db) {
    let world = World::start(db, t0() + Duration::hours(60)).await;
    let request = meeting_request(CENTRE, t0(), false, CaseType::Ordinary);
    let arranged = centre_answer(
        &request,
        t0() + Duration::minutes(20),
        Outcome::Arranged,
        None,
    );
    world.seed(&[&request, &arranged]).await;
    let obligations = world
        .obligations(CENTRE, &request.id, |o| answered(o, false))
        .await;
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "held"),
        Some(ObligationState::Overdue),
        "an arrangement does not meet the 48 hours"
    );

    let held = centre_answer(&request, t0() + Duration::hours(47), Outcome::Held, None);
    world.seed(&[&held]).await;
    let obligations = world
        .obligations(CENTRE, &request.id, |o| answered(o, true))
        .await;
    let first = find(&obligations, "CQ-1.3a", "feedback").unwrap();
    assert_eq!(met_at(first), Some(t0() + Duration::minutes(20)));
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "feedback"),
        Some(ObligationState::MetOnTime)
    );
    let second = find(&obligations, "CQ-1.3a", "held").unwrap();
    assert_eq!(met_at(second), Some(t0() + Duration::hours(47)));
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "held"),
        Some(ObligationState::MetOnTime)
    );
    world.stop().await;
}

on_both_ledgers!(cq_1_3a_arranged_and_held_at_47_hours_is_on_time_on_both);

/// CQ-1.3a with CQ-1.2: a refusal for a lawful reason (the credentials
/// shown are not valid) meets the 48-hour duty; one for a reason that only
/// tells the lawyer why (no room) does not.
async fn cq_1_3a_a_lawful_refusal_meets_the_48_hour_duty_an_unlawful_one_does_not(db: Db) {
    let world = World::start(db, t0() + Duration::hours(60)).await;
    let lawful = meeting_request(CENTRE, t0(), false, CaseType::Ordinary);
    let unlawful = meeting_request(CENTRE, t0(), false, CaseType::Ordinary);
    let refused_lawfully = centre_answer(
        &lawful,
        t0() + Duration::minutes(30),
        Outcome::Refused,
        Some(RefusalReason::CredentialsNotValid),
    );
    let refused_unlawfully = centre_answer(
        &unlawful,
        t0() + Duration::minutes(30),
        Outcome::Refused,
        Some(RefusalReason::NoRoomAvailable),
    );
    world
        .seed(&[&lawful, &unlawful, &refused_lawfully, &refused_unlawfully])
        .await;

    let obligations = world
        .obligations(CENTRE, &lawful.id, |o| answered(o, true))
        .await;
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "held"),
        Some(ObligationState::MetOnTime)
    );
    let obligations = world
        .obligations(CENTRE, &unlawful.id, |o| answered(o, false))
        .await;
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "feedback"),
        Some(ObligationState::MetOnTime),
        "the lawyer was told why"
    );
    let held = find(&obligations, "CQ-1.3a", "held").unwrap();
    assert_eq!(held.met_at, None);
    assert_eq!(
        state_of(&obligations, "CQ-1.3a", "held"),
        Some(ObligationState::Overdue)
    );
    world.stop().await;
}

on_both_ledgers!(cq_1_3a_a_lawful_refusal_meets_the_48_hour_duty_an_unlawful_one_does_not);

/// CQ-1.3e: a temporarily held person suspected of an ordinary offence gets
/// the meeting promptly (the configured `promptly_arranged`, 24 h); one
/// whose offence is unclear has no such duty (CQ-1.3d comes first).
async fn cq_1_3e_a_temporarily_held_ordinary_suspect_is_met_promptly(db: Db) {
    let world = World::start(db, t0() + Duration::hours(60)).await;
    let ordinary = meeting_request(CENTRE, t0(), true, CaseType::Ordinary);
    let unclear = meeting_request(CENTRE, t0(), true, CaseType::Unclear);
    let held = centre_answer(&ordinary, t0() + Duration::hours(20), Outcome::Held, None);
    world.seed(&[&ordinary, &unclear, &held]).await;

    let obligations = world
        .obligations(CENTRE, &ordinary.id, |o| {
            find(o, "CQ-1.3e", "held").is_some_and(|o| o.met_at.is_some())
        })
        .await;
    let promptly = find(&obligations, "CQ-1.3e", "held").unwrap();
    assert_eq!(
        from_timestamp(promptly.due_at.as_ref().unwrap()).unwrap() - t0(),
        Duration::hours(24)
    );
    assert_eq!(
        state_of(&obligations, "CQ-1.3e", "held"),
        Some(ObligationState::MetOnTime)
    );
    let obligations = world
        .obligations(CENTRE, &unclear.id, |o| !o.is_empty())
        .await;
    assert!(
        obligations.iter().all(|o| o.rule != "CQ-1.3e"),
        "{obligations:?}"
    );
    assert_eq!(
        obligations.iter().filter(|o| o.rule == "CQ-1.3a").count(),
        2
    );
    world.stop().await;
}

on_both_ledgers!(cq_1_3e_a_temporarily_held_ordinary_suspect_is_met_promptly);

/// CQ-1.3b: three meeting requests and an interrogation accepted in that
/// order and served out of order: the report lists exactly the services
/// that overtook a request still waiting, naming both; only to those who
/// may see the centre.
async fn cq_1_3b_served_out_of_order_shows_in_the_report(db: Db) {
    let world = World::start(db, t0() + Duration::hours(60)).await;
    let h = Duration::hours;
    let first = meeting_request(CENTRE, t0(), false, CaseType::Ordinary);
    let second = meeting_request(CENTRE, t0() + h(1), false, CaseType::Ordinary);
    let interrogation = on_bus(
        MessageKind::InterrogationRequest,
        "dz-psb",
        CENTRE,
        t0() + h(2),
        Payload::InterrogationRequest(InterrogationRequest {
            detainee: Some(Detainee {
                name: "王五".into(),
                ..Detainee::default()
            }),
            case_reference: "大公刑(2026)88号".into(),
            purpose: "提讯".into(),
            ..InterrogationRequest::default()
        }),
    );
    let third = meeting_request(CENTRE, t0() + h(3), false, CaseType::Ordinary);
    // Served: the second first (overtaking the first), then the
    // interrogation (overtaking the first, not the second, served already),
    // then the first, then the third (in order: nothing waits before it).
    let served_second = centre_answer(&second, t0() + h(4), Outcome::Held, None);
    let served_interrogation = centre_answer(&interrogation, t0() + h(5), Outcome::Held, None);
    let served_first = centre_answer(&first, t0() + h(6), Outcome::Held, None);
    let served_third = centre_answer(&third, t0() + h(7), Outcome::Held, None);
    world
        .seed(&[
            &first,
            &second,
            &interrogation,
            &third,
            &served_second,
            &served_interrogation,
            &served_first,
            &served_third,
        ])
        .await;
    world
        .obligations(CENTRE, &third.id, |o| answered(o, true))
        .await;

    let (from, to) = (t0() - h(1), t0() + h(24));
    let report = eventually("the services to be recorded", || async {
        let r = world.report(CENTRE, from, to, ReportFormat::Csv).await;
        (r.out_of_order.len() >= 2).then_some(r)
    })
    .await;
    let listed: Vec<(&str, i32, &str, i32)> = report
        .out_of_order
        .iter()
        .map(|o| {
            (
                o.served_id.as_str(),
                o.served_kind,
                o.overtaken_id.as_str(),
                o.overtaken_kind,
            )
        })
        .collect();
    let meeting = MessageKind::LawyerMeetingRequest as i32;
    assert_eq!(
        listed,
        [
            (second.id.as_str(), meeting, first.id.as_str(), meeting),
            (
                interrogation.id.as_str(),
                MessageKind::InterrogationRequest as i32,
                first.id.as_str(),
                meeting
            ),
        ]
    );
    let o = &report.out_of_order[0];
    assert_eq!(o.detention_centre, CENTRE);
    assert_eq!(
        o.served_accepted_at.as_ref().and_then(from_timestamp),
        Some(t0() + h(1))
    );
    assert_eq!(
        o.served_at.as_ref().and_then(from_timestamp),
        Some(t0() + h(4))
    );
    assert_eq!(
        o.overtaken_accepted_at.as_ref().and_then(from_timestamp),
        Some(t0())
    );
    assert!(
        report.rendered.contains("# out of order (CQ-1.3b)")
            && report.rendered.contains(&second.id),
        "{}",
        report.rendered
    );
    // The supervising bureau sees it; an agency of another region does not.
    let supervisor = world
        .report("cq-justice-bureau", from, to, ReportFormat::Html)
        .await;
    assert_eq!(supervisor.out_of_order.len(), 2);
    assert!(supervisor.rendered.contains("<h2 id=\"out-of-order\">"));
    let other = world
        .report("yb-detention-centre", from, to, ReportFormat::Table)
        .await;
    assert!(other.out_of_order.is_empty());
    assert!(!other.rendered.contains("CQ-1.3b"));
    // Services outside the period are not listed.
    let later = world
        .report(CENTRE, t0() + h(5), to, ReportFormat::Unspecified)
        .await;
    assert_eq!(later.out_of_order.len(), 1);
    assert_eq!(later.out_of_order[0].served_id, interrogation.id);
    world.stop().await;
}

on_both_ledgers!(cq_1_3b_served_out_of_order_shows_in_the_report);

/// A letter from the Dazu centre to the lawyer, through the lawyer service.
fn letter(disposition: Disposition) -> Envelope {
    let mut envelope = on_bus(
        MessageKind::Letter,
        CENTRE,
        LAWYER_SERVICE,
        t0(),
        Payload::Letter(Letter {
            detainee: Some(Detainee {
                name: "李四".into(),
                ..Detainee::default()
            }),
            addressee: Some(Lawyer {
                name: "赵律师".into(),
                licence_number: LICENCE.into(),
                law_firm: "某律师事务所".into(),
            }),
            disposition: Some(disposition),
        }),
    );
    envelope.to_lawyers = vec![LICENCE.into()];
    envelope
}

/// CQ-1.1c: a withheld letter records its ground and does not count as
/// forwarded: the delivery of the notice to the lawyer meets nothing, and
/// the duty goes overdue (told to the centre's supervisor). A sealed letter
/// delivered to the lawyer is forwarded on time, recorded by the digest of
/// the sealed bytes.
async fn cq_1_1c_a_withheld_letter_does_not_count_as_forwarded_on_time(db: Db) {
    let world = World::start(db, t0() + Duration::days(10)).await;
    let withheld = letter(Disposition::WithheldOn(
        WithholdingGround::CollusionOrEvidenceDestruction as i32,
    ));
    let sealed_bytes = b"age-encryption.org/v1\n-> X25519 sealed-for-the-lawyer\n".to_vec();
    let sealed = letter(Disposition::SealedContent(sealed_bytes.clone()));
    world.seed(&[&withheld, &sealed]).await;
    world
        .delivered(&withheld.id, LAWYER_SERVICE, t0() + Duration::hours(1))
        .await;
    world
        .delivered(&sealed.id, LAWYER_SERVICE, t0() + Duration::hours(1))
        .await;

    let obligations = world
        .obligations(CENTRE, &sealed.id, |o| {
            find(o, "CQ-1.1c", "delivered").is_some_and(|o| o.met_at.is_some())
        })
        .await;
    assert_eq!(
        state_of(&obligations, "CQ-1.1c", "delivered"),
        Some(ObligationState::MetOnTime)
    );
    // The withheld letter's delivery was recorded, and met nothing.
    let status = eventually("the notice's delivery to be recorded", || async {
        let s = world.tracker.status(CENTRE, &withheld.id).await.ok()?;
        s.timeline
            .iter()
            .any(|t| t.hop == Hop::Delivered as i32)
            .then_some(s)
    })
    .await;
    let duty = find(&status.obligations, "CQ-1.1c", "delivered").unwrap();
    assert_eq!(duty.met_at, None, "a withheld letter is not forwarded");
    assert_eq!(
        ObligationState::try_from(duty.state).unwrap(),
        ObligationState::Overdue
    );
    assert_eq!(duty.bearer, CENTRE);
    assert_eq!(duty.notify, ["dz-psb"], "the centre's supervisor is told");

    let ledger = TestTracker::ledger(&world.tracker.settings).await;
    let body = |id: String| {
        let pool = ledger.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT body FROM ledger_events WHERE chained_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let withheld_body: serde_json::Value =
        serde_json::from_str(&body(withheld.id.clone()).await).unwrap();
    assert_eq!(
        withheld_body["withheld_on"],
        "WITHHOLDING_GROUND_COLLUSION_OR_EVIDENCE_DESTRUCTION"
    );
    let sealed_body: serde_json::Value =
        serde_json::from_str(&body(sealed.id.clone()).await).unwrap();
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(&sealed_bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sealed_body["letter_sha256"], digest.as_str());
    ledger.close().await;
    world.stop().await;
}

on_both_ledgers!(cq_1_1c_a_withheld_letter_does_not_count_as_forwarded_on_time);

/// A lawyer's rating of `request`'s meeting, through the lawyer service, to
/// `centre`.
fn rating(request: &Envelope, centre: &str, score: u32, at: DateTime<Utc>) -> Envelope {
    on_bus(
        MessageKind::MeetingRating,
        LAWYER_SERVICE,
        centre,
        at,
        Payload::MeetingRating(MeetingRating {
            meeting_request_id: request.id.clone(),
            score,
            comment: "安排及时".into(),
        }),
    )
}

/// CQ-3.11b: the lawyers' ratings per centre in the joint-meeting report:
/// only those of the period, each for the centre its meeting was asked of,
/// each centre to those who may see it.
async fn cq_3_11b_ratings_per_centre_in_the_joint_meeting_report(db: Db) {
    let world = World::start(db, t0() + Duration::days(3)).await;
    let h = Duration::hours;
    let dz_a = meeting_request(CENTRE, t0(), false, CaseType::Ordinary);
    let dz_b = meeting_request(CENTRE, t0(), false, CaseType::Ordinary);
    let yb = meeting_request("yb-detention-centre", t0(), false, CaseType::Ordinary);
    let ratings = [
        rating(&dz_a, CENTRE, 5, t0() + h(30)),
        rating(&dz_b, CENTRE, 3, t0() + h(31)),
        rating(&yb, "yb-detention-centre", 4, t0() + h(32)),
        // Yubei's meeting rated as Dazu's: counts for neither.
        rating(&yb, CENTRE, 1, t0() + h(33)),
        // Outside the period.
        rating(&dz_a, CENTRE, 1, t0() + h(50)),
    ];
    world.seed(&[&dz_a, &dz_b, &yb]).await;
    for r in &ratings {
        world.seed(&[r]).await;
    }
    let last = ratings.last().unwrap().id.clone();
    eventually("the ratings to be recorded", || async {
        world.tracker.status(LAWYER_SERVICE, &last).await.ok()
    })
    .await;

    let (from, to) = (t0(), t0() + h(48));
    let report = world
        .report("cq-justice-bureau", from, to, ReportFormat::Html)
        .await;
    let got: Vec<(&str, u64, f64, &[u64])> = report
        .ratings
        .iter()
        .map(|r| {
            (
                r.detention_centre.as_str(),
                r.ratings,
                r.mean_score,
                r.by_score.as_slice(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (CENTRE, 2, 4.0, &[0, 0, 1, 0, 1][..]),
            ("yb-detention-centre", 1, 4.0, &[0, 0, 0, 1, 0][..]),
        ]
    );
    assert!(
        report
            .rendered
            .contains("<h2 id=\"ratings\">Meeting ratings per centre (CQ-3.11b)</h2>"),
        "{}",
        report.rendered
    );
    // A centre sees its own.
    let own = world.report(CENTRE, from, to, ReportFormat::Csv).await;
    assert_eq!(own.ratings.len(), 1);
    assert_eq!(own.ratings[0].detention_centre, CENTRE);
    assert!(
        own.rendered
            .contains("# ratings (CQ-3.11b)\ndetention_centre,ratings,mean_score,score_1,score_2,score_3,score_4,score_5\ndz-detention-centre,2,4.00,0,0,1,0,1\n"),
        "{}",
        own.rendered
    );
    world.stop().await;
}

on_both_ledgers!(cq_3_11b_ratings_per_centre_in_the_joint_meeting_report);

/// CQ-1.3d: a verification query is linked to the meeting request it holds
/// up, and the request's status lists it.
async fn cq_1_3d_a_verification_query_is_linked_to_the_meeting_request_it_holds_up(db: Db) {
    let world = World::start(db, t0() + Duration::hours(2)).await;
    let request = meeting_request(CENTRE, t0(), true, CaseType::Unclear);
    let query = |sender: &str| {
        on_bus(
            MessageKind::VerificationQuery,
            sender,
            "dz-psb",
            t0() + Duration::minutes(10),
            Payload::VerificationQuery(VerificationQuery {
                question: "涉嫌罪名是否明确".into(),
                meeting_request_id: request.id.clone(),
                ..VerificationQuery::default()
            }),
        )
    };
    let verification = query(CENTRE);
    // Another centre cannot hold up this centre's meeting.
    let stray = query("yb-detention-centre");
    world.seed(&[&request, &verification, &stray]).await;
    let stray_id = stray.id.clone();
    eventually("the queries to be recorded", || async {
        world
            .tracker
            .status("yb-detention-centre", &stray_id)
            .await
            .ok()
    })
    .await;
    let status = eventually("the link to be recorded", || async {
        let s = world
            .tracker
            .status(LAWYER_SERVICE, &request.id)
            .await
            .ok()?;
        (!s.verification_queries.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(status.verification_queries, [verification.id.as_str()]);
    let own = world.tracker.status(CENTRE, &request.id).await.unwrap();
    assert_eq!(own.verification_queries, [verification.id.as_str()]);
    world.stop().await;
}

on_both_ledgers!(cq_1_3d_a_verification_query_is_linked_to_the_meeting_request_it_holds_up);
