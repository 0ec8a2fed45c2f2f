//! Lawyers for a test: the five agency services (a [`TestBus`]) and the
//! lawyer service run apart (so that a test can restart it), all with
//! bearer tokens on loopback; lawyers registered, suspended and reinstated
//! by publishing signed `LawyerRegistration` envelopes from a registrar
//! (development keys) onto the lawyer service's inbox queue, as the
//! registrar's service would; and clients with a lawyer's bearer token.
//! The agency services ask this world's lawyer service for lawyers (their
//! register client is set to its address, which a restart keeps).

use std::net::SocketAddr;

use lapin::options::BasicPublishOptions;
use prost::Message;
use refbus_core::envelope::{envelope_id, timestamp};
use refbus_core::signing::Signed;
use refbus_gateway::auth::AuthSettings;
use refbus_gateway::{AgencyService, BusSettings};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::lawyer_registry_client::LawyerRegistryClient;
use refbus_proto::v1::lawyer_service_client::LawyerServiceClient;
use refbus_proto::v1::{
    Envelope, GetLawyerRequest, Lawyer, LawyerAcknowledgeRequest, LawyerDelivery,
    LawyerInboxRequest, LawyerRegistration, LawyerStatus, MessageKind,
};
use tonic::transport::Channel;

use crate::tracker::eventually;
use crate::{
    Amqp, ServiceInstance, TestBus, amqp_url, repo_root, signed_properties, test_settings, within,
};

/// The lawyer service's agency id.
pub const LAWYER_SERVICE: &str = "lawyer-service";

/// A lawyer registered in a test: what the registrar handed them.
pub struct RegisteredLawyer {
    pub licence: String,
    pub name: String,
    pub law_firm: String,
    pub region: String,
    /// The bearer token issued at registration.
    pub token: String,
    /// The secret half of the lawyer's letter key.
    pub identity: age::x25519::Identity,
}

impl RegisteredLawyer {
    /// The lawyer as messages name them.
    #[must_use]
    pub fn lawyer(&self) -> Lawyer {
        Lawyer {
            name: self.name.clone(),
            licence_number: self.licence.clone(),
            law_firm: self.law_firm.clone(),
        }
    }

    /// `message` carrying this lawyer's bearer token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        as_lawyer(&self.token, message)
    }
}

/// A request carrying a lawyer's bearer token.
pub fn as_lawyer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A fresh bearer token (tests only: not a production generator).
#[must_use]
pub fn new_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::now_v7().simple(),
        uuid::Uuid::now_v7().simple()
    )
}

/// Hex SHA-256 of a token, as a registration carries it.
#[must_use]
pub fn token_sha256(token: &str) -> String {
    refbus_gateway::lawyers::auth::token_sha256(token)
}

/// The agency services and the lawyer service of one test.
pub struct LawyerWorld {
    pub bus: TestBus,
    lawyer_service: Option<ServiceInstance>,
    pub settings: BusSettings,
    pub amqp: Amqp,
}

/// A plaintext channel to `addr` (bearer tokens, loopback).
pub async fn plain_channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

impl LawyerWorld {
    /// Starts the agency services and the lawyer service in a namespace of
    /// their own, with the development bearer tokens (`dev-<agency>`).
    pub async fn start() -> Self {
        let mut settings = test_settings(amqp_url());
        settings.auth = AuthSettings::bearer(repo_root().join("deploy/local/tokens.toml"));
        let agencies: Vec<AgencyService> = AgencyService::ALL
            .into_iter()
            .filter(|s| *s != AgencyService::Lawyer)
            .collect();
        // The lawyer service first, so that the agency services' register
        // client asks this lawyer service (it is connected lazily).
        let lawyer_service = ServiceInstance::start(settings.clone(), AgencyService::Lawyer).await;
        settings.lawyer_service.url = format!("http://{}", lawyer_service.addr);
        let bus = TestBus::spawn_services(settings.clone(), &agencies).await;
        Self {
            bus,
            lawyer_service: Some(lawyer_service),
            settings,
            amqp: Amqp::connect().await,
        }
    }

    /// Where the lawyer service listens.
    #[must_use]
    pub fn lawyer_addr(&self) -> SocketAddr {
        self.lawyer_service
            .as_ref()
            .expect("lawyer service running")
            .addr
    }

    /// What the lawyer service's process counts, in Prometheus text.
    #[must_use]
    pub fn lawyer_metrics(&self) -> String {
        self.lawyer_service
            .as_ref()
            .expect("lawyer service running")
            .telemetry
            .encode()
    }

