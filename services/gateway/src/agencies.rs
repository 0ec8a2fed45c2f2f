//! RPCs specific to each kind of agency. Each builds an envelope (with the
//! recipient found by the routing rules where there are some) and submits it
//! through the same path as `Submit`.

use std::sync::Arc;

use refbus_core::SubmitError;
use refbus_core::routing;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{
    AnswerVerificationQueryRequest, ArrangeMeetingRequest, AssignDutyLawyerRequest,
    ChangeLawyerStatusRequest, EnterRightsComplaintRequest, Envelope, Feedback, FeedbackRequest,
    FileRightsComplaintRequest, ForwardLegalHelpRequestRequest, ForwardLetterRequest,
    LegalHelpRequest, NotifyDetaineeUnavailableRequest, NotifyJointActionRequest,
    NotifyLawyerViolationRequest, Outcome, Receipt, RecordHeldRequest, RefuseMeetingRequest,
    RegisterLawyerRequest, RegisterLawyerResponse, ReportHandlingResultRequest,
    RequestInterrogationRequest, VerifyOffenceRequest, bar_association_server, case_unit_server,
    detention_centre_server, justice_bureau_server, legal_aid_server,
};
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::{GatewayCore, GatewayError};

/// The agency-specific service of one agency service.
#[derive(Clone)]
pub struct AgencyRpcs(pub Arc<GatewayCore>);

pub(crate) type Reply = Result<Response<Receipt>, Status>;
type Registered = Result<Response<RegisterLawyerResponse>, Status>;

impl AgencyRpcs {
    pub(crate) async fn send(&self, envelope: Envelope) -> Reply {
        Ok(Response::new(self.0.submit(envelope).await?))
    }

    async fn answer(
        &self,
        agency: String,
        referral: Option<Envelope>,
        outcome: Outcome,
        summary: String,
        key: String,
    ) -> Reply {
        let feedback = FeedbackRequest {
            agency,
            referral,
            feedback: Some(Feedback {
                outcome: outcome as i32,
                summary,
                ..Feedback::default()
            }),
            idempotency_key: key,
        };
        Ok(Response::new(self.0.feedback(feedback).await?))
    }

    pub(crate) fn routed(
        result: Result<&refbus_core::Agency, routing::NoRoute>,
    ) -> Result<String, Status> {
        result
            .map(|a| a.id.clone())
            .map_err(|e| Status::from(GatewayError::Submit(SubmitError::NoRoute(e))))
    }
}

#[tonic::async_trait]
impl detention_centre_server::DetentionCentre for AgencyRpcs {
    async fn forward_legal_help_request(
        &self,
        request: Request<ForwardLegalHelpRequestRequest>,
    ) -> Reply {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("detention_centre", &r.detention_centre)?;
        self.0.own_agency("detention_centre", &r.detention_centre)?;
        let recipient = Self::routed(routing::legal_help_recipient(
            &self.0.directory,
            &r.detention_centre,
        ))?;
        self.send(Envelope {
            sender: r.detention_centre.clone(),
            recipient,
            clock_started_at: r.requested_at,
            idempotency_key: r.idempotency_key,
            payload: Some(Payload::LegalHelpRequest(LegalHelpRequest {
                detainee: r.detainee,
                detention_centre: r.detention_centre,
                matter: r.matter,
            })),
            ..Envelope::default()
        })
        .await
    }

    async fn notify_lawyer_violation(
        &self,
        request: Request<NotifyLawyerViolationRequest>,
    ) -> Reply {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("detention_centre", &r.detention_centre)?;
        self.0.own_agency("detention_centre", &r.detention_centre)?;
        let recipient = Self::routed(routing::violation_recipient(
            &self.0.directory,
            &r.detention_centre,
        ))?;
        let Some(notice) = r.notice else {
            return Err(Status::invalid_argument("notice: required"));
        };
        self.send(Envelope {
            sender: r.detention_centre,
            recipient,
            clock_started_at: notice.occurred_at,
            idempotency_key: r.idempotency_key,
            payload: Some(Payload::LawyerViolationNotice(notice)),
            ..Envelope::default()
        })
        .await
    }

    async fn notify_joint_action(&self, request: Request<NotifyJointActionRequest>) -> Reply {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("detention_centre", &r.detention_centre)?;
        self.0.own_agency("detention_centre", &r.detention_centre)?;
        let [police, bureau, bar] =
            routing::joint_notice_recipients(&self.0.directory, &r.detention_centre)
                .map_err(|e| Status::from(GatewayError::Submit(SubmitError::NoRoute(e))))?;
        let Some(notice) = r.notice else {
            return Err(Status::invalid_argument("notice: required (CQ-3.15)"));
        };
        self.send(Envelope {
            sender: r.detention_centre,
            recipient: police.id.clone(),
            also_to: vec![bureau.id.clone(), bar.id.clone()],
            idempotency_key: r.idempotency_key,
            payload: Some(Payload::JointNotice(notice)),
            ..Envelope::default()
        })
        .await
    }

