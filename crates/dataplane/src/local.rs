//! `LocalPlane`: the router in this process — its threads, one listener per listen address
//! shared by the apps that name it, and each app's table and gate. The router process runs
//! one; a daemon with an embedded router (tests, paused time) runs one too.
//!
//! **Invariant:** a listener is rebuilt on a copy of its socket before the old one stops, so
//! adding or removing an app on an address never refuses a connection; the same socket is
//! what a handover passes to the next router process. Apps on one address share its TLS
//! files (or none).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_proxy::{ListenerConfig, Workers, WorkersConfig};

use crate::PlaneError;
use crate::wire::{AppSpec, Gate, HandedApp, Handover, Table};

/// The PEM files (certificate, key) a listener terminates TLS with.
type TlsPair = (PathBuf, PathBuf);

struct Served {
    spec: AppSpec,
    app: Arc<kiln_proxy::App>,
    /// The table last published, as sent (for a handover).
    table: Table,
}

struct Handle {
    apps: Vec<Arc<kiln_proxy::App>>,
    tls: Option<TlsPair>,
    /// Served on every router thread; dropping it stops the listener.
    serving: kiln_proxy::Serving,
    /// A copy of its listening socket: the next listener for the address is built on it, so
    /// the socket stays open across the change (no connection refused).
    socket: std::net::TcpListener,
}

#[derive(Default)]
struct Inner {
    apps: BTreeMap<String, Served>,
    listeners: BTreeMap<SocketAddr, Handle>,
}

/// The router, in this process.
pub struct LocalPlane {
    router: Workers,
    /// Where every listener logs its responses, if anywhere.
    access_log: Option<kiln_proxy::AccessLog>,
    inner: tokio::sync::Mutex<Inner>,
}

impl LocalPlane {
    /// Starts the router's threads; no address is served yet.
    pub fn start(cfg: WorkersConfig) -> Result<LocalPlane, PlaneError> {
        LocalPlane::start_logged(cfg, None)
    }

    /// As [`LocalPlane::start`], every listener logging its responses to `access_log`.
    pub fn start_logged(
        cfg: WorkersConfig,
        access_log: Option<kiln_proxy::AccessLog>,
    ) -> Result<LocalPlane, PlaneError> {
        let router = Workers::start(cfg)
            .map_err(|e| PlaneError::Router(format!("cannot start the router's threads: {e}")))?;
        Ok(LocalPlane {
            router,
            access_log,
            inner: tokio::sync::Mutex::new(Inner::default()),
        })
    }

    /// Serves the app `spec` describes. An app already served with the same spec keeps its
    /// table and gate (`Ok(true)` when that table routes somewhere); one served with another
    /// spec is replaced, its table and gate carried over.
    pub async fn put_app(&self, spec: AppSpec) -> Result<bool, PlaneError> {
        let mut inner = self.inner.lock().await;
        let (table, gate) = match inner.apps.get(&spec.name) {
            Some(s) if s.spec == spec => return Ok(!s.table.releases.is_empty()),
            Some(s) => (s.table.clone(), s.app.gate()),
            None => (Table::default(), kiln_proxy::GateMode::Open),
        };
        let app = kiln_proxy::App::new(spec.config());
        app.set_route(
            &table
                .route_table()
                .unwrap_or_else(|_| kiln_proxy::RouteTable::empty()),
        );
        app.set_gate(gate);
        let previous = inner.apps.get(&spec.name).map(|s| s.spec.listen);
        if let Some(listen) = previous.filter(|l| *l != spec.listen) {
            self.detach(&mut inner, listen, &spec.name).await?;
        }
        self.attach(&mut inner, spec.listen, Arc::clone(&app), spec.tls.clone())
            .await?;
        let had_table = !table.releases.is_empty();
        inner
            .apps
            .insert(spec.name.clone(), Served { spec, app, table });
        Ok(had_table)
    }

    /// Stops serving every app but `names`.
    pub async fn retain_apps(&self, names: &[String]) -> Result<(), PlaneError> {
        let others: Vec<String> = {
            let inner = self.inner.lock().await;
            inner
                .apps
                .keys()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect()
        };
        for name in others {
            self.remove_app(&name).await?;
        }
        Ok(())
    }

    /// Stops serving app `name`: its table emptied, its address closed when no app is left
    /// on it.
    pub async fn remove_app(&self, name: &str) -> Result<(), PlaneError> {
        let mut inner = self.inner.lock().await;
        let Some(served) = inner.apps.remove(name) else {
            return Ok(());
        };
        served.app.set_route(&kiln_proxy::RouteTable::empty());
        self.detach(&mut inner, served.spec.listen, name).await
    }

    /// Publishes app `name`'s table (one atomic swap).
    pub async fn set_route(&self, name: &str, table: &Table) -> Result<(), PlaneError> {
        let route = table
            .route_table()
            .map_err(|e| PlaneError::Invalid(format!("route table of {name}: {e}")))?;
        let mut inner = self.inner.lock().await;
        let served = inner
            .apps
            .get_mut(name)
            .ok_or_else(|| PlaneError::NoApp(name.to_owned()))?;
        served.app.set_route(&route);
        served.table = table.clone();
        Ok(())
    }

