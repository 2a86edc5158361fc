//! The TOML configuration model: parsing, `${VAR}` expansion and validation.
//!
//! Every error names the key it is about (`target[0] ("slack").auth.token`), because operators
//! read these messages, not the code.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default = "default_database_url")]
    pub url: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: default_database_url(),
        }
    }
}

fn default_database_url() -> String {
    "sqlite://scimsync.db".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    #[serde(default = "default_cron")]
    pub full_sync_cron: String,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How often the daemon looks for change events when nothing wakes it (SQLite has no
    /// notifications; PostgreSQL wakes it at once).
    #[serde(default = "default_poll")]
    pub event_poll_interval_ms: u64,
    /// How long a claimed full-sync batch stays claimed without its worker renewing it: after
    /// a crash, another worker takes it over this much later.
    #[serde(default = "default_lease")]
    pub job_lease: Seconds,
    /// Full-sync batches one process works on at the same time.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// On SIGTERM/SIGINT, how long in-flight work may take before it is handed back.
    #[serde(default = "default_shutdown")]
    pub shutdown_timeout: Seconds,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            full_sync_cron: default_cron(),
            batch_size: default_batch_size(),
            listen: default_listen(),
            event_poll_interval_ms: default_poll(),
            job_lease: default_lease(),
            workers: default_workers(),
            shutdown_timeout: default_shutdown(),
        }
    }
}

fn default_poll() -> u64 {
    250
}
fn default_lease() -> Seconds {
    Seconds(30)
}
fn default_workers() -> usize {
    4
}
fn default_shutdown() -> Seconds {
    Seconds(30)
}

fn default_cron() -> String {
    "0 0 * * * *".to_string()
}
fn default_batch_size() -> u32 {
    100
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compatibility {
    #[default]
    Default,
    Aws,
    Slack,
    Salesforce,
    Webex,
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Compatibility::Default => "default",
            Compatibility::Aws => "aws",
            Compatibility::Slack => "slack",
            Compatibility::Salesforce => "salesforce",
            Compatibility::Webex => "webex",
        };
        f.write_str(s)
    }
}

/// Whether mapped resources are also checked against the schemas the target publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SchemaCheck {
    #[default]
    Off,
    Warn,
    Strict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    #[default]
    Delete,
    Deactivate,
}

/// The deletion guard: an absolute count, or a percent of the objects provisioned on the target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeletionLimit {
    Count(u64),
    Percent(f64),
}

impl Default for DeletionLimit {
    fn default() -> Self {
        DeletionLimit::Percent(10.0)
    }
}

impl DeletionLimit {
    /// Runs that deprovision this many objects or fewer never trip a percent limit, so that a
    /// small target can still lose a handful of people.
    pub const PERCENT_FLOOR: u64 = 5;

    /// True when deprovisioning `deletions` of `provisioned` objects stays within the limit.
    pub fn allows(&self, deletions: u64, provisioned: u64) -> bool {
        match *self {
            DeletionLimit::Count(n) => deletions <= n,
            DeletionLimit::Percent(p) => {
                deletions <= Self::PERCENT_FLOOR
                    || (deletions as f64) <= (provisioned as f64) * p / 100.0
            }
        }
    }
}

