"""The GPU benchmark sweep as one timed plan: sections in order of value, each under its own budget.

    python -m benchmarks.sweep --device cuda --out "$OUT"    # on a lent GPU (benchmarks/run_gpu_sweep.sh runs this)
    python -m benchmarks.sweep --device cpu --out /tmp/dry   # the CPU dry run: same plumbing, tiny sizes

Each section runs in its own process (a hang or a crash cannot take the sweep with it), stopped at
min(its budget, what is left of --deadline-s). Benchmarks write their JSON after every row, so a section
stopped early keeps what it measured; the sweep then marks its results as cut (a "cut" field with the reason),
writes a stand-in result for a section that left none, and rewrites every page (JSON, Markdown, PNG) and
$OUT/results.tar.gz and $OUT/summary.md before the next section starts. The plan, with the GPU budgets, is
in run_gpu_sweep.sh's header; tests/test_benchmarks.py holds the two to each other.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import report
from benchmarks.common import PEAK_CACHE_ENV, BenchResult, Column, PlotSpec, resolve_device, synthetic_train_dir
from benchmarks.pytest_rows import ROWS_ENV

REPO = Path(__file__).resolve().parents[1]
STEP_VARIANTS = "fp32-eager,channels_last,bf16,bf16+fused-lars,bf16+graph"


@dataclass(frozen=True)
class Section:
    """One step of the plan: a module run with arguments per device, under a budget per device."""

    name: str
    """Section name, and the name of the benchmark (result file prefix) it writes."""
    what: str
    """One line for the plan printed at the start."""
    module: str
    """The module run with `python -m` ("pytest" for the test section)."""
    gpu_args: tuple[str, ...]
    cpu_args: tuple[str, ...]
    """Arguments after --device/--small/--out-dir; "{data}" stands for the image folder."""
    gpu_budget_s: int
    cpu_budget_s: int
    """A cap for the dry run on a slow shared CPU, not an estimate; step-compile's is short on purpose: torch.compile
    takes minutes on a CPU, so the dry run shows a cut section."""


SETUP_BUDGET_S = {"cuda": 20, "cpu": 60}
"""Making the synthetic JPEGs (once per machine) and starting up, before the first section."""
PER_TEST_TIMEOUT_S = 60
"""pytest-timeout's limit per cuda test: one hung test must not take the whole test section."""
DATA_IMAGES = {"cuda": 8192, "cpu": 64}
SECTIONS = (
    Section("cuda-tests", "the cuda-marked tests: correctness before speed", "pytest",
            (), (), 90, 120),
    Section("e2e", "ResNet-50 at 224, batch 256, from JPEGs with the torch backend: images/s, data wait, MFU",
            "benchmarks.e2e_bench", ("--data", "{data}", "--backends", "torch", "--seconds", "6"),
            ("--data", "{data}", "--backends", "torch", "--min-steps", "1"), 60, 120),
    Section("peers", "byol-pytorch and lightly beside byol_fast at the same batch", "benchmarks.peers_bench",
            ("--seconds", "1.5"), ("--min-steps", "1"), 60, 120),
    Section("step", "the step variants at batch 256 in one process, LARS alone, a profile", "benchmarks.step_bench",
            ("--archs", "resnet50", "--batches", "256", "--variants", STEP_VARIANTS, "--seconds", "1.0",
             "--profile"),
            ("--variants", STEP_VARIANTS, "--min-steps", "1", "--profile"), 60, 120),
    Section("step-vit", "ViT-S/16 (timm) with AdamW at 224, batch 256: eager and captured", "benchmarks.step_bench",
            ("--name", "step-vit", "--archs", "timm/vit_small_patch16_224", "--batches", "256",
             "--variants", "bf16+fused-lars,bf16+graph", "--optimizer", "adamw", "--lars-arch", "none",
             "--seconds", "1.0"),
            ("--name", "step-vit", "--archs", "timm/test_vit", "--variants", "bf16+fused-lars", "--optimizer",
             "adamw", "--lars-arch", "none", "--min-steps", "1"), 30, 60),
    Section("decode-crop", "the torch backend's decode and crop stages alone", "benchmarks.decode_crop_bench",
            ("--data", "{data}"), ("--data", "{data}"), 20, 60),
    Section("pipeline", "the data pipelines alone (DALI and FFCV rows when installed)", "benchmarks.pipeline_bench",
            ("--data", "{data}", "--backends", "torch,torchvision,dali,ffcv", "--seconds", "4"),
            ("--data", "{data}", "--backends", "torch,torchvision", "--min-batches", "2", "--workers", "2"), 45, 120),
    Section("step-compile", "the step under torch.compile, with and without the CUDA graph", "benchmarks.step_bench",
            ("--name", "step-compile", "--archs", "resnet50", "--batches", "256",
             "--variants", "bf16+compile+graph,bf16+compile", "--lars-arch", "none", "--seconds", "1.0"),
            ("--name", "step-compile", "--variants", "bf16+compile", "--lars-arch", "none", "--min-steps", "1"),
            85, 15),
)
CALL_LIMIT_S = 480
"""The device call the GPU plan must fit (8 minutes): setup plus the sections' GPU budgets, plus the few seconds
run_gpu_sweep.sh spends before this module starts, stay under it."""
MIN_START_S = {"cuda": 10, "cpu": 1}
"""A section with less time than this left is not started (it is recorded as cut)."""


