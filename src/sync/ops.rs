//! Pure pieces of the engine: the PATCH requests for a change, and vendor shaping of a
//! resource. No I/O here, so all of it is tested directly.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::scim::{self, PatchOperation};

/// PATCH operations per request.
const OPS_PER_REQUEST: usize = 100;

/// How member changes may be sent to a target.
#[derive(Debug, Clone)]
pub struct MemberPolicy {
    /// Member values in one request.
    pub max_per_request: usize,
    /// Whether `replace` of `members` is accepted (used when the remote set is unknown).
    pub replace: bool,
    pub form: scim::MemberForm,
}

impl Default for MemberPolicy {
    fn default() -> Self {
        Self {
            max_per_request: 1000,
            replace: true,
            form: scim::MemberForm::default(),
        }
    }
}

/// The PATCH requests that bring a resource and its members from what was sent to what is
/// wanted: attribute changes first, then member adds and removes, at most
/// `max_per_request` member values and `OPS_PER_REQUEST` operations per request.
pub fn patch_requests(
    prev: Option<&Value>,
    desired: &Value,
    prev_members: Option<&[String]>,
    members: Option<&[String]>,
    policy: &MemberPolicy,
) -> Vec<Vec<PatchOperation>> {
    let empty = Value::Object(Default::default());
    let attr_ops = scim::diff_ops(prev.unwrap_or(&empty), desired);
    let mut requests: Vec<Vec<PatchOperation>> = attr_ops
        .chunks(OPS_PER_REQUEST)
        .map(<[_]>::to_vec)
        .collect();
    let Some(want) = members else {
        return requests;
    };
    let (add, remove): (Vec<String>, Vec<&String>) = match prev_members {
        Some(had) => {
            let had_set: BTreeSet<&String> = had.iter().collect();
            let want_set: BTreeSet<&String> = want.iter().collect();
            (
                want.iter()
                    .filter(|m| !had_set.contains(m))
                    .cloned()
                    .collect(),
                had.iter().filter(|m| !want_set.contains(m)).collect(),
            )
        }
        None if policy.replace && want.len() <= policy.max_per_request => {
            let op = PatchOperation::replace("members", policy.form.values(want));
            match requests.last_mut() {
                Some(last) if last.len() < OPS_PER_REQUEST => last.push(op),
                _ => requests.push(vec![op]),
            }
            return requests;
        }
        // The remote set is unknown and cannot be replaced: add every member (adding one
        // that is there already changes nothing).
        None => (want.to_vec(), Vec::new()),
    };
    let max = policy.max_per_request.max(1);
    // Member values already in the last request.
    let mut values = 0;
    let mut push = |requests: &mut Vec<Vec<PatchOperation>>, op: PatchOperation, n: usize| {
        let fits = requests
            .last()
            .is_some_and(|last| last.len() < OPS_PER_REQUEST && values + n <= max);
        if !fits {
            requests.push(Vec::new());
            values = 0;
        }
        values += n;
        if let Some(last) = requests.last_mut() {
            last.push(op);
        }
    };
    for chunk in add.chunks(max) {
        let op = PatchOperation::add("members", policy.form.values(chunk));
        push(&mut requests, op, chunk.len());
    }
    for m in remove {
        let path = format!("members[value eq {}]", Value::String(m.clone()));
        push(&mut requests, PatchOperation::remove(&path), 1);
    }
    requests
}

/// Keeps one value of every multi-valued attribute (the primary one, else the first) and
/// marks it primary, for targets that take exactly one.
pub fn keep_one_value(doc: &mut Value) {
    let Some(obj) = doc.as_object_mut() else {
        return;
    };
    for (k, v) in obj.iter_mut() {
        if k == "schemas" || k == "members" {
            continue;
        }
        if let Value::Array(items) = v
            && items.len() > 1
        {
            let pick = items
                .iter()
                .position(|x| x.get("primary") == Some(&Value::Bool(true)))
                .unwrap_or(0);
            let one = items.swap_remove(pick);
            *items = vec![one];
        }
        if let Value::Array(items) = v
            && let Some(Value::Object(first)) = items.first_mut()
            && first.contains_key("value")
        {
            first.insert("primary".into(), Value::Bool(true));
        }
    }
}

