"""The DALI backend, in DALI's CPU mode (GPU variants marked cuda): contract, seeds, sharding, rates, ops.

Images are small JPEGs written to a tmp folder; each file's label is its index,
so the labels a loader yields say exactly which files it read. Rate checks use
the draws the pipeline itself returns (`debug_outputs=True`), and one test
re-derives view 2 from view 1 with reference ops and those draws, so a draw
that the graph ignored would fail it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

pytest.importorskip("nvidia.dali")
import nvidia.dali.fn as fn  # noqa: E402
import nvidia.dali.types as types  # noqa: E402
from nvidia.dali import pipeline_def  # noqa: E402

from pipelines import dali_ops  # noqa: E402
from pipelines.dali_pipeline import DEBUG_FIELDS, DaliTwoViewLoader, pipeline_seed  # noqa: E402
from pipelines.sources import DataError, ImageList, shard_indices  # noqa: E402
from pipelines.spec import AugmentationSpec, ViewSpec  # noqa: E402

pytestmark = pytest.mark.dali

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.cuda)]
NUM_IMAGES = 50
SPEC = AugmentationSpec(image_size=32)


def _smooth_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Colour fields with edges and the full 0..255 range: coarse noise upsampled bicubically."""
    coarse = rng.integers(0, 256, (height // 6 + 2, width // 6 + 2, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _write_images(folder, sizes: list[tuple[int, int]], seed: int) -> ImageList:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{i:03d}.jpg"
        # 4:4:4 chroma keeps CPU (libjpeg-turbo) and GPU (nvJPEG) decodes within IDCT rounding of each other.
        Image.fromarray(_smooth_rgb(rng, h, w)).save(path, quality=95, subsampling=0)
        files.append(str(path))
    return ImageList(files=files, labels=list(range(len(files))), classes=[str(i) for i in range(len(files))])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> ImageList:
    """50 JPEGs of 56..80 px with aspect ratios inside 3/4..4/3 (so crop fallbacks are rare)."""
    rng = np.random.default_rng(1)
    sides = [(int(rng.integers(60, 81)), int(rng.integers(60, 81))) for _ in range(NUM_IMAGES)]
    return _write_images(tmp_path_factory.mktemp("dali_images"), sides, seed=2)


@pytest.fixture(scope="module")
def square_images(tmp_path_factory) -> ImageList:
    return _write_images(tmp_path_factory.mktemp("dali_square"), [(40, 40)] * 12, seed=3)


def _epoch(loader: DaliTwoViewLoader, epoch: int | None = None) -> list[tuple]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch) for batch in loader]


