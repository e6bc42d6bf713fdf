"""pipelines.torch_pipeline on a tiny tree of real files (odd ones included): decode, crops, contract,
sharding, determinism, buffers, errors; nvjpeg on CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipelines import reference
from pipelines.decode import CorruptImageError, load_rgb
from pipelines.sources import DataError, ImageList, read_file_list
from pipelines.spec import AugmentationSpec, ViewSpec
from pipelines.torch_aug import epoch_seeds, sample_crop_boxes
from pipelines.torch_pipeline import (
    TorchImagePipeline,
    decode_to_device,
    jpeg_components,
    read_bytes,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
NUM_FILES = 12
# Flip, colour and blur off: a view is then exactly the normalized resized crop.
PLAIN_VIEW = ViewSpec(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def _picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradients plus a little noise: JPEG keeps it close, crops differ visibly."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([x, y, 1 - x * y], axis=-1) * rng.uniform(120, 255, 3)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[ImageList, dict[str, Path]]:
    """12 images of varied sizes: RGB JPEGs, a PNG inside .JPEG, a grayscale and a CMYK JPEG; label = index."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    odd: dict[str, Path] = {}
    lines = []
    for i in range(NUM_FILES):
        height, width = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        image = Image.fromarray(_picture(rng, height, width))
        path = root / f"img_{i:02d}.JPEG"
        if i == 3:
            image.save(path, format="PNG")
            odd["png"] = path
        elif i == 5:
            image.convert("L").save(path, format="JPEG", quality=95)
            odd["gray"] = path
        elif i == 7:
            image.convert("CMYK").save(path, format="JPEG", quality=95)
            odd["cmyk"] = path
        else:
            image.save(path, format="JPEG", quality=95)
            odd.setdefault("rgb", path)
        lines.append(f"{path.name} {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return read_file_list(root / "list.txt"), odd


def _spec(view: ViewSpec | None = None, interpolation: str = "bicubic", recipe: str = "official") -> AugmentationSpec:
    if view is None:
        return AugmentationSpec(image_size=SIZE, interpolation=interpolation, recipe=recipe)
    return AugmentationSpec(image_size=SIZE, view1=view, view2=view, interpolation=interpolation, recipe=recipe)


def _collect(pipeline: TorchImagePipeline, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(a.clone(), b.clone(), c.clone()) for a, b, c in pipeline.batches(epoch)]


def test_jpeg_components_and_cpu_decode_match_pil(tree, tmp_path):
    images, odd = tree
    deep = tmp_path / "deep.png"  # 16-bit: PIL reads non-JPEGs, scaling to 8 bits
    Image.fromarray((np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)).save(deep)
    animated = tmp_path / "animated.jpg"  # a GIF under a JPEG name: the content decides (PIL, first frame)
    frames = [Image.fromarray(np.full((20, 30, 3), value, np.uint8)) for value in (40, 200)]
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    images = ImageList(images.files + [str(deep), str(animated)], images.labels + [NUM_FILES, NUM_FILES + 1],
                       images.classes)
    assert jpeg_components(odd["rgb"].read_bytes()) == 3
    assert jpeg_components(odd["gray"].read_bytes()) == 1
    assert jpeg_components(odd["cmyk"].read_bytes()) == 4
    assert jpeg_components(odd["png"].read_bytes()) is None
    datas = [read_bytes(f) for f in images.files]
    decoded = decode_to_device(datas, images.files, torch.device("cpu"))
    for path, image in zip(images.files, decoded):
        want = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert image.dtype == torch.uint8 and image.shape == want.shape, path
        # libjpeg-turbo in both; CMYK -> RGB may round differently by a level or two.
        assert (image.int() - want.int()).abs().max() <= 2, path


def test_contract_labels_and_length(tree):
    images, _ = tree
    pipeline = TorchImagePipeline(images, _spec(), batch_size=4, dtype=torch.bfloat16, num_threads=2)
    batches = _collect(pipeline)
    assert len(batches) == len(pipeline) == 3
    for view1, view2, labels in batches:
        for view in (view1, view2):
            assert view.shape == (4, 3, SIZE, SIZE) and view.dtype == torch.bfloat16
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(view.float()).all() and view.float().abs().max() < 3.0
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert not torch.equal(view1, view2)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(NUM_FILES))
    pipeline.close()


@pytest.mark.parametrize("interpolation,recipe", [("bicubic", "official"), ("bilinear", "official"),
                                                   ("bicubic", "torchvision"), ("bilinear", "torchvision")])
