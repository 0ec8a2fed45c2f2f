//! Recording what the bus carried: each envelope and hop report becomes a
//! chained ledger event, a referral row, hops, and the obligations the
//! policy catalogue says it creates; hops and feedback meet obligations.
//! A gateway's batch of hop reports (`HopBatch`, one delivery, one
//! signature) yields one message per hop, each deduplicated on its own and
//! given its own row in `hops` with its own time, as if it had come alone;
//! the batch's new hops are chained together, in one `hop_batch` event
//! under the batch's message id (issue 17: one event per delivery, not per
//! hop, each event an index entry and a hash more).
//!
//! A batch is recorded in the caller's transaction with a handful of
//! statements whatever its size (one look-up of what is already recorded,
//! multi-row inserts, one set-based update of what was met), so the ledger
//! keeps up with the broker. A message already in the ledger changes
//! nothing.
//!
//! Obligations arise only where their policy entry binds the region of the
//! message's matter (`refbus_core::policy::region_of_matter`, DOMAIN.md
//! "Who binds where"). Beside them the recorder files, for the meeting
//! rules of issue 18 (`migrations/0004_meetings.sql`): each meeting or
//! interrogation request a centre is asked to serve and the centre's answer
//! that served or refused it (CQ-1.3b); each lawyer's rating of a meeting
//! (CQ-3.11b); each verification query linked to the meeting request it
//! holds up (CQ-1.3d). A centre's feedback with `OUTCOME_HELD` meets both
//! CQ-1.3a duties; a refusal meets the 48-hour one only when its reason is
//! lawful in the centre's region (`PolicyCatalogue::refusal`). A withheld
//! letter's CQ-1.1c duty is met by nothing: the notice the lawyer gets is no
//! forwarding. A sealed letter's event records the SHA-256 of the sealed
//! bytes, never anything readable.
//!
//! Who may reply to a referral ([`rights_of`], stored in `reply_rights`)
//! comes from its addressees and, for a misconduct lead, its route, never
//! from its hops. Ingest refuses a reply without the right before it is
//! recorded; a reply recorded before its referral is refused here, in the
//! ledger, when the referral comes ([`Observed::replies`], `refused_replies`).
//!
//! A referral's hops, reply rights and obligations are keyed first by the
//! time its referral was submitted (`referral_at`, migration 0005), so that
//! a batch's rows land together at the end of each index however large the
//! ledger: found by a referral's id through `referrals` ([`OF_REFERRAL`]).
//! A row filed under a referral not recorded yet (a reply or relay that
//! raced it) has `referral_at` 0 until the referral is recorded, which moves
//! it ([`rekey_early_rows`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use chrono::{DateTime, Utc};
use prost::Message;
use refbus_bus::topology::HOP_BATCH_KEY;
use refbus_core::envelope::from_timestamp;
use refbus_core::kind::hop_code;
use refbus_core::policy::{ClockStart, MetBy, Party, PolicyCatalogue, region_of_matter};
use refbus_core::signing::{Claim, Seal, Signed, TRACKER_ID};
use refbus_core::{AgencyKind, Directory, KindExt, MessageKind};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::letter::Disposition;
use refbus_proto::v1::route_hop::Duty;
use refbus_proto::v1::{
    Envelope, Feedback, Hop, HopBatch, HopReport, Letter, Outcome, RefusalReason, WithholdingGround,
};
use serde::Serialize;
use serde_json::json;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::clock::millis;
use crate::ledger::{Event, Head, Value, WriteTx, sha256_hex};

/// The key of a row filed under the referral `r` (a `LEFT JOIN referrals r`
/// on the row's referral id): its submission time, or 0 while it is not
/// recorded.
const KEYED_BY_REFERRAL: &str = "COALESCE(r.submitted_at, 0)";

/// How a query joins a table `x` of rows keyed by referral (`hops`,
/// `reply_rights`, `obligations`) to their referral `r`, so that it reads
/// the rows through their index: `... FROM referrals r JOIN hops x ON
/// {OF_REFERRAL} WHERE r.id = ...`.
pub const OF_REFERRAL: &str = "x.referral_at = r.submitted_at AND x.referral_id = r.id";

/// Counters the tracker keeps, exported as Prometheus metrics
/// (`refbus_tracker_*`, see [`Metrics::register`]).
#[derive(Debug)]
pub struct Metrics {
    /// Messages recorded (first time seen).
    pub recorded: AtomicU64,
    /// Messages seen again and ignored.
    pub duplicates: AtomicU64,
    /// Messages of a kind the policy catalogue does not know (recorded and flagged).
    pub unknown_kinds: AtomicU64,
    /// Obligations created.
    pub obligations: AtomicU64,
    /// Deliveries on the tap that did not decode (dead-lettered).
    pub undecodable: AtomicU64,
    /// Deliveries refused as unsigned, forged or altered, or as a reply
    /// from an agency that is not a party to the referral (dead-lettered,
    /// the supervising justice bureau alerted).
    pub refused: AtomicU64,
    /// Deliveries that decoded but name a malformed id (dead-lettered).
    pub invalid: AtomicU64,
    /// Messages the ledger's database refused to store (a batch split
    /// until each stood alone; dead-lettered with the database's reason).
    pub unstorable: AtomicU64,
    /// Obligations marked overdue.
    pub overdue: AtomicU64,
    /// The tracker's lag: from a message's time on the bus (an envelope's
    /// `submitted_at`, a hop report's `at`) to the commit that recorded it.
    pub lag_seconds: Histogram,
    /// The largest lag in the last batch recorded, in seconds.
    pub last_lag_seconds: Gauge<f64, AtomicU64>,
    /// How many tap deliveries each committed batch held (one transaction
    /// each): under load they grow, and the commit's cost is shared.
    pub batch_deliveries: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            recorded: AtomicU64::default(),
            duplicates: AtomicU64::default(),
            unknown_kinds: AtomicU64::default(),
            obligations: AtomicU64::default(),
            undecodable: AtomicU64::default(),
            refused: AtomicU64::default(),
            invalid: AtomicU64::default(),
            unstorable: AtomicU64::default(),
            overdue: AtomicU64::default(),
            // 1 ms to about 65 s.
            lag_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            last_lag_seconds: Gauge::default(),
            // 1 to 4,096.
            batch_deliveries: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
        }
    }
}

/// The counters, read at each scrape.
#[derive(Debug)]
struct Counters(Arc<Metrics>);

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        for (name, help, value) in [
            (
                "refbus_tracker_recorded",
                "Messages recorded in the ledger (first time seen)",
                &m.recorded,
            ),
            (
                "refbus_tracker_duplicates",
                "Messages seen again and ignored",
                &m.duplicates,
            ),
            (
                "refbus_tracker_unknown_kinds",
                "Messages of a kind the policy catalogue does not know (recorded, flagged)",
                &m.unknown_kinds,
            ),
            (
                "refbus_tracker_obligations",
                "Obligations created",
                &m.obligations,
            ),
            (
                "refbus_tracker_undecodable",
                "Tap deliveries that did not decode (dead-lettered)",
                &m.undecodable,
            ),
            (
                "refbus_tracker_refused",
                "Tap deliveries refused as unsigned, forged or altered, or as a reply from a non-party",
                &m.refused,
            ),
            (
                "refbus_tracker_invalid",
                "Tap deliveries naming a malformed referral or agency id (dead-lettered)",
                &m.invalid,
            ),
            (
                "refbus_tracker_unstorable",
                "Messages the ledger's database refused to store (dead-lettered)",
                &m.unstorable,
            ),
            (
                "refbus_tracker_overdue",
                "Obligations marked overdue",
                &m.overdue,
            ),
        ] {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Registers the tracker's metrics in a process's registry.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(Counters(self.clone())));
        registry.register(
            "refbus_tracker_lag_seconds",
            "From a message's time on the bus to the commit that recorded it",
            self.lag_seconds.clone(),
        );
        registry.register(
            "refbus_tracker_last_lag_seconds",
            "The largest lag in the last batch recorded",
            self.last_lag_seconds.clone(),
        );
        registry.register(
            "refbus_tracker_batch_deliveries",
            "Tap deliveries recorded by each committed ledger transaction",
            self.batch_deliveries.clone(),
        );
    }

    /// Observes the lag of a committed batch's messages (their times on
    /// the bus, epoch ms), against the wall clock.
    pub fn observe_lag(&self, on_bus: &[i64]) {
        let now = Utc::now().timestamp_millis();
        let mut worst = 0.0_f64;
        for at in on_bus {
            #[allow(clippy::cast_precision_loss)]
            let lag = (now - at).max(0) as f64 / 1000.0;
            self.lag_seconds.observe(lag);
            worst = worst.max(lag);
        }
        if !on_bus.is_empty() {
            self.last_lag_seconds.set(worst);
        }
    }
}

/// What one batch recorded, added to [`Metrics`] once it has committed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub recorded: u64,
    pub duplicates: u64,
    pub unknown_kinds: u64,
    pub obligations: u64,
    /// The earliest deadline among the obligations created (epoch ms).
    pub earliest_due: Option<i64>,
}

impl Metrics {
    /// Adds a committed batch's tally.
    pub fn add(&self, tally: Tally) {
        self.recorded.fetch_add(tally.recorded, Ordering::Relaxed);
        self.duplicates
            .fetch_add(tally.duplicates, Ordering::Relaxed);
        self.unknown_kinds
            .fetch_add(tally.unknown_kinds, Ordering::Relaxed);
        self.obligations
            .fetch_add(tally.obligations, Ordering::Relaxed);
    }
}

/// The routing key of a tracker's recorded-through marker (on the tap
/// through the `event.#` binding; see `app.rs`).
pub const MARKER_ROUTING_KEY: &str = "event.recorded_through";

/// A delivery from the tap, decoded.
#[derive(Debug, Clone)]
pub enum Observed {
    Envelope(Box<Envelope>),
    Hop(HopReport),
    /// A gateway's batch of hop reports ([`HOP_BATCH_KEY`]), all by
    /// `agency`, which signed the batch once. Each hop is recorded as a
    /// single [`Observed::Hop`] is, under its own id and time.
    Hops {
        agency: String,
        hops: Vec<HopReport>,
    },
    /// A tracker's recorded-through marker: a hop report by
    /// [`TRACKER_ID`] whose `referral_id` is the publishing instance and
    /// whose `at` is when it was published. Not a ledger event.
    Marker(HopReport),
}

