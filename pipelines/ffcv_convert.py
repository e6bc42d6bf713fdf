"""Convert an ImageList (folder tree or file list) into an FFCV .beton file.

The file holds two fields: "image" (an ffcv RGBImageField, one entry per
source image, downscaled so its longer side is at most `max_resolution`) and
"label" (an IntField). Entry i is `images.files[i]`, so an index in the .beton
is an index in the ImageList.

Corrupt images are never dropped silently. By default the conversion finishes
its pass, then fails naming every unreadable file (nothing is written). With
`skip_corrupt=True` each unreadable file becomes a tombstone entry (an 8x8
black image with label -1, which FfcvTwoViewLoader excludes and counts) and is
listed, with its reason, in `OUT.beton.skipped.txt`; the returned report names
them too. Tombstones keep entry i == file i without a second pass.

The file is written to a temporary name beside the target and renamed into
place only when complete, so a crash never leaves a truncated .beton behind.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.command_line import CommandParser, integer, number
from pipelines.decode import CorruptImageError, load_rgb
from pipelines.sources import DataError, ImageList, load_images

DEFAULT_MAX_RESOLUTION = 512
"""Longer side kept in the .beton: room for BYOL's smallest crops (8% of the area) at 224."""
WRITE_MODES = ("jpg", "raw", "proportion")
TOMBSTONE_LABEL = -1
"""Label of an entry that stands in for an unreadable source image."""
_TOMBSTONE = np.zeros((8, 8, 3), dtype=np.uint8)
_MAX_NAMED = 10


@dataclass
class ConversionReport:
    """What convert_to_beton wrote."""

    path: str
    """The finished .beton file."""
    num_entries: int
    """Entries in the file (one per source image, tombstones included)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of each unreadable image stored as a tombstone (skip_corrupt=True only)."""
    num_bytes: int = 0
    """Size of the file."""
    seconds: float = 0.0
    """Wall time of the conversion."""


def require_ffcv() -> None:
    """Import ffcv or raise an ImportError that says how to install it."""
    try:
        import ffcv  # noqa: F401
    except ImportError as err:
        raise ImportError("FFCV is not installed: `pip install 'byol-fast[ffcv]'` (needs libturbojpeg and "
                          "OpenCV system libraries), or use another data backend") from err


def _stored_image(path: str, max_resolution: int) -> np.ndarray:
    """The HWC uint8 pixels stored for `path`: decoded, downscaled so its longer side is <= max_resolution.

    We downscale here rather than let ffcv's RGBImageField do it: ffcv truncates
    each side to int(ratio * side), which is 0 for a valid but very thin image
    (1x700 at 512), and cv2.resize then raises in a writer process (a hang, see
    _SourceImages). Every side here stays >= 1, and since the result already
    fits, ffcv's own resize never runs. BOX is area averaging, as ffcv's INTER_AREA.
    """
    image = load_rgb(path)
    ratio = max_resolution / max(image.size)
    if ratio < 1:
        image = image.resize(tuple(max(1, round(side * ratio)) for side in image.size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


class _SourceImages:
    """The indexable dataset ffcv's DatasetWriter reads in its worker processes: (HWC uint8, label).

    DatasetWriter waits forever for a worker that raised, so no error may
    escape: an unreadable file is flagged in the shared `failed` array and
    replaced by a tombstone; the parent re-reads flagged files for the reason.
    """

    def __init__(self, images: ImageList, max_resolution: int, failed) -> None:
        self.files = images.files
        self.labels = images.labels
        self.max_resolution = max_resolution
        self.failed = failed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            return _stored_image(self.files[index], self.max_resolution), self.labels[index]
        except Exception:  # noqa: BLE001 - any escape would hang DatasetWriter (see class docstring)
            self.failed[index] = 1
            return _TOMBSTONE, TOMBSTONE_LABEL


def _failure_reason(path: str, max_resolution: int) -> str:
    """Why `path` could not be converted, found by preparing it again in this process."""
    try:
        _stored_image(path, max_resolution)
    except Exception as err:  # noqa: BLE001 - we report whatever went wrong, by path
        return f"{type(err).__name__}: {err}"
    return "failed while converting but reads now (changed during conversion, or a transient I/O error)"


def _page_size(max_resolution: int) -> int:
    """A power-of-two page that holds the largest possible entry (ffcv fails on an entry bigger than a page)."""
    largest = 2 * max_resolution * max_resolution * 3 + (1 << 16)  # raw pixels, or a JPEG of incompressible noise
    return max(1 << 23, 1 << (largest - 1).bit_length())


def _check_arguments(images: ImageList, out: Path, max_resolution: int, jpeg_quality: int, write_mode: str,
                     compress_probability: float, overwrite: bool) -> None:
    if len(images) == 0:
        raise DataError("no images to convert: the ImageList is empty")
    if any(label < 0 for label in images.labels):
        raise DataError(f"labels must be >= 0 ({TOMBSTONE_LABEL} marks tombstones of corrupt images)")
    if out.suffix != ".beton":
        raise DataError(f"output {out} must end in .beton (e.g. {out.with_suffix('.beton')})")
    if not out.parent.is_dir():
        raise DataError(f"folder {out.parent} for {out.name} does not exist: create it first")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists: pass --overwrite (overwrite=True) to replace it, or pick another name")
    if not 8 <= max_resolution <= 65535:
        raise ValueError(f"max_resolution={max_resolution}: use 8..65535 (ffcv stores sides as uint16; 512 is typical)")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality}: use 1..100 (90 is typical)")
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r}: use one of {WRITE_MODES}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability={compress_probability} is a probability: use a value in [0, 1]")


