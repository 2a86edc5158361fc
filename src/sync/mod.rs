//! The sync engine: scope → mapping → validation → diff against what was last sent → the
//! requests that make the target match, and the record of what happened.
//!
//! A full sync pushes users, then groups, in keyset batches, then deprovisions what left the
//! directory or the target's scope, unless the run was not clean or the deletion guard holds.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::config::{OnDelete, SchemaCheck, TargetConfig};
use crate::directory::{Group, Kind, User, hash_json};
use crate::mapping::{LiveMappings, MapOutcome, TargetInfo};
use crate::scim::{self, PatchOperation};
use crate::target::Profile;

mod census;
mod discover;
mod ops;

/// A full sync looks for states whose directory object is gone (orphans) only when something
/// left the directory since its last check that found none, or when that check is older than
/// this: a backstop for a state written after the check for an object deleted before it (the
/// event consumer deprovisions those on the deletion's event).
pub const ORPHAN_CHECK_MAX_AGE_MS: i64 = 24 * 3600 * 1000;

/// How long a claimed job stays claimed without renewal by default (renewed every third).
pub const JOB_LEASE_MS: i64 = 30_000;

/// Where a run keeps the objects that leave the target until its deprovisioning.
enum Leaving {
    /// Dry runs: nothing may be written.
    Memory {
        list: Vec<(Kind, String, SyncState)>,
        users: HashSet<String>,
    },
    /// Real runs: marked in sync_state, visible to the run's later jobs in any process.
    Store,
}

use crate::store::{
    GroupRev, Job, Member, QuietCheck, RunCounts, Scanned, Source, StateWrite, Store, StoreError,
    SyncState, Synced,
};
use crate::target::{Effective, TargetClient, TargetError, UserRemoval, endpoint};
pub use discover::discover;
use ops::{MemberPolicy, patch_requests};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    pub dry_run: bool,
    pub allow_deletions: bool,
    pub batch_size: u32,
    /// Record each step of each object (for `sync --user/--group`).
    pub trace: bool,
    /// What started the run, for the run record ("cli", "schedule", ...).
    pub trigger: String,
    /// How long a claimed batch job stays claimed without renewal (0: the default).
    pub job_lease_ms: i64,
    /// Batches of a full sync worked at the same time by this process (0: 4).
    pub workers: usize,
}

/// A request a dry run would have sent.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct PlannedRequest {
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Created,
    Updated,
    Unchanged,
    Deleted,
    Skipped,
    Failed,
    /// In the directory but out of the target's scope, and provisioned: to deprovision.
    OutOfScope,
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Created => "created",
        Action::Updated => "updated",
        Action::Unchanged => "unchanged",
        Action::Deleted => "deleted",
        Action::Skipped => "skipped",
        Action::Failed => "failed",
        Action::OutOfScope => "out_of_scope",
    }
}

/// What happened to one object.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectReport {
    pub kind: Kind,
    pub id: String,
    pub action: Action,
    pub detail: String,
    pub steps: Vec<String>,
    pub planned: Vec<PlannedRequest>,
    #[serde(skip)]
    state: Option<SyncState>,
    /// State changes not yet recorded: the batch records them together.
    #[serde(skip)]
    writes: Vec<StateWrite>,
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The result of one full sync of one target (or of one of its batches).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunSummary {
    pub target: String,
    pub run_id: Option<i64>,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub skipped: i64,
    pub failed: i64,
    pub requests: u64,
    pub writes: u64,
    /// Why deprovisioning was held back, if it was.
    pub held_back: Option<String>,
    /// Things an operator should know about this run that are not failures.
    pub notes: Vec<String>,
    pub failures: Vec<(String, String, String)>,
    pub planned: Vec<PlannedRequest>,
}

impl RunSummary {
    pub fn is_clean(&self) -> bool {
        self.failed == 0 && self.held_back.is_none()
    }

    fn add(&mut self, r: ObjectReport) {
        match r.action {
            Action::Created => self.created += 1,
            Action::Updated => self.updated += 1,
            Action::Unchanged => self.unchanged += 1,
            Action::Deleted => self.deleted += 1,
            Action::Skipped => self.skipped += 1,
            Action::OutOfScope => {}
            Action::Failed => {
                self.failed += 1;
                self.failures
                    .push((r.kind.to_string(), r.id.clone(), r.detail.clone()));
            }
        }
        self.planned.extend(r.planned);
    }

    /// Adds the result of one batch of the same run.
    fn merge(&mut self, p: RunSummary) {
        self.created += p.created;
        self.updated += p.updated;
        self.unchanged += p.unchanged;
        self.deleted += p.deleted;
        self.skipped += p.skipped;
        self.failed += p.failed;
        self.requests += p.requests;
        self.writes += p.writes;
        if p.held_back.is_some() {
            self.held_back = p.held_back;
        }
        self.notes.extend(p.notes);
        self.failures.extend(p.failures);
        self.planned.extend(p.planned);
    }

    fn counts(&self) -> RunCounts {
        RunCounts {
            created: self.created,
            updated: self.updated,
            unchanged: self.unchanged,
            deleted: self.deleted,
            skipped: self.skipped,
            failed: self.failed,
            requests: self.requests as i64,
        }
    }
}

/// Progress callbacks, so the CLI can draw bars without the engine knowing about terminals.
pub trait Progress: Send + Sync {
    fn phase(&self, target: &str, phase: &str, total: u64);
    fn advance(&self, n: u64);
    fn done(&self);
    /// Whether `phase` needs its total: counting a table of 100,000 users costs PostgreSQL
    /// about 35 ms a run, which a run nobody watches (the daemon's) spares.
    fn wants_totals(&self) -> bool {
        true
    }
}

pub struct NoProgress;
impl Progress for NoProgress {
    fn wants_totals(&self) -> bool {
        false
    }
    fn phase(&self, _: &str, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn done(&self) {}
}

/// The engine for one target.
pub struct Engine {
    store: Store,
    client: Arc<TargetClient>,
    cfg: TargetConfig,
    mappings: Arc<LiveMappings>,
    opts: SyncOptions,
    eff: Effective,
    profile: Profile,
    info: TargetInfo,
    /// The target's published schemas, when `schema_check` is on and they could be read.
    target_schemas: Option<scim::schema::TargetSchemas>,
    /// Schema-check warnings already logged, so each is logged once per run.
    warned: std::sync::Mutex<HashSet<String>>,
    /// The health last recorded (0 none, 1 healthy, 2 unhealthy).
    health_recorded: std::sync::atomic::AtomicU8,
    /// The target's settings fingerprint, part of every source hash.
    settings: String,
    /// See [`Engine::prefix`].
    prefix: std::sync::Mutex<Option<Prefix>>,
    /// The number of groups the target last reported in a census (u64::MAX: not read yet), so
    /// batches skip a census that would cost more than it saves without asking again.
    census_total: std::sync::atomic::AtomicU64,
    /// This process's turn to claim a job: held while claiming, and by the worker that
    /// claimed a phase's first batch until that batch has settled the phase's quiet batches,
    /// so the other workers wait for the settling pass instead of scanning, one batch at a
    /// time, batches it is about to settle in one pass (on PostgreSQL they claimed a third of
    /// a 100k no-op's batches meanwhile, slowing it).
    claims: Arc<tokio::sync::Mutex<()>>,
}

/// A process's turn to claim a job of a target (see [`Engine::claim_turn`]).
pub struct ClaimTurn {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl ClaimTurn {
    /// The turn, kept, when the job just claimed in it opens a phase (its settling pass comes
    /// before any other claim); otherwise it ends here.
    pub fn keep_for(self, claimed: Option<&Job>) -> Option<ClaimTurn> {
        claimed.filter(|j| Engine::opens_phase(j)).map(|_| self)
    }
}

/// The digest prefix of scripts and settings, for the scripts' version it was made from.
struct Prefix {
    version: String,
    digest: sha2::Sha256,
    fingerprint: String,
}

/// Per-object scratch: the trace and the requests a dry run would send.
#[derive(Default)]
struct Work {
    trace: bool,
    steps: Vec<String>,
    planned: Vec<PlannedRequest>,
    /// What the resource is made from (recorded with it, to skip it next time).
    source: Option<Source>,
    /// State changes for the batch to record once the object is done.
    writes: Vec<StateWrite>,
    /// The write-ahead record of this create was recorded with its batch's.
    attempt_recorded: bool,
}

impl Work {
    fn step(&mut self, f: impl FnOnce() -> String) {
        if self.trace {
            self.steps.push(f());
        }
    }
}

type Fail = String;

fn tfail(e: TargetError) -> Fail {
    e.to_string()
}

/// True when an object was sent and nothing it is made from changed since: the same revision
/// of its row (and scripts and settings), or a new revision with the same content.
fn unchanged_since_sent(status: &str, sent: bool, recorded: &RecordedSource, now: &Source) -> bool {
    status == "synced"
        && sent
        && (recorded.key == Some(now.key.as_str()) || recorded.hash == Some(now.hash.as_str()))
}

/// The fingerprint of scripts and settings from their digest prefix (see `Engine::prefix`).
fn fingerprint_of(prefix: sha2::Sha256) -> String {
    use sha2::Digest;
    crate::directory::hex_lower(&prefix.finalize()[..16])
}

/// What a state says its resource was made from.
struct RecordedSource<'a> {
    hash: Option<&'a str>,
    key: Option<&'a str>,
}

impl<'a> RecordedSource<'a> {
    fn of(s: &'a SyncState) -> Self {
        RecordedSource {
            hash: s.source_hash.as_deref(),
            key: s.source_key.as_deref(),
        }
    }

