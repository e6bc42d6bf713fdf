"""Step benchmark: one BYOL training step on synthetic views already on the device.

Each variant adds one optimization to the one before it, so the table shows what
each is worth:

    fp32-eager          contiguous fp32, per-parameter LARS loop (what the seed repositories do)
    channels_last       + channels_last memory format
    bf16                + bf16 autocast
    bf16+fused-lars     + byol_fast.LARS (multi-tensor, sync-free) instead of the Python loop
    bf16+graph          + the whole step captured as one CUDA graph (the trainer's default on GPU)
    bf16+compile        bf16+fused-lars with the learner under torch.compile
    bf16+compile+graph  + the CUDA graph
    fp32+fused-lars     contiguous fp32 with byol_fast.LARS: what the trainer runs on a CPU

`--optimizer adamw` puts byol_fast.AdamW (also fused and sync-free) where the
fused variants have LARS: the ViT recipe, as the GPU sweep's ViT-S/16 row runs
it (`--archs timm/vit_small_patch16_224`, needs timm); the per-parameter
baseline is LARS only.

Per row: images/s (an image is one source image = two views), step ms, MFU against
the measured bf16 peak, peak GPU memory. Also: fused LARS vs the per-parameter loop
on BYOL ResNet-50's trainable parameters alone, and with --profile a kernel-time
breakdown of one eager step (where the time goes).

    python -m benchmarks.step_bench                       # GPU: ResNet-50/18 at 224, batch 64/128/256
    python -m benchmarks.step_bench --small --device cpu  # CPU: ResNet-18 at 32 px, batch 8
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from benchmarks.common import (BenchResult, Column, PlotSpec, apply_threads, bench_parser, flops_per_image,
                               oom_or_error, peak_flops, peak_memory_gib, reset_peak_memory, resolve_device,
                               time_calls, warm_and_time)
from byol_fast.lars import LARS, excluded_by_default
from byol_fast.model import BYOL
from byol_fast.optimizers import OPTIMIZERS, build_optimizer, peak_lr
from byol_fast.run_log import mfu
from byol_fast.schedules import scaled_lr
from byol_fast.step import TrainStep

# The 300-epoch recipe's optimizer settings (DESIGN.md); throughput does not depend on them.
BASE_LR, WEIGHT_DECAY, MOMENTUM, ETA, TAU = 0.3, 1e-6, 0.9, 1e-3, 0.99
# AdamW's: DINO's ViT-S/16 rate in our square-root rule, MAE's weight decay and beta2 (byol_fast/optimizers.py).
ADAMW_BASE_LR, ADAMW_WEIGHT_DECAY, ADAMW_BETAS = 1e-3, 0.05, (0.9, 0.95)


@dataclass(frozen=True)
class Variant:
    """How a TrainStep is configured for one benchmark row."""

    precision: str
    channels_last: bool
    fused_lars: bool
    cuda_graph: bool = False
    compile: bool = False


VARIANTS = {
    "fp32-eager": Variant("fp32", channels_last=False, fused_lars=False),
    "channels_last": Variant("fp32", channels_last=True, fused_lars=False),
    "bf16": Variant("bf16", channels_last=True, fused_lars=False),
    "bf16+fused-lars": Variant("bf16", channels_last=True, fused_lars=True),
    "bf16+graph": Variant("bf16", channels_last=True, fused_lars=True, cuda_graph=True),
    "bf16+compile": Variant("bf16", channels_last=True, fused_lars=True, compile=True),
    "bf16+compile+graph": Variant("bf16", channels_last=True, fused_lars=True, cuda_graph=True, compile=True),
    "fp32+fused-lars": Variant("fp32", channels_last=False, fused_lars=True),
}


class PerParameterLARS(torch.optim.Optimizer):
    """The slow baseline: LARS as a plain Python loop over parameters, one small op at a time.

    Same math as byol_fast.LARS (u = g + wd w; trust = eta ||w|| / ||u||, 1 where a norm is 0;
    m = momentum m + trust u; w -= lr m; parameters picked by `exclude` skip decay and trust),
    written independently of it. lr is a 0-dim device tensor as there, so TrainStep accepts it.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3, exclude: Callable[[Tensor], bool] = excluded_by_default) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))
        self.exclude = exclude
        for group in self.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad.clone()
                if not self.exclude(param):
                    update.add_(param, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update.mul_(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                momentum = state["momentum_buffer"]
                momentum.mul_(group["momentum"]).add_(update)
                param.sub_(momentum * group["lr"])


def build_step(arch: str, batch: int, image_size: int, variant: Variant, device: torch.device,
               warmup_steps: int = 3, optimizer_name: str = "lars") -> TrainStep:
    """A TrainStep for `variant` in the trainer's build order, its inputs filled with random views; fused variants
    use `optimizer_name` (lars or adamw) as the trainer builds it."""
    learner = BYOL(arch, image_size=image_size, tau=TAU).to(device)
    if optimizer_name == "adamw" and variant.fused_lars:
        optimizer = build_optimizer("adamw", learner, learner.trainable_parameters(),
                                    weight_decay=ADAMW_WEIGHT_DECAY, betas=ADAMW_BETAS)
        optimizer.param_groups[0]["lr"].fill_(peak_lr("adamw", ADAMW_BASE_LR, batch))
    else:
        optimizer_class = LARS if variant.fused_lars else PerParameterLARS
        optimizer = optimizer_class(learner.trainable_parameters(), lr=scaled_lr(BASE_LR, batch),
                                    momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eta=ETA)
    step = TrainStep(learner, optimizer, batch_size=batch, image_size=image_size, device=device,
                     precision=variant.precision, channels_last=variant.channels_last,
                     cuda_graph=variant.cuda_graph, compile=variant.compile, warmup_steps=warmup_steps)
    for buffer in step.inputs:
        buffer.copy_(torch.randn(buffer.shape, device=device))
    return step


def warmup_calls(step: TrainStep) -> int:
    """Untimed calls before timing: the eager warm-up and the capture for a graph, cuDNN autotuning otherwise."""
    return step.warmup_steps + 2 if step.cuda_graph else 2


def release(device: torch.device) -> None:
    """Frees what a finished row left behind before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def skip_reason(variant: Variant, device: torch.device, compile_allowed: bool,
                optimizer_name: str = "lars") -> str | None:
    """Why a variant cannot or should not run here, or None."""
    if optimizer_name != "lars" and not variant.fused_lars:
        return "skipped: the per-parameter baseline is LARS only"
    if variant.cuda_graph and device.type != "cuda":
        return "skipped: CUDA graphs need a CUDA device"
    if variant.compile and not compile_allowed:
        return "skipped: torch.compile takes minutes on a CPU (name the variant in --variants to force it)"
    return None


def measure_variant(arch: str, batch: int, image_size: int, name: str, device: torch.device, peak: float, *,
                    target_s: float, min_calls: int, max_calls: int, compile_allowed: bool = True,
                    optimizer_name: str = "lars") -> dict:
    """One table row: the variant's throughput, or a status saying why there is none."""
    variant = VARIANTS[name]
    row = {"arch": arch, "image_size": image_size, "batch": batch, "variant": name, **asdict(variant),
           "optimizer": optimizer_name if variant.fused_lars else "lars (per-parameter)",
           "status": "ok", "images_per_s": None, "step_ms": None, "mfu": None, "peak_mem_gib": None}
    reason = skip_reason(variant, device, compile_allowed, optimizer_name)
    if reason:
        return {**row, "status": reason}
    reset_peak_memory(device)
    step = None
    try:
        step = build_step(arch, batch, image_size, variant, device, optimizer_name=optimizer_name)
        # step() with no views: the synthetic views already sit in the static inputs,
        # as a pipeline writing straight into them would leave them.
        warmup = warmup_calls(step)
        calls, seconds = warm_and_time(step, device, warmup, target_s, min_calls, max_calls)
    except Exception as err:  # a failed row (OOM, capture/compile error) must not end the sweep
        row["status"] = oom_or_error(err)
    else:
        images_per_s = batch / seconds
        row.update(images_per_s=round(images_per_s, 1), step_ms=round(seconds * 1e3, 2),
                   mfu=round(mfu(images_per_s, flops_per_image(arch, image_size), peak), 4),
                   peak_mem_gib=peak_memory_gib(device), warmup_calls=warmup + 1, timed_calls=calls)
    finally:
        del step
        if variant.compile:
            torch._dynamo.reset()
        release(device)
    return row


def lars_only(arch: str, image_size: int, device: torch.device, target_s: float) -> dict:
    """ms per optimizer step of fused LARS and of the per-parameter loop on BYOL `arch`'s trainable parameters."""
    learner = BYOL(arch, image_size=image_size).to(device)
    params = learner.trainable_parameters()
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    result = {"arch": arch, "tensors": len(params), "parameters": sum(p.numel() for p in params)}
    for key, optimizer_class in (("fused_ms", LARS), ("per_parameter_ms", PerParameterLARS)):
        optimizer = optimizer_class(params, lr=0.1, weight_decay=WEIGHT_DECAY)
        _, seconds = warm_and_time(optimizer.step, device, 3, target_s, 5, 200)
        result[key] = round(seconds * 1e3, 3)
    result["speedup"] = round(result["per_parameter_ms"] / result["fused_ms"], 2)
    del learner, params
    release(device)
    return result


def kernel_category(name: str) -> str:
    """Coarse class of a kernel or op name, for the where-the-time-goes breakdown."""
    lowered = name.lower()
    for category, keys in (("optimizer+EMA (foreach)", ("foreach", "multi_tensor")),
                           ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "bn_")),
                           ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "cudnn")),
                           ("matmul", ("gemm", "matmul", "addmm", "cutlass", "cublas", "linear", "mm")),
                           ("copy/cast", ("copy", "cast", "to_copy", "contiguous"))):
        if any(key in lowered for key in keys):
            return category
    return "elementwise/other"


