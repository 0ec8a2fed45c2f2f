//! The refbus tracker: the ledger of every referral on the bus, its hops
//! and its obligations with their deadlines; who is told when one is late;
//! and the queries agencies and supervisors ask ("What tracking feedback
//! means" in DOMAIN.md).
//!
//! # Layout
//! - [`clock`]: the injectable clock (system, or manual in tests).
//! - [`ledger`]: storage (SQLite or PostgreSQL, one schema) and the hash chain.
//! - [`record`]: what each message on the tap records, and which obligations it creates or meets.
//! - [`deadline`]: the deadline engine and the overdue-notice outbox.
//! - [`query`]: the gRPC queries (status and timeline, obligations, compliance report).
//! - [`audit`]: verification of the hash chain.
//! - [`dashboard`]: the read-only web dashboard (overdue, timeline, monthly chart).
//! - [`app`]: building and running the tracker.
//! - [`cli`]: the tracker as a service of its own (`tracker run`, `refbus tracker`).

#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod dashboard;
pub mod deadline;
pub mod ledger;
pub mod query;
pub mod record;

pub use app::{Tracker, TrackerError, TrackerSettings};
pub use clock::Clock;
