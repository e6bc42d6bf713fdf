"""STL-10 from its binary distribution (`stl10_binary/`), as in-memory labelled image sets.

Layout (as torchvision's STL10 reader decodes it, reshape to (N, 3, 96, 96)
then swap the last two axes): `*_X.bin` is a flat run of uint8 images of 3 x 96 x 96
bytes each, channel-major (all red, then green, then blue), and inside a
channel column-major, i.e. byte `c*96*96 + x*96 + y` is pixel (row y, column
x). `*_y.bin` holds one uint8 label per image, 1..10. `class_names.txt` names
the classes one per line. The splits: train (5,000 labelled), test (8,000
labelled) and unlabeled (100,000, for pretraining). The X files are
memory-mapped, so the 2.7 GB unlabeled split costs no RAM until read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from byol_fast.features import InMemoryImages
from pipelines.sources import DataError

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
DEFAULT_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def find_stl10_root(path: str | Path) -> Path | None:
    """The folder holding STL-10's .bin files: `path` itself or `path/stl10_binary`; None if neither."""
    base = Path(path).expanduser()
    for candidate in (base, base / "stl10_binary"):
        if (candidate / "train_X.bin").is_file() or (candidate / "unlabeled_X.bin").is_file():
            return candidate
    return None


def _read_images(path: Path) -> np.ndarray:
    """A [N, 3, 96, 96] uint8 view (rows y, columns x) of one X file, memory-mapped."""
    if not path.is_file():
        raise DataError(f"STL-10 file {path} is missing: extract stl10_binary.tar.gz so that it holds "
                        f"train_X.bin, train_y.bin, test_X.bin, test_y.bin and unlabeled_X.bin")
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise DataError(f"{path} has {size} bytes, not a positive multiple of {IMAGE_BYTES} (one 3x96x96 image): "
                        f"the file is truncated or not STL-10; re-extract it")
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // IMAGE_BYTES, 3, SIDE, SIDE))
    # Stored [channel][column][row]: swapping the last two axes gives [channel][row][column].
    return raw.transpose(0, 1, 3, 2)


def _read_labels(path: Path, count: int, num_classes: int) -> list[int]:
    if not path.is_file():
        raise DataError(f"STL-10 label file {path} is missing: it comes with {path.name.replace('_y', '_X')} "
                        f"in stl10_binary.tar.gz")
    stored = np.fromfile(path, dtype=np.uint8)
    if stored.shape[0] != count:
        raise DataError(f"{path} holds {stored.shape[0]} labels but its image file holds {count} images: "
                        f"re-extract both files from the same archive")
    if stored.size and (stored.min() < 1 or stored.max() > num_classes):
        raise DataError(f"{path} has labels outside 1..{num_classes} (found {stored.min()}..{stored.max()}): "
                        f"this is not an STL-10 label file")
    return (stored.astype(np.int64) - 1).tolist()


def _class_names(root: Path) -> list[str]:
    names_file = root / "class_names.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if names:
            return names
    return list(DEFAULT_CLASSES)


def load_stl10(path: str | Path, split: str) -> InMemoryImages:
    """One STL-10 split as InMemoryImages ([N, 3, 96, 96] uint8); unlabeled images get label -1.

    `path` is the `stl10_binary` folder or its parent. `split` is one of
    "train", "test", "unlabeled" or "train+unlabeled" (pretraining on both, as
    BYOL's STL-10 runs do; that one is read into memory, ~2.8 GB).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    root = find_stl10_root(path)
    if root is None:
        raise DataError(f"no STL-10 binary files under {path}: pass the stl10_binary folder (with train_X.bin ...) "
                        f"or its parent")
    classes = _class_names(root)
    parts = []
    for name in split.split("+"):
        pixels = _read_images(root / f"{name}_X.bin")
        if name == "unlabeled":
            labels = [-1] * pixels.shape[0]
        else:
            labels = _read_labels(root / f"{name}_y.bin", pixels.shape[0], len(classes))
        parts.append(InMemoryImages(pixels=pixels, labels=labels, classes=classes))
    if len(parts) == 1:
        return parts[0]
    return InMemoryImages(pixels=np.concatenate([p.pixels for p in parts]),
                          labels=[label for p in parts for label in p.labels], classes=classes)
