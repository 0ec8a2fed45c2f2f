//! The desk and supervisor commands of `refbus`: what a person or a script
//! does against a running bus as one agency (`send`, `inbox`, `ack`,
//! `feedback`, `status`, `overdue`, `report`), and the offline checks
//! (`policy check`, `audit verify`).
//!
//! Each call is authenticated like any agency system's: with the agency's
//! bearer token (development default `dev-<agency>`, as `refbus up`
//! accepts), over TLS when `--ca` names the CA of the services'
//! certificate, or with a client certificate (mutual TLS). Output is a table on a terminal, tab-separated lines on a
//! pipe, or JSON (`--output json`, protobuf's JSON mapping). Exit codes
//! say what went wrong ([`ExitCode`]), so scripts can branch on them.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::OnceLock;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use comfy_table::{Cell, Color, ContentArrangement, Table, presets};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use refbus_core::envelope::{from_timestamp, timestamp};
use refbus_core::kind::{hop_code_of, kind_code, obligation_state_text};
use refbus_core::{Directory, KindExt};
use refbus_gateway::AgencyService;
use refbus_proto::v1::gateway_client::GatewayClient;
use refbus_proto::v1::tracker_client::TrackerClient;
use refbus_proto::v1::{
    AcknowledgeRequest, ComplianceReportRequest, Delivery, Envelope, Feedback, FeedbackRequest,
    GetReferralRequest, InboxRequest, ListObligationsRequest, Obligation, ObligationFilter,
    ObligationState, Outcome, ReportFormat, SubmitRequest,
};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// What a failed command exits with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Anything not below.
    Failed = 1,
    /// The bus refused the input as invalid, or found no route for it
    /// (INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE).
    Refused = 3,
    /// Not authenticated, or not allowed: acting as another agency, or
    /// sending what a rule forbids (UNAUTHENTICATED, PERMISSION_DENIED).
    Denied = 4,
    /// No such referral, agency or delivery (NOT_FOUND).
    NotFound = 5,
    /// The service, the broker or the ledger cannot be reached (UNAVAILABLE,
    /// DEADLINE_EXCEEDED, connection refused).
    Unavailable = 6,
    /// A check found a problem: `directory check`, `policy check`,
    /// `audit verify`, `ack` with tokens not pending.
    CheckFailed = 7,
}

/// The exit codes, for `--help`.
pub const EXIT_CODES: &str = "Exit codes: 0 success; 1 other failure; 2 bad command line; \
3 refused as invalid (or no route); 4 not authenticated, or not allowed (another agency, or a rule forbids it); \
5 not found; 6 service, broker or ledger unreachable; 7 a check found a problem.";

/// A command's failure: the message and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ExitCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ExitCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A gRPC refusal, with the exit code its status means.
    #[must_use]
    pub fn from_status(what: &str, status: &Status) -> Self {
        let code = match status.code() {
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange => ExitCode::Refused,
            Code::Unauthenticated | Code::PermissionDenied => ExitCode::Denied,
            Code::NotFound => ExitCode::NotFound,
            Code::Unavailable | Code::DeadlineExceeded => ExitCode::Unavailable,
            _ => ExitCode::Failed,
        };
        Self::new(
            code,
            format!("{what}: {:?}: {}", status.code(), status.message()),
        )
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table on a terminal, tab-separated lines on a pipe.
    Auto,
    /// Always a table.
    Table,
    /// Tab-separated lines, a header first.
    Plain,
    /// JSON (one object per line for streams).
    Json,
}

