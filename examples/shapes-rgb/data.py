"""Synthetic "coloured shapes" RGB image set, generated reproducibly from a seed.

No RGB image dataset can be installed offline on the machines this example is tested on, so the
component makes its own: every image is a function of (seed, split, index) alone, so the same
command writes byte-identical PNGs anywhere.

Each image is 80x64 (width x height) RGB: a textured background (a random low-saturation colour
gradient, Gaussian pixel noise and a few faint random-coloured blobs), one foreground shape with
random position, scale and rotation (up to 25 degrees either way), filled with a colour drawn from a hue *family* with jittered
hue, saturation and brightness, plus a small distractor shape of a random colour. The class is
(shape, colour family): 4 shapes x 2 families = 8 classes, so neither the shape nor the colour alone
tells the class apart. The image is wider than tall on purpose: the model reads a centre crop
(PreprocessSpec resize="crop"), and the foreground shape always lies inside that crop.

    python data.py --out DIR --seed 0 --n 4000 --test-n 1000

writes an imagefolder: DIR/train/<class>/<index>.png and DIR/test/<class>/<index>.png (the class
directories sorted give the label order). `load_imagefolder(DIR/"train")` reads one back as
uint8 arrays (N, 64, 80, 3) and int64 labels.
"""

from __future__ import annotations

import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 80, 64  # written size; the model's centre crop is the middle 64x64, scaled
SHAPES = ("circle", "square", "triangle", "cross")
# Hue families in [0, 1): warm (red to orange) and cool (cyan to blue); the jitter stays inside.
FAMILIES = {"warm": (0.96, 0.10), "cool": (0.50, 0.64)}
CLASS_NAMES = tuple(sorted(f"{family}-{shape}" for family in FAMILIES for shape in SHAPES))  # = sorted dirs
MAX_ROTATION = 25.0  # degrees either way: the foreground shape keeps roughly upright
_SCALE = 4  # shapes are drawn at 4x and downsampled: anti-aliased edges
_SPLIT_SALT = {"train": 1, "test": 2}


def _hue(rng: np.random.Generator, family: str) -> float:
    low, high = FAMILIES[family]
    span = (high - low) % 1.0
    return (low + rng.uniform(0, span)) % 1.0


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * radius * 0.8, y * radius * 0.8) for x, y in corners]
    elif shape == "triangle":
        pts = [(radius * math.cos(a), radius * math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "cross":
        a, b = radius, radius * 0.35
        pts = [(b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b), (-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b)]
    else:
        raise ValueError(shape)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, angle: float,
                fill: tuple[int, int, int]) -> None:
    s = _SCALE
    if shape == "circle":
        draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=fill)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, radius, angle)], fill=fill)


def make_image(seed: int, split: str, index: int, label: int) -> np.ndarray:
    """One (HEIGHT, WIDTH, 3) uint8 image of class `label`, a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], index])
    family, shape = CLASS_NAMES[label].split("-")

    # Background: a low-saturation gradient between two random colours, faint blobs, then noise.
    c0 = np.array(_rgb(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.85)), dtype=np.float32)
    c1 = np.array(_rgb(rng.uniform(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.85)), dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    t = ((xs - WIDTH / 2) * math.cos(theta) + (ys - HEIGHT / 2) * math.sin(theta)) / max(WIDTH, HEIGHT) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    background = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), mode="RGB")
    canvas = background.resize((WIDTH * _SCALE, HEIGHT * _SCALE), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 6)):
        bx, by, br = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(3, 10)
        blob = _rgb(rng.uniform(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.8))
        draw.ellipse([(bx - br) * _SCALE, (by - br) * _SCALE, (bx + br) * _SCALE, (by + br) * _SCALE], fill=blob)

    # A small distractor shape of any colour, anywhere (it may overlap the main one, drawn first).
    d_shape = SHAPES[rng.integers(len(SHAPES))]
    _draw_shape(draw, d_shape, rng.uniform(6, WIDTH - 6), rng.uniform(6, HEIGHT - 6), rng.uniform(3, 6),
                rng.uniform(0, 2 * math.pi), _rgb(rng.uniform(), rng.uniform(0.4, 1), rng.uniform(0.4, 1)))

    # The foreground shape: inside the central HEIGHT x HEIGHT crop, jittered position/scale/rotation.
    radius = rng.uniform(0.2, 0.34) * HEIGHT
    margin = radius + 2
    cx = WIDTH / 2 + rng.uniform(-(HEIGHT / 2 - margin), HEIGHT / 2 - margin)
    cy = HEIGHT / 2 + rng.uniform(-(HEIGHT / 2 - margin), HEIGHT / 2 - margin)
    fill = _rgb(_hue(rng, family), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    angle = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    _draw_shape(draw, shape, cx, cy, radius, angle, fill)

    image = np.asarray(canvas.resize((WIDTH, HEIGHT), Image.BOX), dtype=np.float32)
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(out: Path, seed: int = 0, n: int = 4000, test_n: int = 1000) -> Path:
    """Write the train and test imagefolders under `out` (balanced classes, round-robin labels)."""
    out = Path(out)
    for split, count in (("train", n), ("test", test_n)):
        for name in CLASS_NAMES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            label = index % len(CLASS_NAMES)
            image = make_image(seed, split, index, label)
            Image.fromarray(image, mode="RGB").save(out / split / CLASS_NAMES[label] / f"{index:06d}.png")
    return out


def load_imagefolder(root: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read an imagefolder (root/<class>/*.png) back: uint8 images (N, H, W, 3), int64 labels, class names.

    Classes are the sorted directory names; files are read in sorted order, so the arrays are
    deterministic. Every image must have the same size (this generator's do)."""
    root = Path(root)
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise SystemExit(f"{root}: no class directories; generate the data with `python data.py --out DIR`")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.png")):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def _int(value: str) -> int:
    return int(float(value))  # MLflow hands float parameters over as "4000.0"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write train/ and test/ into")
    parser.add_argument("--seed", type=_int, default=0)
    parser.add_argument("--n", type=_int, default=4000, help="training images")
    parser.add_argument("--test-n", type=_int, default=1000, help="test images")
    args = parser.parse_args(argv)
    generate(args.out, args.seed, args.n, args.test_n)
    print(f"wrote {args.n} train and {args.test_n} test images ({len(CLASS_NAMES)} classes) to {args.out}")


if __name__ == "__main__":
    main()
