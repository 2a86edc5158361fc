//! Property mappings: ordered rhai scripts that turn a directory object into a SCIM resource.
//!
//! Each script sees `user` or `group` (a group also has `members`), `target` and `scim` (the
//! document built so far) and returns a map deep-merged into `scim`, `()` to add nothing, or calls
//! `skip("why")`. Scripts run sandboxed: no modules, no `eval`, bounded operations and sizes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{AST, Dynamic, Engine, EvalAltResult, Position, Scope};
use serde_json::{Map, Value};

use crate::directory::{Group, Kind, User};

/// Shipped default scripts, embedded so `demo` and fresh installs work from anywhere.
pub const DEFAULT_USER_SCRIPT: (&str, &str) = (
    "10-core.rhai",
    include_str!("../mappings/user/10-core.rhai"),
);
pub const DEFAULT_GROUP_SCRIPT: (&str, &str) = (
    "10-core.rhai",
    include_str!("../mappings/group/10-core.rhai"),
);

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
    user: Arc<Vec<Script>>,
    group: Arc<Vec<Script>>,
}

/// The value `skip()` raises; recognised when it comes back out of the engine.
#[derive(Debug, Clone)]
struct SkipSignal(String);

/// What a script knows of the target it maps for.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    pub name: String,
    pub compatibility: String,
}

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

fn sandboxed_engine() -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(200_000);
    engine.set_max_call_levels(32);
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
    engine
}

impl Mappings {
    /// Loads `dir/user/*.rhai` and `dir/group/*.rhai`, each list in file-name order.
    pub fn load(dir: &Path) -> Result<Mappings, MappingError> {
        if !dir.is_dir() {
            return Err(MappingError::Load {
                path: dir.to_path_buf(),
                message: "not a directory".into(),
            });
        }
        let mut sources = Vec::new();
        for kind in ["user", "group"] {
            let sub = dir.join(kind);
            let mut files = Vec::new();
            if sub.is_dir() {
                let entries = std::fs::read_dir(&sub).map_err(|e| MappingError::Load {
                    path: sub.clone(),
                    message: e.to_string(),
                })?;
                for entry in entries {
                    let path = entry
                        .map_err(|e| MappingError::Load {
                            path: sub.clone(),
                            message: e.to_string(),
                        })?
                        .path();
                    if path.extension().is_some_and(|e| e == "rhai") {
                        files.push(path);
                    }
                }
            }
            files.sort();
            let mut scripts = Vec::new();
            for path in files {
                let text = std::fs::read_to_string(&path).map_err(|e| MappingError::Load {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                scripts.push((path.display().to_string(), text));
            }
            sources.push(scripts);
        }
        let group = sources.pop().unwrap_or_default();
        let user = sources.pop().unwrap_or_default();
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
        let engine = sandboxed_engine();
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
        let obj = serde_json::to_value(user).unwrap_or(Value::Null);
        self.run(&self.user, "user", obj, USER_SCHEMA, target)
    }

    /// Maps a group; `members` are the directory user ids, visible to scripts as `members`.
    pub fn map_group(
        &self,
        group: &Group,
        target: &TargetInfo,
    ) -> Result<MapOutcome, MappingError> {
        let obj = serde_json::to_value(group).unwrap_or(Value::Null);
        self.run(&self.group, "group", obj, GROUP_SCHEMA, target)
    }

    fn run(
        &self,
        scripts: &[Script],
        var: &str,
        object: Value,
        schema: &str,
        target: &TargetInfo,
    ) -> Result<MapOutcome, MappingError> {
        let mut doc = Map::new();
        doc.insert("schemas".into(), Value::from(vec![schema.to_string()]));
        let mut doc = Value::Object(doc);
        let to_dyn = |v: &Value| rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT);
        let object = to_dyn(&object);
        let members = object
            .read_lock::<rhai::Map>()
            .and_then(|m| m.get("members").cloned());
        let mut tgt = rhai::Map::new();
        tgt.insert("name".into(), target.name.clone().into());
        tgt.insert("compatibility".into(), target.compatibility.clone().into());
        let tgt: Dynamic = tgt.into();
        for script in scripts {
            let mut scope = Scope::new();
            scope.push_constant(var, object.clone());
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
                        message: root_message(&err),
                    });
                }
            };
            if out.is_unit() {
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
            let value: Value =
                rhai::serde::from_dynamic(&out).map_err(|e| MappingError::Script {
                    script: script.name.clone(),
                    line: 0,
                    column: 0,
                    message: format!("result cannot be turned into JSON: {e}"),
                })?;
            deep_merge(&mut doc, value);
        }
        Ok(MapOutcome::Resource(doc))
    }
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

fn root_message(err: &EvalAltResult) -> String {
    let inner = innermost(err);
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
                match d.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        deep_merge(existing, v)
                    }
                    _ => {
                        d.insert(k, v);
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
}
