"""The run loop on CPU: kill/SIGTERM and resume end where an uninterrupted run ends, a stop during a kNN pass
or a Ctrl-C is acted on as promised, a dead worker is named, a non-finite loss stops the run naming the step and
keeps the last good checkpoint, bad checkpoints are refused and never overwritten."""

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from run_helpers import assert_same_state, one_thread, start_trainer, wait_for  # noqa: F401

from byol_fast import train
from byol_fast.checkpoint import CheckpointManager
from pipelines.sources import shard_indices
from pipelines.synthetic import make_synthetic
from pipelines.views_loader import save_views

# 24 images, global batch 8: 3 steps per epoch, 9 in all; checkpoints at 2, 4, 6, 8 (mostly mid-epoch) and 9.
COMMON = ["--arch", "resnet18", "--image-size", "32", "--global-batch", "8", "--warmup-epochs", "1",
          "--projection-hidden-size", "64", "--prediction-hidden-size", "64", "--workers", "0",
          "--no-tensorboard", "--device", "cpu"]
RUN = COMMON + ["--epochs", "3", "--data-backend", "torchvision", "--log-every", "1", "--checkpoint-every", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


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
    process = start_trainer(RUN + ["--data", str(data), "--run-dir", str(run_dir)])
    manager = CheckpointManager(run_dir)
    wait_for(lambda: manager.latest() is not None and manager.latest().name >= "step_00000004.pt", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed_at = int(manager.latest().stem.split("_")[1])
    assert 4 <= killed_at < 9
    assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir)]) == 0  # --resume auto (default)
    assert_same_state(torch.load(run_dir / "checkpoints" / "step_00000009.pt"), reference[1])


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_continues(data, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # No periodic checkpoints: the only one before the end is the one the signal makes.
    args = RUN[:-2] + ["--checkpoint-every", "0", "--data", str(data), "--run-dir", str(run_dir)]
    process = start_trainer(args)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    saved = CheckpointManager(run_dir).checkpoints()
    assert len(saved) == 1 and 2 <= saved[0][0] < 9
    assert f"stopped by SIGTERM at step {saved[0][0]}" in stderr
    assert train.main(args) == 0
    assert f"steps {saved[0][0]} -> 9 of 9" in capsys.readouterr().err
    assert_same_state(torch.load(run_dir / "checkpoints" / "step_00000009.pt"), reference[1])


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


def _knn_records(run_dir: Path) -> list[tuple[int, int]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["epoch"]) for line in lines if "knn_top1" in line]


def test_a_stop_during_a_knn_pass_abandons_it_saves_at_once_and_the_resume_matches(data, reference, tmp_path,
                                                                                   monkeypatch, capfd):
    # A kNN pass can outlast a scheduler's grace period (torchrun's 30 s): it must not delay the checkpoint.
    from byol_fast import knn

    extract, calls = knn.extract_features, []

    def signalled_in_the_second_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two calls a pass (bank, val): the pass after epoch 1, at step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return extract(*args, **kwargs)

    monkeypatch.setattr(knn, "extract_features", signalled_in_the_second_pass)
    run_dir = tmp_path / "run"
    args = RUN + ["--data", str(data), "--val-data", str(data), "--run-dir", str(run_dir)]
    assert train.main(args) == 0
    error = capfd.readouterr().err
    assert "SIGTERM received while running the kNN after epoch 1" in error
    assert "kNN after epoch 1 abandoned for the stop" in error
    assert _knn_records(run_dir) == [(0, 0)]
    # Saved at the step the pass followed (not one step later), with that pass still to run.
    assert [step for step, _ in CheckpointManager(run_dir).checkpoints()] == [2, 3]
    assert torch.load(CheckpointManager(run_dir).path_for(3))["position"]["knn_pending"] is True
    monkeypatch.undo()
    assert train.main(args) == 0
    assert _knn_records(run_dir) == [(0, 0), (3, 1), (6, 2), (9, 3)]
    assert_same_state(torch.load(CheckpointManager(run_dir).path_for(9)), reference[1])


