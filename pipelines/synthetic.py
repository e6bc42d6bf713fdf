"""The built-in data: an ImageNet-like JPEG tree with learnable class structure.

`byol-fast make-synthetic DIR --images N` writes DIR/train/<class>/*.JPEG (and
DIR/val/... with --val-fraction) of about ImageNet's geometry and file size
(400-600 x 300-450 pixels in both orientations, ~120 KB), so decoders and
loaders are exercised as on the real thing, and a small CNN can still learn the
classes through BYOL's augmentations.

A class is a combination of factors that survive those augmentations: the fill
pattern of its objects (ten of them: solid, stripes, checker, dots, ...; a
local cue that even an 8%-area crop still shows), the shape family of the
objects (disk, ring, star, ...) and, beyond 100 classes, their size. Each
object has its own colours and the background is a low-saturation field of a
random grey, so colour never identifies a class, and two crops of one image
share little colour, which leaves the class cues as what BYOL's two views have
in common. Objects cover much of the picture and every cue is at least about
an eighth of the short side, so it survives the demo's 64-pixel views (a
whole image shrinks about 5x there). Positions, rotations, pattern phases and
clutter are random per image. Each image is seeded by (seed, index), hence the
tree is the same for a given seed with any number of workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.command_line import CommandParser, integer, number
from pipelines.sources import DataError

FAMILIES = ("disk", "ring", "square", "triangle", "star", "cross", "crescent", "hexagon", "chevron", "ellipse")
FILLS = ("solid", "stripes", "checker", "dots", "grid", "rings", "waves", "zigzag", "blobs", "bricks")
SIZES = ("large", "medium", "small")
MAX_CLASSES = len(FAMILIES) * len(FILLS) * len(SIZES)
DEFAULT_CLASSES = 10
"""Classes of the built-in data unless asked otherwise (`byol-fast train` writes this many)."""
MANIFEST = "synthetic.json"
"""File written at the tree's root before the first image; its presence lets --overwrite replace a tree we
made (and only that), and its "complete" flag tells a finished tree from an interrupted write."""
GENERATOR = 2
"""Version of render_image's pixels, kept in the manifest. Bump it whenever the pictures change, so that a
tree written by older code is re-made (see stale_reason) rather than silently reused."""

_SIZE_RANGES = {"large": ((1.2, 2.0), (0.40, 0.55)), "medium": ((2.5, 4.0), (0.28, 0.38)),
                "small": ((5.0, 8.0), (0.18, 0.25))}
"""(objects per short-side square of picture, object radius as a fraction of the short side) of each size.
Measured on the demo (ResNet-18, 64 px, 96 steps): objects of radius 0.06-0.11 and patterns of period ~0.04
of the short side are a few pixels in its views, and its kNN top-1 stayed at chance."""
_MIN_PERIOD = 0.12
"""Smallest fill-pattern period as a fraction of the short side: ~8 pixels when a whole image becomes 64."""
_DARK, _BRIGHT, _BACKGROUND = (10, 60), (195, 250), (100, 150)
"""Luminance bands (8-bit) of the two colours inside an object, and of the colour whose channel mean sets
the background's grey (so that grey lies near, not exactly in, its band): an object is one dark and one
bright colour, so it and its pattern stand out against the mid-grey background in grayscale too."""
_OCTAVES = ((150, 30), (24, 12), (4, 16))
"""(cell size in pixels, amplitude in 8-bit units) of the background texture's layers, coarse to fine."""
_GRAIN = 16
"""Half-width of the per-pixel uniform grain (8-bit units); with the texture it sets the JPEG size
(~120 KB at quality 95, near ImageNet's ~110 KB)."""


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
    """Which family / fill / size index defines class `label`; size None where it is random per image.

    Writing label = 10 a + b: family b, fill (a + b) mod 10, size a // 10
    (only beyond 100 classes). Every class has its own (family, fill, size);
    with 10 classes each class has its own fill and its own family.
    """
    a, b = divmod(label, len(FAMILIES))
    size = a // len(FILLS) if num_classes > len(FAMILIES) * len(FILLS) else None
    return {"family": b, "fill": (a + b) % len(FILLS), "size": size}


