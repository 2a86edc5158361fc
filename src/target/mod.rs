//! The HTTP client of one SCIM service provider: auth, capabilities, retries, typed errors.
//!
//! One pooled `reqwest::Client` per target. Transient failures (network, 408, 429, 5xx) are
//! retried with exponential backoff and jitter, honouring Retry-After; everything else is
//! returned to the engine as a typed error carrying status, scimType and detail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use backon::BackoffBuilder;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::config::TargetConfig;
use crate::directory::{Kind, json_text};
use crate::scim::{self, Capabilities, PatchOperation};

pub mod auth;
pub mod guard;
mod io;
pub mod profile;

pub use profile::{Profile, UserRemoval};

use auth::{Auth, AuthError, Credential};

/// Bodies larger than this are refused rather than buffered.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Attempts per request for transient failures (the first try included).
const MAX_ATTEMPTS: usize = 4;
/// The longest Retry-After scimsync will sit out within one request.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    #[error("{target}: {method} {path}: HTTP {status}{}: {detail}", scim_type.as_ref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Status {
        target: String,
        method: String,
        path: String,
        status: u16,
        scim_type: Option<String>,
        detail: String,
    },
    #[error("{target}: {method} {path}: {message}")]
    Network {
        target: String,
        method: String,
        path: String,
        message: String,
    },
    #[error("{target}: authentication: {message}")]
    Auth { target: String, message: String },
    #[error(
        "{target}: not sent: the target is unhealthy (most recent requests failed); next probe in {retry_in_secs} s"
    )]
    Unavailable { target: String, retry_in_secs: u64 },
    #[error("{target}: {method} {path}: invalid response: {message}")]
    Invalid {
        target: String,
        method: String,
        path: String,
        message: String,
    },
}

