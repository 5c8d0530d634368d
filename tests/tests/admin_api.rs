//! The admin API against its OpenAPI document (docs/openapi.json), on a
//! running cluster: every documented operation answers 200 with the token
//! and a body that matches its schema, 401 without it, 400 naming the field
//! and 404 for unknown ids where documented; the router and the document
//! list the same operations; /metrics parses as Prometheus text.

use bytes::Bytes;
use http_body_util::Full;
use kp5_shared::MapEnv;
use kp5_tests::cluster::*;
use kp5_tests::schema::validate;
use kp5_tests::support::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

async fn call(c: &HttpClient, method: &str, url: &str, token: bool, body: Option<&Value>) -> Got {
    let mut b = http::Request::builder().method(method).uri(url);
    if token {
        b = b.header("authorization", "Bearer test-token");
    }
    let body = body.map(|v| v.to_string()).unwrap_or_default();
    request(c, b.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

fn schema_of<'a>(op: &'a Value, status: &str) -> &'a Value {
    &op["responses"][status]["content"]["application/json"]["schema"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_endpoint_answers_as_documented() {
    let c = cluster("least_connections", "\n[monitoring]\ninterval_ms = 100\n").await;
    let hc = client();
    // a proxy started from a file, so that /reload has something to re-read
    let dir = TempDir::new("admin");
    let path = dir.path().join("proxy.toml");
    let toml = cluster_config(
        &c.redis.url(),
        "least_connections",
        "\n[monitoring]\ninterval_ms = 100\n",
    );
    std::fs::write(&path, &toml).unwrap();
    let cfg = kp5_proxy::Config::load(&path, &MapEnv::new()).unwrap();
    let p = kp5_proxy::start_with(
        cfg,
        kp5_proxy::Options {
            config_path: Some(path.clone()),
            env: Arc::new(MapEnv::new()),
            watch: false,
        },
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(5), "proxy sees the servers", || async {
        available(&hc, &p).await.len() == 3
    })
    .await;

    // something to report on: a match with a connection, traffic, a
    // per-match performance report, and an alert (a threshold every
    // request exceeds)
    let (_w, owner) = ws_via(&p, "/matches/m1/ws").await;
    for _ in 0..20 {
        assert_eq!(
            get(&hc, &format!("http://{}/matches/m1/x", p.listen[0]))
                .await
                .status,
            200
        );
    }
    let agent = c.agents.iter().find(|a| a.id == owner).unwrap();
    let perf = call(
        &hc,
        "POST",
        &format!("http://{}/v1/matches/m1/performance", agent.api),
        false,
        Some(&json!({ "participantCount": 22, "eventsPerSecond": 12.5, "averageLatency": 40 })),
    )
    .await;
    assert_eq!(perf.status, 200, "{:?}", perf.body);
    let base = format!("http://{}/api/scaling", p.admin);
    let t = call(
        &hc,
        "PUT",
        &format!("{base}/performance/thresholds"),
        true,
        Some(&json!({ "responseTime": 0.001 })),
    )
    .await;
    assert_eq!(t.status, 200, "{:?}", t.body);
    let listen = p.listen[0];
    wait_until(Duration::from_secs(5), "an alert is raised", || {
        let hc = hc.clone();
        let base = base.clone();
        async move {
            for _ in 0..5 {
                get(&hc, &format!("http://{listen}/matches/m1/x")).await;
            }
            let a = call(
                &hc,
                "GET",
                &format!("{base}/performance/alerts"),
                true,
                None,
            )
            .await
            .json();
            a["count"].as_u64() > Some(0)
        }
    })
    .await;
    let alerts = call(
        &hc,
        "GET",
        &format!("{base}/performance/alerts"),
        true,
        None,
    )
    .await
    .json();
    let alert_id = alerts["alerts"][0]["id"].as_str().unwrap().to_owned();

    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();

    // the router and the document list the same operations
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().unwrap().keys().map(move |m| {
                let pattern = path
                    .trim_start_matches('/')
                    .split('/')
                    .map(
                        |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                            Some(p) => format!(":{p}"),
                            None => s.to_owned(),
                        },
                    )
                    .collect::<Vec<_>>()
                    .join("/");
                (m.to_uppercase(), pattern)
            })
        })
        .collect();
    let routed: BTreeSet<(String, String)> = kp5_proxy::admin::ENDPOINTS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, routed,
        "docs/openapi.json and the router disagree"
    );

    // good and bad inputs per operation
    let good_body = |method: &str, path: &str| -> Option<Value> {
        match (method, path) {
            ("put", "/loadbalancer/config") => {
                Some(json!({ "strategy": "least_connections", "maxConnectionsPerServer": 1000 }))
            }
            ("put", "/performance/thresholds") => Some(json!({ "responseTime": 0.001 })),
            _ => None,
        }
    };
    let bad_request = |method: &str, path: &str| -> Option<(String, Option<Value>, &'static str)> {
        match (method, path) {
            ("put", "/loadbalancer/config") => Some((
                String::new(),
                Some(json!({ "strategy": "fastest" })),
                "strategy",
            )),
            ("put", "/performance/thresholds") => {
                Some((String::new(), Some(json!({ "cpuUsage": 150 })), "cpuUsage"))
            }
            ("get", "/performance/metrics") => Some(("?hours=soon".into(), None, "hours")),
            ("get", "/performance/alerts") => Some(("?status=maybe".into(), None, "status")),
            _ => None,
        }
    };
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let concrete = path
                .replace("{matchId}", "m1")
                .replace("{alertId}", &alert_id);
            let url = format!("{base}{concrete}");
            let m = method.to_uppercase();
            let what = format!("{m} {path}");

            let got = call(&hc, &m, &url, true, good_body(method, path).as_ref()).await;
            assert_eq!(got.status, 200, "{what}: {:?}", got.body);
            let body = got.json();
            if let Err(e) = validate(&doc, schema_of(op, "200"), &body, "$") {
                panic!("{what}: body does not match the document: {e}\n{body:#}");
            }

            let denied = call(&hc, &m, &url, false, None).await;
            assert_eq!(denied.status, 401, "{what} without the token");
            validate(&doc, schema_of(op, "401"), &denied.json(), "$").unwrap();

            if op["responses"].get("404").is_some() {
                let unknown = path
                    .replace("{matchId}", "no-such-match")
                    .replace("{alertId}", "no-such-alert");
                let got = call(&hc, &m, &format!("{base}{unknown}"), true, None).await;
                assert_eq!(got.status, 404, "{what} with an unknown id: {:?}", got.body);
                validate(&doc, schema_of(op, "404"), &got.json(), "$").unwrap();
            }
            if op["responses"].get("400").is_some() {
                let (query, body, field) = bad_request(method, path)
                    .unwrap_or_else(|| panic!("{what}: no bad input defined"));
                let got = call(&hc, &m, &format!("{url}{query}"), true, body.as_ref()).await;
                assert_eq!(got.status, 400, "{what} with bad input: {:?}", got.body);
                let e = got.json();
                validate(&doc, schema_of(op, "400"), &e, "$").unwrap();
                assert!(e["error"].as_str().unwrap().contains(field), "{what}: {e}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 23);

    // changes apply live and last until the next reload from the file
    let put = call(
        &hc,
        "PUT",
        &format!("{base}/loadbalancer/config"),
        true,
        Some(&json!({ "pool": "p", "maxConnectionsPerServer": 777, "strategy": "round_robin" })),
    )
    .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let lb = call(
        &hc,
        "GET",
        &format!("{base}/loadbalancer/config"),
        true,
        None,
    )
    .await
    .json();
    assert_eq!(
        (
            lb["pools"][0]["maxConnectionsPerServer"].as_u64(),
            lb["pools"][0]["strategy"].as_str()
        ),
        (Some(777), Some("round_robin"))
    );
    assert_eq!(lb["source"], "admin-config");
    let st = call(
        &hc,
        "GET",
        &format!("{base}/distributed/servers"),
        true,
        None,
    )
    .await
    .json();
    assert!(st["servers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["maxConnections"] == 777));
    call(
        &hc,
        "PUT",
        &format!("{base}/performance/thresholds"),
        true,
        Some(&json!({ "cpuUsage": 70 })),
    )
    .await;
    assert_eq!(
        call(&hc, "POST", &format!("{base}/reload"), true, None)
            .await
            .status,
        200
    );
    let lb = call(
        &hc,
        "GET",
        &format!("{base}/loadbalancer/config"),
        true,
        None,
    )
    .await
    .json();
    assert_eq!(
        (
            lb["pools"][0]["maxConnectionsPerServer"].as_u64(),
            lb["source"].as_str()
        ),
        (Some(1000), Some("api"))
    );
    let th = call(
        &hc,
        "GET",
        &format!("{base}/performance/thresholds"),
        true,
        None,
    )
    .await
    .json();
    assert_eq!(
        th["thresholds"]["cpuUsage"], 80.0,
        "the file's thresholds are back"
    );
    let bad_pool = call(
        &hc,
        "PUT",
        &format!("{base}/loadbalancer/config"),
        true,
        Some(&json!({ "pool": "nope", "strategy": "weighted" })),
    )
    .await;
    assert_eq!(
        (bad_pool.status, bad_pool.json()["field"].as_str()),
        (400, Some("pool"))
    );
    let unknown = call(
        &hc,
        "PUT",
        &format!("{base}/loadbalancer/config"),
        true,
        Some(&json!({ "maxConections": 5 })),
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.json()["field"].as_str()),
        (400, Some("maxConections"))
    );
    // resolving an alert by the API is visible in the list
    let a = call(
        &hc,
        "GET",
        &format!("{base}/performance/alerts?status=resolved"),
        true,
        None,
    )
    .await
    .json();
    assert!(a["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == alert_id.as_str() && x["resolvedBy"] == "api"));
    // per-match performance as reported
    let m = call(
        &hc,
        "GET",
        &format!("{base}/performance/matches/m1"),
        true,
        None,
    )
    .await
    .json();
    assert_eq!(m["latest"]["participantCount"], 22);
    // a bad bearer token is refused like a missing one
    let wrong = request(
        &hc,
        http::Request::get(format!("{base}/health"))
            .header("authorization", "Bearer test-tokem")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    // malformed bodies: 400, and too large ones 413
    let r = request(
        &hc,
        http::Request::put(format!("{base}/performance/thresholds"))
            .header("authorization", "Bearer test-token")
            .body(Full::new(Bytes::from_static(b"{not json")))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    let big = json!({ "strategy": "x".repeat(70_000) });
    assert_eq!(
        call(
            &hc,
            "PUT",
            &format!("{base}/loadbalancer/config"),
            true,
            Some(&big)
        )
        .await
        .status,
        413
    );
    assert_eq!(
        call(&hc, "DELETE", &format!("{base}/health"), true, None)
            .await
            .status,
        405
    );
    assert_eq!(
        call(&hc, "GET", &format!("{base}/nope"), true, None)
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text() {
    let b = backends(2).await;
    let p = start_proxy(&config(&servers_of(&b), "", "")).await;
    let hc = client();
    for _ in 0..10 {
        assert_eq!(
            get(&hc, &format!("http://{}/", p.listen[0])).await.status,
            200
        );
    }
    let (mut open_ws, _) = ws(&format!("ws://{}/ws", p.listen[0])).await;
    for _ in 0..3 {
        echo_ok(&mut open_ws).await;
    }
    // the tunnel counts a message just after it passes it on, so the last
    // echo can reach the client a moment before it is counted: scrape
    // until it is (within a deadline)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (scrape, relayed) = loop {
        let got = get(&hc, &format!("http://{}/metrics", p.admin)).await;
        assert_eq!(got.status, 200);
        let text = String::from_utf8(got.body.to_vec()).unwrap();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
        let relayed: f64 = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "kp5_upstream_websocket_messages_total")
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum();
        if relayed >= 6.0 || std::time::Instant::now() > deadline {
            break (scrape, relayed);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let names: BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for want in [
        "kp5_requests_total",
        "kp5_websockets_active",
        "kp5_upstream_connections",
        "kp5_upstream_response_seconds",
        "kp5_config_reloads_total",
    ] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
    let ok_2xx = scrape
        .samples
        .iter()
        .find(|s| s.metric == "kp5_requests_total" && s.labels.get("code") == Some("2xx"))
        .expect("2xx requests");
    match ok_2xx.value {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => {
            assert!(v >= 10.0)
        }
        ref other => panic!("unexpected {other:?}"),
    }
    // messages of a tunnel still open are counted as they pass
    assert!(relayed >= 6.0, "3 echoes = 6 messages, got {relayed}");
    // every sample is documented in docs/metrics.md
    let documented =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
            .unwrap();
    for name in &names {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        let base = base.trim_end_matches("_total");
        assert!(
            documented.contains(base),
            "{name} is not in docs/metrics.md"
        );
    }
}
