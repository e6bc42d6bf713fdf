"""TrainConfig: presets match the recipes, resolution order, and impossible configs fail fast naming the fix."""

import re
import time
from pathlib import Path

import pytest
import torch

from byol_fast import train
from byol_fast.config import TrainConfig, available_presets, load_preset, parse_value, resolve_config
from byol_fast.schedules import scaled_lr


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An existing (empty) image folder path; validation only checks that it exists."""
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    return folder


def test_shipped_presets():
    assert available_presets() == ["demo", "imagenet-1000ep", "imagenet-300ep", "small-data", "small-images",
                                   "throughput"]


@pytest.mark.parametrize("name, base_lr, weight_decay, tau_base, epochs, peak_lr", [
    ("imagenet-300ep", 0.3, 1e-6, 0.99, 300, 4.8),
    ("imagenet-1000ep", 0.2, 1.5e-6, 0.996, 1000, 3.2),
])
def test_imagenet_presets_are_the_official_recipes(name, base_lr, weight_decay, tau_base, epochs, peak_lr):
    config = resolve_config(name)
    assert config.preset == name
    assert (config.arch, config.image_size, config.global_batch) == ("resnet50", 224, 4096)
    assert (config.base_lr, config.weight_decay, config.tau_base) == (base_lr, weight_decay, tau_base)
    assert (config.epochs, config.warmup_epochs, config.momentum, config.eta) == (epochs, 10, 0.9, 1e-3)
    assert (config.projection_size, config.projection_hidden_size, config.prediction_hidden_size) == (256, 4096, 4096)
    assert scaled_lr(config.base_lr, config.global_batch) == pytest.approx(peak_lr)


def test_defaults_are_the_1000_epoch_recipe():
    defaults, preset = TrainConfig(), resolve_config("imagenet-1000ep")
    for key in ("base_lr", "weight_decay", "tau_base", "epochs", "warmup_epochs", "global_batch", "arch"):
        assert getattr(defaults, key) == getattr(preset, key), key


def test_demo_and_throughput_presets_validate_without_data(tmp_path: Path):
    demo = resolve_config("demo", overrides={"data": str(tmp_path / "synthetic" / "train")})
    demo.validate(world_size=1, device="cpu")  # the data is written on first use
    assert (demo.arch, demo.image_size, demo.synthetic_images) == ("resnet18", 64, 512)
    assert demo.global_batch % 2 == 0 and demo.synthetic_images // demo.global_batch >= 4
    throughput = resolve_config("throughput", overrides={"data": str(tmp_path / "bench" / "train")})
    throughput.validate(world_size=1, device="cuda")
    assert throughput.max_steps is not None and throughput.checkpoint_every == 0


def test_resolution_order_preset_file_set_flags(tmp_path: Path, data_dir: Path):
    config_file = tmp_path / "mine.toml"
    # TOML has no null: "none" spells None for optional fields, as on the command line.
    config_file.write_text('base_lr = 0.5\nepochs = 20\nwarmup_epochs = 2\nweight_decay = 0\nresume = "none"\n')
    args = train.build_parser().parse_args([
        "--preset", "imagenet-300ep", "--config", str(config_file), "--set", "epochs=30", "--set", "seed=7",
        "--seed", "9", "--no-cuda-graph", "--max-steps", "none", "--data", str(data_dir)])
    config = train.config_from_args(args)
    assert config.global_batch == 4096 and config.tau_base == 0.99  # from the preset
    assert config.base_lr == 0.5 and config.weight_decay == 0.0  # file over preset (int 0 read as float)
    assert isinstance(config.weight_decay, float)
    assert config.epochs == 30  # --set over file
    assert config.seed == 9  # a flag over --set
    assert config.cuda_graph is False and config.max_steps is None and config.data == str(data_dir)
    assert config.resume is None  # from the file


def test_parse_value_types():
    assert parse_value("epochs", "12") == 12
    assert parse_value("base_lr", "0.25") == 0.25
    assert parse_value("tensorboard", "off") is False
    assert parse_value("cuda_graph", "none") is None
    assert parse_value("resume", "none") is None
    assert parse_value("resume", "auto") == "auto"
    with pytest.raises(ValueError, match="epochs='abc' is not a valid int"):
        parse_value("epochs", "abc")
    with pytest.raises(ValueError, match="use true or false"):
        parse_value("compile", "maybe")


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'imagenet'.*demo, imagenet-1000ep, imagenet-300ep, small-data, small-images, throughput"):
        resolve_config("imagenet")


def test_unknown_keys_list_the_valid_ones(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) learning_rate in --set: valid keys are .*base_lr"):
        parse_value("learning_rate", "1")
    bad = tmp_path / "bad.toml"
    bad.write_text("batch = 256\n")
    with pytest.raises(ValueError, match=rf"unknown config key\(s\) batch in {re.escape(str(bad))}.*global_batch"):
        resolve_config(config_file=bad)
    with pytest.raises(ValueError, match="not valid TOML"):
        bad.write_text("epochs = = 3\n")
        resolve_config(config_file=bad)
    with pytest.raises(ValueError, match="epochs='ten' in .* must be int"):
        bad.write_text('epochs = "ten"\n')
        resolve_config(config_file=bad)


def test_batch_not_divisible_by_world_size_names_the_fix(data_dir: Path):
    config = resolve_config("imagenet-300ep", overrides={"data": str(data_dir)})
    config.validate(world_size=8, device="cuda")
    with pytest.raises(ValueError, match=r"global_batch=4096 is not divisible by world_size \(3\) x "
                                         r"accumulation_steps \(1\) = 3: .*multiple of 3 \(e\.g\. 4095\)"):
        config.validate(world_size=3, device="cuda")
    config.accumulation_steps = 3
    with pytest.raises(ValueError, match=r"accumulation_steps \(3\) = 24"):
        config.validate(world_size=8, device="cuda")


def test_cuda_only_features_on_cpu_name_the_flag(data_dir: Path):
    base = {"data": str(data_dir)}
    with pytest.raises(ValueError, match="--no-cuda-graph"):
        resolve_config(overrides={**base, "cuda_graph": True}).validate(device="cpu")
    with pytest.raises(ValueError, match="drop --compile"):
        resolve_config(overrides={**base, "compile": True}).validate(device="cpu")
    with pytest.raises(ValueError, match="data_backend='views' reads a .pt file"):
        resolve_config(overrides={**base, "data_backend": "views"}).validate(device="cpu")
    with pytest.raises(ValueError, match="byol-fast convert-ffcv"):
        resolve_config(overrides={**base, "data_backend": "ffcv"}).validate(device="cpu")
    with pytest.raises(ValueError, match="--precision bf16 or pass --no-cuda-graph"):
        resolve_config(overrides={**base, "cuda_graph": True, "precision": "fp16"}).validate(device="cuda")


def test_cuda_graph_and_precision_defaults_follow_the_device():
    config = TrainConfig()
    assert config.resolved_cuda_graph("cuda") and not config.resolved_cuda_graph("cpu")
    assert config.resolved_precision("cuda") == "bf16" and config.resolved_precision("cpu") == "fp32"
    assert config.resolved_channels_last("cuda") and not config.resolved_channels_last("cpu")
    assert not TrainConfig(precision="fp16").resolved_cuda_graph("cuda")  # the scaler syncs: eager
    assert not TrainConfig(compile=True).resolved_cuda_graph("cuda")


def test_missing_data_names_make_synthetic(tmp_path: Path):
    missing = tmp_path / "nowhere" / "train"
    with pytest.raises(ValueError, match=rf"{re.escape(str(missing))} does not exist.*`byol-fast make-synthetic "
                                         rf"{re.escape(str(missing.parent))} --images 2000`"):
        resolve_config(overrides={"data": str(missing)}).validate(device="cpu")
    with pytest.raises(ValueError, match="data must end in /train"):
        resolve_config(overrides={"data": str(tmp_path / "x"), "synthetic_images": 10}).validate(device="cpu")


def test_synthetic_data_is_written_when_missing_or_stale_and_a_users_folder_is_read_as_is(
        tmp_path: Path, monkeypatch, capsys):
    from byol_fast.distributed import DistInfo
    from pipelines import synthetic

    one_process = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    small = {"synthetic_images": 10, "synthetic_val_images": 10, "global_batch": 2}
    config = resolve_config("demo", overrides={"data": str(tmp_path / "syn" / "train"), **small})
    config.validate(device="cpu")  # nothing there yet: it is written, and its val split feeds the kNN monitor
    assert config.resolved_val_data() == tmp_path / "syn" / "val"
    with pytest.raises(ValueError, match=r"val_data .*typo/val is not a folder"):  # caught before writing anything
        resolve_config("demo", overrides={"data": str(tmp_path / "syn" / "train"),
                                          "val_data": str(tmp_path / "typo" / "val"), **small}).validate(device="cpu")
    resolve_config("demo", overrides={"data": str(tmp_path / "syn" / "train"),  # the split about to be written
                                      "val_data": str(tmp_path / "syn" / "val"), **small}).validate(device="cpu")
    train.ensure_synthetic_data(config, one_process)
    assert "writing 20 synthetic images" in capsys.readouterr().err
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "syn").rglob("*.JPEG")}
    assert len(first) == 20
    # Its val split exists now, but settings without one would re-make the tree without it.
    with pytest.raises(ValueError, match=r"val split of the synthetic data, which synthetic_val_images=0 does not"):
        resolve_config("demo", overrides={"data": str(tmp_path / "syn" / "train"), "val_data": str(
            tmp_path / "syn" / "val"), **small, "synthetic_val_images": 0}).validate(device="cpu")
    train.ensure_synthetic_data(config, one_process)  # current: reused
    assert capsys.readouterr().err == "" and {p: p.stat().st_mtime_ns for p in first} == first
    monkeypatch.setattr(synthetic, "GENERATOR", synthetic.GENERATOR + 1)  # newer code draws other pictures
    train.ensure_synthetic_data(config, one_process)
    assert f"(it was written with other settings (generator {synthetic.GENERATOR - 1} ->" in capsys.readouterr().err
    assert len(list((tmp_path / "syn").rglob("*.JPEG"))) == 20

    users = tmp_path / "photos" / "train"  # the demo preset pointed at the user's own folder
    (users / "cats").mkdir(parents=True)
    (users / "cats" / "tom.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"val_data .*syn-missing/val is not a folder.*--knn-every-epochs 0"):
        resolve_config("demo", overrides={"data": str(users), "val_data": str(tmp_path / "syn-missing" / "val"),
                                          **small}).validate(device="cpu")
    mine = resolve_config("demo", overrides={"data": str(users), **small})
    mine.validate(device="cpu")
    assert not mine.writes_synthetic() and mine.resolved_val_data() is None  # no val folder given: no kNN
    train.ensure_synthetic_data(mine, one_process)
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in users.parent.rglob("*")) == ["cats", "tom.jpg", "train"]  # untouched


@pytest.mark.parametrize("overrides, message", [
    ({"warmup_epochs": 20, "epochs": 10}, "warmup_epochs=20 exceeds epochs=10"),
    ({"arch": "vit_b_16"}, "arch='vit_b_16' is not supported: use one of resnet18"),
    ({"data_backend": "nvjpeg"}, "data_backend='nvjpeg' is not valid: use one of auto, torchvision"),
    ({"global_batch": 2, "accumulation_steps": 2}, "BatchNorm needs at least 2"),
    ({"image_size": 16}, "image_size=16 is too small"),
    ({"momentum": 1.0}, r"momentum=1.0 must lie in \[0, 1\)"),
    ({"optimizer": "sgd"}, "optimizer='sgd' is not valid: use one of lars, adamw"),
    ({"optimizer": "adamw", "beta2": 1.0}, r"beta2=1.0 must lie in \[0, 1\)"),
    ({"max_steps": 0}, "max_steps=0 must be >= 1"),
    ({"log_every": 0}, "log_every=0 must be positive"),
    ({"knn_bank_images": 0}, "knn_bank_images=0 must be positive"),
    ({"val_data": "/nowhere/val"}, "val_data /nowhere/val is not a folder"),
    ({"data": "/nowhere/train", "synthetic_images": 9}, "the built-in data has 10 classes .* at least 10"),
    ({"data": "/nowhere/train", "synthetic_images": 10, "synthetic_val_images": 5}, "at least 10 .or 0 val"),
])
def test_other_impossible_settings(data_dir: Path, overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(overrides={"data": str(data_dir), **overrides}).validate(device="cpu")


def test_knn_monitor_needs_an_image_folder_bank(tmp_path: Path, data_dir: Path):
    views = tmp_path / "views.pt"
    views.touch()
    with pytest.raises(ValueError, match="takes its labelled bank from an image folder.*--knn-every-epochs 0"):
        resolve_config(overrides={"data": str(views), "data_backend": "views",
                                  "val_data": str(data_dir)}).validate(device="cpu")
    resolve_config(overrides={"data": str(views), "data_backend": "views", "val_data": str(data_dir),
                              "knn_every_epochs": 0}).validate(device="cpu")


def test_cli_rejects_bad_configs_before_any_heavy_work(tmp_path: Path, monkeypatch, capsys):
    def heavy(*args, **kwargs):
        raise AssertionError("start-up went past validation")

    monkeypatch.setattr(train, "init_distributed", heavy)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would set it
    monkeypatch.setenv("RANK", "0")
    start = time.perf_counter()
    code = train.main(["--preset", "demo", "--data", str(tmp_path / "syn" / "train"),
                       "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert code == 2
    assert "global_batch=64 is not divisible by world_size (3)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert train.main(["--data", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "byol-fast make-synthetic" in capsys.readouterr().err
    assert train.main(["--data", str(tmp_path), "--device", "cpu", "--cuda-graph"]) == 2
    assert "--no-cuda-graph" in capsys.readouterr().err
    assert train.main(["--data", str(tmp_path), "--device", "cpu", "--resume", str(tmp_path / "x.pt")]) == 2
    error = capsys.readouterr().err
    assert "no such checkpoint file" in error and "to start fresh" not in error  # auto resumes, not starts fresh
    assert "leave --resume out (it defaults to 'auto': continue from the newest checkpoint in" in error
    from byol_fast.distributed import init_distributed  # the real one: it picks (and checks) the device

    monkeypatch.setattr(train, "init_distributed", init_distributed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(["--data", str(tmp_path), "--device", "cuda", "--run-dir", str(tmp_path / "run")]) == 2
    assert "device='cuda' but CUDA is not available: pass --device cpu" in capsys.readouterr().err
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "run").exists()


def test_load_preset_files_are_flat_known_keys_and_one_views_table():
    for name in available_presets():
        values = load_preset(name)
        assert values and all(not isinstance(v, dict) for k, v in values.items() if k != "views"), name
        resolve_config(name).augmentation_spec()  # the [views] table, if any, builds a valid spec


def test_data_surprises_are_refused_naming_the_fix(tmp_path: Path, monkeypatch, capsys):
    from pipelines.synthetic import make_synthetic

    started = []
    monkeypatch.setattr(train, "run", lambda config, device, resume: started.append(config.data) or 0)
    # The root of a split tree: it trained on train/ and val/ as two classes, and the kNN monitor went quiet.
    make_synthetic(tmp_path / "split", images=8, classes=2, val_fraction=0.5)
    assert train.main(["--data", str(tmp_path / "split"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert f"--data {tmp_path / 'split'} holds the split folders train, val, not class folders" in error
    assert f"Pass --data {tmp_path / 'split' / 'train'} --val-data {tmp_path / 'split' / 'val'}" in error
    # A mistyped --data under the demo preset: it got 768 synthetic images written there.
    monkeypatch.chdir(tmp_path)
    assert train.main(["--preset", "demo", "--data", "data/synthetc/train", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "training data data/synthetc/train does not exist" in error
    assert "leave --data out to train on data/synthetic/train, or pass --synthetic-images 512" in error
    assert not (tmp_path / "data").exists() and started == []
    # Written where the preset puts it, or where asked for explicitly.
    for flags in ([], ["--data", "data/synthetic/train"], ["--data", "mine/train", "--synthetic-images", "512"]):
        assert train.main(["--preset", "demo", "--device", "cpu", *flags]) == 0
    assert started == ["data/synthetic/train", "data/synthetic/train", "mine/train"]
