#!/usr/bin/env bash
# The comparison run of issue 6: the same two backends behind kp5-proxy,
# nginx and HAProxy (one worker each, the proxy pinned to core 0, clients and
# backends on core 1). Each test alternates the three in short slices, the
# order rotating every round:
#   - HTTP/1.1 keep-alive requests/s and latency (wrk)
#   - HTTP/2 requests/s (h2load, cleartext prior knowledge)
#   - WebSocket echo relay: messages/s and round trip (kp5-loadgen, closed loop)
#   - the HTTP/1.1, HTTP/2 and WebSocket tests again with the proxy held to
#     40 % of a core (a CFS quota), so that the proxy is the bottleneck, not core 1
#   - memory per idle proxied WebSocket at 1,000 / 5,000 / 9,000 connections
#     (RSS of all the proxy's processes, minus its RSS before connecting)
#   - HTTPS keep-alive requests/s and TLS handshakes/s (wrk, Connection: close;
#     an ECDSA P-256 certificate made by openssl for the run)
#   - then the criterion micro-benchmarks (server selection, match-id
#     extraction, a 10,000-backend config), unless BENCH_CRITERION=0
# Results: bench/results/latest.json, and a copy of every run in
# bench/results/runs/; the tables and chart in docs/ come from
# bench/report.py and bench/criterion_report.py. Usage: bash bench/run.sh
# [ROUNDS] (default 12 slices of BENCH_SECONDS=3 per test and proxy; memory
# per idle WebSocket BENCH_IDLE_ROUNDS=3 rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-12}
DUR=${BENCH_SECONDS:-3}
IDLE_ROUNDS=${BENCH_IDLE_ROUNDS:-3}
H2_REQUESTS=${BENCH_H2_REQUESTS:-100000}
IDLE_SIZES=${BENCH_IDLE_SIZES:-"1000 5000 9000"}
W=/tmp/kp5-bench
mkdir -p "$W" bench/results

source bench/lib.sh
install_tools
ulimit -n 20000
cargo build --release -q -p kp5-proxy -p kp5-tests -p kp5-bench --bins
BIN=target/release

pids=()
declare -A PID
cleanup() {
  for p in "${pids[@]:-}" "${PID[@]:-}"; do kill "$p" 2>/dev/null || true; done
  [ -f $W/nginx.pid ] && kill "$(cat $W/nginx.pid)" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${CG:-}" ] && rmdir "$CG" 2>/dev/null || true
}
trap cleanup EXIT

# the backends on core 1, and the three proxies' configs (bench/lib.sh)
start_backends
write_configs

start() { # name → pid of the process to measure (all its processes are summed)
  case $1 in
    kp5) taskset -c 0 $BIN/kp5-proxy --config $W/kp5.toml >$W/kp5.log 2>&1 & echo $! ;;
    nginx) taskset -c 0 nginx -c $W/nginx.conf -g 'daemon off;' >$W/nginx.log 2>&1 & echo $! ;;
    haproxy) taskset -c 0 haproxy -f $W/haproxy.cfg >$W/haproxy.log 2>&1 & echo $! ;;
  esac
}
port() { case $1 in kp5) echo 8081 ;; nginx) echo 8082 ;; haproxy) echo 8083 ;; esac; }
h2port() { case $1 in kp5) echo 8081 ;; nginx) echo 8092 ;; haproxy) echo 8093 ;; esac; }
tlsport() { case $1 in kp5) echo 8441 ;; nginx) echo 8442 ;; haproxy) echo 8443 ;; esac; }
rss_kib() { # the process and its children
  local total=0
  for p in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '/VmRSS/ {print $2}' /proc/$p/status 2>/dev/null || echo 0)))
  done
  echo $total
}
cpu_ticks() {
  local total=0
  for p in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0)))
  done
  echo $total
}

