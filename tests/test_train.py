"""The run loop on CPU: kill/SIGTERM and resume end where an uninterrupted run ends, a non-finite loss stops
the run naming the step and keeps the last good checkpoint, bad checkpoints are refused and never overwritten."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from byol_fast import train
from byol_fast.checkpoint import CheckpointManager
from pipelines.sources import shard_indices
from pipelines.synthetic import make_synthetic
from pipelines.views_loader import save_views

REPO = Path(__file__).resolve().parents[1]
# 24 images, global batch 8: 3 steps per epoch, 9 in all; checkpoints at 2, 4, 6, 8 (mostly mid-epoch) and 9.
COMMON = ["--arch", "resnet18", "--image-size", "32", "--global-batch", "8", "--warmup-epochs", "1",
          "--projection-hidden-size", "64", "--prediction-hidden-size", "64", "--workers", "0",
          "--no-tensorboard", "--device", "cpu"]
RUN = COMMON + ["--epochs", "3", "--data-backend", "torchvision", "--log-every", "1", "--checkpoint-every", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, as the subprocesses get (OMP_NUM_THREADS=1): the same float results, no contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, images=24, classes=4)
    return root / "train"


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run: its directory and final checkpoint."""
    run_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir, torch.load(run_dir / "checkpoints" / "step_00000009.pt")


def _assert_same_state(state: dict, expected: dict) -> None:
    assert state["step"] == expected["step"]
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    for key, entry in expected["optimizer"]["state"].items():
        assert torch.equal(state["optimizer"]["state"][key]["momentum_buffer"], entry["momentum_buffer"]), key


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "byol_fast.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def test_reference_run_records_everything(reference):
    run_dir, final = reference
    assert final["position"] == {"epoch": 3, "batch": 0, "steps_per_epoch": 3, "knn_pending": False}
    assert final["train_step"]["step"] == 9 and len(final["rng"]) == 1
    assert [step for step, _ in CheckpointManager(run_dir).checkpoints()] == [6, 8, 9]  # keep_checkpoints=3
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 9
    for key in ("config.json", "provenance.json"):
        assert (run_dir / key).is_file()
    # Each checkpoint names the attempt that wrote it (export reads it there): here the only one.
    assert final["provenance"] == json.loads((run_dir / "provenance.json").read_text())
    assert final["provenance"]["torch"] == torch.__version__ and set(final["provenance"]["git"]) == {"sha", "dirty"}


@pytest.mark.slow
def test_killed_run_resumes_where_an_uninterrupted_run_ends(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    process = _start(RUN + ["--data", str(data), "--run-dir", str(run_dir)])
    manager = CheckpointManager(run_dir)
    _wait_for(lambda: manager.latest() is not None and manager.latest().name >= "step_00000004.pt", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed_at = int(manager.latest().stem.split("_")[1])
    assert 4 <= killed_at < 9
    assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir)]) == 0  # --resume auto (default)
    _assert_same_state(torch.load(run_dir / "checkpoints" / "step_00000009.pt"), reference[1])


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_continues(data, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # No periodic checkpoints: the only one before the end is the one the signal makes.
    args = RUN[:-2] + ["--checkpoint-every", "0", "--data", str(data), "--run-dir", str(run_dir)]
    process = _start(args)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    saved = CheckpointManager(run_dir).checkpoints()
    assert len(saved) == 1 and 2 <= saved[0][0] < 9
    assert f"stopped by a signal at step {saved[0][0]}" in stderr
    assert train.main(args) == 0
    assert f"steps {saved[0][0]} -> 9 of 9" in capsys.readouterr().err
    _assert_same_state(torch.load(run_dir / "checkpoints" / "step_00000009.pt"), reference[1])


def test_a_stop_at_an_epochs_end_exits_at_once_and_the_resumed_run_runs_that_epochs_knn(data, tmp_path, monkeypatch):
    from byol_fast.step import TrainStep

    call, calls = TrainStep.__call__, []

    def signalled_after_epoch_one(self, *views):
        call(self, *views)
        calls.append(1)
        if len(calls) in (3, 6):  # 3 steps an epoch: a scheduler's SIGTERM during the epoch's last step
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(TrainStep, "__call__", signalled_after_epoch_one)
    run_dir = tmp_path / "run"
    args = COMMON + ["--epochs", "2", "--data-backend", "torchvision", "--log-every", "3", "--checkpoint-every", "0",
                     "--data", str(data), "--val-data", str(data), "--run-dir", str(run_dir)]

    def knn_records() -> list[tuple[int, int]]:
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(line["step"], line["epoch"]) for line in lines if "knn_top1" in line]

    assert train.main(args) == 0
    assert knn_records() == [(0, 0)]  # no kNN between the signal and the exit
    assert torch.load(run_dir / "checkpoints" / "step_00000003.pt")["position"]["knn_pending"] is True
    assert train.main(args) == 0  # signalled again in the run's last step: no resume to leave its kNN to
    assert knn_records() == [(0, 0), (3, 1), (6, 2)]  # epoch 1's kNN, first thing on resume
    assert torch.load(run_dir / "checkpoints" / "step_00000006.pt")["position"]["knn_pending"] is False


