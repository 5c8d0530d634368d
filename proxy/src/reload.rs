//! Hot reload: the config file watched (`notify`), SIGHUP (in `main.rs`)
//! and `POST /api/scaling/reload` all come here. The new config is read,
//! validated and its runtime built off the hot path, then swapped in at
//! once; new listen addresses are bound before the swap (a bind failure
//! rejects the reload) and removed ones stop accepting while their open
//! connections live on. A rejected config leaves the old one serving and is
//! reported in the log, in `/api/scaling/health` and in metrics.

use crate::app::Shared;
use crate::config::Config;
use crate::server;
use kp5_shared::wire::unix_ms;
use kp5_shared::Env;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the last reloads did, for `/api/scaling/health`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatus {
    /// Configs applied since start (the first one is 1).
    pub generation: u64,
    /// Unix ms and source ("start", "file", "SIGHUP", "api", "admin-config")
    /// of the config in effect.
    pub applied_at: u64,
    pub applied_from: String,
    /// The last rejected config since then, if any.
    pub last_error: Option<Rejected>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejected {
    pub at: u64,
    pub source: String,
    pub reason: String,
}

/// The source of a certificate reload after its files changed.
pub const CERT_FILES: &str = "certificate-files";

/// The source of a reload made by `PUT /api/scaling/loadbalancer/config`.
pub const ADMIN_CONFIG: &str = "admin-config";

struct Listening {
    bound: SocketAddr,
    stop: CancellationToken,
    tls: bool,
}

/// The parts of a running proxy a reload changes besides the runtime.
pub struct Control {
    config_path: Option<PathBuf>,
    env: Arc<dyn Env + Send + Sync>,
    /// (Configured address, TLS) → its accept loop.
    listeners: Mutex<BTreeMap<(SocketAddr, bool), Listening>>,
    /// Stops every accept loop and asks connections to finish (shutdown).
    stop: CancellationToken,
    conns: TaskTracker,
    tasks: TaskTracker,
    status: Mutex<ReloadStatus>,
    /// One reload at a time.
    serial: tokio::sync::Mutex<()>,
}

impl Control {
    pub fn new(
        config_path: Option<PathBuf>,
        env: Arc<dyn Env + Send + Sync>,
        stop: CancellationToken,
        conns: TaskTracker,
        tasks: TaskTracker,
    ) -> Control {
        Control {
            config_path,
            env,
            listeners: Mutex::new(BTreeMap::new()),
            stop,
            conns,
            tasks,
            status: Mutex::new(ReloadStatus {
                generation: 1,
                applied_at: unix_ms(),
                applied_from: "start".into(),
                last_error: None,
            }),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bound addresses of the plain data-plane listeners.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.bound(false)
    }

    /// Bound addresses of the TLS listeners.
    pub fn listening_tls(&self) -> Vec<SocketAddr> {
        self.bound(true)
    }

    fn bound(&self, tls: bool) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|l| l.tls == tls)
            .map(|l| l.bound)
            .collect()
    }

    /// Starts accepting on `listener` (configured as `configured`).
    pub fn add_listener(
        &self,
        shared: &Arc<Shared>,
        configured: SocketAddr,
        listener: tokio::net::TcpListener,
        tls: bool,
    ) {
        let bound = listener.local_addr().unwrap_or(configured);
        let stop = self.stop.child_token();
        self.tasks.spawn(server::accept_loop(
            listener,
            shared.clone(),
            stop.clone(),
            self.stop.clone(),
            self.conns.clone(),
            tls,
        ));
        tracing::info!(%configured, %bound, tls, "listening");
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((configured, tls), Listening { bound, stop, tls });
    }

    /// Watches `files` (certificates and keys) instead of those watched now.
    pub fn watch_certs(&self, shared: &Shared, files: std::collections::BTreeSet<PathBuf>) {
        if files.is_empty() {
            shared.tls.set_watcher(None);
            return;
        }
        match watch_files(&files, shared.cert_events.clone()) {
            Ok(w) => shared.tls.set_watcher(Some((files, w))),
            Err(e) => {
                tracing::warn!(error = %e, "certificate files not watched; a reload still re-reads them")
            }
        }
    }

    /// Re-reads the certificates of the config in effect (their files
    /// changed). A pair that does not load leaves the old ones serving.
    pub async fn reload_certs(&self, shared: &Arc<Shared>) -> Result<(), String> {
        let _one = self.serial.lock().await;
        let Some(settings) = shared.runtime.load().config.proxy.tls.clone() else {
            return Ok(());
        };
        let loaded = tokio::task::spawn_blocking(move || crate::tls::CertSet::load(&settings))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        match loaded {
            Ok(set) => {
                shared.tls.swap_certs(set);
                shared.tls.cert_reloads_ok.fetch_add(1, Relaxed);
                tracing::info!("certificates reloaded");
                let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
                if st
                    .last_error
                    .as_ref()
                    .is_some_and(|e| e.source == CERT_FILES)
                {
                    st.last_error = None;
                }
                Ok(())
            }
            Err(reason) => {
                shared.tls.cert_reloads_failed.fetch_add(1, Relaxed);
                tracing::error!(%reason, "certificates rejected; the previous ones keep serving");
                self.note_rejected(CERT_FILES, &reason);
                Err(reason)
            }
        }
    }

    fn reject(&self, shared: &Shared, source: &str, reason: String) -> String {
        tracing::error!(%source, %reason, "config rejected; the previous one keeps serving");
        shared.counters.reloads_failed.fetch_add(1, Relaxed);
        self.note_rejected(source, &reason);
        reason
    }

    /// Shown by `/api/scaling/health` until the next success of its kind.
    fn note_rejected(&self, source: &str, reason: &str) {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = Some(Rejected {
            at: unix_ms(),
            source: source.to_owned(),
            reason: reason.to_owned(),
        });
    }

    /// Re-reads the config file and applies it.
    pub async fn reload_file(&self, shared: &Arc<Shared>, source: &str) -> Result<u64, String> {
        let _one = self.serial.lock().await;
        let Some(path) = &self.config_path else {
            return Err(self.reject(
                shared,
                source,
                "this proxy was started without a config file".into(),
            ));
        };
        let env = self.env.clone();
        let path2 = path.clone();
        // reading and validating (10,000 backends) stays off the runtime's threads
        let parsed = tokio::task::spawn_blocking(move || Config::load(&path2, &*env))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("{}: {e}", path.display())));
        match parsed {
            Ok(config) => self.apply_locked(shared, config, source).await,
            Err(reason) => Err(self.reject(shared, source, reason)),
        }
    }

    /// Applies an already validated config.
    pub async fn apply(
        &self,
        shared: &Arc<Shared>,
        config: Config,
        source: &str,
    ) -> Result<u64, String> {
        let _one = self.serial.lock().await;
        self.apply_locked(shared, config, source).await
    }

    async fn apply_locked(
        &self,
        shared: &Arc<Shared>,
        config: Config,
        source: &str,
    ) -> Result<u64, String> {
        // certificates, keys and CAs are read before anything changes
        let config = Arc::new(config);
        let prepared = {
            let (shared2, config2) = (shared.clone(), config.clone());
            tokio::task::spawn_blocking(move || shared2.tls.prepare(&config2))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(reason) => return Err(self.reject(shared, source, reason)),
        };
        // bind what is new first: a failure rejects the whole reload
        let mut wanted: Vec<(SocketAddr, bool)> =
            config.proxy.listen.iter().map(|a| (*a, false)).collect();
        wanted.extend(
            config
                .proxy
                .tls
                .iter()
                .flat_map(|t| &t.listen)
                .map(|a| (*a, true)),
        );
        let current: Vec<(SocketAddr, bool)> = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        let mut fresh = Vec::new();
        for &(addr, tls) in wanted.iter().filter(|w| !current.contains(w)) {
            let field = if tls {
                "proxy.tls.listen"
            } else {
                "proxy.listen"
            };
            if addr.port() != 0 && current.iter().any(|(a, _)| *a == addr) {
                return Err(self.reject(
                    shared,
                    source,
                    format!("{field}: {addr} changes between TLS and plain; remove it in one reload and add it back in the next"),
                ));
            }
            match server::bind(addr) {
                Ok(l) => fresh.push((addr, l, tls)),
                Err(e) => {
                    return Err(self.reject(
                        shared,
                        source,
                        format!("{field}: cannot listen on {addr}: {e}"),
                    ));
                }
            }
        }
        if config.admin.listen != shared.runtime.load().config.admin.listen {
            tracing::warn!(admin = %config.admin.listen, "admin.listen changes take effect at the next restart");
        }
        if source != ADMIN_CONFIG {
            // the file's thresholds replace ones set through the API
            shared
                .monitor
                .set_thresholds(config.monitoring.thresholds.clone());
            if let Some(c) = shared.cluster.as_ref().filter(|c| c.is_up()) {
                if let Err(e) = c.set_thresholds(None).await {
                    c.note_error(&e);
                }
            }
        }
        // TLS first: the new runtime may route to pools whose TLS client is new
        if let Some(files) = shared.tls.commit(prepared) {
            self.watch_certs(shared, files);
        }
        let shared2 = shared.clone();
        tokio::task::spawn_blocking(move || shared2.apply_arc(config))
            .await
            .map_err(|e| self.reject(shared, source, e.to_string()))?;
        for (addr, l, tls) in fresh {
            self.add_listener(shared, addr, l, tls);
        }
        let mut ls = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        ls.retain(|key, l| {
            let keep = wanted.contains(key);
            let addr = key.0;
            if !keep {
                tracing::info!(configured = %addr, bound = %l.bound, "listener removed; its open connections stay");
                l.stop.cancel();
            }
            keep
        });
        drop(ls);
        shared.counters.reloads_ok.fetch_add(1, Relaxed);
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.generation += 1;
        st.applied_at = unix_ms();
        st.applied_from = source.to_owned();
        st.last_error = None;
        tracing::info!(%source, generation = st.generation, "config applied");
        Ok(st.generation)
    }
}