# ticks to seconds, as a JSON number (bc would print ".86")
cpu_seconds() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b - a) / 100}'; }
# busy, total and stolen ticks of core 0 (the proxy's) and core 1 (the
# clients' and backends'), from /proc/stat: "busy0 total0 steal0 busy1 total1
# steal1"; total leaves out steal, the time the host ran something else
core_ticks() {
  awk '/^cpu[01] / {busy = $2 + $3 + $4 + $7 + $8; printf "%d %d %d ", busy, busy + $5 + $6, $9}' /proc/stat
}
# the busy share of each core between two core_ticks readings, and the share
# of the slice the host stole from each, as JSON fields
core_busy() { # before after
  echo "$1 $2" | awk '{
    t0 = $8 - $2; t1 = $11 - $5; s0 = $9 - $3; s1 = $12 - $6
    printf "\"core0Busy\":%.4f,\"core1Busy\":%.4f,\"core0Steal\":%.4f,\"core1Steal\":%.4f",
      ($7 - $1) / t0, ($10 - $4) / t1, s0 / (t0 + s0), s1 / (t1 + s1) }'
}

# The proxy-bound slices ("http1cap", "http2cap", "wscap"): the same tests with the
# proxy's processes held to BENCH_CAP_PERCENT of one core (default 40) by a
# CFS quota, so that the proxy, not core 1, is what runs out. A proxy joins
# the capped cgroup for its slice only and goes back to its own after.
# Skipped where no cgroup cpu controller can be written (not root, no
# cgroup v1 cpu hierarchy or v2 cpu controller).
CAP=${BENCH_CAP_PERCENT:-40}
CG=""
find_cpu_cgroups
if [ -n "$CG_MOUNT" ]; then CG=$(quota_cgroup kp5-bench-cap "$CAP") || CG=""; fi
[ -n "$CG" ] || echo "no writable cgroup cpu controller: the capped slices are skipped" >&2
declare -A HOME_CG
cap() { # pid: it and its children into the capped cgroup
  local p
  for p in $1 $(pgrep -P "$1" || true); do
    HOME_CG[$p]=$(awk -F: '$2 ~ /(^|,)cpu(,|$)/ || ($1 == "0" && $2 == "") {print $3; exit}' /proc/$p/cgroup)
    echo "$p" >$CG/cgroup.procs
  done
}
uncap() { # pid: back where each process was
  local p
  for p in $1 $(pgrep -P "$1" || true); do
    echo "$p" >"$CG_MOUNT${HOME_CG[$p]:-/}/cgroup.procs" 2>/dev/null || echo "$p" >$CG_MOUNT/cgroup.procs
  done
}
# the capped cgroup's throttled time so far, in ms
throttled_ms() { awk '/^throttled_time / {printf "%d", $2 / 1e6} /^throttled_usec / {printf "%d", $2 / 1e3}' $CG/cpu.stat; }

out=bench/results/latest.json
echo "[" >$out
first=1
emit() { if [ $first = 1 ]; then first=0; else echo "," >>$out; fi; echo "$1" >>$out; }
stop() { # the proxies are started in a subshell, so poll for the exit
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
  kill -9 "$1" 2>/dev/null || true
}

# The load of the HTTP/1.1, HTTP/2 and WebSocket slices, plain and capped alike
http1_load() { taskset -c 1 wrk -t1 -c50 -d"${DUR}s" --latency "http://127.0.0.1:$1/"; }
# wrk's requests/s and p99 ("Requests/sec: 35643.21", "99%    3.96ms")
wrk_rps() { awk '/Requests\/sec/ {print $2}'; }
wrk_p99() { awk '$1=="99%" {print $2}'; }
h2_load() { # port requests: 10 connections x 10 streams
  taskset -c 1 h2load -n "$2" -c 10 -m 10 "http://127.0.0.1:$1/" 2>&1 || true
}
# h2load's requests/s ("finished in 3.00s, 44205.50 req/s, ...")
h2_rps() { awk '/finished in/ {gsub(",","",$4); print $4}'; }
# and how long it took, in seconds ("finished in 2.26s", "850.12ms")
h2_secs() {
  awk '/finished in/ {v = $3; sub(",", "", v); d = 1
    if (v ~ /ms$/) d = 1e3; else if (v ~ /us$/) d = 1e6
    sub(/[mu]?s$/, "", v); printf "%.3f", v / d}'
}
ws_load() { # 200 connections over 20 matches, 64-byte messages, closed loop
  taskset -c 1 $BIN/kp5-loadgen --url "ws://127.0.0.1:$1/matches/{match}/ws" --connections 200 --matches 20 --mode closed --duration "$DUR" --size 64 | tail -1
}

