"""The trainer's configuration: one typed dataclass, presets as TOML, fail-fast validation.

Resolution order (later wins): the dataclass defaults (the official 1000-epoch
BYOL recipe) -> a preset from `byol_fast/presets/<name>.toml` -> a user TOML file
(`--config FILE`) -> command-line flags and `--set key=value`. Every key is a
field name of `TrainConfig`; an unknown preset or key is an error that lists the
valid ones. The one table, `[views]`, holds the augmentation recipe
(`views.recipe`, `views.crop_scale`, `views.view2.solarize_prob`, ...: see
VIEW_KEYS); later sources change single keys of it, and `--set` reaches them
by their dotted names. `TrainConfig.validate(world_size, device)` checks everything that
can be checked before a model is built, so an impossible run fails in a second
with a message that names the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from byol_fast.model import INITS, check_encoder_name
from byol_fast.optimizers import OPTIMIZERS
from byol_fast.timm_encoders import is_timm_arch
from pipelines.spec import AugmentationSpec, ViewSpec

PRESET_DIR = Path(__file__).with_name("presets")
VIEW_PAIRS = ("crop_scale", "crop_ratio", "blur_sigma")
"""[views] keys that are (min, max) ranges; every other ViewSpec field is a number."""
SPEC_KEYS = ("recipe", "interpolation")
"""[views] keys for the whole spec (the view size is image_size); ViewSpec fields apply to both views,
or to one under [views.view1] / [views.view2]."""
BACKENDS = ("auto", "torchvision", "torch", "dali", "ffcv", "views")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "cpu")
ADAMW_MAX_BASE_LR = 0.01
"""Above this, an AdamW base_lr is a LARS rate typed by mistake (AdamW recipes use 1e-4 to 2e-3)."""


@dataclass
class TrainConfig:
    """Everything a BYOL pretraining run needs; defaults are the official 1000-epoch recipe."""

    preset: str | None = None
    """Name of the preset this config started from (informational; set by `resolve_config`)."""
    data: str = "data/synthetic/train"
    """Training images: an ImageNet-style folder (`<data>/<class>/<img>`), a 'path label' list file,
    a .beton file (ffcv backend) or a .pt file of pre-made views (views backend)."""
    data_backend: str = "auto"
    """Two-view pipeline: "torchvision" (CPU reference), "torch" (batched on the device), "dali" (GPU, or DALI's
    CPU mode on the CPU), "ffcv", "views" (pre-made views from a .pt file, for tests) or "auto" (DALI on CUDA
    when installed, else torch on CUDA, else torchvision)."""
    shard_manifest: str | None = None
    """WebDataset shards only: the manifest.json (path or URL) when it is not beside the shards."""
    shuffle_buffer: int = 1000
    """WebDataset shards only: samples each loader stream holds in its shuffle buffer (per-epoch shard order
    and buffer are seeded by seed and epoch). Memory: about this many encoded images per worker."""
    max_bad_fraction: float = 0.001
    """WebDataset shards only: share of an epoch's samples on a rank that may be bad (truncated shard, image that
    does not decode, no label) and skipped before the run stops with an error naming the shards."""
    val_data: str | None = None
    """Optional labelled held-out folder (`<val>/<class>/<img>`, the same classes as `data`) for the kNN monitor.
    Unset where synthetic data is written with synthetic_val_images > 0, it is that tree's val split."""
    knn_every_epochs: int = 1
    """With val_data: kNN top-1 (k=20, cosine-weighted) every this many epochs and before training; 0 turns it off."""
    knn_bank_images: int = 10000
    """The kNN monitor's labelled bank: an even subsample of at most this many training images."""
    arch: str = "resnet50"
    """Encoder: a torchvision ResNet name, or a timm model as timm/<name> (e.g. timm/vit_small_patch16_224,
    timm/convnext_tiny; needs the timm extra), built without its classifier (byol_fast/timm_encoders.py)."""
    small_stem: bool = False
    """Give the ResNet solo-learn's small-image stem (3x3 stride-1 conv1, no max-pool) for 32-96 px images;
    `byol-fast export` records it, and its weights load into torchvision with byol_fast.model.SMALL_STEM."""
    init: str = "official"
    """Network initialisation: "official" (DeepMind's BYOL: zero last BatchNorm scale in each residual block,
    no bias on the final Linear of projector and predictor) or "torchvision" (the libraries' defaults)."""
    image_size: int = 224
    """Side of each square view, in pixels."""
    global_batch: int = 4096
    """Source images per optimizer step summed over all ranks (each gives two views)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank (gradient accumulation when memory is short)."""
    epochs: int = 1000
    """Passes over the training set; with warmup_epochs, sets the lr and tau schedules."""
    warmup_epochs: int = 10
    """Epochs of linear lr warm-up."""
    optimizer: str = "lars"
    """"lars" (the official BYOL recipe) or "adamw" (small data, ViTs); see byol_fast/optimizers.py."""
    base_lr: float = 0.2
    """Learning rate at batch 256; the peak lr scales it to global_batch by the optimizer's rule: linear for LARS
    (base_lr * global_batch / 256), square root for AdamW (base_lr * sqrt(global_batch / 256))."""
    weight_decay: float = 1.5e-6
    """Weight decay (decoupled in AdamW; not applied to biases, norms, position embeddings and class tokens)."""
    momentum: float = 0.9
    """LARS momentum."""
    eta: float = 1e-3
    """LARS trust coefficient."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.999
    """AdamW's second-moment decay (MAE uses 0.95 for ViTs)."""
    tau_base: float = 0.996
    """EMA coefficient of the target at step 0; rises to 1 on a cosine."""
    projection_size: int = 256
    """Output size of the projector and the predictor."""
    projection_hidden_size: int = 4096
    """Hidden width of the projector MLP."""
    prediction_hidden_size: int = 4096
    """Hidden width of the predictor MLP."""
    precision: str = "auto"
    """"bf16" autocast, "fp16" (with a loss scaler), "fp32", or "auto" (bf16 on CUDA, fp32 on CPU)."""
    channels_last: bool | None = None
    """Keep images and convolution weights in channels-last memory format; None means on for CUDA and off on
    the CPU, where oneDNN's channels-last BatchNorm and convolution backward are slower (3x for ResNet-18)."""
    cuda_graph: bool | None = None
    """Capture the step as one CUDA graph after warm-up; None means on for CUDA (unless compile or fp16),
    off on CPU."""
    compile: bool = False
    """Run the step through torch.compile (for comparison with the captured graph)."""
    device: str = "auto"
    """"cuda", "cpu" or "auto" (CUDA when available). Under torchrun each rank takes cuda:LOCAL_RANK."""
    workers: int = 8
    """Data-loading worker processes (or threads) per rank."""
    seed: int = 0
    """Seed of weights, shuffling and augmentation; the same seed gives the same run."""
    run_dir: str = "runs/byol"
    """Folder for checkpoints, metrics.jsonl, TensorBoard events and the resolved config."""
    checkpoint_every: int = 1000
    """Save a checkpoint every this many optimizer steps (and always at the end); 0 saves only at the end."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    resume: str | None = "auto"
    """"auto" (continue from the newest checkpoint in run_dir, fresh when there is none; this is what makes a
    torchrun restart resume by itself), a checkpoint path, or None/"none" (start fresh: refused when run_dir
    already holds checkpoints, so a finished run is never mixed with a new one)."""
    log_every: int = 50
    """Read metrics back from the device and log them every this many steps (the only sync)."""
    tensorboard: bool = True
    """Also write TensorBoard events (skipped with a warning when tensorboard is not installed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (benchmarks, tests); schedules still span all epochs."""
    synthetic_images: int = 0
    """If > 0 and `data` does not exist (or holds a synthetic tree written with other settings or by older
    code), first write this many synthetic training images to `data` (which must then end in /train) with
    `pipelines.synthetic.make_synthetic`. An existing image folder of your own is read as it is. From the
    command line, a missing --data gets synthetic data only when it is the preset's own path or this is
    set explicitly too (byol_fast/data_checks.py), so a mistyped path is an error."""
    synthetic_val_images: int = 0
    """Synthetic images written to the sibling /val folder alongside `synthetic_images`."""
    peak_tflops: float | None = None
    """Peak bf16 TFLOP/s of one device for MFU; None measures a matmul once at start-up on CUDA."""
    views: dict[str, Any] = field(default_factory=dict)
    """The [views] table: `recipe` ("official" or "torchvision"), `interpolation`, and any view setting
    (crop_scale, crop_ratio, flip_prob, color_jitter_prob, brightness, contrast, saturation, hue,
    grayscale_prob, blur_prob, blur_sigma, solarize_prob, solarize_threshold) for both views, or under
    view1 / view2 for one. Empty: the official BYOL views (pipelines/spec.py). On the command line:
    --set views.crop_scale=0.2,1.0 --set views.view2.solarize_prob=0.1."""

    def validate(self, world_size: int = 1, device: str | None = None) -> None:
        """Raise ValueError naming the fix for any impossible setting; cheap, runs before any heavy work.

        `device` is the resolved device type ("cuda" or "cpu"); None uses `self.device` when it is
        not "auto".
        """
        _check_choice("data_backend", self.data_backend, BACKENDS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("init", self.init, INITS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_encoder_name(self.arch)
        if is_timm_arch(self.arch) and self.small_stem:
            raise ValueError(f"small_stem=true applies to torchvision ResNets, not {self.arch}: drop --small-stem "
                             f"(a timm model keeps its own stem)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1) (AdamW's are 0.9 and 0.999)")
        if self.optimizer == "adamw" and self.base_lr > ADAMW_MAX_BASE_LR:
            raise ValueError(f"base_lr={self.base_lr} is a LARS rate; AdamW diverges there: pass --base-lr 3e-4 "
                             f"(small data) or 1e-3 (ViT-S/16, DINO's rate), or use --preset small-data")
        _check_positive(self, "image_size", "global_batch", "accumulation_steps", "epochs", "projection_size",
                        "projection_hidden_size", "prediction_hidden_size", "keep_checkpoints", "log_every")
        _check_non_negative(self, "warmup_epochs", "base_lr", "weight_decay", "workers", "seed", "checkpoint_every",
                            "synthetic_images", "synthetic_val_images", "knn_every_epochs")
        _check_positive(self, "knn_bank_images")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size} is too small for a ResNet: use at least 32")
        self.augmentation_spec()
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}: "
                             f"lower --warmup-epochs or raise --epochs")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must lie in [0, 1) (BYOL uses 0.9)")
        if self.eta <= 0:
            raise ValueError(f"eta={self.eta} must be positive (BYOL uses 1e-3)")
        if not 0.0 <= self.tau_base <= 1.0:
            raise ValueError(f"tau_base={self.tau_base} must lie in [0, 1] (BYOL uses 0.996 or 0.99)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1, or unset it to train all epochs")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops={self.peak_tflops} must be positive, or unset it to measure it")
        per_step = world_size * self.accumulation_steps
        if self.global_batch % per_step:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by world_size ({world_size}) x "
                             f"accumulation_steps ({self.accumulation_steps}) = {per_step}: use a global batch that "
                             f"is a multiple of {per_step} (e.g. {max(1, self.global_batch // per_step) * per_step}) "
                             f"or change the number of processes / --accumulation-steps")
        if self.global_batch // per_step < 2:
            raise ValueError(f"global_batch={self.global_batch} leaves {self.global_batch // per_step} image per "
                             f"micro-batch; BatchNorm needs at least 2: raise --global-batch")
        if self.cuda_graph and self.precision == "fp16":
            raise ValueError("precision='fp16' needs a loss scaler that reads overflow flags on the host, which a "
                             "CUDA graph cannot do: use --precision bf16 or pass --no-cuda-graph")
        kind = device if device is not None else (None if self.device == "auto" else self.device)
        if kind == "cpu":
            if self.cuda_graph:
                raise ValueError("cuda_graph=true needs a CUDA device but this run is on the CPU: pass "
                                 "--no-cuda-graph (or leave it unset: graphs are then used on CUDA only)")
            if self.compile:
                raise ValueError("compile=true is for the CUDA step; on the CPU drop --compile")
        self._validate_data()

    def _validate_data(self) -> None:
        from pipelines.shards.source import is_shard_spec
        from pipelines.synthetic import DEFAULT_CLASSES

        if self.shuffle_buffer < 0 or not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 and max_bad_fraction="
                             f"{self.max_bad_fraction} lie in [0, 1]")
        if is_shard_spec(self.data):
            if self.data_backend in ("ffcv", "views"):
                raise ValueError(f"data_backend={self.data_backend!r} cannot read WebDataset shards ({self.data}): "
                                 f"pass --data-backend torch, torchvision or dali")
            if self.val_data and self.knn_every_epochs:
                raise ValueError(f"the kNN monitor (val_data={self.val_data!r}) takes its labelled bank from an "
                                 f"image folder, but data is shards: pass --knn-every-epochs 0 or unset val_data")
            return  # read at start-up (pipelines/shards/source.py names a missing shard or manifest and the fix)
        path = Path(self.data).expanduser()
        writes_synthetic = self.writes_synthetic()
        if writes_synthetic and path.name != "train":
            raise ValueError(f"synthetic_images={self.synthetic_images} writes <root>/train and <root>/val, "
                             f"so data must end in /train (got {self.data!r}): e.g. --data data/synthetic/train")
        too_few = self.synthetic_images < DEFAULT_CLASSES or 0 < self.synthetic_val_images < DEFAULT_CLASSES
        if writes_synthetic and too_few:
            raise ValueError(f"synthetic_images={self.synthetic_images} and synthetic_val_images="
                             f"{self.synthetic_val_images}: the built-in data has {DEFAULT_CLASSES} classes and every "
                             f"class needs an image in each split written, so use at least {DEFAULT_CLASSES} "
                             f"(or 0 val images)")
        if not path.exists() and not writes_synthetic:
            root = path.parent if path.name == "train" else path
            raise ValueError(f"training data {path} does not exist: pass --data DIR (an ImageNet-style folder "
                             f"<DIR>/<class>/<image>), or create the built-in data with `byol-fast make-synthetic "
                             f"{root} --images 2000` and pass --data {root / 'train'}")
        if self.data_backend == "ffcv" and path.suffix != ".beton":
            raise ValueError(f"data_backend='ffcv' reads a .beton file, got {path}: convert the folder with "
                             f"`byol-fast convert-ffcv {path} OUT.beton` and pass --data OUT.beton")
        val = self.resolved_val_data()
        if val is not None and self.knn_every_epochs:
            if not (writes_synthetic or path.is_dir()):
                raise ValueError(f"the kNN monitor (val_data={self.val_data!r}) takes its labelled bank from an "
                                 f"image folder, but data is {path}: pass --knn-every-epochs 0 or unset val_data")
            # The synthetic tree's val split is what start-up writes there (nothing, when synthetic_val_images=0:
            # a stale tree is re-made without it); any other val folder must exist now.
            if writes_synthetic and val.resolve() == (path.parent / "val").resolve():
                if not self.synthetic_val_images:
                    raise ValueError(f"val_data {self.val_data} is the val split of the synthetic data, which "
                                     f"synthetic_val_images=0 does not write: set --synthetic-val-images (e.g. "
                                     f"256) or pass another --val-data")
            elif not val.is_dir():
                raise ValueError(f"val_data {self.val_data} is not a folder: pass a labelled <val>/<class>/<img> "
                                 f"tree with --val-data, or --knn-every-epochs 0")
        if self.data_backend == "views" and path.suffix != ".pt":
            raise ValueError(f"data_backend='views' reads a .pt file of pre-made views, got {path}: "
                             f"use another --data-backend for image folders")

    # ---- derived values -------------------------------------------------------------------------

    def augmentation_spec(self) -> AugmentationSpec:
        """The views this run trains on: the official recipe at image_size, changed by the [views] table.

        A bad key or value raises ValueError naming `views.<key>` and the fix.
        """
        table = dict(self.views)
        per_view = {name: table.pop(name, {}) for name in ("view1", "view2")}
        spec_values = {key: table.pop(key) for key in SPEC_KEYS if key in table}
        _check_view_keys(table, "views")
        defaults = AugmentationSpec()
        views = []
        for name, default in zip(("view1", "view2"), defaults.views):
            if not isinstance(per_view[name], dict):
                raise ValueError(f"views.{name}={per_view[name]!r} must be a table of view settings, e.g. "
                                 f"--set views.{name}.blur_prob=0.5")
            _check_view_keys(per_view[name], f"views.{name}")
            changes = {**table, **per_view[name]}
            where = lambda key: f"views.{name}." if key in per_view[name] else "views."  # noqa: E731
            views.append(_built(where, lambda: dataclasses.replace(default, **_as_view_values(changes))))
        return _built(lambda key: "views.", lambda: AugmentationSpec(image_size=self.image_size, view1=views[0],
                                                                     view2=views[1], **spec_values))

    def writes_synthetic(self) -> bool:
        """Whether start-up writes the built-in data (train.ensure_synthetic_data): synthetic_images > 0 and
        `data` is missing or lies in a tree pipelines.synthetic wrote; a folder of the user's is read as it is."""
        from pipelines.synthetic import MANIFEST  # here: the config imports without the data stack

        from pipelines.shards.source import is_shard_spec

        path = Path(self.data).expanduser()
        if is_shard_spec(self.data):
            return False  # shards are read, never written
        return self.synthetic_images > 0 and (not path.exists() or (path.parent / MANIFEST).is_file())

    def resolved_val_data(self) -> Path | None:
        """The kNN monitor's labelled folder: val_data, else the val split of the synthetic data written."""
        if self.val_data:
            return Path(self.val_data).expanduser()
        if self.writes_synthetic() and self.synthetic_val_images > 0:
            return Path(self.data).expanduser().parent / "val"
        return None

    def resolved_device(self) -> str:
        """"cuda" or "cpu" for device="auto" (CUDA when available)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self, device: str) -> str:
        """The step's precision: precision="auto" is bf16 on CUDA and fp32 on the CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device == "cuda" else "fp32"

    def resolved_cuda_graph(self, device: str) -> bool:
        """Whether the step is captured: cuda_graph=None means on for CUDA (off with --compile or fp16)."""
        if self.cuda_graph is not None:
            return self.cuda_graph
        return device == "cuda" and not self.compile and self.resolved_precision(device) != "fp16"

    def resolved_channels_last(self, device: str) -> bool:
        """channels_last=None means on for CUDA, off on the CPU."""
        return self.channels_last if self.channels_last is not None else device == "cuda"

    def to_dict(self) -> dict[str, Any]:
        """The config as plain TOML/JSON-able values."""
        return dataclasses.asdict(self)


def _check_view_keys(table: dict[str, Any], where: str) -> None:
    valid = {f.name for f in fields(ViewSpec)}
    allowed = valid | (set(SPEC_KEYS) | {"view1", "view2"} if where == "views" else set())
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(f'{where}.{k}' for k in unknown)}: valid keys of "
                         f"[{where}] are {', '.join(sorted(allowed))}")


