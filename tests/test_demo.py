"""The README's main-job command, `byol-fast train --preset demo`, end to end on the CPU (capped at 2 steps)."""

import json
import math
from pathlib import Path

import pytest
import torch

from byol_fast import cli


@pytest.mark.slow
def test_demo_preset_writes_its_data_and_trains(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the preset's paths (data/synthetic, runs/demo) are relative, as in the README
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", "--preset", "demo", "--max-steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    error = capsys.readouterr().err
    assert "writing 640 synthetic images to data/synthetic" in error
    assert "resnet18 at 64px, global batch 64 (1 rank(s)), torchvision data on cpu" in error
    assert "steps 0 -> 2 of 96" in error
    train_images = list((tmp_path / "data" / "synthetic" / "train").rglob("*.JPEG"))
    val_images = list((tmp_path / "data" / "synthetic" / "val").rglob("*.JPEG"))
    assert (len(train_images), len(val_images)) == (512, 128)
    run_dir = tmp_path / "runs" / "demo"
    assert (run_dir / "checkpoints" / "step_00000002.pt").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "demo" and config["resolved"]["total_steps"] == 96
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    knn = lines[0]  # the random-init baseline of the kNN monitor, before the first step
    assert (knn["step"], knn["epoch"]) == (0, 0) and 0.0 <= knn["knn_top1"] <= 1.0 and knn["knn_seconds"] > 0
    assert "kNN top-1 after epoch 0:" in error
    record = lines[-1]
    assert record["step"] == 2
    # BYOL's symmetric loss (two directions of 2 - 2 cos) lies in [0, 8]; near 4 for unrelated projections.
    assert math.isfinite(record["loss"]) and 2.0 < record["loss"] < 8.0
    assert record["images_per_s"] > 0 and 0 <= record["data_wait_pct"] <= 100
    assert record["lr"] == pytest.approx(0.3 * 64 / 256 * 1 / 16)  # warm-up: step 1 of 16
