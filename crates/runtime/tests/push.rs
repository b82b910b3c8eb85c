//! The push client against an in-process registry that keeps what it is sent and counts the
//! requests: concurrent pushes of one image through one `PushOnce` (the swarm provider's
//! concurrent creates) push it once; a registry that has an image is sent nothing; a blob
//! whose stored bytes do not hash to its name is never delivered whole. The real-registry
//! suite is `crates/kiln/tests/push.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_runtime::ImageSource;
use kiln_runtime::image::{ResolvedImage, SourceError};
use kiln_runtime::push::{PushOnce, PushOptions, Repository, push};
use kiln_runtime::types::Digest;

/// Blobs as files named by their hex digest.
struct Blobs(PathBuf);

impl Blobs {
    fn add(&self, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        std::fs::write(self.0.join(d.hex()), bytes).unwrap();
        d
    }
}

impl ImageSource for Blobs {
    fn resolve(&self, image: &Digest) -> Result<ResolvedImage, SourceError> {
        Err(format!("{image}: not used here").into())
    }

    fn unpack_layer(&self, _: &Digest, layer: &Digest, _: &Path) -> Result<(), SourceError> {
        Err(format!("{layer}: not used here").into())
    }

    fn blob_path(&self, digest: &Digest) -> Result<Option<PathBuf>, SourceError> {
        let p = self.0.join(digest.hex());
        Ok(p.is_file().then_some(p))
    }
}

const CONFIG: &str =
    r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

/// An image of a config and a layer; returns the manifest digest and the layer's.
fn image(blobs: &Blobs, layer: &[u8]) -> (Digest, Digest) {
    let config_bytes = CONFIG.as_bytes();
    let config = blobs.add(config_bytes);
    let l = blobs.add(layer);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l, "size": layer.len()}],
    });
    (blobs.add(&serde_json::to_vec(&manifest).unwrap()), l)
}

