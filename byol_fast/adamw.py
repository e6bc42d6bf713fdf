"""A fused, sync-free AdamW (Loshchilov & Hutter, 2019) for the captured BYOL step.

For each parameter w with gradient g, at step t (counting from 1):

    w  = w * (1 - lr * weight_decay)          (decoupled; not for excluded parameters)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    w  = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

which is torch.optim.AdamW's update. Parameters picked by `exclude` (the
trainer passes byol_fast.exclusions.exclusion_rule: biases, norms, position
embeddings, tokens) get no weight decay.

As in byol_fast.lars: all math runs over every tensor at once with
`torch._foreach_*` kernels; the learning rate and the step count of each group
are 0-dim tensors on the parameters' device (change the lr with
`group["lr"].fill_(value)`), so the bias corrections are computed on the device,
`step()` never reads a value back to the host and a captured CUDA graph sees a
new lr and step without being recaptured. Moments and one update workspace per
parameter are allocated on the first step; later steps allocate nothing
parameter-sized, and `load_state_dict` copies into the existing tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from byol_fast.lars import excluded_by_default

_SCRATCH = "update"


class AdamW(torch.optim.Optimizer):
    """AdamW with device-tensor lr and step, excluded parameters without weight decay.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate (float or 0-dim tensor); stored per group as a 0-dim float32
            tensor on the parameters' device. Change it with `group["lr"].fill_(value)`.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the bias-corrected sqrt(v) (> 0).
        weight_decay: decoupled weight decay (>= 0), scaled by lr as in torch.optim.AdamW.
        exclude: predicate picking parameters without weight decay; defaults to `param.ndim <= 1`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        exclude: Callable[[Tensor], bool] = excluded_by_default,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.exclude = exclude
        for group in self.param_groups:
            _validate_hyperparameters(float(group["lr"]), group["betas"], group["eps"], group["weight_decay"])
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            group["step"] = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, group)
        return loss

    def _update(self, params: list[Tensor], group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, step = group["lr"], group["step"]
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs, updates = self._buffers(params)
        step += 1
        decayed = [p for p in params if not self.exclude(p)]
        if group["weight_decay"] and decayed:
            torch._foreach_mul_(decayed, 1.0 - lr * group["weight_decay"])  # a 0-dim device tensor
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m + (1 - beta1) (g - m)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # Bias corrections from the device step count: beta^t with a tensor exponent, no host read.
        step_size = lr / (1.0 - torch.pow(beta1, step))
        inverse_bias2_sqrt = torch.rsqrt(1.0 - torch.pow(beta2, step))
        torch._foreach_copy_(updates, exp_avg_sqs)
        torch._foreach_sqrt_(updates)
        torch._foreach_mul_(updates, inverse_bias2_sqrt)
        torch._foreach_add_(updates, group["eps"])
        torch._foreach_reciprocal_(updates)
        torch._foreach_mul_(updates, exp_avgs)
        torch._foreach_mul_(updates, step_size)
        torch._foreach_sub_(params, updates)

    def _buffers(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        exp_avgs, exp_avg_sqs, updates = [], [], []
        for param in params:
            state = self.state[param]
            for name in ("exp_avg", "exp_avg_sq"):
                if name not in state:
                    state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if _SCRATCH not in state:
                state[_SCRATCH] = torch.empty_like(param, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            updates.append(state[_SCRATCH])
        return exp_avgs, exp_avg_sqs, updates

    def state_dict(self) -> dict:
        # The update workspace is scratch space: it carries nothing between steps.
        saved = super().state_dict()
        saved["state"] = {key: {name: value for name, value in entry.items() if name != _SCRATCH}
                          for key, entry in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads values into the existing lr, step and moment tensors, keeping their storage (a captured graph
        reads them); moments missing from the state (saved before the first step) start from zero."""
        live_groups = [(group["lr"], group["step"]) for group in self.param_groups]
        live_state = {p: dict(s) for p, s in self.state.items()}
        super().load_state_dict(state_dict)
        for group, (live_lr, live_step) in zip(self.param_groups, live_groups):
            live_lr.copy_(torch.as_tensor(group["lr"], dtype=live_lr.dtype))
            live_step.copy_(torch.as_tensor(group["step"], dtype=live_step.dtype))
            group["lr"], group["step"] = live_lr, live_step
        for param, live_entries in live_state.items():
            state = self.state[param]
            for name, live in live_entries.items():
                if name in state:
                    live.copy_(state[name])
                elif name != _SCRATCH:
                    live.zero_()
                state[name] = live


def _validate_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"AdamW lr={lr} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"AdamW betas={betas} must be two numbers in [0, 1) (Adam's are 0.9, 0.999)")
    if not eps > 0.0:
        raise ValueError(f"AdamW eps={eps} must be > 0 (Adam's is 1e-8)")
    if not weight_decay >= 0.0:
        raise ValueError(f"AdamW weight_decay={weight_decay} must be >= 0")
