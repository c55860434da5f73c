"""Ctrl-C in the commands other than training: during their imports it ends them at once in one line (exit 130),
never a KeyboardInterrupt traceback from inside a library; a Ctrl-C that Python dropped (raised in a garbage
collection callback) still gives exit 130 once the work is done; a long generation stops within a chunk of decode
steps, and reports its progress meanwhile."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints.lock import lock_workdir
from slm_jax.sampling import DECODE_CHUNK
from train import generate, interrupts
from train.cli import main_guard

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["quant.convert", "train.generate", "checkpoints.hf_export", "train.evaluate"])
def test_ctrl_c_while_a_command_loads_is_one_line_and_exit_130(module):
    proc = subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)  # past Python's start-up, inside the imports of JAX (seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # finished loading and printed its help before the signal: nothing to check
        pytest.skip(f"{module} loaded within 0.6 s")
    assert (proc.returncode, err, out) == (130, "interrupted\n", "")


def test_a_dropped_ctrl_c_still_exits_130_after_the_work(monkeypatch, capsys):
    done = []

    @main_guard
    def command(argv=None):
        try:
            interrupts._interrupt(signal.SIGINT, None)  # what the handler does; Python drops it in a GC callback
        except KeyboardInterrupt:
            pass
        done.append(True)

    monkeypatch.setattr(signal, "getsignal", lambda sig: interrupts._exit_while_loading)  # as a command starts
    monkeypatch.setattr(interrupts, "_restore_handlers", lambda handlers: None)
    with pytest.raises(SystemExit) as exited:
        command([])
    assert exited.value.code == 130 and done == [True]
    assert capsys.readouterr().err == "interrupted: the work was complete when the command could stop\n"
    interrupts._INTERRUPTED.clear()


def test_ctrl_c_stops_a_long_generation_between_chunks(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "train.generate", "--workdir", str(run.workdir),
                             "--max-new-tokens", "100000000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    progress = proc.stderr.readline()  # the first progress line: decoding, past its compilation
    assert progress.startswith("[generated ") and "/100,000,000 tokens per sample" in progress, progress
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)  # one XLA call of 10^8 steps would not return for hours
    assert (proc.returncode, err) == (130, "interrupted\n")
    # the text generated so far is printed (after its prompt), then how far it got: whole chunks of decode steps
    *text, last = out.splitlines()
    done = re.fullmatch(r"\[stopped after ([\d,]+) of 100,000,000 tokens per sample\]", last)
    assert done and int(done[1].replace(",", "")) % DECODE_CHUNK == 0 and int(done[1].replace(",", "")) > 0, last
    assert "\n".join(text).startswith("ROMEO:") and len("\n".join(text)) > len("ROMEO:")  # the default prompt


def test_generation_progress_lines(monkeypatch, capsys):
    clock = iter([100.0, 101.0, 106.0, 107.0, 112.0])
    monkeypatch.setattr(generate.time, "perf_counter", lambda: next(clock))
    progress = generate.Progress(1000, 2)  # starts at 100 s
    progress(64)  # 1 s in: too soon for a line
    progress(320)  # 6 s in: 320 tokens per sample, 2 samples -> 106.7 tok/s, 680 left at 53.3 per s: 12.75 s
    progress(384)  # 1 s after the last line: none
    progress(1000)  # done: none
    assert capsys.readouterr().err == "[generated 320/1,000 tokens per sample, 107 tok/s, about 0:12 left]\n"


@pytest.mark.parametrize("sig, line", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_a_signal_while_convert_evaluates_is_one_line_and_leaves_no_lock_held(tiny_run, tmp_path, sig, line):
    """Ctrl-C landing inside Orbax's restore of a run (here the evaluation's) used to leave a bare "Traceback (most
    recent call last):" line (Orbax's event-loop thread failing, cut short by the exit); SIGTERM ended the command
    without a word. Both now wait for the checkpoint to close, then print one line."""
    run = tiny_run(tmp_path / "run")
    out = tmp_path / "int8"
    proc = subprocess.Popen([sys.executable, "-m", "quant.convert", "--workdir", str(run.workdir), "--out", str(out),
                             "--bits", "8"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for said in proc.stdout:
        if said.startswith("evaluating both runs"):
            break
    time.sleep(0.03)  # inside the first load_run of the evaluation
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (128 + sig, f"{line}\n")
    for folder in (out, run.workdir):  # nobody holds a lock: both can be locked again at once
        with lock_workdir(folder):
            pass
    assert not (tmp_path / ".int8.partial").exists()


def test_sigterm_in_a_command_is_one_line_and_exit_143(capsys):
    @main_guard
    def command(argv=None):
        raise interrupts.Terminated()

    with pytest.raises(SystemExit) as exited:
        command([])
    assert exited.value.code == 143 and capsys.readouterr().err == "terminated\n"
