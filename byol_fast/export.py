"""`byol-fast export CKPT OUT.pt`: the trained encoder as a plain torchvision or timm state_dict, plus metadata.

The output loads with `strict=True` into `torchvision.models.<arch>()` (for
a run with small_stem, one whose conv1 and maxpool are swapped as
byol_fast.model.SMALL_STEM says; `build_encoder(arch, small_stem=True)`) and
gives the same representation as the trainer's `learner.online_encoder` (with
`model.fc = nn.Identity()`, the 2048-d ResNet-50 avgpool feature). A timm
encoder (`timm/<name>`) was trained without a classifier, so its weights load
strictly into `timm.create_model(<name>, num_classes=0)` (plus `img_size=<the
training size>` for models whose shapes depend on it, such as ViTs: the .json's
`format` holds the exact call), whose output is the representation; for a
classifier, call `model.reset_classifier(n)` after loading. A random head is not
exported: it would load, but it was never trained.
`OUT.json` beside it says what it is: arch, image size, training step, the
git SHA, versions and devices of the training attempt that wrote the checkpoint
(`provenance`, with `provenance_source` saying where that record came from),
the run's config, the normalization the encoder expects, and the torch /
torchvision that exported it (`exported_with`). Both files are written
atomically (temp file in the same folder, then rename) with the usual
umask-based mode, and the output name and folder are checked before the
checkpoint is read.

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
from typing import Any, BinaryIO, Callable

import torch
import torchvision
from torch import Tensor, nn

from byol_fast.checkpoint import CheckpointError, CheckpointManager
from byol_fast.model import SMALL_STEM, TORCHVISION_ENCODERS, build_encoder, check_encoder_name
from byol_fast.timm_encoders import create_call, is_timm_arch
from pipelines.command_line import CommandParser
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
def _expected_shapes(arch: str, small_stem: bool = False, image_size: int = 224) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an encoder's state_dict, built on the meta device (no memory); cached, read-only.
    image_size matters for timm models whose shapes depend on it (a ViT's position embedding)."""
    with torch.device("meta"):
        net = build_encoder(arch, small_stem, image_size=image_size)
        return {key: tuple(value.shape) for key, value in net.state_dict().items()}


def _matching_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> int:
    """How many of `expected`'s keys `state` holds with the same shape."""
    return sum(1 for key, shape in expected.items() if key in state and tuple(state[key].shape) == shape)