/// What a reply may do, by right of its agency's place on the referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    /// Report the referral delivered or acknowledged, acknowledge it.
    Receive,
    /// Feed back on it: its recipients, or a lead's handling organ.
    Answer,
    /// Pass a lead on: an agency of its route that is not the last.
    Relay,
}

impl Right {
    /// The name stored in `reply_rights.reply`.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Right::Receive => "receive",
            Right::Answer => "answer",
            Right::Relay => "relay",
        }
    }

    /// The right a hop of this name needs.
    #[must_use]
    pub fn for_hop(hop: &str) -> Self {
        match hop {
            "answered" => Right::Answer,
            "relayed" => Right::Relay,
            _ => Right::Receive,
        }
    }
}

/// A reply: `agency` claims `right` on `referral`.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    pub referral: &'a str,
    pub agency: &'a str,
    pub right: Right,
}

/// Who may reply to `envelope`, and how: from its addressees and, for a
/// misconduct lead, its route (never from hops). A lead's route agencies
/// receive it; the last handles it and feeds back, the others relay it.
/// Other referrals: the recipient and each `also_to` receive and answer.
#[must_use]
pub fn rights_of(envelope: &Envelope) -> Vec<(&str, Right)> {
    if !envelope.relay_of.is_empty() {
        // Filed under the lead, whose rights were given when it came.
        return Vec::new();
    }
    if let Some(Payload::MisconductLead(lead)) = &envelope.payload
        && !lead.route.is_empty()
    {
        let last = lead.route.len() - 1;
        return lead
            .route
            .iter()
            .enumerate()
            .flat_map(|(i, hop)| {
                let passes = if i == last {
                    Right::Answer
                } else {
                    Right::Relay
                };
                [
                    (hop.agency.as_str(), Right::Receive),
                    (hop.agency.as_str(), passes),
                ]
            })
            .collect();
    }
    std::iter::once(&envelope.recipient)
        .chain(&envelope.also_to)
        .filter(|a| !a.is_empty())
        .flat_map(|a| [(a.as_str(), Right::Receive), (a.as_str(), Right::Answer)])
        .collect()
}

impl Observed {
    /// The hop reports the delivery carries: one, a batch's, or none (an
    /// envelope, a marker).
    #[must_use]
    pub fn hop_reports(&self) -> &[HopReport] {
        match self {
            Observed::Hop(h) => std::slice::from_ref(h),
            Observed::Hops { hops, .. } => hops,
            Observed::Envelope(_) | Observed::Marker(_) => &[],
        }
    }

    /// When the messages the delivery carries went on the bus (epoch ms):
    /// an envelope's `submitted_at`, each hop report's `at`; nothing for a
    /// marker.
    pub fn on_bus_millis(&self) -> impl Iterator<Item = i64> + '_ {
        let envelope = match self {
            Observed::Envelope(e) => e.submitted_at.as_ref(),
            _ => None,
        };
        std::iter::once(envelope)
            .chain(self.hop_reports().iter().map(|h| h.at.as_ref()))
            .filter_map(|at| ts(at).map(|t| t.timestamp_millis()))
    }

    /// Decodes a tap delivery: a batch of hop reports on [`HOP_BATCH_KEY`],
    /// a single hop report on the other `event.*` routing keys, everything
    /// else an envelope. A batch must name one agency, its signer: one
    /// whose hops name several, or none, is refused here.
    ///
    /// # Errors
    /// A reason, for the dead-letter header.
    pub fn decode(routing_key: &str, data: &[u8]) -> Result<Self, String> {
        if routing_key == MARKER_ROUTING_KEY {
            let marker = HopReport::decode(data)
                .map_err(|e| format!("not a recorded-through marker: {e}"))?;
            if marker.agency != TRACKER_ID || marker.id.is_empty() || marker.at.is_none() {
                return Err(
                    "a recorded-through marker comes from the tracker, with an id and a time"
                        .into(),
                );
            }
            return Ok(Observed::Marker(marker));
        }
        if routing_key == HOP_BATCH_KEY {
            return Self::decode_batch(data);
        }
        if routing_key.starts_with("event.") {
            let report =
                HopReport::decode(data).map_err(|e| format!("not a refbus.v1.HopReport: {e}"))?;
            if report.id.is_empty() || report.referral_id.is_empty() {
                return Err("hop report without id or referral".into());
            }
            Ok(Observed::Hop(report))
        } else {
            let envelope =
                Envelope::decode(data).map_err(|e| format!("not a refbus.v1.Envelope: {e}"))?;
            if envelope.id.is_empty() {
                return Err("envelope has no id".into());
            }
            Ok(Observed::Envelope(Box::new(envelope)))
        }
    }

    fn decode_batch(data: &[u8]) -> Result<Self, String> {
        let batch = HopBatch::decode(data).map_err(|e| format!("not a refbus.v1.HopBatch: {e}"))?;
        if batch.hops.is_empty() {
            return Err("hop batch without hops".into());
        }
        if let Some(i) = batch
            .hops
            .iter()
            .position(|h| h.id.is_empty() || h.referral_id.is_empty())
        {
            return Err(format!("hop batch: hop {i} has no id or referral"));
        }
        let agency = batch.hops[0].agency.clone();
        if agency.is_empty() {
            return Err(
                "hop batch names no agency: all its hops name the one agency that signed it".into(),
            );
        }
        if let Some(i) = batch.hops.iter().position(|h| h.agency != agency) {
            return Err(format!(
                "hop batch names more than one agency (hop {i} names another than hop 0): all its hops name the one agency that signed it"
            ));
        }
        Ok(Observed::Hops {
            agency,
            hops: batch.hops,
        })
    }
}

/// What the tracker records with.
pub struct Recorder {
    pub directory: Arc<Directory>,
    pub policy: Arc<PolicyCatalogue>,
}

fn ts(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(from_timestamp)
}

impl Observed {
    /// What to check the delivered bytes against: an envelope is signed
    /// by its sender, a hop report by the agency it reports on, a batch
    /// (once, over its bytes) by the one agency all its hops name.
    #[must_use]
    pub fn claim<'a>(&'a self, data: &'a [u8], seal: Seal<'a>) -> Claim<'a> {
        let (signer, what) = match self {
            Observed::Envelope(e) => (e.sender.as_str(), Signed::Envelope),
            Observed::Hop(h) | Observed::Marker(h) => (h.agency.as_str(), Signed::HopReport),
            Observed::Hops { agency, .. } => (agency.as_str(), Signed::HopBatch),
        };
        Claim {
            signer,
            what,
            body: data,
            seal,
        }
    }

    /// Who the message claims to come from.
    #[must_use]
    pub fn claimed_sender(&self) -> &str {
        match self {
            Observed::Envelope(e) => &e.sender,
            Observed::Hop(h) | Observed::Marker(h) => &h.agency,
            Observed::Hops { agency, .. } => agency,
        }
    }

    /// The agency the message was on its way to: the first word of an
    /// envelope's routing key; for a hop report, the agency it names.
    #[must_use]
    pub fn addressed_to<'a>(&'a self, routing_key: &'a str) -> &'a str {
        match self {
            Observed::Envelope(_) => routing_key.split('.').next().unwrap_or_default(),
            Observed::Hop(h) | Observed::Marker(h) => &h.agency,
            Observed::Hops { agency, .. } => agency,
        }
    }

    /// The id that identifies the message in the ledger; for a batch,
    /// its first hop's (each hop is recorded under its own).
    #[must_use]
    pub fn message_id(&self) -> &str {
        match self {
            Observed::Envelope(e) => &e.id,
            Observed::Hop(h) | Observed::Marker(h) => &h.id,
            Observed::Hops { hops, .. } => hops.first().map_or("", |h| h.id.as_str()),
        }
    }

    /// The replies the delivery makes: each hop report's on its referral;
    /// an envelope's, if it is one (see [`Observed::envelope_reply`]).
    pub fn replies(&self) -> impl Iterator<Item = Reply<'_>> + '_ {
        self.envelope_reply()
            .into_iter()
            .chain(self.hop_reports().iter().map(hop_reply))
    }

    /// The reply an envelope makes, if it is one: `in_reply_to` a referral
    /// (feedback answers, anything else, such as an acknowledgement,
    /// receives); a relayed lead. The tracker's own overdue notices are no
    /// reply.
    #[must_use]
    pub fn envelope_reply(&self) -> Option<Reply<'_>> {
        match self {
            Observed::Envelope(e) if e.sender == TRACKER_ID => None,
            Observed::Envelope(e) if !e.relay_of.is_empty() => Some(Reply {
                referral: &e.relay_of,
                agency: &e.sender,
                right: Right::Relay,
            }),
            Observed::Envelope(e) if !e.in_reply_to.is_empty() => Some(Reply {
                referral: &e.in_reply_to,
                agency: &e.sender,
                right: if matches!(e.payload, Some(Payload::Feedback(_))) {
                    Right::Answer
                } else {
                    Right::Receive
                },
            }),
            Observed::Envelope(_)
            | Observed::Hop(_)
            | Observed::Hops { .. }
            | Observed::Marker(_) => None,
        }
    }

    /// When a marker was published (epoch ms).
    #[must_use]
    pub fn marker_at(&self) -> Option<i64> {
        match self {
            Observed::Marker(m) => ts(m.at.as_ref()).map(|t| t.timestamp_millis()),
            _ => None,
        }
    }

    /// Checks the ids the message names before anything is stored: referral
    /// ids (`in_reply_to`, `relay_of`, a hop report's `referral_id`) must be
    /// the bus's canonical UUIDs, agency ids short and without control
    /// characters, and a hop report must report a hop an agency reports.
    ///
    /// # Errors
    /// The reason, naming the field, for the dead-letter header.
    pub fn check_ids(&self) -> Result<(), String> {
        use refbus_core::envelope::{check_agency_id, check_referral_id};
        match self {
            Observed::Marker(_) => Ok(()),
            Observed::Hop(h) => check_hop(h),
            Observed::Hops { hops, .. } => hops.iter().enumerate().try_for_each(|(i, h)| {
                check_hop(h).map_err(|e| format!("hop batch, hop {i}: {e}"))
            }),
            Observed::Envelope(e) => {
                let mut checks = vec![check_agency_id("envelope.sender", &e.sender)];
                if !e.recipient.is_empty() {
                    checks.push(check_agency_id("envelope.recipient", &e.recipient));
                }
                checks.extend(
                    e.also_to
                        .iter()
                        .map(|a| check_agency_id("envelope.also_to", a)),
                );
                if !e.in_reply_to.is_empty() {
                    checks.push(check_referral_id("envelope.in_reply_to", &e.in_reply_to));
                }
                if !e.relay_of.is_empty() {
                    checks.push(check_referral_id("envelope.relay_of", &e.relay_of));
                }
                if let Some(Payload::MisconductLead(lead)) = &e.payload {
                    if !lead.found_by.is_empty() {
                        checks.push(check_agency_id(
                            "envelope.misconduct_lead.found_by",
                            &lead.found_by,
                        ));
                    }
                    checks.extend(lead.route.iter().map(|hop| {
                        check_agency_id("envelope.misconduct_lead.route.agency", &hop.agency)
                    }));
                }
                checks
                    .into_iter()
                    .collect::<Result<(), _>>()
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// The reply a hop report makes on its referral, with the right its hop needs.
fn hop_reply(h: &HopReport) -> Reply<'_> {
    Reply {
        referral: &h.referral_id,
        agency: &h.agency,
        right: Right::for_hop(hop_code(Hop::try_from(h.hop).unwrap_or(Hop::Unspecified))),
    }
}

/// A hop report's ids and hop, checked before anything is stored.
fn check_hop(h: &HopReport) -> Result<(), String> {
    use refbus_core::envelope::{check_agency_id, check_referral_id};
    check_referral_id("hop_report.referral_id", &h.referral_id)
        .and_then(|()| check_agency_id("hop_report.agency", &h.agency))
        .map_err(|e| e.to_string())?;
    match Hop::try_from(h.hop) {
        Ok(Hop::Delivered | Hop::Acknowledged | Hop::Relayed | Hop::Answered) => Ok(()),
        _ => Err(format!(
            "hop_report.hop: `{}` is not a hop an agency reports (delivered, acknowledged, relayed, answered)",
            hop_code(Hop::try_from(h.hop).unwrap_or(Hop::Unspecified))
        )),
    }
}

/// A batch's rows, built before its transaction begins, so that building
/// the next batch overlaps writing this one. Each row names the message it
/// came from; [`Recorder::write`] drops the rows of messages the ledger
/// already holds.
#[derive(Default)]
pub struct Prepared {
    /// The messages, first occurrences only (a second is a duplicate).
    messages: Vec<PreparedMessage>,
    /// Occurrences of an id already earlier in the batch.
    repeated: u64,
    /// The message the rows being pushed come from.
    owner: usize,
    /// The ledger events of the batch's envelopes, one each.
    events: Tagged<EventRow>,
    /// The ledger events of the batch's hop reports: one per delivery
    /// (a gateway's batch of hops, or a single hop report).
    hop_events: Vec<HopEvent>,
    referrals: Tagged<[Value; 11]>,
    hops: Tagged<[Value; 6]>,
    obligations: Tagged<[Value; 12]>,
    /// The deadline of each obligation (epoch ms).
    dues: Vec<i64>,
    /// (referral, met_by, agency) and when.
    meets: Tagged<((String, MetBy, String), i64)>,
    /// Referrals given obligations (earlier hops may meet them).
    obligated: Tagged<String>,
    /// (referral's time, referral, agency, right): who may reply to the
    /// batch's referrals.
    rights: Tagged<[Value; 4]>,
    /// Referrals whose replies to check once the batch's rows are in:
    /// those given rights, and those the batch's replies name whose rights
    /// were not checked when it was gathered (see [`Recorder::prepare`]).
    checked: Tagged<String>,
    /// CQ-1.3b: (request, centre, kind, accepted_at, order rule).
    centre_requests: Tagged<[Value; 5]>,
    /// CQ-1.3b: (request, centre, outcome, at, message).
    centre_services: Tagged<[Value; 5]>,
    /// CQ-3.11b: (rating, centre, meeting request, score, rated_at).
    ratings: Tagged<[Value; 5]>,
    /// CQ-1.3d: (query, meeting request, centre, asked_at).
    links: Tagged<[Value; 4]>,
}

/// Rows, each with the index of the message it came from.
struct Tagged<T> {
    rows: Vec<T>,
    owners: Vec<usize>,
}

impl<T> Default for Tagged<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            owners: Vec::new(),
        }
    }
}

