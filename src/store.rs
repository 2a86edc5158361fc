//! Storage: the directory, change events, per-target sync state and run records, on SQLite or
//! PostgreSQL.
//!
//! Both databases share one schema shape (TEXT JSON, BIGINT milliseconds) and the same SQL
//! (`$N` placeholders, `ON CONFLICT`, `RETURNING` work on both), so each method is written once
//! and `on_pool!` compiles its body for each backend.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::directory::{Group, Kind, Record, User};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database.url {0:?} must start with sqlite:// or postgres://")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("line {line}: {message}")]
    Import { line: usize, message: String },
    #[error("corrupt {what} in the database for {id}: {message}")]
    Corrupt {
        what: &'static str,
        id: String,
        message: String,
    },
}

enum Backend {
    /// `reads` serves reads; `writes`, one connection, every write this process makes in its
    /// write turn. SQLite empties a connection's page cache whenever another connection has
    /// written since its last transaction: with writes spread over the pool, each write
    /// statement started cold and read back every page it touched. The one writer's cache
    /// stays warm across its own commits (a 10k first sync: 12,700 → 9,000 `pread`s). Three
    /// readers and the writer are the four connections there were before (each has its own
    /// page cache and thread: a fifth cost 13 MB of peak RSS at 100k).
    Sqlite {
        reads: SqlitePool,
        writes: SqlitePool,
    },
    Postgres(PgPool),
}

/// The one handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: std::sync::Arc<Backend>,
    /// SQLite takes one writer at a time and makes the others sleep-and-retry (its busy
    /// handler sleeps up to 100 ms a turn); this process's writers queue here instead.
    write_gate: std::sync::Arc<tokio::sync::Mutex<()>>,
}

macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &*$store.backend {
            Backend::Sqlite { reads: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// As `on_pool!`, for statements made in this process's write turn (`Store::write_turn`): on
/// SQLite they go to the one writer connection.
macro_rules! on_write_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &*$store.backend {
            Backend::Sqlite { writes: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// A place in the change-event stream: events are consumed in (tx, seq) order. `tx` is the
/// writing transaction on PostgreSQL (migration 0008) and 0 on SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct EventPos {
    pub tx: i64,
    pub seq: i64,
}

/// What scimsync last did for one object on one target.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyncState {
    pub remote_id: Option<String>,
    pub resource_hash: Option<String>,
    /// The resource as last sent successfully (groups: without members).
    pub last_resource: Option<Value>,
    /// Remote ids of the members last sent successfully (groups only).
    pub members: Option<Vec<String>>,
    pub status: String,
    pub last_error: Option<String>,
    pub attempts: i64,
    /// Hash of what the last resource sent was made from (object, scripts, target settings).
    pub source_hash: Option<String>,
    /// The scripts and settings fingerprint and the directory row's revision it was made from.
    pub source_key: Option<String>,
}

/// What a resource is made from, recorded with it so the next run can skip the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Hash of the directory object, the scripts' version and the target's settings.
    pub hash: String,
    /// `"<scripts and settings fingerprint>:<row revision>"`: compared by the scan itself.
    pub key: String,
}

impl Source {
    /// The key of a resource made with scripts and settings `fingerprint` from revision `rev`
    /// of its row. The scans compare keys in SQL as this prefix followed by the revision.
    pub fn key_of(fingerprint: &str, rev: impl std::fmt::Display) -> String {
        format!("{}{rev}", Self::key_prefix(fingerprint))
    }

    fn key_prefix(fingerprint: &str) -> String {
        format!("{fingerprint}:")
    }
}

/// One change to an object's sync state, applied with the rest of its batch by
/// [`Store::apply_state`].
#[derive(Debug, Clone)]
pub enum StateWrite {
    /// A create about to be sent (no remote id yet): if the process dies before the answer is
    /// recorded, the next attempt looks for this resource before creating again.
    Attempt {
        kind: Kind,
        local_id: String,
        resource: String,
    },
    /// A successful write: the remote id and exactly what the target now holds.
    Synced {
        kind: Kind,
        local_id: String,
        remote_id: String,
        hash: String,
        resource: String,
        members: Option<String>,
        source: Option<Source>,
    },
    /// The same resource, now known to be made from a new revision of its row or new scripts
    /// (a host rewrote the row unchanged, or the state predates revisions).
    Key {
        kind: Kind,
        local_id: String,
        key: String,
    },
    /// A failure: what is known of the remote object stays, and the next attempt is scheduled
    /// with exponential backoff (30 s doubling, at most an hour, with jitter).
    Failed {
        kind: Kind,
        local_id: String,
        error: String,
    },
}

impl StateWrite {
    /// `resource` is the resource's JSON text.
    pub fn attempt(kind: Kind, local_id: &str, resource: &str) -> StateWrite {
        StateWrite::Attempt {
            kind,
            local_id: local_id.to_string(),
            resource: resource.to_string(),
        }
    }

    pub fn synced(kind: Kind, local_id: &str, s: Synced<'_>) -> StateWrite {
        StateWrite::Synced {
            kind,
            local_id: local_id.to_string(),
            remote_id: s.remote_id.to_string(),
            hash: s.hash.to_string(),
            resource: s.resource.to_string(),
            members: s.members.map(|m| Value::from(m.to_vec()).to_string()),
            source: s.source.cloned(),
        }
    }

    pub fn key(kind: Kind, local_id: &str, key: &str) -> StateWrite {
        StateWrite::Key {
            kind,
            local_id: local_id.to_string(),
            key: key.to_string(),
        }
    }

    pub fn failed(kind: Kind, local_id: &str, error: &str) -> StateWrite {
        StateWrite::Failed {
            kind,
            local_id: local_id.to_string(),
            error: error.to_string(),
        }
    }

    /// Bytes its bound values take, about.
    fn approx_len(&self) -> usize {
        64 + match self {
            StateWrite::Attempt {
                local_id, resource, ..
            } => local_id.len() + resource.len(),
            StateWrite::Synced {
                local_id,
                remote_id,
                hash,
                resource,
                members,
                source,
                ..
            } => {
                local_id.len()
                    + remote_id.len()
                    + hash.len()
                    + resource.len()
                    + members.as_ref().map_or(0, String::len)
                    + source.as_ref().map_or(0, |s| s.hash.len() + s.key.len())
            }
            StateWrite::Key { local_id, key, .. } => local_id.len() + key.len(),
            StateWrite::Failed {
                local_id, error, ..
            } => local_id.len() + error.len(),
        }
    }

    fn object(&self) -> (Kind, String) {
        match self {
            StateWrite::Attempt { kind, local_id, .. }
            | StateWrite::Synced { kind, local_id, .. }
            | StateWrite::Key { kind, local_id, .. }
            | StateWrite::Failed { kind, local_id, .. } => (*kind, local_id.clone()),
        }
    }
}

/// What a full sync's scan reads of an object's state: enough to skip it when nothing it is
/// made from changed.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSummary {
    pub remote_id: Option<String>,
    pub status: String,
    pub source_hash: Option<String>,
}

/// What the target holds after a successful write.
#[derive(Debug, Clone, Copy)]
pub struct Synced<'a> {
    pub remote_id: &'a str,
    /// Hash of `resource`, compared on the next run to skip unchanged objects.
    pub hash: &'a str,
    /// The resource's JSON text.
    pub resource: &'a str,
    /// Remote ids of the members sent (groups only).
    pub members: Option<&'a [String]>,
    /// What the resource was made from (None: unknown, the next run maps it again).
    pub source: Option<&'a Source>,
}

/// A provisioned object whose directory object is gone.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub local_id: String,
    pub state: SyncState,
}

/// One member of a group, with its remote id on the target when it has one.
#[derive(Debug, Clone)]
pub struct Member {
    pub user_id: String,
    pub remote_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub users_changed: u64,
    pub groups_changed: u64,
    pub unchanged: u64,
    pub deleted: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub skipped: i64,
    pub failed: i64,
    pub requests: i64,
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub target: String,
    pub trigger: String,
    pub dry_run: bool,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub status: String,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub skipped: i64,
    pub failed: i64,
    pub requests: i64,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct FailingObject {
    pub target: String,
    pub kind: String,
    pub local_id: String,
    pub last_error: Option<String>,
    pub attempts: i64,
    pub updated_at: i64,
    pub next_attempt_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct StateCols {
    remote_id: Option<String>,
    resource_hash: Option<String>,
    last_resource: Option<String>,
    members: Option<String>,
    status: Option<String>,
    last_error: Option<String>,
    attempts: Option<i64>,
    source_hash: Option<String>,
    source_key: Option<String>,
}

/// A user's own columns.
#[derive(sqlx::FromRow)]
struct UserCols {
    id: String,
    username: String,
    email: Option<String>,
    name: Option<String>,
    given_name: Option<String>,
    family_name: Option<String>,
    active: bool,
    service_account: bool,
    attributes: String,
}

impl UserCols {
    fn into_user(self) -> Result<User, StoreError> {
        let attributes = attrs(&self.id, &self.attributes)?;
        Ok(User {
            id: self.id,
            username: self.username,
            email: self.email,
            name: self.name,
            given_name: self.given_name,
            family_name: self.family_name,
            active: self.active,
            service_account: self.service_account,
            attributes,
        })
    }
}

#[derive(sqlx::FromRow)]
struct UserRow {
    #[sqlx(flatten)]
    user: UserCols,
    rev: i64,
    #[sqlx(flatten)]
    state: StateCols,
}

/// A scanned user: its own columns are NULL when the scan found it unchanged since sent.
#[derive(sqlx::FromRow)]
struct UserScanRow {
    id: String,
    rev: i64,
    same: bool,
    username: Option<String>,
    email: Option<String>,
    name: Option<String>,
    given_name: Option<String>,
    family_name: Option<String>,
    active: Option<bool>,
    service_account: Option<bool>,
    attributes: Option<String>,
    remote_id: Option<String>,
    status: Option<String>,
    source_hash: Option<String>,
}

/// A group as read for a sync: the group, its revision, its members (with their remote ids on
/// the target) and its state on the target.
pub type StoredGroup = (Group, GroupRev, Vec<Member>, Option<SyncState>);

/// What a group's key records besides the scripts and settings: its row's revision (which
/// its memberships change too) and the target's member epoch its members' remote ids were
/// read at (migrations: PostgreSQL 0007, SQLite 0010). Written into keys as `rev:epoch`
/// (SQLite's keys recorded before 0010 are `rev` alone: compared, then rewritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupRev {
    pub rev: i64,
    pub members_epoch: Option<i64>,
}

/// A group as a full sync's scan found it: its id, whether it is unchanged since sent, and
/// the key to record when it is unchanged but its recorded key is out of date.
pub type ScannedGroup = (String, bool, Option<String>);

impl std::fmt::Display for GroupRev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.members_epoch {
            Some(e) => write!(f, "{}:{e}", self.rev),
            None => write!(f, "{}", self.rev),
        }
    }
}

/// A user as a full sync's scan found it.
// A batch's worth at a time: an allocation per user read would cost more than the size.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Scanned {
    /// Sent before, and neither its row (revision) nor the scripts and settings changed since:
    /// only its id was read.
    Unchanged(String),
    /// Anything else: the user, its row's revision and the summary of its state.
    Read(User, i64, Option<StateSummary>),
}

#[derive(sqlx::FromRow)]
struct GroupRow {
    id: String,
    name: String,
    attributes: String,
    rev: i64,
    #[sqlx(flatten)]
    state: StateCols,
}

/// One member of a batch's members as the range query returns them.
#[derive(serde::Deserialize)]
struct MemberRow(String, String, Option<String>);

#[derive(sqlx::FromRow)]
struct OrphanRow {
    local_id: String,
    #[sqlx(flatten)]
    state: StateCols,
}

const STATE_COLS: &str = "s.remote_id, s.resource_hash, s.last_resource, s.members, s.status, \
     s.last_error, s.attempts, s.source_hash, s.source_key";

fn attrs(id: &str, text: &str) -> Result<Map<String, Value>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what: "attributes",
        id: id.to_string(),
        message: e.to_string(),
    })
}

