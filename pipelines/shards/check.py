"""`byol-fast check-data 'SHARDS'`: read every shard once and report what training would skip or stop on.

Per shard (one process per usable CPU): can it be opened, is it a tar, does it end where the manifest
says (sample count, byte size, SHA-256 of the bytes read), and per sample: is there an image that
decodes (`decode.decode_rgb`, as the torchvision backend decodes) and a label within the manifest's
classes. Exit code 0 when every shard and sample is good, 1 when some sample or shard is bad
(training would skip those samples, up to max_bad_fraction), 2 when the shards cannot be used at all
(no manifest, a shard missing or not a tar).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from multiprocessing import get_context

from pipelines.decode import CorruptImageError, decode_rgb
from pipelines.shards.source import (ShardError, ShardSet, TruncatedShardError, iter_shard, read_manifest, resolve_shards,
                              shard_name)


@dataclass
class ShardCheck:
    """What reading one shard found."""

    url: str
    samples: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    """(key, why) of each bad sample."""
    problems: list[str] = field(default_factory=list)
    """Shard-level problems: count, size or checksum mismatches, truncation."""
    fatal: str = ""
    """Why the shard cannot be read at all (missing, unreachable, not a tar)."""


def check_shard(url: str, expected: int, classes: int, size: int = 0, sha256: str = "") -> ShardCheck:
    """Read and decode one shard; never raises for bad data."""
    check, digest = ShardCheck(url), hashlib.sha256()
    try:
        for sample in iter_shard(url, digest):
            check.samples += 1
            if sample.image is None:
                check.bad.append((sample.key, "no image member (.jpg/.png/...)"))
            elif sample.label is None or sample.label >= classes:
                check.bad.append((sample.key, f"no valid label (.cls with a class index below {classes})"))
            else:
                try:
                    decode_rgb(sample.image, f"{url}:{sample.key}")
                except CorruptImageError as err:
                    check.bad.append((sample.key, str(err).removeprefix(f"{url}:{sample.key} ")))
    except TruncatedShardError as err:
        check.problems.append(str(err))
    except ShardError as err:
        check.fatal = str(err)
        return check
    if check.samples != expected:
        check.problems.append(f"holds {check.samples} samples, the manifest says {expected} (truncated or replaced: "
                              f"training skips the {max(0, expected - check.samples)} missing)")
    if sha256 and digest.hexdigest() != sha256:
        check.problems.append("SHA-256 differs from the manifest's: the shard changed or is damaged; re-download it")
    return check


def _check_job(job: tuple) -> ShardCheck:
    return check_shard(*job)


def check_shards(spec: str, manifest: str | None = None,
                 workers: int | None = None) -> tuple[ShardSet, list[ShardCheck]]:
    """Check every shard of `spec` (ShardError when the spec or its manifest cannot be used)."""
    shards = resolve_shards(spec, manifest)
    known = {info.name: info for info in read_manifest(shards.manifest_url).shards}
    jobs = []
    for url, count in zip(shards.urls, shards.counts):
        info = known.get(shard_name(url))
        jobs.append((url, count, len(shards.classes), info.bytes if info else 0, info.sha256 if info else ""))
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), len(jobs)))
    if workers == 1:
        return shards, [_check_job(job) for job in jobs]
    with get_context("spawn").Pool(workers) as pool:
        return shards, pool.map(_check_job, jobs, chunksize=1)


def main_shards(spec: str, workers: int | None, max_listed: int) -> int:
    """check-data's report for shards; returns its exit code."""
    try:
        shards, checks = check_shards(spec, workers=workers)
    except ShardError as err:
        print(f"byol-fast check-data: {err}", file=sys.stderr)
        return 2
    bad_samples = sum(len(c.bad) for c in checks)
    for check in checks:
        if check.fatal:
            print(f"{'UNREADABLE-SHARD':<16} {check.fatal}")
        for problem in check.problems:
            print(f"{'BAD-SHARD':<16} {check.url}: {problem}")
        for key, why in check.bad[:max_listed]:
            print(f"{'BAD-SAMPLE':<16} {check.url}:{key}: {why}")
        if len(check.bad) > max_listed:
            print(f"... {len(check.bad) - max_listed} more bad samples in {check.url} (raise --max-listed)")
    missing = sum(max(0, count - c.samples) for c, count in zip(checks, shards.counts) if not c.fatal)
    fatal = sum(bool(c.fatal) for c in checks)
    read = sum(c.samples for c in checks)
    verdict = ("FAIL: a shard cannot be read; fix it before training" if fatal else
               "OK" if not (bad_samples or missing or any(c.problems for c in checks)) else
               f"FAIL: training would skip {bad_samples + missing} of {shards.total} samples "
               f"({100 * (bad_samples + missing) / max(1, shards.total):.2f}%; it stops past max_bad_fraction)")
    print(f"checked {len(checks)} shards, {read} samples ({shards.total} in the manifest, {len(shards.classes)} "
          f"classes): {bad_samples} bad, {missing} missing, {fatal} unreadable shard(s) -> {verdict}")
    return 2 if fatal else 0 if verdict == "OK" else 1
