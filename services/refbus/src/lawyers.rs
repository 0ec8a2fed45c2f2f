//! What lawyers, centres and registrars do with `refbus` (issue 18):
//! `refbus lawyer ...` (a lawyer's keys, meeting requests, inbox with sealed
//! letters opened locally, complaints, ratings; a registrar's register,
//! suspend, reinstate), `refbus meeting ...` (a centre arranges, refuses,
//! records held) and `refbus letter forward` (a centre forwards a
//! detainee's letter, sealed by its service to the lawyer).
//!
//! A lawyer authenticates to the lawyer service with the token their bar
//! association or justice bureau gave them at registration. A sealed letter
//! is opened here, with the lawyer's age identity file, and nowhere else:
//! the services never hold the private key.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use refbus_core::envelope::timestamp;
use refbus_core::kind::kind_code;
use refbus_proto::v1::bar_association_client::BarAssociationClient;
use refbus_proto::v1::detention_centre_client::DetentionCentreClient;
use refbus_proto::v1::envelope::Payload;
use refbus_proto::v1::forward_letter_request::Disposition as Requested;
use refbus_proto::v1::justice_bureau_client::JusticeBureauClient;
use refbus_proto::v1::lawyer_service_client::LawyerServiceClient;
use refbus_proto::v1::letter::Disposition;
use refbus_proto::v1::{
    ArrangeMeetingRequest, CaseType, ChangeLawyerStatusRequest, Companion, Credential, Detainee,
    Envelope, FileComplaintRequest, ForwardLetterRequest, GetReferralRequest,
    LawyerAcknowledgeRequest, LawyerDelivery, LawyerInboxRequest, LawyerMeetingRequest, LawyerRole,
    Outcome, ProceduralStage, RateMeetingRequest, Receipt, RecordHeldRequest, RefusalReason,
    RefuseMeetingRequest, RegisterLawyerRequest, RequestMeetingRequest, WithholdingGround,
};
use tonic::Status;

use crate::client::{Bearer, Connection, ExitCode, Failure, Output, Rows};

type Result<T> = std::result::Result<T, Failure>;

/// The lawyer service's default address under `refbus up`.
pub const DEFAULT_LAWYER_SERVICE: &str = "http://127.0.0.1:50057";

/// Who the lawyer is, and where the lawyer service is.
#[derive(Clone, Debug, clap::Args)]
pub struct LawyerConnection {
    /// Your practice licence number (执业证号).
    #[arg(long, short = 'l', env = "REFBUS_LICENCE")]
    pub licence: String,
    /// The token your bar association or justice bureau gave you at
    /// registration.
    #[arg(long, env = "REFBUS_LAWYER_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The lawyer service.
    #[arg(long, env = "REFBUS_LAWYER_SERVICE", default_value = DEFAULT_LAWYER_SERVICE)]
    pub server: String,
    /// TLS: the CA that signed the lawyer service's certificate (PEM); use
    /// an https:// URL.
    #[arg(long, env = "REFBUS_CA")]
    pub ca: Option<PathBuf>,
    /// TLS: the name the service's certificate is issued to.
    #[arg(long, env = "REFBUS_TLS_DOMAIN", default_value = "localhost")]
    pub tls_domain: String,
    /// How to print results.
    #[arg(long, short = 'o', value_enum, default_value = "auto")]
    pub output: Output,
}

type Authorised =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

impl LawyerConnection {
    async fn client(&self) -> Result<LawyerServiceClient<Authorised>> {
        let mut endpoint =
            tonic::transport::Channel::from_shared(self.server.clone()).map_err(|e| {
                Failure::new(
                    ExitCode::Failed,
                    format!("`{}` is not a URL: {e}", self.server),
                )
            })?;
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", ca.display())))?;
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                        .domain_name(self.tls_domain.clone()),
                )
                .map_err(|e| Failure::new(ExitCode::Failed, format!("TLS: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            Failure::new(
                ExitCode::Unavailable,
                format!(
                    "cannot reach {}: {e} (is `refbus up` running?)",
                    self.server
                ),
            )
        })?;
        let bearer = Bearer::token(&self.token)?;
        Ok(LawyerServiceClient::with_interceptor(channel, bearer))
    }
}

fn status(what: &str) -> impl Fn(Status) -> Failure + '_ {
    move |s| Failure::from_status(what, &s)
}

