"""End-to-end benchmark: BYOL training throughput from JPEG files, and how long the step waits on data.

The loop is the trainer's: a data backend writes each batch straight into the
TrainStep's static inputs (`out=step.inputs`), lr and tau are written into their
device tensors, and the step runs (one CUDA-graph replay on a GPU). Per backend:

    images/s        source images per second over the timed steps (sync at the edges only)
    data wait %     GPU: share of the timed region in which the GPU was not running a
                    training step (gaps between CUDA events recorded around each step,
                    so it counts augmentation kernels and idle time); CPU: share of wall
                    time spent inside next(loader)
    host wait %     share of wall time the Python loop spent inside next(loader)
    vs step alone   e2e images/s / images/s of the same TrainStep fed no new data

    python -m benchmarks.e2e_bench --data data/synthetic-bench-8192/train     # GPU: ResNet-50, 224, batch 256
    python -m benchmarks.e2e_bench --small --device cpu                       # CPU: ResNet-18, 32 px, batch 8
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (BenchResult, Column, CpuMeter, PlotSpec, apply_threads, bench_parser,
                               calibrated_calls, flops_per_image, oom_or_error, peak_flops, peak_memory_gib,
                               reset_peak_memory, resolve_device, synchronize, synthetic_train_dir, warm_and_time)
from benchmarks.pipeline_bench import describe, parse_backends, skip_reason, timed_backend_epoch
from benchmarks.step_bench import BASE_LR, TAU, VARIANTS, build_step, warmup_calls
from byol_fast.run_log import mfu
from byol_fast.schedules import CosineTau, WarmupCosineLR, scaled_lr
from byol_fast.step import TrainStep
from pipelines.spec import AugmentationSpec


def run_loop(step: TrainStep, batches, count: int, schedules: tuple, first_step: int) -> dict[str, float]:
    """`count` training steps fed by `batches`: wall seconds, and the data/host wait fractions (module docstring)."""
    lr_schedule, tau_schedule = schedules
    lr = step.optimizer.param_groups[0]["lr"]
    cuda = step.device.type == "cuda"
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(count)] if cuda else []
    host_wait = 0.0
    synchronize(step.device)  # sync: timer edge
    start = time.perf_counter()
    for k in range(count):
        asked = time.perf_counter()
        view1, view2 = next(batches)
        host_wait += time.perf_counter() - asked
        lr.fill_(lr_schedule(first_step + k))  # in-place writes into device tensors: no sync
        step.learner.tau.fill_(tau_schedule(first_step + k))
        if cuda:
            events[k][0].record()
        step(view1, view2)
        if cuda:
            events[k][1].record()
    synchronize(step.device)  # sync: timer edge
    wall = time.perf_counter() - start
    data_wait = host_wait / wall
    if cuda:
        # GPU time between the first step's start and the last step's end that no step ran in.
        region = events[0][0].elapsed_time(events[-1][1])
        stepping = sum(begin.elapsed_time(end) for begin, end in events)
        data_wait = max(0.0, region - stepping) / region
    return {"wall_s": wall, "host_wait": host_wait / wall, "data_wait": data_wait}


def measure_backend(backend: str, step: TrainStep, train_dir: Path, workdir: Path, spec: AugmentationSpec,
                    workers: int, *, arch: str, peak: float, target_s: float, min_steps: int, max_steps: int,
                    warmup: int, schedules: tuple) -> dict:
    """One row: the training loop fed by `backend`."""
    device, batch = step.device, step.batch_size
    row = {"backend": backend, "where": describe(backend, device, workers), "arch": arch, "batch": batch,
           "image_size": spec.image_size, "status": "ok", "images_per_s": None, "mfu": None,
           "data_wait_pct": None, "host_wait_pct": None, "cpu_cores_used": None}
    reason = skip_reason(backend)
    if reason:
        return {**row, "status": reason}
    try:
        with timed_backend_epoch(backend, train_dir, workdir, spec, batch, device, step.input_dtype, workers,
                                 lambda views: step(*views), warmup, out=step.inputs) as epoch:
            batches = epoch.batches
            probe = run_loop(step, batches, 2, schedules, warmup)
            high = min(max_steps, epoch.left - 2)
            count = calibrated_calls(probe["wall_s"] / 2, target_s, min(min_steps, high), high)
            meter = CpuMeter()
            meter.start()
            timed = run_loop(step, batches, count, schedules, warmup + 2)
            cores = meter.stop() / timed["wall_s"]
    except Exception as err:  # one broken backend must not hide the others
        row["status"] = oom_or_error(err)
    else:
        images_per_s = count * batch / timed["wall_s"]
        row.update(images_per_s=round(images_per_s, 1), step_ms=round(timed["wall_s"] / count * 1e3, 2),
                   mfu=round(mfu(images_per_s, flops_per_image(arch, spec.image_size), peak), 4),
                   data_wait_pct=round(100 * timed["data_wait"], 1), host_wait_pct=round(100 * timed["host_wait"], 1),
                   cpu_cores_used=round(cores, 2), timed_steps=count,
                   epoch_start_s=round(max(0.0, epoch.first_batch_s - timed["wall_s"] / count), 3))
    return row


COLUMNS = [Column("backend", "backend"), Column("arch", "arch"), Column("batch", "batch"),
           Column("image_size", "size"), Column("images_per_s", "images/s", "{:,.0f}"), Column("mfu", "MFU", "{:.1%}"),
           Column("data_wait_pct", "data wait %", "{:.1f}"), Column("host_wait_pct", "host wait %", "{:.1f}"),
           Column("vs_step_pct", "% of step alone", "{:.0f}"), Column("cpu_cores_used", "CPU cores", "{:.1f}"),
           Column("epoch_start_s", "epoch start s", "{:.2f}"),
           Column("status", "status")]


def build_parser():
    """Arguments of the end-to-end benchmark."""
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: synthetic JPEGs under data/)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images without --data (default 8192; "
                        "--small 64)")
    parser.add_argument("--backends", default="dali,torch,torchvision,ffcv",
                        help="comma list, measured in this order (missing ones are skipped)")
    parser.add_argument("--arch", default=None, help="encoder (default resnet50; --small resnet18)")
    parser.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 256; --small 8)")
    parser.add_argument("--image-size", type=int, default=None, help="view side (default 224; --small 32)")
    parser.add_argument("--variant", default=None, choices=list(VARIANTS),
                        help="step variant (default: the trainer's, bf16+graph on a GPU, fp32+fused-lars on a CPU)")
    parser.add_argument("--workers", type=int, default=None, help="loader processes/threads (default: cores)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per backend (default 8; --small 0)")
    parser.add_argument("--min-steps", type=int, default=None, help="fewest timed steps (default 10; --small 3)")
    parser.add_argument("--max-steps", type=int, default=400, help="most timed steps per backend")
    parser.add_argument("--name", default="e2e", help="result file prefix (default e2e)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measures the training loop per backend and the step alone; writes benchmarks/results/<name>-*."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    small = args.small
    backends = parse_backends(args.backends)
    workers = args.workers or len(os.sched_getaffinity(0))
    threads = apply_threads(args)
    torch.backends.cudnn.benchmark = True
    arch = args.arch or ("resnet18" if small else "resnet50")
    batch = args.batch or (8 if small else 256)
    spec = AugmentationSpec(image_size=args.image_size or (32 if small else 224))
    variant = args.variant or ("bf16+graph" if device.type == "cuda" else "fp32+fused-lars")
    target_s = args.seconds if args.seconds is not None else (0.0 if small else 8.0)
    min_steps = args.min_steps or (3 if small else 10)
    train_dir = synthetic_train_dir(args.data, args.images or (64 if small else 8192), workers)
    peak = peak_flops(device)
    settings = {"data": str(train_dir), "arch": arch, "batch": batch, "image_size": spec.image_size,
                "variant": variant, "workers": workers, "cpu_threads_main": threads, "backends": backends}
    result = BenchResult(args.name, "End-to-end BYOL training throughput from JPEG files", device, settings,
                         COLUMNS, PlotSpec("images_per_s", ["backend", "arch", "batch"], "images/s",
                                           "End-to-end training images/s per data backend"), out_dir=args.out_dir)
    result.notes += args.note
    result.extra["peak"] = peak
    reset_peak_memory(device)
    step = build_step(arch, batch, spec.image_size, VARIANTS[variant], device)  # inputs hold random views
    total = 10_000  # schedules as in a run of that length; values do not change the cost of a step
    schedules = (WarmupCosineLR(scaled_lr(BASE_LR, batch), total, total // 10), CosineTau(TAU, total))
    for _ in range(warmup_calls(step)):  # eager warm-up and graph capture, on random views, before any backend
        step()
    with tempfile.TemporaryDirectory(prefix="byol-e2e-") as workdir:
        for backend in backends:
            warmup = 1 if small else 2  # untimed batches of epoch 1 (epoch 0 is always warm-up)
            result.add_row(measure_backend(backend, step, train_dir, Path(workdir), spec, workers, arch=arch,
                                           peak=peak["flops"], target_s=target_s, min_steps=min_steps,
                                           max_steps=args.max_steps, warmup=warmup, schedules=schedules))
    # The step alone, on whatever views the last backend left in its inputs.
    _, seconds = warm_and_time(step, device, 1, target_s / 2, min_steps, args.max_steps)
    alone = batch / seconds
    result.extra["step_alone"] = {"variant": variant, "images_per_s": round(alone, 1), "step_ms": round(seconds * 1e3, 2),
                                  "mfu": round(mfu(alone, flops_per_image(arch, spec.image_size), peak["flops"]), 4),
                                  "peak_mem_gib_whole_run": peak_memory_gib(device)}
    for row in result.rows:
        if row["status"] == "ok":
            row["vs_step_pct"] = round(100 * row["images_per_s"] / alone, 1)
    result.notes.append(f"The same TrainStep ({variant}) fed no new data: {alone:,.0f} images/s "
                        f"({seconds * 1e3:.1f} ms/step). Warm-up, graph capture and loader setup are excluded; "
                        "lr and tau are written every step as in training. Each backend's epoch 0 is warm-up; the timed steps lie "
                        "inside epoch 1 and 'epoch start s' is the extra time of its first step over a steady one.")
    for path in result.finish():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
