"""Nothing lost, nothing silent (issue 11): no non-finite checkpoint is ever saved or read as a result, one writer
per run, new runs appear whole or not at all, environment errors and wrong run kinds are one line with exit 2, data
is checked before the first step, and a changed learning-rate schedule is refused unless asked for."""
import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.lock import lock_workdir
from checkpoints.manager import CheckpointStore
from quant.convert import main as convert_main
from quant.merge import main as merge_main
from quant.report import main as report_main
from slm_jax.errors import UserError
from train.build import abstract_state, build_model
from train.cli import main_guard
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.loop import TrainingDiverged, run_training
from train.main import main as train_main
from train.metrics import read_metrics
from train.run import load_run, partial_folder

ROOT = Path(__file__).resolve().parent.parent
quiet = dict(log=lambda *_: None)
TINY = ("model.n_layers=1", "train.sample_tokens=0", "train.eval_every=1000")


def tiny(root, corpus, *overrides):
    return load_config("tiny", [f"data.path={corpus}", f"data.cache_dir={root / 'cache'}", *TINY, *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """A finished 12-step float run, its int8 serving conversion, and 4 LoRA steps over that."""
    root = tmp_path_factory.mktemp("safety")
    corpus = tiny_run(root / "float", *TINY, "train.steps=12", "checkpoint.every=12").corpus
    convert_main(["--workdir", str(root / "float"), "--out", str(root / "serving"), "--bits", "8"])
    run_training(tiny(root, corpus, "finetune.method=lora", f"finetune.base={root / 'serving'}", "train.steps=4",
                      "checkpoint.every=4"), root / "lora", **quiet)
    return dataclasses.make_dataclass("Runs", ["root", "corpus"])(root, corpus)


def one_error_line(capsys, exited) -> str:
    """The single stderr line of a command that exited with code 2."""
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# Item 1: the repro of the issue (lr 1e6, clip 1e9, a checkpoint every step), in fp32 and fp16.
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_diverging_run_saves_only_finite_checkpoints_and_names_one_of_them(runs, tmp_path, precision):
    config = tiny(runs.root, runs.corpus, "train.learning_rate=1e6", "train.grad_clip=1e9", "checkpoint.every=1",
                  "train.warmup_steps=0", "checkpoint.keep=30", f"train.precision={precision}")
    with pytest.raises(TrainingDiverged) as stopped:
        run_training(config, tmp_path, **quiet)
    store = CheckpointStore(tmp_path / "checkpoints", create=False)
    steps = store.steps()
    for step in steps:  # every checkpoint written holds finite params and optimizer state
        state = store.restore(abstract_state(config, build_model(config)), step)
        floats = [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
                  if np.issubdtype(x.dtype, np.floating)]
        assert all(np.isfinite(x).all() for x in floats), step
    store.close()
    assert f"(last good checkpoint: {steps[-1] if steps else 'none'} in " in str(stopped.value)


def poisoned_copy(source: Path, dest: Path) -> None:
    """`source`'s run plus a step 13 whose params hold a NaN, saved as a version without the finiteness check would."""
    shutil.copytree(source, dest)
    store = CheckpointStore(dest / "checkpoints", keep=5, async_save=False)
    metadata = store.metadata(12)
    config = load_config(str(dest / "config.yaml"))
    state = store.restore(abstract_state(config, build_model(config)), 12)
    params = {**state.params, "lm_head": {"kernel": jnp.full_like(state.params["lm_head"]["kernel"], jnp.nan)}}
    store.save(13, state.replace(params=params), {**metadata, "step": 13})
    store.close()


def test_evaluate_and_resume_refuse_non_finite_weights_with_exit_2_instead_of_printing_nan(runs, tmp_path, capsys):
    poisoned_copy(runs.root / "float", tmp_path / "poisoned")
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--workdir", str(tmp_path / "poisoned"), "--batches", "1", "--batch-size", "2"])
    line = one_error_line(capsys, exited)
    assert line == (f"error: checkpoint {tmp_path / 'poisoned' / 'checkpoints' / '13'} holds non-finite weights "
                    f"(NaN or inf), saved by a version that did not check; use another step (have: [12]) or train "
                    f"again")
    assert load_run(tmp_path / "poisoned", step=12).step == 12  # the earlier, finite step still reads
    with pytest.raises(UserError) as refused:
        run_training(tiny(runs.root, runs.corpus, "train.steps=12", "checkpoint.every=12"), tmp_path / "poisoned",
                     **quiet)
    assert str(refused.value) == (f"checkpoint {tmp_path / 'poisoned' / 'checkpoints'}/13 holds a non-finite state "
                                  f"(NaN or inf); remove that step folder to resume from an earlier one (have: "
                                  f"[12, 13])")


# Item 5: one writer per run.
def test_a_second_train_main_on_the_same_workdir_is_refused_naming_the_first(runs, tmp_path):
    workdir = tmp_path / "run"
    args = ["--config", "tiny", "--workdir", str(workdir), "--set", f"data.path={runs.corpus}",
            "--set", f"data.cache_dir={runs.root / 'cache'}", "--set", "train.steps=100000",
            "--set", "train.sample_tokens=0"]
    first = subprocess.Popen([sys.executable, "-m", "train.main", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "metrics.jsonl").exists():  # it holds the lock and is training
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "train.main", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: workdir {workdir} is in use by process {first.pid} (lock file {workdir / '.lock'}); wait for it to "
        f"finish or stop it, or choose another workdir"]


def test_convert_into_a_folder_another_process_is_building_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "int8"
    with lock_workdir(partial_folder(out)), pytest.raises(SystemExit) as exited:
        convert_main(["--workdir", str(runs.root / "float"), "--out", str(out), "--bits", "8"])
    assert f"is in use by process {os.getpid()}" in one_error_line(capsys, exited)
    assert not out.exists()


# Item 6: a run appears whole or not at all.
KILLED_CONVERT = textwrap.dedent("""
    import os, signal, sys
    import train.run
    from quant.convert import main
    save = train.run.CheckpointStore.save
    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # killed after writing the checkpoint, before the run is complete
    train.run.CheckpointStore.save = save_then_die
    main(["--workdir", sys.argv[1], "--out", sys.argv[2], "--bits", "8"])
""")


def test_convert_killed_during_its_save_leaves_no_run_and_the_rerun_succeeds(runs, tmp_path, capsys):
    out = tmp_path / "int8"
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERT, str(runs.root / "float"), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SLM_JAX_CACHE": str(runs.root / "cache")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and (partial_folder(out) / "checkpoints").is_dir()
    convert_main(["--workdir", str(runs.root / "float"), "--out", str(out), "--bits", "8"])
    assert "converted" in capsys.readouterr().out
    assert not partial_folder(out).exists()
    assert load_run(out).metadata["kind"] == "serving"


# Item 7: the user's file system in one line.
def test_os_errors_are_one_line_naming_the_path_with_exit_2(capsys):
    @main_guard
    def read_only(argv):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "runs/a/config.yaml")

    with pytest.raises(SystemExit) as exited:
        read_only([])
    assert one_error_line(capsys, exited) == "error: Read-only file system: runs/a/config.yaml"


def test_file_system_refusals_of_every_command_are_one_line(runs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cases = [
        (train_main, ["--config", "tiny", "--workdir", str(blocker)],
         f"error: cannot lock workdir {blocker}: it is a file, not a folder"),
        (evaluate_main, ["--workdir", str(blocker)], f"error: workdir {blocker} is a file, not a run folder"),
        (convert_main, ["--workdir", str(runs.root / "float"), "--out", str(blocker), "--bits", "8"],
         f"error: --out {blocker} is a file; give a folder for the new run"),
        (convert_main, ["--workdir", str(runs.root / "float"), "--out", str(blocker / "sub"), "--bits", "8"],
         f"error: --out {blocker / 'sub'} cannot be made: {blocker} is a file, not a folder"),  # not .sub.partial
    ]
    for main, argv, line in cases:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert one_error_line(capsys, exited) == line


def test_an_out_folder_under_an_unwritable_folder_is_refused_naming_out_not_the_partial(runs, tmp_path, capsys,
                                                                                       monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_probe = tempfile.TemporaryFile

    def probe(*args, dir=None, **kwargs):  # the suite may run as root, for whom every folder is writable
        if Path(dir) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))
        return real_probe(*args, dir=dir, **kwargs)

    monkeypatch.setattr("train.run.tempfile.TemporaryFile", probe)
    with pytest.raises(SystemExit) as exited:
        convert_main(["--workdir", str(runs.root / "float"), "--out", str(locked / "int8"), "--bits", "8"])
    assert one_error_line(capsys, exited) == \
        f"error: --out {locked / 'int8'} cannot be made: no permission to write in {locked}"
    assert list(locked.iterdir()) == []  # no .int8.partial left behind


def test_a_write_refused_by_the_file_system_during_training_is_one_line(runs, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr("train.loop.save_yaml", refuse)
    with pytest.raises(SystemExit) as exited:
        train_main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--set", f"data.path={runs.corpus}",
                    "--set", f"data.cache_dir={runs.root / 'cache'}"])
    assert one_error_line(capsys, exited) == f"error: Permission denied: {tmp_path / 'run' / 'config.yaml'}"