def class_names(num_classes: int) -> list[str]:
    """Folder names, sorted in label order: "c003_triangle_dots", "c017_hexagon_bricks", ..."""
    names = []
    for label in range(num_classes):
        factors = class_factors(label, num_classes)
        parts = [f"c{label:03d}", FAMILIES[factors["family"]], FILLS[factors["fill"]]]
        if factors["size"] is not None:
            parts.append(SIZES[factors["size"]])
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


def _colour_in_band(rng: np.random.Generator, band: tuple[float, float]) -> np.ndarray:
    """A random RGB colour whose luminance lies in `band` (rejection sampling; every band here is wide)."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        colour = rng.uniform(0, 255, size=3)
        if band[0] <= colour @ weights <= band[1]:
            return colour


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
    # u, v run 2 pi per period along the pattern's two axes; each style thresholds a function of them.
    if style == "stripes":
        chosen = np.broadcast_to(np.sin(u) > 0, v.shape)
    elif style == "checker":
        chosen = np.sin(u) * np.sin(v) > 0
    elif style == "dots":
        chosen = np.cos(u) + np.cos(v) > 1.0
    elif style == "grid":  # thin lines two periods apart
        chosen = (np.abs(np.sin(u / 2)) < 0.35) | (np.abs(np.sin(v / 2)) < 0.35)
    elif style == "rings":  # concentric about the box's centre
        chosen = np.sin(np.hypot(u - u.mean(), v - v.mean())) > 0
    elif style == "waves":
        chosen = np.sin(u + 1.6 * np.sin(v / 2)) > 0
    elif style == "zigzag":  # stripes displaced by a triangle wave
        chosen = np.sin(u + 2.5 * np.pi * np.abs((v / np.pi) % 2 - 1)) > 0
    elif style == "blobs":
        chosen = np.sin(u / 1.7) * np.sin(v / 1.7) + 0.5 * np.sin(1.3 * u + v) > 0.35
    elif style == "bricks":  # mortar lines; every other row shifted by half a brick
        row = np.floor(v / np.pi)
        chosen = (np.abs(np.sin(v)) > 0.25) & (np.abs(np.sin((u + row * np.pi / 2) / 2)) > 0.15)
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


def _draw_object(picture: Image.Image, outline: tuple[np.ndarray, np.ndarray | None], fill: str, radius: float,
                 period: float, rng: np.random.Generator) -> None:
    """Paste one object (random place, rotation, mild stretch, own dark/bright colours) onto `picture`."""
    width, height = picture.size
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = rng.uniform([0, 0], [width, height])  # may lie near an edge: crops of real photos cut objects too
    stretch = np.array([1.0, rng.uniform(0.85, 1.15)])
    mask = Image.new("L", (width, height), 0)
    mask_draw = ImageDraw.Draw(mask)
    for polygon, value in zip(outline, (255, 0)):  # the outer polygon, then the hole (if any) in background
        if polygon is not None:
            points = (polygon * stretch) @ rotation.T * radius + centre
            mask_draw.polygon([tuple(p) for p in points], fill=value)
    box = mask.getbbox()
    if box is None:
        return
    dark_first = rng.random() < 0.5
    first = _colour_in_band(rng, _DARK if dark_first else _BRIGHT)
    second = _colour_in_band(rng, _BRIGHT if dark_first else _DARK)
    # Colours and pattern are laid over the object's bounding box only: the mask is 0 everywhere else.
    foreground = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), tuple(int(c) for c in first))
    if fill != "solid":
        foreground.paste(tuple(int(c) for c in second), (0, 0), _fill_pattern(fill, box, period, rng))
    picture.paste(foreground, box, mask.crop(box))


def render_image(label: int, num_classes: int, seed: int, index: int) -> np.ndarray:
    """The (H, W, 3) uint8 picture number `index` of class `label`, a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, label, num_classes]))
    width, height = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    if rng.random() < 0.25:  # portrait, as about a quarter of ImageNet is
        width, height = height, width
    factors = class_factors(label, num_classes)
    outline = _outline(FAMILIES[factors["family"]])
    fill = FILLS[factors["fill"]]
    size = SIZES[factors["size"] if factors["size"] is not None else rng.integers(len(SIZES))]

    # Background: a faintly tinted grey field at several scales (a bit like paper or fabric), then clutter strokes.
    grey = _colour_in_band(rng, _BACKGROUND).mean() + rng.normal(0, 12, 3)
    background = _octave_texture(rng, np.clip(grey, 0, 255), width, height)
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(8, 25))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        length, angle = rng.uniform(10, 80), rng.uniform(0, 2 * np.pi)
        colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
        draw.line([(x0, y0), (x0 + length * np.cos(angle), y0 + length * np.sin(angle))],
                  fill=colour, width=int(rng.integers(1, 4)))

    # Foreground: as many objects as the size's density gives for this picture's area, each drawn in turn.
    (density_lo, density_hi), (size_lo, size_hi) = _SIZE_RANGES[size]
    short = min(width, height)
    for _ in range(int(round(rng.uniform(density_lo, density_hi) * width * height / short ** 2))):
        radius = rng.uniform(size_lo, size_hi) * short
        _draw_object(background, outline, fill, radius, max(0.5 * radius, _MIN_PERIOD * short), rng)

    pixels = np.asarray(background, dtype=np.int16)
    # Sensor-like grain (uniform, zero mean): with the texture it brings the JPEG size near ImageNet's ~110 KB.
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
    for part in ("train", "val", MANIFEST, MANIFEST + ".partial"):
        target = root / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _settings(images: int, classes: int, seed: int, val_fraction: float, quality: int) -> dict[str, object]:
    """What a tree's pixels depend on: the manifest entries that stale_reason compares."""
    return {"generator": GENERATOR, "images": images, "classes": classes, "seed": seed,
            "val_fraction": val_fraction, "quality": quality}