fn print_receipt(output: Output, receipt: &Receipt, what: &str) {
    if output == Output::Json {
        println!("{}", crate::client::to_json(receipt, "Receipt"));
    } else {
        let mut rows = Rows::new(vec!["id", "to", "what"]);
        rows.push(
            vec![
                receipt.id.clone(),
                receipt.recipient.clone(),
                what.to_owned(),
            ],
            None,
        );
        rows.print(output);
    }
}

/// `refbus lawyer ...`.
#[derive(Debug, clap::Subcommand)]
pub enum LawyerAction {
    /// Make your letter key: an age X25519 identity, written to --out (mode
    /// 0600, never overwritten); prints the public key your registrar
    /// registers. Letters sealed to it open only with this file.
    ///
    /// Example: refbus lawyer keygen --out ~/.refbus/letters.key
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// (Bar association or justice bureau) Register a lawyer of your region;
    /// prints the lawyer's token, once.
    ///
    /// Example: refbus lawyer register -a dz-bar-committee --licence 15001201910000001 --name 王律师 --firm 重庆某某律师事务所 --key age1...
    Register(RegisterArgs),
    /// (Bar association or justice bureau) Suspend a lawyer of your region.
    ///
    /// Example: refbus lawyer suspend -a dz-bar-committee --licence 15001201910000001 --reason "停止执业处罚"
    Suspend(StatusChangeArgs),
    /// (Bar association or justice bureau) Reinstate a suspended lawyer.
    ///
    /// Example: refbus lawyer reinstate -a dz-bar-committee --licence 15001201910000001 --reason "处罚期满"
    Reinstate(StatusChangeArgs),
    /// Ask a detention centre for a meeting (CQ-1.3a); the credentials your
    /// role needs are checked before anything is sent (CQ-1.2).
    ///
    /// Example: refbus lawyer request-meeting -l 15001201910000001 --token $T --centre dz-detention-centre --role defence-lawyer --case-type ordinary --stage investigation --credential practice-licence --credential law-firm-letter --credential commission-or-aid-letter --detainee 张三 --key m-1
    RequestMeeting(RequestMeetingArgs),
    /// Follow your inbox: answers to your meetings, letters, notices,
    /// complaint results. With --identity, sealed letters and written
    /// refusals are opened here and printed.
    ///
    /// Example: refbus lawyer inbox -l 15001201910000001 --token $T --identity ~/.refbus/letters.key --idle 5s
    Inbox(LawyerInboxArgs),
    /// File a rights complaint (CQ-3.13) with the police, the justice
    /// bureau or the bar association; the result comes to your inbox.
    ///
    /// Example: refbus lawyer complain -l 15001201910000001 --token $T --to dz-justice-bureau --respondent dz-detention-centre --description "会见被无故拖延" --key c-1
    Complain(ComplainArgs),
    /// Rate the service of a meeting that took place (CQ-3.11b), 1 to 5.
    ///
    /// Example: refbus lawyer rate -l 15001201910000001 --token $T 0193... --score 4
    Rate(RateArgs),
}

/// `refbus lawyer register`.
#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[arg(long)]
    pub licence: String,
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value = "")]
    pub firm: String,
    /// The lawyer's region; default: yours.
    #[arg(long)]
    pub region: Option<String>,
    /// A letter key (age1...), as `refbus lawyer keygen` printed it;
    /// repeat for each device.
    #[arg(long = "key", required = true)]
    pub keys: Vec<String>,
    /// The idempotency key; default: derived from the licence.
    #[arg(long = "idempotency-key")]
    pub idempotency_key: Option<String>,
}

/// `refbus lawyer suspend` / `reinstate`.
#[derive(Debug, clap::Args)]
pub struct StatusChangeArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[arg(long)]
    pub licence: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    /// The idempotency key; default: one per licence and time.
    #[arg(long = "idempotency-key")]
    pub idempotency_key: Option<String>,
}

/// Roles that ask for a meeting, or come with the lawyer.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RoleArg {
    DefenceLawyer,
    DutyLawyer,
    Assistant,
    Intern,
    Translator,
}

