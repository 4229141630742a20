"""Prometheus side: rules checked and unit-tested with promtool, metric names cross-checked, and a real scrape.

- `promtool check rules` and `promtool test rules` on k8s/monitoring/rules.
- Every `rstar_*` metric named in the rules and the dashboards is one the code
  exports (rstar/metrics.py, trainer/controller.py).
- A real Prometheus server (Debian package) runs on loopback with the shipped
  scrape config (k8s/monitoring/prometheus/prometheus.yml). Debian's build has
  no Kubernetes service discovery, so the test swaps `kubernetes_sd_configs`
  for a file_sd file carrying the same `__meta_kubernetes_pod_*` labels; the
  config's relabelling (keep/drop by annotation, port rewrite, app/pod/namespace
  labels) runs unchanged. It scrapes a real SandboxService (`python -m
  sandbox_svc`) after one Execute call, and a process exposing the whole metric
  catalogue, loads the alert rules, and the test reads everything back through
  Prometheus's HTTP API.
Skips (with the reason) only where promtool/prometheus cannot be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "k8s" / "monitoring"
RULES = MON / "rules" / "rstar-alerts.yaml"
RULE_TESTS = MON / "rules" / "rstar-alerts.test.yaml"
PROM_CONFIG = MON / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((MON / "dashboards").glob("*.json"))


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed (scripts/ensure_tools.sh installs Debian's prometheus package; "
                    "it needs root or passwordless sudo)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- names


CATALOGUE_MODULES = ("rstar.metrics", "trainer.controller")


def catalogue() -> dict[str, object]:
    """Family name -> metric object, for every metric defined in the catalogue modules."""
    import importlib

    from prometheus_client.metrics import MetricWrapperBase

    out = {}
    for mod in CATALOGUE_MODULES:
        for obj in vars(importlib.import_module(mod)).values():
            if isinstance(obj, MetricWrapperBase):
                out[obj._name] = obj  # noqa: SLF001
    return out


def catalogue_samples() -> set[str]:
    """Every sample name the catalogue can export (families plus _total/_bucket/_sum/_count/_created)."""
    names = set()
    for family in catalogue().values():
        for m in family.describe():
            names.add(m.name)
            if m.type == "counter":
                names |= {m.name + "_total", m.name + "_created"}
            elif m.type == "histogram":
                names |= {m.name + s for s in ("_bucket", "_sum", "_count", "_created")}
    return names


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\brstar_[a-z0-9_]+", text))


def rule_exprs() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return "\n".join(r["expr"] + json.dumps(r.get("annotations", {})) for g in groups for r in g["rules"])


def dashboard_exprs() -> str:
    out = []
    for f in DASHBOARDS:
        board = json.loads(f.read_text())
        for p in board["panels"]:
            out += [t["expr"] for t in p.get("targets", [])]
        out += [json.dumps(v.get("query", "")) for v in board["templating"]["list"]]
    return "\n".join(out)


def test_rules_and_dashboards_only_name_exported_metrics():
    exported = catalogue_samples()
    assert "rstar_rpc_requests_total" in exported and "rstar_rpc_latency_seconds_bucket" in exported
    for what, text in (("rules", rule_exprs()), ("dashboards", dashboard_exprs())):
        names = referenced(text)
        assert names, what
        unknown = names - exported
        assert not unknown, f"{what} name metrics nobody exports: {sorted(unknown)}"


def test_dashboards_cover_the_whole_catalogue():
    families = set(catalogue())
    assert len(families) >= 30
    used = referenced(dashboard_exprs())
    missing = [f for f in sorted(families)
               if not any(u == f or re.fullmatch(re.escape(f) + r"(_total|_bucket|_sum|_count)", u) for u in used)]
    assert not missing, f"metrics on no dashboard: {missing}"


def test_dashboards_are_well_formed():
    uids = set()
    for f in DASHBOARDS:
        board = json.loads(f.read_text())
        assert board["uid"] not in uids and len(board["uid"]) <= 40
        uids.add(board["uid"])
        assert board["schemaVersion"] >= 36 and board["title"].startswith("rstar / ")
        assert board["templating"]["list"][0] == {
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1}
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for p in board["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
            if p["type"] != "row":
                assert p["targets"] and all(t["expr"] for t in p["targets"])
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert all('namespace="$namespace"' in t["expr"] for t in p["targets"]), p["title"]
    assert uids == {"rstar-overview", "rstar-services", "rstar-search", "rstar-evolution"}


# --------------------------------------------------------------------------- promtool


def test_promtool_check_rules():
    res = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 11 rules found" in res.stdout


def test_promtool_unit_tests_of_the_alerts():
    res = subprocess.run([tool("promtool"), "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                         timeout=120, cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    # every alert has at least one unit test
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert alerts == tested


def local_config(tmp: Path, targets: list[dict], interval: str = "1s") -> Path:
    """The shipped prometheus.yml with file_sd instead of kubernetes_sd, and the rules path made local."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    cfg["rule_files"] = [str(RULES)]
    (job,) = cfg["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    del job["kubernetes_sd_configs"]
    sd = tmp / "targets.json"
    sd.write_text(json.dumps(targets))
    job["file_sd_configs"] = [{"files": [str(sd)], "refresh_interval": "1s"}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_promtool_check_config(tmp_path):
    path = local_config(tmp_path, [])
    res = subprocess.run([tool("promtool"), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- real scrape

CATALOGUE_EXPORTER = r"""
import sys, time
import importlib
from prometheus_client.metrics import MetricWrapperBase
import rstar.metrics as m
# labelled metrics appear in the exposition only once a child exists: create one per metric
for mod in {modules!r}:
    for c in vars(importlib.import_module(mod)).values():
        if isinstance(c, MetricWrapperBase) and c._labelnames:
            c.labels(*["probe"] * len(c._labelnames))
port = m.start_metrics_server(0, host="127.0.0.1")
print(port, flush=True)
time.sleep(600)
"""


def meta(app: str, port: int, **over) -> dict:
    labels = {
        "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "rstar",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_namespace": "rstar-test",
        "__meta_kubernetes_pod_name": f"{app}-0",
    }
    labels.update(over)
    # like the pod SD: the address is the pod IP with the first container port; relabelling sets the annotated one
    return {"targets": ["127.0.0.1:1"], "labels": labels}


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(fn, timeout: float, what: str):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def sandbox_service(tmp_path):
    """A real SandboxService on loopback, after one Execute call with one ok and one timed-out program."""
    import grpc

    from rstar.v1 import sandbox_pb2, sandbox_pb2_grpc

    port, mport = free_port(), free_port()
    env = {**os.environ, "RSTAR_HOME": str(tmp_path / "home"), "OPENBLAS_NUM_THREADS": "1"}
    log = open(tmp_path / "sandbox.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sandbox_svc", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", str(mport), "--pool-size", "1", "--max-concurrent", "2"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)

        def serving():
            if proc.poll() is not None:
                raise RuntimeError("sandbox exited:\n" + (tmp_path / "sandbox.log").read_text()[-3000:])
            return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                health_pb2.HealthCheckResponse.SERVING

        wait_for(serving, 120, "sandbox SERVING")
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        resp = stub.Execute(sandbox_pb2.ExecuteRequest(
            programs=[sandbox_pb2.Program(code="print(6 * 7)"), sandbox_pb2.Program(code="while True:\n    pass\n")],
            limits=sandbox_pb2.Limits(wall_seconds=0.5)), timeout=60)
        assert resp.results[0].stdout.strip() == "42"
        assert resp.results[1].failure == sandbox_pb2.TIMEOUT
        channel.close()
        yield mport
    finally:
        stop(proc)
        log.close()


@pytest.mark.timeout(240)
def test_real_prometheus_scrapes_services_and_loads_rules(tmp_path, sandbox_service):
    prometheus = tool("prometheus")
    sandbox_mport = sandbox_service
    exporter = subprocess.Popen([sys.executable, "-c", CATALOGUE_EXPORTER.format(modules=CATALOGUE_MODULES)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    prom = None
    try:
        exporter_port = int(exporter.stdout.readline())
        targets = [
            meta("sandbox", sandbox_mport),
            meta("catalogue", exporter_port),
            # these three must be dropped by the shipped relabelling
            meta("not-annotated", exporter_port, __meta_kubernetes_pod_annotation_prometheus_io_scrape="false"),
            meta("other-app", exporter_port, __meta_kubernetes_pod_label_app_kubernetes_io_part_of="other"),
            meta("finished-job", exporter_port, __meta_kubernetes_pod_phase="Succeeded"),
        ]
        config = local_config(tmp_path, targets)
        web = free_port()
        base = f"http://127.0.0.1:{web}"
        prom_log = open(tmp_path / "prometheus.log", "w")
        prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
                                stdout=prom_log, stderr=subprocess.STDOUT)

        def targets_up():
            if prom.poll() is not None:
                raise RuntimeError((tmp_path / "prometheus.log").read_text()[-3000:])
            active = api(base, "/api/v1/targets", state="active")["activeTargets"]
            return active if len(active) == 2 and all(t["health"] == "up" for t in active) else None

        active = wait_for(targets_up, 60, "both targets up")
        by_app = {t["labels"]["app"]: t for t in active}
        assert set(by_app) == {"sandbox", "catalogue"}
        assert by_app["sandbox"]["scrapeUrl"] == f"http://127.0.0.1:{sandbox_mport}/metrics"
        assert by_app["sandbox"]["labels"]["namespace"] == "rstar-test"
        assert by_app["sandbox"]["labels"]["pod"] == "sandbox-0"
        dropped = api(base, "/api/v1/targets", state="dropped")["droppedTargets"]
        assert len(dropped) == 3

        def query(q):
            return api(base, "/api/v1/query", query=q)["result"]

        # the real sandbox's own counters, read back through Prometheus
        timeouts = wait_for(lambda: query('rstar_sandbox_executions_total{app="sandbox", outcome="timeout"}'), 30,
                            "sandbox timeout counter")
        assert float(timeouts[0]["value"][1]) >= 1
        assert timeouts[0]["metric"]["namespace"] == "rstar-test"
        ok = query('rstar_sandbox_executions_total{app="sandbox", outcome="ok"}')
        assert float(ok[0]["value"][1]) >= 1
        rpcs = query('rstar_rpc_requests_total{app="sandbox", service="sandbox", method="Execute", code="OK"}')
        assert rpcs and float(rpcs[0]["value"][1]) >= 1
        ready = query('rstar_service_ready{app="sandbox", service="sandbox"}')
        assert float(ready[0]["value"][1]) == 1
        assert query('up{app="sandbox"} == 1')

        # every metric the rules and dashboards name is a series Prometheus actually scraped
        names = set(api(base, "/api/v1/label/__name__/values"))
        wanted = referenced(rule_exprs()) | referenced(dashboard_exprs())
        assert not (wanted - names), f"never scraped: {sorted(wanted - names)}"

        # the alert rules load and evaluate without errors
        def rules_evaluated():
            groups = api(base, "/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if len(rules) == 11 and all(r.get("lastEvaluation", "").startswith("20") and
                                                     not r["lastEvaluation"].startswith("0001") for r in rules) \
                else None

        rules = wait_for(rules_evaluated, 30, "rules evaluated")
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        # nothing is down: the service-down alert is silent while the real sandbox is scraped
        assert not [a for a in api(base, "/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == "RstarServiceDown"]
    finally:
        if prom is not None:
            stop(prom)
        stop(exporter)


def test_docs_catalogue_lists_every_metric():
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    listed = set(re.findall(r"^\| `(rstar_[a-z0-9_]+)` \|", doc, re.M))
    want = set()
    for name, family in catalogue().items():
        (d,) = family.describe()
        want.add(name + "_total" if d.type == "counter" else name)
    assert listed == want, f"missing: {sorted(want - listed)}; stale: {sorted(listed - want)}"
