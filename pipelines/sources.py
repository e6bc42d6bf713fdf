"""Where images come from: an ImageNet-style folder tree or a file list, and
how a dataset is split across ranks each epoch.

Every backend (torchvision, torch-native GPU, DALI, FFCV) starts from an
`ImageList` and from `shard_indices`, so all of them see the same files, the
same labels and the same per-epoch order for a given seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Lower-cased suffixes we treat as images; ImageNet ships ".JPEG".
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# How many offending paths an error message lists before summarizing the rest.
_MAX_NAMED = 5


class DataError(ValueError):
    """A structural problem with the training data; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageList:
    """An indexed set of images: `files[i]` (absolute path) has label `labels[i]`.

    `classes[k]` is the name of label k (the class folder name for a folder
    tree, the label number as text for a file list).
    """

    files: list[str]
    """Absolute paths, in a deterministic order."""
    labels: list[int]
    """Integer label of each file, in [0, len(classes))."""
    classes: list[str]
    """Name of each label."""

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise ValueError(f"ImageList has {len(self.files)} files but {len(self.labels)} labels; "
                             f"pass one label per file")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        """Number of label values (`len(classes)`)."""
        return len(self.classes)


def _name_some(paths: list[str]) -> str:
    shown = ", ".join(paths[:_MAX_NAMED])
    return shown + (f" (and {len(paths) - _MAX_NAMED} more)" if len(paths) > _MAX_NAMED else "")


def is_image_name(name: str) -> bool:
    """True when the file name ends with a known image extension (any letter case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def visible_subfolders(folder: str | Path) -> list[str]:
    """Names of the sub-folders of `folder` that are not hidden, sorted (a class tree's classes)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def images_under(folder: str | Path) -> list[str]:
    """The image files in `folder` and its sub-folders, sorted; hidden files and folders are skipped.

    Recursive so that nested layouts (class/sub/img.jpg) still count, as torchvision's ImageFolder does.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # e.g. .ipynb_checkpoints: not data
        found += [os.path.join(dirpath, f) for f in filenames if is_image_name(f) and not f.startswith(".")]
    return sorted(found)


def scan_image_folder(root: str | Path) -> ImageList:
    """Index an ImageNet-layout tree `root/<class>/<image>` (e.g. ImageNet's `train/`).

    Classes are the sub-folders, sorted by name (label = position); files are
    sorted inside each class, so the result is the same on every machine.
    Hidden entries and files with non-image extensions are ignored. Raises
    DataError for a missing root, a root that is not a folder, a root with no
    class folders, and class folders holding no images (all named at once).
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(f"image folder {root_path} does not exist: pass the folder that holds one sub-folder per class "
                        f"(for ImageNet, .../train), or create data with `byol-fast make-synthetic DIR`")
    if not root_path.is_dir():
        raise DataError(f"{root_path} is a file, not a folder: pass the folder holding one sub-folder per class "
                        f"(a list of 'path label' lines goes to read_file_list instead)")
    root_path = root_path.resolve()
    class_dirs = visible_subfolders(root_path)
    if not class_dirs:
        raise DataError(f"{root_path} has no class sub-folders: images must sit in {root_path}/<class>/<image>.JPEG "
                        f"(if you pointed at a class folder, pass its parent)")
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(class_dirs):
        class_dir = root_path / name
        found = images_under(class_dir)
        if not found:
            empty.append(str(class_dir))
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise DataError(f"{root_path} holds no images (extensions {sorted(IMAGE_EXTENSIONS)}, any case) in its "
                        f"{len(class_dirs)} class folders: check the path or the file extensions")
    if empty:
        raise DataError(f"{len(empty)} class folder(s) under {root_path} hold no images: {_name_some(empty)}; "
                        f"add images or remove these folders so labels stay meaningful")
    return ImageList(files=files, labels=labels, classes=class_dirs)


def read_file_list(path: str | Path) -> ImageList:
    """Index a text file of `image_path label` lines (label a non-negative int).

    Relative image paths are resolved against the list file's folder; blank
    lines and lines starting with '#' are skipped; the path may contain spaces
    (the label is the last whitespace-separated field). Raises DataError for a
    missing list, a malformed line (with its number), and missing images.
    `classes` are the label numbers as text, 0 .. max label.
    """
    list_path = Path(path).expanduser()
    if not list_path.is_file():
        raise DataError(f"file list {list_path} does not exist or is not a file: pass a text file of "
                        f"'relative/or/absolute/path label' lines")
    list_path = list_path.resolve()
    base = list_path.parent
    files: list[str] = []
    labels: list[int] = []
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{list_path} is not a text list of 'path label' lines (byte {err.start} is not UTF-8 "
                        f"text): pass an image folder <dir>/<class>/<image>, a list file, or for a .beton file "
                        f"--data-backend ffcv") from err
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{list_path}, line {number}: {line!r} is not 'path label' with a non-negative "
                            f"integer label; fix or remove the line")
        image = Path(parts[0]).expanduser()
        files.append(str(image if image.is_absolute() else base / image))
        labels.append(int(parts[1]))
    if not files:
        raise DataError(f"file list {list_path} has no 'path label' lines: add at least one image")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{len(missing)} image(s) named in {list_path} do not exist: {_name_some(missing)}; "
                        f"relative paths are resolved against {base}")
    classes = [str(k) for k in range(max(labels) + 1)]
    return ImageList(files=files, labels=labels, classes=classes)


