"""Data-loading worker processes leave stop signals to the trainer.

A scheduler stops a job by signalling all of its processes: `timeout`, Slurm's
scancel and preemption, `kill -- -PGID` and torchrun (which signals each
worker's process group) reach the DataLoader worker processes too. A worker
that dies of that SIGTERM takes the run with it (the main process fails with
"DataLoader worker ... is killed by signal: Terminated") before the trainer can
save a checkpoint. So a worker ignores SIGTERM and SIGINT from anyone but its
parent, the process that owns it: the trainer notices the signal, finishes its
step, saves a checkpoint and shuts its workers down through the DataLoader.

A signal from the parent still ends the worker at once, as PyTorch's own
handler does: the DataLoader's last-resort `terminate()` and multiprocessing's
clean-up at exit rely on it (a worker ignoring those would hang the exit).
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def leave_stop_signals_to_parent(worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: from now on only the parent process can stop this one by signal.

    The signals are blocked in this thread (threads started later inherit that) and taken by a watcher
    thread, which sees who sent each one (`sigwaitinfo`); a Python handler could not tell the parent's
    terminate() from a scheduler's signal.
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_exit_when_parent_signals, args=(parent,), daemon=True,
                     name="byol-stop-signals").start()


def _exit_when_parent_signals(parent: int) -> None:
    while True:
        received = signal.sigwaitinfo(STOP_SIGNALS)
        if received.si_pid == parent:
            os._exit(0)  # as PyTorch's worker handler does for its parent's SIGTERM: nothing to flush
