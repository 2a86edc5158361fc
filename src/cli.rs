//! The command line: argument parsing, progress, tables and exit codes (0 ok, 1 some object
//! failed or deprovisioning was held back, 2 bad usage or config). Business rules live in the
//! library modules; this file only wires and prints.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::Value;

use crate::config::{Config, ConfigError, TargetConfig};
use crate::directory::{self, Kind, Record};
use crate::mapping::{LiveMappings, MapOutcome, Mappings, TargetInfo};
use crate::sandbox::{self, OAuthClient, SandboxOptions, SandboxProfile};
use crate::store::{Scanned, Store};
use crate::sync::{Engine, NoProgress, Progress, RunSummary, SyncOptions};
use crate::target::TargetClient;

#[derive(Parser)]
#[command(
    name = "scimsync",
    version,
    about = "Outbound SCIM 2.0 provisioning worker"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "SCIMSYNC_CONFIG",
        default_value = "scimsync.toml"
    )]
    config: PathBuf,
    /// Log lines as human-readable text or as JSON (one object a line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon: change events, scheduled full syncs, batch workers, /healthz, /readyz,
    /// /metrics; stops gracefully on SIGTERM/SIGINT.
    Run,
    /// Sync now: everything (--full) or one object (--user / --group).
    Sync(SyncArgs),
    /// Show what a full sync would send, without sending it or changing state.
    Plan {
        #[arg(long)]
        target: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Import or export the directory (JSON Lines).
    #[command(subcommand)]
    Directory(DirectoryCommand),
    /// Try the mapping scripts.
    #[command(subcommand)]
    Mapping(MappingCommand),
    /// Reach each target and print what it supports.
    Check {
        #[arg(long)]
        target: Option<String>,
    },
    /// Recent runs and the objects currently failing.
    Status {
        #[arg(long)]
        target: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Apply database migrations (every command applies them too).
    Migrate,
    /// Run a local in-memory SCIM 2.0 service provider.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Which service provider to behave like.
        #[arg(long, value_enum, default_value_t = SandboxProfile::Default)]
        profile: SandboxProfile,
        /// A static bearer token the sandbox accepts (none and no OAuth client: open).
        #[arg(long)]
        token: Option<String>,
        /// An OAuth client of the token endpoint, as ID:SECRET (scopes "admin read").
        #[arg(long = "oauth-client", value_name = "ID:SECRET")]
        oauth_clients: Vec<String>,
    },
    /// A first run: a sandbox, a sample directory in a fresh SQLite file, one full sync.
    Demo {
        /// Keep the demo's database and mappings in this directory (default: a temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Users in the sample directory.
        #[arg(long, default_value_t = 200)]
        users: usize,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false, id = "what")]
struct What {
    /// Every object of every target.
    #[arg(long)]
    full: bool,
    /// One user, by directory id.
    #[arg(long)]
    user: Option<String>,
    /// One group, by directory id.
    #[arg(long)]
    group: Option<String>,
}

#[derive(Args)]
struct SyncArgs {
    #[command(flatten)]
    what: What,
    #[arg(long)]
    target: Option<String>,
    /// Send no mutating request and change no state.
    #[arg(long)]
    dry_run: bool,
    /// Let this run deprovision past the deletion guard.
    #[arg(long)]
    allow_deletions: bool,
}

#[derive(Subcommand)]
enum DirectoryCommand {
    /// Upsert objects from a JSON Lines file (`-` for stdin), in one transaction.
    Import {
        file: PathBuf,
        /// Delete directory objects absent from the file.
        #[arg(long)]
        prune: bool,
    },
    /// Print the directory as JSON Lines.
    Export,
}

