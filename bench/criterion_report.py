#!/usr/bin/env python3
"""Writes the criterion tables of docs/benchmarks.md (between its criterion-*
markers) from target/criterion/*/*/new/estimates.json, which
`cargo bench -p kp5-proxy --bench hot_path` leaves behind. Each figure is
criterion's median with its 95 % confidence interval. Nothing here is typed
in by hand. Usage: python3 bench/criterion_report.py (after the bench)."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRIT = ROOT / "target/criterion"
STRATEGIES = ["round_robin", "least_connections", "least_matches", "weighted"]
SIZES = [10, 100, 1000]


def median_ns(*parts):
    f = CRIT.joinpath(*parts, "new", "estimates.json")
    d = json.loads(f.read_text())["median"]
    return d["point_estimate"], d["confidence_interval"]["lower_bound"], d["confidence_interval"]["upper_bound"]


def t(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def cell(v):
    m, lo, hi = v
    return f"{t(m)} ({t(lo)}–{t(hi)})"


def select_table():
    lines = ["| strategy | 10 servers | 100 servers | 1,000 servers |", "|---|---|---|---|"]
    worst = 0.0
    for s in STRATEGIES:
        vals = [median_ns("select", s, str(n)) for n in SIZES]
        worst = max(worst, vals[-1][0])
        lines.append(f"| `{s}` | " + " | ".join(cell(v) for v in vals) + " |")
    verdict = "met" if worst < 1000 else "**not met**"
    lines.append("")
    lines.append(f"Slowest choice among 1,000 servers: {t(worst)}; target under 1 µs: {verdict}.")
    return "\n".join(lines)


def match_table():
    rows = [("path rule (`/matches/{id}`)", "path"), ("query rule (`?matchId=`)", "query"), ("header rule (`x-match-id`)", "header")]
    lines = ["| match-id extraction | time |", "|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {cell(median_ns('match_id', key))} |")
    return "\n".join(lines)


def config_table():
    rows = [
        ("parse and validate the TOML", "parse_and_validate"),
        ("build the runtime (pools, selectors, live-state binding)", "build_runtime"),
        ("parse + validate + build + atomic swap", "parse_validate_build_swap"),
    ]
    lines = ["| step | time |", "|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {cell(median_ns('config_10k_backends', key))} |")
    total = median_ns("config_10k_backends", "parse_validate_build_swap")[0]
    lines.append("")
    lines.append(f"Whole reload of 10,000 backends: {t(total)}; target under 100 ms: {'met' if total < 100e6 else '**not met**'}.")
    return "\n".join(lines)


def replace_between(text, name, body):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pre, rest = text.split(start, 1)
    return pre + f"{start}\n{body}\n{end}" + rest.split(end, 1)[1]


def main():
    doc = ROOT / "docs/benchmarks.md"
    text = doc.read_text()
    text = replace_between(text, "criterion-select", select_table())
    text = replace_between(text, "criterion-match-id", match_table())
    text = replace_between(text, "criterion-config", config_table())
    doc.write_text(text)
    print(select_table(), match_table(), config_table(), sep="\n\n")


if __name__ == "__main__":
    main()
