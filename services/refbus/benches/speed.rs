//! Issues 6 and 17: what refbus costs, as a ratio to the raw broker measured
//! in the same run on the same machine, and where the distance goes.
//!
//! `cargo bench -p refbus --bench speed` (RabbitMQ at `AMQP_URL`). Knobs:
//! `BENCH_MESSAGES` (20000 per saturation run: long enough that the 10 ms
//! clock ticks of `/proc` are about 1 µs per referral), `BENCH_IN_FLIGHT`
//! (64, for every side), `BENCH_SECONDS` (10, each fixed-load run),
//! `BENCH_ACKERS` (16), `BENCH_ACK_BATCH` (100); `BENCH_ONLY=refbus` runs
//! the baselines briefly and then the refbus saturation run alone, for a
//! profiler to attach to its processes (BENCHMARKS.md, issue 17), and
//! `BENCH_ROUNDS` times over (1) on the same bus, so that the later rounds
//! measure a grown ledger.
//!
//! 1. **raw**: lapin publishing persistent messages of the size refbus
//!    publishes (the same signed envelope) to a quorum queue with publisher
//!    confirms, `BENCH_IN_FLIGHT` in flight, consumed on another connection
//!    with manual acks (one per message) at refbus's prefetch (200).
//! 2. **raw-layout**: refbus's broker layout with no application work, in a
//!    namespace of its own (declared with refbus's own [`Topology`], deleted
//!    after): the same envelope published to `NS.deliveries` with routing
//!    key `RECIPIENT.KIND` (mandatory, persistent, confirmed), routed to the
//!    desk's inbox quorum queue and to the tap; a consumer on the inbox acks
//!    each delivery, and its two hops (delivered, acknowledged) go out as
//!    refbus sends them (issue 17): one `event.batch` message every 10 ms
//!    carrying the hops gathered since, pre-signed bytes of their size,
//!    confirmed, into the tap; a consumer on the tap acks everything.
//!    Three connections, as refbus's three processes have.
//!    Envelopes go as refbus sends them (issue 17, `refbus_bus::envelopes`):
//!    alone while fewer than four publishes of their route are in flight,
//!    else in the next `envelope_batch` message of that route (taking up
//!    to 256 of what waited: group commit, no timer), still
//!    through the fan-out; the inbox consumer acks each AMQP message once
//!    it has counted the envelopes it carries.
//!    **raw-layout-unbatched**: the same with one message per envelope,
//!    refbus's layout before envelope batches.
//! 3. **refbus**: legal-help requests submitted over gRPC to a real
//!    `refbus serve detention-centre` process, received on the duty desk's
//!    `Inbox` stream from a `refbus serve legal-aid` process and acknowledged,
//!    with a `refbus tracker` process (SQLite) recording it all.
//! 4. For each: throughput at saturation, with the CPU each process spent
//!    (utime + stime from `/proc/PID/stat`) per referral, the broker's
//!    `beam.smp` included; then latency (submit or publish to receipt on the
//!    inbox) p50/p99/p99.9 at the same fixed offered loads for every side,
//!    500 msg/s and half refbus's saturation rate. Also each refbus
//!    process's resident memory idle and at its peak under load, the
//!    tracker's lag after the load stops and its time back to zero, the
//!    time `refbus up` takes from start to its first accepted `Submit`, and
//!    issue 17's targets, each met or not in this run.
//!
//! `cargo test` runs it too (without `--bench`: [`smoke`]), at toy sizes
//! on a debug build, to show that it still runs end to end and loses
//! nothing; those figures mean nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use prost::Message;
use refbus_bus::Topology;
use refbus_core::KindExt;
use refbus_core::MessageKind;
use refbus_core::signing::{SIGNATURE_HEADER, Signed, development_signature};
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::{
    AcknowledgeRequest, EnvelopeBatch, Hop, HopReport, InboxRequest, SignedEnvelope,
};
use refbus_tests::fixtures::{CENTRE, DESK, legal_help, legal_help_at, submit};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::service::Interceptor;
use tonic::transport::Channel;

const PREFETCH: u16 = 200;
static ACK_MICROS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static ACK_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether this is a smoke run: `cargo test` (and so `.ci/run`) runs the
/// bench without `--bench`, which `cargo bench` always passes. A smoke run
/// sends [`SMOKE_MESSAGES`] per saturation run and holds each fixed load
/// for a second; it asserts that nothing failed or went missing on any
/// side and that the ledger holds every referral and hop, never a timing.
fn smoke() -> bool {
    static SMOKE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SMOKE.get_or_init(|| !std::env::args().any(|a| a == "--bench"))
}

/// Referrals per saturation run in a [`smoke`] run.
const SMOKE_MESSAGES: usize = 400;

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

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Latencies of one run, in microseconds.
#[derive(Default)]
struct Latencies(Vec<u64>);

impl Latencies {
    fn percentile(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.sort_unstable();
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let index = ((self.0.len() as f64 * p).ceil() as usize).clamp(1, self.0.len()) - 1;
        #[allow(clippy::cast_precision_loss)]
        let ms = self.0[index] as f64 / 1000.0;
        ms
    }
}

/// What one side measured at one fixed offered load.
struct Load {
    offered: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    delivered_at_load: usize,
    failed: usize,
}

#[allow(clippy::cast_precision_loss)]
fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

/// When each message was sent, by key, and the latencies of those received.
#[derive(Default)]
struct Clocking {
    sent: Mutex<HashMap<String, Instant>>,
    latencies: Mutex<Latencies>,
    received: AtomicUsize,
    /// Sends that failed (counted in `received`, so that a run ends).
    failed: AtomicUsize,
    done: tokio::sync::Notify,
    target: AtomicUsize,
}

impl Clocking {
    fn sent(&self, key: String) {
        self.sent.lock().unwrap().insert(key, Instant::now());
    }

    fn received(&self, key: &str) {
        if let Some(at) = self.sent.lock().unwrap().remove(key) {
            let micros = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.latencies.lock().unwrap().0.push(micros);
        }
        let n = self.received.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.target.load(Ordering::Acquire) {
            self.done.notify_one();
        }
    }

    fn expect(&self, n: usize) {
        self.received.store(0, Ordering::Release);
        self.failed.store(0, Ordering::Release);
        self.target.store(n, Ordering::Release);
        *self.latencies.lock().unwrap() = Latencies::default();
    }

    async fn wait(&self) {
        while self.received.load(Ordering::Acquire) < self.target.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.done.notified()).await;
        }
    }

    fn take(&self) -> Latencies {
        std::mem::take(&mut *self.latencies.lock().unwrap())
    }
}

/// A refbus envelope as the detention centre's service publishes it, and
/// its signature: the raw side publishes the same bytes and header.
fn sample_message() -> (Vec<u8>, String) {
    let mut envelope = legal_help("sample");
    envelope.id = refbus_core::envelope_id(CENTRE, "sample");
    envelope.kind = refbus_core::MessageKind::LegalHelpRequest as i32;
    envelope.submitted_at = envelope.clock_started_at;
    let body = envelope.encode_to_vec();
    let signature = development_signature(CENTRE, Signed::Envelope, &body);
    (body, signature)
}

