"""The per-view DALI pieces of the BYOL pipeline: the crop box draw and the resized crop.

Every function here builds part of a DALI graph and must be called inside a
pipeline definition. DALI decodes, draws each view's crop box and resamples
it; the colour half of each view (flip, jitter, grayscale, blur, solarize,
normalize) is the torch backend's `TorchTwoViewAugment.colour`, run by
pipelines/dali_pipeline.py on DALI's output on the same device, as the FFCV
backend does. So every op has one definition, and the colour stage costs a
few dozen batched kernels rather than hundreds of DALI operators (DALI runs
each arithmetic node as its own operator, ~20 us per batch on the CPU
whatever its size, and cannot fuse an expression tree).

How the pieces relate to pipelines/reference.py (pipelines/fidelity measures
both; "exact" means float32 rounding, under 0.01 of a level):

- Crop box: arithmetic on the decoded shape and U[0, 1) draws, box for box the
  reference's on the same draws. Official: one draw of area and log-uniform
  aspect, sides rounded and clamped to the image. Torchvision: ten such tries
  at once, the first whose box fits, else the central fallback with the aspect
  clamped. Sides round half up (the reference: half to even; a tie has
  probability ~0 with float draws). Both views' boxes come from one set of
  operators, each view with its own settings.
- Resize: one `fn.resize` of the box as a region of interest of the decoded
  image, with the reference's filter (Keys' cubic a = -0.5 or the triangle),
  antialiased only for torchvision. Inside the view within 0.1 of a level
  (DALI tabulates the cubic when enlarging); along its edge it follows the
  image rather than the box (GAPS in pipelines/fidelity says how far): where
  the filter reaches past the box DALI reads the neighbouring pixels (at the
  image's edge it repeats the last one), the reference drops those taps and
  renormalizes the rest. Dropping them in DALI takes a copy of every box
  padded with zeros and a coverage channel; that was built and measured (up
  to c6cb6c5) and cost about 40% of the CPU-mode throughput at 64 px, for the
  border pixels alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.data_node import DataNode

from pipelines.spec import AugmentationSpec, ViewSpec

INTERPOLATION = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}
"""The spec's interpolation names mapped to DALI's resampling filters."""
CROP_TRIES = {"official": 1, "torchvision": 10}
"""(area, aspect) draws per crop box: the official code takes one and clamps it; torchvision retries."""

_LEVELS = 255.0  # decoded images are 8-bit


def _unit(shape: Sequence[int] = ()) -> DataNode:
    """U[0, 1) per sample, of `shape`."""
    return fn.random.uniform(range=[0.0, 1.0], shape=list(shape), dtype=types.FLOAT)


# ---- crop and resize -----------------------------------------------------------------------------

def _select(mask: DataNode, if_true, if_false):
    """Elementwise `if_true` where mask, else `if_false` (both finite: a 0 * inf would be NaN)."""
    return if_false + mask * (if_true - if_false)


def _round(x: DataNode) -> DataNode:
    return dmath.floor(x + 0.5)


def crop_windows(image_shape: DataNode, views: Sequence[ViewSpec], recipe: str) -> tuple[DataNode, DataNode]:
    """Each view's random crop box of each HWC-shaped image, the recipe's way: (anchors, extents), int32
    [views, 2]: row v is view v's (y, x) anchor and (h, w) extent."""
    return crop_boxes(image_shape, _unit([len(views), CROP_TRIES[recipe], 4]), views, recipe)


def _per_view(values: Sequence[float]) -> DataNode:
    """One constant per view as a [views, 1] column, to broadcast over a view's tries."""
    return types.Constant(np.float32(values).reshape(-1, 1))


