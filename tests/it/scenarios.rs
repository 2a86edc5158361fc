//! End-to-end sync scenarios over real loopback HTTP against the sandbox, each asserting the
//! exact write requests sent.

use scimsync::config::{DeletionLimit, OnDelete};
use scimsync::directory::Kind;
use scimsync::sandbox::SandboxOptions;
use scimsync::sync::SyncOptions;
use serde_json::{Value, json};

use crate::harness::{Db, Env, call, calls, sorted};
use crate::on_both_databases;

const DIRECTORY: &str = r#"
{"kind":"user","id":"u-1","username":"alice","email":"alice@example.com","name":"Alice Smith","given_name":"Alice","family_name":"Smith"}
{"kind":"user","id":"u-2","username":"bob","email":"bob@example.com","name":"Bob Jones","given_name":"Bob","family_name":"Jones"}
{"kind":"user","id":"u-3","username":"carol","email":"carol@example.com","name":"Carol Chen"}
{"kind":"group","id":"g-1","name":"Engineering","members":["u-1","u-2"]}
{"kind":"group","id":"g-2","name":"Operations","members":["u-3"]}
"#;

fn member_ids(g: &Value) -> Vec<String> {
    let mut ids: Vec<String> = g["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["value"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn sorted_ids(ids: &[String]) -> Vec<String> {
    let mut v = ids.to_vec();
    v.sort();
    v
}

/// A provisioned copy of DIRECTORY, with the requests of that first sync cleared.
async fn provisioned(db: Db, test: &str) -> Option<Env> {
    let env = Env::new(db, test).await?;
    env.import(DIRECTORY).await;
    let s = env.sync().await;
    assert!(s.is_clean(), "first sync clean: {s:?}");
    env.sandbox.clear_requests();
    Some(env)
}

async fn first_sync_creates_everything(db: Db) {
    let Some(env) = Env::new(db, "first_sync_creates_everything").await else {
        return;
    };
    env.import(DIRECTORY).await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(
        (s.created, s.updated, s.failed, s.deleted),
        (5, 0, 0, 0),
        "{s:?}"
    );
    let mut expected = vec![
        call("POST", "/Users"),
        call("POST", "/Users"),
        call("POST", "/Users"),
        call("POST", "/Groups"),
        call("POST", "/Groups"),
    ];
    expected.sort();
    assert_eq!(sorted(calls(&writes)), expected);
    // Users go first: every user POST precedes every group POST.
    let last_user = writes
        .iter()
        .rposition(|r| r.path == "/Users")
        .expect("user posts");
    let first_group = writes
        .iter()
        .position(|r| r.path == "/Groups")
        .expect("group posts");
    assert!(last_user < first_group);
    let alice = env.remote_user("alice").expect("alice created");
    assert_eq!(alice["externalId"], "u-1");
    assert_eq!(
        alice["emails"],
        json!([{"value":"alice@example.com","type":"work","primary":true}])
    );
    assert_eq!(alice["name"]["givenName"], "Alice");
    let eng = env.remote_group("Engineering").expect("group created");
    assert_eq!(
        member_ids(&eng),
        sorted_ids(&[env.rid("alice"), env.rid("bob")])
    );
    assert_eq!(env.store.count_state("sandbox").await.expect("count"), 5);
    let runs = env
        .store
        .recent_runs(Some("sandbox"), 5)
        .await
        .expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].status.as_str(), runs[0].created), ("succeeded", 5));
    env.finish().await;
}

async fn second_sync_sends_no_write(db: Db) {
    let Some(env) = provisioned(db, "second_sync_sends_no_write").await else {
        return;
    };
    let s = env.sync().await;
    assert_eq!(
        (s.unchanged, s.created, s.updated, s.writes, s.requests),
        (5, 0, 0, 0, 0),
        "{s:?}"
    );
    // Capabilities come from the shared cache: not even a discovery GET.
    assert!(
        env.sandbox.requests().is_empty(),
        "{:?}",
        env.sandbox.requests()
    );
    env.finish().await;
}

