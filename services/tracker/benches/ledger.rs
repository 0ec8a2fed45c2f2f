//! Tracker benchmarks (issue 3), against the local RabbitMQ and PostgreSQL:
//!
//! 1. the broker's own rate: persistent messages through a quorum queue,
//!    confirms pipelined, consumed with manual acks at the tracker's
//!    prefetch (two batches);
//! 2. ledger ingest rate, SQLite and PostgreSQL: the ledger's own write
//!    rate (the tracker's batches prepared and written one after the other,
//!    no broker in the way), and a backlog on the tap recorded by a running
//!    tracker (which cannot go faster than the broker delivers);
//! 3. one deadline scan with N open obligations of which 1,000 are due, for
//!    N = a tenth of BENCH_OPEN and BENCH_OPEN: 100,000 and 1,000,000 by
//!    default (SQLite and PostgreSQL);
//! 4. the resident memory of a `tracker` process (the real binary) that has
//!    started on a ledger with 1,000,000 open obligations and run its first
//!    scan, against one on an empty ledger.
//!
//! `cargo bench -p refbus-tracker --bench ledger` (BENCH_MESSAGES, default
//! 20000; BENCH_OPEN, default 1000000, 0 skips the scan and memory parts;
//! BENCH_BATCH, the tracker's batch, default 500: `REFBUS_TRACKER_BATCH`'s
//! default until issue 17, 2,000 since; BENCH_ONLY=ledger measures the
//! ledger writes alone, BENCH_ONLY=ledger-sqlite on SQLite only). On
//! SQLite the ledger writes also report the bytes written per referral
//! and the cost of the first and last tenth of the batches: how the cost
//! grows with the ledger (issue 17: `BENCH_MESSAGES=200000`).
//! Results go to standard output.
//!
//! `cargo test` runs it too, without `--bench` ([`smoke`]): 300 messages and
//! 2,000 open obligations on a debug build, to show that every part still
//! runs and records what it is given; those figures mean nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use prost::Message;
use refbus_core::Directory;
use refbus_core::envelope::timestamp;
use refbus_core::policy::PolicyCatalogue;
use refbus_core::signing::{SIGNATURE_HEADER, Signed, development_signature};
use refbus_gateway::auth::AuthSettings;
use refbus_gateway::{BusSettings, Shared};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{
    Detainee, Envelope, Hop, HopBatch, HopReport, LegalHelpRequest, MessageKind,
};
use refbus_tracker::deadline;
use refbus_tracker::ledger::{Backend, Ledger};
use refbus_tracker::record::{Metrics, Observed, Recorder, Tally};
use refbus_tracker::{Clock, Tracker, TrackerSettings};
use tokio_util::sync::CancellationToken;

/// Whether this is a smoke run: `cargo test` (and so `.ci/run`) runs the
/// bench without `--bench`, which `cargo bench` always passes.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// How long a [`smoke`] run may take before it is taken as hung.
const SMOKE_LIMIT: Duration = Duration::from_secs(600);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn postgres_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time spent so far (ms) by this process, by the broker and by the
/// database, and the machine's busy and total time, from `/proc`: a
/// phase's difference says where its CPU went, which is steadier on a
/// shared machine than its rate alone.
#[derive(Clone, Copy, Debug, Default)]
struct CpuSample {
    tracker: f64,
    broker: f64,
    database: f64,
    busy: f64,
    total: f64,
}