def crop_boxes(image_shape: DataNode, draws: DataNode, views: Sequence[ViewSpec],
               recipe: str) -> tuple[DataNode, DataNode]:
    """The boxes pipelines/reference.py's crop boxes make of the same U[0, 1) `draws`: per sample
    [views, tries, 4], each row (area, log aspect, top, left) of one try of one view. Returns (anchors (y, x),
    extents (h, w)), int32 [views, 2].

    Works on (y, x) pairs, all tries and all views at once rather than on scalars: every DALI operator
    costs ~50 us per batch on the CPU whatever its size, and one set of them for both views halves that.
    """
    scale_low, scale_high = (_per_view([view.crop_scale[i] for view in views]) for i in (0, 1))
    log_low, log_high = (_per_view([math.log(view.crop_ratio[i]) for view in views]) for i in (0, 1))
    shape = fn.cast(image_shape[0:2], dtype=types.FLOAT)
    area = shape[0] * shape[1] * (scale_low + (scale_high - scale_low) * draws[:, :, 0])  # [views, tries]
    aspect = dmath.exp(log_low + (log_high - log_low) * draws[:, :, 1])
    sides = _round(dmath.sqrt(fn.stack(area / aspect, area * aspect, axis=2)))  # [views, tries, (h, w)]
    fractions = draws[:, :, 2:4]
    if recipe == "official":  # one try, its sides clamped to the image
        sides = dmath.min(dmath.max(sides[:, 0], 1.0), shape)
        return _place(dmath.min(dmath.floor(fractions[:, 0] * (shape - sides + 1.0)), shape - sides), sides)
    # Torchvision: the first try whose sides fit, picked without a loop by a one-hot [views, tries, 1] weight.
    fits = fn.reductions.min(1.0 * (sides >= 1.0) * (sides <= shape), axes=[2])  # [views, tries]: 1 where both fit
    priority = fits * types.Constant(np.arange(CROP_TRIES[recipe], 0, -1, dtype=np.float32))  # earlier first
    best = fn.reductions.max(priority, axes=[1], keep_dims=True)  # [views, 1]
    first = fn.stack((priority == best) * fits, axis=2)  # all zero where no try fits
    found = best > 0
    # Fallback: the whole image with its aspect clamped to the range (the side that breaks it shrinks).
    ratio_low, ratio_high = (np.float32([view.crop_ratio[i] for view in views]) for i in (0, 1))
    whole = dmath.min(shape, _round(fn.stack(shape[1] / types.Constant(ratio_low),
                                             shape[0] * types.Constant(ratio_high), axis=1)))
    sides = _select(found, fn.reductions.sum(first * sides, axes=[1]), whole)
    chosen_fractions = fn.reductions.sum(first * fractions, axes=[1])
    offsets = _select(found, dmath.floor(chosen_fractions * (shape - sides + 1.0)),
                      dmath.floor((shape - sides) / 2.0))  # the fallback is central
    return _place(offsets, sides)


def _place(offsets: DataNode, sides: DataNode) -> tuple[DataNode, DataNode]:
    """(anchor, extent) as int32 from float (y, x) offsets and (h, w) sides, whole numbers already (the cast
    would round, not truncate)."""
    return fn.cast(offsets, dtype=types.INT32), fn.cast(sides, dtype=types.INT32)


def resized_crop(images: DataNode, anchor: DataNode, extent: DataNode, size: int, interpolation: str,
                 antialias: bool) -> DataNode:
    """Resample the box [anchor, anchor + extent) (y, x) of uint8 HWC `images` to size x size float32 in [0, 1]
    (clipped: the cubic overshoots). The filter's taps past the box read the image around it (module doc)."""
    start = fn.cast(anchor, dtype=types.FLOAT)
    resized = fn.resize(images, roi_start=start, roi_end=start + fn.cast(extent, dtype=types.FLOAT),
                        size=[size, size], interp_type=INTERPOLATION[interpolation], antialias=antialias,
                        dtype=types.FLOAT)
    return dmath.clamp(resized * (1.0 / _LEVELS), 0.0, 1.0)


def make_crops(images: DataNode, image_shape: DataNode,
               spec: AugmentationSpec) -> tuple[list[DataNode], list[dict[str, DataNode]]]:
    """Both views' resized crops of decoded uint8 HWC `images`: float32 HWC in [0, 1], spec.image_size square.

    Returns ([crop1, crop2], [draws1, draws2]), each draws {"crop_anchor",
    "crop_extent", "image_shape"}: the box drawn and the decoded shape it was
    drawn for, for tests.
    """
    anchors, extents = crop_windows(image_shape, spec.views, spec.recipe)
    crops, draws = [], []
    for v in range(len(spec.views)):
        anchor, extent = anchors[v], extents[v]
        crops.append(resized_crop(images, anchor, extent, spec.image_size, spec.interpolation, spec.antialias))
        draws.append({"crop_anchor": anchor, "crop_extent": extent, "image_shape": image_shape})
    return crops, draws
