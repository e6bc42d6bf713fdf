"""The fused AdamW against a float64 per-parameter loop of its formulas and against torch.optim.AdamW;
its state survives a resume into the live buffers; it never syncs; each optimizer's lr scaling rule."""

import io
import math

import pytest
import torch
import torchvision

from byol_fast.adamw import AdamW
from byol_fast.optimizers import build_optimizer, peak_lr

BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.05


def reference_adamw_step(weights, grads, exp_avgs, exp_avg_sqs, step, lr, excluded):
    """The formulas of byol_fast/adamw.py's docstring, one tensor at a time, in float64 (step counts from 1)."""
    beta1, beta2 = BETAS
    for i, (w, g) in enumerate(zip(weights, grads)):
        g = g.double()
        if not excluded[i]:
            w.mul_(1 - lr * WEIGHT_DECAY)
        exp_avgs[i] = beta1 * exp_avgs[i] + (1 - beta1) * g
        exp_avg_sqs[i] = beta2 * exp_avg_sqs[i] + (1 - beta2) * g * g
        denominator = exp_avg_sqs[i].sqrt() / math.sqrt(1 - beta2**step) + EPS
        w.sub_(lr / (1 - beta1**step) * exp_avgs[i] / denominator)


def resnet18_parameters():
    """ResNet-18's tensors up to layer2 and its fc (0.7M weights: the float64 loop stays quick), all shapes."""
    return [p.detach().clone().requires_grad_() for name, p in torchvision.models.resnet18().named_parameters()
            if not name.startswith(("layer3", "layer4"))]


def random_gradients(params, step):
    generator = torch.Generator().manual_seed(step)
    grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]
    grads[3].zero_()  # a weight with no gradient this step: the moments decay, the weight still decays
    return grads


STEPS = 30


def lr_at(step):
    return 1e-3 * (1 + step) / STEPS


