"""`byol-fast convert-shards SRC OUT`: an image folder or a `path label` list as WebDataset tar shards.

Writes OUT/<prefix>-000000.tar, ... of `--samples-per-shard` samples each (the last may hold
fewer), each sample two members: `<key>.<ext>`, the image file's bytes unchanged (the extension
from its content: jpg, png, ...), and `<key>.cls`, its class index as text. Images are shuffled
(seeded) before sharding, so shards mix classes and a shuffle buffer sees all of them. Beside the
shards: `<prefix>-000000.idx`, DALI's index of each (format v1.2 of DALI's tools/wds2idx.py, for
`fn.readers.webdataset`), and `manifest.json`: sample count, size and SHA-256 of every shard, the
class names and the conversion settings.

Every image is decoded once while converting (in `--workers` processes), so shards hold only
readable images: unreadable ones fail the conversion, all named, unless `--skip-corrupt` leaves
them out (listed in the manifest). Each shard is written under a temporary name and renamed when
complete, with a marker; an interrupted conversion, run again with the same arguments, keeps the
finished shards and writes the rest. An OUT that holds a finished conversion, or one of other
sources or settings, is refused without `--overwrite`, which deletes only the files a conversion
names (shards, indexes, markers, manifest), never anything else in OUT.

`--index-only SPEC OUT` writes a manifest (and DALI indexes of local shards) for shards made
elsewhere: SPEC is a shard spec (pipelines/shards/source.py); classes are then the label numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pipelines.command_line import CommandParser, integer
from pipelines.decode import CorruptImageError, decode_rgb, sniff_format
from pipelines.shards.source import (LABEL_EXTENSION, MANIFEST_NAME, ShardError, ShardInfo, ShardManifest, expand_shard_urls,
                              iter_shard, shard_name)
from pipelines.sources import DataError, ImageList, load_images

PLAN_NAME = ".convert-shards.json"
"""What a conversion in OUT is writing (sources and settings); a rerun with the same plan resumes it."""
INDEX_VERSION = "v1.2"
_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "tiff": "tiff", "gif": "gif"}


def dali_index_lines(tar_path: str | Path) -> list[str]:
    """DALI's webdataset index of a tar file: the header, then per sample `ext offset size name` per member."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            base = member.name.rsplit("/", 1)[-1]
            dot = base.find(".")
            if dot <= 0:
                continue  # hidden members and names without an extension are not sample components
            key = member.name[:len(member.name) - len(base) + dot]
            component = f"{base[dot + 1:]} {member.offset_data} {member.size} {member.name}"
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(component)
    return [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(sample) for sample in samples]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class _ShardJob:
    out: str
    name: str
    entries: list[tuple[str, str, int]]
    """(key, source path, label) of each sample."""
    skip_corrupt: bool


def _write_shard(job: _ShardJob) -> tuple[dict, list[tuple[str, str]]]:
    """Write one shard (temporary name, then renamed) and its DALI index; returns its record and the
    (path, reason) of unreadable sources. Without skip_corrupt a shard with any is not written."""
    from webdataset import TarWriter

    out = Path(job.out)
    final, partial = out / job.name, out / f".{job.name}.partial-{os.getpid()}"
    members, bad = [], []
    for key, path, label in job.entries:
        try:
            data = Path(path).read_bytes()
            decode_rgb(data, path)  # a full decode: only readable images go into shards
        except (CorruptImageError, OSError) as err:
            bad.append((path, str(err).removeprefix(f"{path} ")))
            continue
        members.append({"__key__": key, _EXTENSIONS.get(sniff_format(data[:16]), "jpg"): data,
                        LABEL_EXTENSION: str(label).encode("ascii")})
    if bad and not job.skip_corrupt:
        return {}, bad
    try:
        with TarWriter(str(partial), encoder=False, mtime=0.0) as writer:  # mtime 0: the same bytes every time
            for sample in members:
                writer.write(sample)
        index = final.with_suffix(".idx")
        index.write_text("\n".join(dali_index_lines(partial)) + "\n", encoding="utf-8")
        record = dict(name=job.name, samples=len(members), bytes=partial.stat().st_size, sha256=_sha256(partial))
        os.replace(partial, final)
    finally:
        if partial.exists():
            partial.unlink()
    (out / f".{job.name}.done").write_text(json.dumps(record), encoding="utf-8")
    return record, bad


