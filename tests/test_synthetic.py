"""The built-in synthetic tree: geometry, file size, class layout, determinism and safety of the target folder."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import synthetic
from pipelines.decode import probe_image
from pipelines.sources import DataError, scan_image_folder
from pipelines.synthetic import MAX_CLASSES, class_factors, class_names, make_synthetic, render_image


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.JPEG"))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synthetic.SyntheticSummary]:
    root = tmp_path_factory.mktemp("syn") / "data"
    return root, make_synthetic(root, images=60, classes=10, seed=1, val_fraction=0.2)


def test_layout_counts_and_labels(tree: tuple[Path, synthetic.SyntheticSummary]) -> None:
    root, summary = tree
    assert (summary.train_images, summary.val_images) == (48, 12)
    train, val = scan_image_folder(root / "train"), scan_image_folder(root / "val")
    assert train.classes == val.classes == summary.classes == class_names(10)
    assert len(train) == 48 and len(val) == 12
    assert np.bincount(train.labels).tolist() == [5] * 8 + [4] * 2  # image i has label i % 10: 48 = 4*10 + 8
    assert np.bincount(val.labels).tolist() == [1] * 8 + [2] * 2  # images 48..59 -> labels 8, 9, 0, ..., 9
    assert all(Path(f).suffix == ".JPEG" for f in train.files + val.files)
    assert (root / synthetic.MANIFEST).is_file()


def test_image_geometry_and_file_size(tree: tuple[Path, synthetic.SyntheticSummary]) -> None:
    root, summary = tree
    files = sorted(root.rglob("*.JPEG"))
    infos = [probe_image(f) for f in files]
    assert all(info.format == "jpeg" and info.mode == "RGB" for info in infos)
    for width, height, _, _ in infos:
        long_side, short_side = max(width, height), min(width, height)
        assert 400 <= long_side <= 600 and 300 <= short_side <= 450
    portrait = sum(h > w for w, h, _, _ in infos)
    assert 3 <= portrait <= 30  # about a quarter of 60 (binomial p=0.25, n=60: mean 15, sd 3.4)
    sizes = np.array([f.stat().st_size for f in files])
    assert summary.mean_file_bytes == pytest.approx(sizes.mean())
    # ImageNet's mean is ~110 KB; per-image sizes spread ~+-15%, so a 60-image mean stays well inside 95-125 KB.
    assert 95e3 <= sizes.mean() <= 125e3, sizes.mean()


def test_deterministic_under_seed_and_workers(tmp_path: Path, tree: tuple[Path, synthetic.SyntheticSummary]) -> None:
    root, _ = tree
    again = make_synthetic(tmp_path / "again", images=60, classes=10, seed=1, val_fraction=0.2, workers=2)
    assert again.mean_file_bytes == tree[1].mean_file_bytes
    assert _digest(tmp_path / "again") == _digest(root)
    # The file for image 3 is exactly render_image(label 3, seed 1, index 3) encoded at the default quality.
    pixels = render_image(3, 10, seed=1, index=3)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=95)
    written = root / "train" / "c003_triangle_dots" / "c003_triangle_dots_0000003.JPEG"
    assert written.read_bytes() == encoded.getvalue()
    assert not np.array_equal(pixels, render_image(3, 10, seed=2, index=3))


def test_colour_does_not_identify_the_class() -> None:
    # Nearest class-mean on the mean RGB of an image: held-out accuracy must stay near chance (0.1).
    labels = np.arange(200) % 10
    colours = np.array([render_image(int(k), 10, seed=0, index=i)[::4, ::4].reshape(-1, 3).mean(0)
                        for i, k in enumerate(labels)])
    fit, held = slice(0, 100), slice(100, 200)
    centroids = np.stack([colours[fit][labels[fit] == k].mean(0) for k in range(10)])
    predicted = np.argmin(((colours[held, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == labels[held]).mean()
    assert accuracy <= 0.25, accuracy  # chance 0.1, binomial sd 0.03 over 100: 0.25 is 5 sd above


def test_class_factors_cover_distinct_combinations() -> None:
    assert class_factors(3, 10) == {"family": 3, "fill": 3, "size": None}
    assert class_factors(17, 100) == {"family": 7, "fill": 8, "size": None}
    assert class_factors(17, 101) == {"family": 7, "fill": 8, "size": 0}
    assert class_factors(123, 300) == {"family": 3, "fill": 5, "size": 1}
    # With ten classes every class has a fill of its own: the cue that survives the tightest crops.
    assert sorted(class_factors(k, 10)["fill"] for k in range(10)) == list(range(10))
    combos = {tuple(class_factors(k, MAX_CLASSES).values()) for k in range(MAX_CLASSES)}
    assert len(combos) == MAX_CLASSES == 300
    names = class_names(MAX_CLASSES)
    assert names == sorted(names) and len(set(names)) == 300 and names[17] == "c017_hexagon_blobs_large"


def test_refuses_foreign_or_existing_trees(tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a synthetic tree we wrote"):
            make_synthetic(foreign, images=10, overwrite=overwrite)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"

    ours = tmp_path / "ours"
    make_synthetic(ours, images=20, classes=4, seed=0)
    with pytest.raises(DataError, match="pass --overwrite"):
        make_synthetic(ours, images=10, classes=2)
    make_synthetic(ours, images=6, classes=3, overwrite=True)
    replaced = scan_image_folder(ours / "train")
    assert len(replaced) == 6 and replaced.num_classes == 3  # the old 4-class tree is gone, not mixed in


def test_stale_reason_names_what_must_be_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "syn"
    assert synthetic.stale_reason(root, 12) == "it does not exist yet"
    make_synthetic(root, images=12, classes=3, val_fraction=0.25)
    assert synthetic.stale_reason(root, 12, classes=3, val_fraction=0.25) is None
    assert synthetic.stale_reason(root, 16, classes=3, val_fraction=0.25) == \
        "it was written with other settings (images 12 -> 16)"
    monkeypatch.setattr(synthetic, "GENERATOR", synthetic.GENERATOR + 1)  # the pictures changed since
    assert synthetic.stale_reason(root, 12, classes=3, val_fraction=0.25) == \
        f"it was written with other settings (generator {synthetic.GENERATOR - 1} -> {synthetic.GENERATOR})"

    written, write_one = [], synthetic._write_one

    def write_then_fail(job: tuple) -> int:  # an interrupted write: the third image never lands
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(job)
        return write_one(job)

    monkeypatch.setattr(synthetic, "_write_one", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(root, images=12, classes=3, overwrite=True)
    assert synthetic.stale_reason(root, 12, classes=3) == "an earlier write was interrupted"
    assert len(list(root.rglob("*.JPEG"))) == 2
    monkeypatch.undo()
    make_synthetic(root, images=12, classes=3, overwrite=True)  # an interrupted tree is ours to replace
    assert synthetic.stale_reason(root, 12, classes=3) is None and len(list(root.rglob("*.JPEG"))) == 12

    foreign = tmp_path / "photos"
    foreign.mkdir()
    assert synthetic.stale_reason(foreign, 12) == f"it holds no {synthetic.MANIFEST}"


def test_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classes=301"):
        make_synthetic(tmp_path / "a", images=400, classes=301)
    with pytest.raises(ValueError, match="every class needs one image per split"):
        make_synthetic(tmp_path / "b", images=20, classes=10, val_fraction=0.3)
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        make_synthetic(tmp_path / "c", images=20, val_fraction=1.0)
    assert not (tmp_path / "a").exists()  # validation happens before anything is written


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synthetic.main([str(tmp_path / "d"), "--images", "12", "--classes", "3", "--val-fraction", "0.25"]) == 0
    assert "wrote 9 train + 3 val images in 3 classes" in capsys.readouterr().out
    assert synthetic.main([str(tmp_path / "d"), "--images", "12"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
