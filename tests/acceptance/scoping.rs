//! Issue 18: who binds where and who supervises whom (DOMAIN.md). A rule
//! binds only its territory: a Shanghai legal-help request has no CQ-2020
//! obligation, a lead found in Yubei no DZ-2021 route; an overdue duty of a
//! detention centre is told to its police organ, not a justice bureau.
//! Against the real RabbitMQ, the real gateway and both ledgers.

use chrono::{Duration, TimeZone, Utc};
use refbus_core::envelope::from_timestamp;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::misconduct_lead::Subject;
use refbus_proto::v1::route_hop::Duty;
use refbus_proto::v1::{
    Envelope, JudicialOfficer, MessageKind, MisconductLead, ObligationState, RouteHop,
};
use refbus_tests::fixtures::{CENTRE, DESK, legal_help_at, on_bus, submit};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::{Amqp, TestBus};
use refbus_tracker::Clock;
use tonic::Code;

/// Who binds where: a legal-help request from a Shanghai centre is known
/// and recorded but creates no CQ-2020 obligation (CQ-2020 binds Chongqing);
/// one from the Dazu centre creates CQ-1.1b.
async fn a_legal_help_request_in_shanghai_creates_no_cq_2020_obligation(db: Db) {
    let bus = TestBus::spawn().await;
    let asked = Utc.with_ymd_and_hms(2026, 11, 2, 1, 0, 0).unwrap();
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::manual(asked)).await;
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let payload = || legal_help_at("scoping", asked).payload.unwrap();
    let shanghai = on_bus(
        MessageKind::LegalHelpRequest,
        "sh-first-detention-centre",
        "sh-legal-aid-centre",
        asked,
        payload(),
    );
    let dazu = on_bus(
        MessageKind::LegalHelpRequest,
        CENTRE,
        DESK,
        asked,
        payload(),
    );
    amqp.publish_envelope(&tap, &shanghai).await;
    amqp.publish_envelope(&tap, &dazu).await;

    let dz = eventually("the Dazu request to be recorded", || async {
        tracker.status(CENTRE, &dazu.id).await.ok()
    })
    .await;
    let rules: Vec<&str> = dz.obligations.iter().map(|o| o.rule.as_str()).collect();
    assert_eq!(rules, ["CQ-1.1b"]);
    let sh = eventually("the Shanghai request to be recorded", || async {
        tracker
            .status("sh-first-detention-centre", &shanghai.id)
            .await
            .ok()
    })
    .await;
    assert!(sh.kind_known, "a known kind, recorded");
    assert!(sh.obligations.is_empty(), "{:?}", sh.obligations);
    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(a_legal_help_request_in_shanghai_creates_no_cq_2020_obligation);

/// A lead the Yubei justice bureau found on a Yubei judge.
fn yubei_lead(key: &str, route: Vec<RouteHop>) -> Envelope {
    Envelope {
        sender: "yb-justice-bureau".into(),
        idempotency_key: key.into(),
        payload: Some(Payload::MisconductLead(MisconductLead {
            subject: Some(Subject::Officer(JudicialOfficer {
                name: "王某".into(),
                organ: "yb-court".into(),
                position: "审判员".into(),
            })),
            description: "与律师私下会面并收受财物".into(),
            route,
            ..MisconductLead::default()
        })),
        ..Envelope::default()
    }
}

/// DZ-2021 binds Dazu District only: a lead found in Yubei gets no
/// statutory route (FAILED_PRECONDITION naming DZ-2021, nothing published);
/// a route a person names is taken, and no DZ-2021 obligation arises.
async fn a_lead_found_in_yubei_has_no_dz_2021_route(db: Db) {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::System).await;
    let amqp = Amqp::connect().await;
    let mut bureau = bus.gateway_as("justice-bureau", "yb-justice-bureau").await;
    let err = bureau
        .submit(submit(yubei_lead("yb-none", Vec::new())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message()
            .starts_with("DZ-2021: no statutory route: DZ-2021 binds Dazu District (500111) only"),
        "{}",
        err.message()
    );
    assert_eq!(amqp.counts(&bus.inbox_queue("yb-court")).await.0, 0);

    let named = vec![RouteHop {
        agency: "yb-court".into(),
        duty: Duty::Handle as i32,
    }];
    let receipt = bureau
        .submit(submit(yubei_lead("yb-named", named)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, "yb-court");
    let status = eventually("the named lead to be recorded", || async {
        tracker.status("yb-justice-bureau", &receipt.id).await.ok()
    })
    .await;
    let Some(Payload::MisconductLead(lead)) = status.envelope.and_then(|e| e.payload) else {
        panic!("a party sees the lead");
    };
    assert!(lead.route_chosen_by_person);
    assert!(
        status.obligations.is_empty(),
        "the finder is outside DZ-2021's territory: {:?}",
        status.obligations
    );
    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(a_lead_found_in_yubei_has_no_dz_2021_route);

/// Who supervises whom: a detention centre answers to its public security
/// bureau (SH-4.3). Its overdue CQ-1.1b duty names dz-psb, and the overdue
/// notice reaches dz-psb's inbox queue.
async fn an_overdue_detention_centre_duty_is_told_to_its_supervising_police_unit(db: Db) {
    let bus = TestBus::spawn().await;
    let asked = Utc.with_ymd_and_hms(2026, 11, 2, 1, 0, 0).unwrap();
    let tracker = TestTracker::start(&bus, ledger_settings(db), Clock::manual(asked)).await;
    let amqp = Amqp::connect().await;
    let tap = bus.shared.bus.topology().tap_queue();
    let request = on_bus(
        MessageKind::LegalHelpRequest,
        CENTRE,
        DESK,
        asked,
        legal_help_at("overdue", asked).payload.unwrap(),
    );
    amqp.publish_envelope(&tap, &request).await;
    let obligation = eventually("the CQ-1.1b obligation", || async {
        tracker
            .status(CENTRE, &request.id)
            .await
            .ok()?
            .obligations
            .into_iter()
            .find(|o| o.rule == "CQ-1.1b")
    })
    .await;
    assert_eq!(obligation.bearer, CENTRE);
    assert_eq!(obligation.notify, [CENTRE, "dz-psb"]);
    let due = from_timestamp(obligation.due_at.as_ref().unwrap()).unwrap();
    tracker.clock.set(due - Duration::seconds(1));
    tracker
        .clock
        .set(due + Duration::from_std(bus.shared.settings.confirm_timeout).unwrap());

    let queue = bus.inbox_queue("dz-psb");
    let notice = eventually("the overdue notice in dz-psb's inbox", || async {
        let message = amqp.get(&queue).await?;
        let envelope =
            <Envelope as prost::Message>::decode(message.delivery.data.as_slice()).ok()?;
        match envelope.payload {
            Some(Payload::OverdueNotice(n)) if n.referral_id == request.id => Some(n),
            _ => None,
        }
    })
    .await;
    assert_eq!(notice.rule_id, "CQ-1.1b");
    assert_eq!(notice.obligated_agency, CENTRE);
    let status = tracker.status(CENTRE, &request.id).await.unwrap();
    assert_eq!(
        ObligationState::try_from(status.obligations[0].state).unwrap(),
        ObligationState::Overdue
    );
    // Nothing went to a justice bureau for it.
    assert_eq!(
        amqp.counts(&bus.inbox_queue("dz-justice-bureau")).await.0,
        0
    );
    amqp.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&settings).await;
}

on_both_ledgers!(an_overdue_detention_centre_duty_is_told_to_its_supervising_police_unit);
