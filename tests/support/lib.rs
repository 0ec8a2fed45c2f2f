//! Helpers for the acceptance tests: a whole bus per test (its own namespace
//! of queues on the real RabbitMQ, its own ports), raw AMQP access to look
//! at queues, a TCP proxy that can cut the broker connection, and a broker
//! node of a test's own that it may stop and start.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod broker;
pub mod fixtures;
pub mod lawyers;
pub mod proxy;
pub mod tracker;
pub mod up;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use refbus_core::signing::Signed;
use refbus_gateway::app::{Application, Shared, serve_all};
use refbus_gateway::auth::AuthSettings;
use refbus_gateway::{AgencyService, BusSettings};
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::{Delivery, InboxRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The broker the tests use: `AMQP_URL`, or the local default.
#[must_use]
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A free local port.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The repository root.
#[must_use]
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A bound on every wait in a test, so that a broken feature fails the test
/// instead of hanging it. Not a timing assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Awaits `f`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what} after {PATIENCE:?}"))
}

/// The next message of a server stream (bounded by [`PATIENCE`]), failing
/// the test on an error status or the stream's end.
pub async fn next_message<T>(what: &str, stream: &mut tonic::Streaming<T>) -> T {
    within(what, stream.message())
        .await
        .unwrap_or_else(|status| panic!("{what}: {status}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

/// The development CA and certificates (`deploy/dev-certs.sh`), made once
/// under `target/test-tls` and reused while complete.
#[must_use]
pub fn tls_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo_root().join("target/test-tls");
        let directory = repo_root().join("deploy/local/directory.toml");
        let complete = ["ca.pem", "server.pem", "server.key"]
            .iter()
            .all(|f| dir.join(f).exists())
            && refbus_core::Directory::load(&directory)
                .unwrap()
                .agencies()
                .iter()
                .all(|a| dir.join(format!("agencies/{}.key", a.id)).exists());
        if !complete {
            let status = std::process::Command::new(repo_root().join("deploy/dev-certs.sh"))
                .arg(&directory)
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("deploy/dev-certs.sh runs (needs openssl)");
            assert!(status.success(), "deploy/dev-certs.sh failed");
        }
        dir
    })
    .clone()
}

/// The environment that makes a service binary authenticate callers by
/// mutual TLS with the development certificates, as [`TestBus`] does.
#[must_use]
pub fn mtls_env() -> Vec<(&'static str, PathBuf)> {
    let dir = tls_dir();
    vec![
        ("REFBUS_AUTH", PathBuf::from("mtls")),
        ("REFBUS_TLS_CERT", dir.join("server.pem")),
        ("REFBUS_TLS_KEY", dir.join("server.key")),
        ("REFBUS_TLS_CLIENT_CA", dir.join("ca.pem")),
    ]
}

/// A TLS client configuration that trusts the development CA and presents
/// `agency`'s certificate.
#[must_use]
pub fn client_tls(agency: &str) -> ClientTlsConfig {
    let dir = tls_dir();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("agencies/{agency}.pem")),
            read(&format!("agencies/{agency}.key")),
        ))
        .domain_name("localhost")
}