def _plan(images: ImageList, samples_per_shard: int, prefix: str, seed: int) -> tuple[dict, list[list[int]]]:
    order = np.random.default_rng(seed).permutation(len(images))
    groups = [order[i:i + samples_per_shard].tolist() for i in range(0, len(order), samples_per_shard)]
    digest = hashlib.sha256("\n".join(f"{f}\t{label}" for f, label in zip(images.files, images.labels)).encode())
    plan = {"sources": digest.hexdigest(), "images": len(images), "samples_per_shard": samples_per_shard,
            "prefix": prefix, "seed": seed, "shards": len(groups)}
    return plan, groups


def _owned_files(out: Path) -> list[Path]:
    """The files a conversion in `out` wrote (what --overwrite may delete)."""
    names = [out / MANIFEST_NAME, out / PLAN_NAME]
    if (out / PLAN_NAME).is_file():
        plan = json.loads((out / PLAN_NAME).read_text(encoding="utf-8"))
        for i in range(plan["shards"]):
            name = f"{plan['prefix']}-{i:06d}.tar"
            names += [out / name, out / name.replace(".tar", ".idx"), out / f".{name}.done"]
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
            names += [out / s["name"] for s in manifest.get("shards", [])]
            names += [out / s["name"].replace(".tar", ".idx") for s in manifest.get("shards", [])]
        except (ValueError, KeyError, TypeError):
            pass
    return [path for path in dict.fromkeys(names) if path.exists()]


def convert_to_shards(images: ImageList, out_dir: str | Path, samples_per_shard: int = 1000, prefix: str = "train",
                      seed: int = 0, workers: int = 1, overwrite: bool = False, skip_corrupt: bool = False,
                      source: str = "") -> ShardManifest:
    """Write `images` as shards in `out_dir` (module docstring); returns the manifest written."""
    if samples_per_shard < 1 or workers < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} and workers={workers} must be >= 1")
    if not prefix or "/" in prefix or "{" in prefix:
        raise ValueError(f"prefix={prefix!r} must be a plain file-name prefix, e.g. train")
    out = Path(out_dir).expanduser().resolve()
    plan, groups = _plan(images, samples_per_shard, prefix, seed)
    plan_file = out / PLAN_NAME
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: pass a folder for the shards")
    started = json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else None
    finished = (out / MANIFEST_NAME).is_file()
    if (finished or (started is not None and started != plan)) and not overwrite:
        what = "a finished conversion" if finished else "an interrupted conversion of other sources or settings"
        raise DataError(f"{out} holds {what}: pass --overwrite to replace it (only its shards, indexes and "
                        f"manifest are deleted), or pick another OUT")
    if overwrite:
        for path in _owned_files(out):
            path.unlink()
        started = None
    out.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    jobs, records = [], {}
    for i, group in enumerate(groups):
        name = f"{prefix}-{i:06d}.tar"
        marker = out / f".{name}.done"
        if started == plan and marker.is_file() and (out / name).is_file():
            records[name] = json.loads(marker.read_text(encoding="utf-8"))  # finished before an interruption
            continue
        entries = [(f"{index:09d}", images.files[index], images.labels[index]) for index in group]
        jobs.append(_ShardJob(str(out), name, entries, skip_corrupt))
    bad: list[tuple[str, str]] = []
    if workers == 1 or len(jobs) <= 1:
        results = map(_write_shard, jobs)
    else:  # spawn: the caller may hold torch threads, which fork would copy in a broken state
        pool = get_context("spawn").Pool(min(workers, len(jobs)))
        results = pool.imap_unordered(_write_shard, jobs)
    try:
        for record, skipped in results:
            bad += skipped
            if record:
                records[record["name"]] = record
    finally:
        if workers > 1 and len(jobs) > 1:
            pool.close()
            pool.join()
    if bad and not skip_corrupt:
        named = "\n".join(f"  {path}: {reason}" for path, reason in bad[:10])
        raise DataError(f"{len(bad)} of {len(images)} images could not be read, so their shards were not written "
                        f"(the others were; a rerun keeps them):\n{named}\nDelete or replace them, or pass "
                        f"--skip-corrupt to leave them out")
    shards = [ShardInfo(**records[f"{prefix}-{i:06d}.tar"]) for i in range(len(groups))]
    manifest = ShardManifest(shards, list(images.classes), source,
                             {"samples_per_shard": samples_per_shard, "seed": seed,
                              "skipped": [dict(path=p, reason=r) for p, r in bad]})
    partial = out / f".{MANIFEST_NAME}.partial"
    partial.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(partial, out / MANIFEST_NAME)  # last: its presence means the conversion finished
    return manifest


