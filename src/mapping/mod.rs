//! Property mappings: ordered rhai scripts that turn a directory object into a SCIM resource.
//!
//! Each script sees `user` or `group` (a group also has `members`), `target` and `scim` (the
//! document built so far) and returns a map deep-merged into `scim`, `()` to add nothing, or calls
//! `skip("why")`. Scripts run sandboxed: no modules, no `eval`, bounded operations and sizes.

mod helpers;

pub use helpers::{format_date, sha256, split_name};

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rhai::{AST, Dynamic, Engine, EvalAltResult, Position, Scope};
use serde_json::{Map, Value};

use crate::directory::{Group, Kind, User};

/// Shipped default scripts, embedded so `demo` and fresh installs work from anywhere.
pub const DEFAULT_USER_SCRIPT: (&str, &str) = (
    "10-core.rhai",
    include_str!("../../mappings/user/10-core.rhai"),
);
pub const DEFAULT_GROUP_SCRIPT: (&str, &str) = (
    "10-core.rhai",
    include_str!("../../mappings/group/10-core.rhai"),
);

/// Writes the shipped default scripts into `dir/mappings` (`user/` and `group/`) and returns
/// that folder: the demo's mappings, and the bench's and the tests'.
pub fn write_defaults(dir: &Path) -> std::io::Result<PathBuf> {
    let mappings = dir.join("mappings");
    for (kind, (name, text)) in [
        ("user", DEFAULT_USER_SCRIPT),
        ("group", DEFAULT_GROUP_SCRIPT),
    ] {
        std::fs::create_dir_all(mappings.join(kind))?;
        std::fs::write(mappings.join(kind).join(name), text)?;
    }
    Ok(mappings)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MappingError {
    #[error("cannot read mappings: {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{script}:{line}:{column}: {message}")]
    Script {
        script: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// What the mappings made of one object.
#[derive(Debug, Clone, PartialEq)]
pub enum MapOutcome {
    Resource(Value),
    Skip { script: String, reason: String },
}

struct Script {
    name: String,
    ast: AST,
}

/// The compiled scripts of one mappings directory.
#[derive(Clone)]
pub struct Mappings {
    engine: Arc<Engine>,
    limits: Limits,
    user: Arc<Vec<Script>>,
    group: Arc<Vec<Script>>,
}

/// The value `skip()` raises; recognised when it comes back out of the engine.
#[derive(Debug, Clone)]
struct SkipSignal(String);

type Sources = Vec<(String, String)>;

/// The (name, text) of every script under `dir`, users then groups, each in file-name order.
fn read_sources(dir: &Path) -> Result<(Sources, Sources), MappingError> {
    if !dir.is_dir() {
        return Err(MappingError::Load {
            path: dir.to_path_buf(),
            message: "not a directory".into(),
        });
    }
    let load_err = |path: &Path, e: std::io::Error| MappingError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut out = Vec::new();
    for kind in ["user", "group"] {
        let sub = dir.join(kind);
        let mut files = Vec::new();
        if sub.is_dir() {
            for entry in std::fs::read_dir(&sub).map_err(|e| load_err(&sub, e))? {
                let path = entry.map_err(|e| load_err(&sub, e))?.path();
                if path.extension().is_some_and(|e| e == "rhai") {
                    files.push(path);
                }
            }
        }
        files.sort();
        let mut scripts = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|e| load_err(&path, e))?;
            scripts.push((path.display().to_string(), text));
        }
        out.push(scripts);
    }
    let group = out.pop().unwrap_or_default();
    let user = out.pop().unwrap_or_default();
    Ok((user, group))
}

fn fingerprint(user: &Sources, group: &Sources) -> String {
    let mut all = String::new();
    for (name, text) in user.iter().chain(group) {
        all.push_str(name);
        all.push('\0');
        all.push_str(text);
        all.push('\0');
    }
    sha256(&all)
}

/// The mappings of one target as they are on disk now: an edited script is picked up without a
/// restart, and one that no longer compiles leaves the last good version in use.
pub struct LiveMappings {
    dir: Option<PathBuf>,
    current: RwLock<(Arc<Mappings>, String)>,
    /// The fingerprint of the last broken edit, so its error is reported once.
    broken: Mutex<Option<String>>,
    /// When the folder was last looked at (see `refresh_due`).
    looked: Mutex<Option<Instant>>,
}

/// How often batches and change events look at the mappings folder. A look costs a few
/// system calls per script and a hash of every script (tens of microseconds): before each
/// batch it was 2% of the engine's thread in a first sync (`perf`), and before each change
/// event it would be more.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

impl LiveMappings {
    pub fn load(dir: &Path) -> Result<LiveMappings, MappingError> {
        let (user, group) = read_sources(dir)?;
        let m = Mappings::from_sources(&user, &group)?;
        Ok(LiveMappings {
            dir: Some(dir.to_path_buf()),
            current: RwLock::new((Arc::new(m), fingerprint(&user, &group))),
            broken: Mutex::new(None),
            looked: Mutex::new(Some(Instant::now())),
        })
    }

    /// Mappings that never change (no folder behind them).
    pub fn fixed(m: Mappings) -> LiveMappings {
        LiveMappings {
            dir: None,
            current: RwLock::new((Arc::new(m), String::new())),
            broken: Mutex::new(None),
            looked: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<Mappings> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// A hash of every script's name and text: changes whenever a script does.
    pub fn version(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Whether `version` is the scripts' version in use (without copying it).
    pub fn is_version(&self, version: &str) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1 == version
    }

    /// `refresh`, when the folder was last looked at `LOOK_EVERY` ago or more: for each batch
    /// and each change event. Ok(false) without looking otherwise.
    pub fn refresh_due(&self) -> Result<bool, MappingError> {
        let recent = self
            .looked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < LOOK_EVERY);
        if recent { Ok(false) } else { self.refresh() }
    }

    /// Re-reads the folder. Ok(true) when changed scripts were compiled and are now in use;
    /// an error (reported once per broken edit) when they do not compile: the last good version
    /// stays in use.
    pub fn refresh(&self) -> Result<bool, MappingError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        *self.looked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let (user, group) = read_sources(dir)?;
        let fp = fingerprint(&user, &group);
        if fp == self.version() {
            return Ok(false);
        }
        match Mappings::from_sources(&user, &group) {
            Ok(m) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(m), fp);
                *self.broken.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(true)
            }
            Err(e) => {
                let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
                if broken.as_deref() == Some(fp.as_str()) {
                    return Ok(false);
                }
                *broken = Some(fp);
                Err(e)
            }
        }
    }
}