impl CpuSample {
    fn now() -> Self {
        let tick_ms = 1000.0 / 100.0; // USER_HZ
        // utime, stime, cutime, cstime: exited children (a PostgreSQL
        // backend that closed) count in their parent's cutime.
        let times = |stat: &str| -> f64 {
            stat.rsplit_once(')')
                .map(|(_, rest)| {
                    rest.split_whitespace()
                        .skip(11)
                        .take(4)
                        .filter_map(|t| t.parse::<f64>().ok())
                        .sum::<f64>()
                })
                .unwrap_or(0.0)
                * tick_ms
        };
        let mut sample = Self {
            tracker: std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| times(&s)),
            ..Self::default()
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let comm = stat
                .split_once('(')
                .and_then(|(_, rest)| rest.rsplit_once(')'))
                .map_or("", |(comm, _)| comm);
            match comm {
                "beam.smp" | "erl_child_setup" => sample.broker += times(&stat),
                "postgres" => sample.database += times(&stat),
                _ => {}
            }
        }
        let machine = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let jiffies: Vec<f64> = machine
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        sample.total = jiffies.iter().take(8).sum::<f64>() * tick_ms;
        sample.busy = sample.total - jiffies.iter().skip(3).take(2).sum::<f64>() * tick_ms;
        sample
    }

    /// "CPU per 1,000 messages: ..." for what happened since `self`.
    fn report(self, messages: usize) -> String {
        let now = Self::now();
        let per = 1000.0 / messages as f64;
        format!(
            "CPU per 1,000 messages: tracker {:.0} ms, broker {:.0} ms, PostgreSQL {:.0} ms; both cores {:.0} % busy",
            (now.tracker - self.tracker) * per,
            (now.broker - self.broker) * per,
            (now.database - self.database) * per,
            100.0 * (now.busy - self.busy) / (now.total - self.total).max(1.0),
        )
    }
}

fn envelope(i: usize) -> Envelope {
    let at = Utc::now();
    Envelope {
        // The id the centre's gateway gives it: UUIDv5, spread over the key space.
        id: refbus_core::envelope::envelope_id("dz-detention-centre", &format!("bench-{i}")),
        kind: MessageKind::LegalHelpRequest as i32,
        sender: "dz-detention-centre".into(),
        recipient: "dz-duty-desk".into(),
        clock_started_at: Some(timestamp(at)),
        submitted_at: Some(timestamp(at)),
        in_reply_to: String::new(),
        idempotency_key: format!("bench-{i}"),
        payload: Some(Payload::LegalHelpRequest(LegalHelpRequest {
            detainee: Some(Detainee {
                name: "张三".into(),
                id_number: "500225199001011234".into(),
                custody_number: "DZ-1".into(),
            }),
            detention_centre: "dz-detention-centre".into(),
            matter: "x".repeat(200),
        })),
        ..Envelope::default()
    }
}

/// Publishes `n` bodies to `queue` with confirms pipelined (1,000 in
/// flight), each signed by the detention centre as its service would sign it.
async fn publish(channel: &lapin::Channel, queue: &str, bodies: &[Vec<u8>]) {
    let mut pending = Vec::with_capacity(1000);
    for body in bodies {
        let signature = development_signature("dz-detention-centre", Signed::Envelope, body);
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            SIGNATURE_HEADER.into(),
            lapin::types::AMQPValue::LongString(signature.as_str().into()),
        );
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .unwrap();
        pending.push(confirm);
        if pending.len() == 1000 {
            for c in pending.drain(..) {
                c.await.unwrap();
            }
        }
    }
    for c in pending {
        c.await.unwrap();
    }
}

