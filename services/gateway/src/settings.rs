//! Typed configuration: which agency service this is, where the broker and
//! the directory are. Parsed once at start-up from flags and environment.

use std::path::PathBuf;
use std::time::Duration;

use refbus_core::AgencyKind;

use crate::auth::AuthSettings;

/// The five agency services, and the lawyer service (lawyers' inboxes and
/// submissions behind the agency `lawyer-service`, [`crate::lawyers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AgencyService {
    DetentionCentre,
    CaseUnit,
    LegalAid,
    JusticeBureau,
    BarAssociation,
    /// Serves `LawyerService` and `LawyerRegistry` instead of the agency
    /// `Gateway` (`refbus serve lawyer-service`, or `lawyer`).
    #[value(name = "lawyer-service", alias = "lawyer")]
    Lawyer,
}

impl AgencyService {
    pub const ALL: [AgencyService; 6] = [
        AgencyService::DetentionCentre,
        AgencyService::CaseUnit,
        AgencyService::LegalAid,
        AgencyService::JusticeBureau,
        AgencyService::BarAssociation,
        AgencyService::Lawyer,
    ];

    /// The binary and service name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            AgencyService::DetentionCentre => "detention-centre",
            AgencyService::CaseUnit => "case-unit",
            AgencyService::LegalAid => "legal-aid",
            AgencyService::JusticeBureau => "justice-bureau",
            AgencyService::BarAssociation => "bar-association",
            AgencyService::Lawyer => "lawyer-service",
        }
    }

    /// The kinds of agency this service serves.
    #[must_use]
    pub fn kinds(self) -> &'static [AgencyKind] {
        match self {
            AgencyService::DetentionCentre => &[AgencyKind::DetentionCentre],
            AgencyService::CaseUnit => &[AgencyKind::CaseUnit],
            AgencyService::LegalAid => &[AgencyKind::LegalAidOffice, AgencyKind::DutyLawyerDesk],
            AgencyService::JusticeBureau => &[AgencyKind::JusticeBureau],
            AgencyService::BarAssociation => &[AgencyKind::BarAssociation],
            AgencyService::Lawyer => &[AgencyKind::LawyerService],
        }
    }

    /// The default gRPC port of this service under `refbus up` (50056 is
    /// the tracker's, so the lawyer service follows it).
    #[must_use]
    pub fn default_port(self) -> u16 {
        match self {
            AgencyService::DetentionCentre => 50051,
            AgencyService::CaseUnit => 50052,
            AgencyService::LegalAid => 50053,
            AgencyService::JusticeBureau => 50054,
            AgencyService::BarAssociation => 50055,
            AgencyService::Lawyer => 50057,
        }
    }
}

/// Where the broker and the directory are; shared by every service of a process.
#[derive(Clone, Debug, clap::Args)]
pub struct BusSettings {
    /// The RabbitMQ to use (`amqps://` for TLS).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// With an `amqps://` URL: the CA that issued the broker's certificate
    /// (PEM), trusted besides the public web roots.
    #[arg(long, env = "REFBUS_AMQP_CA")]
    pub amqp_ca: Option<PathBuf>,
    /// The agency directory.
    #[arg(
        long,
        env = "REFBUS_DIRECTORY",
        default_value = "deploy/local/directory.toml"
    )]
    pub directory: PathBuf,
    /// Prefix of every exchange and queue name (one bus per namespace).
    #[arg(long, env = "REFBUS_NAMESPACE", default_value = "refbus")]
    pub namespace: String,
    /// Unacknowledged deliveries per consumer.
    #[arg(long, env = "REFBUS_PREFETCH", default_value_t = 200)]
    pub prefetch: u16,
    /// How long a Submit waits for the broker's confirm before UNAVAILABLE.
    #[arg(long, env = "REFBUS_CONFIRM_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub confirm_timeout: Duration,
    /// Delete queues left unused this long (for test and demo namespaces;
    /// never set in production).
    #[arg(long, env = "REFBUS_QUEUE_EXPIRES", value_parser = parse_duration)]
    pub queue_expires: Option<Duration>,
    /// Declare the bus topology at start-up (false for a broker user that
    /// may not configure: the operator imports deploy/rabbitmq/definitions.json).
    #[arg(long, env = "REFBUS_DECLARE_TOPOLOGY", default_value_t = true, action = clap::ArgAction::Set)]
    pub declare_topology: bool,
    /// Where the agency services remember what each agency acknowledged
    /// (SQLite), so that an Inbox never hands the same message over twice.
    #[arg(long, env = "REFBUS_INBOX_DB", default_value = "var/inbox.db")]
    pub inbox_db: PathBuf,
    /// The Ed25519 keys this process signs with: `development` (derived
    /// from the ids, public: for `refbus up` and tests), or a directory of
    /// `<agency-id>.key` files made by `refbus keys generate`.
    #[arg(long, env = "REFBUS_SIGNING_KEYS", default_value = "development")]
    pub signing_keys: PathBuf,
    /// How callers authenticate.
    #[command(flatten)]
    pub auth: AuthSettings,
    /// A development deployment: allows the development signing keys and
    /// bearer tokens, and plaintext gRPC with bearer tokens, on addresses
    /// other than loopback (without it such a service refuses to start).
    #[arg(long, env = "REFBUS_DEVELOPMENT", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub development: bool,
    /// The policy catalogue the agency services load (validated against
    /// the directory at start-up). Not a flag of its own here: the tracker
    /// has `--policy` (REFBUS_POLICY) already, so `refbus serve` takes it
    /// from [`PolicySetting`] and `refbus up` passes the tracker's.
    #[arg(skip = PathBuf::from(DEFAULT_POLICY))]
    pub policy: PathBuf,
    /// Where the lawyer service's public register is.
    #[command(flatten)]
    pub lawyer_service: LawyerServiceSettings,
    /// How the agency services batch the hops they report.
    #[command(flatten)]
    pub hop_batch: HopBatchSettings,
}

