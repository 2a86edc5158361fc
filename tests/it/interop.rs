//! Interop with a third-party SCIM server: PyPI's `scim2-server` (in-memory, PATCH → 204, no
//! referential integrity). `SCIMSYNC_SCIM2_SERVER` names its executable (`.ci/run` and
//! `scripts/test.sh` install it into a venv); without it these tests say they were skipped.

use std::time::{Duration, Instant};

use scimsync::directory::sample;
use serde_json::{Value, json};

use crate::harness::{Db, Env, jsonl};
use crate::on_both_databases;

const TOKEN: &str = "interop-token";

struct Server {
    _child: tokio::process::Child,
    url: String,
    http: reqwest::Client,
}

impl Server {
    async fn start(test: &str) -> Option<Server> {
        let Some(bin) = std::env::var("SCIMSYNC_SCIM2_SERVER")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            println!("skipped: {test}: SCIMSYNC_SCIM2_SERVER (path to scim2-server) is not set");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = tokio::process::Command::new(&bin)
            .args([
                "--hostname",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--bearer-token",
                TOKEN,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let url = format!("http://127.0.0.1:{port}/v2");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http
                .get(format!("{url}/ServiceProviderConfig"))
                .bearer_auth(TOKEN)
                .send()
                .await;
            if ok.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "scim2-server did not come up on {url}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(Server {
            _child: child,
            url,
            http,
        })
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        r.json().await.expect("JSON")
    }

    async fn find_user(&self, user_name: &str) -> Vec<Value> {
        let r = self
            .http
            .get(format!("{}/Users", self.url))
            .query(&[("filter", format!("userName eq \"{user_name}\""))])
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        let v: Value = r.json().await.expect("JSON");
        v["Resources"].as_array().cloned().unwrap_or_default()
    }
}

