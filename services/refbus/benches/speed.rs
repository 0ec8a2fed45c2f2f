//! Issue 6: what refbus costs, as a ratio to the raw broker measured in the
//! same run on the same machine.
//!
//! `cargo bench -p refbus --bench speed` (RabbitMQ at `AMQP_URL`). Knobs:
//! `BENCH_MESSAGES` (10000 per saturation run), `BENCH_IN_FLIGHT` (64, for
//! both sides), `BENCH_SECONDS` (5, each fixed-load run).
//!
//! 1. **raw**: lapin publishing persistent messages of the size refbus
//!    publishes (the same signed envelope) to a quorum queue with publisher
//!    confirms, `BENCH_IN_FLIGHT` in flight, consumed on another connection
//!    with manual acks (one per message) at refbus's prefetch (200).
//! 2. **refbus**: legal-help requests submitted over gRPC to a real
//!    `refbus serve detention-centre` process, received on the duty desk's
//!    `Inbox` stream from a `refbus serve legal-aid` process and acknowledged
//!    one by one, with a `refbus tracker` process (SQLite) recording it all.
//! 3. For both: throughput at saturation, then latency (submit or publish
//!    to receipt on the inbox) p50/p99/p99.9 at a fixed offered load of half
//!    the raw saturation rate. Also each process's resident memory idle and
//!    at its peak under load, the tracker's lag after the load stops, and
//!    the time `refbus up` takes from start to its first accepted `Submit`.

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
use refbus_core::signing::{SIGNATURE_HEADER, Signed, development_signature};
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::{AcknowledgeRequest, InboxRequest};
use refbus_tests::fixtures::{CENTRE, DESK, legal_help, legal_help_at, submit};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::service::Interceptor;
use tonic::transport::Channel;

const PREFETCH: u16 = 200;
static ACK_MICROS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static ACK_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

/// What one side measured.
struct Side {
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    offered: f64,
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
        .env_remove("REFBUS_POLICY")
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
    clocking: Arc<Clocking>,
    ledger: refbus_tracker::ledger::Ledger,
    next_key: AtomicUsize,
    /// Every Acknowledge returned so far.
    acknowledged: Arc<AtomicUsize>,
}

impl Refbus {
    async fn start(namespace: &str, scratch: &Path) -> (Self, Vec<Process>) {
        let centre_port = free_port();
        let desk_port = free_port();
        let tracker_port = free_port();
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
                .env("REFBUS_HTTP_LISTEN", "127.0.0.1:0")
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
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = inbox.next().await {
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
            centre: client(centre_port, CENTRE).await,
            clocking,
            ledger,
            next_key: AtomicUsize::new(0),
            acknowledged,
        };
        (refbus, processes)
    }

    async fn submit(&self, key: String) {
        self.clocking.sent(key.clone());
        let submitted = self
            .centre
            .clone()
            .submit(submit(legal_help_at(&key, chrono::Utc::now())))
            .await;
        if submitted.is_err() {
            // Overloaded: the Submit failed (UNAVAILABLE, no confirm in
            // time) and nothing was delivered. Counted, not waited for.
            self.clocking.sent.lock().unwrap().remove(&key);
            self.clocking.failed.fetch_add(1, Ordering::AcqRel);
            self.clocking.received.fetch_add(1, Ordering::AcqRel);
            self.clocking.done.notify_one();
        }
    }

    fn key(&self) -> String {
        format!("k{}", self.next_key.fetch_add(1, Ordering::Relaxed))
    }

