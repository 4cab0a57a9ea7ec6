"""Distribution shifts of served images, for the demo, tests and the drift benchmark.

The one implementation of every simulated shift; `flywheel.monitoring.drift` holds only the detectors.

Two sets, one module:
  * SHIFTS / `shift_image(s)`: the demo's five named camera/pipeline shifts (catalogue, blur-jpeg, ...),
    what `make demo` and the monitor tests send;
  * FAMILIES / `corrupt_images`: the corruption suite the drift benchmark measures detectors on, 18
    families x 3 severities following MNIST-C (Mu & Gilmer 2019: shot and impulse noise, glass and
    motion blur, shear, scale, rotate, brightness, translate, stripe, fog, spatter, dotted line,
    zigzag, Canny edges) and "Failing Loudly" (Rabanser et al. 2019: Gaussian noise of standard
    deviation 1, 10 and 100 grey levels), plus Gaussian blur and contrast loss.
Both take uint8 greyscale (H, W) or RGB (H, W, 3) images and return the same layout, deterministically
given a seed. Geometric sizes scale with the image, so a family means the same at 28 px and at 80 px.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

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


# ------------------------------------------------------------------------------------ corruption suite
# MNIST-C (Mu & Gilmer, 2019, arXiv:1906.02337): 15 corruptions of handwritten digits; and the image
# shifts of "Failing Loudly" (Rabanser, Günnemann & Lipton, NeurIPS 2019): Gaussian noise of standard
# deviation 1, 10 and 100 grey levels ("small", "medium", "large"), applied to a fraction of samples.
# Each family has three severities (1 mild ... 3 strong); geometric sizes are fractions of the image, so
# the same family means the same thing at 28x28 greyscale and at 80x64 RGB. Every function takes a
# float batch (N, H, W, C) in [0, 1] and a numpy Generator, and returns the same shape.
FAMILIES = ("brightness", "canny-edges", "contrast", "dotted-line", "fog", "gaussian-blur", "gaussian-noise",
            "glass-blur", "impulse-noise", "motion-blur", "rotate", "scale", "shear", "shot-noise", "spatter",
            "stripe", "translate", "zigzag")
SEVERITIES = (1, 2, 3)
# The tuning half of benchmarks/drift.py's protocol (split once, by numpy.random.default_rng(2019), before
# any result was looked at): what the drift detector may be designed on, and the only families the
# product ever learns from (`contracts.reference.ShiftDirections`). The other nine are held out.
TUNING_FAMILIES = ("brightness", "contrast", "gaussian-noise", "glass-blur", "motion-blur", "rotate", "shear",
                   "stripe", "translate")

# One row per family: its three severity parameters and what they mean.
SEVERITY_PARAMS: dict[str, tuple[float, float, float]] = {
    "brightness": (0.15, 0.3, 0.5),        # added to every pixel (fraction of full scale), clipped
    "canny-edges": (0.4, 0.7, 1.0),        # blend weight of the Canny edge map over the image (1: edges only)
    "contrast": (0.6, 0.4, 0.2),           # pixels pulled to the image mean: mean + c * (x - mean)
    "dotted-line": (1, 2, 4),              # dotted lines drawn across the image
    "fog": (0.3, 0.6, 1.0),                # strength of a fractal haze added, then the range compressed
    "gaussian-blur": (0.5, 1.0, 1.5),      # Gaussian sigma in pixels per 28 px of image height
    "gaussian-noise": (1, 10, 100),        # standard deviation in grey levels (Failing Loudly's small/medium/large)
    "glass-blur": (1, 2, 3),               # blur, then `s` rounds of local pixel swaps (distance <= 1-2 px), blur
    "impulse-noise": (0.03, 0.09, 0.27),   # fraction of pixel values set to 0 or 255 (salt and pepper)
    "motion-blur": (3, 5, 9),              # length in pixels (per 28 px) of a linear blur at a random angle
    "rotate": (10, 25, 45),                # degrees, random direction
    "scale": (0.85, 0.7, 0.5),             # zoom out about the centre by this factor
    "shear": (0.15, 0.3, 0.5),             # horizontal shear factor, random direction
    "shot-noise": (60, 25, 12),            # Poisson noise with this many photons at full scale
    "spatter": (0.05, 0.12, 0.25),         # fraction of the image covered by grey blobs
    "stripe": (0.1, 0.2, 0.35),            # width (fraction of the image) of a vertical band, inverted
    "translate": (0.08, 0.15, 0.25),       # shift by this fraction of the image size, random direction
    "zigzag": (1, 2, 4),                   # zigzag lines drawn across the image
}


def _pil_batch(x: np.ndarray, fn) -> np.ndarray:
    """Apply `fn(PIL image, index)` per image of a float (N, H, W, C) batch (through uint8, as a camera would)."""
    u8 = _to_u8(x)
    mode = "L" if x.shape[-1] == 1 else "RGB"
    out = [np.asarray(fn(Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode), i), dtype=np.uint8)
           for i, img in enumerate(u8)]
    return np.stack(out).reshape(x.shape).astype(np.float64) / 255.0


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _affine(x: np.ndarray, matrices: list[tuple[float, ...]]) -> np.ndarray:
    """Per-image affine map about the image centre (PIL's inverse-map convention), bilinear, black fill."""
    h, w = x.shape[1:3]
    cx, cy = (w - 1) / 2, (h - 1) / 2

    def one(img: Image.Image, i: int) -> Image.Image:
        a, b, c, d = matrices[i][:4]  # output -> input linear part; translation keeps the centre fixed
        tx, ty = (matrices[i][4], matrices[i][5]) if len(matrices[i]) > 4 else (0.0, 0.0)
        data = (a, b, cx - a * cx - b * cy + tx, c, d, cy - c * cx - d * cy + ty)
        return img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=0)

    return _pil_batch(x, one)


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=n)


