"""Peers benchmark: byol_fast against other BYOL code, same encoder, batch, image size and device, one run.

Rows, in the order they are measured (most valuable first; each on synthetic views already on the
device, warm-up excluded):

    byol_fast bf16+graph     the trainer's step on a GPU (bf16, channels_last, fused LARS, CUDA graph;
                             on a CPU the trainer's CPU step instead: fp32+fused-lars)
    byol-pytorch aug-off     lucidrains' BYOL (PyPI byol-pytorch) as its README uses it: fp32 eager,
                             Adam lr 3e-4, `learner(images)`, update_moving_average(); its built-in
                             augmentation replaced by identity so it does the model work we do;
                             simplicial embeddings off (its 0.9 default adds a layer the paper has not)
    byol-pytorch bf16        aug-off under bf16 autocast with a channels_last model and input: what a
                             user would add to it, so the speedup is not merely one of precision
    lightly blocks           lightly's BYOL example: BYOLProjectionHead/PredictionHead,
                             NegativeCosineSimilarity, update_momentum, SGD lr 0.06, fp32 eager
    byol_fast fp32-eager     the same model as the seed repositories run it (step_bench's baseline)
    byol-pytorch aug-on      aug-off with its default GPU augmentation (one random draw per batch)

lucidrains' learner concatenates the two views into one batch (BatchNorm statistics over
both views, as the paper does not); ours and lightly's forward each view on its own.
The encoder is torchvision's ResNet without its fc layer everywhere.

    python -m benchmarks.peers_bench                    # GPU: ResNet-50, 224, batch 256
    python -m benchmarks.peers_bench --small --device cpu
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from benchmarks.common import (BenchResult, Column, PlotSpec, apply_threads, bench_parser, flops_per_image,
                               oom_or_error, peak_flops, peak_memory_gib, reset_peak_memory, resolve_device,
                               warm_and_time)
from benchmarks.step_bench import measure_variant, release
from byol_fast.run_log import mfu

EMBEDDING = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


def lucidrains_step(arch: str, batch: int, image_size: int, device: torch.device,
                    augment: bool, bf16: bool = False) -> Callable[[], None]:
    """One training step of byol-pytorch as its README writes it (fp32, Adam 3e-4); with `bf16`, under
    bf16 autocast with channels_last model and input."""
    from byol_pytorch import BYOL

    layout = torch.channels_last if bf16 else torch.contiguous_format
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
    net = getattr(torchvision.models, arch)().to(device, memory_format=layout)
    extra = {} if augment else {"augment_fn": nn.Identity()}
    learner = BYOL(net, image_size=image_size, hidden_layer="avgpool", use_simplicial_embeddings=False, **extra)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4)
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with precision:
            loss = learner(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.update_moving_average()

    return step


def lightly_step(arch: str, batch: int, image_size: int, device: torch.device) -> Callable[[], None]:
    """One training step of lightly's BYOL example built from its blocks (fp32, SGD 0.06)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    class LightlyBYOL(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(*list(getattr(torchvision.models, arch)().children())[:-1])
            self.projection_head = BYOLProjectionHead(EMBEDDING[arch], 4096, 256)
            self.prediction_head = BYOLPredictionHead(256, 4096, 256)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    model = LightlyBYOL().to(device)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    x0, x1 = (torch.randn(batch, 3, image_size, image_size, device=device) for _ in range(2))

    def step() -> None:
        update_momentum(model.backbone, model.backbone_momentum, m=0.99)
        update_momentum(model.projection_head, model.projection_head_momentum, m=0.99)
        p0, p1 = model(x0), model(x1)
        z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


PEERS = {
    "byol-pytorch aug-off": ("byol-pytorch", "fp32", lambda a, b, s, d: lucidrains_step(a, b, s, d, augment=False)),
    "byol-pytorch bf16": ("byol-pytorch", "bf16",
                          lambda a, b, s, d: lucidrains_step(a, b, s, d, augment=False, bf16=True)),
    "lightly blocks": ("lightly", "fp32", lightly_step),
    "byol-pytorch aug-on": ("byol-pytorch", "fp32", lambda a, b, s, d: lucidrains_step(a, b, s, d, augment=True)),
}
"""Row name -> (distribution, precision, step factory)."""
ROW_ORDER = ["ours", "byol-pytorch aug-off", "byol-pytorch bf16", "lightly blocks", "fp32-eager", "byol-pytorch aug-on"]
"""Most valuable first, so a run stopped by the sweep's time cap keeps the rows the README's speedups need."""


