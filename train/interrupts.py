"""Stop requests for the training loop: the first Ctrl-C or SIGTERM asks it to stop at the next step boundary, where
the state, the metrics log and the checkpoints agree; a second one stops at once.

An exception raised by a signal handler lands wherever Python happens to be: inside XLA's compilation (which can
crash the process), inside a garbage-collection callback (where Python drops it and the run carries on), or between
a donated step and its bookkeeping (the state of a step whose record was never written). Recording the first signal
and acting on it between steps avoids all three; the second keeps an impatient user's way out.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Callable

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # prctl(2) option, linux/prctl.h
_COMMAND: list[bool] = []  # set when a command-line module run as __main__ took the signals (see in_command)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop request), raised like Ctrl-C's KeyboardInterrupt so training stops the
    same way (train.main turns it into exit code 143)."""


def _swap_handlers(handler) -> dict:
    """Put `handler` in place for SIGINT and SIGTERM; returns the handlers it replaced (for `_restore_handlers`)."""
    return {sig: signal.signal(sig, handler) for sig in INTERRUPTS}


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def stop_exception(signum: int) -> KeyboardInterrupt:
    """The exception a stop by signal `signum` raises: Terminated for SIGTERM, else KeyboardInterrupt."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def say_line(line: str) -> None:
    """`line` and its newline to stderr in one write, flushed. print() writes the text and the newline separately,
    so a native thread's log (JAX's distributed service reporting a peer gone) could land between them, gluing its
    line onto ours: train.launch then saw two processes' identical error lines as different."""
    text = line + "\n"
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        data, fd = text.encode(sys.stderr.encoding or "utf-8", "backslashreplace"), sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # no file descriptor: a test's capture, an embedding host
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    while data:
        data = data[os.write(fd, data):]