impl<T: Clone> Tagged<T> {
    fn push(&mut self, owner: usize, row: T) {
        self.rows.push(row);
        self.owners.push(owner);
    }

    /// The rows of the messages marked `new`, copied only when some are not.
    fn kept(&self, new: &[bool]) -> Cow<'_, [T]> {
        if self.owners.iter().all(|o| new[*o]) {
            Cow::Borrowed(&self.rows)
        } else {
            Cow::Owned(self.iter_kept(new).cloned().collect())
        }
    }

    fn iter_kept<'a>(&'a self, new: &'a [bool]) -> impl Iterator<Item = &'a T> + 'a {
        self.rows
            .iter()
            .zip(&self.owners)
            .filter(|(_, o)| new[**o])
            .map(|(row, _)| row)
    }
}

struct PreparedMessage {
    id: String,
    /// The row key in `hops` (referral, hop, agency, id) of a message known
    /// by its hop: a hop report, or a relay (filed under its lead, with no
    /// referral row). The ledger holds it already when `hops` or
    /// `refused_replies` has that row. `None` for an envelope known by its
    /// `referrals` row.
    hop: Option<[String; 4]>,
    /// The kind's number, when the policy catalogue does not know it.
    unknown_kind: Option<i32>,
    obligations: u64,
}

impl Prepared {
    /// Whether message `owner` is the envelope whose `referrals` row
    /// `referral` is: new in the batch's transaction (its row went in), it
    /// is the referral's first record, and no hop was keyed by its time
    /// before (migration 0005: a hop recorded before its referral waits
    /// under 0 until [`rekey_early_rows`] moves it).
    fn records(&self, owner: usize, referral: &str) -> bool {
        let message = &self.messages[owner];
        message.hop.is_none() && message.id == referral
    }

    /// The referrals of `tagged` (of the messages marked `new`) to look
    /// up in the ledger for what came before them: all but a referral its
    /// own message records for the first time, unless [`rekey_early_rows`]
    /// moved something to it (see [`Prepared::records`]).
    fn looked_at<'a>(
        &'a self,
        tagged: &'a Tagged<String>,
        new: &'a [bool],
        rekeyed: &'a HashSet<String>,
    ) -> impl Iterator<Item = &'a String> + 'a {
        tagged
            .rows
            .iter()
            .zip(&tagged.owners)
            .filter(move |(referral, owner)| {
                new[**owner] && (!self.records(**owner, referral) || rekeyed.contains(*referral))
            })
            .map(|(referral, _)| referral)
    }

    /// How many messages (duplicates within the batch included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.messages.len() + usize::try_from(self.repeated).unwrap_or(usize::MAX)
    }

    /// Whether the batch is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the rows of message `id`, unless it came earlier in the
    /// batch (then it is counted as repeated): true when it is new.
    fn first<'a>(&mut self, id: &'a str, seen: &mut HashSet<&'a str>) -> bool {
        if !seen.insert(id) {
            self.repeated += 1;
            return false;
        }
        self.owner = self.messages.len();
        self.messages.push(PreparedMessage {
            id: id.to_owned(),
            hop: None,
            unknown_kind: None,
            obligations: 0,
        });
        true
    }

    /// A hop, and what it meets (obligations' `met_by`), if anything:
    /// stored with the hop (comma-separated), so that a hop recorded before
    /// its referral meets what it met when the referral's obligations come.
    fn hop(
        &mut self,
        referral: &str,
        hop: &str,
        agency: &str,
        at: i64,
        message_id: &str,
        meets: &[MetBy],
    ) {
        let codes: Vec<&str> = meets.iter().map(MetBy::code).collect();
        self.hops.push(
            self.owner,
            [
                referral.into(),
                hop.into(),
                agency.into(),
                Value::Int(at),
                message_id.into(),
                codes.join(",").into(),
            ],
        );
        for met_by in meets {
            self.meets.push(
                self.owner,
                ((referral.to_owned(), *met_by, agency.to_owned()), at),
            );
        }
    }
}

#[derive(Clone)]
struct EventRow {
    message_id: String,
    event: String,
    referral_id: String,
    body: String,
}

/// The ledger body of an envelope: canonical JSON, its keys in byte
/// order and absent ones left out (as a `serde_json::Value` object would
/// print it, which is what earlier events were chained with), written in
/// one pass without building a tree.
#[derive(Serialize)]
struct EnvelopeBody<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    also_to: &'a [String],
    clock_started_at: i64,
    envelope_sha256: String,
    id: &'a str,
    in_reply_to: &'a str,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    letter_sha256: Option<String>,
    recipient: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    relay_of: &'a str,
    sender: &'a str,
    submitted_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    withheld_on: Option<&'a str>,
}

/// The ledger body of one hop, keys in byte order as [`EnvelopeBody`].
#[derive(Serialize)]
struct HopBody<'a> {
    agency: &'a str,
    at: i64,
    hop: &'a str,
    id: &'a str,
    referral_id: &'a str,
}

/// JSON text of a body that is plain strings and integers (which cannot
/// fail to serialize).
fn to_json_text(body: &impl Serialize) -> String {
    serde_json::to_string(body).unwrap_or_default()
}

impl EnvelopeBody<'_> {
    fn to_json(&self) -> String {
        to_json_text(self)
    }
}

impl HopBody<'_> {
    fn to_json(&self) -> String {
        to_json_text(self)
    }
}

/// A JSON string literal of `s`.
fn json_string(s: &str) -> String {
    to_json_text(&s)
}

/// The one ledger event of a delivery's hop reports (issue 17). A single
/// hop report is chained as before: event `hop_report`, under the report's
/// id and referral. A gateway's batch is chained once, as event
/// `hop_batch` under the batch's message id (`hop_batch_id` of its hops'
/// ids) and no referral, its body listing each hop the ledger did not hold
/// yet, with its own id, referral and time. Each hop still has its own row
/// in `hops`, which is what status, deadlines and audits read.
struct HopEvent {
    message_id: String,
    event: &'static str,
    referral_id: String,
    batch: bool,
    /// Each hop: the message it is (see [`Prepared::messages`]) and its
    /// body (JSON).
    hops: Vec<(usize, String)>,
}

