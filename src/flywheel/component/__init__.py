"""The public API a component's `train` entry point uses (docs/components.md).

    import flywheel.component as fc
    splits = fc.make_splits("shapes", images, labels, classes, preprocess=fc.PreprocessSpec(channels=3, ...))
    fc.train(MyNet(len(classes)), splits, fc.FitConfig(epochs=2), embedding="features")

`train` = `fit` + `TrackedRun` + `log_model` + `gate`; each is public for a component with its own
loop. Names resolve lazily, so `import flywheel.component` costs nothing until one is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PreprocessSpec": "flywheel.contracts.preprocessing",
    "ComponentSpec": "flywheel.contracts.component",
    "EmbeddingSpec": "flywheel.contracts.component",
    "GateSpec": "flywheel.contracts.component",
    "TestSetRef": "flywheel.contracts.component",
    "Split": "flywheel.core.data",
    "Splits": "flywheel.core.data",
    "make_splits": "flywheel.core.data",
    "add_labelled": "flywheel.core.data",
    "FitConfig": "flywheel.component.loop",
    "Fitted": "flywheel.component.loop",
    "fit": "flywheel.component.loop",
    "seed_everything": "flywheel.component.loop",
    "TrackedRun": "flywheel.component.run",
    "ContractError": "flywheel.component.log",
    "LoggedModel": "flywheel.component.log",
    "log_model": "flywheel.component.log",
    "TrainResult": "flywheel.component.trainer",
    "TrialHook": "flywheel.component.trial",
    "active_trial": "flywheel.component.trial",
    "trial_scope": "flywheel.component.trial",
    "train": "flywheel.component.trainer",
    "load_model": "flywheel.core.models",
    "load_spec": "flywheel.core.models",
    "read_test_set": "flywheel.core.models",
    "GateDecision": "flywheel.core.registry",
    "add_training_arguments": "flywheel.component.options",
    "fit_config": "flywheel.component.options",
    "extra_data": "flywheel.component.options",
    "mlflow_int": "flywheel.component.options",
    "mlflow_text": "flywheel.component.options",
}

__all__ = sorted([*_EXPORTS, "load_dataset", "gate"])


def load_dataset(name: str, data_dir=None, seed: int = 0, extra_data=()):
    """A built-in dataset (fashion-mnist, digits, imagefolder) as Splits, plus labelled extra folders."""
    from flywheel.core.data import load_splits

    return load_splits(name, data_dir, seed, tuple(extra_data))


def gate(run_id: str, *, model_name: str | None = None, margin: float = 0.0, settings=None):
    """Compare run `run_id`'s logged model with `model_name`'s champion; register it as candidate if better."""
    from dataclasses import replace

    from flywheel.core.config import Settings
    from flywheel.core.registry import Registry

    settings = settings or Settings.from_env()
    if model_name:
        settings = replace(settings, model_name=model_name)
    return Registry(settings).gate(run_id, margin=margin)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flywheel.component' has no attribute {name!r}")
