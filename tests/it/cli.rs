//! The real binary: commands, output and exit codes (0 ok, 1 failures, 2 bad usage/config).

use std::path::Path;
use std::process::Output;

use scimsync::sandbox::{self, SandboxOptions};

async fn scimsync(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_scimsync"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env(
            "SCIM_TOKEN",
            std::env::var("SCIM_TOKEN_FOR_TEST").unwrap_or_else(|_| "cli-token".into()),
        )
        .env_remove("SCIMSYNC_CONFIG");
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn scimsync");
    // Dropping stdin closes it, so `import -` sees end of input.
    if let Some(mut i) = child.stdin.take()
        && let Some(text) = stdin
    {
        i.write_all(text.as_bytes()).await.expect("stdin");
    }
    child.wait_with_output().await.expect("scimsync runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_config(dir: &Path, url: &str, extra: &str) -> std::path::PathBuf {
    crate::harness::write_default_mappings(dir);
    let cfg = format!(
        "[database]\nurl = \"sqlite://{}\"\n\n[[target]]\nname = \"sandbox\"\nurl = \"{url}\"\nmappings = \"mappings\"\n{extra}\n[target.auth]\nmode = \"token\"\ntoken = \"${{SCIM_TOKEN}}\"\n",
        dir.join("cli.db").display()
    );
    let path = dir.join("scimsync.toml");
    std::fs::write(&path, cfg).expect("config");
    path
}

