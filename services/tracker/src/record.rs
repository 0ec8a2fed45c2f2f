//! Recording what the bus carried: each envelope and hop report becomes a
//! chained ledger event, a referral row, hops, and the obligations the
//! policy catalogue says it creates; hops and feedback meet obligations.
//! Everything for one message happens in the caller's transaction, and a
//! message already in the ledger changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use chrono::{DateTime, Utc};
use prost::Message;
use refbus_core::envelope::from_timestamp;
use refbus_core::policy::{ClockStart, Party, PolicyCatalogue};
use refbus_core::{Directory, KindExt, MessageKind};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{Envelope, Hop, HopReport};
use serde_json::json;
use sqlx::{AnyConnection, Row};

use crate::clock::{from_millis, millis};
use crate::ledger::{Event, Head, sha256_hex};

/// Counters the tracker keeps (exported as metrics by the service).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages recorded (first time seen).
    pub recorded: AtomicU64,
    /// Messages seen again and ignored.
    pub duplicates: AtomicU64,
    /// Messages of a kind the policy catalogue does not know (recorded and flagged).
    pub unknown_kinds: AtomicU64,
    /// Obligations created.
    pub obligations: AtomicU64,
    /// Deliveries on the tap that did not decode (dead-lettered).
    pub undecodable: AtomicU64,
    /// Obligations marked overdue.
    pub overdue: AtomicU64,
}

/// What one batch recorded, added to [`Metrics`] once it has committed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub recorded: u64,
    pub duplicates: u64,
    pub unknown_kinds: u64,
    pub obligations: u64,
}

impl Metrics {
    /// Adds a committed batch's tally.
    pub fn add(&self, tally: Tally) {
        self.recorded.fetch_add(tally.recorded, Ordering::Relaxed);
        self.duplicates
            .fetch_add(tally.duplicates, Ordering::Relaxed);
        self.unknown_kinds
            .fetch_add(tally.unknown_kinds, Ordering::Relaxed);
        self.obligations
            .fetch_add(tally.obligations, Ordering::Relaxed);
    }
}

/// A message from the tap, decoded.
#[derive(Debug, Clone)]
pub enum Observed {
    Envelope(Box<Envelope>),
    Hop(HopReport),
}

impl Observed {
    /// Decodes a tap delivery: hop reports come on `event.*` routing keys,
    /// everything else is an envelope.
    ///
    /// # Errors
    /// A reason, for the dead-letter header.
    pub fn decode(routing_key: &str, data: &[u8]) -> Result<Self, String> {
        if routing_key.starts_with("event.") {
            let report =
                HopReport::decode(data).map_err(|e| format!("not a refbus.v1.HopReport: {e}"))?;
            if report.id.is_empty() || report.referral_id.is_empty() {
                return Err("hop report without id or referral".into());
            }
            Ok(Observed::Hop(report))
        } else {
            let envelope =
                Envelope::decode(data).map_err(|e| format!("not a refbus.v1.Envelope: {e}"))?;
            if envelope.id.is_empty() {
                return Err("envelope has no id".into());
            }
            Ok(Observed::Envelope(Box::new(envelope)))
        }
    }
}

/// What the tracker records with.
pub struct Recorder {
    pub directory: Arc<Directory>,
    pub policy: Arc<PolicyCatalogue>,
}

/// The ledger name of a hop.
#[must_use]
pub fn hop_name(hop: Hop) -> &'static str {
    match hop {
        Hop::Unspecified => "unspecified",
        Hop::Submitted => "submitted",
        Hop::Delivered => "delivered",
        Hop::Acknowledged => "acknowledged",
        Hop::Relayed => "relayed",
        Hop::Answered => "answered",
        Hop::OverdueNotified => "overdue_notified",
    }
}

fn ts(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(from_timestamp)
}

impl Recorder {
    /// Records one message; returns false when it was already recorded.
    ///
    /// # Errors
    /// A database error: the caller rolls back and retries the batch.
    pub async fn record(
        &self,
        conn: &mut AnyConnection,
        head: &mut Head,
        observed: &Observed,
        now: DateTime<Utc>,
        tally: &mut Tally,
    ) -> Result<bool, sqlx::Error> {
        let fresh = match observed {
            Observed::Envelope(envelope) => {
                self.record_envelope(conn, head, envelope, now, tally)
                    .await?
            }
            Observed::Hop(report) => self.record_hop(conn, head, report, now).await?,
        };
        if fresh {
            tally.recorded += 1;
        } else {
            tally.duplicates += 1;
        }
        Ok(fresh)
    }

