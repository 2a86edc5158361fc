//! Functions mapping scripts may call besides rhai's own (documented in mappings/README.md).

use std::collections::HashMap;
use std::sync::Mutex;

use rhai::{Dynamic, Engine, EvalAltResult, Position};
use sha2::{Digest, Sha256};

type Res<T> = Result<T, Box<EvalAltResult>>;

fn runtime(msg: String) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(msg.into(), Position::NONE))
}

/// Patterns compile once per process; the cache is bounded so scripts cannot grow it forever.
static REGEX_CACHE: Mutex<Option<HashMap<String, regex::Regex>>> = Mutex::new(None);
const REGEX_CACHE_MAX: usize = 256;
/// Compiled patterns are capped too, so one expression cannot take unbounded memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn regex(pattern: &str) -> Res<regex::Regex> {
    let mut guard = REGEX_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some(r) = cache.get(pattern) {
        return Ok(r.clone());
    }
    let r = regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| runtime(format!("invalid regex {pattern:?}: {e}")))?;
    if cache.len() >= REGEX_CACHE_MAX {
        cache.clear();
    }
    cache.insert(pattern.to_string(), r.clone());
    Ok(r)
}

/// Hex SHA-256 of a string: stable, opaque externalIds.
pub fn sha256(s: &str) -> String {
    crate::directory::hex_lower(&Sha256::digest(s.as_bytes()))
}

/// "Ada King Lovelace" → given "Ada King", family "Lovelace"; one word is a given name.
pub fn split_name(full: &str) -> (String, String) {
    let words: Vec<&str> = full.split_whitespace().collect();
    match words.as_slice() {
        [] => (String::new(), String::new()),
        [one] => (one.to_string(), String::new()),
        [given @ .., family] => (given.join(" "), family.to_string()),
    }
}

/// Formats a date-time (RFC 3339 text, a `YYYY-MM-DD` date, or Unix seconds) with a strftime
/// format, in UTC.
pub fn format_date(value: &Dynamic, fmt: &str) -> Result<String, String> {
    use jiff::fmt::strtime;
    let out = if let Ok(secs) = value.as_int() {
        let ts = jiff::Timestamp::from_second(secs).map_err(|e| e.to_string())?;
        strtime::format(fmt, ts)
    } else if let Some(s) = value.read_lock::<rhai::ImmutableString>() {
        let s = s.trim();
        if let Ok(ts) = s.parse::<jiff::Timestamp>() {
            strtime::format(fmt, ts)
        } else if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
            strtime::format(fmt, dt)
        } else if let Ok(d) = s.parse::<jiff::civil::Date>() {
            strtime::format(fmt, d)
        } else {
            return Err(format!(
                "{s:?} is not a date-time (RFC 3339), a date (YYYY-MM-DD) or Unix seconds"
            ));
        }
    } else {
        return Err(format!(
            "format_date needs a string or an integer, not {}",
            value.type_name()
        ));
    };
    out.map_err(|e| format!("cannot format with {fmt:?}: {e}"))
}

pub fn register(engine: &mut Engine) {
    engine.register_fn("sha256", |s: &str| sha256(s));
    engine.register_fn("lower", |s: &str| s.to_lowercase());
    engine.register_fn("upper", |s: &str| s.to_uppercase());
    engine.register_fn("split_name", |s: &str| {
        let (given, family) = split_name(s);
        let mut m = rhai::Map::new();
        m.insert("given".into(), given.into());
        m.insert("family".into(), family.into());
        m
    });
    engine.register_fn("regex_match", |s: &str, pattern: &str| -> Res<bool> {
        Ok(regex(pattern)?.is_match(s))
    });
    engine.register_fn(
        "regex_replace",
        |s: &str, pattern: &str, with: &str| -> Res<String> {
            Ok(regex(pattern)?.replace_all(s, with).into_owned())
        },
    );
    engine.register_fn(
        "regex_capture",
        |s: &str, pattern: &str| -> Res<rhai::Array> {
            let re = regex(pattern)?;
            Ok(match re.captures(s) {
                Some(c) => c
                    .iter()
                    .map(|m| m.map_or(Dynamic::UNIT, |m| m.as_str().into()))
                    .collect(),
                None => rhai::Array::new(),
            })
        },
    );
    engine.register_fn("format_date", |v: Dynamic, fmt: &str| -> Res<String> {
        format_date(&v, fmt).map_err(runtime)
    });
}
