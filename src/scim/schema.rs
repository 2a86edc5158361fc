//! RFC 7643 schemas as data, and validation of a resource against them before it is sent:
//! the core User (§4.1) and Group (§4.2) schemas and the Enterprise User extension (§4.3).
//! Every violation is reported, by attribute path.

use serde_json::{Map, Value};

use crate::directory::Kind;

use super::{ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, USER_SCHEMA};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Type {
    String,
    Boolean,
    Integer,
    Decimal,
    DateTime,
    Reference,
    Binary,
    Complex(&'static [Attr]),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attr {
    pub name: &'static str,
    pub ty: Type,
    pub multi: bool,
    pub required: bool,
    /// Set by the service provider; a client must not send it.
    pub read_only: bool,
}

const fn a(name: &'static str, ty: Type) -> Attr {
    Attr {
        name,
        ty,
        multi: false,
        required: false,
        read_only: false,
    }
}
const fn multi(name: &'static str, ty: Type) -> Attr {
    Attr {
        name,
        ty,
        multi: true,
        required: false,
        read_only: false,
    }
}
const fn required(name: &'static str, ty: Type) -> Attr {
    Attr {
        name,
        ty,
        multi: false,
        required: true,
        read_only: false,
    }
}
const fn read_only(name: &'static str, ty: Type, is_multi: bool) -> Attr {
    Attr {
        name,
        ty,
        multi: is_multi,
        required: false,
        read_only: true,
    }
}

use Type::*;

/// Sub-attributes of the usual multi-valued attributes (emails, phoneNumbers, ...).
const PLURAL: &[Attr] = &[
    required("value", String),
    a("display", String),
    a("type", String),
    a("primary", Boolean),
];
const PLURAL_REF: &[Attr] = &[
    required("value", Reference),
    a("display", String),
    a("type", String),
    a("primary", Boolean),
];
const PLURAL_BINARY: &[Attr] = &[
    required("value", Binary),
    a("display", String),
    a("type", String),
    a("primary", Boolean),
];
const NAME: &[Attr] = &[
    a("formatted", String),
    a("familyName", String),
    a("givenName", String),
    a("middleName", String),
    a("honorificPrefix", String),
    a("honorificSuffix", String),
];
const ADDRESS: &[Attr] = &[
    a("formatted", String),
    a("streetAddress", String),
    a("locality", String),
    a("region", String),
    a("postalCode", String),
    a("country", String),
    a("type", String),
    a("primary", Boolean),
];
const GROUP_REF: &[Attr] = &[
    required("value", String),
    a("$ref", Reference),
    a("display", String),
    a("type", String),
];
const MEMBER: &[Attr] = &[
    required("value", String),
    a("$ref", Reference),
    a("display", String),
    a("type", String),
];
const META: &[Attr] = &[
    a("resourceType", String),
    a("created", DateTime),
    a("lastModified", DateTime),
    a("location", Reference),
    a("version", String),
];

/// Attributes every resource has (RFC 7643 §3.1).
const COMMON: &[Attr] = &[
    read_only("id", String, false),
    a("externalId", String),
    read_only("meta", Complex(META), false),
];

pub const USER: &[Attr] = &[
    required("userName", String),
    a("name", Complex(NAME)),
    a("displayName", String),
    a("nickName", String),
    a("profileUrl", Reference),
    a("title", String),
    a("userType", String),
    a("preferredLanguage", String),
    a("locale", String),
    a("timezone", String),
    a("active", Boolean),
    a("password", String),
    multi("emails", Complex(PLURAL)),
    multi("phoneNumbers", Complex(PLURAL)),
    multi("ims", Complex(PLURAL)),
    multi("photos", Complex(PLURAL_REF)),
    multi("addresses", Complex(ADDRESS)),
    read_only("groups", Complex(GROUP_REF), true),
    multi("entitlements", Complex(PLURAL)),
    multi("roles", Complex(PLURAL)),
    multi("x509Certificates", Complex(PLURAL_BINARY)),
];

pub const GROUP: &[Attr] = &[
    required("displayName", String),
    multi("members", Complex(MEMBER)),
];

const MANAGER: &[Attr] = &[
    a("value", String),
    a("$ref", Reference),
    read_only("displayName", String, false),
];

pub const ENTERPRISE_USER: &[Attr] = &[
    a("employeeNumber", String),
    a("costCenter", String),
    a("organization", String),
    a("division", String),
    a("department", String),
    a("manager", Complex(MANAGER)),
];

fn find<'a>(attrs: &'a [Attr], name: &str) -> Option<&'a Attr> {
    attrs.iter().find(|x| x.name.eq_ignore_ascii_case(name))
}

