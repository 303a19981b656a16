"""Ctrl-C and SIGTERM as one policy: a run stops where it can stop cleanly, and says so in one line.

* While the process starts (torch and transformers take seconds to import) a signal ends it at once
  with one line: nothing has been written yet (``quiet_until_main``).
* During set-up and the final save, SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does, so the
  caller's clean-up runs; every file write is atomic, so nothing is left half-written.
* Inside the training loop (``Interrupts.deferred``) a signal only sets ``requested``: the loop finishes
  the step it is in (θ is perturbed in the middle of one), writes a checkpoint and raises
  ``Interrupted``. A second signal raises at once, for a step that takes too long.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The loop stopped at a step boundary after a signal; ``step`` is the step its checkpoint holds."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


def exit_code(signum: int | None) -> int:
    """128 + the signal number, the shell's convention (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (signum or signal.SIGINT)


def quiet_until_main() -> None:
    """For ``python -m``: a signal before ``main`` runs (imports) exits with one line, no traceback."""

    def handler(signum, frame):
        print(f"\ninterrupted ({signal.Signals(signum).name}) while starting; nothing was written", file=sys.stderr)
        os._exit(exit_code(signum))

    for sig in SIGNALS:
        signal.signal(sig, handler)


class Interrupts:
    """The signal policy of one ``main`` (see the module docstring); ``signum`` is the last signal seen."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.requested = False
        self._deferring = False

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if self._deferring and not self.requested:
            self.requested = True  # the loop checks this at the end of the step
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Route SIGINT and SIGTERM to this object for the ``with`` body (main thread only)."""
        if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def deferred(self) -> Iterator[Interrupts]:
        """Inside: a first signal sets ``requested`` instead of raising."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
