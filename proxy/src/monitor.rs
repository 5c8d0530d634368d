//! Performance monitoring (the seed's Performance Monitoring Service): every
//! `[monitoring] interval_ms` each server's figures are sampled from what
//! the proxy measures (response time, error rate, connection and match
//! utilization) and what its agent reports (CPU, memory); samples are kept
//! for `retention_hours` and at most `max_metrics_stored` snapshots; and
//! thresholds turn them into alerts that do not flap.
//!
//! Alerts: one open alert per server and metric. Severity `warning` from 90 %
//! of the threshold, `error` over it, `critical` at 1.5x or after six samples
//! in a row over it. An open alert resolves by itself once the figure is below
//! 80 % of the threshold (hysteresis: a figure hovering at the threshold
//! raises one alert, not many). Resolved through the API, it is not raised
//! again until the figure has recovered once.

use crate::app::Shared;
use crate::state::LATENCY_BUCKETS;
use kp5_shared::wire::unix_ms;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

/// Alert thresholds, the seed's names and defaults. Percentages, and ms for
/// `responseTime`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Thresholds {
    #[serde(alias = "cpu_usage", default = "d_cpu")]
    pub cpu_usage: f64,
    #[serde(alias = "memory_usage", default = "d_mem")]
    pub memory_usage: f64,
    #[serde(alias = "response_time", default = "d_rt")]
    pub response_time: f64,
    #[serde(alias = "error_rate", default = "d_err")]
    pub error_rate: f64,
    #[serde(alias = "connection_utilization", default = "d_util")]
    pub connection_utilization: f64,
    #[serde(alias = "match_utilization", default = "d_util")]
    pub match_utilization: f64,
}

fn d_cpu() -> f64 {
    80.0
}
fn d_mem() -> f64 {
    85.0
}
fn d_rt() -> f64 {
    1000.0
}
fn d_err() -> f64 {
    5.0
}
fn d_util() -> f64 {
    90.0
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            cpu_usage: d_cpu(),
            memory_usage: d_mem(),
            response_time: d_rt(),
            error_rate: d_err(),
            connection_utilization: d_util(),
            match_utilization: d_util(),
        }
    }
}

impl Thresholds {
    /// Every figure positive; percentages at most 100. Err: (field, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for m in Metric::ALL {
            let v = self.get(m);
            if !v.is_finite() || v <= 0.0 {
                return Err((m.name(), format!("{v} must be a number above 0")));
            }
            if m != Metric::ResponseTime && v > 100.0 {
                return Err((m.name(), format!("{v} is a percentage: at most 100")));
            }
        }
        Ok(())
    }

    pub fn get(&self, m: Metric) -> f64 {
        match m {
            Metric::CpuUsage => self.cpu_usage,
            Metric::MemoryUsage => self.memory_usage,
            Metric::ResponseTime => self.response_time,
            Metric::ErrorRate => self.error_rate,
            Metric::ConnectionUtilization => self.connection_utilization,
            Metric::MatchUtilization => self.match_utilization,
        }
    }
}

/// What a threshold applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    CpuUsage,
    MemoryUsage,
    ResponseTime,
    ErrorRate,
    ConnectionUtilization,
    MatchUtilization,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::CpuUsage,
        Metric::MemoryUsage,
        Metric::ResponseTime,
        Metric::ErrorRate,
        Metric::ConnectionUtilization,
        Metric::MatchUtilization,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::CpuUsage => "cpuUsage",
            Metric::MemoryUsage => "memoryUsage",
            Metric::ResponseTime => "responseTime",
            Metric::ErrorRate => "errorRate",
            Metric::ConnectionUtilization => "connectionUtilization",
            Metric::MatchUtilization => "matchUtilization",
        }
    }

    fn unit(self) -> &'static str {
        if self == Metric::ResponseTime {
            "ms"
        } else {
            "%"
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
    Critical,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub id: String,
    pub server: String,
    pub metric: String,
    pub severity: Severity,
    /// "open" or "resolved".
    pub status: String,
    pub value: f64,
    pub threshold: f64,
    pub message: String,
    pub raised_at: u64,
    pub updated_at: u64,
    #[serde(default)]
    pub resolved_at: Option<u64>,
    /// "auto" (the figure recovered) or "api".
    #[serde(default)]
    pub resolved_by: Option<String>,
}