    async fn record_envelope(
        &self,
        conn: &mut AnyConnection,
        head: &mut Head,
        envelope: &Envelope,
        now: DateTime<Utc>,
        tally: &mut Tally,
    ) -> Result<bool, sqlx::Error> {
        let kind = MessageKind::try_from(envelope.kind).unwrap_or(MessageKind::Unspecified);
        let submitted = ts(envelope.submitted_at.as_ref()).unwrap_or(now);
        let clock = ts(envelope.clock_started_at.as_ref()).unwrap_or(submitted);
        let encoded = envelope.encode_to_vec();
        let body = json!({
            "id": envelope.id,
            "kind": kind.code(),
            "sender": envelope.sender,
            "recipient": envelope.recipient,
            "in_reply_to": envelope.in_reply_to,
            "clock_started_at": millis(clock),
            "submitted_at": millis(submitted),
            "envelope_sha256": sha256_hex(&encoded),
        })
        .to_string();
        let event = Event {
            message_id: &envelope.id,
            event: kind.code(),
            referral_id: &envelope.id,
            recorded_at: millis(now),
            body,
        };
        if !head.append(conn, &event).await? {
            return Ok(false);
        }
        let known = kind != MessageKind::Unspecified && self.policy.knows(kind);
        if !known {
            tally.unknown_kinds += 1;
            tracing::warn!(id = %envelope.id, kind = envelope.kind, sender = %envelope.sender, "recorded a message of a kind the policy catalogue does not know (flagged)");
        }
        let region = |id: &str| {
            self.directory
                .get(id)
                .map(|a| a.region.clone())
                .unwrap_or_default()
        };
        sqlx::query(
            "INSERT INTO referrals (id, kind, sender, recipient, in_reply_to, sender_region, recipient_region,
                                    clock_started_at, submitted_at, kind_known, envelope)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&envelope.id)
        .bind(kind.code())
        .bind(&envelope.sender)
        .bind(&envelope.recipient)
        .bind(&envelope.in_reply_to)
        .bind(region(&envelope.sender))
        .bind(region(&envelope.recipient))
        .bind(millis(clock))
        .bind(millis(submitted))
        .bind(i32::from(known))
        .bind(base64::engine::general_purpose::STANDARD.encode(&encoded))
        .execute(&mut *conn)
        .await?;
        insert_hop(
            conn,
            &envelope.id,
            "submitted",
            &envelope.sender,
            millis(submitted),
            &envelope.id,
        )
        .await?;

