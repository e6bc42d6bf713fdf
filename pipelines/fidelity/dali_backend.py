"""The DALI backend's ops for pipelines.fidelity: pipelines/dali_ops.py's crop and resize in small CPU-mode pipelines.

Images and boxes enter through `fn.external_source`, and the graphs are built
from the same dali_ops functions make_crops uses, so what is measured is the
training code in DALI's CPU mode. The colour stage is the torch backend's
(DaliTwoViewLoader hands DALI's crops to TorchTwoViewAugment.colour), so
apply_op is torch_backend's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import nvidia.dali.fn as fn
from nvidia.dali import pipeline_def

from pipelines import dali_ops
from pipelines.fidelity.torch_backend import apply_op
from pipelines.spec import AugmentationSpec, ViewSpec

__all__ = ["apply_op", "crop_boxes", "resize", "run_cpu"]


def _constant(batch: list[np.ndarray]) -> Callable[[], list[np.ndarray]]:
    return lambda: batch


def run_cpu(graph: Callable, *batches: list[np.ndarray], layouts: tuple[str, ...] = (), seed: int = 0) -> list:
    """One iteration of a CPU-mode pipeline: `graph(*inputs)` on one external_source per batch (a list of
    per-sample arrays; the first len(layouts) get those layouts). Returns each output as a list of arrays."""
    @pipeline_def(batch_size=len(batches[0]), num_threads=1, device_id=None, seed=seed)
    def pipe():
        # A source callable with a parameter would be handed the iteration number: bind the batch in a closure.
        inputs = [fn.external_source(source=_constant(batch), batch=True, layout=layout)
                  for batch, layout in zip(batches, layouts + ("",) * (len(batches) - len(layouts)))]
        outputs = graph(*inputs)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    built = pipe()
    built.build()
    return [[np.array(out.at(i)) for i in range(len(out))] for out in built.run()]


def resize(images: np.ndarray, boxes: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    """uint8 [N, H, W, 3] images cut at (top, left, h, w) boxes and resampled by dali_ops.resized_crop."""
    def graph(hwc, anchor, extent):
        return dali_ops.resized_crop(hwc, anchor, extent, spec.image_size, spec.interpolation, spec.antialias)
    boxes = np.int32(boxes)
    (out,) = run_cpu(graph, list(images), list(boxes[:, :2]), list(boxes[:, 2:]), layouts=("HWC",))
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float64)


def crop_boxes(height: int, width: int, n: int, view: ViewSpec, spec: AugmentationSpec, seed: int) -> np.ndarray:
    """n boxes dali_ops.crop_windows draws for `view` on one height x width image, as int [n, 4] (top, left,
    h, w)."""
    shapes = [np.int64([height, width, 3])] * n
    anchor, extent = run_cpu(lambda shape: dali_ops.crop_windows(shape, (view,), spec.recipe), shapes, seed=seed)
    return np.concatenate([np.stack(anchor)[:, 0], np.stack(extent)[:, 0]], axis=1).astype(np.int64)
