"""The served network: a component's module as (logits, embedding), and loading it back from the registry.

`ServingModule` wraps any classifier (`forward`: float (N, C, H, W) → logits (N, classes)) so that
one forward pass returns (logits, embedding): the embedding is the output of the submodule the
component named (captured by a forward hook, so the component's `forward` stays its own), or the
softmax of the logits when it named none. `flywheel.component.log_model` traces exactly this module
to TorchScript and ONNX.

Loading never rebuilds a network from a list of architectures: `load_model` downloads the logged
model directory and loads the TorchScript file the component spec names, so evaluation, the gate
and packaging run without the component's code. `load_spec` fetches only the spec JSON (the
monitor, `flywheel status`); `read_test_set` the labelled test set, checked against its sha256.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flywheel.contracts.component import SPEC_PATH, ComponentSpec, SpecError, parse_test_set
from flywheel.core.errors import FlywheelError


class ServingModule(nn.Module):
    """(logits, embedding) from one forward pass of `net`; the embedding is `embedding_layer`'s
    output flattened to (N, D), or softmax(logits) when `embedding_layer` is None."""

    def __init__(self, net: nn.Module, embedding_layer: str | None):
        super().__init__()
        self.net = net
        self.embedding_layer = embedding_layer
        self._captured: list[torch.Tensor] = []
        self._hook = None
        if embedding_layer is not None:
            try:
                layer = net.get_submodule(embedding_layer)
            except AttributeError:
                raise FlywheelError(f"embedding layer {embedding_layer!r} is not a submodule of "
                                    f"{type(net).__name__}; name one of: "
                                    f"{', '.join(n for n, _ in net.named_children()) or '(none)'}") from None
            self._hook = layer.register_forward_hook(lambda _m, _i, out: self._captured.append(out))

    def remove_hook(self) -> None:
        """Leave `net` as it was (torch.export of `net` must not see the capturing hook)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        logits = self.net(x)
        if self.embedding_layer is None:
            return logits, torch.softmax(logits, dim=1)
        if not self._captured:
            raise FlywheelError(f"embedding layer {self.embedding_layer!r} did not run in forward()")
        embedding = self._captured[-1]
        self._captured.clear()
        return logits, embedding


def store_uri(uri: str, tracking_uri: str | None = None) -> str:
    """`uri` with a leading models:/ part (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/ID`,
    any path after it) resolved in `tracking_uri`'s registry to where the files are stored.

    MLflow 3.17 resolves models:/ through the process-wide registry and tracking URIs, whatever
    `registry_uri` a download passes (ModelsArtifactRepository._get_model_uri_infos), so a caller that
    names its store explicitly would read another one. Other URIs, or no `tracking_uri`: unchanged."""
    if not (tracking_uri and uri.startswith("models:/")):
        return uri
    from mlflow import MlflowClient
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    base, sub = ModelsArtifactRepository.split_models_uri(uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = get_model_name_and_version(client, base)
    base = client.get_model_version_download_uri(*found) if len(found) == 2 else f"models:/{found[0]}"
    if base.startswith("models:/"):  # a logged model (MLflow 3): its files are at its artifact location
        base = client.get_logged_model(base[len("models:/"):]).artifact_location
    return f"{base.rstrip('/')}/{sub}" if sub else base


def model_dir(model_uri: str, tracking_uri: str | None = None) -> Path:
    """The logged model's local directory (downloaded once per call)."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=store_uri(model_uri, tracking_uri),
                                                    tracking_uri=tracking_uri))


def load_model(model_uri: str, device: str | torch.device = "cpu",
               tracking_uri: str | None = None) -> tuple[torch.jit.ScriptModule, ComponentSpec]:
    """(TorchScript module → (logits, embedding), its ComponentSpec) of a logged model, e.g.
    `models:/name@prod`; FlywheelError when the model was not logged through the component contract."""
    return load_local(model_dir(model_uri, tracking_uri), model_uri, device)


def load_local(local: Path, model_uri: str, device: str | torch.device = "cpu"):
    """`load_model` of a logged model already downloaded to `local` (`model_uri` names it in errors)."""
    try:
        spec = ComponentSpec.read(local)
    except SpecError as exc:
        raise FlywheelError(f"{model_uri}: {exc} (retrain it with flywheel.component)") from None
    script = next(local.rglob(spec.serving["torchscript"]), None)
    if script is None:
        raise FlywheelError(f"{model_uri} has no {spec.serving['torchscript']}: its export is missing")
    module = torch.jit.load(str(script), map_location=torch.device(device))
    return module.eval(), spec


def load_spec(model_uri: str, tracking_uri: str | None = None) -> ComponentSpec:
    """Only the ComponentSpec of `models:/NAME/VERSION` (or any model URI), without the network."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=store_uri(f"{model_uri.rstrip('/')}/{SPEC_PATH}", tracking_uri), tracking_uri=tracking_uri)
    except (MlflowException, OSError) as exc:
        raise FlywheelError(f"{model_uri} has no {SPEC_PATH}: not logged by flywheel.component "
                            f"({type(exc).__name__})") from None
    try:
        return ComponentSpec.read(path)
    except SpecError as exc:
        raise FlywheelError(f"{model_uri}: {exc}") from None


def read_test_set(spec: ComponentSpec, tracking_uri: str | None = None):
    """(images, labels) of the spec's labelled test set, verified against its sha256."""
    import mlflow

    ref = spec.test_set
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=store_uri(ref.uri, tracking_uri),
                                                   tracking_uri=tracking_uri)
        data = Path(path).read_bytes()
    except Exception as exc:  # noqa: BLE001 - any store error: the one message names the URI
        raise FlywheelError(f"test set {ref.uri} of {spec.name} cannot be read: {type(exc).__name__}: {exc}") from None
    try:
        return parse_test_set(data, ref.sha256, where=f"test set {ref.uri}")
    except SpecError as exc:
        raise FlywheelError(str(exc)) from None
