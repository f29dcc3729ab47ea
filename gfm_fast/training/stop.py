"""Stop requests from the outside world: a scheduler's SIGTERM, a terminal's Ctrl-C or hangup, SLURM's
warning signal.

The first SIGTERM, SIGINT, SIGUSR1 or SIGHUP sets ``signum``; the loop reads it with the step's one
host sync, saves a complete checkpoint at the end of that step and exits with 128 + the signal's
number. A second SIGTERM or SIGINT (a step stuck on data, say) stops at once, as without the
handler: the newest complete checkpoint stays intact, because a checkpoint counts only once its
marker is written (see ``gfm_fast.run_dir``). A SIGTERM within ``LAUNCHER_ECHO_S`` of the first
signal is the same request delivered twice, not a second one: DeepSpeed's launcher answers a signal
to the process group (Ctrl-C, a scheduler) by sending its trainers SIGTERM, milliseconds after they
got the group's signal themselves. DataLoader workers ignore these signals (``gfm_fast.data``): the
main process owns the shutdown.
"""
from __future__ import annotations

import os
import signal
import stat
import time
from typing import Dict, Optional

__all__ = ["StopRequest", "STOP_SIGNALS"]

# SIGUSR1: SLURM's warning before the time limit (``--signal=B:USR1@120``, docs/scaling.md); the
# run exits with 138 (128 + 10), which a batch script tests to requeue the job.
# SIGHUP: the terminal went away (a dropped SSH session); the run exits with 129. Under ``nohup``
# (SIGHUP inherited ignored) it stays ignored: the user asked the run to outlive the terminal.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
                     if hasattr(signal, name))
ESCALATING_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a second one stops at once
LAUNCHER_ECHO_S = 2.0


class StopRequest:
    """Turns stop signals into a flag the training loop polls (main thread only)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            _stop_writing_to_the_terminal()
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif signum == signal.SIGTERM and time.monotonic() - self._first_at < LAUNCHER_ECHO_S:
            pass  # the launcher forwarding the signal its process group already got
        elif signum in ESCALATING_SIGNALS:
            self.restore()  # asked twice: stop now, as without us
            signal.raise_signal(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _stop_writing_to_the_terminal() -> None:
    """After a hangup, writing to the terminal fails (EIO; to a pipe whose reader died with it,
    EPIPE) and would end the run before its checkpoint is saved. Standard output and error that
    go to a terminal or a pipe go to /dev/null from now on; a log file keeps receiving them."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                continue
            if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)