async fn scim2_server_full_sync_converges(db: Db) {
    let test = "scim2_server_full_sync_converges";
    let Some(server) = Server::start(test).await else {
        return;
    };
    let Some(mut env) = Env::new(db, test).await else {
        return;
    };
    env.target.url = server.url.clone();
    env.target.auth.token = Some(TOKEN.into());
    env.target.exclude_service_accounts = false;

    // Someone created "zoe" on the server already: she must be adopted, not duplicated.
    let pre = server
        .http
        .post(format!("{}/Users", server.url))
        .bearer_auth(TOKEN)
        .json(&json!({"schemas":[scimsync::scim::USER_SCHEMA],"userName":"zoe","displayName":"Z"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(pre.status().as_u16(), 201);

    let mut dir = jsonl(&sample(1000, 50, 20));
    dir.push_str(
        "{\"kind\":\"user\",\"id\":\"z-1\",\"username\":\"zoe\",\"name\":\"Zoe Quinn\"}\n",
    );
    env.import(&dir).await;

    let t0 = Instant::now();
    let first = env.sync().await;
    let first_time = t0.elapsed();
    assert!(
        first.is_clean(),
        "{:?}",
        &first.failures[..first.failures.len().min(5)]
    );
    assert_eq!((first.created, first.updated), (1050, 1), "{first:?}");
    // The 50 new groups were looked up in one census of the server's groups (one listing), not
    // one by one (two lookups each): 1,000 POSTs, zoe's POST, lookup and PATCH, 50 POSTs.
    println!("first sync: {} requests", first.requests);
    assert_eq!(first.requests, 1000 + 3 + 1 + 50, "{first:?}");
    let listed = server.get("/Users?count=1").await;
    assert_eq!(
        listed["totalResults"], 1001,
        "1000 users plus the adopted zoe, no duplicate"
    );
    assert_eq!(server.find_user("zoe").await.len(), 1);
    assert_eq!(server.find_user("zoe").await[0]["displayName"], "Zoe Quinn");
    let groups = server.get("/Groups?count=100").await;
    assert_eq!(groups["totalResults"], 50);
    let sizes: Vec<usize> = groups["Resources"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g["members"].as_array().map_or(0, Vec::len))
        .collect();
    assert!(
        sizes.iter().all(|n| *n == 20),
        "every group has its 20 members: {sizes:?}"
    );

    let t1 = Instant::now();
    let second = env.sync().await;
    let second_time = t1.elapsed();
    assert_eq!((second.writes, second.unchanged), (0, 1051), "{second:?}");

    // A rename is one PATCH; a removed member is one PATCH; a deleted user is a member
    // removal plus a DELETE.
    env.import("{\"kind\":\"user\",\"id\":\"u-000001\",\"username\":\"bob.smith1\",\"name\":\"Robert Smith\"}").await;
    let s = env.sync().await;
    assert_eq!((s.writes, s.updated), (1, 1), "{s:?}");
    assert_eq!(
        server.find_user("bob.smith1").await[0]["displayName"],
        "Robert Smith"
    );

    let g0: Vec<String> = (1..20).map(|k| format!("\"u-{k:06}\"")).collect();
    env.import(&format!(
        "{{\"kind\":\"group\",\"id\":\"g-00000\",\"name\":\"Engineering\",\"members\":[{}]}}",
        g0.join(",")
    ))
    .await;
    let s = env.sync().await;
    assert_eq!((s.writes, s.updated), (1, 1), "{s:?}");
    let remote_u0 = server.find_user("alice.smith0").await[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let eng = server
        .get("/Groups?filter=displayName%20eq%20%22Engineering%22")
        .await;
    let members: Vec<&str> = eng["Resources"][0]["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["value"].as_str())
        .collect();
    assert_eq!(members.len(), 19);
    assert!(!members.contains(&remote_u0.as_str()));

    env.import("{\"kind\":\"user\",\"id\":\"u-000005\",\"deleted\":true}")
        .await;
    let s = env.sync().await;
    assert_eq!((s.writes, s.deleted, s.updated), (2, 1, 1), "{s:?}");
    assert!(server.find_user("frank.smith5").await.is_empty());
    let s = env.sync().await;
    assert_eq!(s.writes, 0, "converged: {s:?}");

    println!(
        "interop figures ({db:?}): first sync of 1000 users + 50 groups (20 members each) into scim2-server: {:.2} s, {} requests ({} writes); second sync: {:.3} s, {} requests, {} writes",
        first_time.as_secs_f64(),
        first.requests,
        first.writes,
        second_time.as_secs_f64(),
        second.requests,
        second.writes
    );
    env.finish().await;
}

on_both_databases!(scim2_server_full_sync_converges);

/// Canaille (PyPI `canaille[oidc,scim]`) as OAuth2 authorization server in front of its own
/// SCIM server: scimsync gets a client_credentials token (HTTP Basic client authentication)
/// and provisions through it. `SCIMSYNC_CANAILLE_PYTHON` names the Python that has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaille_oauth_interop() {
    let Some(python) = std::env::var("SCIMSYNC_CANAILLE_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        println!("skipped: canaille_oauth_interop: SCIMSYNC_CANAILLE_PYTHON is not set");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let script = format!(
        "{}/tests/interop/canaille_server.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let _child = tokio::process::Command::new(&python)
        .args([&script, &port.to_string(), "scimsync", "interop-secret"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {python} {script}: {e}"));
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{base}/scim/v2/ServiceProviderConfig"))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "canaille did not come up on {base}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Some(mut env) = Env::new(Db::Sqlite, "canaille_oauth_interop").await else {
        return;
    };
    env.target.url = format!("{base}/scim/v2");
    env.target.auth = scimsync::config::AuthConfig {
        mode: scimsync::config::AuthMode::Oauth,
        token_url: Some(format!("{base}/oauth/token")),
        client_id: Some("scimsync".into()),
        client_secret: Some("interop-secret".into()),
        scope: Some("openid profile".into()),
        ..Default::default()
    };
    // Canaille's /Schemas allow only `value` in emails and phoneNumbers and no locale: the
    // operator's answer is a mapping script, as mappings/README.md describes.
    // Its groups also want `$ref` on every member.
    env.target.capabilities.member_ref = Some(true);
    env.write_mapping(
        "user",
        "20-canaille.rhai",
        r#"
        let values = |list| if list == () { () } else { list.map(|x| #{ value: x.value }) };
        #{ emails: values.call(scim.emails), phoneNumbers: values.call(scim.phoneNumbers), locale: () }
        "#,
    );
    env.import(&jsonl(&sample(30, 3, 5))).await;
    let first = env.sync().await;
    assert!(
        first.is_clean(),
        "{:?}",
        &first.failures[..first.failures.len().min(5)]
    );
    assert_eq!(first.created, 27 + 3, "{first:?}");
    let second = env.sync().await;
    assert_eq!((second.writes, second.failed), (0, 0), "{second:?}");
    env.import(r#"{"kind":"user","id":"u-000001","username":"bob.smith1","name":"Robert Smith","given_name":"Robert","family_name":"Smith","email":"bob.smith1@example.com","attributes":{"locale":"en-US","phone":"+1 555 0001"}}"#).await;
    let s = env.sync().await;
    assert_eq!((s.writes, s.updated, s.failed), (1, 1, 0), "{s:?}");
    env.finish().await;
}
