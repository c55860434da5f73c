"""How the training loop compiles its steps on CPU: YNNPACK gets the dots and XLA keeps the reductions (see
train.steps.CPU_COMPILER_OPTIONS), with the same losses as XLA's defaults, unless activations are quantized."""
import re

import jax
import numpy as np
import pytest

from train.build import build_model, state_initializer
from train.config import load_config
from train.optim import make_optimizer
from train.sharding import MeshConfig, batch_sharding, make_mesh, shard_batch, shard_train_step, state_shardings
from train.steps import CPU_COMPILER_OPTIONS, make_train_step, steps_compiler_options

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA CPU's")


def ynn_fusion_ops(hlo: str) -> list[set[str]]:
    """For each YNNPACK fusion in an optimized HLO module's text, the set of opcodes its fused computation holds."""
    computations = dict(re.findall(r"^%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    called = re.findall(r'fusion\([^\n]*calls=%?([\w.-]+)[^\n]*"kind":"__ynn_fusion"', hlo)
    return [set(re.findall(r"= \S+ ([a-z][\w-]*)\(", computations[name])) for name in called]


@pytest.fixture(scope="module")
def tiny_step():
    config = load_config("tiny", ["train.precision=fp32"])
    model = build_model(config)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    init = state_initializer(config, model)
    shardings = state_shardings(init, model, mesh)
    state = jax.jit(init, out_shardings=shardings)()
    tokens = np.random.default_rng(0).integers(0, 256, (1, config.train.batch_size, config.model.seq_len + 1))
    batch = shard_batch((tokens[..., :-1].astype(np.int32), tokens[..., 1:].astype(np.int32)), batch_sharding(mesh))
    return model, make_optimizer(config.train), shardings, state, batch, mesh


def test_the_loop_s_train_step_gives_ynnpack_dots_only(tiny_step):
    model, tx, shardings, state, batch, mesh = tiny_step
    options = steps_compiler_options(load_config("tiny").quant)
    assert options == CPU_COMPILER_OPTIONS
    step = shard_train_step(make_train_step(model, tx), shardings, batch_sharding(mesh), options)
    fusions = ynn_fusion_ops(step.lower(state, batch).compile().as_text())
    assert fusions and all("dot" in ops for ops in fusions)
    assert not any(ops & {"reduce", "reduce-window"} for ops in fusions)

    default = jax.jit(make_train_step(model, tx)).lower(state, batch).compile().as_text()
    assert any(ops & {"reduce", "reduce-window"} for ops in ynn_fusion_ops(default))  # what the option removes


def test_the_options_keep_the_loss_and_gradient_norm(tiny_step):
    model, tx, shardings, state, batch, mesh = tiny_step
    step = make_train_step(model, tx)
    _, ours = jax.jit(step, compiler_options=steps_compiler_options())(state, batch)
    _, default = jax.jit(step)(state, batch)
    np.testing.assert_allclose(float(ours["loss"]), float(default["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ours["grad_norm"]), float(default["grad_norm"]), rtol=1e-5)


@pytest.mark.parametrize("config, overrides, options", [
    ("tiny", (), CPU_COMPILER_OPTIONS),
    ("int4_qat", (), CPU_COMPILER_OPTIONS),  # weight-only QAT
    ("int8_qat", (), None),  # w8a8: YNNPACK's reductions serve the per-token abs-max of every matmul input
    ("int4_qat", ("quant.act_bits=8",), None),
    ("int4_qat", ("quant.act_bits=null", "quant.rules=[{match: mlp, act_bits: 8}]"), None),
    ("int8_qat", ("quant.mode=none",), CPU_COMPILER_OPTIONS),
])
def test_options_follow_whether_activations_are_quantized(config, overrides, options):
    assert steps_compiler_options(load_config(config, list(overrides)).quant) == options
