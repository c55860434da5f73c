"""The per-layer quantization plan: which bits and scales each matmul of a model gets, after the rules apply.

Resolved once against the model's own list of matmuls (found by tracing it), so a rule that matches nothing or a
group size that does not divide a layer's width fails at start-up, and the same plan is printed and saved.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from quant import ggml
from quant.config import INHERIT, QuantConfig, QuantRule
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError
from slm_jax.model import Transformer

Path = tuple[str, ...]
WEIGHT, ATTENTION = "weight", "attention"  # x @ W with a trained W | an attention einsum of two activations
EMBED = "embedding"  # the token embedding table, quantized as one_hot(tokens) @ table
EMBED_PATH: "Path" = ("embed",)


def kernel_name(path: "Path") -> str:
    """The name of a weight layer's float parameter: "embedding" for the token table, else "kernel"."""
    return "embedding" if tuple(path) == EMBED_PATH else "kernel"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One matmul of the model: its module path, kind, and contracting width (in_features; 0 for attention)."""

    path: Path
    kind: str
    in_features: int = 0
    out_features: int = 0


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one matmul is quantized. AQT's lhs is the activation (act_bits), rhs the weight (weight_bits).

    For attention einsums both operands are activations: both get `act_bits` (or `weight_bits` when act_bits is
    null), always with per-row scales, and nothing is ever frozen for serving.
    """

    weight_bits: int
    act_bits: int | None
    granularity: str
    group_size: int | None  # only for per_group
    bwd_bits: int | None
    kind: str = WEIGHT
    scale_dtype: str = "float32"  # of the weight's scales (AQT computes, trains with and stores them in it)
    scheme: str = "aqt"  # aqt | ggml_q8_0 | ggml_q4_0: whose numerics quantize the weight (see quant.ggml)


Plan = Mapping[Path, "LayerPlan | None"]  # ordered as the model runs; None keeps the layer float


def path_str(path: Path) -> str:
    return "/".join(path)


class _Recorder:
    """A MatmulProvider that records every matmul the model asks for and computes in float."""

    def __init__(self):
        self.rhs_shapes: dict[Path, tuple[int, ...]] = {}  # in call order
        self.weight_paths: set[Path] = set()  # only layers with a kernel ask whether to keep it

    def keeps_float_kernel(self, path: Path) -> bool:
        self.weight_paths.add(path)
        return True

    def dot_general(self, path: Path):
        def record(lhs, rhs, dims, precision=None, preferred_element_type=None):
            self.rhs_shapes.setdefault(path, tuple(rhs.shape))
            return jax.lax.dot_general(lhs, rhs, dims, precision, preferred_element_type)

        return record


@functools.cache
def model_layers(model_cfg: ModelConfig) -> tuple[LayerInfo, ...]:
    """Every matmul routed through the injected dot_general, in the order the model runs them (abstractly traced)."""
    recorder = _Recorder()
    model = Transformer(model_cfg, matmul=recorder)
    jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))))
    embed = LayerInfo(EMBED_PATH, EMBED, model_cfg.vocab_size, model_cfg.d_model)
    return (embed,) + tuple(LayerInfo(path, WEIGHT, *shape) if path in recorder.weight_paths
                            else LayerInfo(path, ATTENTION) for path, shape in recorder.rhs_shapes.items())


def _field(rule: QuantRule | None, cfg: QuantConfig, name: str):
    value = INHERIT if rule is None else getattr(rule, name)
    return getattr(cfg, name) if value == INHERIT else value


def _key(rule_index: int | None, rule: QuantRule | None, name: str) -> str:
    """The config key a resolved value came from, for error messages."""
    if rule is not None and getattr(rule, name) != INHERIT:
        return f"quant.rules[{rule_index}].{name}"
    return f"quant.{name}"


