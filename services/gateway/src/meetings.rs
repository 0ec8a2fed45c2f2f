//! CQ-1.3a-e at the centre: arranging, refusing and recording meetings and
//! interrogations, and verifying a temporarily held person's offence.
//!
//! PLACEHOLDER (issue 18, in progress): replaced before landing.

use tonic::{Request, Status};

use crate::agencies::{AgencyRpcs, Reply};
use refbus_proto::v1::{
    ArrangeMeetingRequest, RecordHeldRequest, RefuseMeetingRequest, RequestInterrogationRequest,
    VerifyOffenceRequest,
};

pub(crate) async fn arrange_meeting(_: &AgencyRpcs, _: Request<ArrangeMeetingRequest>) -> Reply {
    Err(Status::unimplemented("ArrangeMeeting"))
}

pub(crate) async fn refuse_meeting(_: &AgencyRpcs, _: Request<RefuseMeetingRequest>) -> Reply {
    Err(Status::unimplemented("RefuseMeeting"))
}

pub(crate) async fn record_held(_: &AgencyRpcs, _: Request<RecordHeldRequest>) -> Reply {
    Err(Status::unimplemented("RecordHeld"))
}

pub(crate) async fn verify_offence(_: &AgencyRpcs, _: Request<VerifyOffenceRequest>) -> Reply {
    Err(Status::unimplemented("VerifyOffence"))
}

pub(crate) async fn request_interrogation(
    _: &AgencyRpcs,
    _: Request<RequestInterrogationRequest>,
) -> Reply {
    Err(Status::unimplemented("RequestInterrogation"))
}
