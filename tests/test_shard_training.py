"""`byol-fast train` on shards served over HTTP from 127.0.0.1: the demo preset on every backend that reads shards,
and a 2-rank torchrun (gloo, 2 workers per rank) stopped mid-epoch that resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from run_helpers import REPO, assert_same_state, one_thread, trainer_env  # noqa: F401
from test_shard_loading import serve

from byol_fast import train
from byol_fast.checkpoint import CheckpointManager
from pipelines.shards.convert import convert_to_shards
from pipelines.sources import load_images
from pipelines.synthetic import make_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def http_shards(tmp_path_factory):
    """16 shards of 8 images (128: two demo steps of 64) on a loopback HTTP server; yields the URL pattern."""
    root = tmp_path_factory.mktemp("images")
    make_synthetic(root, images=128, classes=4, workers=2)
    out = tmp_path_factory.mktemp("shards") / "out"
    convert_to_shards(load_images(root / "train"), out, samples_per_shard=8, workers=2)
    server, base = serve(out)
    yield base + "/train-{000000..000015}.tar"
    server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_the_demo_trains_on_http_shards(backend, http_shards, tmp_path, capsys):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    run_dir = tmp_path / "run"
    args = ["--preset", "demo", "--data", http_shards, "--data-backend", backend, "--max-steps", "2",
            "--device", "cpu", "--no-tensorboard", "--log-every", "1", "--run-dir", str(run_dir)]
    assert train.main(args) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert f"{backend} data on cpu" in err and "no kNN monitor: it takes its labelled bank from an image folder" in err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["bad_samples"] == 0 for r in records)
    assert all(3.0 < r["loss"] < 4.5 for r in records)  # 2 - 2cos summed over two directions, near 4 at init
    assert torch.load(CheckpointManager(run_dir).path_for(2))["step"] == 2


ARGS = ["--arch", "resnet18", "--image-size", "32", "--global-batch", "8", "--epochs", "2", "--warmup-epochs", "1",
        "--projection-hidden-size", "64", "--prediction-hidden-size", "64", "--no-tensorboard", "--device", "cpu",
        "--log-every", "1", "--checkpoint-every", "0", "--knn-every-epochs", "0", "--data-backend", "torchvision",
        "--workers", "2", "--shuffle-buffer", "16"]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "byol_fast.train", *args]
    return subprocess.run(command, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_ranks_stopped_mid_epoch_resume_to_the_uninterrupted_weights(http_shards, tmp_path):
    # 128 samples, 2 ranks x 4: 16 steps per epoch; the stop at step 21 is mid-epoch 1.
    whole = _torchrun(ARGS + ["--data", http_shards, "--max-steps", "24", "--run-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "global batch 8 (2 rank(s))" in whole.stderr
    args = ARGS + ["--data", http_shards, "--run-dir", str(tmp_path / "parts")]
    first = _torchrun(args + ["--max-steps", "21"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(CheckpointManager(tmp_path / "parts").path_for(21))["position"]["batch"] == 5
    second = _torchrun(args + ["--max-steps", "24"])
    assert second.returncode == 0, second.stderr[-3000:]
    final = CheckpointManager(tmp_path / "whole").path_for(24)
    assert_same_state(torch.load(CheckpointManager(tmp_path / "parts").path_for(24)), torch.load(final))
