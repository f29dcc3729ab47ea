"""Stop requests from the outside world: a scheduler's SIGTERM, a terminal's Ctrl-C, SLURM's warning signal.

The first SIGTERM, SIGINT or SIGUSR1 sets a flag; the loop reads it with the step's one host sync,
saves a complete checkpoint at the end of that step and exits with ``exit_code``. A second
SIGTERM or SIGINT (a step stuck on data, say) stops at once, as without the handler: the newest
complete checkpoint stays intact, because a checkpoint counts only once its marker is written
(see ``gfm_fast.run_dir``). DataLoader workers ignore these signals (``gfm_fast.data``): the
main process owns the shutdown.
"""
from __future__ import annotations

import signal
from typing import Dict, Optional

__all__ = ["StopRequest", "STOP_SIGNALS", "REQUEUE_EXIT_CODE"]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
# SIGUSR1 (SLURM's ``--signal=B:USR1@120`` before the time limit): saved, stopped and worth
# requeueing. 128 + SIGUSR1 (138 on Linux), as a shell reports a process killed by it.
REQUEUE_EXIT_CODE = 128 + int(getattr(signal, "SIGUSR1", 10))


class StopRequest:
    """Turns stop signals into a flag the training loop polls (main thread only)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum != getattr(signal, "SIGUSR1", None):
            self.restore()  # asked twice: stop now, as without us
            signal.raise_signal(signum)
            return
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_code(self, signum: Optional[int] = None) -> int:
        """The shell's code for the signal: 143 (SIGTERM), 130 (SIGINT), 138 (SIGUSR1)."""
        return 128 + int(signum or self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
