//! Acceptance tests, against the real RabbitMQ. One binary for every area,
//! so the workspace builds and links it once.
//!
//! - [`bus`]: issue 2, the bus end to end.
//! - [`tracker`]: issue 3, the tracker.
//! - [`leads`]: issue 4, misconduct leads, notices, complaints and letters.
//! - [`auth`]: issue 5, authenticated callers acting only as themselves.
//! - [`broker`]: issue 5, a broker user per agency service, least privilege.
//! - [`privacy`]: issue 5, no personal data in logs.
//! - [`exactly_once`]: issue 5, an acknowledged id is never handed over again.
//! - [`bad_input`]: issue 5, 10,000 random byte strings, all dead-lettered.
//! - [`signatures`]: issue 5, forged, altered and unsigned messages refused.
//! - [`faults`]: issue 5, faults under load: nothing confirmed lost.
//! - [`cli`]: issue 7, every `refbus` subcommand, its output and exit code.
//! - [`dashboard`]: issue 7, the web dashboard in headless Chromium.
//! - [`observability`]: issue 7, `/metrics` after a scenario, gRPC health
//!   and reflection on every service.
//! - [`deployment`]: issue 7, the deployment files are consistent.
//! - [`misuse`]: issue 16, the gateway under misuse: no reply without
//!   receipt, careless inbox clients, tokens across a channel the broker
//!   closed, bad reply ids, the dead-letter queue for an operator.
//! - [`secure`]: issue 16, development credentials refused off loopback,
//!   TLS to the broker and PostgreSQL, bearer tokens over TLS, reflection
//!   v1alpha, keepalives against half-open clients.
//! - [`trust`]: issue 16, the tracker under misuse: replies only from
//!   parties, poison isolated, no false overdue notice.
//! - [`lead_visibility`]: issue 16, a lead shows nothing off its route,
//!   whatever hops name (GetReferral, ListObligations, report, dashboard).
//! - [`registry`]: issue 18, lawyers registered, suspended and reinstated by
//!   their region's registrar (the token's hash only on the bus), register
//!   entries believed only as signed, CQ-3.13 results back to the lawyer.
//! - [`scoping`]: issue 18, who binds where (a rule only in its territory)
//!   and who supervises whom (overdue duties told to the supervisor).
//! - [`letters`]: issue 18, CQ-1.1c: a letter sealed to its lawyer, no
//!   readable copy on the broker, in the ledger, the dead-letter queue or
//!   the logs.
//! - [`meetings`]: issue 18, a lawyer's meeting end to end (refusals and
//!   their reasons, the written refusal, interrogations, CQ-1.3d, SH-2.5,
//!   the `refbus` command).
//! - [`meetings_ledger`]: issue 18, the ledger of lawyers' meetings: CQ-1.3a's
//!   two duties, lawful refusals, CQ-1.3e, CQ-1.3b order, CQ-1.1c withheld
//!   letters, CQ-3.11b ratings, the CQ-1.3d link.
//! - [`submit_batch`]: issue 17, many referrals in one call, each answered
//!   as Submit would, its own receipt after its own confirm.
//! - [`hop_batches`]: issue 17, hop reports batched: a burst of
//!   acknowledgements costs few publishes, every hop recorded with its own
//!   time; a batch naming another agency's hop refused whole; a batch
//!   delivered twice recorded once.
//! - [`envelope_batches`]: issue 17, envelopes batched on the wire through
//!   the same fan-out: few publishes for a burst, each envelope judged on
//!   its own, bad batches dead-lettered whole, the window in envelopes.
//! - [`inbox_batches`]: issue 17, an inbox stream's batches (one signature
//!   check, one id look-up) keep every verdict of one by one.
//! - [`lawyers`]: issue 18, the lawyer service: registration, suspension and
//!   reinstatement, CQ-1.2 credentials, lawyers' inboxes, meeting requests,
//!   complaints and ratings.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

/// The tests of an `async fn test(db: Db)`, one per ledger backend:
/// `test::sqlite` and `test::postgres` (the module imports `Db`).
macro_rules! on_both_ledgers {
    ($test:ident) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$test(super::Db::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$test(super::Db::Postgres).await;
            }
        }
    };
}

mod auth;
mod bad_input;
mod broker;
mod bus;
mod cli;
mod dashboard;
mod deployment;
mod envelope_batches;
mod exactly_once;
mod faults;
mod hop_batches;
mod inbox_batches;
mod lawyers;
mod lead_visibility;
mod leads;
mod letters;
mod meetings;
mod meetings_ledger;
mod misuse;
mod observability;
mod privacy;
mod registry;
mod scoping;
mod secure;
mod signatures;
mod stream_churn;
mod submit_batch;
mod tracker;
mod tracker_linger;
mod trust;
