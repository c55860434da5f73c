"""Checkpoints: every format version still loads and resumes, saves survive SIGKILL, damaged input fails in one
line without touching anything, and `checkpoints.inspect` reads a checkpoint without restoring it."""
import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint.utils import TMP_DIR_SUFFIX

from checkpoints import inspect as inspect_cli
from checkpoints.manager import CheckpointStore, array_bytes, build_metadata, tree_bytes
from checkpoints.versioning import FORMAT_VERSION, MIGRATIONS, upgrade
from slm_jax.errors import UserError
from train.build import abstract_state, build_model
from train.config import Config, load_config, save_yaml
from train.data import eval_batches, load_splits
from train.loop import run_training
from train.steps import make_eval_step
from train.run import load_run

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TMP_MARK = TMP_DIR_SUFFIX  # Orbax's mark of a step folder still being written


def copy_fixture(version: int, dest: Path) -> Path:
    shutil.copytree(FIXTURES / f"v{version}_tiny", dest)
    return dest


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` (files with a hash of their bytes): equal snapshots mean nothing was
    written, deleted or added."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def raw_metadata(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "metadata" / "metadata").read_text())


# --- versioning ----------------------------------------------------------------------------------------------

def test_format_1_metadata_migrates_to_the_current_format():
    v1 = {"format_version": 1, "kind": "train", "step": 3, "config": {}, "tokenizer": {}}
    meta = upgrade(v1, "x/3")
    assert meta["format_version"] == FORMAT_VERSION and meta["migrated_from"] == 1
    assert meta["quant_plan"] is None
    assert meta["created"] == "unknown" and meta["project_version"] == "unknown"
    assert upgrade({**v1, "created": "2024-01-01"}, "x/3")["created"] == "2024-01-01"
    assert "format_version" in v1 and "quant_plan" not in v1  # the input is not modified


def test_every_format_version_has_a_migration_and_a_fixture():
    assert sorted(MIGRATIONS) == list(range(1, FORMAT_VERSION))
    for version in range(1, FORMAT_VERSION + 1):
        assert raw_metadata(FIXTURES / f"v{version}_tiny", 4)["format_version"] == version


@pytest.mark.parametrize("metadata, message", [
    ({"format_version": 7},
     rf"checkpoint format 7 is newer than this slm-jax understands \({FORMAT_VERSION}\); upgrade slm-jax"),
    ({"step": 3}, "has no format_version"),
    ({"format_version": "1"}, "invalid format_version '1'"),
    ([1, 2], "not a JSON object"),
])
def test_unknown_format_versions_are_refused_in_one_line(metadata, message):
    with pytest.raises(UserError, match=message) as err:
        upgrade(metadata, "runs/x/checkpoints/3")
    assert "runs/x/checkpoints/3" in str(err.value) and "\n" not in str(err.value)


def test_int4_arrays_count_half_a_byte():
    assert array_bytes((8, 8), jnp.int4) == 32
    assert tree_bytes({"q": jnp.zeros((8, 8), jnp.int4), "s": jnp.zeros((8,))}) == {"int4": 32, "float32": 32,
                                                                                     "total": 64}


# --- old formats load, evaluate and resume -------------------------------------------------------------------

@pytest.mark.parametrize("version", range(1, FORMAT_VERSION + 1))
def test_fixture_of_each_format_loads_evaluates_and_resumes(tmp_path, monkeypatch, version):
    before = snapshot(FIXTURES / f"v{version}_tiny")
    run_dir = copy_fixture(version, tmp_path / "run")
    # The fixture's data.path is relative to its folder (so it works in any clone): run from inside the copy.
    monkeypatch.chdir(run_dir)
    assert ("quant_plan" in raw_metadata(run_dir, 4)) == (version >= 2)

    run = load_run(run_dir)
    assert run.metadata["format_version"] == FORMAT_VERSION and run.metadata["quant_plan"] is None
    assert run.metadata.get("migrated_from") == (version if version < FORMAT_VERSION else None)
    splits = load_splits(run.config.data)
    inputs, targets = next(eval_batches(splits.val, 4, run.config.model.seq_len, 1))
    frozen = {k: v for k, v in run.variables.items() if k != "params"}
    loss = float(make_eval_step(run.model)(run.variables["params"], frozen, inputs, targets))
    assert np.isfinite(loss) and loss < np.log(256) + 0.5

    more = dataclasses.replace(run.config, train=dataclasses.replace(run.config.train, steps=run.step + 3,
                                                                    extend=True))  # a longer schedule, on purpose
    logs = []
    summary = run_training(more, run_dir, log=logs.append)
    assert any(line.startswith(f"resuming from step {run.step}") for line in logs)
    assert np.isfinite(summary["val_loss"])
    assert raw_metadata(run_dir, run.step + 3)["format_version"] == FORMAT_VERSION  # re-saved in today's format
    assert snapshot(FIXTURES / f"v{version}_tiny") == before


# --- crash safety --------------------------------------------------------------------------------------------

def test_async_save_returns_before_the_checkpoint_is_final_and_close_waits_for_it(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path  # Orbax's final rename of a step folder: held back here

    assert load_config("tiny").checkpoint.async_save
    release, rename = threading.Event(), async_path.rename

    async def held_rename(*args, **kwargs):
        await asyncio.to_thread(release.wait, 30)
        return await rename(*args, **kwargs)

    monkeypatch.setattr(async_path, "rename", held_rename)
    store = CheckpointStore(tmp_path / "checkpoints", async_save=True)
    state = {"w": jnp.ones((64, 64))}
    store.save(1, state, build_metadata({}, 1, state, {}))
    assert "1" not in os.listdir(tmp_path / "checkpoints")  # save() returned while the write goes on
    release.set()
    store.close()
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    assert CheckpointStore(tmp_path / "checkpoints", create=False).metadata(1)["step"] == 1


def kill_during_a_save(proc: subprocess.Popen, folder: Path, timeout: float = 240) -> list[str]:
    """SIGKILL `proc` as soon as it has a complete checkpoint and is writing the next one (a temporary folder),
    or right after a second one completes; returns the folder's names at the kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        names = os.listdir(folder) if folder.is_dir() else []
        complete = [n for n in names if n.isdigit()]
        if complete and (len(complete) >= 2 or any(TMP_MARK in n for n in names)):
            proc.send_signal(signal.SIGKILL)
            return names
        time.sleep(0.002)
    proc.kill()
    return []


def test_training_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, corpus_file):
    workdir = tmp_path / "w"
    command = [sys.executable, "-m", "train.main", "--config", "tiny", "--workdir", str(workdir),
               *(arg for o in (f"data.path={corpus_file}", "model.d_model=16", "model.seq_len=16",
                               "train.batch_size=4", "train.steps=8", "train.sample_tokens=0", "checkpoint.every=1",
                               "checkpoint.keep=2") for arg in ("--set", o))]
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        at_kill = kill_during_a_save(proc, workdir / "checkpoints")
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"{at_kill} {(tmp_path / 'killed.log').read_text()[-2000:]}"

    last = max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    assert CheckpointStore(workdir / "checkpoints", create=False).metadata(last)["step"] == last

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from step {last} " in rerun.stdout
    names = os.listdir(workdir / "checkpoints")
    assert not any(TMP_MARK in n for n in names)  # the unfinished save was cleaned up
    assert CheckpointStore(workdir / "checkpoints", create=False).metadata()["step"] == 8


# --- bad input: one line, exit code 2, nothing overwritten ---------------------------------------------------

def truncate_largest_array_file(run_dir: Path) -> None:
    largest = max((p for p in (run_dir / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def set_format_version(run_dir: Path, version: int) -> None:
    path = run_dir / "checkpoints" / "4" / "metadata" / "metadata"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": version}))


def fixture_config(run_dir: Path) -> Path:
    """The fixture's own config as a YAML file, with its corpus as an absolute path, for `train.main`."""
    values = raw_metadata(run_dir, 4)["config"]
    values["data"]["path"] = str(run_dir / "corpus.txt")
    path = run_dir.parent / "fixture.yaml"
    save_yaml(Config.from_dict(values), path)
    return path


def evaluate(run_dir):
    return run_cli("train.evaluate", "--workdir", str(run_dir), "--batches", "1")


def resume(run_dir, *overrides):
    return run_cli("train.main", "--config", str(fixture_config(run_dir)), "--workdir", str(run_dir),
                   "--set", "train.steps=8", *(a for o in overrides for a in ("--set", o)))


@pytest.mark.parametrize("damage, command, message", [
    (truncate_largest_array_file, resume, "checkpoints/4 is damaged: its arrays cannot be read"),
    (lambda d: (d / "checkpoints" / "4" / "metadata" / "metadata").unlink(), evaluate,
     "checkpoints/4 has no readable metadata"),
    (lambda d: set_format_version(d, 7), evaluate,
     f"checkpoint format 7 is newer than this slm-jax understands ({FORMAT_VERSION}); upgrade slm-jax"),
    (lambda d: (d / "checkpoints" / "9").mkdir(), evaluate,
     "checkpoints/9 is incomplete or not an slm-jax checkpoint"),
    (lambda d: None, lambda d: resume(d, "model.d_model=32"), "holds a run with a different model config"),
    (lambda d: (d / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink(), evaluate,
     "checkpoints/4 has no readable array metadata"),
], ids=["truncated-array-file", "missing-metadata", "newer-format", "empty-step-folder", "other-model-shape",
        "missing-ocdbt-manifest"])
def test_bad_checkpoints_fail_in_one_line_with_exit_code_2_and_change_nothing(tmp_path, damage, command, message):
    run_dir = copy_fixture(FORMAT_VERSION, tmp_path / "run")
    damage(run_dir)
    before = snapshot(run_dir / "checkpoints")
    result = command(run_dir)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert snapshot(run_dir / "checkpoints") == before


# --- inspect -------------------------------------------------------------------------------------------------

def test_inspect_prints_metadata_steps_and_every_array_without_restoring(tmp_path, monkeypatch, capsys):
    run_dir = copy_fixture(1, tmp_path / "run")
    config = Config.from_dict(raw_metadata(run_dir, 4)["config"])
    expected = jax.tree_util.tree_leaves(abstract_state(config, build_model(config)))
    monkeypatch.setattr(CheckpointStore, "restore", lambda *a, **k: pytest.fail("inspect restored the state"))
    inspect_cli.main([str(run_dir)])
    out = capsys.readouterr().out
    assert f"format      {FORMAT_VERSION} (read from format 1)" in out
    assert "steps       4" in out and "kind        train" in out and "quant plan  none (float)" in out
    assert "model       vocab_size=256 seq_len=16" in out and "kind byte, vocab_size 256" in out
    data_line = next(line for line in out.splitlines() if line.startswith("  data "))
    assert config.data.path and f"val_fraction={config.data.val_fraction}" in data_line  # the user's text: the
    assert "val_plays" not in data_line and "genres" not in data_line  # bundled corpus's settings did not apply
    assert f"state arrays ({len(expected)})" in out
    assert any(line.split()[:4] == ["params/embed/embedding", "[256,", "16]", "float32"] for line in out.splitlines())
    total = tree_bytes(expected)["total"]
    assert out.rstrip().endswith(f"total {total:,}")


@pytest.mark.parametrize("where", ["missing", "state"])
def test_inspect_of_a_folder_that_is_not_a_checkpoint_prints_one_line_and_exits_2(tmp_path, capsys, where):
    run_dir = copy_fixture(FORMAT_VERSION, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        inspect_cli.main([str(run_dir / "checkpoints" / "4" / where)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "does not exist" in err if where == "missing" else "is not a run directory or a checkpoints folder" in err


def test_inspect_of_a_step_folder_reads_that_step_and_refuses_another_step(tmp_path, capsys):
    run_dir = copy_fixture(FORMAT_VERSION, tmp_path / "run")
    step_folder = run_dir / "checkpoints" / "4"
    inspect_cli.main([str(step_folder), "--step", "4"])  # the same step twice is no conflict
    assert "step        4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        inspect_cli.main([str(step_folder), "--step", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is the folder of step 4, but --step 2 was given" in err


def test_inspect_prints_a_recorded_quant_plan_one_row_per_layer():
    layer = {"weight_bits": 4, "act_bits": 8, "granularity": "per_group", "group_size": 32, "bwd_bits": None,
             "kind": "weight"}
    lines = inspect_cli.plan_lines({"layer_0/attn/q": layer, "lm_head": None}, "qat")
    assert lines[0] == "quant plan"
    assert lines[3].split() == ["layer_0/attn/q", "int4", "int8", "per_group(32)", "float"]
    assert lines[4].split() == ["lm_head", "float", "float", "-", "float"]
    assert "not recorded" in inspect_cli.plan_lines(None, "qat")[0]
