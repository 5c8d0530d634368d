//! Criterion benchmarks of the proxy's hot and reload paths:
//! - choosing a server among 10, 100 and 1,000 for every strategy
//!   (through `PoolRuntime::pick`, eligibility checks included);
//! - extracting a match id from a path, a query and a header;
//! - parsing, validating and building a config of 10,000 backends, and
//!   swapping it in.
//!
//! Run: `cargo bench -p kp5-proxy --bench hot_path`.

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kp5_proxy::config::Config;
use kp5_proxy::runtime::Runtime;
use kp5_proxy::state::Live;
use kp5_shared::MapEnv;
use std::hint::black_box;
use std::sync::Arc;

fn config_text(n: usize, strategy: &str) -> String {
    let mut s = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[[routes]]\npath_prefix = \"/\"\npool = \"p\"\n[pools.p]\nstrategy = \"{strategy}\"\nmatch_id = [{{ from = \"path\", pattern = \"/matches/{{id}}\" }}, {{ from = \"query\", name = \"matchId\" }}, {{ from = \"header\", name = \"x-match-id\" }}]\nbackends = [\n"
    );
    for i in 0..n {
        s.push_str(&format!(
            "  {{ id = \"s{i}\", address = \"10.{}.{}.{}:3000\", weight = {} }},\n",
            i / 65536 % 256,
            i / 256 % 256,
            i % 256,
            1 + i % 3
        ));
    }
    s.push_str("]\n");
    s
}

fn selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for strategy in [
        "round_robin",
        "least_connections",
        "least_matches",
        "weighted",
    ] {
        for n in [10usize, 100, 1000] {
            let cfg = Config::from_toml(&config_text(n, strategy), &MapEnv::new()).unwrap();
            let live = Live::default();
            let rt = Runtime::build(Arc::new(cfg), &live, &[]);
            // uneven load, as in a running cluster
            for (i, u) in rt.pools[0].servers.iter().enumerate() {
                u.state
                    .apply_report(Some((i * 7 % 50) as u64), Some((i * 3 % 20) as u64));
            }
            let pool = &rt.pools[0];
            g.bench_with_input(BenchmarkId::new(strategy, n), &n, |b, _| {
                b.iter(|| black_box(pool.pick(black_box(1000), false).map(|u| u.weight)))
            });
        }
    }
    g.finish();
}

fn match_ids(c: &mut Criterion) {
    let cfg = Config::from_toml(&config_text(1, "round_robin"), &MapEnv::new()).unwrap();
    let rules = &cfg.pools[0].match_id;
    let mut headers = http::HeaderMap::new();
    headers.insert("x-match-id", http::HeaderValue::from_static("m-12345"));
    let empty = http::HeaderMap::new();
    let mut g = c.benchmark_group("match_id");
    g.bench_function("path", |b| {
        b.iter(|| {
            black_box(kp5_proxy::forward::match_id::extract(
                rules,
                black_box("/matches/12345/ws"),
                None,
                &empty,
            ))
        })
    });
    g.bench_function("query", |b| {
        b.iter(|| {
            black_box(kp5_proxy::forward::match_id::extract(
                rules,
                black_box("/socket.io/"),
                Some(black_box("EIO=4&transport=polling&matchId=12345")),
                &empty,
            ))
        })
    });
    g.bench_function("header", |b| {
        b.iter(|| {
            black_box(kp5_proxy::forward::match_id::extract(
                rules,
                black_box("/api/state"),
                None,
                &headers,
            ))
        })
    });
    g.finish();
}

fn config_builds(c: &mut Criterion) {
    let text = config_text(10_000, "least_connections");
    let live = Live::default();
    let mut g = c.benchmark_group("config_10k_backends");
    g.sample_size(20);
    g.bench_function("parse_and_validate", |b| {
        b.iter(|| black_box(Config::from_toml(black_box(&text), &MapEnv::new()).unwrap()))
    });
    let cfg = Arc::new(Config::from_toml(&text, &MapEnv::new()).unwrap());
    g.bench_function("build_runtime", |b| {
        b.iter(|| black_box(Runtime::build(cfg.clone(), &live, &[])))
    });
    let current = ArcSwap::from_pointee(Runtime::build(cfg.clone(), &live, &[]));
    g.bench_function("parse_validate_build_swap", |b| {
        b.iter(|| {
            let cfg = Config::from_toml(&text, &MapEnv::new()).unwrap();
            let rt = Runtime::build(Arc::new(cfg), &live, &[]);
            black_box(current.swap(Arc::new(rt)))
        })
    });
    g.finish();
}

criterion_group!(benches, selection, match_ids, config_builds);
criterion_main!(benches);
