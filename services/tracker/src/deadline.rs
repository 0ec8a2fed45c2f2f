//! The deadline engine. Timers live in the database: a scan marks every
//! obligation whose deadline has passed as overdue and queues one overdue
//! notice per agency the policy names (the `overdue_notices` outbox), in the
//! same transaction; the publisher then sends each queued notice once and
//! records that it did, so neither a second scan nor a restart sends it
//! again. The scan reads the partial index of pending obligations by due
//! time, so its cost grows with what is due, not with what is open.
//!
//! No false overdue notice (issue 16): the engine marks only what fell due
//! before the ledger's *recorded-through watermark*, never merely before
//! now. Each tracker instance publishes a signed marker on the tap every
//! second (and at start); when ingest has committed everything delivered
//! before a marker stamped C, the instance's row in `tracker_watermarks`
//! says it has recorded through C minus the gateways' confirm timeout. The
//! engine takes the least of the rows of the instances seen lately, and
//! marks nothing until this process's own row exists: a backlog after a
//! restart, a database outage or a slow batch holds the engine back instead
//! of letting it declare a met duty overdue.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use refbus_bus::Bus;
use refbus_core::MessageKind;
use refbus_core::envelope::timestamp;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{Envelope, OverdueNotice};
use serde_json::json;
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use prost::Message;
use refbus_bus::Outgoing;
use refbus_core::signing::{SIGNATURE_HEADER, Signed, SigningKeys, TRACKER_ID};
use refbus_gateway::gateway::publish_signed;
use refbus_proto::v1::{Hop, HopReport};

use crate::clock::{Clock, from_millis, millis};
use crate::ledger::{Event, Ledger, LedgerError, Value};
use crate::record::{MARKER_ROUTING_KEY, Metrics};

/// The sender named on overdue notices: the tracker itself, not an agency.
/// It signs them with its own key (`[tracker]` in the directory).
pub const TRACKER_SENDER: &str = refbus_core::signing::TRACKER_ID;

/// Obligations handled per scan transaction.
const SCAN_BATCH: i64 = 500;

/// The longest the engine sleeps without looking (another tracker sharing
/// the database may have added earlier deadlines).
const MAX_SLEEP: chrono::Duration = chrono::Duration::seconds(30);

/// An instance whose row was last refreshed longer ago than this (by the
/// injected clock) no longer holds the engine back: it stopped without
/// removing its row (a crash) and its unacknowledged deliveries have gone
/// back to the tap, to whichever tracker takes them.
pub const STALE_INSTANCE: chrono::Duration = chrono::Duration::minutes(5);

/// How far the ledger is recorded (epoch ms), as the engine may trust it:
/// the least watermark of the instances seen since `now` - [`STALE_INSTANCE`]
/// (this `instance` always counts), or `None` while this instance has
/// recorded no marker yet.
///
/// # Errors
/// A database error.
pub async fn recorded_through(
    ledger: &Ledger,
    instance: &str,
    now: DateTime<Utc>,
) -> Result<Option<i64>, LedgerError> {
    let own = sqlx::query("SELECT recorded_through FROM tracker_watermarks WHERE instance = $1")
        .bind(instance)
        .fetch_optional(&ledger.pool)
        .await?;
    if own.is_none() {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT MIN(recorded_through) AS through FROM tracker_watermarks
         WHERE seen_at >= $1 OR instance = $2",
    )
    .bind(millis(now - STALE_INSTANCE))
    .bind(instance)
    .fetch_one(&ledger.pool)
    .await?;
    Ok(row.try_get::<Option<i64>, _>("through")?)
}

/// Removes this instance's watermark (at a clean stop: it holds nobody
/// back any more).
///
/// # Errors
/// A database error.
pub async fn retire(ledger: &Ledger, instance: &str) -> Result<(), LedgerError> {
    sqlx::query("DELETE FROM tracker_watermarks WHERE instance = $1")
        .bind(instance)
        .execute(&ledger.pool)
        .await?;
    Ok(())
}

