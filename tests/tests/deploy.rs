//! The deployment files under `docs/deploy/` against the real binary: every YAML document
//! parses; the DaemonSet runs `gateway run --config PATH` with the ConfigMap mounted at
//! that path, probes `/healthz` and `/ready` on the admin port 9901, mounts bpffs and
//! outlasts the drain; the admin token comes from a Secret mounted where `admin.token_file`
//! points, and the binary refuses an admin listener on the network without one; the
//! ConfigMap's `gateway.toml` passes `gateway check` and serves when started (on loopback),
//! with `/reload` and `/config` behind the token and probes and `/metrics` open; the ServiceMonitor, Service, DaemonSet and alert rules agree
//! on ports, labels and the `job`; the systemd unit reloads with SIGHUP and raises its
//! limits; the Dockerfile follows the build recipe; every metric the Grafana dashboard
//! and the alert rules query is one a running gateway serves, with labels it has; and the
//! Compose example names its backend by service name.
//!
//! No Kubernetes, Docker engine or systemd here: these checks cover what can be checked
//! from the files and the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gateway_tests::control::{admin_request, scrape, CONTRACT_FAMILIES, EXTRA_FAMILIES};
use gateway_tests::{
    free_addr, gateway_bin, refused_addr, workspace_root, Config, Gateway, Origin, Route, Upstream,
};
use regex::Regex;
use serde::Deserialize;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    workspace_root().join("docs/deploy")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse as YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("docs/deploy exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

/// The one document of this kind across docs/deploy.
fn doc_of_kind(kind: &str) -> Value {
    let found: Vec<Value> = yaml_files()
        .iter()
        .flat_map(|f| yaml_docs(f))
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} in docs/deploy");
    found.into_iter().next().unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|seq| seq.iter().map(|x| s(x).to_string()).collect())
        .unwrap_or_default()
}

/// `"30s"`, `"1500ms"`, `"1m"` → seconds.
fn seconds(d: &str) -> f64 {
    let (number, scale) = if let Some(n) = d.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = d.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = d.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = d.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (d, 1.0) // systemd's bare number is seconds
    };
    number
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("duration {d:?}"))
        * scale
}

/// The ConfigMap's embedded gateway.toml.
fn configmap_toml() -> (String, String) {
    let cm = doc_of_kind("ConfigMap");
    let name = s(&cm["metadata"]["name"]).to_string();
    let text = s(&cm["data"]["gateway.toml"]).to_string();
    (name, text)
}

/// shutdown_delay + graceful_timeout of the deployed config, in seconds.
fn drain_budget(toml_text: &str) -> f64 {
    let v: toml::Value = toml_text.parse().unwrap();
    let get = |k: &str, default: &str| {
        seconds(
            v.get("server")
                .and_then(|t| t.get(k))
                .and_then(|x| x.as_str())
                .unwrap_or(default),
        )
    };
    get("graceful_timeout", "30s") + get("shutdown_delay", "0s")
}

// ---------------------------------------------------------------------------------------

#[test]
fn every_yaml_document_in_docs_deploy_parses() {
    let files = yaml_files();
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "configmap.yaml",
        "daemonset.yaml",
        "servicemonitor.yaml",
        "prometheus-rules.yaml",
    ] {
        assert!(names.contains(want), "docs/deploy/{want} is missing");
    }
    for f in &files {
        let docs = yaml_docs(f);
        assert!(!docs.is_empty(), "{} has no document", f.display());
        for d in docs {
            for key in ["apiVersion", "kind"] {
                assert!(d[key].as_str().is_some(), "{}: no {key}", f.display());
            }
            assert!(
                d["metadata"]["name"].as_str().is_some(),
                "{}: a {} without metadata.name",
                f.display(),
                s(&d["kind"])
            );
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some("gateway"),
                "{}: {} in the gateway namespace",
                f.display(),
                s(&d["kind"])
            );
        }
    }
}

