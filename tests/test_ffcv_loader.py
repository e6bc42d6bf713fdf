"""FFCV backend: convert -> .beton -> two-view batches, checked against exact counts, the recipes' float64
reference (pipelines/reference.py) and torchvision.

Loaders are built once per module where possible: each new ffcv Loader costs a
numba compile of its decode loop (about 1-4 s on a busy 2-core machine).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

pytest.importorskip("ffcv")

from byol_fast import cli  # noqa: E402
from pipelines.decode import CorruptImageError, load_rgb  # noqa: E402
from pipelines.ffcv_convert import convert_to_beton  # noqa: E402
from pipelines.ffcv_loader import FfcvTwoViewLoader  # noqa: E402
from pipelines import fidelity, reference  # noqa: E402
from pipelines.ffcv_ops import _stream_key, _uniform, crop_params, resized_crop_into, sample_crop_box  # noqa: E402
from pipelines.fidelity import ffcv_backend  # noqa: E402
from pipelines.sources import DataError, ImageList, shard_indices  # noqa: E402
from pipelines.spec import RECIPES, AugmentationSpec, ViewSpec  # noqa: E402

pytestmark = pytest.mark.ffcv

N_IMAGES = 40
SIZE = 32
BATCH = 8
SPEC = AugmentationSpec(image_size=SIZE)
# Colour off, different crop ranges per view: views are then exactly normalized crops, and a mix-up of the
# views' crop parameters shows.
_PLAIN = dict(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
GEOMETRY_SPEC = AugmentationSpec(image_size=SIZE, view1=ViewSpec(crop_scale=(0.08, 0.3), **_PLAIN),
                                 view2=ViewSpec(crop_scale=(0.6, 1.0), crop_ratio=(0.5, 2.0), **_PLAIN))
MODES = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR}
OUTPUT_ROUNDING = 0.5 + 1e-3
"""Levels between a uint8 view and a float resize of the same crop: the final rounding, plus float32 sums."""


def _expected_view(image: np.ndarray, box: tuple[int, int, int, int], spec: AugmentationSpec) -> np.ndarray:
    """The recipe's resize of an HWC uint8 image's box, float (S, S, 3) in 8-bit levels: the reference's for
    official (TF's resize), torchvision's own float resized_crop (antialiased) for torchvision."""
    top, left, height, width = box
    if spec.recipe == "official":
        crop = image[top:top + height, left:left + width].transpose(2, 0, 1) / 255.0
        return reference.resize(crop, spec.image_size, spec.interpolation, antialias=False).transpose(1, 2, 0) * 255
    source = torch.from_numpy(image).permute(2, 0, 1).double() / 255
    view = TF.resized_crop(source, *box, [spec.image_size] * 2, interpolation=MODES[spec.interpolation],
                           antialias=True)
    return view.clamp(0, 1).permute(1, 2, 0).numpy() * 255


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency colour content, so JPEG round trips stay within a few levels."""
    low = torch.from_numpy(rng.random((1, 3, 5, 5), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
    return (up[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _write_tree(root: Path, count: int, seed: int) -> ImageList:
    """`count` JPEGs of 40..64 px (below max_resolution, so stored unscaled), label i = image i."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    files = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(40, 65, size=2))
        path = root / f"img{i:03d}.jpg"
        Image.fromarray(_smooth_image(rng, height, width)).save(path, quality=95)
        files.append(str(path))
    return ImageList(files=files, labels=list(range(count)), classes=[str(i) for i in range(count)])


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])


def _labels_of(loader: FfcvTwoViewLoader) -> list[int]:
    return [int(v) for _, labels in loader.raw_batches() for v in labels]


def _crops_by_label(loader: FfcvTwoViewLoader) -> dict[int, np.ndarray]:
    return {int(label): crops[k].numpy().copy()
            for crops, labels in loader.raw_batches() for k, label in enumerate(labels)}


@pytest.fixture(scope="module")
def jpg_set(tmp_path_factory) -> tuple[ImageList, str]:
    base = tmp_path_factory.mktemp("ffcv_jpg")
    images = _write_tree(base / "src", N_IMAGES, seed=1)
    report = convert_to_beton(images, base / "data.beton", max_resolution=64, num_workers=1)
    assert report.num_entries == N_IMAGES and not report.skipped
    return images, report.path


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory) -> tuple[ImageList, str, str]:
    """Raw pixels (exact crop checks) with one truncated JPEG kept as a tombstone."""
    base = tmp_path_factory.mktemp("ffcv_raw")
    images = _write_tree(base / "src", 17, seed=2)
    _truncate(images.files[5])
    report = convert_to_beton(images, base / "raw.beton", max_resolution=64, write_mode="raw",
                              num_workers=1, skip_corrupt=True)
    assert [path for path, _ in report.skipped] == [images.files[5]]
    return images, report.path, images.files[5]


@pytest.fixture(scope="module")
def loader(jpg_set) -> FfcvTwoViewLoader:
    return FfcvTwoViewLoader(jpg_set[1], SPEC, BATCH, seed=3, device="cpu", num_workers=1)


def test_every_image_once_per_epoch_and_reshuffled(loader: FfcvTwoViewLoader) -> None:
    assert len(loader) == N_IMAGES // BATCH
    loader.set_epoch(0)
    first, second = _labels_of(loader), _labels_of(loader)
    assert sorted(first) == sorted(second) == list(range(N_IMAGES))
    assert first != second
    # The order is the shard_indices permutation every backend shares.
    assert first == shard_indices(N_IMAGES, 0, 1, 0, 3, batch_size=BATCH).tolist()
    # An epoch abandoned after one batch does not disturb the next one.
    for _ in loader.raw_batches():
        break
    assert loader.epoch == 3
    assert _labels_of(loader) == shard_indices(N_IMAGES, 0, 1, 3, 3, batch_size=BATCH).tolist()


def test_ranks_read_disjoint_shards_covering_all(jpg_set) -> None:
    seen = []
    for rank in range(2):
        shard = FfcvTwoViewLoader(jpg_set[1], SPEC, 4, rank=rank, world_size=2, seed=5, device="cpu", num_workers=1)
        assert len(shard) == N_IMAGES // 2 // 4
        labels = _labels_of(shard)
        assert labels == shard_indices(N_IMAGES, rank, 2, 0, 5, batch_size=4).tolist()
        seen += labels
    assert sorted(seen) == list(range(N_IMAGES))


def test_same_seed_same_batches_with_any_thread_count(loader: FfcvTwoViewLoader, jpg_set) -> None:
    twin = FfcvTwoViewLoader(jpg_set[1], SPEC, BATCH, seed=3, device="cpu", num_workers=2)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        twin.set_epoch(epoch)
        ours = [(c.clone(), l.clone()) for c, l in loader.raw_batches()]
        theirs = [(c.clone(), l.clone()) for c, l in twin.raw_batches()]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs, strict=True))
    loader.set_epoch(0)
    epoch0 = _crops_by_label(loader)
    epoch1 = _crops_by_label(loader)
    # New epoch, new crops for every image (the random stream is keyed by epoch).
    assert all(not np.array_equal(epoch0[k], epoch1[k]) for k in epoch0)


def test_a_fresh_loader_gives_an_epoch_the_views_the_running_one_gave(loader: FfcvTwoViewLoader, jpg_set) -> None:
    # A resumed run builds a new loader and starts at a later epoch: its colour draws must be that epoch's.
    loader.set_epoch(0)
    for _ in loader:  # epoch 0
        pass
    running = [(v1.clone(), v2.clone(), labels.clone()) for v1, v2, labels in loader]  # epoch 1
    fresh = FfcvTwoViewLoader(jpg_set[1], SPEC, BATCH, seed=3, device="cpu", num_workers=1)
    fresh.set_epoch(1)
    resumed = [(v1.clone(), v2.clone(), labels.clone()) for v1, v2, labels in fresh]
    fresh.close()
    assert len(running) == len(resumed) == N_IMAGES // BATCH
    for ours, theirs in zip(running, resumed):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_views_follow_the_data_contract(loader: FfcvTwoViewLoader) -> None:
    low = [(0 - m) / s for m, s in zip(SPEC.mean, SPEC.std)]
    high = [(1 - m) / s for m, s in zip(SPEC.mean, SPEC.std)]
    batches = list(loader)
    assert len(batches) == len(loader)
    for view1, view2, labels in batches:
        for view in (view1, view2):
            assert view.shape == (BATCH, 3, SIZE, SIZE) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)
            for c in range(3):
                assert low[c] - 1e-5 <= view[:, c].min() and view[:, c].max() <= high[c] + 1e-5
        assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
        assert not torch.equal(view1, view2)
    # Labels kept across an epoch stay what they were: ffcv refills its few buffers (batches_ahead + 2) under
    # tensors that view them.
    few_buffers = FfcvTwoViewLoader(loader.path, SPEC, BATCH, seed=3, device="cpu", num_workers=1, batches_ahead=1)
    kept = torch.cat([labels for _, _, labels in few_buffers]).tolist()
    assert sorted(kept) == list(range(N_IMAGES))


def test_jpeg_crops_come_from_their_own_image(loader: FfcvTwoViewLoader, jpg_set) -> None:
    """Each crop matches the reference's official resize of its source on the same box, and not another image.

    Tolerance: mean error < 5 levels for the JPEG path (source q95, stored q90, 4:2:0 chroma, ffcv's fast
    IDCT; measured <= 3.2); the neighbouring image on its own box is far off (measured >= 51).
    """
    images = jpg_set[0]
    loader.set_epoch(4)
    crops = _crops_by_label(loader)
    params = crop_params(SPEC)

    def error(sample: int, source_index: int, view: int) -> float:
        source = np.array(load_rgb(images.files[source_index]))
        box = sample_crop_box(*source.shape[:2], *params[view], True, 3, 4, sample, view)
        return float(np.abs(crops[sample][view] - _expected_view(source, box, SPEC)).mean())

    for sample in range(0, N_IMAGES, 4):
        for view in range(2):
            assert error(sample, sample, view) < 5.0
            assert error(sample, (sample + 1) % N_IMAGES, view) > 20.0
        assert not np.array_equal(crops[sample][0], crops[sample][1])


@pytest.mark.parametrize("recipe", RECIPES)
def test_raw_crops_are_the_recipes_resize_and_views_are_normalized_crops(raw_set, recipe) -> None:
    """The decoder's crops: the recipe's box (sample_crop_box) resized as the recipe says, up to the uint8
    rounding of the output (official: the reference, no antialias; torchvision: torchvision's antialiased
    resized_crop). Measured: 0.500 levels for both."""
    images, path, _ = raw_set
    spec = GEOMETRY_SPEC.replace(recipe=recipe)
    geo = FfcvTwoViewLoader(path, spec, 4, seed=11, device="cpu", num_workers=1)
    crops = _crops_by_label(geo)
    params = crop_params(spec)
    for sample, pair in crops.items():
        source = np.array(load_rgb(images.files[sample]))
        for view in range(2):
            box = sample_crop_box(*source.shape[:2], *params[view], recipe == "official", 11, 0, sample, view)
            assert np.abs(pair[view] - _expected_view(source, box, spec)).max() <= OUTPUT_ROUNDING
    # Same epoch again through the colour stage (all colour ops off): view k == normalize(crop k / 255).
    geo.set_epoch(0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for view1, view2, labels in geo:
        for k, view in enumerate((view1, view2)):
            expected = torch.stack([torch.from_numpy(crops[int(s)][k]) for s in labels]).permute(0, 3, 1, 2)
            torch.testing.assert_close(view, (expected / 255 - mean) / std, atol=1e-5, rtol=0)


def test_tombstone_of_corrupt_image_is_left_out(raw_set) -> None:
    images, path, corrupt = raw_set
    listed = Path(f"{path}.skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(corrupt + "\t")
    geo = FfcvTwoViewLoader(path, GEOMETRY_SPEC, 4, seed=11, device="cpu", num_workers=1)
    assert geo.num_tombstones == 1 and len(geo) == (len(images) - 1) // 4
    assert 5 not in geo.valid and len(geo.valid) == len(images) - 1


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("box,size", [((3, 7, 41, 29), 32), ((0, 0, 60, 50), 24), ((10, 2, 12, 9), 40),
                                      ((5, 5, 32, 32), 32)])
def test_resized_crop_is_the_recipes_resize(box, size, interpolation, recipe) -> None:
    """Shrinking, enlarging and same-size boxes, at the image's edges too: within the output rounding."""
    image = _smooth_image(np.random.default_rng(7), 60, 50) // 2 + np.random.default_rng(8).integers(
        0, 128, (60, 50, 3), dtype=np.uint8)  # smooth plus noise: bicubic overshoots, so the clamping shows
    spec = AugmentationSpec(image_size=size, recipe=recipe, interpolation=interpolation)
    out = np.zeros((size, size, 3), np.uint8)
    resized_crop_into(image, *box, out, interpolation == "bicubic", spec.antialias)
    assert np.abs(out - _expected_view(image, box, spec)).max() <= OUTPUT_ROUNDING


@pytest.mark.parametrize("recipe", RECIPES)
def test_fidelity_resize_equals_the_reference_up_to_output_rounding(recipe) -> None:
    """pipelines.fidelity's probe crops (3x shrink to enlargement) through the adapter, as measure() runs them:
    max 0.500 levels for both recipes (the uint8 output; the passes keep a float32 intermediate)."""
    size, n = 32, 12
    spec = AugmentationSpec(image_size=size, recipe=recipe)
    sources = np.round(fidelity.probe_images(n, 3 * size, seed=1) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    boxes = np.array([fidelity.reference_crop_box(3 * size, 3 * size, rng.random(40), spec.view1, spec)
                      for _ in range(n)])
    got = ffcv_backend.resize(sources.transpose(0, 2, 3, 1).copy(), boxes, spec)
    want = np.stack([reference.resize(source[:, t:t + h, l:l + w] / 255, size, spec.interpolation, spec.antialias)
                     for source, (t, l, h, w) in zip(sources, boxes)])
    assert np.abs(got - want).max() * 255 <= OUTPUT_ROUNDING
    # The other recipe's resize is far off on these shrinking crops: the recipe does reach the resampling.
    other = np.stack([reference.resize(source[:, t:t + h, l:l + w] / 255, size, spec.interpolation,
                                       not spec.antialias) for source, (t, l, h, w) in zip(sources, boxes)])
    assert np.abs(got - other).max() * 255 > 5


def _stream_draws(seed: int, epoch: int, sample: int, view: int, count: int = 40) -> np.ndarray:
    """The first `count` U[0, 1) draws of the decoder's random stream for one view of one sample."""
    key = np.uint64(_stream_key(seed, epoch, sample, view))  # numba returns a Python int: int64 + uint64 is float
    return np.array([_uniform(key, k) for k in range(count)])


@pytest.mark.parametrize("recipe", RECIPES)
def test_crop_boxes_are_the_references_on_the_same_draws(recipe) -> None:
    """sample_crop_box == reference.{official,torchvision}_crop_box fed the same stream, box for box, on
    ordinary, small and thin images (clamped sides, torchvision's fallback) and wide crop ranges."""
    spec = AugmentationSpec(recipe=recipe)
    views = (spec.view1, ViewSpec(crop_scale=(0.5, 1.0), crop_ratio=(0.2, 5.0)))
    for height, width in ((300, 400), (40, 33), (3, 200), (200, 2), (1, 1)):
        for view in views:
            for sample in range(150):
                ours = sample_crop_box(height, width, *view.crop_scale, *view.crop_ratio, recipe == "official",
                                       5, 1, sample, 0)
                theirs = fidelity.reference_crop_box(height, width, _stream_draws(5, 1, sample, 0), view, spec)
                assert ours == tuple(theirs), (height, width, view, sample)


@pytest.mark.parametrize("recipe", RECIPES)
def test_crop_statistics_match_the_reference(recipe) -> None:
    """4000 boxes from the adapter vs 4000 fresh reference draws on a 300 x 400 image: KS of area fraction and
    log aspect < 0.045 (alpha ~ 0.001; measured 0.020 and 0.016 official, 0.018 and 0.021 torchvision)."""
    height, width, n = 300, 400, 4000
    spec = AugmentationSpec(recipe=recipe)
    ours = ffcv_backend.crop_boxes(height, width, n, spec.view1, spec, seed=0)
    rng = np.random.default_rng(0)
    theirs = np.array([fidelity.reference_crop_box(height, width, rng.random(40), spec.view1, spec)
                       for _ in range(n)])
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    for a, b in zip(fidelity.crop_statistics(ours, height, width), fidelity.crop_statistics(theirs, height, width)):
        assert fidelity._ks(a, b) < 0.045
    # Seeds give independent streams.
    assert not np.array_equal(ours, ffcv_backend.crop_boxes(height, width, n, spec.view1, spec, seed=1))


def test_crop_box_statistics_match_torchvision() -> None:
    """The torchvision recipe's boxes vs 4000 from torchvision's own RandomResizedCrop.get_params: KS < 0.045."""
    from torchvision.transforms import RandomResizedCrop

    height, width, n = 300, 400, 4000
    view = SPEC.view1
    ours = np.array([sample_crop_box(height, width, *view.crop_scale, *view.crop_ratio, False, 9, 2, s, 0)
                     for s in range(n)], dtype=np.float64)
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(3, height, width), list(view.crop_scale),
                                                    list(view.crop_ratio)) for _ in range(n)], dtype=np.float64)
    centre_y = lambda b: (b[:, 0] + b[:, 2] / 2) / height  # noqa: E731
    for a, b in zip((*fidelity.crop_statistics(ours, height, width), centre_y(ours)),
                    (*fidelity.crop_statistics(theirs, height, width), centre_y(theirs))):
        assert fidelity._ks(a, b) < 0.045


def test_crop_fallback_equals_torchvision() -> None:
    """When ten tries fail, both take the largest centred crop within the aspect range."""
    from torchvision.transforms import RandomResizedCrop

    for height, width in ((10, 1000), (1000, 10)):
        expected = RandomResizedCrop.get_params(torch.empty(3, height, width), [0.9, 1.0], [0.75, 4 / 3])
        assert sample_crop_box(height, width, 0.9, 1.0, 0.75, 4 / 3, False, 0, 0, 0, 0) == tuple(expected)


def test_corrupt_image_fails_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    images = _write_tree(tmp_path / "src", 6, seed=4)
    _truncate(images.files[2])
    target = tmp_path / "out.beton"
    with pytest.raises(CorruptImageError, match=r"img002\.jpg") as info:
        convert_to_beton(images, target, max_resolution=64, num_workers=1)
    assert "--skip-corrupt" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no leftover partial file


def test_thin_images_are_downscaled_with_every_side_kept(tmp_path: Path) -> None:
    """A valid 1-px-wide image whose short side would scale to 0 px converts (ffcv's resizer hung on it).

    The conversion runs in a subprocess with a timeout: the failure this guards against is a writer worker
    dying in cv2.resize while DatasetWriter waits for it forever.
    """
    (tmp_path / "src" / "a").mkdir(parents=True)
    column = np.random.default_rng(9).integers(0, 256, (128, 1, 3), dtype=np.uint8)
    Image.fromarray(column).save(tmp_path / "src" / "a" / "tall.png")  # 1 x 128 -> 0.5 x 64 at 64
    Image.fromarray(np.full((3, 128, 3), 77, np.uint8)).save(tmp_path / "src" / "a" / "wide.png")
    target = tmp_path / "thin.beton"
    command = [sys.executable, "-c", "import sys; from pipelines.ffcv_convert import main; sys.exit(main(sys.argv[1:]))",
               str(tmp_path / "src"), str(target), "--max-resolution", "64", "--write-mode", "raw", "--workers", "1"]
    try:
        done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("convert-ffcv hung on a thin image (a writer worker died and DatasetWriter waited for it)")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["src", "thin.beton"]  # no partial file left behind
    from ffcv.reader import Reader

    stored = Reader(str(target)).metadata["f0"]
    assert [(int(e["height"]), int(e["width"])) for e in stored] == [(64, 1), (2, 64)]  # files sort tall, wide
    pixels = np.fromfile(target, np.uint8, count=64 * 3, offset=int(stored[0]["data_ptr"])).reshape(64, 1, 3)
    area_mean = column.reshape(64, 2, 1, 3).mean(axis=1)  # halving is the mean of each pair of rows
    assert np.abs(pixels - area_mean).max() <= 0.5 + 1e-9
    wide = np.fromfile(target, np.uint8, count=2 * 64 * 3, offset=int(stored[1]["data_ptr"]))
    assert (wide == 77).all()


def test_existing_output_is_refused_unless_overwrite(jpg_set, tmp_path: Path, capsys) -> None:
    images, path = jpg_set
    before = Path(path).read_bytes()
    with pytest.raises(DataError, match="--overwrite"):
        convert_to_beton(images, path, max_resolution=64, num_workers=1)
    assert Path(path).read_bytes() == before
    # Through the console script: refused (status 2), then replaced with --overwrite.
    source = str(Path(images.files[0]).parent.parent)
    target = tmp_path / "cli.beton"
    target.write_bytes(b"not yet")
    args = ["convert-ffcv", source, str(target), "--max-resolution", "48", "--workers", "1"]
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_bytes() == b"not yet"
    assert cli.main(args + ["--overwrite"]) == 0
    assert f"{N_IMAGES} images" in capsys.readouterr().out
    from ffcv.reader import Reader
    stored = Reader(str(target)).metadata["f0"]
    assert max(stored["width"].max(), stored["height"].max()) == 48  # --max-resolution took effect


def test_bad_loader_inputs_are_clear_errors(tmp_path: Path, jpg_set) -> None:
    with pytest.raises(DataError, match="convert-ffcv"):
        FfcvTwoViewLoader(tmp_path / "missing.beton", SPEC, BATCH, device="cpu")
    folder = Path(jpg_set[0].files[0]).parent
    with pytest.raises(DataError, match=rf"{re.escape(str(folder))} is an image folder.*`byol-fast convert-ffcv "
                                        rf"{re.escape(str(folder))} OUT\.beton` and pass --data OUT\.beton, or .* "
                                        r"another --data-backend"):
        FfcvTwoViewLoader(folder, SPEC, BATCH, device="cpu")
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(DataError, match="not a readable FFCV file"):
        FfcvTwoViewLoader(junk, SPEC, BATCH, device="cpu")
    with pytest.raises(DataError, match="too few"):
        FfcvTwoViewLoader(jpg_set[1], SPEC, 16, world_size=3, device="cpu")
    with pytest.raises(ValueError, match="rank"):
        FfcvTwoViewLoader(jpg_set[1], SPEC, BATCH, rank=2, world_size=2, device="cpu")


def test_damaged_beton_entry_is_reported_by_index(jpg_set, tmp_path: Path) -> None:
    from ffcv.reader import Reader

    damaged = tmp_path / "damaged.beton"
    damaged.write_bytes(Path(jpg_set[1]).read_bytes())
    entry = Reader(str(damaged)).metadata["f0"][7]
    with open(damaged, "r+b") as handle:  # overwrite the start of entry 7's JPEG (its SOI/headers)
        handle.seek(int(entry["data_ptr"]))
        handle.write(b"\x00" * 64)
    broken = FfcvTwoViewLoader(damaged, SPEC, BATCH, device="cpu", num_workers=1)
    with pytest.raises(DataError, match=r"entry 7 failed to decode"):
        _labels_of(broken)


@pytest.mark.slow  # optional order; ~6 s for its own loader compile and process cache
def test_quasi_random_order_reads_each_image_at_most_once(jpg_set) -> None:
    quasi = FfcvTwoViewLoader(jpg_set[1], SPEC, BATCH, seed=1, device="cpu", num_workers=1, order="quasi_random")
    labels = _labels_of(quasi)
    assert len(labels) == len(quasi) * BATCH == N_IMAGES and sorted(labels) == list(range(N_IMAGES))


@pytest.mark.cuda
def test_cuda_views_into_static_buffers_without_host_sync(jpg_set, forbid_host_sync) -> None:
    out = tuple(torch.empty(BATCH, 3, SIZE, SIZE, dtype=torch.bfloat16, device="cuda")
                .contiguous(memory_format=torch.channels_last) for _ in range(2))
    gpu = FfcvTwoViewLoader(jpg_set[1], SPEC, BATCH, seed=3, device="cuda", out=out)
    cpu = FfcvTwoViewLoader(jpg_set[1], SPEC, BATCH, seed=3, device="cpu", num_workers=1)
    expected_labels = _labels_of(cpu)
    seen = []
    with forbid_host_sync():
        for view1, view2, labels in gpu:
            assert view1 is out[0] and view2 is out[1] and labels.device.type == "cuda"
            seen.append(labels.clone())
    assert torch.cat(seen).tolist() == expected_labels
    assert torch.isfinite(out[0].float()).all() and out[0].float().std() > 0.1
