//! Audit: walks the hash chain of `ledger_events` and names the first link
//! that does not hold; then checks every stored envelope against the hash
//! its event recorded, so an edited referral row is named too.
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
    loop {
        let rows = sqlx::query(
            "SELECT seq, message_id, event, referral_id, recorded_at, body, prev_hash, hash
             FROM ledger_events WHERE seq >= $1 ORDER BY seq LIMIT $2",
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
            let message_id: String = row.try_get("message_id")?;
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
            let hash = chain_hash(
                seq,
                &message_id,
                &row.try_get::<String, _>("event")?,
                &row.try_get::<String, _>("referral_id")?,
                row.try_get("recorded_at")?,
                &row.try_get::<String, _>("body")?,
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

    let mut envelopes = 0;
    let mut after = String::new();
    loop {
        let rows = sqlx::query(
            "SELECT r.id, r.envelope, e.body, e.seq FROM referrals r JOIN ledger_events e ON e.message_id = r.id
             WHERE r.id > $1 ORDER BY r.id LIMIT $2",
        )
        .bind(&after)
        .bind(PAGE)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let id: String = row.try_get("id")?;
            let encoded: String = row.try_get("envelope")?;
            let body: String = row.try_get("body")?;
            let seq: i64 = row.try_get("seq")?;
            let recorded = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("envelope_sha256")
                        .and_then(|h| h.as_str().map(str::to_owned))
                });
            let actual = base64::engine::general_purpose::STANDARD
                .decode(&encoded)
                .ok()
                .map(|b| sha256_hex(&b));
            if recorded.is_none() || recorded != actual {
                return Ok(Verdict::Broken {
                    table: "referrals",
                    row: format!("id {id}"),
                    problem: format!(
                        "its envelope does not match the hash recorded in ledger_events seq {seq}"
                    ),
                });
            }
            envelopes += 1;
            after = id;
        }
    }
    Ok(Verdict::Intact {
        events: expected - 1,
        envelopes,
    })
}