/// Marks what fell due by `through` as overdue at `now` (`through` is at
/// most `now`: the recorded-through watermark, see the module doc);
/// returns how many obligations it marked.
///
/// # Errors
/// A database error (nothing of the failed batch is marked).
pub async fn scan(
    ledger: &Ledger,
    now: DateTime<Utc>,
    through: DateTime<Utc>,
    metrics: &Metrics,
) -> Result<usize, LedgerError> {
    let through = through.min(now);
    let mut marked = 0;
    loop {
        let _turn = ledger.write_turn().await;
        let mut tx = ledger.begin_write().await?;
        let mut head = tx.lock_head().await?;
        let due: Vec<(i64, String, String, String, String)> = tx
            .fetch(
                "SELECT referral_at, id, referral_id, rule, notify FROM obligations
                 WHERE met_at IS NULL AND overdue_at IS NULL AND due_at <= $1
                 ORDER BY due_at LIMIT $2",
                &[Value::Int(millis(through)), Value::Int(SCAN_BATCH)],
            )
            .await?;
        if due.is_empty() {
            return Ok(marked);
        }
        let mut ids = Vec::with_capacity(due.len());
        let mut notices = Vec::new();
        let mut events = Vec::with_capacity(due.len());
        for (referral_at, id, referral, rule, notify) in &due {
            for agency in notify.split(',').filter(|a| !a.is_empty()) {
                notices.push([
                    Value::Text(notice_id(id, agency)),
                    id.as_str().into(),
                    agency.into(),
                    Value::NullInt,
                    Value::Int(*referral_at),
                    referral.as_str().into(),
                ]);
            }
            let body = json!({"obligation": id, "rule": rule, "overdue_at": millis(now), "notify": notify}).to_string();
            events.push(head.chain(&Event {
                message_id: &format!("overdue/{id}"),
                event: "overdue",
                referral_id: referral,
                recorded_at: millis(now),
                body,
            }));
            ids.push([
                Value::Int(*referral_at),
                referral.as_str().into(),
                id.as_str().into(),
                Value::Int(millis(now)),
            ]);
        }
        tx.execute_with(
            |marked| {
                format!(
                    "UPDATE obligations SET overdue_at = CAST(v.column4 AS BIGINT) FROM {marked} AS v
                     WHERE obligations.referral_at = v.column1 AND obligations.referral_id = v.column2
                       AND obligations.id = v.column3
                       AND obligations.overdue_at IS NULL AND obligations.met_at IS NULL"
                )
            },
            &ids,
        )
        .await?;
        tx.insert_rows(
            "INSERT INTO overdue_notices (notice_id, obligation_id, agency, published_at, referral_at, referral_id)",
            "ON CONFLICT (notice_id) DO NOTHING",
            &notices,
        )
        .await?;
        tx.insert_rows(
            "INSERT INTO ledger_events (seq, chained_id, event, referral_id, recorded_at, body, prev_hash, hash)",
            "",
            &events,
        )
        .await?;
        tx.store_head(&head).await?;
        tx.commit().await?;
        marked += due.len();
        metrics
            .overdue
            .fetch_add(due.len() as u64, Ordering::Relaxed);
    }
}

/// The id of the overdue notice about `obligation` to `agency`: the same
/// pair always gives the same id, so a notice re-sent after a crash is
/// recognised by the recipient's deduplication.
#[must_use]
pub fn notice_id(obligation: &str, agency: &str) -> String {
    let ns = Uuid::from_u128(0x2d0e_41a7_63b4_4c1e_9f55_1a0c_7e93_b4d2);
    Uuid::new_v5(&ns, format!("{obligation}\u{1f}{agency}").as_bytes()).to_string()
}

