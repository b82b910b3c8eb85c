//! `fetch` over `https://` against a real smart-HTTP git server the test runs on the
//! loopback: hyper and rustls in front of `git http-backend` (CGI), with a certificate from
//! a CA made for the test. The fetch that trusts that CA runs in a child process whose
//! `SSL_CERT_FILE` names it (this process's environment is shared by every test); the one
//! here, which does not, must be refused.

#![cfg(feature = "https")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use kiln_git::{GitError, checkout, describe, fetch};

/// The child test's inputs, and the variable that makes it run.
const CHILD_URL: &str = "KILN_GIT_TEST_HTTPS_URL";
const CHILD_DIR: &str = "KILN_GIT_TEST_HTTPS_DIR";
const CHILD_COMMIT: &str = "KILN_GIT_TEST_HTTPS_COMMIT";

fn git_available() -> bool {
    let found = Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but the git program is missing (scripts/ci-setup.sh installs it)");
        }
        eprintln!("skipping: the https test serves with git http-backend, which is missing");
    }
    found
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args([
            "-c",
            "user.name=Ada Lovelace",
            "-c",
            "user.email=ada@kiln.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `git http-backend` for one request, as a CGI server would, and turns its output
/// (CGI headers, a blank line, the body) into a response.
fn cgi(root: &Path, head: &hyper::http::request::Parts, body: Bytes) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        head.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut child = Command::new("git")
        .arg("http-backend")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", head.method.as_str())
        .env("PATH_INFO", head.uri.path())
        .env("QUERY_STRING", head.uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        })
        .expect("CGI headers end with a blank line");
    let headers = String::from_utf8_lossy(&out.stdout[..split.0]).into_owned();
    let mut response = Response::builder().status(200);
    for line in headers.lines() {
        let (name, value) = line.split_once(':').unwrap();
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.split_whitespace().next().unwrap().parse().unwrap();
            response = response.status(code);
        } else {
            response = response.header(name, value);
        }
    }
    response
        .body(Full::new(Bytes::copy_from_slice(
            &out.stdout[split.0 + split.1..],
        )))
        .unwrap()
}

/// Serves the repositories under `root` over HTTPS on the loopback, on a thread of its own
/// for the rest of the test process; returns the address and the CA's certificate (PEM).
fn serve(root: PathBuf, tls_dir: &Path) -> (SocketAddr, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let ca_pem = tls_dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let root = root.clone();
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake: not an error
                    // of the server's.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let root = root.clone();
                            async move {
                                let (head, body) = req.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                let response =
                                    tokio::task::spawn_blocking(move || cgi(&root, &head, body))
                                        .await
                                        .unwrap();
                                Ok::<_, Infallible>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
    (addr, ca_pem)
}

/// Every message of `err`'s chain, joined.
fn chain(err: &GitError) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

#[test]
fn fetch_over_https_trusts_the_system_roots_only() {
    if !git_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let served = root.join("served");
    let bare = served.join("forge.git");
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "-q", "--bare"]);
    let dev = root.join("dev");
    std::fs::create_dir(&dev).unwrap();
    git(&dev, &["init", "-q"]);
    std::fs::write(dev.join("kiln.toml"), "[app]\n").unwrap();
    git(&dev, &["add", "-A"]);
    git(&dev, &["commit", "-q", "-m", "over https"]);
    git(&dev, &["push", "-q", bare.to_str().unwrap(), "HEAD:main"]);
    let id = git(&dev, &["rev-parse", "HEAD"]).trim().to_owned();
    let (addr, ca_pem) = serve(served, &root);
    let url = format!("https://{addr}/forge.git");

    // Trusting the test's CA (in a child process): the fetch, checkout and a missing branch.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_https_fetch",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SSL_CERT_FILE", &ca_pem)
        .env(CHILD_URL, &url)
        .env(CHILD_DIR, &root)
        .env(CHILD_COMMIT, &id)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "{stdout}");

    // Here the CA is not trusted: refused, and the URL's credentials appear nowhere.
    let secret_url = format!("https://alice:s3cret@{addr}/forge.git");
    let err = fetch(&secret_url, "main", &root.join("untrusted")).unwrap_err();
    assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
    let text = chain(&err);
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert!(
        !text.contains("s3cret") && !text.contains("alice"),
        "{text}"
    );
    assert!(
        text.contains(&format!("https://{addr}/forge.git")),
        "{text}"
    );
}

#[test]
fn child_https_fetch() {
    let Some(url) = std::env::var_os(CHILD_URL) else {
        return;
    };
    let url = url.into_string().unwrap();
    let root = PathBuf::from(std::env::var_os(CHILD_DIR).unwrap());
    let id = std::env::var(CHILD_COMMIT).unwrap();
    let mirror = root.join("mirror");
    // As the daemon calls it: on a blocking thread of a tokio runtime (reqwest's blocking
    // client runs a runtime of its own, which must not clash with the caller's).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let commit = runtime
        .block_on({
            let url = url.clone();
            let mirror = mirror.clone();
            async move { tokio::task::spawn_blocking(move || fetch(&url, "main", &mirror)).await }
        })
        .unwrap()
        .unwrap();
    assert_eq!(commit.id, id);
    assert_eq!(commit.summary, "over https");
    let dest = root.join("work");
    checkout(&mirror, &id, &dest).unwrap();
    let source = describe(&dest).unwrap().unwrap();
    assert_eq!(source.commit.as_deref(), Some(id.as_str()));
    assert!(source.clean);
    assert_eq!(source.remote.as_deref(), Some(url.as_str()));

    let err = fetch(&url, "nope", &mirror).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("branch nope does not exist in {url}")
    );
}