/// The policy catalogue's default directory (the tracker's default too).
pub const DEFAULT_POLICY: &str = "deploy/policy";

/// `--policy` of an agency service (`refbus serve`, the service binaries):
/// the same flag and variable as the tracker's.
#[derive(Clone, Debug, clap::Args)]
pub struct PolicySetting {
    /// The policy catalogue directory.
    #[arg(long, env = "REFBUS_POLICY", default_value = DEFAULT_POLICY)]
    pub policy: PathBuf,
}

/// How a process's agency services batch the hops they report (delivered,
/// acknowledged): one signed `HopBatch` per agency when the window closes
/// or the batch is full, instead of one publish per hop.
#[derive(Clone, Debug, clap::Args)]
pub struct HopBatchSettings {
    /// How long a hop waits for others before its batch is published.
    #[arg(long = "hop-batch-window", env = "REFBUS_HOP_BATCH_WINDOW", default_value = "10ms", value_parser = parse_duration)]
    pub window: Duration,
    /// Hops per batch at most: a full batch is published at once.
    #[arg(long = "hop-batch-size", env = "REFBUS_HOP_BATCH_SIZE", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub size: u16,
}

impl Default for HopBatchSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(10),
            size: 256,
        }
    }
}

/// The lawyer service's public register of lawyers (`LawyerRegistry`), which
/// the agency services ask for a lawyer's region, status and letter keys.
/// Connected lazily: a service starts while the lawyer service is away, and
/// a call that needs the register then fails with UNAVAILABLE.
#[derive(Clone, Debug, clap::Args)]
pub struct LawyerServiceSettings {
    /// The lawyer service's gRPC address (`https://` for TLS).
    #[arg(
        long = "lawyer-service",
        env = "REFBUS_LAWYER_SERVICE",
        default_value = DEFAULT_LAWYER_SERVICE
    )]
    pub url: String,
    /// With an `https://` address: the CA that issued the lawyer service's
    /// certificate (PEM).
    #[arg(long = "lawyer-service-ca", env = "REFBUS_LAWYER_SERVICE_CA")]
    pub ca: Option<PathBuf>,
    /// With an `https://` address: the name its certificate is issued to.
    #[arg(
        long = "lawyer-service-domain",
        env = "REFBUS_LAWYER_SERVICE_DOMAIN",
        default_value = "localhost"
    )]
    pub domain: String,
}

/// The lawyer service's default address.
pub const DEFAULT_LAWYER_SERVICE: &str = "http://127.0.0.1:50057";

impl Default for LawyerServiceSettings {
    fn default() -> Self {
        Self {
            url: DEFAULT_LAWYER_SERVICE.into(),
            ca: None,
            domain: "localhost".into(),
        }
    }
}

/// Parses `250ms`, `5s`, `2m`.
///
/// # Errors
/// A message saying what form is expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number and a unit, e.g. 500ms, 5s, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("`{text}`: unit must be ms, s or m")),
    }
}

/// The broker user of each agency service and of the tracker (what
/// `refbus broker-users` creates and the deployment definitions hold), with its
/// permissions, for `namespace`: (user, password variable suffix, permissions).
#[must_use]
pub fn broker_users(
    directory: &refbus_core::Directory,
    namespace: &str,
) -> Vec<(String, String, refbus_bus::topology::BrokerPermissions)> {
    let topology = refbus_bus::Topology::new(
        namespace,
        directory.agencies().iter().map(|a| a.id.clone()).collect(),
    );
    let mut users = Vec::new();
    for service in AgencyService::ALL {
        let agencies: Vec<&str> = directory
            .agencies()
            .iter()
            .filter(|a| service.kinds().contains(&a.kind))
            .map(|a| a.id.as_str())
            .collect();
        users.push((
            format!("{namespace}-{}", service.name()),
            service.name().to_uppercase().replace('-', "_"),
            topology.service_permissions(&agencies),
        ));
    }
    users.push((
        format!("{namespace}-tracker"),
        "TRACKER".into(),
        topology.tracker_permissions(),
    ));
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