/// Watches the config file (its folder, so an editor's rename-over counts)
/// and reloads after writes settle.
pub fn watch(shared: Arc<Shared>, path: PathBuf, stop: CancellationToken) -> Result<(), String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = watch_files(&BTreeSet::from([path.clone()]), tx)?;
    tokio::spawn(async move {
        let _watcher = watcher;
        while settled(&mut rx, &stop).await {
            if path.exists() {
                let _ = shared.reload_file("file").await;
            }
        }
    });
    Ok(())
}

/// Reloads the certificates when their files change, after writes settle
/// (a certificate and its key are usually replaced one after the other).
pub async fn cert_reloader(
    shared: Arc<Shared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    stop: CancellationToken,
) {
    while settled(&mut rx, &stop).await {
        let _ = shared.control().reload_certs(&shared).await;
    }
}

/// Waits for a change, then lets a burst of writes (truncate, write,
/// rename) settle for 100 ms. False once stopped.
async fn settled(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        got = rx.recv() => if got.is_none() { return false },
        _ = stop.cancelled() => return false,
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    while rx.try_recv().is_ok() {}
    true
}

/// Watches the folders of `files` (so an editor's or certbot's rename over
/// a file counts) and sends on `tx` when one of them is written, created,
/// renamed over or removed.
pub fn watch_files(
    files: &BTreeSet<PathBuf>,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher, String> {
    use notify::{RecursiveMode, Watcher};
    let names: BTreeSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_owned()))
        .collect();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.contains(n)));
            let change = matches!(
                ev.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Remove(_)
            );
            if ours && change {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|e| format!("watching files: {e}"))?;
    let dirs: BTreeSet<&Path> = files
        .iter()
        .map(|f| {
            f.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        })
        .collect();
    for d in dirs {
        watcher
            .watch(d, RecursiveMode::NonRecursive)
            .map_err(|e| format!("watching {}: {e}", d.display()))?;
    }
    Ok(watcher)
}
