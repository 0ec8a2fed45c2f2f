//! [`Bus`]: one AMQP connection, kept up by a supervisor task.
//!
//! The supervisor watches the connection; when it fails it marks the bus
//! down (so that publishing fails at once instead of hanging), reconnects
//! with exponential backoff, re-declares the topology, and announces the new
//! connection to every [`Subscription`](crate::Subscription), which resumes
//! consuming. We do this ourselves rather than with lapin's young
//! auto-recovery so that "down" is observable and bounded.
//!
//! An `amqps://` URL connects over TLS (rustls), verifying the broker's
//! certificate against the public web roots and [`BusConfig::tls_ca`], a
//! deployment's private CA; every reconnection does the same.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    DefaultConnectionBuilder, Event,
};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::{BusError, BusMetrics, Topology, redact_url};

/// How to reach the broker and what to declare there.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// `amqp://user:password@host:port/vhost`, or `amqps://` for TLS.
    pub url: String,
    /// With `amqps://`: a CA certificate chain (PEM) to trust besides the
    /// public web roots, for a broker whose certificate comes from the
    /// deployment's own CA.
    pub tls_ca: Option<String>,
    pub topology: Topology,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// How long a publish may wait for the broker's confirm before it fails
    /// with [`BusError::Unavailable`].
    pub confirm_timeout: Duration,
    /// The longest wait between two reconnection attempts.
    pub max_backoff: Duration,
    /// Shown in the broker's connection list.
    pub connection_name: String,
    /// Declare the topology on every (re)connection; when false, only check
    /// that the exchanges exist (a broker user with no configure permission).
    pub declare_topology: bool,
}

impl BusConfig {
    #[must_use]
    pub fn new(url: impl Into<String>, topology: Topology) -> Self {
        Self {
            url: url.into(),
            tls_ca: None,
            topology,
            connect_timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
            connection_name: "refbus".into(),
            declare_topology: true,
        }
    }
}

/// One live connection and its publishing channel.
pub(crate) struct Link {
    /// Increases with every new connection.
    pub(crate) generation: u64,
    pub(crate) connection: Connection,
    publisher: Mutex<Channel>,
}

/// The state the supervisor publishes.
#[derive(Clone)]
pub(crate) enum State {
    Up(Arc<Link>),
    Down { reason: Arc<str>, generation: u64 },
    Closed,
}

struct Inner {
    config: BusConfig,
    state: watch::Sender<State>,
    shutdown: CancellationToken,
    metrics: BusMetrics,
    /// Routes with an envelope publish in flight (see [`crate::envelopes`]).
    lanes: crate::envelopes::Lanes,
}

/// Whether the bus is connected, and a way to wait until that changes.
pub struct ConnectionWatch(watch::Receiver<State>);

impl ConnectionWatch {
    /// Whether the bus has a live connection now.
    #[must_use]
    pub fn is_up(&self) -> bool {
        matches!(*self.0.borrow(), State::Up(_))
    }

    /// Waits for the next change of state (connected, lost, reconnected,
    /// closed). Returns `false` once the bus is gone.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub payload: &'a [u8],
    /// AMQP `message-id` (the envelope id).
    pub message_id: Option<&'a str>,
    /// AMQP `type` (the message kind).
    pub kind: Option<&'a str>,
    pub content_type: &'a str,
    pub headers: Vec<(&'a str, String)>,
    /// Further routing keys for the same message (RabbitMQ's sender-selected
    /// distribution, the `CC` header): one publish, one confirm, a copy in
    /// every queue any of the keys reaches.
    pub cc: Vec<String>,
}

impl<'a> Outgoing<'a> {
    #[must_use]
    pub fn new(exchange: &'a str, routing_key: &'a str, payload: &'a [u8]) -> Self {
        Self {
            exchange,
            routing_key,
            payload,
            message_id: None,
            kind: None,
            content_type: crate::subscription::ENVELOPE_CONTENT_TYPE,
            headers: Vec::new(),
            cc: Vec::new(),
        }
    }
}

/// The bus: publish with confirms, subscribe with manual acks. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Bus {
    /// Connects, declares the topology and starts the supervisor. The first
    /// connection must succeed; later outages are survived.
    ///
    /// # Errors
    /// [`BusError::Connect`] with the (redacted) URL when the broker cannot
    /// be reached, [`BusError::Topology`] when the topology cannot be declared.
    pub async fn connect(config: BusConfig, shutdown: CancellationToken) -> Result<Self, BusError> {
        let link = connect_link(&config, 1).await?;
        let (state, _) = watch::channel(State::Up(Arc::new(link)));
        let bus = Bus {
            inner: Arc::new(Inner {
                config,
                state,
                shutdown,
                metrics: BusMetrics::default(),
                lanes: crate::envelopes::Lanes::default(),
            }),
        };
        tokio::spawn(supervise(bus.inner.clone()));
        Ok(bus)
    }

