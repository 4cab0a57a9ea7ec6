"""The tracking node: the MLflow tracking server with its database and artifact store (`server`, was
`stack`: `flywheel stack`) and its checks (`doctor`).

The training run's own MLflow client is `flywheel.core.runlog`, not this package. Imports only
`flywheel.core`, `flywheel.contracts` and itself (tests/test_layout.py checks it).
"""