impl TargetError {
    pub fn status(&self) -> Option<u16> {
        match self {
            TargetError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Statuses worth retrying: the request may succeed as it is, later.
fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// Retry-After as seconds or as an HTTP date (RFC 9110 §10.2.3).
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::parse(v).ok()?.timestamp();
    let ms = when.as_millisecond() - jiff::Timestamp::now().as_millisecond();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// Requests sent, by method (retries included).
#[derive(Debug, Default)]
pub struct RequestStats {
    pub get: AtomicU64,
    pub post: AtomicU64,
    pub put: AtomicU64,
    pub patch: AtomicU64,
    pub delete: AtomicU64,
    /// Microseconds requests held a slot of the target's concurrency, summed: against
    /// concurrency × elapsed, how busy the configured concurrency was kept.
    pub held_micros: AtomicU64,
}

tokio::task_local! {
    /// Requests sent by the future run through [`counting`]: (all, writes).
    static COUNTED: std::cell::Cell<(u64, u64)>;
}

/// Runs `f` and counts the requests it sends itself, whatever else the process sends at the
/// same time (several batches of one run may be worked at once).
pub async fn counting<F: std::future::Future>(f: F) -> (F::Output, u64, u64) {
    COUNTED
        .scope(std::cell::Cell::new((0, 0)), async move {
            let out = f.await;
            let (all, writes) = COUNTED.with(std::cell::Cell::get);
            (out, all, writes)
        })
        .await
}

tokio::task_local! {
    /// The turn of the batch whose requests the future run through [`in_turn`] sends.
    static TURN: priority_semaphore::Priority;
}

/// Sends the requests of `f` in the given turn (see [`TargetClient::next_turn`]).
pub async fn in_turn<F: std::future::Future>(
    turn: priority_semaphore::Priority,
    f: F,
) -> F::Output {
    TURN.scope(turn, f).await
}

impl RequestStats {
    fn count(&self, m: &Method) {
        let write = u64::from(*m != Method::GET);
        let _ = COUNTED.try_with(|c| {
            let (all, writes) = c.get();
            c.set((all + 1, writes + write));
        });
        let c = match *m {
            Method::POST => &self.post,
            Method::PUT => &self.put,
            Method::PATCH => &self.patch,
            Method::DELETE => &self.delete,
            _ => &self.get,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn writes(&self) -> u64 {
        self.post.load(Ordering::Relaxed)
            + self.put.load(Ordering::Relaxed)
            + self.patch.load(Ordering::Relaxed)
            + self.delete.load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        self.writes() + self.get.load(Ordering::Relaxed)
    }
}

pub struct TargetClient {
    name: String,
    base: Url,
    http: reqwest::Client,
    auth: Auth,
    pub profile: Profile,
    caps: OnceCell<Capabilities>,
    /// Methods the target refused with 405/501, per kind: [users, groups].
    patch_refused: [std::sync::atomic::AtomicBool; 2],
    put_refused: [std::sync::atomic::AtomicBool; 2],
    schemas: OnceCell<Option<scim::schema::TargetSchemas>>,
    /// Requests in flight to this target, across every task of the process.
    in_flight: Arc<priority_semaphore::PrioritySemaphore>,
    turns: AtomicU32,
    rate: guard::RateLimiter,
    breaker: guard::Breaker,
    pub stats: Arc<RequestStats>,
}

/// A successful answer: its body parsed as the caller wants it (None for 204 or an empty
/// body, and for what the caller did not want).
struct Answer {
    body: Option<Value>,
    /// `id` of the body, with [`Want::Id`].
    id: Option<String>,
}

/// How much of a successful answer's body to parse. Every body is checked to be JSON; the
/// engine's creates need only the new id and its updates nothing, and building the whole
/// tree of every answer was a share of the engine's CPU in a first sync.
#[derive(Clone, Copy)]
enum Want {
    Value,
    Id,
    Valid,
}

/// The one member of a created resource the engine reads.
#[derive(serde::Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<Value>,
}

/// What scimsync will do with a target: its ServiceProviderConfig, corrected by the
/// compatibility profile, then by the operator's `[target.capabilities]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub patch: bool,
    pub filter: bool,
    pub bulk: bool,
    pub put_users: bool,
    pub put_groups: bool,
    /// The target has a Groups endpoint.
    pub groups: bool,
    pub max_members_per_request: usize,
    pub filter_max_results: u32,
    /// Members carry `$ref` (some targets require it).
    pub member_ref: bool,
    /// The target's bulk limits (0: not published).
    pub bulk_max_operations: u32,
    pub bulk_max_payload: u64,
    /// Listing /Groups returns every group (see [`Profile::list_groups`]).
    pub list_groups: bool,
}

impl Effective {
    pub fn new(
        caps: &Capabilities,
        profile: &Profile,
        o: &crate::config::CapabilityOverrides,
        groups: bool,
    ) -> Effective {
        let put = o.put.unwrap_or(true);
        Effective {
            patch: o.patch.unwrap_or(caps.patch),
            filter: o.filter.unwrap_or(caps.filter || profile.filter_works),
            bulk: o.bulk.unwrap_or(caps.bulk),
            put_users: put,
            put_groups: o.put.unwrap_or(put && profile.put_groups),
            groups,
            max_members_per_request: o
                .max_members_per_request
                .unwrap_or(profile.max_members_per_request)
                .max(1),
            filter_max_results: caps.filter_max_results,
            member_ref: o.member_ref.unwrap_or(false),
            bulk_max_operations: caps.bulk_max_operations,
            bulk_max_payload: caps.bulk_max_payload,
            list_groups: o.list_groups.unwrap_or(profile.list_groups),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "patch={} filter={} (maxResults {}) bulk={} put(users)={} put(groups)={} groups={} members/request={} list(groups)={}",
            self.patch,
            self.filter,
            self.filter_max_results,
            self.bulk,
            self.put_users,
            self.put_groups,
            self.groups,
            self.max_members_per_request,
            self.list_groups
        )
    }
}

/// One page of a listing.
#[derive(Debug)]
pub struct ListPage {
    pub resources: Vec<Value>,
    /// `totalResults` as the target reported it (required by RFC 7644, not always sent).
    pub total: Option<u64>,
}

/// Whether a `/ResourceTypes` answer offers Groups; None when it lists nothing usable.
pub fn groups_offered(resource_types: &Value) -> Option<bool> {
    let list = resource_types
        .get("Resources")
        .and_then(Value::as_array)
        .or_else(|| resource_types.as_array())?;
    if list.is_empty() {
        return None;
    }
    Some(list.iter().any(|r| {
        r.get("endpoint")
            .and_then(Value::as_str)
            .is_some_and(|e| e.trim_matches('/').eq_ignore_ascii_case("Groups"))
            || r.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n.eq_ignore_ascii_case("Group"))
    }))
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::User => 0,
        Kind::Group => 1,
    }
}

pub fn endpoint(kind: Kind) -> &'static str {
    match kind {
        Kind::User => "Users",
        Kind::Group => "Groups",
    }
}