    #[must_use]
    pub fn topology(&self) -> &Topology {
        &self.inner.config.topology
    }

    /// What this bus counts (published, confirmed, dead-lettered).
    #[must_use]
    pub fn metrics(&self) -> &BusMetrics {
        &self.inner.metrics
    }

    /// Whether the bus has a live connection now.
    #[must_use]
    pub fn is_up(&self) -> bool {
        matches!(*self.inner.state.borrow(), State::Up(_))
    }

    /// Follows the connection as it goes up and down (for health checks).
    #[must_use]
    pub fn connection(&self) -> ConnectionWatch {
        ConnectionWatch(self.inner.state.subscribe())
    }

    pub(crate) fn watch_state(&self) -> watch::Receiver<State> {
        self.inner.state.subscribe()
    }

    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    fn current(&self) -> Result<Arc<Link>, BusError> {
        match &*self.inner.state.borrow() {
            State::Up(link) => Ok(link.clone()),
            State::Down { reason, .. } => Err(BusError::Unavailable(reason.to_string())),
            State::Closed => Err(BusError::Unavailable("the bus is shutting down".into())),
        }
    }

    /// Publishes one persistent, mandatory message and waits for the broker's
    /// confirm. Returns only when the broker has taken responsibility for it.
    ///
    /// # Errors
    /// [`BusError::Unavailable`] at once while the broker is unreachable, or
    /// when no confirm arrives within the confirm timeout;
    /// [`BusError::Unroutable`] when no queue took it; [`BusError::Nacked`].
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), BusError> {
        let kind = message.kind;
        self.publish_counted(message, kind, 1).await
    }

    /// [`Bus::publish`], counted in the metrics as `count` messages of
    /// `kind` (a batch, as the envelopes it carries).
    pub(crate) async fn publish_counted(
        &self,
        message: Outgoing<'_>,
        kind: Option<&str>,
        count: u64,
    ) -> Result<(), BusError> {
        let kind = BusMetrics::kind(kind);
        self.inner
            .metrics
            .published
            .get_or_create(&kind)
            .inc_by(count);
        let batched = message.kind == Some(crate::subscription::ENVELOPE_BATCH_TYPE);
        let result = self.publish_confirmed(message).await;
        let outcome = match result {
            Ok(()) => &self.inner.metrics.confirmed,
            Err(_) => &self.inner.metrics.publish_failed,
        };
        outcome.get_or_create(&kind).inc_by(count);
        if batched && result.is_ok() {
            self.inner.metrics.envelope_batches.inc();
            self.inner.metrics.batched_envelopes.inc_by(count);
        }
        result
    }

    pub(crate) fn lanes(&self) -> &crate::envelopes::Lanes {
        &self.inner.lanes
    }

    async fn publish_confirmed(&self, message: Outgoing<'_>) -> Result<(), BusError> {
        let link = self.current()?;
        let mut headers = FieldTable::default();
        for (key, value) in &message.headers {
            headers.insert(
                ShortString::from(*key),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        if !message.cc.is_empty() {
            let keys = message
                .cc
                .iter()
                .map(|key| AMQPValue::LongString(LongString::from(key.as_str())))
                .collect::<Vec<_>>();
            headers.insert(ShortString::from("CC"), AMQPValue::FieldArray(keys.into()));
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(message.content_type.into())
            .with_headers(headers);
        if let Some(id) = message.message_id {
            properties = properties.with_message_id(id.into());
        }
        if let Some(kind) = message.kind {
            properties = properties.with_type(kind.into());
        }
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish = async {
            let channel = link.publisher(&self.inner.config).await?;
            let confirm = channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    options,
                    message.payload,
                    properties,
                )
                .await
                .map_err(|e| BusError::Unavailable(e.to_string()))?;
            confirm
                .await
                .map_err(|e| BusError::Unavailable(e.to_string()))
        };
        let confirmation = tokio::time::timeout(self.inner.config.confirm_timeout, publish)
            .await
            .map_err(|_| {
                BusError::Unavailable(format!(
                    "no confirm from the broker within {:?}",
                    self.inner.config.confirm_timeout
                ))
            })??;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BusError::Unroutable {
                exchange: message.exchange.to_owned(),
                routing_key: message.routing_key.to_owned(),
            }),
            Confirmation::Nack(_) => Err(BusError::Nacked),
            Confirmation::NotRequested => Err(BusError::Unavailable(
                "publisher confirms are not enabled on the channel".into(),
            )),
        }
    }

    /// Opens a fresh channel on the live connection (for a consumer).
    pub(crate) async fn channel(&self) -> Result<(u64, Channel), BusError> {
        let link = self.current()?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok((link.generation, channel))
    }

    /// Closes the connection: the broker returns every unacknowledged
    /// delivery to its queue. Further publishes fail with `Unavailable`.
    pub async fn close(&self) {
        let previous = self.inner.state.send_replace(State::Closed);
        if let State::Up(link) = previous {
            let _ = link
                .connection
                .close(200, "refbus shutting down".into())
                .await;
        }
    }
}

