//! Issue 7: the deployment files are consistent. `deploy/compose.yaml`, the
//! Kubernetes manifests of `deploy/k8s/`, the cluster's RabbitMQ
//! configuration and definitions and the systemd units are parsed and
//! checked against each other and against the bus's own topology and broker
//! permissions (the functions behind `refbus topology` and `refbus
//! broker-users`). No Docker, cluster or network: this is CI's
//! `docker compose config`, which also runs when the compose plugin is there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use base64::Engine;
use refbus_bus::Topology;
use refbus_bus::topology::BrokerPermissions;
use refbus_core::Directory;
use refbus_gateway::AgencyService;
use refbus_tests::{refbus_binary, repo_root};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use yaml_serde::Value as Yaml;

/// The bus namespace and vhost every deployment file uses.
const NAMESPACE: &str = "refbus";
const VHOST: &str = "/";
/// The definitions the cluster loads at boot, relative to `deploy/`.
const CLUSTER_DEFINITIONS: &str = "rabbitmq/cluster-definitions.json";

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

/// The documents of a YAML file (`---`-separated), merge keys applied.
fn yaml_documents(path: &Path) -> Vec<Yaml> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut documents = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(["---"]) {
        if line.trim_end() == "---" {
            let mut document: Yaml = yaml_serde::from_str(&current)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            document
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            if !document.is_null() {
                documents.push(document);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    documents
}

/// A scalar as text.
fn text(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// The entries of a mapping, as text.
fn strings(value: Option<&Yaml>) -> BTreeMap<String, String> {
    match value {
        None | Some(Yaml::Null) => BTreeMap::new(),
        Some(Yaml::Mapping(m)) => m.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Some(other) => panic!("expected a mapping, got {other:?}"),
    }
}

/// The items of a sequence (none when absent).
fn items(value: Option<&Yaml>) -> &[Yaml] {
    value.and_then(Yaml::as_sequence).map_or(&[], Vec::as_slice)
}

/// The port of `host:port`.
fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("`{address}`: expected host:port"))
}

/// The user, password and host of an `amqp://user:password@host:port/vhost` URL.
fn amqp_credentials(url: &str) -> (String, String, String) {
    let rest = url
        .strip_prefix("amqp://")
        .unwrap_or_else(|| panic!("`{url}`: not amqp://"));
    let (credentials, address) = rest.split_once('@').expect("credentials in AMQP_URL");
    let (user, password) = credentials.split_once(':').expect("user:password");
    let host = address.split([':', '/']).next().unwrap();
    (user.into(), password.into(), host.into())
}

/// Whether a `rabbit_password_hashing_sha256` hash is that of `password`:
/// base64(4-byte salt ++ sha256(salt ++ password)).
fn hash_matches(hash: &str, password: &str) -> bool {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(hash)
        .expect("password_hash is base64");
    if bytes.len() != 4 + 32 {
        return false;
    }
    let (salt, digest) = bytes.split_at(4);
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    hasher.finalize().as_slice() == digest
}

/// The development password of a broker user (deploy/rabbitmq/cluster-definitions.py).
fn development_password(user: &str) -> String {
    format!("dev-{user}")
}

/// The deployment name of each refbus service: the five agency services and the tracker.
fn service_names() -> Vec<&'static str> {
    AgencyService::ALL
        .iter()
        .map(|s| s.name())
        .chain(["tracker"])
        .collect()
}

/// The gRPC port of each service: the agency services' defaults, then the tracker's.
fn grpc_port(service: &str) -> u16 {
    AgencyService::ALL
        .iter()
        .find(|s| s.name() == service)
        .map_or(50056, |s| s.default_port())
}

fn directory() -> Directory {
    Directory::load(deploy().join("local/directory.toml")).unwrap()
}

fn topology(directory: &Directory) -> Topology {
    Topology::new(
        NAMESPACE,
        directory.agencies().iter().map(|a| a.id.clone()).collect(),
    )
}

/// Each service's broker user and its permissions: what `refbus
/// broker-users` makes them (the same function).
fn broker_users() -> Vec<(String, BrokerPermissions)> {
    refbus_gateway::settings::broker_users(&directory(), NAMESPACE)
        .into_iter()
        .map(|(user, _, permissions)| (user, permissions))
        .collect()
}