#[test]
fn daemonset_runs_the_real_command_with_probes_bpffs_and_the_configmap() {
    let ds = doc_of_kind("DaemonSet");
    assert_eq!(s(&ds["apiVersion"]), "apps/v1");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "hostNetwork");
    let containers = pod["containers"].as_sequence().expect("containers");
    let c = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("gateway"))
        .expect("a container named gateway");

    // The command line: the image's ENTRYPOINT is the binary; the args are the real flags.
    let mut argv = strings(&c["command"]);
    argv.extend(strings(&c["args"]));
    assert_eq!(
        argv,
        [
            "run",
            "--config",
            "/etc/gateway/gateway.toml",
            "--upgrade-if-running",
            "--stay-after-handover"
        ]
    );
    let help = Command::new(gateway_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("run") && help.contains("--config"),
        "`gateway --help` names run and --config:\n{help}"
    );
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/gateway"]"#));

    // The config file comes from the ConfigMap, mounted (as a directory, so updates reach
    // the pod) where --config points.
    let (cm_name, cm_toml) = configmap_toml();
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let mounts = c["volumeMounts"].as_sequence().expect("volumeMounts");
    let mount_at = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("a volume mounted at {path}"))
    };
    let config_mount = mount_at("/etc/gateway");
    assert!(
        config_mount["subPath"].is_null(),
        "subPath mounts never update"
    );
    let config_volume = volume(s(&config_mount["name"]));
    assert_eq!(s(&config_volume["configMap"]["name"]), cm_name);
    if let Some(items) = config_volume["configMap"]["items"].as_sequence() {
        assert!(items
            .iter()
            .any(|i| i["key"].as_str() == Some("gateway.toml")
                && i["path"].as_str() == Some("gateway.toml")));
    }

    // bpffs from the host, where the XDP maps are pinned.
    let bpf_mount = mount_at("/sys/fs/bpf");
    assert_eq!(
        s(&volume(s(&bpf_mount["name"]))["hostPath"]["path"]),
        "/sys/fs/bpf"
    );
    let toml_v: toml::Value = cm_toml.parse().unwrap();
    if let Some(pin) = toml_v
        .get("xdp")
        .and_then(|x| x.get("pin_path"))
        .and_then(|p| p.as_str())
    {
        assert!(
            pin.starts_with("/sys/fs/bpf/"),
            "pin_path {pin} on the mount"
        );
    }

    // The admin port: named, 9901, and the config listens on it on the node's address
    // (the kubelet probes and Prometheus come from outside the network namespace).
    // No `ports`: on the host network they default to host ports, which keep the rolling
    // update's surge pod off the node it must take over (docs/operations.md, Kubernetes).
    assert!(c["ports"].is_null(), "no container ports");
    let ports: Vec<Value> = Vec::new();
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"].as_u64(),
        Some(1)
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0)
    );
    let admin_listen = toml_v["admin"]["listen"].as_str().expect("admin.listen");
    assert!(
        admin_listen == "0.0.0.0:9901" || admin_listen == "[::]:9901",
        "admin.listen {admin_listen} must be reachable by the kubelet on port 9901"
    );
    let probe_port = |probe: &Value| -> u64 {
        let port = &probe["httpGet"]["port"];
        match port.as_u64() {
            Some(p) => p,
            None => {
                let name = s(port);
                ports
                    .iter()
                    .find(|p| p["name"].as_str() == Some(name))
                    .and_then(|p| p["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("probe port {name}"))
            }
        }
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/ready")] {
        let p = &c[probe];
        assert_eq!(p["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(probe_port(p), 9901, "{probe} on the admin port");
    }

    // The kubelet's SIGKILL comes after the grace period: it must outlast the drain.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds") as f64;
    let budget = drain_budget(&cm_toml);
    assert!(
        grace > budget + 1.0,
        "terminationGracePeriodSeconds {grace} <= shutdown_delay + graceful_timeout + 1 ({})",
        budget + 1.0
    );

    // Resources and privileges.
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(!c["resources"][kind][r].is_null(), "resources.{kind}.{r}");
        }
    }
    let sc = &c["securityContext"];
    if sc["privileged"].as_bool() != Some(true) {
        let caps: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
        for cap in ["NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE", "IPC_LOCK"] {
            assert!(caps.contains(cap), "capability {cap}: {caps:?}");
        }
        // The default seccomp profiles forbid io_uring; the gateway would then run on its
        // epoll fallback. The manifest keeps the faster driver.
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod["securityContext"]["seccompProfile"]["type"].as_str());
        assert!(
            matches!(seccomp, Some("Unconfined") | Some("Localhost")),
            "seccompProfile allowing io_uring, got {seccomp:?}"
        );
    }
}

