//! What each agency's system has acknowledged, kept on disk (SQLite), so
//! that an `Inbox` never hands it the same message id again once that id
//! was acknowledged: not when a retried `Submit` published it twice, not
//! when a broker ack was lost, not after a restart. Ids are kept for
//! [`RETENTION`], far longer than any client retries a submission.
//!
//! Beside each acknowledged id it keeps what the agency received: the
//! referral's id and where an answer to it goes ([`Received`]), with no
//! content. That is the gateway's proof of receipt: a reply (acknowledgement,
//! feedback, relay) is accepted only from an agency that received the
//! referral, whatever the client claims (issue 16). Those rows are kept as
//! long as the store (an answer may come months later).
//!
//! Acknowledgements are written with group commit: one writer task takes
//! every acknowledgement waiting and records them in one transaction, so
//! that concurrent `Acknowledge` calls share one disk sync instead of
//! queueing for one each. Each call returns only once its own id is on disk.
//! The writer has a connection of its own, apart from the readers' (the
//! inbox's look-ups): in WAL mode a connection drops its whole page cache
//! whenever another one has committed, so a writer that took any connection
//! of a shared pool found its pages cold nearly every group (issue 17).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::sync::{mpsc, oneshot};

use crate::inbox::Received;

/// How long an acknowledged id is remembered.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("inbox state {path}: {reason}")]
pub struct AcknowledgedError {
    path: String,
    reason: String,
}

/// The store's tables: acknowledged ids (forgotten after [`RETENTION`]),
/// and what each agency received, kept.
const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS acknowledged (
        agency TEXT NOT NULL,
        message_id TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (agency, message_id)
    )",
    "CREATE TABLE IF NOT EXISTS received (
        agency TEXT NOT NULL,
        referral TEXT NOT NULL,
        kind TEXT NOT NULL,
        reply_to TEXT NOT NULL,
        relays TEXT NOT NULL,
        answers INTEGER NOT NULL,
        payload_digest TEXT NOT NULL,
        at BIGINT NOT NULL,
        from_lawyer TEXT NOT NULL DEFAULT '',
        complainant TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (agency, referral)
    )",
];

/// Columns added to `received` since it was first shipped (issue 18: the
/// lawyer an answer goes to), each added to a store made before it. A row
/// from before holds no lawyer: its answers go to agencies only, as then.
const ADDED_COLUMNS: [(&str, &str); 2] = [
    ("from_lawyer", "TEXT NOT NULL DEFAULT ''"),
    ("complainant", "TEXT NOT NULL DEFAULT ''"),
];

/// Most acknowledgements recorded in one transaction.
const GROUP: usize = 500;

/// Most ids looked up by one statement (anonymous `?`: SQLite binds
/// numbered parameters by a linear scan).
const CHUNK: usize = 100;

