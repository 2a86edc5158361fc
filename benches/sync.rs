//! The throughput benchmark: a fast in-process SCIM sink on loopback, a generated directory,
//! and the real engine. Prints, it does not assert. Run:
//!
//!     cargo bench --bench sync                 # N = 10,000 users, SQLite
//!     cargo bench --bench sync -- 100000       # any N (M = N/10 groups of 20 members)
//!     SCIMSYNC_TEST_POSTGRES=postgres://... cargo bench --bench sync   # also PostgreSQL
//!
//! Reports: initial full sync wall time and objects/s, requests sent, scimsync's CPU time per
//! object (the sink runs on its own thread, whose CPU is not counted), the same with
//! `bulk = true` (the sink takes /Bulk, 1,000 operations a request), no-op resync time and
//! requests, change → target latency p50/p99 through the daemon, the throughput against a
//! target answering in 5 ms as a share of concurrency / latency (with how long a request held
//! one of the concurrency's slots as scimsync saw it, and how busy the slots were kept while
//! sending: what is lost in the exchange and what between requests; and, for reference, the
//! share a load generator that does nothing else reaches against the same sink), and the peak
//! RSS from the first sync on (the sample directory's generation and import are not counted).
//!
//! For profiling one part: BENCH_FULL_ONLY=1 (the first sync alone, with its CPU per object
//! split by thread), BENCH_NOOP_ONLY=1 (three no-op resyncs after the first sync, the last's CPU
//! split by thread), BENCH_SLOW_ONLY=1 (the 5 ms target alone), BENCH_DBS=sqlite,
//! BENCH_WORKERS=n, BENCH_BULK=1, BENCH_PG_SQL="…" / BENCH_SQLITE_SQL="…" (statements run on
//! the bench's PostgreSQL / SQLite database after its migrations: for trying a schema change
//! without writing a migration),
//! BENCH_KEEP_DB=1 (keeps that database; SQLite's file goes to the temporary directory),
//! BENCH_MAPPINGS=DIR (that mappings folder instead of the shipped default scripts).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use scimsync::config::{Config, DatabaseConfig, TargetConfig, WorkerConfig};
use scimsync::directory::{Record, sample};
use scimsync::mapping::LiveMappings;
use scimsync::store::Store;
use scimsync::sync::{Engine, NoProgress, SyncOptions};
use scimsync::target::TargetClient;
use serde_json::json;