    /// True when exactly `now` is recorded (hash and key; None: neither).
    fn is(&self, now: Option<&Source>) -> bool {
        self.hash == now.map(|s| s.hash.as_str()) && self.key == now.map(|s| s.key.as_str())
    }
}

/// True when the target holds this resource (and these members, if given) as last sent.
fn sent_as(s: &SyncState, hash: &str, members: Option<&[String]>) -> bool {
    s.status == "synced"
        && s.resource_hash.as_deref() == Some(hash)
        && (members.is_none() || s.members.as_deref() == members)
}

/// Mapping a batch is CPU work on the one thread that also reads the answers of the other
/// batches' requests: let them in every few objects, so the target's concurrency stays busy.
async fn yield_sometimes(i: usize) {
    if i % 8 == 7 {
        tokio::task::yield_now().await;
    }
}

/// When the engine looks at the mappings folder for edits.
#[derive(Clone, Copy)]
enum Look {
    /// Now: a full sync's phase starts.
    Now,
    /// If the last look is `mapping::LOOK_EVERY` old: a batch or a change event.
    IfDue,
}

/// One object of a batch after the work that needs no I/O: either done (unchanged, skipped,
/// failed mapping) or ready to be sent.
enum Step {
    Done(ObjectReport),
    Send(Prepared),
}

/// An object mapped and validated (or a group whose members alone moved), ready to send.
struct Prepared {
    kind: Kind,
    id: String,
    w: Work,
    state: Option<SyncState>,
    plan: Plan,
}

/// A mapped resource with its content hash, and its JSON text written at most once: the
/// request body, the write-ahead record and the state record are the same text.
struct Desired {
    value: Value,
    hash: String,
    text: std::sync::OnceLock<String>,
}

impl Desired {
    fn new(value: Value, hash: String) -> Self {
        Desired {
            value,
            hash,
            text: std::sync::OnceLock::new(),
        }
    }

    fn text(&self) -> &str {
        self.text
            .get_or_init(|| crate::directory::json_text(&self.value))
    }
}

enum Plan {
    /// The mapped resource: create it, or bring the remote object to it.
    Resource {
        desired: Desired,
        members: Option<Vec<String>>,
    },
    /// A group that maps as before (remote id, the resource last sent and its hash): only its
    /// members are sent, from those last sent to these.
    Members {
        rid: String,
        last: Value,
        hash: String,
        prev: Option<Vec<String>>,
        members: Vec<String>,
    },
}

/// Whether an object with this state would be created for the first time: never sent, nor
/// attempted with a recorded resource.
fn first_create(state: Option<&SyncState>) -> bool {
    state.is_none_or(|s| s.remote_id.is_none() && s.last_resource.is_none())
}

impl Prepared {
    /// The write-ahead record this object needs before its POST, if it is a first create
    /// (one attempted before is looked for first, and recorded only then).
    fn attempt(&mut self) -> Option<StateWrite> {
        let Plan::Resource { desired, .. } = &self.plan else {
            return None;
        };
        if !first_create(self.state.as_ref()) {
            return None;
        }
        self.w.attempt_recorded = true;
        Some(StateWrite::attempt(self.kind, &self.id, desired.text()))
    }
}

impl Engine {
    /// Reads the target's capabilities once, then is ready to sync.
    pub async fn new(
        store: Store,
        client: Arc<TargetClient>,
        cfg: TargetConfig,
        mappings: Arc<LiveMappings>,
        opts: SyncOptions,
    ) -> Engine {
        let mut opts = opts;
        opts.dry_run |= cfg.dry_run;
        let eff = discover(&store, &client, &cfg, !opts.dry_run).await;
        let profile = client.profile.clone();
        let cfg_fingerprint = cfg.fingerprint();
        let target_schemas = match cfg.schema_check {
            SchemaCheck::Off => None,
            SchemaCheck::Warn | SchemaCheck::Strict => client.schemas().await,
        };
        let info = TargetInfo {
            name: cfg.name.clone(),
            compatibility: cfg.compatibility.to_string(),
        };
        if opts.batch_size == 0 {
            opts.batch_size = 100;
        }
        if opts.job_lease_ms <= 0 {
            opts.job_lease_ms = JOB_LEASE_MS;
        }
        if opts.workers == 0 {
            opts.workers = 4;
        }
        Engine {
            store,
            client,
            cfg,
            mappings,
            opts,
            eff,
            profile,
            info,
            target_schemas,
            warned: std::sync::Mutex::new(HashSet::new()),
            health_recorded: std::sync::atomic::AtomicU8::new(0),
            settings: cfg_fingerprint,
            prefix: std::sync::Mutex::new(None),
            census_total: std::sync::atomic::AtomicU64::new(u64::MAX),
            claims: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Picks up edited mapping scripts: at the start of a full sync's phase (`Look::Now`), and
    /// for batches and change events when the last look is `LOOK_EVERY` old (`Look::IfDue`).
    /// A broken edit keeps the last good version and is logged once.
    fn refresh_mappings(&self, look: Look) {
        let refreshed = match look {
            Look::Now => self.mappings.refresh(),
            Look::IfDue => self.mappings.refresh_due(),
        };
        match refreshed {
            Ok(true) => {
                tracing::info!(target = %self.cfg.name, "mapping scripts changed; reloaded")
            }
            Ok(false) => {}
            Err(e) => tracing::error!(
                target = %self.cfg.name,
                error = %e,
                "mapping scripts changed but do not compile; still using the last good version"
            ),
        }
    }

    /// Whether the target's circuit breaker holds requests back.
    pub fn target_unhealthy(&self) -> bool {
        self.client.unhealthy()
    }

    /// Stores the target's health for `status` and other processes when it changed.
    pub async fn record_health(&self) {
        let healthy = !self.client.unhealthy();
        let code = if healthy { 1 } else { 2 };
        if self
            .health_recorded
            .swap(code, std::sync::atomic::Ordering::Relaxed)
            == code
        {
            return;
        }
        let v = serde_json::json!({"healthy": healthy, "since": crate::store::now_ms()});
        if let Err(e) = self
            .store
            .cache_put(self.target(), "health", &self.cfg.fingerprint(), &v)
            .await
        {
            tracing::warn!(target = %self.cfg.name, error = %e, "cannot record target health");
        }
    }

    /// Objects synced at the same time against this target.
    pub fn concurrency(&self) -> usize {
        self.cfg.concurrency
    }

    /// Whether deprovisioning `deletions` objects now stays within the deletion guard.
    pub fn deletions_allowed(&self, deletions: u64, provisioned: u64) -> bool {
        self.opts.allow_deletions || self.cfg.max_deletions.allows(deletions, provisioned)
    }

    pub fn capabilities(&self) -> &Effective {
        &self.eff
    }

    /// PATCH unless the target lacks it (or refused it) and takes PUT for this kind.
    fn use_patch(&self, kind: Kind) -> bool {
        let put_allowed = match kind {
            Kind::User => self.eff.put_users,
            Kind::Group => self.eff.put_groups,
        } && !self.client.refused(kind, "PUT");
        let patch_allowed = self.eff.patch && !self.client.refused(kind, "PATCH");
        patch_allowed || !put_allowed
    }

    fn target(&self) -> &str {
        &self.cfg.name
    }

    /// One full sync: users, groups, then deprovisioning. A real run is a run record made of
    /// batch jobs in the database, worked here (and by any daemon sharing the database) until
    /// it is complete; a dry run goes through the same phases in memory and records nothing.
    pub async fn full_sync(&self, progress: &dyn Progress) -> Result<RunSummary, SyncError> {
        if self.opts.dry_run {
            return self.dry_full_sync(progress).await;
        }
        let (run_id, _) = self
            .store
            .start_run_with_jobs(self.target(), &self.opts.trigger, self.opts.batch_size)
            .await?;
        let holder = format!(
            "cli-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        // Several batches at once: while one batch waits for its slowest request, the next
        // keeps the target's concurrency busy.
        let phase = std::sync::Mutex::new(-1);
        let finished = tokio::sync::Notify::new();
        let workers = (0..self.opts.workers.max(1)).map(|i| {
            let holder = format!("{holder}-{i}");
            let (phase, finished) = (&phase, &finished);
            async move {
                self.work_run(run_id, &holder, progress, phase, finished)
                    .await
            }
        });
        futures::future::try_join_all(workers).await?;
        progress.done();
        self.record_health().await;
        self.run_summary(run_id).await
    }

    /// This process's turn to claim a job of this engine's target (see `claims`): to hold
    /// while claiming, then to pass to [`Engine::work_job`] with the job when it
    /// [opens a phase](Engine::opens_phase), so no other claim comes before its settling pass.
    pub async fn claim_turn(&self) -> ClaimTurn {
        ClaimTurn {
            _held: self.claims.clone().lock_owned().await,
        }
    }

    /// Whether `job` is its phase's first batch of users or groups, the one that settles the
    /// phase's quiet batches.
    fn opens_phase(job: &Job) -> bool {
        job.after_id.is_empty() && job.phase < 2
    }

    /// One of this process's workers on a run: claims and works its jobs until none is left.
    /// A job's result is recorded in the same transaction that claims the next one.
    async fn work_run(
        &self,
        run_id: i64,
        holder: &str,
        progress: &dyn Progress,
        phase: &std::sync::Mutex<i64>,
        finished: &tokio::sync::Notify,
    ) -> Result<(), SyncError> {
        let lease = self.opts.job_lease_ms;
        // The job the last result's transaction claimed; when none, an ordinary claim looks
        // for the next phase's first job or one whose lease expired.
        let mut next = None;
        // Armed before each ordinary claim: `notify_waiters` keeps no permit, so a job that
        // finished between a fruitless claim and the wait below would otherwise leave this
        // worker asleep for the whole timeout (at a phase's start, with the next phase's
        // jobs ready).
        let mut woken = std::pin::pin!(finished.notified());
        loop {
            let (claimed, turn) = match next.take() {
                Some(claimed) => claimed,
                None => {
                    woken.set(finished.notified());
                    woken.as_mut().enable();
                    let turn = self.claim_turn().await;
                    let job = self.store.claim_job(holder, lease, Some(run_id)).await?;
                    let turn = turn.keep_for(job.as_ref());
                    (job, turn)
                }
            };
            let Some(job) = claimed else {
                if !self.store.run_has_open_jobs(run_id).await? {
                    return Ok(());
                }
                // The rest is held by this process's other workers (the next phase waits for
                // them) or by other processes; a dead one's lease expires and its job comes
                // back.
                let _ = tokio::time::timeout(Duration::from_millis(200), woken.as_mut()).await;
                continue;
            };
            let new_phase = {
                let mut p = phase.lock().unwrap_or_else(|e| e.into_inner());
                let new = job.phase > *p;
                if new {
                    *p = job.phase;
                }
                new
            };
            if new_phase {
                let (name, kind) = match job.phase {
                    0 => ("users", Some(Kind::User)),
                    1 => ("groups", Some(Kind::Group)),
                    _ => ("deprovision", None),
                };
                let total = match kind {
                    Some(kind) if progress.wants_totals() => self.store.count(kind).await? as u64,
                    _ => 0,
                };
                progress.phase(self.target(), name, total);
            }
            let worked = async {
                let result = self.run_leased(&job, holder, progress, turn).await?;
                let turn = self.claim_turn().await;
                let (recorded, claimed) = self
                    .store
                    .finish_and_claim(&job, holder, &result, lease)
                    .await?;
                let turn = turn.keep_for(claimed.as_ref());
                if !recorded {
                    self.taken_over(&job);
                }
                if claimed.is_none() {
                    self.close_if_complete(job.run_id).await?;
                }
                Ok::<_, SyncError>(Some((claimed, turn)))
            }
            .await;
            finished.notify_waiters();
            next = worked?;
        }
    }

    /// The summary of a run from its jobs' results (and its record once complete).
    pub async fn run_summary(&self, run_id: i64) -> Result<RunSummary, SyncError> {
        let (_, results) = self.store.run_progress(run_id).await?;
        let mut summary = RunSummary {
            target: self.target().to_string(),
            run_id: Some(run_id),
            ..Default::default()
        };
        for r in results {
            if let Ok(part) = serde_json::from_value::<RunSummary>(r) {
                summary.merge(part);
            }
        }
        Ok(summary)
    }

    /// Runs one claimed job, keeping its lease alive, and closes the run after its last job.
    /// `turn`: the claim turn the job was claimed in, when it opens a phase (see
    /// [`Engine::claim_turn`]); released once its settling pass is done.
    pub async fn work_job(
        &self,
        job: &Job,
        holder: &str,
        progress: &dyn Progress,
        turn: Option<ClaimTurn>,
    ) -> Result<(), SyncError> {
        let result = self.run_leased(job, holder, progress, turn).await?;
        if !self.store.finish_job(job.id, holder, &result).await? {
            self.taken_over(job);
            return Ok(());
        }
        self.close_if_complete(job.run_id).await
    }

    /// Runs one claimed job while a task keeps renewing its lease; returns the result to
    /// record.
    async fn run_leased(
        &self,
        job: &Job,
        holder: &str,
        progress: &dyn Progress,
        turn: Option<ClaimTurn>,
    ) -> Result<Value, SyncError> {
        let lease = self.opts.job_lease_ms;
        let renew = {
            let store = self.store.clone();
            let holder = holder.to_string();
            let id = job.id;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis((lease / 3).max(1) as u64)).await;
                    if !matches!(store.renew_job(id, &holder, lease).await, Ok(true)) {
                        break;
                    }
                }
            })
        };
        let result = self.run_job(job, progress, turn).await;
        renew.abort();
        Ok(serde_json::to_value(&result?).unwrap_or(Value::Null))
    }

