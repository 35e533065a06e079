//! `deploy/` checked without a container engine: every YAML file parses, and the pieces agree with
//! each other and with the code — the Kubernetes probes hit `/ready` and `/health` on the
//! container's port, the compose file runs several replicas that nginx balances and Prometheus
//! scrapes, and every metric the Grafana dashboard queries is one tollgate exports.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tollgate::config::Config;
use tollgate::telemetry::Metrics;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file (merge keys applied), as JSON values.
fn docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.apply_merge()
                .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
            serde_json::to_value(v)
                .unwrap_or_else(|e| panic!("{}: not JSON-like: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn doc(path: &Path) -> Value {
    let mut d = docs(path);
    assert_eq!(d.len(), 1, "{}: one document", path.display());
    d.remove(0)
}

#[test]
fn every_yaml_file_parses() {
    let files = yaml_files(&deploy_dir());
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(deploy_dir())
                .expect("under deploy")
                .display()
                .to_string()
        })
        .collect();
    for want in [
        "compose.yaml",
        "prometheus.yml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/configmap.yaml",
        "k8s/secret.yaml",
        "k8s/hpa.yaml",
        "grafana/provisioning/datasources/prometheus.yaml",
        "grafana/provisioning/dashboards/tollgate.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "deploy/{want} missing: {names:?}"
        );
    }
    for f in &files {
        let d = docs(f);
        assert!(!d.is_empty(), "{}: no document", f.display());
        assert!(
            d.iter().all(Value::is_object),
            "{}: not a mapping",
            f.display()
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Kubernetes

/// Every object in deploy/k8s, by (kind, name).
fn k8s_objects() -> HashMap<(String, String), Value> {
    let mut objects = HashMap::new();
    for f in yaml_files(&deploy_dir().join("k8s")) {
        for d in docs(&f) {
            let kind = d["kind"].as_str().unwrap_or_default().to_owned();
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if kind == "Kustomization" {
                continue;
            }
            assert!(
                !kind.is_empty() && !name.is_empty() && d["apiVersion"].is_string(),
                "{}: kind, apiVersion and metadata.name are required",
                f.display()
            );
            assert!(
                objects.insert((kind.clone(), name.clone()), d).is_none(),
                "{kind}/{name} defined twice"
            );
        }
    }
    objects
}

fn get<'a>(objects: &'a HashMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    objects
        .get(&(kind.to_owned(), name.to_owned()))
        .unwrap_or_else(|| panic!("deploy/k8s has no {kind} {name}"))
}

/// A probe's or Service's port (a number or a container port name) as a number.
fn resolve_port(port: &Value, container: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("port is a number or a name");
    container["ports"]
        .as_array()
        .expect("container ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// The ConfigMap's config.toml, loaded the way `tollgate serve` loads it.
fn configmap_config(objects: &HashMap<(String, String), Value>) -> Config {
    let text = get(objects, "ConfigMap", "tollgate-config")["data"]["config.toml"]
        .as_str()
        .expect("config.toml in the ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("write");
    Config::load(Some(&path)).unwrap_or_else(|e| panic!("the ConfigMap's config.toml: {e}"))
}

#[test]
fn k8s_deployment_probes_security_and_references() {
    let objects = k8s_objects();
    let deploy = get(&objects, "Deployment", "tollgate");
    let pod = &deploy["spec"]["template"];
    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().expect("containers");
    let c = containers
        .iter()
        .find(|c| c["name"] == "tollgate")
        .expect("a container named tollgate");

    // Probes: readiness /ready, liveness /health, both on the port tollgate listens on.
    let cfg = configmap_config(&objects);
    let listen_port = u64::from(cfg.listen_addr().expect("listen").port());
    assert!(
        c["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(listen_port)),
        "the container exposes server.listen's port {listen_port}"
    );
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(resolve_port(&get["port"], c), listen_port, "{probe} port");
    }
    if c["startupProbe"].is_object() {
        assert_eq!(c["startupProbe"]["httpGet"]["path"], "/health");
    }
    assert!(deploy["spec"]["replicas"].as_u64().unwrap_or(1) >= 2);

    // Non-root, no privilege escalation, resources set.
    let pod_sc = &spec["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert!(pod_sc["runAsUser"].as_u64().is_some_and(|u| u != 0));
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    // Long enough for the drain (server.shutdown_drain_secs) and the usage flush.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(grace > cfg.server.shutdown_drain_secs, "grace {grace}s");

    // Every Secret key and ConfigMap the pod uses exists.
    let secret = get(&objects, "Secret", "tollgate-secrets");
    let mut env_names = BTreeSet::new();
    for e in c["env"].as_array().expect("env") {
        env_names.insert(e["name"].as_str().expect("env name").to_owned());
        if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            let (name, key) = (
                r["name"].as_str().expect("name"),
                r["key"].as_str().expect("key"),
            );
            let s = get(&objects, "Secret", name);
            assert!(
                s["stringData"].get(key).is_some() || s["data"].get(key).is_some(),
                "Secret {name} has no key {key}"
            );
        }
    }
    for want in ["TOLLGATE_MASTER_KEY", "TOLLGATE_JWT_SECRET", "DATABASE_URL"] {
        assert!(env_names.contains(want), "the pod gets {want}");
        assert!(secret["stringData"].get(want).is_some());
    }
    for v in spec["volumes"].as_array().expect("volumes") {
        if let Some(name) = v["configMap"]["name"].as_str() {
            get(&objects, "ConfigMap", name);
        }
    }
    assert!(cfg.redis_url().is_some(), "the replicas share Redis");

    // The Service reaches the pods on the same port; the HPA scales this Deployment.
    let labels = &pod["metadata"]["labels"];
    let svc = get(&objects, "Service", "tollgate");
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(&labels[k], v, "the Service selects the pods ({k})");
    }
    for p in svc["spec"]["ports"].as_array().expect("service ports") {
        assert_eq!(resolve_port(&p["targetPort"], c), listen_port);
    }
    let hpa = get(&objects, "HorizontalPodAutoscaler", "tollgate");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tollgate");
    let (min, max) = (
        hpa["spec"]["minReplicas"].as_u64().expect("minReplicas"),
        hpa["spec"]["maxReplicas"].as_u64().expect("maxReplicas"),
    );
    assert!(min >= 2 && max >= min, "{min}..{max}");

    // The kustomization lists every manifest.
    let kustomization = doc(&deploy_dir().join("k8s/kustomization.yaml"));
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for f in yaml_files(&deploy_dir().join("k8s")) {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        if name != "kustomization.yaml" {
            assert!(
                listed.contains(name.as_str()),
                "kustomization misses {name}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Compose, nginx, Prometheus

/// The compose services built from deploy/Dockerfile: the tollgate replicas.
fn replicas(compose: &Value) -> Vec<(String, Value)> {
    compose["services"]
        .as_object()
        .expect("services")
        .iter()
        .filter(|(_, s)| s["build"]["dockerfile"] == "deploy/Dockerfile")
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

#[test]
fn compose_runs_replicas_behind_nginx_scraped_by_prometheus() {
    let compose = doc(&deploy_dir().join("compose.yaml"));
    let services = compose["services"].as_object().expect("services");
    for want in ["nginx", "postgres", "redis", "prometheus", "grafana"] {
        assert!(services.contains_key(want), "compose has {want}");
    }
    let replicas = replicas(&compose);
    assert!(replicas.len() >= 2, "at least two tollgate replicas");
    let nginx = read(&deploy_dir().join("nginx.conf"));
    let prometheus = doc(&deploy_dir().join("prometheus.yml"));
    let targets: Vec<String> = prometheus["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .filter(|j| j["job_name"] == "tollgate")
        .flat_map(|j| j["static_configs"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| s["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    for (name, svc) in &replicas {
        let env = &svc["environment"];
        let listen = env["TOLLGATE_SERVER__LISTEN"].as_str().expect("listen");
        let port = listen.rsplit(':').next().expect("port");
        assert!(
            listen.starts_with("0.0.0.0:"),
            "{name} listens on every interface"
        );
        assert!(
            env["DATABASE_URL"]
                .as_str()
                .is_some_and(|u| u.starts_with("postgres://")),
            "{name} uses PostgreSQL"
        );
        assert!(
            env["TOLLGATE_REDIS__URL"]
                .as_str()
                .is_some_and(|u| u.starts_with("redis://")),
            "{name} shares Redis"
        );
        for secret in ["TOLLGATE_MASTER_KEY", "TOLLGATE_JWT_SECRET"] {
            assert!(
                env[secret]
                    .as_str()
                    .is_some_and(|v| v.starts_with(&format!("${{{secret}"))),
                "{name}: {secret} comes from the environment (.env), never from the file"
            );
        }
        for dep in ["postgres", "redis"] {
            assert!(
                svc["depends_on"].get(dep).is_some(),
                "{name} waits for {dep}"
            );
        }
        let target = format!("{name}:{port}");
        assert!(
            nginx.contains(&format!("server {target}")),
            "nginx balances {target}"
        );
        assert!(
            targets.contains(&target),
            "Prometheus scrapes {target}: {targets:?}"
        );
    }
    assert!(
        nginx.contains("proxy_buffering off"),
        "streams pass unbuffered"
    );

    // Every secret compose requires is in .env.example.
    let text = read(&deploy_dir().join("compose.yaml"));
    let example = read(&deploy_dir().join(".env.example"));
    let required: BTreeSet<&str> = text
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once(":?").map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(required.contains("TOLLGATE_MASTER_KEY") && required.contains("TOLLGATE_JWT_SECRET"));
    for name in required {
        assert!(
            example.lines().any(|l| l.starts_with(&format!("{name}="))),
            ".env.example lists {name}"
        );
    }

    // Grafana gets the provisioning folder and the dashboards where the provider looks.
    let mounts: Vec<(String, String)> = services["grafana"]["volumes"]
        .as_array()
        .expect("grafana volumes")
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|v| {
            let mut parts = v.split(':');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    let target_of = |src: &str| {
        mounts
            .iter()
            .find(|(s, _)| s == src)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("grafana mounts {src}"))
    };
    assert_eq!(
        target_of("./grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let provider = doc(&deploy_dir().join("grafana/provisioning/dashboards/tollgate.yaml"));
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some(target_of("./grafana/dashboards").as_str())
    );
    for (src, _) in &mounts {
        if let Some(rel) = src.strip_prefix("./") {
            assert!(deploy_dir().join(rel).exists(), "deploy/{rel} exists");
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Grafana dashboard

/// Metric names in the exposition of a `Metrics` whose labelled metrics all have a child (a vec
/// with none is left out of the output).
fn exported_metric_names() -> BTreeSet<String> {
    let m = Metrics::new();
    m.requests_total
        .with_label_values(&["chat.completions", "m", "p", "200"])
        .inc();
    m.request_duration
        .with_label_values(&["chat.completions"])
        .observe(0.1);
    m.ttft.with_label_values(&["chat.completions"]).observe(0.1);
    m.tokens_total
        .with_label_values(&["m", "p", "prompt"])
        .inc();
    m.cost_usd_total.with_label_values(&["m", "p"]).inc_by(0.5);
    m.rate_limited_total.with_label_values(&["key_rpm"]).inc();
    m.upstream_errors_total
        .with_label_values(&["connect"])
        .inc();
    m.redis_errors_total
        .with_label_values(&["rate_limit"])
        .inc();
    m.http_requests_total
        .with_label_values(&["v1", "2xx"])
        .inc();
    m.render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// `tollgate_*` identifiers in a PromQL expression.
fn tollgate_metrics_in(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tollgate_"))
        .collect()
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let path = deploy_dir().join("grafana/dashboards/tollgate.json");
    let dash: Value = serde_json::from_str(&read(&path)).expect("the dashboard is valid JSON");
    let datasource = doc(&deploy_dir().join("grafana/provisioning/datasources/prometheus.yaml"));
    let uid = datasource["datasources"][0]["uid"]
        .as_str()
        .expect("datasource uid");
    let exported = exported_metric_names();
    for want in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_time_to_first_token_seconds_bucket",
        "tollgate_redis_errors_total",
    ] {
        assert!(exported.contains(want), "{want} in {exported:?}");
    }

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queried = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate id: {title}"
        );
        assert_eq!(
            p["datasource"]["uid"], uid,
            "{title}: the provisioned datasource"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], uid, "{title}");
            let expr = t["expr"].as_str().expect("expr");
            for name in tollgate_metrics_in(expr) {
                assert!(
                    exported.contains(name),
                    "{title}: {name} is not a metric tollgate exports"
                );
                queried.insert(name.to_owned());
            }
        }
    }
    // What the operations view must show (API.md §7).
    for want in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_time_to_first_token_seconds_bucket",
        "tollgate_tokens_total",
        "tollgate_cost_usd_total",
        "tollgate_rate_limited_total",
        "tollgate_active_streams",
        "tollgate_usage_queue_depth",
        "tollgate_usage_write_errors_total",
        "tollgate_auth_cache_hits_total",
        "tollgate_auth_cache_misses_total",
    ] {
        assert!(queried.contains(want), "the dashboard does not show {want}");
    }
    let exprs = dash.to_string();
    assert!(
        exprs.contains("histogram_quantile(0.5,") && exprs.contains("histogram_quantile(0.99,")
    );
}
