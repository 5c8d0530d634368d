//! The admin API's writes: checked field by field (400 naming the field),
//! then applied live. They last until the next reload from the file, which
//! is the source of truth (docs/admin-api.md).

// Helpers return `Err(response)` to end a handler early with that answer.
#![allow(clippy::result_large_err)]

use super::{error, json_response, Resp};
use crate::app::Shared;
use crate::config::{Pool, StrategyKind};
use crate::monitor::Thresholds;
use http::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn bad(field: &str, message: &str) -> Resp {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({ "error": format!("{field}: {message}"), "field": field, "status": 400 }),
    )
}

fn count(v: &Value, field: &str, max: u64) -> Result<Option<u64>, Resp> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(bad(field, &format!("must be an integer from 1 to {max}"))),
        },
    }
}

/// `PUT /api/scaling/loadbalancer/config`: `strategy`,
/// `maxConnectionsPerServer`, `maxMatchesPerServer`,
/// `healthCheckInterval` (ms), for one `pool` or all of them.
pub async fn put_lb_config(shared: &Arc<Shared>, body: Value) -> Resp {
    let Some(obj) = body.as_object() else {
        return bad("body", "must be a JSON object");
    };
    const FIELDS: [&str; 5] = [
        "pool",
        "strategy",
        "maxConnectionsPerServer",
        "maxMatchesPerServer",
        "healthCheckInterval",
    ];
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return bad(
            k,
            &format!("unknown field; expected one of {}", FIELDS.join(", ")),
        );
    }
    if obj.keys().all(|k| k == "pool") {
        return bad("body", "nothing to change");
    }
    let strategy = match obj.get("strategy") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match StrategyKind::parse(s) {
            Some(k) => Some(k),
            None => {
                return bad(
                    "strategy",
                    &format!("{s:?}: expected one of {}", StrategyKind::NAMES),
                )
            }
        },
        Some(_) => return bad("strategy", "must be a string"),
    };
    let (max_c, max_m, interval) = match (
        count(&body, "maxConnectionsPerServer", 10_000_000),
        count(&body, "maxMatchesPerServer", 10_000_000),
        count(&body, "healthCheckInterval", 3_600_000),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
    };
    let current = shared.runtime.load().config.clone();
    let pool = match obj.get("pool") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if current.pools.iter().any(|x| &x.name == p) => Some(p.clone()),
        Some(Value::String(p)) => return bad("pool", &format!("{p:?} is not a pool")),
        Some(_) => return bad("pool", "must be a string"),
    };
    if interval.is_some()
        && current
            .pools
            .iter()
            .filter(|p| pool.as_ref().is_none_or(|n| &p.name == n))
            .any(|p| p.health_check.is_none())
    {
        return bad(
            "healthCheckInterval",
            "a pool without health_check has no interval to change",
        );
    }
    let mut config = (*current).clone();
    config.pools = current
        .pools
        .iter()
        .map(|p| {
            if pool.as_ref().is_some_and(|n| &p.name != n) {
                return p.clone();
            }
            let mut np: Pool = (**p).clone();
            if let Some(s) = strategy {
                np.strategy = s;
            }
            if let Some(n) = max_c {
                np.max_connections_per_server = n;
            }
            if let Some(n) = max_m {
                np.max_matches_per_server = n;
            }
            if let (Some(ms), Some(hc)) = (interval, np.health_check.as_mut()) {
                hc.interval = Duration::from_millis(ms);
                hc.timeout = hc.timeout.min(hc.interval);
            }
            Arc::new(np)
        })
        .collect();
    match shared
        .reload_with(config, crate::reload::ADMIN_CONFIG)
        .await
    {
        Ok(generation) => json_response(
            StatusCode::OK,
            json!({ "applied": true, "generation": generation, "config": super::views::lb_config(shared) }),
        ),
        Err(reason) => error(StatusCode::UNPROCESSABLE_ENTITY, &reason),
    }
}

/// `PUT /api/scaling/performance/thresholds`: any of the six figures; with
/// Redis they apply to the whole cluster.
pub async fn put_thresholds(shared: &Shared, body: Value) -> Resp {
    let Some(obj) = body.as_object() else {
        return bad("body", "must be a JSON object");
    };
    let current = super::views::thresholds(shared).await;
    let mut merged = serde_json::to_value(current).unwrap_or(json!({}));
    for (k, v) in obj {
        let Some(slot) = merged.get_mut(k) else {
            return bad(
                k,
                "unknown threshold; expected cpuUsage, memoryUsage, responseTime, errorRate, connectionUtilization or matchUtilization",
            );
        };
        if !v.is_number() {
            return bad(k, "must be a number");
        }
        *slot = v.clone();
    }
    let t: Thresholds = match serde_json::from_value(merged) {
        Ok(t) => t,
        Err(e) => return bad("body", &e.to_string()),
    };
    if let Err((field, message)) = t.check() {
        return bad(field, &message);
    }
    shared.monitor.set_thresholds(t.clone());
    if let Some(c) = shared.cluster.as_ref().filter(|c| c.is_up()) {
        if let Err(e) = c.set_thresholds(Some(&t)).await {
            c.note_error(&e);
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("thresholds set on this proxy only; Redis failed: {e}"),
            );
        }
    }
    tracing::info!(thresholds = ?t, "thresholds changed through the admin API");
    json_response(StatusCode::OK, json!({ "thresholds": t }))
}
