//! The sandbox's OAuth2 token endpoint (RFC 6749 §4.4 client_credentials): clients
//! authenticate with HTTP Basic or form parameters; tokens carry scopes and expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;
use serde_json::{Value, json};

/// A client allowed to ask for tokens, and the scopes it may get.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub id: String,
    pub secret: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Issued {
    pub scopes: Vec<String>,
    pub expires: Instant,
}

#[derive(Debug, Default)]
pub struct Tokens {
    issued: HashMap<String, Issued>,
}

impl Tokens {
    pub fn get(&self, token: &str) -> Option<&Issued> {
        self.issued
            .get(token)
            .filter(|t| Instant::now() < t.expires)
    }
    pub fn revoke_all(&mut self) {
        self.issued.clear();
    }
}

fn error(status: StatusCode, code: &str, description: &str) -> (StatusCode, Value) {
    (
        status,
        json!({"error": code, "error_description": description}),
    )
}

/// Answers a token request: (status, JSON body).
pub fn token(
    clients: &[OAuthClient],
    lifetime: Duration,
    tokens: &mut Tokens,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, Value) {
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials",
        );
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| {
            let (id, secret) = s.split_once(':')?;
            // RFC 6749 §2.3.1: both parts are form-urlencoded inside the Basic header.
            let dec = |x: &str| {
                form_urlencoded::parse(format!("x={x}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((dec(id)?, dec(secret)?))
        });
    let (id, secret) = match (basic, form.get("client_id"), form.get("client_secret")) {
        (Some(pair), _, _) => pair,
        (None, Some(i), Some(s)) => (i.clone(), s.clone()),
        _ => {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication required",
            );
        }
    };
    let Some(client) = clients.iter().find(|c| c.id == id && c.secret == secret) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong secret",
        );
    };
    let asked: Vec<String> = form
        .get("scope")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    if let Some(bad) = asked.iter().find(|s| !client.scopes.contains(s)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!("scope {bad:?} is not allowed for this client"),
        );
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    tokens.issued.insert(
        token.clone(),
        Issued {
            scopes: asked.clone(),
            expires: Instant::now() + lifetime,
        },
    );
    (
        StatusCode::OK,
        json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs().max(1),
            "scope": asked.join(" "),
        }),
    )
}
