"""The torch backend's ops for pipelines.fidelity: pipelines/torch_aug.py, run in float32 (as in training) on the CPU.

The FFCV backend's colour stage is this one too (TorchTwoViewAugment.colour).
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.reference import JITTER_OPS, identity_jitter_values
from pipelines.spec import AugmentationSpec, ViewSpec
from pipelines.torch_aug import ViewParams, apply_view_params, resized_crop, sample_crop_boxes


def apply_op(op: str, images: np.ndarray, values: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    """One colour op through apply_view_params, every other step switched off (pipelines.fidelity)."""
    x = torch.from_numpy(images).float()
    n = x.shape[0]
    no, yes = torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    factors = torch.tensor(identity_jitter_values(spec.recipe)).repeat(n, 1)
    if op in JITTER_OPS:
        factors[:, JITTER_OPS.index(op)] = torch.from_numpy(values).float()
    params = ViewParams(flipped=no, jittered=yes if op in JITTER_OPS else no, jitter_factors=factors,
                        jitter_order=torch.arange(4).repeat(n, 1), grayscaled=yes if op == "grayscale" else no,
                        blurred=yes if op == "blur" else no,
                        # Finite sigmas for every op: an unselected blur still runs (compute-then-select).
                        sigmas=torch.from_numpy(values).float() if op == "blur" else torch.ones(n),
                        solarized=yes if op == "solarize" else no)
    out = apply_view_params(x, params, spec.blur_kernel_size, spec.view2.solarize_threshold, recipe=spec.recipe)
    return out.double().numpy()


def resize(images: np.ndarray, boxes: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    """uint8 [N, H, W, 3] crops resampled as the pipelines do (resized_crop, clipped to [0, 1])."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    out = resized_crop(x, torch.from_numpy(boxes), spec.image_size, spec.interpolation, spec.antialias)
    return out.clamp_(0, 1).double().numpy()


def crop_boxes(height: int, width: int, n: int, view: ViewSpec, spec: AugmentationSpec, seed: int) -> np.ndarray:
    """n boxes drawn by sample_crop_boxes for one height x width image."""
    generator = torch.Generator().manual_seed(seed)
    boxes = sample_crop_boxes(torch.full((n,), height), torch.full((n,), width), view, generator, spec.recipe)
    return boxes.to(torch.int64).numpy()
