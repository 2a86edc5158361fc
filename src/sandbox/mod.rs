//! `scimsync sandbox`: a local, in-memory SCIM 2.0 service provider, faithful to RFC 7643/7644
//! where scimsync depends on it (uniqueness → 409, filters, pagination, PATCH with value
//! filters, referential integrity of members, bearer auth). It is also the test suite's server,
//! and it records every request so tests can assert exactly what was sent.

pub mod filter;
pub mod oauth;
pub mod patch;
pub mod profile;

pub use oauth::OAuthClient;
pub use profile::{Rules, SandboxProfile, UserDelete};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::scim::{
    BULK_RESPONSE_SCHEMA, ERROR_SCHEMA, GROUP_SCHEMA, LIST_RESPONSE_SCHEMA, PATCH_OP_SCHEMA,
    SPC_SCHEMA, USER_SCHEMA,
};

/// Where the token endpoint is served (outside the SCIM base path).
pub const TOKEN_PATH: &str = "/oauth2/token";
const MAX_PAGE: usize = 200;

#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// A static bearer token accepted on every resource request (discovery stays open).
    pub token: Option<String>,
    /// Whether PATCH is offered (and advertised in the ServiceProviderConfig).
    pub patch: bool,
    pub profile: SandboxProfile,
    /// Clients of the OAuth token endpoint; with any, resources need a valid token.
    pub oauth_clients: Vec<OAuthClient>,
    pub token_lifetime: Duration,
    pub faults: Faults,
    /// `/Bulk` offered with (maxOperations, maxPayloadSize); None: not offered.
    pub bulk: Option<(u32, u64)>,
    /// Listings without a filter return at most this many resources from their startIndex
    /// and report as totalResults what they returned (a target that caps and miscounts).
    pub list_cap: Option<usize>,
}

/// Faults injected into resource requests (discovery and tokens are spared), counted so tests
/// are repeatable: "every Nth request" rather than chance.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every Nth request answers 503 without doing anything (0: never).
    pub error_every: u64,
    /// Every Nth request answers 429 with Retry-After: 1 without doing anything.
    pub throttle_every: u64,
    /// Every Nth request is carried out, then its answer is cut off mid-body.
    pub drop_every: u64,
    /// Added to every answer.
    pub latency: Duration,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            token: None,
            patch: true,
            profile: SandboxProfile::Default,
            oauth_clients: Vec::new(),
            token_lifetime: Duration::from_secs(3600),
            faults: Faults::default(),
            bulk: None,
            list_cap: None,
        }
    }
}

impl SandboxOptions {
    pub fn with_token(token: &str) -> Self {
        Self {
            token: Some(token.to_string()),
            ..Default::default()
        }
    }
}

/// One request as the sandbox received it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path below the base, with the query string (e.g. `/Users?filter=...`).
    pub path: String,
    pub body: Option<Value>,
    pub status: u16,
}

impl RecordedRequest {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

#[derive(Default)]
struct Store {
    users: BTreeMap<String, Value>,
    groups: BTreeMap<String, Value>,
    requests: Vec<RecordedRequest>,
    version: u64,
    tokens: oauth::Tokens,
    /// When recent writes arrived, for the profile's write rate.
    writes: VecDeque<Instant>,
    /// Resource requests so far, for the counted faults.
    seen: u64,
    /// Answering 503 to everything (a target that is down).
    down: bool,
    /// After a 429 for a request: when the same request may come again.
    not_before: HashMap<String, Instant>,
    /// Requests that came again before their Retry-After had passed.
    early_retries: u64,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    opts: SandboxOptions,
    rules: Rules,
    base_url: String,
}

/// A running sandbox; dropping it stops the server.
pub struct SandboxHandle {
    pub addr: SocketAddr,
    /// The SCIM base URL, e.g. `http://127.0.0.1:4321/scim/v2`.
    pub url: String,
    /// The OAuth token endpoint, e.g. `http://127.0.0.1:4321/oauth2/token`.
    pub token_url: String,
    shared: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn lock(s: &Arc<Mutex<Store>>) -> MutexGuard<'_, Store> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone, Copy, PartialEq)]
enum Res {
    Users,
    Groups,
}

impl Res {
    fn parse(s: &str) -> Option<Res> {
        match s {
            "Users" => Some(Res::Users),
            "Groups" => Some(Res::Groups),
            _ => None,
        }
    }
    fn schema(self) -> &'static str {
        match self {
            Res::Users => USER_SCHEMA,
            Res::Groups => GROUP_SCHEMA,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Res::Users => "Users",
            Res::Groups => "Groups",
        }
    }
    fn type_name(self) -> &'static str {
        match self {
            Res::Users => "User",
            Res::Groups => "Group",
        }
    }
    fn unique_attr(self) -> &'static str {
        match self {
            Res::Users => "userName",
            Res::Groups => "displayName",
        }
    }
}

