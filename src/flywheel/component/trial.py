"""The trial hook: how a hyperparameter search watches a component's training without the
component's code knowing about it.

`flywheel tune` (flywheel.training.tune) runs a component's ordinary `train` entry point once per
trial, inside `trial_scope(hook)`. While a hook is active, `TrackedRun` (the MLflow run of
`fc.train`, or of a component's own loop that uses it):

* creates a fresh run (never the one `mlflow run` opened for the entry point) with the hook's
  `run_tags()`: `mlflow.parentRunId` (the study's parent run) and the trial's number;
* after logging each epoch's metrics asks `should_stop(epoch, metrics)` (the pruner); on True it
  tags the run with `stopped_tags()`, ends it KILLED and raises `stopped()` (optuna.TrialPruned);
* `fc.train` skips the champion/challenger gate: the study gates its best trial once, at the end.

A context variable rather than a `train(...)` argument, so every existing component (the built-in
trainer, examples/*, a team's own repository) is tunable unchanged. Outside `flywheel tune` no hook
is active and nothing here runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class TrialHook(Protocol):
    """What a search tells the tracked run of one trial, and what it hears back."""

    def run_tags(self) -> dict[str, str]:
        """Tags of the trial's run at its creation (at least `mlflow.parentRunId`)."""
        ...

    def on_run(self, run_id: str, model_name: str) -> None:
        """The trial's MLflow run exists (called once, right after its creation); `model_name` is
        the registered model the component trains for (what the search's gate registers)."""
        ...

    def should_stop(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Epoch `epoch`'s metrics (already logged); True stops the trial now (pruned)."""
        ...

    def stopped_tags(self) -> dict[str, str]:
        """Tags set on a stopped trial's run before it ends KILLED."""
        ...

    def stopped(self) -> BaseException:
        """The exception that ends a stopped trial (the search catches it)."""
        ...


_ACTIVE: ContextVar[TrialHook | None] = ContextVar("flywheel_trial_hook", default=None)


def active_trial() -> TrialHook | None:
    """The hook of the trial being trained in this context, or None (a plain training)."""
    return _ACTIVE.get()


@contextmanager
def trial_scope(hook: TrialHook) -> Iterator[TrialHook]:
    """Make `hook` the active trial for the training run inside the block."""
    token = _ACTIVE.set(hook)
    try:
        yield hook
    finally:
        _ACTIVE.reset(token)