impl StateCols {
    fn into_state(self, id: &str) -> Result<Option<SyncState>, StoreError> {
        let Some(status) = self.status else {
            return Ok(None);
        };
        let corrupt = |what: &'static str, e: serde_json::Error| StoreError::Corrupt {
            what,
            id: id.to_string(),
            message: e.to_string(),
        };
        let last_resource = match self.last_resource {
            Some(t) => Some(serde_json::from_str(&t).map_err(|e| corrupt("last_resource", e))?),
            None => None,
        };
        let members = match self.members {
            Some(t) => Some(serde_json::from_str(&t).map_err(|e| corrupt("members", e))?),
            None => None,
        };
        Ok(Some(SyncState {
            remote_id: self.remote_id,
            resource_hash: self.resource_hash,
            last_resource,
            members,
            status,
            last_error: self.last_error,
            attempts: self.attempts.unwrap_or(0),
            source_hash: self.source_hash,
            source_key: self.source_key,
        }))
    }
}

fn orphans_from(rows: Vec<OrphanRow>) -> Result<Vec<Orphan>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(state) = r.state.into_state(&r.local_id)? {
            out.push(Orphan {
                local_id: r.local_id,
                state,
            });
        }
    }
    Ok(out)
}

impl UserRow {
    fn split(self) -> Result<(User, i64, Option<SyncState>), StoreError> {
        let state = self.state.into_state(&self.user.id)?;
        Ok((self.user.into_user()?, self.rev, state))
    }
}

impl Scanned {
    pub fn id(&self) -> &str {
        match self {
            Scanned::Unchanged(id) => id,
            Scanned::Read(u, _, _) => &u.id,
        }
    }
}

impl UserScanRow {
    fn into_scanned(self) -> Result<Scanned, StoreError> {
        if self.same {
            return Ok(Scanned::Unchanged(self.id));
        }
        let summary = self.status.map(|status| StateSummary {
            remote_id: self.remote_id,
            status,
            source_hash: self.source_hash,
        });
        let user = UserCols {
            username: self.username.unwrap_or_default(),
            email: self.email,
            name: self.name,
            given_name: self.given_name,
            family_name: self.family_name,
            active: self.active.unwrap_or(true),
            service_account: self.service_account.unwrap_or(false),
            attributes: self.attributes.unwrap_or_else(|| "{}".into()),
            id: self.id,
        };
        Ok(Scanned::Read(user.into_user()?, self.rev, summary))
    }
}

pub use crate::clock::now_ms;

/// Turns on SQLite's query planner stability guarantee for a new connection. Without it, a
/// statement whose plan may depend on a bound value (every batch scan's `LIMIT $3`) is marked
/// to be compiled again whenever that parameter is bound: each batch re-parsed and re-planned
/// its scan, 6% of SQLite's instructions in a first sync. Our statements have one good plan
/// whatever their values.
async fn stable_plans(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    match qpsg(conn, 1).await? {
        1 => Ok(()),
        rc => Err(sqlx::Error::Configuration(
            format!("SQLite did not take the query planner stability setting ({rc})").into(),
        )),
    }
}

