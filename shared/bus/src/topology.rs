//! The AMQP topology of the bus, under one namespace (default `refbus`):
//!
//! | name | what |
//! | --- | --- |
//! | `NS.deliveries` | topic exchange; routing key `RECIPIENT.KIND`; alternate exchange `NS.unroutable` |
//! | `NS.inbox.AGENCY` | durable quorum queue per agency, bound `AGENCY.#` |
//! | `NS.tap` | quorum queue bound to every agency's key and to `event.#`: the tracker's copy of all traffic |
//! | `NS.unroutable` | fanout exchange and queue catching what no binding matched, for an operator |
//! | `NS.dead-letter` | fanout exchange and queue for what a consumer cannot decode or cannot handle within the delivery limit |
//!
//! The tap is bound per agency, not with `#`, so that a routing key naming
//! no known agency still matches nothing and lands in `NS.unroutable`.
//! Inbox and tap queues dead-letter at-least-once (`x-dead-letter-strategy`,
//! which needs `x-overflow: reject-publish`) what a consumer rejects. They
//! have no `x-delivery-limit`: on RabbitMQ 3.x every return counts toward
//! it (a stream closed, a client crash, a restart, a channel the broker
//! closed), so a careless client would push good messages into the
//! dead-letter queue. The consumers dead-letter, with the reason, exactly
//! what cannot be decoded, verified or stored; nothing else leaves a queue
//! unacknowledged (issue 16).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use serde_json::{Value, json};

use crate::BusError;

/// The routing-key prefix of gateway events (deliveries and acknowledgements
/// reported for the tracker).
pub const EVENT_PREFIX: &str = "event";

/// The routing key of a gateway's batch of hop reports (`refbus.v1.HopBatch`),
/// on the tap through the `event.#` binding.
pub const HOP_BATCH_KEY: &str = "event.batch";

/// One queue: its name, whether it dead-letters, and its (exchange, key) bindings.
struct QueueSpec {
    name: String,
    dead_letter: bool,
    bindings: Vec<(String, String)>,
}

impl QueueSpec {
    fn new(name: String, dead_letter: bool, bindings: Vec<(String, String)>) -> Self {
        Self {
            name,
            dead_letter,
            bindings,
        }
    }
}

/// What one broker user may do, as RabbitMQ's regular expressions over
/// resource names (`rabbitmqctl set_permissions`) and, on the deliveries
/// exchange, over routing keys (`set_topic_permissions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerPermissions {
    pub configure: String,
    pub write: String,
    pub read: String,
    pub topic_write: String,
}

/// `(a|b|c)` of the escaped names.
fn alternatives(names: impl Iterator<Item = String>) -> String {
    let names: Vec<String> = names.map(|n| regex_escape(&n)).collect();
    format!("({})", names.join("|"))
}

/// Escapes what a regular expression would read as an operator.
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if !(c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Names and arguments of everything the bus declares.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Prefix of every exchange and queue name.
    pub namespace: String,
    /// Every agency id in the directory: each gets an inbox.
    pub agencies: Vec<String>,
    /// Deliveries of one message before the broker dead-letters it: none
    /// by default (see the module's doc); a deployment that wants the
    /// broker's safety net back sets it, knowing that careless clients
    /// then count against it.
    pub delivery_limit: Option<i64>,
    /// Delete queues unused for this long (tests only; `None` in production).
    pub queue_expires: Option<Duration>,
}

impl Topology {
    #[must_use]
    pub fn new(namespace: impl Into<String>, agencies: Vec<String>) -> Self {
        Self {
            namespace: namespace.into(),
            agencies,
            delivery_limit: None,
            queue_expires: None,
        }
    }

    #[must_use]
    pub fn deliveries_exchange(&self) -> String {
        format!("{}.deliveries", self.namespace)
    }

    #[must_use]
    pub fn unroutable(&self) -> String {
        format!("{}.unroutable", self.namespace)
    }

    #[must_use]
    pub fn dead_letter(&self) -> String {
        format!("{}.dead-letter", self.namespace)
    }

    #[must_use]
    pub fn tap_queue(&self) -> String {
        format!("{}.tap", self.namespace)
    }

    #[must_use]
    pub fn inbox_queue(&self, agency: &str) -> String {
        format!("{}.inbox.{agency}", self.namespace)
    }

    /// The routing key of a message of `kind` (its code name) to `recipient`.
    #[must_use]
    pub fn routing_key(recipient: &str, kind: &str) -> String {
        format!("{recipient}.{kind}")
    }