    /// Sets app `name`'s gate.
    pub async fn set_gate(&self, name: &str, gate: &Gate) -> Result<(), PlaneError> {
        self.app(name).await?.set_gate(gate.mode());
        Ok(())
    }

    /// How many of app `name`'s requests are held.
    pub async fn held(&self, name: &str) -> Result<usize, PlaneError> {
        Ok(self.app(name).await?.held())
    }

    /// Waits for the instance at `addr` to have no request of app `name` in flight.
    pub async fn drain(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<kiln_proxy::DrainOutcome, PlaneError> {
        let app = self.app(name).await?;
        Ok(app.drain(addr).await)
    }

    /// A release's measurements over the last `window`.
    pub async fn snapshot(
        &self,
        name: &str,
        release: &str,
        window: std::time::Duration,
    ) -> Result<Option<kiln_proxy::Snapshot>, PlaneError> {
        Ok(self.app(name).await?.snapshot(release, window))
    }

    /// Every app's metrics in the Prometheus text format.
    pub async fn metrics(&self) -> String {
        let apps: Vec<Arc<kiln_proxy::App>> = {
            let inner = self.inner.lock().await;
            inner.apps.values().map(|s| Arc::clone(&s.app)).collect()
        };
        kiln_proxy::render_prometheus(&apps)
    }

    /// Writes the access log's buffered lines now (the router is about to exit).
    pub fn flush_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.flush();
        }
    }

    /// Opens the access log's file anew at its path (logrotate renamed it); nothing without
    /// an access log or with one on standard output.
    pub fn reopen_access_log(&self) -> Result<(), kiln_proxy::AccessLogError> {
        match &self.access_log {
            Some(log) => log.reopen(),
            None => Ok(()),
        }
    }

    /// The apps served.
    pub async fn app_names(&self) -> Vec<String> {
        self.inner.lock().await.apps.keys().cloned().collect()
    }

    /// Stops every listener at once and waits for the requests they serve to finish (each
    /// app's `drain_timeout` at most).
    pub async fn shutdown(&self) {
        let handles = std::mem::take(&mut self.inner.lock().await.listeners);
        let mut draining = tokio::task::JoinSet::new();
        for (_, h) in handles {
            // Spawned, so that every listener stops accepting now, not in turn.
            draining.spawn(h.serving.drain());
        }
        draining.join_all().await;
    }

    /// What a successor needs to serve exactly as this router does: every app with its
    /// table and gate, and a copy of every listening socket (this router keeps serving on
    /// its own until [`LocalPlane::shutdown`]).
    pub async fn handover(&self) -> Result<(Handover, Vec<OwnedFd>), PlaneError> {
        let inner = self.inner.lock().await;
        let apps = inner
            .apps
            .values()
            .map(|s| HandedApp {
                spec: s.spec.clone(),
                table: s.table.clone(),
                gate: Gate::of(&s.app.gate()),
            })
            .collect();
        let mut listeners = Vec::new();
        let mut fds = Vec::new();
        for (addr, h) in &inner.listeners {
            let copy = h.socket.try_clone().map_err(|e| {
                PlaneError::Router(format!("cannot copy the socket of {addr}: {e}"))
            })?;
            listeners.push(*addr);
            fds.push(OwnedFd::from(copy));
        }
        Ok((Handover { apps, listeners }, fds))
    }

    /// Serves what a predecessor handed over, on the sockets it passed (in the order of
    /// `handover.listeners`): no socket is bound anew, so no connection is refused.
    pub async fn take_over(
        &self,
        handover: Handover,
        sockets: Vec<OwnedFd>,
    ) -> Result<(), PlaneError> {
        if sockets.len() != handover.listeners.len() {
            return Err(PlaneError::Router(format!(
                "the old router passed {} sockets for {} addresses",
                sockets.len(),
                handover.listeners.len()
            )));
        }
        let mut inner = self.inner.lock().await;
        let mut by_addr: BTreeMap<SocketAddr, std::net::TcpListener> = handover
            .listeners
            .iter()
            .copied()
            .zip(sockets.into_iter().map(std::net::TcpListener::from))
            .collect();
        let mut per_addr: BTreeMap<SocketAddr, (Vec<Arc<kiln_proxy::App>>, Option<TlsPair>)> =
            BTreeMap::new();
        for handed in handover.apps {
            let app = kiln_proxy::App::new(handed.spec.config());
            let route = handed.table.route_table().map_err(|e| {
                PlaneError::Invalid(format!("handed route table of {}: {e}", handed.spec.name))
            })?;
            app.set_route(&route);
            app.set_gate(handed.gate.mode());
            let entry = per_addr
                .entry(handed.spec.listen)
                .or_insert_with(|| (Vec::new(), handed.spec.tls.clone()));
            entry.0.push(Arc::clone(&app));
            inner.apps.insert(
                handed.spec.name.clone(),
                Served {
                    spec: handed.spec,
                    app,
                    table: handed.table,
                },
            );
        }
        for (listen, (apps, tls)) in per_addr {
            // Only ever the socket passed: one bound anew beside it would lose what the
            // kernel queued on the old one when it closes.
            let socket = by_addr.remove(&listen).ok_or_else(|| {
                PlaneError::Router(format!("the old router passed no socket for {listen}"))
            })?;
            self.serve(&mut inner, listen, apps, tls, Some(socket))
                .await?;
        }
        Ok(())
    }

    async fn app(&self, name: &str) -> Result<Arc<kiln_proxy::App>, PlaneError> {
        let inner = self.inner.lock().await;
        inner
            .apps
            .get(name)
            .map(|s| Arc::clone(&s.app))
            .ok_or_else(|| PlaneError::NoApp(name.to_owned()))
    }

    /// Serves `app` on `listen`, with the apps already there.
    async fn attach(
        &self,
        inner: &mut Inner,
        listen: SocketAddr,
        app: Arc<kiln_proxy::App>,
        tls: Option<TlsPair>,
    ) -> Result<(), PlaneError> {
        let mut apps: Vec<Arc<kiln_proxy::App>> = Vec::new();
        if let Some(h) = inner.listeners.get(&listen) {
            apps = h.apps.clone();
            apps.retain(|a| a.name() != app.name());
            // One socket has one TLS configuration: an app may not switch it under the others.
            if !apps.is_empty() && h.tls != tls {
                let others: Vec<&str> = apps.iter().map(|a| a.name()).collect();
                return Err(PlaneError::Invalid(format!(
                    "{} cannot share {listen} with {}: their [route] tls differs (apps on one \
                     address terminate TLS with the same files, or none do)",
                    app.name(),
                    others.join(", ")
                )));
            }
        }
        apps.push(app);
        let socket = self.socket_of(inner, listen)?;
        self.serve(inner, listen, apps, tls, socket).await
    }

    /// Stops serving app `name` on `listen`; the address closes when no app is left on it.
    async fn detach(
        &self,
        inner: &mut Inner,
        listen: SocketAddr,
        name: &str,
    ) -> Result<(), PlaneError> {
        let Some(h) = inner.listeners.get(&listen) else {
            return Ok(());
        };
        let apps: Vec<Arc<kiln_proxy::App>> = h
            .apps
            .iter()
            .filter(|a| a.name() != name)
            .cloned()
            .collect();
        if apps.is_empty() {
            if let Some(h) = inner.listeners.remove(&listen) {
                h.serving.stop();
            }
            return Ok(());
        }
        let tls = h.tls.clone();
        let socket = self.socket_of(inner, listen)?;
        self.serve(inner, listen, apps, tls, socket).await
    }

    fn socket_of(
        &self,
        inner: &Inner,
        listen: SocketAddr,
    ) -> Result<Option<std::net::TcpListener>, PlaneError> {
        inner
            .listeners
            .get(&listen)
            .map(|h| h.socket.try_clone())
            .transpose()
            .map_err(|e| PlaneError::Router(format!("cannot copy the socket of {listen}: {e}")))
    }

    /// Serves `apps` on `listen` (on `socket` when the address is already bound), then stops
    /// the listener that served it before.
    async fn serve(
        &self,
        inner: &mut Inner,
        listen: SocketAddr,
        apps: Vec<Arc<kiln_proxy::App>>,
        tls: Option<TlsPair>,
        socket: Option<std::net::TcpListener>,
    ) -> Result<(), PlaneError> {
        let router = |e: std::io::Error| PlaneError::Router(e.to_string());
        let mut cfg = ListenerConfig::new(listen);
        // No SO_REUSEPORT: an address changes hands only as this very socket (a copy for a
        // rebind, or passed to the next router process), so another process binding it (a
        // kiln of another state included) fails instead of silently taking a share of its
        // connections.
        cfg.reuse_port = false;
        cfg.access_log.clone_from(&self.access_log);
        cfg.tls = tls
            .clone()
            .map(|(cert, key)| kiln_proxy::TlsFiles { cert, key });
        let listener = match socket {
            Some(socket) => kiln_proxy::Listener::bind_to(cfg, apps.clone(), socket).await,
            None => kiln_proxy::Listener::bind(cfg, apps.clone()).await,
        }
        .map_err(|e| PlaneError::Router(e.to_string()))?;
        let socket = listener.socket_copy().map_err(router)?;
        let serving = self.router.serve(listener).map_err(router)?;
        let handle = Handle {
            apps,
            tls,
            serving,
            socket,
        };
        if let Some(old) = inner.listeners.insert(listen, handle) {
            old.serving.stop();
        }
        Ok(())
    }
}
