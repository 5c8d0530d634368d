# Helpers shared by bench/run.sh and bench/pair.sh. Sourced; they use $W
# (the work directory) and $BIN (the release binaries) of the script.

# installs what the comparison runs: nginx, HAProxy, wrk and h2load
install_tools() {
  have() { command -v "$1" >/dev/null 2>&1; }
  need=()
  for t in nginx haproxy wrk h2load; do have "$t" || need+=("$t"); done
  if [ ${#need[@]} -gt 0 ]; then
    pkgs=$(echo "${need[@]}" | sed 's/h2load/nghttp2-client/')
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
  fi
}

wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }

# two demo match servers (HTTP and WebSocket echo) on core 1, ports 3101
# and 3102; their pids are added to the array "pids"
start_backends() {
  local i
  for i in 1 2; do
    taskset -c 1 $BIN/kp5-demo-server --id b$i --listen 127.0.0.1:310$i >$W/b$i.log 2>&1 & pids+=($!)
  done
  wait_port 3101; wait_port 3102
}

# the certificate and the three proxies' configs, in $W: kp5-proxy on
# 8081 (TLS 8441, admin 9981), nginx on 8082 (HTTP/2 8092, TLS 8442),
# HAProxy on 8083 (HTTP/2 8093, TLS 8443)
write_configs() {
# a throwaway certificate for the TLS figures, the same for all three
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.local -addext subjectAltName=DNS:bench.local,IP:127.0.0.1 \
  -keyout $W/tls.key -out $W/tls.pem 2>/dev/null
cat $W/tls.pem $W/tls.key >$W/tls-combined.pem

cat >$W/kp5.toml <<EOF
[proxy]
listen = ["127.0.0.1:8081"]
worker_threads = 1
forwarded_headers = ["x-real-ip", "x-forwarded-for"]
[proxy.tls]
listen = ["127.0.0.1:8441"]
certs = [{ cert = "$W/tls.pem", key = "$W/tls.key" }]
[admin]
listen = "127.0.0.1:9981"
token = "bench"
[log]
level = "warn"
access_log = false
# match traffic on a match-aware pool, as in SPEC 3's example config: every
# client of a match goes to one server, and least_matches spreads the
# matches evenly (least_connections, counting connections that are still
# arriving, placed the 20 matches of the WebSocket test 11/9 at times);
# plain HTTP on least_connections, like nginx's least_conn and HAProxy's
# leastconn
[[routes]]
path_prefix = "/matches/"
pool = "matches"
[[routes]]
path_prefix = "/"
pool = "p"
[pools.matches]
strategy = "least_matches"
max_connections_per_server = 20000
max_matches_per_server = 20000
match_id = [{ from = "path", pattern = "/matches/{id}" }]
backends = [{ id = "m1", address = "127.0.0.1:3101" }, { id = "m2", address = "127.0.0.1:3102" }]
[pools.p]
strategy = "least_connections"
max_connections_per_server = 20000
backends = [{ id = "b1", address = "127.0.0.1:3101" }, { id = "b2", address = "127.0.0.1:3102" }]
EOF

cat >$W/nginx.conf <<EOF
worker_processes 1;
worker_rlimit_nofile 20000;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  upstream backends { least_conn; server 127.0.0.1:3101; server 127.0.0.1:3102; keepalive 256; }
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  server {
    listen 127.0.0.1:8092 http2;
    listen 127.0.0.1:8442 ssl;
    ssl_certificate $W/tls.pem;
    ssl_certificate_key $W/tls.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header Connection "";
    }
  }
  server {
    listen 127.0.0.1:8082;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Host \$host;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
EOF

cat >$W/haproxy.cfg <<EOF
global
  maxconn 9900
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 3600s
  timeout server 3600s
  timeout tunnel 3600s
  option http-keep-alive
  option forwardfor
frontend fe
  bind 127.0.0.1:8083
  bind 127.0.0.1:8093 proto h2
  bind 127.0.0.1:8443 ssl crt $W/tls-combined.pem alpn http/1.1
  http-request set-header X-Real-IP %[src]
  default_backend be
backend be
  balance leastconn
  http-reuse always
  server b1 127.0.0.1:3101 maxconn 10000
  server b2 127.0.0.1:3102 maxconn 10000
EOF
}

# CG_MOUNT: where a writable cgroup cpu controller is mounted (the cgroup v1
# cpu hierarchy, or v2 with the cpu controller), or empty
find_cpu_cgroups() {
  CG_MOUNT=""
  if [ -w /sys/fs/cgroup/cpu/cgroup.procs ] && [ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    CG_MOUNT=/sys/fs/cgroup/cpu
  elif grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null && [ -w /sys/fs/cgroup/cgroup.procs ]; then
    CG_MOUNT=/sys/fs/cgroup
  fi
}

# makes cgroup NAME under CG_MOUNT, its processes held to PERCENT of one core
# (a CFS quota per 10 ms), and prints its path; fails where it cannot
quota_cgroup() { # name percent
  local cg=$CG_MOUNT/$1
  mkdir -p "$cg" || return 1
  if [ -f "$cg/cpu.cfs_quota_us" ]; then
    echo 10000 >"$cg/cpu.cfs_period_us" && echo $(($2 * 100)) >"$cg/cpu.cfs_quota_us" || return 1
  else
    echo "$(($2 * 100)) 10000" >"$cg/cpu.max" || return 1
  fi
  echo "$cg"
}
