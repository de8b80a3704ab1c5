//! The deployment files check out with the real tools: every Kubernetes manifest and the output
//! of every kustomization against the Kubernetes schemas (and the ServiceMonitor against the
//! Prometheus Operator's), `docker-compose.yml` against Compose's, the Dockerfile and rendered
//! manifests under static security checks (accepted findings are annotated where they occur),
//! and the settings they pass to the gateway are ones the binary accepts, with grace periods
//! longer than the drain; an overlay that names its Redis gets a ready gateway from them,
//! against a local stand-in (TLS with an ACL user, a Sentinel group or a Redis Cluster) and
//! stand-in files for its Secrets. The Grafana dashboard's queries parse as PromQL and use only
//! metrics a running gateway serves.
//!
//! The Python tools, pinned in `.ci/deploy-tools.txt`, come from the virtualenv `.ci/run`
//! installs them into (`$SSEGW_DEPLOY_TOOLS`, by default `~/.cache/ssegw-deploy-tools`), else
//! from PATH; `docker-compose` is Debian's. A missing tool fails the test, naming how to get it.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{repo, ENV_ONLY};

/// Kubernetes versions the manifests must be valid for: the oldest supported here and the
/// newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];
/// Custom resources, checked against their own schema instead of Kubernetes'.
const SERVICE_MONITOR: &str = "kind: ServiceMonitor";

fn tools_dir() -> PathBuf {
    match std::env::var_os("SSEGW_DEPLOY_TOOLS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/ssegw-deploy-tools"),
    }
}

/// A tool from the deploy tools' virtualenv, else from PATH; panics with how to install it.
fn tool(name: &str, install: &str) -> PathBuf {
    let pinned = tools_dir().join("bin").join(name);
    if pinned.is_file() {
        return pinned;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is required for the deploy checks: not in {} nor on PATH ({install})",
                tools_dir().join("bin").display()
            )
        })
}

const FROM_PYPI: &str = "`bash .ci/run` installs the versions pinned in .ci/deploy-tools.txt";

/// Runs `command` in the repository; panics with its output unless it succeeds.
fn run(command: &mut Command) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    );
    assert!(
        status.success(),
        "{command:?} failed ({status}):\n{stdout}\n{stderr}"
    );
    stdout
}

/// A scratch directory under cargo's target directory, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-files-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every `.yaml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The Kubernetes manifests in `k8s/`: every YAML file but the kustomizations themselves.
fn manifests() -> Vec<PathBuf> {
    yaml_files(&repo().join("k8s"))
        .into_iter()
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect()
}

/// The directories of `k8s/` with a kustomization (base, overlays, the trial Redis, monitoring).
fn kustomizations() -> Vec<PathBuf> {
    let all: Vec<PathBuf> = yaml_files(&repo().join("k8s"))
        .into_iter()
        .filter(|p| p.ends_with("kustomization.yaml"))
        .map(|p| p.parent().unwrap().to_path_buf())
        .collect();
    assert!(
        all.iter().any(|d| d.ends_with("overlays/production")),
        "no production overlay among {all:?}"
    );
    all
}

/// `kubectl kustomize` of every kustomization, each written to `dir`; returns (name, file).
fn render_all(dir: &Path) -> Vec<(String, PathBuf)> {
    let kubectl = tool("kubectl", FROM_PYPI);
    kustomizations()
        .into_iter()
        .map(|k| {
            let name = k
                .strip_prefix(repo())
                .unwrap()
                .to_string_lossy()
                .replace('/', "-");
            let yaml = run(Command::new(&kubectl).arg("kustomize").arg(&k));
            let file = dir.join(format!("{name}.yaml"));
            std::fs::write(&file, yaml).unwrap();
            (name, file)
        })
        .collect()
}

