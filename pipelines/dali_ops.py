"""The per-view pieces of the DALI BYOL pipeline: random draws, crop, colour, blur, solarize, normalize.

Every function here builds part of a DALI graph and must be called inside a
pipeline definition (one with `enable_conditionals=True` for `make_view`).
Images stay 8-bit HWC from the resized crop to the final normalize, as in
torchvision's uint8 path: each op rounds and saturates to [0, 255], which is
also the clamp torchvision applies after every colour op.

How each op relates to torchvision (tests/test_dali_pipeline.py measures it):

- Random resized crop: DALI's crop generator draws the area fraction uniformly
  and the aspect ratio as U(r) or 1/U(1/r) with equal odds (torchvision: log-
  uniform, a density within 4% of it on 3/4..4/3); both retry 10 times, then
  DALI falls back to the central square, torchvision to the central crop with
  the aspect clamped. The window is resampled with the spec's interpolation and
  antialiasing, like torchvision's `resized_crop(..., antialias=True)`.
- Flip: done last, in the normalize kernel, which is exact because every op
  before it commutes with a horizontal mirror (pixelwise ops, a global mean,
  a symmetric blur with symmetric borders).
- Colour jitter: contrast blends with the image's mean luma, as torchvision
  does; then ONE `fn.hsv` call scales the colour vector by the brightness
  factor (value), the chroma by the saturation factor and rotates the hue.
  DALI's hsv is a linear map that keeps luma (rotation and scaling about the
  gray axis in YIQ space), so brightness, saturation and hue in it commute with
  each other and with contrast: the fixed order (contrast, then the rest
  together) equals torchvision's random order except where an intermediate
  value clips at 0 or 255. Brightness, contrast and saturation then match
  torchvision's definitions to rounding. Hue does not: DALI rotates (I, Q) in
  YIQ space by `hue * 360` degrees (its matrix has 3-decimal NTSC rows and
  maps back with their exact inverse), torchvision shifts the HSV hexcone hue
  by `hue` turns. Both leave grays alone and turn colours by the same nominal
  angle, but per pixel they differ: on our saturated synthetic pictures by
  about 12 levels (of 255) on average at 0.05 turn and 21 at 0.1 turn, about
  as much as the shift itself moves a pixel. An exact hexcone shift would cost
  ~50 elementwise DALI ops per view; we keep DALI's native op (as DALI-based
  SSL code does) and say so.
- Grayscale: `fn.saturation(x, 0)`: BT.601 luma in all three channels, within
  1.5 levels of torchvision's (weights 0.2989/0.587/0.114) because of the
  inexact 3-decimal YIQ matrix.
- Gaussian blur, solarize, normalize: same definitions as torchvision (blur:
  reflect-101 borders, kernel `spec.blur_kernel_size`; solarize: invert values
  at or above the threshold, an exact 256-entry lookup table).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.data_node import DataNode

from pipelines.spec import AugmentationSpec, ViewSpec

INTERPOLATION = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}
"""The spec's interpolation names mapped to DALI's resampling filters."""

# DALI's hsv/saturation ops keep BT.601 luma; contrast uses the same weights so that
# its mean gray level is the one those ops preserve (what makes the jitter ops commute).
_BT601_LUMA = (0.299, 0.587, 0.114)
_DEGREES_PER_TURN = 360.0
_LEVELS = 256  # 8-bit images from the crop to the normalize


class ViewDraws(NamedTuple):
    """Per-sample random choices of one view (each a DataNode holding one scalar per sample, on the CPU).

    Drawn for every sample, outside any conditional branch, so a sample's draws
    do not depend on which branches other samples take, and so tests can read
    them as pipeline outputs (`debug_outputs=True`).
    """

    flip: DataNode
    """int32 0/1: mirror horizontally."""
    jitter: DataNode
    """bool: apply colour jitter."""
    brightness: DataNode
    """Brightness factor, U[1 - b, 1 + b]."""
    contrast: DataNode
    """Contrast factor, U[1 - c, 1 + c]."""
    saturation: DataNode
    """Saturation factor, U[1 - s, 1 + s]."""
    hue: DataNode
    """Hue rotation in degrees, 360 * U[-h, h]."""
    gray: DataNode
    """bool: convert to grayscale."""
    blur: DataNode
    """bool: apply the Gaussian blur."""
    sigma: DataNode
    """Blur standard deviation in output pixels, U(blur_sigma)."""
    solarize: DataNode
    """bool: solarize."""


def _uniform(low: float, high: float) -> DataNode:
    """U[low, high] per sample; a constant when the range is a single point (DALI's uniform needs low < high)."""
    if high > low:
        return fn.random.uniform(range=[low, high], dtype=types.FLOAT)
    return fn.constant(fdata=float(low), shape=[], dtype=types.FLOAT)


def _coin(probability: float, dtype: types.DALIDataType = types.BOOL) -> DataNode:
    return fn.random.coin_flip(probability=probability, dtype=dtype)


def draw_view(view: ViewSpec) -> ViewDraws:
    """All random choices of one view, per sample, from DALI's seeded random operators."""
    return ViewDraws(
        flip=_coin(view.flip_prob, types.INT32),  # crop_mirror_normalize's `mirror` takes integers
        jitter=_coin(view.color_jitter_prob),
        brightness=_uniform(1 - view.brightness, 1 + view.brightness),
        contrast=_uniform(1 - view.contrast, 1 + view.contrast),
        saturation=_uniform(1 - view.saturation, 1 + view.saturation),
        hue=_uniform(-view.hue * _DEGREES_PER_TURN, view.hue * _DEGREES_PER_TURN),
        gray=_coin(view.grayscale_prob),
        blur=_coin(view.blur_prob),
        sigma=_uniform(*view.blur_sigma),
        solarize=_coin(view.solarize_prob),
    )


def crop_window(image_shape: DataNode, view: ViewSpec) -> tuple[DataNode, DataNode]:
    """A random crop window (anchor, extent), each int32 (y, x) / (h, w), for images of shape HWC."""
    return fn.random_crop_generator(image_shape, random_area=list(view.crop_scale),
                                    random_aspect_ratio=list(view.crop_ratio))


def resize_window(images: DataNode, anchor: DataNode, extent: DataNode, size: int, interpolation: str) -> DataNode:
    """Resample the window [anchor, anchor + extent) of each image (y, x order) to size x size uint8, antialiased."""
    start = fn.cast(anchor, dtype=types.FLOAT)
    return fn.resize(images, roi_start=start, roi_end=start + fn.cast(extent, dtype=types.FLOAT), size=[size, size],
                     interp_type=INTERPOLATION[interpolation], antialias=True)


def adjust_contrast(images: DataNode, factor: DataNode | float) -> DataNode:
    """torchvision's contrast: factor * x + (1 - factor) * mean luma of the image, rounded and saturated to uint8.

    Written as arithmetic (not `fn.contrast`) because the blend centre is a
    per-image statistic: on the GPU it is GPU data, which DALI cannot pass as an
    operator argument, while arithmetic broadcasts it.
    """
    channel_means = fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT)
    mean_luma = fn.reductions.sum(channel_means * types.Constant(np.float32(_BT601_LUMA)))
    return fn.cast(images * factor + mean_luma * (1.0 - factor), dtype=types.UINT8)