def measure_peer(name: str, arch: str, batch: int, image_size: int, device: torch.device, peak: float,
                 target_s: float, min_calls: int, max_calls: int) -> dict:
    """One row for a peer library, or a status naming what is missing."""
    distribution, precision, make = PEERS[name]
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    row = {"code": name, "version": version, "arch": arch, "batch": batch, "image_size": image_size,
           "precision": precision, "status": "ok", "images_per_s": None, "step_ms": None, "mfu": None,
           "peak_mem_gib": None}
    if version is None:
        return {**row, "status": f"skipped: {distribution} is not installed (pip install {distribution}; "
                                 "the GPU sweep installs it from .whl/)"}
    reset_peak_memory(device)
    step = None
    try:
        step = make(arch, batch, image_size, device)
        calls, seconds = warm_and_time(step, device, 3, target_s, min_calls, max_calls)
    except Exception as err:  # a peer failing (OOM, API change) must not hide the other rows
        row["status"] = oom_or_error(err)
    else:
        images_per_s = batch / seconds
        row.update(images_per_s=round(images_per_s, 1), step_ms=round(seconds * 1e3, 2),
                   mfu=round(mfu(images_per_s, flops_per_image(arch, image_size), peak), 4),
                   peak_mem_gib=peak_memory_gib(device), timed_calls=calls)
    finally:
        del step
        release(device)
    return row


NOTES = [
    "byol-pytorch runs as its README shows: fp32 eager, Adam lr 3e-4, learner(images), update_moving_average(); "
    "aug-off replaces its built-in augmentation with identity so it does only the model work byol_fast's step does; "
    "aug-on keeps its default GPU augmentation (one random draw per batch); bf16 is aug-off under bf16 autocast "
    "with a channels_last model and input. Simplicial embeddings are off (its 0.9 default adds a layer the BYOL "
    "paper has not).",
    "lightly runs as its BYOL example: BYOLProjectionHead/PredictionHead, NegativeCosineSimilarity, update_momentum, "
    "SGD lr 0.06, fp32 eager.",
    "byol-pytorch concatenates the two views into one batch (BatchNorm statistics over both views); byol_fast and "
    "lightly forward each view on its own. The encoder is torchvision's ResNet without its fc layer everywhere; "
    "every row uses the same batch, image size and device, in one process.",
]

COLUMNS = [Column("code", "code"), Column("version", "version"), Column("arch", "arch"), Column("batch", "batch"),
           Column("image_size", "size"), Column("precision", "precision"),
           Column("images_per_s", "images/s", "{:,.0f}"), Column("step_ms", "step ms", "{:.1f}"),
           Column("mfu", "MFU", "{:.1%}"), Column("speedup", "row 1 is this much faster", "{:.2f}x"),
           Column("peak_mem_gib", "peak mem GiB", "{:.1f}"), Column("status", "status")]


def build_parser():
    """Arguments of the peers benchmark."""
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=None, help="encoder (default resnet50; --small resnet18)")
    parser.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 256; --small 8)")
    parser.add_argument("--image-size", type=int, default=None, help="view side (default 224; --small 32)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 2; --small 0)")
    parser.add_argument("--min-steps", type=int, default=None, help="fewest timed steps (default 5; --small 2)")
    parser.add_argument("--max-steps", type=int, default=60, help="most timed steps per row")
    parser.add_argument("--name", default="peers", help="result file prefix (default peers)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measures byol_fast and the peers in one process; writes benchmarks/results/<name>-*."""
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    small = args.small
    threads = apply_threads(args)
    torch.backends.cudnn.benchmark = True
    arch = args.arch or ("resnet18" if small else "resnet50")
    batch = args.batch or (8 if small else 256)
    size = args.image_size or (32 if small else 224)
    target_s = args.seconds if args.seconds is not None else (0.0 if small else 2.0)
    min_calls = args.min_steps or (2 if small else 5)
    peak = peak_flops(device)
    ours = "bf16+graph" if device.type == "cuda" else "fp32+fused-lars"
    settings = {"arch": arch, "batch": batch, "image_size": size, "cpu_threads": threads, "cudnn_benchmark": True,
                "seconds_per_row": target_s}
    result = BenchResult(args.name, "BYOL step throughput: byol_fast and peer libraries", device, settings, COLUMNS,
                         PlotSpec("images_per_s", ["code"], "images/s", f"BYOL {arch} step, batch {batch}"),
                         out_dir=args.out_dir)
    result.notes += args.note
    result.extra["peak"] = peak
    result.notes += NOTES
    for name in ROW_ORDER:
        if name in PEERS:
            result.add_row(measure_peer(name, arch, batch, size, device, peak["flops"], target_s, min_calls,
                                        args.max_steps))
            continue
        variant = ours if name == "ours" else name
        row = measure_variant(arch, batch, size, variant, device, peak["flops"], target_s=target_s,
                              min_calls=min_calls, max_calls=args.max_steps)
        result.add_row({"code": f"byol_fast {variant}", "version": "this commit", "arch": arch, "batch": batch,
                        "image_size": size, "precision": row["precision"], "status": row["status"],
                        "images_per_s": row["images_per_s"], "step_ms": row["step_ms"], "mfu": row["mfu"],
                        "peak_mem_gib": row["peak_mem_gib"]})
    fastest = result.rows[0]["images_per_s"]
    for row in result.rows:
        if fastest and row["images_per_s"]:
            row["speedup"] = round(fastest / row["images_per_s"], 2)
    for path in result.finish():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