    fn queue_arguments(&self, dead_letter: bool) -> Vec<(&'static str, AMQPValue)> {
        let mut args = vec![(
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        )];
        if dead_letter {
            if let Some(limit) = self.delivery_limit {
                args.push(("x-delivery-limit", AMQPValue::LongLongInt(limit)));
            }
            args.push((
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from(self.dead_letter())),
            ));
            args.push((
                "x-dead-letter-strategy",
                AMQPValue::LongString(LongString::from("at-least-once")),
            ));
            args.push((
                "x-overflow",
                AMQPValue::LongString(LongString::from("reject-publish")),
            ));
        }
        if let Some(expires) = self.queue_expires {
            let ms = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
            args.push(("x-expires", AMQPValue::LongLongInt(ms)));
        }
        args
    }

    /// Every queue with its bindings.
    fn queues(&self) -> Vec<QueueSpec> {
        let deliveries = self.deliveries_exchange();
        let mut queues = vec![
            QueueSpec::new(
                self.dead_letter(),
                false,
                vec![(self.dead_letter(), String::new())],
            ),
            QueueSpec::new(
                self.unroutable(),
                false,
                vec![(self.unroutable(), String::new())],
            ),
        ];
        for agency in &self.agencies {
            let binding = (deliveries.clone(), format!("{agency}.#"));
            queues.push(QueueSpec::new(
                self.inbox_queue(agency),
                true,
                vec![binding],
            ));
        }
        let mut tap: Vec<_> = self
            .agencies
            .iter()
            .map(|a| (deliveries.clone(), format!("{a}.#")))
            .collect();
        tap.push((deliveries, format!("{EVENT_PREFIX}.#")));
        queues.push(QueueSpec::new(self.tap_queue(), true, tap));
        queues
    }

    /// Declares the whole topology on `channel`. Idempotent: declaring what
    /// exists with the same arguments changes nothing.
    ///
    /// # Errors
    /// [`BusError::Topology`] naming what could not be declared (for example
    /// a queue that exists with different arguments).
    pub async fn declare(&self, channel: &Channel) -> Result<(), BusError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let err = |what: String| move |source| BusError::Topology { what, source };
        for name in [self.dead_letter(), self.unroutable()] {
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(err(format!("exchange `{name}`")))?;
        }
        let mut args = FieldTable::default();
        args.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(LongString::from(self.unroutable())),
        );
        let deliveries = self.deliveries_exchange();
        channel
            .exchange_declare(
                deliveries.as_str().into(),
                ExchangeKind::Topic,
                durable,
                args,
            )
            .await
            .map_err(err(format!("exchange `{deliveries}`")))?;
        for QueueSpec {
            name: queue,
            dead_letter,
            bindings,
        } in self.queues()
        {
            let mut args = FieldTable::default();
            for (key, value) in self.queue_arguments(dead_letter) {
                args.insert(ShortString::from(key), value);
            }
            channel
                .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
                .await
                .map_err(err(format!("queue `{queue}`")))?;
            for (exchange, key) in bindings {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(err(format!("binding `{queue}` <- `{exchange}` `{key}`")))?;
            }
        }
        Ok(())
    }

    /// Checks, without declaring, that the exchanges a service publishes to
    /// exist: for a service whose broker user may not configure anything
    /// (the operator declared the topology from [`Topology::definitions`]).
    /// Passive declarations need no permission.
    ///
    /// # Errors
    /// [`BusError::Topology`] naming the missing exchange.
    pub async fn verify(&self, channel: &Channel) -> Result<(), BusError> {
        for name in [self.deliveries_exchange(), self.dead_letter()] {
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|source| BusError::Topology {
                    what: format!(
                        "exchange `{name}` (not declared: this service's broker user may not; the operator imports the topology)"
                    ),
                    source,
                })?;
        }
        Ok(())
    }

    /// The broker permissions of an agency service acting for `agencies`:
    /// nothing to configure (the operator declares the topology), write to
    /// the exchanges it publishes to (deliveries, dead-letter), read only
    /// those agencies' inbox queues; on the deliveries exchange, routing
    /// keys that name an agency of the directory or a hop report.
    #[must_use]
    pub fn service_permissions(&self, agencies: &[&str]) -> BrokerPermissions {
        BrokerPermissions {
            configure: "^$".into(),
            write: self.exchanges_written(),
            read: format!(
                "^{}$",
                alternatives(agencies.iter().map(|a| self.inbox_queue(a)))
            ),
            topic_write: self.routing_keys(),
        }
    }

    /// The broker permissions of the tracker: read the tap, write overdue
    /// notices and dead letters.
    #[must_use]
    pub fn tracker_permissions(&self) -> BrokerPermissions {
        BrokerPermissions {
            configure: "^$".into(),
            write: self.exchanges_written(),
            read: format!("^{}$", regex_escape(&self.tap_queue())),
            topic_write: self.routing_keys(),
        }
    }

    fn exchanges_written(&self) -> String {
        format!(
            "^{}$",
            alternatives([self.deliveries_exchange(), self.dead_letter()].into_iter())
        )
    }

    fn routing_keys(&self) -> String {
        format!(
            "^{}\\.",
            alternatives(
                std::iter::once(EVENT_PREFIX.to_owned()).chain(self.agencies.iter().cloned())
            )
        )
    }

    /// Deletes every queue and exchange of the topology, with whatever they
    /// hold. For test and demo namespaces; an operator's tool, never called
    /// by the services.
    ///
    /// # Errors
    /// [`BusError::Topology`] naming what could not be deleted.
    pub async fn delete(&self, channel: &Channel) -> Result<(), BusError> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        for queue in self.queues() {
            channel
                .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|source| BusError::Topology {
                    what: format!("deleting queue `{}`", queue.name),
                    source,
                })?;
        }
        for exchange in [
            self.deliveries_exchange(),
            self.unroutable(),
            self.dead_letter(),
        ] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|source| BusError::Topology {
                    what: format!("deleting exchange `{exchange}`"),
                    source,
                })?;
        }
        Ok(())
    }

    /// The topology as RabbitMQ definitions (for `rabbitmqctl
    /// import_definitions` or the management plugin's `load_definitions`).
    #[must_use]
    pub fn definitions(&self, vhost: &str) -> Value {
        let exchange = |name: String, kind: &str, args: Value| {
            json!({"name": name, "vhost": vhost, "type": kind, "durable": true,
                   "auto_delete": false, "internal": false, "arguments": args})
        };
        let exchanges = vec![
            exchange(self.dead_letter(), "fanout", json!({})),
            exchange(self.unroutable(), "fanout", json!({})),
            exchange(
                self.deliveries_exchange(),
                "topic",
                json!({"alternate-exchange": self.unroutable()}),
            ),
        ];
        let mut queues = Vec::new();
        let mut bindings = Vec::new();
        for QueueSpec {
            name: queue,
            dead_letter,
            bindings: queue_bindings,
        } in self.queues()
        {
            let args: serde_json::Map<String, Value> = self
                .queue_arguments(dead_letter)
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
                        AMQPValue::LongLongInt(i) => json!(i),
                        other => json!(format!("{other:?}")),
                    };
                    (k.to_owned(), v)
                })
                .collect();
            queues.push(json!({"name": queue, "vhost": vhost, "durable": true,
                               "auto_delete": false, "arguments": args}));
            for (source, key) in queue_bindings {
                bindings.push(json!({"source": source, "vhost": vhost, "destination": queue,
                                     "destination_type": "queue", "routing_key": key, "arguments": {}}));
            }
        }
        json!({"rabbit_version": "3.10.8", "exchanges": exchanges, "queues": queues, "bindings": bindings})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_agency_has_an_inbox_and_the_tap_sees_every_agency_and_event() {
        let t = Topology::new("ns", vec!["a".into(), "b".into()]);
        let defs = t.definitions("/");
        let queues: Vec<_> = defs["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap().to_owned())
            .collect();
        assert!(queues.contains(&"ns.inbox.a".to_owned()));
        assert!(queues.contains(&"ns.inbox.b".to_owned()));
        let tap_keys: Vec<_> = defs["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["destination"] == "ns.tap")
            .map(|b| b["routing_key"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(tap_keys, ["a.#", "b.#", "event.#"]);
        let inbox = defs["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "ns.inbox.a")
            .unwrap();
        assert_eq!(inbox["arguments"]["x-queue-type"], "quorum");
        assert!(
            inbox["arguments"].get("x-delivery-limit").is_none(),
            "issue 16: no delivery limit, so closing a stream never brings a message closer to the dead-letter queue"
        );
        assert_eq!(
            inbox["arguments"]["x-dead-letter-strategy"],
            "at-least-once"
        );
        assert_eq!(
            defs["exchanges"][2]["arguments"]["alternate-exchange"],
            "ns.unroutable"
        );
    }
}
