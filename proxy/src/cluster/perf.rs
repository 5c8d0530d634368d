//! Performance monitoring across proxies: every proxy publishes its latest
//! per-server sample; one proxy at a time (a lease in Redis) aggregates
//! them, evaluates the thresholds, keeps the cluster-wide history and
//! writes alerts, so an alert exists once for the cluster and any proxy
//! lists and resolves it.

use super::Cluster;
use crate::monitor::{Alert, Snapshot, Thresholds};
use std::collections::BTreeMap;

const LEAD: &str = r#"
-- KEYS: leader key. ARGV: proxy id, ttl ms
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

const PUSH_HISTORY: &str = r#"
-- KEYS: history list. ARGV: snapshot JSON, max entries, cutoff unix ms
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local cutoff = tonumber(ARGV[3])
for _ = 1, 1000 do
  local last = redis.call('LINDEX', KEYS[1], -1)
  if not last then break end
  local ok, snap = pcall(cjson.decode, last)
  if ok and snap.at and snap.at >= cutoff then break end
  redis.call('RPOP', KEYS[1])
end
return redis.call('LLEN', KEYS[1])
"#;

const RESOLVE: &str = r#"
-- KEYS: alert key, alerts zset. ARGV: now ms, prefix
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local a = cjson.decode(raw)
if a.status == 'open' then
  a.status = 'resolved'
  a.resolvedAt = tonumber(ARGV[1])
  a.resolvedBy = 'api'
  a.updatedAt = tonumber(ARGV[1])
  raw = cjson.encode(a)
  redis.call('SET', KEYS[1], raw)
  redis.call('ZADD', KEYS[2], ARGV[1], a.id)
  redis.call('DEL', ARGV[2] .. ':alert:open:' .. a.server .. ':' .. a.metric)
  redis.call('SET', ARGV[2] .. ':alert:suppressed:' .. a.server .. ':' .. a.metric, '1')
end
return raw
"#;

/// Alerts listed at most.
const LIST: isize = 1000;

impl Cluster {
    /// Publishes this proxy's latest sample.
    pub async fn publish_sample(&self, snap: &Snapshot, ttl_ms: u64) -> redis::RedisResult<()> {
        let json = serde_json::to_string(snap).unwrap_or_default();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.perf_sample(&self.instance))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.perf_proxies())
            .arg(snap.at)
            .arg(&self.instance)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.keys.perf_proxies())
            .arg("-inf")
            .arg(snap.at.saturating_sub(ttl_ms))
            .ignore();
        pipe.query_async(&mut self.conn()).await
    }

    /// Takes or keeps the monitoring lease; true while this proxy holds it.
    pub async fn lead(&self, ttl_ms: u64) -> redis::RedisResult<bool> {
        let r: i64 = redis::Script::new(LEAD)
            .key(self.keys.perf_leader())
            .arg(&self.instance)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(r == 1)
    }

    /// The latest sample of every proxy heard from since `since` (unix ms).
    pub async fn peer_samples(&self, since: u64) -> redis::RedisResult<Vec<Snapshot>> {
        let proxies: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.perf_proxies())
            .arg(since)
            .arg("+inf")
            .query_async(&mut self.conn())
            .await?;
        if proxies.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = proxies.iter().map(|p| self.keys.perf_sample(p)).collect();
        self.mget_json(&keys).await
    }

    /// The JSON values of `keys` that exist and parse.
    async fn mget_json<T: serde::de::DeserializeOwned>(
        &self,
        keys: &[String],
    ) -> redis::RedisResult<Vec<T>> {
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn())
            .await?;
        Ok(raw
            .into_iter()
            .flatten()
            .filter_map(|s| serde_json::from_str(&s).ok())
            .collect())
    }

    pub async fn push_history(
        &self,
        snap: &Snapshot,
        max: usize,
        cutoff: u64,
    ) -> redis::RedisResult<u64> {
        redis::Script::new(PUSH_HISTORY)
            .key(self.keys.perf_history())
            .arg(serde_json::to_string(snap).unwrap_or_default())
            .arg(max.max(1))
            .arg(cutoff)
            .invoke_async(&mut self.conn())
            .await
    }

    /// Cluster-wide snapshots since `since`, oldest first.
    pub async fn history(&self, since: u64) -> redis::RedisResult<Vec<Snapshot>> {
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(self.keys.perf_history())
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await?;
        let mut v: Vec<Snapshot> = raw
            .iter()
            .filter_map(|s| serde_json::from_str::<Snapshot>(s).ok())
            .filter(|s| s.at >= since)
            .collect();
        v.reverse();
        Ok(v)
    }

    pub async fn history_len(&self) -> redis::RedisResult<u64> {
        redis::cmd("LLEN")
            .arg(self.keys.perf_history())
            .query_async(&mut self.conn())
            .await
    }

    /// Thresholds set through the admin API of any proxy, if any.
    pub async fn thresholds(&self) -> redis::RedisResult<Option<Thresholds>> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.keys.perf_thresholds())
            .query_async(&mut self.conn())
            .await?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Sets (or, with `None`, clears) the cluster's thresholds.
    pub async fn set_thresholds(&self, t: Option<&Thresholds>) -> redis::RedisResult<()> {
        let mut c = self.conn();
        match t {
            Some(t) => {
                redis::cmd("SET")
                    .arg(self.keys.perf_thresholds())
                    .arg(serde_json::to_string(t).unwrap_or_default())
                    .query_async(&mut c)
                    .await
            }
            None => {
                redis::cmd("DEL")
                    .arg(self.keys.perf_thresholds())
                    .query_async(&mut c)
                    .await
            }
        }
    }

    /// Stores alerts the leader raised, changed or resolved.
    pub async fn write_alerts(
        &self,
        changed: &[Alert],
        retention_ms: u64,
    ) -> redis::RedisResult<()> {
        if changed.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for a in changed {
            let json = serde_json::to_string(a).unwrap_or_default();
            let open = self.keys.alert_open(&a.server, &a.metric);
            pipe.cmd("ZADD")
                .arg(self.keys.alerts())
                .arg(a.updated_at)
                .arg(&a.id)
                .ignore();
            if a.status == "open" {
                pipe.cmd("SET")
                    .arg(self.keys.alert(&a.id))
                    .arg(json)
                    .ignore()
                    .cmd("SET")
                    .arg(open)
                    .arg(&a.id)
                    .ignore();
            } else {
                pipe.cmd("SET")
                    .arg(self.keys.alert(&a.id))
                    .arg(json)
                    .arg("PX")
                    .arg(retention_ms.max(1))
                    .ignore()
                    .cmd("DEL")
                    .arg(open)
                    .ignore();
            }
        }
        // keep the index bounded; the alerts behind it expire by themselves
        pipe.cmd("ZREMRANGEBYRANK")
            .arg(self.keys.alerts())
            .arg(0)
            .arg(-(LIST + 1))
            .ignore();
        pipe.query_async(&mut self.conn()).await
    }

    /// Every alert in the index (open and recently resolved), newest first.
    pub async fn alerts(&self) -> redis::RedisResult<Vec<Alert>> {
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.keys.alerts())
            .arg(0)
            .arg(LIST - 1)
            .query_async(&mut self.conn())
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|i| self.keys.alert(i)).collect();
        self.mget_json(&keys).await
    }

    /// Resolves an alert through the API; `None` if unknown.
    pub async fn resolve_alert(&self, id: &str, now: u64) -> redis::RedisResult<Option<Alert>> {
        let raw: Option<String> = redis::Script::new(RESOLVE)
            .key(self.keys.alert(id))
            .key(self.keys.alerts())
            .arg(now)
            .arg(self.keys.prefix())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Which (server, metric) pairs are suppressed (resolved by hand while high).
    pub async fn suppressed(&self, pairs: &[(String, String)]) -> redis::RedisResult<Vec<bool>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = pairs
            .iter()
            .map(|(s, m)| self.keys.alert_suppressed(s, m))
            .collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await?;
        Ok(raw.into_iter().map(|v| v.is_some()).collect())
    }

    pub async fn clear_suppressed(&self, pairs: &[(String, String)]) -> redis::RedisResult<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = pairs
            .iter()
            .map(|(s, m)| self.keys.alert_suppressed(s, m))
            .collect();
        redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await
    }
}

