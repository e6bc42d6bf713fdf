"""The BYOL learner: loss, gradient flow, target EMA, initialisation, small stem, export, construction errors."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from byol_fast import BYOL, LARS, CosineTau, WarmupCosineLR, ema_update_
from byol_fast.model import build_encoder, regression_loss

SIZE = 32


def small_learner(**kwargs) -> BYOL:
    return BYOL("resnet18", image_size=SIZE, projection_hidden_size=128, prediction_hidden_size=128, **kwargs)


def test_loss_equals_reference_formula():
    learner = small_learner()
    view1, view2 = torch.randn(6, 3, SIZE, SIZE), torch.randn(6, 3, SIZE, SIZE)
    loss = learner(view1, view2)
    # Reference in float64 from the same sub-networks' outputs.
    with torch.no_grad():
        p1 = learner.online_predictor(learner.online_projector(learner.online_encoder(view1))).double()
        p2 = learner.online_predictor(learner.online_projector(learner.online_encoder(view2))).double()
        z1 = learner.target_projector(learner.target_encoder(view1)).double()
        z2 = learner.target_projector(learner.target_encoder(view2)).double()
    reference = ((2 - 2 * F.cosine_similarity(p1, z2)) + (2 - 2 * F.cosine_similarity(p2, z1))).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_regression_loss_bounds():
    x = torch.randn(5, 8)
    torch.testing.assert_close(regression_loss(x, 3 * x), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(regression_loss(x, -x), torch.full((5,), 4.0))


RESIDUAL_BRANCH = re.compile(r"layer\d\.\d+\.(conv1|bn1|conv2)\.")
"""A BasicBlock's layers before its last BatchNorm: muted at the official init, whose zero scale stops the
gradient there (the scale's own gradient is not zero, so the first step brings the branch in)."""


@pytest.mark.parametrize("init", ["official", "torchvision"])
def test_gradients_reach_only_the_online_network(init):
    learner = small_learner(init=init)
    learner(torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE)).backward()
    assert all(p.grad is None for p in learner.target_encoder.parameters())
    assert all(p.grad is None for p in learner.target_projector.parameters())
    trainable = learner.trainable_parameters()
    assert all(p.grad is not None for p in trainable)
    names = {id(p): name for name, p in learner.named_parameters()}
    silent = {names[id(p)] for p in trainable if p.grad.abs().sum() == 0}
    muted = {names[id(p)] for p in trainable if RESIDUAL_BRANCH.search(names[id(p)])}
    assert silent == (muted if init == "official" else set())
    assert len(muted) == 4 * 8  # resnet18: eight BasicBlocks
    # The ResNet classifier head sits after avgpool: no gradient, so not trainable.
    fc = learner.online_encoder.net.fc
    assert fc.weight.grad is None and all(fc.weight is not p for p in trainable)


def test_target_starts_equal_and_follows_the_ema():
    learner = small_learner(tau=0.9)
    target, online = learner.ema_pairs()
    assert all(torch.equal(t, o) for t, o in zip(target, online))
    before = [t.clone() for t in target]
    with torch.no_grad():
        for o in online:
            o.add_(torch.randn_like(o))
    learner.update_target()
    for t, t0, o in zip(target, before, online):
        torch.testing.assert_close(t, torch.lerp(t0, o, 0.1), rtol=1e-6, atol=1e-6)


def test_ema_equals_float64_lerp():
    target = [torch.randn(64, 32), torch.randn(7), torch.randn(3, 3, 3, 3)]
    online = [torch.randn_like(t) for t in target]
    tau = torch.tensor(0.996)
    expected = [torch.lerp(t.double(), o.double(), 1 - 0.996) for t, o in zip(target, online)]
    ema_update_(target, online, tau)
    for t, e in zip(target, expected):
        assert ((t.double() - e).norm() / e.norm()).item() < 1e-6


def test_ema_and_step_make_no_host_sync(forbid_host_sync):
    learner = small_learner()
    with forbid_host_sync():
        learner.update_target()


