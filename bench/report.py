#!/usr/bin/env python3
"""Turns bench/results/latest.json (from bench/run.sh) into the comparison
table of docs/benchmarks.md (between its comparison markers) and the chart
docs/benchmarks.svg. Every figure is the median of the rounds; the spread
(min-max) is shown beside it. A ratio is the median of the per-round ratios:
the three proxies of a round ran within seconds of each other, so a slow
phase of the machine falls on all three of it alike. Nothing here is typed
in by hand."""

import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXIES = ["kp5", "nginx", "haproxy"]


def ms(v):
    v = str(v)
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)


# The share of a core the capped slices held each proxy to (their labels).
CAP = {"cap": 40}


def lab(text):
    return text.format(**CAP)


def load(path):
    rows = json.loads(Path(path).read_text())
    figures = {}  # (metric, proxy) -> {round: value}

    def add(metric, proxy, value):
        figures.setdefault((metric, proxy), {})[rnd] = value

    def add_cores(test, proxy, r):
        # the busy share of each core over the slice (runs from 12 on)
        for core in ("0", "1"):
            if f"core{core}Busy" in r:
                add(f"{test}_core{core}_busy", proxy, 100.0 * float(r[f"core{core}Busy"]))
        # the share of the slice the host stole from the two cores (runs
        # from 17 on): a slice that lost much is slow for no proxy's fault
        if "core0Steal" in r:
            add(f"{test}_steal", proxy, 50.0 * (float(r["core0Steal"]) + float(r["core1Steal"])))

    for r in rows:
        p, t, rnd = r["proxy"], r["test"], r["round"]
        if "capPercent" in r:
            CAP["cap"] = r["capPercent"]
        # the capped slices ("http1cap", "http2cap", "wscap") carry the same fields as
        # the plain ones, under their own test name
        if t in ("http1", "http1cap"):
            add(f"{t}_rps", p, float(r["rps"]))
            add(f"{t}_p99_ms", p, ms(r["p99"]))
            secs = float(r.get("seconds", 8.0))
            if float(r.get("cpuSeconds", 0)) > 0:
                add(f"{t}_per_core_s", p, float(r["rps"]) * secs / float(r["cpuSeconds"]))
            add_cores(t, p, r)
        elif t in ("http2", "http2cap"):
            add(f"{t}_rps", p, float(r["rps"]))
            if float(r.get("cpuSeconds", 0)) > 0:
                add(f"{t}_per_core_s", p, float(r["rps"]) * float(r["seconds"]) / float(r["cpuSeconds"]))
            add_cores(t, p, r)
        elif t == "https":
            add("https_rps", p, float(r["rps"]))
            add("https_p99_ms", p, ms(r["p99"]))
        elif t == "handshakes":
            add("tls_handshakes", p, float(r["rps"]))
        elif t in ("ws", "wscap"):
            rep = r["report"]
            add(f"{t}_msgs", p, float(rep["messagesPerSecond"]))
            add(f"{t}_p99_ms", p, float(rep["rttMs"]["p99"]))
            add(f"{t}_errors", p, float(rep["errors"] + rep["connectErrors"]))
            if float(r.get("cpuSeconds", 0)) > 0:
                add(f"{t}_per_core_s", p, float(rep["received"]) / float(r["cpuSeconds"]))
            add_cores(t, p, r)
        elif t == "idle":
            n = r["connections"]
            per = (r["heldKiB"] - r["baseKiB"]) / max(r["connected"], 1)
            add(f"idle_kib_{n}", p, per)
            add(f"idle_connected_{n}", p, float(r["connected"]))
    return figures