def test_ctrl_c_is_acknowledged_at_once_and_a_second_one_while_saving_is_explained(data, tmp_path, monkeypatch,
                                                                                  capfd):
    from byol_fast.step import TrainStep

    call, save, calls, during_the_step = TrainStep.__call__, CheckpointManager.save, [], []

    def long_second_step(self, *views):
        calls.append(1)
        if len(calls) == 2:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C while the step runs
            time.sleep(1.5)
            during_the_step.append(capfd.readouterr().err)
        call(self, *views)

    def ctrl_c_again_while_saving(manager, step, state):
        os.kill(os.getpid(), signal.SIGINT)
        return save(manager, step, state)

    monkeypatch.setattr(TrainStep, "__call__", long_second_step)
    monkeypatch.setattr(CheckpointManager, "save", ctrl_c_again_while_saving)
    run_dir = tmp_path / "run"
    assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir)]) == 130
    assert ("SIGINT received while training (step 2 of 9): the run stops at the end of the current step, saves a "
            "checkpoint and exits with code 130" in during_the_step[0])
    error = capfd.readouterr().err
    assert ("SIGINT again: already stopping, now saving the step-2 checkpoint; the run exits once its checkpoint "
            "is saved" in error)
    assert f"stopped by SIGINT at step 2 (the last good checkpoint is {run_dir / 'checkpoints' / 'step_00000002.pt'})" \
        in error
    assert [step for step, _ in CheckpointManager(run_dir).checkpoints()] == [2]


def test_a_worker_killed_by_sigkill_names_the_oom_killer_and_the_last_good_checkpoint(data, tmp_path, monkeypatch,
                                                                                      capsys):
    from byol_fast.step import TrainStep

    call, calls = TrainStep.__call__, []

    def oom_killer_at_step_three(self, *views):
        call(self, *views)
        calls.append(1)
        if len(calls) == 3:
            for worker in multiprocessing.active_children():  # the DataLoader's worker process
                os.kill(worker.pid, signal.SIGKILL)
            time.sleep(10)  # PyTorch's SIGCHLD handler raises here

    monkeypatch.setattr(TrainStep, "__call__", oom_killer_at_step_three)
    run_dir = tmp_path / "run"
    assert train.main(RUN + ["--workers", "1", "--data", str(data), "--run-dir", str(run_dir)]) == 1
    error = capsys.readouterr().err
    assert "a data-loading worker process died (DataLoader worker (pid" in error and "Killed" in error
    assert "SIGKILL is what the kernel's out-of-memory killer sends" in error and "--workers (now 1)" in error
    assert (f"the last good checkpoint is {CheckpointManager(run_dir).path_for(2)}; the same command resumes "
            f"from it" in error)


def test_a_run_stopped_by_max_steps_says_how_to_go_on_and_that_works(data, tmp_path, capsys):
    args = RUN + ["--data", str(data), "--run-dir", str(tmp_path / "run")]
    assert train.main(args + ["--max-steps", "2"]) == 0
    # No --val-data: the kNN monitor (on by default) cannot run, and says so instead of vanishing.
    assert "no kNN monitor: it needs a labelled --val-data folder" in capsys.readouterr().err
    args += ["--knn-every-epochs", "0"]
    assert train.main(args + ["--max-steps", "2"]) == 0
    assert "raise --max-steps (up to 9, all 3 epochs) or leave it out to go on" in capsys.readouterr().err
    assert train.main(args + ["--max-steps", "3"]) == 0
    assert "steps 2 -> 3 of 9" in capsys.readouterr().err


def test_finished_run_is_not_restarted_or_mixed(data, reference, capsys):
    run_dir, _ = reference
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    record = {name: (run_dir / name).read_bytes() for name in ("config.json", "metrics.jsonl", "attempts.jsonl")}
    assert train.main(RUN + ["--data", str(data), "--run-dir", str(run_dir), "--data-backend", "torch"]) == 0
    hint = capsys.readouterr().err
    assert f"{run_dir} holds a finished run (step 9 of 9): nothing to do" in hint
    assert "to train longer, start a new --run-dir with more --epochs" in hint and "--max-steps" not in hint
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
