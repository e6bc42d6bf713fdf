"""Shard sources: URL expansion, the manifest, convert-shards (content, DALI indexes, resume, refusals) and the
errors that name a missing, unreachable or non-tar shard."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pipelines.shards.convert import convert_to_shards, dali_index_lines, main as convert_main
from pipelines.shards.source import (ShardError, expand_shard_urls, is_shard_spec, iter_shard, manifest_url_for,
                              resolve_shards, shard_name)
from pipelines.sources import DataError, load_images
from pipelines.synthetic import make_synthetic


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_synthetic(root, images=20, classes=4, workers=1)
    return root / "train"


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    convert_to_shards(load_images(folder), out, samples_per_shard=6, workers=2)
    return out


def test_specs_and_urls_expand_as_users_write_them(shards):
    assert is_shard_spec("/data/x-{000000..001023}.tar") and is_shard_spec("http://h:80/a-{0..3}.tar")
    assert is_shard_spec("pipe:aws s3 cp s3://b/t-000001.tar -") and is_shard_spec(str(shards))
    assert not is_shard_spec("data/synthetic/train") and not is_shard_spec("x.beton")
    assert expand_shard_urls("/d/t-{000008..000010}.tar") == ["/d/t-000008.tar", "/d/t-000009.tar", "/d/t-000010.tar"]
    assert expand_shard_urls("/a/x-{0..1}.tar::/b/y.tar") == ["/a/x-0.tar", "/a/x-1.tar", "/b/y.tar"]
    assert expand_shard_urls(str(shards)) == [str(shards / f"train-{i:06d}.tar") for i in range(4)]
    assert shard_name("pipe:aws s3 cp s3://b/p/t-000001.tar -") == "t-000001.tar"
    assert manifest_url_for("pipe:aws s3 cp s3://b/p/t-000001.tar -") == "pipe:aws s3 cp s3://b/p/manifest.json -"
    assert manifest_url_for("http://h:8/p/t-000001.tar") == "http://h:8/p/manifest.json"


def test_convert_writes_every_image_once_with_its_label_and_a_true_manifest(folder, shards):
    images = load_images(folder)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [6, 6, 6, 2] and manifest["total"] == 20
    assert manifest["classes"] == images.classes
    seen = {}
    for entry in manifest["shards"]:
        samples = list(iter_shard(str(shards / entry["name"])))
        assert len(samples) == entry["samples"]
        assert entry["bytes"] == (shards / entry["name"]).stat().st_size
        seen.update({s.key: (s.image, s.label) for s in samples})
    # Keys are the image's index in the ImageList; bytes are the file's, unchanged.
    assert sorted(seen) == [f"{i:09d}" for i in range(20)]
    for key, (data, label) in seen.items():
        assert data == Path(images.files[int(key)]).read_bytes() and label == images.labels[int(key)]
    # Shuffled before sharding: the first shard is not the first six files.
    assert [s.key for s in iter_shard(str(shards / "train-000000.tar"))] != [f"{i:09d}" for i in range(6)]


def test_dali_index_lists_each_member_at_its_data_offset(shards):
    tar = shards / "train-000001.tar"
    lines = (shards / "train-000001.idx").read_text().splitlines()
    assert lines == dali_index_lines(tar) and lines[0] == "v1.2 6"
    raw = tar.read_bytes()
    with tarfile.open(tar) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    for line in lines[1:]:
        fields = line.split()
        for ext, offset, size, name in zip(*[iter(fields)] * 4):
            assert name.endswith("." + ext) and raw[int(offset):int(offset) + int(size)] == members[name]


def test_convert_refuses_a_finished_out_and_resumes_an_interrupted_one(folder, tmp_path, capsys):
    out = tmp_path / "out"
    convert_to_shards(load_images(folder), out, samples_per_shard=8)
    assert convert_main([str(folder), str(out), "--samples-per-shard", "8"]) == 2
    assert "holds a finished conversion: pass --overwrite" in capsys.readouterr().err
    keep = out / "notes.txt"
    keep.write_text("mine")
    # An interruption: the manifest and the last shard are gone; the rerun writes only that shard.
    (out / "manifest.json").unlink()
    (out / "train-000002.tar").unlink()
    before = (out / "train-000000.tar").stat().st_mtime_ns
    assert convert_main([str(folder), str(out), "--samples-per-shard", "8", "--workers", "1"]) == 0
    assert (out / "train-000000.tar").stat().st_mtime_ns == before and (out / "train-000002.tar").is_file()
    assert resolve_shards(str(out)).counts == [8, 8, 4]
    # Other settings over an interrupted conversion are refused; --overwrite replaces only what it wrote.
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="interrupted conversion of other sources or settings"):
        convert_to_shards(load_images(folder), out, samples_per_shard=5)
    convert_to_shards(load_images(folder), out, samples_per_shard=5, overwrite=True)
    assert resolve_shards(str(out)).counts == [5, 5, 5, 5] and keep.read_text() == "mine"


def test_missing_and_non_tar_shards_and_manifests_are_named_with_the_fix(shards, tmp_path):
    with pytest.raises(ShardError, match=r"train-000009.tar are not listed in the manifest|not listed"):
        resolve_shards(str(shards / "train-{000000..000009}.tar"))
    with pytest.raises(ShardError, match=r"shard manifest .*nowhere/manifest.json does not exist.*convert-shards"):
        resolve_shards(str(tmp_path / "nowhere" / "t-{0..1}.tar"))
    with pytest.raises(ShardError, match=r"shard .*gone.tar does not exist: check the path and the brace range"):
        list(iter_shard(str(tmp_path / "gone.tar")))
    (tmp_path / "junk.tar").write_bytes(b"<html>not found</html>\n" * 40)
    with pytest.raises(ShardError, match=r"junk.tar is not a tar archive"):
        list(iter_shard(str(tmp_path / "junk.tar")))
    with pytest.raises(ShardError, match=r"unreachable"):
        list(iter_shard("http://127.0.0.1:9/t-000000.tar"))
    with pytest.raises(ShardError, match=r"could not be opened|exit"):
        list(iter_shard("pipe:exit 3 # t-000000.tar"))


def test_unreadable_images_fail_the_conversion_by_name_unless_skipped(folder, tmp_path):
    images = load_images(folder)
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(Path(images.files[3]).read_bytes()[:500])  # a cut-off download
    files = images.files[:3] + [str(broken)] + images.files[4:8]
    listed = type(images)(files, images.labels[:8], images.classes)
    with pytest.raises(DataError, match=r"(?s)1 of 8 images could not be read.*broken.JPEG: has a corrupt "
                                        r"header.*--skip-corrupt"):
        convert_to_shards(listed, tmp_path / "out", samples_per_shard=4)
    manifest = convert_to_shards(listed, tmp_path / "out", samples_per_shard=4, skip_corrupt=True)
    assert manifest.total == 7 and [s["path"] for s in manifest.extra["skipped"]] == [str(broken)]
    keys = {s.key for shard in manifest.shards for s in iter_shard(str(tmp_path / "out" / shard.name))}
    assert keys == {f"{i:09d}" for i in range(8)} - {"000000003"}


def test_index_only_writes_the_manifest_and_dali_indexes_of_existing_shards(shards, tmp_path):
    from pipelines.shards.convert import index_existing

    out = tmp_path / "meta"
    manifest = index_existing(str(shards / "train-{000000..000003}.tar"), out)
    original = json.loads((shards / "manifest.json").read_text())
    assert [(s.name, s.samples, s.bytes, s.sha256) for s in manifest.shards] == \
        [(s["name"], s["samples"], s["bytes"], s["sha256"]) for s in original["shards"]]
    assert manifest.classes == ["0", "1", "2", "3"]  # label numbers: shards carry no class names
    assert (out / "train-000002.idx").read_text() == (shards / "train-000002.idx").read_text()
    resolved = resolve_shards(str(shards / "train-{000000..000003}.tar"), manifest=str(out / "manifest.json"))
    assert resolved.counts == [6, 6, 6, 2]


def test_a_path_label_list_converts_with_its_labels(folder, tmp_path):
    images = load_images(folder)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path} {7 - label}\n" for path, label in zip(images.files[:5], images.labels)))
    assert convert_main([str(listing), str(tmp_path / "out"), "--samples-per-shard", "3", "--workers", "1"]) == 0
    got = {s.key: s.label for url in expand_shard_urls(str(tmp_path / "out")) for s in iter_shard(url)}
    assert got == {f"{i:09d}": 7 - images.labels[i] for i in range(5)}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] == [str(k) for k in range(8)]
