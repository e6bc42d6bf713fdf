"""`byol-fast eval linear|knn`: frozen-encoder evaluation of a pretrained BYOL encoder.

    byol-fast eval linear --checkpoint run/checkpoints/step_00100000.pt --data /data/imagenet
    byol-fast eval linear --weights resnet50_byol.pt --arch resnet50 --data /data/stl10 --mode logreg

`--data` is an image folder with `train/` and `val/` class sub-folders (the
same class names in both), or STL-10's `stl10_binary` folder (fit on its
labelled train split, score its test split).

linear --mode sgd (default): the official BYOL protocol. The encoder is frozen
(eval mode, so BatchNorm uses its running statistics); a linear layer on its
representation is trained with SGD, Nesterov momentum 0.9, no weight decay,
batch 1024, lr 0.2 per 256 images on a cosine schedule without warm-up, for 80
epochs, on random-resized-crop + flip views; it is scored on centre crops.
linear --mode logreg: features are computed once (centre crops) and a
multinomial logistic regression is fitted with the L2 strength picked on a
held-out fifth of the training features (`byol_fast.logreg`), the protocol
BYOL repositories report on STL-10. knn: weighted kNN (k=20, T=0.07) on
centre-crop features (`byol_fast.knn`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from byol_fast.checkpoint import CheckpointError
from byol_fast.export import (check_output_path, checkpoint_arch, checkpoint_small_stem, encoder_for_features,
                              export_encoder, exported_metadata, load_training_checkpoint, read_encoder_weights)
from byol_fast.features import (EVAL_CROP_FRACTION, Images, TransformedImages, check_crop_fraction,
                                check_labelled_split, encode, extract_features, train_transform)
from byol_fast.knn import DEFAULT_K, DEFAULT_TEMPERATURE, check_knn_settings, knn_accuracy
from byol_fast.logreg import logistic_regression_probe
from byol_fast.model import TORCHVISION_ENCODERS
from byol_fast.schedules import WarmupCosineLR, scaled_lr
from byol_fast.stl10 import find_stl10_root, load_stl10
from pipelines.command_line import CommandParser, integer, number
from pipelines.sources import DataError, scan_image_folder
from pipelines.torchvision_loader import default_workers

# The official protocol's defaults (DeepMind's BYOL eval config).
LINEAR_EPOCHS = 80
LINEAR_BATCH = 1024
LINEAR_BASE_LR = 0.2


def load_splits(data: str | Path) -> tuple[Images, Images, str]:
    """(train, eval, description) from `data/train` + `data/val` folders or an STL-10 binary folder.

    Raises DataError naming the missing split, an empty split, or the class
    folders that exist in only one of the splits.
    """
    root = Path(data).expanduser()
    if find_stl10_root(root) is not None:
        train, test = load_stl10(root, "train"), load_stl10(root, "test")
        check_labelled_split(train, f"STL-10 train ({root})")
        check_labelled_split(test, f"STL-10 test ({root})")
        return train, test, f"STL-10 train ({len(train)}) / test ({len(test)}) in {root}"
    folders = {name: root / name for name in ("train", "val")}
    missing = [str(path) for path in folders.values() if not path.is_dir()]
    if missing:
        raise DataError(f"{' and '.join(missing)} not found: --data must hold train/ and val/ folders of "
                        f"class sub-folders (ImageNet layout), or STL-10's stl10_binary files")
    train, val = scan_image_folder(folders["train"]), scan_image_folder(folders["val"])
    check_same_classes(train.classes, val.classes, folders["train"], folders["val"])
    return train, val, f"{root}: train {len(train)} / val {len(val)} images, {len(train.classes)} classes"


def check_same_classes(train: list[str], val: list[str], train_name: Any, val_name: Any) -> None:
    """Raise DataError naming the class folders that exist in only one split."""
    if list(train) == list(val):
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    parts = [f"only in {name}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''} ({len(names)})"
             for name, names in ((train_name, only_train), (val_name, only_val)) if names]
    raise DataError(f"the train and val splits have different class folders ({'; '.join(parts)}); labels would "
                    f"not line up: give both splits the same class folders")


def load_encoder(arch: str | None, checkpoint: str | None = None, weights: str | None = None) -> tuple[nn.Module, dict]:
    """(encoder mapping images to representations, info) from a training checkpoint or exported weights.

    info holds the arch and the image size the encoder was trained at (None when nothing records it).
    Raises EncoderMismatchError naming differing keys/shapes when the weights do not fit `arch`.
    """
    if (checkpoint is None) == (weights is None):
        raise ValueError("give exactly one of checkpoint (a training checkpoint) and weights (an exported state_dict)")
    if checkpoint is not None:
        state = load_training_checkpoint(checkpoint)
        arch = checkpoint_arch(state, arch)
        image_size = state.get("meta", {}).get("image_size")
        return encoder_for_features(arch, export_encoder(state["model"]), f"the encoder in {checkpoint}",
                                    checkpoint_small_stem(state), image_size or 224), \
            {"arch": arch, "image_size": image_size, "source": str(checkpoint), "step": int(state["step"])}
    # An export's metadata says what the weights are and the size they were trained at; a plain torchvision
    # state_dict has none, and is taken for the usual ResNet-50 at 224.
    recorded = exported_metadata(weights)
    arch = arch or recorded.get("arch") or "resnet50"
    encoder = encoder_for_features(arch, read_encoder_weights(weights), f"the weights in {weights}",
                                   bool(recorded.get("small_stem", False)), recorded.get("image_size") or 224)
    return encoder, {"arch": arch, "image_size": recorded.get("image_size"), "source": str(weights)}


def check_at_least(value: int | None, minimum: int, name: str, fix: str) -> None:
    """Raise ValueError naming `name` (e.g. a CLI flag) and the fix unless `value` is None or >= minimum."""
    if value is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}: {fix}")


def check_base_lr(base_lr: float, name: str = "base_lr") -> None:
    """Raise ValueError unless the probe's learning rate per 256 images is a finite number > 0."""
    if not 0.0 < base_lr < math.inf:  # written so that NaN fails too
        raise ValueError(f"{name}={base_lr} must be a finite number > 0: it is the lr per 256 images "
                         f"(default {LINEAR_BASE_LR})")


