//! Ledger storage: embedded SQLite by default, PostgreSQL when the URL says
//! so; one schema and one set of migrations (`migrations/`) for both,
//! through sqlx's `Any` driver. The transactions that write the chain
//! ([`WriteTx`]) go through sqlx's own driver of each backend instead: on
//! PostgreSQL it sends each column of a batch as one binary array (the
//! `Any` driver binds no arrays); on SQLite it spares a copy of every value
//! bound and every row returned.
//!
//! Every recorded envelope, and every delivery of hop reports (one report
//! or a gateway's batch of them), appends a row to `ledger_events` whose
//! hash chains it to the row before; the chain head lives in `ledger_head`, whose single
//! row every writing transaction updates first (so writers sharing a
//! PostgreSQL database take turns, and SQLite takes its write lock at once).

use crate::record::OF_REFERRAL;
use std::path::Path;

use sha2::{Digest, Sha256};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, FromRow, Postgres, Sqlite, Transaction};
use tokio::sync::{Mutex, MutexGuard};

/// What can go wrong with the ledger's storage.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("ledger migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("ledger database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("ledger data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
}

/// The ledger's database.
pub struct Ledger {
    pub pool: AnyPool,
    /// The pool of the transactions that write the chain ([`WriteTx`]);
    /// `pool` serves the rest.
    recording: Recording,
    /// Serialises this process's writing transactions (SQLite allows one
    /// writer; a deferred transaction upgrading its lock would fail at once).
    write: Mutex<()>,
    pub backend: Backend,
}

/// Where a [`Ledger`]'s writing transactions go.
enum Recording {
    /// Through sqlx's own PostgreSQL driver (binary arrays, see [`WriteTx`]).
    Postgres(PgPool),
    /// Through one SQLite connection of their own. A connection whose page
    /// cache another connection's commit made stale rereads every page it
    /// touches; from a pool of four, the writer got a stale one nearly every
    /// batch (issue 17: at 500 msg/s, a tenth of the tracker's CPU went to
    /// `getPageNormal`). Its own commits keep its cache warm, and its
    /// statement cache holds the batch statements. Through sqlx's own SQLite
    /// driver, not the `Any` driver the other connections share: `Any`
    /// copied every bound value and every returned row once more, into its
    /// own types, on the way (issue 17).
    Sqlite(SqlitePool),
}

/// The page cache of the ledger's one writing connection (SQLite), in KiB.
/// Envelope and hop ids are UUIDv5, spread over the key space, so a batch
/// inserts into pages all over each index: with SQLite's 2 MiB the writer
/// read most of them back from the file and spilled dirty ones to the WAL
/// before its commit. 64 MiB cut the ledger bench's CPU per referral by a
/// fifth at 200,000 referrals (BENCHMARKS.md, issue 17, eighth stop). It is
/// a bound: the cache does not grow with the ledger.
const WRITER_CACHE_KIB: u32 = 64 * 1024;

/// WAL pages between the ledger's automatic checkpoints (SQLite), 128 MiB.
/// For the same reason as [`WRITER_CACHE_KIB`], every batch dirties pages
/// all over each id index, and a checkpoint copies each page once however
/// many commits dirtied it since the last: with 4,000 pages (16 MiB) the
/// ledger was checkpointed after nearly every batch and copied the same
/// hot index pages again each time. At 32,000 the ledger bench wrote a
/// fifth fewer bytes and spent about 17 % less CPU per referral at 100,000
/// referrals (BENCHMARKS.md, issue 17, ninth stop). The WAL file keeps the
/// largest size it reached, about this much, on disk beside the ledger.
/// The checkpoint runs in the writing transaction's commit, so recording
/// pauses while it copies; nothing waits on the ledger (receipts and
/// inboxes do not pass through it). A store that callers do wait on (the
/// gateway's acknowledged store) must not copy this much in its commit.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 32_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The SQLite URL of the ledger file under a data directory.
///
/// # Errors
/// When the data directory cannot be created.
pub fn sqlite_url(data_dir: &Path) -> Result<String, LedgerError> {
    std::fs::create_dir_all(data_dir).map_err(|source| LedgerError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    Ok(format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("ledger.db").display()
    ))
}