// ------------------------------------------------------------------- CPU

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`, 100 on
/// Linux: a tick is 10 ms).
fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields
    // after it. Field 3 (state) comes first; utime is 14, stime 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The broker: the `beam.smp` process running RabbitMQ, found by its
/// command name and command line.
fn broker_pid() -> Option<u32> {
    let mut beams = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "beam.smp" {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let rabbit = String::from_utf8_lossy(&cmdline).contains("rabbit");
        beams.push((rabbit, pid));
    }
    beams.sort_unstable();
    beams.last().map(|&(_, pid)| pid)
}

/// Busy and total jiffies of the whole machine (`/proc/stat`, every core).
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A process whose CPU a run counts.
#[derive(Clone)]
struct Watched {
    name: &'static str,
    pid: Option<u32>,
    /// One of refbus's own processes (counted in the refbus total).
    refbus: bool,
}

/// CPU of the watched processes and of the machine at one moment.
struct CpuSnapshot {
    at: Instant,
    ticks: Vec<Option<u64>>,
    machine: (u64, u64),
}

fn cpu_snapshot(watched: &[Watched]) -> CpuSnapshot {
    CpuSnapshot {
        at: Instant::now(),
        ticks: watched.iter().map(|w| w.pid.and_then(cpu_ticks)).collect(),
        machine: machine_jiffies(),
    }
}

/// What a run cost in CPU: µs per referral for each watched process.
struct CpuUse {
    rows: Vec<(&'static str, bool, Option<f64>)>,
    seconds: f64,
    /// Busy cores of the whole machine over the run (every process).
    machine_cores: f64,
    referrals: usize,
}

impl CpuUse {
    #[allow(clippy::cast_precision_loss)]
    fn between(watched: &[Watched], before: &CpuSnapshot, after: &CpuSnapshot, n: usize) -> Self {
        let tick_micros = 1_000_000.0 / clock_ticks_per_second() as f64;
        let rows = watched
            .iter()
            .zip(before.ticks.iter().zip(&after.ticks))
            .map(|(w, (b, a))| {
                let per = match (b, a) {
                    (Some(b), Some(a)) => {
                        Some(a.saturating_sub(*b) as f64 * tick_micros / n.max(1) as f64)
                    }
                    _ => None,
                };
                (w.name, w.refbus, per)
            })
            .collect();
        let seconds = after.at.duration_since(before.at).as_secs_f64();
        let busy = after.machine.0.saturating_sub(before.machine.0) as f64;
        let total = after.machine.1.saturating_sub(before.machine.1).max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
        Self {
            rows,
            seconds,
            machine_cores: busy / total * cores,
            referrals: n,
        }
    }

    fn of(&self, name: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.0 == name).and_then(|r| r.2)
    }

    /// refbus's own processes together.
    fn refbus_total(&self) -> f64 {
        self.rows.iter().filter(|r| r.1).filter_map(|r| r.2).sum()
    }

    fn print(&self, label: &str) {
        let mut parts: Vec<String> = self
            .rows
            .iter()
            .map(|(name, _, per)| match per {
                Some(per) => format!("{name} {per:.0}"),
                None => format!("{name} (not found)"),
            })
            .collect();
        if self.rows.iter().any(|r| r.1) {
            parts.push(format!("refbus total {:.0}", self.refbus_total()));
        }
        println!(
            "  CPU per referral, {label} ({} referrals in {:.1} s; the machine {:.2} cores busy): {} µs",
            self.referrals,
            self.seconds,
            self.machine_cores,
            parts.join(", ")
        );
    }
}

// ---------------------------------------------------------------- raw side

struct Raw {
    publisher: lapin::Channel,
    _publish_conn: Connection,
    consume_conn: Connection,
    queue: String,
    body: Vec<u8>,
    properties: BasicProperties,
    clocking: Arc<Clocking>,
}

impl Raw {
    async fn start() -> Self {
        let queue = format!("bench-raw-{}", std::process::id());
        let publish_conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let publisher = publish_conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        publisher
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let (body, signature) = sample_message();
        let mut headers = FieldTable::default();
        headers.insert(
            SIGNATURE_HEADER.into(),
            AMQPValue::LongString(signature.as_str().into()),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let consume_conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let clocking = Arc::new(Clocking::default());
        let consumer_channel = consume_conn.create_channel().await.unwrap();
        consumer_channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let receiving = clocking.clone();
        tokio::spawn(async move {
            let _channel = consumer_channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let key = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default();
                delivery.ack(BasicAckOptions::default()).await.unwrap();
                receiving.received(&key);
            }
        });
        Self {
            publisher,
            _publish_conn: publish_conn,
            consume_conn,
            queue,
            body,
            properties,
            clocking,
        }
    }

    async fn publish(&self, key: String) {
        self.clocking.sent(key.clone());
        self.publisher
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &self.body,
                self.properties.clone().with_message_id(key.as_str().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn stop(&self) {
        let _ = self
            .publisher
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.consume_conn.close(200, "done".into()).await;
    }
}

// --------------------------------------------------------- raw-layout side

/// A hop report of the size the desk's gateway publishes, signed once: the
/// layout side publishes these bytes, doing none of refbus's work.
fn sample_hop(hop: Hop) -> (Vec<u8>, String) {
    let referral = refbus_core::envelope_id(CENTRE, "sample");
    let code = refbus_core::kind::hop_code(hop);
    let report = HopReport {
        id: refbus_core::envelope::hop_report_id(&referral, code, DESK),
        referral_id: referral,
        hop: hop as i32,
        agency: DESK.into(),
        at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp(),
            nanos: 123_456_789,
        }),
    };
    let body = report.encode_to_vec();
    let signature = development_signature(DESK, Signed::HopReport, &body);
    (body, signature)
}

fn signed_properties(signature: &str, content_type: &str, kind: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        SIGNATURE_HEADER.into(),
        AMQPValue::LongString(signature.into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(content_type.into())
        .with_type(kind.into())
        .with_headers(headers)
}

const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// refbus's broker layout with no application work.
struct Layout {
    topology: Topology,
    publisher: lapin::Channel,
    publish_conn: Connection,
    inbox_conn: Connection,
    tap_conn: Connection,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    /// Publish to delivery on the desk's inbox.
    clocking: Arc<Clocking>,
    /// Deliveries acknowledged on the tap (three per referral).
    tapped: Arc<AtomicUsize>,
    /// Hop batches not confirmed (none expected).
    hop_failures: Arc<AtomicUsize>,
    /// Hops gathered and not yet sent, and hop batches sent.
    pending_hops: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
    /// Envelopes published so far.
    published: AtomicUsize,
    /// Envelopes batched per route behind a publish in flight (see
    /// [`Lane`]); none for the unbatched variant.
    lane: Option<Arc<Lane>>,
}

/// An envelope waiting for the lane: its id, and where its confirm goes.
type Waiting = (String, tokio::sync::oneshot::Sender<bool>);

/// The desk's route, as `refbus_bus::envelopes` keeps it: whether a
/// publish is in flight, and the envelopes that wait for it (their ids and
/// where their confirm goes).
struct Lane {
    /// Publishes in flight, and the envelopes waiting for room.
    state: Mutex<(usize, Vec<Waiting>)>,
    channel: lapin::Channel,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    signature: String,
    /// Envelope messages published (alone or batches): the tap's copies.
    messages: AtomicUsize,
    batches: AtomicUsize,
}

impl Lane {
    /// Publishes what waits, a batch of at most 256 at a time, until
    /// nothing does; then gives its place in the lane back.
    async fn drain(self: Arc<Self>) {
        let kind = MessageKind::LegalHelpRequest.code();
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/x-protobuf; proto=refbus.v1.EnvelopeBatch".into())
            .with_type("envelope_batch".into());
        loop {
            let taken: Vec<_> = {
                let mut state = self.state.lock().unwrap();
                if state.1.is_empty() {
                    state.0 -= 1;
                    return;
                }
                let n = state.1.len().min(256);
                state.1.drain(..n).collect()
            };
            // As refbus's lanes batch: one signature for the batch.
            let batch = EnvelopeBatch {
                envelopes: taken
                    .iter()
                    .map(|(id, _)| SignedEnvelope {
                        envelope: self.body.clone(),
                        signature: String::new(),
                        id: id.clone(),
                        kind: kind.into(),
                    })
                    .collect(),
                digests_signature: self.signature.clone(),
                digests: vec![0; 32 * taken.len()],
            }
            .encode_to_vec();
            self.messages.fetch_add(1, Ordering::AcqRel);
            self.batches.fetch_add(1, Ordering::AcqRel);
            let confirmed = match self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    self.routing_key.as_str().into(),
                    MANDATORY,
                    &batch,
                    properties.clone(),
                )
                .await
            {
                Ok(confirm) => matches!(confirm.await, Ok(lapin::Confirmation::Ack(None))),
                Err(_) => false,
            };
            for (_, done) in taken {
                let _ = done.send(confirmed);
            }
        }
    }
}

impl Layout {
    async fn start(namespace: &str, batched: bool) -> Self {
        let directory =
            refbus_core::Directory::load(repo_root().join("deploy/local/directory.toml")).unwrap();
        let mut topology = Topology::new(
            namespace,
            directory.agencies().iter().map(|a| a.id.clone()).collect(),
        );
        topology.queue_expires = Some(Duration::from_secs(120));
        let url = amqp_url();
        let connect = || Connection::connect(&url, ConnectionProperties::default());
        let publish_conn = connect().await.unwrap();
        let publisher = publish_conn.create_channel().await.unwrap();
        topology.declare(&publisher).await.unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let kind = MessageKind::LegalHelpRequest.code();
        let (body, signature) = sample_message();
        let properties = signed_properties(
            &signature,
            "application/x-protobuf; proto=refbus.v1.Envelope",
            kind,
        );
        let exchange = topology.deliveries_exchange();
        let routing_key = Topology::routing_key(DESK, kind);
        let clocking = Arc::new(Clocking::default());
        let tapped = Arc::new(AtomicUsize::new(0));
        let hop_failures = Arc::new(AtomicUsize::new(0));

        // The desk's side: ack each delivery, then report its two hops.
        let inbox_conn = connect().await.unwrap();
        let inbox = inbox_conn.create_channel().await.unwrap();
        inbox
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let hops = inbox_conn.create_channel().await.unwrap();
        hops.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut deliveries = inbox
            .basic_consume(
                topology.inbox_queue(DESK).as_str().into(),
                "bench-layout-inbox".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        // The hops gathered since the last batch, and the batches sent.
        let pending_hops = Arc::new(AtomicUsize::new(0));
        let batches = Arc::new(AtomicUsize::new(0));
        let (hop_body, hop_signature) = sample_hop(Hop::Delivered);
        let hop_properties = signed_properties(
            &hop_signature,
            "application/x-protobuf; proto=refbus.v1.HopBatch",
            "hop_batch",
        );
        let receiving = clocking.clone();
        let counting_hops = pending_hops.clone();
        tokio::spawn(async move {
            let _channel = inbox;
            while let Some(Ok(delivery)) = deliveries.next().await {
                let is_batch = delivery
                    .properties
                    .kind()
                    .as_ref()
                    .is_some_and(|k| k.as_str() == "envelope_batch");
                let ids: Vec<String> = if is_batch {
                    EnvelopeBatch::decode(delivery.data.as_slice())
                        .map(|b| b.envelopes.into_iter().map(|e| e.id).collect())
                        .unwrap_or_default()
                } else {
                    vec![
                        delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|id| id.as_str().to_owned())
                            .unwrap_or_default(),
                    ]
                };
                for id in &ids {
                    receiving.received(id);
                }
                if delivery.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
                counting_hops.fetch_add(2 * ids.len(), Ordering::AcqRel);
            }
        });
        // As the gateway's batcher does: every 10 ms, what was gathered in
        // one confirmed message (a HopBatch is its hop reports, each framed).
        let hop_exchange = exchange.clone();
        let failures = hop_failures.clone();
        let flushing = pending_hops.clone();
        let sent_batches = batches.clone();
        tokio::spawn(async move {
            let key = refbus_bus::topology::HOP_BATCH_KEY;
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let n = flushing.swap(0, Ordering::AcqRel);
                if n == 0 {
                    continue;
                }
                let mut body = Vec::with_capacity(n * (hop_body.len() + 2));
                let framed = u8::try_from(hop_body.len()).unwrap();
                for _ in 0..n {
                    body.extend_from_slice(&[0x0a, framed]);
                    body.extend_from_slice(&hop_body);
                }
                let batch = sent_batches.fetch_add(1, Ordering::AcqRel);
                let properties = hop_properties
                    .clone()
                    .with_message_id(format!("batch-{batch}").as_str().into());
                let confirmed = match hops
                    .basic_publish(
                        hop_exchange.as_str().into(),
                        key.into(),
                        MANDATORY,
                        &body,
                        properties,
                    )
                    .await
                {
                    Ok(confirm) => matches!(confirm.await, Ok(lapin::Confirmation::Ack(None))),
                    Err(_) => false,
                };
                if !confirmed {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });

        let lane = if batched {
            Some(Arc::new(Lane {
                state: Mutex::new((0, Vec::new())),
                channel: publisher.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                body: body.clone(),
                signature: signature.clone(),
                messages: AtomicUsize::new(0),
                batches: AtomicUsize::new(0),
            }))
        } else {
            None
        };

        // The tracker's side: ack everything on the tap.
        let tap_conn = connect().await.unwrap();
        let tap = tap_conn.create_channel().await.unwrap();
        tap.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let mut copies = tap
            .basic_consume(
                topology.tap_queue().as_str().into(),
                "bench-layout-tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let counting = tapped.clone();
        tokio::spawn(async move {
            let _channel = tap;
            while let Some(Ok(delivery)) = copies.next().await {
                if delivery.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
                counting.fetch_add(1, Ordering::AcqRel);
            }
        });
        Self {
            topology,
            publisher,
            publish_conn,
            inbox_conn,
            tap_conn,
            exchange,
            routing_key,
            body,
            properties,
            clocking,
            tapped,
            hop_failures,
            pending_hops,
            batches,
            published: AtomicUsize::new(0),
            lane,
        }
    }

    async fn publish(&self, key: &str) {
        self.published.fetch_add(1, Ordering::Relaxed);
        let id = refbus_core::envelope_id(CENTRE, key);
        self.clocking.sent(id.clone());
        // Batched: behind a full lane (`LANE_IN_FLIGHT` publishes in
        // flight on the route), wait for the next batch; else publish
        // alone, and then the lane's batches go out from a task of their
        // own.
        if let Some(lane) = &self.lane {
            let waiting = {
                let mut state = lane.state.lock().unwrap();
                if state.0 < refbus_bus::envelopes::LANE_IN_FLIGHT && state.1.is_empty() {
                    state.0 += 1;
                    None
                } else {
                    let (done, confirmed) = tokio::sync::oneshot::channel();
                    state.1.push((id.clone(), done));
                    Some(confirmed)
                }
            };
            if let Some(confirmed) = waiting {
                assert!(
                    confirmed.await.unwrap_or(false),
                    "the layout's batch was not confirmed"
                );
                return;
            }
            lane.messages.fetch_add(1, Ordering::AcqRel);
        }
        let confirmation = self
            .publisher
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                MANDATORY,
                &self.body,
                self.properties.clone().with_message_id(id.as_str().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if let Some(lane) = &self.lane {
            tokio::spawn(lane.clone().drain());
        }
        assert!(
            matches!(confirmation, lapin::Confirmation::Ack(None)),
            "the layout's publish was not routed: {confirmation:?}"
        );
    }

    /// Waits until the tap consumer has acknowledged every copy of what was
    /// published (the envelopes and the hop batches). Returns how long
    /// that took.
    async fn tap_drained(&self) -> Duration {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            // Every envelope's copy, and every hop batch once none waits.
            let envelopes = match &self.lane {
                Some(lane) => lane.messages.load(Ordering::Acquire),
                None => self.published.load(Ordering::Relaxed),
            };
            let copies = envelopes + self.batches.load(Ordering::Acquire);
            if self.pending_hops.load(Ordering::Acquire) == 0
                && self.tapped.load(Ordering::Acquire) >= copies
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        start.elapsed()
    }

    async fn stop(&self) {
        let _ = self.inbox_conn.close(200, "done".into()).await;
        let _ = self.tap_conn.close(200, "done".into()).await;
        if let Err(e) = self.topology.delete(&self.publisher).await {
            println!(
                "  raw-layout: the namespace was not deleted ({e}); its queues expire in 120 s"
            );
        }
        let _ = self.publish_conn.close(200, "done".into()).await;
    }
}

// ------------------------------------------------------------- refbus side

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Client = GatewayClient<tonic::codegen::InterceptedService<Channel, Bearer>>;

async fn client(port: u16, agency: &str) -> Client {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = format!("Bearer dev-{agency}").parse().unwrap();
    GatewayClient::with_interceptor(channel, Bearer(token))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process of the benchmark, killed when dropped.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return f64::NAN;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

fn refbus_command(namespace: &str, scratch: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_refbus"));
    command
        .args(args)
        .current_dir(repo_root())
        .env("AMQP_URL", amqp_url())
        .env("REFBUS_NAMESPACE", namespace)
        .env("REFBUS_QUEUE_EXPIRES", "120s")
        .env("REFBUS_AUTH", "bearer")
        .env("REFBUS_DATA_DIR", scratch.join("data"))
        .env("RUST_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("REFBUS_DIRECTORY")
        // The gateways load the policy catalogue too (issue 16); the
        // lawyer register is asked only for letters, which the bench
        // never sends.
        .env("REFBUS_POLICY", repo_root().join("deploy/policy"))
        .env_remove("REFBUS_LAWYER_SERVICE")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn wait_for_port(port: u16) {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port} after 30 s");
}

struct Refbus {
    centre: Client,
    /// The detention centre's `/metrics`.
    centre_http: u16,
    clocking: Arc<Clocking>,
    ledger: refbus_tracker::ledger::Ledger,
    next_key: AtomicUsize,
    /// Every Acknowledge returned so far.
    acknowledged: Arc<AtomicUsize>,
    /// Every Submit that failed so far (never delivered, never recorded).
    failed_total: AtomicUsize,
    /// Where each referral's time goes, split at the centre's
    /// `submitted_at` stamp (one clock: the machine's).
    split: Arc<Split>,
}

/// A referral's latency in three parts, split at the `submitted_at` the
/// detention centre's service stamps when it accepts the envelope: from the
/// bench's Submit to the stamp (the gRPC call in, validation), from the
/// stamp to the receipt (signing, the publish and its confirm, the answer
/// back), and from the stamp to the desk's Inbox (the broker, the
/// legal-aid service's inbox, the stream out).
#[derive(Default)]
struct Split {
    to_stamp: Mutex<Latencies>,
    stamp_to_receipt: Mutex<Latencies>,
    stamp_to_inbox: Mutex<Latencies>,
}

fn micros_since(
    earlier: chrono::DateTime<chrono::Utc>,
    later: chrono::DateTime<chrono::Utc>,
) -> u64 {
    u64::try_from((later - earlier).num_microseconds().unwrap_or(0)).unwrap_or(0)
}

fn stamp(at: Option<&prost_types::Timestamp>) -> Option<chrono::DateTime<chrono::Utc>> {
    at.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
}

impl Split {
    fn clear(&self) {
        for part in [&self.to_stamp, &self.stamp_to_receipt, &self.stamp_to_inbox] {
            *part.lock().unwrap() = Latencies::default();
        }
    }

    fn print(&self) {
        for (name, part) in [
            ("Submit to the centre's stamp", &self.to_stamp),
            ("stamp to the receipt", &self.stamp_to_receipt),
            ("stamp to the desk's Inbox", &self.stamp_to_inbox),
        ] {
            let mut part = part.lock().unwrap();
            println!(
                "  {name}: p50 {:.2} ms, p99 {:.2} ms ({} referrals)",
                part.percentile(0.50),
                part.percentile(0.99),
                part.0.len()
            );
        }
    }
}

/// What the detention centre put on the wire, read from its `/metrics`:
/// envelopes confirmed, and the AMQP messages that carried them (alone, or
/// in `envelope_batch` messages, issue 17).
#[derive(Clone, Copy, Default)]
struct Wire {
    envelopes: f64,
    messages: f64,
}

impl Wire {
    fn since(self, before: Wire) -> Wire {
        Wire {
            envelopes: self.envelopes - before.envelopes,
            messages: self.messages - before.messages,
        }
    }

    fn print(self, what: &str) {
        println!(
            "  {what}: the centre's {:.0} envelopes went in {:.0} AMQP messages ({:.1} per message)",
            self.envelopes,
            self.messages,
            self.envelopes / self.messages.max(1.0)
        );
    }
}

impl Refbus {
    /// The centre's [`Wire`] counts so far (zero if `/metrics` cannot be read).
    async fn wire(&self) -> Wire {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut text = String::new();
        if let Ok(mut stream) =
            tokio::net::TcpStream::connect(("127.0.0.1", self.centre_http)).await
        {
            let _ = stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .await;
            let _ = stream.read_to_string(&mut text).await;
        }
        let sample = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        let envelopes = sample("refbus_bus_confirmed_total{kind=\"legal_help_request\"}");
        let batched = sample("refbus_bus_batched_envelopes_total");
        let batches = sample("refbus_bus_envelope_batches_total");
        Wire {
            envelopes,
            messages: envelopes - batched + batches,
        }
    }

    async fn start(namespace: &str, scratch: &Path) -> (Self, Vec<Process>) {
        let centre_port = free_port();
        let desk_port = free_port();
        let tracker_port = free_port();
        let centre_http = free_port();
        let mut processes = Vec::new();
        for (name, args, port) in [
            (
                "detention-centre",
                vec!["serve", "detention-centre"],
                centre_port,
            ),
            ("legal-aid", vec!["serve", "legal-aid"], desk_port),
            ("tracker", vec!["tracker"], tracker_port),
        ] {
            let mut command = refbus_command(namespace, scratch, &args);
            command
                .env("REFBUS_LISTEN", format!("127.0.0.1:{port}"))
                .env("REFBUS_TRACKER_LISTEN", format!("127.0.0.1:{port}"))
                .env(
                    "REFBUS_HTTP_LISTEN",
                    if name == "detention-centre" {
                        format!("127.0.0.1:{centre_http}")
                    } else {
                        "127.0.0.1:0".into()
                    },
                )
                .env("REFBUS_INBOX_DB", scratch.join(format!("inbox-{name}.db")))
                .stdout(Stdio::null());
            processes.push(Process {
                name,
                child: command.spawn().unwrap(),
            });
            wait_for_port(port).await;
        }
        let ledger_url = refbus_tracker::ledger::sqlite_url(&scratch.join("data")).unwrap();
        let ledger = refbus_tracker::ledger::Ledger::connect(&ledger_url, None)
            .await
            .unwrap();

        let clocking = Arc::new(Clocking::default());
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let mut desk = client(desk_port, DESK).await;
        let mut inbox = desk
            .inbox(InboxRequest {
                agency: DESK.into(),
                window: u32::MAX, // as much as the service allows (REFBUS_PREFETCH)
            })
            .await
            .unwrap()
            .into_inner();
        // Acknowledgements go out on several concurrent calls, as a desk
        // system working through its inbox would.
        let (tokens, receiver) = async_channel();
        let ack_batch = env_usize("BENCH_ACK_BATCH", 100);
        // Each acknowledging worker on a connection of its own (an HTTP/2
        // connection shared with the Inbox stream queues its calls).
        for _ in 0..env_usize("BENCH_ACKERS", 16) {
            let mut desk = client(desk_port, DESK).await;
            let receiver = receiver.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                while let Some(tokens) = next(&receiver, ack_batch).await {
                    let count = tokens.len();
                    let t = Instant::now();
                    let acked = desk
                        .acknowledge(AcknowledgeRequest {
                            agency: DESK.into(),
                            delivery_tokens: tokens,
                            ..Default::default()
                        })
                        .await;
                    if acked.is_err() {
                        return; // the service went away at the end of the run
                    }
                    ACK_MICROS.fetch_add(
                        u64::try_from(t.elapsed().as_micros()).unwrap(),
                        Ordering::Relaxed,
                    );
                    ACK_CALLS.fetch_add(1, Ordering::Relaxed);
                    acknowledged.fetch_add(count, Ordering::AcqRel);
                }
            });
        }
        let receiving = clocking.clone();
        let split = Arc::new(Split::default());
        let splitting = split.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = inbox.next().await {
                let now = chrono::Utc::now();
                if let Some(at) = stamp(
                    delivery
                        .envelope
                        .as_ref()
                        .and_then(|e| e.submitted_at.as_ref()),
                ) {
                    splitting
                        .stamp_to_inbox
                        .lock()
                        .unwrap()
                        .0
                        .push(micros_since(at, now));
                }
                let key = delivery
                    .envelope
                    .as_ref()
                    .map(|e| e.idempotency_key.clone())
                    .unwrap_or_default();
                receiving.received(&key);
                if tokens.send(delivery.delivery_token).await.is_err() {
                    break;
                }
            }
        });
        let refbus = Self {
            centre_http,
            centre: client(centre_port, CENTRE).await,
            clocking,
            ledger,
            next_key: AtomicUsize::new(0),
            acknowledged,
            failed_total: AtomicUsize::new(0),
            split,
        };
        (refbus, processes)
    }

    async fn submit(&self, key: String) {
        self.clocking.sent(key.clone());
        let sent = chrono::Utc::now();
        let submitted = self
            .centre
            .clone()
            .submit(submit(legal_help_at(&key, sent)))
            .await;
        if let Ok(receipt) = &submitted
            && let Some(at) = stamp(receipt.get_ref().submitted_at.as_ref())
        {
            let now = chrono::Utc::now();
            self.split
                .to_stamp
                .lock()
                .unwrap()
                .0
                .push(micros_since(sent, at));
            self.split
                .stamp_to_receipt
                .lock()
                .unwrap()
                .0
                .push(micros_since(at, now));
        }
        if submitted.is_err() {
            // Overloaded: the Submit failed (UNAVAILABLE, no confirm in
            // time) and nothing was delivered. Counted, not waited for.
            self.clocking.sent.lock().unwrap().remove(&key);
            self.failed_total.fetch_add(1, Ordering::AcqRel);
            self.clocking.failed.fetch_add(1, Ordering::AcqRel);
            self.clocking.received.fetch_add(1, Ordering::AcqRel);
            self.clocking.done.notify_one();
        }
    }

    /// Submits `keys` in one `SubmitBatch` call: each its own receipt
    /// after its own confirm (issue 17).
    async fn submit_batch(&self, keys: Vec<String>) {
        for key in &keys {
            self.clocking.sent(key.clone());
        }
        let envelopes = keys
            .iter()
            .map(|key| {
                submit(legal_help_at(key, chrono::Utc::now()))
                    .envelope
                    .unwrap()
            })
            .collect();
        let results = self
            .centre
            .clone()
            .submit_batch(refbus_proto::v1::SubmitBatchRequest { envelopes })
            .await
            .map(|r| r.into_inner().results);
        for (i, key) in keys.iter().enumerate() {
            let ok = results.as_ref().is_ok_and(|results| {
                matches!(
                    results.get(i).and_then(|r| r.result.as_ref()),
                    Some(refbus_proto::v1::submit_result::Result::Receipt(_))
                )
            });
            if !ok {
                self.clocking.sent.lock().unwrap().remove(key);
                self.failed_total.fetch_add(1, Ordering::AcqRel);
                self.clocking.failed.fetch_add(1, Ordering::AcqRel);
                self.clocking.received.fetch_add(1, Ordering::AcqRel);
                self.clocking.done.notify_one();
            }
        }
    }

    fn key(&self) -> String {
        format!("k{}", self.next_key.fetch_add(1, Ordering::Relaxed))
    }

    /// Waits (at most 60 s) until every delivered referral is acknowledged;
    /// then returns how many ledger events are still missing, and how long
    /// until none is: the tracker's lag when the load stopped and its time
    /// back to zero.
    async fn settle(&self) -> (usize, Duration) {
        let submitted = self.next_key.load(Ordering::Relaxed);
        let delivered = submitted - self.failed_total.load(Ordering::Acquire);
        let waiting = Instant::now();
        while self.acknowledged.load(Ordering::Acquire) < delivered
            && waiting.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let load_stopped = Instant::now();
        let expected = 3 * delivered;
        let lag = expected - self.recorded().await.min(expected);
        while self.recorded().await < expected && load_stopped.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (lag, load_stopped.elapsed())
    }

    /// For a [`smoke`] run: every referral submitted and not refused was
    /// acknowledged on the desk's inbox, exactly once, and the ledger holds
    /// it with its two hops.
    async fn assert_settled(&self) {
        let submitted = self.next_key.load(Ordering::Relaxed);
        let delivered = submitted - self.failed_total.load(Ordering::Acquire);
        self.settle().await;
        assert_eq!(
            self.acknowledged.load(Ordering::Acquire),
            delivered,
            "referrals acknowledged on the inbox, of {submitted} submitted"
        );
        assert_eq!(
            self.recorded().await,
            3 * delivered,
            "ledger rows (a referral and its two hops each) for {delivered} referrals"
        );
    }

    /// Messages the ledger holds (each referral, its delivered and its
    /// acknowledged hop: three per request). Hops are counted by their
    /// rows: a delivery of many hops is one ledger event.
    async fn recorded(&self) -> usize {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM referrals)
                  + (SELECT COUNT(*) FROM hops WHERE hop IN ('delivered', 'acknowledged'))",
        )
        .fetch_one(&self.ledger.pool)
        .await
        .unwrap_or(0);
        usize::try_from(n).unwrap_or(0)
    }
}

type Tokens = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<String>>>;

fn async_channel() -> (tokio::sync::mpsc::Sender<String>, Tokens) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

/// The next tokens to acknowledge: one, and as many more as are waiting,
/// up to `BENCH_ACK_BATCH` (a desk system working through its inbox).
async fn next(receiver: &Tokens, batch: usize) -> Option<Vec<String>> {
    let mut receiver = receiver.lock().await;
    let mut tokens = vec![receiver.recv().await?];
    while tokens.len() < batch {
        match receiver.try_recv() {
            Ok(token) => tokens.push(token),
            Err(_) => break,
        }
    }
    Some(tokens)
}

// ------------------------------------------------------------------ runs

/// Sends `n` messages with `in_flight` senders at a time; returns the rate
/// at which they were received.
async fn saturate<F, Fut>(n: usize, in_flight: usize, clocking: &Clocking, send: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    saturate_by(n, 1, in_flight, clocking, send).await
}

/// [`saturate`] with `per_send` messages in each send (a `SubmitBatch`):
/// `n` sends, `n * per_send` messages.
async fn saturate_by<F, Fut>(
    n: usize,
    per_send: usize,
    in_flight: usize,
    clocking: &Clocking,
    send: F,
) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let messages = n * per_send;
    clocking.expect(messages);
    let counter = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..in_flight {
        let counter = counter.clone();
        let send = send.clone();
        senders.push(tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                send(i).await;
            }
        }));
    }
    let all_sent = async {
        for s in senders {
            s.await.unwrap();
        }
        start.elapsed()
    };
    ACK_MICROS.store(0, Ordering::Relaxed);
    ACK_CALLS.store(0, Ordering::Relaxed);
    let (sent, ()) = tokio::join!(all_sent, clocking.wait());
    let calls = ACK_CALLS.load(Ordering::Relaxed).max(1);
    #[allow(clippy::cast_precision_loss)]
    let mean_ack = ACK_MICROS.load(Ordering::Relaxed) as f64 / calls as f64 / 1000.0;
    if calls > 1 {
        println!("  {calls} Acknowledge calls, {mean_ack:.2} ms each on average");
    }
    let took = start.elapsed();
    println!(
        "  saturation: {messages} sent (confirmed) at {:.0} msg/s, received at {:.0} msg/s",
        rate(messages, sent),
        rate(messages, took)
    );
    rate(messages, took)
}

/// Offers `per_second` messages a second for `seconds`, each sent on its
/// own task at its scheduled time; returns the latencies.
async fn offer<F, Fut>(
    per_second: f64,
    seconds: u64,
    clocking: &Clocking,
    send: F,
) -> (Latencies, usize)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let n = (per_second * seconds as f64) as usize;
    clocking.expect(n);
    let interval = Duration::from_secs_f64(1.0 / per_second);
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + interval * u32::try_from(i).unwrap()).await;
        tokio::spawn(send.clone()(i));
    }
    let received_when_done = clocking.received.load(Ordering::Acquire);
    clocking.wait().await;
    (clocking.take(), received_when_done)
}

fn load(mut latencies: Latencies, offered: f64, delivered_at_load: usize, failed: usize) -> Load {
    Load {
        offered,
        p50: latencies.percentile(0.50),
        p99: latencies.percentile(0.99),
        p999: latencies.percentile(0.999),
        delivered_at_load,
        failed,
    }
}

/// Peak resident memory of each process while `work` runs.
async fn peak_rss<T>(
    processes: &[Process],
    work: impl std::future::Future<Output = T>,
) -> (T, Vec<f64>) {
    let peaks = Arc::new(Mutex::new(vec![0.0_f64; processes.len()]));
    let pids: Vec<Option<u32>> = processes.iter().map(|p| p.child.id()).collect();
    let sampling = peaks.clone();
    let sampler = tokio::spawn(async move {
        loop {
            for (i, pid) in pids.iter().enumerate() {
                if let Some(pid) = pid {
                    let status =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    if let Some(kb) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                    {
                        let mut peaks = sampling.lock().unwrap();
                        peaks[i] = peaks[i].max(kb / 1024.0);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let out = work.await;
    sampler.abort();
    let peaks = peaks.lock().unwrap().clone();
    (out, peaks)
}

/// Ends a run: stops the baselines, stops refbus's processes and deletes
/// their namespace.
async fn finish(
    raw: &Raw,
    layout: &Layout,
    unbatched: &Layout,
    processes: Vec<Process>,
    namespace: &str,
) {
    raw.stop().await;
    layout.stop().await;
    unbatched.stop().await;
    drop(processes);
    delete_namespace(namespace).await;
}

/// Deletes a refbus namespace's exchanges and queues, once its processes
/// have stopped: the bench leaves nothing behind on the shared broker,
/// whichever run it stops after (quorum queues left over each keep a Raft
/// member ticking in the broker, and slowed every later run).
async fn delete_namespace(namespace: &str) {
    let directory =
        refbus_core::Directory::load(repo_root().join("deploy/local/directory.toml")).unwrap();
    let topology = Topology::new(
        namespace,
        directory.agencies().iter().map(|a| a.id.clone()).collect(),
    );
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    if let Err(e) = topology.delete(&channel).await {
        println!("  {namespace}: the namespace was not deleted ({e})");
    }
    let _ = connection.close(200, "done".into()).await;
}

/// How long `refbus up` takes from start to its first accepted `Submit`,
/// and its resident memory then.
async fn up_time(scratch: &Path) -> (Duration, f64) {
    let namespace = format!("benchup{}", std::process::id());
    let base = free_port().clamp(20_000, 60_000);
    let start = Instant::now();
    let mut command = refbus_command(&namespace, scratch, &["up"]);
    command
        .env("REFBUS_PORT_BASE", base.to_string())
        .env("REFBUS_INBOX_DB", scratch.join("inbox-up.db"))
        .env("REFBUS_DATA_DIR", scratch.join("data-up"));
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let took = loop {
        if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{base}"))
            .unwrap()
            .connect()
            .await
        {
            let token = format!("Bearer dev-{CENTRE}").parse().unwrap();
            let mut centre = GatewayClient::with_interceptor(channel, Bearer(token));
            if centre
                .submit(submit(legal_help_at("up", chrono::Utc::now())))
                .await
                .is_ok()
            {
                break start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "refbus up did not serve"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let process = Process {
        name: "refbus up",
        child,
    };
    let rss = process.rss_mib();
    drop(process);
    delete_namespace(&namespace).await;
    (took, rss)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if smoke() {
        println!(
            "smoke run (no --bench): toy sizes on this build, checking that nothing is lost; `cargo bench -p refbus --bench speed` measures"
        );
        runtime
            .block_on(async { tokio::time::timeout(SMOKE_LIMIT, run()).await })
            .expect("the speed bench's smoke run did not finish in 10 minutes");
    } else {
        runtime.block_on(run());
    }
}

/// A layout baseline at a fixed offered load, its tap drained after.
async fn layout_at(layout: &Arc<Layout>, per_second: f64, seconds: u64) -> Load {
    let publishing = layout.clone();
    let (latencies, at_load) = offer(per_second, seconds, &layout.clocking, move |i| {
        let layout = publishing.clone();
        async move { layout.publish(&format!("l{per_second}-{i}")).await }
    })
    .await;
    let at = load(latencies, per_second, at_load, 0);
    layout.tap_drained().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    at
}

fn met(ok: bool) -> &'static str {
    if smoke() {
        "not judged in a smoke run"
    } else if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn cpu_cell(cpu: &CpuUse, name: &str) -> String {
    cpu.of(name)
        .map_or_else(|| "-".into(), |v| format!("{v:.0} µs"))
}

#[allow(clippy::too_many_lines)]
async fn run() {
    let n = env_usize(
        "BENCH_MESSAGES",
        if smoke() { SMOKE_MESSAGES } else { 20_000 },
    );
    let in_flight = env_usize("BENCH_IN_FLIGHT", 64);
    let seconds = u64::try_from(env_usize("BENCH_SECONDS", if smoke() { 1 } else { 10 })).unwrap();
    let scratch = std::env::temp_dir().join(format!("refbus-speed-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let (body, _) = sample_message();
    let broker = broker_pid();
    let load_at_start = load_average();
    println!(
        "refbus speed: {n} messages per saturation run, {in_flight} in flight, prefetch {PREFETCH}, {seconds} s per fixed load; envelope {} bytes, hop report {} bytes",
        body.len(),
        sample_hop(Hop::Delivered).0.len()
    );
    println!(
        "CPU from /proc/PID/stat (utime + stime) at {} ticks/s; broker beam.smp pid {}; load average {load_at_start}",
        clock_ticks_per_second(),
        broker.map_or_else(|| "not found".into(), |p| p.to_string())
    );
    let bench = Watched {
        name: "bench",
        pid: Some(std::process::id()),
        refbus: false,
    };
    let beam = Watched {
        name: "broker",
        pid: broker,
        refbus: false,
    };
    let broker_side = vec![bench.clone(), beam.clone()];

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let only_refbus = only == "refbus";
    let only_latency = only == "latency";
    // BENCH_ONLY=latency: the one fixed load, msg/s (BENCH_RATE).
    let latency_rate = f64::from(u32::try_from(env_usize("BENCH_RATE", 500)).unwrap());
    // The raw limit: one queue.
    println!("raw:");
    let raw = Arc::new(Raw::start().await);
    let warm = raw.clone();
    saturate(200, in_flight, &raw.clocking, move |i| {
        let raw = warm.clone();
        async move { raw.publish(format!("w{i}")).await }
    })
    .await;
    let _ = raw.clocking.take();
    let publishing = raw.clone();
    let before = cpu_snapshot(&broker_side);
    // A profiling run measures the baselines only briefly.
    let baseline_n = if only_refbus || only_latency { 1000 } else { n };
    let raw_rate = saturate(baseline_n, in_flight, &raw.clocking, move |i| {
        let raw = publishing.clone();
        async move { raw.publish(format!("s{i}")).await }
    })
    .await;
    let raw_cpu = CpuUse::between(
        &broker_side,
        &before,
        &cpu_snapshot(&broker_side),
        baseline_n,
    );
    raw_cpu.print("raw");
    let _ = raw.clocking.take();
    if only_latency {
        let per_second = latency_rate;
        let publishing = raw.clone();
        let before = cpu_snapshot(&broker_side);
        let (latencies, _) = offer(per_second, seconds, &raw.clocking, move |i| {
            let raw = publishing.clone();
            async move { raw.publish(format!("l{i}")).await }
        })
        .await;
        let at = load(latencies, per_second, 0, 0);
        println!(
            "raw at {per_second:.0} msg/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
            at.p50, at.p99, at.p999
        );
        let n = raw.clocking.received.load(Ordering::Acquire);
        CpuUse::between(&broker_side, &before, &cpu_snapshot(&broker_side), n)
            .print("raw at a fixed load");
    }

    // refbus's layout, no application work (envelopes batched behind a
    // publish in flight on their route); then the same unbatched.
    let mut layouts = Vec::new();
    for (name, batched) in [("raw-layout", true), ("raw-layout-unbatched", false)] {
        println!("{name}:");
        let namespace = format!("bench{}{}", name.replace('-', ""), std::process::id());
        let layout = Arc::new(Layout::start(&namespace, batched).await);
        let warm = layout.clone();
        saturate(200, in_flight, &layout.clocking, move |i| {
            let layout = warm.clone();
            async move { layout.publish(&format!("w{i}")).await }
        })
        .await;
        layout.tap_drained().await;
        let _ = layout.clocking.take();
        let publishing = layout.clone();
        let before = cpu_snapshot(&broker_side);
        let rate = saturate(baseline_n, in_flight, &layout.clocking, move |i| {
            let layout = publishing.clone();
            async move { layout.publish(&format!("s{i}")).await }
        })
        .await;
        let tap_drain = layout.tap_drained().await;
        let cpu = CpuUse::between(
            &broker_side,
            &before,
            &cpu_snapshot(&broker_side),
            baseline_n,
        );
        println!(
            "  tap: every copy acknowledged {:.0} ms after the last inbox delivery",
            tap_drain.as_secs_f64() * 1000.0
        );
        cpu.print(name);
        let _ = layout.clocking.take();
        if only_latency {
            let per_second = latency_rate;
            let before = cpu_snapshot(&broker_side);
            let at = layout_at(&layout, per_second, seconds).await;
            println!(
                "{name} at {per_second:.0} msg/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
                at.p50, at.p99, at.p999
            );
            let n = layout.clocking.received.load(Ordering::Acquire);
            CpuUse::between(&broker_side, &before, &cpu_snapshot(&broker_side), n)
                .print(&format!("{name} at a fixed load"));
        }
        layouts.push((layout, rate, cpu));
    }
    let [
        (layout, layout_rate, layout_cpu),
        (unbatched, unbatched_rate, unbatched_cpu),
    ] = <[_; 2]>::try_from(layouts).ok().unwrap();

    // refbus.
    println!("refbus:");
    let namespace = format!("benchspeed{}", std::process::id());
    let (refbus, processes) = Refbus::start(&namespace, &scratch).await;
    let refbus = Arc::new(refbus);
    // Warm up: connections, the first ledger batch.
    let warm = refbus.clone();
    saturate(200, in_flight, &refbus.clocking, move |_| {
        let r = warm.clone();
        async move { r.submit(r.key()).await }
    })
    .await;
    let _ = refbus.clocking.take();
    refbus.settle().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle: Vec<f64> = processes.iter().map(Process::rss_mib).collect();
    let mut refbus_side: Vec<Watched> = processes
        .iter()
        .map(|p| Watched {
            name: p.name,
            pid: p.child.id(),
            refbus: true,
        })
        .collect();
    refbus_side.extend(broker_side.iter().cloned());

    if only_latency {
        // A latency run (`BENCH_ONLY=latency`): refbus alone at
        // `BENCH_RATE` (default 500) msg/s, its latency split at the
        // centre's stamp, and the CPU each process spent per referral.
        let per_second = latency_rate;
        // Idle first: what each process spends with nothing to do, per second.
        let before = cpu_snapshot(&refbus_side);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let idle = CpuUse::between(&refbus_side, &before, &cpu_snapshot(&refbus_side), 5);
        idle.print("refbus idle, per second (not per referral)");
        refbus.split.clear();
        let sending = refbus.clone();
        let before = cpu_snapshot(&refbus_side);
        let wire = refbus.wire().await;
        let (latencies, _) = offer(per_second, seconds, &refbus.clocking, move |_| {
            let r = sending.clone();
            async move { r.submit(r.key()).await }
        })
        .await;
        let cpu = CpuUse::between(
            &refbus_side,
            &before,
            &cpu_snapshot(&refbus_side),
            refbus.clocking.received.load(Ordering::Acquire).max(1),
        );
        let at = load(
            latencies,
            per_second,
            0,
            refbus.clocking.failed.load(Ordering::Acquire),
        );
        println!(
            "refbus at {per_second:.0} msg/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} failed",
            at.p50, at.p99, at.p999, at.failed
        );
        refbus.split.print();
        refbus.wire().await.since(wire).print("at the fixed load");
        cpu.print("refbus at a fixed load");
        finish(&raw, &layout, &unbatched, processes, &namespace).await;
        return;
    }
    if only_refbus {
        // A profiling run (`BENCH_ONLY=refbus`): the refbus saturation run
        // alone, its processes left for `perf` to attach to meanwhile;
        // `BENCH_ROUNDS` times on the same bus, its ledger and stores
        // growing by `n` referrals a round (issue 17: what a referral costs
        // once the ledger is large, which one run on an empty ledger hides).
        let rounds = env_usize("BENCH_ROUNDS", 1).max(1);
        for round in 1..=rounds {
            let sending = refbus.clone();
            let before = cpu_snapshot(&refbus_side);
            let wire = refbus.wire().await;
            let rate = saturate(n, in_flight, &refbus.clocking, move |_| {
                let r = sending.clone();
                async move { r.submit(r.key()).await }
            })
            .await;
            let _ = refbus.clocking.take();
            let (lag_at_stop, lag_cleared) = refbus.settle().await;
            let cpu = CpuUse::between(&refbus_side, &before, &cpu_snapshot(&refbus_side), n);
            cpu.print(&format!(
                "refbus, round {round} of {rounds} (the ledger held {} referrals before it)",
                (round - 1) * n
            ));
            refbus.wire().await.since(wire).print("at saturation");
            println!(
                "  round {round}: {rate:.0} msg/s; tracker lag {lag_at_stop} messages at the stop, back to zero in {:.0} ms",
                lag_cleared.as_secs_f64() * 1000.0
            );
        }
        println!("  BENCH_ONLY=refbus: the other runs skipped");
        finish(&raw, &layout, &unbatched, processes, &namespace).await;
        return;
    }
    let sending = refbus.clone();
    let before = cpu_snapshot(&refbus_side);
    let wire = refbus.wire().await;
    let (refbus_rate, peaks) = peak_rss(
        &processes,
        saturate(n, in_flight, &refbus.clocking, move |_| {
            let r = sending.clone();
            async move { r.submit(r.key()).await }
        }),
    )
    .await;
    let saturation_failed = refbus.clocking.failed.load(Ordering::Acquire);
    let _ = refbus.clocking.take();
    // Tracker lag: from the last acknowledgement until the ledger holds
    // every message of the run. The CPU counted includes all of it.
    let (lag_at_stop, lag_cleared) = refbus.settle().await;
    let refbus_cpu = CpuUse::between(&refbus_side, &before, &cpu_snapshot(&refbus_side), n);
    refbus_cpu.print("refbus");
    refbus.wire().await.since(wire).print("at saturation");

    // The same, the agency system submitting `BENCH_SUBMIT_BATCH` referrals
    // per SubmitBatch call (issue 17): each still its own receipt after its
    // own confirm.
    let per_call = env_usize("BENCH_SUBMIT_BATCH", 50).max(1);
    let batching = refbus.clone();
    let before = cpu_snapshot(&refbus_side);
    let wire = refbus.wire().await;
    println!("refbus, SubmitBatch of {per_call}:");
    let batched_rate = saturate_by(
        n / per_call,
        per_call,
        (in_flight / per_call).max(2),
        &refbus.clocking,
        move |_| {
            let r = batching.clone();
            async move {
                let keys = (0..per_call).map(|_| r.key()).collect();
                r.submit_batch(keys).await;
            }
        },
    )
    .await;
    let _ = refbus.clocking.take();
    refbus.settle().await;
    let batched_cpu = CpuUse::between(
        &refbus_side,
        &before,
        &cpu_snapshot(&refbus_side),
        n / per_call * per_call,
    );
    batched_cpu.print("refbus (SubmitBatch)");
    refbus.wire().await.since(wire).print("SubmitBatch");
    #[allow(clippy::cast_precision_loss)]
    let batched_ratio = batched_rate / raw_rate;
    println!("  SubmitBatch of {per_call}: {batched_rate:.0} msg/s, {batched_ratio:.2}x raw");

    // The same fixed offered loads for every side.
    let loads = [500.0, refbus_rate / 2.0];
    let mut at_loads: Vec<[Load; 4]> = Vec::new();
    for per_second in loads {
        println!("fixed load {per_second:.0} msg/s:");
        let publishing = raw.clone();
        let (latencies, at_load) = offer(per_second, seconds, &raw.clocking, move |i| {
            let raw = publishing.clone();
            async move { raw.publish(format!("l{per_second}-{i}")).await }
        })
        .await;
        let raw_load = load(latencies, per_second, at_load, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let layout_load = layout_at(&layout, per_second, seconds).await;
        let unbatched_load = layout_at(&unbatched, per_second, seconds).await;

        let sending = refbus.clone();
        let wire = refbus.wire().await;
        let (latencies, at_load) = offer(per_second, seconds, &refbus.clocking, move |_| {
            let r = sending.clone();
            async move { r.submit(r.key()).await }
        })
        .await;
        refbus.wire().await.since(wire).print("refbus");
        let failed = refbus.clocking.failed.load(Ordering::Acquire);
        let refbus_load = load(latencies, per_second, at_load, failed);
        refbus.settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        at_loads.push([raw_load, layout_load, unbatched_load, refbus_load]);
    }
    let hop_failures = layout.hop_failures.load(Ordering::Relaxed)
        + unbatched.hop_failures.load(Ordering::Relaxed);
    if smoke() {
        refbus.assert_settled().await;
        assert_eq!(saturation_failed, 0, "Submits failed at saturation");
        assert_eq!(hop_failures, 0, "raw-layout hop reports were not confirmed");
        for sides in &at_loads {
            for (side, at) in ["raw", "raw-layout", "raw-layout-unbatched", "refbus"]
                .iter()
                .zip(sides)
            {
                assert_eq!(
                    at.failed, 0,
                    "{side} at {:.0} msg/s: sends failed",
                    at.offered
                );
            }
        }
    }
    let names: Vec<&str> = processes.iter().map(|p| p.name).collect();
    finish(&raw, &layout, &unbatched, processes, &namespace).await;
    let (up, up_rss) = up_time(&scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    let load_at_end = load_average();

    println!();
    println!("load average: {load_at_start} at the start, {load_at_end} at the end");
    println!();
    println!("| at saturation | raw | raw-layout | raw-layout-unbatched | refbus |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| throughput (received on the inbox) | {raw_rate:.0} msg/s | {layout_rate:.0} msg/s | {unbatched_rate:.0} msg/s | {refbus_rate:.0} msg/s |"
    );
    println!(
        "| / raw | 1.00 | {:.2} | {:.2} | {:.2} |",
        layout_rate / raw_rate,
        unbatched_rate / raw_rate,
        refbus_rate / raw_rate
    );
    println!(
        "| wall time per referral | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
        1e6 / raw_rate,
        1e6 / layout_rate,
        1e6 / unbatched_rate,
        1e6 / refbus_rate
    );
    for name in names.iter().copied().chain(["bench", "broker"]) {
        println!(
            "| CPU per referral: {name} | {} | {} | {} | {} |",
            cpu_cell(&raw_cpu, name),
            cpu_cell(&layout_cpu, name),
            cpu_cell(&unbatched_cpu, name),
            cpu_cell(&refbus_cpu, name)
        );
    }
    println!(
        "| CPU per referral: refbus's processes together | | | | {:.0} µs |",
        refbus_cpu.refbus_total()
    );
    println!(
        "| the machine's cores busy during the run | {:.2} | {:.2} | {:.2} | {:.2} |",
        raw_cpu.machine_cores,
        layout_cpu.machine_cores,
        unbatched_cpu.machine_cores,
        refbus_cpu.machine_cores
    );
    println!();
    println!(
        "Saturation Submits failed: {saturation_failed}; raw-layout hop reports not confirmed: {hop_failures}."
    );
    println!(
        "Split of refbus's wall time per referral at saturation: the layout adds {:.0} µs to raw's {:.0} µs, refbus's code {:.0} µs more.",
        1e6 / layout_rate - 1e6 / raw_rate,
        1e6 / raw_rate,
        1e6 / refbus_rate - 1e6 / layout_rate
    );
    println!();
    println!(
        "| offered load | side | p50 | p99 | p99.9 | received by the end of the load | failed |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for sides in &at_loads {
        for (name, l) in ["raw", "raw-layout", "raw-layout-unbatched", "refbus"]
            .iter()
            .zip(sides)
        {
            println!(
                "| {:.0} msg/s | {name} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} |",
                l.offered, l.p50, l.p99, l.p999, l.delivered_at_load, l.failed
            );
        }
    }
    println!();
    println!(
        "tracker lag when the saturation load stopped: {lag_at_stop} messages, back to zero in {:.0} ms",
        lag_cleared.as_secs_f64() * 1000.0
    );
    for ((name, idle), peak) in names.iter().zip(&idle).zip(&peaks) {
        println!("memory, {name}: {idle:.1} MiB idle, {peak:.1} MiB peak under load");
    }
    println!(
        "refbus up: first Submit accepted {:.0} ms after start; {up_rss:.1} MiB then",
        up.as_secs_f64() * 1000.0
    );

    let [raw_500, _, _, refbus_500] = &at_loads[0];
    let ratio = refbus_rate / raw_rate;
    let cpu = refbus_cpu.refbus_total();
    println!();
    println!("Issue 17's targets in this run:");
    println!(
        "- throughput at saturation >= 0.5x raw: {ratio:.2}x ({refbus_rate:.0} / {raw_rate:.0} msg/s): {}",
        met(ratio >= 0.5)
    );
    println!(
        "- at 500 msg/s, p50 <= raw p50 + 2 ms: {:.2} ms against {:.2} + 2 ms: {}",
        refbus_500.p50,
        raw_500.p50,
        met(refbus_500.p50 <= raw_500.p50 + 2.0)
    );
    println!(
        "- at 500 msg/s, p99 <= raw p99 + 5 ms: {:.2} ms against {:.2} + 5 ms: {}",
        refbus_500.p99,
        raw_500.p99,
        met(refbus_500.p99 <= raw_500.p99 + 5.0)
    );
    println!(
        "- refbus's processes <= 150 µs CPU per referral together: {cpu:.0} µs: {}",
        met(cpu <= 150.0)
    );
    println!(
        "- tracker lag back to zero within 1 s of the load stopping: {:.0} ms: {}",
        lag_cleared.as_secs_f64() * 1000.0,
        met(lag_cleared <= Duration::from_secs(1))
    );
    println!(
        "- memory and scan time flat at 1,000,000 open obligations: not measured here (`cargo bench -p refbus-tracker --bench ledger`)"
    );
}
