//! A small W3C WebDriver client for the browser tests: it starts Debian's `chromedriver`,
//! opens one headless Chromium session at 1280×800 and offers what the dashboard tests need
//! (navigate, find by CSS, read text and attributes, click, type, run a script, wait, take a
//! screenshot). HTTP goes through hyper, as the rest of the tests' clients do; nothing here
//! is product code.
//!
//! The page's DOM is re-rendered while a test reads it (the dashboard redraws on every
//! server-sent snapshot), so reads go through [`Browser::query`], one script that returns the
//! text and attributes of every match at once, rather than through element references that a
//! redraw would make stale; a click finds its element again when that happens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The window every test sees, and the size of every screenshot.
pub const WINDOW: (u32, u32) = (1280, 800);

/// Whether `chromedriver` (and the Chromium it drives) can run here; panics under `CI=true`
/// when it cannot, as [`super::runc_prerequisites`] does.
pub fn prerequisites() -> bool {
    let driver = std::process::Command::new("chromedriver")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let browser = chromium_binary().is_some();
    if driver && browser {
        return true;
    }
    let why = format!(
        "chromedriver={driver} chromium={browser} (apt-get install chromium chromium-driver)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the browser test prerequisites are missing: {why}");
    }
    eprintln!("note: skipping browser test ({why})");
    false
}

/// Debian's Chromium, named to chromedriver explicitly: its own search looks for Google
/// Chrome first.
fn chromium_binary() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Where screenshots go: `$KILN_SCREENSHOTS`, or `target/screenshots/` of the repository
/// (created).
pub fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_SCREENSHOTS")
        .map_or_else(|| super::root().join("target/screenshots"), PathBuf::from);
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

/// One HTTP/1.1 request to `addr` on a fresh connection: the status and the body as text,
/// or what went wrong. `headers` are sent as given (a `Host` among them replaces the default
/// `Host: ADDR`); a body is sent with its `Content-Length` only when not empty.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Full};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("connection", "close");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("{method} {path}: {e}"))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{method} {path}: body: {e}"))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(Duration::from_secs(120), exchange)
            .await
            .map_err(|_| format!("{method} {path}: no answer within 120s"))?
    })
}

/// An error the WebDriver endpoint answered with (`no such element`, `stale element
/// reference`, …).
#[derive(Debug)]
pub struct WebDriverError {
    pub status: u16,
    pub error: String,
    pub message: String,
}

/// The key of an element reference in WebDriver's JSON (the spec's "web element identifier").
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A reference to an element of the current page.
#[derive(Debug, Clone)]
pub struct Element {
    id: String,
}

/// What [`Browser::query`] returns for one matching element.
#[derive(Debug, Clone)]
pub struct Node {
    /// `textContent`, trimmed.
    pub text: String,
    pub attrs: BTreeMap<String, String>,
}

impl Node {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }
}

/// A chromedriver process and one headless Chromium session; dropping it ends the session
/// and kills chromedriver's process group (the browser with it).
pub struct Browser {
    driver: Option<Child>,
    addr: SocketAddr,
    session: String,
    log: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and a session at [`WINDOW`].
    pub fn start() -> Browser {
        use std::os::unix::process::CommandExt;
        let port = super::free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::env::temp_dir().join(format!("kiln-chromedriver-{port}.log"));
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Drop kills the browser it started with it.
            .process_group(0)
            .spawn()
            .unwrap();
        let mut browser = Browser {
            driver: Some(driver),
            addr,
            session: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) = http(addr, "GET", "/status", &[], "") {
                let ready =
                    serde_json::from_str::<Value>(&body).is_ok_and(|v| v["value"]["ready"] == true);
                if ready {
                    break;
                }
            }
            if let Some(exit) = browser
                .driver
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten())
            {
                panic!(
                    "chromedriver exited ({exit}); its log:\n{}",
                    browser.driver_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready; its log:\n{}",
                browser.driver_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (w, h) = WINDOW;
        let mut options = json!({
            "args": [
                "--headless=new",
                // CI runs as root, where Chromium refuses to start sandboxed.
                "--no-sandbox",
                "--disable-gpu",
                format!("--window-size={w},{h}"),
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--disable-crash-reporter",
            ],
        });
        if let Some(binary) = chromium_binary() {
            options["binary"] = json!(binary);
        }
        let caps = json!({
            "capabilities": { "alwaysMatch": { "goog:chromeOptions": options } }
        });
        let value = match browser.command("POST", "/session", &caps) {
            Ok(v) => v,
            Err(e) => panic!(
                "no browser session: {e:?}; chromedriver's log:\n{}",
                browser.driver_log()
            ),
        };
        browser.session = value["sessionId"].as_str().unwrap().to_owned();
        // The viewport, not the window, is what a screenshot captures: make it 1280×800.
        let inner = browser.execute("return [window.innerWidth, window.innerHeight]", &[]);
        let (iw, ih) = (inner[0].as_i64().unwrap(), inner[1].as_i64().unwrap());
        let (w, h) = (i64::from(w), i64::from(h));
        if (iw, ih) != (w, h) {
            let rect = browser
                .session_command("GET", "/window/rect", &Value::Null)
                .unwrap();
            let (ow, oh) = (
                rect["width"].as_i64().unwrap(),
                rect["height"].as_i64().unwrap(),
            );
            let rect = json!({ "width": ow + w - iw, "height": oh + h - ih });
            browser
                .session_command("POST", "/window/rect", &rect)
                .unwrap();
        }
        browser
    }

    /// The end of chromedriver's log, for failure messages.
    pub fn driver_log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }

