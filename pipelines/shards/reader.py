"""Reading one stream of a ShardPlan: batches of raw samples in plan order, and what to do with bad ones.

`stream_batches` walks the shard runs of a stream (pipelines/shards/plan.py) with webdataset's tar
iterator (pipelines/shards/source.py), keeps the samples the plan still needs, and hands out each batch's
samples in the plan's order. Bad samples never stop the stream: a member missing its image or its
label, and every sample a truncated shard no longer holds (fewer read than the manifest counts),
arrive as `Item`s with a `problem`; the backends add images that do not decode. `fill_from_good`
then gives each bad slot the sample of a good slot of the same batch (static batch shapes; the
stand-in gets fresh views, drawn from the bad slot's position), and `BadSampleLedger` counts them,
names each (shard and key) on stderr, and stops the run with a DataError once an epoch's bad share
on a rank passes `max_bad_fraction`. A network read that fails in a way that may pass (a refused or
dropped connection, HTTP 429 or 5xx) is first tried again from the shard's start (`shard_samples`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pipelines.shards.plan import Segment, ShardPlan
from pipelines.shards.source import TRANSIENT_SHARD_ERRORS, RawSample, ShardSet, TruncatedShardError, iter_shard
from pipelines.sources import DataError

_NAMED_PER_SHARD = 3
"""Bad samples of one shard named on stderr before the rest are only counted (all are in the metrics)."""
RETRY_WAITS_S = (1.0, 3.0, 9.0)
"""Seconds waited before each new try of a shard whose network read failed (shard_samples): 13 s in all,
through a server's restart or a short outage, before its remaining samples count as bad. Each wait stays
well under a scheduler's grace period after SIGTERM, which the stop must still meet."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass
class Item:
    """One slot of a batch: its epoch position, the raw sample, and why it is bad (None when good)."""

    position: int
    shard: str
    key: str
    sample: RawSample | None
    problem: str | None = None


def shard_samples(url: str) -> Iterator[RawSample]:
    """`iter_shard(url)`, reading the shard again from its start when a network read fails in a way that may
    pass (TRANSIENT_SHARD_ERRORS: a refused or dropped connection, HTTP 429 or 5xx), after each wait of
    RETRY_WAITS_S, and skipping the samples it already gave. The last failure is raised as it came: a lost
    connection is a TruncatedShardError, so the reader counts the rest of the shard as bad samples."""
    given = 0
    for attempt, wait in enumerate((*RETRY_WAITS_S, None)):
        try:
            for position, sample in enumerate(iter_shard(url)):
                if position >= given:  # the samples before were given before the failure
                    given += 1
                    yield sample
            return
        except TRANSIENT_SHARD_ERRORS as err:
            if wait is None:
                raise
            _stderr(f"byol-fast: {err}; reading the shard again (from sample {given}) in {wait:g} s, "
                    f"retry {attempt + 1} of {len(RETRY_WAITS_S)}")
            time.sleep(wait)


def _segment_items(shards: ShardSet, segment: Segment) -> Iterator[tuple[int, Item]]:
    """(slice position, Item) of every member of a segment; missing ones (a truncated shard) as bad Items."""
    url = shards.urls[segment.shard]
    expected = shards.counts[segment.shard]
    index = 0
    try:
        for sample in shard_samples(url):
            if index >= segment.stop:
                break
            if index >= segment.first:
                problem = ("no image member (.jpg/.png/...)" if sample.image is None
                           else "no label member (.cls holding a class index)" if sample.label is None else None)
                yield segment.offset + index - segment.first, Item(0, url, sample.key, sample, problem)
            index += 1
        reason = f"truncated: the shard ended after {index} of the manifest's {expected} samples"
    except TruncatedShardError as err:
        reason = f"truncated: the shard broke off after {index} of {expected} samples ({err.__cause__})"
    for missing in range(max(index, segment.first), segment.stop):
        yield segment.offset + missing - segment.first, Item(0, url, f"#{missing}", None, reason)


def stream_batches(shards: ShardSet, plan: ShardPlan, epoch: int, stream: int, first: int = 0
                   ) -> Iterator[list[Item]]:
    """Stream `stream`'s batches of `epoch` from its `first`-th on: lists of batch_size Items in plan order.

    Reads only from the earliest shard run holding a sample still needed, and holds at most about a
    shuffle buffer of samples (those read but not yet due).
    """
    layout = plan.stream(epoch, stream)
    size = plan.batch_size
    segments, needed = layout.segments_from(first, size)
    items = (pair for segment in segments for pair in _segment_items(shards, segment))
    held: dict[int, Item] = {}
    for j in range(first, len(layout.batches)):
        batch = []
        for position in layout.order[j * size:(j + 1) * size].tolist():
            while position not in held:
                got, item = next(items)
                if got in needed:
                    held[got] = item
            item = held.pop(position)
            item.position = layout.base + position
            batch.append(item)
        yield batch


def fill_from_good(good: list[bool]) -> list[int]:
    """For each slot, the slot whose sample it uses: itself when good, else the nearest good slot before it
    (after it for leading bad ones). Raises DataError when no slot is good."""
    if not any(good):
        raise DataError("every sample of a batch is bad (see the bad samples named above): the shards are "
                        "damaged; check them with `byol-fast check-data 'SHARDS'` and re-write them")
    source, last = [], None
    for index, ok in enumerate(good):
        last = index if ok else last
        source.append(last)
    first_good = good.index(True)
    return [first_good if s is None else s for s in source]


@dataclass
class BadSampleLedger:
    """Counts bad samples per epoch on one rank, names them, and stops the run past the threshold."""

    samples_per_epoch: int
    max_bad_fraction: float
    log: Callable[[str], None] = _stderr
    total: int = 0
    epoch: int = -1
    in_epoch: int = 0
    per_shard: dict[str, int] = field(default_factory=dict)
    last: str = ""

    def record(self, epoch: int, item: Item) -> None:
        """Count one bad sample of `epoch`; DataError once the epoch's share passes the threshold."""
        if epoch != self.epoch:
            self.epoch, self.in_epoch = epoch, 0
        self.total += 1
        self.in_epoch += 1
        seen = self.per_shard[item.shard] = self.per_shard.get(item.shard, 0) + 1
        self.last = f"{item.shard}:{item.key}"
        if seen <= _NAMED_PER_SHARD:
            more = " (further bad samples of this shard are only counted)" if seen == _NAMED_PER_SHARD else ""
            self.log(f"byol-fast: skipped bad sample {item.key} of {item.shard}: {item.problem}{more}")
        limit = self.max_bad_fraction * self.samples_per_epoch
        if self.in_epoch > limit:
            worst = sorted(self.per_shard.items(), key=lambda kv: -kv[1])[:3]
            named = ", ".join(f"{shard} ({count})" for shard, count in worst)
            raise DataError(f"{self.in_epoch} bad samples in epoch {epoch} on this rank pass max_bad_fraction="
                            f"{self.max_bad_fraction} of its {self.samples_per_epoch} samples (most in {named}): "
                            f"check the shards with `byol-fast check-data 'SHARDS'`, re-download or re-write "
                            f"them, or raise --max-bad-fraction")

    def metrics(self) -> dict[str, float | str]:
        """What the trainer logs: the run's bad-sample count so far and the last one named."""
        return {"bad_samples": self.total, "last_bad_sample": self.last}
