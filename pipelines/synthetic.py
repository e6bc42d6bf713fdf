"""The built-in data: an ImageNet-like JPEG tree with learnable class structure.

`byol-fast make-synthetic DIR --images N` writes DIR/train/<class>/*.JPEG (and
DIR/val/... with --val-fraction) of about ImageNet's geometry and file size
(400-600 x 300-450 pixels in both orientations, ~110 KB), so decoders and
loaders are exercised as on the real thing, and a small CNN can still learn the
classes through BYOL's augmentations.

A class is a combination of factors that survive those augmentations: the
shape family of its objects (disk, ring, star, ...), their fill pattern
(solid, stripes, checker, dots; a local cue that survives tight crops) and,
beyond 40 classes, the layout (one large object, a few, many small; otherwise
random per image). Colours, positions, scales,
rotations, background and clutter are random per image, so colour alone never
identifies a class (colour jitter and grayscale would destroy such a cue); the
foreground always differs from the background in luminance, so shapes survive
grayscale. Each image is seeded by (seed, index), hence the tree is the same
for a given seed with any number of workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.sources import DataError

FAMILIES = ("disk", "ring", "square", "triangle", "star", "cross", "crescent", "hexagon", "chevron", "ellipse")
FILLS = ("solid", "stripes", "checker", "dots")
LAYOUTS = ("single", "few", "many")
MAX_CLASSES = len(FAMILIES) * len(FILLS) * len(LAYOUTS)
MANIFEST = "synthetic.json"
"""File written at the tree's root; its presence lets --overwrite replace a tree we made (and only that)."""

# (objects per image, object radius as a fraction of the short side) for each layout.
_LAYOUT_RANGES = {"single": ((1, 1), (0.25, 0.42)), "few": ((2, 4), (0.13, 0.22)), "many": ((6, 12), (0.06, 0.11))}
_OCTAVES = ((150, 30), (24, 12), (4, 16))
"""(cell size in pixels, amplitude in 8-bit units) of the background texture's layers, coarse to fine."""
_GRAIN = 16
"""Half-width of the per-pixel uniform grain (8-bit units); with the texture it sets the JPEG size
(~110 KB at quality 95)."""


@dataclass(frozen=True)
class SyntheticSummary:
    """What make_synthetic wrote."""

    root: str
    train_images: int
    val_images: int
    classes: list[str]
    mean_file_bytes: float
    seconds: float


def class_factors(label: int, num_classes: int) -> dict[str, int | None]:
    """Which family / fill / layout index defines class `label`; layout None where it is random per image.

    Writing label = 10 a + b: family b, fill (a + b) mod 4, layout a // 4
    (only beyond 40 classes). Every class has its own (family, fill,
    layout); with 10 classes the fill is a second, local cue that a crop
    showing only part of an object still carries.
    """
    a, b = divmod(label, len(FAMILIES))
    layout = a // len(FILLS) if num_classes > len(FAMILIES) * len(FILLS) else None
    return {"family": b, "fill": (a + b) % len(FILLS), "layout": layout}


