//! What each agency's system has acknowledged, kept on disk (SQLite), so
//! that an `Inbox` never hands it the same message id again once that id
//! was acknowledged: not when a retried `Submit` published it twice, not
//! when a broker ack was lost, not after a restart.
//!
//! With each acknowledged id it keeps what the agency received: the
//! referral's id and where an answer to it goes ([`Received`]), with no
//! content. That is the gateway's proof of receipt: a reply (acknowledgement,
//! feedback, relay) is accepted only from an agency that received the
//! referral, whatever the client claims (issue 16). Those rows are kept as
//! long as the store (an answer may come months later), and the id with
//! them.
//!
//! One row per acknowledgement, in one table (issue 17, layout 2): the
//! acknowledged id is its key, and the referral it was received under is
//! usually that same id, so the receipt is found through the key. Only a
//! receipt filed under another referral (a reply, filed under the referral
//! it answers; a relayed lead, under the original lead) has an entry in a
//! second index. Before, an id and its receipt were two rows in two tables,
//! each keyed by a random id: every acknowledgement dirtied a random page
//! of two indexes and was written to two tables (BENCHMARKS.md, issue 17,
//! fourteenth stop). A store of the older layout is moved to this one when
//! opened ([`Acknowledged::open`]).
//!
//! Acknowledgements are written with group commit: one writer task takes
//! every acknowledgement waiting and records them in one transaction, so
//! that concurrent `Acknowledge` calls share one disk sync instead of
//! queueing for one each. Each call returns only once its own id is on disk.
//! The writer has a connection of its own, apart from the readers' (the
//! inbox's look-ups): in WAL mode a connection drops its whole page cache
//! whenever another one has committed, so a writer that took any connection
//! of a shared pool found its pages cold nearly every group (issue 17).
//!
//! The writer's commits never checkpoint the WAL. SQLite's automatic
//! checkpoint (every 1,000 pages) ran inside the commit an `Acknowledge`
//! waited for, and copied the same pages back to the file again and again:
//! each acknowledgement dirties a random page of the key. A checkpointer
//! with a connection of its own runs a passive checkpoint after every
//! [`CHECKPOINT_EVERY`] acknowledgements instead, beside the writer, which
//! goes on committing meanwhile (issue 17, BENCHMARKS.md).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::sync::{mpsc, oneshot};

use crate::inbox::Received;

/// How long an id acknowledged with nothing known of what was received is
/// remembered: the ids a store of the first layout held apart from their
/// receipts. Every id recorded since is kept with its receipt, as long as
/// the store.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("inbox state {path}: {reason}")]
pub struct AcknowledgedError {
    path: String,
    reason: String,
}

/// The store's layout, in SQLite's `user_version`: 2 is one table of
/// acknowledgements with their receipts. A store of the first layout (two
/// tables, `acknowledged` and `received`) reads 0.
const LAYOUT: i64 = 2;

/// The store's table and its indexes.
///
/// - `referral` is NULL for an id acknowledged with nothing known of what
///   was received (moved from the first layout's `acknowledged`), forgotten
///   after [`RETENTION`] through `acknowledgements_unreceived`.
/// - `acknowledgements_referral` holds only the receipts filed under
///   another referral than the acknowledged id (a reply, a relayed lead,
///   a receipt moved from the first layout): the rest are found by the key.
const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS acknowledgements (
        agency TEXT NOT NULL,
        message_id TEXT NOT NULL,
        at BIGINT NOT NULL,
        referral TEXT,
        kind TEXT NOT NULL DEFAULT '',
        reply_to TEXT NOT NULL DEFAULT '',
        relays TEXT NOT NULL DEFAULT '',
        answers INTEGER NOT NULL DEFAULT 0,
        payload_digest TEXT NOT NULL DEFAULT '',
        from_lawyer TEXT NOT NULL DEFAULT '',
        complainant TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (agency, message_id)
    )",
    "CREATE INDEX IF NOT EXISTS acknowledgements_referral
        ON acknowledgements (agency, referral) WHERE referral <> message_id",
    "CREATE INDEX IF NOT EXISTS acknowledgements_unreceived
        ON acknowledgements (at) WHERE referral IS NULL",
];

