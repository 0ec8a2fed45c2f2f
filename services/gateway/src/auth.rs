//! Who is calling. Every gRPC call to an agency service or the tracker is
//! authenticated, and a caller may act only as its own agency:
//!
//! - **mutual TLS** (production): the service presents its certificate and
//!   accepts a client only with a certificate from the configured CA; the
//!   agency is the certificate's URI subject alternative name
//!   `urn:refbus:agency:<id>` (`deploy/dev-certs.sh` makes such a CA and a
//!   certificate per agency of a directory);
//! - **bearer tokens** (the default of `refbus up`): the
//!   `authorization: Bearer <token>` header, looked up by its SHA-256 in a
//!   tokens file (`deploy/local/tokens.toml` for development). With a
//!   server certificate and key the services serve TLS and the tokens travel
//!   encrypted; without, plaintext, which only loopback or a development
//!   deployment may use ([`crate::exposure`]).
//!
//! An interceptor authenticates each call and puts the [`Caller`] in the
//! request's extensions; each RPC then checks the agency it is asked to act
//! for with [`Caller::acts_as`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use refbus_core::Directory;
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::server::Keepalive;

/// The prefix of the URI subject alternative name that names an agency.
pub const AGENCY_URI_PREFIX: &str = "urn:refbus:agency:";

/// How callers prove which agency they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Mutual TLS: the agency is named in the client certificate.
    Mtls,
    /// Bearer tokens from a tokens file (development).
    Bearer,
}

/// Authentication settings, shared by every service of a process, and how
/// its gRPC servers keep client connections alive.
#[derive(Clone, Debug, clap::Args)]
pub struct AuthSettings {
    /// How callers authenticate: mtls, or bearer (tokens; over TLS when
    /// --tls-cert and --tls-key are given).
    #[arg(
        long = "auth",
        env = "REFBUS_AUTH",
        value_enum,
        default_value = "bearer"
    )]
    pub mode: AuthMode,
    /// Bearer mode: the tokens file (agency and SHA-256 of its token).
    #[arg(
        long,
        env = "REFBUS_TOKENS",
        default_value = "deploy/local/tokens.toml"
    )]
    pub tokens: PathBuf,
    /// The services' TLS certificate (PEM): required with mtls; with
    /// bearer, the services serve TLS and the tokens travel encrypted.
    #[arg(long, env = "REFBUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "REFBUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// mTLS: the CA whose client certificates are accepted (PEM).
    #[arg(long, env = "REFBUS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// gRPC keepalives of the process's servers.
    #[command(flatten)]
    pub keepalive: Keepalive,
}

impl AuthSettings {
    /// Bearer tokens from `tokens`.
    #[must_use]
    pub fn bearer(tokens: impl Into<PathBuf>) -> Self {
        Self {
            mode: AuthMode::Bearer,
            tokens: tokens.into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            keepalive: Keepalive::default(),
        }
    }

    /// Bearer tokens from `tokens`, over TLS with the server certificate
    /// `deploy/dev-certs.sh` writes to `dir`.
    #[must_use]
    pub fn bearer_tls_in(tokens: impl Into<PathBuf>, dir: &Path) -> Self {
        Self {
            tls_cert: Some(dir.join("server.pem")),
            tls_key: Some(dir.join("server.key")),
            ..Self::bearer(tokens)
        }
    }

    /// Mutual TLS with the files `deploy/dev-certs.sh` writes to `dir`.
    #[must_use]
    pub fn mtls_in(dir: &Path) -> Self {
        Self {
            mode: AuthMode::Mtls,
            tokens: PathBuf::new(),
            tls_cert: Some(dir.join("server.pem")),
            tls_key: Some(dir.join("server.key")),
            tls_client_ca: Some(dir.join("ca.pem")),
            keepalive: Keepalive::default(),
        }
    }
}

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Tokens { path: String, reason: String },
    #[error("--auth mtls needs {0} (or its environment variable)")]
    Missing(&'static str),
    #[error(
        "--auth bearer: --tls-cert (REFBUS_TLS_CERT) and --tls-key (REFBUS_TLS_KEY) go together: {0} is missing"
    )]
    HalfTls(&'static str),
    #[error("TLS configuration ({cert}, {key}): {reason}")]
    Tls {
        cert: String,
        key: String,
        reason: String,
    },
}