    /// Stops the lawyer service (its queue keeps what comes meanwhile).
    pub async fn stop_lawyer_service(&mut self) {
        if let Some(running) = self.lawyer_service.take() {
            running.stop().await;
        }
    }

    /// Starts the lawyer service again on the same state and address.
    pub async fn start_lawyer_service(&mut self, addr: SocketAddr) {
        self.lawyer_service = Some(
            ServiceInstance::start_on(self.settings.clone(), AgencyService::Lawyer, addr).await,
        );
    }

    /// A `LawyerService` client (each call carries a lawyer's token: [`as_lawyer`]).
    pub async fn lawyers(&self) -> LawyerServiceClient<Channel> {
        LawyerServiceClient::new(plain_channel(self.lawyer_addr()).await)
    }

    /// A `LawyerRegistry` client (public).
    pub async fn registry(&self) -> LawyerRegistryClient<Channel> {
        LawyerRegistryClient::new(plain_channel(self.lawyer_addr()).await)
    }

    /// A `Gateway` client of agency service `service` (calls carry
    /// [`crate::as_agency`]).
    pub async fn gateway(&self, service: &str) -> GatewayClient<Channel> {
        GatewayClient::new(plain_channel(self.bus.addr(service)).await)
    }

    /// Stops the lawyer service and starts it again on the same state and
    /// address (where the agency services' register client finds it).
    pub async fn restart_lawyer_service(&mut self) {
        let addr = self.lawyer_addr();
        self.stop_lawyer_service().await;
        self.start_lawyer_service(addr).await;
    }

    /// The lawyer service's broker inbox queue.
    #[must_use]
    pub fn lawyer_queue(&self) -> String {
        self.bus.inbox_queue(LAWYER_SERVICE)
    }

