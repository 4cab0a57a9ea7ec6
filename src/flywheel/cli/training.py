"""Training node's verbs: train, evaluate, register (the gate), archs, tune, remote-train, report.

`--model` is the registered model name (as in every command), `--arch` the architecture `train`
builds. `train` exits 0 whether or not the gate registers the run (the run is the result; its
`gate.decision` tag says which, and the train workflow reads it); `register`, whose whole job is the
gate's decision, exits 3 when the gate rejects the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli._common import (
    DataDirOpt,
    JsonOpt,
    ModelNameAlias,
    ModelOpt,
    TrackingOpt,
    emit_json,
    fail,
    model_of,
    settings_for,
)

PANEL = "Training node"
app = typer.Typer()


@app.command(rich_help_panel=PANEL)
def train(
    dataset: Annotated[str, typer.Option(help="fashion-mnist | digits | imagefolder.")] = "fashion-mnist",
    arch: Annotated[str, typer.Option("--arch", help="Architecture to build (see `flywheel archs`).")] = "small-cnn",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Per-process batch size.")] = 128,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate of the one-cycle schedule.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed for splits, init and shuffling.")] = 0,
    register: Annotated[bool, typer.Option(help="Gate against the champion and register if better.")] = True,
    margin: Annotated[float, typer.Option(help="Accuracy the challenger must beat the champion by.")] = 0.0,
    extra_data: Annotated[Optional[list[Path]], typer.Option(
        "--extra-data", help="Labelled image folders (imagefolder layout) added to the training split.")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(
        min=1, help="Use at most this many training images (quick runs).")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="cpu | cuda (each torchrun process its own GPU) | cuda:N (one process); default: CUDA when present.")
                      ] = None,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    model: ModelOpt = None,
    model_name: ModelNameAlias = None,
) -> None:
    """Train a model, log it to MLflow, gate it against the champion and register it if better."""
    from flywheel.training.train import TrainConfig, run_training

    cfg = TrainConfig(dataset=dataset, model=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      register=register, margin=margin, extra_data=tuple(extra_data or ()),
                      max_train_samples=max_train_samples, device=device)
    run_training(cfg, settings_for(tracking_uri, model_of(model, model_name), data_dir))


@app.command(rich_help_panel=PANEL)
def evaluate(
    model_uri: Annotated[str, typer.Option(help="Model URI, e.g. models:/fashion-classifier@prod or runs:/ID/model.")],
    dataset: Annotated[Optional[str], typer.Option(
        help="Evaluate on this built-in dataset's frozen test split instead of the labelled test set the "
             "model's component spec names (the default).")] = None,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a logged model on its labelled test set: accuracy, macro-F1, per-class."""
    from flywheel.core.evaluate import evaluate_uri, print_report

    settings = settings_for(tracking_uri, None, data_dir)
    report = evaluate_uri(model_uri, dataset, settings)
    emit_json(report) if as_json else print_report(report)


@app.command(rich_help_panel=PANEL)
def register(
    run_id: Annotated[str, typer.Option(help="MLflow run whose model is gated and registered.")],
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset name recorded with the decision (default: the run's); the comparison always uses the "
             "labelled test set the run's component spec names.")] = None,
    margin: Annotated[float, typer.Option(help="Accuracy the challenger must beat the champion by.")] = 0.0,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    model: ModelOpt = None,
    model_name: ModelNameAlias = None,
) -> None:
    """Gate an existing run against the champion and register it as `candidate` if it wins."""
    from flywheel.core.errors import Rejected
    from flywheel.core.registry import gate_run

    settings = settings_for(tracking_uri, model_of(model, model_name), data_dir)
    decision = gate_run(run_id, settings, dataset=dataset, margin=margin)
    typer.echo(decision.summary())
    if not decision.accepted:
        raise Rejected(f"the gate rejected run {run_id}: it does not beat {settings.model_name}'s champion")


@app.command(rich_help_panel=PANEL)
def archs() -> None:
    """List the architectures `train --arch` builds."""
    from flywheel.training.archs import ARCHITECTURES

    for name, text in ARCHITECTURES.items():
        typer.echo(f"{name:20s} {text}")


@app.command(hidden=True)
def models() -> None:
    """Old name of `archs` (the word now means registered models)."""
    archs()


