"""Stops as schedulers and terminals send them: a signal to the whole process group (`kill -- -PGID`, `timeout`,
Slurm) or through torchrun, mid-epoch, on every backend, ends in a checkpoint at the next step boundary, the
documented exit code, and a resume that ends where an uninterrupted run ends, bit for bit.

The trainer runs in its own session (start_new_session), so a group signal reaches it and its data-loading
workers, as a scheduler's does, and nothing of pytest's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from run_helpers import (REPO, assert_same_state, logged_steps, one_thread, start_trainer, trainer_env,  # noqa: F401
                         wait_for)

from byol_fast import train
from byol_fast.checkpoint import CheckpointManager
from pipelines.synthetic import make_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6  # 48 images, global batch 8, one epoch: a stop after step 1 and before step 6 is mid-epoch
ARGS = ["--arch", "resnet18", "--image-size", "32", "--global-batch", "8", "--epochs", "1", "--warmup-epochs", "1",
        "--projection-hidden-size", "64", "--prediction-hidden-size", "64", "--no-tensorboard", "--device", "cpu",
        "--log-every", "1", "--checkpoint-every", "0", "--knn-every-epochs", "0"]
# torchvision: two DataLoader worker processes, which a group signal reaches too; the others decode in threads.
WORKERS = {"torchvision": 2, "torch": 1, "dali": 1, "ffcv": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, images=48, classes=4)
    return root / "train"


@pytest.fixture(scope="module")
def data(folder, tmp_path_factory):
    """backend -> what --data is for it (ffcv reads a .beton, converted on first use)."""
    def data_for(backend: str) -> str:
        if backend != "ffcv":
            return str(folder)
        from pipelines.ffcv_convert import convert_to_beton
        from pipelines.sources import load_images

        beton = tmp_path_factory.getbasetemp() / "train.beton"
        if not beton.is_file():
            convert_to_beton(load_images(folder), beton, max_resolution=64, num_workers=1)
        return str(beton)
    return data_for


def run_args(backend: str, data: str, run_dir) -> list[str]:
    return ARGS + ["--data-backend", backend, "--workers", str(WORKERS[backend]), "--data", data,
                   "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """backend -> the final checkpoint of an uninterrupted run (in this process, made on first use)."""
    finals: dict[str, dict] = {}

    def final_of(backend: str) -> dict:
        if backend not in finals:
            run_dir = tmp_path_factory.mktemp(f"reference-{backend}")
            threads = torch.get_num_threads()
            try:
                assert train.main(run_args(backend, data(backend), run_dir)) == 0
            finally:
                torch.set_num_threads(threads)  # ffcv sets it process-wide
            finals[backend] = torch.load(CheckpointManager(run_dir).path_for(STEPS))
        return finals[backend]
    return final_of


def _stopped_mid_epoch_then_resumed(run_dir, args: list[str], final: dict, stderr: str) -> None:
    """One checkpoint, at the step the signal ended, mid-epoch; the same command resumes it to `final`."""
    saved = CheckpointManager(run_dir).checkpoints()
    assert len(saved) == 1, stderr[-3000:]
    step, path = saved[0]
    assert 1 <= step < STEPS, stderr[-3000:]
    assert torch.load(path)["position"] == {"epoch": 0, "batch": step, "steps_per_epoch": STEPS, "knn_pending": False}
    assert f"at step {step} (the last good checkpoint is {path})" in stderr
    assert "DataLoader worker" not in stderr
    assert train.main(args) == 0
    assert_same_state(torch.load(CheckpointManager(run_dir).path_for(STEPS)), final)


def _group_signal(process: subprocess.Popen, signum: int) -> None:
    os.killpg(process.pid, signum)  # the process leads its own group (start_new_session)


@pytest.mark.slow
@pytest.mark.parametrize("backend,signum,code", [
    # `kill -TERM -- -PGID`, Slurm: the DataLoader worker processes get it too.
    pytest.param("torchvision", signal.SIGTERM, 0, id="torchvision-SIGTERM"),
    pytest.param("torchvision", signal.SIGINT, 130, id="torchvision-SIGINT"),  # a terminal's Ctrl-C: the group
    pytest.param("torch", signal.SIGTERM, 0, id="torch-SIGTERM"),
    pytest.param("dali", signal.SIGTERM, 0, marks=pytest.mark.dali, id="dali-SIGTERM"),  # DALI's CPU mode
    pytest.param("ffcv", signal.SIGTERM, 0, marks=pytest.mark.ffcv, id="ffcv-SIGTERM"),
])
def test_a_process_group_signal_mid_epoch_checkpoints_and_the_resume_matches(backend, signum, code, data, reference,
                                                                            tmp_path):
    if backend in ("dali", "ffcv"):
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    final = reference(backend)
    run_dir = tmp_path / "run"
    args = run_args(backend, data(backend), run_dir)
    process = start_trainer(args, start_new_session=True)
    wait_for(lambda: logged_steps(run_dir) >= 1, process)
    _group_signal(process, signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code and "Traceback" not in stderr, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"{name} received while training (step" in stderr and f"exits with code {code}" in stderr
    _stopped_mid_epoch_then_resumed(run_dir, args, final, stderr)


@pytest.mark.slow
def test_timeout_s_term_checkpoints_and_the_resume_matches(data, reference, tmp_path):
    # `timeout -s TERM DURATION cmd` signals cmd and then its whole process group when DURATION ends, and does
    # the same with a SIGTERM it receives itself: sending it one lands the stop mid-epoch instead of at a
    # guessed time. Its exit status is then the trainer's.
    run_dir = tmp_path / "run"
    args = run_args("torchvision", data("torchvision"), run_dir)
    process = start_trainer(args, prefix=("timeout", "-s", "TERM", "600"), start_new_session=True)
    wait_for(lambda: logged_steps(run_dir) >= 1, process)
    process.send_signal(signal.SIGTERM)  # to `timeout` alone; it passes the signal on to the group
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    _stopped_mid_epoch_then_resumed(run_dir, args, reference("torchvision"), stderr)


@pytest.mark.slow
def test_a_signal_to_torchrun_checkpoints_and_the_resume_matches(data, reference, tmp_path):
    # torchrun starts each rank in a session of its own and, on SIGTERM, signals that rank's whole group (its
    # DataLoader workers too), then waits 30 s before SIGKILL.
    run_dir = tmp_path / "run"
    args = run_args("torchvision", data("torchvision"), run_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone", "-m",
               "byol_fast.train", *args]
    process = subprocess.Popen(command, cwd=REPO, env=trainer_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: logged_steps(run_dir) >= 1, process)
    _group_signal(process, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    # torchrun itself exits 1 with its SignalException, whatever its ranks did; the rank stopped cleanly.
    assert process.returncode == 1 and "SignalException" in stderr, stderr[-3000:]
    assert "SIGTERM received while training (step" in stderr and "exits with code 0" in stderr
    _stopped_mid_epoch_then_resumed(run_dir, args, reference("torchvision"), stderr)
