"""How exactly each backend makes the recipe's views: the one place that says where they differ, and measures it.

Every backend module here (`torch_backend`, `dali_backend`, `ffcv_backend`,
`torchvision_backend`) exposes the same three functions, built from the
backend's own training code (not a copy of it):

    apply_op(op, images, values, spec) -> images
        One colour op ("brightness", "contrast", "saturation", "hue",
        "grayscale", "blur", "solarize") on float64 [N, 3, S, S] views in
        [0, 1], sample i with the drawn value values[i] (a delta or factor,
        a hue shift in turns, a blur sigma; unused by grayscale and
        solarize). Returns float64 [N, 3, S, S].
    resize(images, boxes, spec) -> views
        uint8 [N, H, W, 3] images, int [N, 4] (top, left, h, w) boxes ->
        float64 [N, 3, S, S] in [0, 1]: the crop's resampling.
    crop_boxes(height, width, n, view, spec, seed) -> boxes
        n crop boxes the backend draws for an H x W image: int [n, 4].

`measure(backend, recipe)` runs them against pipelines/reference.py on the
same draws and returns each op's error in 8-bit levels (the crop: the largest
gap between the CDFs of area fraction and log aspect, a Kolmogorov-Smirnov
statistic against fresh reference draws). The tests bound these numbers;
benchmarks/fidelity_report.py writes them to the README's recipe table.
GAPS below says why a number is not ~0.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from pipelines import reference
from pipelines.spec import AugmentationSpec, ViewSpec

BACKENDS = ("torch", "dali", "ffcv", "torchvision")
COLOUR_OPS = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize")
OPS = ("crop", "resize", *COLOUR_OPS)
LEVELS = 255.0

_PIL_8_BIT = "PIL works on 8-bit pixels: the input and the result are rounded to whole levels"
_DALI_ROI = ("DALI resizes the crop as a region of the whole image: where the filter reaches past the crop it reads "
             "the pixels around it (the reference drops those taps), so the view's outer rows and columns (within "
             "the filter's reach of its border) differ: up to {} levels on the probe images, more where a sharp "
             "edge lies along the crop's border; inside, within 0.1")
GAPS: dict[tuple[str, str, str], str] = {
    # (backend, recipe, op) -> why the backend's op is not the reference's. Anything missing is exact
    # up to float rounding. The torchvision loader's torchvision recipe is transforms.v2 on PIL images,
    # kept as the reference PyTorch BYOL repositories use, with PIL's rounding:
    ("torchvision", "torchvision", "brightness"): _PIL_8_BIT,
    ("torchvision", "torchvision", "contrast"): _PIL_8_BIT + "; the mean gray level is rounded too",
    ("torchvision", "torchvision", "saturation"): _PIL_8_BIT,
    ("torchvision", "torchvision", "grayscale"): _PIL_8_BIT,
    ("torchvision", "torchvision", "hue"): "PIL shifts the hue of an 8-bit HSV image (256 hue steps, 8-bit "
                                           "saturation and value): strongly saturated pixels move by up to ~15 levels",
    ("torchvision", "torchvision", "resize"): "PIL resamples rows and columns in two 8-bit passes (rounded between "
                                              "them); sharp edges differ by a few levels, the mean by ~0.3",
    # DALI's resized crop follows the image around the crop (pipelines/dali_ops.py says why):
    ("dali", "official", "resize"): _DALI_ROI.format(6.5),
    ("dali", "torchvision", "resize"): _DALI_ROI.format(10.4),
}
"""Where a backend cannot express an op of a recipe exactly: the only list of such differences."""


EXACT_LEVELS = 0.51
"""An op within this many levels is exact up to one rounding to 8 bits; above it GAPS must say why."""
CROP_KS_NOISE = 0.05
"""KS statistic of two samples of 4000 boxes from one distribution stays below this (alpha ~ 1e-4)."""


def unexplained(backend: str, recipe: str, errors: dict[str, "OpError"]) -> list[str]:
    """Ops of `errors` that differ from the reference more than rounding (or noise) without a GAPS entry."""
    return [op for op, error in errors.items()
            if error.max > (CROP_KS_NOISE if op == "crop" else EXACT_LEVELS) and (backend, recipe, op) not in GAPS]


@dataclass(frozen=True)
class OpError:
    """One op's difference from the reference: pixels in 8-bit levels, the crop as a KS statistic."""

    max: float
    mean: float


def probe_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """float64 [n, 3, size, size] in [0, 1]: smooth colour fields with gray patches, dark and bright corners.

    Every op needs something to act on: saturated and unsaturated colours,
    every hue sector, values near 0 and 1 (where clipping matters), edges
    (for the blur's borders) and a non-zero mean per channel.
    """
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = np.empty((n, 3, size, size))
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, size=(3, 2))
        freq = rng.uniform(1.0, 4.0, size=(3, 2))
        for c in range(3):
            images[i, c] = 0.5 + 0.5 * np.sin(freq[c, 0] * np.pi * xx + phase[c, 0]) * np.cos(
                freq[c, 1] * np.pi * yy + phase[c, 1])
        quarter = size // 4
        images[i, :, :quarter, :quarter] = rng.uniform(0, 1)  # a gray patch: zero chroma
        images[i, :, -quarter:, -quarter:] *= 0.15  # a dark corner
        images[i, :, :quarter, -quarter:] = 1 - 0.1 * images[i, :, :quarter, -quarter:]  # a bright one
    return np.clip(images, 0.0, 1.0)