LABELS = [
    ("http1_rps", "HTTP/1.1 keep-alive requests/s (wrk, 50 conns)", True),
    ("http1_p99_ms", "HTTP/1.1 p99 latency, ms", False),
    ("http1_per_core_s", "HTTP/1.1 requests per proxy core-second", True),
    ("http2_rps", "HTTP/2 requests/s (h2load, 10 conns x 10 streams)", True),
    ("https_rps", "HTTPS keep-alive requests/s (wrk, 50 conns, TLS 1.3)", True),
    ("https_p99_ms", "HTTPS p99 latency, ms", False),
    ("tls_handshakes", "TLS handshakes/s (wrk, Connection: close, ECDSA P-256)", True),
    ("ws_msgs", "WebSocket echo messages/s (200 conns, 64 B)", True),
    ("ws_p99_ms", "WebSocket p99 round trip, ms", False),
    ("ws_per_core_s", "WebSocket messages per proxy core-second", True),
    ("http1cap_rps", "HTTP/1.1 requests/s, proxy held to {cap} % of a core", True),
    ("http1cap_p99_ms", "HTTP/1.1 p99 latency, ms, proxy held to {cap} % of a core", False),
    ("http1cap_per_core_s", "HTTP/1.1 requests per proxy core-second, proxy held to {cap} %", True),
    ("http2cap_rps", "HTTP/2 requests/s, proxy held to {cap} % of a core", True),
    ("http2cap_per_core_s", "HTTP/2 requests per proxy core-second, proxy held to {cap} %", True),
    ("wscap_msgs", "WebSocket echo messages/s, proxy held to {cap} % of a core", True),
    ("wscap_p99_ms", "WebSocket p99 round trip, ms, proxy held to {cap} % of a core", False),
    ("wscap_per_core_s", "WebSocket messages per proxy core-second, proxy held to {cap} %", True),
    ("http1_core0_busy", "HTTP/1.1: busy % of core 0 (the proxy's)", None),
    ("http1_core1_busy", "HTTP/1.1: busy % of core 1 (wrk and the backends)", None),
    ("ws_core0_busy", "WebSocket: busy % of core 0 (the proxy's)", None),
    ("ws_core1_busy", "WebSocket: busy % of core 1 (load generator and backends)", None),
    ("http2_core0_busy", "HTTP/2: busy % of core 0 (the proxy's)", None),
    ("http2_core1_busy", "HTTP/2: busy % of core 1 (h2load and the backends)", None),
    ("http1_steal", "HTTP/1.1: % of the two cores' time stolen by the host", None),
    ("http2_steal", "HTTP/2: % of the two cores' time stolen by the host", None),
    ("ws_steal", "WebSocket: % of the two cores' time stolen by the host", None),
    ("idle_kib_1000", "KiB per idle WebSocket, 1,000 open", False),
    ("idle_kib_5000", "KiB per idle WebSocket, 5,000 open", False),
    ("idle_kib_9000", "KiB per idle WebSocket, 9,000 open", False),
    ("idle_connected_9000", "WebSockets held of 9,000", True),
]


def fmt(v):
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def pairs(figures, key, other):
    """(kp5's figure, the other's) for every round both ran."""
    mine, theirs = figures[(key, "kp5")], figures[(key, other)]
    return [(mine[r], theirs[r]) for r in mine if r in theirs]


def ratio(figures, key, other):
    """Median over the rounds both ran of kp5's figure over the other's."""
    per_round = [a / b for a, b in pairs(figures, key, other) if b]
    return statistics.median(per_round) if per_round else float("nan")