impl From<RoleArg> for LawyerRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::DefenceLawyer => LawyerRole::DefenceLawyer,
            RoleArg::DutyLawyer => LawyerRole::DutyLawyer,
            RoleArg::Assistant => LawyerRole::Assistant,
            RoleArg::Intern => LawyerRole::Intern,
            RoleArg::Translator => LawyerRole::Translator,
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CaseTypeArg {
    Ordinary,
    NationalSecurity,
    Terrorism,
    Unclear,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum StageArg {
    Investigation,
    ProsecutionReview,
    Trial,
}

/// A credential's name on the command line: the proto name without
/// `CREDENTIAL_`, in kebab case (practice-licence, law-firm-letter ...).
fn credential(text: &str) -> std::result::Result<Credential, String> {
    let name = format!("CREDENTIAL_{}", text.to_uppercase().replace('-', "_"));
    Credential::from_str_name(&name)
        .filter(|c| *c != Credential::Unspecified)
        .ok_or_else(|| {
            format!("`{text}`: a credential such as practice-licence, law-firm-letter, commission-or-aid-letter, legal-aid-work-card, legal-help-request, duty-notice, intern-certificate, case-organ-permission, identity-document, investigating-organ-permission")
        })
}

/// `refbus lawyer request-meeting`.
#[derive(Debug, clap::Args)]
pub struct RequestMeetingArgs {
    #[command(flatten)]
    pub connection: LawyerConnection,
    /// The detention centre (agency id).
    #[arg(long)]
    pub centre: String,
    #[arg(long, value_enum)]
    pub role: RoleArg,
    #[arg(long, value_enum)]
    pub case_type: CaseTypeArg,
    #[arg(long, value_enum)]
    pub stage: Option<StageArg>,
    /// A credential you show (repeat): practice-licence, law-firm-letter, ...
    #[arg(long = "credential", value_parser = credential)]
    pub credentials: Vec<Credential>,
    /// The detainee's name.
    #[arg(long)]
    pub detainee: String,
    #[arg(long, default_value = "")]
    pub custody_number: String,
    /// CQ-1.3c: to confirm a termination of the commission.
    #[arg(long)]
    pub termination: bool,
    /// CQ-1.3e: the detainee is temporarily held (临时寄押).
    #[arg(long)]
    pub temporarily_held: bool,
    /// The case organ (agency id), for a CQ-1.3d verification.
    #[arg(long, default_value = "")]
    pub case_unit: String,
    /// A companion, as ROLE:NAME:CREDENTIAL[,CREDENTIAL...], e.g.
    /// assistant:李助理:law-firm-letter,intern-certificate
    #[arg(long = "companion", value_parser = companion)]
    pub companions: Vec<Companion>,
    /// The idempotency key: asking again with the same key is the same request.
    #[arg(long)]
    pub key: String,
}

fn companion(text: &str) -> std::result::Result<Companion, String> {
    let mut parts = text.splitn(3, ':');
    let (Some(role), Some(name)) = (parts.next(), parts.next()) else {
        return Err(format!("`{text}`: expected ROLE:NAME:CREDENTIAL,..."));
    };
    let role = match role {
        "assistant" => LawyerRole::Assistant,
        "intern" => LawyerRole::Intern,
        "translator" => LawyerRole::Translator,
        other => {
            return Err(format!(
                "`{other}`: a companion is an assistant, intern or translator"
            ));
        }
    };
    let credentials = parts
        .next()
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.split(',')
                .map(credential)
                .collect::<std::result::Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(Companion {
        role: role as i32,
        name: name.to_owned(),
        credentials: credentials.into_iter().map(|c| c as i32).collect(),
    })
}

/// `refbus lawyer inbox`.
#[derive(Debug, clap::Args)]
pub struct LawyerInboxArgs {
    #[command(flatten)]
    pub connection: LawyerConnection,
    /// Your letter key (`refbus lawyer keygen`): opens sealed letters and
    /// written refusals here.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Leave deliveries unacknowledged (they come again next time).
    #[arg(long)]
    pub no_ack: bool,
    /// Stop after this many deliveries.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when nothing arrives for this long (e.g. 5s).
    #[arg(long, value_parser = refbus_gateway::settings::parse_duration)]
    pub idle: Option<std::time::Duration>,
}

/// `refbus lawyer complain`.
#[derive(Debug, clap::Args)]
pub struct ComplainArgs {
    #[command(flatten)]
    pub connection: LawyerConnection,
    /// The body that investigates: a police unit, a justice bureau or a bar association.
    #[arg(long)]
    pub to: String,
    /// The body complained about.
    #[arg(long)]
    pub respondent: String,
    #[arg(long)]
    pub description: String,
    /// Ask to be heard in person (CQ-3.13).
    #[arg(long)]
    pub hearing: bool,
    #[arg(long)]
    pub key: String,
}

/// `refbus lawyer rate`.
#[derive(Debug, clap::Args)]
pub struct RateArgs {
    #[command(flatten)]
    pub connection: LawyerConnection,
    /// Your meeting request, recorded as held.
    pub meeting: String,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub score: u32,
    #[arg(long, default_value = "")]
    pub comment: String,
}

/// Runs `refbus lawyer ...`.
///
/// # Errors
/// A [`Failure`] with the exit code the refusal means.
pub async fn lawyer(action: LawyerAction) -> Result<()> {
    match action {
        LawyerAction::Keygen { out } => keygen(&out),
        LawyerAction::Register(args) => register(args).await,
        LawyerAction::Suspend(args) => change_status(args, false).await,
        LawyerAction::Reinstate(args) => change_status(args, true).await,
        LawyerAction::RequestMeeting(args) => request_meeting(args).await,
        LawyerAction::Inbox(args) => inbox(args).await,
        LawyerAction::Complain(args) => complain(args).await,
        LawyerAction::Rate(args) => rate(args).await,
    }
}

fn keygen(out: &std::path::Path) -> Result<()> {
    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(out)
        .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", out.display())))?;
    let public = identity.to_public().to_string();
    writeln!(
        file,
        "# refbus letter key (age X25519 identity)\n# public key: {public}\n{}",
        identity.to_string().expose_secret()
    )
    .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", out.display())))?;
    println!("{public}");
    Ok(())
}

/// Reads an age identity file (as `keygen` or `age-keygen` writes it).
///
/// # Errors
/// A [`Failure`] when the file cannot be read or holds no X25519 identity.
pub fn read_identity(path: &std::path::Path) -> Result<age::x25519::Identity> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", path.display())))?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .and_then(|l| age::x25519::Identity::from_str(l).ok())
        .ok_or_else(|| {
            Failure::new(
                ExitCode::Failed,
                format!(
                    "{}: no age X25519 identity (AGE-SECRET-KEY-...)",
                    path.display()
                ),
            )
        })
}

