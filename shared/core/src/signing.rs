//! Signed messages (Ed25519): each agency signs what it sends with a key
//! whose public half is in the agency directory, and every recipient and the
//! tracker verify before they hand anything on.
//!
//! - **What is signed**: the exact bytes on the bus, prefixed with what they
//!   are ([`Signed`]), so that a hop report's signature never passes for an
//!   envelope's. The signature travels base64 in the AMQP header
//!   [`SIGNATURE_HEADER`].
//! - **Who signs**: the envelope's `sender`, or the hop report's `agency`
//!   (for a hop batch, the one agency all its hops name).
//! - **A batch of envelopes signed once** (issue 17): the sender signs the
//!   list of its envelopes' SHA-256 digests ([`Signed::EnvelopeDigests`]),
//!   and each envelope is believed by its entry in that list
//!   ([`Seal::Listed`]): its digest must be the entry, and the list must
//!   verify with the key of the envelope's own sender. [`verify_many`]
//!   checks each distinct list once, however many envelopes it carries.
//!   The tracker signs its overdue notices and forgery alerts as
//!   [`TRACKER_ID`], with the key under `[tracker]` in the directory.
//! - **Keys**: [`SigningKeys::development`] derives each signer's key from
//!   its id. Like the development tokens, those keys are public: they serve
//!   `refbus up` and the tests, and the shipped directory lists their public
//!   halves. A real deployment keeps one `<signer>.key` file per signer in a
//!   key directory (the base64 of a 32-byte Ed25519 seed), made by
//!   `refbus keys generate`, and puts the printed public keys in its directory.
//! - **Verification rule**: ZIP 215's (`ed25519-zebra`), which checks the
//!   cofactored equation for one signature and for a batch alike, so that
//!   a batch and a one-by-one check never disagree about a signature. The
//!   signatures themselves are RFC 8032's: every signature a standard
//!   Ed25519 signer makes verifies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_zebra::{Signature, SigningKey, VerificationKeyBytes};
use sha2::{Digest, Sha256};

use crate::directory::Directory;

pub use ed25519_zebra::VerificationKey as VerifyingKey;

/// The AMQP header carrying a message's signature, base64.
pub const SIGNATURE_HEADER: &str = "x-refbus-signature";

/// The AMQP header carrying the signature of the digest list an envelope
/// of a batch signed once was believed by, base64 (on its dead letter).
pub const DIGESTS_SIGNATURE_HEADER: &str = "x-refbus-digests-signature";
/// The AMQP header carrying that digest list: base64 of the 32-byte
/// SHA-256 digests one after the other.
pub const DIGESTS_HEADER: &str = "x-refbus-digests";
/// The AMQP header carrying the envelope's entry in that list, from 0.
pub const DIGEST_INDEX_HEADER: &str = "x-refbus-digest-index";

/// The length of one entry of a digest list (SHA-256).
pub const DIGEST_LEN: usize = 32;

/// The signer id of the tracker (overdue notices, forgery alerts).
pub const TRACKER_ID: &str = "refbus-tracker";

/// The setting that selects the derived development keys.
pub const DEVELOPMENT: &str = "development";

/// What a signed body is: part of what is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signed {
    /// A `refbus.v1.Envelope`, signed by its sender.
    Envelope,
    /// A `refbus.v1.HopReport`, signed by the agency it reports on.
    HopReport,
    /// A `refbus.v1.HopBatch`, signed by the one agency all its hops name.
    HopBatch,
    /// The SHA-256 digests of a `refbus.v1.EnvelopeBatch`'s envelopes, in
    /// order: signed once by their sender (`digests_signature`).
    EnvelopeDigests,
}

impl Signed {
    fn context(self) -> &'static [u8] {
        match self {
            Signed::Envelope => b"refbus.v1.Envelope\0",
            Signed::HopReport => b"refbus.v1.HopReport\0",
            Signed::HopBatch => b"refbus.v1.HopBatch\0",
            Signed::EnvelopeDigests => b"refbus.v1.EnvelopeDigests\0",
        }
    }
}

fn message(what: Signed, body: &[u8]) -> Vec<u8> {
    let context = what.context();
    let mut message = Vec::with_capacity(context.len() + body.len());
    message.extend_from_slice(context);
    message.extend_from_slice(body);
    message
}

