"""byol_fast: the fastest practical BYOL pretraining trainer for PyTorch.

The public names below are imported on first use (PEP 562), not with the package: `byol-fast --help`
imports byol_fast.cli, and importing torch there would cost it 3-20 s.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "BYOL": "byol_fast.model", "TORCHVISION_ENCODERS": "byol_fast.model", "build_encoder": "byol_fast.model",
    "LARS": "byol_fast.lars", "AdamW": "byol_fast.adamw", "ema_update_": "byol_fast.ema",
    "CosineTau": "byol_fast.schedules", "WarmupCosineLR": "byol_fast.schedules", "scaled_lr": "byol_fast.schedules",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'byol_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
