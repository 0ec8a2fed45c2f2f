//! The lawyer service's own state, on disk (SQLite, beside the inbox state
//! of [`crate::acknowledged`]): the register of lawyers, each lawyer's inbox
//! and what each lawyer submitted.
//!
//! - `lawyers`: one row per licence, as its registrar last registered it,
//!   with the registration envelope's bytes and signature as received (what
//!   `LawyerRegistry.GetLawyer` shows, so that a centre's service checks the
//!   keys against the registrar's signature, not this service's word), the
//!   SHA-256 of the lawyer's bearer token (never the token) and the current
//!   status.
//! - `lawyer_inbox`: one row per (licence, envelope id), so a broker message
//!   delivered again is stored once; its state (`pending`, `handed`,
//!   `acknowledged`) and when it arrived, was first handed over and was
//!   acknowledged. What is acknowledged is never handed over again, also
//!   after a restart. Letters are stored as they arrived: sealed to the
//!   lawyer's keys (CQ-1.1c), never readable here.
//! - `lawyer_submissions`: the messages each lawyer submitted (id, kind,
//!   recipient), so that a rating names the lawyer's own meeting request
//!   (CQ-3.11b).

use std::path::{Path, PathBuf};

use sqlx::Row;
use sqlx::sqlite::SqlitePool;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("lawyer service state {path}: {reason}")]
pub struct StoreError {
    path: String,
    reason: String,
}

const SCHEMA: [&str; 5] = [
    "CREATE TABLE IF NOT EXISTS lawyers (
        licence TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        law_firm TEXT NOT NULL,
        region TEXT NOT NULL,
        letter_keys TEXT NOT NULL,
        token_sha256 TEXT NOT NULL,
        status INTEGER NOT NULL,
        status_reason TEXT NOT NULL,
        status_by TEXT NOT NULL,
        registered_by TEXT NOT NULL,
        registration BLOB NOT NULL,
        signature TEXT NOT NULL,
        updated_at BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS lawyers_by_token ON lawyers (token_sha256)",
    "CREATE TABLE IF NOT EXISTS lawyer_inbox (
        licence TEXT NOT NULL,
        envelope_id TEXT NOT NULL,
        envelope BLOB NOT NULL,
        kind TEXT NOT NULL,
        sender TEXT NOT NULL,
        referral TEXT NOT NULL,
        in_reply_to TEXT NOT NULL,
        state TEXT NOT NULL,
        arrived_at BIGINT NOT NULL,
        handed_at BIGINT,
        acknowledged_at BIGINT,
        PRIMARY KEY (licence, envelope_id)
    )",
    "CREATE INDEX IF NOT EXISTS lawyer_inbox_open ON lawyer_inbox (licence, state, arrived_at)",
    "CREATE TABLE IF NOT EXISTS lawyer_submissions (
        licence TEXT NOT NULL,
        envelope_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        recipient TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (licence, envelope_id)
    )",
];

/// Where the lawyer service keeps its state: beside the inbox state file
/// (`var/inbox.db` gives `var/inbox-lawyers.db`), so that every deployment
/// and test that gives the services a data place of their own gives this
/// one too.
#[must_use]
pub fn path_beside(inbox_db: &Path) -> PathBuf {
    let stem = inbox_db
        .file_stem()
        .map_or_else(|| "inbox".into(), |s| s.to_string_lossy().into_owned());
    inbox_db.with_file_name(format!("{stem}-lawyers.db"))
}

/// A registered lawyer, as the register holds them now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LawyerRecord {
    pub licence: String,
    pub name: String,
    pub law_firm: String,
    pub region: String,
    pub letter_keys: Vec<String>,
    /// Hex SHA-256 (lower case) of the bearer token issued at registration.
    pub token_sha256: String,
    /// `LawyerStatus` as its wire number.
    pub status: i32,
    pub status_reason: String,
    /// Who last set the status.
    pub status_by: String,
    pub registered_by: String,
    /// The registration envelope as its registrar signed it.
    pub registration: Vec<u8>,
    pub signature: String,
    pub updated_at_ms: i64,
}

/// One envelope for one lawyer's inbox.
#[derive(Clone, Debug)]
pub struct InboxRow {
    pub licence: String,
    pub envelope_id: String,
    pub envelope: Vec<u8>,
    pub kind: String,
    pub sender: String,
    /// The id the tracker files it under (hops are reported on it).
    pub referral: String,
    pub in_reply_to: String,
}

