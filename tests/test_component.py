"""The component contract (flywheel.component): what `log_model` checks and logs, and that every later
step works from the registry alone, without the component's code. Real MLflow (the embedded store).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import flywheel.component as fc
from flywheel.core.config import Settings


def _rgb_splits(n: int = 600, size: int = 20):
    """Two classes a tiny network separates: red-ish vs blue-ish noise (honest synthetic data)."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, size=(n, size, size, 3), dtype=np.uint8)
    images[labels == 0, :, :, 0] += 120
    images[labels == 1, :, :, 2] += 120
    spec = fc.PreprocessSpec(channels=3, height=16, width=16, mean=(0.4, 0.3, 0.4), std=(0.25, 0.2, 0.25),
                             resize="crop")
    return fc.make_splits("red-blue", images, labels, ("red", "blue"), preprocess=spec, seed=0)


class TinyRGB(nn.Module):
    def __init__(self, classes: int = 2, embed_shape: str = "flat"):
        super().__init__()
        conv = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2)]
        self.body = nn.Sequential(*conv) if embed_shape == "map" else nn.Sequential(*conv, nn.Flatten())
        self.flat = nn.Flatten()
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        return self.out(self.flat(self.body(x)))


def _train(model, splits, **kw):
    settings = Settings.from_env(model_name=kw.pop("model_name", "red-blue"))
    return fc.train(model, splits, fc.FitConfig(epochs=1, batch_size=32, lr=1e-2), settings=settings, **kw), settings


def test_a_component_with_its_own_network_and_rgb_data_is_logged_gated_and_loaded_from_the_registry():
    splits = _rgb_splits()
    result, settings = _train(TinyRGB(), splits, embedding="body", name="tiny-rgb")
    assert result.registered_version == "1"
    model, spec = fc.load_model("models:/red-blue/1", tracking_uri=settings.tracking_uri)
    assert isinstance(model, torch.jit.ScriptModule)  # loaded from the logged file, not rebuilt from code
    assert spec.name == "tiny-rgb" and spec.class_names == ("red", "blue")
    assert spec.preprocess.channels == 3 and (spec.preprocess.height, spec.preprocess.width) == (16, 16)
    assert spec.embedding == fc.EmbeddingSpec("layer", 32, "body")
    assert spec.gate == fc.GateSpec("accuracy", "maximize")
    assert spec.parity["onnx"] <= 1e-4
    images, labels = fc.read_test_set(spec, settings.tracking_uri)
    assert images.shape[1:] == (20, 20, 3) and len(labels) == spec.test_set.n == len(splits.test)
    assert np.array_equal(images, splits.test.images)
    assert fc.load_spec("models:/red-blue/1", settings.tracking_uri) == spec


def test_no_embedding_named_falls_back_to_softmax_and_the_spec_says_so():
    result, settings = _train(TinyRGB(), _rgb_splits(), embedding=None, model_name="red-blue-softmax")
    spec = result.spec
    assert spec.embedding.source == "softmax" and spec.embedding.dim == 2
    model, _ = fc.load_model("models:/red-blue-softmax/1", tracking_uri=settings.tracking_uri)
    x = torch.randn(3, 3, 16, 16)
    logits, emb = model(x)
    assert torch.allclose(emb, torch.softmax(logits, 1), atol=1e-6)

    # The monitor watching it says which signal it tests (a real `flywheel monitor --once` process).
    from flywheel.core.registry import Registry

    Registry(settings).set_alias("red-blue-softmax", "prod", "1")
    captures = settings.work_dir / "captures"
    captures.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "flywheel", "monitor", "--once", "--model", "red-blue-softmax",
                           "--capture-uri", str(captures)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "names no embedding layer: drift is tested on its softmax outputs" in proc.stderr + proc.stdout