impl Ledger {
    /// Connects and brings the schema up to date. `schema` puts the tables
    /// in a PostgreSQL schema of that name (created if missing); ignored for
    /// SQLite.
    ///
    /// # Errors
    /// [`LedgerError`] naming the URL (password hidden) or the migration.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, LedgerError> {
        sqlx::any::install_default_drivers();
        let shown = refbus_bus::redact_url(url);
        let connect_err = |source| LedgerError::Connect {
            url: shown.clone(),
            source,
        };
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let options: AnyConnectOptions = url.parse().map_err(connect_err)?;
        let schema = schema
            .filter(|_| backend == Backend::Postgres)
            .map(str::to_owned);
        if let Some(schema) = &schema {
            let mut conn = AnyConnection::connect_with(&options)
                .await
                .map_err(connect_err)?;
            let created = conn
                .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
                .await;
            if let Err(e) = created {
                // Two trackers starting together race on IF NOT EXISTS;
                // the loser finds the schema there.
                let exists = sqlx::query("SELECT 1 FROM pg_namespace WHERE nspname = $1")
                    .bind(schema.as_str())
                    .fetch_optional(&mut conn)
                    .await
                    .map_err(connect_err)?
                    .is_some();
                if !exists {
                    return Err(connect_err(e));
                }
            }
            let _ = conn.close().await;
        }
        let recording = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let options: PgConnectOptions = url.parse().map_err(connect_err)?;
                let schema = schema.clone();
                // Two recording transactions at once (one staged, one
                // finishing), the deadline engine's scan, one spare.
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .after_connect(move |conn, _| {
                        let schema = schema.clone();
                        Box::pin(async move {
                            if let Some(schema) = schema {
                                conn.execute(format!("SET search_path TO \"{schema}\"").as_str())
                                    .await?;
                            }
                            Ok(())
                        })
                    })
                    .connect_lazy_with(options);
                Some(pool)
            }
        };
        let pool_options = |max_connections: u32| {
            let schema = schema.clone();
            AnyPoolOptions::new()
                .max_connections(max_connections)
                // A local SQLite file needs no ping before every acquire (a
                // round trip to the connection's thread each, issue 17).
                .test_before_acquire(backend != Backend::Sqlite)
                .after_connect(move |conn, _| {
                    let schema = schema.clone();
                    Box::pin(async move {
                        match backend {
                            Backend::Sqlite => {
                                // A reader's page cache stays SQLite's 2 MiB.
                                for (pragma, value) in sqlite_pragmas() {
                                    conn.execute(format!("PRAGMA {pragma} = {value}").as_str())
                                        .await?;
                                }
                            }
                            Backend::Postgres => {
                                if let Some(schema) = schema {
                                    conn.execute(
                                        format!("SET search_path TO \"{schema}\"").as_str(),
                                    )
                                    .await?;
                                }
                            }
                        }
                        Ok(())
                    })
                })
        };
        let pool = pool_options(if backend == Backend::Sqlite { 4 } else { 8 })
            .connect_with(options.clone())
            .await
            .map_err(connect_err)?;
        let recording = match recording {
            Some(pg) => Recording::Postgres(pg),
            None => Recording::Sqlite(sqlite_writer(url).await.map_err(connect_err)?),
        };
        // Another tracker migrating the same ledger at the same moment makes
        // one of the two fail; by the retry the winner has finished.
        let mut attempt = 0;
        loop {
            match MIGRATOR.run(&pool).await {
                Ok(()) => break,
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "migrating the ledger failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(250 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Self {
            pool,
            recording,
            write: Mutex::new(()),
            backend,
        })
    }

    /// Takes this process's write turn.
    pub async fn write_turn(&self) -> MutexGuard<'_, ()> {
        self.write.lock().await
    }

    /// Begins a transaction that writes the chain.
    ///
    /// # Errors
    /// A database error.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        Ok(match &self.recording {
            Recording::Postgres(pool) => WriteTx::Postgres(pool.begin().await?),
            Recording::Sqlite(pool) => WriteTx::Sqlite(pool.begin().await?),
        })
    }

    /// The reply rights recorded for `referrals`, as (referral, agency,
    /// reply) rows (see `migrations/0003_reply_rights_and_watermarks.sql`
    /// and `0005_rows_in_order_of_arrival.sql`).
    ///
    /// # Errors
    /// A database error.
    pub async fn reply_rights(
        &self,
        referrals: &[&str],
    ) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        let mut found = Vec::new();
        for chunk in referrals.chunks(CHUNK) {
            let list = (1..=chunk.len())
                .map(|i| match self.backend {
                    Backend::Sqlite => "?".to_owned(),
                    Backend::Postgres => format!("${i}"),
                })
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!(
                "SELECT x.referral_id, x.agency, x.reply FROM referrals r JOIN reply_rights x ON {OF_REFERRAL}
                 WHERE r.id IN ({list})"
            );
            let query = chunk.iter().fold(
                sqlx::query_as::<_, (String, String, String)>(&sql),
                |q, r| q.bind(*r),
            );
            found.extend(query.fetch_all(&self.pool).await?);
        }
        Ok(found)
    }

    /// The ledger's latest migration when it is newer than any this build
    /// knows: a newer tracker sharing the ledger has migrated it, and the
    /// rows this code writes may no longer fit its tables (a write it
    /// refuses then says nothing about the message).
    ///
    /// # Errors
    /// A database error.
    pub async fn migrated_past_this_build(&self) -> Result<Option<i64>, sqlx::Error> {
        let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let latest: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(latest.filter(|v| *v > known))
    }

    /// Closes the ledger's connections.
    pub async fn close(&self) {
        match &self.recording {
            Recording::Postgres(pool) => pool.close().await,
            Recording::Sqlite(pool) => pool.close().await,
        }
        self.pool.close().await;
    }
}

