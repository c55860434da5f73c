"""`python -m checkpoints.gguf_export --workdir RUN --out model.gguf [--type f32|f16|bf16|q8_0|q4_0]`: a run as a
GGUF file that llama.cpp loads (architecture `llama`, the run's tokenizer as a byte-level BPE vocabulary).

The run is read through `train.run` (so this entry module sits above the `checkpoints.gguf` library).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from checkpoints.gguf import check_exportable, check_kind, export_type, gguf_tensors, write_gguf
from checkpoints.gguf_vocab import Vocab, bpe_vocab, byte_vocab
from slm_jax.errors import UserError
from train.cli import main_guard
from train.run import load_run, open_store

TOKENIZER_FILE = "tokenizer.json"  # a BPE run's tokenizer, in Hugging Face tokenizers' format, in its workdir


def run_vocab(workdir: Path, tokenizer: dict) -> Vocab:
    """The vocabulary of a run from its checkpoint's tokenizer description: bytes, or the BPE `tokenizer.json`
    kept in the workdir. UserError for a tokenizer llama.cpp cannot reproduce."""
    kind = tokenizer.get("kind")
    if kind == "byte":
        return byte_vocab()
    path = Path(workdir) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{workdir}: a {kind!r} tokenizer needs its {TOKENIZER_FILE} in the workdir for GGUF export")
    try:
        return bpe_vocab(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is not a usable tokenizer.json ({err})") from None


def export_workdir(workdir: Path, out: Path, requested_type: str | None = None, log=print) -> Path:
    """Export the latest checkpoint of `workdir` to the GGUF file `out` (see the module docstring)."""
    workdir, out = Path(workdir), Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"--out must name a .gguf file, got {out}")
    if not out.parent.is_dir():
        raise UserError(f"--out: folder {out.parent} does not exist")
    store = open_store(workdir)
    try:
        metadata = store.metadata()
    finally:
        store.close()
    kind = metadata.get("kind") or "train"
    check_kind(kind)  # before a LoRA run's base would be read
    vocab = run_vocab(workdir, metadata.get("tokenizer") or {})
    start = time.perf_counter()
    run = load_run(workdir)
    config = run.config
    out_type = export_type(kind, config.quant, requested_type)
    check_exportable(config.model, config.quant, out_type)
    tensors = gguf_tensors(config.model, config.quant, run.variables, kind, out_type)
    write_gguf(out, config.model, tensors, vocab, out_type, name=workdir.resolve().name)
    log(f"wrote {out} ({out_type}, {out.stat().st_size:,} bytes, {len(tensors)} tensors) from {workdir} "
        f"(step {run.step}, {kind}) in {time.perf_counter() - start:.1f}s")
    return out


@main_guard
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints.gguf_export",
        description="Write a run as a GGUF file for llama.cpp. Float and QAT runs: f32/f16/bf16, or q8_0/q4_0 "
                    "quantized by gguf's own quantizer (layers a QAT run keeps float stay F16). Serving runs in a "
                    "ggml scheme: their stored Q8_0/Q4_0 blocks, unchanged.")
    parser.add_argument("--workdir", type=Path, required=True, help="the run to export")
    parser.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    parser.add_argument("--type", dest="type", help="f32 | f16 | bf16 | q8_0 | q4_0 (default: the run's ggml scheme, "
                                                    "else f16)")
    args = parser.parse_args(argv)
    export_workdir(args.workdir, args.out, args.type)


if __name__ == "__main__":
    main()