impl Store {
    fn map(&self, r: Res) -> &BTreeMap<String, Value> {
        match r {
            Res::Users => &self.users,
            Res::Groups => &self.groups,
        }
    }
    fn map_mut(&mut self, r: Res) -> &mut BTreeMap<String, Value> {
        match r {
            Res::Users => &mut self.users,
            Res::Groups => &mut self.groups,
        }
    }
}

/// Starts a sandbox on `listener`.
pub async fn serve(listener: TcpListener, opts: SandboxOptions) -> std::io::Result<SandboxHandle> {
    let addr = listener.local_addr()?;
    let rules = opts.profile.rules();
    let url = format!("http://{addr}{}", rules.base_path);
    let shared = Shared {
        store: Arc::new(Mutex::new(Store::default())),
        opts,
        rules,
        base_url: url.clone(),
    };
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "sandbox server stopped");
        }
    });
    Ok(SandboxHandle {
        addr,
        url,
        token_url: format!("http://{addr}{TOKEN_PATH}"),
        shared,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// Starts a sandbox on a free loopback port.
pub async fn start(opts: SandboxOptions) -> std::io::Result<SandboxHandle> {
    serve(TcpListener::bind("127.0.0.1:0").await?, opts).await
}

impl SandboxHandle {
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.store).requests.clone()
    }
    /// The mutating requests received so far.
    pub fn writes(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_write())
            .collect()
    }
    pub fn clear_requests(&self) {
        lock(&self.shared.store).requests.clear();
    }
    pub fn users(&self) -> Vec<Value> {
        lock(&self.shared.store).users.values().cloned().collect()
    }
    pub fn groups(&self) -> Vec<Value> {
        lock(&self.shared.store).groups.values().cloned().collect()
    }
    /// Stores a resource (`"Users"` or `"Groups"`) directly, as if created by someone else;
    /// returns its id.
    pub fn insert(&self, kind: &str, resource: Value) -> Result<String, String> {
        let r = Res::parse(kind).ok_or_else(|| format!("no resource type {kind:?}"))?;
        let mut st = lock(&self.shared.store);
        create_in(
            &mut st,
            &self.shared.rules,
            &self.shared.base_url,
            r,
            resource,
        )
        .map(|v| v["id"].as_str().unwrap_or_default().to_string())
        .map_err(|(_, _, d)| d)
    }
    /// Deletes a resource directly, as if removed by someone else.
    pub fn remove(&self, kind: &str, id: &str) -> bool {
        let mut st = lock(&self.shared.store);
        match Res::parse(kind) {
            Some(r) => delete_in(&mut st, r, id),
            None => false,
        }
    }
    /// Takes the service provider down (every resource request answers 503) or back up.
    pub fn set_down(&self, down: bool) {
        lock(&self.shared.store).down = down;
    }
    /// Requests repeated before the Retry-After of a 429 they got had passed.
    pub fn early_retries(&self) -> u64 {
        lock(&self.shared.store).early_retries
    }
    /// Invalidates every issued OAuth token, as a server restart or a revocation would.
    pub fn revoke_tokens(&self) {
        lock(&self.shared.store).tokens.revoke_all();
    }
    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