/// A channel to `addr` authenticated as `agency` (mutual TLS).
pub async fn channel_to(addr: SocketAddr, agency: &str) -> Channel {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(client_tls(agency))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Settings for a fresh namespace whose queues expire after the test.
#[must_use]
pub fn test_settings(amqp_url: String) -> BusSettings {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let namespace = format!("t{}", &id[id.len() - 12..]);
    let inbox_db = std::env::temp_dir().join(format!("refbus-inbox-{namespace}.db"));
    BusSettings {
        amqp_url,
        directory: repo_root().join("deploy/local/directory.toml"),
        namespace,
        auth: AuthSettings::mtls_in(&tls_dir()),
        prefetch: 50,
        confirm_timeout: Duration::from_secs(3),
        queue_expires: Some(Duration::from_secs(60)),
        declare_topology: true,
        inbox_db,
        signing_keys: "development".into(),
        amqp_ca: None,
        development: false,
        policy: repo_root().join("deploy/policy"),
        lawyer_service: refbus_gateway::settings::LawyerServiceSettings::default(),
        hop_batch: refbus_gateway::settings::HopBatchSettings::default(),
    }
}

/// The agency services and the lawyer service running in this process on free ports, in a
/// namespace of their own.
pub struct TestBus {
    pub shared: Shared,
    pub addrs: HashMap<&'static str, SocketAddr>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

impl TestBus {
    /// Spawns the bus against the shared RabbitMQ.
    pub async fn spawn() -> Self {
        Self::spawn_with(test_settings(amqp_url())).await
    }

    pub async fn spawn_with(settings: BusSettings) -> Self {
        Self::spawn_services(settings, &AgencyService::ALL).await
    }

    /// As [`TestBus::spawn_with`], with only `services` (e.g. the five
    /// agency services, the lawyer service being run apart to restart it).
    pub async fn spawn_services(settings: BusSettings, services: &[AgencyService]) -> Self {
        let shutdown = CancellationToken::new();
        let shared = Shared::connect(settings, shutdown.clone())
            .await
            .expect("bus connects");
        let mut apps = Vec::new();
        let mut addrs = HashMap::new();
        for &service in services {
            let app = Application::build(service, &shared, "127.0.0.1:0".parse().unwrap(), &[])
                .await
                .unwrap();
            addrs.insert(service.name(), app.local_addr().unwrap());
            apps.push(app);
        }
        let for_task = shared.clone();
        let served = tokio::spawn(async move {
            serve_all(apps, &for_task).await.expect("services run");
        });
        Self {
            shared,
            addrs,
            shutdown,
            served,
        }
    }

    #[must_use]
    pub fn addr(&self, service: &str) -> SocketAddr {
        self.addrs[service]
    }

    /// A `Gateway` client of `service`, authenticated as `agency`.
    pub async fn gateway_as(&self, service: &str, agency: &str) -> GatewayClient<Channel> {
        GatewayClient::new(self.channel_as(service, agency).await)
    }

    /// A channel to `service`, authenticated as `agency`.
    pub async fn channel_as(&self, service: &str, agency: &str) -> Channel {
        channel_to(self.addrs[service], agency).await
    }

    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.shared.settings.namespace
    }

    #[must_use]
    /// The bus's deliveries exchange (`NS.deliveries`).
    pub fn deliveries_exchange(&self) -> String {
        self.shared.bus.topology().deliveries_exchange()
    }

    pub fn inbox_queue(&self, agency: &str) -> String {
        self.shared.bus.topology().inbox_queue(agency)
    }

    /// Stops the services, waits for them, and deletes the namespace's
    /// queues and exchanges (the broker has a limited number of file
    /// descriptors, and every quorum queue holds one).
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = within("the services to stop", self.served).await;
        delete_namespace(self.shared.bus.topology()).await;
        remove_inbox_db(&self.shared.settings);
    }
}

/// One agency service of its own, in this process, on `settings` (for
/// example another broker user, or a second instance sharing a bus).
pub struct ServiceInstance {
    pub addr: SocketAddr,
    /// Its process's metrics registry (what its `/metrics` would show).
    pub telemetry: std::sync::Arc<refbus_gateway::observe::Telemetry>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

impl ServiceInstance {
    pub async fn start(settings: BusSettings, service: AgencyService) -> Self {
        Self::start_on(settings, service, "127.0.0.1:0".parse().unwrap()).await
    }

    /// As [`ServiceInstance::start`], listening on `listen` (an address a
    /// stopped instance had, so that its clients find it again).
    pub async fn start_on(
        settings: BusSettings,
        service: AgencyService,
        listen: SocketAddr,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let shared = Shared::connect(settings, shutdown.clone()).await.unwrap();
        let app = Application::build(service, &shared, listen, &[])
            .await
            .unwrap();
        let addr = app.local_addr().unwrap();
        let telemetry = shared.telemetry.clone();
        let served = tokio::spawn(async move {
            serve_all(vec![app], &shared).await.expect("service runs");
        });
        Self {
            addr,
            telemetry,
            shutdown,
            served,
        }
    }