// The allocator the scimsync binary uses (src/main.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Default)]
struct Sink {
    /// Milliseconds each answer waits (a slow target); 0 answers at once.
    latency_ms: AtomicU64,
    /// Microseconds the answers actually waited (timers are coarser than 5 ms).
    waited_us: AtomicU64,
    requests: AtomicU64,
    writes: AtomicU64,
    next_id: AtomicU64,
    /// When the last PATCH for a path arrived (for event latency).
    patched: Mutex<HashMap<String, Instant>>,
    /// A slow target's first request and last answer: the time spent sending, without the
    /// run's start and end.
    window: Mutex<Option<(Instant, Instant)>>,
    /// A slow target's exchanges (arrival, answer, what), kept while `timeline` is set.
    exchanges: Mutex<Vec<(Instant, Instant, &'static str)>>,
    timeline: std::sync::atomic::AtomicBool,
}

async fn sink(
    axum::extract::State(s): axum::extract::State<Arc<Sink>>,
    method: Method,
    uri: Uri,
    _body: Bytes,
) -> axum::response::Response {
    s.requests.fetch_add(1, Ordering::Relaxed);
    let latency = s.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(latency)).await;
        s.waited_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut window = s.window.lock().unwrap_or_else(|e| e.into_inner());
        let first = window.map_or(t, |(first, _)| first);
        *window = Some((first, Instant::now()));
        if s.timeline.load(Ordering::Relaxed) {
            let what = match (&method, uri.path().contains("/Groups")) {
                (&Method::POST, false) => "POST user",
                (&Method::POST, true) => "POST group",
                (&Method::GET, _) => "GET",
                _ => "other",
            };
            let mut ex = s.exchanges.lock().unwrap_or_else(|e| e.into_inner());
            ex.push((t, Instant::now(), what));
        }
    }
    let path = uri.path().trim_start_matches("/scim/v2").to_string();
    let json_ok = |v: serde_json::Value, code: StatusCode| {
        (
            code,
            [("content-type", "application/scim+json")],
            v.to_string(),
        )
            .into_response()
    };
    match (method, path.as_str()) {
        (Method::GET, "/ServiceProviderConfig") => json_ok(
            json!({"patch":{"supported":true},"filter":{"supported":true,"maxResults":200},"bulk":{"supported":true,"maxOperations":1000,"maxPayloadSize":1048576}}),
            StatusCode::OK,
        ),
        (Method::POST, "/Bulk") => {
            let request: serde_json::Value = serde_json::from_slice(&_body).unwrap_or_default();
            let ops = request["Operations"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let answers: Vec<serde_json::Value> = ops
                .iter()
                .map(|op| {
                    s.writes.fetch_add(1, Ordering::Relaxed);
                    let mut a = json!({"method": op["method"], "bulkId": op["bulkId"]});
                    if op["method"] == "POST" {
                        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
                        a["status"] = json!("201");
                        a["location"] = json!(format!("http://sink/scim/v2/Users/r{id}"));
                    } else {
                        a["status"] = json!("200");
                    }
                    a
                })
                .collect();
            json_ok(
                json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkResponse"], "Operations": answers}),
                StatusCode::OK,
            )
        }
        (Method::GET, "/ResourceTypes") => json_ok(
            json!({"Resources":[{"name":"User","endpoint":"/Users"},{"name":"Group","endpoint":"/Groups"}]}),
            StatusCode::OK,
        ),
        (Method::GET, _) => json_ok(json!({"totalResults":0,"Resources":[]}), StatusCode::OK),
        (Method::POST, _) => {
            s.writes.fetch_add(1, Ordering::Relaxed);
            let id = s.next_id.fetch_add(1, Ordering::Relaxed);
            json_ok(json!({"id": format!("r{id}")}), StatusCode::CREATED)
        }
        (Method::PATCH, p) => {
            s.writes.fetch_add(1, Ordering::Relaxed);
            s.patched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p.to_string(), Instant::now());
            StatusCode::NO_CONTENT.into_response()
        }
        _ => {
            s.writes.fetch_add(1, Ordering::Relaxed);
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// The sum of `fields` (clock ticks, counted after the command's closing parenthesis) of a
/// /proc stat file, in seconds (100 ticks a second on Linux).
fn stat_seconds(path: &std::path::Path, fields: &[usize]) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    fields.iter().map(|&i| ticks(i)).sum::<f64>() / 100.0
}

/// utime + stime from a /proc stat file, in seconds.
fn stat_cpu(path: &std::path::Path) -> f64 {
    stat_seconds(path, &[11, 12])
}

/// CPU seconds of the PostgreSQL server's processes on this machine (backends, writers,
/// autovacuum; those that ended are in the postmaster's children's time), or nothing where
/// none is visible (a server elsewhere).
fn postgres_cpu_seconds() -> Option<f64> {
    let mut total = None;
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        if comm.trim() != "postgres" {
            continue;
        }
        // utime, stime and the children's (cutime, cstime).
        *total.get_or_insert(0.0) += stat_seconds(&p.path().join("stat"), &[11, 12, 13, 14]);
    }
    total
}

/// CPU seconds of scimsync: the whole process minus the sink's own thread, so the figure is
/// what the engine, its database driver and its HTTP client cost.
fn cpu_seconds() -> f64 {
    let sink = thread_cpu().get("sink").copied().unwrap_or(0.0);
    stat_cpu(std::path::Path::new("/proc/self/stat")) - sink
}

/// CPU seconds by kind of thread, of the threads alive now: the engine's (the main thread),
/// the HTTP I/O thread's, SQLite's connection threads', the sink's and the rest.
fn thread_cpu() -> std::collections::BTreeMap<&'static str, f64> {
    let mut out = std::collections::BTreeMap::new();
    let main = std::process::id().to_string();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let kind = match comm.trim() {
                _ if t.file_name().to_str() == Some(main.as_str()) => "engine",
                "sink" => "sink",
                "scimsync-http" => "http",
                c if c.starts_with("sqlx-sqlite") => "sqlite",
                _ => "other",
            };
            *out.entry(kind).or_insert(0.0) += stat_cpu(&t.path().join("stat"));
        }
    }
    out
}

