"""Sharding: the mesh config, logical axes -> PartitionSpecs, and (in a subprocess with 8 simulated CPU devices,
see tests/sharding_checks.py) sharded training, sharded params and optimizer state, and reshard-on-load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from checkpoints.manager import tree_bytes
from slm_jax.errors import UserError
from train.build import abstract_state, build_model
from train.config import load_config
from train.config_loader import build
from train.sharding import (AXES, MeshConfig, abstract_with_shardings, logical_axes, make_mesh,
                            maybe_initialize_distributed, mesh_spec, per_device_bytes, tree_shardings)

ROOT = Path(__file__).resolve().parent.parent
# Fewer LLVM passes: these checks compile six programs and only compare numbers within float tolerance.
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Results of tests/sharding_checks.py, which also asserts per-device shard shapes itself."""
    workdir = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS, "JAX_PLATFORMS": "cpu",
           "SLM_JAX_CACHE": str(workdir / "token-cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_checks.py"), str(workdir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loss_on_eight_devices_matches_one_device(eight_devices):
    losses = eight_devices["losses"]
    for mesh in ("data8", "data2_fsdp4", "data2_fsdp2_tensor2"):
        np.testing.assert_allclose(losses[mesh], losses["1"], rtol=1e-5, err_msg=mesh)
    assert losses["1"][-1] < losses["1"][0]


def test_params_and_adam_moments_are_sharded_by_logical_axes(eight_devices):
    specs = eight_devices["specs"]  # the data=2 x fsdp=4 mesh, after 5 steps
    expected = {"embed/embedding": "P('tensor', 'fsdp')", "lm_head/kernel": "P('fsdp', 'tensor')",
                "layer_0/attn/q/kernel": "P('fsdp', 'tensor')", "layer_0/attn/o/kernel": "P('tensor', 'fsdp')",
                "layer_0/mlp/up/kernel": "P('fsdp', 'tensor')", "layer_0/mlp/down/kernel": "P('tensor', 'fsdp')",
                "layer_0/attn_norm/scale": "P(None,)"}
    for tree in ("params", "mu", "nu"):
        for path, spec in expected.items():
            assert specs[f"{tree}/{path}"] == spec, (tree, path)
    params = {k.removeprefix("params/"): v for k, v in specs.items() if k.startswith("params/")}
    for tree in ("mu", "nu"):
        assert {k.removeprefix(f"{tree}/"): v for k, v in specs.items() if k.startswith(f"{tree}/")} == params
    assert eight_devices["created_in_shardings"] and eight_devices["held_matches_planned"]


def test_checkpoint_reshards_on_load_bit_exact(eight_devices):
    reshard = eight_devices["reshard"]
    assert set(reshard) == {"data2_fsdp4->fsdp4", "data2_fsdp4->single", "1->data2_fsdp2_tensor2"}
    for name, result in reshard.items():
        assert result["bit_exact"] and result["in_target_shardings"], name
    assert [r["devices"] for r in reshard.values()] == [4, 1, 8]


def test_fsdp_divides_param_and_optimizer_memory(eight_devices):
    data8, fsdp8 = eight_devices["baseline_bytes"]["data8"], eight_devices["baseline_bytes"]["fsdp8"]
    assert data8["min"] == data8["max"] and fsdp8["min"] == fsdp8["max"]
    assert fsdp8["max"] < data8["max"] / 7.5  # only the small norm scales stay replicated


def test_batch_must_split_evenly(eight_devices):
    assert "train.batch_size (6)" in eight_devices["indivisible_batch_error"]


@pytest.mark.parametrize("values, key", [({"data": 0}, "mesh.data"), ({"data": -2}, "mesh.data"),
                                         ({"fsdp": 0}, "mesh.fsdp"), ({"tensor": -1}, "mesh.tensor")])
def test_mesh_config_rejects_bad_sizes(values, key):
    with pytest.raises(UserError, match=key):
        build(MeshConfig, values, "mesh.")


def test_mesh_sizes_must_cover_the_devices():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(fsdp=4).shape(8) == (2, 4, 1)
    with pytest.raises(UserError, match=r"mesh.fsdp \* mesh.tensor = 3 must divide the number of devices \(8\)"):
        MeshConfig(fsdp=3).shape(8)
    with pytest.raises(UserError, match=r"= 4 must equal the number of devices \(8\)"):
        MeshConfig(data=2, fsdp=2).shape(8)
    with pytest.raises(UserError, match="mesh.data"):
        make_mesh(MeshConfig(data=2))  # this process has one device
    assert make_mesh(MeshConfig()).axis_names == AXES


def test_mesh_spec_only_splits_divisible_dims():
    mesh = AbstractMesh((2, 4, 2), AXES)
    assert mesh_spec((("embed", 12), ("mlp", 96)), mesh) == P("fsdp", "tensor")
    assert mesh_spec((("embed", 6), ("mlp", 7)), mesh) == P(None, None)
    assert mesh_spec((("batch", 16),), mesh) == P(("data", "fsdp"))
    assert mesh_spec((("batch", 6),), mesh) == P("data")  # trailing mesh axes dropped until they divide
    assert mesh_spec((("embed", 8), ("embed", 8)), mesh) == P("fsdp", None)  # a mesh axis splits one dim
    assert mesh_spec((("norm", 8), ("unknown", 8)), mesh) == P(None, None)


def test_state_leaves_without_axes_are_replicated_and_moments_mirror_params():
    config = load_config("tiny")
    model = build_model(config)
    shardings = tree_shardings(abstract_state(config, model), logical_axes(model), make_mesh(MeshConfig()))
    assert shardings.step.spec == P() and shardings.rng.spec == P(None)
    assert shardings.params["layer_0"]["attn"]["k"]["kernel"].spec == P("fsdp", "tensor")
    adam = shardings.opt_state[1][0]
    assert adam.count.spec == P()
    assert jax.tree_util.tree_map(lambda s: s.spec, adam.mu) == jax.tree_util.tree_map(lambda s: s.spec,
                                                                                       shardings.params)


def test_aqt_serving_weights_and_scales_take_their_kernels_axes():
    from quant.serving import serving_template
    config = load_config("tiny", ["quant.mode=serve", "quant.granularity=per_group", "quant.group_size=16",
                                  "quant.embed_bits=8"])
    template = serving_template(config.model, config.quant)
    axes = logical_axes(build_model(config, mode="none"))  # the float model still has every kernel
    specs = jax.tree_util.tree_map(lambda s: s.spec, tree_shardings(template, axes, make_mesh(MeshConfig())))
    qrhs = specs["aqt"]["layer_0"]["mlp"]["gate"]["dot_general"]["aqt"]["qrhs"]
    assert template["aqt"]["layer_0"]["mlp"]["gate"]["dot_general"]["aqt"]["qrhs"]["value"].shape == (2, 16, 96)
    assert qrhs["value"] == P(None, None, "tensor")  # [groups, group_size, mlp]: the output dim keeps "mlp"
    assert qrhs["scale"] == P(None, None, None, "tensor")
    assert specs["params"]["layer_0"]["attn_norm"]["scale"] == P(None)
    float_specs = jax.tree_util.tree_map(lambda s: s.spec, tree_shardings(
        abstract_state(config, build_model(config, mode="none")).params, axes, make_mesh(MeshConfig())))
    table = specs["aqt"]["embed"]["dot_general"]["aqt"]["qrhs"]  # the int8 embedding: [vocab, embed] like the float one
    assert table["value"] == float_specs["embed"]["embedding"] and table["value"] != P(None, None)


def test_per_device_bytes_counts_every_array_once_per_device():
    config = load_config("tiny")
    model = build_model(config)
    state = abstract_state(config, model)
    mesh = make_mesh(MeshConfig())
    abstract = abstract_with_shardings(state.params, tree_shardings(state.params, logical_axes(model), mesh))
    assert per_device_bytes(abstract) == {jax.devices()[0]: tree_bytes(state.params)["total"]}
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), state.params)
    assert per_device_bytes(jax.device_put(params)) == per_device_bytes(abstract)


def test_single_process_runs_do_not_initialize_distributed(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "SLM_JAX_DISTRIBUTED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # an sbatch allocation, but this process is not in a multi-task step
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert maybe_initialize_distributed() is False
    assert jax.process_count() == 1