class StopRequests:
    """While `installed()` (in the main thread; elsewhere nothing changes), SIGINT and SIGTERM are recorded, not
    raised: `check()` raises the first one's exception at a point of the caller's choosing. A second signal raises
    at once. One instance, STOP, serves the process: `python -m train.main` installs it before its imports load, so
    a signal during start-up is recorded too, and the training loop's own `installed()` then keeps what it holds."""

    def __init__(self, say=None):
        self.signals: list[int] = []
        self.say = say or say_line

    def _handle(self, signum, frame) -> None:
        if self.signals:
            raise stop_exception(signum)
        self.signals.append(signum)
        self.say(f"{signal.Signals(signum).name}: stopping at the end of the current step (send it again to stop "
                 f"at once)")

    def active(self) -> bool:
        """Whether this instance's handler is the one in place for SIGINT."""
        return signal.getsignal(signal.SIGINT) == self._handle

    def install(self) -> None:
        """Install the handlers for good (a command's main thread, as early as it can)."""
        if threading.current_thread() is threading.main_thread():
            self.signals.clear()
            _swap_handlers(self._handle)
            _COMMAND[:] = [True]

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the block, then the previous ones again; nested in an active install (`active`), the
        block changes nothing and keeps the signals recorded before it."""
        if threading.current_thread() is not threading.main_thread() or self.active():
            yield self
            return
        self.signals.clear()
        previous = _swap_handlers(self._handle)
        try:
            yield self
        finally:
            _restore_handlers(previous)

    def reclaim(self) -> None:
        """Put this instance's handlers back beneath Python when native code replaced them: jax.distributed's
        preemption notifier installs its own SIGTERM handler in C++, which hides the signal from Python (it only
        records it for JAX's preemption sync point), so a multi-process run would train on. Keeps the signals
        recorded so far; does nothing unless this instance is the active one (`active`), in the main thread."""
        if threading.current_thread() is threading.main_thread() and self.active():
            _swap_handlers(self._handle)

    def check(self) -> None:
        """Raise the first recorded signal's exception (`stop_exception`), if any."""
        if self.signals:
            raise stop_exception(self.signals[0])


STOP = StopRequests()


@contextlib.contextmanager
def signals_held(deliver: bool = True):
    """Hold SIGINT and SIGTERM while the block runs; then deliver them to the handlers in place before, or drop them
    when `deliver` is false (the caller is stopping already). In the main thread only: elsewhere the block runs as
    it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = _swap_handlers(lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        _restore_handlers(previous)
        for sig in dict.fromkeys(caught) if deliver else ():
            signal.raise_signal(sig)


def exit_now(code: int, line: str) -> None:
    """Print `line` to stderr and end the process with `code` at once, without Python's shutdown: a command stopped
    by Ctrl-C while XLA's threads still ran used to print its line and then die of a segmentation fault (exit 139)
    in the interpreter's teardown. Open files are flushed first; what the command cleans up in `finally` blocks has
    run by the time its exception reaches the caller."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    say_line(line)
    os._exit(code)


def _exit_while_loading(signum, frame) -> None:
    exit_now(128 + signum, "interrupted" if signum == signal.SIGINT else "terminated")


def exit_while_loading() -> None:
    """For a command-line module run as `__main__`, before its imports load JAX: a Ctrl-C or SIGTERM while they load
    ends the process at once with 130 or 143 and one line, instead of a KeyboardInterrupt traceback from inside
    whichever library was importing (nothing is written before the command starts). `train.cli.main_guard` puts
    Python's own handlers back when the command starts (`restore_after_loading`)."""
    if threading.current_thread() is threading.main_thread():
        _swap_handlers(_exit_while_loading)
        _COMMAND[:] = [True]


def in_command() -> bool:
    """Whether this process is a command started from the shell (its module called `exit_while_loading` or
    `StopRequests.install`), not a test or a notebook calling a command's main(), which must not end the process."""
    return bool(_COMMAND)


_INTERRUPTED: list[int] = []  # SIGINTs and SIGTERMs delivered through _interrupt


def _interrupt(signum, frame) -> None:
    """KeyboardInterrupt for SIGINT, Terminated for SIGTERM (`stop_exception`), remembered: raised inside a
    garbage-collection callback, Python only prints it ("Exception ignored in: <function _xla_gc_callback ...>") and
    the command carries on (`interrupted_unseen`)."""
    _INTERRUPTED.append(signum)
    raise stop_exception(signum)


def restore_after_loading() -> None:
    """An exception on SIGINT and SIGTERM (remembered, see `_interrupt`) where `exit_while_loading` installed its
    own handler, so a command's `finally` blocks run (its lock released, a half-made run removed) before it prints
    one line (`train.cli.main_guard`); SIGTERM used to end it silently. Any other handler (train.main's STOP)
    stays."""
    _INTERRUPTED.clear()
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is _exit_while_loading:
        _restore_handlers({sig: _interrupt for sig in INTERRUPTS})
        sys.unraisablehook = _quiet_when_dropped


def _quiet_when_dropped(unraisable) -> None:
    """sys.unraisablehook of a command: a stop exception raised inside a callback Python cannot raise from (a
    weakref or garbage-collection callback) is not printed as "Exception ignored in: ... Traceback ...": it is
    remembered (`interrupted_unseen`) and said in one line when the command ends. Anything else as Python does."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def interrupted_unseen() -> int:
    """The signal number of a Ctrl-C or SIGTERM that arrived since `restore_after_loading` although the command went
    on to finish (Python dropped its exception in a garbage-collection callback), else 0."""
    return _INTERRUPTED[0] if _INTERRUPTED else 0


def stop_with_parent(parent: int) -> Callable[[], None]:
    """A `subprocess.Popen` preexec_fn that stops the child when `parent` (the process starting it, `os.getpid()`)
    dies, however it dies: on Linux the kernel sends the child SIGTERM then (prctl PR_SET_PDEATHSIG), the stop
    request a command handles as a clean stop (training saves); a child whose parent died before the call, which
    would wait for that signal forever, ends before it starts. Elsewhere it does nothing. A SIGKILLed
    `python -m train.launch` used to leave its processes running, waiting on collectives until a heartbeat timeout.
    The signal comes when the thread that started the child ends: start children from the main thread. libc is
    looked up here, in the parent, so the forked child only makes the call."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:
            os._exit(128 + signal.SIGTERM)

    return set_parent_death_signal
