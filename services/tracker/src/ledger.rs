//! Ledger storage: embedded SQLite by default, PostgreSQL when the URL says
//! so; one schema and one set of migrations (`migrations/`) for both,
//! through sqlx's `Any` driver. Recording ([`WriteTx`]) on PostgreSQL goes
//! through sqlx's own PostgreSQL driver instead, which sends each column of
//! a batch as one binary array (the `Any` driver binds no arrays).
//!
//! Every recorded message appends a row to `ledger_events` whose hash chains
//! it to the row before; the chain head lives in `ledger_head`, whose single
//! row every writing transaction updates first (so writers sharing a
//! PostgreSQL database take turns, and SQLite takes its write lock at once).

use std::borrow::Cow;
use std::path::Path;

use sha2::{Digest, Sha256};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{
    Any, AnyConnection, AnyPool, Connection, Executor, FromRow, Postgres, Row, Transaction,
};
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
    /// PostgreSQL: the recording transactions' own pool ([`WriteTx`]).
    recording: Option<PgPool>,
    /// Serialises this process's writing transactions (SQLite allows one
    /// writer; a deferred transaction upgrading its lock would fail at once).
    write: Mutex<()>,
    pub backend: Backend,
}

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
                // Two batches are written at once; one connection spare.
                let pool = PgPoolOptions::new()
                    .max_connections(3)
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
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    match backend {
                        Backend::Sqlite => {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                        }
                        Backend::Postgres => {
                            if let Some(schema) = schema {
                                conn.execute(format!("SET search_path TO \"{schema}\"").as_str())
                                    .await?;
                            }
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        // Another tracker migrating the same ledger at the same moment makes
        // one of the two fail; by the retry the winner has finished.
        let mut attempt = 0;
        loop {
            match sqlx::migrate!("./migrations").run(&pool).await {
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

    /// Begins a recording transaction.
    ///
    /// # Errors
    /// A database error.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        Ok(match &self.recording {
            Some(pool) => WriteTx::Postgres(pool.begin().await?),
            None => WriteTx::Any(self.pool.begin().await?),
        })
    }

    /// Closes the ledger's connections.
    pub async fn close(&self) {
        if let Some(pool) = &self.recording {
            pool.close().await;
        }
        self.pool.close().await;
    }
}

/// Locks the chain's head: every writing transaction's first statement.
const LOCK_HEAD: &str = "UPDATE ledger_head SET seq = seq WHERE id = 1";
const READ_HEAD: &str = "SELECT seq, hash FROM ledger_head WHERE id = 1";
const STORE_HEAD: &str = "UPDATE ledger_head SET seq = $1, hash = $2 WHERE id = 1";

