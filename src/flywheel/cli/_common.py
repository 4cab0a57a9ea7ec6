"""What every CLI sub-app shares: the options that mean one thing everywhere, settings, JSON output.

One vocabulary: `--model` is the registered model name in every command (env FLYWHEEL_MODEL_NAME;
the older spelling `--model-name` stays as a hidden alias where it existed), `--tracking-uri` the
MLflow store, `--data-dir` where datasets are looked up, `--identity`/`--known-hosts` the SSH key and
pinned host keys, `--json` one JSON document on stdout. Importing this module does no work beyond
typer: commands import their node's modules inside the function, so `flywheel --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI; default: embedded SQLite store in $FLYWHEEL_HOME (./.flywheel).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", envvar="FLYWHEEL_MODEL_NAME", help="Registered model name (default fashion-classifier).")]
# The spelling some commands had before `--model` meant the registered model everywhere.
ModelNameAlias = Annotated[Optional[str], typer.Option("--model-name", hidden=True)]
DataDirOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="FLYWHEEL_DATA_DIR", help="Where dataset files are looked up first.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]
CaptureUriOpt = Annotated[Optional[str], typer.Option(
    "--capture-uri", envvar="FLYWHEEL_CAPTURE_URI",
    help="Capture store: a directory or gs://bucket/prefix (default $FLYWHEEL_HOME/captures, where `serve` writes).")]


def model_of(model: str | None, model_name: str | None) -> str | None:
    """The registered model asked for: the hidden `--model-name` alias when given (the env var only
    ever fills `--model`, so an explicit alias must win over it), else `--model`."""
    return model_name or model


def settings_for(tracking_uri: str | None = None, model_name: str | None = None, data_dir: Path | None = None):
    """Settings from env + flags, applied (MLflow's process-global URI) for the command's run."""
    from flywheel.core.config import Settings

    return Settings.from_env(tracking_uri=tracking_uri, model_name=model_name, data_dir=data_dir).apply()


def stop_on_sigterm() -> None:
    """SIGTERM takes the Ctrl-C path, so a command's `finally` stops the servers it started."""
    from flywheel.core.procs import sigterm_raises_keyboard_interrupt

    sigterm_raises_keyboard_interrupt()


def fail(message: str) -> None:
    """Refuse with a message the user can act on: main()'s handler prints it as one red line, exit 2."""
    from flywheel.core.errors import FlywheelError

    raise FlywheelError(message)


def print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # escape: a message quoting `[...]` (a path, gloo's "[pair.cc:553]") is text, not rich markup.
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # one line


def _plain(obj: Any) -> Any:
    """JSON-able form of dataclasses, paths, numpy scalars/arrays, tuples and dicts."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return obj.tolist()
    return obj


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (what `--json` promises a script)."""
    import json

    typer.echo(json.dumps(_plain(obj), indent=2, sort_keys=False))
