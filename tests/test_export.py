"""`byol-fast export`: strict torchvision load, identical features, metadata, and clear errors."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from byol_fast import BYOL, LARS
from byol_fast.checkpoint import CheckpointError, CheckpointManager
from byol_fast.evaluate import load_encoder
from byol_fast.export import EncoderMismatchError, check_encoder_fits, export_encoder, main, read_encoder_weights
from byol_fast.model import SMALL_STEM, build_encoder
from byol_fast.run_log import provenance

SIZE = 32


def trained_learner(small_stem: bool = False) -> tuple[BYOL, LARS]:
    """A resnet18 learner (official init) after one real step, so weights and BatchNorm statistics are no longer
    at init."""
    learner = BYOL("resnet18", image_size=SIZE, projection_hidden_size=64, prediction_hidden_size=64,
                   small_stem=small_stem)
    optimizer = LARS(learner.trainable_parameters(), lr=0.5)
    loss = learner(torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, SIZE, SIZE))
    loss.backward()
    optimizer.step()
    learner.update_target()
    return learner, optimizer


# The attempt that wrote the checkpoint vs the run's latest attempt (run_dir/provenance.json): they differ.
WRITER_GIT = {"sha": "c0ffee12", "dirty": False}
LATEST_GIT = {"sha": "0123abcd", "dirty": True}


def checkpoint_state(learner: BYOL, optimizer: LARS, config: dict) -> dict:
    return {"model": learner.state_dict(), "optimizer": optimizer.state_dict(),
            "meta": {"arch": "resnet18", "image_size": SIZE}, "config": config}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(learner, checkpoint carrying the provenance of the attempt that wrote it, config)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    learner, optimizer = trained_learner()
    config = {"arch": "resnet18", "image_size": SIZE, "base_lr": 0.2, "epochs": 3}
    CheckpointManager(root).save(3, checkpoint_state(learner, optimizer, config))  # older: never the example
    writer = {**provenance(), "git": WRITER_GIT}  # the real record, so it must survive the safe load
    path = CheckpointManager(root).save(7, {**checkpoint_state(learner, optimizer, config), "provenance": writer})
    (root / "provenance.json").write_text(json.dumps({"git": LATEST_GIT, "torch": "9.9"}))
    return learner, path, config


@pytest.fixture(scope="module")
def old_checkpoint(run, tmp_path_factory):
    """A checkpoint written before checkpoints carried their provenance, in a run whose latest attempt differs."""
    learner, _, config = run
    root = tmp_path_factory.mktemp("old_run")
    optimizer = LARS(learner.trainable_parameters(), lr=0.5)
    path = CheckpointManager(root).save(5, checkpoint_state(learner, optimizer, config))
    (root / "provenance.json").write_text(json.dumps({"git": LATEST_GIT, "torch": "9.9"}))
    return path


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The encoder file `byol-fast export` writes for `run`'s checkpoint."""
    output = tmp_path_factory.mktemp("exported") / "encoder.pt"
    assert main([str(run[1]), str(output)]) == 0
    return output


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in."""
    if os.geteuid() == 0:
        return Path("/sys")  # root ignores folder modes; sysfs takes no new files even from root
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    return folder


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
    # Provenance of the attempt that wrote the checkpoint, not of the run's latest attempt.
    assert metadata["git"] == WRITER_GIT
    assert metadata["provenance"]["git"] == WRITER_GIT and metadata["provenance"]["torch"] == str(torch.__version__)
    assert "devices" in metadata["provenance"]
    assert metadata["provenance_source"].startswith("checkpoint")
    assert metadata["exported_with"] == {"torch": str(torch.__version__), "torchvision": torchvision.__version__}
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


def test_eval_of_exported_weights_takes_arch_and_training_size_from_the_exports_json(exported, tmp_path):
    encoder, info = load_encoder(None, weights=str(exported))  # a resnet18 trained at 32 px
    assert info == {"arch": "resnet18", "image_size": SIZE, "source": str(exported)}
    bare = tmp_path / "bare.pt"  # the same weights without their .json: nothing records arch or size
    bare.write_bytes(exported.read_bytes())
    assert load_encoder("resnet18", weights=str(bare))[1]["image_size"] is None
    with pytest.raises(EncoderMismatchError, match="resnet50"):
        load_encoder(None, weights=str(bare))


def test_checkpoint_without_provenance_falls_back_to_the_runs_labelled(old_checkpoint, tmp_path):
    output = tmp_path / "encoder.pt"
    assert main([str(old_checkpoint), str(output)]) == 0
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["git"] == LATEST_GIT and metadata["provenance"]["torch"] == "9.9"
    source = metadata["provenance_source"]
    assert source.startswith(str(old_checkpoint.parent.parent.resolve() / "provenance.json"))
    assert "may be a later one than the attempt that wrote this checkpoint" in source


def test_json_output_name_is_refused_before_loading(run, tmp_path, capsys):
    # A missing checkpoint proves the order: the output name is refused before the checkpoint is read.
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "encoder.json")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("byol-fast export: error: OUT ")
    assert f"would overwrite them: pass a .pt name, e.g. {tmp_path / 'encoder.pt'}" in message
    assert main([str(run[1]), str(tmp_path / "encoder.json")]) == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["missing", "a file", "unwritable", "a directory", "metadata a directory"])
def test_output_folder_is_checked_before_loading(tmp_path, capsys, case):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "taken.json").mkdir()
    output, expected = {
        "missing": (tmp_path / "no" / "encoder.pt", f"its folder {tmp_path / 'no'} does not exist: create the folder "
                                                   f"first (mkdir -p {tmp_path / 'no'})"),
        "a file": (tmp_path / "a_file" / "encoder.pt", f"its folder {tmp_path / 'a_file'} is not a folder"),
        "unwritable": (unwritable_folder(tmp_path) / "encoder.pt", "pass a path in a folder you can write to"),
        "a directory": (tmp_path / "a_dir", "is a directory: pass a file name inside it"),
        "metadata a directory": (tmp_path / "taken.pt", f"metadata file {tmp_path / 'taken.json'} is a directory"),
    }[case]
    assert main([str(tmp_path / "missing.pt"), str(output)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("byol-fast export: error: OUT") and expected in message
    assert not (tmp_path / "no").exists(), "a missing folder is reported, not created"


def test_exported_files_get_the_umask_mode_not_mkstemps_0600(run, tmp_path):
    output = tmp_path / "encoder.pt"
    previous = os.umask(0o027)
    try:
        assert main([str(run[1]), str(output)]) == 0
    finally:
        os.umask(previous)
    assert output.stat().st_mode & 0o777 == 0o640
    assert output.with_suffix(".json").stat().st_mode & 0o777 == 0o640


def test_unreadable_or_wrong_weights_files_are_named(run, exported, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(exported.read_bytes()[:100_000])
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    for path in (truncated, text):
        expected = f"cannot read weights file {path}: it is truncated, corrupt or not a torch.save file "
        with pytest.raises(EncoderMismatchError, match=re.escape(expected) + ".*Pass the OUT.pt written by"):
            read_encoder_weights(path)
    with pytest.raises(EncoderMismatchError, match="looks like a training checkpoint .*use --checkpoint for it"):
        load_encoder("resnet18", weights=str(run[1]))
    assert read_encoder_weights(exported).keys() == torchvision.models.resnet18().state_dict().keys()


def test_exported_encoder_or_folder_passed_as_checkpoint(run, exported, tmp_path, capsys):
    expected = f"{re.escape(str(exported))} is an exported encoder .*`byol-fast eval` with --weights"
    with pytest.raises(CheckpointError, match=expected):
        load_encoder(None, checkpoint=str(exported))
    assert main([str(exported), str(tmp_path / "again.pt")]) == 2
    assert "is an exported encoder" in capsys.readouterr().err
    # The example is the newest checkpoint by step number (step 7; step 3 is older).
    for folder in (run[1].parent.parent, run[1].parent):
        expected = f"checkpoint {folder} is a directory: pass a .pt file inside it, e.g. {run[1]}"
        with pytest.raises(CheckpointError, match=re.escape(expected) + "$"):
            load_encoder(None, checkpoint=str(folder))
    with pytest.raises(CheckpointError, match="is a directory: pass a .pt file inside it, none is there"):
        load_encoder(None, checkpoint=str(tmp_path))


def test_small_stem_export_says_how_to_load_it_and_eval_reads_it(tmp_path):
    torch.manual_seed(1)
    learner, optimizer = trained_learner(small_stem=True)
    config = {"arch": "resnet18", "image_size": SIZE, "small_stem": True}
    checkpoint = CheckpointManager(tmp_path / "run").save(2, checkpoint_state(learner, optimizer, config))
    output = tmp_path / "encoder.pt"
    assert main([str(checkpoint), str(output)]) == 0
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["small_stem"] is True and SMALL_STEM in metadata["format"]
    assert "build_encoder('resnet18', small_stem=True)" in metadata["format"]
    state = torch.load(output, weights_only=True)
    # The format's recipe, by hand: torchvision's resnet18 with conv1 and maxpool swapped.
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool = nn.Identity()
    net.load_state_dict(state, strict=True)
    net.fc = nn.Identity()
    images = torch.randn(3, 3, SIZE, SIZE)
    learner.online_encoder.eval()
    with torch.no_grad():
        expected = learner.online_encoder(images)
        assert torch.equal(net.eval()(images), expected)
        for source in (dict(weights=str(output)), dict(checkpoint=str(checkpoint))):  # eval reads the stem too
            assert torch.equal(load_encoder(None, **source)[0].eval()(images), expected)
    bare = tmp_path / "bare.pt"  # without its .json nothing says small_stem: the message does
    bare.write_bytes(output.read_bytes())
    with pytest.raises(EncoderMismatchError, match=r"fit resnet18 with the small stem, not with torchvision's stem: "
                                                   r"the encoder was trained with small_stem=True"):
        load_encoder("resnet18", weights=str(bare))
    check_encoder_fits(state, "resnet18", small_stem=True)
    build_encoder("resnet18", small_stem=True).load_state_dict(state, strict=True)
