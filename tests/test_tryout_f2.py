"""Faults a tryout of calibrated PTQ, serving, the launcher and checkpoints found (session 18): each is one `error:`
line and exit 2, or the right result, where it was a misleading error or a wrong one."""
from __future__ import annotations

import shutil
import threading

import pytest

from checkpoints import inspect as inspect_cli
from checkpoints.lock import lock_workdir
from quant import convert as convert_cli
from checkpoints.manager import CheckpointStore
from slm_jax.errors import UserError
from train.ptq import convert_workdir
from train import main as train_main
from train.run import check_outside_checkpoints, load_run
from train.sharding import maybe_initialize_distributed


def rotate_away_during_first_read(monkeypatch):
    """CheckpointStore.metadata, the first time, starts deleting the step it is asked for: its state folder at once,
    the rest a moment later, as a training run's checkpoint.keep rotation (Orbax's rmtree) does under a reader."""
    metadata, deleted = CheckpointStore.metadata, []

    def racing(self, step=None, checked=True):
        if not deleted:
            folder = self.directory / str(step)
            deleted.append(step)
            shutil.rmtree(folder / "state")
            threading.Timer(0.2, shutil.rmtree, (folder,)).start()
        return metadata(self, step, checked)

    monkeypatch.setattr(CheckpointStore, "metadata", racing)
    return deleted


def test_a_latest_step_deleted_while_read_is_read_again_from_the_new_latest(tiny_run, tmp_path, monkeypatch):
    """A reader (evaluate, convert, generate) of a run still training chose its latest step, which the training's
    checkpoint rotation deleted during the read: the command failed with 'checkpoint ... is incomplete or not an
    slm-jax checkpoint' or 'No such file or directory'; it now starts again from the steps there are."""
    workdir = tiny_run(tmp_path / "run").workdir
    deleted = rotate_away_during_first_read(monkeypatch)
    with lock_workdir(workdir):  # the training run
        run = load_run(workdir)
    assert deleted == [30] and run.step == 20


def test_a_named_step_deleted_while_read_says_so_with_the_steps_there_are(tiny_run, tmp_path, monkeypatch):
    workdir = tiny_run(tmp_path / "run").workdir
    rotate_away_during_first_read(monkeypatch)
    with lock_workdir(workdir), pytest.raises(UserError, match=r"checkpoints/30 was deleted while it was read, by "
                                                               r"the run training in .*have now: \[20\]"):
        load_run(workdir, 30)


def test_a_damaged_step_of_a_run_nobody_trains_is_still_called_damaged(tiny_run, tmp_path):
    workdir = tiny_run(tmp_path / "run").workdir
    shutil.rmtree(workdir / "checkpoints" / "30" / "state")
    with pytest.raises(UserError, match="30 is incomplete or not an slm-jax checkpoint"):
        load_run(workdir)


def test_convert_compares_the_serving_run_with_the_step_it_was_converted_from(tiny_run, tmp_path, capsys,
                                                                               monkeypatch):
    """quant.convert's table evaluated the source's latest step, which a run still training has moved past by then:
    a serving run of step 20 sat beside its source's step 30 as if one were the other quantized."""
    workdir = tiny_run(tmp_path / "run").workdir
    later = tmp_path / "30"
    shutil.move(workdir / "checkpoints" / "30", later)  # the source's latest is 20 while it converts

    def then_trains_on(source, out, *args, **kwargs):
        made = convert_workdir(source, out, *args, **kwargs)
        shutil.move(later, workdir / "checkpoints" / "30")  # ... and 30 after
        return made

    monkeypatch.setattr(convert_cli, "convert_workdir", then_trains_on)
    convert_cli.main(["--workdir", str(workdir), "--out", str(tmp_path / "int8"), "--bits", "8"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert [(row[0], row[1]) for row in rows] == [(str(workdir), "20"), (str(tmp_path / "int8"), "20")]


@pytest.mark.parametrize("env, shown", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}, r"JAX_PROCESS_ID \(5\) must be below JAX_NUM_PROCESSES \(2\)"),
    ({"JAX_NUM_PROCESSES": "abc", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be a whole number >= 1, got 'abc'"),
    ({"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be a whole number >= 1, got '0'"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID must be a whole number >= 0, got '-1'"),
    ({"SLURM_STEP_NUM_TASKS": "x"}, "SLURM_STEP_NUM_TASKS must be a whole number >= 1, got 'x'"),
])
def test_a_malformed_process_count_or_id_in_the_environment_is_one_line_naming_it(monkeypatch, env, shown):
    """train.main set up jax.distributed from these with int() and JAX's own check: a ValueError traceback."""
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    if "SLURM_STEP_NUM_TASKS" not in env:
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=shown):
        maybe_initialize_distributed()


@pytest.mark.parametrize("inside", ["checkpoints/40", "checkpoints/30/more"])
def test_a_new_run_or_export_inside_a_runs_checkpoints_folder_is_refused_and_the_run_stays_readable(
        tiny_run, tmp_path, capsys, inside):
    """`quant.convert --out RUN/checkpoints/40` made a serving run there, which Orbax then listed as RUN's step 40,
    incomplete: every command on RUN, its own resume included, failed on it. Every command that makes a run or an
    export (convert, merge, import and export through check_out_parent; train.main's --workdir) refuses it."""
    workdir = tiny_run(tmp_path / "run").workdir
    out = workdir / inside
    with pytest.raises(SystemExit) as exit_:
        convert_cli.main(["--workdir", str(workdir), "--out", str(out), "--bits", "8"])
    assert exit_.value.code == 2
    assert f"error: --out {out} lies inside {workdir / 'checkpoints'}, the checkpoints folder of the run" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        train_main.main(["--config", "tiny", "--workdir", str(out)])
    assert exit_.value.code == 2 and "error: --workdir" in capsys.readouterr().err
    assert not out.exists() and load_run(workdir).step == 30


def test_a_folder_named_checkpoints_that_is_no_runs_may_hold_runs(tmp_path):
    check_outside_checkpoints(tmp_path / "checkpoints" / "my_run")


def test_inspect_of_a_run_whose_latest_step_is_rotated_away_meanwhile_shows_the_new_latest(
        tiny_run, tmp_path, monkeypatch, capsys):
    workdir = tiny_run(tmp_path / "run").workdir
    rotate_away_during_first_read(monkeypatch)
    with lock_workdir(workdir):
        inspect_cli.main([str(workdir), "--verify"])
    shown = capsys.readouterr().out
    assert f"checkpoint  {workdir.resolve()}/checkpoints/20\n" in shown and "verified    every array read" in shown