# One slice of one test against one proxy (already running, its pid in $2).
slice() { # test name pid round
  local test=$1 name=$2 pid=$3 round=$4 p t0 t1 c0 c1 w h l rps p99
  p=$(port "$name")
  case $test in
    http1) # HTTP/1.1 keep-alive; the first round warms each proxy's backend connections for 1 s
      [ "$round" = 1 ] && { taskset -c 1 wrk -t1 -c50 -d1s "http://127.0.0.1:$p/" >/dev/null 2>&1 || true; }
      t0=$(cpu_ticks "$pid"); c0=$(core_ticks)
      w=$(http1_load "$p")
      t1=$(cpu_ticks "$pid"); c1=$(core_ticks)
      rps=$(echo "$w" | wrk_rps)
      p99=$(echo "$w" | wrk_p99)
      emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"http1\",\"rps\":$rps,\"p99\":\"$p99\",\"seconds\":$DUR,\"cpuSeconds\":$(cpu_seconds "$t0" "$t1"),$(core_busy "$c0" "$c1")}" ;;
    http2)
      c0=$(core_ticks)
      h=$(h2_load "$(h2port "$name")" "$H2_REQUESTS")
      c1=$(core_ticks)
      rps=$(echo "$h" | h2_rps)
      emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"http2\",\"rps\":${rps:-0},$(core_busy "$c0" "$c1")}" ;;
    https) # HTTPS keep-alive
      w=$(taskset -c 1 wrk -t1 -c50 -d"${DUR}s" --latency "https://127.0.0.1:$(tlsport "$name")/")
      rps=$(echo "$w" | wrk_rps)
      p99=$(echo "$w" | wrk_p99)
      emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"https\",\"rps\":${rps:-0},\"p99\":\"${p99:-0}\"}" ;;
    handshakes) # one TLS handshake per request (Connection: close)
      w=$(taskset -c 1 wrk -t1 -c50 -d"${DUR}s" -H "Connection: close" "https://127.0.0.1:$(tlsport "$name")/")
      rps=$(echo "$w" | wrk_rps)
      emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"handshakes\",\"rps\":${rps:-0}}" ;;
    http1cap | http2cap | wscap) # as http1, http2 and ws, the proxy held to CAP % of a core
      # (HTTP/2: half the plain slices' count of requests. Not h2load's
      # -D: nginx closes a connection after 1,000 requests, keepalive_requests,
      # and in -D mode h2load opens no new one, so nginx's slices stopped at
      # 10,000 requests)
      [ -n "$CG" ] || return 0
      cap "$pid"
      t0=$(cpu_ticks "$pid"); c0=$(core_ticks); h=$(throttled_ms)
      case $test in
        http1cap) w=$(http1_load "$p") ;;
        http2cap) w=$(h2_load "$(h2port "$name")" "$((H2_REQUESTS / 2))") ;;
        wscap) l=$(ws_load "$p") ;;
      esac
      t1=$(cpu_ticks "$pid"); c1=$(core_ticks); h=$(( $(throttled_ms) - h ))
      uncap "$pid"
      local secs=$DUR
      [ "$test" = http2cap ] && secs=$(echo "$w" | h2_secs)
      local common="\"seconds\":${secs:-0},\"capPercent\":$CAP,\"throttledMs\":$h,\"cpuSeconds\":$(cpu_seconds "$t0" "$t1"),$(core_busy "$c0" "$c1")"
      case $test in
        http1cap)
          rps=$(echo "$w" | wrk_rps)
          p99=$(echo "$w" | wrk_p99)
          emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"http1cap\",\"rps\":${rps:-0},\"p99\":\"${p99:-0}\",$common}" ;;
        http2cap)
          rps=$(echo "$w" | h2_rps)
          emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"http2cap\",\"rps\":${rps:-0},$common}" ;;
        wscap) emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"wscap\",\"report\":$l,$common}" ;;
      esac ;;
    ws) # WebSocket echo relay, 200 connections, 64-byte messages
      t0=$(cpu_ticks "$pid"); c0=$(core_ticks)
      l=$(ws_load "$p")
      t1=$(cpu_ticks "$pid"); c1=$(core_ticks)
      emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"ws\",\"report\":$l,\"cpuSeconds\":$(cpu_seconds "$t0" "$t1"),$(core_busy "$c0" "$c1")}" ;;
  esac
}

