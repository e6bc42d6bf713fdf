"""The torchvision and torch backends over shards: the same two views, from a ShardPlan's streams.

- torchvision: each DataLoader worker reads one stream of the plan (an IterableDataset yielding whole
  batches); DataLoader takes batch k from worker k % workers, which is the plan's round-robin. Each
  sample is decoded with `decode.decode_rgb` and made into views by `TwoViewDataset._views`, seeded by
  (seed, epoch, epoch position) as the folder backend seeds by image index.
- torch: one thread per stream reads (and on the CPU decodes, `torch_pipeline.decode_cpu`) its
  batches a step ahead; crops and colour are the folder pipeline's (`TorchImagePipeline._crop_pairs`,
  `TorchTwoViewAugment.colour`), with generators seeded per (seed, epoch, rank, batch).

Both start any batch of an epoch without producing the ones before it (the plan knows its samples),
so a mid-epoch resume reads only from the first shard it still needs and makes the same views.
Bad samples (pipelines/shards/reader.py) are replaced in their batch and counted by the ledger.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.decode import CorruptImageError, decode_rgb
from pipelines.shards.plan import ShardPlan
from pipelines.shards.reader import BadSampleLedger, Item, fill_from_good, stream_batches
from pipelines.shards.source import ShardSet
from pipelines.sources import ImageList
from pipelines.spec import AugmentationSpec
from pipelines.torch_aug import TorchTwoViewAugment
from pipelines.torch_pipeline import TorchImagePipeline, decode_cpu, decode_to_device
from pipelines.torchvision_loader import TwoViewDataset, sample_seed
from pipelines.worker_signals import leave_stop_signals_to_parent


def first_of_stream(start: int, stream: int, streams: int) -> int:
    """How many of stream `stream`'s batches (stream, stream + S, ...) come before the rank's batch `start`."""
    return max(0, -(-(start - stream) // streams))


def _named(item: Item) -> str:
    return f"{item.shard}:{item.key}"


class _ShardBatches(IterableDataset):
    """In each DataLoader worker: its stream's batches of one epoch as (view1, view2, labels, bad items)."""

    def __init__(self, shards: ShardSet, plan: ShardPlan, spec: AugmentationSpec, seed: int,
                 dtype: torch.dtype) -> None:
        self.shards, self.plan, self.seed, self.dtype = shards, plan, seed, dtype
        self.views = TwoViewDataset(ImageList([], [], list(shards.classes)), spec, seed)
        self.epoch, self.start = 0, 0

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # Worker w makes the rank's batches start + w, start + w + S, ...: DataLoader's round-robin then
        # yields them in order from `start` on.
        stream = (self.start + worker) % self.plan.streams
        first = first_of_stream(self.start, stream, self.plan.streams)
        for items in stream_batches(self.shards, self.plan, self.epoch, stream, first):
            yield self._views(items)

    def _views(self, items: list[Item]) -> tuple[Tensor, Tensor, Tensor, list[Item]]:
        images = []
        for item in items:
            image = None
            if item.problem is None:
                try:
                    image = decode_rgb(item.sample.image, _named(item))
                except CorruptImageError as err:
                    item.problem = f"image does not decode ({str(err).removeprefix(_named(item) + ' ')})"
            images.append(image)
        source = fill_from_good([image is not None for image in images])
        view1, view2, labels = [], [], []
        for item, k in zip(items, source):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, item.position))
                one, two = self.views._views(images[k])
            view1.append(one)
            view2.append(two)
            labels.append(items[k].sample.label)
        stacked = (torch.stack(v).to(self.dtype, memory_format=torch.channels_last) for v in (view1, view2))
        return (*stacked, torch.tensor(labels, dtype=torch.int64), [i for i in items if i.problem])


