"""`byol-fast check-data DIR`: decode every image of a tree and report problems by path.

Run it once on a new dataset before a long job: it finds the files that would
stop or silently distort training (truncated, corrupt, not images), and lists
the oddities the decoders handle but a user may want to know about: PNGs inside
.JPEG names, CMYK and grayscale JPEGs, images with alpha or a palette, and
images smaller than the crop. Everything is reported in one pass: class folders
with no images (which training refuses) beside the files that do not decode.
Decoding runs in one process per usable CPU by default. Exit code 0 when the
tree is usable and every file decodes, 1 when some file does not, 2 when the
tree's layout is unusable (empty class folders; a missing root or one with no
images at all stops at once).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from pipelines.command_line import CommandParser, integer
from pipelines.decode import ImageInfo, extension_format, load_rgb, probe_image
from pipelines.shards.source import is_shard_spec
from pipelines.sources import DataError, ImageList, images_under, load_images, visible_subfolders

UNREADABLE = "unreadable"
"""The one fatal kind: the file cannot be decoded (truncated, corrupt, not an image)."""
KINDS = (UNREADABLE, "format-mismatch", "cmyk", "grayscale", "alpha", "palette", "too-small")
"""Every issue kind, fatal first; all but UNREADABLE are handled by decode.load_rgb."""
_SPLITS = ("train", "val", "test")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass(frozen=True)
class FileCheck:
    """What checking one file found."""

    path: str
    issues: tuple[str, ...]
    """Issue kinds (from KINDS) in KINDS order; empty for a clean file."""
    detail: str = ""
    """Human-readable particulars: the decoder's error, or "png inside .JPEG", or the size."""
    width: int = 0
    height: int = 0
    bytes: int = 0