def test_views_are_the_recipes_resized_crops(tree, interpolation, recipe):
    """With colour off, each view is the recipe's crop of the decoded image at the box the pipeline drew:
    reference.resize (TF's, no antialias) for official, torchvision's antialiased resized_crop otherwise."""
    images, _ = tree
    spec = _spec(PLAIN_VIEW, interpolation, recipe)
    pipeline = TorchImagePipeline(images, spec, batch_size=6, seed=3, num_threads=2)
    crop_seed, colour_seed = epoch_seeds(3, 0, 0)
    generator = torch.Generator().manual_seed(crop_seed)  # the pipeline's own box stream
    # On the CPU both streams are one engine: equal seeds would make the colour draws replay the crop draws.
    colour = torch.rand(64, generator=torch.Generator().manual_seed(colour_seed))
    assert not torch.isclose(colour, torch.rand(64, generator=torch.Generator().manual_seed(crop_seed))).any()
    mode = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    for view1, view2, labels in pipeline.batches(0):
        decoded = [torch.from_numpy(np.array(load_rgb(images.files[i]))).permute(2, 0, 1) for i in labels.tolist()]
        heights = torch.tensor([d.shape[1] for d in decoded])
        widths = torch.tensor([d.shape[2] for d in decoded])
        for view, view_spec in zip((view1, view2), spec.views):
            boxes = sample_crop_boxes(heights, widths, view_spec, generator, recipe).int().tolist()
            for i, (top, left, h, w) in enumerate(boxes):
                unit = TF.to_dtype(decoded[i], torch.float32, scale=True)
                if recipe == "official":
                    window = unit[:, top:top + h, left:left + w].double().numpy()
                    crop = torch.from_numpy(reference.resize(window, SIZE, interpolation, antialias=False)).float()
                else:
                    crop = TF.resized_crop(unit, top, left, h, w, [SIZE, SIZE], interpolation=mode,
                                           antialias=True).clamp(0, 1)
                want = TF.normalize(crop, list(spec.mean), list(spec.std))
                torch.testing.assert_close(view[i], want, atol=4e-2, rtol=0)  # CMYK may differ by 2 levels
                assert (view[i] - want).abs().mean() < 1e-3
    pipeline.close()


def test_sharding_covers_every_image_once_and_reshuffles(tree):
    images, _ = tree
    seen = []
    for rank in range(3):
        pipeline = TorchImagePipeline(images, _spec(), batch_size=2, rank=rank, world_size=3, seed=1, num_threads=1)
        assert len(pipeline) == 2
        seen += [int(x) for _, _, labels in pipeline.batches(0) for x in labels]
        pipeline.close()
    assert sorted(seen) == list(range(NUM_FILES))
    # drop_last=False (evaluation): 12 over 5 ranks is 3, 3, 2, 2, 2 and the last batch may be partial.
    seen, sizes = [], []
    for rank in range(5):
        pipeline = TorchImagePipeline(images, _spec(), batch_size=2, rank=rank, world_size=5, drop_last=False)
        batches = [labels for _, _, labels in pipeline.batches(0)]
        assert len(pipeline) == len(batches) == (2 if rank < 2 else 1)  # this rank's own count
        seen += torch.cat(batches).tolist()
        sizes += [len(labels) for labels in batches]
        pipeline.close()
    assert sorted(seen) == list(range(NUM_FILES)) and sizes.count(1) == 2
    pipeline = TorchImagePipeline(images, _spec(), batch_size=4, seed=1)
    order = {epoch: torch.cat([b[2] for b in _collect(pipeline, epoch)]).tolist() for epoch in (0, 1)}
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])
    pipeline.close()


def test_determinism_out_buffers_and_set_epoch(tree):
    images, _ = tree
    first = TorchImagePipeline(images, _spec(), batch_size=4, seed=5)
    second = TorchImagePipeline(images, _spec(), batch_size=4, seed=5, num_threads=1)
    a, b = _collect(first), _collect(second)
    assert all(torch.equal(x, y) for batch_a, batch_b in zip(a, b) for x, y in zip(batch_a, batch_b))
    second.set_epoch(1)
    assert not torch.equal(next(iter(second))[0], a[0][0])
    buffers = tuple(torch.empty(4, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last) for _ in range(2))
    for step, (view1, view2, _) in enumerate(first.batches(0, out=buffers)):
        assert view1.data_ptr() == buffers[0].data_ptr() and view2.data_ptr() == buffers[1].data_ptr()
        assert torch.equal(buffers[0], a[step][0]) and torch.equal(buffers[1], a[step][1])
    first.close()
    second.close()