async fn rename_is_one_update(db: Db) {
    let Some(env) = provisioned(db, "rename_is_one_update").await else {
        return;
    };
    env.import(r#"{"kind":"user","id":"u-2","username":"bob","email":"bob@example.com","name":"Robert Jones","given_name":"Robert","family_name":"Jones"}"#).await;
    let (s, writes) = env.sync_writes().await;
    let bob = env.rid("bob");
    assert_eq!(
        calls(&writes),
        vec![call("PATCH", &format!("/Users/{bob}"))]
    );
    assert_eq!((s.updated, s.unchanged), (1, 4), "{s:?}");
    let ops = &writes[0].body.as_ref().expect("body")["Operations"];
    assert_eq!(
        ops,
        &json!([
            {"op":"replace","path":"displayName","value":"Robert Jones"},
            {"op":"replace","path":"name","value":{"familyName":"Jones","formatted":"Robert Jones","givenName":"Robert"}}
        ])
    );
    let remote = env.remote_user("bob").expect("bob");
    assert_eq!(remote["name"]["givenName"], "Robert");
    assert_eq!(remote["displayName"], "Robert Jones");
    let (_, again) = env.sync_writes().await;
    assert!(again.is_empty(), "converged: {again:?}");
    env.finish().await;
}

async fn member_removed_is_one_delta(db: Db) {
    let Some(env) = provisioned(db, "member_removed_is_one_delta").await else {
        return;
    };
    env.import(r#"{"kind":"group","id":"g-1","name":"Engineering","members":["u-1"]}"#)
        .await;
    let (s, writes) = env.sync_writes().await;
    let (eng, bob) = (env.gid("Engineering"), env.rid("bob"));
    assert_eq!(
        calls(&writes),
        vec![call("PATCH", &format!("/Groups/{eng}"))]
    );
    assert_eq!(s.updated, 1);
    assert_eq!(
        writes[0].body.as_ref().expect("body")["Operations"],
        json!([{"op":"remove","path":format!("members[value eq \"{bob}\"]")}])
    );
    assert_eq!(
        member_ids(&env.remote_group("Engineering").expect("eng")),
        vec![env.rid("alice")]
    );
    env.finish().await;
}

async fn user_deleted_is_deleted_and_leaves_groups(db: Db) {
    let Some(env) = provisioned(db, "user_deleted_is_deleted_and_leaves_groups").await else {
        return;
    };
    let (carol, ops) = (env.rid("carol"), env.gid("Operations"));
    env.import(r#"{"kind":"user","id":"u-3","deleted":true}"#)
        .await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(
        calls(&writes),
        vec![
            call("PATCH", &format!("/Groups/{ops}")),
            call("DELETE", &format!("/Users/{carol}"))
        ]
    );
    assert_eq!((s.deleted, s.updated), (1, 1), "{s:?}");
    assert!(env.remote_user("carol").is_none());
    assert!(member_ids(&env.remote_group("Operations").expect("ops")).is_empty());
    assert!(
        env.store
            .state("sandbox", Kind::User, "u-3")
            .await
            .expect("state")
            .is_none()
    );
    env.finish().await;
}

async fn existing_remote_objects_are_adopted(db: Db) {
    let Some(env) = Env::new(db, "existing_remote_objects_are_adopted").await else {
        return;
    };
    let old = env
        .sandbox
        .insert("Users", json!({"schemas":[scimsync::scim::USER_SCHEMA],"userName":"ALICE","displayName":"Old Name","title":"stale"}))
        .expect("pre-existing user");
    let old_group = env
        .sandbox
        .insert(
            "Groups",
            json!({"schemas":[scimsync::scim::GROUP_SCHEMA],"displayName":"Engineering"}),
        )
        .expect("pre-existing group");
    env.import(DIRECTORY).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert_eq!((s.created, s.updated), (3, 2), "{s:?}");
    assert_eq!(env.sandbox.users().len(), 3, "no duplicate user");
    assert_eq!(env.sandbox.groups().len(), 2, "no duplicate group");
    let alice = env
        .remote_user("alice")
        .expect("adopted and renamed to the directory's userName");
    assert_eq!(alice["id"], old.as_str());
    assert_eq!(alice["displayName"], "Alice Smith");
    assert!(
        alice.get("title").is_none(),
        "attributes the directory lacks are removed"
    );
    let alice_writes: Vec<_> = writes
        .iter()
        .filter(|r| {
            r.path.ends_with(&old) || r.body.as_ref().is_some_and(|b| b["userName"] == "alice")
        })
        .collect();
    assert_eq!(
        calls(&alice_writes.into_iter().cloned().collect::<Vec<_>>()),
        vec![
            call("POST", "/Users"),
            call("PATCH", &format!("/Users/{old}"))
        ]
    );
    assert_eq!(
        writes
            .iter()
            .find(
                |r| r.method == "POST" && r.body.as_ref().is_some_and(|b| b["userName"] == "alice")
            )
            .map(|r| r.status),
        Some(409)
    );
    let eng = env.remote_group("Engineering").expect("eng");
    assert_eq!(eng["id"], old_group.as_str());
    assert_eq!(
        member_ids(&eng),
        sorted_ids(&[env.rid("alice"), env.rid("bob")])
    );
    let (_, again) = env.sync_writes().await;
    assert!(again.is_empty(), "converged: {again:?}");
    env.finish().await;
}

async fn remote_deletion_is_healed(db: Db) {
    let Some(env) = provisioned(db, "remote_deletion_is_healed").await else {
        return;
    };
    let old = env.rid("bob");
    assert!(env.sandbox.remove("Users", &old));
    env.import(r#"{"kind":"user","id":"u-2","username":"bob","email":"bob@example.com","name":"Robert Jones"}"#).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    let new = env.rid("bob");
    assert_ne!(new, old);
    let eng = env.gid("Engineering");
    assert_eq!(
        calls(&writes),
        vec![
            call("PATCH", &format!("/Users/{old}")),
            call("POST", "/Users"),
            call("PATCH", &format!("/Groups/{eng}")),
        ]
    );
    assert_eq!(writes[0].status, 404);
    assert_eq!(env.sandbox.users().len(), 3);
    assert_eq!(
        member_ids(&env.remote_group("Engineering").expect("eng")),
        sorted_ids(&[env.rid("alice"), new])
    );
    let (_, again) = env.sync_writes().await;
    assert!(again.is_empty(), "converged: {again:?}");
    env.finish().await;
}

async fn invalid_object_fails_alone(db: Db) {
    let Some(env) = Env::new(db, "invalid_object_fails_alone").await else {
        return;
    };
    env.write_mapping(
        "user",
        "20-break-bob.rhai",
        "if user.username == \"bob\" { #{ userName: \"\", active: \"yes\" } }",
    );
    env.import(DIRECTORY).await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.created, s.failed), (4, 1), "{s:?}");
    assert!(!s.is_clean());
    let (kind, id, err) = &s.failures[0];
    assert_eq!((kind.as_str(), id.as_str()), ("user", "u-2"));
    assert!(
        err.contains("userName: required") && err.contains("active: must be a boolean"),
        "{err}"
    );
    assert!(
        writes
            .iter()
            .all(|r| r.body.as_ref().is_none_or(|b| b["userName"] != "")),
        "nothing invalid was sent"
    );
    assert_eq!(
        member_ids(&env.remote_group("Engineering").expect("eng")),
        vec![env.rid("alice")]
    );
    let failing = env.store.failing(Some("sandbox")).await.expect("failing");
    assert_eq!(failing.len(), 1);
    assert_eq!(failing[0].local_id, "u-2");
    // A broken script names its file and line, and fails every object it touches, alone.
    env.write_mapping("user", "20-break-bob.rhai", "let x = 1;\nx.nope()");
    let s = env.sync().await;
    assert_eq!(s.failed, 3, "{s:?}");
    assert!(
        s.failures
            .iter()
            .all(|(_, _, e)| e.contains("20-break-bob.rhai:2:")),
        "{:?}",
        s.failures
    );
    env.finish().await;
}

async fn dry_run_sends_nothing_and_changes_nothing(db: Db) {
    let Some(env) = Env::new(db, "dry_run_sends_nothing_and_changes_nothing").await else {
        return;
    };
    env.import(DIRECTORY).await;
    let dry = SyncOptions {
        dry_run: true,
        ..Default::default()
    };
    env.sandbox.clear_requests();
    let s = env.sync_with(dry.clone()).await;
    assert!(
        env.sandbox.writes().is_empty(),
        "{:?}",
        env.sandbox.writes()
    );
    assert_eq!(s.created, 5);
    assert_eq!(s.planned.iter().filter(|p| p.method == "POST").count(), 5);
    assert_eq!(env.store.count_state("sandbox").await.expect("count"), 0);
    assert!(
        env.store
            .recent_runs(None, 5)
            .await
            .expect("runs")
            .is_empty()
    );
    // After a real sync, a dry run of a change and a deletion plans them and changes nothing.
    env.sync().await;
    env.import("{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice Cooper\"}\n{\"kind\":\"user\",\"id\":\"u-3\",\"deleted\":true}").await;
    env.sandbox.clear_requests();
    let s = env.sync_with(dry).await;
    assert!(env.sandbox.writes().is_empty());
    let planned: Vec<(String, String)> = s
        .planned
        .iter()
        .map(|p| (p.method.clone(), p.path.clone()))
        .collect();
    let (alice, carol, ops) = (env.rid("alice"), env.rid("carol"), env.gid("Operations"));
    assert_eq!(
        sorted(planned),
        sorted(vec![
            call("PATCH", &format!("/Users/{alice}")),
            call("PATCH", &format!("/Groups/{ops}")),
            call("DELETE", &format!("/Users/{carol}")),
        ])
    );
    assert!(
        env.store
            .state("sandbox", Kind::User, "u-3")
            .await
            .expect("state")
            .is_some()
    );
    let (s, writes) = env.sync_writes().await;
    assert_eq!(writes.len(), 3, "the real run still has all to do: {s:?}");
    env.finish().await;
}

async fn put_is_used_without_patch(db: Db) {
    let opts = SandboxOptions {
        patch: false,
        ..SandboxOptions::with_token(crate::harness::TOKEN)
    };
    let Some(env) = Env::with_sandbox(db, "put_is_used_without_patch", opts).await else {
        return;
    };
    env.import(DIRECTORY).await;
    assert!(env.sync().await.is_clean());
    env.import("{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\",\"name\":\"Robert\"}\n{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"Engineering\",\"members\":[\"u-1\"]}").await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    let (bob, eng, alice) = (env.rid("bob"), env.gid("Engineering"), env.rid("alice"));
    assert_eq!(
        calls(&writes),
        vec![
            call("PUT", &format!("/Users/{bob}")),
            call("PUT", &format!("/Groups/{eng}"))
        ]
    );
    assert_eq!(
        writes[1].body.as_ref().expect("body")["members"],
        json!([{"value": alice}])
    );
    assert_eq!(
        env.remote_user("bob").expect("bob")["displayName"],
        "Robert"
    );
    env.finish().await;
}

async fn leaving_scope_deprovisions(db: Db) {
    let Some(mut env) = provisioned(db, "leaving_scope_deprovisions").await else {
        return;
    };
    let (alice, eng) = (env.rid("alice"), env.gid("Engineering"));
    // Alice becomes a service account (excluded), Engineering leaves the group filter.
    env.import(r#"{"kind":"user","id":"u-1","username":"alice","email":"alice@example.com","name":"Alice Smith","given_name":"Alice","family_name":"Smith","service_account":true}"#).await;
    env.target.groups = vec!["Operations".into()];
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert_eq!(
        calls(&writes),
        vec![
            call("DELETE", &format!("/Groups/{eng}")),
            call("DELETE", &format!("/Users/{alice}"))
        ]
    );
    assert_eq!(s.deleted, 2);
    assert!(env.remote_group("Engineering").is_none());
    // Deactivation instead of deletion for users.
    env.target.on_delete = OnDelete::Deactivate;
    let bob = env.rid("bob");
    env.import(r#"{"kind":"user","id":"u-2","deleted":true}"#)
        .await;
    let (_, writes) = env.sync_writes().await;
    assert_eq!(
        calls(&writes),
        vec![call("PATCH", &format!("/Users/{bob}"))]
    );
    assert_eq!(env.remote_user("bob").expect("bob kept")["active"], false);
    env.finish().await;
}

async fn deletion_guard_holds_mass_deletion(db: Db) {
    let Some(env) = Env::new(db, "deletion_guard_holds_mass_deletion").await else {
        return;
    };
    let users: String = (0..12)
        .map(|i| format!("{{\"kind\":\"user\",\"id\":\"u-{i}\",\"username\":\"user{i}\"}}\n"))
        .collect();
    env.import(&users).await;
    assert_eq!(env.sync().await.created, 12);
    let gone: String = (0..6)
        .map(|i| format!("{{\"kind\":\"user\",\"id\":\"u-{i}\",\"deleted\":true}}\n"))
        .collect();
    env.import(&gone).await;
    let (s, writes) = env.sync_writes().await;
    assert!(writes.is_empty(), "{writes:?}");
    let why = s.held_back.as_deref().expect("held back");
    assert!(
        why.contains("6 of 12") && why.contains("--allow-deletions"),
        "{why}"
    );
    assert!(!s.is_clean());
    assert_eq!(env.target.max_deletions, DeletionLimit::Percent(10.0));
    let runs = env
        .store
        .recent_runs(Some("sandbox"), 1)
        .await
        .expect("runs");
    assert_eq!(runs[0].status, "failed");
    env.sandbox.clear_requests();
    let s = env
        .sync_with(SyncOptions {
            allow_deletions: true,
            ..Default::default()
        })
        .await;
    assert_eq!(s.deleted, 6);
    assert_eq!(env.sandbox.writes().len(), 6);
    assert_eq!(env.sandbox.users().len(), 6);
    env.finish().await;
}

async fn small_batches_cover_everything(db: Db) {
    let Some(env) = Env::new(db, "small_batches_cover_everything").await else {
        return;
    };
    let lines = crate::harness::jsonl(&scimsync::directory::sample(57, 7, 9));
    env.import(&lines).await;
    let s = env
        .sync_with(SyncOptions {
            batch_size: 5,
            ..Default::default()
        })
        .await;
    // Every 10th sample user is a service account, excluded by default.
    assert_eq!((s.created, s.skipped, s.failed), (52 + 7, 5, 0), "{s:?}");
    assert_eq!(env.sandbox.users().len(), 52);
    let s = env
        .sync_with(SyncOptions {
            batch_size: 5,
            ..Default::default()
        })
        .await;
    assert_eq!((s.unchanged, s.writes), (59, 0));
    env.finish().await;
}

/// The orphan check (states whose directory object is gone) runs only when something left the
/// directory since its last check that found none, or when that check is a day old.
async fn orphans_are_looked_for_after_deletions_only(db: Db) {
    let Some(env) = provisioned(db, "orphans_after_deletions").await else {
        return;
    };
    // States no directory object has, made behind the directory's back: without a deletion,
    // the next full sync does not look for them.
    let plant = |id: &'static str| {
        format!(
            "INSERT INTO sync_state (target, kind, local_id, remote_id, status, attempts, \
             updated_at) VALUES ('sandbox', 'user', 'u-{id}', 'r-{id}', 'synced', 0, 0)"
        )
    };
    env.host_exec(&plant("ghost")).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert!(writes.is_empty(), "the check was skipped: {writes:?}");
    // Many deletions (rows of the deletion log): the check runs and finds the planted state
    // (the sandbox answers 404: gone already), and the log is folded into one row.
    let sum = "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM directory_deletions \
               WHERE kind = 'user'";
    let before = env.host_i64(sum).await;
    env.host_exec(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 300) \
         INSERT INTO directory_deletions (kind, n) SELECT 'user', 1 FROM c",
    )
    .await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert_eq!(calls(&writes), vec![call("DELETE", "/Users/r-ghost")]);
    let rows = "SELECT COUNT(*) FROM directory_deletions WHERE kind = 'user'";
    assert_eq!(env.host_i64(rows).await, 1, "folded");
    assert_eq!(env.host_i64(sum).await, before + 300, "the sum is kept");
    // The next check finds nothing and records the folded sum: skipped again after it.
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean() && writes.is_empty(), "{s:?} {writes:?}");
    env.host_exec(&plant("ghost2")).await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean() && writes.is_empty(), "{s:?} {writes:?}");
    // A day later the check runs anyway.
    env.host_exec("UPDATE orphan_checks SET checked_at = 0")
        .await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert_eq!(calls(&writes), vec![call("DELETE", "/Users/r-ghost2")]);
    assert!(
        env.store
            .state("sandbox", Kind::User, "u-ghost2")
            .await
            .expect("state")
            .is_none()
    );
    // A host's own DELETE counts: the next full sync deprovisions the user.
    let carol = env.rid("carol");
    env.host_exec("DELETE FROM users WHERE id = 'u-3'").await;
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean(), "{s:?}");
    assert!(
        calls(&writes).contains(&call("DELETE", &format!("/Users/{carol}"))),
        "{writes:?}"
    );
    let (s, writes) = env.sync_writes().await;
    assert!(s.is_clean() && writes.is_empty(), "{s:?} {writes:?}");
    if db == Db::Postgres {
        // TRUNCATE deletes without a row trigger; its statement trigger counts.
        let alice = env.rid("alice");
        env.host_exec("TRUNCATE users CASCADE").await;
        let (_, writes) = env.sync_writes().await;
        assert!(
            calls(&writes).contains(&call("DELETE", &format!("/Users/{alice}"))),
            "{writes:?}"
        );
    }
    env.finish().await;
}

