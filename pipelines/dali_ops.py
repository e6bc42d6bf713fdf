"""The per-view pieces of the DALI BYOL pipeline: random draws, crop, colour, blur, solarize, normalize.

Every function here builds part of a DALI graph and must be called inside a
pipeline definition (one with `enable_conditionals=True` for `make_view` and
`color_jitter`). Both recipes of pipelines/spec.py are built from DALI
operators and arithmetic expressions; pipelines/fidelity (the "dali" backend)
measures every op against pipelines/reference.py on the same draws, and
tests/test_dali_pipeline.py bounds the numbers. From the resized crop on,
images are float32 HWC in [0, 1] (no rounding to 8 bits between ops) until
the final normalize.

How each op relates to the reference (same definitions in both recipes unless
a recipe is named; "exact" means float32 rounding, under 0.01 of a level):

- Crop box: arithmetic on the decoded shape and U[0, 1) draws, box for box the
  reference's on the same draws. Official: one draw of area and log-uniform
  aspect, sides rounded and clamped to the image. Torchvision: ten such tries
  at once, the first whose box fits, else the central fallback with the aspect
  clamped. Sides round half up (the reference: half to even; a tie has
  probability ~0 with float draws).
- Resize: the box is cut out (`fn.slice`) and resampled by `fn.resize`, whose
  cubic is Keys' a = -0.5 as the reference's, antialiased only for
  torchvision; a coverage channel makes it drop the taps outside the box as
  the reference does (resized_crop says how). Within 0.1 of a level (DALI
  tabulates the cubic when enlarging).
- Flip: done last, in the normalize kernel, which is exact because every op
  before it commutes with a horizontal mirror (pixelwise ops, per-image means,
  a symmetric blur with symmetric borders).
- Colour jitter: the four ops in a random order per sample (one of the 24
  orders, drawn uniformly), each a DALI conditional so a sample runs each op
  once; each op clips to [0, 1]. Official: brightness adds a delta, contrast
  scales each channel about its own mean, saturation scales the HSV saturation
  (clipped to 1) via the identity c' = v + min(f, v / (v - min)) (c - v) per
  channel c (v the max channel: the hue and value stay), hue shifts the HSV
  hue mod 1 (TF's RGB -> HSV sectors, then the hexcone formula back).
  Torchvision: brightness multiplies, contrast blends with the mean gray
  level, saturation with the grayscale image, hue as official. All exact.
- Grayscale: 0.2989 R + 0.587 G + 0.114 B in float (`fn.coord_transform`),
  exact.
- Gaussian blur: separable, exp(-x^2 / 2 sigma^2) taps over spec.blur_kernel_size
  normalized per sample, as two `fn.filter` passes; borders padded with zeros
  (official) or reflected without repeating the edge (torchvision). Exact.
- Solarize: values at or above the threshold become 1 - v. Exact.

Cost: each arithmetic node is a DALI operator, and each jitter op appears in
each of the four order slots, so the exact float ops cost more than the old
8-bit fixed-order jitter (one `fn.hsv`). In DALI's CPU mode (benchmarks.pipeline_bench,
2 threads) that is 2.6x fewer images/s at 64 px, batch 8, where the ~20 us per
operator dominates, and 25% fewer at 224 px, batch 16.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.data_node import DataNode

from pipelines import reference
from pipelines.spec import AugmentationSpec, ViewSpec

INTERPOLATION = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}
"""The spec's interpolation names mapped to DALI's resampling filters."""
JITTER_ORDERS = np.array(list(itertools.permutations(range(len(reference.JITTER_OPS)))), dtype=np.int32)
"""[24, 4]: every order of the jitter op ids (reference.JITTER_OPS numbers them); a sample draws one row."""
CROP_TRIES = {"official": 1, "torchvision": 10}
"""(area, aspect) draws per crop box: the official code takes one and clamps it; torchvision retries."""

_LEVELS = 255.0  # decoded images are 8-bit
_TINY = 1e-12  # divides safely where a pixel is gray: the numerator (a channel difference) is 0 there anyway
# HSV -> RGB per channel n (R 5, G 3, B 1): v - C clamp(min(k, 4 - k), 0, 1) with k = (n + 6 hue) mod 6.
_HEXCONE_OFFSETS = np.float32([5, 3, 1])

Image = DataNode
"""float32 HWC images in [0, 1], one per sample."""
Value = DataNode | float
"""One scalar per sample (a DataNode on the CPU) or one for the whole batch."""


class ViewDraws(NamedTuple):
    """Per-sample random choices of one view (DataNodes on the CPU, one per sample).

    Drawn for every sample, outside any conditional branch, so a sample's draws
    do not depend on which branches other samples take, and so tests can read
    them as pipeline outputs (`debug_outputs=True`).
    """

    flip: DataNode
    """int32 0/1: mirror horizontally."""
    jitter: DataNode
    """bool: apply colour jitter."""
    brightness: DataNode
    """Brightness delta U[-b, b] (official) or factor U[1 - b, 1 + b] (torchvision)."""
    contrast: DataNode
    """Contrast factor, U[1 - c, 1 + c]."""
    saturation: DataNode
    """Saturation factor, U[1 - s, 1 + s]."""
    hue: DataNode
    """Hue shift in turns, U[-h, h]."""
    jitter_order: DataNode
    """int32 [4]: the jitter op ids in the order this sample applies them (a row of JITTER_ORDERS)."""
    gray: DataNode
    """bool: convert to grayscale."""
    blur: DataNode
    """bool: apply the Gaussian blur."""
    sigma: DataNode
    """Blur standard deviation in output pixels, U(blur_sigma)."""
    solarize: DataNode
    """bool: solarize."""


def _unit(shape: Sequence[int] = ()) -> DataNode:
    """U[0, 1) per sample, of `shape`."""
    return fn.random.uniform(range=[0.0, 1.0], shape=list(shape), dtype=types.FLOAT)


def _coin(probability: float, dtype: types.DALIDataType = types.BOOL) -> DataNode:
    return fn.random.coin_flip(probability=probability, dtype=dtype)


def draw_view(view: ViewSpec, recipe: str) -> ViewDraws:
    """All random choices of one view except the crop, per sample, from DALI's seeded random operators."""
    # reference.jitter_values maps U[0, 1) draws to the recipe's values: its ends at u = 0 and u = 1.
    low = reference.jitter_values(np.zeros(4), view, recipe)
    high = reference.jitter_values(np.ones(4), view, recipe)
    brightness, contrast, saturation, hue = (float(lo) + float(hi - lo) * _unit() for lo, hi in zip(low, high))
    sigma_low, sigma_high = view.blur_sigma
    return ViewDraws(
        flip=_coin(view.flip_prob, types.INT32),  # crop_mirror_normalize's `mirror` takes integers
        jitter=_coin(view.color_jitter_prob),
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
        jitter_order=types.Constant(JITTER_ORDERS)[fn.random.choice(len(JITTER_ORDERS))],
        gray=_coin(view.grayscale_prob),
        blur=_coin(view.blur_prob),
        sigma=sigma_low + (sigma_high - sigma_low) * _unit(),
        solarize=_coin(view.solarize_prob),
    )


