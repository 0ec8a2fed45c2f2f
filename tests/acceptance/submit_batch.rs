//! Issue 17: an agency system submits many referrals in one call
//! (`Gateway.SubmitBatch`). Each envelope is answered as `Submit` would
//! answer it, with its own receipt after its own confirm; a refused one
//! publishes nothing and stops no other; a retried batch gives the same ids
//! and is delivered once; an oversized batch is refused whole; while the
//! broker is unreachable the results are UNAVAILABLE and nothing confirmed
//! is lost. The ignored `timing_*` test prints what one batch of 200 costs
//! against 200 Submits (no timed assertion).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::letter::Disposition;
use refbus_proto::v1::{
    Detainee, Envelope, Letter, Receipt, SubmitBatchRequest, SubmitResult, submit_result,
};
use refbus_tests::fixtures::{CENTRE, DESK, legal_help, submit};
use refbus_tests::proxy::Proxy;
use refbus_tests::{Amqp, Inbox, TestBus, acknowledge, within};
use tonic::Code;
use tonic::transport::Channel;

fn batch(envelopes: Vec<Envelope>) -> SubmitBatchRequest {
    SubmitBatchRequest { envelopes }
}

/// The receipt of a result, if it has one.
fn receipt(result: &SubmitResult) -> Option<&Receipt> {
    match &result.result {
        Some(submit_result::Result::Receipt(receipt)) => Some(receipt),
        _ => None,
    }
}

/// The (code, message) of a refused result, if it is one.
fn refusal(result: &SubmitResult) -> Option<(Code, &str)> {
    match &result.result {
        Some(submit_result::Result::Error(e)) => Some((Code::from(e.code), e.message.as_str())),
        _ => None,
    }
}

/// The receipts' ids of a batch that must all be receipted.
fn all_receipted(results: &[SubmitResult]) -> Vec<String> {
    results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            receipt(r)
                .unwrap_or_else(|| panic!("envelope {i} not receipted: {r:?}"))
                .id
                .clone()
        })
        .collect()
}

/// `n` legal-help requests under keys `{prefix}-0..n`.
fn requests(prefix: &str, n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| legal_help(&format!("{prefix}-{i}")))
        .collect()
}

/// Reads the desk's inbox, acknowledging each delivery, until every id of
/// `expected` has come and then a sentinel submitted after them; asserts
/// that nothing else and nothing twice was handed over, and that the queue
/// is left empty (every copy acknowledged or dropped as a duplicate).
async fn delivered_exactly_once(
    bus: &TestBus,
    centre: &mut GatewayClient<Channel>,
    expected: &HashSet<String>,
    sentinel_key: &str,
) {
    let sentinel = centre
        .submit(submit(legal_help(sentinel_key)))
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut desk = bus.gateway_as("legal-aid", DESK).await;
    let mut inbox = Inbox::open(&mut desk, DESK).await;
    let mut handed = Vec::new();
    loop {
        let delivery = inbox.next().await;
        let id = delivery.envelope.unwrap().id;
        acknowledge(&mut desk, DESK, delivery.delivery_token).await;
        if id == sentinel {
            break;
        }
        handed.push(id);
    }
    drop(inbox);
    let distinct: HashSet<String> = handed.iter().cloned().collect();
    assert_eq!(distinct.len(), handed.len(), "an id was handed over twice");
    assert_eq!(
        &distinct, expected,
        "exactly the receipted ids were delivered"
    );
    let amqp = Amqp::connect().await;
    assert_eq!(
        amqp.settled_count(&bus.inbox_queue(DESK)).await,
        0,
        "nothing left behind"
    );
    amqp.close().await;
}

