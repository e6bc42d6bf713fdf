"""LARS and the EMA on a GPU: no syncs, and captured in a CUDA graph with a changing lr."""

import pytest
import torch
import torchvision

from byol_fast import LARS, ema_update_

pytestmark = pytest.mark.cuda


def resnet50_params_and_grads(seed):
    """The same weights and gradients for the same seed (the weights come from the global CPU RNG)."""
    torch.manual_seed(seed)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    params = [p.detach().cuda().requires_grad_() for p in torchvision.models.resnet50().parameters()]
    grads = [torch.randn(p.shape, device="cuda", generator=generator) * 1e-2 for p in params]
    return params, grads


def test_lars_and_ema_under_sync_debug_error_mode():
    params, grads = resnet50_params_and_grads(0)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer = LARS(params, lr=0.1, weight_decay=1.5e-6)
    target = [p.detach().clone() for p in params]
    tau = torch.tensor(0.99, device="cuda")
    optimizer.step()  # allocate state before entering the strict mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimizer.step()
            ema_update_(target, params, tau)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_captured_lars_and_ema_replay_with_changed_lr_matches_eager():
    lrs = [0.1, 0.3, 0.05, 0.2]
    results = []
    for captured in (False, True):
        params, grads = resnet50_params_and_grads(1)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer = LARS(params, lr=0.0, weight_decay=1.5e-6)
        target = [p.detach().clone() for p in params]
        tau = torch.tensor(0.99, device="cuda")

        def update():
            optimizer.step()
            ema_update_(target, params, tau)

        optimizer.param_groups[0]["lr"].fill_(0.01)
        update()  # warm-up: allocates state, as before any capture
        graph = None
        if captured:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                update()
        for lr in lrs:
            optimizer.param_groups[0]["lr"].fill_(lr)
            tau.fill_(0.99 + lr / 100)
            graph.replay() if captured else update()
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in params], target))
    (eager_params, eager_target), (graph_params, graph_target) = results
    for a, b in zip(eager_params + eager_target, graph_params + graph_target):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
