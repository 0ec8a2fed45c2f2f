//! Audit: walks the hash chain of `ledger_events` and names the first link
//! that does not hold; on the way, checks each envelope's stored referral
//! against the hash its event recorded, so an edited or deleted referral
//! row is named too; then that no referral row is without its event.
//!
//! An envelope's event leads to its referral through `referrals.id`, the
//! one index on an envelope's id (migration 0006).
//!
//! The audit reads one snapshot of the ledger (a read-only transaction,
//! `REPEATABLE READ` on PostgreSQL), so a tracker recording meanwhile never
//! makes the head and the chain's end disagree.

use base64::Engine;
use sqlx::Row;

use crate::ledger::{Backend, Ledger, LedgerError, chain_hash, sha256_hex};

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        events: i64,
        envelopes: i64,
    },
    /// The first broken link: the table, the row and what is wrong.
    Broken {
        table: &'static str,
        row: String,
        problem: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Intact { events, envelopes } => {
                write!(
                    f,
                    "ledger intact: {events} chained events, {envelopes} envelopes match their events"
                )
            }
            Verdict::Broken {
                table,
                row,
                problem,
            } => write!(f, "ledger broken at {table} {row}: {problem}"),
        }
    }
}

const PAGE: i64 = 10_000;

/// An envelope's event body holds its envelope's SHA-256 under this key.
const ENVELOPE_HASH: &str = "envelope_sha256";

/// The envelope hash an event's body recorded, when the event is that of
/// an envelope stored as a referral row (its body, already checked against
/// the chain, has [`ENVELOPE_HASH`] at its top level and no `relay_of`: a
/// relay is filed under its lead, as a hop, with no row of its own);
/// `Some(None)` when that field is not text.
fn recorded_envelope_hash(body: &str) -> Option<Option<String>> {
    // Most events are not an envelope's: only a body naming the key is read.
    if !body.contains(ENVELOPE_HASH) {
        return None;
    }
    let value = serde_json::from_str::<serde_json::Value>(body).ok()?;
    if value.get("relay_of").is_some() {
        return None;
    }
    let hash = value.get(ENVELOPE_HASH)?;
    Some(hash.as_str().map(str::to_owned))
}

/// What is wrong with the referral an envelope's event leads to, if
/// anything: it must exist (`stored`, base64 of the envelope) and its
/// envelope must have the `recorded` hash.
fn envelope_problem(recorded: Option<&str>, stored: Option<&str>, seq: i64) -> Option<String> {
    let Some(encoded) = stored else {
        return Some(format!(
            "missing: ledger_events seq {seq} chained its envelope"
        ));
    };
    let actual = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .map(|b| sha256_hex(&b));
    (recorded.is_none() || recorded != actual.as_deref()).then(|| {
        format!("its envelope does not match the hash recorded in ledger_events seq {seq}")
    })
}

/// Verifies the whole ledger.
///
/// # Errors
/// A database error.
pub async fn verify(ledger: &Ledger) -> Result<Verdict, LedgerError> {
    verify_reporting(ledger, &|_| {}).await
}

/// How many ledger events there are to verify (for a progress bar).
///
/// # Errors
/// A database error.
pub async fn event_count(ledger: &Ledger) -> Result<u64, LedgerError> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_events")
        .fetch_one(&ledger.pool)
        .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Verifies the whole ledger, calling `progress` with the number of
/// events verified so far after each page.
///
/// # Errors
/// A database error.
pub async fn verify_reporting(
    ledger: &Ledger,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Verdict, LedgerError> {
    let mut tx = ledger.pool.begin().await?;
    if ledger.backend == Backend::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
    }
    let mut prev = String::new();
    let mut expected = 1_i64;
    let mut envelopes = 0_i64;
    loop {
        let rows = sqlx::query(
            "SELECT e.seq, e.chained_id, e.event, e.referral_id, e.recorded_at, e.body, e.prev_hash,
                    e.hash, r.envelope
             FROM ledger_events e LEFT JOIN referrals r ON r.id = e.chained_id
             WHERE e.seq >= $1 ORDER BY e.seq LIMIT $2",
        )
        .bind(expected)
        .bind(PAGE)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let message_id: String = row.try_get("chained_id")?;
            let name = format!("seq {seq} (message {message_id})");
            if seq != expected {
                return Ok(Verdict::Broken {
                    table: "ledger_events",
                    row: format!("seq {expected}"),
                    problem: format!("missing; the next row is seq {seq}"),
                });
            }
            let prev_hash: String = row.try_get("prev_hash")?;
            if prev_hash != prev {
                return Ok(Verdict::Broken {
                    table: "ledger_events",
                    row: name,
                    problem: "prev_hash does not match the hash of the row before".into(),
                });
            }
            let body: String = row.try_get("body")?;
            let hash = chain_hash(
                seq,
                &message_id,
                &row.try_get::<String, _>("event")?,
                &row.try_get::<String, _>("referral_id")?,
                row.try_get("recorded_at")?,
                &body,
                &prev_hash,
            );
            let stored: String = row.try_get("hash")?;
            if hash != stored {
                return Ok(Verdict::Broken {
                    table: "ledger_events",
                    row: name,
                    problem: "its contents do not match its hash".into(),
                });
            }
            if let Some(recorded) = recorded_envelope_hash(&body) {
                let stored: Option<String> = row.try_get("envelope")?;
                if let Some(problem) = envelope_problem(recorded.as_deref(), stored.as_deref(), seq)
                {
                    return Ok(Verdict::Broken {
                        table: "referrals",
                        row: format!("id {message_id}"),
                        problem,
                    });
                }
                envelopes += 1;
            }
            prev = stored;
            expected += 1;
        }
        progress(u64::try_from(expected - 1).unwrap_or(0));
    }
    let head = sqlx::query("SELECT seq, hash FROM ledger_head WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    let (head_seq, head_hash): (i64, String) = (head.try_get("seq")?, head.try_get("hash")?);
    if head_seq != expected - 1 || head_hash != prev {
        return Ok(Verdict::Broken {
            table: "ledger_head",
            row: "id 1".into(),
            problem: format!(
                "says seq {head_seq}, the chain ends at seq {}",
                expected - 1
            ),
        });
    }

    // Every referral row came with its envelope's event: a row the chain
    // does not lead to was added, or its event taken out.
    let referrals: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM referrals")
        .fetch_one(&mut *tx)
        .await?;
    if referrals != envelopes {
        let unchained: Option<String> = sqlx::query_scalar(
            "SELECT r.id FROM referrals r
             WHERE NOT EXISTS (SELECT 1 FROM ledger_events e WHERE e.chained_id = r.id)
             ORDER BY r.id LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        return Ok(Verdict::Broken {
            table: "referrals",
            row: unchained.map_or_else(|| "?".to_owned(), |id| format!("id {id}")),
            problem: format!(
                "{referrals} referral rows against {envelopes} chained envelope events: a row without its event"
            ),
        });
    }
    Ok(Verdict::Intact {
        events: expected - 1,
        envelopes,
    })
}
