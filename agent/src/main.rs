//! `kp5-agent` binary. This build validates its configuration (`--check`);
//! registration, heartbeats and the local API come with the Redis registry.

use clap::Parser;
use kp5_shared::ProcessEnv;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "kp5-agent",
    version,
    about = "Sidecar next to each KP5 match server"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(
        short,
        long,
        default_value = "configs/agent.toml",
        env = "KP5_AGENT_CONFIG"
    )]
    config: PathBuf,
    /// Validate the config, print what is wrong, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match kp5_agent::Config::load(&cli.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kp5-agent: {}: {e}", cli.config.display());
            return ExitCode::from(64);
        }
    };
    if cli.check {
        println!(
            "kp5-agent: {}: configuration is valid (server {})",
            cli.config.display(),
            config.server_id
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "kp5-agent: registration and the local API need the Redis registry, which this build does not have yet; \
         run the proxy with static backends (see README)"
    );
    ExitCode::from(69)
}
