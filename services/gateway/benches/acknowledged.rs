//! Issue 17: what the acknowledged store (`refbus_gateway::acknowledged`)
//! costs per acknowledgement, and how that grows with the store.
//!
//! `cargo bench -p refbus-gateway --bench acknowledged` (BENCH_ACKS, default
//! 200000; BENCH_GROUP, default 20: acknowledgements per group commit, about
//! what legal-aid's writer gathered at saturation in the speed bench). Each
//! round is what an inbox and its desk do: one look-up of a batch of fresh
//! ids (`contains_any`), then their acknowledgements recorded concurrently,
//! which the writer commits as one group. Ids are UUIDv5, as the gateway
//! gives them. Reports CPU and wall time per acknowledgement, and the bytes
//! the process wrote (`/proc/self/io`: the WAL and its checkpoints), for
//! the whole run and for its first and last tenth.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use refbus_gateway::acknowledged::Acknowledged;
use refbus_gateway::inbox::Received;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This process's CPU time so far (utime + stime, `/proc/self/stat`).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Bytes this process has passed to `write` and `pwrite` so far.
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

fn received(referral: &str) -> Received {
    Received {
        referral: referral.to_owned(),
        kind: "legal_help_request".into(),
        reply_to: "dz-detention-centre".into(),
        relays: Vec::new(),
        answers: true,
        payload_digest: "6ba5871218b729e13fa02c5126232f35898e5b41e561e2d383c270aac90676e2".into(),
        from_lawyer: String::new(),
        complainant: String::new(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let acks = env_usize("BENCH_ACKS", 200_000);
    let group = env_usize("BENCH_GROUP", 20).max(1);
    let path = std::env::temp_dir().join(format!(
        "refbus-bench-acknowledged-{}.db",
        std::process::id()
    ));
    let store = Acknowledged::open(&path).await.unwrap();
    let namespace = uuid::Uuid::from_u128(0x5eed);
    let agency = "dz-duty-desk";
    println!("acknowledged store: {acks} acknowledgements in groups of {group}");
    let (started, cpu_before, written_before) = (Instant::now(), cpu(), bytes_written());
    // Per tenth of the run: (wall, CPU, bytes).
    let tenth = (acks / group).div_ceil(10).max(1);
    let mut tenths: Vec<(Duration, Duration, u64)> = Vec::new();
    let mut mark = (Instant::now(), cpu(), bytes_written());
    for round in 0..acks / group {
        let ids: Vec<String> = (0..group)
            .map(|i| uuid::Uuid::new_v5(&namespace, &(round * group + i).to_le_bytes()).to_string())
            .collect();
        let asked: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert!(store.contains_any(agency, &asked).await.unwrap().is_empty());
        let recorded = futures_util::future::join_all(
            ids.iter()
                .map(|id| store.record(agency, id, Some(received(id)))),
        )
        .await;
        assert!(recorded.iter().all(Result::is_ok));
        if (round + 1) % tenth == 0 {
            let now = (Instant::now(), cpu(), bytes_written());
            tenths.push((now.0 - mark.0, now.1 - mark.1, now.2 - mark.2));
            mark = now;
        }
    }
    let (wall, spent, written) = (
        started.elapsed(),
        cpu() - cpu_before,
        bytes_written() - written_before,
    );
    let per = |d: Duration, n: usize| d.as_secs_f64() * 1e6 / n as f64;
    let kib = |b: u64, n: usize| b as f64 / 1024.0 / n as f64;
    println!(
        "  per acknowledgement: CPU {:.1} µs, wall {:.1} µs, written {:.1} KiB",
        per(spent, acks),
        per(wall, acks),
        kib(written, acks)
    );
    let n = tenth * group;
    for (name, t) in [("first", tenths.first()), ("last", tenths.last())] {
        if let Some((wall, spent, written)) = t {
            println!(
                "  {name} tenth: CPU {:.1} µs, wall {:.1} µs, written {:.1} KiB",
                per(*spent, n),
                per(*wall, n),
                kib(*written, n)
            );
        }
    }
    store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
