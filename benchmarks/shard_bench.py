"""Shard benchmark: each backend reading the same JPEGs as a folder, as local WebDataset shards, and as shards from
a loopback HTTP server; images/s and CPU cores used (pipeline_bench's measurement, row for row).

The shards are written by `convert_to_shards` (the same bytes as the folder's files) into a temporary folder and
served by http.server in a thread of this process on 127.0.0.1, so the HTTP rows' CPU includes serving
(small: the server copies files in 64 KB chunks). DALI reads local shards with fn.readers.webdataset and its
index files, and HTTP shards through the stream reader that feeds its external source (pipelines/shards/dali.py).

    python -m benchmarks.shard_bench --small --device cpu     # CPU: 64 px views, batch 16, 512 images
    python -m benchmarks.shard_bench                          # GPU machine: 224 px, batch 256, 8192 images
"""

from __future__ import annotations

import functools
import http.server
import os
import tempfile
import threading
from pathlib import Path

from benchmarks.common import (BenchResult, Column, PlotSpec, apply_threads, bench_parser, resolve_device,
                               synthetic_train_dir)
from benchmarks.pipeline_bench import describe, measure_backend
from pipelines.shards.convert import convert_to_shards
from pipelines.sources import load_images
from pipelines.spec import AugmentationSpec

BACKENDS = ("torchvision", "torch", "dali")
SOURCES = ("folder", "shards-local", "shards-http")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A loopback HTTP server for `folder` in a daemon thread; returns it and its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


COLUMNS = [Column("backend", "backend"), Column("source", "source"), Column("where", "where the work runs"),
           Column("images_per_s", "images/s", "{:,.0f}"), Column("cpu_cores_used", "CPU cores used", "{:.2f}"),
           Column("images_per_core_s", "images/s per core", "{:,.0f}"), Column("batch_ms", "batch ms", "{:.1f}"),
           Column("epoch_start_s", "epoch start s", "{:.2f}"), Column("status", "status")]


def build_parser():
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default 8192; --small 512)")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="default 1000; --small 64")
    parser.add_argument("--batch", type=int, default=None, help="default 256; --small 16")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; --small 64")
    parser.add_argument("--workers", type=int, default=None, help="processes/threads per backend (default: cores)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per row (default 5; --small 3)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--name", default="shards")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    small = args.small
    workers = args.workers or len(os.sched_getaffinity(0))
    threads = apply_threads(args)
    train_dir = synthetic_train_dir(None, args.images or (512 if small else 8192), workers)
    spec = AugmentationSpec(image_size=args.image_size or (64 if small else 224))
    batch = args.batch or (16 if small else 256)
    per_shard = args.samples_per_shard or (64 if small else 1000)
    images = load_images(train_dir)
    settings = {"images": len(images), "samples_per_shard": per_shard, "batch": batch, "image_size": spec.image_size,
                "workers": workers, "cpu_threads_main": threads, "shuffle_buffer": 1000}
    result = BenchResult(args.name, "Shards vs folder: images/s and CPU cores per backend", device, settings, COLUMNS,
                         PlotSpec("images_per_s", ["backend", "source"], "images/s", "Shards vs folder"),
                         out_dir=args.out_dir)
    result.notes += args.note
    result.notes.append("An image is one source image (two views). Warm-up is all of epoch 0; the timed batches "
                        "lie inside epoch 1. The HTTP server runs in a thread of the measured process.")
    with tempfile.TemporaryDirectory(prefix="byol-shard-bench-") as workdir:
        shard_dir = Path(workdir) / "shards"
        manifest = convert_to_shards(images, shard_dir, per_shard, workers=workers)
        pattern = f"train-{{000000..{len(manifest.shards) - 1:06d}}}.tar"
        server, base = serve(shard_dir)
        sources = {"folder": str(train_dir), "shards-local": str(shard_dir / pattern),
                   "shards-http": f"{base}/{pattern}"}
        try:
            for backend in args.backends.split(","):
                for source in SOURCES:
                    row = measure_backend(backend, sources[source], Path(workdir), spec, batch, device, workers,
                                          warmup=1, target_s=args.seconds if args.seconds is not None else
                                          (3.0 if small else 5.0), min_batches=3 if small else 8, max_batches=200)
                    row.update(source=source, where=describe(backend, device, workers)
                               + (" (fn.readers.webdataset)" if backend == "dali" and source == "shards-local" else
                                  " (stream reader feeding DALI)" if backend == "dali" and source == "shards-http"
                                  else ""))
                    result.add_row(row)
        finally:
            server.shutdown()
    for path in result.finish():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