/// What every connection to a SQLite ledger sets, the writer's and the
/// readers': WAL with every commit synced, a 10 s wait for the write lock,
/// and (issue 17) a batch's multi-row inserts keeping their statement
/// journal in memory, not in a temporary file, and the WAL checkpointed
/// every [`WAL_AUTOCHECKPOINT_PAGES`] (128 MiB) instead of SQLite's 4 MiB,
/// so that a hot page is copied back to the database less often.
fn sqlite_pragmas() -> [(&'static str, String); 5] {
    [
        ("journal_mode", "WAL".to_owned()),
        ("synchronous", "FULL".to_owned()),
        ("busy_timeout", "10000".to_owned()),
        ("temp_store", "MEMORY".to_owned()),
        ("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string()),
    ]
}

/// The one connection that records into a SQLite ledger at `url`, with
/// sqlx's own SQLite driver: [`sqlite_pragmas`], and a page cache of
/// [`WRITER_CACHE_KIB`]. Both the WAL and the cache are bounded, so memory
/// stays flat however large the ledger.
async fn sqlite_writer(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options: SqliteConnectOptions = url.parse()?;
    let options = sqlite_pragmas()
        .into_iter()
        .fold(options, |options, (pragma, value)| {
            options.pragma(pragma, value)
        })
        .pragma("cache_size", format!("-{WRITER_CACHE_KIB}"));
    SqlitePoolOptions::new()
        .max_connections(1)
        // A local file: no ping before every acquire.
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

/// Whether the database refused the rows it was given (a value it cannot
/// hold, a limit a value exceeds, a constraint it breaks), so that the same
/// rows will always fail and the batch is split to isolate the culprit;
/// `false` when the database itself is away or busy (connection refused or
/// closed, pool timeout, shutdown, lock or serialization conflict), when
/// the same batch is retried as it is.
///
/// PostgreSQL: SQLSTATE class 22 (data exception: a NUL byte in text),
/// 54 (program limit exceeded: a btree index entry over 2.7 KB) and 23
/// (integrity constraint) but not 23505 (unique violation: another
/// writer's batch had the same message, and a retry sees it recorded).
/// Class 08 (connection exception), 57 (operator intervention), 53
/// (insufficient resources), 40 (transaction rollback) and everything
/// else are the database's, not the rows'. SQLite: TOOBIG, CONSTRAINT
/// (but not UNIQUE or PRIMARYKEY), MISMATCH and RANGE.
#[must_use]
pub fn refuses_rows(error: &sqlx::Error) -> bool {
    match error {
        // A value that cannot be encoded for the database.
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(e) if e.is_unique_violation() => false,
        sqlx::Error::Database(e) => {
            let Some(code) = e.code() else {
                return false;
            };
            let code = code.as_ref();
            if looks_like_sqlstate(code) {
                return matches!(&code[..2], "22" | "23" | "54");
            }
            // SQLite: an (extended) result code; the primary code is its low byte.
            code.parse::<i32>()
                .is_ok_and(|extended| matches!(extended & 0xff, 18 | 19 | 20 | 25))
        }
        _ => false,
    }
}

/// Whether `code` is a PostgreSQL SQLSTATE (five characters, digits and
/// upper-case letters) rather than a SQLite result code (a number of at
/// most four digits).
fn looks_like_sqlstate(code: &str) -> bool {
    code.len() == 5
        && code
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
}

/// Locks the chain's head: every writing transaction's first statement.
/// The ledger's migrations, as this build knows them.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const LOCK_HEAD: &str = "UPDATE ledger_head SET seq = seq WHERE id = 1";
const READ_HEAD: &str = "SELECT seq, hash FROM ledger_head WHERE id = 1";
const STORE_HEAD: &str = "UPDATE ledger_head SET seq = $1, hash = $2 WHERE id = 1";

/// A transaction that writes the ledger's chain: the recorder's batches and
/// the deadline engine's scans. Through sqlx's own driver of each backend
/// (the reads go through the `Any` driver).
///
/// Statements over many rows take them as a table expression (columns
/// `column1` .. `columnN`, see [`WriteTx::fetch_with`]) that each backend
/// binds as it binds best:
/// - PostgreSQL: each column one binary array (`text[]`, `bigint[]`)
///   expanded by `unnest`: N binds and one plan however many rows, where a
///   `VALUES` list of thousands of parameters cost more to bind and plan
///   than the rows cost to insert (and array literals in text cost the
///   server a parse of every character);
/// - SQLite: a `VALUES` list of anonymous `?`, [`CHUNK`] rows a statement.
///   SQLite looks a numbered parameter's name up by a linear scan, so a
///   statement with a thousand `$n` costs a million steps to bind;
///   anonymous `?` are bound by position.
pub enum WriteTx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

impl WriteTx {
    /// Locks and reads the chain head (first statement of a writing
    /// transaction).
    ///
    /// # Errors
    /// A database error.
    pub async fn lock_head(&mut self) -> Result<Head, sqlx::Error> {
        self.execute(LOCK_HEAD, &[]).await?;
        let (seq, hash) = self
            .fetch::<(i64, String)>(READ_HEAD, &[])
            .await?
            .pop()
            .ok_or(sqlx::Error::RowNotFound)?;
        Ok(Head { seq, hash })
    }

    /// Writes the head back (last statement of a writing transaction).
    ///
    /// # Errors
    /// A database error.
    pub async fn store_head(&mut self, head: &Head) -> Result<(), sqlx::Error> {
        self.execute(
            STORE_HEAD,
            &[Value::Int(head.seq), Value::Text(head.hash.clone())],
        )
        .await
    }

    /// Runs `sql` with `params` bound to `$1`, `$2`, ... and reads each
    /// result row as `T`.
    ///
    /// # Errors
    /// A database error.
    pub async fn fetch<T>(&mut self, sql: &str, params: &[Value]) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow>,
    {
        match self {
            WriteTx::Sqlite(tx) => {
                sqlite_bind(sqlx::query(sql), params)
                    .try_map(|row: SqliteRow| T::from_row(&row))
                    .fetch_all(&mut **tx)
                    .await
            }
            WriteTx::Postgres(tx) => {
                pg_bind_scalars(sqlx::query(sql), params)
                    .try_map(|row: PgRow| T::from_row(&row))
                    .fetch_all(&mut **tx)
                    .await
            }
        }
    }

    /// Runs `sql` with `params` bound to `$1`, `$2`, ...
    ///
    /// # Errors
    /// A database error.
    pub async fn execute(&mut self, sql: &str, params: &[Value]) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Sqlite(tx) => {
                sqlite_bind(sqlx::query(sql), params)
                    .execute(&mut **tx)
                    .await?;
            }
            WriteTx::Postgres(tx) => {
                pg_bind_scalars(sqlx::query(sql), params)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Runs `head SELECT * FROM unnest(...) suffix` (PostgreSQL, one
    /// statement) or `head VALUES ... suffix` (SQLite, in chunks of
    /// [`CHUNK`] rows). Returns how many rows it inserted or changed.
    ///
    /// # Errors
    /// A database error, or a column whose rows mix text and integers.
    pub async fn insert_rows<const N: usize>(
        &mut self,
        head: &str,
        suffix: &str,
        rows: &[[Value; N]],
    ) -> Result<u64, sqlx::Error> {
        let mut changed = 0;
        if rows.is_empty() {
            return Ok(changed);
        }
        match self {
            WriteTx::Sqlite(tx) => {
                for chunk in rows.chunks(CHUNK) {
                    let sql = format!("{head} VALUES {} {suffix}", values_list::<N>(chunk.len()));
                    changed += sqlite_bind(sqlx::query(&sql), chunk.iter().flatten())
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                }
            }
            WriteTx::Postgres(tx) => {
                let columns = pg_columns(rows)?;
                let sql = format!("{head} SELECT * FROM {} {suffix}", pg_unnest(&columns));
                changed = pg_bind_columns(sqlx::query(&sql), &columns)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
            }
        }
        Ok(changed)
    }

    /// [`WriteTx::insert_rows`] with a `RETURNING` clause in `suffix`: the
    /// rows the insert returned (with `ON CONFLICT DO NOTHING`, the rows
    /// that went in), read as `T`.
    ///
    /// # Errors
    /// A database error, or a column whose rows mix text and integers.
    pub async fn insert_rows_returning<T, const N: usize>(
        &mut self,
        head: &str,
        suffix: &str,
        rows: &[[Value; N]],
    ) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow>,
    {
        let mut returned = Vec::new();
        if rows.is_empty() {
            return Ok(returned);
        }
        match self {
            WriteTx::Sqlite(tx) => {
                for chunk in rows.chunks(CHUNK) {
                    let sql = format!("{head} VALUES {} {suffix}", values_list::<N>(chunk.len()));
                    returned.extend(
                        sqlite_bind(sqlx::query(&sql), chunk.iter().flatten())
                            .try_map(|row: SqliteRow| T::from_row(&row))
                            .fetch_all(&mut **tx)
                            .await?,
                    );
                }
            }
            WriteTx::Postgres(tx) => {
                let columns = pg_columns(rows)?;
                let sql = format!("{head} SELECT * FROM {} {suffix}", pg_unnest(&columns));
                returned = pg_bind_columns(sqlx::query(&sql), &columns)
                    .try_map(|row: PgRow| T::from_row(&row))
                    .fetch_all(&mut **tx)
                    .await?;
            }
        }
        Ok(returned)
    }

    /// Runs the query that `sql` makes of a table expression over `rows`
    /// (columns `column1` .. `columnN`) and reads each result row as `T`.
    /// On SQLite the rows go [`CHUNK`] at a time, and the results of the
    /// chunks are concatenated, so `sql` must not aggregate across rows of
    /// different chunks.
    ///
    /// # Errors
    /// A database error, or a column whose rows mix text and integers.
    pub async fn fetch_with<T, const N: usize>(
        &mut self,
        sql: impl Fn(&str) -> String,
        rows: &[[Value; N]],
    ) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow>,
    {
        let mut found = Vec::new();
        if rows.is_empty() {
            return Ok(found);
        }
        match self {
            WriteTx::Sqlite(tx) => {
                for chunk in rows.chunks(CHUNK) {
                    let sql = sql(&format!("(VALUES {})", values_list::<N>(chunk.len())));
                    found.extend(
                        sqlite_bind(sqlx::query(&sql), chunk.iter().flatten())
                            .try_map(|row: SqliteRow| T::from_row(&row))
                            .fetch_all(&mut **tx)
                            .await?,
                    );
                }
            }
            WriteTx::Postgres(tx) => {
                let columns = pg_columns(rows)?;
                let sql = sql(&pg_table(&columns));
                found = pg_bind_columns(sqlx::query(&sql), &columns)
                    .try_map(|row: PgRow| T::from_row(&row))
                    .fetch_all(&mut **tx)
                    .await?;
            }
        }
        Ok(found)
    }

    /// Runs the statement that `sql` makes of a table expression over
    /// `rows`, as [`WriteTx::fetch_with`] does. Returns how many rows it
    /// inserted or changed.
    ///
    /// # Errors
    /// A database error, or a column whose rows mix text and integers.
    pub async fn execute_with<const N: usize>(
        &mut self,
        sql: impl Fn(&str) -> String,
        rows: &[[Value; N]],
    ) -> Result<u64, sqlx::Error> {
        let mut changed = 0;
        if rows.is_empty() {
            return Ok(changed);
        }
        match self {
            WriteTx::Sqlite(tx) => {
                for chunk in rows.chunks(CHUNK) {
                    let sql = sql(&format!("(VALUES {})", values_list::<N>(chunk.len())));
                    changed += sqlite_bind(sqlx::query(&sql), chunk.iter().flatten())
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                }
            }
            WriteTx::Postgres(tx) => {
                let columns = pg_columns(rows)?;
                let sql = sql(&pg_table(&columns));
                changed = pg_bind_columns(sqlx::query(&sql), &columns)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
            }
        }
        Ok(changed)
    }

    /// Commits.
    ///
    /// # Errors
    /// A database error: nothing of the transaction is recorded.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Sqlite(tx) => tx.commit().await,
            WriteTx::Postgres(tx) => tx.commit().await,
        }
    }

    /// Rolls back.
    ///
    /// # Errors
    /// A database error (the server rolls back a transaction whose
    /// connection is gone).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Sqlite(tx) => tx.rollback().await,
            WriteTx::Postgres(tx) => tx.rollback().await,
        }
    }
}

/// `(?,?),(?,?)`: `rows` rows of `N` anonymous parameters (SQLite).
fn values_list<const N: usize>(rows: usize) -> String {
    let mut sql = String::with_capacity(rows * (N * 2 + 2));
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for j in 0..N {
            if j > 0 {
                sql.push(',');
            }
            sql.push('?');
        }
        sql.push(')');
    }
    sql
}

