//! The gateway's errors, mapped to gRPC status codes in one place.

use refbus_bus::BusError;
use refbus_core::SubmitError;
use refbus_core::lead::LeadError;
use refbus_core::rules::RuleViolation;
use tonic::Status;

/// Everything a gateway call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A delivery token that is not (or no longer) pending on an open stream.
    #[error("delivery_token: {0}")]
    DeliveryGone(String),
    /// A reply to a referral the replying agency never received (or that
    /// does not exist: the answer is the same, so that no reply reveals a
    /// referral's existence).
    #[error(
        "{field}: referral `{referral}` was not delivered to `{agency}`; a reply (acknowledgement, feedback, relay) counts only from an agency the referral was delivered to (DOMAIN.md, Confidentiality; DZ-6 for misconduct leads)"
    )]
    NotReceived {
        field: &'static str,
        agency: String,
        referral: String,
    },
    /// A request field that is missing or malformed (outside an envelope).
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// This service holds no signing key for the agency (ruled out at start-up).
    #[error(transparent)]
    Signing(#[from] refbus_core::signing::KeyError),
    /// A licence number nobody registered on the bus.
    #[error("{field}: lawyer `{licence}` is not registered on the bus")]
    LawyerNotRegistered {
        field: &'static str,
        licence: String,
    },
    /// The lawyer service's register cannot be asked.
    #[error("the lawyer register cannot be reached ({0}); nothing was published")]
    RegisterUnavailable(String),
    /// The register's entry does not hold up against its registrar's
    /// signature: its word alone decides nothing.
    #[error(
        "lawyer `{licence}`: the register's entry cannot be believed: {reason}; nothing was published"
    )]
    RegisterUntrusted { licence: String, reason: String },
}

impl From<RuleViolation> for GatewayError {
    fn from(violation: RuleViolation) -> Self {
        GatewayError::Submit(SubmitError::Forbidden(violation))
    }
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        let message = error.to_string();
        match error {
            GatewayError::Submit(e) => match e {
                SubmitError::Invalid { .. } | SubmitError::TooLarge { .. } => {
                    Status::invalid_argument(message)
                }
                SubmitError::UnknownAgency { .. } => Status::not_found(message),
                SubmitError::NotOwnAgency { .. } | SubmitError::Forbidden(_) => {
                    Status::permission_denied(message)
                }
                SubmitError::NoRoute(_) | SubmitError::Lead(LeadError::NoStatutoryRoute { .. }) => {
                    Status::failed_precondition(message)
                }
                SubmitError::Lead(LeadError::Invalid { .. }) => Status::invalid_argument(message),
            },
            GatewayError::Bus(e) => match e {
                BusError::Unroutable { .. } => Status::internal(message),
                BusError::Unavailable(_)
                | BusError::Nacked
                | BusError::Topology { .. }
                | BusError::Connect { .. } => Status::unavailable(message),
            },
            GatewayError::DeliveryGone(_) => Status::failed_precondition(message),
            GatewayError::NotReceived { .. } => Status::not_found(message),
            GatewayError::Invalid { .. } => Status::invalid_argument(message),
            GatewayError::Signing(_) => Status::internal(message),
            GatewayError::LawyerNotRegistered { .. } => Status::not_found(message),
            GatewayError::RegisterUnavailable(_) => Status::unavailable(message),
            GatewayError::RegisterUntrusted { .. } => Status::failed_precondition(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_maps_to_its_code_and_keeps_its_message() {
        let s = Status::from(GatewayError::Submit(SubmitError::invalid(
            "envelope.sender",
            "required",
        )));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "envelope.sender: required")
        );
        let s = Status::from(GatewayError::Submit(SubmitError::UnknownAgency {
            field: "envelope.recipient".into(),
            id: "x".into(),
        }));
        assert_eq!(s.code(), Code::NotFound);
        let s = Status::from(GatewayError::Bus(BusError::Unavailable("down".into())));
        assert_eq!(s.code(), Code::Unavailable);
        let s = Status::from(GatewayError::LawyerNotRegistered {
            field: "complaint.complainant.licence_number",
            licence: "15001201910123456".into(),
        });
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::NotFound,
                "complaint.complainant.licence_number: lawyer `15001201910123456` is not registered on the bus"
            )
        );
    }
}