impl HopEvent {
    /// The event of the hops that are new, if any is.
    fn chained(&self, new: &[bool]) -> Option<EventRow> {
        let mut bodies = self
            .hops
            .iter()
            .filter(|(owner, _)| new[*owner])
            .map(|(_, body)| body);
        let body = if self.batch {
            // {"hops":[...],"id":...}: keys in order, as every body.
            let mut body = String::from("{\"hops\":[");
            for (i, hop) in bodies.enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(hop);
            }
            if body.ends_with('[') {
                return None;
            }
            body.push_str("],\"id\":");
            body.push_str(&json_string(&self.message_id));
            body.push('}');
            body
        } else {
            bodies.next()?.clone()
        };
        Some(EventRow {
            message_id: self.message_id.clone(),
            event: self.event.to_owned(),
            referral_id: self.referral_id.clone(),
            body,
        })
    }
}

impl Recorder {
    /// Builds the rows of a batch (no database work).
    ///
    /// `rights_checked` names the referrals whose reply rights the batch's
    /// replies were checked against when it was gathered (the tracker's
    /// `entitled`, issue 16): the rights were found, and each reply had its
    /// right, so the ledger has nothing to refuse among them, and they are
    /// not checked a second time in the batch's transaction. Replies to any
    /// other referral (one not recorded yet when they were gathered: they
    /// raced it), and every referral the batch records (replies may have
    /// come before it), are checked in the ledger as before.
    #[must_use]
    pub fn prepare(
        &self,
        batch: &[&Observed],
        now: DateTime<Utc>,
        rights_checked: &HashSet<String>,
    ) -> Prepared {
        let mut prepared = Prepared::default();
        let mut seen = HashSet::with_capacity(batch.len());
        for observed in batch {
            if let Observed::Envelope(envelope) = observed
                && prepared.first(&envelope.id, &mut seen)
            {
                self.envelope_rows(envelope, now, &mut prepared);
                if let Some(reply) = observed.envelope_reply()
                    && !rights_checked.contains(reply.referral)
                {
                    prepared
                        .checked
                        .push(prepared.owner, reply.referral.to_owned());
                }
            }
            // A hop alone or in a batch: each its own message, deduplicated
            // on its own; one ledger event for the delivery's hops.
            let reports = observed.hop_reports();
            let Some(first) = reports.first() else {
                continue;
            };
            let mut event = match observed {
                Observed::Hops { .. } => HopEvent {
                    message_id: refbus_core::envelope::hop_batch_id(
                        reports.iter().map(|h| h.id.as_str()),
                    ),
                    event: "hop_batch",
                    referral_id: String::new(),
                    batch: true,
                    hops: Vec::with_capacity(reports.len()),
                },
                _ => HopEvent {
                    message_id: first.id.clone(),
                    event: "hop_report",
                    referral_id: first.referral_id.clone(),
                    batch: false,
                    hops: Vec::with_capacity(1),
                },
            };
            for report in reports {
                if prepared.first(&report.id, &mut seen) {
                    let body = Self::hop_rows(report, now, &mut prepared);
                    event.hops.push((prepared.owner, body));
                    if !rights_checked.contains(&report.referral_id) {
                        prepared
                            .checked
                            .push(prepared.owner, report.referral_id.clone());
                    }
                }
            }
            if !event.hops.is_empty() {
                prepared.hop_events.push(event);
            }
        }
        prepared
    }

    /// Writes a prepared batch in the caller's transaction, which has locked
    /// the chain's `head`: [`Recorder::write_rows`], then
    /// [`Recorder::write_chain`]. Messages already in the ledger (or twice
    /// in the batch) are counted as duplicates and change nothing.
    ///
    /// # Errors
    /// A database error: the caller rolls back and retries the batch.
    pub async fn write(
        &self,
        conn: &mut WriteTx,
        head: &mut Head,
        prepared: &Prepared,
        now: DateTime<Utc>,
        tally: &mut Tally,
    ) -> Result<(), sqlx::Error> {
        let new = self.write_rows(conn, prepared, tally).await?;
        self.write_chain(conn, head, prepared, &new, now).await
    }

    /// The first part of writing a batch, which needs neither the chain's
    /// head nor the batch before it to have committed: finds which messages
    /// are new and inserts their referrals, hops and obligations (each
    /// insert does nothing for a row already there). Returns which messages
    /// are new, for [`Recorder::write_chain`] in the same transaction.
    ///
    /// An envelope is new when its `referrals` row goes in (migration
    /// 0006: its id is indexed there only). A hop report is new when its
    /// row goes into `hops` (it was neither there nor in
    /// `refused_replies`), so a hop reported again, in any delivery, is a
    /// duplicate. A message also in an earlier batch that has not committed
    /// yet (PostgreSQL, two batches at once, or another tracker) waits for
    /// that batch's row, and then does not go in.
    ///
    /// # Errors
    /// A database error: the caller rolls back and retries the batch.
    pub async fn write_rows(
        &self,
        conn: &mut WriteTx,
        prepared: &Prepared,
        tally: &mut Tally,
    ) -> Result<Vec<bool>, sqlx::Error> {
        let mut new = refused_already(conn, &prepared.messages).await?;
        new.iter_mut().for_each(|held| *held = !*held);
        tally.duplicates += prepared.repeated;
        // The referrals first, so that their own hops and obligations, and
        // their replies in the same batch, find the time they are keyed by
        // (migration 0005). Nearly always every row goes in; which did is
        // asked (`RETURNING`) only when some did not (see `all_go_in`).
        const REFERRALS: &str = "INSERT INTO referrals (id, kind, sender, recipient, in_reply_to, sender_region, recipient_region, clock_started_at, submitted_at, kind_known, envelope)";
        let referrals = &prepared.referrals.rows;
        let all_in = all_go_in(conn, referrals.len(), async |conn: &mut WriteTx| {
            conn.insert_rows(REFERRALS, "ON CONFLICT (id) DO NOTHING", referrals)
                .await
        })
        .await?;
        let inserted: Option<Vec<(String,)>> = if all_in {
            None
        } else {
            Some(
                conn.insert_rows_returning(
                    REFERRALS,
                    "ON CONFLICT (id) DO NOTHING RETURNING id",
                    referrals,
                )
                .await?,
            )
        };
        let inserted: Option<HashSet<&str>> = inserted
            .as_ref()
            .map(|rows| rows.iter().map(|(id,)| id.as_str()).collect());
        for (message, new) in prepared.messages.iter().zip(new.iter_mut()) {
            if message.hop.is_none() {
                *new = match &inserted {
                    // Every envelope but a relay (known by its hop) has
                    // a referral row, and every one went in.
                    None => true,
                    Some(inserted) => inserted.contains(message.id.as_str()),
                };
            }
        }
        if new.iter().any(|n| *n) {
            // Then the hops: a hop report is new only if its row goes in.
            let hops = prepared.hops.kept(&new);
            let insert = |v: &str, returning: &str| {
                format!(
                    "INSERT INTO hops (referral_at, referral_id, hop, agency, at, message_id, meets)
                     SELECT {KEYED_BY_REFERRAL}, v.column1, v.column2, v.column3, v.column4, v.column5, v.column6
                     FROM {v} AS v LEFT JOIN referrals r ON r.id = v.column1 WHERE true
                     ON CONFLICT DO NOTHING {returning}"
                )
            };
            let all_in = all_go_in(conn, hops.len(), async |conn: &mut WriteTx| {
                conn.execute_with(|v| insert(v, ""), &hops).await
            })
            .await?;
            if !all_in {
                let inserted: Vec<(String, String, String, String)> = conn
                    .fetch_with(
                        |v| insert(v, "RETURNING referral_id, hop, agency, message_id"),
                        &hops,
                    )
                    .await?;
                let inserted: HashSet<[&str; 4]> = inserted
                    .iter()
                    .map(|(r, h, a, m)| [r.as_str(), h.as_str(), a.as_str(), m.as_str()])
                    .collect();
                for (message, new) in prepared.messages.iter().zip(new.iter_mut()) {
                    if let Some(key) = &message.hop
                        && *new
                    {
                        *new = inserted.contains(&key.each_ref().map(String::as_str));
                    }
                }
            }
        }
        for (message, new) in prepared.messages.iter().zip(&new) {
            if !new {
                tally.duplicates += 1;
                continue;
            }
            tally.recorded += 1;
            tally.obligations += message.obligations;
            if let Some(kind) = message.unknown_kind {
                tally.unknown_kinds += 1;
                tracing::warn!(id = %message.id, kind, "recorded a message of a kind the policy catalogue does not know (flagged)");
            }
        }
        if tally.recorded == 0 {
            return Ok(new);
        }
        for (due, _) in prepared
            .dues
            .iter()
            .zip(&prepared.obligations.owners)
            .filter(|(_, o)| new[**o])
        {
            tally.earliest_due = Some(tally.earliest_due.map_or(*due, |t| t.min(*due)));
        }
        // A relay's obligations are filed under its lead: keyed by the
        // lead's time, or 0 until the lead is recorded.
        conn.execute_with(
            |v| {
                format!(
                    "INSERT INTO obligations (referral_at, referral_id, id, rule, kind, duty, bearer, meets_agency, met_by, clock_started_at, due_at, met_at, notify)
                     SELECT {KEYED_BY_REFERRAL}, v.column2, v.column1, v.column3, v.column4, v.column5, v.column6, v.column7, v.column8, v.column9, v.column10, v.column11, v.column12
                     FROM {v} AS v LEFT JOIN referrals r ON r.id = v.column2 WHERE true
                     ON CONFLICT DO NOTHING"
                )
            },
            &prepared.obligations.kept(&new),
        )
        .await?;
        conn.insert_rows(
            "INSERT INTO reply_rights (referral_at, referral_id, agency, reply)",
            "ON CONFLICT DO NOTHING",
            &prepared.rights.kept(&new),
        )
        .await?;
        conn.insert_rows(
            "INSERT INTO centre_requests (request_id, centre, kind, accepted_at, rule)",
            "ON CONFLICT DO NOTHING",
            &prepared.centre_requests.kept(&new),
        )
        .await?;
        conn.insert_rows(
            "INSERT INTO centre_services (request_id, centre, outcome, at, message_id)",
            "ON CONFLICT DO NOTHING",
            &prepared.centre_services.kept(&new),
        )
        .await?;
        conn.insert_rows(
            "INSERT INTO meeting_ratings (rating_id, centre, meeting_request_id, score, rated_at)",
            "ON CONFLICT DO NOTHING",
            &prepared.ratings.kept(&new),
        )
        .await?;
        conn.insert_rows(
            "INSERT INTO verification_links (query_id, meeting_request_id, centre, asked_at)",
            "ON CONFLICT DO NOTHING",
            &prepared.links.kept(&new),
        )
        .await?;
        Ok(new)
    }

