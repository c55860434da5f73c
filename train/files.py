"""Replacing a file atomically: the run's caches, its tokenizer.json and its metrics log are rewritten through a
temporary file beside them and one rename, so a crash or a full disk at any moment leaves the old file or the new
one, never a partial one, and no temporary file behind."""
from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path`, replacing any file there in one rename after the bytes are synced to
    disk (os.fsync). The temporary file `.{name}.{pid}.tmp` beside it is removed when writing fails (OSError, e.g.
    a full disk, is re-raised; `path` is left as it was)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
