"""Rebuild the benchmark pages and the README's performance table from benchmarks/results/*.json.

    python -m benchmarks.report                 # rewrite results/*.md (+ .png), results/index.md, README table
    python -m benchmarks.report --no-readme     # leave README.md alone

The README table sits between `<!-- perf-table:start -->` and `<!-- perf-table:end -->`;
nothing outside the markers is touched. It puts each target of the benchmarks issue
beside the newest GPU measurement of it and says by how much a missed target is
missed; CPU results (small mode) add the orderings they recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, render_markdown, write_plot

README = RESULTS_DIR.parents[1] / "README.md"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
E2E_TARGET = 3000.0
"""Images/s per H100, ResNet-50 BYOL at 224 (about 24% MFU at ~65 GFLOP/image and ~800 TFLOP/s)."""
PEER_TARGET = 3.0
"""Speedup over lucidrains' byol-pytorch on the same GPU and batch."""
PIPELINE_TARGET = 1.5
"""Best data pipeline's images/s over the training step's images/s."""
DATA_WAIT_TARGET = 5.0
"""Percent of the training loop spent waiting on data."""
NOT_MEASURED = "not measured yet: run benchmarks/run_gpu_sweep.sh on a GPU"


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every result document under `results_dir`, with its file name under "_file", in name order."""
    documents = []
    for path in sorted(Path(results_dir).glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        if "benchmark" in document and "rows" in document:
            document["_file"] = path.name
            documents.append(document)
    return documents


def latest(documents: list[dict], benchmark: str, gpu: bool) -> dict | None:
    """The newest result of `benchmark` measured on a GPU (gpu=True) or a CPU."""
    matching = [d for d in documents if d["benchmark"] == benchmark and (d["device"]["type"] == "cuda") == gpu]
    return max(matching, key=lambda d: (d["started_utc"], d["_file"]), default=None)


def ok_rows(document: dict | None, **match: Any) -> list[dict]:
    """The rows of `document` with status "ok" whose fields equal `match`."""
    if document is None:
        return []
    return [r for r in document["rows"] if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def verdict(measured: float, target: float, higher_is_better: bool = True) -> str:
    """"met" or "missed by N%" (relative), for the table's last column."""
    if (measured >= target) if higher_is_better else (measured <= target):
        return "met"
    if higher_is_better:
        return f"missed by {100 * (1 - measured / target):.0f}%"
    return f"missed by {measured - target:.1f} points"


def source(document: dict) -> str:
    """Where a number comes from: the device and the result file."""
    cut = " (cut short)" if document.get("cut") else ""
    return f"{document['device']['name']}, [{document['_file']}](benchmarks/results/{document['_file']}){cut}"


def fastest(documents: list[dict], benchmarks: tuple[str, ...], **match: Any) -> tuple[dict | None, dict | None]:
    """The fastest "ok" row matching `match` in the newest GPU result of each of `benchmarks` (the sweep's, and
    the one dali_wheel_parts.sh measures in a later call), with its document."""
    candidates = [(row, document) for name in benchmarks if (document := latest(documents, name, True))
                  for row in ok_rows(document, **match)]
    return max(candidates, key=lambda pair: pair[0]["images_per_s"], default=(None, None))


