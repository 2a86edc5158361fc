//! The sandbox as a client sees it over HTTP: the RFC 7644 behaviour scimsync's tests rely on.

use scimsync::sandbox::{self, SandboxOptions};
use scimsync::scim::{GROUP_SCHEMA, PATCH_OP_SCHEMA, USER_SCHEMA};
use serde_json::{Value, json};

struct Http {
    base: String,
    c: reqwest::Client,
}

impl Http {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .c
            .request(method, format!("{}{path}", self.base))
            .bearer_auth("tok");
        if let Some(b) = body {
            r = r
                .header("content-type", "application/scim+json")
                .body(b.to_string());
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }
}

#[tokio::test]
async fn sandbox_is_rfc_faithful_where_it_matters() {
    let sb = sandbox::start(SandboxOptions {
        patch: true,
        ..SandboxOptions::with_token("tok")
    })
    .await
    .expect("sandbox");
    let h = Http {
        base: sb.url.clone(),
        c: reqwest::Client::new(),
    };

    // Auth: resources need the token, discovery does not.
    let anon =
        h.c.get(format!("{}/Users", sb.url))
            .send()
            .await
            .expect("get");
    assert_eq!(anon.status().as_u16(), 401);
    let spc =
        h.c.get(format!("{}/ServiceProviderConfig", sb.url))
            .send()
            .await
            .expect("spc");
    assert_eq!(spc.status().as_u16(), 200);

    let mut ids = Vec::new();
    for name in ["ann", "ben", "cid", "dee", "eve"] {
        let (s, v) = h
            .post("/Users", json!({"schemas":[USER_SCHEMA],"userName":name}))
            .await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["meta"]["resourceType"], "User");
        ids.push(v["id"].as_str().expect("id").to_string());
    }
    let (s, v) = h
        .post("/Users", json!({"schemas":[USER_SCHEMA],"userName":"ANN"}))
        .await;
    assert_eq!(
        (s, v["scimType"].as_str()),
        (409, Some("uniqueness")),
        "{v}"
    );
    let (s, v) = h
        .post("/Users", json!({"schemas":[USER_SCHEMA],"displayName":"x"}))
        .await;
    assert_eq!(
        (s, v["scimType"].as_str()),
        (400, Some("invalidValue")),
        "{v}"
    );
    let (s, _) = h.post("/Users", json!({"userName":"noschema"})).await;
    assert_eq!(s, 400);

    let (s, v) = h.get("/Users?filter=userName%20eq%20%22BEN%22").await;
    assert_eq!((s, v["totalResults"].as_u64()), (200, Some(1)));
    assert_eq!(v["Resources"][0]["userName"], "ben");
    let (s, v) = h.get("/Users?filter=userName%20zz%20%22x%22").await;
    assert_eq!((s, v["scimType"].as_str()), (400, Some("invalidFilter")));
    let (_, v) = h.get("/Users?startIndex=2&count=2").await;
    assert_eq!(
        (v["totalResults"].as_u64(), v["startIndex"].as_u64()),
        (Some(5), Some(2))
    );
    assert_eq!(v["Resources"].as_array().map(Vec::len), Some(2));

    let (s, v) = h
        .post(
            "/Groups",
            json!({"schemas":[GROUP_SCHEMA],"displayName":"G","members":[{"value":"ghost"}]}),
        )
        .await;
    assert_eq!(
        (s, v["scimType"].as_str()),
        (400, Some("invalidValue")),
        "{v}"
    );
    let members: Vec<Value> = ids.iter().take(3).map(|i| json!({"value": i})).collect();
    let (s, g) = h
        .post(
            "/Groups",
            json!({"schemas":[GROUP_SCHEMA],"displayName":"G","members":members}),
        )
        .await;
    assert_eq!(s, 201);
    let gid = g["id"].as_str().expect("gid").to_string();
    let (_, v) = h
        .get(&format!(
            "/Groups?filter=members.value%20eq%20%22{}%22",
            ids[1]
        ))
        .await;
    assert_eq!(v["totalResults"], 1);

    let patch = json!({"schemas":[PATCH_OP_SCHEMA],"Operations":[{"op":"remove","path":format!("members[value eq \"{}\"]", ids[0])}]});
    let (s, v) = h
        .send(
            reqwest::Method::PATCH,
            &format!("/Groups/{gid}"),
            Some(patch),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["members"].as_array().map(Vec::len), Some(2));
    let (s, _) = h
        .send(
            reqwest::Method::PATCH,
            &format!("/Groups/{gid}"),
            Some(json!({"Operations":[]})),
        )
        .await;
    assert_eq!(s, 400, "PatchOp schema required");

    let (s, _) = h
        .send(reqwest::Method::DELETE, &format!("/Users/{}", ids[1]), None)
        .await;
    assert_eq!(s, 204);
    let (_, g) = h.get(&format!("/Groups/{gid}")).await;
    assert_eq!(
        g["members"],
        json!([{"value": ids[2]}]),
        "a deleted user leaves its groups"
    );
    let (s, v) = h.get(&format!("/Users/{}", ids[1])).await;
    assert_eq!((s, v["status"].as_str()), (404, Some("404")));
    sb.stop().await;
}
