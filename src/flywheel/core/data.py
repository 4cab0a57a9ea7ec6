"""Datasets by name, deterministic splits with a frozen test split, and stable content digests."""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flywheel.contracts.preprocessing import PreprocessSpec, decode_image, resize
from flywheel.core.errors import DataError

DATASETS = ("fashion-mnist", "digits", "imagefolder")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2  # for datasets without an official test split
FROZEN_TEST_SEED = 20240229  # never changes: every model version is compared on the same test images
HOW_TO_GET_FASHION = ("install it with `apt-get install dataset-fashion-mnist` (Debian), or put the four "
                      "idx .gz files from github.com/zalandoresearch/fashion-mnist in --data-dir")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W) greyscale (light strokes on dark background) or (N, H, W, 3) RGB
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Splits:
    name: str
    train: Split
    val: Split
    test: Split  # frozen: independent of the training seed and of data added later
    class_names: tuple[str, ...]
    digest: str  # sha256 of the content (pixels, labels, class names, split membership)
    source: str  # where the data was read from
    spec: PreprocessSpec | None = None  # a component's own; None: greyscale at the images' size

    @property
    def preprocess(self) -> PreprocessSpec:
        if self.spec is not None:
            return self.spec
        images = self.train.images  # (N, H, W) greyscale or (N, H, W, 3) RGB
        return PreprocessSpec(channels=3 if images.ndim == 4 else 1, height=int(images.shape[1]),
                              width=int(images.shape[2]))


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguity between parts
        h.update(data)
    return h.hexdigest()


def split_digest(name: str, train: Split, val: Split, test: Split, class_names: tuple[str, ...]) -> str:
    return _digest(name, "\n".join(class_names),
                   *(arr.tobytes() for s in (train, val, test) for arr in (s.images, s.labels)))


# ---------------------------------------------------------------------------------------- idx files
def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Read one gzipped idx file (the MNIST format), validating header and length."""
    if not path.is_file():
        raise DataError(f"dataset file missing: {path}; {HOW_TO_GET_FASHION}")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"dataset file corrupt: {path} ({exc}); {HOW_TO_GET_FASHION}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != expect_dims:
        raise DataError(f"dataset file corrupt: {path} has no idx header for {expect_dims}-d uint8 data")
    dims = struct.unpack(">" + "I" * expect_dims, raw[4:4 + 4 * expect_dims])
    body = raw[4 + 4 * expect_dims:]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"dataset file corrupt: {path} holds {len(body)} bytes, header says {np.prod(dims)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _fashion_dir(data_dir: Path | None) -> Path:
    if data_dir is not None:
        for d in (data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw"):
            present = [f for f in FASHION_FILES.values() if (d / f).is_file()]
            if len(present) == len(FASHION_FILES):
                return d
            if present:  # a half-filled --data-dir is a mistake worth naming, not a reason to look elsewhere
                missing = next(f for f in FASHION_FILES.values() if f not in present)
                raise DataError(f"dataset file missing: {d / missing}; {HOW_TO_GET_FASHION}")
    if all((FASHION_SYSTEM_DIR / f).is_file() for f in FASHION_FILES.values()):
        return FASHION_SYSTEM_DIR
    return _download_fashion(data_dir)


def _download_fashion(data_dir: Path | None) -> Path:
    """Last resort when online: torchvision's downloader into data_dir (or ~/.cache/flywheel)."""
    root = data_dir or Path.home() / ".cache" / "flywheel"
    try:
        from flywheel.core.vision import import_torchvision

        tv = import_torchvision()
        tv.datasets.FashionMNIST(str(root), train=True, download=True)
        tv.datasets.FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: not available offline
        where = data_dir or FASHION_SYSTEM_DIR
        raise DataError(f"Fashion-MNIST not found in {where} and download failed ({type(exc).__name__}); "
                        f"{HOW_TO_GET_FASHION}") from None
    return root / "FashionMNIST" / "raw"


def _seeded_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(order[k:]), np.sort(order[:k])


def _fashion_part(d: Path, part: str) -> Split:
    """One Fashion-MNIST file pair ("train" or "test"), validated, labels as int64."""
    x = read_idx(d / FASHION_FILES[f"{part}_images"], 3)
    y = read_idx(d / FASHION_FILES[f"{part}_labels"], 1)
    if len(x) != len(y):
        which = "train" if part == "train" else "t10k"
        raise DataError(f"dataset file corrupt: {which} has {len(x)} images but {len(y)} labels in {d}")
    return Split(x, y.astype(np.int64))


def load_fashion_mnist(data_dir: Path | None, seed: int) -> Splits:
    d = _fashion_dir(data_dir)
    train, test = _fashion_part(d, "train"), _fashion_part(d, "test")
    keep, val = _seeded_split(len(train.labels), VAL_FRACTION, seed)
    return _splits("fashion-mnist", train.images, train.labels, keep, val, test, FASHION_CLASSES, str(d))


def load_digits_dataset(seed: int, size: int = 28) -> Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 values 0..16 → uint8 0..255 upscaled to the model's input size, light strokes on dark.
    images = resize((bunch.images * (255.0 / 16.0)).round().astype(np.uint8), size)
    labels = bunch.target.astype(np.int64)
    rest, test = _seeded_split(len(labels), TEST_FRACTION, FROZEN_TEST_SEED)
    keep_rel, val_rel = _seeded_split(len(rest), VAL_FRACTION, seed)
    return _splits("digits", images[rest], labels[rest], keep_rel, val_rel,
                   Split(images[test], labels[test]), tuple(str(i) for i in range(10)), "sklearn.datasets.load_digits")