fn cluster_definitions() -> Json {
    let path = deploy().join(CLUSTER_DEFINITIONS);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// The password hash of `user` in the cluster definitions.
fn password_hash_of(definitions: &Json, user: &str) -> String {
    definitions["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == user)
        .unwrap_or_else(|| panic!("no user `{user}` in {CLUSTER_DEFINITIONS}"))["password_hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Checks that an AMQP URL logs in as `user` with a password the definitions accept.
fn assert_logs_in_as(url: &str, user: &str, definitions: &Json, what: &str) {
    let (url_user, password, _) = amqp_credentials(url);
    assert_eq!(url_user, user, "{what}: AMQP_URL user");
    assert!(
        hash_matches(&password_hash_of(definitions, user), &password),
        "{what}: the password in AMQP_URL is not {user}'s in {CLUSTER_DEFINITIONS}"
    );
}

// --- compose --------------------------------------------------------------

fn compose() -> Yaml {
    let mut documents = yaml_documents(&deploy().join("compose.yaml"));
    assert_eq!(documents.len(), 1, "compose.yaml is one document");
    documents.remove(0)
}

fn compose_services(compose: &Yaml) -> BTreeMap<String, Yaml> {
    compose["services"]
        .as_mapping()
        .expect("compose.yaml: services")
        .iter()
        .map(|(k, v)| (text(k), v.clone()))
        .collect()
}

/// A compose service's environment, mapping or `KEY=value` list.
fn compose_environment(service: &Yaml) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Yaml::Sequence(list)) => list
            .iter()
            .map(|entry| {
                let entry = text(entry);
                let (k, v) = entry.split_once('=').unwrap_or((&entry, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        other => strings(other),
    }
}

/// (source, target) of a compose service's volumes, short or long syntax.
fn compose_mounts(service: &Yaml) -> Vec<(String, String)> {
    items(service.get("volumes"))
        .iter()
        .map(|volume| match volume {
            Yaml::String(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap().to_owned();
                let target = parts.next().expect("source:target").to_owned();
                (source, target)
            }
            long => (text(&long["source"]), text(&long["target"])),
        })
        .collect()
}

/// Whether a volume source is a path on the host rather than a named volume.
fn is_bind(source: &str) -> bool {
    source.starts_with(['.', '/', '~'])
}

/// The (host, container) ports a compose service publishes.
fn compose_ports(service: &Yaml) -> Vec<(u16, u16)> {
    items(service.get("ports"))
        .iter()
        .map(|port| {
            let port = text(port);
            let port = port.split('/').next().unwrap();
            let parts: Vec<&str> = port.split(':').collect();
            let container = parts[parts.len() - 1].parse().unwrap();
            let host = if parts.len() >= 2 {
                parts[parts.len() - 2].parse().unwrap()
            } else {
                container
            };
            (host, container)
        })
        .collect()
}

#[test]
fn compose_references_only_what_it_defines() {
    let compose = compose();
    let services = compose_services(&compose);
    let declared: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .map(|volumes| volumes.keys().map(text).collect())
        .unwrap_or_default();
    let mut used = BTreeSet::new();
    let mut published = BTreeMap::new();
    for (name, service) in &services {
        let depends: Vec<String> = match service.get("depends_on") {
            Some(Yaml::Mapping(m)) => m.keys().map(text).collect(),
            other => items(other).iter().map(text).collect(),
        };
        for dependency in depends {
            assert!(
                services.contains_key(&dependency),
                "{name} depends on `{dependency}`, which compose.yaml does not define"
            );
        }
        for (source, target) in compose_mounts(service) {
            if is_bind(&source) {
                let path = deploy().join(&source);
                assert!(
                    path.exists(),
                    "{name} mounts {source} (at {target}), which does not exist"
                );
            } else {
                assert!(
                    declared.contains(&source),
                    "{name} uses volume `{source}`, not declared under volumes"
                );
                used.insert(source);
            }
        }
        if let Some(build) = service.get("build") {
            let context = deploy().join(text(&build["context"]));
            assert!(context.is_dir(), "{name}: build context {context:?}");
            let dockerfile = build.get("dockerfile").map_or("Dockerfile".into(), text);
            assert!(
                context.join(&dockerfile).is_file(),
                "{name}: no {dockerfile} in its build context"
            );
        }
        for (host, _) in compose_ports(service) {
            if let Some(other) = published.insert(host, name.clone()) {
                panic!("{name} and {other} both publish host port {host}");
            }
        }
    }
    assert_eq!(
        used, declared,
        "every declared volume is used, and only those"
    );
}

/// `key = value` lines of a rabbitmq.conf.
fn rabbitmq_conf(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("`{l}`"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

#[test]
fn compose_clusters_three_rabbitmq_nodes_that_load_the_definitions() {
    let services = compose_services(&compose());
    let nodes: Vec<(&String, &Yaml)> = services
        .iter()
        .filter(|(_, s)| {
            s.get("image")
                .is_some_and(|i| text(i).starts_with("rabbitmq:"))
                && s.get("hostname").is_some()
        })
        .collect();
    assert_eq!(nodes.len(), 3, "three clustered RabbitMQ nodes");
    let cookies: BTreeSet<String> = nodes
        .iter()
        .map(|(name, node)| {
            compose_environment(node)
                .remove("RABBITMQ_ERLANG_COOKIE")
                .unwrap_or_else(|| panic!("{name}: no RABBITMQ_ERLANG_COOKIE"))
        })
        .collect();
    assert_eq!(cookies.len(), 1, "the nodes share one Erlang cookie");
    assert!(!cookies.first().unwrap().is_empty());

    let mut node_names = BTreeSet::new();
    for (name, node) in &nodes {
        let hostname = text(&node["hostname"]);
        node_names.insert(format!("rabbit@{hostname}"));
        let mounts: BTreeMap<String, String> = compose_mounts(node)
            .into_iter()
            .map(|(s, t)| (t, s))
            .collect();
        let conf_source = mounts
            .get("/etc/rabbitmq/rabbitmq.conf")
            .unwrap_or_else(|| panic!("{name} mounts no rabbitmq.conf"));
        let conf = rabbitmq_conf(&deploy().join(conf_source));
        assert_eq!(
            conf.get("cluster_formation.peer_discovery_backend")
                .map(String::as_str),
            Some("classic_config"),
            "{name}: classic config peer discovery"
        );
        let definitions = conf
            .get("load_definitions")
            .unwrap_or_else(|| panic!("{name}: rabbitmq.conf loads no definitions"));
        let source = mounts
            .get(definitions)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {definitions}"));
        assert_eq!(
            deploy().join(source).canonicalize().unwrap(),
            deploy().join(CLUSTER_DEFINITIONS).canonicalize().unwrap(),
            "{name} loads the cluster definitions"
        );
        assert_eq!(
            conf.get("quorum_queue.continuous_membership_reconciliation.target_group_size")
                .map(String::as_str),
            Some("3"),
            "{name}: quorum queues grow to the three nodes"
        );
    }
    let conf = rabbitmq_conf(&deploy().join("rabbitmq/rabbitmq.conf"));
    let listed: BTreeSet<String> = conf
        .iter()
        .filter(|(k, _)| k.starts_with("cluster_formation.classic_config.nodes."))
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(
        listed, node_names,
        "rabbitmq.conf lists exactly the compose nodes"
    );

    // The load balancer in front of them reaches each node.
    let haproxy = std::fs::read_to_string(deploy().join("rabbitmq/haproxy.cfg")).unwrap();
    let servers: BTreeSet<String> = haproxy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .map(|l| format!("rabbit@{}", port_host(l.split_whitespace().nth(1).unwrap())))
        .collect();
    assert_eq!(
        servers, node_names,
        "haproxy.cfg balances over exactly the nodes"
    );
}

/// The host of `host:port`.
fn port_host(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

#[test]
fn compose_runs_every_service_as_its_own_broker_user() {
    let services = compose_services(&compose());
    let definitions = cluster_definitions();
    let mut ports = BTreeSet::new();
    for name in service_names() {
        let service = services
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml has no service `{name}`"));
        let command: Vec<String> = items(service.get("command")).iter().map(text).collect();
        let expected = if name == "tracker" {
            vec!["tracker".to_owned()]
        } else {
            vec!["serve".to_owned(), name.to_owned()]
        };
        assert_eq!(command, expected, "{name}: command");
        let env = compose_environment(service);
        let url = env
            .get("AMQP_URL")
            .unwrap_or_else(|| panic!("{name}: no AMQP_URL"));
        assert_logs_in_as(url, &format!("{NAMESPACE}-{name}"), &definitions, name);
        let (_, _, host) = amqp_credentials(url);
        assert!(services.contains_key(&host), "{name}: AMQP host `{host}`");
        assert_eq!(
            env.get("REFBUS_DECLARE_TOPOLOGY").map(String::as_str),
            Some("false"),
            "{name}: the topology comes from the definitions"
        );
        let listen = if name == "tracker" {
            "REFBUS_TRACKER_LISTEN"
        } else {
            "REFBUS_LISTEN"
        };
        let grpc = port_of(&env[listen]);
        let http = port_of(&env["REFBUS_HTTP_LISTEN"]);
        assert_eq!(grpc, grpc_port(name), "{name}: its usual gRPC port");
        assert_eq!(
            http,
            grpc + 1000,
            "{name}: /metrics on the gRPC port + 1000"
        );
        assert!(
            ports.insert(grpc) && ports.insert(http),
            "{name}: ports shared"
        );
        let published: BTreeSet<u16> = compose_ports(service).into_iter().map(|(_, c)| c).collect();
        assert!(
            published.contains(&grpc) && published.contains(&http),
            "{name}: publishes {grpc} and {http}"
        );
        if name == "tracker" {
            let database = &env["DATABASE_URL"];
            let host = database
                .split('@')
                .nth(1)
                .and_then(|a| a.split([':', '/']).next())
                .unwrap();
            assert!(
                services.contains_key(host),
                "tracker: database host `{host}`"
            );
        }
    }
}

// --- RabbitMQ definitions -----------------------------------------------

#[test]
fn cluster_definitions_hold_the_topology_and_a_user_per_service() {
    let definitions = cluster_definitions();
    let expected = topology(&directory()).definitions(VHOST);
    for kind in ["exchanges", "queues", "bindings"] {
        let present = definitions[kind].as_array().unwrap();
        for item in expected[kind].as_array().unwrap() {
            assert!(
                present.contains(item),
                "{CLUSTER_DEFINITIONS} lacks {kind} {item} (run deploy/rabbitmq/cluster-definitions.py on `refbus topology`)"
            );
        }
    }
    let vhost = definitions["vhosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == VHOST)
        .expect("the vhost");
    assert_eq!(vhost["metadata"]["default_queue_type"], "quorum");

    let find = |kind: &str, user: &str| -> Json {
        definitions[kind]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["user"] == user && p["vhost"] == VHOST)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} for {user}"))
    };
    for (user, permissions) in broker_users() {
        let record = definitions["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == user.as_str())
            .unwrap_or_else(|| panic!("no user {user}"));
        assert_eq!(
            record["hashing_algorithm"],
            "rabbit_password_hashing_sha256"
        );
        assert!(
            hash_matches(
                record["password_hash"].as_str().unwrap(),
                &development_password(&user)
            ),
            "{user}'s password_hash is not that of its development password"
        );
        assert_eq!(record["tags"], serde_json::json!([]), "{user}: no tags");
        let granted = find("permissions", &user);
        assert_eq!(
            granted["configure"],
            permissions.configure.as_str(),
            "{user}"
        );
        assert_eq!(granted["write"], permissions.write.as_str(), "{user}");
        assert_eq!(granted["read"], permissions.read.as_str(), "{user}");
        let topic = find("topic_permissions", &user);
        assert_eq!(
            topic["exchange"],
            format!("{NAMESPACE}.deliveries").as_str()
        );
        assert_eq!(topic["write"], permissions.topic_write.as_str(), "{user}");
        assert_eq!(topic["read"], "^$", "{user}");
    }
    let admin = format!("{NAMESPACE}-admin");
    assert!(hash_matches(
        &password_hash_of(&definitions, &admin),
        &development_password(&admin)
    ));
}

// --- Kubernetes -----------------------------------------------------------

fn k8s() -> PathBuf {
    deploy().join("k8s")
}

/// The files a kustomize generator reads (`key=path` or `path`): (key, path).
fn generator_files(generator: &Yaml) -> Vec<(String, PathBuf)> {
    items(generator.get("files"))
        .iter()
        .map(|entry| {
            let entry = text(entry);
            let (key, path) = match entry.split_once('=') {
                Some((key, path)) => (key.to_owned(), path.to_owned()),
                None => (
                    Path::new(&entry)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    entry.clone(),
                ),
            };
            (key, k8s().join(path))
        })
        .collect()
}

/// The file names in a directory (not its subdirectories).
fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn name_of(object: &Yaml) -> String {
    text(&object["metadata"]["name"])
}

/// A port a container declares: its name (if any) and number.
type Port = (Option<String>, u64);

/// The ports a container declares.
fn container_ports(container: &Yaml) -> Vec<Port> {
    items(container.get("ports"))
        .iter()
        .map(|p| {
            (
                p.get("name").map(text),
                p["containerPort"].as_u64().expect("containerPort"),
            )
        })
        .collect()
}

/// The number of the port named `name`.
fn named_port(ports: &[Port], name: &str) -> u64 {
    ports
        .iter()
        .find(|(n, _)| n.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no port named {name}"))
        .1
}

/// A generated Secret: its files, and whether its name is kept as written.
struct GeneratedSecret {
    files: Vec<(String, PathBuf)>,
    fixed_name: bool,
}

/// The manifests kustomization.yaml builds, with what they may refer to.
struct Manifests {
    kustomization: Yaml,
    /// Every object of the listed resources.
    objects: Vec<Yaml>,
    /// The placeholder Secrets (not a resource of the kustomization).
    secrets_example: Vec<Yaml>,
    /// ConfigMaps, generated or listed: name to the files it is made from.
    config_maps: BTreeMap<String, Vec<(String, PathBuf)>>,
    generated_secrets: BTreeMap<String, GeneratedSecret>,
    /// Every Secret a pod may use (generated or placeholder): name to keys.
    secrets: BTreeMap<String, BTreeSet<String>>,
}

impl Manifests {
    fn load() -> Self {
        let kustomization = yaml_documents(&k8s().join("kustomization.yaml")).remove(0);
        let objects = items(kustomization.get("resources"))
            .iter()
            .flat_map(|f| yaml_documents(&k8s().join(text(f))))
            .collect();
        let secrets_example = yaml_documents(&k8s().join("secrets.example.yaml"));
        let mut config_maps: BTreeMap<String, Vec<(String, PathBuf)>> =
            items(kustomization.get("configMapGenerator"))
                .iter()
                .map(|g| (text(&g["name"]), generator_files(g)))
                .collect();
        let generated_secrets: BTreeMap<String, GeneratedSecret> =
            items(kustomization.get("secretGenerator"))
                .iter()
                .map(|g| {
                    let fixed_name = g
                        .get("options")
                        .and_then(|o| o.get("disableNameSuffixHash"))
                        .and_then(Yaml::as_bool)
                        == Some(true);
                    let files = generator_files(g);
                    (text(&g["name"]), GeneratedSecret { files, fixed_name })
                })
                .collect();
        let mut secrets: BTreeMap<String, BTreeSet<String>> = generated_secrets
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.files.iter().map(|(k, _)| k.clone()).collect(),
                )
            })
            .collect();
        for secret in &secrets_example {
            assert_eq!(
                secret["kind"], "Secret",
                "secrets.example.yaml holds Secrets"
            );
            let keys = strings(secret.get("stringData"))
                .into_keys()
                .chain(strings(secret.get("data")).into_keys())
                .collect();
            secrets.insert(name_of(secret), keys);
        }
        let mut manifests = Self {
            kustomization,
            objects,
            secrets_example,
            config_maps: BTreeMap::new(),
            generated_secrets,
            secrets,
        };
        for map in manifests.of_kind("ConfigMap") {
            config_maps.insert(name_of(map), Vec::new());
        }
        manifests.config_maps = config_maps;
        manifests
    }

    fn of_kind(&self, kind: &str) -> Vec<&Yaml> {
        self.objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    }

    /// Deployments and StatefulSets.
    fn workloads(&self) -> Vec<&Yaml> {
        let mut workloads = self.of_kind("Deployment");
        workloads.extend(self.of_kind("StatefulSet"));
        workloads
    }

    fn config_map_keys(&self, name: &str) -> BTreeSet<String> {
        self.config_maps
            .get(name)
            .unwrap_or_else(|| panic!("no ConfigMap {name}"))
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn assert_config_map(&self, name: &str, user: &str) {
        assert!(
            self.config_maps.contains_key(name),
            "{user} uses ConfigMap {name}, which nothing defines"
        );
    }

    fn assert_secret(&self, name: &str, user: &str) {
        assert!(
            self.secrets.contains_key(name),
            "{user} uses Secret {name}, which neither a secretGenerator nor secrets.example.yaml defines"
        );
    }

    /// The stringData of a placeholder Secret.
    fn example(&self, name: &str) -> BTreeMap<String, String> {
        let secret = self
            .secrets_example
            .iter()
            .find(|s| name_of(s) == name)
            .unwrap_or_else(|| panic!("no Secret {name} in secrets.example.yaml"));
        strings(secret.get("stringData"))
    }
}

#[test]
fn kustomization_lists_every_manifest_and_makes_configuration_from_the_repository() {
    let manifests = Manifests::load();
    let resources: BTreeSet<String> = items(manifests.kustomization.get("resources"))
        .iter()
        .map(text)
        .collect();
    let files: BTreeSet<String> = files_in(&k8s())
        .into_iter()
        .filter(|f| {
            f.ends_with(".yaml") && f != "kustomization.yaml" && !f.ends_with(".example.yaml")
        })
        .collect();
    assert_eq!(resources, files, "kustomization.yaml lists every manifest");
    let namespace = text(&manifests.kustomization["namespace"]);
    assert!(
        manifests
            .of_kind("Namespace")
            .iter()
            .any(|n| name_of(n) == namespace),
        "the Namespace {namespace} is a resource"
    );
    let generated = manifests.config_maps.iter().chain(
        manifests
            .generated_secrets
            .iter()
            .map(|(name, s)| (name, &s.files)),
    );
    for (name, files) in generated {
        for (_, path) in files {
            assert!(
                path.is_file(),
                "{name} is made from {path:?}, which does not exist"
            );
        }
    }
    // The policy catalogue, whole: its top-level files and its calendars.
    assert_eq!(
        manifests.config_map_keys("refbus-policy"),
        files_in(&deploy().join("policy")),
        "refbus-policy holds every deploy/policy file"
    );
    assert_eq!(
        manifests.config_map_keys("refbus-calendars"),
        files_in(&deploy().join("policy/calendars")),
        "refbus-calendars holds every deploy/policy/calendars file"
    );
}

#[test]
fn kubernetes_workloads_use_only_what_is_defined() {
    let manifests = Manifests::load();
    let claims: BTreeSet<String> = manifests
        .of_kind("PersistentVolumeClaim")
        .into_iter()
        .map(name_of)
        .collect();
    for workload in manifests.workloads() {
        let name = name_of(workload);
        let template = &workload["spec"]["template"];
        let labels = strings(template["metadata"].get("labels"));
        let selector = strings(workload["spec"]["selector"].get("matchLabels"));
        assert!(
            selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{name}: its selector matches its pods' labels"
        );
        let spec = &template["spec"];
        let mut volumes: BTreeSet<String> = items(workload["spec"].get("volumeClaimTemplates"))
            .iter()
            .map(name_of)
            .collect();
        for volume in items(spec.get("volumes")) {
            volumes.insert(text(&volume["name"]));
            if let Some(map) = volume.get("configMap") {
                manifests.assert_config_map(&text(&map["name"]), &name);
            }
            if let Some(secret) = volume.get("secret") {
                manifests.assert_secret(&text(&secret["secretName"]), &name);
            }
            if let Some(claim) = volume.get("persistentVolumeClaim") {
                let claim = text(&claim["claimName"]);
                assert!(claims.contains(&claim), "{name}: no claim {claim}");
            }
            let sources = volume.get("projected").and_then(|p| p.get("sources"));
            for map in items(sources).iter().filter_map(|s| s.get("configMap")) {
                let map_name = text(&map["name"]);
                let keys = manifests.config_map_keys(&map_name);
                for item in items(map.get("items")) {
                    let key = text(&item["key"]);
                    assert!(keys.contains(&key), "{name}: {map_name} has no key {key}");
                }
                if map_name == "refbus-calendars" {
                    let paths: BTreeSet<String> = items(map.get("items"))
                        .iter()
                        .map(|i| text(&i["path"]))
                        .collect();
                    let wanted = keys.iter().map(|k| format!("calendars/{k}")).collect();
                    assert_eq!(paths, wanted, "{name}: every calendar under calendars/");
                }
            }
        }
        for container in items(spec.get("containers")) {
            for mount in items(container.get("volumeMounts")) {
                let volume = text(&mount["name"]);
                assert!(
                    volumes.contains(&volume),
                    "{name}: mounts no volume {volume}"
                );
            }
            for source in items(container.get("envFrom")) {
                if let Some(map) = source.get("configMapRef") {
                    manifests.assert_config_map(&text(&map["name"]), &name);
                }
                if let Some(secret) = source.get("secretRef") {
                    manifests.assert_secret(&text(&secret["name"]), &name);
                }
            }
            let references = items(container.get("env"))
                .iter()
                .filter_map(|v| v.get("valueFrom").and_then(|f| f.get("secretKeyRef")));
            for reference in references {
                let (secret, key) = (text(&reference["name"]), text(&reference["key"]));
                assert!(
                    manifests
                        .secrets
                        .get(&secret)
                        .is_some_and(|keys| keys.contains(&key)),
                    "{name}: Secret {secret} has no key {key}"
                );
            }
        }
    }
}

#[test]
fn kubernetes_runs_every_service_with_grpc_probes_and_metrics() {
    let manifests = Manifests::load();
    let deployments = manifests.of_kind("Deployment");
    assert_eq!(
        deployments.len(),
        service_names().len(),
        "a Deployment per service"
    );
    for service in service_names() {
        let name = format!("{NAMESPACE}-{service}");
        let deployment = deployments
            .iter()
            .find(|d| name_of(d) == name)
            .unwrap_or_else(|| panic!("no Deployment {name}"));
        let template = &deployment["spec"]["template"];
        let containers = items(template["spec"].get("containers"));
        assert_eq!(containers.len(), 1, "{name}: one container");
        let container = &containers[0];
        let args: Vec<String> = items(container.get("args")).iter().map(text).collect();
        let expected = if service == "tracker" {
            vec!["tracker".to_owned()]
        } else {
            vec!["serve".to_owned(), service.to_owned()]
        };
        assert_eq!(args, expected, "{name}: args");

        let ports = container_ports(container);
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let port = container
                .get(probe)
                .unwrap_or_else(|| panic!("{name}: no {probe}"))
                .get("grpc")
                .and_then(|g| g["port"].as_u64())
                .unwrap_or_else(|| panic!("{name}: {probe} is not a gRPC probe"));
            assert!(
                ports.iter().any(|(_, p)| *p == port),
                "{name}: {probe} on port {port}, which the container does not declare"
            );
        }
        let (grpc, http) = (named_port(&ports, "grpc"), named_port(&ports, "http"));
        assert_eq!(
            grpc,
            u64::from(grpc_port(service)),
            "{name}: its usual gRPC port"
        );
        let env: BTreeMap<String, String> = items(container.get("env"))
            .iter()
            .filter_map(|v| Some((text(&v["name"]), text(v.get("value")?))))
            .collect();
        let listen = if service == "tracker" {
            "REFBUS_TRACKER_LISTEN"
        } else {
            "REFBUS_LISTEN"
        };
        assert_eq!(u64::from(port_of(&env[listen])), grpc, "{name}: {listen}");
        assert_eq!(
            u64::from(port_of(&env["REFBUS_HTTP_LISTEN"])),
            http,
            "{name}: REFBUS_HTTP_LISTEN"
        );
        let annotations = strings(template["metadata"].get("annotations"));
        assert_eq!(
            annotations["prometheus.io/scrape"], "true",
            "{name}: scraped"
        );
        assert_eq!(
            annotations["prometheus.io/port"],
            http.to_string(),
            "{name}: scraped on its http port"
        );
    }
}

#[test]
fn kubernetes_services_each_select_one_workload_on_its_ports() {
    let manifests = Manifests::load();
    let workloads: Vec<(String, BTreeMap<String, String>, Vec<Port>)> = manifests
        .workloads()
        .into_iter()
        .map(|w| {
            let template = &w["spec"]["template"];
            let ports = items(template["spec"].get("containers"))
                .iter()
                .flat_map(container_ports)
                .collect();
            (
                name_of(w),
                strings(template["metadata"].get("labels")),
                ports,
            )
        })
        .collect();
    for service in manifests.of_kind("Service") {
        let name = name_of(service);
        let selector = strings(service["spec"].get("selector"));
        assert!(!selector.is_empty(), "{name}: a selector");
        let matching: Vec<_> = workloads
            .iter()
            .filter(|(_, labels, _)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .collect();
        assert_eq!(matching.len(), 1, "{name} selects exactly one workload");
        let (workload, _, ports) = matching[0];
        for port in items(service["spec"].get("ports")) {
            let target = port.get("targetPort").unwrap_or(&port["port"]);
            let declared = match target {
                Yaml::String(named) => ports
                    .iter()
                    .any(|(n, _)| n.as_deref() == Some(named.as_str())),
                number => ports.iter().any(|(_, p)| Some(*p) == number.as_u64()),
            };
            assert!(declared, "{name}: {workload} declares no port {target:?}");
        }
    }
}

#[test]
fn kubernetes_rabbitmq_cluster_loads_the_definitions_the_services_log_in_with() {
    let manifests = Manifests::load();
    let clusters = manifests.of_kind("RabbitmqCluster");
    assert_eq!(clusters.len(), 1, "one RabbitmqCluster");
    let cluster = clusters[0];
    assert_eq!(cluster["spec"]["replicas"].as_u64(), Some(3), "three nodes");
    let config = text(&cluster["spec"]["rabbitmq"]["additionalConfig"]);
    let load = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("load_definitions = "))
        .expect("the cluster loads definitions");
    let pod = &cluster["spec"]["override"]["statefulSet"]["spec"]["template"]["spec"];
    let mount = &items(items(pod.get("containers"))[0].get("volumeMounts"))[0];
    let volume = items(pod.get("volumes"))
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the definitions volume");
    let secret = text(&volume["secret"]["secretName"]);
    let generated = &manifests.generated_secrets[&secret];
    assert!(
        generated.fixed_name,
        "{secret}: disableNameSuffixHash, as the operator's override names it"
    );
    let (key, source) = generated
        .files
        .iter()
        .find(|(key, _)| load == format!("{}/{key}", text(&mount["mountPath"])))
        .unwrap_or_else(|| panic!("{load} is not a file of {secret}"));
    assert_eq!(
        source.canonicalize().unwrap(),
        deploy().join(CLUSTER_DEFINITIONS).canonicalize().unwrap(),
        "{secret}/{key} is the cluster definitions"
    );

    let definitions = cluster_definitions();
    for service in service_names() {
        let user = format!("{NAMESPACE}-{service}");
        let url = &manifests.example(&user)["AMQP_URL"];
        assert_logs_in_as(url, &user, &definitions, service);
        assert_eq!(
            amqp_credentials(url).2,
            name_of(cluster),
            "{service}: broker host"
        );
    }
    let database = &manifests.example("refbus-tracker")["DATABASE_URL"];
    let password = &manifests.example("refbus-postgres")["POSTGRES_PASSWORD"];
    assert!(
        database.contains(&format!(":{password}@")),
        "the tracker's DATABASE_URL has the database's password"
    );
}

// --- systemd --------------------------------------------------------------

/// The variables the systemd units and the example environment file set
/// (commented examples of the per-service files included).
fn systemd_settings() -> BTreeSet<String> {
    let units = deploy().join("systemd");
    let mut text = std::fs::read_to_string(units.join("refbus.env.example")).unwrap();
    for unit in ["refbus-agency@.service", "refbus-tracker.service"] {
        text += &std::fs::read_to_string(units.join(unit)).unwrap();
    }
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            let line = line.strip_prefix("Environment=").unwrap_or(line);
            let (variable, _) = line.split_once('=')?;
            (!variable.is_empty() && variable.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .then(|| variable.to_owned())
        })
        .collect()
}

#[test]
fn systemd_units_run_the_services_with_documented_settings() {
    let units = deploy().join("systemd");
    let agency = std::fs::read_to_string(units.join("refbus-agency@.service")).unwrap();
    let tracker = std::fs::read_to_string(units.join("refbus-tracker.service")).unwrap();
    assert!(agency.contains("\nExecStart=/usr/local/bin/refbus serve %i\n"));
    assert!(tracker.contains("\nExecStart=/usr/local/bin/refbus tracker\n"));
    for unit in [&agency, &tracker] {
        assert!(unit.contains("\nEnvironmentFile=/etc/refbus/refbus.env\n"));
        assert!(unit.contains("\nRestart=on-failure\n"));
        assert!(unit.contains("\nProtectSystem=strict\n"));
        assert!(unit.contains("\nStateDirectory=refbus/"));
    }
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for variable in systemd_settings() {
        assert!(
            readme.contains(&format!("`{variable}`")),
            "deploy/systemd sets {variable}, which the README does not document"
        );
    }
}

// --- all of them ----------------------------------------------------------

/// The environment variables `refbus ARGS --help` lists.
fn variables_read_by(args: &[&str]) -> BTreeSet<String> {
    let binary = refbus_binary();
    let out = std::process::Command::new(&binary)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
    assert!(out.status.success(), "refbus {args:?} --help");
    String::from_utf8(out.stdout)
        .unwrap()
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_setting_the_deployments_give_is_one_refbus_reads() {
    let mut known = variables_read_by(&["serve", "legal-aid"]);
    known.extend(variables_read_by(&["tracker"]));
    known.insert("RUST_LOG".into());
    let mut given: Vec<(String, String)> = Vec::new();
    let services = compose_services(&compose());
    for name in service_names() {
        for variable in compose_environment(&services[name]).into_keys() {
            given.push((format!("compose.yaml {name}"), variable));
        }
    }
    let manifests = Manifests::load();
    for map in manifests.of_kind("ConfigMap") {
        for variable in strings(map.get("data")).into_keys() {
            given.push((format!("ConfigMap {}", name_of(map)), variable));
        }
    }
    for deployment in manifests.of_kind("Deployment") {
        for container in items(deployment["spec"]["template"]["spec"].get("containers")) {
            for variable in items(container.get("env")) {
                given.push((name_of(deployment), text(&variable["name"])));
            }
        }
    }
    for service in service_names() {
        for variable in manifests
            .example(&format!("{NAMESPACE}-{service}"))
            .into_keys()
        {
            given.push((format!("Secret {NAMESPACE}-{service}"), variable));
        }
    }
    for variable in systemd_settings() {
        given.push(("deploy/systemd".into(), variable));
    }
    for (place, variable) in given {
        assert!(
            known.contains(&variable),
            "{place} sets {variable}, which neither `refbus serve` nor `refbus tracker` reads"
        );
    }
}
