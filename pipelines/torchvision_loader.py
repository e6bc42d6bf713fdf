"""The per-sample CPU baseline: PIL decode + per-image augmentation in DataLoader workers.

Each sample is decoded with `decode.load_rgb`, then made into two views by
the spec's recipe:

- "torchvision": torchvision.transforms.v2, the pipeline most PyTorch BYOL
  repositories use. Random resized crop (the spec's interpolation,
  antialiased) -> flip -> colour jitter (p) -> grayscale (p) -> to float
  [0, 1] -> Gaussian blur (p) -> solarize (p) -> normalize. Jitter and
  grayscale act on the PIL image (8-bit between ops) as in those
  repositories; blur and solarize on float [0, 1] tensors.
- "official": torchvision has no TF-semantics ops (additive brightness,
  per-channel contrast, HSV saturation, one-draw crop), so this recipe runs
  the torch backend's batched ops (`torch_aug.TorchTwoViewAugment`, float32)
  on one image at a time: the same definitions as the fast backends.

Randomness: every sample forks torch's CPU generator with a seed drawn from
(seed, epoch, image index), so a run repeats exactly for any number of workers
and the trainer's global RNG is left untouched; ranks and workers differ
because they read different images, epochs differ because the seed does.

Bad files: a file that cannot be decoded stops the epoch with the decoder's
CorruptImageError (a DataError naming the path), raised in the main process
without a worker traceback. Nothing is substituted silently; run
`byol-fast check-data DIR` before a long job to list every such file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode, v2

from pipelines.decode import load_rgb
from pipelines.device import concrete_device
from pipelines.sources import DataError, ImageList, samples_per_rank, shard_indices
from pipelines.spec import AugmentationSpec, ViewSpec
from pipelines.torch_aug import TorchTwoViewAugment
from pipelines.worker_signals import leave_stop_signals_to_parent


def build_view_transform(spec: AugmentationSpec, view: ViewSpec) -> v2.Compose:
    """One view's torchvision v2 pipeline (PIL RGB image in, normalized float32 tensor out).

    Crop, flip, jitter and grayscale act on the PIL image (uint8, as in the
    common BYOL repositories; PIL's hue shift is twice as fast as the float
    one), blur and solarize on a float tensor. Random ops whose probability
    is 0 are left out (they would only draw a number); the order is the spec's.
    """
    interpolation = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    ops: list[v2.Transform] = [
        v2.RandomResizedCrop(spec.image_size, scale=view.crop_scale, ratio=view.crop_ratio,
                             interpolation=interpolation, antialias=True),
    ]
    if view.flip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(p=view.flip_prob))
    if view.color_jitter_prob > 0:
        jitter = v2.ColorJitter(brightness=view.brightness, contrast=view.contrast,
                                saturation=view.saturation, hue=view.hue)
        ops.append(v2.RandomApply([jitter], p=view.color_jitter_prob))
    if view.grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(p=view.grayscale_prob))
    # Float [0, 1] from here: the blur is a float convolution anyway, and solarize takes the spec's threshold.
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if view.blur_prob > 0:
        blur = v2.GaussianBlur(kernel_size=spec.blur_kernel_size, sigma=view.blur_sigma)
        ops.append(v2.RandomApply([blur], p=view.blur_prob))
    if view.solarize_prob > 0:
        ops.append(v2.RandomSolarize(threshold=view.solarize_threshold, p=view.solarize_prob))
    ops.append(v2.Normalize(mean=list(spec.mean), std=list(spec.std)))
    return v2.Compose(ops)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit torch seed of image `index` in `epoch`: well mixed, so neighbouring indices are unrelated."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class _Failure:
    """A sample that could not be loaded; carried to the main process and raised there."""

    error: DataError


class TwoViewDataset(Dataset):
    """Two augmented views of image `index` of an ImageList; keys are (epoch, index) pairs.

    Returns (view1, view2, label) with views (3, S, S) float32, normalized.
    The epoch travels in the key, so persistent workers need no message
    when the epoch changes.
    """

    def __init__(self, images: ImageList, spec: AugmentationSpec, seed: int = 0) -> None:
        if not isinstance(spec, AugmentationSpec):
            raise TypeError(f"spec must be an AugmentationSpec, got {type(spec).__name__}")
        self.images, self.spec, self.seed = images, spec, seed
        if spec.recipe == "torchvision":
            self.view_transforms = tuple(build_view_transform(spec, view) for view in spec.views)
        else:
            self.augment = TorchTwoViewAugment(spec)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, int] | _Failure:
        epoch, index = key
        try:
            image = load_rgb(self.images.files[index])
        except DataError as err:
            return _Failure(err)
        # Fork so the per-sample seed never disturbs the caller's RNG (matters with workers=0).
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue CUDA seeding (a stack trace each call).
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            view1, view2 = self._views(image)
        return view1, view2, self.images.labels[index]

    def _views(self, image) -> tuple[Tensor, Tensor]:
        """Both (3, S, S) float32 normalized views of a PIL image, drawing from torch's default generator."""
        if self.spec.recipe == "torchvision":
            return tuple(transform(image).as_subclass(Tensor) for transform in self.view_transforms)
        batch = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
        return tuple(view[0] for view in self.augment(batch))


