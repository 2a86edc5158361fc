//! Directory objects (the source of truth) and the JSON Lines import/export format.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub id: String,
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    #[serde(default = "yes")]
    pub active: bool,
    #[serde(default)]
    pub service_account: bool,
    #[serde(default)]
    pub attributes: Map<String, Value>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub attributes: Map<String, Value>,
}

impl User {
    /// Hash of everything a mapping can see, so unchanged rows are not rewritten on import.
    pub fn content_hash(&self) -> String {
        hash_json(&serde_json::to_value(self).unwrap_or(Value::Null))
    }
}

impl Group {
    /// Hash of the group's own fields; members live in their own table.
    pub fn content_hash(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(m) = v.as_object_mut() {
            m.remove("members");
        }
        hash_json(&v)
    }
}

/// A JSON value's compact text, written straight into bytes (`Value`'s `Display`, behind
/// `to_string()`, goes through a formatter a piece at a time: twice the cost).
pub fn json_text(v: &Value) -> String {
    // Serializing a `Value` cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

/// Lower-case hex of a digest. `hex::encode` builds its text a `char` at a time (2.5% of the
/// engine's instructions in a first sync, a few digests an object); writing into a buffer of
/// the right size costs next to nothing.
pub fn hex_lower(bytes: &[u8]) -> String {
    let mut buf = vec![0u8; bytes.len() * 2];
    // The buffer is exactly twice the input, and hex digits are ASCII: neither can fail.
    let _ = hex::encode_to_slice(bytes, &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Lets serde write into a digest through a buffer: serde_json writes a value in many small
/// pieces (quotes, separators, each string), and each `update` of SHA-256 costs more than
/// copying a piece. The bytes the digest sees are the same, so are the hashes.
pub struct DigestWriter<'a> {
    digest: &'a mut Sha256,
    buf: Vec<u8>,
}

impl<'a> DigestWriter<'a> {
    const FLUSH_AT: usize = 4096;

    pub fn new(digest: &'a mut Sha256) -> Self {
        DigestWriter {
            digest,
            buf: Vec::with_capacity(Self::FLUSH_AT),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= Self::FLUSH_AT {
            self.digest.update(&self.buf);
            self.buf.clear();
        }
    }

    /// Feeds what is still buffered; the digest is complete only after this.
    pub fn finish(self) {
        self.digest.update(&self.buf);
    }
}

impl std::io::Write for DigestWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of a JSON value with object keys sorted, so equal documents hash equally
/// whatever order their keys were built in.
pub fn hash_json(v: &Value) -> String {
    // Writing to the buffer cannot fail, and every `Value` serializes.
    fn canonical(v: &Value, out: &mut DigestWriter<'_>) {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<(&String, &Value)> = m.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                out.push(b"{");
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b",");
                    }
                    let _ = serde_json::to_writer(&mut *out, k);
                    out.push(b":");
                    canonical(v, out);
                }
                out.push(b"}");
            }
            Value::Array(a) => {
                out.push(b"[");
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b",");
                    }
                    canonical(x, out);
                }
                out.push(b"]");
            }
            other => {
                let _ = serde_json::to_writer(&mut *out, other);
            }
        }
    }
    let mut digest = Sha256::new();
    let mut out = DigestWriter::new(&mut digest);
    canonical(v, &mut out);
    out.finish();
    hex_lower(&digest.finalize())
}

/// One line of an import file.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    User(User),
    Group(Group),
    DeleteUser(String),
    DeleteGroup(String),
}

impl Record {
    pub fn kind_and_id(&self) -> (&'static str, &str) {
        match self {
            Record::User(u) => ("user", &u.id),
            Record::Group(g) => ("group", &g.id),
            Record::DeleteUser(id) => ("user", id),
            Record::DeleteGroup(id) => ("group", id),
        }
    }
}

