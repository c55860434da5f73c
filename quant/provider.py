"""The `MatmulProvider` that plugs AQT into the model: each layer gets an `AqtDotGeneral` built from its LayerPlan.

One provider serves the three AQT modes: TRAIN (QAT: fake-quantized forward, straight-through gradients),
CONVERT (float weights -> int8/int4 values and scales written to the `aqt` collection) and SERVE (read them back;
the layer then keeps no float kernel).
"""
from __future__ import annotations

import copy
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2 import tiled_dot_general
from aqt.jax.v2.flax import aqt_flax
from aqt.jax.v2.utils import QuantMode

from quant import ggml
from quant.config import QuantConfig
from quant.embedding import ServedEmbedding
from quant.hooks import HookContext, LayerHook, chain
from quant.plan import ATTENTION, EMBED, LayerPlan, Path, model_layers, path_str, resolve_plan
from quant.serving_group import served_group_matmul, uses_group_path
from quant.serving_int import dequantizes, served_int_matmul, uses_int_path
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError
from slm_jax.layers import in_weights_loop

MODES = {"qat": QuantMode.TRAIN, "convert": QuantMode.CONVERT, "serve": QuantMode.SERVE}
# Stochastic rounding of quantized gradients (bwd_bits) draws from the rng stream every train step passes.
NOISE_RNG = "dropout"


def resolve_numerics(numerics: str) -> str:
    """auto: `fake` on CPU, `int` on GPU/TPU. On CPU AQT's integer forms of weight-only and per-group layers are
    slower than float (an INT4 w4a8 g32 QAT step 3.2x the fake one: a batched dot per group); per-channel w8a8 is one
    plain int8 dot, XLA CPU's fastest matmul, so configs/int8_qat and configs/ptq_int8 set `int` there."""
    if numerics == "auto":
        return "fake" if jax.default_backend() == "cpu" else "int"
    return numerics


def aqt_dot_general_config(plan: LayerPlan, numerics: str, stochastic_rounding: bool = False):
    """AQT's config for one layer: lhs = activations (act_bits), rhs = weights (weight_bits), symmetric abs-max.

    `fake` numerics dequantize each operand before a float matmul (AQT's DequantMode.THIS_INPUT); `int` runs the
    matmul on the integers with int32 accumulation and rescales the output (DequantMode.OUTPUT). Gradients are
    straight-through: they flow through the float operands (use_fwd_quant=False), quantized only with bwd_bits.
    """
    cfg = aqt_config.dot_general_make(lhs_bits=plan.act_bits, rhs_bits=plan.weight_bits, bwd_bits=plan.bwd_bits,
                                      use_fwd_quant=False)
    if plan.bwd_bits is not None and stochastic_rounding:
        aqt_config.set_stochastic_rounding(cfg, vjp_lhs_stochastic_rounding=True, vjp_rhs_stochastic_rounding=False,
                                           implementation="jax.uniform")
    if plan.scale_dtype != "float32":  # the weight's scales; AQT otherwise makes them in the kernel's dtype
        weights = cfg.fwd.dg_quantizer.rhs
        weights.scale_dtype = jnp.dtype(plan.scale_dtype)
        weights._calibrator = None  # AQT builds it again, in scale_dtype, when the dot_general runs
    if numerics == "fake":
        for raw in (cfg.fwd,) if plan.bwd_bits is None else (cfg.fwd, cfg.dlhs, cfg.drhs):
            raw.lhs.dequant_mode = aqt_config.DequantMode.THIS_INPUT
            raw.rhs.dequant_mode = aqt_config.DequantMode.THIS_INPUT
            raw.dg_accumulator_dtype = None
    return cfg


