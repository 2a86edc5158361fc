//! RFC 7643/7644 wire types and pure helpers: error bodies, PatchOp, ServiceProviderConfig,
//! filters, resource diffs and core-schema validation. Nothing here knows vendors or storage.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::mapping::{GROUP_SCHEMA, USER_SCHEMA};

pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub const LIST_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
pub const SPC_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";
pub const ENTERPRISE_USER_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

/// A SCIM error response body (RFC 7644 §3.12); every field optional because targets vary.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "scimType")]
    pub scim_type: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchOperation {
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

impl PatchOperation {
    pub fn add(path: &str, value: Value) -> Self {
        Self {
            op: "add".into(),
            path: Some(path.into()),
            value: Some(value),
        }
    }
    pub fn replace(path: &str, value: Value) -> Self {
        Self {
            op: "replace".into(),
            path: Some(path.into()),
            value: Some(value),
        }
    }
    pub fn remove(path: &str) -> Self {
        Self {
            op: "remove".into(),
            path: Some(path.into()),
            value: None,
        }
    }
}

/// A PatchOp request body; `schemas` is always set.
pub fn patch_body(ops: &[PatchOperation]) -> Value {
    serde_json::json!({ "schemas": [PATCH_OP_SCHEMA], "Operations": ops })
}

/// What a target says it supports (RFC 7643 §5), read defensively.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    pub patch: bool,
    pub filter: bool,
    pub filter_max_results: u32,
    pub bulk: bool,
    pub bulk_max_operations: u32,
    pub etag: bool,
}

impl Capabilities {
    /// What is assumed of a target that publishes no usable ServiceProviderConfig.
    pub fn conservative() -> Self {
        Self {
            patch: false,
            filter: false,
            filter_max_results: 100,
            bulk: false,
            bulk_max_operations: 0,
            etag: false,
        }
    }

