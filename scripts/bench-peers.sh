#!/usr/bin/env bash
# Runs kecho's benchmark suite with its peers (raw TCP, NATS, Zenoh) and writes Markdown, JSON and SVG plots.
#
#   scripts/bench-peers.sh [WORKLOAD] [extra kecho-bench arguments...]
#
# WORKLOAD defaults to `all`. Installs nats-server (Debian package) and strace if missing; needs apt-get and root,
# or both tools already installed. Every process is bounded by `timeout`. Results go to $OUT (default
# bench-results/) and the printed tables to $OUT/report.md.
set -euo pipefail

cd "$(dirname "$0")/.."
WORKLOAD="${1:-all}"
shift || true
OUT="${OUT:-bench-results}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-3600}"
RUN_TIMEOUT="${RUN_TIMEOUT:-1800}"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nats-server || ! need strace; then
    if need apt-get; then
        timeout 600 apt-get update
        timeout 600 apt-get install -y --no-install-recommends nats-server strace
    else
        echo "bench-peers: nats-server or strace missing and no apt-get; NATS or the syscall count will be skipped" >&2
    fi
fi

# The peers (zenoh especially) are heavy to build: at low priority, so that other work on the machine goes on.
timeout "$BUILD_TIMEOUT" nice -n 10 cargo build --release -p kecho-bench --features peers

mkdir -p "$OUT"
# The suite bounds each child process itself (--child-timeout) and kills nats-server when done; this bounds the whole.
timeout --kill-after=30 "$RUN_TIMEOUT" \
    "${CARGO_TARGET_DIR:-target}/release/kecho-bench" "$WORKLOAD" --out "$OUT" "$@" | tee "$OUT/report.md"