def group_tiling(group_size: int):
    """AQT tiling that splits the contracting axis of both operands into groups: one scale per group and column.

    Each group becomes a batch of the integer matmul (partial sums are rescaled, then added): needed for `int`.
    """
    def tiling_fn(lhs, rhs, dimension_numbers):
        (lhs_ca, rhs_ca), _ = dimension_numbers
        return tiled_dot_general.Cfg(
            lhs=tiled_dot_general.TensorTiling([tiled_dot_general.AxisTiling(lhs_ca[0], tile_size=group_size)], []),
            rhs=tiled_dot_general.TensorTiling([tiled_dot_general.AxisTiling(rhs_ca[0], tile_size=group_size)], []))

    return tiling_fn


def split_groups(x: jax.Array, kernel: jax.Array, group_size: int):
    """x: [..., in] -> [..., groups, group_size]; kernel: [in, out] -> [groups, group_size, out]; and the dims that
    contract both new axes. With scales shared only along group_size (AQT's calib_shared_axes), this is per-group
    fake quantization as one ordinary matmul, about 10x faster on CPU than the tiled form."""
    groups = x.shape[-1] // group_size
    x = x.reshape(x.shape[:-1] + (groups, group_size))
    kernel = kernel.reshape(groups, group_size, kernel.shape[-1])
    return x, kernel, (((x.ndim - 2, x.ndim - 1), (0, 1)), ((), ()))


