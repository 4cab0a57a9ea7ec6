"""`flywheel release --target kubernetes`: a registry version onto the serving pool in a cluster.

The cluster side is deploy/kubernetes/ (kustomize): Deployments `serving-stable` and `serving-canary`
with one pod template (an init container fetches NAME-VERSION.mar from the artifact store and checks
its sha256; TorchServe on loopback; a per-pod HAProxy gate that checks the pool credential), and the
`serving-gateway` Deployment (HAProxy) whose STABLE_WEIGHT / CANARY_WEIGHT environment splits
traffic between the two track Services. A release:

1. finds the version's archive (a verified `flywheel package` output, or packages it now) and logs it
   to the version's run in the tracking server (`serving-archive/NAME-VERSION.mar`): the pods' init
   containers fetch it from there (MLflow's proxied artifact store) and check its sha256;
2. points `serving-canary` at it (FLYWHEEL_ARCHIVE_* env, the version label, optionally a new
   image), scales it to `canary_replicas`, waits for the rollout;
3. runs the same acceptance as every other target (`run_acceptance`, `marked_predict`) on the canary
   alone, through its gate (`canary_url`: a port-forward or internal address of serving-canary);
4. moves the gateway's weights step by step (`canary_steps`, e.g. 10 → 50 → 100 %), waiting for
   each gateway rollout and checking the canary stays available for `step_pause_s`;
5. promotes: `serving-stable` gets the archive (rolling update under its PDB while the canary carries
   the traffic), weights back to stable 100 %, canary scaled to 0; then the alias moves with the same
   registry bookkeeping as the other targets (`mark_deployed`, the archive's stamp);
6. any failure rolls back what this release changed (`rollback_actions`): weights to stable 100 %,
   the canary to 0 replicas, the stable track to its previous archive if it was touched. No alias moves.

Design: every decision is a plain function on plain data, dicts shaped like the API's Deployment
(`rollout_state`, `next_step`, `canary_available`, `rollback_actions`; the steps' rule is release.canary_plan) and every
change a plain strategic-merge patch (`archive_patch`, `weights_patch`, `scale_patch`); they are what
the tests check. `Cluster` is the thin layer of official-client calls (kubernetes 36): read, patch,
nothing else. Those calls have never met a real API server (none can run where Flywheel is tested):
docs/runbooks/kubernetes.md says so, and what did run here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flywheel.contracts.manifest import ArchiveStamp
from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError
from flywheel.serving.release import (
    AcceptanceConfig,
    AcceptanceData,
    ReleaseFailed,
    ReleaseResult,
    _begin,
    canary_plan,
    marked_predict,
    parse_canary_steps,
    run_acceptance,
    verify_archive,
)

log = logging.getLogger(__name__)

# Names in deploy/kubernetes/base (tests/test_kubernetes.py checks the manifests use exactly these).
STABLE = "serving-stable"
CANARY = "serving-canary"
GATEWAY = "serving-gateway"
FETCH_CONTAINER = "fetch-archive"
SERVING_CONTAINER = "torchserve"
GATEWAY_CONTAINER = "haproxy"
VERSION_LABEL = "flywheel.io/version"
ARCHIVE_ENV = ("FLYWHEEL_MODEL", "FLYWHEEL_ARCHIVE_VERSION", "FLYWHEEL_ARCHIVE_URI", "FLYWHEEL_ARCHIVE_SHA256")
WEIGHT_ENV = ("STABLE_WEIGHT", "CANARY_WEIGHT")
ARCHIVE_ARTIFACT_DIR = "serving-archive"  # in the version's run: where the pods fetch the .mar from
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


@dataclass(frozen=True)
class KubernetesTarget:
    """A namespace holding deploy/kubernetes's serving pool, reached with a kubeconfig context."""

    namespace: str
    canary_url: str  # where this machine reaches serving-canary's gate (e.g. a kubectl port-forward)
    pool_token: str  # the pool credential (Secret serving-pool, key `token`)
    context: str | None = None  # kubeconfig context; None: the current one
    in_cluster: bool = False  # running in a pod: its service account, not a kubeconfig
    image: str | None = None  # a new serving image for both tracks; None: keep the one running
    canary_replicas: int = 1
    canary_steps: tuple[int, ...] = (10, 50, 100)  # the canary's share of traffic, percent
    step_pause_s: float = 60.0  # each step's observation time before the next
    rollout_timeout_s: float = 600.0
    poll_s: float = 2.0

    def describe(self) -> str:
        return f"kubernetes {self.context or 'current-context'}/{self.namespace}"

    @classmethod
    def from_options(cls, namespace: str | None, canary_url: str | None, context: str | None = None,
                     canary_steps: str = "10,50,100", step_pause_s: float = 60.0) -> KubernetesTarget:
        """The CLI's target: the pool credential from FLYWHEEL_POOL_TOKEN (never a flag: argv is visible)."""
        import os

        token = os.environ.get("FLYWHEEL_POOL_TOKEN", "")
        if not (namespace and canary_url and token):
            raise FlywheelError("release --target kubernetes needs --namespace, --canary-url (e.g. `kubectl "
                                "port-forward svc/serving-canary 8000`) and FLYWHEEL_POOL_TOKEN (Secret serving-pool)")
        return cls(namespace, canary_url, token, context=context, canary_steps=parse_canary_steps(canary_steps),
                   step_pause_s=step_pause_s)