def resolve_plan(quant_cfg: QuantConfig, layers: Sequence[LayerInfo],
                 tied_embeddings: bool = False) -> dict[Path, LayerPlan | None]:
    """Apply the section's values and the first matching rule to each layer; UserError for impossible plans.

    The embedding table takes `embed_bits` (a rule may set its weight_bits); its scales are per column, its input
    (one-hot rows) is never quantized."""
    patterns = [re.compile(rule.match) for rule in quant_cfg.rules]
    used = [False] * len(patterns)
    plan: dict[Path, LayerPlan | None] = {}
    for layer in layers:
        name = path_str(layer.path)
        index = next((i for i, p in enumerate(patterns) if p.search(name)), None)
        rule = None if index is None else quant_cfg.rules[index]
        if index is not None:
            used[index] = True
        if layer.kind == EMBED:
            bits = quant_cfg.embed_bits if rule is None or rule.weight_bits == INHERIT else rule.weight_bits
            if bits is not None and quant_cfg.scheme != "aqt":
                raise UserError(f"quant.rules[{index}] quantizes the embedding table, which stays float with scheme "
                                f"{quant_cfg.scheme}; make the rule's match skip {name}")
            if bits is not None and tied_embeddings:  # a trained model's tying cannot change: say what can
                if rule is not None and rule.weight_bits != INHERIT:
                    raise UserError(f"{_key(index, rule, 'weight_bits')}: the model ties its embedding table to the "
                                    f"LM head, which keeps it float; make the rule's match skip {name}")
                raise UserError("quant.embed_bits (--embed-bits): the model ties its embedding table to the LM head, "
                                "which keeps it float; drop --embed-bits (leave quant.embed_bits null), or train an "
                                "untied model (model.tie_embeddings=false)")
            plan[layer.path] = None if bits is None else LayerPlan(
                bits, None, "per_channel", None, quant_cfg.bwd_bits, EMBED, quant_cfg.scale_dtype)
            continue
        weight_bits = _field(rule, quant_cfg, "weight_bits")
        if weight_bits is None:
            plan[layer.path] = None
            continue
        if quant_cfg.scheme != "aqt":
            plan[layer.path] = None if layer.kind == ATTENTION else _ggml_plan(layer, weight_bits, index, rule)
            continue
        act_bits = _field(rule, quant_cfg, "act_bits")
        if layer.kind == ATTENTION:
            bits = act_bits if act_bits is not None else weight_bits
            plan[layer.path] = LayerPlan(bits, bits, "per_channel", None, quant_cfg.bwd_bits, ATTENTION)
            continue
        granularity = _field(rule, quant_cfg, "granularity")
        group_size = _field(rule, quant_cfg, "group_size") if granularity == "per_group" else None
        if group_size is not None and layer.in_features % group_size:
            raise UserError(f"{_key(index, rule, 'group_size')} ({group_size}) must divide the input width of "
                            f"{name} ({layer.in_features})")
        plan[layer.path] = LayerPlan(weight_bits, act_bits, granularity, group_size, quant_cfg.bwd_bits,
                                     scale_dtype=quant_cfg.scale_dtype)
    for i, was_used in enumerate(used):
        if not was_used:
            names = ", ".join(path_str(layer.path) for layer in layers[:3])
            raise UserError(f"quant.rules[{i}].match {quant_cfg.rules[i].match!r} matches no layer "
                            f"(layer paths look like: {names}, ...)")
    return plan


def _ggml_plan(layer: LayerInfo, weight_bits: int, rule_index: int | None, rule: QuantRule | None) -> LayerPlan:
    """A weight layer in one of ggml's block formats (8 bits: Q8_0, 4 bits: Q4_0), weight-only, float16 scales."""
    if layer.in_features % ggml.BLOCK:
        raise UserError(f"{path_str(layer.path)}: ggml blocks of {ggml.BLOCK} must divide its input width "
                        f"({layer.in_features}); keep it float with a rule such as "
                        f"{{match: {path_str(layer.path)}, weight_bits: null}}"
                        + (f" (quant.rules[{rule_index}] matched it)" if rule is not None else ""))
    scheme = next(name for name, bits in ggml.BITS.items() if bits == weight_bits)
    return LayerPlan(weight_bits, None, "per_group", ggml.BLOCK, None, scale_dtype="float16", scheme=scheme)


def make_plan(model_cfg: ModelConfig, quant_cfg: QuantConfig) -> dict[Path, LayerPlan | None]:
    return resolve_plan(quant_cfg, model_layers(model_cfg), model_cfg.tie_embeddings)


def activation_quantization(model_cfg: ModelConfig, quant_cfg: QuantConfig) -> str | None:
    """What of a run's quantization acts on activations, in words ("int8 activations (quant.act_bits)", quantized
    attention einsums), or None: an export of weights alone (Hugging Face, GGUF) computes these in float."""
    if quant_cfg.mode == "none":
        return None
    plans = [plan for plan in make_plan(model_cfg, quant_cfg).values() if plan is not None]
    bits = sorted({plan.act_bits for plan in plans if plan.kind != ATTENTION and plan.act_bits is not None})
    parts = [f"{'/'.join(f'int{b}' for b in bits)} activations (quant.act_bits)"] if bits else []
    if any(plan.kind == ATTENTION for plan in plans):
        parts.append("quantized attention einsums (model.quantize_attention)")
    return " and ".join(parts) or None


