"""Ctrl-C in the commands other than training: during their imports it ends them at once in one line (exit 130),
never a KeyboardInterrupt traceback from inside a library; a Ctrl-C that Python dropped (raised in a garbage
collection callback) still gives exit 130 once the work is done."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import interrupts
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
