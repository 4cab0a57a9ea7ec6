"""The monitor node: the monitor service (`service`: windows of captured traffic, per served version →
drift, accuracy, MLflow, Prometheus), its metric families (`metrics`), drift detectors (`drift`), the
accuracy alarm on feedback labels (`accuracy`), retrain triggers (`triggers`) and labelled-data
snapshots (`snapshot`).

Imports only `flywheel.core`, `flywheel.contracts` and itself (tests/test_layout.py checks it).
"""
