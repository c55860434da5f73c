"""KL divergence and top-1 agreement against a plain numpy computation."""
import numpy as np

from quant.kl import compare_logits, token_kl


def test_kl_and_top1_match_a_plain_computation():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (2, 50, 11)).astype(np.float32)
    quant = ref + rng.normal(0, 0.5, ref.shape).astype(np.float32)
    p = np.exp(ref.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(quant.astype(np.float64))
    q /= q.sum(-1, keepdims=True)
    kl = np.sum(p * np.log(p / q), axis=-1)
    got = compare_logits(ref, quant)
    np.testing.assert_allclose(got["kl_mean"], kl.mean(), rtol=1e-10)
    np.testing.assert_allclose(got["kl_p99"], np.sort(kl.ravel())[98] + 0.01 * (np.sort(kl.ravel())[99] -
                                                                               np.sort(kl.ravel())[98]), rtol=1e-10)
    assert got["top1"] == np.mean(ref.argmax(-1) == quant.argmax(-1))
    assert 0 < got["top1"] < 1 and got["kl_mean"] > 0


def test_identical_and_shifted_logits_have_zero_kl():
    ref = np.random.default_rng(1).normal(size=(1, 4, 7))
    kl, agree = token_kl(ref, ref + 5.0)  # softmax ignores a constant shift
    np.testing.assert_allclose(kl, 0, atol=1e-12)
    assert kl.shape == (1, 4) and agree.all()
