"""`byol-fast show-views`: a PNG grid of view pairs from any backend, to judge augmentations by eye.

Each row holds one source image's two views side by side (view 1 left, view 2
right), several pairs per row. The views are taken from the backend's first
batch exactly as the trainer would get them, then un-normalized with the spec's
mean/std, so what you see is what the network sees. The views are those `byol-fast train`
makes with the same --preset, --config and --set.

    byol-fast show-views data/synthetic/train --backend torch --pairs 16 --out views.png
    byol-fast show-views data/cifar/train --preset small-images --set views.view2.solarize_prob=0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from byol_fast.config import available_presets, parse_set_pairs, resolve_config
from pipelines.command_line import CommandParser, integer
from pipelines.factory import BACKENDS, build_train_loader
from pipelines.spec import RECIPES, AugmentationSpec

GAP = 4
"""Pixels of white between tiles; twice that between pairs."""


def unnormalize(views: Tensor, spec: AugmentationSpec) -> Tensor:
    """(B, 3, S, S) normalized views -> uint8 pixels, the inverse of the pipelines' normalize."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = views.detach().float().cpu() * std + mean
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def pair_grid(view1: Tensor, view2: Tensor, pairs_per_row: int) -> Tensor:
    """uint8 (B, 3, S, S) views -> one (3, H, W) uint8 image of side-by-side pairs on white."""
    count, _, size, _ = view1.shape
    rows = -(-count // pairs_per_row)
    pair_width = 2 * size + GAP
    width = pairs_per_row * pair_width + (pairs_per_row + 1) * 2 * GAP
    height = rows * size + (rows + 1) * 2 * GAP
    grid = torch.full((3, height, width), 255, dtype=torch.uint8)
    for index in range(count):
        row, column = divmod(index, pairs_per_row)
        top = 2 * GAP + row * (size + 2 * GAP)
        left = 2 * GAP + column * (pair_width + 2 * GAP)
        grid[:, top:top + size, left:left + size] = view1[index]
        grid[:, top:top + size, left + size + GAP:left + pair_width] = view2[index]
    return grid


def show_views(data: str | Path, out: str | Path, spec: AugmentationSpec, backend: str = "torchvision",
               pairs: int = 16, pairs_per_row: int = 4, seed: int = 0, device: str = "cpu") -> Path:
    """Writes the first `pairs` view pairs of `backend` over `data` (`spec`'s views) to the PNG `out`;
    returns its path."""
    if pairs < 2:
        raise ValueError(f"pairs={pairs}: show at least 2 (BatchNorm-sized batches start at 2)")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"out={out} must end in .png")
    loader = build_train_loader(backend, data, spec, pairs, seed=seed, device=device, dtype=torch.float32,
                                workers=1)
    try:
        view1, view2 = next(iter(loader.batches(epoch=0)))
    finally:
        loader.close()
    grid = pair_grid(unnormalize(view1, spec), unnormalize(view2, spec), pairs_per_row)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(out)
    return out


def views_spec(args: argparse.Namespace) -> AugmentationSpec:
    """The views `byol-fast train` would make with the same --preset, --config and --set (the view side and
    the [views] table), changed by --image-size and --recipe when given."""
    overrides = parse_set_pairs(args.set)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.recipe is not None:
        overrides["views.recipe"] = args.recipe
    return resolve_config(args.preset, args.config, overrides).augmentation_spec()


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="byol-fast show-views", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="image folder, 'path label' list or shards (a .beton file for --backend "
                                     "ffcv)")
    parser.add_argument("--backend", default="torchvision", choices=[b for b in BACKENDS if b != "views"])
    parser.add_argument("--out", default="views.png", help="PNG to write (default views.png)")
    parser.add_argument("--pairs", type=integer, default=16, help="view pairs to show (default 16)")
    parser.add_argument("--pairs-per-row", type=integer, default=4, help="pairs per row of the grid (default 4)")
    parser.add_argument("--seed", type=integer, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (torch and dali backends)")
    parser.add_argument("--preset", help=f"the views of a shipped preset: {', '.join(available_presets())}")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (its [views] table and "
                                                         "image_size), applied after the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a view setting as for train (repeatable), e.g. --set views.view1.blur_prob=0.5")
    parser.add_argument("--image-size", type=integer, default=None,
                        help="view side in pixels (default: the preset's or config's, else 224)")
    parser.add_argument("--recipe", default=None, choices=RECIPES,
                        help="what the ops mean: DeepMind's official BYOL or torchvision's (default: the preset's "
                             "or config's, else official)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = show_views(args.data, args.out, views_spec(args), args.backend, args.pairs, args.pairs_per_row,
                          args.seed, args.device)
    except (ValueError, OSError) as error:  # DataError included; OSError: a --config file that cannot be read
        print(f"byol-fast show-views: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