/// Publishes every queued overdue notice not yet published; returns how many.
///
/// # Errors
/// A database error; a broker error leaves the notice queued for next time.
pub async fn publish_notices(
    ledger: &Ledger,
    bus: &Bus,
    signing: &SigningKeys,
    now: DateTime<Utc>,
) -> Result<usize, LedgerError> {
    let mut published = 0;
    loop {
        let rows = sqlx::query(
            "SELECT n.notice_id, n.agency, o.id, o.referral_id, o.rule, o.duty, o.bearer, o.due_at
             FROM overdue_notices n JOIN obligations o ON o.referral_at = n.referral_at
               AND o.referral_id = n.referral_id AND o.id = n.obligation_id
             WHERE n.published_at IS NULL ORDER BY n.notice_id LIMIT 200",
        )
        .fetch_all(&ledger.pool)
        .await?;
        if rows.is_empty() {
            return Ok(published);
        }
        for row in &rows {
            let notice_id: String = row.try_get("notice_id")?;
            let agency: String = row.try_get("agency")?;
            let referral: String = row.try_get("referral_id")?;
            let due = from_millis(row.try_get("due_at")?);
            let envelope = Envelope {
                id: notice_id.clone(),
                kind: MessageKind::OverdueNotice as i32,
                sender: TRACKER_SENDER.into(),
                recipient: agency.clone(),
                clock_started_at: Some(timestamp(due)),
                submitted_at: Some(timestamp(now)),
                in_reply_to: referral.clone(),
                idempotency_key: notice_id.clone(),
                payload: Some(Payload::OverdueNotice(OverdueNotice {
                    referral_id: referral,
                    rule_id: row.try_get("rule")?,
                    obligation: row.try_get("duty")?,
                    obligated_agency: row.try_get("bearer")?,
                    due_at: Some(timestamp(due)),
                })),
                ..Envelope::default()
            };
            if let Err(e) = publish_signed(bus, signing, &envelope).await {
                tracing::warn!(error = %e, "overdue notice not published yet; will retry");
                return Ok(published);
            }
            sqlx::query("UPDATE overdue_notices SET published_at = $1 WHERE notice_id = $2")
                .bind(millis(now))
                .bind(&notice_id)
                .execute(&ledger.pool)
                .await?;
            published += 1;
            tracing::info!(notice = %notice_id, %agency, "overdue notice sent");
        }
    }
}

/// The earliest deadline still pending, if any.
///
/// # Errors
/// A database error.
pub async fn next_due(ledger: &Ledger) -> Result<Option<DateTime<Utc>>, LedgerError> {
    let row = sqlx::query(
        "SELECT MIN(due_at) AS due FROM obligations WHERE met_at IS NULL AND overdue_at IS NULL",
    )
    .fetch_one(&ledger.pool)
    .await?;
    let due: Option<i64> = row.try_get("due")?;
    Ok(due.map(from_millis))
}

/// How the recorder wakes the engine: only when a new obligation falls due
/// before the engine's next wake-up, so that a stream of new referrals does
/// not make it rescan (and take the ledger's write turn) once per batch.
#[derive(Debug)]
pub struct Wake {
    notify: Notify,
    /// When the engine will next wake (epoch ms); `i64::MAX` while it is
    /// awake, so that what commits meanwhile wakes it once more.
    next_ms: AtomicI64,
    /// The earliest deadline the engine is holding back because the
    /// watermark has not passed it (epoch ms; `i64::MAX`: none).
    held_ms: AtomicI64,
}

impl Default for Wake {
    fn default() -> Self {
        Self {
            notify: Notify::new(),
            next_ms: AtomicI64::new(i64::MAX),
            held_ms: AtomicI64::new(i64::MAX),
        }
    }
}

impl Wake {
    /// A committed obligation is due at `due_ms`.
    pub fn obligation_due(&self, due_ms: i64) {
        if due_ms < self.next_ms.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }

    /// Wakes the engine now.
    pub fn now(&self) {
        self.notify.notify_one();
    }

    /// This instance has recorded through `through_ms`: wakes the engine
    /// if it was holding a deadline back that this passes.
    pub fn recorded_through(&self, through_ms: i64) {
        if through_ms >= self.held_ms.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }
}

