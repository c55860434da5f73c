"""Work that cannot fit in this machine's memory is refused in one line before it starts: the lower bounds of
train.memory_check against the parameters a model really has, and the refusals of train.main and train.generate."""
import jax
import jax.numpy as jnp
import pytest

from slm_jax import ModelConfig, Transformer
from train import generate as generate_cli
from train import main as train_main
from train.memory_check import generation_bytes, model_params, physical_memory, training_bytes


@pytest.mark.parametrize("extra", [{}, {"tie_embeddings": False}, {"n_kv_heads": 2, "mlp_hidden": 96},
                                   {"head_size": 12, "n_kv_heads": 1}])
def test_model_params_counts_what_the_model_initialises(extra):
    cfg = ModelConfig(vocab_size=97, seq_len=16, n_layers=3, n_heads=4, d_model=64, **extra)
    params = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)))
    assert model_params(cfg) == sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_the_bounds_add_what_the_work_holds():
    cfg = ModelConfig(vocab_size=100, seq_len=10, n_layers=1, n_heads=2, d_model=8)
    attention = 2 * 3 * 2 * 10 * 10  # bf16 probabilities [batch 3, heads 2, 10 queries, 10 keys]
    assert training_bytes(cfg, 3) == 4 * (4 * model_params(cfg) + 2 * 3 * 10 * 100) + attention
    assert training_bytes(cfg, 3, trains_params=False) == 4 * 2 * 3 * 10 * 100 + attention
    assert generation_bytes(cfg, 5, 1000, 7, 20) == 1000 + 4 * 5 * (7 * 100 + 20)
    assert generation_bytes(cfg, 5, 1000, 7, 20, 27) == 1000 + 4 * 5 * (7 * 100 + 20) + 2 * 5 * 2 * 7 * 27
    assert physical_memory() > 1e9


@pytest.mark.parametrize("override, said", [
    ("train.batch_size=2000000000", "training this model (model.d_model 32, model.n_layers 2, model.seq_len 32) at "
                                    "train.batch_size 2000000000 needs at least"),
    ("model.d_model=2000000000", "training this model (model.d_model 2000000000, model.n_layers 2, model.seq_len 32) "
                                 "at train.batch_size 8 needs at least")])
def test_train_main_refuses_a_run_beyond_memory_before_any_work(tmp_path, capsys, override, said):
    with pytest.raises(SystemExit) as exited:
        train_main.main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--set", override])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: {said}") and err.count("\n") == 1, err
    assert f"GB of memory, more than this machine's {physical_memory() / 1e9:,.1f} GB" in err
    assert not (tmp_path / "run").exists()


def test_generate_refuses_more_samples_than_memory_holds(tiny_run, tmp_path, capsys):
    run = tiny_run(tmp_path / "run", "train.steps=2")
    with pytest.raises(SystemExit) as exited:
        generate_cli.main(["--workdir", str(run.workdir), "--num-samples", "1000000000"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: generating 1000000000 sample(s) of 200 tokens needs at "
                                                     "least") and err.count("\n") == 1, err