/// Who is calling, and where.
#[derive(Clone, Debug, clap::Args)]
pub struct Connection {
    /// The agency you act as (its id in the directory).
    #[arg(long, short = 'a', env = "REFBUS_AGENCY")]
    pub agency: String,
    /// Your agency's bearer token; for development `dev-<agency>` (what
    /// `refbus up` accepts) when unset.
    #[arg(long, env = "REFBUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The agency service to call; default: the one serving your agency's
    /// kind on 127.0.0.1 (detention-centre 50051 ... bar-association 50055).
    #[arg(long, env = "REFBUS_SERVER")]
    pub server: Option<String>,
    /// The tracker to ask.
    #[arg(long, env = "REFBUS_TRACKER", default_value = "http://127.0.0.1:50056")]
    pub tracker: String,
    #[arg(
        long,
        env = "REFBUS_DIRECTORY",
        default_value = "deploy/local/directory.toml"
    )]
    pub directory: PathBuf,
    /// How to print results.
    #[arg(long, short = 'o', value_enum, default_value = "auto")]
    pub output: Output,
    /// Mutual TLS (services run with `--auth mtls`): your agency's client
    /// certificate (PEM), whose URI SAN names the agency.
    #[arg(long, env = "REFBUS_CLIENT_CERT", requires_all = ["client_key", "ca"])]
    pub client_cert: Option<PathBuf>,
    /// Mutual TLS: the certificate's private key (PEM).
    #[arg(long, env = "REFBUS_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// TLS: the CA that signed the services' certificate (PEM). With a
    /// token, the services serve TLS with bearer tokens; with
    /// --client-cert, mutual TLS. Use https:// URLs.
    #[arg(long, env = "REFBUS_CA")]
    pub ca: Option<PathBuf>,
    /// TLS: the name the services' certificate is issued to.
    #[arg(long, env = "REFBUS_TLS_DOMAIN", default_value = "localhost")]
    pub tls_domain: String,
}

type Authorised = InterceptedService<Channel, Bearer>;

/// Adds the agency's bearer token to every call (nothing with mutual TLS).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// `authorization: Bearer <token>` on every call.
    pub(crate) fn token(token: &str) -> Result<Self> {
        format!("Bearer {token}")
            .parse()
            .map(|v| Bearer(Some(v)))
            .map_err(|_| Failure::new(ExitCode::Failed, "--token: not a valid header value"))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Connection {
    /// The bearer token to send; none with mutual TLS (the certificate
    /// names the agency).
    fn bearer(&self) -> Result<Bearer> {
        if self.client_cert.is_some() {
            return Ok(Bearer(None));
        }
        let token = self
            .token
            .clone()
            .unwrap_or_else(|| format!("dev-{}", self.agency));
        format!("Bearer {token}")
            .parse()
            .map(|v| Bearer(Some(v)))
            .map_err(|_| Failure::new(ExitCode::Failed, "--token: not a valid header value"))
    }

    /// The client side of TLS, when `--ca` is given: the services'
    /// certificate checked against it, and the client certificate with
    /// mutual TLS.
    fn tls(&self) -> Result<Option<tonic::transport::ClientTlsConfig>> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", path.display())))
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca)?))
            .domain_name(self.tls_domain.clone());
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(Some(tls))
    }

    async fn channel(&self, url: &str) -> Result<Channel> {
        let mut endpoint = Channel::from_shared(url.to_owned())
            .map_err(|e| Failure::new(ExitCode::Failed, format!("`{url}` is not a URL: {e}")))?;
        if let Some(tls) = self.tls()? {
            if !url.starts_with("https://") {
                return Err(Failure::new(
                    ExitCode::Failed,
                    format!("--ca: TLS needs an https:// URL, not `{url}`"),
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Failure::new(ExitCode::Failed, format!("TLS for {url}: {e}")))?;
        }
        endpoint.connect().await.map_err(|e| {
            Failure::new(
                ExitCode::Unavailable,
                format!("cannot reach {url}: {e} (is `refbus up` running?)"),
            )
        })
    }

    /// The agency service serving `--agency`.
    async fn gateway(&self) -> Result<GatewayClient<Authorised>> {
        let (channel, bearer) = self.service_channel().await?;
        Ok(GatewayClient::with_interceptor(channel, bearer))
    }

    /// The kind of `--agency`, from the directory.
    pub(crate) fn agency_kind(&self) -> Result<refbus_core::AgencyKind> {
        let directory = Directory::load(&self.directory)
            .map_err(|e| Failure::new(ExitCode::Failed, e.to_string()))?;
        directory.get(&self.agency).map(|a| a.kind).ok_or_else(|| {
            Failure::new(
                ExitCode::NotFound,
                format!(
                    "--agency: `{}` is not in {}",
                    self.agency,
                    self.directory.display()
                ),
            )
        })
    }

    /// A channel to the agency service serving `--agency`, and the
    /// credentials to call it with (for its agency-specific services).
    pub(crate) async fn service_channel(&self) -> Result<(Channel, Bearer)> {
        let url = match &self.server {
            Some(url) => url.clone(),
            None => {
                let directory = Directory::load(&self.directory)
                    .map_err(|e| Failure::new(ExitCode::Failed, e.to_string()))?;
                let agency = directory.get(&self.agency).ok_or_else(|| {
                    Failure::new(
                        ExitCode::NotFound,
                        format!(
                            "--agency: `{}` is not in {}",
                            self.agency,
                            self.directory.display()
                        ),
                    )
                })?;
                let service = AgencyService::ALL
                    .into_iter()
                    .find(|s| s.kinds().contains(&agency.kind))
                    .ok_or_else(|| {
                        Failure::new(ExitCode::Failed, "no agency service serves this kind")
                    })?;
                let scheme = if self.ca.is_some() { "https" } else { "http" };
                format!("{scheme}://127.0.0.1:{}", service.default_port())
            }
        };
        Ok((self.channel(&url).await?, self.bearer()?))
    }

    /// The tracker, for the commands of other modules.
    pub(crate) async fn tracker_client(&self) -> Result<TrackerClient<Authorised>> {
        self.tracker().await
    }

    async fn tracker(&self) -> Result<TrackerClient<Authorised>> {
        Ok(TrackerClient::with_interceptor(
            self.channel(&self.tracker).await?,
            self.bearer()?,
        ))
    }

    fn output(&self) -> Output {
        self.output.resolved()
    }
}

impl Output {
    /// `Auto` made definite: a table on a terminal, plain lines on a pipe.
    #[must_use]
    pub fn resolved(self) -> Output {
        match self {
            Output::Auto if std::io::stdout().is_terminal() => Output::Table,
            Output::Auto => Output::Plain,
            other => other,
        }
    }
}

/// The refbus descriptors, for protobuf's JSON mapping.
fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The descriptor set is compiled into refbus-proto: a start-up invariant.
        #[allow(clippy::expect_used)]
        DescriptorPool::decode(refbus_proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes")
    })
}

