"""Which shard samples a rank's loader streams read in an epoch, and in which order: all in index space.

An epoch, for a shard set with counts c_0..c_{n-1} (from the manifest):

1. Shard order: one permutation of the shards seeded by (seed, epoch), the same on
   every rank. Concatenated, the shards form the epoch's stream of T = sum(c) samples.
2. Ranks: rank r takes stream positions [r N, (r + 1) N), N = `sources.samples_per_rank(T,
   world_size, batch)` (the folder backends' count): every rank has N / batch steps, so all
   ranks stop together, and every sample is read once, except the tail of fewer than
   world_size x batch samples, a different one each epoch as the shard order changes.
   Ranks need not own whole shards: a rank's range may start or end inside one (it then
   skips the shard's first members without decoding them), so any shard count works.
3. Streams: the rank's batches are dealt round-robin to `streams` readers (loader workers or
   threads): stream s makes batches s, s + S, s + 2S, ... from its own contiguous slice of the
   rank's range, so each stream reads its shards sequentially and alone.
4. Shuffle: each stream's slice goes through a shuffle buffer (webdataset's kind: fill it,
   then emit a random element and refill) seeded by (seed, epoch, rank, stream), computed on
   positions, not on samples: the order is known before anything is read.

Because the order is a function of (seed, epoch, rank, streams) alone, batch b of an epoch is
known without reading the batches before it, and a resume mid-epoch reads only from the first
shard still holding a sample it needs (`StreamPlan.segments_from`). The view randomness of each
sample is drawn from its epoch position (see the backends), so a resumed run makes the same
views as an uninterrupted one. Changing `streams` (the workers) changes the order, not the
coverage: resume with the same --workers for the same views.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipelines.sources import DataError, samples_per_rank


def buffer_shuffle(count: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of `buffer` items emits positions 0..count-1 in (a permutation).

    Each position is read in turn into the buffer; once it holds `buffer` items, a uniformly chosen
    one is emitted; at the end the rest are emitted the same way. buffer <= 1 keeps the stored order.
    """
    if buffer <= 1:
        return np.arange(count, dtype=np.int64)
    picks = rng.random(count)  # one draw per emitted item, taken in emission order
    held: list[int] = []
    order = np.empty(count, dtype=np.int64)
    emitted = 0
    for position in range(count):
        held.append(position)
        if len(held) >= buffer:
            j = int(picks[emitted] * len(held))
            held[j], held[-1] = held[-1], held[j]
            order[emitted] = held.pop()
            emitted += 1
    while held:
        j = int(picks[emitted] * len(held))
        held[j], held[-1] = held[-1], held[j]
        order[emitted] = held.pop()
        emitted += 1
    return order


@dataclass(frozen=True)
class Segment:
    """A run of consecutive samples of one shard: members [first, stop) of shard `shard`."""

    shard: int
    first: int
    stop: int
    offset: int
    """Stream-slice position of member `first` (positions are slice-local)."""


@dataclass(frozen=True)
class StreamPlan:
    """One stream's share of an epoch on one rank: which samples, in which order."""

    epoch: int
    stream: int
    batches: list[int]
    """The rank's batch numbers this stream makes (s, s + S, ...)."""
    segments: list[Segment]
    """The shard runs of its slice, in stream order."""
    order: np.ndarray
    """Slice positions in emission order; batch batches[j] is order[j * B:(j + 1) * B]."""
    base: int
    """Epoch-stream position of slice position 0 (global: unique within the epoch, for view seeds)."""

    def segments_from(self, first_batch: int, batch_size: int) -> tuple[list[Segment], set[int]]:
        """The segments to read for this stream's batches from its `first_batch` on (j, not the rank's
        batch number), trimmed to start at the earliest needed position, and the positions needed."""
        needed = self.order[first_batch * batch_size:]
        if len(needed) == 0:
            return [], set()
        low = int(needed.min())
        kept = []
        for seg in self.segments:
            end = seg.offset + seg.stop - seg.first
            if end <= low:
                continue
            skip = max(0, low - seg.offset)
            kept.append(Segment(seg.shard, seg.first + skip, seg.stop, seg.offset + skip))
        return kept, set(int(p) for p in needed)


@dataclass(frozen=True)
class ShardPlan:
    """The epoch plan of one rank over a shard set (module docstring)."""

    counts: tuple[int, ...]
    rank: int
    world_size: int
    batch_size: int
    seed: int
    streams: int = 1
    shuffle_buffer: int = 1000
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must lie in [0, world_size={self.world_size})")
        if self.batch_size < 1 or self.streams < 1 or self.shuffle_buffer < 0:
            raise ValueError(f"batch_size={self.batch_size} and streams={self.streams} must be >= 1, "
                             f"shuffle_buffer={self.shuffle_buffer} >= 0")
        if self.num_batches == 0:
            raise DataError(f"the shards hold {self.total} samples, too few for world_size={self.world_size} x "
                            f"batch_size={self.batch_size}: every rank needs a full batch; use more shards or a "
                            f"smaller batch")

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def samples_per_rank(self) -> int:
        return samples_per_rank(self.total, self.world_size, self.batch_size)

    @property
    def num_batches(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self.samples_per_rank // self.batch_size

    def shard_order(self, epoch: int) -> np.ndarray:
        """The epoch's shard permutation, the same on every rank."""
        if not self.shuffle:
            return np.arange(len(self.counts))
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(len(self.counts))

    def stream_batches(self, stream: int) -> list[int]:
        """The rank's batch numbers stream `stream` makes: stream, stream + S, ..."""
        return list(range(stream, self.num_batches, self.streams))

    def stream_of(self, batch: int) -> tuple[int, int]:
        """(stream, j): batch `batch` of the rank is stream's j-th batch."""
        return batch % self.streams, batch // self.streams

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a frozen, hashable plan; a few epochs x streams
    def stream(self, epoch: int, stream: int) -> StreamPlan:
        """Stream `stream`'s share of epoch `epoch` (module docstring)."""
        if not 0 <= stream < self.streams:
            raise ValueError(f"stream={stream} must lie in [0, {self.streams})")
        batches = self.stream_batches(stream)
        # Slices follow stream number: stream s starts after the batches of the streams before it.
        before = sum(len(self.stream_batches(s)) for s in range(stream)) * self.batch_size
        length = len(batches) * self.batch_size
        base = self.rank * self.samples_per_rank + before
        segments = []
        position = 0  # in the epoch stream
        for shard in self.shard_order(epoch):
            count = self.counts[shard]
            lo, hi = max(position, base), min(position + count, base + length)
            if lo < hi:
                segments.append(Segment(int(shard), lo - position, hi - position, lo - base))
            position += count
            if position >= base + length:
                break
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, stream, 7]))
        order = buffer_shuffle(length, self.shuffle_buffer if self.shuffle else 0, rng)
        return StreamPlan(epoch, stream, batches, segments, order, base)

    def batch_positions(self, epoch: int, batch: int) -> np.ndarray:
        """Epoch-stream positions of the samples of the rank's batch `batch` (for tests and seeds)."""
        stream, j = self.stream_of(batch)
        plan = self.stream(epoch, stream)
        return plan.base + plan.order[j * self.batch_size:(j + 1) * self.batch_size]