/// One server's figures over one interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerSample {
    pub server: String,
    pub pool: String,
    /// Requests answered (or failed) in the interval, and per second.
    pub requests: u64,
    pub requests_per_second: f64,
    /// Mean, p95 and p99 time to the response head over the interval, ms
    /// (absent without requests).
    pub response_time: Option<f64>,
    #[serde(default)]
    pub response_time_p50: Option<f64>,
    pub response_time_p95: Option<f64>,
    pub response_time_p99: Option<f64>,
    /// 5xx responses and failures, percent of requests (absent without requests).
    pub error_rate: Option<f64>,
    pub connections: u64,
    pub connection_utilization: f64,
    pub matches: u64,
    pub match_utilization: f64,
    pub websockets: u64,
    /// WebSocket messages relayed per second (both directions).
    #[serde(default)]
    pub websocket_messages_per_second: f64,
    /// From the agent (absent for servers without one).
    pub cpu_usage: Option<f64>,
    pub memory_usage: Option<f64>,
}

impl ServerSample {
    fn value(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::CpuUsage => self.cpu_usage,
            Metric::MemoryUsage => self.memory_usage,
            Metric::ResponseTime => self.response_time,
            Metric::ErrorRate => self.error_rate,
            Metric::ConnectionUtilization => Some(self.connection_utilization),
            Metric::MatchUtilization => Some(self.match_utilization),
        }
    }
}

/// All servers at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub at: u64,
    pub interval_ms: u64,
    pub servers: Vec<ServerSample>,
}

#[derive(Debug, Default, Clone)]
struct Prev {
    ws_messages: u64,
    requests: u64,
    errors: u64,
    latency_count: u64,
    latency_sum_us: f64,
    buckets: Vec<u64>,
}

#[derive(Debug, Default)]
struct Track {
    /// Consecutive samples over the threshold.
    over: u32,
    /// Resolved by the API while still high: wait for recovery first.
    suppressed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    prev: HashMap<String, Prev>,
    prev_at: u64,
    history: VecDeque<Snapshot>,
    /// This proxy's latest measurement.
    last: Option<Snapshot>,
    alerts: VecDeque<Alert>,
    tracks: HashMap<(String, Metric), Track>,
    next_id: u64,
}

/// Resolved alerts kept for listing.
const KEEP_RESOLVED: usize = 500;

pub struct Monitor {
    thresholds: Mutex<Thresholds>,
    inner: Mutex<Inner>,
    instance: String,
}

