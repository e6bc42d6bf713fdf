"""The views as settings: the [views] table of presets and --config files, --set views.KEY=VALUE, validation
that names the setting before any data is read, and a run that trains on (and records) the views it was given."""

import json
from pathlib import Path

import pytest
import torch

from byol_fast import train
from byol_fast.config import parse_value, resolve_config
from pipelines.spec import AugmentationSpec
from pipelines.synthetic import make_synthetic


def _set(*pairs: str) -> dict:
    """--set pairs as train.config_from_args types them."""
    return {key: parse_value(key, value) for key, value in (pair.split("=", 1) for pair in pairs)}


def test_no_views_table_is_the_official_recipe():
    assert resolve_config().augmentation_spec() == AugmentationSpec()
    assert resolve_config("demo").augmentation_spec() == AugmentationSpec(image_size=64)


def test_file_table_then_set_change_single_keys(tmp_path: Path):
    config_file = tmp_path / "views.toml"
    config_file.write_text('image_size = 96\n[views]\nrecipe = "torchvision"\ncrop_scale = [0.2, 1.0]\n'
                           'blur_prob = 0.5\n[views.view2]\nsolarize_prob = 0.1\n')
    config = resolve_config("demo", config_file, _set("views.view1.blur_prob=0.25", "views.hue=0.05",
                                                      "views.crop_ratio=[0.5, 2]"))
    spec = config.augmentation_spec()
    assert (spec.image_size, spec.recipe, spec.interpolation) == (96, "torchvision", "bicubic")
    # Both views: the file's crop_scale and --set's hue and crop_ratio; blur: the file's 0.5, view 1 overridden.
    assert [(v.crop_scale, v.crop_ratio, v.hue) for v in spec.views] == [((0.2, 1.0), (0.5, 2.0), 0.05)] * 2
    assert [(v.blur_prob, v.solarize_prob) for v in spec.views] == [(0.25, 0.0), (0.5, 0.1)]
    # Everything not set keeps the official value.
    assert (spec.view1.brightness, spec.view2.grayscale_prob, spec.view2.blur_sigma) == (0.4, 0.2, (0.1, 2.0))


@pytest.mark.parametrize("pairs, message", [
    (["views.crop_scale=0.5,0.2"], r"views\.crop_scale=\(0\.5, 0\.2\) must satisfy .* --set views\.crop_scale="),
    (["views.view2.solarize_prob=1.5"], r"views\.view2\.solarize_prob=1\.5 is a probability"),
    (["views.recipe=tensorflow"], r"views\.recipe='tensorflow' is not a recipe: use one of official, torchvision"),
    (["views.blurr_prob=0.5"], r"unknown setting\(s\) views\.blurr_prob: valid keys of \[views\] are .*blur_prob"),
    (["views.view3.blur_prob=0.5"], r"unknown setting\(s\) views\.view3"),
    (["views.crop_scale=0.2"], r"views\.crop_scale=\(0\.2,\) must be two numbers"),
])
def test_bad_view_settings_name_the_setting(pairs, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("demo", None, _set(*pairs)).validate()


def test_set_value_types_are_checked_when_parsed():
    with pytest.raises(ValueError, match=r"views\.hue='strong' is not a number"):
        parse_value("views.hue", "strong")
    with pytest.raises(ValueError, match=r"views\.hue='0.1,0.2' must be one number"):
        parse_value("views.hue", "0.1,0.2")


def test_a_bad_view_setting_fails_before_any_data_is_read_or_written(tmp_path: Path, capsys):
    data = tmp_path / "synthetic" / "train"  # the demo would write its synthetic images here
    code = train.main(["--preset", "demo", "--data", str(data), "--run-dir", str(tmp_path / "run"),
                       "--set", "views.view1.blur_sigma=0,2"])
    assert code == train.EXIT_USAGE
    assert "views.view1.blur_sigma=(0.0, 2.0) must start above 0" in capsys.readouterr().err
    assert not data.parent.exists() and not (tmp_path / "run").exists()


def _train_on_synthetic(tmp_path: Path, args: list[str]) -> dict:
    """A tiny CPU run (one thread, 16 synthetic images, small heads) with `args`; returns its config.json."""
    make_synthetic(tmp_path / "data", images=16, classes=4)
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = train.main(args + ["--data", str(tmp_path / "data" / "train"), "--run-dir", str(run_dir),
                                  "--global-batch", "8", "--projection-hidden-size", "32",
                                  "--prediction-hidden-size", "32", "--workers", "0", "--no-tensorboard",
                                  "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads((run_dir / "config.json").read_text())


def test_training_uses_and_records_the_views(tmp_path: Path):
    recorded = _train_on_synthetic(tmp_path, ["--arch", "resnet18", "--image-size", "32", "--epochs", "1",
                                              "--warmup-epochs", "0", "--data-backend", "torch",
                                              "--set", "views.recipe=torchvision",
                                              "--set", "views.view2.solarize_prob=0.5"])
    assert recorded["views"] == {"recipe": "torchvision", "view2": {"solarize_prob": 0.5}}
    resolved = recorded["resolved"]["views"]
    assert resolved["recipe"] == "torchvision" and resolved["image_size"] == 32
    assert (resolved["view1"]["solarize_prob"], resolved["view2"]["solarize_prob"]) == (0.0, 0.5)


def test_small_images_preset_trains_with_its_stem_and_views(tmp_path: Path):
    """The small-image preset as documented (solo-learn's CIFAR recipe), shrunk to a few CPU steps."""
    recorded = _train_on_synthetic(tmp_path, ["--preset", "small-images", "--max-steps", "2"])
    assert recorded["small_stem"] is True and recorded["image_size"] == 32 and recorded["eta"] == 0.02
    views = recorded["resolved"]["views"]
    assert (views["view1"]["blur_prob"], views["view2"]["blur_prob"], views["view2"]["solarize_prob"]) == (0, 0, 0.2)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in steps if "loss" in line][-1] == 2
