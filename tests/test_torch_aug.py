"""pipelines.torch_aug against its two references, op by op and view by view: torchvision.transforms.v2
for the "torchvision" recipe and pipelines/reference.py (DeepMind's official definitions) for "official";
plus sampling statistics, the data contract, determinism, no host syncs, and (on CUDA) graph capture."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2.functional as TF

from pipelines import fidelity, reference, torch_aug
from pipelines.spec import AugmentationSpec, ViewSpec
from pipelines.torch_aug import (
    TorchTwoViewAugment,
    ViewParams,
    apply_view,
    apply_view_params,
    normalize,
    resized_crop,
    sample_crop_boxes,
    sample_view_params,
)

MODES = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}
# Every branch taken about half the time, so 64 samples exercise both sides of each.
HALF_VIEW = ViewSpec(flip_prob=0.5, color_jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5, solarize_prob=0.5)


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _reference_colour(image: torch.Tensor, p: ViewParams, i: int, kernel_size: int, threshold: float) -> torch.Tensor:
    """Sample i of a view made by torchvision's functional ops, one by one, with the drawn parameters."""
    x = image
    if p.flipped[i]:
        x = TF.horizontal_flip(x)
    if p.jittered[i]:
        b, c, s, h = p.jitter_factors[i].tolist()
        ops = [lambda y: TF.adjust_brightness(y, b), lambda y: TF.adjust_contrast(y, c),
               lambda y: TF.adjust_saturation(y, s), lambda y: TF.adjust_hue(y, h)]
        for op in p.jitter_order[i].tolist():
            x = ops[op](x)
    if p.grayscaled[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blurred[i]:
        sigma = float(p.sigmas[i])
        x = TF.gaussian_blur(x, [kernel_size, kernel_size], [sigma, sigma])
    if p.solarized[i]:
        x = TF.solarize(x, threshold)
    return x


# ---------------------------------------------------------------- single ops against torchvision


def test_jitter_ops_match_torchvision():
    """Each jitter op alone (order irrelevant when the other three are identity factors) equals torchvision's."""
    n = 16
    images = torch.rand(n, 3, 20, 20, generator=_gen(1))
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    for op, fn, lo, hi in [(0, TF.adjust_brightness, 0.6, 1.4), (1, TF.adjust_contrast, 0.6, 1.4),
                           (2, TF.adjust_saturation, 0.8, 1.2), (3, TF.adjust_hue, -0.5, 0.5)]:
        factors = identity.repeat(n, 1)
        factors[:, op] = lo + (hi - lo) * torch.rand(n, generator=_gen(op))
        no = torch.zeros(n, dtype=torch.bool)
        p = ViewParams(flipped=no, jittered=~no, jitter_factors=factors,
                       jitter_order=torch.rand(n, 4, generator=_gen(9)).argsort(1), grayscaled=no, blurred=no,
                       sigmas=torch.ones(n), solarized=no)
        got = apply_view_params(images, p, 3, 0.5, recipe="torchvision")
        want = torch.stack([fn(images[i], float(factors[i, op])) for i in range(n)])
        tol = 2e-6 if op == 3 else 1e-6  # hue: HSV closed form vs torchvision's table, float32 rounding
        torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=f"jitter op {op}")


def test_grayscale_blur_solarize_flip_match_torchvision():
    n, k = 12, 7
    images = torch.rand(n, 3, 16, 20, generator=_gen(2))
    yes, no = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    sigmas = 0.1 + 1.9 * torch.rand(n, generator=_gen(3))
    base = dict(flipped=no, jittered=no, jitter_factors=torch.ones(n, 4), jitter_order=torch.arange(4).repeat(n, 1),
                grayscaled=no, blurred=no, sigmas=sigmas, solarized=no)
    cases = {"flipped": lambda x, i: TF.horizontal_flip(x),
             "grayscaled": lambda x, i: TF.rgb_to_grayscale(x, num_output_channels=3),
             "blurred": lambda x, i: TF.gaussian_blur(x, [k, k], [float(sigmas[i])] * 2),
             "solarized": lambda x, i: TF.solarize(x, 0.5)}
    for name, fn in cases.items():
        got = apply_view_params(images, ViewParams(**{**base, name: yes}), k, 0.5, recipe="torchvision")
        want = torch.stack([fn(images[i], i) for i in range(n)])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
    # With every flag off the colour stage is an exact identity.
    assert torch.equal(apply_view_params(images, ViewParams(**base), k, 0.5, recipe="torchvision"), images)