impl fmt::Display for DeletionLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeletionLimit::Count(n) => write!(f, "{n}"),
            DeletionLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl<'de> Deserialize<'de> for DeletionLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        let bad = || {
            serde::de::Error::custom(
                "expected a count (e.g. 25) or a percent string (e.g. \"10%\") of at most 100%",
            )
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(DeletionLimit::Count(n as u64)),
            Raw::Int(_) => Err(bad()),
            Raw::Str(s) => {
                let s = s.trim();
                if let Some(p) = s.strip_suffix('%') {
                    match p.trim().parse::<f64>() {
                        Ok(p) if (0.0..=100.0).contains(&p) => Ok(DeletionLimit::Percent(p)),
                        _ => Err(bad()),
                    }
                } else {
                    s.parse::<u64>()
                        .map(DeletionLimit::Count)
                        .map_err(|_| bad())
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A static bearer token (`token` or `token_file`).
    #[default]
    Token,
    /// OAuth2 client_credentials; the token is fetched, cached and refreshed.
    Oauth,
    /// HTTP Basic (`username`, `password`).
    Basic,
}

/// How an OAuth client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// HTTP Basic with client_id and client_secret (RFC 6749 §2.3.1's recommendation).
    #[default]
    Basic,
    /// client_id and client_secret as form parameters.
    Body,
}

#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub mode: AuthMode,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// Space-separated scopes to request.
    pub scope: Option<String>,
    /// Extra form parameters for the token request (e.g. `audience`).
    #[serde(default)]
    pub extra: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    pub username: Option<String>,
    pub password: Option<String>,
}

// Hand-written so a secret can never reach a log line through `{:?}`.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("token", &hidden(&self.token))
            .field("token_file", &self.token_file)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &hidden(&self.client_secret))
            .field("scope", &self.scope)
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .field("client_auth", &self.client_auth)
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .finish()
    }
}

impl AuthConfig {
    pub fn token(token: &str) -> Self {
        Self {
            mode: AuthMode::Token,
            token: Some(token.to_string()),
            ..Default::default()
        }
    }

    /// Checks that the keys given fit the mode; (key, message) names the first that does not.
    fn validate(&self) -> Result<(), (String, String)> {
        let given = |o: &Option<String>| o.as_ref().is_some_and(|v| !v.trim().is_empty());
        let need = |k: &str, ok: bool, mode: &str| -> Result<(), (String, String)> {
            if ok {
                Ok(())
            } else {
                Err((
                    format!("auth.{k}"),
                    format!("mode \"{mode}\" needs a non-empty {k}"),
                ))
            }
        };
        let forbid = |k: &str, present: bool, mode: &str| -> Result<(), (String, String)> {
            if present {
                Err((
                    format!("auth.{k}"),
                    format!("is not used by mode \"{mode}\""),
                ))
            } else {
                Ok(())
            }
        };
        let oauth_keys = [
            ("token_url", self.token_url.is_some()),
            ("client_id", self.client_id.is_some()),
            ("client_secret", self.client_secret.is_some()),
            ("scope", self.scope.is_some()),
            ("extra", !self.extra.is_empty()),
        ];
        let basic_keys = [
            ("username", self.username.is_some()),
            ("password", self.password.is_some()),
        ];
        let token_keys = [
            ("token", self.token.is_some()),
            ("token_file", self.token_file.is_some()),
        ];
        match self.mode {
            AuthMode::Token => {
                for (k, p) in oauth_keys.iter().chain(&basic_keys) {
                    forbid(k, *p, "token")?;
                }
                match (given(&self.token), &self.token_file) {
                    (true, None) | (false, Some(_)) => Ok(()),
                    (true, Some(_)) => Err((
                        "auth.token_file".into(),
                        "give token or token_file, not both".into(),
                    )),
                    (false, None) => need("token", false, "token"),
                }
            }
            AuthMode::Oauth => {
                for (k, p) in token_keys.iter().chain(&basic_keys) {
                    forbid(k, *p, "oauth")?;
                }
                need("token_url", given(&self.token_url), "oauth")?;
                need("client_id", given(&self.client_id), "oauth")?;
                need("client_secret", given(&self.client_secret), "oauth")?;
                let url = self.token_url.as_deref().unwrap_or_default();
                match reqwest::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
                    _ => Err((
                        "auth.token_url".into(),
                        format!("{url:?} is not an http(s) URL"),
                    )),
                }
            }
            AuthMode::Basic => {
                for (k, p) in token_keys.iter().chain(&oauth_keys) {
                    forbid(k, *p, "basic")?;
                }
                need("username", given(&self.username), "basic")?;
                need("password", self.password.is_some(), "basic")
            }
        }
    }
}

