"""TorchServe-side code of Flywheel.

`handler.py` is copied into every .mar as the archive's handler. It imports only the standard
library, numpy, torch, onnxruntime, Pillow, TorchServe itself and the two serving-safe modules
shipped beside it (`preprocessing.py`, `capture.py`), never training code.
"""

from pathlib import Path

HANDLER_FILE = Path(__file__).with_name("handler.py")