class _ShardSampler(Sampler):
    """This rank's keys for the current epoch, from sources.shard_indices."""

    def __init__(self, num_items: int, rank: int, world_size: int, seed: int, batch_size: int,
                 shuffle: bool, drop_last: bool) -> None:
        self.args = dict(num_items=num_items, rank=rank, world_size=world_size, seed=seed,
                         shuffle=shuffle, drop_last=drop_last, batch_size=batch_size)
        self.epoch = 0
        shard_indices(epoch=0, **self.args)  # fail at construction on a bad rank or too few images

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, int(i)) for i in shard_indices(epoch=self.epoch, **self.args)])

    def __len__(self) -> int:
        a = self.args
        return samples_per_rank(a["num_items"], a["world_size"], a["batch_size"], a["drop_last"], a["rank"])


def _collate(samples: list, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | _Failure:
    """Stack a batch in the workers, already in the output dtype and channels_last (halves the bf16 transfer)."""
    for sample in samples:
        if isinstance(sample, _Failure):
            return sample
    view1, view2, labels = zip(*samples)
    views = (torch.stack(v).to(dtype, memory_format=torch.channels_last) for v in (view1, view2))
    return (*views, torch.tensor(labels, dtype=torch.int64))


def default_workers() -> int:
    """DataLoader processes when none are given: the usable CPUs, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


class TorchvisionTwoViewLoader:
    """Iterate (view1, view2, labels) batches of one rank, per the DESIGN data contract.

    view1/view2: (batch_size, 3, S, S), channels_last, normalized, `dtype`,
    on `device`; labels: int64 (batch_size,) on `device`. `set_epoch(e)`
    picks the epoch's shuffle and augmentations; `len()` is batches per epoch.
    """

    def __init__(self, images: ImageList, spec: AugmentationSpec, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1 (images per rank per step)")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        workers = default_workers() if workers is None else workers
        if workers < 0:
            raise ValueError(f"workers={workers} must be >= 0 (0 loads in the main process)")
        self.device = concrete_device(device)
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype={self.dtype} must be a floating type (the views are normalized)")
        self.batch_size = batch_size
        self.dataset = TwoViewDataset(images, spec, seed)
        self.sampler = _ShardSampler(len(images), rank, world_size, seed, batch_size, shuffle, drop_last)
        self._loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                  collate_fn=functools.partial(_collate, dtype=self.dtype),
                                  pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                  drop_last=drop_last,
                                  prefetch_factor=4 if workers > 0 else None,
                                  worker_init_fn=leave_stop_signals_to_parent,  # the trainer handles stops
                                  # Its own generator: DataLoader draws worker base seeds from it, not from
                                  # the caller's global RNG (samples are seeded per image anyway).
                                  generator=torch.Generator())

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch `iter(self)` reads (its shuffle and its augmentations)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.sampler.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.batches(self.sampler.epoch)

    def batches(self, epoch: int, out: tuple[Tensor, Tensor] | None = None
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Iterate epoch `epoch`; with out=(buf1, buf2) each batch is copied into those buffers and they are yielded.

        The buffers must be (batch_size, 3, S, S) on the loader's device; the
        copy converts dtype and layout, and they are overwritten next step.
        """
        self.set_epoch(epoch)
        size = self.dataset.spec.image_size
        if out is not None:
            expected = (self.batch_size, 3, size, size)
            for buffer in out:
                if tuple(buffer.shape) != expected or buffer.device != self.device:
                    raise ValueError(f"out buffers must be {expected} on {self.device}, "
                                     f"got {tuple(buffer.shape)} on {buffer.device}")
        non_blocking = self.device.type == "cuda"
        for batch in self._loader:
            if isinstance(batch, _Failure):
                raise batch.error
            # Already dtype and channels_last (pinned when on CUDA): only the transfer is left.
            view1, view2, labels = (t.to(self.device, non_blocking=non_blocking) for t in batch)
            if out is not None and len(labels) == self.batch_size:
                out[0].copy_(view1, non_blocking=non_blocking)
                out[1].copy_(view2, non_blocking=non_blocking)
                yield out[0], out[1], labels
            else:
                yield view1, view2, labels


def build_torchvision_loader(images: ImageList, spec: AugmentationSpec, batch_size: int, rank: int = 0,
                             world_size: int = 1, seed: int = 0, workers: int | None = None,
                             device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                             shuffle: bool = True, drop_last: bool = True) -> TorchvisionTwoViewLoader:
    """The CPU baseline loader for one rank (see TorchvisionTwoViewLoader); dtype None: bf16 on CUDA, else fp32."""
    return TorchvisionTwoViewLoader(images, spec, batch_size, rank=rank, world_size=world_size, seed=seed,
                                    workers=workers, device=device, dtype=dtype, shuffle=shuffle,
                                    drop_last=drop_last)
