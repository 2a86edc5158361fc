//! SCIM filter expressions (RFC 7644 §3.4.2.2) as the sandbox understands them: comparisons
//! (`eq ne co sw ew gt ge lt le pr`), `and`, `or`, `not (...)` and parentheses, on attribute
//! paths such as `userName`, `name.givenName` or `members.value`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Cmp { path: String, op: Op, value: Value },
    Present(String),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Lit(Value),
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == '"' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            if i >= chars.len() {
                return Err("unterminated string".into());
            }
            i += 1;
            let lit: String = chars[start..i].iter().collect();
            let v: Value =
                serde_json::from_str(&lit).map_err(|e| format!("bad string {lit}: {e}"))?;
            out.push(Tok::Lit(v));
        } else {
            let start = i;
            while i < chars.len() && !chars[i].is_whitespace() && !matches!(chars[i], '(' | ')') {
                i += 1;
            }
            let w: String = chars[start..i].iter().collect();
            match w.as_str() {
                "true" => out.push(Tok::Lit(Value::Bool(true))),
                "false" => out.push(Tok::Lit(Value::Bool(false))),
                "null" => out.push(Tok::Lit(Value::Null)),
                _ => match w.parse::<f64>() {
                    Ok(_) if w.starts_with(|c: char| c.is_ascii_digit() || c == '-') => {
                        let v: Value = serde_json::from_str(&w).map_err(|e| e.to_string())?;
                        out.push(Tok::Lit(v));
                    }
                    _ => out.push(Tok::Word(w)),
                },
            }
        }
    }
    Ok(out)
}

pub fn parse(s: &str) -> Result<Filter, String> {
    let toks = tokenize(s)?;
    let mut p = Parser { toks, pos: 0 };
    let f = p.or()?;
    if p.pos != p.toks.len() {
        return Err(format!("unexpected {:?}", p.toks[p.pos]));
    }
    Ok(f)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }
    fn or(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.pos += 1;
            let right = self.and()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.pos += 1;
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn unary(&mut self) -> Result<Filter, String> {
        if self.peek_word("not") {
            self.pos += 1;
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        match self.toks.get(self.pos).cloned() {
            Some(Tok::Open) => {
                self.pos += 1;
                let f = self.or()?;
                if self.toks.get(self.pos) != Some(&Tok::Close) {
                    return Err("missing )".into());
                }
                self.pos += 1;
                Ok(f)
            }
            Some(Tok::Word(path)) => {
                self.pos += 1;
                let op = match self.toks.get(self.pos) {
                    Some(Tok::Word(op)) => op.to_ascii_lowercase(),
                    other => {
                        return Err(format!(
                            "expected an operator after {path}, found {other:?}"
                        ));
                    }
                };
                self.pos += 1;
                let op = match op.as_str() {
                    "pr" => return Ok(Filter::Present(path)),
                    "eq" => Op::Eq,
                    "ne" => Op::Ne,
                    "co" => Op::Co,
                    "sw" => Op::Sw,
                    "ew" => Op::Ew,
                    "gt" => Op::Gt,
                    "ge" => Op::Ge,
                    "lt" => Op::Lt,
                    "le" => Op::Le,
                    other => return Err(format!("unknown operator {other:?}")),
                };
                let value = match self.toks.get(self.pos) {
                    Some(Tok::Lit(v)) => v.clone(),
                    other => {
                        return Err(format!(
                            "expected a value after {path} {op:?}, found {other:?}"
                        ));
                    }
                };
                self.pos += 1;
                Ok(Filter::Cmp { path, op, value })
            }
            other => Err(format!("expected an attribute, found {other:?}")),
        }
    }
}

/// Case-insensitive lookup of an attribute name (RFC 7643 §2.1).
pub fn get_ci<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    let m = obj.as_object()?;
    m.get(key).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// Every value at `path` (arrays fan out: `members.value` gives each member's value).
fn resolve<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) if !path.starts_with("urn:") => (h, Some(r)),
        _ => (path, None),
    };
    let mut out = Vec::new();
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    for item in items {
        if let Some(x) = get_ci(item, head) {
            match rest {
                Some(r) => out.extend(resolve(x, r)),
                None => match x {
                    Value::Array(a) => out.extend(a.iter()),
                    other => out.push(other),
                },
            }
        }
    }
    out
}

/// Attributes compared exactly; every other string compares case-insensitively (caseExact
/// is false for most core attributes).
fn case_exact(path: &str) -> bool {
    matches!(
        path.to_ascii_lowercase().as_str(),
        "id" | "externalid" | "members.value" | "value" | "meta.version"
    )
}

pub fn matches(f: &Filter, r: &Value) -> bool {
    match f {
        Filter::And(a, b) => matches(a, r) && matches(b, r),
        Filter::Or(a, b) => matches(a, r) || matches(b, r),
        Filter::Not(a) => !matches(a, r),
        Filter::Present(p) => resolve(r, p)
            .iter()
            .any(|v| !v.is_null() && v.as_str() != Some("")),
        Filter::Cmp { path, op, value } => {
            let found = resolve(r, path);
            if *op == Op::Ne {
                return !found
                    .iter()
                    .any(|v| cmp(v, Op::Eq, value, case_exact(path)));
            }
            found.iter().any(|v| cmp(v, *op, value, case_exact(path)))
        }
    }
}

fn cmp(v: &Value, op: Op, want: &Value, exact: bool) -> bool {
    match (v, want) {
        (Value::String(a), Value::String(b)) => {
            let (a, b) = if exact {
                (a.clone(), b.clone())
            } else {
                (a.to_lowercase(), b.to_lowercase())
            };
            match op {
                Op::Eq => a == b,
                Op::Ne => a != b,
                Op::Co => a.contains(&b),
                Op::Sw => a.starts_with(&b),
                Op::Ew => a.ends_with(&b),
                Op::Gt => a > b,
                Op::Ge => a >= b,
                Op::Lt => a < b,
                Op::Le => a <= b,
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            match op {
                Op::Eq => a == b,
                Op::Ne => a != b,
                Op::Gt => a > b,
                Op::Ge => a >= b,
                Op::Lt => a < b,
                Op::Le => a <= b,
                _ => false,
            }
        }
        (a, b) => match op {
            Op::Eq => a == b,
            Op::Ne => a != b,
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eq_and_or_not_on_paths() {
        let u = json!({"userName":"Alice","externalId":"u-1","emails":[{"value":"a@x"}],"members":[{"value":"m1"}]});
        let t = |s: &str| matches(&parse(s).expect(s), &u);
        assert!(t(r#"userName eq "alice""#));
        assert!(!t(r#"externalId eq "U-1""#));
        assert!(t(r#"userName eq "alice" and externalId eq "u-1""#));
        assert!(t(r#"userName eq "bob" or emails.value eq "A@X""#));
        assert!(t(r#"members.value eq "m1""#));
        assert!(t(r#"not (userName eq "bob")"#));
        assert!(t("userName pr"));
        assert!(t(r#"userName sw "al""#));
        assert!(parse("userName eq").is_err());
        assert!(parse(r#"userName foo "x""#).is_err());
    }
}
