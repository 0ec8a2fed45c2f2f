//! Building and running the tracker: consume the tap, record in batches
//! (ack only after the batch's transaction committed), run the deadline
//! engine, serve the queries. `main`, `refbus up` and the tests share it.
//!
//! Before it records, ingest refuses on its own what it must not believe:
//! bad signatures, malformed ids (dead-lettered as invalid), and replies
//! from an agency that is not a party to the referral (dead-lettered and
//! alerted like a forgery). The unit of all of this is the delivery: a
//! batch of hop reports is verified once and refused whole (a hop of it
//! malformed or unentitled taints what its signer claimed), and acked only
//! when every hop of it is recorded, in the same transaction. A batch the database refuses is split until
//! the culprit stands alone, which is dead-lettered with the database's
//! reason; a database that is down is waited for. Every second the tracker
//! publishes a signed recorded-through marker on the tap, so that the
//! deadline engine knows how far the ledger is recorded (see
//! [`crate::deadline`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::collections::{HashMap, HashSet, VecDeque};

use refbus_bus::{Bus, Incoming};
use refbus_core::policy::{PolicyCatalogue, PolicyError};
use refbus_core::signing::{Claim, KeyError, Proof, SigningKeys, TRACKER_ID, verify_many};
use refbus_gateway::Shared;
use refbus_gateway::app::{close_within, drain_within};
use refbus_gateway::auth::Authenticator;
use refbus_gateway::exposure::{Exposed, Listener};
use refbus_gateway::forgery::{Refusal, refuse};
use refbus_proto::v1::tracker_server::TrackerServer;
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

use refbus_gateway::observe::{self, Telemetry, default_http_addr};

use crate::clock::{Clock, millis};
use crate::dashboard;
use crate::deadline::{self, Wake};
use crate::ledger::{Backend, Ledger, LedgerError, Value, WriteTx, refuses_rows, sqlite_url};
use crate::query::Queries;
use crate::record::{Metrics, Observed, Prepared, Recorder, Right, Tally, not_a_party, rights_of};

/// The tracker's own settings (the bus's come from [`refbus_gateway::BusSettings`]).
#[derive(Clone, Debug, clap::Args)]
pub struct TrackerSettings {
    /// The ledger database: a `postgres://` URL (several trackers may share
    /// it), or unset for embedded SQLite under --data-dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Put the ledger's tables in this PostgreSQL schema.
    #[arg(long, env = "REFBUS_DATABASE_SCHEMA")]
    pub database_schema: Option<String>,
    /// Where the embedded SQLite ledger lives.
    #[arg(long, env = "REFBUS_DATA_DIR", default_value = "var")]
    pub data_dir: PathBuf,
    /// The policy catalogue directory.
    #[arg(long, env = "REFBUS_POLICY", default_value = "deploy/policy")]
    pub policy: PathBuf,
    /// Where the tracker serves its queries (default 127.0.0.1:50056;
    /// `refbus up` puts it after the agency services).
    #[arg(long = "tracker-listen", env = "REFBUS_TRACKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where to serve the dashboard, `/metrics` and `/healthz` over HTTP
    /// (default: the gRPC address's port + 1000, e.g. 51056).
    #[arg(long = "http-listen", env = "REFBUS_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Messages recorded per transaction, at most. Batches are whatever
    /// the tap holds when the writer is free, so they only grow this large
    /// under load, where a larger batch shares one commit among more
    /// messages (issue 17: 2,000 brought the lag after a saturation run
    /// back to zero about twice as fast as 500).
    #[arg(long, env = "REFBUS_TRACKER_BATCH", default_value_t = 2000)]
    pub batch: usize,
    /// How long a batch that is not full waits for more deliveries after
    /// its first, before it is recorded (`0ms`: record what the tap holds
    /// at once). Under a light load each message would otherwise be a
    /// transaction of its own; waiting shares one commit among the
    /// messages of the window (issue 17). Nobody waits on the ledger: a
    /// Submit's receipt and the desk's Inbox do not pass through it.
    #[arg(long = "batch-linger", env = "REFBUS_TRACKER_LINGER", default_value = DEFAULT_LINGER, value_parser = refbus_gateway::settings::parse_duration)]
    pub linger: Duration,
}

impl TrackerSettings {
    /// The database URL to use.
    ///
    /// # Errors
    /// When the data directory cannot be created.
    pub fn database(&self) -> Result<String, LedgerError> {
        match &self.database_url {
            Some(url) if !url.is_empty() => Ok(url.clone()),
            _ => sqlite_url(&self.data_dir),
        }
    }
}

/// [`TrackerSettings::linger`] unless told otherwise.
pub const DEFAULT_LINGER: &str = "20ms";

/// Where the tracker listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50056);

