"""`python -m checkpoints.hf_export --workdir runs/NAME --out HF_DIR [--dtype bf16|f16|f32]`: any run as a Hugging
Face Llama folder (config.json, model.safetensors, tokenizer.json, generation_config.json) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Float and QAT runs export their float weights, serving runs their dequantized integer weights, LoRA runs base +
adapters merged. The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models

from checkpoints.hf import EXPORT_DTYPES, TOKEN_IDS, hf_config, write_safetensors
from quant.lora_merge import merged_float_params
from slm_jax.errors import UserError
from train.cli import main_guard
from train.run import load_run


def byte_tokenizer() -> Tokenizer:
    """slm-jax's byte tokenizer (token id = UTF-8 byte) in the tokenizers library's format: a BPE model with no
    merges whose vocabulary is the 256 byte tokens <0x00>..<0xFF>, so every character falls back to its bytes."""
    tokenizer = Tokenizer(models.BPE(vocab={f"<0x{b:02X}>": b for b in range(256)}, merges=[], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def float_params(run) -> dict:
    """The float params a run stands for: its own (float, QAT, imported), or the dequantized integer weights of a
    serving run with any LoRA adapters folded in (quant.merge.merged_float_params)."""
    if run.metadata.get("kind") in ("serving", "lora"):
        return merged_float_params(run.variables, run.config.finetune.lora_alpha)[0]
    return run.variables["params"]


def write_tokenizer(run, path: Path) -> None:
    """tokenizer.json: a copy of the run's own file, or the byte tokenizer for byte-level runs."""
    tokenizer = run.metadata.get("tokenizer") or {}
    if tokenizer.get("kind") == "byte":
        byte_tokenizer().save(str(path))
    elif tokenizer.get("kind") == "tokenizer.json" and Path(tokenizer.get("path", "")).is_file():
        shutil.copyfile(tokenizer["path"], path)
    else:
        raise UserError(f"the run's tokenizer {tokenizer} cannot be exported (expected the byte tokenizer or a "
                        f"tokenizer.json file that exists)")


def export_run(workdir: Path, out: Path, dtype: str = "bf16", log=print) -> Path:
    """Write the Hugging Face folder `out` (which must not exist) from the latest checkpoint of `workdir`."""
    workdir, out = Path(workdir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if out.exists():
        raise UserError(f"--out {out} already exists; an export writes a new folder")
    run = load_run(workdir)
    cfg = run.config.model
    params = float_params(run)
    source = run.metadata.get("imported_from") or {}
    token_ids = {key: source[key] for key in TOKEN_IDS if key in source}

    final = out.resolve()
    tmp = final.with_name(f".{final.name}.exporting-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        write_tokenizer(run, tmp / "tokenizer.json")
        write_safetensors(tmp / "model.safetensors", params, cfg, dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype, token_ids), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {workdir} ({run.metadata.get('kind')} run, step {run.step}) -> {out} ({dtype})")
    return out


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m checkpoints.hf_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a float, QAT, serving, LoRA or imported run")
    parser.add_argument("--out", type=Path, required=True, help="the new Hugging Face folder")
    parser.add_argument("--dtype", default="bf16", choices=tuple(EXPORT_DTYPES), help="dtype of the weights")
    args = parser.parse_args(argv)
    export_run(args.workdir, args.out, args.dtype)


if __name__ == "__main__":
    main()
