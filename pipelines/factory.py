"""One entry point from the trainer to every two-view backend: `build_train_loader`.

Each backend has its own constructor and epoch API; the trainer sees one shape:
a `TrainLoader` with `len()` (batches per epoch, equal on every rank),
`batches(epoch, start)` yielding `(view1, view2)` per the DESIGN data contract
(written into the trainer's static buffers when `out` is given), and `close()`.

`start` resumes mid-epoch: the epoch's order comes from the seeded sharding,
so batch `start` is the same images it was before the interruption. Backends
whose augmentation randomness is drawn in batch order (torch, DALI, FFCV)
reach batch `start` by producing and dropping the batches before it (that
data work is paid once per resume); the views source jumps there directly.

How exactly a resumed run repeats the uninterrupted one: torchvision (per-image
seeds), torch and FFCV (crops and colour drawn from seeds of epoch and rank)
give the same views bit for bit, and so does DALI: its pipeline is built and
seeded at the start of each epoch, and a resume produces the batches before
`start` too (tests/test_preemption.py resumes each backend mid-epoch and gets
the uninterrupted run's weights, DALI in its CPU mode).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pipelines.device import concrete_device
from pipelines.shards.source import is_shard_spec
from pipelines.sources import load_images
from pipelines.spec import AugmentationSpec

BACKENDS = ("torchvision", "torch", "dali", "ffcv", "views")
_EXTRAS = {"dali": ("nvidia.dali", "dali"), "ffcv": ("ffcv", "ffcv")}


def backend_installed(backend: str) -> bool:
    """Whether the optional package a backend needs can be imported (torchvision/torch/views always can)."""
    if backend not in _EXTRAS:
        return True
    module = _EXTRAS[backend][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("nvidia")
        return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> dali on CUDA when installed, else torch on CUDA, else torchvision; others are checked and kept."""
    if backend == "auto":
        if device.type == "cuda":
            return "dali" if backend_installed("dali") else "torch"
        return "torchvision"
    if backend not in BACKENDS:
        raise ValueError(f"data backend {backend!r} is unknown: use one of auto, {', '.join(BACKENDS)}")
    if not backend_installed(backend):
        module, extra = _EXTRAS[backend]
        raise ValueError(f"data backend {backend!r} needs the {module} package, which is not installed: "
                         f"pip install 'byol-fast[{extra}]' (or pick --data-backend torch / torchvision)")
    return backend


@dataclass
class TrainLoader:
    """The trainer's view of any backend (see the module docstring)."""

    backend: str
    """The backend actually used ("auto" resolved)."""
    num_batches: int
    """Batches per epoch on every rank."""
    _epoch_fn: Callable[[int, int], Iterator[tuple]]
    _close_fn: Callable[[], None] | None = None
    _metrics_fn: Callable[[], dict] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """(view1, view2) of epoch `epoch`, from its batch `start` on."""
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start={start} must lie in [0, {self.num_batches}] (batches per epoch)")
        for item in self._epoch_fn(epoch, start):
            yield item[0], item[1]

    def close(self) -> None:
        """Release worker threads/processes of the backend."""
        if self._close_fn is not None:
            self._close_fn()

    def metrics(self) -> dict:
        """What the backend counts for the run log (shards: bad samples skipped so far); empty for most."""
        return self._metrics_fn() if self._metrics_fn is not None else {}


def _skipping(make_epoch: Callable[[int], Iterator[tuple]]) -> Callable[[int, int], Iterator[tuple]]:
    """An epoch function that reaches batch `start` by producing and dropping the batches before it."""
    return lambda epoch, start: itertools.islice(make_epoch(epoch), start, None)


def build_train_loader(backend: str, data: str | Path, spec: AugmentationSpec, per_rank_batch: int, *,
                       rank: int = 0, world_size: int = 1, seed: int = 0,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, workers: int = 4,
                       out: tuple[Tensor, Tensor] | None = None, shard_manifest: str | None = None,
                       shuffle_buffer: int = 1000, max_bad_fraction: float = 0.001) -> TrainLoader:
    """A TrainLoader of `backend` ("auto" resolved by `resolve_backend`) over `data` for one rank.

    data: an image folder or 'path label' list (torchvision, torch, dali), a .beton file (ffcv) or a
    views .pt file (views), or WebDataset shards (pipelines/shards/source.py: torchvision, torch, dali; their
    manifest from `shard_manifest` or beside them, `shuffle_buffer` samples per stream, and bad samples
    skipped up to `max_bad_fraction` of an epoch). `out`: the step's static input buffers, written in
    place each batch. Structural data problems raise DataError (a ValueError) naming the path and the fix.
    """
    device = concrete_device(device)
    name = resolve_backend(backend, device)
    if out is not None and name in ("dali", "ffcv") and not all(
            buffer.is_contiguous(memory_format=torch.channels_last) for buffer in out):
        out = None  # these write channels_last only; the step then copies each batch into its own buffers
    if is_shard_spec(data):
        from pipelines.shards.factory import build_shard_loader

        return build_shard_loader(name, str(data), spec, per_rank_batch, rank=rank, world_size=world_size, seed=seed,
                                  device=device, dtype=dtype, workers=workers, out=out, manifest=shard_manifest,
                                  shuffle_buffer=shuffle_buffer, max_bad_fraction=max_bad_fraction)
    common = dict(rank=rank, world_size=world_size, seed=seed)
    if name == "views":
        from pipelines.views_loader import ViewsLoader

        views = ViewsLoader(data, per_rank_batch, device=device, dtype=dtype, image_size=spec.image_size, **common)
        return TrainLoader(name, len(views), lambda epoch, start: views.batches(epoch, start, out))
    if name == "ffcv":
        from pipelines.ffcv_loader import FfcvTwoViewLoader

        ffcv = FfcvTwoViewLoader(data, spec, per_rank_batch, device=device, dtype=dtype,
                                 num_workers=max(workers, 1), out=out, **common)

        def ffcv_epoch(epoch: int) -> Iterator[tuple]:
            ffcv.set_epoch(epoch)
            return iter(ffcv)

        return TrainLoader(name, len(ffcv), _skipping(ffcv_epoch), ffcv.close)
    images = load_images(data)
    if name == "torchvision":
        from pipelines.torchvision_loader import build_torchvision_loader

        baseline = build_torchvision_loader(images, spec, per_rank_batch, workers=workers, device=device,
                                            dtype=dtype, **common)
        return TrainLoader(name, len(baseline), _skipping(lambda epoch: baseline.batches(epoch, out)))
    if name == "torch":
        from pipelines.torch_pipeline import TorchImagePipeline

        native = TorchImagePipeline(images, spec, per_rank_batch, device=device, dtype=dtype,
                                    num_threads=max(workers, 1), **common)
        return TrainLoader(name, len(native), _skipping(lambda epoch: native.batches(epoch, out)), native.close)
    from pipelines.dali_pipeline import DaliTwoViewLoader

    dali = DaliTwoViewLoader(images, spec, per_rank_batch, device="gpu" if device.type == "cuda" else "cpu",
                             dtype=dtype, num_threads=workers or None, out=out, **common)

    def dali_epoch(epoch: int) -> Iterator[tuple]:
        dali.set_epoch(epoch)
        return iter(dali)

    return TrainLoader(name, len(dali), _skipping(dali_epoch), dali.close)