/// Why a received message is refused: the reason recorded with it in the
/// dead-letter queue and sent in the forgery alert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature: missing (no {SIGNATURE_HEADER} header): unsigned messages are refused")]
    Missing,
    #[error("signature: malformed: expected the base64 of 64 bytes")]
    Malformed,
    #[error("signature: `{signer}` has no public key in the agency directory")]
    NoPublicKey { signer: String },
    #[error(
        "signature: forged or altered: does not verify with the public key of `{signer}` in the agency directory"
    )]
    Mismatch { signer: String },
    #[error(
        "signature: malformed batch proof: {0} (expected {DIGESTS_SIGNATURE_HEADER}, {DIGESTS_HEADER} as the base64 of 32-byte digests, and {DIGEST_INDEX_HEADER} as an entry of that list)"
    )]
    MalformedList(&'static str),
    #[error(
        "signature: forged or altered: the envelope's SHA-256 is not entry {index} of the digest list its batch signed"
    )]
    NotListed { index: usize },
}

/// The SHA-256 digests of a batch's envelopes, signed once by their sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedDigests {
    /// The sender's signature over the list, base64.
    pub signature: String,
    /// The digests, [`DIGEST_LEN`] bytes each, in the batch's order.
    pub digests: Vec<u8>,
}

impl SignedDigests {
    /// How many entries the list has.
    #[must_use]
    pub fn len(&self) -> usize {
        self.digests.len() / DIGEST_LEN
    }

    /// Whether the list has no entry.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.digests.len() < DIGEST_LEN
    }
}

/// The SHA-256 digests of `bodies`, one after the other: what a batch
/// signed once signs (as [`Signed::EnvelopeDigests`]).
#[must_use]
pub fn digest_list<'b>(bodies: impl IntoIterator<Item = &'b [u8]>) -> Vec<u8> {
    let mut digests = Vec::new();
    for body in bodies {
        digests.extend_from_slice(&Sha256::digest(body));
    }
    digests
}

/// How a received body is signed: what its claim is checked with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Not at all.
    Unsigned,
    /// Its own signature, base64 ([`SIGNATURE_HEADER`]).
    Own(String),
    /// Entry `index` of a digest list signed once ([`Signed::EnvelopeDigests`]).
    Listed {
        list: Arc<SignedDigests>,
        index: usize,
    },
    /// Batch-proof headers that cannot be read: why.
    Malformed(&'static str),
}

impl Proof {
    /// The proof an AMQP message's headers carry: its own signature if it
    /// has one (it is judged by that), else the three headers of an
    /// envelope of a batch signed once, else none.
    #[must_use]
    pub fn from_headers(
        own: Option<String>,
        list_signature: Option<String>,
        digests: Option<String>,
        index: Option<String>,
    ) -> Self {
        if let Some(own) = own {
            return Proof::Own(own);
        }
        match (list_signature, digests, index) {
            (None, None, None) => Proof::Unsigned,
            (Some(signature), Some(digests), Some(index)) => {
                let Ok(digests) = BASE64.decode(digests.trim()) else {
                    return Proof::Malformed("the digest list is not base64");
                };
                let Ok(index) = index.trim().parse::<usize>() else {
                    return Proof::Malformed("the index is not a number");
                };
                Proof::Listed {
                    list: Arc::new(SignedDigests { signature, digests }),
                    index,
                }
            }
            _ => Proof::Malformed("one of the three headers is missing"),
        }
    }

    /// The headers that carry this proof on an envelope alone (its dead
    /// letter): none for its own signature or none, which travel as they came.
    #[must_use]
    pub fn list_headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Proof::Listed { list, index } => vec![
                (DIGESTS_SIGNATURE_HEADER, list.signature.clone()),
                (DIGESTS_HEADER, BASE64.encode(&list.digests)),
                (DIGEST_INDEX_HEADER, index.to_string()),
            ],
            _ => Vec::new(),
        }
    }

    /// The proof as a claim borrows it.
    #[must_use]
    pub fn as_seal(&self) -> Seal<'_> {
        match self {
            Proof::Unsigned => Seal::Unsigned,
            Proof::Own(signature) => Seal::Own(signature),
            Proof::Listed { list, index } => Seal::Listed {
                list,
                index: *index,
            },
            Proof::Malformed(why) => Seal::Malformed(why),
        }
    }
}