def gpu_rows(documents: list[dict]) -> list[list[str]]:
    """The target rows: [measure, target, measured, verdict, source]."""
    peers, step = latest(documents, "peers", True), latest(documents, "step", True)
    rows = [gpu_tests_row(latest(documents, "cuda-tests", True))]
    best, e2e = fastest(documents, ("e2e", "e2e-dali"), arch="resnet50", image_size=224)
    e2e_name = "End-to-end ResNet-50 BYOL at 224 from JPEGs, images/s per GPU"
    wait_name = "Data wait in the end-to-end loop (GPU idle for data)"
    if best:
        rows.append([e2e_name, f">= {E2E_TARGET:,.0f} (~24% MFU)",
                     f"{best['images_per_s']:,.0f} ({best['mfu']:.1%} MFU; {best['backend']}, batch {best['batch']})",
                     verdict(best["images_per_s"], E2E_TARGET), source(e2e)])
        rows.append([wait_name, f"< {DATA_WAIT_TARGET:.0f}%", f"{best['data_wait_pct']:.1f}% ({best['backend']})",
                     verdict(best["data_wait_pct"], DATA_WAIT_TARGET, higher_is_better=False), source(e2e)])
    else:
        rows += [[e2e_name, f">= {E2E_TARGET:,.0f} (~24% MFU)", NOT_MEASURED, "—", "—"],
                 [wait_name, f"< {DATA_WAIT_TARGET:.0f}%", NOT_MEASURED, "—", "—"]]
    rows += peer_rows(peers)
    pipe_name = "Data pipeline speed over the step's (best backend / bf16+graph step)"
    fastest_pipe, pipeline = fastest(documents, ("pipeline", "pipeline-dali"), image_size=224)
    step_row = None
    if fastest_pipe:
        step_row = next(iter(ok_rows(step, arch="resnet50", image_size=224, batch=fastest_pipe["batch"],
                                     variant="bf16+graph")), None)
    if fastest_pipe and step_row:
        ratio = fastest_pipe["images_per_s"] / step_row["images_per_s"]
        rows.append([pipe_name, f">= {PIPELINE_TARGET}x",
                     f"{ratio:.2f}x ({fastest_pipe['backend']} {fastest_pipe['images_per_s']:,.0f}/s vs step "
                     f"{step_row['images_per_s']:,.0f}/s, batch {fastest_pipe['batch']})",
                     verdict(ratio, PIPELINE_TARGET), f"{source(pipeline)}; {source(step)}"])
    else:
        rows.append([pipe_name, f">= {PIPELINE_TARGET}x", NOT_MEASURED, "—", "—"])
    rows += decode_crop_rows(latest(documents, "decode-crop", True))
    for graph in ok_rows(step, arch="resnet50", image_size=224, variant="bf16+graph"):
        rows.append([f"Step alone, ResNet-50 at 224, batch {graph['batch']} (bf16+graph)", "—",
                     f"{graph['images_per_s']:,.0f} ({graph['mfu']:.1%} MFU)", "—", source(step)])
    return rows


def gpu_tests_row(tests: dict | None) -> list[str]:
    """The GPU tests' outcome counts; met when every collected test ran and none failed."""
    name = "GPU tests (`pytest -m cuda`), first in the sweep"
    if tests is None:
        return [name, "all pass", NOT_MEASURED, "—", "—"]
    counts: dict[str, int] = {}
    for row in tests["rows"]:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    measured = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    bad = counts.get("failed", 0) + counts.get("not run", 0)
    met = "met" if bad == 0 and counts.get("passed") else f"missed: {bad} failed or not run"
    return [name, "all pass", measured or "no tests collected", met, source(tests)]


def decode_crop_rows(document: dict | None) -> list[list[str]]:
    """The torch backend's decode and crop stages alone: GPU time against the time they hold the host."""
    return [[f"Torch backend's {row['stage']} alone, batch {row['batch']} (GPU ms / host ms per batch)", "—",
             f"{row['gpu_ms']:.1f} / {row['host_ms']:.1f} ms ({row['images_per_s']:,.0f} images/s"
             + (f", {row['kernels']:,} kernels" if row.get("kernels") else "") + ")", "—", source(document)]
            for row in ok_rows(document)]


PEER_BASELINES = {"byol-pytorch aug-off": "as its README runs it (fp32 eager)",
                  "byol-pytorch bf16": "given bf16 autocast + channels_last"}
"""The byol-pytorch rows of the peers benchmark the speedup target is judged against, and how each ran."""


def peer_rows(peers: dict | None) -> list[list[str]]:
    """Speedup of byol_fast's GPU step over byol-pytorch, from the rows themselves (a run cut short after
    the rows it needs still counts), once per byol-pytorch precision: the target must not be met by
    bf16 alone."""
    ours = next(iter(ok_rows(peers, code="byol_fast bf16+graph")), None)
    rows = []
    for code, how in PEER_BASELINES.items():
        name = f"Speedup over lucidrains' byol-pytorch {how} (same GPU, encoder, batch)"
        theirs = next(iter(ok_rows(peers, code=code)), None)
        if ours and theirs:
            speedup = ours["images_per_s"] / theirs["images_per_s"]
            rows.append([name, f">= {PEER_TARGET:.0f}x",
                         f"{speedup:.2f}x ({ours['images_per_s']:,.0f} vs {theirs['images_per_s']:,.0f} images/s; "
                         f"{ours['arch']}, batch {ours['batch']})", verdict(speedup, PEER_TARGET), source(peers)])
        else:
            rows.append([name, f">= {PEER_TARGET:.0f}x", NOT_MEASURED, "—", "—"])
    return rows


