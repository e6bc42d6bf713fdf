"""NVIDIA DALI backend: read, decode once, crop both BYOL views on the GPU (or CPU), colour them with torch.

Graph per step: file paths of this rank's next batch -> `fn.io.file.read` (DALI's
C++ thread pool) -> `fn.decoders.image` once per file ("mixed": nvJPEG with the
hardware JPEG decoder where the GPU has one; "cpu" in CPU mode) -> two resized
crops of the same decoded image (pipelines/dali_ops.py) -> float32 NHWC
batches. The colour half of each view (flip, jitter, grayscale, blur,
solarize, normalize) is then `TorchTwoViewAugment.colour` on the same device
and stream, as for the torch and FFCV backends: one definition of every op,
and a few dozen batched kernels instead of hundreds of DALI operators.

Why not `fn.readers.file`: its `random_shuffle` is a 1024-sample buffer, which
on ImageNet's class-sorted file list yields batches from one or two classes;
its `shuffle_after_epoch` mode shuffles globally but cannot start at epoch k of
a resumed run, and its shards differ by one file, so ranks can disagree on the
number of full batches (a hang under DDP). Instead the order comes from
`pipelines.sources.shard_indices`, like every other backend: one permutation
per (seed, epoch) shared by all ranks, disjoint equal-size blocks per rank, the
tail that does not fill a batch on every rank dropped (a different few each
epoch). A tiny Python source feeds only the encoded paths; the bytes are read
by DALI's threads, so Python does no I/O.

Seeds: the data order uses `seed` on every rank (the shards must agree). The
crop boxes use DALI's random operators and the colour stage a torch generator,
both seeded per pipeline with SeedSequence([seed, rank, first batch]) (31
bits; first batch = epoch * batches per epoch + start batch): different on
every rank, reproducible for a given seed, and fresh after a resume elsewhere.

Bad files: DALI's decode errors do not say which file broke. Scanning every
file up front costs minutes on ImageNet, so instead, when a step fails, the
files of the batches in flight (at most prefetch + 1 batches) are re-read with
PIL (`pipelines.decode`) and the error names the broken one and points to
`byol-fast check-data`, which scans a whole tree before a run.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.tensors import TensorListCPU, TensorListGPU

from pipelines.check_data import UNREADABLE, check_file
from pipelines.dali_ops import make_crops
from pipelines.decode import probe_image
from pipelines.sources import DataError, ImageList, samples_per_rank, shard_indices
from pipelines.spec import AugmentationSpec
from pipelines.torch_aug import TorchTwoViewAugment

DEBUG_FIELDS = ("crop_anchor", "crop_extent", "image_shape")
"""Per-view crop draws a `debug_outputs=True` pipeline returns after (crop1, crop2, labels): view 1's, then 2's."""

# Training dtypes the colour stage writes.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Formats DALI's image decoder reads; others are named in the error even if PIL could open them.
_DALI_FORMATS = frozenset({"jpeg", "png", "bmp", "tiff", "webp"})


class EpochShardSource:
    """External-source callable: each call returns this rank's next batch as (encoded paths, labels).

    Walks epoch after epoch from `start_epoch` without end, so DALI's prefetch
    runs across epoch boundaries. Remembers the last few batches it produced
    so a failed step can be traced to its files.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], batch_size: int, shard_id: int, num_shards: int,
                 seed: int, shuffle: bool = True, start_epoch: int = 0, start_batch: int = 0, history: int = 8) -> None:
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = samples_per_rank(len(self.files), num_shards, batch_size) // batch_size
        self.epoch, self.batch = start_epoch, start_batch
        self._order = self._epoch_order()
        self.produced = 0
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=history)

    def __call__(self) -> tuple[list[np.ndarray], np.ndarray]:
        if self.batch == 0:
            self._order = self._epoch_order()
        take = self._order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self.recent.append(take)
        self.produced += 1
        # os.fsencode round-trips any name the OS gave us (undecodable bytes included).
        return [np.frombuffer(os.fsencode(self.files[i]), dtype=np.uint8) for i in take], self.labels[take]

    def _epoch_order(self) -> np.ndarray:
        return shard_indices(len(self.files), self.shard_id, self.num_shards, self.epoch, self.seed,
                             shuffle=self.shuffle, drop_last=True, batch_size=self.batch_size)

    def undelivered(self, delivered: int) -> list[str]:
        """Files of the batches produced after the first `delivered` ones (those a failed step can involve)."""
        waiting = list(self.recent)[len(self.recent) - min(len(self.recent), self.produced - delivered):]
        return [self.files[i] for take in waiting for i in take]


