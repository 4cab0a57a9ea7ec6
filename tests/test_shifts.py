"""The corruption suite of `flywheel.core.shifts` (what benchmarks/drift.py measures detectors on):
every family at every severity keeps the layout and dtype of greyscale and RGB images, is a pure
function of its seed, and changes pixels more as its severity grows."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.core.shifts import (
    FAMILIES,
    SEVERITIES,
    SEVERITY_PARAMS,
    SHIFTS,
    corrupt,
    corrupt_images,
    shift_images,
)


def _objects(n: int, h: int, w: int, rgb: bool, seed: int = 0) -> np.ndarray:
    """Images like the ones served: a textured bright object on a darker (greyscale) or gradient (RGB)
    background, at random places and sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.2, 0.35) * w
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        texture = 150 + 60 * np.sin(xx / rng.uniform(1.5, 3)) * np.cos(yy / rng.uniform(1.5, 3))
        if rgb:
            bg = np.stack([40 + 80 * xx / w, 60 + 40 * yy / h, np.full((h, w), 90.0)], -1)
            colour = rng.uniform(0.5, 1.0, 3)
            img = np.where(inside[..., None], texture[..., None] * colour, bg)
        else:
            img = np.where(inside, texture, 5.0)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


LAYOUTS = {"grey28": (28, 28, False), "rgb64x80": (64, 80, True)}


def test_the_suite_has_at_least_twelve_families_with_three_severities_each():
    assert len(FAMILIES) >= 12 and len(set(FAMILIES)) == len(FAMILIES)
    assert SEVERITIES == (1, 2, 3) and set(SEVERITY_PARAMS) == set(FAMILIES)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_keeps_layout_is_deterministic_and_grows_with_severity(family, layout):
    h, w, rgb = LAYOUTS[layout]
    images = _objects(8, h, w, rgb)
    change = []
    for severity in SEVERITIES:
        out = corrupt_images(images, family, severity, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert np.array_equal(out, corrupt_images(images, family, severity, seed=3)), "not a function of the seed"
        change.append(np.abs(out.astype(np.float64) - images).mean())
    assert change[0] > 0, f"{family} severity 1 leaves the images unchanged"
    assert change[0] < change[1] < change[2], f"{family}: mean pixel change {change} does not grow with severity"


def test_one_image_and_a_batch_agree_and_seeds_differ():
    images = _objects(4, 28, 28, False)
    assert np.array_equal(corrupt(images[0], "rotate", 2, seed=1), corrupt_images(images[:1], "rotate", 2, seed=1)[0])
    a, b = corrupt_images(images, "gaussian-noise", 2, seed=1), corrupt_images(images, "gaussian-noise", 2, seed=2)
    assert not np.array_equal(a, b)
    assert corrupt(_objects(1, 64, 80, True)[0], "fog", 1).shape == (64, 80, 3)


def test_bad_arguments_are_refused_with_the_choices():
    images = _objects(2, 28, 28, False)
    with pytest.raises(ValueError, match="choose one of"):
        corrupt_images(images, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt_images(images, "fog", 4)
    with pytest.raises(ValueError, match="uint8"):
        corrupt_images(images.astype(np.float32), "fog", 1)


def test_the_demo_shifts_still_work():
    images = _objects(3, 28, 28, False)
    for kind in SHIFTS:
        out = shift_images(images, kind)
        assert out.shape == images.shape and out.dtype == np.uint8 and not np.array_equal(out, images), kind
