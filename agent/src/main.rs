//! `kp5-agent` binary: parse the CLI (every config key is also a flag and an
//! environment variable) → load config (exit 64 on a bad one) → register →
//! serve the local API → on SIGTERM/SIGINT deregister and exit 0.

use anyhow::Context;
use clap::Parser;
use kp5_agent::{Config, Overrides};
use kp5_shared::ProcessEnv;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "kp5-agent",
    version,
    about = "Sidecar next to each KP5 match server: registers it, heartbeats, reports its load"
)]
struct Cli {
    /// Config file (TOML). Optional: every key can be given below instead.
    #[arg(short, long, env = "KP5_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the config, print what is wrong, and exit.
    #[arg(long)]
    check: bool,
    /// [agent] server_id (default: $HOSTNAME).
    #[arg(long, env = "KP5_AGENT_SERVER_ID")]
    server_id: Option<String>,
    /// [agent] pool.
    #[arg(long, env = "KP5_AGENT_POOL")]
    pool: Option<String>,
    /// [agent] advertise: HOST:PORT where proxies reach the match server.
    #[arg(long, env = "KP5_AGENT_ADVERTISE")]
    advertise: Option<String>,
    /// [agent] listen: IP:PORT of the local API.
    #[arg(long, env = "KP5_AGENT_LISTEN")]
    listen: Option<String>,
    /// [agent] weight.
    #[arg(long, env = "KP5_AGENT_WEIGHT")]
    weight: Option<u32>,
    /// [agent] max_connections: the server's own connection limit.
    #[arg(long, env = "KP5_AGENT_MAX_CONNECTIONS")]
    max_connections: Option<u64>,
    /// [agent] max_matches: the server's own match limit.
    #[arg(long, env = "KP5_AGENT_MAX_MATCHES")]
    max_matches: Option<u64>,
    /// [agent] heartbeat_interval_ms.
    #[arg(long, env = "KP5_AGENT_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    /// [agent] heartbeat_ttl_ms.
    #[arg(long, env = "KP5_AGENT_HEARTBEAT_TTL_MS")]
    heartbeat_ttl_ms: Option<u64>,
    /// [agent] load.source: push | scrape.
    #[arg(long, env = "KP5_AGENT_LOAD_SOURCE")]
    load_source: Option<String>,
    /// [agent] load.url: the match server's stats URL (scrape).
    #[arg(long, env = "KP5_AGENT_LOAD_URL")]
    load_url: Option<String>,
    /// [agent] events_max_len: changes kept per match for resuming event streams.
    #[arg(long, env = "KP5_AGENT_EVENTS_MAX_LEN")]
    events_max_len: Option<u64>,
    /// [agent] ended_retention_ms: an ended match's state is kept this long.
    #[arg(long, env = "KP5_AGENT_ENDED_RETENTION_MS")]
    ended_retention_ms: Option<u64>,
    /// [agent] idle_retention_ms: a match nobody writes expires after this.
    #[arg(long, env = "KP5_AGENT_IDLE_RETENTION_MS")]
    idle_retention_ms: Option<u64>,
    /// [redis] url (REDIS_URL also works).
    #[arg(long, env = "KP5_AGENT_REDIS_URL")]
    redis_url: Option<String>,
    /// [redis] key_prefix.
    #[arg(long, env = "KP5_AGENT_REDIS_KEY_PREFIX")]
    redis_key_prefix: Option<String>,
    /// Log filter, e.g. "info" or "kp5_agent=debug" (LOG_LEVEL also works).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

impl Cli {
    fn overrides(&self) -> Overrides {
        Overrides {
            server_id: self.server_id.clone(),
            pool: self.pool.clone(),
            advertise: self.advertise.clone(),
            listen: self.listen.clone(),
            weight: self.weight,
            max_connections: self.max_connections,
            max_matches: self.max_matches,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            heartbeat_ttl_ms: self.heartbeat_ttl_ms,
            load_source: self.load_source.clone(),
            load_url: self.load_url.clone(),
            redis_url: self.redis_url.clone(),
            redis_key_prefix: self.redis_key_prefix.clone(),
            events_max_len: self.events_max_len,
            ended_retention_ms: self.ended_retention_ms,
            idle_retention_ms: self.idle_retention_ms,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let source = cli
        .config
        .as_ref()
        .map_or("flags".to_owned(), |p| p.display().to_string());
    let text = match &cli.config {
        Some(p) => kp5_shared::config::read(p),
        None => Ok(String::new()),
    };
    let config = match text.and_then(|t| Config::build(&t, &ProcessEnv, cli.overrides())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kp5-agent: {source}: {e}");
            return ExitCode::from(64);
        }
    };
    if cli.check {
        println!(
            "kp5-agent: {source}: configuration is valid (server {})",
            config.server_id
        );
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kp5-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let handle = kp5_agent::start(config).await?;
        println!("kp5-agent listening on {}", handle.addr);
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        handle.shutdown().await;
        Ok(())
    })
}
