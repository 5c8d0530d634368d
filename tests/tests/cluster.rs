//! The Redis registry end to end (issue 3): a real `redis-server`, real
//! `kp5-agent` processes next to demo match servers, and two proxies that
//! discover the servers, balance on cluster-wide load and agree on match
//! owners.

use kp5_tests::cluster::*;
use kp5_tests::demo::DemoServer;
use kp5_tests::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_join_leave_and_return_without_config_changes() {
    let mut c = cluster("round_robin", "").await;
    let hc = client();
    // a fourth server joins: used by both proxies within 1 s
    let extra = DemoServer::start("s4", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    let mut a4 = Agent::start(&c.dir, &c.redis.url(), "s4", extra.addr, TTL_MS);
    for p in &c.proxies {
        wait_until(Duration::from_secs(1), "s4 in rotation", || {
            let hc = hc.clone();
            async move { available(&hc, p).await.contains("s4") }
        })
        .await;
    }
    let joined = started.elapsed();
    // and really receives requests through each proxy
    for p in &c.proxies {
        let mut seen = BTreeSet::new();
        for _ in 0..8 {
            seen.insert(get(&hc, &format!("http://{}/", p.listen[0])).await.server());
        }
        assert_eq!(
            seen,
            ids(&["s1", "s2", "s3", "s4"]),
            "round robin over all four"
        );
    }

    // SIGKILL: out of rotation within the heartbeat TTL (plus polling slack)
    a4.kill9();
    let killed = Instant::now();
    for p in &c.proxies {
        wait_until(
            Duration::from_millis(TTL_MS + 300),
            "s4 out of rotation",
            || {
                let hc = hc.clone();
                async move { !available(&hc, p).await.contains("s4") }
            },
        )
        .await;
    }
    let left = killed.elapsed();
    for p in &c.proxies {
        for _ in 0..6 {
            let got = get(&hc, &format!("http://{}/", p.listen[0])).await;
            assert_eq!(got.status, 200);
            assert_ne!(got.server(), "s4");
        }
    }

    // restarted: back
    a4.restart();
    for p in &c.proxies {
        wait_until(Duration::from_secs(1), "s4 back", || {
            let hc = hc.clone();
            async move { available(&hc, p).await.contains("s4") }
        })
        .await;
    }
    // a clean exit deregisters at once, without waiting for the TTL
    let st = a4.terminate().expect("agent exit status");
    assert!(st.success(), "agent exits 0 on SIGTERM: {st:?}");
    for p in &c.proxies {
        wait_until(Duration::from_millis(300), "s4 deregistered", || {
            let hc = hc.clone();
            async move { !available(&hc, p).await.contains("s4") }
        })
        .await;
    }
    eprintln!("joined in {joined:?}, left {left:?} after SIGKILL (TTL {TTL_MS} ms)");
    drop(c.agents.drain(..));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_connections_counts_connections_made_past_the_proxies() {
    let c = cluster("least_connections", "").await;
    let hc = client();
    // 100 WebSockets straight to s1, which only its agent reports
    let s1 = &c.servers[0];
    let mut direct = Vec::new();
    for _ in 0..100 {
        direct.push(ws(&format!("ws://{}/ws", s1.addr)).await.0);
    }
    for p in &c.proxies {
        wait_until(
            Duration::from_secs(3),
            "proxies see s1's 100 connections",
            || {
                let hc = hc.clone();
                async move { figure(&hc, p, "clusterConnections").await["s1"] >= 100 }
            },
        )
        .await;
    }
    // the next 100 through both proxies go to s2 and s3 only
    let mut through = Vec::new();
    let mut landed: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..100 {
        let (w, server) = ws_via(&c.proxies[i % 2], "/ws").await;
        *landed.entry(server).or_default() += 1;
        through.push(w);
    }
    assert_eq!(landed.get("s1"), None, "{landed:?}");
    assert_eq!(landed.values().sum::<u32>(), 100);
    for s in ["s2", "s3"] {
        let n = landed.get(s).copied().unwrap_or(0);
        assert!(
            (35..=65).contains(&n),
            "balanced between s2 and s3: {landed:?}"
        );
    }
    drop((direct, through));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_matches_balances_matches_opened_through_both_proxies() {
    let c = cluster("least_matches", "").await;
    let mut open = Vec::new();
    for i in 0..60 {
        let (w, _) = ws_via(&c.proxies[i % 2], &format!("/matches/lm{i}/ws")).await;
        open.push(w);
    }
    let counts: Vec<usize> = c.servers.iter().map(|s| s.stats.match_count()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 60, "{counts:?}");
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(
        max - min <= 2,
        "per-server matches differ by at most 2: {counts:?}"
    );
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_of_a_match_reaches_one_server_through_any_proxy() {
    let c = cluster("least_connections", "").await;
    let hc = client();
    // 400 connections for 40 matches, each through a random proxy, 40 at a time
    let mut owner: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut open = Vec::new();
    for round in 0..10 {
        let batch = (0..40).map(|m| {
            let p = &c.proxies[fastrand::usize(..2)];
            let path = format!("/matches/af{m}/ws");
            async move { (m, ws_via(p, &path).await) }
        });
        for (m, (w, server)) in futures_util::future::join_all(batch).await {
            owner.entry(format!("af{m}")).or_default().insert(server);
            if round < 2 {
                open.push(w);
            }
        }
    }
    assert_eq!(owner.len(), 40);
    for (m, servers) in &owner {
        assert_eq!(servers.len(), 1, "match {m} on {servers:?}");
    }
    let used: BTreeSet<&String> = owner.values().flatten().collect();
    assert_eq!(used.len(), 3, "matches spread over all servers");

    // 50 simultaneous first connections of one new match, through both proxies
    let first = (0..50).map(|i| {
        let p = &c.proxies[i % 2];
        async move { ws_via(p, "/matches/stampede/ws").await }
    });
    let all = futures_util::future::join_all(first).await;
    let servers: BTreeSet<&String> = all.iter().map(|(_, s)| s).collect();
    assert_eq!(servers.len(), 1, "one server for the stampede: {servers:?}");
    // the owner is on record, the same through either proxy
    let a = admin(
        &hc,
        &c.proxies[0],
        "/api/scaling/distributed/matches/stampede",
    )
    .await;
    let b = admin(
        &hc,
        &c.proxies[1],
        "/api/scaling/distributed/matches/stampede",
    )
    .await;
    assert_eq!(a["owner"], b["owner"]);
    assert_eq!(
        &a["owner"]["server"],
        servers.into_iter().next().unwrap().as_str()
    );
    // unknown matches are 404, and the endpoint wants the token
    let url = format!(
        "http://{}/api/scaling/distributed/matches/never-seen",
        c.proxies[0].admin
    );
    let got = get_with(&hc, &url, &[("authorization", "Bearer test-token")]).await;
    assert_eq!(got.status, 404);
    assert_eq!(get(&hc, &url).await.status, 401);
    drop((open, all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_owners_match_is_reassigned_once_to_one_live_server() {
    let mut c = cluster("least_matches", "").await;
    let hc = client();
    let (mut w, first) = ws_via(&c.proxies[0], "/matches/fo/ws").await;
    echo_ok(&mut w).await;
    let (_w2, again) = ws_via(&c.proxies[1], "/matches/fo/ws").await;
    assert_eq!(first, again);
    let before = admin(&hc, &c.proxies[0], "/api/scaling/distributed/matches/fo").await;
    assert_eq!(before["owner"]["server"], first.as_str());
    let old_token = before["owner"]["token"].as_u64().unwrap();

    // the owner dies: its match server and its agent
    let i = c.servers.iter().position(|s| s.id == first).unwrap();
    c.servers.remove(i).kill().await;
    c.agents[i].kill9();

    // the next connections, concurrently through both proxies
    let next = (0..20).map(|k| {
        let p = &c.proxies[k % 2];
        async move { ws_via(p, "/matches/fo/ws").await }
    });
    let all = futures_util::future::join_all(next).await;
    let servers: BTreeSet<&String> = all.iter().map(|(_, s)| s).collect();
    assert_eq!(servers.len(), 1, "one new owner: {servers:?}");
    let new_owner = servers.into_iter().next().unwrap().clone();
    assert_ne!(new_owner, first);

    let after = admin(&hc, &c.proxies[1], "/api/scaling/distributed/matches/fo").await;
    assert_eq!(after["owner"]["server"], new_owner.as_str());
    assert_eq!(after["owner"]["previous"], first.as_str());
    assert!(after["owner"]["token"].as_u64().unwrap() > old_token);
    let mut reassigned = 0;
    for p in &c.proxies {
        let st = admin(&hc, p, "/api/scaling/distributed/status").await;
        reassigned += st["matchClaims"]["reassignments"].as_u64().unwrap();
    }
    assert_eq!(reassigned, 1, "reassigned once across both proxies");
    for (mut w, _) in all.into_iter().take(4) {
        echo_ok(&mut w).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_redis_keeps_traffic_flowing_and_everything_resumes() {
    let mut c = cluster("least_connections", "").await;
    let hc = client();
    // matches known to both proxies before Redis goes
    let mut known = BTreeMap::new();
    for m in 0..10 {
        let id = format!("k{m}");
        let a = get(
            &hc,
            &format!("http://{}/matches/{id}/x", c.proxies[0].listen[0]),
        )
        .await;
        let b = get(
            &hc,
            &format!("http://{}/matches/{id}/x", c.proxies[1].listen[0]),
        )
        .await;
        assert_eq!(a.server(), b.server());
        known.insert(id, a.server());
    }
    c.redis.kill();
    let load_until = Instant::now() + Duration::from_millis(1500);
    let mut requests = 0;
    while Instant::now() < load_until {
        for (id, server) in &known {
            for p in &c.proxies {
                let got = get(&hc, &format!("http://{}/matches/{id}/x", p.listen[0])).await;
                assert_eq!(
                    got.status, 200,
                    "known match {id} failed while Redis is down"
                );
                assert_eq!(&got.server(), server, "known match {id} moved");
                requests += 1;
            }
        }
    }
    // new matches: both proxies agree without Redis
    for m in 0..20 {
        let path = format!("/matches/n{m}/x");
        let a = get(&hc, &format!("http://{}{path}", c.proxies[0].listen[0])).await;
        let b = get(&hc, &format!("http://{}{path}", c.proxies[1].listen[0])).await;
        assert_eq!((a.status, b.status), (200, 200));
        assert_eq!(a.server(), b.server(), "proxies agree on new match n{m}");
    }
    for p in &c.proxies {
        let h = admin(&hc, p, "/api/scaling/health").await;
        assert_eq!(h["status"], "degraded", "{h}");
        let r = admin(&hc, p, "/api/scaling/redis/status").await;
        assert_eq!(r["connected"], false, "{r}");
        // servers stay in rotation: silence from a dead Redis says nothing
        assert_eq!(available(&hc, p).await.len(), 3);
    }

    // Redis returns, empty: proxies and agents reconnect and resubscribe
    c.redis.restart();
    let back = Instant::now();
    for p in &c.proxies {
        wait_until(
            Duration::from_secs(5),
            "proxy reconnected and resubscribed",
            || {
                let hc = hc.clone();
                async move {
                    let r = admin(&hc, p, "/api/scaling/redis/status").await;
                    r["connected"] == true && r["subscribed"] == true
                }
            },
        )
        .await;
        assert_eq!(
            admin(&hc, p, "/api/scaling/health").await["status"],
            "healthy"
        );
    }
    let redis = &c.redis;
    wait_until(
        Duration::from_secs(5),
        "registry whole again",
        || async move {
            let members = redis
                .command(&["SCARD", "kp5:pool:p:servers"])
                .unwrap_or_default();
            let placed = redis
                .command(&["EXISTS", "kp5:match:{p:n0}:owner"])
                .unwrap_or_default();
            members.trim() == ":3" && placed.trim() == ":1"
        },
    )
    .await;
    eprintln!(
        "{requests} requests while Redis was down; whole again {:?} after restart",
        back.elapsed()
    );
    // pub/sub works again: a new server reaches both proxies within 1 s
    // (the periodic reconcile runs every 5 s, so only the subscription can)
    let extra = DemoServer::start("s4", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let _a4 = Agent::start(&c.dir, &c.redis.url(), "s4", extra.addr, TTL_MS);
    for p in &c.proxies {
        wait_until(Duration::from_secs(1), "s4 announced over pub/sub", || {
            let hc = hc.clone();
            async move { available(&hc, p).await.contains("s4") }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_server_keeps_its_matches_and_gets_no_new_ones() {
    let c = cluster("least_matches", "").await;
    let hc = client();
    // a running match on s1
    let mut running = Vec::new();
    let mut on_s1 = None;
    for m in 0..6 {
        let path = format!("/matches/d{m}/ws");
        let (w, server) = ws_via(&c.proxies[m % 2], &path).await;
        if server == "s1" && on_s1.is_none() {
            on_s1 = Some(path.clone());
        }
        running.push(w);
    }
    let on_s1 = on_s1.expect("least_matches put one of six matches on s1");

    let resp = hc
        .request(
            http::Request::post(format!("http://{}/v1/drain", c.agents[0].api))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for p in &c.proxies {
        wait_until(Duration::from_secs(2), "s1 shown draining", || {
            let hc = hc.clone();
            async move {
                let v = admin(&hc, p, "/api/scaling/distributed/servers").await;
                v["servers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["id"] == "s1" && s["draining"] == true)
            }
        })
        .await;
    }
    // new matches avoid s1
    let mut fresh = Vec::new();
    for m in 0..30 {
        let (w, server) = ws_via(&c.proxies[m % 2], &format!("/matches/new{m}/ws")).await;
        assert_ne!(server, "s1", "a draining server got new match new{m}");
        fresh.push(w);
    }
    // its running match keeps working, and new connections of it still go there
    for w in running.iter_mut() {
        echo_ok(w).await;
    }
    for p in &c.proxies {
        let (mut w, server) = ws_via(p, &on_s1).await;
        assert_eq!(server, "s1", "a running match stays on its draining server");
        echo_ok(&mut w).await;
    }
    let status: serde_json::Value = {
        let got = get(&hc, &format!("http://{}/v1/status", c.agents[0].api)).await;
        got.json()
    };
    assert_eq!(status["server"]["draining"], true);
}
