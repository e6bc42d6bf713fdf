"""byol_fast: the fastest practical BYOL pretraining trainer for PyTorch."""

from byol_fast.ema import ema_update_
from byol_fast.lars import LARS
from byol_fast.model import BYOL, TORCHVISION_ENCODERS, build_encoder
from byol_fast.schedules import CosineTau, WarmupCosineLR, scaled_lr

__all__ = [
    "BYOL", "LARS", "TORCHVISION_ENCODERS", "CosineTau", "WarmupCosineLR",
    "build_encoder", "ema_update_", "scaled_lr",
]
__version__ = "0.1.0"
