//! The running proxy: process-wide shared state, startup, and the handle
//! used by `main.rs` and by the end-to-end tests.

use crate::affinity::Affinity;
use crate::clock::Clock;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::forward::body::UpstreamBody;
use crate::reload::{self, Control};
use crate::runtime::Runtime;
use crate::state::Live;
use crate::{admin, health, server};
use arc_swap::ArcSwap;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kp5_shared::Env;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Process-wide counters (per-server figures live in [`crate::state::ServerState`]).
#[derive(Debug, Default)]
pub struct Counters {
    /// Responses to clients by class 1xx..5xx.
    pub requests: [AtomicU64; 5],
    /// 503s because no server could take the request.
    pub no_capacity: AtomicU64,
    pub websockets_total: AtomicU64,
    pub websockets_active: AtomicU64,
    /// WebSocket messages relayed (both directions).
    pub ws_messages: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_active: AtomicU64,
    /// Connections and tunnels closed because a client (or a tunnel's
    /// server) took nothing for the send timeout.
    pub send_timeouts: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// Everything the request path shares.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub live: Live,
    pub affinity: Arc<Affinity>,
    pub clock: Clock,
    /// hyper's keep-alive client: requests with a body to plain backends
    /// (written while the response is read), health checks.
    pub client: Client<HttpConnector, UpstreamBody>,
    /// Our HTTP/1.1 client: bodyless requests and upgrades to plain backends.
    pub h1: crate::forward::h1::Pool,
    pub counters: Arc<Counters>,
    /// Open tunnels, so shutdown can wait for them.
    pub tunnels: TaskTracker,
    /// Closes the open tunnels (drain timeout passed).
    pub close_tunnels: crate::tunnel::Close,
    /// Cancelled when health checkers of the current runtime must stop.
    checkers: std::sync::Mutex<CancellationToken>,
    /// The Redis registry, when `[redis]` is set.
    pub cluster: Option<Arc<Cluster>>,
    /// Serialises runtime builds (config reloads and registry changes).
    build: std::sync::Mutex<()>,
    /// Listeners and reloads; set once at start.
    control: std::sync::OnceLock<Control>,
    /// Unix ms when the proxy started.
    pub started_at: u64,
    /// Performance samples, thresholds and alerts.
    pub monitor: crate::monitor::Monitor,
    /// Certificates by SNI, the TLS acceptor, TLS clients of backends.
    pub tls: crate::tls::TlsState,
    /// Told when a watched certificate or key file changes.
    pub(crate) cert_events: tokio::sync::mpsc::UnboundedSender<()>,
}

/// The TCP connector to backends: no Nagle, `connect_timeout`, keep-alive probes.
pub fn http_connector(p: &crate::config::ProxySettings) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(p.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

/// The keep-alive client to backends over `connector` (plain or TLS).
pub fn pooled_client<C>(p: &crate::config::ProxySettings, connector: C) -> Client<C, UpstreamBody>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(p.upstream_idle_timeout)
        .pool_max_idle_per_host(p.upstream_keepalive)
        .set_host(false)
        .build(connector)
}

/// Per client connection.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    pub scheme: &'static str,
    /// The peer's address as the forwarding headers write it, made once
    /// per connection instead of once per request.
    pub client: crate::forward::headers::Client,
}

impl ConnCtx {
    pub fn new(shared: Arc<Shared>, peer: SocketAddr, scheme: &'static str) -> ConnCtx {
        ConnCtx {
            shared,
            peer,
            scheme,
            client: crate::forward::headers::Client::new(peer.ip()),
        }
    }
}

