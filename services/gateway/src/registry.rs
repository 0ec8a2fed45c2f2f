//! Lawyers' registration at their bar association or justice bureau, and
//! the client of the lawyer service's public register (DOMAIN.md, "Lawyers
//! are participants too").
//!
//! A bar association or justice bureau registers, suspends and reinstates
//! the lawyers of its region (or of one of its districts): each is a
//! `LawyerRegistration` it signs and sends to the lawyer service, which
//! keeps the register. The bearer token a registration issues is shown once,
//! to the registrar; only its SHA-256 travels. A body that took a lawyer's
//! rights complaint at its own window enters it here too (CQ-3.13).
//!
//! [`LawyerRegister`] asks the lawyer service for a lawyer, and believes the
//! answer only as far as the registrar's signature carries it: the keys a
//! letter is sealed to (CQ-1.1c) are those the registrar signed, never the
//! lawyer service's word alone.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use prost::Message;
use refbus_core::directory::Agency;
use refbus_core::lawyer::check_licence;
use refbus_core::rules::{self, RuleViolation};
use refbus_core::signing::{self, Signed, SigningKeys};
use refbus_core::{AgencyKind, Directory, Level, MessageKind, SubmitError};
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::lawyer_registry_client::LawyerRegistryClient;
use refbus_proto::v1::{
    ChangeLawyerStatusRequest, EnterRightsComplaintRequest, Envelope, GetLawyerRequest, Lawyer,
    LawyerEntry, LawyerRegistration, LawyerStatus, RegisterLawyerRequest, RegisterLawyerResponse,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::agencies::{AgencyRpcs, Reply};
use crate::auth::Caller;
use crate::settings::LawyerServiceSettings;
use crate::{GatewayCore, GatewayError};

/// The rule id of registration errors (rules.rs names it so too).
const RULE: &str = "registry";

/// The most letter keys one lawyer registers (one per device they read on).
pub const MAX_LETTER_KEYS: usize = 16;

/// What a registration token starts with: recognisable in a leaked log or
/// a secret scanner.
pub const TOKEN_PREFIX: &str = "rbl_";

/// How long a call to the register may take before UNAVAILABLE.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// A lawyer as the register has them, checked against the registrar's signature.
#[derive(Clone, Debug, PartialEq)]
pub struct RegisteredLawyer {
    /// Name, licence number and law firm, as the registrar signed them.
    pub lawyer: Lawyer,
    /// The lawyer's region, as the registrar signed it.
    pub region: String,
    /// The age X25519 recipients letters are sealed to: the registrar's
    /// signed ones (the register's copy must be the same).
    pub letter_keys: Vec<String>,
    /// Active or suspended, as the register says now.
    pub status: LawyerStatus,
    /// The bar association or justice bureau whose signature was checked.
    pub registered_by: String,
}

/// The lawyer service's public register (`LawyerRegistry`), connected lazily.
#[derive(Clone)]
pub struct LawyerRegister {
    client: LawyerRegistryClient<Channel>,
    directory: Arc<Directory>,
    /// Where it is, for error messages.
    url: String,
}

impl std::fmt::Debug for LawyerRegister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LawyerRegister")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl LawyerRegister {
    /// A client of the register at `settings.url` (TLS for `https://`, with
    /// `settings.ca`); nothing is connected until the first call.
    ///
    /// # Errors
    /// A message naming what is wrong with the settings.
    pub fn connect(
        settings: &LawyerServiceSettings,
        directory: &Arc<Directory>,
    ) -> Result<Self, String> {
        let mut endpoint = Endpoint::from_shared(settings.url.clone())
            .map_err(|e| format!("`{}` is not a URL: {e}", settings.url))?
            .connect_timeout(REGISTER_TIMEOUT)
            .timeout(REGISTER_TIMEOUT);
        let https = settings.url.starts_with("https://");
        match (&settings.ca, https) {
            (Some(ca), true) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("REFBUS_LAWYER_SERVICE_CA ({}): {e}", ca.display()))?;
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(settings.domain.clone());
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| format!("TLS for {}: {e}", settings.url))?;
            }
            (None, true) => {
                endpoint = endpoint
                    .tls_config(ClientTlsConfig::new().domain_name(settings.domain.clone()))
                    .map_err(|e| format!("TLS for {}: {e}", settings.url))?;
            }
            (Some(_), false) => {
                return Err(format!(
                    "REFBUS_LAWYER_SERVICE_CA is set, but `{}` is not an https:// URL: the register would be asked without TLS",
                    settings.url
                ));
            }
            (None, false) => {}
        }
        Ok(Self {
            client: LawyerRegistryClient::new(endpoint.connect_lazy()),
            directory: directory.clone(),
            url: settings.url.clone(),
        })
    }

    /// The lawyer registered under `licence`, as their registrar signed
    /// them. `field` names where the licence came from, for errors.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a malformed licence; NOT_FOUND
    /// ([`GatewayError::LawyerNotRegistered`]) for a licence nobody
    /// registered; UNAVAILABLE ("nothing was published") when the register
    /// cannot be reached; FAILED_PRECONDITION
    /// ([`GatewayError::RegisterUntrusted`]) when the entry does not hold up
    /// against its registrar's signature.
    pub async fn get(
        &self,
        field: &'static str,
        licence: &str,
    ) -> Result<RegisteredLawyer, GatewayError> {
        check_licence(field, licence)?;
        let answer = self
            .client
            .clone()
            .get_lawyer(GetLawyerRequest {
                licence_number: licence.to_owned(),
            })
            .await;
        let entry = match answer {
            Ok(entry) => entry.into_inner(),
            Err(status) if status.code() == Code::NotFound => {
                return Err(GatewayError::LawyerNotRegistered {
                    field,
                    licence: licence.to_owned(),
                });
            }
            Err(status) => {
                return Err(GatewayError::RegisterUnavailable(format!(
                    "{}: {}: {}",
                    self.url,
                    status.code(),
                    status.message()
                )));
            }
        };
        verify_entry(&self.directory, licence, &entry).map_err(|reason| {
            GatewayError::RegisterUntrusted {
                licence: licence.to_owned(),
                reason,
            }
        })
    }
}

