"""Image preprocessing shared by training and the serving handler: no train/serve skew.

This module is copied into every TorchServe archive, so it imports only numpy, Pillow, pyspng (when
installed) and (lazily, in `to_tensor`) torch, never other flywheel modules. Training calls `to_tensor` on raw uint8 arrays;
the handler calls `decode_image` on request bytes and then `to_array`, the same normalisation
(`to_tensor` is `to_array` wrapped as a tensor).

A model's `PreprocessSpec` says what its input is:
  * `channels` 1 (greyscale, Pillow mode "L") or 3 (RGB);
  * `height` x `width` pixels, reached by the `resize` policy: "stretch" (bilinear to exactly that
    size, aspect ratio not kept) or "crop" (scale so the image covers the size, then centre-crop);
  * per-channel `mean`/`std` applied to pixels scaled to [0, 1] (after `invert`, if set).
uint8 image arrays use one layout everywhere (datasets, captures, snapshots): (N, H, W) for one
channel, (N, H, W, 3) for three; a single image drops the N. An image of the other colour layout
is converted, the way Pillow converts (RGB to greyscale by ITU-R 601-2 luma; greyscale to RGB by
repeating it), in `decode_image` and in `to_array` alike.

Backwards compatible: specs saved before channels/height/width existed (`{"image_size": 28,
"mean": 0.286, "std": 0.353, ...}`) load as 1-channel, square, "stretch" specs and give the same
arrays as before; `PreprocessSpec(image_size=28)` still works and `spec.image_size` reads the side
of a square spec.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libspng's PNG decoder: a plain PNG decodes in C, skipping Pillow's Python chunk parsing
    import pyspng as _spng
except ImportError:  # optional: Pillow decodes everything without it, to the same pixels
    _spng = None

if TYPE_CHECKING:
    import torch

# Fashion-MNIST training-set statistics (pixel values scaled to [0, 1]).
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
# ImageNet statistics, the usual choice for RGB networks (pretrained ones expect exactly these).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_POLICIES = ("stretch", "crop")
_MODES = {1: "L", 3: "RGB"}


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


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"preprocess {name} must be a positive integer, got {value!r}")
    return int(value)


def _per_channel(name: str, value, channels: int) -> tuple[float, ...]:
    """A scalar, or a sequence of one value per channel (one value broadcasts), as a float tuple."""
    values = [value] if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else value
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"preprocess {name} must be a number or a list of {channels} numbers, "
                         f"got {value!r}") from None
    if len(out) == 1:
        out = out * channels
    if len(out) != channels:
        raise ValueError(f"preprocess {name} has {len(out)} values but channels is {channels}: give one "
                         "value per channel (or one for all)")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"preprocess {name} must be finite numbers, got {value!r}")
    return out


@dataclass(frozen=True, init=False)
class PreprocessSpec:
    """Constants stored with every model, so serving preprocesses exactly as training did.

    Keyword-only: `PreprocessSpec(channels=3, height=64, width=64, mean=IMAGENET_MEAN,
    std=IMAGENET_STD, resize="crop")`. `image_size=S` is the old spelling of height=width=S."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str
    invert: bool  # True for data with dark-on-light strokes, so every model sees light-on-dark
    max_bytes: int  # reject larger request bodies before decoding
    max_pixels: int  # decompression-bomb guard, checked before pixels are decoded

    def __init__(self, *, channels: int = 1, height: int | None = None, width: int | None = None,
                 mean: float | Sequence[float] = FASHION_MEAN, std: float | Sequence[float] = FASHION_STD,
                 resize: str = "stretch", invert: bool = False, max_bytes: int = 4 * 1024 * 1024,
                 max_pixels: int = 4096 * 4096, image_size: int | None = None):
        if image_size is not None:
            side = _positive_int("image_size", image_size)
            if (height is not None and height != side) or (width is not None and width != side):
                raise ValueError(f"preprocess image_size {side} contradicts height {height} / width {width}: "
                                 "give height and width only")
            height, width = side, side
        values = dict(channels=channels, height=28 if height is None else height,
                      width=28 if width is None else width, mean=mean, std=std, resize=resize,
                      invert=invert, max_bytes=max_bytes, max_pixels=max_pixels)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        """Validate and normalise (called by __init__: the class defines its own for `image_size`)."""
        if isinstance(self.channels, bool) or self.channels not in _MODES:
            raise ValueError(f"preprocess channels must be 1 (greyscale) or 3 (RGB), got {self.channels!r}")
        channels = int(self.channels)
        normalised = {key: _positive_int(key, getattr(self, key))
                      for key in ("height", "width", "max_bytes", "max_pixels")}
        normalised.update(channels=channels, mean=_per_channel("mean", self.mean, channels),
                          std=_per_channel("std", self.std, channels))
        if not all(s > 0 for s in normalised["std"]):
            raise ValueError(f"preprocess std must be > 0 for every channel, got {list(normalised['std'])}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"preprocess resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")
        if not isinstance(self.invert, (bool, np.bool_)):
            raise ValueError(f"preprocess invert must be true or false, got {self.invert!r}")
        normalised["invert"] = bool(self.invert)
        for key, value in normalised.items():
            object.__setattr__(self, key, value)  # frozen: the documented way to set fields while building

    @property
    def image_size(self) -> int:
        """The side of a square spec (the old single-size field)."""
        if self.height != self.width:
            raise ValueError(f"preprocess image_size is undefined for a {self.height}x{self.width} (HxW) "
                             "spec: use height and width")
        return self.height

    @property
    def mode(self) -> str:
        """Pillow mode of the model's input: "L" or "RGB"."""
        return _MODES[self.channels]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed input, as the model receives it."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["mean"], data["std"] = list(self.mean), list(self.std)
        if self.height == self.width:  # readers older than height/width still find the size
            data["image_size"] = self.height
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        """Load `to_dict` output, or an old spec ({"image_size", scalar "mean"/"std", ...}).

        Unknown keys are ignored (a newer writer's additions); invalid values raise ValueError."""
        known = {f.name for f in fields(cls)} | {"image_size"}
        return cls(**{k: v for k, v in data.items() if k in known})


def _layout(images: np.ndarray, channels: int | None = None) -> np.ndarray:
    """A uint8 batch as (N, H, W) or (N, H, W, 3); a single image gains N = 1.

    `channels` tells a 3-D array apart: with 3, (H, W, 3) is one RGB image; otherwise 3-D is a
    greyscale batch (N, H, W). (N, H, W, 1) is greyscale."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = images.astype(np.uint8)
    if images.ndim == 2 or (images.ndim == 3 and channels == 3 and images.shape[-1] == 3):
        images = images[None]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3):
        return images
    raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, 3), got shape {images.shape}")


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """A uint8 batch in the layout of `channels`: (N, H, W) for 1, (N, H, W, 3) for 3.

    RGB to greyscale uses Pillow's conversion (the one `decode_image` applies to colour files);
    greyscale to RGB repeats the plane, as Pillow does."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    images = _layout(images, channels)
    is_rgb = images.ndim == 4
    if channels == 3 and not is_rgb:
        return np.repeat(images[..., None], 3, axis=-1)
    if channels == 1 and is_rgb:
        if not len(images):
            return images[..., 0]
        return np.stack([np.asarray(Image.fromarray(img, mode="RGB").convert("L")) for img in images])
    return images


def _resize_one(img: Image.Image, height: int, width: int, policy: str) -> Image.Image:
    if img.size == (width, height):
        return img
    if policy == "stretch":
        return img.resize((width, height), Image.BILINEAR)
    if policy == "crop":  # the largest centred box of the target aspect ratio, scaled to the target
        return ImageOps.fit(img, (width, height), method=Image.BILINEAR, centering=(0.5, 0.5))
    raise ValueError(f"resize policy must be one of {', '.join(RESIZE_POLICIES)}, got {policy!r}")


def resize(images: np.ndarray, height: int, width: int | None = None, policy: str = "stretch") -> np.ndarray:
    """Resize a uint8 batch (N, H, W) or (N, H, W, 3) to `height` x `width` (square when width is
    None) with Pillow's bilinear filter; `policy` "stretch" or "crop" (see the module docstring)."""
    width = height if width is None else width
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim not in (3, 4):
        raise ValueError(f"resize takes a batch (N, H, W) or (N, H, W, 3), got shape {images.shape}")
    if images.shape[1:3] == (height, width):
        return images
    if not len(images):
        return np.zeros((0, height, width, *images.shape[3:]), np.uint8)
    return np.stack([np.asarray(_resize_one(Image.fromarray(img), height, width, policy)) for img in images])


def _flatten_alpha(img: Image.Image, invert: bool) -> Image.Image:
    """Transparent pixels become the data's background: black, or white when `invert` (dark-on-light
    data). Pillow's plain convert would keep whatever colour hides under zero alpha."""
    # Pillow's `has_transparency_data` (10.1+; pyproject allows 10.0) spelled out: an alpha band, or a
    # transparent palette entry / colour key.
    if img.mode not in ("RGBA", "RGBa", "LA", "La", "PA") and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if invert else (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba)


def decode_image(data: bytes, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """Decode PNG/JPEG (or any Pillow format) bytes to a uint8 array in the spec's layout and size:
    (height, width) for 1 channel, (height, width, 3) for 3. Colour, palette and greyscale inputs are
    converted to the spec's mode; transparency is flattened onto the background (see `_flatten_alpha`).

    Raises InvalidImage naming the problem: empty, too large, not an image, truncated.

    A plain PNG (see `_plain_png`) is decoded by libspng when pyspng is installed: for a request's
    small PNG most of Pillow's decode is Python chunk parsing (benchmarks/README.md). Every other
    input, and any PNG libspng or zlib refuses, goes to Pillow, so pixels and errors are Pillow's
    either way.
    """
    return decode_image_and_png(data, spec)[0]


def decode_image_and_png(data: bytes, spec: PreprocessSpec = PreprocessSpec()) -> tuple[np.ndarray, bytes | None]:
    """`decode_image`'s pixels, and `data` itself where it already is a PNG of exactly those pixels in
    the spec's mode and size (a plain PNG, `_plain_png`, decoded as is, with every chunk's CRC right
    and nothing after IEND: a PNG any reader takes, no larger than its image), else None. Serving
    captures that PNG as it came instead of re-encoding the pixels (`capture_png`)."""
    if not data:
        raise InvalidImage("empty image: the request body has no bytes")
    if len(data) > spec.max_bytes:
        raise InvalidImage(f"image too large: {len(data)} bytes > limit {spec.max_bytes}", status=413)
    found = _decode_plain(data, spec.max_pixels)
    if found is not None:
        plain, whole = found
        mode = "RGB" if plain.ndim == 3 else "L"
        if mode == spec.mode and plain.shape[:2] == (spec.height, spec.width):
            return plain, data if whole else None
        img = Image.fromarray(plain, mode)  # the pixels Pillow would have decoded: same conversion and resize
        return _pixels(_resize_one(img if mode == spec.mode else img.convert(spec.mode), spec.height,
                                   spec.width, spec.resize)), None
    return _decode_pillow(data, spec), None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PLAIN_PNG_MODES = {0: "L", 2: "RGB"}  # IHDR colour type (8-bit samples) → output format
# Chunks a plain PNG may carry before its image data, at the length Pillow parses without error (it
# keeps them as info only; neither decoder applies them to the pixels).
_PLAIN_PNG_INFO = {b"gAMA": 4, b"sRGB": 1, b"pHYs": 9}


def _plain_png(data: bytes, max_pixels: int) -> np.ndarray | None:
    """`_decode_plain`'s pixels, or None."""
    found = _decode_plain(data, max_pixels)
    return None if found is None else found[0]


def _decode_plain(data: bytes, max_pixels: int) -> tuple[np.ndarray, bool] | None:
    """An 8-bit greyscale or RGB, non-interlaced PNG without transparency, decoded by libspng, as
    read-only uint8 (H, W) or (H, W, 3): the same pixels Pillow decodes ("L" / "RGB"). None for
    anything else, so that Pillow decodes it or names its problem with its own message.

    Plain means: IHDR; then only `_PLAIN_PNG_INFO` chunks; the image data (IDAT chunks, one after
    the other: one valid zlib stream of exactly the image's rows); IEND; each chunk whole, and those
    before the image data with the CRC Pillow checks (neither decoder checks the image data's CRC;
    both ignore bytes after IEND); at most
    `max_pixels` (and Pillow's decompression-bomb limit). Any other chunk (text, ICC profile,
    palette, transparency, animation...), any other format, and anything libspng refuses (corrupt
    or truncated image data) goes to Pillow. With the pixels: whether `data` is that PNG and nothing
    more (the image data's and IEND's CRCs right too, no bytes after IEND)."""
    if _spng is None or len(data) < 33 or not data.startswith(_PNG_SIGNATURE):
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    bomb = Image.MAX_IMAGE_PIXELS
    if (data[8:16] != b"\x00\x00\x00\rIHDR" or depth != 8 or colour not in _PLAIN_PNG_MODES or compression
            or filtering or interlace or not 0 < width * height <= max_pixels
            or (bomb is not None and width * height > bomb)):
        return None
    view, size, pos, image = memoryview(data), len(data), 8, []  # image: the IDAT payloads
    whole = True  # every CRC right, nothing after IEND (checked past the image data for this alone)
    while True:
        if pos + 12 > size:
            return None
        length, name = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > size:
            return None
        if name == b"IDAT":
            image.append(view[pos + 8:end])
        elif name == b"IEND":
            if not image or length:
                return None
        elif image or (pos > 8 and _PLAIN_PNG_INFO.get(name) != length):
            return None
        if zlib.crc32(view[pos + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            if not image:
                return None
            whole = False
        if name == b"IEND":
            whole = whole and end + 4 == size
            break
        pos = end + 4
    # libspng decodes some corrupt streams that Pillow's zlib refuses: a plain PNG's image data is
    # one whole zlib stream (checksum included) of exactly its filtered rows.
    try:
        rows = zlib.decompress(b"".join(image))
    except zlib.error:
        return None
    if len(rows) != height * (1 + width * (3 if colour == 2 else 1)):
        return None
    try:
        pixels = _spng.load(data, _PLAIN_PNG_MODES[colour])
    except Exception:  # noqa: BLE001 - whatever libspng refuses, Pillow decodes or names the problem
        return None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width):
        return None
    pixels.flags.writeable = False  # as Pillow's path returns them
    return pixels, whole


def _decode_pillow(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """`decode_image` by Pillow: any format Pillow reads, every PNG kind, and the errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > spec.max_pixels:
                raise InvalidImage(f"image too large: {width}x{height} pixels > limit {spec.max_pixels}",
                                   status=413)
            img.load()  # forces a full decode so truncated files fail here, not later
            converted = _flatten_alpha(img, spec.invert)
            if converted.mode != spec.mode:  # same mode: Pillow's convert would only copy
                converted = converted.convert(spec.mode)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"image too large: {_pillow_reason(exc)}", status=413) from None
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"not a decodable image: {_pillow_reason(exc)}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's truncated/corrupt-stream errors
        raise InvalidImage(f"corrupt or truncated image: {_pillow_reason(exc)}") from None
    return _pixels(_resize_one(converted, spec.height, spec.width, spec.resize))


def _pixels(img: Image.Image) -> np.ndarray:
    """An "L" or "RGB" image's uint8 pixels, (H, W) or (H, W, 3): what `np.asarray(img)` returns
    (read-only, the same bytes), without Pillow's `__array_interface__` detour (~2x the cost for a
    28x28 image, a tenth of a serving request's decode)."""
    width, height = img.size
    shape = (height, width, 3) if img.mode == "RGB" else (height, width)
    return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(shape)


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) greyscale or (H, W, 3) RGB array as PNG bytes (lossless: `decode_image`
    with a spec of the same channels and size returns the same pixels)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[-1] == 3:
        mode = "RGB"
    else:
        raise ValueError(f"encode_png takes a uint8 (H, W) or (H, W, 3) image, got shape {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def capture_png(image: np.ndarray, png: bytes | None) -> bytes:
    """The PNG a capture record stores for a decoded request image: the request's own bytes where
    `decode_image_and_png` found them already in the model's layout, else `encode_png(image)`.
    Either decodes to the same pixels."""
    return png if png is not None else encode_png(image)


def to_array(images: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, 3) (or one image) → normalised float32 array
    (N, channels, height, width), numpy only: converted to the spec's channels, resized by its
    policy, scaled to [0, 1], inverted if set, then (x - mean[c]) / std[c] per channel.

    The serving path (ONNX Runtime) uses this directly: a torch op there wakes torch's intra-op
    thread pool, whose spinning threads cost the worker more CPU than the model itself."""
    images = resize(convert_channels(images, spec.channels), spec.height, spec.width, spec.resize)
    x = images.astype(np.float32) / np.float32(255.0)
    x = x[:, None] if spec.channels == 1 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if spec.invert:
        x = np.float32(1.0) - x
    x -= np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    x /= np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return x


def to_tensor(images: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> torch.Tensor:
    """`to_array` as a torch tensor: float32 (N, channels, height, width)."""
    import torch  # here, not at the top: clients that only decode or encode (release, predict) skip its slow import

    return torch.from_numpy(to_array(images, spec))