# ---- crop and resize -----------------------------------------------------------------------------

def _select(mask: DataNode, if_true, if_false):
    """Elementwise `if_true` where mask, else `if_false` (both finite: a 0 * inf would be NaN)."""
    return if_false + mask * (if_true - if_false)


def _round(x: DataNode) -> DataNode:
    return dmath.floor(x + 0.5)


def crop_window(image_shape: DataNode, view: ViewSpec, recipe: str) -> tuple[DataNode, DataNode]:
    """The recipe's random crop box of each HWC-shaped image: (anchor (y, x), extent (h, w)), int32."""
    return crop_box(image_shape, _unit([CROP_TRIES[recipe], 4]), view, recipe)


def crop_box(image_shape: DataNode, draws: DataNode, view: ViewSpec, recipe: str) -> tuple[DataNode, DataNode]:
    """The box pipelines/reference.py's crop boxes make of the same U[0, 1) `draws`: per sample [tries, 4],
    each row (area, log aspect, top, left) of one try. Returns (anchor (y, x), extent (h, w)), int32.

    Works on (y, x) pairs and all tries at once rather than on scalars: every
    DALI operator costs ~20 us per batch on the CPU, whatever its size.
    """
    (scale_low, scale_high), (ratio_low, ratio_high) = view.crop_scale, view.crop_ratio
    log_low, log_high = math.log(ratio_low), math.log(ratio_high)
    shape = fn.cast(image_shape[0:2], dtype=types.FLOAT)
    area = shape[0] * shape[1] * (scale_low + (scale_high - scale_low) * draws[:, 0])
    aspect = dmath.exp(log_low + (log_high - log_low) * draws[:, 1])
    sides = _round(dmath.sqrt(fn.stack(area / aspect, area * aspect, axis=1)))  # [tries, (h, w)]
    fractions = draws[:, 2:4]
    if recipe == "official":  # one try, its sides clamped to the image
        sides = dmath.min(dmath.max(sides[0], 1.0), shape)
        return _place(dmath.min(dmath.floor(fractions[0] * (shape - sides + 1.0)), shape - sides), sides)
    # Torchvision: the first try whose sides fit, picked without a loop by a one-hot [tries, 1] weight.
    fits = fn.reductions.min(1.0 * (sides >= 1.0) * (sides <= shape), axes=[1])  # [tries]: 1 where both fit
    priority = fits * types.Constant(np.arange(CROP_TRIES[recipe], 0, -1, dtype=np.float32))  # earlier first
    best = fn.reductions.max(priority)
    first = fn.stack((priority == best) * fits, axis=1)  # all zero when no try fits
    found = best > 0
    # Fallback: the whole image with its aspect clamped to the range (the side that breaks it shrinks).
    whole = dmath.min(shape, _round(fn.stack(shape[1] / ratio_low, shape[0] * ratio_high)))
    sides = _select(found, fn.reductions.sum(first * sides, axes=[0]), whole)
    chosen_fractions = fn.reductions.sum(first * fractions, axes=[0])
    offsets = _select(found, dmath.floor(chosen_fractions * (shape - sides + 1.0)),
                      dmath.floor((shape - sides) / 2.0))  # the fallback is central
    return _place(offsets, sides)


