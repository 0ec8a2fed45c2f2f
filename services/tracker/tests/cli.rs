//! The `tracker` command offline: `verify` on a fresh ledger, and a policy
//! error stopping start-up with the file and line. (Being an integration
//! test of this package also makes `cargo test --workspace` build the
//! `tracker` binary, which the acceptance tests run as a child process.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn tracker(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tracker"));
    command
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "error");
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("refbus-tracker-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn verify_on_a_fresh_ledger_says_intact() {
    let dir = temp_dir("verify");
    let out = tracker(&["verify"], &[("REFBUS_DATA_DIR", dir.to_str().unwrap())]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ledger intact: 0 chained events, 0 envelopes match their events"
    );
}

#[test]
fn a_bad_policy_file_stops_start_up_naming_file_and_line() {
    let policy = temp_dir("policy");
    std::fs::write(
        policy.join("bad.toml"),
        "[[obligation]]\nrule = \"CQ-1.1b\"\nkind = \"legal_help_request\"\nduty = \"x\"\nbearer = \"sender\"\nclock = \"requested\"\ndeadline = \"24 hours\"\nmet_by = \"delivered\"\nnotify = [\"sender\"]\nterritory = \"500000\"\n",
    )
    .unwrap();
    let out = tracker(
        &["run"],
        &[
            ("REFBUS_POLICY", policy.to_str().unwrap()),
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            ("REFBUS_NAMESPACE", "tracker-cli-bad-policy"),
            ("REFBUS_QUEUE_EXPIRES", "10s"),
        ],
    );
    std::fs::remove_dir_all(&policy).ok();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:"), "{err}");
    assert!(err.contains("24 hours"), "{err}");
}
