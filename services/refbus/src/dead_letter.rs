//! `refbus dead-letter list` and `refbus dead-letter replay`: the
//! operator's view of the dead-letter queue (issue 16). Only what a
//! consumer could not decode, verify or store lands there, each message
//! with the reason; listing shows ids, kinds, queues, reasons and sizes,
//! never content (it may hold personal data), and changes nothing. Replay
//! sends chosen messages back to the queue they came from, where they are
//! verified and handled again.

use std::time::Duration;

use refbus_bus::{Bus, BusConfig, DeadLetter, Topology, redact_url};
use tokio_util::sync::CancellationToken;

use crate::client::{ExitCode, Failure, Output, Rows};

/// Which bus's dead-letter queue.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadLetterBus {
    /// The broker, with credentials that may read the dead-letter queue.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The bus's namespace (the prefix of its queues).
    #[arg(long, env = "REFBUS_NAMESPACE", default_value = "refbus")]
    pub namespace: String,
    /// Look at no more than this many dead letters (oldest first).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[arg(long, short = 'o', value_enum, default_value = "auto")]
    pub output: Output,
}

#[derive(Debug, clap::Subcommand)]
pub enum DeadLetterAction {
    /// List what waits in the dead-letter queue: position, id, kind, the
    /// queue it came from, why, and its size. Changes nothing.
    ///
    /// Example: refbus dead-letter list
    /// Example: refbus dead-letter list -o json --limit 50
    List {
        #[command(flatten)]
        bus: DeadLetterBus,
    },
    /// Send dead letters back to the queue each came from, once what
    /// refused them is fixed: those with the given ids, or all of them. Each
    /// is published again (confirmed) before it leaves the dead-letter
    /// queue; the consumer verifies and handles it as new.
    ///
    /// Example: refbus dead-letter replay 0193a2b4-...
    /// Example: refbus dead-letter replay --all
    Replay {
        #[command(flatten)]
        bus: DeadLetterBus,
        /// The message ids to replay (as `list` shows them).
        ids: Vec<String>,
        /// Replay every dead letter (up to --limit).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

async fn connect(bus: &DeadLetterBus) -> Result<(Bus, CancellationToken), Failure> {
    let shutdown = CancellationToken::new();
    let mut config = BusConfig::new(&bus.amqp_url, Topology::new(&bus.namespace, Vec::new()));
    // Look, do not configure: the queue must exist already.
    config.declare_topology = false;
    config.connection_name = "refbus dead-letter".into();
    config.connect_timeout = Duration::from_secs(5);
    let connected = Bus::connect(config, shutdown.clone()).await.map_err(|e| {
        Failure::new(
            ExitCode::Unavailable,
            format!("{}: {e}", redact_url(&bus.amqp_url)),
        )
    })?;
    Ok((connected, shutdown))
}

fn failure(e: &refbus_bus::DeadLetterError) -> Failure {
    let code = match e {
        refbus_bus::DeadLetterError::NoOrigin { .. } => ExitCode::CheckFailed,
        _ => ExitCode::Unavailable,
    };
    Failure::new(code, format!("dead-letter: {e}"))
}

fn print(letters: &[DeadLetter], output: Output) {
    if output == Output::Json {
        for letter in letters {
            println!("{}", serde_json::to_string(letter).unwrap_or_default());
        }
        return;
    }
    let mut rows = Rows::new(vec!["#", "id", "kind", "queue", "reason", "bytes"]);
    for letter in letters {
        rows.push(
            vec![
                letter.position.to_string(),
                letter.message_id.clone().unwrap_or_else(|| "-".into()),
                letter.kind.clone().unwrap_or_else(|| "-".into()),
                letter.queue.clone().unwrap_or_else(|| "-".into()),
                letter.reason.clone(),
                letter.bytes.to_string(),
            ],
            None,
        );
    }
    rows.print(output);
}

/// Runs a `refbus dead-letter` command.
///
/// # Errors
/// The broker unreachable (exit 6), or a dead letter that names no queue
/// to go back to (exit 7).
pub async fn run(action: DeadLetterAction) -> Result<(), Failure> {
    match action {
        DeadLetterAction::List { bus: which } => {
            let (bus, shutdown) = connect(&which).await?;
            let listed = bus.list_dead_letters(which.limit).await;
            bus.close().await;
            shutdown.cancel();
            print(&listed.map_err(|e| failure(&e))?, which.output.resolved());
            Ok(())
        }
        DeadLetterAction::Replay {
            bus: which,
            ids,
            all,
        } => {
            if ids.is_empty() && !all {
                return Err(Failure::new(
                    ExitCode::Refused,
                    "dead-letter replay: name the ids to replay, or --all",
                ));
            }
            let (bus, shutdown) = connect(&which).await?;
            let replayed = bus
                .replay_dead_letters(which.limit, |letter| {
                    all || letter
                        .message_id
                        .as_ref()
                        .is_some_and(|id| ids.contains(id))
                })
                .await;
            bus.close().await;
            shutdown.cancel();
            let replayed = replayed.map_err(|e| failure(&e))?;
            let output = which.output.resolved();
            if output == Output::Json {
                for r in &replayed {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                }
            } else {
                let mut rows = Rows::new(vec!["id", "replayed to"]);
                for r in &replayed {
                    rows.push(
                        vec![
                            r.message_id.clone().unwrap_or_else(|| "-".into()),
                            r.queue.clone(),
                        ],
                        None,
                    );
                }
                rows.print(output);
            }
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !replayed.iter().any(|r| r.message_id.as_ref() == Some(*id)))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(Failure::new(
                    ExitCode::NotFound,
                    format!(
                        "dead-letter replay: not in the dead-letter queue: {}",
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        }
    }
}
