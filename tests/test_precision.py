"""The dynamic loss scale evolves only for fp16 and stays within [1, MAX_LOSS_SCALE]. Instead of running the
250k steps after which an unbounded scale overflowed, the good-step counter is set to one step before a doubling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.precision import MAX_LOSS_SCALE, LossScale
from train.steps import init_state, make_train_step


def about_to_double(loss_scale: LossScale, scale: float) -> LossScale:
    """`loss_scale` with `scale` and one good step left before it doubles (a fake step counter)."""
    return loss_scale.replace(scale=jnp.float32(scale), good_steps=jnp.int32(loss_scale.period - 1))


def test_a_disabled_loss_scale_stays_one_and_counts_nothing():
    scale = about_to_double(LossScale.create(enabled=False), 2.0**100)  # what an fp32 run once held at ~200k steps
    assert float(scale.value) == 1.0
    for finite in (True, False, True):
        scale = scale.adjust(jnp.bool_(finite))
        assert (float(scale.scale), int(scale.good_steps), float(scale.value)) == (1.0, 0, 1.0)
    grads = {"w": jnp.array([3.0, -5.0])}
    np.testing.assert_array_equal(scale.unscale(grads)["w"], grads["w"])


@pytest.mark.parametrize("start, after", [(2.0**15, 2.0**16), (MAX_LOSS_SCALE / 2, MAX_LOSS_SCALE),
                                          (MAX_LOSS_SCALE, MAX_LOSS_SCALE)])
def test_an_fp16_loss_scale_doubles_after_its_period_up_to_the_ceiling(start, after):
    scale = about_to_double(LossScale.create(enabled=True), start).adjust(jnp.bool_(True))
    assert (float(scale.scale), int(scale.good_steps)) == (after, 0)


def test_an_fp16_loss_scale_halves_on_overflow_down_to_one():
    scale = about_to_double(LossScale.create(enabled=True), 4.0)
    scale = scale.adjust(jnp.bool_(False))
    assert (float(scale.scale), int(scale.good_steps)) == (2.0, 0)
    for _ in range(3):
        scale = scale.adjust(jnp.bool_(False))
    assert float(scale.scale) == 1.0


class Bigram(nn.Module):
    """The smallest model `make_train_step` accepts: logits [batch, seq, 8] from an embedding table."""

    @nn.compact
    def __call__(self, x, deterministic=True):
        return nn.Embed(8, 8)(x), None


@pytest.mark.parametrize("fp16, scale_after", [(False, 1.0), (True, 2.0**16)])
def test_train_step_evolves_the_loss_scale_only_for_fp16(fp16, scale_after):
    model, tx = Bigram(), optax.sgd(0.1)
    state = init_state(model, tx, seq_len=4, seed=0, fp16=fp16)
    state = state.replace(loss_scale=about_to_double(state.loss_scale, 2.0**15))
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(1, 2, 4) % 8  # [grad_accum, batch, seq]
    new_state, metrics = jax.jit(make_train_step(model, tx, skip_nonfinite=fp16))(state, (tokens, tokens))
    assert float(metrics["loss_scale"]) == (2.0**15 if fp16 else 1.0)
    assert float(new_state.loss_scale.scale) == scale_after
    assert bool(metrics["grads_finite"])