/// Opens what was sealed to `identity`.
///
/// # Errors
/// A [`Failure`] when it is not sealed to this identity.
pub fn open_sealed(sealed: &[u8], identity: &age::x25519::Identity) -> Result<Vec<u8>> {
    let fail = |e: String| {
        Failure::new(
            ExitCode::Denied,
            format!("cannot open the sealed text with this identity: {e}"),
        )
    };
    let decryptor = age::Decryptor::new(sealed).map_err(|e| fail(e.to_string()))?;
    let mut reader = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .map_err(|e| fail(e.to_string()))?;
    Ok(out)
}

async fn register(args: RegisterArgs) -> Result<()> {
    let c = &args.connection;
    let (channel, bearer) = c.service_channel().await?;
    let request = RegisterLawyerRequest {
        registrar: c.agency.clone(),
        lawyer: Some(refbus_proto::v1::Lawyer {
            name: args.name,
            licence_number: args.licence.clone(),
            law_firm: args.firm,
        }),
        region: args.region.unwrap_or_default(),
        letter_keys: args.keys,
        idempotency_key: args
            .idempotency_key
            .unwrap_or_else(|| format!("register-{}", args.licence)),
    };
    let response = if c.agency_kind()? == refbus_core::AgencyKind::JusticeBureau {
        JusticeBureauClient::with_interceptor(channel, bearer)
            .register_lawyer(request)
            .await
    } else {
        BarAssociationClient::with_interceptor(channel, bearer)
            .register_lawyer(request)
            .await
    }
    .map_err(status("register"))?
    .into_inner();
    println!("token\t{}", response.token);
    if let Some(receipt) = &response.receipt {
        eprintln!("registration {} sent to {}", receipt.id, receipt.recipient);
    }
    Ok(())
}

async fn change_status(args: StatusChangeArgs, reinstate: bool) -> Result<()> {
    let c = &args.connection;
    let (channel, bearer) = c.service_channel().await?;
    let request = ChangeLawyerStatusRequest {
        registrar: c.agency.clone(),
        licence_number: args.licence.clone(),
        reason: args.reason,
        idempotency_key: args.idempotency_key.unwrap_or_else(|| {
            format!(
                "{}-{}-{}",
                if reinstate { "reinstate" } else { "suspend" },
                args.licence,
                Utc::now().timestamp_millis()
            )
        }),
    };
    let what = if reinstate { "reinstate" } else { "suspend" };
    let receipt = if c.agency_kind()? == refbus_core::AgencyKind::JusticeBureau {
        let mut client = JusticeBureauClient::with_interceptor(channel, bearer);
        if reinstate {
            client.reinstate_lawyer(request).await
        } else {
            client.suspend_lawyer(request).await
        }
    } else {
        let mut client = BarAssociationClient::with_interceptor(channel, bearer);
        if reinstate {
            client.reinstate_lawyer(request).await
        } else {
            client.suspend_lawyer(request).await
        }
    }
    .map_err(status(what))?
    .into_inner();
    print_receipt(c.output.resolved(), &receipt, what);
    Ok(())
}

