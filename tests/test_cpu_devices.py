"""One XLA device per CPU core (train.cpu_devices): how many devices a run picks, that the user's own choice wins,
and that a CPU run split into devices trains data-parallel with the losses of the one-device run."""
import json
import os
import subprocess
import sys

import pytest

from train.cpu_devices import (FORCE_FLAG, MAX_AUTO_DEVICES, MIN_SPLIT_FLOPS, cpu_device_count, split_cpu_host,
                               step_flops, with_device_count)
from train.sharding import MeshConfig
from slm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mesh, batch, cores, expected", [
    (MeshConfig(), 12, 2, 2),  # one device per core
    (MeshConfig(), 7, 2, 1),  # a batch the cores do not split evenly stays on one device
    (MeshConfig(), 16, 32, MAX_AUTO_DEVICES),  # capped
    (MeshConfig(), 12, 16, 6),  # the most devices up to the cap that split 12 rows
    (MeshConfig(), 8, 1, 1),
    (MeshConfig(fsdp=2), 8, 3, 2),  # fsdp must divide the device count
    (MeshConfig(tensor=2), 3, 4, 2),  # 4 devices would split 3 rows two ways; 2 devices leave 1 data replica
    (MeshConfig(fsdp=4), 8, 2, 4),  # more than the cores when the mesh asks for it
    (MeshConfig(data=2, fsdp=2), 8, 2, 4),  # an explicit mesh gets exactly its devices
    (MeshConfig(cpu_devices=3), 12, 2, 3),  # an explicit count wins
])
def test_device_count(mesh, batch, cores, expected):
    assert cpu_device_count(mesh, batch, cores) == expected
    assert cpu_device_count(mesh, batch, cores, flops=MIN_SPLIT_FLOPS) == expected  # big enough to split


@pytest.mark.parametrize("mesh, expected", [
    (MeshConfig(), 1),  # too small to gain from the split
    (MeshConfig(fsdp=2), 2),  # the fewest devices the mesh allows
    (MeshConfig(cpu_devices=2), 2),  # an explicit count wins
    (MeshConfig(data=2), 2),  # so does an explicit mesh
])
def test_a_small_step_stays_on_the_fewest_devices(mesh, expected):
    assert cpu_device_count(mesh, 8, 2, flops=MIN_SPLIT_FLOPS / 2) == expected


def test_step_flops_counts_six_per_matmul_weight_and_token():
    """6 x tokens x matmul weights, against a count by hand: `baseline` (vocab 256, width 128, 4 layers, 4 heads,
    SwiGLU hidden 352, untied LM head) over 16 x 128 tokens."""
    from train.config import load_config
    model = load_config("baseline").model
    weights = 4 * (4 * 128 * 128 + 3 * 128 * 352) + 256 * 128
    assert model.hidden == 352 and step_flops(model, 16 * 128) == 6 * 16 * 128 * weights


def test_negative_count_is_a_user_error():
    with pytest.raises(UserError, match="mesh.cpu_devices"):
        MeshConfig(cpu_devices=-1)


@pytest.mark.parametrize("env", [{"XLA_FLAGS": f"--xla_cpu_foo=1 {FORCE_FLAG}=4"}, {"JAX_NUM_CPU_DEVICES": "4"}])
def test_the_environment_wins(env, monkeypatch):
    calls = []
    monkeypatch.setattr("jax.config.update", lambda *args: calls.append(args))
    assert split_cpu_host(MeshConfig(), 12, env=env) is None
    assert calls == []


def test_with_device_count_replaces_only_the_device_flag():
    flags = f"--xla_a=1 {FORCE_FLAG}=4 --xla_b=2"
    assert with_device_count(flags, 2) == f"--xla_a=1 --xla_b=2 {FORCE_FLAG}=2"
    assert with_device_count(flags, None) == "--xla_a=1 --xla_b=2"
    assert with_device_count("", 3) == f"{FORCE_FLAG}=3"