/// A run that starts with no state of a kind on its target records an orphan check of that
/// kind (none can exist), so its deprovisioning skips the check; a run over existing states
/// records none.
async fn a_first_sync_records_its_orphan_check_at_the_start(db: Db) {
    let Some(env) = provisioned(db, "first_sync_orphan_check").await else {
        return;
    };
    env.host_exec("DELETE FROM users WHERE id = 'u-3'").await;
    let sum = env
        .host_i64(
            "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM directory_deletions \
             WHERE kind = 'user'",
        )
        .await;
    assert!(sum > 0, "the deletion is in the log");
    let day = 86_400_000;
    // A target with no state: both kinds are recorded at the run's start.
    env.store
        .start_run_with_jobs("fresh", "test", 100)
        .await
        .expect("run");
    for kind in [Kind::User, Kind::Group] {
        let (unchanged, now) = env
            .store
            .orphans_unchanged("fresh", kind, day)
            .await
            .expect("orphans_unchanged");
        assert!(unchanged, "{kind:?}: recorded at the start");
        if kind == Kind::User {
            assert_eq!(now, sum);
        }
    }
    // The provisioned target has states, and a user has left since its last check: its next
    // run records nothing at the start, so its deprovisioning looks.
    env.store
        .start_run_with_jobs("sandbox", "test", 100)
        .await
        .expect("run");
    let (unchanged, _) = env
        .store
        .orphans_unchanged("sandbox", Kind::User, day)
        .await
        .expect("orphans_unchanged");
    assert!(!unchanged, "nothing recorded for a target with states");
    env.finish().await;
}