def test_finished_run_is_not_restarted_or_mixed(data, reference, capsys):
    run_dir, _ = reference
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    record = {name: (run_dir / name).read_bytes() for name in ("config.json", "metrics.jsonl", "attempts.jsonl")}
    assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir), "--data-backend", "torch"]) == 0
    assert f"{run_dir} holds a finished run (step 9 of 9): nothing to do" in capsys.readouterr().err
    assert {name: (run_dir / name).read_bytes() for name in record} == record  # its record still tells the truth
    assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir), "--resume", "none"]) == 2
    error = capsys.readouterr().err
    assert "already holds checkpoints" in error and "pass --resume auto to continue that run" in error
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_incompatible_checkpoint_names_what_differs(data, reference, tmp_path, capsys):
    checkpoint = reference[0] / "checkpoints" / "step_00000009.pt"
    args = RUN + ["--data", str(data), "--run-dir", str(tmp_path), "--resume", str(checkpoint)]
    assert train.main(args + ["--global-batch", "4"]) == 2
    error = capsys.readouterr().err
    assert "does not match the current configuration (global_batch: checkpoint 8, current 4" in error
    assert str(checkpoint) in error


def test_corrupt_checkpoint_is_refused_and_never_overwritten(data, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for step in (6, 8):
        source = reference[0] / "checkpoints" / f"step_{step:08d}.pt"
        (run_dir / "checkpoints" / source.name).write_bytes(source.read_bytes())
    newest = run_dir / "checkpoints" / "step_00000008.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # truncated, as by a full disk
    assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert f"cannot read checkpoint {newest}: it is truncated or corrupt" in error
    assert "--resume " + str(run_dir / "checkpoints" / "step_00000006.pt") in error
    assert newest.stat().st_size == 5000


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(2)]
    # Batch-major order (pipelines/views_loader.py): step k of epoch 0 reads order[4k : 4k + 4].
    order = shard_indices(16, 0, 1, epoch=0, seed=0, batch_size=4)
    views[0][order[9]] = float("nan")  # poisons step 3 (counting from 1)
    save_views(tmp_path / "views.pt", *views)
    run_dir = tmp_path / "run"
    args = COMMON + ["--global-batch", "4", "--epochs", "2", "--data-backend", "views",
                     "--data", str(tmp_path / "views.pt"), "--run-dir", str(run_dir),
                     "--log-every", "4", "--checkpoint-every", "2"]
    assert train.main(args) == 1
    error = capsys.readouterr().err
    good = run_dir / "checkpoints" / "step_00000002.pt"
    assert "the loss became non-finite at step 3" in error
    assert f"the last good checkpoint is {good}" in error
    # Found at step 4's checkpoint (the first read after step 3): nothing from step 3 on was written.
    assert [step for step, _ in CheckpointManager(run_dir).checkpoints()] == [2]
    state = torch.load(good)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # Resumed from step 2 beside a newer checkpoint of a history it leaves: the message names this run's.
    (run_dir / "checkpoints" / "step_00000008.pt").write_bytes(good.read_bytes())
    assert train.main(args + ["--resume", str(good)]) == 1
    assert f"the last good checkpoint is {good}" in capsys.readouterr().err


def test_throughput_windows_leave_out_warm_up_and_end_when_the_queued_steps_are_done(data, tmp_path, monkeypatch):
    # On a GPU the first call (cuDNN autotuning, compilation; the capture after warm-up calls) is one-off work:
    # model it as a sleep, which must stay out of every window. The host also queues steps ahead and
    # read_metrics waits for them: model that wait as a sleep too; it is training time, so it must fall inside
    # the logged window (measured before it, images/s read ~4x high).
    from byol_fast.step import TrainStep

    warm_up_s, drain_s = 6.0, 1.0  # a step takes ~0.45 s here (one thread)
    call, read_metrics = TrainStep.__call__, TrainStep.read_metrics

    def capturing(self, *views):
        if not self.warm:
            time.sleep(warm_up_s)
        call(self, *views)

    def draining(self):
        time.sleep(drain_s)
        return read_metrics(self)

    monkeypatch.setattr(TrainStep, "__call__", capturing)
    monkeypatch.setattr(TrainStep, "read_metrics", draining)
    args = COMMON + ["--epochs", "1", "--data-backend", "torchvision", "--checkpoint-every", "0",
                     "--knn-every-epochs", "0", "--data", str(data)]
    assert train.main(args + ["--log-every", "1", "--run-dir", str(tmp_path / "each")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "each" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and "images_per_s" not in lines[0]  # the first window holds the warm-up step only
    for line in lines[1:]:
        assert line["step_ms"] >= 1e3 * drain_s and line["images_per_s"] <= 8 / drain_s
    assert train.main(args + ["--log-every", "3", "--run-dir", str(tmp_path / "epochs")]) == 0
    first = json.loads((tmp_path / "epochs" / "metrics.jsonl").read_text().splitlines()[0])
    # Steps 2-3 and the drain: about (2 x 0.45 + 1) / 2 s a step; with the warm-up in, over (6 + 1) / 3 s.
    assert 1e3 * drain_s / 2 <= first["step_ms"] < 1e3 * (warm_up_s + drain_s) / 3
