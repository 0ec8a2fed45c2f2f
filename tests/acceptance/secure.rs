//! Issue 16, "secure outside a laptop" and "clients of other stacks can
//! discover the services" (acceptance lines 6 and 7): development
//! credentials refused off loopback; a TLS-only broker listener (amqps);
//! a PostgreSQL that requires TLS; a bearer-token client over TLS;
//! reflection v1alpha; keepalives that end a half-open client's stream.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use refbus_gateway::app::{Application, Shared};
use refbus_gateway::auth::AuthSettings;
use refbus_gateway::server::Keepalive;
use refbus_gateway::{AgencyService, BusSettings};
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_tests::broker::BrokerNode;
use refbus_tests::fixtures::{CENTRE, DESK, legal_help, submit};
use refbus_tests::tracker::{Db, TestTracker, drop_ledger, eventually, ledger_settings};
use refbus_tests::up::Up;
use refbus_tests::{
    Inbox, TestBus, as_agency, client_tls, free_port, refbus_binary, repo_root, test_settings,
    tls_dir, within,
};
use refbus_tracker::{Clock, Tracker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn dev_tokens() -> PathBuf {
    repo_root().join("deploy/local/tokens.toml")
}

/// Every address: not loopback.
fn everywhere() -> SocketAddr {
    "0.0.0.0:0".parse().unwrap()
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Bus settings with the development keys and the development bearer
/// tokens over plaintext gRPC, what `refbus up` runs with.
fn development_settings() -> BusSettings {
    let mut settings = test_settings(refbus_tests::amqp_url());
    settings.auth = AuthSettings::bearer(dev_tokens());
    settings
}

async fn cleanup(shared: &Shared) {
    shared.shutdown.cancel();
    shared.bus.close().await;
    refbus_tests::delete_namespace(shared.bus.topology()).await;
    refbus_tests::remove_inbox_db(&shared.settings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_credentials_are_refused_off_loopback_unless_declared() {
    let shared = Shared::connect(development_settings(), CancellationToken::new())
        .await
        .unwrap();
    // An agency service on every address: each development credential is
    // named, with its setting, and the way out.
    let refused = Application::build(AgencyService::LegalAid, &shared, everywhere(), &[])
        .await
        .err()
        .expect("legal-aid on 0.0.0.0 with development credentials refuses to start")
        .to_string();
    for reason in [
        "refusing to serve gRPC on 0.0.0.0:0",
        "REFBUS_SIGNING_KEYS=development",
        "REFBUS_TOKENS=",
        "`dev-<agency>`",
        "REFBUS_AUTH=bearer without REFBUS_TLS_CERT and REFBUS_TLS_KEY",
        "plaintext gRPC",
        "--development (REFBUS_DEVELOPMENT=true)",
    ] {
        assert!(refused.contains(reason), "{reason}: {refused}");
    }
    // On loopback it starts (as under `refbus up`), but its HTTP port on
    // every address is refused too, for the keys and tokens.
    let mut app = Application::build(AgencyService::LegalAid, &shared, loopback(), &[])
        .await
        .unwrap();
    let http = app
        .serve_http_on(everywhere())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        http.contains("refusing to serve HTTP on 0.0.0.0:0"),
        "{http}"
    );
    assert!(http.contains("REFBUS_SIGNING_KEYS=development"), "{http}");
    assert!(http.contains("REFBUS_TOKENS="), "{http}");
    assert!(!http.contains("plaintext gRPC"), "{http}");
    app.serve_http_on(loopback()).await.unwrap();
    drop(app);
    // The tracker, on its gRPC and on its HTTP address.
    let mut tracker_settings = ledger_settings(Db::Sqlite);
    tracker_settings.listen = Some(everywhere());
    let refused = Tracker::build(&tracker_settings, &shared, Clock::System)
        .await
        .err()
        .expect("the tracker on 0.0.0.0 refuses to start")
        .to_string();
    assert!(
        refused.contains("refusing to serve gRPC on 0.0.0.0:0"),
        "{refused}"
    );
    assert!(
        refused.contains("REFBUS_SIGNING_KEYS=development"),
        "{refused}"
    );
    assert!(refused.contains("plaintext gRPC"), "{refused}");
    tracker_settings.listen = Some(loopback());
    tracker_settings.http_listen = Some(everywhere());
    let refused = Tracker::build(&tracker_settings, &shared, Clock::System)
        .await
        .err()
        .expect("the tracker's dashboard on 0.0.0.0 refuses to start")
        .to_string();
    assert!(
        refused.contains("refusing to serve HTTP on 0.0.0.0:0"),
        "{refused}"
    );
    assert!(refused.contains("REFBUS_TOKENS="), "{refused}");
    cleanup(&shared).await;

    // Declared a development deployment, both start on every address.
    let mut settings = development_settings();
    settings.development = true;
    let shared = Shared::connect(settings, CancellationToken::new())
        .await
        .unwrap();
    let app = Application::build(AgencyService::LegalAid, &shared, everywhere(), &[])
        .await
        .unwrap();
    assert!(app.local_addr().unwrap().ip().is_unspecified());
    drop(app);
    tracker_settings.listen = Some(everywhere());
    match Tracker::build(&tracker_settings, &shared, Clock::System).await {
        Ok(tracker) => drop(tracker),
        Err(e) => panic!("the tracker of a development deployment starts on 0.0.0.0: {e}"),
    }
    drop_ledger(&tracker_settings).await;
    cleanup(&shared).await;

    // Mutual TLS: no tokens and no plaintext, but the development signing
    // keys still refuse, and only they are named.
    let shared = Shared::connect(
        test_settings(refbus_tests::amqp_url()),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let refused = Application::build(AgencyService::CaseUnit, &shared, everywhere(), &[])
        .await
        .err()
        .expect("the development keys refuse under mutual TLS too")
        .to_string();
    assert!(
        refused.contains("REFBUS_SIGNING_KEYS=development"),
        "{refused}"
    );
    assert!(!refused.contains("REFBUS_TOKENS"), "{refused}");
    assert!(!refused.contains("plaintext"), "{refused}");
    cleanup(&shared).await;
}

/// `refbus serve` itself: refused on 0.0.0.0 with exit code 1 and the
/// reason on stderr; started with REFBUS_DEVELOPMENT=true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_binary_refuses_and_starts_when_declared_development() {
    let settings = test_settings(refbus_tests::amqp_url());
    let serve = |development: Option<&str>| {
        let mut command = tokio::process::Command::new(refbus_binary());
        command
            .args(["serve", "legal-aid", "--listen", "0.0.0.0:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .env("AMQP_URL", &settings.amqp_url)
            .env("REFBUS_NAMESPACE", &settings.namespace)
            .env("REFBUS_QUEUE_EXPIRES", "60s")
            .env("REFBUS_INBOX_DB", &settings.inbox_db)
            .env_remove("REFBUS_AUTH")
            .env_remove("REFBUS_DEVELOPMENT")
            .current_dir(repo_root())
            .kill_on_drop(true);
        if let Some(value) = development {
            command.env("REFBUS_DEVELOPMENT", value);
        }
        command
    };
    let refused = refbus_tests::up::run(serve(None)).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("REFBUS_SIGNING_KEYS=development")
            && refused.stderr.contains("REFBUS_DEVELOPMENT=true"),
        "{refused:?}"
    );
    let mut started = serve(Some("true"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = started.stdout.take().unwrap();
    let mut printed = String::new();
    within("refbus serve to say it is serving", async {
        let mut buf = [0u8; 512];
        while !printed.contains("serving") {
            let n = out.read(&mut buf).await.unwrap();
            assert!(n > 0, "refbus serve exited: {printed}");
            printed.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(printed.contains("on http://0.0.0.0:"), "{printed}");
    let _ = started.start_kill();
    let _ = started.wait().await;
    refbus_tests::delete_namespace(&refbus_tests::topology_of(&settings.namespace)).await;
    refbus_tests::remove_inbox_db(&settings);
}

/// The development CA, as the broker's and the database's deployment CA.
fn ca() -> PathBuf {
    tls_dir().join("ca.pem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_reach_a_tls_only_broker() {
    let node = BrokerNode::start_tls(&tls_dir()).await;
    assert!(
        node.amqp_url().starts_with("amqps://"),
        "{}",
        node.amqp_url()
    );
    // Plain AMQP to the TLS listener gets nowhere; nor does TLS without
    // the deployment's CA (the broker's certificate is not a public one).
    let mut plain = test_settings(node.amqp_url().replacen("amqps://", "amqp://", 1));
    plain.confirm_timeout = Duration::from_secs(2);
    assert!(
        Shared::connect(plain, CancellationToken::new())
            .await
            .is_err()
    );
    let unknown_ca = Shared::connect(test_settings(node.amqp_url()), CancellationToken::new())
        .await
        .err()
        .expect("the broker's certificate is checked")
        .to_string();
    assert!(unknown_ca.contains("cannot reach RabbitMQ"), "{unknown_ca}");
    // A CA for a plaintext URL is refused rather than silently unused.
    let mut mismatch = test_settings(refbus_tests::amqp_url());
    mismatch.amqp_ca = Some(ca());
    let refused = Shared::connect(mismatch, CancellationToken::new())
        .await
        .err()
        .expect("REFBUS_AMQP_CA with amqp://")
        .to_string();
    assert!(
        refused.contains("REFBUS_AMQP_CA") && refused.contains("amqps://"),
        "{refused}"
    );

    let mut settings = test_settings(node.amqp_url());
    settings.amqp_ca = Some(ca());
    let bus = TestBus::spawn_with(settings).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let sent = centre
        .submit(submit(legal_help("amqps-1")))
        .await
        .unwrap()
        .into_inner();
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    assert_eq!(inbox.next().await.envelope.unwrap().id, sent.id);
    drop(inbox);
    // After an outage the bus reconnects, over TLS again.
    node.stop().await;
    eventually("the bus to notice the outage", || async {
        (!bus.shared.bus.is_up()).then_some(())
    })
    .await;
    node.resume().await;
    eventually("the bus to reconnect over TLS", || async {
        bus.shared.bus.is_up().then_some(())
    })
    .await;
    let again = centre
        .submit(submit(legal_help("amqps-2")))
        .await
        .unwrap()
        .into_inner();
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let mut seen = BTreeSet::new();
    while !seen.contains(&again.id) {
        seen.insert(inbox.next().await.envelope.unwrap().id);
    }
    drop(inbox);
    bus.stop().await;
}

/// A PostgreSQL of the test's own that accepts only TLS connections
/// (`hostssl` lines only), presenting the development server certificate.
/// Stopped and removed when dropped, panics included.
struct TlsPostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// Where PostgreSQL's server binaries are (Debian keeps them out of PATH).
fn postgres_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|version| version.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect(
        "PostgreSQL's server binaries under /usr/lib/postgresql/*/bin (Debian package postgresql)",
    )
}

fn as_postgres(bin: &Path, program: &str, args: &[&str]) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(program))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{program} {args:?}");
}

impl TlsPostgres {
    fn start() -> Self {
        let bin = postgres_bin();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("refbus-pg-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let node = Self { port, dir, bin };
        let dir = &node.dir;
        for file in ["server.pem", "server.key"] {
            std::fs::copy(tls_dir().join(file), dir.join(file)).unwrap();
        }
        let owned = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(owned.success());
        let data = dir.join("data");
        let data_arg = data.display().to_string();
        as_postgres(
            &node.bin,
            "initdb",
            &[
                "-D",
                &data_arg,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf += &format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.pem'\nssl_key_file = '{dir}/server.key'\nfsync = off\n",
            dir = dir.display()
        );
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        // TLS or nothing: no `host` or `local` line.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let log = dir.join("log").display().to_string();
        as_postgres(
            &node.bin,
            "pg_ctl",
            &["-D", &data_arg, "-l", &log, "-w", "-t", "60", "start"],
        );
        node
    }

    /// A URL to the instance's `postgres` database with `params`.
    fn url(&self, params: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{params}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_records_in_a_postgresql_that_requires_tls() {
    use sqlx::Connection;
    let postgres = TlsPostgres::start();
    // Without TLS the server lets nobody in: TLS is what gets the tracker in.
    let plaintext = sqlx::PgConnection::connect(&postgres.url("sslmode=disable"))
        .await
        .expect_err("a plaintext connection is refused")
        .to_string();
    assert!(plaintext.contains("no pg_hba.conf entry"), "{plaintext}");
    // verify-full: the server's certificate from the deployment's CA, for
    // the host connected to.
    let verified = postgres.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca().display()
    ));
    let mut conn = sqlx::PgConnection::connect(&verified).await.unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(ssl, "the connection is encrypted");
    conn.close().await.unwrap();
    let require = sqlx::PgConnection::connect(&postgres.url("sslmode=require")).await;
    assert!(require.is_ok(), "sslmode=require: {require:?}");

    let bus = TestBus::spawn().await;
    let mut settings = ledger_settings(Db::Postgres);
    settings.database_url = Some(verified);
    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let sent = bus
        .gateway_as("detention-centre", CENTRE)
        .await
        .submit(submit(legal_help("pg-tls-1")))
        .await
        .unwrap()
        .into_inner();
    let status = eventually("the referral in the TLS-only ledger", || async {
        tracker.status(CENTRE, &sent.id).await.ok()
    })
    .await;
    assert_eq!(status.id, sent.id);
    tracker.stop().await;
    bus.stop().await;
}

/// A client that trusts the development CA and presents no certificate.
fn server_tls() -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca()).unwrap()))
        .domain_name("localhost")
}

/// `refbus up` serving TLS with bearer tokens (a certificate, no client CA).
async fn up_with_bearer_tls() -> Up {
    let tls = tls_dir();
    Up::start_with(vec![
        ("REFBUS_TLS_CERT", tls.join("server.pem")),
        ("REFBUS_TLS_KEY", tls.join("server.key")),
    ])
    .await
}

async fn tls_channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(server_tls())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_client_over_tls_submits_and_reads_its_inbox() {
    let up = up_with_bearer_tls().await;
    for service in ["detention-centre", "legal-aid", "tracker"] {
        assert!(up.url(service).starts_with("https://"), "{:?}", up.addrs);
    }
    let mut centre = GatewayClient::new(tls_channel(up.url("detention-centre")).await);
    let sent = centre
        .submit(as_agency(CENTRE, submit(legal_help("tls-bearer-1"))))
        .await
        .unwrap()
        .into_inner();
    // The token still decides who the caller is.
    let anonymous = centre
        .submit(submit(legal_help("tls-bearer-2")))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    let mut desk = GatewayClient::new(tls_channel(up.url("legal-aid")).await);
    let mut inbox = refbus_tests::inbox_stream_as(&mut desk, DESK).await;
    let delivery = within("a delivery over TLS", inbox.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.envelope.unwrap().id, sent.id);
    drop(inbox);

    // Plaintext to the TLS port: no gRPC answer at all.
    let plain = up
        .url("detention-centre")
        .replacen("https://", "http://", 1);
    let failed = match Channel::from_shared(plain).unwrap().connect().await {
        Err(_) => true,
        Ok(channel) => GatewayClient::new(channel)
            .submit(as_agency(CENTRE, submit(legal_help("tls-bearer-3"))))
            .await
            .is_err(),
    };
    assert!(failed, "plaintext gRPC reached a TLS port");

    // The refbus command, with --ca and the agency's token.
    let files = up.data_dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let request = files.join("tls-cli.json");
    std::fs::write(
        &request,
        format!(
            r#"{{"recipient": "{DESK}", "idempotency_key": "tls-cli", "clock_started_at": "{}",
                "legal_help_request": {{"detention_centre": "{CENTRE}", "matter": "tls",
                  "detainee": {{"name": "王五", "id_number": "500225199202021234", "custody_number": "DZ-TLS-1"}}}}}}"#,
            chrono::Utc::now().to_rfc3339()
        ),
    )
    .unwrap();
    let ca = ca().display().to_string();
    let request = request.display().to_string();
    let sent = up
        .refbus("detention-centre", CENTRE, &["send", &request, "--ca", &ca])
        .await;
    assert_eq!(sent.code, 0, "{sent:?}");
    let without_ca = up
        .refbus("detention-centre", CENTRE, &["send", &request])
        .await;
    assert_ne!(without_ca.code, 0, "{without_ca:?}");
    let read = up
        .refbus(
            "legal-aid",
            DESK,
            &[
                "inbox", "--no-ack", "-o", "json", "--idle", "3s", "--ca", &ca,
            ],
        )
        .await;
    assert_eq!(read.code, 0, "{read:?}");
    assert!(read.stdout.contains("tls-cli"), "{read:?}");
    up.stop().await;
}

/// The services `grpc.reflection.v1alpha` lists on `channel`.
pub(crate) async fn reflected_services_v1alpha(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let names = match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("not a service list: {other:?}"),
    };
    // What a client does next: the file that defines a listed service.
    let symbol = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(names[0].clone())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([symbol]))
        .await
        .unwrap()
        .into_inner();
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty(), "{}", names[0]);
        }
        other => panic!("no descriptor for {}: {other:?}", names[0]),
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_lists_the_refbus_services_on_every_port() {
    let up = up_with_bearer_tls().await;
    for (service, grpc_name) in [
        ("detention-centre", "refbus.v1.DetentionCentre"),
        ("case-unit", "refbus.v1.CaseUnit"),
        ("legal-aid", "refbus.v1.LegalAid"),
        ("justice-bureau", "refbus.v1.JusticeBureau"),
        ("bar-association", "refbus.v1.BarAssociation"),
        ("tracker", "refbus.v1.Tracker"),
    ] {
        // No credentials: reflection answers without a token.
        let listed = reflected_services_v1alpha(tls_channel(up.url(service)).await).await;
        assert!(
            listed.iter().any(|s| s == grpc_name),
            "{service}: {listed:?}"
        );
        if service != "tracker" {
            assert!(
                listed.iter().any(|s| s == "refbus.v1.Gateway"),
                "{service}: {listed:?}"
            );
        }
        assert!(
            listed
                .iter()
                .any(|s| s == "grpc.reflection.v1alpha.ServerReflection"),
            "{service}: {listed:?}"
        );
    }
    up.stop().await;
}

