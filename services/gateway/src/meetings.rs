//! CQ-1.3a-e at the centre: answering a lawyer's meeting request (arranged,
//! refused with a reason from the closed list, held), recording that an
//! interrogation took place (CQ-1.3b), asking a case unit to verify a
//! temporarily held person's offence (CQ-1.3d), and, for case units,
//! requesting an interrogation.
//!
//! Every answer is a feedback on the request as delivered, so only the
//! centre it was addressed to can give it, and it goes back to whoever
//! asked: a lawyer's answers through the lawyer service to the lawyer's
//! inbox. What meets which duty is the ledger's business (the policy
//! catalogue): "held" is the only thing that meets the 48-hour duty, or a
//! refusal whose reason the territory's policy calls lawful.

use refbus_core::policy::supervisor_of;
use refbus_core::{AgencyKind, KindExt, MessageKind, envelope};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::{
    ArrangeMeetingRequest, Envelope, Feedback, FeedbackRequest, InterrogationRequest,
    LawyerMeetingRequest, MeetingRefusal, Outcome, RecordHeldRequest, RefusalReason,
    RefuseMeetingRequest, RequestInterrogationRequest, VerificationQuery, VerifyOffenceRequest,
};
use tonic::{Request, Response, Status};

use crate::agencies::{AgencyRpcs, Reply};
use crate::auth::Caller;
use crate::letters::seal_to_lawyer;

/// The meeting request as delivered, from a request's `request` field.
fn meeting_request<'a>(
    field: &str,
    request: Option<&'a Envelope>,
) -> Result<&'a LawyerMeetingRequest, Status> {
    match request.and_then(|e| e.payload.as_ref()) {
        Some(Payload::LawyerMeetingRequest(meeting)) => Ok(meeting),
        Some(other) => Err(Status::invalid_argument(format!(
            "{field}: a {} is not a lawyer's meeting request (CQ-1.3a)",
            MessageKind::of_payload(other).code()
        ))),
        None => Err(Status::invalid_argument(format!(
            "{field}: required: the meeting request, as delivered"
        ))),
    }
}

/// The centre answers a request it received: a feedback to where its
/// answer goes (the lawyer, through the lawyer service), optionally with
/// copies to `also_to`.
async fn answer(
    rpcs: &AgencyRpcs,
    centre: String,
    request: Option<Envelope>,
    feedback: Feedback,
    idempotency_key: String,
    also_to: Vec<String>,
) -> Reply {
    let request = FeedbackRequest {
        agency: centre,
        referral: request,
        feedback: Some(feedback),
        idempotency_key,
    };
    Ok(Response::new(
        rpcs.0.feedback_also_to(request, also_to).await?,
    ))
}

fn acting_centre<T>(rpcs: &AgencyRpcs, request: &Request<T>, centre: &str) -> Result<(), Status> {
    Caller::of(request)?.acts_as("detention_centre", centre)?;
    rpcs.0.own_agency("detention_centre", centre)?;
    Ok(())
}

/// `DetentionCentre.ArrangeMeeting` (CQ-1.3a: arranged at once, the lawyer
/// told when).
pub(crate) async fn arrange_meeting(
    rpcs: &AgencyRpcs,
    request: Request<ArrangeMeetingRequest>,
) -> Reply {
    let r = request.get_ref();
    acting_centre(rpcs, &request, &r.detention_centre)?;
    meeting_request("request", r.request.as_ref())?;
    let r = request.into_inner();
    let Some(arranged_for) = r.arranged_for else {
        return Err(Status::invalid_argument(
            "arranged_for: required: when the meeting takes place (CQ-1.3a)",
        ));
    };
    if envelope::from_timestamp(&arranged_for).is_none() {
        return Err(Status::invalid_argument("arranged_for: out of range"));
    }
    let feedback = Feedback {
        outcome: Outcome::Arranged as i32,
        summary: r.note,
        arranged_for: Some(arranged_for),
        ..Feedback::default()
    };
    answer(
        rpcs,
        r.detention_centre,
        r.request,
        feedback,
        r.idempotency_key,
        Vec::new(),
    )
    .await
}

/// `DetentionCentre.RefuseMeeting` (CQ-1.3a: the lawyer told why; CQ-2.5;
/// CQ-1.3c: a written refusal sealed to the lawyer). The centre's
/// supervisor gets a copy.
pub(crate) async fn refuse_meeting(
    rpcs: &AgencyRpcs,
    request: Request<RefuseMeetingRequest>,
) -> Reply {
    let r = request.get_ref();
    acting_centre(rpcs, &request, &r.detention_centre)?;
    let core = &rpcs.0;
    let meeting = meeting_request("request", r.request.as_ref())?;
    let reason = RefusalReason::try_from(r.reason)
        .ok()
        .filter(|reason| *reason != RefusalReason::Unspecified)
        .ok_or_else(|| {
            Status::invalid_argument(
                "reason: CQ-1.3a: a reason from the closed list (RefusalReason): nothing else may be demanded (CQ-1.2)",
            )
        })?;
    let Some(centre) = core.directory.get(&r.detention_centre) else {
        return Err(Status::not_found(format!(
            "detention_centre: `{}` is not in the agency directory",
            r.detention_centre
        )));
    };
    // Which reasons the territory allows is policy (CQ-2.5: no refusal for
    // lack of a booking in Chongqing).
    core.policy
        .refusal(reason, &centre.region, &core.directory)
        .map_err(|violation| Status::invalid_argument(format!("reason: {violation}")))?;
    let writes = reason == RefusalReason::DetaineeRefusesInWriting;
    if writes && r.written_refusal.is_empty() {
        return Err(Status::invalid_argument(
            "written_refusal: required: CQ-1.3c: when the detainee refuses in writing, the written refusal goes to the lawyer",
        ));
    }
    if !writes && !r.written_refusal.is_empty() {
        return Err(Status::invalid_argument(
            "written_refusal: only with reason detainee_refuses_in_writing (CQ-1.3c)",
        ));
    }
    let licence = meeting
        .lawyer
        .as_ref()
        .map(|l| l.licence_number.clone())
        .unwrap_or_default();
    let supervisor = supervisor_of(centre, &core.directory)
        .map(|a| a.id.clone())
        .into_iter()
        .collect();
    let r = request.into_inner();
    let sealed_written_refusal = if writes {
        seal_to_lawyer(core, "request.lawyer", &licence, &r.written_refusal).await?
    } else {
        Vec::new()
    };
    let feedback = Feedback {
        outcome: Outcome::Refused as i32,
        summary: r.explanation.clone(),
        refusal: Some(MeetingRefusal {
            reason: reason as i32,
            explanation: r.explanation,
            sealed_written_refusal,
            ..MeetingRefusal::default()
        }),
        ..Feedback::default()
    };
    answer(
        rpcs,
        r.detention_centre,
        r.request,
        feedback,
        r.idempotency_key,
        supervisor,
    )
    .await
}