/// 200 valid legal-help requests in one call: 200 receipts, in order, and
/// each in the desk's inbox exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_200_is_receipted_and_delivered_once_each() {
    let bus = TestBus::spawn().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let envelopes = requests("many", 200);
    let results = centre
        .submit_batch(batch(envelopes.clone()))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 200, "one result per envelope");
    let ids = all_receipted(&results);
    for (envelope, id) in envelopes.iter().zip(&ids) {
        assert_eq!(
            *id,
            refbus_core::envelope::envelope_id(&envelope.sender, &envelope.idempotency_key),
            "results in the order of the envelopes"
        );
    }
    let ids: HashSet<String> = ids.into_iter().collect();
    assert_eq!(ids.len(), 200);
    let text = bus.shared.telemetry.encode();
    let counted = text
        .lines()
        .find(|l| {
            l.starts_with("refbus_gateway_submitted_total{")
                && l.contains("service=\"detention-centre\"")
                && l.contains("kind=\"legal_help_request\"")
        })
        .unwrap_or_else(|| panic!("no submitted count: {text}"));
    assert!(counted.ends_with(" 200"), "{counted}");
    delivered_exactly_once(&bus, &mut centre, &ids, "many-sentinel").await;
    bus.stop().await;
}

/// Each envelope of a mixed batch is answered on its own, with the code and
/// message `Submit` answers it with; only the valid ones are published, and
/// one refused stops no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_answers_each_envelope_as_submit_would() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue(DESK);
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;

    let valid = legal_help("mix-1");
    let mut no_key = legal_help("mix-x");
    no_key.idempotency_key.clear();
    let mut other_sender = legal_help("mix-3");
    other_sender.sender = "yb-detention-centre".into();
    let mut forbidden = legal_help("mix-4");
    forbidden.recipient = "dz-court".into();
    let mut unknown = legal_help("mix-5");
    unknown.recipient = "nowhere".into();
    let duplicate = legal_help("mix-1");
    let last = legal_help("mix-7");
    let envelopes = vec![
        valid,
        no_key,
        other_sender,
        forbidden,
        unknown,
        duplicate,
        last,
    ];
    let results = centre
        .submit_batch(batch(envelopes.clone()))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), envelopes.len(), "one result per envelope");

    let first = receipt(&results[0])
        .expect("the valid one receipted")
        .clone();
    let again = receipt(&results[5]).expect("a repeated key receipted, as by Submit");
    assert_eq!(again.id, first.id, "a repeated key gives the same id");
    let last = receipt(&results[6]).expect("the last valid one receipted");
    assert_ne!(last.id, first.id);

    let expected_codes = [
        (
            1,
            Code::InvalidArgument,
            "envelope.idempotency_key: required",
        ),
        (2, Code::PermissionDenied, "envelope.sender:"),
        (3, Code::PermissionDenied, "CQ-1.1b:"),
        (4, Code::NotFound, "envelope.recipient:"),
    ];
    assert_eq!(
        amqp.envelopes_in(&queue).await,
        3,
        "published: the valid one, its repeat and the last; nothing of the refused"
    );
    for (i, code, starts) in expected_codes {
        let (got_code, got_message) =
            refusal(&results[i]).unwrap_or_else(|| panic!("envelope {i} refused: {results:?}"));
        assert_eq!(got_code, code, "envelope {i}: {got_message}");
        assert!(
            got_message.starts_with(starts),
            "envelope {i}: {got_message}"
        );
        // What Submit answers for the same envelope (it publishes nothing).
        let status = centre
            .submit(submit(envelopes[i].clone()))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (got_code, got_message),
            "envelope {i}: as Submit answers"
        );
    }
    assert_eq!(
        amqp.envelopes_in(&queue).await,
        3,
        "Submit published no refused one"
    );
    amqp.close().await;

    let ids: HashSet<String> = [first.id.clone(), last.id.clone()].into();
    delivered_exactly_once(&bus, &mut centre, &ids, "mix-sentinel").await;
    bus.stop().await;
}

/// A batch retried whole gives the same ids, in the same order, and the
/// desk gets each referral once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_gives_the_same_ids_and_is_delivered_once() {
    let bus = TestBus::spawn().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let envelopes = requests("retry", 40);
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let results = centre
            .submit_batch(batch(envelopes.clone()))
            .await
            .unwrap()
            .into_inner()
            .results;
        rounds.push(all_receipted(&results));
    }
    assert_eq!(rounds[0], rounds[1], "the same ids, in the same order");
    let amqp = Amqp::connect().await;
    assert_eq!(
        amqp.envelopes_in(&bus.inbox_queue(DESK)).await,
        80,
        "both copies on the queue"
    );
    amqp.close().await;
    let ids: HashSet<String> = rounds[0].iter().cloned().collect();
    delivered_exactly_once(&bus, &mut centre, &ids, "retry-sentinel").await;
    bus.stop().await;
}

