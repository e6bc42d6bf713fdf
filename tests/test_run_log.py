"""Run records: provenance against git and the live libraries, config/metrics files,
TensorBoard with and without the package, rank gating, progress text, MFU and FLOP counts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from byol_fast import run_log
from byol_fast.model import BYOL
from byol_fast.run_log import RunLogger, byol_step_flops_per_image, mfu, provenance

REPO = Path(run_log.__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_provenance_matches_git_and_libraries():
    info = provenance()
    json.dumps(info)  # provenance.json must be writable as is
    assert info["git"]["sha"] == _git("rev-parse", "HEAD")
    assert info["git"]["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert info["torch"] == torch.__version__
    assert torchvision.__version__.startswith(info["torchvision"])
    assert info["numpy"] == np.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["cuda"] == torch.version.cuda
    assert info["device_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert len(info["devices"]) == info["device_count"]
    assert info["hostname"] == socket.gethostname()
    assert info["argv"] == sys.argv
    age = datetime.now(timezone.utc) - datetime.fromisoformat(info["utc_time"])
    assert 0 <= age.total_seconds() < 60
    for key in ("nvidia_dali", "ffcv", "cudnn"):
        assert key in info


def test_provenance_outside_git(tmp_path, monkeypatch):
    monkeypatch.setattr(run_log, "__file__", str(tmp_path / "run_log.py"))  # a copy outside any checkout
    assert run_log.git_state() == {"sha": None, "dirty": None}

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(run_log.subprocess, "run", no_git)
    assert provenance()["git"] == {"sha": None, "dirty": None}


def _config(tmp_path: Path) -> dict:
    return {"arch": "resnet18", "batch_size": 64, "data": tmp_path / "images", "lr": 0.3, "views": (1, 2)}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_written_and_flushed_per_line(tmp_path):
    logger = RunLogger(tmp_path / "run", _config(tmp_path), rank=0, total_steps=100, tensorboard=False, progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config == {"arch": "resnet18", "batch_size": 64, "data": str(tmp_path / "images"), "lr": 0.3,
                      "views": [1, 2]}
    assert "git" in json.loads((tmp_path / "run" / "provenance.json").read_text())
    logger.log(10, {"loss": 3.25, "lr": 0.125, "first_nonfinite_step": None})
    logger.log(20, {"loss": float("nan"), "lr": 0.25, "first_nonfinite_step": 17})
    # Read before close: each line must already be on disk for an interrupted run.
    lines = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [10, 20]
    assert lines[0]["loss"] == 3.25 and lines[0]["lr"] == 0.125 and lines[0]["first_nonfinite_step"] is None
    assert lines[1]["loss"] is None and lines[1]["first_nonfinite_step"] == 17  # NaN -> strict-JSON null
    assert lines[0]["time"] <= lines[1]["time"] and 0 <= lines[0]["elapsed_s"] <= lines[1]["elapsed_s"]
    logger.close()
    logger.close()
    # A resumed run appends to the same file, and keeps the earlier attempt's config beside its own.
    changed = {**_config(tmp_path), "lr": 0.5}
    with RunLogger(tmp_path / "run", changed, 0, 100, tensorboard=False, progress=False) as resumed:
        resumed.log(20, {"loss": 1.5})  # resumed from a step-10 checkpoint: step 20 again, in attempt 2
        resumed.log(30, {"loss": 1.0})
    lines = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(line["step"], line["attempt"]) for line in lines] == [(10, 1), (20, 1), (20, 2), (30, 2)]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.5
    attempts = _read_jsonl(tmp_path / "run" / "attempts.jsonl")
    assert [attempt["config"]["lr"] for attempt in attempts] == [0.3, 0.5]
    assert attempts[0]["config"] == config and "git" in attempts[1]["provenance"]


def test_a_line_cut_short_by_a_kill_does_not_swallow_the_next_attempts_first_line(tmp_path):
    run = tmp_path / "run"
    with RunLogger(run, _config(tmp_path), 0, 100, tensorboard=False, progress=False) as first:
        first.log(7, {"loss": 3.0})
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 8, "loss": 2.9')  # the kill landed mid-write
    with open(run / "attempts.jsonl", "a") as attempts:
        attempts.write('{"config": {"lr"')
    with RunLogger(run, _config(tmp_path), 0, 100, tensorboard=False, progress=False) as resumed:
        resumed.log(8, {"loss": 2.8})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 8, "loss": 2.9' and json.loads(lines[2])["step"] == 8
    assert resumed.attempt == 3 and json.loads(lines[2])["attempt"] == 3  # the partial attempt line counts
    assert json.loads((run / "attempts.jsonl").read_text().splitlines()[2])["config"]["lr"] == 0.3


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, {}, rank=0, total_steps=10, tensorboard=True, progress=False) as logger:
        logger.log(1, {"loss": 2.5, "lr": 0.5, "first_nonfinite_step": None})
        logger.log(2, {"loss": 1.5, "lr": 0.25, "first_nonfinite_step": None})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(1, 0.5), (2, 0.25)]


def test_works_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.warns(UserWarning, match="pip install tensorboard") as caught:
        logger = RunLogger(tmp_path, {}, rank=0, total_steps=10, tensorboard=True, progress=False)
    assert len(caught) == 1
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert _read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 0.5
    assert not (tmp_path / "tensorboard").exists()


def test_only_rank_zero_writes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = RunLogger(run_dir, _config(tmp_path), rank=1, total_steps=10)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr().err == ""


def test_bad_config_fails_before_writing(tmp_path):
    with pytest.raises(TypeError, match="object.*not JSON-serializable"):
        RunLogger(tmp_path / "run", {"model": object()}, rank=0, total_steps=1, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_rate_and_eta(tmp_path, monkeypatch, capsys):
    clock = _Clock()
    monkeypatch.setattr(run_log.time, "monotonic", clock)
    logger = RunLogger(tmp_path, {}, rank=0, total_steps=1000, tensorboard=False, images_per_step=64)
    logger.log(10, {"loss": 0.75})
    clock.now = 2.0
    logger.log(20, {"loss": 0.5})  # 5 steps/s -> 320 images/s; 980 steps left -> 196 s
    clock.now = 2.5
    logger.log(30, {"loss": 0.25, "images_per_s": 12345.0})  # a measured rate wins; 8 steps/s since step 10
    logger.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "step 10/1000 | loss 0.75",
        "step 20/1000 | loss 0.5 | 320 img/s | ETA 0:03:16",
        "step 30/1000 | loss 0.25 | 12,345 img/s | ETA 0:02:01",  # 970 steps at 8 steps/s
    ]


def test_eta_is_the_rate_since_the_first_window_not_the_last_window(tmp_path, monkeypatch, capsys):
    # A demo run: 30 s of warm-up in the first window, then 10 steps a second, except a window holding a
    # 20 s kNN pass every 50 steps. The last window's rate swung the ETA from 0:00:40 to 0:05:00 and back.
    clock = _Clock()
    monkeypatch.setattr(run_log.time, "monotonic", clock)
    logger = RunLogger(tmp_path, {}, rank=0, total_steps=500, tensorboard=False, images_per_step=64)
    for step in range(10, 500, 10):
        clock.now += 30.0 if step == 10 else 1.0 + (20.0 if step % 50 == 0 else 0.0)
        logger.log(step, {"loss": 1.0})
    logger.close()
    etas = [line.rsplit("ETA ", 1)[1] for line in capsys.readouterr().err.splitlines() if "ETA" in line]
    seconds = dict(zip(range(20, 500, 10), (int(h) * 3600 + int(m) * 60 + int(s)
                                            for h, m, s in (eta.split(":") for eta in etas))))
    # At step 450, just after a kNN window (the last window's rate gave 50 x 2.1 s = 1:45): the rate since
    # step 10 is 440 steps in 44 s of training and 9 kNN passes.
    assert seconds[450] == 50 * (44 + 9 * 20) // 440
    # Once a few passes are in the average, a kNN window moves the ETA by under a third (it was 20x).
    assert all(seconds[step] <= 1.3 * seconds[step - 10] for step in range(150, 500, 10))


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    clock = _Clock()
    monkeypatch.setattr(run_log.time, "monotonic", clock)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    logger = RunLogger(tmp_path, {}, rank=0, total_steps=1000, tensorboard=False, images_per_step=64)
    logger.log(500, {"loss": 0.75})  # a resumed run: the bar starts at 500
    clock.now = 1.0
    logger.log(600, {"loss": 0.5})
    assert logger._bar.n == 600
    logger.close()
    err = capsys.readouterr().err
    assert "600/1000" in err and "6,400 img/s" in err and "ETA 0:00:04" in err


def test_mfu():
    assert mfu(1000.0, 65e9, 800e12) == pytest.approx(0.08125)
    assert mfu(12_307.7, 65e9, 800e12) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1.0, 65e9, 0.0)


def _analytic_step_flops(arch: str, image_size: int) -> float:
    """Per-image BYOL step FLOPs from layer shapes: 2*MACs per conv/linear, backward = 2x forward
    where gradients flow, minus what autograd never computes (conv1's input gradient, the
    unused fc's backward)."""
    with torch.device("meta"):
        learner = BYOL(arch, image_size=image_size)
    macs: dict[str, float] = {}

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs[name] = output[0].numel() * module.in_channels // module.groups * kh * kw
            else:
                macs[name] = module.in_features * module.out_features
        return record

    online = {"encoder": learner.online_encoder.net, "projector": learner.online_projector,
              "predictor": learner.online_predictor}
    for part, module in online.items():
        for name, layer in module.named_modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.register_forward_hook(hook(f"{part}.{name}"))
    with torch.device("meta"):
        image = torch.randn(1, 3, image_size, image_size)
        learner.online_predictor.eval()(learner.online_projector.eval()(learner.online_encoder.eval()(image)))
    encoder = sum(v for k, v in macs.items() if k.startswith("encoder."))
    projector = sum(v for k, v in macs.items() if k.startswith("projector."))
    predictor = sum(v for k, v in macs.items() if k.startswith("predictor."))
    online_forward = encoder + projector + predictor
    online_backward = 2 * (online_forward - macs["encoder.fc"]) - macs["encoder.conv1"]
    target_forward = encoder + projector
    return 2 * 2 * (online_forward + online_backward + target_forward)  # 2 FLOPs per MAC, 2 views


def test_flops_match_layer_shapes_and_design_figure():
    resnet50 = byol_step_flops_per_image("resnet50", 224)
    assert resnet50 == pytest.approx(_analytic_step_flops("resnet50", 224), rel=1e-9)
    assert resnet50 == pytest.approx(65e9, rel=0.10)  # DESIGN.md's figure
    resnet18 = byol_step_flops_per_image("resnet18", 224)
    assert resnet18 == pytest.approx(_analytic_step_flops("resnet18", 224), rel=1e-9)
    assert 25e9 < resnet18 < 32e9  # ~8x a 1.8 GMAC forward
    ratio = resnet18 / byol_step_flops_per_image("resnet18", 112)
    assert 3.6 < ratio < 4.0  # quadratic in the side, less the size-independent MLPs
    # A small-image stem keeps the 4x4 downsampling of conv1 and the max-pool out: ~16x the area after it.
    small = byol_step_flops_per_image("resnet18", 32, small_stem=True) / byol_step_flops_per_image("resnet18", 32)
    assert 15 < small < 18.5
    before = byol_step_flops_per_image.cache_info().hits
    assert byol_step_flops_per_image("resnet50", 224) == resnet50
    assert byol_step_flops_per_image.cache_info().hits == before + 1


def test_measured_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
    # Make the clock advance exactly 1 s over the timed products: the rate is then 2 n^3 repeats / 1 s.
    ticks = iter([100.0, 101.0])
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: next(ticks))
    assert run_log.measure_matmul_flops(torch.device("cpu"), size=64, dtype=torch.float32, repeats=5) == 2 * 64**3 * 5