/// A connection of the benchmark's own and a channel on it in confirm mode.
async fn confirming_channel() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// 1. The broker's own rate.
async fn broker_rate(bodies: &[Vec<u8>], prefetch: u16) -> (f64, f64) {
    let (conn, channel) = confirming_channel().await;
    let queue = format!("bench-raw-{}", std::process::id());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    let started = Instant::now();
    publish(&channel, &queue, bodies).await;
    let publish_rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
    let consumer_channel = conn.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let cpu = CpuSample::now();
    for _ in 0..bodies.len() {
        let d = consumer.next().await.unwrap().unwrap();
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let consume_rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
    println!("  deliver+ack: {}", cpu.report(bodies.len()));
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    (publish_rate, consume_rate)
}

fn tracker_settings(
    database_url: Option<String>,
    schema: Option<String>,
    data_dir: std::path::PathBuf,
) -> TrackerSettings {
    TrackerSettings {
        database_url,
        database_schema: schema,
        data_dir,
        policy: concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy").into(),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        batch: env_usize("BENCH_BATCH", 500),
        linger: refbus_gateway::settings::parse_duration(refbus_tracker::app::DEFAULT_LINGER)
            .unwrap(),
    }
}

/// 2. Ingest: a backlog of `bodies` on the tap, recorded by the tracker.
async fn ingest_rate(name: &str, bodies: &[Vec<u8>], tracker: &TrackerSettings) -> f64 {
    let namespace = format!("bench{}{}", name, std::process::id());
    let shutdown = CancellationToken::new();
    let settings = BusSettings {
        amqp_url: amqp_url(),
        directory: concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        )
        .into(),
        namespace,
        prefetch: 300,
        confirm_timeout: Duration::from_secs(5),
        queue_expires: Some(Duration::from_secs(60)),
        declare_topology: true,
        inbox_db: std::env::temp_dir()
            .join(format!("refbus-bench-inbox-{}.db", std::process::id())),
        signing_keys: "development".into(),
        auth: AuthSettings::bearer(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/tokens.toml"
        )),
        amqp_ca: None,
        development: false,
        policy: concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy").into(),
        lawyer_service: refbus_gateway::settings::LawyerServiceSettings::default(),
        hop_batch: refbus_gateway::settings::HopBatchSettings::default(),
    };
    let shared = Shared::connect(settings, shutdown.clone()).await.unwrap();
    let (conn, channel) = confirming_channel().await;
    publish(&channel, &shared.bus.topology().tap_queue(), bodies).await;
    let built = Tracker::build(tracker, &shared, Clock::System)
        .await
        .unwrap();
    let ledger = built.ledger.clone();
    let metrics = built.metrics.clone();
    let started = Instant::now();
    let cpu = CpuSample::now();
    if std::env::var_os("BENCH_MARK").is_some() {
        println!("START {name}");
    }
    let task = tokio::spawn(built.run());
    while metrics.recorded.load(std::sync::atomic::Ordering::Relaxed) < bodies.len() as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
    println!("  ingest, {name}: {}", cpu.report(bodies.len()));
    shutdown.cancel();
    let _ = task.await;
    shared.bus.topology().delete(&channel).await.unwrap();
    let _ = conn.close(200, "done".into()).await;
    drop(ledger);
    rate
}

/// 2a. The ledger's own write rate: the messages decoded, then recorded in
/// the tracker's batches, each prepared and written in its own transaction
/// (what the tracker does, without the overlap of preparing the next batch
/// while writing this one).
async fn ledger_rate(bodies: &[Vec<u8>], tracker: &TrackerSettings) -> f64 {
    let directory = Arc::new(
        Directory::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .unwrap(),
    );
    let policy = Arc::new(PolicyCatalogue::load(&tracker.policy, &directory).unwrap());
    let recorder = Recorder { directory, policy };
    let ledger = Ledger::connect(
        &tracker.database().unwrap(),
        tracker.database_schema.as_deref(),
    )
    .await
    .unwrap();
    let observed: Vec<Observed> = bodies
        .iter()
        .map(|b| Observed::decode("legal_help_request", b).unwrap())
        .collect();
    let started = Instant::now();
    let cpu = CpuSample::now();
    let written_before = bytes_written();
    // (preparing the rows, writing and committing them), wall time.
    let mut spent = (Duration::ZERO, Duration::ZERO);
    // Per batch: (referrals, writing's wall time, bytes written), to show
    // how the cost grows with the ledger.
    let mut batches: Vec<(usize, Duration, u64)> = Vec::new();
    for batch in observed.chunks(tracker.batch) {
        let (wrote, written) = (spent.1, bytes_written());
        // As on the bus: the referrals, then the desk gateway's batch of
        // their hops (delivered, acknowledged), each hop its own row and
        // the batch one ledger event.
        let hops = hop_batch(batch);
        // The tracker's gatherer found the referrals' reply rights (given
        // by the batch before) and checked the hops against them.
        let referrals: HashSet<String> = batch.iter().map(|o| o.message_id().to_owned()).collect();
        for (messages, expected, rights_checked) in [
            (
                batch.iter().collect::<Vec<_>>(),
                batch.len(),
                HashSet::new(),
            ),
            (vec![&hops], 2 * batch.len(), referrals),
        ] {
            let preparing = Instant::now();
            let prepared = recorder.prepare(&messages, Utc::now(), &rights_checked);
            spent.0 += preparing.elapsed();
            let writing = Instant::now();
            let mut tx = ledger.begin_write().await.unwrap();
            let mut head = tx.lock_head().await.unwrap();
            let mut tally = Tally::default();
            recorder
                .write(&mut tx, &mut head, &prepared, Utc::now(), &mut tally)
                .await
                .unwrap();
            tx.store_head(&head).await.unwrap();
            tx.commit().await.unwrap();
            spent.1 += writing.elapsed();
            assert_eq!(tally.recorded as usize, expected);
        }
        batches.push((
            batch.len(),
            spent.1 - wrote,
            bytes_written().saturating_sub(written),
        ));
    }
    let rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "  ledger writes (a referral and its two hops), {:?}: {}; per referral, preparing its rows {:.1} µs, writing them {:.1} µs (wall)",
        ledger.backend,
        cpu.report(bodies.len()),
        spent.0.as_secs_f64() * 1e6 / bodies.len() as f64,
        spent.1.as_secs_f64() * 1e6 / bodies.len() as f64,
    );
    if ledger.backend == Backend::Sqlite {
        // SQLite writes from this process (its WAL and checkpoints), so
        // what this process wrote is what the ledger cost the disk.
        let tenth = batches.len().div_ceil(10);
        let per_referral = |part: &[(usize, Duration, u64)]| {
            let n = part.iter().map(|b| b.0).sum::<usize>().max(1) as f64;
            (
                part.iter().map(|b| b.1.as_secs_f64()).sum::<f64>() * 1e6 / n,
                part.iter().map(|b| b.2).sum::<u64>() as f64 / 1024.0 / n,
            )
        };
        let first = per_referral(&batches[..tenth]);
        let last = per_referral(&batches[batches.len() - tenth..]);
        println!(
            "  bytes written per referral: {:.1} KiB in all; first tenth of the batches {:.1} µs and {:.1} KiB per referral, last tenth (the ledger {} referrals larger) {:.1} µs and {:.1} KiB",
            bytes_written().saturating_sub(written_before) as f64 / 1024.0 / bodies.len() as f64,
            first.0,
            first.1,
            bodies.len()
                - batches[batches.len() - tenth..]
                    .iter()
                    .map(|b| b.0)
                    .sum::<usize>(),
            last.0,
            last.1,
        );
    }
    ledger.close().await;
    rate
}

