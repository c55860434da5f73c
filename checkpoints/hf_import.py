"""`python -m checkpoints.hf_import HF_DIR --out runs/NAME [--seq-len N]`: a local Hugging Face Llama folder
(config.json, model.safetensors or a sharded index, tokenizer.json) as an ordinary slm-jax run.

The run holds float32 params only (kind "imported", step 0), the full config and a copy of tokenizer.json; every
command that reads runs takes it. It is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from checkpoints.hf import TOKEN_IDS, model_config, read_config, read_params
from checkpoints.manager import CheckpointStore, build_metadata, param_count
from slm_jax.errors import UserError
from train.cli import main_guard
from train.config import Config, check_consistency, save_yaml

TOKENIZER_FILE = "tokenizer.json"


def tokenizer_description(path: Path) -> dict:
    """What a run's metadata says about a tokenizer.json (the `tokenizers` library's format): UserError if it
    cannot be read by that library."""
    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as err:  # the library raises a bare Exception for files it cannot parse
        raise UserError(f"{path} is not a tokenizer.json the tokenizers library reads ({str(err)[:120]})") from None
    return {"kind": "tokenizer.json", "path": str(path), "vocab_size": vocab}


def import_folder(folder: Path, out: Path, seq_len: int | None = None, log=print) -> Path:
    """Write the run `out` (which must not exist) from the Hugging Face folder `folder`; returns `out`.

    Everything is checked (config.json, every tensor's name, dtype and shape, tokenizer.json) before anything is
    written; a failure while writing leaves no `out` behind.
    """
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise UserError(f"--out {out} already exists; an import writes a new run")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    hf = read_config(folder)
    config = Config(model=model_config(hf, seq_len))
    check_consistency(config)
    if not (folder / TOKENIZER_FILE).is_file():
        raise UserError(f"{folder} has no {TOKENIZER_FILE} (the tokenizers library's format; tokenizer.model alone "
                        f"is not read)")
    tokenizer = tokenizer_description(folder / TOKENIZER_FILE)
    params = read_params(folder, config.model)

    final = out.resolve()
    tmp = final.with_name(f".{final.name}.importing-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(folder / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        tokenizer["path"] = str(final / TOKENIZER_FILE)
        source = {"path": str(folder.resolve()), **{key: hf[key] for key in TOKEN_IDS if hf.get(key) is not None}}
        store = CheckpointStore(tmp / "checkpoints", keep=1, async_save=False)
        try:
            store.save(0, {"params": params}, build_metadata(config.to_dict(), 0, params, tokenizer,
                                                              kind="imported", imported_from=source))
        finally:
            store.close()
        save_yaml(config, tmp / "config.yaml")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"imported {folder} -> {out}: {param_count(params):,} params, {config.model.n_layers} layers, vocab {config.model.vocab_size}, "
        f"context {config.model.context} (training window {config.model.seq_len})")
    return out


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m checkpoints.hf_import", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="a local Hugging Face model folder of the Llama architecture")
    parser.add_argument("--out", type=Path, required=True, help="the new run's folder, e.g. runs/smollm2")
    parser.add_argument("--seq-len", type=int, help="training window (default: min(max_position_embeddings, 512))")
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError("--seq-len must be a positive integer")
    import_folder(args.hf_dir, args.out, args.seq_len)


if __name__ == "__main__":
    main()
