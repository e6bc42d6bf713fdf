"""The FFCV backend's ops for pipelines.fidelity: the numba crop draw and resampling TwoViewCropDecoder runs.

Its colour stage is the torch backend's (FfcvTwoViewLoader hands the uint8
crops to TorchTwoViewAugment.colour), so apply_op is torch_backend's.
"""

from __future__ import annotations

import numpy as np

from pipelines.ffcv_ops import resized_crop_into, sample_crop_box
from pipelines.fidelity.torch_backend import apply_op
from pipelines.spec import AugmentationSpec, ViewSpec

__all__ = ["apply_op", "crop_boxes", "resize"]


def resize(images: np.ndarray, boxes: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    """uint8 [N, H, W, 3] crops resampled by resized_crop_into into uint8 views, as float64 [N, 3, S, S]."""
    size = spec.image_size
    views = np.empty((len(images), size, size, 3), np.uint8)
    for image, (top, left, height, width), view in zip(images, boxes, views):
        resized_crop_into(np.ascontiguousarray(image), int(top), int(left), int(height), int(width), view,
                          spec.interpolation == "bicubic", spec.antialias)
    return views.transpose(0, 3, 1, 2) / 255.0


def crop_boxes(height: int, width: int, n: int, view: ViewSpec, spec: AugmentationSpec, seed: int) -> np.ndarray:
    """n boxes sample_crop_box draws for one height x width image: samples 0..n-1 of epoch 0, view 0."""
    official = spec.recipe == "official"
    return np.array([sample_crop_box(height, width, *view.crop_scale, *view.crop_ratio, official, seed, 0, sample, 0)
                     for sample in range(n)], dtype=np.int64)
