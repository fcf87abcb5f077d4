"""Preemption and interruption signals and the documented exit codes of the ``invnet`` command.

SIGTERM and SIGUSR1 (a batch system's notice) and SIGINT (Ctrl-C) are handled alike: the trainer
finishes the current step, writes a checkpoint and stops. A second Ctrl-C stops at once
(``KeyboardInterrupt``; every file invnet writes is atomic, so nothing is left half-written).
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

__all__ = [
    "EXIT_OK", "EXIT_USAGE", "EXIT_PREEMPTED", "EXIT_NONFINITE", "EXIT_DRIFT", "EXIT_INTERRUPTED", "PreemptionFlag",
    "NonFiniteLossError", "PreemptedError", "exit_code_for_signal",
]

#: training finished (or another command succeeded)
EXIT_OK = 0
#: bad command line, configuration or data (nothing was trained)
EXIT_USAGE = 2
#: SIGTERM/SIGUSR1 received: a checkpoint was written and the run stopped; rerun the same command to resume
#: (75 is EX_TEMPFAIL of sysexits.h, "try again later")
EXIT_PREEMPTED = 75
#: the loss became NaN or Inf: training stopped, the last good checkpoint is kept
EXIT_NONFINITE = 65
#: the reconstruction drift of the memory-free backward rose above the stop threshold
#: (``[training] drift_fail_above``): its gradients cannot be trusted; training stopped before the
#: update, the last good checkpoint is kept (70 is EX_SOFTWARE of sysexits.h: the computation, not
#: the input, went wrong)
EXIT_DRIFT = 70
#: Ctrl-C (SIGINT): training wrote a checkpoint and stopped (rerun to resume); 130 = 128 + SIGINT, the shell's code
EXIT_INTERRUPTED = 130


def exit_code_for_signal(name: str) -> int:
    """The exit code of a run stopped by signal ``name`` after writing a checkpoint.

    >>> exit_code_for_signal("SIGINT"), exit_code_for_signal("SIGTERM")
    (130, 75)
    """
    return EXIT_INTERRUPTED if name == "SIGINT" else EXIT_PREEMPTED


class NonFiniteLossError(RuntimeError):
    """The training loss (or gradient norm) became NaN or Inf."""


class PreemptedError(RuntimeError):
    """A preemption signal arrived while nothing could be checkpointed yet (during setup);
    ``signal`` is its name."""

    def __init__(self, message: str, signal: str) -> None:
        super().__init__(message)
        self.signal = signal


class PreemptionFlag:
    """Sets a flag when one of ``signals`` arrives (batch systems send SIGTERM or SIGUSR1 some time
    before killing a job; a user presses Ctrl-C); the trainer polls it between steps, writes a
    checkpoint and stops. A second SIGINT raises ``KeyboardInterrupt`` at once (the user insists).
    Use as a context manager: previous handlers come back on exit. With ``raise_on_signal`` the
    handler raises :class:`PreemptedError` instead (for phases with nothing to checkpoint).

    >>> import os, signal
    >>> with PreemptionFlag() as flag:
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     flag.received
    'SIGUSR1'
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT),
                 raise_on_signal: bool = False) -> None:
        self.signals = signals
        self.raise_on_signal = raise_on_signal
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":  # Ctrl-C twice: stop now, not after the step
            raise KeyboardInterrupt
        self.received = name
        if self.raise_on_signal:  # setup: nothing to save, stop at once instead of at the first step
            raise PreemptedError(f"received {name} before training started", name)

    def __enter__(self) -> PreemptionFlag:
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers only in the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
