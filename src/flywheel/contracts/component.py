"""The component spec: what a component's `train` entry point logs beside its model, as one dataclass.

Every later step (gate, package, release acceptance, serving, the monitor, `flywheel status`) works
from this file and the exported model files alone, never importing the component's code, so a team's
own network, input size, colour mode and data loader go through the whole loop unchanged.

`flywheel_component.json` sits in the logged MLflow model's `extra_files/` next to the two serving
files it names (TorchScript and ONNX; both map a float (N, C, H, W) batch to (logits, embedding)).
`flywheel.component.log_model` writes it after checking the contract; `ComponentSpec.read` loads
and validates it. The labelled test set is an `.npz` (`images` uint8 (N, H, W) or (N, H, W, 3),
`labels` int64) at a URI with its sha256: `read_test_set` refuses bytes that are not the ones logged.

Imports only the standard library and numpy (plus the preprocessing contract), like every contract.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from flywheel.contracts.preprocessing import PreprocessSpec

SPEC_FILE = "flywheel_component.json"
SPEC_PATH = f"extra_files/{SPEC_FILE}"  # inside the logged MLflow model (mlflow copies extra files there)
TORCHSCRIPT_FILE = "flywheel_serving.pt"
ONNX_FILE = "flywheel_serving.onnx"
TEST_SET_ARTIFACT = "flywheel/test_set.npz"  # run artifact, when log_model stores the test set itself
GATE_METRICS = {"accuracy": "maximize", "macro_f1": "maximize"}  # computed by Flywheel on the test set
EMBEDDING_SOURCES = ("layer", "softmax")
SCHEMA = 1


class SpecError(ValueError):
    """A component spec (or test set) that breaks the contract; the message names what is wrong."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """Where the monitor's embedding comes from: a named layer of the component's network, or (when
    the component names none) the softmax outputs, a weaker drift signal the monitor says it uses."""

    source: str  # "layer" | "softmax"
    dim: int
    layer: str | None = None

    def __post_init__(self) -> None:
        if self.source not in EMBEDDING_SOURCES:
            raise SpecError(f"embedding.source {self.source!r}: choose one of {', '.join(EMBEDDING_SOURCES)}")
        if self.source == "layer" and not self.layer:
            raise SpecError("embedding.source 'layer' needs embedding.layer (a submodule name)")
        if int(self.dim) < 1:
            raise SpecError(f"embedding.dim must be >= 1, got {self.dim}")


@dataclass(frozen=True)
class GateSpec:
    """The metric the champion/challenger gate compares on the test set, and which way is better."""

    metric: str = "accuracy"
    direction: str = "maximize"

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise SpecError(f"gate.metric {self.metric!r}: choose one of {', '.join(GATE_METRICS)}")
        if self.direction != GATE_METRICS[self.metric]:
            raise SpecError(f"gate.direction for {self.metric} is {GATE_METRICS[self.metric]!r}, not {self.direction!r}")

    def better(self, challenger: float, champion: float, margin: float = 0.0) -> bool:
        """True when `challenger` beats `champion` by more than `margin` in this metric's direction."""
        if self.direction == "maximize":
            return challenger > champion + margin
        return challenger < champion - margin


