"""show-views: the PNG holds exactly the backend's first batch of views, un-normalized, as pairs."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.factory import build_train_loader
from pipelines.show_views import GAP, main, pair_grid, show_views, unnormalize
from pipelines.sources import DataError
from pipelines.spec import AugmentationSpec
from pipelines.synthetic import make_synthetic

SIZE = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, images=12, classes=3, seed=1)
    return root / "train"


@pytest.mark.parametrize("recipe", ["official", "torchvision"])
def test_png_holds_the_backends_views(data, tmp_path, recipe):
    out = show_views(data, tmp_path / "views.png", backend="torchvision", pairs=4, pairs_per_row=2,
                     image_size=SIZE, seed=3, recipe=recipe)
    picture = np.asarray(Image.open(out))
    rows, per_row = 2, 2
    assert picture.shape == (rows * SIZE + (rows + 1) * 2 * GAP, per_row * (2 * SIZE + GAP) + (per_row + 1) * 2 * GAP, 3)
    spec = AugmentationSpec(image_size=SIZE, recipe=recipe)
    loader = build_train_loader("torchvision", data, spec, 4, seed=3, workers=1)
    view1, view2 = next(iter(loader.batches(0)))
    loader.close()
    first_view1 = unnormalize(view1, spec)[0].permute(1, 2, 0).numpy()
    first_view2 = unnormalize(view2, spec)[0].permute(1, 2, 0).numpy()
    top = left = 2 * GAP
    assert np.array_equal(picture[top:top + SIZE, left:left + SIZE], first_view1)
    assert np.array_equal(picture[top:top + SIZE, left + SIZE + GAP:left + 2 * SIZE + GAP], first_view2)
    assert not np.array_equal(first_view1, first_view2), "the two views of a pair must differ"


def test_unnormalize_inverts_normalization():
    spec = AugmentationSpec(image_size=8)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    assert torch.equal(unnormalize((pixels / 255 - mean) / std, spec), pixels)


def test_grid_leaves_white_gaps():
    tiles = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    grid = pair_grid(tiles, tiles, pairs_per_row=2)
    assert grid.shape == (3, 2 * 4 + 3 * 2 * GAP, 2 * (8 + GAP) + 3 * 2 * GAP)
    assert int((grid == 0).sum()) == 3 * 2 * 3 * 16  # every tile pixel written, nothing else dark


def test_bad_requests_fail_with_a_named_fix(data, tmp_path):
    with pytest.raises(ValueError, match="pairs=1"):
        show_views(data, tmp_path / "a.png", pairs=1)
    with pytest.raises(ValueError, match="must end in .png"):
        show_views(data, tmp_path / "a.jpg")
    with pytest.raises(DataError, match="12 images are too few"):
        show_views(data, tmp_path / "a.png", pairs=64, image_size=SIZE)
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "b.png")]) == 2