class ShardTorchvisionLoader:
    """(view1, view2, labels) batches of one rank from shards, per sample on CPU workers (module docstring)."""

    def __init__(self, shards: ShardSet, spec: AugmentationSpec, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int = 2, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.001, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.plan = ShardPlan(tuple(shards.counts), rank, world_size, batch_size, seed, max(1, workers),
                              shuffle_buffer)
        self.device, self.workers = torch.device(device), workers
        self.dataset = _ShardBatches(shards, self.plan, spec, seed, dtype)
        self.ledger = BadSampleLedger(self.plan.samples_per_rank, max_bad_fraction)

    def __len__(self) -> int:
        return self.plan.num_batches

    def batches(self, epoch: int, start: int = 0, out: tuple[Tensor, Tensor] | None = None
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Epoch `epoch` from its batch `start`; with `out` each batch is copied into those buffers."""
        self.dataset.epoch, self.dataset.start = epoch, start
        # Fresh workers each epoch: they pick up (epoch, start) with the dataset.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.workers else None,
                            worker_init_fn=leave_stop_signals_to_parent, generator=torch.Generator())
        non_blocking = self.device.type == "cuda"
        for view1, view2, labels, bad in loader:
            for item in bad:
                self.ledger.record(epoch, item)
            view1, view2, labels = (t.to(self.device, non_blocking=non_blocking) for t in (view1, view2, labels))
            if out is not None:
                out[0].copy_(view1, non_blocking=non_blocking)
                out[1].copy_(view2, non_blocking=non_blocking)
                view1, view2 = out
            yield view1, view2, labels


def batch_seeds(seed: int, epoch: int, rank: int, batch: int) -> tuple[int, int]:
    """The crop and colour seeds of one batch of the torch backend over shards (63 bits each)."""
    crop, colour = np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(2, np.uint64) >> np.uint64(1)
    return int(crop), int(colour)


class ShardTorchPipeline(TorchImagePipeline):
    """The torch backend over shards: (view1, view2, labels) per batch on `device` (module docstring)."""

    def __init__(self, shards: ShardSet, spec: AugmentationSpec, batch_size: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_threads: int = 2, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.001) -> None:
        # Not TorchImagePipeline.__init__: no ImageList; the attributes its crop stage reads are set here.
        self.shards, self.spec, self.batch_size = shards, spec, batch_size
        self.device = torch.device(device)
        self.rank, self.seed = rank, seed
        self.plan = ShardPlan(tuple(shards.counts), rank, world_size, batch_size, seed, max(1, num_threads),
                              shuffle_buffer)
        self.ledger = BadSampleLedger(self.plan.samples_per_rank, max_bad_fraction)
        self.augment = TorchTwoViewAugment(spec, self.device, dtype)
        self._pool = ThreadPoolExecutor(max_workers=self.plan.streams, thread_name_prefix="byol-shard")

    def __len__(self) -> int:
        return self.plan.num_batches

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _next_decoded(self, batches: Iterator[list[Item]]) -> tuple[list[Item], list[Tensor | None]]:
        """In a stream thread: the stream's next batch, decoded to uint8 CHW on the CPU device (bytes on CUDA)."""
        items = next(batches)
        images: list[Tensor | None] = []
        for item in items:
            image = None
            if item.problem is None:
                data = torch.frombuffer(bytearray(item.sample.image), dtype=torch.uint8)
                try:
                    image = data if self.device.type == "cuda" else decode_cpu(data, _named(item))
                except CorruptImageError as err:
                    item.problem = f"image does not decode ({str(err).removeprefix(_named(item) + ' ')})"
            images.append(image)
        return items, images

    def batches(self, epoch: int, out: tuple[Tensor, Tensor] | None = None, start: int = 0
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Epoch `epoch` from its batch `start`; with out=(buf1, buf2) the views are written into them."""
        streams = self.plan.streams
        readers = [stream_batches(self.shards, self.plan, epoch, s, first_of_stream(start, s, streams))
                   for s in range(streams)]
        pending: dict[int, Future] = {}

        def ask(batch: int) -> None:
            if batch < self.plan.num_batches:
                pending[batch] = self._pool.submit(self._next_decoded, readers[batch % streams])

        for batch in range(start, min(start + streams, self.plan.num_batches)):
            ask(batch)  # one batch in flight per stream
        for batch in range(start, self.plan.num_batches):
            items, images = pending.pop(batch).result()
            ask(batch + streams)
            if self.device.type == "cuda":
                images = self._decode_on_device(items, images)
            source = fill_from_good([image is not None for image in images])
            for item in items:
                if item.problem:
                    self.ledger.record(epoch, item)
            decoded = [images[k] for k in source]
            crop_seed, colour_seed = batch_seeds(self.seed, epoch, self.rank, batch)
            crops = self._crop_pairs(decoded, torch.Generator().manual_seed(crop_seed))
            colour = torch.Generator(device=self.device).manual_seed(colour_seed)
            targets = out if out is not None else (None, None)
            view1, view2 = (self.augment.colour(crops[v], v, colour, out=targets[v]) for v in (0, 1))
            labels = torch.tensor([items[k].sample.label for k in source], dtype=torch.int64)
            if self.device.type == "cuda":  # pinned and non-blocking: no host sync in the step loop
                labels = labels.pin_memory().to(self.device, non_blocking=True)
            yield view1, view2, labels

    def _decode_on_device(self, items: list[Item], datas: list[Tensor | None]) -> list[Tensor | None]:
        """nvjpeg for the batch's good samples; one that does not decode is marked bad instead of failing it."""
        good = [i for i, data in enumerate(datas) if data is not None]
        names = [_named(items[i]) for i in good]
        try:
            decoded = decode_to_device([datas[i] for i in good], names, self.device)
        except CorruptImageError:
            decoded = []
            for i, name in zip(good, names):
                try:
                    decoded.append(decode_to_device([datas[i]], [name], self.device)[0])
                except CorruptImageError as err:
                    items[i].problem = f"image does not decode ({err})"
                    decoded.append(None)
        images: list[Tensor | None] = [None] * len(datas)
        for i, image in zip(good, decoded):
            images[i] = image
        return images

