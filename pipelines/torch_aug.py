"""Torch-native batched two-view BYOL augmentation: any device, no host syncs, CUDA-graph capturable.

Every random parameter is drawn per sample on the images' device with
`torch.rand(..., generator=generator)`, and every per-sample decision is applied
with masks and `torch.where` (compute-then-select), so there is no `.item()`, no
Python branch on a tensor value, no `nonzero` and no data-dependent shape: the
whole stage can run inside a captured `torch.cuda.CUDAGraph`.

Randomness under CUDA graphs: with `generator=None` the default CUDA generator
is used, and PyTorch's graph-safe Philox RNG advances its offset on every
replay, so each replay draws fresh values. A private `torch.Generator("cuda")`
works the same once registered with the graph before capture
(`graph.register_generator_state(generator)`); PyTorch refuses to advance an
unregistered generator during capture. On CPU (and on CUDA outside graphs) a
seeded generator makes results deterministic.

Both recipes of pipelines/spec.py are implemented exactly (up to float32
rounding; tests hold every op to pipelines/reference.py): the recipe picks the
crop-box draw, the resize filter, what brightness, contrast and saturation mean,
and the blur's border.

Cost of compute-then-select (per view): the blur runs on every sample and is
kept only where blurred (view 2 blurs 10%); the colour jitter runs its three
affine ops (brightness, contrast, saturation) in six fixed slots (three before
the hue shift, three after; a slot not used by a sample gets its op's identity
value) and the hue shift once on every sample. That is about 2x the
arithmetic of a per-sample loop, but all of it is a few dozen fixed-shape
elementwise kernels with no launch per sample.

On the CPU there is no graph to capture and no device to sync with, so each
probabilistic stage (jitter, grayscale, blur, solarize) runs on the samples
that drew it only (`_on_drawn_`, SUBSET_DEVICES): same ops, same draws, same
results, and view 2's blur (10% of samples) costs a tenth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines import reference
from pipelines.reference import LUMA as _LUMA
from pipelines.spec import AugmentationSpec, ViewSpec

# Columns of the one rand() draw behind a view's colour parameters (one kernel, not fourteen).
_FLIP, _JITTER, _FACTORS, _KEYS, _GRAY, _BLUR, _SIGMA, _SOLAR, _NUM_DRAWS = 0, 1, 2, 6, 10, 11, 12, 13, 14
# How many (area, aspect) draws a crop gets before the central-crop fallback, as in torchvision.
CROP_TRIES = 10
SUBSET_DEVICES = frozenset({"cpu"})
"""Device types where each probabilistic colour stage runs on the samples that drew it only (the module doc);
on the others every stage runs on the whole batch and a 0/1 select keeps its drawn samples (no host sync)."""


@dataclass(frozen=True)
class ViewParams:
    """The per-sample random parameters of one view (all tensors of leading size N, on the images' device).

    Tests read these to check rates and to replay the same view through
    torchvision; training computes them with the same function.
    """

    flipped: Tensor
    """[N] bool: horizontal flip."""
    jittered: Tensor
    """[N] bool: colour jitter applied."""
    jitter_factors: Tensor
    """[N, 4] float: brightness (official: a delta; torchvision: a factor), contrast and saturation factors
    and hue shift (used only where jittered)."""
    jitter_order: Tensor
    """[N, 4] int64: jitter op ids in application order (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    grayscaled: Tensor
    """[N] bool: converted to grayscale."""
    blurred: Tensor
    """[N] bool: Gaussian blur applied."""
    sigmas: Tensor
    """[N] float: blur standard deviation in output pixels (used only where blurred)."""
    solarized: Tensor
    """[N] bool: solarized."""
    boxes: Tensor | None = None
    """[N, 4] float (top, left, height, width) crop boxes, when the crop was done here."""

    def take(self, index: Tensor) -> ViewParams:
        """The parameters of the samples `index` picks, in its order."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return ViewParams(**{name: None if value is None else value[index] for name, value in fields.items()})


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {device}: "
                         f"create it with torch.Generator(device='{device.type}')")


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float32)


def sample_crop_boxes(heights: Tensor, widths: Tensor, view: ViewSpec, generator: torch.Generator | None = None,
                      recipe: str = "official") -> Tensor:
    """Random resized crop boxes, one per image: [N, 4] float (top, left, height, width), integer-valued.

    `heights`/`widths` ([N], any numeric dtype) are each image's size; the
    recipe picks the algorithm (reference.official_crop_box or
    reference.torchvision_crop_box, vectorized).
    """
    _check_generator(generator, heights.device)
    if recipe == "official":
        return _official_crop_boxes(heights.to(torch.float32), widths.to(torch.float32), view, generator)
    return _torchvision_crop_boxes(heights.to(torch.float32), widths.to(torch.float32), view, generator)


def _official_crop_boxes(img_h: Tensor, img_w: Tensor, view: ViewSpec, generator: torch.Generator | None) -> Tensor:
    """DeepMind's one-draw crop: area U(scale), log-uniform aspect, sides rounded and clamped to the image."""
    draws = _rand((img_h.shape[0], 4), img_h.device, generator)
    lo, hi = view.crop_scale
    log_lo, log_hi = math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1])
    area = img_h * img_w * (lo + (hi - lo) * draws[:, 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[:, 1])
    # torch.round rounds half to even, like tf.round; a side stays >= 1 on tiny images.
    box_w = torch.minimum(torch.round(torch.sqrt(area * aspect)).clamp_(min=1), img_w)
    box_h = torch.minimum(torch.round(torch.sqrt(area / aspect)).clamp_(min=1), img_h)
    top = torch.minimum(torch.floor(draws[:, 2] * (img_h - box_h + 1)), img_h - box_h)
    left = torch.minimum(torch.floor(draws[:, 3] * (img_w - box_w + 1)), img_w - box_w)
    return torch.stack((top, left, box_h, box_w), dim=1)


def _torchvision_crop_boxes(img_h: Tensor, img_w: Tensor, view: ViewSpec,
                            generator: torch.Generator | None) -> Tensor:
    """RandomResizedCrop.get_params vectorized: each sample draws CROP_TRIES (area fraction, log aspect)
    pairs, keeps the first whose rounded box fits (masked argmax), draws its offset uniformly over the valid
    integer positions, and falls back to torchvision's central crop when no try fits."""
    device = img_h.device
    n = img_h.shape[0]
    draws = _rand((n, 2 * CROP_TRIES + 2), device, generator)
    lo, hi = view.crop_scale
    log_lo, log_hi = math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1])
    target_area = (img_h * img_w)[:, None] * (lo + (hi - lo) * draws[:, :CROP_TRIES])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[:, CROP_TRIES:2 * CROP_TRIES])
    # torch.round rounds half to even, like Python's round() in torchvision.
    try_w = torch.round(torch.sqrt(target_area * aspect))
    try_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (try_w > 0) & (try_w <= img_w[:, None]) & (try_h > 0) & (try_h <= img_h[:, None])
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    found = fits.any(dim=1)
    # torchvision's fallback: the largest central crop whose aspect lies in crop_ratio.
    in_ratio = img_w / img_h
    too_tall, too_wide = in_ratio < view.crop_ratio[0], in_ratio > view.crop_ratio[1]
    fall_w = torch.where(too_wide, torch.round(img_h * view.crop_ratio[1]), img_w)
    fall_h = torch.where(too_tall, torch.round(img_w / view.crop_ratio[0]), img_h)
    box_h = torch.where(found, try_h.gather(1, first).squeeze(1), fall_h)
    box_w = torch.where(found, try_w.gather(1, first).squeeze(1), fall_w)
    # Uniform integer offsets in [0, size - box]; min() guards float rounding of u * count up to count.
    top = torch.minimum(torch.floor(draws[:, -2] * (img_h - box_h + 1)), img_h - box_h)
    left = torch.minimum(torch.floor(draws[:, -1] * (img_w - box_w + 1)), img_w - box_w)
    top = torch.where(found, top, torch.floor((img_h - box_h) / 2))
    left = torch.where(found, left, torch.floor((img_w - box_w) / 2))
    return torch.stack((top, left, box_h, box_w), dim=1)


