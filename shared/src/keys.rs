//! The Redis key schema (documented in `docs/redis-schema.md`). One key per
//! server and per match, never one big hash; every per-match key carries the
//! Redis Cluster hash tag `{pool:id}`, so all keys of one match share a slot.

/// Builds every key and channel name under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// STRING: the JSON [`crate::wire::ServerRecord`] of one server, with
    /// the heartbeat TTL. Written by the server's agent.
    pub fn server(&self, id: &str) -> String {
        format!("{}:server:{id}", self.prefix)
    }

    /// SET: ids of the servers registered in one pool (the index a full
    /// reconcile reads). Added by agents; stale members removed by proxies.
    pub fn pool_servers(&self, pool: &str) -> String {
        format!("{}:pool:{pool}:servers", self.prefix)
    }

    /// Pub/sub channel of [`crate::wire::RegistryEvent`]s.
    pub fn registry_channel(&self) -> String {
        format!("{}:registry", self.prefix)
    }

    /// HASH: the owner of one match (`server`, `token`, `previous`,
    /// `claimedAt`, `proxy`), with the match TTL. Written by proxies through
    /// the claim script, removed by the agent when the match ends.
    pub fn match_owner(&self, pool: &str, id: &str) -> String {
        format!("{}:match:{{{pool}:{id}}}:owner", self.prefix)
    }

    /// HASH: a match's state (`version`, `state` JSON, `server` that wrote
    /// it, `updatedAt`, `ended`). Written by agents through the write script.
    pub fn match_state(&self, pool: &str, id: &str) -> String {
        format!("{}:match:{{{pool}:{id}}}:state", self.prefix)
    }

    /// LIST: a match's performance reports (JSON, newest first), trimmed to
    /// `MAX_METRICS_STORED` and expiring after `METRICS_RETENTION_HOURS`.
    pub fn match_performance(&self, pool: &str, id: &str) -> String {
        format!("{}:match:{{{pool}:{id}}}:perf", self.prefix)
    }

    /// STRING: one proxy's latest per-server sample (JSON), with a TTL of
    /// three monitoring intervals. Written by that proxy.
    pub fn perf_sample(&self, proxy: &str) -> String {
        format!("{}:perf:sample:{proxy}", self.prefix)
    }

    /// ZSET: proxies that published a sample, by unix ms.
    pub fn perf_proxies(&self) -> String {
        format!("{}:perf:proxies", self.prefix)
    }

    /// STRING: the proxy that aggregates samples and evaluates alerts, with
    /// a TTL of three monitoring intervals (a lease).
    pub fn perf_leader(&self) -> String {
        format!("{}:perf:leader", self.prefix)
    }

    /// LIST: cluster-wide snapshots (JSON), newest first, trimmed to
    /// `MAX_METRICS_STORED` and `METRICS_RETENTION_HOURS`. Written by the leader.
    pub fn perf_history(&self) -> String {
        format!("{}:perf:history", self.prefix)
    }

    /// STRING: thresholds set through the admin API (JSON), until a reload.
    pub fn perf_thresholds(&self) -> String {
        format!("{}:perf:thresholds", self.prefix)
    }

    /// STRING: one alert (JSON). Resolved alerts expire with the retention.
    pub fn alert(&self, id: &str) -> String {
        format!("{}:alert:{id}", self.prefix)
    }

    /// ZSET: alert ids by last update.
    pub fn alerts(&self) -> String {
        format!("{}:alerts", self.prefix)
    }

    /// STRING: the id of the open alert of a server and metric.
    pub fn alert_open(&self, server: &str, metric: &str) -> String {
        format!("{}:alert:open:{server}:{metric}", self.prefix)
    }

    /// STRING: set when an alert was resolved by hand while its figure was
    /// still high: no new alert until the figure recovers.
    pub fn alert_suppressed(&self, server: &str, metric: &str) -> String {
        format!("{}:alert:suppressed:{server}:{metric}", self.prefix)
    }

    /// STREAM: every change of a match's state (`kind`, `version`, `state`,
    /// `server`), trimmed to the agents' `events_max_len`.
    pub fn match_events(&self, pool: &str, id: &str) -> String {
        format!("{}:match:{{{pool}:{id}}}:events", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_match_keys_share_a_hash_tag() {
        let k = Keys::new("kp5");
        assert_eq!(k.server("s1"), "kp5:server:s1");
        assert_eq!(
            k.match_owner("matches", "42"),
            "kp5:match:{matches:42}:owner"
        );
        assert_eq!(k.pool_servers("matches"), "kp5:pool:matches:servers");
        assert_eq!(
            k.match_state("matches", "42"),
            "kp5:match:{matches:42}:state"
        );
        assert_eq!(
            k.match_events("matches", "42"),
            "kp5:match:{matches:42}:events"
        );
    }
}
