//! Who may register, suspend and reinstate a lawyer, and what a
//! registration must hold: decided on each `lawyer_registration` envelope
//! that reaches the lawyer service, before anything is applied.
//!
//! A lawyer is registered by the bar association or justice bureau of
//! their region, or of its parent (municipal) region (DOMAIN.md, "Lawyers
//! are participants too"); only such a registrar of the lawyer's region
//! changes their status. A registration names at least one letter key, each
//! a valid age X25519 recipient (CQ-1.1c: letters are sealed to them), and
//! the SHA-256 of the bearer token issued to the lawyer. Anything else is
//! refused with a reason naming the rule; the consumer dead-letters it.

use refbus_core::agency::AgencyKind;
use refbus_core::{Agency, Directory};
use refbus_proto::v1::{LawyerRegistration, LawyerStatus};

use super::store::LawyerRecord;

/// The rule registrations are checked against (as in `refbus_core::rules`).
pub const RULE: &str = "registry";

/// What a registration envelope changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A lawyer registered, or registered again (new keys or token).
    Register(Box<LawyerRecord>),
    /// Only the status of a registered lawyer.
    Status {
        licence: String,
        status: i32,
        reason: String,
    },
}

/// A registration envelope as received: its signer and signed bytes.
pub struct Received<'a> {
    pub sender: &'a str,
    pub bytes: &'a [u8],
    pub signature: &'a str,
    pub at_ms: i64,
}

/// Whether `registrar` registers lawyers of `region`: it is of that region,
/// or of its parent (municipal) region.
#[must_use]
pub fn entitled(directory: &Directory, registrar: &Agency, region: &str) -> bool {
    registrar.region == region
        || directory
            .region(region)
            .and_then(|r| r.parent.as_deref())
            .is_some_and(|parent| parent == registrar.region)
}

fn refuse(reason: String) -> String {
    format!("{RULE}: {reason}")
}

fn not_entitled(registrar: &Agency, licence: &str, region: &str, what: &str) -> String {
    refuse(format!(
        "`{}` (region {}) may not {what} lawyer `{licence}` of region {region}: a lawyer is registered, suspended and reinstated by the bar association or justice bureau of their region or of its municipality",
        registrar.id, registrar.region
    ))
}

