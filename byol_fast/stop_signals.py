"""How the trainer stops on a signal: SIGTERM (schedulers, `timeout`, torchrun) and SIGINT (Ctrl-C).

However the signal arrives (to the main process alone, to the whole process
group, or forwarded by torchrun), the data-loading workers leave it to the main
process (pipelines/worker_signals.py) and `StopSignals` records it: the loop
finishes its step, saves a checkpoint and exits with `exit_code()`.

The first signal is acknowledged at once, whatever the loop is doing (a long step,
a kNN pass), with what will happen next. Repeats are explained, not acted on: a
Ctrl-C under torchrun or Slurm reaches a rank twice (from the terminal or the
scheduler, and forwarded), so a repeat cannot mean "quit now"; SIGKILL does that.
"""

from __future__ import annotations

import os
import re
import signal
import threading

EXIT_OK, EXIT_INTERRUPTED = 0, 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records SIGTERM/SIGINT instead of dying, so the loop can save a checkpoint at a step boundary.

    `announce`: write the acknowledgements (rank 0 only, so a multi-rank job prints them once).
    The trainer keeps `activity` up to date ("finishing step 12", "saving the step-12 checkpoint") so the
    messages can say what the run is busy with when the signal lands.
    """

    def __init__(self, announce: bool = True) -> None:
        self.received: int | None = None
        self.activity = "starting"
        self.announce = announce
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.received is not None

    def exit_code(self) -> int:
        """0 after SIGTERM (a preempted job counts as a clean stop, so its resubmission resumes), 130 after SIGINT."""
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_OK

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            message = (f"{name} received while {self.activity}: the run stops at the end of the current step, "
                       f"saves a checkpoint and exits with code {self.exit_code()}; the same command resumes it. "
                       f"Repeating the signal does not hurry this; to quit at once, losing the work since the last "
                       f"checkpoint, send SIGKILL (kill -9 {os.getpid()}).")
        else:
            message = (f"{name} again: already stopping, now {self.activity}; the run exits once its checkpoint is "
                       f"saved. To quit at once, losing that checkpoint: kill -9 {os.getpid()}.")
        if self.announce:
            # Straight to fd 2: a print() to sys.stderr can fail ("reentrant call") when the signal lands
            # inside another write to it, and os.write is unbuffered, so the line shows at once.
            os.write(2, f"\nbyol-fast train: {message}\n".encode())

    def restore(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# PyTorch's DataLoader raises a plain RuntimeError when a worker process dies; its message is all there is:
# "DataLoader worker (pid 123) is killed by signal: Killed." or "... exited unexpectedly ...".
_WORKER_DIED = re.compile(r"DataLoader worker \(pid")
_KILLED_BY = re.compile(r"killed by signal: ([^.]+)")


def describe_worker_death(error: BaseException, workers: int) -> str | None:
    """The cause of a data-loading worker's death and what to do, when `error` reports one; else None."""
    text = str(error).strip()
    if not _WORKER_DIED.search(text):
        return None
    killed_by = _KILLED_BY.search(text)
    if killed_by is None:
        cause = "rerun with --workers 0 to see its error in the main process"
    elif killed_by.group(1) == "Killed":
        cause = (f"SIGKILL is what the kernel's out-of-memory killer sends (`dmesg` says so): give the job more "
                 f"memory or lower --workers (now {workers})")
    else:
        cause = ("a stop signal would not do this (workers leave SIGTERM and SIGINT to the trainer): look for what "
                 "sent it")
    return f"a data-loading worker process died ({text}); {cause}"
