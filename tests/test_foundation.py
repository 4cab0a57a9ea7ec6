"""Unit tests of the foundation: data, preprocessing, models, config, CLI errors."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flywheel.cli.project import split_nproc, translate
from flywheel.contracts.preprocessing import InvalidImage, PreprocessSpec, decode_image, encode_png, to_tensor
from flywheel.core.config import Settings
from flywheel.core.data import DATASETS, load_splits, read_idx
from flywheel.core.errors import DataError, FlywheelError
from flywheel.training.archs import ARCHITECTURES, build_model


def test_digest_is_content_stable_and_seed_sensitive():
    a, b = load_splits("digits", seed=0), load_splits("digits", seed=0)
    assert a.digest == b.digest and len(a.digest) == 64
    assert load_splits("digits", seed=1).digest != a.digest  # split membership is part of the content


def test_splits_deterministic_and_test_split_frozen():
    a, b, c = load_splits("digits", seed=0), load_splits("digits", seed=0), load_splits("digits", seed=7)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    assert not np.array_equal(a.val.images, c.val.images)  # the seed moves train/val …
    np.testing.assert_array_equal(a.test.images, c.test.images)  # … but never the test split
    total = len(a.train) + len(a.val) + len(a.test)
    assert total == 1797 and a.train.images.shape[1:] == (28, 28) and a.train.images.dtype == np.uint8


def test_fashion_mnist_from_system_dir():
    s = load_splits("fashion-mnist", seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.class_names[0] == "T-shirt/top" and s.test.images.shape == (10000, 28, 28)
    assert load_splits("fashion-mnist", seed=3).test.labels[:50].tolist() == s.test.labels[:50].tolist()


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError) as err:
        load_splits("cifar")
    assert all(name in str(err.value) for name in DATASETS)


def test_missing_and_corrupt_idx_files_are_named(tmp_path):
    with pytest.raises(DataError, match="missing: .*nothing.gz.*apt-get install dataset-fashion-mnist"):
        read_idx(tmp_path / "nothing.gz", 3)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=f"corrupt: {bad}"):
        read_idx(bad, 3)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 10))
    with pytest.raises(DataError, match="header says"):
        read_idx(short, 3)


def test_partial_data_dir_names_the_missing_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_splits("fashion-mnist", data_dir=tmp_path)


def test_imagefolder_split_is_by_content_and_labelled_data_adds_to_train(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("0", "1"):
        (tmp_path / cls).mkdir()
        for i in range(30):
            (tmp_path / cls / f"{i}.png").write_bytes(encode_png(rng.integers(0, 255, (28, 28), dtype=np.uint8)))
    s = load_splits("imagefolder", data_dir=tmp_path)
    assert s.class_names == ("0", "1") and len(s.train) + len(s.val) + len(s.test) == 60
    (tmp_path / "0" / "new.png").write_bytes(encode_png(rng.integers(0, 255, (28, 28), dtype=np.uint8)))
    grown = load_splits("imagefolder", data_dir=tmp_path)
    assert all(any(np.array_equal(t, g) for g in grown.test.images) for t in s.test.images)  # test images stay

    base = load_splits("digits")
    extra = tmp_path / "labelled"
    (extra / "3").mkdir(parents=True)
    (extra / "3" / "a.png").write_bytes(encode_png(base.test.images[0]))
    combined = load_splits("digits", extra_dirs=(extra,))
    assert len(combined.train) == len(base.train) + 1 and combined.train.labels[-1] == 3
    assert combined.digest != base.digest
    np.testing.assert_array_equal(combined.test.images, base.test.images)


def test_preprocessing_identical_from_arrays_and_png_bytes():
    images = load_splits("fashion-mnist").test.images[:16]
    from_arrays = to_tensor(images)
    from_png = to_tensor(np.stack([decode_image(encode_png(img)) for img in images]))
    assert from_arrays.shape == (16, 1, 28, 28) and from_arrays.dtype == torch.float32
    assert torch.equal(from_arrays, from_png)


def test_preprocessing_resizes_and_greyscales_colour_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="JPEG")
    out = decode_image(buf.getvalue())
    assert out.shape == (28, 28) and out.dtype == np.uint8


@pytest.mark.parametrize("payload, problem", [
    (b"", "empty"),
    (b"hello, I am not an image", "not a decodable image"),
    (encode_png(np.zeros((28, 28), np.uint8))[:40], "truncated|not a decodable"),
])
def test_decode_rejects_bad_bytes(payload, problem):
    with pytest.raises(InvalidImage, match=problem) as err:
        decode_image(payload)
    assert err.value.status == 400 and "0x" not in str(err.value)  # no object reprs for clients


def test_decode_rejects_oversized_images():
    with pytest.raises(InvalidImage, match="too large: .* bytes") as err:
        decode_image(b"x" * 100, PreprocessSpec(max_bytes=50))
    assert err.value.status == 413
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(encode_png(np.zeros((100, 100), np.uint8)), PreprocessSpec(max_pixels=99 * 99))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_model_output_and_embedding_shapes(name):
    model = build_model(name, num_classes=10).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
        assert model.embed(x).shape == (3, model.embedding_dim)


def test_unknown_model_lists_choices():
    with pytest.raises(FlywheelError) as err:
        build_model("vgg", 10)
    assert all(name in str(err.value) for name in ARCHITECTURES)


def test_loss_falls_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    s = load_splits("digits")
    x, y = to_tensor(s.train.images[:32]), torch.from_numpy(s.train.labels[:32])
    model = build_model("small-cnn", 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_settings_default_to_embedded_sqlite_in_flywheel_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    s = Settings.from_env()
    assert s.embedded and s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.artifact_root == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret-value")
    remote = Settings.from_env(model_name="m")
    assert not remote.embedded and remote.model_name == "m" and "secret-value" not in repr(remote)


def test_mlproject_parameters_translate_to_cli_flags():
    argv = ["train", "--dataset", "digits", "--epochs", "2.0", "--register", "false", "--max-train-samples", "0",
            "--extra-data", "''", "--data-dir", "", "--lr", "0.003"]
    assert translate(argv) == ["train", "--dataset", "digits", "--epochs", "2", "--no-register", "--lr", "0.003"]
    assert translate(["--extra-data", "a,b"]) == ["--extra-data", "a", "--extra-data", "b"]
    assert split_nproc(translate(["train", "--nproc-per-node", "2.0", "--epochs", "1"])) == (
        2, ["train", "--epochs", "1"])
    assert split_nproc(["train"]) == (1, ["train"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flywheel", *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_input_is_one_clear_line_without_traceback():
    out = _cli("train", "--dataset", "cifar", "--no-register")
    assert out.returncode == 2 and "unknown dataset 'cifar'" in out.stderr and "Traceback" not in out.stderr
    out = _cli("train", "--dataset", "digits", "--arch", "vgg")
    assert out.returncode == 2 and "unknown model 'vgg'" in out.stderr and "Traceback" not in out.stderr


def test_cli_help_on_every_foundation_command():
    for command in ("train", "evaluate", "register", "models", "datasets"):
        out = _cli(command, "--help")
        assert out.returncode == 0 and "Usage" in out.stdout
    assert "small-cnn" in _cli("models").stdout and "fashion-mnist" in _cli("datasets").stdout


@pytest.mark.parametrize("name", ["fashion-mnist", "digits"])
def test_test_split_alone_is_the_full_loads_test_split(name):
    """Export checks and release acceptance read only the frozen test split: it must be the same one."""
    from flywheel.core.data import load_test_split

    test, class_names = load_test_split(name)
    full = load_splits(name)
    assert class_names == full.class_names
    assert np.array_equal(test.images, full.test.images) and np.array_equal(test.labels, full.test.labels)
    assert test.labels.dtype == full.test.labels.dtype
