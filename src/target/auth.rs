//! How requests to a target authenticate: a static bearer token, HTTP Basic, or OAuth2
//! client_credentials with a cached token refreshed before it expires (and once after a 401),
//! one refresh at a time per target. No secret ever reaches an error message or a log line.

use std::time::{Duration, Instant};

use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, Scope, TokenResponse, TokenUrl,
};

use crate::config::{AuthConfig, AuthMode, ClientAuth};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub String);

type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// Assumed lifetime of a token whose response names none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);

pub enum Auth {
    Bearer(String),
    Basic { username: String, password: String },
    OAuth(Box<OAuth>),
}

pub struct OAuth {
    client: TokenClient,
    http: reqwest::Client,
    scopes: Vec<String>,
    extra: Vec<(String, String)>,
    token_url: String,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

/// What to put in the Authorization header of one request.
pub enum Credential {
    Bearer(String),
    Basic(String, String),
    /// Nothing: for discovery endpoints when no credential could be had.
    None,
}

#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("{0}")]
    Reqwest(#[from] reqwest::Error),
    #[error("{0}")]
    Http(#[from] http::Error),
}

impl Auth {
    /// `token_http` makes the token endpoint's client; it is called for OAuth alone.
    pub fn from_config(
        cfg: &AuthConfig,
        token_http: impl FnOnce() -> Result<reqwest::Client, AuthError>,
    ) -> Result<Auth, AuthError> {
        match cfg.mode {
            AuthMode::Token => {
                let token = match (&cfg.token, &cfg.token_file) {
                    (Some(t), _) => t.clone(),
                    (None, Some(path)) => std::fs::read_to_string(path)
                        .map_err(|e| {
                            AuthError(format!("cannot read token_file {}: {e}", path.display()))
                        })?
                        .trim()
                        .to_string(),
                    (None, None) => return Err(AuthError("no token configured".into())),
                };
                if token.is_empty() {
                    return Err(AuthError("the token is empty".into()));
                }
                Ok(Auth::Bearer(token))
            }
            AuthMode::Basic => Ok(Auth::Basic {
                username: cfg.username.clone().unwrap_or_default(),
                password: cfg.password.clone().unwrap_or_default(),
            }),
            AuthMode::Oauth => {
                let token_url = cfg.token_url.clone().unwrap_or_default();
                let client =
                    BasicClient::new(ClientId::new(cfg.client_id.clone().unwrap_or_default()))
                        .set_client_secret(ClientSecret::new(
                            cfg.client_secret.clone().unwrap_or_default(),
                        ))
                        .set_token_uri(
                            TokenUrl::new(token_url.clone())
                                .map_err(|e| AuthError(format!("token_url: {e}")))?,
                        )
                        .set_auth_type(match cfg.client_auth {
                            ClientAuth::Basic => AuthType::BasicAuth,
                            ClientAuth::Body => AuthType::RequestBody,
                        });
                let scopes = cfg
                    .scope
                    .as_deref()
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                Ok(Auth::OAuth(Box::new(OAuth {
                    client,
                    http: token_http()?,
                    scopes,
                    extra: cfg
                        .extra
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    token_url,
                    cache: tokio::sync::Mutex::new(None),
                })))
            }
        }
    }

    pub async fn credential(&self) -> Result<Credential, AuthError> {
        match self {
            Auth::Bearer(t) => Ok(Credential::Bearer(t.clone())),
            Auth::Basic { username, password } => {
                Ok(Credential::Basic(username.clone(), password.clone()))
            }
            Auth::OAuth(o) => o.token().await.map(Credential::Bearer),
        }
    }

    /// After a 401: forget the OAuth token that was refused, so the next request fetches a new
    /// one. Returns whether a retry can help.
    pub async fn refused(&self, cred: &Credential) -> bool {
        match (self, cred) {
            (Auth::OAuth(o), Credential::Bearer(used)) => {
                let mut cache = o.cache.lock().await;
                if cache.as_ref().is_some_and(|c| &c.token == used) {
                    *cache = None;
                }
                true
            }
            _ => false,
        }
    }

    /// Seconds until the cached OAuth token is refreshed, for `check`.
    pub async fn token_expiry(&self) -> Option<Duration> {
        match self {
            Auth::OAuth(o) => o
                .cache
                .lock()
                .await
                .as_ref()
                .map(|c| c.refresh_at.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }
}

impl OAuth {
    /// The cached token, or a new one; the lock makes concurrent callers wait for one refresh.
    async fn token(&self) -> Result<String, AuthError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let http = self.http.clone();
        let send = move |req: oauth2::HttpRequest| {
            let http = http.clone();
            async move {
                let (parts, body) = req.into_parts();
                let resp = http
                    .request(parts.method, parts.uri.to_string())
                    .headers(parts.headers)
                    .body(body)
                    .send()
                    .await?;
                let mut out = http::Response::builder().status(resp.status());
                for (k, v) in resp.headers() {
                    out = out.header(k, v);
                }
                let bytes = resp.bytes().await?;
                Ok::<_, HttpError>(out.body(bytes.to_vec())?)
            }
        };
        let mut req = self.client.exchange_client_credentials();
        for s in &self.scopes {
            req = req.add_scope(Scope::new(s.clone()));
        }
        for (k, v) in &self.extra {
            req = req.add_extra_param(k.clone(), v.clone());
        }
        let resp = req.request_async(&send).await.map_err(|e| {
            AuthError(format!(
                "token request to {} failed: {}",
                self.token_url,
                describe(&e)
            ))
        })?;
        let lifetime = resp.expires_in().unwrap_or(DEFAULT_LIFETIME);
        // Refresh early: a minute before expiry, or at 90% of a short lifetime.
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        let token = resp.access_token().secret().clone();
        *cache = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime - margin,
        });
        Ok(token)
    }
}

fn describe<RE: std::error::Error + 'static, T: oauth2::ErrorResponse + 'static>(
    e: &oauth2::RequestTokenError<RE, T>,
) -> String {
    match e {
        oauth2::RequestTokenError::ServerResponse(r) => format!("the server refused: {r}"),
        oauth2::RequestTokenError::Request(r) => format!("cannot reach it: {r}"),
        oauth2::RequestTokenError::Parse(p, _) => format!("unreadable answer: {p}"),
        oauth2::RequestTokenError::Other(o) => o.clone(),
    }
}
