"""Two ways a `--data` choice used to surprise silently, refused before any work with the fix named.

- `--data ROOT` where ROOT holds split folders (`train/`, `val/`, as `data/synthetic` or an ImageNet
  download does) instead of class folders: training took `train` and `val` as two classes, val images
  included, and the kNN monitor, finding no val split, switched itself off.
- A `--data` path of your own that does not exist, under settings that write synthetic data (the demo
  preset): the typo got 768 synthetic images written there and trained on. Synthetic data is written
  only to the preset's own `data` path, or where you point `--data` when you also ask for it with
  `--synthetic-images` (or `synthetic_images` in your --config file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from byol_fast.config import TrainConfig, read_toml, resolve_config
from pipelines.check_data import split_folders
from pipelines.sources import visible_subfolders


def chosen_keys(args: argparse.Namespace) -> set[str]:
    """The settings the user chose on the command line or in their --config file (not the preset's)."""
    keys = {pair.partition("=")[0].strip().split(".")[0] for pair in args.set}
    keys |= {key for key in vars(args) if key not in ("preset", "config", "set")}
    if args.config:
        keys |= set(read_toml(args.config))
    return keys


def check_data_choice(config: TrainConfig, chosen: set[str]) -> None:
    """Raise ValueError for the two surprises in the module docstring."""
    data = Path(config.data).expanduser()
    splits = {split.name: split for split in split_folders(data)}
    if "train" in splits and visible_subfolders(splits["train"]):
        val = f" --val-data {splits['val']}" if "val" in splits and not config.val_data else ""
        raise ValueError(f"--data {data} holds the split folders {', '.join(splits)}, not class folders: training "
                         f"would take them as {len(splits)} classes (val images included) and the kNN monitor would "
                         f"find no val split. Pass --data {splits['train']}{val}")
    own_path = "data" in chosen and "synthetic_images" not in chosen
    if config.writes_synthetic() and own_path and not data.exists():
        usual = Path(resolve_config(config.preset).data).expanduser()
        if data.resolve() == usual.resolve():
            return
        source = f", from the {config.preset} preset" if config.preset else ""
        raise ValueError(f"training data {data} does not exist. Synthetic data (synthetic_images="
                         f"{config.synthetic_images}{source}) is written only to the data path that comes with it, "
                         f"{usual}; a --data of yours is read, never written. Fix the path, leave --data out to "
                         f"train on {usual}, or pass --synthetic-images {config.synthetic_images} to write synthetic "
                         f"data to {data}")
