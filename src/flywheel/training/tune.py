"""`flywheel tune`: hyperparameter search over any component with Optuna, one MLflow run per trial.

Storage: Optuna's RDB storage. Several training nodes share one study through the tracking node's
Postgres (`--storage postgresql+psycopg2://USER:PW@HOST:PORT/optuna`, or FLYWHEEL_TUNE_STORAGE); the
embedded default is SQLite at $FLYWHEEL_HOME/optuna.db, the same code. Optuna needs a database of
its own: its `alembic_version` table would collide with MLflow's (`flywheel stack` creates `optuna`).

One worker (`run_tune`):
1. Joins the study. `create_study` is atomic in the storage (unique name), so exactly one worker
   creates it; that worker records the search space, metric and direction in the study and creates
   the study's parent MLflow run (tag `flywheel.tune.study`), whose id it stores in the study too.
   The others wait for that id, so all of them nest their trials under one parent; a worker whose
   space or direction differs from the study's is refused.
2. Runs trials until the study holds `n_trials` (all workers together: Optuna's trial numbers come
   from the storage under a row lock, so they never repeat; workers racing for the last slots may
   add one trial each). A trial hands its suggested values to a training target: the built-in
   trainer (TrainConfig fields) or a component directory (its train.py `main(argv)` with `--name
   value` options: the options every component shares, flywheel.component.options), inside
   `trial_scope` (flywheel.component.trial). Its run nests under the parent; each epoch's `metric`
   feeds the pruner; a pruned trial's run ends KILLED with tag flywheel.tune.state=pruned. The
   objective is the metric's last-epoch value: validation data, never the test split, which stays
   the gate's.
3. Finalizes (`finalize_study`; remote-train's workers skip it and the dispatcher does it once):
   waits for running trials, records the best params and value, a parallel-coordinates and a
   parameter-importance plot on the parent run, and sends the best trial's run through the
   champion/challenger gate like any run: registered as `candidate` only if it beats the champion.
   Finalizing again changes nothing that is already decided (a gated run is not gated twice).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flywheel.core.config import Settings, redact_uri
from flywheel.core.errors import FlywheelError
from flywheel.core.files import yaml_problem

if TYPE_CHECKING:
    import optuna

    from flywheel.core.registry import GateDecision
    from flywheel.training.train import TrainConfig

STORAGE_ENV = "FLYWHEEL_TUNE_STORAGE"
STUDY_TAG = "flywheel.tune.study"
TRIAL_TAG = "flywheel.tune.trial"
STATE_TAG = "flywheel.tune.state"  # running | complete | pruned | failed (trials); study | worker (roles)
ROLE_TAG = "flywheel.tune.role"
WORKER_TAG = "flywheel.tune.worker"  # host:pid of the worker that ran the trial
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's parent MLflow run
RUN_ATTR = "mlflow_run_id"  # trial user attribute: the trial's MLflow run
MODEL_ATTR = "model_name"  # trial user attribute: the registered model its component trains
HEARTBEAT_S = 30  # a worker that dies mid-trial has that trial failed after GRACE_S without heartbeats
GRACE_S = 120
JOIN_TIMEOUT_S = 60.0  # how long a joining worker waits for the creator's parent run
KINDS = ("float", "log", "int", "cat")
SAMPLERS = ("tpe", "random", "grid")
DEFAULT_SPACE = ("lr=log:1e-4:1e-2", "weight_decay=log:1e-6:1e-2", "batch_size=cat:32,64,128")


# ------------------------------------------------------------------------------------------ space
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: `name=float:LOW:HIGH` (uniform), `log:LOW:HIGH` (log-uniform),
    `int:LOW:HIGH` (integers, both ends included) or `cat:A,B,C` (one of the values)."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    @classmethod
    def parse(cls, text: str) -> ParamSpec:
        name, sep, spec = text.strip().partition("=")
        kind, _, rest = spec.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or kind not in KINDS:
            raise FlywheelError(f"bad search parameter {text!r}: expected name=float|log|int:LOW:HIGH or "
                                "name=cat:A,B,... (e.g. lr=log:1e-4:1e-2, batch_size=cat:32,64)")
        if kind == "cat":
            choices = tuple(_scalar(v) for v in rest.split(",") if v.strip())
            if not choices:
                raise FlywheelError(f"search parameter {text!r}: cat needs at least one value")
            return cls(name, kind, choices=choices)
        low_text, sep2, high_text = rest.partition(":")
        try:
            cast = int if kind == "int" else float
            low, high = cast(low_text), cast(high_text)
        except ValueError:
            raise FlywheelError(f"search parameter {text!r}: LOW and HIGH must be {kind} numbers") from None
        if not sep2 or not low < high or (kind == "log" and low <= 0):
            raise FlywheelError(f"search parameter {text!r}: need LOW < HIGH" + (" and LOW > 0" if kind == "log" else ""))
        return cls(name, kind, low, high)

    def text(self) -> str:
        """The spec as it was written (canonical form): what the study records."""
        if self.kind == "cat":
            return f"{self.name}=cat:{','.join(map(str, self.choices))}"
        return f"{self.name}={self.kind}:{self.low}:{self.high}"

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "cat":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")


def _scalar(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_space(params: tuple[str, ...] = (), space: str | None = None) -> tuple[ParamSpec, ...]:
    """The search space from `space` (a YAML/JSON file mapping name → spec, or inline text:
    whitespace-separated name=spec) and repeated `--param name=spec` (these win); DEFAULT_SPACE
    when both are empty."""
    specs: dict[str, ParamSpec] = {}
    if space and space.strip():
        path = Path(space).expanduser()
        if path.is_file():
            import yaml

            try:
                doc = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise FlywheelError(f"search space {path} is not valid YAML/JSON: {yaml_problem(exc)}") from None
            if not isinstance(doc, dict) or not doc:
                raise FlywheelError(f"search space {path}: expected a mapping name: spec, e.g. `lr: log:1e-4:1e-2`")
            texts = [f"{k}={v}" for k, v in doc.items()]
        elif "=" in space:
            texts = space.split()
        else:
            raise FlywheelError(f"--space {space!r} is neither a file nor name=spec pairs")
        specs.update((s.name, s) for s in map(ParamSpec.parse, texts))
    specs.update((s.name, s) for s in map(ParamSpec.parse, params))
    return tuple(specs.values()) or tuple(ParamSpec.parse(t) for t in DEFAULT_SPACE)


def space_text(space: tuple[ParamSpec, ...]) -> str:
    return " ".join(sorted(p.text() for p in space))


# ----------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TuneConfig:
    """One worker's search: which study, where it lives, how trials are drawn and judged."""

    study: str
    storage: str | None = None  # None: FLYWHEEL_TUNE_STORAGE, else SQLite in $FLYWHEEL_HOME
    n_trials: int = 10  # trials of the whole study (all workers together)
    space: tuple[ParamSpec, ...] = ()
    metric: str = "val_accuracy"  # an epoch metric of the training loop (fit's history rows)
    direction: str = "maximize"
    sampler: str = "tpe"  # tpe | random | grid (grid: every parameter a `cat`)
    pruner: str = "median"  # median[:STARTUP[:WARMUP]] | percentile:P[:STARTUP[:WARMUP]] | threshold:V | none
    sampler_seed: int | None = None
    finalize: bool = True  # False: only run trials (remote-train's workers; the dispatcher finalizes)
    register: bool = True  # gate the best trial against the champion
    margin: float = 0.0
    wait_s: float = 3600.0  # finalize waits this long for other workers' running trials

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", self.study):
            raise FlywheelError(f"bad study name {self.study!r}: letters, digits and _ . : - (at most 128)")
        if self.direction not in ("maximize", "minimize"):
            raise FlywheelError("--direction must be maximize or minimize")
        if self.sampler not in SAMPLERS:
            raise FlywheelError(f"--sampler must be one of {', '.join(SAMPLERS)}")
        if self.n_trials < 0:
            raise FlywheelError("--n-trials must be >= 0")
        if not self.space:
            object.__setattr__(self, "space", parse_space())
        if self.sampler == "grid" and any(p.kind != "cat" for p in self.space):
            raise FlywheelError("--sampler grid needs every parameter as name=cat:A,B,...")
        make_pruner(self.pruner, self.direction)  # fail on a bad spec before anything starts


