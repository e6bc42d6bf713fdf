"""The README's recipe table is generated from the fidelity measurements: every op of both recipes, each
backend's number, a dagger and a note where pipelines.fidelity.GAPS declares a difference."""

from pathlib import Path

from benchmarks import fidelity_report
from pipelines import fidelity
from pipelines.spec import RECIPES


def _document(errors_by_backend: dict) -> dict:
    return {"errors": {recipe: errors_by_backend for recipe in RECIPES},
            "provenance": {"git": {"sha": "0123456789abcdef"}, "utc_time": "2026-12-03T10:00:00",
                           "platform": "Linux-test"}}


def test_table_rows_cells_and_notes():
    ops = {op: {"max": 0.25, "mean": 0.1} for op in fidelity.OPS}
    ops["hue"] = {"max": 15.03, "mean": 0.7}
    table = fidelity_report.recipe_table(_document({"torch": ops, "torchvision": ops}))
    for recipe in RECIPES:
        assert f"**`{recipe}` recipe**" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| term")]
    assert len(rows) == 2 * len(fidelity.OPS)
    crop_official = next(r for r in rows if r.startswith("| crop | one draw"))
    assert crop_official.endswith("| KS 0.250 | not measured | not measured | KS 0.250 |")
    hue_rows = [r for r in rows if r.startswith("| hue |")]
    assert hue_rows[0].endswith("| 15.03 | not measured | not measured | 15.03 |")  # official: no gap declared
    assert hue_rows[1].endswith("| 15.03 | not measured | not measured | 15.03 † |")  # torchvision on PIL
    assert "- † torchvision / torchvision / hue: PIL shifts the hue" in table
    assert "at 0123456789 (2026-12-03, Linux-test)" in table


def test_main_writes_json_and_only_the_marked_part_of_the_readme(tmp_path: Path, monkeypatch):
    ops = {op: {"max": 0.0, "mean": 0.0} for op in fidelity.OPS}
    monkeypatch.setattr(fidelity_report, "measure_all", lambda backends: {r: {"torch": ops} for r in RECIPES})
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- recipe-table:start -->\nold\n<!-- recipe-table:end -->\nafter\n")
    out = tmp_path / "fidelity.json"
    assert fidelity_report.main(["--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("before\n<!-- recipe-table:start -->\n**`official` recipe**")
    assert text.endswith("<!-- recipe-table:end -->\nafter\n") and "old" not in text
    assert '"torch"' in out.read_text()
