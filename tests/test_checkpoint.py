"""Checkpoints: atomic writes under a simulated crash, pruning, resume resolution,
corrupt and foreign files, NaN refusal, format checks and RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from byol_fast import checkpoint as ckpt
from byol_fast.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    check_compatible,
    resolve_resume,
    restore_rng_state,
)


def _state(seed: int = 0) -> dict:
    """A tiny model and an SGD optimizer with momentum buffers, as a checkpoint state."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": {"arch": "tiny"}}


def _names(manager: CheckpointManager) -> list[str]:
    return sorted(p.name for p in manager.directory.iterdir())


def test_round_trip_names_and_stamps(tmp_path):
    manager = CheckpointManager(tmp_path)
    state = _state()
    path = manager.save(1234, state)
    assert path == tmp_path / "checkpoints" / "step_00001234.pt"
    assert _names(manager) == ["step_00001234.pt"]  # no temp file left behind
    loaded = manager.load(path)
    assert loaded["step"] == 1234 and loaded["format_version"] == FORMAT_VERSION
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    momentum = state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert loaded["meta"] == {"arch": "tiny"}


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    first = manager.save(1, _state(1))
    good_bytes = first.read_bytes()
    real_save = torch.save

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(good_bytes[: len(good_bytes) // 3])  # a partial write, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        manager.save(2, _state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert _names(manager) == ["step_00000001.pt"]
    assert manager.latest() == first and first.read_bytes() == good_bytes
    assert manager.load(first)["step"] == 1


def test_leftover_temp_file_of_killed_process_is_ignored_then_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path)
    first = manager.save(1, _state())
    leftover = manager.directory / ".step_00000009.pt.tmp-4242"
    leftover.write_bytes(first.read_bytes()[:100])
    assert manager.latest() == first
    assert resolve_resume("auto", tmp_path) == first
    manager.save(2, _state())
    assert not leftover.exists()
    assert _names(manager) == ["step_00000001.pt", "step_00000002.pt"]


def test_keep_last_pruning_ignores_foreign_files(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.directory.mkdir(parents=True)
    foreign = ["notes.txt", "step_00000001.pt.bak", "other_00000001.pt", "step_abc.pt"]
    for name in foreign:
        (manager.directory / name).write_text("keep me")
    for step in (1, 2, 3, 4, 5):
        manager.save(step, _state(step))
    assert _names(manager) == sorted(foreign + ["step_00000004.pt", "step_00000005.pt"])
    # Beyond 8 digits the name grows and still sorts by number.
    manager.save(123456789, _state())
    assert manager.latest().name == "step_123456789.pt"
    assert [step for step, _ in manager.checkpoints()] == [5, 123456789]


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # no checkpoints directory at all
    manager = CheckpointManager(tmp_path)
    manager.directory.mkdir(parents=True)
    assert resolve_resume("auto", tmp_path) is None  # empty directory
    manager.save(7, _state())
    newest = manager.save(10, _state())
    assert resolve_resume("auto", tmp_path) == newest
    explicit = manager.path_for(7)
    assert resolve_resume(str(explicit), tmp_path) == explicit
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        resolve_resume(str(missing), tmp_path)
    with pytest.raises(CheckpointError, match="is a directory"):
        resolve_resume(str(tmp_path), tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_newest_is_named_and_never_overwritten(tmp_path, damage):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, _state())
    previous = manager.save(2, _state())
    newest = manager.save(3, _state())
    data = newest.read_bytes()
    corrupt = {"truncated": data[: len(data) // 2], "garbage": b"\x80\x02garbage" * 50, "empty": b""}[damage]
    newest.write_bytes(corrupt)
    assert manager.latest() == newest
    with pytest.raises(CheckpointError) as info:
        manager.load(resolve_resume("auto", tmp_path))
    message = str(info.value)
    assert str(newest) in message and str(previous) in message  # names the file and the fallback
    # A later save (e.g. after resuming from step 2) prunes by step number and leaves step 3 alone.
    manager.save(4, _state())
    assert newest.read_bytes() == corrupt
    assert [step for step, _ in manager.checkpoints()] == [2, 3, 4]
    # Re-reaching step 3 sets the corrupt file aside rather than overwriting it.
    with pytest.warns(UserWarning, match="already existed"):
        manager.save(3, _state())
    aside = [p for p in manager.directory.iterdir() if p.name.startswith("step_00000003.pt.replaced-")]
    assert len(aside) == 1 and aside[0].read_bytes() == corrupt
    assert manager.load(newest)["step"] == 3
    assert [step for step, _ in manager.checkpoints()] == [2, 3]  # step 4 is another history now


def test_a_resume_from_an_older_checkpoint_sets_the_abandoned_history_aside(tmp_path):
    # 10, 20, 30 saved; 30 unusable, so the run resumes from 20 (as the error says) and saves 24, 28.
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(step, _state(step))
    with pytest.warns(UserWarning, match="step_00000030.pt already existed; this run resumed from before it"):
        manager.save(24, _state(24))
    assert [step for step, _ in manager.checkpoints()] == [20, 24]  # 20 is not pruned for the abandoned 30
    manager.save(28, _state(28))
    assert resolve_resume("auto", tmp_path) == manager.path_for(28)  # not back to the abandoned 30
    aside = [p for p in manager.directory.iterdir() if p.name.startswith("step_00000030.pt.abandoned-")]
    assert len(aside) == 1 and torch.load(aside[0])["step"] == 30


def test_nonfinite_state_is_refused_and_nothing_written(tmp_path):
    manager = CheckpointManager(tmp_path)
    good = manager.save(1, _state())
    before = _names(manager)
    poisoned = _state()
    poisoned["model"]["0.weight"][1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"model\.0\.weight"):
        manager.save(2, poisoned)
    poisoned = _state()
    poisoned["optimizer"]["state"][0]["momentum_buffer"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"optimizer\.state\.0\.momentum_buffer"):
        manager.save(2, poisoned)
    assert _names(manager) == before and manager.latest() == good
    with pytest.raises(ValueError, match="optimizer"):
        manager.save(3, {"model": _state()["model"]})


def test_format_and_required_keys(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, _state())
    state = torch.load(path, weights_only=True)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*format_version {FORMAT_VERSION + 1}"):
        manager.load(path)
    del state["optimizer"]
    state["format_version"] = FORMAT_VERSION
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{path} lacks optimizer"):
        manager.load(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        manager.load(path)


class _Opaque:
    """A class a weights_only load refuses."""


def test_python_objects_need_trusted_load(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {**_state(), "extra": _Opaque()})
    with pytest.raises(CheckpointError, match="weights_only=False"):
        manager.load(path)
    assert isinstance(manager.load(path, weights_only=False)["extra"], _Opaque)


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # leaves cached Gaussians in Python's and NumPy's states, which must travel too
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {**_state(), "rng": capture_rng_state()})
    expected = _draws()
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    assert _draws() != expected
    restore_rng_state(manager.load(path)["rng"])  # through a weights_only load
    assert _draws() == expected


def test_check_compatible(tmp_path):
    state = {"meta": {"arch": "resnet50", "image_size": 224, "projection_size": 256}}
    check_compatible(state, {"arch": "resnet50", "image_size": 224})
    with pytest.raises(CheckpointError) as info:
        check_compatible(state, {"arch": "resnet18", "image_size": 160, "projection_size": 256, "tau_base": 0.99},
                         source=tmp_path / "step_00000001.pt")
    message = str(info.value)
    assert "step_00000001.pt" in message
    assert "arch: checkpoint 'resnet50', current 'resnet18'" in message
    assert "image_size: checkpoint 224, current 160" in message
    assert "tau_base: not recorded" in message and "projection_size" not in message


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager("run", keep_last=0)
    with pytest.raises(ValueError, match="prefix"):
        CheckpointManager("run", prefix="a/b")
    with pytest.raises(ValueError, match="step"):
        CheckpointManager("run").save(-1, _state())


@pytest.mark.cuda
def test_cuda_state_nonfinite_check_and_rng(tmp_path):
    manager = CheckpointManager(tmp_path)
    state = _state()
    state["model"] = {k: v.cuda() for k, v in state["model"].items()}
    assert ckpt.first_nonfinite(state) is None
    path = manager.save(1, {**state, "rng": capture_rng_state()})
    expected = torch.rand(5, device="cuda").tolist()
    restore_rng_state(manager.load(path)["rng"])
    assert torch.rand(5, device="cuda").tolist() == expected
    state["model"]["1.running_var"][0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.1\.running_var"):
        manager.save(2, state)