def _device_of(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_contract_seeds_dtypes_and_out_buffers(images, device):
    loader = DaliTwoViewLoader(images, SPEC, batch_size=8, device=device, seed=0, num_threads=2)
    assert len(loader) == NUM_IMAGES // 8
    first = _epoch(loader)
    assert len(first) == len(loader)
    bounds = [((0 - m) / s, (1 - m) / s) for m, s in zip(SPEC.mean, SPEC.std)]
    for view1, view2, labels in first:
        for view in (view1, view2):
            assert view.shape == (8, 3, 32, 32) and view.dtype == torch.bfloat16
            assert view.device == _device_of(device) and view.is_contiguous(memory_format=torch.channels_last)
            for c, (low, high) in enumerate(bounds):  # normalized [0, 1] pixels, plus bf16 rounding
                assert low - 0.02 <= view[:, c].float().min() and view[:, c].float().max() <= high + 0.02
        assert labels.dtype == torch.int64 and labels.device == _device_of(device)
    # The whole [0, 1] range is reached, so the normalization is not off by a factor.
    assert max(v.float().max().item() for b in first for v in b[:2]) > bounds[1][1] - 0.3

    # Same seed: identical batches, whatever the dtype path; fp16 views are DALI's own buffers (zero copy),
    # and they must survive later batches untouched.
    half = DaliTwoViewLoader(images, SPEC, batch_size=8, device=device, seed=0, dtype=torch.float16, num_threads=2)
    kept = list(iter(half))
    for (a1, a2, al), (h1, h2, hl) in zip(first, kept):
        assert torch.equal(h1.to(torch.bfloat16), a1) and torch.equal(h2.to(torch.bfloat16), a2)
        assert torch.equal(hl, al)

    # out= buffers: written in place, yielded as themselves, same values.
    shape = (8, 3, 32, 32)
    out = tuple(torch.empty(shape, dtype=torch.bfloat16, device=_device_of(device))
                .to(memory_format=torch.channels_last) for _ in range(2))
    pointers = [b.data_ptr() for b in out]
    buffered = DaliTwoViewLoader(images, SPEC, batch_size=8, device=device, seed=0, num_threads=2, out=out)
    for (a1, a2, _), (b1, b2, _) in zip(first, buffered):
        assert b1 is out[0] and b2 is out[1] and [b1.data_ptr(), b2.data_ptr()] == pointers
        assert torch.equal(b1, a1) and torch.equal(b2, a2)

    # Another seed: other augmentations and another file order.
    other = _epoch(DaliTwoViewLoader(images, SPEC, batch_size=8, device=device, seed=1, num_threads=2,
                                     dtype=torch.float32))
    assert not torch.equal(other[0][0].to(torch.bfloat16), first[0][0])
    assert not all(torch.equal(o[2], f[2]) for o, f in zip(other, first))


def test_argument_errors_name_the_fix(images):
    with pytest.raises(ValueError, match="channels_last"):
        DaliTwoViewLoader(images, SPEC, batch_size=8, device="cpu", out=(torch.empty(8, 3, 32, 32),) * 2)
    with pytest.raises(DataError, match="too few"):
        DaliTwoViewLoader(images, SPEC, batch_size=20, world_size=3, device="cpu")
    with pytest.raises(ValueError, match="device"):
        DaliTwoViewLoader(images, SPEC, batch_size=8, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        DaliTwoViewLoader(images, SPEC, batch_size=8, device="cpu", dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cpu'"):
            DaliTwoViewLoader(images, SPEC, batch_size=8, device="gpu")


def test_sharding_covers_each_image_once_per_epoch_and_reshuffles(images):
    world, batch = 3, 5
    per_rank = (NUM_IMAGES // world) // batch * batch  # 15: 45 of 50 images per epoch, 5 dropped
    loaders = [DaliTwoViewLoader(images, SPEC, batch_size=batch, rank=r, world_size=world, device="cpu", seed=7,
                                 num_threads=1) for r in range(world)]
    assert {len(loader) for loader in loaders} == {per_rank // batch}
    seen = {0: [], 1: []}
    first_epoch_rank0 = None
    for rank, loader in enumerate(loaders):
        for epoch in (0, 1):
            batches = _epoch(loader)
            if rank == 0 and epoch == 0:
                first_epoch_rank0 = batches
            labels = torch.cat([b[2] for b in batches]).numpy()
            # Exactly the files shard_indices assigns: the order every backend shares.
            np.testing.assert_array_equal(labels, shard_indices(NUM_IMAGES, rank, world, epoch, 7, batch_size=batch))
            seen[epoch].append(labels)
    for epoch in (0, 1):
        union = np.concatenate(seen[epoch])
        assert len(union) == len(set(union.tolist())) == world * per_rank  # disjoint, none repeated
    assert not np.array_equal(np.concatenate(seen[0]), np.concatenate(seen[1]))  # reshuffled
    assert set(np.concatenate(seen[0]).tolist()) != set(np.concatenate(seen[1]).tolist())  # another tail dropped

    # Jumping back to epoch 0 rebuilds the pipeline with the same seeds: the very same batches.
    again = _epoch(loaders[0], epoch=0)
    for a, b in zip(again, first_epoch_rank0):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # A resume inside epoch 1 reads exactly the rest of that epoch's files, then goes on to epoch 2.
    loaders[0].set_epoch(1, start=1)
    rest = torch.cat([b[2] for b in _epoch(loaders[0])]).numpy()
    np.testing.assert_array_equal(rest, seen[1][0][batch:])
    following = torch.cat([b[2] for b in _epoch(loaders[0])]).numpy()
    np.testing.assert_array_equal(following, shard_indices(NUM_IMAGES, 0, world, 2, 7, batch_size=batch))
    assert pipeline_seed(7, 0, 0) != pipeline_seed(7, 1, 0) != pipeline_seed(7, 0, 1)


def _binomial_ok(hits: np.ndarray, p: float) -> bool:
    """|rate - p| within 4.5 binomial standard deviations (exact for p in {0, 1})."""
    n = hits.size
    return abs(hits.mean() - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


def _uniform_ok(values: np.ndarray, low: float, high: float) -> bool:
    """Inside [low, high], mean within 4.5 standard errors of the midpoint, both ends approached."""
    if high == low:
        return bool(np.all(values == np.float32(low)))
    width = high - low
    sem = width / math.sqrt(12 * values.size)
    return (values.min() >= low - 1e-6 and values.max() <= high + 1e-6 and abs(values.mean() - (low + high) / 2)
            <= 4.5 * sem and values.min() < low + 0.02 * width and values.max() > high - 0.02 * width)


@pytest.mark.parametrize("device", DEVICES)
def test_rates_and_ranges_of_the_pipelines_own_draws(images, device):
    spec = AugmentationSpec(image_size=24)
    loader = DaliTwoViewLoader(images, spec, batch_size=NUM_IMAGES, device=device, seed=3, num_threads=2,
                               debug_outputs=True)
    draws = {"view1": {}, "view2": {}}
    for _ in range(40):  # 40 epochs x 50 images = 2000 samples per view
        for *_, debug in loader:
            for view, fields in debug.items():
                for name, value in fields.items():
                    draws[view].setdefault(name, []).append(value)
    for view_name, view in zip(("view1", "view2"), spec.views):
        d = {name: np.concatenate(values) for name, values in draws[view_name].items()}
        assert d["flip"].size == 2000
        assert _binomial_ok(d["flip"], view.flip_prob)
        assert _binomial_ok(d["jitter"], view.color_jitter_prob)
        assert _binomial_ok(d["gray"], view.grayscale_prob)
        assert _binomial_ok(d["blur"], view.blur_prob)
        assert _binomial_ok(d["solarize"], view.solarize_prob)
        assert _uniform_ok(d["brightness"], 1 - view.brightness, 1 + view.brightness)
        assert _uniform_ok(d["contrast"], 1 - view.contrast, 1 + view.contrast)
        assert _uniform_ok(d["saturation"], 1 - view.saturation, 1 + view.saturation)
        assert _uniform_ok(d["hue"], -360 * view.hue, 360 * view.hue)  # turns -> degrees
        assert _uniform_ok(d["sigma"], *view.blur_sigma)

        # Crop windows lie inside the image; area and aspect follow torchvision's RandomResizedCrop.
        shape, anchor, extent = d["image_shape"][:, :2], d["crop_anchor"], d["crop_extent"]
        assert np.all(anchor >= 0) and np.all(anchor + extent <= shape)
        area = extent.prod(1) / shape.prod(1)
        log_aspect = np.log(extent[:, 1] / extent[:, 0])
        # get_params draws from torch's global generator, which conftest seeds for every test.
        reference = np.array([RandomResizedCrop.get_params(torch.empty(1, h, w), list(view.crop_scale),
                                                           list(view.crop_ratio))[2:] for h, w in shape])
        ref_area = reference.prod(1) / shape.prod(1)
        ref_log_aspect = np.log(reference[:, 1] / reference[:, 0])
        quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
        # n = 2000: a quantile's standard error is about 0.01 (area) and 0.005 (log aspect).
        np.testing.assert_allclose(np.quantile(area, quantiles), np.quantile(ref_area, quantiles), atol=0.05)
        np.testing.assert_allclose(np.quantile(log_aspect, quantiles), np.quantile(ref_log_aspect, quantiles),
                                   atol=0.03)


# RGB -> YIQ as DALI's hsv kernel writes it (NTSC, 3 decimals); it maps back with this matrix's exact inverse,
# after rotating and scaling (I, Q) about the luma axis Y.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])


def _hsv_reference(x: np.ndarray, value: float, saturation: float, degrees: float) -> np.ndarray:
    """fp64 model of DALI's fn.hsv on uint8 HWC values: YIQ, rotate (I, Q) by `degrees`, scale, back, round."""
    theta = math.radians(degrees)
    rotate = np.array([[1, 0, 0], [0, math.cos(theta), math.sin(theta)], [0, -math.sin(theta), math.cos(theta)]])
    matrix = value * np.linalg.inv(_RGB_TO_YIQ) @ np.diag([1, saturation, saturation]) @ rotate @ _RGB_TO_YIQ
    return np.clip(np.rint(x @ matrix.T), 0, 255)


def _to_levels(view: torch.Tensor, spec: AugmentationSpec) -> np.ndarray:
    """fp32 normalized (3, S, S) -> the uint8 levels DALI normalized, as float64 HWC."""
    mean, std = np.array(spec.mean), np.array(spec.std)
    return np.rint((view.permute(1, 2, 0).cpu().double().numpy() * std + mean) * 255)


@pytest.mark.parametrize("device", DEVICES)
def test_view2_is_view1_transformed_by_its_own_draws(square_images, device):
    """Whole-image crops make both views start from the same pixels; view 1 has no other op, so view 2 must
    equal the reference ops applied to view 1 with the decisions and factors the pipeline reported."""
    whole = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    spec = AugmentationSpec(
        image_size=32,
        view1=ViewSpec(**whole, flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0),
        view2=ViewSpec(**whole, flip_prob=0.5, color_jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5,
                       solarize_prob=0.5))
    loader = DaliTwoViewLoader(square_images, spec, batch_size=12, device=device, seed=5, num_threads=2,
                               dtype=torch.float32, debug_outputs=True)
    kernel = spec.blur_kernel_size
    decisions, worst, total, count = [], 0.0, 0.0, 0
    for _ in range(4):
        for view1, view2, _, debug in loader:
            d = debug["view2"]
            assert np.all(d["crop_anchor"] == 0) and np.all(d["crop_extent"] == 40)
            for i in range(view1.shape[0]):
                x = _to_levels(view1[i], spec)
                if d["jitter"][i]:
                    c = float(d["contrast"][i])
                    x = np.clip(np.rint(c * x + (1 - c) * (x @ _RGB_TO_YIQ[0]).mean()), 0, 255)
                    x = _hsv_reference(x, float(d["brightness"][i]), float(d["saturation"][i]), float(d["hue"][i]))
                if d["gray"][i]:
                    x = _hsv_reference(x, 1.0, 0.0, 0.0)
                if d["blur"][i]:
                    sigma = float(d["sigma"][i])
                    blurred = TF.gaussian_blur(torch.from_numpy(x).permute(2, 0, 1), [kernel, kernel], [sigma, sigma])
                    x = np.rint(blurred.permute(1, 2, 0).numpy())
                if d["solarize"][i]:
                    x = np.where(x >= 0.5 * 255, 255 - x, x)
                if d["flip"][i]:
                    x = x[:, ::-1]
                diff = np.abs(_to_levels(view2[i], spec) - x)
                worst, total, count = max(worst, diff.max()), total + diff.sum(), count + diff.size
                decisions.append([d[k][i] for k in ("jitter", "gray", "blur", "solarize", "flip")])
    decisions = np.array(decisions, dtype=bool)
    assert decisions.any(axis=0).all() and (~decisions).any(axis=0).all()  # every branch taken both ways
    # Each op rounds to uint8 and the references round the same way (float32 vs fp64 can split a tie, and
    # a level carried into the next op can grow by one). A skipped or misapplied op would cost tens of levels.
    assert worst <= 2 and total / count <= 0.01, (worst, total / count)


def test_ops_match_torchvision_on_fixed_parameters():
    rng = np.random.default_rng(4)
    pictures = [_smooth_rgb(rng, 90, 120) for _ in range(3)] + [np.repeat(_smooth_rgb(rng, 90, 120)[..., :1], 3, 2)]
    anchor, extent, size, kernel = (10, 20), (60, 80), 40, 9

    @pipeline_def(batch_size=len(pictures), num_threads=1, device_id=None)
    def fixed_ops():
        x = fn.external_source(source=lambda: pictures, batch=True, layout="HWC", dtype=types.UINT8)
        window = dali_ops.resize_window(x, types.Constant(np.int32(anchor)), types.Constant(np.int32(extent)),
                                        size, "bicubic")
        return (dali_ops.color_transform(x, 1.3, 1.0, 0.0), dali_ops.color_transform(x, 0.7, 1.0, 0.0),
                dali_ops.adjust_contrast(x, 1.35), dali_ops.adjust_contrast(x, 0.6),
                dali_ops.color_transform(x, 1.0, 1.2, 0.0), dali_ops.color_transform(x, 1.0, 0.8, 0.0),
                dali_ops.grayscale(x), dali_ops.color_transform(x, 1.0, 1.0, 25.0),
                dali_ops.gaussian_blur(x, 1.3, kernel), dali_ops.gaussian_blur(x, 0.1, kernel),
                dali_ops.solarize(x, 0.5), window, dali_ops.flip_and_normalize(x, 1, SPEC, types.FLOAT))

    pipe = fixed_ops()
    pipe.build()
    outputs = pipe.run()

    def results(k: int) -> list[np.ndarray]:
        return [np.array(outputs[k].at(i)).astype(np.float64) for i in range(len(pictures))]

    def unit(p: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(p).permute(2, 0, 1).float() / 255

    def levels(t: torch.Tensor) -> np.ndarray:
        return (t.clamp(0, 1) * 255).permute(1, 2, 0).double().numpy()

    def max_diff(k: int, reference) -> float:
        return max(np.abs(out - levels(reference(unit(p)))).max() for out, p in zip(results(k), pictures))

    # DALI rounds to uint8 where torchvision stays in float: half a level, plus luma weights 0.299 vs 0.2989.
    assert max_diff(0, lambda t: TF.adjust_brightness(t, 1.3)) <= 0.51
    assert max_diff(1, lambda t: TF.adjust_brightness(t, 0.7)) <= 0.51
    assert max_diff(2, lambda t: TF.adjust_contrast(t, 1.35)) <= 0.55
    assert max_diff(3, lambda t: TF.adjust_contrast(t, 0.6)) <= 0.55
    assert max_diff(4, lambda t: TF.adjust_saturation(t, 1.2)) <= 0.75
    assert max_diff(5, lambda t: TF.adjust_saturation(t, 0.8)) <= 0.75
    assert max_diff(6, lambda t: TF.rgb_to_grayscale(t, 3)) <= 1.5
    assert max_diff(8, lambda t: TF.gaussian_blur(t, [kernel, kernel], [1.3, 1.3])) <= 0.51
    assert max_diff(9, lambda t: TF.gaussian_blur(t, [kernel, kernel], [0.1, 0.1])) <= 0.51
    # Hue: DALI's YIQ rotation (our fp64 model to a level), which leaves grays alone; it is NOT torchvision's
    # HSV hexcone shift: on these saturated pictures they differ by 10+ levels on average (see dali_ops).
    for out, p in zip(results(7), pictures):
        assert np.abs(out - _hsv_reference(p.astype(np.float64), 1.0, 1.0, 25.0)).max() <= 1
    assert np.abs(results(7)[3] - pictures[3]).max() <= 1
    hue_gap = np.mean([np.abs(o - levels(TF.adjust_hue(unit(p), 25 / 360))).mean()
                       for o, p in zip(results(7)[:3], pictures[:3])])
    assert 5 < hue_gap < 40
    for out, p in zip(results(10), pictures):
        np.testing.assert_array_equal(out, TF.solarize(torch.from_numpy(p).permute(2, 0, 1), 128).permute(1, 2, 0))
    for out, p in zip(results(12), pictures):
        reference = TF.normalize(TF.horizontal_flip(unit(p)), SPEC.mean, SPEC.std).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(out, reference, atol=1e-5)
    # Resized crop: DALI resamples the window inside the whole image, so pixels within the filter's reach of
    # the window's edge also see pixels outside it (torchvision crops first); compare the interior.
    margin = 3
    gaps = {}
    for mode in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
        gaps[mode] = np.concatenate([
            np.abs(out - TF.resized_crop(torch.from_numpy(p).permute(2, 0, 1), *anchor, *extent, [size, size], mode,
                                         antialias=True).permute(1, 2, 0).double().numpy())[margin:-margin,
                                                                                             margin:-margin].ravel()
            for out, p in zip(results(11), pictures)])
    cubic = gaps[InterpolationMode.BICUBIC]
    assert cubic.mean() <= 0.75 and np.quantile(cubic, 0.99) <= 3
    assert gaps[InterpolationMode.BILINEAR].mean() > 1.5 * cubic.mean()  # it really is the bicubic filter


@pytest.mark.cuda
def test_gpu_pipeline_draws_like_cpu_mode_and_matches_its_pixels(images):
    """Random draws are CPU operators in both modes, so the same seed gives the same decisions; pixels then
    differ only by nvJPEG vs libjpeg-turbo decoding and GPU vs CPU kernels' float rounding."""
    kwargs = dict(batch_size=10, seed=11, num_threads=2, dtype=torch.float32, debug_outputs=True)
    cpu = _epoch(DaliTwoViewLoader(images, SPEC, device="cpu", **kwargs))
    gpu = _epoch(DaliTwoViewLoader(images, SPEC, device="gpu", **kwargs))
    levels = torch.tensor(SPEC.std).view(1, 3, 1, 1) * 255
    for c, g in zip(cpu, gpu):
        assert g[0].is_cuda and torch.equal(c[2], g[2].cpu())
        for view in ("view1", "view2"):
            for name in DEBUG_FIELDS:
                np.testing.assert_array_equal(c[3][view][name], g[3][view][name], err_msg=f"{view}.{name}")
        for k in (0, 1):
            gap = ((c[k] - g[k].cpu()).abs() * levels).flatten()
            assert gap.mean() <= 1.0 and torch.quantile(gap, 0.99) <= 5, (gap.mean(), torch.quantile(gap, 0.99))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_undecodable_file_is_named(images, tmp_path, damage):
    good = images.files[:7]
    bad = tmp_path / "broken.jpg"
    data = open(good[0], "rb").read()
    bad.write_bytes(np.random.default_rng(0).bytes(3000) if damage == "garbage" else data[: len(data) // 2])
    loader = DaliTwoViewLoader((good + [str(bad)], list(range(8))), SPEC, batch_size=4, device="cpu",
                               shuffle=False, num_threads=1)
    with pytest.raises(DataError, match=r"broken\.jpg.*check-data"):
        _epoch(loader)