/// Decides what `registration`, received from `received.sender`, changes,
/// given the lawyer's current entry (`existing`).
///
/// # Errors
/// Why it is refused, naming the rule (`registry: ...`) or the field.
pub fn decide(
    directory: &Directory,
    registration: &LawyerRegistration,
    existing: Option<&LawyerRecord>,
    received: &Received<'_>,
) -> Result<Change, String> {
    let Some(registrar) = directory.get(received.sender) else {
        return Err(refuse(format!(
            "`{}` is not in the agency directory",
            received.sender
        )));
    };
    if !matches!(
        registrar.kind,
        AgencyKind::BarAssociation | AgencyKind::JusticeBureau
    ) {
        return Err(refuse(format!(
            "a {} does not register lawyers; the bar association or justice bureau of the lawyer's region does",
            registrar.kind
        )));
    }
    let Some(lawyer) = registration.lawyer.as_ref() else {
        return Err("lawyer_registration.lawyer: required".into());
    };
    let licence = lawyer.licence_number.as_str();
    refbus_core::lawyer::check_licence("lawyer_registration.lawyer.licence_number", licence)
        .map_err(|e| e.to_string())?;
    let status = LawyerStatus::try_from(registration.status).unwrap_or(LawyerStatus::Unspecified);
    if status == LawyerStatus::Unspecified {
        return Err("lawyer_registration.status: required: active or suspended".into());
    }
    if registration.token_sha256.is_empty() {
        let Some(existing) = existing else {
            return Err(refuse(format!(
                "lawyer `{licence}` is not registered: a status change needs a registration first"
            )));
        };
        if !entitled(directory, registrar, &existing.region) {
            let what = if status == LawyerStatus::Suspended {
                "suspend"
            } else {
                "reinstate"
            };
            return Err(not_entitled(registrar, licence, &existing.region, what));
        }
        return Ok(Change::Status {
            licence: licence.to_owned(),
            status: status as i32,
            reason: registration.reason.clone(),
        });
    }
    if lawyer.name.trim().is_empty() {
        return Err("lawyer_registration.lawyer.name: required".into());
    }
    let region = registration.region.as_str();
    if directory.region(region).is_none() {
        return Err(format!(
            "lawyer_registration.region: `{}` is not a region of the directory",
            region.chars().take(16).collect::<String>()
        ));
    }
    if !entitled(directory, registrar, region) {
        return Err(not_entitled(registrar, licence, region, "register"));
    }
    if let Some(existing) = existing
        && !entitled(directory, registrar, &existing.region)
    {
        return Err(not_entitled(
            registrar,
            licence,
            &existing.region,
            "register again",
        ));
    }
    if registration.letter_keys.is_empty() {
        return Err(
            "lawyer_registration.letter_keys: CQ-1.1c: at least one age X25519 recipient (age1…) to seal the lawyer's letters to"
                .into(),
        );
    }
    for (i, key) in registration.letter_keys.iter().enumerate() {
        if key.parse::<age::x25519::Recipient>().is_err() {
            return Err(format!(
                "lawyer_registration.letter_keys[{i}]: not a valid age X25519 public key (age1…)"
            ));
        }
    }
    let token = registration.token_sha256.to_ascii_lowercase();
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(
            "lawyer_registration.token_sha256: 64 hexadecimal digits, the SHA-256 of the lawyer's bearer token"
                .into(),
        );
    }
    Ok(Change::Register(Box::new(LawyerRecord {
        licence: licence.to_owned(),
        name: lawyer.name.clone(),
        law_firm: lawyer.law_firm.clone(),
        region: region.to_owned(),
        letter_keys: registration.letter_keys.clone(),
        token_sha256: token,
        status: status as i32,
        status_reason: registration.reason.clone(),
        status_by: registrar.id.clone(),
        registered_by: registrar.id.clone(),
        registration: received.bytes.to_vec(),
        signature: received.signature.to_owned(),
        updated_at_ms: received.at_ms,
    })))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;
    use refbus_proto::v1::Lawyer;

    fn directory() -> Directory {
        Directory::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .unwrap()
    }

    fn registration(region: &str) -> LawyerRegistration {
        let key = age::x25519::Identity::generate().to_public().to_string();
        LawyerRegistration {
            lawyer: Some(Lawyer {
                name: "周律师".into(),
                licence_number: "15001201910000001".into(),
                law_firm: "大足某律师事务所".into(),
            }),
            region: region.into(),
            letter_keys: vec![key],
            status: LawyerStatus::Active as i32,
            token_sha256: "ab".repeat(32),
            reason: String::new(),
        }
    }

    fn from(sender: &str) -> Received<'_> {
        Received {
            sender,
            bytes: b"signed bytes",
            signature: "sig",
            at_ms: 1,
        }
    }

    #[test]
    fn the_region_or_its_municipality_registers_and_no_one_else() {
        let d = directory();
        let r = registration("500111");
        for registrar in [
            "dz-bar-committee",
            "dz-justice-bureau",
            "cq-bar-association",
            "cq-justice-bureau",
        ] {
            let change = decide(&d, &r, None, &from(registrar)).unwrap();
            let Change::Register(record) = change else {
                panic!("{registrar}: a registration");
            };
            assert_eq!(record.registered_by, registrar);
            assert_eq!(record.registration, b"signed bytes");
        }
        for registrar in [
            "yb-bar-committee",
            "sh-bar-association",
            "sh-justice-bureau",
        ] {
            let e = decide(&d, &r, None, &from(registrar)).unwrap_err();
            assert!(e.starts_with("registry: "), "{e}");
            assert!(e.contains(registrar) && e.contains("500111"), "{e}");
        }
        let e = decide(&d, &r, None, &from("dz-detention-centre")).unwrap_err();
        assert!(e.contains("does not register lawyers"), "{e}");
    }

    #[test]
    fn status_changes_only_from_a_registrar_of_the_lawyers_region() {
        let d = directory();
        let Change::Register(existing) =
            decide(&d, &registration("500111"), None, &from("dz-bar-committee")).unwrap()
        else {
            panic!("a registration");
        };
        let suspend = LawyerRegistration {
            token_sha256: String::new(),
            letter_keys: Vec::new(),
            status: LawyerStatus::Suspended as i32,
            reason: "违规".into(),
            ..registration("")
        };
        assert_eq!(
            decide(&d, &suspend, Some(&existing), &from("cq-justice-bureau")).unwrap(),
            Change::Status {
                licence: existing.licence.clone(),
                status: LawyerStatus::Suspended as i32,
                reason: "违规".into()
            }
        );
        let e = decide(&d, &suspend, Some(&existing), &from("yb-justice-bureau")).unwrap_err();
        assert!(e.starts_with("registry: `yb-justice-bureau`"), "{e}");
        assert!(e.contains("suspend"), "{e}");
        let e = decide(&d, &suspend, None, &from("dz-bar-committee")).unwrap_err();
        assert!(e.contains("not registered"), "{e}");
    }

    #[test]
    fn keys_and_tokens_must_be_what_they_claim() {
        let d = directory();
        let mut r = registration("500111");
        r.letter_keys = vec!["age1notakey".into()];
        let e = decide(&d, &r, None, &from("dz-bar-committee")).unwrap_err();
        assert!(e.starts_with("lawyer_registration.letter_keys[0]"), "{e}");
        let identity = age::x25519::Identity::generate();
        r.letter_keys = vec![identity.to_string().expose_secret().to_owned()];
        assert!(
            decide(&d, &r, None, &from("dz-bar-committee")).is_err(),
            "a secret key is no public key"
        );
        let mut r = registration("500111");
        r.letter_keys.clear();
        assert!(decide(&d, &r, None, &from("dz-bar-committee")).is_err());
        let mut r = registration("500111");
        r.token_sha256 = "xyz".into();
        let e = decide(&d, &r, None, &from("dz-bar-committee")).unwrap_err();
        assert!(e.starts_with("lawyer_registration.token_sha256"), "{e}");
        let mut r = registration("999999");
        r.token_sha256 = "AB".repeat(32);
        assert!(decide(&d, &r, None, &from("dz-bar-committee")).is_err());
    }
}
