"""The DALI backend over shards: DALI decodes and crops (pipelines/dali_ops.py), the torch colour stage colours.

Two ways the encoded samples reach the decoder, one per kind of URL:

- Local shards with their DALI index (`<shard>.idx` beside each, as `byol-fast convert-shards` writes):
  DALI's own reader, `fn.readers.webdataset`, reads them in its C++ threads (mmap, no Python on the
  data path), handing GPU decoding ("mixed" nvJPEG) the bytes directly. The rank's share of the epoch
  is the ShardPlan's (same per-epoch shard order and equal ranges as the other backends): for each
  shard run the loader writes an index holding just that run's lines, so a rank can start or stop
  inside a shard; DALI's `random_shuffle` buffer of `shuffle_buffer` samples, seeded by (seed, epoch,
  rank), shuffles within it.
- http(s)://, pipe: and local shards without an index: DALI has no reader for streams, so an external
  source feeds it the encoded bytes of the plan's batches (pipelines/shards/reader.py, webdataset's tar
  iterator), read in the pipeline's feeding thread.

Each epoch builds its pipeline seeded by (seed, epoch, rank) (`pipeline_seed`), and a resume at batch
`start` produces and drops the batches before it: DALI's crop draws cannot jump ahead, and so the
resumed views equal the uninterrupted ones (the folder backend's rule; it costs the decoding of those
batches once per resume).

Bad samples: a sample without an image or label, and the lines of a truncated shard past its end,
are found in the index before reading (reader) or by the stream reader (feed), and their slots take
the previous good sample. An image DALI cannot decode fails the pipeline; the epoch's samples are then
checked with PIL, the bad ones remembered and substituted, and the epoch rebuilt and replayed to
where it failed. All are counted and named by the ledger (max_bad_fraction).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def

from pipelines.dali_ops import make_crops
from pipelines.dali_pipeline import DaliTwoViewLoader, pipeline_seed
from pipelines.decode import CorruptImageError, decode_rgb
from pipelines.shards.plan import ShardPlan
from pipelines.shards.reader import BadSampleLedger, Item, fill_from_good, stream_batches
from pipelines.shards.source import IMAGE_EXTENSIONS, LABEL_EXTENSION, ShardSet
from pipelines.sources import DataError
from pipelines.spec import AugmentationSpec

_IMAGE_EXT = ";".join(IMAGE_EXTENSIONS)


def local_index(url: str) -> Path | None:
    """The DALI index beside a local shard (train-000003.tar -> train-000003.idx), or None (remote, or none)."""
    if url.startswith("pipe:") or "://" in url.removeprefix("file://"):
        return None
    index = Path(url.removeprefix("file://")).expanduser().with_suffix(".idx")
    return index if index.is_file() else None


@pipeline_def(exec_dynamic=True)
def byol_shard_pipeline(spec: AugmentationSpec, device: str, reader: dict | None = None, feed=None):
    """(crop1, crop2, labels) from DALI's webdataset `reader` (its arguments) or an external `feed` of
    (encoded images, int64 labels); labels are the .cls bytes for the reader."""
    if reader is not None:
        encoded, labels = fn.readers.webdataset(**reader, ext=[_IMAGE_EXT, LABEL_EXTENSION],
                                                missing_component_behavior="empty", name="shards")
    else:
        encoded, labels = fn.external_source(source=feed, num_outputs=2, batch=True,
                                             dtype=[types.UINT8, types.INT64], ndim=[1, 0])
    shape = fn.peek_image_shape(encoded)
    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    return (*make_crops(images, shape, spec)[0], labels)


class _Feed:
    """External-source callable: the plan's batches of one epoch as (encoded images, labels), bad slots filled."""

    def __init__(self, loader: DaliShardLoader, epoch: int) -> None:
        self.loader, self.epoch = loader, epoch
        self.batches = stream_batches(loader.shards, loader.plan, epoch, 0)
        self.items: list[list[Item]] = []  # every batch handed out this epoch (for a failure's check)

    def __call__(self) -> tuple[list[np.ndarray], np.ndarray]:
        items = next(self.batches, None)
        if items is None:  # DALI prefetches past the epoch's end: repeat, never delivered
            items = self.items[-1]
        else:
            self.items.append(items)
            for item in items:
                if item.problem is None and (item.shard, item.key) in self.loader.known_bad:
                    item.problem = self.loader.known_bad[(item.shard, item.key)]
                if item.problem:
                    self.loader.record(self.epoch, item)
        source = fill_from_good([item.problem is None for item in items])
        return ([np.frombuffer(items[k].sample.image, dtype=np.uint8) for k in source],
                np.array([items[k].sample.label for k in source], dtype=np.int64))