def _fits(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> bool:
    return state.keys() == expected.keys() and _matching_keys(state, expected) == len(expected)


def _name_some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f" (and {len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else "")


def check_encoder_fits(state: dict[str, Tensor], arch: str, source: str = "the weights",
                       small_stem: bool = False, image_size: int = 224) -> None:
    """Raise EncoderMismatchError unless `state` loads strictly into `arch` (torchvision's, with the small stem;
    or timm's at `image_size`).

    The message lists missing and unexpected keys, keys whose shapes differ,
    and which of TORCHVISION_ENCODERS the weights do fit, if any.
    """
    try:
        check_encoder_name(arch)
    except ValueError as error:
        raise EncoderMismatchError(str(error)) from None
    expected = _expected_shapes(arch, small_stem, image_size)
    if _fits(state, expected):
        return
    if not is_timm_arch(arch) and _fits(state, _expected_shapes(arch, not small_stem)):
        stems = ("the small stem", "torchvision's stem") if small_stem else ("torchvision's stem", "the small stem")
        raise EncoderMismatchError(f"{source} fit {arch} with {stems[1]}, not with {stems[0]}: the encoder was "
                                   f"trained with small_stem={not small_stem} (byol_fast.model.SMALL_STEM)")
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
    matches = [name for name in TORCHVISION_ENCODERS
               if name != arch and _fits(state, _expected_shapes(name, small_stem))]
    if is_timm_arch(arch):
        hint = (f"Pass the --arch the run trained (the checkpoint's config records it); a ViT's position embedding "
                f"fixes the image size ({image_size} here)")
    elif matches:
        hint = f"They fit {' / '.join(matches)}: pass --arch {matches[0]}"
    else:
        score = {name: _matching_keys(state, _expected_shapes(name, small_stem)) / len(_expected_shapes(name))
                 for name in TORCHVISION_ENCODERS}
        closest = max(score, key=score.get)
        hint = (f"They fit none of {', '.join(TORCHVISION_ENCODERS)}; closest is {closest} "
                f"({score[closest]:.0%} of its keys match in name and shape)")
    library = "" if is_timm_arch(arch) else "torchvision "
    raise EncoderMismatchError(f"{source} do not fit {library}{arch}: {'; '.join(parts)}. {hint}")


def _newest_checkpoint_in(directory: Path) -> Path | None:
    """The newest step_*.pt in `directory` itself (a checkpoints/ folder) or in its checkpoints/ (a run folder)."""
    manager = CheckpointManager(directory)
    found = manager.checkpoints(directory) or manager.checkpoints()
    return found[-1][1] if found else None


def _is_exported_encoder(path: Path) -> bool:
    """Whether `path` holds a plain encoder state_dict (what `byol-fast export` writes)."""
    try:
        read_encoder_weights(path)
    except (EncoderMismatchError, OSError):
        return False
    return True


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by the trainer (CheckpointManager format), loaded safely on the CPU.

    Raises CheckpointError naming the fix; a folder or an exported encoder passed in its place gets its own.
    """
    path = Path(path)
    if path.is_dir():
        newest = _newest_checkpoint_in(path)
        example = f"e.g. {newest}" if newest else "none is there: pass run_dir/checkpoints/step_*.pt of a run"
        raise CheckpointError(f"checkpoint {path} is a directory: pass a .pt file inside it, {example}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a training checkpoint, "
                              f"run_dir/checkpoints/step_*.pt")
    try:
        # The manager only needs a run folder for its "use the previous checkpoint" hint: the file's grandparent.
        return CheckpointManager(path.parent.parent).load(path)
    except CheckpointError as error:
        # The manager's fix (move the file away, resume from an earlier one) is wrong for an exported encoder;
        # reading the file again costs nothing on the success path.
        if _is_exported_encoder(path):
            raise CheckpointError(f"{path} is an exported encoder (a plain torchvision state_dict), not a training "
                                  f"checkpoint: it needs no export; pass it to `byol-fast eval` with --weights") \
                from error
        raise


def checkpoint_small_stem(state: dict[str, Any]) -> bool:
    """Whether the checkpoint's run gave the encoder the small-image stem (its config's small_stem)."""
    return bool(state.get("config", {}).get("small_stem", False))


def checkpoint_arch(state: dict[str, Any], arch: str | None) -> str:
    """The architecture to use: `arch` when given, else the one the checkpoint recorded."""
    recorded = state.get("meta", {}).get("arch") or state.get("config", {}).get("arch")
    if arch is None and recorded is None:
        raise EncoderMismatchError("the checkpoint does not record its architecture: pass --arch "
                                   f"(one of {', '.join(TORCHVISION_ENCODERS)})")
    return arch or recorded


def _read_json_dict(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def training_provenance(state: dict[str, Any], checkpoint: Path) -> tuple[dict[str, Any] | None, str]:
    """(provenance, where it came from) of the training attempt behind `checkpoint`'s weights.

    The checkpoint's own `provenance` (byol_fast.run_log.provenance() of the attempt
    that wrote it) is exact. Older checkpoints lack it; then run_dir/provenance.json
    is used, labelled as such, because it describes the run's latest attempt, which
    may be a later one than the attempt that wrote this checkpoint.
    """
    recorded = state.get("provenance")
    if isinstance(recorded, dict) and recorded:  # {} would come from a rank that records no provenance
        return recorded, "checkpoint: the training attempt that wrote it"
    run_file = checkpoint.resolve().parent.parent / "provenance.json"
    fallback = _read_json_dict(run_file)
    if fallback is not None:
        return fallback, (f"{run_file}: the run's latest attempt, which may be a later one than the attempt that "
                          f"wrote this checkpoint (the checkpoint records no provenance)")
    return None, "none recorded (neither the checkpoint nor run_dir/provenance.json)"


def metadata_path(output: str | Path) -> Path:
    """Where the metadata of weights written to `output` goes: the same name with suffix .json."""
    return Path(output).with_suffix(".json")


def exported_metadata(weights: str | Path) -> dict[str, Any]:
    """The metadata `byol-fast export` wrote beside `weights` (arch, image_size, ...), or {} when there is none."""
    return _read_json_dict(metadata_path(weights)) or {}


def check_output_path(path: str | Path, name: str) -> None:
    """Raise ValueError unless a file can be written at `path`: not a folder, in a folder that exists and
    takes new files. `name` is what the message calls it (a CLI argument). Run it before any heavy work."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{name} {path} is a directory: pass a file name inside it, e.g. {path / 'result.json'}")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{name} {path}: its folder {folder} {what}: create the folder first "
                         f"(mkdir -p {folder}) or pass a path in an existing folder")
    try:
        # Creating a file is the test that counts: os.access says yes to root whatever the folder's mode.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{name} {path}: cannot create files in {folder} ({error.strerror or error}): "
                         f"pass a path in a folder you can write to") from error


def check_export_output(output: str | Path) -> None:
    """Raise ValueError unless `output` and its metadata file are two different, writable files."""
    output = Path(output)
    if output.suffix.lower() == ".json":
        raise ValueError(f"OUT {output} ends in .json, the name of the metadata file written beside the weights, "
                         f"so the metadata would overwrite them: pass a .pt name, e.g. {output.with_suffix('.pt')}")
    check_output_path(output, "OUT")
    check_output_path(metadata_path(output), "OUT's metadata file")


