//! `kp5-loadgen` (bench/) against a real proxy and demo servers, briefly, so
//! the benchmark tool cannot rot unnoticed: every mode connects everything,
//! the traffic modes echo with round trips measured, nothing fails.

use kp5_tests::cluster::sibling_bin;
use kp5_tests::support::*;

fn run(url: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(sibling_bin("kp5-loadgen"))
        .args([
            "--url",
            url,
            "--connections",
            "40",
            "--matches",
            "8",
            "--duration",
            "1",
        ])
        .args(args)
        .output()
        .expect("kp5-loadgen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("a report");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_drives_websockets_through_the_proxy() {
    let b = backends(2).await;
    let p = start_proxy(&config(
        &servers_of(&b),
        "strategy = \"least_matches\"\nmatch_id = [{ from = \"path\", pattern = \"/matches/{id}\" }]",
        "",
    ))
    .await;
    let url = format!("ws://{}/matches/{{match}}/ws", p.listen[0]);
    let (closed, rate, idle) = tokio::task::spawn_blocking(move || {
        (
            run(&url, &["--mode", "closed"]),
            run(&url, &["--mode", "rate", "--rate", "400", "--sources", "2"]),
            run(&url, &["--mode", "idle"]),
        )
    })
    .await
    .unwrap();
    for (what, r) in [("closed", &closed), ("rate", &rate), ("idle", &idle)] {
        assert_eq!(r["connected"], 40, "{what}: {r}");
        assert_eq!(r["errors"], 0, "{what}: {r}");
    }
    assert!(closed["received"].as_u64().unwrap() > 100, "{closed}");
    assert!(closed["rttMs"]["p99"].as_f64().unwrap() > 0.0);
    let got = rate["received"].as_u64().unwrap();
    assert!(
        (200..=600).contains(&got),
        "about 400 messages in 1 s: {rate}"
    );
    assert_eq!(idle["received"], 0);
    // the matches spread over both servers
    assert!(b.iter().all(|s| s
        .stats
        .websockets_total
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0));
}
