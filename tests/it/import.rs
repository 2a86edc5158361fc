//! `directory import`: one transaction, line-numbered errors, prune, change events.

use scimsync::directory::{Record, parse_record};
use scimsync::store::{Store, StoreError};

use crate::harness::{Db, drop_database, fresh_database};
use crate::on_both_databases;

fn records(text: &str) -> Vec<(usize, Record)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, parse_record(l).expect("valid line")))
        .collect()
}

async fn open(db: Db, test: &str) -> Option<(Store, tempfile::TempDir, Option<String>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, name) = fresh_database(db, dir.path(), test).await?;
    Some((Store::connect(&url).await.expect("connect"), dir, name))
}

async fn close(store: Store, name: Option<String>) {
    store.close().await;
    if let Some(n) = name {
        drop_database(&n).await;
    }
}

async fn bad_import_changes_nothing(db: Db) {
    let Some((store, _dir, name)) = open(db, "bad_import_changes_nothing").await else {
        return;
    };
    store
        .import(
            &records(r#"{"kind":"user","id":"u-0","username":"zed"}"#),
            false,
        )
        .await
        .expect("first import");
    let events = store.count_events().await.expect("events");
    // Line 3 names a member that does not exist: lines 1 and 2 must not land either.
    let text = "{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\"}\n\n{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"G\",\"members\":[\"u-1\",\"ghost\"]}";
    let err = store
        .import(&records(text), false)
        .await
        .expect_err("must fail");
    match &err {
        StoreError::Import { line, message } => {
            assert_eq!(*line, 3);
            assert!(message.contains("ghost"), "{message}");
        }
        other => panic!("wrong error: {other}"),
    }
    // A username taken by another user is reported on its line.
    let text = "{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"zed\"}";
    let err = store
        .import(&records(text), false)
        .await
        .expect_err("unique");
    assert!(
        err.to_string().starts_with("line 2:") && err.to_string().contains("zed"),
        "{err}"
    );
    assert_eq!(
        store
            .count(scimsync::directory::Kind::User)
            .await
            .expect("count"),
        1
    );
    assert_eq!(
        store
            .count(scimsync::directory::Kind::Group)
            .await
            .expect("count"),
        0
    );
    assert_eq!(
        store.count_events().await.expect("events"),
        events,
        "no event escaped the rollback"
    );
    close(store, name).await;
}

async fn import_writes_events_and_prunes(db: Db) {
    let Some((store, _dir, name)) = open(db, "import_writes_events_and_prunes").await else {
        return;
    };
    let text = "{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"G\",\"members\":[\"u-1\",\"u-2\"]}\n{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"attributes\":{\"locale\":\"fr\"}}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}";
    let s = store.import(&records(text), false).await.expect("import");
    assert_eq!((s.users_changed, s.groups_changed), (2, 2), "{s:?}");
    let after_first = store.count_events().await.expect("events");
    // On PostgreSQL a transaction's membership changes are in their group's one event.
    let least = if db == Db::Postgres { 3 } else { 5 };
    assert!(
        after_first >= least,
        "users, group and memberships each wrote events: {after_first}"
    );
    // The same file again changes nothing and writes no event.
    let s = store.import(&records(text), false).await.expect("import");
    assert_eq!((s.users_changed, s.groups_changed, s.unchanged), (0, 0, 3));
    assert_eq!(store.count_events().await.expect("events"), after_first);
    let (g, _, members, _) = store
        .group("t", "g-1")
        .await
        .expect("query")
        .expect("group");
    assert_eq!(g.members, vec!["u-1", "u-2"]);
    assert_eq!(members.len(), 2);
    let (u, ..) = store.user("t", "u-1").await.expect("query").expect("user");
    assert_eq!(u.attributes["locale"], "fr");
    // Prune: only bob stays; alice and the group go.
    let s = store
        .import(
            &records("{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}"),
            true,
        )
        .await
        .expect("prune");
    assert_eq!(s.deleted, 2);
    assert!(store.user("t", "u-1").await.expect("query").is_none());
    assert!(store.group("t", "g-1").await.expect("query").is_none());
    assert!(store.count_events().await.expect("events") > after_first);
    close(store, name).await;
}

on_both_databases!(bad_import_changes_nothing, import_writes_events_and_prunes);
