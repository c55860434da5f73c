"""Fold LoRA adapters into their integer base: dequantize each weight, add A @ B * alpha / rank, and re-quantize
with the base's own plan into a new serving model; report what the re-quantization costs.

`python -m quant.merge --workdir runs/finetune_int4_lora --out runs/finetune_int4_lora_merged` writes a serving run
in the same format as `train.ptq`, so generate/evaluate read it like any other. The CLI is the only part of this
file that touches runs and files (through `train` and `checkpoints`, imported where it needs them).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from quant.config import QuantConfig
from quant.convert import Variables, convert, dequantize, quantized_weights
from quant.lora import adapter_deltas, split_adapters
from quant.plan import Path as LayerPath
from quant.plan import kernel_name, path_str
from slm_jax.config import ModelConfig
from slm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class MergeRow:
    layer: str
    delta_rel: float  # |A @ B * alpha / r| / |W|: how much the adapter changes the layer's weight
    weight_rel_err: float  # |Q(W + d) - (W + d)| / |W + d|: re-quantization error of the merged weight
    delta_lost: float  # |(Q(W + d) - W) - d| / |d|: share of the adapter's change the integers fail to carry


def _norm(x) -> float:
    return float(jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32)))))


def _ratio(num: float, den: float) -> float:
    return num / den if den else (0.0 if num == 0 else math.inf)


def _node(tree: dict, path: LayerPath) -> dict:
    """The dict at `path` in a nested dict, created where missing."""
    for key in path:
        tree = tree.setdefault(key, {})
    return tree


def merged_float_params(variables: Variables, alpha: float) -> tuple[dict, dict, dict]:
    """Base + adapters variables -> (float params with every kernel = dequantized base + adapter delta, the deltas,
    the dequantized base kernels), both dicts keyed by layer path."""
    adapters, params = split_adapters(variables["params"])  # `params` is built afresh: safe to fill in
    deltas = adapter_deltas(adapters, alpha)
    base = {path: dequantize(w["value"], w["scale"]) for path, w in quantized_weights(variables.get("aqt", {})).items()}
    for path, kernel in base.items():
        _node(params, path)[kernel_name(path)] = kernel
    for path, delta in deltas.items():
        node = _node(params, path)
        base.setdefault(path, node["kernel"])  # a layer the plan keeps float: its kernel is a (frozen) param
        node["kernel"] = node["kernel"] + delta
    return params, deltas, base


def merge_adapters(model_cfg: ModelConfig, quant_cfg: QuantConfig, variables: Variables, alpha: float,
                   sample_tokens=None) -> tuple[Variables, list[MergeRow]]:
    """Serving variables of the merged model (re-quantized with quant_cfg's plan, as `quant.convert.convert`
    does), and one row per adapted layer on what re-quantization did to it."""
    params, deltas, base = merged_float_params(variables, alpha)
    merged = convert(model_cfg, quant_cfg, params, sample_tokens)
    stored = quantized_weights(merged["aqt"])
    rows = []
    for path, delta in deltas.items():
        target = base[path] + delta
        got = dequantize(stored[path]["value"], stored[path]["scale"]) if path in stored else target
        rows.append(MergeRow(path_str(path), _ratio(_norm(delta), _norm(base[path])),
                             _ratio(_norm(got - target), _norm(target)),
                             _ratio(_norm(got - base[path] - delta), _norm(delta))))
    return merged, rows


def logits_error(reference: jax.Array, approx: jax.Array) -> dict[str, float]:
    """How far `approx` logits are from `reference` ([batch, seq, vocab]): relative L2 error, largest absolute
    difference, and the share of positions whose most likely next token agrees."""
    reference, approx = jnp.asarray(reference, jnp.float32), jnp.asarray(approx, jnp.float32)
    return {"rel_err": _ratio(_norm(approx - reference), _norm(reference)),
            "max_abs": float(jnp.max(jnp.abs(approx - reference))),
            "top1_agree": float(jnp.mean(jnp.argmax(approx, -1) == jnp.argmax(reference, -1)))}


def format_rows(rows: list[MergeRow]) -> str:
    header = ("layer", "|d|/|W|", "merged w rel err", "adapter change lost")
    table = [header] + [(r.layer, f"{r.delta_rel:.4f}", f"{r.weight_rel_err:.4f}", f"{100 * r.delta_lost:.1f}%")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def merge_workdir(workdir: Path, out: Path, batches: int = 20, batch_size: int = 16, log=print) -> dict:
    """Merge the LoRA run in `workdir` into a serving run in `out`; returns the errors and validation losses of
    base, base + adapters and merged model on the LoRA run's (target) validation split."""
    from checkpoints.manager import tree_bytes
    from train.build import build_model
    from train.data import ByteTokenizer, eval_batches, load_splits
    from train.evaluation import mean_loss
    from train.finetune import FinetuneConfig
    from train.ptq import check_output_folder, write_serving_run
    from train.steps import make_eval_step, split_variables
    from train.workdir import load_run

    workdir, out = Path(workdir), Path(out)
    check_output_folder(workdir, out)
    run = load_run(workdir)
    if run.metadata.get("kind") != "lora":
        raise UserError(f"{workdir} is a {run.metadata.get('kind')} run, not a LoRA run; nothing to merge")
    config = dataclasses.replace(run.config, finetune=FinetuneConfig())  # the merged model is a plain serving one
    splits = load_splits(config.data, ByteTokenizer())
    seq_len = config.model.seq_len
    x, _ = next(eval_batches(splits.val, batch_size, seq_len, 1))
    merged, rows = merge_adapters(config.model, config.quant, run.variables, run.config.finetune.lora_alpha, x[:1])
    model = build_model(config)
    base = {**run.variables, "params": split_adapters(run.variables["params"])[1]}  # the frozen base alone
    serve, serve_loss = jax.jit(model.apply), jax.jit(make_eval_step(model))  # base and merged alike
    lora_logits, _ = jax.jit(run.model.apply)(run.variables, x)
    errors = {"merged_vs_adapted": logits_error(lora_logits, serve(merged, x)[0]),
              "base_vs_adapted": logits_error(lora_logits, serve(base, x)[0])}
    losses = {name: mean_loss(step, *split_variables(v), splits.val, batch_size, seq_len, batches)
              for name, step, v in (("base", serve_loss, base),
                                    ("base + adapters", jax.jit(make_eval_step(run.model)), run.variables),
                                    ("merged", serve_loss, merged))}

    write_serving_run(out, config, run.step, merged, splits, merged_from=str(workdir.resolve()),
                      base=run.metadata["base"])

    log(format_rows(rows))
    for name, e in errors.items():
        log(f"logits {name.replace('_', ' ')}: rel err {e['rel_err']:.4f} | max abs {e['max_abs']:.4f} | "
            f"top-1 agreement {100 * e['top1_agree']:.1f}%")
    log("validation loss on the fine-tuning data: " + " | ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    log(f"merged {workdir} (step {run.step}) -> {out}: {tree_bytes(merged)['total']:,} parameter bytes")
    return {"rows": rows, "logits": errors, "val_loss": losses}


def main(argv=None):
    from train.cli import main_guard

    @main_guard
    def run(argv):
        parser = argparse.ArgumentParser(prog="python -m quant.merge", description=__doc__.split("\n\n")[0])
        parser.add_argument("--workdir", type=Path, required=True, help="a LoRA run (finetune.method=lora)")
        parser.add_argument("--out", type=Path, required=True, help="folder for the merged serving run")
        parser.add_argument("--batches", type=int, default=20, help="validation batches for the loss comparison")
        parser.add_argument("--batch-size", type=int, default=16)
        args = parser.parse_args(argv)
        if args.batches <= 0 or args.batch_size <= 0:
            raise UserError("--batches and --batch-size must be positive")
        merge_workdir(args.workdir, args.out, args.batches, args.batch_size)

    return run(argv)


if __name__ == "__main__":
    main()