def _as_view_values(table: dict[str, Any]) -> dict[str, Any]:
    """TOML arrays and --set lists as the tuples ViewSpec holds."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in table.items()}


def _built(where, make):
    """Build a spec; its ValueError ("key=value must ...") gets the setting's dotted name (`where(key)` + key)."""
    try:
        return make()
    except ValueError as error:
        key = str(error).split("=", 1)[0]
        raise ValueError(f"{where(key)}{error}: change it in the [views] table or with "
                         f"--set {where(key)}{key}=VALUE") from error


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: use one of {', '.join(choices)}")


def _check_positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name}={getattr(config, name)} must be positive")


def _check_non_negative(config: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ValueError(f"{name}={getattr(config, name)} must be >= 0")


# ---- presets, files and overrides ----------------------------------------------------------------

def field_types() -> dict[str, Any]:
    """Field name -> resolved type annotation of TrainConfig."""
    return typing.get_type_hints(TrainConfig)


@functools.cache
def field_docs() -> dict[str, str]:
    """Field name -> the docstring written under it in TrainConfig (used as --help text)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def available_presets() -> list[str]:
    """Names of the presets shipped in byol_fast/presets/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _check_keys(values: dict[str, Any], origin: str) -> None:
    valid = {f.name for f in fields(TrainConfig)} - {"preset"}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)} in {origin}: valid keys are "
                         f"{', '.join(sorted(valid))}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """A flat table of TrainConfig keys from a TOML file (unknown keys are an error)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist: pass a TOML file of TrainConfig keys")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML ({error}): fix the line it names") from error
    _check_keys(values, str(path))
    return values


