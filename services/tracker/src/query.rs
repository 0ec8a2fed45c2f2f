//! The tracker's gRPC queries: a referral's status and timeline, an
//! agency's open and overdue obligations, and the compliance report
//! (CQ-3.11). An agency reads only referrals it is a party to; a justice
//! bureau reads the metadata, never the payload, of its region's referrals.
//!
//! # Who is a party (DOMAIN.md, Confidentiality)
//! The parties to a referral come from the stored envelope alone: its
//! sender, its recipient and its `also_to`, and for a misconduct lead every
//! agency of its route and its finder (`found_by`). Never from hops: a hop
//! filed under a referral in an agency's name (an answer, a relay, even a
//! forged one) makes nobody a party, and neither does bearing one of its
//! obligations.
//!
//! # Leads stay hidden (DZ-6)
//! Lead traffic is a misconduct lead, a reply to one (`in_reply_to` names a
//! lead), and every obligation filed under a lead (its DZ-7 relay and DZ-8
//! handling duties, relays included). To an agency off the lead's route,
//! a supervising justice bureau included, it does not exist:
//! - `GetReferral` answers NOT_FOUND with the very message of an unknown
//!   id, so the answer is no existence oracle;
//! - `ListObligations` and the dashboard list none of the lead's
//!   obligations, whoever bears them;
//! - the compliance report (rows, table, CSV, HTML) is compiled without
//!   them: no row, no count, rate or percentile of any agency includes an
//!   obligation filed under a lead the viewer is not on the route of. An
//!   organ concerned that bears nothing else in the period has no row at
//!   all.
//!
//! An obligation filed under a referral the ledger does not hold (a relay
//! recorded before its lead) has no known route, so it is shown to nobody
//! until the lead is recorded.
//!
//! # Meetings (issue 18)
//! The compliance report also lists, for the centres the asker may see (the
//! agencies whose rows it sees), the services out of order of acceptance
//! (CQ-1.3b, SH-2.7: a request served in the period while an earlier one of
//! the same centre's queue was still waiting, neither served nor refused)
//! and the lawyers' ratings of each centre's meetings rated in the period
//! (CQ-3.11b; a rating counts for the centre its meeting request was
//! addressed to). A meeting request's status lists the verification queries
//! its centre linked to it (CQ-1.3d).

use refbus_gateway::auth::Caller;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine;
use chrono::{DateTime, Utc};
use prost::Message;
use refbus_core::envelope::{from_timestamp, timestamp};
use refbus_core::report::{self, CentreRatings, ObligationOutcome, OutOfOrder};
use refbus_core::{AgencyKind, Directory, KindExt, Level, MessageKind};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::tracker_server::Tracker;
use refbus_proto::v1::{
    CentreRating, ComplianceReportRequest, ComplianceReportResponse, ComplianceRow, Envelope,
    GetReferralRequest, ListObligationsRequest, ListObligationsResponse, Obligation,
    ObligationFilter, ObligationState, OutOfOrderService, ReferralStatus, ReportFormat,
    TimelineEntry,
};
use sqlx::Row;
use sqlx::any::AnyRow;
use tonic::{Request, Response, Status};

use crate::clock::{Clock, from_millis, millis};
use crate::ledger::{Ledger, LedgerError};

/// The tracker's query service.
#[derive(Clone)]
pub struct Queries {
    pub ledger: Arc<Ledger>,
    pub directory: Arc<Directory>,
    pub clock: Clock,
}

fn internal(e: impl Into<LedgerError>) -> Status {
    let e: LedgerError = e.into();
    tracing::error!(error = %e, "ledger query failed");
    Status::unavailable(format!("the ledger is unavailable: {e}"))
}

/// The envelope a referral row stores, if it decodes.
fn stored_envelope(row: &AnyRow) -> Result<Option<Envelope>, sqlx::Error> {
    let encoded: String = row.try_get("envelope")?;
    Ok(base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|bytes| Envelope::decode(bytes.as_slice()).ok()))
}

