//! `scimsync run`: changes reach the target through the event consumer, bursts are
//! coalesced, nothing is lost across restarts; on PostgreSQL several daemons share full syncs
//! without writing an object twice, survive kill -9, fire the schedule once, and stop cleanly.

use std::path::Path;
use std::time::{Duration, Instant};

use scimsync::config::{Config, DatabaseConfig, WorkerConfig};
use scimsync::directory::sample;
use tokio_util::sync::CancellationToken;

use crate::harness::{Db, Env, TOKEN, call, calls, jsonl};
use crate::on_both_databases;

/// Never fires in a test's lifetime: January 1st at midnight.
const NEVER: &str = "0 0 0 1 1 *";

fn config(env: &Env, db_url: &str, cron: &str) -> Config {
    Config {
        database: DatabaseConfig {
            url: db_url.to_string(),
        },
        worker: WorkerConfig {
            full_sync_cron: cron.into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            event_poll_interval_ms: 50,
            job_lease: scimsync::config::Seconds(3),
            shutdown_timeout: scimsync::config::Seconds(10),
            ..Default::default()
        },
        targets: vec![env.target.clone()],
    }
}

struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(env: &Env, db_url: &str) -> Running {
    start_with(env, config(env, db_url, NEVER))
}

fn start_with(env: &Env, cfg: Config) -> Running {
    let cancel = CancellationToken::new();
    let store = env.store.clone();
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        scimsync::daemon::run(cfg, store, c)
            .await
            .expect("daemon runs");
    });
    Running { cancel, task }
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("stops within its shutdown timeout")
            .expect("no panic");
    }
}