/// A refbus message as JSON (field names as in the .proto files).
pub(crate) fn to_json<M: Message>(message: &M, name: &str) -> serde_json::Value {
    let Some(descriptor) = pool().get_message_by_name(&format!("refbus.v1.{name}")) else {
        return serde_json::Value::Null;
    };
    let Ok(dynamic) = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()) else {
        return serde_json::Value::Null;
    };
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    let mut out = serde_json::Serializer::new(Vec::new());
    if dynamic.serialize_with_options(&mut out, &options).is_err() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.into_inner()).unwrap_or(serde_json::Value::Null)
}

/// An envelope from a JSON or TOML file (protobuf's JSON mapping: e.g.
/// `{"recipient": "dz-duty-desk", "legal_help_request": {...}}`).
fn envelope_from_file(path: &std::path::Path) -> Result<Envelope> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", path.display())))?;
    let bad = |e: &dyn std::fmt::Display| {
        Failure::new(ExitCode::Refused, format!("{}: {e}", path.display()))
    };
    let value: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(&e))?;
        serde_json::to_value(table).map_err(|e| bad(&e))?
    } else {
        serde_json::from_str(&text).map_err(|e| bad(&e))?
    };
    let descriptor = pool()
        .get_message_by_name("refbus.v1.Envelope")
        .ok_or_else(|| Failure::new(ExitCode::Failed, "refbus.v1.Envelope is not compiled in"))?;
    let dynamic = DynamicMessage::deserialize(descriptor, value).map_err(|e| {
        bad(&format!(
            "not a refbus.v1.Envelope (protobuf JSON, field names as in envelope.proto): {e}"
        ))
    })?;
    Envelope::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| bad(&e))
}

pub(crate) fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(from_timestamp)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// Rows printed as a table (terminal) or tab-separated lines (pipe).
pub(crate) struct Rows {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    /// A row's colour on a terminal (index into `rows`), e.g. overdue in red.
    colours: Vec<Option<Color>>,
}