/// CPU seconds by kind of thread since `before` (a [`thread_cpu`] reading).
fn thread_cpu_since(
    before: &std::collections::BTreeMap<&'static str, f64>,
) -> Vec<(&'static str, f64)> {
    thread_cpu()
        .into_iter()
        .map(|(kind, after)| (kind, after - before.get(kind).copied().unwrap_or(0.0)))
        .collect()
}

unsafe extern "C" {
    /// glibc (SQLite's allocator): gives freed heap back to the system.
    fn malloc_trim(pad: usize) -> i32;
    /// mimalloc (ours): the same.
    fn mi_collect(force: bool);
}

/// Resets the peak RSS, so the next reading covers only what follows: the heap the sample
/// directory's generation and import freed is given back first (the allocators keep it
/// otherwise, and it would count as the sync's; `scimsync directory import` is a process of
/// its own).
fn reset_peak_rss() {
    // SAFETY: both only release free memory; they touch no live allocation.
    unsafe {
        malloc_trim(0);
        mi_collect(true);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A `/proc/self/status` memory line (VmRSS, VmHWM) in MB.
fn status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn rss_mb() -> f64 {
    status_mb("VmRSS")
}

/// The sink runs on its own thread and runtime, like a separate server process would.
fn start_sink(state: Arc<Sink>) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sink runtime");
            rt.block_on(async move {
                let app = axum::Router::new().fallback(sink).with_state(state);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                tx.send(listener.local_addr().expect("addr")).expect("send");
                let _ = axum::serve(listener, app).await;
            });
        })
        .expect("sink thread");
    rx.recv().expect("sink address")
}

