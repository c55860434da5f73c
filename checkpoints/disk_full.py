"""A full disk (or an exhausted quota) during a checkpoint save, told in one line instead of Orbax's tracebacks.

Orbax writes arrays through TensorStore in background threads: a full disk surfaces there as a `ValueError`
whose text carries the OS error, is logged with its traceback by each thread it passes through, and is raised
again in the main thread on the next save or wait. This module recognises it and keeps those log records back.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on device; disk quota exceeded


def _chain(err: BaseException):
    """`err`, its causes and contexts, and the members of exception groups among them."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _text_is_disk_full(text: str) -> bool:
    return any(os.strerror(code) in text or f"os_error_code='{code}'" in text for code in ERRNOS)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or anything it was raised from) is a full disk or quota: an OSError with errno ENOSPC or
    EDQUOT, or TensorStore's error text for them ("... No space left on device [os_error_code='28']")."""
    return any((isinstance(e, OSError) and e.errno in ERRNOS) or _text_is_disk_full(str(e)) for e in _chain(err))


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def disk_full_message(directory: Path, step: int, state_bytes: int, keep: int, last_step: int | None) -> str:
    """One line: where the save of `step` failed, the space it needs (`state_bytes`, the arrays of one
    checkpoint; up to `keep` + 1 checkpoints exist while a save is in progress), what is free, and what is left."""
    free = free_bytes(directory)
    left = f"checkpoint {last_step} is intact" if last_step is not None else "no earlier checkpoint exists"
    return (f"disk full while saving checkpoint {step} to {directory}: a checkpoint needs about {_mib(state_bytes)} "
            f"and up to checkpoint.keep + 1 = {keep + 1} exist while saving; "
            f"{_mib(free) + ' free' if free is not None else 'free space unknown'}; {left} (free some space or "
            f"lower checkpoint.keep, then rerun to resume)")


class DiskFullLogFilter(logging.Filter):
    """Drops log records about a full disk (the save reports it in one line); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1]):
            return False
        return not _text_is_disk_full(record.getMessage())


def quiet_disk_full_logs(logger: logging.Logger) -> None:
    """Install `DiskFullLogFilter` on `logger` once (idempotent)."""
    if not any(isinstance(f, DiskFullLogFilter) for f in logger.filters):
        logger.addFilter(DiskFullLogFilter())