/// A transaction that records batches: through the `Any` driver on SQLite,
/// through the PostgreSQL driver on PostgreSQL. Statements over many rows
/// take them as a table expression (see [`WriteTx::fetch_with`]) that each
/// backend binds as it binds best.
pub enum WriteTx {
    Any(Transaction<'static, Any>),
    Postgres(Transaction<'static, Postgres>),
}

impl WriteTx {
    /// Locks and reads the chain head (first statement of a writing
    /// transaction).
    ///
    /// # Errors
    /// A database error.
    pub async fn lock_head(&mut self) -> Result<Head, sqlx::Error> {
        let (seq, hash) = match self {
            WriteTx::Any(tx) => Head::lock(tx).await.map(|h| (h.seq, h.hash))?,
            WriteTx::Postgres(tx) => {
                (&mut **tx).execute(LOCK_HEAD).await?;
                sqlx::query_as::<_, (i64, String)>(READ_HEAD)
                    .fetch_one(&mut **tx)
                    .await?
            }
        };
        Ok(Head { seq, hash })
    }

    /// Writes the head back (last statement of a writing transaction).
    ///
    /// # Errors
    /// A database error.
    pub async fn store_head(&mut self, head: &Head) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Any(tx) => head.store(tx).await,
            WriteTx::Postgres(tx) => {
                sqlx::query(STORE_HEAD)
                    .bind(head.seq)
                    .bind(&head.hash)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
        }
    }

    /// Runs `head SELECT * FROM unnest(...) suffix` (PostgreSQL, one
    /// statement) or `head VALUES ... suffix` (SQLite, in chunks of
    /// [`CHUNK`] rows).
    ///
    /// # Errors
    /// A database error, or a column whose rows mix text and integers.
    pub async fn insert_rows<const N: usize>(
        &mut self,
        head: &str,
        suffix: &str,
        rows: &[[Value; N]],
    ) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Any(tx) => insert_rows(tx, head, suffix, rows).await,
            WriteTx::Postgres(_) if rows.is_empty() => Ok(()),
            WriteTx::Postgres(tx) => {
                let columns = pg_columns(rows)?;
                let sql = format!("{head} SELECT * FROM {} {suffix}", pg_unnest(&columns));
                pg_bind(sqlx::query(&sql), &columns)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
        }
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
        T: Send + Unpin + for<'r> FromRow<'r, AnyRow> + for<'r> FromRow<'r, PgRow>,
    {
        let mut found = Vec::new();
        if rows.is_empty() {
            return Ok(found);
        }
        match self {
            WriteTx::Any(tx) => {
                for chunk in rows.chunks(CHUNK) {
                    let table = RowSet::new(tx, chunk);
                    let sql = sql(&table.table(tx, 1));
                    found.extend(
                        table
                            .bind(sqlx::query(&sql))
                            .try_map(|row: AnyRow| T::from_row(&row))
                            .fetch_all(&mut **tx)
                            .await?,
                    );
                }
            }
            WriteTx::Postgres(tx) => {
                let columns = pg_columns(rows)?;
                let sql = sql(&pg_table(&columns));
                found = pg_bind(sqlx::query(&sql), &columns)
                    .try_map(|row: PgRow| T::from_row(&row))
                    .fetch_all(&mut **tx)
                    .await?;
            }
        }
        Ok(found)
    }

    /// Runs the statement that `sql` makes of a table expression over
    /// `rows`, as [`WriteTx::fetch_with`] does.
    ///
    /// # Errors
    /// A database error, or a column whose rows mix text and integers.
    pub async fn execute_with<const N: usize>(
        &mut self,
        sql: impl Fn(&str) -> String,
        rows: &[[Value; N]],
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            WriteTx::Any(tx) => {
                for chunk in rows.chunks(CHUNK) {
                    let table = RowSet::new(tx, chunk);
                    let sql = sql(&table.table(tx, 1));
                    table.bind(sqlx::query(&sql)).execute(&mut **tx).await?;
                }
            }
            WriteTx::Postgres(tx) => {
                let columns = pg_columns(rows)?;
                let sql = sql(&pg_table(&columns));
                pg_bind(sqlx::query(&sql), &columns)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Commits.
    ///
    /// # Errors
    /// A database error: nothing of the transaction is recorded.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            WriteTx::Any(tx) => tx.commit().await,
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
            WriteTx::Any(tx) => tx.rollback().await,
            WriteTx::Postgres(tx) => tx.rollback().await,
        }
    }
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
fn pg_bind<'q>(
    query: sqlx::query::Query<'q, Postgres, PgArguments>,
    columns: &'q [PgColumn<'q>],
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
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
    /// Locks and reads the chain head (first statement of a writing
    /// transaction).
    ///
    /// # Errors
    /// A database error.
    pub async fn lock(conn: &mut AnyConnection) -> Result<Self, sqlx::Error> {
        conn.execute(LOCK_HEAD).await?;
        let row = sqlx::query(READ_HEAD).fetch_one(&mut *conn).await?;
        Ok(Head {
            seq: row.try_get("seq")?,
            hash: row.try_get("hash")?,
        })
    }

    /// Writes the head back (last statement of a writing transaction).
    ///
    /// # Errors
    /// A database error.
    pub async fn store(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        sqlx::query(STORE_HEAD)
            .bind(self.seq)
            .bind(&self.hash)
            .execute(&mut *conn)
            .await?;
        Ok(())
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

/// Lowercase hex of bytes.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
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
/// bound parameters). PostgreSQL takes any number of rows in one parameter.
pub const CHUNK: usize = 500;

fn is_sqlite(conn: &AnyConnection) -> bool {
    conn.backend_name() == "SQLite"
}

/// The `n`th (1-based) bind parameter of a statement that uses each once, in
/// order: `?` on SQLite, `$n` on PostgreSQL. SQLite looks a numbered
/// parameter's name up by a linear scan, so a statement with a thousand `$n`
/// costs a million steps to bind; anonymous `?` are bound by position.
#[must_use]
pub fn param(conn: &AnyConnection, n: usize) -> Cow<'static, str> {
    if is_sqlite(conn) {
        Cow::Borrowed("?")
    } else {
        Cow::Owned(format!("${n}"))
    }
}

/// The rows of one statement through the `Any` driver, as the backend
/// binds them best (recording uses [`WriteTx`]; the deadline engine this).
///
/// On PostgreSQL each column travels as one array parameter that the server
/// expands with `unnest`: N binds and one plan however many rows, where a
/// `VALUES` list of thousands of parameters cost more to bind and plan than
/// the rows cost to insert. (sqlx's `Any` driver binds no arrays, so each
/// goes as the text of an array literal, cast and parsed on the server;
/// [`WriteTx`] binds binary arrays instead.) On SQLite, which binds
/// positional parameters cheaply, the rows are a `VALUES` list of `?`.
pub struct RowSet<'r, const N: usize> {
    rows: &'r [[Value; N]],
    /// PostgreSQL: per column, the array literal and its element type.
    arrays: Option<Vec<(String, &'static str)>>,
}

impl<'r, const N: usize> RowSet<'r, N> {
    /// Prepares `rows` for `conn`'s backend.
    #[must_use]
    pub fn new(conn: &AnyConnection, rows: &'r [[Value; N]]) -> Self {
        let arrays = (!is_sqlite(conn)).then(|| column_arrays(rows));
        Self { rows, arrays }
    }

