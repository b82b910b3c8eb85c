//! End-to-end: kiln's dashboard in a real headless Chromium (issue 20), driven through
//! Debian's `chromedriver` (W3C WebDriver, `common/webdriver.rs`), against a real daemon on
//! real runc with real load. One daemon and one browser serve every check, for CI's time:
//! a canary seen stepping live and aborted from the page with the token (and refused
//! without it), a failed canary's verdict with its numbers, screenshots of the main views,
//! and the page's weight and first render with 20 apps and 1,000 ledger events.
//!
//! The DOM and HTTP contract the tests rely on is the dashboard's (`docs/dashboard.md`).
//! `webdriver_drives_a_static_page` checks the client itself against a page of its own, so
//! that a failure of the dashboard test is about the dashboard.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::webdriver::{self, Browser, http};
use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "dashboard-test-token";

/// The canary the page watches and aborts: a short first step, then a second one long
/// enough to be aborted in.
const SLOW_CANARY: &str = r#"[deploy]
strategy = "canary"
keep_previous = "10m"
progress_deadline = "15m"

[[deploy.steps]]
weight = 10
pause = "6s"

[[deploy.steps]]
weight = 50
pause = "10m"

[[deploy.steps]]
weight = 100

[deploy.analysis]
max_error_rate = "1%"
max_p99 = "1s"
min_requests = 50
compare_to_stable = true
"#;

/// The canary that fails its first step on errors (as in `progressive.rs`).
const CANARY: &str = r#"[deploy]
strategy = "canary"
keep_previous = "10m"
progress_deadline = "1m"

[[deploy.steps]]
weight = 10
pause = "4s"

[[deploy.steps]]
weight = 50
pause = "3s"

[[deploy.steps]]
weight = 100

[deploy.analysis]
max_error_rate = "1%"
max_p99 = "1s"
min_requests = 50
compare_to_stable = true
"#;