def test_bad_files_are_named(tree, tmp_path):
    images, _ = tree
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    broken = ImageList(files=images.files[:3] + [str(bad)], labels=[0, 1, 2, 3], classes=["0", "1", "2", "3"])
    with pytest.raises(CorruptImageError, match="broken.JPEG"):
        list(TorchImagePipeline(broken, _spec(), batch_size=4, shuffle=False))
    missing = ImageList(files=images.files[:3] + [str(tmp_path / "gone.JPEG")], labels=[0] * 4, classes=["0"])
    with pytest.raises(DataError, match="gone.JPEG"):
        list(TorchImagePipeline(missing, _spec(), batch_size=4))
    with pytest.raises(DataError, match="too few"):
        TorchImagePipeline(images, _spec(), batch_size=8, world_size=2)


def test_a_png_with_a_bad_checksum_is_read_as_check_data_reads_it_not_a_crash(tmp_path):
    # torchvision's PNG decoder kills the process (SIGSEGV) on a bad IDAT checksum: run the decode in a child.
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png = tmp_path / "bad_crc.png"
    Image.fromarray(pixels).save(png)
    data = bytearray(png.read_bytes())
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    data[idat + 4 + length] ^= 0xFF  # the chunk's CRC: the pixels are intact
    png.write_bytes(bytes(data))
    code = ("import sys, torch; from pipelines.torch_pipeline import decode_cpu, read_bytes; "
            "torch.save(decode_cpu(read_bytes(sys.argv[1]), sys.argv[1]), sys.argv[2])")
    child = subprocess.run([sys.executable, "-c", code, str(png), str(tmp_path / "out.pt")], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert torch.equal(torch.load(tmp_path / "out.pt"), torch.from_numpy(pixels).permute(2, 0, 1))


@pytest.mark.cuda
def test_cuda_nvjpeg_decode_and_pipeline_contract(tree):
    images, _ = tree
    datas = [read_bytes(f) for f in images.files]
    on_gpu = decode_to_device(datas, images.files, torch.device("cuda"))
    on_cpu = decode_to_device(datas, images.files, torch.device("cpu"))
    for path, gpu, cpu in zip(images.files, on_gpu, on_cpu):
        assert gpu.is_cuda and gpu.shape == cpu.shape and gpu.dtype == torch.uint8, path
        diff = (gpu.cpu().int() - cpu.int()).abs().float()
        # nvjpeg's IDCT and chroma upsampling differ from libjpeg-turbo by a few levels, not more.
        assert diff.mean() < 2.0 and diff.max() <= 48, (path, diff.mean(), diff.max())
    pipeline = TorchImagePipeline(images, _spec(), batch_size=4, device="cuda", dtype=torch.bfloat16)
    buffers = tuple(torch.empty(4, 3, SIZE, SIZE, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last) for _ in range(2))
    labels_seen = []
    for view1, view2, labels in pipeline.batches(0, out=buffers):
        assert view1.data_ptr() == buffers[0].data_ptr() and view2.is_cuda and labels.is_cuda
        assert torch.isfinite(view1.float()).all()
        labels_seen += labels.tolist()
    assert sorted(labels_seen) == list(range(NUM_FILES))
    pipeline.close()


@pytest.mark.cuda
def test_cuda_decode_never_gets_memory_that_queued_kernels_still_write(tree):
    # torchvision's nvjpeg writes on its own stream without waiting for ours; were its outputs drawn from
    # our stream's pool, it could get blocks whose queued writes (here: fills behind a long sleep) land
    # on the decoded pixels afterwards.
    images, _ = tree
    files = images.files[:4]
    datas = [read_bytes(f) for f in files]
    expected = [image.cpu() for image in decode_to_device(datas, files, torch.device("cuda"))]
    for _ in range(3):
        pending = [torch.empty(image.shape, dtype=torch.uint8, device="cuda") for image in expected]
        torch.cuda._sleep(100_000_000)  # some tens of ms of GPU time before the fills below run
        for block in pending:
            block.fill_(7)
        del pending  # freed on our stream while their fills are still queued
        decoded = decode_to_device(datas, files, torch.device("cuda"))
        for path, got, want in zip(files, decoded, expected):
            assert torch.equal(got.cpu(), want), path
