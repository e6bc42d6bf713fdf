"""The BYOL view ops of both recipes in float64 NumPy, one image at a time: the reference the backends are held to.

Written from the definitions, not from any backend: "official" follows
DeepMind's byol/utils/augmentations.py and dataset.py (TensorFlow image
semantics), "torchvision" follows torchvision.transforms (pipelines/spec.py
says what each op means in each recipe). Images are float64 [3, H, W] arrays
in [0, 1]; every random number is passed in, so a test can hand a backend and
this module the same draws and compare pixels (pipelines/fidelity.py).

Slow on purpose (per image, per op, no fusion): clarity over speed.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.spec import ViewSpec

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
"""Jitter op ids 0..3, as `order` arrays and the backends number them."""
LUMA = (0.2989, 0.587, 0.114)
"""Grayscale weights of both recipes (ITU-R 601-2 as torchvision and the official code write them)."""


# ---- colour ------------------------------------------------------------------------------------

def rgb_to_hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's RGB -> HSV (hue in turns [0, 1)), as the official code writes it."""
    r, g, b = image
    value = image.max(axis=0)
    chroma = value - image.min(axis=0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1), 0.0)
    norm = 1.0 / (6.0 * np.where(chroma != 0, chroma, 1))
    hue = np.where(r == value, norm * (g - b), np.where(g == value, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6))
    hue = hue * (chroma > 0)
    return hue + (hue < 0), saturation, value


def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """TensorFlow's HSV -> RGB: the hexcone sector of 6 * hue picks which channel gets C, X or 0 above m."""
    chroma = saturation * value
    low = value - chroma
    sector6 = (hue % 1.0) * 6.0
    x = chroma * (1 - np.abs(sector6 % 2.0 - 1))
    sector = np.floor(sector6).astype(np.int64)
    r = np.where((sector == 0) | (sector == 5), chroma, np.where((sector == 1) | (sector == 4), x, 0.0))
    g = np.where((sector == 1) | (sector == 2), chroma, np.where((sector == 0) | (sector == 3), x, 0.0))
    b = np.where((sector == 3) | (sector == 4), chroma, np.where((sector == 2) | (sector == 5), x, 0.0))
    return np.stack([r, g, b]) + low


def grayscale(image: np.ndarray) -> np.ndarray:
    """Luma in all three channels."""
    return np.broadcast_to(np.tensordot(LUMA, image, axes=1), image.shape).copy()


def jitter_op(image: np.ndarray, op: str, value: float, recipe: str) -> np.ndarray:
    """One colour-jitter op with its drawn value (a delta, a factor or a hue shift), clipped to [0, 1]."""
    if op == "brightness":
        out = image + value if recipe == "official" else image * value
    elif op == "contrast":
        centre = (image.mean(axis=(1, 2), keepdims=True) if recipe == "official"
                  else grayscale(image).mean())
        out = value * (image - centre) + centre
    elif op == "saturation":
        if recipe == "official":
            hue, saturation, val = rgb_to_hsv(image)
            out = hsv_to_rgb(hue, np.clip(saturation * value, 0, 1), val)
        else:
            gray = grayscale(image)
            out = value * (image - gray) + gray
    elif op == "hue":
        hue, saturation, val = rgb_to_hsv(image)
        out = hsv_to_rgb((hue + value) % 1.0, saturation, val)
    else:
        raise ValueError(f"unknown jitter op {op!r}: use one of {', '.join(JITTER_OPS)}")
    return np.clip(out, 0.0, 1.0)


def jitter_values(uniforms: np.ndarray, view: ViewSpec, recipe: str) -> np.ndarray:
    """Map four U[0, 1) draws to (brightness, contrast, saturation, hue) values of the recipe."""
    if recipe == "official":
        low_brightness, high_brightness = -view.brightness, view.brightness
    else:
        low_brightness, high_brightness = max(0.0, 1 - view.brightness), 1 + view.brightness
    spans = [(low_brightness, high_brightness), (max(0.0, 1 - view.contrast), 1 + view.contrast),
             (max(0.0, 1 - view.saturation), 1 + view.saturation), (-view.hue, view.hue)]
    return np.array([lo + (hi - lo) * u for (lo, hi), u in zip(spans, uniforms)])