/// Checks a register entry for `licence` against its registrar's signature:
/// `signed_registration` verifies with the directory key of `registered_by`
/// (a bar association or justice bureau entitled to the lawyer's region),
/// decodes to a `LawyerRegistration` of this licence sent by the registrar
/// to the lawyer service, and the entry's letter keys are the signed ones.
///
/// # Errors
/// Why the entry cannot be believed.
pub fn verify_entry(
    directory: &Directory,
    licence: &str,
    entry: &LawyerEntry,
) -> Result<RegisteredLawyer, String> {
    let registrar = directory.get(&entry.registered_by).ok_or_else(|| {
        format!(
            "registered_by `{}` is not an agency of the directory",
            entry.registered_by
        )
    })?;
    signing::verify(
        directory,
        &registrar.id,
        Signed::Envelope,
        &entry.signed_registration,
        Some(&entry.signature),
    )
    .map_err(|e| e.to_string())?;
    let envelope = Envelope::decode(entry.signed_registration.as_slice())
        .map_err(|e| format!("signed_registration is not a refbus.v1.Envelope: {e}"))?;
    if envelope.sender != registrar.id {
        return Err(format!(
            "the signed registration was sent by `{}`, not by its registrar `{}`",
            envelope.sender, registrar.id
        ));
    }
    if directory
        .get(&envelope.recipient)
        .is_none_or(|a| a.kind != AgencyKind::LawyerService)
    {
        return Err(format!(
            "the signed registration went to `{}`, not to the lawyer service",
            envelope.recipient
        ));
    }
    let Some(Payload::LawyerRegistration(signed)) = envelope.payload else {
        return Err("the signed envelope is no lawyer registration".into());
    };
    let lawyer = signed.lawyer.unwrap_or_default();
    if lawyer.licence_number != licence {
        return Err(format!(
            "the signed registration is of licence `{}`, not `{licence}`",
            lawyer.licence_number
        ));
    }
    entitled(directory, registrar, &signed.region).map_err(|e| e.to_string())?;
    let current = entry.registration.clone().unwrap_or_default();
    if current.letter_keys != signed.letter_keys {
        return Err(
            "letter_keys: the register's keys are not those the registrar signed".to_owned(),
        );
    }
    if current.region != signed.region {
        return Err("region: the register's region is not the one the registrar signed".into());
    }
    let status = LawyerStatus::try_from(current.status)
        .ok()
        .filter(|s| *s != LawyerStatus::Unspecified)
        .ok_or_else(|| "registration.status: neither active nor suspended".to_owned())?;
    Ok(RegisteredLawyer {
        lawyer,
        region: signed.region,
        letter_keys: signed.letter_keys,
        status,
        registered_by: registrar.id.clone(),
    })
}

