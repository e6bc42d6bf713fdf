"""A fused, sync-free LARS optimizer with DeepMind's BYOL update rule.

For each parameter w with gradient g (DESIGN.md, "The BYOL recipe"):

    u     = g + weight_decay * w
    trust = eta * ||w|| / ||u||      (1 where either norm is 0)
    m     = momentum * m + trust * u
    w     = w - lr * m

Parameters picked by `exclude` (default: ndim <= 1, i.e. biases and BatchNorm
affine parameters) get neither weight decay nor trust scaling: plain momentum SGD.

All math runs across every tensor at once with `torch._foreach_*` kernels. The
learning rate of each group is a 0-dim tensor on the parameters' device that
schedules overwrite in place, so `step()` never reads a value back to the host
and a captured CUDA graph sees a new lr without being recaptured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def excluded_by_default(param: Tensor) -> bool:
    """Biases and normalization scales/shifts are vectors: no decay, no trust scaling."""
    return param.ndim <= 1


def trust_ratios(weights: list[Tensor], updates: list[Tensor], eta: float) -> Tensor:
    """eta * ||w|| / ||u|| per tensor, or 1 where either norm is zero; one device vector."""
    w_norm = torch.stack(torch._foreach_norm(weights))
    u_norm = torch.stack(torch._foreach_norm(updates))
    adaptive = eta * w_norm / u_norm.clamp_min(torch.finfo(u_norm.dtype).tiny)
    return torch.where((w_norm > 0) & (u_norm > 0), adaptive, torch.ones_like(adaptive))


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling, as in BYOL (Grill et al., 2020).

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate (float or 0-dim tensor); stored per group as a 0-dim
            float32 tensor on the parameters' device. Change it with
            `group["lr"].fill_(value)`, never by assigning a new object.
        momentum: momentum coefficient in [0, 1).
        weight_decay: decoupled into the update before trust scaling (>= 0).
        eta: trust coefficient (> 0); 1e-3 in BYOL.
        exclude: predicate picking parameters that skip weight decay and trust
            scaling; defaults to `param.ndim <= 1`.

    `step()` keeps one momentum buffer and one update workspace per parameter,
    both allocated on the first step, so later steps allocate nothing
    parameter-sized. `load_state_dict` copies into existing tensors in place, so
    a CUDA graph captured before a resume stays valid.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        exclude: Callable[[Tensor], bool] = excluded_by_default,
    ) -> None:
        _validate_hyperparameters(float(lr), momentum, weight_decay, eta)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
        super().__init__(params, defaults)
        self.exclude = exclude
        for group in self.param_groups:
            _validate_hyperparameters(float(group["lr"]), group["momentum"], group["weight_decay"], group["eta"])
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=group["params"][0].device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adapted: list[Tensor] = []
            plain: list[Tensor] = []
            for param in group["params"]:
                if param.grad is not None:
                    (plain if self.exclude(param) else adapted).append(param)
            for params, adapt in ((adapted, True), (plain, False)):
                if params:
                    self._update(params, group, adapt)
        return loss

    def _update(self, params: list[Tensor], group: dict, adapt: bool) -> None:
        grads = [p.grad for p in params]
        momenta, updates = self._buffers(params)
        torch._foreach_copy_(updates, grads)
        if adapt:
            if group["weight_decay"]:
                torch._foreach_add_(updates, params, alpha=group["weight_decay"])
            # A list of 0-dim device tensors: multiplies each tensor by its own ratio, no host read.
            torch._foreach_mul_(updates, trust_ratios(params, updates, group["eta"]).unbind(0))
        torch._foreach_mul_(momenta, group["momentum"])
        torch._foreach_add_(momenta, updates)
        # lr is a device tensor, so `add_(alpha=-lr)` (a host scalar) is not an option:
        # scale a copy of the momentum in the workspace and subtract it.
        torch._foreach_copy_(updates, momenta)
        torch._foreach_mul_(updates, group["lr"])
        torch._foreach_sub_(params, updates)

    def _buffers(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        momenta, updates = [], []
        for param in params:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if "update" not in state:
                state["update"] = torch.empty_like(param, memory_format=torch.preserve_format)
            momenta.append(state["momentum_buffer"])
            updates.append(state["update"])
        return momenta, updates

    def state_dict(self) -> dict:
        # The update workspace is scratch space: it carries nothing between steps.
        saved = super().state_dict()
        saved["state"] = {
            key: {name: value for name, value in entry.items() if name != "update"}
            for key, entry in saved["state"].items()
        }
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads values into the existing lr and momentum tensors, keeping their storage."""
        live_lrs = [group["lr"] for group in self.param_groups]
        live_state = {p: dict(s) for p, s in self.state.items()}
        super().load_state_dict(state_dict)
        for group, live_lr in zip(self.param_groups, live_lrs):
            live_lr.copy_(torch.as_tensor(group["lr"], dtype=live_lr.dtype))
            group["lr"] = live_lr
        # A captured graph reads the live buffers: keep every one, also when the loaded state lacks it (a
        # checkpoint written before the first step has no momentum, which then starts from zero).
        for param, live_entries in live_state.items():
            state = self.state[param]
            for name, live in live_entries.items():
                if name in state:
                    live.copy_(state[name])
                elif name == "momentum_buffer":
                    live.zero_()
                state[name] = live


def _validate_hyperparameters(lr: float, momentum: float, weight_decay: float, eta: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"LARS lr={lr} must be >= 0 (BYOL uses 0.2 * batch / 256)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"LARS momentum={momentum} must lie in [0, 1) (BYOL uses 0.9)")
    if not weight_decay >= 0.0:
        raise ValueError(f"LARS weight_decay={weight_decay} must be >= 0 (BYOL uses 1.5e-6)")
    if not eta > 0.0:
        raise ValueError(f"LARS eta={eta} must be > 0 (BYOL uses 1e-3)")
