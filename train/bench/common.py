"""What the bench's sections share: the machine's name and description, progress lines, how a run is named on a
command line, step timing and the fixed batch steps are timed on, and peak-memory measurement of child processes.
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from slm_jax.errors import UserError
from train.cpu_devices import cpu_device_count, step_flops
from train.optim import make_optimizer
from train.sharding import MeshConfig, batch_sharding, make_mesh, shard_batch, shard_train_step
from train.steps import make_train_step, steps_compiler_options

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: child processes run from here
TIME_BIN = Path("/usr/bin/time")


def device_name() -> str:
    """`cpu-2core` on a CPU, else the accelerator's kind as a slug (`nvidia-h100-80gb-hbm3`, `-x8` for eight)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    kind = re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-")
    return kind + (f"-x{jax.device_count()}" if jax.device_count() > 1 else "")


def describe_machine() -> dict:
    """The device, counts, versions and load average that results.json records with every bench."""
    device = jax.devices()[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"name": device_name(), "platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "python": platform.python_version(), "load_average_at_start": load and [round(x, 2) for x in load]}


def git_revision() -> str | None:
    """The short commit of the repository (`-dirty` with uncommitted changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


class Progress:
    """Progress lines with the time since the bench started."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        seconds = int(self.elapsed())
        print(f"[bench {seconds // 60:>2}:{seconds % 60:02d}] {message}", flush=True)


def shown(path: Path) -> str:
    """A path as a command line would name it: relative to the current folder when inside it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def train_command(config_name: str, overrides, workdir: Path) -> str:
    """The `python -m train.main` command line that makes the run in `workdir`."""
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    return f"python -m train.main --config {config_name} {sets} --workdir {shlex.quote(shown(workdir))}"


def quiet(say):
    """A `log` for run_training/convert_workdir: the first line of each message, indented (no plan tables)."""
    return lambda message: say("    " + str(message).splitlines()[0])


def timed(fn) -> float:
    """Seconds `fn()` takes until its result is ready on the device."""
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - tic


def timed_steps(step, state, batch, steps: int) -> tuple:
    """Run the jitted training `step` `steps` times from `state` on `batch` -> (the last state, each step's seconds
    until its state and metrics are ready on the device)."""
    seconds = []
    for _ in range(steps):
        tic = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - tic)
    return state, seconds


def placed_step(config, model, state, batch) -> tuple:
    """`config`'s training step as `train.main` runs it on this host -> (jitted step, state, batch, devices): with
    the loop's compiler options, and on a CPU split into devices (train.cpu_devices) data-parallel over as many as
    `config.mesh` picks for its batch (state replicated, the batch's rows split), as the loop's mesh does with one
    device per core. Elsewhere, or on one device, a plain jit on the default device. Raises UserError for a mesh
    with fsdp or tensor above 1 (the bench times data parallelism only)."""
    options = steps_compiler_options(config.quant)
    train_step = make_train_step(model, make_optimizer(config.train))
    devices = jax.devices()
    flops = step_flops(config.model, config.train.batch_size * config.model.seq_len)
    count = cpu_device_count(config.mesh, config.train.batch_size, len(devices), flops) \
        if devices[0].platform == "cpu" else 1
    if count == 1:
        return jax.jit(train_step, donate_argnums=0, compiler_options=options), state, batch, 1
    if config.mesh.fsdp * config.mesh.tensor != 1:
        raise UserError("the bench times data-parallel steps only: leave mesh.fsdp and mesh.tensor at 1")
    mesh = make_mesh(MeshConfig(), devices[:count])
    replicated, rows = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh)
    step = shard_train_step(train_step, replicated, rows, options)
    return step, jax.device_put(state, replicated), shard_batch(jax.device_get(batch), rows), count


def fixed_batch(config):
    """One batch of random tokens shaped as the training loop's: (inputs, targets), each [grad_accum, batch, seq]."""
    shape = (config.train.grad_accum, config.train.batch_size, config.model.seq_len)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, *shape), dtype=np.int32)
    return jnp.asarray(tokens[0]), jnp.asarray(tokens[1])


def folder_bytes(folder: Path) -> int:
    """Bytes of every file below `folder` (a checkpoint on disk)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def start_measured(command: list[str]) -> subprocess.Popen:
    """Start `command` in the repository, under `/usr/bin/time -v` when there is one."""
    prefix = [str(TIME_BIN), "-v"] if TIME_BIN.exists() else []
    return subprocess.Popen(prefix + command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_measured(proc: subprocess.Popen) -> dict:
    """Peak RSS of a process from `start_measured`: from /usr/bin/time -v, else from the kernel's wait4 record."""
    if not TIME_BIN.exists():
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"peak_rss_bytes": rss if code == 0 else None, "rss_method": "wait4", "exit_code": code}
    _, err = proc.communicate(timeout=900)
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    result = {"peak_rss_bytes": int(found.group(1)) * 1024 if found and proc.returncode == 0 else None,
              "rss_method": "/usr/bin/time -v", "exit_code": proc.returncode}
    if proc.returncode:
        own = err.split("\tCommand being timed:")[0]  # the command's stderr, before /usr/bin/time's report
        own = "\n".join(line for line in own.splitlines() if not line.startswith("Command exited with non-zero"))
        result["error"] = (own.strip().splitlines() or ["no output"])[-1]
    return result


def peak_rss(commands: dict[str, list[str]]) -> dict[str, dict]:
    """Run the commands (at once on a CPU, where memory is all they share; one by one on an accelerator)."""
    if jax.default_backend() == "cpu":
        procs = {name: start_measured(cmd) for name, cmd in commands.items()}
        return {name: finish_measured(proc) for name, proc in procs.items()}
    return {name: finish_measured(start_measured(cmd)) for name, cmd in commands.items()}
