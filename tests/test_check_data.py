"""check-data finds exactly the planted problems, by path, and sets the exit code."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import check_data as cd
from pipelines.check_data import UNREADABLE, check_data, check_file


def _jpeg_bytes(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, dict[str, set[str]]]:
    """A 3-class tree of 64x48 JPEGs with one of each problem planted; returns root and expected paths per kind."""
    root = tmp_path / "train"
    for k, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"ok{i}.JPEG").write_bytes(_jpeg_bytes((64, 48), seed=10 * k + i))
    expected: dict[str, set[str]] = {kind: set() for kind in cd.KINDS}

    def plant(rel: str, kinds: tuple[str, ...]) -> Path:
        path = root / rel
        for kind in kinds:
            expected[kind].add(str(path))
        return path

    full = _jpeg_bytes((64, 48), seed=99)
    plant("cat/truncated.JPEG", (UNREADABLE,)).write_bytes(full[: len(full) // 2])
    plant("dog/garbage.JPEG", (UNREADABLE,)).write_bytes(b"<html>404 not found</html>" * 10)
    plant("dog/empty.jpg", (UNREADABLE,)).write_bytes(b"")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(plant("cat/png.JPEG", ("format-mismatch",)), format="PNG")
    Image.new("CMYK", (64, 48), (9, 9, 9, 9)).save(plant("eel/cmyk.JPEG", ("cmyk",)), format="JPEG")
    Image.new("L", (64, 48), 80).save(plant("eel/gray.JPEG", ("grayscale",)), format="JPEG")
    Image.new("RGBA", (64, 48)).save(plant("eel/alpha.png", ("alpha",)))
    Image.new("P", (64, 48)).save(plant("eel/palette.png", ("palette",)))
    Image.new("RGB", (20, 64)).save(plant("dog/tiny.jpg", ("too-small",)), format="JPEG")
    # Several at once: a grayscale PNG behind a .JPEG name that is also too small.
    combo = plant("dog/combo.JPEG", ("format-mismatch", "grayscale", "too-small"))
    Image.new("L", (16, 16), 5).save(combo, format="PNG")
    return root, expected


def test_finds_exactly_the_planted_files(planted: tuple[Path, dict[str, set[str]]]) -> None:
    root, expected = planted
    report = check_data(root)
    assert report.files == 12 + 10 and report.classes == 3
    for kind in cd.KINDS:
        assert set(report.paths(kind)) == expected[kind], kind
        assert report.counts[kind] == len(expected[kind])
    assert not report.ok
    flagged = {check.path for check in report.problems}
    assert not any(Path(p).name.startswith("ok") for p in flagged)  # clean files are never reported
    assert "3 unreadable" in report.summary() and "FAIL" in report.summary()


def test_parallel_workers_give_the_same_report(planted: tuple[Path, dict[str, set[str]]]) -> None:
    root, _ = planted
    serial, parallel = check_data(root), check_data(root, workers=2)
    assert parallel.problems == serial.problems and parallel.total_bytes == serial.total_bytes


def test_min_size_threshold(planted: tuple[Path, dict[str, set[str]]]) -> None:
    root, _ = planted
    # Short sides are 48 (clean and odd-mode files), 20 and 16: at 49 every one of the 19 decodable files is flagged.
    report = check_data(root, min_size=49)
    assert report.counts["too-small"] == 19 and report.counts[UNREADABLE] == 3
    assert check_file(str(root / "cat" / "ok0.JPEG"), min_size=48).issues == ()
    assert check_file(str(root / "cat" / "ok0.JPEG"), min_size=49).issues == ("too-small",)


def test_cli_exit_codes_and_listing(planted: tuple[Path, dict[str, set[str]]],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, expected = planted
    assert cd.main([str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    unreadable_lines = [line for line in out if line.startswith("UNREADABLE")]
    assert {line.split()[1].rstrip(":") for line in unreadable_lines} == expected[UNREADABLE]
    assert out[-1].startswith("checked 22 images in 3 classes") and out[-1].endswith("unreadable file(s)")
    for path in expected[UNREADABLE]:
        Path(path).unlink()
    assert cd.main([str(root), "--max-listed", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("-> OK")
    assert any(line.startswith("... ") and "not listed" in line for line in out)
    assert cd.main([str(root / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_split_root_is_checked_per_split(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            folder = tmp_path / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.JPEG").write_bytes(_jpeg_bytes((40, 40), seed=i))
    report = check_data(tmp_path)
    assert (report.files, report.classes, report.ok, report.problems) == (5, 2, True, [])
    # ImageNet as downloaded: val/ holds its images flat (labels in a separate file); they are checked too.
    flat = tmp_path / "test"
    flat.mkdir()
    (flat / "ILSVRC2012_test_00000001.JPEG").write_bytes(_jpeg_bytes((40, 40), seed=9))
    (flat / "ILSVRC2012_test_00000002.JPEG").write_bytes(b"not a jpeg")
    report = check_data(tmp_path)
    assert (report.files, report.classes) == (7, 2)
    assert report.paths("unreadable") == [str(flat.resolve() / "ILSVRC2012_test_00000002.JPEG")]


def test_an_empty_class_folder_is_reported_with_every_bad_file_in_one_pass(planted, capsys) -> None:
    # It stopped the check before any file was decoded: a user fixed it, ran again on 1.28M images, found the rest.
    root, expected = planted
    (root / "fox").mkdir()
    (root / ".cache").mkdir()  # hidden: not a class
    report = check_data(root)
    assert report.empty_folders == [str((root / "fox").resolve())]
    for kind in cd.KINDS:
        assert set(report.paths(kind)) == expected[kind], kind
    assert report.classes == 4 and not report.ok
    assert report.summary().endswith("FAIL: fill or remove the 1 empty folder(s) and delete or replace the 3 "
                                     "unreadable file(s)")
    assert cd.main([str(root)]) == 2  # the layout is unusable as it is, whatever the files
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"EMPTY-FOLDER     {(root / 'fox').resolve()}: holds no images (training refuses the tree: " \
                     f"add images or remove it)"
    assert {line.split()[1].rstrip(":") for line in out if line.startswith("UNREADABLE")} == expected[UNREADABLE]
    (root / "fox").rmdir()
    assert cd.main([str(root)]) == 1


def test_an_empty_split_folder_is_reported_and_the_others_checked(tmp_path: Path) -> None:
    (tmp_path / "train" / "c0").mkdir(parents=True)
    (tmp_path / "train" / "c0" / "0.JPEG").write_bytes(b"truncated")
    (tmp_path / "val").mkdir()
    report = check_data(tmp_path)
    assert report.empty_folders == [str((tmp_path / "val").resolve())]
    assert report.paths(UNREADABLE) == [str((tmp_path / "train" / "c0" / "0.JPEG").resolve())]


def test_the_default_uses_the_machines_cores_for_a_large_tree(planted, monkeypatch) -> None:
    monkeypatch.setattr(cd.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [cd.default_workers(n) for n in (22, 511, 512, 1_281_167)] == [1, 1, 2, 8]
    root, _ = planted
    serial = check_data(root, workers=1)
    monkeypatch.setattr(cd, "default_workers", lambda files: 2)  # as for a tree of 512 images
    assert check_data(root).problems == serial.problems
    assert cd.build_parser().parse_args([str(root)]).workers is None  # the CLI leaves it to default_workers