/// Sets SQLITE_DBCONFIG_ENABLE_QPSG (1 on, 0 off, -1 leaves it) and returns it as it now is,
/// or SQLite's error code as a negative number.
async fn qpsg(conn: &mut sqlx::SqliteConnection, set: i32) -> Result<i32, sqlx::Error> {
    use std::ffi::c_int;
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    let mut now: c_int = -1;
    // SAFETY: the locked handle gives this thread sole use of the open connection `db`; this
    // setting takes an int and an int* that receives the setting as it now is.
    let rc = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            set as c_int,
            &mut now as *mut c_int,
        )
    };
    Ok(if rc == libsqlite3_sys::SQLITE_OK {
        now
    } else {
        -rc
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

// The scan of a full sync: the user and only what tells whether it changed since it was sent
// (the resource last sent, often the biggest column, is read only for users that changed).
// Each row's state is looked up by its key. SQLite does that from a plain join. PostgreSQL
// plans a join from statistics, which the state table lacks while a first run fills it (a
// hash join over every state for each batch: a 100k sync took 70 s instead of 9); given the
// batch's key range on both sides, it scanned that range of states for each user instead
// (1.8 ms a batch instead of 0.3). A LATERAL subquery with LIMIT 1 is not turned into a join:
// one primary-key lookup per row, whatever the statistics say.
macro_rules! state_join {
    (sqlite, $kind:literal, $alias:literal) => {
        concat!(
            " LEFT JOIN sync_state s ON s.target = $1 AND s.kind = '",
            $kind,
            "' AND s.local_id = ",
            $alias,
            ".id "
        )
    };
    (postgres, $kind:literal, $alias:literal) => {
        concat!(
            " LEFT JOIN LATERAL (SELECT * FROM sync_state s WHERE s.target = $1 AND s.kind = '",
            $kind,
            "' AND s.local_id = ",
            $alias,
            ".id LIMIT 1) s ON TRUE "
        )
    };
}

// Whether a scanned user is unchanged since sent: synced, and made from this revision of its
// row with these scripts and settings ($5: "<fingerprint>:"; NULL never matches), and still in
// scope ($6: the target excludes service accounts).
macro_rules! user_unchanged {
    () => {
        "(s.status = 'synced' AND s.remote_id IS NOT NULL \
         AND s.source_key = CAST($5 AS TEXT) || CAST(u.rev AS TEXT) \
         AND NOT ($6 AND u.service_account))"
    };
}

// A user out of scope (a service account the target excludes, $6) that has nothing on the
// target to take back: its batch only counts it as skipped.
macro_rules! user_excluded_untouched {
    () => {
        "($6 AND u.service_account AND s.remote_id IS NULL)"
    };
}

// A user's own column, NULL when the user is unchanged since sent.
macro_rules! unless_unchanged {
    ($col:literal) => {
        concat!(
            "CASE WHEN ",
            user_unchanged!(),
            " THEN NULL ELSE u.",
            $col,
            " END AS ",
            $col,
            ", "
        )
    };
}

// Unchanged users come back as their id alone: a no-op full sync reads no user out of the
// database, maps nothing and hashes nothing.
macro_rules! user_scan {
    ($db:ident) => {
        concat!(
            "SELECT u.id, u.rev, COALESCE(",
            user_unchanged!(),
            ", FALSE) AS same, ",
            unless_unchanged!("username"),
            unless_unchanged!("email"),
            unless_unchanged!("name"),
            unless_unchanged!("given_name"),
            unless_unchanged!("family_name"),
            unless_unchanged!("active"),
            unless_unchanged!("service_account"),
            unless_unchanged!("attributes"),
            "s.remote_id, s.status, s.source_hash FROM users u",
            state_join!($db, "user", "u"),
            "WHERE u.id > $2 AND ($4 IS NULL OR u.id <= $4) ORDER BY u.id LIMIT $3"
        )
    };
}

// The oldest transaction still running (every older one has committed or rolled back), as
// the bigint the change events' `tx` holds. READ COMMITTED: the statement's own snapshot, so
// every event below it that committed is visible to the same statement.
macro_rules! events_horizon {
    () => {
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    };
}
// The events head as (tx, seq): see `Store::events_head`; a run records it when created.
const EVENTS_HEAD_SQLITE: &str = "SELECT 0, COALESCE(MAX(seq), 0) FROM change_events";
const EVENTS_HEAD_POSTGRES: &str = concat!("SELECT (", events_horizon!(), "), 0");
const EVENTS_AFTER_POSTGRES: &str = concat!(
    "SELECT tx, seq, kind, object_id, created_at FROM change_events ",
    "WHERE (tx, seq) > ($1, $2) AND tx < (",
    events_horizon!(),
    ") ORDER BY tx, seq LIMIT $3"
);

const USER_SCAN_SQLITE: &str = user_scan!(sqlite);
const USER_SCAN_POSTGRES: &str = user_scan!(postgres);

const USER_ONE: &str = "SELECT u.id, u.username, u.email, u.name, u.given_name, u.family_name, \
     u.active, u.service_account, u.attributes, u.rev, s.remote_id, s.resource_hash, \
     s.last_resource, s.members, s.status, s.last_error, s.attempts, s.source_hash, s.source_key \
     FROM users u LEFT JOIN sync_state s ON s.target = $1 AND s.kind = 'user' AND s.local_id = u.id \
     WHERE u.id = $2";

macro_rules! group_batch {
    ($db:ident) => {
        concat!(
            "SELECT g.id, g.name, g.attributes, g.rev, s.remote_id, s.resource_hash, \
             s.last_resource, s.members, s.status, s.last_error, s.attempts, s.source_hash, \
             s.source_key FROM groups g",
            state_join!($db, "group", "g"),
            "WHERE g.id > $2 AND ($4 IS NULL OR g.id <= $4) ORDER BY g.id LIMIT $3"
        )
    };
}

const GROUP_BATCH_SQLITE: &str = group_batch!(sqlite);
const GROUP_BATCH_POSTGRES: &str = group_batch!(postgres);

// The remote id membership `m`'s user offers on target $1. A member leaving the target in
// the current run has none. The member's state is a subquery so that it is one index lookup
// per member whatever the table statistics say (the state table fills during a first run,
// after they were taken; a join planned from them read every user's state for each batch).
macro_rules! member_remote_id {
    () => {
        "(SELECT CASE WHEN ms.status = 'leaving' THEN NULL ELSE ms.remote_id END \
         FROM sync_state ms WHERE ms.target = $1 AND ms.kind = 'user' AND ms.local_id = m.user_id)"
    };
}

// The target's member epoch (0 before any user was provisioned there): the sum of its
// stripes (PostgreSQL keeps 16 a target so that writers need not wait for each other, see
// migration 0011; SQLite one).
macro_rules! member_epoch {
    () => {
        "SELECT COALESCE((SELECT CAST(SUM(me.epoch) AS BIGINT) FROM member_epochs me \
         WHERE me.target = $1), 0) AS epoch"
    };
}

// A group unchanged since sent: synced, made from this revision of its row with these scripts
// and settings ($5: "<fingerprint>:"), and its members' remote ids (those of its members that
// are provisioned and not leaving; sorted by bytes and distinct, as the engine records them)
// are the ones recorded. Both databases write the array as the engine does: no spaces.
// Columns: id, same, and the key to record when the group is the same but its key is not
// (PostgreSQL: the member epoch moved, see below).
macro_rules! group_unchanged_base {
    () => {
        "s.status = 'synced' AND s.remote_id IS NOT NULL \
         AND s.resource_hash IS NOT NULL AND s.last_resource IS NOT NULL"
    };
}

// The key base of group `g`: "<fingerprint>:<revision>" ($5 "<fingerprint>:"); its current
// key adds ":<member epoch>". Both databases' group scans and settling passes build on it.
macro_rules! group_key_base {
    () => {
        "(CAST($5 AS TEXT) || CAST(g.rev AS TEXT))"
    };
}

// SQLite's group scan, as PostgreSQL's below (member epochs since its migration 0010), without
// LATERAL: the verdict in a subquery.
const GROUP_SCAN_SQLITE: &str = concat!(
    "SELECT id, verdict IS NOT NULL AS same, NULLIF(verdict, '') AS rekey FROM (\
     SELECT g.id, CASE WHEN NOT COALESCE(",
    group_unchanged_base!(),
    " AND (s.source_key = ",
    group_key_base!(),
    " OR substr(s.source_key, 1, length(",
    group_key_base!(),
    ") + 1) = ",
    group_key_base!(),
    " || ':'), FALSE) THEN NULL \
     WHEN s.source_key = ",
    group_key_base!(),
    " || ':' || e.epoch THEN '' \
     WHEN s.members = (SELECT json_group_array(r.rid ORDER BY r.rid) \
     FILTER (WHERE r.rid IS NOT NULL) FROM (SELECT DISTINCT ",
    member_remote_id!(),
    " AS rid FROM memberships m WHERE m.group_id = g.id) r) THEN ",
    group_key_base!(),
    " || ':' || e.epoch END AS verdict FROM groups g",
    state_join!(sqlite, "group", "g"),
    "CROSS JOIN (",
    member_epoch!(),
    ") e WHERE g.id > $2 AND ($4 IS NULL OR g.id <= $4) ORDER BY g.id LIMIT $3) ORDER BY id"
);

// PostgreSQL's keys for groups end in the target's member epoch (migration 0007): while a
// group's key is current, neither its row, its memberships nor any member's remote id moved,
// and its members are not looked up at all. A key of the same revision but an older epoch
// still compares the members; when they are the same, the scan hands back the current key to
// record (the verdict column: NULL changed, '' same, else same with this key).
const GROUP_SCAN_POSTGRES: &str = concat!(
    "SELECT g.id, v.verdict IS NOT NULL AS same, NULLIF(v.verdict, '') AS rekey \
     FROM groups g",
    state_join!(postgres, "group", "g"),
    "CROSS JOIN (",
    member_epoch!(),
    ") e CROSS JOIN LATERAL (SELECT ",
    group_key_base!(),
    " AS base) k \
     CROSS JOIN LATERAL (SELECT k.base || ':' || e.epoch AS current) c \
     CROSS JOIN LATERAL (SELECT CASE WHEN NOT COALESCE(",
    group_unchanged_base!(),
    " AND (s.source_key = k.base OR starts_with(s.source_key, k.base || ':')), FALSE) \
     THEN NULL \
     WHEN s.source_key = c.current THEN '' \
     WHEN s.members = (SELECT COALESCE(array_to_json(array_agg(r.rid ORDER BY r.rid) \
     FILTER (WHERE r.rid IS NOT NULL))::text, '[]') FROM (SELECT DISTINCT ",
    member_remote_id!(),
    " COLLATE \"C\" AS rid FROM memberships m WHERE m.group_id = g.id) r) \
     THEN c.current END AS verdict) v \
     WHERE g.id > $2 AND ($4 IS NULL OR g.id <= $4) ORDER BY g.id LIMIT $3"
);

// Settling a phase's quiet batches: every pending job of run $2's phase $3 (but job $4, the
// phase's first, which runs this) whose range holds no object that the phase would map or
// send is marked done, its result its counts of unchanged and skipped objects. One pass over
// the objects and their states instead of one scan and one claim a batch: a no-op sync of
// 100,000 users was 1,000 of each. Each object is placed in its job's range by counting the
// range bounds (the jobs' `until_id`s) that sort before it: bounds and objects in one ordered
// stream, a running sum of bounds. A plain join with the states (PostgreSQL hashes it). The
// ordering is the database's, as when the bounds were made (`start_run_with_jobs`).
// Only jobs still pending and not being claimed are settled (PostgreSQL: locked first, skipping
// any a claim holds, so the two never wait on each other); other processes' workers claim and
// work the phase's other jobs meanwhile as usual (this process's own workers wait, see `Engine::claim_turn`).
// `$objects`: a select of (id, 0, changed, skipped) over every object of the phase: changed 1
// when its batch has something to do for it, skipped 1 when it is out of scope with nothing
// to take back (counted as skipped, as its batch would).
macro_rules! settle_quiet {
    ($objects:expr, $lock:literal) => {
        concat!(
            "WITH b AS (SELECT id, until_id FROM jobs WHERE run_id = $2 AND phase = $3), \
             free AS (SELECT id FROM jobs WHERE run_id = $2 AND phase = $3 \
                 AND status = 'pending'",
            $lock,
            "), \
             marks AS (SELECT until_id AS id, 1 AS bound, 0 AS changed, 0 AS skipped FROM b \
                 WHERE until_id IS NOT NULL UNION ALL ",
            $objects,
            "), placed AS (SELECT bound, changed, skipped, SUM(bound) OVER (ORDER BY id, bound \
                 ROWS UNBOUNDED PRECEDING) - bound AS k FROM marks), \
             per_range AS (SELECT k, SUM(1 - bound - skipped) AS n, SUM(changed) AS changed, \
                 SUM(skipped) AS skipped FROM placed GROUP BY k), \
             ranked AS (SELECT id, ROW_NUMBER() OVER (ORDER BY until_id IS NULL, until_id) \
                 - 1 AS k FROM b), \
             quiet AS (SELECT ranked.id, COALESCE(per_range.n, 0) AS n, \
                 COALESCE(per_range.skipped, 0) AS skipped FROM ranked \
                 LEFT JOIN per_range ON per_range.k = ranked.k \
                 WHERE ranked.id IN (SELECT id FROM free) AND ranked.id <> $4 \
                 AND COALESCE(per_range.changed, 0) = 0) \
             UPDATE jobs SET status = 'done', lease_until = NULL, \
                 result = '{\"unchanged\":' || quiet.n || ',\"skipped\":' || quiet.skipped || '}' \
             FROM quiet WHERE jobs.id = quiet.id AND jobs.status = 'pending' \
             RETURNING jobs.result"
        )
    };
}

// Users: unchanged as the user scan tells it ($5 "<fingerprint>:", $6 excludes service
// accounts); a service account the target excludes and never got is skipped.
macro_rules! settle_users {
    ($lock:literal) => {
        settle_quiet!(
            concat!(
                "SELECT u.id, 0, CASE WHEN COALESCE(",
                user_unchanged!(),
                ", FALSE) OR (",
                user_excluded_untouched!(),
                ") THEN 0 ELSE 1 END, CASE WHEN ",
                user_excluded_untouched!(),
                " THEN 1 ELSE 0 END FROM users u LEFT JOIN sync_state s \
                 ON s.target = $1 AND s.kind = 'user' AND s.local_id = u.id"
            ),
            $lock
        )
    };
}

const SETTLE_USERS_SQLITE: &str = settle_users!("");
const SETTLE_USERS_POSTGRES: &str = settle_users!(" FOR UPDATE SKIP LOCKED");

// Groups: quiet only with the current key (member epoch included); a group recorded at an
// older epoch is left to its batch, which compares its members and records the new key.
macro_rules! settle_groups {
    ($lock:literal) => {
        settle_quiet!(
            concat!(
                "SELECT g.id, 0, CASE WHEN COALESCE(",
                group_unchanged_base!(),
                " AND s.source_key = ",
                group_key_base!(),
                " || ':' || e.epoch, FALSE) \
                 THEN 0 ELSE 1 END, 0 FROM groups g LEFT JOIN sync_state s \
                 ON s.target = $1 AND s.kind = 'group' AND s.local_id = g.id CROSS JOIN (",
                member_epoch!(),
                ") e"
            ),
            $lock
        )
    };
}

const SETTLE_GROUPS_SQLITE: &str = settle_groups!("");
const SETTLE_GROUPS_POSTGRES: &str = settle_groups!(" FOR UPDATE SKIP LOCKED");

const GROUP_ONE: &str = "SELECT g.id, g.name, g.attributes, g.rev, s.remote_id, \
     s.resource_hash, s.last_resource, s.members, s.status, s.last_error, s.attempts, \
     s.source_hash, s.source_key \
     FROM groups g LEFT JOIN sync_state s ON s.target = $1 AND s.kind = 'group' AND s.local_id = g.id \
     WHERE g.id = $2";

// A batch's members (20 a group, 2,000 a batch) come as one JSON array of [group, user,
// remote id] in one row: row by row, SQLite's driver hands each row from its thread to ours,
// and those hand-offs were most of a no-op sync's group phase.
// Then the member epoch the remote ids were read at (PostgreSQL; the same statement, so the
// same snapshot).
const MEMBERS_RANGE_SQLITE: &str = concat!(
    "SELECT json_group_array(json_array(m.group_id, m.user_id, ",
    member_remote_id!(),
    ") ORDER BY m.group_id, m.user_id), (",
    member_epoch!(),
    ") FROM memberships m WHERE m.group_id >= $2 AND m.group_id <= $3"
);

const MEMBERS_RANGE_POSTGRES: &str = concat!(
    "SELECT COALESCE(json_agg(json_build_array(m.group_id, m.user_id, ",
    member_remote_id!(),
    ") ORDER BY m.group_id, m.user_id), '[]')::text, (",
    member_epoch!(),
    ") FROM memberships m WHERE m.group_id >= $2 AND m.group_id <= $3"
);

// Pending jobs first, then those whose worker died: each condition alone walks an index in
// claim order and stops at the first claimable job (together, every open job of the run was
// read and sorted for each claim: quadratic in the run's size). `$3 > 0` only gives both the
// same parameters.
const CLAIM_ORDER: [&str; 2] = [
    "j.status = 'pending' AND $3 > 0",
    "j.status = 'running' AND j.lease_until < $3",
];

const FINISH_JOB: &str = "UPDATE jobs SET status = 'done', result = $3, lease_until = NULL \
     WHERE id = $1 AND holder = $2 AND status = 'running'";

const UPSERT_USER: &str = "INSERT INTO users (id, username, email, name, given_name, family_name, \
     active, service_account, attributes, content_hash, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
     ON CONFLICT (id) DO UPDATE SET username = excluded.username, email = excluded.email, \
     name = excluded.name, given_name = excluded.given_name, family_name = excluded.family_name, \
     active = excluded.active, service_account = excluded.service_account, \
     attributes = excluded.attributes, content_hash = excluded.content_hash, \
     updated_at = excluded.updated_at \
     WHERE users.content_hash <> excluded.content_hash";

const UPSERT_GROUP: &str = "INSERT INTO groups (id, name, attributes, content_hash, updated_at) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (id) DO UPDATE SET name = excluded.name, attributes = excluded.attributes, \
     content_hash = excluded.content_hash, updated_at = excluded.updated_at \
     WHERE groups.content_hash <> excluded.content_hash";

/// A multi-row upsert: `head`, then one `(…)` tuple of `params` placeholders (and `fixed`
/// literal columns after them) per row, then `tail`.
struct MultiRow {
    head: &'static str,
    params: usize,
    fixed: &'static str,
    tail: &'static str,
}

const SAVE_SYNCED: MultiRow = MultiRow {
    head: "INSERT INTO sync_state (target, kind, local_id, remote_id, resource_hash, \
           last_resource, members, updated_at, source_hash, source_key, status, last_error, \
           attempts) VALUES ",
    params: 10,
    fixed: ", 'synced', NULL, 0",
    tail: " ON CONFLICT (target, kind, local_id) DO UPDATE SET \
           remote_id = excluded.remote_id, resource_hash = excluded.resource_hash, \
           last_resource = excluded.last_resource, source_hash = excluded.source_hash, \
           source_key = excluded.source_key, members = excluded.members, status = 'synced', \
           last_error = NULL, attempts = 0, updated_at = excluded.updated_at, next_attempt_at = NULL",
};

const SAVE_ATTEMPTS: MultiRow = MultiRow {
    head: "INSERT INTO sync_state (target, kind, local_id, last_resource, updated_at, status, \
           attempts) VALUES ",
    params: 5,
    fixed: ", 'creating', 0",
    tail: " ON CONFLICT (target, kind, local_id) DO UPDATE SET \
           last_resource = excluded.last_resource, updated_at = excluded.updated_at \
           WHERE sync_state.remote_id IS NULL",
};

// VALUES columns are named column1, column2, ... on both databases.
const SAVE_KEYS: MultiRow = MultiRow {
    head: "UPDATE sync_state SET source_key = v.column4 FROM (VALUES ",
    params: 4,
    fixed: "",
    tail: ") AS v WHERE sync_state.target = v.column1 AND sync_state.kind = v.column2 \
           AND sync_state.local_id = v.column3",
};

/// How long the batch jobs of a finished run are kept (for its summary) once it ended.
const JOBS_KEPT_MS: i64 = 10 * 60 * 1000;

/// Rows per multi-row statement: 10 parameters a row stays far below both databases' limits.
const STATE_CHUNK: usize = 100;

impl MultiRow {
    /// The statement for `rows` rows.
    fn sql(&self, numbered: bool, rows: usize) -> String {
        let mut sql = String::with_capacity(self.head.len() + self.tail.len() + rows * 64);
        sql.push_str(self.head);
        for r in 0..rows {
            sql.push_str(if r == 0 { "(" } else { ", (" });
            for p in 0..self.params {
                if p > 0 {
                    sql.push_str(", ");
                }
                push_placeholder(&mut sql, numbered, r * self.params + p + 1);
            }
            sql.push_str(self.fixed);
            sql.push(')');
        }
        sql.push_str(self.tail);
        sql
    }
}

/// Parameter `n` (1-based): `$n` where placeholders are numbered (PostgreSQL), else `?`.
/// SQLite gets anonymous ones: it looks numbered ones up by a linear scan per parameter, which
/// costs quadratic time in a statement of a thousand.
fn push_placeholder(sql: &mut String, numbered: bool, n: usize) {
    if numbered {
        use std::fmt::Write;
        let _ = write!(sql, "${n}");
    } else {
        sql.push('?');
    }
}

/// Bytes of bound values per multi-row statement on PostgreSQL. sqlx does not set TCP_NODELAY:
/// a statement bigger than the socket's initial send buffer (16 KiB on Linux) goes out in two
/// writes, and Nagle holds the second until the server's delayed ACK, 40 ms later (measured:
/// statements of 72 state rows took 43 ms, of 28 rows 0.7 ms).
const PG_STATEMENT_BYTES: usize = 12 * 1024;

/// Consecutive slices of at most `STATE_CHUNK` writes and (roughly) `max_bytes` bytes; a write
/// bigger than that goes alone.
fn chunks_by_size(writes: &[StateWrite], max_bytes: usize) -> Vec<&[StateWrite]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, w) in writes.iter().enumerate() {
        let len = w.approx_len();
        if i > start && (i - start >= STATE_CHUNK || bytes + len > max_bytes) {
            out.push(&writes[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < writes.len() {
        out.push(&writes[start..]);
    }
    out
}

/// Keeps the last write of each object, in their original order.
fn dedup_last(writes: &mut Vec<StateWrite>) {
    let mut seen = HashSet::new();
    let mut kept: Vec<StateWrite> = writes
        .drain(..)
        .rev()
        .filter(|w| seen.insert(w.object()))
        .collect();
    kept.reverse();
    *writes = kept;
}

const SAVE_FAILED: &str = "INSERT INTO sync_state (target, kind, local_id, status, last_error, \
     attempts, updated_at, next_attempt_at) VALUES ($1, $2, $3, 'failed', $4, 1, $5, $6) \
     ON CONFLICT (target, kind, local_id) DO UPDATE SET status = 'failed', \
     last_error = excluded.last_error, \
     attempts = CASE WHEN sync_state.status = 'failed' THEN sync_state.attempts + 1 ELSE 1 END, \
     updated_at = excluded.updated_at, next_attempt_at = excluded.next_attempt_at";

/// Milliseconds before retry number `attempts + 1`: 30 s doubling, at most an hour, with up to
/// 10% jitter derived from the object (so a mass failure does not retry in one burst).
pub fn retry_delay_ms(attempts: i64, local_id: &str) -> i64 {
    let base: i64 = 30_000i64
        .saturating_mul(1i64 << attempts.clamp(0, 7))
        .min(3_600_000);
    let spread = local_id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    base + (spread % (base as u64 / 10 + 1)) as i64
}

// Records orphan checks that found nothing: `$rows`, a VALUES or SELECT of (target, kind,
// deletions, checked_at), the deletion log's sum as read before the check.
macro_rules! record_orphan_checks {
    ($rows:literal) => {
        concat!(
            "INSERT INTO orphan_checks (target, kind, deletions, checked_at) ",
            $rows,
            " ON CONFLICT (target, kind) DO UPDATE SET \
             deletions = excluded.deletions, checked_at = excluded.checked_at"
        )
    };
}

/// Deletion rows of a kind past which a reader folds them into one.
const DELETION_ROWS_FOLDED_AT: i64 = 256;

impl Store {
    /// Opens (creating a SQLite file on first use) and migrates the database.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // WAL with NORMAL: no fsync per commit, still never corrupt; a power cut may
                // lose the last commits, which the next run redoes (sends are idempotent).
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                // A connection's thread hands rows over through a channel of this many (sqlx:
                // 50). A batch's scan (100 rows) or its members (up to 2,000) filled it and
                // the thread then slept until the engine took some, two context switches
                // each time: a 30k first sync switched threads 18–31k times, 14–15k now.
                // 1,024 saved a little more (13k) but put 6 MB on the peak RSS at 100k.
                .row_buffer_size(256)
                .foreign_keys(true);
            let pool = |connections: u32| {
                SqlitePoolOptions::new()
                    .max_connections(connections)
                    // A file's connection cannot go stale the way a server's can: the check
                    // before each use (on by default) was one more hand-off to the
                    // connection's thread for every statement, a third of every BEGIN's time
                    // in a first sync.
                    .test_before_acquire(false)
                    .after_connect(|conn, _| Box::pin(async move { stable_plans(conn).await }))
            };
            let writes = pool(1).connect_with(opts.clone()).await?;
            sqlx::migrate!("migrations/sqlite").run(&writes).await?;
            let reads = pool(3).connect_with(opts).await?;
            Backend::Sqlite { reads, writes }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            // Commits need not wait for the WAL flush: a crash of scimsync loses nothing (the
            // server has it), a crash of the server only the last moments, which runs redo.
            // Plans are made for each statement's actual values: a generic plan of the batch
            // scans (keyset bounds, LIMIT) joined a whole table per batch once the state
            // table grew (100k users: 0.5 s a batch instead of milliseconds).
            let opts = sqlx::postgres::PgConnectOptions::from_str(url)?.options([
                ("synchronous_commit", "off"),
                ("plan_cache_mode", "force_custom_plan"),
            ]);
            let pool = PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Backend::Postgres(pool)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        Ok(Store {
            backend: std::sync::Arc::new(backend),
            write_gate: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// This process's turn to write (SQLite only; PostgreSQL takes concurrent writers).
    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &*self.backend {
            Backend::Sqlite { .. } => Some(self.write_gate.lock().await),
            Backend::Postgres(_) => None,
        }
    }

    /// How a write transaction (import, state writes, a run's jobs) begins. On PostgreSQL its
    /// statements may be planned once per connection: unlike the scans (see `connect`) they
    /// have one good plan whatever their values; planning every upsert anew took a quarter of
    /// an import (a first sync's server CPU did not move measurably).
    fn write_begin(&self) -> &'static str {
        self.per_backend("BEGIN", "BEGIN; SET LOCAL plan_cache_mode = auto")
    }

    /// Whether statements built here number their placeholders (see `push_placeholder`).
    fn numbered_placeholders(&self) -> bool {
        matches!(&*self.backend, Backend::Postgres(_))
    }

    /// The statement written for this database, where the two differ.
    fn per_backend(&self, sqlite: &'static str, postgres: &'static str) -> &'static str {
        match &*self.backend {
            Backend::Sqlite { .. } => sqlite,
            Backend::Postgres(_) => postgres,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match &*self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    pub async fn close(&self) {
        on_pool!(self, |p| p.close().await)
    }

    /// Applies one import file in one transaction: every line or none.
    /// `records` carry their 1-based line numbers for error messages.
    pub async fn import(
        &self,
        records: &[(usize, Record)],
        prune: bool,
    ) -> Result<ImportSummary, StoreError> {
        let _turn = self.write_turn().await;
        let now = now_ms();
        let summary = on_write_pool!(self, |pool| {
            let mut tx = pool.begin_with(self.write_begin()).await?;
            let mut summary = ImportSummary::default();
            let mut memberships: Vec<(usize, &Group)> = Vec::new();
            let mut user_ids = HashSet::new();
            let mut group_ids = HashSet::new();
            for (line, rec) in records {
                let line = *line;
                let db_err = |e: sqlx::Error| StoreError::Import {
                    line,
                    message: e.to_string(),
                };
                match rec {
                    Record::User(u) => {
                        user_ids.insert(u.id.as_str());
                        let res = sqlx::query(UPSERT_USER)
                            .bind(&u.id)
                            .bind(&u.username)
                            .bind(&u.email)
                            .bind(&u.name)
                            .bind(&u.given_name)
                            .bind(&u.family_name)
                            .bind(u.active)
                            .bind(u.service_account)
                            .bind(Value::Object(u.attributes.clone()).to_string())
                            .bind(u.content_hash())
                            .bind(now)
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| {
                                if is_unique_violation(&e) {
                                    StoreError::Import {
                                        line,
                                        message: format!(
                                            "user {}: username {:?} belongs to another user",
                                            u.id, u.username
                                        ),
                                    }
                                } else {
                                    db_err(e)
                                }
                            })?;
                        if res.rows_affected() > 0 {
                            summary.users_changed += 1;
                        } else {
                            summary.unchanged += 1;
                        }
                    }
                    Record::Group(g) => {
                        group_ids.insert(g.id.as_str());
                        let res = sqlx::query(UPSERT_GROUP)
                            .bind(&g.id)
                            .bind(&g.name)
                            .bind(Value::Object(g.attributes.clone()).to_string())
                            .bind(g.content_hash())
                            .bind(now)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                        if res.rows_affected() > 0 {
                            summary.groups_changed += 1;
                        } else {
                            summary.unchanged += 1;
                        }
                        memberships.push((line, g));
                    }
                    Record::DeleteUser(id) => {
                        user_ids.insert(id.as_str());
                        let res = sqlx::query("DELETE FROM users WHERE id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                        summary.deleted += res.rows_affected();
                    }
                    Record::DeleteGroup(id) => {
                        group_ids.insert(id.as_str());
                        let res = sqlx::query("DELETE FROM groups WHERE id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db_err)?;
                        summary.deleted += res.rows_affected();
                    }
                }
            }
            // Members are applied after every line, so a group may name users defined below it.
            for (line, g) in memberships {
                let db_err = |e: sqlx::Error| StoreError::Import {
                    line,
                    message: e.to_string(),
                };
                let current: Vec<(String,)> =
                    sqlx::query_as("SELECT user_id FROM memberships WHERE group_id = $1")
                        .bind(&g.id)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(db_err)?;
                let current: BTreeSet<String> = current.into_iter().map(|(u,)| u).collect();
                let wanted: BTreeSet<&String> = g.members.iter().collect();
                let mut changed = false;
                for uid in &wanted {
                    if current.contains(*uid) {
                        continue;
                    }
                    let exists: Option<(String,)> =
                        sqlx::query_as("SELECT id FROM users WHERE id = $1")
                            .bind(*uid)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(db_err)?;
                    if exists.is_none() {
                        return Err(StoreError::Import {
                            line,
                            message: format!(
                                "group {}: member {uid:?} is not a user in the directory",
                                g.id
                            ),
                        });
                    }
                    sqlx::query("INSERT INTO memberships (group_id, user_id) VALUES ($1, $2)")
                        .bind(&g.id)
                        .bind(*uid)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                    changed = true;
                }
                for uid in current.iter().filter(|u| !wanted.contains(u)) {
                    sqlx::query("DELETE FROM memberships WHERE group_id = $1 AND user_id = $2")
                        .bind(&g.id)
                        .bind(uid)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                    changed = true;
                }
                if changed {
                    summary.groups_changed += 1;
                }
            }
            if prune {
                let all: Vec<(String,)> = sqlx::query_as("SELECT id FROM groups")
                    .fetch_all(&mut *tx)
                    .await?;
                for (id,) in all.iter().filter(|(id,)| !group_ids.contains(id.as_str())) {
                    sqlx::query("DELETE FROM groups WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    summary.deleted += 1;
                }
                let all: Vec<(String,)> = sqlx::query_as("SELECT id FROM users")
                    .fetch_all(&mut *tx)
                    .await?;
                for (id,) in all.iter().filter(|(id,)| !user_ids.contains(id.as_str())) {
                    sqlx::query("DELETE FROM users WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    summary.deleted += 1;
                }
            }
            tx.commit().await?;
            Ok::<_, StoreError>(summary)
        })?;
        if records.len() > 1000 {
            self.refresh_statistics().await?;
        }
        Ok(summary)
    }

    /// Up to `limit` users with ids after `after`: those sent before and made from this
    /// revision of their row with `fingerprint` (the scripts' and settings', see
    /// [`Source::key`]; None: none counts as unchanged) as their id alone, the others in full
    /// with the summary of their state on `target`; [`Store::states`] reads the full state of
    /// those that need it.
    pub async fn user_scan(
        &self,
        target: &str,
        after: &str,
        until: Option<&str>,
        limit: u32,
        fingerprint: Option<&str>,
        excludes_service_accounts: bool,
    ) -> Result<Vec<Scanned>, StoreError> {
        let prefix = fingerprint.map(Source::key_prefix);
        let sql = self.per_backend(USER_SCAN_SQLITE, USER_SCAN_POSTGRES);
        let rows: Vec<UserScanRow> = on_pool!(self, |p| sqlx::query_as(sql)
            .bind(target)
            .bind(after)
            .bind(i64::from(limit))
            .bind(until)
            .bind(prefix.as_deref())
            .bind(excludes_service_accounts)
            .fetch_all(p)
            .await)?;
        rows.into_iter().map(UserScanRow::into_scanned).collect()
    }

    /// The full states of these objects on `target` (those that have one).
    pub async fn states(
        &self,
        target: &str,
        kind: Kind,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, SyncState>, StoreError> {
        let mut out = std::collections::HashMap::with_capacity(ids.len());
        let numbered = self.numbered_placeholders();
        for chunk in ids.chunks(STATE_CHUNK) {
            let mut sql =
                format!("SELECT s.local_id, {STATE_COLS} FROM sync_state s WHERE s.target = ");
            push_placeholder(&mut sql, numbered, 1);
            sql.push_str(" AND s.kind = ");
            push_placeholder(&mut sql, numbered, 2);
            sql.push_str(" AND s.local_id IN (");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                push_placeholder(&mut sql, numbered, i + 3);
            }
            sql.push(')');
            let rows: Vec<OrphanRow> = on_pool!(self, |p| {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(target)
                    .bind(kind.as_str());
                for id in chunk {
                    q = q.bind(*id);
                }
                q.fetch_all(p).await
            })?;
            for o in orphans_from(rows)? {
                out.insert(o.local_id, o.state);
            }
        }
        Ok(out)
    }

    pub async fn user(
        &self,
        target: &str,
        id: &str,
    ) -> Result<Option<(User, i64, Option<SyncState>)>, StoreError> {
        let row: Option<UserRow> = on_pool!(self, |p| sqlx::query_as(USER_ONE)
            .bind(target)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        row.map(UserRow::split).transpose()
    }

    /// The ids of up to `limit` groups after `after`, each with whether it is unchanged since
    /// sent to `target` (its row's revision and `fingerprint`, see [`Source::key_of`], and its
    /// members' remote ids) and, for an unchanged group whose key is out of date, the key to
    /// record; None as the fingerprint: none is.
    pub async fn group_scan(
        &self,
        target: &str,
        after: &str,
        until: Option<&str>,
        limit: u32,
        fingerprint: Option<&str>,
    ) -> Result<Vec<ScannedGroup>, StoreError> {
        let prefix = fingerprint.map(Source::key_prefix);
        let sql = self.per_backend(GROUP_SCAN_SQLITE, GROUP_SCAN_POSTGRES);
        Ok(on_pool!(self, |p| sqlx::query_as(sql)
            .bind(target)
            .bind(after)
            .bind(i64::from(limit))
            .bind(until)
            .bind(prefix.as_deref())
            .fetch_all(p)
            .await)?)
    }

    /// Up to `limit` groups after `after`, each with its members (and their remote ids on
    /// `target`) and its own state on `target`.
    pub async fn group_batch(
        &self,
        target: &str,
        after: &str,
        until: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredGroup>, StoreError> {
        let sql = self.per_backend(GROUP_BATCH_SQLITE, GROUP_BATCH_POSTGRES);
        let rows: Vec<GroupRow> = on_pool!(self, |p| sqlx::query_as(sql)
            .bind(target)
            .bind(after)
            .bind(i64::from(limit))
            .bind(until)
            .fetch_all(p)
            .await)?;
        self.attach_members(target, rows).await
    }

    pub async fn group(&self, target: &str, id: &str) -> Result<Option<StoredGroup>, StoreError> {
        let rows: Vec<GroupRow> = on_pool!(self, |p| sqlx::query_as(GROUP_ONE)
            .bind(target)
            .bind(id)
            .fetch_all(p)
            .await)?;
        Ok(self.attach_members(target, rows).await?.into_iter().next())
    }

    async fn attach_members(
        &self,
        target: &str,
        rows: Vec<GroupRow>,
    ) -> Result<Vec<StoredGroup>, StoreError> {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(Vec::new());
        };
        // One range query for the whole batch: the batch is a contiguous id range.
        let sql = self.per_backend(MEMBERS_RANGE_SQLITE, MEMBERS_RANGE_POSTGRES);
        let (json, members_epoch): (String, Option<i64>) = on_pool!(self, |p| sqlx::query_as(sql)
            .bind(target)
            .bind(&first.id)
            .bind(&last.id)
            .fetch_one(p)
            .await)?;
        let members: Vec<MemberRow> =
            serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                what: "members",
                id: format!("groups {} to {}", first.id, last.id),
                message: e.to_string(),
            })?;
        // Matched by id, not by walking both lists in step: the database orders ids by its
        // collation, which need not be bytewise as Rust compares them (ICU or en_US on
        // PostgreSQL sorts `g_a` before `g-b`), and a group passed over came out empty.
        // Within a group the members keep the database's order.
        let mut by_group: HashMap<String, Vec<Member>> = HashMap::with_capacity(rows.len());
        for MemberRow(group_id, user_id, remote_id) in members {
            by_group
                .entry(group_id)
                .or_default()
                .push(Member { user_id, remote_id });
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let list = by_group.remove(&row.id).unwrap_or_default();
            let state = row.state.into_state(&row.id)?;
            let attributes = attrs(&row.id, &row.attributes)?;
            let group = Group {
                members: list.iter().map(|m| m.user_id.clone()).collect(),
                id: row.id,
                name: row.name,
                attributes,
            };
            let rev = GroupRev {
                rev: row.rev,
                members_epoch,
            };
            out.push((group, rev, list, state));
        }
        Ok(out)
    }

    pub async fn count(&self, kind: Kind) -> Result<i64, StoreError> {
        let sql = match kind {
            Kind::User => "SELECT COUNT(*) FROM users",
            Kind::Group => "SELECT COUNT(*) FROM groups",
        };
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(sql).fetch_one(p).await)?;
        Ok(n)
    }

    /// Objects with a remote id on `target`: the base of a percent deletion limit.
    pub async fn count_provisioned(&self, target: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(
            "SELECT COUNT(*) FROM sync_state WHERE target = $1 AND remote_id IS NOT NULL"
        )
        .bind(target)
        .fetch_one(p)
        .await)?;
        Ok(n)
    }

    /// Whether an orphan check of `kind` on `target` can be skipped: nothing left the
    /// directory (no DELETE, TRUNCATE or changed id of that kind) since a check that found no
    /// orphan, made within `max_age_ms`. Also the sum of deletions as it is now, to record
    /// with [`Store::record_orphan_check`] if the check is made and finds nothing.
    pub async fn orphans_unchanged(
        &self,
        target: &str,
        kind: Kind,
        max_age_ms: i64,
    ) -> Result<(bool, i64), StoreError> {
        let (now, rows, recorded): (i64, i64, Option<i64>) = on_pool!(self, |p| sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(d.n), 0) AS BIGINT), COUNT(*), \
             (SELECT o.deletions FROM orphan_checks o \
              WHERE o.target = $1 AND o.kind = $2 AND o.checked_at >= $3) \
             FROM directory_deletions d WHERE d.kind = $2"
        )
        .bind(target)
        .bind(kind.as_str())
        .bind(now_ms() - max_age_ms)
        .fetch_one(p)
        .await)?;
        if rows > DELETION_ROWS_FOLDED_AT {
            self.fold_deletions(kind).await?;
        }
        Ok((recorded == Some(now), now))
    }

    /// Folds the deletion rows of `kind` into one, keeping their sum: rows are only added
    /// (no lock for hosts' deletions to wait on), so a table that is never folded grows.
    async fn fold_deletions(&self, kind: Kind) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        match &*self.backend {
            // One statement: the rows summed are exactly the rows deleted, whatever commits
            // meanwhile.
            Backend::Postgres(p) => {
                sqlx::query(
                    "WITH gone AS (DELETE FROM directory_deletions WHERE kind = $1 RETURNING n) \
                     INSERT INTO directory_deletions (kind, n) \
                     SELECT $1, SUM(n) FROM gone HAVING COUNT(*) > 0",
                )
                .bind(kind.as_str())
                .execute(p)
                .await?;
            }
            // SQLite has no DELETE in a WITH. A transaction that takes the write lock first
            // sees no other writer until it ends, so the rows summed are the rows deleted.
            Backend::Sqlite { writes: p, .. } => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                let (sum,): (Option<i64>,) =
                    sqlx::query_as("SELECT SUM(n) FROM directory_deletions WHERE kind = $1")
                        .bind(kind.as_str())
                        .fetch_one(&mut *tx)
                        .await?;
                sqlx::query("DELETE FROM directory_deletions WHERE kind = $1")
                    .bind(kind.as_str())
                    .execute(&mut *tx)
                    .await?;
                if let Some(sum) = sum {
                    sqlx::query("INSERT INTO directory_deletions (kind, n) VALUES ($1, $2)")
                        .bind(kind.as_str())
                        .bind(sum)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Records that an orphan check of `kind` on `target`, made when the deletion log's sum
    /// stood at `deletions`, found nothing.
    pub async fn record_orphan_check(
        &self,
        target: &str,
        kind: Kind,
        deletions: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| sqlx::query(record_orphan_checks!(
            "VALUES ($1, $2, $3, $4)"
        ))
        .bind(target)
        .bind(kind.as_str())
        .bind(deletions)
        .bind(now_ms())
        .execute(p)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// State rows on `target` whose directory object no longer exists.
    pub async fn orphans(&self, target: &str, kind: Kind) -> Result<Vec<Orphan>, StoreError> {
        let sql = match kind {
            Kind::User => format!(
                "SELECT s.local_id, {STATE_COLS} FROM sync_state s \
                 LEFT JOIN users u ON u.id = s.local_id \
                 WHERE s.target = $1 AND s.kind = 'user' AND u.id IS NULL ORDER BY s.local_id"
            ),
            Kind::Group => format!(
                "SELECT s.local_id, {STATE_COLS} FROM sync_state s \
                 LEFT JOIN groups g ON g.id = s.local_id \
                 WHERE s.target = $1 AND s.kind = 'group' AND g.id IS NULL ORDER BY s.local_id"
            ),
        };
        let rows: Vec<OrphanRow> = on_pool!(self, |p| sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(target)
            .fetch_all(p)
            .await)?;
        orphans_from(rows)
    }

    pub async fn state(
        &self,
        target: &str,
        kind: Kind,
        local_id: &str,
    ) -> Result<Option<SyncState>, StoreError> {
        let sql = format!(
            "SELECT {STATE_COLS} FROM sync_state s \
             WHERE s.target = $1 AND s.kind = $2 AND s.local_id = $3"
        );
        let row: Option<StateCols> = on_pool!(self, |p| sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(target)
            .bind(kind.as_str())
            .bind(local_id)
            .fetch_optional(p)
            .await)?;
        match row {
            Some(r) => r.into_state(local_id),
            None => Ok(None),
        }
    }

    /// Applies the state writes of one batch in one transaction: write-ahead records first,
    /// then successes, then failures (the order one object's writes happen in), each kind as
    /// few multi-row statements, so a batch costs a handful of round trips, not one per object.
    pub async fn apply_state(
        &self,
        target: &str,
        writes: Vec<StateWrite>,
    ) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn().await;
        let now = now_ms();
        let mut attempts = Vec::new();
        let mut synced = Vec::new();
        let mut keys = Vec::new();
        let mut failed = Vec::new();
        for w in writes {
            match w {
                StateWrite::Attempt { .. } => attempts.push(w),
                StateWrite::Synced { .. } => synced.push(w),
                StateWrite::Key { .. } => keys.push(w),
                StateWrite::Failed { .. } => failed.push(w),
            }
        }
        // One row may appear once per statement (PostgreSQL refuses to upsert a row twice in
        // one statement): the last write of an object wins, as it would one at a time.
        dedup_last(&mut attempts);
        dedup_last(&mut synced);
        let numbered = self.numbered_placeholders();
        let max_bytes = if numbered {
            PG_STATEMENT_BYTES
        } else {
            usize::MAX
        };
        let statements: Vec<(&MultiRow, &[StateWrite])> = [
            (&attempts, &SAVE_ATTEMPTS),
            (&synced, &SAVE_SYNCED),
            (&keys, &SAVE_KEYS),
        ]
        .into_iter()
        .flat_map(|(rows, statement)| {
            chunks_by_size(rows, max_bytes)
                .into_iter()
                .map(move |chunk| (statement, chunk))
        })
        .collect();
        // On SQLite a lone statement (most batches: their creates' write-ahead records, or
        // their outcomes) is atomic by itself: without BEGIN and COMMIT it is one hand-off to
        // the connection's thread instead of three, all made while holding the one writer's
        // turn (a 20k first sync held it 0.9 s of 1.5, a quarter of that in BEGIN alone).
        // PostgreSQL keeps its transaction: it sets the plan cache mode (`write_begin`).
        let lone = !numbered && statements.len() == 1 && failed.is_empty();
        on_write_pool!(self, |pool| async {
            let mut tx = match lone {
                true => None,
                false => Some(pool.begin_with(self.write_begin()).await?),
            };
            for &(statement, chunk) in &statements {
                let sql = statement.sql(numbered, chunk.len());
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for w in chunk {
                    q = match w {
                        StateWrite::Attempt {
                            kind,
                            local_id,
                            resource,
                        } => q
                            .bind(target)
                            .bind(kind.as_str())
                            .bind(local_id)
                            .bind(resource)
                            .bind(now),
                        StateWrite::Synced {
                            kind,
                            local_id,
                            remote_id,
                            hash,
                            resource,
                            members,
                            source,
                        } => q
                            .bind(target)
                            .bind(kind.as_str())
                            .bind(local_id)
                            .bind(remote_id)
                            .bind(hash)
                            .bind(resource)
                            .bind(members)
                            .bind(now)
                            .bind(source.as_ref().map(|s| s.hash.as_str()))
                            .bind(source.as_ref().map(|s| s.key.as_str())),
                        StateWrite::Key {
                            kind,
                            local_id,
                            key,
                        } => q.bind(target).bind(kind.as_str()).bind(local_id).bind(key),
                        StateWrite::Failed { .. } => q,
                    };
                }
                match tx.as_mut() {
                    Some(tx) => q.execute(&mut **tx).await?,
                    None => q.execute(pool).await?,
                };
            }
            let Some(mut tx) = tx else {
                return Ok(());
            };
            // Failures are few; each needs its own backoff from its earlier attempts.
            for w in &failed {
                if let StateWrite::Failed {
                    kind,
                    local_id,
                    error,
                } = w
                {
                    let before: Option<(Option<i64>,)> = sqlx::query_as(
                        "SELECT attempts FROM sync_state WHERE target = $1 AND kind = $2 \
                         AND local_id = $3 AND status = 'failed'",
                    )
                    .bind(target)
                    .bind(kind.as_str())
                    .bind(local_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let attempts = before.and_then(|(a,)| a).unwrap_or(0);
                    sqlx::query(SAVE_FAILED)
                        .bind(target)
                        .bind(kind.as_str())
                        .bind(local_id)
                        .bind(error)
                        .bind(now)
                        .bind(now + retry_delay_ms(attempts, local_id))
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok::<_, StoreError>(())
        }
        .await)
    }

    /// Marks a provisioned object as leaving the target: it is no group's member any more and
    /// the run's deprovisioning removes it.
    pub async fn mark_leaving(
        &self,
        target: &str,
        kind: Kind,
        local_id: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        on_write_pool!(self, |p| sqlx::query(
            "UPDATE sync_state SET status = 'leaving', updated_at = $4 \
             WHERE target = $1 AND kind = $2 AND local_id = $3"
        )
        .bind(target)
        .bind(kind.as_str())
        .bind(local_id)
        .bind(now_ms())
        .execute(p)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Objects marked leaving on `target` (still in the directory, out of scope).
    pub async fn leaving(&self, target: &str, kind: Kind) -> Result<Vec<Orphan>, StoreError> {
        let sql = format!(
            "SELECT s.local_id, {STATE_COLS} FROM sync_state s \
             WHERE s.target = $1 AND s.kind = $2 AND s.status = 'leaving' ORDER BY s.local_id"
        );
        let rows: Vec<OrphanRow> = on_pool!(self, |p| sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(target)
            .bind(kind.as_str())
            .fetch_all(p)
            .await)?;
        orphans_from(rows)
    }

    /// Failed objects on `target` whose next attempt is due.
    pub async fn due_retries(
        &self,
        target: &str,
        limit: i64,
    ) -> Result<Vec<(Kind, String)>, StoreError> {
        let rows: Vec<(String, String)> = on_pool!(self, |p| sqlx::query_as(
            "SELECT kind, local_id FROM sync_state WHERE target = $1 AND status = 'failed' \
             AND next_attempt_at <= $2 ORDER BY next_attempt_at LIMIT $3"
        )
        .bind(target)
        .bind(now_ms())
        .bind(limit)
        .fetch_all(p)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(k, id)| {
                (
                    if k == "group" {
                        Kind::Group
                    } else {
                        Kind::User
                    },
                    id,
                )
            })
            .collect())
    }

    pub async fn delete_state(
        &self,
        target: &str,
        kind: Kind,
        local_id: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        on_write_pool!(self, |p| sqlx::query(
            "DELETE FROM sync_state WHERE target = $1 AND kind = $2 AND local_id = $3"
        )
        .bind(target)
        .bind(kind.as_str())
        .bind(local_id)
        .execute(p)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    pub async fn count_state(&self, target: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(
            "SELECT COUNT(*) FROM sync_state WHERE target = $1"
        )
        .bind(target)
        .fetch_one(p)
        .await)?;
        Ok(n)
    }

    pub async fn recent_runs(
        &self,
        target: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let rows = on_pool!(self, |p| sqlx::query_as(
            "SELECT id, target, trigger, dry_run, started_at, finished_at, status, created, \
             updated, unchanged, deleted, skipped, failed, requests, detail FROM runs \
             WHERE ($1 IS NULL OR target = $1) ORDER BY id DESC LIMIT $2"
        )
        .bind(target)
        .bind(limit)
        .fetch_all(p)
        .await)?;
        Ok(rows)
    }

    pub async fn failing(&self, target: Option<&str>) -> Result<Vec<FailingObject>, StoreError> {
        let rows = on_pool!(self, |p| sqlx::query_as(
            "SELECT target, kind, local_id, last_error, attempts, updated_at, next_attempt_at \
             FROM sync_state \
             WHERE status = 'failed' AND ($1 IS NULL OR target = $1) \
             ORDER BY target, kind, local_id"
        )
        .bind(target)
        .fetch_all(p)
        .await)?;
        Ok(rows)
    }

    /// A cached fact about a target, if it was stored under the same settings fingerprint
    /// less than `max_age_ms` ago.
    pub async fn cache_get(
        &self,
        target: &str,
        key: &str,
        fingerprint: &str,
        max_age_ms: i64,
    ) -> Result<Option<Value>, StoreError> {
        let row: Option<(String,)> = on_pool!(self, |p| sqlx::query_as(
            "SELECT value FROM target_cache WHERE target = $1 AND key = $2 \
             AND fingerprint = $3 AND fetched_at > $4"
        )
        .bind(target)
        .bind(key)
        .bind(fingerprint)
        .bind(now_ms() - max_age_ms)
        .fetch_optional(p)
        .await)?;
        Ok(row.and_then(|(v,)| serde_json::from_str(&v).ok()))
    }

    pub async fn cache_put(
        &self,
        target: &str,
        key: &str,
        fingerprint: &str,
        value: &Value,
    ) -> Result<(), StoreError> {
        on_pool!(self, |p| sqlx::query(
            "INSERT INTO target_cache (target, key, fingerprint, value, fetched_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (target, key) DO UPDATE SET \
             fingerprint = excluded.fingerprint, value = excluded.value, \
             fetched_at = excluded.fetched_at"
        )
        .bind(target)
        .bind(key)
        .bind(fingerprint)
        .bind(value.to_string())
        .bind(now_ms())
        .execute(p)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// When a cached fact was fetched (Unix ms), whatever its fingerprint.
    pub async fn cache_age(&self, target: &str, key: &str) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> = on_pool!(self, |p| sqlx::query_as(
            "SELECT fetched_at FROM target_cache WHERE target = $1 AND key = $2"
        )
        .bind(target)
        .bind(key)
        .fetch_optional(p)
        .await)?;
        Ok(row.map(|(t,)| t))
    }

    /// Number of change events written so far (the daemon consumes them).
    pub async fn count_events(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(
            "SELECT COUNT(*) FROM change_events"
        )
        .fetch_one(p)
        .await)?;
        Ok(n)
    }

    // ---- daemon: event cursors, leases, full-sync runs made of batch jobs ----

    /// How far `target` has consumed the event stream; None before its consumer first ran.
    pub async fn cursor(&self, target: &str) -> Result<Option<EventPos>, StoreError> {
        let row: Option<(i64, i64)> = on_pool!(self, |p| sqlx::query_as(
            "SELECT last_tx, last_seq FROM event_cursors WHERE target = $1"
        )
        .bind(target)
        .fetch_optional(p)
        .await)?;
        Ok(row.map(|(tx, seq)| EventPos { tx, seq }))
    }

    pub async fn set_cursor(&self, target: &str, pos: EventPos) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        on_write_pool!(self, |p| sqlx::query(
            "INSERT INTO event_cursors (target, last_tx, last_seq) VALUES ($1, $2, $3) \
             ON CONFLICT (target) DO UPDATE SET last_tx = excluded.last_tx, \
             last_seq = excluded.last_seq"
        )
        .bind(target)
        .bind(pos.tx)
        .bind(pos.seq)
        .execute(p)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// The position before which every event is final: no transaction can still add one
    /// there. SQLite: the last event (one writer at a time). PostgreSQL: the oldest
    /// transaction still running, which may yet commit events (see migration 0008).
    pub async fn events_head(&self) -> Result<EventPos, StoreError> {
        let sql = self.per_backend(EVENTS_HEAD_SQLITE, EVENTS_HEAD_POSTGRES);
        let (tx, seq): (i64, i64) = on_pool!(self, |p| sqlx::query_as(sql).fetch_one(p).await)?;
        Ok(EventPos { tx, seq })
    }

    /// Whether the directory holds this object.
    pub async fn exists(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        let sql = match kind {
            Kind::User => "SELECT COUNT(*) FROM users WHERE id = $1",
            Kind::Group => "SELECT COUNT(*) FROM groups WHERE id = $1",
        };
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(sql).bind(id).fetch_one(p).await)?;
        Ok(n > 0)
    }

    /// PostgreSQL: a listener woken by every change event (the triggers NOTIFY); SQLite: None,
    /// and the daemon polls.
    pub async fn event_notifications(&self) -> Option<sqlx::postgres::PgListener> {
        let Backend::Postgres(pool) = &*self.backend else {
            return None;
        };
        let mut l = sqlx::postgres::PgListener::connect_with(pool).await.ok()?;
        l.listen("scimsync_events").await.ok()?;
        Some(l)
    }

    /// PostgreSQL: the oldest transaction that has written and has been open at least
    /// `min_secs`, described for a log line (it holds back every later event); None on
    /// SQLite or when there is none.
    pub async fn oldest_writer(&self, min_secs: i64) -> Result<Option<String>, StoreError> {
        let Backend::Postgres(p) = &*self.backend else {
            return Ok(None);
        };
        let row: Option<(i32, String, String, i64, String)> = sqlx::query_as(
            "SELECT pid, COALESCE(datname, ''), COALESCE(state, ''), \
             EXTRACT(EPOCH FROM now() - xact_start)::bigint, \
             COALESCE(left(regexp_replace(query, '\\s+', ' ', 'g'), 120), '') \
             FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
             AND xact_start <= now() - make_interval(secs => $1) \
             ORDER BY xact_start LIMIT 1",
        )
        .bind(min_secs as f64)
        .fetch_optional(p)
        .await?;
        Ok(row.map(|(pid, db, state, secs, query)| {
            format!(
                "the transaction of PostgreSQL backend {pid} (database {db:?}, {state}, open {secs} s; last statement: {query})"
            )
        }))
    }

    /// Up to `limit` events after `pos`, in the order they are consumed: (position, kind,
    /// object id, created_at). On PostgreSQL only events of transactions older than every
    /// one still running: a later commit cannot slip in before what has been read.
    pub async fn events_after(
        &self,
        pos: EventPos,
        limit: i64,
    ) -> Result<Vec<(EventPos, String, String, i64)>, StoreError> {
        let rows: Vec<(i64, i64, String, String, i64)> = match &*self.backend {
            Backend::Sqlite { reads: p, .. } => {
                sqlx::query_as(
                    "SELECT 0, seq, kind, object_id, created_at FROM change_events \
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(pos.seq)
                .bind(limit)
                .fetch_all(p)
                .await?
            }
            Backend::Postgres(p) => {
                sqlx::query_as(EVENTS_AFTER_POSTGRES)
                    .bind(pos.tx)
                    .bind(pos.seq)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(tx, seq, kind, id, at)| (EventPos { tx, seq }, kind, id, at))
            .collect())
    }

    /// (events not yet consumed by `target`, created_at of the oldest of them): those
    /// committed, including any a still-running older transaction holds back.
    pub async fn backlog(&self, target: &str) -> Result<(i64, Option<i64>), StoreError> {
        let pos = self.cursor(target).await?.unwrap_or_default();
        let row: (i64, Option<i64>) = match &*self.backend {
            Backend::Sqlite { reads: p, .. } => {
                sqlx::query_as("SELECT COUNT(*), MIN(created_at) FROM change_events WHERE seq > $1")
                    .bind(pos.seq)
                    .fetch_one(p)
                    .await?
            }
            Backend::Postgres(p) => {
                sqlx::query_as(
                    "SELECT COUNT(*), MIN(created_at) FROM change_events \
                     WHERE (tx, seq) > ($1, $2)",
                )
                .bind(pos.tx)
                .bind(pos.seq)
                .fetch_one(p)
                .await?
            }
        };
        Ok(row)
    }

    /// Takes or renews the lease `name` for `holder` until `ttl_ms` from now; false when
    /// someone else holds it unexpired.
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let affected = on_pool!(self, |p| sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4"
        )
        .bind(name)
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(now)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(affected > 0)
    }

    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        on_pool!(self, |p| sqlx::query(
            "DELETE FROM leases WHERE name = $1 AND holder = $2"
        )
        .bind(name)
        .bind(holder)
        .execute(p)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Where the event stream stood when run `id` was created (None: a run created before
    /// migration 0008, or no such run).
    pub async fn run_events_position(&self, id: i64) -> Result<Option<EventPos>, StoreError> {
        let row: Option<(Option<i64>, Option<i64>)> = on_pool!(self, |p| sqlx::query_as(
            "SELECT events_tx, events_seq FROM runs WHERE id = $1"
        )
        .bind(id)
        .fetch_optional(p)
        .await)?;
        Ok(match row {
            Some((Some(tx), Some(seq))) => Some(EventPos { tx, seq }),
            _ => None,
        })
    }

    /// The full sync of `target` that is running, if any.
    pub async fn running_run(&self, target: &str) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> = on_pool!(self, |p| sqlx::query_as(
            "SELECT id FROM runs WHERE target = $1 AND status = 'running'"
        )
        .bind(target)
        .fetch_optional(p)
        .await)?;
        Ok(row.map(|(id,)| id))
    }

    /// PostgreSQL plans the batch joins from table statistics; after bulk changes of the
    /// directory (an import, a host's own writes) autovacuum may not have caught up, and a
    /// stale plan is slow. Only the directory tables that more than doubled (in pages) since
    /// they were last analyzed are: analyzing all of them and the sync state at every run
    /// start was a third of a 100k no-op sync (0.5 s). The state is read by primary-key lookups
    /// whose plans do not depend on its statistics.
    pub async fn refresh_statistics(&self) -> Result<(), StoreError> {
        if let Backend::Postgres(p) = &*self.backend {
            let grown: Vec<(String,)> = sqlx::query_as(
                "SELECT t FROM unnest(ARRAY['users', 'groups', 'memberships']) t \
                 JOIN pg_class c ON c.oid = to_regclass(t) \
                 WHERE pg_relation_size(c.oid) / 8192 > 2 * GREATEST(c.relpages, 0) + 8",
            )
            .fetch_all(p)
            .await?;
            if !grown.is_empty() {
                let tables: Vec<&str> = grown.iter().map(|(t,)| t.as_str()).collect();
                // Names from the fixed list above.
                let sql = format!("ANALYZE {}", tables.join(", "));
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(p).await?;
            }
        }
        Ok(())
    }

    /// Starts a full sync of `target` made of batch jobs (users, then groups, then
    /// deprovisioning), or returns the one already running: (run id, created by this call).
    pub async fn start_run_with_jobs(
        &self,
        target: &str,
        trigger: &str,
        batch_size: u32,
    ) -> Result<(i64, bool), StoreError> {
        let _turn = self.write_turn().await;
        self.refresh_statistics().await?;
        let now = now_ms();
        let batch = batch_size.max(1) as usize;
        // Where the event stream stands (its head): every event before it has committed, so
        // this run's batches, which read the directory after this transaction, see its change.
        let head = self.per_backend(EVENTS_HEAD_SQLITE, EVENTS_HEAD_POSTGRES);
        let created: Result<i64, sqlx::Error> = on_write_pool!(self, |pool| async {
            let mut tx = pool.begin_with(self.write_begin()).await?;
            // The batches of runs that ended a while ago have served their summaries (their
            // counts stay in `runs`); kept, every claim would wade through all of history.
            sqlx::query(
                "DELETE FROM jobs WHERE target = $1 AND run_id IN (SELECT id FROM runs \
                 WHERE target = $1 AND status <> 'running' AND finished_at < $2)",
            )
            .bind(target)
            .bind(now - JOBS_KEPT_MS)
            .execute(&mut *tx)
            .await?;
            let (run_id,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO runs (target, trigger, dry_run, started_at, status, \
                 events_tx, events_seq) \
                 SELECT $1, $2, $3, $4, 'running', h.* FROM ({head}) h RETURNING id"
            )))
            .bind(target)
            .bind(trigger)
            .bind(false)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            for (phase, table) in [(0i64, "users"), (1, "groups")] {
                // Contiguous ranges (after, until] of `batch` ids covering every id, the last
                // one open-ended, so objects added while the run goes are not missed. Made by
                // the database in one statement: every batch-th id but the last is a bound,
                // found by hopping along the primary key's index, `batch` entries a step
                // (numbering every row with a window function sorted them all again: 16 ms of
                // a 10k first sync on SQLite, 110 ms at 100k; this takes 5).
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "WITH RECURSIVE hops(id) AS ( \
                         SELECT (SELECT id FROM {table} ORDER BY id LIMIT 1 OFFSET $4 - 1) \
                         UNION ALL SELECT (SELECT t.id FROM {table} t WHERE t.id > hops.id \
                             ORDER BY t.id LIMIT 1 OFFSET $4 - 1) \
                         FROM hops WHERE hops.id IS NOT NULL), \
                     bounds AS (SELECT id FROM hops WHERE id IS NOT NULL \
                         AND EXISTS (SELECT 1 FROM {table} t WHERE t.id > hops.id)), \
                     ranges AS (SELECT COALESCE(LAG(id) OVER (ORDER BY id), '') AS after_id, \
                         id AS until_id FROM bounds \
                       UNION ALL SELECT COALESCE((SELECT MAX(id) FROM bounds), ''), NULL) \
                     INSERT INTO jobs (run_id, target, phase, after_id, until_id, status) \
                     SELECT $1, $2, $3, after_id, until_id, 'pending' FROM ranges \
                     ORDER BY until_id IS NULL, until_id"
                )))
                .bind(run_id)
                .bind(target)
                .bind(phase)
                .bind(batch as i64)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO jobs (run_id, target, phase, after_id, until_id, status) \
                 VALUES ($1, $2, 2, '', NULL, 'pending')",
            )
            .bind(run_id)
            .bind(target)
            .execute(&mut *tx)
            .await?;
            // A kind with no state on the target has no orphan: that is an orphan check that
            // found nothing, made now (the deletions' sum and the states read in one
            // snapshot), so a first sync skips its anti-join of every state just written
            // (PostgreSQL 100k: 200 ms; SQLite 10k: 8 ms), unless something leaves the
            // directory meanwhile.
            sqlx::query(record_orphan_checks!(
                "SELECT $1, k.kind, (SELECT CAST(COALESCE(SUM(d.n), 0) AS BIGINT) \
                     FROM directory_deletions d WHERE d.kind = k.kind), $2 \
                 FROM (SELECT 'user' AS kind UNION ALL SELECT 'group') k \
                 WHERE NOT EXISTS (SELECT 1 FROM sync_state s \
                     WHERE s.target = $1 AND s.kind = k.kind)"
            ))
            .bind(target)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(run_id)
        }
        .await);
        match created {
            Ok(id) => {
                // The planner must know the new jobs, or each claim scans the whole table.
                if let Backend::Postgres(p) = &*self.backend {
                    sqlx::query("ANALYZE jobs").execute(p).await?;
                }
                Ok((id, true))
            }
            // Another process started one first: join it.
            Err(e) if is_unique_violation(&e) => match self.running_run(target).await? {
                Some(id) => Ok((id, false)),
                None => Err(StoreError::Database(e)),
            },
            Err(e) => Err(StoreError::Database(e)),
        }
    }

    /// Settles the quiet batches of the phase of `first`, the job of its first range (users
    /// or groups): every other pending job of the phase whose objects are all unchanged since
    /// sent (see [`QuietCheck`]) is done, with its counts of unchanged and skipped objects as
    /// its result; returns those counts summed.
    /// A target with no state of the kind yet (a first sync) has nothing to settle.
    pub async fn settle_quiet_jobs(
        &self,
        first: &Job,
        check: QuietCheck<'_>,
    ) -> Result<Settled, StoreError> {
        let QuietCheck {
            kind,
            fingerprint,
            excludes_service_accounts,
        } = check;
        let (any,): (bool,) = on_pool!(self, |p| sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM sync_state WHERE target = $1 AND kind = $2)"
        )
        .bind(&first.target)
        .bind(kind.as_str())
        .fetch_one(p)
        .await)?;
        if !any {
            return Ok(Settled::default());
        }
        let _turn = self.write_turn().await;
        let prefix = Source::key_prefix(fingerprint);
        let sql = match kind {
            Kind::User => self.per_backend(SETTLE_USERS_SQLITE, SETTLE_USERS_POSTGRES),
            Kind::Group => self.per_backend(SETTLE_GROUPS_SQLITE, SETTLE_GROUPS_POSTGRES),
        };
        macro_rules! query {
            () => {{
                let q = sqlx::query_scalar::<_, String>(sql)
                    .bind(&first.target)
                    .bind(first.run_id)
                    .bind(first.phase)
                    .bind(first.id)
                    .bind(prefix.as_str());
                // Only the users' select reads $6 (PostgreSQL wants every parameter typed).
                match kind {
                    Kind::User => q.bind(excludes_service_accounts),
                    Kind::Group => q,
                }
            }};
        }
        let results: Vec<String> = match &*self.backend {
            Backend::Sqlite { writes: p, .. } => query!().fetch_all(p).await?,
            Backend::Postgres(p) => {
                // One statement over the whole directory: its sort in memory, and no JIT
                // compilation (hundreds of ms) once the directory makes it look costly.
                let mut tx = p
                    .begin_with("BEGIN; SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
                    .await?;
                let rows = query!().fetch_all(&mut *tx).await?;
                tx.commit().await?;
                rows
            }
        };
        let mut settled = Settled::default();
        for v in results
            .iter()
            .filter_map(|r| serde_json::from_str::<Value>(r).ok())
        {
            let count = |k| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            settled.unchanged += count("unchanged");
            settled.skipped += count("skipped");
        }
        Ok(settled)
    }

    /// Claims the next claimable job (optionally of one run): pending, or running with an
    /// expired lease (its worker died); a phase only once every earlier phase of its run is
    /// done.
    pub async fn claim_job(
        &self,
        holder: &str,
        lease_ms: i64,
        run: Option<i64>,
    ) -> Result<Option<Job>, StoreError> {
        let _turn = self.write_turn().await;
        let now = now_ms();
        for which in CLAIM_ORDER {
            if let Some(job) = self.claim_where(which, holder, now, lease_ms, run).await? {
                return Ok(Some(job));
            }
        }
        Ok(None)
    }

    async fn claim_where(
        &self,
        which: &str,
        holder: &str,
        now: i64,
        lease_ms: i64,
        run: Option<i64>,
    ) -> Result<Option<Job>, StoreError> {
        let sql = self.claim_sql(which);
        let job: Option<Job> = on_write_pool!(self, |p| sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(holder)
            .bind(now + lease_ms)
            .bind(now)
            .bind(run)
            .fetch_optional(p)
            .await)?;
        Ok(job)
    }

    /// The id of the next job to claim: `which` jobs (see `CLAIM_ORDER`) of run `$4` (any
    /// when NULL) whose earlier phases are done, in claim order.
    fn claim_pick(&self, which: &str) -> String {
        // SQLite runs writers one at a time, so its one statement is atomic as it is.
        let lock = self.per_backend("", " FOR UPDATE SKIP LOCKED");
        format!(
            "SELECT j.id FROM jobs j WHERE {which} \
             AND ($4 IS NULL OR j.run_id = $4) \
             AND NOT EXISTS (SELECT 1 FROM jobs e WHERE e.run_id = j.run_id \
                 AND e.status IN ('pending', 'running') AND e.phase < j.phase) \
             ORDER BY j.run_id, j.phase, j.id LIMIT 1{lock}"
        )
    }

    /// The statement that claims the first claimable job matching `which` ($1 holder,
    /// $2 lease end, $3 now, $4 run or NULL).
    fn claim_sql(&self, which: &str) -> String {
        let pick = self.claim_pick(which);
        format!(
            "UPDATE jobs SET status = 'running', holder = $1, lease_until = $2, \
             attempts = attempts + 1 WHERE id = ({pick}) RETURNING {JOB_COLS}"
        )
    }

    /// Records a finished job's result and claims the run's next job at once: one commit a
    /// batch instead of two (the claims and results of a no-op sync were most of its time,
    /// queued for SQLite's one writer or waiting on round trips to PostgreSQL). Returns
    /// whether the result was recorded (false: the job was taken over) and the job claimed.
    /// None may still leave jobs to claim (a next phase, expired leases): `claim_job` looks.
    pub async fn finish_and_claim(
        &self,
        done: &Job,
        holder: &str,
        result: &Value,
        lease_ms: i64,
    ) -> Result<(bool, Option<Job>), StoreError> {
        let _turn = self.write_turn().await;
        let now = now_ms();
        let result = result.to_string();
        match &*self.backend {
            Backend::Sqlite { writes: p, .. } => {
                // One statement that updates both rows: a transaction of four statements cost
                // four hand-offs to the connection's thread while holding the one writer's
                // turn (0.5 ms a batch, the whole of a no-op sync's user phase). The pick is
                // made before the rows change, like PostgreSQL's below.
                let pick = self.claim_pick(CLAIM_ORDER[0]);
                let sql = format!(
                    "UPDATE jobs SET \
                     status = CASE WHEN id = $6 THEN 'done' ELSE 'running' END, \
                     result = CASE WHEN id = $6 THEN $5 ELSE result END, \
                     holder = CASE WHEN id = $6 THEN holder ELSE $1 END, \
                     lease_until = CASE WHEN id = $6 THEN NULL ELSE $2 END, \
                     attempts = CASE WHEN id = $6 THEN attempts ELSE attempts + 1 END \
                     WHERE (id = $6 AND holder = $1 AND status = 'running') OR id = ({pick}) \
                     RETURNING {JOB_COLS}"
                );
                let rows: Vec<Job> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(holder)
                    .bind(now + lease_ms)
                    .bind(now)
                    .bind(done.run_id)
                    .bind(&result)
                    .bind(done.id)
                    .fetch_all(p)
                    .await?;
                let recorded = rows.iter().any(|j| j.id == done.id);
                let next = rows.into_iter().find(|j| j.id != done.id);
                Ok((recorded, next))
            }
            Backend::Postgres(p) => {
                // One statement, one round trip. Its claim sees the table as it was before
                // the statement (the finished job still running), so the first job of the
                // next phase is left to `claim_job`.
                let claim = self.claim_sql(CLAIM_ORDER[0]);
                let sql = format!(
                    "WITH done AS (UPDATE jobs SET status = 'done', result = $5, \
                     lease_until = NULL WHERE id = $6 AND holder = $1 AND status = 'running' \
                     RETURNING id), claimed AS ({claim}) \
                     SELECT (SELECT COUNT(*) FROM done) AS recorded, claimed.* \
                     FROM (SELECT 1) one LEFT JOIN claimed ON true"
                );
                let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(holder)
                    .bind(now + lease_ms)
                    .bind(now)
                    .bind(done.run_id)
                    .bind(&result)
                    .bind(done.id)
                    .fetch_one(p)
                    .await?;
                let recorded: i64 = row.try_get("recorded")?;
                let id: Option<i64> = row.try_get("id")?;
                let next = match id {
                    Some(_) => Some(<Job as sqlx::FromRow<_>>::from_row(&row)?),
                    None => None,
                };
                Ok((recorded > 0, next))
            }
        }
    }

    /// Extends a job's lease; false when the job is no longer this holder's.
    pub async fn renew_job(
        &self,
        id: i64,
        holder: &str,
        lease_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let n = on_write_pool!(self, |p| {
            sqlx::query(
            "UPDATE jobs SET lease_until = $3 WHERE id = $1 AND holder = $2 AND status = 'running'"
        )
        .bind(id)
        .bind(holder)
        .bind(now_ms() + lease_ms)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?;
        Ok(n > 0)
    }

    /// Records a job's result; false when it was not this holder's any more (taken over).
    pub async fn finish_job(
        &self,
        id: i64,
        holder: &str,
        result: &Value,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let n = on_write_pool!(self, |p| sqlx::query(FINISH_JOB)
            .bind(id)
            .bind(holder)
            .bind(result.to_string())
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Gives a job back (shutdown): someone else may claim it at once.
    pub async fn release_job(&self, id: i64, holder: &str) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        on_write_pool!(self, |p| sqlx::query(
            "UPDATE jobs SET status = 'pending', holder = NULL, lease_until = NULL \
             WHERE id = $1 AND holder = $2 AND status = 'running'"
        )
        .bind(id)
        .bind(holder)
        .execute(p)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Whether any job of the run is still pending or running (stops at the first one).
    pub async fn run_has_open_jobs(&self, run_id: i64) -> Result<bool, StoreError> {
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE run_id = $1 \
             AND status IN ('pending', 'running') LIMIT 1) open"
        )
        .bind(run_id)
        .fetch_one(p)
        .await)?;
        Ok(n > 0)
    }

    /// Jobs of a run not done yet, and the results of those that are.
    pub async fn run_progress(&self, run_id: i64) -> Result<(i64, Vec<Value>), StoreError> {
        let rows: Vec<(String, Option<String>)> = on_pool!(self, |p| sqlx::query_as(
            "SELECT status, result FROM jobs WHERE run_id = $1 ORDER BY phase, id"
        )
        .bind(run_id)
        .fetch_all(p)
        .await)?;
        let pending = rows.iter().filter(|(s, _)| s != "done").count() as i64;
        let results = rows
            .into_iter()
            .filter_map(|(_, r)| r.and_then(|t| serde_json::from_str(&t).ok()))
            .collect();
        Ok((pending, results))
    }

    /// Closes a running run once; false when someone else already did.
    pub async fn complete_run(
        &self,
        id: i64,
        status: &str,
        c: &RunCounts,
        detail: Option<&str>,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await;
        let n = on_write_pool!(self, |p| sqlx::query(
            "UPDATE runs SET finished_at = $2, status = $3, created = $4, updated = $5, \
             unchanged = $6, deleted = $7, skipped = $8, failed = $9, requests = $10, \
             detail = $11 WHERE id = $1 AND status = 'running'"
        )
        .bind(id)
        .bind(now_ms())
        .bind(status)
        .bind(c.created)
        .bind(c.updated)
        .bind(c.unchanged)
        .bind(c.deleted)
        .bind(c.skipped)
        .bind(c.failed)
        .bind(c.requests)
        .bind(detail)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(n > 0)
    }

    /// Jobs currently claimed (for tests and `status`).
    pub async fn claimed_jobs(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(
            "SELECT COUNT(*) FROM jobs WHERE status = 'running'"
        )
        .fetch_one(p)
        .await)?;
        Ok(n)
    }
}

const JOB_COLS: &str = "id, run_id, target, phase, after_id, until_id";

/// How [`Store::settle_quiet_jobs`] tells a quiet batch: every object of `kind` in its range is
/// unchanged since sent with `fingerprint` (see [`Source::key_of`]), or is a service account
/// the target excludes (`excludes_service_accounts`) with nothing on the target.
#[derive(Debug, Clone, Copy)]
pub struct QuietCheck<'a> {
    pub kind: Kind,
    pub fingerprint: &'a str,
    pub excludes_service_accounts: bool,
}

/// What [`Store::settle_quiet_jobs`] settled.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Settled {
    pub unchanged: u64,
    pub skipped: u64,
}

/// One claimed batch of a full sync.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub id: i64,
    pub run_id: i64,
    pub target: String,
    /// 0 users, 1 groups, 2 deprovisioning.
    pub phase: i64,
    pub after_id: String,
    pub until_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_with_bounded_jitter() {
        let d: Vec<i64> = (0..10).map(|a| retry_delay_ms(a, "u-1")).collect();
        for (a, ms) in d.iter().enumerate() {
            let base = (30_000i64 << a.min(7)).min(3_600_000);
            assert!(*ms >= base && *ms <= base + base / 10, "attempt {a}: {ms}");
        }
        assert!(d[9] <= 3_960_000, "capped near an hour: {}", d[9]);
        assert_ne!(
            retry_delay_ms(0, "u-1"),
            retry_delay_ms(0, "u-2"),
            "jitter spreads objects"
        );
    }

    /// Every SQLite connection keeps its statements' plans (see `stable_plans`): the pools'
    /// connections (three readers, one writer) all report the setting on, and a fresh
    /// connection reports it off.
    #[tokio::test]
    async fn sqlite_connections_keep_plans_stable() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = Store::connect(&url).await.expect("store");
        let Backend::Sqlite { reads, writes } = &*store.backend else {
            panic!("a SQLite store");
        };
        let mut held = Vec::new();
        for pool in [reads, reads, reads, writes] {
            let mut conn = pool.acquire().await.expect("connection");
            assert_eq!(qpsg(&mut conn, -1).await.expect("read setting"), 1);
            held.push(conn);
        }
        assert_eq!(writes.options().get_max_connections(), 1);
        use sqlx::Connection;
        let mut plain = sqlx::SqliteConnection::connect(&url).await.expect("plain");
        assert_eq!(qpsg(&mut plain, -1).await.expect("read setting"), 0);
    }
}