# Item 8: data checked before the first step.
def test_a_validation_split_too_short_for_seq_len_is_refused_before_any_step(runs, tmp_path):
    config = tiny(runs.root, runs.corpus, "data.val_fraction=0.0005", "model.seq_len=64")  # ~16 val tokens
    with pytest.raises(UserError, match=r"^validation split has \d+ tokens, too few for model.seq_len=64"):
        run_training(config, tmp_path / "run", **quiet)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


# Item 10: each command names the run kinds it takes.
@pytest.mark.parametrize("command, argv, line", [
    (convert_main, ["--workdir", "{lora}", "--out", "{tmp}/out", "--bits", "8"],
     "{lora} is a lora run; merge its adapters into its base first with python -m quant.merge (the result is a "
     "serving run)"),
    (convert_main, ["--workdir", "{serving}", "--out", "{tmp}/out", "--bits", "4"],
     "{serving} is a serving run; it is already quantized: evaluate or generate with it as it is, or convert the "
     "float or QAT run it came from"),
    (report_main, ["--workdir", "{lora}"],
     "{lora} is a lora run; report on the float or QAT run its base was converted from, or merge it first "
     "(python -m quant.merge) and report on the merged run"),
    (merge_main, ["--workdir", "{float}", "--out", "{tmp}/out"],
     "{float} is a float run; it has no adapters to merge (quantize it with python -m quant.convert)"),
    (merge_main, ["--workdir", "{serving}", "--out", "{tmp}/out"],
     "{serving} is a serving run; it has no adapters to merge (evaluate or generate with it as it is)"),
    (train_main, ["--config", "tiny", "--workdir", "{tmp}/w", "--set", "train.init_from={serving}"],
     "{serving} is a serving run; train.init_from takes a float or QAT run: its integer weights cannot train; "
     "start from the run it was converted from, or fine-tune it with LoRA (finetune.method=lora, finetune.base)"),
    (train_main, ["--config", "tiny", "--workdir", "{tmp}/w", "--set", "train.init_from={lora}"],
     "{lora} is a lora run; train.init_from takes a float or QAT run: merge it first (python -m quant.merge) and "
     "fine-tune the merged run with LoRA (finetune.base)"),
], ids=["convert-lora", "convert-serving", "report-lora", "merge-float", "merge-serving", "init-from-serving",
        "init-from-lora"])
