//! `scimsync run`: the change-event consumer, the scheduled full sync, the batch-job workers,
//! `/healthz`, `/readyz`, `/metrics`, and a graceful stop.
//!
//! Several processes may share one PostgreSQL database: each target's events are consumed by
//! whichever process holds the target's lease, full-sync batches are claimed with leases
//! (`FOR UPDATE SKIP LOCKED`), and a scheduled full sync is created once per firing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TargetConfig};
use crate::directory::Kind;
use crate::mapping::LiveMappings;
use crate::store::Store;
use crate::sync::{Action, Engine, NoProgress, SyncOptions};
use crate::target::TargetClient;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("target {target:?}: {message}")]
    Target { target: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Events read per round; a round's objects are coalesced (one sync per object).
const EVENTS_PER_ROUND: i64 = 1000;

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .clone()
}

struct Shared {
    store: Store,
    cfg: Config,
    engines: HashMap<String, Arc<Engine>>,
    holder: String,
    cancel: CancellationToken,
}

/// Runs until `cancel` fires, then stops claiming, lets in-flight work finish within
/// `worker.shutdown_timeout` (or hands it back), and returns.
pub async fn run(cfg: Config, store: Store, cancel: CancellationToken) -> Result<(), DaemonError> {
    let listener = tokio::net::TcpListener::bind(cfg.worker.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: cfg.worker.listen,
            source,
        })?;
    run_on(cfg, store, cancel, listener).await
}

/// `run`, serving HTTP on a listener the caller bound.
pub async fn run_on(
    cfg: Config,
    store: Store,
    cancel: CancellationToken,
    listener: tokio::net::TcpListener,
) -> Result<(), DaemonError> {
    let metrics = metrics_handle();
    let holder = format!(
        "{}-{}-{}",
        hostname(),
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let mut engines = HashMap::new();
    for t in &cfg.targets {
        engines.insert(t.name.clone(), Arc::new(engine_for(&store, &cfg, t).await?));
    }
    let shared = Arc::new(Shared {
        store,
        cfg,
        engines,
        holder,
        cancel,
    });
    tracing::info!(holder = %shared.holder, targets = shared.engines.len(), "scimsync daemon starting");

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(serve_http(shared.clone(), listener, metrics));
    for t in shared.cfg.targets.iter() {
        tasks.spawn(consume_events(shared.clone(), t.name.clone()));
    }
    for n in 0..shared.cfg.worker.workers {
        tasks.spawn(work_jobs(shared.clone(), n));
    }
    let scheduler = schedule(shared.clone()).await?;
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a daemon task ended abnormally");
        }
    }
    if let Some(mut s) = scheduler {
        let _ = s.shutdown().await;
    }
    tracing::info!("scimsync daemon stopped");
    Ok(())
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

async fn engine_for(store: &Store, cfg: &Config, t: &TargetConfig) -> Result<Engine, DaemonError> {
    let err = |message: String| DaemonError::Target {
        target: t.name.clone(),
        message,
    };
    let mappings = LiveMappings::load(&t.mappings).map_err(|e| err(e.to_string()))?;
    let client = TargetClient::new(t).map_err(|e| err(e.to_string()))?;
    let opts = SyncOptions {
        batch_size: cfg.worker.batch_size,
        trigger: "schedule".into(),
        job_lease_ms: i64::try_from(cfg.worker.job_lease.0.saturating_mul(1000))
            .unwrap_or(i64::MAX),
        ..Default::default()
    };
    Ok(Engine::new(
        store.clone(),
        Arc::new(client),
        t.clone(),
        Arc::new(mappings),
        opts,
    )
    .await)
}

/// Fires the full sync on `worker.full_sync_cron`; every process fires, one run is created per
/// firing (a lease named after the firing second), and none while one is running.
async fn schedule(
    shared: Arc<Shared>,
) -> Result<Option<tokio_cron_scheduler::JobScheduler>, DaemonError> {
    use tokio_cron_scheduler::{Job, JobScheduler};
    let sched = JobScheduler::new()
        .await
        .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
    let cron = shared.cfg.worker.full_sync_cron.clone();
    let s = shared.clone();
    let job = Job::new_async(cron.as_str(), move |_, _| {
        let s = s.clone();
        Box::pin(async move {
            let slot = crate::store::now_ms() / 1000;
            for t in &s.cfg.targets {
                start_full_sync(&s, &t.name, "schedule", Some(slot)).await;
            }
        })
    })
    .map_err(|e| DaemonError::Scheduler(format!("worker.full_sync_cron {cron:?}: {e}")))?;
    sched
        .add(job)
        .await
        .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
    sched
        .start()
        .await
        .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
    Ok(Some(sched))
}