/// An authenticated caller: the agency it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub agency: String,
}

impl Caller {
    /// The caller the interceptor put on `request`.
    ///
    /// # Errors
    /// UNAUTHENTICATED when there is none (a service served without the
    /// interceptor: a configuration error, refused rather than trusted).
    pub fn of<T>(request: &Request<T>) -> Result<Self, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the call is not authenticated"))
    }

    /// Checks that the caller acts as `agency`, the value of `field`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT when the field is empty; PERMISSION_DENIED naming
    /// the field and both agencies.
    pub fn acts_as(&self, field: &str, agency: &str) -> Result<(), Status> {
        if agency.is_empty() {
            Err(Status::invalid_argument(format!("{field}: required")))
        } else if agency == self.agency {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{field}: the caller is authenticated as `{}` and may act only as that agency, not as `{agency}`",
                self.agency
            )))
        }
    }
}

/// Authenticates calls in the configured mode.
pub struct Authenticator {
    mode: Mode,
    directory: Arc<Directory>,
    keepalive: Keepalive,
    /// The PEM files the servers present (certificate, key, client CA),
    /// for listeners that are not tonic's: the tracker's dashboard.
    tls_pem: Option<TlsPem>,
}

/// A server's TLS files, read at start-up.
#[derive(Clone, Debug)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// Present under mutual TLS: client certificates it issued are asked for.
    pub client_ca: Option<Vec<u8>>,
}

