//! `kiln-router`: the router on its own, for benchmarks and for tests that need a backend in a
//! separate process. It is a tool for this crate's bench scripts and tests, not kiln's CLI.
//!
//! ```text
//! kiln-router proxy   --listen ADDR [--threads N] [--pin true|false] --blue ADDR[,ADDR…] [--green ADDR[,ADDR…]] [--control PATH] [--access-log FILE|- [--access-log-sample RATE]]
//! kiln-router backend --listen ADDR --name NAME
//! kiln-router probe   --addr ADDR --expect TEXT (--unix PATH --send LINE | --exec COMMAND)
//! ```
//!
//! - `proxy` routes everything to the blue release; each line `blue` or `green` written to the
//!   control Unix socket switches all traffic to that release and is answered
//!   `ok SWAP_US FIRST_US`: the microseconds the route-table swap took, and from the swap to
//!   the first response head the router received from the new release for any client (the
//!   load's or the probe's), as the router stamped it (`-` if none came within a second). This is the switch as the router sees it, without the probe's own
//!   process and socket hops.
//! - `backend` answers every request with `NAME\n` and prints `listening on ADDR` once bound.
//! - `probe` opens a keep-alive connection and sends `GET /` on it back to back (reconnecting
//!   if the proxy closes it); meanwhile it starts a clock and performs a switch (a line to a
//!   Unix socket, or a shell command). It prints the microseconds from the switch command to
//!   the first response whose body contains TEXT, to the switch's acknowledgement, and then
//!   whatever the acknowledgement said after `ok` (kiln's router: its own two timings).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kiln_proxy::{
    AccessLog, AccessLogConfig, AccessLogTarget, App, AppConfig, Listener, ListenerConfig,
    RouteRelease, RouteTable, Workers, WorkersConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

type Flags = HashMap<String, String>;

/// mimalloc rather than glibc's allocator: a request through the router allocates a handful
/// of small blocks (header maps, buffers) and frees them on the same thread, the case
/// mimalloc's thread-local free lists make cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("usage: kiln-router (proxy|backend|probe) --flag value …");
        return ExitCode::from(2);
    };
    let flags = match parse_flags(rest) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("kiln-router: {e}");
            return ExitCode::from(2);
        }
    };
    let threads: usize = flags
        .get("threads")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    if command == "proxy" {
        return match proxy(&flags, threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiln-router: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln-router: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command.as_str() {
            "backend" => backend(&flags).await,
            "probe" => probe(&flags).await,
            other => Err(format!("unknown command {other:?}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-router: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_flags(args: &[String]) -> Result<Flags, String> {
    let mut flags = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("expected a --flag, got {flag:?}"))?;
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        flags.insert(name.to_owned(), value.clone());
    }
    Ok(flags)
}

fn flag<'a>(flags: &'a Flags, name: &str) -> Result<&'a str, String> {
    flags
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("--{name} is required"))
}

fn addrs(list: &str) -> Result<Vec<SocketAddr>, String> {
    list.split(',')
        .map(|a| a.parse().map_err(|_| format!("{a:?} is not an address")))
        .collect()
}

/// Runs the router as the daemon does: [`Workers`], `threads` of them (pinned to cores as
/// [`WorkersConfig::new`] decides, unless `--pin` says), each serving a copy of one listener. All share one app, so a switch applies to
/// every thread at once.
fn proxy(flags: &Flags, threads: usize) -> Result<(), String> {
    let listen: SocketAddr = flag(flags, "listen")?
        .parse()
        .map_err(|_| "--listen must be an address".to_owned())?;
    let blue = addrs(flag(flags, "blue")?)?;
    let green = flags
        .get("green")
        .map(|g| addrs(g))
        .transpose()?
        .unwrap_or_default();
    let tables = |to_green: bool| {
        let (bw, gw) = if to_green { (0, 1) } else { (1, 0) };
        let mut releases = vec![RouteRelease::new("blue", bw, &blue)];
        if !green.is_empty() {
            releases.push(RouteRelease::new("green", gw, &green));
        }
        RouteTable::new(releases).map_err(|e| e.to_string())
    };
    let (to_blue, to_green) = (tables(false)?, tables(true)?);
    let app = App::new(AppConfig::new("bench"));
    app.set_route(&to_blue);

    if let Some(path) = flags.get("control") {
        // The control socket gets its own thread, as the daemon's API would: a switch must not
        // queue behind the traffic it switches.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        let _ = std::fs::remove_file(path);
        let control = runtime
            .block_on(async { UnixListener::bind(path) })
            .map_err(|e| format!("cannot bind {path}: {e}"))?;
        let app = Arc::clone(&app);
        std::thread::spawn(move || {
            runtime.block_on(control_loop(control, app, to_blue, to_green));
        });
    }
    let mut listener_config = ListenerConfig::new(listen);
    if let Some(path) = flags.get("access-log") {
        let sample = match flags.get("access-log-sample") {
            Some(rate) => rate
                .parse()
                .map_err(|_| format!("--access-log-sample must be a number, not {rate:?}"))?,
            None => 1.0,
        };
        let target = if path == "-" {
            AccessLogTarget::Stdout
        } else {
            AccessLogTarget::File(path.into())
        };
        listener_config.access_log =
            Some(AccessLog::open(&AccessLogConfig { target, sample }).map_err(|e| e.to_string())?);
    }
    let listener = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?
        .block_on(Listener::bind(listener_config, vec![Arc::clone(&app)]))
        .map_err(|e| e.to_string())?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    let mut config = WorkersConfig::new(threads);
    if let Some(pin) = flags.get("pin") {
        config.pin = pin
            .parse()
            .map_err(|_| format!("--pin must be true or false, not {pin:?}"))?;
    }
    let router = Workers::start(config).map_err(|e| format!("cannot start the router: {e}"))?;
    let serving = router.serve(listener).map_err(|e| e.to_string())?;
    println!("listening on {listen}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    // Ctrl-C: stop accepting and let the requests in flight finish, as the daemon would.
    runtime.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
        serving.drain().await;
    });
    Ok(())
}