type Failure = (StatusCode, Option<&'static str>, String);

fn scim_response(status: StatusCode, body: Option<Value>) -> Response {
    match body {
        Some(b) => (
            status,
            [(header::CONTENT_TYPE, "application/scim+json")],
            b.to_string(),
        )
            .into_response(),
        None => status.into_response(),
    }
}

fn error_body(status: StatusCode, scim_type: Option<&str>, detail: &str) -> Value {
    let mut e = json!({
        "schemas": [ERROR_SCHEMA],
        "status": status.as_u16().to_string(),
        "detail": detail,
    });
    if let Some(t) = scim_type {
        e["scimType"] = Value::String(t.to_string());
    }
    e
}

async fn handle(
    State(sh): State<Shared>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rel = uri
        .path()
        .strip_prefix(sh.rules.base_path)
        .unwrap_or(uri.path())
        .to_string();
    let shown = match uri.query() {
        Some(q) => format!("{rel}?{q}"),
        None => rel.clone(),
    };
    if uri.path() == TOKEN_PATH && method == Method::POST {
        let (status, out) = {
            let mut st = lock(&sh.store);
            oauth::token(
                &sh.opts.oauth_clients,
                sh.opts.token_lifetime,
                &mut st.tokens,
                &headers,
                &body,
            )
        };
        lock(&sh.store).requests.push(RecordedRequest {
            method: method.to_string(),
            path: TOKEN_PATH.to_string(),
            body: None,
            status: status.as_u16(),
        });
        return (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            out.to_string(),
        )
            .into_response();
    }
    let parsed_body: Option<Result<Value, String>> = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&body).map_err(|e| e.to_string()))
    };
    let discovery = rel.trim_matches('/').split('/').count() == 1
        && !matches!(rel.trim_matches('/'), "Users" | "Groups");
    let key = request_key(
        &method,
        &shown,
        parsed_body.as_ref().and_then(|b| b.as_ref().ok()),
    );
    let fault = if discovery {
        Fault::None
    } else {
        next_fault(&sh, &key)
    };
    if !sh.opts.faults.latency.is_zero() {
        tokio::time::sleep(sh.opts.faults.latency).await;
    }
    let result = match fault {
        Fault::Unavailable => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "unavailable (injected)".to_string(),
        )),
        Fault::Throttle => Err((
            StatusCode::TOO_MANY_REQUESTS,
            None,
            "slow down (injected)".to_string(),
        )),
        Fault::None | Fault::Drop => route(
            &sh,
            &method,
            uri.path(),
            &rel,
            &query,
            &headers,
            parsed_body.clone(),
        ),
    };
    let (status, out) = match result {
        Ok((s, v)) => (s, v),
        Err((s, t, d)) => (s, Some(error_body(s, t, &d))),
    };
    {
        let mut st = lock(&sh.store);
        if status == StatusCode::TOO_MANY_REQUESTS {
            // The answer says Retry-After: 1; the same request must not come sooner.
            st.not_before
                .insert(key, Instant::now() + Duration::from_secs(1));
        }
        st.requests.push(RecordedRequest {
            method: method.to_string(),
            path: shown,
            body: parsed_body.and_then(Result::ok),
            status: status.as_u16(),
        });
    }
    if fault == Fault::Drop {
        // Done, but the answer is lost: the body breaks off and the connection with it.
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"{\"schemas\": [")),
            Err(std::io::Error::other("connection dropped (injected)")),
        ];
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/scim+json")],
            axum::body::Body::from_stream(futures::stream::iter(chunks)),
        )
            .into_response();
    }
    let mut resp = scim_response(status, out);
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    resp
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    Unavailable,
    Throttle,
    Drop,
}

/// Identifies "the same request again": method, path with query, and the object a body names.
fn request_key(method: &Method, rel: &str, body: Option<&Value>) -> String {
    let name = body
        .and_then(|b| b.get("userName").or_else(|| b.get("displayName")))
        .and_then(Value::as_str)
        .unwrap_or_default();
    format!("{method} {rel} {name}")
}

fn next_fault(sh: &Shared, key: &str) -> Fault {
    let f = &sh.opts.faults;
    let now = Instant::now();
    let mut st = lock(&sh.store);
    if st.not_before.get(key).is_some_and(|t| now < *t) {
        st.early_retries += 1;
    }
    if st.down {
        return Fault::Unavailable;
    }
    st.seen += 1;
    let n = st.seen;
    let hit = |every: u64| every > 0 && n.is_multiple_of(every);
    if hit(f.error_every) {
        Fault::Unavailable
    } else if hit(f.throttle_every) {
        Fault::Throttle
    } else if hit(f.drop_every) {
        Fault::Drop
    } else {
        Fault::None
    }
}