fn gateway_check(path: &Path) -> std::process::Output {
    Command::new(gateway_bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

fn check_passes(path: &Path, what: &str) {
    let out = gateway_check(path);
    assert!(
        out.status.success(),
        "gateway check rejects {what}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("syntax is ok"));
}

/// The ConfigMap's gateway.toml with `admin.token_file` pointing at a file in `dir` that
/// holds `token` (the Secret's mount does not exist here).
fn configmap_toml_with_token(dir: &Path, token: &str) -> String {
    let (_, text) = configmap_toml();
    let mut v: toml::Value = text.parse().unwrap();
    let file = dir.join("admin-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    assert!(
        v["admin"].get("token_file").is_some(),
        "the ConfigMap reads the admin token from a file"
    );
    v["admin"]["token_file"] = toml::Value::String(file.display().to_string());
    toml::to_string(&v).unwrap()
}

#[test]
fn configmap_config_passes_gateway_check_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let text = configmap_toml_with_token(dir.path(), "t0ken-from-the-secret");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &text).unwrap();
    check_passes(&path, "the ConfigMap's gateway.toml");

    // Run it, moved to loopback: free ports, upstreams that refuse, no health checks (they
    // would probe the documentation addresses), no XDP.
    let mut v: toml::Value = text.parse().unwrap();
    v["admin"]["listen"] = toml::Value::String(free_addr().to_string());
    for l in v["listener"].as_array_mut().unwrap() {
        l["listen"] = toml::Value::String(free_addr().to_string());
    }
    for u in v["upstream"].as_array_mut().unwrap() {
        let u = u.as_table_mut().unwrap();
        u.remove("health_check");
        u.insert(
            "servers".into(),
            toml::Value::Array(vec![toml::Value::String(refused_addr().to_string())]),
        );
    }
    if let Some(xdp) = v.get_mut("xdp").and_then(|x| x.as_table_mut()) {
        xdp.insert("mode".into(), toml::Value::String("off".into()));
    }
    v["server"]["workers"] = toml::Value::Integer(2);
    let gw = Gateway::start(&toml::to_string(&v).unwrap());
    let r = gw.get("/health");
    assert_eq!((r.status, r.body_str().as_str()), (200, "ok\n"));
    assert_eq!(gw.get("/api/x").status, 502, "the refusing upstream");

    // The token from the file guards the control endpoints; probes and scrapes stay open.
    let admin = gw.admin_addr();
    for (method, path) in [("POST", "/reload"), ("GET", "/config")] {
        assert_eq!(admin_request(admin, method, path, None).status, 401);
        assert_eq!(
            admin_request(admin, method, path, Some("wrong")).status,
            401
        );
        let r = admin_request(admin, method, path, Some("t0ken-from-the-secret"));
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body_str());
        assert!(!r.body_str().contains("t0ken-from-the-secret"), "redacted");
    }
    for path in ["/metrics", "/healthz", "/ready"] {
        assert_eq!(
            admin_request(admin, "GET", path, None).status,
            200,
            "{path}"
        );
    }
}

