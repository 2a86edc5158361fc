//! RFC 7643/7644 wire types and pure helpers: error bodies, PatchOp, ServiceProviderConfig,
//! filters, resource diffs and core-schema validation. Nothing here knows vendors or storage.

pub mod schema;

pub use schema::validate;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::mapping::{GROUP_SCHEMA, USER_SCHEMA};

pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub const LIST_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
pub const BULK_REQUEST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
pub const BULK_RESPONSE_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:BulkResponse";
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
    /// Bytes a bulk request may have.
    pub bulk_max_payload: u64,
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
            bulk_max_payload: 0,
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
            bulk_max_payload: v
                .get("bulk")
                .and_then(|o| o.get("maxPayloadSize"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
            etag: flag("etag"),
        }
    }
}

/// One operation of a bulk request (RFC 7644 §3.7).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BulkOperation {
    pub method: &'static str,
    pub path: String,
    #[serde(rename = "bulkId")]
    pub bulk_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// The target's answer to one bulk operation.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkAnswer {
    pub bulk_id: Option<String>,
    pub status: u16,
    /// The resource's id: from the answer's resource, else from its location.
    pub id: Option<String>,
    /// The error detail of a failed operation.
    pub detail: String,
}

pub fn bulk_body(ops: &[BulkOperation]) -> Value {
    serde_json::json!({ "schemas": [BULK_REQUEST_SCHEMA], "Operations": ops })
}

/// The answers of a BulkResponse, read defensively: `status` as a string ("201", as RFC 7644
/// writes it), a number, or an object with `code` (as some servers do).
pub fn bulk_answers(v: &Value) -> Vec<BulkAnswer> {
    let ops = v.get("Operations").and_then(Value::as_array);
    ops.map(|ops| {
        ops.iter()
            .map(|o| {
                let status = match o.get("status") {
                    Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
                    Some(Value::Number(n)) => n.as_u64().unwrap_or(0) as u16,
                    Some(Value::Object(m)) => m
                        .get("code")
                        .and_then(|c| c.as_u64().or_else(|| c.as_str()?.parse().ok()))
                        .unwrap_or(0) as u16,
                    _ => 0,
                };
                let response = o.get("response");
                let id = response
                    .and_then(|r| r.get("id"))
                    .and_then(Value::as_str)
                    .or_else(|| {
                        let loc = o.get("location").and_then(Value::as_str)?;
                        loc.trim_end_matches('/').rsplit('/').next()
                    })
                    .filter(|id| !id.is_empty())
                    .map(str::to_string);
                let detail = response
                    .and_then(|r| r.get("detail"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                BulkAnswer {
                    bulk_id: o.get("bulkId").and_then(Value::as_str).map(str::to_string),
                    status,
                    id,
                    detail,
                }
            })
            .collect()
    })
    .unwrap_or_default()
}

/// `attr eq "value"` with the value escaped as a JSON string (RFC 7644 §3.4.2.2).
pub fn eq_filter(attr: &str, value: &str) -> String {
    format!("{attr} eq {}", Value::String(value.to_string()))
}

/// The attributes (and their values in `resource`) that identify an existing remote object,
/// in lookup order.
pub fn match_keys(kind: crate::directory::Kind, resource: &Value) -> Vec<(&'static str, String)> {
    let keys: &[&'static str] = match kind {
        crate::directory::Kind::User => &["userName", "externalId"],
        crate::directory::Kind::Group => &["externalId", "displayName"],
    };
    keys.iter()
        .filter_map(|k| {
            resource
                .get(*k)
                .and_then(Value::as_str)
                .map(|v| (*k, v.to_string()))
        })
        .collect()
}

/// The lookup filters for `resource`, in order.
pub fn match_filters(kind: crate::directory::Kind, resource: &Value) -> Vec<String> {
    match_keys(kind, resource)
        .iter()
        .map(|(k, v)| eq_filter(k, v))
        .collect()
}

/// Whether `remote` has `key` = `value` (userName and displayName compare case-insensitively,
/// as RFC 7643 defines them; externalId exactly).
pub fn has_identity(remote: &Value, key: &str, value: &str) -> bool {
    remote.get(key).and_then(Value::as_str).is_some_and(|r| {
        if key == "externalId" {
            r == value
        } else {
            r.eq_ignore_ascii_case(value)
        }
    })
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

/// How a target wants group member values written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberForm {
    /// `type` on every member (e.g. "user").
    pub member_type: Option<&'static str>,
    /// When set, `$ref` = this base + "/Users/" + id on every member.
    pub ref_base: Option<String>,
}

impl MemberForm {
    /// `members` values for these remote user ids.
    pub fn values(&self, ids: &[String]) -> Value {
        Value::Array(
            ids.iter()
                .map(|id| {
                    let mut m = serde_json::Map::new();
                    m.insert("value".into(), Value::String(id.clone()));
                    if let Some(t) = self.member_type {
                        m.insert("type".into(), Value::String(t.into()));
                    }
                    if let Some(base) = &self.ref_base {
                        m.insert("$ref".into(), Value::String(format!("{base}/Users/{id}")));
                    }
                    Value::Object(m)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bulk_answers_are_read_in_every_shape_servers_send() {
        let v = json!({"Operations": [
            {"bulkId": "a", "status": "201", "location": "https://x/scim/v2/Users/92b7/"},
            {"bulkId": "b", "status": 409, "response": {"detail": "exists", "status": "409"}},
            {"bulkId": "c", "status": {"code": "200"}, "response": {"id": "r-c"}},
            {"status": "garbage"}
        ]});
        let a = bulk_answers(&v);
        assert_eq!(a.len(), 4);
        assert_eq!((a[0].status, a[0].id.as_deref()), (201, Some("92b7")));
        assert_eq!(
            (a[1].status, a[1].detail.as_str(), a[1].id.as_deref()),
            (409, "exists", None)
        );
        assert_eq!((a[2].status, a[2].id.as_deref()), (200, Some("r-c")));
        assert_eq!((a[3].status, a[3].bulk_id.as_deref()), (0, None));
        assert!(bulk_answers(&json!({"no": "ops"})).is_empty());
    }

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
