//! Active health checks: one task per server of every pool that has a
//! `health_check`, restarted with each runtime swap. Results go through the
//! server's rise/fall hysteresis.

use crate::app::Shared;
use crate::forward::body::UpstreamBody;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub fn spawn_all(shared: Arc<Shared>, stop: CancellationToken) {
    let rt = shared.runtime.load_full();
    for pool in &rt.pools {
        let Some(hc) = pool.cfg.health_check.clone() else {
            for u in &pool.servers {
                u.state.clear_checks();
            }
            continue;
        };
        let tls = pool
            .cfg
            .backend_tls
            .as_ref()
            .and_then(|_| shared.tls.backend(&pool.name));
        for u in &pool.servers {
            let uri = match http::Uri::builder()
                .scheme(if tls.is_some() { "https" } else { "http" })
                .authority(u.address.clone())
                .path_and_query(hc.path.clone())
                .build()
            {
                Ok(uri) => uri,
                Err(e) => {
                    tracing::error!(server = %u.state.id, error = %e, "cannot build health check URI");
                    continue;
                }
            };
            let state = u.state.clone();
            let host = u.address.to_string();
            let shared = shared.clone();
            let stop = stop.clone();
            let hc = hc.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(hc.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let mut req = http::Request::new(UpstreamBody::empty());
                    *req.uri_mut() = uri.clone();
                    if let Ok(h) = http::HeaderValue::from_str(&host) {
                        req.headers_mut().insert(http::header::HOST, h);
                    }
                    req.headers_mut().insert(
                        http::header::USER_AGENT,
                        http::HeaderValue::from_static("kp5-proxy-health"),
                    );
                    let check = async {
                        let resp = match &tls {
                            Some(b) => b.http.request(req).await?,
                            None => shared.client.request(req).await?,
                        };
                        let ok = resp.status().is_success() || resp.status().is_redirection();
                        // read the body so the connection goes back to the pool
                        http_body_util::BodyExt::collect(resp.into_body()).await?;
                        Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(ok)
                    };
                    let ok = match tokio::time::timeout(hc.timeout, check).await {
                        Ok(Ok(ok)) => ok,
                        Ok(Err(e)) => {
                            tracing::debug!(server = %state.id, error = %e, "health check failed");
                            false
                        }
                        Err(_) => {
                            tracing::debug!(server = %state.id, "health check timed out");
                            false
                        }
                    };
                    state.record_check(
                        ok,
                        hc.healthy_threshold,
                        hc.unhealthy_threshold,
                        shared.clock.now_ms(),
                    );
                }
            });
        }
    }
}