/// Whether the request may reach resources: a static token, or an unexpired issued one
/// carrying the profile's required scope.
fn authorize(sh: &Shared, st: &Store, headers: &HeaderMap) -> Result<(), Failure> {
    if sh.opts.token.is_none() && sh.opts.oauth_clients.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(given) = given else {
        return Err((
            StatusCode::UNAUTHORIZED,
            None,
            "a bearer token is required".into(),
        ));
    };
    if sh.opts.token.as_deref() == Some(given) {
        return Ok(());
    }
    let Some(issued) = st.tokens.get(given) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            None,
            "unknown or expired bearer token".into(),
        ));
    };
    match sh.rules.required_scope {
        Some(scope) if !issued.scopes.iter().any(|s| s == scope) => Err((
            StatusCode::FORBIDDEN,
            None,
            format!("the token lacks the {scope:?} scope"),
        )),
        _ => Ok(()),
    }
}

/// The profile's write rate: Some(failure) when this write is one too many this second.
fn rate_limited(sh: &Shared, st: &mut Store) -> Option<Failure> {
    let rate = sh.rules.write_rate?;
    let now = Instant::now();
    while st
        .writes
        .front()
        .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
    {
        st.writes.pop_front();
    }
    if st.writes.len() >= rate {
        return Some((
            StatusCode::TOO_MANY_REQUESTS,
            None,
            format!("at most {rate} writes a second"),
        ));
    }
    st.writes.push_back(now);
    None
}

fn route(
    sh: &Shared,
    method: &Method,
    full: &str,
    rel: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Option<Result<Value, String>>,
) -> Result<(StatusCode, Option<Value>), Failure> {
    if !full.starts_with(sh.rules.base_path) {
        return Err((
            StatusCode::NOT_FOUND,
            None,
            format!("no resource at {full}"),
        ));
    }
    let segs = segments(rel);
    match segs.as_slice() {
        [p] if *p == sh.rules.spc_path && method == Method::GET => {
            return Ok((StatusCode::OK, Some(spc(&sh.opts, &sh.rules))));
        }
        ["ResourceTypes"] if method == Method::GET => {
            return Ok((StatusCode::OK, Some(resource_types(sh.rules.groups))));
        }
        ["Schemas"] if method == Method::GET => {
            return Ok((StatusCode::OK, Some(schemas())));
        }
        _ => {}
    }
    let mut st = lock(&sh.store);
    authorize(sh, &st, headers)?;
    if *method != Method::GET
        && let Some(limited) = rate_limited(sh, &mut st)
    {
        return Err(limited);
    }
    if segs.as_slice() == ["Bulk"] && *method == Method::POST {
        return bulk(sh, &mut st, required_body(body.as_ref())?);
    }
    operation(sh, &mut st, method, rel, &segs, query, body)
}

/// A path's non-empty segments.
fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// The request's JSON body, where one is required.
fn required_body(body: Option<&Result<Value, String>>) -> Result<Value, Failure> {
    match body {
        Some(Ok(v)) => Ok(v.clone()),
        Some(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            format!("body is not JSON: {e}"),
        )),
        None => Err((
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            "a body is required".into(),
        )),
    }
}

