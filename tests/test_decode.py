"""Robust decoding: every odd mode becomes the right RGB, every bad file a CorruptImageError naming it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines.decode import (
    CorruptImageError,
    decode_rgb,
    extension_format,
    load_rgb,
    probe_image,
    sniff_format,
)
from pipelines.sources import DataError


def _pattern(width: int = 48, height: int = 32) -> np.ndarray:
    """A smooth RGB gradient: JPEG reproduces it closely, so decoded values can be compared."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 120)], axis=-1).astype(np.uint8)


def test_png_inside_jpeg_extension_is_exact(tmp_path: Path) -> None:
    pixels = _pattern()
    path = tmp_path / "n01_000.JPEG"
    Image.fromarray(pixels).save(path, format="PNG")
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(image), pixels)
    info = probe_image(path)
    assert info == (48, 32, "RGB", "png")
    assert info.format != extension_format(path) == "jpeg"


def test_cmyk_jpeg_matches_pil_cmyk_conversion(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (40, 24), (30, 90, 160, 20))
    path = tmp_path / "cmyk.JPEG"
    cmyk.save(path, quality=100)
    assert probe_image(path).mode == "CMYK"
    got = np.asarray(load_rgb(path)).astype(int)
    # The standard naive conversion: R = (255 - C)(255 - K) / 255, likewise G from M and B from Y.
    expected = (255 - np.array([30, 90, 160])) * (255 - 20) / 255
    assert np.abs(got - expected).max() <= 3


def test_grayscale_and_16bit_png_become_equal_channels(tmp_path: Path) -> None:
    gray = _pattern()[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "gray.jpg", quality=100)
    got = np.asarray(load_rgb(tmp_path / "gray.jpg")).astype(int)
    assert got.shape == (32, 48, 3)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    assert np.abs(got[..., 0] - gray).max() <= 3
    wide = (gray.astype(np.uint16) * 257)  # full 16-bit range: 255 -> 65535
    Image.fromarray(wide).save(tmp_path / "deep.png")  # uint16 -> mode "I;16"
    assert probe_image(tmp_path / "deep.png").mode.startswith("I")
    deep = np.asarray(load_rgb(tmp_path / "deep.png"))
    np.testing.assert_array_equal(deep[..., 1], gray)  # scaled, not clipped at 255


def test_alpha_and_palette_modes(tmp_path: Path) -> None:
    rgba = np.dstack([_pattern(), np.full((32, 48), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "a.png")), _pattern())
    la = Image.fromarray(np.stack([_pattern()[..., 0], np.zeros((32, 48), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "la.png"))[..., 2], _pattern()[..., 0])
    palette = Image.fromarray(_pattern()).quantize(colors=16)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "p.png")), expected)


def test_truncated_jpeg_raises_naming_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # noise keeps the entropy-coded body large
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    for keep in (0.3, 0.9):
        path = tmp_path / f"cut{keep}.JPEG"
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(CorruptImageError, match=f"{path}.*truncated or corrupt"):
            load_rgb(path)
        # The header is intact, so a probe still reads the size: only a decode finds truncation.
        assert probe_image(path)[:2] == (256, 256)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # we never flip PIL's global switch


@pytest.mark.parametrize("content", [b"", b"hello, this is not an image" * 20, b"\xff\xd8\xff" + b"\x00" * 40])
def test_garbage_raises_naming_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad file.JPEG"
    path.write_bytes(content)
    with pytest.raises(CorruptImageError, match="bad file.JPEG") as info:
        load_rgb(path)
    assert isinstance(info.value, DataError)
    with pytest.raises(CorruptImageError, match="bad file.JPEG"):
        probe_image(path)


def test_missing_file_and_folder_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_rgb(tmp_path / "gone.jpg")
    with pytest.raises(DataError, match="is a folder"):
        load_rgb(tmp_path)
    with pytest.raises(DataError, match="gone.jpg does not exist"):
        probe_image(tmp_path / "gone.jpg")


def test_decode_bytes_and_sniffing() -> None:
    buffer = io.BytesIO()
    Image.fromarray(_pattern()).save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(decode_rgb(buffer.getvalue(), "mem")), _pattern())
    assert sniff_format(buffer.getvalue()[:16]) == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_format(b"%PDF-1.4") == "unknown"
    assert extension_format("x/y.JPG") == "jpeg" and extension_format("a.txt") is None
    with pytest.raises(CorruptImageError, match="mem-bad"):
        decode_rgb(b"nope", "mem-bad")
