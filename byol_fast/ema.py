"""The exponential moving average that makes BYOL's target network.

    target = tau * target + (1 - tau) * online

tau is a 0-dim tensor on the parameters' device (the tau schedule overwrites it
in place), so the update is three multi-tensor kernels, reads nothing back to
the host and is safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def ema_update_(target: list[Tensor], online: list[Tensor], tau: Tensor) -> None:
    """Moves each target tensor towards its online twin, in place.

    Written as `(target - online) * tau + online` because the single-tensor
    overloads of `_foreach_mul_` take a device scalar on their fast path, where
    `_foreach_lerp_` would read a 0-dim weight back to the host.
    """
    if len(target) != len(online):
        raise ValueError(f"EMA needs matching parameter lists, got {len(target)} target and {len(online)} online")
    torch._foreach_sub_(target, online)
    torch._foreach_mul_(target, tau)
    torch._foreach_add_(target, online)
