"""The README's main job, `byol-fast train --preset demo`, run whole on the CPU: its data, its run and its kNN rise."""

import json
import math
from pathlib import Path

import pytest
import torch

from byol_fast import cli

# MEASURED (2-core CPU, torch 2.14.1, 2026-12-03, official views and initialisation), the demo's kNN top-1 on its
# 256 val images after each epoch, at 54edb91 (channels-last crops):
#   21.5% (random init), 21.9, 24.2, 24.2, 24.2, 23.4, 23.4, 23.4, 25.0, 24.2, 24.2, 22.3, 25.0%
# and earlier that day, before them: 21.5, 21.9, 24.2, 24.2, 24.6, 23.8, 23.8, 23.4, 23.8, 24.6, 23.8, 23.0, 25.4%.
# (The torchvision views and initialisation gave 16.4% -> 23.0% on 2026-11-23: the official zero-initialised
# residual branches make a stronger random-init baseline, and training ends higher.) After the second epoch
# the curve is a plateau that moves by a few of the 256 images from run to run (CI's run of 54edb91 gave 24.6,
# 23.0, 24.6, 25.0% at epochs 3, 6, 9, 12), so the test asks for a gain over random init, not for a rising
# curve. It monitors every third epoch (0, 3, 6, 9, 12), which saves a minute of feature extraction and does
# not change training (the monitor draws no random numbers).
KNN_GAIN = 0.025
"""The final kNN top-1 must beat the random-init one by this much (measured gains: 0.035 and 0.039, 9 and 10
more of 256 right)."""
KNN_FINAL = 0.24
"""...and end above the 23.0% the torchvision views and initialisation reached (measured: 25.0% and 25.4%)."""


@pytest.mark.slow
def test_demo_writes_its_data_trains_and_its_knn_rises(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the preset's paths (data/synthetic, runs/demo) are relative, as in the README
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", "--preset", "demo", "--knn-every-epochs", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    error = capsys.readouterr().err
    assert "writing 768 synthetic images to data/synthetic" in error
    assert "resnet18 at 64px, global batch 64 (1 rank(s)), torchvision data on cpu" in error
    assert "steps 0 -> 96 of 96" in error
    train_images = list((tmp_path / "data" / "synthetic" / "train").rglob("*.JPEG"))
    val_images = list((tmp_path / "data" / "synthetic" / "val").rglob("*.JPEG"))
    assert (len(train_images), len(val_images)) == (512, 256)
    run_dir = tmp_path / "runs" / "demo"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert checkpoints == ["step_00000032.pt", "step_00000064.pt", "step_00000096.pt"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "demo" and config["resolved"]["total_steps"] == 96

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = [(line["epoch"], line["knn_top1"]) for line in lines if "knn_top1" in line]
    assert [epoch for epoch, _ in knn] == [0, 3, 6, 9, 12]
    assert all(line["knn_seconds"] > 0 for line in lines if "knn_top1" in line)
    top1 = [value for _, value in knn]
    assert top1[-1] >= top1[0] + KNN_GAIN, f"kNN top-1 by epoch: {knn}"
    assert top1[-1] >= KNN_FINAL, f"kNN top-1 by epoch: {knn}"
    assert min(top1[1:]) > top1[0], f"a monitored epoch fell back to the random-init kNN: {knn}"

    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == list(range(8, 97, 8))
    # BYOL's symmetric loss (two directions of 2 - 2 cos) lies in [0, 8]; near 4 for unrelated projections.
    assert all(math.isfinite(line["loss"]) for line in steps)
    assert 3.5 < steps[0]["loss"] < 8.0 and steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert steps[0]["lr"] == pytest.approx(0.3 * 64 / 256 * 7 / 16)  # warm-up: the 8th step (index 7) of 16
    assert all(line["images_per_s"] > 0 and 0 <= line["data_wait_pct"] <= 100 for line in steps)
