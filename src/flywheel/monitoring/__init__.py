"""The monitor node: the monitor service (`service`: windows of captured traffic → drift, accuracy,
MLflow, Prometheus), drift detectors (`drift`), retrain triggers (`triggers`) and labelled-data
snapshots (`snapshot`).

Imports only `flywheel.core`, `flywheel.contracts` and itself (tests/test_layout.py checks it).
"""
