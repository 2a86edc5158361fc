//! Targets over HTTPS: the client verifies the target's certificate against `ca_file`, offers
//! HTTP/2 by ALPN and speaks it where the target accepts it, and HTTP/1.1 where it does not.
//! The target is the sandbox behind a TLS front made here (a self-signed certificate for
//! `localhost`), which records the HTTP version of every request it forwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types};

use scimsync::config::ClientAuth;

use crate::harness::{Db, Env};
use crate::targets::{count, oauth_auth, oauth_env_opts};

/// A TLS front for `backend` (the sandbox's plain-HTTP origin) on a free loopback port,
/// offering the ALPN protocols `alpn`. Returns its port, the certificate's PEM and the
/// versions of the requests it received.
async fn tls_front(backend: String, alpn: &[&[u8]]) -> (u16, String, Arc<Mutex<Vec<Version>>>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let key = pki_types::PrivateKeyDer::Pkcs8(pki_types::PrivatePkcs8KeyDer::from(
        signing_key.serialize_der(),
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let forward = reqwest::Client::new();
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, forward, backend, seen) = (
                acceptor.clone(),
                forward.clone(),
                backend.clone(),
                recorded.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (forward, backend, seen) = (forward.clone(), backend.clone(), seen.clone());
                    async move {
                        seen.lock().expect("versions").push(req.version());
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                        let mut out = forward.request(parts.method, format!("{backend}{path}"));
                        for name in [hyper::header::AUTHORIZATION, hyper::header::CONTENT_TYPE] {
                            if let Some(v) = parts.headers.get(&name) {
                                out = out.header(name, v);
                            }
                        }
                        let answer = out.body(body).send().await.expect("sandbox answers");
                        let mut resp = Response::builder().status(answer.status());
                        if let Some(ct) = answer.headers().get(hyper::header::CONTENT_TYPE) {
                            resp = resp.header(hyper::header::CONTENT_TYPE, ct);
                        }
                        let bytes = answer.bytes().await.expect("sandbox body");
                        Ok::<_, hyper::Error>(resp.body(Full::new(bytes)).expect("response"))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, cert.pem(), seen)
}

/// A full sync through a TLS front offering `alpn`: converges, and every request arrives as
/// `want`.
async fn sync_over_tls(test: &str, alpn: &[&[u8]], want: Version) {
    let mut env = Env::new(Db::Sqlite, test)
        .await
        .expect("SQLite needs no set-up");
    let origin = format!("http://{}", env.sandbox.addr);
    let (port, pem, seen) = tls_front(origin.clone(), alpn).await;
    let ca = env.mapping_dir().with_file_name("ca.pem");
    std::fs::write(&ca, pem).expect("write ca");
    env.target.url = env
        .sandbox
        .url
        .replace(&origin, &format!("https://localhost:{port}"));
    env.target.ca_file = Some(ca);
    let users: String = (0..30)
        .map(|i| format!("{{\"kind\":\"user\",\"id\":\"u-{i:02}\",\"username\":\"user{i:02}\"}}\n"))
        .collect();
    env.import(&format!(
        "{users}{{\"kind\":\"group\",\"id\":\"g-1\",\"name\":\"Team\",\"members\":[\"u-01\",\"u-02\"]}}\n"
    ))
    .await;
    let summary = env.sync().await;
    assert!(summary.is_clean(), "{:?}", summary.failures);
    assert_eq!(env.sandbox.users().len(), 30, "every user was created");
    assert_eq!(env.sandbox.groups().len(), 1, "the group was created");
    let versions = seen.lock().expect("versions").clone();
    assert!(
        versions.len() >= 31,
        "the requests went through the TLS front: {}",
        versions.len()
    );
    assert!(
        versions.iter().all(|v| *v == want),
        "every request as {want:?}: {versions:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn https_target_offering_http2_is_spoken_to_in_http2() {
    sync_over_tls("tls_h2", &[b"h2", b"http/1.1"], Version::HTTP_2).await;
}

#[tokio::test]
async fn https_target_without_http2_is_spoken_to_in_http1() {
    sync_over_tls("tls_h1", &[b"http/1.1"], Version::HTTP_11).await;
}

/// The token endpoint is reached with the same trust as the SCIM endpoint: an OAuth target
/// whose token endpoint sits behind a certificate of the private CA in `ca_file` gets its
/// token over HTTPS, then syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_endpoint_is_trusted_through_ca_file() {
    let mut env = Env::with_sandbox(
        Db::Sqlite,
        "tls_oauth",
        oauth_env_opts(Duration::from_secs(3600)),
    )
    .await
    .expect("SQLite needs no set-up");
    let origin = format!("http://{}", env.sandbox.addr);
    let (port, pem, seen) = tls_front(origin.clone(), &[b"http/1.1"]).await;
    let ca = env.mapping_dir().with_file_name("ca.pem");
    std::fs::write(&ca, pem).expect("write ca");
    let front = format!("https://localhost:{port}");
    env.target.url = env.sandbox.url.replace(&origin, &front);
    env.target.ca_file = Some(ca);
    env.target.auth = oauth_auth(
        &env.sandbox.token_url.replace(&origin, &front),
        "admin",
        ClientAuth::Basic,
    );
    env.import("{\"kind\":\"user\",\"id\":\"u-1\",\"username\":\"ada\"}\n")
        .await;
    let summary = env.sync().await;
    assert!(summary.is_clean(), "{:?}", summary.failures);
    assert_eq!(summary.created, 1, "{summary:?}");
    assert_eq!(
        count(&env.sandbox.requests(), "POST", "/oauth2/token"),
        1,
        "one token, fetched through the TLS front"
    );
    assert!(
        seen.lock().expect("versions").len() >= 2,
        "the token and the user went through the TLS front"
    );
    env.finish().await;
}