def table(figures):
    lines = [
        f"| figure | kp5-proxy | nginx | HAProxy | kp5 / nginx | kp5 / HAProxy |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for key, label, higher in LABELS:
        label = lab(label)
        vals = {p: list(figures.get((key, p), {}).values()) for p in PROXIES}
        if not all(vals.values()):
            continue
        med = {p: statistics.median(v) for p, v in vals.items()}
        cell = lambda p: f"{fmt(med[p])} ({fmt(min(vals[p]))}–{fmt(max(vals[p]))})"
        if higher is None:
            # context, not a figure to beat: which core bounded the test
            lines.append(f"| {label} | {cell('kp5')} | {cell('nginx')} | {cell('haproxy')} | | |")
            continue
        r = lambda o: ratio(figures, key, o)
        lines.append(
            f"| {label} | {cell('kp5')} | {cell('nginx')} | {cell('haproxy')} | {r('nginx'):.2f} | {r('haproxy'):.2f} |"
        )
        ratios.append((label, r("nginx"), r("haproxy"), higher))
    return "\n".join(lines), ratios


# The targets of issue 6 / SPEC §5 that this run measures: (label, metric,
# which proxies kp5 must match, higher is better).
TARGETS = [
    ("HTTP/1.1 requests/s at least nginx's and HAProxy's", "http1_rps", ["nginx", "haproxy"], True),
    ("HTTP/1.1 p99 no worse than nginx's", "http1_p99_ms", ["nginx"], False),
    ("HTTP/2 requests/s at least nginx's and HAProxy's", "http2_rps", ["nginx", "haproxy"], True),
    ("WebSocket messages/s at least nginx's", "ws_msgs", ["nginx"], True),
    ("WebSocket p99 round trip no worse than nginx's", "ws_p99_ms", ["nginx"], False),
    ("HTTP/1.1 requests/s at least nginx's and HAProxy's, each proxy held to {cap} % of a core", "http1cap_rps", ["nginx", "haproxy"], True),
    ("HTTP/1.1 p99 no worse than nginx's, each proxy held to {cap} % of a core", "http1cap_p99_ms", ["nginx"], False),
    ("HTTP/2 requests/s at least nginx's and HAProxy's, each proxy held to {cap} % of a core", "http2cap_rps", ["nginx", "haproxy"], True),
    ("WebSocket messages/s at least nginx's, each proxy held to {cap} % of a core", "wscap_msgs", ["nginx"], True),
    ("WebSocket p99 round trip no worse than nginx's, each proxy held to {cap} % of a core", "wscap_p99_ms", ["nginx"], False),
    ("KiB per idle WebSocket (9,000 open) at most nginx's (issue 6)", "idle_kib_9000", ["nginx"], False),
    ("KiB per idle WebSocket (9,000 open) at most HAProxy's (SPEC §5)", "idle_kib_9000", ["haproxy"], False),
]


def targets(figures, rounds):
    med = lambda key, p: statistics.median(figures[(key, p)].values())
    lines = ["| target | kp5-proxy | ratio | rounds kp5 ahead or level | result |", "|---|---|---|---|---|"]
    for label, key, against, higher in TARGETS:
        label = lab(label)
        if not all((key, p) in figures for p in ["kp5", *against]):
            continue
        mine = med(key, "kp5")
        ratios = {p: ratio(figures, key, p) for p in against}
        met = all((r >= 1.0) if higher else (r <= 1.0) for r in ratios.values())
        name = lambda p: "nginx" if p == "nginx" else "HAProxy"
        shown = ", ".join(f"{r:.2f}x {name(p)}" for p, r in ratios.items())
        wins = []
        for p in against:
            both = pairs(figures, key, p)
            ahead = sum(1 for a, b in both if ((a >= b) if higher else (a <= b)))
            wins.append(f"{ahead} of {len(both)} vs {name(p)}")
        lines.append(f"| {label} | {fmt(mine)} | {shown} | {', '.join(wins)} | {'met' if met else '**not met**'} |")
    if ("idle_kib_9000", "kp5") in figures:
        kib = med("idle_kib_9000", "kp5")
        lines.append(f"| aiming at 4 KiB per idle WebSocket | {fmt(kib)} | | | {'met' if kib <= 4.0 else 'not yet'} |")
    if ("idle_connected_9000", "kp5") in figures:
        held = list(figures[("idle_connected_9000", "kp5")].values())
        ok = all(h >= 9000 for h in held)
        lines.append(
            f"| 9,000 WebSockets held in one process, none failed | {fmt(min(held))} in the worst round | | | {'met' if ok else '**not met**'} |"
        )
    lines.append(
        f"| every figure the median of at least 3 alternating rounds | {rounds} | | | {'met' if min_rounds(figures) >= 3 else '**not met**'} |"
    )
    return "\n".join(lines)


def min_rounds(figures):
    return min(len(v) for v in figures.values())


def svg(ratios):
    w, row, left = 760, 34, 330
    h = 40 + row * len(ratios)
    scale = (w - left - 60) / 2.0  # ratio 2.0 fills the width
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-weight="bold">kp5-proxy relative to nginx (blue) and HAProxy (orange); 1.0 = equal</text>',
    ]
    x1 = left + scale
    out.append(f'<line x1="{x1}" y1="28" x2="{x1}" y2="{h - 4}" stroke="#888" stroke-dasharray="4 3"/>')
    for i, (label, rn, rh, higher) in enumerate(ratios):
        y = 34 + i * row
        better = "higher is better" if higher else "lower is better"
        out.append(f'<text x="10" y="{y + 14}">{label}</text>')
        out.append(f'<text x="10" y="{y + 26}" fill="#666" font-size="10">{better}</text>')
        for j, (r, colour) in enumerate(((rn, "#3b6fb6"), (rh, "#e08a2c"))):
            bw = max(1.0, min(r, 2.0) * scale)
            out.append(f'<rect x="{left}" y="{y + 2 + j * 13}" width="{bw:.1f}" height="11" fill="{colour}"/>')
            out.append(f'<text x="{left + bw + 4:.1f}" y="{y + 12 + j * 13}" font-size="10">{r:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out)


# The columns of the table of runs: (heading, metric, against, higher is better).
RUN_COLUMNS = [
    ("HTTP/1.1 req/s vs nginx", "http1_rps", "nginx", True),
    ("vs HAProxy", "http1_rps", "haproxy", True),
    ("HTTP/1.1 p99 vs nginx", "http1_p99_ms", "nginx", False),
    ("HTTP/2 req/s vs nginx", "http2_rps", "nginx", True),
    ("vs HAProxy", "http2_rps", "haproxy", True),
    ("WebSocket msgs/s vs nginx", "ws_msgs", "nginx", True),
    ("WebSocket p99 vs nginx", "ws_p99_ms", "nginx", False),
    ("HTTP/1.1 req per proxy core-second vs nginx", "http1_per_core_s", "nginx", True),
    ("WebSocket msgs per proxy core-second vs nginx", "ws_per_core_s", "nginx", True),
    ("HTTP/1.1 req/s vs nginx, proxy held to {cap} %", "http1cap_rps", "nginx", True),
    ("HTTP/2 req/s vs HAProxy, proxy held to {cap} %", "http2cap_rps", "haproxy", True),
    ("WebSocket msgs/s vs nginx, proxy held to {cap} %", "wscap_msgs", "nginx", True),
    ("WebSocket p99 vs nginx, proxy held to {cap} %", "wscap_p99_ms", "nginx", False),
]


def median_interval(xs):
    """A 95 % interval for the median of `xs` from its order statistics
    (the sign test's: no assumption about the distribution)."""
    xs, n = sorted(xs), len(xs)
    k, below = 0, 0.0
    # the largest k with P(Binomial(n, 1/2) < k) <= 2.5 %
    while k < n and below + math.comb(n, k) / 2**n <= 0.025:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    return xs[k - 1], xs[n - k]


def cell(ratios, higher):
    if not ratios:
        return ""
    ahead = sum(1 for r in ratios if ((r >= 1.0) if higher else (r <= 1.0)))
    return f"{statistics.median(ratios):.2f}x ({ahead}/{len(ratios)})"


def runs_table(runs):
    """One row per archived run (bench/results/runs/NN-DATE-COMMIT.json),
    then the rounds of all runs of the same code pooled: the median
    per-round ratio, a 95 % interval for it, rounds ahead or level."""
    head = "| run | code | " + " | ".join(lab(c[0]) for c in RUN_COLUMNS) + " | KiB per idle WebSocket at 9,000 |"
    lines = [head, "|" + "---|" * (len(RUN_COLUMNS) + 3)]
    by_code = {}
    for path, figures in runs:
        run, code = path.stem.split("-")[0], path.stem.split("-")[-1]
        cells = []
        for _, key, other, higher in RUN_COLUMNS:
            if (key, "kp5") not in figures or (key, other) not in figures:
                cells.append("")
                continue
            ratios = [a / b for a, b in pairs(figures, key, other) if b]
            by_code.setdefault(code, {}).setdefault((key, other), []).extend(ratios)
            cells.append(cell(ratios, higher))
        kib = figures.get(("idle_kib_9000", "kp5"))
        cells.append(fmt(statistics.median(kib.values())) if kib else "")
        by_code.setdefault(code, {}).setdefault("runs", []).append(run)
        lines.append(f"| {run} | {code} | " + " | ".join(cells) + " |")
    for code, pooled in by_code.items():
        runs = pooled["runs"]
        if len(runs) < 2:
            continue
        cells = []
        for _, key, other, higher in RUN_COLUMNS:
            ratios = pooled.get((key, other), [])
            interval = median_interval(ratios) if ratios else None
            span = f" [{interval[0]:.2f}–{interval[1]:.2f}]" if interval else ""
            cells.append(cell(ratios, higher) + span)
        lines.append(f"| runs {', '.join(runs)} pooled | {code} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


# The figures whose every slice the slices table shows: (metric, label).
SLICE_FIGURES = [
    ("http1_rps", "HTTP/1.1 requests/s"),
    ("http1_p99_ms", "HTTP/1.1 p99, ms"),
    ("http1_steal", "HTTP/1.1: % of the cores' time stolen"),
    ("http2_rps", "HTTP/2 requests/s"),
    ("ws_msgs", "WebSocket messages/s"),
    ("ws_p99_ms", "WebSocket p99, ms"),
    ("ws_core1_busy", "WebSocket: busy % of core 1"),
    ("ws_steal", "WebSocket: % of the cores' time stolen"),
]


def slices_table(runs):
    """Every slice of every run that measured the cores (run 12 on), per
    proxy: how far one slice lies from the next, whichever proxy ran it."""
    pooled, numbers = {}, []
    for path, figures in runs:
        if ("http1_core1_busy", "kp5") not in figures:
            continue
        numbers.append(path.stem.split("-")[0])
        for key, _ in SLICE_FIGURES:
            for p in PROXIES:
                pooled.setdefault((key, p), []).extend(figures.get((key, p), {}).values())
    if not numbers:
        return ""
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))]
    lines = [
        f"Every slice of runs {numbers[0]}–{numbers[-1]}, per proxy (10th, 25th, 50th, 75th, 90th percentile, min–max):",
        "",
        "| figure | proxy | slices | p10 | p25 | median | p75 | p90 | min–max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"kp5": "kp5-proxy", "nginx": "nginx", "haproxy": "HAProxy"}
    for key, label in SLICE_FIGURES:
        for p in PROXIES:
            xs = pooled.get((key, p), [])
            if not xs:
                continue
            cells = " | ".join(fmt(q(xs, f)) for f in (0.1, 0.25, 0.5, 0.75, 0.9))
            lines.append(f"| {label} | {names[p]} | {len(xs)} | {cells} | {fmt(min(xs))}–{fmt(max(xs))} |")
    return "\n".join(lines)


def replace_between(text, start, end, body):
    if start in text:
        pre, rest = text.split(start, 1)
        return pre + body + rest.split(end, 1)[1]
    return text + "\n" + body + "\n"


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else ROOT / "bench/results/latest.json"
    figures = load(path)
    load_rounds = len(figures.get(("http1_rps", "kp5"), {}))
    idle_rounds = len(figures.get(("idle_kib_9000", "kp5"), {}))
    rounds = f"{load_rounds} rounds of load, {idle_rounds} of idle memory"
    tab, ratios = table(figures)
    (ROOT / "docs/benchmarks.svg").write_text(svg(ratios))
    doc = ROOT / "docs/benchmarks.md"
    text = doc.read_text()
    start, end = "<!-- comparison:start -->", "<!-- comparison:end -->"
    body = (
        f"{start}\n"
        f"Median of {rounds} (spread min–max in brackets);\n"
        f"the ratios are medians of the per-round ratios. From\n"
        f"`bench/results/latest.json`; regenerate with `bash bench/run.sh`.\n\n"
        f"{tab}\n\n![ratios](benchmarks.svg)\n{end}"
    )
    text = replace_between(text, start, end, body)
    start, end = "<!-- targets:start -->", "<!-- targets:end -->"
    body = f"{start}\n{targets(figures, rounds)}\n{end}"
    text = replace_between(text, start, end, body)
    # each archived run read once, for both tables
    runs = [(p, load(p)) for p in sorted((ROOT / "bench/results/runs").glob("*.json"))]
    if runs:
        start, end = "<!-- runs:start -->", "<!-- runs:end -->"
        body = f"{start}\n{runs_table(runs)}\n{end}"
        text = replace_between(text, start, end, body)
        start, end = "<!-- slices:start -->", "<!-- slices:end -->"
        if start in text:
            text = replace_between(text, start, end, f"{start}\n{slices_table(runs)}\n{end}")
    doc.write_text(text)
    print(tab)


if __name__ == "__main__":
    main()
