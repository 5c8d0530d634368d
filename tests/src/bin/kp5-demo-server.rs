//! One demo match server on its own (WebSocket echo, `/health`, `/stats`
//! with its connections and matches), for running a cluster by hand next to
//! `kp5-agent`; see the README.

use clap::Parser;
use kp5_tests::demo::DemoServer;

#[derive(Parser, Debug)]
#[command(name = "kp5-demo-server", version, about = "A demo KP5 match server")]
struct Cli {
    /// Server id (sent back in the `x-server` header).
    #[arg(long, default_value = "server-1")]
    id: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3001")]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let server = DemoServer::start(&cli.id, cli.listen).await?;
    println!("kp5-demo-server {} listening on {}", server.id, server.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