/// What a script knows of the target it maps for.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    pub name: String,
    pub compatibility: String,
}

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

/// What one object's mapping may use: operations per script, and wall time for all its
/// scripts together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_operations: u64,
    pub wall_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: 200_000,
            wall_time: Duration::from_secs(1),
        }
    }
}

thread_local! {
    /// When the object being mapped on this thread must be done; read by `on_progress`.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Marks a script stopped for running past its wall time.
const TIMED_OUT: &str = "scimsync:wall-time";

fn sandboxed_engine(limits: Limits) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(limits.max_operations);
    engine.on_progress(|ops| {
        // Reading the clock every operation would cost more than the scripts themselves.
        if ops.is_multiple_of(512) && DEADLINE.get().is_some_and(|d| Instant::now() > d) {
            return Some(TIMED_OUT.into());
        }
        None
    });
    engine.set_max_call_levels(32);
    engine.set_max_strings_interned(0);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(64 * 1024);
    engine.set_max_array_size(10_000);
    engine.set_max_map_size(10_000);
    engine.disable_symbol("eval");
    engine.on_print(|s| tracing::info!(target: "scimsync::mapping", "{s}"));
    engine.on_debug(|s, src, pos| {
        tracing::debug!(target: "scimsync::mapping", script = src.unwrap_or(""), %pos, "{s}")
    });
    engine.register_fn(
        "skip",
        |reason: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            Err(Box::new(EvalAltResult::ErrorRuntime(
                Dynamic::from(SkipSignal(reason.to_string())),
                Position::NONE,
            )))
        },
    );
    helpers::register(&mut engine);
    engine
}

impl Mappings {
    /// Loads `dir/user/*.rhai` and `dir/group/*.rhai`, each list in file-name order.
    pub fn load(dir: &Path) -> Result<Mappings, MappingError> {
        let (user, group) = read_sources(dir)?;
        Self::from_sources(&user, &group)
    }

    /// The shipped default scripts.
    pub fn defaults() -> Result<Mappings, MappingError> {
        let (un, us) = DEFAULT_USER_SCRIPT;
        let (gn, gs) = DEFAULT_GROUP_SCRIPT;
        Self::from_sources(
            &[(format!("user/{un}"), us.to_string())],
            &[(format!("group/{gn}"), gs.to_string())],
        )
    }

