//! Lawyers' registration at their bar association or justice bureau, and
//! the client of the lawyer service's public register.
//!
//! PLACEHOLDER (issue 18, in progress): replaced before landing.

use tonic::{Request, Response, Status};

use crate::agencies::{AgencyRpcs, Reply};
use refbus_proto::v1::{
    ChangeLawyerStatusRequest, EnterRightsComplaintRequest, RegisterLawyerRequest,
    RegisterLawyerResponse,
};

pub(crate) async fn register_lawyer(
    _: &AgencyRpcs,
    _: Request<RegisterLawyerRequest>,
) -> Result<Response<RegisterLawyerResponse>, Status> {
    Err(Status::unimplemented("RegisterLawyer"))
}

pub(crate) async fn change_status(
    _: &AgencyRpcs,
    _: Request<ChangeLawyerStatusRequest>,
    _reinstate: bool,
) -> Reply {
    Err(Status::unimplemented("SuspendLawyer / ReinstateLawyer"))
}

pub(crate) async fn enter_rights_complaint(
    _: &AgencyRpcs,
    _: Request<EnterRightsComplaintRequest>,
) -> Reply {
    Err(Status::unimplemented("EnterRightsComplaint"))
}