/// A PostgreSQL database whose default collation is not bytewise (ICU's English here, as
/// `en_US.UTF-8` is on many servers) orders ids otherwise than Rust does: `g_a` before `g-b`,
/// `ga` before `gA`. Every group still gets exactly its own members. (A batch's members were
/// matched to its groups by walking both lists in the database's order while comparing ids
/// by bytes: `g-b`'s member was passed over as it sorted before `g_a`, and the group was
/// created empty.)
#[tokio::test]
async fn postgres_groups_get_their_members_whatever_the_collation() {
    let opts = SandboxOptions {
        patch: true,
        ..SandboxOptions::with_token(crate::harness::TOKEN)
    };
    let Some(env) = Env::with_database(
        Db::Postgres,
        "groups_in_icu_collation",
        opts,
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en'",
    )
    .await
    else {
        return;
    };
    let groups = [
        ("g_a", "under", "u-1"),
        ("g-b", "dash", "u-2"),
        ("gA", "upper", "u-3"),
        ("ga", "lower", "u-4"),
    ];
    let mut lines = String::new();
    for (i, (_, _, user)) in groups.iter().enumerate() {
        lines.push_str(&format!(
            "{{\"kind\":\"user\",\"id\":\"{user}\",\"username\":\"user{i}\"}}\n"
        ));
    }
    for (id, name, user) in groups {
        lines.push_str(&format!(
            "{{\"kind\":\"group\",\"id\":\"{id}\",\"name\":\"{name}\",\"members\":[\"{user}\"]}}\n"
        ));
    }
    env.import(&lines).await;
    let order = env
        .host_i64("SELECT CASE WHEN 'g_a' < 'g-b' AND 'ga' < 'gA' THEN 1::bigint ELSE 0 END")
        .await;
    assert_eq!(order, 1, "the database orders ids otherwise than bytes");
    let s = env.sync().await;
    assert_eq!(s.failed, 0, "{s:?}");
    for (i, (id, name, _)) in groups.iter().enumerate() {
        let group = env
            .remote_group(name)
            .unwrap_or_else(|| panic!("{id} provisioned"));
        let members: Vec<&str> = group["members"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["value"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            members,
            vec![env.rid(&format!("user{i}")).as_str()],
            "{id}'s members"
        );
    }
    // And the next run finds every group as sent: nothing to write.
    let (again, writes) = env.sync_writes().await;
    assert_eq!(again.failed, 0, "{again:?}");
    assert!(writes.is_empty(), "a second run wrote {writes:?}");
    env.finish().await;
}

on_both_databases!(
    a_first_sync_records_its_orphan_check_at_the_start,
    first_sync_creates_everything,
    second_sync_sends_no_write,
    rename_is_one_update,
    member_removed_is_one_delta,
    user_deleted_is_deleted_and_leaves_groups,
    existing_remote_objects_are_adopted,
    remote_deletion_is_healed,
    invalid_object_fails_alone,
    dry_run_sends_nothing_and_changes_nothing,
    put_is_used_without_patch,
    leaving_scope_deprovisions,
    deletion_guard_holds_mass_deletion,
    small_batches_cover_everything,
    orphans_are_looked_for_after_deletions_only,
);