/// Waits until `sandbox` has no running full sync (`what`: the message if it never ends).
async fn until_no_run(store: &scimsync::store::Store, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.running_run("sandbox").await.expect("query").is_some() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn daemon_consumes_changes(db: Db) {
    let Some(env) = Env::new(db, "daemon_consumes_changes").await else {
        return;
    };
    env.import("{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}\n{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"Eng\",\"members\":[\"u-1\"]}").await;
    let url = env.db_url.clone();
    // First start: the existing directory is the full sync's, not the events'.
    let d = start(&env, &url);
    until("the first full sync", || {
        env.sandbox.users().len() == 2 && env.sandbox.groups().len() == 1
    })
    .await;
    until_no_run(&env.store, "run did not finish").await;
    env.sandbox.clear_requests();

    // One new user: one POST.
    env.import("{\"kind\":\"user\",\"id\":\"u-3\",\"username\":\"carol\"}")
        .await;
    until("carol", || env.remote_user("carol").is_some()).await;
    assert_eq!(calls(&env.sandbox.writes()), vec![call("POST", "/Users")]);

    // A burst of 50 changes to one user in one transaction: one PATCH.
    env.sandbox.clear_requests();
    let burst: String = (0..50)
        .map(|i| format!("{{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice {i}\"}}\n"))
        .collect();
    env.import(&burst).await;
    until("the last name", || {
        env.remote_user("alice")
            .is_some_and(|u| u["displayName"] == "Alice 49")
    })
    .await;
    let alice = env.rid("alice");
    assert_eq!(
        calls(&env.sandbox.writes()),
        vec![call("PATCH", &format!("/Users/{alice}"))]
    );

    // A membership change: one member delta on the group.
    env.sandbox.clear_requests();
    env.import(
        "{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"Eng\",\"members\":[\"u-1\",\"u-2\"]}",
    )
    .await;
    let eng = env.gid("Eng");
    until("bob in Eng", || env.sandbox.writes().len() == 1).await;
    assert_eq!(
        calls(&env.sandbox.writes()),
        vec![call("PATCH", &format!("/Groups/{eng}"))]
    );
    d.stop().await;

    // Changes made while no daemon runs are not lost, and nothing earlier is sent again.
    env.sandbox.clear_requests();
    env.import("{\"kind\":\"user\",\"id\":\"u-4\",\"username\":\"dave\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"deleted\":true}").await;
    let bob = env.rid("bob");
    let d = start(&env, &url);
    until("dave, and bob gone", || {
        env.remote_user("dave").is_some() && env.remote_user("bob").is_none()
    })
    .await;
    until("Eng updated", || env.sandbox.writes().len() == 3).await;
    let mut got = calls(&env.sandbox.writes());
    got.sort();
    let mut want = vec![
        call("POST", "/Users"),
        call("DELETE", &format!("/Users/{bob}")),
        call("PATCH", &format!("/Groups/{eng}")),
    ];
    want.sort();
    assert_eq!(got, want);
    d.stop().await;
    assert_eq!(env.store.claimed_jobs().await.expect("jobs"), 0);
    env.finish().await;
}

on_both_databases!(daemon_consumes_changes);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let Some(env) = Env::new(Db::Sqlite, "health_readiness_and_metrics").await else {
        return;
    };
    env.import("{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\"}")
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let cancel = CancellationToken::new();
    let cfg = config(&env, &env.db_url, NEVER);
    let (store, c) = (env.store.clone(), cancel.clone());
    let task = tokio::spawn(async move {
        scimsync::daemon::run_on(cfg, store, c, listener)
            .await
            .expect("daemon");
    });
    until("alice", || env.remote_user("alice").is_some()).await;
    until_no_run(&env.store, "run did not finish").await;
    let get = |path: &str| {
        let url = format!("{base}{path}");
        async move {
            let r = reqwest::get(url).await.expect("GET");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok\n".to_string()));
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["database"], "ok");
    assert!(
        ready["targets"]["sandbox"]["event_backlog"].is_i64(),
        "{ready}"
    );
    let (_, metrics) = get("/metrics").await;
    for needle in [
        "scimsync_objects_total{target=\"sandbox\",kind=\"user\",action=\"created\"}",
        "scimsync_request_duration_seconds",
        "scimsync_event_backlog{target=\"sandbox\"}",
        "scimsync_runs_total",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    cancel.cancel();
    task.await.expect("stops");
    env.finish().await;
}

// ---- several processes on PostgreSQL: the real binary ----

fn write_config(dir: &Path, db_url: &str, sandbox_url: &str, cron: &str) -> std::path::PathBuf {
    crate::harness::write_default_mappings(dir);
    let text = format!(
        "[database]\nurl = \"{db_url}\"\n\n[worker]\nfull_sync_cron = \"{cron}\"\nbatch_size = 100\nlisten = \"127.0.0.1:0\"\nevent_poll_interval_ms = 100\njob_lease = 3\nworkers = 2\nshutdown_timeout = 20\n\n[[target]]\nname = \"sandbox\"\nurl = \"{sandbox_url}\"\nmappings = \"mappings\"\nexclude_service_accounts = false\n[target.auth]\ntoken = \"{TOKEN}\"\n"
    );
    let path = dir.join("scimsync.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn spawn_daemon(config: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_scimsync"))
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("SCIMSYNC_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn scimsync run")
}

/// SIGTERM through kill(1), then the exit status must be 0 within the shutdown timeout.
async fn sigterm(child: &mut tokio::process::Child) {
    let pid = child.id().expect("running");
    let sent = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(sent.success());
    let code = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within the shutdown timeout")
        .expect("wait");
    assert_eq!(code.code(), Some(0), "SIGTERM is a clean exit");
}

async fn runs(store: &scimsync::store::Store) -> Vec<scimsync::store::RunRecord> {
    store.recent_runs(Some("sandbox"), 100).await.expect("runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_a_full_sync_and_survive_kill_9() {
    let test = "two_daemons_share_a_full_sync_and_survive_kill_9";
    let Some(env) = Env::new(Db::Postgres, test).await else {
        return;
    };
    env.import(&jsonl(&sample(2000, 20, 10))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path(), &env.db_url, &env.sandbox.url, NEVER);

    // A starts the first full sync; it is killed -9 mid-run; B starts and finishes it.
    let mut a = spawn_daemon(&cfg);
    until("A to be mid-run", || env.sandbox.users().len() >= 300).await;
    a.start_kill().expect("kill -9");
    a.wait().await.expect("reaped");
    let at_kill = env.sandbox.users().len();
    assert!(
        at_kill < 2000,
        "A was killed mid-run ({at_kill} users sent)"
    );
    println!("killed A -9 after {at_kill} of 2000 users");
    let mut b = spawn_daemon(&cfg);
    let mut c = spawn_daemon(&cfg);
    // B is stopped with SIGTERM while it works: exit 0, its batch finished or handed back.
    until("B and C to make progress", || {
        env.sandbox.users().len() >= at_kill + 200
    })
    .await;
    sigterm(&mut b).await;
    let store = env.store.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = runs(&store).await;
        if r.first().is_some_and(|r| r.status != "running") {
            break;
        }
        assert!(Instant::now() < deadline, "the run did not finish: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = runs(&store).await;
    assert_eq!(r.len(), 1, "one run, joined by the later daemons: {r:?}");
    assert_eq!(r[0].status, "succeeded", "{r:?}");
    assert_eq!(env.sandbox.users().len(), 2000);
    assert_eq!(env.sandbox.groups().len(), 20);
    // No object created twice: 2000 user POSTs that succeeded, 20 group POSTs.
    let writes = env.sandbox.writes();
    let created_users = writes
        .iter()
        .filter(|w| w.method == "POST" && w.path == "/Users" && w.status == 201)
        .count();
    assert_eq!(created_users, 2000);
    let group_posts = writes
        .iter()
        .filter(|w| w.method == "POST" && w.path == "/Groups" && w.status == 201)
        .count();
    assert_eq!(group_posts, 20);
    // At most the killed daemon's in-flight objects were sent again (each answered 409, adopted).
    let conflicts = writes.iter().filter(|w| w.status == 409).count();
    println!("objects the killed daemon had in flight, re-sent and adopted: {conflicts}");
    assert!(conflicts <= 100, "{conflicts} conflicts");

    // SIGTERM: C exits 0 too, and no batch is left claimed.
    sigterm(&mut c).await;
    assert_eq!(env.store.claimed_jobs().await.expect("jobs"), 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_one_run_without_writing_twice_and_the_cron_fires_once() {
    let test = "two_daemons_share_one_run";
    let Some(env) = Env::new(Db::Postgres, test).await else {
        return;
    };
    env.import(&jsonl(&sample(2000, 20, 10))).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Every 3 seconds, in both processes.
    let cfg = write_config(dir.path(), &env.db_url, &env.sandbox.url, "*/3 * * * * *");
    let mut a = spawn_daemon(&cfg);
    let mut b = spawn_daemon(&cfg);
    let store = env.store.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = runs(&store).await;
        if env.sandbox.users().len() == 2000
            && r.len() >= 3
            && r.iter().all(|r| r.status != "running")
        {
            break;
        }
        assert!(Instant::now() < deadline, "runs: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sigterm(&mut a).await;
    sigterm(&mut b).await;
    let writes = env.sandbox.writes();
    let user_posts = writes
        .iter()
        .filter(|w| w.method == "POST" && w.path == "/Users")
        .count();
    assert_eq!(
        user_posts, 2000,
        "each user written once, by one of the two daemons"
    );
    assert_eq!(
        writes.iter().filter(|w| w.status >= 400).count(),
        0,
        "no conflict: nothing was sent twice"
    );
    // The cron fired in both processes every 3 s; each firing made at most one run.
    let r = runs(&store).await;
    let mut starts: Vec<i64> = r
        .iter()
        .filter(|r| r.trigger == "schedule")
        .map(|r| r.started_at / 1000)
        .collect();
    starts.sort();
    let before = starts.len();
    starts.dedup();
    assert_eq!(starts.len(), before, "two runs in one firing: {r:?}");
    assert!(
        r.iter()
            .filter(|r| r.trigger != "start")
            .all(|r| r.created == 0 || r.trigger == "schedule")
    );
    env.finish().await;
}

/// A run's batches are contiguous id ranges (after, until] of at most `batch_size` objects that
/// cover every object, the last open-ended; users first, then groups, then deprovisioning.
async fn run_batches_cover_the_directory_in_ranges(db: Db) {
    let Some(env) = Env::new(db, "run_batches_ranges").await else {
        return;
    };
    let mut imported = 0;
    for (i, n) in [0usize, 1, 100, 200, 250].into_iter().enumerate() {
        let lines: String = (imported..n)
            .map(|u| {
                format!("{{\"kind\":\"user\",\"id\":\"u-{u:03}\",\"username\":\"user{u:03}\"}}\n")
            })
            .collect();
        env.import(&lines).await;
        imported = n;
        let target = format!("t{i}");
        let (run, _) = env
            .store
            .start_run_with_jobs(&target, "test", 100)
            .await
            .expect("run");
        let mut jobs = Vec::new();
        while let Some(job) = env
            .store
            .claim_job("test", 60_000, Some(run))
            .await
            .expect("claim")
        {
            assert!(
                env.store
                    .finish_job(job.id, "test", &serde_json::json!({}))
                    .await
                    .expect("finish")
            );
            jobs.push(job);
        }
        let phases: Vec<i64> = jobs.iter().map(|j| j.phase).collect();
        let users: Vec<_> = jobs.iter().filter(|j| j.phase == 0).collect();
        assert_eq!(users.len(), n.div_ceil(100).max(1), "{n} users: {jobs:?}");
        assert_eq!(phases[users.len()..], [1, 2], "{n} users: {jobs:?}");
        // Contiguous, starting at the beginning, the last one open-ended.
        assert_eq!(users[0].after_id, "");
        assert_eq!(users[users.len() - 1].until_id, None);
        for pair in users.windows(2) {
            assert_eq!(pair[0].until_id.as_deref(), Some(pair[1].after_id.as_str()));
        }
        // Every user in exactly one range, at most 100 in each.
        let ids: Vec<String> = (0..n).map(|u| format!("u-{u:03}")).collect();
        for job in &users {
            let inside = ids
                .iter()
                .filter(|id| {
                    id.as_str() > job.after_id.as_str()
                        && job
                            .until_id
                            .as_deref()
                            .is_none_or(|until| id.as_str() <= until)
                })
                .count();
            assert!(inside <= 100, "{n} users: {inside} in {job:?}");
            assert!(n == 0 || inside > 0, "{n} users: empty {job:?}");
        }
    }
    env.finish().await;
}

on_both_databases!(run_batches_cover_the_directory_in_ranges);

/// A daemon starting for the first time while a full sync is going (started elsewhere, part
/// of it worked) consumes the events from where that run began, not from the stream's end: a
/// change made after a worked batch read its object still reaches the target.
async fn first_start_joining_a_run_sends_what_its_worked_batches_missed(db: Db) {
    let Some(env) = Env::new(db, "first_start_joins_run").await else {
        return;
    };
    env.import("{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\"}").await;
    let (run, created) = env
        .store
        .start_run_with_jobs("sandbox", "test", 100)
        .await
        .expect("run");
    assert!(created);
    // Another process works the users' batch, then stops before the rest.
    let engine = env
        .engine(scimsync::sync::SyncOptions {
            batch_size: 100,
            ..Default::default()
        })
        .await;
    let job = env
        .store
        .claim_job("other", 60_000, Some(run))
        .await
        .expect("claim")
        .expect("the users' batch");
    assert_eq!(job.phase, 0);
    engine
        .work_job(&job, "other", &scimsync::sync::NoProgress, None)
        .await
        .expect("batch");
    assert_eq!(
        env.remote_user("alice").expect("alice")["displayName"],
        "Alice"
    );
    // It holds the groups' batch while a daemon starts, so the run is still going then.
    let groups = env
        .store
        .claim_job("other", 60_000, Some(run))
        .await
        .expect("claim")
        .expect("the groups' batch");
    assert_eq!(groups.phase, 1);
    // A change after the users' batch read alice.
    env.import(
        "{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice Renamed\"}",
    )
    .await;

    let url = env.db_url.clone();
    let d = start(&env, &url);
    until("the rename", || {
        env.remote_user("alice")
            .is_some_and(|u| u["displayName"] == "Alice Renamed")
    })
    .await;
    assert!(
        env.store
            .running_run("sandbox")
            .await
            .expect("query")
            .is_some()
    );
    engine
        .work_job(&groups, "other", &scimsync::sync::NoProgress, None)
        .await
        .expect("batch");
    until_no_run(&env.store, "the joined run did not finish").await;
    // It joined that run rather than starting another.
    assert_eq!(runs(&env.store).await.len(), 1);
    d.stop().await;
    env.finish().await;
}

on_both_databases!(first_start_joining_a_run_sends_what_its_worked_batches_missed);

/// The daemon's workers, too, wait for a settling pass before they claim: in a no-op run of
/// 60 users' batches on four workers at most one batch a worker is worked, the rest settled.
async fn daemon_workers_wait_for_the_settling_pass(db: Db) {
    let Some(env) = Env::new(db, "daemon_waits_for_settling").await else {
        return;
    };
    let opts = crate::revisions::import_sixty_batches(&env).await;
    let s = env.sync_with(opts.clone()).await;
    assert_eq!((s.created, s.failed), (118, 0), "{s:?}");
    for _ in 0..3 {
        env.store
            .start_run_with_jobs("sandbox", "test", opts.batch_size)
            .await
            .expect("run");
        let mut cfg = config(&env, &env.db_url, NEVER);
        cfg.worker.workers = opts.workers;
        let d = start_with(&env, cfg);
        until_no_run(&env.store, "the no-op run did not finish").await;
        d.stop().await;
        crate::revisions::assert_settled_but_one_batch_a_worker(&env).await;
    }
    env.finish().await;
}

on_both_databases!(daemon_workers_wait_for_the_settling_pass);

/// PostgreSQL hands out event numbers when events are written, not when they commit: a host
/// transaction that wrote first and commits last must not be skipped by a consumer that
/// already read the later event. Events wait behind the older transaction still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_after_a_newer_one_is_not_lost() {
    let test = "event_committed_late";
    let Some(env) = Env::new(Db::Postgres, test).await else {
        return;
    };
    env.import("{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"alice\",\"name\":\"Alice\"}\n{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\",\"name\":\"Bob\"}").await;
    let url = env.db_url.clone();
    let d = start(&env, &url);
    until("the first full sync", || env.sandbox.users().len() == 2).await;
    until_no_run(&env.store, "run did not finish").await;

    // A host transaction writes alice first (the lower event number) and stays open...
    use sqlx::Connection;
    let mut host = sqlx::PgConnection::connect(&url).await.expect("connect");
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut host)
        .await
        .expect("pid");
    sqlx::query("BEGIN")
        .execute(&mut host)
        .await
        .expect("begin");
    sqlx::query("UPDATE users SET name = 'Alice Late' WHERE id = 'u-1'")
        .execute(&mut host)
        .await
        .expect("update");
    // ...while bob's change commits after it, with the higher number.
    env.import("{\"kind\":\"user\",\"id\":\"u-2\",\"username\":\"bob\",\"name\":\"Bob Early\"}")
        .await;
    // Ten poll intervals: bob's event waits behind the open transaction.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.remote_user("bob").expect("bob")["displayName"], "Bob");
    assert!(env.store.backlog("sandbox").await.expect("backlog").0 >= 1);
    // What the daemon names when events wait long: the open transaction (other tests'
    // transactions on the same server may be older for a moment).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let by = env.store.oldest_writer(0).await.expect("query");
        if by
            .as_deref()
            .is_some_and(|b| b.contains(&format!("backend {pid} ")))
        {
            let by = by.unwrap_or_default();
            assert!(by.contains("idle in transaction"), "{by}");
            assert!(by.contains("UPDATE users SET name"), "{by}");
            break;
        }
        assert!(Instant::now() < deadline, "not named: {by:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.store.oldest_writer(3600).await.expect("query"), None);
    sqlx::query("COMMIT")
        .execute(&mut host)
        .await
        .expect("commit");
    until("both changes", || {
        env.remote_user("alice")
            .is_some_and(|u| u["displayName"] == "Alice Late")
            && env
                .remote_user("bob")
                .is_some_and(|u| u["displayName"] == "Bob Early")
    })
    .await;
    let _ = host.close().await;
    d.stop().await;
    env.finish().await;
}