@pytest.mark.parametrize("recipe", ["official", "torchvision"])
def test_every_op_matches_the_float64_reference(recipe):
    """Each op of the recipe, in float32 as trained, on the reference's draws: within 1e-3 of an 8-bit level.

    The crop's draw is held to the reference's distribution (KS statistic of area and log aspect over 4000
    boxes; the critical value at alpha = 1e-4 is 0.050).
    """
    errors = fidelity.measure("torch", recipe)
    assert set(errors) == set(fidelity.OPS)
    for op, error in errors.items():
        assert error.max < (0.05 if op == "crop" else 1e-3), (op, error)


def _official_colour(image: torch.Tensor, p: ViewParams, i: int, kernel_size: int, threshold: float) -> torch.Tensor:
    """Sample i of an official view made by pipelines.reference (float64), with the drawn parameters."""
    x = image.double().numpy()
    if p.flipped[i]:
        x = x[..., ::-1]
    if p.jittered[i]:
        x = reference.color_jitter(x, p.jitter_factors[i].double().numpy(), p.jitter_order[i].numpy(), "official")
    if p.grayscaled[i]:
        x = reference.grayscale(x)
    if p.blurred[i]:
        x = reference.gaussian_blur(x, float(p.sigmas[i]), kernel_size, "official")
    if p.solarized[i]:
        x = reference.solarize(x, threshold)
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def test_normalize_matches_torchvision_and_writes_out():
    images = torch.rand(4, 3, 8, 8, generator=_gen(4))
    spec = AugmentationSpec()
    got = normalize(images, spec.mean, spec.std, torch.float32)
    torch.testing.assert_close(got, TF.normalize(images, list(spec.mean), list(spec.std)), atol=1e-6, rtol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)
    buf = torch.empty(4, 3, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    returned = normalize(images, spec.mean, spec.std, torch.bfloat16, out=buf)
    assert returned.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf.float(), got, atol=2e-2, rtol=1e-2)  # bf16 has 8 mantissa bits


# ---------------------------------------------------------------- resized crop


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resized_crop_antialiased_matches_torchvision(mode):
    """The torchvision recipe's resample is torchvision's resized_crop(antialias=True), flips included."""
    size = 24
    images = torch.rand(6, 3, 48, 40, generator=_gen(5))
    boxes = torch.tensor([[0, 0, 48, 40], [3, 5, 20, 17], [10, 12, 30, 28], [0, 20, 48, 20],
                          [40, 30, 8, 10], [2, 1, 45, 37]], dtype=torch.float32)
    flip = torch.tensor([False, True, False, True, False, True])
    got = resized_crop(images, boxes, size, mode, antialias=True, flip=flip)
    for i, (top, left, h, w) in enumerate(boxes.int().tolist()):
        want = TF.resized_crop(images[i], top, left, h, w, [size, size], interpolation=MODES[mode], antialias=True)
        want = TF.horizontal_flip(want) if flip[i] else want
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
def test_resized_crop_is_the_reference_resize(mode, antialias):
    """Shrinking and enlarging boxes, at the image's edges too: reference.resize of the crop (TF's resize for
    the official recipe: Keys cubic, no antialias, taps outside the box dropped)."""
    images = torch.rand(5, 3, 40, 36, generator=_gen(6), dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 40, 36], [3, 5, 9, 7], [10, 12, 30, 20], [31, 0, 9, 36], [0, 30, 40, 6]])
    got = resized_crop(images, boxes, 16, mode, antialias)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[i, :, top:top + h, left:left + w].numpy()
        want = torch.from_numpy(reference.resize(crop, 16, mode, antialias))
        torch.testing.assert_close(got[i].clamp(0, 1), want, atol=1e-6, rtol=0)  # float32 weights


# ---------------------------------------------------------------- sampling statistics


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_crop_boxes_match_torchvision_distribution():
    n, height, width = 4000, 40, 60
    view = ViewSpec()
    ours = sample_crop_boxes(torch.full((n,), height), torch.full((n,), width), view, _gen(7),
                             "torchvision").double().numpy()
    image = torch.zeros(3, height, width)
    theirs = np.array([T1.RandomResizedCrop.get_params(image, list(view.crop_scale), list(view.crop_ratio))
                       for _ in range(n)], dtype=np.float64)
    assert np.all(ours == np.round(ours)) and np.all(ours[:, 2:] >= 1)
    assert np.all(ours[:, 0] + ours[:, 2] <= height) and np.all(ours[:, 1] + ours[:, 3] <= width)
    assert np.all(ours[:, :2] >= 0)
    # KS critical value at alpha = 1e-4 for two samples of 4000: 2.22 * sqrt(2 / 4000) = 0.050.
    stats = {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "log_aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
        "center_y": lambda b: (b[:, 0] + b[:, 2] / 2) / height,
        "center_x": lambda b: (b[:, 1] + b[:, 3] / 2) / width,
    }
    for name, stat in stats.items():
        assert _ks(stat(ours), stat(theirs)) < 0.05, name


