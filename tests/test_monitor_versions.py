"""The monitor per version, from several replicas, with the accuracy alarm on feedback labels.

The integration test runs real TorchServe replicas (the real handler and capture writer) that all
serve two versions of one model (A/B at /predictions/M/V) into one capture store, and the real
`flywheel monitor --once` on it: each version has windows, MLflow run, metrics and window records
of its own, every served prediction is read exactly once, and feedback labels that are wrong for a
share of one version's predictions raise that version's accuracy alarm (and its retrain, when the
version is the alias's) while true labels raise none. The fast tests check the window contract's
new fields and the state of an older flywheel.
"""

from __future__ import annotations

import json

import pytest


def _record(**kw):
    from flywheel.contracts.window import WindowRecord

    values = dict(model="m", env="prod", version="3", monitor="abcd1234", index=1, first_ts=1000.0, last_ts=1005.0,
                  tested_at=1006.0, size=2, p_value=0.5, p_embedding=0.4, p_prediction=0.9, alpha=0.01, drift=False,
                  trigger=None, accuracy=0.5, labelled=2, prediction_ids=("p1", "p2"))
    return WindowRecord(**{**values, **kw})


def test_window_record_accuracy_fields_verify_and_older_records_read():
    from flywheel.contracts.window import WindowRecord

    alarmed = _record(reference_accuracy=0.9, p_accuracy=0.001, accuracy_alarm=True)
    assert WindowRecord.from_json(alarmed.to_json()) == alarmed
    older = json.loads(_record().to_json())
    for key in ("reference_accuracy", "p_accuracy", "accuracy_alarm"):
        del older[key]  # written before the accuracy alarm existed
    back = WindowRecord.from_json(json.dumps(older))
    assert back.p_accuracy is None and back.accuracy_alarm is False
    with pytest.raises(ValueError, match="accuracy_alarm=True but accuracy p-value 0.5 vs alpha 0.01"):
        _record(reference_accuracy=0.9, p_accuracy=0.5, accuracy_alarm=True).verify()
    with pytest.raises(ValueError, match="accuracy_alarm=True but accuracy p-value None"):
        _record(accuracy_alarm=True).verify()
    with pytest.raises(ValueError, match="reference_accuracy 1.5 is not a fraction"):
        _record(reference_accuracy=1.5).verify()
