#!/usr/bin/env python3
"""Offline checks of everything under deploy/ and helm/ (run by
scripts/validate-deploy.sh, which installs the tools first).

No cluster, no Docker engine, no network:

- the Helm chart is linted (strict) and rendered with default values and
  with helm/chat-cluster/ci/ci-values.yaml; every rendered manifest is
  validated against the Kubernetes schemas in strict mode (oldest and newest
  supported Kubernetes); values that break values.schema.json are refused;
- the Prometheus Operator resources (not in those schemas) are checked
  here: the PrometheusRule's rules go through promtool, the ServiceMonitors
  must name ports the Services have;
- the alert rules are checked and unit-tested with promtool, and the
  chart's copy must equal deploy/prometheus/alerts.yml;
- every PromQL expression of the Grafana dashboard goes through promtool;
- every chat_* metric the dashboard and the rules use is registered in a
  metrics.rs and documented in docs/OPERATIONS.md;
- docker-compose.yml and the Dockerfile are checked for the shape they must
  have (services, mounted files, scrape targets, targets, non-root users).

Exits non-zero with every problem listed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "chat-cluster"
DEPLOY = ROOT / "deploy"
OUT = ROOT / "target" / "deploy-check"
PROMTOOL = os.environ.get("PROMTOOL", "promtool")
KUBE_VALIDATE = os.environ.get(
    "KUBERNETES_VALIDATE", str(Path(sys.executable).parent / "kubernetes-validate")
)
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest the validator knows.
KUBE_VERSIONS = ["1.30.0", "1.37.0"]
# Kinds that come from CRDs, checked here instead of by kubernetes-validate.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

problems: list[str] = []


def say(msg: str) -> None:
    print(f"[deploy] {msg}", flush=True)


def problem(msg: str) -> None:
    problems.append(msg)
    print(f"[deploy] FAIL: {msg}", flush=True)


def run(cmd: list[str], what: str) -> bool:
    """Runs a checker; its output is shown only when it fails."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        problem(f"{what}: exit {res.returncode}\n{res.stdout}{res.stderr}")
        return False
    return True


# ------------------------------------------------------------------ chart


def check_chart() -> None:
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    ci_values = yaml.safe_load((CHART / "ci" / "ci-values.yaml").read_text())
    sets = {"default": None, "ci": ci_values}
    for name, values in sets.items():
        report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
        bad = [m for m in report["messages"] if m["severity"] >= 2] + [
            {"path": "", "error": e} for e in report["errors"]
        ]
        for m in bad:
            problem(f"helm lint ({name} values): {m['path']}: {m['error']}")
        if not bad:
            say(f"helm lint --strict ({name} values): ok")
        try:
            rendered = chart.render(values, name="chat", namespace="chat")
        except helm.HelmError as e:
            problem(f"helm render ({name} values): {e}")
            continue
        check_rendered(name, rendered)

    # The schema must refuse what the binaries would refuse.
    for bad_values, why in [
        ({"logFormat": "xml"}, "an unknown log format"),
        ({"gateway": {"config": {"chat_listen": "x"}}}, "a setting not named CHAT_*"),
        ({"roomNode": {"replica": 3}}, "a misspelt key"),
        ({"nodeTtlMs": 500}, "CHAT_NODE_TTL_MS below 2000"),
        ({"secrets": {"apiKey": "short"}}, "an API key under 16 characters"),
    ]:
        try:
            chart.render(bad_values, name="chat", namespace="chat")
            problem(f"values.schema.json accepts {why}: {bad_values}")
        except helm.HelmError:
            pass
    say("values.schema.json refuses bad values: ok")


def check_rendered(set_name: str, rendered: dict[str, str]) -> None:
    out = OUT / set_name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    native: list[Path] = []
    docs: list[dict] = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            if "WARNING" in text and set_name == "ci":
                problem("NOTES.txt warns about authentication with ci values")
            continue
        for i, doc in enumerate(yaml.safe_load_all(text)):
            if not doc:
                continue
            docs.append(doc)
            path = out / f"{Path(template).stem}-{i}-{doc['kind']}.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            if doc["kind"] not in CRD_KINDS:
                native.append(path)
    kinds = sorted({d["kind"] for d in docs})
    say(f"rendered {len(docs)} manifests ({set_name} values): {', '.join(kinds)}")
    for version in KUBE_VERSIONS:
        if run(
            [KUBE_VALIDATE, "--strict", "--quiet", "-k", version, *map(str, native)],
            f"kubernetes-validate --strict -k {version} ({set_name} values)",
        ):
            say(f"kubernetes-validate --strict -k {version} ({set_name} values): ok")
    check_semantics(set_name, docs, out)