/// A registry in a thread: keeps every blob and manifest whose bytes hash to the digest
/// given, answers HEADs from what it keeps, and logs `METHOD PATH` of each request.
fn registry() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut kept: HashSet<String> = HashSet::new();
        let mut uploads = 0;
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut headers = BTreeMap::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let length: usize = headers
                .get("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            let complete = reader.read_exact(&mut body).is_ok();
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let whole = if complete { "whole" } else { "cut" };
            seen.lock()
                .unwrap()
                .push(format!("{method} {path} {whole}"));
            let last = path.rsplit('/').next().unwrap_or("").to_owned();
            let answer = match method {
                "HEAD" if kept.contains(&last) => "200 OK".to_owned(),
                "HEAD" => "404 Not Found".to_owned(),
                "POST" => {
                    uploads += 1;
                    format!("202 Accepted\r\nLocation: /up/{uploads}?s=1")
                }
                "PUT" => {
                    let digest = path
                        .split_once("digest=")
                        .map(|(_, d)| d.to_owned())
                        .unwrap_or(last);
                    if complete && Digest::of(&body).as_str() == digest {
                        kept.insert(digest.clone());
                        format!("201 Created\r\nDocker-Content-Digest: {digest}")
                    } else {
                        "400 Bad Request".to_owned()
                    }
                }
                _ => "405 Method Not Allowed".to_owned(),
            };
            let mut conn = reader.into_inner();
            let _ = write!(
                conn,
                "HTTP/1.1 {answer}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (host, log)
}

fn count(log: &Mutex<Vec<String>>, prefix: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_image_push_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(Blobs(dir.path().to_owned()));
    let (manifest, _) = image(&blobs, &vec![7u8; 600 << 10]);
    let (host, log) = registry();
    let repo = Repository::for_app(&format!("{host}/team"), "web").unwrap();
    let once = Arc::new(PushOnce::new());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (once, blobs, repo, manifest) = (
            Arc::clone(&once),
            Arc::clone(&blobs),
            repo.clone(),
            manifest.clone(),
        );
        tasks.push(tokio::spawn(async move {
            once.ensure(&*blobs, &manifest, &repo, &PushOptions::default())
                .await
                .unwrap()
        }));
    }
    let mut pushed = Vec::new();
    for t in tasks {
        if let Some(p) = t.await.unwrap() {
            pushed.push(p);
        }
    }
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    assert_eq!(pushed[0].blobs_sent, 2);
    assert_eq!(pushed[0].bytes_sent, (CONFIG.len() + (600 << 10)) as u64);
    assert_eq!(pushed[0].reference, format!("{host}/team/web@{manifest}"));
    assert_eq!(count(&log, "HEAD /v2/team/web/manifests/"), 1);
    assert_eq!(count(&log, "PUT /up/"), 2);
    assert_eq!(count(&log, "PUT /v2/team/web/manifests/"), 1);

    // A new process (a new record) finds it there: one HEAD, nothing sent.
    let again = PushOnce::new()
        .ensure(&*blobs, &manifest, &repo, &PushOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.manifests_present, again.blobs_sent), (1, 0));
    assert_eq!(count(&log, "PUT "), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stored_blob_is_never_delivered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs(dir.path().to_owned());
    let layer = vec![1u8; 700 << 10];
    let (manifest, l) = image(&blobs, &layer);
    // Same size, one byte changed: only hashing it as it streams can tell.
    let mut bad = layer.clone();
    bad[(700 << 10) - 1] = 2;
    std::fs::write(dir.path().join(l.hex()), &bad).unwrap();
    let (host, log) = registry();
    let repo = Repository::parse(&format!("{host}/a")).unwrap();
    let e = push(&blobs, &manifest, &repo, &PushOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("registry {host}"))
            && e.contains(&format!("upload blob {l}"))
            && e.contains("does not hash to its name"),
        "{e}"
    );
    // The config arrived whole, the layer cut short of its end; no manifest was sent. The
    // registry notes the cut upload when its connection closes, which may be after kiln
    // gave up: wait for the note.
    for _ in 0..200 {
        if count(&log, "PUT ") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = log.lock().unwrap().clone();
    let puts: Vec<&String> = log.iter().filter(|l| l.starts_with("PUT ")).collect();
    assert_eq!(puts.len(), 2, "{log:?}");
    assert!(
        puts[0].starts_with("PUT /up/1?s=1&digest=") && puts[0].ends_with(" whole"),
        "{log:?}"
    );
    assert!(
        puts[1].starts_with("PUT /up/2?s=1&digest=") && puts[1].ends_with(" cut"),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_goes_after_its_manifests_and_a_shared_layer_once() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs(dir.path().to_owned());
    let (amd64, layer) = image(&blobs, b"same layer");
    // A second manifest with the same layer and config, told apart by an annotation.
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(amd64.hex())).unwrap()).unwrap();
    doc["annotations"] = serde_json::json!({"variant": "b"});
    let arm64 = blobs.add(&serde_json::to_vec(&doc).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64, "size": 1},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64, "size": 1},
        ],
    });
    let index = blobs.add(&serde_json::to_vec(&index).unwrap());
    let (host, log) = registry();
    let repo = Repository::parse(&format!("{host}/multi")).unwrap();
    let pushed = push(&blobs, &index, &repo, &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (
            pushed.manifests_sent,
            pushed.blobs_sent,
            pushed.blobs_present
        ),
        (3, 2, 0),
        "{pushed:?}"
    );
    let log = log.lock().unwrap().clone();
    let manifests: Vec<&str> = log
        .iter()
        .filter_map(|l| l.strip_prefix("PUT /v2/multi/manifests/"))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        manifests,
        [amd64.as_str(), arm64.as_str(), index.as_str()],
        "{log:?}"
    );
    let layer_uploads = log
        .iter()
        .filter(|l| l.starts_with("PUT /up/") && l.contains(layer.as_str()))
        .count();
    assert_eq!(layer_uploads, 1, "{log:?}");
}
