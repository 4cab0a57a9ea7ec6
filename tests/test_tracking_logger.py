"""RunLogger's retry sizing, write-ahead journal and idempotent replay (no servers needed)."""

from __future__ import annotations

import json

import pytest

from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError
from flywheel.core.procs import free_port
from flywheel.core.runlog import RunLogger, configure_retries, replay_spool, retry_policy, retry_window

pytestmark = pytest.mark.usefixtures("forget_tracking_uri")


@pytest.mark.parametrize("outage", [20, 60, 300, 600])
def test_retry_policy_covers_the_outage_within_mlflows_limits(outage):
    retries, factor = retry_policy(outage)
    assert retries <= 10 and factor >= 1  # MLflow refuses more than 10 retries
    assert retry_window(retries, factor) >= outage


def test_explicit_mlflow_retry_settings_win(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    assert configure_retries(300) == retry_window(3, 2) == 0 + 4 + 8


def test_entries_are_journaled_and_kept_while_the_server_is_away(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        logger = RunLogger("0123456789abcdef", spool_dir=tmp_path)
        logger.log_params({"lr": 0.1})
        logger.log_metrics({"val_accuracy": 0.5}, step=0)  # does not raise: training goes on
        assert logger.pending == 2
        lines = [json.loads(x) for x in logger.spool_path.read_text().splitlines()]
        assert [sorted(k for k in e if k not in ("seq", "run_id")) for e in lines] == [["params"], ["metrics"]]
        with pytest.raises(FlywheelError, match=str(logger.spool_path)):
            logger.flush()
        assert logger.spool_path.exists()  # nothing is lost
    finally:
        mlflow.set_tracking_uri(None)


def test_replaying_a_journal_twice_stores_each_metric_once(tmp_path):
    import mlflow

    settings = Settings.from_env(work_dir=tmp_path).apply()
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("replay", artifact_location=tmp_path.as_uri())).info.run_id
    journal = tmp_path / "journal.jsonl"
    entries = [{"seq": 1, "run_id": run_id, "params": {"epochs": "2"}, "tags": {"dataset": "digits"}}]
    entries += [{"seq": 2 + s, "run_id": run_id, "metrics": [["val_accuracy", 0.5 + s / 10, 1_700_000_000_000 + s, s]]}
                for s in range(2)]
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert replay_spool(journal, settings) == 3
    assert replay_spool(journal, settings) == 3  # e.g. the first answer was lost: sent again
    history = client.get_metric_history(run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [0, 1]
    run = client.get_run(run_id)
    assert run.data.params == {"epochs": "2"} and run.data.tags["dataset"] == "digits"
