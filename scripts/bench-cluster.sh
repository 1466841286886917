#!/usr/bin/env bash
# Runs one chat-load measurement the way docs/BENCHMARKS.md describes:
# the whole server side (a private Postgres, a private nats-server, one
# room node, one gateway; release builds) pinned to one core, the load tool
# pinned to another.
#
#   scripts/bench-cluster.sh OUT_DIR SCENARIO [chat-load flags...]
#
# Server settings come from the environment: every CHAT_* variable you
# export (e.g. CHAT_RATE_LIMIT_PER_SEC=0) reaches both servers and is
# recorded in the results with --server-setting. Also:
#   SERVER_CPU=0 LOAD_CPU=1   cores for the server side and the tool
#   PG_FSYNC=on               Postgres fsync (on: every ack is durable)
#   PG_OPTS="-c k=v ..."      more Postgres settings (e.g. to log autovacuum)
#   KEEP=1                    keep the work directory (logs) afterwards
#   SERVER_LOG=warn           RUST_LOG of both servers (e.g. to time a split)
#   BIN=target/release        where the three binaries are (to compare builds)
#   CLIENT_NETNS=1            run chat-load on a host of its own: a network
#                             namespace joined to the servers by a veth pair
#                             (10.250.0.1 the servers' side, 10.250.1.x the
#                             tool's), each side's packet receive work steered
#                             to its own core (RPS), as between two machines.
#                             On loopback (the default) the kernel does a
#                             packet's receive work on the core that sent it:
#                             the tool's on the server core, the servers' on
#                             the tool's core. On this VM the two came out
#                             even (docs/BENCHMARKS.md, "Loopback or two
#                             hosts").
# Needs: cargo build --release --workspace --bins; nats-server (>= 2.10)
# at target/tools/venv/bin/nats-server (./scripts/test.sh installs it) or
# NATS_SERVER; Postgres binaries under /usr/lib/postgresql; root (for
# runuser, to raise the file-descriptor limit, and for CLIENT_NETNS, ip).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
[ $# -ge 2 ] || { sed -n '2,22p' "$0"; exit 64; }
OUT=$1
shift

SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PG_FSYNC=${PG_FSYNC:-on}
NATS_SERVER=${NATS_SERVER:-$ROOT/target/tools/venv/bin/nats-server}
BIN=${BIN:-$ROOT/target/release}
for b in chat-gateway chat-room-node chat-load; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: cargo build --release --workspace --bins" >&2; exit 1; }
done
[ -x "$NATS_SERVER" ] || { echo "missing $NATS_SERVER (./scripts/test.sh installs it)" >&2; exit 1; }
PGBIN=$(dirname "$(ls -1 /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Enough descriptors for 100,000+ connections on both sides of loopback.
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d /tmp/chat-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  local rc=$?
  # Newest first (gateway, room node, NATS), each given time to drain:
  # stopping NATS under a draining node made it wait out its grace.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    p=${PIDS[i]}
    kill "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  if [ -n "${NETNS:-}" ]; then
    ip netns del "$NETNS" 2>/dev/null || true # takes its end of the veth pair, and so the pair
  fi
  if [ -f "$WORK/pg/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ "${KEEP:-}" = 1 ]; then echo "[bench] logs kept in $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT

PG_PORT=$(free_port)
NATS_PORT=$(free_port)
GW_PORT=$(free_port)
ADMIN_PORT=$(free_port)

echo "[bench] private Postgres on :$PG_PORT (fsync=$PG_FSYNC), pinned to core $SERVER_CPU"
mkdir -p "$WORK/pg" && chown postgres:postgres "$WORK/pg" && chmod 700 "$WORK/pg"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -A trust -U postgres --no-sync >"$WORK/initdb.log" 2>&1
taskset -c "$SERVER_CPU" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -w -l "$WORK/pg/server.log" \
  -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c fsync=$PG_FSYNC -c max_connections=200 ${PG_OPTS:-}" start >/dev/null
PG_PID=$(head -n1 "$WORK/pg/postmaster.pid")
DB=bench_$(date +%s)
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE $DB"

echo "[bench] nats-server on :$NATS_PORT"
taskset -c "$SERVER_CPU" "$NATS_SERVER" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
NATS_PID=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$NATS_PORT") 2>/dev/null && break; sleep 0.1; done

# Where the gateway listens and how chat-load is started: on loopback, or
# (CLIENT_NETNS=1) across a veth pair from a namespace of its own.
GW_HOST=127.0.0.1
LOAD_NS=()
LOAD_SRC=()
if [ "${CLIENT_NETNS:-}" = 1 ]; then
  NETNS=chatbench$$
  HOST_IF=cb$$h
  CLIENT_IF=cb$$c
  GW_HOST=10.250.0.1
  ip netns add "$NETNS"
  ip link add "$HOST_IF" type veth peer name "$CLIENT_IF"
  ip link set "$CLIENT_IF" netns "$NETNS"
  ip addr add "$GW_HOST/16" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  # 64 client addresses: 500 connections each (chat-load's default per
  # source), 32,000 in all, past the descriptor cap of one process here.
  for i in $(seq 1 64); do echo "addr add 10.250.1.$i/16 dev $CLIENT_IF"; done | ip -n "$NETNS" -batch -
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" link set "$CLIENT_IF" up
  # Receive Packet Steering: what arrives for the servers is processed on
  # the server core, what arrives for the tool on the tool's core.
  printf '%x' $((1 << SERVER_CPU)) >"/sys/class/net/$HOST_IF/queues/rx-0/rps_cpus"
  ip netns exec "$NETNS" sh -c "printf '%x' $((1 << LOAD_CPU)) >/sys/class/net/$CLIENT_IF/queues/rx-0/rps_cpus"
  LOAD_NS=(ip netns exec "$NETNS")
  # Dev auth off loopback must be asked for; this address is the veth's,
  # reachable only from the namespace made above.
  export CHAT_DEV_AUTH_PUBLIC=true
  LOAD_SRC=(--source-base 10.250.1.1)
  echo "[bench] chat-load in network namespace $NETNS (veth $HOST_IF/$CLIENT_IF, RPS: servers' side core $SERVER_CPU, tool's side core $LOAD_CPU)"
fi

export CHAT_NATS_URL=nats://127.0.0.1:$NATS_PORT
export CHAT_SUBJECT_PREFIX=bench
SETTINGS=$(env | grep -E '^CHAT_' | grep -vE '^CHAT_(NATS_URL|SUBJECT_PREFIX|JWT_SECRET|API_KEY|DATABASE_URL)=' | sort | paste -sd, - || true)

echo "[bench] room node, admin :$ADMIN_PORT"
CHAT_NODE_ID=bench-node CHAT_ADMIN_LISTEN=127.0.0.1:$ADMIN_PORT \
  CHAT_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/$DB RUST_LOG="${SERVER_LOG:-warn}" \
  taskset -c "$SERVER_CPU" "$BIN/chat-room-node" >"$WORK/node.log" 2>&1 &
PIDS+=($!)
NODE_PID=$!
echo "[bench] gateway on :$GW_PORT"
CHAT_LISTEN=$GW_HOST:$GW_PORT CHAT_DEV_AUTH=true RUST_LOG="${SERVER_LOG:-warn}" \
  taskset -c "$SERVER_CPU" "$BIN/chat-gateway" >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
GW_PID=$!

ready() { curl -fsS -o /dev/null "http://$1/readyz" 2>/dev/null; }
for _ in $(seq 300); do ready "127.0.0.1:$ADMIN_PORT" && ready "$GW_HOST:$GW_PORT" && break; sleep 0.1; done
ready "$GW_HOST:$GW_PORT" || { tail -n 20 "$WORK/gateway.log" "$WORK/node.log" >&2; exit 1; }

echo "[bench] server pids: gateway $GW_PID, room node $NODE_PID, nats $NATS_PID, postmaster $PG_PID; settings: ${SETTINGS:-defaults}"
NOTE="server side (gateway, room node, nats-server, Postgres fsync=$PG_FSYNC) on core $SERVER_CPU, chat-load on core $LOAD_CPU; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
if [ -n "${NETNS:-}" ]; then
  NOTE="$NOTE; chat-load in its own network namespace over a veth pair, each side's receive work on its own core (RPS)"
else
  NOTE="$NOTE; over loopback"
fi
mkdir -p "$OUT"
set +e
"${LOAD_NS[@]}" taskset -c "$LOAD_CPU" "$BIN/chat-load" "$@" "${LOAD_SRC[@]}" \
  --url "ws://$GW_HOST:$GW_PORT/ws" \
  --gateway-pid "$GW_PID" --node-pid "$NODE_PID" \
  --server-pid "$GW_PID,$NODE_PID,$NATS_PID,$PG_PID" --server-core "$SERVER_CPU" \
  ${SETTINGS:+--server-setting "$SETTINGS"} \
  --note "$NOTE" --out "$OUT"
rc=$?
set -e
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/node-metrics.txt" 2>/dev/null || true
curl -fsS "http://$GW_HOST:$GW_PORT/metrics" >"$OUT/gateway-metrics.txt" 2>/dev/null || true
exit "$rc"