class NoExport(nn.Module):
    """A forward that TorchScript tracing cannot reproduce: the branch depends on the batch size, and
    the trace (of a 2-image batch) keeps only one branch."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        emb = self.features(x)
        if x.shape[0] > 2:
            return self.head(emb)
        return -self.head(emb)


@pytest.mark.parametrize(("model", "embedding", "says"), [
    (TinyRGB(), "nope", "embedding layer 'nope' is not a submodule"),
    (TinyRGB(embed_shape="map"), "body", "embedding: layer 'body' outputs (64, 8, 2, 2)"),
    (TinyRGB(classes=3), "body", "signature: model(x) must return logits of shape (64, 2)"),
    (NoExport(), "features", "export: torchscript export does not match eager PyTorch"),
])
def test_a_component_that_breaks_the_contract_fails_naming_it_and_registers_nothing(model, embedding, says):
    from mlflow import MlflowClient

    with pytest.raises(fc.ContractError if "submodule" not in says else Exception) as err:
        _train(model, _rgb_splits(), embedding=embedding, model_name="broken")
    assert says in str(err.value)
    settings = Settings.from_env()
    client = MlflowClient(settings.tracking_uri)
    assert client.search_registered_models() == [] or all(m.name != "broken" for m in client.search_registered_models())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status == "FAILED" for r in runs)  # the run says it failed; no model logged
    assert all(not r.outputs.model_outputs for r in runs if r.outputs)


def test_log_model_refuses_a_validation_split_too_small_for_the_monitors_reference():
    with pytest.raises(fc.ContractError, match="the validation split has 19 images; the monitor's reference needs"):
        _train(TinyRGB(), _rgb_splits(n=240), embedding="body", model_name="too-small")


def test_log_model_refuses_images_in_the_wrong_layout():
    splits = _rgb_splits()
    grey = fc.make_splits("grey", splits.train.images[..., 0], splits.train.labels, ("red", "blue"),
                          preprocess=splits.preprocess)  # (N, H, W) under a 3-channel spec
    with pytest.raises(fc.ContractError, match=r"images must be uint8 \(N, H, W, 3\) for 3 channel"):
        _train(TinyRGB(), grey, embedding="body", model_name="wrong-layout")


def test_a_test_set_changed_after_logging_is_refused(tmp_path):
    from flywheel.core.errors import FlywheelError

    result, settings = _train(TinyRGB(), _rgb_splits(), embedding="body", model_name="tampered")
    spec = result.spec
    forged = fc.TestSetRef(spec.test_set.uri, "0" * 64, spec.test_set.n)
    from dataclasses import replace

    with pytest.raises(FlywheelError, match="does not match the recorded"):
        fc.read_test_set(replace(spec, test_set=forged), settings.tracking_uri)


def test_package_and_evaluate_need_neither_the_components_code_nor_its_data(tmp_path):
    """The network class lives only in a module this process wrote; a fresh interpreter without it
    evaluates the version on its logged test set and packages it for TorchServe."""
    component = tmp_path / "component"
    component.mkdir()
    (component / "secret_net.py").write_text(textwrap.dedent('''
        from torch import nn
        class SecretNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.head = nn.Linear(4, 2)
            def forward(self, x):
                return self.head(self.features(x))
    '''))
    sys.path.insert(0, str(component))
    try:
        from secret_net import SecretNet

        result, settings = _train(SecretNet(), _rgb_splits(), embedding="features", model_name="secret")
    finally:
        sys.path.remove(str(component))
        sys.modules.pop("secret_net", None)
    code = textwrap.dedent('''
        import json, sys
        from flywheel.core.config import Settings
        from flywheel.core.evaluate import evaluate_uri
        from flywheel.serving.package import PackageConfig, package_version
        assert "secret_net" not in sys.modules
        try:
            import secret_net  # noqa: F401
            raise SystemExit("the component's code is importable: the test proves nothing")
        except ImportError:
            pass
        s = Settings.from_env(model_name="secret")
        report = evaluate_uri("models:/secret/1", None, s)
        res = package_version(PackageConfig(model_name="secret", version="1"), s)
        print(json.dumps({"accuracy": report.accuracy, "n": report.n, "mar": str(res.mar_path),
                          "arch": res.manifest.architecture, "pre": res.manifest.preprocess,
                          "embedding": res.manifest.embedding}))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == result.spec.test_set.n and abs(out["accuracy"] - result.metrics["test_accuracy"]) < 1e-9
    assert out["arch"] == "SecretNet" and out["pre"]["channels"] == 3
    assert out["embedding"] == {"source": "layer", "dim": 4, "layer": "features"}


def test_packaging_a_version_logged_without_the_contract_names_what_is_missing():
    """A model registered by hand (plain mlflow.pytorch.log_model): package refuses it, naming the spec."""
    import mlflow

    from flywheel.core.errors import FlywheelError
    from flywheel.serving.package import PackageConfig, package_version

    settings = Settings.from_env(model_name="by-hand").apply()
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(TinyRGB(), name="model", registered_model_name="by-hand",
                                        input_example=np.zeros((2, 3, 16, 16), dtype=np.float32))
    assert info.registered_model_version == 1
    with pytest.raises(FlywheelError, match="no flywheel_component.json .*not logged by flywheel.component.log_model"):
        package_version(PackageConfig(model_name="by-hand", version="1"), settings)


def test_the_reference_carries_the_input_statistics_of_its_images():
    """The monitor's input drift channel needs the reference's per-image statistics: log_model writes
    them for the same validation images as the embeddings, computed on the preprocessed tensor (RGB,
    16x16 centre crop here), and they read back with the reference; so does its texture channel's
    model (fitted on training images) with the same images' texture statistics, and the texture-shift
    channel's directions (fitted on training images and their TUNING corruptions)."""
    import mlflow

    from flywheel.contracts.preprocessing import to_array
    from flywheel.contracts.reference import ReferenceSample, input_statistic_names, input_statistics

    splits = _rgb_splits()
    result, settings = _train(TinyRGB(), splits, embedding="body", name="tiny-rgb", model_name="red-blue-stats")
    run_id = mlflow.MlflowClient(settings.tracking_uri).get_model_version("red-blue-stats", "1").run_id
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reference",
                                                tracking_uri=settings.tracking_uri)
    ref = ReferenceSample.load(local)
    assert ref.input_stats is not None and ref.input_stats.shape == (len(ref.embeddings), len(input_statistic_names(3)))
    pick = np.sort(np.random.default_rng(0).permutation(len(splits.val))[:len(ref.embeddings)])  # log.py's pick
    np.testing.assert_allclose(ref.input_stats, input_statistics(to_array(splits.val.images[pick], splits.preprocess)),
                               rtol=1e-5, atol=1e-6)
    # the texture channel: a model fitted on training images, and its statistics of the same images
    from flywheel.component.log import fit_texture

    assert ref.texture is not None and ref.texture_stats.shape == (len(ref.embeddings), ref.texture.columns)
    refit = fit_texture(splits.train.images, splits.preprocess)
    np.testing.assert_allclose(ref.texture.precision, refit.precision, rtol=1e-6)
    np.testing.assert_allclose(ref.texture_stats, ref.texture.statistics(to_array(splits.val.images[pick],
                                                                                 splits.preprocess)), rtol=1e-6)
    # the texture-shift channel's directions: from the TUNING corruptions of the same training images
    from flywheel.component.log import fit_shift_directions

    refit_directions = fit_shift_directions(splits.train.images, splits.preprocess, refit)
    assert ref.shift_directions is not None
    np.testing.assert_allclose(ref.shift_directions.directions, refit_directions.directions, rtol=1e-5, atol=1e-6)
    # the residual channel: the training images' pixel subspace, and the residuals of the same images
    from flywheel.component.log import fit_subspace

    assert ref.subspace is not None and ref.residuals.shape == (len(ref.embeddings),)
    np.testing.assert_allclose(ref.subspace.basis, fit_subspace(splits.train.images, splits.preprocess).basis,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.residuals, ref.subspace.residuals(to_array(splits.val.images[pick],
                                                                              splits.preprocess)), rtol=1e-6)
    # the pixel channel's grain: the training images' weakest patch direction, and the grain of the same images
    from flywheel.component.log import fit_grain

    assert ref.grain is not None and ref.grain_scores.shape == (len(ref.embeddings),)
    refit_grain = fit_grain(splits.train.images, splits.preprocess)
    assert abs(ref.grain.mask @ refit_grain.mask) > 1 - 1e-6 and ref.grain.min_std == refit_grain.min_std  # (+-)
    np.testing.assert_allclose(ref.grain_scores, ref.grain.scores(to_array(splits.val.images[pick],
                                                                           splits.preprocess)), rtol=1e-6)