def identity_jitter_values(recipe: str) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue) values that change nothing: an official brightness is a delta
    (0), a torchvision one a factor (1); contrast and saturation factors are 1, the hue shift 0."""
    return (0.0 if recipe == "official" else 1.0, 1.0, 1.0, 0.0)


def color_jitter(image: np.ndarray, values: np.ndarray, order: np.ndarray, recipe: str) -> np.ndarray:
    """The four jitter ops in `order` (op ids), each with its value from `values` (indexed by op id)."""
    for op in order:
        image = jitter_op(image, JITTER_OPS[op], values[op], recipe)
    return image


# ---- blur and solarize ---------------------------------------------------------------------------

def gaussian_kernel(sigma: float, kernel_size: int) -> np.ndarray:
    """exp(-x^2 / (2 sigma^2)) over the integer offsets of an odd window, normalized (both recipes)."""
    radius = kernel_size // 2
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    return taps / taps.sum()


def gaussian_blur(image: np.ndarray, sigma: float, kernel_size: int, recipe: str) -> np.ndarray:
    """Separable blur; borders padded with zeros (official: TF's 'SAME' conv) or by reflection (torchvision)."""
    taps = gaussian_kernel(sigma, kernel_size)
    radius = kernel_size // 2
    mode = "constant" if recipe == "official" else "reflect"  # NumPy's reflect = torch's (edge not repeated)
    padded = np.pad(image, ((0, 0), (radius, radius), (radius, radius)), mode=mode)
    height, width = image.shape[1:]
    rows = sum(taps[k] * padded[:, :, k:k + width] for k in range(kernel_size))
    return sum(taps[k] * rows[:, k:k + height, :] for k in range(kernel_size))


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
    """Values at or above the threshold are inverted (1 - v)."""
    return np.where(image < threshold, image, 1.0 - image)


# ---- crop and resize -----------------------------------------------------------------------------

def official_crop_box(height: int, width: int, uniforms: np.ndarray, view: ViewSpec) -> tuple[int, int, int, int]:
    """(top, left, h, w) of dataset.py's _decode_and_random_crop from four U[0, 1) draws.

    Draws: area fraction, log aspect, vertical offset, horizontal offset. One
    try: the sides are rounded (half to even, as tf.round) and clamped to the
    image; the offset is uniform over the valid integer positions. A side is
    kept at least 1 pixel (TF would fail on a zero-size crop of a tiny image).
    """
    area = height * width * (view.crop_scale[0] + (view.crop_scale[1] - view.crop_scale[0]) * uniforms[0])
    log_lo, log_hi = math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1])
    aspect = math.exp(log_lo + (log_hi - log_lo) * uniforms[1])
    w = min(max(1, round(math.sqrt(area * aspect))), width)
    h = min(max(1, round(math.sqrt(area / aspect))), height)
    top = min(int(uniforms[2] * (height - h + 1)), height - h)
    left = min(int(uniforms[3] * (width - w + 1)), width - w)
    return top, left, h, w


def torchvision_crop_box(height: int, width: int, uniforms: np.ndarray, view: ViewSpec,
                         tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) of RandomResizedCrop.get_params from 4 * tries U[0, 1) draws (area, log aspect, top,
    left per try), then its central fallback."""
    log_lo, log_hi = math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1])
    for attempt in range(tries):
        u_area, u_aspect, u_top, u_left = uniforms[4 * attempt:4 * attempt + 4]
        area = height * width * (view.crop_scale[0] + (view.crop_scale[1] - view.crop_scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    ratio = width / height
    if ratio < view.crop_ratio[0]:
        w, h = width, round(width / view.crop_ratio[0])
    elif ratio > view.crop_ratio[1]:
        w, h = round(height * view.crop_ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _filter(x: np.ndarray, interpolation: str) -> np.ndarray:
    """Keys cubic (a = -0.5, TF's and PIL's bicubic) or the triangle (bilinear)."""
    x = np.abs(x)
    if interpolation == "bilinear":
        return np.maximum(0.0, 1.0 - x)
    a = -0.5
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


def resize_weights(length: int, size: int, interpolation: str, antialias: bool) -> np.ndarray:
    """[size, length] resampling matrix: pixel-centre geometry, taps outside the input dropped and the rest
    renormalized (TF's resize and scale_and_translate, PIL); antialias widens the filter when shrinking."""
    scale = length / size
    stretch = max(scale, 1.0) if antialias else 1.0
    centres = (np.arange(size) + 0.5) * scale
    taps = np.arange(length) + 0.5
    weights = _filter((taps[None, :] - centres[:, None]) / stretch, interpolation)
    return weights / weights.sum(axis=1, keepdims=True)


def resize(crop: np.ndarray, size: int, interpolation: str, antialias: bool) -> np.ndarray:
    """A [3, h, w] crop resampled to [3, size, size], clipped to [0, 1] (bicubic overshoots)."""
    rows = resize_weights(crop.shape[1], size, interpolation, antialias)
    cols = resize_weights(crop.shape[2], size, interpolation, antialias)
    return np.clip(rows @ crop @ cols.T, 0.0, 1.0)