/// Splits YAML files into their documents, sorted into Kubernetes' own kinds and
/// ServiceMonitors, each group written to one file in `dir`.
fn sort_documents(files: &[PathBuf], dir: &Path) -> (PathBuf, PathBuf) {
    let (mut core, mut monitors) = (String::new(), String::new());
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for doc in text.split("\n---\n") {
            let doc = doc.trim_start_matches("---\n");
            if doc.trim().is_empty() {
                continue;
            }
            let group = if doc.lines().any(|l| l == SERVICE_MONITOR) {
                &mut monitors
            } else {
                &mut core
            };
            group.push_str("---\n");
            group.push_str(doc);
            group.push('\n');
        }
    }
    let (core_file, monitors_file) = (dir.join("core.yaml"), dir.join("monitors.yaml"));
    std::fs::write(&core_file, core).unwrap();
    std::fs::write(&monitors_file, monitors).unwrap();
    (core_file, monitors_file)
}

/// YAML documents as JSON values, through the tools' Python (PyYAML comes with them).
fn yaml_to_json(yaml: &str) -> Vec<Value> {
    let dir = scratch(&format!("json-{:x}", fastrand::u64(..)));
    let file = dir.join("in.yaml");
    std::fs::write(&file, yaml).unwrap();
    let json = run(Command::new(tool("python", FROM_PYPI))
        .args([
            "-c",
            "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         json.dump(docs, sys.stdout)",
        ])
        .arg(&file));
    let _ = std::fs::remove_dir_all(&dir);
    serde_json::from_str(&json).unwrap()
}

fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("duration {text:?}: {e}"))
}