/// The parties to a referral (module documentation): its sender and
/// addressees, and for a misconduct lead its route and finder. Taken from
/// the stored envelope only, never from hops or obligations.
#[must_use]
pub fn parties(sender: &str, recipient: &str, envelope: Option<&Envelope>) -> BTreeSet<String> {
    let mut parties = BTreeSet::from([sender.to_owned(), recipient.to_owned()]);
    if let Some(envelope) = envelope {
        parties.extend(envelope.also_to.iter().cloned());
        if let Some(Payload::MisconductLead(lead)) = &envelope.payload {
            parties.extend(lead.route.iter().map(|hop| hop.agency.clone()));
            parties.insert(lead.found_by.clone());
        }
    }
    parties.remove("");
    parties
}

/// [`parties`] of a referral row (`sender`, `recipient`, `envelope`).
fn parties_of_row(row: &AnyRow) -> Result<BTreeSet<String>, sqlx::Error> {
    let sender: String = row.try_get("sender")?;
    let recipient: String = row.try_get("recipient")?;
    Ok(parties(&sender, &recipient, stored_envelope(row)?.as_ref()))
}

/// Whether an obligation row is filed under a misconduct lead (DZ-6): it is
/// a lead's, or the referral it is filed under is a lead or not in the
/// ledger (a relay recorded before its lead). Needs the columns `kind` and
/// `referral_kind` (the referral's kind, NULL when the ledger has none).
fn under_a_lead(row: &AnyRow) -> Result<bool, sqlx::Error> {
    let lead = MessageKind::MisconductLead.code();
    let kind: String = row.try_get("kind")?;
    let referral_kind: Option<String> = row.try_get("referral_kind")?;
    Ok(kind == lead || referral_kind.is_none_or(|k| k == lead))
}

/// How an asker may see a referral.
#[derive(Debug, PartialEq, Eq)]
enum Sight {
    Whole,
    MetadataOnly,
}

