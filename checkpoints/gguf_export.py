"""`python -m checkpoints.gguf_export --workdir RUN --out model.gguf [--type f32|f16|bf16|q8_0|q4_0]`: a run as a
GGUF file that llama.cpp loads (architecture `llama`, the run's tokenizer as a byte-level BPE vocabulary).

The run is read through `train.run` (so this entry module sits above the `checkpoints.gguf` library).
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

import dataclasses
import json
import time
from pathlib import Path

from checkpoints.gguf import check_exportable, check_kind, export_type, gguf_tensors, write_gguf
from checkpoints.gguf_vocab import Vocab, bpe_vocab, byte_vocab, pad_vocab, special_affixes
from quant.plan import activation_quantization
from slm_jax.errors import UserError
from train.cli import ArgumentParser, main_guard, require_one_process, path_arg
from train.run import check_out_parent, load_run, open_store, tokenizer_of
from train.token_ids import eos_note, export_token_ids


def run_vocab(workdir: Path, tokenizer) -> Vocab:
    """The vocabulary of the run in `workdir`, from its own `tokenizer` (`train.run.tokenizer_of`: bytes, or the
    tokenizer.json kept in the workdir, checked against the sha256 its checkpoints record), with the special tokens
    it adds around a text (`special_affixes`). UserError for a run without a tokenizer or one llama.cpp's
    byte-level BPE cannot reproduce."""
    if tokenizer.kind == "byte":
        return byte_vocab()
    if tokenizer.kind == "none":
        raise UserError(f"{workdir} was trained on pre-tokenized ids without a tokenizer; GGUF export needs one "
                        f"(llama.cpp reads text)")
    return dataclasses.replace(bpe_vocab(json.loads(tokenizer.to_json())), **special_affixes(tokenizer))


LLAMA_CPP_NO_EOS = ("the file holds no tokenizer.ggml.eos_token_id; llama.cpp then takes its gpt2 default, id 11, "
                    "which this model never learnt to end with: it generates until its token limit (give llama.cpp "
                    "-n N)")


def export_workdir(workdir: Path, out: Path, requested_type: str | None = None, log=print) -> Path:
    """Export the latest checkpoint of `workdir` to the GGUF file `out` (see the module docstring), which must not
    exist (missing folders above it are made); a run imported from Hugging Face, or derived from one, keeps its
    bos/eos/pad token ids, and a tokenizer's added bos/eos are written as such (`train.token_ids`)."""
    workdir, out = Path(workdir), Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"--out must name a .gguf file, got {out}")
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} already exists; an export writes a new file")
    check_out_parent(out)  # missing folders above it are made, as the other exports make theirs
    store = open_store(workdir)
    try:
        metadata = store.metadata()
    finally:
        store.close()
    kind = metadata.get("kind") or "train"
    check_kind(kind)  # before a LoRA run's base would be read
    tokenizer = tokenizer_of(workdir)
    vocab = run_vocab(workdir, tokenizer)
    start = time.perf_counter()
    run = load_run(workdir)
    config = run.config
    out_type = export_type(kind, config.quant, requested_type)
    check_exportable(config.model, config.quant, out_type)
    activations = activation_quantization(config.model, config.quant)
    if activations:
        log(f"note: {workdir} computes with {activations}, which llama.cpp does not: the file holds its weights "
            f"and llama.cpp computes activations its own way, so its outputs differ slightly from the run's")
    tensors = gguf_tensors(config.model, config.quant, run.variables, kind, out_type)
    vocab = pad_vocab(vocab, config.model.vocab_size)
    token_ids = export_token_ids(workdir, run.metadata, tokenizer)  # the Hugging Face export's ids too
    note = eos_note(workdir, tokenizer.kind, token_ids, LLAMA_CPP_NO_EOS)
    if note:
        log(note)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(out, config.model, tensors, vocab, out_type, name=workdir.resolve().name, token_ids=token_ids)
    log(f"wrote {out} ({out_type}, {out.stat().st_size:,} bytes, {len(tensors)} tensors) from {workdir} "
        f"(step {run.step}, {kind}) in {time.perf_counter() - start:.1f}s")
    return out


@main_guard
def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m checkpoints.gguf_export",
        description="Write a run as a GGUF file for llama.cpp. Float, imported and QAT runs: f32/f16/bf16, or "
                    "q8_0/q4_0 quantized by gguf's own quantizer (layers a QAT run keeps float stay F16). Serving "
                    "runs in a ggml scheme: their stored Q8_0/Q4_0 blocks, unchanged.")
    parser.add_argument("--workdir", type=path_arg, required=True, help="the run to export")
    parser.add_argument("--out", type=path_arg, required=True, help="the .gguf file to write")
    parser.add_argument("--type", dest="type", help="f32 | f16 | bf16 | q8_0 | q4_0 (default: the run's ggml scheme, "
                                                    "else f16)")
    args = parser.parse_args(argv)
    require_one_process("python -m checkpoints.gguf_export")
    export_workdir(args.workdir, args.out, args.type)


if __name__ == "__main__":
    main()