def convert_to_beton(images: ImageList, out_path: str | Path, max_resolution: int = DEFAULT_MAX_RESOLUTION,
                     jpeg_quality: int = 90, write_mode: str = "jpg", compress_probability: float = 0.5,
                     num_workers: int = -1, overwrite: bool = False, skip_corrupt: bool = False,
                     chunk_size: int = 100) -> ConversionReport:
    """Write `images` to the FFCV file `out_path`; returns a ConversionReport.

    write_mode: "jpg" (JPEG at `jpeg_quality`; smallest, decode-bound), "raw"
    (pixels; large, no decode) or "proportion" (JPEG with probability
    `compress_probability`, else raw). num_workers < 1 means one per CPU.
    Raises DataError before any work for a bad target (existing file without
    overwrite, missing folder, wrong suffix), and CorruptImageError naming every
    unreadable image after the pass unless skip_corrupt (see module docstring).
    """
    out = Path(out_path).expanduser().resolve()
    _check_arguments(images, out, max_resolution, jpeg_quality, write_mode, compress_probability, overwrite)
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    workers = num_workers if num_workers >= 1 else (os.cpu_count() or 1)
    start = time.perf_counter()
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    failed = multiprocessing.RawArray(ctypes.c_uint8, len(images))
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        writer = DatasetWriter(str(partial), fields, page_size=_page_size(max_resolution), num_workers=workers)
        writer.from_indexed_dataset(_SourceImages(images, max_resolution, failed), chunksize=chunk_size)
        bad = [images.files[i] for i in np.flatnonzero(np.frombuffer(failed, dtype=np.uint8))]
        skipped = [(path, _failure_reason(path, max_resolution)) for path in bad]
        if skipped and not skip_corrupt:
            named = "\n".join(f"  {path}: {reason}" for path, reason in skipped[:_MAX_NAMED])
            more = f"\n  (and {len(skipped) - _MAX_NAMED} more)" if len(skipped) > _MAX_NAMED else ""
            raise CorruptImageError(f"{len(skipped)} of {len(images)} images could not be read, so {out} was not "
                                    f"written:\n{named}{more}\nDelete or replace them, or pass --skip-corrupt "
                                    f"(skip_corrupt=True) to leave them out with a report")
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()
    report_file = Path(f"{out}.skipped.txt")
    if skipped:
        report_file.write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped), encoding="utf-8")
    elif report_file.exists():
        report_file.unlink()  # a stale report from an earlier conversion would misdescribe this file
    return ConversionReport(path=str(out), num_entries=len(images), skipped=skipped,
                            num_bytes=out.stat().st_size, seconds=time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    """Options of `byol-fast convert-ffcv`."""
    parser = CommandParser(
        prog="byol-fast convert-ffcv",
        description="Convert an image folder (root/<class>/<image>) or a 'path label' list file to an FFCV .beton.")
    parser.add_argument("source", help="image folder with one sub-folder per class, or a 'path label' list file")
    parser.add_argument("output", help="the .beton file to write")
    parser.add_argument("--max-resolution", type=integer, default=DEFAULT_MAX_RESOLUTION,
                        help="downscale so the longer side is at most this (default %(default)s)")
    parser.add_argument("--quality", type=integer, default=90, help="JPEG quality 1..100 (default %(default)s)")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                        help="jpg: JPEG (small); raw: pixels (big, no decode); proportion: a random mix")
    parser.add_argument("--compress-probability", type=number, default=0.5,
                        help="JPEG share for --write-mode proportion (default %(default)s)")
    parser.add_argument("--workers", type=integer, default=-1, help="writer processes (default: one per CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave unreadable images out (listed in OUTPUT.skipped.txt) instead of failing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `byol-fast convert-ffcv`; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        images = load_images(args.source)
        report = convert_to_beton(images, args.output, max_resolution=args.max_resolution, jpeg_quality=args.quality,
                                  write_mode=args.write_mode, compress_probability=args.compress_probability,
                                  num_workers=args.workers, overwrite=args.overwrite, skip_corrupt=args.skip_corrupt)
    except (DataError, ValueError, ImportError) as err:
        print(f"byol-fast convert-ffcv: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report.path}: {report.num_entries} images, {report.num_bytes / 2**20:.1f} MiB "
          f"in {report.seconds:.1f} s")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable images, listed in {report.path}.skipped.txt", file=sys.stderr)
    return 0
