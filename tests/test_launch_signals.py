"""`python -m train.launch` passes Ctrl-C and SIGTERM on to every process it started (they run in sessions of their
own, so a terminal's signal reaches only the launcher) and kills, after --stop-timeout, any that do not stop: no
process outlives the launcher. The processes here are a small script, not training, so the test needs no JAX."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.cpu_devices import usable_cores
from train.launch import _first_failure, main as launch_main, most_processes

CHILD = """
import os, signal, sys, time
from pathlib import Path
index = os.environ["JAX_PROCESS_ID"]
stubborn = index in sys.argv[2:]  # these note the signal but keep running
def stop(signum, frame):
    (Path(sys.argv[1]) / index).write_text(signal.Signals(signum).name)
    if not stubborn:
        sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(0.05)
"""


def start(tmp_path: Path, *stubborn: str):
    (tmp_path / "child_module.py").write_text(CHILD)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "train.launch", "--processes", "2", "--devices-per-process", "1",
                             "--module", "child_module", "--stop-timeout", "2", "--", str(marks), *stubborn],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(("[p0] ready", "[p1] ready")):
            pids[int(line[2])] = int(line.split()[-1])
        if len(pids) == 2:
            return proc, pids, marks, lines
    raise AssertionError("".join(lines))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_reaches_every_process_and_sets_the_exit_code(tmp_path, sig):
    proc, pids, marks, _ = start(tmp_path)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, rest
    assert {p.name: p.read_text() for p in marks.iterdir()} == {"0": sig.name, "1": sig.name}
    assert f"launch: {sig.name}: sending it on to processes [0, 1]; they have 2 s to save and stop" in rest, rest
    assert "process 0 exited with code 0 on its own" in rest and "process 1 exited with code 0 on its own" in rest
    assert all(gone(pid) for pid in pids.values())


def test_a_process_that_ignores_the_signal_is_killed_after_the_stop_timeout(tmp_path):
    proc, pids, marks, _ = start(tmp_path, "1")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent >= 2
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert (marks / "1").read_text() == "SIGTERM"  # it got the signal, and did not stop
    assert "process 1 still running 2 s later (--stop-timeout): killed" in rest, rest
    assert "process 0 exited with code 0 on its own" in rest, rest
    assert all(gone(pid) for pid in pids.values())


@pytest.mark.parametrize("module", ["nonexist.mod", "train.no_such_tool", ""])
def test_a_module_python_cannot_find_is_one_line_before_any_process_starts(module, capsys):
    with pytest.raises(SystemExit) as exited:
        launch_main(["--module", module, "--", "--config", "tiny"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: --module {module!r} is not a module python can find (e.g. train.main)\n"


@pytest.mark.parametrize("wait_s, said", [(0, "process 0 killed at once (--grace 0)"),
                                          (0.2, "process 0 still running 0.2 s later (--grace): killed")])
def test_a_process_left_running_is_killed_and_the_line_names_the_option(capsys, wait_s, said):
    from train.launch import _end_running
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _end_running([child], [0], wait_s, "--grace")
        assert child.returncode == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    assert capsys.readouterr().err.strip() == f"launch: {said}"


def test_an_error_line_every_process_prints_alike_is_shown_once(capsys):
    import io
    import threading
    from train.launch import _forward
    lock, shown = threading.Lock(), {}
    for index in (0, 1):
        _forward(index, io.StringIO("loading\n"), lock, shown)
    _forward(0, io.StringIO("error: --set train.steps: must be positive\n"), lock, shown)
    # process 1 refuses alike; then JAX's distributed service logs that process 0 (its coordinator) is gone, which
    # can come before process 0 has exited: its error line already says that it is ending
    _forward(1, io.StringIO("error: --set train.steps: must be positive\nerror: only here\nE1203 14:52:59.190444 "
                            "23525 coordination_service_agent.cc:289] Polled an error from coordination service\n"),
             lock, shown)
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "[p0] loading", "[p1] loading", "[p0] error: --set train.steps: must be positive", "[p1] error: only here"]
    assert captured.err == ("launch: process 1: not showing the rest of its output (its collectives fail without "
                            "process 0)\n")


def test_a_line_to_stderr_is_one_write_so_a_native_log_cannot_split_it(capfd, monkeypatch):
    import os
    from train.interrupts import say_line
    writes, write = [], os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append((fd, data)) or write(fd, data))
    say_line("error: checkpoint runs/x/8 is damaged: caf\u00e9")
    assert writes == [(sys.stderr.fileno(), "error: checkpoint runs/x/8 is damaged: caf\u00e9\n".encode())]
    assert capfd.readouterr().err == "error: checkpoint runs/x/8 is damaged: caf\u00e9\n"


def test_once_a_process_failed_the_others_output_is_one_launcher_line(capsys):
    import io
    import threading
    from train.launch import _forward
    failed = []
    out = io.StringIO("step 6\n")
    _forward(0, out, threading.Lock(), {}, lambda: failed[0] if failed else None)
    failed.append(1)  # process 1 was SIGKILLed: process 0's collectives fail, natively or in Python
    crash = ("E1203 10:08:34.308637 7384 coordination_service.cc:1549] ... stopped sending heartbeats):\n1\n"
             "F1203 10:08:34.310241 7395 client.h:80] Terminating process because ...\n"
             "*** Check failure stack trace: ***\n    @     0x7f52e3640634  absl::LogMessage::SendToLog()\n"
             "Traceback (most recent call last):\n  File ...\n"
             "process 0: lost contact with another process during a collective (it exited or was killed); ...\n")
    _forward(0, io.StringIO(crash), threading.Lock(), {}, lambda: failed[0] if failed else None)
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["[p0] step 6", "[p0] process 0: lost contact with another process during a "
                                         "collective (it exited or was killed); ..."]
    assert captured.err == ("launch: process 0: not showing the rest of its output (its collectives fail without "
                            "process 1)\n")


@pytest.mark.parametrize("flags, said", [
    (["--processes", "100000"], "--processes 100000: the launcher starts every process on this machine, each a JAX "
                                "runtime of a few hundred MB; at most {most} here (8, or 2 per core)"),
    (["--processes", "2", "--devices-per-process", "65"], "--devices-per-process 65: at most 64 simulated CPU "
                                                          "devices per process")])
def test_process_and_device_counts_past_what_one_machine_runs_are_one_line(capsys, flags, said):
    with pytest.raises(SystemExit) as exited:
        launch_main([*flags, "--", "--config", "tiny"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {said.format(most=most_processes(usable_cores()))}\n"
    assert most_processes(2) == 8 and most_processes(16) == 32


class Ended:
    """A stand-in for a child process: poll() gives its exit code (None while running, -N for signal N)."""

    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code


@pytest.mark.parametrize("codes, blamed", [([None, None], None), ([0, None], None), ([None, 1], 1), ([1, 2], 0),
                                           ([1, -signal.SIGKILL], 1), ([-signal.SIGTERM, -signal.SIGKILL], 0),
                                           ([0, 1, -signal.SIGKILL], 2)])
def test_the_failure_reported_is_a_process_killed_by_a_signal_before_one_whose_collectives_then_failed(codes,
                                                                                                        blamed):
    """Process 1 SIGKILLed, process 0 exiting 1 as its collectives fail: when both have ended by one poll, the
    launcher reports process 1 (it used to report the lowest index, process 0, with exit code 1)."""
    assert _first_failure([Ended(code) for code in codes]) == blamed
