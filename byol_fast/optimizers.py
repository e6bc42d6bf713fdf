"""The trainer's optimizers as a setting: LARS (the official BYOL recipe) or AdamW, and their lr scaling rules.

Both are fused (torch._foreach_*) and capture-safe (lr and step in 0-dim device
tensors), and both exempt the same parameters from weight decay
(byol_fast.exclusions; LARS also from trust scaling).

Learning rate: `base_lr` is the rate at batch 256, and each optimizer scales it to
the global batch by its own rule (`peak_lr`):

- lars: linear, lr = base_lr * batch / 256 (BYOL, Grill et al. 2020, as SGD/LARS
  recipes do).
- adamw: square root, lr = base_lr * sqrt(batch / 256): the rule under which Adam's
  training dynamics stay the same as the batch changes (Malladi et al. 2022, "On the
  SDEs and Scaling Rules for Adaptive Gradient Algorithms"); linear scaling makes Adam
  unstable at large batches. At batch 256 both rules give base_lr, so the small-data
  number of the popular PyTorch BYOL repositories (Adam at 3e-4, lucidrains/byol-pytorch)
  is base_lr = 3e-4. A recipe tuned with linear scaling at batch B carries over as
  base_lr = its lr at B / sqrt(B / 256): DINO's ViT-S/16 (5e-4 * 1024 / 256 = 2e-3 at
  batch 1024) is base_lr 1e-3; MAE's (1.5e-4 * 4096 / 256 = 2.4e-3 at 4096) is 6e-4.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from byol_fast.adamw import AdamW
from byol_fast.exclusions import exclusion_rule
from byol_fast.lars import LARS

OPTIMIZERS = ("lars", "adamw")
"""Optimizer names of TrainConfig.optimizer."""
LR_SCALING = {"lars": "linear: base_lr * batch / 256", "adamw": "square root: base_lr * sqrt(batch / 256)"}
"""Each optimizer's lr scaling rule, as words (module docstring)."""


def peak_lr(optimizer: str, base_lr: float, global_batch: int) -> float:
    """The peak learning rate of `optimizer` at `global_batch`, from the rate at batch 256 (module docstring)."""
    if optimizer == "lars":
        return base_lr * global_batch / 256
    if optimizer == "adamw":
        return base_lr * math.sqrt(global_batch / 256)
    raise ValueError(f"optimizer={optimizer!r} is not valid: use one of {', '.join(OPTIMIZERS)}")


def build_optimizer(optimizer: str, model: nn.Module, params: list[nn.Parameter], *, weight_decay: float,
                    momentum: float = 0.9, eta: float = 1e-3,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """`optimizer` over `params` (a BYOL learner's trainable_parameters()) with lr 0 (the schedule fills it).

    `model` names the parameters for the exclusions (byol_fast.exclusions.exclusion_rule);
    LARS reads momentum and eta, AdamW its betas.
    """
    exclude = exclusion_rule(model)
    if optimizer == "lars":
        return LARS(params, lr=0.0, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=exclude)
    if optimizer == "adamw":
        return AdamW(params, lr=0.0, betas=betas, weight_decay=weight_decay, exclude=exclude)
    raise ValueError(f"optimizer={optimizer!r} is not valid: use one of {', '.join(OPTIMIZERS)}")