enum Mode {
    Mtls {
        tls: ServerTlsConfig,
    },
    Bearer {
        /// SHA-256 of the token -> agency.
        tokens: HashMap<[u8; 32], String>,
        /// The server's certificate, when the tokens travel over TLS.
        tls: Option<ServerTlsConfig>,
        /// The agencies whose token in the file is the public development
        /// one, `dev-<agency>`.
        development: Vec<String>,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    caller: Vec<TokenEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    agency: String,
    token_sha256: String,
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// SHA-256 of a bearer token.
#[must_use]
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// SHA-256 of `agency`'s public development token, `dev-<agency>`.
fn development_token_digest(agency: &str) -> [u8; 32] {
    token_digest(&format!("dev-{agency}"))
}

/// The server side of TLS with `cert` and `key` (and, for mutual TLS, the
/// CA of the client certificates), checked now: a key or certificate that
/// does not parse fails at start-up, naming the files, rather than when the
/// first server starts.
fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, AuthError> {
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(|e| AuthError::Tls {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(tls)
}

impl Authenticator {
    /// Loads the tokens file or the TLS files; every agency named must be in
    /// the directory.
    ///
    /// # Errors
    /// [`AuthError`] naming the file and, for a tokens file, the entry.
    pub fn load(settings: &AuthSettings, directory: Arc<Directory>) -> Result<Self, AuthError> {
        let mode = match settings.mode {
            AuthMode::Mtls => {
                let cert = settings
                    .tls_cert
                    .as_deref()
                    .ok_or(AuthError::Missing("--tls-cert"))?;
                let key = settings
                    .tls_key
                    .as_deref()
                    .ok_or(AuthError::Missing("--tls-key"))?;
                let ca = settings
                    .tls_client_ca
                    .as_deref()
                    .ok_or(AuthError::Missing("--tls-client-ca"))?;
                Mode::Mtls {
                    tls: server_tls(cert, key, Some(ca))?,
                }
            }
            AuthMode::Bearer => {
                let tls = match (&settings.tls_cert, &settings.tls_key) {
                    (Some(cert), Some(key)) => Some(server_tls(cert, key, None)?),
                    (None, None) => None,
                    (Some(_), None) => return Err(AuthError::HalfTls("--tls-key")),
                    (None, Some(_)) => return Err(AuthError::HalfTls("--tls-cert")),
                };
                let tokens = load_tokens(&settings.tokens, &directory)?;
                let mut development: Vec<String> = tokens
                    .iter()
                    .filter(|(digest, agency)| **digest == development_token_digest(agency))
                    .map(|(_, agency)| agency.clone())
                    .collect();
                development.sort();
                Mode::Bearer {
                    tokens,
                    tls,
                    development,
                }
            }
        };
        let tls_pem = match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => Some(TlsPem {
                cert: read(cert)?,
                key: read(key)?,
                client_ca: match (&settings.mode, &settings.tls_client_ca) {
                    (AuthMode::Mtls, Some(ca)) => Some(read(ca)?),
                    _ => None,
                },
            }),
            _ => None,
        };
        Ok(Self {
            mode,
            directory,
            keepalive: settings.keepalive,
            tls_pem,
        })
    }

    /// The URL scheme callers use: `https` when the servers serve TLS
    /// (mutual TLS, or bearer tokens with a certificate), else `http`.
    #[must_use]
    pub fn scheme(&self) -> &'static str {
        if self.server_tls().is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The TLS configuration the servers use: mTLS, or bearer tokens with
    /// a server certificate; `None` for plaintext.
    #[must_use]
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        match &self.mode {
            Mode::Mtls { tls } | Mode::Bearer { tls: Some(tls), .. } => Some(tls.clone()),
            Mode::Bearer { tls: None, .. } => None,
        }
    }

    /// The TLS files the servers present, when they serve TLS.
    #[must_use]
    pub fn tls_pem(&self) -> Option<&TlsPem> {
        self.server_tls().and(self.tls_pem.as_ref())
    }

    /// The keepalives of the gRPC servers ([`crate::server`]).
    #[must_use]
    pub fn keepalive(&self) -> Keepalive {
        self.keepalive
    }

    /// Whether bearer tokens would cross the network in plaintext: bearer
    /// mode without a server certificate.
    #[must_use]
    pub fn plaintext_bearer(&self) -> bool {
        matches!(self.mode, Mode::Bearer { tls: None, .. })
    }

    /// The agencies whose token in the tokens file is the public
    /// development token `dev-<agency>` (empty with mutual TLS).
    #[must_use]
    pub fn development_tokens(&self) -> &[String] {
        match &self.mode {
            Mode::Bearer { development, .. } => development,
            Mode::Mtls { .. } => &[],
        }
    }

    /// Who is calling.
    ///
    /// # Errors
    /// UNAUTHENTICATED saying what is missing or wrong.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let agency = match &self.mode {
            Mode::Bearer { tokens, .. } => {
                let header = request
                    .metadata()
                    .get("authorization")
                    .ok_or_else(|| {
                        Status::unauthenticated(
                            "authorization: required (`Bearer <token>` of the calling agency)",
                        )
                    })?
                    .to_str()
                    .map_err(|_| Status::unauthenticated("authorization: not ASCII"))?;
                let token = header.strip_prefix("Bearer ").ok_or_else(|| {
                    Status::unauthenticated("authorization: expected `Bearer <token>`")
                })?;
                tokens
                    .get(&token_digest(token.trim()))
                    .cloned()
                    .ok_or_else(|| Status::unauthenticated("authorization: unknown token"))?
            }
            Mode::Mtls { .. } => {
                let certs = request.peer_certs().ok_or_else(|| {
                    Status::unauthenticated("a client certificate is required (mutual TLS)")
                })?;
                let leaf = certs.first().ok_or_else(|| {
                    Status::unauthenticated("a client certificate is required (mutual TLS)")
                })?;
                agency_of_certificate(leaf.as_ref()).map_err(Status::unauthenticated)?
            }
        };
        if self.directory.get(&agency).is_none() {
            return Err(Status::unauthenticated(format!(
                "the caller's credentials name `{agency}`, which is not in the directory"
            )));
        }
        Ok(Caller { agency })
    }

