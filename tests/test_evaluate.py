"""`byol-fast eval`: split validation, weight checks, and the three protocols on a colour-coded toy set."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from byol_fast.evaluate import linear_probe_sgd, load_encoder, load_splits, main
from byol_fast.features import InMemoryImages, extract_features
from byol_fast.model import build_encoder
from pipelines.sources import DataError, scan_image_folder

SIZE = 32
COLOURS = {"blue": 2, "red": 0}


def write_split(root, counts: dict[str, int], seed: int) -> None:
    """root/<class>/<i>.png: noisy 40x40 images whose dominant channel is the class."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 60, size=(40, 40, 3)).astype(np.uint8)
            pixels[..., COLOURS.get(name, 1)] += 180
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    write_split(root / "train", {"blue": 8, "red": 8}, seed=0)
    write_split(root / "val", {"blue": 4, "red": 4}, seed=1)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("protocol", [["linear", "--mode", "logreg"], ["knn", "--k", "3"],
                                      ["linear", "--mode", "sgd", "--epochs", "4", "--base-lr", "4.0"]])
def test_protocols_separate_colours(colour_data, weights, capsys, tmp_path, protocol):
    output = tmp_path / "result.json"
    code, out, err = run_cli(capsys, *protocol, "--weights", weights,
                             "--arch", "resnet18", "--data", colour_data, "--image-size", SIZE, "--workers", 0,
                             "--device", "cpu", "--output", output)
    assert code == 0, err
    result = json.loads(out)
    assert result == json.loads(output.read_text())
    assert result["arch"] == "resnet18" and result["image_size"] == SIZE
    # Colour survives any random conv net, so every protocol must classify the 8 val images correctly.
    assert result["top1"] == 1.0


def test_in_memory_and_file_images_give_the_same_features(colour_data):
    files = scan_image_folder(colour_data / "val")
    pixels = np.stack([np.asarray(Image.open(path)).transpose(2, 0, 1) for path in files.files])
    memory = InMemoryImages(pixels=pixels, labels=files.labels, classes=files.classes)
    encoder = build_encoder("resnet18")
    from_files = extract_features(encoder, files, image_size=SIZE, batch_size=4)
    from_memory = extract_features(encoder, memory, image_size=SIZE, batch_size=4)
    assert torch.equal(from_files[0], from_memory[0]) and torch.equal(from_files[1], from_memory[1])
    assert from_files[0].shape == (8, 1000)


def test_sgd_probe_is_seeded_and_leaves_global_rng_alone(colour_data):
    train, val, _ = load_splits(colour_data)
    encoder = build_encoder("resnet18")
    state = torch.get_rng_state()
    first = linear_probe_sgd(encoder, train, val, image_size=SIZE, epochs=1, batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = linear_probe_sgd(encoder, train, val, image_size=SIZE, epochs=1, batch_size=8, seed=3)
    assert first["top1"] == second["top1"] and first["lr"] == pytest.approx(0.2 * 8 / 256)
    assert first["batch_size"] == 8


def test_class_folders_that_differ_are_named(tmp_path, weights, capsys):
    write_split(tmp_path / "train", {"blue": 2, "red": 2}, seed=0)
    write_split(tmp_path / "val", {"blue": 1, "green": 1}, seed=1)
    code, _, err = run_cli(capsys, "linear", "--weights", weights, "--arch", "resnet18", "--data", tmp_path)
    assert code == 2
    assert f"only in {tmp_path / 'train'}: red (1)" in err and f"only in {tmp_path / 'val'}: green (1)" in err


def test_empty_and_missing_splits(tmp_path):
    write_split(tmp_path / "train", {"blue": 2, "red": 2}, seed=0)
    with pytest.raises(DataError, match=f"{tmp_path / 'val'} not found"):
        load_splits(tmp_path)
    (tmp_path / "val" / "blue").mkdir(parents=True)
    (tmp_path / "val" / "red").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'val'} holds no images"):
        load_splits(tmp_path)
    one = InMemoryImages(pixels=np.zeros((1, 3, 8, 8), np.uint8), labels=[0], classes=["a"])
    empty = InMemoryImages(pixels=np.zeros((0, 3, 8, 8), np.uint8), labels=[], classes=["a"])
    with pytest.raises(DataError, match="the val split holds no images"):
        linear_probe_sgd(build_encoder("resnet18"), one, empty, image_size=SIZE, epochs=1)