/// A [`Proof`], borrowed.
#[derive(Clone, Copy, Debug)]
pub enum Seal<'a> {
    Unsigned,
    Own(&'a str),
    Listed {
        list: &'a SignedDigests,
        index: usize,
    },
    Malformed(&'static str),
}

impl<'a> Seal<'a> {
    /// A signature header's value as a seal.
    #[must_use]
    pub fn header(signature: Option<&'a str>) -> Self {
        signature.map_or(Seal::Unsigned, Seal::Own)
    }
}

/// Checks that `signature` (the header's value) is `signer`'s signature of
/// `body` as a `what`.
///
/// # Errors
/// [`SignatureError`] saying why the message cannot be believed.
pub fn verify(
    directory: &Directory,
    signer: &str,
    what: Signed,
    body: &[u8],
    signature: Option<&str>,
) -> Result<(), SignatureError> {
    let claim = Claim {
        signer,
        what,
        body,
        seal: Seal::header(signature),
    };
    let (message, signature, key) = claim.prepare(directory)?;
    key.verify(&signature, &message)
        .map_err(|_| claim.mismatch())
}

/// A received message and the signature it carries, to be checked.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// Who it claims to come from.
    pub signer: &'a str,
    pub what: Signed,
    /// The exact bytes received.
    pub body: &'a [u8],
    /// What they are signed with.
    pub seal: Seal<'a>,
}

/// A distinct signature to check: the message signed, the signature, the key.
type Check<'a> = (Vec<u8>, Signature, &'a VerifyingKey);

impl<'a> Claim<'a> {
    /// The signature this claim stands on (for an envelope listed in a
    /// batch signed once, the list's, after its digest is found to be its
    /// entry), ready to check.
    fn prepare(&self, directory: &'a Directory) -> Result<Check<'a>, SignatureError> {
        self.check_entry()?;
        let (signature, signed) = match self.seal {
            Seal::Own(signature) => (signature, message(self.what, self.body)),
            Seal::Listed { list, .. } => (
                list.signature.as_str(),
                message(Signed::EnvelopeDigests, &list.digests),
            ),
            // Refused by `check_entry`.
            Seal::Unsigned | Seal::Malformed(_) => return Err(SignatureError::Missing),
        };
        let bytes = BASE64
            .decode(signature)
            .map_err(|_| SignatureError::Malformed)?;
        let signature = Signature::from_slice(&bytes).map_err(|_| SignatureError::Malformed)?;
        let key = directory
            .public_key(self.signer)
            .ok_or_else(|| SignatureError::NoPublicKey {
                signer: self.signer.to_owned(),
            })?;
        Ok((signed, signature, key))
    }

    /// What is checked of the claim before its signature: that it has one
    /// and, for an envelope listed in a batch signed once, that its digest
    /// is its entry in the list.
    fn check_entry(&self) -> Result<(), SignatureError> {
        match self.seal {
            Seal::Unsigned => Err(SignatureError::Missing),
            Seal::Malformed(why) => Err(SignatureError::MalformedList(why)),
            Seal::Own(_) => Ok(()),
            Seal::Listed { list, index } => {
                if self.what != Signed::Envelope {
                    return Err(SignatureError::MalformedList(
                        "only envelopes are signed in digest lists",
                    ));
                }
                if list.digests.len() % DIGEST_LEN != 0 || list.is_empty() {
                    return Err(SignatureError::MalformedList(
                        "the digest list is not a whole number of 32-byte digests",
                    ));
                }
                let entry = list
                    .digests
                    .chunks_exact(DIGEST_LEN)
                    .nth(index)
                    .ok_or(SignatureError::MalformedList("the index is past the list"))?;
                if entry == Sha256::digest(self.body).as_slice() {
                    Ok(())
                } else {
                    Err(SignatureError::NotListed { index })
                }
            }
        }
    }

    fn mismatch(&self) -> SignatureError {
        SignatureError::Mismatch {
            signer: self.signer.to_owned(),
        }
    }
}

/// Checks many claims at once, with one batch verification (a batch of 500
/// from a few agencies costs about a sixth of checking them one by one:
/// each key's terms are coalesced); only when the batch fails are they
/// checked one by one to find which. The envelopes of a batch signed once
/// share one check: each distinct (signer, list, signature) is verified
/// once, and stands or falls for every claim listed in it. One result per
/// claim, in order.
#[must_use]
pub fn verify_many(directory: &Directory, claims: &[Claim<'_>]) -> Vec<Result<(), SignatureError>> {
    let mut results: Vec<Result<(), SignatureError>> = Vec::with_capacity(claims.len());
    // Each distinct signature, and the claims that stand on it.
    let mut checks: Vec<(Check<'_>, Vec<usize>)> = Vec::with_capacity(claims.len());
    let mut lists: HashMap<(&str, &str, &[u8]), usize> = HashMap::new();
    for (index, claim) in claims.iter().enumerate() {
        let list_key = match claim.seal {
            Seal::Listed { list, .. } => Some((
                claim.signer,
                list.signature.as_str(),
                list.digests.as_slice(),
            )),
            _ => None,
        };
        // A list already prepared: only this envelope's entry is checked
        // here (the list's message is built once, not once per envelope).
        if let Some(&at) = list_key.as_ref().and_then(|key| lists.get(key)) {
            match claim.check_entry() {
                Ok(()) => {
                    results.push(Ok(()));
                    checks[at].1.push(index);
                }
                Err(e) => results.push(Err(e)),
            }
            continue;
        }
        match claim.prepare(directory) {
            Ok(prepared) => {
                results.push(Ok(()));
                if let Some(key) = list_key {
                    lists.insert(key, checks.len());
                }
                checks.push((prepared, vec![index]));
            }
            Err(e) => results.push(Err(e)),
        }
    }
    if checks.len() > 1 {
        let mut batch = ed25519_zebra::batch::Verifier::new();
        for ((message, signature, key), _) in &checks {
            batch.queue((VerificationKeyBytes::from(**key), *signature, message));
        }
        if batch.verify(rand_core::OsRng).is_ok() {
            return results;
        }
    }
    for ((message, signature, key), standing) in &checks {
        if key.verify(signature, message).is_err() {
            for index in standing {
                results[*index] = Err(claims[*index].mismatch());
            }
        }
    }
    results
}

/// Parses a public key as the directory writes it (base64 of 32 bytes).
///
/// # Errors
/// What is wrong with it, for the directory's error.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|e| format!("not base64 ({e})"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes, expected 32 (an Ed25519 public key)", b.len()))?;
    VerifyingKey::try_from(bytes).map_err(|_| "not an Ed25519 public key".to_owned())
}

/// A public key as the directory writes it.
#[must_use]
pub fn public_key_text(key: &VerifyingKey) -> String {
    BASE64.encode(key.as_ref())
}

/// A signing key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: cannot read the signing key: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a signing key: expected the base64 of a 32-byte Ed25519 seed")]
    Malformed { path: PathBuf },
    #[error(
        "signing key of `{signer}` ({source_name}) does not match its public_key in the agency directory"
    )]
    Mismatch { signer: String, source_name: String },
    #[error(
        "no public_key for `{signer}` in the agency directory: nothing it signs could be verified"
    )]
    NotInDirectory { signer: String },
    #[error("no signing key for `{signer}` ({source_name})")]
    Missing { signer: String, source_name: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw a random key: {0}")]
    Random(String),
}