    /// Compiles named sources (already in run order).
    pub fn from_sources(
        user: &[(String, String)],
        group: &[(String, String)],
    ) -> Result<Mappings, MappingError> {
        Self::with_limits(user, group, Limits::default())
    }

    pub fn with_limits(
        user: &[(String, String)],
        group: &[(String, String)],
        limits: Limits,
    ) -> Result<Mappings, MappingError> {
        let engine = sandboxed_engine(limits);
        let compile = |list: &[(String, String)]| -> Result<Vec<Script>, MappingError> {
            list.iter()
                .map(|(name, text)| {
                    let mut ast = engine.compile(text).map_err(|e| {
                        let (line, column) = position(e.1);
                        MappingError::Script {
                            script: name.clone(),
                            line,
                            column,
                            message: e.0.to_string(),
                        }
                    })?;
                    ast.set_source(name.as_str());
                    Ok(Script {
                        name: name.clone(),
                        ast,
                    })
                })
                .collect()
        };
        let user = compile(user)?;
        let group = compile(group)?;
        Ok(Mappings {
            engine: Arc::new(engine),
            limits,
            user: Arc::new(user),
            group: Arc::new(group),
        })
    }

    pub fn script_names(&self, kind: Kind) -> Vec<String> {
        let list = match kind {
            Kind::User => &self.user,
            Kind::Group => &self.group,
        };
        list.iter().map(|s| s.name.clone()).collect()
    }

    pub fn map_user(&self, user: &User, target: &TargetInfo) -> Result<MapOutcome, MappingError> {
        self.map_value(Kind::User, user, target, None)
    }

    /// Maps a directory object (anything that serializes, such as a `User` or JSON); with `trace`, also records what each script
    /// contributed, in order (`null` for a script that returned `()`).
    pub fn map_value(
        &self,
        kind: Kind,
        object: &impl serde::Serialize,
        target: &TargetInfo,
        trace: Option<&mut Vec<(String, Value)>>,
    ) -> Result<MapOutcome, MappingError> {
        // Straight into the scripts' own values: no JSON tree in between.
        let object = rhai::serde::to_dynamic(object).unwrap_or(Dynamic::UNIT);
        match kind {
            Kind::User => self.run(&self.user, "user", object, USER_SCHEMA, target, trace),
            Kind::Group => self.run(&self.group, "group", object, GROUP_SCHEMA, target, trace),
        }
    }

    /// Maps a group; `members` are the directory user ids, visible to scripts as `members`.
    pub fn map_group(
        &self,
        group: &Group,
        target: &TargetInfo,
    ) -> Result<MapOutcome, MappingError> {
        self.map_value(Kind::Group, group, target, None)
    }