const DIRECTORY: &str = "{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice Smith\",\"email\":\"alice@example.com\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}\n{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"Eng\",\"members\":[\"u-1\",\"u-2\"]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_work_end_to_end() {
    let sb = sandbox::start(SandboxOptions {
        patch: true,
        ..SandboxOptions::with_token("cli-token")
    })
    .await
    .expect("sandbox");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &sb.url, "");

    let out = scimsync(&cfg, &["directory", "import", "-"], Some(DIRECTORY)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("2 user(s) and 2 group(s) changed"),
        "{}",
        text(&out.stdout)
    );

    let out = scimsync(&cfg, &["check"], None).await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("patch=true filter=true"),
        "{}",
        text(&out.stdout)
    );

    let out = scimsync(&cfg, &["plan", "--format", "json"], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan is JSON");
    assert_eq!(
        plan[0]["requests"].as_array().map(Vec::len),
        Some(3),
        "{plan}"
    );
    assert!(sb.writes().is_empty(), "plan sent nothing");

    let out = scimsync(&cfg, &["sync", "--full"], None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("created") && stdout.contains("sandbox"),
        "{stdout}"
    );
    assert_eq!(sb.users().len(), 2);
    assert_eq!(sb.groups().len(), 1);

    let out = scimsync(&cfg, &["sync", "--user", "u-1"], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("unchanged since last sent")
            && text(&out.stdout).contains("not mapped"),
        "{}",
        text(&out.stdout)
    );

    let out = scimsync(
        &cfg,
        &["mapping", "test", "--target", "sandbox", "--user", "u-1"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("resource JSON");
    assert_eq!(doc["userName"], "alice");

    let obj = dir.path().join("zoe.json");
    std::fs::write(
        &obj,
        "{\"kind\":\"user\",\"id\":\"z\",\"username\":\"zoe\",\"service_account\":true}",
    )
    .expect("write");
    let out = scimsync(
        &cfg,
        &[
            "mapping",
            "test",
            "--target",
            "sandbox",
            "--file",
            obj.to_str().expect("utf-8 path"),
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("resource JSON");
    assert_eq!(
        (doc["userName"].as_str(), doc["externalId"].as_str()),
        (Some("zoe"), Some("z"))
    );
    std::fs::write(
        dir.path().join("mappings/user/05-skip.rhai"),
        "if user.username == \"zoe\" { skip(\"no zoes\") }",
    )
    .expect("write");
    let out = scimsync(
        &cfg,
        &[
            "mapping",
            "test",
            "--target",
            "sandbox",
            "--file",
            obj.to_str().expect("utf-8 path"),
        ],
        None,
    )
    .await;
    assert!(
        text(&out.stdout).contains("skipped by") && text(&out.stdout).contains("no zoes"),
        "{}",
        text(&out.stdout)
    );
    std::fs::remove_file(dir.path().join("mappings/user/05-skip.rhai")).expect("rm");

    let out = scimsync(&cfg, &["status"], None).await;
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("succeeded")
            && text(&out.stdout).contains("no object is failing"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("sandbox: healthy since")
            && text(&out.stdout).contains("ServiceProviderConfig read"),
        "{}",
        text(&out.stdout)
    );

    let out = scimsync(&cfg, &["directory", "export"], None).await;
    assert!(out.status.success());
    let exported = text(&out.stdout);
    assert_eq!(exported.lines().count(), 3);
    assert!(
        exported
            .lines()
            .all(|l| scimsync::directory::parse_record(l).is_ok()),
        "{exported}"
    );

    // A broken mapping fails objects: exit 1, and status lists them.
    std::fs::write(
        dir.path().join("mappings/user/50-broken.rhai"),
        "#{ userName: 42 }",
    )
    .expect("write");
    let out = scimsync(&cfg, &["sync", "--full"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("userName: must be a string"),
        "{}",
        text(&out.stdout)
    );
    let out = scimsync(&cfg, &["status"], None).await;
    assert!(
        text(&out.stdout).contains("failing objects"),
        "{}",
        text(&out.stdout)
    );
    sb.stop().await;
}

#[tokio::test]
async fn bad_input_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), "http://127.0.0.1:9/scim/v2", "");
    let out = scimsync(&cfg, &["directory", "import", "-"], Some("{\"kind\":\"user\",\"id\":\"a\",\"username\":\"a\"}\n{\"kind\":\"user\",\"id\":\"b\"}\n")).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("username") && err.contains("nothing was imported"),
        "{err}"
    );
    let out = scimsync(&cfg, &["directory", "export"], None).await;
    assert_eq!(
        text(&out.stdout),
        "",
        "the good line 1 was not imported either"
    );

    let cfg = write_config(dir.path(), "http://127.0.0.1:9/scim/v2", "colour = \"red\"");
    let out = scimsync(&cfg, &["sync", "--full"], None).await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("scimsync.toml")
            && err.contains("target[0] (\"sandbox\")")
            && err.contains("colour"),
        "{err}"
    );

    let out = scimsync(&cfg, &["sync"], None).await;
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[tokio::test]
async fn demo_runs_and_converges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = scimsync(
        &dir.path().join("absent.toml"),
        &["demo", "--users", "40"],
        None,
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("write requests in the second sync: 0"),
        "{stdout}"
    );
    assert!(stdout.contains("\"userName\""), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_capabilities_profile_and_failing_steps() {
    use scimsync::sandbox::{OAuthClient, SandboxProfile};
    let sb = sandbox::start(SandboxOptions {
        profile: SandboxProfile::Nauthera,
        oauth_clients: vec![OAuthClient {
            id: "prov".into(),
            secret: "pw".into(),
            scopes: vec!["admin".into(), "read".into()],
        }],
        ..Default::default()
    })
    .await
    .expect("sandbox");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = |scope: &str| {
        let text = format!(
            "[database]\nurl = \"sqlite://{}\"\n\n[[target]]\nname = \"nauthera\"\nurl = \"{}\"\ncompatibility = \"slack\"\n[target.auth]\nmode = \"oauth\"\ntoken_url = \"{}\"\nclient_id = \"prov\"\nclient_secret = \"${{SCIM_TOKEN}}\"\nscope = \"{scope}\"\n",
            dir.path().join("c.db").display(),
            sb.url,
            sb.token_url
        );
        let path = dir.path().join(format!("{scope}.toml"));
        std::fs::write(&path, text).expect("config");
        path
    };
    // SCIM_TOKEN is "cli-token" in scimsync(): the wrong secret.
    let out = scimsync(&cfg("admin"), &["check"], None).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("ServiceProviderConfig (/ServiceProviderConfig): patch=true"),
        "discovery is open: {stdout}"
    );
    assert!(
        stdout.contains("invalid_client") && !stdout.contains("cli-token"),
        "{stdout}"
    );
    assert!(
        stdout.contains("profile: slack: SPC at /ServiceProviderConfig; filtering assumed to work"),
        "{stdout}"
    );
    assert!(
        stdout.contains("effective: patch=true filter=true"),
        "{stdout}"
    );
    sb.stop().await;
}

/// Replaces the sandbox's generated ids with stable placeholders, for snapshots.
fn stable_ids(text: &str) -> String {
    let re = regex::Regex::new("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        .expect("regex");
    let mut seen: Vec<String> = Vec::new();
    re.replace_all(text, |c: &regex::Captures| {
        let id = c[0].to_string();
        let n = match seen.iter().position(|s| *s == id) {
            Some(n) => n,
            None => {
                seen.push(id);
                seen.len() - 1
            }
        };
        format!("<remote-id-{n}>")
    })
    .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_creates_updates_member_changes_and_deletes() {
    let sb = sandbox::start(SandboxOptions::with_token("cli-token"))
        .await
        .expect("sandbox");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &sb.url, "");
    let out = scimsync(&cfg, &["directory", "import", "-"], Some(DIRECTORY)).await;
    assert!(out.status.success());
    let out = scimsync(&cfg, &["sync", "--full"], None).await;
    assert!(out.status.success(), "{}", text(&out.stdout));
    // Pending: a new user, a rename, a member removed, a user deleted.
    let change = "{\"kind\":\"user\",\"id\":\"u-3\",\"username\":\"carol\"}\n{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice Cooper\",\"email\":\"alice@example.com\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"deleted\":true}\n";
    let out = scimsync(&cfg, &["directory", "import", "-"], Some(change)).await;
    assert!(out.status.success());
    sb.clear_requests();
    let out = scimsync(&cfg, &["plan", "--format", "json"], None).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(sb.writes().is_empty(), "plan sends nothing");
    let plan: serde_json::Value =
        serde_json::from_str(&stable_ids(&text(&out.stdout))).expect("plan is JSON");
    insta::assert_json_snapshot!("plan_pending", plan);
    let out = scimsync(&cfg, &["plan"], None).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("create (1):")
            && stdout.contains("update (2):")
            && stdout.contains("DELETE (1):"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("!   DELETE /Users/")),
        "{stdout}"
    );
    // One object, step by step, with each script's part.
    let out = scimsync(&cfg, &["sync", "--user", "u-1", "--dry-run"], None).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("script ") && stdout.contains("10-core.rhai: {"),
        "{stdout}"
    );
    assert!(
        stdout.contains("request (dry run, not sent): PATCH /Users/"),
        "{stdout}"
    );
    let out = scimsync(&cfg, &["status", "--format", "json"], None).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["targets"][0]["target"], "sandbox");
    assert_eq!(status["runs"][0]["status"], "succeeded");
    sb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_sandbox_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), "http://127.0.0.1:9/scim/v2", "");
    let out = scimsync(&cfg, &["migrate"], None).await;
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("database is migrated (sqlite)"),
        "{}",
        text(&out.stdout)
    );

    // The sandbox binary serves until SIGTERM, then exits 0.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scimsync"))
        .args([
            "sandbox",
            "--listen",
            &listen,
            "--profile",
            "nauthera",
            "--oauth-client",
            "c:s",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sandbox");
    let url = format!("http://{listen}/scim/v2/ServiceProviderConfig");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let spc = loop {
        if let Ok(r) = reqwest::get(&url).await {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        spc.status().as_u16(),
        200,
        "discovery is open on the nauthera profile"
    );
    let users = reqwest::get(format!("http://{listen}/scim/v2/Users"))
        .await
        .expect("GET");
    assert_eq!(users.status().as_u16(), 401, "resources need a token");
    let pid = child.id().expect("pid").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("exits")
        .expect("output");
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("SCIM sandbox (Nauthera profile) listening")
            && stdout.contains("client_id c client_secret s"),
        "{stdout}"
    );
}