impl Rows {
    pub(crate) fn new(header: Vec<&'static str>) -> Self {
        Self {
            header,
            rows: Vec::new(),
            colours: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, row: Vec<String>, colour: Option<Color>) {
        self.rows.push(row);
        self.colours.push(colour);
    }

    pub(crate) fn print(&self, output: Output) {
        if output == Output::Table {
            let colour = std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal();
            let mut table = Table::new();
            table
                .load_style(presets::UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_header(self.header.clone());
            for (row, c) in self.rows.iter().zip(&self.colours) {
                table.add_row(row.iter().map(|text| {
                    let cell = Cell::new(text);
                    match c {
                        Some(c) if colour => cell.fg(*c),
                        _ => cell,
                    }
                }));
            }
            println!("{table}");
        } else {
            println!("{}", self.header.join("\t"));
            for row in &self.rows {
                let cleaned: Vec<String> =
                    row.iter().map(|c| c.replace(['\t', '\n'], " ")).collect();
                println!("{}", cleaned.join("\t"));
            }
        }
    }
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

/// A receipt as JSON, or as one row under `header`.
fn print_receipt(
    output: Output,
    receipt: &refbus_proto::v1::Receipt,
    header: &[&'static str],
    row: impl FnOnce() -> Vec<String>,
) {
    if output == Output::Json {
        print_json(&to_json(receipt, "Receipt"));
    } else {
        let mut rows = Rows::new(header.to_vec());
        rows.push(row(), None);
        rows.print(output);
    }
}

/// `refbus send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The envelope, as JSON or TOML (protobuf's JSON mapping, field names
    /// as in proto/refbus/v1/envelope.proto); `sender` defaults to --agency.
    /// Several files are sent in one `SubmitBatch` call (500 a call), each
    /// answered on its own: one line per file, in order.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The recipient (overrides the file's).
    #[arg(long)]
    pub to: Option<String>,
    /// The idempotency key (overrides the file's): sending again with the
    /// same key is the same message.
    #[arg(long)]
    pub key: Option<String>,
    /// When the clock started (RFC 3339, e.g. the detainee's request time
    /// for CQ-1.1b); overrides the file's.
    #[arg(long)]
    pub clock_started: Option<DateTime<Utc>>,
}

/// Submits one envelope and prints its receipt; several, with
/// `SubmitBatch`, printing each one's receipt or refusal.
///
/// # Errors
/// A file that is not an envelope (nothing sent); with one file, its
/// refusal; with several, after every result is printed, the first
/// refusal's exit code (the others were sent).
pub async fn send(args: SendArgs) -> Result<()> {
    let c = &args.connection;
    if args.files.len() > 1 && args.key.is_some() {
        return Err(Failure::new(
            ExitCode::Refused,
            "--key names one message: with several files, each file's idempotency_key names its own",
        ));
    }
    let mut envelopes = Vec::with_capacity(args.files.len());
    for file in &args.files {
        let mut envelope = envelope_from_file(file)?;
        if envelope.sender.is_empty() {
            envelope.sender.clone_from(&c.agency);
        }
        if let Some(to) = &args.to {
            envelope.recipient.clone_from(to);
        }
        if let Some(key) = &args.key {
            envelope.idempotency_key.clone_from(key);
        }
        if let Some(at) = args.clock_started {
            envelope.clock_started_at = Some(timestamp(at));
        }
        envelopes.push(envelope);
    }
    if envelopes.len() > 1 {
        return send_batch(c, &args.files, envelopes).await;
    }
    let Some(envelope) = envelopes.pop() else {
        return Err(Failure::new(ExitCode::Refused, "send: no file given"));
    };
    let receipt = c
        .gateway()
        .await?
        .submit(SubmitRequest {
            envelope: Some(envelope),
        })
        .await
        .map_err(|s| Failure::from_status("send", &s))?
        .into_inner();
    print_receipt(
        c.output(),
        &receipt,
        &["id", "recipient", "also to", "submitted"],
        || {
            vec![
                receipt.id.clone(),
                receipt.recipient.clone(),
                receipt.also_to.join(", "),
                when(receipt.submitted_at.as_ref()),
            ]
        },
    );
    Ok(())
}

/// Sends several envelopes with `SubmitBatch`, at most
/// [`refbus_gateway::gateway::MAX_BATCH`] a call; prints one line (or JSON
/// object) per file, in order: its receipt, or the code and message it
/// was refused with.
async fn send_batch(c: &Connection, files: &[PathBuf], envelopes: Vec<Envelope>) -> Result<()> {
    use refbus_proto::v1::{SubmitBatchRequest, submit_result};
    let output = c.output();
    let mut client = c.gateway().await?;
    let mut results = Vec::with_capacity(envelopes.len());
    let mut envelopes = envelopes.into_iter().peekable();
    while envelopes.peek().is_some() {
        let chunk: Vec<Envelope> = envelopes
            .by_ref()
            .take(refbus_gateway::gateway::MAX_BATCH)
            .collect();
        let answered = client
            .submit_batch(SubmitBatchRequest { envelopes: chunk })
            .await
            .map_err(|s| Failure::from_status("send", &s))?
            .into_inner()
            .results;
        results.extend(answered);
    }
    let mut rows = Rows::new(vec![
        "file",
        "id",
        "recipient",
        "also to",
        "submitted",
        "error",
    ]);
    let mut first_refusal = None;
    let mut refused = 0;
    for (file, result) in files.iter().zip(&results) {
        let file = file.display().to_string();
        if output == Output::Json {
            let mut value = to_json(result, "SubmitResult");
            if let Some(object) = value.as_object_mut() {
                object.insert("file".into(), serde_json::Value::String(file.clone()));
            }
            print_json(&value);
        }
        match &result.result {
            Some(submit_result::Result::Receipt(receipt)) => rows.push(
                vec![
                    file,
                    receipt.id.clone(),
                    receipt.recipient.clone(),
                    receipt.also_to.join(", "),
                    when(receipt.submitted_at.as_ref()),
                    String::new(),
                ],
                None,
            ),
            refusal => {
                let status = match refusal {
                    Some(submit_result::Result::Error(e)) => {
                        Status::new(Code::from(e.code), e.message.clone())
                    }
                    _ => Status::internal("the service gave no result for this envelope"),
                };
                refused += 1;
                let error = format!("{:?}: {}", status.code(), status.message());
                first_refusal.get_or_insert_with(|| (file.clone(), status));
                rows.push(
                    vec![
                        file,
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                        error,
                    ],
                    Some(Color::Red),
                );
            }
        }
    }
    if output != Output::Json {
        rows.print(output);
    }
    match first_refusal {
        None if results.len() == files.len() => Ok(()),
        None => Err(Failure::new(
            ExitCode::Failed,
            format!(
                "send: the service answered {} of {} envelopes",
                results.len(),
                files.len()
            ),
        )),
        Some((file, status)) => {
            let failure = Failure::from_status(&format!("send {file}"), &status);
            Err(Failure::new(
                failure.code,
                format!(
                    "{refused} of {} not sent (the others were); first: {}",
                    files.len(),
                    failure.message
                ),
            ))
        }
    }
}

/// `refbus inbox`.
#[derive(Debug, clap::Args)]
pub struct InboxArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Only print deliveries: leave them unacknowledged (they return to
    /// the queue when this stops, or `refbus ack TOKEN` takes them).
    #[arg(long)]
    pub no_ack: bool,
    /// Stop after this many deliveries.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when nothing arrives for this long (e.g. 5s); default: follow
    /// until Ctrl-C.
    #[arg(long, value_parser = refbus_gateway::settings::parse_duration)]
    pub idle: Option<std::time::Duration>,
}

/// Follows an agency's inbox, printing (and acknowledging) each delivery.
pub async fn inbox(args: InboxArgs) -> Result<()> {
    let c = &args.connection;
    let output = c.output();
    let mut client = c.gateway().await?;
    let mut stream = client
        .inbox(InboxRequest {
            agency: c.agency.clone(),
            // `--count N` asks for no more than it will read.
            window: args
                .count
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        })
        .await
        .map_err(|s| Failure::from_status("inbox", &s))?
        .into_inner();
    if output != Output::Json {
        println!(
            "{}",
            [
                "token",
                "id",
                "kind",
                "from",
                "submitted",
                "redelivered",
                "acknowledged"
            ]
            .join("\t")
        );
    }
    let mut seen = 0_u64;
    loop {
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
        let Some(delivery): Option<Delivery> = next_delivery(&mut stream, args.idle).await? else {
            break;
        };
        seen += 1;
        let acknowledged = if args.no_ack {
            false
        } else {
            client
                .acknowledge(AcknowledgeRequest {
                    agency: c.agency.clone(),
                    delivery_token: delivery.delivery_token.clone(),
                    ..AcknowledgeRequest::default()
                })
                .await
                .map_err(|s| Failure::from_status("acknowledge", &s))?;
            true
        };
        let envelope = delivery.envelope.clone().unwrap_or_default();
        if output == Output::Json {
            let mut value = to_json(&delivery, "Delivery");
            if let Some(object) = value.as_object_mut() {
                object.insert("acknowledged".into(), acknowledged.into());
            }
            print_json(&value);
        } else {
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                delivery.delivery_token,
                envelope.id,
                kind_code(envelope.kind),
                envelope.sender,
                when(envelope.submitted_at.as_ref()),
                if delivery.redelivered { "yes" } else { "no" },
                if acknowledged { "yes" } else { "no" },
            );
        }
    }
    if output != Output::Json {
        eprintln!("{seen} deliveries");
    }
    Ok(())
}

/// The next delivery of an inbox stream; `None` when it ends, or when
/// nothing comes for `idle`.
///
/// # Errors
/// The stream's refusal, with its exit code.
pub(crate) async fn next_delivery<T>(
    stream: &mut tonic::Streaming<T>,
    idle: Option<std::time::Duration>,
) -> Result<Option<T>> {
    let next = match idle {
        Some(idle) => match tokio::time::timeout(idle, stream.next()).await {
            Ok(next) => next,
            Err(_) => return Ok(None),
        },
        None => stream.next().await,
    };
    next.transpose()
        .map_err(|status| Failure::from_status("inbox", &status))
}

/// `refbus ack`.
#[derive(Debug, clap::Args)]
pub struct AckArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Delivery tokens, as `refbus inbox --no-ack` printed them.
    #[arg(required = true)]
    pub tokens: Vec<String>,
}

/// Acknowledges deliveries handed over on an open `Inbox` stream.
pub async fn ack(args: AckArgs) -> Result<()> {
    let c = &args.connection;
    let total = args.tokens.len();
    let response = c
        .gateway()
        .await?
        .acknowledge(AcknowledgeRequest {
            agency: c.agency.clone(),
            delivery_tokens: args.tokens,
            ..AcknowledgeRequest::default()
        })
        .await
        .map_err(|s| Failure::from_status("ack", &s))?
        .into_inner();
    let done = total - response.not_pending.len();
    println!("acknowledged {done} of {total}");
    if response.not_pending.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(
            ExitCode::CheckFailed,
            format!(
                "not pending on an open Inbox stream of {}: {}",
                c.agency,
                response.not_pending.join(", ")
            ),
        ))
    }
}

