"""Benchmarks: the small (CPU) modes write sane result files, the slow LARS baseline is the same math as
byol_fast.LARS, CPU accounting sees child processes, and the README table is a pure function of results."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common, pipeline_bench, report, step_bench
from byol_fast.lars import LARS
from pipelines.synthetic import make_synthetic


def _only_result(folder: Path, prefix: str) -> dict:
    files = sorted(folder.glob(f"{prefix}-cpu-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_per_parameter_lars_equals_fused_lars():
    shapes = [(8, 4, 3, 3), (16, 8), (16,), (5,), (3, 3)]
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    params[4].zero_()  # ||w|| = 0: trust must fall back to 1
    start = [p.clone() for p in params]
    fused = [torch.nn.Parameter(p.clone()) for p in params]
    loop = [torch.nn.Parameter(p.clone()) for p in params]
    settings = dict(lr=0.7, momentum=0.9, weight_decay=1e-2, eta=1e-3)
    fused_opt, loop_opt = LARS(fused, **settings), step_bench.PerParameterLARS(loop, **settings)
    generator = torch.Generator().manual_seed(1)
    for k in range(4):
        for a, b in zip(fused, loop):
            grad = torch.randn(a.shape, generator=generator, dtype=torch.float64)
            if k == 1 and a.ndim == 2 and a.shape == (16, 8):
                grad.zero_()  # ||u|| from decay only
            a.grad, b.grad = grad.clone(), grad.clone()
        fused_opt.step()
        loop_opt.step()
    for a, b, s in zip(fused, loop, start):
        assert not torch.equal(a.detach(), s)  # the comparison is not between untouched tensors
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(loop_opt.state[b]["momentum_buffer"], fused_opt.state[a]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-14)


def test_step_bench_small_mode_writes_sane_results(tmp_path):
    assert step_bench.main(["--small", "--device", "cpu", "--out-dir", str(tmp_path), "--min-steps", "1",
                            "--variants", "fp32-eager,bf16+graph", "--lars-arch", "resnet18"]) == 0
    result = _only_result(tmp_path, "step")
    assert result["benchmark"] == "step" and result["device"]["type"] == "cpu"
    assert result["provenance"]["torch"] == torch.__version__ and result["provenance"]["command"]
    assert result["peak"]["flops"] > 0
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"fp32-eager", "bf16+graph"}
    eager = rows["fp32-eager"]
    assert eager["status"] == "ok" and eager["arch"] == "resnet18" and eager["batch"] == 8
    assert eager["images_per_s"] > 0 and eager["step_ms"] > 0 and 0 < eager["mfu"] < 1
    assert eager["images_per_s"] * eager["step_ms"] / 1e3 == pytest.approx(8, rel=1e-2)
    assert not eager["channels_last"] and not eager["fused_lars"] and eager["precision"] == "fp32"
    assert rows["bf16+graph"]["status"].startswith("skipped") and rows["bf16+graph"]["images_per_s"] is None
    lars = result["lars_only"]
    assert lars["tensors"] > 50 and lars["fused_ms"] > 0 and lars["per_parameter_ms"] > 0
    assert result["ordering"] == {"resnet18 b8": ["fp32-eager"]}
    page = (tmp_path / Path(sorted(tmp_path.glob("step-cpu-*.json"))[0]).with_suffix(".md").name).read_text()
    assert "| resnet18 | 32 | 8 | fp32-eager |" in page and "git " in page


def test_pipeline_bench_small_mode_writes_sane_results(tmp_path, monkeypatch):
    make_synthetic(tmp_path / "data", 24, classes=4)
    real = pipeline_bench.backend_installed
    monkeypatch.setattr(pipeline_bench, "backend_installed", lambda b: b != "ffcv" and real(b))
    assert pipeline_bench.main(["--small", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
                                "--data", str(tmp_path / "data" / "train"), "--backends", "torchvision,torch,ffcv",
                                "--batch", "4", "--image-size", "32", "--min-batches", "2", "--workers", "1"]) == 0
    result = _only_result(tmp_path / "out", "pipeline")
    assert result["settings"]["images"] == 24 and result["settings"]["batch"] == 4
    rows = {row["backend"]: row for row in result["rows"]}
    assert rows["ffcv"]["status"] == "skipped: ffcv is not installed"
    for backend in ("torchvision", "torch"):
        row = rows[backend]
        assert row["status"] == "ok" and row["timed_batches"] >= 2
        assert row["images_per_s"] > 0 and row["cpu_cores_used"] > 0 and row["epoch_start_s"] >= 0
        assert row["images_per_s"] * row["batch_ms"] / 1e3 == pytest.approx(4, rel=1e-2)
    assert sorted(result["ordering"]) == ["torch", "torchvision"]


def test_cpu_meter_counts_exited_and_live_children():
    burn = "import time\nwhile time.process_time() < 0.3: pass\n"
    meter = common.CpuMeter()
    meter.start()
    subprocess.run([sys.executable, "-c", burn], check=True)  # reaped: RUSAGE_CHILDREN
    assert meter.stop() >= 0.3
    if not meter.counts_live_children:
        pytest.skip("psutil is not installed: live children are not counted")
    # The live child burns 0.6 s of CPU, then blocks; the meter must count it before it exits.
    child = subprocess.Popen([sys.executable, "-c", burn.replace("0.3", "0.6") + "import sys; sys.stdin.read()\n"],
                             stdin=subprocess.PIPE)
    meter.start()
    try:
        import psutil

        process, deadline = psutil.Process(child.pid), time.monotonic() + 60
        while sum(process.cpu_times()[:2]) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert meter.stop() >= 0.45  # counted while still alive
    finally:
        child.communicate(b"")


def test_device_slug(monkeypatch):
    cuda = torch.device("cuda")
    for name, slug in (("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("Foo GPU X.1", "foo-gpu-x-1")):
        monkeypatch.setattr(common, "device_name", lambda device, name=name: name)
        assert common.device_slug(cuda) == slug
    assert common.device_slug(torch.device("cpu")) == "cpu"


def _document(benchmark: str, rows: list[dict], started: str, **extra) -> dict:
    return {"benchmark": benchmark, "title": f"{benchmark} sample", "schema_version": 1, "started_utc": started,
            "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "slug": "h100", "cpu_cores": 16},
            "provenance": {"git": {"sha": "abc123", "dirty": False}, "python": "3.12", "torch": "2.11",
                           "command": "python -m benchmarks.x"},
            "settings": {"arch": "resnet50", "batch": 256}, "rows": rows, "notes": [],
            "columns": [{"key": "images_per_s", "header": "images/s", "fmt": "{:,.0f}"}],
            "plot": {"value": "images_per_s", "label_keys": ["backend"], "ylabel": "images/s", "title": "t"}, **extra}


def _write_samples(folder: Path) -> None:
    """Made-up numbers in the result format, only to exercise the table logic."""
    folder.mkdir()
    e2e_row = {"status": "ok", "arch": "resnet50", "image_size": 224, "batch": 256, "backend": "dali",
               "images_per_s": 2750.0, "mfu": 0.224, "data_wait_pct": 7.0}
    peer_row = {"status": "ok", "arch": "resnet50", "image_size": 224, "batch": 256}
    samples = {
        "e2e-h100-2026-01-01.json": _document("e2e", [{**e2e_row, "images_per_s": 1000.0}], "2026-01-01T00:00:00"),
        "e2e-h100-2026-01-02.json": _document("e2e", [e2e_row, {**e2e_row, "backend": "torch", "status": "oom"}],
                                              "2026-01-02T00:00:00"),
        "peers-h100-2026-01-02.json": _document("peers", [
            {**peer_row, "code": "byol_fast bf16+graph", "images_per_s": 3500.0},
            {**peer_row, "code": "byol_fast fp32-eager", "images_per_s": 800.0},
            {**peer_row, "code": "byol-pytorch aug-off", "images_per_s": 1000.0},
            {**peer_row, "code": "byol-pytorch bf16", "images_per_s": 1750.0},
            {**peer_row, "code": "lightly blocks", "status": "error: cut by the sweep's time limit"}],
            "2026-01-02T00:00:00"),
        "pipeline-h100-2026-01-02.json": _document("pipeline", [
            {"status": "ok", "backend": "dali", "image_size": 224, "batch": 256, "images_per_s": 4000.0},
            {"status": "ok", "backend": "torch", "image_size": 224, "batch": 256, "images_per_s": 3000.0}],
            "2026-01-02T00:00:00"),
        "step-h100-2026-01-02.json": _document("step", [
            {"status": "ok", "arch": "resnet50", "image_size": 224, "batch": 256, "variant": "bf16+graph",
             "images_per_s": 3300.0, "mfu": 0.27}], "2026-01-02T00:00:00"),
    }
    for name, document in samples.items():
        (folder / name).write_text(json.dumps(document))


def test_report_table_is_deterministic_and_says_how_far_targets_are(tmp_path):
    _write_samples(tmp_path / "results")
    documents = report.load_results(tmp_path / "results")
    table = report.perf_table(documents)
    assert table == report.perf_table(report.load_results(tmp_path / "results"))
    lines = table.splitlines()
    e2e = next(line for line in lines if line.startswith("| End-to-end"))
    assert "2,750 (22.4% MFU; dali, batch 256)" in e2e and "missed by 8%" in e2e  # newest file, not the 1,000
    assert "e2e-h100-2026-01-02.json" in e2e
    wait = next(line for line in lines if line.startswith("| Data wait"))
    assert "7.0% (dali)" in wait and "missed by 2.0 points" in wait
    as_shipped, given_bf16 = (line for line in lines if line.startswith("| Speedup"))
    assert "as its README runs it (fp32 eager)" in as_shipped and "given bf16 autocast" in given_bf16
    assert "3.50x (3,500 vs 1,000 images/s; resnet50, batch 256)" in as_shipped and "| met |" in as_shipped
    assert "2.00x (3,500 vs 1,750" in given_bf16 and "missed by 33%" in given_bf16
    pipe = next(line for line in lines if line.startswith("| Data pipeline"))
    assert "1.21x (dali 4,000/s vs step 3,300/s, batch 256)" in pipe and "missed by 19%" in pipe
    assert any("3,300 (27.0% MFU)" in line for line in lines)


def test_report_rewrites_only_between_readme_markers(tmp_path):
    _write_samples(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{report.START}\nold table\n{report.END}\n\nafter\n")
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme), "--no-pages"]
    assert report.main(args) == 0
    first = readme.read_text()
    assert first.startswith("# Title\n\nintro\n\n" + report.START + "\n| measure |")
    assert first.endswith(report.END + "\n\nafter\n") and "old table" not in first
    assert report.main(args) == 0 and readme.read_text() == first  # idempotent
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="perf-table:start"):
        report.main(args)
