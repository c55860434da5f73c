"""The bench's matmul floor (train.bench.floor, and its command train.bench.matmul_floor): the step's matmuls,
their FLOPs against the bench's model-FLOPs formula on a real model's parameters, and the timing of them all in one
jit."""
import jax
import numpy as np
import pytest

from train.bench.floor import matmul_flops, measure_floor, step_matmuls
from train.bench.matmul_floor import main
from train.bench.speed import flops_per_token, matmul_params
from train.build import build_model, state_initializer
from train.config import load_config


def model_flops(overrides):
    """FLOPs per step by the bench's formula, N counted from the kernels of the model the config builds."""
    config = load_config("baseline", overrides)
    state = jax.eval_shape(state_initializer(config, build_model(config)))
    tokens = config.train.batch_size * config.model.seq_len
    return config, flops_per_token(config, matmul_params(state.params, config.model)) * tokens


def test_step_matmuls_count_the_model_flops_of_a_grouped_query_model():
    # untied head, grouped-query attention (2 KV heads for 4), an MLP width of its own: every weight shape differs
    config, expected = model_flops(["model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
                                    "model.mlp_hidden=96", "model.seq_len=32", "train.batch_size=3",
                                    "model.tie_embeddings=false"])
    shapes = step_matmuls(config.model, config.train.batch_size)
    assert len(shapes) == 3 * (7 * 3 + 1) + 6 * 3
    assert matmul_flops(shapes) == expected
    for lhs, rhs in shapes:  # every pair is a valid (batched) matmul
        assert lhs[-1] == rhs[-2] and lhs[:-2] == rhs[:-2]
    tokens = 3 * 32
    assert ((tokens, 64), (64, 32)) in shapes  # k: d_model -> 2 KV heads x head_dim 16
    assert ((64, tokens), (tokens, 96)) in shapes  # gate / up weight gradient
    assert ((3 * 4, 32, 32), (3 * 4, 32, 16)) in shapes  # P V over batch x heads


def test_matmul_flops_is_two_multiply_adds_per_product_term():
    assert matmul_flops([((2, 3), (3, 5))]) == 2 * 2 * 3 * 5
    assert matmul_flops([((4, 2, 3), (4, 3, 5)), ((1, 1), (1, 1))]) == 2 * 4 * 2 * 3 * 5 + 2


def test_measure_floor_times_every_matmul_and_reports_its_rate():
    config = load_config("tiny")
    floor = measure_floor(config.model, 2, reps=3)
    shapes = step_matmuls(config.model, 2)
    assert floor["matmuls"] == len(shapes) and floor["flops"] == matmul_flops(shapes)
    assert 0 < floor["min_s"] <= floor["median_s"] <= floor["max_s"]
    assert np.isclose(floor["gflops"], floor["flops"] / floor["median_s"] / 1e9)
    assert floor["spread"]["n"] == 3


def test_the_command_prints_the_floor_and_refuses_bad_input_in_one_line(capsys):
    main(["--config", "tiny", "--set", "train.batch_size=2", "--reps", "2"])
    out = capsys.readouterr().out
    config = load_config("tiny", ["train.batch_size=2"])
    shapes = step_matmuls(config.model, 2)
    assert out.startswith(f"tiny (batch 2 x seq_len {config.model.seq_len}): {len(shapes)} matmuls, "
                          f"{matmul_flops(shapes) / 1e9:.2f} GFLOP, alone in one jit ")
    assert "MFU ceiling" in out
    with pytest.raises(SystemExit) as stop:
        main(["--config", "tiny", "--set", "model.d_model=0"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: model.d_model must be a positive integer, got 0"