/// The first layout's `received` columns added after it first shipped
/// (issue 18: the lawyer an answer goes to), added to such a store before
/// its rows move to [`LAYOUT`] 2. A row from before holds no lawyer: its
/// answers go to agencies only, as then.
const ADDED_COLUMNS: [(&str, &str); 2] = [
    ("from_lawyer", "TEXT NOT NULL DEFAULT ''"),
    ("complainant", "TEXT NOT NULL DEFAULT ''"),
];

/// What a receipt moved from the first layout is keyed by: its
/// acknowledged id was not kept beside it, and no message id (a UUID)
/// starts so.
const MOVED_RECEIPT: &str = "received:";

/// Most acknowledgements recorded in one transaction.
const GROUP: usize = 500;

/// Most ids looked up by one statement (anonymous `?`: SQLite binds
/// numbered parameters by a linear scan).
const CHUNK: usize = 100;

/// Acknowledgements recorded between two passive checkpoints of the WAL.
/// Each dirties about one page (its random leaf of the key), so the WAL
/// holds about this many pages (32 MiB) at most, plus what is written
/// while a checkpoint runs; a checkpoint copies each page once however
/// many groups dirtied it since the last.
pub const CHECKPOINT_EVERY: usize = 8_000;

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
    /// The checkpointer's one connection, and the passive checkpoints it
    /// completed (see [`CHECKPOINT_EVERY`]).
    checkpointing: SqlitePool,
    checkpoints: Arc<AtomicU64>,
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
    open_sqlite_with(path, max_connections, schema, |options| options).await
}

/// [`open_sqlite`], each connection's options first passed through `tune`.
async fn open_sqlite_with(
    path: &Path,
    max_connections: u32,
    schema: &[&str],
    tune: impl FnOnce(SqliteConnectOptions) -> SqliteConnectOptions,
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
    let options = tune(options);
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
    /// Opens (creating if needed) the store at `path`, moves a store of
    /// the first layout to [`LAYOUT`] 2, and forgets ids older than
    /// [`RETENTION`] that have no receipt.
    ///
    /// # Errors
    /// [`AcknowledgedError`] naming the file.
    pub async fn open(path: &Path) -> Result<Self, AcknowledgedError> {
        let fail = |reason: String| AcknowledgedError {
            path: path.display().to_string(),
            reason,
        };
        let no_automatic_checkpoints =
            |options: SqliteConnectOptions| options.pragma("wal_autocheckpoint", "0");
        let writing = open_sqlite_with(path, 1, &[], no_automatic_checkpoints)
            .await
            .map_err(fail)?;
        lay_out(&writing).await.map_err(|e| fail(e.to_string()))?;
        let pool = open_sqlite(path, 2, &[]).await.map_err(fail)?;
        let checkpointing = open_sqlite_with(path, 1, &[], no_automatic_checkpoints)
            .await
            .map_err(fail)?;
        let checkpoints = Arc::new(AtomicU64::new(0));
        let (writer, queue) = mpsc::channel(4 * GROUP);
        let (checkpoint, due) = mpsc::channel(1);
        tokio::spawn(write_groups(writing.clone(), queue, checkpoint));
        tokio::spawn(checkpoint_when_due(
            checkpointing.clone(),
            due,
            checkpoints.clone(),
        ));
        let store = Self {
            pool,
            writing,
            writer,
            checkpointing,
            checkpoints,
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
                "SELECT message_id FROM acknowledgements WHERE agency = ? AND message_id IN (",
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
    /// of it: through the key when the referral is the acknowledged id
    /// (a referral delivered to its addressee), else through
    /// `acknowledgements_referral`. Of several deliveries filed under the
    /// same referral, the first acknowledged counts.
    ///
    /// # Errors
    /// A database error.
    pub async fn received(
        &self,
        agency: &str,
        referral: &str,
    ) -> Result<Option<Received>, sqlx::Error> {
        use sqlx::Row;
        let row = sqlx::query(RECEIVED)
            .bind(agency)
            .bind(referral)
            .bind(referral)
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

    /// Forgets ids acknowledged before `cutoff_ms` with no receipt.
    async fn forget_before(&self, cutoff_ms: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM acknowledgements WHERE referral IS NULL AND at < ?")
            .bind(cutoff_ms)
            .execute(&self.writing)
            .await?;
        Ok(())
    }

    /// The passive checkpoints of the WAL completed since the store was
    /// opened (one after every [`CHECKPOINT_EVERY`] acknowledgements).
    #[must_use]
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }

    /// Closes the store.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writing.close().await;
        self.checkpointing.close().await;
    }
}

/// The writer: records every acknowledgement waiting (at most [`GROUP`])
/// in one transaction, then tells each caller.
/// After every [`CHECKPOINT_EVERY`] acknowledgements it asks the
/// checkpointer for a passive checkpoint, and does not wait for it.
async fn write_groups(
    pool: SqlitePool,
    mut queue: mpsc::Receiver<Pending>,
    checkpoint: mpsc::Sender<()>,
) {
    let mut group = Vec::with_capacity(GROUP);
    let mut since_checkpoint = 0;
    while queue.recv_many(&mut group, GROUP).await > 0 {
        let result = write_group(&pool, &group).await.map_err(|e| e.to_string());
        if result.is_ok() {
            since_checkpoint += group.len();
            if since_checkpoint >= CHECKPOINT_EVERY {
                since_checkpoint = 0;
                // Full: a checkpoint is asked for already, and will copy
                // this group's pages too.
                let _ = checkpoint.try_send(());
            }
        }
        for pending in group.drain(..) {
            let _ = pending.done.send(result.clone());
        }
    }
}

/// The checkpointer: one passive checkpoint (`PRAGMA
/// wal_checkpoint(PASSIVE)`: it copies what no reader still needs, and
/// never blocks the writer) each time the writer asks, on a connection of
/// its own, until the writer stops. A checkpoint that fails leaves the WAL
/// to the next one (or to the last connection's close), and loses nothing.
async fn checkpoint_when_due(
    pool: SqlitePool,
    mut due: mpsc::Receiver<()>,
    checkpoints: Arc<AtomicU64>,
) {
    while due.recv().await.is_some() {
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            Ok(_) => {
                checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "acknowledged store: a passive checkpoint failed; the next one copies its pages")
            }
        }
    }
    pool.close().await;
}

