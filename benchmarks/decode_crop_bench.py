"""Decode and crop alone: the torch backend's two per-batch stages before its colour stage, timed apart.

    decode   pipelines.torch_pipeline.decode_to_device on file bytes already in memory: nvJPEG's batched
             decode on a GPU (torchvision synchronizes the calling thread with its decode stream, so the
             caller is held for all of it: the pipeline runs it in its decode thread, a batch ahead of the
             step); libjpeg-turbo image by image on a CPU
    crop     both views' random resized crops of a decoded batch (TorchImagePipeline's crop stage, run by
             the training thread: every kernel it launches queues beside the step's)

Per stage and batch: wall ms (back to back, synchronized only at the edges of the timed region), GPU ms
(CUDA events around each call), host ms (how long the call holds its thread: decode's host sync, or the
time crop takes to launch its kernels) and, on a GPU, the kernels one call launches (profiler).

    python -m benchmarks.decode_crop_bench --data data/synthetic-bench-8192/train   # GPU: batch 256 at 224
    python -m benchmarks.decode_crop_bench --small --device cpu                     # CPU: batch 8 at 32
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import (BenchResult, Column, PlotSpec, apply_threads, bench_parser, oom_or_error,
                               resolve_device, synchronize, synthetic_train_dir)
from pipelines.sources import load_images
from pipelines.spec import AugmentationSpec
from pipelines.torch_pipeline import TorchImagePipeline, decode_to_device, read_bytes


def stage_timing(run: Callable[[int], object], calls: int, device: torch.device) -> dict[str, float | None]:
    """Per call of run(k), k = 0..calls-1: wall, host-held and (GPU) event milliseconds; syncs at the edges only."""
    cuda = device.type == "cuda"
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(calls)] if cuda else []
    held = 0.0
    synchronize(device)  # sync: timer edge
    start = time.perf_counter()
    for k in range(calls):
        if cuda:
            events[k][0].record()
        called = time.perf_counter()
        run(k)
        held += time.perf_counter() - called
        if cuda:
            events[k][1].record()
    synchronize(device)  # sync: timer edge
    wall = time.perf_counter() - start
    gpu = sum(begin.elapsed_time(end) for begin, end in events) / calls if cuda else None
    return {"wall_ms": 1e3 * wall / calls, "host_ms": 1e3 * held / calls, "gpu_ms": gpu}


def kernels_launched(run: Callable[[], object], device: torch.device) -> int | None:
    """GPU kernels (and copies) one call of `run` puts on the device, counted by the profiler; None on a CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        synchronize(device)
    return sum(event.count for event in prof.key_averages()
               if event.device_type == torch.autograd.DeviceType.CUDA)


def measure_stage(stage: str, run: Callable[[int], object], calls: int, batch: int, image_size: int,
                  device: torch.device) -> dict:
    """One row: `run` warmed up once (index `calls`), then timed over `calls` batches."""
    row = {"stage": stage, "batch": batch, "image_size": image_size, "status": "ok", "images_per_s": None,
           "wall_ms": None, "gpu_ms": None, "host_ms": None, "kernels": None}
    try:
        run(calls)  # warm-up: nvJPEG's handles, cuBLAS, the caching allocator
        timing = stage_timing(run, calls, device)
        kernels = kernels_launched(lambda: run(0), device)
    except Exception as err:  # one failing stage must not hide the other
        return {**row, "status": oom_or_error(err)}
    rounded = {key: None if value is None else round(value, 3) for key, value in timing.items()}
    return {**row, **rounded, "images_per_s": round(batch / timing["wall_ms"] * 1e3, 1), "kernels": kernels,
            "timed_batches": calls}


COLUMNS = [Column("stage", "stage"), Column("batch", "batch"), Column("image_size", "size"),
           Column("images_per_s", "images/s", "{:,.0f}"), Column("wall_ms", "wall ms", "{:.2f}"),
           Column("gpu_ms", "GPU ms", "{:.2f}"), Column("host_ms", "host ms", "{:.2f}"),
           Column("kernels", "kernels", "{:,}"), Column("status", "status")]


def build_parser():
    """Arguments of the decode-and-crop benchmark."""
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: synthetic JPEGs under data/)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images without --data (default 8192; "
                        "--small 64)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 256; --small 8)")
    parser.add_argument("--image-size", type=int, default=None, help="view side (default 224; --small 32)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per stage (default 8; --small 2)")
    parser.add_argument("--name", default="decode-crop", help="result file prefix (default decode-crop)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Times decode and crop apart; writes benchmarks/results/<name>-<device>-<date>.{json,md,png}."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    small = args.small
    threads = apply_threads(args)
    batch = args.batch or (8 if small else 256)
    calls = args.batches or (2 if small else 8)
    spec = AugmentationSpec(image_size=args.image_size or (32 if small else 224))
    workers = len(os.sched_getaffinity(0))
    images = load_images(synthetic_train_dir(args.data, args.images or (64 if small else 8192), workers))
    # calls + 1 batches (one for warm-up) of file bytes read up front, so no file I/O is timed.
    files = list(itertools.islice(itertools.cycle(images.files), batch * (calls + 1)))
    chunks = [files[i:i + batch] for i in range(0, len(files), batch)]
    datas = [[read_bytes(path) for path in chunk] for chunk in chunks]
    settings = {"data": str(args.data or "synthetic"), "batch": batch, "image_size": spec.image_size,
                "recipe": spec.recipe, "cpu_threads": threads}
    result = BenchResult(args.name, "Torch backend: decode and crop alone", device, settings, COLUMNS,
                         PlotSpec("images_per_s", ["stage"], "images/s", f"Decode and crop alone, batch {batch}"),
                         out_dir=args.out_dir)
    result.notes += args.note
    result.notes.append("Host ms is how long a call holds the thread that made it: for decode, torchvision's "
                        "synchronization with its nvJPEG stream (the pipeline decodes in its own thread, a batch "
                        "ahead); for crop, launching its kernels, which the training thread does between steps.")
    pipeline = TorchImagePipeline(images, spec, batch, device=device)
    decoded: list[list[torch.Tensor]] = [[] for _ in chunks]

    def decode(k: int) -> None:
        decoded[k] = decode_to_device(datas[k], chunks[k], device)

    generator = torch.Generator().manual_seed(0)
    try:
        result.add_row(measure_stage("decode", decode, calls, batch, spec.image_size, device))
        if result.rows[0]["status"] == "ok":
            crop = measure_stage("crop", lambda k: pipeline._crop_pairs(decoded[k], generator), calls, batch,
                                 spec.image_size, device)
        else:
            crop = {"stage": "crop", "batch": batch, "image_size": spec.image_size,
                    "status": "skipped: decode failed, so there is nothing to crop"}
        result.add_row(crop)
    finally:
        pipeline.close()
    for path in result.finish():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
