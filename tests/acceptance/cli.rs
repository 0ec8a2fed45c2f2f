//! Issue 7: every `refbus` subcommand a desk, a supervisor or a script
//! uses, run as a process against a running bus (`refbus up`), checking
//! its output and its exit code (0 success, 3 refused, 4 denied, 5 not
//! found, 6 unreachable, 7 a check failed).

use chrono::{Duration, Utc};
use refbus_tests::fixtures::{BUREAU, CENTRE, DESK};
use refbus_tests::up::{Up, eventually, run};

/// A legal-help request file (protobuf JSON), the detainee having asked
/// `hours_ago` hours ago.
fn request_file(dir: &std::path::Path, name: &str, hours_ago: i64) -> String {
    let asked = (Utc::now() - Duration::hours(hours_ago)).to_rfc3339();
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"{{
  "recipient": "{DESK}",
  "idempotency_key": "{name}",
  "clock_started_at": "{asked}",
  "legal_help_request": {{
    "detention_centre": "{CENTRE}",
    "detainee": {{"name": "王五", "id_number": "500225199202021234", "custody_number": "DZ-CLI-1"}},
    "matter": "cli"
  }}
}}"#
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// The id in the second line of `send`'s plain output.
fn sent_id(stdout: &str) -> String {
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("id\trecipient\talso to\tsubmitted"),
        "{stdout}"
    );
    lines
        .next()
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_works_against_the_running_bus_with_script_exit_codes() {
    let up = Up::start().await;
    let files = up.data_dir.join("files");
    std::fs::create_dir_all(&files).unwrap();

    // send: a request asked 2 h ago, then one asked 30 h ago that nobody
    // takes (overdue under CQ-1.1b, 24 h).
    let on_time = request_file(&files, "cli-on-time.json", 2);
    let sent = up
        .refbus("detention-centre", CENTRE, &["send", &on_time])
        .await;
    assert_eq!(sent.code, 0, "{sent:?}");
    let id = sent_id(&sent.stdout);
    // The same file again is the same message (its idempotency key).
    let again = up
        .refbus("detention-centre", CENTRE, &["send", &on_time])
        .await;
    assert_eq!(sent_id(&again.stdout), id);

    // send forbidden by a rule: a legal-help request to a court (CQ-1.1b
    // names the duty desk): not allowed, exit 4.
    let refused = up
        .refbus(
            "detention-centre",
            CENTRE,
            &["send", &on_time, "--to", "dz-court", "--key", "cli-court"],
        )
        .await;
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(refused.stderr.contains("PermissionDenied"), "{refused:?}");
    // send with a file that is not an envelope: exit 3 naming the file.
    let bad = files.join("bad.json");
    std::fs::write(&bad, r#"{"recipient": "dz-duty-desk", "no_such_field": 1}"#).unwrap();
    let bad = up
        .refbus("detention-centre", CENTRE, &["send", bad.to_str().unwrap()])
        .await;
    assert_eq!(bad.code, 3, "{bad:?}");
    assert!(bad.stderr.contains("bad.json"), "{bad:?}");
    // send as an agency the token does not name: exit 4.
    let denied = up
        .refbus(
            "detention-centre",
            CENTRE,
            &["send", &on_time, "--token", "dev-dz-court"],
        )
        .await;
    assert_eq!(denied.code, 4, "{denied:?}");

    // inbox: the desk takes the request and acknowledges it as it prints.
    let inbox = up
        .refbus(
            "legal-aid",
            DESK,
            &["inbox", "--count", "1", "--idle", "20s"],
        )
        .await;
    assert_eq!(inbox.code, 0, "{inbox:?}");
    let row: Vec<&str> = inbox.stdout.lines().nth(1).unwrap().split('\t').collect();
    assert_eq!(row[1], id, "{inbox:?}");
    assert_eq!(row[2], "legal_help_request");
    assert_eq!(row[6], "yes", "acknowledged: {inbox:?}");

    // inbox --no-ack and ack: a second request, held on an open stream by
    // one process and acknowledged by another.
    let second = request_file(&files, "cli-second.json", 1);
    let second_id = sent_id(
        &up.refbus("detention-centre", CENTRE, &["send", &second])
            .await
            .stdout,
    );
    let mut holding = tokio::process::Command::new(refbus_tests::refbus_binary());
    holding
        .args(["inbox", "--no-ack", "-o", "json"])
        .env("REFBUS_AGENCY", DESK)
        .env("REFBUS_SERVER", up.url("legal-aid"))
        .current_dir(refbus_tests::repo_root())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut holding = holding.spawn().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        holding.stdout.take().unwrap(),
    ));
    let line = refbus_tests::within("the held delivery", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let delivery: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(delivery["envelope"]["id"], second_id.as_str(), "{line}");
    assert_eq!(delivery["acknowledged"], false);
    let token = delivery["delivery_token"].as_str().unwrap().to_owned();
    let acked = up.refbus("legal-aid", DESK, &["ack", &token]).await;
    assert_eq!(acked.code, 0, "{acked:?}");
    assert_eq!(acked.stdout.trim(), "acknowledged 1 of 1");
    // Not pending any more: a single stale token is refused (exit 3); in a
    // list, it is reported and the command exits 7.
    let stale = up.refbus("legal-aid", DESK, &["ack", &token]).await;
    assert_eq!(stale.code, 3, "{stale:?}");
    let listed = up
        .refbus("legal-aid", DESK, &["ack", &token, "9-9-9"])
        .await;
    assert_eq!(listed.code, 7, "{listed:?}");
    assert!(listed.stdout.contains("acknowledged 0 of 2"), "{listed:?}");
    let _ = holding.start_kill();
    let _ = holding.wait().await;

    // status: the timeline, once the tracker has every hop.
    let status = eventually("the tracker to record the acknowledgement", || async {
        let s = up.refbus("tracker", CENTRE, &["status", &id]).await;
        (s.code == 0 && s.stdout.contains("\tacknowledged\tdz-duty-desk")).then_some(s)
    })
    .await;
    assert!(
        status
            .stdout
            .starts_with(&format!("legal_help_request {id} from {CENTRE} to {DESK}")),
        "{status:?}"
    );
    assert!(
        status.stdout.contains("\tsubmitted\tdz-detention-centre"),
        "{status:?}"
    );
    assert!(
        status.stdout.contains("\tdelivered\tdz-duty-desk"),
        "{status:?}"
    );
    assert!(status.stdout.contains("CQ-1.1b\t"), "{status:?}");
    assert!(status.stdout.contains("\tmet on time"), "{status:?}");
    // A table when asked (what a terminal gets by default).
    let table = up
        .refbus("tracker", CENTRE, &["status", &id, "-o", "table"])
        .await;
    assert!(
        table.stdout.contains("╞═") && table.stdout.contains("┆ acknowledged ┆"),
        "{table:?}"
    );
    // JSON too.
    let json = up
        .refbus("tracker", CENTRE, &["status", &id, "-o", "json"])
        .await;
    let parsed: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(parsed["id"], id.as_str());
    assert_eq!(parsed["obligations"][0]["rule"], "CQ-1.1b");
    // Not a party: 4. No such referral: 5. No tracker there: 6.
    assert_eq!(
        up.refbus("tracker", "dz-court", &["status", &id])
            .await
            .code,
        4
    );
    assert_eq!(
        up.refbus(
            "tracker",
            CENTRE,
            &["status", "00000000-0000-0000-0000-000000000000"],
        )
        .await
        .code,
        5
    );
    let unreachable = up
        .refbus(
            "tracker",
            CENTRE,
            &["status", &id, "--tracker", "http://127.0.0.1:9"],
        )
        .await;
    assert_eq!(unreachable.code, 6, "{unreachable:?}");

    // feedback: the desk answers; the timeline shows it.
    let answered = up
        .refbus(
            "legal-aid",
            DESK,
            &[
                "feedback",
                &id,
                "--outcome",
                "lawyer-assigned",
                "--summary",
                "assigned",
            ],
        )
        .await;
    assert_eq!(answered.code, 0, "{answered:?}");
    assert!(
        answered.stdout.contains(&format!("\t{CENTRE}\t{id}")),
        "{answered:?}"
    );
    eventually("the answer in the timeline", || async {
        let s = up.refbus("tracker", CENTRE, &["status", &id]).await;
        s.stdout.contains("\tanswered\tdz-duty-desk").then_some(())
    })
    .await;

    // overdue: a request asked 30 h ago, never taken, is overdue for the centre.
    let late = request_file(&files, "cli-late.json", 30);
    let late_id = sent_id(
        &up.refbus("detention-centre", CENTRE, &["send", &late])
            .await
            .stdout,
    );
    let overdue = eventually("the late request to be overdue", || async {
        let o = up.refbus("tracker", CENTRE, &["overdue"]).await;
        (o.code == 0 && o.stdout.contains(&late_id)).then_some(o)
    })
    .await;
    let rows: Vec<&str> = overdue.stdout.lines().collect();
    assert_eq!(rows[0], "rule\tduty\tbearer\treferral\tdue\tmet\tstate");
    assert_eq!(rows.len(), 2, "only the late request: {overdue:?}");
    assert!(
        rows[1].starts_with("CQ-1.1b\t") && rows[1].ends_with("\toverdue"),
        "{overdue:?}"
    );
    // --rule filters.
    let other_rule = up
        .refbus("tracker", CENTRE, &["overdue", "--rule", "CQ-3.14"])
        .await;
    assert_eq!(other_rule.stdout.lines().count(), 1, "{other_rule:?}");

    // report: CSV for the bureau (its region), and an HTML page with a chart.
    let today = Utc::now().date_naive();
    let from = (today - Duration::days(3)).to_string();
    let to = (today + Duration::days(1)).to_string();
    let csv = up
        .refbus(
            "tracker",
            BUREAU,
            &["report", "--from", &from, "--to", &to, "--format", "csv"],
        )
        .await;
    assert_eq!(csv.code, 0, "{csv:?}");
    assert!(csv.stdout.starts_with("agency,rule,count,"), "{csv:?}");
    let centre_row = csv
        .stdout
        .lines()
        .find(|l| l.starts_with("dz-detention-centre,CQ-1.1b,"))
        .unwrap_or_else(|| panic!("{csv:?}"));
    // 3 requests: 2 met on time, 0 late, 0 open, 1 overdue.
    assert!(
        centre_row.starts_with("dz-detention-centre,CQ-1.1b,3,2,0,0,1,"),
        "{centre_row}"
    );
    let page = up.data_dir.join("report.html");
    let html = up
        .refbus(
            "tracker",
            BUREAU,
            &[
                "report",
                "--from",
                &from,
                "--to",
                &to,
                "--format",
                "html",
                "--out",
                page.to_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(html.code, 0, "{html:?}");
    let page = std::fs::read_to_string(&page).unwrap();
    assert!(
        page.starts_with("<!doctype html>") && page.contains("<svg"),
        "{page}"
    );
    let backwards = up
        .refbus("tracker", BUREAU, &["report", "--from", &to, "--to", &from])
        .await;
    assert_eq!(backwards.code, 3, "{backwards:?}");

    // policy check and directory check: valid, then broken (exit 7, file and line).
    let policy = up.refbus("tracker", CENTRE, &["policy", "check"]).await;
    assert_eq!(policy.code, 0, "{policy:?}");
    assert!(
        policy.stdout.contains("CQ-1.1b\tlegal_help_request\t"),
        "{policy:?}"
    );
    assert!(policy.stdout.contains("obligation rules"), "{policy:?}");
    let broken = up.data_dir.join("policy");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(refbus_tests::repo_root().join("deploy/policy")).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
        }
    }
    let cq = std::fs::read_to_string(broken.join("cq-2020.toml")).unwrap();
    std::fs::write(
        broken.join("cq-2020.toml"),
        cq.replacen("deadline = \"24h\"", "deadline = \"24 parsecs\"", 1),
    )
    .unwrap();
    let bad_policy = up
        .refbus(
            "tracker",
            CENTRE,
            &["policy", "check", broken.to_str().unwrap()],
        )
        .await;
    assert_eq!(bad_policy.code, 7, "{bad_policy:?}");
    assert!(
        bad_policy.stderr.contains("cq-2020.toml") && bad_policy.stderr.contains("parsecs"),
        "{bad_policy:?}"
    );
    let bad_directory = up.data_dir.join("directory.toml");
    std::fs::write(&bad_directory, "[[agency]]\nid = \"x\"\n").unwrap();
    let checked = up
        .refbus(
            "tracker",
            CENTRE,
            &["directory", "check", bad_directory.to_str().unwrap()],
        )
        .await;
    assert_eq!(checked.code, 7, "{checked:?}");

    // audit verify: the ledger of this bus is intact.
    let audit = up.refbus("tracker", CENTRE, &["audit", "verify"]).await;
    assert_eq!(audit.code, 0, "{audit:?}");
    assert!(audit.stdout.starts_with("ledger intact:"), "{audit:?}");

    // --help carries examples and the exit codes.
    let mut help = tokio::process::Command::new(refbus_tests::refbus_binary());
    help.args(["--help"]);
    let help = run(help).await;
    assert!(help.stdout.contains("Exit codes: 0 success"), "{help:?}");
    let mut send_help = tokio::process::Command::new(refbus_tests::refbus_binary());
    send_help.args(["send", "--help"]);
    let send_help = run(send_help).await;
    assert!(
        send_help.stdout.contains("Example: refbus send"),
        "{send_help:?}"
    );

    up.stop().await;
}

