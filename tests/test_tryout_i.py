"""Faults a tryout found: evaluate, report, merge and convert sized a device computation by a command-line option
without the memory check train.main and train.generate make, and quant.report's KL over many windows was silent."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.manager import tree_bytes
from quant import convert as convert_cli
from quant import layer_kl
from quant.calibrate import calibration_tokens
from quant.config import QuantConfig
from quant.progress import GroupProgress
from quant.ptq_methods import check_method, check_undamped_calibration
from quant import report as report_cli
from train import evaluate as evaluate_cli
from train import memory_check
from train.memory_check import F32, check_option_fits, forward_bytes
from slm_jax import ModelConfig, Transformer
from slm_jax.errors import UserError
from train.run import load_run

ROOT = Path(__file__).resolve().parents[1]


def test_an_option_beyond_memory_is_refused_naming_the_largest_value_that_fits(monkeypatch):
    monkeypatch.setattr(memory_check, "physical_memory", lambda: 1000)  # bytes
    check_option_fits("--batch-size", 90, lambda n: 100 + 10 * n, "evaluating r")  # 1000 bytes: fits
    with pytest.raises(UserError, match=r"^evaluating r at --batch-size 100,000 needs at least 0\.0 GB of memory, "
                                        r"more than this machine's 0\.0 GB; use --batch-size 90 or less$"):
        check_option_fits("--batch-size", 100_000, lambda n: 100 + 10 * n, "evaluating r")
    with pytest.raises(UserError, match="; no --kl-windows fits: what it holds besides is already too large$"):
        check_option_fits("--kl-windows", 5, lambda n: 995 + 10 * n, "the per-layer KL of r")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_run):
    return tiny_run(tmp_path_factory.mktemp("i") / "run", "train.steps=2").workdir


def refusal(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    return err


def test_evaluate_report_and_convert_refuse_an_option_beyond_memory_naming_one_that_fits(
        run_dir, tmp_path, capsys, monkeypatch):
    run = load_run(run_dir)
    model, held = run.config.model, tree_bytes(run.variables)["total"]
    monkeypatch.setattr(memory_check, "physical_memory", lambda: forward_bytes(model, 10, held))  # 10 windows fit
    err = refusal(capsys, evaluate_cli.main, ["--workdir", str(run_dir), "--batch-size", "100000"])
    assert err.startswith(f"error: evaluating {run_dir} at --batch-size 100,000 needs at least ")
    assert err.endswith("; use --batch-size 10 or less\n"), err
    err = refusal(capsys, report_cli.main, ["--workdir", str(run_dir), "--bits", "4", "--batch-size", "100000"])
    assert err.startswith(f"error: reporting on {run_dir} at --batch-size 100,000 needs") and "size 10 or less" in err
    kl_memory = forward_bytes(model, 1, held + F32 * 8 * model.seq_len * model.vocab_size)  # 8 windows' logits
    monkeypatch.setattr(memory_check, "physical_memory", lambda: kl_memory)
    err = refusal(capsys, report_cli.main, ["--workdir", str(run_dir), "--bits", "4", "--kl-windows", "100000"])
    assert err.startswith(f"error: the per-layer KL of {run_dir} at --kl-windows 100,000 needs at least ")
    assert err.endswith("; use --kl-windows 8 or less\n"), err
    monkeypatch.setattr(memory_check, "physical_memory", lambda: forward_bytes(model, 4, held, 20))
    err = refusal(capsys, convert_cli.main, ["--workdir", str(run_dir), "--out", str(tmp_path / "out"), "--bits", "4",
                                             "--method", "gptq", "--calib-batches", "4"])
    assert err.startswith(f"error: calibrating gptq on {run_dir} at --calib-seq-len 32 needs at least ")
    assert err.endswith("; use --calib-seq-len 20 or less\n"), err
    assert not (tmp_path / "out").exists()


def test_a_long_per_layer_kl_says_how_far_it_is(monkeypatch):
    cfg = ModelConfig(vocab_size=50, seq_len=8, n_layers=1, n_heads=2, d_model=16)
    shapes = nn.unbox(jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), int))))
    rng = np.random.default_rng(0)  # random weights without init's compilation
    params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), shapes["params"])
    kernels = {("layer_0", "attn", "q"): np.asarray(params["layer_0"]["attn"]["q"]["kernel"]) * 0.5}
    lines = []
    monkeypatch.setattr(layer_kl, "PROGRESS_EVERY_S", 0.0)  # a line after every forward pass
    layer_kl.single_layer_kl(cfg, params, kernels, np.zeros((3, 8), np.int32), lines.append)
    assert len(lines) == 6 and lines[0].startswith("per-layer KL: window 1/6 (float model) done: "), lines
    assert re.fullmatch(r"per-layer KL: window 6/6 \(layer_0/attn/q\) done: \d+ s elapsed, about 0 s left", lines[-1])
    quiet = GroupProgress("per-layer KL", 6, lines.append, "window", every_s=60.0)
    for _ in range(6):
        quiet.step("float model")
    assert len(lines) == 6  # work done sooner than every_s says nothing


STAND_IN = """
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    Path(sys.argv[1]).write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[1] + ".ready").write_text("")
while True:
    time.sleep(0.02)
"""

LAUNCHER = """
import os, subprocess, sys, time
from train.interrupts import stop_with_parent
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                         preexec_fn=stop_with_parent(os.getpid()))
print(child.pid, flush=True)
time.sleep(60)
"""


def ended(pid: int) -> bool:
    """The process is gone, or a zombie its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_of_a_sigkilled_launcher_gets_sigterm_and_stops(tmp_path):
    mark = tmp_path / "child"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, STAND_IN, str(mark)], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
    child = int(launcher.stdout.readline())
    deadline = time.monotonic() + 10
    while not Path(f"{mark}.ready").exists() and time.monotonic() < deadline:  # its SIGTERM handler is in place
        time.sleep(0.02)
    launcher.kill()  # SIGKILL: the launcher's own handlers never run
    launcher.wait()
    deadline = time.monotonic() + 5
    while not ended(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not ended(child):
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the launcher's child outlived it by 5 s")
    assert mark.read_text() == "SIGTERM"


def test_calibration_messages_give_counts_with_thousands_separators():
    with pytest.raises(UserError) as refused:
        calibration_tokens(np.zeros(68_888 * 4, np.int32), 100_000, 4, 0)
    assert str(refused.value) == ("--calib-batches 100,000 x --calib-seq-len 4 needs 400,000 tokens, but the training "
                                  "split holds 275,552 (68,888 windows)")
    with pytest.raises(UserError, match=r"got -1,000 x 4$"):
        calibration_tokens(np.zeros(64, np.int32), -1000, 4, 0)
    scheme = QuantConfig(mode="serve", weight_bits=4, granularity="per_channel", numerics="fake")
    long_window = ModelConfig(vocab_size=50, seq_len=1024, n_layers=1, n_heads=2, d_model=16)
    with pytest.raises(UserError, match=r"^--calib-seq-len 2,000 is longer than the model's context \(model.seq_len "
                                        r"1,024\)$"):
        check_method(long_window, scheme, "gptq", np.zeros((1, 2000), np.int32))
    wide = ModelConfig(vocab_size=50, seq_len=8, n_layers=1, n_heads=2, d_model=16, mlp_hidden=2048)
    with pytest.raises(UserError, match=r"--calib-batches 1,500 x --calib-seq-len 1 give 1,500; use --calib-batches "
                                        r"2,048 or more"):
        check_undamped_calibration(wide, scheme, np.zeros((1500, 1), np.int32))