async fn request_meeting(args: RequestMeetingArgs) -> Result<()> {
    let c = &args.connection;
    let stage = match args.stage {
        None => ProceduralStage::Unspecified,
        Some(StageArg::Investigation) => ProceduralStage::Investigation,
        Some(StageArg::ProsecutionReview) => ProceduralStage::ProsecutionReview,
        Some(StageArg::Trial) => ProceduralStage::Trial,
    };
    let case_type = match args.case_type {
        CaseTypeArg::Ordinary => CaseType::Ordinary,
        CaseTypeArg::NationalSecurity => CaseType::NationalSecurity,
        CaseTypeArg::Terrorism => CaseType::Terrorism,
        CaseTypeArg::Unclear => CaseType::Unclear,
    };
    let receipt = c
        .client()
        .await?
        .request_meeting(RequestMeetingRequest {
            licence_number: c.licence.clone(),
            meeting: Some(LawyerMeetingRequest {
                role: LawyerRole::from(args.role) as i32,
                detainee: Some(Detainee {
                    name: args.detainee,
                    custody_number: args.custody_number,
                    ..Detainee::default()
                }),
                credentials: args.credentials.into_iter().map(|c| c as i32).collect(),
                to_confirm_termination: args.termination,
                case_type: case_type as i32,
                stage: stage as i32,
                temporarily_held: args.temporarily_held,
                detention_centre: args.centre,
                case_unit: args.case_unit,
                companions: args.companions,
                ..LawyerMeetingRequest::default()
            }),
            idempotency_key: args.key,
        })
        .await
        .map_err(status("request-meeting"))?
        .into_inner();
    print_receipt(c.output.resolved(), &receipt, "meeting request");
    Ok(())
}

/// What a delivery says, for a lawyer's terminal: opened with `identity`
/// where it carries something sealed.
fn describe(envelope: &Envelope, identity: Option<&age::x25519::Identity>) -> Result<String> {
    let open = |sealed: &[u8]| -> Result<String> {
        Ok(match identity {
            Some(identity) => String::from_utf8_lossy(&open_sealed(sealed, identity)?).into_owned(),
            None => format!("(sealed, {} bytes: --identity opens it)", sealed.len()),
        })
    };
    Ok(match &envelope.payload {
        Some(Payload::Letter(letter)) => match &letter.disposition {
            Some(Disposition::SealedContent(sealed)) => format!("letter: {}", open(sealed)?),
            Some(Disposition::WithheldOn(ground)) => format!(
                "letter withheld (CQ-1.1c) on {}",
                WithholdingGround::try_from(*ground)
                    .map_or("an unknown ground", |g| g.as_str_name())
            ),
            _ => "letter".into(),
        },
        Some(Payload::Feedback(feedback)) => {
            let outcome =
                Outcome::try_from(feedback.outcome).map_or("unknown", |o| o.as_str_name());
            let mut text = format!("answer to {}: {outcome}", envelope.in_reply_to);
            if let Some(at) = &feedback.arranged_for {
                text.push_str(&format!(" for {}", crate::client::when(Some(at))));
            }
            if let Some(refusal) = &feedback.refusal {
                let reason =
                    RefusalReason::try_from(refusal.reason).map_or("unknown", |r| r.as_str_name());
                text.push_str(&format!(", reason {reason}: {}", refusal.explanation));
                if !refusal.sealed_written_refusal.is_empty() {
                    text.push_str(&format!(
                        "; written refusal: {}",
                        open(&refusal.sealed_written_refusal)?
                    ));
                }
            } else if !feedback.summary.is_empty() {
                text.push_str(&format!(": {}", feedback.summary));
            }
            text
        }
        Some(Payload::DetaineeUnavailableNotice(notice)) => format!(
            "detainee unavailable (SH-2.5), booking {}",
            notice.booking_reference
        ),
        _ => kind_code(envelope.kind).to_owned(),
    })
}

