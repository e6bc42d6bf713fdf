"""The run loop on a GPU: the captured step fed in place by a pipeline, MFU logged, resume into a captured
graph, and no host-device sync between metric reads once the graph is captured."""

import json
from pathlib import Path

import pytest
import torch

from byol_fast import train
from byol_fast.checkpoint import CheckpointManager
from pipelines.synthetic import make_synthetic
from pipelines.views_loader import save_views

COMMON = ["--arch", "resnet18", "--image-size", "64", "--global-batch", "32", "--warmup-epochs", "1",
          "--projection-hidden-size", "512", "--prediction-hidden-size", "512", "--no-tensorboard",
          "--device", "cuda", "--workers", "4"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cuda
def test_graph_captured_run_with_the_torch_backend_and_resume(tmp_path: Path, capsys):
    make_synthetic(tmp_path / "data", images=128, classes=4, workers=4)
    run_dir = tmp_path / "run"
    args = COMMON + ["--data", str(tmp_path / "data" / "train"), "--data-backend", "torch", "--epochs", "4",
                     "--log-every", "2", "--checkpoint-every", "6", "--run-dir", str(run_dir)]
    assert train.main(args + ["--max-steps", "6"]) == 0
    config = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert config["cuda_graph"] is True and config["precision"] == "bf16" and config["backend"] == "torch"
    assert config["peak_tflops"] > 50  # measured bf16 matmul peak of a data-centre GPU
    records = _records(run_dir)
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert torch.isfinite(torch.tensor(record["loss"])) and 2.0 < record["loss"] < 8.0 and record["memory_gib"] > 0
    # Steps 1-4 are warm-up (3 eager steps, then the capture): no rates until the window of steps 5-6.
    assert [sorted(set(r) & {"images_per_s", "mfu"}) for r in records] == [[], [], ["images_per_s", "mfu"]]
    assert records[2]["images_per_s"] > 0 and 0 < records[2]["mfu"] < 1
    assert train.main(args) == 0  # resume=auto into a freshly captured graph, to the end (16 steps)
    assert "steps 6 -> 16 of 16" in capsys.readouterr().err
    assert [step for step, _ in CheckpointManager(run_dir).checkpoints()][-1] == 16
    assert [r["step"] for r in _records(run_dir)][-1] == 16


@pytest.mark.cuda
def test_no_host_sync_between_metric_reads_after_capture(tmp_path: Path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    save_views(tmp_path / "views.pt", *(torch.randn(320, 3, 64, 64, generator=generator) for _ in range(2)))
    strict = {"on": False, "steps": 0}

    def relaxed(method):
        """Metric reads and checkpoints are the loop's documented syncs: allowed, strictness restored after."""
        def wrapper(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error" if strict["on"] else 0)
        return wrapper

    original_call = train.TrainStep.__call__

    def call(self, *views):
        if self._graph is not None and not strict["on"]:  # warm-up, capture and the trainer's one sync after
            strict["on"] = True                           # them are behind us
            torch.cuda.set_sync_debug_mode("error")
        original_call(self, *views)
        strict["steps"] += strict["on"]

    monkeypatch.setattr(train.TrainStep, "__call__", call)
    monkeypatch.setattr(train.Trainer, "_log", relaxed(train.Trainer._log))
    monkeypatch.setattr(train.Trainer, "save", relaxed(train.Trainer.save))
    args = COMMON + ["--data", str(tmp_path / "views.pt"), "--data-backend", "views", "--epochs", "1",
                     "--log-every", "5", "--checkpoint-every", "0", "--run-dir", str(tmp_path / "run")]
    try:
        assert train.main(args) == 0
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert strict["steps"] == 10 - 4  # steps after the capture ran with any sync an error