def _new_file_mode() -> int:
    """The mode open() gives a new file, 0o666 less the umask (mkstemp's temp files are 0o600, unreadable to
    the other users who can read the checkpoints). Reading the umask means setting it: it is put back at once,
    and the value in between is a strict one, so a file another thread creates meanwhile is not left open."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(handle) on a temp file beside `path`, fsync, give it the usual mode, then rename it over `path`."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp, _new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def export_checkpoint(checkpoint: str | Path, output: str | Path, arch: str | None = None) -> dict[str, Any]:
    """Write the checkpoint's encoder to `output` and its metadata to `metadata_path(output)`.

    Returns the metadata. Raises ValueError for an output name or folder that cannot
    take both files (checked before the checkpoint is read), CheckpointError for an
    unreadable checkpoint and EncoderMismatchError when the encoder does not fit
    `arch`; nothing is written then.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    check_export_output(output)
    state = load_training_checkpoint(checkpoint)
    arch = checkpoint_arch(state, arch)
    encoder = export_encoder(state["model"])
    small_stem = checkpoint_small_stem(state)
    config = state.get("config", {})
    image_size = state.get("meta", {}).get("image_size", config.get("image_size"))
    check_encoder_fits(encoder, arch, f"the encoder weights in {checkpoint}", small_stem, image_size or 224)
    provenance, provenance_source = training_provenance(state, checkpoint)
    if is_timm_arch(arch):
        model = create_call(arch, image_size or 224)
        builder = f"build_encoder({arch!r}, image_size={image_size or 224})"
        representation = "the model's output (timm's pooled features, model.num_features wide; no classifier)"
    else:
        model = f"torchvision.models.{arch}()" + (f" with {SMALL_STEM}" if small_stem else "")
        builder = f"build_encoder({arch!r}, small_stem={small_stem})"
        representation = "avgpool output (set model.fc = torch.nn.Identity() to read it)"
    metadata = {
        "format": f"{model} state_dict (load with strict=True; byol_fast.model.{builder} builds that model)",
        "arch": arch,
        "small_stem": small_stem,
        "image_size": image_size,
        "representation": representation,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "step": int(state["step"]),
        "git": (provenance or {}).get("git"),
        "provenance": provenance,
        "provenance_source": provenance_source,
        "config": config,
        "checkpoint": str(checkpoint.resolve()),
        "exported_with": {"torch": str(torch.__version__), "torchvision": torchvision.__version__,
                          **({"timm": _timm_version()} if is_timm_arch(arch) else {})},
    }
    _atomic_write(output, lambda handle: torch.save(encoder, handle))
    text = json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(metadata_path(output), lambda handle: handle.write(text.encode("utf-8")))
    return metadata


def read_encoder_weights(path: str | Path) -> dict[str, Tensor]:
    """A plain encoder state_dict file (as `byol-fast export` writes), loaded safely on the CPU.

    Raises FileNotFoundError when `path` is no file and EncoderMismatchError naming the
    path and the fix for an unreadable file, a training checkpoint, or anything else.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"weights file {path} {what}: pass the OUT.pt written by `byol-fast export`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types (RuntimeError, EOFError, UnpicklingError, ...)
        # torch's own text runs to many lines (and suggests weights_only=False): its first sentence is the clue.
        clue = (str(error).splitlines() or [""])[0].split(". ")[0]
        raise EncoderMismatchError(f"cannot read weights file {path}: it is truncated, corrupt or not a torch.save "
                                   f"file ({type(error).__name__}: {clue}). Pass the OUT.pt written by `byol-fast "
                                   f"export`, exporting it again if it was cut short") from error
    # A training checkpoint holds non-tensors too: name it as what it is before the all-tensors check.
    if isinstance(state, dict) and ("model" in state or any(str(key).startswith(ENCODER_PREFIX) for key in state)):
        raise EncoderMismatchError(f"{path} looks like a training checkpoint or a learner state_dict: "
                                   f"use --checkpoint for it, or export it first with `byol-fast export`")
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise EncoderMismatchError(f"{path} is not a state_dict of tensors: pass the OUT.pt of `byol-fast export`")
    return state


def encoder_for_features(arch: str, state: dict[str, Tensor], source: str = "the weights",
                         small_stem: bool = False, image_size: int = 224) -> nn.Module:
    """`arch` with `state` loaded strictly, mapping images to the representation: torchvision's (with the small
    stem) with `fc` replaced by Identity, or timm's at `image_size` (built without a classifier)."""
    check_encoder_fits(state, arch, source, small_stem, image_size)
    net = build_encoder(arch, small_stem, image_size=image_size)
    net.load_state_dict(state, strict=True)
    if not is_timm_arch(arch):
        net.fc = nn.Identity()
    return net


def _timm_version() -> str:
    import timm

    return timm.__version__


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `byol-fast export`."""
    parser = CommandParser(prog="byol-fast export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint (run_dir/checkpoints/step_*.pt)")
    parser.add_argument("output", help="where to write the state_dict (.pt, in an existing folder); metadata goes "
                                       "to the same name with .json")
    parser.add_argument("--arch", default=None,
                        help=f"encoder architecture: {', '.join(TORCHVISION_ENCODERS)} or timm/<name> "
                             f"(default: the one the checkpoint recorded)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `byol-fast export`."""
    args = build_parser().parse_args(argv)
    try:
        metadata = export_checkpoint(args.checkpoint, args.output, args.arch)
    except (CheckpointError, ValueError, OSError) as error:  # ValueError: bad output, EncoderMismatchError
        print(f"byol-fast export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({metadata['arch']}, step {metadata['step']}) and {metadata_path(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
