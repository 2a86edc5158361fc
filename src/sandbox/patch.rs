//! RFC 7644 §3.5.2 PATCH operations applied to a JSON resource, as the sandbox does it.

use serde_json::{Map, Value};

use super::filter::{self, Filter};

/// A SCIM error: (scimType, detail); always answered with 400.
pub type PatchError = (&'static str, String);

struct Path {
    /// The extension URN holding the attribute, if any.
    container: Option<String>,
    attr: String,
    filter: Option<Filter>,
    sub: Option<String>,
}

fn parse_path(p: &str) -> Result<Path, PatchError> {
    let bad = |m: String| ("invalidPath", m);
    let (container, rest) = if p.starts_with("urn:") {
        // The attribute follows the last ':' before any '[' or '.'.
        let stop = p.find(['[']).unwrap_or(p.len());
        let head = &p[..stop];
        match head.rfind(':') {
            Some(i) => (Some(p[..i].to_string()), &p[i + 1..]),
            None => return Err(bad(format!("bad path {p:?}"))),
        }
    } else {
        (None, p)
    };
    let (attr, filter, sub) = match rest.find('[') {
        Some(open) => {
            let close = rest
                .rfind(']')
                .ok_or_else(|| bad(format!("missing ] in path {p:?}")))?;
            if close < open {
                return Err(bad(format!("bad path {p:?}")));
            }
            let f = filter::parse(&rest[open + 1..close])
                .map_err(|e| ("invalidFilter", format!("path {p:?}: {e}")))?;
            let after = &rest[close + 1..];
            let sub = match after.strip_prefix('.') {
                Some(s) if !s.is_empty() => Some(s.to_string()),
                None if after.is_empty() => None,
                _ => return Err(bad(format!("bad path {p:?}"))),
            };
            (rest[..open].to_string(), Some(f), sub)
        }
        None => match rest.split_once('.') {
            Some((a, s)) => (a.to_string(), None, Some(s.to_string())),
            None => (rest.to_string(), None, None),
        },
    };
    if attr.is_empty() {
        return Err(bad(format!("bad path {p:?}")));
    }
    Ok(Path {
        container,
        attr,
        filter,
        sub,
    })
}

/// The real key for `name` in `m` (attribute names are case-insensitive).
fn key_of(m: &Map<String, Value>, name: &str) -> String {
    m.keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .cloned()
        .unwrap_or_else(|| name.to_string())
}

fn merge_or_set(dst: &mut Value, v: Value) {
    match (dst, v) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, x) in s {
                let key = key_of(d, &k);
                d.insert(key, x);
            }
        }
        (d, v) => *d = v,
    }
}

fn add_value(m: &mut Map<String, Value>, name: &str, v: Value) {
    let key = key_of(m, name);
    match (m.get_mut(&key), v) {
        (Some(Value::Array(existing)), Value::Array(items)) => {
            for item in items {
                let dup = existing.iter().any(|e| {
                    e == &item || (e.get("value").is_some() && e.get("value") == item.get("value"))
                });
                if !dup {
                    existing.push(item);
                }
            }
        }
        (Some(existing), v) => merge_or_set(existing, v),
        (None, v) => {
            m.insert(key, v);
        }
    }
}

fn container_mut<'a>(
    r: &'a mut Map<String, Value>,
    container: &Option<String>,
    create: bool,
) -> Option<&'a mut Map<String, Value>> {
    match container {
        None => Some(r),
        Some(urn) => {
            let key = key_of(r, urn);
            if create && !r.contains_key(&key) {
                r.insert(key.clone(), Value::Object(Map::new()));
            }
            r.get_mut(&key).and_then(Value::as_object_mut)
        }
    }
}