/// One resource operation (a request of its own, or one of a bulk request).
fn operation(
    sh: &Shared,
    st: &mut Store,
    method: &Method,
    rel: &str,
    segs: &[&str],
    query: &HashMap<String, String>,
    body: Option<Result<Value, String>>,
) -> Result<(StatusCode, Option<Value>), Failure> {
    let body = || required_body(body.as_ref());
    let res = |s: &str| {
        match Res::parse(s) {
            Some(Res::Groups) if !sh.rules.groups => None,
            other => other,
        }
        .ok_or((
            StatusCode::NOT_FOUND,
            None,
            format!("no resource type {s:?}"),
        ))
    };
    let st = &mut *st;
    let rules = &sh.rules;
    match (method.clone(), segs) {
        (Method::GET, [r]) => {
            let r = res(r)?;
            list(st, r, query, sh.opts.list_cap)
                .map(|v| (StatusCode::OK, Some(for_reading(rules, r, v))))
        }
        (Method::POST, [r]) => create_in(st, rules, &sh.base_url, res(r)?, body()?)
            .map(|v| (StatusCode::CREATED, Some(v))),
        (Method::GET, [r, id]) => {
            let kind = res(r)?;
            st.map(kind)
                .get(*id)
                .cloned()
                .map(|v| (StatusCode::OK, Some(for_reading(rules, kind, v))))
                .ok_or_else(|| not_found(r, id))
        }
        (Method::PUT, [r, id]) => {
            let kind = res(r)?;
            let allowed = match kind {
                Res::Users => rules.put_users,
                Res::Groups => rules.put_groups,
            };
            if !allowed {
                return Err((
                    StatusCode::METHOD_NOT_ALLOWED,
                    None,
                    format!("PUT is not supported on {r}; use PATCH"),
                ));
            }
            replace_in(st, rules, kind, id, body()?).map(|v| (StatusCode::OK, Some(v)))
        }
        (Method::PATCH, [r, id]) => {
            if !sh.opts.patch {
                return Err((
                    StatusCode::NOT_IMPLEMENTED,
                    None,
                    "PATCH is not supported".into(),
                ));
            }
            patch_in(st, rules, res(r)?, id, body()?).map(|v| (StatusCode::OK, Some(v)))
        }
        (Method::DELETE, [r, id]) => {
            let kind = res(r)?;
            if kind == Res::Users && !st.users.contains_key(*id) {
                return Err(not_found(r, id));
            }
            match (kind, rules.user_delete) {
                (Res::Users, UserDelete::Refuse) => Err((
                    StatusCode::METHOD_NOT_ALLOWED,
                    None,
                    "users cannot be deleted; deactivate them (active=false)".into(),
                )),
                (Res::Users, UserDelete::Deactivate) => {
                    if let Some(u) = st.users.get_mut(*id) {
                        u["active"] = Value::Bool(false);
                    }
                    Ok((StatusCode::NO_CONTENT, None))
                }
                _ if delete_in(st, kind, id) => Ok((StatusCode::NO_CONTENT, None)),
                _ => Err(not_found(r, id)),
            }
        }
        _ => Err((
            StatusCode::NOT_FOUND,
            None,
            format!("no route for {method} {rel}"),
        )),
    }
}

/// `POST /Bulk` (RFC 7644 §3.7): each operation carried out in order, each answered on its
/// own; more operations or a bigger payload than advertised is refused whole (413).
fn bulk(
    sh: &Shared,
    st: &mut Store,
    request: Value,
) -> Result<(StatusCode, Option<Value>), Failure> {
    let Some((max_ops, max_payload)) = sh.opts.bulk else {
        return Err((
            StatusCode::NOT_IMPLEMENTED,
            None,
            "bulk is not supported".into(),
        ));
    };
    let size = request.to_string().len() as u64;
    if size > max_payload {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            format!("the bulk request is {size} bytes; maxPayloadSize is {max_payload}"),
        ));
    }
    let ops = request
        .get("Operations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ops.len() > max_ops as usize {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("tooMany"),
            format!("{} operations; maxOperations is {max_ops}", ops.len()),
        ));
    }
    let mut answers = Vec::with_capacity(ops.len());
    for op in ops {
        let method = op
            .get("method")
            .and_then(Value::as_str)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or(Method::GET);
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        let segs = segments(path);
        let result = if method == Method::GET || segs.first() == Some(&"Bulk") {
            Err((
                StatusCode::BAD_REQUEST,
                Some("invalidSyntax"),
                format!("{method} {path} is not a bulk operation"),
            ))
        } else {
            operation(
                sh,
                st,
                &method,
                path,
                &segs,
                &HashMap::new(),
                op.get("data").cloned().map(Ok),
            )
        };
        let mut answer = json!({"method": method.as_str()});
        if let Some(id) = op.get("bulkId") {
            answer["bulkId"] = id.clone();
        }
        match result {
            Ok((status, v)) => {
                answer["status"] = json!(status.as_u16().to_string());
                let id = v.as_ref().and_then(|v| v.get("id")).and_then(Value::as_str);
                let target = match (id, segs.first()) {
                    (Some(id), Some(r)) => Some(format!("{}/{r}/{id}", sh.base_url)),
                    (None, Some(_)) if segs.len() > 1 => Some(format!("{}{path}", sh.base_url)),
                    _ => None,
                };
                if let Some(l) = target {
                    answer["location"] = json!(l);
                }
            }
            Err((status, t, d)) => {
                answer["status"] = json!(status.as_u16().to_string());
                answer["response"] = error_body(status, t, &d);
            }
        }
        answers.push(answer);
    }
    Ok((
        StatusCode::OK,
        Some(json!({"schemas": [BULK_RESPONSE_SCHEMA], "Operations": answers})),
    ))
}