def _write_manifest(root: Path, content: dict[str, object]) -> None:
    """Replace the manifest atomically, so that a reader never sees half of one."""
    partial = root / (MANIFEST + ".partial")
    partial.write_text(json.dumps(content, indent=1))
    partial.replace(root / MANIFEST)


def stale_reason(root: str | Path, images: int, classes: int = DEFAULT_CLASSES, seed: int = 0,
                 val_fraction: float = 0.0, quality: int = 95) -> str | None:
    """Why `root` must be (re)written to hold make_synthetic's tree for these settings; None if it already does."""
    manifest = Path(root).expanduser() / MANIFEST
    if not manifest.is_file():
        return "it does not exist yet" if not Path(root).expanduser().exists() else f"it holds no {MANIFEST}"
    written = json.loads(manifest.read_text())
    if not written.get("complete", False):
        return "an earlier write was interrupted"
    wanted = _settings(images, classes, seed, val_fraction, quality)
    changed = [f"{key} {written.get(key)} -> {value}" for key, value in wanted.items() if written.get(key) != value]
    return f"it was written with other settings ({', '.join(changed)})" if changed else None


def make_synthetic(root: str | Path, images: int, classes: int = DEFAULT_CLASSES, seed: int = 0,
                   val_fraction: float = 0.0, quality: int = 95, workers: int = 1,
                   overwrite: bool = False) -> SyntheticSummary:
    """Write `images` JPEGs (train plus val) under `root`; image i has label i % classes.

    The last round(images * val_fraction) images go to root/val, the rest to
    root/train, each split balanced over the classes. Refuses a non-empty
    `root` unless it is a tree this function wrote and `overwrite` is set.
    """
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes={classes}: use 1..{MAX_CLASSES} (families x fills x sizes)")
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
    settings = _settings(images, classes, seed, val_fraction, quality)
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(root, {**settings, "complete": False})
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
    written = {"train_images": train_images, "val_images": val_images, "class_names": names,
               "mean_file_bytes": summary.mean_file_bytes}
    _write_manifest(root, {**settings, **written, "complete": True})
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `byol-fast make-synthetic`."""
    parser = CommandParser(prog="byol-fast make-synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="output folder (created; must be empty or a tree written by this command)")
    parser.add_argument("--images", type=integer, required=True, help="total images, train plus val")
    parser.add_argument("--classes", type=integer, default=DEFAULT_CLASSES,
                        help=f"number of classes, 1..{MAX_CLASSES} (default {DEFAULT_CLASSES})")
    parser.add_argument("--seed", type=integer, default=0, help="the tree is a pure function of the seed (default 0)")
    parser.add_argument("--val-fraction", type=number, default=0.0, help="share of images written to DIR/val")
    parser.add_argument("--quality", type=integer, default=95, help="JPEG quality (default 95: ~120 KB per image)")
    parser.add_argument("--workers", type=integer, default=1, help="processes writing images (default 1)")
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
