"""The DALI backend's ops for pipelines.fidelity: pipelines/dali_ops.py's functions in small CPU-mode pipelines.

Images and per-sample values enter through `fn.external_source`, and each
function below builds its graph from the same dali_ops functions make_view
uses (the jitter through color_jitter's per-sample slots), so what is measured
is the training code in DALI's CPU mode.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from pipelines import dali_ops
from pipelines.reference import JITTER_OPS, identity_jitter_values
from pipelines.spec import AugmentationSpec, ViewSpec


def _constant(batch: list[np.ndarray]) -> Callable[[], list[np.ndarray]]:
    return lambda: batch


def run_cpu(graph: Callable, *batches: list[np.ndarray], layouts: tuple[str, ...] = (), seed: int = 0) -> list:
    """One iteration of a CPU-mode pipeline: `graph(*inputs)` on one external_source per batch (a list of
    per-sample arrays; the first len(layouts) get those layouts). Returns each output as a list of arrays."""
    @pipeline_def(batch_size=len(batches[0]), num_threads=1, device_id=None, enable_conditionals=True, seed=seed)
    def pipe():
        # A source callable with a parameter would be handed the iteration number: bind the batch in a closure.
        inputs = [fn.external_source(source=_constant(batch), batch=True, layout=layout)
                  for batch, layout in zip(batches, layouts + ("",) * (len(batches) - len(layouts)))]
        outputs = graph(*inputs)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    built = pipe()
    built.build()
    return [[np.array(out.at(i)) for i in range(len(out))] for out in built.run()]


def _colour_graph(op: str, spec: AugmentationSpec) -> Callable:
    if op in JITTER_OPS:
        index = JITTER_OPS.index(op)

        def jitter_first(images, value):
            # The op in slot 0 with its value; the other three after it with their identity values.
            values = [value if k == index else v for k, v in enumerate(identity_jitter_values(spec.recipe))]
            order = types.Constant(np.int32([index, *(k for k in range(len(JITTER_OPS)) if k != index)]))
            return dali_ops.color_jitter(images, values, order, spec.recipe)
        return jitter_first
    if op == "grayscale":
        return lambda images, value: dali_ops.grayscale(images)
    if op == "blur":
        return lambda images, sigma: dali_ops.gaussian_blur(images, sigma, spec.blur_kernel_size, spec.recipe)
    if op == "solarize":
        return lambda images, value: dali_ops.solarize(images, spec.view2.solarize_threshold)
    raise ValueError(f"unknown op {op!r}")


def apply_op(op: str, images: np.ndarray, values: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    """One colour op on float64 [N, 3, S, S] images with per-sample values (pipelines.fidelity)."""
    hwc = list(np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32))
    (out,) = run_cpu(_colour_graph(op, spec), hwc, [np.array(v, np.float32) for v in values], layouts=("HWC",))
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float64)


def resize(images: np.ndarray, boxes: np.ndarray, spec: AugmentationSpec) -> np.ndarray:
    """uint8 [N, H, W, 3] images cut at (top, left, h, w) boxes and resampled by dali_ops.resized_crop."""
    def graph(hwc, anchor, extent):
        return dali_ops.resized_crop(hwc, anchor, extent, spec.image_size, spec.interpolation, spec.antialias)
    boxes = np.int32(boxes)
    (out,) = run_cpu(graph, list(images), list(boxes[:, :2]), list(boxes[:, 2:]), layouts=("HWC",))
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float64)


def crop_boxes(height: int, width: int, n: int, view: ViewSpec, spec: AugmentationSpec, seed: int) -> np.ndarray:
    """n boxes dali_ops.crop_window draws for one height x width image, as int [n, 4] (top, left, h, w)."""
    shapes = [np.int64([height, width, 3])] * n
    anchor, extent = run_cpu(lambda shape: dali_ops.crop_window(shape, view, spec.recipe), shapes, seed=seed)
    return np.concatenate([np.stack(anchor), np.stack(extent)], axis=1).astype(np.int64)