/// An acknowledgement waiting for the writer, and who to tell once it is on disk.
struct Pending {
    agency: String,
    message_id: String,
    received: Option<Received>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The acknowledged ids of the agencies of this process.
pub struct Acknowledged {
    /// The readers: an inbox's look-ups, a reply's proof of receipt.
    pool: SqlitePool,
    /// The writer's one connection (group commits, forgetting old ids).
    writing: SqlitePool,
    writer: mpsc::Sender<Pending>,
}

/// Opens (creating it and its directory if needed) a service's SQLite file
/// at `path` in WAL mode, and runs `schema`'s statements: what the
/// acknowledged store and the lawyer service's store share.
///
/// # Errors
/// The reason, for the caller's error naming the file.
pub(crate) async fn open_sqlite(
    path: &Path,
    max_connections: u32,
    schema: &[&str],
) -> Result<SqlitePool, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .map_err(|e| e.to_string())?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10))
        // A multi-row insert's statement journal stays in memory instead
        // of a temporary file written for every batch (issue 17).
        .pragma("temp_store", "MEMORY")
        // 16 MiB of pages cached per connection: the id look-ups of an
        // inbox's batches read from memory, not from the file.
        .pragma("cache_size", "-16384");
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        // A local file: no ping before every query (it cost a round trip
        // to the connection's thread each, issue 17).
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(|e| e.to_string())?;
    for statement in schema {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(pool)
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
        let writing = open_sqlite(path, 1, &SCHEMA).await.map_err(fail)?;
        add_columns(&writing)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let pool = open_sqlite(path, 2, &[]).await.map_err(fail)?;
        let (writer, queue) = mpsc::channel(4 * GROUP);
        tokio::spawn(write_groups(writing.clone(), queue));
        let store = Self {
            pool,
            writing,
            writer,
        };
        store
            .forget_before(now_ms() - i64::try_from(RETENTION.as_millis()).unwrap_or(i64::MAX))
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(store)
    }

    /// Which of `message_ids` `agency`'s system acknowledged: one query
    /// for an inbox's whole batch of deliveries.
    ///
    /// # Errors
    /// A database error.
    pub async fn contains_any(
        &self,
        agency: &str,
        message_ids: &[&str],
    ) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        use sqlx::Row;
        let mut found = std::collections::HashSet::new();
        for chunk in message_ids.chunks(CHUNK) {
            let mut sql = String::from(
                "SELECT message_id FROM acknowledged WHERE agency = ? AND message_id IN (",
            );
            for i in 0..chunk.len() {
                sql.push_str(if i == 0 { "?" } else { ", ?" });
            }
            sql.push(')');
            let mut query = sqlx::query(&sql).bind(agency);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&self.pool).await? {
                found.insert(row.try_get::<String, _>("message_id")?);
            }
        }
        Ok(found)
    }

    /// What `agency` received of `referral`, if it acknowledged a delivery
    /// of it.
    ///
    /// # Errors
    /// A database error.
    pub async fn received(
        &self,
        agency: &str,
        referral: &str,
    ) -> Result<Option<Received>, sqlx::Error> {
        use sqlx::Row;
        let row = sqlx::query(
            "SELECT kind, reply_to, relays, answers, payload_digest, from_lawyer, complainant FROM received WHERE agency = ? AND referral = ?",
        )
        .bind(agency)
        .bind(referral)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let relays: String = row.try_get("relays")?;
            Ok(Received {
                referral: referral.to_owned(),
                kind: row.try_get("kind")?,
                reply_to: row.try_get("reply_to")?,
                relays: relays
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(str::to_owned)
                    .collect(),
                answers: row.try_get::<i64, _>("answers")? != 0,
                payload_digest: row.try_get("payload_digest")?,
                from_lawyer: row.try_get("from_lawyer")?,
                complainant: row.try_get("complainant")?,
            })
        })
        .transpose()
    }

    /// Records that `agency`'s system acknowledged `message_id` (once), and
    /// what it thereby received, returning once it is on disk.
    ///
    /// # Errors
    /// Why it could not be recorded (a database error, or the store closed).
    pub async fn record(
        &self,
        agency: &str,
        message_id: &str,
        received: Option<Received>,
    ) -> Result<(), String> {
        let (done, recorded) = oneshot::channel();
        self.writer
            .send(Pending {
                agency: agency.to_owned(),
                message_id: message_id.to_owned(),
                received,
                done,
            })
            .await
            .map_err(|_| "the acknowledgement store is closed".to_owned())?;
        recorded
            .await
            .map_err(|_| "the acknowledgement store is closed".to_owned())?
    }

    /// Forgets ids acknowledged before `cutoff_ms`.
    async fn forget_before(&self, cutoff_ms: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM acknowledged WHERE at < ?")
            .bind(cutoff_ms)
            .execute(&self.writing)
            .await?;
        Ok(())
    }

    /// Closes the store.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writing.close().await;
    }
}

/// The writer: records every acknowledgement waiting (at most [`GROUP`])
/// in one transaction, then tells each caller.
async fn write_groups(pool: SqlitePool, mut queue: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(GROUP);
    while queue.recv_many(&mut group, GROUP).await > 0 {
        let result = write_group(&pool, &group).await.map_err(|e| e.to_string());
        for pending in group.drain(..) {
            let _ = pending.done.send(result.clone());
        }
    }
}