impl Queries {
    fn agency(&self, id: &str) -> Result<&refbus_core::Agency, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "agency: required (the agency asking)",
            ));
        }
        self.directory.get(id).ok_or_else(|| {
            Status::not_found(format!("agency: `{id}` is not in the agency directory"))
        })
    }

    /// The agencies whose obligations `asker` may see: its own, or for a
    /// justice bureau every agency of the regions it supervises.
    ///
    /// # Errors
    /// INVALID_ARGUMENT or NOT_FOUND for an unknown asker.
    pub fn visible_agencies(&self, asker: &str) -> Result<BTreeSet<String>, Status> {
        let asker = self.agency(asker)?;
        Ok(if asker.kind == AgencyKind::JusticeBureau {
            let regions = self.supervised_regions(asker);
            self.directory
                .agencies()
                .iter()
                .filter(|a| regions.contains(&a.region))
                .map(|a| a.id.clone())
                .collect()
        } else {
            BTreeSet::from([asker.id.clone()])
        })
    }

    /// The regions a justice bureau supervises: its own, and for a
    /// municipal bureau its districts.
    fn supervised_regions(&self, bureau: &refbus_core::Agency) -> BTreeSet<String> {
        let mut regions = BTreeSet::from([bureau.region.clone()]);
        if bureau.level == Level::Municipal {
            for agency in self.directory.agencies() {
                if self
                    .directory
                    .region(&agency.region)
                    .and_then(|r| r.parent.as_deref())
                    == Some(bureau.region.as_str())
                {
                    regions.insert(agency.region.clone());
                }
            }
        }
        regions
    }

    fn obligation(row: &AnyRow, now: DateTime<Utc>) -> Result<Obligation, sqlx::Error> {
        let due: i64 = row.try_get("due_at")?;
        let met: Option<i64> = row.try_get("met_at")?;
        let overdue: Option<i64> = row.try_get("overdue_at")?;
        let state = match met {
            Some(m) if m <= due => ObligationState::MetOnTime,
            Some(_) => ObligationState::MetLate,
            None if overdue.is_some() || due <= millis(now) => ObligationState::Overdue,
            None => ObligationState::Open,
        };
        let kind: String = row.try_get("kind")?;
        let notify: String = row.try_get("notify")?;
        Ok(Obligation {
            id: row.try_get("id")?,
            referral_id: row.try_get("referral_id")?,
            rule: row.try_get("rule")?,
            kind: MessageKind::from_code(&kind).unwrap_or(MessageKind::Unspecified) as i32,
            duty: row.try_get("duty")?,
            bearer: row.try_get("bearer")?,
            clock_started_at: Some(timestamp(from_millis(row.try_get("clock_started_at")?))),
            due_at: Some(timestamp(from_millis(due))),
            met_at: met.map(|m| timestamp(from_millis(m))),
            overdue_at: overdue.map(|m| timestamp(from_millis(m))),
            notify: notify
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            state: state as i32,
        })
    }

    /// Whether a referral is a misconduct lead, or a reply to one.
    async fn is_lead_traffic(&self, kind: &str, row: &AnyRow) -> Result<bool, Status> {
        let lead = MessageKind::MisconductLead.code();
        if kind == lead {
            return Ok(true);
        }
        let in_reply_to: String = row.try_get("in_reply_to").map_err(internal)?;
        if in_reply_to.is_empty() {
            return Ok(false);
        }
        let answered: Option<String> =
            sqlx::query_scalar("SELECT kind FROM referrals WHERE id = $1")
                .bind(&in_reply_to)
                .fetch_optional(&self.ledger.pool)
                .await
                .map_err(internal)?;
        Ok(answered.as_deref() == Some(lead))
    }

    /// The route of each lead among `ids` (see [`parties`]); a lead the
    /// ledger does not hold has no entry.
    async fn lead_routes(
        &self,
        ids: impl IntoIterator<Item = &str>,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, Status> {
        let mut routes = BTreeMap::new();
        for id in ids.into_iter().collect::<BTreeSet<_>>() {
            let row =
                sqlx::query("SELECT sender, recipient, envelope FROM referrals WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.ledger.pool)
                    .await
                    .map_err(internal)?;
            if let Some(row) = row {
                routes.insert(id.to_owned(), parties_of_row(&row).map_err(internal)?);
            }
        }
        Ok(routes)
    }

    /// A referral's status for `asker`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an id that is no referral id; NOT_FOUND (also
    /// for lead traffic `asker` is not a party to, DZ-6), PERMISSION_DENIED,
    /// or UNAVAILABLE when the ledger is.
    pub async fn referral(&self, asker: &str, id: &str) -> Result<ReferralStatus, Status> {
        let asker = self.agency(asker)?;
        refbus_core::envelope::check_referral_id("referral_id", id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let not_found =
            || Status::not_found(format!("referral_id: no referral `{id}` in the ledger"));
        let row = sqlx::query("SELECT * FROM referrals WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.ledger.pool)
            .await
            .map_err(internal)?
            .ok_or_else(not_found)?;
        let kind: String = row.try_get("kind").map_err(internal)?;
        let party = parties_of_row(&row).map_err(internal)?.contains(&asker.id);
        let sight = if party {
            Sight::Whole
        } else if self.is_lead_traffic(&kind, &row).await? {
            // DZ-6: a lead, and a reply to one, do not exist off the route,
            // not even for a supervisor: the answer an unknown id gets.
            return Err(not_found());
        } else if asker.kind == AgencyKind::JusticeBureau && {
            let regions = self.supervised_regions(asker);
            let s: String = row.try_get("sender_region").map_err(internal)?;
            let r: String = row.try_get("recipient_region").map_err(internal)?;
            regions.contains(&s) || regions.contains(&r)
        } {
            Sight::MetadataOnly
        } else {
            return Err(Status::permission_denied(format!(
                "`{}` is not a party to referral `{id}` and does not supervise its region",
                asker.id
            )));
        };
        let sender: String = row.try_get("sender").map_err(internal)?;
        let recipient: String = row.try_get("recipient").map_err(internal)?;
        // Its rows are keyed by its submission time first (migration 0005).
        let submitted_at: i64 = row.try_get("submitted_at").map_err(internal)?;
        let hops = sqlx::query(
            "SELECT hop, agency, at FROM hops WHERE referral_at = $1 AND referral_id = $2 ORDER BY at, hop",
        )
        .bind(submitted_at)
        .bind(id)
        .fetch_all(&self.ledger.pool)
        .await
        .map_err(internal)?;
        let obligations = sqlx::query(
            "SELECT * FROM obligations WHERE referral_at = $1 AND referral_id = $2 ORDER BY due_at, id",
        )
        .bind(submitted_at)
        .bind(id)
        .fetch_all(&self.ledger.pool)
        .await
        .map_err(internal)?;

        // CQ-1.3d: the verification queries its centre linked to it.
        let verification_queries: Vec<String> = if kind == MessageKind::LawyerMeetingRequest.code()
        {
            sqlx::query_scalar(
                "SELECT query_id FROM verification_links
                 WHERE meeting_request_id = $1 AND centre = $2 ORDER BY asked_at, query_id",
            )
            .bind(id)
            .bind(&recipient)
            .fetch_all(&self.ledger.pool)
            .await
            .map_err(internal)?
        } else {
            Vec::new()
        };
        let now = self.clock.now();
        let envelope = if sight == Sight::Whole {
            stored_envelope(&row).map_err(internal)?
        } else {
            None
        };
        Ok(ReferralStatus {
            id: id.to_owned(),
            kind: MessageKind::from_code(&kind).unwrap_or(MessageKind::Unspecified) as i32,
            sender,
            recipient,
            clock_started_at: Some(timestamp(from_millis(
                row.try_get("clock_started_at").map_err(internal)?,
            ))),
            submitted_at: Some(timestamp(from_millis(
                row.try_get("submitted_at").map_err(internal)?,
            ))),
            in_reply_to: row.try_get("in_reply_to").map_err(internal)?,
            timeline: hops
                .iter()
                .map(|h| -> Result<TimelineEntry, sqlx::Error> {
                    let hop: String = h.try_get("hop")?;
                    Ok(TimelineEntry {
                        hop: refbus_core::kind::hop_from_code(&hop) as i32,
                        agency: h.try_get("agency")?,
                        at: Some(timestamp(from_millis(h.try_get("at")?))),
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(internal)?,
            obligations: obligations
                .iter()
                .map(|o| Self::obligation(o, now))
                .collect::<Result<_, _>>()
                .map_err(internal)?,
            envelope,
            payload_withheld: sight == Sight::MetadataOnly,
            kind_known: row.try_get::<i32, _>("kind_known").map_err(internal)? != 0,
            verification_queries,
        })
    }

    /// The obligation rows among `rows` that `asker` may see: all but those
    /// filed under a lead whose route `asker` is not on (DZ-6).
    async fn seen_by(&self, asker: &str, rows: Vec<AnyRow>) -> Result<Vec<AnyRow>, Status> {
        let mut hidden = Vec::with_capacity(rows.len());
        let mut leads = BTreeSet::new();
        for row in &rows {
            let under = under_a_lead(row).map_err(internal)?;
            if under {
                leads.insert(row.try_get::<String, _>("referral_id").map_err(internal)?);
            }
            hidden.push(under);
        }
        if leads.is_empty() {
            return Ok(rows);
        }
        let routes = self.lead_routes(leads.iter().map(String::as_str)).await?;
        let mut seen = Vec::with_capacity(rows.len());
        for (row, under) in rows.into_iter().zip(hidden) {
            let on_route = || -> Result<bool, sqlx::Error> {
                let referral: String = row.try_get("referral_id")?;
                Ok(routes.get(&referral).is_some_and(|r| r.contains(asker)))
            };
            if !under || on_route().map_err(internal)? {
                seen.push(row);
            }
        }
        Ok(seen)
    }

    /// An agency's open and/or overdue obligations, paged by due time, as
    /// the agency itself sees them.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad page token, NOT_FOUND, UNAVAILABLE.
    pub async fn obligations(
        &self,
        request: ListObligationsRequest,
    ) -> Result<ListObligationsResponse, Status> {
        let asker = request.agency.clone();
        self.obligations_seen_by(&asker, request).await
    }

    /// `request.agency`'s open and/or overdue obligations as `asker` sees
    /// them (the dashboard: a justice bureau looking at an agency of its
    /// region): without those filed under a lead `asker` is not on the
    /// route of (DZ-6). Whether `asker` may look at `request.agency` at all
    /// is the caller's to check ([`Queries::visible_agencies`]).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad page token, NOT_FOUND, UNAVAILABLE.
    pub async fn obligations_seen_by(
        &self,
        asker: &str,
        request: ListObligationsRequest,
    ) -> Result<ListObligationsResponse, Status> {
        self.agency(asker)?;
        let agency = self.agency(&request.agency)?;
        let page_size = match request.page_size {
            0 => 100,
            n => n.min(1000),
        };
        let (after_due, after_id) = if request.page_token.is_empty() {
            (i64::MIN, String::new())
        } else {
            request
                .page_token
                .split_once(':')
                .and_then(|(d, id)| Some((d.parse::<i64>().ok()?, id.to_owned())))
                .ok_or_else(|| {
                    Status::invalid_argument("page_token: not a token this service issued")
                })?
        };
        let now = millis(self.clock.now());
        let state = match ObligationFilter::try_from(request.filter)
            .unwrap_or(ObligationFilter::Unspecified)
        {
            ObligationFilter::Unspecified => "",
            ObligationFilter::Open => "open",
            ObligationFilter::Overdue => "overdue",
        };
        let kind = MessageKind::try_from(request.kind)
            .ok()
            .filter(|k| *k != MessageKind::Unspecified)
            .map_or("", KindExt::code);
        let mut rows = sqlx::query(
            "SELECT o.*, r.kind AS referral_kind FROM obligations o
             LEFT JOIN referrals r ON r.id = o.referral_id
             WHERE o.bearer = $1 AND o.met_at IS NULL
               AND ($2 = '' OR ($2 = 'open' AND o.overdue_at IS NULL AND o.due_at > $3)
                            OR ($2 = 'overdue' AND (o.overdue_at IS NOT NULL OR o.due_at <= $3)))
               AND ($4 = '' OR o.kind = $4)
               AND ($5 = '' OR o.rule = $5)
               AND (o.due_at > $6 OR (o.due_at = $6 AND o.id > $7))
             ORDER BY o.due_at, o.id LIMIT $8",
        )
        .bind(&agency.id)
        .bind(state)
        .bind(now)
        .bind(kind)
        .bind(&request.rule)
        .bind(after_due)
        .bind(&after_id)
        .bind(i64::from(page_size) + 1)
        .fetch_all(&self.ledger.pool)
        .await
        .map_err(internal)?;
        // The page ends where the ledger's rows end, before the rows the
        // asker may not see are dropped: a page may hold fewer.
        let next_page_token = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            match rows.last() {
                Some(last) => {
                    let due: i64 = last.try_get("due_at").map_err(internal)?;
                    let id: String = last.try_get("id").map_err(internal)?;
                    format!("{due}:{id}")
                }
                None => String::new(),
            }
        } else {
            String::new()
        };
        let obligations: Vec<Obligation> = self
            .seen_by(asker, rows)
            .await?
            .iter()
            .map(|r| Self::obligation(r, self.clock.now()))
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        Ok(ListObligationsResponse {
            obligations,
            next_page_token,
        })
    }

    /// The compliance report for the agencies `asker` may see.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad period, NOT_FOUND, UNAVAILABLE.
    pub async fn report(
        &self,
        request: ComplianceReportRequest,
    ) -> Result<ComplianceReportResponse, Status> {
        let from = request
            .from
            .as_ref()
            .and_then(from_timestamp)
            .ok_or_else(|| Status::invalid_argument("from: required"))?;
        let to = request
            .to
            .as_ref()
            .and_then(from_timestamp)
            .ok_or_else(|| Status::invalid_argument("to: required"))?;
        let report = self.compile_report(&request.agency, from, to).await?;
        let rendered =
            match ReportFormat::try_from(request.format).unwrap_or(ReportFormat::Unspecified) {
                ReportFormat::Unspecified => String::new(),
                ReportFormat::Table => report.to_table(),
                ReportFormat::Csv => report.to_csv(),
                ReportFormat::Html => report.to_html(),
            };
        Ok(ComplianceReportResponse {
            rows: report
                .rows
                .iter()
                .map(|r| ComplianceRow {
                    agency: r.agency.clone(),
                    rule: r.rule.clone(),
                    count: r.count,
                    met_on_time: r.met_on_time,
                    met_late: r.met_late,
                    still_open: r.still_open,
                    overdue: r.overdue,
                    median_seconds_to_meet: r.median_to_meet.map(|d| d.num_seconds()),
                    p95_seconds_to_meet: r.p95_to_meet.map(|d| d.num_seconds()),
                })
                .collect(),
            rendered,
            out_of_order: report
                .out_of_order
                .iter()
                .map(|o| OutOfOrderService {
                    detention_centre: o.detention_centre.clone(),
                    served_id: o.served_id.clone(),
                    served_kind: kind_number(&o.served_kind),
                    served_accepted_at: Some(timestamp(o.served_accepted_at)),
                    served_at: Some(timestamp(o.served_at)),
                    overtaken_id: o.overtaken_id.clone(),
                    overtaken_kind: kind_number(&o.overtaken_kind),
                    overtaken_accepted_at: Some(timestamp(o.overtaken_accepted_at)),
                })
                .collect(),
            ratings: report
                .ratings
                .iter()
                .map(|r| CentreRating {
                    detention_centre: r.detention_centre.clone(),
                    ratings: r.count(),
                    mean_score: r.mean(),
                    by_score: r.by_score.to_vec(),
                })
                .collect(),
        })
    }

    /// The compliance report of `[from, to)` for the agencies `asker` may
    /// see, without what it may not see of leads (DZ-6, module docs).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad period, NOT_FOUND, UNAVAILABLE.
    pub async fn compile_report(
        &self,
        asker: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<report::ComplianceReport, Status> {
        let asker = self.agency(asker)?;
        if to <= from {
            return Err(Status::invalid_argument("to: must be after from"));
        }
        let visible = self.visible_agencies(&asker.id)?;
        let rows = sqlx::query(
            "SELECT o.bearer, o.rule, o.kind, o.referral_id, o.clock_started_at, o.due_at,
                    o.met_at, r.kind AS referral_kind
             FROM obligations o LEFT JOIN referrals r ON r.id = o.referral_id
             WHERE o.clock_started_at >= $1 AND o.clock_started_at < $2",
        )
        .bind(millis(from))
        .bind(millis(to))
        .fetch_all(&self.ledger.pool)
        .await
        .map_err(internal)?;
        // DZ-6: compiled without the obligations filed under leads the
        // asker is not on the route of (module documentation).
        let rows = self.seen_by(&asker.id, rows).await?;
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in &rows {
            let bearer: String = row.try_get("bearer").map_err(internal)?;
            if !visible.contains(&bearer) {
                continue;
            }
            outcomes.push(ObligationOutcome {
                agency: bearer,
                rule: row.try_get("rule").map_err(internal)?,
                clock_started_at: from_millis(row.try_get("clock_started_at").map_err(internal)?),
                due_at: from_millis(row.try_get("due_at").map_err(internal)?),
                met_at: row
                    .try_get::<Option<i64>, _>("met_at")
                    .map_err(internal)?
                    .map(from_millis),
            });
        }
        let out_of_order = self.out_of_order(&visible, from, to).await?;
        let ratings = self.ratings(&visible, from, to).await?;
        Ok(report::compile(outcomes, from, to, self.clock.now())
            .with_meetings(out_of_order, ratings))
    }

    /// CQ-1.3b: the services of `[from, to)` out of order of acceptance at
    /// the `visible` centres (module docs): for each request served in the
    /// period, every earlier-accepted request of the same centre's queue
    /// (the same order rule) still waiting when it was served.
    async fn out_of_order(
        &self,
        visible: &BTreeSet<String>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<OutOfOrder>, Status> {
        let rows: Vec<QueueRow> = sqlx::query_as(
            "SELECT q.request_id, q.centre, q.kind, q.accepted_at, q.rule,
                    (SELECT MIN(s.at) FROM centre_services s WHERE s.request_id = q.request_id
                        AND s.centre = q.centre AND s.outcome = 'held') AS served_at,
                    (SELECT MIN(s.at) FROM centre_services s WHERE s.request_id = q.request_id
                        AND s.centre = q.centre) AS closed_at
                 FROM centre_requests q
                 WHERE q.rule <> '' AND q.accepted_at < $1
                 ORDER BY q.centre, q.accepted_at, q.request_id",
        )
        .bind(millis(to))
        .fetch_all(&self.ledger.pool)
        .await
        .map_err(internal)?;
        // (centre, rule) -> the queue in order of acceptance.
        let mut queues: BTreeMap<(String, String), Vec<Queued>> = BTreeMap::new();
        for (id, centre, kind, accepted, rule, served, closed) in rows {
            if !visible.contains(&centre) {
                continue;
            }
            queues.entry((centre, rule)).or_default().push(Queued {
                id,
                kind,
                accepted,
                served,
                closed,
            });
        }
        let (from, to) = (millis(from), millis(to));
        let mut found = Vec::new();
        for ((centre, rule), queue) in &queues {
            for s in queue {
                let Some(served) = s.served.filter(|at| (from..to).contains(at)) else {
                    continue;
                };
                for e in queue.iter().take_while(|e| e.accepted < s.accepted) {
                    if e.closed.is_none_or(|closed| closed > served) {
                        found.push(OutOfOrder {
                            detention_centre: centre.clone(),
                            rule: rule.clone(),
                            served_id: s.id.clone(),
                            served_kind: s.kind.clone(),
                            served_accepted_at: from_millis(s.accepted),
                            served_at: from_millis(served),
                            overtaken_id: e.id.clone(),
                            overtaken_kind: e.kind.clone(),
                            overtaken_accepted_at: from_millis(e.accepted),
                        });
                    }
                }
            }
        }
        Ok(found)
    }

    /// CQ-3.11b: the ratings given in `[from, to)` of the `visible`
    /// centres' meetings, each counted for the centre its meeting request
    /// was addressed to.
    async fn ratings(
        &self,
        visible: &BTreeSet<String>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<CentreRatings>, Status> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT m.centre, m.score FROM meeting_ratings m
             JOIN referrals r ON r.id = m.meeting_request_id
             WHERE m.rated_at >= $1 AND m.rated_at < $2
               AND r.recipient = m.centre AND r.kind = $3",
        )
        .bind(millis(from))
        .bind(millis(to))
        .bind(MessageKind::LawyerMeetingRequest.code())
        .fetch_all(&self.ledger.pool)
        .await
        .map_err(internal)?;
        let mut by_centre: BTreeMap<String, CentreRatings> = BTreeMap::new();
        for (centre, score) in rows {
            let Some(slot) = usize::try_from(score - 1).ok().filter(|s| *s < 5) else {
                continue;
            };
            if !visible.contains(&centre) {
                continue;
            }
            by_centre
                .entry(centre.clone())
                .or_insert_with(|| CentreRatings {
                    detention_centre: centre,
                    ..CentreRatings::default()
                })
                .by_score[slot] += 1;
        }
        Ok(by_centre.into_values().collect())
    }
}

/// A `centre_requests` row with its service and closing times: (id,
/// centre, kind, accepted_at, rule, served_at, closed_at).
type QueueRow = (
    String,
    String,
    String,
    i64,
    String,
    Option<i64>,
    Option<i64>,
);

/// A request in a centre's queue (CQ-1.3b), times in epoch ms.
struct Queued {
    id: String,
    kind: String,
    accepted: i64,
    /// When the centre served it (its first feedback "held").
    served: Option<i64>,
    /// When it left the queue (served or refused).
    closed: Option<i64>,
}

/// The wire number of a kind code (unspecified when unknown).
fn kind_number(code: &str) -> i32 {
    MessageKind::from_code(code).unwrap_or(MessageKind::Unspecified) as i32
}

#[tonic::async_trait]
impl Tracker for Queries {
    async fn get_referral(
        &self,
        request: Request<GetReferralRequest>,
    ) -> Result<Response<ReferralStatus>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("agency", &r.agency)?;
        Ok(Response::new(
            self.referral(&r.agency, &r.referral_id).await?,
        ))
    }

    async fn list_obligations(
        &self,
        request: Request<ListObligationsRequest>,
    ) -> Result<Response<ListObligationsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("agency", &r.agency)?;
        Ok(Response::new(self.obligations(r).await?))
    }

    async fn compliance_report(
        &self,
        request: Request<ComplianceReportRequest>,
    ) -> Result<Response<ComplianceReportResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("agency", &r.agency)?;
        Ok(Response::new(self.report(r).await?))
    }
}