/// `refbus feedback`.
#[derive(Debug, clap::Args)]
pub struct FeedbackArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The referral answered.
    pub referral: String,
    /// The outcome.
    #[arg(long, value_enum)]
    pub outcome: OutcomeArg,
    /// What was done, in words (goes to the referral's sender; never logged).
    #[arg(long, default_value = "")]
    pub summary: String,
    /// The idempotency key; default: derived from the referral.
    #[arg(long)]
    pub key: Option<String>,
}

/// Feedback outcomes (envelope.proto `Outcome`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OutcomeArg {
    Done,
    LawyerAssigned,
    Refused,
    Substantiated,
    Unsubstantiated,
    Sanctioned,
    TransferredForProsecution,
    Relayed,
    Heard,
}

impl From<OutcomeArg> for Outcome {
    fn from(o: OutcomeArg) -> Self {
        match o {
            OutcomeArg::Done => Outcome::Done,
            OutcomeArg::LawyerAssigned => Outcome::LawyerAssigned,
            OutcomeArg::Refused => Outcome::Refused,
            OutcomeArg::Substantiated => Outcome::Substantiated,
            OutcomeArg::Unsubstantiated => Outcome::Unsubstantiated,
            OutcomeArg::Sanctioned => Outcome::Sanctioned,
            OutcomeArg::TransferredForProsecution => Outcome::TransferredForProsecution,
            OutcomeArg::Relayed => Outcome::Relayed,
            OutcomeArg::Heard => Outcome::Heard,
        }
    }
}

