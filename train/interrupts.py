"""Stop requests for the training loop: the first Ctrl-C or SIGTERM asks it to stop at the next step boundary, where
the state, the metrics log and the checkpoints agree; a second one stops at once.

An exception raised by a signal handler lands wherever Python happens to be: inside XLA's compilation (which can
crash the process), inside a garbage-collection callback (where Python drops it and the run carries on), or between
a donated step and its bookkeeping (the state of a step whose record was never written). Recording the first signal
and acting on it between steps avoids all three; the second keeps an impatient user's way out.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop request), raised like Ctrl-C's KeyboardInterrupt so training stops the
    same way (train.main turns it into exit code 143)."""


def stop_exception(signum: int) -> KeyboardInterrupt:
    """The exception a stop by signal `signum` raises: Terminated for SIGTERM, else KeyboardInterrupt."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class StopRequests:
    """While `installed()` (in the main thread; elsewhere nothing changes), SIGINT and SIGTERM are recorded, not
    raised: `check()` raises the first one's exception at a point of the caller's choosing. A second signal raises
    at once."""

    def __init__(self, say=None):
        self.signals: list[int] = []
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))

    def _handle(self, signum, frame) -> None:
        if self.signals:
            raise stop_exception(signum)
        self.signals.append(signum)
        self.say(f"{signal.Signals(signum).name}: stopping after the current step (send it again to stop at once)")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in INTERRUPTS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def check(self) -> None:
        """Raise the first recorded signal's exception (`stop_exception`), if any."""
        if self.signals:
            raise stop_exception(self.signals[0])


@contextlib.contextmanager
def signals_held(deliver: bool = True):
    """Hold SIGINT and SIGTERM while the block runs; then deliver them to the handlers in place before, or drop them
    when `deliver` is false (the caller is stopping already). In the main thread only: elsewhere the block runs as
    it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number)) for sig in INTERRUPTS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught) if deliver else ():
            signal.raise_signal(sig)
