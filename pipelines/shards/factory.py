"""`build_train_loader` for shard data: the shard set resolved (its manifest read) and the backend's shard
loader wrapped as a TrainLoader. Every shard backend jumps to any batch of an epoch (no produce-and-drop):
its order is the ShardPlan's, known before reading."""

from __future__ import annotations

import torch
from torch import Tensor

from pipelines.factory import TrainLoader
from pipelines.shards.source import resolve_shards
from pipelines.sources import DataError
from pipelines.spec import AugmentationSpec


def build_shard_loader(backend: str, data: str, spec: AugmentationSpec, per_rank_batch: int, *, rank: int,
                       world_size: int, seed: int, device: torch.device, dtype: torch.dtype, workers: int,
                       out: tuple[Tensor, Tensor] | None, manifest: str | None, shuffle_buffer: int,
                       max_bad_fraction: float) -> TrainLoader:
    """A TrainLoader of `backend` over the shards `data` names (see build_train_loader)."""
    if backend in ("ffcv", "views"):
        what = {"ffcv": "a .beton file (`byol-fast convert-ffcv IMAGES OUT.beton`)",
                "views": "a .pt file of pre-made views"}[backend]
        raise DataError(f"data_backend={backend!r} reads {what}, not WebDataset shards ({data}): pass "
                        f"--data-backend torch, torchvision or dali for shards")
    shards = resolve_shards(data, manifest)
    common = dict(rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                  max_bad_fraction=max_bad_fraction)
    if backend == "torchvision":
        from pipelines.shards.loaders import ShardTorchvisionLoader

        loader = ShardTorchvisionLoader(shards, spec, per_rank_batch, workers=workers, device=device, dtype=dtype,
                                        **common)
        return TrainLoader(backend, len(loader), lambda epoch, start: loader.batches(epoch, start, out),
                           _metrics_fn=loader.ledger.metrics)
    if backend == "torch":
        from pipelines.shards.loaders import ShardTorchPipeline

        native = ShardTorchPipeline(shards, spec, per_rank_batch, device=device, dtype=dtype,
                                    num_threads=max(workers, 1), **common)
        return TrainLoader(backend, len(native), lambda epoch, start: native.batches(epoch, out, start),
                           native.close, native.ledger.metrics)
    from pipelines.shards.dali import DaliShardLoader

    dali = DaliShardLoader(shards, spec, per_rank_batch, device="gpu" if device.type == "cuda" else "cpu",
                           dtype=dtype, num_threads=workers or None, out=out, **common)
    return TrainLoader(backend, len(dali), dali.batches, dali.close, dali.ledger.metrics)