/// Over the limit of envelopes per call: refused whole, nothing published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_batch_is_refused_whole() {
    let bus = TestBus::spawn().await;
    let amqp = Amqp::connect().await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let max = refbus_gateway::gateway::MAX_BATCH;
    let status = centre
        .submit_batch(batch(requests("big", max + 1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().starts_with(&format!(
            "envelopes: {} envelopes, over the limit of {max}",
            max + 1
        )),
        "{}",
        status.message()
    );
    assert_eq!(
        amqp.counts(&bus.inbox_queue(DESK)).await.0,
        0,
        "nothing published"
    );
    // The limit itself is one call.
    let results = centre
        .submit_batch(batch(requests("big", max)))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(all_receipted(&results).len(), max);
    assert_eq!(amqp.envelopes_in(&bus.inbox_queue(DESK)).await, max);
    amqp.close().await;
    bus.stop().await;
}

/// A letter with its content is sealed to its lawyer for every envelope of
/// a batch, as Submit seals it; a letter to a lawyer nobody registered is
/// NOT_FOUND, as from Submit, and stops no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_in_a_batch_are_sealed_and_checked_against_the_register() {
    use refbus_tests::lawyers::{LawyerInbox, LawyerWorld, acknowledge_lawyer};
    const PLAIN: &str = "PIIBATCH-律师您好，请来会见-0017";
    let world = LawyerWorld::start().await;
    let lawyer = world
        .register("dz-bar-committee", "15001201910000021", "500111")
        .await;
    let letter = |key: &str, licence: &str| Envelope {
        sender: CENTRE.into(),
        recipient: "lawyer-service".into(),
        idempotency_key: key.into(),
        payload: Some(Payload::Letter(Letter {
            detainee: Some(Detainee {
                name: "隐私甲乙丙".into(),
                ..Detainee::default()
            }),
            addressee: Some(refbus_proto::v1::Lawyer {
                licence_number: licence.into(),
                ..lawyer.lawyer()
            }),
            disposition: Some(Disposition::Content(PLAIN.as_bytes().to_vec())),
        })),
        ..Envelope::default()
    };
    let mut centre = world.gateway("detention-centre").await;
    let envelopes = vec![
        letter("batch-letter-1", &lawyer.licence),
        letter("batch-letter-2", "15001201910000029"),
    ];
    let results = centre
        .submit_batch(refbus_tests::as_agency(CENTRE, batch(envelopes.clone())))
        .await
        .unwrap()
        .into_inner()
        .results;
    let sent = receipt(&results[0]).expect("the registered lawyer's letter receipted");
    let (code, message) = refusal(&results[1]).expect("the unregistered one refused");
    assert_eq!(code, Code::NotFound, "{message}");
    let status = centre
        .submit(refbus_tests::as_agency(
            CENTRE,
            submit(envelopes[1].clone()),
        ))
        .await
        .unwrap_err();
    assert_eq!((status.code(), status.message()), (code, message));

    let mut client = world.lawyers().await;
    let mut inbox = LawyerInbox::open(&mut client, &lawyer).await;
    let delivery = inbox.next().await;
    let envelope = delivery.envelope.unwrap();
    assert_eq!(envelope.id, sent.id);
    let Some(Payload::Letter(Letter {
        disposition: Some(Disposition::SealedContent(sealed)),
        ..
    })) = envelope.payload
    else {
        panic!("a sealed letter: {:?}", envelope.payload);
    };
    assert_eq!(
        refbus_tests::open_sealed(&sealed, &lawyer.identity).as_deref(),
        Some(PLAIN.as_bytes()),
        "sealed to the lawyer's key"
    );
    acknowledge_lawyer(&mut client, &lawyer, delivery.delivery_token).await;
    drop(inbox);
    world.stop().await;
}