def cpu_rows(documents: list[dict]) -> list[list[str]]:
    """Informational rows from the newest CPU small-mode results: the orderings they recorded."""
    rows = []
    step = latest(documents, "step", False)
    if step and step.get("ordering"):
        for group, order in step["ordering"].items():
            rows.append([f"CPU small mode: step variants, {group} (fastest first)", "—", " > ".join(order), "—",
                         source(step)])
    pipeline = latest(documents, "pipeline", False)
    if pipeline and pipeline.get("ordering"):
        rows.append(["CPU small mode: data backends (fastest first)", "—", " > ".join(pipeline["ordering"]), "—",
                     source(pipeline)])
    return rows


def perf_table(documents: list[dict]) -> str:
    """The README's performance table (Markdown), a pure function of the result documents."""
    lines = ["| measure | target | measured | vs target | device and result |", "|---|---|---|---|---|"]
    for row in gpu_rows(documents) + cpu_rows(documents):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def replace_between_markers(text: str, table: str, path: Path, markers: tuple[str, str] = (START, END)) -> str:
    """`text` with everything between the markers (the perf table's by default) replaced by `table`."""
    first, last = markers
    start, end = text.find(first), text.find(last)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no '{first}' ... '{last}' pair: add the two markers on their own lines "
                         f"where the table belongs, or pass --no-readme")
    return text[:start + len(first)] + "\n" + table + text[end:]


def write_page(document: dict, results_dir: Path) -> list[Path]:
    """Rewrites one result's .md (and .png when matplotlib is installed) from its JSON document."""
    stem = Path(results_dir) / Path(document["_file"]).stem
    page = {k: v for k, v in document.items() if k != "_file"}
    stem.with_suffix(".md").write_text(render_markdown(page), encoding="utf-8")
    png = write_plot(page, stem.with_suffix(".png"))
    return [stem.with_suffix(".md")] + ([png] if png is not None else [])


def write_index(documents: list[dict], results_dir: Path) -> Path:
    """Rewrites results/index.md: the target table and a line per result."""
    lines = ["# Benchmark results", "", "Targets against the newest GPU measurements "
             "(regenerated by `python -m benchmarks.report`):", "",
             perf_table(documents).replace("](benchmarks/results/", "]("), "All results:", ""]
    lines += [f"- [{d['_file']}]({d['_file']}): {d['title']}, {d['device']['name']}, {d['started_utc']}"
              + (" (cut short)" if d.get("cut") else "") for d in documents]
    index = Path(results_dir) / "index.md"
    index.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return index


def rebuild_pages(documents: list[dict], results_dir: Path) -> list[Path]:
    """Rewrites each result's .md (and .png when matplotlib is installed) and results/index.md."""
    written = [path for document in documents for path in write_page(document, results_dir)]
    return written + [write_index(documents, results_dir)]


def mark_cut(path: Path, reason: str) -> None:
    """Records in a result's JSON that a time cap stopped its run early (`reason` says which and when): a "cut"
    field that the pages, the plot and the README table show."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    document["cut"] = {"reason": reason}
    Path(path).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Entry point: rebuild pages and (unless --no-readme) the README table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"result folder (default {RESULTS_DIR})")
    parser.add_argument("--readme", type=Path, default=README, help=f"README to update (default {README})")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the README")
    parser.add_argument("--no-pages", action="store_true", help="do not rewrite results/*.md, *.png, index.md")
    parser.add_argument("--print", action="store_true", help="print the performance table on stdout")
    args = parser.parse_args(argv)
    documents = load_results(args.results)
    if not args.no_pages:
        for path in rebuild_pages(documents, args.results):
            print(f"wrote {path}", file=sys.stderr)
    table = perf_table(documents)
    if args.print:
        print(table)
    if not args.no_readme:
        if not args.readme.is_file():
            raise SystemExit(f"{args.readme} does not exist: create it with the '{START}' / '{END}' markers, "
                             "or pass --no-readme")
        text = args.readme.read_text(encoding="utf-8")
        updated = replace_between_markers(text, table, args.readme)
        if updated != text:
            args.readme.write_text(updated, encoding="utf-8")
        print(f"updated the performance table in {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