def test_weights_that_do_not_fit_the_arch(colour_data, weights, capsys, tmp_path):
    code, _, err = run_cli(capsys, "linear", "--weights", weights, "--arch", "resnet50", "--data", colour_data)
    assert code == 2
    assert "do not fit torchvision resnet50" in err and "They fit resnet18: pass --arch resnet18" in err
    assert "layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in err
    learner_like = tmp_path / "learner.pt"
    torch.save({"online_encoder.net.conv1.weight": torch.zeros(1)}, learner_like)
    code, _, err = run_cli(capsys, "linear", "--weights", learner_like, "--data", colour_data)
    assert code == 2 and "use --checkpoint for it" in err
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        load_encoder("resnet18")


@pytest.mark.cuda
def test_cuda_features_match_cpu_within_bf16(colour_data):
    files = scan_image_folder(colour_data / "val")
    encoder = build_encoder("resnet18")
    encoder.fc = torch.nn.Identity()
    cpu_x, cpu_y = extract_features(encoder, files, image_size=SIZE)
    gpu_x, gpu_y = extract_features(encoder.cuda(), files, image_size=SIZE, device="cuda")
    assert gpu_x.dtype == torch.float32 and gpu_x.device.type == "cuda" and torch.equal(gpu_y.cpu(), cpu_y)
    # bf16 autocast: each feature vector keeps its direction to within ~1%.
    cosine = torch.nn.functional.cosine_similarity(gpu_x.cpu(), cpu_x, dim=1)
    assert cosine.min().item() > 0.99


BAD_FLAGS = [
    ("knn", "--k", "0", "--k=0 must be >= 1"),
    ("knn", "--temperature", "0", "--temperature=0.0 must be a finite number > 0"),
    ("knn", "--batch-size", "0", "--batch-size=0 must be >= 1"),
    ("linear", "--epochs", "0", "--epochs=0 must be >= 1"),
    ("linear", "--base-lr", "-1", "--base-lr=-1.0 must be a finite number > 0"),
    ("linear", "--crop-fraction", "0", "--crop-fraction=0.0 must lie in (0, 1]"),
    ("knn", "--crop-fraction", "1.5", "--crop-fraction=1.5 must lie in (0, 1]"),
    ("linear", "--batch-size", "0", "--batch-size=0 must be >= 1"),
    ("linear", "--image-size", "0", "--image-size=0 must be >= 1"),
    ("linear", "--workers", "-1", "--workers=-1 must be >= 0"),
    ("knn", "--output", "{tmp}/missing/result.json", "its folder {tmp}/missing does not exist: create the folder"),
    ("linear", "--output", "{tmp}", "--output {tmp} is a directory: pass a file name inside it"),
]


@pytest.mark.parametrize("protocol, flag, value, expected", BAD_FLAGS, ids=[" ".join(c[:3]) for c in BAD_FLAGS])
def test_bad_flags_fail_before_any_loading(tmp_path, capsys, protocol, flag, value, expected):
    # Neither the data nor the weights exist: naming the flag proves it was checked before either was read.
    code, _, err = run_cli(capsys, protocol, flag, value.format(tmp=tmp_path), "--weights", tmp_path / "none.pt",
                           "--data", tmp_path / "no_data")
    assert code == 2
    assert err.startswith("byol-fast eval: error: ") and expected.format(tmp=tmp_path) in err


def test_corrupt_weights_file_is_an_error_not_a_traceback(colour_data, weights, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[:4096])
    code, _, err = run_cli(capsys, "knn", "--weights", truncated, "--arch", "resnet18", "--data", colour_data)
    assert code == 2
    assert err.startswith(f"byol-fast eval: error: cannot read weights file {truncated}: it is truncated")