impl Shared {
    fn new(
        config: Arc<Config>,
        cluster: Option<Arc<Cluster>>,
        tls: crate::tls::TlsState,
        cert_events: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> Arc<Shared> {
        let p = &config.proxy;
        let client = pooled_client(p, http_connector(p));
        let h1 = crate::forward::h1::Pool::new(p);
        let live = Live::default();
        let clock = Clock::new();
        let monitor = crate::monitor::Monitor::new(config.monitoring.thresholds.clone());
        let runtime = Runtime::build(config, &live, &[]);
        Arc::new(Shared {
            monitor,
            runtime: ArcSwap::from_pointee(runtime),
            live,
            affinity: Arc::new(Affinity::new(clock)),
            clock,
            client,
            h1,
            counters: Arc::default(),
            tunnels: TaskTracker::new(),
            close_tunnels: crate::tunnel::Close::new(),
            checkers: std::sync::Mutex::new(CancellationToken::new()),
            cluster,
            build: std::sync::Mutex::new(()),
            control: std::sync::OnceLock::new(),
            started_at: kp5_shared::wire::unix_ms(),
            tls,
            cert_events,
        })
    }

    /// Listeners and reloads.
    pub fn control(&self) -> &Control {
        self.control.get().expect("control is set at start")
    }

    /// Re-reads the config file and applies it (file watcher, SIGHUP, API).
    pub async fn reload_file(self: &Arc<Self>, source: &str) -> Result<u64, String> {
        self.control().reload_file(self, source).await
    }

    /// Applies a validated config (admin config changes, tests).
    pub async fn reload_with(
        self: &Arc<Self>,
        config: Config,
        source: &str,
    ) -> Result<u64, String> {
        self.control().apply(self, config, source).await
    }

    /// Servers agents registered, as this proxy knows them now.
    fn discovered(&self) -> Vec<kp5_shared::wire::ServerRecord> {
        self.cluster
            .as_ref()
            .map(|c| c.records())
            .unwrap_or_default()
    }

    /// Rebuilds the runtime of the current config with the current registry.
    pub fn rebuild(self: &Arc<Self>) {
        let config = self.runtime.load().config.clone();
        self.install(config);
    }

    fn install(self: &Arc<Self>, config: Arc<Config>) {
        let _one_at_a_time = self.build.lock().unwrap_or_else(|p| p.into_inner());
        let runtime = Runtime::build(config, &self.live, &self.discovered());
        self.runtime.store(Arc::new(runtime));
        let rt = self.runtime.load();
        let in_use: std::collections::HashSet<&str> = rt.server_ids().collect();
        self.live.retain(|id| in_use.contains(id));
        self.restart_checkers();
    }

    /// Swaps in a new config: built off the hot path, then stored atomically.
    /// Live state (counts, health, matches) carries over by server id.
    pub fn apply(self: &Arc<Self>, config: Config) {
        self.install(Arc::new(config));
    }

    /// [`Shared::apply`] of a shared config.
    pub fn apply_arc(self: &Arc<Self>, config: Arc<Config>) {
        self.install(config);
    }

    fn restart_checkers(self: &Arc<Self>) {
        let token = CancellationToken::new();
        let old = std::mem::replace(
            &mut *self.checkers.lock().unwrap_or_else(|p| p.into_inner()),
            token.clone(),
        );
        old.cancel();
        health::checker::spawn_all(self.clone(), token);
    }
}

/// A started proxy.
pub struct ProxyHandle {
    pub shared: Arc<Shared>,
    /// Bound data-plane addresses (with real ports when 0 was asked for).
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    stop: CancellationToken,
    conns: TaskTracker,
    tasks: TaskTracker,
}

pub use kp5_shared::StartError;

/// How to start: where the config came from (for reloads) and whether to
/// watch it.
pub struct Options {
    pub config_path: Option<PathBuf>,
    /// The environment the config file is read with on reload.
    pub env: Arc<dyn Env + Send + Sync>,
    /// Reload when the file changes.
    pub watch: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config_path: None,
            env: Arc::new(kp5_shared::MapEnv::new()),
            watch: false,
        }
    }
}

/// Binds every listener and starts serving. Must run inside a Tokio runtime.
pub async fn start(config: Config) -> Result<ProxyHandle, StartError> {
    start_with(config, Options::default()).await
}

