"""Learning-rate and EMA schedules of the BYOL recipe.

Each schedule is a pure function of the step, computed on the host from the step
counter the trainer already has. The trainer stores the value into a 0-dim device
tensor with `tensor.fill_(value)`: a kernel launch with the value as its argument,
no host-device sync, and the same storage a captured CUDA graph reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass



def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the recipe: lr = base * batch / 256."""
    return base_lr * global_batch / 256


@dataclass(frozen=True)
class WarmupCosineLR:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine to 0 at `total_steps`."""

    peak_lr: float
    """The learning rate at the end of warm-up (already batch-scaled)."""
    total_steps: int
    """Steps of the whole run; the rate reaches 0 here."""
    warmup_steps: int
    """Steps of linear warm-up (10 epochs in the recipe)."""

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps={self.total_steps} must be positive")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]: "
                "shorten the warm-up or train longer"
            )
        if self.peak_lr < 0:
            raise ValueError(f"peak_lr={self.peak_lr} must be >= 0")

    def __call__(self, step: int) -> float:
        step = min(max(step, 0), self.total_steps)
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineTau:
    """tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2: from tau_base at 0 to 1 at K."""

    tau_base: float
    """The EMA coefficient at step 0 (0.996 for 1000 epochs, 0.99 for 300)."""
    total_steps: int
    """K, the steps of the whole run."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau_base <= 1.0:
            raise ValueError(f"tau_base={self.tau_base} must lie in [0, 1] (BYOL uses 0.996)")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps={self.total_steps} must be positive")

    def __call__(self, step: int) -> float:
        step = min(max(step, 0), self.total_steps)
        return 1.0 - (1.0 - self.tau_base) * (math.cos(math.pi * step / self.total_steps) + 1.0) / 2.0

