"""Pipeline benchmark: two-view batches per second from JPEG files, and the CPU cores each backend burns.

Every backend goes through pipelines.factory.build_train_loader, so each delivers
what the trainer consumes (both views, normalized, channels_last, in the training
dtype, on the training device); the timed region ends with a device sync, so GPU
work still queued is counted. Backends:

    torchvision  DataLoader, PIL decode + torchvision v2 transforms in worker processes (workers = cores)
    torch        torchvision.io decode (nvJPEG on a GPU) + batched torch augmentation on the device
    dali         NVIDIA DALI: nvJPEG mixed decode + GPU augmentation (its CPU mode on a CPU machine)
    ffcv         FFCV .beton: numba decode + crops on CPU threads, colour stage on the device

A backend whose package is missing gets a row saying so. CPU cores used = CPU
seconds of this process, its threads and its worker processes / wall seconds.

    python -m benchmarks.pipeline_bench --data data/synthetic-bench-8192/train   # GPU machine
    python -m benchmarks.pipeline_bench --small --device cpu                     # CPU: 64 px, batch 8
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (BenchResult, Column, CpuMeter, PlotSpec, apply_threads, bench_parser,
                               calibrated_calls, oom_or_error, resolve_device, synchronize, synthetic_train_dir)
from pipelines.factory import BACKENDS, TrainLoader, backend_installed, build_train_loader
from pipelines.sources import load_images
from pipelines.spec import AugmentationSpec

IMAGE_BACKENDS = [b for b in BACKENDS if b != "views"]  # "views" reads pre-made tensors, not JPEGs


def parse_backends(names: str) -> list[str]:
    """A comma list of image backends, refusing unknown names before any work."""
    backends = names.split(",")
    unknown = [b for b in backends if b not in IMAGE_BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}: use names from {', '.join(IMAGE_BACKENDS)}")
    return backends


def describe(backend: str, device: torch.device, workers: int) -> str:
    """Where a backend does its work, for the table."""
    on = "GPU" if device.type == "cuda" else "CPU"
    return {"torchvision": f"{workers} DataLoader processes (PIL + torchvision v2)",
            "torch": f"{workers} read threads, {'nvJPEG' if on == 'GPU' else 'CPU'} decode, torch aug on {on}",
            "dali": f"DALI {'GPU (nvJPEG mixed decode)' if on == 'GPU' else 'CPU mode'}, {workers} threads",
            "ffcv": f"FFCV {workers} numba threads (decode+crop), colour stage on {on}"}[backend]


WARM_EPOCH_CAP = 64
"""Most batches of epoch 0 run as warm-up (the synthetic sets' epochs are shorter than this)."""


@dataclass
class TimedEpoch:
    """Epoch 1 of a loader, positioned after its first `extra` + 1 batches (see start_timed_epoch)."""

    batches: Iterator[tuple]
    first_batch_s: float
    """Wall seconds of epoch 1's first batch, synchronized: the epoch-start latency plus one batch."""
    left: int
    """Batches still to come in epoch 1."""


def start_timed_epoch(loader: TrainLoader, consume: Callable[[tuple], None], device: torch.device,
                      extra: int) -> TimedEpoch:
    """Warm-up, then the timed epoch: all of epoch 0 (numba JIT, worker start-up, first reads; at most
    WARM_EPOCH_CAP batches), epoch 1's first batch timed alone, and `extra` more batches.

    Timing then stays inside epoch 1, and the epoch-start cost is reported on its own: on the
    short synthetic epochs a boundary every few batches would weigh far more than on ImageNet's.
    """
    if len(loader) < extra + 4:
        raise ValueError(f"an epoch of {len(loader)} batches is too short to time: use more images (--images) "
                         f"or a smaller --batch")
    warm = loader.batches(0)
    for item, _ in zip(warm, range(WARM_EPOCH_CAP)):
        consume(item)
    warm.close()
    batches = loader.batches(1)
    synchronize(device)  # sync: timer edge
    start = time.perf_counter()
    consume(next(batches))
    synchronize(device)  # sync: timer edge
    first = time.perf_counter() - start
    for _ in range(extra):
        consume(next(batches))
    return TimedEpoch(batches, first, len(loader) - 1 - extra)


def make_beton(train_dir: Path, workdir: Path, max_resolution: int) -> Path:
    """The FFCV file of the image folder (conversion is setup, not timed)."""
    from pipelines.ffcv_convert import convert_to_beton

    path = workdir / "train.beton"
    convert_to_beton(load_images(train_dir), path, max_resolution=max_resolution, num_workers=-1)
    return path



def skip_reason(backend: str) -> str | None:
    """The row status of a backend whose package is missing here, else None."""
    if backend_installed(backend):
        return None
    return f"skipped: {'nvidia.dali' if backend == 'dali' else backend} is not installed"


@contextlib.contextmanager
def timed_backend_epoch(backend: str, train_dir: Path, beton_dir: Path, spec: AugmentationSpec, batch: int,
                        device: torch.device, dtype: torch.dtype, workers: int, consume: Callable[[tuple], None],
                        warmup: int, out: tuple | None = None) -> Iterator[TimedEpoch]:
    """`backend` over the JPEGs (converted to .beton first for ffcv), warmed up by `start_timed_epoch`.

    Always closes the epoch and the loader, frees them and restores torch's thread count,
    which ffcv changes process-wide, so one backend cannot slow the next.
    """
    threads = torch.get_num_threads()
    loader = epoch = None
    try:
        source = make_beton(train_dir, beton_dir, max_resolution=512) if backend == "ffcv" else train_dir
        loader = build_train_loader(backend, source, spec, batch, device=device, dtype=dtype, workers=workers,
                                    out=out)
        epoch = start_timed_epoch(loader, consume, device, warmup)
        yield epoch
    finally:
        if epoch is not None:
            epoch.batches.close()
        if loader is not None:
            loader.close()
        del loader, epoch
        gc.collect()
        torch.set_num_threads(threads)

def measure_backend(backend: str, train_dir: Path, beton_dir: Path, spec: AugmentationSpec, batch: int,
                    device: torch.device, workers: int, warmup: int, target_s: float, min_batches: int,
                    max_batches: int) -> dict:
    """One row: the backend's images/s and CPU cores over a timed run of whole batches."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    row = {"backend": backend, "where": describe(backend, device, workers), "batch": batch,
           "image_size": spec.image_size, "status": "ok", "images_per_s": None, "batch_ms": None,
           "cpu_cores_used": None, "images_per_core_s": None}
    reason = skip_reason(backend)
    if reason:
        return {**row, "status": reason}
    try:
        setup = time.perf_counter()
        with timed_backend_epoch(backend, train_dir, beton_dir, spec, batch, device, dtype, workers,
                                 lambda item: None, warmup) as epoch:
            batches = epoch.batches
            row["setup_s"] = round(time.perf_counter() - setup, 1)
            probe = time.perf_counter()
            next(batches)
            synchronize(device)
            high = min(max_batches, epoch.left - 1)
            count = calibrated_calls(time.perf_counter() - probe, target_s, min(min_batches, high), high)
            meter = CpuMeter()
            meter.start()
            start = time.perf_counter()
            for _ in range(count):
                next(batches)
            synchronize(device)  # sync: timer edge
            wall = time.perf_counter() - start
            cores = meter.stop() / wall
    except Exception as err:  # one broken backend must not hide the others
        row["status"] = oom_or_error(err)
    else:
        images_per_s = count * batch / wall
        row.update(images_per_s=round(images_per_s, 1), batch_ms=round(wall / count * 1e3, 2),
                   cpu_cores_used=round(cores, 2), images_per_core_s=round(images_per_s / max(cores, 1e-9), 1),
                   epoch_start_s=round(max(0.0, epoch.first_batch_s - wall / count), 3), timed_batches=count)
    return row


COLUMNS = [Column("backend", "backend"), Column("where", "where the work runs"), Column("batch", "batch"),
           Column("image_size", "size"), Column("images_per_s", "images/s", "{:,.0f}"),
           Column("batch_ms", "batch ms", "{:.1f}"), Column("cpu_cores_used", "CPU cores used", "{:.2f}"),
           Column("images_per_core_s", "images/s per core", "{:,.0f}"),
           Column("epoch_start_s", "epoch start s", "{:.2f}"), Column("status", "status")]


def build_parser():
    """Arguments of the pipeline benchmark."""
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder (default: synthetic ImageNet-like JPEGs made under data/)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images when --data is not given "
                        "(default 8192; --small 64)")
    parser.add_argument("--backends", default=",".join(IMAGE_BACKENDS),
                        help=f"comma list of {', '.join(IMAGE_BACKENDS)} (default all; missing ones are skipped)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 256; --small 8)")
    parser.add_argument("--image-size", type=int, default=None, help="view side (default 224; --small 64)")
    parser.add_argument("--workers", type=int, default=None, help="processes/threads per backend (default: cores)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per backend (default 5; --small 0)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches of the timed epoch after its "
                        "first (epoch 0 is always warm-up; default 2; --small 1)")
    parser.add_argument("--min-batches", type=int, default=None, help="fewest timed batches (default 8; --small 3)")
    parser.add_argument("--max-batches", type=int, default=200, help="most timed batches (and at most the rest "
                        "of epoch 1)")
    parser.add_argument("--name", default="pipeline", help="result file prefix (default pipeline)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measures each backend and writes benchmarks/results/<name>-<device>-<date>.{json,md,png}."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    small = args.small
    backends = parse_backends(args.backends)
    cores = len(os.sched_getaffinity(0))
    workers = args.workers or cores
    threads = apply_threads(args)
    train_dir = synthetic_train_dir(args.data, args.images or (64 if small else 8192), workers)
    spec = AugmentationSpec(image_size=args.image_size or (64 if small else 224))
    batch = args.batch or (8 if small else 256)
    settings = {"data": str(train_dir), "images": len(load_images(train_dir)), "batch": batch,
                "image_size": spec.image_size, "workers": workers, "cpu_threads_main": threads,
                "dtype": "bf16" if device.type == "cuda" else "fp32", "backends": backends}
    result = BenchResult(args.name, "Two-view data pipelines: images/s from JPEG files", device, settings, COLUMNS,
                         PlotSpec("images_per_s", ["backend"], "images/s", "Pipeline throughput per backend"),
                         out_dir=args.out_dir)
    result.notes += args.note
    result.notes.append("An image is one source image (two augmented views). Setup (FFCV conversion, pipeline "
                        "build) and warm-up (all of epoch 0) are excluded; the timed batches lie inside epoch 1, "
                        "and 'epoch start s' is the extra time of epoch 1's first batch over a steady one.")
    with tempfile.TemporaryDirectory(prefix="byol-bench-") as workdir:
        for backend in backends:
            result.add_row(measure_backend(
                backend, train_dir, Path(workdir), spec, batch, device, workers,
                warmup=args.warmup if args.warmup is not None else (1 if small else 2),
                target_s=args.seconds if args.seconds is not None else (0.0 if small else 5.0),
                min_batches=args.min_batches or (3 if small else 8), max_batches=args.max_batches))
    ranked = sorted((r for r in result.rows if r["status"] == "ok"), key=lambda r: -r["images_per_s"])
    result.extra["ordering"] = [r["backend"] for r in ranked]
    if ranked:
        result.notes.append("Fastest first: " + " > ".join(f"{r['backend']} ({r['images_per_s']:,.0f}/s)"
                                                           for r in ranked) + ".")
    for path in result.finish():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
