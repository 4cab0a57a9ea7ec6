"""Two registered models on ONE TorchServe: a release of one never touches the other.

Real throughout: the serving fixture's Fashion-MNIST model (v1, v2) and a second model trained here
on sklearn's digits (a different registered name, dataset and class list), both packaged into .mar
files and released onto one real TorchServe with token auth; client threads send digits requests
while Fashion-MNIST v2 is released (warm-up, acceptance, set-default, retirement of nothing: v1 is
kept). Every digits request must succeed with the same answer from the same version, its default
version, registered versions, registry alias and deployment tag unchanged.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DIGITS = "digits-classifier"


@dataclass(frozen=True)
class DigitsModel:
    name: str
    version: str
    mar: Path
    accuracy: float


@pytest.fixture(scope="module")
def digits_model(serving_models) -> DigitsModel:
    """A second model in the serving fixture's registry: trained on digits, registered, packaged."""
    import mlflow

    from flywheel.core.config import Settings
    from flywheel.serving.package import PackageConfig, package_version
    from flywheel.training.train import TrainConfig, run_training

    settings = Settings.from_env(tracking_uri=serving_models.tracking_uri, work_dir=serving_models.work_dir,
                                 model_name=DIGITS).apply()
    result = run_training(TrainConfig(dataset="digits", epochs=3, batch_size=32, seed=0, register=False), settings)
    version = str(mlflow.register_model(result.model_uri, DIGITS).version)
    packaged = package_version(PackageConfig(DIGITS, version=version, out_dir=serving_models.model_store), settings)
    return DigitsModel(DIGITS, version, packaged.mar_path, result.metrics.get("test_accuracy", 0.0))


@pytest.mark.integration
def test_release_of_one_model_never_touches_another(serving_models, digits_model, tmp_path):
    from mlflow import MlflowClient

    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_test_split
    from flywheel.serving.release import AcceptanceConfig, ManagementTarget, release_version
    from flywheel.serving.torchserve import ServeConfig, TorchServeClient, start_torchserve

    fashion, (v1, v2) = serving_models.name, serving_models.versions[:2]
    digits, d1 = digits_model.name, digits_model.version
    settings = serving_models.settings()
    server = start_torchserve(ServeConfig.local(tmp_path / "ts", tmp_path / "store"))
    try:
        target = ManagementTarget(server.cfg.inference_address, server.cfg.management_address, server.key_file,
                                  server.cfg.model_store, grace_s=1.0, keep_previous=1)
        accept = AcceptanceConfig(min_accuracy=0.3, p95_slo_ms=5000, accuracy_samples=64, latency_requests=10)
        assert release_version(settings, fashion, v1, "dev", target, accept, mar_path=serving_models.mars[v1]).switched
        assert release_version(settings, digits, d1, "dev", target, accept, mar_path=digits_model.mar).switched

        client = target.client()
        registry = MlflowClient()
        digits_before = (client.default_version(digits), client.versions(digits),
                         registry.get_model_version_by_alias(digits, "dev").version,
                         registry.get_model_version(digits, d1).tags["deployed_dev_at"])
        images = load_test_split("digits")[0].images[:4]
        pngs = [encode_png(img) for img in images]
        baseline = []
        for png in pngs:
            r = client.predict(digits, png)
            assert r.status_code == 200, r.text
            baseline.append({k: v for k, v in r.json().items() if k != "prediction_id"})
        assert {b["model"] for b in baseline} == {digits} and {b["version"] for b in baseline} == {d1}

        stop = threading.Event()
        seen: list[tuple[int | None, int, object]] = []
        lock = threading.Lock()

        def digits_traffic(offset: int) -> None:
            own = TorchServeClient(server.cfg.inference_address, key_file=server.key_file, timeout=30)
            i = offset
            while not stop.is_set():
                k = i % len(pngs)
                try:
                    r = own.predict(digits, pngs[k])
                    body = r.json() if r.status_code == 200 else r.text[:200]
                    item = (r.status_code, k, {kk: v for kk, v in body.items() if kk != "prediction_id"}
                            if isinstance(body, dict) else body)
                except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                    item = (None, k, repr(exc))
                with lock:
                    seen.append(item)
                i += 1

        threads = [threading.Thread(target=digits_traffic, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            with lock:
                before_release = len(seen)
            done = release_version(settings, fashion, v2, "dev", target, accept, mar_path=serving_models.mars[v2])
            with lock:
                during_release = len(seen) - before_release
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(60)

        # model A switched
        assert done.switched and done.previous == v1 and done.report.passed
        assert client.default_version(fashion) == v2
        r = client.predict(fashion, encode_png(load_test_split("fashion-mnist")[0].images[0]))
        assert r.status_code == 200 and r.json()["version"] == v2
        # model B: every request answered, the same answer from the same version, nothing moved
        failures = [s for s in seen if s[0] != 200]
        assert during_release > 0 and not failures, (len(seen), failures[:5])
        changed = [(k, body) for _, k, body in seen if not _same_answer(body, baseline[k])]
        assert not changed, changed[:3]
        assert (client.default_version(digits), client.versions(digits),
                registry.get_model_version_by_alias(digits, "dev").version,
                registry.get_model_version(digits, d1).tags["deployed_dev_at"]) == digits_before
        assert str(registry.get_model_version_by_alias(fashion, "dev").version) == v2
    finally:
        server.stop()


def _same_answer(body: dict, base: dict) -> bool:
    """Same model, version and label; probabilities equal up to float noise (a batch may group requests)."""
    keys = ("model", "version", "label", "label_index")
    return all(body.get(k) == base[k] for k in keys) and abs(body["confidence"] - base["confidence"]) < 1e-4 \
        and [t["index"] for t in body["top_k"]][:1] == [t["index"] for t in base["top_k"]][:1]
