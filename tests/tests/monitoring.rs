//! Performance monitoring across the cluster (issue 7), driven by real load
//! through real servers: alerts rise and resolve (by themselves and by the
//! API) and are the same through either proxy; history stays within its
//! limits; per-match reports come back with their history; recommendations
//! name the hot server; a figure hovering at its threshold raises one alert.

use bytes::Bytes;
use http_body_util::Full;
use kp5_proxy::ProxyHandle;
use kp5_shared::MapEnv;
use kp5_tests::cluster::*;
use kp5_tests::support::*;
use serde_json::{json, Value};
use std::time::Duration;

const MONITORING: &str = "\n[monitoring]\ninterval_ms = 100\n";

async fn call(c: &HttpClient, method: &str, url: &str, body: Option<Value>) -> Got {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", "Bearer test-token")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    request(c, req)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

fn api(p: &ProxyHandle, path: &str) -> String {
    format!("http://{}/api/scaling{path}", p.admin)
}

async fn alerts(hc: &HttpClient, p: &ProxyHandle) -> Vec<Value> {
    call(hc, "GET", &api(p, "/performance/alerts"), None)
        .await
        .json()["alerts"]
        .as_array()
        .unwrap()
        .clone()
}

fn find<'a>(list: &'a [Value], server: &str, metric: &str, status: &str) -> Vec<&'a Value> {
    list.iter()
        .filter(|a| a["server"] == server && a["metric"] == metric && a["status"] == status)
        .collect()
}

/// Sends `n` requests of match `m` with `tail` as the rest of the path, all
/// at once, through `p`; returns the server that answered.
async fn burst(hc: &HttpClient, p: &ProxyHandle, m: &str, tail: &str, n: usize) -> String {
    let url = format!("http://{}/matches/{m}/{tail}", p.listen[0]);
    let all = futures_util::future::join_all((0..n).map(|_| get(hc, &url))).await;
    all.iter()
        .map(|g| g.server())
        .find(|s| !s.is_empty())
        .expect("a server answered")
}

