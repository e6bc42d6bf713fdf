"""show-views: the PNG holds exactly the backend's first batch of views, un-normalized, as pairs."""

import numpy as np
import pytest
import torch
from PIL import Image

from byol_fast.config import resolve_config
from pipelines.factory import build_train_loader
from pipelines.shards.convert import convert_to_shards
from pipelines.show_views import GAP, main, pair_grid, show_views, unnormalize
from pipelines.sources import DataError, load_images
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
    out = show_views(data, tmp_path / "views.png", AugmentationSpec(image_size=SIZE, recipe=recipe),
                     backend="torchvision", pairs=4, pairs_per_row=2, seed=3)
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


def test_bad_requests_fail_with_a_named_fix(data, tmp_path, capsys):
    spec = AugmentationSpec(image_size=SIZE)
    with pytest.raises(ValueError, match="pairs=1"):
        show_views(data, tmp_path / "a.png", spec, pairs=1)
    with pytest.raises(ValueError, match="must end in .png"):
        show_views(data, tmp_path / "a.jpg", spec)
    with pytest.raises(DataError, match="12 images are too few"):
        show_views(data, tmp_path / "a.png", spec, pairs=64)
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "b.png")]) == 2
    capsys.readouterr()
    assert main([str(data), "--out", str(tmp_path / "c.png"), "--set", "views.crop_scale=0.5,0.2"]) == 2
    assert "views.crop_scale" in capsys.readouterr().err
    assert main([str(data), "--out", str(tmp_path / "d.png"), "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("c.png", "d.png"))


def test_the_views_are_the_ones_train_makes_from_the_same_preset_config_and_set(data, tmp_path):
    """--preset, --config and --set reach the views as in `byol-fast train` (here: the small-images preset's
    32 px views without blur, view 2 always solarized, the config's crop range), over shards too."""
    config = tmp_path / "views.toml"
    config.write_text("[views]\ncrop_scale = [0.5, 1.0]\n")
    settings = ["--preset", "small-images", "--config", str(config), "--set", "views.view2.solarize_prob=1.0"]
    want = resolve_config("small-images", config, {"views.view2.solarize_prob": 1.0}).augmentation_spec()
    assert (want.image_size, want.view1.crop_scale, want.view1.blur_prob, want.view2.solarize_prob) == (
        32, (0.5, 1.0), 0.0, 1.0)
    shards = tmp_path / "shards"
    convert_to_shards(load_images(data), shards, samples_per_shard=4, workers=1)
    for source in (str(data), str(shards / "train-{000000..000002}.tar")):
        out = tmp_path / "views.png"
        assert main([source, "--backend", "torch", "--pairs", "4", "--pairs-per-row", "4", "--seed", "5",
                     "--out", str(out), *settings]) == 0
        loader = build_train_loader("torch", source, want, 4, seed=5, workers=1)
        view1, view2 = next(iter(loader.batches(0)))
        loader.close()
        picture = np.asarray(Image.open(out))
        top = left = 2 * GAP
        assert picture.shape[0] == 32 + 4 * GAP
        pixels1, pixels2 = (unnormalize(v, want).permute(0, 2, 3, 1).numpy() for v in (view1, view2))
        for index in range(4):
            x = left + index * (2 * 32 + GAP + 2 * GAP)
            assert np.array_equal(picture[top:top + 32, x:x + 32], pixels1[index])
            assert np.array_equal(picture[top:top + 32, x + 32 + GAP:x + 64 + GAP], pixels2[index])
