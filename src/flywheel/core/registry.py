"""The model registry as one object: `Registry(settings)`, holding ONE explicit MLflow client.

Every registry or tracking read outside a training run goes through a `Registry`: its client is
`MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)`, so no
lookup depends on MLflow's process-global URI or on whichever `Settings.apply()` ran last. It holds
what callers used to compute each their own way: a version by number or alias (`version`), aliases
and deployment tags (`set_alias`, `mark_deployed`, `deployments`; the served archive's sha256 and
format as `contracts.manifest.ArchiveStamp` tags), the champion, a version's lineage and the
dataset it was trained on (`lineage`, `dataset_of`), and the champion/challenger gate (`gate`).

The gate: a new run is evaluated on the frozen test split together with the champion (the version
holding `prod`, else the best registered version, both re-evaluated on the same images) and
registered with the `candidate` alias only if it beats the champion by `margin`. A worse model is
never aliased; the comparison is recorded on the run either way. Loading logged models and
`mlflow.register_model` are MLflow's fluent API (process-global URI), so `gate` applies the settings.
`compare` is the gate's comparison alone, registering and recording nothing (`flywheel report` shows
it on a pull request without moving an alias).

Aliases only: registry stages are deprecated. The module-level functions (`get_version`,
`set_alias`, `gate_run`, ...) are one-line conveniences over a Registry for existing callers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from flywheel.contracts.manifest import ArchiveStamp
from flywheel.core.config import ALIASES, Settings
from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.core.evaluate import EvalReport

LINEAGE_TAGS = ("git_commit", "git_dirty", "dataset", "dataset_digest", "flywheel.project", "flywheel.project_dir")


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
    metric: str = "accuracy"  # the component's gate metric; the *_accuracy fields hold its values

    def summary(self) -> str:
        vs = ("no champion yet" if self.champion_version is None
              else f"champion v{self.champion_version} {self.champion_accuracy:.4f}")
        verdict = (f"registered {self.model_name} v{self.registered_version} as 'candidate'" if self.accepted
                   else "not registered (does not beat the champion)")
        return (f"gate ({self.metric}): challenger {self.challenger_accuracy:.4f} vs {vs} (margin {self.margin}): "
                f"{verdict}")


@dataclass(frozen=True)
class Comparison:
    """What the gate compares (`Registry.compare`), before anything is registered."""

    decision: GateDecision  # registered_version None; `accepted`: whether `gate` would register the run
    model_uri: str  # models:/m-… the run logged
    challenger: EvalReport | None  # the run's model on the test set (None: the caller gave its metric)
    champion: EvalReport | None  # the champion on the same images (None: no champion yet)
    champion_run_id: str | None  # the champion version's source run


class Registry:
    """Registry reads and writes for `settings.tracking_uri`, through one explicit MlflowClient."""

    def __init__(self, settings: Settings):
        from mlflow import MlflowClient

        self.settings = settings
        settings.export_credentials()  # MLflow's REST client reads credentials from the environment only
        self.client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)

    # -- versions ----------------------------------------------------------------------------------
    def version(self, version_or_alias: str, name: str | None = None):
        """A ModelVersion of `name` (default: the settings' model) by number ('3') or alias ('prod');
        FlywheelError if there is none. The one place "version number or alias" is resolved."""
        from mlflow.exceptions import MlflowException

        name = name or self.settings.model_name
        try:
            if str(version_or_alias).isdigit():
                return self.client.get_model_version(name, str(version_or_alias))
            return self.client.get_model_version_by_alias(name, str(version_or_alias))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" and "Registered Model" in exc.message:
                raise FlywheelError(f"no version {version_or_alias!r} of registered model {name!r}: no registered "
                                    f"model {name!r} at {self.settings.tracking_uri}: train one first (`flywheel "
                                    "train`), or point MLFLOW_TRACKING_URI / FLYWHEEL_HOME at the store that has "
                                    "it") from None
            raise FlywheelError(f"no version {version_or_alias!r} of registered model {name!r} "
                                f"at {self.settings.tracking_uri}: {exc.message}") from None

    def resolve(self, name: str, version: str | None = None, alias: str | None = None):
        """The ModelVersion named by exactly one of `version` or `alias` (the CLI's --version/--alias)."""
        if (version is None) == (alias is None):
            raise FlywheelError("name exactly one of --version or --alias")
        return self.version(str(version if version is not None else alias), name)

    def champion(self, name: str | None = None):
        """The version holding `prod`, else the registered version with the best recorded test accuracy."""
        from mlflow.exceptions import MlflowException

        name = name or self.settings.model_name
        try:
            return self.client.get_model_version_by_alias(name, "prod")
        except MlflowException:
            pass
        try:
            versions = self.client.search_model_versions(f"name='{name}'")
        except MlflowException:
            return None
        scored = [v for v in versions if "test_accuracy" in v.tags]
        return max(scored, key=lambda v: float(v.tags["test_accuracy"]), default=None)

    # -- aliases -----------------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: str) -> None:
        if alias not in ALIASES:
            raise FlywheelError(f"unknown alias {alias!r}; choose one of: {', '.join(ALIASES)}")
        self.client.set_registered_model_alias(name, alias, str(version))

    def mark_deployed(self, name: str, version: str, env: str, where: str,
                      archive: ArchiveStamp | None = None) -> None:
        """Move alias `env` to version and record when and where it was deployed, and, given `archive`,
        which archive was served (ArchiveStamp tags, for the latest release and for `env`). The archive
        tags go first: an alias never points at a version whose served archive is not recorded."""
        if archive is not None:
            for key, value in {**archive.tags(), **archive.tags(env)}.items():
                self.client.set_model_version_tag(name, str(version), key, value)
        self.set_alias(name, env, version)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.client.set_model_version_tag(name, str(version), f"deployed_{env}_at", f"{stamp} {where}")

    def deployments(self, mv) -> dict[str, tuple[str, str]]:
        """env → (ISO time, where) of every `deployed_<env>_at` tag on a version (`mark_deployed`)."""
        found = {}
        for key, value in (mv.tags or {}).items():
            if key.startswith("deployed_") and key.endswith("_at") and value:
                at, _, where = value.partition(" ")
                found[key[len("deployed_"):-len("_at")]] = (at, where)
        return found

    # -- lineage -----------------------------------------------------------------------------------
    def run(self, run_id: str):
        return self.client.get_run(run_id)

    def existing_run(self, run_id: str):
        """`run` of a run a user named: if it is missing, a one-line FlywheelError naming the store."""
        from mlflow.exceptions import MlflowException

        try:
            return self.run(run_id)
        except MlflowException as exc:
            raise FlywheelError(f"no MLflow run {run_id} at {self.settings.tracking_uri}: {exc.message}") from None

    def lineage(self, mv) -> dict[str, str | None]:
        """LINEAGE_TAGS of a version: its own tags first, then its training run's tags; `dataset`
        falls back to the run's `dataset` param (a version registered by hand)."""
        run = self.run(mv.run_id)
        tags = {**run.data.tags, **(mv.tags or {})}
        found = {k: tags.get(k) for k in LINEAGE_TAGS}
        found["dataset"] = found["dataset"] or run.data.params.get("dataset")
        return found

    def dataset_of(self, mv) -> str | None:
        """The dataset version `mv` was trained on (see `lineage`); None when nothing records it.
        The version's own tag answers without asking for its run."""
        return (mv.tags or {}).get("dataset") or self.lineage(mv)["dataset"]

    def run_model_uri(self, run_id: str) -> str:
        """`models:/<model_id>` of the model a run logged (MLflow 3 stores it outside the run's artifacts)."""
        run = self.run(run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        if not outputs:
            raise FlywheelError(f"run {run_id} logged no model: nothing to register")
        return f"models:/{outputs[-1].model_id}"

    # -- the gate ----------------------------------------------------------------------------------
    def compare(self, run_id: str, dataset: str | None = None, margin: float = 0.0, splits=None,
                challenger_accuracy: float | None = None) -> Comparison:
        """The gate's comparison alone: run `run_id`'s model against the champion on the challenger's
        labelled test set, in the spec's gate metric. Registers, aliases and records nothing (`flywheel
        report` shows it on a pull request); `gate` acts on it. Arguments as for `gate`."""
        from flywheel.core.data import Split
        from flywheel.core.evaluate import check_compatible, cpu_layout, evaluate_model
        from flywheel.core.models import load_model, read_test_set

        settings = self.settings
        settings.apply()  # loading a logged model is MLflow's fluent API: the process-global URI
        run = self.existing_run(run_id)
        model_uri = self.run_model_uri(run_id)
        model, spec = load_model(model_uri, tracking_uri=settings.tracking_uri)
        dataset = dataset or spec.dataset or run.data.params.get("dataset") or spec.test_set.uri
        test = splits.test if splits is not None else Split(*read_test_set(spec, settings.tracking_uri))
        metric = spec.gate.metric
        challenger = None
        if challenger_accuracy is None:
            challenger = evaluate_model(cpu_layout(model), spec, test, model_uri, dataset)
            challenger_accuracy = challenger.metric(metric)

        name = settings.model_name
        champion = self.champion(name)
        champion_report = None
        if champion is not None:
            champ_uri = f"models:/{name}/{champion.version}"
            champ_model, champ_spec = load_model(champ_uri, tracking_uri=settings.tracking_uri)
            check_compatible(champ_spec, spec.class_names, f"{name} v{champion.version}", dataset)
            champion_report = evaluate_model(cpu_layout(champ_model), champ_spec, test, champ_uri, dataset)
        champion_accuracy = None if champion_report is None else champion_report.metric(metric)
        accepted = champion_accuracy is None or spec.gate.better(challenger_accuracy, champion_accuracy, margin)
        decision = GateDecision(run_id, name, challenger_accuracy,
                                None if champion is None else str(champion.version), champion_accuracy, margin,
                                accepted, None, metric)
        return Comparison(decision, model_uri, challenger, champion_report,
                          None if champion is None else champion.run_id)

    def gate(self, run_id: str, dataset: str | None = None, margin: float = 0.0, splits=None,
             challenger_accuracy: float | None = None) -> GateDecision:
        """Compare run `run_id`'s model with the champion on the challenger's labelled test set (its
        component spec names it; `splits` given: its test split, the same images) in the spec's gate
        metric; register it as `candidate` if better by `margin`. `challenger_accuracy`: the
        challenger's metric value when the caller already has it. `dataset` is only a label."""
        import mlflow

        compared = self.compare(run_id, dataset, margin, splits, challenger_accuracy)
        decision = compared.decision
        if decision.accepted:
            run = self.run(run_id)
            tags = {k: run.data.tags[k] for k in LINEAGE_TAGS if k in run.data.tags}
            tags.update(run_id=run_id, test_accuracy=f"{decision.challenger_accuracy:.6f}")
            mv = mlflow.register_model(compared.model_uri, decision.model_name, tags=tags)
            self.set_alias(decision.model_name, "candidate", str(mv.version))
            decision = replace(decision, registered_version=str(mv.version))
        _record(self.client, decision)
        return decision


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


# -- conveniences over a Registry (one client each) ------------------------------------------------
def get_version(settings: Settings, name: str, version_or_alias: str):
    """A ModelVersion by number ('3') or alias ('prod'); FlywheelError if there is none."""
    return Registry(settings).version(version_or_alias, name)


def set_alias(settings: Settings, name: str, alias: str, version: str) -> None:
    Registry(settings).set_alias(name, alias, version)


def mark_deployed(settings: Settings, name: str, version: str, env: str, where: str,
                  archive: ArchiveStamp | None = None) -> None:
    """Move alias `env` to version and record when and where it was deployed (and the archive served)."""
    Registry(settings).mark_deployed(name, version, env, where, archive)


def find_champion(settings: Settings, name: str):
    """The version holding `prod`, else the registered version with the best recorded test accuracy."""
    return Registry(settings).champion(name)


def gate_run(run_id: str, settings: Settings, dataset: str | None = None, margin: float = 0.0,
             splits=None, challenger_accuracy: float | None = None) -> GateDecision:
    """`Registry(settings).gate(...)`: compare a run with the champion; register it if better."""
    return Registry(settings).gate(run_id, dataset, margin, splits, challenger_accuracy)


def _record(client, d: GateDecision) -> None:
    """The comparison goes on the run (always) and on the new version (when registered)."""
    tags = {"gate.decision": "accepted" if d.accepted else "rejected",
            "gate.champion_version": d.champion_version or "none", "gate.margin": str(d.margin),
            "gate.metric": d.metric}
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
