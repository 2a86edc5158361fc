//! Row revisions: every write of a directory row, however it is made, gives the row a new
//! revision (and one change event); a full sync finds users whose revision it sent, with the
//! same scripts and settings, unchanged in its scan, without reading them out.

use scimsync::directory::Kind;
use scimsync::store::Scanned;

use crate::harness::{Db, Env, call, calls};
use crate::on_both_databases;

const USERS: &str = "{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\"}\n\
{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}\n\
{\"kind\":\"user\",\"id\":\"u-3\",\"username\":\"carol\",\"service_account\":true}\n\
{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"staff\",\"members\":[\"u-1\"]}\n";

async fn rev(env: &Env, table: &str, id: &str) -> i64 {
    env.host_i64(&format!("SELECT rev FROM {table} WHERE id = '{id}'"))
        .await
}

async fn events(env: &Env, id: &str) -> i64 {
    env.host_i64(&format!(
        "SELECT count(*) FROM change_events WHERE object_id = '{id}'"
    ))
    .await
}

async fn host_writes_get_new_revisions_and_one_event_each(db: Db) {
    let Some(env) = Env::new(db, "host_writes_get_new_revisions").await else {
        return;
    };
    env.import(USERS).await;
    let (r0, e0) = (rev(&env, "users", "u-1").await, events(&env, "u-1").await);
    assert!(r0 > 0, "an imported row has a revision: {r0}");
    env.host_exec("UPDATE users SET email = 'alice@example.com' WHERE id = 'u-1'")
        .await;
    let r1 = rev(&env, "users", "u-1").await;
    assert!(r1 > r0, "{r0} -> {r1}");
    assert_eq!(events(&env, "u-1").await, e0 + 1, "one event per update");
    // Deleted and inserted again: a revision never seen before.
    env.host_exec("DELETE FROM users WHERE id = 'u-1'").await;
    env.host_exec(
        "INSERT INTO users (id, username, content_hash, updated_at) \
         VALUES ('u-1', 'alice', 'x', 0)",
    )
    .await;
    let r2 = rev(&env, "users", "u-1").await;
    assert!(r2 > r1, "{r1} -> {r2}");
    assert_eq!(events(&env, "u-1").await, e0 + 3);
    // A host that sets rev itself still gets its event and a fresh revision.
    env.host_exec("UPDATE users SET rev = 1, email = 'a@example.com' WHERE id = 'u-1'")
        .await;
    let r3 = rev(&env, "users", "u-1").await;
    assert_ne!(r3, 1);
    assert!(r3 > r2, "{r2} -> {r3}");
    assert_eq!(events(&env, "u-1").await, e0 + 4);
    let (g0, ge0) = (rev(&env, "groups", "g-1").await, events(&env, "g-1").await);
    env.host_exec("UPDATE groups SET name = 'everyone' WHERE id = 'g-1'")
        .await;
    let g1 = rev(&env, "groups", "g-1").await;
    assert!(g1 > g0);
    assert_eq!(events(&env, "g-1").await, ge0 + 1);
    // Memberships are part of the group: a new revision, and still one event each.
    env.host_exec("INSERT INTO memberships (group_id, user_id) VALUES ('g-1', 'u-2')")
        .await;
    let g2 = rev(&env, "groups", "g-1").await;
    assert!(g2 > g1, "{g1} -> {g2}");
    assert_eq!(events(&env, "g-1").await, ge0 + 2);
    env.host_exec("DELETE FROM memberships WHERE group_id = 'g-1' AND user_id = 'u-2'")
        .await;
    let g3 = rev(&env, "groups", "g-1").await;
    assert!(g3 > g2);
    assert_eq!(events(&env, "g-1").await, ge0 + 3);
    // Two in one transaction: a new revision; on PostgreSQL the group's one event for both.
    env.host_exec(
        "INSERT INTO memberships (group_id, user_id) VALUES ('g-1', 'u-2'), ('g-1', 'u-3')",
    )
    .await;
    assert!(rev(&env, "groups", "g-1").await > g3);
    let per_transaction = if db == Db::Postgres { 1 } else { 2 };
    assert_eq!(events(&env, "g-1").await, ge0 + 3 + per_transaction);
    env.finish().await;
}

/// The ids the scan finds unchanged, with the fingerprint the first sync recorded.
async fn unchanged_in_scan(env: &Env, fingerprint: &str, excludes: bool) -> Vec<String> {
    env.store
        .user_scan("sandbox", "", None, 100, Some(fingerprint), excludes)
        .await
        .expect("scan")
        .into_iter()
        .filter_map(|s| match s {
            Scanned::Unchanged(id) => Some(id),
            Scanned::Read(..) => None,
        })
        .collect()
}

