"""Training end to end on `tiny`: the loss falls, resume is exact, the CLIs work and fail cleanly."""
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.config import load_config
from train.loop import run_training
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def tiny(corpus_file, *overrides):
    return load_config("tiny", [f"data.path={corpus_file}", "train.sample_tokens=0", *overrides])


def train_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


def test_tiny_training_lowers_the_loss(tmp_path, corpus_file):
    summary = run_training(tiny(corpus_file, "train.steps=40", "train.log_every=5"), tmp_path, log=lambda *_: None)
    losses = train_losses(tmp_path)
    assert losses[40] < losses[5] - 0.5
    assert summary["val_loss"] < np.log(256)  # better than uniform over bytes
    assert (tmp_path / "config.yaml").is_file()


INT8_QAT = ("quant.mode=qat", "quant.weight_bits=8", "quant.act_bits=8", "quant.embed_bits=8", "model.n_layers=1")
INT4_QAT = ("quant.mode=qat", "quant.weight_bits=4", "model.n_layers=1", "quant.granularity=per_group",
            "quant.group_size=16", "quant.scale_dtype=bfloat16")


@pytest.mark.parametrize("precision, quant", [("fp32", ()), ("bf16", ()), ("fp16", ()), ("fp32", INT8_QAT),
                                              ("bf16", INT4_QAT)], ids=["fp32", "bf16", "fp16", "int8-qat", "int4-qat"])
def test_resume_continues_the_uninterrupted_loss_trajectory(tmp_path, corpus_file, precision, quant):
    config = tiny(corpus_file, "train.steps=20", "train.log_every=1", "checkpoint.every=10", "checkpoint.keep=5",
                  f"train.precision={precision}", "model.dropout=0.1", *quant)
    run_training(config, tmp_path, log=lambda *_: None)
    uninterrupted = train_losses(tmp_path)
    # Pretend the run died right after step 10: drop the later checkpoint and log, then run the same command.
    shutil.rmtree(tmp_path / "checkpoints" / "20")
    (tmp_path / "metrics.jsonl").unlink()
    run_training(config, tmp_path, log=lambda *_: None)
    resumed = train_losses(tmp_path)
    assert sorted(resumed) == list(range(11, 21))
    assert [resumed[s] for s in range(11, 21)] == [uninterrupted[s] for s in range(11, 21)]


@pytest.mark.parametrize("signals", [1, 2], ids=["one-signal", "two-signals"])
def test_an_interrupt_saves_the_steps_since_the_last_checkpoint_and_the_run_resumes_exactly(tmp_path, corpus_file,
                                                                                           capsys, signals):
    """SIGINT (SIGTERM is handled alike) during step 13 of a run that checkpoints every 10: the first signal is
    recorded and the run stops at the next step boundary, a second raises at once (here after step 13's record);
    either way step 13 is saved on the way out and the same command resumes there on the uninterrupted trajectory."""
    config = tiny(corpus_file, "train.steps=20", "train.log_every=1", "checkpoint.every=10", "checkpoint.keep=5",
                  "model.dropout=0.1", "train.sample_tokens=0")
    run_training(config, tmp_path / "whole", log=lambda *_: None)
    uninterrupted = train_losses(tmp_path / "whole")
    lines = []

    def interrupt_at_13(line):
        lines.append(str(line))
        if str(line).startswith("step     13/"):
            for _ in range(signals):
                signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_training(config, tmp_path / "cut", log=interrupt_at_13)
    assert sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [10, 13]
    assert not any(line.startswith("step     14/") for line in lines)
    assert "saved step 13 on the interrupt: the 3 step(s) trained since the last checkpoint" in lines
    assert lines[-1].startswith("interrupted after step 13: the latest checkpoint is step 13 in ")
    assert "SIGINT: stopping at the end of the current step (send it again to stop at once)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handler is gone again
    lines.clear()
    run_training(config, tmp_path / "cut", log=lines.append)
    assert any(str(line).startswith("resuming from step 13 ") for line in lines), lines
    resumed = train_losses(tmp_path / "cut")
    assert [resumed[s] for s in range(1, 21)] == [uninterrupted[s] for s in range(1, 21)]