    /// Messages the ledger holds (each referral, its delivered and its
    /// acknowledged hop: three per request).
    async fn recorded(&self) -> usize {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_events")
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
    clocking.expect(n);
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
        "  saturation: {n} sent (confirmed) at {:.0} msg/s, received at {:.0} msg/s",
        rate(n, sent),
        rate(n, took)
    );
    rate(n, took)
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

fn side(
    throughput: f64,
    mut latencies: Latencies,
    offered: f64,
    delivered_at_load: usize,
    failed: usize,
) -> Side {
    Side {
        failed,
        throughput,
        p50: latencies.percentile(0.50),
        p99: latencies.percentile(0.99),
        p999: latencies.percentile(0.999),
        offered,
        delivered_at_load,
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
    (took, rss)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

#[allow(clippy::too_many_lines)]
async fn run() {
    let n = env_usize("BENCH_MESSAGES", 10_000);
    let in_flight = env_usize("BENCH_IN_FLIGHT", 64);
    let seconds = u64::try_from(env_usize("BENCH_SECONDS", 5)).unwrap();
    let scratch = std::env::temp_dir().join(format!("refbus-speed-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let (body, _) = sample_message();
    println!(
        "refbus speed: {n} messages per saturation run, {in_flight} in flight, prefetch {PREFETCH}, {seconds} s at half the raw rate; envelope {} bytes",
        body.len()
    );

    // The raw limit.
    let raw = Arc::new(Raw::start().await);
    let publishing = raw.clone();
    let raw_rate = saturate(n, in_flight, &raw.clocking, move |i| {
        let raw = publishing.clone();
        async move { raw.publish(format!("s{i}")).await }
    })
    .await;
    let _ = raw.clocking.take();
    let half = raw_rate / 2.0;
    let publishing = raw.clone();
    let (latencies, at_load) = offer(half, seconds, &raw.clocking, move |i| {
        let raw = publishing.clone();
        async move { raw.publish(format!("l{i}")).await }
    })
    .await;
    let raw_side = side(raw_rate, latencies, half, at_load, 0);
    raw.stop().await;

    // refbus.
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
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle: Vec<f64> = processes.iter().map(Process::rss_mib).collect();

    let sending = refbus.clone();
    let (refbus_rate, peaks) = peak_rss(
        &processes,
        saturate(n, in_flight, &refbus.clocking, move |_| {
            let r = sending.clone();
            async move { r.submit(r.key()).await }
        }),
    )
    .await;
    let _ = refbus.clocking.take();
    // Tracker lag: from the last acknowledgement until the ledger holds
    // every message of the run.
    let submitted = refbus.next_key.load(Ordering::Relaxed);
    while refbus.acknowledged.load(Ordering::Acquire) < submitted {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let load_stopped = Instant::now();
    let lag_at_stop = 3 * submitted - refbus.recorded().await.min(3 * submitted);
    while refbus.recorded().await < 3 * submitted {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lag_cleared = load_stopped.elapsed();

    let sending = refbus.clone();
    let (latencies, at_load) = offer(half, seconds, &refbus.clocking, move |_| {
        let r = sending.clone();
        async move { r.submit(r.key()).await }
    })
    .await;
    let failed = refbus.clocking.failed.load(Ordering::Acquire);
    let refbus_side = side(refbus_rate, latencies, half, at_load, failed);
    // Let the backlog drain, then the load refbus itself sustains: half its
    // own saturation rate.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let own_half = refbus_rate / 2.0;
    let sending = refbus.clone();
    let (latencies, at_load) = offer(own_half, seconds, &refbus.clocking, move |_| {
        let r = sending.clone();
        async move { r.submit(r.key()).await }
    })
    .await;
    let failed = refbus.clocking.failed.load(Ordering::Acquire);
    let own = side(refbus_rate, latencies, own_half, at_load, failed);

    let names: Vec<&str> = processes.iter().map(|p| p.name).collect();
    drop(processes);
    let (up, up_rss) = up_time(&scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);

    println!();
    println!("| | raw broker | refbus | refbus / raw |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| throughput at saturation | {:.0} msg/s | {:.0} msg/s | {:.2} |",
        raw_side.throughput,
        refbus_side.throughput,
        refbus_side.throughput / raw_side.throughput
    );
    for (name, r, b) in [
        ("p50", raw_side.p50, refbus_side.p50),
        ("p99", raw_side.p99, refbus_side.p99),
        ("p99.9", raw_side.p999, refbus_side.p999),
    ] {
        println!(
            "| latency {name} at {:.0} msg/s | {r:.2} ms | {b:.2} ms | +{:.2} ms |",
            raw_side.offered,
            b - r
        );
    }
    println!(
        "| received by the end of the offered load | {} | {} | |",
        raw_side.delivered_at_load, refbus_side.delivered_at_load
    );
    println!(
        "| Submits failed under that load | {} | {} | |",
        raw_side.failed, refbus_side.failed
    );
    println!();
    println!(
        "refbus at half its own saturation rate ({:.0} msg/s): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; {} received by the end of the load, {} failed",
        own.offered, own.p50, own.p99, own.p999, own.delivered_at_load, own.failed
    );
    println!();
    println!(
        "tracker lag when the saturation load stopped: {lag_at_stop} messages, cleared in {:.0} ms",
        lag_cleared.as_secs_f64() * 1000.0
    );
    for ((name, idle), peak) in names.iter().zip(&idle).zip(&peaks) {
        println!("memory, {name}: {idle:.1} MiB idle, {peak:.1} MiB peak under load");
    }
    println!(
        "refbus up: first Submit accepted {:.0} ms after start; {up_rss:.1} MiB then",
        up.as_secs_f64() * 1000.0
    );
}