def op_values(op: str, view: ViewSpec, spec: AugmentationSpec, n: int, seed: int = 0) -> np.ndarray:
    """n values of `op` spread over the range the recipe draws it from (its edges included)."""
    u = np.linspace(0.0, 1.0, n)
    np.random.default_rng(seed).shuffle(u)
    if op == "blur":
        lo, hi = view.blur_sigma
        return lo + (hi - lo) * u
    if op in reference.JITTER_OPS:
        index = reference.JITTER_OPS.index(op)
        return np.array([reference.jitter_values(np.full(4, v), view, spec.recipe)[index] for v in u])
    return np.zeros(n)


def reference_op(op: str, image: np.ndarray, value: float, spec: AugmentationSpec) -> np.ndarray:
    """The reference of `op` on one float64 [3, S, S] image."""
    if op in reference.JITTER_OPS:
        return reference.jitter_op(image, op, value, spec.recipe)
    if op == "grayscale":
        return reference.grayscale(image)
    if op == "blur":
        return reference.gaussian_blur(image, value, spec.blur_kernel_size, spec.recipe)
    if op == "solarize":
        return reference.solarize(image, spec.view2.solarize_threshold)
    raise ValueError(f"unknown op {op!r}: use one of {', '.join(COLOUR_OPS)}")


def reference_crop_box(height: int, width: int, uniforms: np.ndarray, view: ViewSpec,
                       spec: AugmentationSpec) -> tuple[int, int, int, int]:
    """The recipe's crop box from U[0, 1) draws (4 for official, 40 for torchvision's ten tries)."""
    if spec.recipe == "official":
        return reference.official_crop_box(height, width, uniforms[:4], view)
    return reference.torchvision_crop_box(height, width, uniforms, view)


def _levels(got: np.ndarray, want: np.ndarray) -> OpError:
    diff = np.abs(np.asarray(got, dtype=np.float64) - want) * LEVELS
    return OpError(float(diff.max()), float(diff.mean()))


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Largest gap between the empirical CDFs of two samples."""
    points = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), points, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def crop_statistics(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Area fraction and log aspect (w / h) of [n, 4] (top, left, h, w) boxes."""
    h, w = boxes[:, 2].astype(np.float64), boxes[:, 3].astype(np.float64)
    return h * w / (height * width), np.log(w / h)


def backend_module(backend: str):
    """The adapter module of `backend` (imports DALI or FFCV only when asked)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"pipelines.fidelity.{backend}_backend")


def measure(backend: str, recipe: str, size: int = 32, n: int = 16, crops: int = 4000,
            seed: int = 0) -> dict[str, OpError]:
    """Each op of `recipe` on `backend` against the reference on the same draws (module doc)."""
    spec = AugmentationSpec(image_size=size, recipe=recipe)
    adapter = backend_module(backend)
    view = spec.view1
    images = probe_images(n, size, seed)
    errors = {}
    for op in COLOUR_OPS:
        values = op_values(op, view, spec, n, seed)
        got = adapter.apply_op(op, images, values, spec)
        want = np.stack([reference_op(op, image, value, spec) for image, value in zip(images, values)])
        errors[op] = _levels(got, want)
    # Resize: crops of a larger uint8 image, both shrinking and enlarging, at the image's edges too.
    sources = np.round(probe_images(n, 3 * size, seed + 1) * LEVELS).astype(np.uint8)
    rng = np.random.default_rng(seed)
    boxes = np.array([reference_crop_box(3 * size, 3 * size, rng.random(40), view, spec) for _ in range(n)])
    got = adapter.resize(sources.transpose(0, 2, 3, 1).copy(), boxes, spec)
    want = np.stack([reference.resize(src[:, t:t + h, l:l + w] / LEVELS, size, spec.interpolation, spec.antialias)
                     for src, (t, l, h, w) in zip(sources, boxes)])
    errors["resize"] = _levels(got, want)
    # Crop: the distribution of boxes on a landscape image, against fresh reference draws.
    height, width = 300, 400
    ours = adapter.crop_boxes(height, width, crops, view, spec, seed)
    theirs = np.array([reference_crop_box(height, width, rng.random(40), view, spec) for _ in range(crops)])
    ks = [_ks(a, b) for a, b in zip(crop_statistics(ours, height, width), crop_statistics(theirs, height, width))]
    errors["crop"] = OpError(max(ks), float(np.mean(ks)))
    return errors
