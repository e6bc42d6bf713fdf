"""Measure every backend's views against the recipe's float64 reference and write the README's recipe table.

    python -m benchmarks.fidelity_report              # measure, write results/recipe-fidelity.json, update README
    python -m benchmarks.fidelity_report --no-readme  # measure and write the JSON only

The numbers are pipelines.fidelity.measure's (the same the tests bound): each colour op's and the
resize's largest error in 8-bit levels over probe images and values spanning the recipe's ranges, and
the crop draw's KS statistic against fresh reference draws (4000 boxes; about 0.03 is sampling noise).
The table sits between `<!-- recipe-table:start -->` and `<!-- recipe-table:end -->` in README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from benchmarks.report import README, replace_between_markers
from byol_fast.run_log import provenance
from pipelines import fidelity
from pipelines.spec import RECIPES, AugmentationSpec

RESULT = Path(__file__).resolve().parent / "results" / "recipe-fidelity.json"
MARKERS = ("<!-- recipe-table:start -->", "<!-- recipe-table:end -->")
_NEEDS = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def installed_backends() -> list[str]:
    """The backends whose packages import here (torch and torchvision always)."""
    return [b for b in fidelity.BACKENDS if b not in _NEEDS or importlib.util.find_spec(_NEEDS[b]) is not None]


def definitions(recipe: str) -> dict[str, str]:
    """What each op means in `recipe`, with the spec's default numbers (the table's second column)."""
    spec = AugmentationSpec(recipe=recipe)
    view = spec.view1
    lo, hi = view.crop_scale
    if recipe == "official":
        crop = f"one draw: area U({lo}, {hi}), log-uniform aspect 3/4-4/3, sides clamped to the image"
        resize = f"bicubic (Keys a=-0.5) to {spec.image_size}, no antialias, taps outside the crop dropped"
        brightness = f"x + U[-{view.brightness}, {view.brightness}]"
        contrast = f"U[{1 - view.contrast:g}, {1 + view.contrast:g}] about each channel's mean"
        saturation = f"HSV saturation x U[{1 - view.saturation:g}, {1 + view.saturation:g}], clipped"
        blur = f"sigma U{view.blur_sigma}, {spec.blur_kernel_size} taps, zero borders"
    else:
        crop = f"RandomResizedCrop: 10 tries of area U({lo}, {hi}), log-uniform aspect, central fallback"
        resize = f"bicubic (a=-0.5) to {spec.image_size}, antialiased (PIL)"
        brightness = f"x * U[{1 - view.brightness:g}, {1 + view.brightness:g}]"
        contrast = f"blend with the mean gray level by U[{1 - view.contrast:g}, {1 + view.contrast:g}]"
        saturation = f"blend with the grayscale image by U[{1 - view.saturation:g}, {1 + view.saturation:g}]"
        blur = f"sigma U{view.blur_sigma}, {spec.blur_kernel_size} taps, reflected borders"
    return {"crop": crop, "resize": resize, "brightness": brightness, "contrast": contrast,
            "saturation": saturation, "hue": f"HSV hue + U[-{view.hue}, {view.hue}] turns",
            "grayscale": "0.2989 R + 0.587 G + 0.114 B", "blur": blur,
            "solarize": f"x >= {view.solarize_threshold}: 1 - x"}


def measure_all(backends: list[str]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{recipe: {backend: {op: {"max": .., "mean": ..}}}}."""
    return {recipe: {backend: {op: vars(error) for op, error in fidelity.measure(backend, recipe).items()}
                     for backend in backends} for recipe in RECIPES}


def _cell(backend: str, recipe: str, op: str, errors: dict | None) -> str:
    if errors is None:
        return "not measured"
    value = errors[op]["max"]
    text = f"KS {value:.3f}" if op == "crop" else f"{value:.2f}"
    return text + (" †" if (backend, recipe, op) in fidelity.GAPS else "")


def recipe_table(document: dict) -> str:
    """The README's recipe table (Markdown), a pure function of the measurement document."""
    backends = list(fidelity.BACKENDS)
    lines = []
    for recipe in RECIPES:
        measured = document["errors"][recipe]
        lines += [f"**`{recipe}` recipe** (largest error in 8-bit levels against pipelines/reference.py; crop: "
                  f"KS statistic of area and aspect, ~0.03 is sampling noise):", "",
                  "| term | definition (default values) | " + " | ".join(backends) + " |",
                  "|---|---|" + "---|" * len(backends)]
        for op, definition in definitions(recipe).items():
            cells = [_cell(b, recipe, op, measured.get(b)) for b in backends]
            lines.append(f"| {op} | {definition} | " + " | ".join(cells) + " |")
        lines.append("")
    notes = [f"- † {backend} / {recipe} / {op}: {why}" for (backend, recipe, op), why in sorted(fidelity.GAPS.items())]
    origin = document["provenance"]
    sha = (origin.get("git") or {}).get("sha", "unknown")
    lines += notes + ["", f"Measured by `python -m benchmarks.fidelity_report` at {sha[:10]} "
                          f"({origin['utc_time'][:10]}, {origin['platform']}); "
                          "[recipe-fidelity.json](benchmarks/results/recipe-fidelity.json)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULT, help=f"result JSON (default {RESULT})")
    parser.add_argument("--readme", type=Path, default=README, help=f"README to update (default {README})")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the README")
    args = parser.parse_args(argv)
    backends = installed_backends()
    document = {"title": "Recipe fidelity: each backend's ops against the float64 reference",
                "backends": backends, "errors": measure_all(backends), "provenance": provenance()}
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    if not args.no_readme:
        text = args.readme.read_text(encoding="utf-8")
        args.readme.write_text(replace_between_markers(text, recipe_table(document), args.readme, MARKERS),
                               encoding="utf-8")
        print(f"updated the recipe table in {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
