//! The API as served over a real Unix socket matches `docs/openapi.json`: the same
//! operations, each answered (not "no API operation"), responses valid against the document's
//! schemas, and errors mapped to the documented statuses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use kiln_control::client::{Client, ClientError};
use kiln_control::{Controller, ControllerConfig, api};
use kiln_runtime::{FakeProvider, Provider};
use serde_json::{Value, json};

fn openapi() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn routes_and_document_list_the_same_operations() {
    let doc = openapi();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = api::ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(served, documented);
}

/// Checks `value` against the schema `#/components/schemas/{name}` with boon.
fn conforms(name: &str, value: &Value) {
    let mut doc = openapi();
    // Make the components addressable as a standalone schema document.
    doc["$id"] = json!("https://kiln.invalid/openapi.json");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("https://kiln.invalid/openapi.json", doc)
        .unwrap();
    let idx = compiler
        .compile(
            &format!("https://kiln.invalid/openapi.json#/components/schemas/{name}"),
            &mut schemas,
        )
        .unwrap();
    if let Err(e) = schemas.validate(value, idx) {
        panic!("response does not match schema {name}: {e:#}\n{value:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let provider: Arc<dyn Provider> = Arc::new(FakeProvider::new(true));
    let c = Controller::start(
        &ControllerConfig {
            state_dir: dir.path().to_owned(),
            router: kiln_control::RouterChoice::Embedded(kiln_proxy::WorkersConfig::new(2)),
            attestations: None,
            policy: Default::default(),
        },
        provider,
    )
    .await
    .unwrap();
    let sock = dir.path().join("kiln.sock");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve_unix(sock.clone(), Arc::clone(&c), async move {
        let _ = stop_rx.await;
    }));
    let client = Client::new(&sock);
    while !client.alive().await {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = kiln_spec::Spec::parse(
        &format!("name = \"web\"\n[image]\n[service]\n[route]\nlisten = \"127.0.0.1:{port}\"\n"),
        "kiln.toml",
        Path::new("."),
    )
    .unwrap();
    let apply = json!({
        "image": format!("sha256:{}", "a".repeat(64)),
        "config": kiln_control::ReleaseConfig::from_spec(&spec),
        "spec_digest": "sha256:x",
        "source_commit": null,
        "actor": "test",
    });
    let release = client.post("/v1/apps/web/releases", &apply).await.unwrap();
    conforms("Release", &release);
    // The actor is the socket's peer at this host, not the body's claim.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let actor = release["actor"].as_str().unwrap();
    assert!(actor.ends_with(&format!("@{}", host.trim())), "{actor}");
    assert_ne!(actor, "test");
    // Creates run in the background: pass until the rollout completes.
    for _ in 0..2000 {
        c.reconcile().await.unwrap();
        if c.status("web").await.unwrap().phase == "completed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    conforms("AppNames", &client.get("/v1/apps").await.unwrap());
    let status = client.get("/v1/apps/web").await.unwrap();
    conforms("AppStatus", &status);
    conforms(
        "Releases",
        &client.get("/v1/apps/web/releases").await.unwrap(),
    );
    let instances = client.get("/v1/apps/web/instances").await.unwrap();
    conforms("AppNames", &instances);
    let id = instances[0].as_str().unwrap();
    conforms(
        "LogChunk",
        &client
            .get(&format!("/v1/instances/{id}/logs?from=0"))
            .await
            .unwrap(),
    );
    conforms(
        "Events",
        &client.get("/v1/events?app=web&limit=5").await.unwrap(),
    );
    conforms("VerifyResult", &client.get("/v1/verify").await.unwrap());
    client.get("/v1/health").await.unwrap();
    assert!(client.get_text("/metrics").await.unwrap().contains("kiln_"));
    client
        .post("/v1/apps/web/scale", &json!({"replicas": 2}))
        .await
        .unwrap();

    let paused = client
        .post("/v1/apps/web/pause", &json!({"max_hold_ms": 5000}))
        .await
        .unwrap();
    conforms("GateChange", &paused);
    assert_eq!(paused["gate"]["mode"], "paused");
    conforms("AppStatus", &client.get("/v1/apps/web").await.unwrap());
    conforms(
        "GateChange",
        &client
            .post("/v1/apps/web/resume", &json!({}))
            .await
            .unwrap(),
    );
    let maintenance = client
        .put(
            "/v1/apps/web/maintenance",
            &json!({"message": "back soon", "retry_after_s": 120}),
        )
        .await
        .unwrap();
    conforms("GateChange", &maintenance);
    let status = client.get("/v1/apps/web").await.unwrap();
    conforms("AppStatus", &status);
    assert_eq!(status["gate"]["message"], "back soon");
    conforms(
        "GateChange",
        &client.delete("/v1/apps/web/maintenance").await.unwrap(),
    );

    // Errors: documented statuses and an {"error"} body.
    let status_of = |r: Result<Value, ClientError>| match r {
        Err(ClientError::Api { status, .. }) => status.as_u16(),
        other => panic!("expected an API error, got {other:?}"),
    };
    assert_eq!(status_of(client.get("/v1/apps/nope").await), 404);
    assert_eq!(
        status_of(client.post("/v1/apps/web/promote", &json!({})).await),
        409
    );
    assert_eq!(
        status_of(
            client
                .post("/v1/apps/web/scale", &json!({"replicas": 0}))
                .await
        ),
        400
    );
    assert_eq!(
        status_of(
            client
                .post("/v1/apps/web/scale", &json!({"bogus": 1}))
                .await
        ),
        400
    );
    assert_eq!(
        status_of(client.post("/v1/apps/web/rollback", &json!({})).await),
        409
    );
    assert_eq!(
        status_of(
            client
                .put("/v1/apps/web/maintenance", &json!({"message": " "}))
                .await
        ),
        400
    );
    assert_eq!(
        status_of(
            client
                .post("/v1/apps/web/pause", &json!({"max_hold_ms": 0}))
                .await
        ),
        400
    );
    assert_eq!(status_of(client.get("/v1/nothing").await), 404);
    assert_eq!(status_of(client.post("/v1/verify", &json!({})).await), 405);
    let err = client
        .post("/v1/apps/web/releases", &json!({"image": "nope"}))
        .await;
    assert_eq!(status_of(err), 400);

    // Down last.
    client.delete("/v1/apps/web?actor=test").await.unwrap();
    assert_eq!(
        status_of(client.post("/v1/apps/web/abort", &json!({})).await),
        404
    );
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    assert!(!sock.exists());
}