async fn a_no_op_scan_reads_no_user_and_host_writes_are_seen(db: Db) {
    let Some(mut env) = Env::new(db, "no_op_scan_reads_no_user").await else {
        return;
    };
    // carol, a service account, is provisioned too.
    env.target.exclude_service_accounts = false;
    env.import(USERS).await;
    let s = env.sync().await;
    assert_eq!(s.created, 4, "{s:?}");
    let state = env
        .store
        .state("sandbox", Kind::User, "u-1")
        .await
        .expect("query")
        .expect("state");
    let key = state
        .source_key
        .expect("a key is recorded with the resource");
    let (fingerprint, at) = key.split_once(':').expect("fingerprint:rev");
    assert_eq!(at, rev(&env, "users", "u-1").await.to_string());
    let all = ["u-1", "u-2", "u-3"].map(String::from).to_vec();
    assert_eq!(unchanged_in_scan(&env, fingerprint, false).await, all);
    // A target that leaves service accounts out reads them (to take them out of scope).
    assert_eq!(
        unchanged_in_scan(&env, fingerprint, true).await,
        ["u-1", "u-2"].map(String::from).to_vec()
    );
    // Other scripts or settings: every user is read.
    assert!(unchanged_in_scan(&env, "0000", false).await.is_empty());

    // A host rewrites a row unchanged: read, found unchanged by its content, nothing sent,
    // and its new revision remembered so the next scan skips it again.
    env.host_exec("UPDATE users SET email = email WHERE id = 'u-2'")
        .await;
    assert_eq!(
        unchanged_in_scan(&env, fingerprint, false).await,
        ["u-1", "u-3"].map(String::from).to_vec()
    );
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.unchanged, writes.len()), (4, 0), "{s:?}");
    assert_eq!(unchanged_in_scan(&env, fingerprint, false).await, all);

    // A host changes a row: the next full sync sends it.
    env.host_exec("UPDATE users SET email = 'carol@example.com' WHERE id = 'u-3'")
        .await;
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.updated, s.unchanged), (1, 3), "{s:?}");
    assert_eq!(writes.len(), 1, "{:?}", calls(&writes));
    assert_eq!(
        env.remote_user("carol").expect("carol")["emails"][0]["value"],
        "carol@example.com"
    );
    assert_eq!(unchanged_in_scan(&env, fingerprint, false).await, all);

    // States recorded before revisions existed: found unchanged by content, nothing sent,
    // keys recorded.
    env.host_exec("UPDATE sync_state SET source_key = NULL")
        .await;
    assert!(unchanged_in_scan(&env, fingerprint, false).await.is_empty());
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.unchanged, writes.len()), (4, 0), "{s:?}");
    assert_eq!(unchanged_in_scan(&env, fingerprint, false).await, all);
    // Groups: unchanged in the scan while their row and their members' remote ids are.
    let groups = |fp: &str| {
        let fp = fp.to_string();
        let env = &env;
        async move {
            env.store
                .group_scan("sandbox", "", None, 100, Some(&fp))
                .await
                .expect("group scan")
        }
    };
    assert_eq!(
        groups(fingerprint).await,
        vec![("g-1".to_string(), true, None)]
    );
    env.host_exec("INSERT INTO memberships (group_id, user_id) VALUES ('g-1', 'u-2')")
        .await;
    assert_eq!(
        groups(fingerprint).await,
        vec![("g-1".to_string(), false, None)]
    );
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.updated, s.unchanged), (1, 3), "{s:?}");
    assert_eq!(
        calls(&writes),
        vec![call("PATCH", &format!("/Groups/{}", env.gid("staff")))]
    );
    assert_eq!(
        groups(fingerprint).await,
        vec![("g-1".to_string(), true, None)]
    );
    // A member leaving the target (its state says so) changes the group's members.
    env.host_exec(
        "UPDATE sync_state SET status = 'leaving' WHERE kind = 'user' AND local_id = 'u-2'",
    )
    .await;
    assert_eq!(
        groups(fingerprint).await,
        vec![("g-1".to_string(), false, None)]
    );
    env.host_exec(
        "UPDATE sync_state SET status = 'synced' WHERE kind = 'user' AND local_id = 'u-2'",
    )
    .await;
    let group_rev = rev(&env, "groups", "g-1").await;
    // The member epoch moved (twice): the members are compared, found the same, and the
    // scan hands back the key to record; a sync records it without sending anything.
    let epoch = member_epoch(&env).await;
    let key = format!("{fingerprint}:{group_rev}:{epoch}");
    assert_eq!(
        groups(fingerprint).await,
        vec![("g-1".to_string(), true, Some(key.clone()))]
    );
    let (s, writes) = env.sync_writes().await;
    assert_eq!((s.unchanged, writes.len()), (4, 0), "{s:?}");
    assert_eq!(group_key(&env).await, Some(key));
    assert_eq!(
        groups(fingerprint).await,
        vec![("g-1".to_string(), true, None)]
    );
    env.finish().await;
}

