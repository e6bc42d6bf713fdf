"""Weighted kNN against a brute-force float64 loop; the kNN monitor; logistic regression against sklearn."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from byol_fast.features import InMemoryImages, extract_features
from byol_fast.knn import KnnMonitor, knn_accuracy, knn_predict
from byol_fast.logreg import fit_logistic_regression, logistic_regression_probe
from pipelines.sources import DataError


def brute_force_knn(bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, num_classes: int, k: int,
                    temperature: float) -> list[int]:
    """The InstDisc/DINO rule written out per query in float64."""
    predictions = []
    for query in queries:
        similarities = []
        for feature in bank:
            similarities.append(float(query @ feature) / (np.linalg.norm(query) * np.linalg.norm(feature)))
        nearest = sorted(range(len(bank)), key=lambda i: -similarities[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[labels[i]] += math.exp(similarities[i] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return predictions


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_knn_matches_brute_force(k, temperature):
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(60, 12, generator=generator)
    labels = torch.randint(0, 4, (60,), generator=generator)
    queries = torch.randn(25, 12, generator=generator)
    predicted = knn_predict(bank, labels, queries, 4, k=k, temperature=temperature, batch_size=7)
    reference = brute_force_knn(bank.double().numpy(), labels.numpy(), queries.double().numpy(), 4, k, temperature)
    assert predicted.tolist() == reference


@pytest.mark.parametrize("k,temperature,message", [(0, 0.07, "k=0 must be >= 1"),
                                                    (5, 0.0, "temperature=0.0 must be a finite number > 0"),
                                                    (5, math.nan, "temperature=nan must be a finite number > 0")])
def test_knn_refuses_bad_settings(k, temperature, message):
    # NaN used to pass (`nan <= 0` is False) and turned every vote into NaN.
    with pytest.raises(ValueError, match=message):
        knn_predict(torch.ones(3, 2), torch.zeros(3), torch.ones(1, 2), 2, k=k, temperature=temperature)


def test_knn_accuracy_counts_hits():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]])
    # k=2: the two nearest share a label for every query; the last query is labelled wrongly on purpose.
    assert knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 0]), 2, k=2) == pytest.approx(2 / 3)


def _tiny_images(count: int, seed: int) -> InMemoryImages:
    """Half dark-red, half bright-blue 12x12 images with noise: label = colour."""
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(count)]
    pixels = rng.integers(0, 40, size=(count, 3, 12, 12)).astype(np.uint8)
    for i, label in enumerate(labels):
        pixels[i, 2 if label else 0] += 200
    return InMemoryImages(pixels=pixels, labels=labels, classes=["red", "blue"])


def _tiny_encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def test_monitor_schedule_result_and_mode_restore():
    train, val = _tiny_images(20, 0), _tiny_images(10, 1)
    monitor = KnnMonitor(train, val, every_epochs=3, image_size=12, crop_fraction=1.0, k=5)
    encoder = _tiny_encoder().train()
    assert [epoch for epoch in range(8) if monitor.due(epoch)] == [0, 3, 6]
    assert monitor.maybe_run(2, encoder) is None
    rng = torch.get_rng_state()
    result = monitor.maybe_run(3, encoder)
    assert torch.equal(torch.get_rng_state(), rng), "the monitor must not shift the trainer's random stream"
    assert encoder.training, "the monitor must hand the encoder back in train mode"
    train_x, train_y = extract_features(encoder, train, image_size=12, crop_fraction=1.0)
    val_x, val_y = extract_features(encoder, val, image_size=12, crop_fraction=1.0)
    assert result["epoch"] == 3 and result["knn_seconds"] > 0
    assert result["knn_top1"] == knn_accuracy(train_x, train_y, val_x, val_y, 2, k=5)
    assert result["knn_top1"] == 1.0  # colour separates the classes even through a random conv
    assert monitor.history == [result]


def test_monitor_rejects_bad_splits():
    train = _tiny_images(6, 0)
    empty = InMemoryImages(pixels=np.zeros((0, 3, 12, 12), np.uint8), labels=[], classes=["red", "blue"])
    with pytest.raises(DataError, match="kNN val split holds no images"):
        KnnMonitor(train, empty, every_epochs=1, image_size=12)
    unlabeled = InMemoryImages(pixels=train.pixels, labels=[-1] * 6, classes=["red", "blue"])
    with pytest.raises(DataError, match="unlabeled images"):
        KnnMonitor(unlabeled, train, every_epochs=1, image_size=12)
    other = InMemoryImages(pixels=train.pixels, labels=train.labels, classes=["cat", "dog"])
    with pytest.raises(DataError, match="different classes"):
        KnnMonitor(train, other, every_epochs=1, image_size=12)


def test_logistic_regression_reaches_sklearn_optimum():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(150, 6, generator=generator) * torch.tensor([1.0, 5.0, 0.2, 1.0, 3.0, 1.0]) + 2.0
    labels = (features[:, 0] + 0.3 * features[:, 1] > 2.5).long() + (features[:, 2] > 2.1).long()
    l2 = 0.01
    mine = fit_logistic_regression(features, labels, 3, l2)
    # Same objective in sklearn: 0.5 ||W||^2 + C * sum CE  ==  n*C * (mean CE + l2/2 ||W||^2) with C = 1/(n*l2).
    mean, std = features.mean(0), features.std(0, unbiased=False)
    standardized = ((features - mean) / std).double().numpy()
    reference = LogisticRegression(C=1 / (l2 * len(labels)), tol=1e-12, max_iter=10_000).fit(standardized, labels)
    np.testing.assert_allclose((mine.weight.detach() * std).double().numpy(), reference.coef_, atol=2e-3)
    with torch.no_grad():
        mine_probabilities = mine(features).softmax(1).double().numpy()
    np.testing.assert_allclose(mine_probabilities, reference.predict_proba(standardized), atol=1e-3)


def test_probe_separates_a_separable_problem_and_reports_sweep():
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 10, generator=generator) * 4
    labels = torch.arange(120) % 3
    features = centres[labels] + torch.randn(120, 10, generator=generator) * 0.5
    grid = (1e-3, 1e-1, 1.0)
    result = logistic_regression_probe(features[:90], labels[:90], features[90:], labels[90:], 3, l2_grid=grid)
    assert result.top1 == 1.0
    assert set(result.holdout_top1) == set(grid)
    # Ties resolve to the strongest L2: every value separates the holdout here.
    assert result.l2 == 1.0 and all(score == 1.0 for score in result.holdout_top1.values())
