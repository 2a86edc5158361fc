//! The test harness: a fresh database (SQLite file or a new PostgreSQL database), a sandbox on a
//! random loopback port, a mappings folder with the shipped defaults, and the real engine.

use std::path::PathBuf;
use std::sync::Arc;

use scimsync::config::TargetConfig;
use scimsync::directory::{Record, parse_record};
use scimsync::mapping::LiveMappings;
use scimsync::sandbox::{self, RecordedRequest, SandboxHandle, SandboxOptions};
use scimsync::store::Store;
use scimsync::sync::{Engine, NoProgress, RunSummary, SyncOptions};
use scimsync::target::TargetClient;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub const TOKEN: &str = "test-token";

/// The PostgreSQL server URL for tests, or a printed "skipped" and None.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("SCIMSYNC_TEST_POSTGRES") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            println!("skipped: {test} on PostgreSQL: SCIMSYNC_TEST_POSTGRES is not set");
            None
        }
    }
}

/// A fresh database URL: a SQLite file in `dir`, or a new PostgreSQL database.
pub async fn fresh_database(
    db: Db,
    dir: &std::path::Path,
    test: &str,
) -> Option<(String, Option<String>)> {
    fresh_database_with(db, dir, test, "").await
}

/// [`fresh_database`], a PostgreSQL database made with `CREATE DATABASE … <pg_options>`
/// (another collation, say).
pub async fn fresh_database_with(
    db: Db,
    dir: &std::path::Path,
    test: &str,
    pg_options: &str,
) -> Option<(String, Option<String>)> {
    match db {
        Db::Sqlite => Some((format!("sqlite://{}", dir.join("test.db").display()), None)),
        Db::Postgres => {
            let admin = postgres_url(test)?;
            let name = format!("scimsync_t_{}", uuid::Uuid::new_v4().simple());
            let pool = sqlx::PgPool::connect(&admin)
                .await
                .expect("connect to SCIMSYNC_TEST_POSTGRES");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {name} {pg_options}"
            )))
            .execute(&pool)
            .await
            .expect("create test database");
            pool.close().await;
            let mut url = reqwest::Url::parse(&admin).expect("SCIMSYNC_TEST_POSTGRES is a URL");
            url.set_path(&format!("/{name}"));
            Some((url.to_string(), Some(name)))
        }
    }
}

pub async fn drop_database(name: &str) {
    let Some(admin) = std::env::var("SCIMSYNC_TEST_POSTGRES").ok() else {
        return;
    };
    if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    }
}

pub struct Env {
    pub store: Store,
    pub sandbox: SandboxHandle,
    pub target: TargetConfig,
    _dir: tempfile::TempDir,
    pub db_url: String,
    pg_name: Option<String>,
}

impl Env {
    pub async fn new(db: Db, test: &str) -> Option<Env> {
        Self::with_sandbox(
            db,
            test,
            SandboxOptions {
                patch: true,
                ..SandboxOptions::with_token(TOKEN)
            },
        )
        .await
    }

    pub async fn with_sandbox(db: Db, test: &str, opts: SandboxOptions) -> Option<Env> {
        Self::with_database(db, test, opts, "").await
    }