/// The name attributes a target requiring names misses: name.givenName, name.familyName,
/// displayName (each non-empty).
pub fn missing_names(doc: &Value) -> Vec<&'static str> {
    let present = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .is_some_and(|s| !s.trim().is_empty())
    };
    let mut out = Vec::new();
    if !present(doc.get("name").and_then(|n| n.get("givenName"))) {
        out.push("name.givenName");
    }
    if !present(doc.get("name").and_then(|n| n.get("familyName"))) {
        out.push("name.familyName");
    }
    if !present(doc.get("displayName")) {
        out.push("displayName");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn member_deltas_are_adds_and_removes() {
        let g = json!({"schemas":[scim::GROUP_SCHEMA],"displayName":"G"});
        let had = vec!["a".to_string(), "b".to_string()];
        let want = vec!["b".to_string(), "c".to_string()];
        let reqs = patch_requests(
            Some(&g),
            &g,
            Some(&had),
            Some(&want),
            &MemberPolicy::default(),
        );
        assert_eq!(
            reqs,
            vec![vec![
                PatchOperation::add("members", json!([{"value":"c"}])),
                PatchOperation::remove("members[value eq \"a\"]"),
            ]]
        );
        assert!(
            patch_requests(
                Some(&g),
                &g,
                Some(&want),
                Some(&want),
                &MemberPolicy::default()
            )
            .is_empty()
        );
    }

    #[test]
    fn one_value_per_attribute_keeps_the_primary() {
        let mut doc = json!({
            "schemas": ["s1", "s2"],
            "emails": [{"value": "a"}, {"value": "b", "primary": true}],
            "phoneNumbers": [{"value": "1"}, {"value": "2"}],
            "userName": "x"
        });
        keep_one_value(&mut doc);
        assert_eq!(doc["emails"], json!([{"value": "b", "primary": true}]));
        assert_eq!(
            doc["phoneNumbers"],
            json!([{"value": "1", "primary": true}])
        );
        assert_eq!(doc["schemas"], json!(["s1", "s2"]));
        assert_eq!(
            missing_names(&doc),
            vec!["name.givenName", "name.familyName", "displayName"]
        );
        let named = json!({"name": {"givenName": "A", "familyName": "B"}, "displayName": "A B"});
        assert!(missing_names(&named).is_empty());
    }

    #[test]
    fn member_changes_respect_the_per_request_limit() {
        let g = json!({"displayName":"G"});
        let want: Vec<String> = (0..250).map(|i| format!("u{i:03}")).collect();
        let had: Vec<String> = (0..30).map(|i| format!("x{i:02}")).collect();
        let aws = MemberPolicy {
            max_per_request: 100,
            replace: false,
            form: scim::MemberForm::default(),
        };
        let reqs = patch_requests(Some(&g), &g, Some(&had), Some(&want), &aws);
        let values: Vec<usize> = reqs
            .iter()
            .map(|r| {
                r.iter()
                    .map(|op| {
                        op.value
                            .as_ref()
                            .and_then(Value::as_array)
                            .map_or(1, Vec::len)
                    })
                    .sum()
            })
            .collect();
        assert_eq!(
            values,
            vec![100, 100, 80],
            "250 adds then 30 removes, 100 a request"
        );
        assert!(reqs.iter().flatten().all(|op| op.op != "replace"));
        // Unknown remote members: replace where allowed, else add them all.
        let reqs = patch_requests(
            Some(&g),
            &g,
            None,
            Some(&want[..3]),
            &MemberPolicy::default(),
        );
        assert_eq!(reqs[0][0].op, "replace");
        let reqs = patch_requests(Some(&g), &g, None, Some(&want[..3]), &aws);
        assert_eq!(reqs[0][0].op, "add");
        let webex = MemberPolicy {
            form: scim::MemberForm {
                member_type: Some("user"),
                ref_base: Some("https://t/scim/v2".into()),
            },
            ..MemberPolicy::default()
        };
        let reqs = patch_requests(Some(&g), &g, Some(&[]), Some(&want[..1]), &webex);
        assert_eq!(
            reqs[0][0].value,
            Some(
                json!([{"value": "u000", "type": "user", "$ref": "https://t/scim/v2/Users/u000"}])
            )
        );
    }
}