/// Binds `values`, in order (SQLite).
fn sqlite_bind<'q>(
    query: SqliteQuery<'q>,
    values: impl IntoIterator<Item = &'q Value>,
) -> SqliteQuery<'q> {
    values.into_iter().fold(query, |query, value| match value {
        Value::Text(s) => query.bind(s.as_str()),
        Value::Int(i) => query.bind(*i),
        Value::NullInt => query.bind(None::<i64>),
    })
}

/// Binds `values` as scalars, in order (PostgreSQL).
fn pg_bind_scalars<'q>(query: PgQuery<'q>, values: &'q [Value]) -> PgQuery<'q> {
    values.iter().fold(query, |query, value| match value {
        Value::Text(s) => query.bind(s.as_str()),
        Value::Int(i) => query.bind(*i),
        Value::NullInt => query.bind(None::<i64>),
    })
}

/// One column of a batch's rows, bound as one binary PostgreSQL array.
enum PgColumn<'r> {
    Text(Vec<&'r str>),
    Int(Vec<Option<i64>>),
}

impl PgColumn<'_> {
    fn sql_type(&self) -> &'static str {
        match self {
            PgColumn::Text(_) => "text[]",
            PgColumn::Int(_) => "bigint[]",
        }
    }
}

/// The columns of `rows`, each typed by its first row.
fn pg_columns<const N: usize>(rows: &[[Value; N]]) -> Result<Vec<PgColumn<'_>>, sqlx::Error> {
    (0..N)
        .map(|j| {
            let mut column = match rows.first().map(|r| &r[j]) {
                Some(Value::Int(_) | Value::NullInt) => {
                    PgColumn::Int(Vec::with_capacity(rows.len()))
                }
                _ => PgColumn::Text(Vec::with_capacity(rows.len())),
            };
            for row in rows {
                match (&mut column, &row[j]) {
                    (PgColumn::Text(v), Value::Text(s)) => v.push(s),
                    (PgColumn::Int(v), Value::Int(i)) => v.push(Some(*i)),
                    (PgColumn::Int(v), Value::NullInt) => v.push(None),
                    _ => {
                        return Err(sqlx::Error::Encode(
                            format!("column {} of a batch mixes text and integers", j + 1).into(),
                        ));
                    }
                }
            }
            Ok(column)
        })
        .collect()
}