#[derive(Subcommand)]
enum MappingCommand {
    /// Print the validated SCIM resource the mappings produce for one object.
    Test {
        #[arg(long)]
        target: String,
        #[command(flatten)]
        object: TestObject,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct TestObject {
    /// A directory user, by id.
    #[arg(long)]
    user: Option<String>,
    /// A directory group, by id.
    #[arg(long)]
    group: Option<String>,
    /// A directory object in the import format (one JSON object), not necessarily imported.
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Text,
    Json,
}

/// Errors that mean "bad usage or config" (exit 2) rather than "something failed" (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon says what it does; one-shot commands speak up only about problems.
    let default_level = if matches!(cli.command, Command::Run) {
        "info,tokio_cron_scheduler=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SCIMSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // Library errors often embed their source's text already; print each cause once.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {msg}");
            if e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<ConfigError>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Sandbox {
            listen,
            profile,
            token,
            oauth_clients,
        } => run_sandbox(&listen, profile, token, oauth_clients).await,
        Command::Demo { dir, users } => demo(dir, users).await,
        command => {
            let cfg = Config::load(&cli.config)?;
            let store = Store::connect(&cfg.database.url)
                .await
                .with_context(|| format!("database {}", redact_url(&cfg.database.url)))?;
            let code = with_store(command, &cfg, &store).await;
            store.close().await;
            code
        }
    }
}

fn lease_ms(cfg: &Config) -> i64 {
    i64::try_from(cfg.worker.job_lease.0.saturating_mul(1000)).unwrap_or(i64::MAX)
}

async fn with_store(command: Command, cfg: &Config, store: &Store) -> Result<ExitCode> {
    match command {
        Command::Run => {
            if cfg.targets.is_empty() {
                return Err(UsageError("the config has no [[target]]".into()).into());
            }
            let cancel = tokio_util::sync::CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                wait_for_shutdown().await;
                tracing::info!("stop requested; finishing in-flight work");
                stop.cancel();
            });
            crate::daemon::run(cfg.clone(), store.clone(), cancel)
                .await
                .map_err(|e| match e {
                    crate::daemon::DaemonError::Scheduler(_)
                    | crate::daemon::DaemonError::Listen { .. } => {
                        anyhow::Error::from(UsageError(e.to_string()))
                    }
                    other => anyhow::Error::from(other),
                })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync(args) => {
            let opts = SyncOptions {
                dry_run: args.dry_run,
                allow_deletions: args.allow_deletions,
                batch_size: cfg.worker.batch_size,
                trace: !args.what.full,
                trigger: "cli".into(),
                job_lease_ms: lease_ms(cfg),
                workers: cfg.worker.workers,
            };
            let targets = select_targets(cfg, args.target.as_deref())?;
            if args.what.full {
                full_sync(store, &targets, opts).await
            } else {
                let (kind, id) = match (&args.what.user, &args.what.group) {
                    (Some(u), _) => (Kind::User, u.clone()),
                    (_, Some(g)) => (Kind::Group, g.clone()),
                    _ => return Err(UsageError("one of --full, --user, --group".into()).into()),
                };
                sync_one(store, &targets, kind, &id, opts).await
            }
        }
        Command::Plan { target, format } => {
            let targets = select_targets(cfg, target.as_deref())?;
            let opts = SyncOptions {
                dry_run: true,
                batch_size: cfg.worker.batch_size,
                trigger: "plan".into(),
                ..Default::default()
            };
            plan(store, &targets, opts, format).await
        }
        Command::Directory(DirectoryCommand::Import { file, prune }) => {
            import(store, &file, prune).await
        }
        Command::Directory(DirectoryCommand::Export) => export(store).await,
        Command::Mapping(MappingCommand::Test { target, object }) => {
            mapping_test(store, cfg, &target, object).await
        }
        Command::Check { target } => check(&select_targets(cfg, target.as_deref())?).await,
        Command::Status { target, format } => {
            let targets = select_targets(cfg, target.as_deref())?;
            status(store, &targets, target.as_deref(), format).await
        }
        Command::Migrate => {
            println!("database is migrated ({})", store.backend_name());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox { .. } | Command::Demo { .. } => unreachable!("handled before"),
    }
}

