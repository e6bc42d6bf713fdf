"""What the run-loop tests share: a trainer subprocess, waiting on it, and comparing final states."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """One CPU thread, as the subprocesses get (OMP_NUM_THREADS=1): the same float results, no contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer_env() -> dict[str, str]:
    """The environment of a trainer subprocess: one thread, this checkout first on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start_trainer(args: list[str], prefix: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    """`python -m byol_fast.train ARGS` (behind `prefix`, e.g. a `timeout` command) with stdout/stderr piped."""
    return subprocess.Popen([*prefix, sys.executable, "-m", "byol_fast.train", *args], cwd=REPO, env=trainer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Poll `condition()` every 50 ms; fail when the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    """Lines in run_dir/metrics.jsonl so far (one per logged step with --log-every 1 and no kNN)."""
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def assert_same_state(state: dict, expected: dict) -> None:
    """The same step, weights and LARS momentum, bit for bit."""
    assert state["step"] == expected["step"]
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    for key, entry in expected["optimizer"]["state"].items():
        assert torch.equal(state["optimizer"]["state"][key]["momentum_buffer"], entry["momentum_buffer"]), key
