"""`byol-fast export`: strict torchvision load, identical features, metadata, and clear errors."""

import json

import pytest
import torch
import torchvision
from torch import nn

from byol_fast import BYOL, LARS
from byol_fast.checkpoint import CheckpointManager
from byol_fast.evaluate import load_encoder
from byol_fast.export import EncoderMismatchError, check_encoder_fits, export_encoder, main

SIZE = 32


def trained_learner() -> tuple[BYOL, LARS]:
    """A resnet18 learner after one real step, so weights and BatchNorm statistics are no longer at init."""
    learner = BYOL("resnet18", image_size=SIZE, projection_hidden_size=64, prediction_hidden_size=64)
    optimizer = LARS(learner.trainable_parameters(), lr=0.5)
    loss = learner(torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE))
    loss.backward()
    optimizer.step()
    learner.update_target()
    return learner, optimizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    learner, optimizer = trained_learner()
    config = {"arch": "resnet18", "image_size": SIZE, "base_lr": 0.2, "epochs": 3}
    path = CheckpointManager(root).save(7, {"model": learner.state_dict(), "optimizer": optimizer.state_dict(),
                                            "meta": {"arch": "resnet18", "image_size": SIZE}, "config": config})
    (root / "provenance.json").write_text(json.dumps({"git": {"sha": "0123abcd", "dirty": False}}))
    return learner, path, config


def test_export_loads_strictly_and_gives_the_trainers_features(run, tmp_path):
    learner, checkpoint, config = run
    output = tmp_path / "encoder.pt"
    assert main([str(checkpoint), str(output)]) == 0
    state = torch.load(output, weights_only=True)
    net = torchvision.models.resnet18()
    net.load_state_dict(state, strict=True)
    net.fc = nn.Identity()
    net.eval()
    learner.online_encoder.eval()
    images = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(net(images), learner.online_encoder(images))
    # BatchNorm running statistics travel too (they moved away from 0/1 during the step).
    assert not torch.equal(state["bn1.running_mean"], torch.zeros(64))
    assert torch.equal(state["bn1.running_mean"], learner.online_encoder.net.bn1.running_mean)

    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["arch"] == "resnet18" and metadata["image_size"] == SIZE and metadata["step"] == 7
    assert metadata["git"] == {"sha": "0123abcd", "dirty": False}
    assert metadata["config"] == config
    assert metadata["mean"] == [0.485, 0.456, 0.406]
    assert not list(tmp_path.glob(".*.tmp")), "temp files must be renamed or removed"


def test_export_encoder_matches_learner_and_strips_wrappers(run):
    learner = run[0]
    reference = learner.encoder_state_dict()
    for prefix in ("", "module.", "_orig_mod."):
        exported = export_encoder({prefix + key: value for key, value in learner.state_dict().items()})
        assert exported.keys() == reference.keys()
        assert all(torch.equal(exported[key], reference[key]) for key in reference)


def test_wrong_arch_names_differences_and_writes_nothing(run, tmp_path, capsys):
    output = tmp_path / "encoder.pt"
    assert main([str(run[1]), str(output), "--arch", "resnet50"]) == 2
    message = capsys.readouterr().err
    assert "do not fit torchvision resnet50" in message
    assert "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in message
    assert "missing key(s): layer1.0.bn3.bias" in message
    assert "They fit resnet18: pass --arch resnet18" in message
    assert not output.exists() and not output.with_suffix(".json").exists()


def test_mismatch_reports_closest_arch_when_none_fits():
    state = torchvision.models.resnet34().state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    state["fc.bias"] = torch.zeros(10)
    with pytest.raises(EncoderMismatchError, match=r"fc\.weight \(10, 512\) vs \(1000, 512\).*closest is resnet34"):
        check_encoder_fits(state, "resnet34")


def test_state_without_encoder_and_corrupt_checkpoint(tmp_path, capsys):
    with pytest.raises(EncoderMismatchError, match="no 'online_encoder.net.\\*' keys"):
        export_encoder({"conv1.weight": torch.zeros(1)})
    bad = tmp_path / "checkpoints" / "step_00000001.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    assert main([str(bad), str(tmp_path / "out.pt")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_eval_reads_the_checkpoint_it_names(run):
    learner, checkpoint, _ = run
    encoder, info = load_encoder(None, checkpoint=str(checkpoint))
    assert info == {"arch": "resnet18", "image_size": SIZE, "source": str(checkpoint), "step": 7}
    images = torch.randn(3, 3, SIZE, SIZE)
    learner.online_encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder.eval()(images), learner.online_encoder(images))
