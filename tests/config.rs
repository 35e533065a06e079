//! The shipped `config.toml`, environment overrides, config validation and generated secrets.
//!
//! Environment cases run the real binary with its own environment (`tollgate migrate`), so no test
//! mutates this process's environment and none can race another.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::tollgate_command;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tollgate::config::{Config, Registration};
use tollgate::crypto::generate_master_key;
use tollgate::secrets::Secrets;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")
}

#[test]
fn shipped_config_loads_with_documented_defaults() {
    let cfg = Config::load(Some(&shipped())).expect("shipped config.toml loads");
    assert_eq!(cfg.server.listen, "127.0.0.1:8080");
    assert_eq!(cfg.listen_addr().unwrap().port(), 8080);
    assert_eq!(cfg.database_url(), "sqlite://tollgate.db?mode=rwc");
    assert_eq!(cfg.auth.registration, Registration::Open);
    assert_eq!(cfg.limits.default_user_rpm, 0);
    assert_eq!(cfg.limits.default_key_rpm, 0);
    assert!(!cfg.billing.enforce_balance);
    assert!(!cfg.security.allow_private_base_urls);
    assert_eq!(cfg.server.max_body_bytes, 16 * 1024 * 1024);
    // No secret ships in the file: they are generated beside the database instead.
    assert!(cfg.security.master_key.is_none());
    assert!(cfg.security.jwt_secret.is_none());
    assert!(cfg.security.previous_master_keys.is_empty());
    assert!(cfg.metrics_token().is_none());
    assert!(cfg.redis_url().is_none());
    assert_eq!(
        cfg.secrets_path(),
        Some(PathBuf::from("tollgate.db.secrets"))
    );

    let providers: Vec<(&str, &str, bool)> = cfg
        .providers
        .iter()
        .map(|p| (p.key.as_str(), p.base_url.as_str(), p.is_active))
        .collect();
    assert_eq!(
        providers,
        [
            ("openai", "https://api.openai.com/v1", true),
            ("deepseek", "https://api.deepseek.com/v1", true),
            ("siliconflow", "https://api.siliconflow.cn/v1", true),
            ("groq", "https://api.groq.com/openai/v1", true),
            ("mistral", "https://api.mistral.ai/v1", true),
            ("openrouter", "https://openrouter.ai/api/v1", true),
            ("ollama", "http://127.0.0.1:11434/v1", false),
        ]
    );
    for p in &cfg.providers {
        assert_eq!(p.kind, "openai", "{}", p.key);
        assert!(!p.display_name.is_empty(), "{}", p.key);
    }
    let orders: Vec<i32> = cfg.providers.iter().map(|p| p.sort_order).collect();
    assert!(
        orders.windows(2).all(|w| w[0] < w[1]),
        "sort_order strictly ascending in file order: {orders:?}"
    );

    let plans: Vec<&str> = cfg.plans.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(plans, ["free", "pro", "team"]);
    assert!(cfg.plans.iter().all(|p| p.rpm_limit > 0 && p.tpm_limit > 0));
    assert_eq!(cfg.plans[0].price_usd_per_month, 0.0);
    assert!(cfg.plans[1].price_usd_per_month > 0.0);
}

