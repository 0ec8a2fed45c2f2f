//! The tracker in a test: on a fresh SQLite file or a fresh PostgreSQL
//! schema, with an injected clock, restartable on the same ledger.

use std::net::SocketAddr;
use std::path::PathBuf;

use refbus_gateway::Shared;
use refbus_proto::v1::tracker_client::TrackerClient;
use refbus_proto::v1::{GetReferralRequest, ReferralStatus};
use refbus_tracker::ledger::Ledger;
use refbus_tracker::{Clock, Tracker, TrackerSettings};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{TestBus, repo_root, within};

/// Which database a test's ledger lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// The PostgreSQL the tests use: `TEST_DATABASE_URL`, or the local one.
#[must_use]
pub fn postgres_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A ledger location of its own for one test.
#[must_use]
pub fn ledger_settings(db: Db) -> TrackerSettings {
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let unique = &unique[unique.len() - 12..];
    let data_dir = std::env::temp_dir().join(format!("refbus-test-{unique}"));
    let (database_url, database_schema) = match db {
        Db::Sqlite => (None, None),
        Db::Postgres => (Some(postgres_url()), Some(format!("t{unique}"))),
    };
    TrackerSettings {
        database_url,
        database_schema,
        data_dir,
        policy: repo_root().join("deploy/policy"),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        batch: 500,
        linger: refbus_gateway::settings::parse_duration(refbus_tracker::app::DEFAULT_LINGER)
            .unwrap(),
    }
}

/// A tracker running in this process beside a [`TestBus`].
pub struct TestTracker {
    pub settings: TrackerSettings,
    pub addr: SocketAddr,
    /// Where the dashboard and `/metrics` are served.
    pub http: SocketAddr,
    pub clock: Clock,
    pub metrics: std::sync::Arc<refbus_tracker::record::Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestTracker {
    /// Starts a tracker on `settings`'s ledger.
    pub async fn start(bus: &TestBus, settings: TrackerSettings, clock: Clock) -> Self {
        let shutdown = bus.shared.shutdown.child_token();
        let shared = Shared {
            shutdown: shutdown.clone(),
            ..bus.shared.clone()
        };
        let tracker = Tracker::build(&settings, &shared, clock.clone())
            .await
            .expect("tracker starts");
        let addr = tracker.local_addr().unwrap();
        let http = tracker.http_addr().unwrap();
        let metrics = tracker.metrics.clone();
        let task = tokio::spawn(async move { tracker.run().await.expect("tracker runs") });
        Self {
            settings,
            addr,
            http,
            clock,
            metrics,
            shutdown,
            task,
        }
    }

    /// A client authenticated as `agency`.
    pub async fn client_as(&self, agency: &str) -> TrackerClient<Channel> {
        TrackerClient::new(crate::channel_to(self.addr, agency).await)
    }

    /// `GetReferral` as `asker` would call it.
    pub async fn status(&self, asker: &str, id: &str) -> Result<ReferralStatus, tonic::Status> {
        self.client_as(asker)
            .await
            .get_referral(GetReferralRequest {
                agency: asker.into(),
                referral_id: id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Stops it (unacknowledged tap deliveries return to the queue).
    pub async fn stop(self) -> (TrackerSettings, Clock) {
        self.shutdown.cancel();
        within("the tracker to stop", self.task).await.unwrap();
        (self.settings, self.clock)
    }

    /// Opens the ledger directly, behind the tracker's back.
    pub async fn ledger(settings: &TrackerSettings) -> Ledger {
        Ledger::connect(
            &settings.database().unwrap(),
            settings.database_schema.as_deref(),
        )
        .await
        .unwrap()
    }
}

/// Removes a test ledger (SQLite directory or PostgreSQL schema).
pub async fn drop_ledger(settings: &TrackerSettings) {
    if let Some(schema) = &settings.database_schema {
        let ledger = TestTracker::ledger(settings).await;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&ledger.pool)
            .await
            .unwrap();
        ledger.close().await;
    }
    let _ = std::fs::remove_dir_all(&settings.data_dir);
}

/// Polls `check` until it returns Some, bounded by [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(what, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
}

/// The tracker binary built beside the tests.
#[must_use]
pub fn tracker_binary() -> PathBuf {
    crate::refbus_binary().with_file_name(format!("tracker{}", std::env::consts::EXE_SUFFIX))
}

/// The tracker's dashboard on `tracker`'s ledger, served over plain HTTP
/// with the development bearer tokens (`dev-<agency>`), for tests whose
/// bus runs with mutual TLS (whose tracker's dashboard then has no
/// tokens). Stops with `bus`'s shutdown.
pub async fn bearer_dashboard(bus: &TestBus, tracker: &TestTracker) -> String {
    let auth = refbus_gateway::auth::Authenticator::load(
        &refbus_gateway::auth::AuthSettings::bearer(repo_root().join("deploy/local/tokens.toml")),
        bus.shared.directory.clone(),
    )
    .unwrap();
    dashboard_with(bus, tracker, std::sync::Arc::new(auth), false).await
}

/// The tracker's dashboard on `tracker`'s ledger with `auth`, over TLS
/// with the development certificates of [`crate::tls_dir`] (client
/// certificates optional) when `tls`, else plain HTTP; its base URL.
pub async fn dashboard_with(
    bus: &TestBus,
    tracker: &TestTracker,
    auth: std::sync::Arc<refbus_gateway::auth::Authenticator>,
    tls: bool,
) -> String {
    let queries = refbus_tracker::query::Queries {
        ledger: std::sync::Arc::new(TestTracker::ledger(&tracker.settings).await),
        directory: bus.shared.directory.clone(),
        clock: tracker.clock.clone(),
    };
    let listener = refbus_gateway::observe::bind_http("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = refbus_tracker::dashboard::router(queries, auth);
    let shutdown = bus.shared.shutdown.child_token();
    if tls {
        let dir = crate::tls_dir();
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let config = refbus_tracker::dashboard::tls_config(
            &read("server.pem"),
            &read("server.key"),
            Some(&read("ca.pem")),
        )
        .unwrap();
        tokio::spawn(refbus_tracker::dashboard::serve_tls(
            listener,
            router,
            std::sync::Arc::new(config),
            shutdown,
        ));
        format!("https://localhost:{port}")
    } else {
        tokio::spawn(refbus_gateway::observe::serve_http(
            listener, router, shutdown,
        ));
        format!("http://127.0.0.1:{port}")
    }
}