def class_names(num_classes: int) -> list[str]:
    """Folder names, sorted in label order: "c003_triangle_dots", "c017_hexagon_stripes", ..."""
    names = []
    for label in range(num_classes):
        factors = class_factors(label, num_classes)
        parts = [f"c{label:03d}", FAMILIES[factors["family"]], FILLS[factors["fill"]]]
        if factors["layout"] is not None:
            parts.append(LAYOUTS[factors["layout"]])
        names.append("_".join(parts))
    return names


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _outline(family: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit-radius polygon of a family and an optional hole polygon (drawn over it in background)."""
    if family == "disk":
        return _regular(48), None
    if family == "ring":
        return _regular(48), _regular(48, 0.55)
    if family == "square":
        return _regular(4, phase=np.pi / 4), None
    if family == "triangle":
        return _regular(3, phase=-np.pi / 2), None
    if family == "star":
        star = _regular(10, phase=-np.pi / 2)
        star[1::2] *= 0.4
        return star, None
    if family == "cross":
        a = 0.3
        return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                         (-1, a), (-1, -a), (-a, -a)], dtype=float), None
    if family == "crescent":
        return _regular(48), _regular(48, 0.85) + np.array([0.45, 0.0])
    if family == "hexagon":
        return _regular(6), None
    if family == "chevron":
        return np.array([(-1, -0.7), (0, 0.2), (1, -0.7), (1, 0.0), (0, 0.9), (-1, 0.0)], dtype=float), None
    if family == "ellipse":
        return _regular(48) * np.array([1.0, 0.4]), None
    raise ValueError(f"unknown shape family {family!r}")


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour at least 80 luminance levels apart, hues independent."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.uniform(0, 255, size=(2, 3))
        if abs(bg @ weights - fg @ weights) >= 80:
            return bg, fg


def _fill_pattern(style: str, box: tuple[int, int, int, int], period: float, rng: np.random.Generator) -> Image.Image:
    """An "L" mask over `box` (left, top, right, bottom): 255 where the second fill colour goes.

    Computed only over the objects' bounding box, the one costly part of a patterned fill.
    """
    left, top, right, bottom = box
    angle = rng.uniform(0, np.pi)
    ys, xs = np.ogrid[top:bottom, left:right]
    scale = np.float32(2 * np.pi / period)
    u = (xs * np.cos(angle) + ys * np.sin(angle)).astype(np.float32) * scale
    v = (ys * np.cos(angle) - xs * np.sin(angle)).astype(np.float32) * scale
    if style == "stripes":
        chosen = np.broadcast_to(np.sin(u) > 0, v.shape)
    elif style == "checker":
        chosen = np.sin(u) * np.sin(v) > 0
    elif style == "dots":
        chosen = np.cos(u) + np.cos(v) > 1.0
    else:
        raise ValueError(f"unknown patterned fill {style!r}")
    return Image.fromarray(chosen.astype(np.uint8) * np.uint8(255), "L")


def _octave_texture(rng: np.random.Generator, base: np.ndarray, width: int, height: int) -> Image.Image:
    """A colour field around `base`: random grids of several cell sizes, upsampled and summed.

    The layers are summed at the finest layer's resolution and upsampled to
    full size once, which costs a third of upsampling each layer.
    """
    finest = min(cell for cell, _ in _OCTAVES)
    work = (max(2, width // finest), max(2, height // finest))
    total = np.zeros((work[1], work[0], 3), dtype=np.int16)
    for cell, amplitude in _OCTAVES:
        shape = (max(2, height // cell), max(2, width // cell), 3)
        grid = np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape) % (2 * amplitude + 1)
        layer = Image.fromarray(grid + np.uint8(128 - amplitude)).resize(work, Image.BICUBIC)
        total += np.asarray(layer, dtype=np.int16) - 128
    field = np.clip(total + base.astype(np.int16), 0, 255).astype(np.uint8)
    return Image.fromarray(field).resize((width, height), Image.BICUBIC)


def render_image(label: int, num_classes: int, seed: int, index: int) -> np.ndarray:
    """The (H, W, 3) uint8 picture number `index` of class `label`, a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, label, num_classes]))
    width, height = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    if rng.random() < 0.25:  # portrait, as about a quarter of ImageNet is
        width, height = height, width
    factors = class_factors(label, num_classes)
    family = FAMILIES[factors["family"]]
    fill = FILLS[factors["fill"]]
    layout = LAYOUTS[factors["layout"] if factors["layout"] is not None else rng.integers(len(LAYOUTS))]
    bg, fg = _colour_pair(rng)
    fg2 = np.clip(fg + rng.choice([-1, 1]) * rng.uniform(60, 120, 3), 0, 255)  # second fill colour, same side of bg

    # Background: colour fields around bg at several scales (a bit like foliage or fabric), then clutter strokes.
    background = _octave_texture(rng, bg, width, height)
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(8, 25))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        length, angle = rng.uniform(10, 80), rng.uniform(0, 2 * np.pi)
        colour = tuple(int(c) for c in np.clip(bg + rng.normal(0, 50, 3), 0, 255))
        draw.line([(x0, y0), (x0 + length * np.cos(angle), y0 + length * np.sin(angle))],
                  fill=colour, width=int(rng.integers(1, 4)))

    # Foreground objects: polygons of the class family drawn into a mask.
    (count_lo, count_hi), (size_lo, size_hi) = _LAYOUT_RANGES[layout]
    short = min(width, height)
    outer, hole = _outline(family)
    mask = Image.new("L", (width, height), 0)
    mask_draw = ImageDraw.Draw(mask)
    radii = []
    for _ in range(int(rng.integers(count_lo, count_hi + 1))):
        radius = rng.uniform(size_lo, size_hi) * short
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = rng.uniform([radius * 0.5, radius * 0.5], [width - radius * 0.5, height - radius * 0.5])
        stretch = np.array([1.0, rng.uniform(0.85, 1.15)])  # mild per-object aspect jitter
        for polygon, value in ((outer, 255), (hole, 0)):
            if polygon is not None:
                points = (polygon * stretch) @ rotation.T * radius + centre
                mask_draw.polygon([tuple(p) for p in points], fill=value)
        radii.append(radius)

    # Compose with PIL (C loops over uint8) rather than float numpy: it keeps ~1000 images well under a minute.
    foreground = Image.new("RGB", (width, height), tuple(int(c) for c in fg))
    box = mask.getbbox()
    if fill != "solid" and box is not None:
        pattern = _fill_pattern(fill, box, period=float(np.mean(radii)) * 0.45, rng=rng)
        foreground.paste(tuple(int(c) for c in fg2), box, pattern)
    background.paste(foreground, (0, 0), mask)
    pixels = np.asarray(background, dtype=np.int16)
    # Sensor-like grain (uniform, zero mean): with the texture it brings the JPEG size to ImageNet's ~110 KB.
    grain = np.frombuffer(rng.bytes(pixels.size), dtype=np.uint8).reshape(pixels.shape) % np.uint8(2 * _GRAIN + 1)
    pixels += grain
    pixels -= _GRAIN
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def _write_one(job: tuple[str, int, int, int, int, int]) -> int:
    path, label, num_classes, seed, index, quality = job
    Image.fromarray(render_image(label, num_classes, seed, index)).save(path, format="JPEG", quality=quality)
    return Path(path).stat().st_size


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder, except to replace a tree this module wrote."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file: pass a folder path for the synthetic tree")
    if not root.exists() or not any(root.iterdir()):
        return
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root} is not empty and holds no {MANIFEST}, so it is not a synthetic tree we wrote: "
                        f"pick an empty or new folder (nothing there is deleted, even with --overwrite)")
    if not overwrite:
        raise DataError(f"{root} already holds a synthetic tree: pass --overwrite to replace it, or pick a new folder")
    for part in ("train", "val", MANIFEST):
        target = root / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def make_synthetic(root: str | Path, images: int, classes: int = 10, seed: int = 0, val_fraction: float = 0.0,
                   quality: int = 95, workers: int = 1, overwrite: bool = False) -> SyntheticSummary:
    """Write `images` JPEGs (train plus val) under `root`; image i has label i % classes.

    The last round(images * val_fraction) images go to root/val, the rest to
    root/train, each split balanced over the classes. Refuses a non-empty
    `root` unless it is a tree this function wrote and `overwrite` is set.
    """
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes={classes}: use 1..{MAX_CLASSES} (families x fills x layouts)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
    if not 1 <= quality <= 100 or workers < 1 or seed < 0:
        raise ValueError(f"quality={quality} must lie in 1..100, workers={workers} >= 1, seed={seed} >= 0")
    val_images = round(images * val_fraction)
    train_images = images - val_images
    if train_images < classes or 0 < val_images < classes:
        raise ValueError(f"images={images} with val_fraction={val_fraction} leaves {train_images} train and "
                         f"{val_images} val images for {classes} classes: every class needs one image per split; "
                         f"raise --images or lower --classes")
    root = Path(root).expanduser().resolve()
    _prepare_root(root, overwrite)
    names = class_names(classes)
    jobs = []
    for index in range(images):
        split = "train" if index < train_images else "val"
        label = index % classes
        folder = root / split / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{names[label]}_{index:07d}.JPEG"), label, classes, seed, index, quality))
    start = time.perf_counter()
    if workers == 1:
        sizes = [_write_one(job) for job in jobs]
    else:
        with get_context("spawn").Pool(workers) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=16)
    summary = SyntheticSummary(root=str(root), train_images=train_images, val_images=val_images, classes=names,
                               mean_file_bytes=float(np.mean(sizes)), seconds=time.perf_counter() - start)
    manifest = {"images": images, "classes": classes, "seed": seed, "val_fraction": val_fraction,
                "quality": quality, **{k: v for k, v in asdict(summary).items() if k not in ("root", "seconds")}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `byol-fast make-synthetic`."""
    parser = argparse.ArgumentParser(prog="byol-fast make-synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="output folder (created; must be empty or a tree written by this command)")
    parser.add_argument("--images", type=int, required=True, help="total images, train plus val")
    parser.add_argument("--classes", type=int, default=10, help=f"number of classes, 1..{MAX_CLASSES} (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the tree is a pure function of the seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images written to DIR/val")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95: ~110 KB per image)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing images (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a synthetic tree written here before")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `byol-fast make-synthetic`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        summary = make_synthetic(args.dir, args.images, classes=args.classes, seed=args.seed,
                                 val_fraction=args.val_fraction, quality=args.quality, workers=args.workers,
                                 overwrite=args.overwrite)
    except ValueError as err:  # DataError included
        print(f"byol-fast make-synthetic: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary.train_images} train + {summary.val_images} val images in {len(summary.classes)} classes "
          f"to {summary.root} in {summary.seconds:.1f} s (mean file {summary.mean_file_bytes / 1e3:.1f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