        match &envelope.payload {
            Some(Payload::Feedback(_)) if !envelope.in_reply_to.is_empty() => {
                insert_hop(
                    conn,
                    &envelope.in_reply_to,
                    "answered",
                    &envelope.sender,
                    millis(submitted),
                    &envelope.id,
                )
                .await?;
                meet(
                    conn,
                    &envelope.in_reply_to,
                    "feedback",
                    &envelope.sender,
                    millis(submitted),
                )
                .await?;
            }
            Some(Payload::Acknowledgement(_)) if !envelope.in_reply_to.is_empty() => {
                insert_hop(
                    conn,
                    &envelope.in_reply_to,
                    "acknowledged",
                    &envelope.sender,
                    millis(submitted),
                    &envelope.id,
                )
                .await?;
                meet(
                    conn,
                    &envelope.in_reply_to,
                    "acknowledged",
                    &envelope.sender,
                    millis(submitted),
                )
                .await?;
            }
            Some(Payload::OverdueNotice(notice)) => {
                insert_hop(
                    conn,
                    &notice.referral_id,
                    "overdue_notified",
                    &envelope.recipient,
                    millis(submitted),
                    &envelope.id,
                )
                .await?;
            }
            _ if known => {
                tally.obligations += self
                    .create_obligations(conn, envelope, kind, clock, submitted)
                    .await?
            }
            _ => {}
        }
        Ok(true)
    }

    async fn create_obligations(
        &self,
        conn: &mut AnyConnection,
        envelope: &Envelope,
        kind: MessageKind,
        clock: DateTime<Utc>,
        submitted: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error> {
        let (Some(sender), Some(recipient)) = (
            self.directory.get(&envelope.sender),
            self.directory.get(&envelope.recipient),
        ) else {
            tracing::warn!(id = %envelope.id, "referral between agencies not in the directory: no obligations created");
            return Ok(0);
        };
        let mut created = 0;
        for rule in self.policy.rules_for(kind) {
            let bearer = match rule.bearer {
                Party::Sender => sender,
                Party::Recipient => recipient,
            };
            let start = match rule.clock {
                ClockStart::Requested => clock,
                ClockStart::Submitted => submitted,
            };
            let due = self.policy.due_at(rule, start, bearer, &self.directory);
            let notify = self
                .policy
                .notify_agencies(rule, sender, recipient, &self.directory);
            let met_by = rule.met_by.code();
            let id = format!("{}/{}/{}", envelope.id, rule.rule, met_by);
            // A hop that arrived before the referral (reports race) meets it at once.
            let earlier: Option<i64> = sqlx::query("SELECT MIN(at) AS at FROM hops WHERE referral_id = $1 AND hop = $2 AND agency = $3")
                .bind(&envelope.id)
                .bind(hop_for(met_by))
                .bind(&recipient.id)
                .fetch_one(&mut *conn)
                .await?
                .try_get("at")?;
            sqlx::query(
                "INSERT INTO obligations (id, referral_id, rule, kind, duty, bearer, meets_agency, met_by,
                                          clock_started_at, due_at, met_at, overdue_at, notify)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, $12) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&id)
            .bind(&envelope.id)
            .bind(&rule.rule)
            .bind(kind.code())
            .bind(&rule.duty)
            .bind(&bearer.id)
            .bind(&recipient.id)
            .bind(met_by)
            .bind(millis(start))
            .bind(millis(due))
            .bind(earlier)
            .bind(notify.join(","))
            .execute(&mut *conn)
            .await?;
            created += 1;
        }
        Ok(created)
    }

    async fn record_hop(
        &self,
        conn: &mut AnyConnection,
        head: &mut Head,
        report: &HopReport,
        now: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let hop = hop_name(Hop::try_from(report.hop).unwrap_or(Hop::Unspecified));
        let at = ts(report.at.as_ref()).unwrap_or(now);
        let body = json!({"id": report.id, "referral_id": report.referral_id, "hop": hop, "agency": report.agency, "at": millis(at)}).to_string();
        let event = Event {
            message_id: &report.id,
            event: "hop_report",
            referral_id: &report.referral_id,
            recorded_at: millis(now),
            body,
        };
        if !head.append(conn, &event).await? {
            return Ok(false);
        }
        insert_hop(
            conn,
            &report.referral_id,
            hop,
            &report.agency,
            millis(at),
            &report.id,
        )
        .await?;
        if let Some(met_by) = met_by_for(hop) {
            meet(
                conn,
                &report.referral_id,
                met_by,
                &report.agency,
                millis(at),
            )
            .await?;
        }
        Ok(true)
    }
}

/// The hop that meets an obligation met by `met_by`.
fn hop_for(met_by: &str) -> &str {
    match met_by {
        "feedback" => "answered",
        other => other,
    }
}

/// What a hop meets.
fn met_by_for(hop: &str) -> Option<&'static str> {
    match hop {
        "delivered" => Some("delivered"),
        "acknowledged" => Some("acknowledged"),
        "answered" => Some("feedback"),
        _ => None,
    }
}

async fn insert_hop(
    conn: &mut AnyConnection,
    referral: &str,
    hop: &str,
    agency: &str,
    at: i64,
    message_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO hops (referral_id, hop, agency, at, message_id) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
        .bind(referral)
        .bind(hop)
        .bind(agency)
        .bind(at)
        .bind(message_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Meets the open obligations of `referral` that `agency`'s `met_by` hop meets.
async fn meet(
    conn: &mut AnyConnection,
    referral: &str,
    met_by: &str,
    agency: &str,
    at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE obligations SET met_at = $1 WHERE referral_id = $2 AND met_by = $3 AND meets_agency = $4 AND met_at IS NULL")
        .bind(at)
        .bind(referral)
        .bind(met_by)
        .bind(agency)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// For reading stored times.
#[must_use]
pub fn time(ms: i64) -> DateTime<Utc> {
    from_millis(ms)
}