    fn taken_over(&self, job: &Job) {
        tracing::warn!(target = %self.cfg.name, job = job.id, "job was taken over while running; its result is dropped");
    }

    /// Completes the run once none of its jobs is open any more.
    async fn close_if_complete(&self, run_id: i64) -> Result<(), SyncError> {
        if self.store.run_has_open_jobs(run_id).await? {
            return Ok(());
        }
        let summary = self.run_summary(run_id).await?;
        let status = if summary.is_clean() {
            "succeeded"
        } else {
            "failed"
        };
        let detail = summary
            .held_back
            .clone()
            .or_else(|| (!summary.notes.is_empty()).then(|| summary.notes.join("; ")));
        if self
            .store
            .complete_run(run_id, status, &summary.counts(), detail.as_deref())
            .await?
        {
            metrics::counter!("scimsync_runs_total", "target" => self.cfg.name.clone(), "result" => status).increment(1);
        }
        Ok(())
    }

    /// One batch of a run: a range of users, a range of groups, or the deprovisioning.
    async fn run_job(
        &self,
        job: &Job,
        progress: &dyn Progress,
        claim: Option<ClaimTurn>,
    ) -> Result<RunSummary, SyncError> {
        let turn = self.client.next_turn();
        let (part, requests, writes) = crate::target::in_turn(
            turn,
            crate::target::counting(self.run_job_phase(job, progress, claim)),
        )
        .await;
        let mut part = part?;
        part.requests = requests;
        part.writes = writes;
        Ok(part)
    }

    async fn run_job_phase(
        &self,
        job: &Job,
        progress: &dyn Progress,
        claim: Option<ClaimTurn>,
    ) -> Result<RunSummary, SyncError> {
        let mut part = RunSummary {
            target: self.target().to_string(),
            run_id: Some(job.run_id),
            ..Default::default()
        };
        let mut leaving = Leaving::Store;
        let until = job.until_id.as_deref();
        // The job of the users' or the groups' first range settles its phase's quiet batches,
        // in the claim turn it was claimed in (if any): no other claim comes first.
        if Self::opens_phase(job) {
            self.refresh_mappings(Look::Now);
            let fingerprint = self.fingerprint();
            if let Some(check) = self.quiet_check(job, &fingerprint) {
                let settled = self.store.settle_quiet_jobs(job, check).await?;
                self.count_objects(check.kind, Action::Unchanged, settled.unchanged);
                self.count_objects(check.kind, Action::Skipped, settled.skipped);
                progress.advance(settled.unchanged + settled.skipped);
            }
        }
        drop(claim);
        match job.phase {
            0 => {
                self.users_range(&job.after_id, until, &mut part, &mut leaving, progress)
                    .await?
            }
            1 => {
                self.groups_range(&job.after_id, until, &mut part, &mut leaving, progress)
                    .await?
            }
            _ => {
                // Deprovisioning follows only a clean run: count the failures of its batches.
                let (_, results) = self.store.run_progress(job.run_id).await?;
                let failed: i64 = results
                    .iter()
                    .filter_map(|r| r.get("failed").and_then(Value::as_i64))
                    .sum();
                let mut candidates = Vec::new();
                for &kind in self.kinds() {
                    for o in self.store.leaving(self.target(), kind).await? {
                        candidates.push((kind, o.local_id, o.state));
                    }
                }
                self.deprovision_phase(&mut part, candidates, failed, progress)
                    .await?;
            }
        }
        Ok(part)
    }

