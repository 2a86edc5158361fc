//! Every target as it really is: authentication modes, discovered and cached capabilities,
//! overrides, method switching, and each compatibility profile against the sandbox profile it
//! exists for. Each test asserts the requests sent.

use std::time::Duration;

use scimsync::config::{AuthConfig, AuthMode, ClientAuth, Compatibility};
use scimsync::sandbox::{OAuthClient, RecordedRequest, SandboxOptions, SandboxProfile};
use scimsync::sync::SyncOptions;
use serde_json::{Value, json};

use crate::harness::{Db, Env, TOKEN, call, calls, sorted};

async fn env_for(profile: SandboxProfile, compat: Compatibility, test: &str) -> Env {
    let opts = SandboxOptions {
        profile,
        ..SandboxOptions::with_token(TOKEN)
    };
    let mut env = Env::with_sandbox(Db::Sqlite, test, opts)
        .await
        .expect("SQLite needs no set-up");
    env.target.compatibility = compat;
    env
}

fn users(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("{{\"kind\":\"user\",\"id\":\"u-{i:03}\",\"username\":\"user{i:03}\",\"name\":\"User Number{i}\",\"given_name\":\"User\",\"family_name\":\"Number{i}\",\"email\":\"user{i}@example.com\",\"attributes\":{{\"phone\":\"+1 555 {i:04}\"}}}}\n")
        })
        .collect()
}

fn group(id: &str, name: &str, members: impl Iterator<Item = usize>) -> String {
    let m: Vec<String> = members.map(|i| format!("\"u-{i:03}\"")).collect();
    format!(
        "{{\"kind\":\"group\",\"id\":\"{id}\",\"name\":\"{name}\",\"members\":[{}]}}\n",
        m.join(",")
    )
}

pub(crate) fn count(reqs: &[RecordedRequest], method: &str, prefix: &str) -> usize {
    reqs.iter()
        .filter(|r| r.method == method && r.path.starts_with(prefix))
        .count()
}

pub(crate) fn oauth_env_opts(lifetime: Duration) -> SandboxOptions {
    SandboxOptions {
        profile: SandboxProfile::Nauthera,
        oauth_clients: vec![OAuthClient {
            id: "scim-provisioner".into(),
            secret: "s3cret-value".into(),
            scopes: vec!["admin".into(), "read".into()],
        }],
        token_lifetime: lifetime,
        ..Default::default()
    }
}

