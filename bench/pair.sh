#!/usr/bin/env bash
# Two proxies side by side, loaded at the same time, each held to
# BENCH_CAP_PERCENT (default 30) of core 0 by a CFS quota of its own: for
# measuring a change before and after, or one build against nginx or
# HAProxy. This machine's speed moves 10-15 % from one 3 s slice to the next,
# so alternating slices (bench/run.sh) need many rounds to show a few per
# cent; two proxies loaded at once see the same machine, and the ratio of
# their requests per round moves well under 1 %.
#
# Usage: bash bench/pair.sh A B [ROUNDS]
#   A, B: a kp5-proxy binary, or "nginx" or "haproxy" (not twice the same)
#   BENCH_PAIR_TEST=http2 (h2load -D, 10 connections x 10 streams; default)
#                  or http1 (wrk, 50 keep-alive connections)
# Prints each round's requests/s of both and B/A, then the median of B/A and
# the rounds B was ahead.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 ROUNDS=${3:-8}
TEST=${BENCH_PAIR_TEST:-http2} CAP=${BENCH_CAP_PERCENT:-30} DUR=${BENCH_SECONDS:-3}
[ "$A" != "$B" ] || [ -x "$A" ] || { echo "A and B must differ (or be kp5-proxy binaries)" >&2; exit 64; }
W=/tmp/kp5-pair
mkdir -p $W
BIN=target/release
source bench/lib.sh
install_tools
ulimit -n 20000
cargo build --release -q -p kp5-tests --bins

find_cpu_cgroups
[ -n "$CG_MOUNT" ] || { echo "no writable cgroup cpu controller" >&2; exit 1; }
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done
  [ -f $W/nginx.pid ] && kill "$(cat $W/nginx.pid)" 2>/dev/null || true
  wait 2>/dev/null || true
  rmdir $CG_MOUNT/kp5-pair-a $CG_MOUNT/kp5-pair-b 2>/dev/null || true
}
trap cleanup EXIT

start_backends
write_configs
# a second kp5-proxy on other ports
sed 's/8081/8181/; s/8441/8541/; s/9981/9982/' $W/kp5.toml >$W/kp5-b.toml

# starts one side (a or b) on core 0 in its capped cgroup; sets PORT_<side>
# and PID_<side>
start_side() { # side what
  local side=$1 what=$2 pid port
  case $what in
    nginx) taskset -c 0 nginx -c $W/nginx.conf -g 'daemon off;' >$W/nginx.log 2>&1 & pid=$!
      port=$([ "$TEST" = http2 ] && echo 8092 || echo 8082) ;;
    haproxy) taskset -c 0 haproxy -f $W/haproxy.cfg >$W/haproxy.log 2>&1 & pid=$!
      port=$([ "$TEST" = http2 ] && echo 8093 || echo 8083) ;;
    *) local conf=$W/kp5.toml
      [ "$side" = b ] && conf=$W/kp5-b.toml
      taskset -c 0 "$what" --config $conf >$W/kp5-$side.log 2>&1 & pid=$!
      port=$(grep -o '127.0.0.1:8[01]81' $conf | head -1 | cut -d: -f2) ;;
  esac
  pids+=($pid)
  wait_port "$port"
  local cg p
  cg=$(quota_cgroup kp5-pair-$side "$CAP")
  for p in $pid $(pgrep -P $pid || true); do echo $p >$cg/cgroup.procs; done
  eval "PORT_$side=$port PID_$side=$pid"
}
stop_side() { # side
  local pid
  eval "pid=\$PID_$1"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
}

load() { # port: requests/s
  case $TEST in
    http2) taskset -c 1 h2load -D "$DUR" -c 10 -m 10 "http://127.0.0.1:$1/" 2>&1 |
      awk '/finished in/ {gsub(",","",$4); print $4}' ;;
    http1) taskset -c 1 wrk -t1 -c50 -d"${DUR}s" "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}' ;;
  esac
}
# The two slots (ports, cgroups, which load starts first) are not quite
# alike: two copies of one build measured 0.978 with A always in slot a,
# and in some runs one slot favours whichever proxy holds it by several per
# cent. So the load started first alternates every round, half way the two
# swap slots, and the medians of both halves are printed: a change shows as
# a ratio above 1 in both.
half=$(((ROUNDS + 1) / 2))
: >$W/rounds.txt
for r in $(seq 1 "$ROUNDS"); do
  if [ "$r" = 1 ] || [ "$r" = $((half + 1)) ]; then
    if [ "$r" = 1 ]; then first=$A second=$B; else
      stop_side a; stop_side b; first=$B second=$A
    fi
    start_side a "$first"
    start_side b "$second"
    # warm both (backend connections, allocator)
    load $PORT_a >/dev/null; load $PORT_b >/dev/null
  fi
  if [ $((r % 2)) = 1 ]; then
    load $PORT_a >$W/a.rps & la=$!
    load $PORT_b >$W/b.rps & lb=$!
  else
    load $PORT_b >$W/b.rps & lb=$!
    load $PORT_a >$W/a.rps & la=$!
  fi
  wait $la $lb
  if [ "$r" -le "$half" ]; then ra=$(cat $W/a.rps) rb=$(cat $W/b.rps); else ra=$(cat $W/b.rps) rb=$(cat $W/a.rps); fi
  echo "$r $ra $rb" | awk '{printf "round %d: A %.0f req/s, B %.0f req/s, B/A %.3f\n", $1, $2, $3, $3 / $2}' | tee -a $W/rounds.txt
done
# the median of B/A over all rounds, and over each half (each slot's share)
summary() { # label: B/A values on stdin
  sort -n | awk -v label="$1" '{v[NR] = $1; if ($1 > 1) w++}
    END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "%s: B/A median %.3f, B ahead in %d of %d rounds (%.3f to %.3f)\n", label, m, w, NR, v[1], v[NR]}'
}
awk -v h=$half 'NR <= h {print $NF}' $W/rounds.txt | summary "A in slot a (rounds 1-$half)"
awk -v h=$half 'NR > h {print $NF}' $W/rounds.txt | summary "B in slot a (rounds $((half + 1))-$ROUNDS)"
awk '{print $NF}' $W/rounds.txt | summary "all rounds"
