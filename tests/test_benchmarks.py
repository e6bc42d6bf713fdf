"""Benchmarks: the small (CPU) modes write sane result files, the slow LARS baseline is the same math as
byol_fast.LARS, CPU accounting sees child processes, the README table is a pure function of results, and the
GPU sweep: its plan fits one 8-minute call, a section past its budget is stopped and marked cut, its CPU dry
run writes every section's JSON, Markdown and PNG, and DALI's wheel parts join back to the same bytes."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import common, pipeline_bench, report, step_bench, sweep
from byol_fast.lars import LARS
from pipelines.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


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


def _plan_in_header() -> dict[str, int]:
    """The (section: budget) table of run_gpu_sweep.sh's header."""
    header = (REPO / "benchmarks" / "run_gpu_sweep.sh").read_text().split("\nset -o pipefail")[0]
    table = header[header.index("#   section"):].splitlines()[1:]
    plan = {}
    for line in table:
        match = re.match(r"#   (\S+)\s+(\d+)\s", line)
        if not match:
            break
        plan[match[1]] = int(match[2])
    return plan


def test_the_sweep_plan_in_the_script_header_is_the_code_and_fits_one_8_minute_call():
    plan = _plan_in_header()
    total = plan.pop("total")
    assert plan == {"setup": sweep.SETUP_BUDGET_S["cuda"], **{s.name: s.gpu_budget_s for s in sweep.SECTIONS}}
    assert list(plan)[1:4] == ["cuda-tests", "e2e", "peers"] and list(plan)[-1] == "step-compile"
    assert total == sum(plan.values())
    assert total + 10 <= sweep.CALL_LIMIT_S == 480  # 10 s for the wheel install and start-up before the driver


def test_a_section_past_its_budget_is_stopped_keeps_its_rows_and_is_marked_cut(tmp_path, monkeypatch):
    slow = ("import time; from benchmarks.common import BenchResult, Column, PlotSpec; import torch; "
            f"r = BenchResult('e2e', 't', torch.device('cpu'), {{}}, [Column('status', 'status')], "
            f"PlotSpec('images_per_s', ['backend'], 'images/s', 't'), out_dir={str(tmp_path / 'results')!r}); "
            "r.add_row({'backend': 'torch', 'status': 'ok', 'images_per_s': 5.0}); time.sleep(60)")
    monkeypatch.setattr(sweep, "command", lambda *args: [sys.executable, "-c", slow])
    (tmp_path / "results").mkdir()
    section = next(s for s in sweep.SECTIONS if s.name == "e2e")
    start = time.monotonic()
    account = sweep.run_section(section, torch.device("cpu"), budget=8, left=100, data=tmp_path,
                                results=tmp_path / "results")
    assert time.monotonic() - start < 30  # stopped at its cap, not after the child's 60 s
    assert account.startswith("e2e: stopped after") and "(its budget)" in account
    document = _only_result(tmp_path / "results", "e2e")
    assert document["rows"] == [{"backend": "torch", "status": "ok", "images_per_s": 5.0}]  # kept
    assert "cap of 8 s (its budget)" in document["cut"]["reason"]
    # With less of the deadline left than a section needs to start, it is not started, and says so.
    account = sweep.run_section(next(s for s in sweep.SECTIONS if s.name == "peers"), torch.device("cpu"),
                                budget=8, left=0.5, data=tmp_path, results=tmp_path / "results")
    assert account == "peers: not started: 0 s of the sweep's deadline were left"
    stand_in = _only_result(tmp_path / "results", "peers")
    assert stand_in["rows"] == [] and stand_in["cut"]["reason"].startswith("not started")


def test_the_test_section_lists_every_collected_test_and_those_a_cut_left_unrun(tmp_path):
    rows = tmp_path / "rows.jsonl"
    records = [{"collected": ["tests/a.py::t1", "tests/a.py::t2", "tests/b.py::t3", "tests/b.py::t4"]},
               {"test": "tests/a.py::t1", "outcome": "passed", "seconds": 1.5, "message": ""},
               {"test": "tests/a.py::t2", "outcome": "skipped", "seconds": 0.0, "message": "needs DALI"},
               {"test": "tests/b.py::t3", "outcome": "failed", "seconds": 2.0, "message": "AssertionError: 1 != 2"}]
    rows.write_text("".join(json.dumps(r) + "\n" for r in records))
    sweep.tests_document(rows, torch.device("cpu"), tmp_path, ["python", "-m", "pytest"], stopped=True)
    document = _only_result(tmp_path, "cuda-tests")
    assert [(r["test"], r["outcome"], r["status"]) for r in document["rows"]] == [
        ("a.py::t1", "passed", "ok"), ("a.py::t2", "skipped", "skipped: needs DALI"),
        ("b.py::t3", "failed", "failed: AssertionError: 1 != 2"),
        ("b.py::t4", "not run", "not run: the section was stopped first")]
    document["_file"] = "cuda-tests-h200-2026-01-01.json"
    assert report.gpu_tests_row(document)[2:4] == ["1 failed, 1 not run, 1 passed, 1 skipped",
                                                    "missed: 2 failed or not run"]