def profile_step(arch: str, batch: int, image_size: int, name: str, device: torch.device, steps: int = 3) -> dict:
    """Kernel (GPU) or op (CPU) self time per step of one warm variant, by category and top entries."""
    from torch.profiler import ProfilerActivity, profile

    step = build_step(arch, batch, image_size, VARIANTS[name], device)
    for _ in range(warmup_calls(step)):
        step()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        timing = time_calls(step, steps, device)
    totals: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        # On a GPU only kernel entries count (a CPU op's device time repeats its kernels'); on a CPU, op self time.
        if device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        self_us = _device_time(event) if device.type == "cuda" else event.self_cpu_time_total
        if self_us <= 0:
            continue
        category = kernel_category(event.key)
        totals[category] = totals.get(category, 0.0) + self_us / steps / 1e3
        top.append({"name": event.key[:120], "ms_per_step": round(self_us / steps / 1e3, 3),
                    "calls_per_step": event.count / steps, "category": category})
    del step
    release(device)
    if not totals:  # e.g. CUPTI unavailable: "100% idle" would be a made-up finding
        raise RuntimeError(f"the profiler recorded no {'kernels' if device.type == 'cuda' else 'ops'}")
    busy = sum(totals.values())
    wall_ms = timing.wall_s / steps * 1e3
    return {"arch": arch, "batch": batch, "variant": name, "step_ms": round(wall_ms, 2),
            "busy_ms": round(busy, 2), "idle_pct": round(100 * max(0.0, 1 - busy / wall_ms), 1),
            "categories_ms": {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "top": sorted(top, key=lambda e: -e["ms_per_step"])[:15]}


def _device_time(event) -> float:
    """Self GPU time of a profiler entry in microseconds (attribute renamed across torch versions)."""
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attribute):
            return float(getattr(event, attribute))
    return 0.0


