"""The control node (CI, GitHub Actions): which release/train requests a newer one superseded, and
which retrain events were already handled (`dispatches`); what is registered, deployed and drifting
(`status`); where one served prediction came from (`trace`).

Imports only `flywheel.core`, `flywheel.contracts` and itself (tests/test_layout.py checks it).
"""
