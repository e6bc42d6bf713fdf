"""build_train_loader: backend choice, missing extras, and for every backend the trainer's contract:
batches written into the step's buffers, and `start=k` resuming at exactly the k-th batch of the epoch."""

import gc
import os
import threading
import weakref
from pathlib import Path

import pytest
import torch

from pipelines import factory
from pipelines.factory import build_train_loader, resolve_backend
from pipelines.sources import load_images
from pipelines.spec import AugmentationSpec
from pipelines.synthetic import make_synthetic
from pipelines.views_loader import save_views

SIZE, BATCH, IMAGES = 32, 4, 12  # 3 batches per epoch on one rank
SPEC = AugmentationSpec(image_size=SIZE)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("factory")
    make_synthetic(root / "images", images=IMAGES, classes=3)
    generator = torch.Generator().manual_seed(1)
    save_views(root / "views.pt", *(torch.rand(IMAGES, 3, SIZE, SIZE, generator=generator) for _ in range(2)))
    paths = {"torchvision": root / "images" / "train", "torch": root / "images" / "train",
             "dali": root / "images" / "train", "views": root / "views.pt"}
    if factory.backend_installed("ffcv"):
        from pipelines.ffcv_convert import convert_to_beton

        convert_to_beton(load_images(paths["torch"]), root / "images.beton", max_resolution=128, num_workers=1)
        paths["ffcv"] = root / "images.beton"
    return paths


def test_auto_picks_by_device_and_installed_extras(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torchvision"
    monkeypatch.setattr(factory, "backend_installed", lambda name: name != "dali")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(factory, "backend_installed", lambda name: True)
    assert resolve_backend("auto", torch.device("cuda")) == "dali"


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(factory.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs the nvidia\.dali package.*pip install 'byol-fast\[dali\]'"):
        resolve_backend("dali", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"pip install 'byol-fast\[ffcv\]'"):
        resolve_backend("ffcv", torch.device("cpu"))
    with pytest.raises(ValueError, match="data backend 'pil' is unknown"):
        resolve_backend("pil", torch.device("cpu"))


def _buffers() -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.zeros(BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last) for _ in range(2))


def _epoch(backend: str, data: Path, epoch: int, start: int = 0, out=None) -> list[tuple[torch.Tensor, ...]]:
    """One fresh loader's batches of `epoch` from `start` on (cloned: buffers are overwritten each batch)."""
    loader = build_train_loader(backend, data, SPEC, BATCH, seed=5, workers=1, out=out)
    try:
        assert len(loader) == IMAGES // BATCH
        batches = []
        for view1, view2 in loader.batches(epoch, start):
            if out is not None:
                assert view1 is out[0] and view2 is out[1]  # written in place, as the captured step needs
            assert view1.shape == view2.shape == (BATCH, 3, SIZE, SIZE) and view1.dtype == torch.float32
            batches.append((view1.clone(), view2.clone()))
        return batches
    finally:
        loader.close()


@pytest.mark.parametrize("backend", [
    "views", "torchvision", "torch",
    pytest.param("dali", marks=pytest.mark.dali), pytest.param("ffcv", marks=pytest.mark.ffcv),
])
def test_start_resumes_at_exactly_the_kth_batch(backend, sources):
    if not factory.backend_installed(backend):
        pytest.skip(f"{backend} is not installed")
    full = _epoch(backend, sources[backend], epoch=1, out=_buffers())
    assert len(full) == 3
    resumed = _epoch(backend, sources[backend], epoch=1, start=2, out=_buffers())
    assert len(resumed) == 1
    for got, want in zip(resumed[0], full[2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    other_epoch = _epoch(backend, sources[backend], epoch=2)
    assert not torch.equal(other_epoch[0][0], full[0][0])  # a new epoch reshuffles and re-augments
    with pytest.raises(ValueError, match=r"start=4 must lie in \[0, 3\]"):
        next(build_train_loader(backend, sources[backend], SPEC, BATCH, workers=1).batches(0, 4))


def test_views_source_is_batch_major_across_ranks(sources):
    """Rank r of W reads slice r of the global batch a one-rank run reads at the same step."""
    whole = build_train_loader("views", sources["views"], SPEC, 2 * BATCH, seed=3)
    halves = [build_train_loader("views", sources["views"], SPEC, BATCH, rank=r, world_size=2, seed=3)
              for r in range(2)]
    # 12 samples, global batch 8: one step per epoch on one rank (batch 8) and on two ranks (batch 4 each).
    assert len(whole) == len(halves[0]) == len(halves[1]) == 1
    for epoch in range(2):
        (view1, view2), = whole.batches(epoch)
        parts = [next(h.batches(epoch)) for h in halves]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), view1, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), view2, rtol=0, atol=0)


def test_channels_first_buffers_are_not_handed_to_channels_last_backends(sources):
    if not factory.backend_installed("dali"):
        pytest.skip("dali is not installed")
    plain = tuple(torch.zeros(BATCH, 3, SIZE, SIZE) for _ in range(2))  # the CPU step's default layout
    view1, _ = next(build_train_loader("dali", sources["dali"], SPEC, BATCH, workers=1, out=plain).batches(0))
    assert view1 is not plain[0] and view1.shape == plain[0].shape  # the step copies it into its buffer


def _backend_threads(backend: str) -> int:
    """Live threads the backend started: DALI's native ones (named "[DALI]..."), or ffcv's epoch threads."""
    if backend == "dali":
        return sum((task / "comm").read_text().startswith("[DALI]") for task in Path("/proc/self/task").iterdir())
    from ffcv.loader.epoch_iterator import EpochIterator

    return sum(isinstance(thread, EpochIterator) and thread.is_alive() for thread in threading.enumerate())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts native threads through Linux /proc")
@pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.dali),
                                     pytest.param("ffcv", marks=pytest.mark.ffcv)])
def test_close_stops_the_backends_threads_mid_epoch(backend, sources):
    """The trainer's `finally: loader.close()` may run with an epoch still open (a step raised): close() must
    stop what the backend started, not leave it to garbage collection."""
    if not factory.backend_installed(backend):
        pytest.skip(f"{backend} is not installed")
    before = _backend_threads(backend)
    # Batch 1: 12 batches, more than ffcv makes ahead, so its epoch thread is still working after one.
    loader = build_train_loader(backend, sources[backend], SPEC, 1, workers=2)
    backend_loader = loader._close_fn.__self__ if loader._close_fn is not None else None
    epoch = loader.batches(0)
    next(epoch)
    assert _backend_threads(backend) > before
    if backend == "ffcv":
        ffcv_loader = weakref.ref(backend_loader._loader)
    loader.close()
    assert _backend_threads(backend) == before
    loader.close()  # a second close is harmless
    if backend == "ffcv":
        with pytest.raises(RuntimeError, match="was closed: build a new one"):
            next(backend_loader.raw_batches())
        epoch.close()
        gc.collect()
        assert ffcv_loader() is None  # dropped with its memory map of the .beton, though the loader object lives