fn select_targets(cfg: &Config, name: Option<&str>) -> Result<Vec<TargetConfig>> {
    match name {
        Some(n) => cfg.target(n).cloned().map(|t| vec![t]).ok_or_else(|| {
            let known: Vec<&str> = cfg.targets.iter().map(|t| t.name.as_str()).collect();
            UsageError(format!("no target named {n:?} (configured: {known:?})")).into()
        }),
        None if cfg.targets.is_empty() => {
            Err(UsageError("the config has no [[target]]".into()).into())
        }
        None => Ok(cfg.targets.clone()),
    }
}

fn load_mappings(t: &TargetConfig) -> Result<Mappings> {
    Mappings::load(&t.mappings).map_err(|e| UsageError(format!("target {:?}: {e}", t.name)).into())
}

async fn engine(store: &Store, t: &TargetConfig, opts: SyncOptions) -> Result<Engine> {
    let mappings = Arc::new(
        LiveMappings::load(&t.mappings)
            .map_err(|e| UsageError(format!("target {:?}: {e}", t.name)))?,
    );
    let client = TargetClient::new(t).map_err(|e| UsageError(e.to_string()))?;
    Ok(Engine::new(store.clone(), Arc::new(client), t.clone(), mappings, opts).await)
}

async fn full_sync(store: &Store, targets: &[TargetConfig], opts: SyncOptions) -> Result<ExitCode> {
    let progress = TermProgress::new();
    let mut summaries = Vec::new();
    for t in targets {
        let e = engine(store, t, opts.clone()).await?;
        summaries.push(e.full_sync(&progress).await?);
    }
    print_summaries(&summaries, opts.dry_run);
    Ok(exit_for(&summaries))
}

fn exit_for(summaries: &[RunSummary]) -> ExitCode {
    if summaries.iter().all(RunSummary::is_clean) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_summaries(summaries: &[RunSummary], dry_run: bool) {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "target",
        "created",
        "updated",
        "unchanged",
        "deleted",
        "skipped",
        "failed",
        "requests",
    ]);
    for s in summaries {
        table.add_row(vec![
            s.target.clone(),
            s.created.to_string(),
            s.updated.to_string(),
            s.unchanged.to_string(),
            s.deleted.to_string(),
            s.skipped.to_string(),
            s.failed.to_string(),
            s.requests.to_string(),
        ]);
    }
    if dry_run {
        println!("dry run: nothing was sent and no state changed; counts are what a sync would do");
    }
    println!("{table}");
    for s in summaries {
        for (kind, id, err) in s.failures.iter().take(20) {
            println!("failed: {}: {kind} {id}: {err}", s.target);
        }
        if s.failures.len() > 20 {
            println!(
                "... and {} more failures (scimsync status)",
                s.failures.len() - 20
            );
        }
        if let Some(why) = &s.held_back {
            println!("{}: {why}", s.target);
        }
        for note in &s.notes {
            println!("{}: note: {note}", s.target);
        }
    }
}