def _sigma(x: np.ndarray, per28: float) -> float:
    return per28 * x.shape[1] / 28.0


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest")


def _brightness(x, c, rng):
    return np.clip(x + c, 0, 1)


def _contrast(x, c, rng):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(mean + c * (x - mean), 0, 1)


def _gaussian_noise(x, c, rng):
    return np.clip(x + rng.normal(0, c / 255.0, x.shape), 0, 1)


def _shot_noise(x, c, rng):
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def _impulse_noise(x, c, rng):
    u = rng.random(x.shape)
    out = x.copy()
    out[u < c / 2] = 0.0
    out[(u >= c / 2) & (u < c)] = 1.0
    return out


def _gaussian_blur(x, c, rng):
    return _blur(x, _sigma(x, c))


def _glass_blur(x, c, rng):
    """MNIST-C/ImageNet-C glass blur: blur, locally scramble pixels, blur again (vectorised swaps:
    every pixel takes the value of a random neighbour within `delta`, `c` rounds)."""
    n, h, w, _ = x.shape
    delta = 1 if c < 3 else 2
    out = _blur(x, _sigma(x, 0.6))
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    idx = np.arange(n)[:, None, None]
    for _ in range(int(c)):
        dy = rng.integers(-delta, delta + 1, (n, h, w))
        dx = rng.integers(-delta, delta + 1, (n, h, w))
        out = out[idx, np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)]
    return np.clip(_blur(out, _sigma(x, 0.6)), 0, 1)


def _motion_kernel(length: float, angle: float) -> np.ndarray:
    size = int(np.ceil(length)) | 1
    k = np.zeros((size, size))
    centre = size // 2
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, max(2, int(length) * 4)):
        y, x = centre + t * np.sin(angle), centre + t * np.cos(angle)
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - y0, x - x0
        for yy, xx, wgt in ((y0, x0, (1 - fy) * (1 - fx)), (y0 + 1, x0, fy * (1 - fx)),
                            (y0, x0 + 1, (1 - fy) * fx), (y0 + 1, x0 + 1, fy * fx)):
            if 0 <= yy < size and 0 <= xx < size:
                k[yy, xx] += wgt
    return k / k.sum()


def _motion_blur(x, c, rng):
    length = max(2.0, c * x.shape[1] / 28.0)
    angles = rng.uniform(0, np.pi, len(x))
    return np.stack([ndimage.convolve(img, _motion_kernel(length, a)[:, :, None], mode="nearest")
                     for img, a in zip(x, angles, strict=True)])