impl TargetClient {
    /// A batch's turn at the target's concurrency: a freed slot goes to the oldest batch's
    /// next request, so batches finish one after another and a finished batch's worker
    /// records it and prepares the next while the others' requests keep the slots busy.
    /// (Served in arrival order, batches started together all finished together, and the
    /// slots emptied while every worker prepared its next.) Requests sent outside a batch
    /// (a single change from the event stream, discovery) go before any batch's.
    pub fn next_turn(&self) -> priority_semaphore::Priority {
        let n = self.turns.fetch_add(1, Ordering::Relaxed) & 0x3FFF_FFFF;
        // Older turns are larger; after 2^30 batches the order starts over (harmlessly).
        i32::MAX - 1 - n as i32
    }

    pub fn new(cfg: &TargetConfig) -> Result<TargetClient, TargetError> {
        let invalid = |message: String| TargetError::Invalid {
            target: cfg.name.clone(),
            method: "-".into(),
            path: "-".into(),
            message,
        };
        let mut base = Url::parse(&cfg.url).map_err(|e| invalid(format!("bad url: {e}")))?;
        if base.cannot_be_a_base() {
            return Err(invalid("url cannot be a base".into()));
        }
        // Segments are pushed onto the base, so it must not end in an empty segment.
        if let Ok(mut segs) = base.path_segments_mut() {
            segs.pop_if_empty();
        }
        let certs = match &cfg.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| invalid(format!("cannot read ca_file {}: {e}", path.display())))?;
                reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| invalid(format!("ca_file {}: {e}", path.display())))?
            }
            None => Vec::new(),
        };
        if !cfg.verify_tls {
            tracing::warn!(
                target = %cfg.name,
                "TLS CERTIFICATE VERIFICATION IS OFF for this target (verify_tls = false): anyone on the network path can read and change what is sent, tokens included"
            );
        }
        // The SCIM endpoint and the token endpoint trust the same certificates.
        let tls = |builder: reqwest::ClientBuilder| {
            builder
                .tls_certs_merge(certs.clone())
                .tls_danger_accept_invalid_certs(!cfg.verify_tls)
        };
        let http = tls(reqwest::Client::builder()
            .timeout(cfg.timeout())
            .connect_timeout(Duration::from_secs(10).min(cfg.timeout()))
            .user_agent(concat!("scimsync/", env!("CARGO_PKG_VERSION")))
            // Retries are ours (backoff, Retry-After, the circuit breaker); reqwest's own
            // would copy every request's headers in case it retries.
            .retry(reqwest::retry::never().max_retries_per_request(0)))
        .build()
        .map_err(|e| invalid(format!("cannot build HTTP client: {e}")))?;
        // The token endpoint gets its own client that never follows redirects, so a
        // redirect cannot carry client credentials elsewhere. Built only for OAuth: each
        // client loads the system's trusted certificates, a few milliseconds.
        let token_http = || {
            tls(reqwest::Client::builder()
                .timeout(cfg.timeout())
                .redirect(reqwest::redirect::Policy::none()))
            .build()
            .map_err(|e| AuthError(format!("cannot build HTTP client: {e}")))
        };
        let auth = Auth::from_config(&cfg.auth, token_http).map_err(|e| invalid(e.0))?;
        Ok(TargetClient {
            name: cfg.name.clone(),
            base,
            http,
            auth,
            profile: Profile::for_mode(cfg.compatibility),
            caps: OnceCell::new(),
            patch_refused: Default::default(),
            put_refused: Default::default(),
            schemas: OnceCell::new(),
            in_flight: Arc::new(priority_semaphore::PrioritySemaphore::new(
                cfg.concurrency.max(1),
            )),
            turns: AtomicU32::new(0),
            rate: guard::RateLimiter::new(cfg.max_requests_per_second, cfg.burst),
            breaker: guard::Breaker::new(Duration::from_secs(cfg.breaker_cooldown.0.max(1))),
            stats: Arc::new(RequestStats::default()),
        })
    }

    /// Whether the circuit breaker holds requests back (the target looks down).
    pub fn unhealthy(&self) -> bool {
        self.breaker.is_open()
    }

    /// The current adapted request rate (None: unlimited).
    pub fn current_rate(&self) -> Option<f64> {
        self.rate.current_rate()
    }

    /// Feeds one outcome to the breaker and reports transitions.
    fn observe(&self, failed: bool) {
        match self.breaker.record(failed) {
            Some(true) => {
                tracing::warn!(target = %self.name, "target unhealthy: most recent requests failed; holding requests back and probing");
                metrics::gauge!("scimsync_target_up", "target" => self.name.clone()).set(0.0);
            }
            Some(false) => {
                tracing::info!(target = %self.name, "target healthy again");
                metrics::gauge!("scimsync_target_up", "target" => self.name.clone()).set(1.0);
            }
            None => {}
        }
    }

    /// Uses capabilities known from elsewhere (the shared cache) instead of asking the target.
    pub fn preset_capabilities(&self, caps: Capabilities) {
        let _ = self.caps.set(caps);
    }

    /// Remembers that the target refused a method (405 or 501) for a kind of resource.
    pub fn refuse(&self, kind: Kind, method: &str) {
        let i = kind_index(kind);
        match method {
            "PATCH" => self.patch_refused[i].store(true, Ordering::Relaxed),
            "PUT" => self.put_refused[i].store(true, Ordering::Relaxed),
            _ => {}
        }
    }

    /// The refused methods, as stored in the shared cache.
    pub fn refusals(&self) -> Value {
        let mut out = Vec::new();
        for kind in [Kind::User, Kind::Group] {
            for method in ["PATCH", "PUT"] {
                if self.refused(kind, method) {
                    out.push(serde_json::json!({"kind": kind.as_str(), "method": method}));
                }
            }
        }
        Value::Array(out)
    }

    pub fn apply_refusals(&self, v: &Value) {
        for r in v.as_array().into_iter().flatten() {
            let kind = match r.get("kind").and_then(Value::as_str) {
                Some("user") => Kind::User,
                Some("group") => Kind::Group,
                _ => continue,
            };
            if let Some(m) = r.get("method").and_then(Value::as_str) {
                self.refuse(kind, m);
            }
        }
    }

    pub fn refused(&self, kind: Kind, method: &str) -> bool {
        let i = kind_index(kind);
        match method {
            "PATCH" => self.patch_refused[i].load(Ordering::Relaxed),
            "PUT" => self.put_refused[i].load(Ordering::Relaxed),
            _ => false,
        }
    }

    /// How long until the OAuth token is refreshed (None for other modes or before the first).
    pub async fn token_expiry(&self) -> Option<Duration> {
        self.auth.token_expiry().await
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut s) = u.path_segments_mut() {
            s.extend(segments);
        }
        u
    }

    /// Capabilities from the target's ServiceProviderConfig, read once per client.
    pub async fn capabilities(&self) -> Capabilities {
        self.caps
            .get_or_init(|| async {
                match self.service_provider_config().await {
                    Ok(v) if v.is_object() => Capabilities::from_spc(&v),
                    Ok(_) => {
                        tracing::warn!(target = %self.name, "ServiceProviderConfig is not a JSON object; assuming no PATCH, no filter, no bulk");
                        Capabilities::conservative()
                    }
                    Err(e) => {
                        tracing::warn!(target = %self.name, error = %e, "cannot read ServiceProviderConfig; assuming no PATCH, no filter, no bulk");
                        Capabilities::conservative()
                    }
                }
            })
            .await
            .clone()
    }

    /// The target's `/Schemas`, read once per client; None (with a warning) when unusable.
    pub async fn schemas(&self) -> Option<scim::schema::TargetSchemas> {
        self.schemas
            .get_or_init(|| async {
                let parsed = self
                    .discovery("Schemas")
                    .await
                    .map(|v| scim::schema::TargetSchemas::from_response(&v));
                match parsed {
                    Ok(Some(s)) => Some(s),
                    Ok(None) => {
                        tracing::warn!(target = %self.name, "/Schemas holds no usable schema; schema_check is skipped");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(target = %self.name, error = %e, "cannot read /Schemas; schema_check is skipped");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    pub async fn service_provider_config(&self) -> Result<Value, TargetError> {
        let a = self
            .send(Method::GET, &[self.profile.spc_path], &[], None)
            .await?;
        Ok(a.body.unwrap_or(Value::Null))
    }

    /// GET of a discovery endpoint such as `ResourceTypes` or `Schemas`.
    pub async fn discovery(&self, what: &str) -> Result<Value, TargetError> {
        let a = self.send(Method::GET, &[what], &[], None).await?;
        Ok(a.body.unwrap_or(Value::Null))
    }

    /// POST; returns the created resource's id, which it must carry.
    pub async fn create(&self, kind: Kind, body: &Value) -> Result<String, TargetError> {
        self.create_text(kind, &json_text(body)).await
    }

    /// POST of a resource already written as JSON text (the engine writes it once, for the
    /// request and for its record); returns the new resource's id.
    pub async fn create_text(&self, kind: Kind, body: &str) -> Result<String, TargetError> {
        let ep = endpoint(kind);
        let a = self
            .send_as(Method::POST, &[ep], &[], Some(body), Want::Id)
            .await?;
        match a.id {
            Some(id) if !id.is_empty() => Ok(id),
            _ => Err(TargetError::Invalid {
                target: self.name.clone(),
                method: "POST".into(),
                path: format!("/{ep}"),
                message: "the created resource has no \"id\"".into(),
            }),
        }
    }

    /// One `POST /Bulk` (RFC 7644 §3.7); the answers come back in any order, each with the
    /// bulkId it was sent with.
    pub async fn bulk(
        &self,
        ops: &[scim::BulkOperation],
    ) -> Result<Vec<scim::BulkAnswer>, TargetError> {
        let a = self
            .send(
                Method::POST,
                &["Bulk"],
                &[],
                Some(&json_text(&scim::bulk_body(ops))),
            )
            .await?;
        Ok(a.body.as_ref().map(scim::bulk_answers).unwrap_or_default())
    }

    /// GET by id; `None` when the target answers 404.
    pub async fn get(&self, kind: Kind, id: &str) -> Result<Option<Value>, TargetError> {
        match self
            .send(Method::GET, &[endpoint(kind), id], &[], None)
            .await
        {
            Ok(a) => Ok(a.body),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GET with a filter; the resources of the first page.
    pub async fn find(&self, kind: Kind, filter: &str) -> Result<Vec<Value>, TargetError> {
        let ep = endpoint(kind);
        let a = self
            .send(Method::GET, &[ep], &[("filter", filter)], None)
            .await?;
        self.resources(a.body, &format!("/{ep}"))
    }

    /// One page of a listing (1-based `start`).
    pub async fn list(
        &self,
        kind: Kind,
        start: usize,
        count: usize,
    ) -> Result<Vec<Value>, TargetError> {
        Ok(self.list_page(kind, start, count).await?.resources)
    }

    /// One page of a listing (1-based `start`) with the total the target reports.
    pub async fn list_page(
        &self,
        kind: Kind,
        start: usize,
        count: usize,
    ) -> Result<ListPage, TargetError> {
        let ep = endpoint(kind);
        let (s, c) = (start.to_string(), count.to_string());
        let a = self
            .send(
                Method::GET,
                &[ep],
                &[("startIndex", &s), ("count", &c)],
                None,
            )
            .await?;
        let total = a
            .body
            .as_ref()
            .and_then(|b| b.get("totalResults"))
            .and_then(Value::as_u64);
        let resources = self.resources(a.body, &format!("/{ep}"))?;
        Ok(ListPage { resources, total })
    }

    fn resources(&self, body: Option<Value>, path: &str) -> Result<Vec<Value>, TargetError> {
        let invalid = |message: &str| TargetError::Invalid {
            target: self.name.clone(),
            method: "GET".into(),
            path: path.to_string(),
            message: message.to_string(),
        };
        let mut body =
            body.ok_or_else(|| invalid("empty body where a ListResponse was expected"))?;
        match body.get_mut("Resources").map(Value::take) {
            Some(Value::Array(items)) => Ok(items),
            // RFC 7644 allows omitting Resources when there are none.
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(_) => Err(invalid("\"Resources\" is not an array")),
        }
    }

    pub async fn replace(&self, kind: Kind, id: &str, body: &Value) -> Result<(), TargetError> {
        self.write(Method::PUT, kind, id, Some(&json_text(body)))
            .await
    }

    pub async fn patch(
        &self,
        kind: Kind,
        id: &str,
        ops: &[PatchOperation],
    ) -> Result<(), TargetError> {
        self.write(
            Method::PATCH,
            kind,
            id,
            Some(&json_text(&scim::patch_body(ops))),
        )
        .await
    }

    pub async fn delete(&self, kind: Kind, id: &str) -> Result<(), TargetError> {
        self.write(Method::DELETE, kind, id, None).await
    }

    /// A PUT, PATCH or DELETE of one resource: its answer is only checked to be JSON.
    async fn write(
        &self,
        method: Method,
        kind: Kind,
        id: &str,
        body: Option<&str>,
    ) -> Result<(), TargetError> {
        self.send_as(method, &[endpoint(kind), id], &[], body, Want::Valid)
            .await
            .map(|_| ())
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Answer, TargetError> {
        self.send_as(method, segments, query, body, Want::Value)
            .await
    }

    async fn send_as(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&str>,
        want: Want,
    ) -> Result<Answer, TargetError> {
        let url = self.url(segments);
        let path = format!("/{}", segments.join("/"));
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(MAX_ATTEMPTS - 1)
            .with_jitter()
            .build();
        let mut reauthenticated = false;
        loop {
            // Discovery endpoints are often open (RFC 7644 §4): without a credential, still try.
            let discovery = method == Method::GET
                && segments.len() == 1
                && !matches!(segments[0], "Users" | "Groups");
            let cred = match self.auth.credential().await {
                Ok(c) => c,
                Err(e) if discovery => {
                    tracing::debug!(target = %self.name, error = %e, "no credential; reading discovery without one");
                    Credential::None
                }
                Err(e) => {
                    return Err(TargetError::Auth {
                        target: self.name.clone(),
                        message: e.0,
                    });
                }
            };
            let mut waited = 0;
            let refused = loop {
                match self.breaker.allow() {
                    Ok(()) => break None,
                    // While one probe is out, the others wait for its answer a little.
                    Err(open) if open.probing && waited < 100 => {
                        waited += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(open) => break Some(open),
                }
            };
            if let Some(open) = refused {
                return Err(TargetError::Unavailable {
                    target: self.name.clone(),
                    retry_in_secs: open.retry_in.as_secs().max(1),
                });
            }
            self.rate.acquire().await;
            let res = self
                .attempt(&method, &url, &path, query, body, &cred, want)
                .await;
            match &res {
                Ok(_) => {
                    self.rate.succeeded();
                    self.observe(false);
                }
                Err(Attempt::Transient(e, ra)) if e.status() == Some(429) => {
                    self.rate.throttled(*ra);
                }
                Err(Attempt::Transient(_, _)) => self.observe(true),
                Err(Attempt::Final(e)) => self.observe(matches!(e.status(), Some(401 | 403))),
            }
            let (err, retry_after) = match res {
                Ok(a) => return Ok(a),
                // A refused OAuth token may just have expired early: fetch one more, once.
                Err(Attempt::Final(e))
                    if e.status() == Some(401)
                        && !reauthenticated
                        && self.auth.refused(&cred).await =>
                {
                    reauthenticated = true;
                    tracing::debug!(target = %self.name, "401: fetching a new token and retrying once");
                    continue;
                }
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Transient(e, ra)) => (e, ra),
            };
            let Some(delay) = backoff.next() else {
                return Err(err);
            };
            let delay = retry_after.map_or(delay, |ra| ra.min(MAX_RETRY_AFTER).max(delay));
            tracing::debug!(target = %self.name, %method, %path, error = %err, ?delay, "transient failure; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        method: &Method,
        url: &Url,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&str>,
        cred: &Credential,
        want: Want,
    ) -> Result<Answer, Attempt> {
        let mk = |message: String| TargetError::Network {
            target: self.name.clone(),
            method: method.to_string(),
            path: path.to_string(),
            message,
        };
        let mut req = self.http.request(method.clone(), url.clone()).header(
            reqwest::header::ACCEPT,
            "application/scim+json, application/json",
        );
        if !query.is_empty() {
            req = req.query(query);
        }
        req = match cred {
            Credential::Bearer(t) => req.bearer_auth(t),
            Credential::Basic(u, p) => req.basic_auth(u, Some(p)),
            Credential::None => req,
        };
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/scim+json")
                .body(b.to_owned());
        }
        self.stats.count(method);
        let request = req
            .build()
            .map_err(|e| Attempt::Transient(mk(describe_reqwest(&e)), None))?;
        let (http, stats, in_flight) = (
            self.http.clone(),
            self.stats.clone(),
            self.in_flight.clone(),
        );
        let turn = TURN.try_with(|t| *t).unwrap_or(i32::MAX);
        let (target, method_label) = (self.name.clone(), method.to_string());
        let exchanged = io::exchange(async move {
            // A slot of the target's concurrency, held for the exchange only (until the answer
            // is read): not for a backoff sleep, nor for parsing the answer. Taken and given
            // back on the I/O thread, so a freed slot's next request goes out at once.
            let permit = in_flight.acquire(turn).await;
            let started = std::time::Instant::now();
            let sent = http.execute(request).await;
            metrics::histogram!(
                "scimsync_request_duration_seconds",
                "target" => target,
                "method" => method_label,
            )
            .record(started.elapsed().as_secs_f64());
            let mut resp = sent.map_err(Failed::Network)?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(retry_after);
            let mut bytes = Vec::new();
            while let Some(c) = resp.chunk().await.map_err(Failed::Network)? {
                if bytes.len() + c.len() > MAX_BODY {
                    return Err(Failed::TooLarge);
                }
                bytes.extend_from_slice(&c);
            }
            drop(permit);
            stats.held_micros.fetch_add(
                u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            Ok((status, retry_after, bytes))
        })
        .await;
        let (status, retry_after, bytes) = match exchanged {
            Ok(Ok(answer)) => answer,
            Ok(Err(Failed::Network(e))) => {
                return Err(Attempt::Transient(mk(describe_reqwest(&e)), None));
            }
            Ok(Err(Failed::TooLarge)) => {
                return Err(Attempt::Final(TargetError::Invalid {
                    target: self.name.clone(),
                    method: method.to_string(),
                    path: path.to_string(),
                    message: format!("response body exceeds {MAX_BODY} bytes"),
                }));
            }
            Err(e) => return Err(Attempt::Transient(mk(e), None)),
        };
        if status.is_success() {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Answer {
                    body: None,
                    id: None,
                });
            }
            let parsed = match want {
                Want::Value => serde_json::from_slice::<Value>(&bytes).map(|v| Answer {
                    body: Some(v),
                    id: None,
                }),
                // JSON that is not an object has no id (the caller says so), not bad JSON.
                Want::Id => match serde_json::from_slice::<IdOnly>(&bytes) {
                    Ok(v) => Ok(Answer {
                        body: None,
                        id: v.id.as_ref().and_then(Value::as_str).map(str::to_string),
                    }),
                    Err(_) => {
                        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map(|_| Answer {
                            body: None,
                            id: None,
                        })
                    }
                },
                Want::Valid => {
                    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map(|_| Answer {
                        body: None,
                        id: None,
                    })
                }
            };
            return match parsed {
                Ok(a) => Ok(a),
                Err(e) => Err(Attempt::Final(TargetError::Invalid {
                    target: self.name.clone(),
                    method: method.to_string(),
                    path: path.to_string(),
                    message: format!(
                        "HTTP {} with a body that is not JSON ({e}): {}",
                        status.as_u16(),
                        snippet(&bytes)
                    ),
                })),
            };
        }
        let parsed: Option<scim::ErrorBody> = serde_json::from_slice(&bytes).ok();
        let (scim_type, detail) = match parsed {
            Some(b) => (b.scim_type, b.detail.unwrap_or_else(|| snippet(&bytes))),
            None => (None, snippet(&bytes)),
        };
        let err = TargetError::Status {
            target: self.name.clone(),
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            scim_type,
            detail,
        };
        if is_transient(status) {
            Err(Attempt::Transient(err, retry_after))
        } else {
            Err(Attempt::Final(err))
        }
    }
}

/// How an exchange on the I/O thread failed.
enum Failed {
    Network(reqwest::Error),
    TooLarge,
}

enum Attempt {
    Transient(TargetError, Option<Duration>),
    Final(TargetError),
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "request timed out".into()
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

/// The first bytes of a body, printable, for error messages (HTML error pages, truncation).
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".into();
    }
    let mut s: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target of concurrency 1 whose first request is held until released: what it was
    /// asked afterwards shows which waiting request got the freed slot first.
    #[tokio::test]
    async fn a_freed_slot_goes_to_the_oldest_batch_and_single_changes_first() {
        use axum::extract::{Path, State};
        #[derive(Default)]
        struct Seen {
            order: std::sync::Mutex<Vec<String>>,
            release: tokio::sync::Notify,
        }
        async fn delete(
            State(seen): State<Arc<Seen>>,
            Path(id): Path<String>,
        ) -> axum::http::StatusCode {
            if id == "hold" {
                seen.release.notified().await;
            } else {
                seen.order
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(id);
            }
            axum::http::StatusCode::NO_CONTENT
        }
        let seen = Arc::new(Seen::default());
        let app = axum::Router::new()
            .route("/scim/v2/Users/{id}", axum::routing::delete(delete))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut cfg = crate::config::TargetConfig::new(
            "ordered",
            &format!("http://{addr}/scim/v2"),
            Some("t".into()),
        );
        cfg.concurrency = 1;
        let client = Arc::new(TargetClient::new(&cfg).expect("client"));

        let hold = tokio::spawn({
            let c = client.clone();
            async move { c.delete(Kind::User, "hold").await }
        });
        let wait_queued = |n: usize| {
            let c = client.clone();
            async move {
                while c.in_flight.queued() < n || c.in_flight.available_permits() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let older = client.next_turn();
        let newer = client.next_turn();
        assert!(older > newer, "an older batch's turn comes first");
        // Queued in the order: the newer batch's request, the older batch's, a single change.
        let mut sent = Vec::new();
        for (i, (turn, id)) in [
            (Some(newer), "newer"),
            (Some(older), "older"),
            (None, "single"),
        ]
        .into_iter()
        .enumerate()
        {
            let c = client.clone();
            sent.push(tokio::spawn(async move {
                match turn {
                    Some(t) => in_turn(t, c.delete(Kind::User, id)).await,
                    None => c.delete(Kind::User, id).await,
                }
            }));
            wait_queued(i + 1).await;
        }
        seen.release.notify_one();
        hold.await.expect("join").expect("held request");
        for s in sent {
            s.await.expect("join").expect("request");
        }
        let order = seen.order.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(order, ["single", "older", "newer"]);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        let later = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(120);
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&later)
            .expect("format");
        let d = retry_after(&date).expect("an HTTP date");
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            retry_after("Mon, 01 Jan 2001 00:00:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
        assert!(
            is_transient(StatusCode::BAD_GATEWAY) && !is_transient(StatusCode::NOT_IMPLEMENTED)
        );
        assert!(!is_transient(StatusCode::HTTP_VERSION_NOT_SUPPORTED));
    }
}
