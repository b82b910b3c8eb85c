//! The init's sequence, from the kernel's hand-over to power-off (see the module doc of
//! [`super`]); the app's supervision and the ACPI power button.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions, WaitStatus};

use super::cgroup::Cgroup;
use super::config::{self, Cmdline, Machine, Network};
use super::status::{self, Status, Verdict};
use super::{dm, efi, modules, mounts, net, secrets};

/// How long the disk's partitions and the verity device may take to appear.
const DEVICES_WITHIN: Duration = Duration::from_secs(10);
/// The device-mapper name of the root.
const DM_NAME: &str = "root";
/// `struct input_event` on x86_64: a `timeval`, then type, code and value.
const INPUT_EVENT_LEN: usize = 24;
/// `EV_KEY`.
const EV_KEY: u16 = 1;
/// `KEY_POWER`.
const KEY_POWER: u16 = 116;

/// Why the boot stopped.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A step failed.
    #[error("{what}: {why}")]
    Step {
        /// The step.
        what: &'static str,
        /// The error chain.
        why: String,
    },
    /// The root (or its hash tree) does not match the command line's root hash.
    #[error("the root partition does not match its root hash (dm-verity): refusing to boot")]
    Refused,
}

/// `error: its source: …`, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

fn step<E: std::error::Error>(what: &'static str) -> impl FnOnce(E) -> Failure {
    move |e| Failure::Step {
        what,
        why: chain(&e),
    }
}

/// Prints `kiln: <message>` on the console (the init's stderr).
pub fn say(message: &str) {
    let _ = writeln!(io::stderr(), "kiln: {message}");
}

/// The init: boots the machine, runs the app, powers off. Never returns, never panics out.
pub fn main() -> ! {
    let message = match std::panic::catch_unwind(boot) {
        Ok(Ok(never)) => match never {},
        Ok(Err(failure)) => failure.to_string(),
        Err(_) => "the init panicked".to_owned(),
    };
    say(&message);
    power_off()
}

