"""TrainStep against a hand-written BYOL loop, on CPU (eager) and on CUDA (captured graph)."""

import copy

import pytest
import torch

from byol_fast import BYOL, LARS
from byol_fast.step import TrainStep

SIZE, BATCH = 32, 8


def make_pair(device="cpu"):
    torch.manual_seed(0)
    learner = BYOL("resnet18", image_size=SIZE, projection_hidden_size=64, prediction_hidden_size=64).to(device)
    optimizer = LARS(learner.trainable_parameters(), lr=0.2, weight_decay=1e-5)
    return learner, optimizer


def batches(n, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(BATCH, 3, SIZE, SIZE, generator=generator).to(device, dtype) for _ in range(2))
            for _ in range(n)]


def reference_steps(learner, optimizer, data, accumulation_steps=1):
    """The BYOL step written plainly: what TrainStep must reproduce."""
    losses = []
    micro = BATCH // accumulation_steps
    for view1, view2 in data:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, BATCH, micro):
            loss = learner(view1[start:start + micro], view2[start:start + micro])
            (loss / accumulation_steps).backward()
            total += loss.item() / accumulation_steps
        optimizer.step()
        learner.update_target()
        losses.append(total)
    return losses


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_eager_step_matches_reference_loop(accumulation_steps):
    learner, optimizer = make_pair()
    ref_learner, ref_optimizer = copy.deepcopy(learner), None
    ref_optimizer = LARS(ref_learner.trainable_parameters(), lr=0.2, weight_decay=1e-5)
    data = batches(3)
    step = TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="cpu", precision="fp32",
                     channels_last=False, accumulation_steps=accumulation_steps)
    for view1, view2 in data:
        step(view1, view2)
    losses = reference_steps(ref_learner, ref_optimizer, data, accumulation_steps)
    metrics = step.read_metrics()
    assert metrics["steps"] == 3 and metrics["first_nonfinite_step"] is None
    assert metrics["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    for p, q in zip(learner.state_dict().values(), ref_learner.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert step.read_metrics()["steps"] == 0, "reading resets the accumulators"


def test_first_nonfinite_step_is_named():
    learner, optimizer = make_pair()
    step = TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="cpu", precision="fp32")
    data = batches(4)
    data[2][0][0, 0, 0, 0] = float("nan")
    for view1, view2 in data:
        step(view1, view2)
    assert step.read_metrics()["first_nonfinite_step"] == 2


def test_eager_step_makes_no_host_sync(forbid_host_sync):
    learner, optimizer = make_pair()
    step = TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="cpu", precision="fp32")
    view1, view2 = batches(1)[0]
    assert not step.warm
    step(view1, view2)  # first step allocates optimizer state
    assert step.warm  # eager: the one-off work is the first call's
    with forbid_host_sync():
        step(view1, view2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cuda_graph=True), "pass --no-cuda-graph"),
        (dict(precision="fp8"), "precision='fp8'"),
        (dict(accumulation_steps=3), "accumulation_steps=3"),
    ],
)
def test_impossible_settings_fail_at_construction(kwargs, message):
    learner, optimizer = make_pair()
    with pytest.raises(ValueError, match=message):
        TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="cpu", **kwargs)


def test_optimizer_on_another_device_is_refused():
    learner, optimizer = make_pair()
    with pytest.raises(ValueError, match="move the learner"):
        TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="meta")


def test_another_spelling_of_the_learners_device_is_accepted():
    # Parameters report "cpu" / "cuda:0"; "cpu:0" / "cuda" name the same devices (cuda: tested below).
    learner, optimizer = make_pair()
    step = TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="cpu:0", precision="fp32")
    assert step.device == torch.device("cpu") and step.inputs[0].device == step.device


@pytest.mark.cuda
def test_captured_step_equals_eager_step_over_ten_steps():
    data = batches(10, "cuda", torch.bfloat16)
    results = []
    for cuda_graph in (False, True):
        learner, optimizer = make_pair("cuda")
        step = TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="cuda",
                         precision="bf16", cuda_graph=cuda_graph, warmup_steps=3)
        for k, (view1, view2) in enumerate(data):
            optimizer.param_groups[0]["lr"].fill_(0.05 * (k + 1))  # lr changes every step: no recapture
            if cuda_graph and k >= 4:
                with sync_debug_error():
                    step(view1, view2)
            else:
                step(view1, view2)
            assert step.warm == (k >= 3 if cuda_graph else True)  # warm once captured (the 4th call)
        torch.cuda.synchronize()
        results.append((step.read_metrics(), [p.detach().float().clone() for p in learner.parameters()]))
        if cuda_graph:
            assert step._graph is not None, "the step must have been captured"
    (eager_metrics, eager_params), (graph_metrics, graph_params) = results
    assert graph_metrics["steps"] == eager_metrics["steps"] == 10
    assert graph_metrics["loss"] == pytest.approx(eager_metrics["loss"], rel=2e-2)
    worst = max(((g - e).norm() / e.norm().clamp_min(1e-12)).item() for g, e in zip(graph_params, eager_params))
    assert worst < 2e-2, f"captured and eager parameters differ by {worst:.3e} (relative)"


class sync_debug_error:
    """torch.cuda.set_sync_debug_mode("error") for the duration of a block."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


def test_fp16_overflow_skips_the_optimizer_and_the_ema_and_the_loss_scale_is_checkpointed():
    learner, optimizer = make_pair()
    step = TrainStep(learner, optimizer, batch_size=BATCH, image_size=SIZE, device="cpu", precision="fp16",
                     channels_last=False)
    good, bad = batches(2)
    for _ in range(20):  # the first steps may overflow at the initial scale (65536) and be skipped
        step(*good)
        if "momentum_buffer" in optimizer.state[learner.trainable_parameters()[0]]:
            break
    weights = {name: p.detach().clone() for name, p in learner.named_parameters()}  # online and target
    assert any(name.startswith("target") for name in weights)
    momenta = [optimizer.state[p]["momentum_buffer"].clone() for p in learner.trainable_parameters()]
    state = step.state_dict()
    scale = state["grad_scaler"]["scale"] = 2.0 ** 40  # scaled fp16 gradients overflow to inf
    step.load_state_dict(state)
    step(*bad)  # the scaler finds inf gradients and skips the optimizer step
    for name, tensor in learner.named_parameters():
        assert torch.equal(tensor, weights[name]), name  # the target did not move either
    for p, momentum in zip(learner.trainable_parameters(), momenta):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum)
    state = step.state_dict()
    assert state["grad_scaler"]["scale"] == scale / 2
    fresh_learner, fresh_optimizer = make_pair()
    resumed = TrainStep(fresh_learner, fresh_optimizer, batch_size=BATCH, image_size=SIZE, device="cpu",
                        precision="fp16", channels_last=False)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a resume goes on at the reduced scale, not at 65536 again