def test_split_sets_the_backend_device_count():
    code = ("import jax; from train.cpu_devices import split_cpu_host; from train.sharding import MeshConfig; "
            "n = split_cpu_host(MeshConfig(cpu_devices=3), 12, env={}); print(n, jax.device_count())")
    env = {**os.environ, "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), None),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "3"]


def losses(workdir) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], key, row[key]) for row in rows for key in ("loss", "val_loss") if key in row]


def test_cli_trains_data_parallel_over_the_cores(tiny_run, tmp_path):
    """`train.main` with no device flags in the environment and mesh.cpu_devices=2 splits the host in two (the
    tiny model is too small for the default to split it) and gives the losses of the same run on one device, up to
    the order of the gradient sum."""
    reference = tiny_run(tmp_path / "one-device")
    expected = 2
    env = {**os.environ, "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), None),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "train.main", "--config", "tiny", "--workdir", str(tmp_path / "cores"),
                          "--set", f"data.path={reference.corpus}", "--set", f"data.cache_dir={reference.cache}",
                          "--set", "mesh.cpu_devices=2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"mesh {{'data': {expected}, 'fsdp': 1, 'tensor': 1}}" in out.stdout
    assert "mesh {'data': 1," in reference.log
    got, want = losses(tmp_path / "cores"), losses(reference.workdir)
    assert [row[:2] for row in got] == [row[:2] for row in want]
    assert [row[2] for row in got] == pytest.approx([row[2] for row in want], abs=2e-5)


PLACED = """
import jax, numpy as np
from train.bench.common import fixed_batch, placed_step
from train.build import build_model, state_initializer
from train.config import load_config
sets = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16", "train.batch_size=4"]
out = []
for extra in (["mesh.cpu_devices=2"], ["mesh.cpu_devices=1"]):
    config = load_config("baseline", sets + extra)
    model = build_model(config)
    step, state, batch, devices = placed_step(config, model, jax.jit(state_initializer(config, model))(),
                                              fixed_batch(config))
    for _ in range(3):
        state, metrics = step(state, batch)
    shards = len(batch[0].sharding.device_set)
    out.append((devices, shards, float(metrics["loss"]), float(metrics["grad_norm"])))
import json; print(json.dumps(out))
"""


def test_bench_times_the_step_data_parallel():
    """The bench's `placed_step` on a CPU split in 2: data-parallel over both devices (the batch split across them)
    with the one-device step's loss and gradient norm after 3 steps; with mesh.cpu_devices=1, one device."""
    env = {**os.environ, "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), 2),
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PLACED], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    (devices, shards, loss, norm), (devices1, shards1, loss1, norm1) = json.loads(out.stdout.strip().splitlines()[-1])
    assert (devices, shards, devices1, shards1) == (2, 2, 1, 1)
    assert loss == pytest.approx(loss1, abs=1e-5) and norm == pytest.approx(norm1, rel=1e-4)


def test_fewer_devices_than_asked_or_than_cores_is_said_in_one_line(monkeypatch):
    from train.config import load_config
    from train.main import cpu_split_note
    monkeypatch.setattr("train.main.usable_cores", lambda: 2)

    def note(config, count):
        return cpu_split_note(config, count, step_flops(config.model, config.train.batch_size * config.model.seq_len))

    env_won = note(load_config("tiny", ["mesh.cpu_devices=3"]), None)
    assert "mesh.cpu_devices=3 is not used" in env_won and "XLA_FLAGS" in env_won
    uneven = note(load_config("baseline", ["train.batch_size=7"]), 1)
    assert uneven == ("note: train.batch_size 7 does not split evenly over 2 cores: training on 1 CPU device(s) "
                      "(mesh.cpu_devices)")
    assert note(load_config("baseline"), 2) is None  # one device per core: nothing to say
    assert note(load_config("tiny"), 1) is None  # too small to split: one device is expected
    assert note(load_config("tiny", ["mesh.cpu_devices=1"]), 1) is None  # asked for
