//! `scimsync sandbox`: a local, in-memory SCIM 2.0 service provider, faithful to RFC 7643/7644
//! where scimsync depends on it (uniqueness → 409, filters, pagination, PATCH with value
//! filters, referential integrity of members, bearer auth). It is also the test suite's server,
//! and it records every request so tests can assert exactly what was sent.

pub mod filter;
pub mod patch;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::scim::{
    ERROR_SCHEMA, GROUP_SCHEMA, LIST_RESPONSE_SCHEMA, PATCH_OP_SCHEMA, SPC_SCHEMA, USER_SCHEMA,
};

/// The path the sandbox serves SCIM under.
pub const BASE_PATH: &str = "/scim/v2";
const MAX_PAGE: usize = 200;

#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Bearer token required on every resource request (discovery endpoints stay open).
    pub token: Option<String>,
    /// Whether PATCH is offered (and advertised in the ServiceProviderConfig).
    pub patch: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            token: None,
            patch: true,
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
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    opts: SandboxOptions,
    base_url: String,
}

/// A running sandbox; dropping it stops the server.
pub struct SandboxHandle {
    pub addr: SocketAddr,
    /// The SCIM base URL, e.g. `http://127.0.0.1:4321/scim/v2`.
    pub url: String,
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
    let url = format!("http://{addr}{BASE_PATH}");
    let shared = Shared {
        store: Arc::new(Mutex::new(Store::default())),
        opts,
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
        create_in(&mut st, &self.shared.base_url, r, resource)
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
        .strip_prefix(BASE_PATH)
        .unwrap_or(uri.path())
        .to_string();
    let shown = match uri.query() {
        Some(q) => format!("{rel}?{q}"),
        None => rel.clone(),
    };
    let parsed_body: Option<Result<Value, String>> = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&body).map_err(|e| e.to_string()))
    };
    let result = route(
        &sh,
        &method,
        uri.path(),
        &rel,
        &query,
        &headers,
        parsed_body.clone(),
    );
    let (status, out) = match result {
        Ok((s, v)) => (s, v),
        Err((s, t, d)) => (s, Some(error_body(s, t, &d))),
    };
    lock(&sh.store).requests.push(RecordedRequest {
        method: method.to_string(),
        path: shown,
        body: parsed_body.and_then(Result::ok),
        status: status.as_u16(),
    });
    scim_response(status, out)
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
    if !full.starts_with(BASE_PATH) {
        return Err((
            StatusCode::NOT_FOUND,
            None,
            format!("no resource at {full}"),
        ));
    }
    let segs: Vec<&str> = rel
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segs.as_slice() {
        ["ServiceProviderConfig"] if method == Method::GET => {
            return Ok((StatusCode::OK, Some(spc(&sh.opts))));
        }
        ["ResourceTypes"] if method == Method::GET => {
            return Ok((StatusCode::OK, Some(resource_types())));
        }
        ["Schemas"] if method == Method::GET => {
            return Ok((StatusCode::OK, Some(schemas())));
        }
        _ => {}
    }
    if let Some(tok) = &sh.opts.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(tok.as_str()) {
            return Err((
                StatusCode::UNAUTHORIZED,
                None,
                "missing or wrong bearer token".into(),
            ));
        }
    }
    let body = || -> Result<Value, Failure> {
        match &body {
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
    };
    let res = |s: &str| {
        Res::parse(s).ok_or((
            StatusCode::NOT_FOUND,
            None,
            format!("no resource type {s:?}"),
        ))
    };
    let mut st = lock(&sh.store);
    match (method.clone(), segs.as_slice()) {
        (Method::GET, [r]) => list(&st, res(r)?, query).map(|v| (StatusCode::OK, Some(v))),
        (Method::POST, [r]) => create_in(&mut st, &sh.base_url, res(r)?, body()?)
            .map(|v| (StatusCode::CREATED, Some(v))),
        (Method::GET, [r, id]) => st
            .map(res(r)?)
            .get(*id)
            .cloned()
            .map(|v| (StatusCode::OK, Some(v)))
            .ok_or_else(|| not_found(r, id)),
        (Method::PUT, [r, id]) => {
            replace_in(&mut st, res(r)?, id, body()?).map(|v| (StatusCode::OK, Some(v)))
        }
        (Method::PATCH, [r, id]) => {
            if !sh.opts.patch {
                return Err((
                    StatusCode::NOT_IMPLEMENTED,
                    None,
                    "PATCH is not supported".into(),
                ));
            }
            patch_in(&mut st, res(r)?, id, body()?).map(|v| (StatusCode::OK, Some(v)))
        }
        (Method::DELETE, [r, id]) => {
            if delete_in(&mut st, res(r)?, id) {
                Ok((StatusCode::NO_CONTENT, None))
            } else {
                Err(not_found(r, id))
            }
        }
        _ => Err((
            StatusCode::NOT_FOUND,
            None,
            format!("no route for {method} {rel}"),
        )),
    }
}

fn not_found(r: &str, id: &str) -> Failure {
    (StatusCode::NOT_FOUND, None, format!("{r} {id} not found"))
}

fn invalid(detail: String) -> Failure {
    (StatusCode::BAD_REQUEST, Some("invalidValue"), detail)
}

fn list(st: &Store, r: Res, q: &HashMap<String, String>) -> Result<Value, Failure> {
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
    let count = num("count", 100)?.min(MAX_PAGE);
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
    Ok(json!({
        "schemas": [LIST_RESPONSE_SCHEMA],
        "totalResults": hits.len(),
        "startIndex": start,
        "itemsPerPage": page.len(),
        "Resources": page,
    }))
}

fn now_rfc3339() -> String {
    crate::clock::rfc3339(crate::clock::now_ms())
}

/// Checks a full resource (after create, replace or patch) against the rules the sandbox keeps.
fn check(st: &Store, r: Res, id: &str, v: &Value) -> Result<(), Failure> {
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

fn create_in(st: &mut Store, base: &str, r: Res, mut v: Value) -> Result<Value, Failure> {
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    let id = uuid::Uuid::new_v4().to_string();
    check(st, r, &id, &v)?;
    stamp(st, base, r, &id, &mut v, None);
    st.map_mut(r).insert(id, v.clone());
    Ok(v)
}

fn replace_in(st: &mut Store, r: Res, id: &str, mut v: Value) -> Result<Value, Failure> {
    let Some(old) = st.map(r).get(id).cloned() else {
        return Err(not_found(r.name(), id));
    };
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    check(st, r, id, &v)?;
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

fn patch_in(st: &mut Store, r: Res, id: &str, body: Value) -> Result<Value, Failure> {
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
    let meta = v.get("meta").cloned();
    for op in ops {
        patch::apply(&mut v, op).map_err(|(t, d)| (StatusCode::BAD_REQUEST, Some(t), d))?;
    }
    check(st, r, id, &v)?;
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

fn spc(opts: &SandboxOptions) -> Value {
    json!({
        "schemas": [SPC_SCHEMA],
        "documentationUri": "https://datatracker.ietf.org/doc/html/rfc7644",
        "patch": {"supported": opts.patch},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": MAX_PAGE},
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

fn resource_types() -> Value {
    let rt = |name: &str, ep: &str, schema: &str| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": name, "name": name, "endpoint": ep, "schema": schema,
            "meta": {"resourceType": "ResourceType"}
        })
    };
    let items = vec![
        rt("User", "/Users", USER_SCHEMA),
        rt("Group", "/Groups", GROUP_SCHEMA),
    ];
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
