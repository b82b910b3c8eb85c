//! The router's listeners: one per listen address, shared by the apps that name it.
//!
//! **Invariant:** a listener is rebuilt on a copy of its socket (`SO_REUSEPORT`) before the
//! old one stops, so adding or removing an app on an address never refuses a connection.
//! Apps on one address share its TLS files (or none).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_proxy::{ListenerConfig, Workers, WorkersConfig};

use crate::error::{ControlError, Result};

/// The PEM files (certificate, key) a listener terminates TLS with.
pub type TlsPair = (PathBuf, PathBuf);

struct Handle {
    apps: Vec<Arc<kiln_proxy::App>>,
    tls: Option<TlsPair>,
    /// Served on every router thread; dropping it stops the listener.
    serving: kiln_proxy::Serving,
    /// A copy of its listening socket: the next listener for the address is built on it, so
    /// the socket stays open across the change (no connection refused).
    socket: std::net::TcpListener,
}

/// Every listener, and the router threads that serve them.
pub struct Listeners {
    router: Workers,
    map: tokio::sync::Mutex<BTreeMap<SocketAddr, Handle>>,
}

impl Listeners {
    /// Starts the router's threads; no address is served yet.
    pub fn start(cfg: WorkersConfig) -> Result<Listeners> {
        let router = Workers::start(cfg)
            .map_err(|e| ControlError::Router(format!("cannot start the router's threads: {e}")))?;
        Ok(Listeners {
            router,
            map: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Serves `app` on `listen`, with the apps already there.
    pub async fn attach(
        &self,
        listen: SocketAddr,
        app: Arc<kiln_proxy::App>,
        tls: Option<TlsPair>,
    ) -> Result<()> {
        let mut map = self.map.lock().await;
        let mut apps: Vec<Arc<kiln_proxy::App>> = Vec::new();
        if let Some(h) = map.get(&listen) {
            apps = h.apps.clone();
            apps.retain(|a| a.name() != app.name());
            // One socket has one TLS configuration: an app may not switch it under the others.
            if !apps.is_empty() && h.tls != tls {
                let others: Vec<&str> = apps.iter().map(|a| a.name()).collect();
                return Err(ControlError::Invalid(format!(
                    "{} cannot share {listen} with {}: their [route] tls differs (apps on one \
                     address terminate TLS with the same files, or none do)",
                    app.name(),
                    others.join(", ")
                )));
            }
        }
        apps.push(app);
        self.rebind(&mut map, listen, apps, tls).await
    }

    /// Stops serving app `name` on `listen`; the address closes when no app is left on it.
    pub async fn detach(&self, listen: SocketAddr, name: &str) -> Result<()> {
        let mut map = self.map.lock().await;
        let Some(h) = map.get(&listen) else {
            return Ok(());
        };
        let apps: Vec<Arc<kiln_proxy::App>> = h
            .apps
            .iter()
            .filter(|a| a.name() != name)
            .cloned()
            .collect();
        if apps.is_empty() {
            if let Some(h) = map.remove(&listen) {
                h.serving.stop();
            }
            return Ok(());
        }
        let tls = h.tls.clone();
        self.rebind(&mut map, listen, apps, tls).await
    }

    async fn rebind(
        &self,
        map: &mut BTreeMap<SocketAddr, Handle>,
        listen: SocketAddr,
        apps: Vec<Arc<kiln_proxy::App>>,
        tls: Option<TlsPair>,
    ) -> Result<()> {
        let router = |e: std::io::Error| ControlError::Router(e.to_string());
        let mut cfg = ListenerConfig::new(listen);
        cfg.reuse_port = true;
        cfg.tls = tls
            .clone()
            .map(|(cert, key)| kiln_proxy::TlsFiles { cert, key });
        let listener = match map.get(&listen).map(|h| h.socket.try_clone()) {
            Some(socket) => {
                kiln_proxy::Listener::bind_to(cfg, apps.clone(), socket.map_err(router)?).await
            }
            None => kiln_proxy::Listener::bind(cfg, apps.clone()).await,
        }
        .map_err(|e| ControlError::Router(e.to_string()))?;
        let socket = listener.socket_copy().map_err(router)?;
        let serving = self
            .router
            .serve(listener)
            .map_err(|e| ControlError::Router(e.to_string()))?;
        let handle = Handle {
            apps,
            tls,
            serving,
            socket,
        };
        if let Some(old) = map.insert(listen, handle) {
            old.serving.stop();
        }
        Ok(())
    }

    /// Stops every listener at once and waits for the requests they serve to finish.
    pub async fn shutdown(&self) {
        let mut draining = tokio::task::JoinSet::new();
        for (_, h) in std::mem::take(&mut *self.map.lock().await) {
            // Spawned, so that every listener stops accepting now, not in turn.
            draining.spawn(h.serving.drain());
        }
        draining.join_all().await;
    }
}
