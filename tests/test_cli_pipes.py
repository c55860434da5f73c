"""A command whose stdout reader goes away (`python -m train.generate ... | head -3`) ends as a Unix tool killed by
SIGPIPE does: silently, exit 141, never "error: Broken pipe" (exit 2) or Python's "Exception ignored ...
BrokenPipeError" from its flush of stdout at shutdown (exit 120)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slm_jax.errors import UserError
from train.cli import CLOSED_STDOUT_EXIT, ArgumentParser, main_guard

ROOT = Path(__file__).resolve().parents[1]
# as a user's shell runs commands: stdout block-buffered into a pipe, so short output is written at exit
USER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

MANY_LINES = textwrap.dedent("""
    from train.cli import main_guard

    @main_guard
    def main(argv=None):
        for i in range(10**6):  # megabytes: the pipe fills, the write waits for the reader, which then leaves
            print(f"line {i}", flush=True)

    main()
""")


def test_a_reader_leaving_after_the_first_line_ends_the_command_silently_with_141():
    proc = subprocess.Popen([sys.executable, "-c", MANY_LINES], cwd=ROOT, env=USER_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "line 0\n"
    proc.stdout.close()  # as `head -1` exits
    err = proc.stderr.read()
    assert (proc.wait(timeout=60), err) == (CLOSED_STDOUT_EXIT, "")


def test_output_written_at_exit_to_a_reader_that_left_ends_silently_with_141():
    read, write = os.pipe()
    os.close(read)  # the reader left before the command wrote: its buffered output meets the closed pipe at exit
    try:
        result = subprocess.run([sys.executable, "-m", "checkpoints.inspect", "tests/fixtures/v2_tiny"], cwd=ROOT,
                                env=USER_ENV, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (CLOSED_STDOUT_EXIT, "")


def stdout_with_reader_gone(monkeypatch):
    """sys.stdout: a block-buffered pipe whose reader has closed it, as `| head` leaves a command's."""
    read, write = os.pipe()
    os.close(read)
    stream = open(write, "w", buffering=8192)
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


def shut_down(stream) -> None:
    """What Python does with sys.stdout at shutdown: a flush, here of one more write, which must not fail (the guard
    pointed the pipe's descriptor at os.devnull)."""
    stream.write("at shutdown")
    stream.close()


def test_help_to_a_reader_that_left_ends_silently_with_141(monkeypatch, capsys):
    @main_guard
    def command(argv=None):
        ArgumentParser(prog="python -m tool").parse_args(argv)

    stream = stdout_with_reader_gone(monkeypatch)
    with pytest.raises(SystemExit) as exited:
        command(["--help"])
    shut_down(stream)
    assert exited.value.code == CLOSED_STDOUT_EXIT and capsys.readouterr().err == ""


def test_an_error_after_the_reader_left_keeps_its_line_and_exit_2(monkeypatch, capsys):
    @main_guard
    def command(argv=None):
        print("partial output")
        raise UserError("bad input")

    stream = stdout_with_reader_gone(monkeypatch)
    with pytest.raises(SystemExit) as exited:
        command([])
    shut_down(stream)
    assert exited.value.code == 2 and capsys.readouterr().err == "error: bad input\n"


def test_a_broken_pipe_that_is_not_stdout_stays_a_one_line_error(capsys):
    @main_guard
    def command(argv=None):
        print("output")
        raise BrokenPipeError(32, "Broken pipe")  # e.g. writing to a child process that exited

    with pytest.raises(SystemExit) as exited:
        command([])
    assert exited.value.code == 2
    assert capsys.readouterr() == ("output\n", "error: Broken pipe\n")