/// Parses one JSON Lines record; the error text is meant to follow "line N: ".
pub fn parse_record(line: &str) -> Result<Record, String> {
    let mut v: Map<String, Value> = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let kind = match v.remove("kind") {
        Some(Value::String(k)) => k,
        Some(_) => return Err("\"kind\" must be \"user\" or \"group\"".into()),
        None => return Err("missing \"kind\" (\"user\" or \"group\")".into()),
    };
    let deleted = match v.remove("deleted") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err("\"deleted\" must be true or false".into()),
    };
    let id = match v.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(Value::String(_)) => return Err("\"id\" must not be empty".into()),
        Some(_) => return Err("\"id\" must be a string".into()),
        None => return Err("missing \"id\"".into()),
    };
    if deleted {
        if v.len() > 1 {
            let extra: Vec<&String> = v.keys().filter(|k| *k != "id").collect();
            return Err(format!(
                "a deletion carries only kind, id and deleted; found {extra:?}"
            ));
        }
        return match kind.as_str() {
            "user" => Ok(Record::DeleteUser(id)),
            "group" => Ok(Record::DeleteGroup(id)),
            other => Err(format!("unknown kind {other:?} (expected user or group)")),
        };
    }
    let obj = Value::Object(v);
    match kind.as_str() {
        "user" => {
            let u: User = serde_json::from_value(obj).map_err(|e| format!("user {id}: {e}"))?;
            if u.username.trim().is_empty() {
                return Err(format!("user {id}: \"username\" must not be empty"));
            }
            Ok(Record::User(u))
        }
        "group" => {
            let g: Group = serde_json::from_value(obj).map_err(|e| format!("group {id}: {e}"))?;
            if g.name.trim().is_empty() {
                return Err(format!("group {id}: \"name\" must not be empty"));
            }
            Ok(Record::Group(g))
        }
        other => Err(format!("unknown kind {other:?} (expected user or group)")),
    }
}

/// The export form of a user: the import format with `kind` first.
pub fn export_user(u: &User) -> Value {
    with_kind("user", serde_json::to_value(u).unwrap_or(Value::Null))
}

pub fn export_group(g: &Group) -> Value {
    with_kind("group", serde_json::to_value(g).unwrap_or(Value::Null))
}