/// Bytes this process has passed to `write` and `pwrite` so far
/// (`/proc/self/io`, `wchar`).
fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The desk gateway's hop batch for `referrals`: delivered and
/// acknowledged, by the recipient, as the gateway reports them.
fn hop_batch(referrals: &[Observed]) -> Observed {
    let at = Some(timestamp(Utc::now()));
    let mut hops = Vec::with_capacity(2 * referrals.len());
    for referral in referrals {
        let Observed::Envelope(envelope) = referral else {
            unreachable!("the bench records referrals")
        };
        for hop in [Hop::Delivered, Hop::Acknowledged] {
            hops.push(HopReport {
                id: refbus_core::envelope::hop_report_id(
                    &envelope.id,
                    refbus_core::kind::hop_code(hop),
                    &envelope.recipient,
                ),
                referral_id: envelope.id.clone(),
                hop: hop as i32,
                agency: envelope.recipient.clone(),
                at,
            });
        }
    }
    let batch = HopBatch { hops }.encode_to_vec();
    Observed::decode(refbus_bus::topology::HOP_BATCH_KEY, &batch).unwrap()
}

/// 3 and 4: `open` obligations pending, 1,000 of them due; one scan.
async fn scan_cost(ledger: &Ledger, open: usize, round: &str, scan: bool) -> (Duration, usize) {
    sqlx::query("DELETE FROM obligations")
        .execute(&ledger.pool)
        .await
        .unwrap();
    // The wall clock: the tracker process of the memory part scans with it.
    let now = Utc::now().timestamp_millis();
    let chunk = 500;
    let mut i = 0;
    while i < open {
        let mut tx = ledger.pool.begin().await.unwrap();
        let end = (i + 20_000).min(open);
        while i < end {
            let n = chunk.min(end - i);
            let mut sql = String::from(
                "INSERT INTO obligations (referral_at, id, referral_id, rule, kind, duty, bearer, meets_agency, met_by, clock_started_at, due_at, met_at, overdue_at, notify) VALUES ",
            );
            for k in 0..n {
                let j = i + k;
                // The first 1,000 are due an hour ago; the rest over the next weeks.
                let due = if j < 1000 {
                    now - 3_600_000
                } else {
                    now + 60_000 + (j as i64 % 1_000_000) * 1_000
                };
                if k > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("({},'{round}o{j}','{round}r{j}','CQ-1.1b','legal_help_request','d','dz-detention-centre','dz-duty-desk','delivered',{},{due},NULL,NULL,'dz-detention-centre')", due - 86_400_000, due - 86_400_000));
            }
            sqlx::query(&sql).execute(&mut *tx).await.unwrap();
            i += n;
        }
        tx.commit().await.unwrap();
    }
    // A million rows loaded in seconds: refresh the planner's statistics,
    // as autovacuum does on a ledger that grew to this size over time.
    if ledger.backend == Backend::Postgres {
        sqlx::query("ANALYZE obligations")
            .execute(&ledger.pool)
            .await
            .unwrap();
    }
    if !scan {
        return (Duration::ZERO, 0);
    }
    let metrics = Metrics::default();
    let started = Instant::now();
    let at = chrono::DateTime::from_timestamp_millis(now).unwrap();
    let marked = deadline::scan(ledger, at, at, &metrics).await.unwrap();
    (started.elapsed(), marked)
}