    /// The second part of writing a batch, once every batch before it has
    /// committed (so that this one sees their hops and obligations), in
    /// the transaction of [`Recorder::write_rows`], which has locked the
    /// chain's `head`: meets what the new hops and feedback meet, and
    /// chains one ledger event per new envelope and one per delivery of new
    /// hops ([`HopEvent`]).
    ///
    /// # Errors
    /// A database error: the caller rolls back and retries the batch.
    pub async fn write_chain(
        &self,
        conn: &mut WriteTx,
        head: &mut Head,
        prepared: &Prepared,
        new: &[bool],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        if !new.iter().any(|n| *n) {
            return Ok(());
        }
        let rekeyed = rekey_early_rows(conn, prepared, new).await?;
        let recorded_at = millis(now);
        let mut events = Vec::with_capacity(prepared.events.rows.len() + prepared.hop_events.len());
        let hop_events: Vec<EventRow> = prepared
            .hop_events
            .iter()
            .filter_map(|e| e.chained(new))
            .collect();
        for e in prepared.events.iter_kept(new).chain(&hop_events) {
            events.push(head.chain(&Event {
                message_id: &e.message_id,
                event: &e.event,
                referral_id: &e.referral_id,
                recorded_at,
                body: e.body.clone(),
            }));
        }
        let refused = refuse_unentitled(
            conn,
            head,
            prepared,
            new,
            &rekeyed,
            recorded_at,
            &mut events,
        )
        .await?;
        conn.insert_rows(
            "INSERT INTO ledger_events (seq, chained_id, event, referral_id, recorded_at, body, prev_hash, hash)",
            "",
            &events,
        )
        .await?;
        // (referral, met_by, agency) -> earliest time.
        let mut meets: HashMap<(String, MetBy, String), i64> = HashMap::new();
        for (key, at) in prepared.meets.iter_kept(new) {
            if refused.contains(&(key.0.clone(), key.2.clone())) {
                continue;
            }
            meets
                .entry(key.clone())
                .and_modify(|t| *t = (*t).min(*at))
                .or_insert(*at);
        }
        // Hops recorded before their referral (reports race) meet its new
        // obligations, and those just moved to it (a relay's, filed under
        // its lead). A referral first recorded in this transaction has no
        // earlier hop under its key: a hop recorded before it waited under
        // 0 and was moved just now (`rekeyed`), and the batch's own hops
        // are in `meets` already; so only the referrals recorded before (a
        // lead a relay's obligations are filed under) are looked up.
        let mut obligated: Vec<&str> = prepared
            .looked_at(&prepared.obligated, new, &rekeyed)
            .map(String::as_str)
            .chain(rekeyed.iter().map(String::as_str))
            .collect();
        obligated.sort_unstable();
        obligated.dedup();
        let obligated: Vec<[Value; 1]> = obligated.into_iter().map(|id| [id.into()]).collect();
        let earlier: Vec<(String, String, String, i64)> = conn
            .fetch_with(
                |referrals| {
                    format!(
                        "SELECT x.referral_id, x.meets, x.agency, MIN(x.at) AS at
                         FROM referrals r JOIN hops x ON {OF_REFERRAL}
                         WHERE r.id IN (SELECT column1 FROM {referrals} AS v) AND x.meets <> ''
                         GROUP BY x.referral_id, x.meets, x.agency"
                    )
                },
                &obligated,
            )
            .await?;
        for (referral, meets_codes, agency, at) in earlier {
            for met_by in meets_codes.split(',').filter_map(MetBy::from_code) {
                meets
                    .entry((referral.clone(), met_by, agency.clone()))
                    .and_modify(|t| *t = (*t).min(at))
                    .or_insert(at);
            }
        }
        let meets: Vec<[Value; 4]> = meets
            .into_iter()
            .map(|((referral, met_by, agency), at)| {
                [
                    referral.into(),
                    met_by.code().into(),
                    agency.into(),
                    Value::Int(at),
                ]
            })
            .collect();
        conn.execute_with(
            |met| {
                format!(
                    "UPDATE obligations SET met_at = CAST(v.column4 AS BIGINT)
                     FROM {met} AS v JOIN referrals r ON r.id = v.column1
                     WHERE obligations.referral_at = r.submitted_at AND obligations.referral_id = v.column1
                       AND obligations.met_by = v.column2 AND obligations.meets_agency = v.column3
                       AND obligations.met_at IS NULL"
                )
            },
            &meets,
        )
        .await?;
        Ok(())
    }

    fn envelope_rows(&self, envelope: &Envelope, now: DateTime<Utc>, rows: &mut Prepared) {
        let kind = MessageKind::try_from(envelope.kind).unwrap_or(MessageKind::Unspecified);
        let submitted = ts(envelope.submitted_at.as_ref()).unwrap_or(now);
        let clock = ts(envelope.clock_started_at.as_ref()).unwrap_or(submitted);
        let known = kind != MessageKind::Unspecified && self.policy.knows(kind);
        if !known {
            rows.messages[rows.owner].unknown_kind = Some(envelope.kind);
        }
        let encoded = envelope.encode_to_vec();
        let body = EnvelopeBody {
            also_to: &envelope.also_to,
            clock_started_at: millis(clock),
            envelope_sha256: sha256_hex(&encoded),
            id: &envelope.id,
            in_reply_to: &envelope.in_reply_to,
            kind: kind.code(),
            // CQ-1.1c: a sealed letter is recorded by the digest of the
            // sealed bytes; the tracker never sees (or stores readably)
            // its plaintext.
            letter_sha256: match &envelope.payload {
                Some(Payload::Letter(Letter {
                    disposition: Some(Disposition::SealedContent(sealed)),
                    ..
                })) => Some(sha256_hex(sealed)),
                _ => None,
            },
            recipient: &envelope.recipient,
            relay_of: &envelope.relay_of,
            sender: &envelope.sender,
            submitted_at: millis(submitted),
            // CQ-1.1c: the ground a letter was withheld on is recorded.
            withheld_on: match &envelope.payload {
                Some(Payload::Letter(Letter {
                    disposition: Some(Disposition::WithheldOn(ground)),
                    ..
                })) => Some(
                    WithholdingGround::try_from(*ground).map_or("unknown", |g| g.as_str_name()),
                ),
                _ => None,
            },
        }
        .to_json();
        let referral_id = refbus_core::envelope::tracking_id(envelope).to_owned();
        rows.events.push(
            rows.owner,
            EventRow {
                message_id: envelope.id.clone(),
                event: kind.code().to_owned(),
                referral_id: referral_id.clone(),
                body,
            },
        );
        if !envelope.relay_of.is_empty() {
            // DZ-7: a relay passed the lead on. Filed under the lead, with
            // no referral row of its own: it is new when its hop goes in.
            let at = millis(submitted);
            rows.messages[rows.owner].hop = Some([
                referral_id.clone(),
                "relayed".to_owned(),
                envelope.sender.clone(),
                envelope.id.clone(),
            ]);
            rows.hop(
                &referral_id,
                "relayed",
                &envelope.sender,
                at,
                &envelope.id,
                &[MetBy::Relayed],
            );
            if known {
                self.obligation_rows(envelope, &referral_id, kind, clock, submitted, rows);
            }
            return;
        }
        for (agency, right) in rights_of(envelope) {
            rows.rights.push(
                rows.owner,
                [
                    Value::Int(millis(submitted)),
                    envelope.id.as_str().into(),
                    agency.into(),
                    right.code().into(),
                ],
            );
        }
        if !envelope.recipient.is_empty() {
            rows.checked.push(rows.owner, envelope.id.clone());
        }
        let region = |id: &str| {
            self.directory
                .get(id)
                .map(|a| a.region.clone())
                .unwrap_or_default()
        };
        rows.referrals.push(
            rows.owner,
            [
                envelope.id.as_str().into(),
                kind.code().into(),
                envelope.sender.as_str().into(),
                envelope.recipient.as_str().into(),
                envelope.in_reply_to.as_str().into(),
                region(&envelope.sender).into(),
                region(&envelope.recipient).into(),
                Value::Int(millis(clock)),
                Value::Int(millis(submitted)),
                Value::Int(i64::from(known)),
                base64::engine::general_purpose::STANDARD
                    .encode(&encoded)
                    .into(),
            ],
        );
        let at = millis(submitted);
        rows.hop(
            &envelope.id,
            "submitted",
            &envelope.sender,
            at,
            &envelope.id,
            &[],
        );
        self.meeting_rows(envelope, kind, at, rows);
        match &envelope.payload {
            Some(Payload::Feedback(_) | Payload::Acknowledgement(_))
                if !envelope.in_reply_to.is_empty() =>
            {
                let (hop, meets): (&str, &[MetBy]) = match &envelope.payload {
                    Some(Payload::Feedback(f)) => ("answered", self.feedback_meets(envelope, f)),
                    _ => ("acknowledged", &[MetBy::Acknowledged]),
                };
                rows.hop(
                    &envelope.in_reply_to,
                    hop,
                    &envelope.sender,
                    at,
                    &envelope.id,
                    meets,
                );
            }
            Some(Payload::OverdueNotice(notice)) => {
                rows.hop(
                    &notice.referral_id,
                    "overdue_notified",
                    &envelope.recipient,
                    at,
                    &envelope.id,
                    &[],
                );
            }
            _ if known => {
                self.obligation_rows(envelope, &envelope.id, kind, clock, submitted, rows);
            }
            _ => {}
        }
    }