    fn run(
        &self,
        scripts: &[Script],
        var: &str,
        mut object: Dynamic,
        schema: &str,
        target: &TargetInfo,
        mut trace: Option<&mut Vec<(String, Value)>>,
    ) -> Result<MapOutcome, MappingError> {
        let mut doc = Map::new();
        doc.insert("schemas".into(), Value::from(vec![schema.to_string()]));
        let mut doc = Value::Object(doc);
        let to_dyn = |v: &Value| rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT);
        let members = object
            .read_lock::<rhai::Map>()
            .and_then(|m| m.get("members").cloned());
        struct ClearDeadline;
        impl Drop for ClearDeadline {
            fn drop(&mut self) {
                DEADLINE.set(None);
            }
        }
        DEADLINE.set(Some(Instant::now() + self.limits.wall_time));
        let _clear = ClearDeadline;
        let mut tgt = rhai::Map::new();
        tgt.insert("name".into(), target.name.clone().into());
        tgt.insert("compatibility".into(), target.compatibility.clone().into());
        let tgt: Dynamic = tgt.into();
        let last = scripts.len().saturating_sub(1);
        for (i, script) in scripts.iter().enumerate() {
            let mut scope = Scope::new();
            // The last script takes the object itself: a map's clone is a deep copy.
            let this = if i == last {
                std::mem::take(&mut object)
            } else {
                object.clone()
            };
            scope.push_constant(var, this);
            if let Some(m) = &members {
                scope.push_constant("members", m.clone());
            }
            scope.push_constant("target", tgt.clone());
            scope.push_constant("scim", to_dyn(&doc));
            let out = self
                .engine
                .eval_ast_with_scope::<Dynamic>(&mut scope, &script.ast);
            let out = match out {
                Ok(v) => v,
                Err(err) => {
                    if let Some(reason) = skip_reason(&err) {
                        return Ok(MapOutcome::Skip {
                            script: script.name.clone(),
                            reason,
                        });
                    }
                    let (line, column) = position(err.position());
                    return Err(MappingError::Script {
                        script: script.name.clone(),
                        line,
                        column,
                        message: root_message(&err, self.limits.wall_time),
                    });
                }
            };
            if out.is_unit() {
                if let Some(t) = trace.as_mut() {
                    t.push((script.name.clone(), Value::Null));
                }
                continue;
            }
            if !out.is_map() {
                return Err(MappingError::Script {
                    script: script.name.clone(),
                    line: 0,
                    column: 0,
                    message: format!(
                        "a mapping must return a map or (), not a value of type {}",
                        out.type_name()
                    ),
                });
            }
            let value = to_json(&out).map_err(|e| MappingError::Script {
                script: script.name.clone(),
                line: 0,
                column: 0,
                message: format!("result cannot be turned into JSON: {e}"),
            })?;
            if let Some(t) = trace.as_mut() {
                t.push((script.name.clone(), value.clone()));
            }
            deep_merge(&mut doc, value);
        }
        crate::scim::schema::list_extensions(&mut doc);
        Ok(MapOutcome::Resource(doc))
    }
}

/// A script's result as JSON: what `rhai::serde::from_dynamic` makes of it, without serde's
/// generic visitors (17% fewer instructions for a default user, callgrind). Values JSON has
/// no plain form for (shared, blobs, function pointers, timestamps, custom types) still go
/// through rhai's conversion: the same JSON, or the same error.
fn to_json(v: &Dynamic) -> Result<Value, Box<EvalAltResult>> {
    // Cheapest checks first, most frequent kinds first: a failed `as_…` names the type.
    if v.is_shared() {
        return rhai::serde::from_dynamic(v);
    }
    if v.is_string() {
        if let Ok(text) = v.as_immutable_string_ref() {
            return Ok(Value::String(text.as_str().to_owned()));
        }
    } else if v.is_map() {
        if let Ok(map) = v.as_map_ref() {
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map.iter() {
                out.insert(k.as_str().to_owned(), to_json(v)?);
            }
            return Ok(Value::Object(out));
        }
    } else if v.is_array() {
        if let Ok(items) = v.as_array_ref() {
            let mut out = Vec::with_capacity(items.len());
            for item in items.iter() {
                out.push(to_json(item)?);
            }
            return Ok(Value::Array(out));
        }
    } else if v.is_bool() {
        if let Ok(b) = v.as_bool() {
            return Ok(Value::Bool(b));
        }
    } else if v.is_int() {
        if let Ok(i) = v.as_int() {
            return Ok(Value::from(i));
        }
    } else if v.is_unit() {
        return Ok(Value::Null);
    } else if v.is_float() {
        if let Ok(f) = v.as_float() {
            // serde_json's own rule: a float JSON cannot write (NaN, infinities) is null.
            return Ok(serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number));
        }
    } else if let Ok(c) = v.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    rhai::serde::from_dynamic(v)
}

fn position(p: Position) -> (usize, usize) {
    (p.line().unwrap_or(0), p.position().unwrap_or(0))
}

/// Errors raised inside script functions arrive wrapped; the innermost one says what happened.
fn innermost(err: &EvalAltResult) -> &EvalAltResult {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => innermost(inner),
        other => other,
    }
}

fn skip_reason(err: &EvalAltResult) -> Option<String> {
    match innermost(err) {
        EvalAltResult::ErrorRuntime(v, _) => v.read_lock::<SkipSignal>().map(|s| s.0.clone()),
        _ => None,
    }
}

fn root_message(err: &EvalAltResult, wall_time: Duration) -> String {
    let inner = innermost(err);
    if let EvalAltResult::ErrorTerminated(token, _) = inner
        && token
            .read_lock::<rhai::ImmutableString>()
            .is_some_and(|t| t.as_str() == TIMED_OUT)
    {
        return format!(
            "stopped: the mapping of this object ran longer than {} ms",
            wall_time.as_millis()
        );
    }
    let mut msg = inner.to_string();
    // rhai appends " (line L, position C)"; the error already carries the position.
    if let Some(i) = msg.rfind(" (line ") {
        msg.truncate(i);
    }
    msg
}