def _filter(x: Tensor, interpolation: str) -> Tensor:
    """Keys cubic (a = -0.5, TF's and PIL's bicubic) or the triangle (bilinear), as reference._filter."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp_(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _support(interpolation: str) -> float:
    """Half-width of the filter in input pixels before any antialias stretch: 2 (Keys cubic) or 1 (triangle)."""
    return 2.0 if interpolation == "bicubic" else 1.0


def resize_taps(starts: Tensor, lengths: Tensor, size: int, interpolation: str, antialias: bool,
                longest: int) -> tuple[Tensor, Tensor]:
    """Banded resampling of the window [start, start + length) of an axis to `size` outputs, per sample.

    Returns (index, weight), both [N, size, taps]: output o of sample n is
    sum_t weight[n, o, t] * x[index[n, o, t]]. That is the reference's
    resampling (reference.resize_weights): pixel-centre geometry, the filter
    stretched by the shrink factor when antialiasing, taps outside the window
    dropped and the rest renormalized (TF's resize of a decoded crop; PIL and
    torchvision's antialiased resize). Only the taps under the filter are
    kept (5 for bicubic without antialias), where the full [size, length]
    matrix would multiply mostly zeros. `longest` (a Python int, no sync)
    bounds the lengths and so the tap count when antialiasing.
    """
    starts, lengths = starts.to(torch.float32), lengths.to(torch.float32)
    scale = lengths / size
    stretch = scale.clamp(min=1.0) if antialias else torch.ones_like(scale)
    reach = _support(interpolation) * stretch  # [N] half-width of the filter in input pixels
    taps = math.ceil(2 * _support(interpolation) * (max(longest / size, 1.0) if antialias else 1.0)) + 1
    centres = starts[:, None] + (torch.arange(size, device=starts.device, dtype=torch.float32) + 0.5) * scale[:, None]
    # The first input pixel whose centre lies inside the filter's open support, then `taps` pixels from it.
    first = torch.floor(centres - 0.5 - reach[:, None]) + 1
    index = first[:, :, None] + torch.arange(taps, device=starts.device, dtype=torch.float32)
    weight = _filter((index + 0.5 - centres[:, :, None]) / stretch[:, None, None], interpolation)
    ends = (starts + lengths)[:, None, None]
    weight = weight * ((index + 0.5 > starts[:, None, None]) & (index + 0.5 < ends))
    weight = weight / weight.sum(dim=2, keepdim=True)
    # Taps past the window have weight 0; clamping keeps their (unused) reads inside it.
    index = torch.minimum(torch.maximum(index, starts[:, None, None]), ends - 1)
    return index.to(torch.int64), weight


def resample_rows(x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """x [N, L, M, C] (channels last) resampled along L with resize_taps' (index, weight) [N, S, T]:
    [N, S, M, C] in weight's dtype.

    The taps are whole rows, each with all its pixels' channels side by side, picked by one index_select;
    each output row is then one small product of its T weights with its T picked rows (one bmm for all).
    Channels last is the layout torchvision's CPU decoder writes, so a crop's rows are read where they
    lie, without first copying the window. x may be uint8: only the picked rows are converted.
    """
    n, length, m, c = x.shape
    s, t = index.shape[1:]
    picked = index.flatten()
    if n > 1:  # offsets into the stacked images (the pipeline resamples one crop at a time: no ops spent)
        picked = (torch.arange(n, device=x.device).view(n, 1) * length + index.view(n, s * t)).flatten()
    taps = x.flatten(0, 1).index_select(0, picked).view(n * s, t, m * c).to(weight.dtype)
    return torch.bmm(weight.reshape(n * s, 1, t), taps).view(n, s, m, c)


def resized_crop(images: Tensor, boxes: Tensor, size: int, interpolation: str, antialias: bool = False,
                 flip: Tensor | None = None) -> Tensor:
    """Crop each image to its box, resize to size x size and optionally mirror it: two banded resamples.

    images: [N, C, H, W] float; boxes: [N, 4] (top, left, height, width);
    flip: [N] bool or None. The result is the reference's resize of the crop
    (reference.resize: Keys cubic a=-0.5 or triangle, taps outside the box
    dropped, antialias as asked) up to float32 rounding: rows, then columns,
    each a gather of the taps under the filter and their weighted sum; a flip
    reverses the order of the output columns. Values are not clamped (bicubic
    can overshoot [0, 1] slightly).
    """
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation={interpolation!r}: use 'bilinear' or 'bicubic'")
    if not images.is_floating_point() or images.dim() != 4:
        raise TypeError(f"resized_crop needs float [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}: "
                        f"convert uint8 with images.float() / 255")
    top, left, box_h, box_w = boxes.to(device=images.device, dtype=torch.float32).unbind(dim=1)
    row_index, row_weight = resize_taps(top, box_h, size, interpolation, antialias, images.shape[-2])
    col_index, col_weight = resize_taps(left, box_w, size, interpolation, antialias, images.shape[-1])
    if flip is not None:
        mirrored = flip[:, None, None]
        col_index = torch.where(mirrored, col_index.flip(1), col_index)
        col_weight = torch.where(mirrored, col_weight.flip(1), col_weight)
    weights = (row_weight.to(images.dtype), col_weight.to(images.dtype))
    resized = resample_both(images.permute(0, 2, 3, 1), (row_index, weights[0]), (col_index, weights[1]))
    return resized.permute(0, 3, 1, 2)


def resample_both(images: Tensor, rows: tuple[Tensor, Tensor], cols: tuple[Tensor, Tensor]) -> Tensor:
    """[N, H, W, C] (channels last) resampled along H with the `rows` taps, then along W with the `cols`
    taps: [N, S, S, C]."""
    resized = resample_rows(images, *rows)
    # The column pass picks rows of the transposed result: a contiguous copy of it is faster to pick from.
    return resample_rows(resized.transpose(1, 2).contiguous(), *cols).transpose(1, 2)


def sample_view_params(n: int, view: ViewSpec, device: torch.device | str,
                       generator: torch.Generator | None = None, recipe: str = "official") -> ViewParams:
    """Draw one view's per-sample flip, jitter, grayscale, blur and solarize parameters (boxes=None)."""
    device = torch.device(device)
    _check_generator(generator, device)
    u = _rand((n, _NUM_DRAWS), device, generator)
    # reference.jitter_values maps uniforms to values; it is evaluated at 0 and 1 for each op's span.
    low, high = (reference.jitter_values(np.full(4, edge), view, recipe) for edge in (0.0, 1.0))
    factors = torch.stack([float(lo) + float(hi - lo) * u[:, _FACTORS + k] for k, (lo, hi) in enumerate(zip(low, high))],
                          dim=1)
    sig_lo, sig_hi = view.blur_sigma
    return ViewParams(
        flipped=u[:, _FLIP] < view.flip_prob,
        jittered=u[:, _JITTER] < view.color_jitter_prob,
        jitter_factors=factors,
        # argsort of i.i.d. uniform keys is a uniform random permutation per sample (torch.randperm per row).
        jitter_order=u[:, _KEYS:_KEYS + 4].argsort(dim=1),
        grayscaled=u[:, _GRAY] < view.grayscale_prob,
        blurred=u[:, _BLUR] < view.blur_prob,
        sigmas=sig_lo + (sig_hi - sig_lo) * u[:, _SIGMA],
        solarized=u[:, _SOLAR] < view.solarize_prob,
    )


def _per_sample(values: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1] so a per-sample value broadcasts over an image batch."""
    return values.view(-1, 1, 1, 1)


def _pick_(chosen: Tensor, into: Tensor, other: Tensor) -> Tensor:
    """Per sample, replace `into` by `other` where `chosen` ([N] bool), in place; both finite.

    The select is arithmetic (a * 1 + b * 0 is exactly a for finite values):
    a CPU torch.where with a broadcast mask costs ~10x an elementwise product,
    and on a GPU both are one pass over memory.
    """
    mask = _per_sample(chosen.to(into.dtype))
    return into.mul_(1 - mask).addcmul_(other, mask)


def _gray(images: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma, with torchvision's weights and operation order."""
    r, g, b = images.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _horizontal_flip(images: Tensor, flipped: Tensor) -> Tensor:
    """Mirror the samples where `flipped`, as one gather over columns."""
    n, c, h, w = images.shape
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    return images.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def _jitter_slot_(images: Tensor, value: Tensor, op: Tensor, recipe: str) -> Tensor:
    """One jitter slot, in place: per sample, brightness (op 0), contrast (op 1) or saturation (op 2) with `value`.

    Each is an affine map clamp(a * x + b, 0, 1) with per-sample (or per-pixel) a, b:
      official     brightness a=1, b=delta; contrast a=f, b=(1-f) * channel mean;
                   saturation a=r, b=(1-r) * v with v the max channel and r = min(f, v / (v - min)):
                   HSV saturation s -> min(s f, 1) at fixed hue and value, without the HSV round trip.
      torchvision  a=f, b=(1-f) * {0, mean gray level, grayscale image} (torchvision's _blend).
    The per-pixel part (saturation's) is computed for every sample and weighted by a per-sample 0/1,
    the per-sample parts are summed with 0/1 weights, so the kernel count does not depend on the
    draws and every result is exactly its own op's (x * 1 + 0 = x); an op's identity value (delta 0,
    factor 1) is an exact pass-through.
    """
    # One-hot by comparison: F.one_hot checks its input's range, a host sync.
    chosen = (op[:, None] == torch.arange(3, device=op.device)).to(images.dtype)
    brightness, contrast, saturation = (_per_sample(w) for w in chosen.unbind(dim=1))
    v = _per_sample(value)
    if recipe == "official":
        maxc = images.amax(dim=1, keepdim=True)
        chroma = torch.sub(maxc, images.amin(dim=1, keepdim=True)).clamp_(min=1e-12)
        # r = min(f, v / chroma), written over chroma; for gray pixels any r is exact.
        ratio = torch.minimum(torch.div(maxc, chroma, out=chroma), v, out=chroma)
        channel_mean = images.mean(dim=(-2, -1), keepdim=True)
        sample_shift = brightness * v + contrast * (1 - v) * channel_mean  # [N, 3, 1, 1]
        pixel_shift = torch.mul(saturation, maxc, out=maxc).addcmul_(ratio, maxc, value=-1)  # (1 - r) v, or 0
        scale = ratio.mul_(saturation).add_(brightness + contrast * v)  # [N, 1, H, W]
        return images.mul_(scale).add_(pixel_shift).add_(sample_shift).clamp_(0, 1)
    gray = _gray(images)
    sample_shift = (1 - v) * contrast * gray.mean(dim=(-3, -2, -1), keepdim=True)
    pixel_shift = gray.mul_((1 - v) * saturation)
    return images.mul_(v).add_(pixel_shift).add_(sample_shift).clamp_(0, 1)
def _shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h += shift mod 1, HSV -> RGB) with a per-sample shift.

    The HSV -> RGB step uses the closed form channel = V - C * clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6 (n = 5, 3, 1 for R, G, B; C = V * S = max - min), which is
    torchvision's piecewise table written without a gather. The hue's sector (which channel is
    the max; ties resolve R before G before B, as in torchvision) is chosen with 0/1 weights, not
    torch.where, for the CPU's sake (see _pick_).
    """
    r, g, b = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)
    chroma = maxc - minc
    is_red = torch.eq(r, maxc, out=torch.empty_like(maxc))
    is_green = torch.eq(g, maxc, out=torch.empty_like(maxc)).mul_(1 - is_red)
    is_blue = 1 - is_red - is_green
    # Hue in sixths of a turn: (g - b) / C, (b - r) / C + 2 or (r - g) / C + 4 by sector.
    # Gray pixels (C = 0) get any finite hue: their channels are V whatever the hue.
    numerator = (g - b).mul_(is_red).addcmul_(b - r, is_green).addcmul_(r - g, is_blue)
    hue6 = numerator.div_(chroma.clamp(min=1e-12)).add_(is_green, alpha=2).add_(is_blue, alpha=4)
    hue6.add_(6 * shift.view(-1, 1, 1))
    hue6.sub_(hue6.div(6).floor_().mul_(6))  # into [0, 6)
    offsets = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = offsets + hue6.unsqueeze(1)  # [1, 11): one wrap left, k - 6 is exact there
    scratch = torch.ge(k, 6, out=torch.empty_like(k))
    k.sub_(scratch.mul_(6))
    ramp = torch.minimum(k, scratch.copy_(k).neg_().add_(4), out=k).clamp_(0, 1)  # clamp(min(k, 4 - k), 0, 1)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1, out=scratch)


def _color_jitter_(images: Tensor, params: ViewParams, recipe: str) -> Tensor:
    """The four jitter ops in each sample's own order, where jittered, in place.

    Hue is the one op that is not affine, so it runs once: the affine ops ordered
    before it (by `jitter_order`) go in three slots before, the rest in three
    slots after; a sample's unused slots get the op's identity value.
    """
    rank = params.jitter_order.argsort(dim=1)  # rank[:, op] = position of op in the order
    hue_position = rank[:, 3]
    affine_order = rank[:, :3].argsort(dim=1)  # brightness/contrast/saturation ids, in application order
    identity_values = reference.identity_jitter_values(recipe)
    for before_hue in (True, False):
        for slot in range(3):
            op = affine_order[:, slot]
            in_phase = (slot < hue_position) if before_hue else (slot >= hue_position)
            drawn = params.jitter_factors.gather(1, op[:, None]).squeeze(1)
            # Slot ops are 0..2; contrast's and saturation's identity (1) is the same, so one where picks it.
            identity = torch.where(op == 0, identity_values[0], identity_values[1]).to(drawn.dtype)
            _jitter_slot_(images, torch.where(params.jittered & in_phase, drawn, identity), op, recipe)
        if before_hue:
            _pick_(params.jittered, images, _shift_hue(images, params.jitter_factors[:, 3]))
    return images


def _gaussian_blur(images: Tensor, sigmas: Tensor, kernel_size: int, recipe: str) -> Tensor:
    """Separable Gaussian blur, one sigma per sample; zero borders (official) or reflected (torchvision).

    Kernel taps as both recipes: softmax(-(x / sigma)^2) over x = linspace(-lim, lim),
    lim = (k - 1) / (2 sqrt 2), i.e. exp(-d^2 / (2 sigma^2)) at integer offsets d, normalized.
    The batch is folded into channels so one grouped conv per axis blurs every sample.
    """
    n, c, h, w = images.shape
    pad = kernel_size // 2
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    taps = torch.linspace(-lim, lim, kernel_size, device=images.device, dtype=images.dtype)
    kernels = torch.softmax(taps[None, :].div(sigmas[:, None].to(images.dtype)).pow(2).neg(), dim=1)
    kernels = kernels.repeat_interleave(c, dim=0)  # [N * C, k]
    mode = "constant" if recipe == "official" else "reflect"
    x = F.pad(images, (pad, pad, pad, pad), mode=mode).reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    x = F.conv2d(x, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.conv2d(x, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    return x.view(n, c, h, w)


def apply_view_params(images: Tensor, params: ViewParams, kernel_size: int, solarize_threshold: float,
                      flip: bool = True, recipe: str = "official") -> Tensor:
    """Apply drawn parameters to [N, 3, S, S] float images in [0, 1]: the colour half of a view.

    Order (both recipes): flip (skipped with flip=False when the crop already
    mirrored), colour jitter, grayscale, blur, solarize. Jitter clamps to
    [0, 1] after each op as both recipes do; the others keep [0, 1].
    """
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise TypeError(f"expected float [N, 3, H, W] images in [0, 1], got {images.dtype} {tuple(images.shape)}")
    if kernel_size % 2 == 0 or kernel_size // 2 >= min(images.shape[-2:]):
        raise ValueError(f"kernel_size={kernel_size} must be odd and its half smaller than the image side "
                         f"{min(images.shape[-2:])}: use spec.blur_kernel_size")
    # One working copy (the flip's gather makes it), updated in place from here on.
    x = _horizontal_flip(images, params.flipped) if flip else images.clone()
    _on_drawn_(params.jittered, x, params, lambda y, p: _color_jitter_(y, p, recipe))
    _on_drawn_(params.grayscaled, x, params, lambda y, p: _pick_(p.grayscaled, y, _gray(y)))
    _on_drawn_(params.blurred, x, params,
               lambda y, p: _pick_(p.blurred, y, _gaussian_blur(y, p.sigmas, kernel_size, recipe)))
    _on_drawn_(params.solarized, x, params, lambda y, p: _solarize_(y, p.solarized, solarize_threshold))
    return x


def _on_drawn_(drawn: Tensor, images: Tensor, params: ViewParams,
               stage_: Callable[[Tensor, ViewParams], object]) -> None:
    """Run the in-place `stage_(images, params)`, which leaves the samples not `drawn` ([N] bool) unchanged.

    On SUBSET_DEVICES (the CPU) it runs on the drawn samples only, gathered and written back: the mask is
    on the host already, and a stage drawn for 10% of the batch then costs 10%. Elsewhere it runs on the
    whole batch, which keeps the kernel sequence independent of the draws (no host sync; capturable).
    """
    if images.device.type in SUBSET_DEVICES:
        index = drawn.nonzero().squeeze(1)
        if len(index) < len(drawn):
            if len(index):
                part = images[index]
                stage_(part, params.take(index))
                images[index] = part
            return
    stage_(images, params)


def _solarize_(images: Tensor, solarized: Tensor, threshold: float) -> Tensor:
    """Invert (1 - x) the values >= threshold of the `solarized` samples, in place: x - 2 x s + s with s = 1
    where inverted is exactly 1 - x there (x - 2x = -x) and x elsewhere."""
    inverted = torch.ge(images, threshold, out=torch.empty_like(images)).mul_(_per_sample(solarized.to(images.dtype)))
    return images.addcmul_(images, inverted, value=-2).add_(inverted)


def apply_view(images: Tensor, view: ViewSpec, kernel_size: int, generator: torch.Generator | None = None,
               *, flip: bool = True, recipe: str = "official",
               return_params: bool = False) -> Tensor | tuple[Tensor, ViewParams]:
    """Draw a view's random parameters per sample and apply them to [N, 3, S, S] float images in [0, 1].

    Returns the augmented images, or (images, ViewParams) with return_params=True.
    """
    params = sample_view_params(images.shape[0], view, images.device, generator, recipe)
    out = apply_view_params(images, params, kernel_size, view.solarize_threshold, flip=flip, recipe=recipe)
    return (out, params) if return_params else out


def normalize(images: Tensor, mean: Tensor | tuple[float, ...], std: Tensor | tuple[float, ...],
              dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """(images - mean) / std per channel, written channels_last in `dtype` (into `out` when given).

    One fused kernel (scale * x + bias) that also casts and lays out the result.
    Pass mean/std as device tensors inside CUDA graphs (tuples build new
    tensors from host values, a host-to-device copy).
    """
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(shape)
    if out is None:
        out = torch.empty(images.shape, dtype=dtype, device=images.device, memory_format=torch.channels_last)
    elif out.shape != images.shape or out.dtype != dtype:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; it must be {dtype} {tuple(images.shape)}")
    return torch.addcmul(-mean_t / std_t, images.float(), 1 / std_t, out=out)


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (torchvision's to_dtype scale); float passes through as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"images are {images.dtype}: pass uint8 in [0, 255] or float in [0, 1]")


def epoch_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """Two well-mixed 63-bit seeds per (seed, epoch, rank), for the crop and the colour draws.

    Ranks and epochs draw independent crops; the two streams must differ too, or on the CPU (where both
    generators are the same engine) the colour draws would replay the crop draws.
    """
    crop, colour = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, np.uint64) >> np.uint64(1)
    return int(crop), int(colour)


class TorchTwoViewAugment:
    """BYOL's two views from a batch of images, on the batch's device, per the AugmentationSpec.

    Outputs follow the DESIGN data contract: (B, 3, S, S), channels_last,
    ImageNet-normalized, in `dtype`, on `device`. Capture-safe (see the module
    docstring for the generator rule).
    """

    def __init__(self, spec: AugmentationSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.kernel_size = spec.blur_kernel_size
        # Built once here: a torch.tensor() from host values inside a captured graph would be a host copy.
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)

    def _check(self, images: Tensor, side: int | None) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a [N, 3, H, W] batch, got shape {tuple(images.shape)}")
        if images.device.type != self.device.type:
            raise ValueError(f"batch is on {images.device} but this augment runs on {self.device}: move it first")
        if side is not None and images.shape[-2:] != (side, side):
            raise ValueError(f"colour() needs crops of {side}x{side} (spec.image_size), got {tuple(images.shape[-2:])}")

    def _finish(self, x: Tensor, view_index: int, generator: torch.Generator | None, flip: bool,
                boxes: Tensor | None, out: Tensor | None) -> tuple[Tensor, ViewParams]:
        view, recipe = self.spec.views[view_index], self.spec.recipe
        params = sample_view_params(x.shape[0], view, x.device, generator, recipe)
        if boxes is not None:
            params = dataclasses.replace(params, boxes=boxes)
            # Crop and flip in one resample; bicubic overshoot is clipped as both recipes do.
            x = resized_crop(x, boxes, self.spec.image_size, self.spec.interpolation, self.spec.antialias,
                             params.flipped).clamp_(0, 1)
        x = apply_view_params(x, params, self.kernel_size, view.solarize_threshold, flip=flip, recipe=recipe)
        return normalize(x, self._mean, self._std, self.dtype, out=out), params

    def __call__(self, batch: Tensor, generator: torch.Generator | None = None, *,
                 out: tuple[Tensor, Tensor] | None = None, return_params: bool = False):
        """Two views of a [N, 3, H, W] uint8 or float ([0, 1]) batch: (view1, view2).

        With out=(buf1, buf2) the views are written into those buffers. With
        return_params=True returns ((view1, view2), (params1, params2)).
        """
        self._check(batch, None)
        x = to_unit_float(batch)
        n, _, height, width = x.shape
        heights = torch.full((n,), float(height), device=x.device)
        widths = torch.full((n,), float(width), device=x.device)
        views, params = [], []
        for index, view in enumerate(self.spec.views):
            boxes = sample_crop_boxes(heights, widths, view, generator, self.spec.recipe)
            made, drawn = self._finish(x, index, generator, False, boxes, None if out is None else out[index])
            views.append(made)
            params.append(drawn)
        return ((views[0], views[1]), (params[0], params[1])) if return_params else (views[0], views[1])

    def colour(self, crops: Tensor, view_index: int, generator: torch.Generator | None = None, *,
               flip: bool = True, out: Tensor | None = None, return_params: bool = False):
        """The colour half of view `view_index` (0 or 1) for crops already resized to S x S (e.g. by FFCV).

        crops: [N, 3, S, S] uint8 or float in [0, 1]. flip=True also applies the
        view's random flip here; pass flip=False if the source already flipped.
        Returns the normalized view (and its ViewParams with return_params=True).
        """
        if view_index not in (0, 1):
            raise ValueError(f"view_index={view_index}: use 0 or 1")
        self._check(crops, self.spec.image_size)
        made, drawn = self._finish(to_unit_float(crops), view_index, generator, flip, None, out)
        return (made, drawn) if return_params else made
