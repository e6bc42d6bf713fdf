"""Multinomial logistic regression on cached features: the fast linear probe for small datasets.

STL-10 and similar small benchmarks are evaluated this way in BYOL/SimCLR
repositories: compute frozen features once, fit an L2-regularized softmax
classifier to convergence, choose the L2 strength on a held-out part of the
training features, refit on all of them, and report accuracy on the test split.
Pure torch (full-batch L-BFGS with a strong-Wolfe line search), so the library
needs no scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_L2_GRID = tuple(10.0 ** e for e in range(-6, 1))
"""L2 strengths swept (1e-6 .. 1), on standardized features with a mean cross-entropy."""


@dataclass(frozen=True)
class ProbeResult:
    """What `logistic_regression_probe` found."""

    top1: float
    """Accuracy on the evaluation features (fraction in [0, 1])."""
    l2: float
    """The L2 strength the sweep chose."""
    holdout_top1: dict[float, float]
    """Accuracy on the held-out training features for every swept L2."""
    classifier: nn.Linear
    """The final classifier, refitted on all training features; applies to raw (unstandardized) features."""


def fit_logistic_regression(features: Tensor, labels: Tensor, num_classes: int, l2: float,
                            max_iter: int = 500, init: nn.Linear | None = None) -> nn.Linear:
    """Minimize mean cross-entropy + l2/2 * ||W||^2 (bias unpenalized) over standardized features.

    Features are standardized with their own mean/std for conditioning; the
    scaling is folded back into the returned nn.Linear, which therefore takes
    raw features. `init` (a previous result on the same features) warm-starts
    the fit, which makes an L2 sweep from strong to weak much cheaper.
    """
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need matching, non-empty features and labels, got {features.shape[0]} and {labels.shape[0]}")
    if l2 < 0:
        raise ValueError(f"l2={l2} must be >= 0")
    x = features.float()
    labels = labels.to(x.device).long()
    mean = x.mean(dim=0)
    # Constant features (std 0) stay 0 after centring; dividing by 1 keeps them finite.
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    if init is not None:
        with torch.no_grad():
            # Undo the folding of a previous fit back into standardized coordinates.
            weight.copy_(init.weight * std)
            bias.copy_(init.bias + init.weight @ mean)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    classifier = nn.Linear(x.shape[1], num_classes, device=x.device)
    with torch.no_grad():
        folded = weight.detach() / std
        classifier.weight.copy_(folded)
        classifier.bias.copy_(bias.detach() - folded @ mean)
    return classifier


@torch.no_grad()
def accuracy(classifier: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (fraction) of a classifier on features."""
    predicted = classifier(features.float()).argmax(dim=1)
    return (predicted == labels.to(predicted.device)).float().mean().item()


def holdout_split(num_items: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, held-out) index tensors: a seeded random `fraction` of the items is held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction={fraction} must lie in (0, 1)")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    held = max(1, math.floor(num_items * fraction))
    if held >= num_items:
        raise ValueError(f"{num_items} training features are too few to hold out {fraction:.0%}: add images")
    return order[held:], order[:held]


def logistic_regression_probe(train_features: Tensor, train_labels: Tensor, eval_features: Tensor,
                              eval_labels: Tensor, num_classes: int, l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
                              holdout_fraction: float = 0.2, seed: int = 0, max_iter: int = 500) -> ProbeResult:
    """Pick L2 on a held-out part of the training features, refit on all of them, score the eval features.

    The sweep runs from the strongest L2 to the weakest, each fit warm-started
    from the previous one; on equal held-out accuracy the stronger L2 wins.
    """
    if not l2_grid:
        raise ValueError("l2_grid is empty: give at least one L2 strength")
    fit_index, held_index = holdout_split(train_features.shape[0], holdout_fraction, seed)
    fit_index, held_index = fit_index.to(train_features.device), held_index.to(train_features.device)
    fit_x, fit_y = train_features[fit_index], train_labels[fit_index]
    held_x, held_y = train_features[held_index], train_labels[held_index]
    scores: dict[float, float] = {}
    previous = None
    for l2 in sorted(l2_grid, reverse=True):
        previous = fit_logistic_regression(fit_x, fit_y, num_classes, l2, max_iter, init=previous)
        scores[l2] = accuracy(previous, held_x, held_y)
    best = max(sorted(scores, reverse=True), key=lambda l2: scores[l2])
    classifier = fit_logistic_regression(train_features, train_labels, num_classes, best, max_iter)
    return ProbeResult(top1=accuracy(classifier, eval_features, eval_labels), l2=best,
                       holdout_top1=scores, classifier=classifier)
