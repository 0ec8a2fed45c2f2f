//! CQ-1.1c and SH-2.5 at the centre: what a detention centre sends to a
//! lawyer, addressed by practice licence number through the lawyer service.
//!
//! A detainee's letter is sealed here, in the centre's own service, to the
//! addressed lawyer's letter keys in the age format (age-encryption.org/v1,
//! X25519), before anything is published: the broker, the lawyer service,
//! the tracker, the dead-letter queue and every log see only ciphertext
//! (DOMAIN.md, Confidentiality: "whatever carries or records it on the way
//! holds no readable copy"). The keys come from the register, checked
//! against the registrar's signature ([`crate::registry::LawyerRegister`]).
//! The plaintext lives only in this request's memory and is never logged.
//!
//! A withheld letter travels as a notice without content, with its ground.

use std::io::Write;
use std::str::FromStr;

use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::forward_letter_request::Disposition as Requested;
use refbus_proto::v1::letter::Disposition;
use refbus_proto::v1::{
    Envelope, ForwardLetterRequest, Letter, NotifyDetaineeUnavailableRequest, WithholdingGround,
};
use tonic::{Request, Status};

use crate::GatewayCore;
use crate::GatewayError;
use crate::agencies::{AgencyRpcs, Reply};
use crate::auth::Caller;

/// Why a text could not be sealed to a lawyer.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The register holds no key for the lawyer.
    #[error("the lawyer has no letter key in the register")]
    NoKeys,
    /// A key in the register is not an age X25519 public key.
    #[error("letter key {index} in the register is not an age X25519 public key")]
    BadKey { index: usize },
    /// The age encryptor failed (it writes to memory only).
    #[error("sealing failed: {0}")]
    Seal(String),
}

