"""deploy/kubernetes and `release --target kubernetes`, without a cluster (none can run here).

* Every object the base and the overlays (dev, prod, prod-gpu) render to validates offline against the Kubernetes
  1.36 OpenAPI schemas in strict mode (`kubernetes_validate`, bundled schemas; 1.36 is the API the
  installed `kubernetes` 36 client speaks), and the properties the issue asks for hold on the
  rendered objects: probes on /ping, NetworkPolicy keeping TorchServe's management and metrics
  ports private, Secret references, selectors that match, the canary's pod template equal to the
  stable one.
* The HAProxy configurations (the per-pod gate and the gateway) pass a real `haproxy -c`.
* The release target's decisions are plain functions, tested on plain data shaped like the API's
  Deployment objects; its patches are applied to the rendered Deployments with the renderer's
  strategic merge and must still validate.
* The init container's fetch script runs for real: from a file, and from a real MLflow server's
  proxied artifact store with basic auth (integration).
* The serving pod's spec runs under `podman kube play` with locally built images and answers a
  prediction with the pool credential (reliability: builds a ~3 GB image).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.36.0"  # the API of the kubernetes 36 client that `release --target kubernetes` uses
VARIANTS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod",
            "prod-gpu": K8S / "overlays" / "prod-gpu"}
# The Secrets the manifests reference (created by the operator, never committed): name → keys.
SECRETS = {"serving-pool": {"token"}, "tracking-reader": {"username", "password"},
           "tracking": {"postgres-password", "admin-password", "flask-secret-key"},
           "monitor": {"username", "password"}}
TS_PRIVATE_PORTS = {8080, 8081, 7070, 7071}  # inference, management, gRPC: loopback in the pod


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load("flywheel_k8s_render", K8S / "render.py")
FETCH = K8S / "base" / "serving" / "fetch_archive.py"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render.render(path) for name, path in VARIANTS.items()}


def _get(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def _pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _container(pod: dict, name: str, init: bool = False) -> dict:
    return next(c for c in pod["initContainers" if init else "containers"] if c["name"] == name)


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _workloads(objs):
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


# ------------------------------------------------------------------------------------ render + schema
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates_strictly(rendered, variant):
    import kubernetes_validate

    objs = rendered[variant]
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy",
            "ConfigMap", "StatefulSet", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"
    assert not any(o["kind"] == "Secret" for o in objs), "credentials are never committed: Secrets are the operator's"


def test_strict_validation_rejects_what_the_api_server_would(rendered):
    """The check bites: an unknown field, a wrong type and a misspelt probe are each rejected."""
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    stable = _get(rendered["base"], "Deployment", "serving-stable")
    broken = []
    a = copy.deepcopy(stable)
    _container(_pod(a), "gate")["readinessProbe"]["httpGet"]["paht"] = "/ping"
    broken.append(a)
    b = copy.deepcopy(stable)
    b["spec"]["revisionHistoryLimit"] = "five"
    broken.append(b)
    c = copy.deepcopy(stable)
    _container(_pod(c), "gate")["livenessProbes"] = _container(_pod(c), "gate").pop("livenessProbe")
    broken.append(c)
    for obj in broken:
        with pytest.raises(ValidationError):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_renderer_refuses_kustomize_features_it_does_not_render(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels"):
        render.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator:\n- name: x\n  files: [a.txt]\n")
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(render.RenderError, match="disableNameSuffixHash"):
        render.render(tmp_path)


def test_overlays_set_namespace_images_and_pool_size(rendered):
    for variant, ns in (("dev", "flywheel-dev"), ("prod", "flywheel-prod")):
        assert {o["metadata"].get("namespace") for o in rendered[variant]} == {ns}
        binding = _get(rendered[variant], "RoleBinding", "prometheus")
        assert binding["subjects"][0]["namespace"] == ns
    hpa = {v: _get(rendered[v], "HorizontalPodAutoscaler", "serving-stable")["spec"] for v in ("dev", "prod")}
    assert (hpa["dev"]["minReplicas"], hpa["dev"]["maxReplicas"]) == (1, 2)
    assert (hpa["prod"]["minReplicas"], hpa["prod"]["maxReplicas"]) == (3, 10)
    prod_stable = _pod(_get(rendered["prod"], "Deployment", "serving-stable"))
    assert _container(prod_stable, "torchserve")["image"] == "registry.example.com/flywheel/flywheel-serving:0.1.0"
    assert _container(prod_stable, "fetch-archive", init=True)["image"] == \
        "registry.example.com/flywheel/flywheel-serving:0.1.0"
    assert _container(prod_stable, "torchserve")["resources"]["requests"]["cpu"] == "2"
    dev_monitor = _pod(_get(rendered["dev"], "Deployment", "monitor"))
    assert _container(dev_monitor, "monitor")["args"] == ["--env", "dev"]
    settings = _get(rendered["dev"], "ConfigMap", "serving-settings")["data"]
    assert settings["capture_uri"] == "gs://flywheel-captures/dev"


def test_the_gpu_overlay_gives_each_serving_pod_one_gpu_and_the_cuda_image_and_changes_nothing_else(rendered):
    gpu, prod = rendered["prod-gpu"], rendered["prod"]
    for name in ("serving-stable", "serving-canary"):
        pod = _pod(_get(gpu, "Deployment", name))
        torchserve = _container(pod, "torchserve")
        assert torchserve["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": 1}
        assert torchserve["resources"]["requests"] == {"cpu": "2", "memory": "3Gi"}  # prod's, kept
        assert torchserve["image"] == _container(pod, "fetch-archive", init=True)["image"] == \
            "registry.example.com/flywheel/flywheel-serving:0.1.0-cu124"
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert "nvidia.com/gpu" not in str(_container(pod, "gate")["resources"])  # the gate is HAProxy: no GPU
    # Everything but the two serving Deployments renders exactly as prod
    changed = {"serving-stable", "serving-canary"}
    assert [o for o in gpu if o["metadata"]["name"] not in changed or o["kind"] != "Deployment"] == \
        [o for o in prod if o["metadata"]["name"] not in changed or o["kind"] != "Deployment"]


# ----------------------------------------------------------------------------------- serving pool
@pytest.mark.parametrize("variant", VARIANTS)
def test_serving_pods_probe_ping_through_the_gate_and_expose_only_it(rendered, variant):
    for name in ("serving-stable", "serving-canary"):
        pod = _pod(_get(rendered[variant], "Deployment", name))
        gate = _container(pod, "gate")
        ports = {p["name"]: p["containerPort"] for p in gate["ports"]}
        assert ports == {"http": 8000}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = gate[probe]["httpGet"]
            assert get["path"] == "/ping" and ports[get["port"]] == 8000, (name, probe)
        ts = _container(pod, "torchserve")
        env = {e["name"]: e for e in ts["env"]}
        assert env["TS_INFERENCE_ADDRESS"]["value"] == "http://127.0.0.1:8080"
        assert {p["containerPort"] for p in ts.get("ports", [])} == {8082}
        assert not TS_PRIVATE_PORTS & {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
        # The archive comes from the init container into the pod's model store, read-only for TorchServe.
        fetch = _container(pod, "fetch-archive", init=True)
        assert fetch["command"][-1] == "/opt/flywheel/model-store"
        store = {m["mountPath"]: m for m in ts["volumeMounts"]}["/opt/flywheel/model-store"]
        assert store.get("readOnly") is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"] + pod["initContainers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_canary_pod_template_is_the_stable_one(rendered):
    for variant, objs in rendered.items():
        stable = copy.deepcopy(_get(objs, "Deployment", "serving-stable")["spec"]["template"])
        canary = copy.deepcopy(_get(objs, "Deployment", "serving-canary")["spec"]["template"])
        assert stable["metadata"]["labels"].pop("flywheel.io/track") == "stable"
        assert canary["metadata"]["labels"].pop("flywheel.io/track") == "canary"
        assert stable == canary, variant
    assert _get(rendered["base"], "Deployment", "serving-canary")["spec"]["replicas"] == 0
    assert "replicas" not in _get(rendered["base"], "Deployment", "serving-stable")["spec"]  # the HPA's


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_keeps_management_and_metrics_private(rendered, variant):
    objs = rendered[variant]
    labels = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in _workloads(objs)}
    policy = _get(objs, "NetworkPolicy", "serving")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for track in ("serving-stable", "serving-canary"):
        assert _matches(policy["spec"]["podSelector"], labels[track])
    allowed = {}  # port → names of the workloads whose pods may connect
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "every rule names who may connect: no port is open to everyone"
        peers = {n for n, lab in labels.items() for peer in rule["from"] if _matches(peer["podSelector"], lab)}
        for port in rule["ports"]:
            allowed.setdefault(port["port"], set()).update(peers)
    assert allowed == {8000: {"serving-gateway"}, 8082: {"prometheus"}}
    assert not TS_PRIVATE_PORTS & set(allowed)
    # The other policies: Postgres only from MLflow, the monitor's metrics only from Prometheus.
    pg = _get(objs, "NetworkPolicy", "postgres")["spec"]["ingress"]
    assert [n for n, lab in labels.items() if _matches(pg[0]["from"][0]["podSelector"], lab)] == ["tracking"]
    mon = _get(objs, "NetworkPolicy", "monitor")["spec"]["ingress"]
    assert [n for n, lab in labels.items() if _matches(mon[0]["from"][0]["podSelector"], lab)] == ["prometheus"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_match_their_deployments(rendered, variant):
    objs = rendered[variant]
    workloads = {o["metadata"]["name"]: o for o in _workloads(objs)}
    for w in workloads.values():
        assert _matches(w["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]), w["metadata"]["name"]
    # Deployments' selectors never overlap (a pod belongs to one ReplicaSet owner).
    for a in workloads.values():
        for b in workloads.values():
            if a is not b:
                assert not _matches(a["spec"]["selector"], b["spec"]["template"]["metadata"]["labels"])

    def selected(selector):
        return {n for n, w in workloads.items() if _matches(selector, w["spec"]["template"]["metadata"]["labels"])}

    pdbs = {o["metadata"]["name"]: selected(o["spec"]["selector"]) for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert pdbs == {"serving-stable": {"serving-stable"}, "serving-gateway": {"serving-gateway"}}
    hpa = _get(objs, "HorizontalPodAutoscaler", "serving-stable")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "serving-stable"}
    ts = _container(_pod(workloads["serving-stable"]), "torchserve")
    assert ts["resources"]["requests"]["cpu"]  # CPU utilisation needs a request
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    expected = {"serving-stable": {"serving-stable"}, "serving-canary": {"serving-canary"},
                "serving": {"serving-gateway"}, "tracking": {"tracking"}, "postgres": {"postgres"},
                "prometheus": {"prometheus"}}
    assert {n: selected({"matchLabels": s["spec"]["selector"]}) for n, s in services.items()} == expected
    for name, svc in services.items():  # named target ports exist on the selected pods
        (workload,) = expected[name]
        pod_ports = {p["name"] for c in _pod(workloads[workload])["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= pod_ports, name
    assert workloads["postgres"]["spec"]["serviceName"] == "postgres"
    assert services["postgres"]["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("variant", VARIANTS)
def test_secrets_are_referenced_never_inlined(rendered, variant):
    used: dict[str, set] = {}
    for obj in _workloads(rendered[variant]):
        pod = _pod(obj)
        for c in pod["containers"] + pod.get("initContainers", []):
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
                assert not re.search(r"(?i)password|token|secret", e["name"]) or "value" not in e \
                    or e["name"].endswith("_FILE"), f"{obj['metadata']['name']}: {e['name']} has a literal value"
        for v in pod.get("volumes", []):
            if "secret" in v:
                items = v["secret"].get("items")
                used.setdefault(v["secret"]["secretName"], set()).update(
                    {i["key"] for i in items} if items else SECRETS[v["secret"]["secretName"]])
    assert used == SECRETS
    pool = {e["name"]: e for e in _container(_pod(_get(rendered[variant], "Deployment", "serving-stable")),
                                             "gate")["env"]}["POOL_TOKEN"]
    assert pool["valueFrom"]["secretKeyRef"] == {"name": "serving-pool", "key": "token"}
    readme = (K8S / "README.md").read_text()
    for name, keys in SECRETS.items():  # the README tells the operator how to create each one
        assert f"secret generic {name}" in readme, name
        for key in keys:
            assert f"--from-literal={key}=" in readme or f"--from-file={key}=" in readme, (name, key)


def test_configmaps_referenced_exist_and_initdb_matches_deploy_tracking(rendered):
    objs = rendered["prod"]
    config_maps = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    for obj in _workloads(objs):
        pod = _pod(obj)
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
        for c in pod["containers"] + pod.get("initContainers", []):
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in config_maps[ref["name"]], ref
    assert config_maps["postgres-initdb"]["10-mlflow-auth.sql"] == \
        (REPO / "deploy/tracking/initdb/10-mlflow-auth.sql").read_text()
    assert config_maps["serving-fetch"]["fetch_archive.py"] == FETCH.read_text()


def test_prometheus_scrapes_the_pods_metrics_ports(rendered):
    objs = rendered["base"]
    prom = yaml.safe_load(_get(objs, "ConfigMap", "prometheus")["data"]["prometheus.yml"])
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for job, workload, port in (("torchserve", "serving-stable", 8082), ("flywheel-monitor", "monitor", 9108)):
        keep = {r["source_labels"][0]: r["regex"] for r in jobs[job]["relabel_configs"] if r.get("action") == "keep"}
        pod = _get(objs, "Deployment", workload)["spec"]["template"]
        assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == pod["metadata"]["labels"][
            "app.kubernetes.io/name"]
        named = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert named[keep["__meta_kubernetes_pod_container_port_name"]] == port
    role = _get(objs, "Role", "prometheus")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert _pod(_get(objs, "Deployment", "prometheus"))["serviceAccountName"] == "prometheus"


def test_haproxy_accepts_the_gate_and_gateway_configurations(rendered, tmp_path):
    """A real `haproxy -c` (HAProxy 2.6, the version the manifests run) on both configurations."""
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("haproxy is not installed: `make system-deps`")
    objs = rendered["prod"]
    gate = _get(objs, "ConfigMap", "serving-gate")["data"]
    (tmp_path / "replica_key.lua").write_text(gate["replica_key.lua"])
    cfg = gate["haproxy.cfg"].replace("/usr/local/etc/haproxy/replica_key.lua", str(tmp_path / "replica_key.lua"))
    (tmp_path / "gate.cfg").write_text(cfg)
    (tmp_path / "gateway.cfg").write_text(_get(objs, "ConfigMap", "gateway")["data"]["haproxy.cfg"])
    env = {**os.environ, "POOL_TOKEN": "t0ken", "STABLE_WEIGHT": "90", "CANARY_WEIGHT": "10"}
    for name in ("gate.cfg", "gateway.cfg"):
        proc = subprocess.run([haproxy, "-c", "-f", str(tmp_path / name)], env=env, capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
    # The gateway's weights come from exactly the environment the release target patches.
    from flywheel.serving.kubernetes import GATEWAY, GATEWAY_CONTAINER, WEIGHT_ENV

    gw = _container(_pod(_get(objs, "Deployment", GATEWAY)), GATEWAY_CONTAINER)
    assert {e["name"] for e in gw["env"]} >= set(WEIGHT_ENV)
    text = _get(objs, "ConfigMap", "gateway")["data"]["haproxy.cfg"]
    assert 'weight "${STABLE_WEIGHT}"' in text and 'weight "${CANARY_WEIGHT}"' in text


@contextmanager
def _gate(rendered, torchserve_server, tmp_path):
    """The pod's gate (its ConfigMap as rendered, HAProxy 2.6, the Lua key reader) in front of a real
    TorchServe with token auth; only its listen address and TorchServe's port are rewritten for
    loopback. Yields (its URL, the pool credential) once it answers /ping."""
    import time
    from urllib.parse import urlsplit

    import requests

    from flywheel.core.procs import free_port, stop_process_group

    gate = _get(rendered["prod"], "ConfigMap", "serving-gate")["data"]
    (tmp_path / "replica_key.lua").write_text(gate["replica_key.lua"])
    port, ts_port = free_port(), urlsplit(torchserve_server.inference_url).port
    cfg = gate["haproxy.cfg"]
    for old, new in (("/usr/local/etc/haproxy/replica_key.lua", str(tmp_path / "replica_key.lua")),
                     ("bind :8000", f"bind 127.0.0.1:{port}"),
                     ("server torchserve 127.0.0.1:8080", f"server torchserve 127.0.0.1:{ts_port}")):
        assert old in cfg
        cfg = cfg.replace(old, new)
    (tmp_path / "gate.cfg").write_text(cfg)
    token = "pool-" + os.urandom(8).hex()
    env = {**os.environ, "POOL_TOKEN": token, "FLYWHEEL_TS_KEY_FILE": str(torchserve_server.key_file)}
    log = open(tmp_path / "haproxy.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(tmp_path / "gate.cfg")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url + "/ping", timeout=5)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"haproxy did not start: {(tmp_path / 'haproxy.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield url, token
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.integration
def test_gate_configuration_fronts_a_real_torchserve(rendered, torchserve_server, tmp_path):
    """The pod's gate in front of a real TorchServe: 200 with the pool credential, JSON 401 without it,
    JSON 413 over the limit (announced or chunked), /ping without a token."""
    from urllib.parse import urlsplit

    import requests

    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits
    from flywheel.serving.keys import read_keys

    with _gate(rendered, torchserve_server, tmp_path) as (url, token):
        port = urlsplit(url).port
        ping = requests.get(url + "/ping", timeout=5)
        assert ping.status_code == 200 and ping.json()["status"] == "Healthy"  # no token: kubelet's probe
        png = encode_png(load_splits("fashion-mnist").test.images[0])
        predict = f"{url}/predictions/{torchserve_server.model}"
        r = requests.post(predict, data=png, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200 and str(r.json()["version"]) == torchserve_server.version, r.text
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Bearer {read_keys(torchserve_server.key_file)['inference']}"}):
            r = requests.post(predict, data=png, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["type"] == "Unauthorized", (headers, r.text)
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # announce the size, send nothing
        conn.putrequest("POST", urlsplit(predict).path)
        for k, v in (("Authorization", f"Bearer {token}"), ("Content-Length", str(8388608 + 1))):
            conn.putheader(k, v)
        conn.endheaders()
        big = conn.getresponse()
        assert big.status == 413 and json.loads(big.read())["code"] == 413
        chunk = b"x" * 65536  # chunked: no Content-Length, so TorchServe's limit answers, and the gate says so
        big = requests.post(predict, data=(chunk for _ in range(8388608 // len(chunk) + 2)),
                            headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert big.status_code == 413 and big.json()["code"] == 413, big.text


@pytest.mark.integration
def test_gate_holds_requests_while_the_renewer_replaces_the_key(rendered, torchserve_server, tmp_path):
    """TorchServe rejects the old inference key the moment it issues a new one; the gate reads the key
    per request. The serving image's renewer (`hold=True`) holds the gate around each renewal, so
    renewing ten times under four clients fails no request."""
    import threading
    import time

    import requests

    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits
    from flywheel.serving.keys import KeyRenewer, hold_file, read_keys

    png = encode_png(load_splits("fashion-mnist").test.images[0])
    renewer = KeyRenewer(torchserve_server.server.cfg.management_address, torchserve_server.key_file, hold=True)
    statuses, stop = [], threading.Event()
    with _gate(rendered, torchserve_server, tmp_path) as (url, token):
        def client():
            session = requests.Session()
            while not stop.is_set():
                r = session.post(f"{url}/predictions/{torchserve_server.model}", data=png, timeout=30,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
                statuses.append((r.status_code, r.text[:200]))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        def answered(n):  # wait until the clients have had n more answers
            goal, deadline = len(statuses) + n, time.monotonic() + 60
            while len(statuses) < goal:
                assert time.monotonic() < deadline, f"the clients got {len(statuses)} answers, not {goal}"
                time.sleep(0.01)

        try:
            keys = [read_keys(torchserve_server.key_file)["inference"]]
            for _ in range(10):
                answered(20)  # traffic flows before each renewal and after it
                keys.append(renewer.renew("inference").inference)
            answered(20)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert len(set(keys)) == 11 and not hold_file(torchserve_server.key_file).exists()
    failed = [s for s in statuses if s[0] != 200]
    assert failed == [], (len(failed), len(statuses), failed[:3])


# ------------------------------------------------------------------------ release target: plain data
def _deployment(generation=2, observed=2, replicas=3, updated=3, total=3, available=3, unavailable=0,
                conditions=None):
    status = {"observedGeneration": observed, "replicas": total, "updatedReplicas": updated,
              "availableReplicas": available, "conditions": conditions or []}
    if unavailable:
        status["unavailableReplicas"] = unavailable
    return {"metadata": {"name": "serving-canary", "generation": generation}, "spec": {"replicas": replicas},
            "status": status}


def test_rollout_state_reads_status_like_kubectl_rollout_status():
    from flywheel.serving.kubernetes import rollout_state

    assert rollout_state(_deployment()).done
    assert "generation 3" in rollout_state(_deployment(generation=3, observed=2)).waiting_for
    assert rollout_state(_deployment(updated=1)).waiting_for == "1 of 3 replicas updated"
    assert rollout_state(_deployment(total=4)).waiting_for == "1 old replica(s) to terminate"
    assert rollout_state(_deployment(available=2)).waiting_for == "2 of 3 updated replicas available"
    stuck = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
              "message": 'ReplicaSet "serving-canary-7d9" has timed out progressing.'}]
    state = rollout_state(_deployment(updated=1, available=0, conditions=stuck))
    assert not state.done and "timed out progressing" in state.failed
    # Scaled to zero is a finished rollout; a fresh object without status is not.
    assert rollout_state(_deployment(replicas=0, updated=0, total=0, available=0)).done
    assert not rollout_state({"metadata": {"generation": 1}, "spec": {"replicas": 1}}).done


def test_next_step_waits_then_gives_up():
    from flywheel.serving.kubernetes import Rollout, next_step

    assert next_step(Rollout(True), 0, 10) == "done"
    assert next_step(Rollout(False, waiting_for="x"), 9.9, 10) == "wait"
    assert next_step(Rollout(False, waiting_for="x"), 10, 10) == "give_up"
    assert next_step(Rollout(False, failed="deadline"), 0, 10) == "give_up"


def test_wait_rollout_follows_a_sequence_of_statuses():
    from flywheel.serving.kubernetes import wait_rollout
    from flywheel.serving.release import ReleaseFailed, ReleaseResult

    seen = iter([_deployment(observed=1), _deployment(updated=2), _deployment(available=2), _deployment()])
    now = [0.0]
    result = ReleaseResult("m", "2", "dev", "k8s")
    wait_rollout(lambda: next(seen), "serving-canary", 60, 5, result, clock=lambda: now[0],
                 sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] == 15 and result.events == ["serving-canary rolled out"]
    never = _deployment(available=1)
    with pytest.raises(ReleaseFailed, match="still waiting for 1 of 3 updated replicas available after 20s"):
        wait_rollout(lambda: never, "serving-canary", 20, 5, result, clock=lambda: now[0],
                     sleep=lambda s: now.__setitem__(0, now[0] + s))


def test_canary_plan_and_availability():
    from flywheel.core.errors import FlywheelError
    from flywheel.serving.kubernetes import canary_available, canary_plan

    assert canary_plan([10, 50, 100]) == (10, 50, 100)
    assert canary_plan((100,)) == (100,)
    for bad in ([], [10, 50], [50, 10, 100], [0, 100], [10, 10, 100], [10, 150]):
        with pytest.raises(FlywheelError, match="increasing percentages"):
            canary_plan(bad)
    assert canary_available(_deployment(replicas=1, available=1)) is None
    assert "0 of 1" in canary_available(_deployment(replicas=1, available=0, unavailable=1))


def test_rollback_undoes_exactly_what_the_release_changed():
    from flywheel.serving.kubernetes import Progress, rollback_actions

    prev = {"FLYWHEEL_ARCHIVE_VERSION": "3"}
    assert rollback_actions(Progress()) == []
    assert rollback_actions(Progress(canary_touched=True, previous_stable=prev)) == [("scale_canary", 0)]
    assert rollback_actions(Progress(canary_touched=True, canary_weight=50, previous_stable=prev)) == [
        ("weights", 0), ("scale_canary", 0)]
    assert rollback_actions(Progress(True, 100, True, prev)) == [
        ("restore_stable", prev), ("weights", 0), ("scale_canary", 0)]
    assert rollback_actions(Progress(True, 100, True, None)) == [
        ("restore_stable", None), ("weights", 0), ("scale_canary", 0)]


def test_patches_apply_to_the_rendered_deployments_and_still_validate(rendered):
    """The target's patches, merged the way the API server merges them (the renderer's strategic
    merge: containers, env by name), give valid Deployments that read back as what was released."""
    import kubernetes_validate

    from flywheel.serving.kubernetes import (
        CANARY,
        GATEWAY,
        STABLE,
        archive_patch,
        released_archive,
        restore_patch,
        scale_patch,
        weights_of,
        weights_patch,
    )

    objs = rendered["prod"]
    stable, canary, gateway = (_get(objs, "Deployment", n) for n in (STABLE, CANARY, GATEWAY))
    assert released_archive(stable) is None and weights_of(gateway) == (100, 0)
    sha = "ab" * 32
    uri = "mlflow-artifacts:/1/abc/artifacts/serving-archive/fashion-classifier-4.mar"
    released = render.strategic_merge(canary, archive_patch("fashion-classifier", "4", uri, sha, "reg/fs:0.2",
                                                            replicas=1))
    kubernetes_validate.validate(released, K8S_VERSION, strict=True)
    assert released_archive(released) == {"FLYWHEEL_MODEL": "fashion-classifier", "FLYWHEEL_ARCHIVE_VERSION": "4",
                                          "FLYWHEEL_ARCHIVE_URI": uri, "FLYWHEEL_ARCHIVE_SHA256": sha,
                                          "image": "reg/fs:0.2"}
    pod = _pod(released)
    assert released["spec"]["replicas"] == 1
    assert released["spec"]["template"]["metadata"]["labels"]["flywheel.io/version"] == "4"
    assert _container(pod, "torchserve")["image"] == "reg/fs:0.2"
    assert _container(pod, "gate")["image"] == "haproxy:2.6"  # untouched
    fetch_env = [e["name"] for e in _container(pod, "fetch-archive", init=True)["env"]]
    assert len(fetch_env) == len(set(fetch_env)) and "MLFLOW_TRACKING_PASSWORD" in fetch_env  # merged, not replaced
    for share in (10, 50, 100, 0):
        moved = render.strategic_merge(gateway, weights_patch(share))
        kubernetes_validate.validate(moved, K8S_VERSION, strict=True)
        assert weights_of(moved) == (100 - share, share)
        assert {e["name"] for e in _container(_pod(moved), "haproxy")["env"]} == {
            "STABLE_WEIGHT", "CANARY_WEIGHT", "POOL_TOKEN"}
    back = render.strategic_merge(released, restore_patch(None, "fashion-classifier"))
    assert released_archive(back) is None
    assert render.strategic_merge(released, scale_patch(0))["spec"]["replicas"] == 0
    restored = render.strategic_merge(released, restore_patch(released_archive(released), "fashion-classifier"))
    assert released_archive(restored) == released_archive(released)


def test_target_from_options_needs_namespace_url_and_token(monkeypatch):
    from flywheel.core.errors import FlywheelError
    from flywheel.serving.kubernetes import KubernetesTarget

    monkeypatch.delenv("FLYWHEEL_POOL_TOKEN", raising=False)
    with pytest.raises(FlywheelError, match="FLYWHEEL_POOL_TOKEN"):
        KubernetesTarget.from_options("flywheel-prod", "http://127.0.0.1:8000")
    monkeypatch.setenv("FLYWHEEL_POOL_TOKEN", "t")
    target = KubernetesTarget.from_options("flywheel-prod", "http://127.0.0.1:8000", "ctx", "5, 100", 1)
    assert (target.canary_steps, target.pool_token, target.describe()) == ((5, 100), "t", "kubernetes ctx/flywheel-prod")
    with pytest.raises(FlywheelError, match="increasing"):
        KubernetesTarget.from_options("ns", "http://x", None, "50,10")


def test_cli_release_kubernetes_says_what_is_missing(tmp_path):
    """Usage errors exit 2 with one line, before anything is published; a kubeconfig that does not
    exist is one of them (the client's loader is the first cluster call)."""
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "no-kubeconfig")}
    env.pop("FLYWHEEL_POOL_TOKEN", None)
    cmd = [sys.executable, "-m", "flywheel", "release", "--target", "kubernetes", "--version", "1", "--env", "prod"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "FLYWHEEL_POOL_TOKEN" in proc.stderr, proc.stderr
    proc = subprocess.run([*cmd, "--namespace", "ns", "--canary-url", "http://127.0.0.1:9"],
                          env={**env, "FLYWHEEL_POOL_TOKEN": "t"}, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2 and "no Kubernetes credentials for kubernetes current-context/ns" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "model-store").exists()


# ------------------------------------------------------------------------- the init container's fetch
def _fetch(store: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FETCH), str(store)], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=120, check=False)


