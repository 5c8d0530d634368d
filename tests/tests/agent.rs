//! The agent's local API against a real Redis: load pushes land in the
//! server's record, bad input is refused with the field named, and the
//! status and metrics endpoints tell what the agent reports.

use bytes::Bytes;
use http_body_util::Full;
use kp5_shared::MapEnv;
use kp5_tests::cluster::RedisServer;
use kp5_tests::support::*;
use std::time::Duration;

async fn send(c: &HttpClient, method: &str, url: &str, body: &str) -> Got {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    request(c, req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_pushes_drain_status_and_bad_input() {
    let redis = RedisServer::start();
    let cfg = kp5_agent::Config::from_toml(
        &format!(
            r#"[agent]
server_id = "push-1"
pool = "p"
advertise = "127.0.0.1:3999"
listen = "127.0.0.1:0"
max_connections = 500
heartbeat_interval_ms = 200
heartbeat_ttl_ms = 1000
[redis]
url = "{}"
key_prefix = "t"
"#,
            redis.url()
        ),
        &MapEnv::new(),
    )
    .unwrap();
    let agent = kp5_agent::start(cfg).await.unwrap();
    let base = format!("http://{}", agent.addr);
    let hc = client();

    let got = send(
        &hc,
        "PUT",
        &format!("{base}/v1/load"),
        r#"{"connections": 42, "matches": 3}"#,
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    // the push is published at once: the record in Redis carries it
    let r = &redis;
    wait_until(
        Duration::from_secs(2),
        "record with the pushed load",
        || async move {
            let rec = r.command(&["GET", "t:server:push-1"]).unwrap_or_default();
            rec.contains(r#""connections":42"#) && rec.contains(r#""matches":3"#)
        },
    )
    .await;
    let rec = redis.command(&["GET", "t:server:push-1"]).unwrap();
    for field in [
        r#""pool":"p""#,
        r#""address":"127.0.0.1:3999""#,
        r#""maxConnections":500"#,
        r#""version":"#,
        r#""startedAt":"#,
    ] {
        assert!(rec.contains(field), "{field} in {rec}");
    }
    let ttl = redis.command(&["PTTL", "t:server:push-1"]).unwrap();
    let ms: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(
        (1..=1000).contains(&ms),
        "record carries the heartbeat TTL: {ttl}"
    );
    assert!(redis
        .command(&["SISMEMBER", "t:pool:p:servers", "push-1"])
        .unwrap()
        .starts_with(":1"));

    // bad input: 400 naming the field, nothing changes
    for (body, field) in [
        (r#"{"connections": -1}"#, "connections"),
        (r#"{"connections": 1, "matches": "x"}"#, "matches"),
        (r#"{}"#, "connections"),
        ("not json", "JSON"),
    ] {
        let got = send(&hc, "PUT", &format!("{base}/v1/load"), body).await;
        assert_eq!(got.status, 400, "{body}");
        assert!(
            got.json()["error"].as_str().unwrap().contains(field),
            "{body}: {:?}",
            got.body
        );
    }
    let big = format!(r#"{{"connections": 1, "pad": "{}"}}"#, "x".repeat(70_000));
    assert_eq!(
        send(&hc, "PUT", &format!("{base}/v1/load"), &big)
            .await
            .status,
        413
    );
    assert_eq!(
        send(&hc, "GET", &format!("{base}/v1/nope"), "")
            .await
            .status,
        404
    );
    assert_eq!(
        send(&hc, "GET", &format!("{base}/v1/load"), "")
            .await
            .status,
        405
    );

    // drain, and status and metrics say so
    assert_eq!(
        send(&hc, "POST", &format!("{base}/v1/drain"), "")
            .await
            .status,
        200
    );
    let st = get(&hc, &format!("{base}/v1/status")).await.json();
    assert_eq!(st["server"]["draining"], true);
    assert_eq!(st["server"]["connections"], 42);
    assert_eq!(st["redis"]["connected"], true);
    let m = get(&hc, &format!("{base}/metrics")).await;
    let text = String::from_utf8_lossy(&m.body);
    for line in [
        "kp5_agent_connections 42",
        "kp5_agent_draining 1",
        "kp5_agent_redis_up 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }

    // a clean stop deregisters
    agent.shutdown().await;
    assert!(redis
        .command(&["EXISTS", "t:server:push-1"])
        .unwrap()
        .starts_with(":0"));
    assert!(redis
        .command(&["SISMEMBER", "t:pool:p:servers", "push-1"])
        .unwrap()
        .starts_with(":0"));
}