def load_preset(name: str) -> dict[str, Any]:
    """The values of a shipped preset; an unknown name lists the valid ones."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(available_presets())}")
    return read_toml(path)


def _means_none(text: str) -> bool:
    """How None is spelled on the command line and in TOML (which has no null) for optional fields."""
    return text.strip().lower() in ("none", "null", "")


def _parse_view_value(key: str, text: str) -> Any:
    """A [views] value from the command line: a name, a (min, max) pair as "0.2,1.0", or a number."""
    name = key.rsplit(".", 1)[-1]
    if name in SPEC_KEYS:
        return text.strip()
    parts = [part.strip() for part in text.strip().strip("[]()").split(",")]
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number: e.g. --set views.blur_prob=0.5 or "
                         f"--set views.crop_scale=0.2,1.0") from None
    if name in VIEW_PAIRS:
        return numbers
    if len(numbers) != 1:
        raise ValueError(f"{key}={text!r} must be one number, e.g. --set {key}=0.5")
    return numbers[0]


def parse_set_pairs(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` arguments as {key: typed value} (parse_value), for resolve_config's overrides."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r} must look like KEY=VALUE, e.g. --set base_lr=0.3")
        overrides[key.strip()] = parse_value(key.strip(), value)
    return overrides


def parse_value(key: str, text: str) -> Any:
    """Convert `text` to the type of field `key` ("none" -> None for optional fields); `views.*` keys
    are typed by the [views] table's rules."""
    if key.startswith("views."):
        return _parse_view_value(key, text)
    _check_keys({key: None}, "--set")
    annotation = field_types()[key]
    args = typing.get_args(annotation)
    optional = type(None) in args and isinstance(annotation, types.UnionType)
    if optional and _means_none(text):
        return None
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if base is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"{key}={text!r}: use true or false")
        return lowered in ("true", "1", "yes", "on")
    try:
        return base(text)
    except ValueError as error:
        raise ValueError(f"{key}={text!r} is not a valid {base.__name__}") from error


