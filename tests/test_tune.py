"""`flywheel tune`: Optuna studies in real storage, trials as real nested MLflow runs, the real gate.

* Two `flywheel tune` worker processes share one study in the tracking node's Postgres (the shared
  `tracking_stack`, a database of the test's own): trial numbers never repeat, every trial is a run
  nested under the study's one parent run, and the finalized study registers its best trial as
  `candidate` because it beats a (weak) champion.
* The embedded default (SQLite in $FLYWHEEL_HOME) end to end through the CLI: a trial the pruner
  stops ends KILLED and tagged pruned; the best trial does not beat a strong champion, so nothing
  is registered.
* remote-train --tune's decisions (which nodes, which parameters and environment), the search-space
  syntax and the MLproject adapter, on plain data.

Training is small-cnn on digits with a few hundred images and 1-2 epochs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from flywheel.core.errors import FlywheelError
from tests.conftest import VENV_BIN

DIGITS = ["--dataset", "digits", "--arch", "small-cnn", "--batch-size", "32"]


def _train_champion(settings, lr: float, epochs: int, max_train_samples: int | None):
    """A registered champion trained by the built-in trainer (the gate registers the first version)."""
    from flywheel.training.train import TrainConfig, run_training

    cfg = TrainConfig(dataset="digits", model="small-cnn", epochs=epochs, batch_size=32, lr=lr,
                      max_train_samples=max_train_samples)
    result = run_training(cfg, settings)
    assert result.registered_version == "1"
    return result


def _study_runs(client, experiment: str, study: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`flywheel.tune.study` = '{study}'", max_results=500)
    parents = [r for r in runs if r.data.tags.get("flywheel.tune.role") == "study"]
    trials = [r for r in runs if "flywheel.tune.trial" in r.data.tags]
    return parents, trials


def _json_at_end(text: str) -> dict:
    """The JSON document `--json` printed last (training prints its own lines before it)."""
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    raise AssertionError(f"no JSON document at the end of:\n{text[-3000:]}")


def _worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen([str(VENV_BIN / "flywheel"), "tune", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


@pytest.mark.integration
def test_two_workers_share_one_postgres_study_and_its_best_beats_the_champion(tracking_stack, tmp_path, monkeypatch,
                                                                               forget_tracking_uri):
    import optuna
    from mlflow import MlflowClient

    name = f"tune-pg-{secrets.token_hex(4)}"
    database = name.replace("-", "_")
    tracking_stack.pg.create_database(database)
    storage = tracking_stack.pg.uri(database)
    for key, value in {**tracking_stack.env(), "MLFLOW_EXPERIMENT_NAME": name, "FLYWHEEL_MODEL_NAME": name}.items():
        monkeypatch.setenv(key, value)
    settings = tracking_stack.settings(experiment=name, model_name=name, work_dir=tmp_path / "home").apply()
    weak = _train_champion(settings, lr=1e-5, epochs=1, max_train_samples=100)  # v1: about chance level

    study = f"{name}-study"
    args = ["--study", study, "--storage", storage, "--n-trials", "4", "--no-finalize", "--pruner", "none",
            "--param", "lr=log:3e-3:1e-2", "--param", "weight_decay=log:1e-5:1e-3", *DIGITS, "--epochs", "2",
            "--max-train-samples", "300"]
    workers = []
    for i in range(2):
        env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / f"worker{i}")}
        workers.append((_worker(args, env, tmp_path / f"worker{i}.log"), tmp_path / f"worker{i}.log"))
    for proc, log in workers:
        try:
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 0, f"worker failed:\n{log.read_text()[-4000:]}"

    found = optuna.load_study(study_name=study, storage=storage)
    trials = found.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(trials) >= 4 and sorted(numbers) == list(range(len(trials))), numbers  # no number twice
    assert {t.state.name for t in trials} == {"COMPLETE"}
    client = MlflowClient(tracking_uri=tracking_stack.uri)
    parents, runs = _study_runs(client, name, study)
    assert len(parents) == 1, "both workers must nest under one parent run"
    parent = parents[0].info.run_id
    assert found.user_attrs["mlflow_parent_run_id"] == parent
    assert len(runs) == len(trials)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert len({r.data.tags["flywheel.tune.worker"] for r in runs}) == 2  # both workers ran trials
    by_number = {int(r.data.tags["flywheel.tune.trial"]): r for r in runs}
    assert sorted(by_number) == sorted(numbers)
    for t in trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.info.status == "FINISHED" and run.data.tags["flywheel.tune.state"] == "complete"
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])  # the suggested value trained
        assert run.data.metrics["val_accuracy"] == pytest.approx(t.value)
        assert "gate.decision" not in run.data.tags  # trials are never gated one by one

    # Finalize once the workers are done (what remote-train --tune does after its workers).
    from typer.testing import CliRunner

    from flywheel.cli import app

    fin = ["tune", "--study", study, "--storage", storage, "--n-trials", "4", "--pruner", "none",
           "--param", "lr=log:3e-3:1e-2", "--param", "weight_decay=log:1e-5:1e-3", *DIGITS, "--json"]
    result = CliRunner().invoke(app, fin)
    assert result.exit_code == 0, result.output
    summary = _json_at_end(result.stdout)
    best = found.best_trial
    assert summary["best_trial"] == best.number and summary["best_run_id"] == best.user_attrs["mlflow_run_id"]
    gate = summary["gate"]
    assert gate["accepted"] and gate["champion_version"] == "1" and gate["registered_version"] == "2"
    assert gate["challenger_accuracy"] > gate["champion_accuracy"]
    mv = client.get_model_version_by_alias(name, "candidate")
    assert mv.version == "2" and mv.run_id == summary["best_run_id"] != weak.run_id

    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["flywheel.tune.best_run_id"] == summary["best_run_id"]
    assert float(parent_run.data.tags["flywheel.tune.best.lr"]) == pytest.approx(best.params["lr"])
    assert parent_run.data.metrics["best_value"] == pytest.approx(best.value)
    artifacts = {a.path for a in client.list_artifacts(parent, "tune")}
    assert {"tune/parallel_coordinates.png", "tune/param_importances.png", "tune/best_params.json"} <= artifacts

    # Finalizing again decides nothing new: no second registration of the same run.
    again = CliRunner().invoke(app, fin)
    assert again.exit_code == 0, again.output
    assert len(client.search_model_versions(f"name='{name}'")) == 2


@pytest.mark.integration
def test_embedded_tune_end_to_end_prunes_and_does_not_register_a_loser(tmp_path, monkeypatch):
    """SQLite study in $FLYWHEEL_HOME through the CLI; grid over two learning rates: the hopeless one
    is pruned after its first epoch, the other completes but loses to a strong champion."""
    from mlflow import MlflowClient

    from flywheel.core.config import Settings

    home = tmp_path / "home"
    name = f"tune-lite-{secrets.token_hex(4)}"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("FLYWHEEL_MODEL_NAME", name)
    settings = Settings.from_env().apply()
    strong = _train_champion(settings, lr=5e-3, epochs=3, max_train_samples=400)  # test accuracy ~0.95

    proc = subprocess.run([str(VENV_BIN / "flywheel"), "tune", "--study", "lite", "--n-trials", "2", "--sampler", "grid",
                           # val_accuracy after epoch 1: ~0.16 at lr 1e-5 (pruned), ~0.5 at 0.01 (test ~0.78)
                           "--param", "lr=cat:0.00001,0.01", "--pruner", "threshold:0.3", *DIGITS, "--epochs", "2",
                           "--max-train-samples", "300", "--json"],
                          env=dict(os.environ), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # --json: the training's own output went to stderr
    assert summary["trials"] == {"COMPLETE": 1, "PRUNED": 1}
    assert summary["best_params"] == {"lr": 0.01}
    assert summary["storage"] == f"sqlite:///{(home / 'optuna.db').resolve()}" and (home / "optuna.db").is_file()
    gate = summary["gate"]
    assert not gate["accepted"] and gate["registered_version"] is None and gate["champion_version"] == "1"
    assert gate["challenger_accuracy"] < gate["champion_accuracy"]

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert client.get_model_version_by_alias(name, "candidate").run_id == strong.run_id
    parents, runs = _study_runs(client, settings.experiment, "lite")
    assert len(parents) == 1 and len(runs) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    state = {float(r.data.params["lr"]): r for r in runs}
    pruned, complete = state[0.00001], state[0.01]
    assert pruned.info.status == "KILLED" and pruned.data.tags["flywheel.tune.state"] == "pruned"
    assert "test_accuracy" not in pruned.data.metrics  # stopped after its first epoch: no test, no model
    assert complete.info.status == "FINISHED" and complete.data.tags["flywheel.tune.state"] == "complete"
    assert complete.data.tags["gate.decision"] == "rejected" and complete.data.tags["flywheel.tune.best"] == "true"
    assert parents[0].data.tags["gate.decision"] == "rejected"


@pytest.mark.integration
def test_tune_drives_a_components_own_train_entry_point(tmp_path, monkeypatch):
    """examples/shapes-rgb, unchanged: each trial runs its train.py main() with the suggested
    --lr/--batch-size (its own options after --), as a nested run of the component's network."""
    from mlflow import MlflowClient

    from flywheel.core.config import Settings
    from tests.conftest import REPO

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    settings = Settings.from_env()
    proc = subprocess.run([str(VENV_BIN / "flywheel"), "tune", "--component", str(REPO / "examples" / "shapes-rgb"),
                           "--study", "shapes", "--n-trials", "2", "--sampler", "grid", "--pruner", "none",
                           "--param", "lr=cat:0.003,0.01", "--param", "batch_size=cat:16", "--epochs", "1",
                           "--max-train-samples", "160", "--no-register", "--json", "--", "--n", "400", "--test-n", "48",
                           "--data-dir", str(tmp_path / "shapes")],
                          env=dict(os.environ), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["trials"] == {"COMPLETE": 2} and summary["gate"] is None
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    parents, runs = _study_runs(client, settings.experiment, "shapes")
    assert len(parents) == 1 and len(runs) == 2
    assert {float(r.data.params["lr"]) for r in runs} == {0.003, 0.01}
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.params["batch_size"] == "16" and run.data.params["epochs"] == "1"  # suggested, then fixed
        assert run.data.tags["dataset"] == "shapes-rgb" and run.info.status == "FINISHED"
        assert "gate.decision" not in run.data.tags  # --no-register: the search gates nothing
    assert (tmp_path / "shapes" / "train").is_dir()  # the component generated its own data where told


# ----------------------------------------------------------------------------------- plain data
def test_search_space_syntax(tmp_path):
    from flywheel.training.tune import ParamSpec, TuneConfig, parse_space

    assert ParamSpec.parse("lr=log:1e-4:1e-2") == ParamSpec("lr", "log", 1e-4, 1e-2)
    assert ParamSpec.parse("epochs=int:1:4") == ParamSpec("epochs", "int", 1, 4)
    assert ParamSpec.parse("batch_size=cat:32,64").choices == (32, 64)
    assert ParamSpec.parse("opt=cat:adam,sgd").choices == ("adam", "sgd")
    for bad in ("lr", "lr=log:0:1", "lr=uniform:1:2", "lr=float:2:1", "x=cat:", "1x=float:0:1"):
        with pytest.raises(FlywheelError):
            ParamSpec.parse(bad)
    space_file = tmp_path / "space.yaml"
    space_file.write_text("lr: log:1e-4:1e-2\nbatch_size: cat:64,128\n")
    from_file = parse_space(("lr=float:0.001:0.002",), str(space_file))  # --param wins over --space
    assert {p.name: p.kind for p in from_file} == {"lr": "float", "batch_size": "cat"}
    assert [p.name for p in parse_space((), "lr=log:1e-4:1e-2 epochs=int:1:3")] == ["lr", "epochs"]
    assert [p.name for p in parse_space()] == ["lr", "weight_decay", "batch_size"]  # the default space
    with pytest.raises(FlywheelError, match="grid"):
        TuneConfig(study="s", sampler="grid", space=parse_space(("lr=log:1e-4:1e-2",)))
    with pytest.raises(FlywheelError, match="pruner"):
        TuneConfig(study="s", pruner="median:x")


def test_a_storage_url_sqlalchemy_cannot_open_is_one_line_at_once():
    from flywheel.training.tune import open_storage

    for url, why in (("bogus://x", "Can't load plugin"), ("nonsense", "Could not parse")):
        with pytest.raises(FlywheelError, match=rf"^study storage {url} is not a database URL .*{why}.*"
                                                r"use sqlite:///PATH or postgresql://") as err:
            open_storage(url)  # no retries: the create-tables race is the only error worth retrying
        assert "\n" not in str(err.value)


def test_component_trials_get_the_shared_options_then_the_suggested_values(tmp_path):
    from flywheel.training.train import TrainConfig
    from flywheel.training.tune import BuiltinTarget, ComponentTarget, ParamSpec, make_target

    target = make_target(tmp_path, TrainConfig(), {"epochs": 2, "lr": None}, ("--data-dir", "x"))
    assert isinstance(target, ComponentTarget)
    assert target.argv({"lr": 0.01, "batch_size": 64}) == [
        "--epochs", "2", "--data-dir", "x", "--register", "false", "--lr", "0.01", "--batch-size", "64"]
    builtin = make_target(None, TrainConfig(dataset="digits"), {"epochs": 2, "max_train_samples": None})
    assert isinstance(builtin, BuiltinTarget) and builtin.cfg.epochs == 2 and builtin.cfg.dataset == "digits"
    with pytest.raises(FlywheelError, match="no parameter"):
        builtin.check((ParamSpec.parse("momentum=float:0:1"),))
    with pytest.raises(FlywheelError, match="after --"):
        make_target(None, TrainConfig(), {}, ("--data-dir", "x"))
    with pytest.raises(FlywheelError, match="no train.py"):
        ComponentTarget(tmp_path).check(())


def test_root_project_tune_delegates_to_the_reference_component():
    from flywheel.cli.project import delegate_tune, translate

    raw = ["tune", "--study", "''", "--n-trials", "4.0", "--finalize", "false", "--register", "true",
           "--dataset", "fashion-mnist", "--arch", "''", "--epochs", "2", "--max-train-samples", "0",
           "--seed", "0.0", "--data-dir", "/data"]
    assert delegate_tune(translate(raw)) == [
        "tune", "--component", "examples/fashion-mnist", "--n-trials", "4", "--no-finalize", "--register",
        "--epochs", "2", "--seed", "0", "--", "--data-dir", "/data"]
    builtin = ["tune", "--dataset", "digits", "--arch", "small-cnn", "--n-trials", "3"]
    assert delegate_tune(translate(builtin)) == builtin
    # A component's own tune entry passes its arguments after `--` untouched.
    assert translate(["tune", "--component", ".", "--epochs", "5.0", "--", "--data-dir", "''"]) == [
        "tune", "--component", ".", "--epochs", "5", "--", "--data-dir", "''"]


def _nodes():
    from flywheel.training.dispatch.nodes import Node, NodeProbe

    a, b, c = (Node(host=h, user="u", name=h) for h in ("a", "b", "c"))
    probes = [NodeProbe(a, free_gpu_mib=(1000,)), NodeProbe(b, error="unreachable"), NodeProbe(c, free_gpu_mib=(8000,))]
    return [a, b, c], probes


def test_remote_tune_plans_one_worker_per_reachable_node_on_one_study():
    from flywheel.training.dispatch.job import RemoteTrainConfig
    from flywheel.training.dispatch.tune import plan_tune

    sha = "ab" * 20
    pg = "postgresql+psycopg2://u:pw@tracking:5432/optuna"
    base = RemoteTrainConfig(commit=sha, params=(("n_trials", "20"), ("dataset", "digits"), ("margin", "0.01")))
    nodes, probes = _nodes()
    plan = plan_tune(base, nodes, probes, storage=pg, model_name="m")
    assert [n.host for n, _ in plan.jobs] == ["c", "a"]  # reachable ones, most free GPU memory first
    assert plan.study == f"m-{sha[:12]}" and plan.register and plan.margin == 0.01
    for _, cfg in plan.jobs:
        assert cfg.entry == "tune" and cfg.commit == sha
        assert dict(cfg.params) == {"n_trials": "20", "dataset": "digits", "margin": "0.01",
                                    "study": plan.study, "finalize": "false"}
        assert dict(cfg.env) == {"FLYWHEEL_TUNE_STORAGE": pg}  # the secret URL: env file, not -P
    one = plan_tune(base, nodes, probes, storage=pg, model_name="m", workers=1, study="s1")
    assert [n.host for n, _ in one.jobs] == ["c"] and one.study == "s1"
    given = plan_tune(RemoteTrainConfig(commit=sha, params=(("study", "mine"), ("register", "false"))),
                      nodes[:1], None, storage=pg, model_name="m")
    assert given.study == "mine" and not given.register and len(given.jobs) == 1

    with pytest.raises(FlywheelError, match="storage"):
        plan_tune(base, nodes, probes, storage=None, model_name="m")
    with pytest.raises(FlywheelError, match="SQLite"):
        plan_tune(base, nodes, probes, storage="sqlite:///x.db", model_name="m")
    with pytest.raises(FlywheelError, match="only 2"):
        plan_tune(base, nodes, probes, storage=pg, model_name="m", workers=3)
    from flywheel.training.dispatch.nodes import NodeProbe

    with pytest.raises(FlywheelError, match="already running"):
        plan_tune(base, nodes, [*probes[:2], NodeProbe(nodes[2], free_gpu_mib=(1,), busy=True)], storage=pg,
                  model_name="m")


def test_remote_job_environment_carries_the_storage_url_not_the_command_line():
    """The storage URL (a database password) reaches the node in the 0600 env file only."""
    from flywheel.core.config import Settings
    from flywheel.training.dispatch.job import RemoteTrainConfig, job_env, mlflow_command
    from flywheel.training.dispatch.tune import plan_tune

    pg = "postgresql+psycopg2://u:s3cret@tracking:5432/optuna"
    nodes, _ = _nodes()
    plan = plan_tune(RemoteTrainConfig(commit="cd" * 20), nodes[:1], None, storage=pg, model_name="m")
    node, cfg = plan.jobs[0]
    command = mlflow_command(node, cfg)
    assert "s3cret" not in command and "-e tune" in command and "study=m-cdcdcdcdcdcd" in command
    env = job_env(Settings.from_env(tracking_uri="http://tracking:5000", model_name="m"), node, cfg)
    assert env["FLYWHEEL_TUNE_STORAGE"] == pg and env["FLYWHEEL_GIT_COMMIT"] == "cd" * 20


@pytest.mark.parametrize("project", [".", "examples/fashion-mnist", "template"])
def test_mlproject_tune_entries_reach_the_tune_command_with_valid_options(project, tmp_path):
    """Each MLproject's `tune` command, as MLflow renders it, goes through the adapter and parses as
    `flywheel tune` options (the component's own arguments after --)."""
    import shlex

    import typer
    from mlflow.projects import _project_spec

    from flywheel.cli import app
    from flywheel.cli.project import delegate_tune, translate
    from tests.conftest import REPO

    if project == "template":
        from flywheel.training.scaffold import ScaffoldConfig, scaffold

        directory = tmp_path / "comp"
        scaffold(ScaffoldConfig(name="comp", target=directory))
    else:
        directory = REPO / project
    entry = _project_spec.load_project(str(directory)).get_entry_point("tune")
    command = entry.compute_command({"n_trials": "3", "space": "lr=log:1e-4:1e-2 batch_size=cat:32,64"},
                                    storage_dir=None)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "flywheel.cli.project"] and argv[3] == "tune"
    args = delegate_tune(translate(argv[3:]))
    assert "--component" in args and args[args.index("--component") + 1] in ("examples/fashion-mnist", ".")
    root = typer.main.get_command(app)
    tune = root.get_command(root.make_context("flywheel", ["tune", "--help"], resilient_parsing=True), "tune")
    ctx = tune.make_context("tune", args[1:])
    assert ctx.params["n_trials"] == 3 and ctx.params["space"] == "lr=log:1e-4:1e-2 batch_size=cat:32,64"
    assert ctx.params["finalize"] and ctx.params["register"]
    if project != ".":  # a component's own options, after --; the root passes only non-empty ones
        assert ctx.args[-2:] == ["--data-dir", ""]


def test_remote_train_tune_refuses_attach_and_cancel():
    from typer.testing import CliRunner

    from flywheel.cli import app

    for extra in (["--attach", "abcdef1"], ["--cancel", "abcdef1"]):
        result = CliRunner().invoke(app, ["remote-train", "--node", "u@h", "--tune", *extra])
        assert result.exit_code == 2 and "--tune starts a search" in result.output, result.output
