"""BatchNorm with statistics over all ranks, on any device: SyncBatchNorm for the gloo/CPU path.

`torch.nn.SyncBatchNorm` rejects CPU tensors (its kernels `batch_norm_stats`
etc. are CUDA-only), yet the paper's BatchNorm is synchronized and the
distributed path must run in CI on CPU processes. This module computes the
same thing with two differentiable all-reduces (functional collectives carry
autograd): the global sum (then the mean) and the global sum of squared
deviations (then the biased variance). Autograd through the all-reduce sums each rank's gradient
with respect to the shared statistics, which is exactly the gradient of the
summed per-rank losses, as SyncBatchNorm's backward computes it.

On CUDA the trainer uses `nn.SyncBatchNorm` (fused kernels); see
`convert_sync_batchnorm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics span every rank of `process_group`.

    Outside training, or without an initialized process group of more than one
    rank, it is plain BatchNorm. Statistics are computed in float32.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _synchronized(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize with the batch statistics of all ranks (training) or the running ones (eval)."""
        if not self._synchronized():
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        local_count = torch.full((1,), float(input.numel() // input.shape[1]), device=x.device)
        # Collective 1: sum and count; collective 2: squared deviations about the global mean (two-pass, stable).
        totals = funcol.all_reduce(torch.cat([x.sum(dims), local_count]), "sum", group)
        count = totals[-1]
        mean = totals[:-1] / count
        centered = x - mean.view(shape)
        var = funcol.all_reduce(centered.square().sum(dims), "sum", group) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum=None is a cumulative average, as in nn.BatchNorm (the .item() is a CPU read here).
        factor = (1.0 / float(self.num_batches_tracked.item())) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def _convert(module: nn.Module, make: type[nn.Module], process_group: dist.ProcessGroup | None) -> nn.Module:
    """Replace every BatchNorm*d under `module` with `make`, keeping parameters, buffers and train mode."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, make):
        converted = make(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, make, process_group))
    return converted


def convert_sync_batchnorm(module: nn.Module, device: torch.device,
                           process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Synchronize every BatchNorm of `module` across ranks: nn.SyncBatchNorm on CUDA, CrossRankBatchNorm elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert(module, CrossRankBatchNorm, process_group)
