//! Building and running agency services: `Shared` connects what a process's
//! services share (directory, bus); `Application::build` binds a listener
//! (port 0 in tests; read back the real port); `run` serves until shutdown.
//! `main`, `refbus up` and the tests all go through here.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use refbus_bus::{Bus, BusConfig, BusError, Topology};
use refbus_core::policy::{PolicyCatalogue, PolicyError};
use refbus_core::signing::{KeyError, SigningKeys};
use refbus_core::{Directory, DirectoryError};
use refbus_proto::v1::{
    bar_association_server::BarAssociationServer, case_unit_server::CaseUnitServer,
    detention_centre_server::DetentionCentreServer, gateway_server::GatewayServer,
    justice_bureau_server::JusticeBureauServer, legal_aid_server::LegalAidServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

use crate::acknowledged::{Acknowledged, AcknowledgedError};
use crate::agencies::AgencyRpcs;
use crate::auth::{AuthError, Authenticator};
use crate::exposure::{self, Exposed, Listener};
use crate::gateway::GatewayService;
use crate::hops::HopBatcher;
use crate::inbox::Sessions;
use crate::observe::{self, GatewayMetrics, Telemetry};
use crate::registry::LawyerRegister;
use crate::server;
use crate::{AgencyService, BusSettings, GatewayCore};

/// Largest gRPC message accepted: room for a 1 MiB envelope to be refused
/// with a clear INVALID_ARGUMENT rather than a transport error.
pub(crate) const MAX_GRPC_MESSAGE: usize = 4 * 1024 * 1024;

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--agencies: {0}")]
    Agencies(String),
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Acknowledged(#[from] AcknowledgedError),
    #[error("REFBUS_SIGNING_KEYS: {0}")]
    Signing(#[from] KeyError),
    #[error(transparent)]
    Exposed(#[from] Exposed),
    #[error("REFBUS_AMQP_CA ({path}): {reason}")]
    AmqpCa { path: String, reason: String },
    #[error("REFBUS_POLICY: {0}")]
    Policy(#[from] PolicyError),
    #[error("REFBUS_LAWYER_SERVICE: {0}")]
    LawyerService(String),
    #[error(transparent)]
    Lawyers(#[from] crate::lawyers::OpenError),
}

/// What the agency services of one process share.
#[derive(Clone)]
pub struct Shared {
    pub directory: Arc<Directory>,
    pub bus: Bus,
    pub settings: BusSettings,
    /// Authenticates every call to the services of this process.
    pub auth: Arc<Authenticator>,
    /// What this process signs with.
    pub signing: Arc<SigningKeys>,
    /// What each agency's system acknowledged: opened by the first agency
    /// service built (the tracker, sharing this, never opens it).
    pub acknowledged: Arc<tokio::sync::OnceCell<Arc<Acknowledged>>>,
    /// The policy catalogue (`settings.policy`): loaded and validated by
    /// the first agency service built (the tracker loads its own).
    pub policy: Arc<tokio::sync::OnceCell<Arc<PolicyCatalogue>>>,
    /// The process's Prometheus registry (bus, agency services, tracker).
    pub telemetry: Arc<Telemetry>,
    /// What the agency services of this process count.
    pub metrics: GatewayMetrics,
    /// Batches the hops the agency services of this process report.
    pub hops: HopBatcher,
    /// Cancelled to shut everything down.
    pub shutdown: CancellationToken,
}

impl Shared {
    /// Loads and validates the directory, connects to the broker and
    /// declares the topology.
    ///
    /// # Errors
    /// A [`StartError`] naming the file and entry, or the broker URL.
    pub async fn connect(
        settings: BusSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let directory = Arc::new(Directory::load(&settings.directory)?);
        let auth = Arc::new(Authenticator::load(&settings.auth, directory.clone())?);
        let signing = Arc::new(SigningKeys::load(&settings.signing_keys, &directory)?);
        let acknowledged = Arc::new(tokio::sync::OnceCell::new());
        let mut topology = Topology::new(
            settings.namespace.clone(),
            directory.agencies().iter().map(|a| a.id.clone()).collect(),
        );
        topology.queue_expires = settings.queue_expires;
        let mut config = BusConfig::new(settings.amqp_url.clone(), topology);
        config.confirm_timeout = settings.confirm_timeout;
        config.declare_topology = settings.declare_topology;
        config.tls_ca = amqp_ca(&settings)?;
        let bus = Bus::connect(config, shutdown.clone()).await?;
        // refbus_bus_dead_letter_depth on /metrics (issue 16).
        bus.watch_dead_letter_depth(std::time::Duration::from_secs(10));
        let telemetry = Arc::new(Telemetry::default());
        let metrics = GatewayMetrics::default();
        telemetry.register(|registry| {
            bus.metrics().register(registry);
            metrics.register(registry);
        });
        let hops = HopBatcher::start(
            bus.clone(),
            signing.clone(),
            &settings.hop_batch,
            shutdown.clone(),
        );
        Ok(Self {
            directory,
            bus,
            settings,
            auth,
            signing,
            hops,
            acknowledged,
            policy: Arc::new(tokio::sync::OnceCell::new()),
            telemetry,
            metrics,
            shutdown,
        })
    }
}

impl Shared {
    /// Checks that `listener` may serve on `addr` with this process's
    /// credentials (development ones only on loopback, or in a deployment
    /// declared a development one). Every service and the tracker call it
    /// before binding.
    ///
    /// # Errors
    /// [`Exposed`], naming each development credential and its setting.
    pub fn refuse_exposure(&self, listener: Listener, addr: SocketAddr) -> Result<(), Exposed> {
        exposure::check(&self.settings, &self.auth, listener, addr)
    }
}

/// The private CA of `REFBUS_AMQP_CA` (PEM), for an `amqps://` broker.
fn amqp_ca(settings: &BusSettings) -> Result<Option<String>, StartError> {
    let Some(path) = &settings.amqp_ca else {
        return Ok(None);
    };
    let fail = |reason: String| StartError::AmqpCa {
        path: path.display().to_string(),
        reason,
    };
    if !settings.amqp_url.starts_with("amqps://") {
        return Err(fail(
            "set, but AMQP_URL is not an amqps:// URL: the connection to the broker would not use TLS"
                .into(),
        ));
    }
    let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(fail("no PEM certificate in the file".into()));
    }
    Ok(Some(pem))
}

/// One agency service, bound and ready to serve.
pub struct Application {
    service: AgencyService,
    listener: TcpListener,
    /// Where `/metrics` and `/healthz` are served, if anywhere.
    http: Option<TcpListener>,
    telemetry: Arc<Telemetry>,
    core: Arc<GatewayCore>,
    auth: Arc<Authenticator>,
    /// The process's settings, for the HTTP listener's exposure check.
    settings: BusSettings,
    /// The lawyer service's register and inboxes (for [`AgencyService::Lawyer`] only).
    lawyers: Option<Arc<crate::lawyers::LawyerCore>>,
}

impl Application {
    /// Binds `listen` for `service`, acting for every agency of its kinds in
    /// the directory, or only for `only` when it is not empty.
    ///
    /// # Errors
    /// [`StartError::Agencies`] when `only` names an agency that is not of
    /// this service's kinds; [`StartError::Bind`].
    pub async fn build(
        service: AgencyService,
        shared: &Shared,
        listen: SocketAddr,
        only: &[String],
    ) -> Result<Self, StartError> {
        let mut served: BTreeSet<String> = shared
            .directory
            .agencies()
            .iter()
            .filter(|a| service.kinds().contains(&a.kind))
            .map(|a| a.id.clone())
            .collect();
        if !only.is_empty() {
            for id in only {
                if !served.contains(id) {
                    return Err(StartError::Agencies(format!(
                        "`{id}` is not a {} agency in the directory",
                        service.name()
                    )));
                }
            }
            served.retain(|id| only.contains(id));
        }
        for agency in &served {
            shared.signing.require(agency, &shared.directory)?;
        }
        let policy = shared
            .policy
            .get_or_try_init(|| async {
                PolicyCatalogue::load(&shared.settings.policy, &shared.directory).map(Arc::new)
            })
            .await?
            .clone();
        let lawyers = LawyerRegister::connect(&shared.settings.lawyer_service, &shared.directory)
            .map_err(StartError::LawyerService)?;
        shared.refuse_exposure(Listener::Grpc, listen)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?;
        let core = Arc::new(GatewayCore {
            service,
            directory: shared.directory.clone(),
            bus: shared.bus.clone(),
            served,
            signing: shared.signing.clone(),
            metrics: shared.metrics.for_service(service.name()),
            prefetch: shared.settings.prefetch,
            sessions: Arc::new(Sessions::default()),
            acknowledged: shared
                .acknowledged
                .get_or_try_init(|| async {
                    Acknowledged::open(&shared.settings.inbox_db)
                        .await
                        .map(Arc::new)
                })
                .await?
                .clone(),
            policy,
            lawyers,
            hops: shared.hops.clone(),
            shutdown: shared.shutdown.clone(),
        });
        let lawyers = if service == AgencyService::Lawyer {
            Some(crate::lawyers::LawyerCore::open(core.clone(), &shared.settings.inbox_db).await?)
        } else {
            None
        };
        Ok(Self {
            service,
            listener,
            http: None,
            telemetry: shared.telemetry.clone(),
            core,
            auth: shared.auth.clone(),
            settings: shared.settings.clone(),
            lawyers,
        })
    }

    /// Also serves the process's `/metrics` and `/healthz` on `addr`.
    ///
    /// # Errors
    /// [`StartError::Bind`].
    pub async fn serve_http_on(&mut self, addr: SocketAddr) -> Result<SocketAddr, StartError> {
        exposure::check(&self.settings, &self.auth, Listener::Http, addr)?;
        let listener = observe::bind_http(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        self.http = Some(listener);
        Ok(bound)
    }

    /// The address actually bound.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    #[must_use]
    pub fn service(&self) -> AgencyService {
        self.service
    }

    #[must_use]
    pub fn core(&self) -> &Arc<GatewayCore> {
        &self.core
    }

    /// Serves until the shutdown token is cancelled; open `Inbox` streams end
    /// and their unacknowledged deliveries return to the queue.
    ///
    /// # Errors
    /// A transport error from the gRPC server.
    pub async fn run(self) -> Result<(), tonic::transport::Error> {
        let gateway = GatewayServer::new(GatewayService(self.core.clone()))
            .max_decoding_message_size(MAX_GRPC_MESSAGE);
        let rpcs = AgencyRpcs(self.core.clone());
        let shutdown = self.core.shutdown.clone();
        if let Some(http) = self.http {
            let router = observe::metrics_router(self.telemetry.clone(), self.core.bus.clone());
            tokio::spawn(observe::serve_http(http, router, shutdown.clone()));
        }
        // Health and reflection answer without credentials (probes carry
        // none); every refbus service authenticates each call.
        let auth = &self.auth;
        let router = server::grpc_server_for(auth, self.lawyers.is_some())?;
        if let Some(lawyers) = self.lawyers {
            // The lawyer service authenticates lawyers itself (against its
            // register), serves no agency Gateway and consumes its inbox.
            tokio::spawn(lawyers.clone().consume());
            let served = crate::lawyers::service::routes(router, &lawyers)
                .await
                .serve_with_incoming_shutdown(
                    server::incoming(self.listener, auth),
                    shutdown.cancelled_owned(),
                )
                .await;
            lawyers.store.close().await;
            return served;
        }
        // The agency-specific service, authenticated, and its gRPC name.
        macro_rules! agency_rpcs {
            ($server:ident) => {
                (
                    router.add_service(auth.intercept($server::new(rpcs))),
                    <$server<AgencyRpcs> as NamedService>::NAME,
                )
            };
        }
        let (router, agency_service) = match self.service {
            AgencyService::DetentionCentre => agency_rpcs!(DetentionCentreServer),
            AgencyService::CaseUnit => agency_rpcs!(CaseUnitServer),
            AgencyService::LegalAid => agency_rpcs!(LegalAidServer),
            AgencyService::JusticeBureau => agency_rpcs!(JusticeBureauServer),
            AgencyService::BarAssociation => agency_rpcs!(BarAssociationServer),
            AgencyService::Lawyer => {
                // Built with its lawyers' store (above); never reached.
                tracing::error!("the lawyer service has no lawyers' store; not serving");
                return Ok(());
            }
        };
        let health = observe::health_service(
            self.core.bus.clone(),
            vec![
                <GatewayServer<GatewayService> as NamedService>::NAME,
                agency_service,
            ],
            shutdown.clone(),
        )
        .await;
        let router = router
            .add_service(health)
            .add_service(auth.intercept(gateway));
        router
            .serve_with_incoming_shutdown(
                server::incoming(self.listener, auth),
                shutdown.cancelled_owned(),
            )
            .await
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second signal exits
/// the process at once.
pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("signal received; shutting down (a second signal exits at once)");
    shutdown.cancel();
    wait_for_signal().await;
    tracing::warn!("second signal; exiting now");
    std::process::exit(130);
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How long servers get to finish after shutdown before we stop waiting,
/// and how long each store gets to close after that.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Awaits `serving` (servers draining after `shutdown`), but for at most
/// [`SHUTDOWN_GRACE`] once `shutdown` is cancelled: a client that never
/// lets go (a health `Watch`, an `Inbox` stream it never reads) must not
/// keep the process from stopping. What is not acked is delivered again.
pub async fn drain_within<T>(
    what: &str,
    shutdown: &CancellationToken,
    serving: impl std::future::Future<Output = T>,
    held: T,
) -> T {
    tokio::select! {
        done = serving => done,
        () = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("{what} did not stop within {SHUTDOWN_GRACE:?} (clients still connected); closing anyway");
            held
        }
    }
}

/// Awaits `closing` (a store's or a connection's close) for at most
/// [`SHUTDOWN_GRACE`]: a pool waits for every connection lent out, and a
/// task still holding one must not keep the process from stopping. What
/// was committed is on disk either way.
pub async fn close_within(what: &str, closing: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(SHUTDOWN_GRACE, closing).await.is_err() {
        tracing::warn!("{what} did not close within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
}

/// Runs built applications until shutdown, then closes the bus. Returns
/// the first server error, if any.
///
/// # Errors
/// A transport error from one of the servers.
pub async fn serve_all(
    apps: Vec<Application>,
    shared: &Shared,
) -> Result<(), tonic::transport::Error> {
    let mut tasks = tokio::task::JoinSet::new();
    for app in apps {
        tasks.spawn(app.run());
    }
    let join = async {
        let mut result = Ok(());
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Err(e)) if result.is_ok() => {
                    result = Err(e);
                    shared.shutdown.cancel();
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "an agency service task failed"),
            }
        }
        result
    };
    let result = drain_within("the agency services", &shared.shutdown, join, Ok(())).await;
    // Servers still draining past the grace stop here, with whatever they
    // hold of the stores.
    tasks.abort_all();
    close_within("the broker connection", shared.bus.close()).await;
    if let Some(acknowledged) = shared.acknowledged.get() {
        close_within("the acknowledgement store", acknowledged.close()).await;
    }
    tracing::info!("agency services stopped");
    result
}