/// The sandbox target's member epoch: the sum of its stripes (0 before any).
async fn member_epoch(env: &Env) -> i64 {
    env.host_i64(
        "SELECT COALESCE(CAST(SUM(epoch) AS BIGINT), 0) FROM member_epochs \
         WHERE target = 'sandbox'",
    )
    .await
}

async fn group_key(env: &Env) -> Option<String> {
    env.store
        .state("sandbox", Kind::Group, "g-1")
        .await
        .expect("query")
        .expect("state")
        .source_key
}

/// A group's key records the target's member epoch, which every change of a user's remote
/// id on the target moves (in its transaction), and nothing else does.
async fn member_epoch_moves_with_remote_ids_only(db: Db) {
    let Some(env) = Env::new(db, "member_epoch_moves").await else {
        return;
    };
    env.import(USERS).await;
    let epoch = || member_epoch(&env);
    assert_eq!(epoch().await, 0);
    let (s, _) = env.sync_writes().await;
    assert_eq!(s.created, 3, "{s:?}");
    let e1 = epoch().await;
    assert!(e1 > 0, "provisioning users moves it");
    let fingerprint = env
        .store
        .state("sandbox", Kind::Group, "g-1")
        .await
        .expect("query")
        .expect("state")
        .source_key
        .expect("key")
        .split(':')
        .next()
        .expect("fingerprint")
        .to_string();
    assert_eq!(
        group_key(&env).await,
        Some(format!(
            "{fingerprint}:{}:{e1}",
            rev(&env, "groups", "g-1").await
        ))
    );
    // Writes that leave every remote id as it was: no move.
    env.host_exec("UPDATE sync_state SET last_error = 'x', attempts = 1")
        .await;
    env.host_exec("UPDATE sync_state SET status = 'failed' WHERE kind = 'group'")
        .await;
    assert_eq!(epoch().await, e1);
    // A remote id changed, one made to leave, one deleted: each moves it.
    env.host_exec(
        "UPDATE sync_state SET remote_id = 'other' WHERE kind = 'user' AND local_id = 'u-1'",
    )
    .await;
    let e2 = epoch().await;
    assert!(e2 > e1);
    env.host_exec(
        "UPDATE sync_state SET status = 'leaving' WHERE kind = 'user' AND local_id = 'u-2'",
    )
    .await;
    let e3 = epoch().await;
    assert!(e3 > e2);
    env.host_exec("DELETE FROM sync_state WHERE kind = 'user' AND local_id = 'u-2'")
        .await;
    assert_eq!(epoch().await, e3, "u-2 offered no remote id while leaving");
    env.host_exec("DELETE FROM sync_state WHERE kind = 'user' AND local_id = 'u-1'")
        .await;
    assert!(epoch().await > e3);
    env.finish().await;
}

/// The latest run's jobs of `phase`: (settled at the phase's start, worked). A worked job's
/// result is a whole batch summary (it names the target); a settled one holds counts only.
pub(crate) async fn settled_and_worked(env: &Env, phase: i64) -> (i64, i64) {
    let count = |like: &str| {
        format!(
            "SELECT COUNT(*) FROM jobs WHERE run_id = (SELECT MAX(id) FROM runs) \
             AND phase = {phase} AND status = 'done' AND result {like} '%\"target\"%'"
        )
    };
    (
        env.host_i64(&count("NOT LIKE")).await,
        env.host_i64(&count("LIKE")).await,
    )
}