@app.command(rich_help_panel=PANEL, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def tune(
    ctx: typer.Context,
    study: Annotated[Optional[str], typer.Option(
        help="Study name; workers with the same name and storage share it (default: MODEL-tune).")] = None,
    storage: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_TUNE_STORAGE", help="Optuna RDB storage URL, e.g. the tracking node's Postgres "
                                             "postgresql+psycopg2://USER:PW@HOST:PORT/optuna (default: SQLite "
                                             "$FLYWHEEL_HOME/optuna.db).")] = None,
    n_trials: Annotated[int, typer.Option(min=0, help="Trials of the whole study (all workers together).")] = 10,
    space: Annotated[Optional[str], typer.Option(
        help="Search space: a YAML/JSON file (name: spec) or inline 'name=spec name=spec'.")] = None,
    param: Annotated[Optional[list[str]], typer.Option(
        "--param", help="Searched parameter name=float|log|int:LOW:HIGH or name=cat:A,B (repeatable; wins over "
                        "--space). Default: lr, weight_decay log-uniform, batch_size 32|64|128.")] = None,
    metric: Annotated[str, typer.Option(help="Per-epoch metric the pruner and the objective use.")] = "val_accuracy",
    direction: Annotated[str, typer.Option(help="maximize | minimize the metric.")] = "maximize",
    sampler: Annotated[str, typer.Option(help="tpe | random | grid (grid: every parameter cat:...).")] = "tpe",
    sampler_seed: Annotated[Optional[int], typer.Option(help="Seed of the sampler.")] = None,
    pruner: Annotated[str, typer.Option(
        help="median[:STARTUP[:WARMUP]] | percentile:P[:STARTUP[:WARMUP]] | threshold:VALUE | none.")] = "median",
    finalize: Annotated[bool, typer.Option(
        help="When the study is done: record the best trial and plots on the parent run and gate it.")] = True,
    register: Annotated[bool, typer.Option(help="Gate the best trial against the champion; register if better.")
                        ] = True,
    margin: Annotated[float, typer.Option(help="Accuracy the best trial must beat the champion by.")] = 0.0,
    wait: Annotated[float, typer.Option(min=0.0, help="Seconds finalize waits for other workers' trials.")] = 3600.0,
    component: Annotated[Optional[Path], typer.Option(
        help="A component's directory (its train.py main(argv) runs per trial; arguments after -- go to it). "
             "Default: the built-in trainer (--dataset, --arch).")] = None,
    dataset: Annotated[str, typer.Option(help="Built-in trainer: fashion-mnist | digits | imagefolder.")
                       ] = "fashion-mnist",
    arch: Annotated[str, typer.Option("--arch", help="Built-in trainer: architecture (`flywheel archs`).")
                    ] = "small-cnn",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Fixed training epochs (unless searched).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Fixed batch size (unless searched).")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Fixed peak learning rate (unless searched).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for splits, init and shuffling.")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(min=1, help="Use at most this many training images.")
                                 ] = None,
    device: Annotated[Optional[str], typer.Option(help="Built-in trainer: cpu | cuda | cuda:N (as for train).")] = None,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search hyperparameters with Optuna: each trial a nested MLflow run; the best goes through the gate."""
    from flywheel.training.train import TrainConfig
    from flywheel.training.tune import TuneConfig, make_target, parse_space, run_tune

    settings = settings_for(tracking_uri, model, data_dir)
    cfg = TuneConfig(study=study or f"{settings.model_name}-tune", storage=storage, n_trials=n_trials,
                     space=parse_space(tuple(param or ()), space), metric=metric, direction=direction,
                     sampler=sampler, sampler_seed=sampler_seed, pruner=pruner, finalize=finalize,
                     register=register, margin=margin, wait_s=wait)
    fixed = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "max_train_samples": max_train_samples}
    # A component names its registered model itself (--model-name, default FLYWHEEL_MODEL_NAME); --model tells it.
    passed = ("--model-name", model) if component is not None and model else ()
    target = make_target(component, TrainConfig(dataset=dataset, model=arch, device=device), fixed,
                         (*passed, *ctx.args))
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # --json: one document
        summary = run_tune(cfg, target, settings)
    emit_json(summary.as_dict()) if as_json else typer.echo(summary.text())


@app.command("remote-train", rich_help_panel=PANEL)
def remote_train(
    node: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_NODE", help="Training node as user@host[:port] (or use --nodes).")] = None,
    nodes: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_NODES", help="nodes.yaml path (or its YAML text): the pool; the reachable node "
                                      "with the most free GPU memory is used.")] = None,
    commit: Annotated[str, typer.Option(help="Commit to train (SHA, branch or tag of --project).")] = "HEAD",
    project: Annotated[str, typer.Option(
        "--project", "--repo", envvar="FLYWHEEL_PROJECT",
        help="The project's git checkout (a path) or git URL; a URL is fetched here, the node never sees it. "
             "The run is tagged flywheel.project with it.")] = ".",
    project_dir: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_PROJECT_DIR", help="Directory of the MLproject inside the repository, e.g. "
                                            "examples/fashion-mnist (default: the root).")] = None,
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
    tune: Annotated[bool, typer.Option(
        "--tune", help="Hyperparameter search: run the `tune` entry on every reachable node of --nodes (one worker "
                       "each, one study), then record the best trial and gate it here.")] = False,
    workers: Annotated[Optional[int], typer.Option(min=1, help="--tune: workers (nodes) to use; default all.")] = None,
    study: Annotated[Optional[str], typer.Option(help="--tune: study name (default MODEL-COMMIT).")] = None,
    tune_storage: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_TUNE_STORAGE", help="--tune: the study's storage every node reaches, e.g. "
                                             "postgresql+psycopg2://USER:PW@HOST:5432/optuna.")] = None,
    num_nodes: Annotated[int, typer.Option(
        min=1, help="One torchrun job across this many nodes of --nodes (c10d rendezvous on the first; "
                    "--nodes names the pool, --workers is --tune's).")] = 1,
    tracking_uri: TrackingOpt = None,
    model: ModelOpt = None,
    model_name: ModelNameAlias = None,
) -> None:
    """Train a commit on a GPU node over SSH with `mlflow run`; stream it and exit with its exit code."""
    from flywheel.training.dispatch.command import CommandOptions, run_command

    opts = CommandOptions(node=node, nodes=nodes, commit=commit, project=project, project_dir=project_dir, entry=entry, params=tuple(param or ()),
                          nproc_per_node=nproc_per_node, env_manager=env_manager, env_activate=env_activate,
                          workdir=workdir, attach=attach, cancel=cancel, identity=identity,
                          known_hosts=known_hosts, connect_timeout=connect_timeout,
                          reconnect_timeout=reconnect_timeout, plots_dir=plots_dir, tune=tune, workers=workers,
                          study=study, tune_storage=tune_storage, num_nodes=num_nodes)
    code = run_command(opts, settings_for(tracking_uri, model_of(model, model_name)), tracking_given=tracking_uri is not None)
    raise typer.Exit(code)


@app.command(rich_help_panel=PANEL)
def report(
    version: Annotated[Optional[str], typer.Option(help="Registry version (or alias) to report on.")] = None,
    run: Annotated[Optional[str], typer.Option(
        "--run", help="MLflow run to compare with the champion (a pull request's training).")] = None,
    commit: Annotated[Optional[str], typer.Option(
        help="Report on the newest finished run of this commit (SHA, or a branch/tag of the git checkout here).")
                      ] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Write report.md, comment.md (the PR comment), report.json and the PNG plots into this folder.")] = None,
    margin: Annotated[float, typer.Option(help="The gate's margin for the decision shown (--run/--commit).")] = 0.0,
    mlflow_url: Annotated[Optional[str], typer.Option(
        envvar="FLYWHEEL_MLFLOW_URL", help="MLflow UI base URL for links (default: the tracking URI if http).")
                          ] = None,
    plots_dir: Annotated[Optional[Path], typer.Option(help="Download the version's plots here.")] = None,
    tracking_uri: TrackingOpt = None,
    model: ModelOpt = None,
    model_name: ModelNameAlias = None,
    as_json: JsonOpt = False,
) -> None:
    """Markdown of a run or version against the champion: a CI job summary, or a pull request's full report.

    --version alone: the version's logged metrics vs prod's, also appended to a CI job summary. --run,
    --commit or --out: the full report (flywheel.training.report): metrics with deltas, the gate's
    decision (nothing is registered), per-class changes, confusion matrix and loss curves, data digests."""
    settings = settings_for(tracking_uri, model_of(model, model_name))
    if version is not None and run is None and commit is None and out is None:
        from flywheel.training.dispatch.report import report_version

        return typer.echo(report_version(settings, version, plots_dir, as_json=as_json), nl=as_json)
    from flywheel.training.report import render

    if version is not None:
        from flywheel.core.registry import Registry

        if run is not None or commit is not None:
            fail("name the run to report on with exactly one of --run, --commit or --version")
        run = Registry(settings).version(version).run_id
    done = render(settings, run_id=run, commit=commit, margin=margin, out=out, tracking_url=mlflow_url)
    if as_json:
        return emit_json(done.as_dict())
    typer.echo(done.markdown(embed_images=out is not None))