/// Operator overrides of what a target reports about itself; they win over its
/// ServiceProviderConfig and over the compatibility profile.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityOverrides {
    pub patch: Option<bool>,
    pub filter: Option<bool>,
    pub bulk: Option<bool>,
    /// Whether the target accepts PUT (full replace) of users and groups.
    pub put: Option<bool>,
    /// Member values per request when changing group members.
    pub max_members_per_request: Option<usize>,
    /// Send `$ref` (the member's URI) with every group member.
    pub member_ref: Option<bool>,
    /// Whether listing /Groups returns every group, so a batch creating groups may read them
    /// all at once instead of looking each up (skipped when unset: settings fingerprints of
    /// configs without it stay as they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list_groups: Option<bool>,
}

/// A duration in seconds, written as a number of seconds or as "90s", "15m", "1h", "1d".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub u64);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        let bad = || {
            serde::de::Error::custom(
                "expected seconds (e.g. 3600) or \"90s\", \"15m\", \"1h\", \"1d\"",
            )
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Seconds(n)),
            Raw::Str(s) => {
                let s = s.trim();
                let (num, unit) =
                    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
                let n: u64 = num.parse().map_err(|_| bad())?;
                let mult = match unit.trim() {
                    "" | "s" => 1,
                    "m" => 60,
                    "h" => 3600,
                    "d" => 86_400,
                    _ => return Err(bad()),
                };
                Ok(Seconds(n.saturating_mul(mult)))
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub compatibility: Compatibility,
    #[serde(default = "default_mappings")]
    pub mappings: PathBuf,
    #[serde(default = "default_true")]
    pub exclude_service_accounts: bool,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub on_delete: OnDelete,
    #[serde(default)]
    pub max_deletions: DeletionLimit,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub schema_check: SchemaCheck,
    /// Verify the target's TLS certificate (on unless explicitly turned off).
    #[serde(default = "default_true")]
    pub verify_tls: bool,
    /// Extra PEM CA certificates to trust for this target.
    pub ca_file: Option<PathBuf>,
    /// How long a fetched ServiceProviderConfig is trusted, shared by every worker.
    #[serde(default = "default_spc_ttl")]
    pub spc_cache_ttl: Seconds,
    #[serde(default)]
    pub capabilities: CapabilityOverrides,
    /// Seconds before one HTTP request to this target is abandoned.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Objects of one batch synced at the same time against this target; also the bound on
    /// requests in flight to it from one process.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Send a batch's creates and updates in `/Bulk` requests when the target's
    /// ServiceProviderConfig offers bulk (or `[target.capabilities] bulk = true` says so).
    #[serde(default)]
    pub bulk: bool,
    /// Requests a second to this target (shared by every task of the process); unset:
    /// unlimited until the target answers 429, then adapted.
    pub max_requests_per_second: Option<f64>,
    /// Requests that may go at once after a quiet spell.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// How long the circuit breaker holds requests back before probing a failing target.
    #[serde(default = "default_cooldown")]
    pub breaker_cooldown: Seconds,
    #[serde(default)]
    pub auth: AuthConfig,
}

fn default_mappings() -> PathBuf {
    PathBuf::from("mappings")
}
fn default_true() -> bool {
    true
}
fn default_burst() -> u32 {
    10
}
fn default_cooldown() -> Seconds {
    Seconds(30)
}
fn default_spc_ttl() -> Seconds {
    Seconds(3600)
}
fn default_timeout() -> u64 {
    30
}
fn default_concurrency() -> usize {
    8
}

