#!/usr/bin/env bash
# The README's test command: installs what the tests need (Node.js for the
# Socket.IO clients and servers and the WSS client, redis-server for the
# cluster tests, curl for HTTPS over HTTP/2 and HTTP/1.1, chromium for the
# dashboard's browser test), builds
# every binary, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! have apt-get; then
    echo "tests/run.sh: please install: $*" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

missing=()
have node && have npm || missing+=(nodejs npm)
have redis-server || missing+=(redis-server)
have curl || missing+=(curl)
have chromium || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
(cd tests/node && npm ci --no-audit --no-fund --loglevel=error)

cargo build --workspace --bins --locked
cargo test --workspace --locked