/// Records `group` in one transaction sent to SQLite as one multi-statement
/// query (`BEGIN IMMEDIATE; INSERT …; COMMIT`): one hand-off to the
/// connection's thread instead of one per statement. At a light load,
/// where every group holds one acknowledgement, that took legal-aid from
/// 34 to 23–26 context switches per referral (issue 17, BENCHMARKS.md).
/// An id already acknowledged keeps its first row. A failure rolls back on
/// the same connection, and that connection is closed rather than handed
/// back, so no half-open transaction outlives the group.
async fn write_group(pool: &SqlitePool, group: &[Pending]) -> Result<(), sqlx::Error> {
    let at = now_ms();
    // One multi-row statement per 100 rows (anonymous `?`: SQLite binds
    // numbered parameters by a linear scan), its parameters bound in order
    // across the statements.
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for chunk in group.chunks(CHUNK) {
        sql.push(' ');
        sql.push_str(&insert_sql(chunk.len()));
        sql.push(';');
    }
    sql.push_str(" COMMIT");
    let mut query = sqlx::query(&sql);
    for pending in group {
        query = query
            .bind(&pending.agency)
            .bind(&pending.message_id)
            .bind(at);
        query = match &pending.received {
            Some(r) => query
                .bind(&r.referral)
                .bind(&r.kind)
                .bind(&r.reply_to)
                .bind(r.relays.join(","))
                .bind(i64::from(r.answers))
                .bind(&r.payload_digest)
                .bind(&r.from_lawyer)
                .bind(&r.complainant),
            None => query
                .bind(None::<&str>)
                .bind("")
                .bind("")
                .bind("")
                .bind(0_i64)
                .bind("")
                .bind("")
                .bind(""),
        };
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

/// What an agency received of a referral (binds: agency, referral,
/// referral, agency, referral): the row keyed by the referral's id, or one
/// filed under it from another id, the first recorded (rows go in in
/// order of their `rowid`, as the first layout kept the first receipt of a
/// referral and refused the rest by its key). Each branch's
/// `WHERE` names its index's terms as they are declared, so that SQLite
/// takes the key and the partial index, never a scan
/// (`tests::a_receipt_is_found_through_an_index_never_a_scan`).
const RECEIVED: &str = "SELECT kind, reply_to, relays, answers, payload_digest, from_lawyer, complainant, rowid AS recorded
     FROM acknowledgements WHERE agency = ? AND message_id = ? AND referral = ?
     UNION ALL
     SELECT kind, reply_to, relays, answers, payload_digest, from_lawyer, complainant, rowid AS recorded
     FROM acknowledgements WHERE agency = ? AND referral = ? AND referral <> message_id
     ORDER BY recorded LIMIT 1";

/// One statement inserting `rows` acknowledgements (11 parameters each,
/// in [`write_group`]'s order).
///
/// `OR IGNORE`, not `ON CONFLICT DO NOTHING`: both keep an id's first row,
/// but under the upsert clause a column's `NOT NULL` could still abort a
/// statement of many rows halfway, so SQLite first copied every page the
/// statement touched into a statement journal, to undo it with (2.6 % of
/// legal-aid's samples at saturation, 9.6 % of the acknowledged bench's
/// instructions; issue 17, BENCHMARKS.md). Nothing bound here is NULL where
/// the table says `NOT NULL` (each such value is a `&str` or an integer), so
/// `OR IGNORE` has nothing else to skip
/// (`tests::a_group_insert_never_aborts_halfway`).
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR IGNORE INTO acknowledgements (agency, message_id, at, referral, kind, reply_to, relays, answers, payload_digest, from_lawyer, complainant) VALUES ",
    );
    push_rows(&mut sql, rows, "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    sql
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

/// Brings the store at `pool` (the writer's connection) to [`LAYOUT`] 2
/// in one transaction: creates its table and indexes, and moves a store
/// of the first layout's rows into them. Each acknowledged id keeps its
/// time, with no receipt (forgotten after [`RETENTION`], as before); each
/// receipt is kept under [`MOVED_RECEIPT`] and its referral's id, found by
/// its referral as before. Then the first layout's tables are dropped.
///
/// The first layout's tables are looked for at every opening, not only
/// when `user_version` is below 2: a binary from before this layout, run
/// on the store meanwhile (a rollback), made them again and wrote to them,
/// and what it recorded is moved too.
///
/// The transaction takes the write lock first (`BEGIN IMMEDIATE`), so that
/// of two processes opening the same store at once one lays it out and the
/// other, waiting, finds it done.
async fn lay_out(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for statement in SCHEMA {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    let first: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('acknowledged', 'received')",
    )
    .fetch_all(&mut *tx)
    .await?;
    if first.iter().any(|t| t == "acknowledged") {
        sqlx::query(
            "INSERT INTO acknowledgements (agency, message_id, at)
             SELECT agency, message_id, at FROM acknowledged WHERE true
             ON CONFLICT DO NOTHING",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("DROP TABLE acknowledged")
            .execute(&mut *tx)
            .await?;
    }
    if first.iter().any(|t| t == "received") {
        add_columns(&mut tx).await?;
        sqlx::query(&format!(
            "INSERT INTO acknowledgements (agency, message_id, at, referral, kind, reply_to, relays, answers, payload_digest, from_lawyer, complainant)
             SELECT agency, '{MOVED_RECEIPT}' || referral, at, referral, kind, reply_to, relays, answers, payload_digest, from_lawyer, complainant
             FROM received WHERE true
             ON CONFLICT DO NOTHING"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DROP TABLE received").execute(&mut *tx).await?;
    }
    sqlx::query(&format!("PRAGMA user_version = {LAYOUT}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Adds each of [`ADDED_COLUMNS`] that a first-layout `received` table
/// made before them lacks.
async fn add_columns(tx: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    let present: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('received')")
        .fetch_all(&mut *tx)
        .await?;
    for (column, definition) in ADDED_COLUMNS {
        if !present.iter().any(|name| name == column) {
            sqlx::query(&format!(
                "ALTER TABLE received ADD COLUMN {column} {definition}"
            ))
            .execute(&mut *tx)
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
            "CREATE TRIGGER poison BEFORE INSERT ON acknowledgements WHEN NEW.message_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
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

    /// Issue 17: the writer's commits never checkpoint (an `Acknowledge`
    /// waits for them); a passive checkpoint on the checkpointer's own
    /// connection follows every `CHECKPOINT_EVERY` acknowledgements, and
    /// every id is still found after it.
    #[tokio::test]
    async fn the_wal_is_checkpointed_beside_the_writer_not_in_its_commits() {
        let path = store_path("checkpoints");
        let store = Acknowledged::open(&path).await.unwrap();
        let autocheckpoint: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(&store.writing)
            .await
            .unwrap();
        assert_eq!(autocheckpoint, 0, "the writer's automatic checkpoints");
        let ids: Vec<String> = (0..=CHECKPOINT_EVERY).map(|i| format!("m{i}")).collect();
        for chunk in ids.chunks(GROUP) {
            futures_util::future::try_join_all(
                chunk
                    .iter()
                    .map(|id| store.record("dz-duty-desk", id, None)),
            )
            .await
            .unwrap();
        }
        // Told, not awaited: the checkpoint completes beside the writer.
        for _ in 0..500 {
            if store.checkpoints() > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(store.checkpoints(), 1);
        // What the checkpoint copied to the file is there to read.
        let (busy, log, copied): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&store.checkpointing)
            .await
            .unwrap();
        assert_eq!((busy, log), (0, copied), "the WAL is all copied");
        let all: Vec<&str> = ids.iter().map(String::as_str).collect();
        let found = store.contains_any("dz-duty-desk", &all).await.unwrap();
        assert_eq!(found.len(), ids.len());
        store.close().await;
        remove_store(&path);
    }

    /// A receipt in the shape the gateway records it.
    fn receipt(referral: &str, kind: &str, reply_to: &str) -> Received {
        Received {
            referral: referral.into(),
            kind: kind.into(),
            reply_to: reply_to.into(),
            relays: vec!["dz-procuratorate".into(), "dz-court".into()],
            answers: true,
            payload_digest: "ab".repeat(32),
            from_lawyer: String::new(),
            complainant: String::new(),
        }
    }

    /// Opens the SQLite file at `path` bare (no layout), creating it.
    async fn bare(path: &Path) -> SqlitePool {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .create_if_missing(true);
        SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap()
    }

    /// The tables of the store at `path`, and its layout.
    async fn tables_and_layout(path: &Path) -> (Vec<String>, i64) {
        let pool = bare(path).await;
        let tables =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(&pool)
                .await
                .unwrap();
        let layout = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        (tables, layout)
    }

    /// A store of the first layout (issue 17: two tables, each keyed by a
    /// random id), with a `received` table from before issue 18 (no lawyer
    /// columns), moves to one table when opened: every acknowledged id is
    /// still never handed over again, every receipt still proves the
    /// receipt of its referral, an id older than [`RETENTION`] with no
    /// receipt is forgotten as before, and the old tables are gone. Opened
    /// again, nothing moves twice and nothing is lost.
    #[tokio::test]
    async fn a_first_layout_store_moves_to_one_table_and_keeps_ids_and_receipts() {
        let path = store_path("layout");
        let now = now_ms();
        let month_ago = now - i64::try_from(RETENTION.as_millis()).unwrap() - 1000;
        {
            let pool = bare(&path).await;
            for statement in [
                "CREATE TABLE acknowledged (agency TEXT NOT NULL, message_id TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (agency, message_id))",
                "CREATE TABLE received (agency TEXT NOT NULL, referral TEXT NOT NULL, kind TEXT NOT NULL, reply_to TEXT NOT NULL, relays TEXT NOT NULL, answers INTEGER NOT NULL, payload_digest TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (agency, referral))",
            ] {
                sqlx::query(statement).execute(&pool).await.unwrap();
            }
            for (agency, id, at) in [
                ("dz-justice-bureau", "old", now - 1000),
                ("dz-justice-bureau", "ancient", month_ago),
                ("dz-duty-desk", "old", now - 1000),
            ] {
                sqlx::query("INSERT INTO acknowledged VALUES (?, ?, ?)")
                    .bind(agency)
                    .bind(id)
                    .bind(at)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            // A receipt filed under a referral whose own id was never
            // acknowledged here, older than a month: kept all the same.
            sqlx::query("INSERT INTO received VALUES ('dz-justice-bureau', 'old-referral', 'lawyer_violation_notice', 'dz-detention-centre', 'dz-psb', 1, 'ab', ?)")
                .bind(month_ago)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        for opening in 0..2 {
            let store = Acknowledged::open(&path).await.unwrap();
            let found = store
                .contains_any("dz-justice-bureau", &["old", "ancient", "new"])
                .await
                .unwrap();
            // `new` is acknowledged during the first opening.
            let mut expected = std::collections::HashSet::from(["old".to_owned()]);
            if opening == 1 {
                expected.insert("new".to_owned());
            }
            assert_eq!(found, expected, "opening {opening}");
            let desk = store.contains_any("dz-duty-desk", &["old"]).await.unwrap();
            assert_eq!(desk.len(), 1, "opening {opening}");
            let old = store
                .received("dz-justice-bureau", "old-referral")
                .await
                .unwrap()
                .expect("the first layout's receipt");
            assert_eq!(
                (
                    old.kind.as_str(),
                    old.reply_to.as_str(),
                    old.relays.as_slice(),
                    old.answers,
                    old.payload_digest.as_str(),
                    old.from_lawyer.as_str(),
                    old.complainant.as_str(),
                ),
                (
                    "lawyer_violation_notice",
                    "dz-detention-centre",
                    ["dz-psb".to_owned()].as_slice(),
                    true,
                    "ab",
                    "",
                    ""
                ),
                "opening {opening}"
            );
            // An acknowledged id alone is no receipt, and a receipt is
            // another agency's to none.
            for (agency, referral) in [
                ("dz-justice-bureau", "old"),
                ("dz-duty-desk", "old-referral"),
            ] {
                assert!(
                    store.received(agency, referral).await.unwrap().is_none(),
                    "opening {opening}: {agency} {referral}"
                );
            }
            if opening == 0 {
                store
                    .record(
                        "dz-justice-bureau",
                        "new",
                        Some(receipt(
                            "new",
                            "lawyer_violation_notice",
                            "dz-detention-centre",
                        )),
                    )
                    .await
                    .unwrap();
            }
            assert_eq!(
                store
                    .received("dz-justice-bureau", "new")
                    .await
                    .unwrap()
                    .map(|r| r.kind),
                Some("lawyer_violation_notice".to_owned())
            );
            store.close().await;
            assert_eq!(
                tables_and_layout(&path).await,
                (vec!["acknowledgements".to_owned()], LAYOUT),
                "opening {opening}"
            );
        }
        // A binary of the first layout run on the store meanwhile (a
        // rollback) made its tables again and recorded in them: the next
        // opening moves that too.
        {
            let pool = bare(&path).await;
            for statement in [
                "CREATE TABLE acknowledged (agency TEXT NOT NULL, message_id TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (agency, message_id))",
                "CREATE TABLE received (agency TEXT NOT NULL, referral TEXT NOT NULL, kind TEXT NOT NULL, reply_to TEXT NOT NULL, relays TEXT NOT NULL, answers INTEGER NOT NULL, payload_digest TEXT NOT NULL, at BIGINT NOT NULL, from_lawyer TEXT NOT NULL DEFAULT '', complainant TEXT NOT NULL DEFAULT '', PRIMARY KEY (agency, referral))",
            ] {
                sqlx::query(statement).execute(&pool).await.unwrap();
            }
            sqlx::query("INSERT INTO acknowledged VALUES ('dz-justice-bureau', 'rolled-back', ?)")
                .bind(now)
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("INSERT INTO received VALUES ('dz-justice-bureau', 'rolled-back', 'lawyer_violation_notice', 'dz-detention-centre', '', 1, 'cd', ?, '', '')")
                .bind(now)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = Acknowledged::open(&path).await.unwrap();
        assert_eq!(
            store
                .contains_any("dz-justice-bureau", &["rolled-back", "old", "new"])
                .await
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            store
                .received("dz-justice-bureau", "rolled-back")
                .await
                .unwrap()
                .map(|r| r.payload_digest),
            Some("cd".to_owned())
        );
        assert!(
            store
                .received("dz-justice-bureau", "new")
                .await
                .unwrap()
                .is_some()
        );
        store.close().await;
        assert_eq!(
            tables_and_layout(&path).await,
            (vec!["acknowledgements".to_owned()], LAYOUT)
        );
        remove_store(&path);
    }

    /// A receipt filed under the acknowledged id itself (a referral
    /// delivered to its addressee) and one filed under another referral
    /// (a reply, filed under the referral it answers) are both found by
    /// their referral; of two deliveries filed under one referral the
    /// first acknowledged counts, as when a second receipt was refused by
    /// the key; and an agency finds only its own.
    #[tokio::test]
    async fn a_receipt_is_found_by_its_referral_whatever_id_carried_it() {
        let path = store_path("receipts");
        let store = Acknowledged::open(&path).await.unwrap();
        let referral = "0193d5c8-0000-7000-8000-000000000001";
        store
            .record(
                "dz-duty-desk",
                referral,
                Some(receipt(
                    referral,
                    "legal_help_request",
                    "dz-detention-centre",
                )),
            )
            .await
            .unwrap();
        store
            .record(
                "dz-detention-centre",
                "0193d5c8-0000-7000-8000-00000000000a",
                Some(receipt(referral, "acknowledgement", "dz-duty-desk")),
            )
            .await
            .unwrap();
        store
            .record(
                "dz-detention-centre",
                "0193d5c8-0000-7000-8000-000000000000",
                Some(receipt(referral, "feedback", "dz-duty-desk")),
            )
            .await
            .unwrap();
        let desk = store
            .received("dz-duty-desk", referral)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            desk,
            receipt(referral, "legal_help_request", "dz-detention-centre")
        );
        let centre = store
            .received("dz-detention-centre", referral)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            centre.kind, "acknowledgement",
            "the first acknowledged counts"
        );
        assert!(
            store
                .received("dz-legal-aid", referral)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .received("dz-duty-desk", "0193d5c8-0000-7000-8000-00000000000a")
                .await
                .unwrap()
                .is_none(),
            "a reply's own id is not a referral the desk received"
        );
        store.close().await;
        remove_store(&path);
    }

    /// Issue 17: a group's insert has nothing that can abort it halfway
    /// (a `NOT NULL` check under `ON CONFLICT DO NOTHING` compiled to
    /// `HaltIfNull`), so SQLite keeps no statement journal for it, and an
    /// id acknowledged twice at once keeps its first row.
    #[tokio::test]
    async fn a_group_insert_never_aborts_halfway() {
        use sqlx::Row;
        let path = store_path("no-statement-journal");
        let store = Acknowledged::open(&path).await.unwrap();
        let sql = format!("EXPLAIN {}", insert_sql(2));
        let mut explain = sqlx::query(&sql);
        for _ in 0..22 {
            explain = explain.bind("x");
        }
        let program = explain.fetch_all(&store.writing).await.unwrap();
        let halts: Vec<(String, i64)> = program
            .iter()
            .map(|r| (r.get::<String, _>("opcode"), r.get::<i64, _>("p1")))
            .filter(|(opcode, p1)| opcode == "HaltIfNull" || (opcode == "Halt" && *p1 != 0))
            .collect();
        assert!(
            halts.is_empty(),
            "opcodes that abort the statement: {halts:?}"
        );
        let mut twice = received("");
        twice.kind = "second".into();
        let (first, second) = tokio::join!(
            store.record("dz-duty-desk", "m1", Some(received(""))),
            store.record("dz-duty-desk", "m1", Some(twice)),
        );
        first.unwrap();
        second.unwrap();
        let kinds: Vec<String> = sqlx::query_scalar(
            "SELECT kind FROM acknowledgements WHERE agency = 'dz-duty-desk' AND message_id = 'm1'",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(kinds, ["rights_complaint"]);
        store.close().await;
        remove_store(&path);
    }

    /// The look-up of a receipt goes through the key and the partial
    /// index, never a scan of the store (which would grow with every
    /// acknowledgement ever made): SQLite takes a partial index only when
    /// the query names its condition, so a rewording of either would
    /// silently scan.
    #[tokio::test]
    async fn a_receipt_is_found_through_an_index_never_a_scan() {
        let path = store_path("plan");
        let store = Acknowledged::open(&path).await.unwrap();
        let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {RECEIVED}"))
            .bind("a")
            .bind("r")
            .bind("r")
            .bind("a")
            .bind("r")
            .fetch_all(&store.pool)
            .await
            .unwrap();
        use sqlx::Row;
        let details: Vec<String> = rows.iter().map(|r| r.get::<String, _>("detail")).collect();
        assert!(
            details
                .iter()
                .all(|d| !d.starts_with("SCAN acknowledgements")),
            "{details:?}"
        );
        assert!(
            details
                .iter()
                .any(|d| d.contains("sqlite_autoindex_acknowledgements_1")),
            "{details:?}"
        );
        assert!(
            details
                .iter()
                .any(|d| d.contains("acknowledgements_referral")),
            "{details:?}"
        );
        store.close().await;
        remove_store(&path);
    }
}