/// An envelope in a lawyer's inbox not yet acknowledged.
#[derive(Clone, Debug)]
pub struct OpenDelivery {
    pub envelope_id: String,
    pub envelope: Vec<u8>,
    pub kind: String,
    pub referral: String,
    /// Whether it was handed over before (on a stream that ended unacknowledged).
    pub handed_before: bool,
}

/// The lawyer service's tables.
pub struct LawyerStore {
    pool: SqlitePool,
}

impl LawyerStore {
    /// Opens (creating if needed) the store at `path`.
    ///
    /// # Errors
    /// [`StoreError`] naming the file.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let fail = |reason: String| StoreError {
            path: path.display().to_string(),
            reason,
        };
        let pool = crate::acknowledged::open_sqlite(path, 4, &SCHEMA)
            .await
            .map_err(fail)?;
        Ok(Self { pool })
    }

    /// The lawyer registered under `licence`, if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn lawyer(&self, licence: &str) -> Result<Option<LawyerRecord>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM lawyers WHERE licence = ?")
            .bind(licence)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let keys: String = row.try_get("letter_keys")?;
            Ok(LawyerRecord {
                licence: row.try_get("licence")?,
                name: row.try_get("name")?,
                law_firm: row.try_get("law_firm")?,
                region: row.try_get("region")?,
                letter_keys: keys
                    .split('\n')
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect(),
                token_sha256: row.try_get("token_sha256")?,
                status: i32::try_from(row.try_get::<i64, _>("status")?).unwrap_or_default(),
                status_reason: row.try_get("status_reason")?,
                status_by: row.try_get("status_by")?,
                registered_by: row.try_get("registered_by")?,
                registration: row.try_get("registration")?,
                signature: row.try_get("signature")?,
                updated_at_ms: row.try_get("updated_at")?,
            })
        })
        .transpose()
    }

    /// The licence whose bearer token has this SHA-256 (hex), if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn licence_of_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT licence FROM lawyers WHERE token_sha256 = ?")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await
    }

    /// Registers `lawyer` (or registers them again), replacing the entry.
    ///
    /// # Errors
    /// A database error (nothing changed).
    pub async fn register(&self, lawyer: &LawyerRecord) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO lawyers (licence, name, law_firm, region, letter_keys, token_sha256, status,
                status_reason, status_by, registered_by, registration, signature, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (licence) DO UPDATE SET name = excluded.name, law_firm = excluded.law_firm,
                region = excluded.region, letter_keys = excluded.letter_keys,
                token_sha256 = excluded.token_sha256, status = excluded.status,
                status_reason = excluded.status_reason, status_by = excluded.status_by,
                registered_by = excluded.registered_by, registration = excluded.registration,
                signature = excluded.signature, updated_at = excluded.updated_at",
        )
        .bind(&lawyer.licence)
        .bind(&lawyer.name)
        .bind(&lawyer.law_firm)
        .bind(&lawyer.region)
        .bind(lawyer.letter_keys.join("\n"))
        .bind(&lawyer.token_sha256)
        .bind(i64::from(lawyer.status))
        .bind(&lawyer.status_reason)
        .bind(&lawyer.status_by)
        .bind(&lawyer.registered_by)
        .bind(&lawyer.registration)
        .bind(&lawyer.signature)
        .bind(lawyer.updated_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Changes only the status of a registered lawyer.
    ///
    /// # Errors
    /// A database error (nothing changed).
    pub async fn set_status(
        &self,
        licence: &str,
        status: i32,
        reason: &str,
        by: &str,
        at_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE lawyers SET status = ?, status_reason = ?, status_by = ?, updated_at = ? WHERE licence = ?",
        )
        .bind(i64::from(status))
        .bind(reason)
        .bind(by)
        .bind(at_ms)
        .bind(licence)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores envelopes in lawyers' inboxes, in one transaction; a row
    /// already there (a redelivered broker message) is kept as it is, with
    /// its state.
    ///
    /// # Errors
    /// A database error (nothing stored).
    pub async fn deliver(&self, rows: &[InboxRow], at_ms: i64) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for row in rows {
            sqlx::query(
                "INSERT INTO lawyer_inbox (licence, envelope_id, envelope, kind, sender, referral,
                    in_reply_to, state, arrived_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)
                 ON CONFLICT (licence, envelope_id) DO NOTHING",
            )
            .bind(&row.licence)
            .bind(&row.envelope_id)
            .bind(&row.envelope)
            .bind(&row.kind)
            .bind(&row.sender)
            .bind(&row.referral)
            .bind(&row.in_reply_to)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Up to `limit` of `licence`'s deliveries not yet acknowledged, oldest first.
    ///
    /// # Errors
    /// A database error.
    pub async fn open_deliveries(
        &self,
        licence: &str,
        limit: usize,
    ) -> Result<Vec<OpenDelivery>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT envelope_id, envelope, kind, referral, handed_at FROM lawyer_inbox
             WHERE licence = ? AND state <> 'acknowledged'
             ORDER BY arrived_at, rowid LIMIT ?",
        )
        .bind(licence)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(OpenDelivery {
                    envelope_id: row.try_get("envelope_id")?,
                    envelope: row.try_get("envelope")?,
                    kind: row.try_get("kind")?,
                    referral: row.try_get("referral")?,
                    handed_before: row.try_get::<Option<i64>, _>("handed_at")?.is_some(),
                })
            })
            .collect()
    }

    /// Records that a delivery is being handed over (the first time is
    /// kept); false when it was acknowledged meanwhile (it is not handed
    /// over then).
    ///
    /// # Errors
    /// A database error.
    pub async fn handed(
        &self,
        licence: &str,
        envelope_id: &str,
        at_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE lawyer_inbox SET handed_at = COALESCE(handed_at, ?), state = 'handed'
             WHERE licence = ? AND envelope_id = ? AND state <> 'acknowledged'",
        )
        .bind(at_ms)
        .bind(licence)
        .bind(envelope_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks deliveries of `licence` acknowledged, in one transaction; once
    /// this returns they are never handed over again.
    ///
    /// # Errors
    /// A database error (none is marked).
    pub async fn acknowledge(
        &self,
        licence: &str,
        envelope_ids: &[String],
        at_ms: i64,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for id in envelope_ids {
            sqlx::query(
                "UPDATE lawyer_inbox SET state = 'acknowledged', acknowledged_at = ?
                 WHERE licence = ? AND envelope_id = ? AND state <> 'acknowledged'",
            )
            .bind(at_ms)
            .bind(licence)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// The envelopes in `licence`'s inbox (any state) that answer `referral`.
    ///
    /// # Errors
    /// A database error.
    pub async fn replies_to(
        &self,
        licence: &str,
        referral: &str,
    ) -> Result<Vec<Vec<u8>>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT envelope FROM lawyer_inbox WHERE licence = ? AND in_reply_to = ? ORDER BY arrived_at",
        )
        .bind(licence)
        .bind(referral)
        .fetch_all(&self.pool)
        .await
    }

    /// Records what a lawyer submitted (once per id).
    ///
    /// # Errors
    /// A database error.
    pub async fn submitted(
        &self,
        licence: &str,
        envelope_id: &str,
        kind: &str,
        recipient: &str,
        at_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO lawyer_submissions (licence, envelope_id, kind, recipient, at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(licence)
        .bind(envelope_id)
        .bind(kind)
        .bind(recipient)
        .bind(at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The kind and recipient of what `licence` submitted as `envelope_id`.
    ///
    /// # Errors
    /// A database error.
    pub async fn submission(
        &self,
        licence: &str,
        envelope_id: &str,
    ) -> Result<Option<(String, String)>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT kind, recipient FROM lawyer_submissions WHERE licence = ? AND envelope_id = ?",
        )
        .bind(licence)
        .bind(envelope_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((row.try_get("kind")?, row.try_get("recipient")?)))
            .transpose()
    }

    /// Closes the store.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_lies_beside_the_inbox_state() {
        assert_eq!(
            path_beside(Path::new("var/inbox.db")),
            PathBuf::from("var/inbox-lawyers.db")
        );
        assert_eq!(
            path_beside(Path::new("/tmp/refbus-inbox-t1.db")),
            PathBuf::from("/tmp/refbus-inbox-t1-lawyers.db")
        );
    }
}