#[test]
fn daemonset_admin_token_comes_from_a_secret_not_the_configmap() {
    let (_, cm_toml) = configmap_toml();
    let v: toml::Value = cm_toml.parse().unwrap();
    let admin = &v["admin"];
    assert!(admin.get("token").is_none(), "no token in the ConfigMap");
    let token_file = admin["token_file"].as_str().expect("admin.token_file");
    let listen: std::net::SocketAddr = admin["listen"].as_str().unwrap().parse().unwrap();
    assert!(
        !listen.ip().is_loopback(),
        "the kubelet reaches admin from outside"
    );

    // The file is a key of a (non-optional) Secret volume mounted read-only at its dir.
    let ds = doc_of_kind("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("gateway"))
        .unwrap();
    let (dir, file) = token_file.rsplit_once('/').unwrap();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("a volume mounted at {dir} for {token_file}"));
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    assert!(
        mount["subPath"].is_null(),
        "subPath mounts never see a rotation"
    );
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the token volume");
    let secret = &volume["secret"];
    let secret_name = secret["secretName"].as_str().expect("a Secret volume");
    assert_ne!(
        secret["optional"].as_bool(),
        Some(true),
        "the token is required"
    );
    if let Some(items) = secret["items"].as_sequence() {
        assert!(
            items.iter().any(|i| i["path"].as_str() == Some(file)),
            "{file} among the Secret's items"
        );
    }
    // The manifest says how to create that Secret.
    assert!(
        read("daemonset.yaml").contains(&format!("create secret generic {secret_name}")),
        "daemonset.yaml explains how to create {secret_name}"
    );
    // Prometheus scrapes /metrics without a token.
    let sm = doc_of_kind("ServiceMonitor");
    for e in sm["spec"]["endpoints"].as_sequence().unwrap() {
        assert!(e["bearerTokenSecret"].is_null() && e["authorization"].is_null());
    }
}

#[test]
fn a_network_admin_listener_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, text) = configmap_toml();
    let mut v: toml::Value = text.parse().unwrap();
    v["admin"].as_table_mut().unwrap().remove("token_file");
    v["admin"]["listen"] = toml::Value::String(format!("0.0.0.0:{}", free_addr().port()));
    for l in v["listener"].as_array_mut().unwrap() {
        l["listen"] = toml::Value::String(free_addr().to_string());
    }
    v["xdp"]["mode"] = toml::Value::String("off".into());
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml::to_string(&v).unwrap()).unwrap();

    let out = gateway_check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepts an open admin");
    assert!(
        stderr.contains("admin.listen") && stderr.contains("token_file"),
        "{stderr}"
    );

    let mut child = Command::new(gateway_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gateway run serves an admin listener on 0.0.0.0 with no token");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("admin.listen"), "{stderr}");

    // With the token file it is accepted on the same address.
    let text = configmap_toml_with_token(dir.path(), "x");
    let mut with: toml::Value = text.parse().unwrap();
    with["admin"]["listen"] = v["admin"]["listen"].clone();
    std::fs::write(&path, toml::to_string(&with).unwrap()).unwrap();
    check_passes(&path, "0.0.0.0 admin with a token_file");
}