def test_fetch_archive_checks_sha256_and_says_what_is_missing(tmp_path):
    src = tmp_path / "src" / "m-3.mar"
    src.parent.mkdir()
    src.write_bytes(os.urandom(4096))
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    store = tmp_path / "store"
    store.mkdir()
    base = {"FLYWHEEL_MODEL": "m", "FLYWHEEL_ARCHIVE_VERSION": "3", "FLYWHEEL_ARCHIVE_URI": src.as_uri()}
    proc = _fetch(store, {**base, "FLYWHEEL_ARCHIVE_SHA256": sha})
    assert proc.returncode == 0, proc.stderr
    assert (store / "m-3.mar").read_bytes() == src.read_bytes()
    (store / "m-3.mar").unlink()
    proc = _fetch(store, {**base, "FLYWHEEL_ARCHIVE_SHA256": "0" * 64})
    assert proc.returncode == 2 and "not serving it" in proc.stderr
    assert list(store.iterdir()) == []
    proc = _fetch(store, {})
    assert proc.returncode == 2 and "no archive released to this Deployment yet" in proc.stderr


@pytest.mark.integration
def test_published_archive_is_fetched_from_a_real_tracking_server(tracking_stack, tmp_path):
    """`publish_archive` logs the .mar to the version's run on a real MLflow (basic auth, proxied GCS
    emulator); the init container's script fetches it over HTTP with the reader's credentials."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from flywheel.serving.kubernetes import publish_archive

    settings = tracking_stack.settings().apply()
    client = MlflowClient(settings.tracking_uri)
    exp = client.create_experiment(f"k8s-fetch-{os.getpid()}-{tmp_path.name}")
    run = client.create_run(exp)
    client.set_terminated(run.info.run_id)
    mar = tmp_path / "fashion-classifier-7.mar"
    mar.write_bytes(os.urandom(300_000))
    uri = publish_archive(settings, SimpleNamespace(run_id=run.info.run_id), mar)
    assert uri.startswith("mlflow-artifacts:/") and uri.endswith("/serving-archive/fashion-classifier-7.mar")
    store = tmp_path / "store"
    store.mkdir()
    env = {"FLYWHEEL_MODEL": "fashion-classifier", "FLYWHEEL_ARCHIVE_VERSION": "7", "FLYWHEEL_ARCHIVE_URI": uri,
           "FLYWHEEL_ARCHIVE_SHA256": hashlib.sha256(mar.read_bytes()).hexdigest(),
           "MLFLOW_TRACKING_URI": tracking_stack.uri, "MLFLOW_TRACKING_USERNAME": tracking_stack.username}
    proc = _fetch(store, {**env, "MLFLOW_TRACKING_PASSWORD": tracking_stack.password})
    assert proc.returncode == 0, proc.stderr
    assert (store / mar.name).read_bytes() == mar.read_bytes()
    proc = _fetch(tmp_path, {**env, "MLFLOW_TRACKING_PASSWORD": "wrong-password"})
    assert proc.returncode == 2 and "HTTP 401" in proc.stderr


# ----------------------------------------------------------------------- the serving pod under podman
POD_CLIENT = r"""
import http.client, json, sys, urllib.error, urllib.parse, urllib.request
gate, token, model = sys.argv[1:4]
body = sys.stdin.buffer.read()
def call(url, auth=None, data=None):
    headers = {"Authorization": auth} if auth else {}
    if data:  # urllib would label it a form, and TorchServe would form-decode it
        headers["Content-Type"] = "image/png"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)