def test_fused_adamw_matches_float64_reference_over_30_steps():
    params = resnet18_parameters()
    reference = [p.detach().double().clone() for p in params]
    exp_avgs = [torch.zeros_like(w) for w in reference]
    exp_avg_sqs = [torch.zeros_like(w) for w in reference]
    excluded = [p.ndim <= 1 for p in params]
    optimizer = AdamW(params, lr=0.0, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    start = [p.detach().double().clone() for p in params]
    for step in range(STEPS):
        grads = random_gradients(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.param_groups[0]["lr"].fill_(lr_at(step))
        optimizer.step()
        reference_adamw_step(reference, grads, exp_avgs, exp_avg_sqs, step + 1, lr_at(step), excluded)
    assert optimizer.param_groups[0]["step"].item() == STEPS
    for p, expected, before in zip(params, reference, start):
        error = (p.double() - expected).abs().max()
        # float32 weights round at every step: the error is counted in ulps of the tensor's largest weight
        # (measured 12.1 at most over these 32 tensors) and against what the steps moved it (measured 1.9e-4).
        assert error / (expected.abs().max() * 2**-24) < 32
        assert (p.double() - expected).norm() / (expected - before).norm() < 1e-3


def test_matches_torch_adamw_with_the_same_exclusions():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    reference = [p.detach().clone().requires_grad_() for p in net.parameters()]
    ours = list(net.parameters())
    optimizer = AdamW(ours, lr=3e-3, betas=BETAS, weight_decay=WEIGHT_DECAY)
    torch_adamw = torch.optim.AdamW([{"params": [p for p in reference if p.ndim > 1]},
                                     {"params": [p for p in reference if p.ndim <= 1], "weight_decay": 0.0}],
                                    lr=3e-3, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)
    for step in range(40):
        for p, q, g in zip(ours, reference, random_gradients(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        torch_adamw.step()
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    def run(optimizer, params, steps):
        for step in steps:
            for p, g in zip(params, random_gradients(params, step)):
                p.grad = g
            optimizer.step()

    params = resnet18_parameters()
    optimizer = AdamW(params, lr=1e-3, weight_decay=WEIGHT_DECAY)
    run(optimizer, params, range(10))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)

    resumed_params = [p.detach().clone().requires_grad_() for p in resnet18_parameters()]
    resumed = AdamW(resumed_params, lr=0.0, weight_decay=WEIGHT_DECAY)
    run(resumed, resumed_params, range(1))  # allocate buffers first: loading must copy into them
    live_lr, live_step = resumed.param_groups[0]["lr"], resumed.param_groups[0]["step"]
    live_moment = resumed.state[resumed_params[5]]["exp_avg_sq"]
    buffer.seek(0)
    saved = torch.load(buffer)
    assert "update" not in saved["optimizer"]["state"][0]  # scratch space is not saved
    with torch.no_grad():
        for p, s in zip(resumed_params, saved["params"]):
            p.copy_(s)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.param_groups[0]["lr"] is live_lr and live_lr.item() == pytest.approx(1e-3)
    assert resumed.param_groups[0]["step"] is live_step and live_step.item() == 10
    assert resumed.state[resumed_params[5]]["exp_avg_sq"] is live_moment

    run(optimizer, params, range(10, 20))
    run(resumed, resumed_params, range(10, 20))
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_loading_a_state_from_before_the_first_step_zeroes_the_live_moments():
    params = [torch.ones(4, 4, requires_grad=True), torch.ones(4, requires_grad=True)]
    optimizer = AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    live = {i: optimizer.state[p]["exp_avg"] for i, p in enumerate(params)}
    optimizer.load_state_dict(AdamW(params, lr=0.1).state_dict())  # no steps: no state, step 0
    assert optimizer.param_groups[0]["step"].item() == 0
    for i, p in enumerate(params):
        assert optimizer.state[p]["exp_avg"] is live[i] and torch.equal(live[i], torch.zeros_like(p))


def test_step_makes_no_host_sync(forbid_host_sync):
    params = resnet18_parameters()
    optimizer = AdamW(params, lr=1e-3, weight_decay=WEIGHT_DECAY)
    for step in range(2):  # the first step allocates buffers, the second reuses them
        for p, g in zip(params, random_gradients(params, step)):
            p.grad = g
        with forbid_host_sync():
            optimizer.step()


@pytest.mark.parametrize("kwargs, fix", [(dict(lr=-0.1), "lr"), (dict(lr=0.1, betas=(0.9, 1.0)), "betas"),
                                         (dict(lr=0.1, eps=0.0), "eps"), (dict(lr=0.1, weight_decay=-1.0),
                                                                          "weight_decay")])
def test_out_of_range_settings_fail_at_construction(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        AdamW([torch.nn.Parameter(torch.ones(2, 2))], **kwargs)


def test_each_optimizer_scales_its_lr_by_its_own_rule():
    assert peak_lr("lars", 0.2, 4096) == pytest.approx(3.2)  # linear: BYOL's 0.2 x 4096 / 256
    assert peak_lr("adamw", 3e-4, 256) == pytest.approx(3e-4)  # the small-data rate at its own batch
    assert peak_lr("adamw", 3e-4, 64) == pytest.approx(1.5e-4)  # square root: a quarter of the batch, half the lr
    assert peak_lr("adamw", 1e-3, 1024) == pytest.approx(2e-3)  # DINO's ViT-S/16 rate at its batch 1024
    with pytest.raises(ValueError, match="use one of lars, adamw"):
        peak_lr("sgd", 0.1, 256)


def test_build_optimizer_gives_each_its_settings_and_the_models_exclusions():
    net = torchvision.models.resnet18()
    params = list(net.parameters())
    lars = build_optimizer("lars", net, params, weight_decay=1e-6, momentum=0.8, eta=0.02)
    adamw = build_optimizer("adamw", net, params, weight_decay=0.05, betas=(0.9, 0.95))
    assert (lars.param_groups[0]["momentum"], lars.param_groups[0]["eta"]) == (0.8, 0.02)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["weight_decay"] == 0.05
    for optimizer in (lars, adamw):
        assert optimizer.param_groups[0]["lr"].item() == 0.0
        assert optimizer.exclude(net.bn1.weight) and optimizer.exclude(net.fc.bias)
        assert not optimizer.exclude(net.conv1.weight) and not optimizer.exclude(net.fc.weight)