/// Whether `registrar` may register lawyers of `region`: a bar association
/// or justice bureau, of that region or of the municipality it belongs to.
///
/// # Errors
/// A [`RuleViolation`] of `registry` naming the registrar and its regions.
pub fn entitled(
    directory: &Directory,
    registrar: &Agency,
    region: &str,
) -> Result<(), RuleViolation> {
    if !matches!(
        registrar.kind,
        AgencyKind::BarAssociation | AgencyKind::JusticeBureau
    ) {
        return Err(RuleViolation {
            rule: RULE,
            reason: format!(
                "`{}` is a {}: lawyers are registered by the bar association or justice bureau of their region",
                registrar.id, registrar.kind
            ),
        });
    }
    let covered = region == registrar.region
        || directory
            .region(region)
            .and_then(|r| r.parent.as_deref())
            .is_some_and(|parent| parent == registrar.region);
    if covered {
        return Ok(());
    }
    let scope = if registrar.level == Level::Municipal {
        format!("{} and its districts", registrar.region)
    } else {
        registrar.region.clone()
    };
    Err(RuleViolation {
        rule: RULE,
        reason: format!(
            "`{}` registers lawyers of {scope} only, not of {region}",
            registrar.id
        ),
    })
}

/// The registration token of `licence`, issued by `registrar` under
/// `idempotency_key`: the same three always give the same token (a retried
/// `RegisterLawyer` answers the same), and nobody without the registrar's
/// signing key can compute it. It is the SHA-256 of the registrar's
/// Ed25519 signature (deterministic, RFC 8032) over a domain-separated
/// message, so the token reveals nothing of the signature itself.
///
/// # Errors
/// When this process holds no key for `registrar`.
pub fn registration_token(
    signing: &SigningKeys,
    registrar: &str,
    licence: &str,
    idempotency_key: &str,
) -> Result<String, GatewayError> {
    let mut message = b"refbus lawyer token v1\0".to_vec();
    for part in [registrar, licence, idempotency_key] {
        message.extend_from_slice(&(part.len() as u64).to_be_bytes());
        message.extend_from_slice(part.as_bytes());
    }
    let signature = signing.sign(registrar, Signed::Envelope, &message)?;
    let digest = Sha256::digest(signature.as_bytes());
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
    ))
}

/// Hex SHA-256 of a token: what travels and what the lawyer service keeps.
#[must_use]
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn invalid(field: &'static str, reason: impl Into<String>) -> GatewayError {
    GatewayError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The registrar: one of this service's agencies, acted for by its caller.
fn registrar<'c>(
    core: &'c GatewayCore,
    caller: &Caller,
    registrar: &str,
) -> Result<&'c Agency, Status> {
    caller.acts_as("registrar", registrar)?;
    core.own_agency("registrar", registrar)?;
    core.directory.get(registrar).ok_or_else(|| {
        Status::from(GatewayError::Submit(SubmitError::UnknownAgency {
            field: "registrar".into(),
            id: registrar.into(),
        }))
    })
}

fn lawyer_service(core: &GatewayCore) -> Result<String, GatewayError> {
    core.lawyer_service().map(str::to_owned).ok_or_else(|| {
        GatewayError::Submit(SubmitError::NoRoute(refbus_core::routing::NoRoute {
            rule: RULE,
            reason: "the directory has no lawyer service".into(),
        }))
    })
}

/// Checks every letter key: at least one, each an age X25519 public key.
fn check_letter_keys(keys: &[String]) -> Result<(), GatewayError> {
    if keys.is_empty() {
        return Err(invalid(
            "letter_keys",
            "required: at least one age X25519 public key (age1…) the lawyer's letters are sealed to (CQ-1.1c)",
        ));
    }
    if keys.len() > MAX_LETTER_KEYS {
        return Err(invalid(
            "letter_keys",
            format!("at most {MAX_LETTER_KEYS} keys"),
        ));
    }
    for (i, key) in keys.iter().enumerate() {
        if age::x25519::Recipient::from_str(key).is_err() {
            return Err(GatewayError::Submit(SubmitError::invalid(
                format!("letter_keys[{i}]"),
                "not an age X25519 public key (age1…): a letter could not be sealed to it (CQ-1.1c)",
            )));
        }
        if keys[..i].contains(key) {
            return Err(GatewayError::Submit(SubmitError::invalid(
                format!("letter_keys[{i}]"),
                "named twice",
            )));
        }
    }
    Ok(())
}