# ------------------------------------------------------------------------------ plain-data decisions
@dataclass(frozen=True)
class Rollout:
    """Where a Deployment's rollout stands, read from its status the way `kubectl rollout status` does."""

    done: bool
    failed: str | None = None  # the controller gave up (ProgressDeadlineExceeded)
    waiting_for: str = ""


def rollout_state(deployment: Mapping) -> Rollout:
    """Done when the controller has seen the newest spec and every wanted replica is updated and
    available with no old replica left; failed when its Progressing condition says the deadline passed."""
    meta, spec, status = deployment.get("metadata", {}), deployment.get("spec", {}), deployment.get("status") or {}
    generation, observed = meta.get("generation", 0), status.get("observedGeneration", 0)
    if observed < generation:
        return Rollout(False, waiting_for=f"the controller to see generation {generation} (seen {observed})")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Rollout(False, failed=f"progress deadline exceeded: {cond.get('message', '')}".strip())
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total, available = status.get("replicas", 0), status.get("availableReplicas", 0)
    if updated < wanted:
        return Rollout(False, waiting_for=f"{updated} of {wanted} replicas updated")
    if total > updated:
        return Rollout(False, waiting_for=f"{total - updated} old replica(s) to terminate")
    if available < updated:
        return Rollout(False, waiting_for=f"{available} of {updated} updated replicas available")
    return Rollout(True)


def next_step(state: Rollout, elapsed_s: float, timeout_s: float) -> str:
    """"done", "wait" or "give_up" for a rollout watched for `elapsed_s` of `timeout_s`."""
    if state.done:
        return "done"
    if state.failed is not None or elapsed_s >= timeout_s:
        return "give_up"
    return "wait"


def canary_available(deployment: Mapping) -> str | None:
    """None while the canary's wanted replicas are all available; else why not (a step's live check)."""
    wanted = deployment.get("spec", {}).get("replicas", 1)
    status = deployment.get("status") or {}
    available, unavailable = status.get("availableReplicas", 0), status.get("unavailableReplicas", 0)
    if available < wanted or unavailable:
        return f"canary has {available} of {wanted} replicas available ({unavailable} unavailable)"
    return None


def archive_env(model: str, version: str, uri: str, sha256: str) -> list[dict]:
    """The fetch-archive init container's environment for one archive."""
    return [{"name": n, "value": v} for n, v in zip(ARCHIVE_ENV, (model, str(version), uri, sha256), strict=True)]


def archive_patch(model: str, version: str, uri: str, sha256: str, image: str | None = None,
                  replicas: int | None = None) -> dict:
    """Strategic-merge patch pointing a serving Deployment at an archive (and an image, replicas)."""
    pod: dict = {"initContainers": [{"name": FETCH_CONTAINER, "env": archive_env(model, version, uri, sha256)}]}
    if image:
        pod["initContainers"][0]["image"] = image
        pod["containers"] = [{"name": SERVING_CONTAINER, "image": image}]
    patch: dict = {"spec": {"template": {"metadata": {"labels": {VERSION_LABEL: str(version)}}, "spec": pod}}}
    if replicas is not None:
        patch["spec"]["replicas"] = replicas
    return patch