def test_each_command_refuses_run_kinds_it_does_not_take_saying_what_to_do(runs, tmp_path, capsys, command, argv,
                                                                            line):
    names = {"lora": runs.root / "lora", "serving": runs.root / "serving", "float": runs.root / "float",
             "tmp": tmp_path}
    with pytest.raises(SystemExit) as exited:
        command([a.format(**names) for a in argv])
    assert one_error_line(capsys, exited) == "error: " + line.format(**names)
    assert not (tmp_path / "out").exists()


# The learning-rate schedule of a finished run is not changed by accident.
def test_extending_a_finished_run_is_refused_unless_train_extend_is_set(runs, tmp_path):
    shutil.copytree(runs.root / "float", tmp_path / "run")
    longer = tiny(runs.root, runs.corpus, "train.steps=16", "checkpoint.every=12")
    with pytest.raises(UserError) as refused:
        run_training(longer, tmp_path / "run", **quiet)
    assert str(refused.value) == (
        f"{tmp_path / 'run' / 'checkpoints'} was trained to step 12 with another learning-rate schedule "
        f"(train.steps 12 -> 16); resuming would change it mid-run: add --set train.extend=true to do so, or use "
        f"another --workdir")
    lines = []
    summary = run_training(dataclasses.replace(longer, train=dataclasses.replace(longer.train, extend=True)),
                           tmp_path / "run", log=lines.append)
    assert summary["step"] == 16
    assert any(line.startswith("train.extend: the learning-rate schedule changes at step 12 (train.steps 12 -> 16)")
               for line in lines)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [10, 12, 16]