/// What a client reads back: without group members where the profile never returns them.
fn for_reading(rules: &Rules, r: Res, mut v: Value) -> Value {
    if r == Res::Groups && !rules.members_in_reads {
        let strip = |g: &mut Value| {
            if let Some(o) = g.as_object_mut() {
                o.remove("members");
            }
        };
        match v.get_mut("Resources").and_then(Value::as_array_mut) {
            Some(items) => items.iter_mut().for_each(strip),
            None => strip(&mut v),
        }
    }
    v
}

fn not_found(r: &str, id: &str) -> Failure {
    (StatusCode::NOT_FOUND, None, format!("{r} {id} not found"))
}

fn invalid(detail: String) -> Failure {
    (StatusCode::BAD_REQUEST, Some("invalidValue"), detail)
}

fn list(
    st: &Store,
    r: Res,
    q: &HashMap<String, String>,
    cap: Option<usize>,
) -> Result<Value, Failure> {
    let f = match q.get("filter") {
        Some(s) => Some(
            filter::parse(s).map_err(|e| (StatusCode::BAD_REQUEST, Some("invalidFilter"), e))?,
        ),
        None => None,
    };
    let num = |k: &str, d: usize| -> Result<usize, Failure> {
        match q.get(k) {
            None => Ok(d),
            Some(v) => v
                .parse::<i64>()
                .map(|n| n.max(0) as usize)
                .map_err(|_| invalid(format!("{k} must be an integer"))),
        }
    };
    let start = num("startIndex", 1)?.max(1);
    let mut count = num("count", 100)?.min(MAX_PAGE);
    let miscount = cap.filter(|_| f.is_none());
    if let Some(cap) = miscount {
        count = count.min(cap);
    }
    let hits: Vec<&Value> = st
        .map(r)
        .values()
        .filter(|v| f.as_ref().is_none_or(|f| filter::matches(f, v)))
        .collect();
    let page: Vec<Value> = hits
        .iter()
        .skip(start - 1)
        .take(count)
        .map(|v| (*v).clone())
        .collect();
    let total = if miscount.is_some() {
        page.len()
    } else {
        hits.len()
    };
    Ok(json!({
        "schemas": [LIST_RESPONSE_SCHEMA],
        "totalResults": total,
        "startIndex": start,
        "itemsPerPage": page.len(),
        "Resources": page,
    }))
}

fn now_rfc3339() -> String {
    crate::clock::rfc3339(crate::clock::now_ms())
}

/// Checks a full resource (after create, replace or patch) against the rules the sandbox keeps.
fn check(st: &Store, rules: &Rules, r: Res, id: &str, v: &Value) -> Result<(), Failure> {
    check_profile(rules, r, v)?;
    let obj = v.as_object().ok_or_else(|| {
        (
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            "resource must be an object".to_string(),
        )
    })?;
    let schemas_ok = obj
        .get("schemas")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().any(|x| x.as_str() == Some(r.schema())));
    if !schemas_ok {
        return Err((
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            format!("schemas must list {}", r.schema()),
        ));
    }
    let key = r.unique_attr();
    let val = match filter::get_ci(v, key) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            return Err(invalid(format!(
                "{key} is required and must be a non-empty string"
            )));
        }
    };
    let taken = st.map(r).iter().any(|(other, o)| {
        other != id
            && filter::get_ci(o, key)
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case(&val))
    });
    if taken {
        return Err((
            StatusCode::CONFLICT,
            Some("uniqueness"),
            format!("{key} {val:?} is already in use"),
        ));
    }
    if r == Res::Groups
        && let Some(members) = filter::get_ci(v, "members")
    {
        let items = members
            .as_array()
            .ok_or_else(|| invalid("members must be an array".into()))?;
        for m in items {
            let mv = m
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("every member needs a string value".into()))?;
            if !st.users.contains_key(mv) && !st.groups.contains_key(mv) {
                return Err(invalid(format!("member {mv:?} does not exist")));
            }
        }
    }
    Ok(())
}