    /// Stops it and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = within("the service to stop", self.served).await;
    }
}

/// `refbus up` as a child process on `settings`' broker and namespace, with
/// its ledger under `data_dir`, its default (bearer) authentication, and
/// free ports; the caller adds output handling and spawns it.
#[must_use]
pub fn refbus_up(
    settings: &BusSettings,
    data_dir: &std::path::Path,
    rust_log: &str,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(refbus_binary());
    command
        .arg("up")
        .env("AMQP_URL", &settings.amqp_url)
        .env("REFBUS_NAMESPACE", &settings.namespace)
        .env("REFBUS_QUEUE_EXPIRES", "60s")
        .env("REFBUS_PORT_BASE", "0")
        .env("REFBUS_INBOX_DB", &settings.inbox_db)
        .env("REFBUS_DATA_DIR", data_dir)
        .env("RUST_LOG", rust_log)
        .env_remove("DATABASE_URL")
        .env_remove("REFBUS_AUTH")
        .current_dir(repo_root())
        .kill_on_drop(true);
    command
}

/// Removes a test's inbox state (the SQLite files and their journals:
/// the agencies' and the lawyer service's beside it).
pub fn remove_inbox_db(settings: &BusSettings) {
    let lawyers = refbus_gateway::lawyers::store::path_beside(&settings.inbox_db);
    for db in [&settings.inbox_db, &lawyers] {
        let db = db.display().to_string();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{db}{suffix}"));
        }
    }
}

/// Deletes a test namespace's queues and exchanges (their `x-expires`
/// catches what a failed test leaves behind).
pub async fn delete_namespace(topology: &refbus_bus::Topology) {
    let amqp = Amqp::connect().await;
    topology
        .delete(&amqp.channel)
        .await
        .expect("test namespace deleted");
    amqp.close().await;
}

/// The topology of a namespace over the shipped directory.
#[must_use]
pub fn topology_of(namespace: &str) -> refbus_bus::Topology {
    let directory =
        refbus_core::Directory::load(repo_root().join("deploy/local/directory.toml")).unwrap();
    refbus_bus::Topology::new(
        namespace,
        directory.agencies().iter().map(|a| a.id.clone()).collect(),
    )
}

/// An open `Inbox` stream.
pub struct Inbox {
    stream: tonic::Streaming<Delivery>,
}

