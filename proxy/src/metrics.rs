//! Prometheus metrics. Figures live in plain atomics on the hot path; this
//! collector reads them at scrape time and `prometheus-client` writes the
//! text exposition format. Names and labels are documented in docs/metrics.md.

use crate::app::Shared;
use kp5_shared::wire::Health;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

#[derive(Debug)]
struct Collector(Weak<Shared>);

struct Const<T>(T, MetricType);

impl EncodeMetric for Const<u64> {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self.1 {
            MetricType::Counter => {
                e.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&self.0, None)
            }
            _ => e.encode_gauge(&(self.0 as i64)),
        }
    }
    fn metric_type(&self) -> MetricType {
        self.1
    }
}

fn one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    t: MetricType,
    v: u64,
) -> std::fmt::Result {
    let m = Const(v, t);
    m.encode(enc.encode_descriptor(name, help, None, t)?)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(shared) = self.0.upgrade() else {
            return Ok(());
        };
        let c = &shared.counters;
        {
            let mut m = enc.encode_descriptor(
                "kp5_requests",
                "Responses sent to clients, by status class.",
                None,
                MetricType::Counter,
            )?;
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                Const(c.requests[i].load(Relaxed), MetricType::Counter)
                    .encode(m.encode_family(&[("code", *class)])?)?;
            }
        }
        one(
            &mut enc,
            "kp5_no_server",
            "Requests refused with 503 because no server could take them.",
            MetricType::Counter,
            c.no_capacity.load(Relaxed),
        )?;
        one(
            &mut enc,
            "kp5_connections",
            "Client connections accepted.",
            MetricType::Counter,
            c.connections_total.load(Relaxed),
        )?;
        one(
            &mut enc,
            "kp5_connections_active",
            "Client connections being served as HTTP (upgraded ones are counted by kp5_websockets_active).",
            MetricType::Gauge,
            c.connections_active.load(Relaxed),
        )?;
        one(
            &mut enc,
            "kp5_send_timeouts",
            "Client connections and tunnels closed because a peer took nothing for proxy.send_timeout_ms.",
            MetricType::Counter,
            c.send_timeouts.load(Relaxed),
        )?;
        one(
            &mut enc,
            "kp5_websockets",
            "WebSocket and other upgraded tunnels opened.",
            MetricType::Counter,
            c.websockets_total.load(Relaxed),
        )?;
        one(
            &mut enc,
            "kp5_websockets_active",
            "Open tunnels.",
            MetricType::Gauge,
            c.websockets_active.load(Relaxed),
        )?;
        one(
            &mut enc,
            "kp5_websocket_messages",
            "WebSocket messages relayed, both directions, counted as they pass.",
            MetricType::Counter,
            c.ws_messages.load(Relaxed),
        )?;
        one(
            &mut enc,
            "kp5_matches_active",
            "Matches this proxy has assigned and not yet ended.",
            MetricType::Gauge,
            shared.affinity.len() as u64,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "kp5_config_reloads",
                "Config reloads, by result.",
                None,
                MetricType::Counter,
            )?;
            Const(c.reloads_ok.load(Relaxed), MetricType::Counter)
                .encode(m.encode_family(&[("result", "ok")])?)?;
            Const(c.reloads_failed.load(Relaxed), MetricType::Counter)
                .encode(m.encode_family(&[("result", "error")])?)?;
        }
        let t = &shared.tls;
        for (name, help, ok, failed) in [
            (
                "kp5_tls_handshakes",
                "TLS handshakes on the TLS listeners, by result.",
                &t.handshakes_ok,
                &t.handshakes_failed,
            ),
            (
                "kp5_tls_certificate_reloads",
                "Certificate reloads after their files changed, by result (error: the previous pairs keep serving).",
                &t.cert_reloads_ok,
                &t.cert_reloads_failed,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            Const(ok.load(Relaxed), MetricType::Counter)
                .encode(m.encode_family(&[("result", "ok")])?)?;
            Const(failed.load(Relaxed), MetricType::Counter)
                .encode(m.encode_family(&[("result", "error")])?)?;
        }

        if let Some(cl) = &shared.cluster {
            one(
                &mut enc,
                "kp5_redis_up",
                "1 while Redis is reachable; 0 means degraded (last-known registry, rendezvous placement).",
                MetricType::Gauge,
                u64::from(cl.is_up()),
            )?;
            let n = &cl.counters;
            {
                let mut m = enc.encode_descriptor(
                "kp5_match_claims",
                "Match claims in Redis, by result: won (new owner installed), adopted (another proxy's owner), reassigned (won over a dead owner), rendezvous (placed without Redis).",
                None,
                MetricType::Counter,
            )?;
                for (result, v) in [
                    ("won", &n.claims_won),
                    ("adopted", &n.claims_adopted),
                    ("reassigned", &n.reassignments),
                    ("rendezvous", &n.degraded_placements),
                ] {
                    Const(v.load(Relaxed), MetricType::Counter)
                        .encode(m.encode_family(&[("result", result)])?)?;
                }
            }
            one(
                &mut enc,
                "kp5_redis_errors",
                "Redis commands that failed or timed out.",
                MetricType::Counter,
                n.redis_errors.load(Relaxed),
            )?;
            one(
                &mut enc,
                "kp5_registry_events",
                "Registry events received over pub/sub.",
                MetricType::Counter,
                n.events.load(Relaxed),
            )?;
        }
        let rt = shared.runtime.load_full();
        let now = shared.clock.now_ms();
        type Get = fn(&crate::runtime::Upstream, u64) -> u64;
        let per_server: [(&str, &str, MetricType, Get); 12] = [
            (
                "kp5_upstream_websocket_messages",
                "WebSocket messages relayed to and from the server (both directions), counted as they pass.",
                MetricType::Counter,
                |u, _| u.state.ws_messages.load(Relaxed),
            ),
            (
                "kp5_upstream_cluster_connections",
                "Connections per server cluster-wide, as balancing sees them (agent report plus this proxy's opens since).",
                MetricType::Gauge,
                |u, _| u.state.cluster_connections(),
            ),
            (
                "kp5_upstream_cluster_matches",
                "Matches per server cluster-wide, as balancing sees them.",
                MetricType::Gauge,
                |u, _| u.state.cluster_matches(),
            ),
            (
                "kp5_upstream_connections",
                "Open proxied connections per server (in-flight requests plus tunnels).",
                MetricType::Gauge,
                |u, _| u.state.connections.load(Relaxed),
            ),
            (
                "kp5_upstream_websockets",
                "Open tunnels per server.",
                MetricType::Gauge,
                |u, _| u.state.websockets.load(Relaxed),
            ),
            (
                "kp5_upstream_matches",
                "Active matches per server.",
                MetricType::Gauge,
                |u, _| u.state.matches.load(Relaxed),
            ),
            (
                "kp5_upstream_selections",
                "Times the pool's strategy chose the server.",
                MetricType::Counter,
                |u, _| u.state.selections.load(Relaxed),
            ),
            (
                "kp5_upstream_requests",
                "Requests sent to the server (attempts).",
                MetricType::Counter,
                |u, _| u.state.requests.load(Relaxed),
            ),
            (
                "kp5_upstream_failures",
                "Connect failures and errors talking to the server.",
                MetricType::Counter,
                |u, _| u.state.failures.load(Relaxed),
            ),
            (
                "kp5_upstream_healthy",
                "1 when the server is healthy (passing checks, not ejected).",
                MetricType::Gauge,
                |u, now| u64::from(u.state.health(now) == Health::Healthy),
            ),
            (
                "kp5_upstream_draining",
                "1 when the server is draining.",
                MetricType::Gauge,
                |u, _| u64::from(u.state.draining.load(Relaxed)),
            ),
            (
                "kp5_upstream_max_connections",
                "Connection limit per server.",
                MetricType::Gauge,
                |u, _| u.max_connections,
            ),
        ];
        for (name, help, t, get) in per_server {
            let mut m = enc.encode_descriptor(name, help, None, t)?;
            for p in &rt.pools {
                for u in &p.servers {
                    let labels = [("pool", &*p.name), ("server", &*u.state.id)];
                    Const(get(u, now), t).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "kp5_upstream_responses",
                "Responses from each server, by status class.",
                None,
                MetricType::Counter,
            )?;
            for p in &rt.pools {
                for u in &p.servers {
                    for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                        let labels = [
                            ("pool", &*p.name),
                            ("server", &*u.state.id),
                            ("code", *class),
                        ];
                        Const(u.state.responses[i].load(Relaxed), MetricType::Counter)
                            .encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "kp5_upstream_response_seconds",
                "Time from sending a request to the server's response head.",
                None,
                MetricType::Histogram,
            )?;
            for p in &rt.pools {
                for u in &p.servers {
                    let labels = [("pool", &*p.name), ("server", &*u.state.id)];
                    let (sum, count, buckets) = u.state.latency.snapshot();
                    m.encode_family(&labels)?
                        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            sum, count, &buckets, None,
                        )?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "kp5_pool_strategy",
                "The strategy each pool uses (value 1).",
                None,
                MetricType::Gauge,
            )?;
            for p in &rt.pools {
                let labels = [("pool", &*p.name), ("strategy", p.cfg.strategy.as_str())];
                Const(1, MetricType::Gauge).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The Prometheus text of everything this proxy measures.
pub fn render(shared: &Arc<Shared>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Collector(Arc::downgrade(shared))));
    let mut out = String::with_capacity(8192);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}