def test_lr_schedule_end_points_and_warmup_shape():
    schedule = WarmupCosineLR(peak_lr=4.8, total_steps=1000, warmup_steps=100)
    assert schedule(0) == 0.0
    assert schedule(50) == pytest.approx(2.4)
    assert schedule(100) == pytest.approx(4.8)
    assert schedule(550) == pytest.approx(2.4)
    assert schedule(1000) == pytest.approx(0.0, abs=1e-12)
    warmup = [schedule(k) for k in range(101)]
    assert all(b - a == pytest.approx(0.048) for a, b in zip(warmup, warmup[1:]))
    assert all(schedule(k) >= schedule(k + 1) for k in range(100, 1000))


def test_tau_schedule_end_points():
    schedule = CosineTau(tau_base=0.996, total_steps=500)
    assert schedule(0) == pytest.approx(0.996)
    assert schedule(250) == pytest.approx(1 - 0.004 / 2)
    assert schedule(500) == pytest.approx(1.0)
    assert schedule(125) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


@pytest.mark.parametrize("kwargs", [dict(peak_lr=1, total_steps=10, warmup_steps=11),
                                    dict(peak_lr=-1, total_steps=10, warmup_steps=1),
                                    dict(peak_lr=1, total_steps=0, warmup_steps=0)])
def test_bad_lr_schedules_are_refused(kwargs):
    with pytest.raises(ValueError):
        WarmupCosineLR(**kwargs)


def test_thirty_steps_lower_the_loss():
    torch.manual_seed(0)
    learner = small_learner(tau=0.99)
    optimizer = LARS(learner.trainable_parameters(), lr=0.5, weight_decay=1e-6)
    images = torch.rand(8, 3, SIZE, SIZE)
    losses = []
    for _ in range(30):
        view1 = images + 0.1 * torch.randn_like(images)
        view2 = images.flip(-1) + 0.1 * torch.randn_like(images)
        loss = learner(view1, view2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_target()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, f"loss went from {first:.3f} to {last:.3f}"


def test_official_init_zeroes_each_blocks_last_scale_and_the_heads_final_bias():
    torch.manual_seed(0)
    official = small_learner(init="official")
    torch.manual_seed(0)
    default = small_learner(init="torchvision")
    assert official.online_predictor[3].bias is None and default.online_predictor[3].bias is not None
    # The target starts as a copy of the online pair, bias-free too.
    assert official.online_projector[3].bias is None and official.target_projector[3].bias is None
    # Same seed, same draws up to the heads' last Linear: everything but the residual blocks' last scale is
    # torchvision's init (the predictor is drawn after the missing bias, so only its shape is compared).
    theirs = default.online_encoder.net.state_dict()
    zeroed = {f"{name}.bn2.weight" for name, module in official.online_encoder.net.named_modules()
              if isinstance(module, torchvision.models.resnet.BasicBlock)}
    assert len(zeroed) == 8
    for name, tensor in official.online_encoder.net.state_dict().items():
        if name in zeroed:
            assert torch.equal(tensor, torch.zeros_like(tensor)) and torch.equal(theirs[name], torch.ones_like(tensor))
        else:
            assert torch.equal(tensor, theirs[name]), name
    for ours, default_layer in zip(official.online_projector, default.online_projector):
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), default_layer.parameters()))
    assert [p.shape for p in official.online_predictor.parameters()] == \
        [p.shape for name, p in default.online_predictor.named_parameters() if name != "3.bias"]
    # Bottleneck ResNets zero bn3, their last BatchNorm, and nothing else.
    resnet50 = build_encoder("resnet50", zero_init_residual=True)
    blocks = [m for m in resnet50.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 16 and all(not b.bn3.weight.any() and b.bn2.weight.all() for b in blocks)
    assert build_encoder("resnet50").layer1[0].bn3.weight.all()


def test_official_init_trains():
    """A step moves the zeroed scales off zero, so the muted branches get gradients at the next; loss finite."""
    torch.manual_seed(0)
    learner = small_learner()
    optimizer = LARS(learner.trainable_parameters(), lr=0.5, weight_decay=0.0)
    params = dict(learner.online_encoder.net.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    losses = []
    for _ in range(2):
        loss = learner(torch.rand(8, 3, SIZE, SIZE), torch.rand(8, 3, SIZE, SIZE))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_target()
        losses.append(loss.item())
        if len(losses) == 1:
            assert all(params[f"layer{i}.{j}.bn2.weight"].abs().min() > 0 for i in range(1, 5) for j in range(2))
    assert all(math.isfinite(v) for v in losses)
    changed = {name for name, p in params.items() if not torch.equal(p, before[name])}
    assert changed == set(params) - {"fc.weight", "fc.bias"}  # fc sits after avgpool: not trained


def test_small_stem_keeps_small_images_large_and_loads_into_torchvision_with_the_stem_swapped():
    learner = small_learner(small_stem=True)
    net = learner.online_encoder.net
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.padding) == ((3, 3), (1, 1), (2, 2))
    assert isinstance(net.maxpool, nn.Identity)
    captured = []
    net.layer1.register_forward_hook(lambda module, inputs, output: captured.append(output.shape[-1]))
    net(torch.randn(1, 3, SIZE, SIZE))
    assert captured == [SIZE + 2]  # solo-learn's padding 2; torchvision's stem would give SIZE / 4
    with torch.no_grad():
        for p in learner.online_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with pytest.raises(RuntimeError, match=r"size mismatch for conv1\.weight"):
        torchvision.models.resnet18().load_state_dict(learner.encoder_state_dict(), strict=True)
    # What an export's user does (byol_fast.model.SMALL_STEM), and the helper that does it.
    by_hand = torchvision.models.resnet18()
    by_hand.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    by_hand.maxpool = nn.Identity()
    images = torch.randn(3, 3, SIZE, SIZE)
    learner.eval()
    for plain in (by_hand, build_encoder("resnet18", small_stem=True)):
        plain.load_state_dict(learner.encoder_state_dict(), strict=True)
        plain.fc = nn.Identity()
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(images), learner.online_encoder(images))