#[test]
fn servicemonitor_service_daemonset_and_rules_agree() {
    let ds = doc_of_kind("DaemonSet");
    let svc = doc_of_kind("Service");
    let sm = doc_of_kind("ServiceMonitor");
    assert_eq!(s(&sm["apiVersion"]), "monitoring.coreos.com/v1");
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"].as_str(), Some("admin"));
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    let svc_port = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("Service port named admin");
    assert_eq!(svc_port["port"].as_u64(), Some(9901));
    assert_eq!(svc_port["targetPort"].as_u64(), Some(9901));

    // Selectors: ServiceMonitor → Service labels; Service → the DaemonSet's pod labels.
    let subset = |want: &Value, have: &Value, what: &str| {
        for (k, v) in want.as_mapping().expect("a label map") {
            assert_eq!(have.get(k), Some(v), "{what}: label {k:?}");
        }
    };
    subset(
        &sm["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"],
        "ServiceMonitor selects the Service",
    );
    subset(
        &svc["spec"]["selector"],
        &ds["spec"]["template"]["metadata"]["labels"],
        "Service selects the gateway pods",
    );
    subset(
        &ds["spec"]["selector"]["matchLabels"],
        &ds["spec"]["template"]["metadata"]["labels"],
        "DaemonSet selects its own pods",
    );
    // The job label the rules and the dashboard use.
    let job_label = s(&sm["spec"]["jobLabel"]);
    let job = s(&svc["metadata"]["labels"][job_label]);
    assert_eq!(job, "gateway");
    let rules = read("prometheus-rules.yaml");
    let mut queries = Vec::new();
    dashboard_queries(
        &serde_json::from_str(&read("grafana-dashboard.json")).unwrap(),
        &mut queries,
    );
    let dashboard = queries.join("\n");
    let job_matcher = Regex::new(r#"job="([^"]*)""#).unwrap();
    for (what, text) in [("rules", &rules), ("dashboard", &dashboard)] {
        let jobs: BTreeSet<&str> = job_matcher
            .captures_iter(text)
            .map(|c| c.get(1).unwrap().as_str())
            .collect();
        assert_eq!(jobs, BTreeSet::from([job]), "{what} use job=\"{job}\"");
    }
}

/// `[Section]` → (key, value) lines, in order (keys may repeat, as ExecReload does).
fn unit_file(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line without '=': {line}"));
        assert!(!current.is_empty(), "key before any section: {line}");
        sections
            .entry(current.clone())
            .or_default()
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    sections
}

#[test]
fn systemd_unit_reloads_with_hup_drains_and_raises_limits() {
    let unit = unit_file(&read("gateway.service"));
    let service = &unit["Service"];
    let all = |key: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let v = all(key);
        assert_eq!(v.len(), 1, "exactly one {key}= in [Service]");
        v[0]
    };
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/gateway run --config /etc/gateway/gateway.toml"
    );
    assert!(
        all("ExecReload").contains(&"/bin/kill -HUP $MAINPID"),
        "ExecReload sends SIGHUP: {:?}",
        all("ExecReload")
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    let (_, cm_toml) = configmap_toml();
    let budget = drain_budget(&cm_toml).max(drain_budget(""));
    assert!(
        seconds(one("TimeoutStopSec")) > budget + 1.0,
        "TimeoutStopSec {} must outlast the drain ({budget} s + 1 s)",
        one("TimeoutStopSec")
    );
    assert!(one("LimitNOFILE").parse::<u64>().unwrap() >= 65535);
    assert_eq!(one("LimitMEMLOCK"), "infinity");
    let user = one("User");
    assert!(!user.is_empty() && user != "root", "a dedicated user");
    let caps = |key: &str| -> BTreeSet<String> {
        one(key).split_whitespace().map(str::to_string).collect()
    };
    let ambient = caps("AmbientCapabilities");
    for cap in [
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_ADMIN",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_RESOURCE",
    ] {
        assert!(ambient.contains(cap), "AmbientCapabilities has {cap}");
    }
    assert!(
        ambient.is_subset(&caps("CapabilityBoundingSet")),
        "the bounding set keeps the ambient capabilities"
    );
    assert!(unit["Install"].iter().any(|(k, _)| k == "WantedBy"));
}

#[test]
fn dockerfile_is_multi_stage_with_the_bpf_toolchain() {
    let text = read("Dockerfile");
    let froms: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "a builder and a runtime stage: {froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].contains(" AS builder"));
    assert!(froms.last().unwrap().contains("debian:bookworm-slim"));
    for needle in [
        "rust-src",
        "bpf-linker",
        "--no-default-features",
        "cargo build --locked --release -p gateway",
        "GATEWAY_EBPF_TOOLCHAIN",
        "COPY --from=builder",
        "EXPOSE 80 9901",
        "STOPSIGNAL SIGTERM",
        r#"CMD ["run", "--config", "/etc/gateway/gateway.toml"]"#,
    ] {
        assert!(text.contains(needle), "Dockerfile: {needle}");
    }
    // The nightly it pins is the one gateway/build.rs can be pointed at.
    let build_rs = std::fs::read_to_string(workspace_root().join("gateway/build.rs")).unwrap();
    assert!(build_rs.contains("GATEWAY_EBPF_TOOLCHAIN"));
}

// ---------------------------------------------------------------------------------------
// Metric names in the dashboard and the rules.

