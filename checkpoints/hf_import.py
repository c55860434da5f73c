"""`python -m checkpoints.hf_import HF_DIR --out runs/NAME [--seq-len N]`: a local Hugging Face Llama folder
(config.json, model.safetensors or a sharded index, tokenizer.json) as an ordinary slm-jax run.

The run holds float32 params only (kind "imported", step 0), the full config and a copy of tokenizer.json (its
`data.tokenizer`); every command that reads runs takes it. It is written under a temporary name and renamed when
complete.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

from pathlib import Path

from checkpoints.hf import TOKEN_IDS, model_config, read_config, read_params
from checkpoints.manager import CheckpointStore, build_metadata, param_count
from slm_jax.errors import UserError
from train.cli import ArgumentParser, main_guard, positive_int, require_one_process, path_arg
from train.config import Config, check_consistency, save_yaml
from train.data import DataConfig
from train.run import check_output_folder, new_run_folder
from train.tokenizer import TOKENIZER_FILE, read_tokenizer_file, save_tokenizer


def import_folder(folder: Path, out: Path, seq_len: int | None = None, log=print) -> Path:
    """Write the run `out` (absent or an empty folder) from the Hugging Face folder `folder`; returns `out`.

    Everything is checked (config.json, every tensor's name, dtype and shape, tokenizer.json) before anything is
    written; the run is built under a locked temporary name and renamed when complete (`train.run.new_run_folder`),
    so a failure or a kill while writing leaves no `out` behind. UserError if `out` is a file or a non-empty folder.
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    check_output_folder(folder, out)
    hf = read_config(folder)
    model = model_config(hf, seq_len)
    if not (folder / TOKENIZER_FILE).is_file():
        raise UserError(f"{folder} has no {TOKENIZER_FILE} (the tokenizers library's format; tokenizer.model alone "
                        f"is not read)")
    tokenizer = read_tokenizer_file(folder / TOKENIZER_FILE, key=str(folder / TOKENIZER_FILE))
    if tokenizer.vocab_size > model.vocab_size:  # train.config's own message would suggest unsetting model.*
        raise UserError(f"{folder / TOKENIZER_FILE} has {tokenizer.vocab_size} ids (added tokens included) but "
                        f"config.json vocab_size is {model.vocab_size}: the model has no embedding row for ids "
                        f"{model.vocab_size} and up; use the tokenizer.json that came with the model")
    check_consistency(Config(model=model, data=DataConfig(tokenizer=str(folder / TOKENIZER_FILE))))
    params = read_params(folder, model)

    config = Config(model=model, data=DataConfig(tokenizer=str(out.resolve() / TOKENIZER_FILE)))  # the run's copy
    with new_run_folder(folder, out) as tmp:  # built under a locked temporary name, renamed when complete
        save_tokenizer(tokenizer, tmp)
        source = {"path": str(folder.resolve()), **{key: hf[key] for key in TOKEN_IDS if hf.get(key) is not None}}
        store = CheckpointStore(tmp / "checkpoints", keep=1, async_save=False)
        try:
            store.save(0, {"params": params}, build_metadata(config.to_dict(), 0, params, tokenizer.describe(),
                                                              kind="imported", imported_from=source))
        finally:
            store.close()
        save_yaml(config, tmp / "config.yaml")
    log(f"imported {folder} -> {out}: {param_count(params):,} params, {config.model.n_layers} layers, "
        f"vocab {config.model.vocab_size}, "
        f"context {config.model.context} (training window {config.model.seq_len})")
    return out


@main_guard
def main(argv=None):
    parser = ArgumentParser(prog="python -m checkpoints.hf_import", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=path_arg, help="a local Hugging Face model folder of the Llama architecture")
    parser.add_argument("--out", type=path_arg, required=True, help="the new run's folder, e.g. runs/smollm2")
    parser.add_argument("--seq-len", type=positive_int,
                        help="training window (default: min(max_position_embeddings, 512))")
    args = parser.parse_args(argv)
    require_one_process("python -m checkpoints.hf_import")
    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError("--seq-len must be a positive integer")
    import_folder(args.hf_dir, args.out, args.seq_len)


if __name__ == "__main__":
    main()
