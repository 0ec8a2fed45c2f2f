//! What each agency's system has acknowledged, kept on disk (SQLite), so
//! that an `Inbox` never hands it the same message id again once that id
//! was acknowledged: not when a retried `Submit` published it twice, not
//! when a broker ack was lost, not after a restart. Ids are kept for
//! [`RETENTION`], far longer than any client retries a submission.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// How long an acknowledged id is remembered.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("inbox state {path}: {reason}")]
pub struct AcknowledgedError {
    path: String,
    reason: String,
}

/// The acknowledged ids of the agencies of this process.
pub struct Acknowledged {
    pool: SqlitePool,
}

impl Acknowledged {
    /// Opens (creating if needed) the store at `path` and forgets ids older
    /// than [`RETENTION`].
    ///
    /// # Errors
    /// [`AcknowledgedError`] naming the file.
    pub async fn open(path: &Path) -> Result<Self, AcknowledgedError> {
        let fail = |reason: String| AcknowledgedError {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| fail(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|e| fail(e.to_string()))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS acknowledged (
                agency TEXT NOT NULL,
                message_id TEXT NOT NULL,
                at BIGINT NOT NULL,
                PRIMARY KEY (agency, message_id)
            )",
        )
        .execute(&pool)
        .await
        .map_err(|e| fail(e.to_string()))?;
        let store = Self { pool };
        store
            .forget_before(now_ms() - i64::try_from(RETENTION.as_millis()).unwrap_or(i64::MAX))
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(store)
    }

    /// Whether `agency`'s system acknowledged `message_id`.
    ///
    /// # Errors
    /// A database error.
    pub async fn contains(&self, agency: &str, message_id: &str) -> Result<bool, sqlx::Error> {
        Ok(
            sqlx::query("SELECT 1 FROM acknowledged WHERE agency = ? AND message_id = ?")
                .bind(agency)
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Records that `agency`'s system acknowledged `message_id` (once).
    ///
    /// # Errors
    /// A database error.
    pub async fn record(&self, agency: &str, message_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO acknowledged (agency, message_id, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(agency)
        .bind(message_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets ids acknowledged before `cutoff_ms`.
    async fn forget_before(&self, cutoff_ms: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM acknowledged WHERE at < ?")
            .bind(cutoff_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Closes the store.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