    /// [`Env::with_sandbox`] on a database made with `pg_options` (see
    /// [`fresh_database_with`]).
    pub async fn with_database(
        db: Db,
        test: &str,
        opts: SandboxOptions,
        pg_options: &str,
    ) -> Option<Env> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db_url, pg_name) = fresh_database_with(db, dir.path(), test, pg_options).await?;
        let store = Store::connect(&db_url).await.expect("connect and migrate");
        let sandbox = sandbox::start(opts).await.expect("sandbox");
        let mut target = TargetConfig::new("sandbox", &sandbox.url, Some(TOKEN.into()));
        target.mappings = dir.path().join("mappings");
        write_default_mappings(dir.path());
        Some(Env {
            store,
            sandbox,
            target,
            _dir: dir,
            db_url,
            pg_name,
        })
    }

    /// Runs `sql` on the database over a connection of its own, as a host writing the
    /// directory tables directly would.
    pub async fn host_exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        if self.pg_name.is_some() {
            let pool = sqlx::PgPool::connect(&self.db_url).await.expect("connect");
            sqlx::query(sql)
                .execute(&pool)
                .await
                .expect("host statement");
            pool.close().await;
        } else {
            let pool = sqlx::SqlitePool::connect(&self.db_url)
                .await
                .expect("connect");
            sqlx::query(sql)
                .execute(&pool)
                .await
                .expect("host statement");
            pool.close().await;
        }
    }

    /// The one integer `sql` selects, read over a connection of its own.
    pub async fn host_i64(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        if self.pg_name.is_some() {
            let pool = sqlx::PgPool::connect(&self.db_url).await.expect("connect");
            let (v,): (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.expect("query");
            pool.close().await;
            v
        } else {
            let pool = sqlx::SqlitePool::connect(&self.db_url)
                .await
                .expect("connect");
            let (v,): (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.expect("query");
            pool.close().await;
            v
        }
    }

    pub fn mapping_dir(&self) -> PathBuf {
        self.target.mappings.clone()
    }

    pub fn write_mapping(&self, kind: &str, name: &str, text: &str) {
        std::fs::write(self.mapping_dir().join(kind).join(name), text).expect("write mapping");
    }

    /// Imports JSON Lines text.
    pub async fn import(&self, lines: &str) {
        let records: Vec<(usize, Record)> = lines
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    i + 1,
                    parse_record(l).unwrap_or_else(|e| panic!("line {}: {e}", i + 1)),
                )
            })
            .collect();
        self.store.import(&records, false).await.expect("import");
    }

    pub async fn engine(&self, opts: SyncOptions) -> Engine {
        let mappings = Arc::new(LiveMappings::load(&self.target.mappings).expect("mappings load"));
        let client = TargetClient::new(&self.target).expect("client");
        Engine::new(
            self.store.clone(),
            Arc::new(client),
            self.target.clone(),
            mappings,
            opts,
        )
        .await
    }

    pub async fn sync_with(&self, opts: SyncOptions) -> RunSummary {
        let opts = SyncOptions {
            batch_size: if opts.batch_size == 0 {
                100
            } else {
                opts.batch_size
            },
            ..opts
        };
        self.engine(opts)
            .await
            .full_sync(&NoProgress)
            .await
            .expect("full sync runs")
    }

    pub async fn sync(&self) -> RunSummary {
        self.sync_with(SyncOptions {
            trigger: "test".into(),
            ..Default::default()
        })
        .await
    }

    /// Runs a full sync and returns the write requests the sandbox received during it.
    pub async fn sync_writes(&self) -> (RunSummary, Vec<RecordedRequest>) {
        self.sandbox.clear_requests();
        let s = self.sync().await;
        (s, self.sandbox.writes())
    }

    /// The sandbox's id of the user with this userName.
    pub fn remote_user(&self, user_name: &str) -> Option<Value> {
        self.sandbox
            .users()
            .into_iter()
            .find(|u| u["userName"] == user_name)
    }

    pub fn remote_group(&self, name: &str) -> Option<Value> {
        self.sandbox
            .groups()
            .into_iter()
            .find(|g| g["displayName"] == name)
    }

    pub fn rid(&self, user_name: &str) -> String {
        self.remote_user(user_name)
            .and_then(|u| u["id"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no remote user {user_name}"))
    }

    pub fn gid(&self, name: &str) -> String {
        self.remote_group(name)
            .and_then(|g| g["id"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("no remote group {name}"))
    }

    pub async fn finish(self) {
        self.store.close().await;
        if let Some(name) = &self.pg_name {
            drop_database(name).await;
        }
    }
}

/// Writes the shipped default mappings into `dir/mappings`; returns that folder.
pub fn write_default_mappings(dir: &std::path::Path) -> PathBuf {
    scimsync::mapping::write_defaults(dir).expect("write mappings")
}

/// Directory records as import JSON Lines.
pub fn jsonl(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| match r {
            Record::User(u) => scimsync::directory::export_user(u).to_string() + "\n",
            Record::Group(g) => scimsync::directory::export_group(g).to_string() + "\n",
            _ => String::new(),
        })
        .collect()
}

/// (method, path) of each request, for exact comparisons.
pub fn calls(reqs: &[RecordedRequest]) -> Vec<(String, String)> {
    reqs.iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect()
}

pub fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

pub fn call(method: &str, path: &str) -> (String, String) {
    (method.to_string(), path.to_string())
}

/// Runs an async scenario on SQLite and on PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both_databases {
    ($($f:ident),* $(,)?) => { $(
        mod $f {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$f($crate::harness::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$f($crate::harness::Db::Postgres).await
            }
        }
    )* };
}