/// Why the tracker could not start.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("REFBUS_SIGNING_KEYS: {0}")]
    Signing(#[from] KeyError),
    #[error(transparent)]
    Exposed(#[from] Exposed),
    #[error("the dashboard's TLS: {0}")]
    DashboardTls(#[from] dashboard::TlsError),
}

/// The tracker, built and ready to run.
pub struct Tracker {
    listener: TcpListener,
    http: TcpListener,
    telemetry: Arc<Telemetry>,
    pub ledger: Arc<Ledger>,
    pub metrics: Arc<Metrics>,
    recorder: Arc<Recorder>,
    bus: Bus,
    clock: Clock,
    prefetch: u16,
    batch: usize,
    linger: Duration,
    wake: Arc<Wake>,
    shutdown: CancellationToken,
    queries: Queries,
    auth: Arc<Authenticator>,
    /// The dashboard's TLS, when the gRPC servers serve TLS (the same
    /// certificate; client certificates asked for under mutual TLS).
    dashboard_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    signing: Arc<SigningKeys>,
    /// This process's instance nonce: its recorded-through markers and its
    /// row in `tracker_watermarks`.
    instance: String,
    /// How long a gateway may take to have a message it stamped on the
    /// queue (its confirm timeout): a marker stamped C covers what was
    /// stamped before C minus this.
    margin: Duration,
}

impl Tracker {
    /// Loads the policy catalogue, opens the ledger and binds the listener.
    ///
    /// # Errors
    /// A [`TrackerError`] naming the file and line, the database, or the port.
    pub async fn build(
        settings: &TrackerSettings,
        shared: &Shared,
        clock: Clock,
    ) -> Result<Self, TrackerError> {
        shared.signing.require(TRACKER_ID, &shared.directory)?;
        let grpc = settings.listen.unwrap_or(DEFAULT_LISTEN);
        shared.refuse_exposure(Listener::Grpc, grpc)?;
        shared.refuse_exposure(Listener::Http, settings.http_listen.unwrap_or(grpc))?;
        let policy = Arc::new(PolicyCatalogue::load(&settings.policy, &shared.directory)?);
        let ledger = Arc::new(
            Ledger::connect(&settings.database()?, settings.database_schema.as_deref()).await?,
        );
        let addr = settings.listen.unwrap_or(DEFAULT_LISTEN);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TrackerError::Bind { addr, source })?;
        // From the address asked for, not the one bound: a gRPC port of 0
        // gives any free HTTP port, never the bound port + 1000, which may
        // be another process's.
        let http_addr = settings
            .http_listen
            .unwrap_or_else(|| default_http_addr(addr));
        let http = TcpListener::bind(http_addr)
            .await
            .map_err(|source| TrackerError::Bind {
                addr: http_addr,
                source,
            })?;
        let metrics = Arc::new(Metrics::default());
        shared
            .telemetry
            .register(|registry| metrics.register(registry));
        let queries = Queries {
            ledger: ledger.clone(),
            directory: shared.directory.clone(),
            clock: clock.clone(),
        };
        Ok(Self {
            listener,
            http,
            telemetry: shared.telemetry.clone(),
            ledger,
            metrics,
            recorder: Arc::new(Recorder {
                directory: shared.directory.clone(),
                policy,
            }),
            bus: shared.bus.clone(),
            clock,
            // Room for a batch's worth of deliveries. Under load most are
            // envelope batches (issue 17) carrying many envelopes each, which
            // fill the batches being written, prepared and gathered; and the
            // prefetch counts AMQP messages, so what it lets the broker push
            // is this many times a batch message's size: four batches' worth
            // of single deliveries, as before, would be 8,000 batch messages,
            // hundreds of MiB when a backlog is replayed.
            prefetch: shared
                .settings
                .prefetch
                .max(u16::try_from(settings.batch).unwrap_or(u16::MAX)),
            batch: settings.batch.max(1),
            linger: settings.linger,
            wake: Arc::new(Wake::default()),
            shutdown: shared.shutdown.clone(),
            queries,
            auth: shared.auth.clone(),
            dashboard_tls: match shared.auth.tls_pem() {
                Some(pem) => Some(Arc::new(dashboard::tls_config(
                    &pem.cert,
                    &pem.key,
                    pem.client_ca.as_deref(),
                )?)),
                None => None,
            },
            signing: shared.signing.clone(),
            instance: uuid::Uuid::now_v7().to_string(),
            margin: shared.settings.confirm_timeout,
        })
    }

    /// The address the queries are served on.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address the dashboard and `/metrics` are served on.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// Records, scans and serves until shutdown.
    ///
    /// # Errors
    /// A transport error from the gRPC server.
    pub async fn run(self) -> Result<(), tonic::transport::Error> {
        let server = refbus_gateway::server::grpc_server(&self.auth)?;
        let ingest = tokio::spawn(
            Ingest {
                ledger: self.ledger.clone(),
                recorder: self.recorder.clone(),
                metrics: self.metrics.clone(),
                bus: self.bus.clone(),
                prefetch: self.prefetch,
                batch_max: self.batch,
                linger: self.linger,
                signing: self.signing.clone(),
                clock: self.clock.clone(),
                wake: self.wake.clone(),
                instance: self.instance.clone(),
                margin_ms: i64::try_from(self.margin.as_millis()).unwrap_or(i64::MAX),
                shutdown: self.shutdown.clone(),
            }
            .run(),
        );
        let markers = tokio::spawn(deadline::publish_markers(
            self.bus.clone(),
            self.signing.clone(),
            self.clock.clone(),
            self.instance.clone(),
            self.shutdown.clone(),
        ));
        let engine = tokio::spawn(deadline::run(
            self.ledger.clone(),
            self.bus.clone(),
            self.signing.clone(),
            self.clock.clone(),
            self.metrics.clone(),
            self.wake.clone(),
            self.instance.clone(),
            self.shutdown.clone(),
        ));
        let http = observe::metrics_router(self.telemetry.clone(), self.bus.clone())
            .merge(dashboard::router(self.queries.clone(), self.auth.clone()));
        // Served like the gRPC port: over TLS when that is (the session
        // cookie is Secure; under mutual TLS a client certificate signs in).
        match self.dashboard_tls.clone() {
            Some(tls) => tokio::spawn(dashboard::serve_tls(
                self.http,
                http,
                tls,
                self.shutdown.clone(),
            )),
            None => tokio::spawn(observe::serve_http(self.http, http, self.shutdown.clone())),
        };
        let health = observe::health_service(
            self.bus.clone(),
            vec![<TrackerServer<Queries> as tonic::server::NamedService>::NAME],
            self.shutdown.clone(),
        )
        .await;
        let serving = server
            .add_service(health)
            .add_service(self.auth.intercept(TrackerServer::new(self.queries)))
            .serve_with_incoming_shutdown(
                refbus_gateway::server::incoming(self.listener, &self.auth),
                self.shutdown.clone().cancelled_owned(),
            );
        let served =
            drain_within("the tracker's gRPC server", &self.shutdown, serving, Ok(())).await;
        let _ = ingest.await;
        let _ = engine.await;
        let _ = markers.await;
        if let Err(e) = deadline::retire(&self.ledger, &self.instance).await {
            tracing::debug!(error = %e, "could not remove this instance's watermark; it goes stale");
        }
        close_within("the ledger", self.ledger.close()).await;
        tracing::info!("tracker stopped");
        served
    }
}

/// Consumes the tap and records in batches; acks a batch only after its
/// transaction committed, retrying the same batch while the database is
/// away (the prefetch bounds what is held meanwhile). Gathering, decoding,
/// verifying and preparing the next batch's rows runs in a task of its own,
/// while this one writes. On PostgreSQL two batches are written at once:
/// the next batch's referrals, hops and obligations are inserted while the
/// one before it meets obligations, chains its events and commits (see
/// [`Recorder::write_rows`]); batches still commit, and are acked, in order.
#[derive(Clone)]
struct Ingest {
    ledger: Arc<Ledger>,
    recorder: Arc<Recorder>,
    metrics: Arc<Metrics>,
    bus: Bus,
    signing: Arc<SigningKeys>,
    prefetch: u16,
    batch_max: usize,
    /// [`TrackerSettings::linger`].
    linger: Duration,
    clock: Clock,
    wake: Arc<Wake>,
    instance: String,
    /// [`Tracker::margin`] in ms.
    margin_ms: i64,
    shutdown: CancellationToken,
}

/// A batch off the tap: the deliveries, what they decoded to, their rows,
/// and when each message was put on the bus (for the lag).
struct Batch {
    incomings: Vec<Incoming>,
    observed: Vec<Observed>,
    /// The referrals whose reply rights the batch's replies were checked
    /// against when it was gathered ([`Recorder::prepare`]).
    rights_checked: HashSet<String>,
    prepared: Prepared,
    on_bus: Vec<i64>,
    /// What this instance has recorded through once the batch commits: its
    /// latest marker's time less the margin (epoch ms).
    through: Option<i64>,
}

impl Batch {
    fn new(
        recorder: &Recorder,
        entitled: Entitled,
        now: chrono::DateTime<chrono::Utc>,
        margin_ms: i64,
    ) -> Self {
        let Entitled {
            incomings,
            observed,
            rights_checked,
        } = entitled;
        let refs: Vec<&Observed> = observed.iter().collect();
        let prepared = recorder.prepare(&refs, now, &rights_checked);
        let on_bus = observed.iter().flat_map(Observed::on_bus_millis).collect();
        let through = observed
            .iter()
            .filter_map(Observed::marker_at)
            .max()
            .map(|at| at.saturating_sub(margin_ms));
        Self {
            incomings,
            observed,
            rights_checked,
            prepared,
            on_bus,
            through,
        }
    }

    /// Splits the batch in two halves, in order, their rows prepared anew.
    fn split(
        self,
        recorder: &Recorder,
        now: chrono::DateTime<chrono::Utc>,
        margin_ms: i64,
    ) -> (Self, Self) {
        let Batch {
            mut incomings,
            mut observed,
            rights_checked,
            ..
        } = self;
        let half = incomings.len() / 2;
        let later = Entitled {
            incomings: incomings.split_off(half),
            observed: observed.split_off(half),
            rights_checked: rights_checked.clone(),
        };
        let earlier = Entitled {
            incomings,
            observed,
            rights_checked,
        };
        (
            Batch::new(recorder, earlier, now, margin_ms),
            Batch::new(recorder, later, now, margin_ms),
        )
    }
}

/// What the gatherer passes on of a batch: the deliveries it keeps, what
/// they decoded to, and the referrals whose reply rights their replies
/// were checked against (found, and every reply to them had its right).
struct Entitled {
    incomings: Vec<Incoming>,
    observed: Vec<Observed>,
    rights_checked: HashSet<String>,
}

/// A batch whose rows are inserted in a transaction that is still open,
/// waiting for the batch before it to commit.
struct Staged {
    tx: WriteTx,
    batch: Batch,
    new: Vec<bool>,
    tally: Tally,
}

/// What the writer got while the batch before was finishing.
enum Next {
    /// Shutdown, or the gatherer stopped.
    Stop,
    /// Nothing: the batch before failed, to be recorded again at once.
    Interrupted,
    /// The next batch, its rows inserted in its open transaction.
    Staged(Staged),
    /// The next batch, to record whole in one transaction (SQLite, or its
    /// rows could not be inserted).
    Whole(Batch),
}

impl Ingest {
    async fn run(self) {
        // One batch prepared while one (on PostgreSQL two) is written.
        let (prepared_tx, mut prepared_rx) = tokio::sync::mpsc::channel(1);
        let gatherer = tokio::spawn(self.clone().gather(prepared_tx));
        let overlap = self.ledger.backend == Backend::Postgres;
        let mut staged: Option<Staged> = None;
        loop {
            // A failed batch is recorded again at once, not when the next
            // batch comes.
            let failed = tokio::sync::Notify::new();
            let finishing = async {
                let finished = match staged.take() {
                    Some(staged) => self.finish(staged).await,
                    None => Ok(()),
                };
                if finished.is_err() {
                    failed.notify_one();
                }
                finished
            };
            let receiving = async {
                let batch = tokio::select! {
                    () = self.shutdown.cancelled() => return Next::Stop,
                    () = failed.notified() => return Next::Interrupted,
                    next = prepared_rx.recv() => match next {
                        Some(batch) => batch,
                        None => return Next::Stop,
                    },
                };
                if !overlap {
                    // SQLite has one writer: no second transaction can
                    // overlap the first, and the batch is recorded whole.
                    return Next::Whole(batch);
                }
                match self.stage(batch).await {
                    Ok(staged) => Next::Staged(staged),
                    Err(batch) => Next::Whole(batch),
                }
            };
            let (finished, next) = tokio::join!(finishing, receiving);
            // Batches to record whole, one transaction each, in order: a
            // batch whose transaction failed, and any after it.
            let mut whole = Vec::with_capacity(2);
            if let Err(failed) = finished {
                whole.push(failed);
            }
            match next {
                // Shutdown: what is not acked is delivered again.
                Next::Stop if whole.is_empty() => break,
                Next::Stop | Next::Interrupted => {}
                Next::Staged(next) if whole.is_empty() => staged = Some(next),
                Next::Staged(next) => {
                    // The batch before failed; this one must commit after
                    // it, and its rows must not stand in its way meanwhile.
                    let Staged { tx, batch, .. } = next;
                    let _ = tx.rollback().await;
                    whole.push(batch);
                }
                Next::Whole(batch) => whole.push(batch),
            }
            for batch in whole {
                if !self.record_until_done(batch).await {
                    break;
                }
            }
        }
        // A gatherer waiting to hand on a batch stops when the channel goes.
        drop(prepared_rx);
        let _ = gatherer.await;
    }

    /// Begins a batch's transaction and inserts its rows.
    async fn stage(&self, batch: Batch) -> Result<Staged, Batch> {
        let started = async {
            let mut tx = self.ledger.begin_write().await?;
            let mut tally = Tally::default();
            let new = self
                .recorder
                .write_rows(&mut tx, &batch.prepared, &mut tally)
                .await?;
            Ok::<_, LedgerError>((tx, new, tally))
        }
        .await;
        match started {
            Ok((tx, new, tally)) => Ok(Staged {
                tx,
                batch,
                new,
                tally,
            }),
            Err(e) => {
                tracing::warn!(error = %e, messages = batch.prepared.len(), "cannot record; retrying the batch");
                Err(batch)
            }
        }
    }

    /// Chains a staged batch's events, commits and acks it; hands the batch
    /// back when that fails.
    async fn finish(&self, staged: Staged) -> Result<(), Batch> {
        let Staged {
            mut tx,
            batch,
            new,
            tally,
        } = staged;
        let committed = async {
            let _turn = self.ledger.write_turn().await;
            let mut head = tx.lock_head().await?;
            self.recorder
                .write_chain(&mut tx, &mut head, &batch.prepared, &new, self.clock.now())
                .await?;
            self.mark_through(&mut tx, batch.through).await?;
            tx.store_head(&head).await?;
            tx.commit().await?;
            Ok::<_, LedgerError>(())
        }
        .await;
        match committed {
            Ok(()) => {
                self.recorded(tally, batch).await;
                Ok(())
            }
            Err(LedgerError::Sql(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                // Another writer's row with the same key (a tracker of an
                // older build sharing the ledger): recorded again, the
                // message is seen as a duplicate. This build's inserts wait
                // for such a row and then skip it (`Recorder::write_rows`).
                tracing::debug!(error = %e, "a row of the batch collides with another writer's; recording the batch again");
                Err(batch)
            }
            Err(e) => {
                tracing::warn!(error = %e, messages = batch.prepared.len(), "cannot record; retrying the batch");
                Err(batch)
            }
        }
    }

    /// Counts and acks a committed batch, and wakes the deadline engine for
    /// an obligation due before its next wake-up.
    async fn recorded(&self, tally: Tally, batch: Batch) {
        self.metrics.add(tally);
        self.metrics.observe_lag(&batch.on_bus);
        #[allow(clippy::cast_precision_loss)]
        self.metrics
            .batch_deliveries
            .observe(batch.incomings.len() as f64);
        if let Some(due) = tally.earliest_due {
            self.wake.obligation_due(due);
        }
        if let Some(through) = batch.through {
            self.wake.recorded_through(through);
        }
        acknowledge(batch.incomings).await;
    }

    /// Stores, in a batch's transaction, how far this instance has recorded
    /// once it commits (never backwards), and that it was seen now.
    async fn mark_through(
        &self,
        tx: &mut WriteTx,
        through: Option<i64>,
    ) -> Result<(), sqlx::Error> {
        let Some(through) = through else {
            return Ok(());
        };
        tx.execute(
            "INSERT INTO tracker_watermarks (instance, recorded_through, seen_at) VALUES ($1, $2, $3)
             ON CONFLICT (instance) DO UPDATE SET
               recorded_through = CASE WHEN excluded.recorded_through > tracker_watermarks.recorded_through
                                       THEN excluded.recorded_through ELSE tracker_watermarks.recorded_through END,
               seen_at = excluded.seen_at",
            &[
                Value::Text(self.instance.clone()),
                Value::Int(through),
                Value::Int(millis(self.clock.now())),
            ],
        )
        .await
    }

    /// Records a batch in transactions of its own until all of it is
    /// recorded or dead-lettered; false on shutdown. While the database is
    /// away (connection refused or closed, pool timeout: anything but a
    /// refusal of the rows, see [`refuses_rows`]) the same rows are retried
    /// with backoff and nothing is dead-lettered. When the database refuses
    /// the rows, the batch is split in halves, recursively, until the
    /// culprit stands alone; it is dead-lettered with the database's
    /// reason, and the rest is recorded and acked, in order, unless the
    /// ledger was migrated past this build ([`Self::ledger_is_newer`]).
    async fn record_until_done(&self, batch: Batch) -> bool {
        let mut parts = VecDeque::from([batch]);
        let mut split_started: Option<std::time::Instant> = None;
        while let Some(part) = parts.pop_front() {
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.record_batch(&part).await {
                    Ok(tally) => {
                        self.recorded(tally, part).await;
                        break;
                    }
                    Err(LedgerError::Sql(e))
                        if refuses_rows(&e) && !self.ledger_is_newer(&e).await =>
                    {
                        split_started.get_or_insert_with(std::time::Instant::now);
                        if part.incomings.len() <= 1 {
                            self.unstorable(part, &e).await;
                        } else {
                            tracing::info!(messages = part.incomings.len(), error = %e, "the ledger refuses a batch; splitting it to find the message it cannot store");
                            let (first, second) =
                                part.split(&self.recorder, self.clock.now(), self.margin_ms);
                            parts.push_front(second);
                            parts.push_front(first);
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, messages = part.prepared.len(), "cannot record; retrying the batch");
                        tokio::select! {
                            () = self.shutdown.cancelled() => return false,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        if let Some(started) = split_started {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis(),
                "isolated what the ledger cannot store; recording goes on"
            );
        }
        true
    }

    /// Whether the ledger refused a write because a newer tracker has
    /// migrated it past this build (a rolling upgrade of trackers sharing
    /// a PostgreSQL ledger): then no message is at fault, nothing is
    /// dead-lettered, and the batch waits, unacked, retried with backoff,
    /// until this instance is upgraded (its deliveries then go to another).
    /// A ledger that cannot be asked counts as not newer.
    async fn ledger_is_newer(&self, refusal: &sqlx::Error) -> bool {
        match self.ledger.migrated_past_this_build().await {
            Ok(Some(latest)) => {
                tracing::error!(
                    latest,
                    error = %refusal,
                    "the ledger was migrated past this tracker's code (migration {latest}): not recording, nothing dead-lettered; upgrade this tracker"
                );
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the ledger's migrations");
                false
            }
        }
    }

    /// Dead-letters the one message the ledger refused, with the database's
    /// reason (its message and code: no values), and counts it. Logs its
    /// id (shortened) and kind only.
    async fn unstorable(&self, part: Batch, error: &sqlx::Error) {
        let Batch {
            incomings,
            observed,
            ..
        } = part;
        let reason = match error {
            sqlx::Error::Database(e) => format!(
                "the ledger cannot store it: {} (SQLSTATE or SQLite code {})",
                e.message(),
                e.code().as_deref().unwrap_or("none")
            ),
            other => format!("the ledger cannot store it: {other}"),
        };
        for (incoming, o) in incomings.into_iter().zip(observed) {
            self.metrics
                .unstorable
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id: String = o
                .message_id()
                .chars()
                .take(40)
                .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                .collect();
            tracing::error!(id = %id, id_bytes = o.message_id().len(), kind = %incoming.routing_key.rsplit('.').next().unwrap_or_default(), reason = %reason, "dead-lettered a message the ledger cannot store");
            self.bus
                .dead_letter(&self.bus.topology().tap_queue(), incoming, reason.clone())
                .await;
        }
    }

    /// Records a prepared batch in one transaction.
    async fn record_batch(&self, batch: &Batch) -> Result<Tally, LedgerError> {
        let _turn = self.ledger.write_turn().await;
        let mut tx = self.ledger.begin_write().await?;
        let mut head = tx.lock_head().await?;
        let mut tally = Tally::default();
        self.recorder
            .write(
                &mut tx,
                &mut head,
                &batch.prepared,
                self.clock.now(),
                &mut tally,
            )
            .await?;
        self.mark_through(&mut tx, batch.through).await?;
        tx.store_head(&head).await?;
        tx.commit().await?;
        Ok(tally)
    }

    /// Gathers up to `batch_max` deliveries from the tap (at least one, and
    /// as many more as come within `linger` of it), dead-letters what does
    /// not decode,
    /// what is not signed by whom it claims, what names malformed ids and
    /// replies from non-parties, and hands the batch on with its rows
    /// prepared.
    async fn gather(self, prepared: tokio::sync::mpsc::Sender<Batch>) {
        let queue = self.bus.topology().tap_queue();
        let mut subscription = self.bus.subscribe(queue.clone(), self.prefetch);
        let mut recent = RecentRights::default();
        loop {
            let first = tokio::select! {
                () = self.shutdown.cancelled() => return,
                next = subscription.next() => match next {
                    Some(incoming) => incoming,
                    None => return,
                },
            };
            let mut incomings = Vec::with_capacity(self.batch_max);
            let mut observed = Vec::with_capacity(self.batch_max);
            let lingers_until = tokio::time::Instant::now() + self.linger;
            let mut pending = Some(first);
            loop {
                let incoming = match pending.take().or_else(|| subscription.try_next()) {
                    Some(incoming) => incoming,
                    // Nothing waiting: a little longer for more, unless
                    // the window closed or the tracker is stopping.
                    None if !self.linger.is_zero() => tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep_until(lingers_until) => break,
                        next = subscription.next() => match next {
                            Some(incoming) => incoming,
                            None => break,
                        },
                    },
                    None => break,
                };
                match Observed::decode(&incoming.routing_key, &incoming.data) {
                    Ok(o) => {
                        incomings.push(incoming);
                        observed.push(o);
                    }
                    Err(reason) => {
                        self.metrics
                            .undecodable
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.bus.dead_letter(&queue, incoming, reason).await;
                    }
                }
                if incomings.len() >= self.batch_max {
                    break;
                }
            }
            let (incomings, observed) = believed(
                &self.bus,
                &self.signing,
                &self.recorder,
                &self.metrics,
                &queue,
                incomings,
                observed,
            )
            .await;
            let (incomings, observed) = self.valid(&queue, incomings, observed).await;
            let Some(entitled) = self
                .entitled(&queue, &mut recent, incomings, observed)
                .await
            else {
                return;
            };
            if entitled.incomings.is_empty() {
                continue;
            }
            let batch = Batch::new(&self.recorder, entitled, self.clock.now(), self.margin_ms);
            if prepared.send(batch).await.is_err() {
                return;
            }
        }
    }

    /// Dead-letters what names a malformed referral or agency id (an
    /// invalid message, not a forgery: no alert), with the reason; returns
    /// the rest.
    async fn valid(
        &self,
        queue: &str,
        incomings: Vec<Incoming>,
        observed: Vec<Observed>,
    ) -> (Vec<Incoming>, Vec<Observed>) {
        let mut kept = (
            Vec::with_capacity(incomings.len()),
            Vec::with_capacity(incomings.len()),
        );
        for (incoming, o) in incomings.into_iter().zip(observed) {
            match o.check_ids() {
                Ok(()) => {
                    kept.0.push(incoming);
                    kept.1.push(o);
                }
                Err(reason) => {
                    self.metrics
                        .invalid
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.bus.dead_letter(queue, incoming, reason).await;
                }
            }
        }
        kept
    }

    /// Refuses replies from agencies that are not a party to their
    /// referral (with the right the reply needs), as a forgery is refused:
    /// an alert to the supervising justice bureau, then the dead-letter
    /// queue. The rights come from the referral's addressees and route: as
    /// given earlier in this batch, in the last batches (which may not
    /// have committed yet), or in the ledger. A reply to a referral known
    /// to none of them passes (recorded before its referral; when that
    /// comes, the recorder refuses it in the ledger if it has no right).
    /// Returns the rest, with the referrals whose rights were found;
    /// `None` on shutdown.
    async fn entitled(
        &self,
        queue: &str,
        recent: &mut RecentRights,
        incomings: Vec<Incoming>,
        observed: Vec<Observed>,
    ) -> Option<Entitled> {
        let mut wanted: Vec<&str> = observed
            .iter()
            .flat_map(Observed::replies)
            .map(|r| r.referral)
            .filter(|r| !recent.knows(r))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let stored = self.stored_rights(&wanted).await?;
        let mut given = Rights::new();
        let mut kept = (
            Vec::with_capacity(incomings.len()),
            Vec::with_capacity(incomings.len()),
        );
        let mut rights_found = HashSet::new();
        let mut unchecked = HashSet::new();
        for (incoming, o) in incomings.into_iter().zip(observed) {
            // A batch of hops is refused whole when one of them is: its
            // signer claimed them all.
            // Each reply's referral, and whether its rights were found.
            let mut looked_up = Vec::new();
            let refusal = o.replies().find_map(|reply| {
                let rights = given
                    .get(reply.referral)
                    .or_else(|| recent.get(reply.referral))
                    .or_else(|| stored.get(reply.referral));
                looked_up.push((reply.referral, rights.is_some()));
                (!rights?.contains(&(reply.agency.to_owned(), reply.right)))
                    .then(|| not_a_party(reply.agency, reply.referral, reply.right))
            });
            if let Some(reason) = refusal {
                self.metrics
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let addressed_to = match &o {
                    Observed::Envelope(e)
                        if self.recorder.directory.get(&e.recipient).is_some() =>
                    {
                        e.recipient.clone()
                    }
                    _ => o.addressed_to(&incoming.routing_key).to_owned(),
                };
                let refusal = Refusal {
                    queue: queue.to_owned(),
                    detected_by: TRACKER_ID.to_owned(),
                    addressed_to,
                    claimed_id: o.message_id().to_owned(),
                    claimed_sender: o.claimed_sender().to_owned(),
                    reason,
                };
                refuse(
                    &self.bus,
                    &self.signing,
                    &self.recorder.directory,
                    incoming,
                    refusal,
                )
                .await;
                continue;
            }
            for (referral, found) in looked_up {
                if found {
                    rights_found.insert(referral.to_owned());
                } else {
                    unchecked.insert(referral.to_owned());
                }
            }
            if let Observed::Envelope(e) = &o {
                let rights: HashSet<(String, Right)> = rights_of(e)
                    .into_iter()
                    .map(|(a, r)| (a.to_owned(), r))
                    .collect();
                if !rights.is_empty() {
                    given.insert(e.id.clone(), rights);
                }
            }
            kept.0.push(incoming);
            kept.1.push(o);
        }
        recent.push(given);
        // A referral some reply of the batch was not checked against (it
        // came before the referral's rights did) is checked in the ledger.
        rights_found.retain(|referral| !unchecked.contains(referral));
        Some(Entitled {
            incomings: kept.0,
            observed: kept.1,
            rights_checked: rights_found,
        })
    }

    /// The reply rights the ledger holds for `referrals`, retried with
    /// backoff while the database is away (nothing can be recorded
    /// meanwhile anyway); `None` on shutdown.
    async fn stored_rights(&self, referrals: &[&str]) -> Option<Rights> {
        let mut rights = Rights::new();
        if referrals.is_empty() {
            return Some(rights);
        }
        let mut backoff = Duration::from_millis(100);
        let rows = loop {
            match self.ledger.reply_rights(referrals).await {
                Ok(rows) => break rows,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read reply rights; retrying");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return None,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        for (referral, agency, reply) in rows {
            let right = match reply.as_str() {
                "answer" => Right::Answer,
                "relay" => Right::Relay,
                _ => Right::Receive,
            };
            rights.entry(referral).or_default().insert((agency, right));
        }
        Some(rights)
    }
}

/// Reply rights by referral: (agency, right).
type Rights = HashMap<String, HashSet<(String, Right)>>;

/// The rights given by the referrals of the last batches gathered, which
/// may not have committed yet when the next batch is checked (at most
/// three batches are in flight: two being written, one prepared).
#[derive(Default)]
struct RecentRights {
    batches: VecDeque<Rights>,
}

impl RecentRights {
    const KEPT: usize = 8;

    fn get(&self, referral: &str) -> Option<&HashSet<(String, Right)>> {
        self.batches.iter().rev().find_map(|b| b.get(referral))
    }

    fn knows(&self, referral: &str) -> bool {
        self.get(referral).is_some()
    }

    fn push(&mut self, rights: Rights) {
        if rights.is_empty() {
            return;
        }
        self.batches.push_back(rights);
        while self.batches.len() > Self::KEPT {
            self.batches.pop_front();
        }
    }
}

/// Checks the batch's signatures (one batch verification) and refuses what
/// fails: a forgery alert, then the dead-letter queue. Returns the rest.
async fn believed(
    bus: &Bus,
    signing: &SigningKeys,
    recorder: &Recorder,
    metrics: &Metrics,
    queue: &str,
    incomings: Vec<Incoming>,
    observed: Vec<Observed>,
) -> (Vec<Incoming>, Vec<Observed>) {
    let proofs: Vec<Proof> = incomings.iter().map(Incoming::proof).collect();
    let claims: Vec<Claim<'_>> = observed
        .iter()
        .zip(&incomings)
        .zip(&proofs)
        .map(|((o, i), proof)| o.claim(&i.data, proof.as_seal()))
        .collect();
    let verdicts = verify_many(&recorder.directory, &claims);
    drop(claims);
    let mut kept = (
        Vec::with_capacity(incomings.len()),
        Vec::with_capacity(incomings.len()),
    );
    for ((incoming, o), verdict) in incomings.into_iter().zip(observed).zip(verdicts) {
        match verdict {
            Ok(()) => {
                kept.0.push(incoming);
                kept.1.push(o);
            }
            Err(reason) => {
                metrics
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let refusal = Refusal {
                    queue: queue.to_owned(),
                    detected_by: TRACKER_ID.to_owned(),
                    addressed_to: o.addressed_to(&incoming.routing_key).to_owned(),
                    claimed_id: o.message_id().to_owned(),
                    claimed_sender: o.claimed_sender().to_owned(),
                    reason: reason.to_string(),
                };
                refuse(bus, signing, &recorder.directory, incoming, refusal).await;
            }
        }
    }
    kept
}

/// Acknowledges a recorded batch. Envelopes of batch messages first, each
/// counted by its message's acker (the last acks the message); then the
/// messages that came alone: with one `multiple` ack when they all came on
/// one channel, else one by one. The multiple ack is safe because batches
/// commit in the order their deliveries came: everything outstanding on the
/// channel below the last tag is in this batch or an earlier one, settled
/// already or (an envelope of a batch message) just above, so it never
/// acks an envelope that is not recorded, and never a batch message whose
/// own ack is still to come.
async fn acknowledge(batch: Vec<Incoming>) {
    let one_channel = batch.windows(2).all(|w| w[0].channel == w[1].channel);
    let (parts, mut whole): (Vec<Incoming>, Vec<Incoming>) = batch
        .into_iter()
        .partition(|incoming| incoming.part.is_some());
    let mut result = Ok(());
    for incoming in parts {
        result = result.and(incoming.acker.ack().await);
    }
    match whole.pop() {
        Some(last) if one_channel => result = result.and(last.acker.ack_through().await),
        last => {
            for incoming in whole.into_iter().chain(last) {
                result = result.and(incoming.acker.ack().await);
            }
        }
    }
    if let Err(e) = result {
        // Recorded already: a redelivery is recognised and ignored.
        tracing::debug!(error = %e, "ack after recording failed");
    }
}
