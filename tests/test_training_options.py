"""Unit tests of the component training loop's optional regularisers (FitConfig.hflip, .shift,
.label_smoothing): what each does to a batch or to the loss, and that they are off by default; and
the loop's refusal of numbers that cannot train."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.component.loop import FitConfig, augment, fit
from flywheel.core.data import load_splits
from flywheel.core.errors import FlywheelError
from flywheel.training.archs import build_model
from flywheel.training.train import TrainConfig


def _batch(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 7, 9, generator=torch.Generator().manual_seed(1))


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`img` (C, H, W) translated by (dy, dx), borders repeating the edge pixels."""
    h, w = img.shape[-2:]
    rows = (torch.arange(h) + dy).clamp(0, h - 1)
    cols = (torch.arange(w) + dx).clamp(0, w - 1)
    return img[:, rows][:, :, cols]


def test_augmentation_is_off_by_default():
    x = _batch()
    assert augment(x, FitConfig(), torch.Generator().manual_seed(0)) is x
    assert augment(x, TrainConfig(), torch.Generator().manual_seed(0)) is x  # a config without the fields
    cfg = FitConfig()
    assert (cfg.hflip, cfg.shift, cfg.label_smoothing) == (False, 0, 0.0)


def test_hflip_mirrors_some_images_and_keeps_the_others():
    x = _batch(64)
    out = augment(x, FitConfig(hflip=True), torch.Generator().manual_seed(0))
    mirrored = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 54  # about half


def test_shift_translates_each_image_within_the_bound():
    x = _batch(64)
    out = augment(x, FitConfig(shift=2), torch.Generator().manual_seed(0))
    offsets = set()
    for o, i in zip(out, x, strict=True):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(o, _shifted(i, dy, dx))]
        assert found, "an output image is no translation of its input by at most 2 pixels"
        offsets.add(found[0])
    assert len(offsets) > 5  # the offsets vary per image


def test_augmentation_is_repeatable_from_the_seed():
    x = _batch()
    cfg = FitConfig(hflip=True, shift=3)
    a = augment(x, cfg, torch.Generator().manual_seed(7))
    b = augment(x, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_label_smoothing_reaches_the_training_loss():
    """Overfitting 64 images: plain cross-entropy falls towards 0, smoothed cross-entropy cannot fall
    below the entropy of its smoothed targets."""
    splits = load_splits("digits", seed=0)
    eps, k = 0.3, len(splits.class_names)
    floor = -(1 - eps + eps / k) * math.log(1 - eps + eps / k) - (k - 1) * (eps / k) * math.log(eps / k)
    common = dict(epochs=20, batch_size=32, lr=5e-3, max_train_samples=64)
    plain = fit(FitConfig(**common), splits, torch.device("cpu"), model=build_model("small-cnn", k))
    smooth = fit(FitConfig(**common, label_smoothing=eps), splits, torch.device("cpu"), model=build_model("small-cnn", k))
    assert plain.history[-1]["train_loss"] < 0.5 * floor
    assert smooth.history[-1]["train_loss"] >= floor - 1e-4


def test_numbers_that_cannot_train_are_refused_in_one_line_before_the_first_step():
    for cfg, says in ((FitConfig(max_train_samples=-5), "--max-train-samples -5: must be at least 1"),
                      (FitConfig(epochs=0), "--epochs 0: must be at least 1"),
                      (TrainConfig(batch_size=0), "--batch-size 0: must be at least 1"),
                      (FitConfig(lr=0.0), "--lr 0.0: must be above 0")):
        with pytest.raises(FlywheelError, match=f"^{says}$"):
            fit(cfg, None, torch.device("cpu"), model=None)  # refused before the data or the model is touched