#[test]
fn kubernetes_manifests_and_kustomizations_validate_against_the_schemas() {
    let dir = scratch("schemas");
    let mut files = manifests();
    files.extend(render_all(&dir).into_iter().map(|(_, file)| file));
    let (core, monitors) = sort_documents(&files, &dir);

    let validate = tool("kubernetes-validate", FROM_PYPI);
    for version in KUBERNETES_VERSIONS {
        // --quiet prints only warnings and failures; a kind it has no schema for is only a
        // warning, so anything printed fails the check.
        let printed = run(Command::new(&validate)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .arg(&core));
        assert!(
            printed.trim().is_empty(),
            "kubernetes-validate {version}:\n{printed}"
        );
    }

    let monitors_text = std::fs::read_to_string(&monitors).unwrap();
    assert!(
        monitors_text.contains(SERVICE_MONITOR),
        "no ServiceMonitor found in k8s/"
    );
    run(Command::new(tool("python", FROM_PYPI))
        .arg(repo().join("gateway/tests/deploy_files/servicemonitor.py"))
        .arg(&monitors));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_pods_grace_period_outlasts_the_pre_stop_pause_and_the_drain() {
    let dir = scratch("grace");
    let mut checked = 0;
    for (name, file) in render_all(&dir) {
        let docs = yaml_to_json(&std::fs::read_to_string(&file).unwrap());
        let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
        for deployment in kind("Deployment") {
            let pod = &deployment["spec"]["template"]["spec"];
            let container = &pod["containers"][0];
            let config_map = container["envFrom"][0]["configMapRef"]["name"].clone();
            let settings = kind("ConfigMap")
                .find(|c| c["metadata"]["name"] == config_map)
                .unwrap_or_else(|| panic!("{name}: no ConfigMap {config_map}"));
            let drain = duration(settings["data"]["SSEGW_DRAIN_WINDOW"].as_str().unwrap());
            let pause = match container["lifecycle"]["preStop"]["exec"]["command"].as_array() {
                Some(command) if command[0] == "sleep" => {
                    Duration::from_secs(command[1].as_str().unwrap().parse().unwrap())
                }
                other => panic!("{name}: preStop is not a pause: {other:?}"),
            };
            let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
            // The drain exits just before its window ends; keep a margin for that exit.
            assert!(
                grace >= pause + drain + Duration::from_secs(5),
                "{name}: terminationGracePeriodSeconds {grace:?} leaves no margin after the \
                 preStop pause {pause:?} and SSEGW_DRAIN_WINDOW {drain:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} Deployments rendered");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `docker-compose config` of the file with every profile on, as JSON.
fn compose_config() -> Value {
    let compose = tool(
        "docker-compose",
        "apt-get install --no-install-recommends docker-compose",
    );
    let yaml = run(Command::new(compose).args([
        "--file",
        "docker-compose.yml",
        "--profile",
        "otel",
        "--profile",
        "metrics",
        "config",
    ]));
    yaml_to_json(&yaml).remove(0)
}

fn gateway_services(config: &Value) -> Vec<(&String, &Value)> {
    let services: Vec<(&String, &Value)> = config["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.starts_with("gateway-"))
        .collect();
    assert_eq!(services.len(), 3, "three gateway replicas");
    services
}

#[test]
fn docker_compose_yml_is_valid_and_runs_the_tested_balancer_config() {
    let config = compose_config();
    let services = config["services"].as_object().unwrap();
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "gateway-1",
            "gateway-2",
            "gateway-3",
            "grafana",
            "lb",
            "otel-collector",
            "prometheus",
            "redis"
        ]
    );

    // Grafana shows the dashboard the_grafana_dashboard_queries_metrics_the_gateway_serves checks.
    let dashboard = repo().join("deploy/grafana/sse-gateway.json");
    let grafana_volumes = services["grafana"]["volumes"].to_string();
    assert!(
        grafana_volumes.contains(dashboard.to_str().unwrap()),
        "grafana mounts no deploy/grafana/sse-gateway.json: {grafana_volumes}"
    );

    // The balancer runs deploy/nginx.conf, the file gateway/tests/balancer.rs runs.
    let lb = &services["lb"];
    let tested = repo().join("deploy/nginx.conf");
    let mount = lb["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| v.strip_prefix(&format!("{}:", tested.display())))
        .unwrap_or_else(|| panic!("lb does not mount {}", tested.display()));
    let target = mount.split(':').next().unwrap();
    let entrypoint: Vec<&str> = lb["entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        entrypoint.windows(2).any(|w| w == ["-c", target]),
        "lb runs {entrypoint:?}, not the mounted {target}"
    );
    assert_eq!(lb["ports"][0]["published"], 8080, "one published port");

    for (name, gateway) in gateway_services(&config) {
        let grace = duration(gateway["stop_grace_period"].as_str().unwrap());
        let drain = duration(
            gateway["environment"]["SSEGW_DRAIN_WINDOW"]
                .as_str()
                .unwrap(),
        );
        assert!(
            grace > drain,
            "{name}: stop_grace_period {grace:?} within SSEGW_DRAIN_WINDOW {drain:?}"
        );
    }
}

/// Where the Deployment mounts the Secret `sse-gateway-jwt`.
const JWT_MOUNT: &str = "/etc/sse-gateway/jwt";

/// A JWKS file holding the test RSA public key.
fn test_jwks(dir: &Path) -> PathBuf {
    let pem = std::fs::read(repo().join("gateway/tests/fixtures/jwt/rsa-public.pem")).unwrap();
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap();
    let jwk = jsonwebtoken::jwk::Jwk::from_decoding_key(&key, Some(jsonwebtoken::Algorithm::RS256))
        .unwrap();
    let file = dir.join("jwks.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    file
}

/// Every name is a setting of the gateway: a flag's variable in `--help`, or environment only.
fn assert_settings_exist<'a>(origin: &str, names: impl IntoIterator<Item = &'a str>) {
    let help = run(Command::new(env!("CARGO_BIN_EXE_sse-gateway")).arg("--help"));
    for key in names {
        assert!(
            // `[env: KEY=value]`, or `[env: KEY]` for a setting whose value help hides.
            help.contains(&format!("[env: {key}="))
                || help.contains(&format!("[env: {key}]"))
                || ENV_ONLY.contains(&key),
            "{origin}: {key} is no setting of sse-gateway"
        );
    }
}

/// Starts the gateway with these settings (on a free loopback port, with the embedded bus) and
/// waits until it answers `/healthz`: bad settings would make it exit 2 first.
fn assert_gateway_starts_with(origin: &str, settings: &[(String, String)]) {
    assert_settings_exist(origin, settings.iter().map(|(k, _)| k.as_str()));
    // Their Redis is not here: without SSEGW_REDIS_URL the embedded bus stands in.
    let embedded: Vec<(String, String)> = settings
        .iter()
        .filter(|(k, _)| k != "SSEGW_REDIS_URL")
        .cloned()
        .collect();
    assert_gateway_answers(origin, &embedded, "/healthz");
}

/// Starts the gateway with these settings on a free loopback port and waits until `path`
/// answers 200 (`/healthz`: it serves; `/readyz`: its Redis answers it too). Bad settings make
/// it exit 2 first; any failure shows its log.
fn assert_gateway_answers(origin: &str, settings: &[(String, String)], path: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    let log_dir = support::tempdir("deploy-settings");
    let log = log_dir.join("gateway.log");
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_sse-gateway"))
        .envs(
            settings
                .iter()
                .filter(|(k, _)| k != "SSEGW_LISTEN")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .env("SSEGW_LISTEN", addr.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start sse-gateway");
    let deadline = Instant::now() + support::WAIT;
    while support::http_status(addr, "GET", path) != Some(200) {
        let exited = gateway.try_wait().unwrap();
        if exited.is_some() || Instant::now() > deadline {
            let _ = gateway.kill();
            let status = gateway.wait().unwrap();
            let what = match exited {
                Some(_) => "refused its settings".to_string(),
                None => format!("did not answer {path} 200 with its settings"),
            };
            panic!(
                "{origin}: sse-gateway {what} ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = std::fs::remove_dir_all(&log_dir);
}

/// The overlays, by the name `render_all` gives them.
const OVERLAYS: [&str; 5] = [
    "k8s-overlays-cluster",
    "k8s-overlays-managed-tls",
    "k8s-overlays-production",
    "k8s-overlays-sentinel",
    "k8s-overlays-trial",
];

/// Where the pod mounts a Secret: the directory, the Secret, the files it projects there
/// (`None`: one per key of the Secret) and whether the pod waits for the Secret.
struct SecretMount {
    path: String,
    secret: String,
    files: Option<Vec<String>>,
    required: bool,
}

/// The Secrets the gateway container mounts; every one must be read-only.
fn secret_mounts(origin: &str, pod: &Value) -> Vec<SecretMount> {
    let none = Vec::new();
    let volumes = pod["volumes"].as_array().unwrap_or(&none);
    let mounts = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap_or(&none);
    mounts
        .iter()
        .filter_map(|mount| {
            let volume = volumes.iter().find(|v| v["name"] == mount["name"])?;
            let secret = volume["secret"].as_object()?;
            let path = mount["mountPath"].as_str().unwrap().to_string();
            let name = secret["secretName"].as_str().unwrap().to_string();
            assert_eq!(
                mount["readOnly"], true,
                "{origin}: the Secret {name} is mounted writable at {path}"
            );
            Some(SecretMount {
                path,
                secret: name,
                files: secret.get("items").map(|items| {
                    items
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i["path"].as_str().unwrap().to_string())
                        .collect()
                }),
                // A Secret volume is required unless it says `optional: true`.
                required: secret.get("optional") != Some(&Value::Bool(true)),
            })
        })
        .collect()
}

/// The settings that say where Redis is; the gateway takes one of them.
const REDIS_ADDRESSES: [&str; 3] = [
    "SSEGW_REDIS_URL",
    "SSEGW_REDIS_SENTINELS",
    "SSEGW_REDIS_CLUSTER",
];

/// The stand-in Redis's passwords: the overlay's ACL user's, the default user's (which the
/// nodes of a Sentinel group or a cluster replicate with) and the sentinels' own.
const GATEWAY_PASSWORD: &str = "gateway-pw-6f1a";
const ADMIN_PASSWORD: &str = "admin-pw-2c9e";
const SENTINEL_PASSWORD: &str = "sentinel-pw-4d7b";

/// A local Redis standing in for the one an overlay names, made to its settings: TLS (with a
/// CA made here) for a `rediss://` URL, a Sentinel group under the overlay's master name with
/// as many replicas as SSEGW_PUBLISH_REPLICAS waits for, a cluster of three primaries with as
/// many replicas each, the overlay's ACL user, and the sentinels' own password where the
/// overlay gives one. A setting it cannot stand in for fails the test, naming it. Its servers
/// stop on drop.
struct RedisStandIn {
    _standalone: Option<ssegw_testkit::Standalone>,
    _sentinel: Option<ssegw_testkit::Sentinel>,
    _cluster: Option<ssegw_testkit::Cluster>,
    authority: Option<ssegw_testkit::Authority>,
    /// The address setting (one of `REDIS_ADDRESSES`) and its local value.
    address: (&'static str, String),
}

impl RedisStandIn {
    /// `None` when the settings name no Redis (the embedded bus stands in then).
    fn start(origin: &str, settings: &[(String, String)], dir: &Path) -> Option<RedisStandIn> {
        let get = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        for unsupported in [
            "SSEGW_REDIS_SENTINEL_USERNAME",
            "SSEGW_REDIS_CLIENT_CERT",
            "SSEGW_REDIS_TLS",
        ] {
            assert!(
                get(unsupported).is_none(),
                "{origin}: the test has no stand-in Redis for {unsupported} yet"
            );
        }
        // The overlay's user, or (with a password but no user) the default user's password.
        let user = get("SSEGW_REDIS_USERNAME").map(|user| {
            format!("--user {user} on >{GATEWAY_PASSWORD} ~* &* +@all")
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<String>>()
        });
        let password = get("SSEGW_REDIS_PASSWORD_FILE").is_some();
        if let Some(url) = get("SSEGW_REDIS_URL") {
            let (scheme, rest) = url
                .split_once("://")
                .unwrap_or_else(|| panic!("{origin}: SSEGW_REDIS_URL={url} is no URL"));
            let host = rest.split('/').next().unwrap();
            assert!(
                !host.contains('@'),
                "{origin}: SSEGW_REDIS_URL holds credentials, in a ConfigMap"
            );
            let path = &rest[host.len()..];
            let authority = (scheme == "rediss")
                .then(|| ssegw_testkit::Authority::create(dir, "redis").expect("certificates"));
            let mut args = Vec::new();
            match (user, password) {
                (Some(user), _) => {
                    args.extend(["--user", "default", "off"].map(String::from));
                    args.extend(user);
                }
                (None, true) => args.extend(["--requirepass".into(), GATEWAY_PASSWORD.into()]),
                (None, false) => {}
            }
            let redis = ssegw_testkit::Standalone::start_with(ssegw_testkit::ServerOptions {
                args,
                tls: authority
                    .clone()
                    .map(|authority| ssegw_testkit::TlsOptions {
                        authority,
                        require_client_cert: false,
                    }),
                ..ssegw_testkit::ServerOptions::default()
            })
            .unwrap_or_else(|e| panic!("{origin}: a stand-in redis-server: {e}"));
            let address = ("SSEGW_REDIS_URL", format!("{}{path}", redis.url()));
            return Some(RedisStandIn {
                _standalone: Some(redis),
                _sentinel: None,
                _cluster: None,
                authority,
                address,
            });
        }
        // Replicas for SSEGW_PUBLISH_REPLICAS to wait for (a value that is no number is the
        // gateway's to refuse), and the default user's password, which the nodes replicate
        // with: the administrator's beside the overlay's user, else the gateway's.
        let replicas: usize = get("SSEGW_PUBLISH_REPLICAS").map_or(0, |n| n.parse().unwrap_or(0));
        let node_password = match (&user, password) {
            (None, false) => None,
            (Some(_), _) => Some(ADMIN_PASSWORD.to_string()),
            (None, true) => Some(GATEWAY_PASSWORD.to_string()),
        };
        if get("SSEGW_REDIS_CLUSTER").is_some() {
            let cluster = ssegw_testkit::Cluster::start(ssegw_testkit::ClusterOptions {
                primaries: 3,
                replicas_per_primary: replicas.max(1),
                password: node_password,
                server: ssegw_testkit::ServerOptions {
                    args: user.unwrap_or_default(),
                    ..ssegw_testkit::ServerOptions::default()
                },
                ..ssegw_testkit::ClusterOptions::default()
            })
            .unwrap_or_else(|e| panic!("{origin}: a stand-in Redis Cluster: {e}"));
            let address = ("SSEGW_REDIS_CLUSTER", cluster.seeds().join(","));
            return Some(RedisStandIn {
                _standalone: None,
                _sentinel: None,
                _cluster: Some(cluster),
                authority: None,
                address,
            });
        }
        get("SSEGW_REDIS_SENTINELS")?;
        let group = ssegw_testkit::Sentinel::start(ssegw_testkit::SentinelOptions {
            master_name: get("SSEGW_REDIS_MASTER_NAME")
                .unwrap_or_else(|| panic!("{origin}: sentinels but no SSEGW_REDIS_MASTER_NAME"))
                .to_string(),
            replicas: replicas.max(1),
            password: node_password,
            sentinel_password: get("SSEGW_REDIS_SENTINEL_PASSWORD_FILE")
                .map(|_| SENTINEL_PASSWORD.into()),
            server: ssegw_testkit::ServerOptions {
                args: user.unwrap_or_default(),
                ..ssegw_testkit::ServerOptions::default()
            },
            ..ssegw_testkit::SentinelOptions::default()
        })
        .unwrap_or_else(|e| panic!("{origin}: a stand-in Sentinel group: {e}"));
        let address = ("SSEGW_REDIS_SENTINELS", group.sentinel_addrs().join(","));
        Some(RedisStandIn {
            _standalone: None,
            _sentinel: Some(group),
            _cluster: None,
            authority: None,
            address,
        })
    }
}

/// What the file a setting names holds in the stand-in for its Secret.
fn stand_in_file(origin: &str, key: &str, redis: Option<&RedisStandIn>, dir: &Path) -> Vec<u8> {
    let tls = || {
        redis
            .and_then(|r| r.authority.as_ref())
            .unwrap_or_else(|| panic!("{origin}: {key} without a rediss:// Redis"))
    };
    match key {
        "SSEGW_JWT_JWKS" => std::fs::read(test_jwks(dir)).unwrap(),
        "SSEGW_REDIS_PASSWORD_FILE" => format!("{GATEWAY_PASSWORD}\n").into_bytes(),
        "SSEGW_REDIS_SENTINEL_PASSWORD_FILE" => format!("{SENTINEL_PASSWORD}\n").into_bytes(),
        "SSEGW_REDIS_CA_FILE" => std::fs::read(&tls().ca).unwrap(),
        _ => panic!("{origin}: the test has no stand-in for the file {key} names"),
    }
}

#[test]
fn the_settings_deployed_are_settings_the_gateway_accepts() {
    // Each overlay's ConfigMap as rendered: the base's settings with the overlay's merged in.
    let dir = scratch("settings");
    let mut overlays = Vec::new();
    for (name, file) in render_all(&dir) {
        if !name.starts_with("k8s-overlays-") {
            continue;
        }
        overlays.push(name.clone());
        let docs = yaml_to_json(&std::fs::read_to_string(&file).unwrap());
        let config_map = docs
            .iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .unwrap()
                        .starts_with("sse-gateway")
            })
            .unwrap_or_else(|| panic!("{name}: no sse-gateway ConfigMap"));
        let settings: Vec<(String, String)> = config_map["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert!(
            settings
                .iter()
                .any(|(k, _)| k.starts_with("SSEGW_ANONYMOUS_") || k.starts_with("SSEGW_JWT_")),
            "{name}: sets no access rule, so the gateway would refuse to start"
        );
        assert_settings_exist(&name, settings.iter().map(|(k, _)| k.as_str()));

        // The container's own `env` overrides the ConfigMap: it must not shadow a setting, nor
        // add a Redis setting (a Secret's SSEGW_REDIS_URL) where the ConfigMap names the Redis.
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap_or_else(|| panic!("{name}: no Deployment"));
        let pod = &deployment["spec"]["template"]["spec"];
        let env: Vec<&str> = pod["containers"][0]["env"]
            .as_array()
            .map(|env| env.iter().map(|e| e["name"].as_str().unwrap()).collect())
            .unwrap_or_default();
        assert_settings_exist(&name, env.iter().copied());
        for variable in &env {
            assert!(
                !settings.iter().any(|(k, _)| k == variable),
                "{name}: the Deployment's env sets {variable}, overriding the ConfigMap's"
            );
        }
        if settings
            .iter()
            .any(|(k, _)| REDIS_ADDRESSES.contains(&k.as_str()))
        {
            assert!(
                !env.iter().any(|v| v.starts_with("SSEGW_REDIS_")),
                "{name}: the ConfigMap names the Redis, and the Deployment's env adds {env:?}"
            );
        }

        // Files in a Secret's mount (keys, credentials, CAs) do not exist here: each setting
        // that names one must name a file its Secret projects, from a Secret the pod requires,
        // and stand-in files take their place (a JWKS of a test key, the stand-in Redis's
        // password and CA). The Redis the overlay names is a local stand-in too.
        let mounts = secret_mounts(&name, pod);
        let redis = RedisStandIn::start(&name, &settings, &dir);
        let files = dir.join(format!("{name}-files"));
        std::fs::create_dir_all(&files).unwrap();
        let mut local = settings.clone();
        for (key, value) in &mut local {
            if key == "SSEGW_JWT_JWKS" {
                assert!(
                    value.starts_with(JWT_MOUNT),
                    "{name}: {key}={value} is outside {JWT_MOUNT}"
                );
            }
            if let Some(redis) = &redis {
                if key == redis.address.0 {
                    *value = redis.address.1.clone();
                    continue;
                }
            }
            let Some(mount) = mounts
                .iter()
                .find(|m| value.starts_with(&format!("{}/", m.path)))
            else {
                continue;
            };
            let file = &value[mount.path.len() + 1..];
            assert!(
                mount
                    .files
                    .as_ref()
                    .is_none_or(|f| f.iter().any(|f| f == file)),
                "{name}: {key}={value}, but the Secret {} mounted at {} projects only {:?}",
                mount.secret,
                mount.path,
                mount.files
            );
            assert!(
                mount.required,
                "{name}: {key} reads the Secret {}, which the pod does not require",
                mount.secret
            );
            let stand_in = files.join(key.to_lowercase());
            std::fs::write(&stand_in, stand_in_file(&name, key, redis.as_ref(), &dir)).unwrap();
            *value = stand_in.to_string_lossy().into_owned();
        }
        if redis.is_some() {
            // Ready: the gateway reached the stand-in with the overlay's user, password, TLS
            // settings and master name (or cluster seeds), and installed its functions.
            assert_gateway_answers(&name, &local, "/readyz");
        } else {
            assert_gateway_starts_with(&name, &local);
        }
    }
    assert_eq!(overlays, OVERLAYS, "the overlays");
    let mount = std::fs::read_to_string(repo().join("k8s/base/deployment.yaml")).unwrap();
    assert!(
        mount.contains(&format!("mountPath: {JWT_MOUNT}")),
        "the JWT keys are mounted elsewhere"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let config = compose_config();
    for (name, gateway) in gateway_services(&config) {
        let settings: Vec<(String, String)> = gateway["environment"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        assert_gateway_starts_with(&format!("docker-compose.yml {name}"), &settings);
    }
}

#[test]
fn the_dockerfile_and_the_manifests_pass_the_security_checks() {
    let dir = scratch("checkov");
    let mut command = Command::new(tool("checkov", FROM_PYPI));
    command.args([
        "--quiet",
        "--compact",
        // Nothing to fetch: no platform account, and the network is not needed for the checks.
        "--skip-download",
        "--framework",
        "kubernetes",
        "dockerfile",
        "--file",
        "Dockerfile",
    ]);
    for (_, file) in render_all(&dir) {
        command.arg("--file").arg(file);
    }
    run(&mut command);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_docker_build_context_holds_every_workspace_crate() {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("workspace members");
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let allowed: Vec<&str> = ignore.lines().filter_map(|l| l.strip_prefix('!')).collect();
    for member in members
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
    {
        for part in ["Cargo.toml", "src/"] {
            let path = format!("{member}/{part}");
            assert!(
                allowed.contains(&path.as_str()),
                ".dockerignore leaves {path} out of the image's build"
            );
        }
        // Files compiled in (`include_bytes!`, `include_str!`, e.g. the pages' assets) too.
        for included in included_files(&repo().join(member).join("src")) {
            let root = repo().canonicalize().unwrap();
            let path = included.strip_prefix(&root).unwrap().to_str().unwrap();
            assert!(
                allowed.iter().any(|a| path.starts_with(a)),
                ".dockerignore leaves {path}, compiled into {member}, out of the image's build"
            );
        }
    }
}

/// The files that the sources under `dir` compile in, by `include_bytes!` or `include_str!`
/// with a literal path relative to the including file.
fn included_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(included_files(&path));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for macro_call in ["include_bytes!(\"", "include_str!(\""] {
            for (at, _) in text.match_indices(macro_call) {
                let rest = &text[at + macro_call.len()..];
                let relative = &rest[..rest.find('"').unwrap()];
                let file = path.parent().unwrap().join(relative);
                let file = file
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{} includes {relative}: {e}", path.display()));
                found.push(file);
            }
        }
    }
    found
}

/// Every query of the Grafana dashboard parses as PromQL (with a real parser), and every metric
/// it reads is one a replica serves on `/metrics` once it has delivered an event.
#[actix_web::test]
async fn the_grafana_dashboard_queries_metrics_the_gateway_serves() {
    let dashboard = repo().join("deploy/grafana/sse-gateway.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    assert_eq!(json["uid"], "sse-gateway");
    let panels = json["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
    for panel in panels {
        let grid = &panel["gridPos"];
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "{panel}"
        );
        assert!(
            !panel["targets"].as_array().unwrap().is_empty(),
            "{}",
            panel["title"]
        );
    }
    let names: Vec<String> = serde_json::from_str(&run(Command::new(tool("python", FROM_PYPI))
        .arg(repo().join("gateway/tests/deploy_files/promql.py"))
        .arg(&dashboard)))
    .unwrap();
    assert!(names.len() >= 10, "{names:?}");

    let redis = support::RedisServer::start();
    let gw = support::Gateway::with_redis(&redis, &[]);
    let mut sse = support::Sse::open(&gw, "topic=dash", None).await;
    sse.baseline().await;
    redis.fcall_publish("dash", "x", None);
    sse.next().await;
    support::wait_until("a canary round trip", || {
        metrics_text(gw.addr).contains("ssegw_redis_canary_rtt_seconds_count")
    });
    let served = metrics_text(gw.addr);
    for name in &names {
        assert!(
            served
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))),
            "the dashboard reads {name}, which /metrics does not serve:\n{served}"
        );
    }
}

fn metrics_text(addr: std::net::SocketAddr) -> String {
    support::get_text(addr, "/metrics").2
}