/// Runs the engine until shutdown: scan what fell due before the
/// recorded-through watermark, publish, sleep until the next deadline (or
/// until woken by a new obligation or a watermark that passes a held-back
/// deadline, or [`MAX_SLEEP`]).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ledger: Arc<Ledger>,
    bus: Bus,
    signing: Arc<SigningKeys>,
    clock: Clock,
    metrics: Arc<Metrics>,
    wake: Arc<Wake>,
    instance: String,
    shutdown: CancellationToken,
) {
    loop {
        wake.next_ms.store(i64::MAX, Ordering::Release);
        let now = clock.now();
        let outcome = async {
            let through = recorded_through(&ledger, &instance, now).await?;
            // Marked at the time of marking, not of waking: what was
            // recorded meanwhile must not look overdue before it arrived.
            let marked_at = clock.now();
            let marked = match through {
                Some(through) => scan(&ledger, marked_at, from_millis(through), &metrics).await?,
                None => 0,
            };
            let sent = publish_notices(&ledger, &bus, &signing, clock.now()).await?;
            if marked + sent > 0 {
                tracing::info!(marked, sent, "deadline scan");
            }
            Ok::<_, LedgerError>((next_due(&ledger).await?, through))
        }
        .await;
        let mut held = false;
        let mut failed = false;
        let until = match outcome {
            Ok((Some(due), through)) => {
                // A deadline passed that the watermark has not: held back
                // until this instance records further (or, for another
                // instance's lag, the next poll).
                if due <= now && through.is_none_or(|t| millis(due) > t) {
                    held = true;
                    wake.held_ms.store(millis(due), Ordering::Release);
                    tracing::debug!(due = %due, "deadline held back: not recorded that far yet");
                }
                due.min(now + MAX_SLEEP)
            }
            Ok((None, _)) => now + MAX_SLEEP,
            Err(e) => {
                // Retried in a second of real time: an injected clock
                // need not move meanwhile.
                tracing::warn!(error = %e, "deadline scan failed; retrying");
                failed = true;
                now + chrono::Duration::seconds(1)
            }
        };
        if !held {
            wake.held_ms.store(i64::MAX, Ordering::Release);
        }
        // Notices that could not be published are retried soon, a
        // held-back deadline is looked at again, and so is a failed scan.
        let retry = tokio::time::sleep(Duration::from_secs(1));
        let pending_notices = held || failed || has_unpublished(&ledger).await;
        wake.next_ms.store(millis(until), Ordering::Release);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = clock.sleep_until(until), if !held && !failed => {}
            () = wake.notify.notified() => {}
            () = retry, if pending_notices => {}
        }
    }
}

/// Publishes this instance's recorded-through marker on the tap at start
/// and every second until shutdown: a hop report by [`TRACKER_ID`] (signed
/// with its key), stamped with the injected clock's time before it is
/// published. When ingest commits the marker's batch, everything delivered
/// before it has committed too. A marker that cannot be published is
/// skipped; the next one follows a second later.
pub async fn publish_markers(
    bus: Bus,
    signing: Arc<SigningKeys>,
    clock: Clock,
    instance: String,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let exchange = bus.topology().deliveries_exchange();
    for n in 1_u64.. {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let marker = HopReport {
            id: format!("{instance}/{n}"),
            referral_id: instance.clone(),
            hop: Hop::Unspecified as i32,
            agency: TRACKER_ID.into(),
            at: Some(timestamp(clock.now())),
        };
        let body = marker.encode_to_vec();
        let signature = match signing.sign(TRACKER_ID, Signed::HopReport, &body) {
            Ok(signature) => signature,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign recorded-through markers; overdue obligations will not be marked");
                return;
            }
        };
        let mut message = Outgoing::new(&exchange, MARKER_ROUTING_KEY, &body);
        message.message_id = Some(&marker.id);
        message.kind = Some("recorded_through");
        message.content_type = "application/x-protobuf; proto=refbus.v1.HopReport";
        message.headers = vec![(SIGNATURE_HEADER, signature)];
        if let Err(e) = bus.publish(message).await {
            tracing::debug!(error = %e, "recorded-through marker not published; the next follows");
        }
    }
}

async fn has_unpublished(ledger: &Ledger) -> bool {
    sqlx::query("SELECT notice_id FROM overdue_notices WHERE published_at IS NULL LIMIT 1")
        .fetch_optional(&ledger.pool)
        .await
        .ok()
        .flatten()
        .is_some()
}