    /// Publishes `envelope` onto the lawyer service's inbox queue, signed by
    /// its sender (development key), with its id as the message id; fills
    /// in id (from sender and idempotency key), kind and submission time
    /// when absent. Returns the id.
    pub async fn publish_to_lawyer_service(&self, mut envelope: Envelope) -> String {
        if envelope.id.is_empty() {
            envelope.id = envelope_id(&envelope.sender, &envelope.idempotency_key);
        }
        if envelope.kind == 0
            && let Some(payload) = &envelope.payload
        {
            use refbus_core::KindExt;
            envelope.kind = MessageKind::of_payload(payload) as i32;
        }
        if envelope.submitted_at.is_none() {
            envelope.submitted_at = Some(timestamp(chrono::Utc::now()));
        }
        if envelope.recipient.is_empty() {
            envelope.recipient = LAWYER_SERVICE.into();
        }
        let bytes = envelope.encode_to_vec();
        let properties = signed_properties(&envelope.sender, Signed::Envelope, &bytes)
            .with_message_id(envelope.id.as_str().into());
        self.amqp
            .channel
            .basic_publish(
                "".into(),
                self.lawyer_queue().as_str().into(),
                BasicPublishOptions::default(),
                &bytes,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        envelope.id
    }

    /// Publishes a registration signed by `registrar`; returns its envelope id.
    pub async fn publish_registration(
        &self,
        registrar: &str,
        registration: LawyerRegistration,
    ) -> String {
        let key = format!("registration/{}", uuid::Uuid::now_v7());
        self.publish_to_lawyer_service(Envelope {
            sender: registrar.into(),
            idempotency_key: key,
            payload: Some(Payload::LawyerRegistration(registration)),
            ..Envelope::default()
        })
        .await
    }

    /// A new lawyer's registration of `region` (one fresh letter key, a
    /// fresh token), not yet published.
    #[must_use]
    pub fn new_lawyer(licence: &str, region: &str) -> (RegisteredLawyer, LawyerRegistration) {
        let identity = age::x25519::Identity::generate();
        let lawyer = RegisteredLawyer {
            licence: licence.into(),
            name: format!("律师{}", &licence[licence.len().saturating_sub(4)..]),
            law_firm: "重庆某律师事务所".into(),
            region: region.into(),
            token: new_token(),
            identity,
        };
        let registration = LawyerRegistration {
            lawyer: Some(lawyer.lawyer()),
            region: region.into(),
            letter_keys: vec![lawyer.identity.to_public().to_string()],
            status: LawyerStatus::Active as i32,
            token_sha256: token_sha256(&lawyer.token),
            reason: String::new(),
        };
        (lawyer, registration)
    }

    /// Registers a lawyer of `region` through `registrar` and waits until
    /// the register shows them.
    pub async fn register(&self, registrar: &str, licence: &str, region: &str) -> RegisteredLawyer {
        let (lawyer, registration) = Self::new_lawyer(licence, region);
        self.publish_registration(registrar, registration).await;
        self.wait_for_status(licence, LawyerStatus::Active).await;
        lawyer
    }

    /// Publishes a status change (no token) signed by `registrar`; returns its id.
    pub async fn publish_status(
        &self,
        registrar: &str,
        licence: &str,
        status: LawyerStatus,
        reason: &str,
    ) -> String {
        self.publish_registration(
            registrar,
            LawyerRegistration {
                lawyer: Some(Lawyer {
                    name: "-".into(),
                    licence_number: licence.into(),
                    law_firm: String::new(),
                }),
                status: status as i32,
                reason: reason.into(),
                ..LawyerRegistration::default()
            },
        )
        .await
    }

    /// Suspends (or reinstates) a lawyer through `registrar` and waits until
    /// the register shows it.
    pub async fn set_status(
        &self,
        registrar: &str,
        licence: &str,
        status: LawyerStatus,
        reason: &str,
    ) {
        self.publish_status(registrar, licence, status, reason)
            .await;
        self.wait_for_status(licence, status).await;
    }

    /// Waits until `GetLawyer` shows `licence` with `status`.
    pub async fn wait_for_status(&self, licence: &str, status: LawyerStatus) {
        let registry = self.registry().await;
        eventually(
            &format!("lawyer {licence} {status:?} in the register"),
            || {
                let mut registry = registry.clone();
                async move {
                    let entry = registry
                        .get_lawyer(GetLawyerRequest {
                            licence_number: licence.into(),
                        })
                        .await
                        .ok()?
                        .into_inner();
                    (entry.registration?.status == status as i32).then_some(())
                }
            },
        )
        .await;
    }

    /// Waits until the dead-letter queue holds the message `id`; returns its reason.
    pub async fn dead_letter_reason(&self, id: &str) -> String {
        eventually(&format!("{id} in the dead-letter queue"), || async {
            let letters = self.bus.shared.bus.list_dead_letters(500).await.ok()?;
            letters
                .into_iter()
                .find(|l| l.message_id.as_deref() == Some(id))
                .map(|l| l.reason)
        })
        .await
    }

    /// Stops everything and deletes the namespace.
    pub async fn stop(mut self) {
        if let Some(running) = self.lawyer_service.take() {
            running.stop().await;
        }
        self.amqp.close().await;
        self.bus.stop().await;
    }
}

/// An open lawyer `Inbox` stream.
pub struct LawyerInbox {
    stream: tonic::Streaming<LawyerDelivery>,
}

impl LawyerInbox {
    /// Opens `lawyer`'s inbox (default window).
    pub async fn open(
        client: &mut LawyerServiceClient<Channel>,
        lawyer: &RegisteredLawyer,
    ) -> Self {
        let stream = client
            .inbox(lawyer.request(LawyerInboxRequest {
                licence_number: lawyer.licence.clone(),
                window: 0,
            }))
            .await
            .unwrap()
            .into_inner();
        Self { stream }
    }

    /// The next delivery (bounded by [`crate::PATIENCE`]).
    pub async fn next(&mut self) -> LawyerDelivery {
        within("a lawyer inbox delivery", self.stream.message())
            .await
            .expect("lawyer inbox stream healthy")
            .expect("lawyer inbox stream open")
    }

    /// The next delivery within `wait`, if any.
    pub async fn next_within(&mut self, wait: std::time::Duration) -> Option<LawyerDelivery> {
        tokio::time::timeout(wait, self.stream.message())
            .await
            .ok()
            .and_then(|m| m.expect("lawyer inbox stream healthy"))
    }
}

/// Acknowledges one delivery of `lawyer`, which must succeed.
pub async fn acknowledge_lawyer(
    client: &mut LawyerServiceClient<Channel>,
    lawyer: &RegisteredLawyer,
    token: String,
) {
    client
        .acknowledge(lawyer.request(LawyerAcknowledgeRequest {
            licence_number: lawyer.licence.clone(),
            delivery_token: token,
            ..Default::default()
        }))
        .await
        .unwrap();
}
