"""`byol-fast export CKPT OUT.pt`: the trained encoder as a plain torchvision state_dict, plus metadata.

The output loads with `strict=True` into `torchvision.models.<arch>()` and
gives the same representation as the trainer's `learner.online_encoder` (with
`model.fc = nn.Identity()`, the 2048-d ResNet-50 avgpool feature).
`OUT.json` beside it says what it is: arch, image size, training step, the
run's git SHA and config, the normalization the encoder expects. Both files are
written atomically (temp file in the same folder, then rename).

The same module knows how to check that a state_dict fits an architecture and,
when it does not, which keys and shapes differ and which architecture the
weights look like; `byol-fast eval` uses it too.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from byol_fast.checkpoint import CheckpointError, CheckpointManager
from byol_fast.model import TORCHVISION_ENCODERS, build_encoder
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD

ENCODER_PREFIX = "online_encoder.net."
"""Where the online encoder's torchvision net sits in a BYOL learner's state_dict."""
# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_NAMED = 5


class EncoderMismatchError(ValueError):
    """Weights that do not fit the named architecture; the message names the differing keys and shapes."""


def export_encoder(learner_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The online encoder's torchvision state_dict out of a BYOL learner's state_dict (tensors cloned)."""
    state = dict(learner_state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    encoder = {key[len(ENCODER_PREFIX):]: value.detach().clone() for key, value in state.items()
               if key.startswith(ENCODER_PREFIX)}
    if not encoder:
        some = ", ".join(list(state)[:_MAX_NAMED]) or "no keys at all"
        raise EncoderMismatchError(f"this state_dict has no '{ENCODER_PREFIX}*' keys (it starts with {some}): "
                                   f"pass a BYOL learner's state_dict, e.g. a training checkpoint's 'model'")
    return encoder


@functools.lru_cache(maxsize=None)
def _expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a torchvision arch's state_dict, built on the meta device (no memory); cached, read-only."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in build_encoder(arch).state_dict().items()}


def _matching_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> int:
    """How many of `expected`'s keys `state` holds with the same shape."""
    return sum(1 for key, shape in expected.items() if key in state and tuple(state[key].shape) == shape)


def _fits(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> bool:
    return state.keys() == expected.keys() and _matching_keys(state, expected) == len(expected)


def _name_some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f" (and {len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else "")


def check_encoder_fits(state: dict[str, Tensor], arch: str, source: str = "the weights") -> None:
    """Raise EncoderMismatchError unless `state` loads strictly into torchvision's `arch`.

    The message lists missing and unexpected keys, keys whose shapes differ,
    and which of TORCHVISION_ENCODERS the weights do fit, if any.
    """
    expected = _expected_shapes(arch)
    if _fits(state, expected):
        return
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected if k in state
              and tuple(state[k].shape) != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_name_some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_name_some(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (weights vs {arch}): {_name_some(shapes)}")
    matches = [name for name in TORCHVISION_ENCODERS if name != arch and _fits(state, _expected_shapes(name))]
    if matches:
        hint = f"They fit {' / '.join(matches)}: pass --arch {matches[0]}"
    else:
        score = {name: _matching_keys(state, _expected_shapes(name)) / len(_expected_shapes(name))
                 for name in TORCHVISION_ENCODERS}
        closest = max(score, key=score.get)
        hint = (f"They fit none of {', '.join(TORCHVISION_ENCODERS)}; closest is {closest} "
                f"({score[closest]:.0%} of its keys match in name and shape)")
    raise EncoderMismatchError(f"{source} do not fit torchvision {arch}: {'; '.join(parts)}. {hint}")


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by the trainer (CheckpointManager format), loaded safely on the CPU."""
    path = Path(path)
    # The manager only needs a run folder for its "use the previous checkpoint" hint: the file's grandparent.
    return CheckpointManager(path.parent.parent).load(path)


def checkpoint_arch(state: dict[str, Any], arch: str | None) -> str:
    """The architecture to use: `arch` when given, else the one the checkpoint recorded."""
    recorded = state.get("meta", {}).get("arch") or state.get("config", {}).get("arch")
    if arch is None and recorded is None:
        raise EncoderMismatchError("the checkpoint does not record its architecture: pass --arch "
                                   f"(one of {', '.join(TORCHVISION_ENCODERS)})")
    return arch or recorded


def _run_provenance(checkpoint: Path) -> dict[str, Any] | None:
    """The run's provenance.json (run_dir/provenance.json beside run_dir/checkpoints/), if present."""
    candidate = checkpoint.resolve().parent.parent / "provenance.json"
    if not candidate.is_file():
        return None
    try:
        return json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _atomic_write(path: Path, write) -> None:
    """Call write(handle) on a temp file beside `path`, fsync, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def export_checkpoint(checkpoint: str | Path, output: str | Path, arch: str | None = None) -> dict[str, Any]:
    """Write the checkpoint's encoder to `output` and its metadata to `output` with suffix .json.

    Returns the metadata. Raises CheckpointError for an unreadable checkpoint and
    EncoderMismatchError when the encoder does not fit `arch`; nothing is written then.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    state = load_training_checkpoint(checkpoint)
    arch = checkpoint_arch(state, arch)
    encoder = export_encoder(state["model"])
    check_encoder_fits(encoder, arch, f"the encoder weights in {checkpoint}")
    config = state.get("config", {})
    provenance = _run_provenance(checkpoint) or {}
    metadata = {
        "format": f"torchvision.models.{arch}() state_dict (load with strict=True)",
        "arch": arch,
        "image_size": state.get("meta", {}).get("image_size", config.get("image_size")),
        "representation": "avgpool output (set model.fc = torch.nn.Identity() to read it)",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "step": int(state["step"]),
        "git": provenance.get("git"),
        "config": config,
        "checkpoint": str(checkpoint.resolve()),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    _atomic_write(output, lambda handle: torch.save(encoder, handle))
    text = json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(output.with_suffix(".json"), lambda handle: handle.write(text.encode("utf-8")))
    return metadata


def read_encoder_weights(path: str | Path) -> dict[str, Tensor]:
    """A plain encoder state_dict file (as `byol-fast export` writes), loaded safely on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: pass the OUT.pt written by `byol-fast export`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EncoderMismatchError(f"{path} is not a state_dict of tensors: pass the OUT.pt of `byol-fast export`")
    if "model" in state or any(key.startswith(ENCODER_PREFIX) for key in state):
        raise EncoderMismatchError(f"{path} looks like a training checkpoint or a learner state_dict: "
                                   f"use --checkpoint for it, or export it first with `byol-fast export`")
    return state


def encoder_for_features(arch: str, state: dict[str, Tensor], source: str = "the weights") -> nn.Module:
    """torchvision `arch` with `state` loaded strictly and `fc` replaced by Identity: images -> representation."""
    check_encoder_fits(state, arch, source)
    net = build_encoder(arch)
    net.load_state_dict(state, strict=True)
    net.fc = nn.Identity()
    return net


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `byol-fast export`."""
    parser = argparse.ArgumentParser(prog="byol-fast export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint (run_dir/checkpoints/step_*.pt)")
    parser.add_argument("output", help="where to write the state_dict (.pt); metadata goes to the same name .json")
    parser.add_argument("--arch", choices=TORCHVISION_ENCODERS, default=None,
                        help="encoder architecture (default: the one the checkpoint recorded)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `byol-fast export`."""
    args = build_parser().parse_args(argv)
    try:
        metadata = export_checkpoint(args.checkpoint, args.output, args.arch)
    except (CheckpointError, EncoderMismatchError) as error:
        print(f"byol-fast export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({metadata['arch']}, step {metadata['step']}) and {Path(args.output).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