def test_the_pytest_plugin_records_each_outcome_as_the_test_ends(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes():\n    assert True\n"
        "def test_fails():\n    assert 1 == 2\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n")
    rows = tmp_path / "rows.jsonl"
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                            "benchmarks.pytest_rows", str(tmp_path / "test_sample.py")], cwd=REPO,
                           env={**os.environ, "BYOL_TEST_ROWS": str(rows)}, capture_output=True, timeout=120)
    assert child.returncode == 1  # one test failed
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [name.split("::")[1] for name in records[0]["collected"]] == ["test_passes", "test_fails",
                                                                          "test_skipped"]
    outcomes = {r["test"].split("::")[1]: (r["outcome"], r["message"]) for r in records[1:]}
    assert outcomes["test_passes"] == ("passed", "") and outcomes["test_skipped"] == ("skipped", "not here")
    assert outcomes["test_fails"][0] == "failed" and "assert 1 == 2" in outcomes["test_fails"][1]


def test_dali_wheel_parts_round_trip_checks_every_part_and_the_whole(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a-1.0-py3-none-any.whl", 25_000), ("b-2.0-py3-none-any.whl", 7_000)):
        (wheels / name).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    env = {**os.environ, "DALI_CARRY_DIR": str(tmp_path / "carry"), "DALI_PARTS_DIR": str(tmp_path / "there"),
           "DALI_PART_SIZE": "10k"}

    def helper(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "benchmarks" / "dali_wheel_parts.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=60)

    assert helper("pack", str(wheels)).returncode == 0
    parts = sorted((tmp_path / "carry" / "parts").iterdir())
    assert [p.name for p in parts] == ["part-00", "part-01", "part-02", "part-03"]  # a 40 KB tar in 10 KiB parts
    held = tmp_path / "held"
    held.mkdir()
    for part in parts[1:]:  # one part per call: the first arrives alone
        part.rename(held / part.name)
    stashed = helper("stash")
    assert stashed.returncode == 0 and "missing: part-01 part-02 part-03" in stashed.stdout
    assert "still to carry" in helper("join").stderr
    intact = (held / "part-02").read_bytes()
    (held / "part-02").write_bytes(b"x" + intact[1:])  # damaged on the way
    for part in held.iterdir():
        part.rename(tmp_path / "carry" / "parts" / part.name)
    refused = helper("stash")
    assert refused.returncode != 0 and "part-02 does not match SHA256SUMS" in refused.stderr
    (tmp_path / "carry" / "parts" / "part-02").write_bytes(intact)  # carried again
    stashed = helper("stash")
    assert stashed.returncode == 0 and "missing: none" in stashed.stdout
    assert helper("join").returncode == 0
    for wheel in wheels.iterdir():
        assert (tmp_path / "there" / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()


@pytest.mark.slow
def test_the_sweeps_cpu_dry_run_writes_every_section_and_marks_the_cut_one(tmp_path):
    # The same script the GPU runs, with tiny sizes; step-compile gets 3 s, far too little, to show a cut.
    make_synthetic(tmp_path / "data", 64, classes=4)
    out, results = tmp_path / "out", tmp_path / "stage" / "results"
    child = subprocess.run(["bash", "benchmarks/run_gpu_sweep.sh", "--device", "cpu", "--budget", "step-compile=3",
                            "--data", str(tmp_path / "data" / "train"), "--results", str(results)], cwd=REPO,
                           env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert "peers: no wheels in .whl/" in child.stdout or "peers: installed" in child.stdout
    for section in sweep.SECTIONS:
        document = _only_result(results, section.name)
        stem = results / Path(sorted(results.glob(f"{section.name}-cpu-*.json"))[0]).stem
        assert stem.with_suffix(".md").is_file() and stem.with_suffix(".png").stat().st_size > 1000, section.name
        page = stem.with_suffix(".md").read_text()
        if section.name == "step-compile":
            assert "at its cap of 3 s (its budget)" in document["cut"]["reason"] and "**cut short**" in page
        else:
            assert "cut" not in document, (section.name, document.get("cut"))
            assert document["rows"] and "**cut short**" not in page
    assert all(r["outcome"] == "skipped" for r in _only_result(results, "cuda-tests")["rows"])
    assert [r["stage"] for r in _only_result(results, "decode-crop")["rows"] if r["status"] == "ok"] == ["decode",
                                                                                                       "crop"]
    assert _only_result(results, "e2e")["rows"][0]["status"] == "ok"
    with tarfile.open(out / "results.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {f"benchmarks/results/{p.name}" for p in results.iterdir()} <= packed
    assert (out / "summary.md").read_text().startswith("# GPU sweep summary") and (out / "sweep.log").is_file()
    # The README table regenerates from whatever came back.
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    assert report.main(["--results", str(results), "--readme", str(readme), "--no-pages"]) == 0
    assert "CPU small mode: data backends" in readme.read_text()