def _content_is_test(data: bytes) -> bool:
    """Test membership by content hash: an image stays in (or out of) test however the folder grows."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % 1000 < TEST_FRACTION * 1000


def class_folder(name: str) -> str:
    """Folder name of a class in imagefolder layout: '/' (as in 'T-shirt/top') can't be in a name."""
    return name.replace("/", "_")


def read_imagefolder(root: Path, class_names: tuple[str, ...] | None = None, size: int = 28,
                     spec: PreprocessSpec | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read root/<class>/<image>, decoded per `spec` (default: greyscale size x size); returns images,
    labels, is_test mask, class names."""
    if not root.is_dir():
        raise DataError(f"image folder missing: {root} (expected one sub-folder of images per class)")
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    names = class_names or found
    folders = [class_folder(c) for c in names]
    unknown = [c for c in found if c not in folders]
    if unknown:
        raise DataError(f"image folder {root} has classes {unknown} not among {folders}")
    images, labels, is_test = [], [], []
    spec = spec or PreprocessSpec(image_size=size)
    for label, cls in enumerate(folders):
        folder = root / cls
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = path.read_bytes()
            try:
                images.append(decode_image(data, spec))
            except ValueError as exc:
                raise DataError(f"dataset file corrupt: {path}: {exc}") from None
            labels.append(label)
            is_test.append(_content_is_test(data))
    if not images:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return (np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(is_test, dtype=bool), names)


def load_imagefolder(root: Path, seed: int) -> Splits:
    images, labels, is_test, names = read_imagefolder(root)
    rest = np.flatnonzero(~is_test)
    keep_rel, val_rel = _seeded_split(len(rest), VAL_FRACTION, seed)
    return _splits("imagefolder", images[rest], labels[rest], keep_rel, val_rel,
                   Split(images[is_test], labels[is_test]), names, str(root))


def _splits(name: str, x: np.ndarray, y: np.ndarray, keep: np.ndarray, val: np.ndarray, test: Split,
            class_names: tuple[str, ...], source: str, spec: PreprocessSpec | None = None) -> Splits:
    train_s, val_s = Split(x[keep], y[keep]), Split(x[val], y[val])
    return Splits(name, train_s, val_s, test, class_names,
                  split_digest(name, train_s, val_s, test, class_names), source, spec)


def make_splits(name: str, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...] | list[str], *,
                preprocess: PreprocessSpec, seed: int = 0, source: str = "", test_images: np.ndarray | None = None,
                test_labels: np.ndarray | None = None) -> Splits:
    """A component's own labelled images as Splits: train/val split by `seed`, and a test split that
    never depends on it (given, or chosen by each image's content hash, so it stays frozen however
    the data grows). Images are uint8 (N, H, W) or (N, H, W, 3) per `preprocess.channels`."""
    images, labels = np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if test_images is None:
        is_test = np.fromiter((_content_is_test(img.tobytes()) for img in images), dtype=bool, count=len(images))
        test = Split(images[is_test], labels[is_test])
        images, labels = images[~is_test], labels[~is_test]
    else:
        test = Split(np.ascontiguousarray(test_images, dtype=np.uint8), np.asarray(test_labels, dtype=np.int64))
    if min(len(images), len(test)) == 0:
        raise DataError(f"{name}: too few images for a train and a test split ({len(images)} / {len(test)})")
    keep, val = _seeded_split(len(labels), VAL_FRACTION, seed)
    return _splits(name, images, labels, keep, val, test, tuple(class_names), source or name, preprocess)


def add_labelled(base: Splits, extra_dirs: list[Path] | tuple[Path, ...]) -> Splits:
    """Base data plus labelled images (imagefolder layout, e.g. a capture snapshot) added to train.

    The test split stays the base's frozen one, so the new model is gated on the same images.
    """
    if not extra_dirs:
        return base
    xs, ys = [base.train.images], [base.train.labels]
    for d in extra_dirs:
        images, labels, _, _ = read_imagefolder(Path(d), base.class_names, spec=base.preprocess)
        xs.append(images)
        ys.append(labels)
    train = Split(np.concatenate(xs), np.concatenate(ys))
    return Splits(base.name, train, base.val, base.test, base.class_names,
                  split_digest(base.name, train, base.val, base.test, base.class_names),
                  base.source + "".join(f" + {d}" for d in extra_dirs), base.spec)


def load_test_split(name: str, data_dir: Path | None = None) -> tuple[Split, tuple[str, ...]]:
    """Only the frozen test split and the class names: what export checks and release acceptance
    read. Fashion-MNIST's is its own t10k file, so the 60k training images are neither read nor
    digested (~0.5 s per process); other datasets derive it from the full load."""
    if name == "fashion-mnist":
        return _fashion_part(_fashion_dir(data_dir), "test"), FASHION_CLASSES
    splits = load_splits(name, data_dir)
    return splits.test, splits.class_names


def load_splits(name: str, data_dir: Path | None = None, seed: int = 0,
                extra_dirs: tuple[Path, ...] = ()) -> Splits:
    """Load a dataset by name with deterministic train/val splits and its frozen test split."""
    if name == "fashion-mnist":
        base = load_fashion_mnist(data_dir, seed)
    elif name == "digits":
        base = load_digits_dataset(seed)
    elif name == "imagefolder":
        if data_dir is None:
            raise DataError("dataset 'imagefolder' needs --data-dir pointing at <root>/<class>/<image> files")
        base = load_imagefolder(Path(data_dir), seed)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return add_labelled(base, tuple(Path(d) for d in extra_dirs))
