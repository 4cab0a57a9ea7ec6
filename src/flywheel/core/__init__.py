"""What every node shares: settings, errors, the registry (`Registry(settings)`), datasets, models, evaluation, plots,
process plumbing and the MLflow run client (`runlog`).

Imports only `flywheel.core` and `flywheel.contracts` (tests/test_layout.py checks it), so each node
package can depend on it without pulling in another node's code.
"""
