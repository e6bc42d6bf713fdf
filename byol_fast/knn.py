"""Weighted k-nearest-neighbour evaluation and the kNN monitor run during pretraining.

The classifier is the one InstDisc (Wu et al., 2018) introduced and DINO's
`eval_knn.py` popularized for self-supervised monitors: features are
L2-normalized, the k=20 training features with the highest cosine similarity
to a query vote for their labels, each vote weighted by exp(similarity / T)
with T = 0.07, and the class with the largest summed weight wins. It needs no
training, so its accuracy after each few epochs is a cheap signal that the
representation is improving.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from byol_fast.features import EVAL_CROP_FRACTION, Images, check_labelled_split, extract_features
from pipelines.sources import DataError

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def check_knn_settings(k: int, temperature: float, k_name: str = "k", temperature_name: str = "temperature") -> None:
    """Raise ValueError unless k >= 1 and temperature is a finite positive number; the names are what the
    message calls them (e.g. CLI flags)."""
    if k < 1:
        raise ValueError(f"{k_name}={k} must be >= 1: it is how many nearest training features vote "
                         f"(default {DEFAULT_K})")
    if not 0.0 < temperature < math.inf:  # written so that NaN fails too
        raise ValueError(f"{temperature_name}={temperature} must be a finite number > 0: votes are weighted by "
                         f"exp(similarity / temperature) (default {DEFAULT_TEMPERATURE})")


def knn_predict(train_features: Tensor, train_labels: Tensor, query_features: Tensor, num_classes: int,
                k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, batch_size: int = 1024) -> Tensor:
    """Predicted label [Q] of each query by temperature-weighted cosine kNN over the training set.

    Queries are processed `batch_size` at a time so the [batch, N] similarity
    matrix stays small. Ties in the summed votes go to the lower label (argmax).
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels")
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    check_knn_settings(k, temperature)
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(bank.device).long()
    predictions = []
    for start in range(0, query_features.shape[0], batch_size):
        queries = F.normalize(query_features[start:start + batch_size].to(bank.device).float(), dim=1)
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=bank.device)
    return torch.cat(predictions)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, query_features: Tensor, query_labels: Tensor,
                 num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of `knn_predict` on labelled queries."""
    predicted = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature)
    return (predicted == query_labels.to(predicted.device)).float().mean().item()


class _Abandoned(Exception):
    """Raised out of a feature pass that was asked to stop."""


class _Abandonable(nn.Module):
    """The encoder, checking `abandon()` before each batch (extract_features has no other hook)."""

    def __init__(self, encoder: nn.Module, abandon: Callable[[], bool]) -> None:
        super().__init__()
        self.encoder, self.abandon = encoder, abandon
        self.train(encoder.training)  # extract_features puts back the mode it finds here

    def forward(self, batch: Tensor) -> Tensor:
        if self.abandon():
            raise _Abandoned
        return self.encoder(batch)


class KnnMonitor:
    """kNN top-1 accuracy of the encoder on a held-out labelled split, every few epochs.

    The trainer calls `maybe_run(epochs_done, encoder)` after each epoch (and
    with 0 before training for the random-init baseline). It returns None when
    no evaluation is due, else {"epoch", "knn_top1", "knn_seconds"}: the
    trainer leaves `knn_seconds` out of its throughput figures (the time is
    measured with the device synchronized at both edges). The encoder is any
    module mapping a normalized [B, 3, S, S] batch to [B, D] features, e.g.
    `learner.online_encoder`; it is put back in its previous train/eval mode.
    Under DDP run it on every rank or on rank 0 only; it does no collectives.
    """

    def __init__(self, train_images: Images, val_images: Images, every_epochs: int, *, image_size: int,
                 device: torch.device | str = "cpu", k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 batch_size: int = 256, num_workers: int = 0, crop_fraction: float = EVAL_CROP_FRACTION,
                 run_at_start: bool = True) -> None:
        if every_epochs < 1:
            raise ValueError(f"every_epochs={every_epochs} must be >= 1 (or build no monitor to disable kNN)")
        check_labelled_split(train_images, "kNN train")
        check_labelled_split(val_images, "kNN val")
        if list(train_images.classes) != list(val_images.classes):
            raise DataError(f"kNN train and val splits name different classes ({len(train_images.classes)} vs "
                            f"{len(val_images.classes)}): use two splits of the same labelled set")
        self.train_images, self.val_images = train_images, val_images
        self.every_epochs = every_epochs
        self.image_size = image_size
        self.device = torch.device(device)
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers
        self.crop_fraction = crop_fraction
        self.run_at_start = run_at_start
        self.history: list[dict[str, float | int]] = []
        """Every result returned so far, in order."""

    def due(self, epoch: int) -> bool:
        """Whether `maybe_run(epoch, ...)` evaluates (epoch = number of completed epochs)."""
        if epoch == 0:
            return self.run_at_start
        return epoch % self.every_epochs == 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, encoder: nn.Module, epoch: int,
            abandon: Callable[[], bool] | None = None) -> dict[str, float | int] | None:
        """Evaluate now: {"epoch", "knn_top1" (fraction), "knn_seconds"}; None when `abandon()` turned True
        before a batch (the trainer's stop signal: a pass can outlast the grace period a scheduler gives)."""
        self._sync()  # sync point: the timer starts after queued training work has finished
        start = time.perf_counter()
        options = dict(image_size=self.image_size, device=self.device, batch_size=self.batch_size,
                       num_workers=self.num_workers, crop_fraction=self.crop_fraction)
        if abandon is not None:
            encoder = _Abandonable(encoder, abandon)
        try:
            train_x, train_y = extract_features(encoder, self.train_images, **options)
            val_x, val_y = extract_features(encoder, self.val_images, **options)
        except _Abandoned:
            return None
        top1 = knn_accuracy(train_x, train_y, val_x, val_y, len(self.train_images.classes), self.k, self.temperature)
        self._sync()
        result = {"epoch": epoch, "knn_top1": top1, "knn_seconds": time.perf_counter() - start}
        self.history.append(result)
        return result

    def maybe_run(self, epoch: int, encoder: nn.Module) -> dict[str, float | int] | None:
        """`run(encoder, epoch)` when due at this epoch count, else None."""
        return self.run(encoder, epoch) if self.due(epoch) else None
