"""`flywheel release`: put exactly one registry version behind an endpoint, prove it, never break traffic.

Management target (a running TorchServe): copy the version's .mar into the server's model store,
register it beside the serving default, warm it up, run acceptance on /predictions/M/V (smoke
predictions on fixed samples, accuracy on a labelled sample, p95 latency), then `set-default`, an
atomic switch for clients of /predictions/M. Earlier versions stay registered (reachable at
/predictions/M/VERSION for A/B) up to `keep_previous`; older ones are unregistered after a grace
period. Any failed step rolls back to the previous default and unregisters what this release added.

Docker target (docker SDK, local socket or ssh://): load the image M:V, start it beside the old
container on its own port, health + the same acceptance, then stop the old one (`docker_release`).

Triton target (`triton_release`, serving/triton.py): the version's folder in the server's model
repository, loaded beside the served versions through Triton's model-control API (version_policy
names them all: A/B on /v2/models/M/versions/V), the same acceptance, then the authenticating
proxy's default route moves (Triton alone would send unversioned requests to the highest version
the moment it loads). Steps 2-6 (accept, switch, alias, retire, roll back) are one function for
both engines (`_deploy`); only the step that makes a version servable differs.

Only a release that passed moves registry alias `dev`/`prod` and tags `deployed_<env>_at`, together
with the served archive's sha256 and format (`contracts.manifest.ArchiveStamp`: the .mar in the
server's model store, or the one in the container's image), so `flywheel trace` and an auditor can
check what ran.

Every request a release sends (warm-up, acceptance, the post-switch check) carries
`X-Flywheel-Traffic: warmup|acceptance`: the handler captures it marked, so it never counts as the
users' traffic the monitor watches (`marked_predict`).
"""

from __future__ import annotations

import base64
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flywheel.contracts.manifest import ArchiveStamp, Manifest
from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError, Rejected

if TYPE_CHECKING:
    from flywheel.serving.replica_files import ReplicaFiles

log = logging.getLogger(__name__)
ENVS = ("dev", "prod")
# What the serving image's entrypoint and HEALTHCHECK import (flywheel.serving.keys and the standard
# library only), relative to the flywheel package: build_context copies them to CONTEXT/flywheel/.
IMAGE_MODULES = ("__init__.py", "core/__init__.py", "core/errors.py", "serving/__init__.py", "serving/keys.py")


