"""One typed place for configuration: environment variables first, CLI flags override.

Nothing here touches the filesystem or MLflow at import time; `Settings.from_env()` only reads
`os.environ`. Registry and tracking reads use an explicit client built from these settings
(`flywheel.core.registry.Registry`); `Settings.apply()`, which points MLflow's process-global URI
here, is called only where MLflow's fluent API is used (see its docstring).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit

DEFAULT_MODEL_NAME = "fashion-classifier"
DEFAULT_EXPERIMENT = "flywheel"
ALIASES = ("candidate", "dev", "prod")


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """Where Flywheel tracks, stores and names things. Build with `Settings.from_env()`."""

    tracking_uri: str
    work_dir: Path  # local state: embedded store, caches, stack state (FLYWHEEL_HOME)
    experiment: str = DEFAULT_EXPERIMENT
    model_name: str = DEFAULT_MODEL_NAME
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    data_dir: Path | None = None  # FLYWHEEL_DATA_DIR: where dataset files are looked up first

    @property
    def embedded(self) -> bool:
        """True when tracking runs in-process on SQLite rather than against a server."""
        return self.tracking_uri.startswith("sqlite:")

    @property
    def capture_uri(self) -> str:
        """The capture store every command shares: FLYWHEEL_CAPTURE_URI, else $FLYWHEEL_HOME/captures."""
        return _env("FLYWHEEL_CAPTURE_URI") or str((self.work_dir / "captures").resolve())

    @property
    def artifact_root(self) -> str | None:
        """Local artifact directory used for new experiments of the embedded store."""
        return (self.work_dir / "mlartifacts").resolve().as_uri() if self.embedded else None

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from env vars; keyword overrides (CLI flags) win when not None."""
        work_dir = Path(_env("FLYWHEEL_HOME", str(Path.cwd() / ".flywheel")))
        data_dir = _env("FLYWHEEL_DATA_DIR")
        settings = cls(
            tracking_uri=_env("MLFLOW_TRACKING_URI") or f"sqlite:///{(work_dir / 'mlflow.db').resolve()}",
            work_dir=work_dir,
            experiment=_env("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT),
            model_name=_env("FLYWHEEL_MODEL_NAME", DEFAULT_MODEL_NAME),
            username=_env("MLFLOW_TRACKING_USERNAME"),
            password=_env("MLFLOW_TRACKING_PASSWORD"),
            data_dir=Path(data_dir) if data_dir else None,
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        for key in ("work_dir", "data_dir"):  # accept str paths from callers
            if key in given:
                given[key] = Path(str(given[key]))
        if "work_dir" in given and "MLFLOW_TRACKING_URI" not in os.environ and "tracking_uri" not in given:
            given["tracking_uri"] = f"sqlite:///{(given['work_dir'] / 'mlflow.db').resolve()}"
        return replace(settings, **given) if given else settings

    def export_credentials(self) -> Settings:
        """Put the credentials where MLflow's REST client reads them (the environment only; it has no
        other way in) and create the embedded store's directory. No tracking URI is set."""
        if self.embedded:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.username is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"] = self.username
        if self.password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = self.password
        return self

    def apply(self) -> Settings:
        """Point MLflow's process-global tracking (and registry) URI at this store.

        Only for MLflow's fluent API, which has no client argument: the training run
        (`mlflow.start_run`, `log_model`), loading a logged or registered model
        (`mlflow.pytorch.load_model` in core.models: package, evaluate, predict, the gate) and
        `mlflow.register_model` (the gate). Everything else uses `Registry(settings)`."""
        import mlflow

        self.export_credentials()
        mlflow.set_tracking_uri(self.tracking_uri)  # the registry follows it unless MLFLOW_REGISTRY_URI says otherwise
        return self

    def shell_exports(self) -> str:
        """`export` lines that point a shell's plain `mlflow` commands (`mlflow run`, `mlflow ui`) at
        this store, as `flywheel env` prints them. Credentials are never printed (they stay in the
        environment they came from); paths are absolute so the lines hold in any directory."""
        env = {k: v for k, v in self.child_env().items()
               if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        env["FLYWHEEL_HOME"] = str(self.work_dir.resolve())
        return export_lines(env)

    def child_env(self) -> dict[str, str]:
        """Environment for a subprocess (mlflow run, torchrun) that must log to the same place."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri, "FLYWHEEL_HOME": str(self.work_dir),
               "MLFLOW_EXPERIMENT_NAME": self.experiment, "FLYWHEEL_MODEL_NAME": self.model_name}
        if self.username is not None:
            env["MLFLOW_TRACKING_USERNAME"] = self.username
        if self.password is not None:
            env["MLFLOW_TRACKING_PASSWORD"] = self.password
        if self.data_dir is not None:
            env["FLYWHEEL_DATA_DIR"] = str(self.data_dir)
        return env


def local_store_path(uri: str) -> Path | None:
    """The file or directory of a local tracking store URI (sqlite:///…, file:…, a plain path); None
    for servers and other databases."""
    if uri.startswith("sqlite:///"):
        return Path(unquote(uri[len("sqlite:///"):]))
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def export_lines(env: dict[str, str]) -> str:
    """`export K=V` lines a POSIX shell can `eval` or `source`, values quoted."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def redact_uri(uri: str) -> str:
    """`uri` with its password, if any, replaced by *** (database and tracking URIs in messages)."""
    parts = urlsplit(uri)
    if parts.password:
        return uri.replace(f":{parts.password}@", ":***@")
    return uri