pub(crate) fn oauth_auth(token_url: &str, scope: &str, client_auth: ClientAuth) -> AuthConfig {
    AuthConfig {
        mode: AuthMode::Oauth,
        token_url: Some(token_url.into()),
        client_id: Some("scim-provisioner".into()),
        client_secret: Some("s3cret-value".into()),
        scope: Some(scope.into()),
        client_auth,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_client_credentials_token_is_cached_and_renewed_after_a_401() {
    let test = "oauth_client_credentials";
    let mut env = Env::with_sandbox(Db::Sqlite, test, oauth_env_opts(Duration::from_secs(3600)))
        .await
        .expect("env");
    env.target.auth = oauth_auth(&env.sandbox.token_url, "admin", ClientAuth::Basic);
    env.import(&users(5)).await;
    let s = env.sync().await;
    assert_eq!((s.created, s.failed), (5, 0), "{s:?}");
    let reqs = env.sandbox.requests();
    assert_eq!(
        count(&reqs, "POST", "/oauth2/token"),
        1,
        "one token for the whole run"
    );

    // The server forgets its tokens: the next request gets 401, one new token, one retry.
    env.sandbox.revoke_tokens();
    env.sandbox.clear_requests();
    env.import(
        "{\"kind\":\"user\",\"id\":\"u-000\",\"username\":\"user000\",\"name\":\"Renamed\"}",
    )
    .await;
    let s = env.sync().await;
    assert_eq!((s.updated, s.failed), (1, 0), "{s:?}");
    let reqs = env.sandbox.requests();
    let statuses: Vec<(String, u16)> = reqs.iter().map(|r| (r.method.clone(), r.status)).collect();
    assert_eq!(
        statuses,
        vec![("POST".into(), 200), ("PATCH".into(), 200)],
        "the engine's token was fetched fresh (cached per client): {reqs:?}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_refused_mid_run_is_renewed_once() {
    let test = "oauth_token_refused_mid_run";
    let mut env = Env::with_sandbox(Db::Sqlite, test, oauth_env_opts(Duration::from_secs(3600)))
        .await
        .expect("env");
    env.target.auth = oauth_auth(&env.sandbox.token_url, "admin", ClientAuth::Body);
    env.import(&users(2)).await;
    let engine = env
        .engine(SyncOptions {
            batch_size: 100,
            ..Default::default()
        })
        .await;
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert_eq!(s.created, 2);
    env.sandbox.revoke_tokens();
    env.sandbox.clear_requests();
    env.import("{\"kind\":\"user\",\"id\":\"u-001\",\"username\":\"user001\",\"name\":\"Again\"}")
        .await;
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert_eq!((s.updated, s.failed), (1, 0), "{s:?}");
    let seen: Vec<(String, String, u16)> = env
        .sandbox
        .requests()
        .into_iter()
        .map(|r| {
            (
                r.method,
                r.path.split('/').nth(1).unwrap_or_default().to_string(),
                r.status,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("PATCH".into(), "Users".into(), 401),
            ("POST".into(), "oauth2".into(), 200),
            ("PATCH".into(), "Users".into(), 200),
        ]
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_is_refreshed_before_it_expires() {
    let test = "oauth_token_refreshed_before_expiry";
    let mut env = Env::with_sandbox(Db::Sqlite, test, oauth_env_opts(Duration::from_secs(2)))
        .await
        .expect("env");
    env.target.auth = oauth_auth(&env.sandbox.token_url, "admin", ClientAuth::Basic);
    env.import(&users(1)).await;
    let engine = env
        .engine(SyncOptions {
            batch_size: 100,
            ..Default::default()
        })
        .await;
    engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    // Past 90% of the token's 2 s lifetime, the next request takes a new token first.
    tokio::time::sleep(Duration::from_millis(1900)).await;
    env.sandbox.clear_requests();
    env.import("{\"kind\":\"user\",\"id\":\"u-000\",\"username\":\"user000\",\"name\":\"Later\"}")
        .await;
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert_eq!(s.failed, 0);
    let reqs = env.sandbox.requests();
    assert_eq!(count(&reqs, "POST", "/oauth2/token"), 1);
    assert!(
        reqs.iter().all(|r| r.status != 401),
        "renewed before, not after: {reqs:?}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nauthera_needs_the_admin_scope_and_keeps_discovery_open() {
    let test = "nauthera_admin_scope";
    let mut env = Env::with_sandbox(Db::Sqlite, test, oauth_env_opts(Duration::from_secs(3600)))
        .await
        .expect("env");
    env.target.auth = oauth_auth(&env.sandbox.token_url, "read", ClientAuth::Basic);
    env.import(&users(2)).await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(s.failed, 2, "{s:?}");
    assert!(
        s.failures.iter().all(|(_, _, e)| e.contains("HTTP 403")),
        "{:?}",
        s.failures
    );
    assert_eq!(
        writes.iter().filter(|w| w.path == "/Users").count(),
        2,
        "one POST each, no retry storm"
    );
    // Discovery answered without a token.
    let spc = reqwest::get(format!("{}/ServiceProviderConfig", env.sandbox.url))
        .await
        .expect("GET");
    assert_eq!(spc.status().as_u16(), 200);
    // A wrong secret is an error that names the token endpoint, never the secret.
    env.target.auth.client_secret = Some("wrong-secret".into());
    env.target.auth.scope = Some("admin".into());
    let s = env.sync().await;
    assert_eq!(s.failed, 2);
    let err = &s.failures[0].2;
    assert!(
        err.contains("token request to") && err.contains("invalid_client"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-secret") && !err.contains("s3cret"),
        "{err}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_cached_until_the_target_changes() {
    let mut env = env_for(
        SandboxProfile::Default,
        Compatibility::Default,
        "capabilities_cached",
    )
    .await;
    env.import(&users(1)).await;
    env.sync().await;
    env.sandbox.clear_requests();
    env.sync().await;
    assert!(
        env.sandbox.requests().is_empty(),
        "cached: {:?}",
        env.sandbox.requests()
    );
    // A changed setting is a changed target: discovery runs again.
    env.target.capabilities.filter = Some(true);
    env.sync().await;
    // Both asked for at once: in either order.
    assert_eq!(
        sorted(calls(&env.sandbox.requests())),
        vec![
            call("GET", "/ResourceTypes"),
            call("GET", "/ServiceProviderConfig")
        ]
    );
    // A zero TTL trusts nothing cached.
    env.target.spc_cache_ttl = scimsync::config::Seconds(0);
    env.sandbox.clear_requests();
    env.sync().await;
    assert_eq!(env.sandbox.requests().len(), 2);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_provider_config_means_put_and_lookup_by_listing() {
    // The salesforce sandbox serves /ServiceProviderConfigs only: in default mode there is none.
    let env = env_for(SandboxProfile::Salesforce, Compatibility::Default, "no_spc").await;
    env.sandbox
        .insert(
            "Users",
            json!({"schemas":[scimsync::scim::USER_SCHEMA],"userName":"user000"}),
        )
        .expect("pre-existing");
    env.import(&users(2)).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    let reqs = env.sandbox.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path.starts_with("/Users?startIndex=1")),
        "adoption paged: {reqs:?}"
    );
    assert!(
        !reqs.iter().any(|r| r.path.contains("filter=")),
        "no filter used: {reqs:?}"
    );
    assert_eq!(
        count(&writes, "PUT", "/Users/"),
        1,
        "the adopted user is replaced with PUT: {writes:?}"
    );
    assert_eq!(count(&writes, "PATCH", "/"), 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_win_and_refused_methods_switch_and_are_remembered() {
    // LumoAuth lives under an organisation path and has no PUT on Groups.
    let mut env = env_for(
        SandboxProfile::Lumoauth,
        Compatibility::Default,
        "overrides_and_405",
    )
    .await;
    assert!(env.sandbox.url.ends_with("/orgs/acme/api/v1/scim/v2"));
    env.target.capabilities.patch = Some(false);
    env.import(&users(3)).await;
    env.import(&group("g-1", "Team", 0..3)).await;
    assert!(env.sync().await.is_clean());
    let engine = env
        .engine(SyncOptions {
            batch_size: 100,
            ..Default::default()
        })
        .await;
    env.import(&group("g-1", "Team", 0..2)).await;
    env.sandbox.clear_requests();
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert!(s.is_clean(), "{s:?}");
    let gid = env.gid("Team");
    let w = env.sandbox.writes();
    assert_eq!(
        calls(&w),
        vec![
            call("PUT", &format!("/Groups/{gid}")),
            call("PATCH", &format!("/Groups/{gid}"))
        ],
        "patch = false wins over the SPC; the 405 on PUT switches to PATCH"
    );
    assert_eq!(w[0].status, 405);
    env.import(&group("g-1", "Team", 0..1)).await;
    env.sandbox.clear_requests();
    engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert_eq!(
        calls(&env.sandbox.writes()),
        vec![call("PATCH", &format!("/Groups/{gid}"))],
        "remembered"
    );
    // ... and shared: a new engine (another worker, the next run) starts knowing it.
    env.import(&group("g-1", "Team", 0..3)).await;
    env.sandbox.clear_requests();
    assert!(env.sync().await.is_clean());
    assert_eq!(
        calls(&env.sandbox.writes()),
        vec![call("PATCH", &format!("/Groups/{gid}"))]
    );
    // Users still take PUT, as the override says.
    env.import("{\"kind\":\"user\",\"id\":\"u-002\",\"username\":\"user002\",\"name\":\"Put Me\"}")
        .await;
    env.sandbox.clear_requests();
    engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert_eq!(count(&env.sandbox.writes(), "PUT", "/Users/"), 1);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth42_has_no_put_and_no_groups() {
    let env = env_for(SandboxProfile::Oauth42, Compatibility::Default, "oauth42").await;
    env.import(&users(2)).await;
    env.import(&group("g-1", "Team", 0..2)).await;
    env.import(&group("g-2", "Other", 0..1)).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.failed == 0 && s.created == 2, "{s:?}");
    assert_eq!(
        s.notes,
        vec!["the target offers no Groups resource (ResourceTypes): 2 group(s) not synced"]
    );
    assert!(
        env.sandbox
            .requests()
            .iter()
            .all(|r| !r.path.starts_with("/Groups"))
    );
    assert_eq!(
        calls(&writes),
        vec![call("POST", "/Users"), call("POST", "/Users")]
    );
    env.import(
        "{\"kind\":\"user\",\"id\":\"u-001\",\"username\":\"user001\",\"name\":\"Patched\"}",
    )
    .await;
    let (_, writes) = env.sync_writes().await;
    assert_eq!(count(&writes, "PATCH", "/Users/"), 1, "{writes:?}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_profile() {
    let env = env_for(SandboxProfile::Aws, Compatibility::Aws, "aws_profile").await;
    env.import(&users(150)).await;
    env.import("{\"kind\":\"user\",\"id\":\"x-1\",\"username\":\"noname\"}")
        .await;
    env.import(&group("g-1", "Big", 0..150)).await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.created, s.failed), (151, 1), "{s:?}");
    let (_, _, err) = s
        .failures
        .iter()
        .find(|(_, id, _)| id == "x-1")
        .expect("noname fails");
    assert!(
        err.contains("compatibility aws requires name.givenName, name.familyName"),
        "{err}"
    );
    let gid = env.gid("Big");
    let group_writes: Vec<&RecordedRequest> = writes
        .iter()
        .filter(|w| w.path.starts_with("/Groups"))
        .collect();
    assert_eq!(group_writes.len(), 2, "{group_writes:?}");
    assert_eq!(
        group_writes[0].body.as_ref().expect("body")["members"]
            .as_array()
            .map(Vec::len),
        Some(100)
    );
    assert_eq!(group_writes[1].path, format!("/Groups/{gid}"));
    assert_eq!(
        group_writes[1].body.as_ref().expect("body")["Operations"][0]["op"],
        "add"
    );
    assert_eq!(
        env.remote_group("Big").expect("big")["members"]
            .as_array()
            .map(Vec::len),
        Some(150)
    );
    // One value per multi-valued attribute, the email primary.
    let u = env.remote_user("user000").expect("user");
    assert_eq!(
        u["emails"],
        json!([{"value":"user0@example.com","type":"work","primary":true}])
    );
    assert_eq!(u["phoneNumbers"].as_array().map(Vec::len), Some(1));
    // Groups are read back without members, so the member set is what scimsync sent.
    let got: Value = reqwest::Client::new()
        .get(format!("{}/Groups/{gid}", env.sandbox.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON");
    assert!(got.get("members").is_none());
    // Member changes: add/remove with paths, at most 100 values a request, never replace/PUT.
    env.import(&group("g-1", "Big", 30..150)).await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(
        (s.failed, s.updated),
        (1, 1),
        "only the nameless user still fails: {s:?}"
    );
    assert_eq!(
        calls(&writes),
        vec![call("PATCH", &format!("/Groups/{gid}"))]
    );
    let ops = writes[0].body.as_ref().expect("body")["Operations"]
        .as_array()
        .expect("ops")
        .clone();
    assert_eq!(ops.len(), 30);
    assert!(ops.iter().all(|o| {
        o["op"] == "remove"
            && o["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("members[value eq"))
    }));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_profile() {
    let env = env_for(SandboxProfile::Slack, Compatibility::Slack, "slack_profile").await;
    env.sandbox
        .insert(
            "Users",
            json!({"schemas":[scimsync::scim::USER_SCHEMA],"userName":"user000"}),
        )
        .expect("pre-existing");
    env.import(&users(40)).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert_eq!(env.sandbox.users().len(), 40);
    // Filtering works although the SPC says otherwise: adoption used a filter.
    let reqs = env.sandbox.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path.starts_with("/Users?filter=userName")),
        "{reqs:?}"
    );
    // Writes past 20 a second were answered 429 and retried after Retry-After.
    let limited = writes.iter().filter(|w| w.status == 429).count();
    assert!(limited > 0, "the rate limit was reached");
    assert_eq!(env.sandbox.early_retries(), 0, "Retry-After was honoured");
    assert_eq!(
        writes.iter().filter(|w| w.status < 300).count(),
        40,
        "each object written once in the end"
    );
    // DELETE of a user deactivates it on Slack.
    env.import("{\"kind\":\"user\",\"id\":\"u-001\",\"deleted\":true}")
        .await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(s.deleted, 1);
    assert_eq!(count(&writes, "DELETE", "/Users/"), 1);
    assert_eq!(env.remote_user("user001").expect("kept")["active"], false);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_profile() {
    let env = env_for(
        SandboxProfile::Salesforce,
        Compatibility::Salesforce,
        "salesforce_profile",
    )
    .await;
    env.import(&users(2)).await;
    let s = env.sync().await;
    assert!(s.is_clean());
    let reqs = env.sandbox.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path == "/ServiceProviderConfigs" && r.status == 200),
        "{reqs:?}"
    );
    let rid = env.rid("user001");
    env.import("{\"kind\":\"user\",\"id\":\"u-001\",\"deleted\":true}")
        .await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(s.deleted, 1, "{s:?}");
    assert_eq!(
        calls(&writes),
        vec![call("PATCH", &format!("/Users/{rid}"))],
        "deactivated, never deleted"
    );
    assert_eq!(env.remote_user("user001").expect("kept")["active"], false);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webex_profile() {
    let env = env_for(SandboxProfile::Webex, Compatibility::Webex, "webex_profile").await;
    env.import(&users(2)).await;
    env.import(&group("g-1", "Team", 0..1)).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    let post = writes
        .iter()
        .find(|w| w.path == "/Groups")
        .expect("group POST");
    assert_eq!(
        post.body.as_ref().expect("body")["members"][0]["type"],
        "user"
    );
    env.import(&group("g-1", "Team", 0..2)).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert_eq!(
        writes[0].body.as_ref().expect("body")["Operations"][0]["value"][0]["type"],
        "user"
    );
    // The same group without the webex mode is refused by the webex sandbox.
    let mut plain = env_for(SandboxProfile::Webex, Compatibility::Default, "webex_plain").await;
    plain.target.compatibility = Compatibility::Default;
    plain.import(&users(1)).await;
    plain.import(&group("g-1", "Team", 0..1)).await;
    let s = plain.sync().await;
    assert_eq!(s.failed, 1, "{s:?}");
    plain.finish().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_and_bad_tls_settings() {
    let mut env = env_for(
        SandboxProfile::Default,
        Compatibility::Default,
        "token_file",
    )
    .await;
    let path = std::env::temp_dir().join(format!("scimsync-token-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write");
    env.target.auth = AuthConfig {
        token_file: Some(path.clone()),
        ..Default::default()
    };
    env.import(&users(1)).await;
    assert!(
        env.sync().await.is_clean(),
        "the token was read from the file"
    );
    std::fs::remove_file(&path).ok();
    env.target.ca_file = Some("/nonexistent/ca.pem".into());
    let err = scimsync::target::TargetClient::new(&env.target)
        .err()
        .expect("bad ca_file")
        .to_string();
    assert!(err.contains("ca_file /nonexistent/ca.pem"), "{err}");
    env.finish().await;
}

fn listings(reqs: &[RecordedRequest]) -> usize {
    count(reqs, "GET", "/Groups?startIndex=")
}

fn group_filters(reqs: &[RecordedRequest]) -> usize {
    count(reqs, "GET", "/Groups?filter=")
}

/// Imports these groups (two members each) and runs a clean full sync (with `engine`, to keep
/// what it remembers, else a new one): the requests it sent.
async fn sync_new_groups(
    env: &Env,
    engine: Option<&scimsync::sync::Engine>,
    groups: &[(&str, &str)],
) -> Vec<RecordedRequest> {
    for (id, name) in groups {
        env.import(&group(id, name, 0..2)).await;
    }
    env.sandbox.clear_requests();
    let s = match engine {
        Some(e) => e
            .full_sync(&scimsync::sync::NoProgress)
            .await
            .expect("sync"),
        None => env.sync().await,
    };
    assert!(s.is_clean(), "{s:?}");
    env.sandbox.requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_creating_groups_reads_the_targets_groups_once() {
    let env = env_for(SandboxProfile::Default, Compatibility::Default, "census").await;
    let group_schema = scimsync::scim::GROUP_SCHEMA;
    let legacy = env
        .sandbox
        .insert(
            "Groups",
            json!({"schemas":[group_schema],"displayName":"Legacy","externalId":"g-2"}),
        )
        .expect("group with g-2's externalId");
    let sales = env
        .sandbox
        .insert(
            "Groups",
            json!({"schemas":[group_schema],"displayName":"SALES"}),
        )
        .expect("Sales' namesake");
    env.sandbox
        .insert(
            "Groups",
            json!({"schemas":[group_schema],"displayName":"Unrelated","externalId":"elsewhere"}),
        )
        .expect("an unrelated group");
    env.import(&users(3)).await;
    let new = [
        ("g-1", "Eng"),
        ("g-2", "Ops"),
        ("g-3", "Sales"),
        ("g-4", "Support"),
    ];
    let reqs = sync_new_groups(&env, None, &new).await;
    assert_eq!(
        listings(&reqs),
        2,
        "one page holds every group, one past the end confirms it: {reqs:?}"
    );
    assert_eq!(
        group_filters(&reqs),
        0,
        "no group looked up one by one: {reqs:?}"
    );
    // Each match is read again by id before it is adopted.
    assert_eq!(count(&reqs, "GET", &format!("/Groups/{legacy}")), 1);
    assert_eq!(count(&reqs, "GET", &format!("/Groups/{sales}")), 1);
    assert_eq!(
        count(&reqs, "POST", "/Groups"),
        2,
        "Eng and Support created"
    );
    assert_eq!(
        env.sandbox.groups().len(),
        5,
        "no duplicate: {:?}",
        env.sandbox.groups()
    );
    assert_eq!(env.gid("Ops"), legacy, "adopted by externalId and renamed");
    assert_eq!(env.gid("Sales"), sales, "adopted by displayName, any case");
    let (again, writes) = env.sync_writes().await;
    assert!(again.is_clean(), "{again:?}");
    assert!(writes.is_empty(), "converged: {writes:?}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_looked_up_one_by_one_when_a_census_would_cost_more() {
    let mut env = env_for(SandboxProfile::Default, Compatibility::Default, "no_census").await;
    // 450 groups take three pages of 200: more than a batch creating two groups saves.
    for i in 0..450 {
        env.sandbox
            .insert(
                "Groups",
                json!({"schemas":[scimsync::scim::GROUP_SCHEMA],"displayName":format!("Remote {i}")}),
            )
            .expect("remote group");
    }
    env.import(&users(2)).await;
    let engine = env.engine(SyncOptions::default()).await;
    let new = [("g-1", "Remote 7"), ("g-2", "Two")];
    let reqs = sync_new_groups(&env, Some(&engine), &new).await;
    assert_eq!(
        listings(&reqs),
        1,
        "the first page told the total: {reqs:?}"
    );
    assert_eq!(
        group_filters(&reqs),
        4,
        "each by externalId, then by name: {reqs:?}"
    );
    assert_eq!(
        env.sandbox.groups().len(),
        451,
        "Remote 7 adopted, Two created"
    );
    // The engine remembers the total: the next batch creating groups does not list again.
    let new = [("g-3", "Three"), ("g-4", "Four")];
    let reqs = sync_new_groups(&env, Some(&engine), &new).await;
    assert_eq!(listings(&reqs), 0, "{reqs:?}");
    assert_eq!(group_filters(&reqs), 4, "{reqs:?}");
    // `list_groups = false` turns the census off whatever the groups cost.
    env.target.capabilities.list_groups = Some(false);
    // Few groups are left, so a census would be taken but for the setting.
    for g in env.sandbox.groups() {
        let name = g["displayName"].as_str().unwrap_or_default();
        if name.starts_with("Remote ") && name != "Remote 7" {
            assert!(
                env.sandbox
                    .remove("Groups", g["id"].as_str().unwrap_or_default())
            );
        }
    }
    let reqs = sync_new_groups(&env, None, &[("g-5", "Five"), ("g-6", "Six")]).await;
    assert_eq!(listings(&reqs), 0, "{reqs:?}");
    assert_eq!(group_filters(&reqs), 4, "{reqs:?}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_miscounts_is_not_trusted() {
    // This target lists at most two groups and calls that the total.
    let opts = SandboxOptions {
        list_cap: Some(2),
        ..SandboxOptions::with_token(TOKEN)
    };
    let env = Env::with_sandbox(Db::Sqlite, "census_miscount", opts)
        .await
        .expect("SQLite needs no set-up");
    let mut remote = Vec::new();
    for name in ["One", "Two", "Three"] {
        let id = env
            .sandbox
            .insert(
                "Groups",
                json!({"schemas":[scimsync::scim::GROUP_SCHEMA],"displayName":name}),
            )
            .expect("remote group");
        remote.push(id);
    }
    env.import(&users(2)).await;
    let new = [("g-1", "Three"), ("g-2", "Four"), ("g-3", "Five")];
    let reqs = sync_new_groups(&env, None, &new).await;
    assert_eq!(
        listings(&reqs),
        2,
        "the first page, then one past its end: {reqs:?}"
    );
    assert_eq!(group_filters(&reqs), 6, "then each looked up: {reqs:?}");
    assert_eq!(
        env.gid("Three"),
        remote[2],
        "adopted, though the listing hid it"
    );
    assert_eq!(env.sandbox.groups().len(), 5, "no duplicate");
    env.finish().await;
}
