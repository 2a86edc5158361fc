//! Mappings as operators meet them: the shipped defaults (snapshots), the documented examples,
//! live reload under a running engine, and schema_check against the target's /Schemas.

use scimsync::config::SchemaCheck;
use scimsync::directory::Kind;
use scimsync::directory::{Group, User};
use scimsync::mapping::{MapOutcome, Mappings, TargetInfo};
use scimsync::scim::{ENTERPRISE_USER_SCHEMA, validate};
use scimsync::sync::SyncOptions;
use serde_json::{Value, json};

use crate::harness::{Db, Env, call, calls};

fn target() -> TargetInfo {
    TargetInfo {
        name: "app".into(),
        compatibility: "default".into(),
    }
}

fn user(v: Value) -> User {
    serde_json::from_value(v).expect("user")
}

fn mapped_user(m: &Mappings, v: Value) -> Value {
    match m.map_user(&user(v), &target()).expect("maps") {
        MapOutcome::Resource(doc) => {
            assert_eq!(validate(Kind::User, &doc), Ok(()), "{doc}");
            doc
        }
        MapOutcome::Skip { reason, .. } => panic!("skipped: {reason}"),
    }
}

#[test]
fn default_mappings_snapshots() {
    let m = Mappings::defaults().expect("defaults");
    insta::assert_json_snapshot!(
        "user_full",
        mapped_user(
            &m,
            json!({
                "id": "u-1", "username": "alice", "email": "alice@example.com", "name": "Alice Smith",
                "given_name": "Alice", "family_name": "Smith", "active": true,
                "attributes": {"locale": "en-US", "phone": "+1 555 0100", "department": "R&D"}
            })
        )
    );
    insta::assert_json_snapshot!(
        "user_minimal",
        mapped_user(&m, json!({"id": "u-2", "username": "bob"}))
    );
    insta::assert_json_snapshot!(
        "user_inactive_unicode",
        mapped_user(
            &m,
            json!({
                "id": "u-3", "username": "zoë.ßtraße", "name": "Zoë Straße", "family_name": "Straße",
                "email": "", "active": false
            })
        )
    );
    let g: Group = serde_json::from_value(
        json!({"id": "g-1", "name": "Engineering", "members": ["u-1", "u-2"]}),
    )
    .expect("group");
    let MapOutcome::Resource(doc) = m.map_group(&g, &target()).expect("maps") else {
        panic!("skipped")
    };
    insta::assert_json_snapshot!("group", doc);
}

fn with_example(example: &str) -> Mappings {
    let (core_name, core) = scimsync::mapping::DEFAULT_USER_SCRIPT;
    let path = format!("{}/mappings/examples/{example}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example exists");
    let mut scripts = vec![
        (core_name.to_string(), core.to_string()),
        (format!("20-{example}"), text),
    ];
    if example == "skip.rhai" {
        scripts.reverse();
    }
    Mappings::from_sources(&scripts, &[]).expect("example compiles")
}

#[test]
fn documented_examples_behave_as_documented() {
    let slack = with_example("slack.rhai");
    let doc = mapped_user(
        &slack,
        json!({"id": "u", "username": "Ada.Lovelace+test@Analytical.Engines"}),
    );
    assert_eq!(doc["userName"], "ada.lovelacetestanaly");
    assert_eq!(doc["nickName"], "ada.lovelacetestanaly");
    let out = slack
        .map_user(&user(json!({"id": "u", "username": "+++"})), &target())
        .expect("maps");
    assert!(matches!(out, MapOutcome::Skip { .. }), "{out:?}");

    let aws = with_example("aws.rhai");
    let doc = mapped_user(
        &aws,
        json!({"id": "u", "username": "bob", "email": "bob@x.io", "attributes": {"phone": "1"}}),
    );
    assert_eq!(
        doc["name"],
        json!({"givenName": "bob", "familyName": "-", "formatted": "bob -"})
    );
    assert_eq!(doc["displayName"], "bob -");
    assert_eq!(
        doc["emails"],
        json!([{"value": "bob@x.io", "type": "work", "primary": true}])
    );
    assert_eq!(doc["phoneNumbers"].as_array().map(Vec::len), Some(1));
    let doc = mapped_user(
        &aws,
        json!({"id": "u", "username": "ada", "name": "Ada King Lovelace"}),
    );
    assert_eq!(doc["name"]["givenName"], "Ada King");
    assert_eq!(doc["name"]["familyName"], "Lovelace");
    assert!(
        doc.get("emails").is_none(),
        "no email: the key is removed, not sent empty"
    );

    let ent = with_example("enterprise.rhai");
    let doc = mapped_user(
        &ent,
        json!({"id": "u", "username": "c", "attributes": {"department": "R&D", "manager_id": "m-9", "cost_center": "42"}}),
    );
    assert_eq!(
        doc[ENTERPRISE_USER_SCHEMA],
        json!({"department": "R&D", "costCenter": "42", "manager": {"value": "m-9"}})
    );
    assert!(
        doc["schemas"]
            .as_array()
            .expect("schemas")
            .contains(&json!(ENTERPRISE_USER_SCHEMA))
    );
    let doc = mapped_user(&ent, json!({"id": "u", "username": "d"}));
    assert!(doc.get(ENTERPRISE_USER_SCHEMA).is_none());
    assert_eq!(doc["schemas"].as_array().map(Vec::len), Some(1));

    let skip = with_example("skip.rhai");
    for (u, why) in [
        (
            json!({"id": "u", "username": "e", "attributes": {"employment": "contractor"}}),
            "contractors are not provisioned to app",
        ),
        (
            json!({"id": "u", "username": "f", "active": false}),
            "inactive accounts are not provisioned to app",
        ),
    ] {
        match skip.map_user(&user(u), &target()).expect("maps") {
            MapOutcome::Skip { script, reason } => {
                assert_eq!(reason, why);
                assert_eq!(script, "20-skip.rhai");
            }
            other => panic!("{other:?}"),
        }
    }
    mapped_user(
        &skip,
        json!({"id": "u", "username": "g", "attributes": {"employment": "staff"}}),
    );
}

