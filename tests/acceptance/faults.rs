//! Issue 5: faults, broken on purpose under a steady load of submissions,
//! each bounded in time and cleaning up after itself. Each prints its
//! figures (submitted, confirmed, failed, delivered or recorded, lost,
//! duplicates after deduplication) and asserts that nothing confirmed is
//! lost, nothing is handed over twice, and every failed Submit returned an
//! error. RELIABILITY.md lists the faults and what they printed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_tests::fixtures::{CENTRE, DESK, legal_help_at, submit};
use refbus_tests::proxy::Proxy;
use refbus_tests::tracker::{TestTracker, drop_ledger, eventually, postgres_url};
use refbus_tests::{Inbox, TestBus, acknowledge, free_port, mtls_env, refbus_binary, within};
use refbus_tracker::Clock;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

/// What a steady load of submissions saw.
#[derive(Default, Debug)]
struct Load {
    submitted: usize,
    confirmed: Vec<String>,
    /// gRPC codes of the submissions that failed.
    failed: HashMap<tonic::Code, usize>,
}

impl Load {
    fn failed(&self) -> usize {
        self.failed.values().sum()
    }
}

/// Submits legal-help requests through `client`, one after another (each
/// bounded by a deadline), until `stop`; every call ends confirmed or with
/// an error.
async fn steady_load(
    mut client: GatewayClient<Channel>,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> Load {
    let mut load = Load::default();
    let now = chrono::Utc::now();
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}-{}", load.submitted);
        load.submitted += 1;
        let mut request = tonic::Request::new(submit(legal_help_at(&key, now)));
        request.set_timeout(Duration::from_secs(5));
        match client.submit(request).await {
            Ok(receipt) => load.confirmed.push(receipt.into_inner().id),
            Err(status) => {
                *load.failed.entry(status.code()).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    load
}

/// Starts `refbus serve detention-centre` on `bus`'s namespace at `port`
/// and waits for it to serve.
async fn spawn_centre(bus: &TestBus, port: u16) -> tokio::process::Child {
    let settings = &bus.shared.settings;
    let mut child = tokio::process::Command::new(refbus_binary())
        .args(["serve", "detention-centre"])
        .env("AMQP_URL", &settings.amqp_url)
        .env("REFBUS_NAMESPACE", &settings.namespace)
        .env("REFBUS_DIRECTORY", &settings.directory)
        .env("REFBUS_POLICY", &settings.policy)
        .env("REFBUS_QUEUE_EXPIRES", "60s")
        .env("REFBUS_LISTEN", format!("127.0.0.1:{port}"))
        // Any free port for /metrics: port + 1000 may be another test's.
        .env("REFBUS_HTTP_LISTEN", "127.0.0.1:0")
        .env(
            "REFBUS_INBOX_DB",
            settings.inbox_db.with_extension("centre.db"),
        )
        .env("RUST_LOG", "warn")
        .envs(mtls_env())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    within("refbus serve to start", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("serving") {
                return;
            }
        }
        panic!("refbus serve exited before serving");
    })
    .await;
    child
}

/// Reads `agency`'s inbox through `client`, acknowledging each delivery,
/// until every id of `expected` and then `sentinel` has come; returns the
/// ids handed over, in order.
async fn drain(
    client: &mut GatewayClient<Channel>,
    expected: &[String],
    sentinel: &str,
) -> Vec<String> {
    let mut inbox = Inbox::open(client, DESK).await;
    let mut missing: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let mut handed = Vec::new();
    let mut sentinel_seen = false;
    while !missing.is_empty() || !sentinel_seen {
        let delivery = inbox.next().await;
        let id = delivery.envelope.unwrap().id;
        acknowledge(client, DESK, delivery.delivery_token).await;
        missing.remove(id.as_str());
        sentinel_seen |= id == sentinel;
        handed.push(id);
    }
    handed
}

/// Reads the desk's inbox until every confirmed id of `load`, and a
/// sentinel submitted after the load, has come; then reports.
async fn delivered_once(bus: &TestBus, load: &Load, fault: &str) {
    let key = format!("{fault}-sentinel");
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    // The bus may still be reconnecting: retried under the same key.
    let sentinel = within("the sentinel to be confirmed", async {
        loop {
            match centre
                .submit(submit(legal_help_at(&key, chrono::Utc::now())))
                .await
            {
                Ok(receipt) => return receipt.into_inner().id,
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => panic!("sentinel refused: {status:?}"),
            }
        }
    })
    .await;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut handed = drain(&mut desk, &load.confirmed, &sentinel).await;
    handed.retain(|id| *id != sentinel);
    report(fault, load, &handed, "delivered");
}

/// Prints the figures and checks them: nothing confirmed lost, no id
/// handed over twice, every submission confirmed or failed with an error.
fn report(fault: &str, load: &Load, handed: &[String], what: &str) {
    let unique: HashSet<&String> = handed.iter().collect();
    let lost = load
        .confirmed
        .iter()
        .filter(|id| !unique.contains(id))
        .count();
    let duplicates = handed.len() - unique.len();
    println!(
        "fault: {fault}: submitted {}, confirmed {}, failed {} {:?}, {what} {}, lost {lost}, duplicates after deduplication {duplicates}",
        load.submitted,
        load.confirmed.len(),
        load.failed(),
        load.failed,
        unique.len(),
    );
    assert_eq!(
        load.submitted,
        load.confirmed.len() + load.failed(),
        "every Submit ended"
    );
    assert_eq!(lost, 0, "confirmed messages lost");
    assert_eq!(duplicates, 0, "duplicates after deduplication");
}