/// Answers a referral: fetches it from the tracker (the answering agency
/// is a party, so it reads the whole envelope), then sends the feedback.
pub async fn feedback(args: FeedbackArgs) -> Result<()> {
    let c = &args.connection;
    let status = c
        .tracker()
        .await?
        .get_referral(GetReferralRequest {
            agency: c.agency.clone(),
            referral_id: args.referral.clone(),
        })
        .await
        .map_err(|s| Failure::from_status("feedback: reading the referral", &s))?
        .into_inner();
    let referral = status.envelope.ok_or_else(|| {
        Failure::new(
            ExitCode::Denied,
            format!(
                "{} may see only the metadata of {}",
                c.agency, args.referral
            ),
        )
    })?;
    let receipt = c
        .gateway()
        .await?
        .feedback(FeedbackRequest {
            agency: c.agency.clone(),
            feedback: Some(Feedback {
                outcome: Outcome::from(args.outcome) as i32,
                summary: args.summary,
                ..Feedback::default()
            }),
            idempotency_key: args
                .key
                .unwrap_or_else(|| format!("feedback-{}", args.referral)),
            referral: Some(referral),
        })
        .await
        .map_err(|s| Failure::from_status("feedback", &s))?
        .into_inner();
    print_receipt(
        c.output(),
        &receipt,
        &["feedback id", "to", "answers"],
        || {
            vec![
                receipt.id.clone(),
                receipt.recipient.clone(),
                args.referral.clone(),
            ]
        },
    );
    Ok(())
}

