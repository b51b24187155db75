"""Graceful stops: SIGINT (Ctrl-C), SIGTERM (how clusters pre-empt jobs) and SIGUSR1 (SLURM's warning before a
time limit, ``--signal=USR1@120``) end training at a step boundary with a checkpoint, instead of an exception
somewhere inside a step."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from typing_extensions import Self

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal number
    (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1), as a shell reports a process ended by that signal."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = 128 + signal.Signals[signal_name].value


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGUSR1 set :attr:`signal_name` (and :attr:`stop_requested`) instead of
    raising; a SIGINT after a stop was requested (a second Ctrl-C) raises ``KeyboardInterrupt`` at once.
    Handlers are restored on exit. Outside the main thread, where Python cannot install handlers, it does
    nothing. Start helper processes (data loader workers) inside :meth:`shield_children`, so that a signal sent
    to the whole process group (Ctrl-C in a terminal, Slurm's SIGTERM to every process of a job) does not kill
    them mid-step; they are ended when the ``with`` block ends.

    :meth:`should_stop` turns the per-process flag into one decision shared by all ranks. Under torchrun every
    rank gets the signal, but not at the same instant, so ranks must agree on the step to stop at or the
    next collective would hang. They agree by a MAX all-reduce of the flag, done only every ``check_every``
    optimizer steps (``train.log_every``): the ranks count steps identically, so they all join the same
    reductions, and the cost is one tiny collective every ``check_every`` steps instead of a sync per step.
    A stop therefore lands up to ``check_every - 1`` steps after the signal; lower ``train.log_every`` when a
    scheduler's grace period is shorter than that. A single process checks its flag after every step.
    """

    def __init__(self, check_every: int = 1, device: torch.device | str = "cpu"):
        self.check_every = check_every
        self.device = torch.device(device)
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._children: list[multiprocessing.Process] = []

    @property
    def stop_requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.stop_requested:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        self._end_children()

    def _end_children(self) -> None:
        """Kill the processes started in :meth:`shield_children` (training is over: they only prefetch). They
        block the stop signals, so neither torch's loader (after a worker raised) nor Python's exit (persistent
        workers of a loader still referenced) can end them with SIGTERM, and the exit would wait on them
        forever. torch's SIGCHLD handler is set aside until they are reaped, so it does not report the kill
        in place of the error that ended training."""
        if not self._children:
            return
        main = threading.current_thread() is threading.main_thread()
        watch = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
        try:
            for child in self._children:
                child.kill()
            for child in self._children:
                child.join()
        finally:
            if main:
                signal.signal(signal.SIGCHLD, watch)
            self._children = []

    @contextlib.contextmanager
    def shield_children(self):
        """Block the stop signals while processes are forked: children inherit the blocked mask and leave
        stopping to this process (torch's loader workers would otherwise die of SIGTERM and fail the step).
        Signals that arrive meanwhile are delivered here when the block ends. The children are killed when
        this object's ``with`` block ends."""
        if not hasattr(signal, "pthread_sigmask"):
            yield
            return
        before = set(multiprocessing.active_children())
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            self._children = [child for child in multiprocessing.active_children() if child not in before]

    def should_stop(self, step: int | None = None) -> bool:
        """Whether to stop after optimizer step ``step``: the same answer on every rank. Distributed, the ranks
        reduce their flags when ``step`` is a multiple of ``check_every`` or None (now; every rank must then
        call it at the same point) and otherwise answer False."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.stop_requested
        if step is not None and step % self.check_every:
            return False
        signum = torch.tensor([signal.Signals[self.signal_name].value if self.signal_name else 0],
                              device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)  # every rank then reports the same signal
        agreed = int(signum.item())
        if agreed:
            self.signal_name = signal.Signals(agreed).name
        return bool(agreed)
