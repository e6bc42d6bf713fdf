"""One BYOL training step, eager on CPU and captured as a single CUDA graph on GPU.

The step does, in order: both views through the online and target networks, the
symmetric loss, backward, the gradient all-reduce, LARS or AdamW, the EMA of the target,
and on-device metric accumulation. It reads nothing back to the host.

CUDA graph mode (torchtitan-style wrapper):
  * inputs live in static buffers (`TrainStep.inputs`); `__call__` copies new
    views into them unless a pipeline already wrote there (pass the buffers
    themselves, or `None`), and replays the graph;
  * the first `warmup_steps` calls run eagerly on a side stream (DDP/NCCL and
    cuDNN need real iterations before capture, and allocator state settles);
    they are real training steps, not thrown away;
  * everything that changes between steps (lr, tau, step index) lives in device
    tensors updated in place, so the graph never needs recapturing;
  * metric tensors alias graph memory: read them only through `read_metrics()`.

Gradients are views into one flat buffer: zeroing is one kernel and the
all-reduce is one collective. Do not call `optimizer.zero_grad()` on the
optimizer given to a TrainStep; that would detach `.grad` from the buffer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

from byol_fast.adamw import AdamW
from byol_fast.lars import LARS
from byol_fast.model import BYOL
from pipelines.device import concrete_device

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def attach_flat_gradients(params: list[Tensor]) -> Tensor:
    """Makes every `param.grad` a view into one zeroed buffer, with the param's own strides."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"trainable parameters must share one dtype (fp32 master weights), got {dtypes}")
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for param in params:
        # as_strided keeps channels_last conv weights' grads in the weights' layout.
        param.grad = flat.as_strided(param.shape, param.stride(), offset)
        offset += param.numel()
    return flat