/// With the broker unreachable, every envelope answers UNAVAILABLE and the
/// batch retried once it is back is receipted under the same ids; what was
/// confirmed before the cut and after it reaches the desk once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_unreachable_the_results_are_unavailable_and_nothing_is_lost() {
    let broker = {
        let url = refbus_tests::amqp_url();
        let host = url.split_once('@').map_or("127.0.0.1:5672", |(_, rest)| {
            rest.split_once('/').map_or(rest, |(host, _)| host)
        });
        tokio::net::lookup_host(host).await.unwrap().next().unwrap()
    };
    let proxy = Proxy::start(broker).await;
    let bus = TestBus::spawn_with(refbus_tests::test_settings(proxy.amqp_url())).await;
    let mut centre = bus.gateway_as("detention-centre", CENTRE).await;
    let before = centre
        .submit_batch(batch(requests("before-cut", 30)))
        .await
        .unwrap()
        .into_inner()
        .results;
    let before = all_receipted(&before);

    proxy.cut();
    let mut connection = bus.shared.bus.connection();
    within("the bus to notice the cut", async {
        while connection.is_up() {
            connection.changed().await;
        }
    })
    .await;
    let during = requests("during-cut", 30);
    let results = centre
        .submit_batch(batch(during.clone()))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), during.len());
    for (i, result) in results.iter().enumerate() {
        let (code, message) =
            refusal(result).unwrap_or_else(|| panic!("envelope {i} not refused: {result:?}"));
        assert_eq!(code, Code::Unavailable, "envelope {i}: {message}");
    }

    proxy.restore();
    // The client retries the batch (the same keys) until it is receipted.
    let after = within("the retried batch to be receipted", async {
        loop {
            let results = centre
                .submit_batch(batch(during.clone()))
                .await
                .unwrap()
                .into_inner()
                .results;
            if results.iter().all(|r| receipt(r).is_some()) {
                return all_receipted(&results);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    for (envelope, id) in during.iter().zip(&after) {
        assert_eq!(
            *id,
            refbus_core::envelope::envelope_id(&envelope.sender, &envelope.idempotency_key)
        );
    }
    let ids: HashSet<String> = before.into_iter().chain(after).collect();
    assert_eq!(ids.len(), 60);
    delivered_exactly_once(&bus, &mut centre, &ids, "cut-sentinel").await;
    bus.stop().await;
}

/// Empties `queue` (between rounds of a measurement).
async fn purge(amqp: &Amqp, queue: &str) {
    amqp.channel
        .queue_purge(queue.into(), Default::default())
        .await
        .unwrap();
}

/// Prints what one SubmitBatch of 200 costs against 200 Submits one after
/// another and 200 Submits at once, on the same service and broker, five
/// rounds of each; it asserts only that every Submit and every envelope of
/// each batch got its receipt, never a timing. It runs with the others
/// (about 3 s on the debug build), so the measurement keeps working; its
/// figures mean something from a release build: `cargo test -p
/// refbus-tests --release --test acceptance -- submit_batch::timing
/// --nocapture` (BENCHMARKS.md, issue 17).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_one_batch_of_200_against_200_submits() {
    const N: usize = 200;
    const ROUNDS: usize = 5;
    let bus = TestBus::spawn().await;
    let centre = bus.gateway_as("detention-centre", CENTRE).await;
    let amqp = Amqp::connect().await;
    let queue = bus.inbox_queue(DESK);
    // Warm up the connection and the service.
    centre
        .clone()
        .submit_batch(batch(requests("warm", 20)))
        .await
        .unwrap();
    let mut sequential = Vec::new();
    let mut concurrent = Vec::new();
    let mut batched = Vec::new();
    for round in 0..ROUNDS {
        purge(&amqp, &queue).await;
        let started = Instant::now();
        let mut client = centre.clone();
        for envelope in requests(&format!("seq-{round}"), N) {
            client.submit(submit(envelope)).await.unwrap();
        }
        sequential.push(started.elapsed());

        purge(&amqp, &queue).await;
        let started = Instant::now();
        let calls = requests(&format!("par-{round}"), N).into_iter().map(|e| {
            let mut client = centre.clone();
            async move { client.submit(submit(e)).await.unwrap() }
        });
        futures_util::future::join_all(calls).await;
        concurrent.push(started.elapsed());

        purge(&amqp, &queue).await;
        let started = Instant::now();
        let results = centre
            .clone()
            .submit_batch(batch(requests(&format!("batch-{round}"), N)))
            .await
            .unwrap()
            .into_inner()
            .results;
        batched.push(started.elapsed());
        assert_eq!(all_receipted(&results).len(), N);
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (s, c, b) = (median(sequential), median(concurrent), median(batched));
    println!(
        "{N} envelopes, median of {ROUNDS}: 200 Submits one after another {s:?} ({:.0} µs each), \
         200 Submits at once {c:?}, one SubmitBatch {b:?} ({:.0} µs each); batch {:.1}x faster than sequential, {:.1}x than concurrent",
        s.as_secs_f64() * 1e6 / N as f64,
        b.as_secs_f64() * 1e6 / N as f64,
        s.as_secs_f64() / b.as_secs_f64(),
        c.as_secs_f64() / b.as_secs_f64(),
    );
    purge(&amqp, &queue).await;
    amqp.close().await;
    bus.stop().await;
}

/// A legal-help request file (protobuf JSON) under key `key`, to `recipient`.
fn request_file(dir: &std::path::Path, key: &str, recipient: &str) -> String {
    let path = dir.join(format!("{key}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{
  "recipient": "{recipient}",
  "idempotency_key": "{key}",
  "clock_started_at": "{}",
  "legal_help_request": {{
    "detention_centre": "{CENTRE}",
    "detainee": {{"name": "王五", "id_number": "500225199202021234", "custody_number": "DZ-CLI-1"}},
    "matter": "cli"
  }}
}}"#,
            chrono::Utc::now().to_rfc3339()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// `refbus send` with several files: one SubmitBatch, one line per file in
/// order, the refused one with its code and message, and the exit code of
/// the first refusal; the others sent all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refbus_send_with_several_files_sends_them_in_one_batch() {
    let up = refbus_tests::up::Up::start().await;
    let dir = up.data_dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let first = request_file(&dir, "cli-batch-1", DESK);
    let court = request_file(&dir, "cli-batch-2", "dz-court");
    let last = request_file(&dir, "cli-batch-3", DESK);
    let sent = up
        .refbus("detention-centre", CENTRE, &["send", &first, &court, &last])
        .await;
    assert_eq!(sent.code, 4, "the refusal's exit code: {sent:?}");
    assert!(sent.stderr.contains("1 of 3 not sent"), "{sent:?}");
    let lines: Vec<Vec<&str>> = sent
        .stdout
        .lines()
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(
        lines[0],
        ["file", "id", "recipient", "also to", "submitted", "error"],
        "{sent:?}"
    );
    assert_eq!(lines.len(), 4, "{sent:?}");
    let id = |key: &str| refbus_core::envelope::envelope_id(CENTRE, key);
    assert_eq!(
        (lines[1][0], lines[1][1], lines[1][2]),
        (first.as_str(), id("cli-batch-1").as_str(), DESK)
    );
    assert_eq!(lines[2][0], court);
    assert!(
        lines[2][5].starts_with("PermissionDenied: CQ-1.1b"),
        "{sent:?}"
    );
    assert_eq!(lines[3][1], id("cli-batch-3"));

    // The same files again, as JSON: the same ids.
    let again = up
        .refbus(
            "detention-centre",
            CENTRE,
            &["send", &first, &last, "-o", "json"],
        )
        .await;
    assert_eq!(again.code, 0, "{again:?}");
    let ids: Vec<String> = again
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["receipt"]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, [id("cli-batch-1"), id("cli-batch-3")]);
    // --key names one message.
    let keyed = up
        .refbus(
            "detention-centre",
            CENTRE,
            &["send", &first, &last, "--key", "k"],
        )
        .await;
    assert_eq!(keyed.code, 3, "{keyed:?}");
    up.stop().await;
}
