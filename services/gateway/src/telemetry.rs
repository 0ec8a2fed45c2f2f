//! Tracing set-up, in one place, filtered by `RUST_LOG` (default `info`):
//! human-readable lines when standard error is a terminal, one JSON object
//! per line otherwise (for journald, Docker and log shippers). Fields carry
//! ids, kinds and agencies, never payloads: detainee data stays out of logs.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call does nothing (tests).
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
}
