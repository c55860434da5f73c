"""Progress lines for the terminal and `metrics.jsonl` records for later plots and comparisons.

`metrics.jsonl` is strict JSON Lines (RFC 8259 per line): a NaN or infinite value is written as `null`. When
training resumes, `MetricsLog.rewind` drops the records past the restored step, so each step is recorded once,
by the run the checkpoints continue.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from train.files import replace_file


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def finite_or_none(value):
    """`value` with every NaN or infinite float (in nested lists and dicts too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def to_json_line(record: dict) -> str:
    return json.dumps(finite_or_none(record), allow_nan=False) + "\n"


class MetricsLog:
    """Appends one JSON object per line; each record carries the step and wall-clock time. `path` None: records
    nothing (the processes other than process 0 of a multi-process run). `tensorboard` (e.g. a
    `train.observe.TensorBoardLog`): also given every record, as scalars, until `close()`."""

    def __init__(self, path: Path | None, tensorboard=None):
        self.path, self.tensorboard = path, tensorboard

    def write(self, **record) -> None:
        """Append `record` (with a `time` in seconds since the epoch); NaN and infinities are written as null."""
        if self.path is None:
            return
        record.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(to_json_line(record))
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        """Flush and close the TensorBoard mirror, if any (the JSON file is closed after every write)."""
        if self.tensorboard is not None:
            self.tensorboard.close()

    def rewind(self, step: int) -> int:
        """Drop the records whose `step` is past `step` (the step training resumes from); returns how many.

        Lines that do not parse (a record cut short by a crash) are dropped too, and bare NaN literals of older
        files become null. The file is rewritten atomically (a temporary file renamed over it) when anything
        changes, so a crash here loses nothing.
        """
        if self.path is None or not self.path.exists():
            return 0
        text = self.path.read_text()
        kept, dropped = [], 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or (isinstance(record.get("step"), int) and record["step"] > step):
                dropped += 1
            else:
                kept.append(to_json_line(record))
        if "".join(kept) != text:
            replace_file(self.path, "".join(kept))
        return dropped


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Throughput:
    """Tokens/s and ms/step over the timed training steps only (compilation, evaluation and saving excluded)."""

    def __init__(self, tokens_per_step: int, total_steps: int):
        self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def rates(self, step: int) -> dict:
        if not self.steps:
            return {}
        step_s = self.seconds / self.steps
        return {"ms_per_step": 1000 * step_s, "tokens_per_s": self.tokens_per_step / step_s,
                "eta_s": step_s * (self.total_steps - step)}
