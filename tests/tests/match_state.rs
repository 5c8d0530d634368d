//! Match state through the agent (issue 4), against a real Redis and two
//! agents: versions and conditional writes, racing writers that lose
//! nothing, an event stream that resumes exactly or says reload, Redis
//! restarts, failover, and ended matches that leave nothing behind.

use bytes::Bytes;
use http_body_util::Full;
use kp5_shared::MapEnv;
use kp5_tests::cluster::*;
use kp5_tests::sse::Sse;
use kp5_tests::support::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// An in-process agent of pool `p` on `redis`.
async fn agent(redis: &RedisServer, id: &str, prefix: &str, extra: &str) -> kp5_agent::AgentHandle {
    let cfg = kp5_agent::Config::from_toml(
        &format!(
            r#"[agent]
server_id = "{id}"
pool = "p"
advertise = "127.0.0.1:1"
listen = "127.0.0.1:0"
heartbeat_interval_ms = 200
heartbeat_ttl_ms = 1000
{extra}
[redis]
url = "{}"
key_prefix = "{prefix}"
timeout_ms = 300
"#,
            redis.url()
        ),
        &MapEnv::new(),
    )
    .unwrap();
    kp5_agent::start(cfg).await.unwrap()
}

async fn call(
    c: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Got {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    request(c, b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

fn state_url(a: &kp5_agent::AgentHandle, m: &str) -> String {
    format!("http://{}/v1/matches/{m}/state", a.addr)
}

fn events_url(a: &kp5_agent::AgentHandle, m: &str) -> String {
    format!("http://{}/v1/matches/{m}/events", a.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_round_trips_with_versions_and_stale_writes_conflict() {
    let redis = RedisServer::start();
    let (a, b) = (
        agent(&redis, "a", "t1", "").await,
        agent(&redis, "b", "t1", "").await,
    );
    let hc = client();
    assert_eq!(
        call(&hc, "GET", &state_url(&a, "m1"), &[], "").await.status,
        404
    );

    let put = call(
        &hc,
        "PUT",
        &state_url(&a, "m1"),
        &[],
        r#"{"score": [0, 0], "phase": "warmup"}"#,
    )
    .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    assert_eq!(
        put.json(),
        json!({ "version": 1, "state": { "score": [0, 0], "phase": "warmup" } })
    );
    assert_eq!(put.headers["etag"], "\"1\"");

    // read through the other agent
    let got = call(&hc, "GET", &state_url(&b, "m1"), &[], "").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["etag"], "\"1\"");
    let v = got.json();
    assert_eq!(
        (
            v["version"].clone(),
            v["state"]["phase"].clone(),
            v["server"].clone()
        ),
        (json!(1), json!("warmup"), json!("a"))
    );

    // PATCH merges top-level fields; null removes one
    let p = call(
        &hc,
        "PATCH",
        &state_url(&b, "m1"),
        &[("if-match", "\"1\"")],
        r#"{"phase": "live", "clock": 12}"#,
    )
    .await;
    assert_eq!(p.status, 200, "{:?}", p.body);
    assert_eq!(
        p.json(),
        json!({ "version": 2, "state": { "score": [0, 0], "phase": "live", "clock": 12 } })
    );
    let p = call(
        &hc,
        "PATCH",
        &state_url(&a, "m1"),
        &[],
        r#"{"clock": null}"#,
    )
    .await;
    assert_eq!(p.json()["version"], 3);
    assert_eq!(
        p.json()["state"],
        json!({ "score": [0, 0], "phase": "live" })
    );

    // a stale If-Match gets 409 with the current version, for PUT and PATCH
    for method in ["PUT", "PATCH"] {
        let stale = call(
            &hc,
            method,
            &state_url(&a, "m1"),
            &[("if-match", "\"2\"")],
            r#"{"x": 1}"#,
        )
        .await;
        assert_eq!(stale.status, 409, "{method}");
        assert_eq!(stale.json()["version"], 3, "{method}");
    }
    assert_eq!(
        call(&hc, "GET", &state_url(&a, "m1"), &[], "").await.json()["version"],
        3
    );

    // bad input is refused, naming what is wrong
    for (body, headers, want) in [
        ("[1, 2]", vec![], "object"),
        ("{oops", vec![], "JSON"),
        ("{}", vec![("if-match", "soon")], "If-Match"),
    ] {
        let r = call(&hc, "PUT", &state_url(&a, "m1"), &headers, body).await;
        assert_eq!(r.status, 400, "{body}");
        assert!(
            r.json()["error"].as_str().unwrap().contains(want),
            "{body}: {:?}",
            r.body
        );
    }
    let too_long = "x".repeat(200);
    assert_eq!(
        call(&hc, "GET", &state_url(&a, &too_long), &[], "")
            .await
            .status,
        400
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_conditional_writes_from_two_agents_lose_nothing() {
    let redis = RedisServer::start();
    let agents = [
        agent(&redis, "a", "t2", "").await,
        agent(&redis, "b", "t2", "").await,
    ];
    let hc = client();
    let put = call(
        &hc,
        "PUT",
        &state_url(&agents[0], "race"),
        &[],
        r#"{"writers": []}"#,
    )
    .await;
    assert_eq!(put.status, 200);
    const EACH: usize = 100;
    let writers = agents.iter().enumerate().map(|(w, a)| {
        let hc = hc.clone();
        let url = state_url(a, "race");
        async move {
            let (mut done, mut conflicts) = (0, 0);
            while done < EACH {
                let cur = call(&hc, "GET", &url, &[], "").await;
                let v = cur.json();
                let mut list = v["state"]["writers"].as_array().unwrap().clone();
                list.push(json!(format!("w{w}-{done}")));
                let etag = format!("\"{}\"", v["version"]);
                let body = json!({ "writers": list }).to_string();
                let r = call(&hc, "PUT", &url, &[("if-match", &etag)], &body).await;
                match r.status {
                    200 => done += 1,
                    409 => conflicts += 1,
                    s => panic!("unexpected {s}: {:?}", r.body),
                }
            }
            conflicts
        }
    });
    let conflicts: Vec<usize> = futures_util::future::join_all(writers).await;
    let fin = call(&hc, "GET", &state_url(&agents[1], "race"), &[], "")
        .await
        .json();
    assert_eq!(
        fin["version"],
        1 + 2 * EACH as u64,
        "version = successful writes"
    );
    let list = fin["state"]["writers"].as_array().unwrap();
    let mut seen = BTreeMap::new();
    for x in list {
        *seen.entry(x.as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    assert_eq!(list.len(), 2 * EACH, "no write lost");
    assert!(seen.values().all(|&n| n == 1), "each write exactly once");
    eprintln!("conflicts retried: {conflicts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_get_every_change_resume_exactly_and_are_told_to_reload() {
    let redis = RedisServer::start();
    let extra = "events_max_len = 100";
    let (a, b) = (
        agent(&redis, "a", "t3", extra).await,
        agent(&redis, "b", "t3", extra).await,
    );
    let hc = client();
    let write = |n: u64| {
        let hc = hc.clone();
        let url = state_url(&a, "live");
        async move {
            let r = call(&hc, "PUT", &url, &[], &json!({ "n": n }).to_string()).await;
            assert_eq!(r.status, 200);
            r.json()["version"].as_u64().unwrap()
        }
    };
    let w = Duration::from_secs(5);

    // every change written through A reaches a subscriber on B, in order
    let mut sub = Sse::connect(&events_url(&b, "live"), None).await;
    let mut last = None;
    for n in 1..=20 {
        write(n).await;
    }
    for n in 1..=20u64 {
        let e = sub.next(w).await.expect("event");
        assert_eq!(
            (e.event.as_str(), e.version(), e.data["state"]["n"].as_u64()),
            ("message", n, Some(n))
        );
        assert_eq!(e.data["server"], "a");
        last = Some(e.id);
    }
    drop(sub);

    // away for 50 changes: resuming gets exactly those 50
    for n in 21..=70 {
        write(n).await;
    }
    let mut sub = Sse::connect(&events_url(&b, "live"), last.as_deref()).await;
    for n in 21..=70u64 {
        let e = sub.next(w).await.expect("missed event");
        assert_eq!((e.event.as_str(), e.version()), ("message", n));
        last = Some(e.id);
    }
    assert!(
        sub.next(Duration::from_millis(300)).await.is_none(),
        "nothing more than the 50"
    );
    write(71).await;
    assert_eq!(sub.next(w).await.unwrap().version(), 71, "then live again");
    let resume_from = last.clone();
    drop(sub);

    // away past retention (100 changes kept): told to reload, with the state
    for n in 72..=250 {
        write(n).await;
    }
    let xlen = redis
        .command(&["XLEN", "t3:match:{p:live}:events"])
        .unwrap();
    assert_eq!(
        xlen.trim(),
        ":100",
        "the stream is trimmed to events_max_len"
    );
    let mut sub = Sse::connect(&events_url(&b, "live"), resume_from.as_deref()).await;
    let e = sub.next(w).await.unwrap();
    assert_eq!(e.event, "reload");
    assert_eq!(
        (e.version(), e.data["state"]["n"].as_u64()),
        (250, Some(250))
    );
    write(251).await;
    let e = sub.next(w).await.unwrap();
    assert_eq!((e.event.as_str(), e.version()), ("message", 251));
    // an id that never existed is a reload too, never a silent start
    let mut sub = Sse::connect(&events_url(&b, "live"), Some("bogus")).await;
    assert_eq!(sub.next(w).await.unwrap().event, "reload");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_between_writes_is_never_a_silent_gap() {
    let mut redis = RedisServer::start();
    let (a, b) = (
        agent(&redis, "a", "t4", "").await,
        agent(&redis, "b", "t4", "").await,
    );
    let hc = client();
    let url = state_url(&a, "rs");
    let mut sub = Sse::connect(&events_url(&b, "rs"), None).await;
    for n in 1..=3 {
        assert_eq!(
            call(&hc, "PUT", &url, &[], &json!({ "n": n }).to_string())
                .await
                .status,
            200
        );
    }
    let w = Duration::from_secs(5);
    let mut version = 0;
    for _ in 0..3 {
        let e = sub.next(w).await.unwrap();
        assert_eq!(e.version(), version + 1);
        version = e.version();
    }
    redis.kill();
    // nothing is acknowledged while Redis cannot store it
    let down = call(&hc, "PUT", &url, &[], r#"{"n": 99}"#).await;
    assert_eq!(down.status, 503, "{:?}", down.body);
    redis.restart();
    // the next acknowledged write is what Redis holds
    let mut acked = None;
    for _ in 0..100 {
        let r = call(&hc, "PUT", &url, &[], r#"{"n": 4}"#).await;
        if r.status == 200 {
            acked = Some(r.json()["version"].as_u64().unwrap());
            break;
        }
        assert_eq!(r.status, 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked = acked.expect("writes resume after the restart");
    let got = call(&hc, "GET", &url, &[], "").await.json();
    assert_eq!(
        (got["version"].as_u64(), got["state"]["n"].as_u64()),
        (Some(acked), Some(4))
    );
    // the subscriber sees either the next version or a reload: no gap
    let e = sub
        .next(Duration::from_secs(10))
        .await
        .expect("event after the restart");
    eprintln!(
        "after the restart the subscriber got {} v{} (acked v{acked})",
        e.event,
        e.version()
    );
    if e.event == "reload" {
        assert!(e.version() <= acked);
        if e.version() < acked {
            assert_eq!(sub.next(w).await.unwrap().version(), acked);
        }
    } else {
        assert_eq!(e.version(), version + 1, "{e:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_new_owner_after_failover_serves_the_last_state() {
    let mut c = cluster("least_matches", "").await;
    let hc = client();
    let (_w, first) = ws_via(&c.proxies[0], "/matches/fm/ws").await;
    let i = c.agents.iter().position(|a| a.id == first).unwrap();
    let api = c.agents[i].api;
    let url = format!("http://{api}/v1/matches/fm/state");
    assert_eq!(
        call(&hc, "PUT", &url, &[], r#"{"round": 1, "score": [2, 1]}"#)
            .await
            .status,
        200
    );
    assert_eq!(
        call(&hc, "PATCH", &url, &[], r#"{"round": 2}"#)
            .await
            .status,
        200
    );
    let before = call(&hc, "GET", &url, &[], "").await.json();
    assert_eq!(
        (before["owner"].as_str(), before["takenOver"].as_bool()),
        (Some(first.as_str()), Some(false))
    );

    // the owner dies; the match moves on its next connection
    c.servers.remove(i).kill().await;
    c.agents[i].kill9();
    let (_w2, next) = ws_via(&c.proxies[1], "/matches/fm/ws").await;
    assert_ne!(next, first);
    let j = c.agents.iter().position(|a| a.id == next).unwrap();
    let got = call(
        &hc,
        "GET",
        &format!("http://{}/v1/matches/fm/state", c.agents[j].api),
        &[],
        "",
    )
    .await;
    assert_eq!(got.status, 200);
    let v = got.json();
    assert_eq!(v["version"], 2);
    assert_eq!(v["state"], json!({ "round": 2, "score": [2, 1] }));
    assert_eq!(v["owner"], next.as_str());
    assert_eq!(v["previousOwner"], first.as_str());
    assert_eq!(
        v["takenOver"], true,
        "the new owner can tell it took the match over"
    );
    assert!(v["fencingToken"].as_u64().unwrap() > before["fencingToken"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ending_a_match_releases_it_and_ended_matches_leave_no_keys() {
    let c = cluster("least_matches", "").await;
    let hc = client();
    // a match placed through a proxy, then ended by its server's agent
    let (w, owner) = ws_via(&c.proxies[0], "/matches/gone/ws").await;
    drop(w);
    let local = |p| {
        let hc = hc.clone();
        let owner = owner.clone();
        async move {
            figure(&hc, p, "matches")
                .await
                .get(&owner)
                .copied()
                .unwrap_or(0)
        }
    };
    wait_until(Duration::from_secs(2), "tunnel closed", || async {
        c.servers.iter().all(|s| s.stats.match_count() == 0)
    })
    .await;
    assert_eq!(
        local(&c.proxies[0]).await,
        1,
        "within its grace period the match still counts"
    );
    let api = c.agents.iter().find(|a| a.id == owner).unwrap().api;
    let del = call(
        &hc,
        "DELETE",
        &format!("http://{api}/v1/matches/gone"),
        &[],
        "",
    )
    .await;
    assert_eq!(del.status, 200, "{:?}", del.body);
    wait_until(
        Duration::from_secs(1),
        "the release reached the proxy",
        || async { local(&c.proxies[0]).await == 0 },
    )
    .await;
    let owner_key = c
        .redis
        .command(&["EXISTS", "kp5:match:{p:gone}:owner"])
        .unwrap();
    assert_eq!(owner_key.trim(), ":0");
    assert_eq!(
        call(
            &hc,
            "DELETE",
            &format!("http://{api}/v1/matches/never"),
            &[],
            ""
        )
        .await
        .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_ended_matches_leave_no_key_after_retention() {
    let redis = RedisServer::start();
    let a = agent(
        &redis,
        "a",
        "t6",
        "ended_retention_ms = 300\nevents_max_len = 10",
    )
    .await;
    let hc = client();
    let ids: Vec<String> = (0..1000).map(|i| format!("e{i}")).collect();
    for chunk in ids.chunks(50) {
        let writes = chunk.iter().map(|m| {
            let hc = hc.clone();
            let url = state_url(&a, m);
            async move {
                for n in 0..3 {
                    let r = call(&hc, "PATCH", &url, &[], &json!({ "n": n }).to_string()).await;
                    assert_eq!(r.status, 200);
                }
            }
        });
        futures_util::future::join_all(writes).await;
    }
    let count = |pattern: &str| {
        let reply = redis
            .command(&["EVAL", "return #redis.call('KEYS', ARGV[1])", "0", pattern])
            .unwrap();
        reply
            .trim()
            .trim_start_matches(':')
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!(
        count("t6:match:*"),
        2000,
        "a state and an event stream per match"
    );
    for chunk in ids.chunks(50) {
        let ends = chunk.iter().map(|m| {
            let hc = hc.clone();
            let url = format!("http://{}/v1/matches/{m}", a.addr);
            async move { assert_eq!(call(&hc, "DELETE", &url, &[], "").await.status, 200) }
        });
        futures_util::future::join_all(ends).await;
    }
    // ended, the state is still readable during retention
    let got = call(&hc, "GET", &state_url(&a, "e7"), &[], "").await;
    assert!(got.status == 200 || got.status == 404);
    wait_until(
        Duration::from_secs(5),
        "every key of the ended matches expired",
        || async { count("t6:match:*") == 0 },
    )
    .await;
    a.shutdown().await;
}