/// Where keys come from, for errors.
#[derive(Clone, Debug)]
enum Source {
    Development,
    Files(PathBuf),
}

impl Source {
    fn name(&self, signer: &str) -> String {
        match self {
            Source::Development => "the development key derived from its id".to_owned(),
            Source::Files(dir) => dir.join(format!("{signer}.key")).display().to_string(),
        }
    }
}

/// The private keys a process signs with.
#[derive(Clone)]
pub struct SigningKeys {
    keys: HashMap<String, SignerKey>,
    source: Source,
}

/// One signer's key, held apart from [`SigningKeys`] (cheap to clone): a
/// publishing lane signs with it the digest list of a batch it makes of
/// envelopes that waited (issue 17).
#[derive(Clone)]
pub struct SignerKey(Arc<(String, SigningKey)>);

impl SignerKey {
    fn new(signer: &str, key: SigningKey) -> Self {
        Self(Arc::new((signer.to_owned(), key)))
    }

    /// `signer`'s development key ([`development_key`]; public, like
    /// every development key).
    #[must_use]
    pub fn development(signer: &str) -> Self {
        Self::new(signer, development_key(signer))
    }

    /// Whose key it is.
    #[must_use]
    pub fn signer(&self) -> &str {
        &self.0.0
    }

    /// The signature of `body` as a `what`, base64.
    #[must_use]
    pub fn sign(&self, what: Signed, body: &[u8]) -> String {
        BASE64.encode(self.0.1.sign(&message(what, body)).to_bytes())
    }
}

