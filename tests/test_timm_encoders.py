"""timm encoders from the command line (`--arch timm/<name>`): validated before any work; the representation is
timm's pooled features; a tiny ViT with AdamW and a small ConvNeXt with LARS train, resume, export (loading
strictly into timm.create_model) and evaluate on the CPU; on a GPU the captured step equals the eager one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from byol_fast import BYOL, train
from byol_fast import evaluate as evaluate_cli
from byol_fast import export as export_cli
from byol_fast import timm_encoders
from byol_fast.optimizers import build_optimizer
from byol_fast.step import TrainStep
from pipelines.synthetic import make_synthetic
from run_helpers import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
timm = pytest.importorskip("timm", reason="the timm extra is not installed: pip install 'byol-fast[timm]'")

SIZE = 32
# 24 images, global batch 8: 3 steps per epoch, 6 in all; checkpoints at 2, 4 and 6.
COMMON = ["--image-size", str(SIZE), "--global-batch", "8", "--epochs", "2", "--warmup-epochs", "1",
          "--projection-hidden-size", "64", "--prediction-hidden-size", "64", "--workers", "0", "--no-tensorboard",
          "--device", "cpu", "--data-backend", "torchvision", "--log-every", "1", "--checkpoint-every", "2",
          "--knn-every-epochs", "0"]
VIT = ["--arch", "timm/test_vit", "--optimizer", "adamw", "--base-lr", "1e-3", "--weight-decay", "0.05",
       "--beta2", "0.95"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, images=36, classes=4, val_fraction=1 / 3)
    return root


@pytest.fixture(scope="module")
def vit_run(data: Path, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run of a tiny ViT with AdamW: its run folder."""
    run_dir = tmp_path_factory.mktemp("vit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(COMMON + VIT + ["--data", str(data / "train"), "--run-dir", str(run_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "step_00000006.pt", weights_only=False)


# ---- names are checked before any work -----------------------------------------------------------

def test_an_unknown_timm_name_gets_the_closest_names(data, tmp_path, capsys):
    args = COMMON + ["--arch", "timm/vit_smal_patch16_224", "--data", str(data / "train"), "--run-dir", str(tmp_path)]
    assert train.main(args) == 2
    error = capsys.readouterr().err
    assert "has no model 'vit_smal_patch16_224'; did you mean timm/vit_small_patch16_224" in error
    assert not (tmp_path / "checkpoints").exists()


def test_a_bare_timm_name_and_a_missing_timm_name_the_fix(data, tmp_path, capsys, monkeypatch):
    args = COMMON + ["--data", str(data / "train"), "--run-dir", str(tmp_path)]
    assert train.main(args + ["--arch", "convnext_tiny"]) == 2
    assert "(timm has it: --arch timm/convnext_tiny)" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    assert train.main(args + ["--arch", "timm/convnext_tiny"]) == 2
    assert "needs timm, which is not installed: pip install 'byol-fast[timm]'" in capsys.readouterr().err


def test_small_stem_and_a_lars_rate_for_adamw_are_refused(data, tmp_path, capsys):
    args = COMMON + ["--data", str(data / "train"), "--run-dir", str(tmp_path)]
    assert train.main(args + ["--arch", "timm/test_convnext", "--small-stem"]) == 2
    assert "small_stem=true applies to torchvision ResNets, not timm/test_convnext" in capsys.readouterr().err
    assert train.main(args + ["--arch", "timm/test_vit", "--optimizer", "adamw", "--base-lr", "0.2"]) == 2
    assert "base_lr=0.2 is a LARS rate; AdamW diverges there: pass --base-lr 3e-4" in capsys.readouterr().err


# ---- the model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_resnet"])
def test_the_representation_is_timms_pooled_features(name):
    learner = BYOL(f"timm/{name}", image_size=SIZE, projection_hidden_size=32, prediction_hidden_size=32).eval()
    net = learner.online_encoder.net
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = net.forward_head(net.forward_features(images), pre_logits=True)
        representation = learner.online_encoder(images)
        channels_last = learner.to(memory_format=torch.channels_last).online_encoder(
            images.contiguous(memory_format=torch.channels_last))
    assert representation.shape == (3, net.num_features) and learner.online_projector[0].in_features == net.num_features
    torch.testing.assert_close(representation, expected, rtol=0, atol=0)
    torch.testing.assert_close(channels_last, expected, rtol=1e-4, atol=1e-5)
    assert not learner._unused_encoder_parameters  # no classifier: every parameter is trained


def test_a_vit_is_built_for_the_image_size_and_bf16_autocast_stays_close_to_fp32():
    learner = BYOL("timm/test_vit", image_size=SIZE, projection_hidden_size=32, prediction_hidden_size=32)
    assert learner.online_encoder.net.pos_embed.shape[1] == (SIZE // 16) ** 2 + 1  # 2x2 patches and the class token
    assert timm_encoders.create_call("timm/test_vit", SIZE) == "timm.create_model('test_vit', num_classes=0, img_size=32)"
    assert timm_encoders.create_call("timm/test_convnext", SIZE) == "timm.create_model('test_convnext', num_classes=0)"
    views = torch.randn(2, 8, 3, SIZE, SIZE)
    with torch.no_grad():
        fp32 = learner(*views)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = learner(*views)
    assert abs(bf16.item() - fp32.item()) < 0.05  # the loss is a sum of two cosines: bf16 keeps ~3 digits


# ---- train, resume, export, eval -----------------------------------------------------------------

def test_a_vit_with_adamw_trains_and_records_its_optimizer(vit_run):
    state = final_checkpoint(vit_run)
    assert state["meta"]["arch"] == "timm/test_vit" and state["meta"]["optimizer"] == "adamw"
    assert state["meta"]["beta2"] == 0.95
    assert state["optimizer"]["param_groups"][0]["step"].item() == 6
    exp_avg_sq = [entry["exp_avg_sq"] for entry in state["optimizer"]["state"].values()]
    assert exp_avg_sq and all(torch.isfinite(v).all() and v.sum() > 0 for v in exp_avg_sq)


def test_a_vit_run_stopped_and_resumed_ends_where_an_uninterrupted_one_does(vit_run, data, tmp_path):
    args = COMMON + VIT + ["--data", str(data / "train"), "--run-dir", str(tmp_path)]
    assert train.main(args + ["--max-steps", "4"]) == 0
    assert train.main(args) == 0  # --resume auto: from step 4
    resumed, expected = final_checkpoint(tmp_path), final_checkpoint(vit_run)
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for key, entry in expected["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["optimizer"]["state"][key][moment], entry[moment]), (key, moment)


def test_resuming_with_another_optimizer_is_refused_naming_it(vit_run, data, tmp_path, capsys):
    checkpoint = vit_run / "checkpoints" / "step_00000006.pt"
    args = COMMON + ["--arch", "timm/test_vit", "--base-lr", "1e-3", "--weight-decay", "0.05", "--beta2", "0.95",
                     "--data", str(data / "train"), "--run-dir", str(tmp_path), "--resume", str(checkpoint)]
    assert train.main(args + ["--optimizer", "lars"]) == 2
    assert "optimizer: checkpoint 'adamw', current 'lars'" in capsys.readouterr().err


def test_the_exported_vit_loads_strictly_into_timm_and_gives_the_trainers_features(vit_run, data, tmp_path,
                                                                                    capsys):
    output = tmp_path / "vit.pt"
    assert export_cli.main([str(vit_run / "checkpoints" / "step_00000006.pt"), str(output)]) == 0
    metadata = export_cli.exported_metadata(output)
    assert metadata["format"].startswith("timm.create_model('test_vit', num_classes=0, img_size=32) state_dict")
    assert metadata["exported_with"]["timm"] == timm.__version__
    model = timm.create_model("test_vit", num_classes=0, img_size=SIZE)
    model.load_state_dict(torch.load(output, weights_only=True), strict=True)
    learner = BYOL("timm/test_vit", image_size=SIZE, projection_hidden_size=64, prediction_hidden_size=64)
    learner.load_state_dict(final_checkpoint(vit_run)["model"])
    images = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), learner.eval().online_encoder(images), rtol=0, atol=0)
    # eval reads the checkpoint and the export alike: the same features, the same kNN top-1.
    results = []
    for source in (["--checkpoint", str(vit_run / "checkpoints" / "step_00000006.pt")], ["--weights", str(output)]):
        result = tmp_path / f"knn{len(results)}.json"
        assert evaluate_cli.main(["knn", *source, "--data", str(data), "--workers", "0", "--device", "cpu",
                                  "--output", str(result)]) == 0
        results.append(json.loads(result.read_text()))
    assert results[0]["arch"] == results[1]["arch"] == "timm/test_vit" and results[0]["image_size"] == SIZE
    assert results[0]["top1"] == results[1]["top1"]


def test_a_convnext_with_lars_trains_exports_and_evaluates(data, tmp_path):
    run_dir = tmp_path / "run"
    args = COMMON + ["--arch", "timm/test_convnext", "--data", str(data / "train"), "--run-dir", str(run_dir)]
    assert train.main(args + ["--max-steps", "2"]) == 0
    state = torch.load(run_dir / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert state["meta"]["optimizer"] == "lars" and "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))
    output = tmp_path / "convnext.pt"
    assert export_cli.main([str(run_dir / "checkpoints" / "step_00000002.pt"), str(output)]) == 0
    model = timm.create_model("test_convnext", num_classes=0)
    model.load_state_dict(torch.load(output, weights_only=True), strict=True)
    assert evaluate_cli.main(["linear", "--weights", str(output), "--data", str(data), "--mode", "logreg",
                              "--workers", "0", "--device", "cpu"]) == 0
    # A checkpoint written before optimizers were a setting records none: it was LARS, and resumes as such.
    legacy_dir = tmp_path / "legacy"
    for key in ("optimizer", "beta1", "beta2"):
        del state["meta"][key]
    (legacy_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, legacy_dir / "checkpoints" / "step_00000002.pt")
    legacy = COMMON + ["--arch", "timm/test_convnext", "--data", str(data / "train"), "--run-dir", str(legacy_dir)]
    assert train.main(legacy + ["--max-steps", "3", "--optimizer", "adamw", "--base-lr", "3e-4"]) == 2
    assert train.main(legacy + ["--max-steps", "3"]) == 0
    assert torch.load(legacy_dir / "checkpoints" / "step_00000003.pt", weights_only=False)["meta"]["optimizer"] == "lars"


# ---- the captured step ---------------------------------------------------------------------------

@pytest.mark.cuda
def test_captured_vit_step_with_adamw_equals_the_eager_step():
    torch.manual_seed(0)
    views = [torch.randn(2, 16, 3, SIZE, SIZE, device="cuda").to(torch.bfloat16) for _ in range(8)]
    results = []
    for cuda_graph in (False, True):
        torch.manual_seed(0)
        learner = BYOL("timm/test_vit", image_size=SIZE, projection_hidden_size=64,
                       prediction_hidden_size=64).cuda()
        optimizer = build_optimizer("adamw", learner, learner.trainable_parameters(), weight_decay=0.05)
        step = TrainStep(learner, optimizer, batch_size=16, image_size=SIZE, device="cuda", precision="bf16",
                         cuda_graph=cuda_graph, warmup_steps=3)
        for k, (view1, view2) in enumerate(views):
            optimizer.param_groups[0]["lr"].fill_(1e-4 * (k + 1))  # lr changes every step: no recapture
            step(view1, view2)
        torch.cuda.synchronize()
        results.append((step.read_metrics(), [p.detach().float().clone() for p in learner.parameters()]))
    (eager_metrics, eager), (graph_metrics, graph) = results
    assert graph_metrics["loss"] == pytest.approx(eager_metrics["loss"], rel=2e-2)
    worst = max(((g - e).norm() / e.norm().clamp_min(1e-12)).item() for g, e in zip(graph, eager))
    assert worst < 2e-2, f"captured and eager parameters differ by {worst:.3e} (relative)"
