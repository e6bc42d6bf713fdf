"""BYOL two-view batches with torch alone: torchvision.io decode (nvjpeg on CUDA), exact crops, batched colour.

Per batch: worker threads read the file bytes (and, on CPU, decode them) one
batch ahead; on CUDA the JPEGs are decoded together by nvjpeg
(`torchvision.io.decode_jpeg(..., device="cuda")`), also a batch ahead, in a
decode thread on a side stream: torchvision's host sync around nvjpeg holds
that thread, and the caller's stream waits for the decode on the device, so
the thread that launches the training step is never held. Each image is cropped twice
on its device with boxes from `torch_aug.sample_crop_boxes` (drawn on the host,
so slicing needs no sync) and each crop is resized to S x S by two banded
resamples with `torch_aug.resize_taps` (the recipe's resampling:
reference.resize up to float32 rounding), the first reading the crop's rows
where the decoder wrote them (channels last, no copy of the window). The batched colour stage (`TorchTwoViewAugment.colour`: flip, jitter,
grayscale, blur, solarize, normalize) then writes each view, optionally straight
into the caller's static buffers.

Files whose bytes are not a 1- or 3-channel JPEG (PNG inside .JPEG, CMYK
JPEGs) are decoded on the CPU by torchvision, then by PIL (`decode.decode_rgb`)
if torchvision cannot; a file neither can decode raises CorruptImageError
naming it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from pipelines.decode import decode_rgb, sniff_format
from pipelines.sources import DataError, ImageList, samples_per_rank, shard_indices
from pipelines.spec import AugmentationSpec
from pipelines.torch_aug import TorchTwoViewAugment, epoch_seeds, resample_both, resize_taps, sample_crop_boxes

# Crops whose resampling taps are built together, in a few kernels instead of ~20 per crop.
_TAPS_CHUNK = 64
# JPEG start-of-frame markers (SOF0..SOF15 minus DHT C4, JPG C8, DAC CC): their header holds the component count.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_components(data: bytes) -> int | None:
    """Colour components in a JPEG's frame header (1 gray, 3 YCbCr, 4 CMYK/YCCK), or None if not found."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            return data[pos + 9]
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def read_bytes(path: str) -> Tensor:
    """A file's bytes as a uint8 CPU tensor; DataError naming the path when it cannot be read or is empty."""
    try:
        data = read_file(path)
    except (RuntimeError, OSError) as err:
        raise DataError(f"cannot read image {path} ({err}): re-scan the data folder or fix its permissions") from err
    if data.numel() == 0:
        raise DataError(f"image {path} is empty: delete or replace it; `byol-fast check-data` lists such files")
    return data


