"""BYOL two-view batches from an FFCV .beton: CPU decode + crops, colour on the target device.

Per sample, ffcv's JIT-compiled, multi-threaded loop decodes the JPEG once
and cuts both random resized crops (TwoViewCropDecoder in ffcv_ops), giving
uint8 (B, 2, S, S, 3) batches in pinned memory. They go to the training device
where TorchTwoViewAugment.colour does flip, colour jitter, grayscale, blur,
solarize and normalization, so every view honours the one AugmentationSpec.

Order: each rank reads `shard_indices(...)` of the valid entries, the
per-epoch permutation every backend shares, with explicit rank/world_size
(no torch.distributed needed) and the last partial batch dropped. The crops of
a sample depend only on (seed, epoch, sample, view), not on rank or threads.

This module is also `byol-fast convert-ffcv` (build_parser/main come from
ffcv_convert). It imports ffcv only when a loader is built.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipelines.ffcv_convert import TOMBSTONE_LABEL, build_parser, main, require_ffcv
from pipelines.sources import DataError, samples_per_rank, shard_indices
from pipelines.spec import AugmentationSpec
from pipelines.torch_aug import TorchTwoViewAugment, epoch_seeds

__all__ = ["FfcvTwoViewLoader", "build_parser", "main"]

_LOG = logging.getLogger(__name__)
ORDERS = ("random", "quasi_random")


def _open_beton(path: Path):
    """ffcv's Reader for `path`, with the image/label fields convert_to_beton writes; DataError otherwise."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    if path.is_dir():  # an image folder: the other backends read it as is; ffcv needs it converted first
        raise DataError(f"{path} is an image folder, not an FFCV file: convert it with `byol-fast convert-ffcv "
                        f"{path} OUT.beton` and pass --data OUT.beton, or read the folder with another "
                        f"--data-backend (torch, dali, torchvision)")
    if not path.is_file():
        raise DataError(f"FFCV file {path} does not exist: create it with `byol-fast convert-ffcv IMAGE_DIR {path}`")
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - ffcv raises assorted errors (AssertionError, ValueError) on a bad file
        raise DataError(f"{path} is not a readable FFCV file ({type(err).__name__}: {err}): re-create it with "
                        f"`byol-fast convert-ffcv`") from err
    kinds = {name: type(handler) for name, handler in reader.handlers.items()}
    if kinds.get("image") is not RGBImageField or kinds.get("label") is not IntField:
        raise DataError(f"{path} has fields {sorted(kinds)}; this loader needs 'image' (RGBImageField) and 'label' "
                        f"(IntField) as `byol-fast convert-ffcv` writes them")
    return reader