async fn inbox(args: LawyerInboxArgs) -> Result<()> {
    let c = &args.connection;
    let identity = args.identity.as_deref().map(read_identity).transpose()?;
    let mut client = c.client().await?;
    let mut stream = client
        .inbox(LawyerInboxRequest {
            licence_number: c.licence.clone(),
            window: args
                .count
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        })
        .await
        .map_err(status("inbox"))?
        .into_inner();
    let output = c.output.resolved();
    let mut seen = 0_u64;
    loop {
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
        let Some(delivery): Option<LawyerDelivery> =
            crate::client::next_delivery(&mut stream, args.idle).await?
        else {
            break;
        };
        seen += 1;
        let envelope = delivery.envelope.clone().unwrap_or_default();
        let text = describe(&envelope, identity.as_ref())?;
        if !args.no_ack {
            client
                .acknowledge(LawyerAcknowledgeRequest {
                    licence_number: c.licence.clone(),
                    delivery_token: delivery.delivery_token.clone(),
                    ..LawyerAcknowledgeRequest::default()
                })
                .await
                .map_err(status("acknowledge"))?;
        }
        if output == Output::Json {
            let mut value = crate::client::to_json(&delivery, "LawyerDelivery");
            if let Some(object) = value.as_object_mut() {
                object.insert("text".into(), text.into());
                object.insert("acknowledged".into(), (!args.no_ack).into());
            }
            println!("{value}");
        } else {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                delivery.delivery_token,
                envelope.id,
                envelope.sender,
                crate::client::when(envelope.submitted_at.as_ref()),
                text
            );
        }
    }
    if output != Output::Json {
        eprintln!("{seen} deliveries");
    }
    Ok(())
}

async fn complain(args: ComplainArgs) -> Result<()> {
    let c = &args.connection;
    let receipt = c
        .client()
        .await?
        .file_complaint(FileComplaintRequest {
            licence_number: c.licence.clone(),
            investigated_by: args.to,
            respondent: args.respondent,
            description: args.description,
            hearing_requested: args.hearing,
            idempotency_key: args.key,
        })
        .await
        .map_err(status("complain"))?
        .into_inner();
    print_receipt(c.output.resolved(), &receipt, "rights complaint (CQ-3.13)");
    Ok(())
}

async fn rate(args: RateArgs) -> Result<()> {
    let c = &args.connection;
    let receipt = c
        .client()
        .await?
        .rate_meeting(RateMeetingRequest {
            licence_number: c.licence.clone(),
            meeting_request_id: args.meeting.clone(),
            score: args.score,
            comment: args.comment,
            idempotency_key: format!("rate-{}", args.meeting),
        })
        .await
        .map_err(status("rate"))?
        .into_inner();
    print_receipt(c.output.resolved(), &receipt, "rating (CQ-3.11b)");
    Ok(())
}

