//! Which lawyer is calling: the bearer token issued at registration
//! (`authorization: Bearer <token>`, of which the register holds only the
//! SHA-256), or, under mutual TLS, a client certificate whose URI subject
//! alternative name is `urn:refbus:lawyer:<licence number>`. Agencies
//! authenticate with [`crate::auth`]; lawyers are no agencies and are
//! checked against the register on every call (a suspended lawyer is
//! refused from the moment the suspension is applied).

use tonic::Request;

use super::LawyerError;

/// The prefix of the URI subject alternative name that names a lawyer.
pub const LAWYER_URI_PREFIX: &str = "urn:refbus:lawyer:";

/// What a caller shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// The hex SHA-256 (lower case) of the bearer token shown.
    Token(String),
    /// The licence a client certificate names.
    Certificate(String),
}

/// Hex SHA-256 of a bearer token, as registrations carry it: the
/// register's own ([`crate::registry::token_sha256`]), so that what the
/// register issues and what the lawyer service checks are one digest.
pub use crate::registry::token_sha256;

/// The credential a request carries.
///
/// # Errors
/// [`LawyerError::Unauthenticated`] when it carries none, or a malformed one.
pub fn credential_of<T>(request: &Request<T>) -> Result<Credential, LawyerError> {
    if let Some(header) = request.metadata().get("authorization") {
        let header = header
            .to_str()
            .map_err(|_| LawyerError::Unauthenticated("authorization: not ASCII".into()))?;
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            LawyerError::Unauthenticated("authorization: expected `Bearer <token>`".into())
        })?;
        return Ok(Credential::Token(token_sha256(token.trim())));
    }
    if let Some(leaf) = request.peer_certs().as_deref().and_then(|c| c.first()) {
        match lawyer_of_certificate(leaf.as_ref()) {
            Ok(Some(licence)) => return Ok(Credential::Certificate(licence)),
            Ok(None) => {}
            Err(reason) => return Err(LawyerError::Unauthenticated(reason)),
        }
    }
    Err(LawyerError::Unauthenticated(format!(
        "authorization: required (`Bearer <token>` issued at the lawyer's registration), or a client certificate naming `{LAWYER_URI_PREFIX}<licence number>`"
    )))
}

/// The licence a client certificate (DER) names, if it names a lawyer.
///
/// # Errors
/// A reason, when the certificate does not parse or names several lawyers.
pub fn lawyer_of_certificate(der: &[u8]) -> Result<Option<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("client certificate: subject alternative name: {e}"))?;
    let lawyers: Vec<&str> = names
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(LAWYER_URI_PREFIX),
            _ => None,
        })
        .collect();
    match lawyers.as_slice() {
        [] => Ok(None),
        [licence] => Ok(Some((*licence).to_owned())),
        _ => Err("the client certificate names more than one lawyer".into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_by_their_digest_and_nothing_is_no_credential() {
        let mut request = Request::new(());
        assert!(matches!(
            credential_of(&request),
            Err(LawyerError::Unauthenticated(_))
        ));
        request
            .metadata_mut()
            .insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(
            credential_of(&request).ok(),
            Some(Credential::Token(token_sha256("abc")))
        );
        assert_eq!(token_sha256("abc").len(), 64);
        assert!(lawyer_of_certificate(b"not a certificate").is_err());
    }
}
