"""Image sources and rank sharding: layouts, fail-fast errors, exact coverage per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.sources import (
    DataError,
    ImageList,
    load_images,
    read_file_list,
    samples_per_rank,
    scan_image_folder,
    shard_indices,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff")  # content is irrelevant to indexing
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for name in ("n02", "n01/b.JPEG", "n01/a.jpeg", "n01/c.PNG", "n02/x.jpg", "n03/deep/y.JpG", "n03/z.bmp"):
        if "/" in name:
            _touch(root / name)
    (root / "n01" / "notes.txt").write_text("not an image")
    (root / "n01" / ".hidden.jpg").write_bytes(b"")
    _touch(root / "n01" / ".ipynb_checkpoints" / "a-checkpoint.jpg")  # hidden folders inside a class too
    (root / ".cache").mkdir()
    (root / "README").write_text("top-level files are ignored")
    return root


def test_scan_image_folder_sorted_absolute_and_case_insensitive(tree: Path) -> None:
    images = scan_image_folder(tree)
    assert images.classes == ["n01", "n02", "n03"]
    rel = [str(Path(f).relative_to(tree)) for f in images.files]
    assert rel == ["n01/a.jpeg", "n01/b.JPEG", "n01/c.PNG", "n02/x.jpg", "n03/deep/y.JpG", "n03/z.bmp"]
    assert images.labels == [0, 0, 0, 1, 2, 2]
    assert all(Path(f).is_absolute() for f in images.files)
    assert len(images) == 6 and images.num_classes == 3
    assert load_images(tree) == images


def test_scan_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*make-synthetic"):
        scan_image_folder(tmp_path / "nowhere")
    a_file = _touch(tmp_path / "file.jpg")
    with pytest.raises(DataError, match=r"is a file, not a folder"):
        scan_image_folder(a_file)
    flat = tmp_path / "flat"
    _touch(flat / "img.jpg")
    with pytest.raises(DataError, match=r"no class sub-folders.*pass its parent"):
        scan_image_folder(flat)
    nothing = tmp_path / "nothing"
    (nothing / "a").mkdir(parents=True)
    (nothing / "b").mkdir()
    (nothing / "b" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no images"):
        scan_image_folder(nothing)


def test_scan_names_every_empty_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _touch(root / "good" / "1.jpg")
    (root / "empty_one").mkdir()
    (root / "empty_two").mkdir()
    (root / "empty_two" / "list.csv").write_text("")
    with pytest.raises(DataError) as info:
        scan_image_folder(root)
    message = str(info.value)
    assert "2 class folder(s)" in message
    assert str(root / "empty_one") in message and str(root / "empty_two") in message
    assert str(root / "good") not in message


def test_read_file_list_relative_absolute_and_spaces(tmp_path: Path) -> None:
    first = _touch(tmp_path / "imgs" / "a b.jpg")
    second = _touch(tmp_path / "elsewhere" / "c.png")
    listing = tmp_path / "imgs" / "list.txt"
    listing.write_text(f"# header comment\na b.jpg 3\n\n{second}\t1\n")
    images = read_file_list(listing)
    assert images.files == [str(first), str(second)]
    assert images.labels == [3, 1]
    assert images.classes == ["0", "1", "2", "3"]
    assert load_images(listing) == images


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("a.jpg 0\nb.jpg\n", r"line 2: 'b.jpg' is not 'path label'"),
        ("a.jpg 0\n\nb.jpg -1\n", r"line 3"),
        ("a.jpg zero\n", r"line 1"),
        ("# only a comment\n", r"no 'path label' lines"),
    ],
)
def test_read_file_list_malformed_lines(tmp_path: Path, content: str, pattern: str) -> None:
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "b.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_file_list(listing)


def test_read_file_list_missing_images_and_file(tmp_path: Path) -> None:
    _touch(tmp_path / "ok.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("ok.jpg 0\n" + "".join(f"gone{i}.jpg 1\n" for i in range(8)))
    with pytest.raises(DataError) as info:
        read_file_list(listing)
    message = str(info.value)
    assert message.startswith("8 image(s)") and "(and 3 more)" in message
    assert str(tmp_path / "gone0.jpg") in message and "gone7" not in message
    with pytest.raises(DataError, match="does not exist or is not a file"):
        read_file_list(tmp_path / "missing.txt")
    beton = tmp_path / "train.beton"  # binary data passed where a folder or list was expected
    beton.write_bytes(b"\x00\x01\xff\xfe" * 16)
    with pytest.raises(DataError, match=r"train.beton is not a text list .*\(byte 2 .*--data-backend ffcv"):
        load_images(beton)


def test_image_list_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="2 files but 1 labels"):
        ImageList(files=["/a", "/b"], labels=[0], classes=["x"])


@pytest.mark.parametrize("num_items, world_size, batch_size",
                         [(103, 1, 1), (103, 2, 4), (1000, 3, 8), (64, 8, 8), (97, 7, 2)])
def test_shard_drop_last_disjoint_equal_and_trimmed(num_items: int, world_size: int, batch_size: int) -> None:
    count = samples_per_rank(num_items, world_size, batch_size)
    assert count == (num_items // world_size) // batch_size * batch_size
    for epoch in range(3):
        shards = [shard_indices(num_items, r, world_size, epoch, seed=5, batch_size=batch_size)
                  for r in range(world_size)]
        assert all(len(s) == count and s.dtype == np.int64 for s in shards)
        union = np.concatenate(shards)
        assert len(np.unique(union)) == len(union) == count * world_size  # no repeats across ranks
        assert union.min() >= 0 and union.max() < num_items
        # The ranks read the permutation's head in order; the trimmed tail is under one global batch.
        assert np.array_equal(union, shard_indices(num_items, 0, 1, epoch, seed=5)[: len(union)])
        assert num_items - len(union) < world_size * batch_size


@pytest.mark.parametrize("num_items, world_size", [(10, 3), (100, 1), (101, 4), (5, 8)])
def test_shard_without_drop_last_covers_every_item_once(num_items: int, world_size: int) -> None:
    for epoch in (0, 1):
        shards = [shard_indices(num_items, r, world_size, epoch, seed=0, drop_last=False) for r in range(world_size)]
        union = np.concatenate(shards)
        assert sorted(union.tolist()) == list(range(num_items))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert sizes == [samples_per_rank(num_items, world_size, drop_last=False, rank=r) for r in range(world_size)]


def test_shard_reshuffles_per_epoch_and_is_deterministic() -> None:
    a0 = shard_indices(1000, 1, 4, epoch=0, seed=7)
    a1 = shard_indices(1000, 1, 4, epoch=1, seed=7)
    assert not np.array_equal(a0, a1)
    assert np.array_equal(a0, shard_indices(1000, 1, 4, epoch=0, seed=7))
    assert not np.array_equal(a0, shard_indices(1000, 1, 4, epoch=0, seed=8))
    # Every rank derives its block from the same permutation: concatenating ranks gives one permutation.
    full = shard_indices(1000, 0, 1, epoch=3, seed=7)
    split = np.concatenate([shard_indices(1000, r, 4, epoch=3, seed=7) for r in range(4)])
    assert np.array_equal(full, split)
    # The permutation is not the identity (shuffling happened) but shuffle=False is.
    assert not np.array_equal(full, np.arange(1000))
    assert np.array_equal(shard_indices(10, 1, 2, epoch=4, seed=7, shuffle=False), np.arange(5, 10))


def test_shard_validation() -> None:
    with pytest.raises(ValueError, match="rank=2 must lie in"):
        shard_indices(10, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="rank=-1"):
        shard_indices(10, -1, 2, 0, 0)
    with pytest.raises(ValueError, match="world_size=0"):
        shard_indices(10, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        shard_indices(10, 0, 1, 0, 0, batch_size=0)
    with pytest.raises(DataError, match="too few for world_size=4 x batch_size=4"):
        shard_indices(15, 0, 4, 0, 0, batch_size=4)
