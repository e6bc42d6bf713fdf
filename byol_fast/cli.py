"""The `byol-fast` console script: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module, which defines `build_parser() ->
argparse.ArgumentParser` and `main(argv: list[str] | None) -> int`. Modules are
imported only when their command runs, so `byol-fast --help` stays fast (it
imports no torch: byol_fast/__init__.py imports its public names lazily) and an
optional backend (DALI, FFCV) is needed only by the commands that use it.
"""

from __future__ import annotations

import difflib
import importlib
import sys

# command -> (module, one-line help). Add a row when a subcommand lands.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("pipelines.synthetic", "write an ImageNet-like JPEG tree (the built-in data)"),
    "check-data": ("pipelines.check_data", "report every problem of an image tree (empty folders, bad files)"),
    "show-views": ("pipelines.show_views", "write a PNG grid of view pairs from any backend"),
    "convert-ffcv": ("pipelines.ffcv_loader", "convert an image folder to an FFCV .beton file"),
    "convert-shards": ("pipelines.shards.convert", "convert an image folder to WebDataset tar shards + manifest"),
    "train": ("byol_fast.train", "BYOL pretraining (also: torchrun -m byol_fast.train)"),
    "eval": ("byol_fast.evaluate", "linear or kNN evaluation of a pretrained encoder"),
    "export": ("byol_fast.export", "export the encoder as a torchvision state_dict"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items())
    return f"usage: byol-fast <command> [options]\n\ncommands:\n{rows}\n\n`byol-fast <command> --help` for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"byol-fast: unknown command {name!r}{hint} (`byol-fast --help` lists the commands)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