def check_semantics(set_name: str, docs: list[dict], out: Path) -> None:
    """What schemas cannot see: names that must match across objects."""
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
    configmaps = {d["metadata"]["name"] for d in by_kind.get("ConfigMap", [])}
    for sts in by_kind.get("StatefulSet", []):
        if sts["spec"]["serviceName"] not in services:
            problem(f"{set_name}: StatefulSet serviceName names no Service")
        elif services[sts["spec"]["serviceName"]]["spec"].get("clusterIP") != "None":
            problem(f"{set_name}: the room-node Service is not headless")
        env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
        if env.get("CHAT_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get(
            "fieldPath"
        ) != "metadata.name":
            problem(f"{set_name}: CHAT_NODE_ID is not the pod name")
        # Pod name = node id: [A-Za-z0-9_-]{1,64}.
        pod = f"{sts['metadata']['name']}-{sts['spec']['replicas'] - 1}"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", pod):
            problem(f"{set_name}: pod name {pod} is not a valid node id")
    for workload in by_kind.get("Deployment", []) + by_kind.get("StatefulSet", []):
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                if ref and ref not in configmaps:
                    problem(f"{set_name}: {workload['kind']} reads missing ConfigMap {ref}")
            grace = spec["terminationGracePeriodSeconds"]
            drain = int(next(
                cm["data"]["CHAT_SHUTDOWN_GRACE_SECS"]
                for cm in by_kind["ConfigMap"]
                if cm["metadata"]["name"] == c["envFrom"][0]["configMapRef"]["name"]
            ))
            pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            if grace <= pre + drain:
                problem(
                    f"{set_name}: {workload['kind']} terminationGracePeriodSeconds {grace} "
                    f"is not above preStop {pre} + drain {drain}"
                )
    for sm in by_kind.get("ServiceMonitor", []):
        want = sm["spec"]["selector"]["matchLabels"]
        matched = [
            s for s in services.values()
            if all(s["metadata"]["labels"].get(k) == v for k, v in want.items())
        ]
        if not matched:
            problem(f"{set_name}: ServiceMonitor {sm['metadata']['name']} selects no Service")
        for ep in sm["spec"]["endpoints"]:
            if not any(p.get("name") == ep["port"] for s in matched for p in s["spec"]["ports"]):
                problem(f"{set_name}: ServiceMonitor port {ep['port']} is on no selected Service")
    for rule in by_kind.get("PrometheusRule", []):
        path = out / "prometheusrule-rules.yml"
        path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
        if run([PROMTOOL, "check", "rules", str(path)], f"{set_name}: PrometheusRule rules"):
            say(f"promtool check rules on the rendered PrometheusRule ({set_name}): ok")


# ------------------------------------------------------------------ Prometheus


def check_prometheus() -> None:
    alerts = DEPLOY / "prometheus" / "alerts.yml"
    copy = CHART / "files" / "alerts.yml"
    if alerts.read_bytes() != copy.read_bytes():
        problem(
            "helm/chat-cluster/files/alerts.yml differs from deploy/prometheus/alerts.yml: "
            "cp deploy/prometheus/alerts.yml helm/chat-cluster/files/alerts.yml"
        )
    else:
        say("chart rules are a copy of deploy/prometheus/alerts.yml: ok")
    if run([PROMTOOL, "check", "rules", str(alerts)], "promtool check rules"):
        say("promtool check rules deploy/prometheus/alerts.yml: ok")
    if run(
        [PROMTOOL, "check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")],
        "promtool check config",
    ):
        say("promtool check config deploy/prometheus/prometheus.yml: ok")
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
    if not tests:
        problem("no alert unit tests in deploy/prometheus/tests")
    if run([PROMTOOL, "test", "rules", *map(str, tests)], "promtool test rules"):
        say(f"promtool test rules ({len(tests)} file(s)): ok")


# ------------------------------------------------------------------ Grafana


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    found = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    found.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


def check_dashboards() -> list[str]:
    exprs_all: list[str] = []
    files = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    if not files:
        problem("no dashboard in deploy/grafana/dashboards")
    for f in files:
        dash = json.loads(f.read_text())
        exprs = dashboard_exprs(dash)
        if not exprs:
            problem(f"{f.name}: no PromQL expressions")
            continue
        ids = [p["id"] for p in dash["panels"]]
        if len(ids) != len(set(ids)):
            problem(f"{f.name}: duplicate panel ids")
        # Grafana's interval variables are not PromQL; any duration stands in.
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr_{i}", "expr": re.sub(
                r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}", "5m", e)}
            for i, (_, e) in enumerate(exprs)
        ]}]}
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as tmp:
            yaml.safe_dump(rules, tmp, sort_keys=False)
        if run([PROMTOOL, "check", "rules", tmp.name], f"{f.name}: PromQL"):
            say(f"{f.name}: {len(exprs)} PromQL expressions pass promtool: ok")
        os.unlink(tmp.name)
        exprs_all += [e for _, e in exprs]
    return exprs_all