impl TargetConfig {
    /// A target with every optional key at its default (used by `demo` and tests).
    pub fn new(name: &str, url: &str, token: Option<String>) -> Self {
        Self {
            name: name.to_string(),
            url: url.to_string(),
            compatibility: Compatibility::Default,
            mappings: default_mappings(),
            exclude_service_accounts: true,
            groups: Vec::new(),
            on_delete: OnDelete::Delete,
            max_deletions: DeletionLimit::default(),
            dry_run: false,
            schema_check: SchemaCheck::Off,
            verify_tls: true,
            ca_file: None,
            spc_cache_ttl: default_spc_ttl(),
            capabilities: CapabilityOverrides::default(),
            timeout_seconds: default_timeout(),
            concurrency: default_concurrency(),
            bulk: false,
            max_requests_per_second: None,
            burst: default_burst(),
            breaker_cooldown: default_cooldown(),
            auth: AuthConfig {
                token,
                ..Default::default()
            },
        }
    }

    /// A hash of the settings that decide what this target is and how it is reached, without
    /// secrets: facts cached about the target hold only while it is unchanged.
    pub fn fingerprint(&self) -> String {
        let a = &self.auth;
        crate::directory::hash_json(&serde_json::json!({
            "url": self.url,
            "compatibility": self.compatibility.to_string(),
            "capabilities": self.capabilities,
            "auth": {
                "mode": format!("{:?}", a.mode),
                "token_url": a.token_url,
                "client_id": a.client_id,
                "scope": a.scope,
                "extra": a.extra,
                "username": a.username,
            },
            "verify_tls": self.verify_tls,
            "ca_file": self.ca_file,
        }))
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }
}