class ReleaseFailed(Rejected):
    """A release that did not pass; the endpoint was rolled back and no alias moved (the CLI exits 3)."""

    def __init__(self, message: str, result: ReleaseResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class AcceptanceConfig:
    min_accuracy: float = 0.8  # on `accuracy_samples` labelled test images
    p95_slo_ms: float = 100.0  # single-image requests, one client
    smoke_samples: int = 8
    accuracy_samples: int = 200
    latency_requests: int = 40
    warmup_requests: int = 5
    sample_offset: int = 64  # past package's parity batch, so acceptance sees other images


@dataclass
class AcceptanceReport:
    smoke_ok: bool = False
    accuracy: float = 0.0
    p50_ms: float = float("inf")
    p95_ms: float = float("inf")
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        return (f"acceptance {verdict} (smoke {'ok' if self.smoke_ok else 'failed'}, accuracy {self.accuracy:.3f}, "
                f"p50 {self.p50_ms:.1f} ms, p95 {self.p95_ms:.1f} ms)")


@dataclass
class ReleaseResult:
    model: str
    version: str
    env: str
    target: str
    previous: str | None = None
    report: AcceptanceReport | None = None
    switched: bool = False
    rolled_back: bool = False
    unregistered: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def event(self, text: str) -> None:
        log.info("release %s v%s → %s: %s", self.model, self.version, self.env, text)
        self.events.append(text)


@dataclass(frozen=True)
class AcceptanceData:
    """Fixed labelled images (the version's own labelled test set, named by its component spec) used
    by every check: acceptance needs neither the component's code nor its data loader."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    @classmethod
    def for_version(cls, settings: Settings, model: str, version: str, cfg: AcceptanceConfig) -> AcceptanceData:
        from flywheel.core.models import load_spec, read_test_set

        spec = load_spec(f"models:/{model}/{version}", settings.tracking_uri)
        images, labels = read_test_set(spec, settings.tracking_uri)
        n = max(cfg.smoke_samples, cfg.accuracy_samples, cfg.latency_requests)
        start = cfg.sample_offset if len(labels) >= cfg.sample_offset + n else 0
        return cls(images[start:start + n], labels[start:start + n], spec.class_names)


def marked_predict(client, model: str, version: str | None = None) -> Callable[..., object]:
    """`predict(body, traffic="acceptance")` against `client` (a TorchServeClient), each request marked
    with the X-Flywheel-Traffic header so capture stores it apart from live traffic."""
    from flywheel.contracts.capture import TRAFFIC_HEADER

    def predict(body, traffic: str = "acceptance"):
        return client.predict(model, body, version=version, headers={TRAFFIC_HEADER: traffic})

    return predict


def run_acceptance(predict: Callable[..., object], data: AcceptanceData, version: str,
                   cfg: AcceptanceConfig) -> AcceptanceReport:
    """Smoke, accuracy and latency checks against one endpoint. `predict(body, traffic="acceptance")`
    returns a response; warm-up requests are sent with traffic="warmup" (see `marked_predict`)."""
    from flywheel.contracts.preprocessing import encode_png

    report = AcceptanceReport()
    pngs = [encode_png(img) for img in data.images]
    for png in pngs[:cfg.warmup_requests]:
        predict(png, "warmup")
    # Smoke: fixed samples answer 200 with a known label from exactly this version.
    bad = []
    for i, png in enumerate(pngs[:cfg.smoke_samples]):
        r = predict(png)
        body = _json(r)
        if r.status_code != 200 or body.get("label") not in data.class_names or str(body.get("version")) != version:
            bad.append(f"sample {i}: HTTP {r.status_code} {str(body)[:120]}")
    report.smoke_ok = not bad
    if bad:
        report.failures.append(f"smoke predictions failed ({len(bad)}/{cfg.smoke_samples}): {bad[0]}")
        return report
    # Accuracy: labelled sample, sent as JSON batches of base64 images.
    n = min(cfg.accuracy_samples, len(pngs))
    correct = 0
    for start in range(0, n, 32):
        chunk = pngs[start:min(n, start + 32)]
        r = predict({"images": [base64.b64encode(p).decode() for p in chunk], "top_k": 1})
        preds = _json(r).get("predictions") if r.status_code == 200 else None
        if not preds or len(preds) != len(chunk):
            report.failures.append(f"accuracy batch failed: HTTP {r.status_code} {r.text[:120]}")
            return report
        labels = data.labels[start:start + len(chunk)]
        correct += sum(int(p["label_index"]) == int(y) for p, y in zip(preds, labels, strict=True))
    report.accuracy = correct / n
    if report.accuracy < cfg.min_accuracy:
        report.failures.append(f"accuracy {report.accuracy:.3f} < threshold {cfg.min_accuracy}")
    # Latency: sequential single-image requests, as one client sees them.
    times = []
    for i in range(cfg.latency_requests):
        t0 = time.perf_counter()
        r = predict(pngs[i % len(pngs)])
        times.append((time.perf_counter() - t0) * 1000.0)
        if r.status_code != 200:
            report.failures.append(f"latency probe failed: HTTP {r.status_code}")
            return report
    report.p50_ms, report.p95_ms = (float(v) for v in np.percentile(times, [50, 95]))
    if report.p95_ms > cfg.p95_slo_ms:
        report.failures.append(f"p95 latency {report.p95_ms:.1f} ms > SLO {cfg.p95_slo_ms} ms")
    return report


def _json(r) -> dict:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


@dataclass(frozen=True)
class ManagementTarget:
    """A running TorchServe reached through its management API."""

    inference_url: str
    management_url: str
    key_file: Path
    model_store: Path  # the server's model store: the .mar is copied here
    workers: int = 1
    grace_s: float = 10.0  # in-flight requests on the old default finish before it is unregistered
    keep_previous: int = 1  # earlier versions left registered for A/B and instant rollback
    # Where key_file and model_store are (serving/replica_files.py); None: on this host. A pool replica
    # on another host passes its SFTP files.
    files: ReplicaFiles | None = None

    def describe(self) -> str:
        return f"torchserve {self.inference_url}"

    def store(self) -> ReplicaFiles:
        """The server's key file and model store, wherever they are."""
        from flywheel.serving.replica_files import LocalFiles

        return self.files or LocalFiles(Path(self.key_file), Path(self.model_store))

    def client(self, timeout: float = 30.0):
        from flywheel.serving.replica_files import key_options
        from flywheel.serving.torchserve import TorchServeClient

        return TorchServeClient(self.inference_url, self.management_url, timeout=timeout,
                                **key_options(self.key_file, self.files))


def release_version(settings: Settings, model: str, version: str, env: str, target: ManagementTarget,
                    acceptance: AcceptanceConfig = AcceptanceConfig(), mar_path: Path | None = None,
                    package_options: dict | None = None, retire: bool = True, *, switch: bool = True,
                    record: bool = True) -> ReleaseResult:
    """Release registry version `version` of `model` to `env` on a TorchServe; see the module doc.

    A serving pool (serving/pool.py) runs this per replica: `switch=False` stops after acceptance (the
    version stays registered beside the default, for a canary), `record=False` leaves the registry
    alone (the pool moves the alias once, after every replica passed)."""
    from flywheel.serving.package import PackageConfig, package_version

    client = target.client()
    # 1. The archive: this version's .mar in the server's model store. One `flywheel package` made
    #    (given, or found where package writes it) is verified, not rebuilt; else package it now.
    #    A given archive names its version and run, so it is registered at once and the registry is
    #    asked whether that run is this version while the server starts the worker (below).
    early = mar_path is not None and str(version).isdigit()
    if early:
        _check_env(env)
        version = str(version)
        mv, result = None, ReleaseResult(model, version, env, target.describe())
        manifest = verify_archive(mar_path, model, version)
    else:
        mv, result = _begin(settings, model, version, env, target.describe())
        version = result.version
        if mar_path is not None:
            manifest = verify_archive(mar_path, model, version, mv.run_id)
        elif not package_options:  # asked-for package options: build with them, don't reuse
            mar_path, manifest = _packaged_archive(settings, target, model, version, mv.run_id)
        if mar_path is None:
            mar_path = package_version(PackageConfig(model, version=version, **(package_options or {})),
                                       settings).mar_path
            manifest = verify_archive(mar_path, model, version, mv.run_id)
    versions = client.versions(model)
    result.previous = next((v for v, d in versions.items() if d), None)
    result.event(f"serving default before release: {result.previous or 'none'}")
    result.event(f"archive {mar_path} ({manifest.artifact['format']}, sha256 "
                 f"{manifest.artifact['sha256'][:12]} verified)")
    store_name = f"{model}-{version}.mar"
    store = target.store()
    store.put_archive(Path(mar_path), store_name)  # atomic: TorchServe never sees half an archive
    stamp = store.stamp(store_name, manifest) if record else None  # the file the server loads

    registered_here = version not in versions
    if registered_here:
        step = _Step(lambda: client.register(store_name, initial_workers=target.workers), "register failed",
                     f"registered {store_name} with {target.workers} worker(s)")
    else:
        step = _Step(lambda: client.scale(model, version, target.workers), "scale failed",
                     "version already registered; scaled")
    return _deploy(settings, target, client, result, step, registered_here, acceptance, retire,
                   mv=mv, manifest=manifest, source=mar_path, archive=stamp, switch=switch, record=record)


@dataclass(frozen=True)
class _Step:
    """The engine's step that makes the new version servable beside the default (TorchServe: register
    or scale; Triton: load). `call()` returns a response; 200 is success."""

    call: Callable[[], object]
    failed: str  # the failure's first words
    done: str  # the event on success


def _deploy(settings: Settings, target, client, result: ReleaseResult, step: _Step, registered_here: bool,
            acceptance: AcceptanceConfig, retire: bool, *, mv=None, manifest: Manifest | None = None,
            source: Path | None = None, archive: ArchiveStamp | None = None, switch: bool = True,
            record: bool = True) -> ReleaseResult:
    """Steps 2-6 of a release, for every engine: make the version servable, accept it on its own
    versioned route, switch the default, move the alias, retire old versions; roll back on failure.
    `client` has the TorchServe client's verbs (predict, set_default, unregister, versions, explain);
    `mv` None: the registry is asked here, while `step` runs, whether `manifest`'s run is this version;
    `archive`: what the server loads, recorded on the version with the alias move. `switch` False:
    stop once accepted (registered beside the default); `record` False: no alias move, no retiring."""
    from flywheel.core.registry import mark_deployed

    model, version, env = result.model, result.version, result.env
    pool = ThreadPoolExecutor(1, thread_name_prefix="flywheel-register")
    try:
        # 2. Register beside the current default (clients keep hitting the old one) and scale. The
        #    server starts the worker in its own process meanwhile (most of a registration), so the
        #    registry check and the acceptance data are done here in parallel.
        pending = pool.submit(step.call)
        try:
            if mv is None:
                mv, _ = _begin(settings, model, version, env, target.describe())
                if mv.run_id != manifest.run_id:
                    raise ReleaseFailed(f"{source} was packaged from run {manifest.run_id}, but {model} "
                                        f"v{version} in this registry is run {mv.run_id}: package it again")
                result.event(f"registry: v{version} is run {mv.run_id}, as the archive says")
            data = AcceptanceData.for_version(settings, model, version, acceptance)
        finally:
            r = pending.result()  # always waited for: a rollback must see the registration's outcome
        if r.status_code != 200:
            raise ReleaseFailed(f"{step.failed}: {client.explain(r, 'management')}")
        result.event(step.done)
        # 3. Warm-up and acceptance on /predictions/M/V only.
        report = run_acceptance(marked_predict(client, model, version), data, version, acceptance)
        result.report = report
        result.event(report.summary())
        if not report.passed:
            raise ReleaseFailed(f"{model} v{version} failed acceptance: {'; '.join(report.failures)}")
        if not switch:
            return result
        # 4. Switch: set-default is atomic for /predictions/M.
        r = client.set_default(model, version)
        if r.status_code != 200:
            raise ReleaseFailed(f"set-default failed: {client.explain(r, 'management')}")
        result.switched = True
        check = marked_predict(client, model)(_first_png(data))
        if check.status_code != 200 or str(_json(check).get("version")) != version:
            raise ReleaseFailed(f"after the switch /predictions/{model} answered HTTP {check.status_code} "
                                f"version {_json(check).get('version')}, not {version}")
        if result.previous == version:  # set-default changed nothing (one server as dev and prod)
            result.switched = False
            result.event(f"v{version} is already the default: nothing to switch")
        else:
            result.event(f"default switched {result.previous or 'none'} → {version}")
    except Exception as exc:
        _rollback(client, result, registered_here)
        if isinstance(exc, ReleaseFailed):
            exc.result = result
            raise
        raise ReleaseFailed(f"release of {model} v{version} failed ({type(exc).__name__}: {exc}); rolled back",
                            result) from exc
    finally:
        pool.shutdown(wait=False)

    if not record:
        return result
    # 5. Only now does the registry move; if it cannot, the endpoint goes back to match it.
    try:
        mark_deployed(settings, model, version, env, target.describe(), archive=archive)
    except Exception as exc:
        _rollback(client, result, registered_here)
        raise ReleaseFailed(f"could not move alias {env!r} to v{version} ({type(exc).__name__}: {exc}); "
                            "the endpoint was rolled back so it matches the registry", result) from exc
    result.event(f"alias {env} → v{version}")
    if archive is not None:
        result.event(f"registry: v{version} served as archive sha256 {archive.sha256[:12]} ({archive.format})")
    # 6. Retire versions beyond keep_previous after the grace period (in-flight requests finish).
    #    The new version is already served; `retire=False` leaves this to the caller (the CLI
    #    reports success first, then waits out the grace period).
    if retire:
        retire_previous(target, result)
    return result


@dataclass(frozen=True)
class TritonTarget:
    """A running Triton reached through its authenticating proxy (serving/triton.py), with its model
    repository on this filesystem (the version folder is written there, then loaded)."""

    url: str  # the proxy: clients' address
    key_file: Path  # the proxy's key_file.json
    repository: Path
    grace_s: float = 10.0
    keep_previous: int = 1

    def describe(self) -> str:
        return f"triton {self.url}"

    def client(self):
        from flywheel.serving.triton import TritonClient, TritonEndpoint

        return TritonEndpoint(TritonClient(self.url, key_file=self.key_file), self.repository)


def triton_release(settings: Settings, model: str, version: str, env: str, target: TritonTarget,
                   acceptance: AcceptanceConfig = AcceptanceConfig(), package_options: dict | None = None,
                   retire: bool = True) -> ReleaseResult:
    """Release registry version `version` of `model` to `env` on a Triton: the version folder (made
    by `flywheel package --engine triton`, verified, or packaged now), loaded beside the served
    versions, the same acceptance on /v2/models/M/versions/V, then the proxy's default route moves,
    the alias moves, and versions beyond keep_previous are unloaded. Rolls back on failure."""
    from flywheel.serving.package import PackageConfig, package_triton

    mv, result = _begin(settings, model, version, env, target.describe())
    version = result.version
    client = target.client()
    folder = target.repository / model / version
    manifest = None
    if folder.is_dir() and not package_options:
        try:
            manifest = verify_archive(folder, model, version, mv.run_id)
        except FlywheelError as exc:
            log.warning("packaging again: %s", exc)
    if manifest is None:
        package_triton(PackageConfig(model, version=version, **(package_options or {})), settings, target.repository)
        manifest = verify_archive(folder, model, version, mv.run_id)
    versions = client.versions(model)
    result.previous = next((v for v, d in versions.items() if d), None)
    result.event(f"serving default before release: {result.previous or 'none'}")
    result.event(f"version folder {folder} ({manifest.artifact['format']}, sha256 "
                 f"{manifest.artifact['sha256'][:12]} verified)")
    registered_here = version not in versions
    if registered_here:
        step = _Step(lambda: client.register(model, version), "load failed",
                     f"loaded {model} v{version} beside {', '.join(versions) or 'nothing'}")
    else:
        step = _Step(lambda: client.register(model, version), "load failed", "version already loaded")
    # Triton loads the version folder's model file itself: it is the archive recorded on the version.
    served = str(manifest.artifact["sha256"])
    stamp = ArchiveStamp(served, str(manifest.artifact["format"]), served)
    return _deploy(settings, target, client, result, step, registered_here, acceptance, retire, mv=mv,
                   archive=stamp)


def retire_previous(target: ManagementTarget | TritonTarget, result: ReleaseResult) -> list[str]:
    """Unregister versions beyond `keep_previous` (the old default is kept first) after the grace period."""
    client = target.client()
    model, version = result.model, result.version
    others = sorted((v for v in client.versions(model) if v != version), key=_version_key, reverse=True)
    if result.previous in others:  # the old default is the first one kept
        others.remove(result.previous)
        others.insert(0, result.previous)
    retire = others[target.keep_previous:]
    if retire:
        time.sleep(target.grace_s)
        for v in retire:
            if client.unregister(model, v).status_code == 200:
                result.unregistered.append(v)
        result.event(f"unregistered old version(s) {', '.join(result.unregistered) or 'none'}")
    return retire


def verify_archive(mar_path: Path, model: str, version: str, run_id: str | None = None) -> Manifest:
    """The manifest of an existing .mar after checking it is what `flywheel package` made for exactly
    this registry version: name, version and run id; the served file's sha256; parity recorded
    within tolerance. FlywheelError otherwise."""
    import zipfile

    from flywheel.contracts.manifest import ChecksumMismatch
    from flywheel.serving.package import PARITY_TOL, TRT_PARITY_TOL

    try:
        manifest = Manifest.read(mar_path)
        manifest.verify(mar_path)
    except ChecksumMismatch as exc:
        raise FlywheelError(f"{mar_path}: {exc.file} does not match the sha256 in its manifest") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise FlywheelError(f"{mar_path} is not a flywheel archive ({type(exc).__name__}: {exc})") from None
    if manifest.model_version != str(version) or manifest.model_name != model:
        raise FlywheelError(f"{mar_path} holds {manifest.model_name} v{manifest.model_version}, "
                            f"not {model} v{version}")
    if run_id is not None and manifest.run_id != run_id:
        raise FlywheelError(f"{mar_path} was packaged from run {manifest.run_id}, but {model} v{version} "
                            f"in this registry is run {run_id}: package it again from this registry")
    artifact = manifest.artifact
    checked = next((e for e in manifest.exports if e.get("format") == artifact.get("format")), {})
    tol = TRT_PARITY_TOL if artifact.get("format") == "tensorrt" else PARITY_TOL
    if checked.get("max_abs_diff") is None or not checked["max_abs_diff"] <= tol:
        raise FlywheelError(f"{mar_path}: no passed parity check recorded for its {artifact.get('format')} file")
    return manifest


def _packaged_archive(settings: Settings, target: ManagementTarget, model: str, version: str,
                      run_id: str) -> tuple[Path | None, Manifest | None]:
    """A verified NAME-VERSION.mar already in the server's model store (when on this host) or package's
    default output."""
    for candidate in (target.store().local_path(f"{model}-{version}.mar"),
                      settings.work_dir / "model-store" / f"{model}-{version}.mar"):
        if candidate is not None and candidate.is_file():
            try:
                return candidate, verify_archive(candidate, model, version, run_id)
            except FlywheelError as exc:
                log.warning("not using %s: %s", candidate, exc)
    return None, None


def canary_plan(steps: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """A canary's traffic shares, checked: strictly increasing percentages in 1..100, ending at 100.
    The one rule of every target with a canary (the pool's HAProxy map, Kubernetes' gateway weights)."""
    plan = tuple(int(s) for s in steps)
    if not plan or plan[-1] != 100 or any(not 0 < s <= 100 for s in plan) or list(plan) != sorted(set(plan)):
        raise FlywheelError(f"canary steps {list(steps)}: give increasing percentages in 1..100 that end at 100, "
                            "e.g. 10,50,100")
    return plan


def parse_canary_steps(text: str) -> tuple[int, ...]:
    """The CLI's `--canary-steps 10,50,100` (a % sign and spaces allowed), checked by `canary_plan`."""
    try:
        shares = [int(x) for x in text.replace("%", "").split(",")]
    except ValueError:
        raise FlywheelError(f"--canary-steps takes percentages like 10,50,100 (a pool also takes none: a rolling "
                            f"release), not {text!r}") from None
    return canary_plan(shares)


def _check_env(env: str) -> None:
    if env not in ENVS:
        raise FlywheelError(f"unknown environment {env!r}; choose one of: {', '.join(ENVS)}")


def _begin(settings: Settings, model: str, version: str, env: str, where: str):
    """Validate the environment and resolve the registry version: (ModelVersion, a new ReleaseResult)."""
    from flywheel.core.registry import Registry

    _check_env(env)
    mv = Registry(settings).version(str(version), model)
    return mv, ReleaseResult(model, str(mv.version), env, where)


def _rollback(client, result: ReleaseResult, registered_here: bool) -> None:
    """Put the previous default back and remove what this release registered."""
    try:
        if result.switched and result.previous:
            client.set_default(result.model, result.previous)
            result.event(f"rolled back default to {result.previous}")
        if registered_here:
            client.unregister(result.model, result.version)
            result.event(f"unregistered v{result.version}")
    except Exception as exc:  # noqa: BLE001 - report the original failure, log this one
        log.error("rollback step failed: %s", exc)
        result.event(f"rollback step failed: {exc}")
    result.rolled_back = True


def _first_png(data: AcceptanceData) -> bytes:
    from flywheel.contracts.preprocessing import encode_png

    return encode_png(data.images[0])


def _version_key(v: str):
    try:
        return (0, float(v))
    except ValueError:
        return (1, v)


# ------------------------------------------------------------------------------------ Docker target
@dataclass(frozen=True)
class DockerTarget:
    """A Docker host running the serving image (deploy/serving/Dockerfile) blue/green.

    Two slots of host-network ports (inference p, management p+1, metrics p+2, gRPC p+3/p+4): the
    new version starts in the slot the old one does not use, is health-checked and accepted there,
    then the old container is removed after the grace period. A load balancer in front health-checks
    both slots' /ping, so traffic moves when the old container goes (the switch).
    """

    base_url: str | None = None  # unix:///var/run/docker.sock | ssh://user@host[:port]; None: DOCKER_HOST
    image: str | None = None  # default "<model>:<version>"
    image_tar: Path | None = None  # `docker save` tarball to load first (no registry needed)
    host: str = "127.0.0.1"  # where this machine reaches the containers' ports
    slots: tuple[int, int] = (8080, 8090)
    environment: dict = field(default_factory=dict)  # e.g. FLYWHEEL_CAPTURE_URI
    health_timeout_s: float = 180.0
    grace_s: float = 10.0

    def describe(self) -> str:
        return f"docker {self.base_url or 'DOCKER_HOST'}"


def build_context(mar_paths: list[Path], dest: Path) -> Path:
    """A Docker build context: deploy/serving's files plus model-store/ with the given archives."""
    from flywheel.serving.torchserve import REPO_DEPLOY

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Dockerfile", "config.properties", "metrics.yaml", "log4j2.xml", "healthcheck.py",
                 "entrypoint.py", "requirements-serving.txt"):
        shutil.copy(REPO_DEPLOY / name, dest / name)
    # The key renewer/reader for the entrypoint and HEALTHCHECK (standard library only).
    pkg = Path(__file__).resolve().parents[1]  # src/flywheel
    for name in IMAGE_MODULES:
        (dest / "flywheel" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pkg / name, dest / "flywheel" / name)
    (dest / "model-store").mkdir(exist_ok=True)
    for mar in mar_paths:
        shutil.copy(mar, dest / "model-store" / Path(mar).name)
    return dest


def build_image(target: DockerTarget, mar_path: Path, tag: str, build_args: dict | None = None) -> str:
    """Build the serving image MODEL:VERSION with the .mar baked into its model store."""
    from docker.errors import BuildError

    client = _docker_client(target)
    with tempfile.TemporaryDirectory(prefix="flywheel-image-") as tmp:
        ctx = build_context([mar_path], Path(tmp))
        try:
            image, _ = client.images.build(path=str(ctx), tag=tag, buildargs=build_args or {}, rm=True,
                                           network_mode="host")
        except BuildError as exc:
            tail = "".join(str(line.get("stream", line)) for line in list(exc.build_log)[-15:])
            raise FlywheelError(f"docker build of {tag} failed: {exc.msg}\n{tail}") from None
    return image.id


def _docker_client(target: DockerTarget):
    import docker
    from docker.errors import DockerException

    try:
        client = docker.DockerClient(base_url=target.base_url) if target.base_url else docker.from_env()
        client.ping()
    except DockerException as exc:
        raise FlywheelError(f"cannot reach the Docker engine at {target.describe()}: {exc}") from None
    return client


def _slot_env(port: int) -> dict[str, str]:
    # config.properties sets enable_envvars_config=true, so TS_* variables override its addresses.
    return {"TS_INFERENCE_ADDRESS": f"http://0.0.0.0:{port}", "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{port + 1}",
            "TS_METRICS_ADDRESS": f"http://0.0.0.0:{port + 2}", "TS_GRPC_INFERENCE_PORT": str(port + 3),
            "TS_GRPC_MANAGEMENT_PORT": str(port + 4)}


def _wait_container_healthy(container, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs.get("State", {})
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return
        if state.get("Status") in ("exited", "dead") or health == "unhealthy":
            logs = container.logs(tail=30).decode(errors="replace")
            raise ReleaseFailed(f"container {container.name} is {health or state.get('Status')}; last log:\n{logs}")
        time.sleep(1.0)
    raise ReleaseFailed(f"container {container.name} not healthy after {timeout_s:.0f}s")


CONTAINER_KEY_FILE = "/opt/flywheel/run/key_file.json"  # the serving image's TorchServe working dir
CONTAINER_MODEL_STORE = "/opt/flywheel/model-store"  # deploy/serving/Dockerfile's model store


def container_archive(container, model: str, version: str) -> ArchiveStamp:
    """The stamp of the .mar of `model` v`version` in a serving container's model store: the bytes the
    container serves, read out of it (`docker cp`), whatever file name the image gave them."""
    import io
    import tarfile
    import zipfile

    from docker.errors import APIError, NotFound

    try:
        chunks, _ = container.get_archive(CONTAINER_MODEL_STORE)
        data = b"".join(chunks)
    except (APIError, NotFound) as exc:
        raise ReleaseFailed(f"could not read {CONTAINER_MODEL_STORE} in {container.name}: {exc}") from None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.endswith(".mar")):
                continue
            mar = tar.extractfile(member).read()
            try:
                manifest = Manifest.read_bytes(mar)
            except (ValueError, KeyError, zipfile.BadZipFile):
                continue  # not a flywheel archive: another model's, or not a .mar at all
            if manifest.model_name == model and manifest.model_version == str(version):
                return ArchiveStamp.from_bytes(mar, manifest)
    raise ReleaseFailed(f"{container.name} holds no archive of {model} v{version} in {CONTAINER_MODEL_STORE}: "
                        "build the image with that version's .mar (flywheel.serving.release.build_image)")


def _container_keys(container) -> dict[str, str]:
    """The keys in a serving container's key file now (its entrypoint renews them)."""
    from flywheel.serving.keys import parse_key_file

    for _attempt in range(50):  # TorchServe truncates, then writes the file: an empty read is retried
        code, out = container.exec_run(["cat", CONTAINER_KEY_FILE])
        if code != 0:
            raise ReleaseFailed(f"could not read {CONTAINER_KEY_FILE} in {container.name}: {out[:200]!r}")
        try:
            return parse_key_file(out).as_dict()
        except (ValueError, KeyError, TypeError, AttributeError):
            time.sleep(0.05)
    raise ReleaseFailed(f"{CONTAINER_KEY_FILE} in {container.name} is not valid key_file.json")


def docker_release(settings: Settings, model: str, version: str, env: str, target: DockerTarget,
                   acceptance: AcceptanceConfig = AcceptanceConfig()) -> ReleaseResult:
    """Release image MODEL:VERSION to `env` on a Docker host; see DockerTarget. Rolls back on failure."""
    from docker.errors import APIError, ImageNotFound, NotFound

    from flywheel.core.registry import mark_deployed
    from flywheel.serving.torchserve import TorchServeClient

    mv, result = _begin(settings, model, version, env, target.describe())
    version = result.version
    client = _docker_client(target)
    ref = target.image or f"{model}:{version}"
    if target.image_tar is not None:
        with open(target.image_tar, "rb") as f:
            client.images.load(f.read())
        result.event(f"loaded {target.image_tar}")
    try:
        client.images.get(ref)
    except ImageNotFound:
        try:
            client.images.pull(ref)
        except (APIError, NotFound) as exc:
            raise ReleaseFailed(f"image {ref} is not on {target.describe()} and could not be pulled ({exc}); "
                                "build it from deploy/serving/Dockerfile or pass image_tar", result) from None
    labels = {"flywheel.model": model, "flywheel.env": env}
    old = client.containers.list(filters={"label": [f"{k}={v}" for k, v in labels.items()]})
    used = {c.labels.get("flywheel.slot") for c in old}
    port = next((p for p in target.slots if str(p) not in used), target.slots[0])
    result.previous = old[0].labels.get("flywheel.version") if old else None
    name = f"flywheel-{model}-{env}-v{version}".replace("/", "-")
    for stale in client.containers.list(all=True, filters={"name": f"^{name}$"}):
        stale.remove(force=True)
    container = client.containers.run(
        ref, detach=True, name=name, network_mode="host",
        environment={**_slot_env(port), **target.environment},
        labels={**labels, "flywheel.version": version, "flywheel.slot": str(port)})
    url = f"http://{target.host}:{port}"
    result.event(f"started {name} ({ref}) on {url}")
    try:
        _wait_container_healthy(container, target.health_timeout_s)
        ts = TorchServeClient(url, key_source=lambda: _container_keys(container),
                              key_source_name=f"{CONTAINER_KEY_FILE} in container {name}")
        data = AcceptanceData.for_version(settings, model, version, acceptance)
        report = run_acceptance(marked_predict(ts, model, version), data, version, acceptance)
        result.report = report
        result.event(report.summary())
        if not report.passed:
            raise ReleaseFailed(f"{model} v{version} failed acceptance: {'; '.join(report.failures)}")
        stamp = container_archive(container, model, version)
        result.event(f"archive in {name}: sha256 {stamp.sha256[:12]} ({stamp.format})")
    except Exception as exc:
        container.remove(force=True)
        result.rolled_back = True
        result.event(f"removed {name}; {len(old)} old container(s) untouched")
        if isinstance(exc, ReleaseFailed):
            exc.result = result
            raise
        raise ReleaseFailed(f"docker release of {model} v{version} failed ({type(exc).__name__}: {exc})",
                            result) from exc
    result.switched = True
    mark_deployed(settings, model, version, env, f"{target.describe()} {url}", archive=stamp)
    result.event(f"alias {env} → v{version}")
    if old:
        time.sleep(target.grace_s)
        for c in old:
            c.remove(force=True)
            result.unregistered.append(c.labels.get("flywheel.version", c.name))
        result.event(f"removed old container(s) {', '.join(c.name for c in old)}")
    return result

