//! The tracker's gRPC queries: a referral's status and timeline, an
//! agency's open and overdue obligations, and the compliance report
//! (CQ-3.11). An agency reads only referrals it is a party to; a justice
//! bureau reads the metadata, never the payload, of its region's referrals.

use refbus_gateway::auth::Caller;
use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine;
use chrono::{DateTime, Utc};
use prost::Message;
use refbus_core::envelope::{from_timestamp, timestamp};
use refbus_core::report::{self, ObligationOutcome};
use refbus_core::{AgencyKind, Directory, KindExt, Level, MessageKind};
use refbus_proto::v1::tracker_server::Tracker;
use refbus_proto::v1::{
    ComplianceReportRequest, ComplianceReportResponse, ComplianceRow, Envelope, GetReferralRequest,
    ListObligationsRequest, ListObligationsResponse, Obligation, ObligationFilter, ObligationState,
    ReferralStatus, ReportFormat, TimelineEntry,
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

    /// A referral's status for `asker`.
    ///
    /// # Errors
    /// NOT_FOUND, PERMISSION_DENIED, or UNAVAILABLE when the ledger is.
    pub async fn referral(&self, asker: &str, id: &str) -> Result<ReferralStatus, Status> {
        let asker = self.agency(asker)?;
        let row = sqlx::query("SELECT * FROM referrals WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.ledger.pool)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                Status::not_found(format!("referral_id: no referral `{id}` in the ledger"))
            })?;
        let sender: String = row.try_get("sender").map_err(internal)?;
        let recipient: String = row.try_get("recipient").map_err(internal)?;
        let hops =
            sqlx::query("SELECT hop, agency, at FROM hops WHERE referral_id = $1 ORDER BY at, hop")
                .bind(id)
                .fetch_all(&self.ledger.pool)
                .await
                .map_err(internal)?;
        let obligations =
            sqlx::query("SELECT * FROM obligations WHERE referral_id = $1 ORDER BY due_at, id")
                .bind(id)
                .fetch_all(&self.ledger.pool)
                .await
                .map_err(internal)?;

        let party = sender == asker.id
            || recipient == asker.id
            || hops.iter().any(|h| {
                h.try_get::<String, _>("agency")
                    .is_ok_and(|a| a == asker.id)
            })
            || obligations.iter().any(|o| {
                o.try_get::<String, _>("bearer")
                    .is_ok_and(|a| a == asker.id)
            });
        let kind: String = row.try_get("kind").map_err(internal)?;
        let sight = if party {
            Sight::Whole
        } else if self.is_lead_traffic(&kind, &row).await? {
            // Misconduct leads are visible only to the agencies on their
            // route (DOMAIN.md, Confidentiality): not even to a supervisor.
            return Err(Status::permission_denied(format!(
                "`{}` is not on the route of misconduct lead `{id}` (DZ-6: a lead is seen only by the agencies on its route)",
                asker.id
            )));
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

        let now = self.clock.now();
        let envelope = if sight == Sight::Whole {
            let encoded: String = row.try_get("envelope").map_err(internal)?;
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()
                .and_then(|bytes| Envelope::decode(bytes.as_slice()).ok())
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
        })
    }

    /// An agency's open and/or overdue obligations, paged by due time.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad page token, NOT_FOUND, UNAVAILABLE.
    pub async fn obligations(
        &self,
        request: ListObligationsRequest,
    ) -> Result<ListObligationsResponse, Status> {
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
        let rows = sqlx::query(
            "SELECT * FROM obligations
             WHERE bearer = $1 AND met_at IS NULL
               AND ($2 = '' OR ($2 = 'open' AND overdue_at IS NULL AND due_at > $3)
                            OR ($2 = 'overdue' AND (overdue_at IS NOT NULL OR due_at <= $3)))
               AND ($4 = '' OR kind = $4)
               AND ($5 = '' OR rule = $5)
               AND (due_at > $6 OR (due_at = $6 AND id > $7))
             ORDER BY due_at, id LIMIT $8",
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
        let mut obligations: Vec<Obligation> = rows
            .iter()
            .map(|r| Self::obligation(r, self.clock.now()))
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        let next_page_token = if obligations.len() > page_size as usize {
            obligations.truncate(page_size as usize);
            obligations
                .last()
                .and_then(|o| {
                    Some(format!(
                        "{}:{}",
                        from_timestamp(o.due_at.as_ref()?)?.timestamp_millis(),
                        o.id
                    ))
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
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
        let asker = self.agency(&request.agency)?;
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
        if to <= from {
            return Err(Status::invalid_argument("to: must be after from"));
        }
        let visible = self.visible_agencies(&asker.id)?;
        let rows = sqlx::query(
            "SELECT bearer, rule, clock_started_at, due_at, met_at FROM obligations
             WHERE clock_started_at >= $1 AND clock_started_at < $2",
        )
        .bind(millis(from))
        .bind(millis(to))
        .fetch_all(&self.ledger.pool)
        .await
        .map_err(internal)?;
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
        let report = report::compile(outcomes, from, to, self.clock.now());
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
        })
    }
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