@pipeline_def(exec_dynamic=True)
def byol_two_view_pipeline(source: EpochShardSource, spec: AugmentationSpec, device: str = "gpu",
                           debug_outputs: bool = False):
    """The two resized crops of each image `source` names: (crop1, crop2, labels[, draws...]).

    Crops are float32 HWC in [0, 1], on the GPU when device == "gpu" (decoded
    by the "mixed" nvJPEG decoder), else on the CPU; the colour stage is the
    loader's. With `debug_outputs`, the DEBUG_FIELDS draws of view 1 then view 2 follow.
    Pass the usual pipeline_def arguments (batch_size = source.batch_size,
    num_threads, device_id (None in CPU mode), seed, prefetch_queue_depth).
    """
    paths, labels = fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64],
                                       ndim=[1, 0])
    encoded = fn.io.file.read(paths)
    image_shape = fn.peek_image_shape(encoded)
    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    crops, draws = make_crops(images, image_shape, spec)
    outputs = [*crops, labels.gpu() if device == "gpu" else labels]
    if debug_outputs:
        outputs += [d[name] for d in draws for name in DEBUG_FIELDS]
    return tuple(outputs)


def pipeline_seed(seed: int, rank: int, step: int) -> int:
    """The DALI augmentation seed of one rank's pipeline started at global batch `step` (31 bits, module doc)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0] & 0x7FFFFFFF)


def default_num_threads() -> int:
    """CPU threads per DALI pipeline: this process's share of the cores (LOCAL_WORLD_SIZE ranks per node), 1..16."""
    share = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, share))


def _unpack(images: ImageList | tuple[Sequence[str], Sequence[int]]) -> tuple[list[str], list[int]]:
    files, labels = (images.files, images.labels) if isinstance(images, ImageList) else images
    files, labels = list(files), [int(v) for v in labels]
    if len(files) != len(labels):
        raise ValueError(f"got {len(files)} files but {len(labels)} labels: pass one label per file")
    if not files:
        raise DataError("no images to load: pass a non-empty ImageList (pipelines.sources.load_images(root))")
    return files, labels