def decode_cpu(data: Tensor, path: str) -> Tensor:
    """Decode bytes to a [3, H, W] uint8 RGB CPU tensor, channels last in memory: JPEGs with torchvision
    (libjpeg-turbo), the rest, and the JPEGs it cannot read, with PIL, which also names bad files.

    Only JPEGs go to torchvision: its PNG decoder kills the process (SIGSEGV) on some corrupt files, e.g. a
    bad IDAT checksum, instead of raising; PIL reads those pixels as `byol-fast check-data` does.
    """
    if sniff_format(data[:16].numpy().tobytes()) == "jpeg":
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # e.g. an unusual JPEG flavour: PIL reads it or names the file
    rgb = decode_rgb(data.numpy().tobytes(), path)
    # Channels last in memory, as torchvision's decoder writes it: the crops read rows of that layout.
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def _gpu_decodable(data: Tensor) -> bool:
    head = data[:64 * 1024].numpy().tobytes()
    return sniff_format(head[:16]) == "jpeg" and jpeg_components(head) in (1, 3)


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream nvjpeg decodes under, one per device (see decode_to_device)."""
    return torch.cuda.Stream(device)


def _nvjpeg_batch(datas: list[Tensor], paths: list[str], device: torch.device) -> list[Tensor]:
    """nvjpeg in one batched call; image by image if that fails, so one odd file cannot sink the batch."""
    try:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for data, path in zip(datas, paths):
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(decode_cpu(data, path).to(device))
        return decoded


def decode_async(datas: list[Tensor], paths: list[str], device: torch.device,
                 pool: ThreadPoolExecutor | None = None) -> tuple[list[Tensor], torch.cuda.Event | None]:
    """Decode a batch of file bytes to [3, H, W] uint8 RGB tensors on `device`, without touching the caller's
    stream: returns the images and, on CUDA, the event after which they are written (see `hand_over`).

    On CUDA the 1/3-channel JPEGs go to nvjpeg in one batched call (image by
    image if the batch call fails, so one odd file cannot sink the batch); the
    rest, and everything on CPU, go through `decode_cpu` (in `pool` if given).
    torchvision holds the calling thread until nvjpeg is done (it synchronizes
    with its own stream), so the pipeline calls this from its decode thread.
    """
    out: list[Tensor | None] = [None] * len(datas)
    on_gpu = [device.type == "cuda" and _gpu_decodable(d) for d in datas]
    gpu_ids = [i for i, flag in enumerate(on_gpu) if flag]
    cpu_ids = [i for i, flag in enumerate(on_gpu) if not flag]
    mapper = pool.map if pool is not None else map
    if device.type != "cuda":
        for i, image in zip(cpu_ids, mapper(decode_cpu, [datas[i] for i in cpu_ids], [paths[i] for i in cpu_ids])):
            out[i] = image
        return out, None  # type: ignore[return-value]
    # torchvision allocates nvjpeg's outputs on the current stream but writes them on its own stream
    # without waiting for ours: memory that kernels still queued on our stream read or write (the
    # host runs ahead of the GPU) could be handed to nvjpeg and overwritten. Decoding under a stream
    # of our own draws the outputs from that stream's pool, which ours never frees into.
    decoder = _decode_stream(device)
    with torch.cuda.stream(decoder):
        if gpu_ids:
            decoded = _nvjpeg_batch([datas[i] for i in gpu_ids], [paths[i] for i in gpu_ids], device)
            for i, image in zip(gpu_ids, decoded):
                out[i] = image
        for i, image in zip(cpu_ids, mapper(decode_cpu, [datas[i] for i in cpu_ids], [paths[i] for i in cpu_ids])):
            out[i] = image.to(device)
        written = torch.cuda.Event()
        written.record(decoder)
    return out, written  # type: ignore[return-value]


def hand_over(images: list[Tensor], written: torch.cuda.Event | None, device: torch.device) -> list[Tensor]:
    """Gives `decode_async`'s images to the calling thread's current stream: that stream waits for `written` on
    the device (the host does not wait), and the images' memory is not reused before its queued work is done."""
    if written is not None:
        consumer = torch.cuda.current_stream(device)
        consumer.wait_event(written)
        for image in images:
            image.record_stream(consumer)
    return images


def decode_to_device(datas: list[Tensor], paths: list[str], device: torch.device,
                     pool: ThreadPoolExecutor | None = None) -> list[Tensor]:
    """`decode_async` for use on the calling thread's current stream (see `hand_over`)."""
    return hand_over(*decode_async(datas, paths, device, pool), device)