/// `unnest($1::text[], $2::bigint[], ...)`.
fn pg_unnest(columns: &[PgColumn<'_>]) -> String {
    let args = columns
        .iter()
        .enumerate()
        .map(|(j, c)| format!("${}::{}", j + 1, c.sql_type()))
        .collect::<Vec<_>>()
        .join(", ");
    format!("unnest({args})")
}

/// `(SELECT * FROM unnest(...) AS u(column1, ...))`.
fn pg_table(columns: &[PgColumn<'_>]) -> String {
    let names = (1..=columns.len())
        .map(|j| format!("column{j}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("(SELECT * FROM {} AS u({names}))", pg_unnest(columns))
}

/// Binds each column as one array.
fn pg_bind_columns<'q>(query: PgQuery<'q>, columns: &'q [PgColumn<'q>]) -> PgQuery<'q> {
    columns.iter().fold(query, |query, column| match column {
        PgColumn::Text(v) => query.bind(v.as_slice()),
        PgColumn::Int(v) => query.bind(v.as_slice()),
    })
}

/// The head of the hash chain, read and advanced inside a transaction.
#[derive(Clone, Debug)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
}

impl Head {
    /// Chains `event` after the head and moves the head to it; returns the
    /// event's `ledger_events` row (seq, chained_id, event, referral_id,
    /// recorded_at, body, prev_hash, hash).
    pub fn chain(&mut self, event: &Event<'_>) -> [Value; 8] {
        let seq = self.seq + 1;
        let hash = event.hash(seq, &self.hash);
        let row = [
            Value::Int(seq),
            event.message_id.into(),
            event.event.into(),
            event.referral_id.into(),
            Value::Int(event.recorded_at),
            event.body.as_str().into(),
            self.hash.as_str().into(),
            hash.as_str().into(),
        ];
        self.seq = seq;
        self.hash = hash;
        row
    }
}

