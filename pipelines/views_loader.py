"""Pre-made views from a tensor file: a data source with no randomness, for exact trainer tests.

The file (`torch.save`) holds {"view1": (N, 3, S, S) float, "view2": (N, 3, S, S) float}:
sample i's two views. Unlike the image backends, whose augmentation randomness
is drawn per rank, a sample's views here do not depend on the rank that reads
it, and batches are split batch-major: step k of epoch e uses global batch k of
the epoch's permutation (`shard_indices` with world_size 1 and the global
batch), and rank r takes its r-th slice. So a run on W ranks with per-rank
batch B sees, at every step, exactly the samples a one-rank run with batch W*B
sees, which makes the two runs comparable number for number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from pipelines.sources import DataError, shard_indices


def _layout_problem(view1: object, view2: object, floating: bool = False) -> str | None:
    """What keeps (view1, view2) from being two (N, 3, S, S) tensors of one shape (and a floating dtype, when
    `floating`), or None when they are."""
    for name, view in (("view1", view1), ("view2", view2)):
        if not isinstance(view, Tensor):
            return f"{name} is a {type(view).__name__}, not a tensor"
        if floating and not view.is_floating_point():
            return f"{name} is {view.dtype}, not floating point (views are normalized images)"
        if view.dim() != 4 or view.shape[1] != 3 or view.shape[2] != view.shape[3]:
            return f"{name} has shape {tuple(view.shape)}, not (N, 3, S, S)"
    if view1.shape != view2.shape:
        return f"view1 has shape {tuple(view1.shape)} but view2 {tuple(view2.shape)}: they must have one shape"
    return None


def save_views(path: str | Path, view1: Tensor, view2: Tensor) -> None:
    """Write a views file (float32, contiguous) that ViewsLoader reads."""
    problem = _layout_problem(view1, view2)
    if problem is not None:
        raise ValueError(f"views must be two (N, 3, S, S) tensors of one shape: {problem}")
    torch.save({"view1": view1.float().contiguous(), "view2": view2.float().contiguous()}, Path(path))


class ViewsLoader:
    """Batches (view1, view2) of one rank from a views file, on `device` in `dtype`, channels_last."""

    def __init__(self, path: str | Path, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 image_size: int | None = None) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"views file {path} does not exist: write one with pipelines.views_loader.save_views")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or set(data) != {"view1", "view2"}:
            raise DataError(f"{path} is not a views file (a dict with 'view1' and 'view2'): "
                            f"write it with pipelines.views_loader.save_views")
        # Checked in full here: batches index both views with one order, so a view2 of another length or
        # size would otherwise fail mid-epoch (IndexError) or hand the step mismatched views.
        problem = _layout_problem(data["view1"], data["view2"], floating=True)
        if problem is not None:
            raise DataError(f"{path} is not a valid views file: {problem}; write it with "
                            f"pipelines.views_loader.save_views")
        if image_size is not None and tuple(data["view1"].shape[-2:]) != (image_size, image_size):
            raise DataError(f"{path} holds {tuple(data['view1'].shape[-2:])} views but image_size={image_size}: "
                            f"regenerate the file or change image_size")
        self.device = torch.device(device)
        self.views = [data[k].to(self.device, dtype).contiguous(memory_format=torch.channels_last)
                      for k in ("view1", "view2")]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.global_batch = batch_size * world_size
        self._order(0)  # fails now, naming the fix, when the file holds less than one global batch

    def _order(self, epoch: int) -> Tensor:
        order = shard_indices(len(self.views[0]), 0, 1, epoch, self.seed, batch_size=self.global_batch)
        return torch.from_numpy(order).view(-1, self.world_size, self.batch_size)[:, self.rank]

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self.views[0]) // self.global_batch

    def batches(self, epoch: int, start: int = 0, out: tuple[Tensor, Tensor] | None = None
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """Epoch `epoch` from its batch `start` on; with `out`, each batch is written into those buffers."""
        # One host-to-device copy of the epoch's order; per batch, indexing stays on the device (no sync).
        for index in self._order(epoch)[start:].to(self.device):
            if out is None:
                yield self.views[0][index], self.views[1][index]
            else:
                for buffer, views in zip(out, self.views):
                    buffer.copy_(views[index])
                yield out