def cuda_test_files() -> list[str]:
    """The test files that hold cuda-marked tests, so collection imports no other test module."""
    return sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                  if "mark.cuda" in path.read_text(encoding="utf-8"))


def command(section: Section, device: str, data: Path, results: Path) -> list[str]:
    """The section's command line on `device` ("cuda" or "cpu")."""
    if section.module == "pytest":
        return [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                "-p", "benchmarks.pytest_rows", f"--timeout={PER_TEST_TIMEOUT_S}", *cuda_test_files()]
    args = section.gpu_args if device == "cuda" else section.cpu_args
    small = ("--small",) if device == "cpu" else ()
    return [sys.executable, "-m", section.module, "--device", device, *small, "--out-dir", str(results),
            *(arg.replace("{data}", str(data)) for arg in args)]


def run_capped(argv: list[str], cap_s: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Runs `argv` in its own process group for at most `cap_s` seconds: (exit code or None if stopped, seconds)."""
    start = time.monotonic()
    child = subprocess.Popen(argv, cwd=REPO, env=env, start_new_session=True)
    try:
        code = child.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        # The whole group: a benchmark's DataLoader workers and pytest's children too. SIGTERM first, so a
        # trainer under test can save; its rows are on disk already.
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        code = None
    return code, time.monotonic() - start


def section_documents(results: Path, name: str) -> list[dict]:
    """The result documents of one section's benchmark."""
    return [d for d in report.load_results(results) if d["benchmark"] == name]


def tests_document(rows_file: Path, device: torch.device, results: Path, argv: list[str], stopped: bool) -> None:
    """The test section's result: one row per collected test, from the rows pytest_rows wrote as tests ended."""
    collected: list[str] = []
    outcomes: dict[str, dict] = {}
    if rows_file.is_file():
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "collected" in record:
                collected = record["collected"]
            else:
                outcomes[record["test"]] = record
    columns = [Column("test", "test"), Column("outcome", "outcome"), Column("seconds", "seconds", "{:.1f}"),
               Column("message", "message")]
    result = BenchResult("cuda-tests", "GPU tests (pytest -m cuda)", device,
                         {"per_test_timeout_s": PER_TEST_TIMEOUT_S, "command": " ".join(argv[1:])},
                         columns, PlotSpec("seconds", ["test"], "seconds", "cuda-marked tests that passed"),
                         out_dir=results)
    for test in collected or list(outcomes):
        record = outcomes.get(test, {"outcome": "not run", "seconds": None,
                                     "message": "the section was stopped first" if stopped else "no report"})
        status = "ok" if record["outcome"] == "passed" else f"{record['outcome']}: {record['message']}"
        result.rows.append({"test": test.removeprefix("tests/"), "outcome": record["outcome"],
                            "seconds": record["seconds"], "message": record["message"], "status": status})
    result.write_json()


def record_outcome(name: str, device: torch.device, results: Path, argv: list[str], cut: str | None,
                   failure: str | None) -> None:
    """Marks a section's results as cut (`cut` says why) or notes its `failure`; a section that left no result
    gets a stand-in with no rows, so every section has its JSON, Markdown and PNG."""
    if not section_documents(results, name):
        stand_in = BenchResult(name, f"{name} (no rows)", device, {"command": " ".join(argv[1:])},
                               [Column("status", "status")], PlotSpec("images_per_s", [], "images/s", name),
                               out_dir=results)
        stand_in.notes.append(failure or ("It was stopped before its first row." if cut else "It wrote no result."))
        stand_in.write_json()
    for document in section_documents(results, name):
        path = results / document["_file"]
        if cut:
            report.mark_cut(path, cut)
        elif failure:
            document = json.loads(path.read_text(encoding="utf-8"))
            document["notes"].append(f"The benchmark {failure}.")
            path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def write_outputs(results: Path, out: Path) -> None:
    """Pages and index for every result, then $OUT's summary.md and results.tar.gz (replaced atomically)."""
    documents = report.load_results(results)
    report.rebuild_pages(documents, results)
    pages = [(results / Path(d["_file"]).with_suffix(".md").name).read_text(encoding="utf-8") for d in documents]
    summary = "# GPU sweep summary\n\n" + report.perf_table(documents) + "".join("\n" + page for page in pages)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz") as tar:
        tar.add(results, arcname="benchmarks/results")  # unpack at the repository root
    partial = out / "results.tar.gz.partial"
    partial.write_bytes(packed.getvalue())
    os.replace(partial, out / "results.tar.gz")


def run_section(section: Section, device: torch.device, budget: float, left: float, data: Path,
                results: Path) -> str:
    """Runs one section for at most min(budget, left) seconds and records its outcome; returns a one-line account."""
    argv = command(section, device.type, data, results)
    cap = min(budget, left)
    if cap < MIN_START_S[device.type]:
        why = f"not started: {max(left, 0):.0f} s of the sweep's deadline were left"
        record_outcome(section.name, device, results, argv, cut=why, failure=None)
        return f"{section.name}: {why}"
    rows_file = results.parent / f"{section.name}.jsonl"
    # The peak matmul rate is measured once, by the first benchmark, and read by the others.
    env = {PEAK_CACHE_ENV: str(results.parent / "peak.json"), **os.environ, "PYTHONUNBUFFERED": "1",
           ROWS_ENV: str(rows_file)}
    print(f"=== {section.name} (cap {cap:.0f} s, budget {budget:.0f} s): {' '.join(argv)}", flush=True)
    code, seconds = run_capped(argv, cap, env)
    if section.module == "pytest":
        tests_document(rows_file, device, results, argv, stopped=code is None)
    cut = failure = None
    if code is None:
        limit = "its budget" if cap >= budget else "what was left of the sweep's deadline"
        cut = f"stopped after {seconds:.0f} s at its cap of {cap:.0f} s ({limit})"
    elif code != 0 and section.module != "pytest":  # pytest's exit code only says that a test failed
        failure = f"exited with code {code} after {seconds:.0f} s (see sweep.log)"
    record_outcome(section.name, device, results, argv, cut, failure)
    return f"{section.name}: {cut or failure or f'done in {seconds:.0f} s'}"


def parse_budgets(pairs: list[str]) -> dict[str, int]:
    """--budget NAME=SECONDS pairs, refusing unknown section names."""
    budgets = {}
    names = [s.name for s in SECTIONS]
    for pair in pairs:
        name, _, seconds = pair.partition("=")
        if name not in names or not seconds.isdigit():
            raise SystemExit(f"--budget {pair}: use NAME=SECONDS with NAME one of {', '.join(names)}")
        budgets[name] = int(seconds)
    return budgets


def main(argv: list[str] | None = None) -> int:
    """Runs the plan; writes results and $OUT's summary after every section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda: the plan as budgeted; cpu: a dry run with the benchmarks' --small sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/byol-sweep-out")),
                        help="where results.tar.gz and summary.md go (default $OUT, else /tmp/byol-sweep-out)")
    parser.add_argument("--results", type=Path, default=None,
                        help="result folder (default: a fresh temporary one, packed into results.tar.gz)")
    parser.add_argument("--data", type=Path, default=None, help="image folder (default: synthetic JPEGs made under "
                        f"data/, {DATA_IMAGES['cuda']} on a GPU, {DATA_IMAGES['cpu']} on a CPU)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="the whole sweep's limit (default: the setup's and the sections' budgets summed)")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                        help="replace one section's budget (repeatable)")
    parser.add_argument("--sections", default=None, help="comma list of sections to run (default all, in order)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = resolve_device(args.device)
    kind = device.type
    budgets = {s.name: s.gpu_budget_s if kind == "cuda" else s.cpu_budget_s for s in SECTIONS}
    budgets.update(parse_budgets(args.budget))
    chosen = args.sections.split(",") if args.sections else list(budgets)
    unknown = [name for name in chosen if name not in budgets]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; use names from {', '.join(budgets)}")
    deadline = args.deadline_s or SETUP_BUDGET_S[kind] + sum(budgets[name] for name in chosen)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.results or Path(tempfile.mkdtemp(prefix="byol-sweep-")) / "results"
    results.mkdir(parents=True, exist_ok=True)
    data = synthetic_train_dir(args.data, DATA_IMAGES[kind], len(os.sched_getaffinity(0)))
    print(f"=== setup done in {time.monotonic() - start:.0f} s; results in {results}; plan (deadline "
          f"{deadline:.0f} s):", flush=True)
    for section in SECTIONS:
        if section.name in chosen:
            print(f"    {section.name:<14}{budgets[section.name]:>5} s  {section.what}")
    accounts = []
    for section in SECTIONS:
        if section.name in chosen:
            left = deadline - (time.monotonic() - start)
            accounts.append(run_section(section, device, budgets[section.name], left, data, results))
            write_outputs(results, args.out)
    print(f"=== sweep done in {time.monotonic() - start:.0f} s", flush=True)
    print("\n".join(accounts))
    print(report.perf_table(report.load_results(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