class DaliShardLoader(DaliTwoViewLoader):
    """(view1, view2, labels) of one rank from shards through DALI (module docstring); the folder loader's
    output contract, buffers and colour stage."""

    def __init__(self, shards: ShardSet, spec: AugmentationSpec, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, device: str = "gpu", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 num_threads: int | None = None, prefetch: int = 2,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.001) -> None:
        self._configure(spec, batch_size, rank, world_size, device, seed, dtype, num_threads, prefetch)
        self.shards, self.debug_outputs = shards, False
        self.plan = ShardPlan(tuple(shards.counts), rank, world_size, batch_size, seed, 1, shuffle_buffer)
        self._batches = self.plan.num_batches
        self.out = self._check_out(out)
        self.ledger = BadSampleLedger(self.plan.samples_per_rank, max_bad_fraction)
        self.indexes = [local_index(url) for url in shards.urls]
        self.native = all(index is not None for index in self.indexes)
        self.known_bad: dict[tuple[str, str], str] = {}  # (shard, key) -> why, found by a failed decode
        self._tmp: tempfile.TemporaryDirectory | None = None  # the trimmed indexes of the reader (made on use)
        self._pipe = self._feed = None
        self._recorded: set[tuple[int, str, str]] = set()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next `iter()` walk epoch `epoch` from its batch `start` (the folder loader's protocol)."""
        self._next_start = (epoch, start)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, start = getattr(self, "_next_start", (0, 0))
        self._next_start = (epoch + 1, 0)
        return self.batches(epoch, start)

    def record(self, epoch: int, item: Item) -> None:
        """Count a bad sample once per epoch (a rebuilt, replayed epoch meets it again)."""
        if (epoch, item.shard, item.key) not in self._recorded:
            self._recorded.add((epoch, item.shard, item.key))
            self.ledger.record(epoch, item)

    def close(self) -> None:
        self._pipe = self._feed = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _reader_args(self, epoch: int) -> tuple[dict, list[Item]]:
        """fn.readers.webdataset arguments for the rank's runs of epoch `epoch` (one trimmed index per run),
        and the bad samples found in the indexes (their lines replaced by the previous good line)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="byol-dali-idx-")
        for stale in Path(self._tmp.name).glob("*.idx"):  # the previous epoch's: a long run would pile them up
            stale.unlink()
        paths, index_paths, bad = [], [], []
        for n, segment in enumerate(self.plan.stream(epoch, 0).segments):
            url = self.shards.urls[segment.shard]
            lines = self.indexes[segment.shard].read_text(encoding="utf-8").splitlines()[1:]
            size = os.path.getsize(url.removeprefix("file://"))
            kept = []
            for member in range(segment.first, segment.stop):
                line = lines[member] if member < len(lines) else ""
                key = line.split()[3].split(".")[0] if line else f"#{member}"
                problem = self._index_problem(line, size)
                problem = problem or self.known_bad.get((url, key))
                if problem:
                    bad.append(Item(0, url, key, None, problem))
                kept.append(line if not problem else None)
            first_good = next((line for line in kept if line), None)
            if first_good is None:
                raise DataError(f"no sample of {url} that epoch {epoch} reads on this rank is readable (members "
                                f"{segment.first}-{segment.stop - 1}: {bad[-1].problem}): re-download or re-write it")
            kept = [line or prev for line, prev in zip(kept, _previous_good(kept, first_good))]
            index_path = Path(self._tmp.name) / f"e{epoch}-{n}.idx"
            index_path.write_text(f"v1.2 {len(kept)}\n" + "\n".join(kept) + "\n", encoding="utf-8")
            paths.append(url.removeprefix("file://"))
            index_paths.append(str(index_path))
        seed = pipeline_seed(self.seed, self.rank, epoch * self._batches)
        return dict(paths=paths, index_paths=index_paths, random_shuffle=self.plan.shuffle_buffer > 1,
                    initial_fill=max(1, self.plan.shuffle_buffer), seed=seed), bad

    @staticmethod
    def _index_problem(line: str, shard_bytes: int) -> str | None:
        """Why an index line cannot give a good sample (no image, no label, past a truncated shard's end)."""
        if not line:
            return "truncated: the index lists fewer samples than the manifest"
        fields = line.split()
        components = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        if max(offset + size for offset, size in components.values()) > shard_bytes:
            return f"truncated: the shard ends at byte {shard_bytes}, before this sample"
        if not any(ext in components for ext in IMAGE_EXTENSIONS):
            return "no image member (.jpg/.png/...)"
        if LABEL_EXTENSION not in components:
            return "no label member (.cls holding a class index)"
        return None

    def _build(self, epoch: int) -> None:
        seed = pipeline_seed(self.seed, self.rank, epoch * self._batches)
        common = dict(batch_size=self.batch_size, num_threads=self.num_threads, prefetch_queue_depth=self.prefetch,
                      device_id=self.torch_device.index if self.device == "gpu" else None, seed=seed)
        if self.native:
            reader, bad = self._reader_args(epoch)
            for item in bad:
                self.record(epoch, item)
            self._pipe = byol_shard_pipeline(self.spec, self.device, reader=reader, **common)
        else:
            self._feed = _Feed(self, epoch)
            self._pipe = byol_shard_pipeline(self.spec, self.device, feed=self._feed, **common)
        self._pipe.build()

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Epoch `epoch` from its batch `start` (the batches before it are made and dropped, module docstring)."""
        self._build(epoch)
        batch = 0
        while batch < self._batches:
            try:
                outputs = self._run_once()
            except RuntimeError as err:
                if not self._find_bad_images(epoch, err):
                    raise
                self._build(epoch)  # the bad images are substituted now; replay to where the failure was
                for _ in range(batch):
                    self._run_once()
                continue
            batch += 1
            if batch <= start:
                continue
            # The colour draws are seeded per batch, so the dropped batches need not be coloured.
            self._generator.manual_seed(pipeline_seed(self.seed + 1, self.rank, epoch * self._batches + batch))
            buffers = self.out or (None, None)
            views = tuple(self._colour(outputs[k], k, buffers[k]) for k in range(2))
            yield (*views, self._labels(outputs[2]))
        self._pipe = self._feed = None

    def _run_once(self):
        if self.device == "gpu":
            return self._pipe.run(torch.cuda.current_stream(self.torch_device))
        return self._pipe.run()

    def _labels(self, labels) -> torch.Tensor:
        """The batch's labels on the device (the reader's are the .cls text), copied without a host sync."""
        if self.native:
            values = [int(bytes(np.array(labels[i])).decode("ascii").strip() or -1) for i in range(len(labels))]
            host = torch.tensor(values, dtype=torch.int64)
        else:
            host = torch.from_dlpack(labels.as_tensor()).clone()
        if self.device == "gpu":
            return host.pin_memory().to(self.torch_device, non_blocking=True)
        return host

    def _find_bad_images(self, epoch: int, err: RuntimeError) -> bool:
        """After a failed run: decode this epoch's samples with PIL, remember and count the bad ones.
        False when all decode (the failure is not the data's: the caller re-raises DALI's error)."""
        found = 0
        for url, key, data in self._epoch_images(epoch):
            if (url, key) in self.known_bad:
                continue
            try:
                decode_rgb(data, f"{url}:{key}")
            except CorruptImageError as bad:
                why = f"image does not decode ({str(bad).removeprefix(f'{url}:{key} ')})"
                self.known_bad[(url, key)] = why
                self.record(epoch, Item(0, url, key, None, why))
                found += 1
        return found > 0

    def _epoch_images(self, epoch: int) -> Iterator[tuple[str, str, bytes]]:
        if not self.native:
            for items in (self._feed.items if self._feed is not None else []):
                for item in items:
                    if item.sample is not None and item.sample.image is not None:
                        yield item.shard, item.key, item.sample.image
            return
        for segment in self.plan.stream(epoch, 0).segments:
            url = self.shards.urls[segment.shard]
            lines = self.indexes[segment.shard].read_text(encoding="utf-8").splitlines()[1:]
            with open(url.removeprefix("file://"), "rb") as handle:
                for line in lines[segment.first:segment.stop]:
                    fields = line.split()
                    for i in range(0, len(fields), 4):
                        if fields[i] in IMAGE_EXTENSIONS:
                            handle.seek(int(fields[i + 1]))
                            yield url, fields[i + 3].split(".")[0], handle.read(int(fields[i + 2]))


def _previous_good(lines: list[str | None], first_good: str) -> list[str]:
    """For each slot, the nearest good line before it (the first good line for leading bad slots)."""
    previous, last = [], first_good
    for line in lines:
        previous.append(last)
        last = line or last
    return previous