/// `refbus meeting ...` (a detention centre answers a meeting request).
#[derive(Debug, clap::Subcommand)]
pub enum MeetingAction {
    /// The meeting is arranged (CQ-1.3a); the lawyer is told when.
    ///
    /// Example: refbus meeting arrange -a dz-detention-centre 0193... --at 2026-12-03T09:00:00+08:00
    Arrange {
        #[command(flatten)]
        connection: Connection,
        /// The meeting request's id.
        request: String,
        #[arg(long)]
        at: DateTime<Utc>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// The meeting cannot be arranged: the lawyer and your supervisor are
    /// told why (a reason your territory's policy allows; never "no
    /// booking" in Chongqing, CQ-2.5).
    ///
    /// Example: refbus meeting refuse -a dz-detention-centre 0193... --reason no-room-available --explanation "会见室已满，明日上午安排"
    /// Example: refbus meeting refuse -a dz-detention-centre 0193... --reason detainee-refuses-in-writing --written-refusal refusal.pdf
    Refuse {
        #[command(flatten)]
        connection: Connection,
        request: String,
        #[arg(long, value_enum)]
        reason: ReasonArg,
        #[arg(long, default_value = "")]
        explanation: String,
        /// CQ-1.3c: the detainee's written refusal (a scan), sealed to the lawyer.
        #[arg(long)]
        written_refusal: Option<PathBuf>,
    },
    /// The meeting (or interrogation) took place: the only thing that
    /// meets the 48-hour duty (CQ-1.3a), and the service time of the
    /// queue (CQ-1.3b).
    ///
    /// Example: refbus meeting held -a dz-detention-centre 0193...
    Held {
        #[command(flatten)]
        connection: Connection,
        request: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

/// Refusal reasons (envelope.proto `RefusalReason`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ReasonArg {
    CredentialsNotValid,
    PermissionNotGiven,
    DetaineeRefusesInWriting,
    DetaineeUnavailable,
    VerificationPending,
    NoBooking,
    NoRoomAvailable,
}

impl From<ReasonArg> for RefusalReason {
    fn from(r: ReasonArg) -> Self {
        match r {
            ReasonArg::CredentialsNotValid => RefusalReason::CredentialsNotValid,
            ReasonArg::PermissionNotGiven => RefusalReason::PermissionNotGiven,
            ReasonArg::DetaineeRefusesInWriting => RefusalReason::DetaineeRefusesInWriting,
            ReasonArg::DetaineeUnavailable => RefusalReason::DetaineeUnavailable,
            ReasonArg::VerificationPending => RefusalReason::VerificationPending,
            ReasonArg::NoBooking => RefusalReason::NoBooking,
            ReasonArg::NoRoomAvailable => RefusalReason::NoRoomAvailable,
        }
    }
}

/// The request as delivered, from the tracker (the centre is its recipient).
async fn delivered(c: &Connection, id: &str) -> Result<Envelope> {
    c.tracker_client()
        .await?
        .get_referral(GetReferralRequest {
            agency: c.agency.clone(),
            referral_id: id.to_owned(),
        })
        .await
        .map_err(status("reading the request"))?
        .into_inner()
        .envelope
        .ok_or_else(|| {
            Failure::new(
                ExitCode::Denied,
                format!("{} may see only the metadata of {id}", c.agency),
            )
        })
}

/// Runs `refbus meeting ...`.
///
/// # Errors
/// A [`Failure`] with the exit code the refusal means.
pub async fn meeting(action: MeetingAction) -> Result<()> {
    let (c, receipt, what) = match action {
        MeetingAction::Arrange {
            connection,
            request,
            at,
            note,
        } => {
            let envelope = delivered(&connection, &request).await?;
            let (channel, bearer) = connection.service_channel().await?;
            let receipt = DetentionCentreClient::with_interceptor(channel, bearer)
                .arrange_meeting(ArrangeMeetingRequest {
                    detention_centre: connection.agency.clone(),
                    request: Some(envelope),
                    arranged_for: Some(timestamp(at)),
                    note,
                    idempotency_key: format!("arrange-{request}"),
                })
                .await
                .map_err(status("arrange"))?
                .into_inner();
            (connection, receipt, "arranged")
        }
        MeetingAction::Refuse {
            connection,
            request,
            reason,
            explanation,
            written_refusal,
        } => {
            let written_refusal = written_refusal
                .map(|path| {
                    std::fs::read(&path).map_err(|e| {
                        Failure::new(ExitCode::Failed, format!("{}: {e}", path.display()))
                    })
                })
                .transpose()?
                .unwrap_or_default();
            let envelope = delivered(&connection, &request).await?;
            let (channel, bearer) = connection.service_channel().await?;
            let receipt = DetentionCentreClient::with_interceptor(channel, bearer)
                .refuse_meeting(RefuseMeetingRequest {
                    detention_centre: connection.agency.clone(),
                    request: Some(envelope),
                    reason: RefusalReason::from(reason) as i32,
                    explanation,
                    written_refusal,
                    idempotency_key: format!("refuse-{request}"),
                })
                .await
                .map_err(status("refuse"))?
                .into_inner();
            (connection, receipt, "refused")
        }
        MeetingAction::Held {
            connection,
            request,
            note,
        } => {
            let envelope = delivered(&connection, &request).await?;
            let (channel, bearer) = connection.service_channel().await?;
            let receipt = DetentionCentreClient::with_interceptor(channel, bearer)
                .record_held(RecordHeldRequest {
                    detention_centre: connection.agency.clone(),
                    request: Some(envelope),
                    note,
                    idempotency_key: format!("held-{request}"),
                })
                .await
                .map_err(status("held"))?
                .into_inner();
            (connection, receipt, "held")
        }
    };
    print_receipt(c.output.resolved(), &receipt, what);
    Ok(())
}

/// `refbus letter ...` (a detention centre forwards a detainee's letter).
#[derive(Debug, clap::Subcommand)]
pub enum LetterAction {
    /// Forward a detainee's letter to the addressed lawyer (CQ-1.1c):
    /// sealed by your service to the lawyer's keys; nothing on the way
    /// can read it. Or record it withheld, on a lawful ground.
    ///
    /// Example: refbus letter forward -a dz-detention-centre --lawyer 15001201910000001 --detainee 张三 --file letter.txt --key l-1
    /// Example: refbus letter forward -a dz-detention-centre --lawyer 15001201910000001 --detainee 张三 --withheld-on collusion-or-evidence-destruction --key l-2
    Forward(ForwardLetterArgs),
}

/// `refbus letter forward`.
#[derive(Debug, clap::Args)]
pub struct ForwardLetterArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The addressed lawyer's licence number.
    #[arg(long)]
    pub lawyer: String,
    /// The detainee's name.
    #[arg(long)]
    pub detainee: String,
    #[arg(long, default_value = "")]
    pub custody_number: String,
    /// The letter (any bytes), read from this file.
    #[arg(
        long,
        conflicts_with = "withheld_on",
        required_unless_present = "withheld_on"
    )]
    pub file: Option<PathBuf>,
    /// The ground it was withheld on (CQ-1.1c).
    #[arg(long, value_enum)]
    pub withheld_on: Option<GroundArg>,
    /// When the detainee handed it over (the CQ-1.1c clock); default: now.
    #[arg(long)]
    pub handed_over: Option<DateTime<Utc>>,
    #[arg(long)]
    pub key: String,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GroundArg {
    NationalSecurity,
    PublicSafety,
    SeriousDangerToPerson,
    CollusionOrEvidenceDestruction,
}