    /// A table expression with columns `column1` .. `columnN`, whose
    /// parameters start at `$first`.
    #[must_use]
    pub fn table(&self, conn: &AnyConnection, first: usize) -> String {
        match &self.arrays {
            Some(arrays) => {
                let names = (1..=N)
                    .map(|j| format!("column{j}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("(SELECT * FROM {} AS u({names}))", unnest(arrays, first))
            }
            None => {
                let mut sql = String::with_capacity(8 + self.rows.len() * (N * 2 + 3));
                sql.push_str("(VALUES ");
                push_values(&mut sql, conn, self.rows, first);
                sql.push(')');
                sql
            }
        }
    }

    /// Binds the rows (after any parameters bound before them).
    pub fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        match &self.arrays {
            Some(arrays) => arrays
                .iter()
                .fold(query, |query, (array, _)| query.bind(array.as_str())),
            None => bind_rows(query, self.rows),
        }
    }

    /// Runs `head SELECT * FROM unnest(...) suffix` (PostgreSQL) or
    /// `head VALUES ... suffix` (SQLite, in chunks of [`CHUNK`] rows).
    async fn insert(
        &self,
        conn: &mut AnyConnection,
        head: &str,
        suffix: &str,
    ) -> Result<(), sqlx::Error> {
        if let Some(arrays) = &self.arrays {
            let sql = format!("{head} SELECT * FROM {} {suffix}", unnest(arrays, 1));
            self.bind(sqlx::query(&sql)).execute(&mut *conn).await?;
            return Ok(());
        }
        for chunk in self.rows.chunks(CHUNK) {
            let mut sql = String::with_capacity(head.len() + chunk.len() * (N * 2 + 3));
            sql.push_str(head);
            sql.push_str(" VALUES ");
            push_values(&mut sql, conn, chunk, 1);
            sql.push(' ');
            sql.push_str(suffix);
            bind_rows(sqlx::query(&sql), chunk)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// `unnest(CAST($first AS text[]), CAST($first+1 AS bigint[]), ...)`.
fn unnest(arrays: &[(String, &'static str)], first: usize) -> String {
    let args = arrays
        .iter()
        .enumerate()
        .map(|(j, (_, ty))| format!("CAST(${} AS {ty}[])", first + j))
        .collect::<Vec<_>>()
        .join(", ");
    format!("unnest({args})")
}

/// `(p, p), (p, p)` for `rows`, parameters numbered from `first`.
fn push_values<const N: usize>(
    sql: &mut String,
    conn: &AnyConnection,
    rows: &[[Value; N]],
    first: usize,
) {
    let mut n = first;
    for (i, _) in rows.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for j in 0..N {
            if j > 0 {
                sql.push(',');
            }
            sql.push_str(&param(conn, n));
            n += 1;
        }
        sql.push(')');
    }
}

/// Each column of `rows` as a PostgreSQL array literal (`{"a","b"}`,
/// `{1,NULL}`) with its element type, taken from the first row.
fn column_arrays<const N: usize>(rows: &[[Value; N]]) -> Vec<(String, &'static str)> {
    (0..N)
        .map(|j| {
            let ty = match rows.first().map(|r| &r[j]) {
                Some(Value::Int(_) | Value::NullInt) => "bigint",
                _ => "text",
            };
            let mut array = String::with_capacity(2 + rows.len() * 16);
            array.push('{');
            for (i, row) in rows.iter().enumerate() {
                if i > 0 {
                    array.push(',');
                }
                match &row[j] {
                    Value::Text(s) => {
                        array.push('"');
                        for c in s.chars() {
                            if c == '"' || c == '\\' {
                                array.push('\\');
                            }
                            array.push(c);
                        }
                        array.push('"');
                    }
                    Value::Int(n) => array.push_str(&n.to_string()),
                    Value::NullInt => array.push_str("NULL"),
                }
            }
            array.push('}');
            (array, ty)
        })
        .collect()
}

/// Binds every value of `rows`, in order.
pub fn bind_rows<'q, const N: usize>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rows: &'q [[Value; N]],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for row in rows {
        for value in row {
            query = match value {
                Value::Text(s) => query.bind(s.as_str()),
                Value::Int(i) => query.bind(*i),
                Value::NullInt => query.bind(None::<i64>),
            };
        }
    }
    query
}

/// Runs `INSERT INTO table (columns) ... suffix` over `rows`.
///
/// # Errors
/// A database error.
pub async fn insert_rows<const N: usize>(
    conn: &mut AnyConnection,
    head: &str,
    suffix: &str,
    rows: &[[Value; N]],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    RowSet::new(conn, rows).insert(conn, head, suffix).await
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_column_mixing_text_and_integers_is_refused_not_bound() {
        let rows = [[Value::from("a")], [Value::Int(1)]];
        let err = pg_columns(&rows).err().unwrap();
        assert!(err.to_string().contains("column 1"), "{err}");
    }
}
