//! CQ-1.1c and SH-2.5 at the centre: a detainee's letter sealed to the
//! addressed lawyer's keys (age) before anything is published, and notices
//! to lawyers by licence number.
//!
//! PLACEHOLDER (issue 18, in progress): replaced before landing.

use tonic::{Request, Status};

use crate::agencies::{AgencyRpcs, Reply};
use refbus_proto::v1::{ForwardLetterRequest, NotifyDetaineeUnavailableRequest};

pub(crate) async fn forward_letter(_: &AgencyRpcs, _: Request<ForwardLetterRequest>) -> Reply {
    Err(Status::unimplemented("ForwardLetter"))
}

pub(crate) async fn notify_detainee_unavailable(
    _: &AgencyRpcs,
    _: Request<NotifyDetaineeUnavailableRequest>,
) -> Reply {
    Err(Status::unimplemented("NotifyDetaineeUnavailable"))
}