async fn sync_one(
    store: &Store,
    targets: &[TargetConfig],
    kind: Kind,
    id: &str,
    opts: SyncOptions,
) -> Result<ExitCode> {
    let mut ok = true;
    for t in targets {
        let e = engine(store, t, opts.clone()).await?;
        let r = e.sync_one(kind, id).await?;
        println!("== target {}: {kind} {id}", t.name);
        for s in &r.steps {
            println!("  {s}");
        }
        println!("  => {:?}: {}", r.action, r.detail);
        ok &= r.action != crate::sync::Action::Failed;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn plan(
    store: &Store,
    targets: &[TargetConfig],
    opts: SyncOptions,
    format: Format,
) -> Result<ExitCode> {
    let mut summaries = Vec::new();
    for t in targets {
        let e = engine(store, t, opts.clone()).await?;
        summaries.push(e.full_sync(&NoProgress).await?);
    }
    if format == Format::Json {
        let out: Vec<Value> = summaries
            .iter()
            .map(|s| {
                serde_json::json!({
                    "target": s.target,
                    "requests": s.planned.iter().map(redacted).collect::<Vec<_>>(),
                    "held_back": s.held_back,
                    "failures": s.failures,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for s in &summaries {
            println!("target {}: {} request(s)", s.target, s.planned.len());
            let groups = [
                ("create", "POST", " "),
                ("update", "PATCH", " "),
                ("replace", "PUT", " "),
                ("DELETE", "DELETE", "!"),
            ];
            for (label, method, marker) in groups {
                let of: Vec<Value> = s
                    .planned
                    .iter()
                    .filter(|p| p.method == method)
                    .map(redacted)
                    .collect();
                if of.is_empty() {
                    continue;
                }
                println!("  {label} ({}):", of.len());
                for p in of {
                    let body = p.get("body").map(Value::to_string).unwrap_or_default();
                    println!(
                        "{marker}   {} {} {body}",
                        p["method"].as_str().unwrap_or(""),
                        p["path"].as_str().unwrap_or("")
                    );
                }
            }
        }
        print_summaries(&summaries, true);
    }
    Ok(exit_for(&summaries))
}

/// A planned request as JSON, with any `password` value hidden.
fn redacted(p: &crate::sync::PlannedRequest) -> Value {
    fn scrub(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if k.eq_ignore_ascii_case("password") {
                        *x = Value::String("<redacted>".into());
                    } else {
                        scrub(x);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
    scrub(&mut v);
    v
}

async fn import(store: &Store, file: &Path, prune: bool) -> Result<ExitCode> {
    let name = file.display().to_string();
    let reader: Box<dyn BufRead> = if name == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot open {name}"))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut records = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{name}: line {}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let rec = directory::parse_record(&line)
            .map_err(|e| anyhow!("{name}: line {}: {e}; nothing was imported", i + 1))?;
        records.push((i + 1, rec));
    }
    let s = store
        .import(&records, prune)
        .await
        .map_err(|e| anyhow!("{name}: {e}; nothing was imported"))?;
    println!(
        "imported {name}: {} user(s) and {} group(s) changed, {} unchanged, {} deleted",
        s.users_changed, s.groups_changed, s.unchanged, s.deleted
    );
    Ok(ExitCode::SUCCESS)
}

async fn export(store: &Store) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // The export names no target: the state columns it joins are ignored.
    let mut after = String::new();
    loop {
        // No fingerprint: every user is read in full.
        let batch = store.user_scan("", &after, None, 1000, None, false).await?;
        let Some(last) = batch.last() else { break };
        after = last.id().to_string();
        for scanned in &batch {
            if let Scanned::Read(u, _, _) = scanned {
                writeln!(out, "{}", directory::export_user(u))?;
            }
        }
    }
    let mut after = String::new();
    loop {
        let batch = store.group_batch("", &after, None, 1000).await?;
        let Some((last, ..)) = batch.last() else {
            break;
        };
        after = last.id.clone();
        for (g, ..) in &batch {
            writeln!(out, "{}", directory::export_group(g))?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn mapping_test(
    store: &Store,
    cfg: &Config,
    target: &str,
    object: TestObject,
) -> Result<ExitCode> {
    let t = select_targets(cfg, Some(target))?.remove(0);
    let m = load_mappings(&t)?;
    let info = TargetInfo {
        name: t.name.clone(),
        compatibility: t.compatibility.to_string(),
    };
    let (kind, outcome) = match (object.user, object.group, object.file) {
        (_, _, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let rec = directory::parse_record(text.trim())
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            match rec {
                Record::User(u) => (Kind::User, m.map_user(&u, &info)),
                Record::Group(g) => (Kind::Group, m.map_group(&g, &info)),
                Record::DeleteUser(_) | Record::DeleteGroup(_) => {
                    return Err(anyhow!("{}: a deletion has nothing to map", path.display()));
                }
            }
        }
        (Some(id), _, _) => {
            let (u, ..) = store
                .user(&t.name, &id)
                .await?
                .ok_or_else(|| anyhow!("no user {id:?} in the directory"))?;
            (Kind::User, m.map_user(&u, &info))
        }
        (_, Some(id), _) => {
            let (g, ..) = store
                .group(&t.name, &id)
                .await?
                .ok_or_else(|| anyhow!("no group {id:?} in the directory"))?;
            (Kind::Group, m.map_group(&g, &info))
        }
        _ => return Err(UsageError("--user, --group or --file".into()).into()),
    };
    match outcome {
        Ok(MapOutcome::Resource(doc)) => match crate::scim::validate(kind, &doc) {
            Ok(()) => {
                println!("{}", serde_json::to_string_pretty(&doc)?);
                Ok(ExitCode::SUCCESS)
            }
            Err(v) => {
                println!("{}", serde_json::to_string_pretty(&doc)?);
                eprintln!("invalid {kind} resource:");
                for e in v {
                    eprintln!("  {e}");
                }
                Ok(ExitCode::from(1))
            }
        },
        Ok(MapOutcome::Skip { script, reason }) => {
            println!("skipped by {script}: {reason}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("mapping error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

async fn check(targets: &[TargetConfig]) -> Result<ExitCode> {
    let mut ok = true;
    for t in targets {
        let client = TargetClient::new(t).map_err(|e| UsageError(e.to_string()))?;
        println!("target {} ({})", t.name, t.url);
        let caps = match client.service_provider_config().await {
            Ok(spc) if spc.is_object() => {
                let c = crate::scim::Capabilities::from_spc(&spc);
                println!(
                    "  ServiceProviderConfig (/{}): patch={} filter={} (maxResults {}) bulk={} etag={}",
                    client.profile.spc_path,
                    c.patch,
                    c.filter,
                    c.filter_max_results,
                    c.bulk,
                    c.etag
                );
                c
            }
            Ok(_) => {
                ok = false;
                println!("  ServiceProviderConfig: not a JSON object; conservative defaults apply");
                crate::scim::Capabilities::conservative()
            }
            Err(e) => {
                ok = false;
                println!("  ServiceProviderConfig: {e}");
                crate::scim::Capabilities::conservative()
            }
        };
        let mut groups = true;
        for what in ["ResourceTypes", "Schemas"] {
            match client.discovery(what).await {
                Ok(v) => {
                    if what == "ResourceTypes" {
                        groups = crate::target::groups_offered(&v).unwrap_or(true);
                    }
                    let names: Vec<String> = v
                        .get("Resources")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|r| r.get("name").or(r.get("id")))
                                .filter_map(Value::as_str)
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default();
                    println!("  {what}: {}", names.join(", "));
                }
                Err(e) => println!("  {what}: {e}"),
            }
        }
        // An authenticated read proves the credentials, which discovery may not need.
        match client.list(Kind::User, 1, 1).await {
            Ok(_) => {
                println!(
                    "  authentication ({:?}): ok; read of /Users: ok",
                    t.auth.mode
                );
                if let Some(left) = client.token_expiry().await {
                    println!("  OAuth token: refreshed in {} s", left.as_secs());
                }
            }
            Err(e) => {
                ok = false;
                println!(
                    "  authentication ({:?}) and read of /Users: {e}",
                    t.auth.mode
                );
            }
        }
        println!("  profile: {}", client.profile.describe());
        let eff = crate::target::Effective::new(&caps, &client.profile, &t.capabilities, groups);
        println!("  effective: {}", eff.describe());
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn status(
    store: &Store,
    targets: &[TargetConfig],
    target: Option<&str>,
    format: Format,
) -> Result<ExitCode> {
    let mut health = Vec::new();
    for t in targets {
        let fp = t.fingerprint();
        let h = store
            .cache_get(&t.name, "health", &fp, i64::MAX / 2)
            .await?;
        let spc_at = store.cache_age(&t.name, "spc").await?;
        let (backlog, oldest) = store.backlog(&t.name).await?;
        health.push(serde_json::json!({
            "target": t.name,
            "healthy": h.as_ref().and_then(|h| h.get("healthy")).and_then(Value::as_bool),
            "health_since": h.as_ref().and_then(|h| h.get("since")).and_then(Value::as_i64),
            "spc_read_at": spc_at,
            "event_backlog": backlog,
            "oldest_event_at": oldest,
        }));
    }
    let runs = store.recent_runs(target, 10).await?;
    let failing = store.failing(target).await?;
    if format == Format::Json {
        let out = serde_json::json!({"targets": health, "runs": runs, "failing": failing});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("targets:");
    for h in &health {
        let since = h["health_since"]
            .as_i64()
            .map(format_ms)
            .unwrap_or_default();
        let state = match h["healthy"].as_bool() {
            Some(true) => format!("healthy since {since} UTC"),
            Some(false) => {
                format!("UNHEALTHY since {since} UTC (most recent requests failed; probing)")
            }
            None => "health not known yet".into(),
        };
        let spc = match h["spc_read_at"].as_i64() {
            Some(at) => format!(
                "ServiceProviderConfig read {} s ago",
                (crate::store::now_ms() - at).max(0) / 1000
            ),
            None => "ServiceProviderConfig not read yet".into(),
        };
        println!(
            "  {}: {state}; {spc}; {} change event(s) not consumed",
            h["target"].as_str().unwrap_or(""),
            h["event_backlog"]
        );
    }
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "run",
        "target",
        "trigger",
        "started (UTC)",
        "seconds",
        "status",
        "created",
        "updated",
        "unchanged",
        "deleted",
        "skipped",
        "failed",
    ]);
    for r in &runs {
        let secs = r
            .finished_at
            .map(|f| format!("{:.1}", (f - r.started_at) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        table.add_row(vec![
            r.id.to_string(),
            r.target.clone(),
            r.trigger.clone(),
            format_ms(r.started_at),
            secs,
            r.status.clone(),
            r.created.to_string(),
            r.updated.to_string(),
            r.unchanged.to_string(),
            r.deleted.to_string(),
            r.skipped.to_string(),
            r.failed.to_string(),
        ]);
    }
    println!("recent runs:\n{table}");
    for r in runs.iter().filter(|r| r.detail.is_some()) {
        println!("run {}: {}", r.id, r.detail.as_deref().unwrap_or(""));
    }
    if failing.is_empty() {
        println!("no object is failing");
    } else {
        println!("failing objects:");
        for f in &failing {
            let next = f
                .next_attempt_at
                .map(|t| format!(", next try {} UTC", format_ms(t)))
                .unwrap_or_default();
            println!(
                "  {} {} {} (attempts {}, last {}{next}): {}",
                f.target,
                f.kind,
                f.local_id,
                f.attempts,
                format_ms(f.updated_at),
                f.last_error.as_deref().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn format_ms(ms: i64) -> String {
    crate::clock::rfc3339(ms).replace('T', " ").replace('Z', "")
}

fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

async fn run_sandbox(
    listen: &str,
    profile: SandboxProfile,
    token: Option<String>,
    oauth_clients: Vec<String>,
) -> Result<ExitCode> {
    let mut clients = Vec::new();
    for c in &oauth_clients {
        let (id, secret) = c
            .split_once(':')
            .ok_or_else(|| UsageError(format!("--oauth-client {c:?}: expected ID:SECRET")))?;
        clients.push(OAuthClient {
            id: id.to_string(),
            secret: secret.to_string(),
            scopes: vec!["admin".into(), "read".into()],
        });
    }
    // A profile that demands OAuth gets a client to try it with.
    if clients.is_empty() && profile.rules().required_scope.is_some() {
        clients.push(OAuthClient {
            id: "scim-provisioner".into(),
            secret: uuid::Uuid::new_v4().simple().to_string(),
            scopes: vec!["admin".into(), "read".into()],
        });
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| UsageError(format!("cannot listen on {listen}: {e}")))?;
    let opts = SandboxOptions {
        token,
        profile,
        oauth_clients: clients.clone(),
        ..Default::default()
    };
    let h = sandbox::serve(listener, opts).await?;
    println!("SCIM sandbox ({profile:?} profile) listening: {}", h.url);
    if !clients.is_empty() {
        println!("OAuth token endpoint: {}", h.token_url);
        for c in &clients {
            println!(
                "  client_id {} client_secret {} scopes {}",
                c.id,
                c.secret,
                c.scopes.join(" ")
            );
        }
    }
    println!("stop with Ctrl-C");
    wait_for_shutdown().await;
    h.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn demo(dir: Option<PathBuf>, users: usize) -> Result<ExitCode> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            d
        }
        None => {
            tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let db = dir.join("demo.db");
    if db.exists() {
        return Err(UsageError(format!(
            "{} exists; the demo wants a fresh database",
            db.display()
        ))
        .into());
    }
    crate::mapping::write_defaults(&dir)
        .with_context(|| format!("cannot write the default mappings into {}", dir.display()))?;
    let token = uuid::Uuid::new_v4().to_string();
    let sb = sandbox::start(SandboxOptions::with_token(&token)).await?;
    println!("1. sandbox SCIM service provider on {}", sb.url);
    let store = Store::connect(&format!("sqlite://{}", db.display())).await?;
    let groups = (users / 20).max(1);
    let records: Vec<(usize, Record)> = directory::sample(users, groups, 20)
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i + 1, r))
        .collect();
    store.import(&records, false).await?;
    println!(
        "2. sample directory: {users} users (every 10th a service account, excluded by default) and {groups} groups in {}",
        db.display()
    );
    let mut t = TargetConfig::new("sandbox", &sb.url, Some(token));
    t.mappings = dir.join("mappings");
    let opts = SyncOptions {
        batch_size: 100,
        trigger: "demo".into(),
        ..Default::default()
    };
    println!("3. full sync:");
    let e = engine(&store, &t, opts.clone()).await?;
    let first = e.full_sync(&TermProgress::new()).await?;
    print_summaries(std::slice::from_ref(&first), false);
    println!("4. a few resources as the sandbox stored them:");
    for u in sb.users().iter().take(2) {
        println!("{}", serde_json::to_string_pretty(u)?);
    }
    if let Some(g) = sb.groups().first() {
        let mut g = g.clone();
        if let Some(m) = g.get_mut("members").and_then(Value::as_array_mut) {
            let n = m.len();
            m.truncate(3);
            if n > 3 {
                m.push(Value::String(format!("... {} more", n - 3)));
            }
        }
        println!("{}", serde_json::to_string_pretty(&g)?);
    }
    println!("5. a second full sync converges: nothing changed, so nothing is sent:");
    let second = e.full_sync(&NoProgress).await?;
    print_summaries(std::slice::from_ref(&second), false);
    println!("   write requests in the second sync: {}", second.writes);
    store.close().await;
    sb.stop().await;
    Ok(exit_for(&[first, second]))
}

/// Progress on stderr: bars on a terminal, one line per phase otherwise.
struct TermProgress {
    bar: Mutex<Option<indicatif::ProgressBar>>,
    tty: bool,
}

impl TermProgress {
    fn new() -> Self {
        Self {
            bar: Mutex::new(None),
            tty: std::io::stderr().is_terminal(),
        }
    }
}

impl Progress for TermProgress {
    fn phase(&self, target: &str, phase: &str, total: u64) {
        let mut slot = self.bar.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = slot.take() {
            b.finish();
        }
        if self.tty {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>12} {bar:30} {pos}/{len} {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(format!("{target} {phase}"));
            *slot = Some(b);
        } else {
            eprintln!("{target}: {phase} ({total})");
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|p| p.into_inner()) {
            b.inc(n);
        }
    }
    fn done(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish();
        }
    }
}