/// Every `"expr"` (and templating query) string in the dashboard.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                match (k.as_str(), x) {
                    ("expr" | "definition" | "query", serde_json::Value::String(q)) => {
                        out.push(q.clone())
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// Series from outside the gateway that the rules may use: Prometheus's own `up` and
/// kube-state-metrics' pod readiness (readiness is a probe, not a gateway metric).
const EXTERNAL: &[&str] = &["up", "kube_pod_status_ready"];
/// Labels Prometheus adds at scrape time, and the histogram bound.
const TARGET_LABELS: &[&str] = &["job", "instance", "le", "namespace", "pod", "condition"];

/// Checks every metric name and label a PromQL query uses against what the gateway serves.
fn check_query(
    query: &str,
    served: &BTreeSet<String>,
    labels_of: &BTreeMap<String, BTreeSet<String>>,
    used: &mut BTreeSet<String>,
) {
    let all_labels: BTreeSet<String> = labels_of
        .values()
        .flatten()
        .cloned()
        .chain(TARGET_LABELS.iter().map(|s| s.to_string()))
        .collect();
    // Metric names: identifiers in gateway_/process_ form, plus selectors `name{`.
    let ident = Regex::new(r"\b((?:gateway|process)_[a-zA-Z0-9_]+)\b").unwrap();
    for c in ident.captures_iter(query) {
        let name = c[1].to_string();
        assert!(
            served.contains(&name),
            "`{name}` is not served by the gateway (in: {query})"
        );
        used.insert(name);
    }
    let selector = Regex::new(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}").unwrap();
    let matcher = Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"[^"]*""#).unwrap();
    for c in selector.captures_iter(query) {
        let name = &c[1];
        if !name.starts_with("gateway_") && !name.starts_with("process_") {
            assert!(
                EXTERNAL.contains(&name),
                "`{name}` is neither a gateway metric nor a known external one (in: {query})"
            );
            continue;
        }
        let family = labels_of.get(name).cloned().unwrap_or_default();
        for m in matcher.captures_iter(&c[2]) {
            let label = &m[1];
            assert!(
                family.contains(label) || TARGET_LABELS.contains(&label),
                "`{name}` has no label `{label}` (in: {query})"
            );
        }
    }
    // Grouping labels must exist on some series.
    let by = Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    for c in by.captures_iter(query) {
        for label in c[1].split(',').map(str::trim).filter(|l| !l.is_empty()) {
            assert!(
                all_labels.contains(label),
                "grouping by unknown label `{label}` (in: {query})"
            );
        }
    }
}

/// Served series names (families, and histograms' `_bucket`/`_sum`/`_count`) and the labels
/// each carries, from a live scrape plus the documented label sets.
fn served_by_a_live_gateway() -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let origin = Origin::named("api");
    let gw = Gateway::with(
        &Config::new()
            .upstream(Upstream::new("api", &[origin.addr()]))
            .route(Route::prefix("/", "api")),
    );
    assert_eq!(gw.get("/x").status, 200);
    let m = gateway_tests::control::wait_metrics(
        gw.admin_addr(),
        Duration::from_secs(5),
        "the request counted",
        |m| m.sum("gateway_http_requests_total", &[]) >= 1.0,
    );
    let _ = scrape(gw.admin_addr());
    let mut served = BTreeSet::new();
    let mut labels_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, family) in &m.families {
        let series: Vec<String> = if family.kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{name}{s}"))
                .collect()
        } else {
            vec![name.clone()]
        };
        for n in series {
            served.insert(n.clone());
            labels_of.entry(n).or_default();
        }
    }
    for sample in &m.samples {
        labels_of
            .entry(sample.name.clone())
            .or_default()
            .extend(sample.labels.keys().cloned());
    }
    for (name, kind, labels) in CONTRACT_FAMILIES.iter().chain(EXTRA_FAMILIES) {
        let series: Vec<String> = if *kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{name}{s}"))
                .collect()
        } else {
            vec![name.to_string()]
        };
        for n in series {
            assert!(served.contains(&n), "the gateway serves {n}");
            labels_of
                .entry(n)
                .or_default()
                .extend(labels.iter().map(|l| l.to_string()));
        }
    }
    (served, labels_of)
}

