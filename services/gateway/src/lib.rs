//! The gateway every refbus agency service serves, the agency-specific
//! services, and the application that runs them.
//!
//! An agency's own systems call its agency service over gRPC: `Submit` to
//! send, `Inbox` to receive (each delivery acknowledged with `Acknowledge`),
//! `Feedback` to answer a referral. The service validates at the edge
//! (refbus-core), publishes with confirms (refbus-bus) and streams the
//! agency's inbox queue.
//!
//! # Layout
//! - [`settings`]: typed configuration, from flags and environment.
//! - [`auth`]: who is calling (mutual TLS or bearer tokens), and acting
//!   only as one's own agency.
//! - [`error`]: the gateway's errors and their one mapping to `tonic::Status`.
//! - [`gateway`]: `Submit`, `Inbox`, `Acknowledge`, `Feedback`.
//! - [`hops`]: the hops the services report (delivered, acknowledged),
//!   published to the tracker as one signed batch per agency.
//! - [`inbox`]: open `Inbox` streams and their unacknowledged deliveries.
//! - [`acknowledged`]: the ids each agency's system acknowledged (on disk),
//!   so that an `Inbox` never hands one over twice.
//! - [`forgery`]: refusing a delivery that is unsigned, forged, altered or
//!   misaddressed: an alert to the supervising justice bureau, then the
//!   dead-letter queue.
//! - [`agencies`]: the RPCs specific to each kind of agency.
//! - [`letters`]: CQ-1.1c letters sealed to the lawyer (age), SH-2.5 notices to lawyers.
//! - [`meetings`]: CQ-1.3a-e at the centre: arrange, refuse, record held, verify, interrogations.
//! - [`registry`]: registering lawyers, and the lawyer service's public register.
//! - [`lawyers`]: the lawyer service: the register, lawyers' inboxes behind
//!   `lawyer-service`, and what lawyers submit (`LawyerService`, `LawyerRegistry`).
//! - [`app`]: build (bind) and run (serve until shutdown) an agency service.
//! - [`server`]: how every gRPC port is served (the tracker's too): TLS,
//!   keepalives, reflection v1 and v1alpha.
//! - [`exposure`]: refusing development credentials off loopback.
//! - [`observe`]: Prometheus metrics (`/metrics`), gRPC health and
//!   reflection.
//! - [`telemetry`]: tracing set-up (JSON when not on a terminal).
//! - [`cli`]: the `main` shared by the five agency-service binaries.

#![forbid(unsafe_code)]

pub mod acknowledged;
pub mod agencies;
pub mod app;
pub mod auth;
pub mod cli;
pub mod error;
pub mod exposure;
pub mod forgery;
pub mod gateway;
pub mod hops;
pub mod inbox;
pub mod lawyers;
pub mod letters;
pub mod meetings;
pub mod observe;
pub mod registry;
pub mod server;
pub mod settings;
pub mod telemetry;

pub use app::{Application, Shared};
pub use error::GatewayError;
pub use gateway::GatewayCore;
pub use settings::{AgencyService, BusSettings};