/// Adds to `schemas` every extension URN the resource uses but does not list.
pub fn list_extensions(doc: &mut Value) {
    let Some(obj) = doc.as_object_mut() else {
        return;
    };
    let used: Vec<std::string::String> = obj
        .keys()
        .filter(|k| k.starts_with("urn:"))
        .cloned()
        .collect();
    if used.is_empty() {
        return;
    }
    let schemas = obj
        .entry("schemas")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(list) = schemas {
        for urn in used {
            if !list.iter().any(|s| s.as_str() == Some(urn.as_str())) {
                list.push(Value::String(urn));
            }
        }
    }
}

/// Checks a resource against the core schema of `kind` (and the Enterprise User extension);
/// returns every violation as "attribute path: problem".
pub fn validate(kind: Kind, doc: &Value) -> Result<(), Vec<std::string::String>> {
    let mut errs = Vec::new();
    let Some(obj) = doc.as_object() else {
        return Err(vec!["resource: must be a JSON object".into()]);
    };
    let (base, attrs) = match kind {
        Kind::User => (USER_SCHEMA, USER),
        Kind::Group => (GROUP_SCHEMA, GROUP),
    };
    let listed: Vec<&str> = match obj.get("schemas") {
        Some(Value::Array(s)) => {
            let names: Vec<&str> = s.iter().filter_map(Value::as_str).collect();
            if names.len() != s.len() {
                errs.push("schemas: every entry must be a string".into());
            }
            if !names.contains(&base) {
                errs.push(format!("schemas: must list {base}"));
            }
            names
        }
        Some(_) => {
            errs.push("schemas: must be an array of URNs".into());
            Vec::new()
        }
        None => {
            errs.push(format!("schemas: required, must list {base}"));
            Vec::new()
        }
    };
    for attr in attrs.iter().filter(|x| x.required) {
        if !obj.keys().any(|k| k.eq_ignore_ascii_case(attr.name)) {
            errs.push(format!("{}: required", attr.name));
        }
    }
    for (k, v) in obj {
        if k == "schemas" {
            continue;
        }
        if k.starts_with("urn:") {
            if !listed.contains(&k.as_str()) {
                errs.push(format!("{k}: extension used but not listed in schemas"));
            }
            let Some(ext) = v.as_object() else {
                errs.push(format!("{k}: must be an object"));
                continue;
            };
            if kind == Kind::User && k == ENTERPRISE_USER_SCHEMA {
                check_members(&At::Top(k), ext, ENTERPRISE_USER, ':', &mut errs);
            }
            // Other extensions are the target's own; its /Schemas can check them
            // (schema_check).
            continue;
        }
        match find(attrs, k).or_else(|| find(COMMON, k)) {
            Some(attr) if attr.read_only => {
                errs.push(format!("{k}: read-only, set by the service provider"))
            }
            Some(attr) => check_value(&At::Top(k), v, attr, &mut errs),
            None => errs.push(format!("{k}: unknown attribute of {base}")),
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// Where a value sits in a resource, written out only into an error: most resources are
/// valid, and formatting every attribute's path was more than half of validating one.
enum At<'a> {
    Top(&'a str),
    Member(&'a At<'a>, char, &'a str),
    Item(&'a At<'a>, usize),
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Top(k) => f.write_str(k),
            At::Member(parent, sep, k) => write!(f, "{parent}{sep}{k}"),
            At::Item(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn check_members(
    path: &At<'_>,
    obj: &Map<std::string::String, Value>,
    attrs: &[Attr],
    sep: char,
    errs: &mut Vec<std::string::String>,
) {
    for attr in attrs.iter().filter(|x| x.required) {
        if !obj.keys().any(|k| k.eq_ignore_ascii_case(attr.name)) {
            errs.push(format!("{path}{sep}{}: required", attr.name));
        }
    }
    for (k, v) in obj {
        let p = At::Member(path, sep, k);
        match find(attrs, k) {
            Some(attr) if attr.read_only => {
                errs.push(format!("{p}: read-only, set by the service provider"))
            }
            Some(attr) => check_value(&p, v, attr, errs),
            None => errs.push(format!("{p}: unknown sub-attribute")),
        }
    }
}

fn check_value(path: &At<'_>, v: &Value, attr: &Attr, errs: &mut Vec<std::string::String>) {
    if attr.multi {
        let Some(items) = v.as_array() else {
            errs.push(format!("{path}: must be an array (multi-valued)"));
            return;
        };
        let mut primaries = 0;
        for (i, item) in items.iter().enumerate() {
            check_single(&At::Item(path, i), item, attr, errs);
            if item.get("primary") == Some(&Value::Bool(true)) {
                primaries += 1;
            }
        }
        if primaries > 1 {
            errs.push(format!(
                "{path}: at most one value may be primary, found {primaries}"
            ));
        }
    } else {
        if v.is_array() {
            errs.push(format!("{path}: must be a single value, not an array"));
            return;
        }
        check_single(path, v, attr, errs);
    }
}

fn check_single(path: &At<'_>, v: &Value, attr: &Attr, errs: &mut Vec<std::string::String>) {
    let ok = match attr.ty {
        String | Reference => match v.as_str() {
            Some(s) if attr.required && s.trim().is_empty() => {
                errs.push(format!("{path}: required, must not be empty"));
                return;
            }
            Some(_) => true,
            None => false,
        },
        Binary => v.as_str().is_some_and(is_base64),
        Boolean => v.is_boolean(),
        Integer => v.is_i64() || v.is_u64(),
        Decimal => v.is_number(),
        DateTime => v
            .as_str()
            .is_some_and(|s| s.parse::<jiff::Timestamp>().is_ok()),
        Complex(subs) => match v.as_object() {
            Some(m) => {
                check_members(path, m, subs, '.', errs);
                true
            }
            None => false,
        },
    };
    if !ok {
        let want = match attr.ty {
            String => "a string",
            Reference => "a reference (string)",
            Binary => "base64 text",
            Boolean => "a boolean",
            Integer => "an integer",
            Decimal => "a number",
            DateTime => "an RFC 3339 date-time such as 2024-01-31T12:00:00Z",
            Complex(_) => "an object",
        };
        errs.push(format!("{path}: must be {want}, found {}", describe(v)));
    }
}

fn describe(v: &Value) -> std::string::String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<std::string::String>())
    } else {
        s
    }
}

fn is_base64(s: &str) -> bool {
    let t = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// What a target says its resources look like (its `/Schemas`), for `schema_check`.
#[derive(Debug, Clone, Default)]
pub struct TargetSchemas {
    /// Lower-cased schema id → lower-cased attribute names (top level, and `parent.sub`).
    by_id: std::collections::HashMap<
        std::string::String,
        std::collections::HashSet<std::string::String>,
    >,
}

impl TargetSchemas {
    /// Reads a `/Schemas` ListResponse (or a bare array); None when it holds no usable schema.
    pub fn from_response(v: &Value) -> Option<TargetSchemas> {
        let list = v
            .get("Resources")
            .and_then(Value::as_array)
            .or_else(|| v.as_array())?;
        let mut by_id = std::collections::HashMap::new();
        for s in list {
            let (Some(id), Some(attrs)) = (
                s.get("id").and_then(Value::as_str),
                s.get("attributes").and_then(Value::as_array),
            ) else {
                continue;
            };
            let mut names = std::collections::HashSet::new();
            for at in attrs {
                let Some(n) = at.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let n = n.to_ascii_lowercase();
                if let Some(subs) = at.get("subAttributes").and_then(Value::as_array) {
                    for sub in subs
                        .iter()
                        .filter_map(|x| x.get("name").and_then(Value::as_str))
                    {
                        names.insert(format!("{n}.{}", sub.to_ascii_lowercase()));
                    }
                }
                names.insert(n);
            }
            by_id.insert(id.to_ascii_lowercase(), names);
        }
        (!by_id.is_empty()).then_some(TargetSchemas { by_id })
    }

    /// Attributes of `doc` that the target's schemas do not declare.
    pub fn undeclared(&self, kind: Kind, doc: &Value) -> Vec<std::string::String> {
        let base = match kind {
            Kind::User => USER_SCHEMA,
            Kind::Group => GROUP_SCHEMA,
        };
        let mut out = Vec::new();
        let Some(obj) = doc.as_object() else {
            return out;
        };
        let mut check = |schema: &str, prefix: &str, m: &Map<std::string::String, Value>| {
            let Some(names) = self.by_id.get(&schema.to_ascii_lowercase()) else {
                out.push(format!("{schema}: the target publishes no such schema"));
                return;
            };
            for (k, v) in m {
                let lk = k.to_ascii_lowercase();
                if matches!(lk.as_str(), "schemas" | "id" | "externalid" | "meta")
                    || k.starts_with("urn:")
                {
                    continue;
                }
                if !names.contains(&lk) {
                    out.push(format!("{prefix}{k}: not in the target's schema {schema}"));
                    continue;
                }
                let subs: Vec<&std::string::String> = match v {
                    Value::Object(o) => o.keys().collect(),
                    Value::Array(items) => items
                        .iter()
                        .filter_map(Value::as_object)
                        .flat_map(|o| o.keys())
                        .collect(),
                    _ => Vec::new(),
                };
                let declares_subs = names.iter().any(|n| n.starts_with(&format!("{lk}.")));
                for sub in subs {
                    let full = format!("{lk}.{}", sub.to_ascii_lowercase());
                    if declares_subs
                        && !names.contains(&full)
                        && !out
                            .iter()
                            .any(|e| e.starts_with(&format!("{prefix}{k}.{sub}:")))
                    {
                        out.push(format!(
                            "{prefix}{k}.{sub}: not in the target's schema {schema}"
                        ));
                    }
                }
            }
        };
        check(base, "", obj);
        for (k, v) in obj.iter().filter(|(k, _)| k.starts_with("urn:")) {
            if let Some(m) = v.as_object() {
                check(k, &format!("{k}:"), m);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(extra: Value) -> Value {
        let mut u = json!({"schemas": [USER_SCHEMA], "userName": "alice"});
        crate::mapping::deep_merge(&mut u, extra);
        u
    }

    #[test]
    fn valid_resources() {
        let cases = [
            user(json!({})),
            user(json!({
                "name": {"givenName": "A", "familyName": "B"},
                "emails": [{"value": "a@x", "primary": true}, {"value": "b@x", "type": "home"}],
                "active": false,
                "addresses": [{"locality": "Paris", "country": "FR"}],
                "x509Certificates": [{"value": "TUlJ"}],
                "profileUrl": "https://x/a",
            })),
            {
                let mut u = user(json!({
                    ENTERPRISE_USER_SCHEMA: {"department": "R&D", "manager": {"value": "m-1"}}
                }));
                list_extensions(&mut u);
                u
            },
        ];
        for c in cases {
            assert_eq!(validate(Kind::User, &c), Ok(()), "{c}");
        }
        let g = json!({"schemas": [GROUP_SCHEMA], "displayName": "G", "members": [{"value": "u"}]});
        assert_eq!(validate(Kind::Group, &g), Ok(()));
    }

    #[test]
    fn each_violation_is_named() {
        let cases: Vec<(Kind, Value, &str)> = vec![
            (
                Kind::User,
                json!({"schemas": [USER_SCHEMA]}),
                "userName: required",
            ),
            (
                Kind::User,
                user(json!({"userName": " "})),
                "userName: required, must not be empty",
            ),
            (
                Kind::User,
                user(json!({"userName": 7})),
                "userName: must be a string, found 7",
            ),
            (Kind::User, json!({"userName": "a"}), "schemas: required"),
            (
                Kind::User,
                json!({"schemas": [GROUP_SCHEMA], "userName": "a"}),
                "schemas: must list urn:ietf:params:scim:schemas:core:2.0:User",
            ),
            (
                Kind::User,
                user(json!({"active": "yes"})),
                "active: must be a boolean",
            ),
            (
                Kind::User,
                user(json!({"usrName": "x"})),
                "usrName: unknown attribute",
            ),
            (
                Kind::User,
                user(json!({"name": {"given": "x"}})),
                "name.given: unknown sub-attribute",
            ),
            (
                Kind::User,
                user(json!({"name": "Alice"})),
                "name: must be an object",
            ),
            (
                Kind::User,
                user(json!({"emails": {"value": "a"}})),
                "emails: must be an array",
            ),
            (
                Kind::User,
                user(json!({"emails": [{"type": "work"}]})),
                "emails[0].value: required",
            ),
            (
                Kind::User,
                user(
                    json!({"emails": [{"value": "a", "primary": true}, {"value": "b", "primary": true}]}),
                ),
                "emails: at most one value may be primary, found 2",
            ),
            (
                Kind::User,
                user(json!({"emails": [{"value": "a", "primary": "yes"}]})),
                "emails[0].primary: must be a boolean",
            ),
            (
                Kind::User,
                user(json!({"title": ["a"]})),
                "title: must be a single value",
            ),
            (
                Kind::User,
                user(json!({"x509Certificates": [{"value": "not base64!"}]})),
                "x509Certificates[0].value: must be base64",
            ),
            (Kind::User, user(json!({"id": "x"})), "id: read-only"),
            (Kind::User, user(json!({"groups": []})), "groups: read-only"),
            (
                Kind::User,
                user(json!({"meta": {"created": "yesterday"}})),
                "meta: read-only",
            ),
            (
                Kind::User,
                user(json!({ENTERPRISE_USER_SCHEMA: {"department": "x"}})),
                "extension used but not listed",
            ),
            (
                Kind::User,
                {
                    let mut u = user(
                        json!({ENTERPRISE_USER_SCHEMA: {"dept": "x", "manager": {"displayName": "B"}}}),
                    );
                    list_extensions(&mut u);
                    u
                },
                "enterprise:2.0:User:dept: unknown sub-attribute",
            ),
            (
                Kind::User,
                {
                    let mut u =
                        user(json!({ENTERPRISE_USER_SCHEMA: {"manager": {"displayName": "B"}}}));
                    list_extensions(&mut u);
                    u
                },
                "manager.displayName: read-only",
            ),
            (
                Kind::Group,
                json!({"schemas": [GROUP_SCHEMA]}),
                "displayName: required",
            ),
            (
                Kind::Group,
                json!({"schemas": [GROUP_SCHEMA], "displayName": "G", "members": [{"display": "x"}]}),
                "members[0].value: required",
            ),
        ];
        for (kind, doc, needle) in cases {
            let errs = validate(kind, &doc).expect_err(needle);
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle:?} not in {errs:?}"
            );
        }
        // Several problems are all reported at once.
        let errs = validate(
            Kind::User,
            &user(json!({"userName": "", "active": 1, "nick": 2})),
        )
        .expect_err("three problems");
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn every_type_is_checked() {
        let cases: Vec<(Type, Value, bool)> = vec![
            (Integer, json!(42), true),
            (Integer, json!(4.2), false),
            (Integer, json!("42"), false),
            (Decimal, json!(4.2), true),
            (Decimal, json!(4), true),
            (Decimal, json!("4.2"), false),
            (DateTime, json!("2024-01-31T12:00:00Z"), true),
            (DateTime, json!("2024-01-31T12:00:00+02:00"), true),
            (DateTime, json!("31/01/2024"), false),
            (Reference, json!("https://x/Users/1"), true),
            (Reference, json!(1), false),
            (Binary, json!("TUlJQw=="), true),
            (Binary, json!("MII?"), false),
            (Boolean, json!(false), true),
            (Boolean, json!("false"), false),
            (String, json!("x"), true),
            (String, json!(null), false),
            (Complex(NAME), json!({"givenName": "A"}), true),
            (Complex(NAME), json!([]), false),
        ];
        for (ty, v, ok) in cases {
            let mut errs = Vec::new();
            check_value(&At::Top("x"), &v, &a("x", ty), &mut errs);
            assert_eq!(errs.is_empty(), ok, "{ty:?} {v}: {errs:?}");
        }
        let mut errs = Vec::new();
        check_value(
            &At::Top("tags"),
            &json!([1, "a"]),
            &multi("tags", Integer),
            &mut errs,
        );
        assert_eq!(errs, vec!["tags[1]: must be an integer, found \"a\""]);
    }

    #[test]
    fn target_schemas_flag_undeclared_attributes() {
        let published = json!({"Resources": [{
            "id": USER_SCHEMA,
            "attributes": [
                {"name": "userName"},
                {"name": "name", "subAttributes": [{"name": "givenName"}, {"name": "familyName"}]},
                {"name": "emails", "subAttributes": [{"name": "value"}, {"name": "primary"}]}
            ]
        }]});
        let ts = TargetSchemas::from_response(&published).expect("usable");
        let doc = user(json!({
            "name": {"givenName": "A", "formatted": "A B"},
            "emails": [{"value": "a", "type": "work"}],
            "title": "x",
            ENTERPRISE_USER_SCHEMA: {"department": "d"}
        }));
        let out = ts.undeclared(Kind::User, &doc);
        assert_eq!(
            out,
            vec![
                "name.formatted: not in the target's schema urn:ietf:params:scim:schemas:core:2.0:User",
                "emails.type: not in the target's schema urn:ietf:params:scim:schemas:core:2.0:User",
                "title: not in the target's schema urn:ietf:params:scim:schemas:core:2.0:User",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User: the target publishes no such schema",
            ]
        );
        assert!(TargetSchemas::from_response(&json!({"Resources": []})).is_none());
    }
}