fn boot() -> Result<Infallible, Failure> {
    let booted = Instant::now();
    mounts::early().map_err(step("mounting /dev, /proc and /sys"))?;
    let line = std::fs::read_to_string("/proc/cmdline").map_err(step("reading /proc/cmdline"))?;
    let cmdline = Cmdline::parse(&line).map_err(step("the kernel command line"))?;
    let json = std::fs::read(config::MACHINE_JSON).map_err(step("reading /kiln/machine.json"))?;
    let machine = Machine::parse(&json).map_err(step("the machine configuration"))?;
    modules::load_all(Path::new(config::MODULES_DIR), &machine.modules)
        .map_err(step("loading kernel modules"))?;

    wait_for(&[config::ROOT_DEVICE, config::HASH_DEVICE, dm::CONTROL])
        .map_err(step("waiting for the disk"))?;
    let table = cmdline.verity_table().map_err(step("the verity table"))?;
    let (_, minor) = dm::create(DM_NAME, &table).map_err(step("creating the verity root"))?;
    let root = format!("/dev/dm-{minor}");
    wait_for(&[root.as_str()]).map_err(step("waiting for the verity root"))?;
    check_all(&root)?;

    // Read before the switch, from sysfs, which the app does not get.
    let secrets = secrets::read_all(&machine.secrets).map_err(step("reading the secrets"))?;
    let cgroup = Cgroup::setup(&machine.limits).map_err(step("setting up the app's cgroup"))?;
    let power_button = find_power_button();
    let secure_boot = efi::secure_boot();
    say(&format!(
        "Secure Boot: {}",
        match secure_boot {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        }
    ));
    mounts::root(&root, &machine, &secrets).map_err(step("mounting the root"))?;
    mounts::switch_root().map_err(step("switching to the root"))?;
    let mut address = net::up(cmdline.ip.as_ref()).map_err(step("configuring the network"))?;
    let network = match cmdline.ip {
        Some(Network::Dhcp) => "dhcp",
        Some(Network::Static(_)) => "static",
        None => "none",
    };
    if let Some(a) = &address {
        let via = a.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        let dns = if a.dns.is_empty() {
            String::new()
        } else {
            let servers: Vec<String> = a.dns.iter().map(ToString::to_string).collect();
            format!(", DNS {}", servers.join(" "))
        };
        say(&format!(
            "{} {}/{}{via} ({network}{dns})",
            net::INTERFACE,
            a.addr,
            a.prefix
        ));
    }

    // Bound before the app starts, so the app cannot take the port first.
    let status_listener = machine.status_port.and_then(|port| {
        match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Ok(listener) => {
                say(&format!("status: GET /health on port {port}"));
                Some(listener)
            }
            Err(e) => {
                say(&format!("status endpoint on port {port}: {e}"));
                None
            }
        }
    });
    let app = machine.argv[0].clone();
    let mut command = Command::new(&app);
    command
        .args(&machine.argv[1..])
        .env_clear()
        .envs(machine.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&machine.cwd)
        .uid(machine.uid)
        .gid(machine.gid);
    for s in machine.secrets.iter().filter(|s| s.expose_env) {
        if let Some((_, value)) = secrets.iter().find(|(name, _)| *name == s.name) {
            command.env(&s.name, OsStr::from_bytes(value));
        }
    }
    let child = cgroup
        .spawn_in(&mut command)
        .map_err(step("starting the app"))?;
    drop(command);
    drop(secrets);
    let pid = child.id();
    say(&format!("{app} started (pid {pid})"));
    let status = Arc::new(Mutex::new(Status {
        image: machine.image.clone(),
        root_hash: hex::encode(cmdline.root_hash),
        secure_boot,
        address: address.as_ref().map(|a| format!("{}/{}", a.addr, a.prefix)),
        network,
        app: app.clone(),
        pid: Some(pid),
        state: "running".to_owned(),
        health: if machine.health.is_some() {
            Verdict::Starting
        } else {
            Verdict::Unchecked
        },
        uptime_ms: 0,
        booted,
        cgroup: BTreeMap::new(),
    }));
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(Failure::Step {
            what: "starting the app",
            why: format!("pid {pid} out of range"),
        })?;
    if let Some(renewal) = address.as_mut().and_then(|a| a.renewal.take()) {
        std::thread::spawn(move || renewal.keep());
    }
    let cgroup = Arc::new(cgroup);
    if let Some(listener) = status_listener {
        let (status, cgroup) = (Arc::clone(&status), Arc::clone(&cgroup));
        std::thread::spawn(move || status::serve(listener, &status, &cgroup));
    }
    if let Some(health) = machine.health.clone() {
        let status = Arc::clone(&status);
        let started = Instant::now();
        std::thread::spawn(move || status::watch(&health, started, &status, say));
    }
    let exited = Arc::new(AtomicBool::new(false));
    if let Some(button) = power_button {
        let exited = Arc::clone(&exited);
        let (app, grace) = (app.clone(), machine.stop_grace);
        std::thread::spawn(move || watch_power_button(button, pid, &app, grace, &exited));
    }
    let ended = reap_until(pid);
    exited.store(true, Ordering::SeqCst);
    {
        let mut s = status.lock().unwrap_or_else(PoisonError::into_inner);
        s.pid = None;
        s.state = ended.map_or_else(|| "gone".to_owned(), describe);
    }
    say(&match ended {
        Some(s) => format!("{app} {}; powering off", describe(s)),
        None => format!("{app} is gone; powering off"),
    });
    power_off()
}

