"""The training node: the training run (`train`) and shipping a commit to a training node over SSH
(`dispatch`, `flywheel remote-train`).

Imports only `flywheel.core`, `flywheel.contracts` and itself (tests/test_layout.py checks it).
"""