/// The profile's own rules for a full resource.
fn check_profile(rules: &Rules, r: Res, v: &Value) -> Result<(), Failure> {
    if r == Res::Users && rules.require_names {
        let has = |p: Option<&Value>| p.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
        let name = v.get("name");
        if !has(name.and_then(|n| n.get("givenName")))
            || !has(name.and_then(|n| n.get("familyName")))
            || !has(v.get("displayName"))
        {
            return Err(invalid(
                "name.givenName, name.familyName and displayName are required".into(),
            ));
        }
    }
    if r == Res::Users && rules.single_valued {
        for (k, x) in v.as_object().into_iter().flatten() {
            if k != "schemas" && x.as_array().is_some_and(|a| a.len() > 1) {
                return Err(invalid(format!("{k}: only one value is supported")));
            }
        }
    }
    if r == Res::Groups
        && let Some(t) = rules.member_type
        && let Some(members) = v.get("members").and_then(Value::as_array)
        && members
            .iter()
            .any(|m| m.get("type").and_then(Value::as_str) != Some(t))
    {
        return Err(invalid(format!("every member needs \"type\": {t:?}")));
    }
    Ok(())
}

/// Member values one request carries: a body's members, or a PatchOp's member operations.
fn member_values_in(ops_or_body: &Value) -> usize {
    let count = |v: Option<&Value>| v.and_then(Value::as_array).map_or(0, Vec::len);
    match ops_or_body.get("Operations").and_then(Value::as_array) {
        Some(ops) => ops
            .iter()
            .filter(|op| {
                op.get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.to_ascii_lowercase().starts_with("members"))
            })
            .map(|op| count(op.get("value")).max(1))
            .sum(),
        None => count(ops_or_body.get("members")),
    }
}

fn check_member_limit(rules: &Rules, r: Res, request: &Value) -> Result<(), Failure> {
    if r == Res::Groups
        && let Some(max) = rules.max_member_values
    {
        let n = member_values_in(request);
        if n > max {
            return Err(invalid(format!(
                "at most {max} member values per request, got {n}"
            )));
        }
    }
    Ok(())
}

fn stamp(st: &mut Store, base: &str, r: Res, id: &str, v: &mut Value, created: Option<Value>) {
    st.version += 1;
    let now = now_rfc3339();
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), Value::String(id.to_string()));
        o.insert(
            "meta".into(),
            json!({
                "resourceType": r.type_name(),
                "created": created.unwrap_or_else(|| Value::String(now.clone())),
                "lastModified": now,
                "location": format!("{base}/{}/{id}", r.name()),
                "version": format!("W/\"{}\"", st.version),
            }),
        );
    }
}

fn create_in(
    st: &mut Store,
    rules: &Rules,
    base: &str,
    r: Res,
    mut v: Value,
) -> Result<Value, Failure> {
    check_member_limit(rules, r, &v)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    let id = uuid::Uuid::new_v4().to_string();
    check(st, rules, r, &id, &v)?;
    stamp(st, base, r, &id, &mut v, None);
    st.map_mut(r).insert(id, v.clone());
    Ok(v)
}

fn replace_in(
    st: &mut Store,
    rules: &Rules,
    r: Res,
    id: &str,
    mut v: Value,
) -> Result<Value, Failure> {
    check_member_limit(rules, r, &v)?;
    let Some(old) = st.map(r).get(id).cloned() else {
        return Err(not_found(r.name(), id));
    };
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    check(st, rules, r, id, &v)?;
    let base = old["meta"]["location"]
        .as_str()
        .and_then(|l| {
            l.rsplit_once(&format!("/{}/", r.name()))
                .map(|(b, _)| b.to_string())
        })
        .unwrap_or_default();
    stamp(
        st,
        &base,
        r,
        id,
        &mut v,
        old["meta"].get("created").cloned(),
    );
    st.map_mut(r).insert(id.to_string(), v.clone());
    Ok(v)
}

