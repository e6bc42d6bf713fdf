"""The torch backend decodes each batch a batch ahead in its own thread, so torchvision's host sync around nvjpeg
never holds the thread that launches the training step; on CUDA the caller's stream waits for the decode on
the device, so views are the same however busy that stream is."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.sources import ImageList
from pipelines.spec import AugmentationSpec
from pipelines.torch_pipeline import TorchImagePipeline

SIZE = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> ImageList:
    """12 small RGB JPEGs of varied sizes."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    files = []
    for i in range(12):
        path = root / f"{i:02d}.jpg"
        pixels = rng.integers(0, 256, (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        files.append(str(path))
    return ImageList(files=files, labels=list(range(12)), classes=[str(i) for i in range(12)])


def test_the_next_batch_is_decoded_in_the_decode_thread_before_the_caller_asks(images, monkeypatch):
    decodes: list[tuple[str, str]] = []  # (thread name, the batch's first file)
    second_decoded = threading.Event()
    original = TorchImagePipeline._decode_ahead

    def watched(self, reads, paths):
        result = original(self, reads, paths)
        decodes.append((threading.current_thread().name, paths[0]))
        if len(decodes) == 2:
            second_decoded.set()
        return result

    monkeypatch.setattr(TorchImagePipeline, "_decode_ahead", watched)
    pipeline = TorchImagePipeline(images, AugmentationSpec(image_size=SIZE), batch_size=4, seed=1, num_threads=2)
    try:
        batches = pipeline.batches(0)
        _, _, first_labels = next(batches)
        # Batch 2 gets decoded while the caller still holds batch 1, without another next().
        assert second_decoded.wait(timeout=60)
        rest = [labels for _, _, labels in batches]
    finally:
        pipeline.close()
    assert len(decodes) == 3 and all(name.startswith("byol-decode") for name, _ in decodes)
    served = [images.files[i] for i in [int(first_labels[0])] + [int(labels[0]) for labels in rest]]
    assert [first for _, first in decodes] == served  # decoded in the order they are served


@pytest.mark.cuda
def test_cuda_views_decoded_ahead_are_the_same_while_the_callers_stream_is_busy(images):
    def views(busy: bool) -> list[torch.Tensor]:
        pipeline = TorchImagePipeline(images, AugmentationSpec(image_size=SIZE), batch_size=4, device="cuda",
                                      seed=3)
        kept = []
        try:
            for view1, view2, _ in pipeline.batches(0):
                kept += [view1.clone(), view2.clone()]
                if busy:  # the next batch is handed over while this stream still has tens of ms queued
                    torch.cuda._sleep(50_000_000)
        finally:
            pipeline.close()
        torch.cuda.synchronize()
        return [view.cpu() for view in kept]

    idle, busy = views(False), views(True)
    assert len(idle) == 6
    for a, b in zip(idle, busy):
        assert torch.equal(a, b)
