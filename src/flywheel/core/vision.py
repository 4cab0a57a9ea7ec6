"""torchvision import that works with the CUDA-only PyPI wheel on CPU boxes.

torchvision 0.28.0 on PyPI is a CUDA build: on a CPU-only torch its `_C.so` fails to load and
`import torchvision` then dies registering fake kernels for `torchvision::nms`. Defining the two
operator schemas first lets `torchvision.models` import; `torchvision.io`/`ops` stay unusable,
which is fine: Flywheel decodes with Pillow and never calls them. On a CUDA node `_C.so` loads
and nothing is patched.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path
from types import ModuleType

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


@lru_cache(maxsize=1)
def import_torchvision() -> ModuleType:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ImportError("torchvision is not installed: pip install --no-deps torchvision==0.28.0")
    lib = next(Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        if lib is None:
            raise OSError("no _C extension")
        ctypes.CDLL(str(lib))
    except OSError:
        import torch

        # Kept referenced by the lru_cache'd closure's module state: a dropped Library undoes DEF.
        global _fallback_lib
        _fallback_lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _fallback_lib.define(schema)
    import torchvision

    return torchvision


_fallback_lib = None
