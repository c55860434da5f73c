"""TensorBoard event files hold the same scalars as metrics.jsonl (read back from the TFRecord file with
tensorboardX's Event proto), a missing tensorboardX is one clear error, and `--profile N` writes a jax.profiler
trace."""
import gzip
import json
import struct

import pytest

import train.observe
from slm_jax.errors import UserError
from train.config import load_config
from train.loop import run_training
from train.main import main as train_main
from train.metrics import read_metrics

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def read_scalars(directory) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every scalar in the event files under `directory`. The TFRecord framing: uint64 length,
    uint32 masked CRC of it, the Event proto bytes, uint32 masked CRC of them (checksums not verified here)."""
    scalars = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
        assert pos == len(data)  # whole records only
    return scalars


def tiny(corpus_file, *overrides):
    return load_config("tiny", [f"data.path={corpus_file}", "train.sample_tokens=0", "train.steps=6",
                                "train.log_every=2", "train.eval_every=4", "checkpoint.every=6", *overrides])


def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(tmp_path, corpus_file):
    run_training(tiny(corpus_file, "train.tensorboard=true"), tmp_path, log=lambda *_: None)
    expected = {(key, r["step"]): value for r in read_metrics(tmp_path / "metrics.jsonl") for key, value in r.items()
                if key not in ("step", "time", "final") and isinstance(value, (int, float))}
    assert {("loss", 2), ("lr", 6), ("grad_norm", 4), ("tokens_per_s", 6), ("val_loss", 4),
            ("val_loss", 6)} <= set(expected)
    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == set(expected)
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key  # stored as float32


def test_tensorboard_off_by_default_and_refused_without_tensorboardx(tmp_path, corpus_file, monkeypatch):
    run_training(tiny(corpus_file, "train.steps=2", "checkpoint.every=2"), tmp_path / "plain", log=lambda *_: None)
    assert not (tmp_path / "plain" / "tensorboard").exists()
    monkeypatch.setattr(train.observe, "SummaryWriter", None)
    with pytest.raises(UserError, match=r"train.tensorboard: true needs tensorboardX; install it with pip install"):
        run_training(tiny(corpus_file, "train.tensorboard=true"), tmp_path / "tb", log=lambda *_: None)
    assert not (tmp_path / "tb" / "checkpoints").exists()


def test_profile_flag_traces_steps_after_the_first_compiled_one(tmp_path, corpus_file, capsys):
    workdir = tmp_path / "run"
    train_main(["--config", "tiny", "--workdir", str(workdir), "--set", f"data.path={corpus_file}",
                "--set", "train.steps=5", "--set", "train.sample_tokens=0", "--profile", "2"])
    out = capsys.readouterr().out
    assert f"profile: steps 2..3 traced to {workdir / 'profile'}" in out
    runs = list((workdir / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1 and any(p.name.endswith(".xplane.pb") and p.stat().st_size for p in runs[0].iterdir())
    trace = json.loads(gzip.decompress(next(runs[0].glob("*.trace.json.gz")).read_bytes()))
    assert any("train_step" in event.get("name", "") for event in trace["traceEvents"])