class TorchImagePipeline:
    """Two augmented views per image of an ImageList, per rank and epoch, on `device`.

    Yields (view1, view2, labels): views (B, 3, S, S) channels_last,
    normalized, in `dtype` on `device` (the DESIGN data contract), labels
    int64 (B,) on `device`. The rank's share of each epoch comes from
    `sources.shard_indices` (same permutation on every rank, reshuffled per
    epoch, last partial batch dropped when drop_last). Results are a function
    of (seed, epoch, rank) on a given device.
    """

    def __init__(self, images: ImageList, spec: AugmentationSpec, batch_size: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_threads: int = 4) -> None:
        if batch_size < 1 or num_threads < 1:
            raise ValueError(f"batch_size={batch_size} and num_threads={num_threads} must be >= 1")
        self.images, self.spec, self.batch_size = images, spec, batch_size
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        # Fail now, not at the first batch, when there are too few images for a full batch per rank.
        self._indices(0)
        self.augment = TorchTwoViewAugment(spec, self.device, dtype)
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="byol-read")
        # One thread decodes each batch (in order) while the caller works on the one before: nvjpeg's host
        # sync then holds this thread, not the one that launches the training step.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="byol-decode")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        count = samples_per_rank(len(self.images), self.world_size, self.batch_size, self.drop_last, self.rank)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch `iter(self)` reads (its shuffle and its random augmentations)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.batches(self.epoch)

    def close(self) -> None:
        """Stop the reader and decode threads."""
        self._decoder.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def _indices(self, epoch: int) -> np.ndarray:
        return shard_indices(len(self.images), self.rank, self.world_size, epoch, self.seed,
                             shuffle=self.shuffle, drop_last=self.drop_last, batch_size=self.batch_size)

    def _read(self, path: str) -> Tensor:
        """One file's bytes, decoded too when the device is the CPU (runs in a worker thread)."""
        data = read_bytes(path)
        return data if self.device.type == "cuda" else decode_cpu(data, path)

    def _load(self, paths: list[str]) -> Future:
        """Start reading a batch in the worker threads (one task per file; on CPU they decode too) and decoding
        it in the decode thread; the future holds `decode_async`'s (images, event)."""
        reads = [self._pool.submit(self._read, path) for path in paths]
        return self._decoder.submit(self._decode_ahead, reads, paths)

    def _decode_ahead(self, reads: list[Future], paths: list[str]) -> tuple[list[Tensor], torch.cuda.Event | None]:
        """In the decode thread: a batch's bytes, decoded on the device's decode stream (CUDA) or as read (CPU)."""
        loaded = [future.result() for future in reads]
        if self.device.type != "cuda":
            return loaded, None  # the read threads decoded them
        return decode_async(loaded, paths, self.device, self._pool)

    def batches(self, epoch: int, out: tuple[Tensor, Tensor] | None = None
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Iterate epoch `epoch`; with out=(buf1, buf2) every batch is written into those buffers.

        The buffers must be (B, 3, S, S) in the pipeline's dtype on its device;
        the yielded views are then the buffers themselves (overwritten next step).
        """
        indices = self._indices(epoch)
        chunks = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        crop_seed, colour_seed = epoch_seeds(self.seed, epoch, self.rank)
        box_generator = torch.Generator().manual_seed(crop_seed)
        colour_generator = torch.Generator(device=self.device).manual_seed(colour_seed)
        pending = self._load([self.images.files[i] for i in chunks[0]]) if chunks else None
        for step, chunk in enumerate(chunks):
            decoded = hand_over(*pending.result(), self.device)  # no host sync: the stream waits on the event
            if step + 1 < len(chunks):
                pending = self._load([self.images.files[i] for i in chunks[step + 1]])
            crops = self._crop_pairs(decoded, box_generator)
            targets = out if out is not None and len(chunk) == self.batch_size else (None, None)
            view1, view2 = (self.augment.colour(crops[v], v, colour_generator, out=targets[v]) for v in (0, 1))
            labels = torch.tensor([self.images.labels[i] for i in chunk], dtype=torch.int64)
            if self.device.type == "cuda":
                labels = labels.pin_memory().to(self.device, non_blocking=True)
            yield view1, view2, labels

    def _crop_pairs(self, decoded: list[Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two random resized crops of every image, [B, 3, S, S] float in [0, 1] each.

        Boxes are drawn on the host (image sizes are known there), so slicing
        is plain indexing. The resampling taps of all crops are built in a few
        batched kernels (torch_aug.resize_taps, in chunks so that the tap count
        follows the chunk's longest side), then each crop is resampled along
        its rows and its columns (torch_aug.resample_both) into the batch.
        """
        spec, batch = self.spec, len(decoded)
        heights = torch.tensor([image.shape[-2] for image in decoded])
        widths = torch.tensor([image.shape[-1] for image in decoded])
        boxes = [sample_crop_boxes(heights, widths, view, generator, spec.recipe).int() for view in spec.views]
        crops = torch.empty(2, batch, 3, spec.image_size, spec.image_size, device=self.device)
        for first in range(0, batch, _TAPS_CHUNK):
            chunk = [box[first:first + _TAPS_CHUNK] for box in boxes]
            sides = torch.cat(chunk)[:, 2:]  # [2 * chunk, 2] (h, w): view 1's crops, then view 2's
            rows, cols = (self._taps(sides[:, axis]) for axis in (0, 1))
            rows[1].mul_(1.0 / 255)  # uint8 levels to [0, 1], folded into the first pass's weights
            # One [1, S, T] view per crop, split off in one op each: view 1's crops, then view 2's.
            row_taps, col_taps = (list(zip(*(part.split(1) for part in taps))) for taps in (rows, cols))
            count = len(chunk[0])
            for v in (0, 1):
                for j, (top, left, h, w) in enumerate(chunk[v].tolist()):
                    # uint8, channels last: torchvision's CPU decoder writes that layout, so this is a view.
                    window = decoded[first + j].permute(1, 2, 0)[None, top:top + h, left:left + w]
                    resized = resample_both(window, row_taps[v * count + j], col_taps[v * count + j])
                    crops[v, first + j] = resized[0].permute(2, 0, 1)
        # Bicubic overshoots [0, 1]; both recipes clip it.
        crops.clamp_(0, 1)
        return crops[0], crops[1]

    def _taps(self, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """resize_taps of windows of these lengths starting at 0, on the device (no host sync)."""
        longest = int(lengths.max())
        lengths = lengths.to(torch.float32)
        if self.device.type == "cuda":
            lengths = lengths.pin_memory().to(self.device, non_blocking=True)
        return resize_taps(torch.zeros_like(lengths), lengths, self.spec.image_size, self.spec.interpolation,
                           self.spec.antialias, longest)
