"""Generate the Grafana dashboards and the PrometheusRule from one source.

    python k8s/monitoring/generate.py          # rewrite the generated files
    python k8s/monitoring/generate.py --check  # exit 1 if any is stale (the tests run this)

Writes
- k8s/monitoring/dashboards/rstar-*.json: Grafana dashboards (schemaVersion 39, a
  `datasource` variable of type prometheus), shipped as ConfigMaps labelled
  `grafana_dashboard: "1"` for Grafana's dashboard sidecar;
- k8s/components/prometheus-operator/prometheusrule.yaml: rules/rstar-alerts.yaml
  wrapped in a PrometheusRule for the Prometheus operator.

Every metric a panel queries is in rstar/metrics.py or trainer/controller.py;
tests/test_prometheus.py checks that, and that a real Prometheus scrape exposes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DASHBOARDS = HERE / "dashboards"
RULES = HERE / "rules" / "rstar-alerts.yaml"
PROMETHEUS_RULE = HERE.parent / "components" / "prometheus-operator" / "prometheusrule.yaml"

DS = {"type": "prometheus", "uid": "${datasource}"}


class Board:
    def __init__(self, uid: str, title: str, description: str, variables: list[dict] | None = None):
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables or []
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []})
        self.y += 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def panel(self, kind: str, title: str, targets: list[tuple[str, str]], unit: str = "short", w: int = 8,
              h: int = 8, description: str = "", stack: bool = False, options: dict | None = None,
              instant: bool = False) -> None:
        defaults: dict = {"unit": unit}
        if kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 0,
                                  "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                                  "showPoints": "never"}
        panel = {
            "type": kind,
            "title": title,
            "description": description,
            "id": self._id(),
            "datasource": DS,
            "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options or {},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                 **({"instant": True, "format": "table"} if instant else {"range": True})}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        self.panels.append(panel)

    def ts(self, title, targets, **kw):
        self.panel("timeseries", title, targets, **kw)

    def stat(self, title, targets, **kw):
        kw.setdefault("w", 6)
        kw.setdefault("h", 4)
        self.panel("stat", title, targets, **kw)

    def table(self, title, targets, **kw):
        self.panel("table", title, targets, instant=True, **kw)

    def json(self) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["rstar"],
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "timezone": "browser",
            "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["rstar"], "title": "rstar", "asDropdown": True}],
            "templating": {"list": [
                {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                 "current": {}, "hide": 0, "refresh": 1},
                {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DS,
                 "query": {"query": "label_values(rstar_service_ready, namespace)", "refId": "ns"},
                 "definition": "label_values(rstar_service_ready, namespace)",
                 "refresh": 2, "includeAll": False, "multi": False, "current": {}, "hide": 0},
                *self.variables,
            ]},
            "panels": self.panels,
        }


NS = 'namespace="$namespace"'


def overview() -> Board:
    b = Board("rstar-overview", "rstar / Overview",
              "Health, traffic, errors and latency of the four rstar services, and evolution at a glance.")
    b.row("Health")
    for app in ("policy", "ppm", "sandbox", "search"):
        b.stat(f"{app}: ready replicas", [(f'sum(rstar_service_ready{{{NS}, service="{app}"}})', app)],
               description=f"{app} replicas reporting gRPC health SERVING.")
    b.row("Traffic")
    b.ts("RPCs/s by service", [(f"sum by (service) (rate(rstar_rpc_requests_total{{{NS}}}[$__rate_interval]))",
                                "{{service}}")], unit="reqps")
    b.ts("Error ratio by service (server-side codes)", [(
        f'sum by (service) (rate(rstar_rpc_requests_total{{{NS}, code!~"OK|INVALID_ARGUMENT|NOT_FOUND|CANCELLED|'
        f'RESOURCE_EXHAUSTED"}}[$__rate_interval])) / sum by (service) '
        f"(rate(rstar_rpc_requests_total{{{NS}}}[$__rate_interval]))", "{{service}}")], unit="percentunit")
    b.ts("p95 latency by service", [(
        f"histogram_quantile(0.95, sum by (service, le) (rate(rstar_rpc_latency_seconds_bucket{{{NS}}}"
        f"[$__rate_interval])))", "{{service}}")], unit="s")
    b.row("Work")
    b.ts("Searches finished/s by outcome", [(
        f"sum by (outcome) (rate(rstar_search_solves_total{{{NS}}}[$__rate_interval]))", "{{outcome}}")],
        unit="reqps", stack=True)
    b.ts("Policy tokens/s", [(f"sum(rate(rstar_policy_generated_tokens_total{{{NS}}}[$__rate_interval]))",
                              "generated"),
                             (f"sum(rate(rstar_policy_prompt_tokens_total{{{NS}}}[$__rate_interval]))", "prompt")],
         unit="short")
    b.ts("Sandbox executions/s by outcome", [(
        f"sum by (outcome) (rate(rstar_sandbox_executions_total{{{NS}}}[$__rate_interval]))", "{{outcome}}")],
        unit="ops", stack=True)
    b.row("Models and evolution")
    b.table("Model versions served", [(f"max by (service, model, version) (rstar_model_info{{{NS}}} == 1)", "")],
            w=12)
    b.stat("Hours since last successful round", [(
        f"(time() - max(max_over_time(rstar_evolution_last_success_timestamp_seconds{{{NS}}}[7d]))) / 3600",
        "hours")], unit="h", w=6, h=8)
    b.stat("Failed rounds (7d)", [(f"sum(increase(rstar_evolution_round_failures_total{{{NS}}}[7d]))", "failed")],
           w=6, h=8)
    return b


def services() -> Board:
    var = {"name": "service", "label": "Service", "type": "custom", "query": "policy,ppm,sandbox,search",
           "current": {"text": "search", "value": "search"}, "multi": False, "includeAll": False, "hide": 0,
           "options": [{"text": s, "value": s, "selected": s == "search"}
                       for s in ("policy", "ppm", "sandbox", "search")]}
    b = Board("rstar-services", "rstar / Services",
              "Per-service latency, throughput and errors by RPC method, plus each service's own internals.",
              [var])
    S = f'{NS}, service="$service"'
    b.row("RPCs of $service")
    b.ts("RPCs/s by method and code", [(
        f"sum by (method, code) (rate(rstar_rpc_requests_total{{{S}}}[$__rate_interval]))", "{{method}} {{code}}")],
        unit="reqps", w=12)
    b.ts("Errors/s by method and code", [(
        f'sum by (method, code) (rate(rstar_rpc_requests_total{{{S}, code!="OK"}}[$__rate_interval]))',
        "{{method}} {{code}}")], unit="reqps", w=12)
    for q in ("0.5", "0.95", "0.99"):
        b.ts(f"p{int(float(q) * 100)} latency by method", [(
            f"histogram_quantile({q}, sum by (method, le) (rate(rstar_rpc_latency_seconds_bucket{{{S}}}"
            f"[$__rate_interval])))", "{{method}}")], unit="s")
    b.ts("In-flight RPCs", [(f"sum by (method) (rstar_rpc_in_flight{{{S}}})", "{{method}}")], w=12)
    b.ts("Ready replicas", [(f"sum(rstar_service_ready{{{S}}})", "ready")], w=12)
    b.ts("Model hot reloads", [(
        f"sum by (model, outcome) (increase(rstar_model_reloads_total{{{S}}}[$__rate_interval]))",
        "{{model}} {{outcome}}")], w=12)
    b.table("Model version", [(f"max by (model, version, pod) (rstar_model_info{{{S}}} == 1)", "")], w=12)
    b.row("Policy")
    b.ts("Tokens/s", [(f"sum(rate(rstar_policy_generated_tokens_total{{{NS}}}[$__rate_interval]))", "generated"),
                      (f"sum(rate(rstar_policy_prompt_tokens_total{{{NS}}}[$__rate_interval]))", "prompt")])
    b.ts("Candidate steps/s", [(f"sum(rate(rstar_policy_sequences_total{{{NS}}}[$__rate_interval]))", "steps"),
                               (f"sum(rate(rstar_policy_refused_items_total{{{NS}}}[$__rate_interval]))", "refused")])
    b.ts("Prefixes per Generate (p50, p95)", [
        (f"histogram_quantile({q}, sum by (le) (rate(rstar_policy_batch_prefixes_bucket{{{NS}}}"
         f"[$__rate_interval])))", f"p{int(float(q) * 100)}") for q in ("0.5", "0.95")])
    b.row("PPM")
    b.ts("Prefixes scored/s", [(f"sum(rate(rstar_ppm_scored_prefixes_total{{{NS}}}[$__rate_interval]))", "scored")],
         w=12)
    b.ts("Prefixes per Score (p50, p95)", [
        (f"histogram_quantile({q}, sum by (le) (rate(rstar_ppm_batch_prefixes_bucket{{{NS}}}[$__rate_interval])))",
         f"p{int(float(q) * 100)}") for q in ("0.5", "0.95")], w=12)
    b.row("Sandbox")
    b.ts("Executions/s by outcome", [(
        f"sum by (outcome) (rate(rstar_sandbox_executions_total{{{NS}}}[$__rate_interval]))", "{{outcome}}")],
        unit="ops", stack=True)
    b.ts("Execution time (p50, p95)", [
        (f"histogram_quantile({q}, sum by (le) (rate(rstar_sandbox_execution_seconds_bucket{{{NS}}}"
         f"[$__rate_interval])))", f"p{int(float(q) * 100)}") for q in ("0.5", "0.95")], unit="s")
    b.ts("Warm pool and queue", [(f"sum(rstar_sandbox_pool_size{{{NS}}})", "warm workers"),
                                 (f"sum(rstar_sandbox_queue_depth{{{NS}}})", "waiting")])
    b.table("Isolation layers active", [(f"max by (pod, layer) (rstar_sandbox_isolation_layer{{{NS}}})", "")], w=24)
    return b


def search() -> Board:
    b = Board("rstar-search", "rstar / Search internals",
              "MCTS engine: rollouts and tokens per second, where the time goes, tree sizes, admission.")
    b.row("Throughput")
    b.ts("Rollouts/s by mode", [(
        f"sum by (mode) (rate(rstar_search_rollouts_total{{{NS}}}[$__rate_interval]))", "{{mode}}")])
    b.ts("Tokens/s by mode", [(
        f"sum by (mode) (rate(rstar_search_generated_tokens_total{{{NS}}}[$__rate_interval]))", "{{mode}}")])
    b.ts("Step programs executed/s", [(
        f"sum by (mode) (rate(rstar_search_executions_total{{{NS}}}[$__rate_interval]))", "{{mode}}")])
    b.row("Where the time goes")
    b.ts("Time share per stage", [(
        f"sum by (stage) (rate(rstar_search_stage_seconds_total{{{NS}}}[$__rate_interval])) / ignoring(stage) "
        f"group_left sum(rate(rstar_search_stage_seconds_total{{{NS}}}[$__rate_interval]))", "{{stage}}")],
        unit="percentunit", stack=True, w=12)
    b.ts("Stage seconds per second (busy workers)", [(
        f"sum by (stage) (rate(rstar_search_stage_seconds_total{{{NS}}}[$__rate_interval]))", "{{stage}}")],
        w=12)
    b.row("Trees and requests")
    b.ts("Tree size (p50, p95 nodes)", [
        (f"histogram_quantile({q}, sum by (le) (rate(rstar_search_tree_nodes_bucket{{{NS}}}[$__rate_interval])))",
         f"p{int(float(q) * 100)}") for q in ("0.5", "0.95")])
    b.ts("Admission: running, waiting, limit", [
        (f"sum(rstar_search_active_requests{{{NS}}})", "running"),
        (f"sum(rstar_search_queue_depth{{{NS}}})", "waiting"),
        (f"sum(rstar_search_queue_limit{{{NS}}})", "limit")])
    b.ts("Searches finished/s by outcome", [(
        f"sum by (outcome) (rate(rstar_search_solves_total{{{NS}}}[$__rate_interval]))", "{{outcome}}")],
        unit="reqps", stack=True)
    b.ts("Search latency (p50, p95) by method", [
        (f'histogram_quantile({q}, sum by (method, le) (rate(rstar_rpc_latency_seconds_bucket{{{NS}, '
         f'service="search"}}[$__rate_interval])))', "{{method}} p" + str(int(float(q) * 100)))
        for q in ("0.5", "0.95")], unit="s", w=12)
    b.ts("Synthesis problems solved ratio", [(
        f'sum(rate(rstar_search_synthesis_problems_total{{{NS}, solved="true"}}[$__rate_interval])) / '
        f"sum(rate(rstar_search_synthesis_problems_total{{{NS}}}[$__rate_interval]))", "solved")],
        unit="percentunit", w=12)
    return b


def evolution() -> Board:
    b = Board("rstar-evolution", "rstar / Evolution",
              "Self-evolution rounds: where the current round stands, solved rate per round, models promoted.")
    b.row("Current round")
    b.stat("Round", [(f"max(rstar_evolution_round{{{NS}}})", "round")])
    b.stat("Hours since last success", [(
        f"(time() - max(max_over_time(rstar_evolution_last_success_timestamp_seconds{{{NS}}}[7d]))) / 3600",
        "hours")], unit="h")
    b.stat("Failed rounds (30d)", [(f"sum(increase(rstar_evolution_round_failures_total{{{NS}}}[30d]))", "failed")])
    b.stat("Stage retries (24h)", [(f"sum(increase(rstar_evolution_task_retries_total{{{NS}}}[24h]))", "retries")])
    b.ts("Stage of the running round", [(f"max by (round, stage) (rstar_evolution_stage_info{{{NS}}} == 1)",
                                         "round {{round}}: {{stage}}")], w=12,
         description="One line per (round, stage) while the controller is in that stage.")
    b.ts("Tasks by stage and status", [(f"sum by (stage, status) (rstar_evolution_tasks{{{NS}}})",
                                        "{{stage}} {{status}}")], stack=True, w=12)
    b.ts("Stage Jobs created", [(f"sum by (stage) (increase(rstar_evolution_jobs_created_total{{{NS}}}"
                                 f"[$__rate_interval]))", "{{stage}}")], w=12)
    b.ts("Stage retries", [(f"sum by (stage) (increase(rstar_evolution_task_retries_total{{{NS}}}"
                            f"[$__rate_interval]))", "{{stage}}")], w=12)
    b.row("Results")
    b.ts("Synthesis solved ratio by round", [(f"max by (round) (rstar_evolution_solved_ratio{{{NS}}})",
                                              "round {{round}}")], unit="percentunit", w=12)
    b.table("Model versions served", [(f"max by (service, model, version) (rstar_model_info{{{NS}}} == 1)", "")],
            w=12)
    b.ts("Model reloads", [(f"sum by (service, outcome) (increase(rstar_model_reloads_total{{{NS}}}"
                            f"[$__rate_interval]))", "{{service}} {{outcome}}")], w=24)
    b.ts("Trajectory shard faults survived", [(
        f"sum by (op) (increase(rstar_trajectory_shard_faults_total{{{NS}}}[$__rate_interval]))", "{{op}}")], w=24,
        description="read: an unreadable shard the trainer skipped; write_part: a synthesis part write retried later.")
    return b


BOARDS = (overview, services, search, evolution)


def prometheus_rule() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "rstar-alerts", "labels": {"app.kubernetes.io/name": "rstar-alerts",
                                                        "role": "alert-rules"}},
        "spec": {"groups": groups},
    }
    return ("# GENERATED by k8s/monitoring/generate.py from k8s/monitoring/rules/rstar-alerts.yaml: do not edit.\n"
            + yaml.safe_dump(doc, sort_keys=False, width=1000))


def outputs() -> dict[Path, str]:
    out = {DASHBOARDS / f"{f().uid}.json": json.dumps(f().json(), indent=2) + "\n" for f in BOARDS}
    out[PROMETHEUS_RULE] = prometheus_rule()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for p in stale:
        print(("stale: " if args.check else "wrote: ") + str(p.relative_to(HERE.parent.parent)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