/// `DetentionCentre.RecordHeld` (CQ-1.3a, CQ-1.3b): the meeting or the
/// interrogation took place.
pub(crate) async fn record_held(rpcs: &AgencyRpcs, request: Request<RecordHeldRequest>) -> Reply {
    let r = request.get_ref();
    acting_centre(rpcs, &request, &r.detention_centre)?;
    match r.request.as_ref().and_then(|e| e.payload.as_ref()) {
        Some(Payload::LawyerMeetingRequest(_) | Payload::InterrogationRequest(_)) => {}
        Some(other) => {
            return Err(Status::invalid_argument(format!(
                "request: a {} is neither a meeting request nor an interrogation request (CQ-1.3b)",
                MessageKind::of_payload(other).code()
            )));
        }
        None => {
            return Err(Status::invalid_argument(
                "request: required: the meeting or interrogation request, as delivered",
            ));
        }
    }
    let r = request.into_inner();
    let feedback = Feedback {
        outcome: Outcome::Held as i32,
        summary: r.note,
        ..Feedback::default()
    };
    answer(
        rpcs,
        r.detention_centre,
        r.request,
        feedback,
        r.idempotency_key,
        Vec::new(),
    )
    .await
}

/// `DetentionCentre.VerifyOffence` (CQ-1.3d): a verification query to the
/// case unit, linked to the meeting request it holds up, which the centre
/// must have received.
pub(crate) async fn verify_offence(
    rpcs: &AgencyRpcs,
    request: Request<VerifyOffenceRequest>,
) -> Reply {
    acting_centre(rpcs, &request, &request.get_ref().detention_centre)?;
    let r = request.into_inner();
    let core = &rpcs.0;
    let meeting = meeting_request("meeting_request", r.meeting_request.as_ref())?.clone();
    let Some(delivered) = r.meeting_request.as_ref() else {
        return Err(Status::invalid_argument("meeting_request: required"));
    };
    let meeting_id = envelope::tracking_id(delivered).to_owned();
    core.check_received(
        "meeting_request.id",
        &r.detention_centre,
        &meeting_id,
        delivered,
    )
    .await?;
    let case_unit = if r.case_unit.is_empty() {
        meeting.case_unit
    } else {
        r.case_unit
    };
    if case_unit.is_empty() {
        return Err(Status::invalid_argument(
            "case_unit: required (the meeting request names none): CQ-1.3d verifies with the case unit",
        ));
    }
    if r.question.trim().is_empty() {
        return Err(Status::invalid_argument("question: required (CQ-1.3d)"));
    }
    rpcs.send(Envelope {
        sender: r.detention_centre,
        recipient: case_unit,
        idempotency_key: r.idempotency_key,
        payload: Some(Payload::VerificationQuery(VerificationQuery {
            detainee: meeting.detainee,
            case_reference: r.case_reference,
            question: r.question,
            meeting_request_id: meeting_id,
        })),
        ..Envelope::default()
    })
    .await
}

/// `CaseUnit.RequestInterrogation` (CQ-1.3b).
pub(crate) async fn request_interrogation(
    rpcs: &AgencyRpcs,
    request: Request<RequestInterrogationRequest>,
) -> Reply {
    let caller = Caller::of(&request)?;
    let r = request.into_inner();
    caller.acts_as("case_unit", &r.case_unit)?;
    let core = &rpcs.0;
    core.own_agency("case_unit", &r.case_unit)?;
    match core.directory.get(&r.detention_centre) {
        Some(a) if a.kind == AgencyKind::DetentionCentre => {}
        Some(a) => {
            return Err(Status::invalid_argument(format!(
                "detention_centre: `{}` is a {}, not a detention centre (CQ-1.3b)",
                a.id, a.kind
            )));
        }
        None if r.detention_centre.is_empty() => {
            return Err(Status::invalid_argument("detention_centre: required"));
        }
        None => {
            return Err(Status::not_found(format!(
                "detention_centre: `{}` is not in the agency directory",
                r.detention_centre
            )));
        }
    }
    let request: InterrogationRequest = r
        .request
        .ok_or_else(|| Status::invalid_argument("request: required (CQ-1.3b)"))?;
    rpcs.send(Envelope {
        sender: r.case_unit,
        recipient: r.detention_centre,
        idempotency_key: r.idempotency_key,
        payload: Some(Payload::InterrogationRequest(request)),
        ..Envelope::default()
    })
    .await
}
