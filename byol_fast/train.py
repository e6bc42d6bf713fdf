"""BYOL pretraining: `byol-fast train`, `python -m byol_fast.train`, `torchrun --nproc_per_node=N -m byol_fast.train`.

    byol-fast train --preset demo                         # minutes on a CPU laptop, built-in data
    torchrun --nproc_per_node=8 -m byol_fast.train --preset imagenet-300ep --data /imagenet/train
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --max-restarts=3 -m byol_fast.train --preset imagenet-1000ep --data /imagenet/train

Settings resolve as defaults -> --preset -> --config FILE -> flags and --set KEY=VALUE
(see byol_fast/config.py); impossible ones fail before any model is built.

Resuming: `--resume auto` (the default) continues from the newest checkpoint in
run_dir (model, target, optimizer, step counter, RNG states and the pipeline's
position: the epoch and the batch within it, reached again through the seeded
sharding), or starts fresh when there is none. So when torchrun restarts
failed workers (`--max-restarts`), they pick up where the last checkpoint left
off with no extra flag.

Stopping: SIGTERM or SIGINT (Ctrl-C), sent to the main process or to the whole
process group (`timeout`, Slurm's scancel and preemption, `kill -- -PGID`,
torchrun), finish the current step, save a checkpoint and exit; data-loading
workers leave the signal to the main process, and all ranks agree on the step
through a small gloo collective each step. The first signal is acknowledged at
once with what will happen; repeats are explained, not acted on (SIGKILL quits
at once). A kNN pass in progress is abandoned and left to the resumed run, as
is a kNN due at the stopping step, unless it is the run's last. SIGTERM exits
0, so a preempted job counts as a clean stop and its resubmission (same
command) resumes; SIGINT exits 130. torchrun forwards signals to its workers
and waits 30 s before killing them, ample for a checkpoint; torchrun itself
then exits 1 (its SignalException). Exit codes: 0 done or stopped by SIGTERM,
1 training failed (e.g. a non-finite loss, or a data-loading worker killed by
the out-of-memory killer: the message names the cause and the last good
checkpoint, and no checkpoint of the bad state is written), 2 bad
configuration, 130 stopped by SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import signal
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

import torch

from byol_fast.checkpoint import (CheckpointError, CheckpointManager, capture_rng_state, check_compatible,
                                  resolve_resume, restore_rng_state)
from byol_fast.config import (TrainConfig, available_presets, field_docs, field_types, parse_set_pairs, parse_value,
                               resolve_config)
from byol_fast.cross_rank_bn import convert_sync_batchnorm
from byol_fast.data_checks import check_data_choice, chosen_keys
from byol_fast.distributed import (DistInfo, HostFlagReducer, all_reduce_host, barrier, broadcast_module,
                                   broadcast_object, cleanup, gather_objects, init_distributed, world_from_env)
from byol_fast.knn import KnnMonitor
from byol_fast.model import BYOL
from byol_fast.optimizers import build_optimizer, peak_lr
from byol_fast.run_log import RunLogger, byol_step_flops_per_image, measure_matmul_flops, mfu, provenance
from byol_fast.schedules import CosineTau, WarmupCosineLR
from byol_fast.step import TrainStep
from byol_fast.stop_signals import EXIT_OK, StopSignals, describe_worker_death
from pipelines.command_line import CommandParser
from pipelines.factory import build_train_loader, resolve_backend
from pipelines.shards.source import is_shard_spec
from pipelines.sources import ImageList, scan_image_folder
from pipelines.synthetic import make_synthetic, stale_reason

EXIT_FAILED, EXIT_USAGE = 1, 2  # and stop_signals' EXIT_OK (0) and EXIT_INTERRUPTED (130)
# Settings a resumed run must share with its checkpoint: they fix the model's shape, the schedules
# and what "batch b of epoch e" means. The world size may change (checkpoints are rank-agnostic).
RESUME_KEYS = ("arch", "small_stem", "init", "image_size", "projection_size", "projection_hidden_size",
               "prediction_hidden_size", "global_batch", "epochs", "warmup_epochs", "base_lr", "weight_decay",
               "momentum", "eta", "tau_base", "seed", "optimizer", "beta1", "beta2")
# What checkpoints written before optimizers became a setting ran with (they lack these RESUME_KEYS).
LEGACY_OPTIMIZER_META = {"optimizer": "lars", "beta1": 0.9, "beta2": 0.999}


# Flags of other trainers that people type out of habit, and what they are called here.
FLAG_ALIASES = {"--batch-size": "--global-batch (source images per step, summed over all ranks)",
                "--lr": "--base-lr (per 256 images; the peak lr is base_lr * global_batch / 256)",
                "--learning-rate": "--base-lr (per 256 images; the peak lr is base_lr * global_batch / 256)",
                "--num-workers": "--workers", "--output-dir": "--run-dir", "--backend": "--data-backend"}
_KIND_NAMES = {int: "an integer", float: "a number", type(None): "none"}


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says why and what to do."""


