"""Realistic distribution shifts of served images, for the demo, tests and drift benchmarks."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

SHIFTS = ("catalogue", "blur-jpeg")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


def shift_image(image: np.ndarray, kind: str = "catalogue") -> np.ndarray:
    """One uint8 (H, W) image as a different camera/pipeline would deliver it.

    catalogue: product shots on a white background (inverted contrast), slightly soft, JPEG q=50.
    blur-jpeg: a worn phone camera: Gaussian blur and heavy JPEG compression, same polarity.
    """
    img = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L")
    if kind == "catalogue":
        img = _jpeg(Image.fromarray(255 - np.asarray(img)).filter(ImageFilter.GaussianBlur(0.6)), 50)
    elif kind == "blur-jpeg":
        img = _jpeg(img.filter(ImageFilter.GaussianBlur(1.2)), 15)
    else:
        raise ValueError(f"unknown shift {kind!r}; choose one of: {', '.join(SHIFTS)}")
    return np.asarray(img, dtype=np.uint8)


def shift_images(images: np.ndarray, kind: str = "catalogue") -> np.ndarray:
    return np.stack([shift_image(img, kind) for img in images])