/// Starts a full sync of `target`, or joins the one running; the run's id, None when another
/// process fired this schedule slot or the run could not be started (logged).
async fn start_full_sync(
    s: &Shared,
    target: &str,
    trigger: &str,
    slot: Option<i64>,
) -> Option<i64> {
    if let Some(slot) = slot {
        let name = format!("cron:{target}:{slot}");
        match s.store.try_lease(&name, &s.holder, 86_400_000).await {
            Ok(true) => {}
            Ok(false) => return None, // another process fired this one
            Err(e) => {
                tracing::error!(target = %target, error = %e, "cannot take the schedule lease");
                return None;
            }
        }
    }
    match s
        .store
        .start_run_with_jobs(target, trigger, s.cfg.worker.batch_size)
        .await
    {
        Ok((id, true)) => {
            tracing::info!(target = %target, run = id, "full sync started");
            Some(id)
        }
        Ok((id, false)) => {
            tracing::info!(target = %target, run = id, "full sync already running; not starting another");
            Some(id)
        }
        Err(e) => {
            tracing::error!(target = %target, error = %e, "cannot start a full sync");
            None
        }
    }
}

/// Claims full-sync batches (of any target, any process's run) until stopped.
async fn work_jobs(s: Arc<Shared>, n: usize) {
    let holder = format!("{}-w{n}", s.holder);
    let idle = Duration::from_millis(s.cfg.worker.event_poll_interval_ms.max(50));
    let lease = s
        .engines
        .values()
        .next()
        .map_or(crate::sync::JOB_LEASE_MS, |_| {
            i64::try_from(s.cfg.worker.job_lease.0.saturating_mul(1000)).unwrap_or(i64::MAX)
        });
    while !s.cancel.is_cancelled() {
        // This process's claim turn of every target (in the map's one order, so workers never
        // wait on each other crosswise): not while one of them settles its quiet batches, as
        // the job claimed could be one that pass is about to settle (see `Engine::claim_turn`).
        let mut turns = Vec::with_capacity(s.engines.len());
        for (name, engine) in &s.engines {
            turns.push((name, engine.claim_turn().await));
        }
        let claimed = s.store.claim_job(&holder, lease, None).await;
        // A job that opens a phase keeps its target's turn until its settling pass is done.
        let turn = match &claimed {
            Ok(Some(job)) => turns
                .into_iter()
                .find(|(name, _)| **name == job.target)
                .and_then(|(_, turn)| turn.keep_for(Some(job))),
            _ => None,
        };
        let job = match claimed {
            Ok(Some(j)) => j,
            Ok(None) => {
                tokio::select! {
                    _ = s.cancel.cancelled() => break,
                    _ = tokio::time::sleep(idle) => continue,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot claim a job");
                tokio::select! {
                    _ = s.cancel.cancelled() => break,
                    _ = tokio::time::sleep(idle * 4) => continue,
                }
            }
        };
        let Some(engine) = s.engines.get(&job.target) else {
            // A target no longer configured here: let a process that knows it take the job.
            let _ = s.store.release_job(job.id, &holder).await;
            tokio::time::sleep(idle).await;
            continue;
        };
        tracing::debug!(target = %job.target, job = job.id, phase = job.phase, "job claimed");
        let work = engine.work_job(&job, &holder, &NoProgress, turn);
        tokio::pin!(work);
        let result = tokio::select! {
            r = &mut work => r,
            _ = s.cancel.cancelled() => {
                let grace = Duration::from_secs(s.cfg.worker.shutdown_timeout.0);
                match tokio::time::timeout(grace, &mut work).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(target = %job.target, job = job.id, "shutdown: handing the unfinished batch back");
                        let _ = s.store.release_job(job.id, &holder).await;
                        break;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::error!(target = %job.target, job = job.id, error = %e, "job failed; its lease will expire and it will be retried");
        }
    }
}

/// Consumes `target`'s change events while this process holds the target's event lease.
async fn consume_events(s: Arc<Shared>, target: String) {
    let Some(engine) = s.engines.get(&target).cloned() else {
        return;
    };
    let lease_name = format!("events:{target}");
    let lease_ms = i64::try_from(s.cfg.worker.job_lease.0.saturating_mul(1000)).unwrap_or(30_000);
    let poll = Duration::from_millis(s.cfg.worker.event_poll_interval_ms);
    let mut wake = s.store.event_notifications().await;
    // Events left after a round are held back by an older transaction still running
    // (PostgreSQL; its commit may not notify): look again soon, less often while it lasts.
    let mut held = HELD_FIRST;
    // Since when events have been left after every round, and whether that was logged.
    let mut held_since: Option<Instant> = None;
    let mut warned = false;
    while !s.cancel.is_cancelled() {
        let mut pause = poll;
        match s.store.try_lease(&lease_name, &s.holder, lease_ms).await {
            Ok(true) => match consume_round(&s, &engine, &target).await {
                Ok(true) => {
                    pause = held.min(poll);
                    held = (held * 2).min(poll);
                    let since = *held_since.get_or_insert_with(Instant::now);
                    if !warned && since.elapsed() >= HELD_WARN {
                        warned = warn_held_back(&s, &target, since).await;
                    }
                }
                Ok(false) => {
                    if warned {
                        tracing::info!(target = %target, "change events are read again");
                    }
                    held = HELD_FIRST;
                    held_since = None;
                    warned = false;
                }
                Err(e) => {
                    tracing::error!(target = %target, error = %e, "event round failed; retrying");
                }
            },
            Ok(false) => {} // another process consumes this target's events
            Err(e) => tracing::error!(target = %target, error = %e, "cannot take the event lease"),
        }
        tokio::select! {
            _ = s.cancel.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
            _ = async {
                match wake.as_mut() {
                    Some(l) => { let _ = l.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    let _ = s.store.release_lease(&lease_name, &s.holder).await;
}

/// The first wait for events an older transaction holds back.
const HELD_FIRST: Duration = Duration::from_millis(10);
/// Held back this long, by a transaction open at least as long: say which.
const HELD_WARN: Duration = Duration::from_secs(30);

/// Logs the transaction that holds `target`'s events back, if one has been open since they
/// have been; true once said.
async fn warn_held_back(s: &Shared, target: &str, since: Instant) -> bool {
    let secs = i64::try_from(since.elapsed().as_secs()).unwrap_or(i64::MAX);
    match s.store.oldest_writer(secs).await {
        Ok(Some(by)) => {
            tracing::warn!(target = %target, held_secs = secs, "change events wait behind {by}: events are read in commit-safe order, so the ones committed after it began are read once it ends");
            true
        }
        Ok(None) => false,
        Err(e) => {
            tracing::debug!(target = %target, error = %e, "cannot tell which transaction holds events back");
            false
        }
    }
}

/// One round: read new events, sync each changed object once, then move the position. True
/// when committed events are left that could not be read yet.
async fn consume_round(
    s: &Shared,
    engine: &Engine,
    target: &str,
) -> Result<bool, crate::sync::SyncError> {
    let store = &s.store;
    let mut cursor = match store.cursor(target).await? {
        Some(c) => c,
        None => {
            // First start for this target: what happened before is a full sync's to do. The
            // events are consumed from where that run's view of the directory begins, not from
            // the stream's end: a run already going may have worked a batch before a change
            // whose event is older than now. Not started (logged): the next round tries again.
            let Some(run) = start_full_sync(s, target, "start", None).await else {
                return Ok(false);
            };
            let from = match store.run_events_position(run).await? {
                Some(p) => p,
                // A run from before positions were recorded: from now on, as before.
                None => store.events_head().await?,
            };
            store.set_cursor(target, from).await?;
            from
        }
    };
    loop {
        let events = store.events_after(cursor, EVENTS_PER_ROUND).await?;
        let Some(last) = events.last().map(|e| e.0) else {
            break;
        };
        let mut users = BTreeSet::new();
        let mut groups = BTreeSet::new();
        for (_, kind, id, _) in &events {
            if kind == "group" {
                groups.insert(id.clone());
            } else {
                users.insert(id.clone());
            }
        }
        tracing::debug!(target = %target, events = events.len(), users = users.len(), groups = groups.len(), "consuming events");
        // Users first: a group's new member must exist on the target before the group names it.
        for (kind, ids) in [(Kind::User, users), (Kind::Group, groups)] {
            let ids = hold_mass_deletions(s, engine, target, kind, ids).await?;
            let reports: Vec<_> = futures::stream::iter(ids)
                .map(|id| async move { engine.sync_one(kind, &id).await })
                .buffer_unordered(engine.concurrency())
                .collect()
                .await;
            for r in reports {
                let r = r?;
                if r.action == Action::Failed {
                    tracing::info!(target = %target, kind = %r.kind, id = %r.id, error = %r.detail, "object failed; retry scheduled");
                }
            }
        }
        // Only now, with every object synced or recorded as failed, does the position move.
        store.set_cursor(target, last).await?;
        cursor = last;
        if s.cancel.is_cancelled() {
            break;
        }
    }
    engine.record_health().await;
    // Failed objects whose retry is due.
    for (kind, id) in store.due_retries(target, 100).await? {
        engine.sync_one(kind, &id).await?;
    }
    let (backlog, oldest) = store.backlog(target).await?;
    metrics::gauge!("scimsync_event_backlog", "target" => target.to_string()).set(backlog as f64);
    let age = oldest.map_or(0.0, |t| (crate::store::now_ms() - t).max(0) as f64 / 1000.0);
    metrics::gauge!("scimsync_event_oldest_age_seconds", "target" => target.to_string()).set(age);
    Ok(backlog > 0)
}

/// Removes from `ids` the deletions that would trip the target's deletion guard if sent one by
/// one from events; they wait for the full sync, whose guard says why.
async fn hold_mass_deletions(
    s: &Shared,
    engine: &Engine,
    target: &str,
    kind: Kind,
    ids: BTreeSet<String>,
) -> Result<Vec<String>, crate::sync::SyncError> {
    let mut keep = Vec::with_capacity(ids.len());
    let mut gone = Vec::new();
    for id in ids {
        if s.store.exists(kind, &id).await? {
            keep.push(id);
        } else {
            gone.push(id);
        }
    }
    if gone.is_empty() {
        return Ok(keep);
    }
    let provisioned = s.store.count_provisioned(target).await? as u64;
    if engine.deletions_allowed(gone.len() as u64, provisioned) {
        keep.extend(gone);
    } else {
        tracing::warn!(target = %target, %kind, count = gone.len(), "too many deletions at once for the deletion guard; leaving them to the full sync");
    }
    Ok(keep)
}

async fn serve_http(
    s: Arc<Shared>,
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
) {
    use axum::routing::get;
    let ready = s.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let s = ready.clone();
                async move { readyz(&s).await }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.map(|h| h.render()).unwrap_or_default() }
            }),
        );
    let cancel = s.cancel.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        cancel.cancelled().await;
    });
    if let Err(e) = server.await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

async fn readyz(s: &Shared) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let db = s.store.count(Kind::User).await;
    let mut targets = serde_json::Map::new();
    for name in s.engines.keys() {
        let (backlog, _) = s.store.backlog(name).await.unwrap_or((-1, None));
        let failing = s
            .store
            .failing(Some(name))
            .await
            .map(|f| f.len() as i64)
            .unwrap_or(-1);
        let healthy = s.engines.get(name).is_some_and(|e| !e.target_unhealthy());
        targets.insert(
            name.clone(),
            json!({"healthy": healthy, "event_backlog": backlog, "failing_objects": failing}),
        );
    }
    let ok = db.is_ok();
    let status = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "database": if ok { "ok".to_string() } else { db.err().map(|e| e.to_string()).unwrap_or_default() },
            "targets": targets,
        })),
    )
}
