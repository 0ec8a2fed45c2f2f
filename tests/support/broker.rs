//! A RabbitMQ node of a test's own, on its own ports and data directory,
//! that the test may stop and start without touching the shared broker the
//! other tests use; plain AMQP, or TLS only ([`BrokerNode::start_tls`]).
//! Removed (process and directory) when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use std::process::Child;
use std::sync::Mutex;

use crate::{free_port, within};

pub struct BrokerNode {
    pub port: u16,
    dir: PathBuf,
    name: String,
    dist_port: u16,
    /// Whether its only listener is AMQP over TLS (amqps).
    tls: bool,
    /// The running `rabbitmq-server`, reaped when the node stops.
    server: Mutex<Option<Child>>,
}

impl BrokerNode {
    /// Makes the node's directory (owned by the `rabbitmq` user, which
    /// Debian's `rabbitmq-server` runs as) and starts it.
    pub async fn start() -> Self {
        Self::start_with(None, "", None).await
    }

    /// A node whose only listener is AMQP over TLS (`listeners.tcp = none`),
    /// presenting `tls`'s `server.pem` (from `deploy/dev-certs.sh`, issued
    /// by `tls`'s `ca.pem` to localhost and 127.0.0.1).
    pub async fn start_tls(tls: &Path) -> Self {
        Self::start_with(Some(tls), "", None).await
    }

    /// As [`BrokerNode::start`], with more `rabbitmq.conf` lines and an
    /// `advanced.config` (Erlang terms) for settings the new format lacks.
    pub async fn start_configured(conf: &str, advanced: Option<&str>) -> Self {
        Self::start_with(None, conf, advanced).await
    }

    async fn start_with(tls: Option<&Path>, conf: &str, advanced: Option<&str>) -> Self {
        let port = free_port();
        let name = format!("refbus-test-{port}@localhost");
        let dir = std::env::temp_dir().join(format!("refbus-node-{port}"));
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        std::fs::write(dir.join("plugins"), "[].\n").unwrap();
        let config = match tls {
            None => format!("listeners.tcp.1 = 127.0.0.1:{port}\n"),
            Some(tls) => {
                // Copies the broker may read (it runs as `rabbitmq`).
                for file in ["ca.pem", "server.pem", "server.key"] {
                    std::fs::copy(tls.join(file), dir.join(file)).unwrap();
                }
                format!(
                    "listeners.tcp = none\n\
                     listeners.ssl.1 = 127.0.0.1:{port}\n\
                     ssl_options.cacertfile = {dir}/ca.pem\n\
                     ssl_options.certfile = {dir}/server.pem\n\
                     ssl_options.keyfile = {dir}/server.key\n\
                     ssl_options.verify = verify_none\n\
                     ssl_options.fail_if_no_peer_cert = false\n",
                    dir = dir.display()
                )
            }
        };
        std::fs::write(dir.join("rabbitmq.conf"), format!("{config}{conf}\n")).unwrap();
        if let Some(advanced) = advanced {
            std::fs::write(dir.join("advanced.config"), advanced).unwrap();
        }
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(owned.success(), "chown of the node's directory");
        let node = Self {
            port,
            dir,
            name,
            dist_port: free_port(),
            tls: tls.is_some(),
            server: Mutex::new(None),
        };
        node.resume().await;
        node
    }

    /// The node's AMQP URL (`amqps://` for a TLS node).
    #[must_use]
    pub fn amqp_url(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn listening(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// Starts the node (again) on its data directory and waits until it
    /// accepts connections.
    pub async fn resume(&self) {
        let dir = &self.dir;
        let mut command = Command::new("rabbitmq-server");
        if dir.join("advanced.config").exists() {
            command.env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"));
        }
        let server = command
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        *self.server.lock().unwrap() = Some(server);
        within("the test's broker node to listen", async {
            while !self.listening() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    fn pid(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .map(|p| p.trim().to_owned())
    }

    /// Stops the node (SIGTERM, a clean shutdown) and waits until it is gone.
    pub async fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        within("the test's broker node to stop", async {
            while Command::new("kill")
                .args(["-0", &pid])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let _ = std::fs::remove_file(self.dir.join("pid"));
        self.reap();
    }

    /// Waits for the `rabbitmq-server` script, whose node has exited.
    fn reap(&self) {
        if let Some(mut server) = self.server.lock().unwrap().take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        self.reap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