@dataclass
class DataReport:
    """The result of `check_data`: every file with at least one issue, plus totals."""

    root: str
    files: int
    classes: int
    problems: list[FileCheck] = field(default_factory=list)
    """Files with issues, in the tree's (sorted) order."""
    empty_folders: list[str] = field(default_factory=list)
    """Class (or split) folders holding no images: training refuses such a tree."""
    counts: Counter = field(default_factory=Counter)
    """Number of files per issue kind."""
    total_bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when the layout is usable and every file decodes (non-fatal oddities allowed)."""
        return self.counts[UNREADABLE] == 0 and not self.empty_folders

    def paths(self, kind: str) -> list[str]:
        """Paths of the files that have issue `kind`."""
        return [check.path for check in self.problems if kind in check.issues]

    def summary(self) -> str:
        """One line: totals and a verdict."""
        parts = ", ".join([f"{len(self.empty_folders)} empty folder(s)"] * bool(self.empty_folders)
                          + [f"{self.counts[k]} {k}" for k in KINDS if self.counts[k]])
        unreadable = self.counts[UNREADABLE]
        fixes = ([f"fill or remove the {len(self.empty_folders)} empty folder(s)"] * bool(self.empty_folders)
                 + [f"delete or replace the {unreadable} unreadable file(s)"] * bool(unreadable))
        verdict = "OK" if self.ok else f"FAIL: {' and '.join(fixes)}"
        mean_kb = self.total_bytes / max(1, self.files) / 1e3
        return (f"checked {self.files} images in {self.classes} classes under {self.root} (mean {mean_kb:.1f} KB): "
                f"{parts or 'no issues'} -> {verdict}")


def check_file(path: str, min_size: int = 32) -> FileCheck:
    """Decode one file fully and classify it; never raises for a bad image."""
    try:
        size = os.path.getsize(path)
        info: ImageInfo = probe_image(path)
        image = load_rgb(path)  # the full decode is what finds truncation
    except (DataError, OSError) as err:  # CorruptImageError, or a file gone since the scan
        return FileCheck(path, (UNREADABLE,), str(err).removeprefix(f"{path} "))
    found: list[str] = []
    details: list[str] = []
    promised = extension_format(path)
    if promised is not None and info.format != promised:
        found.append("format-mismatch")
        details.append(f"{info.format} inside {os.path.splitext(path)[1]}")
    if info.mode == "CMYK":
        found.append("cmyk")
    if info.mode in _GRAY_MODES:
        found.append("grayscale")
    if info.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        found.append("alpha")
    if info.mode in ("P", "PA"):
        found.append("palette")
    width, height = image.size
    if min(width, height) < min_size:
        found.append("too-small")
        details.append(f"{width}x{height} < {min_size} px")
    if found:
        details.insert(0, f"mode {info.mode}")
    return FileCheck(path, tuple(k for k in KINDS if k in found), "; ".join(details), width, height, size)


def _check_job(job: tuple[str, int]) -> FileCheck:
    return check_file(*job)


def split_folders(root: Path) -> list[Path]:
    """The split folders (train, val, test) of `root` when it holds only those; else none (a class tree).

    So `check-data DIR` works on both DIR/train (a class tree) and DIR (as
    written by make-synthetic or laid out like ImageNet's train/ + val/).
    """
    if not root.is_dir():
        return []
    children = set(visible_subfolders(root))
    splits = [name for name in _SPLITS if name in children]
    return [root / name for name in splits] if splits and children <= set(_SPLITS) else []


def _index(folder: Path) -> tuple[ImageList, list[str]]:
    """The images of a class tree, a flat folder of images (ImageNet's raw val/ and test/: labels live
    elsewhere, so all 0 under one class, "unlabelled") or a list file; and the folders holding no images,
    which are reported beside the files instead of stopping the check (training refuses them).

    A tree that holds nothing to check (missing, no images at all) raises DataError, worded by load_images.
    """
    if not folder.is_dir():
        return load_images(folder), []
    folder = folder.resolve()
    classes = visible_subfolders(folder)
    found = [images_under(folder / name) for name in classes] if classes else [images_under(folder)]
    if not any(found):
        return load_images(folder), []  # raises, naming the layout it expects
    if not classes:
        return ImageList(files=found[0], labels=[0] * len(found[0]), classes=["unlabelled"]), []
    empty = [str(folder / name) for name, files in zip(classes, found) if not files]
    labels = [label for label, files in enumerate(found) for _ in files]
    return ImageList(files=[f for files in found for f in files], labels=labels, classes=classes), empty


def default_workers(files: int) -> int:
    """Decoding processes by default: one per usable CPU, but one per 256 files at most (starting a
    process costs about as much as decoding that many, so a small tree is checked in this one)."""
    return max(1, min(len(os.sched_getaffinity(0)), files // 256))


def check_data(root: str | Path, workers: int | None = None, min_size: int = 32) -> DataReport:
    """Check every image of a folder tree (or a `path label` list file), `workers` processes at a time
    (None: `default_workers`).

    A root holding only train/ (val/, test/) split folders is checked split
    by split, a flat split folder (ImageNet's raw val/) image by image;
    `classes` counts the first split's classes. Folders holding no images are
    listed in the report and their siblings still checked.

    Raises DataError for a tree with nothing to check (see
    sources.scan_image_folder); per-file problems go into the report.
    """
    if (workers is not None and workers < 1) or min_size < 1:
        raise ValueError(f"workers={workers} and min_size={min_size} must be >= 1")
    root = Path(root).expanduser()
    splits = split_folders(root) or [root]
    indexed, empty_folders = [], []
    for split in splits:
        try:
            images, empty = _index(split)
        except DataError:
            if split is root:
                raise
            empty_folders.append(str(split.resolve()))  # a split folder with nothing in it
            continue
        indexed.append(images)
        empty_folders += empty
    jobs = [(path, min_size) for images in indexed for path in images.files]
    workers = default_workers(len(jobs)) if workers is None else workers
    if workers == 1:
        checks = [_check_job(job) for job in jobs]
    else:
        # spawn: the caller may hold torch threads, which fork would copy in a broken state.
        with get_context("spawn").Pool(workers) as pool:
            checks = pool.map(_check_job, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))
    report = DataReport(root=str(root.resolve()), files=len(jobs), classes=indexed[0].num_classes if indexed else 0,
                        empty_folders=empty_folders)
    for check in checks:
        report.total_bytes += check.bytes
        if check.issues:
            report.problems.append(check)
            report.counts.update(check.issues)
    return report


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `byol-fast check-data`."""
    parser = CommandParser(prog="byol-fast check-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="image tree root/<class>/<image> (e.g. ImageNet train/), a 'path label' list, or "
                                    "WebDataset shards ('/data/train-{000000..000099}.tar', http(s)://, pipe:)")
    parser.add_argument("--workers", type=integer, default=None,
                        help="decoding processes (default: one per usable CPU, one per 256 images at most)")
    parser.add_argument("--min-size", type=integer, default=32,
                        help="flag images whose short side is below this many pixels (default 32)")
    parser.add_argument("--max-listed", type=integer, default=100,
                        help="list at most this many files per issue kind (default 100; unreadable ones always)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `byol-fast check-data`; exit code 0 all decodable, 1 some unreadable, 2 unusable layout."""
    args = build_parser().parse_args(argv)
    if is_shard_spec(args.dir):
        from pipelines.shards.check import main_shards

        return main_shards(args.dir, args.workers, args.max_listed)
    try:
        report = check_data(args.dir, workers=args.workers, min_size=args.min_size)
    except ValueError as err:  # DataError included: the tree itself is unusable
        print(f"byol-fast check-data: {err}", file=sys.stderr)
        return 2
    for folder in report.empty_folders:
        print(f"{'EMPTY-FOLDER':<16} {folder}: holds no images (training refuses the tree: add images or remove it)")
    listed: Counter = Counter()
    for check in report.problems:
        kind = check.issues[0]  # each file is listed once, under its most serious issue
        listed[kind] += 1
        if kind == UNREADABLE or listed[kind] <= args.max_listed:
            print(f"{kind.upper():<16} {check.path}: {', '.join(check.issues)} ({check.detail})")
    hidden = sum(max(0, n - args.max_listed) for kind, n in listed.items() if kind != UNREADABLE)
    if hidden:
        print(f"... {hidden} more files with non-fatal issues not listed (raise --max-listed)")
    print(report.summary())
    return 2 if report.empty_folders else 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
