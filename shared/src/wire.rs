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
    /// Open proxied connections: in-flight HTTP requests plus open WebSockets.
    pub connections: u64,
    pub websockets: u64,
    pub matches: u64,
    pub max_connections: u64,
    pub max_matches: u64,
    /// How many times the strategy chose this server.
    pub selections: u64,
    pub requests: u64,
    pub failures: u64,
}