fn with_kind(kind: &str, v: Value) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), Value::String(kind.into()));
    if let Value::Object(m) = v {
        out.extend(m);
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_whole() {
        assert_eq!(hex_lower(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex_lower(&[]), "");
        let digest = <Sha256 as sha2::Digest>::digest(b"scimsync");
        assert_eq!(hex_lower(&digest), hex::encode(digest));
    }

    #[test]
    fn parses_the_documented_lines() {
        let u = parse_record(r#"{"kind":"user","id":"u-1","username":"alice","email":"alice@example.com","name":"Alice Smith","given_name":"Alice","family_name":"Smith","active":true,"service_account":false,"attributes":{"locale":"en-US","phone":"+1 555 0100"}}"#).expect("user");
        let Record::User(u) = u else {
            panic!("not a user")
        };
        assert_eq!(u.username, "alice");
        assert_eq!(u.attributes["locale"], "en-US");
        let g = parse_record(
            r#"{"kind":"group","id":"g-1","name":"Engineering","members":["u-1"],"attributes":{}}"#,
        )
        .expect("group");
        assert_eq!(
            g,
            Record::Group(Group {
                id: "g-1".into(),
                name: "Engineering".into(),
                members: vec!["u-1".into()],
                attributes: Map::new()
            })
        );
        let d = parse_record(r#"{"kind":"user","id":"u-2","deleted":true}"#).expect("delete");
        assert_eq!(d, Record::DeleteUser("u-2".into()));
    }

    #[test]
    fn rejects_bad_lines_with_reasons() {
        let e = parse_record(r#"{"kind":"user","id":"u-1","username":"a","colour":"red"}"#)
            .expect_err("unknown key");
        assert!(e.contains("colour"), "{e}");
        let e = parse_record(r#"{"kind":"user","id":"u-1"}"#).expect_err("no username");
        assert!(e.contains("username"), "{e}");
        let e = parse_record(r#"{"kind":"robot","id":"r"}"#).expect_err("kind");
        assert!(e.contains("robot"), "{e}");
        assert!(parse_record("{not json").is_err());
    }

    #[test]
    fn hash_is_of_the_canonical_text() {
        // Recorded hashes must stay valid across versions: the text hashed is the object
        // with keys sorted and no spaces, as serde_json writes each value.
        let v: Value =
            serde_json::from_str(r#"{"b":{"d":[1,2.5,null,true],"c":"x\"y\u0001é"},"a":1}"#)
                .expect("json");
        assert_eq!(
            hash_json(&v),
            "eb4c391de9f02dd88b767b7f8c665a649b114995e14339de4969ee2a1cea48e9"
        );
    }

    #[test]
    fn long_documents_hash_their_whole_text() {
        // Longer than the digest writer's buffer: fed in several parts, hashed as one text.
        let v =
            serde_json::json!({"a": "x".repeat(5000), "b": ["y".repeat(4000), 1], "c": {"d": "z"}});
        let text = serde_json::to_vec(&v).expect("json");
        assert!(text.len() > 8192);
        assert_eq!(hash_json(&v), hex_lower(&Sha256::digest(&text)));
    }

    #[test]
    fn hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":[1,2]}}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"b":{"d":[1,2],"c":2},"a":1}"#).expect("json");
        assert_eq!(hash_json(&a), hash_json(&b));
    }
}

/// The two kinds of directory object, as stored in `sync_state.kind` and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    User,
    Group,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Group => "group",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A deterministic sample directory: `users` people (every 10th a service account) and
/// `groups` groups of about `members` users each. Used by `demo`, tests and benchmarks.
pub fn sample(users: usize, groups: usize, members: usize) -> Vec<Record> {
    const GIVEN: &[&str] = &[
        "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
        "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter",
        "Yasmin",
    ];
    const FAMILY: &[&str] = &[
        "Smith", "Jones", "Garcia", "Chen", "Okafor", "Novak", "Silva", "Kim", "Muller", "Rossi",
        "Haddad", "Sato", "Kowalski", "Nguyen", "Larsen",
    ];
    const TEAMS: &[&str] = &[
        "Engineering",
        "Sales",
        "Support",
        "Finance",
        "Marketing",
        "Legal",
        "Design",
        "Operations",
    ];
    let mut out = Vec::with_capacity(users + groups);
    for i in 0..users {
        let given = GIVEN[i % GIVEN.len()];
        let family = FAMILY[(i / GIVEN.len()) % FAMILY.len()];
        let service = i % 10 == 9;
        let username = if service {
            format!("svc-bot-{i:05}")
        } else {
            format!("{}.{}{i}", given.to_lowercase(), family.to_lowercase())
        };
        let mut attributes = Map::new();
        attributes.insert("locale".into(), Value::String("en-US".into()));
        attributes.insert(
            "phone".into(),
            Value::String(format!("+1 555 {:04}", i % 10_000)),
        );
        out.push(Record::User(User {
            id: format!("u-{i:06}"),
            email: Some(format!("{username}@example.com")),
            name: Some(format!("{given} {family}")),
            given_name: Some(given.to_string()),
            family_name: Some(family.to_string()),
            active: true,
            service_account: service,
            attributes,
            username,
        }));
    }
    for g in 0..groups {
        let name = if g < TEAMS.len() {
            TEAMS[g].to_string()
        } else {
            format!("{} {}", TEAMS[g % TEAMS.len()], g / TEAMS.len() + 1)
        };
        let members = (0..members.min(users))
            .map(|k| format!("u-{:06}", (g * members + k) % users))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        out.push(Record::Group(Group {
            id: format!("g-{g:05}"),
            name,
            members,
            attributes: Map::new(),
        }));
    }
    out
}