/// Records `group` in one transaction sent to SQLite as one multi-statement
/// query (`BEGIN IMMEDIATE; INSERT …; INSERT …; COMMIT`): one hand-off to
/// the connection's thread instead of one per statement. At a light load,
/// where every group holds one acknowledgement, that took legal-aid from
/// 34 to 23–26 context switches per referral (issue 17, BENCHMARKS.md).
/// A failure rolls back on the same connection,
/// and that connection is closed rather than handed back, so no half-open
/// transaction outlives the group.
async fn write_group(pool: &SqlitePool, group: &[Pending]) -> Result<(), sqlx::Error> {
    let at = now_ms();
    let received: Vec<(&str, &Received)> = group
        .iter()
        .filter_map(|p| p.received.as_ref().map(|r| (p.agency.as_str(), r)))
        .collect();
    // One multi-row statement per 100 rows (anonymous `?`: SQLite binds
    // numbered parameters by a linear scan), its parameters bound in order
    // across the statements.
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for chunk in group.chunks(CHUNK) {
        sql.push_str(" INSERT INTO acknowledged (agency, message_id, at) VALUES ");
        push_rows(&mut sql, chunk.len(), "(?, ?, ?)");
        sql.push_str(" ON CONFLICT DO NOTHING;");
    }
    for chunk in received.chunks(CHUNK) {
        sql.push_str(
            " INSERT INTO received (agency, referral, kind, reply_to, relays, answers, payload_digest, at, from_lawyer, complainant) VALUES ",
        );
        push_rows(&mut sql, chunk.len(), "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
        sql.push_str(" ON CONFLICT DO NOTHING;");
    }
    sql.push_str(" COMMIT");
    let mut query = sqlx::query(&sql);
    for pending in group {
        query = query
            .bind(&pending.agency)
            .bind(&pending.message_id)
            .bind(at);
    }
    for (agency, r) in &received {
        query = query
            .bind(*agency)
            .bind(&r.referral)
            .bind(&r.kind)
            .bind(&r.reply_to)
            .bind(r.relays.join(","))
            .bind(i64::from(r.answers))
            .bind(&r.payload_digest)
            .bind(at)
            .bind(&r.from_lawyer)
            .bind(&r.complainant);
    }
    let mut connection = pool.acquire().await?;
    match query.execute(&mut *connection).await {
        Ok(_) => Ok(()),
        Err(e) => {
            // Nothing of the group stays: roll back what began, and do not
            // hand the connection back to the pool.
            let _ = sqlx::query("ROLLBACK").execute(&mut *connection).await;
            connection.close_on_drop();
            Err(e)
        }
    }
}

/// Appends `n` comma-separated copies of `row` (`(?, ?)`) to `sql`.
fn push_rows(sql: &mut String, n: usize, row: &str) {
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(row);
    }
}