/// [`start`] with a config file to reload from (and watch).
pub async fn start_with(config: Config, opts: Options) -> Result<ProxyHandle, StartError> {
    let config = Arc::new(config);
    let cluster = match &config.redis {
        Some(r) => {
            let (c, rx) = Cluster::new(r).map_err(|e| StartError::Redis(e.to_string()))?;
            Some((c, rx))
        }
        None => None,
    };
    let mut listeners = Vec::new();
    for &addr in &config.proxy.listen {
        let l = server::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        listeners.push((addr, l));
    }
    let admin_addr = config.admin.listen;
    let admin_listener = server::bind(admin_addr).map_err(|source| StartError::Bind {
        addr: admin_addr,
        source,
    })?;

    let tls = crate::tls::TlsState::default();
    // a few small file reads, once at start-up
    let prepared = tls.prepare(&config).map_err(StartError::Tls)?;
    let mut tls_listeners = Vec::new();
    for &addr in config.proxy.tls.iter().flat_map(|t| &t.listen) {
        let l = server::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        tls_listeners.push((addr, l));
    }
    let watch_certs = tls.commit(prepared);
    let (cert_tx, cert_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Shared::new(
        config,
        cluster.as_ref().map(|(c, _)| c.clone()),
        tls,
        cert_tx,
    );
    let stop = CancellationToken::new();
    let conns = TaskTracker::new();
    let tasks = TaskTracker::new();
    let watch = opts.watch.then(|| opts.config_path.clone()).flatten();
    let control = Control::new(
        opts.config_path,
        opts.env,
        stop.clone(),
        conns.clone(),
        tasks.clone(),
    );
    if shared.control.set(control).is_err() {
        unreachable!("a new Shared has no control yet");
    }
    for (addr, l) in listeners {
        shared.control().add_listener(&shared, addr, l, false);
    }
    for (addr, l) in tls_listeners {
        shared.control().add_listener(&shared, addr, l, true);
    }
    if let Some(files) = watch_certs {
        shared.control().watch_certs(&shared, files);
    }
    tasks.spawn(reload::cert_reloader(shared.clone(), cert_rx, stop.clone()));
    let listen = shared.control().listening();
    let admin = admin_listener.local_addr().unwrap_or(admin_addr);
    tasks.spawn(admin::serve(admin_listener, shared.clone(), stop.clone()));
    tasks.spawn(sweeper(shared.clone(), stop.clone()));
    tasks.spawn(crate::memory::trimmer(
        shared.counters.clone(),
        stop.clone(),
    ));
    tasks.spawn(crate::monitor::run(shared.clone(), stop.clone()));
    if let Some((c, rx)) = cluster {
        tracing::info!(redis = %c.target.redacted_url(), instance = %c.instance, "using the Redis registry");
        cluster::spawn(shared.clone(), c, rx, stop.clone(), &tasks);
    }
    if let Some(path) = watch {
        if let Err(e) = reload::watch(shared.clone(), path, stop.clone()) {
            tracing::warn!(error = %e, "config file not watched; SIGHUP and POST /api/scaling/reload still reload");
        }
    }
    shared.restart_checkers();
    tracing::info!(?listen, %admin, "kp5-proxy started");
    Ok(ProxyHandle {
        shared,
        listen,
        admin,
        stop,
        conns,
        tasks,
    })
}

/// Ends matches whose grace period passed.
async fn sweeper(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let ended = shared.affinity.sweep(shared.clock.now_ms());
                if ended > 0 {
                    tracing::debug!(ended, "matches ended");
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

impl ProxyHandle {
    /// Applies a new config without dropping anything.
    pub async fn reload(&self, config: Config) -> Result<u64, String> {
        self.shared.reload_with(config, "api").await
    }

    /// Bound addresses of the plain data-plane listeners now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.shared.control().listening()
    }

    /// Bound addresses of the TLS listeners now.
    pub fn listening_tls(&self) -> Vec<SocketAddr> {
        self.shared.control().listening_tls()
    }

    /// Graceful shutdown: stop accepting, let in-flight HTTP finish, give open
    /// tunnels `drain` to end by themselves, then close them with 1001.
    pub async fn shutdown(self, drain: Duration) {
        tracing::info!(?drain, "shutting down");
        self.stop.cancel();
        self.shared
            .checkers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
        self.conns.close();
        self.tasks.close();
        self.shared.tunnels.close();
        let deadline = tokio::time::Instant::now() + drain;
        let in_flight = async {
            self.conns.wait().await;
            self.tasks.wait().await;
        };
        if tokio::time::timeout_at(deadline, in_flight).await.is_err() {
            tracing::warn!("in-flight requests still running after the drain timeout");
        }
        if tokio::time::timeout_at(deadline, self.shared.tunnels.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.shared.tunnels.len(),
                "closing open WebSockets with 1001"
            );
        }
        self.shared.close_tunnels.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.shared.tunnels.wait()).await;
        tracing::info!("stopped");
    }
}