def serve_fake(stored: dict, x: jax.Array, dimension_numbers, precision, plan: LayerPlan) -> jax.Array:
    """x @ W for a served layer with `fake` numerics as one float matmul in x's dtype: W dequantized from AQT's
    frozen {"value", "scale"} (per channel [in, out] and [1, out], or per group [groups, group_size, out] and
    [groups, 1, 1, out]); with act_bits, x fake-quantized as AQT's activation quantizer does it, one scale per token
    (per token and group for per-group plans, as AQT's tiling calibrates them). x contracts its last axis.

    Per channel these are bit for bit the numbers of AQT's SERVE forward; per group the same sum in another order
    (AQT's tiled form adds `groups` batched partial matmuls, about 10x slower on CPU than this single matmul).

    Memory: the float kernel is a temporary made just before this matmul (`after_input`), so a forward pass holds
    one layer's float weight at a time, never a float copy of the model. Inside generate's decode loop
    (`slm_jax.layers.weights_loop_invariant`) XLA may make it once before the loop instead, which holds a float
    copy of every such layer while generating (the price of decoding at float's speed on this path).
    """
    dequant_dtype = jnp.float32 if plan.scheme != "aqt" else x.dtype  # ggml: as quant.ggml.fake_quant computes it
    scale = stored["scale"] if in_weights_loop() else after_input(stored["scale"], x)
    kernel = dequantize_weight(stored["value"], scale, dequant_dtype).astype(x.dtype)
    if plan.act_bits is not None:
        shape, group = x.shape, plan.group_size or x.shape[-1]
        x = fake_quantize(x.reshape(shape[:-1] + (shape[-1] // group, group)), plan.act_bits).reshape(shape)
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision)


def after_input(scale: jax.Array, x: jax.Array) -> jax.Array:
    """`scale` (same values, dtype and shape) made to depend on x's first element, through an exact zero
    (isnan(x[0]) * 0, which XLA does not fold), so a weight dequantized from it cannot be computed before x.

    Without it XLA's scheduler dequantizes every layer's weight at the start of a forward pass: at d_model 512 with
    8 layers, generate's temporary buffers held a float32 copy of the whole model (108 MB, from XLA's compiled memory
    analysis, against 12.6 MB with this), and prefill ran 2x slower (48 vs 24 ms at batch 1, 64 tokens)."""
    first = x.reshape(-1)[0]
    return scale + jnp.isnan(first).astype(scale.dtype) * 0


def two_rows(dot, x: jax.Array) -> jax.Array:
    """dot(x) for an x [1, ..., 1, in] of one row (decoding one sequence), computed on x with a zero row appended
    on its first axis, then sliced back. XLA CPU runs an int8 x int8 matmul with one row as a matrix-vector product
    about 4-6x slower than the same matmul with two rows (measured at 576 x 1536: 330-470 us vs 60-140 us), so a
    served integer layer decodes faster with a wasted row. Activations are quantized per row and the integer sums
    are exact, so the first row's result is bit for bit dot(x)."""
    padded = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    return jax.lax.slice_in_dim(dot(padded), 0, 1, axis=0)


def fake_quantize(x: jax.Array, bits: int) -> jax.Array:
    """x [..., n] quantized to signed `bits`-bit integers with one abs-max scale per slice along the last axis, and
    dequantized, in x's dtype: the numbers of AQT's activation quantizer (IntSymmetric with preserve_zero, scale =
    abs-max / (2^(bits-1) - 0.5), clip to +-(2^(bits-1) - 1), round half to even), as plain jnp that XLA fuses."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax == 0, jnp.ones_like(amax), amax) / (2.0 ** (bits - 1) - 0.5)
    inverse = jax.lax.reciprocal(scale)
    inverse = jnp.where(jnp.isinf(inverse), jnp.ones_like(inverse), inverse)
    bound = 2.0 ** (bits - 1) - 1
    values = jax.lax.round(jnp.clip(x * inverse, -bound, bound), jax.lax.RoundingMethod.TO_NEAREST_EVEN)
    return values * scale


def dequantize_weight(value, scale, dtype) -> jax.Array:
    """The kernel [in, out] that AQT's stored integer weights stand for, computed in `dtype`.

    value: [in, out] (per channel) or [groups, group_size, out] (per group); scale: AQT's output-shaped scale with
    one entry per (group,) column, e.g. [1, 1, out] or [groups, 1, 1, out].
    """
    out = value.shape[-1]
    scale = jnp.asarray(scale).reshape(value.shape[:-2] + (1, out)).astype(dtype)
    return (jnp.asarray(value).astype(dtype) * scale).reshape(-1, out)


def aqt_module(plan: LayerPlan, cfg, quant_mode: QuantMode, rounding: bool = False, reshape: bool = False):
    """The unbound `AqtDotGeneral` (named "aqt") of one weight layer: activations (lhs) quantized on the fly, the
    weight (rhs) frozen in CONVERT/SERVE; per-group tiling unless the groups are split by reshaping."""
    return aqt_flax.AqtDotGeneral(
        cfg, prng_name=NOISE_RNG if rounding else None,
        lhs_quant_mode=QuantMode.TRAIN, lhs_freeze_mode=aqt_flax.FreezerMode.NONE,
        rhs_quant_mode=quant_mode, rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
        tiling_fn=group_tiling(plan.group_size) if plan.group_size is not None and not reshape else None,
        use_legacy_freezer=not reshape,  # the legacy freezer stores plain arrays: {"value", "scale"}
        rhs_scale_init=functools.partial(jnp.zeros, dtype=jnp.dtype(plan.scale_dtype)),  # serving template
        name="aqt")


class QuantDotGeneral(nn.Module):
    """One weight layer's dot_general: AQT's `AqtDotGeneral` (float when plan is None), wrapped by the hooks.

    Only the weight (rhs) is frozen in CONVERT/SERVE; activations are always quantized on the fly (per token).
    Per-group scales use AQT's tiling, except for QAT with fake numerics, which nothing freezes: there the groups
    are split by reshaping (`split_groups`), same numbers, much faster. On CPU with `int` numerics, served
    weight-only layers run one int8 dot over hi/lo activations (bounded error): per channel
    `quant.serving_int.served_int_matmul`, per group `quant.serving_group.served_group_matmul` while the rows are
    few (decoding); other served per-group layers run as `serve_fake` whatever the numerics. A ggml
    scheme's layer trains with `quant.ggml.fake_quant` (not AQT) and serves its stored blocks dequantized, whatever
    the numerics. A served layer calls AQT's module only to make its variables (init).
    """

    layer_path: Path  # (`path` is taken by nn.Module)
    plan: LayerPlan | None
    quant_mode: QuantMode = QuantMode.TRAIN
    numerics: str = "int"
    hooks: tuple[LayerHook, ...] = ()

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        plan = self.plan
        if plan is None:
            def dot(x, w):
                return jax.lax.dot_general(x, w, dimension_numbers, precision, preferred_element_type)
        elif plan.scheme != "aqt" and self.quant_mode == QuantMode.TRAIN:
            def dot(x, w):
                w = ggml.fake_quant(w, plan.scheme).astype(w.dtype)
                return jax.lax.dot_general(x, w, dimension_numbers, precision, preferred_element_type)
        else:
            rounding = plan.bwd_bits is not None and self.has_rng(NOISE_RNG)
            cfg = aqt_dot_general_config(plan, self.numerics, stochastic_rounding=rounding)
            reshape = plan.group_size is not None and self.numerics == "fake" and self.quant_mode == QuantMode.TRAIN
            if reshape:
                cfg.fwd.dg_quantizer.lhs.calib_shared_axes = (lhs.ndim,)  # the group_size axis after split_groups
                cfg.fwd.dg_quantizer.rhs.calib_shared_axes = (1,)
            aqt = aqt_module(plan, cfg, self.quant_mode, rounding, reshape)
            serving = self.quant_mode == QuantMode.SERVE

            def dot(x, w):
                if self.quant_mode != QuantMode.TRAIN and x.ndim == 2:
                    # Linear passes [tokens, in]; frozen scales were always laid out for [batch, seq, in]
                    # activations (their rank follows the lhs's under tiling), so CONVERT/SERVE keep that rank.
                    dims = (((2,), (0,)), ((), ()))
                    return jax.lax.squeeze(dot3(x[None], w, dims), (0,))
                return dot3(x, w, dimension_numbers)

            def dot3(x, w, dimension_numbers):
                if reshape:
                    return aqt(*split_groups(x, w, plan.group_size), precision)
                stored = self.variables.get("aqt", {}).get("aqt", {}).get("qrhs") if serving else None
                if stored is None:  # not serving, or making the serving variables (init)
                    return aqt(x, w, dimension_numbers, precision)
                # ggml schemes are weight-only blocks: served as one matmul over float32-dequantized blocks
                if self.numerics == "fake" or plan.scheme != "aqt":
                    return serve_fake(stored, x, dimension_numbers, precision, plan)
                if uses_group_path(plan, stored, x):
                    return served_group_matmul(stored, x)
                if dequantizes(stored):
                    return serve_fake(stored, x, dimension_numbers, precision, plan)
                if uses_int_path(plan, stored):
                    return served_int_matmul(stored, x)
                if x.size == x.shape[-1]:  # one row: XLA CPU's int8 matvec is slow, see two_rows
                    return two_rows(lambda x2: aqt(x2, w, dimension_numbers, precision), x)
                return aqt(x, w, dimension_numbers, precision)
            dot = float16_safe(dot, self.numerics)
        return chain(self.hooks, HookContext(self.layer_path, plan, self), dot)(lhs, rhs)


def activation_dot_general(plan: LayerPlan, numerics: str):
    """A pure dot_general for attention einsums (both operands activations): quantized on the fly, never frozen.

    Pure, not a Flax module, because `jnp.einsum` calls it inside its own jit (a module there is unhashable).
    """
    cfg = aqt_dot_general_config(plan, numerics)

    def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        return float16_safe(lambda x, y: copy.deepcopy(cfg)(x, y, dimension_numbers, precision), numerics)(lhs, rhs)

    return dot


def float16_safe(dot, numerics: str):
    """dot(lhs, rhs) -> the same product, computed in float32 and cast back when `int` numerics meet float16 operands.

    AQT rescales the int32 sums of an integer matmul in the operands' dtype (aqtp 0.9.0, QTensor.dequant): float16's
    largest value, 65,504, is the sum of 127 * 127 * 4.06 products, so any int8 layer contracting more than a few
    elements overflowed to inf and the served model's logits to NaN. The sums are exact integers either way; only
    their rescaling moves to float32 (as quant.serving_int does for its own int paths)."""
    if numerics != "int":
        return dot

    def safe(lhs, rhs):
        if lhs.dtype != jnp.float16:
            return dot(lhs, rhs)
        return dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32)).astype(jnp.float16)

    return safe


class AqtProvider:
    """MatmulProvider: per layer path, the dot_general its plan asks for (see slm_jax.layers.MatmulProvider).

    `attention` lists the attention einsum paths, which get a pure dot_general (and no hooks) even when float.
    """

    def __init__(self, plan: dict[Path, LayerPlan | None], quant_mode: QuantMode, numerics: str,
                 hooks: Sequence[LayerHook] = (), attention: frozenset[Path] = frozenset()):
        self.plan, self.quant_mode, self.numerics = plan, quant_mode, numerics
        self.hooks, self.attention = tuple(hooks), attention

    def layer_plan(self, path: Path) -> LayerPlan | None:
        if path not in self.plan:
            raise ValueError(f"layer {path_str(path)} is not in the quantization plan (was it resolved for another "
                             f"ModelConfig?)")
        return self.plan[path]

    def keeps_float_kernel(self, path: Path) -> bool:
        return self.quant_mode != QuantMode.SERVE or self.layer_plan(path) is None

    def embeds_by_matmul(self, path: Path) -> bool:
        plan = self.plan.get(path)
        return plan is not None and plan.kind == EMBED

    def embedding_lookup(self, path: Path) -> ServedEmbedding | None:
        """A serving embedding table is read by row (see quant.embedding); None for every other layer and mode."""
        plan = self.plan.get(path)
        if self.quant_mode != QuantMode.SERVE or plan is None or plan.kind != EMBED:
            return None
        value_dtype = aqt_dot_general_config(plan, self.numerics).fwd.dg_quantizer.rhs.numerics.get_dtype()
        return ServedEmbedding(value_dtype, jnp.dtype(plan.scale_dtype), self.numerics, name="dot_general")

    def dot_general(self, path: Path):
        plan = self.layer_plan(path)
        if path in self.attention:
            return jax.lax.dot_general if plan is None else activation_dot_general(plan, self.numerics)
        if plan is None and not any(hook.applies_to(path) for hook in self.hooks):
            return jax.lax.dot_general
        return QuantDotGeneral(path, plan, self.quant_mode, self.numerics, self.hooks, name="dot_general")


def quant_mode_of(mode: str | QuantMode) -> QuantMode | None:
    """"none" -> None; "qat" | "convert" | "serve" (or AQT's QuantMode TRAIN | CONVERT | SERVE) -> QuantMode."""
    if isinstance(mode, QuantMode) and mode in MODES.values():
        return mode
    if mode == "none":
        return None
    if mode not in MODES:
        raise UserError(f"quant mode must be one of none, {', '.join(MODES)}, got {mode!r}")
    return MODES[mode]


def make_matmul(model_cfg: ModelConfig, quant_cfg: QuantConfig, quant_mode: str | QuantMode | None = None,
                hooks: Sequence[LayerHook] = ()) -> AqtProvider | None:
    """The provider for `Transformer(model_cfg, matmul=...)`; None for a float model without hooks.

    quant_mode defaults to quant_cfg.mode. With mode none and hooks, every layer stays float but hooks still run.
    """
    mode = quant_mode_of(quant_cfg.mode if quant_mode is None else quant_mode)
    if mode is None and not hooks:
        return None
    layers = model_layers(model_cfg)
    attention = frozenset(layer.path for layer in layers if layer.kind == ATTENTION)
    if mode is None:
        return AqtProvider({layer.path: None for layer in layers}, QuantMode.TRAIN, "int", hooks, attention)
    return AqtProvider(resolve_plan(quant_cfg, layers, model_cfg.tie_embeddings), mode, resolve_numerics(quant_cfg.numerics), hooks, attention)