    pub fn from_spc(v: &Value) -> Self {
        let flag = |k: &str| {
            v.get(k)
                .and_then(|o| o.get("supported"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        let num = |k: &str, f: &str, d: u32| {
            v.get(k)
                .and_then(|o| o.get(f))
                .and_then(Value::as_u64)
                .map(|n| n.min(u64::from(u32::MAX)) as u32)
                .unwrap_or(d)
        };
        Self {
            patch: flag("patch"),
            filter: flag("filter"),
            filter_max_results: num("filter", "maxResults", 100).max(1),
            bulk: flag("bulk"),
            bulk_max_operations: num("bulk", "maxOperations", 0),
            etag: flag("etag"),
        }
    }
}

/// `attr eq "value"` with the value escaped as a JSON string (RFC 7644 §3.4.2.2).
pub fn eq_filter(attr: &str, value: &str) -> String {
    format!("{attr} eq {}", Value::String(value.to_string()))
}

/// The attributes that identify an existing remote object, in lookup order.
pub fn match_filters(kind: crate::directory::Kind, resource: &Value) -> Vec<String> {
    let keys: &[&str] = match kind {
        crate::directory::Kind::User => &["userName", "externalId"],
        crate::directory::Kind::Group => &["externalId", "displayName"],
    };
    keys.iter()
        .filter_map(|k| {
            resource
                .get(*k)
                .and_then(Value::as_str)
                .map(|v| eq_filter(k, v))
        })
        .collect()
}

/// Attributes a client never writes.
const READ_ONLY: &[&str] = &["id", "meta", "schemas", "members", "groups"];

/// PATCH operations that turn `prev` (what the target holds) into `next`: `replace` for changed
/// attributes, `remove` for attributes (and sub-attributes of complex ones) that disappeared.
pub fn diff_ops(prev: &Value, next: &Value) -> Vec<PatchOperation> {
    let empty = Map::new();
    let p = prev.as_object().unwrap_or(&empty);
    let n = next.as_object().unwrap_or(&empty);
    let mut ops = Vec::new();
    for (k, old) in p {
        if READ_ONLY.contains(&k.as_str()) {
            continue;
        }
        match n.get(k) {
            None => ops.push(PatchOperation::remove(k)),
            Some(new) => {
                if let (Value::Object(o), Value::Object(nw)) = (old, new) {
                    let sep = if k.starts_with("urn:") { ':' } else { '.' };
                    for sub in o.keys().filter(|s| !nw.contains_key(*s)) {
                        ops.push(PatchOperation::remove(&format!("{k}{sep}{sub}")));
                    }
                }
            }
        }
    }
    for (k, new) in n {
        if READ_ONLY.contains(&k.as_str()) {
            continue;
        }
        if p.get(k) != Some(new) {
            ops.push(PatchOperation::replace(k, new.clone()));
        }
    }
    ops
}

/// `members` values for a group body.
pub fn member_values(ids: &[String]) -> Value {
    Value::Array(
        ids.iter()
            .map(|id| serde_json::json!({ "value": id }))
            .collect(),
    )
}

/// Checks a mapped resource against the core User/Group schema before it is sent; returns every
/// violation as "attribute path: problem".
pub fn validate(kind: crate::directory::Kind, doc: &Value) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    let Some(obj) = doc.as_object() else {
        return Err(vec!["resource: must be a JSON object".into()]);
    };
    let base = match kind {
        crate::directory::Kind::User => USER_SCHEMA,
        crate::directory::Kind::Group => GROUP_SCHEMA,
    };
    match obj.get("schemas").and_then(Value::as_array) {
        Some(s) if s.iter().any(|x| x.as_str() == Some(base)) => {
            for x in s {
                if !x.is_string() {
                    errs.push("schemas: every entry must be a string".into());
                }
            }
        }
        _ => errs.push(format!("schemas: must list {base}")),
    }
    let required = match kind {
        crate::directory::Kind::User => "userName",
        crate::directory::Kind::Group => "displayName",
    };
    match obj.get(required) {
        Some(Value::String(s)) if !s.trim().is_empty() => {}
        Some(Value::String(_)) => errs.push(format!("{required}: required, must not be empty")),
        Some(_) => errs.push(format!("{required}: must be a string")),
        None => errs.push(format!("{required}: required")),
    }
    for (k, v) in obj {
        if k.starts_with("urn:") {
            let listed = obj
                .get("schemas")
                .and_then(Value::as_array)
                .is_some_and(|s| s.iter().any(|x| x.as_str() == Some(k)));
            if !listed {
                errs.push(format!("{k}: extension used but not listed in schemas"));
            }
            if !v.is_object() {
                errs.push(format!("{k}: must be an object"));
            }
            continue;
        }
        let expect = attribute_type(kind, k);
        if let Some(t) = expect {
            check_type(k, v, t, &mut errs);
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

#[derive(Clone, Copy)]
enum AttrType {
    Str,
    Bool,
    Complex(&'static [&'static str]),
    Multi(&'static [&'static str]),
}

const MULTI_SUB: &[&str] = &["value", "display", "type", "primary", "$ref"];
const NAME_SUB: &[&str] = &[
    "formatted",
    "familyName",
    "givenName",
    "middleName",
    "honorificPrefix",
    "honorificSuffix",
];
const ADDRESS_SUB: &[&str] = &[
    "formatted",
    "streetAddress",
    "locality",
    "region",
    "postalCode",
    "country",
    "type",
    "primary",
];

fn attribute_type(kind: crate::directory::Kind, k: &str) -> Option<AttrType> {
    use AttrType::*;
    match (kind, k) {
        (_, "externalId" | "id") => Some(Str),
        (crate::directory::Kind::Group, "displayName") => Some(Str),
        (crate::directory::Kind::Group, "members") => Some(Multi(MULTI_SUB)),
        (crate::directory::Kind::User, k) => match k {
            "userName" | "displayName" | "nickName" | "profileUrl" | "title" | "userType"
            | "preferredLanguage" | "locale" | "timezone" | "password" => Some(Str),
            "active" => Some(Bool),
            "name" => Some(Complex(NAME_SUB)),
            "emails" | "phoneNumbers" | "ims" | "photos" | "entitlements" | "roles"
            | "x509Certificates" => Some(Multi(MULTI_SUB)),
            "addresses" => Some(Multi(ADDRESS_SUB)),
            _ => None,
        },
        _ => None,
    }
}

fn check_type(path: &str, v: &Value, t: AttrType, errs: &mut Vec<String>) {
    match t {
        AttrType::Str => {
            if !v.is_string() {
                errs.push(format!("{path}: must be a string"));
            }
        }
        AttrType::Bool => {
            if !v.is_boolean() {
                errs.push(format!("{path}: must be a boolean"));
            }
        }
        AttrType::Complex(subs) => match v.as_object() {
            Some(m) => {
                for (s, sv) in m {
                    if !subs.contains(&s.as_str()) {
                        errs.push(format!("{path}.{s}: unknown sub-attribute"));
                    } else if !sv.is_string() {
                        errs.push(format!("{path}.{s}: must be a string"));
                    }
                }
            }
            None => errs.push(format!("{path}: must be an object")),
        },
        AttrType::Multi(subs) => match v.as_array() {
            Some(items) => {
                let mut primaries = 0;
                for (i, item) in items.iter().enumerate() {
                    let Some(m) = item.as_object() else {
                        errs.push(format!("{path}[{i}]: must be an object"));
                        continue;
                    };
                    for (s, sv) in m {
                        let p = format!("{path}[{i}].{s}");
                        if !subs.contains(&s.as_str()) {
                            errs.push(format!("{p}: unknown sub-attribute"));
                        } else if s == "primary" {
                            match sv.as_bool() {
                                Some(true) => primaries += 1,
                                Some(false) => {}
                                None => errs.push(format!("{p}: must be a boolean")),
                            }
                        } else if !sv.is_string() {
                            errs.push(format!("{p}: must be a string"));
                        }
                    }
                    if !m.contains_key("value") && subs.contains(&"value") {
                        errs.push(format!("{path}[{i}].value: required"));
                    }
                }
                if primaries > 1 {
                    errs.push(format!(
                        "{path}: at most one value may be primary, found {primaries}"
                    ));
                }
            }
            None => errs.push(format!("{path}: must be an array")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Kind;
    use serde_json::json;

    #[test]
    fn filter_escapes_quotes() {
        assert_eq!(eq_filter("userName", "a\"b"), r#"userName eq "a\"b""#);
    }

    #[test]
    fn diff_replaces_changed_and_removes_gone() {
        let prev = json!({"schemas":[USER_SCHEMA],"userName":"a","title":"x","name":{"givenName":"A","familyName":"B"}});
        let next = json!({"schemas":[USER_SCHEMA],"userName":"b","name":{"givenName":"A"}});
        let ops = diff_ops(&prev, &next);
        assert_eq!(
            ops,
            vec![
                PatchOperation::remove("title"),
                PatchOperation::remove("name.familyName"),
                PatchOperation::replace("userName", json!("b")),
                PatchOperation::replace("name", json!({"givenName":"A"})),
            ]
        );
        assert!(diff_ops(&next, &next).is_empty());
    }

    #[test]
    fn validation_lists_every_violation() {
        let doc = json!({
            "schemas": [USER_SCHEMA],
            "userName": "",
            "active": "yes",
            "emails": [{"value":"a","primary":true},{"value":"b","primary":true}],
            "name": {"given": "x"},
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "x"}
        });
        let errs = validate(Kind::User, &doc).expect_err("invalid");
        for needle in [
            "userName: required",
            "active: must be a boolean",
            "emails: at most one value may be primary",
            "name.given: unknown sub-attribute",
            "extension used but not listed",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        assert!(
            validate(
                Kind::Group,
                &json!({"schemas":[GROUP_SCHEMA],"displayName":"G"})
            )
            .is_ok()
        );
        assert!(validate(Kind::Group, &json!({"schemas":[GROUP_SCHEMA]})).is_err());
    }

    #[test]
    fn capabilities_from_spc_are_defensive() {
        let c = Capabilities::from_spc(
            &json!({"patch":{"supported":true},"filter":{"supported":true,"maxResults":"x"}}),
        );
        assert!(c.patch && c.filter && !c.bulk);
        assert_eq!(c.filter_max_results, 100);
        assert_eq!(
            Capabilities::from_spc(&json!("garbage")),
            Capabilities::conservative()
        );
    }
}