@dataclass(frozen=True)
class TestSetRef:
    """The labelled test set the gate and release acceptance use: any URI MLflow can download
    (`runs:/…`, `gs://…`, a local path) and the sha256 of its bytes."""

    uri: str
    sha256: str
    n: int

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class ComponentSpec:
    """Everything serving, evaluation and the monitor need besides the exported network."""

    name: str  # the component's own name for its network (free text)
    class_names: tuple[str, ...]
    preprocess: PreprocessSpec
    embedding: EmbeddingSpec
    gate: GateSpec
    test_set: TestSetRef
    dataset: str = ""
    dataset_digest: str = ""
    serving: dict = field(default_factory=lambda: {"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE})
    parity: dict = field(default_factory=dict)  # max abs diff of each serving file vs eager, at log time
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        if len(self.class_names) < 2:
            raise SpecError(f"class_names must name at least 2 classes, got {list(self.class_names)}")
        if len(set(self.class_names)) != len(self.class_names):
            raise SpecError("class_names must be unique")

    @property
    def embedding_dim(self) -> int:
        return self.embedding.dim

    @property
    def architecture(self) -> str:  # the name the manifest and older callers use
        return self.name

    # -- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> ComponentSpec:
        missing = [k for k in ("name", "class_names", "preprocess", "embedding", "gate", "test_set") if k not in data]
        if missing:
            raise SpecError(f"{SPEC_FILE} lacks {', '.join(missing)}")
        try:
            return cls(name=str(data["name"]), class_names=tuple(str(c) for c in data["class_names"]),
                       preprocess=PreprocessSpec.from_dict(data["preprocess"]),
                       embedding=EmbeddingSpec(**data["embedding"]), gate=GateSpec(**data["gate"]),
                       test_set=TestSetRef(**data["test_set"]), dataset=str(data.get("dataset", "")),
                       dataset_digest=str(data.get("dataset_digest", "")),
                       serving=dict(data.get("serving") or {"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE}),
                       parity=dict(data.get("parity") or {}),
                       schema=int(data.get("schema", SCHEMA)))
        except (TypeError, ValueError) as exc:  # a wrong field type or value, named by the constructor
            raise SpecError(f"{SPEC_FILE}: {exc}") from None

    @classmethod
    def read(cls, source: str | os.PathLike) -> ComponentSpec:
        """From the JSON file, or a (model) directory holding it at any depth."""
        path = os.fspath(source)
        if os.path.isdir(path):
            found = [os.path.join(root, SPEC_FILE) for root, _, files in os.walk(path) if SPEC_FILE in files]
            if not found:
                raise SpecError(f"no {SPEC_FILE} in {path}: the model was not logged by flywheel.component.log_model")
            path = found[0]
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except ValueError as exc:
                raise SpecError(f"{path} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{path} is not a JSON object")
        return cls.from_dict(data)

    def write(self, directory: str | os.PathLike) -> str:
        path = os.path.join(os.fspath(directory), SPEC_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        return path


# -- the labelled test set -------------------------------------------------------------------------
def check_images(images: np.ndarray, labels: np.ndarray, preprocess: PreprocessSpec, what: str) -> None:
    """Images and labels in the contract's layout for `preprocess` (uint8 (N,H,W) or (N,H,W,3))."""
    images, labels = np.asarray(images), np.asarray(labels)
    channels = preprocess.channels
    want = 3 if channels == 1 else 4
    if images.dtype != np.uint8 or images.ndim != want or (want == 4 and images.shape[-1] != 3):
        layout = "(N, H, W)" if channels == 1 else "(N, H, W, 3)"
        raise SpecError(f"{what}: images must be uint8 {layout} for {channels} channel(s), got "
                        f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise SpecError(f"{what}: labels must be integers, one per image; got {labels.dtype} {labels.shape} "
                        f"for {len(images)} images")
    if len(images) == 0:
        raise SpecError(f"{what} is empty")


def test_set_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The .npz bytes of a labelled test set (compressed; `images`, `labels`)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.asarray(images, dtype=np.uint8), labels=np.asarray(labels, dtype=np.int64))
    return buf.getvalue()


test_set_bytes.__test__ = False  # a helper, not a pytest test


def parse_test_set(data: bytes, sha256: str | None = None, where: str = "test set") -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from .npz bytes, after checking their sha256 when one is given."""
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise SpecError(f"{where}: sha256 {actual} does not match the recorded {sha256} (changed since logging)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise SpecError(f"{where} is not an .npz with 'images' and 'labels': {exc}") from None
    return images, labels.astype(np.int64)


parse_test_set.__test__ = False