impl Inbox {
    pub async fn open(client: &mut GatewayClient<Channel>, agency: &str) -> Self {
        let stream = client
            .inbox(InboxRequest {
                agency: agency.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        Self { stream }
    }

    /// The next delivery (bounded by [`PATIENCE`]).
    pub async fn next(&mut self) -> Delivery {
        within("an inbox delivery", self.stream.message())
            .await
            .expect("inbox stream healthy")
            .expect("inbox stream open")
    }
}

/// Raw AMQP access for looking at queues behind the services' backs.
pub struct Amqp {
    pub connection: Connection,
    pub channel: lapin::Channel,
}

impl Amqp {
    pub async fn connect() -> Self {
        Self::connect_to(&amqp_url()).await
    }

    /// Connects to the broker at `url` (a test's own node).
    pub async fn connect_to(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        Self {
            connection,
            channel,
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "test done".into()).await;
    }

    /// (ready messages, consumers) of a queue.
    pub async fn counts(&self, queue: &str) -> (u32, u32) {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::durable().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (q.message_count(), q.consumer_count())
    }

    /// Waits until no consumer is left on `queue` (a closed stream's channel
    /// has closed, so what it held unacknowledged is back in the queue), then
    /// returns its ready-message count.
    pub async fn settled_count(&self, queue: &str) -> u32 {
        within("the consumer to leave the queue", async {
            loop {
                let (messages, consumers) = self.counts(queue).await;
                if consumers == 0 {
                    return messages;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// Publishes raw bytes straight onto a queue (default exchange), unsigned.
    pub async fn publish_raw(&self, queue: &str, bytes: &[u8]) {
        self.publish_with(
            queue,
            bytes,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
    }

    async fn publish_with(&self, queue: &str, bytes: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                bytes,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes bytes onto a queue (default exchange), signed by `signer`
    /// with its development key, as an agency service would sign them.
    pub async fn publish_signed(&self, queue: &str, signer: &str, what: Signed, bytes: &[u8]) {
        self.publish_with(queue, bytes, signed_properties(signer, what, bytes))
            .await;
    }

    /// Publishes an envelope onto a queue, signed by its sender.
    pub async fn publish_envelope(&self, queue: &str, envelope: &refbus_proto::v1::Envelope) {
        use prost::Message;
        self.publish_signed(
            queue,
            &envelope.sender,
            Signed::Envelope,
            &envelope.encode_to_vec(),
        )
        .await;
    }

    /// How many envelopes `queue` holds ready: a message alone counts one,
    /// an `envelope_batch` message the envelopes it carries (issue 17).
    /// Counted by taking every ready message on a channel of its own, then
    /// closing it: they all go back to the queue (marked redelivered).
    pub async fn envelopes_in(&self, queue: &str) -> usize {
        use prost::Message;
        let channel = self.connection.create_channel().await.unwrap();
        let mut envelopes = 0;
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            let batch = message
                .delivery
                .properties
                .kind()
                .as_ref()
                .map(|k| k.as_str())
                == Some(refbus_bus::subscription::ENVELOPE_BATCH_TYPE);
            envelopes += if batch {
                refbus_proto::v1::EnvelopeBatch::decode(message.delivery.data.as_slice())
                    .map_or(1, |b| b.envelopes.len())
            } else {
                1
            };
        }
        let _ = channel.close(200, "counted".into()).await;
        envelopes
    }

    /// Declares a queue of the test's own (exclusive, gone with the
    /// connection) bound to `key` on `bus`'s deliveries exchange: a copy of
    /// every message published on that route. Returns its name.
    pub async fn spy(&self, bus: &TestBus, key: &str) -> String {
        use lapin::options::QueueBindOptions;
        let queue = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let name = queue.name().to_string();
        self.channel
            .queue_bind(
                name.as_str().into(),
                bus.deliveries_exchange().as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    /// Publishes `body` on `bus`'s deliveries exchange under `key`, as a
    /// plain AMQP publisher holding broker credentials would, and waits for
    /// the broker to take it.
    pub async fn publish_on_bus(
        &self,
        bus: &TestBus,
        key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        self.channel
            .basic_publish(
                bus.deliveries_exchange().as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Takes one message from a queue, if any (acknowledged at once).
    pub async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    }
}

/// Persistent-message properties carrying `signer`'s development-key
/// signature of `bytes` (refbus_core::signing).
#[must_use]
pub fn signed_properties(signer: &str, what: Signed, bytes: &[u8]) -> BasicProperties {
    let signature = refbus_core::signing::development_signature(signer, what, bytes);
    let mut headers = FieldTable::default();
    headers.insert(
        refbus_core::signing::SIGNATURE_HEADER.into(),
        lapin::types::AMQPValue::LongString(signature.as_str().into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Every sample of a Prometheus text scrape: `name{labels}` to value.
pub fn metric_samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// One sample of a scrape (`name{labels}`), which must be there.
///
/// # Panics
/// When the scrape has no such sample, naming it and the scrape.
pub fn metric_sample(text: &str, sample: &str) -> f64 {
    metric_samples(text)
        .get(sample)
        .copied()
        .unwrap_or_else(|| panic!("no {sample} in the scrape:\n{text}"))
}

/// Publishes a hop report on the bus (as a gateway would, with broker
/// credentials), signed by the agency it reports on, and waits for the
/// broker to take it.
pub async fn publish_hop(amqp: &Amqp, bus: &TestBus, report: &refbus_proto::v1::HopReport) {
    use prost::Message;
    let body = report.encode_to_vec();
    let hop =
        refbus_proto::v1::Hop::try_from(report.hop).unwrap_or(refbus_proto::v1::Hop::Delivered);
    let key = format!("event.{}", refbus_core::kind::hop_code(hop));
    let properties = signed_properties(&report.agency, Signed::HopReport, &body);
    amqp.publish_on_bus(bus, &key, &body, properties).await;
}

/// Acknowledges one delivery handed over to `agency`, which must succeed.
pub async fn acknowledge(client: &mut GatewayClient<Channel>, agency: &str, token: String) {
    client
        .acknowledge(refbus_proto::v1::AcknowledgeRequest {
            agency: agency.into(),
            delivery_token: token,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Opens `agency`'s `Inbox` stream holding at most `window` deliveries
/// unacknowledged.
pub async fn inbox_stream(
    client: &mut GatewayClient<Channel>,
    agency: &str,
    window: u32,
) -> tonic::Streaming<Delivery> {
    client
        .inbox(InboxRequest {
            agency: agency.into(),
            window,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Opens `agency`'s `Inbox` stream with its development bearer token (as
/// `refbus up` accepts), at the default window.
pub async fn inbox_stream_as(
    client: &mut GatewayClient<Channel>,
    agency: &str,
) -> tonic::Streaming<Delivery> {
    client
        .inbox(as_agency(
            agency,
            InboxRequest {
                agency: agency.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Acknowledges many deliveries handed over to `agency` in one call, each
/// of which must still be pending.
pub async fn acknowledge_all(
    client: &mut GatewayClient<Channel>,
    agency: &str,
    tokens: Vec<String>,
) {
    let response = client
        .acknowledge(refbus_proto::v1::AcknowledgeRequest {
            agency: agency.into(),
            delivery_tokens: tokens,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        response.not_pending.is_empty(),
        "not pending: {:?}",
        response.not_pending
    );
}

/// A request carrying `agency`'s development bearer token (what `refbus
/// up` accepts: `dev-<agency>`).
pub fn as_agency<T>(agency: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer dev-{agency}").parse().unwrap(),
    );
    request
}

/// Opens `agency`'s Inbox (bearer token), takes `n` deliveries and
/// acknowledges each; the stream closes on return. Returns their ids.
pub async fn take_and_acknowledge(
    client: &mut GatewayClient<Channel>,
    agency: &str,
    n: usize,
) -> Vec<String> {
    use tokio_stream::StreamExt;
    let mut inbox = inbox_stream_as(client, agency).await;
    let mut ids = Vec::new();
    for _ in 0..n {
        let delivery = within("a delivery", inbox.next()).await.unwrap().unwrap();
        ids.push(delivery.envelope.map(|e| e.id).unwrap_or_default());
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
    }
    ids
}

/// The `refbus` binary built beside the test binary (`cargo test` builds
/// every binary of the workspace into the same target directory).
#[must_use]
pub fn refbus_binary() -> PathBuf {
    if let Ok(path) = std::env::var("REFBUS_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/acceptance-HASH -> target/<profile>/refbus
    exe.parent()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join(format!("refbus{}", std::env::consts::EXE_SUFFIX)))
        .expect("target directory")
}

/// Opens what the bus sealed to a lawyer (CQ-1.1c: the age format) with
/// their identity, as the lawyer's own client does; `None` when it is not
/// sealed to this identity.
#[must_use]
pub fn open_sealed(sealed: &[u8], identity: &age::x25519::Identity) -> Option<Vec<u8>> {
    use std::io::Read;
    let decryptor = age::Decryptor::new(sealed).ok()?;
    let mut reader = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .ok()?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).ok()?;
    Some(out)
}
