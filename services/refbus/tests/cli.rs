//! The `refbus` command's offline subcommands. (Being an integration test of
//! this package also makes `cargo test --workspace` build the `refbus`
//! binary, which the acceptance tests run as a child process.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn refbus(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_refbus"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env_remove("REFBUS_NAMESPACE")
        .env_remove("REFBUS_DIRECTORY")
        .output()
        .unwrap()
}

#[test]
fn the_committed_rabbitmq_definitions_match_the_code() {
    let out = refbus(&["topology"]);
    assert!(out.status.success());
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/rabbitmq/definitions.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        generated, committed,
        "regenerate with: cargo run -p refbus -- topology > deploy/rabbitmq/definitions.json"
    );
}

#[test]
fn directory_check_names_the_line_and_the_problem() {
    let out = refbus(&["directory", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("agencies, valid"));

    let dir = std::env::temp_dir().join(format!("refbus-bad-dir-{}.toml", std::process::id()));
    std::fs::write(
        &dir,
        "[[region]]\ncode = \"500000\"\nname = \"重庆市\"\nlevel = \"municipal\"\n\n[[agency]]\nid = \"cq-x\"\nname = \"x\"\nkind = \"bar_association\"\nsystem = \"court\"\nlevel = \"municipal\"\nregion = \"500000\"\n",
    )
    .unwrap();
    let out = refbus(&["directory", "check", dir.to_str().unwrap()]);
    std::fs::remove_file(&dir).ok();
    // 7: a check found a problem (`refbus --help`, exit codes).
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            ":6: agency `cq-x`: kind `bar_association` belongs to system bar, not `court`"
        ),
        "{err}"
    );
}

#[test]
fn up_says_in_one_line_when_the_broker_cannot_be_reached() {
    let out = Command::new(env!("CARGO_BIN_EXE_refbus"))
        .arg("up")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("REFBUS_PORT_BASE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"),
        "{err}"
    );
    assert!(err.contains("rabbitmq-server -detached"), "{err}");
}

#[test]
fn keys_generate_makes_private_files_and_prints_the_directory_lines() {
    let out_dir = std::env::temp_dir().join(format!("refbus-keys-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = refbus(&["keys", "generate", "--out", out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    // Every agency of the directory and the tracker, each with a private
    // file of its own.
    let directory = refbus_core::Directory::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/local/directory.toml"
    ))
    .unwrap();
    assert_eq!(
        printed.lines().count(),
        directory.agencies().len() + 1,
        "{printed}"
    );
    assert!(printed.contains("refbus-tracker\tpublic_key = \""));
    let file = out_dir.join("dz-duty-desk.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    }
    // Never overwritten.
    let again = refbus(&["keys", "generate", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refbus-keys-cli"));

    // The shipped directory publishes the development keys, not these: a
    // service given them refuses to start, naming the agency and the file,
    // before it touches the broker.
    let serve = Command::new(env!("CARGO_BIN_EXE_refbus"))
        .args(["serve", "legal-aid", "--listen", "127.0.0.1:0"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("REFBUS_SIGNING_KEYS", &out_dir)
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&out_dir).unwrap();
    assert_eq!(serve.status.code(), Some(1));
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(err.contains("REFBUS_SIGNING_KEYS"), "{err}");
    assert!(err.contains(".key) does not match its public_key"), "{err}");
}

#[test]
fn the_shipped_directory_lists_the_development_public_keys() {
    let out = refbus(&["keys", "development"]);
    assert!(out.status.success());
    let directory = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/local/directory.toml"
    ))
    .unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (_, key_line) = line.split_once('\t').unwrap();
        assert!(directory.contains(key_line), "{line}");
    }
}
