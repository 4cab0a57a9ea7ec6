"""The `flywheel` command line: one thin command per pipeline verb.

Commands import their module inside the function, so `flywheel --help` stays fast and importing
this module does no work. Errors the user can fix (FlywheelError) print one red line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Flywheel: continuous training and delivery for PyTorch models on MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: list them, snapshot labelled captures.")
app.add_typer(data_app, name="data")

TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI; default: embedded SQLite store in $FLYWHEEL_HOME (./.flywheel).")]
ModelNameOpt = Annotated[Optional[str], typer.Option(
    "--model-name", envvar="FLYWHEEL_MODEL_NAME", help="Registered model name (default fashion-classifier).")]
DataDirOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="FLYWHEEL_DATA_DIR", help="Where dataset files are looked up first.")]


def _settings(tracking_uri: str | None = None, model_name: str | None = None, data_dir: Path | None = None):
    from flywheel.core.config import Settings

    return Settings.from_env(tracking_uri=tracking_uri, model_name=model_name, data_dir=data_dir).apply()


def _stop_on_sigterm() -> None:
    """SIGTERM takes the Ctrl-C path, so a command's `finally` stops the servers it started."""
    from flywheel.core.procs import sigterm_raises_keyboard_interrupt

    sigterm_raises_keyboard_interrupt()


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, any width
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------ foundation
@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="fashion-mnist | digits | imagefolder.")] = "fashion-mnist",
    model: Annotated[str, typer.Option(help="Architecture name (see `flywheel models`).")] = "small-cnn",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Per-process batch size.")] = 128,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate of the one-cycle schedule.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed for splits, init and shuffling.")] = 0,
    register: Annotated[bool, typer.Option(help="Gate against the champion and register if better.")] = True,
    margin: Annotated[float, typer.Option(help="Accuracy the challenger must beat the champion by.")] = 0.0,
    extra_data: Annotated[Optional[list[Path]], typer.Option(
        "--extra-data", help="Labelled image folders (imagefolder layout) added to the training split.")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(
        help="Use at most this many training images (quick runs).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda | cuda:N; default: CUDA when present.")] = None,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Train a model, log it to MLflow, gate it against the champion and register it if better."""
    from flywheel.core.errors import FlywheelError
    from flywheel.training.train import TrainConfig, run_training

    cfg = TrainConfig(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      register=register, margin=margin, extra_data=tuple(extra_data or ()),
                      max_train_samples=max_train_samples, device=device)
    try:
        run_training(cfg, _settings(tracking_uri, model_name, data_dir))
    except FlywheelError as exc:
        _fail(str(exc))


@app.command()
def evaluate(
    model_uri: Annotated[str, typer.Option(help="Model URI, e.g. models:/fashion-classifier@prod or runs:/ID/model.")],
    dataset: Annotated[str, typer.Option(help="Dataset whose frozen test split is used.")] = "fashion-mnist",
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Evaluate a logged model on the frozen test split: accuracy, macro-F1, per-class."""
    from flywheel.core.errors import FlywheelError
    from flywheel.core.evaluate import evaluate_uri, print_report

    settings = _settings(tracking_uri, None, data_dir)
    try:
        print_report(evaluate_uri(model_uri, dataset, settings))
    except FlywheelError as exc:
        _fail(str(exc))