async fn quiet_batches_are_settled_at_the_phase_start(db: Db) {
    let Some(env) = Env::new(db, "quiet_batches_are_settled").await else {
        return;
    };
    // 57 users (u-000000..u-000056, every 10th a service account the target excludes) in 12
    // batches of 5; 12 groups in 3.
    env.import(&crate::harness::jsonl(&scimsync::directory::sample(
        57, 12, 9,
    )))
    .await;
    // One worker: the first batch settles before any other is claimed (with more, those
    // claimed before the settling pass began are worked), so the counts below are exact.
    let sync = || {
        env.sync_with(scimsync::sync::SyncOptions {
            batch_size: 5,
            workers: 1,
            ..Default::default()
        })
    };
    let s = sync().await;
    assert_eq!((s.created, s.skipped, s.failed), (52 + 12, 5, 0), "{s:?}");
    // A first sync has nothing to settle.
    assert_eq!(settled_and_worked(&env, 0).await, (0, 12));
    assert_eq!(settled_and_worked(&env, 1).await, (0, 3));

    // Nothing changed: the first batch of each phase settles the others, with their counts.
    let s = sync().await;
    assert_eq!((s.unchanged, s.skipped, s.writes), (64, 5, 0), "{s:?}");
    assert_eq!(settled_and_worked(&env, 0).await, (11, 1));
    assert_eq!(settled_and_worked(&env, 1).await, (2, 1));

    // A changed user, a changed group and a user after the last range's start: their
    // batches are worked, the others settled.
    env.host_exec("UPDATE users SET name = 'Changed Name' WHERE id = 'u-000023'")
        .await;
    env.host_exec("UPDATE groups SET name = 'Renamed' WHERE id = 'g-00007'")
        .await;
    env.import(r#"{"kind":"user","id":"u-000099","username":"late"}"#)
        .await;
    let (s, writes) = {
        env.sandbox.clear_requests();
        let s = sync().await;
        (s, env.sandbox.writes())
    };
    assert_eq!(
        (s.created, s.updated, s.unchanged, s.skipped),
        (1, 2, 62, 5),
        "{s:?}"
    );
    assert_eq!(writes.len(), 3, "{:?}", calls(&writes));
    assert_eq!(settled_and_worked(&env, 0).await, (9, 3));
    // The new user moved the member epoch, so every group's batch compares its members (and
    // records the new key).
    assert_eq!(settled_and_worked(&env, 1).await, (0, 3));
    assert!(env.remote_user("late").is_some());
    assert!(env.remote_group("Renamed").is_some());
    // And then, with the new keys recorded, a no-op settles all but the first batches again.
    let s = sync().await;
    assert_eq!((s.unchanged, s.writes), (65, 0), "{s:?}");
    assert_eq!(settled_and_worked(&env, 0).await, (11, 1));
    assert_eq!(settled_and_worked(&env, 1).await, (2, 1));
    env.finish().await;
}

/// 120 users (every 10th a service account the target excludes) and 10 groups, in batches of
/// 2 for 4 workers: 60 batches of users and 5 of groups, for the settling-pass tests.
pub(crate) async fn import_sixty_batches(env: &Env) -> scimsync::sync::SyncOptions {
    env.import(&crate::harness::jsonl(&scimsync::directory::sample(
        120, 10, 5,
    )))
    .await;
    scimsync::sync::SyncOptions {
        batch_size: 2,
        workers: 4,
        ..Default::default()
    }
}

/// The latest no-op run of [`import_sixty_batches`] worked at most one batch a worker in
/// each phase (those claimed before its settling pass began) and settled the rest.
pub(crate) async fn assert_settled_but_one_batch_a_worker(env: &Env) {
    for (phase, batches, what) in [(0, 60, "users'"), (1, 5, "groups'")] {
        let (settled, worked) = settled_and_worked(env, phase).await;
        assert_eq!(settled + worked, batches, "{batches} batches of {what}");
        assert!(
            worked <= 4,
            "{worked} {what} batches worked beside the settling pass"
        );
    }
}

/// With several workers, those that are not settling wait for the settling pass instead of
/// claiming the batches it is about to settle: in a no-op, at most one batch a worker is
/// worked (those claimed before the pass began), the rest settled. (Without the wait,
/// PostgreSQL's workers worked 5–10 of these 60 batches; SQLite's writers take turns anyway.)
async fn workers_wait_for_the_settling_pass(db: Db) {
    let Some(env) = Env::new(db, "workers_wait_for_settling").await else {
        return;
    };
    let opts = import_sixty_batches(&env).await;
    let s = env.sync_with(opts.clone()).await;
    assert_eq!((s.created, s.skipped, s.failed), (108 + 10, 12, 0), "{s:?}");
    for _ in 0..3 {
        let s = env.sync_with(opts.clone()).await;
        assert_eq!((s.unchanged, s.skipped, s.writes), (118, 12, 0), "{s:?}");
        assert_settled_but_one_batch_a_worker(&env).await;
    }
    env.finish().await;
}

/// A PostgreSQL environment (None when skipped) with `USERS` imported and synced: three
/// objects created, so the sandbox target's users have remote ids.
async fn postgres_with_users_provisioned(test: &str) -> Option<Env> {
    let env = Env::new(Db::Postgres, test).await?;
    env.import(USERS).await;
    let (s, _) = env.sync_writes().await;
    assert_eq!(s.created, 3, "{s:?}");
    Some(env)
}

/// On PostgreSQL, transactions that move remote ids on one target do not wait for each
/// other's commit (the member epoch's stripes, migration 0011): a second connection's write
/// goes through while the first's transaction is open, and the epoch moves with each commit.
#[tokio::test]
async fn postgres_epoch_bumps_do_not_wait_for_each_other() {
    use sqlx::Connection;
    let Some(env) = postgres_with_users_provisioned("epoch_stripes").await else {
        return;
    };
    let epoch = || member_epoch(&env);
    async fn pid(conn: &mut sqlx::PgConnection) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(conn)
            .await
    }
    let mut first = sqlx::PgConnection::connect(&env.db_url)
        .await
        .expect("connect");
    let first_stripe = pid(&mut first).await.expect("pid") % 16;
    // A second server process on another stripe (two of sixteen may share one).
    let mut second = loop {
        let mut c = sqlx::PgConnection::connect(&env.db_url)
            .await
            .expect("connect");
        if pid(&mut c).await.expect("pid") % 16 != first_stripe {
            break c;
        }
    };
    let moved = |user: &str| {
        format!(
            "UPDATE sync_state SET remote_id = 'moved-{user}' \
             WHERE target = 'sandbox' AND kind = 'user' AND local_id = '{user}'"
        )
    };
    let before = epoch().await;
    sqlx::query("BEGIN")
        .execute(&mut first)
        .await
        .expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(moved("u-1")))
        .execute(&mut first)
        .await
        .expect("first write");
    sqlx::query("SET lock_timeout = '5s'")
        .execute(&mut second)
        .await
        .expect("lock timeout");
    let second_write = sqlx::query(sqlx::AssertSqlSafe(moved("u-2")))
        .execute(&mut second)
        .await;
    assert!(
        second_write.is_ok(),
        "the second writer waited for the first's commit: {second_write:?}"
    );
    let after_second = epoch().await;
    assert!(after_second > before, "the second's commit moved the epoch");
    sqlx::query("COMMIT")
        .execute(&mut first)
        .await
        .expect("commit");
    assert!(
        epoch().await > after_second,
        "the first's commit moved it again"
    );
    env.finish().await;
}