fn patch_in(
    st: &mut Store,
    rules: &Rules,
    r: Res,
    id: &str,
    body: Value,
) -> Result<Value, Failure> {
    let Some(mut v) = st.map(r).get(id).cloned() else {
        return Err(not_found(r.name(), id));
    };
    let schemas_ok = body
        .get("schemas")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().any(|x| x.as_str() == Some(PATCH_OP_SCHEMA)));
    if !schemas_ok {
        return Err((
            StatusCode::BAD_REQUEST,
            Some("invalidSyntax"),
            format!("schemas must list {PATCH_OP_SCHEMA}"),
        ));
    }
    let ops = body.get("Operations").and_then(Value::as_array).ok_or((
        StatusCode::BAD_REQUEST,
        Some("invalidSyntax"),
        "Operations must be an array".to_string(),
    ))?;
    check_member_limit(rules, r, &body)?;
    if r == Res::Groups && rules.no_member_replace {
        let replaces_members = ops.iter().any(|op| {
            op.get("op")
                .and_then(Value::as_str)
                .is_some_and(|o| o.eq_ignore_ascii_case("replace"))
                && match op.get("path").and_then(Value::as_str) {
                    Some(p) => p.to_ascii_lowercase().starts_with("members"),
                    None => op.get("value").and_then(|v| v.get("members")).is_some(),
                }
        });
        if replaces_members {
            return Err(invalid(
                "members can only be changed by add and remove".into(),
            ));
        }
    }
    let meta = v.get("meta").cloned();
    for op in ops {
        patch::apply(&mut v, op).map_err(|(t, d)| (StatusCode::BAD_REQUEST, Some(t), d))?;
    }
    check(st, rules, r, id, &v)?;
    let base = meta
        .as_ref()
        .and_then(|m| m["location"].as_str())
        .and_then(|l| {
            l.rsplit_once(&format!("/{}/", r.name()))
                .map(|(b, _)| b.to_string())
        })
        .unwrap_or_default();
    let created = meta.and_then(|m| m.get("created").cloned());
    stamp(st, &base, r, id, &mut v, created);
    st.map_mut(r).insert(id.to_string(), v.clone());
    Ok(v)
}

/// Deletes a resource; a deleted user or group also leaves every group (referential integrity).
fn delete_in(st: &mut Store, r: Res, id: &str) -> bool {
    if st.map_mut(r).remove(id).is_none() {
        return false;
    }
    for g in st.groups.values_mut() {
        if let Some(Value::Array(members)) = g.get_mut("members") {
            members.retain(|m| m.get("value").and_then(Value::as_str) != Some(id));
        }
    }
    true
}

fn spc(opts: &SandboxOptions, rules: &Rules) -> Value {
    json!({
        "schemas": [SPC_SCHEMA],
        "documentationUri": "https://datatracker.ietf.org/doc/html/rfc7644",
        "patch": {"supported": opts.patch},
        "bulk": match opts.bulk {
            Some((ops, size)) => json!({"supported": true, "maxOperations": ops, "maxPayloadSize": size}),
            None => json!({"supported": false, "maxOperations": 0, "maxPayloadSize": 0}),
        },
        "filter": {"supported": rules.advertise_filter, "maxResults": MAX_PAGE},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": false},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "Authentication with a bearer token",
            "primary": true
        }],
        "meta": {"resourceType": "ServiceProviderConfig"}
    })
}

fn resource_types(groups: bool) -> Value {
    let rt = |name: &str, ep: &str, schema: &str| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": name, "name": name, "endpoint": ep, "schema": schema,
            "meta": {"resourceType": "ResourceType"}
        })
    };
    let mut items = vec![rt("User", "/Users", USER_SCHEMA)];
    if groups {
        items.push(rt("Group", "/Groups", GROUP_SCHEMA));
    }
    json!({"schemas": [LIST_RESPONSE_SCHEMA], "totalResults": items.len(), "Resources": items})
}

fn schemas() -> Value {
    let s = |id: &str, name: &str, attrs: &[(&str, &str, bool)]| {
        let attributes: Vec<Value> = attrs
            .iter()
            .map(|(n, t, multi)| json!({"name": n, "type": t, "multiValued": multi}))
            .collect();
        json!({"id": id, "name": name, "attributes": attributes, "meta": {"resourceType": "Schema"}})
    };
    let items = vec![
        s(
            USER_SCHEMA,
            "User",
            &[
                ("userName", "string", false),
                ("name", "complex", false),
                ("displayName", "string", false),
                ("active", "boolean", false),
                ("emails", "complex", true),
                ("phoneNumbers", "complex", true),
                ("locale", "string", false),
                ("externalId", "string", false),
            ],
        ),
        s(
            GROUP_SCHEMA,
            "Group",
            &[
                ("displayName", "string", false),
                ("members", "complex", true),
                ("externalId", "string", false),
            ],
        ),
    ];
    let mut m = Map::new();
    m.insert("schemas".into(), json!([LIST_RESPONSE_SCHEMA]));
    m.insert("totalResults".into(), json!(items.len()));
    m.insert("Resources".into(), Value::Array(items));
    Value::Object(m)
}