/// `RegisterLawyer` (bar associations and justice bureaus): registers a
/// lawyer of the registrar's region or one of its districts, and answers
/// the lawyer's token, once.
pub(crate) async fn register_lawyer(
    rpcs: &AgencyRpcs,
    request: Request<RegisterLawyerRequest>,
) -> Result<Response<RegisterLawyerResponse>, Status> {
    let core = &rpcs.0;
    let caller = Caller::of(&request)?;
    let r = request.into_inner();
    let registrar = registrar(core, &caller, &r.registrar)?;
    let Some(lawyer) = r.lawyer else {
        return Err(invalid(
            "lawyer",
            "required: name, practice licence number, law firm",
        )
        .into());
    };
    check_licence("lawyer.licence_number", &lawyer.licence_number).map_err(GatewayError::from)?;
    if lawyer.name.trim().is_empty() {
        return Err(invalid("lawyer.name", "required").into());
    }
    let region = if r.region.is_empty() {
        registrar.region.clone()
    } else {
        r.region
    };
    if core.directory.region(&region).is_none() {
        return Err(invalid(
            "region",
            format!("`{region}` is not a region of the directory"),
        )
        .into());
    }
    entitled(&core.directory, registrar, &region).map_err(GatewayError::from)?;
    check_letter_keys(&r.letter_keys)?;
    if r.idempotency_key.is_empty() {
        return Err(invalid(
            "idempotency_key",
            "required: a retry with the same key gives the same registration and token",
        )
        .into());
    }
    let token = registration_token(
        &core.signing,
        &registrar.id,
        &lawyer.licence_number,
        &r.idempotency_key,
    )?;
    let recipient = lawyer_service(core)?;
    let receipt = core
        .submit(Envelope {
            sender: registrar.id.clone(),
            recipient,
            idempotency_key: r.idempotency_key,
            payload: Some(Payload::LawyerRegistration(LawyerRegistration {
                lawyer: Some(lawyer),
                region,
                letter_keys: r.letter_keys,
                status: LawyerStatus::Active as i32,
                token_sha256: token_sha256(&token),
                reason: String::new(),
            })),
            ..Envelope::default()
        })
        .await?;
    Ok(Response::new(RegisterLawyerResponse {
        receipt: Some(receipt),
        token,
    }))
}

/// `SuspendLawyer` / `ReinstateLawyer`: a registered lawyer of the
/// registrar's region (or one of its districts) is suspended or active again.
pub(crate) async fn change_status(
    rpcs: &AgencyRpcs,
    request: Request<ChangeLawyerStatusRequest>,
    reinstate: bool,
) -> Reply {
    let core = &rpcs.0;
    let caller = Caller::of(&request)?;
    let r = request.into_inner();
    let registrar = registrar(core, &caller, &r.registrar)?;
    check_licence("licence_number", &r.licence_number).map_err(GatewayError::from)?;
    if !reinstate && r.reason.trim().is_empty() {
        return Err(invalid("reason", "required: why the lawyer is suspended").into());
    }
    if r.idempotency_key.is_empty() {
        return Err(invalid("idempotency_key", "required").into());
    }
    let registered = core
        .lawyers
        .get("licence_number", &r.licence_number)
        .await?;
    entitled(&core.directory, registrar, &registered.region).map_err(GatewayError::from)?;
    let status = if reinstate {
        LawyerStatus::Active
    } else {
        LawyerStatus::Suspended
    };
    let recipient = lawyer_service(core)?;
    rpcs.send(Envelope {
        sender: registrar.id.clone(),
        recipient,
        idempotency_key: r.idempotency_key,
        payload: Some(Payload::LawyerRegistration(LawyerRegistration {
            lawyer: Some(registered.lawyer),
            region: registered.region,
            letter_keys: registered.letter_keys,
            status: status as i32,
            token_sha256: String::new(),
            reason: r.reason,
        })),
        ..Envelope::default()
    })
    .await
}