/// `section.key` for every `key = ...` line of a TOML text, commented out or not.
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        let header = line
            .strip_prefix("[[")
            .and_then(|l| l.strip_suffix("]]"))
            .or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')));
        if let Some(h) = header {
            section = h.trim().to_owned();
            continue;
        }
        let body = line.trim_start_matches('#').trim();
        if let Some((key, _)) = body.split_once('=') {
            let key = key.trim();
            let word = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
            if key.starts_with(|c: char| c.is_ascii_lowercase()) && key.bytes().all(word) {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

/// Every key `Config` has, as `section.key` (`providers.key` for each element's fields).
fn config_keys(cfg: &Config) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let Value::Object(top) = serde_json::to_value(cfg).expect("config serialises") else {
        panic!("config serialises to an object");
    };
    for (section, v) in top {
        let fields = match v {
            Value::Object(m) => m,
            Value::Array(items) => match items.into_iter().next() {
                Some(Value::Object(m)) => m,
                _ => panic!("{section}: the shipped file must show one element"),
            },
            other => panic!("{section}: unexpected top-level value {other}"),
        };
        keys.extend(fields.keys().map(|k| format!("{section}.{k}")));
    }
    // Secrets are never serialised; they are keys all the same.
    for k in [
        "server.metrics_token",
        "database.url",
        "security.master_key",
        "security.previous_master_keys",
        "security.jwt_secret",
        "redis.url",
    ] {
        keys.insert(k.to_owned());
    }
    keys
}

#[test]
fn shipped_config_documents_every_key() {
    let text = std::fs::read_to_string(shipped()).unwrap();
    let cfg = Config::load(Some(&shipped())).unwrap();
    let want = config_keys(&cfg);
    let have = documented_keys(&text);
    let missing: Vec<_> = want.difference(&have).collect();
    let stale: Vec<_> = have.difference(&want).collect();
    assert!(
        missing.is_empty(),
        "keys of src/config.rs not in config.toml: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "config.toml mentions keys src/config.rs does not have: {stale:?}"
    );
    // Every key line (set or commented out) has a comment line above it or at its end.
    let lines: Vec<&str> = text.lines().collect();
    let mut section = "";
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t;
            continue;
        }
        let is_key = !t.is_empty() && !t.starts_with('#') && t.contains('=');
        if is_key && !section.starts_with("[[") {
            let prev = lines[..i].last().map_or("", |l| l.trim());
            assert!(
                prev.starts_with('#') || t.contains(" # "),
                "config.toml line {}: {t:?} has no comment",
                i + 1
            );
        }
    }
}

