//! `kp5-proxy` binary: parse the CLI → load config (exit 64 on a bad one) →
//! bind → serve (the config file watched; SIGHUP reloads it too) → wait for
//! SIGTERM/SIGINT → drain → exit 0.

use anyhow::Context;
use clap::Parser;
use kp5_proxy::Config;
use kp5_shared::ProcessEnv;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "kp5-proxy",
    version,
    about = "WebSocket-aware load-balancing proxy with match affinity"
)]
struct Cli {
    /// Config file (TOML). See configs/ for documented examples.
    #[arg(
        short,
        long,
        default_value = "configs/proxy.toml",
        env = "KP5_PROXY_CONFIG"
    )]
    config: PathBuf,
    /// Validate the config, print what is wrong, and exit (like `nginx -t`).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kp5-proxy: {}: {e}", cli.config.display());
            return ExitCode::from(64);
        }
    };
    if cli.check {
        // certificates, keys and CAs are read and matched too, as at start
        if let Err(e) = kp5_proxy::tls::TlsState::default().prepare(&config) {
            eprintln!("kp5-proxy: {}: {e}", cli.config.display());
            return ExitCode::from(64);
        }
        println!(
            "kp5-proxy: {}: configuration is valid",
            cli.config.display()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    match run(config, cli.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kp5-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    // One worker is one event loop, like one nginx worker process: the
    // current-thread scheduler skips the work-stealing machinery (and the
    // hand-offs between the main thread and the single worker).
    let mut rt = match config.proxy.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt.enable_all().build().context("starting the runtime")?;
    rt.block_on(async {
        let drain = config.proxy.drain_timeout;
        let opts = kp5_proxy::Options {
            config_path: Some(path),
            env: std::sync::Arc::new(ProcessEnv),
            watch: true,
        };
        let handle = kp5_proxy::start_with(config, opts).await?;
        wait_for_signal(&handle).await?;
        handle.shutdown(drain).await;
        Ok(())
    })
}

/// Waits for SIGTERM or SIGINT; SIGHUP reloads the config file meanwhile.
async fn wait_for_signal(handle: &kp5_proxy::ProxyHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT received"); return Ok(()) }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the config file");
                let _ = handle.shared.reload_file("SIGHUP").await;
            }
        }
    }
}
