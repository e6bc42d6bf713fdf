"""The torchvision CPU baseline: data contract, numerics, seeding, sharding, bad files, and measured op rates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.decode import CorruptImageError
from pipelines.sources import ImageList, read_file_list, shard_indices
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, AugmentationSpec, ViewSpec
from pipelines.torchvision_loader import build_torchvision_loader, build_view_transform

SPEC = AugmentationSpec(image_size=32)
SIZES = ((64, 48), (48, 64), (80, 40), (56, 56))  # (width, height): landscape, portrait, wide, square


def _write_tree(root: Path, count: int) -> ImageList:
    """`count` small random PNGs listed with label = index, so a label identifies its image."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
        lines.append(f"img{i:03d}.png {i}")
    (root / "list.txt").write_text("\n".join(lines))
    return read_file_list(root / "list.txt")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Load in the main process as a DataLoader worker does, with one intra-op thread (tiny images, shared CPUs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageList:
    return _write_tree(tmp_path_factory.mktemp("tv"), 48)


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader.batches(epoch))


def test_contract_shape_dtype_layout_and_range(images: ImageList) -> None:
    loader = build_torchvision_loader(images, SPEC, batch_size=10, workers=0)
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 4  # 48 images, batch 10: the last partial batch is dropped
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for view1, view2, labels in batches:
        for view in (view1, view2):
            assert view.shape == (10, 3, 32, 32) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last) and not view.is_contiguous()
            per_channel = view.permute(1, 0, 2, 3).reshape(3, -1)
            assert (per_channel.amin(1) >= low - 1e-5).all() and (per_channel.amax(1) <= high + 1e-5).all()
        assert labels.dtype == torch.int64 and labels.shape == (10,)
    # Labels are image indices here: the epoch reads exactly shard_indices' order.
    seen = torch.cat([labels for _, _, labels in batches]).numpy()
    np.testing.assert_array_equal(seen, shard_indices(48, 0, 1, 0, 0, batch_size=10))
    bf16 = build_torchvision_loader(images, SPEC, batch_size=10, workers=0, dtype=torch.bfloat16)
    view1, _, _ = next(iter(bf16))
    assert view1.dtype == torch.bfloat16 and view1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(view1.float(), batches[0][0], atol=0.02, rtol=0.01)


def test_numerics_against_fp64_reference(images: ImageList) -> None:
    # With the crop fixed to the whole square image and every colour op off, a view is exactly
    # normalize(resize_bicubic(image)); with solarize p=1 it is solarized on the [0, 1] scale first.
    fixed = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, color_jitter_prob=0.0,
                     grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    spec = AugmentationSpec(image_size=32, view1=fixed, view2=ViewSpec(**{**fixed.__dict__, "solarize_prob": 1.0}))
    square = images.files[3]  # 56x56
    pil = Image.open(square).convert("RGB")
    unit = np.asarray(pil.resize((32, 32), Image.BICUBIC), dtype=np.float64) / 255
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    expected1 = ((unit - mean) / std).transpose(2, 0, 1)
    expected2 = ((np.where(unit >= 0.5, 1 - unit, unit) - mean) / std).transpose(2, 0, 1)
    one = ImageList(files=[square], labels=[0], classes=["a"])
    view1, view2, _ = next(iter(build_torchvision_loader(one, spec, batch_size=1, workers=0)))
    np.testing.assert_allclose(view1[0].double().numpy(), expected1, atol=1e-5)
    np.testing.assert_allclose(view2[0].double().numpy(), expected2, atol=1e-5)


def test_deterministic_any_worker_count_and_rng_untouched(images: ImageList) -> None:
    serial = build_torchvision_loader(images, SPEC, batch_size=8, workers=0, seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = _epoch(serial, 1)
    assert torch.equal(torch.rand(4), expected_next)  # the caller's global RNG is left as it was
    parallel = build_torchvision_loader(images, SPEC, batch_size=8, workers=2, seed=3)
    for a, b in zip(first, _epoch(parallel, 1), strict=True):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    other_epoch = _epoch(serial, 2)
    assert not torch.equal(first[0][2], other_epoch[0][2])  # reshuffled
    other_seed = _epoch(build_torchvision_loader(images, SPEC, batch_size=8, workers=0, seed=4), 1)
    assert not torch.equal(first[0][0], other_seed[0][0])
    assert not torch.equal(first[0][0], first[0][1])  # the two views differ


def test_ranks_partition_the_epoch_and_views_follow_the_image(images: ImageList) -> None:
    single = {int(label): (v1, v2) for b1, b2, labels in _epoch(
        build_torchvision_loader(images, SPEC, batch_size=4, workers=0), 5) for label, v1, v2 in zip(labels, b1, b2)}
    seen: list[int] = []
    for rank in range(3):
        loader = build_torchvision_loader(images, SPEC, batch_size=4, rank=rank, world_size=3, workers=0)
        assert len(loader) == 4  # 48 / 3 = 16 per rank = 4 batches of 4
        for b1, _, labels in _epoch(loader, 5):
            seen += labels.tolist()
            for label, view in zip(labels.tolist(), b1):
                assert torch.equal(view, single[label][0])  # same image, same epoch -> same view on any rank
    assert sorted(seen) == list(range(48))


def test_bad_file_raises_naming_it(tmp_path: Path, images: ImageList) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(Path(images.files[0]).read_bytes()[:200])
    mixed = ImageList(files=images.files[:7] + [str(bad)], labels=list(range(8)), classes=images.classes)
    for workers in (0, 1):
        loader = build_torchvision_loader(mixed, SPEC, batch_size=4, workers=workers, shuffle=False)
        with pytest.raises(CorruptImageError) as info:
            _epoch(loader, 0)
        assert str(bad) in str(info.value) and "Traceback" not in str(info.value)


def test_argument_validation(images: ImageList) -> None:
    with pytest.raises(ValueError, match="rank=3 must lie in"):
        build_torchvision_loader(images, SPEC, batch_size=4, rank=3, world_size=3)
    with pytest.raises(ValueError, match="too few for world_size=2 x batch_size=32"):
        build_torchvision_loader(images, SPEC, batch_size=32, world_size=2)
    with pytest.raises(ValueError, match="floating"):
        build_torchvision_loader(images, SPEC, batch_size=4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="AugmentationSpec"):
        build_torchvision_loader(images, {"image_size": 32}, batch_size=4)  # type: ignore[arg-type]
    loader = build_torchvision_loader(images, SPEC, batch_size=4, workers=0)
    with pytest.raises(ValueError, match=r"out buffers must be \(4, 3, 32, 32\)"):
        next(loader.batches(0, out=(torch.empty(4, 3, 16, 16), torch.empty(4, 3, 16, 16))))
    buffers = tuple(torch.empty(4, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2))
    view1, view2, _ = next(loader.batches(0, out=buffers))
    assert view1 is buffers[0] and view2 is buffers[1]
    torch.testing.assert_close(view1, next(loader.batches(0))[0])
    assert len(build_view_transform(SPEC, SPEC.view1).transforms) == 8  # view 1 has no solarize op (p = 0)