const ONE: &str = "{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice Smith\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_scripts_apply_to_a_running_engine() {
    let Some(env) = Env::new(Db::Sqlite, "edited_scripts_apply_to_a_running_engine").await else {
        return;
    };
    env.import(ONE).await;
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
    env.write_mapping("user", "20-title.rhai", "#{ title: \"Engineer\" }");
    env.sandbox.clear_requests();
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert_eq!(s.updated, 2, "the edit is used without a new engine: {s:?}");
    assert_eq!(
        env.remote_user("alice").expect("alice")["title"],
        "Engineer"
    );
    // A broken edit keeps the last good version: nothing fails, nothing changes.
    env.write_mapping("user", "20-title.rhai", "#{ title: ");
    env.sandbox.clear_requests();
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("sync");
    assert_eq!((s.failed, s.unchanged, s.writes), (0, 2, 0), "{s:?}");
    env.finish().await;
}

/// The daemon's change events go through `sync_one`: an edit reaches them too, not only the
/// next full sync (at most a second later: batches and events look at the folder once a
/// second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_scripts_apply_to_change_events() {
    let Some(env) = Env::new(Db::Sqlite, "edited_scripts_apply_to_change_events").await else {
        return;
    };
    env.import(ONE).await;
    let engine = env.engine(SyncOptions::default()).await;
    let r = engine.sync_one(Kind::User, "u-1").await.expect("sync");
    assert_eq!(r.action, scimsync::sync::Action::Created, "{r:?}");
    env.write_mapping("user", "20-title.rhai", "#{ title: \"Engineer\" }");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = engine.sync_one(Kind::User, "u-1").await.expect("sync");
    assert_eq!(r.action, scimsync::sync::Action::Updated, "{r:?}");
    assert_eq!(
        env.remote_user("alice").expect("alice")["title"],
        "Engineer"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_that_changes_no_resource_is_remembered() {
    let Some(env) = Env::new(Db::Sqlite, "edit_changes_no_resource").await else {
        return;
    };
    env.import(ONE).await;
    assert_eq!(env.sync().await.created, 2);
    let source = || async {
        env.store
            .state("sandbox", Kind::User, "u-1")
            .await
            .expect("query")
            .and_then(|s| s.source_hash)
    };
    let before = source().await;
    // A new scripts version whose output is the same: mapped again, nothing sent, and what
    // the resource is made from now is recorded, so the next run skips it without mapping.
    env.write_mapping("user", "20-noop.rhai", "// nothing to add\n#{}");
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.unchanged, writes.len()), (2, 0), "{s:?}");
    let after = source().await;
    assert!(
        after.is_some() && after != before,
        "{before:?} -> {after:?}"
    );
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.unchanged, writes.len()), (2, 0));
    assert_eq!(source().await, after);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_check_against_the_targets_schemas() {
    let Some(mut env) = Env::new(Db::Sqlite, "schema_check_against_the_targets_schemas").await
    else {
        return;
    };
    // The sandbox's /Schemas does not declare `title`.
    env.write_mapping(
        "user",
        "20-title.rhai",
        "if user.username == \"bob\" { #{ title: \"Engineer\" } }",
    );
    env.import(ONE).await;
    env.target.schema_check = SchemaCheck::Strict;
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.created, s.failed), (1, 1), "{s:?}");
    assert!(
        s.failures[0]
            .2
            .contains("title: not in the target's schema"),
        "{:?}",
        s.failures
    );
    assert_eq!(calls(&writes), vec![call("POST", "/Users")]);
    env.target.schema_check = SchemaCheck::Warn;
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.created, s.failed), (1, 0), "warn sends anyway: {s:?}");
    assert_eq!(writes[0].body.as_ref().expect("body")["title"], "Engineer");
    env.finish().await;
}