def test_official_crop_boxes_are_the_reference_draws():
    """The same four uniforms give reference.official_crop_box's box, on a strip too (sides clamped)."""
    view = ViewSpec()
    for height, width in [(40, 60), (10, 200), (300, 7)]:
        generator = _gen(24)
        boxes = sample_crop_boxes(torch.full((500,), height), torch.full((500,), width), view, generator)
        uniforms = torch.rand((500, 4), generator=_gen(24)).double().numpy()  # the same stream
        want = [reference.official_crop_box(height, width, u, view) for u in uniforms]
        assert boxes.int().tolist() == [list(box) for box in want], (height, width)


def test_crop_boxes_fallback_is_torchvision_central_crop():
    # No (area, aspect) draw fits a 10 x 200 strip, so every sample takes the fallback.
    view = ViewSpec()
    boxes = sample_crop_boxes(torch.tensor([10, 200]), torch.tensor([200, 10]), view, _gen(8), "torchvision")
    for (h, w), box in zip([(10, 200), (200, 10)], boxes.tolist()):
        want = T1.RandomResizedCrop.get_params(torch.zeros(1, h, w), list(view.crop_scale), list(view.crop_ratio))
        assert box == list(map(float, want))


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize("recipe", ["official", "torchvision"])
def test_rates_factors_and_orders_follow_the_spec(recipe):
    n = 4000
    spec = AugmentationSpec(recipe=recipe)
    for index, view in enumerate(spec.views):
        p = sample_view_params(n, view, "cpu", _gen(10 + index), recipe)
        for name, prob in [("flipped", view.flip_prob), ("jittered", view.color_jitter_prob),
                           ("grayscaled", view.grayscale_prob), ("blurred", view.blur_prob),
                           ("solarized", view.solarize_prob)]:
            count = int(getattr(p, name).sum())
            assert _within(count, n, prob), (index, name, count)
        # Official brightness is a delta U[-b, b]; torchvision's a factor U[1 - b, 1 + b].
        brightness = (-view.brightness, view.brightness) if recipe == "official" else (1 - view.brightness,
                                                                                       1 + view.brightness)
        bounds = [brightness, (1 - view.contrast, 1 + view.contrast),
                  (1 - view.saturation, 1 + view.saturation), (-view.hue, view.hue)]
        for k, (lo, hi) in enumerate(bounds):
            f = p.jitter_factors[:, k]
            assert lo <= f.min() and f.max() <= hi
            # Uniform mean: standard error (hi - lo) / sqrt(12 n); allow 5 of them.
            assert abs(f.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * n)
        assert abs(p.sigmas.mean() - sum(view.blur_sigma) / 2) < 5 * (view.blur_sigma[1] - view.blur_sigma[0]) / math.sqrt(12 * n)
        orders, counts = torch.unique(p.jitter_order, dim=0, return_counts=True)
        assert len(orders) == 24 and torch.equal(orders.sort(1).values, torch.arange(4).repeat(24, 1))
        assert all(_within(int(c), n, 1 / 24) for c in counts)


# ---------------------------------------------------------------- whole views