    /// Wraps one gRPC service so that each of its calls is authenticated
    /// and carries its [`Caller`] (UNAUTHENTICATED calls go no further).
    #[must_use]
    pub fn intercept<S>(
        self: &Arc<Self>,
        service: S,
    ) -> tonic::service::interceptor::InterceptedService<
        S,
        impl tonic::service::Interceptor + Clone + use<S>,
    > {
        let auth = self.clone();
        tonic::service::interceptor::InterceptedService::new(
            service,
            move |mut request: Request<()>| {
                let caller = auth.authenticate(&request)?;
                request.extensions_mut().insert(caller);
                Ok(request)
            },
        )
    }

    /// The agency a bearer token belongs to (bearer mode; `None` with
    /// mutual TLS or for an unknown token). The tracker's dashboard signs
    /// in with it.
    #[must_use]
    pub fn agency_of_token(&self, token: &str) -> Option<String> {
        match &self.mode {
            Mode::Bearer { tokens, .. } => tokens.get(&token_digest(token.trim())).cloned(),
            Mode::Mtls { .. } => None,
        }
    }

    /// A layer for a tonic server that authenticates each call and records
    /// the [`Caller`] in its extensions (UNAUTHENTICATED calls go no further).
    #[must_use]
    pub fn layer(
        self: &Arc<Self>,
    ) -> tonic::service::InterceptorLayer<impl tonic::service::Interceptor + Clone + use<>> {
        let auth = self.clone();
        tonic::service::InterceptorLayer::new(move |mut request: Request<()>| {
            let caller = auth.authenticate(&request)?;
            request.extensions_mut().insert(caller);
            Ok(request)
        })
    }
}

/// The agency a client certificate (DER) names in its URI subject
/// alternative name.
///
/// # Errors
/// A reason, when the certificate does not parse or names no agency.
pub fn agency_of_certificate(der: &[u8]) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("client certificate: subject alternative name: {e}"))?;
    let agencies: Vec<&str> = names
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(AGENCY_URI_PREFIX),
            _ => None,
        })
        .collect();
    match agencies.as_slice() {
        [agency] if !agency.is_empty() => Ok((*agency).to_owned()),
        [] => Err(format!(
            "the client certificate names no agency (a URI subject alternative name `{AGENCY_URI_PREFIX}<id>`)"
        )),
        _ => Err("the client certificate names more than one agency".into()),
    }
}

fn load_tokens(path: &Path, directory: &Directory) -> Result<HashMap<[u8; 32], String>, AuthError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: shown.clone(),
        source,
    })?;
    let file: TokensFile = toml::from_str(&text).map_err(|e| AuthError::Tokens {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut tokens = HashMap::new();
    for (i, entry) in file.caller.into_iter().enumerate() {
        let fail = |reason: String| AuthError::Tokens {
            path: shown.clone(),
            reason: format!("caller {} (`{}`): {reason}", i + 1, entry.agency),
        };
        if directory.get(&entry.agency).is_none() {
            return Err(fail("agency: not in the directory".into()));
        }
        let digest = decode_hex32(&entry.token_sha256)
            .ok_or_else(|| fail("token_sha256: expected 64 hexadecimal digits".into()))?;
        if tokens.insert(digest, entry.agency.clone()).is_some() {
            return Err(fail("token_sha256: the same token is given twice".into()));
        }
    }
    Ok(tokens)
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digests_decode_and_bad_ones_do_not() {
        let digest = token_digest("dev-dz-duty-desk");
        let text: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(decode_hex32(&text), Some(digest));
        assert_eq!(decode_hex32(&text[..62]), None);
        assert_eq!(decode_hex32(&format!("{}zz", &text[..62])), None);
    }

    #[test]
    fn caller_acts_only_as_its_own_agency() {
        let caller = Caller {
            agency: "dz-duty-desk".into(),
        };
        assert!(caller.acts_as("agency", "dz-duty-desk").is_ok());
        let denied = caller.acts_as("agency", "dz-detention-centre").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("dz-duty-desk"));
        assert!(denied.message().starts_with("agency:"));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(agency_of_certificate(b"not a certificate").is_err());
    }
}