/// `EnterRightsComplaint` (justice bureaus, police case units): a complaint
/// the body took at its own window, for a registered lawyer (CQ-3.13). The
/// complainant comes from the register; the result goes back to the body
/// and to the lawyer.
pub(crate) async fn enter_rights_complaint(
    rpcs: &AgencyRpcs,
    request: Request<EnterRightsComplaintRequest>,
) -> Reply {
    let core = &rpcs.0;
    let caller = Caller::of(&request)?;
    let r = request.into_inner();
    caller.acts_as("agency", &r.agency)?;
    core.own_agency("agency", &r.agency)?;
    let Some(mut complaint) = r.complaint else {
        return Err(invalid("complaint", "required (CQ-3.13)").into());
    };
    let licence = complaint
        .complainant
        .as_ref()
        .map(|l| l.licence_number.clone())
        .unwrap_or_default();
    check_licence("complaint.complainant.licence_number", &licence).map_err(GatewayError::from)?;
    if complaint.description.trim().is_empty() {
        return Err(invalid("complaint.description", "required (CQ-3.13)").into());
    }
    if complaint.respondent.is_empty() {
        return Err(invalid(
            "complaint.respondent",
            "required: the body complained about (agency id)",
        )
        .into());
    }
    if core.directory.get(&complaint.respondent).is_none() {
        return Err(GatewayError::Submit(SubmitError::UnknownAgency {
            field: "complaint.respondent".into(),
            id: complaint.respondent.clone(),
        })
        .into());
    }
    let investigated_by = if r.investigated_by.is_empty() {
        r.agency.clone()
    } else {
        r.investigated_by
    };
    // Who may take and investigate a complaint, before the register is asked.
    let body = core.directory.get(&r.agency);
    let investigator = core.directory.get(&investigated_by).ok_or_else(|| {
        GatewayError::Submit(SubmitError::UnknownAgency {
            field: "investigated_by".into(),
            id: investigated_by.clone(),
        })
    })?;
    if let Some(body) = body {
        rules::check(MessageKind::RightsComplaint, body, investigator)
            .map_err(GatewayError::from)?;
    }
    let registered = core
        .lawyers
        .get("complaint.complainant.licence_number", &licence)
        .await?;
    complaint.complainant = Some(registered.lawyer);
    rpcs.send(Envelope {
        sender: r.agency,
        recipient: investigated_by,
        idempotency_key: r.idempotency_key,
        payload: Some(Payload::RightsComplaint(complaint)),
        ..Envelope::default()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use refbus_core::signing::development_signature;

    const LICENCE: &str = "15001201910123456";

    fn directory() -> Directory {
        Directory::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .unwrap()
    }

    /// A fresh age X25519 public key.
    fn key() -> String {
        age::x25519::Identity::generate().to_public().to_string()
    }

    fn registration(keys: &[String]) -> LawyerRegistration {
        LawyerRegistration {
            lawyer: Some(Lawyer {
                name: "Wang Li".into(),
                licence_number: LICENCE.into(),
                law_firm: "Dazu Law Firm".into(),
            }),
            region: "500111".into(),
            letter_keys: keys.to_vec(),
            status: LawyerStatus::Active as i32,
            token_sha256: token_sha256("rbl_x"),
            reason: String::new(),
        }
    }

    /// An entry as the lawyer service would answer it: the registration
    /// `sender` signed (with `signer`'s development key), and `current`.
    fn entry(
        sender: &str,
        signer: &str,
        signed: LawyerRegistration,
        current: LawyerRegistration,
    ) -> LawyerEntry {
        let envelope = Envelope {
            id: refbus_core::envelope_id(sender, "reg-1"),
            kind: MessageKind::LawyerRegistration as i32,
            sender: sender.into(),
            recipient: "lawyer-service".into(),
            idempotency_key: "reg-1".into(),
            payload: Some(Payload::LawyerRegistration(signed)),
            ..Envelope::default()
        };
        let bytes = envelope.encode_to_vec();
        LawyerEntry {
            registration: Some(current),
            registered_by: sender.into(),
            signature: development_signature(signer, Signed::Envelope, &bytes),
            signed_registration: bytes,
            updated_at: None,
        }
    }

    #[test]
    fn registry_an_entry_signed_by_its_registrar_is_believed() {
        let directory = directory();
        let keys = vec![key(), key()];
        let e = entry(
            "dz-bar-committee",
            "dz-bar-committee",
            registration(&keys),
            registration(&keys),
        );
        let lawyer = verify_entry(&directory, LICENCE, &e).unwrap();
        assert_eq!(lawyer.letter_keys, keys);
        assert_eq!(lawyer.region, "500111");
        assert_eq!(lawyer.registered_by, "dz-bar-committee");
        assert_eq!(lawyer.status, LawyerStatus::Active);
        assert_eq!(lawyer.lawyer.name, "Wang Li");
    }

    #[test]
    fn cq_1_1c_keys_the_registrar_did_not_sign_are_refused() {
        let directory = directory();
        let signed = vec![key()];
        let swapped = vec![key()];
        let e = entry(
            "dz-bar-committee",
            "dz-bar-committee",
            registration(&signed),
            registration(&swapped),
        );
        let reason = verify_entry(&directory, LICENCE, &e).unwrap_err();
        assert!(reason.starts_with("letter_keys:"), "{reason}");
    }

    #[test]
    fn registry_an_entry_signed_by_another_key_is_refused() {
        let directory = directory();
        let keys = vec![key()];
        // Claims dz-bar-committee, signed with the lawyer service's key.
        let e = entry(
            "dz-bar-committee",
            "lawyer-service",
            registration(&keys),
            registration(&keys),
        );
        let reason = verify_entry(&directory, LICENCE, &e).unwrap_err();
        assert!(reason.contains("forged or altered"), "{reason}");
        // Altered after signing.
        let mut e = entry(
            "dz-bar-committee",
            "dz-bar-committee",
            registration(&keys),
            registration(&keys),
        );
        let last = e.signed_registration.len() - 1;
        e.signed_registration[last] ^= 1;
        assert!(verify_entry(&directory, LICENCE, &e).is_err());
    }

    #[test]
    fn registry_an_entry_for_another_licence_or_region_is_refused() {
        let directory = directory();
        let keys = vec![key()];
        let e = entry(
            "dz-bar-committee",
            "dz-bar-committee",
            registration(&keys),
            registration(&keys),
        );
        let reason = verify_entry(&directory, "15001201910999999", &e).unwrap_err();
        assert!(reason.contains("not `15001201910999999`"), "{reason}");
        // Shanghai's bar registering a Dazu lawyer: not its region.
        let e = entry(
            "sh-bar-association",
            "sh-bar-association",
            registration(&keys),
            registration(&keys),
        );
        let reason = verify_entry(&directory, LICENCE, &e).unwrap_err();
        assert!(
            reason.starts_with("registry: `sh-bar-association`"),
            "{reason}"
        );
    }

    #[test]
    fn registry_a_registrar_covers_its_region_and_districts_only() {
        let directory = directory();
        let dz = directory.get("dz-bar-committee").unwrap();
        let cq = directory.get("cq-justice-bureau").unwrap();
        assert!(entitled(&directory, dz, "500111").is_ok());
        let e = entitled(&directory, dz, "500112").unwrap_err();
        assert_eq!(
            e.to_string(),
            "registry: `dz-bar-committee` registers lawyers of 500111 only, not of 500112"
        );
        assert!(entitled(&directory, cq, "500111").is_ok());
        assert!(entitled(&directory, cq, "500000").is_ok());
        assert!(entitled(&directory, cq, "310000").is_err());
    }

    #[test]
    fn registry_tokens_are_deterministic_per_registrar_licence_and_key() {
        let directory = directory();
        let keys = SigningKeys::development(&directory);
        let t = |r: &str, l: &str, k: &str| registration_token(&keys, r, l, k).unwrap();
        let a = t("dz-bar-committee", LICENCE, "k1");
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43);
        assert_eq!(a, t("dz-bar-committee", LICENCE, "k1"));
        assert_ne!(a, t("dz-bar-committee", LICENCE, "k2"));
        assert_ne!(a, t("dz-justice-bureau", LICENCE, "k1"));
        assert_ne!(a, t("dz-bar-committee", "15001201910999999", "k1"));
        assert_eq!(token_sha256(&a).len(), 64);
    }

    #[test]
    fn cq_1_1c_letter_keys_must_be_age_public_keys() {
        assert!(check_letter_keys(&[key()]).is_ok());
        let e = Status::from(check_letter_keys(&[]).unwrap_err());
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = Status::from(check_letter_keys(&[key(), "ssh-ed25519 AAAA".into()]).unwrap_err());
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().starts_with("letter_keys[1]:"),
            "{}",
            e.message()
        );
    }
}
