"""Realistic distribution shifts of served images, for the demo, tests and drift benchmarks.

The one implementation of every simulated shift; `flywheel.monitoring.drift` holds only the detectors.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

SHIFTS = ("catalogue", "blur-jpeg", "invert", "rotate", "noise")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert(img.mode)


def shift_image(image: np.ndarray, kind: str = "catalogue", rng: np.random.Generator | None = None) -> np.ndarray:
    """One uint8 (H, W) greyscale or (H, W, 3) RGB image as a different camera/pipeline would deliver
    it, in the same layout.

    catalogue: product shots on a white background (inverted contrast), slightly soft, JPEG q=50.
    blur-jpeg: a worn phone camera: Gaussian blur (radius 1.2) and heavy JPEG compression (q=15), same polarity.
    invert:    inverted contrast only.
    rotate:    rotated by 30 degrees.
    noise:     additive Gaussian pixel noise (sigma 40 grey levels); `rng` draws it.
    """
    arr = np.asarray(image, dtype=np.uint8)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise ValueError(f"shift_image takes a uint8 (H, W) or (H, W, 3) image, got shape {arr.shape}")
    if kind == "invert":
        return 255 - arr
    if kind == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        return np.clip(arr + rng.normal(0, 40, arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
    if kind == "catalogue":
        img = _jpeg(Image.fromarray(255 - arr).filter(ImageFilter.GaussianBlur(0.6)), 50)
    elif kind == "blur-jpeg":
        img = _jpeg(img.filter(ImageFilter.GaussianBlur(1.2)), 15)
    elif kind == "rotate":
        img = img.rotate(30)
    else:
        raise ValueError(f"unknown shift {kind!r}; choose one of: {', '.join(SHIFTS)}")
    return np.asarray(img, dtype=np.uint8)


def shift_images(images: np.ndarray, kind: str = "catalogue", seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) images through `shift_image`; `seed` seeds the noise shift."""
    rng = np.random.default_rng(seed)
    return np.stack([shift_image(img, kind, rng) for img in np.asarray(images, dtype=np.uint8)])