def _describe(plan: LayerPlan | None) -> tuple[str, str, str, str]:
    if plan is None:
        return "float", "float", "-", "float"
    grads = "float" if plan.bwd_bits is None else f"int{plan.bwd_bits}"
    if plan.kind == ATTENTION:  # no weights: both operands are activations
        return "-", f"int{plan.act_bits} (both)", "per_channel", grads
    acts = "float" if plan.act_bits is None else f"int{plan.act_bits}"
    if plan.scheme != "aqt":
        return plan.scheme.removeprefix("ggml_").upper(), acts, f"blocks({plan.group_size}, float16)", grads
    scales = f"per_group({plan.group_size})" if plan.granularity == "per_group" else "per_channel"
    return f"int{plan.weight_bits}", acts, scales, grads


def format_plan(plan: Plan) -> str:
    """A table of the plan, one row per matmul, to print at start-up."""
    header = ("layer", "weights", "activations", "scales", "gradients")
    rows = [(path_str(path), *_describe(p)) for path, p in plan.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_to_json(plan: Plan) -> dict:
    """{layer path: {weight_bits, act_bits, granularity, group_size, bwd_bits, kind} or null}, JSON-able."""
    return {path_str(path): None if p is None else dataclasses.asdict(p) for path, p in plan.items()}



def _weights(plan: LayerPlan | None) -> str:
    if plan is None:
        return "float"
    return f"int{plan.weight_bits}" + (f" per_group({plan.group_size})" if plan.granularity == "per_group" else "")


def describe_scheme(model_cfg: ModelConfig, quant_cfg: QuantConfig) -> str:
    """The resolved scheme in one line, e.g. "scheme: w4 per_group(32) bfloat16 scales, activations float,
    embedding int8, lm_head int4 per_group(32)", a ggml scheme named ("scheme: ggml_q4_0 (w4 per_group(32) float16
    scales), ..."); with rules, how many of the model's matmuls they change.
    UserError as `make_plan` for an impossible scheme."""
    plan = make_plan(model_cfg, quant_cfg)
    scales = f"per_group({quant_cfg.group_size})" if quant_cfg.granularity == "per_group" else "per_channel"
    weights = "float" if quant_cfg.weight_bits is None else f"w{quant_cfg.weight_bits} {scales} " \
                                                            f"{quant_cfg.scale_dtype} scales"
    if quant_cfg.scheme != "aqt":  # a ggml block format: named, so nobody mistakes it for AQT's int4/int8
        weights = f"{quant_cfg.scheme} ({weights})"
    acts = "float" if quant_cfg.act_bits is None else f"int{quant_cfg.act_bits} per token"
    head = _weights(plan[("lm_head",)]) if ("lm_head",) in plan else "tied to the embedding"
    line = f"scheme: {weights}, activations {acts}, embedding {_weights(plan[EMBED_PATH])}, lm_head {head}"
    if quant_cfg.rules:
        plain = make_plan(model_cfg, dataclasses.replace(quant_cfg, rules=()))
        changed = sum(plan[path] != plain[path] for path in plan)
        line += f"; {len(quant_cfg.rules)} rule(s) change {changed} of {len(plan)} matmuls"
    return line


SMALL_GROUP = 32  # AQT int grids at 4 bits or fewer: groups below this lose more to the clipped abs-max than they gain


def small_group_note(model_cfg: ModelConfig, quant_cfg: QuantConfig) -> str | None:
    """A note when an AQT weight scheme of 4 bits or fewer uses groups of fewer than SMALL_GROUP inputs, else None.

    AQT's symmetric grid (IntSymmetric with preserve_zero, not preserve_max_val; quant.grid) maps a group's abs-max
    to 2^(bits-1) - 0.5 and clips it to 2^(bits-1) - 1, so every group's largest weight shrinks by 1 / (2^bits - 1)
    (1/15 at INT4). Smaller groups put more weights on that edge (all of them at group size 1), a shrink of the same
    sign that adds up over a layer's inputs: on the tiny run, RTN INT4's val loss rises steadily from group 32 to
    group 1 (docs/results/cpu-2core/ptq.md). ggml's Q4_0 keeps each block's largest weight exact.
    UserError as `make_plan` for an impossible scheme."""
    small = sorted({(p.weight_bits, p.group_size) for p in make_plan(model_cfg, quant_cfg).values()
                    if p is not None and p.kind != ATTENTION and p.scheme == "aqt" and p.weight_bits <= 4
                    and p.group_size is not None and p.group_size < SMALL_GROUP})
    if not small:
        return None
    bits, size = small[0]
    shrink = 2 ** bits - 1
    return (f"note: w{bits} per_group({size}): AQT's grid clips each group's abs-max from {2 ** (bits - 1) - 0.5} "
            f"to {2 ** (bits - 1) - 1}, shrinking its largest weight by 1/{shrink}; groups under {SMALL_GROUP} put "
            f"more weights on that edge and can quantize worse than group {SMALL_GROUP}, not better"
            + (" (--scheme ggml_q4_0 keeps each block's largest weight exact)" if bits == 4 else ""))