def index_existing(spec: str, out_dir: str | Path, overwrite: bool = False) -> ShardManifest:
    """A manifest (and DALI indexes of local shards) for shards made elsewhere (module docstring)."""
    out = Path(out_dir).expanduser().resolve()
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise DataError(f"{out / MANIFEST_NAME} exists: pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    shards, labels = [], set()
    for url in expand_shard_urls(spec):
        count = 0
        for sample in iter_shard(url):
            count += 1
            if sample.label is not None:
                labels.add(sample.label)
        local = Path(url.removeprefix("file://")).expanduser()
        if local.is_file():
            (out / shard_name(url).replace(".tar", ".idx")).write_text("\n".join(dali_index_lines(local)) + "\n")
            shards.append(ShardInfo(shard_name(url), count, local.stat().st_size, _sha256(local)))
        else:
            shards.append(ShardInfo(shard_name(url), count))
    manifest = ShardManifest(shards, [str(k) for k in range(max(labels, default=-1) + 1)], spec)
    (out / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    """Options of `byol-fast convert-shards`."""
    parser = CommandParser(prog="byol-fast convert-shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="image folder (root/<class>/<image>) or 'path label' list; with "
                                       "--index-only, a shard spec")
    parser.add_argument("out", help="folder for the shards, their DALI indexes and manifest.json")
    parser.add_argument("--samples-per-shard", type=integer, default=1000,
                        help="samples per shard (default %(default)s; aim for 100 MB-1 GB shards)")
    parser.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar (default train)")
    parser.add_argument("--seed", type=integer, default=0, help="seed of the shuffle before sharding")
    parser.add_argument("--workers", type=integer, default=max(1, len(os.sched_getaffinity(0))),
                        help="processes reading and checking images (default: one per usable CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace a conversion already in OUT")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave unreadable images out (listed in the manifest) instead of failing")
    parser.add_argument("--index-only", action="store_true",
                        help="SOURCE is existing shards: write only the manifest and DALI indexes into OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `byol-fast convert-shards`; returns the exit status."""
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    try:
        if args.index_only:
            manifest = index_existing(args.source, args.out, overwrite=args.overwrite)
        else:
            images = load_images(args.source)
            manifest = convert_to_shards(images, args.out, args.samples_per_shard, args.prefix, args.seed,
                                         args.workers, args.overwrite, args.skip_corrupt, source=args.source)
    except (DataError, ShardError, ValueError) as err:
        print(f"byol-fast convert-shards: error: {err}", file=sys.stderr)
        return 2
    size = sum(shard.bytes for shard in manifest.shards) / 2**20
    last = manifest.shards[-1].name if manifest.shards else "-"
    print(f"wrote {len(manifest.shards)} shards ({manifest.total} samples, {len(manifest.classes)} classes, "
          f"{size:.1f} MiB) to {args.out}: {manifest.shards[0].name if manifest.shards else '-'} .. {last} and "
          f"{MANIFEST_NAME} in {time.perf_counter() - began:.1f} s")
    skipped = manifest.extra.get("skipped", [])
    if skipped:
        print(f"skipped {len(skipped)} unreadable images, listed in {args.out}/{MANIFEST_NAME}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
