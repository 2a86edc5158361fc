//! `/Bulk`: creates and updates of a batch go in bulk requests within the target's limits,
//! answers map back to objects, and whatever a bulk request did not carry out is sent on its
//! own (conflicts adopted, lost answers looked up) with nothing created twice.

use scimsync::sandbox::{RecordedRequest, SandboxOptions};
use serde_json::{Value, json};

use crate::harness::{Db, Env, TOKEN};
use crate::on_both_databases;

fn users(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{\"kind\":\"user\",\"id\":\"u-{i:03}\",\"username\":\"user{i:03}\",\"email\":\"user{i}@example.com\"}}\n"))
        .collect()
}

async fn bulk_env(db: Db, test: &str, max_ops: u32, max_payload: u64) -> Option<Env> {
    let opts = SandboxOptions {
        bulk: Some((max_ops, max_payload)),
        ..SandboxOptions::with_token(TOKEN)
    };
    let mut env = Env::with_sandbox(db, test, opts).await?;
    env.target.bulk = true;
    env.target.exclude_service_accounts = false;
    Some(env)
}

fn bulks(reqs: &[RecordedRequest]) -> Vec<&RecordedRequest> {
    reqs.iter()
        .filter(|r| r.method == "POST" && r.path == "/Bulk")
        .collect()
}

fn operations(r: &RecordedRequest) -> Vec<Value> {
    r.body
        .as_ref()
        .and_then(|b| b["Operations"].as_array().cloned())
        .unwrap_or_default()
}

async fn creates_and_updates_go_in_bulk_within_max_operations(db: Db) {
    let Some(env) = bulk_env(db, "bulk_max_ops", 7, 1 << 20).await else {
        return;
    };
    env.import(&users(50)).await;
    env.import(
        "{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"staff\",\"members\":[\"u-001\",\"u-002\"]}",
    )
    .await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.created, s.failed), (51, 0), "{s:?}");
    let b = bulks(&writes);
    // 50 users in one batch, at most 7 operations a request: 8 bulk requests, no user POSTed
    // on its own; the group goes on its own (it is looked for by name first).
    assert_eq!(b.len(), 8, "{:?}", crate::harness::calls(&writes));
    assert!(
        b.iter()
            .all(|r| operations(r).len() <= 7 && r.status == 200)
    );
    assert_eq!(
        b.iter().map(|r| operations(r).len()).sum::<usize>(),
        50,
        "every user once"
    );
    assert!(
        !writes
            .iter()
            .any(|r| r.method == "POST" && r.path == "/Users")
    );
    assert_eq!(env.sandbox.users().len(), 50);
    // Answers mapped back: each user's recorded remote id is the one the sandbox gave it.
    for name in ["user000", "user025", "user049"] {
        let id = format!("u-{}", &name[4..]);
        let st = env
            .store
            .state("sandbox", scimsync::directory::Kind::User, &id)
            .await
            .expect("query")
            .expect("recorded");
        assert_eq!(st.remote_id, Some(env.rid(name)));
    }
    // The group's members are the bulk-created users.
    let members: Vec<String> = env.remote_group("staff").expect("group")["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["value"].as_str().map(str::to_string))
        .collect();
    assert!(members.contains(&env.rid("user001")) && members.contains(&env.rid("user002")));

    let (s, writes) = env.sync_writes().await;
    assert_eq!(
        (s.unchanged, writes.len()),
        (51, 0),
        "a second run sends nothing"
    );

    // Three renames: one bulk request of three PATCH operations.
    env.import("{\"kind\":\"user\",\"id\":\"u-003\",\"username\":\"user003\",\"email\":\"new3@example.com\"}\n{\"kind\":\"user\",\"id\":\"u-004\",\"username\":\"user004\",\"email\":\"new4@example.com\"}\n{\"kind\":\"user\",\"id\":\"u-005\",\"username\":\"user005\",\"email\":\"new5@example.com\"}")
        .await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(s.updated, 3, "{s:?}");
    assert_eq!(writes.len(), 1, "{:?}", crate::harness::calls(&writes));
    let ops = operations(&writes[0]);
    assert!(ops.iter().all(|o| o["method"] == "PATCH"), "{ops:?}");
    assert_eq!(
        env.remote_user("user004").expect("user")["emails"][0]["value"],
        json!("new4@example.com")
    );
    env.finish().await;
}

async fn bulk_requests_stay_within_max_payload_size(db: Db) {
    // About three users' operations fit in 700 bytes.
    let Some(env) = bulk_env(db, "bulk_payload", 1000, 700).await else {
        return;
    };
    env.import(&users(20)).await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.created, s.failed), (20, 0), "{s:?}");
    let b = bulks(&writes);
    assert!(b.len() >= 5, "split by size: {} requests", b.len());
    assert!(
        b.iter().all(|r| r.status == 200),
        "none refused as too large"
    );
    assert!(
        b.iter()
            .all(|r| r.body.as_ref().is_some_and(|v| v.to_string().len() <= 700))
    );
    assert_eq!(env.sandbox.users().len(), 20);
    env.finish().await;
}

async fn operations_the_target_refuses_are_sent_on_their_own(db: Db) {
    let Some(env) = bulk_env(db, "bulk_conflict", 100, 1 << 20).await else {
        return;
    };
    // user007 exists on the target already: its bulk POST answers 409, and the object is
    // then sent on its own, where the conflict is resolved by adopting it.
    let existing = env
        .sandbox
        .insert(
            "Users",
            json!({"schemas": [scimsync::scim::USER_SCHEMA], "userName": "user007", "emails": [{"value": "old@example.com"}]}),
        )
        .expect("insert");
    env.import(&users(10)).await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!(s.failed, 0, "{s:?}");
    assert_eq!(s.created + s.updated, 10, "{s:?}");
    let b = bulks(&writes);
    assert_eq!(b.len(), 1);
    assert_eq!(env.sandbox.users().len(), 10, "nothing created twice");
    assert_eq!(env.rid("user007"), existing, "adopted");
    assert_eq!(
        env.remote_user("user007").expect("user")["emails"][0]["value"],
        json!("user7@example.com")
    );
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.unchanged, writes.len()), (10, 0));
    env.finish().await;
}

on_both_databases!(
    creates_and_updates_go_in_bulk_within_max_operations,
    bulk_requests_stay_within_max_payload_size,
    operations_the_target_refuses_are_sent_on_their_own
);