def _rotate(x, c, rng):
    th = np.deg2rad(c) * _signs(rng, len(x))
    return _affine(x, [(np.cos(t), np.sin(t), -np.sin(t), np.cos(t)) for t in th])


def _shear(x, c, rng):
    return _affine(x, [(1.0, s * c, 0.0, 1.0) for s in _signs(rng, len(x))])


def _scale(x, c, rng):
    return _affine(x, [(1 / c, 0.0, 0.0, 1 / c)] * len(x))


def _translate(x, c, rng):
    h, w = x.shape[1:3]
    th = rng.uniform(0, 2 * np.pi, len(x))
    return _affine(x, [(1.0, 0.0, 0.0, 1.0, -c * w * np.cos(t), -c * h * np.sin(t)) for t in th])


def _stripe(x, c, rng):
    """A vertical band of the image inverted (MNIST-C's stripe), at a random position."""
    n, h, w, _ = x.shape
    width = max(1, int(round(c * w)))
    start = rng.integers(0, w - width + 1, n)
    cols = np.arange(w)[None, :]
    band = ((cols >= start[:, None]) & (cols < start[:, None] + width))[:, None, :, None]
    return np.where(band, 1.0 - x, x)


def _plasma(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Fractal noise in [0, 1]: octaves of upsampled uniform noise, amplitude halving per octave."""
    out = np.zeros((n, h, w))
    amp, total = 1.0, 0.0
    for cells in (2, 4, 8, 16):
        coarse = rng.random((n, cells + 1, cells + 1))
        out += amp * ndimage.zoom(coarse, (1, h / (cells + 1), w / (cells + 1)), order=1)[:, :h, :w]
        total += amp
        amp /= 2
    out /= total
    return (out - out.min(axis=(1, 2), keepdims=True)) / np.ptp(out, axis=(1, 2), keepdims=True).clip(1e-9)


def _fog(x, c, rng):
    fog = _plasma(rng, len(x), x.shape[1], x.shape[2])[..., None]
    return np.clip((x + c * fog) / (1 + c * 0.5), 0, 1)


def _spatter(x, c, rng):
    """Mud-like blobs: smoothed noise thresholded so that a fraction `c` of the image is covered,
    painted a random grey (or colour) per image."""
    n, h, w, ch = x.shape
    noise = ndimage.gaussian_filter(rng.normal(size=(n, h, w)), sigma=(0, _sigma(x, 1.5), _sigma(x, 1.5)))
    cut = np.quantile(noise.reshape(n, -1), 1 - c, axis=1)[:, None, None]
    mask = (noise > cut)[..., None]
    paint = rng.uniform(0.3, 0.8, (n, 1, 1, ch))
    return np.where(mask, paint, x)


def _lines(x, c, rng, zigzag: bool):
    """MNIST-C's dotted line and zigzag overlays: `c` random lines in white across each image."""
    h, w = x.shape[1:3]
    width = max(1, round(h / 28))
    plans = []
    for _ in range(len(x)):
        plan = []
        for _ in range(int(c)):
            (x0, x1), (y0, y1) = rng.uniform(0, w - 1, 2), rng.uniform(0, h - 1, 2)
            if zigzag:
                k = 6
                t = np.linspace(0, 1, k + 1)
                px, py = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
                norm = np.hypot(x1 - x0, y1 - y0) or 1.0
                off = np.where(np.arange(k + 1) % 2, 1.0, -1.0) * 0.08 * max(h, w)
                px, py = px - off * (y1 - y0) / norm, py + off * (x1 - x0) / norm
                plan.append([(float(a), float(b)) for a, b in zip(px, py, strict=True)])
            else:
                steps = int(np.hypot(x1 - x0, y1 - y0) / (2.5 * width)) + 1
                t = np.linspace(0, 1, steps + 1)
                plan.append([(float(x0 + s * (x1 - x0)), float(y0 + s * (y1 - y0))) for s in t])
        plans.append(plan)
    white = 255 if x.shape[-1] == 1 else (255, 255, 255)

    def one(img: Image.Image, i: int) -> Image.Image:
        draw = ImageDraw.Draw(img)
        for pts in plans[i]:
            if zigzag:
                draw.line(pts, fill=white, width=width)
            else:
                r = width / 2 + 0.25
                for px, py in pts:
                    draw.ellipse((px - r, py - r, px + r, py + r), fill=white)
        return img

    return _pil_batch(x, one)


def _canny(grey: np.ndarray, sigma: float) -> np.ndarray:
    """Canny edges of a float (N, H, W) batch: Gaussian smoothing, Sobel gradients, non-maximum
    suppression in four directions, hysteresis between 10% and 20% of each image's largest gradient."""
    s = ndimage.gaussian_filter(grey, sigma=(0, sigma, sigma))
    gy, gx = ndimage.sobel(s, axis=1), ndimage.sobel(s, axis=2)
    mag = np.hypot(gx, gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180
    bins = np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    pad = np.pad(mag, ((0, 0), (1, 1), (1, 1)))
    h, w = grey.shape[1:]

    def at(dy: int, dx: int) -> np.ndarray:
        return pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    neighbours = {0: (at(0, 1), at(0, -1)), 1: (at(1, 1), at(-1, -1)), 2: (at(1, 0), at(-1, 0)),
                  3: (at(1, -1), at(-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for b, (p, q) in neighbours.items():
        keep |= (bins == b) & (mag >= p) & (mag >= q)
    top = mag.max(axis=(1, 2), keepdims=True).clip(1e-9)
    weak, strong = keep & (mag >= 0.1 * top), keep & (mag >= 0.2 * top)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside an image, never across images
    labels, count = ndimage.label(weak, structure=structure)
    good = np.zeros(count + 1, dtype=bool)
    good[np.unique(labels[strong])] = True
    good[0] = False
    return good[labels].astype(np.float64)


def _canny_edges(x, c, rng):
    edges = _canny(x.mean(axis=3), _sigma(x, 1.0))[..., None]
    return np.clip((1 - c) * x + c * edges, 0, 1)


_FAMILY_FNS = {
    "brightness": _brightness, "canny-edges": _canny_edges, "contrast": _contrast,
    "dotted-line": lambda x, c, rng: _lines(x, c, rng, zigzag=False), "fog": _fog,
    "gaussian-blur": _gaussian_blur, "gaussian-noise": _gaussian_noise, "glass-blur": _glass_blur,
    "impulse-noise": _impulse_noise, "motion-blur": _motion_blur, "rotate": _rotate, "scale": _scale,
    "shear": _shear, "shot-noise": _shot_noise, "spatter": _spatter, "stripe": _stripe,
    "translate": _translate, "zigzag": lambda x, c, rng: _lines(x, c, rng, zigzag=True),
}


def corrupt_images(images: np.ndarray, family: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W) greyscale or (N, H, W, 3) RGB images through one corruption of the suite, same
    layout and dtype. Deterministic: the same (images, family, severity, seed) give the same bytes.

    `family` is one of FAMILIES, `severity` 1 (mild), 2 or 3 (strong); SEVERITY_PARAMS says what each
    severity means."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
        raise ValueError(f"corrupt_images takes uint8 (N, H, W) or (N, H, W, 3) images, got {arr.dtype} {arr.shape}")
    if family not in _FAMILY_FNS:
        raise ValueError(f"unknown corruption {family!r}; choose one of: {', '.join(FAMILIES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if len(arr) == 0:
        return arr.copy()
    x = (arr if arr.ndim == 4 else arr[..., None]).astype(np.float64) / 255.0
    rng = np.random.default_rng([seed, FAMILIES.index(family), severity])
    out = _to_u8(_FAMILY_FNS[family](x, SEVERITY_PARAMS[family][severity - 1], rng))
    return out.reshape(arr.shape)


def corrupt(image: np.ndarray, family: str, severity: int, seed: int = 0) -> np.ndarray:
    """One uint8 (H, W) or (H, W, 3) image through `corrupt_images`."""
    arr = np.asarray(image)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise ValueError(f"corrupt takes a uint8 (H, W) or (H, W, 3) image, got shape {arr.shape}")
    return corrupt_images(arr[None], family, severity, seed)[0]