# Throughput and latency: the three proxies run side by side (an idle one
# costs nothing), and each test alternates them in short slices, the order
# rotating every round, so that a slow spell of this machine falls on the
# three alike instead of on one proxy's whole round; report.py pairs them by
# round.
PROXIES=(kp5 nginx haproxy)
for name in "${PROXIES[@]}"; do
  PID[$name]=$(start "$name")
  wait_port "$(port "$name")"
done
sleep 0.5
for test in http1 http2 https handshakes ws http1cap http2cap wscap; do
  for round in $(seq 1 "$ROUNDS"); do
    for k in 0 1 2; do
      name=${PROXIES[$(( (round - 1 + k) % 3 ))]}
      echo "$test round $round: $name"
      slice "$test" "$name" "${PID[$name]}" "$round"
    done
  done
done
for name in "${PROXIES[@]}"; do stop "${PID[$name]}"; done
PID=()

# Memory per idle WebSocket: a fresh process per size, alternating proxies.
for round in $(seq 1 "$IDLE_ROUNDS"); do
  for name in "${PROXIES[@]}"; do
    p=$(port $name)
    for n in $IDLE_SIZES; do
      echo "idle round $round: $name, $n"
      pid=$(start $name)
      wait_port "$p"
      sleep 0.5
      base=$(rss_kib $pid)
      fifo=$W/idle.out
      taskset -c 1 $BIN/kp5-loadgen --url "ws://127.0.0.1:$p/matches/{match}/ws" --connections $n --matches 100 --mode idle --duration 4 --sources 4 --connect-concurrency 500 >$fifo 2>&1 &
      lg=$!
      for _ in $(seq 1 600); do grep -q ready $fifo && break; sleep 0.05; done
      sleep 1
      held=$(rss_kib $pid)
      wait $lg || true
      connected=$(tail -1 $fifo | sed 's/.*"connected":\([0-9]*\).*/\1/')
      emit "{\"round\":$round,\"proxy\":\"$name\",\"test\":\"idle\",\"connections\":$n,\"connected\":${connected:-0},\"baseKiB\":$base,\"heldKiB\":$held}"
      stop $pid
      sleep 0.3
    done
  done
done
echo "]" >>$out
# every run is kept, named by the commit it measured ("+" when the code
# differed from it): the table of runs in docs/ pools runs of the same code.
# The last commit that changed more than results and docs: committing a
# run's results does not make the next run of that code look like new code.
code=$(git log -1 --format=%h --abbrev=7 -- . ':!bench/results' ':!docs' 2>/dev/null)
code=${code:-unknown}
git diff --quiet HEAD -- . ':!bench/results' ':!docs' 2>/dev/null || code="$code+"
mkdir -p bench/results/runs
n=$(find bench/results/runs -name '*.json' | wc -l)
cp $out "bench/results/runs/$(printf %02d $((n + 1)))-$(date -u +%F)-$code.json"
python3 bench/report.py $out
# the criterion micro-benchmarks and their tables (BENCH_CRITERION=0 skips)
if [ "${BENCH_CRITERION:-1}" = 1 ]; then
  cargo bench -q -p kp5-proxy --bench hot_path -- --warm-up-time 1 --measurement-time 2 >$W/criterion.log 2>&1
  python3 bench/criterion_report.py
fi