/// Waits (bounded) for device nodes, which devtmpfs creates as the drivers find them.
fn wait_for(paths: &[&str]) -> Result<(), io::Error> {
    let start = Instant::now();
    for path in paths {
        while !Path::new(path).exists() {
            if start.elapsed() > DEVICES_WITHIN {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{path} did not appear within {} s",
                        DEVICES_WITHIN.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

/// Reads the whole verity device once: dm-verity checks every block against the root hash
/// as it is read, so a block that does not match fails here, before anything from the
/// image runs, rather than whenever the app first touches it.
fn check_all(device: &str) -> Result<(), Failure> {
    let start = Instant::now();
    let mut file = File::open(device).map_err(step("opening the verity root"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Failure::Refused),
        }
    }
    say(&format!(
        "root checked against its root hash: {} KiB in {} ms",
        total / 1024,
        start.elapsed().as_millis()
    ));
    Ok(())
}

/// `/dev/input/eventN` of the ACPI "Power Button", opened; `None` (said) without one.
fn find_power_button() -> Option<File> {
    let found = std::fs::read_dir("/sys/class/input").ok().and_then(|dir| {
        dir.flatten().find_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let device = std::fs::read_to_string(entry.path().join("device/name")).ok()?;
            (name.starts_with("event") && device.trim() == "Power Button").then_some(name)
        })
    });
    let Some(event) = found else {
        say("no ACPI power button: the machine powers off only when the app exits");
        return None;
    };
    match File::open(format!("/dev/input/{event}")) {
        Ok(f) => Some(f),
        Err(e) => {
            say(&format!("opening the power button /dev/input/{event}: {e}"));
            None
        }
    }
}

/// Whether an `input_event` is the power key going down.
pub fn is_power_press(event: &[u8; INPUT_EVENT_LEN]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// On the power key: SIGTERM to the app, then SIGKILL after `grace` if it is still there;
/// the main thread sees it exit and powers off.
fn watch_power_button(
    mut button: File,
    app_pid: Pid,
    app: &str,
    grace: Duration,
    exited: &AtomicBool,
) {
    let mut event = [0u8; INPUT_EVENT_LEN];
    loop {
        if let Err(e) = button.read_exact(&mut event) {
            say(&format!("reading the power button: {e}"));
            return;
        }
        if is_power_press(&event) {
            break;
        }
    }
    say(&format!(
        "power button: stopping {app} (SIGTERM, SIGKILL after {} ms)",
        grace.as_millis()
    ));
    let _ = rustix::process::kill_process(app_pid, Signal::TERM);
    std::thread::sleep(grace);
    if !exited.load(Ordering::SeqCst) {
        say(&format!(
            "{app} did not stop within {} ms: SIGKILL",
            grace.as_millis()
        ));
        let _ = rustix::process::kill_process(app_pid, Signal::KILL);
    }
}

/// Reaps every child (orphans are re-parented to PID 1) until the app itself exits.
fn reap_until(app: Pid) -> Option<WaitStatus> {
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if pid == app => return Some(status),
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None,
        }
    }
}

/// `exited with status N` or `was killed by signal N`.
fn describe(status: WaitStatus) -> String {
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "stopped".to_owned(),
    }
}

/// Flushes the disks' caches and powers the machine off; if the kernel refuses, waits
/// forever (PID 1 must never exit).
pub fn power_off() -> ! {
    rustix::fs::sync();
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::PowerOff) {
        say(&format!("powering off: {e}"));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; INPUT_EVENT_LEN] {
        let mut e = [0u8; INPUT_EVENT_LEN];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_the_power_key_going_down_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(0, 0, 0)), "EV_SYN");
        assert!(!is_power_press(&event(EV_KEY, 115, 1)), "another key");
    }

    #[test]
    fn failures_read_as_one_line() {
        let e = io::Error::new(io::ErrorKind::NotFound, "no such file");
        let f = step::<io::Error>("reading /kiln/machine.json")(e);
        assert_eq!(f.to_string(), "reading /kiln/machine.json: no such file");
        assert_eq!(
            Failure::Refused.to_string(),
            "the root partition does not match its root hash (dm-verity): refusing to boot"
        );
    }
}