    async fn forward_letter(&self, request: Request<ForwardLetterRequest>) -> Reply {
        crate::letters::forward_letter(self, request).await
    }

    async fn arrange_meeting(&self, request: Request<ArrangeMeetingRequest>) -> Reply {
        crate::meetings::arrange_meeting(self, request).await
    }

    async fn refuse_meeting(&self, request: Request<RefuseMeetingRequest>) -> Reply {
        crate::meetings::refuse_meeting(self, request).await
    }

    async fn record_held(&self, request: Request<RecordHeldRequest>) -> Reply {
        crate::meetings::record_held(self, request).await
    }

    async fn verify_offence(&self, request: Request<VerifyOffenceRequest>) -> Reply {
        crate::meetings::verify_offence(self, request).await
    }

    async fn notify_detainee_unavailable(
        &self,
        request: Request<NotifyDetaineeUnavailableRequest>,
    ) -> Reply {
        crate::letters::notify_detainee_unavailable(self, request).await
    }
}

#[tonic::async_trait]
impl case_unit_server::CaseUnit for AgencyRpcs {
    async fn answer_verification_query(
        &self,
        request: Request<AnswerVerificationQueryRequest>,
    ) -> Reply {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("case_unit", &r.case_unit)?;
        if r.answer.trim().is_empty() {
            return Err(Status::invalid_argument("answer: required (CQ-1.3d)"));
        }
        self.answer(
            r.case_unit,
            r.query,
            Outcome::Done,
            r.answer,
            r.idempotency_key,
        )
        .await
    }

    async fn request_interrogation(&self, request: Request<RequestInterrogationRequest>) -> Reply {
        crate::meetings::request_interrogation(self, request).await
    }

    async fn enter_rights_complaint(&self, request: Request<EnterRightsComplaintRequest>) -> Reply {
        crate::registry::enter_rights_complaint(self, request).await
    }
}

#[tonic::async_trait]
impl legal_aid_server::LegalAid for AgencyRpcs {
    async fn assign_duty_lawyer(&self, request: Request<AssignDutyLawyerRequest>) -> Reply {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("agency", &r.agency)?;
        let Some(lawyer) = r.lawyer.filter(|l| !l.name.trim().is_empty()) else {
            return Err(Status::invalid_argument("lawyer.name: required (CQ-1.1b)"));
        };
        let summary = format!(
            "duty lawyer {} ({}) assigned",
            lawyer.name, lawyer.licence_number
        );
        self.answer(
            r.agency,
            r.request,
            Outcome::LawyerAssigned,
            summary,
            r.idempotency_key,
        )
        .await
    }
}

#[tonic::async_trait]
impl justice_bureau_server::JusticeBureau for AgencyRpcs {
    async fn report_handling_result(&self, request: Request<ReportHandlingResultRequest>) -> Reply {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("justice_bureau", &r.justice_bureau)?;
        let outcome = Outcome::try_from(r.outcome)
            .ok()
            .filter(|o| *o != Outcome::Unspecified)
            .ok_or_else(|| {
                Status::invalid_argument(
                    "outcome: required (CQ-3.14: the justice bureau feeds back its result)",
                )
            })?;
        self.answer(
            r.justice_bureau,
            r.referral,
            outcome,
            r.summary,
            r.idempotency_key,
        )
        .await
    }

    async fn register_lawyer(&self, request: Request<RegisterLawyerRequest>) -> Registered {
        crate::registry::register_lawyer(self, request).await
    }

    async fn suspend_lawyer(&self, request: Request<ChangeLawyerStatusRequest>) -> Reply {
        crate::registry::change_status(self, request, false).await
    }

    async fn reinstate_lawyer(&self, request: Request<ChangeLawyerStatusRequest>) -> Reply {
        crate::registry::change_status(self, request, true).await
    }

    async fn enter_rights_complaint(&self, request: Request<EnterRightsComplaintRequest>) -> Reply {
        crate::registry::enter_rights_complaint(self, request).await
    }
}

#[tonic::async_trait]
impl bar_association_server::BarAssociation for AgencyRpcs {
    async fn file_rights_complaint(&self, request: Request<FileRightsComplaintRequest>) -> Reply {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.acts_as("bar_association", &r.bar_association)?;
        let Some(complaint) = r.complaint else {
            return Err(Status::invalid_argument("complaint: required"));
        };
        self.send(Envelope {
            sender: r.bar_association,
            recipient: r.investigated_by,
            idempotency_key: r.idempotency_key,
            payload: Some(Payload::RightsComplaint(complaint)),
            ..Envelope::default()
        })
        .await
    }

    async fn register_lawyer(&self, request: Request<RegisterLawyerRequest>) -> Registered {
        crate::registry::register_lawyer(self, request).await
    }

    async fn suspend_lawyer(&self, request: Request<ChangeLawyerStatusRequest>) -> Reply {
        crate::registry::change_status(self, request, false).await
    }

    async fn reinstate_lawyer(&self, request: Request<ChangeLawyerStatusRequest>) -> Reply {
        crate::registry::change_status(self, request, true).await
    }
}
