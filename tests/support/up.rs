//! A whole bus for a test: `refbus up` (the real binary, every agency
//! service and the tracker on embedded SQLite) in a namespace and data
//! directory of its own, with its printed addresses; and the `refbus`
//! command run against it as an agency would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;

use refbus_gateway::BusSettings;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

pub use crate::tracker::eventually;
use crate::{refbus_binary, repo_root, test_settings, within};

/// A running `refbus up`.
pub struct Up {
    child: Child,
    /// What it printed: service name (`detention-centre` ... `tracker`,
    /// `dashboard`) to URL.
    pub addrs: HashMap<String, String>,
    pub settings: BusSettings,
    pub data_dir: PathBuf,
    /// Where its standard error (its log, at info) goes.
    log_path: PathBuf,
}

/// What a `refbus` command did.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Up {
    /// Starts `refbus up` on free ports and waits for its addresses.
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// As [`Up::start`], with more environment (e.g. [`crate::mtls_env`]).
    pub async fn start_with(env: Vec<(&'static str, PathBuf)>) -> Self {
        let settings = test_settings(crate::amqp_url());
        let data_dir = std::env::temp_dir().join(format!("refbus-up-{}", settings.namespace));
        std::fs::create_dir_all(&data_dir).unwrap();
        let stderr_path = data_dir.with_extension("stderr");
        let mut child = crate::refbus_up(&settings, &data_dir, "info")
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addrs = HashMap::new();
        within("refbus up to print its addresses", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.len() >= 2 && words[1].starts_with("http") {
                    addrs.insert(
                        words[0].to_owned(),
                        words[1].trim_end_matches('/').to_owned(),
                    );
                }
                if words.first() == Some(&"tracker") {
                    break;
                }
            }
        })
        .await;
        // Everything it prints before the tracker's line: a service missing
        // means it stopped at start-up, and its standard error says why.
        assert!(
            addrs.contains_key("tracker"),
            "refbus up stopped before serving (printed {addrs:?}): {}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        // Keep reading what it prints, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            addrs,
            settings,
            data_dir,
            log_path: stderr_path,
        }
    }

    /// The URL of a service (`legal-aid`, `tracker`, `dashboard` ...).
    pub fn url(&self, service: &str) -> &str {
        self.addrs
            .get(service)
            .unwrap_or_else(|| panic!("refbus up printed no address for {service}"))
    }

    /// A gRPC client of an agency service (bearer tokens: see
    /// [`crate::as_agency`]).
    pub fn gateway(
        &self,
        service: &str,
    ) -> refbus_proto::v1::gateway_client::GatewayClient<tonic::transport::Channel> {
        refbus_proto::v1::gateway_client::GatewayClient::new(
            tonic::transport::Channel::from_shared(self.url(service).to_owned())
                .unwrap()
                .connect_lazy(),
        )
    }

    /// `refbus ARGS`, acting as `agency` through `service`'s address, with
    /// the tracker of this bus; stdout is a pipe (plain output).
    pub async fn refbus(&self, service: &str, agency: &str, args: &[&str]) -> Ran {
        let mut command = tokio::process::Command::new(refbus_binary());
        command
            .args(args)
            .env("REFBUS_AGENCY", agency)
            .env("REFBUS_SERVER", self.url(service))
            .env("REFBUS_TRACKER", self.url("tracker"))
            .env("REFBUS_DATA_DIR", &self.data_dir)
            .env_remove("REFBUS_TOKEN")
            .env_remove("DATABASE_URL")
            .current_dir(repo_root())
            .kill_on_drop(true);
        run(command).await
    }

    /// Stops it with SIGINT and removes its namespace and files.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        let exited = tokio::time::timeout(crate::PATIENCE, self.child.wait()).await;
        let log = || std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let exited = exited.unwrap_or_else(|_| {
            panic!(
                "refbus up did not exit within {:?} of SIGINT; it logged: {}",
                crate::PATIENCE,
                log()
            )
        });
        assert!(
            exited.as_ref().is_ok_and(std::process::ExitStatus::success),
            "refbus up exited with {exited:?}; it logged: {}",
            log()
        );
        let _ = std::fs::remove_file(&self.log_path);
        crate::delete_namespace(&crate::topology_of(&self.settings.namespace)).await;
        let _ = std::fs::remove_dir_all(&self.data_dir);
        crate::remove_inbox_db(&self.settings);
    }
}

/// Runs a command to its end (within the tests' patience).
pub async fn run(mut command: tokio::process::Command) -> Ran {
    let out = within("a refbus command", command.output()).await.unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An HTTP GET (plain HTTP on loopback): status and body.
pub fn http_get(url: &str, bearer: Option<&str>) -> (u16, String) {
    let mut request = ureq::get(url);
    if let Some(token) = bearer {
        request = request.header("authorization", &format!("Bearer {token}"));
    }
    let agent_request = request.config().http_status_as_error(false).build();
    let mut response = agent_request.call().unwrap();
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap();
    (status, body)
}

/// `refbus up` at a log level of the test's choosing, its standard error
/// (JSON log lines) in a file and everything it prints kept: for the tests
/// that search what the bus logged (issue 5, CQ-1.1c).
pub struct LoggedUp {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// What it printed on standard output so far.
    pub stdout: Vec<String>,
    /// Service name to URL, as it printed them.
    pub addrs: HashMap<String, String>,
    /// Where its standard error goes.
    pub log_path: PathBuf,
}

impl LoggedUp {
    /// Starts `refbus up` on `settings`, its ledger under `data_dir`, at
    /// `rust_log`, and waits for its addresses.
    pub async fn start(settings: &BusSettings, data_dir: &std::path::Path, rust_log: &str) -> Self {
        let log_path = data_dir.with_extension("log");
        std::fs::create_dir_all(data_dir).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = crate::refbus_up(settings, data_dir, rust_log)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut stdout = Vec::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addrs = HashMap::new();
        within("refbus up to print its addresses", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                stdout.push(line.clone());
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.len() >= 2 && words[1].starts_with("http://") {
                    addrs.insert(words[0].to_owned(), words[1].to_owned());
                }
                if words.first() == Some(&"tracker") {
                    break;
                }
            }
        })
        .await;
        Self {
            child,
            lines,
            stdout,
            addrs,
            log_path,
        }
    }

    /// A lazily connected channel to a service it printed.
    pub fn channel(&self, service: &str) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(self.addrs[service].clone())
            .unwrap()
            .connect_lazy()
    }

    /// Stops it with SIGINT, checks it exited cleanly, and returns all it
    /// printed on standard output and all it logged on standard error.
    pub async fn stop(mut self) -> (Vec<String>, String) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        let log_path = self.log_path.clone();
        let exited = tokio::time::timeout(crate::PATIENCE, async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                self.stdout.push(line);
            }
            self.child.wait().await.unwrap()
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "refbus up did not exit within {:?} of SIGINT; it logged: {}",
                crate::PATIENCE,
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
        assert!(exited.success(), "{exited:?}");
        let stderr = std::fs::read_to_string(&self.log_path).unwrap();
        let _ = std::fs::remove_file(&self.log_path);
        (self.stdout, stderr)
    }
}
