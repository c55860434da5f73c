"""Shared fixtures: the tiny config and a small corpus, with token caches kept inside pytest's tmp dirs, and
trained `tiny` runs that several test modules start from, trained once per session and copied to each caller."""
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

from train.config import load_config
from train.cpu_devices import FORCE_FLAG, with_device_count
from train.loop import run_training

ROOT = Path(__file__).resolve().parent.parent
XLA_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole session: the xdist workers and every `python -m ...`
    child inherit its folder through the environment, so the train/eval steps that many tests compile alike (and
    each CLI child compiles afresh) are compiled once. A user's own cache setting is left alone."""
    pin_one_cpu_device()
    if os.environ.get(XLA_CACHE_ENV):
        return
    folder = tempfile.mkdtemp(prefix="slm-jax-xla-cache-")
    config._slm_jax_xla_cache = folder
    os.environ.update({XLA_CACHE_ENV: folder, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"})
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pin_one_cpu_device():
    """`python -m train.main` children train on one CPU device unless a test sets XLA_FLAGS itself: splitting the
    host into one device per core (train.cpu_devices) adds compile time that the suite's tiny runs never win back.
    tests/test_cpu_devices.py runs the split. The suite's programs are also compiled without LLVM's optimisations
    (FAST_COMPILE_FLAG): its tiny models run for a few steps, so compiling dominates (about a fifth less CPU time
    for the whole suite); XLA's own HLO passes and the numerics they define are unchanged."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FORCE_FLAG not in flags:
        flags = f"{flags} {FORCE_FLAG}=1"
    if "--xla_backend_optimization_level" not in flags:
        flags = f"{flags} {FAST_COMPILE_FLAG}"
    os.environ["XLA_FLAGS"] = flags.strip()


# Slowest files first (worker seconds measured under xdist, session 17): `--dist loadfile` hands whole files to the
# workers in collection order (pyproject.toml turns off xdist's own reordering by number of tests, which put the
# one-test bench file last), so a long file collected last would run alone while the other worker sits idle.
SLOW_FILES_FIRST = ("test_multiprocess.py", "test_train.py", "test_quant_cli.py", "test_bench.py", "test_tryout_b.py",
                    "test_serve_speed.py", "test_checkpoints.py", "test_serve_group.py", "test_readme.py",
                    "test_quant_model.py", "test_model_context.py", "test_lora.py", "test_tryout_d.py",
                    "test_tryout_e.py", "test_run_safety.py", "test_cpu_devices.py", "test_gguf_export.py",
                    "test_hf.py", "test_sampling.py", "test_tryout_a.py", "test_model.py", "test_sharding.py",
                    "test_ptq_methods.py", "test_mesh_restore.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


def pytest_unconfigure(config):
    folder = getattr(config, "_slm_jax_xla_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a per-session temp folder, never the user's ~/.cache."""
    monkeypatch.setenv("SLM_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))


def speaker_text(lines: int, tail: str = "") -> str:
    """A small corpus of `lines` numbered speeches by seven speakers (about 60 bytes each), `tail` before each
    speech's full stop."""
    return "".join(f"SPEAKER{i % 7}:\nThe quick brown fox {i} jumps over the lazy dog{tail}.\n\n"
                   for i in range(lines))


@pytest.fixture
def corpus_file(tmp_path):
    """A small plain-text corpus (a user's own file) of about 60 KB."""
    path = tmp_path / "corpus.txt"
    path.write_text(speaker_text(800, ", and so on"))
    return path


@dataclasses.dataclass(frozen=True)
class TinyRun:
    """A trained run copied for one caller: its workdir, the corpus and token cache folder it was trained with
    (shared, read-only), and what the training printed."""

    workdir: Path
    corpus: Path
    cache: Path
    log: str


def train_tiny(root: Path, config: str, overrides: tuple[str, ...], lines: int, tail: str, devices: int) -> TinyRun:
    """Train `config` with `overrides` on `speaker_text(lines, tail)` in root / "run": in this process on one
    device, or as `python -m train.main` on `devices` simulated CPU devices (XLA_FLAGS is per process)."""
    corpus, cache, workdir = root / "corpus.txt", root / "cache", root / "run"
    corpus.write_text(speaker_text(lines, tail))
    sets = (*overrides, f"data.path={corpus}", f"data.cache_dir={cache}")
    if devices == 1:
        printed = []
        run_training(load_config(config, sets), workdir, log=printed.append)
        return TinyRun(workdir, corpus, cache, "\n".join(map(str, printed)))
    result = subprocess.run([sys.executable, "-m", "train.main", "--config", config, "--workdir", str(workdir),
                             *(arg for s in sets for arg in ("--set", s))], cwd=ROOT, capture_output=True, text=True,
                            timeout=600,
                            env={**os.environ, "XLA_FLAGS": with_device_count(os.environ["XLA_FLAGS"], devices)})
    assert result.returncode == 0, result.stderr
    return TinyRun(workdir, corpus, cache, result.stdout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Factory: `tiny_run(dest, *overrides, config="tiny", lines=600, tail="", devices=1)` -> TinyRun whose workdir
    is a private copy at `dest` of `config` trained with `overrides` on `speaker_text(lines, tail)`.

    Each distinct set of arguments trains once per session (with pytest-xdist, once per worker process: each has
    its own session) and every call copies it, so no test module sees another's changes to its run."""
    trained = {}

    def make(dest: Path, *overrides: str, config: str = "tiny", lines: int = 600, tail: str = "",
             devices: int = 1) -> TinyRun:
        key = (config, overrides, lines, tail, devices)
        if key not in trained:
            trained[key] = train_tiny(tmp_path_factory.mktemp("tiny_run"), config, overrides, lines, tail, devices)
        shutil.copytree(trained[key].workdir, dest)
        return dataclasses.replace(trained[key], workdir=Path(dest))

    return make