class TrainStep:
    """A callable that performs one optimizer step of BYOL on a static-shape batch.

    Args:
        learner: the BYOL module, already on `device` (and SyncBatchNorm-converted
            when distributed).
        optimizer: LARS or AdamW (byol_fast.optimizers: fused, lr a device tensor) over
            `learner.trainable_parameters()`, built after the move.
        batch_size: images per rank per optimizer step (each of the two views).
        image_size: side of the square views.
        device: where the step runs.
        precision: "bf16" (autocast, default), "fp16" (autocast with a loss scaler;
            eager only, the scaler reads overflow flags on the host) or "fp32".
        channels_last: convert the learner and inputs to channels_last.
        cuda_graph: capture the step in a CUDA graph after `warmup_steps` calls.
        compile: run the learner's forward through `torch.compile`.
        accumulation_steps: split the batch into this many micro-batches whose
            gradients add up before one optimizer step (BatchNorm statistics are
            then per micro-batch).
        warmup_steps: eager steps before capture.
    """

    def __init__(
        self,
        learner: BYOL,
        optimizer: LARS | AdamW,
        *,
        batch_size: int,
        image_size: int,
        device: torch.device | str,
        precision: str = "bf16",
        channels_last: bool = True,
        cuda_graph: bool = False,
        compile: bool = False,
        accumulation_steps: int = 1,
        warmup_steps: int = 3,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        device = concrete_device(device)
        _validate(precision, device, cuda_graph, batch_size, accumulation_steps, warmup_steps)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if any(p.device != device for p in params) or any(g["lr"].device != device for g in optimizer.param_groups):
            raise ValueError(f"move the learner to {device} before building the optimizer and the TrainStep")
        self.learner = learner
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.device = device
        self.precision = precision
        self.input_dtype = PRECISIONS[precision] if device.type == "cuda" else torch.float32
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self.process_group = process_group
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        learner.to(memory_format=memory_format)
        self.inputs = tuple(
            torch.zeros(batch_size, 3, image_size, image_size, dtype=self.input_dtype, device=device)
            .contiguous(memory_format=memory_format)
            for _ in range(2)
        )
        self._flat_grads = attach_flat_gradients(params)
        self._forward = torch.compile(learner) if compile else learner
        self._scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        # On-device metrics: summed loss, steps since the last read, global step
        # index, and the index of the first non-finite loss (-1: none yet).
        self._loss_sum = torch.zeros((), device=device)
        self._steps_since_read = torch.zeros((), dtype=torch.int64, device=device)
        self._step_index = torch.zeros((), dtype=torch.int64, device=device)
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=device)
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._side_stream = torch.cuda.Stream(device) if cuda_graph else None

    def __call__(self, view1: Tensor | None = None, view2: Tensor | None = None) -> None:
        for buffer, view in zip(self.inputs, (view1, view2)):
            if view is not None and view is not buffer:
                buffer.copy_(view, non_blocking=True)
        if not self.cuda_graph:
            self._step()
        elif self._graph is not None:
            self._graph.replay()
        elif self._calls < self.warmup_steps:
            self._run_on_side_stream(self._step)
        else:
            self._capture()
            self._graph.replay()
        self._calls += 1

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # The autocast weight cache must be off under graph capture: cached casts
        # would be graph-private tensors reused outside the graph.
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], cache_enabled=not self.cuda_graph)

    def _step(self) -> None:
        self._flat_grads.zero_()
        micro = self.batch_size // self.accumulation_steps
        step_loss = torch.zeros((), device=self.device)
        for start in range(0, self.batch_size, micro):
            view1 = self.inputs[0][start:start + micro]
            view2 = self.inputs[1][start:start + micro]
            with self._autocast():
                loss = self._forward(view1, view2)
            scaled = loss / self.accumulation_steps
            (self._scaler.scale(scaled) if self._scaler else scaled).backward()
            step_loss += loss.detach().float()
        step_loss /= self.accumulation_steps
        self._all_reduce_gradients()
        stepped = True
        if self._scaler:
            scale = self._scaler.get_scale()  # sync: fp16 runs eagerly, its scaler reads flags on the host
            self._scaler.step(self.optimizer)
            self._scaler.update()
            # The scale drops exactly when inf/NaN gradients made the scaler skip the optimizer step; the
            # target must not move toward weights that did not change.
            stepped = self._scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        if stepped:
            self.learner.update_target()
        self._accumulate_metrics(step_loss)

    def _all_reduce_gradients(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        world_size = dist.get_world_size(self.process_group)
        if world_size > 1:
            # SUM then scale: gloo has no AVG. Each rank's loss is a mean over its
            # shard, so the average of the gradients is the global-batch gradient.
            dist.all_reduce(self._flat_grads, group=self.process_group)
            self._flat_grads.mul_(1.0 / world_size)

    def _accumulate_metrics(self, step_loss: Tensor) -> None:
        self._step_index += 1
        self._steps_since_read += 1
        self._loss_sum += step_loss
        first_bad = (self._first_nonfinite < 0) & ~torch.isfinite(step_loss)
        self._first_nonfinite.copy_(torch.where(first_bad, self._step_index - 1, self._first_nonfinite))

    def _run_on_side_stream(self, fn) -> None:
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side_stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(self._side_stream)

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)  # sync: once, before capture
        self._graph = torch.cuda.CUDAGraph()
        # thread_local: data-loader threads (pin-memory, DALI, FFCV) keep making CUDA calls while
        # this thread captures; "global" mode would turn those into capture errors.
        with torch.cuda.graph(self._graph, stream=self._side_stream, capture_error_mode="thread_local"):
            self._step()

    def read_metrics(self) -> dict[str, float | int | None]:
        """Mean loss and step count since the last read, and the first non-finite step.

        This is the one host-device sync of the loop: call it every `log_every` steps.
        """
        loss_sum, steps, first_bad = torch.stack(
            [self._loss_sum, self._steps_since_read.float(), self._first_nonfinite.float()]
        ).tolist()  # sync
        self._loss_sum.zero_()
        self._steps_since_read.zero_()
        return {
            "loss": loss_sum / steps if steps else float("nan"),
            "steps": int(steps),
            "first_nonfinite_step": None if first_bad < 0 else int(first_bad),
        }

    @property
    def warm(self) -> bool:
        """Whether the one-off work is done (cuDNN autotuning and compilation in the first call, the graph's
        capture after `warmup_steps` calls), so later calls run at steady speed."""
        return self._graph is not None if self.cuda_graph else self._calls > 0

    @property
    def step_index(self) -> Tensor:
        """The global step counter (device tensor; aliases graph memory)."""
        return self._step_index

    def state_dict(self) -> dict:
        """Step counters, and the fp16 loss scale (a resume must not start over at 65536 and skip steps)."""
        state = {"step": int(self._step_index.item()), "first_nonfinite_step": int(self._first_nonfinite.item())}
        if self._scaler:
            state["grad_scaler"] = self._scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._step_index.fill_(int(state["step"]))
        self._first_nonfinite.fill_(int(state.get("first_nonfinite_step", -1)))
        if self._scaler and "grad_scaler" in state:
            self._scaler.load_state_dict(state["grad_scaler"])


def _validate(precision: str, device: torch.device, cuda_graph: bool, batch_size: int,
              accumulation_steps: int, warmup_steps: int) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"a CUDA graph needs a CUDA device, got {device}: pass --no-cuda-graph on {device.type}")
    if cuda_graph and precision == "fp16":
        raise ValueError("fp16 loss scaling reads overflow flags on the host and cannot be graph-captured: "
                         "use precision bf16 (no scaler needed) or --no-cuda-graph")
    if accumulation_steps < 1 or batch_size % accumulation_steps:
        raise ValueError(f"batch_size={batch_size} must split into accumulation_steps={accumulation_steps} "
                         "equal micro-batches: pick a divisor of the batch size")
    if warmup_steps < 1 and cuda_graph:
        raise ValueError("a CUDA graph needs at least one eager warm-up step before capture (warmup_steps >= 1)")
