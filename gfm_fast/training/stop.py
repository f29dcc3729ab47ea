"""Stop requests from the outside world: a scheduler's SIGTERM, a terminal's Ctrl-C, SLURM's warning signal.

The first SIGTERM, SIGINT or SIGUSR1 sets ``signum``; the loop reads it with the step's one host
sync, saves a complete checkpoint at the end of that step and exits with 128 + the signal's number. A second
SIGTERM or SIGINT (a step stuck on data, say) stops at once, as without the handler: the newest
complete checkpoint stays intact, because a checkpoint counts only once its marker is written
(see ``gfm_fast.run_dir``). A SIGTERM within ``LAUNCHER_ECHO_S`` of the first signal is the same
request delivered twice, not a second one: DeepSpeed's launcher answers a signal to the process
group (Ctrl-C, a scheduler) by sending its trainers SIGTERM, milliseconds after they got the
group's signal themselves. DataLoader workers ignore these signals (``gfm_fast.data``): the
main process owns the shutdown.
"""
from __future__ import annotations

import signal
import time
from typing import Dict, Optional

__all__ = ["StopRequest", "STOP_SIGNALS"]

# SIGUSR1: SLURM's warning before the time limit (``--signal=B:USR1@120``, docs/scaling.md); the
# run exits with 138 (128 + 10), which a batch script tests to requeue the job.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
LAUNCHER_ECHO_S = 2.0


class StopRequest:
    """Turns stop signals into a flag the training loop polls (main thread only)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif signum == signal.SIGTERM and time.monotonic() - self._first_at < LAUNCHER_ECHO_S:
            pass  # the launcher forwarding the signal its process group already got
        elif signum != getattr(signal, "SIGUSR1", None):
            self.restore()  # asked twice: stop now, as without us
            signal.raise_signal(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