/// Batches worked at once (`worker.workers`; BENCH_WORKERS overrides the default 4).
fn bench_workers() -> usize {
    std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// The engine `scimsync sync --full` would make for this target.
async fn engine_for(store: &Store, target: &TargetConfig) -> Engine {
    engine_with(
        store,
        target,
        Arc::new(TargetClient::new(target).expect("client")),
    )
    .await
}

async fn engine_with(store: &Store, target: &TargetConfig, client: Arc<TargetClient>) -> Engine {
    Engine::new(
        store.clone(),
        client,
        target.clone(),
        Arc::new(LiveMappings::load(&target.mappings).expect("mappings")),
        SyncOptions {
            batch_size: 100,
            trigger: "bench".into(),
            workers: bench_workers(),
            ..Default::default()
        },
    )
    .await
}

/// What a sync to a target answering in 5 ms achieved against concurrency / answer time.
struct Slow {
    per_second: f64,
    /// Concurrency / measured answer time: what the configured concurrency allows.
    bound: f64,
    share: f64,
    answer_ms: f64,
    /// The share between the first request and the last answer (the run's start and end
    /// left out).
    sending_share: f64,
    /// How long a request held a slot as scimsync saw it (request written → answer read).
    held_ms: f64,
    /// How busy the slots were kept while sending.
    busy: f64,
    /// The share a load generator that does nothing else reaches against the same sink, with
    /// the same concurrency: what this machine and sink allow at all.
    generator: f64,
}

impl Slow {
    fn describe(&self) -> String {
        format!(
            "{:.0} req/s = {:.0}% of {:.0} ({:.2} ms answers; {:.0}% while sending; slots held {:.2} ms a request, busy {:.0}%; a load generator doing nothing else: {:.0}%)",
            self.per_second,
            self.share * 100.0,
            self.bound,
            self.answer_ms,
            self.sending_share * 100.0,
            self.held_ms,
            self.busy * 100.0,
            self.generator * 100.0
        )
    }
}

/// A target that answers in 5 ms: how close does the configured concurrency get to its bound
/// (concurrency / latency)? A target name of its own, so everything is created again.
async fn slow_target(
    store: &Store,
    target: &TargetConfig,
    state: &Sink,
    addr: std::net::SocketAddr,
) -> Slow {
    state.latency_ms.store(5, Ordering::Relaxed);
    let mut slow = target.clone();
    slow.name = "slow".into();
    let client = Arc::new(TargetClient::new(&slow).expect("client"));
    let engine = engine_with(store, &slow, client.clone()).await;
    let (r, t) = (state.requests.load(Ordering::Relaxed), Instant::now());
    let s = engine.full_sync(&NoProgress).await.expect("slow sync");
    let wall = t.elapsed().as_secs_f64();
    let requests = (state.requests.load(Ordering::Relaxed) - r) as f64;
    assert_eq!(s.failed, 0);
    let waited = state.waited_us.load(Ordering::Relaxed) as f64 / 1e6 / requests;
    let bound = slow.concurrency as f64 / waited;
    let sending = state
        .window
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map_or(wall, |(first, last)| (last - first).as_secs_f64());
    let held = client.stats.held_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let timeline = state.timeline.swap(false, Ordering::Relaxed);
    let generator = load_generator(state, addr, slow.concurrency).await;
    state.timeline.store(timeline, Ordering::Relaxed);
    state.latency_ms.store(0, Ordering::Relaxed);
    Slow {
        per_second: requests / wall,
        bound,
        share: requests / wall / bound,
        answer_ms: waited * 1000.0,
        sending_share: requests / sending / bound,
        held_ms: held * 1e3 / requests,
        busy: held / (slow.concurrency as f64 * sending),
        generator,
    }
}

/// Where a slow target's slots stood idle: the target's occupancy (exchanges in progress /
/// concurrency) in 10 ms windows from its first arrival to its last answer, the windows
/// below 90% printed with what arrived in them, and the idle slot time summed by what was
/// being sent around it.
fn print_idle_timeline(state: &Sink, concurrency: usize) {
    let ex = std::mem::take(&mut *state.exchanges.lock().unwrap_or_else(|e| e.into_inner()));
    let (Some(start), Some(end)) = (ex.iter().map(|e| e.0).min(), ex.iter().map(|e| e.1).max())
    else {
        return;
    };
    let step = Duration::from_millis(10);
    let windows = (end - start).as_micros() / step.as_micros() + 1;
    let mut busy = vec![0f64; windows as usize];
    let mut kinds: Vec<std::collections::BTreeMap<&str, usize>> =
        vec![Default::default(); windows as usize];
    for &(a, b, what) in &ex {
        let (a, b) = ((a - start).as_secs_f64(), (b - start).as_secs_f64());
        *kinds[(a / step.as_secs_f64()) as usize]
            .entry(what)
            .or_default() += 1;
        let mut w = (a / step.as_secs_f64()) as usize;
        while w < busy.len() && (w as f64) * step.as_secs_f64() < b {
            let (lo, hi) = (
                w as f64 * step.as_secs_f64(),
                (w + 1) as f64 * step.as_secs_f64(),
            );
            busy[w] += b.min(hi) - a.max(lo);
            w += 1;
        }
    }
    let capacity = step.as_secs_f64() * concurrency as f64;
    let mut idle_by: std::collections::BTreeMap<String, f64> = Default::default();
    let mut total_idle = 0.0;
    for (w, b) in busy.iter().enumerate() {
        let idle = (capacity - b).max(0.0);
        total_idle += idle;
        let around: Vec<String> = kinds[w].iter().map(|(k, n)| format!("{n} {k}")).collect();
        let label = kinds[w].keys().copied().collect::<Vec<_>>().join(" + ");
        *idle_by
            .entry(if label.is_empty() {
                "nothing arrived".into()
            } else {
                label
            })
            .or_default() += idle;
        if b / capacity < 0.9 {
            println!(
                "  {:>6} ms: {:>3.0}% busy, arrived: {}",
                w * 10,
                b / capacity * 100.0,
                if around.is_empty() {
                    "-".into()
                } else {
                    around.join(", ")
                }
            );
        }
    }
    println!(
        "  idle slot time {:.0} ms of {:.0} ({:.1}%), by what arrived in its window: {}",
        total_idle * 1e3,
        capacity * busy.len() as f64 * 1e3,
        total_idle / (capacity * busy.len() as f64) * 100.0,
        idle_by
            .iter()
            .map(|(k, v)| format!("{k} {:.0} ms", v * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// POSTs 11,000 users to the sink, `concurrency` at once, with nothing else to do (one fixed
/// body; each answer read and dropped): its share of concurrency / answer time.
async fn load_generator(state: &Sink, addr: std::net::SocketAddr, concurrency: usize) -> f64 {
    let before = state.waited_us.load(Ordering::Relaxed);
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/scim/v2/Users");
    let each = 11_000 / concurrency;
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move {
            for _ in 0..each {
                let sent = client
                    .post(&url)
                    .header("content-type", "application/scim+json")
                    .body(r#"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"load"}"#)
                    .send()
                    .await
                    .expect("load generator request");
                let _ = sent.bytes().await;
            }
        });
    }
    while set.join_next().await.is_some() {}
    let wall = t.elapsed().as_secs_f64();
    let requests = (each * concurrency) as f64;
    let waited = (state.waited_us.load(Ordering::Relaxed) - before) as f64 / 1e6 / requests;
    requests / wall / (concurrency as f64 / waited)
}

fn peak_rss_mb() -> f64 {
    status_mb("VmHWM")
}

async fn database(kind: &str, dir: &std::path::Path) -> Option<(String, Option<String>)> {
    if kind == "sqlite" {
        // BENCH_KEEP_DB: outside the temporary directory, which goes at the end.
        let file = match std::env::var_os("BENCH_KEEP_DB") {
            Some(_) => {
                let file = std::env::temp_dir().join(format!(
                    "scimsync_bench_{}.db",
                    uuid::Uuid::new_v4().simple()
                ));
                eprintln!("keeping database {}", file.display());
                file
            }
            None => dir.join("bench.db"),
        };
        return Some((format!("sqlite://{}", file.display()), None));
    }
    let admin = std::env::var("SCIMSYNC_TEST_POSTGRES").ok()?;
    let name = format!("scimsync_bench_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(&admin).await.ok()?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .ok()?;
    let mut url = reqwest::Url::parse(&admin).ok()?;
    url.set_path(&format!("/{name}"));
    Some((url.to_string(), Some(name)))
}

async fn bench(db: &str, n: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((url, pg_name)) = database(db, dir.path()).await else {
        println!("{db}: skipped (set SCIMSYNC_TEST_POSTGRES to include PostgreSQL)");
        return;
    };
    let store = Store::connect(&url).await.expect("database");
    // For trying a change to a schema or settings without a migration.
    macro_rules! bench_sql {
        ($pool:ty, $var:literal) => {
            if let Ok(sql) = std::env::var($var) {
                let pool = <$pool>::connect(&url).await.expect("database");
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .expect($var);
                pool.close().await;
            }
        };
    }
    match pg_name {
        Some(_) => bench_sql!(sqlx::PgPool, "BENCH_PG_SQL"),
        None => bench_sql!(sqlx::SqlitePool, "BENCH_SQLITE_SQL"),
    }
    let state = Arc::new(Sink::default());
    let addr = start_sink(state.clone());
    // BENCH_MAPPINGS: an operator's own scripts, to see what they cost.
    let mappings = match std::env::var_os("BENCH_MAPPINGS") {
        Some(own) => std::path::PathBuf::from(own),
        None => scimsync::mapping::write_defaults(dir.path()).expect("write mappings"),
    };
    let mut target = TargetConfig::new("sink", &format!("http://{addr}/scim/v2"), Some("t".into()));
    target.mappings = mappings;
    target.exclude_service_accounts = false;
    target.concurrency = 32;
    // For profiling: BENCH_FULL_ONLY=1 BENCH_BULK=1 profiles the bulk path.
    target.bulk = std::env::var_os("BENCH_BULK").is_some();

    let groups = n / 10;
    let t = Instant::now();
    let records: Vec<(usize, Record)> = sample(n, groups, 20)
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i + 1, r))
        .collect();
    store.import(&records, false).await.expect("import");
    let import_s = t.elapsed().as_secs_f64();
    drop(records);
    reset_peak_rss();
    eprintln!("imported; syncing (RSS now {:.0} MB)", rss_mb());

    if std::env::var_os("BENCH_SLOW_ONLY").is_some() {
        // For working on the 5 ms target alone, with where its slots stood idle.
        state.timeline.store(true, Ordering::Relaxed);
        let slow = slow_target(&store, &target, &state, addr).await;
        print_idle_timeline(&state, target.concurrency);
        println!(
            "| {db} | {n} + {groups} | 5 ms target: {} |",
            slow.describe()
        );
        finish(store, pg_name).await;
        return;
    }
    let engine = engine_for(&store, &target).await;
    let objects = (n + groups) as f64;
    let threads0 = thread_cpu();
    let server0 = postgres_cpu_seconds();
    let (r0, cpu0, t0) = (
        state.requests.load(Ordering::Relaxed),
        cpu_seconds(),
        Instant::now(),
    );
    let s = engine.full_sync(&NoProgress).await.expect("full sync");
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    let first_requests = state.requests.load(Ordering::Relaxed) - r0;
    assert_eq!(s.failed, 0, "{:?}", &s.failures[..s.failures.len().min(3)]);

    if std::env::var_os("BENCH_FULL_ONLY").is_some() {
        // For profiling the first sync alone (perf record -D <ms after the import>).
        // And where the CPU went, per object, by kind of thread (/proc ticks: 10 ms).
        let mut per_thread: Vec<String> = thread_cpu_since(&threads0)
            .into_iter()
            .map(|(kind, secs)| format!("{kind} {:.0} µs", secs / objects * 1e6))
            .collect();
        // PostgreSQL's server, when it runs here: its CPU is the other half of the cost.
        if let (true, Some(before), Some(after)) =
            (pg_name.is_some(), server0, postgres_cpu_seconds())
        {
            per_thread.push(format!(
                "PostgreSQL server {:.0} µs",
                (after - before) / objects * 1e6
            ));
        }
        println!(
            "| {db} | {n} + {groups} | {import_s:.1} s | {wall:.2} s | {:.0} | {first_requests} | {:.0} µs | {} |",
            objects / wall,
            cpu / objects * 1e6,
            per_thread.join(", ")
        );
        finish(store, pg_name).await;
        return;
    }
    eprintln!("after full sync: peak RSS {:.0} MB", peak_rss_mb());
    eprintln!("no-op sync");
    let (r1, t1) = (state.requests.load(Ordering::Relaxed), Instant::now());
    let s2 = engine.full_sync(&NoProgress).await.expect("no-op sync");
    let noop = t1.elapsed().as_secs_f64();
    eprintln!(
        "no-op done in {noop:.2} s: peak RSS {:.0} MB",
        peak_rss_mb()
    );
    let noop_requests = state.requests.load(Ordering::Relaxed) - r1;
    if std::env::var_os("BENCH_NOOP_ONLY").is_some() {
        // For working on the no-op resync alone: two more, each timed, with the CPU of the last
        // split by kind of thread.
        let mut times = vec![format!("{noop:.2}")];
        let mut per_thread = Vec::new();
        for _ in 0..2 {
            let (threads0, t) = (thread_cpu(), Instant::now());
            engine.full_sync(&NoProgress).await.expect("no-op sync");
            times.push(format!("{:.2}", t.elapsed().as_secs_f64()));
            per_thread = thread_cpu_since(&threads0)
                .into_iter()
                .map(|(kind, secs)| format!("{kind} {:.0} ms", secs * 1e3))
                .collect();
        }
        println!(
            "| {db} | {n} + {groups} | no-op resyncs {} s, {noop_requests} requests | {} |",
            times.join(" / "),
            per_thread.join(", ")
        );
        finish(store, pg_name).await;
        return;
    }

    // Change → target latency through the daemon's event consumer.
    let cfg = Config {
        database: DatabaseConfig { url: url.clone() },
        worker: WorkerConfig {
            full_sync_cron: "0 0 0 1 1 *".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..Default::default()
        },
        targets: vec![target.clone()],
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let daemon = {
        let (store, c) = (store.clone(), cancel.clone());
        tokio::spawn(async move { scimsync::daemon::run_on(cfg, store, c, listener).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for i in 0..50 {
        let id = format!("u-{:06}", i * 7 % n);
        let st = store
            .state("sink", scimsync::directory::Kind::User, &id)
            .await
            .expect("state")
            .expect("synced");
        let path = format!("/Users/{}", st.remote_id.unwrap_or_default());
        let line = format!("{{\"kind\":\"user\",\"id\":\"{id}\",\"username\":\"bench-{i}-{id}\"}}");
        let rec = scimsync::directory::parse_record(&line).expect("record");
        let start = Instant::now();
        store.import(&[(1, rec)], false).await.expect("import");
        loop {
            let got = state
                .patched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&path)
                .copied();
            if got.is_some_and(|g| g > start) {
                latencies.push(got.map_or(0.0, |g| g.duration_since(start).as_secs_f64() * 1000.0));
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "change did not arrive"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    cancel.cancel();
    let _ = daemon.await;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];

    // The same directory to a target taking /Bulk (bulk = true): users go 100 to a request.
    let mut bulk = target.clone();
    bulk.name = "bulk".into();
    bulk.bulk = true;
    let bulk_engine = engine_for(&store, &bulk).await;
    let (rb, cpub, tb) = (
        state.requests.load(Ordering::Relaxed),
        cpu_seconds(),
        Instant::now(),
    );
    eprintln!("after the daemon: peak RSS {:.0} MB", peak_rss_mb());
    let sb = bulk_engine.full_sync(&NoProgress).await.expect("bulk sync");
    eprintln!("after bulk: peak RSS {:.0} MB", peak_rss_mb());
    let (bulk_wall, bulk_cpu) = (tb.elapsed().as_secs_f64(), cpu_seconds() - cpub);
    let bulk_requests = state.requests.load(Ordering::Relaxed) - rb;
    assert_eq!(sb.failed, 0);

    let slow = slow_target(&store, &target, &state, addr).await;

    println!(
        "| {db} | {n} + {groups} | {import_s:.1} s | {wall:.2} s | {:.0} | {first_requests} | {:.0} µs | {bulk_wall:.2} s, {:.0}/s, {bulk_requests} req, {:.0} µs | {noop:.2} s / {noop_requests} ({} unchanged) | {:.0} / {:.0} ms | {} | {:.0} MB |",
        objects / wall,
        cpu / objects * 1e6,
        objects / bulk_wall,
        bulk_cpu / objects * 1e6,
        s2.unchanged,
        pct(0.5),
        pct(0.99),
        slow.describe(),
        peak_rss_mb()
    );
    finish(store, pg_name).await;
}

/// Closes the store and drops the bench's PostgreSQL database, if it made one (and
/// BENCH_KEEP_DB does not ask to keep it, for looking at its plans).
async fn finish(store: Store, pg_name: Option<String>) {
    store.close().await;
    if let Some(name) = &pg_name
        && std::env::var_os("BENCH_KEEP_DB").is_some()
    {
        eprintln!("kept database {name}");
        return;
    }
    if let (Some(name), Ok(admin)) = (pg_name, std::env::var("SCIMSYNC_TEST_POSTGRES"))
        && let Ok(pool) = sqlx::PgPool::connect(&admin).await
    {
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pool).await;
    }
}

fn main() {
    if let Ok(filter) = std::env::var("SCIMSYNC_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000]
    } else {
        sizes
    };
    // The scimsync binary's own runtime: one thread (see src/main.rs).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "| database | users + groups | import | full sync | objects/s | requests | scimsync CPU/object | full sync with bulk = true | no-op resync / requests | change→target p50 / p99 | 5 ms target, concurrency 32 | peak RSS (sync) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    rt.block_on(async {
        for n in sizes {
            let dbs = std::env::var("BENCH_DBS").unwrap_or_else(|_| "sqlite,postgres".into());
            for db in dbs.split(',') {
                bench(db.trim(), n).await;
            }
        }
    });
}