/// A TCP relay in front of a service that can freeze: it then stops
/// forwarding in both directions but keeps both connections open, as a
/// client whose machine vanished does (half-open).
struct Relay {
    addr: SocketAddr,
    frozen: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    gone: CancellationToken,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
        let gone = CancellationToken::new();
        let (state, until) = (frozen.clone(), gone.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = TcpStream::connect(target).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (upstream_read, upstream_write) = upstream.into_split();
                tokio::spawn(pump(
                    client_read,
                    upstream_write,
                    state.subscribe(),
                    until.clone(),
                ));
                tokio::spawn(pump(
                    upstream_read,
                    client_write,
                    state.subscribe(),
                    until.clone(),
                ));
            }
        });
        Self { addr, frozen, gone }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

/// Copies until frozen; then holds both ends, reading and writing nothing,
/// until the relay is dropped.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut frozen: tokio::sync::watch::Receiver<bool>,
    gone: CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            () = async { let _ = frozen.wait_for(|f| *f).await; } => break,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
            },
        }
    }
    gone.cancelled().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_client_loses_its_deliveries_to_the_queue_once_keepalive_notices() {
    let mut settings = test_settings(refbus_tests::amqp_url());
    settings.auth.keepalive = Keepalive {
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(500),
        ..Keepalive::default()
    };
    let bus = TestBus::spawn_with(settings).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let mut ids = BTreeSet::new();
    for i in 0..3 {
        let sent = centre
            .submit(submit(legal_help(&format!("half-open-{i}"))))
            .await
            .unwrap()
            .into_inner();
        ids.insert(sent.id);
    }
    // The desk reads all three through the relay and acknowledges none ...
    let relay = Relay::start(bus.addr("legal-aid")).await;
    let channel = Channel::from_shared(format!("https://{}", relay.addr))
        .unwrap()
        .tls_config(client_tls(DESK))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut vanishing = GatewayClient::new(channel);
    let mut inbox = Inbox::open(&mut vanishing, DESK).await;
    let mut held = BTreeSet::new();
    for _ in 0..3 {
        held.insert(inbox.next().await.envelope.unwrap().id);
    }
    assert_eq!(held, ids);
    // ... then its machine vanishes: the connection stays open, silent.
    relay.freeze();
    // The server's PING goes unanswered, it closes the connection, and the
    // deliveries return to the queue: the desk's next stream gets them.
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut again = Inbox::open(&mut desk, DESK).await;
    let mut returned = BTreeSet::new();
    while returned.len() < 3 {
        let delivery = again.next().await;
        assert!(
            delivery.redelivered,
            "handed over before, so marked redelivered"
        );
        returned.insert(delivery.envelope.unwrap().id);
    }
    assert_eq!(returned, ids);
    drop(again);
    drop(inbox);
    drop(relay);
    bus.stop().await;
}