/// Writes `body` as a config file and returns the load error's text.
fn load_error(body: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, body).expect("write config");
    match Config::load(Some(&path)) {
        Ok(_) => panic!("config should be refused:\n{body}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn invalid_values_are_refused_naming_the_key() {
    let short_secret = "too-short-secret";
    let bad_master_key = "bm90LTMyLWJ5dGVz"; // base64 of 12 bytes
    let cases = [
        ("[server]\nlisten = \"localhost\"\n", "server.listen"),
        ("[server]\nlisten = \"127.0.0.1:99999\"\n", "server.listen"),
        ("[auth]\nregistration = \"maybe\"\n", "registration"),
        (
            "[server]\nlisten_address = \"127.0.0.1:1\"\n",
            "listen_address",
        ),
        ("[limitz]\ndefault_user_rpm = 1\n", "limitz"),
        (
            &format!("[security]\njwt_secret = \"{short_secret}\"\n"),
            "security.jwt_secret",
        ),
        (
            &format!("[security]\nmaster_key = \"{bad_master_key}\"\n"),
            "security.master_key",
        ),
        ("[database]\nurl = \"oracle://x\"\n", "database.url"),
        ("[server]\nlog_format = \"xml\"\n", "server.log_format"),
        (
            "[[providers]]\nkey = \"Open AI\"\ndisplay_name = \"x\"\nbase_url = \"https://x\"\n",
            "providers[0].key",
        ),
    ];
    for (body, key) in cases {
        let err = load_error(body);
        assert!(
            err.contains(key),
            "error for\n{body}should name {key:?}: {err}"
        );
        assert!(
            !err.contains(short_secret) && !err.contains(bad_master_key),
            "an error repeats a secret: {err}"
        );
    }
}

#[test]
fn missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Config::load(Some(&dir.path().join("nope.toml")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.toml"), "{err}");
}

/// Runs `tollgate [--config FILE] migrate` in `dir` with `env`; returns (exit code, stderr).
fn migrate(dir: &Path, config: Option<&str>, env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = tollgate_command(dir);
    if let Some(body) = config {
        let path = dir.join("given.toml");
        std::fs::write(&path, body).expect("write config");
        cmd.arg("--config").arg(path);
    }
    cmd.arg("migrate").envs(env.iter().copied());
    let out = cmd.output().expect("run tollgate");
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn env_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
    let file = format!(
        "[server]\nlisten = \"not an address\"\n[database]\nurl = \"{}\"\n",
        url("from-file.db")
    );

    // The file alone is invalid and names the key.
    let (code, err) = migrate(dir.path(), Some(&file), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("server.listen"), "{err}");

    // TOLLGATE_SERVER__LISTEN and DATABASE_URL replace the file's values.
    let env_db = url("from-env.db");
    let (code, err) = migrate(
        dir.path(),
        Some(&file),
        &[
            ("TOLLGATE_SERVER__LISTEN", "127.0.0.1:0"),
            ("DATABASE_URL", &env_db),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(dir.path().join("from-env.db").exists());
    assert!(!dir.path().join("from-file.db").exists());
}

#[test]
fn bad_environment_values_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let secret = "short-jwt-secret";
    let cases = [
        ("TOLLGATE_SERVER__LISTEN", "nowhere", "server.listen"),
        ("TOLLGATE_AUTH__REGISTRATION", "sometimes", "registration"),
        (
            "TOLLGATE_LIMITS__DEFAULT_USER_RPM",
            "many",
            "default_user_rpm",
        ),
        ("TOLLGATE_SERVER__NO_SUCH_KEY", "1", "no_such_key"),
        (
            "TOLLGATE_MASTER_KEY",
            "bm90LTMyLWJ5dGVz",
            "security.master_key",
        ),
        ("TOLLGATE_JWT_SECRET", secret, "security.jwt_secret"),
        ("DATABASE_URL", "oracle://db", "database.url"),
    ];
    for (var, value, key) in cases {
        let (code, err) = migrate(dir.path(), None, &[("DATABASE_URL", &db), (var, value)]);
        assert_eq!(code, 2, "{var}={value}: {err}");
        // figment names environment keys as spelled there (`AUTH.REGISTRATION`).
        assert!(
            err.to_lowercase().contains(key),
            "{var}={value} should name {key}: {err}"
        );
        assert!(!err.contains(secret), "stderr repeats the secret: {err}");
    }

    // A valid master key and JWT secret from the environment are accepted.
    let (code, err) = migrate(
        dir.path(),
        None,
        &[
            ("DATABASE_URL", &db),
            ("TOLLGATE_MASTER_KEY", &generate_master_key()),
            ("TOLLGATE_JWT_SECRET", &"j".repeat(40)),
        ],
    );
    assert_eq!(code, 0, "{err}");
}

fn sqlite_config(dir: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.database.url = SecretString::from(format!(
        "sqlite://{}?mode=rwc",
        dir.join("tollgate.db").display()
    ));
    cfg
}

#[test]
fn secrets_are_generated_once_into_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sqlite_config(dir.path());
    let path = dir.path().join("tollgate.db.secrets");
    assert_eq!(cfg.secrets_path(), Some(path.clone()));

    // Without `generate` (what a non-serving command does) a missing file is an error.
    let err = Secrets::load(&cfg, false).unwrap_err().to_string();
    assert!(err.contains("tollgate.db.secrets"), "{err}");
    assert!(!path.exists());

    let first = Secrets::load(&cfg, true).unwrap();
    let meta = std::fs::metadata(&path).expect("secrets file written");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let written = std::fs::read(&path).unwrap();
    assert!(first.jwt_secret.expose_secret().len() >= 32);

    // A second start reads the same keys and leaves the file alone.
    let second = Secrets::load(&cfg, true).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), written);
    assert_eq!(
        first.jwt_secret.expose_secret(),
        second.jwt_secret.expose_secret()
    );
    assert_eq!(first.keyring.current_id(), second.keyring.current_id());
    let sealed = first.keyring.seal(b"sk-provider", "row-1");
    assert_eq!(
        second.keyring.open(&sealed, "row-1").unwrap(),
        b"sk-provider"
    );
    let third = Secrets::load(&cfg, false).expect("an existing file is enough");
    assert_eq!(
        third.keyring.open(&sealed, "row-1").unwrap(),
        b"sk-provider"
    );
}

#[test]
fn configured_secrets_need_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sqlite_config(dir.path());
    let key = generate_master_key();
    cfg.security.master_key = Some(SecretString::from(key.clone()));
    cfg.security.jwt_secret = Some(SecretString::from("k".repeat(40)));
    let s = Secrets::load(&cfg, true).unwrap();
    assert!(!dir.path().join("tollgate.db.secrets").exists());
    assert_eq!(s.jwt_secret.expose_secret(), "k".repeat(40));
    let want = tollgate::crypto::key_id(&tollgate::crypto::parse_master_key(&key).unwrap());
    assert_eq!(s.keyring.current_id(), want);
}
