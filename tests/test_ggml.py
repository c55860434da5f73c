"""quant.ggml against llama.cpp's own numpy reference (`gguf.quants`), bit for bit: block bytes, codes, scales and
the dequantized (fake-quantized) weights, on random, all-zero, negative-extreme, heavy-tailed and tied blocks."""
import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from quant import ggml

GGUF_TYPE = {ggml.Q8_0: GGMLQuantizationType.Q8_0, ggml.Q4_0: GGMLQuantizationType.Q4_0}


def kernels() -> dict[str, np.ndarray]:
    """Kernels [in, out] = [128, 48] (4 blocks per output column) made on the host with a fixed seed."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(128, 48)).astype(np.float32)
    special = normal.copy()
    special[:32, :4] = 0.0  # all-zero blocks
    special[32:64, 4:8] = -np.abs(special[32:64, 4:8])  # blocks whose extreme value is negative...
    special[32, 4:8] = -9.0  # ...and far out
    special[64:96, 8] = np.linspace(-1, 1, 32)  # +max and -max tie: Q4_0 takes the first (-1)
    return {
        "normal": normal,
        "special": special,
        "heavy_tailed": (rng.standard_cauchy(size=(128, 48)) * 1e-3).astype(np.float32),
        "ties": (rng.integers(-254, 255, size=(128, 48)) / 2).astype(np.float32),  # x / d lands on .5 often
        "wide_range": (rng.normal(size=(128, 48)) * np.exp(rng.normal(size=(128, 1)) * 6) * 1e-3).astype(np.float32),
    }


def bits_of(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32)


@pytest.mark.parametrize("scheme", ggml.SCHEMES)
def test_block_bytes_and_fake_quant_equal_gguf_bit_for_bit(scheme):
    quantize = jax.jit(ggml.quantize, static_argnums=1)
    fake_quant = jax.jit(ggml.fake_quant, static_argnums=1)
    for name, kernel in kernels().items():
        reference = gguf.quants.quantize(kernel.T, GGUF_TYPE[scheme])  # llama.cpp's rows are the kernel's columns
        codes, scales = quantize(kernel, scheme)
        chex.assert_shape(codes, (4, 32, 48))
        chex.assert_shape(scales, (4, 48))
        assert codes.dtype == jnp.int8 and scales.dtype == jnp.float16
        np.testing.assert_array_equal(ggml.to_block_bytes(codes, scales, scheme), reference, err_msg=name)
        ref_codes, ref_scales = ggml.from_block_bytes(reference, scheme)  # gguf's blocks decoded
        np.testing.assert_array_equal(np.asarray(codes), ref_codes, err_msg=name)
        np.testing.assert_array_equal(np.asarray(scales).view(np.uint16), ref_scales.view(np.uint16), err_msg=name)
        dequantized = gguf.quants.dequantize(reference, GGUF_TYPE[scheme]).T
        np.testing.assert_array_equal(bits_of(fake_quant(kernel, scheme)), bits_of(dequantized), err_msg=name)


def test_block_edge_cases_follow_ggml():
    kernel = kernels()["special"]
    codes, scales = (np.asarray(a) for a in ggml.quantize(kernel, ggml.Q4_0))
    assert np.all(codes[0, :, :4] == 0) and np.all(scales[0, :4] == 0)
    assert np.all(np.signbit(scales[0, :4]))  # ggml's d = 0 / -8 is -0.0
    assert np.all(codes[1, 0, 4:8] == -8) and np.all(scales[1, 4:8] == np.float16(9 / 8))  # negative extreme -> -8
    assert codes[2, 0, 8] == -8 and codes[2, 31, 8] == 7  # the first of -1 and +1 sets the sign; +1 clamps to 7
    assert codes.min() >= -8 and codes.max() <= 7
    q8_codes, q8_scales = (np.asarray(a) for a in ggml.quantize(kernel, ggml.Q8_0))
    assert np.all(q8_codes[0, :, :4] == 0) and np.all(q8_scales[0, :4] == 0)
    assert np.all(q8_codes[1, 0, 4:8] == -127) and np.abs(q8_codes).max() == 127


@pytest.mark.parametrize("scheme", ggml.SCHEMES)
def test_fake_quant_gradient_is_straight_through(scheme):
    kernel = kernels()["normal"]
    upstream = np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32)
    grad = jax.grad(lambda w: jnp.sum(ggml.fake_quant(w, scheme) * upstream))(kernel)
    np.testing.assert_array_equal(np.asarray(grad), upstream)


def test_input_width_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        ggml.quantize(np.ones((48, 8), np.float32), ggml.Q8_0)
