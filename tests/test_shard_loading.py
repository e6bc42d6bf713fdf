"""Shards through the loaders: the exact samples of each rank and epoch against the plan's definition, views of
a resumed epoch equal to the uninterrupted epoch's bit for bit (2 ranks, several workers, over HTTP), bad samples
skipped, counted and named, and the threshold that stops a run."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.shards.convert import convert_to_shards, dali_index_lines
from pipelines.factory import build_train_loader
from pipelines.shards.plan import ShardPlan
from pipelines.shards.reader import stream_batches
from pipelines.shards.source import ShardError, TruncatedShardError, iter_shard, resolve_shards
from pipelines.sources import DataError, load_images
from pipelines.spec import AugmentationSpec
from pipelines.synthetic import make_synthetic

SPEC = AugmentationSpec(image_size=32)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_synthetic(root, images=44, classes=4, workers=1)
    out = tmp_path_factory.mktemp("shards") / "out"
    convert_to_shards(load_images(root / "train"), out, samples_per_shard=5, workers=2)  # 9 shards: 8 x 5 + 4
    return out


def serve(folder: Path, faults: dict[str, list] | None = None):
    """An HTTP server on 127.0.0.1 serving `folder` from a thread; returns (server, base URL).

    `faults` maps a file name to what its next GETs get instead of the file, one each, in turn: "drop" (the
    whole file's Content-Length, half of its bytes, then the connection closes) or an HTTP status code.
    """
    faults = faults if faults is not None else {}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no line per request on stderr
            pass

        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            fault = faults[name].pop(0) if faults.get(name) else None
            if fault is None:
                super().do_GET()
            elif fault == "drop":
                body = (folder / name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.close_connection = True
            else:
                self.send_error(fault)

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def http_url(shard_dir):
    server, base = serve(shard_dir)
    yield base + "/train-{000000..000008}.tar"
    server.shutdown()


def test_each_rank_reads_its_range_of_the_epochs_shard_order_in_the_plans_order(shard_dir):
    shards = resolve_shards(str(shard_dir / "train-{000000..000008}.tar"))
    keys = [[s.key for s in iter_shard(url)] for url in shards.urls]
    world, batch, streams = 2, 4, 2
    seen_epochs = []
    for epoch in (0, 1):
        plans = [ShardPlan(tuple(shards.counts), r, world, batch, seed=3, streams=streams, shuffle_buffer=6)
                 for r in range(world)]
        # The reference: shards in the epoch's seeded order, concatenated; rank r owns [r N, (r + 1) N).
        order = np.random.default_rng(np.random.SeedSequence([3, epoch])).permutation(len(keys))
        stream = [key for shard in order for key in keys[shard]]
        per_rank = 20  # 44 samples, 2 ranks x batch 4: 20 each, the last 4 of the epoch's stream left out
        assert plans[0].num_batches == 5 and plans[0].samples_per_rank == per_rank
        seen = []
        for r, plan in enumerate(plans):
            got = {}
            for s in range(streams):
                for j, items in enumerate(stream_batches(shards, plan, epoch, s)):
                    got[plan.stream(epoch, s).batches[j]] = [item.key for item in items]
            read = [key for b in range(plan.num_batches) for key in got[b]]
            assert sorted(read) == sorted(stream[r * per_rank:(r + 1) * per_rank])
            # The order is the plan's: each position's sample is the stream's sample at that position.
            assert read == [stream[p] for b in range(plan.num_batches) for p in plan.batch_positions(epoch, b)]
            seen.append(read)
        assert not set(seen[0]) & set(seen[1])
        seen_epochs.append(seen)
    assert seen_epochs[0][0] != seen_epochs[1][0]  # a new shard order and shuffle each epoch


@pytest.mark.dali
@pytest.mark.parametrize("through", ["reader", "feed"])
def test_dali_reads_exactly_each_ranks_plan_range(through, shard_dir, tmp_path):
    pytest.importorskip("nvidia.dali")
    from pipelines.shards.dali import DaliShardLoader

    if through == "feed":  # no DALI indexes: the stream reader feeds DALI
        for tar in shard_dir.glob("*.tar"):
            (tmp_path / tar.name).write_bytes(tar.read_bytes())
        (tmp_path / "manifest.json").write_text((shard_dir / "manifest.json").read_text())
        shard_dir = tmp_path
    shards = resolve_shards(str(shard_dir / "train-{000000..000008}.tar"))
    labels = [[s.label for s in iter_shard(url)] for url in shards.urls]
    for rank in (0, 1):
        loader = DaliShardLoader(shards, SPEC, 4, rank=rank, world_size=2, device="cpu", seed=3, dtype=torch.float32,
                                 num_threads=1, shuffle_buffer=6)
        assert loader.native == (through == "reader")
        got = torch.cat([batch[2] for batch in loader.batches(epoch=1)]).tolist()
        loader.close()
        order = np.random.default_rng(np.random.SeedSequence([3, 1])).permutation(len(labels))
        stream = [label for shard in order for label in labels[shard]]
        assert sorted(got) == sorted(stream[rank * 20:(rank + 1) * 20])  # the rank's range of the epoch's stream
        if through == "feed":  # in the plan's order, too (the reader shuffles with DALI's own buffer)
            assert got == [stream[p] for b in range(5) for p in loader.plan.batch_positions(1, b)]


def _epoch_views(backend: str, data: str, rank: int, epoch: int, start: int) -> list[tuple]:
    loader = build_train_loader(backend, data, SPEC, 4, rank=rank, world_size=2, seed=5, workers=2,
                                shuffle_buffer=6)
    try:
        return [tuple(t.clone() for t in batch) for batch in loader._epoch_fn(epoch, start)]
    finally:
        loader.close()


@pytest.mark.parametrize("backend", ["torchvision", "torch", pytest.param("dali", marks=pytest.mark.dali)])
def test_a_resumed_epoch_makes_the_uninterrupted_epochs_views_on_every_rank_over_http(backend, http_url):
    for rank in (0, 1):
        whole = _epoch_views(backend, http_url, rank, epoch=1, start=0)
        resumed = _epoch_views(backend, http_url, rank, epoch=1, start=3)
        assert len(whole) == 5 and len(resumed) == 2
        for (a1, a2, la), (b1, b2, lb) in zip(whole[3:], resumed):
            assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(la, lb)
        assert not torch.equal(whole[0][0], whole[1][0])


def _write_bad_shards(folder: Path, good: Path, indexes: bool) -> None:
    """good copies of three shards, then: one truncated, one with a corrupt image, one with a label missing;
    with `indexes`, DALI indexes too (the truncated shard keeps its whole one, as after a broken copy)."""
    for i in range(3):
        (folder / f"train-{i:06d}.tar").write_bytes((good / f"train-{i:06d}.tar").read_bytes())
    raw = (good / "train-000003.tar").read_bytes()
    (folder / "train-000003.tar").write_bytes(raw[:len(raw) // 2])  # cut inside a member: a broken download
    for index, damage in ((4, "corrupt"), (5, "nolabel")):
        buffer = io.BytesIO()
        with tarfile.open(good / f"train-{index:06d}.tar") as source, tarfile.open(fileobj=buffer, mode="w") as out:
            for n, member in enumerate(m for m in source if m.isreg()):
                data = source.extractfile(member).read()
                if n == 1 and damage == "corrupt":
                    data = data[:600]  # member 1 is the first sample's image (.cls sorts first)
                if n == 0 and damage == "nolabel":
                    continue
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
        (folder / f"train-{index:06d}.tar").write_bytes(buffer.getvalue())
    (folder / "manifest.json").write_text((good / "manifest.json").read_text())
    if indexes:
        for i in range(4):
            (folder / f"train-{i:06d}.idx").write_text((good / f"train-{i:06d}.idx").read_text())
        for i in (4, 5):
            (folder / f"train-{i:06d}.idx").write_text("\n".join(dali_index_lines(folder / f"train-{i:06d}.tar")))


def kept_before_truncation(url: str) -> int:
    """Samples a truncated shard yields before it breaks off."""
    kept = 0
    with pytest.raises(TruncatedShardError, match=r"is truncated \(unexpected end of data\)"):
        for _ in iter_shard(url):
            kept += 1
    assert 0 < kept < 5
    return kept


@pytest.mark.parametrize("backend,indexes", [
    ("torchvision", False), ("torch", False),
    pytest.param("dali", True, marks=pytest.mark.dali, id="dali-reader"),  # fn.readers.webdataset
    pytest.param("dali", False, marks=pytest.mark.dali, id="dali-feed")])  # the stream reader feeds DALI
def test_bad_samples_are_replaced_counted_named_and_stop_the_run_past_the_threshold(backend, indexes, shard_dir,
                                                                                    tmp_path, capsys):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    _write_bad_shards(tmp_path, shard_dir, indexes)
    data = str(tmp_path / "train-{000000..000005}.tar")
    shards = resolve_shards(data)
    kept = kept_before_truncation(shards.urls[3])
    expected_bad = (5 - kept) + 1 + 1
    loader = build_train_loader(backend, data, SPEC, 6, seed=1, workers=2, shuffle_buffer=4, max_bad_fraction=0.5)
    batches = [(v1.clone(), labels.clone()) for v1, _, labels in loader._epoch_fn(0, 0)]
    loader.close()
    assert len(batches) == 5 and all(v.shape == (6, 3, 32, 32) and torch.isfinite(v).all() for v, _ in batches)
    metrics = loader.metrics()
    assert metrics["bad_samples"] == expected_bad
    err = capsys.readouterr().err
    # Each named with its shard and key; a shard's fourth and later bad samples are only counted.
    assert err.count("byol-fast: skipped bad sample") == min(3, 5 - kept) + 2
    assert f"of {shards.urls[3]}: truncated" in err
    assert f"of {shards.urls[4]}: image does not decode" in err
    assert f"of {shards.urls[5]}: no label member" in err
    strict = build_train_loader(backend, data, SPEC, 6, seed=1, workers=2, shuffle_buffer=4, max_bad_fraction=0.1)
    with pytest.raises(DataError, match=r"bad samples in epoch 0 on this rank pass max_bad_fraction=0.1 of its 30"):
        list(strict._epoch_fn(0, 0))
    strict.close()


def test_ffcv_over_shards_is_refused_with_the_fix(shard_dir):
    from pipelines.shards.factory import build_shard_loader

    with pytest.raises(DataError, match=r"'ffcv' reads a .beton file .*not WebDataset shards.*--data-backend torch"):
        build_shard_loader("ffcv", str(shard_dir), SPEC, 4, rank=0, world_size=1, seed=0, device=torch.device("cpu"),
                           dtype=torch.float32, workers=1, out=None, manifest=None, shuffle_buffer=10,
                           max_bad_fraction=0.0)


def test_check_data_reads_shards_and_names_each_bad_sample_and_shard(shard_dir, tmp_path, capsys):
    from pipelines.check_data import main as check_main

    assert check_main([str(shard_dir / "train-{000000..000008}.tar"), "--workers", "1"]) == 0
    assert "checked 9 shards, 44 samples (44 in the manifest, 4 classes): 0 bad, 0 missing" in capsys.readouterr().out
    _write_bad_shards(tmp_path, shard_dir, indexes=False)
    urls = resolve_shards(str(tmp_path / "train-{000000..000005}.tar")).urls
    assert check_main([str(tmp_path / "train-{000000..000005}.tar"), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"BAD-SHARD        {urls[3]}: shard {urls[3]} is truncated" in out
    assert f"{urls[3]}: SHA-256 differs from the manifest's" in out
    assert f"BAD-SAMPLE       {urls[4]}:" in out and "corrupt" in out
    assert f"{urls[3]}: holds {kept_before_truncation(urls[3])} samples, the manifest says 5" in out
    assert f"BAD-SAMPLE       {urls[5]}:" in out and "no valid label" in out
    assert out.count("BAD-SAMPLE") == 2 and "FAIL: training would skip" in out
    assert check_main([str(tmp_path / "train-{000000..000006}.tar"), "--workers", "1"]) == 2  # 6: not copied
    assert f"UNREADABLE-SHARD shard {tmp_path / 'train-000006.tar'} does not exist" in capsys.readouterr().out


def test_pipe_commands_read_the_same_samples_and_views_as_local_paths(shard_dir):
    local = _epoch_views("torch", str(shard_dir / "train-{000000..000008}.tar"), rank=1, epoch=0, start=0)
    piped = _epoch_views("torch", f"pipe:cat {shard_dir}/train-{{000000..000008}}.tar", rank=1, epoch=0, start=0)
    assert len(local) == len(piped) == 5
    for a, b in zip(local, piped):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_shuffle_buffer_permutes_and_emits_only_what_it_has_read():
    from pipelines.shards.plan import buffer_shuffle

    assert buffer_shuffle(7, 1, np.random.default_rng(0)).tolist() == list(range(7))
    order = buffer_shuffle(500, 16, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(500)) and order.tolist() != list(range(500))
    # The k-th emitted item has been read: with 16 held, position < k + 16 (a stream never reads ahead of that).
    assert all(position < k + 16 for k, position in enumerate(order.tolist()))


def test_a_resume_opens_no_shard_before_the_first_sample_it_needs(shard_dir, monkeypatch):
    import pipelines.shards.reader as reader

    shards = resolve_shards(str(shard_dir / "train-{000000..000008}.tar"))
    plan = ShardPlan(tuple(shards.counts), 0, 1, 4, seed=2, streams=1, shuffle_buffer=3)
    opened = []
    real = reader.iter_shard
    monkeypatch.setattr(reader, "iter_shard", lambda url: (opened.append(url), real(url))[1])
    resumed = [[item.key for item in batch] for batch in stream_batches(shards, plan, 0, 0, first=8)]
    layout = plan.stream(0, 0)
    low = int(layout.order[8 * 4:].min())  # the earliest position batches 8.. still need
    starts = np.cumsum([0] + [shards.counts[s.shard] for s in layout.segments])
    needed_from = max(i for i, start in enumerate(starts[:-1]) if start <= low)
    assert opened == [shards.urls[s.shard] for s in layout.segments[needed_from:]] and needed_from >= 5
    opened.clear()
    whole = [[item.key for item in batch] for batch in stream_batches(shards, plan, 0, 0)]
    assert resumed == whole[8:] and len(opened) == len(layout.segments)


def _stream_keys_and_problems(data: str) -> list[tuple[str, bytes | None, str | None]]:
    """Every slot of stream 0's batches of epoch 0 (4 a batch, a shuffle buffer of 3): key, image, problem."""
    shards = resolve_shards(data)
    plan = ShardPlan(tuple(shards.counts), 0, 1, 4, seed=2, streams=1, shuffle_buffer=3)
    return [(item.key, item.sample and item.sample.image, item.problem)
            for batch in stream_batches(shards, plan, 0, 0) for item in batch]


@pytest.fixture
def no_retry_waits(monkeypatch):
    import pipelines.shards.reader as reader

    monkeypatch.setattr(reader, "RETRY_WAITS_S", (0.0, 0.0, 0.0))


def test_a_dropped_connection_or_a_busy_server_is_tried_again_and_every_sample_comes_once(shard_dir, no_retry_waits,
                                                                                         capsys):
    faults = {"train-000002.tar": ["drop"], "train-000004.tar": [503, "drop"]}
    server, base = serve(shard_dir, faults)
    try:
        over_http = _stream_keys_and_problems(base + "/train-{000000..000008}.tar")
    finally:
        server.shutdown()
    assert faults == {"train-000002.tar": [], "train-000004.tar": []}  # each fault was met once
    assert over_http == _stream_keys_and_problems(str(shard_dir / "train-{000000..000008}.tar"))
    assert all(problem is None for _, _, problem in over_http) and len(over_http) == 44
    err = capsys.readouterr().err
    assert err.count("reading the shard again") == 3
    assert f"shard {base}/train-000004.tar could not be fetched: HTTP 503" in err
    dropped = [line for line in err.splitlines() if "train-000002.tar: the connection was lost" in line]
    assert len(dropped) == 1 and "IncompleteRead" in dropped[0] and "retry 1 of 3" in dropped[0]
    assert "from sample 0)" not in dropped[0]  # half the shard had come: those samples are not given again


def kept_before_truncation_of_half(path: Path, folder: Path) -> int:
    """Samples the first half of a shard's bytes holds whole (what a dropped connection leaves); the half is
    written into `folder`."""
    half = folder / f"half-{path.name}"
    half.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return kept_before_truncation(str(half))


def test_a_shard_whose_connection_keeps_dropping_counts_its_rest_as_bad(shard_dir, no_retry_waits, tmp_path, capsys):
    faults = {"train-000002.tar": ["drop"] * 4}
    server, base = serve(shard_dir, faults)
    try:
        slots = _stream_keys_and_problems(base + "/train-{000000..000008}.tar")
    finally:
        server.shutdown()
    kept = kept_before_truncation_of_half(shard_dir / "train-000002.tar", tmp_path)
    bad = [problem for _, _, problem in slots if problem is not None]
    assert len(slots) == 44 and len(bad) == 5 - kept and faults["train-000002.tar"] == []
    assert all(problem.startswith(f"truncated: the shard broke off after {kept} of 5 samples") for problem in bad)
    assert capsys.readouterr().err.count("reading the shard again") == 3


def test_a_shard_the_server_does_not_have_fails_at_once_with_its_url(shard_dir, no_retry_waits, capsys):
    faults = {"train-000002.tar": [404]}  # a second GET would succeed: retrying would hide the error
    server, base = serve(shard_dir, faults)
    try:
        with pytest.raises(ShardError, match=r"train-000002.tar could not be fetched: HTTP 404 .*check the URL"):
            _stream_keys_and_problems(base + "/train-{000000..000008}.tar")
    finally:
        server.shutdown()
    assert "reading the shard again" not in capsys.readouterr().err
