"""`log_model`: check a component's network against the contract, export it, and log what every later
step needs, in the active MLflow run. Nothing is logged unless the whole contract holds.

The contract (docs/components.md), checked in this order, each failure a `ContractError` naming it:
1. data: class names (>= 2, unique); test and validation images uint8 in the preprocessing spec's
   layout ((N, H, W) for 1 channel, (N, H, W, 3) for 3), labels one integer per image;
2. signature: `model(x)` on a float (N, C, H, W) batch of the spec's size returns logits (N, classes);
3. embedding: the named submodule's output is (N, D) (or none named: softmax outputs, said so);
4. export: TorchScript and ONNX files that reproduce eager PyTorch within PARITY_TOL on a held
   batch of real test images, and MLflow's own `pt2` model (torch.export) for `mlflow models serve`.
Then it logs: the labelled test set (`flywheel/test_set.npz`, with its sha256), the MLflow model with
`flywheel_component.json` and the two serving files as extra files, and the monitor's reference sample
(`reference/`; its image channels are fitted on a thread while the exports run). The spec names the
test set by URI, so the gate and release acceptance evaluate every version on exactly those images
without knowing the component's data loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flywheel.contracts.component import (
    ONNX_FILE,
    TEST_SET_ARTIFACT,
    TORCHSCRIPT_FILE,
    ComponentSpec,
    EmbeddingSpec,
    GateSpec,
    SpecError,
    TestSetRef,
    check_images,
    parse_test_set,
    test_set_bytes,
)
from flywheel.core.data import Splits
from flywheel.core.errors import FlywheelError
from flywheel.core.models import ServingModule

log = logging.getLogger(__name__)
REFERENCE_SIZE = 1000  # validation embeddings kept as the monitor's drift reference
DEVICE_VARIABLE = "MLFLOW_DEFAULT_PREDICTION_DEVICE"  # where mlflow.pyfunc loads a model without model_config


class ContractError(FlywheelError):
    """A component that breaks the contract; the message names what is missing or wrong."""


@dataclass(frozen=True)
class LoggedModel:
    model_uri: str  # models:/m-… of the logged MLflow model
    spec: ComponentSpec


def check_contract(model: nn.Module, splits: Splits, embedding: str | None) -> tuple[ServingModule, torch.Tensor]:
    """Steps 1–3 of the contract; returns the serving module and the held batch (float, on the CPU)."""
    from flywheel.component.export import HELD_BATCH
    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.contracts.reference import MIN_SAMPLES

    try:
        for what, split in (("test split", splits.test), ("validation split", splits.val)):
            check_images(split.images, split.labels, splits.preprocess, what)
        if len(splits.val) < MIN_SAMPLES:
            raise SpecError(f"the validation split has {len(splits.val)} images; the monitor's reference needs at "
                            f"least {MIN_SAMPLES}")
        if int(splits.test.labels.max()) >= len(splits.class_names) or int(splits.test.labels.min()) < 0:
            raise SpecError(f"test labels span 0..{int(splits.test.labels.max())} but there are "
                            f"{len(splits.class_names)} class names")
    except SpecError as exc:
        raise ContractError(f"component data: {exc}") from None
    # Exported where it is served, in the default layout: a CPU training loop leaves conv weights
    # channels_last, which torch.export's pt2 archive packs with a "No complete tensor found" warning.
    model.cpu().to(memory_format=torch.contiguous_format).eval()
    serving = ServingModule(model, embedding)
    example = to_tensor(splits.test.images[:HELD_BATCH], splits.preprocess)
    try:
        with torch.inference_mode():
            logits, emb = serving(example)
    except Exception as exc:  # noqa: BLE001 - any failure of the component's forward is a contract break
        raise ContractError(f"signature: model(x) fails on a float {tuple(example.shape)} batch (the preprocessing "
                            f"spec's layout): {type(exc).__name__}: {exc}") from None
    n, classes = len(example), len(splits.class_names)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ContractError(f"signature: model(x) must return logits of shape ({n}, {classes}) for a batch of {n} "
                            f"and {classes} classes, got {shape}")
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ContractError(f"embedding: layer {embedding!r} outputs {tuple(emb.shape)}; the monitor needs "
                            f"(batch, dim): name a layer after flattening or pooling")
    return serving, example


def export_checked(serving: ServingModule, example: torch.Tensor, directory: Path) -> dict[str, float]:
    """Step 4: TorchScript + ONNX files in `directory`, each within PARITY_TOL of eager; returns
    each file's max abs diff."""
    from flywheel.component.export import PARITY_TOL, check_parity, export_onnx, export_torchscript

    with torch.inference_mode():
        reference = tuple(t.numpy() for t in serving(example))
    try:
        ts, scripted = export_torchscript(serving, example, reference, directory, TORCHSCRIPT_FILE)
        check_parity(ts, PARITY_TOL)
        onnx = export_onnx(serving, example, reference, directory, scripted=scripted, filename=ONNX_FILE)
        check_parity(onnx, PARITY_TOL)
    except FlywheelError as exc:
        raise ContractError(f"export: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - torch.jit/onnx raise many types; all mean "does not export"
        raise ContractError(f"export: the model does not export to TorchScript/ONNX: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return {"torchscript": ts.max_abs_diff, "onnx": onnx.max_abs_diff}


@contextlib.contextmanager
def _cpu_prediction_device():
    """MLflow checks the input example by loading the logged model on CUDA wherever a GPU is visible,
    but a pt2 model keeps the device it was exported on, the CPU here (it is served there too): on a
    GPU training node that check failed with a warning. Inside, it loads on the CPU."""
    previous = os.environ.get(DEVICE_VARIABLE)
    os.environ[DEVICE_VARIABLE] = "cpu"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DEVICE_VARIABLE, None)
        else:
            os.environ[DEVICE_VARIABLE] = previous


def log_model(model: nn.Module, splits: Splits, *, embedding: str | None, gate: GateSpec = GateSpec(),
              name: str | None = None, test_set_uri: str | None = None, logger=None) -> LoggedModel:
    """Check `model` against the contract and log it with its spec, test set and reference sample to
    the active MLflow run (`logger`: that run's RunLogger, flushed by the caller; default: a new one).

    `embedding`: the submodule whose output (N, D) is the monitor's embedding, or None (softmax).
    `test_set_uri`: an existing labelled test set (.npz) to reference instead of logging
    `splits.test`; it is read, checked and digested now."""
    import mlflow
    from mlflow.models import infer_signature

    from flywheel.contracts.reference import ARTIFACT_DIR as REFERENCE_DIR
    from flywheel.contracts.reference import ReferenceSample
    from flywheel.core.evaluate import predict
    from flywheel.core.runlog import RunLogger, active_run_id

    run = mlflow.active_run()
    if run is None:
        raise ContractError("log_model needs an active MLflow run (mlflow.start_run, or flywheel.component.trainer)")
    logger = logger or RunLogger(active_run_id() or run.info.run_id)
    serving, example = check_contract(model, splits, embedding)
    n = min(REFERENCE_SIZE, len(splits.val))
    pick = np.sort(np.random.default_rng(0).permutation(len(splits.val))[:n])
    with tempfile.TemporaryDirectory(prefix="flywheel-log-") as tmp, \
            ThreadPoolExecutor(1, thread_name_prefix="flywheel-reference") as pool:
        image_channels = pool.submit(fit_image_channels, splits, pick)  # numpy: beside the exports' Python
        tmp = Path(tmp)
        extras = tmp / "extras"
        extras.mkdir()
        parity = export_checked(serving, example, extras)

        test_ref = _test_set(splits, test_set_uri, tmp, logger, run.info.run_id)
        logits, embeddings = predict(serving, splits.val.images[pick], splits, with_embeddings=True)
        priors = np.bincount(splits.train.labels, minlength=len(splits.class_names)) / max(1, len(splits.train))

        if embedding is None:
            log.warning("no embedding layer named: the monitor will compare softmax outputs (a weaker drift signal)")
        spec = ComponentSpec(
            name=name or type(model).__name__, class_names=tuple(splits.class_names), preprocess=splits.preprocess,
            embedding=EmbeddingSpec("softmax", embeddings.shape[1]) if embedding is None
            else EmbeddingSpec("layer", embeddings.shape[1], embedding),
            gate=gate, test_set=test_ref, dataset=splits.name, dataset_digest=splits.digest, parity=parity)
        files = [spec.write(extras), str(extras / TORCHSCRIPT_FILE), str(extras / ONNX_FILE)]

        serving.remove_hook()
        example_np = example[:2].numpy()  # batch 2: the signature's batch dim stays dynamic
        with torch.inference_mode():
            signature = infer_signature(example_np, model(torch.from_numpy(example_np)).numpy())
        try:
            with _cpu_prediction_device():
                info = mlflow.pytorch.log_model(model, name="model", input_example=example_np, signature=signature,
                                                extra_files=files, serialization_format="pt2",
                                                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                                  f"mlflow=={mlflow.__version__}"])
        except Exception as exc:  # noqa: BLE001 - torch.export errors come in many types
            if isinstance(exc, (OSError, ConnectionError)) or type(exc).__module__.startswith(("mlflow", "requests")):
                raise  # the store, not the model: RunLogger's callers report it
            raise ContractError(f"export: torch.export (MLflow's pt2 format) fails: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        reference = tmp / REFERENCE_DIR
        ReferenceSample(embeddings, logits.argmax(1), splits.val.labels[pick], priors,
                        *image_channels.result()).save(reference)
        logger.log_artifacts(reference, REFERENCE_DIR)
    return LoggedModel(info.model_uri, spec)


def fit_image_channels(splits: Splits, pick: np.ndarray) -> tuple:
    """(input statistics, texture model, texture statistics, shift directions, pixel subspace, residuals,
    patch grain, grain scores) for the drift detector's input, texture, residual and grain channels: the
    statistics of the validation images `pick` (the reference sample's), the models fitted on training
    images. All None for images under 3x3 pixels. numpy only, much of it outside the GIL, so `log_model`
    runs it on a thread beside the exports."""
    from flywheel.contracts.preprocessing import to_array
    from flywheel.contracts.reference import input_statistics

    pp = splits.preprocess
    if min(pp.height, pp.width) < 3:
        return (None,) * 8
    texture = fit_texture(splits.train.images, pp)
    subspace = fit_subspace(splits.train.images, pp)
    grain = fit_grain(splits.train.images, pp)
    chunks = [to_array(splits.val.images[pick[i:i + 500]], pp) for i in range(0, len(pick), 500)]
    stats = np.concatenate([input_statistics(x) for x in chunks])
    residuals = None if subspace is None else np.concatenate([subspace.residuals(x) for x in chunks])
    grain_scores = None if grain is None else np.concatenate([grain.scores(x) for x in chunks])
    if texture is None:
        return stats, None, None, None, subspace, residuals, grain, grain_scores
    texture_stats = np.concatenate([texture.statistics(x) for x in chunks])
    return (stats, texture, texture_stats, fit_shift_directions(splits.train.images, pp, texture), subspace,
            residuals, grain, grain_scores)


def _texture_fit_pick(train_images: np.ndarray) -> np.ndarray:
    """The seeded pick of up to TEXTURE_FIT_SAMPLES training images the texture channels are fitted on."""
    from flywheel.contracts.reference import TEXTURE_FIT_SAMPLES

    return np.sort(np.random.default_rng(0).permutation(len(train_images))[:TEXTURE_FIT_SAMPLES])


def _picked_batches(train_images: np.ndarray, preprocess):
    """The texture model's pick of training images, preprocessed in batches of 500 as they are consumed: what
    every image-channel model of the drift monitor is fitted on."""
    from flywheel.contracts.preprocessing import to_array

    pick = _texture_fit_pick(train_images)
    return (to_array(train_images[pick[i:i + 500]], preprocess) for i in range(0, len(pick), 500))


def fit_texture(train_images: np.ndarray, preprocess):
    """The drift monitor's texture model (`contracts.reference.TextureModel`), fitted on a seeded pick of
    up to TEXTURE_FIT_SAMPLES training images, never on the reference's own (validation) samples;
    None with fewer than 2 training images."""
    from flywheel.contracts.reference import TextureModel

    if len(train_images) < 2:
        return None
    return TextureModel.fit(_picked_batches(train_images, preprocess))


def fit_subspace(train_images: np.ndarray, preprocess):
    """The drift monitor's pixel subspace (`contracts.reference.PixelSubspace`), fitted on the texture model's
    pick of training images, never on the reference's own; None with fewer than 2 training images."""
    from flywheel.contracts.reference import PixelSubspace

    if len(train_images) < 2:
        return None
    return PixelSubspace.fit(_picked_batches(train_images, preprocess))


def fit_grain(train_images: np.ndarray, preprocess):
    """The drift monitor's patch grain (`contracts.reference.PatchGrain`), fitted on the texture model's pick
    of training images, never on the reference's own; its flat-patch threshold from the preprocessing's
    scale (black to white is 1 / std on a normalised channel, averaged over channels as the channel mean
    averages them). None with fewer than 2 training images or no textured patch among them."""
    from flywheel.contracts.reference import PatchGrain

    if len(train_images) < 2:
        return None
    value_range = float(np.mean(1.0 / np.asarray(preprocess.std, dtype=np.float64)))
    try:
        return PatchGrain.fit(_picked_batches(train_images, preprocess), value_range)
    except ValueError:  # flat training images (no 3x3 patch with texture): nothing to fit, no grain channel
        return None


def fit_shift_directions(train_images: np.ndarray, preprocess, texture):
    """The texture-shift channel's `contracts.reference.ShiftDirections`, fitted on the texture model's pick
    of training images, the first SHIFT_DIRECTION_IMAGES of them also through every TUNING family and
    severity of the corruption suite (`flywheel.core.shifts.TUNING_FAMILIES`: never a held-out one)."""
    from flywheel.contracts.preprocessing import to_array
    from flywheel.contracts.reference import (
        SHIFT_DIRECTION_IMAGES,
        ShiftDirections,
        image_features,
        input_statistics,
    )
    from flywheel.core.shifts import SEVERITIES, TUNING_FAMILIES, corrupt_images

    images = train_images[_texture_fit_pick(train_images)]

    def per_chunk(fn, x: np.ndarray) -> np.ndarray:
        return np.concatenate([fn(to_array(x[i:i + 500], preprocess)) for i in range(0, len(x), 500)])

    def features(x: np.ndarray) -> np.ndarray:
        return per_chunk(lambda a: image_features(a, texture), x)

    base = images[:SHIFT_DIRECTION_IMAGES]  # texture statistics only of these and their corruptions
    corrupted = [features(corrupt_images(base, f, s)) for f in TUNING_FAMILIES for s in SEVERITIES]
    return ShiftDirections.fit(per_chunk(input_statistics, images), features(base), corrupted, texture)


def _test_set(splits: Splits, uri: str | None, tmp: Path, logger, run_id: str) -> TestSetRef:
    """The labelled test set: `splits.test` logged as a run artifact, or an existing URI checked."""
    if uri is None:
        data = test_set_bytes(splits.test.images, splits.test.labels)
        path = tmp / Path(TEST_SET_ARTIFACT).name
        path.write_bytes(data)
        logger.log_artifact(path, str(Path(TEST_SET_ARTIFACT).parent))
        return TestSetRef(f"runs:/{run_id}/{TEST_SET_ARTIFACT}", hashlib.sha256(data).hexdigest(), len(splits.test))
    import mlflow

    try:
        data = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)).read_bytes()
        images, labels = parse_test_set(data, where=f"test set {uri}")
        check_images(images, labels, splits.preprocess, f"test set {uri}")
    except SpecError as exc:
        raise ContractError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any download failure: name the URI
        raise ContractError(f"test set {uri} cannot be read: {type(exc).__name__}: {exc}") from None
    return TestSetRef(uri, hashlib.sha256(data).hexdigest(), len(labels))