/// Merges the proxies' samples of one interval into one cluster-wide
/// snapshot: request counts add up, response time and error rate are
/// weighted by requests, cluster-wide figures (utilization, CPU, memory)
/// are the highest any proxy saw.
pub fn aggregate(samples: &[Snapshot], at: u64, interval_ms: u64) -> Snapshot {
    use crate::monitor::ServerSample;
    let mut by: BTreeMap<String, Vec<&ServerSample>> = BTreeMap::new();
    for snap in samples {
        for s in &snap.servers {
            by.entry(s.server.clone()).or_default().push(s);
        }
    }
    let servers = by
        .into_iter()
        .map(|(id, list)| {
            let requests: u64 = list.iter().map(|s| s.requests).sum();
            let weighted = |f: fn(&ServerSample) -> Option<f64>| {
                let (sum, n) = list.iter().fold((0.0, 0u64), |(sum, n), s| match f(s) {
                    Some(v) if s.requests > 0 => (sum + v * s.requests as f64, n + s.requests),
                    _ => (sum, n),
                });
                (n > 0).then(|| (sum / n as f64 * 10.0).round() / 10.0)
            };
            let max = |f: fn(&ServerSample) -> Option<f64>| {
                list.iter().filter_map(|s| f(s)).reduce(f64::max)
            };
            ServerSample {
                server: id,
                pool: list[0].pool.clone(),
                requests,
                requests_per_second: list.iter().map(|s| s.requests_per_second).sum(),
                response_time: weighted(|s| s.response_time),
                response_time_p50: max(|s| s.response_time_p50),
                response_time_p95: max(|s| s.response_time_p95),
                response_time_p99: max(|s| s.response_time_p99),
                error_rate: weighted(|s| s.error_rate),
                connections: list.iter().map(|s| s.connections).max().unwrap_or(0),
                connection_utilization: max(|s| Some(s.connection_utilization)).unwrap_or(0.0),
                matches: list.iter().map(|s| s.matches).max().unwrap_or(0),
                match_utilization: max(|s| Some(s.match_utilization)).unwrap_or(0.0),
                websockets: list.iter().map(|s| s.websockets).sum(),
                websocket_messages_per_second: list
                    .iter()
                    .map(|s| s.websocket_messages_per_second)
                    .sum(),
                cpu_usage: max(|s| s.cpu_usage),
                memory_usage: max(|s| s.memory_usage),
            }
        })
        .collect();
    Snapshot {
        at,
        interval_ms,
        servers,
    }
}