def color_transform(images: DataNode, brightness: DataNode | float, saturation: DataNode | float,
                    hue_degrees: DataNode | float) -> DataNode:
    """Brightness (value) scaling, saturation scaling and hue rotation in one linear colour map (see module doc)."""
    return fn.hsv(images, value=brightness, saturation=saturation, hue=hue_degrees, dtype=types.UINT8)


def color_jitter(images: DataNode, draws: ViewDraws) -> DataNode:
    """Contrast, then brightness + saturation + hue: torchvision's four jitter ops up to clipping order."""
    return color_transform(adjust_contrast(images, draws.contrast), draws.brightness, draws.saturation, draws.hue)


def grayscale(images: DataNode) -> DataNode:
    """Luma replicated to three channels."""
    return fn.saturation(images, saturation=0.0)


def gaussian_blur(images: DataNode, sigma: DataNode | float, kernel_size: int) -> DataNode:
    """Separable Gaussian blur with a kernel_size-wide window and reflect-101 borders."""
    return fn.gaussian_blur(images, window_size=kernel_size, sigma=sigma)


def solarize(images: DataNode, threshold: float) -> DataNode:
    """Invert (255 - v) every value v with v / 255 >= threshold, through an exact lookup table."""
    levels = np.arange(_LEVELS)
    table = np.where(levels >= threshold * (_LEVELS - 1), (_LEVELS - 1) - levels, levels)
    return fn.lookup_table(images, keys=levels.tolist(), values=table.tolist(), dtype=types.UINT8)


def flip_and_normalize(images: DataNode, flip: DataNode | int, spec: AugmentationSpec,
                       dtype: types.DALIDataType) -> DataNode:
    """Mirror where `flip`, then (x / 255 - mean) / std per channel, as HWC in `dtype`, in one kernel."""
    scale = _LEVELS - 1
    return fn.crop_mirror_normalize(images, mirror=flip, mean=[m * scale for m in spec.mean],
                                    std=[s * scale for s in spec.std], dtype=dtype, output_layout="HWC")


def make_view(images: DataNode, image_shape: DataNode, view: ViewSpec, spec: AugmentationSpec,
              dtype: types.DALIDataType) -> tuple[DataNode, dict[str, DataNode]]:
    """One augmented view of decoded uint8 HWC `images` and the draws behind it.

    Steps follow ViewSpec's order; each probabilistic step runs as a DALI
    conditional, so only the samples that drew it pay for it. A step whose
    probability is 0 is left out of the graph. Returns (view, draws by name,
    including the crop window and the decoded shape).
    """
    draws = draw_view(view)
    anchor, extent = crop_window(image_shape, view)
    x = resize_window(images, anchor, extent, spec.image_size, spec.interpolation)
    if view.color_jitter_prob > 0:
        if draws.jitter:
            x = color_jitter(x, draws)
    if view.grayscale_prob > 0:
        if draws.gray:
            x = grayscale(x)
    if view.blur_prob > 0:
        if draws.blur:
            x = gaussian_blur(x, draws.sigma, spec.blur_kernel_size)
    if view.solarize_prob > 0:
        if draws.solarize:
            x = solarize(x, view.solarize_threshold)
    out = flip_and_normalize(x, draws.flip, spec, dtype)
    debug = dict(draws._asdict(), crop_anchor=anchor, crop_extent=extent, image_shape=image_shape)
    return out, debug