@app.command()
def register(
    run_id: Annotated[str, typer.Option(help="MLflow run whose model is gated and registered.")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset for the gate (default: the run's).")] = None,
    margin: Annotated[float, typer.Option(help="Accuracy the challenger must beat the champion by.")] = 0.0,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Gate an existing run against the champion and register it as `candidate` if it wins."""
    from flywheel.core.errors import FlywheelError
    from flywheel.core.registry import gate_run

    settings = _settings(tracking_uri, model_name, data_dir)
    try:
        decision = gate_run(run_id, settings, dataset=dataset, margin=margin)
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(decision.summary())


@app.command()
def models() -> None:
    """List the model architectures `--model` accepts."""
    from flywheel.core.models import ARCHITECTURES

    for name, text in ARCHITECTURES.items():
        typer.echo(f"{name:20s} {text}")


@data_app.command("list")
def data_list() -> None:
    """List the datasets `--dataset` accepts."""
    _print_datasets()


@app.command()
def datasets() -> None:
    """List the datasets `--dataset` accepts."""
    _print_datasets()


def _print_datasets() -> None:
    from flywheel.core.data import DATASETS

    docs = {"fashion-mnist": "Zalando Fashion-MNIST idx files (--data-dir, /usr/share/datasets/fashion-mnist)",
            "digits": "scikit-learn's built-in 8x8 digits upscaled to 28x28 (fast tests)",
            "imagefolder": "your labelled images: --data-dir ROOT/<class>/<image>"}
    for name in DATASETS:
        typer.echo(f"{name:15s} {docs[name]}")


@app.command()
def demo(
    keep: Annotated[bool, typer.Option("--keep", envvar="KEEP", help="Leave started servers running.")] = False,
    full: Annotated[bool, typer.Option("--full", envvar="FULL",
                                       help="Use Postgres + GCS emulator + auth (flywheel stack).")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Run the whole flywheel on this machine: train, register, release, serve, monitor, retrain."""
    _stop_on_sigterm()
    from flywheel.core.errors import FlywheelError
    from flywheel.demo import run_demo

    try:
        run_demo(keep=keep, full=full, data_dir=data_dir)
    except FlywheelError as exc:
        _fail(str(exc))


@app.command("env")
def env_(tracking_uri: TrackingOpt = None) -> None:
    """Print the exports that put plain `mlflow` commands on Flywheel's store: eval "$(flywheel env)".

    The store is MLFLOW_TRACKING_URI, else the embedded one in $FLYWHEEL_HOME (created here, with the
    experiment keeping its artifacts in $FLYWHEEL_HOME/mlartifacts)."""
    from flywheel.core.errors import FlywheelError
    from flywheel.core.runlog import ensure_experiment

    settings = _settings(tracking_uri)
    if settings.embedded:  # else `mlflow run` would create the experiment with artifacts in ./mlruns
        try:
            ensure_experiment(settings)
        except FlywheelError as exc:
            _fail(str(exc))
    typer.echo(settings.shell_exports(), nl=False)


# --------------------------------------------------------------- commands of the other nodes
# (tracking: stack/doctor · training nodes: remote-train · serving: package/release/predict ·
#  monitor: monitor/data snapshot) are added below by their modules' owners.


# tracking node: flywheel stack up|down|status, flywheel doctor
stack_app = typer.Typer(no_args_is_help=True,
                        help="The tracking node on this box: Postgres + GCS emulator + MLflow with basic-auth.")
app.add_typer(stack_app, name="stack")
StackDirOpt = Annotated[Optional[Path], typer.Option(
    "--state-dir", envvar="FLYWHEEL_STACK_DIR", help="Where the stack keeps data, logs, secrets (default "
                                                     "$FLYWHEEL_HOME/stack).")]


@stack_app.command("up")
def stack_up(
    embedded: Annotated[bool, typer.Option("--embedded", help="Start nothing: keep the SQLite store.")] = False,
    throwaway: Annotated[bool, typer.Option("--throwaway", help="Delete all data on `stack down`.")] = False,
    bucket: Annotated[str, typer.Option(help="GCS bucket (created in the emulator).")] = "flywheel-artifacts",
    mlflow_port: Annotated[int, typer.Option(help="MLflow port; 0: a free one (kept across restarts).")] = 0,
    pg_port: Annotated[int, typer.Option(help="Postgres port; 0: a free one.")] = 0,
    gcs_port: Annotated[int, typer.Option(help="GCS emulator port; 0: a free one.")] = 0,
    state_dir: StackDirOpt = None,
) -> None:
    """Start Postgres, the GCS emulator and the MLflow server with auth on 127.0.0.1."""
    _stop_on_sigterm()
    from flywheel.core.config import Settings
    from flywheel.core.errors import FlywheelError
    from flywheel.tracking.server import StackConfig
    from flywheel.tracking.server import stack_up as up

    settings = Settings.from_env()
    if embedded:
        typer.echo(f"embedded store, nothing to start: MLFLOW_TRACKING_URI={settings.tracking_uri}")
        return
    cfg = StackConfig.from_settings(settings, state_dir=state_dir, bucket=bucket, mlflow_port=mlflow_port,
                                    pg_port=pg_port, gcs_port=gcs_port, throwaway=throwaway)
    try:
        state = up(cfg)
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(f"tracking URI: {state.tracking_uri}  (artifacts: {state.artifacts_destination})\n"
               f"log in as '{state.username}', password in {state.password_file}; in a shell:\n"
               f"  source {Path(state.state_dir) / 'env'}\n"
               f"stop with: flywheel stack down --state-dir {state.state_dir}")


@stack_app.command("down")
def stack_down(state_dir: StackDirOpt = None) -> None:
    """Stop what `stack up` started (by PID); data stays unless it was --throwaway."""
    from flywheel.core.config import Settings
    from flywheel.tracking.server import StackConfig
    from flywheel.tracking.server import stack_down as down

    cfg = StackConfig.from_settings(Settings.from_env(), state_dir=state_dir)
    stopped = down(cfg.state_dir)
    typer.echo("stopped: " + ", ".join(stopped) if stopped else f"nothing running in {cfg.state_dir}")


@stack_app.command("status")
def stack_status(state_dir: StackDirOpt = None) -> None:
    """Show each part of the stack: running (pid) and answering, or stopped. Exit 1 if any is down."""
    from flywheel.core.config import Settings
    from flywheel.tracking.server import StackConfig, StackState
    from flywheel.tracking.server import stack_status as status

    cfg = StackConfig.from_settings(Settings.from_env(), state_dir=state_dir)
    parts = status(cfg.state_dir)
    if not parts:
        typer.echo(f"no stack in {cfg.state_dir} (start one with `flywheel stack up`)")
        raise typer.Exit(1)
    state = StackState.load(cfg.state_dir)
    typer.echo(f"tracking URI: {state.tracking_uri}")
    for name, text in parts.items():
        typer.echo(f"{name:15s} {text}")
    if any(not t.startswith("running") or "NOT" in t for t in parts.values()):
        raise typer.Exit(1)


@app.command()
def doctor(
    backend_store_uri: Annotated[Optional[str], typer.Option(
        envvar="MLFLOW_BACKEND_STORE_URI", help="Also check this DB's schema (on the tracking node).")] = None,
    artifacts_destination: Annotated[Optional[str], typer.Option(
        envvar="MLFLOW_ARTIFACTS_DESTINATION", help="Also check this gs:// bucket exists.")] = None,
    gcs_emulator: Annotated[Optional[str], typer.Option(
        envvar="STORAGE_EMULATOR_HOST", help="GCS emulator URL for the bucket check.")] = None,
    state_dir: StackDirOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Check the tracking setup end to end: server, auth, DB schema, bucket, artifact round-trip."""
    from dataclasses import replace

    from flywheel.tracking.doctor import print_checks, run_doctor, targets_from_stack
    from flywheel.tracking.server import StackConfig

    settings = _settings(tracking_uri)
    targets = targets_from_stack(StackConfig.from_settings(settings, state_dir=state_dir).state_dir,
                                 settings.tracking_uri)
    given = {k: v for k, v in (("backend_store_uri", backend_store_uri), ("gcs_emulator_url", gcs_emulator),
                               ("artifacts_destination", artifacts_destination)) if v}
    if not print_checks(run_doctor(settings, replace(targets, **given))):
        raise typer.Exit(1)


@app.command("remote-train")
def remote_train(
    node: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_NODE", help="Training node as user@host[:port] (or use --nodes).")] = None,
    nodes: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_NODES", help="nodes.yaml path (or its YAML text): the pool; the reachable node "
                                      "with the most free GPU memory is used.")] = None,
    commit: Annotated[str, typer.Option(help="Commit to train (SHA, branch or tag in --repo).")] = "HEAD",
    repo: Annotated[Path, typer.Option(help="Git checkout the commit is archived from.")] = Path("."),
    entry: Annotated[str, typer.Option(help="MLproject entry point to run.")] = "train",
    param: Annotated[Optional[list[str]], typer.Option(
        "-P", "--param", envvar="FLYWHEEL_TRAIN_PARAMS",
        help="Entry point parameter key=value (repeatable; the env var takes them space separated).")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(
        min=1, help="Processes (GPUs) per node; passed as the entry's nproc_per_node parameter.")] = None,
    env_manager: Annotated[str, typer.Option(help="mlflow run --env-manager on the node: local|conda|docker.")
                           ] = "local",
    env_activate: Annotated[str, typer.Option(
        help="Shell snippet run on a --node before mlflow, e.g. 'source /opt/venv/bin/activate'.")] = "",
    workdir: Annotated[str, typer.Option(
        help="Jobs directory on a --node (relative to the login's home).")] = "flywheel-jobs",
    attach: Annotated[Optional[str], typer.Option(
        metavar="RUN", help="Follow a started job to its end: its commit (SHA or prefix) or MLflow run id.")
                      ] = None,
    cancel: Annotated[Optional[str], typer.Option(
        metavar="COMMIT", help="Stop the running job of this commit on the node(s).")] = None,
    identity: Annotated[Optional[str], typer.Option(
        "--identity", "-i", envvar="FLYWHEEL_SSH_KEY", help="SSH private key: a path or the key text.")] = None,
    known_hosts: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_SSH_KNOWN_HOSTS", help="known_hosts path or text; unknown hosts are refused "
                                                "(default ~/.ssh/known_hosts).")] = None,
    connect_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for a node to answer.")
                               ] = 10.0,
    reconnect_timeout: Annotated[float, typer.Option(
        min=0.0, help="Seconds to keep reconnecting after the SSH connection drops.")] = 300.0,
    plots_dir: Annotated[Optional[Path], typer.Option(
        help="Download the run's plots here for the CI job summary.")] = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Train a commit on a GPU node over SSH with `mlflow run`; stream it and exit with its exit code."""
    from flywheel.core.errors import FlywheelError
    from flywheel.training.remote import CommandOptions, run_command

    opts = CommandOptions(node=node, nodes=nodes, commit=commit, repo=repo, entry=entry, params=tuple(param or ()),
                          nproc_per_node=nproc_per_node, env_manager=env_manager, env_activate=env_activate,
                          workdir=workdir, attach=attach, cancel=cancel, identity=identity,
                          known_hosts=known_hosts, connect_timeout=connect_timeout,
                          reconnect_timeout=reconnect_timeout, plots_dir=plots_dir)
    try:
        code = run_command(opts, _settings(tracking_uri, model_name), tracking_given=tracking_uri is not None)
    except FlywheelError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def report(
    version: Annotated[str, typer.Option(help="Registry version (or alias) to report on.")],
    plots_dir: Annotated[Optional[Path], typer.Option(help="Download the version's plots here.")] = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Markdown of a version's metrics against the champion's (prod), also appended to a CI job summary."""
    from flywheel.core.errors import FlywheelError
    from flywheel.training.remote import report_version

    try:
        typer.echo(report_version(_settings(tracking_uri, model_name), version, plots_dir), nl=False)
    except FlywheelError as exc:
        _fail(str(exc))


# serving node: flywheel package | release | predict | serve
InferenceUrlOpt = Annotated[str, typer.Option(
    "--endpoint", "--inference-url", envvar="FLYWHEEL_TS_INFERENCE_URL", help="TorchServe inference API URL.")]
KeyFileOpt = Annotated[Optional[Path], typer.Option(
    "--key-file", envvar="FLYWHEEL_TS_KEY_FILE", help="TorchServe's key_file.json (tokens).")]


@app.command()
def package(
    model: Annotated[Optional[str], typer.Option("--model", envvar="FLYWHEEL_MODEL_NAME",
                                                 help="Registered model name.")] = None,
    version: Annotated[Optional[str], typer.Option(help="Registry version to package.")] = None,
    alias: Annotated[Optional[str], typer.Option(help="...or the version holding this alias.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Model store to write NAME-VERSION.mar into "
                                                     "(default $FLYWHEEL_HOME/model-store).")] = None,
    artifact_format: Annotated[str, typer.Option("--format", help="auto | onnx | torchscript | tensorrt.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="TorchServe batch size.")] = 16,
    max_batch_delay: Annotated[int, typer.Option(min=0, help="TorchServe max batch delay (ms).")] = 1,
    workers: Annotated[int, typer.Option(min=1, help="Workers per model.")] = 1,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Export a registry version (TorchScript, ONNX, TensorRT if possible), check parity, build the .mar."""
    from flywheel.core.errors import FlywheelError
    from flywheel.serving.package import PackageConfig, package_version

    settings = _settings(tracking_uri, model, data_dir)
    cfg = PackageConfig(settings.model_name, version=version, alias=alias, out_dir=out,
                        artifact_format=artifact_format, batch_size=batch_size,
                        max_batch_delay_ms=max_batch_delay, workers=workers)
    try:
        result = package_version(cfg, settings)
    except FlywheelError as exc:
        _fail(str(exc))
    m = result.manifest
    for e in m.exports:
        typer.echo(f"  {e['format']:12s} " + (f"skipped: {e['skipped']}" if e["skipped"]
                                              else f"max abs diff {e['max_abs_diff']:.2e}"))
    typer.echo(f"{result.mar_path}  ({m.model_name} v{m.model_version}, serving {m.artifact['format']}, "
               f"sha256 {m.artifact['sha256'][:12]})")


@app.command()
def release(
    version: Annotated[str, typer.Option(help="Registry version to release.")],
    env: Annotated[str, typer.Option(help="dev | prod: the registry alias moved on success.")],
    model: Annotated[Optional[str], typer.Option("--model", envvar="FLYWHEEL_MODEL_NAME",
                                                 help="Registered model name.")] = None,
    inference_url: InferenceUrlOpt = "http://127.0.0.1:8080",
    management_url: Annotated[str, typer.Option(envvar="FLYWHEEL_TS_MANAGEMENT_URL",
                                                help="TorchServe management API URL.")] = "http://127.0.0.1:8081",
    key_file: KeyFileOpt = None,
    model_store: Annotated[Optional[Path], typer.Option(
        envvar="FLYWHEEL_TS_MODEL_STORE", help="The server's model store directory.")] = None,
    mar: Annotated[Optional[Path], typer.Option(
        help="The version's archive from `flywheel package` (verified: version, run, sha256, parity). "
             "Default: NAME-VERSION.mar in the model store or $FLYWHEEL_HOME/model-store if there and "
             "valid, else packaged now.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Workers for the new version.")] = 1,
    grace: Annotated[float, typer.Option(min=0, help="Seconds before retired versions are unregistered.")] = 10.0,
    keep_previous: Annotated[int, typer.Option(min=0, help="Earlier versions kept reachable for A/B.")] = 1,
    min_accuracy: Annotated[float, typer.Option(help="Acceptance: accuracy on a labelled sample.")] = 0.8,
    p95_slo_ms: Annotated[float, typer.Option(help="Acceptance: p95 latency of single requests (ms).")] = 100.0,
    target: Annotated[str, typer.Option(help="torchserve (management API) | docker (image MODEL:VERSION).")
                      ] = "torchserve",
    docker_host: Annotated[Optional[str], typer.Option(
        envvar="DOCKER_HOST", help="Docker target: unix:///var/run/docker.sock or ssh://user@host.")] = None,
    image_tar: Annotated[Optional[Path], typer.Option(help="Docker target: `docker save` tarball to load.")] = None,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Release a registry version to a TorchServe: register, accept, switch, retire; roll back on failure."""
    from flywheel.core.config import Settings
    from flywheel.core.errors import FlywheelError
    from flywheel.serving.release import (
        AcceptanceConfig,
        DockerTarget,
        ManagementTarget,
        docker_release,
        release_version,
        retire_previous,
    )

    # Not applied: release reads the registry through Registry(settings) (packaging applies it itself).
    settings = Settings.from_env(tracking_uri=tracking_uri, model_name=model, data_dir=data_dir)
    accept = AcceptanceConfig(min_accuracy=min_accuracy, p95_slo_ms=p95_slo_ms)
    try:
        if target == "docker":
            result = docker_release(settings, settings.model_name, version, env,
                                    DockerTarget(base_url=docker_host, image_tar=image_tar, grace_s=grace), accept)
        elif target == "torchserve":
            if key_file is None or model_store is None:
                _fail("release needs --key-file (the server's key_file.json) and --model-store (its model store)")
            ts = ManagementTarget(inference_url, management_url, key_file, model_store, workers=workers,
                                  grace_s=grace, keep_previous=keep_previous)
            result = release_version(settings, settings.model_name, version, env, ts, accept, mar_path=mar,
                                     retire=False)
        else:
            _fail(f"unknown --target {target!r}; choose torchserve or docker")
    except FlywheelError as exc:
        _fail(str(exc))
    for line in result.events:
        typer.echo(f"  {line}")
    typer.echo(f"released {result.model} v{result.version} to {env} ({result.target})")
    if target == "torchserve":  # served already; old versions go after the grace period
        sys.stdout.flush()
        shown = len(result.events)
        retire_previous(ts, result)
        for line in result.events[shown:]:
            typer.echo(f"  {line}")


@app.command()
def predict(
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", envvar="FLYWHEEL_MODEL_NAME",
                                                 help="Model name on the server.")] = None,
    endpoint: InferenceUrlOpt = "http://127.0.0.1:8080",
    directory: Annotated[Optional[Path], typer.Option("--dir", help="Predict every image under this folder.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write JSON lines here (default: stdout).")] = None,
    version: Annotated[Optional[str], typer.Option(help="Ask this version (A/B), not the default.")] = None,
    key_file: KeyFileOpt = None,
    token: Annotated[Optional[str], typer.Option(envvar="FLYWHEEL_TS_TOKEN", help="Inference token.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
) -> None:
    """Batch inference over image files against a TorchServe endpoint, with progress."""
    from flywheel.core.config import DEFAULT_MODEL_NAME
    from flywheel.core.errors import FlywheelError
    from flywheel.serving.predict import run_predict

    try:
        summary = run_predict(endpoint, model or DEFAULT_MODEL_NAME, list(images or []), directory, out, key_file,
                              token, version, concurrency)
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(f"{summary.ok}/{summary.total} predicted" + (f", {summary.failed} failed" if summary.failed else "")
               + (f" → {summary.out}" if summary.out else ""), err=True)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def serve(
    model_store: Annotated[Optional[Path], typer.Option(
        help="Model store with NAME-VERSION.mar files (default $FLYWHEEL_HOME/model-store, where `flywheel "
             "package` writes).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(
        help="Server directory: key_file.json (bearer tokens), logs, config, and serve.env, the exports that "
             "point release/predict/monitor/data at this server (default $FLYWHEEL_HOME/serving: never inside "
             "the repository).")] = None,
    capture_uri: Annotated[Optional[str], typer.Option(
        "--capture-uri", help="Where served traffic is captured: a directory or gs://bucket/prefix (default "
                              "FLYWHEEL_CAPTURE_URI, else $FLYWHEEL_HOME/captures).")] = None,
    capture: Annotated[bool, typer.Option("--capture/--no-capture", help="Capture served traffic.")] = True,
    load: Annotated[Optional[list[str]], typer.Option("--load", help="Archive to load at start (repeatable).")] = None,
    token_expiry_minutes: Annotated[float, typer.Option(
        min=0.1, help="Lifetime of TorchServe's keys (renewed at half of it while this runs).")] = 1440,
) -> None:
    """Run a TorchServe (token auth, loopback, free ports) in the foreground until Ctrl-C."""
    _stop_on_sigterm()
    import time

    from flywheel.core.config import Settings, export_lines
    from flywheel.core.errors import FlywheelError
    from flywheel.serving.torchserve import ServeConfig, start_torchserve
    settings = Settings.from_env()  # defaults: all in $FLYWHEEL_HOME
    work_dir, model_store = work_dir or settings.work_dir / "serving", model_store or settings.work_dir / "model-store"
    capture_to = (capture_uri or settings.capture_uri) if capture else ""
    if capture_to and "://" not in capture_to:  # TorchServe runs in work_dir: no relative paths
        capture_to = str(Path(capture_to).resolve())
    env_file = work_dir.resolve() / "serve.env"
    env_file.unlink(missing_ok=True)  # a stale one would name a dead server

    cfg = ServeConfig.local(work_dir.resolve(), model_store.resolve(), models=tuple(load or ()),
                            token_expiration_min=token_expiry_minutes)
    try:
        server = start_torchserve(cfg, env={"FLYWHEEL_CAPTURE_URI": capture_to})  # "": an inherited one is off
    except FlywheelError as exc:
        _fail(str(exc))
    env_file.write_text(export_lines({
        "FLYWHEEL_TS_INFERENCE_URL": cfg.inference_address, "FLYWHEEL_TS_MANAGEMENT_URL": cfg.management_address,
        "FLYWHEEL_TS_KEY_FILE": str(server.key_file), "FLYWHEEL_TS_MODEL_STORE": str(cfg.model_store),
        **({"FLYWHEEL_CAPTURE_URI": capture_to} if capture_to else {})}))
    typer.echo(f"inference {cfg.inference_address}  management {cfg.management_address}  "
               f"metrics {cfg.metrics_address}\nkey file {server.key_file}\ncapture {capture_to or 'off'}\n"
               f"in another shell: source {env_file}")
    try:
        while server.alive():
            time.sleep(1)
    finally:
        server.stop()
        env_file.unlink(missing_ok=True)


serve_keys_app = typer.Typer(no_args_is_help=True, help="TorchServe's token keys on a serving node: renew them.")
app.add_typer(serve_keys_app, name="serve-keys")


@serve_keys_app.command("renew")
def serve_keys_renew(
    key_file: Annotated[Path, typer.Option(
        "--key-file", envvar="FLYWHEEL_TS_KEY_FILE", help="TorchServe's key_file.json (in its working directory).")],
    management_url: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_TS_MANAGEMENT_URL", help="TorchServe management API URL (default: from --ts-config).")
                              ] = None,
    ts_config: Annotated[Optional[Path], typer.Option(
        help="The server's config.properties, read for its management_address.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep running and renew each key as it comes due.")
                     ] = False,
    force: Annotated[bool, typer.Option("--force", help="Renew both keys now, due or not.")] = False,
    while_pid: Annotated[Optional[int], typer.Option(
        help="With --watch: exit when this process (the TorchServe launcher) is gone.")] = None,
) -> None:
    """Renew TorchServe's inference and management keys that are past half their lifetime (systemd timer)."""
    _stop_on_sigterm()
    import logging

    from flywheel.core.errors import FlywheelError
    from flywheel.serving.keys import KeyRenewer, management_url_from_properties

    if management_url is None and ts_config is None:
        _fail("give --management-url or --ts-config (the server's config.properties)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        renewer = KeyRenewer(management_url or management_url_from_properties(ts_config), key_file)
        if watch and while_pid:
            return renewer.run_while_alive(while_pid)
        if watch:
            return renewer.run()
        renewed, wait = renewer.renew_due(force=force)
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(f"renewed: {', '.join(renewed)}" if renewed else "no key due")
    typer.echo(f"next renewal due in {wait:.0f} s")


# monitor node: flywheel monitor, flywheel data snapshot | feedback
CaptureUriOpt = Annotated[Optional[str], typer.Option(
    "--capture-uri", envvar="FLYWHEEL_CAPTURE_URI",
    help="Capture store: a directory or gs://bucket/prefix (default $FLYWHEEL_HOME/captures, where `serve` writes).")]


@app.command()
def monitor(
    model: Annotated[Optional[str], typer.Option("--model", help="Registered model (default: --model-name).")] = None,
    env: Annotated[str, typer.Option(help="Alias whose served traffic is monitored: prod | dev.")] = "prod",
    capture_uri: CaptureUriOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Process what is there, then exit (cron).")] = False,
    from_now: Annotated[bool, typer.Option("--from-now", help="First run: skip captures already stored.")] = False,
    capture_horizon: Annotated[float, typer.Option(
        min=1, help="Seconds a capture batch may take from being named to being stored, plus the largest clock "
                    "difference between serving replicas and this node: batches later than that are not read.")] = 600.0,
    window: Annotated[int, typer.Option(min=10, help="Captured predictions per drift test.")] = 100,
    alpha: Annotated[float, typer.Option(help="False-alarm budget per window.")] = 0.01,
    interval: Annotated[float, typer.Option(help="Seconds between ticks of the service.")] = 30.0,
    consecutive: Annotated[int, typer.Option(min=1, help="Drifting windows in a row that open an episode.")] = 3,
    cooldown: Annotated[float, typer.Option(help="Seconds after a retrain before drift may trigger again.")] = 3600.0,
    schedule: Annotated[Optional[float], typer.Option(help="Also retrain every this many seconds.")] = None,
    min_labelled: Annotated[Optional[int], typer.Option(help="Also retrain after this many new labels.")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Cursor, policy, outbox (default $FLYWHEEL_HOME/monitor).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(envvar="FLYWHEEL_MONITOR_PORT",
                                                        help="Serve Prometheus /metrics on this port.")] = None,
    metrics_addr: Annotated[str, typer.Option(help="Address for /metrics.")] = "127.0.0.1",
    snapshot_dir: Annotated[Optional[Path], typer.Option(
        help="Where `data snapshot` writes; its latest snapshot goes with retrains (default $FLYWHEEL_HOME/snapshots).")] = None,
    github_repo: Annotated[Optional[str], typer.Option(envvar="FLYWHEEL_GITHUB_REPO",
                                                       help="owner/name: retrain by repository_dispatch.")] = None,
    github_api: Annotated[str, typer.Option(envvar="GITHUB_API_URL", help="GitHub API base URL.")] = "https://api.github.com",
    ssh_node: Annotated[Optional[str], typer.Option(help="user@host[:port]: retrain by running --ssh-command there.")] = None,
    ssh_command: Annotated[Optional[str], typer.Option(help="Command template for --ssh-node.")] = None,
    ssh_key: Annotated[Optional[str], typer.Option(help="Private key for --ssh-node.")] = None,
    known_hosts: Annotated[Optional[str], typer.Option(help="known_hosts pinning --ssh-node's host key.")] = None,
    local_command: Annotated[Optional[str], typer.Option(help="Retrain by running this command here.")] = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Watch captured traffic for drift against the version's reference and trigger retraining."""
    _stop_on_sigterm()
    import logging
    import os

    from flywheel.core.errors import FlywheelError
    from flywheel.monitoring.service import Monitor, MonitorConfig, describe_tick
    from flywheel.monitoring.triggers import PolicyConfig, build_actions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(tracking_uri, model_name)
    try:
        actions = build_actions(github_repo, os.environ.get("GITHUB_TOKEN"), github_api, ssh_node, ssh_command,
                                ssh_key, known_hosts, local_command)
        cfg = MonitorConfig(model=model or settings.model_name, capture_uri=capture_uri or settings.capture_uri, env=env,
                            state_dir=state_dir or settings.work_dir / "monitor" / f"{model or settings.model_name}-{env}",
                            window=window, alpha=alpha, interval_s=interval, metrics_port=metrics_port,
                            metrics_addr=metrics_addr, snapshot_dir=snapshot_dir or settings.work_dir / "snapshots",
                            from_now=from_now, horizon_s=capture_horizon)
        policy = PolicyConfig(consecutive=consecutive, cooldown_s=cooldown, schedule_s=schedule,
                              min_labelled=min_labelled)
        mon = Monitor(cfg, settings, actions, policy)
        if once:
            try:
                for r in mon.tick():
                    typer.echo(f"window {r.index} v{r.version}: p={r.p_value:.3g} (embedding {r.p_embedding:.3g}, "
                               f"prediction {r.p_prediction:.3g}) drift={r.drift}"
                               + (f" accuracy={r.accuracy:.3f}" if r.accuracy is not None else "")
                               + (f" -> retrain ({r.trigger})" if r.trigger else ""))
                typer.echo(describe_tick(mon.last_tick, cfg.capture_uri, cfg.model))
            finally:
                mon.close()
        else:
            mon.serve_forever()
    except FlywheelError as exc:
        _fail(str(exc))


@data_app.command("snapshot")
def data_snapshot(
    model: Annotated[Optional[str], typer.Option("--model", help="Registered model (default: --model-name).")] = None,
    capture_uri: CaptureUriOpt = None,
    labelled: Annotated[Optional[list[Path]], typer.Option(
        "--labelled", help="Labelling export in imagefolder layout (<dir>/<class>/<image>); repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Snapshot root (default $FLYWHEEL_HOME/snapshots).")] = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Turn labelled captures into a new versioned imagefolder dataset (prints its path and digest)."""
    from flywheel.core.config import Settings
    from flywheel.core.errors import FlywheelError
    from flywheel.monitoring.snapshot import take_snapshot

    settings = Settings.from_env(model_name=model_name)  # no tracking needed: skip importing MLflow
    try:
        snap = take_snapshot(capture_uri or settings.capture_uri, model or settings.model_name,
                             out or settings.work_dir / "snapshots",
                             tuple(labelled or ()))
    except FlywheelError as exc:
        _fail(str(exc))
    state = "new" if snap.new else "unchanged, existing"
    typer.echo(f"snapshot v{snap.version} ({state}): {snap.path}\ndigest {snap.digest}\n{snap.images} images "
               f"{snap.per_class}\ntrain with: flywheel train --extra-data {snap.path}")


@data_app.command("feedback")
def data_feedback(
    labels: Annotated[list[str], typer.Argument(help="PREDICTION_ID=LABEL pairs (the class name).")],
    model: Annotated[Optional[str], typer.Option("--model", help="Registered model (default: --model-name).")] = None,
    capture_uri: CaptureUriOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Send ground-truth labels for served predictions (joined with captures by `data snapshot`)."""
    from flywheel.contracts.capture import write_feedback

    pairs = []
    for item in labels:
        pid, sep, label = item.partition("=")
        if not sep or not pid or not label:
            _fail(f"{item!r} is not PREDICTION_ID=LABEL")
        pairs.append((pid, label))
    from flywheel.core.config import Settings

    settings = Settings.from_env(model_name=model_name)
    capture_uri = capture_uri or settings.capture_uri
    try:
        name = write_feedback(capture_uri, model or settings.model_name, pairs)
    except (OSError, ValueError) as exc:
        _fail(f"could not store feedback in {capture_uri}: {exc}")
    typer.echo(f"stored {len(pairs)} labels in {capture_uri} ({name})")


# ------------------------------------------------------------------------------------ CI bookkeeping
dispatches_app = typer.Typer(no_args_is_help=True, help="CI bookkeeping: superseded release/train requests, "
                                                        "retried retrain events (see flywheel.control.dispatches).")
app.add_typer(dispatches_app, name="dispatches")


@dispatches_app.command("record-superseded")
def dispatches_record_superseded(
    kind: Annotated[str, typer.Option(help="What this job does: release | train.")],
    model: Annotated[str, typer.Option(help="Registered model the request is for.")],
    target: Annotated[str, typer.Option(help="The environment of a release (dev|prod), the git ref of a training.")],
    version: Annotated[Optional[str], typer.Option(help="Registry version being released (releases).")] = None,
    workflow: Annotated[Optional[list[str]], typer.Option(
        "--workflow", help="Workflow file whose runs can hold this concurrency group (repeatable).")] = None,
    repository: Annotated[str, typer.Option(envvar="GITHUB_REPOSITORY", help="owner/name of the repository.")] = "",
    run_id: Annotated[int, typer.Option(envvar="GITHUB_RUN_ID", help="This workflow run's id.")] = 0,
    api_url: Annotated[str, typer.Option(envvar="GITHUB_API_URL", help="GitHub REST API base URL.")
                       ] = "https://api.github.com",
    lookback_days: Annotated[float, typer.Option(
        min=0.0, help="How far back to look when the group has no recorded previous run.")] = 7.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Record the requests GitHub cancelled while they waited behind this one: job summary and registry tags.

    The token comes from GITHUB_TOKEN (needs `actions: read`); never pass it on a command line."""
    import json

    from flywheel.control.dispatches import SupersedeOptions, record_superseded
    from flywheel.core.errors import FlywheelError

    opts = SupersedeOptions(kind=kind, model=model, target=target, version=version, workflows=tuple(workflow or ()),
                            repository=repository, run_id=run_id, api_url=api_url, lookback_days=lookback_days)
    try:
        outcome = record_superseded(_settings(tracking_uri, model), opts)
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(outcome.as_dict(), indent=2) if as_json else outcome.markdown(), nl=as_json)


@dispatches_app.command("check-event")
def dispatches_check_event(
    event_id: Annotated[str, typer.Option(help="The monitor's event_id (repository_dispatch client_payload).")],
    superseded: Annotated[int, typer.Option(
        min=0, help="Requests this run superseded (record-superseded's output); > 0 always trains.")] = 0,
    stale_after_hours: Annotated[float, typer.Option(
        min=0.0, help="A RUNNING run with this event older than this counts as dead.")] = 6.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Train for a retrain event, or skip it because a run tagged flywheel.event_id already serves it."""
    import json

    from flywheel.control.dispatches import check_event
    from flywheel.core.errors import FlywheelError

    try:
        plan = check_event(_settings(tracking_uri, model_name), event_id, superseded, stale_after_hours * 3600)
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(plan.as_dict()) if as_json else plan.note)


def _skip_final_collection() -> None:
    """At exit CPython's last garbage collections walk the whole heap that torch, MLflow and friends
    left (1-2 s per process on this project's 2-core VM) only to free memory the OS takes back anyway.
    Registered first, this runs after every other atexit handler (MLflow's flushes included) and
    freezes what is left, so those collections skip it (reference counting still frees and flushes)."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def main() -> None:
    _skip_final_collection()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
