"""`python -m checkpoints.hf_export --workdir runs/NAME --out HF_DIR [--dtype bf16|f16|f32]`: any run as a Hugging
Face Llama folder (config.json, model.safetensors, tokenizer.json, generation_config.json) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Float and QAT runs export their float weights, serving runs their dequantized integer weights, LoRA runs base +
adapters merged (activation quantization, which the format cannot express, is dropped with a note);
tokenizer.json is the run's own tokenizer (byte runs: the byte tokenizer in `tokenizers` format); bos/eos/pad ids
are those of an imported model up the run's lineage, else the tokens the tokenizer adds around a text, as in the
GGUF export (`train.token_ids`), with a note when there is no eos_token_id.
The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import errno
import json
import os
import shutil
from pathlib import Path

from checkpoints.hf import EXPORT_DTYPES, hf_config, write_safetensors
from quant.lora_merge import merged_float_params
from quant.plan import activation_quantization
from slm_jax.errors import UserError
from train.cli import ArgumentParser, add_base_argument, main_guard, require_one_process, path_arg
from train.run import check_base_used, check_output_folder, load_run
from train.token_ids import eos_note, export_token_ids
from train.tokenizer import save_tokenizer

TRANSFORMERS_NO_EOS = ("config.json and generation_config.json hold no eos_token_id; transformers' generate then "
                       "never stops early: it generates until max_new_tokens (else max_length, 20 tokens with the "
                       "prompt by default)")


def float_params(run) -> dict:
    """The float params a run stands for: its own (float, QAT, imported), or the dequantized integer weights of a
    serving run with any LoRA adapters folded in (quant.lora_merge.merged_float_params)."""
    if run.metadata.get("kind") in ("serving", "lora"):
        return merged_float_params(run.variables, run.config.finetune.lora_alpha)[0]
    return run.variables["params"]


def export_run(workdir: Path, out: Path, dtype: str = "bf16", log=print, base: Path | None = None) -> Path:
    """Write the Hugging Face folder `out` (absent or an empty folder) from the latest checkpoint of `workdir`.

    Raises UserError for a non-empty `out`, `out` = `workdir`, or an `out` that cannot be made."""
    workdir, out = Path(workdir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    check_output_folder(workdir, out)  # absent or empty, never the run itself
    run = load_run(workdir, base=base)
    if run.tokenizer.kind == "none":
        raise UserError(f"{workdir} was trained on pre-tokenized ids without a tokenizer, and a Hugging Face folder "
                        f"needs a tokenizer.json; train with data.tokenizer=PATH/tokenizer.json")
    cfg = run.config.model
    activations = activation_quantization(cfg, run.config.quant)
    if activations:
        log(f"note: {workdir} computes with {activations}, which a Hugging Face Llama folder cannot express: the "
            f"export holds its weights and computes activations in float, so its outputs differ slightly from the "
            f"run's")
    params = float_params(run)
    token_ids = export_token_ids(workdir, run.metadata, run.tokenizer)  # as the GGUF export's
    note = eos_note(workdir, run.tokenizer.kind, token_ids, TRANSFORMERS_NO_EOS)
    if note:
        log(note)

    final = out.resolve()
    tmp = final.with_name(f".{final.name}.exporting-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        save_tokenizer(run.tokenizer, tmp)
        write_safetensors(tmp / "model.safetensors", params, cfg, dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype, token_ids), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
        try:
            tmp.rename(final)  # replaces an empty folder: rename(2) refuses one that gained files meanwhile
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # any other failure is main_guard's one line naming the path
            raise UserError(f"--out {out} is no longer empty: {err.strerror}; the export was not written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {workdir} ({run.metadata.get('kind')} run, step {run.step}) -> {out} ({dtype})")
    return out


@main_guard
def main(argv=None):
    parser = ArgumentParser(prog="python -m checkpoints.hf_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=path_arg, required=True, help="a float, QAT, serving, LoRA or imported run")
    parser.add_argument("--out", type=path_arg, required=True, help="the new Hugging Face folder")
    parser.add_argument("--dtype", default="bf16", choices=tuple(EXPORT_DTYPES), help="dtype of the weights")
    add_base_argument(parser)
    args = parser.parse_args(argv)
    require_one_process("python -m checkpoints.hf_export")
    check_base_used(args.base, [args.workdir])
    export_run(args.workdir, args.out, args.dtype, base=args.base)


if __name__ == "__main__":
    main()