# ------------------------------------------------------------------ metric names


def check_metric_names(exprs: list[str]) -> None:
    registered = set()
    for f in [ROOT / "gateway" / "src" / "metrics.rs", ROOT / "room-node" / "src" / "metrics.rs"]:
        text = f.read_text()
        for kind, name in re.findall(r"register_(\w+?)!\(\s*\"(chat_\w+)\"", text):
            registered.add(name)
            if "histogram" in kind:
                registered |= {name + "_bucket", name + "_sum", name + "_count"}
    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = set(re.findall(r"\bchat_[a-z0-9_]+", "\n".join(exprs)))
    used |= {
        m for r in yaml.safe_load(rules)["groups"][0]["rules"]
        for m in re.findall(r"\bchat_[a-z0-9_]+", r["expr"])
    }
    for name in sorted(used):
        if name not in registered:
            problem(f"{name} is used by the dashboard or rules but registered by no metrics.rs")
        # A histogram's series are documented under the histogram's name.
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base not in registered:
            base = name
        if f"`{base}" not in ops:
            problem(f"{base} is not documented in docs/OPERATIONS.md")
    for name in sorted(n for n in registered if not n.endswith(("_bucket", "_sum", "_count"))):
        if f"`{name}" not in ops:
            problem(f"metric {name} is not documented in docs/OPERATIONS.md")
    say(f"{len(used)} metric names used by dashboard and rules are registered and documented: ok")


# ------------------------------------------------------------------ compose, Dockerfile


def check_compose() -> None:
    path = DEPLOY / "docker-compose.yml"
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    gateways = [s for s in services if s.startswith("gateway-")]
    nodes = [s for s in services if s.startswith("room-node-")]
    for need in ["nats", "postgres", "prometheus", "grafana"]:
        if need not in services:
            problem(f"docker-compose.yml: no {need} service")
    if len(gateways) != 2 or len(nodes) != 3:
        problem(f"docker-compose.yml: want 2 gateways and 3 room nodes, got {gateways} {nodes}")
    node_ids = [services[n]["environment"].get("CHAT_NODE_ID") for n in nodes]
    if len(set(node_ids)) != len(nodes):
        problem(f"docker-compose.yml: room nodes need distinct CHAT_NODE_IDs: {node_ids}")
    m = re.match(r"nats:(\d+)\.(\d+)", services["nats"]["image"])
    if not m or (int(m[1]), int(m[2])) < (2, 10):
        problem("docker-compose.yml: NATS must be 2.10 or newer")
    if "-js" not in services["nats"].get("command", []):
        problem("docker-compose.yml: NATS needs JetStream (-js)")
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                if not (DEPLOY / src).exists():
                    problem(f"docker-compose.yml: {name} mounts missing {src}")
        build = svc.get("build")
        if build:
            if not (DEPLOY / build["context"] / build["dockerfile"]).exists():
                problem(f"docker-compose.yml: {name} builds from a missing Dockerfile")
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t.split(":")[0]
        for job in prom["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    for s in gateways + nodes:
        if s not in targets:
            problem(f"prometheus.yml does not scrape {s}")
    prov = DEPLOY / "grafana" / "provisioning"
    if not list((prov / "dashboards").glob("*.yml")) or not list((prov / "datasources").glob("*.yml")):
        problem("grafana provisioning lacks a dashboard provider or a data source")
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        if run([docker, "compose", "-f", str(path), "config", "--quiet"], "docker compose config"):
            say("docker compose config: ok")
    say("docker-compose.yml: services, mounts, scrape targets: ok")


def check_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    names = [s[1] for s in stages]
    for target in ["gateway", "room-node"]:
        if target not in names:
            problem(f"Dockerfile: no target {target}")
    # Each final stage runs as a non-root user.
    for block in re.split(r"^FROM\s", text, flags=re.M)[1:]:
        head = block.split("\n", 1)[0]
        if re.search(r"\sAS\s+(gateway|room-node)\b", " " + head, re.I):
            users = re.findall(r"^USER\s+(\S+)", block, re.M)
            if not users or users[-1].split(":")[0] in ("root", "0"):
                problem(f"Dockerfile: stage {head.strip()} does not run as a non-root user")
    if "--locked" not in text:
        problem("Dockerfile: cargo build without --locked")
    say("Dockerfile: targets gateway and room-node, non-root: ok")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    check_prometheus()
    exprs = check_dashboards()
    check_metric_names(exprs)
    check_chart()
    check_compose()
    check_dockerfile()
    if problems:
        say(f"{len(problems)} problem(s)")
        return 1
    say("everything checks out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