impl std::fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_tuple("SignerKey").field(&self.signer()).finish()
    }
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("SigningKeys")
            .field("signers", &self.keys.len())
            .field("source", &self.source)
            .finish()
    }
}

/// The development key of a signer: derived from its id, hence public.
#[must_use]
pub fn development_key(signer: &str) -> SigningKey {
    let seed: [u8; 32] = Sha256::new()
        .chain_update(b"refbus development signing key\0")
        .chain_update(signer.as_bytes())
        .finalize()
        .into();
    SigningKey::from(seed)
}

/// The public half of a signing key, as the directory lists it.
#[must_use]
pub fn verifying_key(key: &SigningKey) -> VerifyingKey {
    VerifyingKey::from(key)
}

/// `signer`'s development-key signature of `body` as a `what` (for tests
/// and tools that stand in for an agency service under `refbus up`).
#[must_use]
pub fn development_signature(signer: &str, what: Signed, body: &[u8]) -> String {
    BASE64.encode(
        development_key(signer)
            .sign(&message(what, body))
            .to_bytes(),
    )
}

impl SigningKeys {
    /// The development keys of every agency in the directory and of the tracker.
    #[must_use]
    pub fn development(directory: &Directory) -> Self {
        let keys = directory
            .agencies()
            .iter()
            .map(|a| a.id.as_str())
            .chain([TRACKER_ID])
            .map(|id| (id.to_owned(), SignerKey::new(id, development_key(id))))
            .collect();
        Self {
            keys,
            source: Source::Development,
        }
    }

    /// The keys named by a setting: [`DEVELOPMENT`], or a key directory with
    /// one `<signer>.key` file per signer this process may sign for. Every
    /// key file present must match the directory's public key.
    ///
    /// # Errors
    /// [`KeyError`] naming the file.
    pub fn load(setting: &Path, directory: &Directory) -> Result<Self, KeyError> {
        if setting == Path::new(DEVELOPMENT) {
            return Ok(Self::development(directory));
        }
        let mut keys = HashMap::new();
        let source = Source::Files(setting.to_path_buf());
        for signer in directory
            .agencies()
            .iter()
            .map(|a| a.id.as_str())
            .chain([TRACKER_ID])
        {
            let path = setting.join(format!("{signer}.key"));
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(KeyError::Read { path, source }),
            };
            let seed: [u8; 32] = BASE64
                .decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| KeyError::Malformed { path: path.clone() })?;
            let key = SigningKey::from(seed);
            if directory.public_key(signer) != Some(&verifying_key(&key)) {
                return Err(KeyError::Mismatch {
                    signer: signer.to_owned(),
                    source_name: source.name(signer),
                });
            }
            keys.insert(signer.to_owned(), SignerKey::new(signer, key));
        }
        Ok(Self { keys, source })
    }

    /// Checks at start-up that this process can sign for `signer` with the
    /// key the directory publishes.
    ///
    /// # Errors
    /// [`KeyError`] naming the signer and where its key was looked for.
    pub fn require(&self, signer: &str, directory: &Directory) -> Result<(), KeyError> {
        let key = self.keys.get(signer).ok_or_else(|| KeyError::Missing {
            signer: signer.to_owned(),
            source_name: self.source.name(signer),
        })?;
        match directory.public_key(signer) {
            None => Err(KeyError::NotInDirectory {
                signer: signer.to_owned(),
            }),
            Some(public) if *public != verifying_key(&key.0.1) => Err(KeyError::Mismatch {
                signer: signer.to_owned(),
                source_name: self.source.name(signer),
            }),
            Some(_) => Ok(()),
        }
    }

    /// `signer`'s signature of `body` as a `what`, for [`SIGNATURE_HEADER`].
    ///
    /// # Errors
    /// [`KeyError::Missing`] when this process holds no key for `signer`
    /// (start-up's [`SigningKeys::require`] rules that out for its own agencies).
    pub fn sign(&self, signer: &str, what: Signed, body: &[u8]) -> Result<String, KeyError> {
        Ok(self.key(signer)?.sign(what, body))
    }

    /// `signer`'s key, to sign with later.
    ///
    /// # Errors
    /// As [`SigningKeys::sign`].
    pub fn key(&self, signer: &str) -> Result<SignerKey, KeyError> {
        self.keys
            .get(signer)
            .cloned()
            .ok_or_else(|| KeyError::Missing {
                signer: signer.to_owned(),
                source_name: self.source.name(signer),
            })
    }
}