impl Monitor {
    pub fn new(thresholds: Thresholds) -> Monitor {
        Monitor {
            thresholds: Mutex::new(thresholds),
            inner: Mutex::new(Inner::default()),
            instance: format!("{:04x}", fastrand::u16(..)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_thresholds(&self, t: Thresholds) {
        *self.thresholds.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// Snapshots within the last `hours`, oldest first.
    pub fn history(&self, hours: f64) -> Vec<Snapshot> {
        let since = unix_ms().saturating_sub((hours * 3_600_000.0) as u64);
        self.lock()
            .history
            .iter()
            .filter(|s| s.at >= since)
            .cloned()
            .collect()
    }

    /// This proxy's latest measurement.
    pub fn latest(&self) -> Option<Snapshot> {
        self.lock().last.clone()
    }

    pub fn stored(&self) -> usize {
        self.lock().history.len()
    }

    /// Alerts, open ones first, newest first.
    pub fn alerts(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = self.lock().alerts.iter().cloned().collect();
        v.sort_by(|a, b| {
            (a.status != "open")
                .cmp(&(b.status != "open"))
                .then(b.updated_at.cmp(&a.updated_at))
        });
        v
    }

    /// Takes the cluster's open alerts and suppressions as the truth before
    /// an evaluation (the lease may have moved; another proxy may have
    /// resolved an alert).
    pub fn sync(&self, open: Vec<Alert>, suppressed: impl Iterator<Item = (String, String)>) {
        let mut inner = self.lock();
        inner.alerts.retain(|a| a.status != "open");
        inner.alerts.extend(open);
        for t in inner.tracks.values_mut() {
            t.suppressed = false;
        }
        for (server, metric) in suppressed {
            if let Some(m) = metric_of(&metric) {
                inner.tracks.entry((server, m)).or_default().suppressed = true;
            }
        }
    }

    /// Resolves an alert by id; `None` if unknown.
    pub fn resolve(&self, id: &str) -> Option<Alert> {
        let mut inner = self.lock();
        let idx = inner.alerts.iter().position(|a| a.id == id)?;
        let now = unix_ms();
        let a = &mut inner.alerts[idx];
        if a.status == "open" {
            a.status = "resolved".into();
            a.resolved_at = Some(now);
            a.resolved_by = Some("api".into());
            a.updated_at = now;
            let key = (a.server.clone(), metric_of(&a.metric)?);
            let out = a.clone();
            inner.tracks.entry(key).or_default().suppressed = true;
            return Some(out);
        }
        Some(a.clone())
    }

    /// Takes one sample of every server and evaluates the thresholds
    /// (embedded mode: this proxy's own figures, alerts and history).
    pub fn sample(&self, shared: &Shared, settings: &crate::config::MonitoringSettings) {
        let snap = self.measure(shared, settings);
        self.record(snap, &self.thresholds(), settings);
    }

    /// This proxy's figures of every server since the last call.
    pub fn measure(
        &self,
        shared: &Shared,
        settings: &crate::config::MonitoringSettings,
    ) -> Snapshot {
        let now = unix_ms();
        let rt = shared.runtime.load();
        let mut inner = self.lock();
        let elapsed_ms = if inner.prev_at == 0 {
            settings.interval.as_millis() as u64
        } else {
            now.saturating_sub(inner.prev_at).max(1)
        };
        inner.prev_at = now;
        let mut servers = Vec::new();
        for p in &rt.pools {
            for u in &p.servers {
                let s = &u.state;
                let id = s.id.to_string();
                let responses: u64 = s.responses.iter().map(|r| r.load(Relaxed)).sum();
                let failures = s.failures.load(Relaxed);
                let errors = s.responses[4].load(Relaxed) + failures;
                let (sum_s, count, buckets) = s.latency.snapshot();
                let cur = Prev {
                    ws_messages: s.ws_messages.load(Relaxed),
                    requests: responses + failures,
                    errors,
                    latency_count: count,
                    latency_sum_us: sum_s * 1e6,
                    buckets: buckets.iter().map(|b| b.1).collect(),
                };
                let prev = inner
                    .prev
                    .insert(id.clone(), cur.clone())
                    .unwrap_or_default();
                let requests = cur.requests.saturating_sub(prev.requests);
                let lat_n = cur.latency_count.saturating_sub(prev.latency_count);
                let deltas: Vec<u64> = cur
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| c.saturating_sub(prev.buckets.get(i).copied().unwrap_or(0)))
                    .collect();
                let mean = (lat_n > 0).then(|| {
                    (cur.latency_sum_us - prev.latency_sum_us).max(0.0) / lat_n as f64 / 1000.0
                });
                let conns = s.cluster_connections();
                let matches = s.cluster_matches();
                let agent = u.discovered || s.reported_connections().is_some();
                servers.push(ServerSample {
                    server: id,
                    pool: p.name.to_string(),
                    requests,
                    requests_per_second: round1(requests as f64 * 1000.0 / elapsed_ms as f64),
                    response_time: mean.map(round1),
                    response_time_p50: quantile(&deltas, 0.50).map(round1),
                    response_time_p95: quantile(&deltas, 0.95).map(round1),
                    response_time_p99: quantile(&deltas, 0.99).map(round1),
                    error_rate: (requests > 0).then(|| {
                        round1(
                            cur.errors.saturating_sub(prev.errors) as f64 * 100.0 / requests as f64,
                        )
                    }),
                    connections: conns,
                    connection_utilization: round1(
                        conns as f64 * 100.0 / u.max_connections.max(1) as f64,
                    ),
                    matches,
                    match_utilization: round1(matches as f64 * 100.0 / u.max_matches.max(1) as f64),
                    websockets: s.websockets.load(Relaxed),
                    websocket_messages_per_second: round1(
                        cur.ws_messages.saturating_sub(prev.ws_messages) as f64 * 1000.0
                            / elapsed_ms as f64,
                    ),
                    cpu_usage: agent.then(|| s.cpu_permille.load(Relaxed) as f64 / 10.0),
                    memory_usage: agent.then(|| s.memory_permille.load(Relaxed) as f64 / 10.0),
                });
            }
        }
        let snap = Snapshot {
            at: now,
            interval_ms: elapsed_ms,
            servers,
        };
        inner.last = Some(snap.clone());
        snap
    }

    /// Evaluates `snap` against `thresholds`, keeps it in the history, and
    /// returns the alerts that changed.
    pub fn record(
        &self,
        snap: Snapshot,
        thresholds: &Thresholds,
        settings: &crate::config::MonitoringSettings,
    ) -> Vec<Alert> {
        let now = snap.at;
        let mut inner = self.lock();
        let mut changed = Vec::new();
        for sample in &snap.servers {
            for m in Metric::ALL {
                if let Some(v) = sample.value(m) {
                    changed.extend(self.evaluate(
                        &mut inner,
                        &sample.server,
                        m,
                        v,
                        thresholds.get(m),
                        now,
                    ));
                }
            }
        }
        let servers = &snap.servers;
        // servers gone from the config: their open alerts end
        let present: std::collections::HashSet<&str> =
            servers.iter().map(|s| s.server.as_str()).collect();
        for a in inner.alerts.iter_mut() {
            if a.status == "open" && !present.contains(a.server.as_str()) {
                a.status = "resolved".into();
                a.resolved_at = Some(now);
                a.resolved_by = Some("auto".into());
                a.updated_at = now;
                changed.push(a.clone());
            }
        }
        inner.history.push_back(snap);
        let since = now.saturating_sub(settings.retention_ms());
        while inner.history.len() > settings.max_metrics_stored
            || inner.history.front().is_some_and(|s| s.at < since)
        {
            inner.history.pop_front();
        }
        changed
    }

    fn evaluate(
        &self,
        inner: &mut Inner,
        server: &str,
        m: Metric,
        v: f64,
        t: f64,
        now: u64,
    ) -> Option<Alert> {
        let key = (server.to_owned(), m);
        let track = inner.tracks.entry(key.clone()).or_default();
        if v >= t {
            track.over += 1;
        } else {
            track.over = 0;
        }
        let recovered = v < 0.8 * t;
        if recovered {
            track.suppressed = false;
        }
        let level = if v >= 1.5 * t || (v >= t && track.over >= 6) {
            Some(Severity::Critical)
        } else if v >= t {
            Some(Severity::Error)
        } else if v >= 0.9 * t {
            Some(Severity::Warning)
        } else {
            None
        };
        let suppressed = track.suppressed;
        let open = inner
            .alerts
            .iter_mut()
            .find(|a| a.status == "open" && a.server == server && a.metric == m.name());
        match open {
            Some(a) => {
                a.value = round1(v);
                a.threshold = t;
                a.updated_at = now;
                if recovered {
                    a.status = "resolved".into();
                    a.resolved_at = Some(now);
                    a.resolved_by = Some("auto".into());
                    tracing::info!(server, metric = m.name(), value = v, "alert resolved");
                } else if let Some(l) = level.filter(|&l| l > a.severity) {
                    a.severity = l;
                    a.message = message(server, m, v, t, l);
                    tracing::warn!(server, metric = m.name(), value = v, severity = ?l, "alert escalated");
                }
                Some(a.clone())
            }
            None => {
                let l = level?;
                if suppressed {
                    return None;
                }
                inner.next_id += 1;
                let alert = Alert {
                    id: format!("{}-{}-{}", self.instance, now, inner.next_id),
                    server: server.to_owned(),
                    metric: m.name().into(),
                    severity: l,
                    status: "open".into(),
                    value: round1(v),
                    threshold: t,
                    message: message(server, m, v, t, l),
                    raised_at: now,
                    updated_at: now,
                    resolved_at: None,
                    resolved_by: None,
                };
                tracing::warn!(server, metric = m.name(), value = v, severity = ?l, "alert raised");
                inner.alerts.push_back(alert.clone());
                let resolved = inner.alerts.iter().filter(|a| a.status != "open").count();
                if resolved > KEEP_RESOLVED {
                    if let Some(i) = inner.alerts.iter().position(|a| a.status != "open") {
                        inner.alerts.remove(i);
                    }
                }
                Some(alert)
            }
        }
    }
}

fn metric_of(name: &str) -> Option<Metric> {
    Metric::ALL.into_iter().find(|m| m.name() == name)
}

fn message(server: &str, m: Metric, v: f64, t: f64, l: Severity) -> String {
    let what = match l {
        Severity::Warning => "approaching",
        Severity::Error => "over",
        Severity::Critical => "far over (or long over)",
    };
    format!(
        "{server}: {} {:.1}{u} is {what} the threshold {t}{u}",
        m.name(),
        v,
        u = m.unit()
    )
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A quantile of a bucketed histogram, in ms, interpolated within its bucket.
fn quantile(deltas: &[u64], q: f64) -> Option<f64> {
    let total: u64 = deltas.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &n) in deltas.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lo = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let hi = LATENCY_BUCKETS.get(i).copied().unwrap_or(lo * 2.0);
            let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
            return Some((lo + (hi - lo) * within) * 1000.0);
        }
        seen += n;
    }
    None
}

/// Samples every interval until `stop`. With Redis up, every proxy
/// publishes its sample and the lease holder evaluates the cluster's;
/// otherwise this proxy evaluates its own.
pub async fn run(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let settings = shared.runtime.load().config.monitoring.clone();
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = stop.cancelled() => return,
        }
        match shared.cluster.as_ref().filter(|c| c.is_up()) {
            Some(cluster) => {
                if let Err(e) = cluster_round(&shared, cluster, &settings).await {
                    tracing::debug!(error = %e, "cluster monitoring round failed");
                    cluster.note_error(&e);
                }
            }
            None => shared.monitor.sample(&shared, &settings),
        }
    }
}