/// Tampering is found by `refbus audit verify`, exit 7, naming the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_a_changed_row_and_exits_7() {
    let up = Up::start().await;
    let files = up.data_dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let request = request_file(&files, "cli-audit.json", 1);
    let id = sent_id(
        &up.refbus("detention-centre", CENTRE, &["send", &request])
            .await
            .stdout,
    );
    eventually("the request in the ledger", || async {
        let s = up.refbus("tracker", CENTRE, &["status", &id]).await;
        (s.code == 0).then_some(())
    })
    .await;
    let ledger = refbus_tracker::ledger::Ledger::connect(
        &refbus_tracker::ledger::sqlite_url(&up.data_dir).unwrap(),
        None,
    )
    .await
    .unwrap();
    sqlx::query("UPDATE ledger_events SET referral_id = 'tampered' WHERE seq = 1")
        .execute(&ledger.pool)
        .await
        .unwrap();
    ledger.close().await;
    let audit = up.refbus("tracker", CENTRE, &["audit", "verify"]).await;
    assert_eq!(audit.code, 7, "{audit:?}");
    assert!(audit.stdout.contains("seq 1"), "{audit:?}");
    up.stop().await;
}

/// With mutual TLS, the command authenticates with the agency's client
/// certificate: it acts as that agency, and as no other (exit 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_authenticate_with_a_client_certificate_under_mutual_tls() {
    let up = Up::start_with(refbus_tests::mtls_env()).await;
    assert!(
        up.url("detention-centre").starts_with("https://"),
        "{:?}",
        up.addrs
    );
    let tls = refbus_tests::tls_dir();
    let cert = |agency: &str| {
        [
            "--client-cert".to_owned(),
            tls.join(format!("agencies/{agency}.pem"))
                .display()
                .to_string(),
            "--client-key".to_owned(),
            tls.join(format!("agencies/{agency}.key"))
                .display()
                .to_string(),
            "--ca".to_owned(),
            tls.join("ca.pem").display().to_string(),
        ]
    };
    let files = up.data_dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let request = request_file(&files, "cli-mtls.json", 1);
    let mut args = vec!["send".to_owned(), request.clone()];
    args.extend(cert(CENTRE));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sent = up.refbus("detention-centre", CENTRE, &args).await;
    assert_eq!(sent.code, 0, "{sent:?}");
    let id = sent_id(&sent.stdout);
    let status = eventually("the request in the ledger", || async {
        let mut args = vec!["status".to_owned(), id.clone()];
        args.extend(cert(CENTRE));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let s = up.refbus("tracker", CENTRE, &args).await;
        (s.code == 0).then_some(s)
    })
    .await;
    assert!(status.stdout.contains(&id), "{status:?}");
    // The centre's certificate, claiming to be the court: not allowed.
    let mut args = vec!["status".to_owned(), id.clone()];
    args.extend(cert(CENTRE));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let posing = up.refbus("tracker", "dz-court", &args).await;
    assert_eq!(posing.code, 4, "{posing:?}");
    up.stop().await;
}
