"""`python -m checkpoints.gguf_reference --workdir RUN --out ref.npz`: slm-jax's side of the llama.cpp check.

Saves what `checkpoints.gguf_check` (run in a venv with llama-cpp-python and no jax) compares a GGUF file against:
validation windows, slm-jax's logits on them, a text sample with its token ids, and slm-jax's decode speed.
"""
from __future__ import annotations

from train.interrupts import exit_while_loading  # standard library only

if __name__ == "__main__":  # a Ctrl-C while the imports below load JAX ends at once, in one line, exit 130
    exit_while_loading()

from pathlib import Path

import jax
import numpy as np

from checkpoints.gguf import new_file
from slm_jax.errors import UserError
from train.bench.serving import decode_speed
from train.cli import ArgumentParser, main_guard, path_arg
from train.data import eval_starts, load_splits
from train.data import windows as data_windows
from train.memory_check import check_fits
from train.run import check_out_parent, load_run

BATCH = 16  # windows per forward pass
EXISTS = "the reference is written to a new file"  # after "--out X already exists; "


def reference(workdir: Path, windows: int, new_tokens: int) -> dict[str, np.ndarray]:
    """{"inputs", "targets": int32 [windows, seq_len]; "logits": float32 [windows, seq_len, vocab]; "text": uint8
    UTF-8 bytes of a validation sample; "text_ids": its ids under the run's own tokenizer; "seq_len";
    "decode_tokens_per_s" (batch 1)}. Fewer windows when the validation split holds fewer (said in one line);
    UserError when their logits would not fit in memory (train.memory_check)."""
    run = load_run(workdir)
    cfg = run.config.model
    tokenizer = run.tokenizer  # the run's own (bytes, or its tokenizer.json), as the GGUF file's vocabulary
    splits = load_splits(run.config.data, tokenizer)
    starts = eval_starts(splits.val, min(BATCH, windows), cfg.seq_len, -(-windows // BATCH))
    found = min(windows, sum(len(batch) for batch in starts))
    if found < windows:
        print(f"[--windows {windows}: the validation split holds {found} windows of {cfg.seq_len} tokens; all are "
              f"used]", flush=True)
    # the float32 logits, held as batches and once more joined: the bulk of what this command holds at once
    check_fits(2 * 4 * found * cfg.seq_len * cfg.vocab_size,
               f"the reference logits of {found} windows x {cfg.seq_len} tokens x {cfg.vocab_size} ids")
    forward = jax.jit(lambda v, x: run.model.apply(v, x)[0])
    inputs, targets, logits = [], [], []
    for x, y in (data_windows(splits.val, batch, cfg.seq_len) for batch in starts):
        inputs.append(x)
        targets.append(y)
        logits.append(np.asarray(forward(run.variables, x), np.float32))
    text = tokenizer.decode(splits.val[:2000]).encode("utf-8")
    speed = decode_speed(run, 1, max(2, min(new_tokens, cfg.seq_len // 2)), reps=3)
    return {"inputs": np.concatenate(inputs)[:windows].astype(np.int32),
            "targets": np.concatenate(targets)[:windows].astype(np.int32),
            "logits": np.concatenate(logits)[:windows], "text": np.frombuffer(text, np.uint8),
            "text_ids": tokenizer.encode(text.decode("utf-8")).astype(np.int32), "seq_len": np.int32(cfg.seq_len),
            "decode_tokens_per_s": np.float64(speed["decode_tokens_per_s"])}


def check_out_file(out: Path) -> None:
    """UserError unless `out` names a new .npz file (numpy would add the suffix, or write `<folder>.npz` for a
    folder) that can be made; an existing file is never overwritten."""
    if out.suffix != ".npz":
        raise UserError(f"--out must name a .npz file, got {out}")
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} already exists; {EXISTS}")
    check_out_parent(out)


def write_npz(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` as the new .npz file `out`, written under a temporary name beside it and renamed when complete
    (checkpoints.gguf.new_file), so an interrupted or failed write leaves no partial file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with new_file(out, EXISTS) as temporary:
        np.savez(temporary, **arrays)


@main_guard
def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m checkpoints.gguf_reference", description=__doc__)
    parser.add_argument("--workdir", type=path_arg, required=True, help="the run the GGUF files were exported from")
    parser.add_argument("--out", type=path_arg, required=True, help="the .npz file to write")
    parser.add_argument("--windows", type=int, default=64, help="validation windows of seq_len tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded when timing slm-jax")
    args = parser.parse_args(argv)
    if args.windows <= 0 or args.new_tokens < 2:
        raise UserError("--windows must be positive and --new-tokens at least 2 (decode is timed between two "
                        "generate lengths)")
    check_out_file(args.out)
    arrays = reference(args.workdir, args.windows, args.new_tokens)
    write_npz(args.out, arrays)
    print(f"wrote {args.out}: {len(arrays['inputs'])} windows of {int(arrays['seq_len'])} tokens; slm-jax decode "
          f"{float(arrays['decode_tokens_per_s']):,.0f} tokens/s at batch 1")


if __name__ == "__main__":
    main()