def test_a_stop_that_cuts_an_evaluation_short_saves_no_step_it_would_skip(tmp_path, corpus_file, monkeypatch):
    """A second signal raising inside the evaluation at step 10: saving step 10 would make the resume skip that
    evaluation for good, so the run keeps its last checkpoint (none yet) and says why."""
    import train.loop
    real = train.loop.mean_loss
    calls = []

    def cut_short(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train.loop, "mean_loss", cut_short)
    lines = []
    config = tiny(corpus_file, "train.steps=20", "train.eval_every=10", "checkpoint.every=100", "train.sample_tokens=0")
    with pytest.raises(KeyboardInterrupt):
        run_training(config, tmp_path, log=lines.append)
    assert "not saving the steps since the last checkpoint: a second signal stopped the records or evaluation of " \
           "step 10 midway" in lines
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_signal_during_the_final_validation_lets_the_run_finish_its_summary(tmp_path, corpus_file):
    config = tiny(corpus_file, "train.steps=4", "train.log_every=1", "checkpoint.every=2", "train.sample_tokens=3")
    lines = []

    def interrupt_at_the_end(line):
        lines.append(str(line))
        if str(line).startswith("step      4/"):
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):  # Terminated, which train.main turns into exit 143
        run_training(config, tmp_path, log=interrupt_at_the_end)
    assert any(r.get("final") for r in read_metrics(tmp_path / "metrics.jsonl"))
    assert lines[-1] == "interrupted after the final validation: the run is complete at step 4"
    assert not any(line.startswith("sample") for line in lines)


def test_resuming_with_another_model_shape_is_refused(tmp_path, corpus_file):
    from slm_jax.errors import UserError
    run_training(tiny(corpus_file, "train.steps=10"), tmp_path, log=lambda *_: None)
    with pytest.raises(UserError, match="different model config.*d_model"):
        run_training(tiny(corpus_file, "train.steps=10", "model.d_model=64"), tmp_path, log=lambda *_: None)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_trains_generates_and_evaluates_tiny(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train.main", "--config", "tiny", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stdout and "ETA" in result.stdout and "val loss" in result.stdout
    assert "sample:" in result.stdout
    result = run_cli("train.generate", "--workdir", str(workdir), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                     "--seed", "3")
    assert result.returncode == 0, result.stderr
    again = run_cli("train.generate", "--workdir", str(workdir), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                    "--seed", "3")
    assert result.stdout.splitlines()[0] == again.stdout.splitlines()[0]  # --seed makes sampling reproducible
    result = run_cli("train.evaluate", "--workdir", str(workdir), "--batches", "2")
    assert result.returncode == 0, result.stderr
    assert "val loss" in result.stdout and "bits/char" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["final"] is True


@pytest.mark.parametrize("args, message", [
    (["--set", "train.lr=1"], "unknown config key 'train.lr'"),
    (["--set", "model.n_heads=3"], "must divide model.d_model"),
    (["--set", "data.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
])
def test_cli_rejects_bad_input_with_one_line_and_exit_code_2(tmp_path, args, message):
    result = run_cli("train.main", "--config", "tiny", "--workdir", str(tmp_path / "w"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, corpus_file):
    workdir = tmp_path / "w"
    ok = run_cli("train.main", "--config", "tiny", "--workdir", str(workdir), "--set", f"data.path={corpus_file}",
                 "--set", "train.steps=20", "--set", "train.sample_tokens=0")
    assert ok.returncode == 0, ok.stderr
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    diverge = run_cli("train.main", "--config", "tiny", "--workdir", str(workdir), "--set", f"data.path={corpus_file}",
                      "--set", "train.steps=40", "--set", "train.learning_rate=1e30", "--set", "train.warmup_steps=0",
                      "--set", "train.extend=true",
                      "--set", "train.sample_tokens=0")
    assert diverge.returncode == 2
    assert re.search(r"(loss|gradient norm) became nan at step 2\d;", diverge.stderr)
    assert "last good checkpoint: 20 in" in diverge.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