def test_encoder_state_dict_loads_strictly_and_gives_same_features():
    learner = small_learner()
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in learner.online_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = torchvision.models.resnet18()
    plain.load_state_dict(learner.encoder_state_dict(), strict=True)
    plain.fc = nn.Identity()
    plain.eval()
    learner.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), learner.online_encoder(images))


def test_custom_module_with_index_and_own_output():
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    by_index = BYOL(net(), image_size=16, hidden_layer=-2, projection_hidden_size=32, prediction_hidden_size=32)
    assert by_index.online_projector[0].in_features == 8
    own_output = BYOL(net(), image_size=16, hidden_layer=None, projection_hidden_size=32, prediction_hidden_size=32)
    assert own_output.online_projector[0].in_features == 4


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 7)
        self.unused = nn.Linear(4, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x))


@pytest.mark.parametrize(
    "net, kwargs, message",
    [
        ("resnet9000", {}, "unknown encoder 'resnet9000'"),
        ("resnet18", dict(hidden_layer="avg_pool"), "not a module of the encoder"),
        ("resnet18", dict(hidden_layer=12), "out of range"),
        (TwoBranch(), dict(hidden_layer="unused", image_size=16), "did not run"),
        (TwoBranch(), dict(hidden_layer="pool", image_size=4), "cannot take 4x4 images"),
        ("resnet18", dict(image_size=0), "image_size=0"),
        ("resnet18", dict(projection_size=-3), "projection_size"),
        ("resnet18", dict(tau=1.5), "tau=1.5"),
        ("resnet18", dict(init="tf"), "init='tf' is not an initialisation: use one of official, torchvision"),
        (TwoBranch(), dict(small_stem=True, hidden_layer="pool"), "small_stem=True needs an encoder name"),
        (42, {}, "nn.Module"),
    ],
)
def test_bad_construction_fails_with_a_named_fix(net, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BYOL(net, **{"image_size": SIZE, **kwargs})
