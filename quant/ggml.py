"""ggml's Q8_0 and Q4_0 block formats as JAX functions, bit for bit those of llama.cpp's reference quantizer.

QAT fake-quantizes with them, `quant.convert` stores their integer codes and float16 scales, and the GGUF export
packs those codes into ggml's block bytes unchanged. The reference is `quantize_row_q8_0_ref` /
`quantize_row_q4_0_ref` in ggml-quants.c, mirrored in numpy by `gguf.quants` (the tests compare against it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # values per block (QK8_0 = QK4_0 = 32), along the input (contracting) axis of a kernel [in, out]
Q8_0, Q4_0 = "ggml_q8_0", "ggml_q4_0"
BITS = {Q8_0: 8, Q4_0: 4}  # the integer width of each scheme's codes
SCHEMES = tuple(BITS)
TYPE_SIZE = {Q8_0: 2 + BLOCK, Q4_0: 2 + BLOCK // 2}  # bytes per block: float16 scale, then the codes


def _blocks(kernel: jax.Array) -> jax.Array:
    """kernel [in, out] -> float32 [in // 32, 32, out]: each [g, :, o] is one ggml block of output row o."""
    fan_in, out = kernel.shape
    if fan_in % BLOCK:
        raise ValueError(f"the input width ({fan_in}) of a ggml-quantized kernel must be a multiple of {BLOCK}")
    return jnp.asarray(kernel, jnp.float32).reshape(fan_in // BLOCK, BLOCK, out)


def _inverse(d: jax.Array) -> jax.Array:
    """1 / d, and 0 where d == 0 (an all-zero block), as ggml's `id = d ? 1.0f/d : 0.0f`."""
    return jnp.where(d == 0, jnp.float32(0), 1 / jnp.where(d == 0, jnp.float32(1), d))


def _roundf(x: jax.Array) -> jax.Array:
    """C's roundf: nearest integer, halves away from zero, exactly (floor(|x| + 0.5) rounds 0.49999997 up)."""
    a = jnp.abs(x)
    whole = jnp.floor(a)
    return jnp.sign(x) * (whole + jnp.floor(2 * (a - whole)))


def quantize(kernel: jax.Array, scheme: str) -> tuple[jax.Array, jax.Array]:
    """Blocks of 32 along the input axis of `kernel` [in, out] -> (codes int8 [in // 32, 32, out], scales float16
    [in // 32, out]); the kernel stands for codes * scales.

    Q8_0: d = max|x| / 127, codes = roundf(x / d) in [-127, 127]. Q4_0: d = m / -8 with m the block's value of
    largest magnitude (the first, on ties) with its sign, codes = min(15, trunc(x / d + 8.5)) - 8 in [-8, 7], so m
    itself is -8 exactly. Both divide by the float32 d and store d rounded to float16 (round to nearest even); an
    all-zero block gets d = 0 (-0.0 for Q4_0, as in ggml) and codes 0. Input of any float dtype is taken as float32.
    """
    blocks = _blocks(kernel)
    if scheme == Q8_0:
        amax = jnp.max(jnp.abs(blocks), axis=1)
        # 127 as a value of the data (NaN stays NaN): XLA would turn a division by the constant 127 into a product
        # with its rounded inverse, which differs from ggml's division in the last bit of some scales.
        d = amax / jnp.where(jnp.isnan(amax), amax, jnp.float32(127))
        codes = _roundf(blocks * _inverse(d)[:, None])
    elif scheme == Q4_0:
        first = jnp.argmax(jnp.abs(blocks), axis=1)[:, None]  # argmax returns the first of equal magnitudes
        d = jnp.take_along_axis(blocks, first, axis=1)[:, 0] / jnp.float32(-8)
        codes = jnp.minimum(jnp.trunc(blocks * _inverse(d)[:, None] + jnp.float32(8.5)), 15) - 8
    else:
        raise ValueError(f"unknown ggml scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return codes.astype(jnp.int8), d.astype(jnp.float16)


def dequantize(codes: jax.Array, scales: jax.Array) -> jax.Array:
    """(codes [groups, 32, out] integers, scales [groups, out]) -> the float32 kernel [groups * 32, out] they stand
    for: float32(code) * float32(scale), the product ggml's dequantize_row_q8_0 / q4_0 compute."""
    values = jnp.asarray(codes).astype(jnp.float32) * jnp.asarray(scales).astype(jnp.float32)[:, None, :]
    return values.reshape(-1, values.shape[-1])


@jax.custom_vjp
def _straight_through(kernel: jax.Array, quantized: jax.Array) -> jax.Array:
    return quantized


def _forward(kernel, quantized):
    return quantized, None


def _backward(_, grad):
    return grad, None


_straight_through.defvjp(_forward, _backward)


def fake_quant(kernel: jax.Array, scheme: str) -> jax.Array:
    """dequantize(quantize(kernel)) [in, out] float32, bit for bit, with the straight-through gradient (identity
    with respect to `kernel`, Bengio et al. 2013), for quantization-aware training."""
    quantized = jax.lax.stop_gradient(dequantize(*quantize(kernel, scheme)))
    return _straight_through(jnp.asarray(kernel, jnp.float32), quantized)


def to_block_bytes(codes: np.ndarray, scales: np.ndarray, scheme: str) -> np.ndarray:
    """Codes [groups, 32, out] and float16 scales [groups, out] -> ggml's blocks, uint8 [out, groups * type_size]:
    the rows of the GGUF tensor for the matrix [out, in] (llama.cpp's row-major weight, the kernel transposed).

    Q8_0 block: float16 d, then 32 int8 codes. Q4_0 block: float16 d, then 16 bytes whose low nibbles hold codes
    0..15 + 8 and whose high nibbles hold codes 16..31 + 8 (ggml's block_q4_0).
    """
    codes, scales = np.asarray(codes), np.asarray(scales, np.float16)
    groups, _, out = codes.shape
    rows = np.ascontiguousarray(codes.transpose(2, 0, 1)).astype(np.int8)  # [out, groups, 32]
    if scheme == Q8_0:
        packed = rows.view(np.uint8)
    elif scheme == Q4_0:
        unsigned = (rows + 8).astype(np.uint8)
        packed = unsigned[..., : BLOCK // 2] | (unsigned[..., BLOCK // 2:] << np.uint8(4))
    else:
        raise ValueError(f"unknown ggml scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    d = np.ascontiguousarray(scales.T).view(np.uint8).reshape(out, groups, 2)
    return np.concatenate([d, packed], axis=-1).reshape(out, groups * TYPE_SIZE[scheme])


def from_block_bytes(data: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `to_block_bytes`: uint8 [out, groups * type_size] -> (codes int8 [groups, 32, out], scales
    float16 [groups, out])."""
    data = np.asarray(data, np.uint8)
    out = data.shape[0]
    blocks = data.reshape(out, -1, TYPE_SIZE[scheme])
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]  # [out, groups]
    packed = blocks[..., 2:]
    if scheme == Q8_0:
        codes = packed.view(np.int8)
    elif scheme == Q4_0:
        codes = np.concatenate([packed & np.uint8(15), packed >> np.uint8(4)], axis=-1).astype(np.int8) - 8
    else:
        raise ValueError(f"unknown ggml scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return np.ascontiguousarray(codes.transpose(1, 2, 0)), np.ascontiguousarray(scales.T)
