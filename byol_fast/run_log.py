"""What a run records: provenance, resolved config, metrics (JSONL + TensorBoard), progress, MFU.

    run_dir/config.json        the resolved configuration (of the latest attempt, when a run resumed)
    run_dir/provenance.json    git SHA, versions, devices, host, command line, start time (the same)
    run_dir/attempts.jsonl     {"config", "provenance"} of every attempt, oldest first
    run_dir/metrics.jsonl      one JSON object per logged step, flushed as written; "attempt" is its
                               line number in attempts.jsonl (from 1): a run resumed from a checkpoint
                               logs the steps after it again, and the later attempt's line is the one
                               that led to the final weights
    run_dir/tensorboard/       the same scalars, when the tensorboard package is installed

Only rank 0 writes; on other ranks every RunLogger method does nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.metadata
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

# Distribution names to report when installed (DALI ships one wheel per CUDA major version).
_OPTIONAL_DISTRIBUTIONS = {
    "torchvision": ("torchvision",),
    "numpy": ("numpy",),
    "nvidia_dali": ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"),
    "ffcv": ("ffcv",),
}


def _git(*args: str) -> str | None:
    """stdout of a git command run in this package's directory, or None when it fails."""
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                                text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def git_state() -> dict[str, Any]:
    """{"sha", "dirty"} of the checkout this code runs from; both None outside a git checkout.

    The repository must track this very file, so an installed copy that happens to sit
    inside someone else's repository (a venv in a project) reports None, not their SHA.
    """
    if _git("ls-files", "--error-unmatch", Path(__file__).name) is None:
        return {"sha": None, "dirty": None}
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def _version(distributions: tuple[str, ...]) -> str | None:
    """The installed version of the first of `distributions` found, else None (nothing is imported)."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _nccl_version() -> str | None:
    """NCCL's version as "major.minor.patch", None where torch was built without it."""
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError):
        return None