/// `refbus status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The referral's id.
    pub referral: String,
}

/// A referral's timeline and obligations.
pub async fn status(args: StatusArgs) -> Result<()> {
    let c = &args.connection;
    let status = c
        .tracker()
        .await?
        .get_referral(GetReferralRequest {
            agency: c.agency.clone(),
            referral_id: args.referral,
        })
        .await
        .map_err(|s| Failure::from_status("status", &s))?
        .into_inner();
    let output = c.output();
    if output == Output::Json {
        print_json(&to_json(&status, "ReferralStatus"));
        return Ok(());
    }
    println!(
        "{} {} from {} to {}, clock started {}",
        kind_code(status.kind),
        status.id,
        status.sender,
        status.recipient,
        when(status.clock_started_at.as_ref())
    );
    let mut timeline = Rows::new(vec!["at", "hop", "agency"]);
    for entry in &status.timeline {
        timeline.push(
            vec![
                when(entry.at.as_ref()),
                hop_code_of(entry.hop).to_owned(),
                entry.agency.clone(),
            ],
            None,
        );
    }
    timeline.print(output);
    if !status.obligations.is_empty() {
        obligations_rows(&status.obligations).print(output);
    }
    Ok(())
}

fn obligations_rows(obligations: &[Obligation]) -> Rows {
    let mut rows = Rows::new(vec![
        "rule", "duty", "bearer", "referral", "due", "met", "state",
    ]);
    for o in obligations {
        let colour = match ObligationState::try_from(o.state) {
            Ok(ObligationState::Overdue) => Some(Color::Red),
            Ok(ObligationState::MetLate) => Some(Color::Yellow),
            Ok(ObligationState::MetOnTime) => Some(Color::Green),
            _ => None,
        };
        rows.push(
            vec![
                o.rule.clone(),
                o.duty.clone(),
                o.bearer.clone(),
                o.referral_id.clone(),
                when(o.due_at.as_ref()),
                when(o.met_at.as_ref()),
                obligation_state_text(o.state).to_owned(),
            ],
            colour,
        );
    }
    rows
}

/// `refbus overdue`.
#[derive(Debug, clap::Args)]
pub struct OverdueArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Also list obligations open and not yet due.
    #[arg(long)]
    pub all: bool,
    /// Only this rule (e.g. CQ-1.1b).
    #[arg(long)]
    pub rule: Option<String>,
}

/// The agency's overdue (or all unmet) obligations, every page.
pub async fn overdue(args: OverdueArgs) -> Result<()> {
    let c = &args.connection;
    let mut tracker = c.tracker().await?;
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = tracker
            .list_obligations(ListObligationsRequest {
                agency: c.agency.clone(),
                filter: if args.all {
                    ObligationFilter::Unspecified
                } else {
                    ObligationFilter::Overdue
                } as i32,
                rule: args.rule.clone().unwrap_or_default(),
                page_size: 1000,
                page_token,
                ..ListObligationsRequest::default()
            })
            .await
            .map_err(|s| Failure::from_status("overdue", &s))?
            .into_inner();
        all.extend(page.obligations);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    match c.output() {
        Output::Json => {
            for o in &all {
                print_json(&to_json(o, "Obligation"));
            }
        }
        output => {
            obligations_rows(&all).print(output);
            if output == Output::Table {
                println!("{} obligations", all.len());
            }
        }
    }
    Ok(())
}