/// Makes a new random key for each signer in `out` (`<signer>.key`, readable
/// by its owner only), refusing to overwrite one; returns each signer's
/// public key as the directory writes it.
///
/// # Errors
/// [`KeyError::Write`] naming the file, or [`KeyError::Random`].
pub fn generate(out: &Path, signers: &[String]) -> Result<Vec<(String, String)>, KeyError> {
    let write_error = |path: &Path, source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(|e| write_error(out, e))?;
    let mut public = Vec::with_capacity(signers.len());
    for signer in signers {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let key = SigningKey::from(seed);
        let path = out.join(format!("{signer}.key"));
        write_private(&path, &BASE64.encode(seed)).map_err(|e| write_error(&path, e))?;
        public.push((signer.clone(), public_key_text(&verifying_key(&key))));
    }
    Ok(public)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        Directory::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .unwrap()
    }

    #[test]
    fn the_shipped_directory_publishes_the_development_keys() {
        let directory = directory();
        let keys = SigningKeys::development(&directory);
        for agency in directory.agencies() {
            keys.require(&agency.id, &directory).unwrap();
        }
        keys.require(TRACKER_ID, &directory).unwrap();
    }

    #[test]
    fn a_signature_verifies_only_for_its_signer_its_bytes_and_its_kind() {
        let directory = directory();
        let keys = SigningKeys::development(&directory);
        let body = b"an envelope";
        let signature = keys
            .sign("dz-detention-centre", Signed::Envelope, body)
            .unwrap();
        let check = |signer: &str, what, body: &[u8], sig: Option<&str>| {
            verify(&directory, signer, what, body, sig)
        };
        assert_eq!(
            check(
                "dz-detention-centre",
                Signed::Envelope,
                body,
                Some(&signature)
            ),
            Ok(())
        );
        // Altered bytes, another claimed signer, another kind of body.
        assert!(matches!(
            check(
                "dz-detention-centre",
                Signed::Envelope,
                b"an envelopf",
                Some(&signature)
            ),
            Err(SignatureError::Mismatch { .. })
        ));
        assert!(matches!(
            check("dz-court", Signed::Envelope, body, Some(&signature)),
            Err(SignatureError::Mismatch { .. })
        ));
        assert!(matches!(
            check(
                "dz-detention-centre",
                Signed::HopReport,
                body,
                Some(&signature)
            ),
            Err(SignatureError::Mismatch { .. })
        ));
        assert_eq!(
            check("dz-detention-centre", Signed::Envelope, body, None),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(
                "dz-detention-centre",
                Signed::Envelope,
                body,
                Some("not base64!")
            ),
            Err(SignatureError::Malformed)
        );
        assert!(matches!(
            check("nobody", Signed::Envelope, body, Some(&signature)),
            Err(SignatureError::NoPublicKey { .. })
        ));
    }

    #[test]
    fn generated_keys_load_once_the_directory_publishes_them() {
        let out = std::env::temp_dir().join(format!("refbus-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let public = generate(&out, &["dz-detention-centre".to_owned()]).unwrap();
        // Not overwritten.
        assert!(generate(&out, &["dz-detention-centre".to_owned()]).is_err());
        // The shipped directory still has the development key: a mismatch,
        // naming the file.
        let error = SigningKeys::load(&out, &directory())
            .unwrap_err()
            .to_string();
        assert!(error.contains("dz-detention-centre.key"), "{error}");
        assert!(error.contains("does not match"), "{error}");
        // With the printed public key in the directory it loads and signs.
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .unwrap();
        let old = public_key_text(&verifying_key(&development_key("dz-detention-centre")));
        let text = text.replacen(&old, &public[0].1, 1);
        let directory = Directory::parse(&text, Path::new("directory.toml")).unwrap();
        let keys = SigningKeys::load(&out, &directory).unwrap();
        keys.require("dz-detention-centre", &directory).unwrap();
        let error = keys
            .require("dz-court", &directory)
            .unwrap_err()
            .to_string();
        assert!(error.contains("dz-court.key"), "{error}");
        let signature = keys
            .sign("dz-detention-centre", Signed::Envelope, b"x")
            .unwrap();
        assert_eq!(
            verify(
                &directory,
                "dz-detention-centre",
                Signed::Envelope,
                b"x",
                Some(&signature)
            ),
            Ok(())
        );
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn a_batch_finds_each_bad_signature_among_good_ones() {
        let directory = directory();
        let keys = SigningKeys::development(&directory);
        let bodies: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; 100]).collect();
        let mut signatures: Vec<String> = bodies
            .iter()
            .map(|b| keys.sign("dz-duty-desk", Signed::Envelope, b).unwrap())
            .collect();
        let claims = |signatures: &[String]| -> Vec<Result<(), SignatureError>> {
            let claims: Vec<Claim<'_>> = bodies
                .iter()
                .zip(signatures)
                .map(|(body, s)| Claim {
                    signer: "dz-duty-desk",
                    what: Signed::Envelope,
                    body,
                    seal: Seal::Own(s),
                })
                .collect();
            verify_many(&directory, &claims)
        };
        assert!(claims(&signatures).iter().all(Result::is_ok));
        // Swapped signatures and one malformed: exactly those refused.
        signatures.swap(3, 7);
        signatures.swap(150, 190);
        signatures[12] = "x".into();
        let results = claims(&signatures);
        assert_eq!(results.len(), 200);
        for (i, result) in results.iter().enumerate() {
            match i {
                3 | 7 | 150 | 190 => {
                    assert!(matches!(result, Err(SignatureError::Mismatch { .. })));
                }
                12 => assert_eq!(result, &Err(SignatureError::Malformed)),
                _ => assert_eq!(result, &Ok(()), "claim {i}"),
            }
        }
    }

    /// The three headers of a dead-lettered envelope of a batch signed
    /// once, as a plain publisher may garble them: each garbling is refused
    /// with what is wrong, and its own signature always wins.
    #[test]
    fn batch_proof_headers_that_do_not_read_are_refused_with_why() {
        let directory = directory();
        let body = b"an envelope".to_vec();
        let digests = digest_list([body.as_slice()]);
        let signature = SigningKeys::development(&directory)
            .sign("dz-duty-desk", Signed::EnvelopeDigests, &digests)
            .unwrap();
        let headers = |digests: &str, index: &str| {
            Proof::from_headers(
                None,
                Some(signature.clone()),
                Some(digests.to_owned()),
                Some(index.to_owned()),
            )
        };
        let judge = |proof: &Proof| {
            verify_many(
                &directory,
                &[Claim {
                    signer: "dz-duty-desk",
                    what: Signed::Envelope,
                    body: &body,
                    seal: proof.as_seal(),
                }],
            )
            .remove(0)
        };
        let good = BASE64.encode(&digests);
        assert_eq!(judge(&headers(&good, "0")), Ok(()));
        let refused = |proof: Proof, why: &str| {
            let reason = judge(&proof).unwrap_err().to_string();
            assert!(reason.contains(why), "{reason}");
        };
        refused(headers("%%%", "0"), "not base64");
        refused(headers(&good, "zero"), "not a number");
        refused(headers(&good, "1"), "past the list");
        refused(headers(&good, &"9".repeat(3000)), "not a number");
        refused(headers(&BASE64.encode(&digests[..31]), "0"), "whole number");
        refused(
            Proof::from_headers(None, Some(signature.clone()), None, Some("0".into())),
            "missing",
        );
        let mut other = digests.clone();
        other[0] ^= 1;
        refused(headers(&BASE64.encode(&other), "0"), "not entry 0");
        // A hop report is never listed.
        let listed = headers(&good, "0");
        let verdict = verify_many(
            &directory,
            &[Claim {
                signer: "dz-duty-desk",
                what: Signed::HopReport,
                body: &body,
                seal: listed.as_seal(),
            }],
        );
        assert!(
            verdict[0]
                .as_ref()
                .is_err_and(|e| e.to_string().contains("only envelopes"))
        );
        // Its own signature is what it is judged by.
        let own = Proof::from_headers(Some("x".into()), None, Some("%%%".into()), None);
        assert_eq!(own, Proof::Own("x".into()));
        assert_eq!(judge(&own), Err(SignatureError::Malformed));
    }

    #[test]
    fn a_bad_public_key_is_refused_with_what_is_wrong() {
        assert!(
            parse_public_key("YWJj")
                .unwrap_err()
                .contains("3 bytes, expected 32")
        );
        assert!(parse_public_key("%%%").unwrap_err().contains("base64"));
    }
}
