//! Wire types: what a server looks like to the balancer and to operators.
//! Field names are camelCase on the wire (SPEC §3.3).

use serde::{Deserialize, Serialize};

/// Health of a server as the proxy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Passing checks, eligible for new traffic.
    Healthy,
    /// Failing active checks; no new traffic until it passes again.
    Unhealthy,
    /// Taken out by passive checks (connect failures, 5xx bursts) for a while.
    Ejected,
}

/// One server's live figures as reported by `GET /api/scaling/loadbalancer/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerStats {
    pub id: String,
    pub pool: String,
    pub address: String,
    pub weight: u32,
    pub health: Health,
    pub draining: bool,
    /// Where the server comes from: "static" (config) or "agent" (registry).
    pub source: String,
    /// Open proxied connections through this proxy: in-flight HTTP
    /// requests plus open WebSockets.
    pub connections: u64,
    pub websockets: u64,
    /// Matches this proxy has placed on the server and not yet ended.
    pub matches: u64,
    /// Connections and matches cluster-wide, as balancing uses them: the
    /// agent's last report plus what this proxy opened since.
    pub cluster_connections: u64,
    pub cluster_matches: u64,
    /// The agent's last report (absent for servers without an agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_connections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_matches: Option<u64>,
    /// Machine CPU and memory use (percent) from the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    pub max_connections: u64,
    pub max_matches: u64,
    /// How many times the strategy chose this server.
    pub selections: u64,
    pub requests: u64,
    pub failures: u64,
}

/// A server as its agent registers it in Redis (`Keys::server`), and as it
/// travels in heartbeat events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerRecord {
    pub id: String,
    pub pool: String,
    /// `host:port` where proxies reach the match server.
    pub address: String,
    pub weight: u32,
    /// The server's own limits, when it declares them (the pool's apply too).
    #[serde(default)]
    pub max_connections: Option<u64>,
    #[serde(default)]
    pub max_matches: Option<u64>,
    /// Agent version.
    pub version: String,
    /// Unix ms when the agent started; a restart is a new registration.
    pub started_at: u64,
    /// Unix ms of this heartbeat.
    pub updated_at: u64,
    /// Heartbeat number since `started_at`.
    pub seq: u64,
    pub heartbeat_ttl_ms: u64,
    /// Live load as the match server reports it; `None` before its first report.
    #[serde(default)]
    pub connections: Option<u64>,
    #[serde(default)]
    pub matches: Option<u64>,
    /// Machine CPU use, percent of all cores (one decimal).
    pub cpu: f64,
    /// Machine memory in use, percent (one decimal).
    pub memory: f64,
    pub draining: bool,
}

/// What goes over the registry channel (`Keys::registry_channel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RegistryEvent {
    /// A heartbeat or a change (drain, load) of one server.
    #[serde(rename_all = "camelCase")]
    Heartbeat { server: ServerRecord },
    /// The server left cleanly (its agent deregistered).
    #[serde(rename_all = "camelCase")]
    Down { id: String, pool: String },
    /// A proxy claimed a match for a server (published by the claim script).
    #[serde(rename_all = "camelCase")]
    Assign {
        pool: String,
        match_id: String,
        server: String,
        #[serde(default)]
        previous: String,
        token: u64,
        proxy: String,
    },
    /// A match ended and its assignment was released.
    #[serde(rename_all = "camelCase")]
    Release {
        pool: String,
        match_id: String,
        server: String,
    },
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