@pytest.mark.parametrize("recipe", ["official", "torchvision"])
def test_apply_view_matches_the_reference_chain_per_sample(recipe):
    """Random orders, flags and values per sample: torchvision's functional chain, or the float64 reference."""
    n, k = 64, 5
    images = torch.rand(n, 3, 16, 16, generator=_gen(11))
    out, p = apply_view(images, HALF_VIEW, k, _gen(12), recipe=recipe, return_params=True)
    for flag in (p.flipped, p.jittered, p.grayscaled, p.blurred, p.solarized):
        assert 0 < int(flag.sum()) < n  # both branches of every op are exercised
    chain = _official_colour if recipe == "official" else _reference_colour
    want = torch.stack([chain(images[i], p, i, k, HALF_VIEW.solarize_threshold) for i in range(n)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", ["official", "torchvision"])
def test_cpu_stages_on_drawn_samples_equal_the_device_path(recipe, monkeypatch):
    """On the CPU each stage runs on the samples that drew it only; the result is the device path's (every
    stage on the whole batch, masked) on the same draws, and a stage no sample drew does not run."""
    n, k = 64, 5
    images = torch.rand(n, 3, 16, 16, generator=_gen(31))
    p = sample_view_params(n, HALF_VIEW, "cpu", _gen(32), recipe)
    subsets = apply_view_params(images, p, k, 0.5, recipe=recipe)
    with monkeypatch.context() as patch:
        patch.setattr(torch_aug, "SUBSET_DEVICES", frozenset())
        whole = apply_view_params(images, p, k, 0.5, recipe=recipe)
    torch.testing.assert_close(subsets, whole, atol=1e-6, rtol=0)
    blurs = []
    monkeypatch.setattr(torch_aug, "_gaussian_blur", lambda x, *args: blurs.append(len(x)) or x)
    apply_view_params(images, p, k, 0.5, recipe=recipe)
    apply_view_params(images, dataclasses.replace(p, blurred=torch.zeros(n, dtype=torch.bool)), k, 0.5, recipe=recipe)
    assert blurs == [int(p.blurred.sum())]


def test_jitter_order_matters_per_sample():
    """Brightness then contrast is not contrast then brightness (a clip between them): the order is honoured."""
    n = 2
    images = torch.rand(1, 3, 12, 12, generator=_gen(25)).expand(n, -1, -1, -1).contiguous()
    no = torch.zeros(n, dtype=torch.bool)
    factors = torch.tensor([[0.4, 1.4, 1.0, 0.0]]).repeat(n, 1)
    orders = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])
    p = ViewParams(flipped=no, jittered=~no, jitter_factors=factors, jitter_order=orders, grayscaled=no,
                   blurred=no, sigmas=torch.ones(n), solarized=no)
    out = apply_view_params(images, p, 3, 0.5)
    assert (out[0] - out[1]).abs().max() > 0.05
    for i in range(n):
        want = reference.color_jitter(images[i].double().numpy(), factors[i].double().numpy(), orders[i].numpy(),
                                      "official")
        torch.testing.assert_close(out[i].double(), torch.from_numpy(want), atol=1e-6, rtol=0)


def test_two_views_match_torchvision_crop_colour_normalize():
    spec = AugmentationSpec(image_size=16, interpolation="bilinear", view1=HALF_VIEW, view2=HALF_VIEW,
                            recipe="torchvision")
    aug = TorchTwoViewAugment(spec, dtype=torch.float32)
    batch = torch.randint(0, 256, (32, 3, 30, 24), dtype=torch.uint8, generator=_gen(13))
    views, params = aug(batch, _gen(14), return_params=True)
    unit = TF.to_dtype(batch, torch.float32, scale=True)
    for view_out, p in zip(views, params):
        for i in range(len(batch)):
            top, left, h, w = p.boxes[i].int().tolist()
            crop = TF.resized_crop(unit[i], top, left, h, w, [16, 16], interpolation=MODES["bilinear"], antialias=True)
            want = _reference_colour(crop.clamp(0, 1), p, i, spec.blur_kernel_size, 0.5)
            want = TF.normalize(want, list(spec.mean), list(spec.std))
            torch.testing.assert_close(view_out[i], want, atol=1e-4, rtol=0)


def test_contract_determinism_and_no_host_sync(forbid_host_sync, monkeypatch):
    """The device path (every stage on the whole batch, as on a GPU) run here: no host sync anywhere."""
    monkeypatch.setattr(torch_aug, "SUBSET_DEVICES", frozenset())
    spec = AugmentationSpec(image_size=32)
    aug = TorchTwoViewAugment(spec, dtype=torch.bfloat16)
    batch = torch.randint(0, 256, (8, 3, 40, 48), dtype=torch.uint8, generator=_gen(15))
    with forbid_host_sync():
        view1, view2 = aug(batch, _gen(16))
        again = aug(batch, _gen(16))
        other = aug(batch, _gen(17))
        coloured = aug.colour(batch[:, :, :32, :32], 1, _gen(18))
    lowest = min((0 - m) / s for m, s in zip(spec.mean, spec.std))
    highest = max((1 - m) / s for m, s in zip(spec.mean, spec.std))
    for v in (view1, view2, coloured):
        assert v.shape == (8, 3, 32, 32) and v.dtype == torch.bfloat16
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert lowest - 0.02 <= v.float().min() and v.float().max() <= highest + 0.02
    assert torch.equal(view1, again[0]) and torch.equal(view2, again[1])
    assert not torch.equal(view1, other[0])
    assert not torch.equal(view1, view2)  # the two views draw independent parameters