class DaliTwoViewLoader:
    """Iterate BYOL batches `(view1, view2, labels)` made by a DALI pipeline, one epoch per `iter()`.

    Views follow the DESIGN data contract: (B, 3, S, S) channels_last,
    ImageNet-normalized, in `dtype` (float32, float16 or bfloat16),
    on the current CUDA device (device="gpu") or the CPU (device="cpu", DALI's
    CPU mode), every batch full. `len()` is the batches per epoch, the same on
    every rank. Labels are int64 on the same device.

    Epochs: `set_epoch(e, start=0)` says where the next `iter()` begins
    (default: the epoch after the one last iterated, from its first batch);
    epoch e's order is `shard_indices(..., e, seed)`, identical to the other
    backends, and a resume at batch `start` skips the earlier batches without
    reading them. Continuing epoch after epoch keeps DALI prefetching across
    the boundary; jumping elsewhere or leaving an epoch early rebuilds the
    pipeline (about a second).

    `out=(buf1, buf2)`: static (B, 3, S, S) channels_last tensors of `dtype` on
    the device (e.g. a CUDA graph's inputs). The colour stage's last kernel
    (normalize) then writes every batch into them, and they are what is
    yielded; without `out` each batch gets new tensors.

    On the GPU the colour stage runs on the current torch stream, which DALI's
    outputs are bound to: no host synchronization per batch. `debug_outputs=True` adds
    a fourth item, {"view1": {field: np.ndarray}, "view2": {...}} over
    DEBUG_FIELDS, for tests.
    """

    def __init__(self, images: ImageList | tuple[Sequence[str], Sequence[int]], spec: AugmentationSpec,
                 batch_size: int, rank: int = 0, world_size: int = 1, device: str = "gpu", seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, num_threads: int | None = None, prefetch: int = 2,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None, shuffle: bool = True,
                 debug_outputs: bool = False) -> None:
        self._configure(spec, batch_size, rank, world_size, device, seed, dtype, num_threads, prefetch)
        self.files, self.labels = _unpack(images)
        self.shuffle, self.debug_outputs = shuffle, debug_outputs
        self._batches = samples_per_rank(len(self.files), world_size, batch_size) // batch_size
        if self._batches == 0:
            raise DataError(f"{len(self.files)} images are too few for world_size={world_size} x batch_size="
                            f"{batch_size}: every rank needs a full batch; use more images or a smaller batch")
        self.out = self._check_out(out)
        self._next_start = (0, 0)  # (epoch, batch) the next iter() starts at
        self._pipe: Pipeline | None = None
        self._source: EpochShardSource | None = None
        self._position = (-1, 0)  # (epoch, batch) the pipeline delivers next
        self._delivered = 0  # batches this pipeline delivered

    def _configure(self, spec: AugmentationSpec, batch_size: int, rank: int, world_size: int, device: str, seed: int,
                   dtype: torch.dtype, num_threads: int | None, prefetch: int) -> None:
        """Check and keep what every DALI loader shares (folders and shards): device, dtype, batch, rank, threads,
        and the torch colour stage with its generator."""
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device={device!r}: use 'gpu' (mixed nvJPEG decode, GPU augmentation) or 'cpu'")
        if device == "gpu" and not torch.cuda.is_available():
            raise ValueError("device='gpu' needs CUDA, which torch cannot see here: use device='cpu' (DALI CPU mode)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype} is not supported: use torch.bfloat16, torch.float16 or torch.float32")
        if batch_size < 1 or prefetch < 1 or (num_threads is not None and num_threads < 1):
            raise ValueError(f"batch_size={batch_size}, prefetch={prefetch} and num_threads={num_threads} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.spec, self.batch_size, self.rank, self.world_size = spec, batch_size, rank, world_size
        self.device, self.seed, self.dtype = device, seed, dtype
        self.num_threads, self.prefetch = num_threads or default_num_threads(), prefetch
        self.torch_device = torch.device(f"cuda:{torch.cuda.current_device()}" if device == "gpu" else "cpu")
        self._augment = TorchTwoViewAugment(spec, self.torch_device, dtype)
        self._generator = torch.Generator(self.torch_device)  # the colour draws, seeded with the pipeline

    def _check_out(self, out: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if out is None:
            return None
        size = self.spec.image_size
        want = (self.batch_size, 3, size, size)
        for name, buf in zip(("out[0]", "out[1]"), out):
            if (tuple(buf.shape) != want or buf.dtype != self.dtype or buf.device != self.torch_device
                    or not buf.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError(f"{name} is {tuple(buf.shape)} {buf.dtype} on {buf.device}: pass "
                                 f"torch.empty({want}, dtype={self.dtype}, device='{self.torch_device}')"
                                 f".to(memory_format=torch.channels_last)")
        return out[0], out[1]

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Make the next `iter()` walk epoch `epoch` from its batch `start` (a resume mid-epoch skips the
        earlier batches without reading them); the file order is `shard_indices(..., epoch, seed)`."""
        if epoch < 0 or not 0 <= start < self._batches:
            raise ValueError(f"epoch={epoch} must be >= 0 and start={start} in [0, {self._batches})")
        self._next_start = (epoch, start)

    def close(self) -> None:
        """Release the DALI pipeline (its threads and GPU memory); a later `iter()` builds a new one."""
        self._pipe = self._source = None

    def _build(self, epoch: int, start: int) -> None:
        self._source = EpochShardSource(self.files, self.labels, self.batch_size, self.rank, self.world_size,
                                        self.seed, self.shuffle, start_epoch=epoch, start_batch=start,
                                        history=self.prefetch + 2)
        seed = pipeline_seed(self.seed, self.rank, epoch * self._batches + start)
        self._pipe = byol_two_view_pipeline(
            self._source, self.spec, self.device, self.debug_outputs,
            batch_size=self.batch_size, num_threads=self.num_threads, prefetch_queue_depth=self.prefetch,
            device_id=self.torch_device.index if self.device == "gpu" else None, seed=seed)
        self._pipe.build()
        self._generator.manual_seed(seed)
        self._position, self._delivered = (epoch, start), 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, start = self._next_start
        if self._pipe is None or self._position != (epoch, start):
            self._build(epoch, start)
        self._next_start = (epoch + 1, 0)
        for _ in range(start, self._batches):
            yield self._next()

    def _run(self) -> tuple[TensorListCPU | TensorListGPU, ...]:
        try:
            # Bound to the current torch stream: DALI's results are ordered before our copies, no host wait.
            if self.device == "gpu":
                return self._pipe.run(torch.cuda.current_stream(self.torch_device))
            return self._pipe.run()
        except RuntimeError as err:
            self._pipe = None  # DALI marks a failed pipeline unusable; the next iter() rebuilds
            raise explain_failure(err, self._source.undelivered(self._delivered)) from err

    def _next(self) -> tuple[torch.Tensor, ...]:
        outputs = self._run()
        self._delivered += 1
        epoch, batch = self._position
        self._position = (epoch + 1, 0) if batch + 1 == self._batches else (epoch, batch + 1)
        buffers = self.out or (None, None)
        views = tuple(self._colour(outputs[k], k, buffers[k]) for k in range(2))
        labels = torch.from_dlpack(outputs[2].as_tensor())
        if not self.debug_outputs:
            return (*views, labels)
        values = [np.array(t.as_tensor()) for t in outputs[3:]]
        count = len(DEBUG_FIELDS)
        debug = {f"view{k + 1}": dict(zip(DEBUG_FIELDS, values[k * count:(k + 1) * count])) for k in range(2)}
        return (*views, labels, debug)

    def _colour(self, batch: TensorListCPU | TensorListGPU, view_index: int,
                buffer: torch.Tensor | None) -> torch.Tensor:
        """View `view_index` of a batch of DALI crops: the torch colour stage, written into `buffer` if given."""
        crops = torch.from_dlpack(batch.as_tensor()).permute(0, 3, 1, 2)  # zero-copy NCHW, channels_last strides
        return self._augment.colour(crops, view_index, self._generator, out=buffer)


def explain_failure(err: RuntimeError, candidates: Sequence[str]) -> Exception:
    """The error to raise for a failed DALI step: a DataError naming the first bad file among `candidates`.

    Each candidate is fully decoded with PIL (check_data.check_file) and its
    true format checked against what DALI decodes; falls back to a RuntimeError
    carrying DALI's message when every candidate is fine.
    """
    hint = "`byol-fast check-data DIR` lists every such file in a tree"
    for path in candidates:
        check = check_file(path, min_size=0)
        if UNREADABLE in check.issues:
            detail = check.detail if "check-data" in check.detail else f"{check.detail}; {hint}"
            return DataError(f"DALI could not decode {path}: {detail}")
        image_format = probe_image(path).format
        if image_format not in _DALI_FORMATS:
            return DataError(f"{path} is a {image_format} image, which DALI's decoder does not read: convert it "
                             f"to JPEG or PNG; {hint}")
    return RuntimeError(f"the DALI pipeline failed, yet the {len(candidates)} images of the batches in flight all "
                        f"decode with PIL, so the data is probably not the cause. DALI said:\n{err}")
