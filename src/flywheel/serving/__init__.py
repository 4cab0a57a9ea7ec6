"""The serving node: the TorchServe handler, archives (`package`), releases (`release`), starting and
calling TorchServe (`torchserve`), its key renewal (`keys`), batch inference (`predict`) and the
`mlflow deployments -t flywheel` target over releases (`deployments`); Triton, the second engine:
model repository, server and client (`triton`), its authenticating proxy (`triton_proxy`) and its
Python-backend model (`triton_model`).

`handler.py` is copied into every .mar as the archive's handler, with the contracts it imports
(MAR_CONTRACTS, from flywheel/contracts/) beside it. It imports only the standard library, numpy,
torch, onnxruntime, Pillow, TorchServe itself and those contracts, never training code. The package
imports only `flywheel.core`, `flywheel.contracts` and itself; this file only the standard library
(the serving image imports `flywheel.serving.keys` with nothing else installed).

`triton_model.py` is copied into every Triton version folder as `model.py`, with TRITON_CONTRACTS
beside it, under the same rule (no flywheel, no torch: the Python backend's stub has neither).
"""

from pathlib import Path

HANDLER_FILE = Path(__file__).with_name("handler.py")
CONTRACTS_DIR = Path(__file__).resolve().parents[1] / "contracts"
MAR_CONTRACTS = ("preprocessing.py", "capture.py", "manifest.py")  # copied into every .mar beside handler.py
TRITON_CONTRACTS = ("preprocessing.py", "capture.py", "manifest.py")  # beside model.py in each Triton version