    /// How the job of a phase's first range tells the phase's quiet batches
    /// ([`Store::settle_quiet_jobs`]): as the scans tell unchanged objects (see `users_range` and
    /// `groups_range`); None when they would not.
    fn quiet_check<'a>(&self, job: &Job, fingerprint: &'a str) -> Option<QuietCheck<'a>> {
        let kind = match job.phase {
            _ if self.opts.trace => return None,
            0 => Kind::User,
            1 if self.eff.groups && self.cfg.groups.is_empty() => Kind::Group,
            _ => return None,
        };
        Some(QuietCheck {
            kind,
            fingerprint,
            excludes_service_accounts: self.cfg.exclude_service_accounts,
        })
    }

    /// A dry run: every phase in memory, nothing recorded.
    async fn dry_full_sync(&self, progress: &dyn Progress) -> Result<RunSummary, SyncError> {
        let before = (self.client.stats.total(), self.client.stats.writes());
        let mut summary = RunSummary {
            target: self.target().to_string(),
            ..Default::default()
        };
        let mut leaving = Leaving::Memory {
            list: Vec::new(),
            users: HashSet::new(),
        };
        progress.phase(
            self.target(),
            "users",
            self.store.count(Kind::User).await? as u64,
        );
        self.users_range("", None, &mut summary, &mut leaving, progress)
            .await?;
        progress.phase(
            self.target(),
            "groups",
            self.store.count(Kind::Group).await? as u64,
        );
        self.groups_range("", None, &mut summary, &mut leaving, progress)
            .await?;
        let candidates = match leaving {
            Leaving::Memory { list, .. } => list,
            Leaving::Store => Vec::new(),
        };
        let failed = summary.failed;
        self.deprovision_phase(&mut summary, candidates, failed, progress)
            .await?;
        progress.done();
        summary.requests = self.client.stats.total() - before.0;
        summary.writes = self.client.stats.writes() - before.1;
        // Objects of a batch finish in any order; a plan reads the same every time: users,
        // groups, then deletions (groups first), each by what it sends.
        summary.planned.sort_by_cached_key(|p| {
            let users = p.path.starts_with("/Users");
            let rank = match (p.method.as_str(), users) {
                ("DELETE", false) => 2,
                ("DELETE", true) => 3,
                (_, true) => 0,
                (_, false) => 1,
            };
            let body = p.body.as_ref().map(Value::to_string).unwrap_or_default();
            (rank, p.method.clone(), body, p.path.clone())
        });
        Ok(summary)
    }

    /// The kinds this target takes, groups first (the order of deprovisioning).
    fn kinds(&self) -> &'static [Kind] {
        if self.eff.groups {
            &[Kind::Group, Kind::User]
        } else {
            &[Kind::User]
        }
    }

    async fn users_range(
        &self,
        after: &str,
        until: Option<&str>,
        summary: &mut RunSummary,
        leaving: &mut Leaving,
        progress: &dyn Progress,
    ) -> Result<(), SyncError> {
        let target = self.target().to_string();
        let mut after = after.to_string();
        loop {
            self.refresh_mappings(Look::IfDue);
            // Tracing wants every object's steps: then none is skipped by the scan.
            let fingerprint = (!self.opts.trace).then(|| self.fingerprint());
            let batch = self
                .store
                .user_scan(
                    &target,
                    &after,
                    until,
                    self.opts.batch_size,
                    fingerprint.as_deref(),
                    self.cfg.exclude_service_accounts,
                )
                .await?;
            let Some(last) = batch.last() else { break };
            after = last.id().to_string();
            let n = batch.len() as u64;
            // Unchanged users end here (most already in the scan); the others' full states
            // are read in one query.
            let mut steps = Vec::with_capacity(batch.len());
            let mut changed = Vec::new();
            for scanned in batch {
                let (u, rev, summary) = match scanned {
                    Scanned::Unchanged(_) => {
                        summary.unchanged += 1;
                        continue;
                    }
                    Scanned::Read(u, rev, summary) => (u, rev, summary),
                };
                let source = self.user_source(&u, rev);
                if !self.excludes(&u)
                    && !self.opts.trace
                    && summary.as_ref().is_some_and(|s| {
                        unchanged_since_sent(
                            &s.status,
                            s.remote_id.is_some(),
                            &RecordedSource {
                                hash: s.source_hash.as_deref(),
                                // The scan compared keys already: they differ.
                                key: None,
                            },
                            &source,
                        )
                    })
                {
                    let mut w = Work::default();
                    self.rekey(Kind::User, &u.id, None, &source, &mut w);
                    steps.push(Step::Done(self.unchanged(Kind::User, &u.id, w)));
                } else {
                    changed.push((u, source, summary.is_some()));
                }
            }
            let ids: Vec<&str> = changed
                .iter()
                .filter(|(_, _, has_state)| *has_state)
                .map(|(u, _, _)| u.id.as_str())
                .collect();
            let mut states = if ids.is_empty() {
                Default::default()
            } else {
                self.store.states(&target, Kind::User, &ids).await?
            };
            for (i, (u, source, _)) in changed.into_iter().enumerate() {
                let state = states.remove(&u.id);
                steps.push(self.prepare_user(u, state, source));
                yield_sometimes(i).await;
            }
            let reports = self.run_batch(steps).await?;
            self.absorb(reports, summary, leaving).await?;
            progress.advance(n);
            if n < u64::from(self.opts.batch_size) || until == Some(after.as_str()) {
                // The range is done: no need to ask for an empty batch.
                break;
            }
        }
        Ok(())
    }

    async fn groups_range(
        &self,
        after: &str,
        until: Option<&str>,
        summary: &mut RunSummary,
        leaving: &mut Leaving,
        progress: &dyn Progress,
    ) -> Result<(), SyncError> {
        let target = self.target().to_string();
        if !self.eff.groups {
            let groups = self.store.count(Kind::Group).await?;
            // Said once per run: by the batch that starts at the beginning.
            if groups > 0 && after.is_empty() {
                let note = format!(
                    "the target offers no Groups resource (ResourceTypes): {groups} group(s) not synced"
                );
                tracing::warn!(target = %target, "{note}");
                summary.notes.push(note);
            }
            return Ok(());
        }
        let no_one = HashSet::new();
        let mut after = after.to_string();
        loop {
            self.refresh_mappings(Look::IfDue);
            let leaving_users = match &*leaving {
                Leaving::Memory { users, .. } => users,
                Leaving::Store => &no_one,
            };
            // The scan tells unchanged groups by itself unless the trace wants every step,
            // a group filter decides scope, or a dry run keeps who is leaving in memory.
            let fingerprint =
                (!self.opts.trace && self.cfg.groups.is_empty() && leaving_users.is_empty())
                    .then(|| self.fingerprint());
            let scan = self
                .store
                .group_scan(
                    &target,
                    &after,
                    until,
                    self.opts.batch_size,
                    fingerprint.as_deref(),
                )
                .await?;
            let Some((last, ..)) = scan.last() else {
                break;
            };
            let scanned_after = std::mem::replace(&mut after, last.clone());
            let n = scan.len() as u64;
            let first = scan.iter().position(|(_, same, _)| !same);
            let last_changed = scan.iter().rposition(|(_, same, _)| !same);
            let changed: HashSet<&str> = scan
                .iter()
                .filter(|(_, same, _)| !same)
                .map(|(id, ..)| id.as_str())
                .collect();
            summary.unchanged += (scan.len() - changed.len()) as i64;
            // Unchanged groups recorded at an older member epoch: their current key, so that
            // the next scan needs no member lookups for them either.
            if !self.opts.dry_run {
                let rekeys: Vec<StateWrite> = scan
                    .iter()
                    .filter(|(_, same, _)| *same)
                    .filter_map(|(id, _, key)| {
                        key.as_deref().map(|k| StateWrite::key(Kind::Group, id, k))
                    })
                    .collect();
                self.store.apply_state(&target, rekeys).await?;
            }
            let mut steps = Vec::with_capacity(changed.len());
            let mut census = None;
            if let (Some(first), Some(last_changed)) = (first, last_changed) {
                // The others are read in full: members, state, the resource last sent.
                let from = match first {
                    0 => scanned_after.as_str(),
                    i => scan[i - 1].0.as_str(),
                };
                let batch: Vec<_> = self
                    .store
                    .group_batch(&target, from, Some(&scan[last_changed].0), u32::MAX)
                    .await?
                    .into_iter()
                    .filter(|(g, ..)| changed.contains(g.id.as_str()))
                    .collect();
                // The census is read while the groups are mapped and their write-ahead
                // records written: it needs only to know how many may be created (a script
                // may still skip some, then it was read for fewer).
                let creates = batch
                    .iter()
                    .filter(|(.., s)| first_create(s.as_ref()))
                    .count();
                let prepare = async {
                    for (i, (g, rev, m, s)) in batch.into_iter().enumerate() {
                        steps.push(self.prepare_group(g, rev, m, s, leaving_users));
                        yield_sometimes(i).await;
                    }
                    self.record_attempts(&mut steps).await
                };
                let (read, recorded) = tokio::join!(self.take_census(creates), prepare);
                recorded?;
                census = read;
            }
            let reports = self.send_batch(steps, census).await?;
            self.absorb(reports, summary, leaving).await?;
            progress.advance(n);
            if n < u64::from(self.opts.batch_size) || until == Some(after.as_str()) {
                // The range is done: no need to ask for an empty batch.
                break;
            }
        }
        Ok(())
    }

    /// Adds a batch's reports to the summary; what is leaving the target is kept for the
    /// deprovisioning.
    async fn absorb(
        &self,
        reports: Vec<ObjectReport>,
        summary: &mut RunSummary,
        leaving: &mut Leaving,
    ) -> Result<(), SyncError> {
        for mut r in reports {
            if r.action == Action::OutOfScope
                && let Some(s) = r.state.take()
            {
                self.leave(leaving, r.kind, &r.id, s).await?;
            }
            summary.add(r);
        }
        Ok(())
    }

    async fn leave(
        &self,
        leaving: &mut Leaving,
        kind: Kind,
        id: &str,
        state: SyncState,
    ) -> Result<(), SyncError> {
        match leaving {
            Leaving::Memory { list, users } => {
                if kind == Kind::User {
                    users.insert(id.to_string());
                }
                list.push((kind, id.to_string(), state));
            }
            Leaving::Store => self.store.mark_leaving(self.target(), kind, id).await?,
        }
        Ok(())
    }

    /// Deprovisions what left the directory (orphans) or the scope (`leaving`), groups first,
    /// unless the run had failures or the deletion guard holds.
    async fn deprovision_phase(
        &self,
        summary: &mut RunSummary,
        mut leaving: Vec<(Kind, String, SyncState)>,
        failed_in_run: i64,
        progress: &dyn Progress,
    ) -> Result<(), SyncError> {
        let target = self.target().to_string();
        for &kind in self.kinds() {
            let (unchanged, deletions) = self
                .store
                .orphans_unchanged(&target, kind, ORPHAN_CHECK_MAX_AGE_MS)
                .await?;
            if unchanged {
                continue;
            }
            let orphans = self.store.orphans(&target, kind).await?;
            if orphans.is_empty() && !self.opts.dry_run {
                self.store
                    .record_orphan_check(&target, kind, deletions)
                    .await?;
            }
            for o in orphans {
                if o.state.remote_id.is_some() {
                    leaving.push((kind, o.local_id, o.state));
                } else if !self.opts.dry_run {
                    // Never reached the target: nothing to deprovision, only a record to drop.
                    self.store.delete_state(&target, kind, &o.local_id).await?;
                }
            }
        }
        if leaving.is_empty() {
            return Ok(());
        }
        if let Some(why) = self.hold_back(failed_in_run, leaving.len() as u64).await? {
            tracing::warn!(target = %target, "{why}");
            summary.held_back = Some(why);
            return Ok(());
        }
        progress.phase(&target, "deprovision", leaving.len() as u64);
        // Groups first, so users leave their groups with the groups, not one PATCH at a time.
        let (groups, users): (Vec<_>, Vec<_>) =
            leaving.into_iter().partition(|(k, _, _)| *k == Kind::Group);
        for phase in [groups, users] {
            let mut reports: Vec<ObjectReport> = futures::stream::iter(phase)
                .map(|(k, id, s)| self.deprovision(k, id, s))
                .buffer_unordered(self.cfg.concurrency)
                .collect()
                .await;
            self.record(&mut reports).await?;
            for r in reports {
                summary.add(r);
                progress.advance(1);
            }
        }
        Ok(())
    }

    /// Why deprovisioning must wait, if it must.
    async fn hold_back(&self, failed: i64, deletions: u64) -> Result<Option<String>, SyncError> {
        if failed > 0 {
            return Ok(Some(format!(
                "deprovisioning of {deletions} object(s) held back: {failed} object(s) failed in this run, and deletions follow only a clean run"
            )));
        }
        if self.opts.allow_deletions {
            return Ok(None);
        }
        if self.store.count(Kind::User).await? == 0 && self.store.count(Kind::Group).await? == 0 {
            return Ok(Some(format!(
                "deprovisioning of {deletions} object(s) held back: the directory is empty; run with --allow-deletions if that is intended"
            )));
        }
        let provisioned = self.store.count_provisioned(self.target()).await? as u64;
        if !self.cfg.max_deletions.allows(deletions, provisioned) {
            return Ok(Some(format!(
                "deprovisioning held back: it would remove {deletions} of {provisioned} provisioned object(s), more than max_deletions = {}; rerun with --allow-deletions or raise max_deletions for target {:?}",
                self.cfg.max_deletions, self.cfg.name
            )));
        }
        Ok(None)
    }

    fn report(
        &self,
        kind: Kind,
        id: &str,
        w: Work,
        action: Action,
        detail: String,
        state: Option<SyncState>,
    ) -> ObjectReport {
        if !self.opts.dry_run {
            self.count_objects(kind, action, 1);
        }
        ObjectReport {
            kind,
            id: id.to_string(),
            action,
            detail,
            steps: w.steps,
            planned: w.planned,
            state,
            writes: w.writes,
        }
    }

    fn count_objects(&self, kind: Kind, action: Action, n: u64) {
        metrics::counter!(
            "scimsync_objects_total",
            "target" => self.cfg.name.clone(),
            "kind" => kind.as_str(),
            "action" => action_name(action),
        )
        .increment(n);
    }

    /// An object with nothing to send.
    fn unchanged(&self, kind: Kind, id: &str, w: Work) -> ObjectReport {
        self.report(kind, id, w, Action::Unchanged, "unchanged".into(), None)
    }

    /// Whether the target leaves this user out (service accounts, when it excludes them).
    fn excludes(&self, user: &User) -> bool {
        self.cfg.exclude_service_accounts && user.service_account
    }

    /// A failed object; its failure (and retry schedule) is recorded with its batch.
    fn failed(&self, kind: Kind, id: &str, mut w: Work, error: String) -> ObjectReport {
        w.step(|| format!("failed: {error}"));
        tracing::debug!(target = %self.cfg.name, %kind, id, error = %error, "object failed");
        if !self.opts.dry_run {
            w.writes.push(StateWrite::failed(kind, id, &error));
        }
        self.report(kind, id, w, Action::Failed, error, None)
    }

    /// The scripts' version and the target's settings, as a digest prefix, and its
    /// fingerprint: made once per scripts' version, not once per object.
    fn prefix(&self) -> (sha2::Sha256, String) {
        use sha2::Digest;
        let mut cached = self.prefix.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cached.as_ref()
            && self.mappings.is_version(&p.version)
        {
            return (p.digest.clone(), p.fingerprint.clone());
        }
        let version = self.mappings.version();
        let mut digest = sha2::Sha256::new();
        digest.update(version.as_bytes());
        digest.update(b"|");
        digest.update(self.settings.as_bytes());
        digest.update(b"|");
        let fingerprint = fingerprint_of(digest.clone());
        let made = (digest.clone(), fingerprint.clone());
        *cached = Some(Prefix {
            version,
            digest,
            fingerprint,
        });
        made
    }

    /// What every resource is made from besides its object: scripts and settings (the prefix
    /// of each [`Source::key`]).
    fn fingerprint(&self) -> String {
        self.prefix().1
    }

    /// What a resource is made from: the directory object (as its fields serialize, fed
    /// straight into the digest) at revision `rev` of its row (a group's with the member epoch,
    /// see [`GroupRev`]), the scripts' version and the target's settings.
    fn source(&self, object: &impl Serialize, rev: impl std::fmt::Display) -> Source {
        use sha2::Digest;
        let (mut h, fingerprint) = self.prefix();
        let key = Source::key_of(&fingerprint, rev);
        // Writing into a digest cannot fail; a serialization error would only make the hash
        // differ, which costs a mapping, never a skipped change.
        let mut out = crate::directory::DigestWriter::new(&mut h);
        let _ = serde_json::to_writer(&mut out, object);
        out.finish();
        Source {
            hash: crate::directory::hex_lower(&h.finalize()),
            key,
        }
    }

    fn user_source(&self, user: &User, rev: i64) -> Source {
        self.source(user, rev)
    }

    /// A group's own fields; its members are compared on their own.
    fn group_source(&self, group: &Group, rev: GroupRev) -> Source {
        self.source(&(&group.id, &group.name, &group.attributes), rev)
    }

    /// True when nothing the resource is made from changed since it was sent.
    fn source_unchanged(state: Option<&SyncState>, source: &Source) -> bool {
        state.is_some_and(|s| {
            unchanged_since_sent(
                &s.status,
                s.remote_id.is_some(),
                &RecordedSource::of(s),
                source,
            )
        })
    }

    /// Remembers the new key of an object found unchanged by its content, so that the next
    /// scan finds it unchanged by its revision alone.
    fn rekey(&self, kind: Kind, id: &str, recorded: Option<&str>, source: &Source, w: &mut Work) {
        if !self.opts.dry_run && recorded != Some(source.key.as_str()) {
            w.writes.push(StateWrite::key(kind, id, &source.key));
        }
    }

    /// Runs the mappings; when tracing, each script's contribution becomes a step.
    fn map(
        &self,
        kind: Kind,
        object: &impl Serialize,
        w: &mut Work,
    ) -> Result<MapOutcome, crate::mapping::MappingError> {
        let mut steps = Vec::new();
        let trace = if w.trace { Some(&mut steps) } else { None };
        let out = self
            .mappings
            .current()
            .map_value(kind, object, &self.info, trace);
        for (script, value) in steps {
            let said = if value.is_null() {
                "()".to_string()
            } else {
                value.to_string()
            };
            w.step(|| format!("script {script}: {said}"));
        }
        out
    }

    /// Prepares one user: scope, source hash, mapping and validation (no I/O).
    fn prepare_user(&self, user: User, state: Option<SyncState>, source: Source) -> Step {
        let mut w = Work {
            trace: self.opts.trace,
            ..Default::default()
        };
        w.step(|| {
            format!(
                "directory object: {}",
                serde_json::to_string(&user).unwrap_or_default()
            )
        });
        if self.excludes(&user) {
            let why = "service account, and the target excludes service accounts".to_string();
            return Step::Done(self.out_of_scope(Kind::User, &user.id, w, why, state));
        }
        w.step(|| "scope: in scope".into());
        if Self::source_unchanged(state.as_ref(), &source) {
            w.step(|| {
                "unchanged since last sent (object, scripts and target settings): not mapped".into()
            });
            let recorded = state.as_ref().and_then(|s| s.source_key.as_deref());
            self.rekey(Kind::User, &user.id, recorded, &source, &mut w);
            return Step::Done(self.unchanged(Kind::User, &user.id, w));
        }
        w.source = Some(source);
        let mapped = self.map(Kind::User, &user, &mut w);
        self.prepare_mapped(Kind::User, &user.id, mapped, None, state, w)
    }

    /// Prepares one group; its members are those of its directory members that have a remote
    /// id and are not leaving the target in this run.
    fn prepare_group(
        &self,
        group: Group,
        rev: GroupRev,
        members: Vec<Member>,
        state: Option<SyncState>,
        leaving_users: &HashSet<String>,
    ) -> Step {
        let mut w = Work {
            trace: self.opts.trace,
            ..Default::default()
        };
        w.step(|| {
            format!(
                "directory object: {}",
                serde_json::to_string(&group).unwrap_or_default()
            )
        });
        if !self.cfg.groups.is_empty()
            && !self
                .cfg
                .groups
                .iter()
                .any(|f| *f == group.id || *f == group.name)
        {
            let why = "not in the target's group filter".to_string();
            return Step::Done(self.out_of_scope(Kind::Group, &group.id, w, why, state));
        }
        w.step(|| "scope: in scope".into());
        let remote: BTreeSet<String> = members
            .into_iter()
            .filter(|m| !leaving_users.contains(&m.user_id))
            .filter_map(|m| m.remote_id)
            .collect();
        let remote: Vec<String> = remote.into_iter().collect();
        let source = self.group_source(&group, rev);
        let state = match state {
            Some(SyncState {
                remote_id: Some(rid),
                last_resource: Some(last),
                resource_hash: Some(hash),
                members: prev,
                status,
                source_hash,
                source_key,
                ..
            }) if unchanged_since_sent(
                &status,
                true,
                &RecordedSource {
                    hash: source_hash.as_deref(),
                    key: source_key.as_deref(),
                },
                &source,
            ) =>
            {
                // The group itself maps as before; only its members may have moved.
                if prev.as_deref() == Some(remote.as_slice()) {
                    w.step(|| {
                        "unchanged since last sent (object, scripts, target, members): not mapped"
                            .into()
                    });
                    self.rekey(
                        Kind::Group,
                        &group.id,
                        source_key.as_deref(),
                        &source,
                        &mut w,
                    );
                    return Step::Done(self.unchanged(Kind::Group, &group.id, w));
                }
                w.source = Some(source);
                return Step::Send(Prepared {
                    kind: Kind::Group,
                    id: group.id,
                    w,
                    state: None,
                    plan: Plan::Members {
                        rid,
                        last,
                        hash,
                        prev,
                        members: remote,
                    },
                });
            }
            other => other,
        };
        w.source = Some(source);
        let mapped = self.map(Kind::Group, &group, &mut w);
        self.prepare_mapped(Kind::Group, &group.id, mapped, Some(remote), state, w)
    }

    fn out_of_scope(
        &self,
        kind: Kind,
        id: &str,
        mut w: Work,
        why: String,
        state: Option<SyncState>,
    ) -> ObjectReport {
        w.step(|| format!("scope: out of scope ({why})"));
        match state {
            Some(s) if s.remote_id.is_some() => {
                self.report(kind, id, w, Action::OutOfScope, why, Some(s))
            }
            _ => self.report(kind, id, w, Action::Skipped, why, None),
        }
    }

    /// Checks a mapped resource (RFC 7643, the compatibility profile, the target's schemas).
    fn prepare_mapped(
        &self,
        kind: Kind,
        id: &str,
        mapped: Result<MapOutcome, crate::mapping::MappingError>,
        members: Option<Vec<String>>,
        state: Option<SyncState>,
        mut w: Work,
    ) -> Step {
        let mut desired = match mapped {
            Ok(MapOutcome::Resource(doc)) => doc,
            Ok(MapOutcome::Skip { script, reason }) => {
                let why = format!("skipped by {script}: {reason}");
                return Step::Done(self.out_of_scope(kind, id, w, why, state));
            }
            Err(e) => {
                let msg = format!("mapping of {kind} {id} for target {}: {e}", self.target());
                return Step::Done(self.failed(kind, id, w, msg));
            }
        };
        if kind == Kind::User && self.profile.single_valued {
            ops::keep_one_value(&mut desired);
        }
        w.step(|| format!("mapping: {desired}"));
        if let Err(violations) = scim::validate(kind, &desired) {
            let msg = format!("invalid {kind} resource: {}", violations.join("; "));
            return Step::Done(self.failed(kind, id, w, msg));
        }
        if kind == Kind::User && self.profile.require_user_names {
            let missing = ops::missing_names(&desired);
            if !missing.is_empty() {
                let msg = format!(
                    "invalid user resource: compatibility {} requires {}",
                    self.profile.mode,
                    missing.join(", ")
                );
                return Step::Done(self.failed(kind, id, w, msg));
            }
        }
        if let Some(ts) = &self.target_schemas {
            let undeclared = ts.undeclared(kind, &desired);
            if !undeclared.is_empty() {
                if self.cfg.schema_check == SchemaCheck::Strict {
                    let msg = format!(
                        "{kind} resource does not fit the target's /Schemas: {}",
                        undeclared.join("; ")
                    );
                    return Step::Done(self.failed(kind, id, w, msg));
                }
                let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
                for u in &undeclared {
                    if warned.insert(u.clone()) {
                        tracing::warn!(target = %self.cfg.name, %kind, id, "schema_check: {u}");
                    }
                }
                w.step(|| format!("schema_check (warn): {}", undeclared.join("; ")));
            }
        }
        w.step(|| "validation: valid".into());
        let hash = hash_json(&desired);
        Step::Send(Prepared {
            kind,
            id: id.to_string(),
            w,
            state,
            plan: Plan::Resource {
                desired: Desired::new(desired, hash),
                members,
            },
        })
    }

    /// Sends what a prepared object needs: a create, an update, or nothing.
    /// `census`: the target's groups, read for the batch (first creates of groups are looked
    /// up there instead of one by one).
    async fn send(&self, p: Prepared, census: Option<&census::Census>) -> ObjectReport {
        let Prepared {
            kind,
            id,
            mut w,
            state,
            plan,
        } = p;
        let s = state.unwrap_or_default();
        let (desired, members) = match plan {
            Plan::Members {
                rid,
                last,
                hash,
                prev,
                members,
            } => {
                let last = Desired::new(last, hash);
                let result = self
                    .update(
                        kind,
                        &id,
                        &rid,
                        Some(&last.value),
                        &last,
                        prev.as_deref(),
                        Some(&members),
                        true,
                        &mut w,
                    )
                    .await;
                return match result {
                    Ok((action, detail)) => self.report(kind, &id, w, action, detail, None),
                    Err(e) => self.failed(kind, &id, w, e),
                };
            }
            Plan::Resource { desired, members } => (desired, members),
        };
        let result = match s.remote_id.clone() {
            None => {
                // An earlier attempt may have created it and died before recording the id.
                self.create(
                    kind,
                    &id,
                    &desired,
                    members.as_deref(),
                    s.last_resource.as_ref(),
                    census,
                    &mut w,
                )
                .await
            }
            Some(rid) => {
                if sent_as(&s, &desired.hash, members.as_deref()) {
                    w.step(|| {
                        format!("match: remote id {rid} (recorded); unchanged since last sent")
                    });
                    // Made from something new (scripts, target settings) but the same: remember
                    // what it is made from now, so the next run skips it without mapping.
                    if !self.opts.dry_run && !RecordedSource::of(&s).is(w.source.as_ref()) {
                        let synced = Synced {
                            remote_id: &rid,
                            hash: &desired.hash,
                            resource: desired.text(),
                            members: members.as_deref().or(s.members.as_deref()),
                            source: w.source.as_ref(),
                        };
                        w.writes.push(StateWrite::synced(kind, &id, synced));
                    }
                    Ok((Action::Unchanged, "unchanged".to_string()))
                } else {
                    w.step(|| format!("match: remote id {rid} (recorded)"));
                    self.update(
                        kind,
                        &id,
                        &rid,
                        s.last_resource.as_ref(),
                        &desired,
                        s.members.as_deref(),
                        members.as_deref(),
                        true,
                        &mut w,
                    )
                    .await
                }
            }
        };
        match result {
            Ok((action, detail)) => {
                w.step(|| format!("result: {detail}"));
                self.report(kind, &id, w, action, detail, None)
            }
            Err(e) => self.failed(kind, &id, w, e),
        }
    }

    /// Records the write-ahead records of a batch's first creates in one statement.
    async fn record_attempts(&self, steps: &mut [Step]) -> Result<(), SyncError> {
        if self.opts.dry_run {
            return Ok(());
        }
        let attempts: Vec<StateWrite> = steps
            .iter_mut()
            .filter_map(|s| match s {
                Step::Send(p) => p.attempt(),
                Step::Done(_) => None,
            })
            .collect();
        self.store.apply_state(self.target(), attempts).await?;
        Ok(())
    }

    /// An object's send, as queued by `run_batch`. Its future is moved (copied) into the
    /// queue, and a future is as large as its largest path: the paths few objects take
    /// (lookups, adoption, write-ahead fallback, refused methods, re-creation) are boxed in
    /// `create`, `update` and `post`, which took it from 18 KB to 5 KB an object.
    async fn finish(&self, step: Step, census: Option<&census::Census>) -> ObjectReport {
        match step {
            Step::Done(r) => r,
            Step::Send(p) => self.send(p, census).await,
        }
    }

    /// Records what a batch's objects left to record, in one transaction.
    async fn record(&self, reports: &mut [ObjectReport]) -> Result<(), SyncError> {
        let writes: Vec<StateWrite> = reports
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.writes))
            .collect();
        self.store.apply_state(self.target(), writes).await?;
        Ok(())
    }

    /// Syncs one batch: write-ahead records for its creates in one statement, its objects sent
    /// with the target's concurrency, their outcomes recorded in one transaction.
    async fn run_batch(&self, mut steps: Vec<Step>) -> Result<Vec<ObjectReport>, SyncError> {
        self.record_attempts(&mut steps).await?;
        self.send_batch(steps, None).await
    }

    /// Sends a batch whose write-ahead records are written (`census`: the target's groups,
    /// when read for it), then records the outcomes in one transaction.
    async fn send_batch(
        &self,
        mut steps: Vec<Step>,
        census: Option<census::Census>,
    ) -> Result<Vec<ObjectReport>, SyncError> {
        let mut reports = Vec::with_capacity(steps.len());
        if self.bulk_enabled() {
            steps = self.send_bulk(steps, &mut reports).await;
        }
        let rest: Vec<ObjectReport> = futures::stream::iter(steps)
            .map(|s| self.finish(s, census.as_ref()))
            .buffer_unordered(self.cfg.concurrency)
            .collect()
            .await;
        reports.extend(rest);
        self.record(&mut reports).await?;
        Ok(reports)
    }

    /// Reads the target's groups once for a batch that creates several (see `census`), when
    /// that costs fewer requests than looking each up: a page per `page` groups against up to
    /// two lookups a group.
    async fn take_census(&self, creates: usize) -> Option<census::Census> {
        use std::sync::atomic::Ordering::Relaxed;
        if creates < 2 || self.opts.dry_run || !self.eff.groups || !self.eff.list_groups {
            return None;
        }
        let page = self.listing_page();
        let known = self.census_total.load(Relaxed);
        if known != u64::MAX && !census::fits(known, page, creates) {
            return None;
        }
        let seen = |total| self.census_total.store(total, Relaxed);
        census::read(&self.client, page, creates, seen)
            .await
            .inspect_err(|why| {
                tracing::debug!(target = %self.cfg.name, "groups looked up one by one, no census: {why}")
            })
            .ok()
    }

    /// Whether a batch's creates and updates go in `/Bulk` requests.
    fn bulk_enabled(&self) -> bool {
        self.cfg.bulk && self.eff.bulk && self.eff.bulk_max_operations > 0 && !self.opts.dry_run
    }

    /// The bulk operation for a prepared user: a first create (its write-ahead record is in),
    /// or an update that is one PATCH (or a PUT). Anything else (groups, whose creates look
    /// for a namesake first and whose members go in slices; retried creates; unchanged
    /// objects) is sent on its own.
    fn bulk_operation(&self, p: &Prepared) -> Option<scim::BulkOperation> {
        let Plan::Resource { desired, .. } = &p.plan else {
            return None;
        };
        let (hash, desired) = (&desired.hash, &desired.value);
        if p.kind != Kind::User {
            return None;
        }
        let s = p.state.as_ref();
        let op = |method: &'static str, path: String, data: Value| scim::BulkOperation {
            method,
            path,
            bulk_id: p.id.clone(),
            data: Some(data),
        };
        match s.and_then(|s| s.remote_id.as_deref()) {
            None if p.w.attempt_recorded => Some(op("POST", "/Users".into(), desired.clone())),
            None => None,
            Some(rid) => {
                let s = s?;
                if sent_as(s, hash, None) {
                    return None;
                }
                if !self.use_patch(Kind::User) {
                    return Some(op("PUT", format!("/Users/{rid}"), desired.clone()));
                }
                let policy = self.member_policy();
                let mut requests =
                    patch_requests(s.last_resource.as_ref(), desired, None, None, &policy);
                if requests.len() != 1 {
                    return None;
                }
                let ops = requests.pop()?;
                Some(op("PATCH", format!("/Users/{rid}"), scim::patch_body(&ops)))
            }
        }
    }

    /// Sends what can go in bulk requests (within the target's maxOperations and
    /// maxPayloadSize); returns what is left to send one by one: steps that need no request,
    /// objects that cannot go in bulk, and operations the target did not carry out (sent again
    /// on their own, where 409s, 404s and retries are handled).
    async fn send_bulk(&self, steps: Vec<Step>, reports: &mut Vec<ObjectReport>) -> Vec<Step> {
        const ENVELOPE: usize = 128;
        let max_ops = self.eff.bulk_max_operations as usize;
        let max_payload = match self.eff.bulk_max_payload {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let mut rest = Vec::new();
        let mut chunk: Vec<(Prepared, scim::BulkOperation)> = Vec::new();
        let mut size = ENVELOPE;
        for step in steps {
            let p = match step {
                Step::Send(p) => p,
                done => {
                    rest.push(done);
                    continue;
                }
            };
            let Some(op) = self.bulk_operation(&p) else {
                rest.push(Step::Send(p));
                continue;
            };
            let op_size = serde_json::to_vec(&op).map_or(usize::MAX, |v| v.len() + 1);
            if ENVELOPE.saturating_add(op_size) > max_payload {
                rest.push(Step::Send(p));
                continue;
            }
            if chunk.len() >= max_ops || size.saturating_add(op_size) > max_payload {
                self.send_bulk_chunk(std::mem::take(&mut chunk), reports, &mut rest)
                    .await;
                size = ENVELOPE;
            }
            size += op_size;
            chunk.push((p, op));
        }
        if !chunk.is_empty() {
            self.send_bulk_chunk(chunk, reports, &mut rest).await;
        }
        rest
    }

    async fn send_bulk_chunk(
        &self,
        chunk: Vec<(Prepared, scim::BulkOperation)>,
        reports: &mut Vec<ObjectReport>,
        rest: &mut Vec<Step>,
    ) {
        let (prepared, ops): (Vec<Prepared>, Vec<scim::BulkOperation>) = chunk.into_iter().unzip();
        let answers = match self.client.bulk(&ops).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(target = %self.cfg.name, error = %e, operations = ops.len(), "bulk request failed; sending its operations one by one");
                for (p, op) in prepared.into_iter().zip(ops) {
                    rest.push(Step::Send(Self::unknown_outcome(p, &op, &e.to_string())));
                }
                return;
            }
        };
        let mut by_id: std::collections::HashMap<String, scim::BulkAnswer> = answers
            .into_iter()
            .filter_map(|a| Some((a.bulk_id.clone()?, a)))
            .collect();
        for (mut p, op) in prepared.into_iter().zip(ops) {
            let answer = by_id.remove(&op.bulk_id);
            let sent = format!(
                "request (bulk): {} {} {}",
                op.method,
                op.path,
                op.data.as_ref().map(Value::to_string).unwrap_or_default()
            );
            p.w.step(|| sent);
            let rid = match (&answer, op.method) {
                (Some(a), "POST") if (200..300).contains(&a.status) => a.id.clone(),
                (Some(a), _) if (200..300).contains(&a.status) => {
                    p.state.as_ref().and_then(|s| s.remote_id.clone())
                }
                _ => None,
            };
            let Some(rid) = rid else {
                match answer {
                    // Not carried out: sent again on its own, which handles what the answer says.
                    Some(a) if !(200..300).contains(&a.status) => {
                        p.w.step(|| {
                            format!(
                                "bulk answer: HTTP {} {}; sending on its own",
                                a.status, a.detail
                            )
                        });
                        rest.push(Step::Send(p));
                    }
                    _ => {
                        let why = "no usable answer to this operation";
                        rest.push(Step::Send(Self::unknown_outcome(p, &op, why)));
                    }
                }
                continue;
            };
            let Prepared {
                kind,
                id,
                mut w,
                plan,
                ..
            } = p;
            let Plan::Resource { desired, members } = plan else {
                continue;
            };
            let synced = Synced {
                remote_id: &rid,
                hash: &desired.hash,
                resource: desired.text(),
                members: members.as_deref(),
                source: w.source.as_ref(),
            };
            w.writes.push(StateWrite::synced(kind, &id, synced));
            let (action, detail) = if op.method == "POST" {
                (Action::Created, format!("created as {rid} (bulk)"))
            } else {
                (Action::Updated, format!("updated {rid} (bulk)"))
            };
            w.step(|| format!("result: {detail}"));
            reports.push(self.report(kind, &id, w, action, detail, None));
        }
    }

    /// An operation whose fate is unknown (the bulk request failed or its answer is missing):
    /// a create is looked for before it is sent again, as after a crash.
    fn unknown_outcome(mut p: Prepared, op: &scim::BulkOperation, why: &str) -> Prepared {
        p.w.step(|| format!("bulk: {why}; sending on its own"));
        if op.method == "POST"
            && let Plan::Resource { desired, .. } = &p.plan
        {
            let state = p.state.get_or_insert_with(SyncState::default);
            state.last_resource = Some(desired.value.clone());
        }
        p
    }

    /// A batch of one (the event consumer, `sync --user`).
    async fn run_one(&self, mut step: Step) -> Result<ObjectReport, SyncError> {
        self.record_attempts(std::slice::from_mut(&mut step))
            .await?;
        let mut report = self.finish(step, None).await;
        self.record(std::slice::from_mut(&mut report)).await?;
        Ok(report)
    }

    fn plan(&self, w: &mut Work, method: &str, path: String, body: Option<Value>) {
        w.step(|| {
            format!(
                "request (dry run, not sent): {method} {path} {}",
                body.as_ref().map(Value::to_string).unwrap_or_default()
            )
        });
        w.planned.push(PlannedRequest {
            method: method.to_string(),
            path,
            body,
        });
    }

    fn with_members(&self, desired: &Value, members: Option<&[String]>) -> Value {
        let mut body = desired.clone();
        if let (Some(m), Some(obj)) = (members, body.as_object_mut()) {
            obj.insert("members".into(), self.member_form().values(m));
        }
        body
    }

    /// POST, adopting the existing remote object on 409 (or, for groups, when a lookup finds it).
    #[allow(clippy::too_many_arguments)]
    async fn create(
        &self,
        kind: Kind,
        id: &str,
        desired: &Desired,
        members: Option<&[String]>,
        attempted: Option<&Value>,
        census: Option<&census::Census>,
        w: &mut Work,
    ) -> Result<(Action, String), Fail> {
        if self.opts.dry_run {
            let body = self.with_members(&desired.value, members);
            self.plan(w, "POST", format!("/{}", endpoint(kind)), Some(body));
            return Ok((Action::Created, "would create".into()));
        }
        // A create that was attempted before but never confirmed (a crash, a lost answer) may
        // have happened, under what it was then: look for that first.
        if let Some(before) = attempted {
            w.step(|| "an earlier create was not confirmed: looking for it".into());
            if let Some(remote) = Box::pin(self.lookup(kind, before, w)).await? {
                return Box::pin(self.adopt(kind, id, remote, desired, members, w)).await;
            }
        }
        // Write-ahead: record what is about to be created, so a crash after the POST is found
        // (usually done already, for the whole batch at once).
        if !w.attempt_recorded {
            let attempt = vec![StateWrite::attempt(kind, id, desired.text())];
            Box::pin(self.store.apply_state(self.target(), attempt))
                .await
                .map_err(|e| e.to_string())?;
        }
        // Group names are rarely unique on the target, so a POST would not reveal a duplicate.
        if kind == Kind::Group {
            let found = match census.filter(|_| w.attempt_recorded) {
                Some(census) => Box::pin(self.census_lookup(census, &desired.value, w)).await?,
                None if self.eff.filter => Box::pin(self.lookup(kind, &desired.value, w)).await?,
                None => None,
            };
            if let Some(remote) = found {
                return Box::pin(self.adopt(kind, id, remote, desired, members, w)).await;
            }
        }
        match self.post(kind, id, desired, members, w).await? {
            Ok(done) => Ok(done),
            Err(e) if e.status() == Some(409) => {
                w.step(|| format!("response: {e}"));
                match Box::pin(self.lookup(kind, &desired.value, w)).await? {
                    Some(remote) => {
                        Box::pin(self.adopt(kind, id, remote, desired, members, w)).await
                    }
                    None => Err(format!(
                        "{e}; and no remote object matches {}",
                        scim::match_filters(kind, &desired.value).join(" or ")
                    )),
                }
            }
            Err(e) => Err(tfail(e)),
        }
    }

    /// Finds the remote object this directory object corresponds to.
    async fn lookup(
        &self,
        kind: Kind,
        desired: &Value,
        w: &mut Work,
    ) -> Result<Option<Value>, Fail> {
        let keys = scim::match_keys(kind, desired);
        if !self.eff.filter {
            return self.lookup_by_listing(kind, &keys, w).await;
        }
        for (key, value) in &keys {
            let filter = scim::eq_filter(key, value);
            w.step(|| format!("lookup: GET /{}?filter={filter}", endpoint(kind)));
            let found = self.client.find(kind, &filter).await.map_err(tfail)?;
            if let Some(hit) = found.into_iter().find(|r| {
                r.get("id").and_then(Value::as_str).is_some() && scim::has_identity(r, key, value)
            }) {
                return Ok(Some(hit));
            }
        }
        Ok(None)
    }

    /// Finds a group in its batch's census; a match is read again by id (the census keeps ids
    /// and names only), and looked up as usual if it is gone or no longer matches.
    async fn census_lookup(
        &self,
        census: &census::Census,
        desired: &Value,
        w: &mut Work,
    ) -> Result<Option<Value>, Fail> {
        let keys = scim::match_keys(Kind::Group, desired);
        let n = census.len();
        let Some((rid, key)) = census.find(&keys) else {
            w.step(|| format!("lookup: none of the batch's census of {n} groups matches"));
            return Ok(None);
        };
        w.step(|| {
            format!(
                "lookup: {rid} matches by {} in the batch's census of {n} groups; GET /Groups/{rid}",
                key.0
            )
        });
        match self.client.get(Kind::Group, rid).await.map_err(tfail)? {
            Some(remote) if scim::has_identity(&remote, key.0, &key.1) => Ok(Some(remote)),
            _ => self.lookup(Kind::Group, desired, w).await,
        }
    }

    /// Resources a listing asks for a page: what the target's filters return at most.
    fn listing_page(&self) -> usize {
        self.eff.filter_max_results.clamp(1, 1000) as usize
    }

    /// Without filtering, the only way to find an object is to page through them all.
    async fn lookup_by_listing(
        &self,
        kind: Kind,
        keys: &[(&'static str, String)],
        w: &mut Work,
    ) -> Result<Option<Value>, Fail> {
        const MAX_PAGES: usize = 10_000;
        let page = self.listing_page();
        w.step(|| {
            format!(
                "lookup: the target cannot filter; paging through /{}",
                endpoint(kind)
            )
        });
        let mut start = 1;
        for _ in 0..MAX_PAGES {
            let items = self.client.list(kind, start, page).await.map_err(tfail)?;
            if let Some(hit) = items.iter().find(|r| {
                r.get("id").and_then(Value::as_str).is_some()
                    && keys.iter().any(|(k, v)| scim::has_identity(r, k, v))
            }) {
                return Ok(Some(hit.clone()));
            }
            if items.is_empty() {
                break;
            }
            start += items.len();
        }
        Ok(None)
    }

    /// Takes over an existing remote object and brings it to the desired state.
    #[allow(clippy::too_many_arguments)]
    async fn adopt(
        &self,
        kind: Kind,
        id: &str,
        remote: Value,
        desired: &Desired,
        members: Option<&[String]>,
        w: &mut Work,
    ) -> Result<(Action, String), Fail> {
        let rid = remote
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        w.step(|| format!("match: adopted existing remote object {rid}"));
        let remote_members: Option<Vec<String>> = remote.get("members").map(|m| {
            let mut ids: Vec<String> = m
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.get("value").and_then(Value::as_str))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            ids.sort();
            ids
        });
        let prev_members = match kind {
            Kind::Group => Some(remote_members.unwrap_or_default()),
            Kind::User => None,
        };
        // Boxed: update → adopt → update is recursive (bounded by `may_recreate = false`).
        let (_, detail) = Box::pin(self.update(
            kind,
            id,
            &rid,
            Some(&remote),
            desired,
            prev_members.as_deref(),
            members,
            false,
            w,
        ))
        .await?;
        Ok((Action::Updated, format!("adopted {rid}; {detail}")))
    }

    /// Brings remote object `rid` from `prev` to `desired` (PATCH where supported, else PUT);
    /// a 404 means it was deleted remotely: look it up, else re-create it.
    #[allow(clippy::too_many_arguments)]
    async fn update(
        &self,
        kind: Kind,
        id: &str,
        rid: &str,
        prev: Option<&Value>,
        desired: &Desired,
        prev_members: Option<&[String]>,
        members: Option<&[String]>,
        may_recreate: bool,
        w: &mut Work,
    ) -> Result<(Action, String), Fail> {
        let mut sent = self
            .send_update(kind, rid, prev, &desired.value, prev_members, members, w)
            .await;
        if let Err(e) = &sent
            && matches!(e.status(), Some(405 | 501))
        {
            // The target does not take this method after all: remember, and use the other.
            let method = if self.use_patch(kind) { "PATCH" } else { "PUT" };
            self.client.refuse(kind, method);
            if !self.opts.dry_run {
                // Every worker (and the next run) learns it too.
                let learned = self.client.refusals();
                let fp = self.cfg.fingerprint();
                if let Err(e) =
                    Box::pin(
                        self.store
                            .cache_put(self.target(), "refused", &fp, &learned),
                    )
                    .await
                {
                    tracing::warn!(target = %self.cfg.name, error = %e, "cannot record the refused method");
                }
            }
            if self.use_patch(kind) != (method == "PATCH") {
                w.step(|| format!("response: {e}: switching from {method}"));
                tracing::info!(target = %self.cfg.name, %kind, "{method} refused ({e}); using the other method from now on");
                sent = Box::pin(self.send_update(
                    kind,
                    rid,
                    prev,
                    &desired.value,
                    prev_members,
                    members,
                    w,
                ))
                .await;
            }
        }
        match sent {
            Ok(()) => {
                if !self.opts.dry_run {
                    let synced = Synced {
                        remote_id: rid,
                        hash: &desired.hash,
                        resource: desired.text(),
                        members,
                        source: w.source.as_ref(),
                    };
                    w.writes.push(StateWrite::synced(kind, id, synced));
                }
                let verb = if self.opts.dry_run {
                    "would update"
                } else {
                    "updated"
                };
                Ok((Action::Updated, format!("{verb} {rid}")))
            }
            Err(e) if e.status() == Some(404) && may_recreate => {
                w.step(|| format!("response: {e}: deleted remotely"));
                match Box::pin(self.lookup(kind, &desired.value, w)).await? {
                    Some(remote) => {
                        Box::pin(self.adopt(kind, id, remote, desired, members, w)).await
                    }
                    None => {
                        let (_, detail) = Box::pin(self.post(kind, id, desired, members, w))
                            .await?
                            .map_err(tfail)?;
                        Ok((
                            Action::Created,
                            format!("re-created after remote deletion: {detail}"),
                        ))
                    }
                }
            }
            Err(e) => Err(tfail(e)),
        }
    }

    /// The PATCH requests (or the PUT) that bring `rid` from `prev` to `desired`.
    #[allow(clippy::too_many_arguments)]
    async fn send_update(
        &self,
        kind: Kind,
        rid: &str,
        prev: Option<&Value>,
        desired: &Value,
        prev_members: Option<&[String]>,
        members: Option<&[String]>,
        w: &mut Work,
    ) -> Result<(), TargetError> {
        let path = format!("/{}/{rid}", endpoint(kind));
        if self.use_patch(kind) {
            let requests =
                patch_requests(prev, desired, prev_members, members, &self.member_policy());
            if requests.is_empty() {
                w.step(|| "no difference to send".into());
            }
            for ops in &requests {
                if self.opts.dry_run {
                    self.plan(w, "PATCH", path.clone(), Some(scim::patch_body(ops)));
                    continue;
                }
                w.step(|| format!("request: PATCH {path} {}", scim::patch_body(ops)));
                self.client.patch(kind, rid, ops).await?;
            }
            Ok(())
        } else {
            let body = self.with_members(desired, members);
            if self.opts.dry_run {
                self.plan(w, "PUT", path, Some(body));
                Ok(())
            } else {
                w.step(|| format!("request: PUT {path} {body}"));
                self.client.replace(kind, rid, &body).await
            }
        }
    }

    fn member_policy(&self) -> MemberPolicy {
        MemberPolicy {
            max_per_request: self.eff.max_members_per_request,
            replace: self.profile.replace_members,
            form: self.member_form(),
        }
    }

    fn member_form(&self) -> scim::MemberForm {
        scim::MemberForm {
            member_type: self.profile.member_type,
            ref_base: self
                .eff
                .member_ref
                .then(|| self.cfg.url.trim_end_matches('/').to_string()),
        }
    }

    /// POST and record the new remote object. The target's own error comes back separately, so
    /// the caller decides what a 409 means.
    async fn post(
        &self,
        kind: Kind,
        id: &str,
        desired: &Desired,
        members: Option<&[String]>,
        w: &mut Work,
    ) -> Result<Result<(Action, String), TargetError>, Fail> {
        // Some targets take only so many members with a new group; the rest follow by PATCH.
        let first = match (members, self.profile.create_group_max_members) {
            (Some(m), Some(max)) if m.len() > max => Some(&m[..max]),
            _ => members,
        };
        // Without members the body is the resource's own text, written once for the record too.
        let with_members;
        let body = match first {
            Some(_) => {
                with_members =
                    crate::directory::json_text(&self.with_members(&desired.value, first));
                &with_members
            }
            None => desired.text(),
        };
        w.step(|| format!("request: POST /{} {body}", endpoint(kind)));
        let rid = match self.client.create_text(kind, body).await {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        w.step(|| format!("response: created, remote id {rid}"));
        if first.map(<[_]>::len) != members.map(<[_]>::len) {
            let rest = Box::pin(self.send_update(
                kind,
                &rid,
                Some(&desired.value),
                &desired.value,
                first,
                members,
                w,
            ))
            .await;
            if let Err(e) = rest {
                // The group exists with its first members: record that, then fail.
                let synced = Synced {
                    remote_id: &rid,
                    hash: &desired.hash,
                    resource: desired.text(),
                    members: first,
                    source: None,
                };
                w.writes.push(StateWrite::synced(kind, id, synced));
                return Err(format!(
                    "created as {rid}, but adding the other members failed: {e}"
                ));
            }
        }
        let synced = Synced {
            remote_id: &rid,
            hash: &desired.hash,
            resource: desired.text(),
            members,
            source: w.source.as_ref(),
        };
        w.writes.push(StateWrite::synced(kind, id, synced));
        Ok(Ok((Action::Created, format!("created as {rid}"))))
    }

    /// DELETE (or deactivate) one object; its record goes only once the target confirmed.
    async fn deprovision(&self, kind: Kind, id: String, state: SyncState) -> ObjectReport {
        let mut w = Work {
            trace: self.opts.trace,
            ..Default::default()
        };
        let Some(rid) = state.remote_id.clone() else {
            return self.report(
                kind,
                &id,
                w,
                Action::Skipped,
                "never provisioned".into(),
                None,
            );
        };
        let ep = endpoint(kind);
        let deactivate = kind == Kind::User
            && (self.cfg.on_delete == OnDelete::Deactivate
                || self.profile.user_removal == UserRemoval::Deactivate);
        let res = if deactivate {
            let op = [PatchOperation::replace("active", Value::Bool(false))];
            if self.opts.dry_run {
                self.plan(
                    &mut w,
                    "PATCH",
                    format!("/{ep}/{rid}"),
                    Some(scim::patch_body(&op)),
                );
                Ok(())
            } else if self.use_patch(kind) {
                self.client.patch(kind, &rid, &op).await
            } else {
                let mut body = state.last_resource.clone().unwrap_or(Value::Null);
                if let Some(o) = body.as_object_mut() {
                    o.insert("active".into(), Value::Bool(false));
                }
                self.client.replace(kind, &rid, &body).await
            }
        } else if self.opts.dry_run {
            self.plan(&mut w, "DELETE", format!("/{ep}/{rid}"), None);
            Ok(())
        } else {
            self.client.delete(kind, &rid).await
        };
        match res {
            Ok(()) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return self.failed(kind, &id, w, tfail(e)),
        }
        if !self.opts.dry_run
            && let Err(e) = self.store.delete_state(self.target(), kind, &id).await
        {
            return self.failed(kind, &id, w, e.to_string());
        }
        let verb = match (self.opts.dry_run, deactivate) {
            (true, true) => "would deactivate",
            (true, false) => "would delete",
            (false, true) => "deactivated",
            (false, false) if kind == Kind::User && self.profile.delete_deactivates => {
                "deleted (the target keeps it, deactivated)"
            }
            (false, false) => "deleted",
        };
        self.report(kind, &id, w, Action::Deleted, format!("{verb} {rid}"), None)
    }

    /// Provisions one user now (for `sync --user`), with a step-by-step trace.
    pub async fn sync_one(&self, kind: Kind, id: &str) -> Result<ObjectReport, SyncError> {
        self.refresh_mappings(Look::IfDue);
        let target = self.target().to_string();
        let step = match kind {
            Kind::User => match self.store.user(&target, id).await? {
                Some((u, rev, s)) => {
                    let source = self.user_source(&u, rev);
                    self.prepare_user(u, s, source)
                }
                None => return self.sync_gone(kind, id).await,
            },
            Kind::Group => match self.store.group(&target, id).await? {
                Some((g, rev, m, s)) => self.prepare_group(g, rev, m, s, &HashSet::new()),
                None => return self.sync_gone(kind, id).await,
            },
        };
        let report = self.run_one(step).await?;
        if report.action == Action::OutOfScope {
            let state = report.state.clone().unwrap_or_default();
            let mut d = self.deprovision(kind, id.to_string(), state).await;
            self.record(std::slice::from_mut(&mut d)).await?;
            let mut steps = report.steps;
            steps.append(&mut d.steps);
            d.steps = steps;
            return Ok(d);
        }
        Ok(report)
    }

    async fn sync_gone(&self, kind: Kind, id: &str) -> Result<ObjectReport, SyncError> {
        let mut w = Work {
            trace: self.opts.trace,
            ..Default::default()
        };
        w.step(|| format!("directory: no {kind} with id {id:?}"));
        match self.store.state(self.target(), kind, id).await? {
            Some(s) if s.remote_id.is_some() => {
                let mut d = self.deprovision(kind, id.to_string(), s).await;
                self.record(std::slice::from_mut(&mut d)).await?;
                w.steps.append(&mut d.steps);
                d.steps = w.steps;
                Ok(d)
            }
            _ => Ok(self.report(
                kind,
                id,
                w,
                Action::Skipped,
                "not in the directory and not provisioned".into(),
                None,
            )),
        }
    }
}
