"""One writer per run: an exclusive lock on a workdir, so two processes never train into or write the same run.

It is an OS lock (`flock(2)` on `<workdir>/.lock`), held while the block runs: the kernel releases it when the
holder exits in any way, SIGKILL included, so a stale lock never blocks the next run. The holder writes its PID
into the file for the refusal message (the `filelock` package's flock backend does not record a holder).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from slm_jax.errors import UserError

LOCK_NAME = ".lock"


def _holder(fd: int) -> str:
    """'process <pid>' as written in the lock file by its holder, or a vaguer phrase if it is not written yet."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"process {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def lock_workdir(workdir: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `workdir` (created with its parents if missing) while the block runs.

    Yields the lock file's path. Not reentrant: a second `lock_workdir` on the same folder, even in the same
    process, is refused until the first block ends. The file is left in place on release (deleting a lock file
    lets two processes lock two different files of the same name).

    Raises UserError in one line when another process holds the lock (naming its PID), or when the folder or the
    lock file cannot be created or opened (a file in the way, a read-only or foreign folder).
    """
    workdir = Path(workdir)
    path = workdir / LOCK_NAME
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        why = "it is a file, not a folder" if workdir.is_file() else f"{err.strerror} ({err.filename or path})"
        raise UserError(f"cannot lock workdir {workdir}: {why}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"workdir {workdir} is in use by {_holder(fd)} (lock file {path}); wait for it to "
                            f"finish or stop it, or choose another workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def in_use(workdir: Path) -> bool:
    """Whether another process holds `workdir`'s lock now (a run training there); False when it has no lock file.
    It probes with a shared lock, released at once: a `lock_workdir` at that very moment is refused as in use."""
    try:
        fd = os.open(Path(workdir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


DELETION_WAIT_S = 2.0  # how long a failed read waits for a deletion in progress to end


def rotated_away(directory: Path, step: int | None) -> bool:
    """Whether checkpoint `step` of the checkpoints folder `directory` was deleted by a run training there (its
    workdir, `directory`'s parent, is `in_use`; checkpoint.keep rotation): gone, or going within DELETION_WAIT_S. A
    read of it that failed should then read the latest step again rather than call it damaged."""
    if step is None or not in_use(Path(directory).parent):
        return False
    folder, deadline = Path(directory) / str(step), time.monotonic() + DELETION_WAIT_S
    while folder.is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not folder.is_dir()
