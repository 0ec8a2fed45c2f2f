//! Tracing set-up, in one place: human-readable lines on standard error,
//! filtered by `RUST_LOG` (default `info`). Fields carry ids, kinds and
//! agencies, never payloads: detainee data stays out of logs.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call does nothing (tests).
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
