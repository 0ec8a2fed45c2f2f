//! Issue 5: broker permissions. Each agency service has a RabbitMQ user of
//! its own (`refbus broker-users`, `deploy/rabbitmq/users.sh`) that reads
//! only its own agencies' inboxes, writes only to the bus's exchanges and
//! configures nothing; an agency service runs under it.

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use refbus_gateway::{AgencyService, BusSettings};
use refbus_tests::fixtures::{CENTRE, DESK, legal_help_at, submit};
use refbus_tests::{
    Inbox, ServiceInstance, TestBus, amqp_url, channel_to, refbus_binary, repo_root,
};

/// `amqp_url()` with another user.
fn url_as(user: &str, password: &str) -> String {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

/// Runs `refbus broker-users` for `namespace` through bash, with known
/// passwords; returns the users made.
fn make_users(namespace: &str) -> Vec<String> {
    let script = std::process::Command::new(refbus_binary())
        .args(["broker-users", "--namespace", namespace])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(script.status.success());
    let mut bash = std::process::Command::new("bash");
    bash.arg("-c")
        .arg(String::from_utf8(script.stdout).unwrap());
    let users = [
        "DETENTION_CENTRE",
        "CASE_UNIT",
        "LEGAL_AID",
        "JUSTICE_BUREAU",
        "BAR_ASSOCIATION",
        "LAWYER_SERVICE",
        "TRACKER",
    ];
    for user in users {
        bash.env(
            format!("REFBUS_BROKER_PASSWORD_{user}"),
            format!("pw-{namespace}"),
        );
    }
    let out = bash.output().unwrap();
    assert!(
        out.status.success(),
        "users script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "no generated passwords printed");
    users
        .iter()
        .map(|u| format!("{namespace}-{}", u.to_lowercase().replace('_', "-")))
        .collect()
}

fn delete_users(users: &[String]) {
    for user in users {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", user])
            .output();
    }
}

/// Starts consuming `queue` on a new channel of `conn`.
async fn consume(conn: &Connection, queue: &str) -> Result<lapin::Consumer, lapin::Error> {
    conn.create_channel()
        .await?
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

fn refused(error: &lapin::Error) {
    let text = format!("{error:?}");
    assert!(
        text.contains("ACCESS_REFUSED") || text.contains("AccessRefused"),
        "{text}"
    );
}

/// One agency service's broker credentials cannot consume another agency's
/// inbox, declare or delete anything, or publish to a routing key naming no
/// agency; they can consume their own inboxes, and an agency service runs
/// under them end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_services_broker_user_reads_only_its_own_inboxes() {
    let bus = TestBus::spawn().await;
    let namespace = bus.namespace().to_owned();
    let users = make_users(&namespace);
    let legal_aid_url = url_as(
        &format!("{namespace}-legal-aid"),
        &format!("pw-{namespace}"),
    );
    let conn = Connection::connect(&legal_aid_url, ConnectionProperties::default())
        .await
        .unwrap();

    // Another agency's inbox, and the tap (every message on the bus): refused.
    refused(&consume(&conn, &bus.inbox_queue(CENTRE)).await.unwrap_err());
    let tap = bus.shared.bus.topology().tap_queue();
    refused(&consume(&conn, &tap).await.unwrap_err());
    // Declaring (or redeclaring, or deleting) a queue: refused.
    let channel = conn.create_channel().await.unwrap();
    refused(
        &channel
            .queue_declare(
                format!("{namespace}.inbox.sneaky").as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap_err(),
    );
    let channel = conn.create_channel().await.unwrap();
    refused(
        &channel
            .queue_delete(
                bus.inbox_queue(CENTRE).as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await
            .unwrap_err(),
    );
    // Publishing to a routing key that names no agency: refused by the
    // topic permission (the channel closes; the confirm never comes).
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let deliveries = bus.shared.bus.topology().deliveries_exchange();
    let published = async {
        channel
            .basic_publish(
                deliveries.as_str().into(),
                "nobody.legal_help_request".into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await?
            .await
    }
    .await;
    assert!(published.is_err(), "{published:?}");
    // Its own agencies' inboxes: allowed.
    consume(&conn, &bus.inbox_queue(DESK)).await.unwrap();
    let _ = conn.close(200, "done".into()).await;

    // The legal-aid service itself runs under its user, without declaring:
    // a request submitted on the bus reaches the desk through it.
    let settings = BusSettings {
        amqp_url: legal_aid_url,
        declare_topology: false,
        ..bus.shared.settings.clone()
    };
    let legal_aid = ServiceInstance::start(settings, AgencyService::LegalAid).await;
    let addr = legal_aid.addr;
    let receipt = bus
        .gateway_as("detention-centre", CENTRE)
        .await
        .submit(submit(legal_help_at("perm-1", chrono::Utc::now())))
        .await
        .unwrap()
        .into_inner();
    let mut desk =
        refbus_proto::v1::gateway_client::GatewayClient::new(channel_to(addr, DESK).await);
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let delivery = inbox.next().await;
    assert_eq!(delivery.envelope.unwrap().id, receipt.id);
    desk.acknowledge(refbus_proto::v1::AcknowledgeRequest {
        agency: DESK.into(),
        delivery_token: delivery.delivery_token,
        ..Default::default()
    })
    .await
    .unwrap();
    drop(inbox);
    legal_aid.stop().await;
    delete_users(&users);
    bus.stop().await;
}

/// `deploy/rabbitmq/users.sh` is what `refbus broker-users` makes of the
/// shipped directory.
#[test]
fn the_shipped_users_script_is_up_to_date() {
    let made = std::process::Command::new(refbus_binary())
        .arg("broker-users")
        .current_dir(repo_root())
        .env_remove("REFBUS_NAMESPACE")
        .env_remove("REFBUS_DIRECTORY")
        .output()
        .unwrap();
    assert!(made.status.success());
    let shipped = std::fs::read(repo_root().join("deploy/rabbitmq/users.sh")).unwrap();
    assert!(
        made.stdout == shipped,
        "deploy/rabbitmq/users.sh is stale: run `cargo run -p refbus -- broker-users > deploy/rabbitmq/users.sh`"
    );
}