impl Link {
    /// The publishing channel, re-opened if a channel error closed it.
    async fn publisher(&self, config: &BusConfig) -> Result<Channel, BusError> {
        let mut channel = self.publisher.lock().await;
        if !channel.status().connected() {
            *channel = confirm_channel(&self.connection, config).await?;
        }
        Ok(channel.clone())
    }
}

async fn confirm_channel(connection: &Connection, config: &BusConfig) -> Result<Channel, BusError> {
    let unavailable =
        |e: lapin::Error| BusError::Unavailable(format!("{} ({e})", redact_url(&config.url)));
    let channel = connection.create_channel().await.map_err(unavailable)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(unavailable)?;
    Ok(channel)
}

async fn connect_link(config: &BusConfig, generation: u64) -> Result<Link, BusError> {
    let url = redact_url(&config.url);
    let properties = ConnectionProperties::default()
        .with_connection_name(config.connection_name.as_str().into());
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: config.tls_ca.clone(),
    };
    let connect = async {
        DefaultConnectionBuilder::new()?
            .with_uri_str(config.url.clone())
            .with_properties(properties)
            .with_tls_config(tls)
            .connect()
            .await
    };
    let connection = tokio::time::timeout(config.connect_timeout, connect)
        .await
        .map_err(|_| BusError::Connect {
            url: url.clone(),
            reason: format!("no answer within {:?}", config.connect_timeout),
        })?
        .map_err(|e| BusError::Connect {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let declare = async {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| BusError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if config.declare_topology {
            config.topology.declare(&channel).await?;
        } else {
            config.topology.verify(&channel).await?;
        }
        let _ = channel.close(200, "topology declared".into()).await;
        confirm_channel(&connection, config).await
    };
    let publisher = match declare.await {
        Ok(channel) => channel,
        Err(e) => {
            let _ = connection.close(200, "topology failed".into()).await;
            return Err(e);
        }
    };
    Ok(Link {
        generation,
        connection,
        publisher: Mutex::new(publisher),
    })
}

/// Watches the live connection; on failure, marks the bus down and
/// reconnects until it is back or the bus shuts down.
async fn supervise(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let current = inner.state.borrow().clone();
        let generation = match current {
            State::Closed => return,
            State::Down { generation, .. } => generation,
            State::Up(link) => {
                let reason = tokio::select! {
                    () = inner.shutdown.cancelled() => {
                        let previous = inner.state.send_replace(State::Closed);
                        if let State::Up(link) = previous {
                            let _ = link.connection.close(200, "refbus shutting down".into()).await;
                        }
                        return;
                    }
                    reason = wait_for_failure(&link) => reason,
                };
                if matches!(*inner.state.borrow(), State::Closed) {
                    return;
                }
                tracing::warn!(generation = link.generation, %reason, "lost the broker connection; reconnecting");
                inner.state.send_replace(State::Down {
                    reason: Arc::from(reason.as_str()),
                    generation: link.generation,
                });
                link.generation
            }
        };
        tokio::select! {
            () = inner.shutdown.cancelled() => {
                inner.state.send_replace(State::Closed);
                return;
            }
            () = tokio::time::sleep(backoff) => {}
        }
        match connect_link(&inner.config, generation + 1).await {
            Ok(link) => {
                tracing::info!(
                    generation = generation + 1,
                    "broker connection restored; topology declared"
                );
                backoff = Duration::from_millis(100);
                inner.state.send_replace(State::Up(Arc::new(link)));
            }
            Err(e) => {
                tracing::debug!(error = %e, "reconnection attempt failed");
                inner.state.send_modify(|state| {
                    if let State::Down { reason, .. } = state {
                        *reason = Arc::from(e.to_string().as_str());
                    }
                });
                backoff = (backoff * 2).min(inner.config.max_backoff);
            }
        }
    }
}

/// Resolves when the connection has failed, with the reason.
async fn wait_for_failure(link: &Link) -> String {
    let mut events = link.connection.events_listener();
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            event = events.next() => match event {
                // lapin reports a channel's error (a consumer timeout, a
                // refused publish) here too: only a connection that is no
                // longer connected has failed. A lost channel is reopened by
                // its owner (issue 16: one stream's consumer timeout must
                // not cut every stream and publish of the process).
                Some(Event::Error(e)) if link.connection.status().connected() => {
                    tracing::debug!(error = %e, "a channel failed; the connection stands");
                }
                Some(Event::Error(e)) => return e.to_string(),
                Some(_) => {}
                None => return "the connection's event stream ended".into(),
            },
            _ = poll.tick() => {
                let status = link.connection.status();
                if !status.connected() {
                    return if status.blocked() { "the connection is blocked".into() } else { "the connection is no longer connected".into() };
                }
            }
        }
    }
}
