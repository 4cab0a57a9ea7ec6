"""Champion/challenger gate and the model registry: aliases only (stages are deprecated).

A new run is evaluated on the frozen test split together with the champion (the version holding
`prod`, else the best registered version, both re-evaluated on the same images) and registered
with the `candidate` alias only if it beats the champion by `margin`. A worse model is never
aliased; the comparison is recorded on the run either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from flywheel.core.config import ALIASES, Settings
from flywheel.core.errors import FlywheelError

LINEAGE_TAGS = ("git_commit", "git_dirty", "dataset", "dataset_digest")


@dataclass(frozen=True)
class GateDecision:
    run_id: str
    model_name: str
    challenger_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    margin: float
    accepted: bool
    registered_version: str | None

    def summary(self) -> str:
        vs = ("no champion yet" if self.champion_version is None
              else f"champion v{self.champion_version} {self.champion_accuracy:.4f}")
        verdict = (f"registered {self.model_name} v{self.registered_version} as 'candidate'" if self.accepted
                   else "not registered (does not beat the champion)")
        return f"gate: challenger {self.challenger_accuracy:.4f} vs {vs} (margin {self.margin}): {verdict}"


def _client():
    import mlflow

    return mlflow.MlflowClient()


def get_version(settings: Settings, name: str, version_or_alias: str):
    """A ModelVersion by number ('3') or alias ('prod'); FlywheelError if there is none."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        if str(version_or_alias).isdigit():
            return client.get_model_version(name, str(version_or_alias))
        return client.get_model_version_by_alias(name, version_or_alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" and "Registered Model" in exc.message:
            raise FlywheelError(f"no version {version_or_alias!r} of registered model {name!r}: no registered "
                                f"model {name!r} at {settings.tracking_uri}: train one first (`flywheel train`), or "
                                "point MLFLOW_TRACKING_URI / FLYWHEEL_HOME at the store that has it") from None
        raise FlywheelError(f"no version {version_or_alias!r} of registered model {name!r} "
                            f"at {settings.tracking_uri}: {exc.message}") from None


def registered_in(model_uri: str) -> tuple[str, str] | None:
    """(name, version or alias) of a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI; None otherwise
    (`models:/m-…`, a logged model's id; `runs:/…`; a deprecated stage)."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri[len("models:/"):].strip("/")
    name, found, alias = rest.partition("@")
    if found and name and alias:
        return name, alias
    name, found, version = rest.partition("/")
    return (name, version) if found and name and version.isdigit() else None  # not stages ("/Production")


def set_alias(settings: Settings, name: str, alias: str, version: str) -> None:
    if alias not in ALIASES:
        raise FlywheelError(f"unknown alias {alias!r}; choose one of: {', '.join(ALIASES)}")
    _client().set_registered_model_alias(name, alias, str(version))


def mark_deployed(settings: Settings, name: str, version: str, env: str, where: str) -> None:
    """Move alias `env` to version and record when and where it was deployed."""
    set_alias(settings, name, env, version)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _client().set_model_version_tag(name, str(version), f"deployed_{env}_at", f"{stamp} {where}")


def find_champion(settings: Settings, name: str):
    """The version holding `prod`, else the registered version with the best recorded test accuracy."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        return client.get_model_version_by_alias(name, "prod")
    except MlflowException:
        pass
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    scored = [v for v in versions if "test_accuracy" in v.tags]
    return max(scored, key=lambda v: float(v.tags["test_accuracy"]), default=None)


def run_model_uri(run_id: str) -> str:
    """`models:/<model_id>` of the model a run logged (MLflow 3 stores it outside the run's artifacts)."""
    run = _client().get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        raise FlywheelError(f"run {run_id} logged no model: nothing to register")
    return f"models:/{outputs[-1].model_id}"


def gate_run(run_id: str, settings: Settings, dataset: str | None = None, margin: float = 0.0,
             splits=None, challenger_accuracy: float | None = None) -> GateDecision:
    """Compare run `run_id`'s model with the champion on the frozen test split; register if better."""
    import mlflow

    from flywheel.core.data import load_splits
    from flywheel.core.evaluate import check_compatible, cpu_layout, evaluate_model
    from flywheel.core.models import load_model

    client = _client()
    run = client.get_run(run_id)
    dataset = dataset or run.data.params.get("dataset")
    if not dataset:
        raise FlywheelError(f"run {run_id} has no 'dataset' param: pass --dataset")
    if splits is None:
        seed = int(run.data.params.get("seed", 0))
        splits = load_splits(dataset, settings.data_dir, seed)
    model_uri = run_model_uri(run_id)
    if challenger_accuracy is None:
        model, spec = load_model(model_uri)
        check_compatible(spec, splits.class_names, model_uri, dataset)
        challenger_accuracy = evaluate_model(cpu_layout(model), spec, splits.test).accuracy

    name = settings.model_name
    champion = find_champion(settings, name)
    champion_accuracy = None
    if champion is not None:
        champ_model, champ_spec = load_model(f"models:/{name}/{champion.version}")
        check_compatible(champ_spec, splits.class_names, f"{name} v{champion.version}", dataset)
        champion_accuracy = evaluate_model(cpu_layout(champ_model), champ_spec, splits.test).accuracy
    accepted = champion_accuracy is None or challenger_accuracy > champion_accuracy + margin

    version = None
    if accepted:
        tags = {k: run.data.tags[k] for k in LINEAGE_TAGS if k in run.data.tags}
        tags.update(run_id=run_id, test_accuracy=f"{challenger_accuracy:.6f}")
        mv = mlflow.register_model(model_uri, name, tags=tags)
        version = str(mv.version)
        set_alias(settings, name, "candidate", version)
    decision = GateDecision(run_id, name, challenger_accuracy,
                            None if champion is None else str(champion.version), champion_accuracy, margin,
                            accepted, version)
    _record(client, decision)
    return decision


def _record(client, d: GateDecision) -> None:
    """The comparison goes on the run (always) and on the new version (when registered)."""
    tags = {"gate.decision": "accepted" if d.accepted else "rejected",
            "gate.champion_version": d.champion_version or "none", "gate.margin": str(d.margin)}
    for key, value in tags.items():
        client.set_tag(d.run_id, key, value)
    client.log_metric(d.run_id, "gate_challenger_accuracy", d.challenger_accuracy)
    if d.champion_accuracy is not None:
        client.log_metric(d.run_id, "gate_champion_accuracy", d.champion_accuracy)
    if d.registered_version is not None:
        for key, value in tags.items():
            client.set_model_version_tag(d.model_name, d.registered_version, key, value)
        if d.champion_accuracy is not None:
            client.set_model_version_tag(d.model_name, d.registered_version, "gate.champion_accuracy",
                                         f"{d.champion_accuracy:.6f}")
