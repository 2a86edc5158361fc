//! Faults at the target and crashes of scimsync: syncs converge, Retry-After is honoured, the
//! request count stays bounded, a dead target trips the breaker and is probed back, and kill -9
//! at any point leaves nothing duplicated or lost.

use std::time::{Duration, Instant};

use scimsync::directory::sample;
use scimsync::sandbox::{Faults, SandboxOptions};
use scimsync::sync::SyncOptions;

use crate::harness::{Db, Env, TOKEN, jsonl};
use crate::on_both_databases;

/// Each successful create at most once per object: no duplicate was ever made.
fn assert_no_double_create(env: &Env) {
    let mut seen = std::collections::HashMap::new();
    for w in env.sandbox.writes() {
        if w.method == "POST" && w.status == 201 {
            let name = w
                .body
                .as_ref()
                .and_then(|b| b.get("userName").or_else(|| b.get("displayName")))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            *seen.entry(name).or_insert(0) += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "created twice: {twice:?}");
}

async fn faults_converge_with_bounded_requests(db: Db) {
    let opts = SandboxOptions {
        faults: Faults {
            error_every: 7,
            throttle_every: 11,
            drop_every: 13,
            latency: Duration::from_millis(2),
        },
        ..SandboxOptions::with_token(TOKEN)
    };
    let Some(mut env) = Env::with_sandbox(db, "faults_converge", opts).await else {
        return;
    };
    env.target.exclude_service_accounts = false;
    env.import(&jsonl(&sample(60, 4, 10))).await;
    let mut runs = 0;
    loop {
        runs += 1;
        let s = env.sync().await;
        if s.is_clean() {
            break;
        }
        assert!(runs < 4, "did not converge: {s:?}");
    }
    assert_eq!(env.sandbox.users().len(), 60);
    assert_eq!(env.sandbox.groups().len(), 4);
    assert!(
        env.sandbox
            .groups()
            .iter()
            .all(|g| g["members"].as_array().map_or(0, Vec::len) == 10)
    );
    assert_eq!(
        env.sandbox.early_retries(),
        0,
        "no request came back before its Retry-After"
    );
    assert_no_double_create(&env);
    // 64 objects (+ group lookups): retries and adoptions after lost answers stay bounded.
    let total = env.sandbox.requests().len();
    assert!(total < 64 * 3, "{total} requests for 64 objects");
    // Converged: a further sync has nothing to write.
    env.sandbox.clear_requests();
    let s = env.sync().await;
    assert_eq!(s.writes, 0, "{s:?}");
    env.finish().await;
}

async fn a_dead_target_trips_the_breaker_and_recovers(db: Db) {
    let Some(mut env) = Env::new(db, "breaker").await else {
        return;
    };
    env.target.breaker_cooldown = scimsync::config::Seconds(1);
    env.target.exclude_service_accounts = false;
    env.import(&jsonl(&sample(40, 0, 0))).await;
    // Discovery first, while it is up, so the dead target is met by the sync itself.
    let engine = env
        .engine(SyncOptions {
            batch_size: 100,
            ..Default::default()
        })
        .await;
    env.sandbox.set_down(true);
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("runs");
    assert_eq!(s.failed, 40);
    assert!(engine.target_unhealthy(), "the breaker is open");
    let fp = env.target.fingerprint();
    let health = env
        .store
        .cache_get("sandbox", "health", &fp, i64::MAX / 2)
        .await
        .expect("query");
    assert_eq!(
        health.and_then(|h| h["healthy"].as_bool()),
        Some(false),
        "recorded for status and readyz"
    );
    let held: usize = s
        .failures
        .iter()
        .filter(|(_, _, e)| e.contains("unhealthy"))
        .count();
    assert!(
        held > 0,
        "objects failed fast instead of hammering: {:?}",
        &s.failures[..3]
    );
    let sent = env.sandbox.requests().len();
    assert!(
        sent < 40 * 4,
        "{sent} requests: the breaker stopped the retry storm"
    );
    // The target comes back: after the cooldown one probe goes, succeeds, and all resumes.
    env.sandbox.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let s = engine
        .full_sync(&scimsync::sync::NoProgress)
        .await
        .expect("runs");
    assert!(s.is_clean(), "{s:?}");
    assert!(!engine.target_unhealthy());
    assert_eq!(env.sandbox.users().len(), 40);
    env.finish().await;
}

async fn a_failed_delete_is_kept_and_retried(db: Db) {
    let Some(env) = Env::new(db, "failed_delete_retried").await else {
        return;
    };
    env.import("{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}").await;
    assert!(env.sync().await.is_clean());
    let bob = env.rid("bob");
    env.import("{\"kind\":\"user\",\"id\":\"u-2\",\"deleted\":true}")
        .await;
    env.sandbox.set_down(true);
    let s = env.sync().await;
    assert_eq!((s.failed, s.deleted), (1, 0), "{s:?}");
    let kept = env
        .store
        .state("sandbox", scimsync::directory::Kind::User, "u-2")
        .await
        .expect("query");
    assert_eq!(
        kept.and_then(|k| k.remote_id),
        Some(bob.clone()),
        "the record stays until the target confirms"
    );
    env.sandbox.set_down(false);
    env.sandbox.clear_requests();
    let s = env.sync().await;
    assert_eq!(s.deleted, 1, "{s:?}");
    assert_eq!(
        crate::harness::calls(&env.sandbox.writes()),
        vec![crate::harness::call("DELETE", &format!("/Users/{bob}"))]
    );
    assert!(
        env.store
            .state("sandbox", scimsync::directory::Kind::User, "u-2")
            .await
            .expect("query")
            .is_none()
    );
    env.finish().await;
}

on_both_databases!(
    faults_converge_with_bounded_requests,
    a_dead_target_trips_the_breaker_and_recovers,
    a_failed_delete_is_kept_and_retried
);

fn write_config(dir: &std::path::Path, db_url: &str, sandbox_url: &str) -> std::path::PathBuf {
    crate::harness::write_default_mappings(dir);
    let text = format!(
        "[database]\nurl = \"{db_url}\"\n\n[worker]\nfull_sync_cron = \"0 0 0 1 1 *\"\nlisten = \"127.0.0.1:0\"\nevent_poll_interval_ms = 50\njob_lease = 3\n\n[[target]]\nname = \"sandbox\"\nurl = \"{sandbox_url}\"\nmappings = \"mappings\"\nexclude_service_accounts = false\nmax_deletions = \"100%\"\n[target.auth]\ntoken = \"{TOKEN}\"\n"
    );
    let path = dir.join("scimsync.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn scimsync(config: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_scimsync"));
    c.arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

/// Kill -9 at varied points of full syncs and of event processing, then let it finish:
/// everything converges, nothing is created twice, no change is lost.
async fn kill_9_anywhere_converges(db: Db) {
    let Some(mut env) = Env::new(db, "kill_9_anywhere_converges").await else {
        return;
    };
    // As in the config file the processes use.
    env.target.exclude_service_accounts = false;
    env.target.max_deletions = scimsync::config::DeletionLimit::Percent(100.0);
    env.import(&jsonl(&sample(400, 10, 25))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &env.db_url, &env.sandbox.url);
    // A fixed sequence of kill points (ms), varied enough to land in every phase.
    for (i, ms) in [40u64, 170, 90, 260, 15, 120].into_iter().enumerate() {
        let mut child = if i % 2 == 0 {
            scimsync(&cfg, &["sync", "--full"])
                .spawn()
                .expect("spawn sync")
        } else {
            scimsync(&cfg, &["run"]).spawn().expect("spawn run")
        };
        // Changes keep coming while processes die.
        env.import(&format!(
            "{{\"kind\":\"user\",\"id\":\"u-{i:06}\",\"username\":\"renamed-{i}\",\"name\":\"Renamed {i}\"}}\n{{\"kind\":\"user\",\"id\":\"x-{i}\",\"username\":\"extra-{i}\"}}"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    // A daemon runs to the end: events and the interrupted run are finished.
    let mut daemon = scimsync(&cfg, &["run"]).spawn().expect("spawn run");
    let deadline = Instant::now() + Duration::from_secs(90);
    let expected_users = 400 + 6;
    loop {
        let running = env.store.running_run("sandbox").await.expect("query");
        let backlog = env.store.backlog("sandbox").await.expect("query").0;
        if running.is_none() && backlog == 0 && env.sandbox.users().len() == expected_users {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence: run {running:?}, backlog {backlog}, {} users",
            env.sandbox.users().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
    // One more full sync proves the state: nothing left to send.
    let s = env.sync().await;
    assert!(s.is_clean(), "{s:?}");
    assert_eq!(s.writes, 0, "converged: {s:?}");
    for i in 0..6 {
        let u = env
            .remote_user(&format!("renamed-{i}"))
            .unwrap_or_else(|| panic!("renamed-{i} arrived"));
        assert_eq!(u["displayName"], format!("Renamed {i}"));
        assert!(env.remote_user(&format!("extra-{i}")).is_some());
    }
    assert_eq!(env.sandbox.groups().len(), 10);
    assert_no_double_create(&env);
    env.finish().await;
}

on_both_databases!(kill_9_anywhere_converges);