/// Starts the `tracker` binary on `settings`'s ledger, waits for its first
/// scan to mark `due` obligations overdue (and a second for it to settle),
/// and reads its resident memory.
async fn tracker_rss(settings: &TrackerSettings, ledger: &Ledger, due: i64) -> f64 {
    // A namespace per backend: the first run's queues, left to expire
    // (REFBUS_QUEUE_EXPIRES), must not expire under the second run's
    // tracker, which the broker then cut off with INTERNAL_ERROR as it
    // published an overdue notice into an inbox queue being deleted.
    let backend = if settings.database_url.is_some() {
        "pg"
    } else {
        "sqlite"
    };
    let namespace = format!("benchmem{}{backend}", std::process::id());
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tracker"));
    command
        .arg("run")
        .env("AMQP_URL", amqp_url())
        .env("REFBUS_NAMESPACE", &namespace)
        .env("REFBUS_QUEUE_EXPIRES", "30s")
        .env(
            "REFBUS_DIRECTORY",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../deploy/local/directory.toml"
            ),
        )
        .env("REFBUS_POLICY", &settings.policy)
        .env("REFBUS_DATA_DIR", &settings.data_dir)
        .env("REFBUS_TRACKER_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "error")
        .env(
            "REFBUS_TOKENS",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../deploy/local/tokens.toml"
            ),
        )
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = &settings.database_url {
        command.env("DATABASE_URL", url);
    }
    if let Some(schema) = &settings.database_schema {
        command.env("REFBUS_DATABASE_SCHEMA", schema);
    }
    let mut child = command.spawn().unwrap();
    loop {
        let marked: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM obligations WHERE overdue_at IS NOT NULL")
                .fetch_one(&ledger.pool)
                .await
                .unwrap();
        if marked >= due {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mib(child.id().unwrap());
    child.kill().await.unwrap();
    rss
}

/// Drops a PostgreSQL schema the benchmark made, on a plain connection:
/// a `Ledger` would first migrate the database's default schema, which is
/// not the bench's to change.
async fn drop_schema(url: &str, schema: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if smoke() {
        println!(
            "smoke run (no --bench): toy sizes on this build; `cargo bench -p refbus-tracker --bench ledger` measures"
        );
        tokio::time::timeout(SMOKE_LIMIT, run())
            .await
            .expect("the ledger bench's smoke run did not finish in 10 minutes");
    } else {
        run().await;
    }
}

async fn run() {
    let smoke = smoke();
    let messages = env_usize("BENCH_MESSAGES", if smoke { 300 } else { 20_000 });
    let open = env_usize("BENCH_OPEN", if smoke { 2_000 } else { 1_000_000 });
    let bodies: Vec<Vec<u8>> = (0..messages).map(|i| envelope(i).encode_to_vec()).collect();
    println!(
        "refbus tracker benchmarks: {messages} messages of {} bytes; {open} open obligations",
        bodies[0].len()
    );

    // The tracker's prefetch: four batches (at least the bus's 300).
    let prefetch = u16::try_from((4 * env_usize("BENCH_BATCH", 500)).max(300)).unwrap_or(u16::MAX);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let ledger_only = only == "ledger" || only == "ledger-sqlite";
    let sqlite_only = only == "ledger-sqlite";
    let consume = if ledger_only {
        f64::NAN
    } else {
        let (publish, consume) = broker_rate(&bodies, prefetch).await;
        println!(
            "broker (quorum queue, persistent, confirms, manual ack, prefetch {prefetch}): publish {publish:.0} msg/s, deliver+ack {consume:.0} msg/s"
        );
        consume
    };

    let dir = std::env::temp_dir().join(format!("refbus-bench-{}", std::process::id()));
    let schema = format!("bench{}", std::process::id());
    for (name, settings) in [
        (
            "SQLite:    ",
            tracker_settings(None, None, dir.join("ledger-only")),
        ),
        (
            "PostgreSQL:",
            tracker_settings(
                Some(postgres_url()),
                Some(format!("{schema}l")),
                dir.clone(),
            ),
        ),
    ] {
        if ledger_only && sqlite_only && settings.database_url.is_some() {
            continue;
        }
        let rate = ledger_rate(&bodies, &settings).await;
        if ledger_only {
            println!("ledger writes, {name} {rate:.0} msg/s");
        } else {
            println!(
                "ledger writes, {name} {rate:.0} msg/s ({:.2}x the broker's delivery rate)",
                rate / consume
            );
        }
        if let Some(schema) = &settings.database_schema {
            drop_schema(&settings.database().unwrap(), schema).await;
        }
    }
    if ledger_only {
        if std::env::var_os("BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            println!("kept {}", dir.display());
        }
        return;
    }
    let sqlite = tracker_settings(None, None, dir.clone());
    let rate = ingest_rate("sqlite", &bodies, &sqlite).await;
    println!(
        "tracker ingest from the tap, SQLite:     {rate:.0} msg/s ({:.2}x the broker's delivery rate)",
        rate / consume
    );
    let pg = tracker_settings(Some(postgres_url()), Some(schema.clone()), dir.clone());
    let rate = ingest_rate("pg", &bodies, &pg).await;
    println!(
        "tracker ingest from the tap, PostgreSQL: {rate:.0} msg/s ({:.2}x the broker's delivery rate)",
        rate / consume
    );

    let scans = if open == 0 {
        Vec::new()
    } else {
        vec![("SQLite", &sqlite), ("PostgreSQL", &pg)]
    };
    for (name, settings) in scans {
        let ledger = Arc::new(
            Ledger::connect(
                &settings.database().unwrap(),
                settings.database_schema.as_deref(),
            )
            .await
            .unwrap(),
        );
        sqlx::query("DELETE FROM obligations")
            .execute(&ledger.pool)
            .await
            .unwrap();
        let idle = tracker_rss(settings, &ledger, 0).await;
        for n in [open / 10, open].into_iter().filter(|n| *n > 0) {
            let (took, marked) = scan_cost(&ledger, n, &format!("s{n}-"), true).await;
            assert_eq!(
                marked,
                n.min(1000),
                "the scan marks every due obligation overdue, and only those"
            );
            println!(
                "scan, {name}: {n} open, {marked} due: {:.1} ms",
                took.as_secs_f64() * 1000.0
            );
        }
        // Due again, for the tracker process's first scan: under new ids,
        // since the ledger already holds the overdue events of the old ones.
        sqlx::query("UPDATE obligations SET id = id || '-again', overdue_at = NULL WHERE overdue_at IS NOT NULL")
            .execute(&ledger.pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM overdue_notices")
            .execute(&ledger.pool)
            .await
            .unwrap();
        let loaded = tracker_rss(settings, &ledger, 1000).await;
        println!(
            "memory, {name}: tracker process resident {loaded:.1} MiB with {open} open obligations ({idle:.1} MiB on an empty ledger)"
        );
        if let Some(schema) = &settings.database_schema {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .execute(&ledger.pool)
                .await
                .unwrap();
        }
        ledger.close().await;
    }
    if open == 0 {
        drop_schema(&pg.database().unwrap(), &schema).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
