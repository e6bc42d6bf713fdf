"""Shared pieces of the benchmarks: devices, timers, the measured peak, CPU use, and result files.

Timing follows DESIGN.md's performance rules: warm-up (and CUDA-graph capture) runs
before the timer starts, and the device is synchronized only at the two edges of a
timed region, never inside it. Every benchmark writes one result as
benchmarks/results/<name>-<device-slug>-<date>.{json,md,png}; the JSON holds
everything (provenance, settings, rows, notes, table columns, plot spec), so
benchmarks/report.py can rebuild the Markdown and the plot from it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from byol_fast.run_log import byol_step_flops_per_image, measure_matmul_flops, provenance
from pipelines.device import concrete_device

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1
PEAK_CACHE_ENV = "BYOL_BENCH_PEAK_CACHE"
"""Path of a JSON file holding the measured peak, so the processes of one sweep measure it once."""
GIT_SHA_ENV = "BYOL_FAST_GIT_SHA"
"""Commit to record when the code runs from a copy without .git (the device machine gets a bare tree)."""
GIT_DIRTY_ENV = "BYOL_FAST_GIT_DIRTY"
"""With GIT_SHA_ENV: "0" when the copied tree was that commit exactly, "1" when it held uncommitted changes."""
_KNOWN_GPUS = ("gh200", "h200", "h100", "a100", "a10g", "l40s", "l4", "v100", "t4", "b200", "b100", "rtx")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch.device parses it; with its index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu (with --small)")
    return concrete_device(device)


def device_name(device: torch.device) -> str:
    """The marketing name of a GPU, or the CPU model from /proc/cpuinfo (else the platform's processor)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """A short file-name tag: "h100", "h200", ... for known GPUs, "cpu" for the CPU."""
    if device.type != "cuda":
        return "cpu"
    name = device_name(device).lower()
    for known in _KNOWN_GPUS:
        if known in name:
            return known
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def device_info(device: torch.device) -> dict[str, Any]:
    """What the result files say about the machine, including how loaded its CPUs were."""
    info = {"type": device.type, "name": device_name(device), "slug": device_slug(device),
            "cpu_cores": len(os.sched_getaffinity(0)), "load_average": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    return info


def run_provenance() -> dict[str, Any]:
    """run_log.provenance(), with the commit (and whether the tree differed from it) taken from
    $BYOL_FAST_GIT_SHA and $BYOL_FAST_GIT_DIRTY where the tree has no .git."""
    record = provenance()
    if record["git"]["sha"] is None and os.environ.get(GIT_SHA_ENV):
        dirty = {"0": False, "1": True}.get(os.environ.get(GIT_DIRTY_ENV, ""))
        record["git"] = {"sha": os.environ[GIT_SHA_ENV], "dirty": dirty, "source": GIT_SHA_ENV}
    return record


def synchronize(device: torch.device) -> None:
    """Waits for all queued work on `device` (a no-op on the CPU). Call only at timer edges."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """One timed region: wall seconds between synchronized edges, and CUDA-event seconds on the current stream."""

    calls: int
    wall_s: float
    gpu_s: float | None


def time_calls(fn: Callable[[], Any], calls: int, device: torch.device) -> Timing:
    """Runs `fn` `calls` times between two synchronized edges; nothing inside the region syncs."""
    events = None
    synchronize(device)  # sync: timer edge
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        events[0].record()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if events is not None:
        events[1].record()
    synchronize(device)  # sync: timer edge
    wall = time.perf_counter() - start
    gpu = events[0].elapsed_time(events[1]) / 1e3 if events is not None else None
    return Timing(calls, wall, gpu)


def calibrated_calls(seconds_per_call: float, target_s: float, low: int, high: int) -> int:
    """How many calls fill about `target_s` seconds, clamped to [low, high]."""
    if seconds_per_call <= 0:
        return high
    return max(low, min(high, round(target_s / seconds_per_call)))


def warm_and_time(fn: Callable[[], Any], device: torch.device, warmup: int, target_s: float, min_calls: int,
                  max_calls: int) -> tuple[int, float]:
    """`warmup` untimed calls, one probe call to size the run, then a timed region of about `target_s`.

    The GPU's peak-memory window restarts after the warm-up (with the cache emptied), so peak_memory_gib()
    afterwards is the steady state's: a captured graph's pool is in it, cuDNN's autotuning workspaces are not.
    Returns (timed calls, seconds per call).
    """
    for _ in range(warmup):
        fn()
    reset_peak_memory(device)
    probe = time_calls(fn, 1, device)
    timing = time_calls(fn, calibrated_calls(probe.wall_s, target_s, min_calls, max_calls), device)
    return timing.calls, timing.wall_s / timing.calls


def peak_flops(device: torch.device) -> dict[str, Any]:
    """The measured matmul peak of `device` in FLOP/s, cached in $BYOL_BENCH_PEAK_CACHE when set.

    GPU: an 8192^3 bf16 product on random data (50 warm-ups, 100 timed), as DESIGN.md's
    MFU rule asks. CPU: a 1024^3 fp32 product (bf16 on most CPUs has no fast path; 3 warm-ups,
    10 timed), so CPU MFU figures are against fp32 and say so.
    """
    name = device_name(device)
    cache = os.environ.get(PEAK_CACHE_ENV)
    if cache and Path(cache).is_file():
        cached = json.loads(Path(cache).read_text())
        if cached.get("device") == name:
            return cached
    size, dtype, warmup, repeats = (8192, torch.bfloat16, 50, 100) if device.type == "cuda" else \
        (1024, torch.float32, 3, 10)
    result = {"device": name, "flops": measure_matmul_flops(device, size, dtype, repeats, warmup),
              "matmul": f"{size}^3", "dtype": str(dtype).removeprefix("torch."), "timed_products": repeats}
    if cache:
        Path(cache).write_text(json.dumps(result))
    return result


def flops_per_image(arch: str, image_size: int) -> float:
    """FLOPs of one BYOL step per source image, counted by run_log (ResNet-50 at 224: ~65.1e9)."""
    return byol_step_flops_per_image(arch, image_size)


def synthetic_train_dir(data: Path | None, images: int, workers: int) -> Path:
    """The image folder to read: `data` itself, or a synthetic tree of `images` JPEGs made once and reused.

    The tree goes to data/synthetic-bench-<images> (git-ignored) and is reused while its
    manifest says the current generator wrote it with these settings.
    """
    if data is not None:
        if not Path(data).exists():
            raise ValueError(f"--data {data} does not exist: point it at an image folder, or drop it to use "
                             f"synthetic JPEGs (pipelines.synthetic)")
        return Path(data)
    from pipelines.synthetic import make_synthetic, stale_reason

    root = RESULTS_DIR.parents[1] / "data" / f"synthetic-bench-{images}"
    if stale_reason(root, images) is not None:
        make_synthetic(root, images, workers=workers, overwrite=True)
    return root / "train"


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak-memory window on a GPU (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak bytes torch's caching allocator held (reserved) on the GPU since the last reset, in GiB; None on
    the CPU. Reserved, not allocated: a captured graph's activations live in its private pool, allocated at
    capture and never again at replay, so the allocated peak of a +graph row would leave them out."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 2)


class CpuMeter:
    """CPU seconds used by this process, its threads and its child processes between start() and stop().

    Live children (DataLoader workers) are read with psutil when it is installed; children
    that exit inside the window are counted through RUSAGE_CHILDREN once reaped.
    """

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self._process = None
        else:
            self._process = psutil.Process()
        self._start: tuple[float, dict[int, float]] | None = None

    def _snapshot(self) -> tuple[float, dict[int, float]]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
        live: dict[int, float] = {}
        if self._process is not None:
            import psutil

            for child in self._process.children(recursive=True):
                try:
                    times = child.cpu_times()
                except psutil.Error:  # exited between listing and reading
                    continue
                live[child.pid] = times.user + times.system
        return total, live

    @property
    def counts_live_children(self) -> bool:
        """False without psutil: then workers still alive at stop() are not counted."""
        return self._process is not None

    def start(self) -> None:
        """Opens the window."""
        self._start = self._snapshot()

    def stop(self) -> float:
        """CPU seconds used since start()."""
        if self._start is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        total, live = self._snapshot()
        used = total - self._start[0]
        used += sum(seconds - self._start[1].get(pid, 0.0) for pid, seconds in live.items())
        return used


@dataclass
class Column:
    """One column of a result's Markdown table: row key, header, and a format for numbers."""

    key: str
    header: str
    fmt: str = "{}"


@dataclass
class PlotSpec:
    """A bar chart of `value` per row, labelled by the row values of `label_keys`, for rows with status "ok"."""

    value: str
    label_keys: list[str]
    ylabel: str
    title: str


@dataclass
class BenchResult:
    """One benchmark run: rows added as they are measured, written after every row (a killed run keeps them)."""

    name: str
    title: str
    device: torch.device
    settings: dict[str, Any]
    columns: list[Column]
    plot: PlotSpec
    out_dir: Path = RESULTS_DIR
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = datetime.now(timezone.utc)
        self.info = device_info(self.device)
        self.provenance = run_provenance()

    @property
    def stem(self) -> Path:
        """results/<name>-<device-slug>-<date>, without a suffix."""
        return self.out_dir / f"{self.name}-{self.info['slug']}-{self.started:%Y-%m-%d}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of this result."""
        return {"benchmark": self.name, "title": self.title, "schema_version": SCHEMA_VERSION,
                "device": self.info, "provenance": self.provenance, "settings": self.settings,
                "started_utc": self.started.isoformat(timespec="seconds"),
                "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "rows": self.rows, "notes": self.notes, **self.extra,
                "columns": [asdict(c) for c in self.columns], "plot": asdict(self.plot)}

    def add_row(self, row: dict[str, Any]) -> None:
        """Appends a row, prints it, and rewrites the JSON file."""
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write_json()

    def write_json(self) -> Path:
        """Writes <stem>.json (atomically: a reader never sees half a file)."""
        path = self.stem.with_suffix(".json")
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(partial, path)
        return path

    def finish(self) -> list[Path]:
        """Writes the JSON, the Markdown table and (when matplotlib is installed) the PNG plot."""
        missing_plot = "no PNG: matplotlib is not installed on this machine"
        if not plotting_available() and missing_plot not in self.notes:
            self.notes.append(missing_plot)
        document = self.to_dict()
        paths = [self.write_json()]
        md = self.stem.with_suffix(".md")
        md.write_text(render_markdown(document), encoding="utf-8")
        paths.append(md)
        png = write_plot(document, self.stem.with_suffix(".png"))
        if png is not None:
            paths.append(png)
        return paths


def format_value(value: Any, fmt: str) -> str:
    """A table cell: "—" for missing values, `fmt` for numbers, str() for the rest."""
    if value is None:
        return "—"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value).replace("|", "/")


def render_markdown(document: dict[str, Any]) -> str:
    """The Markdown page of one result document: provenance header, the table, then the notes."""
    dev, prov = document["device"], document["provenance"]
    git = prov.get("git") or {}
    sha = git.get("sha") or "unknown"
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    versions = ", ".join(f"{k} {prov[k]}" for k in ("torch", "torchvision", "cuda", "nvidia_dali", "ffcv")
                         if prov.get(k))
    peak = document.get("peak")
    lines = [f"# {document['title']} — {dev['name']}", "",
             f"- device: {dev['name']} ({dev['type']}), {dev['cpu_cores']} CPU cores, "
             f"load average at start {dev.get('load_average')}",
             f"- measured {document['started_utc']}, git {sha}{dirty}; python {prov.get('python')}, {versions}",
             f"- command: `{prov.get('command')}`"]
    if peak:
        lines.append(f"- measured peak: {peak['flops'] / 1e12:.3g} TFLOP/s ({peak['matmul']} {peak['dtype']} matmul); "
                     "MFU is against it")
    lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in document["settings"].items()))
    if document.get("cut"):
        lines.append(f"- **cut short**: {document['cut']['reason']}; rows not listed were not measured")
    lines += ["", "| " + " | ".join(c["header"] for c in document["columns"]) + " |",
              "|" + "---|" * len(document["columns"])]
    for row in document["rows"]:
        lines.append("| " + " | ".join(format_value(row.get(c["key"]), c["fmt"]) for c in document["columns"]) + " |")
    if document["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in document["notes"]]
    return "\n".join(lines) + "\n"


def plotting_available() -> bool:
    """Whether matplotlib can be imported (it is optional on CPU machines)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plot(document: dict[str, Any], path: Path) -> Path | None:
    """Writes the document's bar chart to `path` (None when matplotlib is missing). A document with no "ok" row
    still gets a figure that says so, so every result page has its PNG and a gap in a sweep is visible there."""
    if not plotting_available():
        return None
    spec = document["plot"]
    rows = [r for r in document["rows"] if r.get("status") == "ok" and r.get(spec["value"]) is not None]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [" ".join(str(r.get(k)) for k in spec["label_keys"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.5))
    ax.bar(range(len(rows)), [r[spec["value"]] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(spec["ylabel"])
    if not rows:
        why = "cut short: " + document["cut"]["reason"] if document.get("cut") else "no row measured"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
    sha = ((document["provenance"].get("git") or {}).get("sha") or "unknown")[:10]
    ax.set_title(f"{spec['title']}\n{document['device']['name']}, git {sha}, {document['started_utc']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --device, --small (the CPU mode), --out-dir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: cuda when present)")
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes for a CPU machine or CI (small images, small batches, few steps)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help=f"where result files go (default {RESULTS_DIR})")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence for the result's notes (e.g. what else loaded the machine); repeatable")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op CPU threads (default: torch's choice; --small: 1, because OpenMP "
                             "spin-waiting on a shared, oversubscribed CPU is many times slower than one thread)")
    return parser


def apply_threads(args: argparse.Namespace) -> int:
    """Sets torch's intra-op thread count from --threads (1 with --small); returns the count in use."""
    threads = args.threads if args.threads is not None else (1 if args.small else None)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def oom_or_error(err: BaseException) -> str:
    """A row status for a failed measurement: "oom" for out-of-memory, else "error: <message>"."""
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "oom"
    message = " ".join(str(err).split())[:300]
    return f"error: {type(err).__name__}: {message}"