/// Applies one operation (`{"op", "path"?, "value"?}`) to `resource`.
pub fn apply(resource: &mut Value, op: &Value) -> Result<(), PatchError> {
    let name = op
        .get("op")
        .and_then(Value::as_str)
        .ok_or(("invalidSyntax", "operation without \"op\"".to_string()))?
        .to_ascii_lowercase();
    let path = match op.get("path") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(parse_path(p)?),
        Some(_) => return Err(("invalidPath", "\"path\" must be a string".into())),
    };
    let value = op.get("value").cloned();
    let r = resource
        .as_object_mut()
        .ok_or(("invalidSyntax", "resource is not an object".to_string()))?;
    if let Some(p) = &path
        && p.container.is_none()
        && ["id", "meta", "schemas"]
            .iter()
            .any(|a| p.attr.eq_ignore_ascii_case(a))
    {
        return Err(("mutability", format!("{} cannot be modified", p.attr)));
    }
    match (name.as_str(), path) {
        ("add" | "replace", None) => {
            let Some(Value::Object(attrs)) = value else {
                return Err((
                    "invalidValue",
                    format!("{name} without a path needs an object value"),
                ));
            };
            for (k, v) in attrs {
                if k.starts_with("urn:") && v.is_object() {
                    let key = key_of(r, &k);
                    merge_or_set(r.entry(key).or_insert(Value::Object(Map::new())), v);
                } else if name == "add" {
                    add_value(r, &k, v);
                } else {
                    let key = key_of(r, &k);
                    match r.get_mut(&key) {
                        Some(existing) if existing.is_object() && v.is_object() => {
                            merge_or_set(existing, v)
                        }
                        _ => {
                            r.insert(key, v);
                        }
                    }
                }
            }
            Ok(())
        }
        ("add" | "replace", Some(p)) => {
            let v = value.ok_or(("invalidValue", format!("{name} needs a value")))?;
            let obj = container_mut(r, &p.container, true)
                .ok_or(("invalidPath", "extension is not an object".to_string()))?;
            let key = key_of(obj, &p.attr);
            match (&p.filter, &p.sub) {
                (None, None) => {
                    if name == "add" {
                        add_value(obj, &key, v);
                    } else {
                        match obj.get_mut(&key) {
                            Some(existing) if existing.is_object() && v.is_object() => {
                                merge_or_set(existing, v)
                            }
                            _ => {
                                obj.insert(key, v);
                            }
                        }
                    }
                    Ok(())
                }
                (None, Some(sub)) => {
                    let slot = obj.entry(key).or_insert(Value::Object(Map::new()));
                    match slot {
                        Value::Object(m) => {
                            let k = key_of(m, sub);
                            m.insert(k, v);
                        }
                        Value::Array(items) => {
                            for it in items.iter_mut().filter_map(Value::as_object_mut) {
                                let k = key_of(it, sub);
                                it.insert(k, v.clone());
                            }
                        }
                        _ => {
                            return Err((
                                "invalidPath",
                                format!("{} has no sub-attributes", p.attr),
                            ));
                        }
                    }
                    Ok(())
                }
                (Some(f), sub) => {
                    let Some(Value::Array(items)) = obj.get_mut(&key) else {
                        return Err(("noTarget", format!("{} has no values to filter", p.attr)));
                    };
                    let mut hit = false;
                    for it in items.iter_mut().filter(|it| filter::matches(f, it)) {
                        hit = true;
                        match sub {
                            Some(s) => {
                                if let Some(m) = it.as_object_mut() {
                                    let k = key_of(m, s);
                                    m.insert(k, v.clone());
                                }
                            }
                            None => merge_or_set(it, v.clone()),
                        }
                    }
                    if hit {
                        Ok(())
                    } else {
                        Err((
                            "noTarget",
                            format!("no value of {} matches the filter", p.attr),
                        ))
                    }
                }
            }
        }
        ("remove", None) => Err(("noTarget", "remove needs a path".into())),
        ("remove", Some(p)) => {
            let Some(obj) = container_mut(r, &p.container, false) else {
                return Ok(());
            };
            let key = key_of(obj, &p.attr);
            match (&p.filter, &p.sub) {
                (None, None) => {
                    // Azure-style removal of listed values from a multi-valued attribute.
                    if let (Some(Value::Array(gone)), Some(Value::Array(items))) =
                        (&value, obj.get_mut(&key))
                    {
                        let vals: Vec<&Value> =
                            gone.iter().filter_map(|g| g.get("value")).collect();
                        items.retain(|it| !it.get("value").is_some_and(|v| vals.contains(&v)));
                        if items.is_empty() {
                            obj.remove(&key);
                        }
                    } else {
                        obj.remove(&key);
                    }
                }
                (None, Some(sub)) => match obj.get_mut(&key) {
                    Some(Value::Object(m)) => {
                        let k = key_of(m, sub);
                        m.remove(&k);
                    }
                    Some(Value::Array(items)) => {
                        for it in items.iter_mut().filter_map(Value::as_object_mut) {
                            let k = key_of(it, sub);
                            it.remove(&k);
                        }
                    }
                    _ => {}
                },
                (Some(f), sub) => {
                    if let Some(Value::Array(items)) = obj.get_mut(&key) {
                        match sub {
                            None => items.retain(|it| !filter::matches(f, it)),
                            Some(s) => {
                                for it in items.iter_mut().filter(|it| filter::matches(f, it)) {
                                    if let Some(m) = it.as_object_mut() {
                                        let k = key_of(m, s);
                                        m.remove(&k);
                                    }
                                }
                            }
                        }
                        if items.is_empty() {
                            obj.remove(&key);
                        }
                    }
                }
            }
            Ok(())
        }
        (other, _) => Err(("invalidSyntax", format!("unknown op {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(mut r: Value, ops: Value) -> Result<Value, PatchError> {
        for op in ops.as_array().expect("ops") {
            apply(&mut r, op)?;
        }
        Ok(r)
    }

    #[test]
    fn add_replace_remove_with_paths_and_filters() {
        let g = json!({"displayName":"G","members":[{"value":"a"},{"value":"b"}]});
        let out = run(
            g.clone(),
            json!([
                {"op":"add","path":"members","value":[{"value":"c"},{"value":"a"}]},
                {"op":"remove","path":"members[value eq \"b\"]"},
                {"op":"Replace","path":"displayName","value":"H"}
            ]),
        )
        .expect("applies");
        assert_eq!(
            out,
            json!({"displayName":"H","members":[{"value":"a"},{"value":"c"}]})
        );
        let u = json!({"userName":"a","name":{"givenName":"A","familyName":"B"},"emails":[{"type":"work","value":"x"}]});
        let out = run(
            u,
            json!([
                {"op":"replace","value":{"name":{"givenName":"Z"}}},
                {"op":"remove","path":"name.familyName"},
                {"op":"replace","path":"emails[type eq \"work\"].value","value":"y"},
                {"op":"add","path":"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department","value":"R&D"}
            ]),
        )
        .expect("applies");
        assert_eq!(out["name"], json!({"givenName":"Z"}));
        assert_eq!(out["emails"][0]["value"], "y");
        assert_eq!(
            out["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]["department"],
            "R&D"
        );
    }

    #[test]
    fn errors_carry_scim_types() {
        let u = json!({"userName":"a"});
        assert_eq!(
            run(u.clone(), json!([{"op":"remove"}]))
                .expect_err("no path")
                .0,
            "noTarget"
        );
        assert_eq!(
            run(u.clone(), json!([{"op":"replace","path":"id","value":"x"}]))
                .expect_err("id")
                .0,
            "mutability"
        );
        assert_eq!(
            run(u.clone(), json!([{"op":"jump","path":"a"}]))
                .expect_err("op")
                .0,
            "invalidSyntax"
        );
        assert_eq!(
            run(
                u,
                json!([{"op":"replace","path":"emails[type eq \"x\"].value","value":"y"}])
            )
            .expect_err("no target")
            .0,
            "noTarget"
        );
    }
}