def _place(offsets: DataNode, sides: DataNode) -> tuple[DataNode, DataNode]:
    """(anchor, extent) as int32 from float (y, x) offsets and (h, w) sides, whole numbers already (the cast
    would round, not truncate)."""
    return fn.cast(offsets, dtype=types.INT32), fn.cast(sides, dtype=types.INT32)


def resized_crop(images: DataNode, anchor: DataNode, extent: DataNode, size: int, interpolation: str,
                 antialias: bool) -> Image:
    """Resample the box [anchor, anchor + extent) (y, x) of uint8 HWC `images` to size x size float32 in [0, 1]
    (clipped: the cubic overshoots), dropping the filter taps that fall outside the box and renormalizing the
    rest, as the reference (TF, PIL) does.

    DALI's resampler instead repeats the edge pixel (a few levels off along the view's border), so the box
    travels with a coverage channel: cut it out with a fourth channel of 255s (the channel axis read out of
    bounds, filled), pad it with zeros beyond the filter's reach, resample the box as a region of interest,
    and divide the colours by the resampled coverage, which is the sum of the taps that hit the box.
    """
    with_coverage = (fn.cat(anchor, types.Constant(np.int32([0]))), fn.cat(extent, types.Constant(np.int32([4]))))
    box = fn.slice(images, *with_coverage, axes=[0, 1, 2], out_of_bounds_policy="pad", fill_values=[0, 0, 0, _LEVELS])
    sides = fn.cast(extent, dtype=types.FLOAT)
    # The cubic reaches 2 input pixels, times the shrink factor when antialiased (a wider margin costs little).
    margin = dmath.ceil(2.0 * dmath.max(sides / float(size), 1.0)) + 1.0
    padded = fn.slice(box, fn.cast(-margin, dtype=types.INT32), fn.cast(sides + 2.0 * margin, dtype=types.INT32),
                      axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
    resized = fn.resize(padded, roi_start=margin, roi_end=margin + sides, size=[size, size],
                        interp_type=INTERPOLATION[interpolation], antialias=antialias, dtype=types.FLOAT)
    return dmath.clamp(resized[:, :, 0:3] / resized[:, :, 3:4], 0.0, 1.0)


# ---- colour --------------------------------------------------------------------------------------

def _clip(images: Image) -> Image:
    return dmath.clamp(images, 0.0, 1.0)


def _luma(images: Image, channels: int = 1) -> Image:
    """0.2989 R + 0.587 G + 0.114 B in `channels` channels."""
    return fn.coord_transform(images, M=np.tile(np.float32(reference.LUMA), channels).tolist())


def grayscale(images: Image) -> Image:
    """Luma in all three channels (both recipes)."""
    return _luma(images, channels=3)


def add_brightness(images: Image, delta: Value) -> Image:
    """Official brightness: x + delta."""
    return _clip(images + delta)


def multiply_brightness(images: Image, factor: Value) -> Image:
    """Torchvision brightness: x * factor."""
    return _clip(images * factor)


def _blend(images: Image, factor: Value, centre: Image) -> Image:
    """factor * x + (1 - factor) * centre, clipped: x scaled about `centre` (broadcast: a mean or an image)."""
    return _clip(factor * images + (1.0 - factor) * centre)


def contrast_per_channel(images: Image, factor: Value) -> Image:
    """Official contrast: each channel scaled by factor about its own mean over the image."""
    return _blend(images, factor, fn.reductions.mean(images, axes=[0, 1], keep_dims=True))


def contrast_about_gray(images: Image, factor: Value) -> Image:
    """Torchvision contrast: a blend with the mean gray level (the luma of the channel means)."""
    return _blend(images, factor, _luma(fn.reductions.mean(images, axes=[0, 1], keep_dims=True)))


def _channels(images: Image) -> tuple[Image, Image, Image]:
    """Red, green and blue as [H, W, 1] (they broadcast against the image)."""
    return tuple(images[:, :, c:c + 1] for c in range(3))


def _value_and_chroma(red: Image, green: Image, blue: Image) -> tuple[Image, Image]:
    """HSV value (the largest channel) and chroma (largest minus smallest), [H, W, 1] each.

    From channel slices: DALI's reduction over the 3-long channel axis costs
    about five elementwise passes on the CPU, the slices and min/max about two.
    """
    value = dmath.max(dmath.max(red, green), blue)
    return value, value - dmath.min(dmath.min(red, green), blue)


def hsv_saturation(images: Image, factor: Value) -> Image:
    """Official saturation: the HSV saturation times factor, clipped to 1, hue and value kept.

    With v the largest channel and m the smallest, every channel c sits at
    v - S v k(hue); scaling S = (v - m) / v by f (capped at 1) moves it to
    v + min(f, v / (v - m)) (c - v), so no hue is needed. The result lies in
    [0, v] (the cap keeps it at or above 0): no clip needed.
    """
    value, chroma = _value_and_chroma(*_channels(images))
    return value + dmath.min(factor, value / dmath.max(chroma, _TINY)) * (images - value)


def saturation_about_gray(images: Image, factor: Value) -> Image:
    """Torchvision saturation: a blend with the grayscale image."""
    return _blend(images, factor, _luma(images))


def shift_hue(images: Image, shift: Value) -> Image:
    """The HSV hue plus `shift` turns, mod 1 (both recipes): TF's RGB -> HSV, then the hexcone back.

    Every channel ends between the pixel's min and max channel: no clip needed.
    """
    red, green, blue = _channels(images)
    value, chroma = _value_and_chroma(red, green, blue)
    inverse_chroma = 1.0 / dmath.max(chroma, _TINY)
    # Hue in sixths of a turn, TF's sector choice: red is the max first, then green, else blue.
    sixths = _select(red == value, (green - blue) * inverse_chroma,
                     _select(green == value, (blue - red) * inverse_chroma + 2.0,
                             (red - green) * inverse_chroma + 4.0))
    k = sixths + 6.0 * shift + types.Constant(_HEXCONE_OFFSETS)
    k = k - 6.0 * dmath.floor(k / 6.0)
    return value - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


JitterOp = Callable[[Image, Value], Image]
JITTER: dict[str, tuple[JitterOp, JitterOp, JitterOp, JitterOp]] = {
    "official": (add_brightness, contrast_per_channel, hsv_saturation, shift_hue),
    "torchvision": (multiply_brightness, contrast_about_gray, saturation_about_gray, shift_hue),
}
"""Each recipe's jitter ops in reference.JITTER_OPS order: (images, value) -> images, clipped to [0, 1]."""


def color_jitter(images: Image, values: Sequence[Value], order: DataNode, recipe: str) -> Image:
    """The recipe's four jitter ops in each sample's `order` (int32 [4] op ids), op k with values[k].

    Each slot is a DALI conditional per op, so a sample runs each op once
    (no compute-then-select).
    """
    ops = JITTER[recipe]
    for slot in range(len(ops)):
        op_id = order[slot]
        for k, op in enumerate(ops):
            if op_id == k:
                images = op(images, values[k])
    return images


# ---- blur, solarize, normalize -------------------------------------------------------------------

def gaussian_blur(images: Image, sigma: Value, kernel_size: int, recipe: str) -> Image:
    """Separable Gaussian blur over a kernel_size window; borders zero (official) or reflected (torchvision)."""
    radius = kernel_size // 2
    offsets = types.Constant(np.arange(-radius, radius + 1, dtype=np.float32))
    taps = dmath.exp(offsets * offsets * (-0.5 / (sigma * sigma)))
    taps = taps / fn.reductions.sum(taps)
    border = "constant" if recipe == "official" else "reflect_101"  # constant pads with 0 by default
    rows = fn.filter(images, fn.reshape(taps, shape=[1, kernel_size]), border=border)
    return fn.filter(rows, fn.reshape(taps, shape=[kernel_size, 1]), border=border)


def solarize(images: Image, threshold: float) -> Image:
    """Values at or above the threshold become 1 - v (both recipes)."""
    return _select(images >= threshold, 1.0 - images, images)


def flip_and_normalize(images: Image, flip: DataNode | int, spec: AugmentationSpec,
                       dtype: types.DALIDataType) -> DataNode:
    """Mirror where `flip`, then (x - mean) / std per channel, as HWC in `dtype`, in one kernel."""
    return fn.crop_mirror_normalize(images, mirror=flip, mean=list(spec.mean), std=list(spec.std), dtype=dtype,
                                    output_layout="HWC")


def make_view(images: DataNode, image_shape: DataNode, view: ViewSpec, spec: AugmentationSpec,
              dtype: types.DALIDataType) -> tuple[DataNode, dict[str, DataNode]]:
    """One augmented view of decoded uint8 HWC `images` and the draws behind it.

    Steps follow ViewSpec's order; each probabilistic step runs as a DALI
    conditional, so only the samples that drew it pay for it. A step whose
    probability is 0 is left out of the graph. Returns (view, draws by name,
    including the crop window and the decoded shape).
    """
    draws = draw_view(view, spec.recipe)
    anchor, extent = crop_window(image_shape, view, spec.recipe)
    x = resized_crop(images, anchor, extent, spec.image_size, spec.interpolation, spec.antialias)
    if view.color_jitter_prob > 0:
        if draws.jitter:
            x = color_jitter(x, (draws.brightness, draws.contrast, draws.saturation, draws.hue), draws.jitter_order,
                             spec.recipe)
    if view.grayscale_prob > 0:
        if draws.gray:
            x = grayscale(x)
    if view.blur_prob > 0:
        if draws.blur:
            x = gaussian_blur(x, draws.sigma, spec.blur_kernel_size, spec.recipe)
    if view.solarize_prob > 0:
        if draws.solarize:
            x = solarize(x, view.solarize_threshold)
    out = flip_and_normalize(x, draws.flip, spec, dtype)
    debug = dict(draws._asdict(), crop_anchor=anchor, crop_extent=extent, image_shape=image_shape)
    return out, debug
