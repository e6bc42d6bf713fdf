"""Frozen-encoder features for evaluation: deterministic transforms, datasets, batched extraction.

Evaluation reads images two ways: from files (`pipelines.sources.ImageList`,
decoded with `pipelines.decode.load_rgb`) and from uint8 arrays held in memory
(`InMemoryImages`: STL-10's binary files, small test sets). Both go through the
same torchvision transforms and the same `extract_features`, so a probe's
numbers do not depend on where the pixels came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from pipelines.decode import load_rgb
from pipelines.sources import DataError, ImageList
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD

EVAL_CROP_FRACTION = 224 / 256
"""Centre crop as a fraction of the resized short side: 224 of 256, the standard ImageNet evaluation."""


@dataclass(frozen=True)
class InMemoryImages:
    """An ImageList-like labelled set whose pixels are a uint8 array [N, 3, H, W] (a view or memmap is fine).

    `labels[i]` is image i's label in [0, len(classes)), or -1 for an unlabeled image.
    """

    pixels: np.ndarray
    """uint8 [N, 3, H, W]; may be a strided view (e.g. STL-10's transposed memmap)."""
    labels: list[int]
    """One label per image; -1 marks an unlabeled image."""
    classes: list[str]
    """Name of each label."""

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4 or self.pixels.shape[1] != 3 or self.pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be uint8 [N, 3, H, W], got {self.pixels.dtype} {self.pixels.shape}")
        if len(self.labels) != self.pixels.shape[0]:
            raise ValueError(f"{self.pixels.shape[0]} images but {len(self.labels)} labels: pass one label per image")

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of label values (`len(classes)`)."""
        return len(self.classes)

    def image(self, index: int) -> Image.Image:
        """Image `index` as an RGB PIL image (a copy)."""
        return Image.fromarray(np.ascontiguousarray(self.pixels[index].transpose(1, 2, 0)), "RGB")


Images = ImageList | InMemoryImages
"""Any labelled image set evaluation reads."""


def load_image(images: Images, index: int) -> Image.Image:
    """Image `index` of either kind of set, as RGB."""
    if isinstance(images, InMemoryImages):
        return images.image(index)
    return load_rgb(images.files[index])


def check_crop_fraction(crop_fraction: float, name: str = "crop_fraction") -> None:
    """Raise ValueError unless 0 < crop_fraction <= 1; `name` is what the message calls it (e.g. a CLI flag)."""
    if not 0.0 < crop_fraction <= 1.0:  # written so that NaN fails too
        raise ValueError(f"{name}={crop_fraction} must lie in (0, 1]: it is the centre crop's share of the resized "
                         f"short side (0.875 = 224/256 is the usual one; 1 keeps the whole image)")


def eval_transform(image_size: int, crop_fraction: float = EVAL_CROP_FRACTION,
                   mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Callable:
    """Deterministic view for evaluation: bicubic resize of the short side to image_size / crop_fraction,
    centre crop image_size, normalize (as in BYOL's evaluation; crop_fraction=1 keeps the whole image)."""
    check_crop_fraction(crop_fraction)
    return transforms.Compose([
        transforms.Resize(round(image_size / crop_fraction), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def train_transform(image_size: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> Callable:
    """The linear probe's training view: random resized crop (torchvision defaults, bicubic) and flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class TransformedImages(Dataset):
    """(transform(image), label) pairs from an ImageList or InMemoryImages."""

    def __init__(self, images: Images, transform: Callable) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.images, index)), self.images.labels[index]


def check_labelled_split(images: Images, name: str) -> None:
    """Raise DataError naming split `name` when it has no images or holds unlabeled (-1) ones."""
    if len(images) == 0:
        raise DataError(f"the {name} split holds no images: add images to it or point at the right folder")
    if min(images.labels) < 0:
        raise DataError(f"the {name} split holds unlabeled images (label -1): evaluation needs a labelled split "
                        f"(for STL-10 use 'train' or 'test', not 'unlabeled')")


@torch.no_grad()
def encode(encoder: nn.Module, batch: Tensor, device: torch.device) -> Tensor:
    """Frozen representation of one normalized batch: channels_last, bf16 autocast on CUDA, float32 out."""
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return encoder(batch).flatten(1).float()


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Images, *, image_size: int, device: torch.device | str = "cpu",
                     batch_size: int = 256, num_workers: int = 0,
                     crop_fraction: float = EVAL_CROP_FRACTION) -> tuple[Tensor, Tensor]:
    """Features [N, D] (float32) and labels [N] (int64) of every image, on `device`, in the set's order.

    The encoder runs in eval mode (BatchNorm uses running statistics) and is put
    back in its previous mode afterwards, so this is safe in the middle of training.
    """
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    # A private generator: a DataLoader without one draws its base seed from torch's global RNG, which would
    # shift the trainer's random stream whenever the kNN monitor runs.
    loader = DataLoader(TransformedImages(images, eval_transform(image_size, crop_fraction)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())
    features, labels = [], []
    try:
        for batch, batch_labels in loader:
            features.append(encode(encoder, batch, device))
            labels.append(batch_labels.to(device))
    finally:
        encoder.train(was_training)
    return torch.cat(features), torch.cat(labels).long()
