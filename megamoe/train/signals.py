"""Graceful stop on SIGTERM / SIGUSR1 (preemptible SLURM jobs, ``scancel --signal``).

The handler only sets a flag; the trainer finishes the current optimizer step, saves a
checkpoint and exits 0. Ranks may receive the signal at different steps (or only rank 0
may get it from a launcher), so the flag is OR-reduced over all ranks each step before
anyone acts on it: every rank stops after the same step.
"""

from __future__ import annotations

import signal

from megamoe import comm


class StopFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.local = False
        self.signum = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.local, self.signum = True, signum

    def any_rank(self) -> bool:
        """Collective: True when any rank has received a stop signal."""
        return comm.any_rank(self.local)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
