"""The closed loop end to end (`make demo` on a small dataset): real MLflow, TorchServe, monitor."""

from __future__ import annotations

import pytest

from flywheel.demo import run_demo

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_demo_loop_turns_on_digits(tmp_path):
    result = run_demo(work_dir=tmp_path / "demo", dataset="digits", epochs=4, batch_size=32, clean_samples=100,
                      labelled_samples=300, window=50)
    assert result["v1"] == "1" and result["v2"] == "2"
    assert result["failed_requests"] == 0  # zero downtime through both releases
    assert set(result["versions_served"]) == {"1", "2"}
    assert result["shifted_samples_to_trigger"] <= 300
    assert result["v2_shifted"] > result["v1_shifted"] + 0.1  # retraining on labelled captures learned the shift
    assert result["v2_clean"] >= result["v1_clean"] - 0.05
    steps = [s["name"] for s in result["steps"]]
    assert steps[0] == "tracking node" and steps[-1] == "release v2 → prod"
