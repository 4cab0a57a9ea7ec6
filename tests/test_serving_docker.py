"""Docker release target against a real dockerd (private, no bridge, no registry)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_docker_release_without_image_moves_nothing(dockerd, serving_models):
    """No image and no registry to pull from: the release fails clearly, no container, no alias."""
    import docker
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flywheel.serving.release import AcceptanceConfig, DockerTarget, ReleaseFailed, docker_release

    settings = serving_models.settings()
    target = DockerTarget(base_url=dockerd.base_url, image="flywheel-missing:1", grace_s=0)
    with pytest.raises(ReleaseFailed, match="flywheel-missing:1 is not on docker"):
        docker_release(settings, serving_models.name, serving_models.versions[0], "prod", target, AcceptanceConfig())
    assert docker.DockerClient(base_url=dockerd.base_url).containers.list(all=True) == []
    with pytest.raises(MlflowException):
        MlflowClient().get_model_version_by_alias(serving_models.name, "prod")


@pytest.mark.reliability
def test_serving_image_release_and_replace(dockerd, serving_base_image, serving_models):
    """Build the serving image (deploy/serving/Dockerfile) per version, release v1 then v2 to prod on
    Docker: healthy container, acceptance, alias moves, the old container is removed."""
    import docker
    from mlflow import MlflowClient

    from flywheel.serving.release import AcceptanceConfig, DockerTarget, build_image, docker_release
    from flywheel.serving.torchserve import TorchServeClient

    v1, v2, _ = serving_models.versions
    name = serving_models.name
    settings = serving_models.settings()
    base = DockerTarget(base_url=dockerd.base_url, grace_s=0, slots=(18080, 18090))
    for v in (v1, v2):
        build_image(base, serving_models.mars[v], f"{name}:{v}",
                    {"BASE_IMAGE": serving_base_image, "PREINSTALLED": "true"})
    accept = AcceptanceConfig(min_accuracy=0.3, p95_slo_ms=3000, accuracy_samples=96)
    first = docker_release(settings, name, v1, "prod", base, accept)
    assert first.switched and first.report.passed
    second = docker_release(settings, name, v2, "prod", base, accept)
    assert second.previous == v1 and second.unregistered == [v1]
    client = docker.DockerClient(base_url=dockerd.base_url)
    running = client.containers.list(filters={"label": f"flywheel.model={name}"})
    assert [c.labels["flywheel.version"] for c in running] == [v2]
    container = running[0]
    assert container.attrs["State"]["Health"]["Status"] == "healthy"
    assert container.attrs["Config"]["User"] == "10001"
    import json

    key = json.loads(container.exec_run(["cat", "/opt/flywheel/run/key_file.json"])[1])["inference"]["key"]
    port = int(container.labels["flywheel.slot"])
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits

    r = TorchServeClient(f"http://127.0.0.1:{port}", inference_key=key).predict(
        name, encode_png(load_splits("fashion-mnist").test.images[0]))
    assert r.status_code == 200 and r.json()["version"] == v2
    assert str(MlflowClient().get_model_version_by_alias(name, "prod").version) == v2