/// Merges `src` into `dst`: maps key by key, arrays and scalars replaced, `null` (a script's
/// `()`) removes the key.
pub fn deep_merge(dst: &mut Value, src: Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, v) in s {
                if v.is_null() {
                    d.remove(&k);
                    continue;
                }
                // One look-up a key: an existing key keeps its place either way.
                match d.entry(k) {
                    serde_json::map::Entry::Occupied(mut e) => {
                        if e.get().is_object() && v.is_object() {
                            deep_merge(e.get_mut(), v)
                        } else {
                            e.insert(v);
                        }
                    }
                    serde_json::map::Entry::Vacant(e) => {
                        e.insert(v);
                    }
                }
            }
        }
        (d, s) => *d = s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target() -> TargetInfo {
        TargetInfo {
            name: "t".into(),
            compatibility: "default".into(),
        }
    }

    fn alice() -> User {
        serde_json::from_value(json!({
            "id": "u-1", "username": "alice", "email": "alice@example.com",
            "name": "Alice Smith", "given_name": "Alice", "family_name": "Smith",
            "attributes": {"locale": "en-US", "phone": "+1 555 0100"}
        }))
        .expect("user")
    }

    fn user_scripts(list: &[(&str, &str)]) -> Mappings {
        let list: Vec<(String, String)> = list
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        Mappings::from_sources(&list, &[]).expect("compiles")
    }

    #[test]
    fn defaults_produce_the_documented_attributes() {
        let m = Mappings::defaults().expect("defaults compile");
        let MapOutcome::Resource(doc) = m.map_user(&alice(), &target()).expect("maps") else {
            panic!("skipped")
        };
        assert_eq!(
            doc,
            json!({
                "schemas": [USER_SCHEMA],
                "userName": "alice",
                "externalId": "u-1",
                "active": true,
                "displayName": "Alice Smith",
                "name": {"formatted": "Alice Smith", "givenName": "Alice", "familyName": "Smith"},
                "emails": [{"value": "alice@example.com", "type": "work", "primary": true}],
                "locale": "en-US",
                "phoneNumbers": [{"value": "+1 555 0100", "type": "work"}]
            })
        );
        let g: Group = serde_json::from_value(json!({"id":"g-1","name":"Eng","members":["u-1"]}))
            .expect("group");
        let MapOutcome::Resource(doc) = m.map_group(&g, &target()).expect("maps") else {
            panic!("skipped")
        };
        assert_eq!(
            doc,
            json!({"schemas": [GROUP_SCHEMA], "displayName": "Eng", "externalId": "g-1"})
        );
    }

    #[test]
    fn results_become_the_json_rhais_own_conversion_makes() {
        // Each value through `to_json` and through rhai's serde conversion: the same JSON, or
        // the same error. Key order matters (it is the resource's text, hashed and sent).
        let engine = sandboxed_engine(Limits::default());
        let values = [
            r#"#{ z: 1, a: -2, m: 1.5, big: 9007199254740993, t: true, f: false, u: (), s: "ß✓" }"#,
            r#"#{ list: [1, "two", #{ three: [3.0, ()] }, [], #{}], c: 'x', nan: 0.0 / 0.0 }"#,
            r#"#{ inf: 1.0 / 0.0, neg: -0.0, e: 1e300, tiny: 1e-300, min: -9223372036854775808 }"#,
            r#"let n = 1; let f = || n; #{ captured: n, fine: 2 }"#,
            r#"#{ blob: blob(2, 7) }"#,
            r#"#{ fn_ptr: Fn("len") }"#,
            r#"[1, #{ b: 2, a: 1 }]"#,
            r#""text""#,
            r#"42"#,
            r#"()"#,
        ];
        for text in values {
            let v: Dynamic = engine.eval(text).expect(text);
            let ours = to_json(&v).map_err(|e| e.to_string());
            let rhais = rhai::serde::from_dynamic::<Value>(&v).map_err(|e| e.to_string());
            assert_eq!(ours, rhais, "{text}");
            if let Ok(json) = &ours {
                assert_eq!(
                    serde_json::to_string(json).ok(),
                    rhais
                        .as_ref()
                        .ok()
                        .and_then(|j| serde_json::to_string(j).ok()),
                    "{text}: key order"
                );
            }
        }
        // The cases that matter most do convert.
        let v: Dynamic = engine.eval(values[0]).expect("map");
        assert_eq!(
            serde_json::to_string(&to_json(&v).expect("converts")).expect("text"),
            r#"{"a":-2,"big":9007199254740993,"f":false,"m":1.5,"s":"ß✓","t":true,"u":null,"z":1}"#
        );
    }

    #[test]
    fn the_default_user_script_maps_as_its_earlier_text_did() {
        // The default was rewritten to read each attribute once (fewer map look-ups); a
        // resource that came out differently would be re-sent to every target after an
        // upgrade. Users with and without each optional attribute, empty ones included.
        let earlier = r#"// Core SCIM User attributes (RFC 7643 section 4.1) from the directory user.
// Later scripts in this folder run after this one and are deep-merged over its result.
let doc = #{
    userName: user.username,
    externalId: user.id,
    active: user.active,
};