/// Reads HTTP/2 frames from `stream` until `want` arrives: its type, or
/// `None` at the end of the connection.
async fn next_frame_of(stream: &mut TcpStream, want: u8) -> Option<u8> {
    loop {
        let mut header = [0u8; 9];
        if stream.read_exact(&mut header).await.is_err() {
            return None;
        }
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; length];
        if stream.read_exact(&mut payload).await.is_err() {
            return None;
        }
        if header[3] == want {
            return Some(want);
        }
    }
}

/// Every gRPC port of `refbus up`, the tracker's too, pings a client that
/// has gone quiet and closes the connection when the PING goes unanswered
/// (REFBUS_GRPC_KEEPALIVE_INTERVAL, REFBUS_GRPC_KEEPALIVE_TIMEOUT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_port_pings_a_silent_client_and_closes_it() {
    const PING: u8 = 0x6;
    let up = Up::start_with(vec![
        ("REFBUS_GRPC_KEEPALIVE_INTERVAL", PathBuf::from("300ms")),
        ("REFBUS_GRPC_KEEPALIVE_TIMEOUT", PathBuf::from("300ms")),
    ])
    .await;
    for service in [
        "detention-centre",
        "case-unit",
        "legal-aid",
        "justice-bureau",
        "bar-association",
        "tracker",
    ] {
        let addr = up.url(service).trim_start_matches("http://").to_owned();
        let mut client = TcpStream::connect(&addr).await.unwrap();
        // The HTTP/2 client preface and an empty SETTINGS frame; then
        // silence: no SETTINGS ack, no PING answer.
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let pinged = within("a keepalive PING", next_frame_of(&mut client, PING)).await;
        assert_eq!(
            pinged,
            Some(PING),
            "{service}: the connection ended unpinged"
        );
        let closed = within(
            "the unanswered connection to close",
            next_frame_of(&mut client, 0xff),
        )
        .await;
        assert_eq!(closed, None, "{service}");
    }
    up.stop().await;
}