def released_archive(deployment: Mapping) -> dict[str, str] | None:
    """FLYWHEEL_ARCHIVE_* of a serving Deployment's fetch container (None: nothing released there yet),
    plus its image: what a rollback of that Deployment restores."""
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    fetch = next((c for c in pod.get("initContainers") or [] if c.get("name") == FETCH_CONTAINER), None)
    if fetch is None:
        raise FlywheelError(f"{deployment.get('metadata', {}).get('name')} has no {FETCH_CONTAINER} init container: "
                            "is this deploy/kubernetes's serving Deployment?")
    env = {e["name"]: e.get("value", "") for e in fetch.get("env") or [] if "name" in e}
    values = {n: env.get(n, "") for n in ARCHIVE_ENV}
    if not (values["FLYWHEEL_ARCHIVE_URI"] and values["FLYWHEEL_ARCHIVE_VERSION"]):
        return None
    return {**values, "image": fetch.get("image", "")}


def weights_patch(canary_percent: int) -> dict:
    """Strategic-merge patch of the gateway Deployment: the canary's share of traffic, percent."""
    if not 0 <= canary_percent <= 100:
        raise FlywheelError(f"canary weight {canary_percent} is not a percentage")
    values = (100 - canary_percent, canary_percent)
    env = [{"name": n, "value": str(v)} for n, v in zip(WEIGHT_ENV, values, strict=True)]
    return {"spec": {"template": {"spec": {"containers": [{"name": GATEWAY_CONTAINER, "env": env}]}}}}


def weights_of(gateway: Mapping) -> tuple[int, int]:
    """(stable, canary) weights in a gateway Deployment's spec."""
    pod = gateway.get("spec", {}).get("template", {}).get("spec", {})
    c = next((c for c in pod.get("containers", []) if c.get("name") == GATEWAY_CONTAINER), {})
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    try:
        return int(env[WEIGHT_ENV[0]]), int(env[WEIGHT_ENV[1]])
    except (KeyError, TypeError, ValueError):
        raise FlywheelError(f"{GATEWAY} has no numeric {' and '.join(WEIGHT_ENV)} in its {GATEWAY_CONTAINER} "
                            "container: is this deploy/kubernetes's gateway?") from None


def restore_patch(previous: Mapping | None, model: str) -> dict:
    """The patch putting a serving Deployment back to `released_archive()`'s record (None: no archive,
    as before the first release: its pods then wait in Init, serving nothing)."""
    if previous is None:
        patch = archive_patch(model, "", "", "")
        patch["spec"]["template"]["metadata"]["labels"][VERSION_LABEL] = "none"
        return patch
    return archive_patch(previous["FLYWHEEL_MODEL"] or model, previous["FLYWHEEL_ARCHIVE_VERSION"],
                         previous["FLYWHEEL_ARCHIVE_URI"], previous["FLYWHEEL_ARCHIVE_SHA256"],
                         previous.get("image") or None)


def scale_patch(replicas: int) -> dict:
    return {"spec": {"replicas": replicas}}


@dataclass
class Progress:
    """What a release has changed so far: `rollback_actions` undoes exactly that."""

    canary_touched: bool = False
    canary_weight: int = 0  # the share last set on the gateway
    stable_touched: bool = False
    previous_stable: dict | None = None  # released_archive() of serving-stable before the release


def rollback_actions(progress: Progress) -> list[tuple[str, object]]:
    """The steps that undo a failed release, in order: the stable track back first (while the canary
    still carries the traffic it was given), then the traffic back to stable, then the canary down."""
    actions: list[tuple[str, object]] = []
    if progress.stable_touched:  # None: it served nothing before, and serves nothing again
        actions.append(("restore_stable", progress.previous_stable))
    if progress.canary_weight:
        actions.append(("weights", 0))
    if progress.canary_touched:
        actions.append(("scale_canary", 0))
    return actions