#[test]
fn dashboard_and_alert_rules_query_metrics_the_gateway_serves() {
    let (served, labels_of) = served_by_a_live_gateway();

    // Dashboard.
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana-dashboard.json")).expect("the dashboard is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has queries",
            p["title"]
        );
    }
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let mut used = BTreeSet::new();
    for q in &queries {
        check_query(q, &served, &labels_of, &mut used);
    }
    for needed in [
        "gateway_http_requests_total",
        "gateway_http_request_duration_seconds_bucket",
        "gateway_connections_active",
        "gateway_upstream_server_up",
        "gateway_worker_busy_ratio",
        "gateway_xdp_packets_total",
        "gateway_limit_rejections_total",
        "gateway_config_reloads_total",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
    let all = queries.join("\n");
    assert!(all.contains("histogram_quantile(0.5,") && all.contains("histogram_quantile(0.99,"));
    assert!(all.contains(r#"status=~"5..""#), "an error-rate query");

    // Alert rules.
    let rules = doc_of_kind("PrometheusRule");
    let mut alerts: BTreeMap<String, String> = BTreeMap::new();
    for group in rules["spec"]["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = s(&rule["alert"]).to_string();
            let expr = s(&rule["expr"]).to_string();
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            let mut used = BTreeSet::new();
            check_query(&expr, &served, &labels_of, &mut used);
            alerts.insert(name, expr);
        }
    }
    // The reference thresholds, each in its rule.
    for (alert, metric, threshold) in [
        (
            "GatewayHighRequestRate",
            "gateway_http_requests_total",
            "> 1000",
        ),
        (
            "GatewayHighErrorRate",
            "gateway_http_requests_total",
            "> 0.01",
        ),
        (
            "GatewayHighLatencyP99",
            "gateway_http_request_duration_seconds_bucket",
            "> 5",
        ),
        (
            "GatewayTooManyConnections",
            "gateway_connections_active",
            "> 800",
        ),
        ("GatewayWorkersBusy", "gateway_worker_busy_ratio", "> 0.8"),
        ("GatewayDown", "up", "== 0"),
        ("GatewayNotReady", "kube_pod_status_ready", ""),
        (
            "GatewayUpstreamServerDown",
            "gateway_upstream_server_up",
            "== 0",
        ),
        (
            "GatewayConfigReloadFailed",
            "gateway_config_reloads_total",
            "> 0",
        ),
    ] {
        let expr = alerts
            .get(alert)
            .unwrap_or_else(|| panic!("alert {alert} is missing ({:?})", alerts.keys()));
        assert!(expr.contains(metric), "{alert} uses {metric}: {expr}");
        assert!(
            expr.contains(threshold),
            "{alert} threshold {threshold}: {expr}"
        );
    }
    assert!(alerts["GatewayHighErrorRate"].contains(r#"status=~"5..""#));
    assert!(alerts["GatewayHighLatencyP99"].contains("histogram_quantile(0.99"));
    assert!(alerts["GatewayConfigReloadFailed"].contains(r#"result="error""#));
}

/// The Compose example: its gateway runs the config it mounts, and that config names the
/// backend by the Compose service name (as the deployments it replaces do); the config
/// passes `gateway check` (with `resolve_required = false`, since no Compose DNS answers
/// `aragora` here).
#[test]
fn compose_names_its_backend_by_service_name() {
    let dir = deploy_dir().join("compose");
    let compose: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("compose.yaml")).unwrap()).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    let gateway = &compose["services"]["gateway"];
    let command = strings(&gateway["command"]);
    let config_path = command
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("gateway run --config PATH")
        .clone();
    assert!(
        strings(&gateway["volumes"])
            .iter()
            .any(|v| v.starts_with("./gateway.toml:") && v.contains(&config_path)),
        "compose mounts gateway.toml at {config_path}"
    );
    let text = std::fs::read_to_string(dir.join("gateway.toml")).unwrap();
    let mut config: toml::Value = text.parse().unwrap();
    for u in config["upstream"].as_array_mut().unwrap() {
        for server in u["servers"].as_array().unwrap() {
            let host = server.as_str().unwrap().rsplit_once(':').unwrap().0;
            assert!(host.parse::<std::net::IpAddr>().is_err(), "{host}: a name");
            assert!(
                services.contains_key(host),
                "{host} is a service of compose.yaml"
            );
        }
        u.as_table_mut()
            .unwrap()
            .insert("resolve_required".into(), toml::Value::Boolean(false));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gateway.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    check_passes(&path, "the Compose example's gateway.toml");
}
