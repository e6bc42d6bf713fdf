"""The one place the BYOL augmentation recipe lives; every backend reads it.

Defaults are the official BYOL recipe (Grill et al., 2020, and DeepMind's
implementation): both views share crop, flip, colour jitter and grayscale; they
differ in blur probability (1.0 / 0.1) and solarize probability (0.0 / 0.2).

Two named recipes fix what each op *means* (the numbers are the same):

- "official" (default): DeepMind's byol/utils/{augmentations,dataset}.py with
  TensorFlow image semantics. Crop: one draw of area U(scale) and log-uniform
  aspect, sides clamped to the image, no retries; bicubic resize (Keys a=-0.5)
  without antialiasing. Jitter: brightness adds a delta U[-b, b]; contrast
  scales each channel about its own mean by U[1-c, 1+c]; saturation multiplies
  the HSV saturation by U[1-s, 1+s] (clipped to [0, 1]); hue shifts the HSV hue
  by U[-h, h] turns; each op clips to [0, 1]; a random order per sample. Blur
  pads with zeros.
- "torchvision": torchvision.transforms' definitions, as most PyTorch BYOL
  repositories use them. Crop: RandomResizedCrop (ten tries, then a central
  fallback), antialiased. Jitter: brightness multiplies by U[1-b, 1+b];
  contrast and saturation blend with the mean gray level and the grayscale
  image; hue as above. Blur pads by reflection.

pipelines/reference.py implements both in float64 (the tests' reference);
pipelines/fidelity.py says where a backend cannot express an op exactly and
measures by how much.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RECIPES = ("official", "torchvision")
"""Named definitions of the ops (module docstring)."""
INTERPOLATIONS = ("bicubic", "bilinear")


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    lo, hi = bounds
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name}={bounds} must satisfy {low} <= min <= max <= {high}")


def _check_pair(name: str, value) -> None:
    """Ranges arrive from TOML and --set as lists or strings: name the setting when one is not two numbers."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name}={value!r} must be two numbers (min, max), e.g. {name} = [0.08, 1.0]")


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p} is a probability: use a value in [0, 1]")


@dataclass(frozen=True)
class ViewSpec:
    """The random transforms that make one view, applied in this order."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: range of the crop's area as a fraction of the image."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Random resized crop: range of the crop's aspect ratio (width / height)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip."""
    color_jitter_prob: float = 0.8
    """Probability of applying colour jitter (its four ops in a random order)."""
    brightness: float = 0.4
    """Brightness strength b: official adds a delta U[-b, b]; torchvision multiplies by U[1 - b, 1 + b]."""
    contrast: float = 0.4
    """Contrast strength c: a factor U[1 - c, 1 + c] about each channel's mean (official) or the mean gray
    level (torchvision)."""
    saturation: float = 0.2
    """Saturation strength s: a factor U[1 - s, 1 + s] on the HSV saturation (official) or a blend with the
    grayscale image (torchvision)."""
    hue: float = 0.1
    """Hue shift drawn from [-h, h], in turns of the colour wheel (HSV in both recipes)."""
    grayscale_prob: float = 0.2
    """Probability of converting to grayscale (kept as 3 channels)."""
    blur_prob: float = 1.0
    """Probability of a Gaussian blur."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's standard deviation, in pixels of the output view (kernel: see blur_kernel_size)."""
    solarize_prob: float = 0.0
    """Probability of solarizing (inverting values at or above the threshold)."""
    solarize_threshold: float = 0.5
    """Solarize threshold on the [0, 1] scale."""

    def __post_init__(self) -> None:
        _check_pair("crop_scale", self.crop_scale)
        _check_pair("crop_ratio", self.crop_ratio)
        _check_pair("blur_sigma", self.blur_sigma)
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        if self.crop_scale[1] <= 0:
            raise ValueError(f"crop_scale={self.crop_scale} must allow a non-empty crop")
        _check_range("crop_ratio", self.crop_ratio, 1e-3, 1e3)
        _check_range("blur_sigma", self.blur_sigma, 0.0, 100.0)
        if self.blur_sigma[0] <= 0:  # a zero-width Gaussian is 0/0: NaN views (torchvision refuses it too)
            raise ValueError(f"blur_sigma={self.blur_sigma} must start above 0 (BYOL uses (0.1, 2.0))")
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            _check_probability(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue={self.hue} must lie in [0, 0.5]")
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise ValueError(f"solarize_threshold={self.solarize_threshold} must lie in [0, 1]")


@dataclass(frozen=True)
class AugmentationSpec:
    """Both views of BYOL plus the output geometry and normalization."""

    image_size: int = 224
    """Side of each square output view, in pixels."""
    recipe: str = "official"
    """What the ops mean: "official" (DeepMind's BYOL, TF semantics) or "torchvision" (module docstring)."""
    view1: ViewSpec = field(default_factory=lambda: ViewSpec(blur_prob=1.0, solarize_prob=0.0))
    """The first view: always blurred, never solarized."""
    view2: ViewSpec = field(default_factory=lambda: ViewSpec(blur_prob=0.1, solarize_prob=0.2))
    """The second view: rarely blurred, sometimes solarized."""
    interpolation: str = "bicubic"
    """Resampling of the random resized crop: "bicubic" (official) or "bilinear"."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after augmentation (on the [0, 1] scale)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided after augmentation."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} is too small: use at least 8 (224 for ImageNet)")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r} is not a recipe: use one of {', '.join(RECIPES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std={self.std} must be positive")

    @property
    def views(self) -> tuple[ViewSpec, ViewSpec]:
        return (self.view1, self.view2)

    @property
    def blur_kernel_size(self) -> int:
        """Odd kernel side, 10% of the image as in the official recipe (radius int(S / 10 / 2)): 23 at 224."""
        return 2 * (self.image_size // 20) + 1

    @property
    def antialias(self) -> bool:
        """Whether the crop's resize low-pass filters when it shrinks: torchvision's, not TF's (official)."""
        return self.recipe == "torchvision"

    def replace(self, **changes) -> "AugmentationSpec":
        """A copy with some fields changed (e.g. `spec.replace(image_size=96)`)."""
        return dataclasses.replace(self, **changes)
