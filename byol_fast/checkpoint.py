"""Checkpoints that survive crashes: atomic writes, keep-last pruning, safe loads, RNG state.

A checkpoint is `run_dir/checkpoints/step_00001234.pt`, a `torch.save`d dict with at
least `model` and `optimizer` (state dicts) plus what the trainer adds (its step
counter, RNG state from `capture_rng_state()`, a `meta` dict for `check_compatible`).
`save` stamps `format_version` and `step`.

Guarantees:
- a file named like a checkpoint is complete: bytes go to a hidden temp file in the
  same directory, are fsynced, and only then renamed over the final name;
- a model or optimizer holding NaN/inf is never written, so the last good checkpoint
  stays the newest one;
- an existing file is never overwritten: a same-step file is renamed aside, and
  only checkpoints beyond the newest `keep_last` (by step number) are deleted;
- checkpoints ahead of the step being saved belong to a history the run left (it
  resumed from an earlier checkpoint): they are renamed aside, so `--resume auto`
  and pruning follow the current history and never delete its checkpoints for them.

Loads use `torch.load(weights_only=True)`, so a state must hold only tensors and
plain Python values (dicts, lists, tuples, numbers, strings, None).
"""

from __future__ import annotations

import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "step", "model", "optimizer")
# Only these parts are checked for NaN/inf: they are what a resumed run continues from.
_FINITE_KEYS = ("model", "optimizer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, from another format or model."""


def _fsync_directory(directory: Path) -> None:
    """Makes a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on a directory; the rename still happened
    finally:
        os.close(fd)


def _floating_tensors(obj: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every floating tensor nested in dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _floating_tensors(value, f"{name}.{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _floating_tensors(value, f"{name}.{index}")


def first_nonfinite(state: dict) -> str | None:
    """Name of the first floating tensor in state["model"] / state["optimizer"] with NaN/inf, else None.

    One host sync per device holding tensors (all flags are reduced on device first),
    so this costs little even for a large model on the GPU.
    """
    tensors = [pair for key in _FINITE_KEYS if key in state for pair in _floating_tensors(state[key], key)]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in tensors:
        if tensor.numel():
            by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    # Slow path, only on failure: find which tensor it was for the error message.
    return next(name for name, tensor in tensors if tensor.numel() and not bool(torch.isfinite(tensor).all()))


class CheckpointManager:
    """Writes, finds, prunes and loads `run_dir/checkpoints/<prefix>_<step:08d>.pt`.

    Args:
        run_dir: the run directory; checkpoints live in its `checkpoints/` folder,
            created on the first save (so constructing a manager on any rank is harmless).
        keep_last: how many checkpoints (newest by step number) survive pruning.
        prefix: file name prefix; files not matching `<prefix>_<digits>.pt` are never touched.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, prefix: str = "step") -> None:
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be an integer >= 1 (the newest checkpoint is always kept)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", prefix):
            raise ValueError(f"prefix={prefix!r} must be letters, digits and '-' (it is followed by '_<step>.pt')")
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}_(\d+)\.pt")

    def path_for(self, step: int) -> Path:
        """The final file name of the checkpoint at `step`."""
        return self.directory / f"{self.prefix}_{step:08d}.pt"

    def checkpoints(self, directory: Path | None = None) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file in `directory` (default: ours), oldest first.

        Temp files, set-aside files and foreign files do not match the name pattern and are skipped.
        """
        directory = self.directory if directory is None else directory
        if not directory.is_dir():
            return []
        found = []
        for path in directory.iterdir():
            match = self._pattern.fullmatch(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The checkpoint with the highest step number, or None when there is none."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def save(self, step: int, state: dict) -> Path:
        """Writes `state` (plus `step` and `format_version`) atomically, then prunes old checkpoints.

        Raises ValueError, writing nothing, when `state` lacks `model`/`optimizer` or
        any floating tensor in them is NaN/inf. Returns the path written.
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative integer")
        missing = [key for key in _FINITE_KEYS if key not in state]
        if missing:
            raise ValueError(f"checkpoint state lacks {', '.join(missing)}: pass the model and optimizer state dicts")
        bad = first_nonfinite(state)
        if bad is not None:
            last = self.latest()
            kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written"
            raise ValueError(
                f"refusing to save the step-{step} checkpoint: {bad} holds NaN/inf; {kept}. "
                "Lower the learning rate or check the data, then resume from the last good checkpoint"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        # Temp files left by a killed process can never become checkpoints; they only hold disk space.
        for stale in self.directory.glob(f".{self.prefix}_*.pt.tmp-*"):
            stale.unlink(missing_ok=True)
        final = self.path_for(step)
        temp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        payload = {**state, "step": step, "format_version": FORMAT_VERSION}
        try:
            with open(temp, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if final.exists():
                aside = self._set_aside(final, "replaced")
                warnings.warn(f"{final} already existed; it was kept as {aside} and a new checkpoint written in its "
                              f"place")
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        for later_step, later in self.checkpoints():
            if later_step > step:
                aside = self._set_aside(later, "abandoned")
                warnings.warn(f"{later} already existed; this run resumed from before it and has now saved step "
                              f"{step}; it was kept as {aside}, out of --resume auto's and pruning's way")
        _fsync_directory(self.directory)
        self._prune(keep=final)
        return final

    def _set_aside(self, path: Path, why: str) -> Path:
        """Renames a checkpoint out of the name pattern (`<name>.<why>-<time>-<pid>`) instead of deleting it;
        returns the new name."""
        aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.replace(path, aside)
        return aside

    def _prune(self, keep: Path) -> None:
        """Deletes checkpoints beyond the newest `keep_last` by step number, never `keep`."""
        ordered = [path for _, path in reversed(self.checkpoints())]
        survivors = set(ordered[: self.keep_last]) | {keep}
        for path in ordered:
            if path not in survivors:
                path.unlink(missing_ok=True)

    def load(self, path: str | os.PathLike, map_location: Any = "cpu", *, weights_only: bool = True) -> dict:
        """Reads a checkpoint and checks its format; raises CheckpointError naming the file and the fix.

        `weights_only=False` unpickles arbitrary objects: only for files you trust.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist: pass an existing .pt file or --resume auto")
        try:
            state = torch.load(path, map_location=map_location, weights_only=weights_only)
        except Exception as error:  # torch.load raises many types (RuntimeError, EOFError, UnpicklingError, ...)
            # A pickled Python class is refused as an "Unsupported global"; garbage bytes fail differently.
            if weights_only and "Unsupported global" in str(error):
                raise CheckpointError(
                    f"checkpoint {path} holds Python objects that a safe load refuses ({error}). "
                    "If you trust the file, load it with weights_only=False"
                ) from error
            raise CheckpointError(
                f"cannot read checkpoint {path}: it is truncated or corrupt ({type(error).__name__}: {error}). "
                f"{self._fallback_hint(path)}"
            ) from error
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a byol_fast checkpoint dict")
        missing = [key for key in REQUIRED_KEYS if key not in state]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} lacks {', '.join(missing)}: it was not written by byol_fast's CheckpointManager. "
                f"{self._fallback_hint(path)}"
            )
        if state["format_version"] != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format_version {state['format_version']!r}, this byol_fast reads "
                f"{FORMAT_VERSION}: resume with the byol_fast commit that wrote it (see provenance.json in its run "
                "directory) or start a new run"
            )
        return state

    def _fallback_hint(self, bad: Path) -> str:
        """The fix for an unusable file: the next older checkpoint beside it, if any."""
        match = self._pattern.fullmatch(bad.name)
        bad_step = int(match.group(1)) if match else None
        older = [path for step, path in self.checkpoints(bad.parent) if bad_step is None or step < bad_step]
        if older:
            return f"Resume from the previous one with --resume {older[-1]}, or move {bad} away so --resume auto skips it"
        return f"Move {bad} away and resume from an earlier checkpoint, or start a new run"


def resolve_resume(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """What to resume from: None -> None; "auto" -> newest checkpoint in run_dir (None if none); else that file."""
    if resume is None:
        return None
    if str(resume) == "auto":
        return CheckpointManager(run_dir).latest()
    path = Path(resume)
    if path.is_dir():
        raise CheckpointError(f"--resume {path} is a directory: pass a checkpoint file (…/checkpoints/step_*.pt) or 'auto'")
    if not path.is_file():
        raise CheckpointError(
            f"--resume {path}: no such checkpoint file. Pass an existing step_*.pt, or leave --resume out (it "
            f"defaults to 'auto': continue from the newest checkpoint in {Path(run_dir) / 'checkpoints'}, or start "
            f"fresh when there is none)"
        )
    return path


def capture_rng_state() -> dict:
    """The state of Python's `random`, NumPy's global RNG, torch's CPU RNG and every CUDA device's RNG.

    Held in tensors and plain values only, so it survives a weights_only load.
    """
    name, key, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Puts back what `capture_rng_state` recorded; a different CUDA device count restores the common devices."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    saved_cuda = state.get("cuda")
    if saved_cuda is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(saved_cuda) != count:
            warnings.warn(f"checkpoint has RNG state for {len(saved_cuda)} CUDA devices, this process sees {count}: "
                          f"restoring the first {min(count, len(saved_cuda))}")
        for device, rng in enumerate(saved_cuda[:count]):
            torch.cuda.set_rng_state(rng.cpu(), device)


def check_compatible(state: dict, expected: dict, source: str | os.PathLike | None = None) -> None:
    """Raises CheckpointError listing every key of `expected` that differs from `state["meta"]`.

    `expected` holds what must not change across a resume (arch, image_size, projector
    sizes, ...); keep world-size-dependent values out. `source` names the file in the message.
    """
    recorded = state.get("meta", {})
    mismatches = []
    for key, value in expected.items():
        if key not in recorded:
            mismatches.append(f"{key}: not recorded in the checkpoint, current {value!r}")
        elif recorded[key] != value:
            mismatches.append(f"{key}: checkpoint {recorded[key]!r}, current {value!r}")
    if mismatches:
        where = f"checkpoint {source}" if source is not None else "the checkpoint"
        raise CheckpointError(
            f"{where} does not match the current configuration ({'; '.join(mismatches)}). "
            "Resume with the checkpoint's settings, or start a new run in another run directory"
        )
