"""LARS against a float64 per-parameter re-implementation of DeepMind's update."""

import io

import pytest
import torch
import torchvision

from byol_fast.lars import LARS

ETA, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 1e-4


def reference_lars_step(weights, grads, momenta, lr, excluded):
    """The formula in DESIGN.md, one tensor at a time, in float64."""
    for i, (w, g) in enumerate(zip(weights, grads)):
        if excluded[i]:
            u, trust = g, 1.0
        else:
            u = g + WEIGHT_DECAY * w
            w_norm, u_norm = w.norm().item(), u.norm().item()
            trust = ETA * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        momenta[i] = MOMENTUM * momenta[i] + trust * u
        weights[i] -= lr * momenta[i]


def resnet18_parameters():
    params = [p.detach().clone().requires_grad_() for p in torchvision.models.resnet18().parameters()]
    params[0].data.zero_()  # a weight whose norm is zero: trust falls back to 1
    return params


def random_gradients(params, step):
    generator = torch.Generator().manual_seed(step)
    grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]
    grads[3].zero_()  # layer1.0.conv1.weight with no gradient: u = wd * w alone
    grads[4].zero_()  # layer1.0.bn1.weight with no gradient
    return grads


def lr_at(step):
    return 0.5 * (1 + step) / 50


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def test_fused_lars_matches_float64_reference_over_50_steps():
    params = resnet18_parameters()
    reference = [p.detach().double().clone() for p in params]
    momenta = [torch.zeros_like(w) for w in reference]
    excluded = [p.ndim <= 1 for p in params]
    optimizer = LARS(params, lr=0.0, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eta=ETA)
    for step in range(50):
        grads = random_gradients(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.param_groups[0]["lr"].fill_(lr_at(step))
        optimizer.step()
        reference_lars_step(reference, [g.double() for g in grads], momenta, lr_at(step), excluded)
    errors = [relative_error(p, r) for p, r in zip(params, reference)]
    assert max(errors) < 1e-6, f"worst tensor off by {max(errors):.2e}"
    assert params[0].abs().sum() > 0, "the zero-weight tensor must still move"
    # An excluded tensor with no gradient gets no weight decay either: it never moves.
    assert torch.equal(params[4], torch.ones_like(params[4]))


def test_excluded_parameters_follow_momentum_sgd():
    params = resnet18_parameters()
    sgd_params = [p.detach().clone().requires_grad_() for p in params]
    lars = LARS(params, lr=0.1, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, exclude=lambda p: True)
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=MOMENTUM)
    for step in range(10):
        for p, q, g in zip(params, sgd_params, random_gradients(params, step)):
            p.grad, q.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    for p, q in zip(params, sgd_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_default_exclusion_is_vectors_only():
    weight = torch.nn.Parameter(torch.ones(4, 4))
    bias = torch.nn.Parameter(torch.ones(4))
    optimizer = LARS([weight, bias], lr=1.0, weight_decay=0.5)
    weight.grad = torch.zeros(4, 4)
    bias.grad = torch.zeros(4)
    optimizer.step()
    # bias: no decay, no gradient -> untouched. weight: u = 0.5 w, trust = eta/0.5, w -= eta * w.
    assert torch.equal(bias, torch.ones(4))
    torch.testing.assert_close(weight, torch.full((4, 4), 1 - 1e-3))


def test_state_dict_round_trip_continues_identically():
    def run(optimizer, params, steps):
        for step in steps:
            for p, g in zip(params, random_gradients(params, step)):
                p.grad = g
            optimizer.step()

    params = resnet18_parameters()
    optimizer = LARS(params, lr=0.3, weight_decay=WEIGHT_DECAY)
    run(optimizer, params, range(25))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)

    resumed_params = [p.detach().clone().requires_grad_() for p in resnet18_parameters()]
    resumed = LARS(resumed_params, lr=0.0, weight_decay=WEIGHT_DECAY)
    run(resumed, resumed_params, range(1))  # allocate buffers first: loading must copy into them
    live_lr = resumed.param_groups[0]["lr"]
    live_momentum = resumed.state[resumed_params[5]]["momentum_buffer"]
    buffer.seek(0)
    saved = torch.load(buffer)
    with torch.no_grad():
        for p, s in zip(resumed_params, saved["params"]):
            p.copy_(s)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.param_groups[0]["lr"] is live_lr and live_lr.item() == pytest.approx(0.3)
    assert resumed.state[resumed_params[5]]["momentum_buffer"] is live_momentum

    run(optimizer, params, range(25, 50))
    run(resumed, resumed_params, range(25, 50))
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_loading_a_state_from_before_the_first_step_keeps_and_zeroes_the_live_buffers():
    # A graph captured before the load reads these buffers: they must stay, with the loaded (empty) momentum.
    params = [torch.ones(4, 4, requires_grad=True), torch.ones(4, requires_grad=True)]
    optimizer = LARS(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    live = {i: (optimizer.state[p]["momentum_buffer"], optimizer.state[p]["update"]) for i, p in enumerate(params)}
    assert all(momentum.abs().sum() > 0 for momentum, _ in live.values())
    optimizer.load_state_dict(LARS(params, lr=0.1).state_dict())  # no steps: no state at all
    for i, p in enumerate(params):
        assert optimizer.state[p]["momentum_buffer"] is live[i][0] and optimizer.state[p]["update"] is live[i][1]
        assert torch.equal(live[i][0], torch.zeros_like(p))


def test_step_makes_no_host_sync(forbid_host_sync):
    params = resnet18_parameters()
    optimizer = LARS(params, lr=0.1, weight_decay=WEIGHT_DECAY)
    for step in range(2):  # the first step allocates buffers, the second reuses them
        for p, g in zip(params, random_gradients(params, step)):
            p.grad = g
        with forbid_host_sync():
            optimizer.step()


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        (dict(lr=-0.1), "lr"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, eta=0.0), "eta"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_out_of_range_settings_fail_at_construction(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        LARS([torch.nn.Parameter(torch.ones(2, 2))], **kwargs)