/// An agency service killed with SIGKILL under load and restarted: every
/// confirmed submission reaches the recipient once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_service_killed_with_sigkill_and_restarted() {
    let bus = TestBus::spawn().await;
    let port = free_port();
    let mut centre = spawn_centre(&bus, port).await;
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(refbus_tests::client_tls(CENTRE))
        .unwrap()
        .connect_lazy();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(steady_load(
        GatewayClient::new(channel),
        "kill",
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    centre.start_kill().unwrap();
    let _ = centre.wait().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut centre = spawn_centre(&bus, port).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let load = within("the load to stop", load).await.unwrap();
    assert!(load.failed() > 0, "the kill was felt: {load:?}");

    delivered_once(&bus, &load, "agency service SIGKILL and restart").await;
    centre.start_kill().unwrap();
    let _ = centre.wait().await;
    let _ = std::fs::remove_file(bus.shared.settings.inbox_db.with_extension("centre.db"));
    bus.stop().await;
}

/// The tracker's PostgreSQL unreachable for 10 s (connections cut by a
/// proxy) under load: the tracker retries, and once the database is back
/// the ledger holds every confirmed message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_database_unavailable_for_10_s() {
    let bus = TestBus::spawn().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = refbus_tests::tracker::ledger_settings(refbus_tests::tracker::Db::Postgres);
    let direct = settings.clone();
    let url = postgres_url();
    let (_, rest) = url.split_once('@').unwrap();
    let database = rest.split_once('/').map_or("test", |(_, db)| db);
    settings.database_url = Some(format!("postgres://postgres@{}/{database}", proxy.addr));
    let tracker = TestTracker::start(&bus, settings, Clock::System).await;
    let stop = Arc::new(AtomicBool::new(false));
    let centre = bus.gateway_as("detention-centre", CENTRE).await;
    let load = tokio::spawn(steady_load(centre, "db", stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let load = within("the load to stop", load).await.unwrap();

    let ledger = TestTracker::ledger(&direct).await;
    let wanted: HashSet<&String> = load.confirmed.iter().collect();
    let recorded: Vec<String> = eventually("the ledger to catch up", || async {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM referrals WHERE kind = 'legal_help_request'")
                .fetch_all(&ledger.pool)
                .await
                .ok()?;
        let have: HashSet<&String> = ids.iter().collect();
        wanted.is_subset(&have).then_some(ids)
    })
    .await;
    let events: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM ledger_events WHERE event = 'legal_help_request'")
            .fetch_one(&ledger.pool)
            .await
            .unwrap();
    assert_eq!(
        events as usize,
        recorded.len(),
        "one ledger event per message"
    );
    report("ledger database away 10 s", &load, &recorded, "recorded");
    ledger.close().await;
    let settings = tracker.stop().await.0;
    bus.stop().await;
    drop_ledger(&direct).await;
    drop(settings);
}

/// Every connection of the agency services to the broker cut by a proxy for
/// 5 s under load, then restored: submissions fail with UNAVAILABLE while
/// cut, and every confirmed one reaches the recipient once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_cut_by_a_proxy_for_5_s() {
    let broker: std::net::SocketAddr = {
        let url = refbus_tests::amqp_url();
        let host = url.split_once('@').map_or("127.0.0.1:5672", |(_, rest)| {
            rest.split_once('/').map_or(rest, |(host, _)| host)
        });
        tokio::net::lookup_host(host).await.unwrap().next().unwrap()
    };
    let proxy = Proxy::start(broker).await;
    let bus = TestBus::spawn_with(refbus_tests::test_settings(proxy.amqp_url())).await;
    let stop = Arc::new(AtomicBool::new(false));
    let centre = bus.gateway_as("detention-centre", CENTRE).await;
    let load = tokio::spawn(steady_load(centre, "cut", stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let load = within("the load to stop", load).await.unwrap();
    assert!(load.failed() > 0, "the cut was felt: {load:?}");

    delivered_once(&bus, &load, "broker connections cut 5 s").await;
    bus.stop().await;
}

/// The broker itself (a node of the test's own) stopped cleanly under load
/// and started again on its data: submissions fail with UNAVAILABLE while
/// it is down, and every confirmed one reaches the recipient once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_and_started() {
    let node = refbus_tests::broker::BrokerNode::start().await;
    let bus = TestBus::spawn_with(refbus_tests::test_settings(node.amqp_url())).await;
    let stop = Arc::new(AtomicBool::new(false));
    let centre = bus.gateway_as("detention-centre", CENTRE).await;
    let load = tokio::spawn(steady_load(centre, "restart", stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.resume().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let load = within("the load to stop", load).await.unwrap();
    assert!(load.failed() > 0, "the stop was felt: {load:?}");
    delivered_once(&bus, &load, "broker stopped and started").await;
    bus.stop().await;
    node.stop().await;
}
