"""Data for byol_fast: sources, two-view augmentation backends and tools.

Every training backend yields `(view1, view2)` batches that follow the data
contract in DESIGN.md: `(B, 3, S, S)`, channels_last, ImageNet-normalized, in the
training dtype, on the training device, with a static shape every step. Optional
backends (DALI, FFCV) are imported only by the modules that need them.
"""

from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, AugmentationSpec, ViewSpec

__all__ = ["AugmentationSpec", "ViewSpec", "IMAGENET_MEAN", "IMAGENET_STD"]