    /// What a feedback meets. CQ-3.13: hearing the lawyer in person meets
    /// an obligation of its own. CQ-1.3a: any answer meets "arrange at once
    /// or tell why"; the meeting held, or a refusal whose reason is lawful
    /// in the answering centre's region, also meets "within 48 hours"
    /// (and CQ-1.3e).
    fn feedback_meets(&self, envelope: &Envelope, feedback: &Feedback) -> &'static [MetBy] {
        const ANSWERED: &[MetBy] = &[MetBy::Feedback];
        const HELD: &[MetBy] = &[MetBy::Feedback, MetBy::Held];
        match Outcome::try_from(feedback.outcome) {
            Ok(Outcome::Heard) => &[MetBy::Hearing],
            Ok(Outcome::Held) => HELD,
            Ok(Outcome::Refused) => {
                let reason = feedback
                    .refusal
                    .as_ref()
                    .and_then(|r| RefusalReason::try_from(r.reason).ok())
                    .unwrap_or(RefusalReason::Unspecified);
                let lawful = self.directory.get(&envelope.sender).is_some_and(|centre| {
                    self.policy
                        .refusal(reason, &centre.region, &self.directory)
                        .is_ok_and(|r| r.lawful)
                });
                if lawful { HELD } else { ANSWERED }
            }
            _ => ANSWERED,
        }
    }

    /// The meeting rows of issue 18 (module docs): a request a centre is
    /// asked to serve, a centre's answer that serves or refuses one
    /// (CQ-1.3b), a lawyer's rating (CQ-3.11b), a verification query's
    /// link to the meeting request it holds up (CQ-1.3d).
    fn meeting_rows(&self, envelope: &Envelope, kind: MessageKind, at: i64, rows: &mut Prepared) {
        let kind_of = |id: &str| self.directory.get(id).map(|a| a.kind);
        let to_centre = kind_of(&envelope.recipient) == Some(AgencyKind::DetentionCentre);
        match &envelope.payload {
            Some(Payload::LawyerMeetingRequest(_) | Payload::InterrogationRequest(_))
                if to_centre && envelope.relay_of.is_empty() =>
            {
                let rule = self
                    .directory
                    .get(&envelope.recipient)
                    .and_then(|centre| self.policy.order_for(&centre.region, &self.directory))
                    .filter(|order| order.kinds.contains(&kind))
                    .map_or("", |order| order.rule.as_str());
                rows.centre_requests.push(
                    rows.owner,
                    [
                        envelope.id.as_str().into(),
                        envelope.recipient.as_str().into(),
                        kind.code().into(),
                        Value::Int(at),
                        rule.into(),
                    ],
                );
            }
            Some(Payload::Feedback(f)) if !envelope.in_reply_to.is_empty() => {
                let outcome = match Outcome::try_from(f.outcome) {
                    Ok(Outcome::Held) => "held",
                    Ok(Outcome::Refused) => "refused",
                    _ => return,
                };
                if kind_of(&envelope.sender) == Some(AgencyKind::DetentionCentre) {
                    rows.centre_services.push(
                        rows.owner,
                        [
                            envelope.in_reply_to.as_str().into(),
                            envelope.sender.as_str().into(),
                            outcome.into(),
                            Value::Int(at),
                            envelope.id.as_str().into(),
                        ],
                    );
                }
            }
            Some(Payload::MeetingRating(rating))
                if to_centre
                    && kind_of(&envelope.sender) == Some(AgencyKind::LawyerService)
                    && (1..=5).contains(&rating.score) =>
            {
                rows.ratings.push(
                    rows.owner,
                    [
                        envelope.id.as_str().into(),
                        envelope.recipient.as_str().into(),
                        rating.meeting_request_id.as_str().into(),
                        Value::Int(i64::from(rating.score)),
                        Value::Int(at),
                    ],
                );
            }
            Some(Payload::VerificationQuery(query)) if !query.meeting_request_id.is_empty() => {
                rows.links.push(
                    rows.owner,
                    [
                        envelope.id.as_str().into(),
                        query.meeting_request_id.as_str().into(),
                        envelope.sender.as_str().into(),
                        Value::Int(at),
                    ],
                );
            }
            _ => {}
        }
    }

    /// The obligations `envelope` creates, filed under `referral_id`: one
    /// per rule of its kind that applies, and for a rule whose bearer is the
    /// recipient, one per recipient (a joint notice's `also_to`, CQ-3.15).
    /// A misconduct lead binds its recipient by the duty of that hop of its
    /// route: a relay by the rules met by relaying (DZ-7), the handling
    /// organ by the others (DZ-8); overdue notices go to its finder.
    fn obligation_rows(
        &self,
        envelope: &Envelope,
        referral_id: &str,
        kind: MessageKind,
        clock: DateTime<Utc>,
        submitted: DateTime<Utc>,
        rows: &mut Prepared,
    ) {
        let lead = match &envelope.payload {
            Some(Payload::MisconductLead(lead)) => Some(lead),
            _ => None,
        };
        let sender_id = lead
            .map(|l| l.found_by.as_str())
            .filter(|f| !f.is_empty())
            .unwrap_or(&envelope.sender);
        let Some(sender) = self.directory.get(sender_id) else {
            tracing::warn!(id = %envelope.id, "referral from an agency not in the directory: no obligations created");
            return;
        };
        let mut recipients = Vec::with_capacity(1 + envelope.also_to.len());
        for id in std::iter::once(&envelope.recipient).chain(&envelope.also_to) {
            match self.directory.get(id) {
                Some(agency) => recipients.push(agency),
                None => {
                    tracing::warn!(id = %envelope.id, "referral to an agency not in the directory: no obligations created for it");
                }
            }
        }
        let relays = lead.is_some_and(|l| {
            l.route
                .iter()
                .find(|hop| hop.agency == envelope.recipient)
                .is_some_and(|hop| hop.duty != Duty::Handle as i32)
        });
        // Who binds where: only the entries whose territory holds the
        // region of the matter.
        let Some(region) = region_of_matter(envelope, &self.directory) else {
            tracing::warn!(id = %envelope.id, "the region of the referral's matter is unknown: no obligations created");
            return;
        };
        // CQ-1.1c: a withheld letter is not forwarded; the notice that
        // reaches the lawyer meets nothing.
        let withheld = matches!(
            &envelope.payload,
            Some(Payload::Letter(Letter {
                disposition: Some(Disposition::WithheldOn(_)),
                ..
            }))
        );
        let mut created = 0;
        for rule in self.policy.rules_binding(kind, region, &self.directory) {
            if lead.is_some() && (rule.met_by == MetBy::Relayed) != relays {
                continue;
            }
            if rule
                .when
                .is_some_and(|when| !when.holds(envelope.payload.as_ref()))
            {
                continue;
            }
            let met_by = rule.met_by.code();
            for (i, recipient) in recipients.iter().enumerate() {
                if rule.bearer == Party::Sender && i > 0 {
                    break;
                }
                let bearer = match rule.bearer {
                    Party::Sender => sender,
                    Party::Recipient => *recipient,
                };
                let start = match rule.clock {
                    ClockStart::Requested => clock,
                    ClockStart::Submitted => submitted,
                };
                let due = self.policy.due_at(rule, start, bearer, &self.directory);
                let notify = self
                    .policy
                    .notify_agencies(rule, sender, recipient, &self.directory);
                // Relayed hops and further recipients name their agency.
                let id = if i == 0 && envelope.relay_of.is_empty() {
                    format!("{referral_id}/{}/{met_by}", rule.rule)
                } else {
                    format!("{referral_id}/{}/{met_by}/{}", rule.rule, recipient.id)
                };
                rows.obligations.push(
                    rows.owner,
                    [
                        id.into(),
                        referral_id.into(),
                        rule.rule.as_str().into(),
                        kind.code().into(),
                        rule.duty.as_str().into(),
                        bearer.id.as_str().into(),
                        if withheld && rule.met_by == MetBy::Delivered {
                            "".into()
                        } else {
                            recipient.id.as_str().into()
                        },
                        met_by.into(),
                        Value::Int(millis(start)),
                        Value::Int(millis(due)),
                        Value::NullInt,
                        notify.join(",").into(),
                    ],
                );
                rows.dues.push(millis(due));
                created += 1;
            }
        }
        if created > 0 {
            rows.obligated.push(rows.owner, referral_id.to_owned());
        }
        rows.messages[rows.owner].obligations = created;
    }

    /// A reported hop's row, and its body in its delivery's [`HopEvent`].
    fn hop_rows(report: &HopReport, now: DateTime<Utc>, rows: &mut Prepared) -> String {
        let hop = hop_code(Hop::try_from(report.hop).unwrap_or(Hop::Unspecified));
        let at = millis(ts(report.at.as_ref()).unwrap_or(now));
        let body = HopBody {
            agency: &report.agency,
            at,
            hop,
            id: &report.id,
            referral_id: &report.referral_id,
        }
        .to_json();
        rows.messages[rows.owner].hop = Some([
            report.referral_id.clone(),
            hop.to_owned(),
            report.agency.clone(),
            report.id.clone(),
        ]);
        rows.hop(
            &report.referral_id,
            hop,
            &report.agency,
            at,
            &report.id,
            met_by_for(hop).as_slice(),
        );
        body
    }
}

/// Moves the rows filed under a referral while it was not recorded
/// (`referral_at` 0: hops, and a relay's obligations) to its time, now that
/// it is: rows under the batch's referrals, and under those the batch's
/// rows are filed under (on PostgreSQL a batch's rows go in while the batch
/// before it, which may record their referral, has not committed yet).
/// Runs once every batch before this one has committed. Returns the
/// referrals whose rows moved.
async fn rekey_early_rows(
    conn: &mut WriteTx,
    prepared: &Prepared,
    new: &[bool],
) -> Result<HashSet<String>, sqlx::Error> {
    fn text(v: &Value) -> Option<&str> {
        match v {
            Value::Text(t) => Some(t),
            Value::Int(_) | Value::NullInt => None,
        }
    }
    let mut ids: Vec<&str> = prepared
        .referrals
        .iter_kept(new)
        .filter_map(|row| text(&row[0]))
        .chain(prepared.hops.iter_kept(new).filter_map(|row| text(&row[0])))
        .chain(
            prepared
                .obligations
                .iter_kept(new)
                .filter_map(|row| text(&row[1])),
        )
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let ids: Vec<[Value; 1]> = ids.into_iter().map(|id| [id.into()]).collect();
    let mut moved = HashSet::new();
    for table in ["hops", "obligations"] {
        // Most of the time no row waits: one look at the start of the index.
        let waiting: Vec<(i64,)> = conn
            .fetch(
                &format!("SELECT referral_at FROM {table} WHERE referral_at = 0 LIMIT 1"),
                &[],
            )
            .await?;
        if waiting.is_empty() {
            continue;
        }
        let rows: Vec<(String,)> = conn
            .fetch_with(
                |v| {
                    format!(
                        "UPDATE {table} SET referral_at = r.submitted_at
                         FROM {v} AS v JOIN referrals r ON r.id = v.column1
                         WHERE {table}.referral_at = 0 AND {table}.referral_id = v.column1
                           AND r.submitted_at <> 0
                         RETURNING {table}.referral_id"
                    )
                },
                &ids,
            )
            .await?;
        if table == "obligations" && !rows.is_empty() {
            // Their overdue notices, if they fell due while they waited,
            // name them by their key.
            let moved: Vec<[Value; 1]> = rows.iter().map(|(id,)| [id.as_str().into()]).collect();
            conn.execute_with(
                |v| {
                    format!(
                        "UPDATE overdue_notices SET referral_at = r.submitted_at
                         FROM {v} AS v JOIN referrals r ON r.id = v.column1
                         WHERE overdue_notices.referral_at = 0 AND overdue_notices.referral_id = v.column1"
                    )
                },
                &moved,
            )
            .await?;
        }
        moved.extend(rows.into_iter().map(|(id,)| id));
    }
    Ok(moved)
}