class FfcvTwoViewLoader:
    """Iterate (view1, view2, labels) batches of one rank from an FFCV file, per the DESIGN data contract.

    view1/view2: (batch_size, 3, S, S), channels_last, normalized, `dtype`, on
    `device`; labels: int64 (batch_size,) on `device`. With out=(buf1, buf2)
    the views are written into those buffers (e.g. a captured graph's static
    inputs) and the same buffers are yielded every step.

    num_workers: decode threads (< 1: every CPU). ffcv sets numba's and
    torch's CPU thread counts to it process-wide (ffcv's Compiler does).
    order: "random" (shard_indices, any world size) or "quasi_random" (ffcv's
    page-local shuffle for files larger than RAM; world_size 1 only; reads
    through a process cache instead of the OS cache).
    The first batch pays numba's JIT compile (seconds); len() is batches per epoch.
    """

    def __init__(self, beton_path: str | Path, spec: AugmentationSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: str | torch.device = "cuda",
                 dtype: torch.dtype | None = None, num_workers: int = -1, out: tuple[Tensor, Tensor] | None = None,
                 order: str = "random", batches_ahead: int = 3) -> None:
        require_ffcv()
        import numba
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec

        from pipelines import ffcv_ops

        if not isinstance(spec, AugmentationSpec):
            raise TypeError(f"spec must be an AugmentationSpec, got {type(spec).__name__}")
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: use one of {ORDERS}")
        if order == "quasi_random" and world_size != 1:
            raise ValueError("order='quasi_random' works on one rank only (ffcv 1.0.2); use order='random'")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        if num_workers > numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"num_workers={num_workers} exceeds numba's {numba.config.NUMBA_NUM_THREADS} threads "
                             f"(one per CPU; raise NUMBA_NUM_THREADS or use fewer workers)")
        self.path = Path(beton_path).expanduser().resolve()
        self.spec, self.batch_size, self.seed, self.rank = spec, batch_size, seed, rank
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        reader = _open_beton(self.path)
        labels = reader.metadata[f"f{reader.field_names.index('label')}"]
        self.valid = np.flatnonzero(labels != TOMBSTONE_LABEL).astype(np.int64)
        self.num_tombstones = len(labels) - len(self.valid)
        if self.num_tombstones:
            _LOG.warning("%s: %d of %d entries stand for images unreadable at conversion and are left out "
                         "(listed in %s.skipped.txt)", self.path, self.num_tombstones, len(labels), self.path)
        # Fails fast, naming the fix, on a bad rank/world_size/batch_size or too few images for a full batch.
        shard_indices(len(self.valid), rank, world_size, 0, seed, batch_size=batch_size)
        self._per_rank = samples_per_rank(len(self.valid), world_size, batch_size)
        self._check_out(out)
        self.out = out

        self._control = ffcv_ops.new_control_block()
        decoder = ffcv_ops.TwoViewCropDecoder(spec, seed, self._control)
        quasi = order == "quasi_random"
        self._loader = Loader(
            str(self.path), batch_size=batch_size, num_workers=num_workers, os_cache=not quasi,
            order=OrderOption.QUASI_RANDOM if quasi else OrderOption.SEQUENTIAL, seed=seed,
            indices=self.valid if quasi else None, drop_last=True, batches_ahead=batches_ahead,
            pipelines={"image": PipelineSpec("image", decoder=decoder),
                       "label": PipelineSpec("label", decoder=IntDecoder())})
        if not quasi:
            # ffcv 1.0.2 cannot take a custom order through `order=` (see ShardedOrder); install it here.
            self._loader.traversal_order = ffcv_ops.ShardedOrder(self._loader, self.valid, rank, world_size,
                                                                 seed, batch_size)
            self._loader.first_traversal_order = self._loader.next_traversal_order()
        self._augment = TorchTwoViewAugment(spec, self.device, self.dtype)
        # Colour randomness: one generator, seeded per (seed, epoch, rank) as the torch backend's and consumed in
        # batch order, so an epoch's views are the same whenever it is read (a resumed run repeats them).
        self._generator = torch.Generator(self.device)
        self._epoch = 0
        self._active = None

    def _check_out(self, out: tuple[Tensor, Tensor] | None) -> None:
        if out is None:
            return
        size = self.spec.image_size
        shape = (self.batch_size, 3, size, size)
        for buf in out:
            if (tuple(buf.shape) != shape or buf.dtype != self.dtype or buf.device.type != self.device.type
                    or not buf.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError(f"out buffers must be {self.dtype} {shape} channels_last on {self.device}; "
                                 f"got {buf.dtype} {tuple(buf.shape)} on {buf.device}")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._per_rank // self.batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration read `epoch` (its order and crops), e.g. when resuming."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self._epoch = epoch

    def _stop_active(self) -> None:
        """Stop the ffcv thread of an unfinished epoch before the epoch number changes under it."""
        iterator, self._active = self._active, None
        if iterator is None:
            return
        iterator.close()
        while iterator.is_alive():  # drain, or it may block forever putting a batch nobody takes
            try:
                iterator.output_queue.get(timeout=0.05)
            except queue.Empty:
                pass
        iterator.join()

    def close(self) -> None:
        """Stop an unfinished epoch's ffcv thread and drop the ffcv Loader, and with it the file's memory map.

        Safe to call twice. The loader cannot be iterated afterwards: build a new one (ffcv compiles anew).
        """
        self._stop_active()
        # Dropped, not closed: ffcv 1.0.2's Loader has no close(). Its traversal orders point back at it, so
        # the map goes at the next garbage collection rather than at once.
        self._loader = None

    @staticmethod
    def _batches_of(iterator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """ffcv EpochIterator.__next__, but an error in its thread raises here instead of hanging forever.

        (ffcv's own __next__ blocks on its queue for good if the thread dies; it
        also makes the current CUDA stream wait on ffcv's streams, which our
        CPU-only ffcv pipeline never uses, so that step is left out.)
        """
        while True:
            try:
                item = iterator.output_queue.get(timeout=0.5)
            except queue.Empty:
                if not iterator.is_alive() and iterator.output_queue.empty():
                    raise RuntimeError("the FFCV loader thread died; its traceback is printed above") from None
                continue
            if item is None:
                iterator.close()
                return
            yield item[1]

    def raw_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of (crops, labels) as ffcv makes them: uint8 (B, 2, S, S, 3) and int64 (B,), on the CPU.

        The tensors alias ffcv's pinned buffers, which it refills once the next
        batch is requested: use or copy them before asking for it.
        """
        from pipelines import ffcv_ops

        if self._loader is None:
            raise RuntimeError(f"this FfcvTwoViewLoader of {self.path} was closed: build a new one to read it again")
        self._stop_active()
        self._control[ffcv_ops.CONTROL_EPOCH] = self._epoch
        self._control[ffcv_ops.CONTROL_FAILED] = 0
        self._loader.next_epoch = self._epoch
        self._epoch += 1
        iterator = self._active = iter(self._loader)
        try:
            for crops, labels in self._batches_of(iterator):
                failed = int(self._control[ffcv_ops.CONTROL_FAILED])
                if failed:
                    raise DataError(f"{self.path}: entry {failed - 1} failed to decode (the file is damaged); "
                                    f"re-create it with `byol-fast convert-ffcv`")
                yield torch.from_numpy(crops), torch.from_numpy(labels).view(-1)
        finally:
            if self._active is iterator:  # an abandoned epoch must not stop a newer one when collected
                self._stop_active()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One epoch of (view1, view2, labels) on the device; each call starts the next epoch."""
        on_cuda = self.device.type == "cuda"
        copied = None
        self._generator.manual_seed(epoch_seeds(self.seed, self._epoch, self.rank)[1])
        batches = self.raw_batches()
        while True:
            if copied is not None:
                # Sync point, on purpose: ffcv reuses the previous batch's pinned buffer once the next batch
                # is taken, so its host-to-device copy must be done. It was queued a step ago and is done
                # unless the host runs more than a step ahead of the GPU.
                copied.synchronize()
            batch = next(batches, None)
            if batch is None:
                return
            crops, labels = batch
            crops = crops.to(self.device, non_blocking=True)
            # On the CPU .to() is the same tensor, a view of ffcv's reused buffer: copy what we hand out.
            labels = labels.to(self.device, non_blocking=True) if on_cuda else labels.clone()
            if on_cuda:
                copied = torch.cuda.Event()
                copied.record()
            views = []
            for index in range(2):
                # (B, S, S, 3) -> (B, 3, S, S) is a view with channels_last strides: no copy.
                view_crops = crops[:, index].permute(0, 3, 1, 2)
                target = None if self.out is None else self.out[index]
                views.append(self._augment.colour(view_crops, index, self._generator, out=target))
            yield views[0], views[1], labels