def test_colour_writes_caller_buffers_and_rejects_bad_input():
    spec = AugmentationSpec(image_size=16)
    aug = TorchTwoViewAugment(spec, dtype=torch.float32)
    crops = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=_gen(19))
    buf = torch.empty(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    made = aug.colour(crops, 0, _gen(20), out=buf)
    assert made.data_ptr() == buf.data_ptr() and torch.equal(made, aug.colour(crops, 0, _gen(20)))
    with pytest.raises(ValueError, match="16x16"):
        aug.colour(crops[:, :, :8, :8], 0)
    with pytest.raises(ValueError, match="view_index"):
        aug.colour(crops, 2)
    with pytest.raises(TypeError, match="uint8"):
        aug(crops.to(torch.int32))
    with pytest.raises(ValueError, match="kernel_size"):
        apply_view(torch.rand(2, 3, 4, 4), ViewSpec(), 9)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_colour_matches_cpu_for_same_params():
    n, k = 64, 5
    images = torch.rand(n, 3, 24, 24, generator=_gen(21))
    p = sample_view_params(n, HALF_VIEW, "cpu", _gen(22))
    cpu = apply_view_params(images, p, k, 0.5)
    p_cuda = ViewParams(**{f: getattr(p, f).cuda() for f in ("flipped", "jittered", "jitter_factors",
                                                              "jitter_order", "grayscaled", "blurred", "sigmas",
                                                              "solarized")})
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare the math, not TF32's 10-bit products in the blur conv
    try:
        cuda = apply_view_params(images.cuda(), p_cuda, k, 0.5).cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=0)
    boxes = sample_crop_boxes(torch.full((n,), 24), torch.full((n,), 24), ViewSpec(), _gen(23))
    for mode in MODES:
        torch.testing.assert_close(resized_crop(images.cuda(), boxes.cuda(), 16, mode, flip=p_cuda.flipped).cpu(),
                                   resized_crop(images, boxes, 16, mode, flip=p.flipped), atol=1e-4, rtol=0)


@contextlib.contextmanager
def _sync_is_error():
    """torch.cuda.set_sync_debug_mode("error") for the block: any implicit host sync raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _capture(fn, private: torch.Generator | None):
    """Warm fn up on a side stream with syncs as errors, then capture it in a CUDA graph.

    The capture itself needs no sync guard: a sync inside a capturing stream is a CUDA error.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _sync_is_error():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if private is not None:
        graph.register_generator_state(private)
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.cuda
@pytest.mark.parametrize("use_private_generator", [False, True])
def test_cuda_graph_capture_gives_fresh_draws_each_replay(use_private_generator):
    n, size = 4096, 32
    spec = AugmentationSpec(image_size=size)
    aug = TorchTwoViewAugment(spec, device="cuda", dtype=torch.bfloat16)
    batch = torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, device="cuda")
    private = torch.Generator(device="cuda").manual_seed(0) if use_private_generator else None
    graph, (views, params) = _capture(lambda: aug(batch, private, return_params=True), private)
    seen = []
    for _ in range(3):
        with _sync_is_error():
            graph.replay()
        seen.append((views[0].clone(), views[1].clone()))
        for view, p in zip(spec.views, params):
            for name, prob in [("flipped", view.flip_prob), ("jittered", view.color_jitter_prob),
                               ("grayscaled", view.grayscale_prob), ("blurred", view.blur_prob),
                               ("solarized", view.solarize_prob)]:
                count = int(getattr(p, name).sum())
                assert _within(count, n, prob), (name, count)
    assert not torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[1][1], seen[2][1])
    assert views[0].is_contiguous(memory_format=torch.channels_last) and views[0].dtype == torch.bfloat16


@pytest.mark.cuda
def test_cuda_colour_stage_captured_under_sync_error_mode():
    spec = AugmentationSpec(image_size=64)
    aug = TorchTwoViewAugment(spec, device="cuda", dtype=torch.bfloat16)
    crops = torch.randint(0, 256, (256, 3, 64, 64), dtype=torch.uint8, device="cuda")
    static_out = torch.empty(256, 3, 64, 64, dtype=torch.bfloat16, device="cuda").contiguous(
        memory_format=torch.channels_last)
    graph, _ = _capture(lambda: aug.colour(crops, 1, out=static_out), None)
    with _sync_is_error():
        graph.replay()
        first = static_out.clone()
        graph.replay()
    assert not torch.equal(first, static_out)
    assert torch.isfinite(static_out.float()).all()