def _coerce(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Check TOML value types against the fields (ints are accepted where floats are expected)."""
    types_ = field_types()
    out = {}
    for key, value in values.items():
        if key == "views":
            if not isinstance(value, dict):
                raise ValueError(f"views in {origin} must be a table: write [views] and its keys below it")
            out[key] = value
            continue
        allowed = typing.get_args(types_[key]) or (types_[key],)
        if type(None) in allowed and isinstance(value, str) and _means_none(value):
            out[key] = None
        elif value is None or isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
            out[key] = value
        elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            names = " or ".join(t.__name__ for t in allowed)
            raise ValueError(f"{key}={value!r} in {origin} must be {names}")
    return out


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults -> preset -> config file -> overrides (already typed), as one TrainConfig (not validated)."""
    values: dict[str, Any] = {}
    layers = []
    if preset is not None:
        layers.append(_coerce(load_preset(preset), f"preset {preset!r}"))
    if config_file is not None:
        layers.append(_coerce(read_toml(config_file), str(config_file)))
    if overrides:
        overrides = _nest_dotted(overrides)
        _check_keys(overrides, "the command line")
        layers.append(overrides)
    for layer in layers:
        views = _merged_views(values.get("views", {}), layer.get("views", {}))
        values.update(layer)
        if views:
            values["views"] = views
    return TrainConfig(preset=preset, **values)


def _nest_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"views.view2.blur_prob": 0.5} -> {"views": {"view2": {"blur_prob": 0.5}}}; other keys as they are."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        table = out
        for parent in parents:
            table = table.setdefault(parent, {})
        table[leaf] = value
    return out


def _merged_views(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """A later [views] table changes single keys (and single keys of view1 / view2), not the whole table."""
    merged = {**base, **change}
    for name in ("view1", "view2"):
        if isinstance(base.get(name), dict) and isinstance(change.get(name), dict):
            merged[name] = {**base[name], **change[name]}
    return merged