/// Seals `plaintext` to every key in `letter_keys` (age X25519 recipients,
/// "age1…"): any one of the lawyer's identities opens it, nobody else's.
///
/// # Errors
/// [`SealError`] when there is no key, a key does not parse, or age fails.
pub fn seal(letter_keys: &[String], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    if letter_keys.is_empty() {
        return Err(SealError::NoKeys);
    }
    let recipients = letter_keys
        .iter()
        .enumerate()
        .map(|(index, key)| {
            age::x25519::Recipient::from_str(key).map_err(|_| SealError::BadKey { index })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| SealError::Seal(e.to_string()))?;
    let mut sealed = Vec::with_capacity(plaintext.len() + 256);
    let mut writer = encryptor
        .wrap_output(&mut sealed)
        .map_err(|e| SealError::Seal(e.to_string()))?;
    writer
        .write_all(plaintext)
        .map_err(|e| SealError::Seal(e.to_string()))?;
    writer
        .finish()
        .map_err(|e| SealError::Seal(e.to_string()))?;
    Ok(sealed)
}

/// Seals `plaintext` to the lawyer with `licence`, as the register has them.
///
/// # Errors
/// NOT_FOUND for a licence nobody registered; UNAVAILABLE when the register
/// cannot be reached; INTERNAL when the register's keys cannot be used.
pub(crate) async fn seal_to_lawyer(
    core: &GatewayCore,
    field: &'static str,
    licence: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, Status> {
    let lawyer = core.lawyers.get(field, licence).await?;
    seal(&lawyer.letter_keys, plaintext).map_err(|e| {
        Status::internal(format!(
            "{field}: cannot seal to lawyer `{licence}`: {e}; nothing was published"
        ))
    })
}

/// The lawyer service's agency id: where every message to a lawyer goes.
///
/// # Errors
/// FAILED_PRECONDITION when the directory has no lawyer service.
fn lawyer_service(core: &GatewayCore) -> Result<String, Status> {
    core.lawyer_service().map(str::to_owned).ok_or_else(|| {
        Status::failed_precondition(
            "the agency directory has no lawyer service (kind lawyer_service): lawyers cannot be reached",
        )
    })
}

/// Seals a letter submitted with its content (`Submit` from a centre's own
/// system) before it is validated and published: the same as
/// `ForwardLetter`, so that no path publishes a readable letter.
///
/// # Errors
/// As [`seal_to_lawyer`].
pub(crate) async fn seal_submitted_letter(
    core: &GatewayCore,
    envelope: &mut Envelope,
) -> Result<(), Status> {
    let Some(Payload::Letter(letter)) = envelope.payload.as_mut() else {
        return Ok(());
    };
    if !matches!(letter.disposition, Some(Disposition::Content(_))) {
        return Ok(());
    }
    let licence = letter
        .addressee
        .as_ref()
        .map(|l| l.licence_number.clone())
        .unwrap_or_default();
    refbus_core::lawyer::check_licence("letter.addressee.licence_number", &licence)
        .map_err(GatewayError::from)?;
    let Some(Disposition::Content(content)) = letter.disposition.take() else {
        return Ok(());
    };
    let sealed =
        seal_to_lawyer(core, "letter.addressee.licence_number", &licence, &content).await?;
    letter.disposition = Some(Disposition::SealedContent(sealed));
    if envelope.to_lawyers.is_empty() {
        envelope.to_lawyers = vec![licence];
    }
    Ok(())
}

/// Checks that every lawyer an envelope is addressed to is registered: the
/// agencies' systems address lawyers by licence number, and a licence
/// nobody registered is NOT_FOUND before anything is published.
///
/// # Errors
/// NOT_FOUND naming the licence; UNAVAILABLE when the register cannot be
/// reached.
pub(crate) async fn check_registered(
    core: &GatewayCore,
    envelope: &Envelope,
) -> Result<(), Status> {
    for (i, licence) in envelope.to_lawyers.iter().enumerate() {
        refbus_core::lawyer::check_licence(&format!("envelope.to_lawyers[{i}]"), licence)
            .map_err(GatewayError::from)?;
        core.lawyers.get("envelope.to_lawyers", licence).await?;
    }
    Ok(())
}

/// `DetentionCentre.ForwardLetter` (CQ-1.1c).
pub(crate) async fn forward_letter(
    rpcs: &AgencyRpcs,
    request: Request<ForwardLetterRequest>,
) -> Reply {
    let caller = Caller::of(&request)?;
    let r = request.into_inner();
    caller.acts_as("detention_centre", &r.detention_centre)?;
    let core = &rpcs.0;
    core.own_agency("detention_centre", &r.detention_centre)?;
    refbus_core::lawyer::check_licence("lawyer_licence", &r.lawyer_licence)
        .map_err(GatewayError::from)?;
    let disposition = match r.disposition {
        None => {
            return Err(Status::invalid_argument(
                "disposition: required: the letter's content, or the ground it was withheld on (CQ-1.1c)",
            ));
        }
        Some(Requested::Content(content)) => {
            if content.is_empty() {
                return Err(Status::invalid_argument(
                    "content: empty: a letter has content, or is withheld on a ground (CQ-1.1c)",
                ));
            }
            Disposition::SealedContent(
                seal_to_lawyer(core, "lawyer_licence", &r.lawyer_licence, &content).await?,
            )
        }
        Some(Requested::WithheldOn(ground)) => {
            if ground <= 0 || WithholdingGround::try_from(ground).is_err() {
                return Err(Status::invalid_argument(
                    "withheld_on: CQ-1.1c: a letter may be withheld only on national security, public safety, serious danger to a person, or collusion/destruction of evidence",
                ));
            }
            Disposition::WithheldOn(ground)
        }
    };
    // The addressee as the register has them (also for a withheld letter:
    // the notice goes to a registered lawyer, NOT_FOUND otherwise).
    let lawyer = core
        .lawyers
        .get("lawyer_licence", &r.lawyer_licence)
        .await?;
    rpcs.send(Envelope {
        sender: r.detention_centre,
        recipient: lawyer_service(core)?,
        to_lawyers: vec![r.lawyer_licence],
        clock_started_at: r.handed_over_at,
        idempotency_key: r.idempotency_key,
        payload: Some(Payload::Letter(Letter {
            detainee: r.detainee,
            addressee: Some(lawyer.lawyer),
            disposition: Some(disposition),
        })),
        ..Envelope::default()
    })
    .await
}

/// `DetentionCentre.NotifyDetaineeUnavailable` (SH-2.5): to each lawyer
/// concerned, by licence number, every one registered.
pub(crate) async fn notify_detainee_unavailable(
    rpcs: &AgencyRpcs,
    request: Request<NotifyDetaineeUnavailableRequest>,
) -> Reply {
    let caller = Caller::of(&request)?;
    let r = request.into_inner();
    caller.acts_as("detention_centre", &r.detention_centre)?;
    let core = &rpcs.0;
    core.own_agency("detention_centre", &r.detention_centre)?;
    let Some(notice) = r.notice else {
        return Err(Status::invalid_argument("notice: required (SH-2.5)"));
    };
    if r.lawyer_licences.is_empty() {
        return Err(Status::invalid_argument(
            "lawyer_licences: required: SH-2.5 notifies the lawyers concerned, by licence number",
        ));
    }
    for (i, licence) in r.lawyer_licences.iter().enumerate() {
        let field = "lawyer_licences";
        refbus_core::lawyer::check_licence(&format!("lawyer_licences[{i}]"), licence)
            .map_err(GatewayError::from)?;
        core.lawyers.get(field, licence).await?;
    }
    rpcs.send(Envelope {
        sender: r.detention_centre,
        recipient: lawyer_service(core)?,
        to_lawyers: r.lawyer_licences,
        idempotency_key: r.idempotency_key,
        payload: Some(Payload::DetaineeUnavailableNotice(notice)),
        ..Envelope::default()
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn open(sealed: &[u8], identity: &age::x25519::Identity) -> Option<Vec<u8>> {
        let decryptor = age::Decryptor::new(sealed).ok()?;
        let mut reader = decryptor
            .decrypt(std::iter::once(identity as &dyn age::Identity))
            .ok()?;
        let mut out = Vec::new();
        reader.read_to_end(&mut out).ok()?;
        Some(out)
    }

    #[test]
    fn cq_1_1c_a_sealed_letter_opens_only_with_one_of_its_lawyers_keys() {
        let laptop = age::x25519::Identity::generate();
        let phone = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let keys = vec![
            laptop.to_public().to_string(),
            phone.to_public().to_string(),
        ];
        let letter = "律师您好，我想更换辩护人".as_bytes();
        let sealed = seal(&keys, letter).unwrap();
        assert!(sealed.starts_with(refbus_core::envelope::AGE_MAGIC));
        assert!(
            !sealed.windows(letter.len()).any(|w| w == letter),
            "no readable copy"
        );
        assert_eq!(open(&sealed, &laptop).as_deref(), Some(letter));
        assert_eq!(open(&sealed, &phone).as_deref(), Some(letter));
        assert_eq!(open(&sealed, &other), None, "another lawyer cannot open it");
    }

    #[test]
    fn no_key_or_a_bad_key_seals_nothing() {
        assert!(matches!(seal(&[], b"x"), Err(SealError::NoKeys)));
        assert!(matches!(
            seal(&["age1nope".into()], b"x"),
            Err(SealError::BadKey { index: 0 })
        ));
    }
}