async fn cluster_round(
    shared: &Shared,
    cluster: &crate::cluster::Cluster,
    settings: &crate::config::MonitoringSettings,
) -> redis::RedisResult<()> {
    let mon = &shared.monitor;
    let snap = mon.measure(shared, settings);
    let interval = settings.interval.as_millis() as u64;
    let lease = (3 * interval).max(1000);
    cluster.publish_sample(&snap, lease).await?;
    if !cluster.lead(lease).await? {
        return Ok(());
    }
    let peers = cluster.peer_samples(snap.at.saturating_sub(lease)).await?;
    let agg = crate::cluster::perf::aggregate(&peers, snap.at, snap.interval_ms);
    let thresholds = cluster
        .thresholds()
        .await?
        .unwrap_or_else(|| mon.thresholds());
    // the alerts as the cluster has them (another proxy may have resolved one)
    let open: Vec<Alert> = cluster
        .alerts()
        .await?
        .into_iter()
        .filter(|a| a.status == "open")
        .collect();
    let pairs: Vec<(String, String)> = agg
        .servers
        .iter()
        .flat_map(|s| Metric::ALL.map(|m| (s.server.clone(), m.name().to_owned())))
        .collect();
    let suppressed = cluster.suppressed(&pairs).await?;
    let recovered: Vec<(String, String)> = pairs
        .iter()
        .zip(&suppressed)
        .filter(|((server, metric), &sup)| {
            sup && metric_of(metric).is_some_and(|m| {
                agg.servers
                    .iter()
                    .find(|s| &s.server == server)
                    .and_then(|s| s.value(m))
                    .is_some_and(|v| v < 0.8 * thresholds.get(m))
            })
        })
        .map(|(p, _)| p.clone())
        .collect();
    mon.sync(
        open,
        pairs
            .iter()
            .zip(&suppressed)
            .filter(|(_, &s)| s)
            .map(|(p, _)| p.clone()),
    );
    let changed = mon.record(agg.clone(), &thresholds, settings);
    cluster
        .write_alerts(&changed, settings.retention_ms())
        .await?;
    cluster.clear_suppressed(&recovered).await?;
    cluster
        .push_history(
            &agg,
            settings.max_metrics_stored,
            agg.at.saturating_sub(settings.retention_ms()),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor() -> (Monitor, Inner) {
        (Monitor::new(Thresholds::default()), Inner::default())
    }

    #[test]
    fn a_figure_hovering_at_the_threshold_raises_one_alert() {
        let (m, mut inner) = monitor();
        for i in 0..40 {
            let v = if i % 2 == 0 { 91.0 } else { 89.0 };
            m.evaluate(&mut inner, "s1", Metric::ConnectionUtilization, v, 90.0, i);
        }
        assert_eq!(inner.alerts.len(), 1);
        assert_eq!(inner.alerts[0].status, "open");
        // recovery resolves it, once
        m.evaluate(
            &mut inner,
            "s1",
            Metric::ConnectionUtilization,
            50.0,
            90.0,
            50,
        );
        assert_eq!(inner.alerts[0].status, "resolved");
        assert_eq!(inner.alerts[0].resolved_by.as_deref(), Some("auto"));
    }

    #[test]
    fn severities_escalate_and_long_overruns_turn_critical() {
        let (m, mut inner) = monitor();
        m.evaluate(&mut inner, "s1", Metric::ErrorRate, 4.6, 5.0, 1);
        assert_eq!(inner.alerts[0].severity, Severity::Warning);
        m.evaluate(&mut inner, "s1", Metric::ErrorRate, 6.0, 5.0, 2);
        assert_eq!(inner.alerts[0].severity, Severity::Error);
        for i in 0..6 {
            m.evaluate(&mut inner, "s1", Metric::ErrorRate, 6.0, 5.0, 3 + i);
        }
        assert_eq!(inner.alerts[0].severity, Severity::Critical);
        m.evaluate(&mut inner, "s2", Metric::ResponseTime, 1600.0, 1000.0, 9);
        assert_eq!(inner.alerts[1].severity, Severity::Critical);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let mut d = vec![0u64; LATENCY_BUCKETS.len() + 1];
        d[3] = 100; // (5 ms, 10 ms]
        let p95 = quantile(&d, 0.95).unwrap();
        assert!((9.0..=10.0).contains(&p95), "{p95}");
        assert!(quantile(&[0, 0], 0.5).is_none());
    }

    #[test]
    fn thresholds_are_checked() {
        let mut t = Thresholds::default();
        assert!(t.check().is_ok());
        t.cpu_usage = 120.0;
        assert_eq!(t.check().unwrap_err().0, "cpuUsage");
        t.cpu_usage = 80.0;
        t.response_time = 0.0;
        assert_eq!(t.check().unwrap_err().0, "responseTime");
    }
}