/// Runs `insert` (an insert of `rows` rows that does nothing for a row
/// already there) inside a savepoint, and tells whether every row went
/// in. When some did not (a message delivered again, or recorded by
/// another tracker meanwhile), the insert is rolled back, so that the
/// caller can insert the rows again asking which go in (`RETURNING`):
/// the answer costs a row read back per row, which the usual batch, all
/// new, does not need (issue 17).
async fn all_go_in(
    conn: &mut WriteTx,
    rows: usize,
    insert: impl AsyncFnOnce(&mut WriteTx) -> Result<u64, sqlx::Error>,
) -> Result<bool, sqlx::Error> {
    if rows == 0 {
        return Ok(true);
    }
    conn.execute("SAVEPOINT all_go_in", &[]).await?;
    let went_in = insert(conn).await?;
    let all = usize::try_from(went_in).is_ok_and(|n| n == rows);
    if !all {
        conn.execute("ROLLBACK TO SAVEPOINT all_go_in", &[]).await?;
    }
    conn.execute("RELEASE SAVEPOINT all_go_in", &[]).await?;
    Ok(all)
}

/// Refuses, in the ledger, the replies on the batch's checked referrals
/// (those it gave rights, those its replies name) from agencies without
/// the right to them: a reply recorded before its referral, or one that
/// raced its referral past the check at gathering. Each hop moves from
/// `hops` to `refused_replies`, so it meets nothing and shows nowhere, and
/// a `reply_refused` event is chained after `events`. Returns the
/// (referral, agency) pairs refused.
///
/// A referral first recorded in this transaction has, under its key,
/// only the batch's own replies (checked when gathered, or named in
/// `checked` by a reply that was not) and the replies recorded before it,
/// which were just moved to it (`rekeyed`): it is looked at only if it is
/// among those.
async fn refuse_unentitled(
    conn: &mut WriteTx,
    head: &mut Head,
    prepared: &Prepared,
    new: &[bool],
    rekeyed: &HashSet<String>,
    recorded_at: i64,
    events: &mut Vec<[Value; 8]>,
) -> Result<HashSet<(String, String)>, sqlx::Error> {
    let mut ids: Vec<&String> = prepared
        .looked_at(&prepared.checked, new, rekeyed)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let ids: Vec<[Value; 1]> = ids.into_iter().map(|id| [id.as_str().into()]).collect();
    let unentitled: Vec<(i64, String, String, String, i64, String)> = conn
        .fetch_with(
            |ids| {
                format!(
                    "SELECT x.referral_at, x.referral_id, x.hop, x.agency, x.at, x.message_id
                     FROM referrals r JOIN hops x ON {OF_REFERRAL}
                     WHERE r.id IN (SELECT column1 FROM {ids} AS v)
                       AND x.hop NOT IN ('submitted', 'overdue_notified')
                       AND EXISTS (SELECT 1 FROM reply_rights y
                           WHERE y.referral_at = r.submitted_at AND y.referral_id = r.id)
                       AND NOT EXISTS (SELECT 1 FROM reply_rights y
                           WHERE y.referral_at = r.submitted_at AND y.referral_id = r.id
                             AND y.agency = x.agency
                             AND y.reply = CASE x.hop WHEN 'answered' THEN 'answer'
                                                      WHEN 'relayed' THEN 'relay'
                                                      ELSE 'receive' END)"
                )
            },
            &ids,
        )
        .await?;
    let mut refused = HashSet::with_capacity(unentitled.len());
    if unentitled.is_empty() {
        return Ok(refused);
    }
    let mut rows = Vec::with_capacity(unentitled.len());
    let mut keys = Vec::with_capacity(unentitled.len());
    for (referral_at, referral, hop, agency, at, message_id) in unentitled {
        let reason = not_a_party(&agency, &referral, Right::for_hop(&hop));
        tracing::warn!(message = %message_id, %referral, %agency, %hop, "refused a reply recorded before its referral: not a party");
        let body =
            json!({"message_id": message_id, "hop": hop, "agency": agency, "reason": reason})
                .to_string();
        events.push(head.chain(&Event {
            message_id: &format!("refused/{message_id}/{hop}"),
            event: "reply_refused",
            referral_id: &referral,
            recorded_at,
            body,
        }));
        keys.push([
            Value::Int(referral_at),
            referral.as_str().into(),
            hop.as_str().into(),
            agency.as_str().into(),
            message_id.as_str().into(),
        ]);
        rows.push([
            referral.as_str().into(),
            hop.into(),
            agency.as_str().into(),
            Value::Int(at),
            message_id.into(),
            reason.into(),
        ]);
        refused.insert((referral, agency));
    }
    conn.insert_rows(
        "INSERT INTO refused_replies (referral_id, hop, agency, at, message_id, reason)",
        "ON CONFLICT DO NOTHING",
        &rows,
    )
    .await?;
    conn.execute_with(
        |v| {
            format!(
                "DELETE FROM hops WHERE (referral_at, referral_id, hop, agency, message_id)
                 IN (SELECT column1, column2, column3, column4, column5 FROM {v} AS v)"
            )
        },
        &keys,
    )
    .await?;
    Ok(refused)
}

/// Why a reply from `agency` to `referral` is refused.
#[must_use]
pub fn not_a_party(agency: &str, referral: &str, right: Right) -> String {
    let what = match right {
        Right::Receive => "report or acknowledge it (only its recipients and route agencies do)",
        Right::Answer => "feed back on it (only its recipients, or a lead's handling organ, DZ-8)",
        Right::Relay => "relay it (only a relay of the lead's route, DZ-7)",
    };
    format!(
        "a reply counts only from an agency the referral was addressed to (DOMAIN.md, Confidentiality): `{agency}` may not {what} on referral {referral}; its addressees and route decide, never its hops"
    )
}

/// Which of `messages` the ledger holds already, before their rows are
/// inserted: a hop report refused before (`refused_replies`). An envelope
/// is found by its `referrals` insert, a hop report in `hops` by its own,
/// in [`Recorder::write_rows`].
async fn refused_already(
    conn: &mut WriteTx,
    messages: &[PreparedMessage],
) -> Result<Vec<bool>, sqlx::Error> {
    let hops: Vec<[Value; 4]> = messages
        .iter()
        .filter_map(|m| m.hop.as_ref())
        .map(|key| key.each_ref().map(|k| k.as_str().into()))
        .collect();
    let refused: HashSet<(String, String, String, String)> = conn
        .fetch_with(
            |v| {
                format!(
                    "SELECT r.referral_id, r.hop, r.agency, r.message_id FROM refused_replies r
                     JOIN {v} AS v ON r.referral_id = v.column1 AND r.hop = v.column2
                       AND r.agency = v.column3 AND r.message_id = v.column4"
                )
            },
            &hops,
        )
        .await?
        .into_iter()
        .collect();
    Ok(messages
        .iter()
        .map(|m| match &m.hop {
            None => false,
            Some([r, h, a, id]) => {
                !refused.is_empty()
                    && refused.contains(&(r.clone(), h.clone(), a.clone(), id.clone()))
            }
        })
        .collect())
}