/// Runs `refbus letter ...`.
///
/// # Errors
/// A [`Failure`] with the exit code the refusal means.
pub async fn letter(action: LetterAction) -> Result<()> {
    let LetterAction::Forward(args) = action;
    let c = &args.connection;
    let disposition = match (&args.file, args.withheld_on) {
        (Some(path), _) => Requested::Content(
            std::fs::read(path)
                .map_err(|e| Failure::new(ExitCode::Failed, format!("{}: {e}", path.display())))?,
        ),
        (None, Some(ground)) => Requested::WithheldOn(match ground {
            GroundArg::NationalSecurity => WithholdingGround::NationalSecurity,
            GroundArg::PublicSafety => WithholdingGround::PublicSafety,
            GroundArg::SeriousDangerToPerson => WithholdingGround::SeriousDangerToPerson,
            GroundArg::CollusionOrEvidenceDestruction => {
                WithholdingGround::CollusionOrEvidenceDestruction
            }
        } as i32),
        (None, None) => {
            return Err(Failure::new(
                ExitCode::Refused,
                "--file or --withheld-on: one is required",
            ));
        }
    };
    let (channel, bearer) = c.service_channel().await?;
    let receipt = DetentionCentreClient::with_interceptor(channel, bearer)
        .forward_letter(ForwardLetterRequest {
            detention_centre: c.agency.clone(),
            detainee: Some(Detainee {
                name: args.detainee,
                custody_number: args.custody_number,
                ..Detainee::default()
            }),
            lawyer_licence: args.lawyer,
            disposition: Some(disposition),
            handed_over_at: Some(timestamp(args.handed_over.unwrap_or_else(Utc::now))),
            idempotency_key: args.key,
        })
        .await
        .map_err(status("letter forward"))?
        .into_inner();
    print_receipt(
        c.output.resolved(),
        &receipt,
        "letter (sealed to the lawyer)",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_companions_parse_from_the_command_line() {
        assert_eq!(credential("law-firm-letter"), Ok(Credential::LawFirmLetter));
        assert!(credential("passport").is_err());
        let c = companion("assistant:李助理:law-firm-letter,intern-certificate").unwrap();
        assert_eq!(c.role, LawyerRole::Assistant as i32);
        assert_eq!(c.credentials.len(), 2);
        assert!(companion("judge:x:").is_err());
    }

    #[test]
    fn a_keygen_identity_opens_what_is_sealed_to_its_public_key() {
        let dir = std::env::temp_dir().join(format!("refbus-keygen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("letters.key");
        let _ = std::fs::remove_file(&path);
        keygen(&path).unwrap();
        assert!(keygen(&path).is_err(), "never overwritten");
        let identity = read_identity(&path).unwrap();
        let sealed =
            refbus_gateway::letters::seal(&[identity.to_public().to_string()], b"hi").unwrap();
        assert_eq!(open_sealed(&sealed, &identity).unwrap(), b"hi");
        let other = age::x25519::Identity::generate();
        assert!(open_sealed(&sealed, &other).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
