//! Issue 5: every gRPC call is authenticated, by mutual TLS (the agency in
//! the client certificate) or, for development, a bearer token, and a
//! caller may act only as its own agency. Against the real services and
//! RabbitMQ; certificates from `deploy/dev-certs.sh`.

use std::path::Path;

use refbus_gateway::auth::AuthSettings;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::{
    AcknowledgeRequest, FeedbackRequest, GetReferralRequest, InboxRequest, RelayRequest,
};
use refbus_tests::fixtures::{BUREAU, CENTRE, DESK, legal_help, legal_help_at, submit};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, ledger_settings};
use refbus_tests::{Amqp, Inbox, TestBus, acknowledge, repo_root, test_settings, tls_dir};
use refbus_tracker::Clock;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Runs `deploy/dev-certs.sh` on a directory file listing `ids`, into `out`
/// (a fresh CA unless `out` already holds one).
fn make_certs(out: &Path, ids: &[&str]) {
    std::fs::create_dir_all(out).unwrap();
    let directory = out.join("directory.toml");
    let entries: String = ids
        .iter()
        .map(|id| format!("[[agency]]\nid = \"{id}\"\n"))
        .collect();
    std::fs::write(&directory, entries).unwrap();
    let status = std::process::Command::new(repo_root().join("deploy/dev-certs.sh"))
        .arg(&directory)
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

async fn connect(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> Result<Channel, String> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A call on `channel` fails before any handler sees it: at the handshake,
/// or the server closes the connection or speaks TLS to plain text
/// (CANCELLED, UNAVAILABLE, INTERNAL), or UNAUTHENTICATED.
async fn refused(channel: Result<Channel, String>) {
    let Ok(channel) = channel else { return };
    let err = GatewayClient::new(channel)
        .submit(submit(legal_help("refused")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::Unauthenticated
                | Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::Internal
        ),
        "{err:?}"
    );
}

/// Without a client certificate, with one from another CA, or over plain
/// HTTP/2, nothing gets through; a certificate from the right CA naming an
/// agency outside the directory is UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_callers_without_a_certificate_of_the_bus_ca() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let addr = bus.addr("detention-centre");
    let ca = Certificate::from_pem(std::fs::read(tls_dir().join("ca.pem")).unwrap());
    let trusting = || {
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name("localhost")
    };

    // No client certificate.
    refused(connect(addr, trusting()).await).await;

    // A certificate for the same agency from a CA the bus does not trust.
    let rogue = std::env::temp_dir().join(format!("refbus-rogue-ca-{}", std::process::id()));
    make_certs(&rogue, &[CENTRE]);
    let identity = |dir: &Path, id: &str| {
        Identity::from_pem(
            std::fs::read(dir.join(format!("agencies/{id}.pem"))).unwrap(),
            std::fs::read(dir.join(format!("agencies/{id}.key"))).unwrap(),
        )
    };
    refused(connect(addr, trusting().identity(identity(&rogue, CENTRE))).await).await;

    // Plain HTTP/2 to a TLS port.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"));
    refused(plain).await;

    // The bus's CA, but an agency the directory does not have.
    let ghost = std::env::temp_dir().join(format!("refbus-ghost-{}", std::process::id()));
    std::fs::create_dir_all(&ghost).unwrap();
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(tls_dir().join(file), ghost.join(file)).unwrap();
    }
    make_certs(&ghost, &["ghost-agency"]);
    let channel = connect(addr, trusting().identity(identity(&ghost, "ghost-agency")))
        .await
        .unwrap();
    let err = GatewayClient::new(channel)
        .submit(submit(legal_help("ghost")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(
        err.message()
            .contains("`ghost-agency`, which is not in the directory"),
        "{}",
        err.message()
    );

    // Nothing reached the desk.
    assert_eq!(amqp.counts(&bus.inbox_queue(DESK)).await.0, 0);
    let _ = std::fs::remove_dir_all(rogue);
    let _ = std::fs::remove_dir_all(ghost);
    amqp.close().await;
    bus.stop().await;
}

/// A caller authenticated as one agency cannot act as another, on any RPC
/// of the gateway or the tracker, and nothing is published for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_acts_only_as_its_own_agency() {
    let bus = TestBus::spawn().await;
    let tracker = TestTracker::start(&bus, ledger_settings(Db::Sqlite), Clock::System).await;
    let amqp = Amqp::connect().await;
    // Both agencies are served by the same service: only the credential
    // tells them apart.
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut other = bus.gateway_as("legal-aid", "yb-legal-aid-centre").await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let receipt = centre
        .submit(submit(legal_help_at("own-1", chrono::Utc::now())))
        .await
        .unwrap()
        .into_inner();

    let denied = |err: tonic::Status| {
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(
            err.message()
                .contains("the caller is authenticated as `yb-legal-aid-centre`"),
            "{}",
            err.message()
        );
    };
    // Another agency's inbox: refused before any delivery is taken.
    denied(
        other
            .inbox(InboxRequest {
                agency: DESK.into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let delivery = inbox.next().await;
    let referral = delivery.envelope.clone().unwrap();
    assert_eq!(referral.id, receipt.id);
    // Another agency's acknowledgement, feedback, relay and submission.
    denied(
        other
            .acknowledge(AcknowledgeRequest {
                agency: DESK.into(),
                delivery_token: delivery.delivery_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    denied(
        other
            .feedback(FeedbackRequest {
                agency: DESK.into(),
                referral: Some(referral.clone()),
                feedback: None,
                idempotency_key: "own-fb".into(),
            })
            .await
            .unwrap_err(),
    );
    denied(
        other
            .relay(RelayRequest {
                agency: DESK.into(),
                lead: Some(referral.clone()),
                idempotency_key: String::new(),
            })
            .await
            .unwrap_err(),
    );
    let mut forged = legal_help("own-2");
    forged.sender = CENTRE.into();
    denied(other.submit(submit(forged)).await.unwrap_err());
    // The tracker: another agency's view of a referral.
    let err = tracker
        .client_as("yb-legal-aid-centre")
        .await
        .get_referral(GetReferralRequest {
            agency: DESK.into(),
            referral_id: receipt.id.clone(),
        })
        .await
        .unwrap_err();
    denied(err);

    // The desk's own acknowledgement still works: the denied one took nothing.
    acknowledge(&mut desk, DESK, delivery.delivery_token).await;
    drop(inbox);
    assert_eq!(amqp.settled_count(&bus.inbox_queue(DESK)).await, 0);
    for queue in [BUREAU, CENTRE, "yb-legal-aid-centre"] {
        assert_eq!(amqp.counts(&bus.inbox_queue(queue)).await.0, 0, "{queue}");
    }
    let settings = tracker.stop().await.0;
    amqp.close().await;
    bus.stop().await;
    drop_ledger(&settings).await;
}

/// Development mode: bearer tokens from `deploy/local/tokens.toml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_authenticate_in_development_mode() {
    let mut settings = test_settings(refbus_tests::amqp_url());
    settings.auth = AuthSettings::bearer(repo_root().join("deploy/local/tokens.toml"));
    let bus = TestBus::spawn_with(settings).await;
    let channel = Channel::from_shared(format!("http://{}", bus.addr("detention-centre")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GatewayClient::new(channel);
    let call = |token: Option<&str>, key: &str| {
        let mut request = tonic::Request::new(submit(legal_help(key)));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", token.parse().unwrap());
        }
        request
    };
    for (header, expected) in [
        (None, "authorization: required"),
        (
            Some("dev-dz-detention-centre"),
            "authorization: expected `Bearer <token>`",
        ),
        (Some("Bearer not-a-token"), "authorization: unknown token"),
    ] {
        let err = client.submit(call(header, "b-1")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().starts_with(expected), "{}", err.message());
    }
    let err = client
        .submit(call(Some("Bearer dev-yb-detention-centre"), "b-2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let receipt = client
        .submit(call(Some("Bearer dev-dz-detention-centre"), "b-3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.recipient, DESK);
    bus.stop().await;
}

/// A tokens file naming an agency outside the directory, or a malformed
/// digest, stops start-up naming the file and the entry.
#[test]
fn a_bad_tokens_file_stops_start_up_with_the_entry() {
    let directory = std::sync::Arc::new(
        refbus_core::Directory::load(repo_root().join("deploy/local/directory.toml")).unwrap(),
    );
    let dir = std::env::temp_dir().join(format!("refbus-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens.toml");
    for (text, expected) in [
        (
            "[[caller]]\nagency = \"nobody\"\ntoken_sha256 = \"00\"\n",
            "caller 1 (`nobody`): agency: not in the directory",
        ),
        (
            "[[caller]]\nagency = \"dz-duty-desk\"\ntoken_sha256 = \"xyz\"\n",
            "caller 1 (`dz-duty-desk`): token_sha256: expected 64 hexadecimal digits",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let err = refbus_gateway::auth::Authenticator::load(
            &AuthSettings::bearer(&file),
            directory.clone(),
        )
        .err()
        .expect("refused");
        let message = err.to_string();
        assert!(
            message.starts_with(&file.display().to_string()),
            "{message}"
        );
        assert!(message.ends_with(expected), "{message}");
    }
    // The shipped development tokens load.
    refbus_gateway::auth::Authenticator::load(
        &AuthSettings::bearer(repo_root().join("deploy/local/tokens.toml")),
        directory,
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