def too_big(url):  # announce a body over the limit; the gate answers from the headers alone
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", u.path)
    conn.putheader("Authorization", "Bearer " + token)
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(8388608 + 1))
    conn.endheaders()
    r = conn.getresponse()
    return r.status, r.read().decode()
predict = gate + "/predictions/" + model
out = {"predict": call(predict, "Bearer " + token, body),
       "no_token": call(predict, None, body),
       "wrong_token": call(predict, "Bearer not-the-pool-token", body),
       "ping": call(gate + "/ping"),
       "too_big": too_big(predict),
       "direct_ts": call("http://127.0.0.1:8080/predictions/" + model, "Bearer " + token, body)}
out["body_bytes"] = len(body)
print(json.dumps(out))
"""


RENEW_KEY = r"""
import json, urllib.request
path = "/opt/flywheel/run/key_file.json"
before = json.load(open(path))
req = urllib.request.Request("http://127.0.0.1:8081/token?type=inference", method="POST",
                             headers={"Authorization": "Bearer " + before["API"]["key"]})
urllib.request.urlopen(req, timeout=30).read()
after = json.load(open(path))
print(json.dumps([before["inference"]["key"], after["inference"]["key"]]))
"""


def _podman_play_yaml(rendered_objs: list[dict], archive_dir: Path, mar_name: str, sha: str, model: str,
                      version: str) -> tuple[list[dict], list[str]]:
    """The dev overlay's serving-stable pod template as a Pod, with the ConfigMaps it reads, plus the
    list of every difference from what a cluster would run (asserted by the test, stated in the runbook)."""
    from flywheel.serving.kubernetes import STABLE, archive_patch

    deployment = _get(rendered_objs, "Deployment", STABLE)
    # What `release --target kubernetes` patches into the Deployment, merged as the API server would.
    uri = f"file:///archive-src/{mar_name}"
    template = render.strategic_merge(deployment, archive_patch(model, version, uri, sha))["spec"]["template"]
    spec = copy.deepcopy(template["spec"])
    differences = [f"FLYWHEEL_ARCHIVE_URI is {uri} (a hostPath volume archive-src), not mlflow-artifacts:/...",
                   "serving-settings capture_uri is '' (no GCS here): capture off"]
    # podman 4.3 publishes every containerPort on the host (no --publish-all switch before 4.5), which
    # `--network none` refuses and which would otherwise expose the pod beyond loopback: the ports are
    # dropped and the probes' named port becomes its number (the pod's own ports do not change).
    differences.append("containerPort declarations dropped, probes' port `http` written as 8000 "
                       "(podman 4.3 would publish them on the host)")
    for c in spec["containers"]:
        named = {p["name"]: p["containerPort"] for p in c.pop("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c and "httpGet" in c[probe]:
                c[probe]["httpGet"]["port"] = named.get(c[probe]["httpGet"]["port"], c[probe]["httpGet"]["port"])
    spec["volumes"].append({"name": "archive-src", "hostPath": {"path": str(archive_dir), "type": "Directory"}})
    fetch = _container(spec, "fetch-archive", init=True)
    fetch["volumeMounts"].append({"name": "archive-src", "mountPath": "/archive-src", "readOnly": True})
    # podman 4.3 removes a finished ("once") init container right away and, under load, fails doing it
    # ("cannot remove container ... as it is running", every time in this project's test runs). Kept
    # ("always"), podman would restart it under restartPolicy Always, so the pod restarts on failure
    # only: the init container runs once and exits 0, and its log shows what it fetched.
    spec["restartPolicy"] = "OnFailure"
    differences.append("podman annotation io.podman.annotations.init.container.type=always and restartPolicy "
                       "OnFailure (podman 4.3 fails to remove a finished init container under load)")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "flywheel-serving", "labels": template["metadata"]["labels"],
                        "annotations": {"io.podman.annotations.init.container.type": "always"}},
           "spec": spec}
    config_maps = []
    for name in ("serving-gate", "serving-fetch", "serving-settings"):
        cm = copy.deepcopy(_get(rendered_objs, "ConfigMap", name))
        cm["metadata"].pop("namespace", None)
        if name == "serving-settings":
            cm["data"]["capture_uri"] = ""
        config_maps.append(cm)
    return [*config_maps, pod], differences


@pytest.mark.reliability
def test_serving_pod_spec_answers_a_prediction_under_podman(rendered, podman, podman_serving_images,
                                                            serving_models, tmp_path):
    """`podman kube play` of the Deployment's own pod template: the init container fetches and checks
    the archive, TorchServe loads it, the gate answers a prediction for the pool credential only."""
    import base64
    import secrets

    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits
    from tests.fixtures_podman import PAUSE_IMAGE

    model, version = serving_models.name, serving_models.versions[0]
    mar = serving_models.mars[version]
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    shutil.copy(mar, archive_dir / mar.name)
    archive_dir.chmod(0o755)
    (archive_dir / mar.name).chmod(0o644)
    sha = hashlib.sha256(mar.read_bytes()).hexdigest()
    objs = rendered["dev"]
    docs, differences = _podman_play_yaml(objs, archive_dir, mar.name, sha, model, version)
    pod_spec = docs[-1]["spec"]
    images = {c["image"] for c in pod_spec["containers"] + pod_spec["initContainers"]}
    assert images == {"flywheel-serving:0.1.0", "haproxy:2.6"}  # what the dev overlay names, built here
    # The Secrets, as podman 4.3 reads them for secretKeyRef: a JSON map of base64 values.
    token = secrets.token_urlsafe(24)
    for name, data in (("serving-pool", {"token": token}),
                       ("tracking-reader", {"username": "reader", "password": "unused-by-file-uris"})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()}))
        podman.run("secret", "rm", name, check=False)  # podman 4.3 has no `create --replace`
        podman.run("secret", "create", name, str(path))
    # Kubernetes makes an emptyDir world-writable; podman 4.3 makes it a named volume owned like the
    # image's mount point (root for the model store) and ignores fsGroup: create them as Kubernetes does.
    for volume in pod_spec["volumes"]:
        if "emptyDir" in volume:
            podman.run("volume", "rm", "--force", volume["name"], check=False)
            podman.run("volume", "create", volume["name"])
            # First mounted where the image has nothing, so podman's one-time copy-up of the image's
            # directory (root, 0755) is spent before the pod mounts it; then Kubernetes' mode.
            podman.run("run", "--rm", "--network", "none", "-v", f"{volume['name']}:/volume", "--entrypoint",
                       "/bin/sleep", PAUSE_IMAGE, "0")
            mountpoint = podman.run("volume", "inspect", "--format", "{{.Mountpoint}}", volume["name"])
            Path(mountpoint.stdout.decode().strip()).chmod(0o777)
    differences.append("emptyDir volumes pre-created with mode 0777 (Kubernetes' emptyDir mode)")
    play = tmp_path / "pod.yaml"
    play.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    print("differences from a cluster:", *differences, sep="\n  ")
    podman.run("kube", "play", "--network", "none", str(play), timeout=300)
    try:
        png = encode_png(load_splits("fashion-mnist").test.images[0])
        out = _wait_for_prediction(podman, token, model, png)
        status, body = out["predict"]
        assert status == 200, out
        answer = json.loads(body)
        assert answer["label"] in serving_models.manifests[version].class_names
        assert str(answer["version"]) == version
        assert out["no_token"][0] == 401 and json.loads(out["no_token"][1])["code"] == 401
        assert out["wrong_token"][0] == 401
        assert out["ping"][0] == 200 and json.loads(out["ping"][1])["status"] == "Healthy"  # kubelet's probe
        assert out["too_big"][0] == 413 and json.loads(out["too_big"][1])["code"] == 413
        # TorchServe's own port rejects the pool credential: its key never left the pod's gate.
        assert out["direct_ts"][0] in (400, 401), out["direct_ts"]
        # TorchServe's inference key renewed (what the image's entrypoint does at half its lifetime):
        # the gate reads the new one, clients keep the same pool credential.
        renew = podman.run("exec", "flywheel-serving-torchserve", "python", "-c", RENEW_KEY)
        old_key, new_key = json.loads(renew.stdout)
        assert old_key != new_key
        again = _wait_for_prediction(podman, token, model, png, timeout_s=30)
        assert json.loads(again["predict"][1])["version"] == version
        # The init container's work: the archive in the pod's model store is the released one.
        init = podman.run("inspect", "--format", "{{.State.ExitCode}} {{.RestartCount}}",
                          "flywheel-serving-fetch-archive").stdout.decode().split()
        assert init == ["0", "0"], init
        fetched = podman.run("logs", "flywheel-serving-fetch-archive").stdout.decode()
        assert fetched.count(f"fetch-archive: /opt/flywheel/model-store/{model}-{version}.mar") == 1, fetched
        assert f"sha256 {sha[:12]}) from file:///archive-src/{mar.name}" in fetched
        ls = podman.run("exec", "flywheel-serving-torchserve", "python", "-c",
                        "import hashlib,sys;p='/opt/flywheel/model-store/'+sys.argv[1];"
                        "print(hashlib.sha256(open(p,'rb').read()).hexdigest())", f"{model}-{version}.mar")
        assert ls.stdout.decode().strip() == sha
    finally:
        logs = podman.run("pod", "logs", "flywheel-serving", check=False).stdout.decode(errors="replace")
        print(logs[-4000:])
        podman.run("pod", "rm", "--force", "flywheel-serving", check=False, timeout=120)


def _wait_for_prediction(podman, token: str, model: str, png: bytes, timeout_s: float = 240.0) -> dict:
    """Run the in-pod client until TorchServe has loaded the archive (its /ping says Healthy)."""
    import time

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        proc = podman.run("exec", "-i", "flywheel-serving-torchserve", "python", "-c", POD_CLIENT,
                          "http://127.0.0.1:8000", token, model, stdin=png, check=False, timeout=120)
        if proc.returncode == 0:
            last = json.loads(proc.stdout)
            if last["predict"][0] == 200:
                return last
        else:
            last = proc.stderr.decode(errors="replace")[-1000:]
        time.sleep(3)
    pytest.fail(f"the pod did not answer a prediction within {timeout_s:.0f}s: {last}")