/// Adds each of [`ADDED_COLUMNS`] that a store made before it lacks.
async fn add_columns(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    use sqlx::Row;
    let present: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('received')")
        .fetch_all(pool)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>("name"))
        .collect::<Result<_, _>>()?;
    for (column, definition) in ADDED_COLUMNS {
        if !present.iter().any(|name| name == column) {
            sqlx::query(&format!(
                "ALTER TABLE received ADD COLUMN {column} {definition}"
            ))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new store file in the temporary directory.
    fn store_path(test: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "refbus-ack-{test}-{}.db",
            uuid::Uuid::now_v7().simple()
        ))
    }

    /// Removes a test's store and its WAL files.
    fn remove_store(path: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    fn received(from_lawyer: &str) -> Received {
        Received {
            referral: "0193d5c8-0000-7000-8000-000000000001".into(),
            kind: "rights_complaint".into(),
            reply_to: "lawyer-service".into(),
            relays: Vec::new(),
            answers: true,
            payload_digest: "00".into(),
            from_lawyer: from_lawyer.into(),
            complainant: String::new(),
        }
    }

    /// An inbox's batch looks its ids up in one call (issue 17): it finds
    /// exactly the acknowledged ones of that agency, across statement
    /// chunks, and none of another agency's.
    #[tokio::test]
    async fn a_batch_look_up_finds_exactly_the_agencys_acknowledged_ids() {
        let path = store_path("batch");
        let store = Acknowledged::open(&path).await.unwrap();
        let ids: Vec<String> = (0..250).map(|i| format!("m{i}")).collect();
        let recorded = futures_util::future::join_all(
            ids.iter()
                .step_by(3)
                .map(|id| store.record("dz-duty-desk", id, None)),
        )
        .await;
        assert!(recorded.iter().all(Result::is_ok));
        store.record("dz-legal-aid", "m1", None).await.unwrap();
        let asked: Vec<&str> = ids.iter().map(String::as_str).collect();
        let found = store.contains_any("dz-duty-desk", &asked).await.unwrap();
        let expected: std::collections::HashSet<String> = ids.iter().step_by(3).cloned().collect();
        assert_eq!(found, expected);
        assert!(!found.contains("m1"), "m1 is another agency's");
        assert!(
            store
                .contains_any("dz-duty-desk", &[])
                .await
                .unwrap()
                .is_empty()
        );
        store.close().await;
        remove_store(&path);
    }

    /// A group whose transaction fails (here a trigger aborts one id's
    /// insert) records nothing of itself and tells its caller, and the
    /// store goes on: the next acknowledgement is recorded, on a
    /// connection with no transaction left open (issue 17: a group is one
    /// multi-statement query).
    #[tokio::test]
    async fn a_failed_group_records_nothing_and_the_next_one_is_recorded() {
        let path = store_path("failed");
        let store = Acknowledged::open(&path).await.unwrap();
        sqlx::query(
            "CREATE TRIGGER poison BEFORE INSERT ON acknowledged WHEN NEW.message_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        for round in 0..3 {
            let failed = store
                .record("dz-duty-desk", "poison", Some(received("")))
                .await;
            assert!(
                failed.as_ref().is_err_and(|e| e.contains("poisoned")),
                "round {round}: {failed:?}"
            );
            let id = format!("m{round}");
            store
                .record("dz-duty-desk", &id, None)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let found = store
                .contains_any("dz-duty-desk", &[&id, "poison"])
                .await
                .unwrap();
            assert_eq!(found, std::collections::HashSet::from([id]));
        }
        // The failed groups' `received` rows rolled back with them.
        assert!(
            store
                .received("dz-duty-desk", "0193d5c8-0000-7000-8000-000000000001")
                .await
                .unwrap()
                .is_none()
        );
        store.close().await;
        remove_store(&path);
    }

    /// The writer's connection is not a reader's (issue 17: its page cache
    /// stays warm), and what it commits the readers' look-ups see at once.
    #[tokio::test]
    async fn the_writer_has_a_connection_of_its_own_whose_commits_readers_see() {
        let path = store_path("writer");
        let store = Acknowledged::open(&path).await.unwrap();
        assert_eq!(store.writing.options().get_max_connections(), 1);
        assert!(!store.pool.is_closed() && !store.writing.is_closed());
        store.record("dz-duty-desk", "m1", None).await.unwrap();
        let found = store.contains_any("dz-duty-desk", &["m1"]).await.unwrap();
        assert_eq!(found, std::collections::HashSet::from(["m1".to_owned()]));
        store.close().await;
        remove_store(&path);
    }

    #[tokio::test]
    async fn a_store_made_before_lawyers_gains_their_columns_and_keeps_its_rows() {
        let path = store_path("migration");
        // The `received` table as it shipped before issue 18, with a row.
        {
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
                .unwrap()
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .unwrap();
            sqlx::query(
                "CREATE TABLE received (agency TEXT NOT NULL, referral TEXT NOT NULL, kind TEXT NOT NULL, reply_to TEXT NOT NULL, relays TEXT NOT NULL, answers INTEGER NOT NULL, payload_digest TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (agency, referral))",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("INSERT INTO received VALUES ('dz-justice-bureau', 'old', 'lawyer_violation_notice', 'dz-detention-centre', '', 1, 'ab', 0)")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = Acknowledged::open(&path).await.unwrap();
        let old = store
            .received("dz-justice-bureau", "old")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (old.from_lawyer.as_str(), old.complainant.as_str()),
            ("", "")
        );
        store
            .record(
                "dz-justice-bureau",
                "m1",
                Some(received("15001201910123456")),
            )
            .await
            .unwrap();
        let new = store
            .received("dz-justice-bureau", "0193d5c8-0000-7000-8000-000000000001")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(new, received("15001201910123456"));
        store.close().await;
        // Opened again: nothing to add, nothing lost.
        let store = Acknowledged::open(&path).await.unwrap();
        assert!(
            store
                .received("dz-justice-bureau", "old")
                .await
                .unwrap()
                .is_some()
        );
        store.close().await;
        remove_store(&path);
    }
}
