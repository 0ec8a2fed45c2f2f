//! Issue 7: what operators see. `/metrics` after a scenario shows each
//! counter moved by exactly what the scenario did; every gRPC port answers
//! the standard health check and server reflection, `refbus up`'s and a
//! standalone `refbus serve`'s alike.

use std::collections::HashMap;

use refbus_core::signing::Signed;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_tests::fixtures::{CENTRE, DESK, legal_help_at, submit};
use refbus_tests::up::{Up, eventually, http_get};
use refbus_tests::{Amqp, as_agency, metric_samples, take_and_acknowledge};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn scrape(up: &Up) -> HashMap<String, f64> {
    let (status, body) = http_get(&format!("{}/metrics", up.url("dashboard")), None);
    assert_eq!(status, 200, "{body}");
    metric_samples(&body)
}

/// How much a sample moved between two scrapes (absent counts as 0).
fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>, sample: &str) -> f64 {
    after.get(sample).copied().unwrap_or(0.0) - before.get(sample).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_what_a_scenario_did() {
    let up = Up::start().await;
    let mut centre = up.gateway("detention-centre");
    let mut desk = up.gateway("legal-aid");
    let before = scrape(&up);

    // Garbage in the desk's inbox (first in the queue, so the desk's stream
    // meets it before the requests) and in the tracker's tap: both
    // dead-letter it.
    let amqp = Amqp::connect().await;
    let topology = refbus_tests::topology_of(&up.settings.namespace);
    amqp.publish_signed(
        &topology.inbox_queue(DESK),
        CENTRE,
        Signed::Envelope,
        b"not an envelope",
    )
    .await;
    amqp.publish_raw(&topology.tap_queue(), b"not an envelope either")
        .await;

    // 3 requests accepted, 1 forbidden (to a court: CQ-1.1b names the
    // desk). Asked just now: none becomes overdue during the test.
    let legal_help = |key: &str| legal_help_at(key, chrono::Utc::now());
    for key in ["m-1", "m-2", "m-3"] {
        centre
            .submit(as_agency(CENTRE, submit(legal_help(key))))
            .await
            .unwrap();
    }
    let mut wrong = legal_help("m-4");
    wrong.recipient = "dz-court".into();
    assert!(
        centre
            .submit(as_agency(CENTRE, submit(wrong)))
            .await
            .is_err()
    );
    // The desk takes all three and acknowledges them.
    take_and_acknowledge(&mut desk, DESK, 3).await;
    // Everything recorded: 3 requests and 6 hops (delivered, acknowledged);
    // hop reports go out in batches (one per agency and window, issue 17),
    // confirmed in the background, so wait for those too.
    eventually("the tracker to record the scenario", || async {
        let now = scrape(&up);
        (moved(&before, &now, "refbus_tracker_recorded_total") >= 9.0
            && moved(
                &before,
                &now,
                "refbus_bus_confirmed_total{kind=\"hop_batch\"}",
            ) >= 1.0
            && moved(
                &before,
                &now,
                "refbus_bus_dead_lettered_total{queue=\"inbox\"}",
            ) >= 1.0
            && moved(
                &before,
                &now,
                "refbus_bus_dead_lettered_total{queue=\"tap\"}",
            ) >= 1.0)
            .then_some(())
    })
    .await;
    let after = scrape(&up);

    let expect = |sample: &str, by: f64| {
        assert_eq!(moved(&before, &after, sample), by, "{sample}");
    };
    expect(
        "refbus_gateway_submitted_total{service=\"detention-centre\",kind=\"legal_help_request\"}",
        3.0,
    );
    expect(
        "refbus_gateway_rejected_total{service=\"detention-centre\",rpc=\"Submit\",code=\"PermissionDenied\"}",
        1.0,
    );
    expect(
        "refbus_bus_published_total{kind=\"legal_help_request\"}",
        3.0,
    );
    expect(
        "refbus_bus_confirmed_total{kind=\"legal_help_request\"}",
        3.0,
    );
    // Six hops in at least one batch and at most six, each confirmed.
    let batches = moved(
        &before,
        &after,
        "refbus_bus_published_total{kind=\"hop_batch\"}",
    );
    assert!((1.0..=6.0).contains(&batches), "hop batches: {batches}");
    expect("refbus_bus_confirmed_total{kind=\"hop_batch\"}", batches);
    expect("refbus_bus_published_total{kind=\"hop_report\"}", 0.0);
    expect(
        "refbus_gateway_delivered_total{service=\"legal-aid\",kind=\"legal_help_request\"}",
        3.0,
    );
    expect(
        "refbus_gateway_acknowledged_total{service=\"legal-aid\"}",
        3.0,
    );
    expect(
        "refbus_gateway_delivery_seconds_count{service=\"legal-aid\"}",
        3.0,
    );
    expect(
        "refbus_gateway_submit_seconds_count{service=\"detention-centre\"}",
        4.0,
    );
    expect("refbus_bus_dead_lettered_total{queue=\"inbox\"}", 1.0);
    expect("refbus_bus_dead_lettered_total{queue=\"tap\"}", 1.0);
    expect("refbus_tracker_recorded_total", 9.0);
    expect("refbus_tracker_obligations_total", 3.0);
    expect("refbus_tracker_undecodable_total", 1.0);
    expect("refbus_tracker_lag_seconds_count", 9.0);
    // No label carries an id or personal data.
    let (_, text) = http_get(&format!("{}/metrics", up.url("dashboard")), None);
    for forbidden in ["李四", "500225199001011234", "m-1"] {
        assert!(!text.contains(forbidden), "{forbidden} in /metrics");
    }
    amqp.close().await;
    up.stop().await;
}

async fn serving(channel: Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health of `{service}`: {e}"))
        .into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

async fn reflected_services(channel: Channel) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_grpc_health_and_reflection() {
    let up = Up::start().await;
    let services = [
        ("detention-centre", "refbus.v1.DetentionCentre"),
        ("case-unit", "refbus.v1.CaseUnit"),
        ("legal-aid", "refbus.v1.LegalAid"),
        ("justice-bureau", "refbus.v1.JusticeBureau"),
        ("bar-association", "refbus.v1.BarAssociation"),
        ("tracker", "refbus.v1.Tracker"),
    ];
    for (service, grpc_name) in services {
        let channel = Channel::from_shared(up.url(service).to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        // Health needs no credentials (probes carry none).
        assert_eq!(
            serving(channel.clone(), "").await,
            ServingStatus::Serving,
            "{service}"
        );
        assert_eq!(
            serving(channel.clone(), grpc_name).await,
            ServingStatus::Serving,
            "{service}"
        );
        if service != "tracker" {
            assert_eq!(
                serving(channel.clone(), "refbus.v1.Gateway").await,
                ServingStatus::Serving
            );
        }
        let listed = reflected_services(channel).await;
        assert!(
            listed.iter().any(|s| s == grpc_name),
            "{service}: {listed:?}"
        );
        assert!(
            listed.iter().any(|s| s == "grpc.health.v1.Health"),
            "{service}: {listed:?}"
        );
        // The same through grpc.reflection.v1alpha (issue 16).
        let channel = Channel::from_shared(up.url(service).to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let listed = crate::secure::reflected_services_v1alpha(channel).await;
        assert!(
            listed.iter().any(|s| s == grpc_name),
            "{service}: {listed:?}"
        );
    }
    let (status, body) = http_get(&format!("{}/healthz", up.url("dashboard")), None);
    assert_eq!(
        (status, body.as_str()),
        (200, "ok: connected to the broker\n")
    );
    up.stop().await;

    // A standalone agency service: gRPC health, and its own /metrics and
    // /healthz on --http-listen.
    let settings = refbus_tests::test_settings(refbus_tests::amqp_url());
    let grpc = refbus_tests::free_port();
    let http = refbus_tests::free_port();
    let mut serve = tokio::process::Command::new(refbus_tests::refbus_binary());
    serve
        .args(["serve", "legal-aid"])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .env("AMQP_URL", &settings.amqp_url)
        .env("REFBUS_NAMESPACE", &settings.namespace)
        .env("REFBUS_QUEUE_EXPIRES", "60s")
        .env("REFBUS_INBOX_DB", &settings.inbox_db)
        .env_remove("REFBUS_AUTH")
        .current_dir(refbus_tests::repo_root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = serve.spawn().unwrap();
    let channel = eventually("refbus serve legal-aid to listen", || async {
        Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
            .unwrap()
            .connect()
            .await
            .ok()
    })
    .await;
    assert_eq!(
        serving(channel.clone(), "refbus.v1.LegalAid").await,
        ServingStatus::Serving
    );
    // A call it refuses, counted on its own /metrics.
    let refused = GatewayClient::new(channel)
        .submit(as_agency(
            DESK,
            refbus_proto::v1::SubmitRequest { envelope: None },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let (status, metrics) = http_get(&format!("http://127.0.0.1:{http}/metrics"), None);
    assert_eq!(status, 200);
    let scraped = metric_samples(&metrics);
    assert_eq!(
        scraped.get("refbus_gateway_rejected_total{service=\"legal-aid\",rpc=\"Submit\",code=\"InvalidArgument\"}"),
        Some(&1.0),
        "{metrics}"
    );
    assert_eq!(
        scraped.get("refbus_gateway_submit_seconds_count{service=\"legal-aid\"}"),
        Some(&1.0),
        "{metrics}"
    );
    let (status, _) = http_get(&format!("http://127.0.0.1:{http}/healthz"), None);
    assert_eq!(status, 200);
    let _ = child.start_kill();
    let _ = child.wait().await;
    refbus_tests::delete_namespace(&refbus_tests::topology_of(&settings.namespace)).await;
    refbus_tests::remove_inbox_db(&settings);
}