/// One ledger event before it is chained.
#[derive(Debug)]
pub struct Event<'a> {
    pub message_id: &'a str,
    pub event: &'a str,
    pub referral_id: &'a str,
    pub recorded_at: i64,
    pub body: String,
}

impl Event<'_> {
    /// The hash of this event at `seq` after `prev_hash`.
    #[must_use]
    pub fn hash(&self, seq: i64, prev_hash: &str) -> String {
        chain_hash(
            seq,
            self.message_id,
            self.event,
            self.referral_id,
            self.recorded_at,
            &self.body,
            prev_hash,
        )
    }
}

/// SHA-256 (hex) over an event's fields and the previous hash.
#[must_use]
pub fn chain_hash(
    seq: i64,
    message_id: &str,
    event: &str,
    referral_id: &str,
    recorded_at: i64,
    body: &str,
    prev_hash: &str,
) -> String {
    let mut h = Sha256::new();
    for part in [
        prev_hash,
        &seq.to_string(),
        message_id,
        event,
        referral_id,
        &recorded_at.to_string(),
        body,
    ] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    hex(&h.finalize())
}

/// Lowercase hex of bytes (by table: a formatter call per byte cost the
/// chain 2 µs an event, issue 17).
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// SHA-256 (hex) of bytes.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A bound value of a multi-row statement.
#[derive(Clone, Debug)]
pub enum Value {
    Text(String),
    Int(i64),
    NullInt,
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

/// Rows per multi-row statement on SQLite (keeps well under its limit on
/// bound parameters). PostgreSQL takes any number of rows in one array
/// parameter per column.
pub const CHUNK: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain's hashes of a ledger written before hex went by table are
    /// still what `tracker verify` computes: lowercase, two digits a byte.
    #[test]
    fn hashes_are_lowercase_hex_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0a, 0xab, 0xff]), "000aabff");
        assert_eq!(
            sha256_hex(b"refbus"),
            "3582d502b30e520b5afaaeca5b1e78e928d75e392a0525c75fb457e142082cb0"
        );
    }

    #[test]
    fn a_batch_goes_to_postgresql_as_one_typed_array_per_column() {
        let rows = [
            [Value::from("a\"b\\c,{d}"), Value::Int(1), Value::NullInt],
            [Value::from("张三"), Value::Int(2), Value::Int(3)],
        ];
        let columns = pg_columns(&rows).unwrap();
        assert!(matches!(&columns[0], PgColumn::Text(v) if v == &["a\"b\\c,{d}", "张三"]));
        assert!(matches!(&columns[1], PgColumn::Int(v) if v == &[Some(1), Some(2)]));
        assert!(matches!(&columns[2], PgColumn::Int(v) if v == &[None, Some(3)]));
        assert_eq!(
            pg_table(&columns),
            "(SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(column1, column2, column3))"
        );
    }

    /// The writing connection (sqlx's own SQLite driver) and a reader (the
    /// `Any` driver) of a SQLite ledger carry the same settings, and the
    /// writer its larger page cache: every commit synced (what the tracker
    /// acks after must be on disk), WAL, the statement journal in memory,
    /// the 128 MiB checkpoint (issue 17).
    #[tokio::test]
    async fn the_sqlite_writer_and_readers_carry_the_ledgers_settings() {
        let dir = std::env::temp_dir().join(format!(
            "refbus-ledger-settings-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let ledger = Ledger::connect(&sqlite_url(&dir).unwrap(), None)
            .await
            .unwrap();
        // Numbers as SQLite reports them: synchronous 2 is FULL, temp_store
        // 2 is MEMORY.
        let numbers = [
            ("synchronous", 2),
            ("busy_timeout", 10_000),
            ("temp_store", 2),
            ("wal_autocheckpoint", i64::from(WAL_AUTOCHECKPOINT_PAGES)),
        ];
        let mut tx = ledger.begin_write().await.unwrap();
        let mode: Vec<(String,)> = tx.fetch("PRAGMA journal_mode", &[]).await.unwrap();
        assert_eq!(mode, [("wal".to_owned(),)], "the writer's journal_mode");
        for (pragma, value) in numbers {
            let read: Vec<(i64,)> = tx.fetch(&format!("PRAGMA {pragma}"), &[]).await.unwrap();
            assert_eq!(read, [(value,)], "the writer's {pragma}");
        }
        let cache: Vec<(i64,)> = tx.fetch("PRAGMA cache_size", &[]).await.unwrap();
        assert_eq!(
            cache,
            [(-i64::from(WRITER_CACHE_KIB),)],
            "the writer's cache_size"
        );
        tx.rollback().await.unwrap();
        let mut reader = ledger.pool.acquire().await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *reader)
            .await
            .unwrap();
        assert_eq!(mode, "wal", "a reader's journal_mode");
        for (pragma, value) in numbers {
            let read: i64 = sqlx::query_scalar(&format!("PRAGMA {pragma}"))
                .fetch_one(&mut *reader)
                .await
                .unwrap();
            assert_eq!(read, value, "a reader's {pragma}");
        }
        drop(reader);
        ledger.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database error with a code, as a driver reports it.
    #[derive(Debug)]
    struct Coded(&'static str, sqlx::error::ErrorKind);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "code {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            match self.1 {
                sqlx::error::ErrorKind::UniqueViolation => sqlx::error::ErrorKind::UniqueViolation,
                _ => sqlx::error::ErrorKind::Other,
            }
        }
    }

    fn coded(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Coded(code, sqlx::error::ErrorKind::Other)))
    }

    #[test]
    fn rows_the_database_refuses_are_told_from_a_database_that_is_down() {
        // PostgreSQL: a NUL byte in text, a btree entry over 2.7 KB, a
        // NOT NULL or CHECK constraint: the same rows always fail.
        for refused in ["22021", "22P02", "54000", "23502", "23514"] {
            assert!(refuses_rows(&coded(refused)), "{refused}");
        }
        // Connection exceptions, shutdown, too many connections,
        // serialization and deadlock: the database's, retried as they are.
        for away in [
            "08006", "08001", "57P01", "53300", "40001", "40P01", "25P02",
        ] {
            assert!(!refuses_rows(&coded(away)), "{away}");
        }
        // SQLite: TOOBIG, CONSTRAINT_NOTNULL (1299), MISMATCH, RANGE; not
        // BUSY, LOCKED or an I/O error.
        for refused in ["18", "1299", "20", "25"] {
            assert!(refuses_rows(&coded(refused)), "{refused}");
        }
        for away in ["5", "6", "10", "3850"] {
            assert!(!refuses_rows(&coded(away)), "{away}");
        }
        // A unique violation: another writer had the message; a retry sees it.
        let unique = sqlx::Error::Database(Box::new(Coded(
            "23505",
            sqlx::error::ErrorKind::UniqueViolation,
        )));
        assert!(!refuses_rows(&unique));
        // The pool and the connection.
        assert!(!refuses_rows(&sqlx::Error::PoolTimedOut));
        assert!(!refuses_rows(&sqlx::Error::PoolClosed));
        assert!(!refuses_rows(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
    }

    #[test]
    fn a_column_mixing_text_and_integers_is_refused_not_bound() {
        let rows = [[Value::from("a")], [Value::Int(1)]];
        let err = pg_columns(&rows).err().unwrap();
        assert!(err.to_string().contains("column 1"), "{err}");
    }
}
