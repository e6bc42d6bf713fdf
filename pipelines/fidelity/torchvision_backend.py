"""The torchvision loader's ops for pipelines.fidelity.

Official recipe: the loader runs the torch backend's ops per image, so this
delegates to `torch_backend`. Torchvision recipe: transforms.v2's functional
ops, on the PIL image (8-bit) for jitter and grayscale and on float tensors for
blur and solarize, as build_view_transform composes them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from pipelines.fidelity import torch_backend
from pipelines.spec import AugmentationSpec, ViewSpec

_PIL_OPS = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast, "saturation": F.adjust_saturation,
            "hue": F.adjust_hue}


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8))


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255


def _tv_op(op: str, image: np.ndarray, value: float, spec: AugmentationSpec) -> np.ndarray:
    if op in _PIL_OPS:
        return _from_pil(_PIL_OPS[op](_to_pil(image), value))
    if op == "grayscale":
        return _from_pil(F.rgb_to_grayscale(_to_pil(image), num_output_channels=3))
    tensor = torch.from_numpy(image).float()
    if op == "blur":
        kernel = spec.blur_kernel_size
        return F.gaussian_blur(tensor, [kernel, kernel], [float(value)] * 2).double().numpy()
    return F.solarize(tensor, spec.view2.solarize_threshold).double().numpy()


def apply_op(op: str, images: np.ndarray, values: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    if spec.recipe == "official":
        return torch_backend.apply_op(op, images, values, spec)
    return np.stack([_tv_op(op, image, value, spec) for image, value in zip(images, values)])


def resize(images: np.ndarray, boxes: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    if spec.recipe == "official":
        return torch_backend.resize(images, boxes, spec)
    mode = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    size = [spec.image_size, spec.image_size]
    return np.stack([_from_pil(F.resized_crop(Image.fromarray(image), *map(int, box), size, interpolation=mode,
                                              antialias=True)) for image, box in zip(images, boxes)])


def crop_boxes(height: int, width: int, n: int, view: ViewSpec, spec: AugmentationSpec, seed: int) -> np.ndarray:
    if spec.recipe == "official":
        return torch_backend.crop_boxes(height, width, n, view, spec, seed)
    crop = v2.RandomResizedCrop(spec.image_size, scale=view.crop_scale, ratio=view.crop_ratio)
    blank = torch.zeros(3, height, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        boxes = [crop.make_params([blank]) for _ in range(n)]
    return np.array([[b["top"], b["left"], b["height"], b["width"]] for b in boxes])