    /// One WebDriver command: the response's `value`, or the error it carries.
    pub fn command(&self, method: &str, path: &str, body: &Value) -> Result<Value, WebDriverError> {
        let (body, content_type) = if method == "GET" || method == "DELETE" {
            (String::new(), None)
        } else {
            (body.to_string(), Some(("content-type", "application/json")))
        };
        let headers: Vec<(&str, &str)> = content_type.into_iter().collect();
        let (status, text) =
            http(self.addr, method, path, &headers, &body).map_err(|e| WebDriverError {
                status: 0,
                error: "transport".to_owned(),
                message: e,
            })?;
        let value = serde_json::from_str::<Value>(&text)
            .map(|v| v["value"].clone())
            .map_err(|e| WebDriverError {
                status,
                error: "not json".to_owned(),
                message: format!("{e}: {text}"),
            })?;
        if status == 200 {
            Ok(value)
        } else {
            Err(WebDriverError {
                status,
                error: value["error"].as_str().unwrap_or("").to_owned(),
                message: value["message"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    /// A command on this session (`path` after `/session/ID`).
    pub fn session_command(
        &self,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Result<Value, WebDriverError> {
        self.command(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Navigates to `url` and waits for its load event.
    pub fn goto(&self, url: &str) {
        self.session_command("POST", "/url", &json!({ "url": url }))
            .unwrap();
    }

    /// The first element matching `css`, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        let by = json!({"using": "css selector", "value": css});
        match self.session_command("POST", "/element", &by) {
            Ok(v) => Some(element(&v)),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("find {css}: {e:?}"),
        }
    }

    /// Every element matching `css`.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let by = json!({"using": "css selector", "value": css});
        let v = self.session_command("POST", "/elements", &by).unwrap();
        v.as_array().unwrap().iter().map(element).collect()
    }

    /// The element's rendered text (WebDriver's "Get Element Text").
    pub fn text(&self, e: &Element) -> Result<String, WebDriverError> {
        self.session_command("GET", &format!("/element/{}/text", e.id), &Value::Null)
            .map(|v| v.as_str().unwrap_or("").to_owned())
    }

    /// The element's attribute `name`, if set.
    pub fn attribute(&self, e: &Element, name: &str) -> Result<Option<String>, WebDriverError> {
        self.session_command(
            "GET",
            &format!("/element/{}/attribute/{name}", e.id),
            &Value::Null,
        )
        .map(|v| v.as_str().map(str::to_owned))
    }

    /// Clicks the element.
    pub fn click(&self, e: &Element) -> Result<(), WebDriverError> {
        self.session_command("POST", &format!("/element/{}/click", e.id), &json!({}))
            .map(drop)
    }

    /// Types `text` into the element.
    pub fn send_keys(&self, e: &Element, text: &str) -> Result<(), WebDriverError> {
        self.session_command(
            "POST",
            &format!("/element/{}/value", e.id),
            &json!({ "text": text }),
        )
        .map(drop)
    }

    /// Clicks the first element matching `css`, finding it again when a redraw replaced it
    /// between the find and the click; waits up to 10 s for it to exist.
    pub fn click_css(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let outcome = match self.find(css) {
                Some(e) => self.click(&e),
                None => Err(WebDriverError {
                    status: 404,
                    error: "no such element".to_owned(),
                    message: css.to_owned(),
                }),
            };
            match outcome {
                Ok(()) => return,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.error.as_str(),
                            "stale element reference"
                                | "no such element"
                                | "element click intercepted"
                                | "element not interactable"
                        ) => {}
                Err(e) => self.fail(&format!("click {css}: {e:?}")),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `text` into the first element matching `css` (retried as [`Self::click_css`]).
    pub fn type_css(&self, css: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let outcome = match self.find(css) {
                Some(e) => self.send_keys(&e, text),
                None => Err(WebDriverError {
                    status: 404,
                    error: "no such element".to_owned(),
                    message: css.to_owned(),
                }),
            };
            match outcome {
                Ok(()) => return,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.error.as_str(),
                            "stale element reference" | "no such element"
                        ) => {}
                Err(e) => self.fail(&format!("type into {css}: {e:?}")),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub fn execute(&self, script: &str, args: &[Value]) -> Value {
        match self.session_command(
            "POST",
            "/execute/sync",
            &json!({ "script": script, "args": args }),
        ) {
            Ok(v) => v,
            Err(e) => panic!("script failed: {e:?}\n{script}"),
        }
    }

    /// The text and attributes of every element matching `css`, read in one go.
    pub fn query(&self, css: &str) -> Vec<Node> {
        let v = self.execute(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => ({ \
               text: (e.textContent || '').trim(), \
               attrs: Object.fromEntries(Array.from(e.attributes).map(a => [a.name, a.value])) \
             }));",
            &[json!(css)],
        );
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| Node {
                text: n["text"].as_str().unwrap_or("").to_owned(),
                attrs: n["attrs"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                    .collect(),
            })
            .collect()
    }

    /// The first element matching `css`, read as [`Self::query`] does.
    pub fn query_one(&self, css: &str) -> Option<Node> {
        self.query(css).into_iter().next()
    }

    /// Polls `ok` every 100 ms until it returns something or `limit` passes; then fails,
    /// saying what it waited for, with the page's text and a screenshot
    /// (`failed-wait.png`).
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut ok: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(t) = ok(self) {
                return t;
            }
            if start.elapsed() > limit {
                self.fail(&format!("waited {limit:?} for {what}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until an element matches `css`; returns the first.
    pub fn wait_css(&self, css: &str, limit: Duration) -> Node {
        self.wait_for(css, limit, |b| b.query_one(css))
    }

    /// Panics with `why`, the page's URL and HTML, after saving `failed-wait.png`.
    pub fn fail(&self, why: &str) -> ! {
        let shot = screenshot_dir().join("failed-wait.png");
        let saved = self.try_screenshot(&shot).map_or_else(
            |e| format!("no screenshot: {e:?}"),
            |()| format!("screenshot: {}", shot.display()),
        );
        let page = self
            .session_command(
                "POST",
                "/execute/sync",
                &json!({"script": "return location.href + '\\n' + document.documentElement.outerHTML", "args": []}),
            )
            .map(|v| v.as_str().unwrap_or("").to_owned())
            .unwrap_or_else(|e| format!("{e:?}"));
        let end = page.char_indices().nth(8000).map_or(page.len(), |(i, _)| i);
        panic!(
            "{why}\n{saved}\n--- page ---\n{}\n--- end of page ---",
            &page[..end]
        );
    }

    /// Saves a PNG of the viewport to `path` and checks it is [`WINDOW`] in size.
    pub fn screenshot(&self, path: &Path) {
        self.try_screenshot(path).unwrap();
        let png = std::fs::read(path).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{}", path.display());
        // The IHDR chunk: width and height, big-endian, at bytes 16..24.
        let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((w, h), WINDOW, "{}", path.display());
    }

    fn try_screenshot(&self, path: &Path) -> Result<(), WebDriverError> {
        use base64ct::{Base64, Encoding};
        let v = self.session_command("GET", "/screenshot", &Value::Null)?;
        let png = Base64::decode_vec(v.as_str().unwrap_or("")).map_err(|e| WebDriverError {
            status: 0,
            error: "base64".to_owned(),
            message: e.to_string(),
        })?;
        std::fs::write(path, png).map_err(|e| WebDriverError {
            status: 0,
            error: "write".to_owned(),
            message: format!("{}: {e}", path.display()),
        })
    }

    /// Empties the browser's HTTP cache (a Chrome DevTools command through chromedriver), so
    /// that the next navigation fetches, and measures, every resource again.
    pub fn clear_cache(&self) {
        self.session_command(
            "POST",
            "/goog/cdp/execute",
            &json!({"cmd": "Network.clearBrowserCache", "params": {}}),
        )
        .unwrap();
    }
}

fn element(v: &Value) -> Element {
    match v[ELEMENT_KEY].as_str() {
        Some(id) => Element { id: id.to_owned() },
        None => panic!("not an element reference: {v}"),
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.session_command("DELETE", "", &Value::Null);
        }
        if let Some(mut driver) = self.driver.take() {
            let group = rustix::process::Pid::from_child(&driver);
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            let _ = driver.kill();
            let _ = driver.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- chromedriver log ---\n{}--- end of chromedriver log ---",
                self.driver_log()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