/// Apps on the overview for the load measurement, `web` included.
const APPS: usize = 20;
/// Ledger events at least, for the load measurement.
const EVENTS: usize = 1000;
/// The page's own HTML, JS and CSS, uncompressed, at most.
const PAGE_BUDGET: u64 = 300 * 1024;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn dashboard_follows_a_canary_aborts_it_with_the_token_and_stays_light() {
    if !runc_prerequisites() || !webdriver::prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let ui_port = free_port();
    let ui: SocketAddr = ([127, 0, 0, 1], ui_port).into();
    let _daemon = Daemon::start_with(
        &state,
        &[
            "--ui-listen",
            &ui.to_string(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(ui).is_err() {
        assert!(Instant::now() < deadline, "the dashboard did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let shots = webdriver::screenshot_dir();
    let browser = Browser::start();

    // Release 1, stable, under load.
    let port = free_port();
    let spec = write_spec(dir.path(), port, "v1", 2);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    let load = Load::start(port, 8);

    // The HTTP side of the contract, before any page: who is authorized, what is refused.
    let session = |auth: Option<&str>| -> (Value, Value) {
        let header = auth.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| ("authorization", h))
            .into_iter()
            .collect();
        let (code, body) = http(ui, "GET", "/ui/session", &headers, "").unwrap();
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (v["authorized"].clone(), v["actions"].clone())
    };
    assert_eq!(session(None), (json!(false), json!(true)));
    assert_eq!(session(Some("not-the-token")), (json!(false), json!(true)));
    assert_eq!(session(Some(TOKEN)), (json!(true), json!(true)));
    let (code, body) = http(ui, "GET", "/ui/state", &[("host", "evil.example")], "").unwrap();
    assert_eq!(code, 403, "a rebound host name was served: {body}");
    let (code, body) = http(ui, "GET", "/v1/apps", &[], "").unwrap();
    assert_eq!((code, body.contains("web")), (200, true), "{body}");

    // The page, on the app, before the canary.
    browser.goto(&format!("http://{ui}/#/apps/web"));
    browser.wait_css("body[data-ready=\"1\"]", WAIT);
    browser.wait_css("section#app[data-app=\"web\"]", WAIT);
    assert_eq!(
        browser.query_one("body").unwrap().attr("data-auth"),
        Some("none")
    );

    // Release 2 as a canary, followed by a `kiln apply` in the background.
    let spec = write_spec_with(dir.path(), port, r#"HELLO_VERSION = "v2""#, 2, SLOW_CANARY);
    let mut applying = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(&state)
        .args(["apply", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // The page sees the step and the weights change live, without a reload.
    let weights = |b: &Browser| -> Vec<(String, String)> {
        b.query("#weights [data-release][data-weight]")
            .iter()
            .map(|n| {
                (
                    n.attr("data-release").unwrap().to_owned(),
                    n.attr("data-weight").unwrap().to_owned(),
                )
            })
            .collect()
    };
    let step_text = |b: &Browser| b.query_one("#step").map(|n| n.text).unwrap_or_default();
    let first = browser.wait_for("step 1 at 10%", WAIT, |b| {
        let w = weights(b);
        (w.contains(&("2".to_owned(), "10".to_owned())) && step_text(b).contains("step 1"))
            .then(|| (step_text(b), w))
    });
    let second = browser.wait_for("step 2 at 50%", WAIT, |b| {
        let w = weights(b);
        (w.contains(&("2".to_owned(), "50".to_owned())) && step_text(b).contains("step 2"))
            .then(|| (step_text(b), w))
    });
    eprintln!("the page showed {first:?}, then {second:?}");
    assert_ne!(first.0, second.0);
    assert!(
        second.1.contains(&("1".to_owned(), "50".to_owned())),
        "{second:?}"
    );
    assert_eq!(browser.query_one("#phase").unwrap().text, "progressing");

    // Both releases are charted, with more than one sample each.
    for chart in ["chart-rps", "chart-errors", "chart-p99"] {
        browser.wait_for(&format!("{chart} drawn for both releases"), WAIT, |b| {
            let points = |release: &str| -> u64 {
                b.query_one(&format!("svg#{chart} polyline[data-release=\"{release}\"]"))
                    .and_then(|n| n.attr("data-points").and_then(|p| p.parse().ok()))
                    .unwrap_or(0)
            };
            (points("1") > 1 && points("2") > 1).then_some(())
        });
    }
    let rollout_png = shots.join("rollout.png");
    browser.screenshot(&rollout_png);
    eprintln!("screenshot: {}", rollout_png.display());

    // Without the token: no action is offered, and the API refuses one.
    assert!(
        browser.query("[data-action]").is_empty(),
        "actions offered without a token: {:?}",
        browser.query("[data-action]")
    );
    let abort = "/v1/apps/web/abort";
    let (code, body) = http(
        ui,
        "POST",
        abort,
        &[("content-type", "application/json")],
        "{}",
    )
    .unwrap();
    assert_eq!(code, 401, "abort without a token: {body}");
    let bearer = format!("Bearer {TOKEN}");
    let (code, body) = http(
        ui,
        "POST",
        abort,
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer),
            ("origin", "http://evil.example"),
        ],
        "{}",
    )
    .unwrap();
    assert_eq!(code, 403, "abort from a foreign origin: {body}");
    let (code, body) = http(
        ui,
        "POST",
        abort,
        &[("content-type", "text/plain"), ("authorization", &bearer)],
        "{}",
    )
    .unwrap();
    assert!(
        (400..500).contains(&code),
        "abort as text/plain (what a cross-site form sends): {code} {body}"
    );
    let s = status(&state);
    assert_eq!(
        (s["phase"].as_str(), s["step"].as_u64()),
        (Some("progressing"), Some(2)),
        "a refused request changed the rollout: {s:#}"
    );

    // With the token: the page offers abort, asks to confirm, and the route returns to stable.
    browser.type_css("input#token", TOKEN);
    browser.click_css("button#token-save");
    browser.wait_css("body[data-auth=\"token\"]", WAIT);
    browser.wait_css("button[data-action=\"abort\"]", WAIT);
    browser.click_css("button[data-action=\"abort\"]");
    browser.wait_css("dialog#confirm[open]", WAIT);
    browser.click_css("button#confirm-yes");
    wait_until(&state, WAIT, |s| {
        s["phase"] == "aborted" && s["weights"] == json!({"1": 100})
    });
    browser.wait_for("#phase aborted", WAIT, |b| {
        b.query_one("#phase").filter(|n| n.text == "aborted")
    });
    assert!(
        browser
            .query(".action-error")
            .iter()
            .all(|n| n.text.is_empty()),
        "{:?}",
        browser.query(".action-error")
    );
    let s = status(&state);
    let routed: Vec<&Value> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["routed"] == true)
        .collect();
    assert!(!routed.is_empty(), "{s:#}");
    assert!(routed.iter().all(|i| i["release"] == 1), "{s:#}");
    let router: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..20 {
        let answer = raw_get(router, "web", "/");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello from v1\n"),
            "{answer}"
        );
    }
    let (_, failed) = load.counts();
    assert_eq!(failed, 0, "requests failed around the abort");
    let events = history(&state);
    let asked = events
        .iter()
        .find(|e| e["kind"] == "rollout.abort_requested")
        .unwrap_or_else(|| panic!("no abort in the ledger: {events:#?}"));
    let actor = asked["data"]["actor"].as_str().unwrap();
    assert!(
        actor.contains("token") || actor.contains("dashboard"),
        "the abort's actor names neither the token nor the dashboard: {actor}"
    );
    let seq = asked["seq"].as_u64().unwrap();
    browser.wait_for("the abort on the timeline", WAIT, |b| {
        b.query_one(&format!("#timeline li[data-seq=\"{seq}\"]"))
    });
    browser.wait_css("#chain[data-state=\"ok\"]", WAIT);
    assert!(!browser.query("#instances tr[data-instance]").is_empty());
    let exit = applying.wait().unwrap();
    assert_eq!(exit.code(), Some(1), "kiln apply of the aborted canary");

    // A canary failing 20% of its requests: the page shows the verdict, its numbers and
    // the thresholds.
    let spec = write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v3", HELLO_FAIL_RATE = "0.2""#,
        2,
        CANARY,
    );
    let out = kiln(&state)
        .args(["apply", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("aborted at step 1 (10%): error rate"),
        "{text}"
    );
    let _ = load.finish();
    let judged = history(&state)
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "rollout.step_judged")
        .unwrap();
    let verdict = &judged["data"]["verdict"];
    assert_eq!(verdict["verdict"], "fail", "{judged:#}");
    let failed = browser.wait_css(".verdict[data-verdict=\"fail\"]", WAIT);
    // Each side's requests, error rate (%) and p99 (ms), as the ledger has them.
    for side in ["canary", "stable"] {
        let m = &verdict["metrics"][side];
        let requests = m["requests"].as_u64().unwrap();
        let rate = m["errors"].as_f64().unwrap() * 100.0 / requests as f64;
        let p99 = m["p99_ms"].as_f64().unwrap();
        for (what, value) in [
            ("requests", requests as f64),
            ("error rate", rate),
            ("p99", p99),
        ] {
            assert!(
                shows(&failed.text, value),
                "the verdict lacks the {side}'s {what} ({value}): {}",
                failed.text
            );
        }
    }
    // The thresholds of CANARY: max_error_rate = "1%", max_p99 = "1s".
    let lower = failed.text.to_lowercase();
    for (what, forms) in [
        ("error rate", &["error rate"][..]),
        ("p99", &["p99"][..]),
        ("max error rate", &["1%", "1.0%", "1 %"][..]),
        (
            "max p99",
            &[
                "1s", "1 s", "1000ms", "1000 ms", "1,000 ms", "1.0s", "1.0 s",
            ][..],
        ),
    ] {
        assert!(
            forms.iter().any(|f| has_number(&lower, f)),
            "the verdict lacks its {what} (one of {forms:?}): {}",
            failed.text
        );
    }
    browser.execute(
        "document.querySelector('.verdict[data-verdict=\"fail\"]').scrollIntoView({block: 'center'})",
        &[],
    );
    let failed_png = shots.join("failed-canary.png");
    browser.screenshot(&failed_png);
    eprintln!("screenshot: {}", failed_png.display());

    // 19 more apps and at least 1,000 ledger events, then the page loaded fresh.
    let names = more_apps(dir.path(), &state, &image, APPS - 1);
    let mut events = all_events(&state);
    let mut scaled = 0;
    while events + scaled < EVENTS {
        let app = &names[scaled % names.len()];
        let (code, body) = unix_post(
            &state,
            &format!("/v1/apps/{app}/scale"),
            r#"{"replicas":1}"#,
        );
        assert_eq!(code, 200, "{body}");
        scaled += 1;
    }
    events = all_events(&state);
    assert!(events >= EVENTS, "{events} events");
    let (code, body) = http(ui, "GET", "/v1/apps", &[], "").unwrap();
    assert_eq!(code, 200, "{body}");
    let listed: Vec<String> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.len(), APPS, "{listed:?}");

    let page = PageLoad::measure(&browser, &format!("http://{ui}/"));
    let total = page.total();
    eprintln!(
        "dashboard with {APPS} apps and {events} ledger events: first view rendered \
         {:.0} ms after navigation (the issue's aim: 1 s; not asserted); the page's own load \
         is {total} bytes (HTML {}, {:?})",
        page.first_render_ms, page.html, page.assets
    );
    assert!(
        total < PAGE_BUDGET,
        "the page's own HTML+JS+CSS is {total} bytes, over {PAGE_BUDGET}: {page:?}"
    );

    // The overview lists every app with its phase; a click opens the app.
    let apps = browser.wait_for(&format!("{APPS} apps on the overview"), WAIT, |b| {
        let apps = b.query("#apps a.app[data-app]");
        (apps.len() == APPS).then_some(apps)
    });
    let web = apps
        .iter()
        .find(|a| a.attr("data-app") == Some("web"))
        .unwrap();
    let phase = browser
        .query_one("#apps a.app[data-app=\"web\"] .phase")
        .unwrap();
    assert_eq!(phase.text, "aborted", "{web:?}");
    for name in &names {
        assert!(
            apps.iter()
                .any(|a| a.attr("data-app") == Some(name.as_str())),
            "{name} is not on the overview"
        );
    }
    let overview_png = shots.join("overview.png");
    browser.screenshot(&overview_png);
    eprintln!("screenshot: {}", overview_png.display());
    browser.click_css("#apps a.app[data-app=\"web\"]");
    browser.wait_css("section#app[data-app=\"web\"]", WAIT);
    let hash = browser.execute("return location.hash", &[]);
    assert_eq!(hash, json!("#/apps/web"));
}

/// Whether `text` shows `value`, rounded to 0 to 3 decimals, its thousands perhaps grouped
/// (`12,664`, `12 664`).
fn shows(text: &str, value: f64) -> bool {
    // Thousands separators go: a comma or space between a digit and three more that end.
    let chars: Vec<char> = text.chars().collect();
    let plain: String = chars
        .iter()
        .enumerate()
        .filter(|&(i, c)| {
            let grouping = matches!(c, ',' | ' ' | '\u{202f}' | '\u{a0}')
                && i > 0
                && chars[i - 1].is_ascii_digit()
                && chars.len() > i + 3
                && chars[i + 1..=i + 3].iter().all(char::is_ascii_digit)
                && !chars.get(i + 4).is_some_and(char::is_ascii_digit);
            !grouping
        })
        .map(|(_, c)| c)
        .collect();
    (0..=3).any(|decimals| {
        let number = format!("{value:.decimals$}");
        has_number(text, &number) || has_number(&plain, &number)
    })
}

/// Whether `text` holds `number` as a whole number, not as the end of a longer one (`1%`
/// is not in `21%` nor in `0.1%`) nor as the start of one (`12` is not in `123`).
fn has_number(text: &str, number: &str) -> bool {
    text.match_indices(number).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + number.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

/// What a fresh load of the page weighed, as the browser measured it, and when it
/// first rendered.
#[derive(Debug)]
struct PageLoad {
    /// `window.kilnFirstRenderMs`: `performance.now()` when the first view was drawn.
    first_render_ms: f64,
    /// The document, decoded.
    html: u64,
    /// Each same-origin script and stylesheet fetched (its path), decoded.
    assets: Vec<(String, u64)>,
}

impl PageLoad {
    /// Navigates to `url` with an empty cache, waits for `body[data-ready="1"]` and reads
    /// the navigation and resource timing entries; checks that every script and stylesheet
    /// the page links to was measured, so that nothing escapes the sum.
    fn measure(browser: &Browser, url: &str) -> PageLoad {
        browser.goto("about:blank");
        browser.clear_cache();
        browser.goto(url);
        browser.wait_css("body[data-ready=\"1\"]", WAIT);
        let measured = browser.execute(
            "const nav = performance.getEntriesByType('navigation')[0]; \
             const assets = performance.getEntriesByType('resource') \
               .filter(r => { const u = new URL(r.name); \
                 return u.origin === location.origin && /\\.(js|css)$/.test(u.pathname); }) \
               .map(r => [new URL(r.name).pathname, r.decodedBodySize]); \
             const linked = Array.from(document.querySelectorAll('script[src]')).map(s => s.src) \
               .concat(Array.from(document.querySelectorAll('link[rel=stylesheet]')) \
                 .map(l => l.href)) \
               .map(u => new URL(u, location.href)) \
               .filter(u => u.origin === location.origin).map(u => u.pathname); \
             return { first_render_ms: window.kilnFirstRenderMs, html: nav.decodedBodySize, \
                      assets: assets, linked: linked };",
            &[],
        );
        let page = PageLoad {
            first_render_ms: measured["first_render_ms"].as_f64().unwrap_or_else(|| {
                panic!("window.kilnFirstRenderMs is not a number: {measured:#}")
            }),
            html: measured["html"].as_u64().unwrap(),
            assets: measured["assets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r[0].as_str().unwrap().to_owned(), r[1].as_u64().unwrap()))
                .collect(),
        };
        assert!(page.html > 0, "{measured:#}");
        for path in measured["linked"].as_array().unwrap() {
            let path = path.as_str().unwrap();
            assert!(
                page.assets.iter().any(|(p, size)| p == path && *size > 0),
                "{path} was not fetched and measured: {measured:#}"
            );
        }
        page
    }

    /// HTML, scripts and stylesheets together.
    fn total(&self) -> u64 {
        self.html + self.assets.iter().map(|(_, size)| size).sum::<u64>()
    }
}

/// `count` more apps of the example (`app01`…), one instance each and a slower health
/// check, applied all at once; their names.
fn more_apps(dir: &Path, state: &Path, image: &str, count: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut applying = Vec::new();
    for i in 1..=count {
        let name = format!("app{i:02}");
        let app_dir = dir.join(&name);
        std::fs::create_dir_all(&app_dir).unwrap();
        let spec = write_spec_with(
            &app_dir,
            free_port(),
            r#"HELLO_VERSION = "v1""#,
            1,
            "[deploy]\nprogress_deadline = \"5m\"\n",
        );
        let text = std::fs::read_to_string(&spec)
            .unwrap()
            .replace("name = \"web\"", &format!("name = \"{name}\""))
            .replace("interval = \"100ms\"", "interval = \"2s\"")
            .replace("timeout = \"100ms\"", "timeout = \"1s\"");
        std::fs::write(&spec, text).unwrap();
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
            .arg("--state")
            .arg(state)
            .args(["apply", "-f"])
            .arg(&spec)
            .args(["--image", image])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        applying.push((name.clone(), child));
        names.push(name);
    }
    for (name, child) in applying {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kiln apply {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    names
}

/// How many events the whole ledger holds.
fn all_events(state: &Path) -> usize {
    let out = kiln(state)
        .args(["history", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    serde_json::from_slice::<Vec<Value>>(&out).unwrap().len()
}

/// One JSON `POST` over the daemon's Unix socket: the status and the body.
fn unix_post(state: &Path, path: &str, body: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(state.join("kiln.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (_, text) = out.split_once("\r\n\r\n").unwrap();
    (status, text.to_owned())
}

/// The browser harness itself, against a page of its own that redraws as the dashboard
/// does: navigation, reads, typing, clicks, scripts, waits, the cache, resource sizes and
/// 1280×800 screenshots. Needs chromedriver, not runc.
#[test]
fn webdriver_drives_a_static_page() {
    if !webdriver::prerequisites() {
        return;
    }
    let _serial = serial();
    let server = StaticSite::start();
    let browser = Browser::start();
    browser.goto(&format!("http://{}/#/start", server.addr));
    let ready = browser.wait_css("body[data-ready=\"1\"]", WAIT);
    assert_eq!(ready.attr("data-auth"), Some("none"));
    assert_eq!(
        browser.execute("return location.hash", &[]),
        json!("#/start")
    );

    // Reads through element references and through one script agree.
    let title = browser.find("h1#title").unwrap();
    assert_eq!(browser.text(&title).unwrap(), "static page");
    assert_eq!(
        browser.attribute(&title, "data-kind").unwrap().as_deref(),
        Some("fixture")
    );
    assert_eq!(browser.attribute(&title, "data-none").unwrap(), None);
    assert!(browser.find("#absent").is_none());
    assert_eq!(browser.find_all("li.item").len(), 3);
    let items = browser.query("li.item");
    assert_eq!(
        items.iter().map(|n| n.text.as_str()).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert_eq!(items[1].attr("data-n"), Some("2"));

    // The counter is redrawn (replaced) every 100 ms: waits see it move, clicks survive it.
    let first: u64 = browser
        .query_one("#counter .n")
        .unwrap()
        .text
        .parse()
        .unwrap();
    browser.wait_for("the counter to move", WAIT, |b| {
        let now: u64 = b.query_one("#counter .n").unwrap().text.parse().unwrap();
        (now > first + 2).then_some(())
    });
    browser.click_css("#counter button");
    browser.wait_css("#clicked[data-count=\"1\"]", WAIT);

    // The token form and a confirm dialog, as the dashboard has them.
    assert!(browser.query("button[data-action]").is_empty());
    browser.type_css("input#token", "wrong");
    browser.click_css("button#token-save");
    browser.wait_css("#saved[data-value=\"wrong\"]", WAIT);
    assert!(browser.query("body[data-auth=\"token\"]").is_empty());
    browser.execute("document.querySelector('input#token').value = ''", &[]);
    browser.type_css("input#token", "secret");
    browser.click_css("button#token-save");
    browser.wait_css("body[data-auth=\"token\"]", WAIT);
    browser.click_css("button[data-action=\"abort\"]");
    browser.wait_css("dialog#confirm[open]", WAIT);
    browser.click_css("button#confirm-yes");
    browser.wait_css("#done[data-action=\"abort\"]", WAIT);

    // A fresh load after emptying the cache measures every resource again.
    let page = PageLoad::measure(&browser, &format!("http://{}/", server.addr));
    assert_eq!(page.html, StaticSite::HTML.len() as u64, "{page:?}");
    assert_eq!(
        page.assets,
        [
            ("/ui/app.css".to_owned(), StaticSite::CSS.len() as u64),
            ("/ui/app.js".to_owned(), StaticSite::JS.len() as u64)
        ],
    );
    assert!(page.first_render_ms > 0.0, "{page:?}");
    eprintln!(
        "static page: first render at {:.1} ms",
        page.first_render_ms
    );

    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("static.png");
    browser.screenshot(&png);
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

/// A page, a script and a stylesheet served over HTTP/1.1 from a thread, one request per
/// connection.
struct StaticSite {
    addr: SocketAddr,
}

impl StaticSite {
    const HTML: &'static str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>static</title>
<link rel="stylesheet" href="/ui/app.css"></head>
<body data-auth="none">
<h1 id="title" data-kind="fixture">static page</h1>
<ul><li class="item" data-n="1">one</li><li class="item" data-n="2">two</li><li class="item" data-n="3">three</li></ul>
<div id="counter"></div><div id="clicked" data-count="0"></div>
<input id="token" type="password"><button id="token-save">save</button><div id="saved"></div>
<div id="actions"></div>
<dialog id="confirm"><button id="confirm-yes">yes</button><button id="confirm-no">no</button></dialog>
<div id="done"></div>
<script src="/ui/app.js"></script>
</body></html>
"#;
    const JS: &str = r#"let n = 0, clicks = 0;
function draw() {
  const c = document.getElementById('counter');
  c.innerHTML = '';
  const v = document.createElement('span');
  v.className = 'n';
  v.textContent = String(n++);
  c.append(v);
  const b = document.createElement('button');
  b.textContent = 'count';
  b.onclick = () => { clicks++; document.getElementById('clicked').dataset.count = clicks; };
  c.append(b);
}
draw();
setInterval(draw, 100);
document.getElementById('token-save').onclick = () => {
  const t = document.getElementById('token').value;
  sessionStorage.setItem('token', t);
  document.getElementById('saved').dataset.value = t;
  document.body.dataset.auth = t === 'secret' ? 'token' : 'none';
  const a = document.getElementById('actions');
  a.innerHTML = '';
  if (t === 'secret') {
    const b = document.createElement('button');
    b.dataset.action = 'abort';
    b.textContent = 'abort';
    b.onclick = () => document.getElementById('confirm').showModal();
    a.append(b);
  }
};
document.getElementById('confirm-yes').onclick = () => {
  document.getElementById('confirm').close();
  document.getElementById('done').dataset.action = 'abort';
};
document.body.dataset.ready = '1';
window.kilnFirstRenderMs = performance.now();
"#;
    const CSS: &str = "body { font-family: sans-serif; margin: 2em; }\n#counter { color: #a40; }\n";

    fn start() -> StaticSite {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (kind, body) = match path {
                    "/ui/app.js" => ("text/javascript", StaticSite::JS),
                    "/ui/app.css" => ("text/css", StaticSite::CSS),
                    "/" => ("text/html; charset=utf-8", StaticSite::HTML),
                    _ => ("text/plain", ""),
                };
                let status = if body.is_empty() {
                    "404 Not Found"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                     Cache-Control: max-age=3600\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        StaticSite { addr }
    }
}

/// The matching of the failed verdict's numbers: whole numbers, grouped or not, at any of
/// the roundings a page might choose.
#[test]
fn verdict_numbers_are_matched_whole() {
    let text = "step 1 (10%): fail — canary 1,407 requests, error rate 19.97%, p99 15.5 ms; \
                stable 12 664 requests, error rate 0.0%, p99 9.8 ms (max error rate 1%, max p99 1 s)";
    assert!(shows(text, 1407.0));
    assert!(shows(text, 12664.0));
    assert!(shows(text, 19.9716));
    assert!(shows(text, 15.487));
    assert!(shows(text, 9.791));
    assert!(shows(text, 0.0));
    assert!(!shows(text, 140.0));
    assert!(!shows(text, 21.0));
    assert!(has_number("max 1%", "1%"));
    assert!(!has_number("rate 21%", "1%"));
    assert!(!has_number("rate 20.1%", "1%"));
    assert!(!has_number("123", "12"));
    assert!(shows("p99 150 ms", 150.0));
}