impl Config {
    /// Reads and validates a config file; relative paths inside it are resolved against the
    /// file's directory so the daemon behaves the same from any working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text, path, |name| std::env::var(name).ok())?;
        let base = path.parent().unwrap_or(Path::new(""));
        for t in &mut cfg.targets {
            for p in [
                Some(&mut t.mappings),
                t.ca_file.as_mut(),
                t.auth.token_file.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        Ok(cfg)
    }

    /// Parses config text; `env` resolves `${VAR}` references (injected for tests).
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        expand_env(&mut value, &mut Vec::new(), &env).map_err(|(key, message)| {
            ConfigError::Key {
                path: path.to_path_buf(),
                key,
                message,
            }
        })?;
        let names = target_names(&value);
        let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = describe_path(&e.path().to_string(), &names);
            ConfigError::Key {
                path: path.to_path_buf(),
                key,
                // The toml deserializer appends "\nin `table`"; the key path already says it.
                message: e
                    .into_inner()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            }
        })?;
        cfg.validate().map_err(|(key, message)| ConfigError::Key {
            path: path.to_path_buf(),
            key: describe_path(&key, &names),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.worker.batch_size == 0 || self.worker.batch_size > 10_000 {
            return Err((
                "worker.batch_size".into(),
                "must be between 1 and 10000".into(),
            ));
        }
        if self.worker.job_lease.0 < 3 {
            return Err((
                "worker.job_lease".into(),
                "must be at least 3 seconds".into(),
            ));
        }
        if self.worker.workers == 0 || self.worker.workers > 64 {
            return Err(("worker.workers".into(), "must be between 1 and 64".into()));
        }
        if self.worker.event_poll_interval_ms == 0 {
            return Err((
                "worker.event_poll_interval_ms".into(),
                "must be at least 1".into(),
            ));
        }
        let fields = self.worker.full_sync_cron.split_whitespace().count();
        if !(6..=7).contains(&fields) {
            return Err((
                "worker.full_sync_cron".into(),
                format!(
                    "expected 6 fields (sec min hour day month weekday), found {fields}: {:?}",
                    self.worker.full_sync_cron
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let key = |k: &str| format!("target[{i}].{k}");
            if t.name.trim().is_empty() {
                return Err((key("name"), "must not be empty".into()));
            }
            if !seen.insert(t.name.as_str()) {
                return Err((
                    key("name"),
                    format!("target name {:?} is used twice", t.name),
                ));
            }
            match reqwest::Url::parse(&t.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => {
                    return Err((
                        key("url"),
                        format!("scheme {:?} is not http or https", u.scheme()),
                    ));
                }
                Err(e) => return Err((key("url"), format!("{:?} is not a URL: {e}", t.url))),
            }
            if t.timeout_seconds == 0 {
                return Err((key("timeout_seconds"), "must be at least 1".into()));
            }
            if t.max_requests_per_second
                .is_some_and(|r| !(r > 0.0 && r.is_finite()))
            {
                return Err((
                    key("max_requests_per_second"),
                    "must be a positive number".into(),
                ));
            }
            if t.concurrency == 0 || t.concurrency > 256 {
                return Err((key("concurrency"), "must be between 1 and 256".into()));
            }
            t.auth.validate().map_err(|(k, m)| (key(&k), m))?;
        }
        Ok(())
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// Replaces `${VAR}` in every string value; `$${` stays a literal `${`.
fn expand_env(
    value: &mut toml::Value,
    path: &mut Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) => {
            *s = expand_str(s, env).map_err(|m| (path.join("."), m))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let last = path.pop().unwrap_or_default();
                path.push(format!("{last}[{i}]"));
                expand_env(item, path, env)?;
                path.pop();
                path.push(last);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                path.push(k.clone());
                expand_env(v, path, env)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(lit) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = lit;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated ${...} reference".to_string())?;
            let name = &body[..end];
            if name.is_empty() {
                return Err("empty ${} reference".into());
            }
            let val = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&val);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn target_names(value: &toml::Value) -> Vec<Option<String>> {
    value
        .get("target")
        .and_then(|t| t.as_array())
        .map(|items| {
            items
                .iter()
                .map(|t| t.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `target[1].auth.mode` → `target[1] ("okta").auth.mode`: operators know targets by name.
fn describe_path(path: &str, names: &[Option<String>]) -> String {
    let Some(rest) = path.strip_prefix("target[") else {
        return path.to_string();
    };
    let Some(end) = rest.find(']') else {
        return path.to_string();
    };
    match rest[..end].parse::<usize>().ok().and_then(|i| names.get(i)) {
        Some(Some(name)) => format!("target[{}] ({name:?}){}", &rest[..end], &rest[end + 1..]),
        _ => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"), |n| {
            (n == "TOKEN").then(|| "s3cret".to_string())
        })
    }

    const MINIMAL: &str = r#"
[[target]]
name = "a"
url = "http://127.0.0.1:1/scim/v2"
[target.auth]
token = "${TOKEN}"
"#;

    #[test]
    fn defaults_and_env_expansion() {
        let cfg = parse(MINIMAL).expect("valid config");
        assert_eq!(cfg.database.url, "sqlite://scimsync.db");
        assert_eq!(cfg.worker.batch_size, 100);
        let t = &cfg.targets[0];
        assert_eq!(t.auth.token.as_deref(), Some("s3cret"));
        assert_eq!(t.max_deletions, DeletionLimit::Percent(10.0));
        assert!(t.exclude_service_accounts);
        assert_eq!(t.on_delete, OnDelete::Delete);
    }

    #[test]
    fn unknown_key_is_named_with_target_name() {
        let text = format!("{MINIMAL}\nfrobnicate = 1\n");
        let err = parse(&text).expect_err("unknown key").to_string();
        assert!(err.contains("target[0] (\"a\").auth"), "{err}");
        assert!(err.contains("frobnicate"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let text = MINIMAL.replace("url =", "compatibility = \"okta\"\nurl =");
        let err = parse(&text).expect_err("bad enum").to_string();
        assert!(err.contains("target[0] (\"a\").compatibility"), "{err}");
        let text = MINIMAL.replace("url =", "max_deletions = \"150%\"\nurl =");
        let err = parse(&text).expect_err("bad limit").to_string();
        assert!(err.contains("max_deletions"), "{err}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let text = MINIMAL.replace("${TOKEN}", "${NOPE}");
        let err = parse(&text).expect_err("missing var").to_string();
        assert!(err.contains("target[0].auth.token"), "{err}");
        assert!(err.contains("NOPE"), "{err}");
    }

    #[test]
    fn duplicate_target_and_bad_url() {
        let text = format!("{MINIMAL}{MINIMAL}");
        let err = parse(&text).expect_err("dup").to_string();
        assert!(err.contains("used twice"), "{err}");
        let text = MINIMAL.replace("http://127.0.0.1:1/scim/v2", "ftp://x");
        let err = parse(&text).expect_err("scheme").to_string();
        assert!(err.contains("target[0] (\"a\").url"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../config.example.toml");
        let cfg = Config::parse(text, Path::new("config.example.toml"), |_| Some("t".into()))
            .expect("config.example.toml parses");
        assert_eq!(cfg.targets.len(), 1);
    }

    #[test]
    fn auth_modes_take_their_own_keys() {
        let oauth = MINIMAL.replace(
            "token = \"${TOKEN}\"",
            "mode = \"oauth\"\ntoken_url = \"https://idp/token\"\nclient_id = \"c\"\nclient_secret = \"${TOKEN}\"\nscope = \"admin\"\nextra = { audience = \"scim\" }",
        );
        let cfg = parse(&oauth).expect("oauth config");
        let a = &cfg.targets[0].auth;
        assert_eq!(
            (a.mode, a.client_auth),
            (AuthMode::Oauth, ClientAuth::Basic)
        );
        assert_eq!(a.extra.get("audience").map(String::as_str), Some("scim"));
        assert!(
            !format!("{a:?}").contains("s3cret"),
            "secrets are redacted in Debug"
        );
        let err = parse(&oauth.replace("client_secret = \"${TOKEN}\"\n", ""))
            .expect_err("missing secret")
            .to_string();
        assert!(
            err.contains("auth.client_secret") && err.contains("oauth"),
            "{err}"
        );
        let err = parse(&MINIMAL.replace("token = ", "client_id = \"x\"\ntoken = "))
            .expect_err("foreign key")
            .to_string();
        assert!(
            err.contains("auth.client_id") && err.contains("not used by mode"),
            "{err}"
        );
        let basic = MINIMAL.replace(
            "token = \"${TOKEN}\"",
            "mode = \"basic\"\nusername = \"u\"\npassword = \"${TOKEN}\"",
        );
        assert_eq!(
            parse(&basic).expect("basic").targets[0].auth.mode,
            AuthMode::Basic
        );
        let both = MINIMAL.replace("token = ", "token_file = \"t\"\ntoken = ");
        assert!(
            parse(&both)
                .expect_err("both")
                .to_string()
                .contains("not both")
        );
    }

    #[test]
    fn capability_overrides_and_ttl() {
        let text = MINIMAL.replace(
            "[target.auth]",
            "spc_cache_ttl = \"15m\"\n[target.capabilities]\npatch = false\nmax_members_per_request = 50\n[target.auth]",
        );
        let t = &parse(&text).expect("valid").targets[0];
        assert_eq!(t.spc_cache_ttl, Seconds(900));
        assert_eq!(t.capabilities.patch, Some(false));
        assert_eq!(t.capabilities.max_members_per_request, Some(50));
        let bad = text.replace("patch = false", "pach = false");
        let err = parse(&bad).expect_err("typo").to_string();
        assert!(
            err.contains("target[0] (\"a\").capabilities") && err.contains("pach"),
            "{err}"
        );
        let mut other = parse(&text).expect("valid").targets[0].clone();
        let fp = other.fingerprint();
        other.url.push('x');
        assert_ne!(
            other.fingerprint(),
            fp,
            "a changed target is a new fingerprint"
        );
    }

    #[test]
    fn deletion_limits() {
        assert!(DeletionLimit::Percent(10.0).allows(5, 10));
        assert!(!DeletionLimit::Percent(10.0).allows(6, 10));
        assert!(DeletionLimit::Percent(10.0).allows(10, 100));
        assert!(!DeletionLimit::Count(2).allows(3, 1000));
        assert_eq!(expand_str("a$${b}$c", &|_| None).as_deref(), Ok("a${b}$c"));
    }
}
