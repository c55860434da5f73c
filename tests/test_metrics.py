"""`metrics.jsonl` is strict JSON Lines (NaN and infinities as null) and records each step once across resumes."""
import json
import math
import os

import pytest

from train.metrics import MetricsLog


def strict_records(path):
    """Every line parsed as RFC 8259 JSON: the NaN/Infinity literals Python's json accepts by default raise."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_non_finite_values_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(step=1, loss=float("nan"), grad_norm=float("inf"), lr=1e-3, time=3.0)
    log.write(step=2, val={"loss": -math.inf, "ppl": 2.5}, losses=[1.0, float("nan")], time=7.0)
    assert strict_records(log.path) == [
        {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "time": 3.0},
        {"step": 2, "val": {"loss": None, "ppl": 2.5}, "losses": [1.0, None], "time": 7.0},
    ]


def test_a_resume_drops_the_records_past_the_restored_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (10, 20, 30):  # a run that logged to step 30, then died before its step-30 checkpoint
        log.write(step=step, loss=5.0 - step / 10, time=float(step))
        log.write(step=step, val_loss=4.0, time=float(step))
    with log.path.open("a") as f:
        f.write('{"step": 31, "loss": 1.')  # a record cut short by the crash
    assert log.rewind(20) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left beside it
    for step in (30, 40):  # the resumed run logs again from step 21
        log.write(step=step, loss=1.0, time=100.0 + step)
    records = strict_records(log.path)
    assert [(r["step"], r["time"]) for r in records] == [(10, 10.0), (10, 10.0), (20, 20.0), (20, 20.0),
                                                         (30, 130.0), (40, 140.0)]


def test_rewind_rewrites_an_older_files_nan_literals_and_leaves_a_clean_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 3.0}\n')
    assert MetricsLog(path).rewind(5) == 0
    assert strict_records(path) == [{"step": 1, "loss": None}, {"step": 2, "loss": 3.0}]
    before = os.stat(path).st_mtime_ns
    assert MetricsLog(path).rewind(5) == 0
    assert os.stat(path).st_mtime_ns == before
    assert MetricsLog(tmp_path / "absent.jsonl").rewind(0) == 0
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_failed_rewrite_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(step=1, loss=2.0, time=1.0)
    log.write(step=2, loss=1.0, time=2.0)
    before = log.path.read_text()

    def crash(*args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        log.rewind(1)
    assert log.path.read_text() == before