# ---- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """`byol-fast train` flags: --preset, --config, --set and one flag per TrainConfig field."""
    parser = CommandParser(prog="byol-fast train", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:]), aliases=FLAG_ALIASES)
    parser.add_argument("--preset", help=f"start from a shipped preset: {', '.join(available_presets())}")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings applied after the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting by its name (repeatable), e.g. --set base_lr=0.3")
    docs, types_ = field_docs(), field_types()
    for field in fields(TrainConfig):
        if field.name in ("preset", "views"):  # views: a table, reached with --set views.KEY=VALUE
            continue
        flag = "--" + field.name.replace("_", "-")
        if types_[field.name] in (bool, bool | None):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=docs.get(field.name))
        else:
            parser.add_argument(flag, dest=field.name, type=_typed(field.name), default=argparse.SUPPRESS,
                                metavar=field.name.upper(), help=f"{docs.get(field.name)} (default: {field.default})")
    return parser


def _typed(name: str):
    """An argparse `type` converting a flag's text to the field's type ('none' for optional fields)."""
    annotation = field_types()[name]
    kinds = typing.get_args(annotation) or (annotation,)
    expected = " or ".join(_KIND_NAMES.get(kind, kind.__name__) for kind in kinds)

    def convert(text: str):
        try:
            return parse_value(name, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
    return convert


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve the preset, config file, --set pairs and flags (flags win over --set) into a TrainConfig."""
    overrides = parse_set_pairs(args.set)
    overrides.update({k: v for k, v in vars(args).items() if k not in ("preset", "config", "set")})
    return resolve_config(args.preset, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `byol-fast train` and `python -m byol_fast.train`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        _, world_size, _ = world_from_env()
        device_kind = config.resolved_device()
        config.validate(world_size, device_kind)
        check_data_choice(config, chosen_keys(args))
        resolve_backend(config.data_backend, torch.device(device_kind))  # a missing extra fails here
        resume_path = _resume_path(config)
    except (ValueError, CheckpointError) as error:
        print(f"byol-fast train: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return run(config, device_kind, resume_path)


def _resume_path(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: fresh); refuses to start fresh over another run's checkpoints."""
    manager = CheckpointManager(config.run_dir, keep_last=config.keep_checkpoints)
    if config.resume is None and manager.latest() is not None:
        raise ValueError(f"run_dir {config.run_dir} already holds checkpoints (newest {manager.latest()}) and "
                         f"resume is off: pass --resume auto to continue that run, or a new --run-dir")
    return resolve_resume(config.resume, config.run_dir)


# ---- set-up helpers -----------------------------------------------------------------------------

def ensure_synthetic_data(config: TrainConfig, info: DistInfo) -> None:
    """Write the built-in data on rank 0 when the config asks for it (TrainConfig.writes_synthetic) and
    `data` is missing or holds a tree made with other settings, by older code or by an interrupted write;
    the other ranks wait."""
    if not config.writes_synthetic():
        return
    root = Path(config.data).expanduser().parent
    total = config.synthetic_images + config.synthetic_val_images
    val_fraction = config.synthetic_val_images / total
    reason = stale_reason(root, total, val_fraction=val_fraction) if info.is_main else None
    if reason is not None:
        print(f"byol-fast train: writing {total} synthetic images to {root} ({reason})", file=sys.stderr)
        make_synthetic(root, images=total, val_fraction=val_fraction, workers=max(1, min(config.workers, 8)),
                       overwrite=True)
    barrier(info)


def build_knn_monitor(config: TrainConfig, info: DistInfo) -> KnnMonitor | None:
    """The kNN monitor, on rank 0 only, when the config has a labelled val folder (TrainConfig.resolved_val_data)."""
    val = config.resolved_val_data()
    if not (val is not None and config.knn_every_epochs and info.is_main):
        return None
    bank = scan_image_folder(config.data)
    stride = -(-len(bank) // config.knn_bank_images)  # ceil: an even subsample of at most knn_bank_images
    bank = ImageList(bank.files[::stride], bank.labels[::stride], bank.classes)
    return KnnMonitor(bank, scan_image_folder(val), config.knn_every_epochs,
                      image_size=config.image_size, device=info.device)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---- the run ------------------------------------------------------------------------------------

class Trainer:
    """Builds everything for one run from a validated config, then `train()` runs the loop."""

    def __init__(self, config: TrainConfig, info: DistInfo, resume_path: Path | None) -> None:
        self.config, self.info = config, info
        device = info.device
        # Every step has the same shapes, so cuDNN's autotuning runs once (in the step's warm-up, before
        # capture) and its fastest algorithms are used from then on, as in the benchmarks.
        torch.backends.cudnn.benchmark = device.type == "cuda"
        torch.manual_seed(config.seed)  # the same initial weights on every rank (and broadcast below)
        ensure_synthetic_data(config, info)
        self.knn = build_knn_monitor(config, info)
        self.global_batch = config.global_batch
        per_rank_batch = config.global_batch // info.world_size
        learner = BYOL(config.arch, image_size=config.image_size, hidden_layer="auto",
                       projection_size=config.projection_size, projection_hidden_size=config.projection_hidden_size,
                       prediction_hidden_size=config.prediction_hidden_size, tau=config.tau_base, init=config.init,
                       small_stem=config.small_stem).to(device)
        if info.distributed:
            learner = convert_sync_batchnorm(learner, device)
            broadcast_module(learner, info)
        self.learner = learner
        self.optimizer = build_optimizer(config.optimizer, learner, learner.trainable_parameters(),
                                         weight_decay=config.weight_decay, momentum=config.momentum, eta=config.eta,
                                         betas=(config.beta1, config.beta2))
        self.cuda_graph = config.resolved_cuda_graph(device.type)
        self.precision = config.resolved_precision(device.type)
        self.step = TrainStep(learner, self.optimizer, batch_size=per_rank_batch, image_size=config.image_size,
                              device=device, precision=self.precision,
                              channels_last=config.resolved_channels_last(device.type), cuda_graph=self.cuda_graph,
                              compile=config.compile, accumulation_steps=config.accumulation_steps)
        spec = config.augmentation_spec()
        self.loader = build_train_loader(config.data_backend, config.data, spec, per_rank_batch, rank=info.rank,
                                         world_size=info.world_size, seed=config.seed, device=device,
                                         dtype=self.step.input_dtype, workers=config.workers, out=self.step.inputs,
                                         shard_manifest=config.shard_manifest, shuffle_buffer=config.shuffle_buffer,
                                         max_bad_fraction=config.max_bad_fraction)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, config.max_steps or self.total_steps)
        self.lr_at = WarmupCosineLR(peak_lr(config.optimizer, config.base_lr, config.global_batch), self.total_steps,
                                    config.warmup_epochs * self.steps_per_epoch)
        self.tau_at = CosineTau(config.tau_base, self.total_steps)
        self.meta = {**{key: getattr(config, key) for key in RESUME_KEYS}, "steps_per_epoch": self.steps_per_epoch}
        self.manager = CheckpointManager(config.run_dir, keep_last=config.keep_checkpoints)
        self.completed = 0  # optimizer steps done, over the whole run (resumes included)
        self.knn_pending = False  # a stop at an epoch's end left that epoch's kNN to the resumed run
        # This run's newest checkpoint: the manager's newest may lie in a history a resume from an older one left.
        self.last_checkpoint: Path | None = None
        self.flags = HostFlagReducer(info)
        # What produced this attempt (code, versions, device, command); every checkpoint it writes carries it.
        self.provenance = provenance() if info.is_main else {}
        # Rank 0 picks the checkpoint: ranks that each took "the newest" of a node-local or stale run_dir
        # listing would resume from different steps, diverge and hang in a collective.
        resume_path = broadcast_object(resume_path, info)
        if resume_path is not None:
            self._restore_on_every_rank(resume_path)
        self.flops_per_image = byol_step_flops_per_image(
            config.arch, config.image_size, projection_size=config.projection_size,
            projection_hidden_size=config.projection_hidden_size,
            prediction_hidden_size=config.prediction_hidden_size, small_stem=config.small_stem) if info.is_main else 0.0
        measure_peak = device.type == "cuda" and info.is_main
        peak = config.peak_tflops or (measure_matmul_flops(device) / 1e12 if measure_peak else None)
        self.peak_flops = peak * 1e12 if peak else None

    def describe(self) -> dict:
        """What the config resolved to on this machine (recorded in config.json)."""
        return {"device": str(self.info.device), "world_size": self.info.world_size,
                "per_rank_batch": self.global_batch // self.info.world_size, "backend": self.loader.backend,
                "precision": self.precision, "cuda_graph": self.cuda_graph, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "stop_step": self.stop_step, "peak_lr": self.lr_at.peak_lr,
                "flops_per_image": self.flops_per_image, "peak_tflops": self.peak_flops and self.peak_flops / 1e12,
                "views": dataclasses.asdict(self.config.augmentation_spec())}

    # -- checkpoints --

    def _restore_on_every_rank(self, path: Path) -> None:
        """Restore `path` on all ranks, or raise on all of them if any rank cannot."""
        failure = None
        try:
            self._restore(path)
        except CheckpointError as error:
            failure = error
        if self.flags.any(failure is not None):
            raise failure or CheckpointError(f"another rank could not restore {path}, the checkpoint rank 0 chose: "
                                             f"run_dir must be on a filesystem every rank shares")

    def _restore(self, path: Path) -> None:
        state = self.manager.load(path)
        check_compatible({**state, "meta": {**LEGACY_OPTIMIZER_META, **state.get("meta", {})}}, self.meta, path)
        try:
            self.learner.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer ({error}): resume with "
                                  f"the settings that wrote it, or start a new --run-dir") from error
        self.step.load_state_dict(state["train_step"])
        self.completed = int(state["step"])
        self.last_checkpoint = path
        self.knn_pending = bool(state["position"].get("knn_pending", False))
        rng = state.get("rng", [])
        if len(rng) == self.info.world_size:
            restore_rng_state(rng[self.info.rank])
        elif self.info.is_main:
            print(f"byol-fast train: {path} was written by {len(rng)} ranks, this run has {self.info.world_size}: "
                  f"RNG states start fresh (data order and weights are unaffected)", file=sys.stderr)

    def save(self, knn_pending: bool = False) -> Path | None:
        """Checkpoint the current (finite, just-checked) state; collective: every rank calls it.
        `knn_pending`: the epoch that just ended still needs its kNN (run first when resumed)."""
        rng = gather_objects(capture_rng_state(), self.info)
        failure = None
        path = None
        if self.info.is_main:
            epoch, batch = divmod(self.completed, self.steps_per_epoch)
            state = {"model": self.learner.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "train_step": self.step.state_dict(), "rng": rng, "meta": self.meta,
                     "position": {"epoch": epoch, "batch": batch, "steps_per_epoch": self.steps_per_epoch,
                                  "knn_pending": knn_pending},
                     "schedules": {"peak_lr": self.lr_at.peak_lr, "warmup_steps": self.lr_at.warmup_steps,
                                   "total_steps": self.total_steps, "tau_base": self.tau_at.tau_base},
                     "world_size": self.info.world_size, "config": self.config.to_dict(),
                     "provenance": self.provenance}
            try:
                path = self.manager.save(self.completed, state)
            except ValueError as error:  # NaN/inf in the weights: nothing was written
                failure = str(error)
        if self.flags.any(failure is not None):
            raise TrainingError(failure or f"rank 0 could not save the step-{self.completed} checkpoint")
        self.last_checkpoint = self.manager.path_for(self.completed)
        return path

    # -- the loop --

    def train(self, logger: RunLogger, stop: StopSignals) -> int:
        """Run from `self.completed` to `self.stop_step`; returns the exit code (raises TrainingError)."""
        try:
            return self._train(logger, stop)
        except RuntimeError as error:  # PyTorch raises a worker's death anywhere in the loop (from SIGCHLD)
            death = describe_worker_death(error, self.config.workers)
            if death is None:
                raise
            raise TrainingError(f"{death}. {self._last_good()}; the same command resumes from it") from error

    def _last_good(self) -> str:
        return f"the last good checkpoint is {self.last_checkpoint or 'none (none was saved yet)'}"

    def _train(self, logger: RunLogger, stop: StopSignals) -> int:
        window_start, data_wait, timed_steps = time.perf_counter(), 0.0, 0
        lr_tensor = self.optimizer.param_groups[0]["lr"]
        if self.completed == 0 or self.knn_pending:
            _, seconds = self._run_knn(logger, self.completed // self.steps_per_epoch, stop, abandonable=True)
            window_start += seconds
            if self.flags.any(stop.requested):  # host collective; no step since the last checkpoint: none to save
                return self._stopped(stop)
        while self.completed < self.stop_step:
            epoch, start = divmod(self.completed, self.steps_per_epoch)
            end = min(self.steps_per_epoch, start + self.stop_step - self.completed)
            with contextlib.closing(self.loader.batches(epoch, start)) as batches:
                for _ in range(start, end):
                    stop.activity = f"training (step {self.completed + 1} of {self.stop_step})"
                    waited = time.perf_counter()
                    views = next(batches, None)
                    data_wait += time.perf_counter() - waited
                    if views is None:
                        raise TrainingError(f"the {self.loader.backend} backend ended epoch {epoch} before its "
                                            f"{self.steps_per_epoch} batches: the data changed during the run?")
                    # Schedules: host floats written into the device tensors the (captured) step reads.
                    lr_tensor.fill_(self.lr_at(self.completed))
                    self.learner.tau.fill_(self.tau_at(self.completed))
                    was_warm = self.step.warm
                    self.step(*views)
                    self.completed += 1
                    if was_warm:
                        timed_steps += 1
                    elif self.step.warm:  # warm-up, autotuning and capture just ended: not training throughput
                        if self.info.device.type == "cuda":
                            torch.cuda.synchronize(self.info.device)  # SYNC: once per attempt
                        window_start, data_wait = time.perf_counter(), 0.0
                    k = self.completed
                    last = k == self.stop_step
                    stopping = self.flags.any(stop.requested)  # host collective, no device sync
                    epoch_done = k % self.steps_per_epoch == 0
                    knn_done = not epoch_done
                    # A stopping run skips the epoch's kNN (a scheduler kills it soon: torchrun 30 s after the
                    # signal) and its resumed run runs it first. The last step's has no resume to wait for.
                    if epoch_done and (last or not stopping):
                        knn_done, seconds = self._run_knn(logger, k // self.steps_per_epoch, stop,
                                                          abandonable=not last)
                        window_start += seconds
                        stopping = stopping or self.flags.any(stop.requested)  # one that came during the kNN
                    every = self.config.checkpoint_every
                    checkpoint_due = stopping or last or (every > 0 and k % every == 0)
                    if checkpoint_due or k % self.config.log_every == 0:
                        # Before any checkpoint: this is where a non-finite loss is found (never saved).
                        window_start = self._log(logger, k, window_start, data_wait, timed_steps)
                        data_wait, timed_steps = 0.0, 0
                    if checkpoint_due:
                        stop.activity = f"saving the step-{k} checkpoint"
                        path = self.save(knn_pending=not knn_done)
                        if self.info.is_main:
                            print(f"byol-fast train: saved {path}", file=sys.stderr)
                        window_start = time.perf_counter()  # checkpoint time is not training throughput
                    if stopping:
                        return self._stopped(stop)
        return EXIT_OK  # the last step's checkpoint was saved in the loop

    def _stopped(self, stop: StopSignals) -> int:
        """Say where a signalled run stopped; returns its exit code."""
        if self.info.is_main:
            name = signal.Signals(stop.received).name if stop.requested else "a signal on another rank"
            print(f"byol-fast train: stopped by {name} at step {self.completed} ({self._last_good()}); run the same "
                  f"command (--resume auto) to continue", file=sys.stderr)
        return stop.exit_code()

    def _run_knn(self, logger: RunLogger, epoch: int, stop: StopSignals, abandonable: bool) -> tuple[bool, float]:
        """The kNN top-1, when the monitor is due after `epoch` epochs; `abandonable`: give up when a stop
        signal arrives. Returns (done: not abandoned, seconds the caller takes out of the throughput window)."""
        if self.knn is None or not self.knn.due(epoch):
            return True, 0.0
        stop.activity = f"running the kNN after epoch {epoch}"
        began = time.perf_counter()
        result = self.knn.run(self.learner.online_encoder, epoch,
                              abandon=(lambda: stop.requested) if abandonable else None)
        if result is None:
            print(f"byol-fast train: kNN after epoch {epoch} abandoned for the stop; the resumed run runs it first",
                  file=sys.stderr)
            return False, time.perf_counter() - began
        logger.log(self.completed, {"knn_top1": result["knn_top1"], "knn_seconds": result["knn_seconds"],
                                    "epoch": epoch}, show=False)
        print(f"byol-fast train: kNN top-1 after epoch {epoch}: {100 * result['knn_top1']:.1f}% "
              f"({result['knn_seconds']:.1f} s, not counted in images/s)", file=sys.stderr)
        return True, result["knn_seconds"]  # measured from a device sync: queued training work stays in

    def _log(self, logger: RunLogger, k: int, window_start: float, data_wait: float, timed_steps: int) -> float:
        """Read the device metrics (the loop's one host-device sync), agree across ranks, and log.

        The window holds `timed_steps` steps (the attempt's warm-up steps are left out of it) and ends when
        the queued steps are done, not when the host queued the last one (the host runs ahead of a CUDA
        graph); returns that moment, the next window's start. A window of warm-up steps only logs no rates.
        """
        metrics = self.step.read_metrics()  # SYNC: waits for the queued steps to finish
        window_end = time.perf_counter()
        seconds = window_end - window_start
        steps = metrics["steps"]
        bad = metrics["first_nonfinite_step"]
        loss_sum, = all_reduce_host([metrics["loss"] * steps], self.info, "sum")
        first_bad, = all_reduce_host([float("inf") if bad is None else float(bad)], self.info, "min")
        if first_bad != float("inf"):
            raise TrainingError(
                f"the loss became non-finite at step {int(first_bad) + 1} (counting from 1, as metrics.jsonl "
                f"does); {self._last_good()}. "
                f"Resume from it with --precision fp32, check the data (`byol-fast check-data`), or start a "
                f"new --run-dir with a lower --base-lr (a resume keeps the checkpoint's schedule)")
        record = {"loss": loss_sum / max(steps, 1) / self.info.world_size, "lr": self.lr_at(k - 1),
                  "tau": self.tau_at(k - 1), "epoch": k / self.steps_per_epoch,
                  "memory_gib": memory_gib(self.info.device)}
        data = self.loader.metrics()  # shards: bad samples skipped (this rank's count; named on stderr)
        if data:
            record["bad_samples"] = int(all_reduce_host([float(data["bad_samples"])], self.info, "sum")[0])
            if data["last_bad_sample"]:
                record["last_bad_sample"] = data["last_bad_sample"]
        if timed_steps and seconds > 0:
            images_per_s = timed_steps * self.global_batch / seconds
            record.update(images_per_s=images_per_s, step_ms=1e3 * seconds / timed_steps,
                          data_wait_pct=100.0 * data_wait / seconds)
            if self.peak_flops and self.flops_per_image:
                record["mfu"] = mfu(images_per_s, self.flops_per_image, self.peak_flops * self.info.world_size)
        logger.log(k, record)
        return window_end


def _how_to_go_on(trainer: Trainer) -> str:
    """What continues a finished run: more --max-steps while epochs remain; else only a new run (the lr and tau
    schedules span the configured epochs, and a resume refuses other --epochs)."""
    if trainer.completed < trainer.total_steps:
        return (f"raise --max-steps (up to {trainer.total_steps}, all {trainer.config.epochs} epochs) or leave it "
                f"out to go on, or pass a new --run-dir to train again")
    return (f"it trained all {trainer.config.epochs} epochs; to train longer, start a new --run-dir with more "
            f"--epochs (a resume keeps the schedules, which end with the epochs)")


def run(config: TrainConfig, device_kind: str, resume_path: Path | None) -> int:
    """Initialize the process group, build the Trainer, run it, and always clean up; returns the exit code."""
    trainer = logger = stop = None
    try:
        info = init_distributed(device_kind)
        trainer = Trainer(config, info, resume_path)
        if trainer.completed >= trainer.stop_step:  # leave the finished run's record as it is
            if info.is_main:
                print(f"byol-fast train: {config.run_dir} holds a finished run (step {trainer.completed} of "
                      f"{trainer.stop_step}): nothing to do; {_how_to_go_on(trainer)}", file=sys.stderr)
            return EXIT_OK
        logger = RunLogger(config.run_dir, {**config.to_dict(), "resolved": trainer.describe()}, info.rank,
                           trainer.stop_step, tensorboard=config.tensorboard, images_per_step=config.global_batch,
                           origin=trainer.provenance)
        if info.is_main:
            print(f"byol-fast train: {config.arch} at {config.image_size}px, global batch {config.global_batch} "
                  f"({info.world_size} rank(s)), {trainer.loader.backend} data on {info.device}, {trainer.precision}"
                  f", cuda graph {'on' if trainer.cuda_graph else 'off'}; steps {trainer.completed} -> "
                  f"{trainer.stop_step} of {trainer.total_steps}", file=sys.stderr)
        if info.is_main and config.knn_every_epochs and config.resolved_val_data() is None:
            why = ("it takes its labelled bank from an image folder, and --data is WebDataset shards (pass "
                   "--knn-every-epochs 0 to silence this)" if is_shard_spec(config.data) else
                   "it needs a labelled --val-data folder with the classes of --data (pass one to follow kNN top-1 "
                   "during training, or --knn-every-epochs 0 to silence this)")
            print(f"byol-fast train: no kNN monitor: {why}", file=sys.stderr)
        stop = StopSignals(announce=info.is_main)
        return trainer.train(logger, stop)
    except (ValueError, CheckpointError) as error:  # no such GPU, DataError, bad checkpoints, problems building
        print(f"byol-fast train: error: {error}", file=sys.stderr)
        return EXIT_USAGE if logger is None else EXIT_FAILED
    except TrainingError as error:
        print(f"byol-fast train: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if stop is not None:
            stop.restore()
        if logger is not None:
            logger.close()
        if trainer is not None:
            trainer.loader.close()
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
