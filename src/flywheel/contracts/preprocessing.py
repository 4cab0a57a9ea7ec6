"""Image preprocessing shared by training and the serving handler: no train/serve skew.

This module is copied into every TorchServe archive, so it imports only numpy, Pillow and (lazily,
in `to_tensor`) torch, never other flywheel modules. Training calls `to_tensor` on raw uint8 arrays;
the handler calls `decode_image` on request bytes and then `to_array`, the same normalisation
(`to_tensor` is `to_array` wrapped as a tensor).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# Fashion-MNIST training-set statistics (pixel values scaled to [0, 1]).
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530


class InvalidImage(ValueError):
    """Request bytes that are not a decodable image within the configured limits.

    `status` is the HTTP status a server should answer with: 413 when too large, else 400."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _pillow_reason(exc: Exception) -> str:
    """Pillow's message without the `<_io.BytesIO object at 0x…>` repr clients can't use."""
    import re

    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", " the request body", str(exc)).strip()


@dataclass(frozen=True)
class PreprocessSpec:
    """Constants stored with every model, so serving preprocesses exactly as training did."""

    image_size: int = 28
    mean: float = FASHION_MEAN
    std: float = FASHION_STD
    invert: bool = False  # True for data with dark-on-light strokes, so every model sees light-on-dark
    max_bytes: int = 4 * 1024 * 1024  # reject larger request bodies before decoding
    max_pixels: int = 4096 * 4096  # decompression-bomb guard, checked before pixels are decoded

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 batch (N, H, W) to (N, size, size) with Pillow's bilinear filter."""
    if images.shape[1:] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in images])


def decode_image(data: bytes, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """Decode PNG/JPEG (or any Pillow format) bytes to a greyscale uint8 array (size, size).

    Raises InvalidImage naming the problem: empty, too large, not an image, truncated.
    """
    if not data:
        raise InvalidImage("empty image: the request body has no bytes")
    if len(data) > spec.max_bytes:
        raise InvalidImage(f"image too large: {len(data)} bytes > limit {spec.max_bytes}", status=413)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > spec.max_pixels:
                raise InvalidImage(f"image too large: {width}x{height} pixels > limit {spec.max_pixels}",
                                   status=413)
            img.load()  # forces a full decode so truncated files fail here, not later
            grey = img.convert("L")
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"image too large: {_pillow_reason(exc)}", status=413) from None
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"not a decodable image: {_pillow_reason(exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's truncated/corrupt-stream errors
        raise InvalidImage(f"corrupt or truncated image: {_pillow_reason(exc)}") from None
    array = np.asarray(grey, dtype=np.uint8)
    return resize(array[None], spec.image_size)[0]


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) array as PNG bytes (lossless: decode_image returns the same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def to_array(images: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """uint8 images (N, H, W) → normalised float32 array (N, 1, size, size), numpy only.

    The serving path (ONNX Runtime) uses this directly: a torch op there wakes torch's intra-op
    thread pool, whose spinning threads cost the worker more CPU than the model itself."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 2:
        images = images[None]
    x = resize(images, spec.image_size).astype(np.float32) / np.float32(255.0)
    if spec.invert:
        x = np.float32(1.0) - x
    x -= np.float32(spec.mean)
    x /= np.float32(spec.std)
    return x[:, None]


def to_tensor(images: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> torch.Tensor:
    """uint8 images (N, H, W) → normalised float32 tensor (N, 1, size, size): `to_array` as a tensor."""
    import torch  # here, not at the top: clients that only decode or encode (release, predict) skip its slow import

    return torch.from_numpy(to_array(images, spec))
