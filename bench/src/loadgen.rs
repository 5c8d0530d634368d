//! `kp5-loadgen`: WebSocket load shaped like live matches. Opens N
//! WebSockets spread over M matches (the URL template's `{match}`), then
//! either runs a closed loop (each connection sends, waits for the echo,
//! sends again), sends at a fixed total message rate, or holds the
//! connections idle. Reports connects/s, messages/s, round-trip percentiles
//! (HdrHistogram) and errors, as text and as one JSON line.
//!
//! Past the ~28,000 ephemeral ports of one source address, spread the
//! connections over several loopback sources with `--sources 4`
//! (127.0.0.1 .. 127.0.0.4).

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Each connection: send, wait for the echo, repeat.
    Closed,
    /// `--rate` messages per second in total, spread over the connections.
    Rate,
    /// Connect, then hold every connection open without traffic.
    Idle,
}

#[derive(Parser, Debug)]
#[command(
    name = "kp5-loadgen",
    version,
    about = "WebSocket load shaped like live matches"
)]
struct Cli {
    /// Target URL; `{match}` is replaced by the match id (m0, m1, ...).
    #[arg(long, default_value = "ws://127.0.0.1:8080/matches/{match}/ws")]
    url: String,
    /// WebSockets to open.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Matches the connections are spread over (round robin).
    #[arg(long, default_value_t = 10)]
    matches: usize,
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    mode: Mode,
    /// Total messages per second (`--mode rate`).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to run (or hold) after every connection is open, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Message size, bytes (at least 24).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1..N).
    #[arg(long, default_value_t = 1)]
    sources: u8,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    connect_errors: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn open(url: &str, source: IpAddr) -> Result<Ws, String> {
    let uri: tokio_tungstenite::tungstenite::http::Uri =
        url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = uri.host().ok_or("URL without host")?;
    let port = uri.port_u16().unwrap_or(80);
    let target: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("host did not resolve")?;
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if target.is_ipv4() && source != IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
    }
    let stream = socket.connect(target).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// tungstenite zero-fills its whole read buffer before every read (128 KiB
/// by default): with small messages that memset was 40 % of the load
/// generator's core, which it shares with the backends, and bounded every
/// proxy's figure. 4 KiB holds many small frames; larger ones still grow it.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

/// A payload carrying its send time (µs since `epoch`), padded to `size`.
fn payload(epoch: Instant, size: usize) -> String {
    let mut s = format!("{:020}", epoch.elapsed().as_micros());
    while s.len() < size {
        s.push('.');
    }
    s
}

fn rtt_us(epoch: Instant, msg: &Message) -> Option<u64> {
    let text = match msg {
        Message::Text(t) => t.as_str(),
        _ => return None,
    };
    let sent: u64 = text.get(..20)?.parse().ok()?;
    Some((epoch.elapsed().as_micros() as u64).saturating_sub(sent))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let size = cli.size.max(24);
    let stats = Arc::new(Stats::default());
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    ));
    let epoch = Instant::now();

    // connect everything first
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(cli.connect_concurrency.max(1)));
    let mut opening = Vec::with_capacity(cli.connections);
    for i in 0..cli.connections {
        let url = cli
            .url
            .replace("{match}", &format!("m{}", i % cli.matches.max(1)));
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % cli.sources.max(1) as usize) as u8,
        ));
        let (gate, stats) = (gate.clone(), stats.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            match open(&url, source).await {
                Ok(ws) => {
                    stats.connected.fetch_add(1, Relaxed);
                    Some(ws)
                }
                Err(e) => {
                    if stats.connect_errors.fetch_add(1, Relaxed) < 3 {
                        eprintln!("connect failed: {e}");
                    }
                    None
                }
            }
        }));
    }
    let mut sockets = Vec::with_capacity(cli.connections);
    for o in opening {
        if let Ok(Some(ws)) = o.await {
            sockets.push(ws);
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    println!(
        "connected {} of {} in {:.2} s ({:.0}/s), {} failed",
        sockets.len(),
        cli.connections,
        connect_secs,
        sockets.len() as f64 / connect_secs.max(1e-9),
        stats.connect_errors.load(Relaxed)
    );
    println!("ready");

    let duration = Duration::from_secs_f64(cli.duration);
    let run_start = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let n = sockets.len().max(1);
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let (stats, hist) = (stats.clone(), hist.clone());
        let mode = cli.mode;
        let every = Duration::from_secs_f64(n as f64 / cli.rate.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            // 240 KB each: only the connections that time round trips have one
            // (2,000 idle connections held 294 MB of RSS with one each)
            let new_hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            match mode {
                Mode::Idle => {
                    tokio::time::sleep_until(deadline).await;
                }
                Mode::Closed => {
                    let mut local = new_hist();
                    while tokio::time::Instant::now() < deadline {
                        if ws.send(Message::text(payload(epoch, size))).await.is_err() {
                            stats.errors.fetch_add(1, Relaxed);
                            break;
                        }
                        stats.sent.fetch_add(1, Relaxed);
                        match tokio::time::timeout_at(deadline + Duration::from_secs(5), ws.next())
                            .await
                        {
                            Ok(Some(Ok(m))) => {
                                stats.received.fetch_add(1, Relaxed);
                                if let Some(us) = rtt_us(epoch, &m) {
                                    let _ = local.record(us.max(1));
                                }
                            }
                            _ => {
                                stats.errors.fetch_add(1, Relaxed);
                                break;
                            }
                        }
                    }
                    hist.lock().unwrap().add(&local).ok();
                }
                Mode::Rate => {
                    let mut local = new_hist();
                    let (mut sink, mut stream) = ws.split();
                    let s2 = stats.clone();
                    let sender = tokio::spawn(async move {
                        // spread the first sends over one period
                        tokio::time::sleep(every.mul_f64(fastrand::f64())).await;
                        let mut tick = tokio::time::interval(every);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                        while tokio::time::Instant::now() < deadline {
                            tick.tick().await;
                            if sink
                                .send(Message::text(payload(epoch, size)))
                                .await
                                .is_err()
                            {
                                s2.errors.fetch_add(1, Relaxed);
                                break;
                            }
                            s2.sent.fetch_add(1, Relaxed);
                        }
                        sink
                    });
                    loop {
                        match tokio::time::timeout_at(
                            deadline + Duration::from_millis(500),
                            stream.next(),
                        )
                        .await
                        {
                            Ok(Some(Ok(m))) => {
                                stats.received.fetch_add(1, Relaxed);
                                if let Some(us) = rtt_us(epoch, &m) {
                                    let _ = local.record(us.max(1));
                                }
                            }
                            Ok(Some(Err(_))) | Ok(None) => {
                                stats.errors.fetch_add(1, Relaxed);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Ok(sink) = sender.await {
                        if let Ok(mut ws) = sink.reunite(stream) {
                            let _ = ws.close(None).await;
                        }
                    }
                    hist.lock().unwrap().add(&local).ok();
                    return;
                }
            }
            let _ = ws.close(None).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = run_start
        .elapsed()
        .as_secs_f64()
        .min(cli.duration.max(1e-9));
    let h = hist.lock().unwrap();
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    let received = stats.received.load(Relaxed);
    let report = serde_json::json!({
        "mode": format!("{:?}", cli.mode).to_lowercase(),
        "connections": cli.connections,
        "connected": stats.connected.load(Relaxed),
        "connectErrors": stats.connect_errors.load(Relaxed),
        "connectsPerSecond": (stats.connected.load(Relaxed) as f64 / connect_secs.max(1e-9)).round(),
        "matches": cli.matches,
        "seconds": secs,
        "sent": stats.sent.load(Relaxed),
        "received": received,
        "messagesPerSecond": (received as f64 / secs).round(),
        "errors": stats.errors.load(Relaxed),
        "rttMs": { "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": h.max() as f64 / 1000.0 },
    });
    println!(
        "{} messages echoed in {:.1} s ({:.0}/s), errors {}, round trip ms p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
        received,
        secs,
        received as f64 / secs,
        stats.errors.load(Relaxed),
        q(0.5),
        q(0.99),
        q(0.999),
        h.max() as f64 / 1000.0
    );
    println!("{report}");
}
