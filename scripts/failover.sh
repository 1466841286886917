#!/usr/bin/env bash
# Failover figures: kill -9 the room node that owns the busiest rooms, again
# and again, while correct clients keep sending, and report how long its
# rooms go unserved (p50/p99 over the runs) plus the fault checker's verdict
# (no acknowledged message lost, duplicated or reordered).
#
#   ./scripts/failover.sh            # 30 runs
#   ./scripts/failover.sh 50         # 50 runs
#
# Runs the ignored test `kill9_of_the_busiest_room_node_repeated` of
# tests/tests/faults.rs through ./scripts/test.sh (same set-up: private
# nats-server, Postgres), release build so the figures are not those of a
# debug binary. The cluster uses a 3 s node TTL (CHAT_NODE_TTL_MS), which
# bounds how fast a dead node's rooms can move.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=${1:-${CHAT_FAILOVER_RUNS:-30}}
case "$runs" in
  '' | *[!0-9]*) echo "usage: $0 [runs]  (runs must be a positive number)" >&2; exit 64 ;;
esac
[ "$runs" -gt 0 ] || { echo "runs must be at least 1" >&2; exit 64; }

export CHAT_FAILOVER_RUNS=$runs
log=target/failover-$(date +%Y%m%d-%H%M%S).log
mkdir -p target
echo "[failover] $runs kill -9 runs; full output in $log"
./scripts/test.sh --release -p chat-tests --test faults -- \
  --ignored --exact kill9_of_the_busiest_room_node_repeated --nocapture 2>&1 |
  tee "$log" | grep -E '^\[setup\]|failover run|failover figures|fault figures|test result|panicked|Error'