/// What a reported hop meets (an answer comes as an envelope, whose
/// outcome says whether it answered or heard: see `envelope_rows`).
fn met_by_for(hop: &str) -> Option<MetBy> {
    match hop {
        "delivered" => Some(MetBy::Delivered),
        "acknowledged" => Some(MetBy::Acknowledged),
        "answered" => Some(MetBy::Feedback),
        "relayed" => Some(MetBy::Relayed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refbus_proto::v1::{MisconductLead, RouteHop};

    /// Ledger bodies are chained by their bytes: written from structs they
    /// must be the bytes a `serde_json::Value` object gave before (keys in
    /// byte order, absent ones left out, the same escapes), for every
    /// optional field and for awkward text.
    #[test]
    fn bodies_written_from_structs_are_the_bytes_a_json_tree_gave() {
        let awkward = "引号\"和\\反斜杠\u{0}\u{1f}\n</script>\u{2028}";
        for (also_to, relay_of, letter, withheld) in [
            (vec![], "", None, None),
            (
                vec!["a".to_owned(), awkward.to_owned()],
                awkward,
                Some("ab".repeat(32)),
                Some("WITHHOLDING_GROUND_OTHER"),
            ),
            (vec!["x".to_owned()], "", None, Some("unknown")),
        ] {
            let body = EnvelopeBody {
                also_to: &also_to,
                clock_started_at: -1,
                envelope_sha256: "0f".repeat(32),
                id: awkward,
                in_reply_to: "",
                kind: "legal_help_request",
                letter_sha256: letter.clone(),
                recipient: "dz-duty-desk",
                relay_of,
                sender: awkward,
                submitted_at: i64::MAX,
                withheld_on: withheld,
            };
            let mut tree = json!({
                "id": body.id,
                "kind": body.kind,
                "sender": body.sender,
                "recipient": body.recipient,
                "in_reply_to": body.in_reply_to,
                "clock_started_at": body.clock_started_at,
                "submitted_at": body.submitted_at,
                "envelope_sha256": body.envelope_sha256,
            });
            if !also_to.is_empty() {
                tree["also_to"] = json!(also_to);
            }
            if !relay_of.is_empty() {
                tree["relay_of"] = json!(relay_of);
            }
            if let Some(ground) = withheld {
                tree["withheld_on"] = json!(ground);
            }
            if let Some(digest) = &letter {
                tree["letter_sha256"] = json!(digest);
            }
            assert_eq!(body.to_json(), tree.to_string());
        }
        let hop = HopBody {
            agency: "dz-duty-desk",
            at: 1_700_000_000_000,
            hop: "delivered",
            id: awkward,
            referral_id: "r-1",
        };
        let tree = json!({"id": hop.id, "referral_id": hop.referral_id, "hop": hop.hop, "agency": hop.agency, "at": hop.at});
        assert_eq!(hop.to_json(), tree.to_string());
        let event = HopEvent {
            message_id: awkward.to_owned(),
            event: "hop_report",
            referral_id: String::new(),
            batch: true,
            hops: vec![(0, hop.to_json()), (1, hop.to_json()), (2, hop.to_json())],
        };
        let chained = event.chained(&[true, false, true]).unwrap();
        assert_eq!(
            chained.body,
            json!({"id": awkward, "hops": [tree, tree]}).to_string()
        );
        assert!(event.chained(&[false, false, false]).is_none());
        let single = HopEvent {
            batch: false,
            ..event
        };
        assert_eq!(
            single.chained(&[false, true, false]).unwrap().body,
            tree.to_string()
        );
    }

    fn hop(agency: &str, duty: Duty) -> RouteHop {
        RouteHop {
            agency: agency.into(),
            duty: duty as i32,
        }
    }

    #[test]
    fn who_may_reply_comes_from_addressees_and_route_only() {
        let joint = Envelope {
            id: "j".into(),
            recipient: "dz-psb".into(),
            also_to: vec!["dz-bar-committee".into()],
            ..Envelope::default()
        };
        let rights: HashSet<_> = rights_of(&joint).into_iter().collect();
        for agency in ["dz-psb", "dz-bar-committee"] {
            assert!(rights.contains(&(agency, Right::Receive)));
            assert!(rights.contains(&(agency, Right::Answer)));
        }
        assert_eq!(
            rights.len(),
            4,
            "no right to relay a referral that is no lead"
        );

        // DZ-7 (2): the district court relays up, the high court handles.
        let lead = Envelope {
            id: "l".into(),
            recipient: "dz-court".into(),
            payload: Some(Payload::MisconductLead(MisconductLead {
                found_by: "dz-justice-bureau".into(),
                route: vec![
                    hop("dz-court", Duty::RelayUp),
                    hop("cq-high-court", Duty::Handle),
                ],
                ..MisconductLead::default()
            })),
            ..Envelope::default()
        };
        let rights: HashSet<_> = rights_of(&lead).into_iter().collect();
        assert_eq!(
            rights,
            [
                ("dz-court", Right::Receive),
                ("dz-court", Right::Relay),
                ("cq-high-court", Right::Receive),
                ("cq-high-court", Right::Answer),
            ]
            .into(),
            "the finder, and agencies off the route, have none"
        );
        let relayed = Envelope {
            relay_of: "l".into(),
            ..lead
        };
        assert!(rights_of(&relayed).is_empty(), "filed under the lead");
    }

    #[test]
    fn replies_claim_the_right_they_need() {
        let feedback = Observed::Envelope(Box::new(Envelope {
            sender: "yb-court".into(),
            in_reply_to: "r".into(),
            payload: Some(Payload::Feedback(Default::default())),
            ..Envelope::default()
        }));
        let reply = feedback.replies().next().unwrap();
        assert_eq!(
            (reply.referral, reply.agency, reply.right),
            ("r", "yb-court", Right::Answer)
        );
        let relay = Observed::Envelope(Box::new(Envelope {
            sender: "dz-court".into(),
            relay_of: "r".into(),
            ..Envelope::default()
        }));
        assert_eq!(relay.replies().next().unwrap().right, Right::Relay);
        let notice = Observed::Envelope(Box::new(Envelope {
            sender: TRACKER_ID.into(),
            in_reply_to: "r".into(),
            ..Envelope::default()
        }));
        assert!(
            notice.replies().next().is_none(),
            "the tracker's overdue notices"
        );
        let acknowledged = Observed::Hop(HopReport {
            referral_id: "r".into(),
            agency: "dz-court".into(),
            hop: Hop::Acknowledged as i32,
            ..HopReport::default()
        });
        assert_eq!(acknowledged.replies().next().unwrap().right, Right::Receive);
    }

    #[test]
    fn malformed_ids_are_refused_before_storage_naming_the_field() {
        let id = "01a233bc-4bdf-7330-982c-01e2e29d356a";
        let mut envelope = Envelope {
            sender: "dz-duty-desk".into(),
            recipient: "dz-detention-centre".into(),
            in_reply_to: id.into(),
            ..Envelope::default()
        };
        assert_eq!(
            Observed::Envelope(Box::new(envelope.clone())).check_ids(),
            Ok(())
        );
        envelope.in_reply_to = format!("{id}\0");
        let err = Observed::Envelope(Box::new(envelope.clone()))
            .check_ids()
            .unwrap_err();
        assert!(
            err.starts_with("envelope.in_reply_to: not a referral id"),
            "{err}"
        );
        envelope.in_reply_to = id.into();
        envelope.also_to = vec!["x\0".into()];
        let err = Observed::Envelope(Box::new(envelope))
            .check_ids()
            .unwrap_err();
        assert!(err.starts_with("envelope.also_to: "), "{err}");
        let submitted = Observed::Hop(HopReport {
            id: "h".into(),
            referral_id: id.into(),
            agency: "dz-court".into(),
            hop: Hop::Submitted as i32,
            ..HopReport::default()
        });
        let err = submitted.check_ids().unwrap_err();
        assert!(err.starts_with("hop_report.hop: `submitted`"), "{err}");
    }

    fn recorder() -> Recorder {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
        let directory =
            std::sync::Arc::new(Directory::load(format!("{root}/local/directory.toml")).unwrap());
        let policy = std::sync::Arc::new(
            PolicyCatalogue::load(std::path::Path::new(&format!("{root}/policy")), &directory)
                .unwrap(),
        );
        Recorder { directory, policy }
    }

    /// Issue 16's second check, in the ledger, looks at the referrals a
    /// batch records (replies may have come before them) and at those its
    /// replies name, unless the gatherer found their rights and checked
    /// the replies against them (issue 17: one check, not two).
    #[test]
    fn replies_are_checked_in_the_ledger_unless_checked_when_gathered() {
        let recorder = recorder();
        let referral = "01a233bc-4bdf-7330-982c-01e2e29d356a";
        let other = "01a233bc-4bdf-7330-982c-01e2e29d356b";
        let mut raced = report("c", "dz-duty-desk", Hop::Delivered);
        raced.referral_id = other.into();
        let hops = batch(vec![
            report("a", "dz-duty-desk", Hop::Delivered),
            report("b", "dz-duty-desk", Hop::Acknowledged),
            raced,
        ])
        .unwrap();
        let envelope = Observed::Envelope(Box::new(Envelope {
            id: "01a233bc-4bdf-7330-982c-01e2e29d356c".into(),
            kind: MessageKind::LegalHelpRequest as i32,
            sender: "dz-detention-centre".into(),
            recipient: "dz-duty-desk".into(),
            ..Envelope::default()
        }));
        let checked = |rights_checked: &[&str]| {
            let rights_checked = rights_checked.iter().map(|r| (*r).to_owned()).collect();
            let prepared = recorder.prepare(&[&envelope, &hops], Utc::now(), &rights_checked);
            let mut checked: Vec<String> = prepared.checked.rows.clone();
            checked.sort();
            checked.dedup();
            checked
        };
        assert_eq!(
            checked(&[]),
            [referral, other, "01a233bc-4bdf-7330-982c-01e2e29d356c"],
            "nothing checked when gathered: every referral named is checked in the ledger"
        );
        assert_eq!(
            checked(&[referral]),
            [other, "01a233bc-4bdf-7330-982c-01e2e29d356c"],
            "the replies checked against their referral's rights are not checked again; the raced one and the new referral are"
        );
        assert_eq!(
            checked(&[referral, other, "01a233bc-4bdf-7330-982c-01e2e29d356c"]),
            ["01a233bc-4bdf-7330-982c-01e2e29d356c"],
            "a referral the batch records is always checked: replies may have come before it"
        );
    }

    fn report(id: &str, agency: &str, hop: Hop) -> HopReport {
        HopReport {
            id: id.into(),
            referral_id: "01a233bc-4bdf-7330-982c-01e2e29d356a".into(),
            hop: hop as i32,
            agency: agency.into(),
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        }
    }

    fn batch(hops: Vec<HopReport>) -> Result<Observed, String> {
        Observed::decode(HOP_BATCH_KEY, &HopBatch { hops }.encode_to_vec())
    }

    #[test]
    fn a_hop_batch_names_one_agency_its_signer() {
        let both = batch(vec![
            report("a", "dz-duty-desk", Hop::Delivered),
            report("b", "dz-court", Hop::Delivered),
        ])
        .unwrap_err();
        assert!(both.contains("more than one agency"), "{both}");
        let none = batch(vec![report("a", "", Hop::Delivered)]).unwrap_err();
        assert!(none.contains("names no agency"), "{none}");
        let empty = batch(Vec::new()).unwrap_err();
        assert!(empty.contains("without hops"), "{empty}");

        let one = batch(vec![
            report("a", "dz-duty-desk", Hop::Delivered),
            report("b", "dz-duty-desk", Hop::Acknowledged),
        ])
        .unwrap();
        let claim = one.claim(b"bytes", Seal::Unsigned);
        assert_eq!(
            (claim.signer, claim.what),
            ("dz-duty-desk", Signed::HopBatch),
            "one signature, by the agency its hops name"
        );
        assert_eq!(one.replies().count(), 2, "each hop a reply of its own");
        assert_eq!(one.on_bus_millis().count(), 2, "each hop its own time");
        let submitted = batch(vec![
            report("a", "dz-duty-desk", Hop::Delivered),
            report("b", "dz-duty-desk", Hop::Submitted),
        ])
        .unwrap();
        let err = submitted.check_ids().unwrap_err();
        assert!(err.starts_with("hop batch, hop 1: hop_report.hop"), "{err}");
    }
}