/// Keeps fast, successful requests of match `m` flowing until `cond` holds.
async fn until_with_traffic<F, Fut>(
    hc: &HttpClient,
    p: &ProxyHandle,
    m: &str,
    what: &str,
    mut cond: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        burst(hc, p, m, "x", 5).await;
        if cond().await {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_failing_and_full_servers_raise_alerts_that_resolve() {
    let extra =
        format!("max_connections_per_server = 10\npassive = {{ consecutive_5xx = 0 }}{MONITORING}");
    let c = cluster("least_matches", &extra).await;
    let hc = client();
    let (a, b) = (&c.proxies[0], &c.proxies[1]);

    // a slow server: responseTime, raised through A, seen through B
    let slow = burst(&hc, a, "slow1", "slow/1300", 8).await;
    wait_until(Duration::from_secs(5), "responseTime alert", || async {
        !find(&alerts(&hc, b).await, &slow, "responseTime", "open").is_empty()
    })
    .await;
    let open = alerts(&hc, b).await;
    let alert = find(&open, &slow, "responseTime", "open")[0].clone();
    assert!(alert["value"].as_f64().unwrap() >= 1000.0, "{alert}");
    assert!(["error", "critical"].contains(&alert["severity"].as_str().unwrap()));
    assert_eq!(
        alerts(&hc, a)
            .await
            .iter()
            .filter(|x| x["id"] == alert["id"])
            .count(),
        1,
        "one alert, the same through A"
    );
    // the cause goes away: fast answers resolve it by themselves
    until_with_traffic(&hc, a, "slow1", "responseTime resolved", || async {
        let l = alerts(&hc, b).await;
        find(&l, &slow, "responseTime", "open").is_empty()
            && !find(&l, &slow, "responseTime", "resolved").is_empty()
    })
    .await;
    let l = alerts(&hc, a).await;
    assert_eq!(
        find(&l, &slow, "responseTime", "resolved")[0]["resolvedBy"],
        "auto"
    );

    // a server answering 5xx: errorRate
    let failing = burst(&hc, b, "err1", "status/500", 8).await;
    wait_until(Duration::from_secs(5), "errorRate alert", || async {
        !find(&alerts(&hc, a).await, &failing, "errorRate", "open").is_empty()
    })
    .await;
    until_with_traffic(&hc, b, "err1", "errorRate resolved", || async {
        find(&alerts(&hc, a).await, &failing, "errorRate", "open").is_empty()
    })
    .await;

    // a full server: connectionUtilization
    let mut held = Vec::new();
    let mut full = String::new();
    for _ in 0..10 {
        let (w, s) = ws_via(a, "/matches/full1/ws").await;
        full = s;
        held.push(w);
    }
    wait_until(
        Duration::from_secs(5),
        "connectionUtilization alert",
        || async {
            !find(
                &alerts(&hc, b).await,
                &full,
                "connectionUtilization",
                "open",
            )
            .is_empty()
        },
    )
    .await;
    held.clear();
    wait_until(
        Duration::from_secs(5),
        "connectionUtilization resolved",
        || async {
            find(
                &alerts(&hc, b).await,
                &full,
                "connectionUtilization",
                "open",
            )
            .is_empty()
        },
    )
    .await;

    // resolved once by the API (through B, raised from A's traffic), and
    // not raised again while the figure stays high
    let failing = burst(&hc, a, "err2", "status/503", 8).await;
    wait_until(Duration::from_secs(5), "errorRate alert again", || async {
        !find(&alerts(&hc, a).await, &failing, "errorRate", "open").is_empty()
    })
    .await;
    let id = find(&alerts(&hc, a).await, &failing, "errorRate", "open")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = call(
        &hc,
        "POST",
        &api(b, &format!("/performance/alerts/{id}/resolve")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (
            r.json()["alert"]["status"].as_str(),
            r.json()["alert"]["resolvedBy"].as_str()
        ),
        (Some("resolved"), Some("api"))
    );
    for _ in 0..6 {
        burst(&hc, a, "err2", "status/503", 8).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let l = alerts(&hc, a).await;
    assert!(
        find(&l, &failing, "errorRate", "open").is_empty(),
        "not raised again while still high"
    );
    assert_eq!(
        call(
            &hc,
            "POST",
            &api(a, "/performance/alerts/nope/resolve"),
            None
        )
        .await
        .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_stays_within_retention_and_count() {
    let c = cluster("least_connections", MONITORING).await;
    let hc = client();
    // one more proxy, configured by the seed's environment variables
    let env = MapEnv::new()
        .with("METRICS_RETENTION_HOURS", "0.0003") // about 1 s
        .with("MAX_METRICS_STORED", "5");
    let toml = cluster_config(&c.redis.url(), "least_connections", MONITORING);
    let cfg = kp5_proxy::Config::from_toml(&toml, &env).unwrap();
    assert_eq!(cfg.monitoring.max_metrics_stored, 5);
    // the harness's proxies stop, so this one leads and its limits apply
    for old in c.proxies {
        old.shutdown(Duration::ZERO).await;
    }
    let redis = &c.redis;
    redis
        .command(&["DEL", "kp5:perf:history", "kp5:perf:leader"])
        .unwrap();
    let p = kp5_proxy::start(cfg).await.unwrap();
    let mut seen_full = false;
    for _ in 0..30 {
        get(&hc, &format!("http://{}/", p.listen[0])).await;
        let len: u64 = redis
            .command(&["LLEN", "kp5:perf:history"])
            .unwrap()
            .trim()
            .trim_start_matches(':')
            .parse()
            .unwrap();
        assert!(len <= 5, "history over MAX_METRICS_STORED: {len}");
        seen_full |= len == 5;
        let m = call(&hc, "GET", &api(&p, "/performance/metrics?hours=1"), None)
            .await
            .json();
        assert!(m["count"].as_u64().unwrap() <= 5);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen_full, "the history filled up to its limit");
    let m = call(&hc, "GET", &api(&p, "/performance/metrics?hours=1"), None)
        .await
        .json();
    let snaps = m["snapshots"].as_array().unwrap();
    assert!(!snaps.is_empty());
    let oldest = snaps[0]["at"].as_u64().unwrap();
    let newest = snaps.last().unwrap()["at"].as_u64().unwrap();
    assert!(
        newest - oldest <= 1100,
        "nothing older than the retention: {} ms",
        newest - oldest
    );
    assert!(
        snaps
            .iter()
            .all(|s| s["servers"].as_array().unwrap().len() == 3),
        "aggregated over all servers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn match_reports_and_recommendations() {
    let c = cluster(
        "least_connections",
        &format!("max_connections_per_server = 100{MONITORING}"),
    )
    .await;
    let hc = client();
    let (_w, owner) = ws_via(&c.proxies[0], "/matches/pm/ws").await;
    let agent = c.agents.iter().find(|a| a.id == owner).unwrap();
    for (n, eps) in [(10, 5.0), (12, 7.5), (14, 9.0)] {
        let r = request(
            &hc,
            http::Request::post(format!("http://{}/v1/matches/pm/performance", agent.api))
                .body(Full::new(Bytes::from(
                    json!({ "participantCount": n, "eventsPerSecond": eps, "averageLatency": 30 })
                        .to_string(),
                )))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let bad = request(
        &hc,
        http::Request::post(format!("http://{}/v1/matches/pm/performance", agent.api))
            .body(Full::new(Bytes::from(r#"{"participantCount": 3}"#)))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("eventsPerSecond"));
    for p in &c.proxies {
        let m = call(&hc, "GET", &api(p, "/performance/matches/pm"), None)
            .await
            .json();
        assert_eq!(m["count"], 3);
        assert_eq!(m["latest"]["participantCount"], 14);
        assert_eq!(
            m["history"][2]["participantCount"], 10,
            "newest first, all kept"
        );
        assert_eq!(m["averages"]["participantCount"], 12.0);
    }

    // an imbalanced cluster: s1 full of connections its agent reports
    let mut direct = Vec::new();
    for _ in 0..95 {
        direct.push(ws(&format!("ws://{}/ws", c.servers[0].addr)).await.0);
    }
    let p = &c.proxies[1];
    // s1 turns hot at 90 of its 100 connections, while its agent may
    // still be reporting the rest of the 95: wait for all of them
    wait_until(
        Duration::from_secs(3),
        "recommendations name s1 with all 95 connections",
        || async {
            let r = call(&hc, "GET", &api(p, "/loadbalancer/recommendations"), None)
                .await
                .json();
            r["recommendations"].as_array().unwrap().iter().any(|x| {
                x["type"] == "hot_server"
                    && x["server"] == "s1"
                    && x["figures"]["connections"].as_u64().unwrap_or(0) >= 95
            })
        },
    )
    .await;
    let r = call(&hc, "GET", &api(p, "/loadbalancer/recommendations"), None)
        .await
        .json();
    let list = r["recommendations"].as_array().unwrap();
    let hot = list.iter().find(|x| x["type"] == "hot_server").unwrap();
    assert!(
        hot["figures"]["connections"].as_u64().unwrap() >= 95,
        "{hot}"
    );
    assert!(hot["figures"]["connectionUtilization"].as_f64().unwrap() >= 95.0);
    let imbalance = list
        .iter()
        .find(|x| x["type"] == "imbalance")
        .expect("imbalance named");
    assert_eq!(imbalance["figures"]["hottest"], "s1");
    assert!(imbalance["message"].as_str().unwrap().contains("s1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_figure_hovering_at_its_threshold_raises_one_alert() {
    let c = cluster(
        "least_connections",
        &format!("max_connections_per_server = 40{MONITORING}"),
    )
    .await;
    let hc = client();
    let p = &c.proxies[0];
    // one match pinned to one server, its connections hovering around the
    // 90 % threshold: 34 (85 %) and 38 (95 %) in turn, for 12 samples or more
    let mut held = Vec::new();
    let mut server = String::new();
    for _ in 0..34 {
        let (w, s) = ws_via(p, "/matches/hover/ws").await;
        server = s;
        held.push(w);
    }
    for round in 0..8 {
        if round % 2 == 0 {
            for _ in 0..4 {
                held.push(ws_via(p, "/matches/hover/ws").await.0);
            }
        } else {
            held.truncate(34);
        }
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    let l = alerts(&hc, &c.proxies[1]).await;
    let mine: Vec<_> = l
        .iter()
        .filter(|a| a["server"] == server.as_str() && a["metric"] == "connectionUtilization")
        .collect();
    assert_eq!(mine.len(), 1, "one alert, not many: {mine:#?}");
    assert_eq!(mine[0]["status"], "open");
}