def load_images(source: str | Path) -> ImageList:
    """An ImageList from a folder tree (scan_image_folder) or a list file (read_file_list)."""
    return read_file_list(source) if Path(source).expanduser().is_file() else scan_image_folder(source)


def samples_per_rank(num_items: int, world_size: int, batch_size: int = 1, drop_last: bool = True,
                     rank: int = 0) -> int:
    """How many items rank `rank` gets per epoch from `shard_indices`: the same on every rank with drop_last;
    without it the first num_items % world_size ranks get one more (rank 0's count is the largest)."""
    if drop_last:
        return (num_items // world_size) // batch_size * batch_size
    base, extra = divmod(num_items, world_size)
    return base + (1 if rank < extra else 0)


def shard_indices(
    num_items: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    batch_size: int = 1,
) -> np.ndarray:
    """The item indices rank `rank` reads in epoch `epoch`, as an int64 array.

    Every rank draws the same permutation of range(num_items), seeded by
    (seed, epoch), so the order changes every epoch and is reproducible. Rank r
    takes a contiguous block of it, so blocks are disjoint.

    drop_last=True (training): each rank gets `samples_per_rank(...)` items,
    the same count everywhere and a multiple of batch_size, so every step has a
    static shape. The permutation's tail of fewer than
    world_size * batch_size items is trimmed; since the permutation changes
    each epoch, a different handful is left out each time.
    drop_last=False (evaluation): every item appears exactly once across ranks
    and rank counts differ by at most one (nothing is padded or repeated).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (the per-rank batch)")
    if num_items < 0 or epoch < 0 or seed < 0:
        raise ValueError(f"num_items={num_items}, epoch={epoch} and seed={seed} must be non-negative")
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_items)
    else:
        order = np.arange(num_items)
    if drop_last:
        count = samples_per_rank(num_items, world_size, batch_size, drop_last=True)
        if count == 0:
            raise DataError(f"{num_items} images are too few for world_size={world_size} x batch_size={batch_size}: "
                            f"every rank needs at least one full batch; use more images or a smaller batch")
        start = rank * count
    else:
        # The first (num_items % world_size) ranks take one extra item.
        base, extra = divmod(num_items, world_size)
        count = samples_per_rank(num_items, world_size, drop_last=False, rank=rank)
        start = rank * base + min(rank, extra)
    return order[start:start + count].astype(np.int64)
