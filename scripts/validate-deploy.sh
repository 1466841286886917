#!/usr/bin/env bash
# Offline validation of deploy/ and helm/ (CI runs it from scripts/test.sh):
# the Helm chart (lint, render with default and CI values, strict
# Kubernetes schema validation), the Prometheus config and alert rules
# (promtool check + unit tests), the Grafana dashboard's PromQL, and the
# shape of docker-compose.yml and the Dockerfile. The checks themselves are
# in scripts/validate_deploy.py; this script provides the tools:
#   - helm-python-sdk, kubernetes-validate, PyYAML: pip, into the venv
#     under target/tools that scripts/test.sh also uses for nats-server;
#   - promtool: Debian package prometheus (apt-get when missing).
# Needs the network only to install those. Exits non-zero on any problem.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TOOLS=$ROOT/target/tools
VENV=$TOOLS/venv

say() { echo "[deploy] $*"; }
die() { echo "[deploy] error: $*" >&2; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] || die "need root to apt-get install $* (or install it yourself)"
  say "apt-get install -y --no-install-recommends $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

if [ ! -x "$VENV/bin/python3" ]; then
  say "creating the tools venv in target/tools/venv"
  command -v python3 >/dev/null || apt_install python3 python3-venv
  mkdir -p "$TOOLS"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    apt_install python3-venv
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python3" -c 'import helm_python, yaml, kubernetes_validate' 2>/dev/null; then
  say "pip install helm-python-sdk kubernetes-validate PyYAML (into target/tools/venv)"
  "$VENV/bin/pip" install -q --disable-pip-version-check helm-python-sdk kubernetes-validate PyYAML
fi

PROMTOOL=${PROMTOOL:-$(command -v promtool || true)}
if [ -z "$PROMTOOL" ]; then
  say "no promtool: installing it (Debian package prometheus)"
  apt_install prometheus
  PROMTOOL=$(command -v promtool) || die "prometheus installed but no promtool"
fi
export PROMTOOL
say "$("$PROMTOOL" --version 2>&1 | head -n1)"

exec "$VENV/bin/python3" "$ROOT/scripts/validate_deploy.py"
