"""The bench's PyTorch reference (`train.bench.torch_model`, needs the torchref extra) computes what slm-jax does:
the same logits from the same parameters; the bench section times both and reports their ratio."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from train.bench import torch_model, torch_reference  # noqa: E402
from train.build import build_model, state_initializer  # noqa: E402
from train.config import load_config  # noqa: E402

SMALL = ("model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=16", "train.precision=fp32")


@pytest.mark.parametrize("extra", [("model.tie_embeddings=true",), ("model.tie_embeddings=false",
                                                                    "model.n_kv_heads=2")])
def test_torch_model_matches_slm_jax_logits(extra):
    config = load_config("baseline", [*SMALL, *extra])
    model = build_model(config)
    params = jax.device_get(jax.jit(state_initializer(config, model))().params)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (3, 16)).astype(np.int32)
    expected, _ = model.apply({"params": params}, tokens)
    reference = torch_model.TorchTransformer(config.model)
    reference.load_jax_params(params)
    got = reference(torch.from_numpy(tokens.astype(np.int64))).detach().numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, np.asarray(expected), atol=2e-6, rtol=1e-5)


def test_reference_section_times_both_in_turn():
    result = torch_reference.measure_reference(SMALL, ("fp32", "bf16"), warmup=0, rounds=2, steps=1, say=print)
    assert [row["precision"] for row in result["rows"]] == ["fp32", "bf16"]
    for row in result["rows"]:
        assert 0 < row["jax_ms_min"] <= row["jax_ms"] <= row["jax_ms_max"]
        assert 0 < row["torch_ms_min"] <= row["torch_ms"] <= row["torch_ms_max"]
        assert row["ratio"] == pytest.approx(row["jax_ms"] / row["torch_ms"])
        # on a CPU split one device per core the step is timed data-parallel and on one device too
        assert row["devices"] == jax.device_count()
        assert ("ratio_1dev" in row) == (jax.device_count() > 1)
    assert result["spreads"]["bf16 torch step"]["n"] == 2