@torch.no_grad()
def _feature_size(encoder: nn.Module, image_size: int, device: torch.device) -> int:
    was_training = encoder.training
    encoder.eval()
    size = encode(encoder, torch.zeros(1, 3, image_size, image_size), device).shape[1]
    encoder.train(was_training)
    return size


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def linear_probe_sgd(encoder: nn.Module, train: Images, val: Images, *, image_size: int,
                     device: torch.device | str = "cpu", epochs: int = LINEAR_EPOCHS, batch_size: int = LINEAR_BATCH,
                     base_lr: float = LINEAR_BASE_LR, num_workers: int = 0, seed: int = 0,
                     crop_fraction: float = EVAL_CROP_FRACTION) -> dict[str, Any]:
    """Train a linear classifier on the frozen encoder (official BYOL protocol) and score it on `val`.

    lr = base_lr * batch / 256 (batch capped at the training-set size), cosine
    to 0 over all steps, SGD with Nesterov momentum 0.9 and no weight decay.
    Returns {"top1", "top5", "epochs", "batch_size", "lr", "train_seconds"}.
    """
    check_labelled_split(train, "train")
    check_labelled_split(val, "val")
    check_at_least(epochs, 1, "epochs", f"the probe trains for that many epochs (default {LINEAR_EPOCHS})")
    check_base_lr(base_lr)
    device = torch.device(device)
    encoder.to(device).eval()
    batch_size = min(batch_size, len(train))
    peak = scaled_lr(base_lr, batch_size)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TransformedImages(train, train_transform(image_size)), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=num_workers, generator=generator,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    schedule = WarmupCosineLR(peak, epochs * len(loader), 0)
    # The head's init and (with num_workers=0) the crops draw from torch's global RNG: seed it, restore it after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(_feature_size(encoder, image_size, device), len(train.classes)).to(device)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        optimizer = torch.optim.SGD(head.parameters(), lr=peak, momentum=0.9, nesterov=True, weight_decay=0.0)
        start, step = time.perf_counter(), 0
        for _ in range(epochs):
            for images, labels in loader:
                features = encode(encoder, images, device)
                optimizer.param_groups[0]["lr"] = schedule(step)
                loss = F.cross_entropy(head(features), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    train_seconds = time.perf_counter() - start
    val_x, val_y = extract_features(encoder, val, image_size=image_size, device=device, batch_size=batch_size,
                                    num_workers=num_workers, crop_fraction=crop_fraction)
    with torch.no_grad():
        logits = head(val_x)
    return {"top1": top_k_accuracy(logits, val_y, 1), "top5": top_k_accuracy(logits, val_y, 5), "epochs": epochs,
            "batch_size": batch_size, "lr": peak, "train_seconds": train_seconds}


def cached_features(encoder: nn.Module, train: Images, val: Images, *, image_size: int, device: torch.device | str,
                    batch_size: int = 256, num_workers: int = 0, crop_fraction: float = EVAL_CROP_FRACTION):
    """(train_x, train_y, val_x, val_y): centre-crop features of both splits, computed once."""
    check_labelled_split(train, "train")
    check_labelled_split(val, "val")
    options = dict(image_size=image_size, device=device, batch_size=batch_size, num_workers=num_workers,
                   crop_fraction=crop_fraction)
    return (*extract_features(encoder, train, **options), *extract_features(encoder, val, **options))


def linear_probe_logreg(encoder: nn.Module, train: Images, val: Images, *, image_size: int,
                        device: torch.device | str = "cpu", batch_size: int = 256, num_workers: int = 0,
                        crop_fraction: float = EVAL_CROP_FRACTION, seed: int = 0) -> dict[str, Any]:
    """Logistic regression on cached frozen features: {"top1", "l2", "holdout_top1"}."""
    train_x, train_y, val_x, val_y = cached_features(encoder, train, val, image_size=image_size, device=device,
                                                     batch_size=batch_size, num_workers=num_workers,
                                                     crop_fraction=crop_fraction)
    result = logistic_regression_probe(train_x, train_y, val_x, val_y, len(train.classes), seed=seed)
    return {"top1": result.top1, "l2": result.l2, "holdout_top1": result.holdout_top1}


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `byol-fast eval`."""
    parser = CommandParser(prog="byol-fast eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    protocols = parser.add_subparsers(dest="protocol", required=True)
    for name, help_text in (("linear", "linear evaluation (sgd: the official protocol; logreg: fast)"),
                            ("knn", "weighted kNN (k=20, T=0.07) on frozen features")):
        sub = protocols.add_parser(name, help=help_text)
        source = sub.add_mutually_exclusive_group(required=True)
        source.add_argument("--checkpoint", help="a training checkpoint (run_dir/checkpoints/step_*.pt)")
        source.add_argument("--weights", help="an exported encoder state_dict (byol-fast export)")
        sub.add_argument("--arch", default=None,
                         help=f"encoder architecture: {', '.join(TORCHVISION_ENCODERS)} or timm/<name> (default: "
                              f"the checkpoint's, or the one in the .json that `byol-fast export` wrote beside "
                              f"--weights; else resnet50)")
        sub.add_argument("--data", required=True, help="folder with train/ and val/ class folders, or STL-10 binaries")
        sub.add_argument("--image-size", type=integer, default=None,
                         help="evaluation crop (default: the training size the checkpoint or the export's .json "
                              "records, else 224)")
        sub.add_argument("--crop-fraction", type=number, default=EVAL_CROP_FRACTION,
                         help="centre crop / resized short side (default 0.875 = 224/256; 1 keeps the whole image)")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--workers", type=integer, default=default_workers(),
                         help="data-loading worker processes (default: usable CPUs, at most 8)")
        sub.add_argument("--batch-size", type=integer, default=None,
                         help=f"sgd: {LINEAR_BATCH}; feature extraction: 256")
        sub.add_argument("--seed", type=integer, default=0)
        sub.add_argument("--output", default=None, help="also write the result as JSON here")
        if name == "linear":
            sub.add_argument("--mode", choices=("sgd", "logreg"), default="sgd")
            sub.add_argument("--epochs", type=integer, default=LINEAR_EPOCHS, help="sgd mode epochs")
            sub.add_argument("--base-lr", type=number, default=LINEAR_BASE_LR, help="sgd lr per 256 images")
        else:
            sub.add_argument("--k", type=integer, default=DEFAULT_K)
            sub.add_argument("--temperature", type=number, default=DEFAULT_TEMPERATURE)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag and the fix for a setting that would fail later, after the data and
    the weights were read and maybe features extracted; reads nothing but the output's folder."""
    check_at_least(args.image_size, 1, "--image-size", "leave it out to use the checkpoint's training size")
    check_crop_fraction(args.crop_fraction, "--crop-fraction")
    check_at_least(args.batch_size, 1, "--batch-size", "leave it out for the default")
    check_at_least(args.workers, 0, "--workers", "pass 0 to load data in the main process")
    if args.protocol == "knn":
        check_knn_settings(args.k, args.temperature, "--k", "--temperature")
    else:
        check_at_least(args.epochs, 1, "--epochs", f"the sgd probe trains for that many epochs "
                                                   f"(default {LINEAR_EPOCHS})")
        check_base_lr(args.base_lr, "--base-lr")
    if args.output is not None:
        check_output_path(args.output, "--output")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the flags, data and weights (cheap checks first), then run the chosen protocol."""
    validate_args(args)
    train, val, described = load_splits(args.data)
    encoder, info = load_encoder(args.arch, args.checkpoint, args.weights)
    image_size = args.image_size or info["image_size"] or 224
    print(f"byol-fast eval {args.protocol}: {info['arch']} from {info['source']} on {described}, "
          f"{image_size}px, {args.device}", file=sys.stderr)
    common = dict(image_size=image_size, device=args.device, num_workers=args.workers,
                  crop_fraction=args.crop_fraction)
    if args.protocol == "knn":
        train_x, train_y, val_x, val_y = cached_features(encoder.to(args.device), train, val,
                                                         batch_size=args.batch_size or 256, **common)
        result = {"top1": knn_accuracy(train_x, train_y, val_x, val_y, len(train.classes), args.k, args.temperature),
                  "k": args.k, "temperature": args.temperature}
    elif args.mode == "sgd":
        result = linear_probe_sgd(encoder, train, val, epochs=args.epochs, batch_size=args.batch_size or LINEAR_BATCH,
                                  base_lr=args.base_lr, seed=args.seed, **common)
    else:
        result = linear_probe_logreg(encoder.to(args.device), train, val, batch_size=args.batch_size or 256,
                                     seed=args.seed, **common)
    return {"protocol": args.protocol, "mode": getattr(args, "mode", None), **info, "image_size": image_size,
            "data": str(args.data), **result}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `byol-fast eval`."""
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
        text = json.dumps(result, default=str)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
    # ValueError: bad flags, DataError, EncoderMismatchError; OSError: missing weights, unreadable files.
    except (ValueError, OSError, CheckpointError) as error:
        print(f"byol-fast eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