/// Each line `blue` or `green` switches all traffic to that release and is answered `ok`.
async fn control_loop(
    control: UnixListener,
    app: Arc<App>,
    to_blue: RouteTable,
    to_green: RouteTable,
) {
    while let Ok((stream, _)) = control.accept().await {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let release = line.trim();
            let table = match release {
                "blue" => &to_blue,
                "green" => &to_green,
                _ => {
                    if write.write_all(b"unknown command\n").await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            let reply = switch(&app, release, table);
            if write.write_all(reply.as_bytes()).await.is_err() {
                break;
            }
        }
    }
}

/// Publishes `table`, which sends all weighted traffic to `release`, and waits (at most a
/// second) for the first response from `release`. Returns the `ok SWAP_US FIRST_US` reply.
///
/// The watch is armed before the swap; before it `release` has weight 0, so no request is
/// routed to it and the first response the watch catches is from a request routed by the new
/// table. The router stamps that response's arrival itself, so the figure does not depend on
/// how soon this thread notices: it polls every 50 µs only to know when to answer. Waiting
/// blocks this thread, which serves only the control socket.
fn switch(app: &App, release: &str, table: &RouteTable) -> String {
    app.watch_first_response(release);
    let swap = tokio::time::Instant::now();
    app.set_route(table);
    let swapped = swap.elapsed();
    let deadline = swap + Duration::from_secs(1);
    let first = loop {
        if let Some(first) = app.first_response(release) {
            break Some(first.saturating_duration_since(swap));
        }
        if tokio::time::Instant::now() > deadline {
            break None;
        }
        // Sleep rather than spin: a spinning thread would take CPU from the router threads.
        std::thread::sleep(Duration::from_micros(50));
    };
    match first {
        Some(first) => format!("ok {} {}\n", swapped.as_micros(), first.as_micros()),
        None => format!("ok {} -\n", swapped.as_micros()),
    }
}

async fn backend(flags: &Flags) -> Result<(), String> {
    let listen = flag(flags, "listen")?;
    let body = Bytes::from(format!("{}\n", flag(flags, "name")?));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!(
        "listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn probe(flags: &Flags) -> Result<(), String> {
    let addr = flag(flags, "addr")?.to_owned();
    let expect = flag(flags, "expect")?.to_owned();
    // The probe's connection is open before the switch, as a client's would be, so that the
    // timing is the switch's and not the proxy's accept queue.
    let mut client = Probe::connect(&addr).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    // Requests go back to back while the switch command runs, so the first request the proxy
    // routes after its switch is not held back by the command's own acknowledgement.
    let first_new = async {
        while Instant::now() < deadline {
            if client
                .get(&addr)
                .await
                .is_some_and(|body| body.contains(&expect))
            {
                return Some(started.elapsed());
            }
        }
        None
    };
    let (first_new, switched) = tokio::join!(first_new, perform_switch(flags, started));
    let (acknowledged, answer) = switched?;
    let Some(first_new) = first_new else {
        return Err(format!("no response containing {expect:?} within 10 s"));
    };
    println!(
        "{} {} {}",
        first_new.as_micros(),
        acknowledged.as_micros(),
        answer.trim().strip_prefix("ok").unwrap_or_default().trim()
    );
    Ok(())
}

/// Performs the switch; returns when it was acknowledged (relative to `started`) and what the
/// acknowledgement said.
async fn perform_switch(flags: &Flags, started: Instant) -> Result<(Duration, String), String> {
    if let Some(path) = flags.get("unix") {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|e| format!("cannot connect to {path}: {e}"))?;
        let line = format!("{}\n", flag(flags, "send")?);
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // The switch is done when the router or HAProxy says so.
        let mut answer = [0_u8; 256];
        let n = stream.read(&mut answer).await.unwrap_or(0);
        let text = String::from_utf8_lossy(answer.get(..n).unwrap_or_default()).into_owned();
        return Ok((started.elapsed(), text));
    }
    let command = flag(flags, "exec")?.to_owned();
    // On the blocking pool, so the probe's requests keep flowing while the command runs.
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .status()
            .map_err(|e| e.to_string())
            .and_then(|status| {
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("{command:?} failed: {status}"))
                }
            })
    })
    .await
    .map_err(|e| e.to_string())?;
    status?;
    Ok((started.elapsed(), String::new()))
}

/// A keep-alive connection that reconnects when the proxy closes it (as nginx's old workers do
/// after a reload).
struct Probe {
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>>,
}

impl Probe {
    async fn connect(addr: &str) -> Probe {
        let mut probe = Probe { sender: None };
        probe.reconnect(addr).await;
        probe
    }

    async fn reconnect(&mut self, addr: &str) {
        self.sender = None;
        let Ok(stream) = TcpStream::connect(addr).await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        if let Ok((sender, connection)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        {
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
    }

    async fn get(&mut self, addr: &str) -> Option<String> {
        let ready = match self.sender.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            self.reconnect(addr).await;
        }
        let request = Request::get("/")
            .header("host", "probe")
            .body(http_body_util::Empty::new())
            .ok()?;
        let response = match self.sender.as_mut()?.send_request(request).await {
            Ok(response) => response,
            Err(_) => {
                self.sender = None;
                return None;
            }
        };
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .ok()?
            .to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    }
}