/// `refbus report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// First day of the period (YYYY-MM-DD, UTC).
    #[arg(long)]
    pub from: NaiveDate,
    /// Day after the period (YYYY-MM-DD, UTC): --from 2026-10-01 --to 2026-11-01 is October.
    #[arg(long)]
    pub to: NaiveDate,
    /// html (a self-contained page with a chart), csv or table.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormatArg,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormatArg {
    Html,
    Csv,
    Table,
}

/// The compliance report (CQ-3.11) for a period.
pub async fn report(args: ReportArgs) -> Result<()> {
    let c = &args.connection;
    let day = |d: NaiveDate| Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN));
    let format = match args.format {
        ReportFormatArg::Html => ReportFormat::Html,
        ReportFormatArg::Csv => ReportFormat::Csv,
        ReportFormatArg::Table => ReportFormat::Table,
    };
    let report = c
        .tracker()
        .await?
        .compliance_report(ComplianceReportRequest {
            agency: c.agency.clone(),
            from: Some(timestamp(day(args.from))),
            to: Some(timestamp(day(args.to))),
            format: format as i32,
        })
        .await
        .map_err(|s| Failure::from_status("report", &s))?
        .into_inner();
    match args.out {
        Some(path) => {
            std::fs::write(&path, &report.rendered)
                .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", path.display())))?;
            eprintln!("wrote {} ({} rows)", path.display(), report.rows.len());
        }
        None => print!("{}", report.rendered),
    }
    Ok(())
}

/// `refbus policy check`: loads and validates the catalogue against the
/// directory; prints its rules.
pub fn policy_check(
    dir: &std::path::Path,
    directory: &std::path::Path,
    output: Output,
) -> Result<()> {
    let directory = Directory::load(directory)
        .map_err(|e| Failure::new(ExitCode::CheckFailed, e.to_string()))?;
    let policy = refbus_core::policy::PolicyCatalogue::load(dir, &directory)
        .map_err(|e| Failure::new(ExitCode::CheckFailed, e.to_string()))?;
    let output = match output {
        Output::Auto if std::io::stdout().is_terminal() => Output::Table,
        Output::Auto | Output::Json => Output::Plain,
        other => other,
    };
    let mut rows = Rows::new(vec!["rule", "kind", "duty", "deadline"]);
    for rule in policy.rules() {
        rows.push(
            vec![
                rule.rule.clone(),
                rule.kind.code().to_owned(),
                rule.duty.clone(),
                rule.deadline_text.clone(),
            ],
            None,
        );
    }
    rows.print(output);
    println!(
        "{}: {} obligation rules, {} notices, valid",
        dir.display(),
        policy.rules().len(),
        policy.notices().len()
    );
    Ok(())
}

/// `refbus audit verify`: walks the ledger's hash chain, with a progress
/// bar on a terminal.
pub async fn audit_verify(tracker: &refbus_tracker::TrackerSettings) -> Result<()> {
    use refbus_tracker::audit::{self, Verdict};
    let unavailable =
        |e: &dyn std::fmt::Display| Failure::new(ExitCode::Unavailable, format!("ledger: {e}"));
    let url = tracker.database().map_err(|e| unavailable(&e))?;
    let ledger = refbus_tracker::ledger::Ledger::connect(&url, tracker.database_schema.as_deref())
        .await
        .map_err(|e| unavailable(&e))?;
    let total = audit::event_count(&ledger)
        .await
        .map_err(|e| unavailable(&e))?;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} events ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("verifying the hash chain");
    let verdict = audit::verify_reporting(&ledger, &|done| bar.set_position(done))
        .await
        .map_err(|e| unavailable(&e))?;
    bar.finish_and_clear();
    ledger.close().await;
    println!("{verdict}");
    match verdict {
        Verdict::Intact { .. } => Ok(()),
        Verdict::Broken { .. } => Err(Failure::new(
            ExitCode::CheckFailed,
            "the ledger's hash chain is broken (see above)",
        )),
    }
}