doc.displayName = if user.name != () && user.name != "" { user.name } else { user.username };

let name = #{};
if user.name != () { name.formatted = user.name; }
if user.given_name != () { name.givenName = user.given_name; }
if user.family_name != () { name.familyName = user.family_name; }
if name.len() > 0 { doc.name = name; }

if user.email != () && user.email != "" {
    doc.emails = [#{ value: user.email, type: "work", primary: true }];
}

let attrs = user.attributes;
if attrs.locale != () { doc.locale = attrs.locale; }
if attrs.phone != () { doc.phoneNumbers = [#{ value: attrs.phone, type: "work" }]; }

doc
"#;
        let now = Mappings::defaults().expect("defaults compile");
        let then = user_scripts(&[("10-core.rhai", earlier)]);
        let users = [
            json!({"id": "u-1", "username": "alice", "email": "a@example.com", "name": "Alice Smith",
                   "given_name": "Alice", "family_name": "Smith",
                   "attributes": {"locale": "en-US", "phone": "+1 555 0100", "other": 1}}),
            json!({"id": "u-2", "username": "bob"}),
            json!({"id": "u-3", "username": "carol", "name": "", "email": "", "active": false}),
            json!({"id": "u-4", "username": "dan", "given_name": "Dan", "attributes": {"phone": "1"}}),
            json!({"id": "u-5", "username": "eve", "family_name": "Eve", "attributes": {"locale": "fr"}}),
        ];
        for u in users {
            let user: User = serde_json::from_value(u.clone()).expect("user");
            let text = |m: &Mappings| match m.map_user(&user, &target()).expect("maps") {
                MapOutcome::Resource(doc) => serde_json::to_string(&doc).expect("text"),
                MapOutcome::Skip { .. } => panic!("skipped {u}"),
            };
            assert_eq!(text(&now), text(&then), "{u}");
        }
    }

    #[test]
    fn later_scripts_deep_merge_and_clear() {
        let m = user_scripts(&[
            (
                "a.rhai",
                r#"#{ userName: user.username, name: #{ givenName: "A", familyName: "B" }, emails: [#{value: "x"}] }"#,
            ),
            (
                "b.rhai",
                r#"#{ name: #{ familyName: "C" }, emails: [#{value: "y"}], title: scim.userName }"#,
            ),
            ("c.rhai", "()"),
            ("d.rhai", "#{ title: () }"),
        ]);
        let MapOutcome::Resource(doc) = m.map_user(&alice(), &target()).expect("maps") else {
            panic!("skipped")
        };
        assert_eq!(doc["name"], json!({"givenName": "A", "familyName": "C"}));
        assert_eq!(doc["emails"], json!([{"value": "y"}]));
        assert!(doc.get("title").is_none(), "() clears a key: {doc}");
    }

    #[test]
    fn skip_names_script_and_reason() {
        let m = user_scripts(&[
            ("a.rhai", "#{ userName: user.username }"),
            (
                "b.rhai",
                "if user.username == \"alice\" { skip(\"no alices\") }\n()",
            ),
        ]);
        let out = m.map_user(&alice(), &target()).expect("maps");
        assert_eq!(
            out,
            MapOutcome::Skip {
                script: "b.rhai".into(),
                reason: "no alices".into()
            }
        );
    }

    #[test]
    fn errors_name_script_line_and_column() {
        let m = user_scripts(&[("bad.rhai", "let x = 1;\nlet y = x + \"a\" * 2;\n#{}")]);
        let err = m.map_user(&alice(), &target()).expect_err("fails");
        let MappingError::Script { script, line, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(script, "bad.rhai");
        assert_eq!(*line, 2, "{err}");
        let err = Mappings::from_sources(&[("syntax.rhai".into(), "let = ;".into())], &[])
            .err()
            .expect("syntax error");
        assert!(err.to_string().starts_with("syntax.rhai:1:"), "{err}");
    }

    #[test]
    fn endless_loop_is_stopped() {
        let m = user_scripts(&[("loop.rhai", "loop { }")]);
        let err = m.map_user(&alice(), &target()).expect_err("bounded");
        assert!(err.to_string().contains("loop.rhai"), "{err}");
    }

    #[test]
    fn non_map_result_is_an_error() {
        let m = user_scripts(&[("n.rhai", "42")]);
        let err = m.map_user(&alice(), &target()).expect_err("not a map");
        assert!(err.to_string().contains("must return a map"), "{err}");
    }

    fn eval_user(script: &str) -> Result<MapOutcome, MappingError> {
        user_scripts(&[("s.rhai", script)]).map_user(&alice(), &target())
    }

    fn err_of(script: &str) -> String {
        eval_user(script).expect_err(script).to_string()
    }

    #[test]
    fn sandbox_limits_stop_runaway_scripts() {
        let e = err_of("fn f(x) { f(x + 1) } f(0)");
        assert!(
            e.starts_with("s.rhai:") && e.contains("Stack overflow"),
            "{e}"
        );
        let e = err_of("let s = \"xxxxxxxxxxxxxxxx\"; loop { s += s; }");
        assert!(e.contains("Length of string"), "{e}");
        let e = err_of("let a = []; loop { a.push(1); }");
        assert!(
            e.contains("Size of array") || e.contains("Length of array"),
            "{e}"
        );
        let e = Mappings::from_sources(&[("e.rhai".into(), "eval(\"1\")".into())], &[])
            .err()
            .expect("no eval")
            .to_string();
        assert!(e.starts_with("e.rhai:1:") && e.contains("eval"), "{e}");
        let e = Mappings::from_sources(&[("m.rhai".into(), "import \"x\" as y;".into())], &[])
            .err()
            .expect("no modules")
            .to_string();
        assert!(e.starts_with("m.rhai:1:"), "{e}");
    }

    #[test]
    fn wall_time_stops_an_object_within_its_limit() {
        let limits = Limits {
            max_operations: 0, // unlimited: only the clock can stop this one
            wall_time: Duration::from_millis(50),
        };
        let m = Mappings::with_limits(&[("spin.rhai".into(), "loop { }".into())], &[], limits)
            .expect("compiles");
        let started = Instant::now();
        let err = m
            .map_user(&alice(), &target())
            .expect_err("stopped")
            .to_string();
        assert!(
            err.starts_with("spin.rhai:") && err.contains("longer than 50 ms"),
            "{err}"
        );
        // Bounded, not exact: the point is that it ends.
        assert!(started.elapsed() < Duration::from_secs(30));
        // The next object on this thread gets a fresh deadline.
        let ok = Mappings::with_limits(
            &[("ok.rhai".into(), "#{ userName: \"a\" }".into())],
            &[],
            limits,
        )
        .expect("compiles");
        assert!(ok.map_user(&alice(), &target()).is_ok());
    }

    #[test]
    fn helpers_work_from_scripts() {
        let m = user_scripts(&[(
            "h.rhai",
            r#"
            let n = split_name("Ada King Lovelace");
            #{
                userName: lower("ALICE"),
                title: upper("cto"),
                externalId: sha256(user.id),
                nickName: regex_replace(user.email, "@.*$", ""),
                profileUrl: if regex_match(user.email, "^[a-z]+@example[.]com$") { "yes" } else { "no" },
                locale: regex_capture("en-US", "^([a-z]+)-([A-Z]+)$")[2],
                name: #{ givenName: n.given, familyName: n.family },
                timezone: format_date("2024-03-09T15:04:05Z", "%Y/%m/%d %H:%M"),
                preferredLanguage: format_date(0, "%Y-%m-%d") + " " + format_date("2024-12-31", "%d.%m.%Y"),
            }
            "#,
        )]);
        let MapOutcome::Resource(doc) = m.map_user(&alice(), &target()).expect("maps") else {
            panic!("skipped")
        };
        assert_eq!(doc["userName"], "alice");
        assert_eq!(doc["title"], "CTO");
        assert_eq!(doc["externalId"], sha256("u-1"));
        assert_eq!(doc["nickName"], "alice");
        assert_eq!(doc["profileUrl"], "yes");
        assert_eq!(doc["locale"], "US");
        assert_eq!(
            doc["name"],
            json!({"givenName": "Ada King", "familyName": "Lovelace"})
        );
        assert_eq!(doc["timezone"], "2024/03/09 15:04");
        assert_eq!(doc["preferredLanguage"], "1970-01-01 31.12.2024");
        assert_eq!(split_name("Cher"), ("Cher".into(), String::new()));
        assert_eq!(split_name("  "), (String::new(), String::new()));
        let e = err_of("regex_match(\"a\", \"(\")");
        assert!(e.contains("invalid regex"), "{e}");
        let e = err_of("format_date(\"last tuesday\", \"%Y\")");
        assert!(e.contains("is not a date-time"), "{e}");
    }

    #[test]
    fn extensions_used_are_listed_in_schemas() {
        let out = eval_user(&format!(
            "#{{ userName: \"a\", \"{}\": #{{ department: \"R&D\" }} }}",
            crate::scim::ENTERPRISE_USER_SCHEMA
        ))
        .expect("maps");
        let MapOutcome::Resource(doc) = out else {
            panic!("skipped")
        };
        assert_eq!(
            doc["schemas"],
            json!([USER_SCHEMA, crate::scim::ENTERPRISE_USER_SCHEMA])
        );
        assert_eq!(crate::scim::validate(Kind::User, &doc), Ok(()));
    }

    /// A mappings folder with one user script mapping `userName` to "v1", loaded.
    fn live_folder() -> (tempfile::TempDir, PathBuf, LiveMappings) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("user")).expect("mkdir");
        let script = dir.path().join("user/10.rhai");
        std::fs::write(&script, "#{ userName: \"v1\" }").expect("write");
        let live = LiveMappings::load(dir.path()).expect("loads");
        (dir, script, live)
    }

    /// The `userName` the folder's scripts map a user to now.
    fn name(live: &LiveMappings) -> String {
        match live.current().map_user(&alice(), &target()) {
            Ok(MapOutcome::Resource(d)) => d["userName"].as_str().unwrap_or_default().to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn edited_scripts_are_reloaded_and_broken_edits_keep_the_last_good_version() {
        let (_dir, script, live) = live_folder();
        assert_eq!(name(&live), "v1");
        assert!(!live.refresh().expect("unchanged"));
        let v1 = live.version();
        std::fs::write(&script, "#{ userName: \"v2\" }").expect("write");
        assert!(live.refresh().expect("reloads"));
        assert_eq!(name(&live), "v2");
        assert_ne!(live.version(), v1);
        std::fs::write(&script, "#{ userName: ").expect("write");
        let err = live.refresh().expect_err("broken").to_string();
        assert!(err.contains("10.rhai:1:"), "{err}");
        assert_eq!(name(&live), "v2", "the last good version stays in use");
        assert!(
            !live
                .refresh()
                .expect("the same broken edit is reported once")
        );
        std::fs::write(&script, "#{ userName: \"v3\" }").expect("write");
        assert!(live.refresh().expect("fixed"));
        assert_eq!(name(&live), "v3");
    }

    #[test]
    fn batches_and_events_look_at_the_folder_once_a_second() {
        let (_dir, script, live) = live_folder();
        std::fs::write(&script, "#{ userName: \"v2\" }").expect("write");
        // Loading was a look: the next one is due a second later.
        assert!(!live.refresh_due().expect("not due"));
        assert_eq!(name(&live), "v1");
        // A look that is due (the last one a second ago) sees the edit.
        *live.looked.lock().expect("lock") = Instant::now().checked_sub(LOOK_EVERY);
        assert!(live.refresh_due().expect("due"));
        assert_eq!(name(&live), "v2");
        std::fs::write(&script, "#{ userName: \"v3\" }").expect("write");
        assert!(!live.refresh_due().expect("looked just now"));
        // A full sync's phases look whenever they start.
        assert!(live.refresh().expect("forced"));
        assert_eq!(name(&live), "v3");
    }
}
