//! The SCIM client against a scripted HTTP server: what real targets answer when things go wrong.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderName, StatusCode};
use axum::response::IntoResponse;
use scimsync::config::TargetConfig;
use scimsync::directory::Kind;
use scimsync::scim::{Capabilities, PatchOperation};
use scimsync::target::{TargetClient, TargetError};
use serde_json::json;

use crate::harness::{Db, fresh_database};

type Canned = (u16, Vec<(&'static str, &'static str)>, String);

/// Answers each request with the next canned response (the last one repeats) and records when
/// each request arrived.
struct Script {
    url: String,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

async fn scripted(responses: Vec<Canned>) -> Script {
    let queue = Arc::new(Mutex::new(responses));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let (q, a) = (queue.clone(), arrivals.clone());
    let app = axum::Router::new().fallback(move || {
        let (q, a) = (q.clone(), a.clone());
        async move {
            a.lock().expect("lock").push(Instant::now());
            let mut q = q.lock().expect("lock");
            let (status, headers, body) = if q.len() > 1 {
                q.remove(0)
            } else {
                q[0].clone()
            };
            let mut resp = (StatusCode::from_u16(status).expect("status"), body).into_response();
            for (k, v) in headers {
                resp.headers_mut()
                    .insert(HeaderName::from_static(k), v.parse().expect("header"));
            }
            resp
        }
    });
    let addr = serve(app).await;
    Script {
        url: format!("http://{addr}/scim/v2"),
        arrivals,
    }
}

/// Serves `app` on a loopback port of its own.
async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn client(url: &str) -> TargetClient {
    let mut t = TargetConfig::new("scripted", url, Some("t".into()));
    t.timeout_seconds = 5;
    TargetClient::new(&t).expect("client")
}

fn user() -> serde_json::Value {
    json!({"schemas":[scimsync::scim::USER_SCHEMA],"userName":"a"})
}

#[tokio::test]
async fn transient_failures_are_retried_honouring_retry_after() {
    let s = scripted(vec![
        (503, vec![], "busy".into()),
        (429, vec![("retry-after", "1")], "slow down".into()),
        (201, vec![], json!({"id":"r-1","userName":"a"}).to_string()),
    ])
    .await;
    let created = client(&s.url)
        .create(Kind::User, &user())
        .await
        .expect("third try succeeds");
    assert_eq!(created, "r-1");
    let at = s.arrivals.lock().expect("lock").clone();
    assert_eq!(at.len(), 3);
    assert!(
        at[2] - at[1] >= Duration::from_secs(1),
        "Retry-After: 1 was honoured: {:?}",
        at[2] - at[1]
    );
}

#[tokio::test]
async fn scim_errors_carry_status_type_and_detail_without_retry() {
    let body = json!({"schemas":[scimsync::scim::ERROR_SCHEMA],"status":"409","scimType":"uniqueness","detail":"userName taken"});
    let s = scripted(vec![(409, vec![], body.to_string())]).await;
    let err = client(&s.url)
        .create(Kind::User, &user())
        .await
        .expect_err("409");
    match &err {
        TargetError::Status {
            status,
            scim_type,
            detail,
            ..
        } => {
            assert_eq!(
                (*status, scim_type.as_deref(), detail.as_str()),
                (409, Some("uniqueness"), "userName taken")
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        s.arrivals.lock().expect("lock").len(),
        1,
        "a 409 is not retried"
    );
    assert_eq!(
        err.to_string(),
        "scripted: POST /Users: HTTP 409 (uniqueness): userName taken"
    );
}

#[tokio::test]
async fn garbage_answers_give_clear_errors() {
    let s = scripted(vec![(
        500,
        vec![("content-type", "text/html")],
        "<html><body><h1>Internal Server Error</h1></body></html>".into(),
    )])
    .await;
    let err = client(&s.url).get(Kind::User, "x").await.expect_err("500");
    assert_eq!(err.status(), Some(500));
    assert!(err.to_string().contains("Internal Server Error"), "{err}");
    assert_eq!(
        s.arrivals.lock().expect("lock").len(),
        4,
        "retried, then given up"
    );

    let s = scripted(vec![(201, vec![], json!({"userName":"a"}).to_string())]).await;
    let err = client(&s.url)
        .create(Kind::User, &user())
        .await
        .expect_err("no id");
    assert!(err.to_string().contains("has no \"id\""), "{err}");

    let s = scripted(vec![(200, vec![], "{\"Resources\": [{\"id\":".into())]).await;
    let err = client(&s.url)
        .find(Kind::User, "userName eq \"a\"")
        .await
        .expect_err("truncated");
    assert!(err.to_string().contains("not JSON"), "{err}");

    let s = scripted(vec![(
        200,
        vec![],
        json!({"Resources": "nope"}).to_string(),
    )])
    .await;
    let err = client(&s.url)
        .find(Kind::User, "userName eq \"a\"")
        .await
        .expect_err("wrong type");
    assert!(err.to_string().contains("not an array"), "{err}");
}

#[tokio::test]
async fn no_content_answers_are_accepted() {
    let s = scripted(vec![(204, vec![], String::new())]).await;
    let c = client(&s.url);
    c.patch(
        Kind::Group,
        "g",
        &[PatchOperation::remove("members[value eq \"x\"]")],
    )
    .await
    .expect("204 is success");
    c.delete(Kind::User, "u").await.expect("204 is success");
    c.replace(Kind::User, "u", &user())
        .await
        .expect("a PUT answered 204 is success");
}

#[tokio::test]
async fn unusable_service_provider_config_means_conservative_capabilities() {
    let s = scripted(vec![(200, vec![], "\"not an object\"".into())]).await;
    assert_eq!(
        client(&s.url).capabilities().await,
        Capabilities::conservative()
    );
    let s = scripted(vec![(404, vec![], String::new())]).await;
    assert_eq!(
        client(&s.url).capabilities().await,
        Capabilities::conservative()
    );
}

#[tokio::test]
async fn basic_auth_sends_the_credentials() {
    let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        axum::Json(json!({"id": "x", "auth": auth}))
    });
    let addr = serve(app).await;
    let mut t = TargetConfig::new("basic", &format!("http://{addr}/scim/v2"), None);
    t.auth = scimsync::config::AuthConfig {
        mode: scimsync::config::AuthMode::Basic,
        username: Some("svc".into()),
        password: Some("pa:ss".into()),
        ..Default::default()
    };
    let got = TargetClient::new(&t)
        .expect("client")
        .get(Kind::User, "x")
        .await
        .expect("answer")
        .expect("found");
    // base64("svc:pa:ss")
    assert_eq!(got["auth"], "Basic c3ZjOnBhOnNz");
    assert!(
        !format!("{:?}", t.auth).contains("pa:ss"),
        "Debug never shows the password"
    );
}

#[tokio::test]
async fn huge_bodies_are_refused_not_buffered() {
    let huge = format!(
        "{{\"id\":\"x\",\"pad\":\"{}\"}}",
        "x".repeat(17 * 1024 * 1024)
    );
    let s = scripted(vec![(200, vec![], huge)]).await;
    let err = client(&s.url)
        .get(Kind::User, "x")
        .await
        .expect_err("too big");
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert_eq!(s.arrivals.lock().expect("lock").len(), 1, "not retried");
}

/// Discovery asks for ServiceProviderConfig and ResourceTypes at once: this target answers
/// ServiceProviderConfig only once ResourceTypes has been asked for (or after 10 s, and then
/// says so), so asking one after the other would show here.
#[tokio::test]
async fn discovery_reads_both_documents_at_once() {
    let types_asked = Arc::new(tokio::sync::Notify::new());
    let spc_waited_in_vain = Arc::new(Mutex::new(None));
    let (asked, in_vain) = (types_asked.clone(), spc_waited_in_vain.clone());
    let app = axum::Router::new()
        .route(
            "/scim/v2/ServiceProviderConfig",
            axum::routing::get(move || {
                let (asked, in_vain) = (asked.clone(), in_vain.clone());
                async move {
                    let waited = tokio::time::timeout(Duration::from_secs(10), asked.notified());
                    *in_vain.lock().expect("lock") = Some(waited.await.is_err());
                    axum::Json(json!({"patch": {"supported": true}, "filter": {"supported": true, "maxResults": 50}}))
                }
            }),
        )
        .route(
            "/scim/v2/ResourceTypes",
            axum::routing::get(move || {
                // notify_one keeps a permit: an SPC request arriving after this one finds it.
                types_asked.notify_one();
                async {
                    axum::Json(json!({"Resources": [
                        {"name": "User", "endpoint": "/Users", "schema": scimsync::scim::USER_SCHEMA}
                    ]}))
                }
            }),
        );
    let addr = serve(app).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, _) = fresh_database(
        Db::Sqlite,
        dir.path(),
        "discovery_reads_both_documents_at_once",
    )
    .await
    .expect("SQLite needs no set-up");
    let store = scimsync::store::Store::connect(&url).await.expect("store");
    let cfg = {
        let mut t = TargetConfig::new(
            "discovery",
            &format!("http://{addr}/scim/v2"),
            Some("t".into()),
        );
        t.timeout_seconds = 30;
        t
    };
    let client = TargetClient::new(&cfg).expect("client");
    let eff = scimsync::sync::discover(&store, &client, &cfg, true).await;
    assert_eq!(
        *spc_waited_in_vain.lock().expect("lock"),
        Some(false),
        "ResourceTypes was asked for while ServiceProviderConfig was unanswered"
    );
    assert!(
        eff.patch && eff.filter,
        "from ServiceProviderConfig: {eff:?}"
    );
    assert!(!eff.groups, "from ResourceTypes (Users only): {eff:?}");
    store.close().await;
}