def storage_url(given: str | None, settings: Settings) -> str:
    """The study's storage: `given`, else FLYWHEEL_TUNE_STORAGE, else $FLYWHEEL_HOME/optuna.db.
    `postgresql://` gets the psycopg2 driver (SQLAlchemy 2.1 would pick psycopg 3, not installed)."""
    url = given or os.environ.get(STORAGE_ENV) or f"sqlite:///{(settings.work_dir / 'optuna.db').resolve()}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+psycopg2://" + url[len(plain):]
    return url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url` (tables created on first use), with heartbeats so a dead
    worker's trial is failed rather than counted as running forever."""
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except sqlalchemy.exc.OperationalError as exc:
            raise FlywheelError(f"cannot reach the study storage {redact_uri(url)}: {exc.orig}") from None
        except sqlalchemy.exc.ArgumentError as exc:  # an unparsable URL or an unknown dialect: no retry helps
            raise FlywheelError(f"study storage {redact_uri(url)} is not a database URL SQLAlchemy can open ({exc}): "
                                "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB") from None
        except sqlalchemy.exc.SQLAlchemyError:
            # Workers starting together on an empty database race to CREATE its tables; the loser's
            # duplicate-object error goes away once the winner has committed.
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def make_sampler(cfg: TuneConfig) -> optuna.samplers.BaseSampler:
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler({p.name: list(p.choices) for p in cfg.space}, seed=cfg.sampler_seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.sampler_seed)
    return optuna.samplers.TPESampler(seed=cfg.sampler_seed)


def make_pruner(spec: str, direction: str = "maximize") -> optuna.pruners.BasePruner:
    """`median[:STARTUP[:WARMUP]]`, `percentile:P[:STARTUP[:WARMUP]]`, `threshold:V` (prune a trial
    whose metric is worse than V: below it when maximizing) or `none`."""
    import optuna

    kind, _, rest = spec.partition(":")
    args = [a for a in rest.split(":") if a] if rest else []
    try:
        if kind == "none" and not args:
            return optuna.pruners.NopPruner()
        if kind == "median" and len(args) <= 2:
            return optuna.pruners.MedianPruner(*map(int, args))
        if kind == "percentile" and 1 <= len(args) <= 3:
            return optuna.pruners.PercentilePruner(float(args[0]), *map(int, args[1:]))
        if kind == "threshold" and len(args) == 1:
            value = float(args[0])
            return optuna.pruners.ThresholdPruner(**({"lower": value} if direction == "maximize" else {"upper": value}))
    except ValueError:
        pass
    raise FlywheelError(f"bad --pruner {spec!r}: median[:STARTUP[:WARMUP]], percentile:P[:STARTUP[:WARMUP]], "
                        "threshold:VALUE or none")


# --------------------------------------------------------------------------------------- targets
class TrainTarget(Protocol):
    """What a trial trains: `train(values, settings)` runs one ordinary training with `values`
    (the trial's suggested parameters) in place of the defaults."""

    def check(self, space: tuple[ParamSpec, ...]) -> None: ...

    def train(self, values: dict[str, Any], settings: Settings) -> None: ...

    def label(self) -> str: ...


class BuiltinTarget:
    """The built-in trainer (flywheel.training.train): parameters are TrainConfig fields. The data
    is loaded once per seed and shared by the trials."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._splits: dict[tuple, Any] = {}

    def label(self) -> str:
        return f"built-in {self.cfg.model} on {self.cfg.dataset}"

    def check(self, space: tuple[ParamSpec, ...]) -> None:
        known = {f.name for f in fields(self.cfg)} - {"dataset", "model", "register", "margin", "extra_data", "device"}
        unknown = [p.name for p in space if p.name not in known]
        if unknown:
            raise FlywheelError(f"the built-in trainer has no parameter {', '.join(unknown)}; searchable: "
                                f"{', '.join(sorted(known))}")

    def train(self, values: dict[str, Any], settings: Settings) -> None:
        from flywheel.core.data import load_splits
        from flywheel.training.train import run_training

        typed = {k: type(getattr(self.cfg, k))(v) if getattr(self.cfg, k) is not None else v for k, v in values.items()}
        cfg = replace(self.cfg, register=False, **typed)
        key = (cfg.dataset, cfg.seed, cfg.extra_data)
        if key not in self._splits:
            self._splits[key] = load_splits(cfg.dataset, settings.data_dir, cfg.seed, cfg.extra_data)
        run_training(cfg, settings, splits=self._splits[key])


class ComponentTarget:
    """A component directory: its train.py's `main(argv)` (every Flywheel component's entry point has
    one, see docs/components.md) called in this process with `args` (the fixed options), then
    `--register false`, then `--name value` for each suggested parameter (later options win)."""

    def __init__(self, directory: Path, args: tuple[str, ...] = ()):
        self.directory = directory.resolve()
        self.args = args
        self._main = None

    def label(self) -> str:
        return f"component {self.directory}"

    def check(self, space: tuple[ParamSpec, ...]) -> None:
        self._load()

    def _load(self):
        if self._main is not None:
            return self._main
        path = self.directory / "train.py"
        if not path.is_file():
            raise FlywheelError(f"{self.directory} has no train.py: --component names a component's directory "
                                "(its MLproject's train.py with a main(argv) function)")
        # Its own modules (model.py, data.py) import as top-level names, as under `mlflow run`.
        sys.path.insert(0, str(self.directory))
        name = "flywheel_tuned_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        main = getattr(module, "main", None)
        if not callable(main):
            raise FlywheelError(f"{path} has no main(argv) function to call per trial")
        self._main = main
        return main

    def argv(self, values: dict[str, Any]) -> list[str]:
        return [*self.args, "--register", "false",
                *[a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]]

    def train(self, values: dict[str, Any], settings: Settings) -> None:
        main, argv = self._load(), self.argv(values)
        with contextlib.chdir(self.directory):  # as under `mlflow run`: relative paths are the component's
            try:
                main(argv)
            except SystemExit as exc:  # argparse's way of refusing options
                if exc.code not in (0, None):
                    raise FlywheelError(f"{self.directory / 'train.py'} refused `{' '.join(argv)}` (exit {exc.code}): "
                                        "every searched parameter must be one of its options") from None


SHARED_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "seed", "max_train_samples")  # add_training_arguments


def make_target(component: Path | None, builtin: TrainConfig, fixed: dict[str, Any],
                component_args: tuple[str, ...] = ()) -> TrainTarget:
    """The trials' target: a component directory, else the built-in trainer. `fixed`: the shared
    training options the user set (SHARED_OPTIONS): TrainConfig fields for the built-in trainer,
    `--name value` before `component_args` for a component."""
    given = {k: v for k, v in fixed.items() if v is not None}
    if component is None and component_args:
        raise FlywheelError(f"arguments {' '.join(component_args)!r} after -- are for a --component; the built-in "
                            "trainer takes only its own options")
    if component is None:
        return BuiltinTarget(replace(builtin, **given))
    options = tuple(a for k, v in given.items() for a in (f"--{k.replace('_', '-')}", str(v)))
    return ComponentTarget(component, options + tuple(component_args))


# ----------------------------------------------------------------------------------------- trials
def worker_id() -> str:
    """This worker as host:pid (which node, which process ran a trial)."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


class _OptunaTrialHook:
    """flywheel.component.trial.TrialHook for one Optuna trial."""

    def __init__(self, trial: optuna.Trial, study: str, parent_run_id: str, metric: str):
        self.trial, self.study, self.parent, self.metric = trial, study, parent_run_id, metric
        self.run_id: str | None = None
        self.value: float | None = None
        self.seen: set[str] = set()

    def run_tags(self) -> dict[str, str]:
        n = self.trial.number
        return {"mlflow.parentRunId": self.parent, STUDY_TAG: self.study, TRIAL_TAG: str(n),
                STATE_TAG: "running", WORKER_TAG: worker_id(), "mlflow.runName": f"{self.study}-trial-{n}"}

    def on_run(self, run_id: str, model_name: str) -> None:
        self.run_id = run_id
        self.trial.set_user_attr(RUN_ATTR, run_id)
        self.trial.set_user_attr(MODEL_ATTR, model_name)
        self.trial.set_user_attr("worker", worker_id())

    def should_stop(self, epoch: int, metrics: dict[str, float]) -> bool:
        self.seen.update(metrics)
        if self.metric not in metrics:
            return False
        self.value = float(metrics[self.metric])
        self.trial.report(self.value, epoch)
        return self.trial.should_prune()

    def stopped_tags(self) -> dict[str, str]:
        return {STATE_TAG: "pruned"}

    def stopped(self) -> BaseException:
        import optuna

        return optuna.TrialPruned(f"trial {self.trial.number} pruned: {self.metric} {self.value}")


def _objective(target: TrainTarget, cfg: TuneConfig, settings: Settings, parent_run_id: str):
    import mlflow

    from flywheel.component.trial import trial_scope
    from flywheel.core.registry import Registry

    client = Registry(settings).client

    def objective(trial: optuna.Trial) -> float:
        values = {p.name: p.suggest(trial) for p in cfg.space}
        hook = _OptunaTrialHook(trial, cfg.study, parent_run_id, cfg.metric)
        print(f"flywheel: study {cfg.study} trial {trial.number}: {values}", file=sys.stderr, flush=True)
        with trial_scope(hook):
            try:
                target.train(values, settings)
            finally:
                if mlflow.active_run() is not None:  # the training raised mid-run: the run ends FAILED
                    mlflow.set_tag(STATE_TAG, "failed")
                    mlflow.end_run("FAILED")
        if hook.run_id is None:
            raise FlywheelError(f"trial {trial.number}: {target.label()} started no MLflow run: it must train with "
                                "flywheel.component (fc.train, or fit with a TrackedRun)")
        if hook.value is None:
            raise FlywheelError(f"trial {trial.number}: the training reported no per-epoch {cfg.metric!r}; "
                                f"it reported {', '.join(sorted(hook.seen)) or 'nothing'}: pass one as --metric")
        client.set_tag(hook.run_id, STATE_TAG, "complete")
        return hook.value

    return objective


# ------------------------------------------------------------------------------------------ study
def join_study(cfg: TuneConfig, settings: Settings, url: str) -> tuple[optuna.Study, str]:
    """(the study, its parent MLflow run id), creating both if this worker is first (see the module
    docstring); FlywheelError if the study exists with another space, metric or direction."""
    import optuna

    storage = open_storage(url)
    sampler, pruner = make_sampler(cfg), make_pruner(cfg.pruner, cfg.direction)
    try:
        study = optuna.create_study(storage=storage, study_name=cfg.study, sampler=sampler, pruner=pruner,
                                    direction=cfg.direction)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner)
        created = False
    if created:
        study.set_user_attr("space", space_text(cfg.space))
        study.set_user_attr("metric", cfg.metric)
        parent = _create_parent_run(cfg, settings, url)
        study.set_user_attr(PARENT_ATTR, parent)
        return study, parent
    parent = _wait_for_parent(study, cfg, settings, url)
    attrs = study.user_attrs
    theirs = {"space": attrs.get("space"), "metric": attrs.get("metric"), "direction": study.direction.name.lower()}
    ours = {"space": space_text(cfg.space), "metric": cfg.metric, "direction": cfg.direction}
    for key in ours:
        if theirs[key] is not None and theirs[key] != ours[key]:
            raise FlywheelError(f"study {cfg.study!r} was created with {key} {theirs[key]!r}, not {ours[key]!r}: "
                                "join it with the same settings, or start a new one with --study NAME")
    return study, parent


def _create_parent_run(cfg: TuneConfig, settings: Settings, url: str) -> str:
    from mlflow.entities import Param

    from flywheel.component.run import git_info, project_tags
    from flywheel.core.registry import Registry
    from flywheel.core.runlog import ensure_experiment

    client = Registry(settings).client
    experiment_id = ensure_experiment(settings, client)
    tags = {STUDY_TAG: cfg.study, ROLE_TAG: "study", "flywheel.tune.storage": redact_uri(url),
            **git_info(Path.cwd()), **project_tags(Path.cwd())}
    run = client.create_run(experiment_id, tags=tags, run_name=cfg.study)
    params = {"metric": cfg.metric, "direction": cfg.direction, "n_trials": cfg.n_trials, "sampler": cfg.sampler,
              "pruner": cfg.pruner, **{f"space.{p.name}": p.text().partition("=")[2] for p in cfg.space}}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def _wait_for_parent(study: optuna.Study, cfg: TuneConfig, settings: Settings, url: str) -> str:
    """The parent run id the study's creator stores; if it never appears (the creator died in
    between), the run tagged with the study in MLflow, else a new one."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if parent := study.user_attrs.get(PARENT_ATTR):
            return parent
        time.sleep(0.5)
    parent = find_parent_run(settings, cfg.study) or _create_parent_run(cfg, settings, url)
    study.set_user_attr(PARENT_ATTR, parent)
    return parent


def find_parent_run(settings: Settings, study: str) -> str | None:
    """The oldest MLflow run tagged as study `study`'s parent in the settings' experiment."""
    from flywheel.core.registry import Registry

    client = Registry(settings).client
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`{STUDY_TAG}` = '{study}' AND tags.`{ROLE_TAG}` = 'study'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


# ------------------------------------------------------------------------------------------ worker
@dataclass(frozen=True)
class TuneSummary:
    """What a search ended with (`flywheel tune` prints it; --json gives it)."""

    study: str
    storage: str  # redacted
    parent_run_id: str
    trials: dict[str, int]  # state name → count
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] | None = None
    best_run_id: str | None = None
    decision: GateDecision | None = None
    finalized: bool = False

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = {k: v for k, v in asdict(self).items() if k != "decision"}
        out["gate"] = asdict(self.decision) if self.decision else None
        return out

    def text(self) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.trials.items())) or "no trials"
        lines = [f"study {self.study} ({self.storage}): {counts}; parent run {self.parent_run_id}"]
        if self.best_trial is not None:
            lines.append(f"best trial {self.best_trial}: value {self.best_value:.4f}, params {self.best_params}, "
                         f"run {self.best_run_id}")
        elif self.finalized:
            lines.append("no trial completed: nothing to gate")
        if self.decision is not None:
            lines.append(self.decision.summary())
        return "\n".join(lines)


def run_tune(cfg: TuneConfig, target: TrainTarget, settings: Settings) -> TuneSummary:
    """One worker: join the study, run trials until it holds `cfg.n_trials`, finalize if asked."""
    import optuna

    from flywheel.component.run import refuse_mlflow_default_store
    from flywheel.core.runlog import preflight

    refuse_mlflow_default_store(settings)
    preflight(settings)
    target.check(cfg.space)
    # Under `mlflow run -e tune` the entry point's run is this worker's own: tag it and keep the
    # trials out of it (mlflow.start_run would adopt MLFLOW_RUN_ID for the first trial otherwise).
    worker_run = os.environ.pop("MLFLOW_RUN_ID", None)
    url = storage_url(cfg.storage, settings)
    settings.apply()
    study, parent = join_study(cfg, settings, url)
    if worker_run:
        from flywheel.core.registry import Registry

        client = Registry(settings).client
        for key, value in {"mlflow.parentRunId": parent, STUDY_TAG: cfg.study, ROLE_TAG: "worker"}.items():
            client.set_tag(worker_run, key, value)
    have = len(study.get_trials(deepcopy=False))
    if have < cfg.n_trials:
        print(f"flywheel: study {cfg.study}: {have}/{cfg.n_trials} trials so far; {target.label()}; parent run "
              f"{parent}", file=sys.stderr, flush=True)
        with warnings.catch_warnings():  # the heartbeat's stale-trial check is "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(_objective(target, cfg, settings, parent), n_trials=cfg.n_trials - have,
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=None)], gc_after_trial=True)
    else:
        print(f"flywheel: study {cfg.study} already holds {have} trials (--n-trials {cfg.n_trials}): none to run",
              file=sys.stderr, flush=True)
    if cfg.finalize:
        return finalize_study(study, settings, parent, url, register=cfg.register, margin=cfg.margin,
                              wait_s=cfg.wait_s)
    return _summary(study, url, parent)


def load_study(url: str, name: str) -> tuple[optuna.Study, str]:
    """An existing study and its parent run id (the dispatcher's side of remote-train --tune)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise FlywheelError(f"no study {name!r} in {redact_uri(url)}") from None
    parent = study.user_attrs.get(PARENT_ATTR)
    if not parent:
        raise FlywheelError(f"study {name!r} has no parent MLflow run yet: no worker has joined it")
    return study, parent


def _summary(study: optuna.Study, url: str, parent: str, decision=None, finalized: bool = False) -> TuneSummary:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    best = None
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
    return TuneSummary(study.study_name, redact_uri(url), parent, counts,
                       best.number if best else None, best.value if best else None,
                       dict(best.params) if best else None, best.user_attrs.get(RUN_ATTR) if best else None,
                       decision, finalized)


# ---------------------------------------------------------------------------------------- finalize
def finalize_study(study: optuna.Study, settings: Settings, parent: str, url: str, *, register: bool = True,
                   margin: float = 0.0, wait_s: float = 3600.0) -> TuneSummary:
    """Record the search's outcome on the parent run and gate its best trial (module docstring, 3)."""
    import optuna
    from optuna.trial import TrialState

    from flywheel.core.registry import Registry

    deadline = time.monotonic() + wait_s
    while True:
        with warnings.catch_warnings():  # "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial stops counting as running
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            break
        if time.monotonic() > deadline:
            raise FlywheelError(f"study {study.study_name}: trials {[t.number for t in running]} still running after "
                                f"{wait_s:.0f} s; run `flywheel tune --study {study.study_name}` again when the "
                                "workers are done")
        time.sleep(2.0)

    registry = Registry(settings)
    client = registry.client
    summary = _summary(study, url, parent)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    client.log_batch(parent, metrics=_count_metrics(summary.trials))
    decision = None
    if complete:
        best = study.best_trial
        run_id = best.user_attrs[RUN_ATTR]
        client.log_metric(parent, "best_value", float(best.value), step=len(complete))
        tags = {"flywheel.tune.best_trial": str(best.number), "flywheel.tune.best_run_id": run_id,
                **{f"flywheel.tune.best.{k}": str(v) for k, v in best.params.items()}}
        for key, value in tags.items():
            client.set_tag(parent, key, value)
        client.set_tag(run_id, "flywheel.tune.best", "true")
        _log_study_artifacts(client, parent, study, complete)
        if register:
            decision = _gate_once(registry, settings, run_id, best.user_attrs.get(MODEL_ATTR), margin)
            client.set_tag(parent, "gate.decision", "accepted" if decision.accepted else "rejected")
            if decision.registered_version:
                client.set_tag(parent, "flywheel.tune.registered_version", decision.registered_version)
    else:
        client.set_tag(parent, "flywheel.tune.best_trial", "none")
    client.set_terminated(parent, "FINISHED")
    return replace(summary, decision=decision, finalized=True)


def _count_metrics(counts: dict[str, int]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(f"trials_{state.lower()}", float(counts.get(state, 0)), now, 0)
            for state in ("COMPLETE", "PRUNED", "FAIL")]


def _gate_once(registry, settings: Settings, run_id: str, model_name: str | None, margin: float) -> GateDecision:
    """The gate's decision on `run_id`: the recorded one if the run was gated already (a second
    finalize), else a fresh gate under the model name the trial's component trained for."""
    from flywheel.core.registry import GateDecision, Registry

    if model_name and model_name != settings.model_name:
        settings = replace(settings, model_name=model_name)
        registry = Registry(settings)
    run = registry.run(run_id)
    tags = run.data.tags
    if "gate.decision" in tags:
        metrics = run.data.metrics
        accepted = tags["gate.decision"] == "accepted"
        version = None
        if accepted:
            found = registry.client.search_model_versions(f"name='{settings.model_name}' AND run_id='{run_id}'")
            version = str(found[0].version) if found else None
        champion = tags.get("gate.champion_version", "none")
        return GateDecision(run_id, settings.model_name, metrics.get("gate_challenger_accuracy", float("nan")),
                            None if champion == "none" else champion, metrics.get("gate_champion_accuracy"),
                            float(tags.get("gate.margin", margin)), accepted, version,
                            tags.get("gate.metric", "accuracy"))
    return registry.gate(run_id, margin=margin)


def _log_study_artifacts(client, parent: str, study: optuna.Study, complete: list) -> None:
    """best_params.json, trials.json and the two plots under the parent run's `tune/`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        best = study.best_trial
        (out / "best_params.json").write_text(json.dumps(
            {"trial": best.number, "value": best.value, "params": best.params,
             "run_id": best.user_attrs.get(RUN_ATTR)}, indent=2))
        (out / "trials.json").write_text(json.dumps(
            [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
              "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
              "run_id": t.user_attrs.get(RUN_ATTR)} for t in study.get_trials(deepcopy=False)], indent=2))
        parallel_coordinates_png(study, complete, out / "parallel_coordinates.png")
        importances = param_importances(study, complete)
        if importances:
            importance_png(importances, out / "param_importances.png")
        client.log_artifacts(parent, str(out), "tune")


def param_importances(study: optuna.Study, complete: list) -> dict[str, float]:
    """Optuna's fANOVA importances of the searched parameters; {} when they can't be estimated
    (fewer than two completed trials, or no parameter varied)."""
    import optuna

    varied = [name for name in (complete[0].params if complete else {})
              if len({repr(t.params.get(name)) for t in complete}) > 1]
    if len(complete) < 2 or not varied:
        return {}
    return optuna.importance.get_param_importances(study, params=varied)


def _axis_position(values: list[Any], log: bool) -> list[float]:
    """Values on a 0..1 axis: numbers by their range (log range for log-uniform ones), others by rank."""
    import math

    if all(isinstance(v, (int, float)) for v in values):
        xs = [math.log10(v) if log and v > 0 else float(v) for v in values]
        lo, hi = min(xs), max(xs)
        return [0.5 if hi == lo else (x - lo) / (hi - lo) for x in xs]
    order = sorted({str(v) for v in values})
    return [0.5 if len(order) == 1 else order.index(str(v)) / (len(order) - 1) for v in values]


def parallel_coordinates_png(study: optuna.Study, complete: list, path: Path) -> Path:
    """One polyline per completed trial across the parameters' axes and the objective, coloured by
    the objective; the best trial drawn thick."""
    from matplotlib import colormaps

    from flywheel.core.plots import figure

    names = sorted({k for t in complete for k in t.params})
    dists = {k: t.distributions[k] for t in complete for k in t.params}
    columns = [[t.params.get(k) for t in complete] for k in names] + [[t.value for t in complete]]
    logs = [bool(getattr(dists[k], "log", False)) for k in names] + [False]
    positions = [_axis_position(col, log) for col, log in zip(columns, logs, strict=True)]
    values = [t.value for t in complete]
    lo, hi = min(values), max(values)
    cmap = colormaps["viridis"]
    best = study.best_trial.number
    fig = figure((max(6.0, 1.8 * len(columns)), 4.5))
    ax = fig.subplots()
    xs = list(range(len(columns)))
    for i, trial in enumerate(complete):
        shade = 0.5 if hi == lo else (trial.value - lo) / (hi - lo)
        if study.direction.name == "MINIMIZE":
            shade = 1.0 - shade
        ax.plot(xs, [pos[i] for pos in positions], color=cmap(shade), lw=3.0 if trial.number == best else 1.2,
                alpha=1.0 if trial.number == best else 0.7)
    for x, col in zip(xs, columns, strict=True):
        ax.axvline(x, color="0.6", lw=0.8)
        numeric = all(isinstance(v, (int, float)) for v in col)
        lo_text, hi_text = (f"{min(col):.3g}", f"{max(col):.3g}") if numeric else (min(map(str, col)), max(map(str, col)))
        ax.annotate(lo_text, (x, 0), xytext=(3, -12), textcoords="offset points", fontsize=7)
        ax.annotate(hi_text, (x, 1), xytext=(3, 4), textcoords="offset points", fontsize=7)
    ax.set_xticks(xs, [*names, study.user_attrs.get("metric", "objective")])
    ax.set_yticks([])
    ax.set_ylim(-0.1, 1.1)
    ax.set_title(f"{study.study_name}: {len(complete)} completed trials, colour = objective, thick = best "
                 f"(trial {best})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def importance_png(importances: dict[str, float], path: Path) -> Path:
    from flywheel.core.plots import figure

    names = list(importances)[::-1]
    fig = figure((6, 0.5 * len(names) + 1.5))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (fANOVA, normalised)", title="Hyperparameter importance")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
