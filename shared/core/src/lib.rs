//! refbus domain: who the agencies are, what they may send each other, and
//! where the rules say a message goes.
//!
//! Pure logic, no I/O beyond reading the directory file: everything here is
//! driven by unit tests and shared by every service. Rule IDs (CQ-1.1b,
//! DZ-7 ...) refer to `shared/DOMAIN.md`.
//!
//! # Layout
//! - [`agency`]: agency kinds, organ systems, levels and ids.
//! - [`directory`]: the agency directory (`deploy/local/directory.toml`), validated on load.
//! - [`kind`]: message kinds, their wire names and whether they are referrals.
//! - [`lawyer`]: practice licence numbers and the credentials of a meeting request (CQ-1.2).
//! - [`rules`]: which agency kind may send which kind of message to whom.
//! - [`routing`]: statutory recipients (CQ-1.1b, CQ-3.14).
//! - [`envelope`]: envelope ids and the validation of a submission.
//! - [`calendar`]: region calendars for deadlines in working time.
//! - [`policy`]: the policy catalogue (`deploy/policy/*.toml`): obligations, deadlines, who is told when late.
//! - [`signing`]: Ed25519 signatures of everything on the bus, keys, verification.
//! - [`report`]: the compliance report of CQ-3.11, as table, CSV and HTML.

#![forbid(unsafe_code)]

pub mod agency;
pub mod calendar;
pub mod directory;
pub mod envelope;
pub mod kind;
pub mod lawyer;
pub mod lead;
pub mod policy;
pub mod report;
pub mod routing;
pub mod rules;
pub mod signing;

pub use agency::{AgencyKind, Level, OrganSystem};
pub use directory::{Agency, Directory, DirectoryError};
pub use envelope::{MAX_ENVELOPE_BYTES, SubmitError, envelope_id};
pub use kind::KindExt;
pub use refbus_proto::v1::MessageKind;
