//! `tollgate admin create`: the real binary bootstraps an administrator who can then sign in.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;

use common::{TestApp, TestDb, tollgate_command};
use secrecy::SecretString;
use serde_json::{Value, json};
use tollgate::accounts::totp;

const PASSWORD: &str = "bootstrap-password";

/// Runs `tollgate admin create ARGS` with `stdin` and the database at `dir/t.db`.
fn admin_create(dir: &Path, env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
    let mut cmd = tollgate_command(dir);
    cmd.arg("admin")
        .arg("create")
        .args(args)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.join("t.db").display()),
        )
        .env("TOLLGATE_SERVER__LOG_FORMAT", "json")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tollgate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for tollgate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Signs in over HTTP with a code computed from the printed secret.
async fn sign_in(app: &TestApp, username: &str, password: &str, secret: &str) -> (u16, Value) {
    app.post(
        "/api/auth/login",
        None,
        json!({ "username": username, "password": password, "totp_code": totp::current_code(secret).expect("code") }),
    )
    .await
}

#[tokio::test]
async fn json_output_and_the_admin_signs_in() {
    let dir = tempfile::tempdir().unwrap();
    let master = tollgate::crypto::generate_master_key();
    let jwt = "j".repeat(40);
    let env = [
        ("TOLLGATE_MASTER_KEY", master.as_str()),
        ("TOLLGATE_JWT_SECRET", jwt.as_str()),
    ];
    let out = admin_create(
        dir.path(),
        &env,
        &[
            "--username",
            "root",
            "--email",
            "root@example.com",
            "--password-stdin",
            "--json",
        ],
        &format!("{PASSWORD}\n"),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Exactly one JSON object on stdout, nothing else.
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let obj = v.as_object().expect("object");
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["id", "otpauth_url", "totp_secret", "username"]);
    assert_eq!(v["username"], "root");
    let secret = v["totp_secret"].as_str().unwrap();
    assert!(
        v["otpauth_url"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/")
    );
    assert!(!stdout.contains(PASSWORD) && !text(&out.stderr).contains(PASSWORD));

    let db = Arc::new(TestDb::sqlite_at(&dir.path().join("t.db")));
    let app = TestApp::spawn_on(db, |c| {
        c.security.master_key = Some(SecretString::from(master.clone()));
        c.security.jwt_secret = Some(SecretString::from(jwt.clone()));
    })
    .await;
    // The trailing newline was not part of the password.
    let (s, e) = sign_in(&app, "root", &format!("{PASSWORD}\n"), secret).await;
    assert_eq!(s, 401, "{e}");
    let (s, b) = sign_in(&app, "root", PASSWORD, secret).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["role"], "admin");
    assert_eq!(b["user"]["status"], "active");
    assert_eq!(b["user"]["email"], "root@example.com");
    assert_eq!(b["user"]["id"], v["id"]);
    let token = b["access_token"].as_str().unwrap();
    let (s, users) = app.get("/api/admin/users", Some(token)).await;
    assert_eq!(s, 200, "{users}");
    assert_eq!(users["total"], 1);
    let (_, log) = app
        .get("/api/admin/audit-log?action=admin.user.create", Some(token))
        .await;
    assert_eq!(log["total"], 1, "{log}");
    assert_eq!(log["data"][0]["actor_id"], Value::Null);
    assert_eq!(log["data"][0]["detail"]["via"], "cli");
}

#[tokio::test]
async fn duplicate_and_invalid_input_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let master = tollgate::crypto::generate_master_key();
    let jwt = "j".repeat(40);
    let env = [
        ("TOLLGATE_MASTER_KEY", master.as_str()),
        ("TOLLGATE_JWT_SECRET", jwt.as_str()),
    ];
    let args = ["--username", "root", "--password-stdin", "--json"];
    let first = admin_create(dir.path(), &env, &args, PASSWORD);
    assert!(first.status.success(), "stderr: {}", text(&first.stderr));
    let first: Value = serde_json::from_slice(&first.stdout).unwrap();

    let again = admin_create(dir.path(), &env, &args, "another-password\n");
    assert!(!again.status.success());
    assert!(again.stdout.is_empty(), "stdout: {}", text(&again.stdout));
    let err = text(&again.stderr);
    assert!(err.contains("already exists"), "{err}");

    let short = admin_create(
        dir.path(),
        &env,
        &["--username", "other", "--password-stdin"],
        "short\n",
    );
    assert!(!short.status.success());
    assert!(
        text(&short.stderr).contains("8–128"),
        "{}",
        text(&short.stderr)
    );
    let bad_name = admin_create(
        dir.path(),
        &env,
        &["--username", "no spaces", "--password-stdin"],
        "long-enough-password\n",
    );
    assert!(!bad_name.status.success());
    assert!(text(&bad_name.stderr).contains("username"));
    // --password-stdin is required: a password is never taken from the command line.
    let missing = admin_create(dir.path(), &env, &["--username", "other"], PASSWORD);
    assert!(!missing.status.success());

    // Only the first administrator exists, with its original secret.
    let db = Arc::new(TestDb::sqlite_at(&dir.path().join("t.db")));
    let app = TestApp::spawn_on(db, |c| {
        c.security.master_key = Some(SecretString::from(master.clone()));
        c.security.jwt_secret = Some(SecretString::from(jwt.clone()));
    })
    .await;
    let (s, b) = sign_in(
        &app,
        "root",
        PASSWORD,
        first["totp_secret"].as_str().unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let token = b["access_token"].as_str().unwrap();
    let (_, users) = app.get("/api/admin/users", Some(token)).await;
    assert_eq!(users["total"], 1);
}

#[tokio::test]
async fn human_output_with_generated_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = admin_create(
        dir.path(),
        &[],
        &["--username", "boss", "--password-stdin"],
        &format!("{PASSWORD}\r\n"),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("boss"), "{stdout}");
    let secret = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("secret:"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no secret line in {stdout}"));
    assert!(stdout.contains("otpauth://totp/"));
    // The secrets were generated beside the database, private to the owner.
    let secrets = dir.path().join("t.db.secrets");
    assert!(secrets.exists(), "no secrets file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secrets).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A server reading the same secrets file accepts the administrator.
    let db = Arc::new(TestDb::sqlite_at(&dir.path().join("t.db")));
    let app = TestApp::spawn_on(db, |c| {
        c.security.master_key = None;
        c.security.jwt_secret = None;
    })
    .await;
    let (s, b) = sign_in(&app, "boss", PASSWORD, &secret).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["user"]["role"], "admin");
}
