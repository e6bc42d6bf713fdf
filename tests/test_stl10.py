"""STL-10 binary reader: pixel placement in the column-major layout, labels, splits, bad files."""

import numpy as np
import pytest

from byol_fast.evaluate import load_splits
from byol_fast.stl10 import IMAGE_BYTES, SIDE, find_stl10_root, load_stl10
from pipelines.sources import DataError


def pattern(image: int, channel: np.ndarray, row: np.ndarray, column: np.ndarray) -> np.ndarray:
    """A value that differs when row and column are swapped, channels are permuted, or images are mixed."""
    return (7 * image + 61 * channel + 5 * row + 2 * column + (row * column) % 3) % 256


def fabricate_x(path, count: int, first_image: int = 0) -> None:
    """Write `count` images byte by byte from STL-10's documented order: byte c*96*96 + x*96 + y = pixel (y, x)."""
    offset = np.arange(IMAGE_BYTES)
    channel, rest = np.divmod(offset, SIDE * SIDE)
    column, row = np.divmod(rest, SIDE)  # column-major: the row index varies fastest
    data = np.concatenate([pattern(first_image + i, channel, row, column) for i in range(count)]).astype(np.uint8)
    path.write_bytes(data.tobytes())


@pytest.fixture
def stl_root(tmp_path):
    root = tmp_path / "stl10_binary"
    root.mkdir()
    fabricate_x(root / "train_X.bin", 3)
    (root / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    fabricate_x(root / "test_X.bin", 2, first_image=3)
    (root / "test_y.bin").write_bytes(bytes([2, 2]))
    fabricate_x(root / "unlabeled_X.bin", 2, first_image=5)
    (root / "class_names.txt").write_text("\n".join(f"class{k}" for k in range(10)) + "\n")
    return root


def expected_image(image: int) -> np.ndarray:
    """[96, 96, 3] (row, column, channel) pixels of fabricated image `image`."""
    row, column, channel = np.meshgrid(np.arange(SIDE), np.arange(SIDE), np.arange(3), indexing="ij")
    return pattern(image, channel, row, column).astype(np.uint8)


def test_pixels_land_at_row_column_channel(stl_root):
    train = load_stl10(stl_root, "train")
    assert len(train) == 3 and train.pixels.shape == (3, 3, SIDE, SIDE)
    for index in range(3):
        picture = np.asarray(train.image(index))
        np.testing.assert_array_equal(picture, expected_image(index))
    # Spot checks through PIL's (x, y) addressing: row 10, column 70 is not row 70, column 10.
    image = train.image(1)
    assert image.getpixel((70, 10)) == tuple(int(v) for v in expected_image(1)[10, 70])
    assert image.getpixel((70, 10)) != image.getpixel((10, 70))


def test_labels_are_zero_based_and_classes_read(stl_root):
    train = load_stl10(stl_root, "train")
    assert train.labels == [0, 9, 3]
    assert train.classes == [f"class{k}" for k in range(10)]
    test = load_stl10(stl_root, "test")
    assert test.labels == [1, 1]
    np.testing.assert_array_equal(np.asarray(test.image(1)), expected_image(4))


def test_unlabeled_and_combined_splits(stl_root):
    unlabeled = load_stl10(stl_root.parent, "unlabeled")  # the parent of stl10_binary works too
    assert unlabeled.labels == [-1, -1]
    both = load_stl10(stl_root, "train+unlabeled")
    assert len(both) == 5 and both.labels == [0, 9, 3, -1, -1]
    np.testing.assert_array_equal(np.asarray(both.image(4)), expected_image(6))


def test_eval_reads_train_and_test(stl_root):
    train, test, described = load_splits(stl_root.parent)
    assert (len(train), len(test)) == (3, 2) and "STL-10" in described


def test_truncated_file_is_named(stl_root):
    (stl_root / "test_X.bin").write_bytes(b"\0" * (IMAGE_BYTES + 5))
    with pytest.raises(DataError, match=r"test_X\.bin has 27653 bytes"):
        load_stl10(stl_root, "test")


def test_label_count_mismatch_and_bad_labels(stl_root):
    (stl_root / "train_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DataError, match=r"holds 2 labels but its image file holds 3"):
        load_stl10(stl_root, "train")
    (stl_root / "train_y.bin").write_bytes(bytes([0, 2, 3]))
    with pytest.raises(DataError, match=r"outside 1\.\.10"):
        load_stl10(stl_root, "train")


def test_missing_files_and_bad_split(tmp_path, stl_root):
    assert find_stl10_root(tmp_path / "nowhere") is None
    with pytest.raises(DataError, match="no STL-10 binary files"):
        load_stl10(tmp_path / "nowhere", "train")
    (stl_root / "test_y.bin").unlink()
    with pytest.raises(DataError, match="test_y.bin is missing"):
        load_stl10(stl_root, "test")
    with pytest.raises(ValueError, match="split='validation'"):
        load_stl10(stl_root, "validation")