# ------------------------------------------------------------------------- the official client, thin
class Cluster:
    """Reads and strategic-merge patches of Deployments in one namespace (kubernetes Python client).

    Never exercised against a real API server (docs/runbooks/kubernetes.md)."""

    def __init__(self, target: KubernetesTarget):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            if target.in_cluster:
                config.load_incluster_config()
            else:
                config.load_kube_config(context=target.context)
        except (ConfigException, OSError) as exc:
            raise FlywheelError(f"no Kubernetes credentials for {target.describe()}: {exc}") from None
        self.namespace = target.namespace
        self.api = client.ApiClient()
        self.apps = client.AppsV1Api(self.api)

    def read(self, name: str) -> dict:
        """The Deployment as the API's JSON (camelCase), spec and status."""
        return self.api.sanitize_for_serialization(self.apps.read_namespaced_deployment(name, self.namespace))

    def patch(self, name: str, body: dict) -> dict:
        # The client would send a dict body as a JSON patch (its first PATCH content type): say which.
        obj = self.apps.patch_namespaced_deployment(name, self.namespace, body, _content_type=STRATEGIC_MERGE)
        return self.api.sanitize_for_serialization(obj)


def wait_rollout(read: Callable[[], dict], name: str, timeout_s: float, poll_s: float,
                 result: ReleaseResult, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll `read()` until `next_step` says done (return) or give_up (ReleaseFailed)."""
    start = clock()
    while True:
        state = rollout_state(read())
        decision = next_step(state, clock() - start, timeout_s)
        if decision == "done":
            result.event(f"{name} rolled out")
            return
        if decision == "give_up":
            raise ReleaseFailed(f"{name} rollout did not complete: "
                                f"{state.failed or f'still waiting for {state.waiting_for} after {timeout_s:.0f}s'}")
        sleep(poll_s)


# ------------------------------------------------------------------------------------------ release
def publish_archive(settings: Settings, mv, mar_path: Path) -> str:
    """Log the .mar to the version's run (`serving-archive/`) and return the URI the pods fetch it from.
    The cluster reaches artifacts only through the tracking server (mlflow-artifacts:/)."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(mv.run_id)
    if not run.info.artifact_uri.startswith("mlflow-artifacts:"):
        raise FlywheelError(f"run {mv.run_id} stores artifacts at {run.info.artifact_uri}, which pods cannot fetch: "
                            "release to Kubernetes from a tracking server with proxied artifacts "
                            "(mlflow server --serve-artifacts, deploy/tracking)")
    client.log_artifact(mv.run_id, str(mar_path), ARCHIVE_ARTIFACT_DIR)
    return f"{run.info.artifact_uri.rstrip('/')}/{ARCHIVE_ARTIFACT_DIR}/{Path(mar_path).name}"


def _archive_for(settings: Settings, model: str, version: str, run_id: str, mar_path: Path | None):
    """(path, manifest) of a verified archive: the given one, `flywheel package`'s output, or packaged now."""
    from flywheel.serving.package import PackageConfig, package_version

    if mar_path is not None:
        return mar_path, verify_archive(mar_path, model, version, run_id)
    default = settings.work_dir / "model-store" / f"{model}-{version}.mar"
    if default.is_file():
        try:
            return default, verify_archive(default, model, version, run_id)
        except FlywheelError as exc:
            log.warning("packaging again: %s", exc)
    path = package_version(PackageConfig(model, version=version), settings).mar_path
    return path, verify_archive(path, model, version, run_id)


def kubernetes_release(settings: Settings, model: str, version: str, env: str, target: KubernetesTarget,
                       acceptance: AcceptanceConfig = AcceptanceConfig(), mar_path: Path | None = None,
                       cluster: Cluster | None = None) -> ReleaseResult:
    """Release registry version `version` of `model` to `env` on the cluster's serving pool (module doc)."""
    from flywheel.core.registry import mark_deployed
    from flywheel.serving.torchserve import TorchServeClient

    plan = canary_plan(target.canary_steps)
    cluster = cluster or Cluster(target)  # credentials first: nothing is published for a cluster we can't reach
    mv, result = _begin(settings, model, version, env, target.describe())
    version = result.version
    mar_path, manifest = _archive_for(settings, model, version, mv.run_id, mar_path)
    stamp = ArchiveStamp.of(mar_path, manifest)
    uri = publish_archive(settings, mv, mar_path)
    result.event(f"archive {Path(mar_path).name} (sha256 {stamp.sha256[:12]}) published at {uri}")
    previous = released_archive(cluster.read(STABLE))
    result.previous = previous["FLYWHEEL_ARCHIVE_VERSION"] if previous else None
    result.event(f"{STABLE} serves {result.previous or 'nothing yet'}")
    progress = Progress(previous_stable=previous)

    def rollout(name: str) -> None:
        wait_rollout(lambda: cluster.read(name), name, target.rollout_timeout_s, target.poll_s, result)

    try:
        # 2. The canary track gets the archive and its replicas.
        progress.canary_touched = True
        cluster.patch(CANARY, archive_patch(model, version, uri, stamp.sha256, target.image, target.canary_replicas))
        result.event(f"{CANARY} → v{version}, {target.canary_replicas} replica(s)")
        rollout(CANARY)
        # 3. Acceptance on the canary alone, through its gate.
        data = AcceptanceData.for_version(settings, model, version, acceptance)
        client = TorchServeClient(target.canary_url, inference_key=target.pool_token)
        report = run_acceptance(marked_predict(client, model, version), data, version, acceptance)
        result.report = report
        result.event(report.summary())
        if not report.passed:
            raise ReleaseFailed(f"{model} v{version} failed acceptance: {'; '.join(report.failures)}")
        # 4. Traffic moves step by step while the canary stays available.
        for share in plan:
            cluster.patch(GATEWAY, weights_patch(share))
            progress.canary_weight = share
            rollout(GATEWAY)
            result.event(f"{GATEWAY}: canary {share}%")
            time.sleep(target.step_pause_s)
            problem = canary_available(cluster.read(CANARY))
            if problem:
                raise ReleaseFailed(f"at {share}% of traffic: {problem}")
        # 5. Promote: the stable track gets the archive while the canary carries the traffic.
        progress.stable_touched = True
        cluster.patch(STABLE, archive_patch(model, version, uri, stamp.sha256, target.image))
        rollout(STABLE)
        cluster.patch(GATEWAY, weights_patch(0))
        progress.canary_weight = 0
        rollout(GATEWAY)
        result.switched = True
        result.event(f"{STABLE} → v{version}; {GATEWAY}: stable 100%")
        cluster.patch(CANARY, scale_patch(0))
        progress.canary_touched = False
        result.event(f"{CANARY} scaled to 0")
        mark_deployed(settings, model, version, env, target.describe(), archive=stamp)
    except Exception as exc:
        _roll_back(cluster, progress, result, model)
        if isinstance(exc, ReleaseFailed):
            exc.result = result
            raise
        raise ReleaseFailed(f"kubernetes release of {model} v{version} failed ({type(exc).__name__}: {exc}); "
                            "rolled back", result) from exc
    result.event(f"alias {env} → v{version}")
    result.event(f"registry: v{version} served as archive sha256 {stamp.sha256[:12]} ({stamp.format})")
    return result


def _roll_back(cluster: Cluster, progress: Progress, result: ReleaseResult, model: str) -> None:
    for action, arg in rollback_actions(progress):
        try:
            if action == "restore_stable":
                cluster.patch(STABLE, restore_patch(arg, model))
                result.event(f"{STABLE} restored to {'v' + arg['FLYWHEEL_ARCHIVE_VERSION'] if arg else 'no archive'}")
            elif action == "weights":
                cluster.patch(GATEWAY, weights_patch(0))
                result.event(f"{GATEWAY}: stable 100%")
            elif action == "scale_canary":
                cluster.patch(CANARY, scale_patch(0))
                result.event(f"{CANARY} scaled to 0")
        except Exception as exc:  # noqa: BLE001 - report the original failure; log this one and go on
            log.error("rollback step %s failed: %s", action, exc)
            result.event(f"rollback step {action} failed: {exc}")
    result.rolled_back = True