def provenance() -> dict[str, Any]:
    """Everything needed to say what produced a run: code, libraries, hardware, host, command, time."""
    cuda = torch.cuda.is_available()
    return {
        "git": git_state(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion: plain str, so checkpoints carrying it load safely
        **{key: _version(names) for key, names in _OPTIONAL_DISTRIBUTIONS.items()},
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": _nccl_version() if cuda else None,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": list(sys.argv),
        "utc_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _json_default(value: Any) -> Any:
    """Plain JSON forms for config values that are not JSON types; anything else is an error."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-serializable: "
                    "convert it to a number, string, list or dict before passing the config")


def _finite_or_none(value: Any) -> Any:
    """NaN/inf become null: metrics.jsonl stays strict JSON that any reader parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _steps_per_s(since: tuple[int, float] | None, step: int, now: float) -> float | None:
    """Steps per second from `since` = (step, time) to now; None when there is no such interval."""
    if since is None or step <= since[0] or now <= since[1]:
        return None
    return (step - since[0]) / (now - since[1])


def _open_lines(path: Path):
    """A line-buffered append handle on a JSONL file. A write cut short (a kill mid-line, a full disk) leaves
    a partial last line: it is ended first, so the next record does not run into it and become unreadable."""
    partial = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as existing:
            existing.seek(-1, os.SEEK_END)
            partial = existing.read(1) != b"\n"
    handle = open(path, "a", buffering=1, encoding="utf-8")
    if partial:
        handle.write("\n")
    return handle


class RunLogger:
    """Rank 0's record of a run; a no-op on every other rank.

    Args:
        run_dir: where config.json, provenance.json, attempts.jsonl, metrics.jsonl and tensorboard/ go.
        config: the resolved configuration (JSON types, dataclasses, paths, enums).
        rank: the global rank; only 0 writes anything.
        total_steps: the step count of the whole run, for the progress bar and ETA.
        tensorboard: also write TensorBoard scalars (warns once and goes on without them
            when the tensorboard package is missing).
        progress: show progress (a tqdm bar on a terminal, one plain line per log call otherwise).
        images_per_step: global images per optimizer step; gives images/s from wall time
            when a logged step carries no "images_per_s" metric.
        origin: this attempt's `provenance()`, when the caller already took it (default: taken here).
    """

    def __init__(self, run_dir: str | os.PathLike, config: dict, rank: int, total_steps: int,
                 tensorboard: bool = True, progress: bool = True, images_per_step: int | None = None,
                 origin: dict | None = None) -> None:
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self._writer = None
        self._bar = None
        self._progress = progress
        self._metrics_file = None
        self.attempt = 0  # this attempt's line in attempts.jsonl (from 1); set below on rank 0
        self._last: tuple[int, float] | None = None  # (step, monotonic time) of the previous shown log call
        self._first: tuple[int, float] | None = None  # the same of the first one: the ETA's rate counts from it
        self._start = time.monotonic()
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Serialize before writing anything, so a bad config fails without leaving half a run directory.
        config = json.loads(json.dumps(config, default=_json_default))
        origin = origin or provenance()
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (self.run_dir / "provenance.json").write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
        # The two files above describe the latest attempt; a resumed run may have changed settings that
        # do not affect the checkpoint (backend, precision, ...), so every attempt's pair is kept here.
        with _open_lines(self.run_dir / "attempts.jsonl") as attempts:
            attempts.write(json.dumps({"config": config, "provenance": origin}) + "\n")
        with open(self.run_dir / "attempts.jsonl", "rb") as attempts:
            self.attempt = sum(1 for _ in attempts)
        # Appending keeps the lines of earlier attempts when a run resumes; line buffering
        # hands each line to the OS as it is written, so a killed run loses none.
        self._metrics_file = _open_lines(self.run_dir / "metrics.jsonl")
        if tensorboard:
            self._writer = self._open_tensorboard()

    def _open_tensorboard(self):
        """A SummaryWriter on run_dir/tensorboard, or None (with one warning) when tensorboard is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            warnings.warn(f"TensorBoard logging is off ({error}); metrics still go to "
                          f"{self.run_dir / 'metrics.jsonl'}. Fix: pip install tensorboard", stacklevel=3)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float | int | None], show: bool = True) -> None:
        """Appends one metrics line, writes TensorBoard scalars and (with `show`) updates the progress display.

        `show=False` records side measurements (e.g. the kNN monitor) without touching the
        progress line or the step rate its ETA comes from.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        record = {"step": step, "attempt": self.attempt, "time": time.time(),
                  "elapsed_s": round(now - self._start, 3),
                  **{key: _finite_or_none(value) for key, value in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, step)
            self._writer.flush()
        if show:
            if self._progress:
                self._show(step, metrics, now)
            self._last = (step, now)
            self._first = self._first or self._last

    def _show(self, step: int, metrics: dict[str, Any], now: float) -> None:
        """Progress with loss, images/s (of the window since the previous log call) and an ETA.

        The ETA's rate is the average since the first log call of this attempt, so it is stable: a
        window's rate swings with what happened in it (a kNN pass, a checkpoint, a slow disk), and the
        first window, which holds warm-up and compilation, is left out. Pauses that recur (the kNN every
        few epochs) are in the average, as they will be in the remaining time.
        """
        images_per_s = metrics.get("images_per_s")
        window_rate = _steps_per_s(self._last, step, now)
        if images_per_s is None and window_rate is not None and self.images_per_step:
            images_per_s = window_rate * self.images_per_step
        parts = [f"{key} {value:.4g}" for key, value in metrics.items()
                 if key == "loss" and isinstance(value, float)]
        if images_per_s is not None:
            parts.append(f"{images_per_s:,.0f} img/s")
        average_rate = _steps_per_s(self._first, step, now)
        if average_rate:
            parts.append(f"ETA {_duration((self.total_steps - step) / average_rate)}")
        text = " | ".join(parts)
        if sys.stderr.isatty() and self._open_bar(step):
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text, refresh=True)
        else:
            print(f"step {step}/{self.total_steps} | {text}", file=sys.stderr, flush=True)

    def _open_bar(self, step: int) -> bool:
        """Creates the tqdm bar at the first logged step (so a resumed run starts mid-bar); False without tqdm."""
        if self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                return False
            # Our own ETA goes in the postfix; tqdm's would count the resumed steps as done at infinite speed.
            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}")
        return True

    def close(self) -> None:
        """Flushes and closes the metrics file, TensorBoard writer and progress bar; safe to call twice."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def measure_matmul_flops(device: torch.device, size: int = 8192, dtype: torch.dtype = torch.bfloat16,
                         repeats: int = 100, warmup: int = 50) -> float:
    """Dense matmul FLOP/s of one device on random data (`warmup` untimed, `repeats` timed products).

    The practical peak that MFU is quoted against (DESIGN.md). The defaults run ~0.2 s on an H100
    (8192^3 bf16 takes ~1.4 ms): long enough for an idle GPU's clocks to ramp up and cuBLAS to settle
    before the timing, which a few products would not be (an understated peak overstates every MFU).
    Syncs the device: call it once, at start-up, never in the training loop.
    """
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(warmup):
        torch.mm(a, b)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.mm(a, b)
        end.record()
        end.synchronize()  # sync: start-up only
        seconds = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        seconds = time.perf_counter() - begin
    return 2 * size**3 * repeats / seconds


def mfu(images_per_second: float, flops_per_image: float, peak_flops: float) -> float:
    """Model FLOP utilization: achieved FLOP/s over the device's peak FLOP/s (0.5 means 50%)."""
    if peak_flops <= 0 or flops_per_image <= 0:
        raise ValueError(f"peak_flops={peak_flops} and flops_per_image={flops_per_image} must be positive")
    return images_per_second * flops_per_image / peak_flops


@functools.lru_cache(maxsize=None)
def byol_step_flops_per_image(arch: str, image_size: int, *, projection_size: int = 256,
                              projection_hidden_size: int = 4096, prediction_hidden_size: int = 4096,
                              small_stem: bool = False) -> float:
    """FLOPs of one BYOL training step per source image (two views), counted, not guessed.

    Runs a real BYOL forward (online and target on both views) and backward at batch 2
    on the meta device under FlopCounterMode, so no memory or compute is spent. That
    counts online forward+backward (~3x forward) and target forward (1x) per view, as
    executed: the first convolution's input gradient, never computed, is not counted.
    Optimizer, EMA and BatchNorm are elementwise and left out. ResNet-50 at 224: ~65.1e9.
    A small-image stem (no stride, no max-pool) multiplies every later layer's cost by ~16.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from byol_fast.model import BYOL

    batch = 2  # BatchNorm needs more than one sample per view in training mode
    with torch.device("meta"), torch.enable_grad():
        learner = BYOL(arch, image_size=image_size, projection_size=projection_size,
                       projection_hidden_size=projection_hidden_size, prediction_hidden_size=prediction_hidden_size,
                       small_stem=small_stem)
        views = [torch.randn(batch, 3, image_size, image_size) for _ in range(2)]
        counter = FlopCounterMode(display=False)
        with counter:
            learner.train()(*views).backward()
    return counter.get_total_flops() / batch