/// On PostgreSQL a transaction bumps a target's member epoch once, however many of its rows
/// and statements move remote ids there (migration 0012), and the next transaction on the
/// same connection bumps it again; a savepoint rolled back takes its bump with it, so a later
/// move in the same transaction bumps anew.
#[tokio::test]
async fn postgres_a_transaction_bumps_the_epoch_once() {
    use sqlx::Connection;
    let Some(env) = postgres_with_users_provisioned("epoch_once").await else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&env.db_url)
        .await
        .expect("connect");
    let mut run = async |statements: &[&str]| {
        for sql in statements {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&mut conn)
                .await
                .expect(sql);
        }
    };
    let moved = "UPDATE sync_state SET remote_id = remote_id || '-m' WHERE kind = 'user'";
    let moved_u1 = "UPDATE sync_state SET remote_id = remote_id || '-m' \
                    WHERE kind = 'user' AND local_id = 'u-1'";
    let e0 = member_epoch(&env).await;
    // Three rows in one statement, then a second statement: one bump.
    run(&["BEGIN", moved, moved_u1, "COMMIT"]).await;
    let e1 = member_epoch(&env).await;
    assert_eq!(e1, e0 + 1, "one transaction, one bump");
    // The next transaction of the same connection bumps again.
    run(&["BEGIN", moved_u1, "COMMIT"]).await;
    let e2 = member_epoch(&env).await;
    assert_eq!(
        e2,
        e1 + 1,
        "the bump's mark did not outlive its transaction"
    );
    // A savepoint's bump rolled back: the next move bumps.
    run(&[
        "BEGIN",
        "SAVEPOINT s",
        moved_u1,
        "ROLLBACK TO SAVEPOINT s",
        moved_u1,
        "COMMIT",
    ])
    .await;
    assert_eq!(
        member_epoch(&env).await,
        e2 + 1,
        "the move after the rollback bumped"
    );
    // Without a transaction, each statement is one.
    run(&[moved_u1, moved_u1]).await;
    assert_eq!(member_epoch(&env).await, e2 + 3);
    env.finish().await;
}

on_both_databases!(
    host_writes_get_new_revisions_and_one_event_each,
    workers_wait_for_the_settling_pass,
    a_no_op_scan_reads_no_user_and_host_writes_are_seen,
    quiet_batches_are_settled_at_the_phase_start,
    member_epoch_moves_with_remote_ids_only,
);
