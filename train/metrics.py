"""Progress lines for the terminal and `metrics.jsonl` records for later plots and comparisons."""
from __future__ import annotations

import json
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class MetricsLog:
    """Appends one JSON object per line; each record carries the step and wall-clock time."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record) -> None:
        record.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


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