COLUMNS = [Column("arch", "arch"), Column("image_size", "size"), Column("batch", "batch"),
           Column("variant", "variant"), Column("optimizer", "optimizer"),
           Column("images_per_s", "images/s", "{:,.0f}"),
           Column("step_ms", "step ms", "{:.1f}"), Column("mfu", "MFU", "{:.1%}"),
           Column("peak_mem_gib", "peak mem GiB", "{:.1f}"), Column("status", "status")]


def build_parser():
    """Arguments of the step benchmark."""
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=None, help="comma list (default resnet50,resnet18; --small: resnet18)")
    parser.add_argument("--batches", default=None, help="comma list of per-GPU batch sizes (default 256,128,64)")
    parser.add_argument("--image-size", type=int, default=None, help="view side (default 224; --small: 32)")
    parser.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 1.5; --small 0)")
    parser.add_argument("--min-steps", type=int, default=None, help="fewest timed steps (default 5; --small 3)")
    parser.add_argument("--max-steps", type=int, default=60, help="most timed steps per row")
    parser.add_argument("--lars-arch", default=None, help="arch for the LARS-only timing (default resnet50; "
                        "--small resnet18); 'none' skips it")
    parser.add_argument("--profile", action="store_true", help="add a kernel-time breakdown of one eager step")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="lars",
                        help="the fused variants' optimizer (default lars; adamw: the ViT recipe)")
    parser.add_argument("--name", default="step", help="result file prefix (default step)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep and writes benchmarks/results/<name>-<device>-<date>.{json,md,png}."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    small = args.small
    archs = (args.archs or ("resnet18" if small else "resnet50,resnet18")).split(",")
    batches = [int(b) for b in (args.batches or ("8" if small else "256,128,64")).split(",")]
    image_size = args.image_size or (32 if small else 224)
    names = (args.variants or ",".join(VARIANTS)).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: use names from {', '.join(VARIANTS)}")
    compile_allowed = device.type == "cuda" or args.variants is not None
    target_s = args.seconds if args.seconds is not None else (0.0 if small else 1.5)
    min_calls = args.min_steps or (3 if small else 5)
    torch.backends.cudnn.benchmark = True
    threads = apply_threads(args)
    peak = peak_flops(device)
    settings = {"cpu_threads": threads, "archs": archs, "batches": batches, "image_size": image_size, "variants": names,
                "seconds_per_row": target_s, "cudnn_benchmark": True,
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                "lr": f"{BASE_LR} x batch/256", "weight_decay": WEIGHT_DECAY, "tau": TAU, "optimizer": args.optimizer}
    if args.optimizer == "adamw":
        settings.update(lr=f"{ADAMW_BASE_LR} x sqrt(batch/256)", weight_decay=ADAMW_WEIGHT_DECAY,
                        betas=list(ADAMW_BETAS))
    result = BenchResult(args.name, "BYOL step throughput (synthetic views on the device)", device, settings,
                         COLUMNS, PlotSpec("images_per_s", ["arch", "batch", "variant"], "images/s",
                                           "BYOL step: images/s per variant"), out_dir=args.out_dir)
    result.notes += args.note
    result.extra["peak"] = peak
    result.notes.append("An image is one source image (two views). Warm-up and CUDA-graph capture/compilation "
                        "are excluded; the device is synchronized only at the edges of the timed region.")
    for arch in archs:
        for batch in batches:
            for name in names:
                result.add_row(measure_variant(arch, batch, image_size, name, device, peak["flops"],
                                               target_s=target_s, min_calls=min_calls, max_calls=args.max_steps,
                                               compile_allowed=compile_allowed, optimizer_name=args.optimizer))
    result.extra["ordering"] = ordering(result.rows)
    lars_arch = args.lars_arch or ("resnet18" if small else "resnet50")
    if lars_arch != "none":
        try:
            lars = lars_only(lars_arch, image_size, device, target_s=max(target_s, 0.5))
        except Exception as err:  # keep the rows already measured
            result.notes.append(f"LARS-only timing failed: {oom_or_error(err)}")
        else:
            result.extra["lars_only"] = lars
            result.notes.append(f"LARS alone on BYOL {lars['arch']}'s {lars['tensors']} trainable tensors "
                                f"({lars['parameters'] / 1e6:.1f} M parameters): fused {lars['fused_ms']} ms/step, "
                                f"per-parameter loop {lars['per_parameter_ms']} ms/step ({lars['speedup']}x).")
    if args.profile:
        try:
            result.extra["profile"] = profile_step(archs[0], batches[0], image_size, "bf16+fused-lars", device)
        except Exception as err:
            result.notes.append(f"profile failed: {oom_or_error(err)}")
        else:
            result.notes.append(profile_note(result.extra["profile"]))
    for path in result.finish():
        print(f"wrote {path}")
    return 0


def ordering(rows: list[dict]) -> dict[str, list[str]]:
    """Per (arch, batch): the variants that ran, fastest first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(f"{row['arch']} b{row['batch']}", []).append(row)
    return {key: [r["variant"] for r in sorted(group, key=lambda r: -r["images_per_s"])]
            for key, group in groups.items()}


def profile_note(prof: dict) -> str:
    """One line saying where an eager step's time goes."""
    parts = ", ".join(f"{k} {v} ms" for k, v in prof["categories_ms"].items())
    return (f"Profile of one eager {prof['variant']} step ({prof['arch']}, batch {prof['batch']}): wall "
            f"{prof['step_ms']} ms, kernels busy {prof['busy_ms']} ms ({prof['idle_pct']}% idle/launch-bound); {parts}.")


if __name__ == "__main__":
    raise SystemExit(main())
