"""One writer per workdir: a second process is refused in one line naming the holder's PID, and a holder that was
SIGKILLed leaves no lock behind."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from checkpoints.lock import LOCK_NAME, lock_workdir
from slm_jax.errors import UserError
from train.main import main as train_main

ROOT = Path(__file__).resolve().parent.parent

HOLDER = textwrap.dedent("""
    import sys, time
    from checkpoints.lock import lock_workdir
    with lock_workdir(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def start_holder(workdir: Path) -> subprocess.Popen:
    """A process that locks `workdir` and sleeps; returns once it holds the lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    workdir = tmp_path / "run"
    holder = start_holder(workdir)
    try:
        with pytest.raises(UserError) as refused, lock_workdir(workdir):
            pass
        assert str(refused.value) == (f"workdir {workdir} is in use by process {holder.pid} (lock file "
                                      f"{workdir / LOCK_NAME}); wait for it to finish or stop it, or choose another "
                                      f"workdir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    with lock_workdir(workdir) as path:  # the kernel dropped the dead holder's lock
        assert path.read_text() == f"{os.getpid()}\n"


def test_the_lock_is_released_when_its_block_ends_even_by_an_exception(tmp_path):
    with pytest.raises(ValueError), lock_workdir(tmp_path):
        raise ValueError("training failed")
    with lock_workdir(tmp_path):
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"), lock_workdir(tmp_path):
            pass  # not reentrant: a second writer in the same process is refused too


def test_a_workdir_that_is_a_file_cannot_be_locked_and_says_so_in_one_line(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as refused, lock_workdir(blocker):
        pass
    assert str(refused.value) == f"cannot lock workdir {blocker}: it is a file, not a folder"


def test_a_workdir_under_a_file_cannot_be_locked_and_says_so_in_one_line(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as refused, lock_workdir(blocker / "sub"):
        pass
    assert str(refused.value) == f"cannot lock workdir {blocker / 'sub'}: Not a directory ({blocker / 'sub'})"


def test_a_run_refused_before_writing_leaves_no_new_folder_and_keeps_an_existing_one(tmp_path, capsys):
    from_scratch, existing = tmp_path / "new_run", tmp_path / "existing"
    (existing / "notes").mkdir(parents=True)
    (existing / "notes" / "keep.txt").write_text("mine")
    for workdir in (from_scratch, existing):
        with pytest.raises(SystemExit) as exit_info:
            train_main(["--config", "tiny", "--set", f"train.init_from={tmp_path / 'missing'}",
                        "--workdir", str(workdir)])
        assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not from_scratch.exists()  # nothing but its lock was written: removed, so the name stays free
    assert (existing / "notes" / "keep.txt").read_text() == "mine"
