"""Validation loss, perplexity and bits per character, computed the same way for every kind of model and run, and
for a serving run, how far its next-token distribution is from the parent it was converted from (KL, top-1)."""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

import jax
import numpy as np

from checkpoints.manager import tree_bytes
from quant.kl import kl_summary, token_kl
from slm_jax.errors import UserError
from train.data import DataConfig, crc32, eval_batches, eval_rows, eval_starts, load_splits, windows
from train.memory_check import check_option_fits, forward_bytes
from train.run import LoadedRun, load_run
from train.steps import make_eval_step, split_variables

# Validation steps dispatched before the oldest is waited for. All at once (80 for `baseline` with batch_size 4 and
# grad_accum 4), XLA CPU's in-process all-reduce over two devices deadlocked: one device's half never joined, and XLA
# aborted the process after 40 s (rendezvous termination timeout) at the run's first validation.
IN_FLIGHT = 2


def mean_loss(eval_step, variables_params, frozen, tokens: np.ndarray, batch_size: int, seq_len: int,
              max_batches: int, place=None) -> float:
    """Average next-token loss over deterministic windows of `tokens` (eval_step is jitted by the caller).
    `place(starts)` -> (inputs, targets) puts a batch whose windows begin at `starts` on the devices (e.g. split
    along the mesh's data axis, each process reading its own rows); default: numpy arrays of the whole batch. At most
    IN_FLIGHT steps run ahead of the one waited for."""
    place = place or (lambda starts: windows(tokens, starts, seq_len))
    losses = []
    for starts in eval_starts(tokens, batch_size, seq_len, max_batches):
        if len(losses) >= IN_FLIGHT:
            jax.block_until_ready(losses[-IN_FLIGHT])
        losses.append(eval_step(variables_params, frozen, *place(starts)))
    return float(np.mean(jax.device_get(losses)))


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> str:
    """How many windows a validation loss over `tokens` averages (the batches `mean_loss` really runs, fewer than
    `max_batches` on a short split), e.g. "20 batches x 16 windows x 32 tokens": every loss table and log line says
    it, so losses over different windows are never compared unawares."""
    starts = eval_starts(tokens, batch_size, seq_len, max_batches)
    return f"{len(starts)} batch{'es' if len(starts) != 1 else ''} x {len(starts[0])} windows x {seq_len} tokens"


def loss_summary(loss: float, chars_per_tok: float | None = 1.0) -> dict:
    """loss (nats/token) -> {'loss', 'perplexity', 'bits_per_char'}; bits_per_char is None when characters per
    token are unknown (pre-tokenized ids without a tokenizer), never a number in the wrong unit."""
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_char": loss / math.log(2) / chars_per_tok if chars_per_tok else None}


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `val_tokens` under the training split's token frequencies (add-one smoothed over
    `vocab_size` ids): the loss of a model that learned nothing but how often each token occurs. A language model's
    validation loss at or above it has learned no context (or collapsed to frequencies, or to uniform)."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(val_tokens)].mean())


def format_bits_per_char(bits: float | None) -> str:
    """The log line's bits/char part; "n/a" when the run has no text (pre-tokenized ids, no tokenizer)."""
    return f"bits/char {bits:.3f}" if bits is not None else "bits/char n/a (pre-tokenized ids, no tokenizer)"


def evaluate_workdir(workdir: Path, batches: int, batch_size: int, data: DataConfig | None = None,
                     base: Path | None = None, step: int | None = None, option: str = "--batch-size") -> dict:
    """Validation loss of any run in `workdir` on its own validation split, or on `data`'s (e.g. a fine-tuning
    target), tokenized by the run's own tokenizer: {'workdir', 'step', 'quant', 'loss', 'perplexity',
    'bits_per_char' (None without text), 'param_bytes', 'val_windows' (`eval_windows`), 'val_text' (`val_text`),
    'val_text_key' (`val_text_key`)},
    plus for a serving run that
    names the run it was converted from, `parent_comparison`'s 'kl_mean', 'kl_p99', 'top1' or 'kl_absent'. UserError
    if the loss is not finite (a NaN is never a result), or when a batch of `batch_size` windows cannot fit in
    memory (`train.memory_check`; `option`: the command-line option the refusal names). `base`: where a LoRA run's
    base is now (`load_run`); `step`: the checkpoint step to evaluate (default: the latest)."""
    run = load_run(workdir, step, base=base)  # `base` is used by LoRA runs only
    splits = load_splits(data or run.config.data, run.tokenizer)
    check_batch_fits(run, splits.val, batch_size, option, f"evaluating {workdir}")
    loss = mean_loss(jax.jit(make_eval_step(run.model)), *split_variables(run.variables), splits.val, batch_size,
                     run.config.model.seq_len, batches)
    if not math.isfinite(loss):
        raise UserError(f"the validation loss of {workdir} (step {run.step}) is {loss}: its model overflows on this "
                        f"data (precision {run.config.train.precision}); try train.precision=fp32 or another step")
    return {"workdir": str(workdir), "step": run.step, "quant": run.config.quant.mode,
            **loss_summary(loss, splits.chars_per_token),
            "param_bytes": tree_bytes(run.variables)["total"],
            "val_windows": eval_windows(splits.val, batch_size, run.config.model.seq_len, batches),
            "val_text": val_text(splits.description), "val_text_key": val_text_key(splits.val, run.tokenizer),
            **({} if data else text_changes(run.metadata.get("data") or {}, splits.description)),
            **parent_comparison(run, splits.val, batch_size, batches)}


def check_batch_fits(run: LoadedRun, tokens: np.ndarray, batch_size: int, option: str, what: str) -> None:
    """UserError naming `option` and a value that fits when a forward pass of `run`'s model over a validation batch
    of `batch_size` windows of `tokens` (fewer when the split holds fewer) cannot fit in memory, next to its
    variables (`train.memory_check.check_option_fits`)."""
    model, held = run.config.model, tree_bytes(run.variables)["total"]
    check_option_fits(option, batch_size, lambda n: forward_bytes(model, eval_rows(tokens, n, model.seq_len), held),
                      what)


def text_changes(recorded: dict, now: dict) -> dict:
    """{'text_changed': what} when the token splits a run recorded at its checkpoint (`data` in its metadata: token
    counts and CRC-32s) differ from those its data settings give now (the text at data.path was edited or grew since),
    so its validation split is no longer the text held out in training and may hold text it trained on; else {}."""
    old, new = recorded.get("crc32") or {}, now.get("crc32") or {}
    changes = [f"{key} {recorded[key]:,} -> {now[key]:,}" for key in ("train_tokens", "val_tokens")
               if isinstance(recorded.get(key), int) and isinstance(now.get(key), int) and recorded[key] != now[key]]
    changes += [f"{name} CRC-32 {old[name]} -> {new[name]}" for name in ("train.bin", "val.bin")
                if name in old and name in new and int(old[name]) != int(new[name])]
    return {"text_changed": "; ".join(changes)} if changes else {}


def parent_comparison(run: LoadedRun, tokens: np.ndarray, batch_size: int, max_batches: int) -> dict:
    """For a serving run whose metadata names `converted_from`: KL(parent || run) of the next-token distributions
    (nats; mean and 99th percentile over tokens) and top-1 agreement on the same validation windows as the loss,
    {'kl_mean', 'kl_p99', 'top1'} (`quant.kl`). {'kl_absent': why} when the parent (at `converted_from_step`) cannot
    be read or does not match; {} for any other run."""
    source = run.metadata.get("converted_from")
    if run.metadata.get("kind") != "serving" or not source:
        return {}
    try:
        parent = load_run(Path(source), run.metadata.get("converted_from_step"))
    except UserError as err:
        return {"kl_absent": f"parent {source} not readable ({err})"}
    if parent.config.model != run.config.model or parent.metadata.get("tokenizer") != run.metadata.get("tokenizer"):
        return {"kl_absent": f"parent {source} now holds a different model or tokenizer"}
    return compare_runs(parent, run, tokens, batch_size, max_batches)


def compare_runs(parent: LoadedRun, run: LoadedRun, tokens: np.ndarray, batch_size: int, max_batches: int) -> dict:
    """{'kl_mean', 'kl_p99', 'top1'}: KL(parent || run) in nats per token and argmax agreement (`quant.kl`) over
    `eval_batches(tokens, ...)`, the windows `mean_loss` reads. Both runs must share model shape and tokenizer."""
    parent_logits, run_logits = (jax.jit(lambda v, x, m=r.model: m.apply(v, x)[0]) for r in (parent, run))
    kls, agrees = [], []
    for inputs, _ in eval_batches(tokens, batch_size, run.config.model.seq_len, max_batches):
        kl, agree = token_kl(np.asarray(parent_logits(parent.variables, inputs)),
                             np.asarray(run_logits(run.variables, inputs)))
        kls.append(kl.ravel())
        agrees.append(agree.ravel())
    return kl_summary(np.concatenate(kls), np.concatenate(agrees))


def format_bits(value: float | None) -> str:
    """bits/char as a table cell: 4 decimals, or "n/a" when unknown (pre-tokenized ids without a tokenizer)."""
    return f"{value:.4f}" if value is not None else "n/a"


def format_kl(value: float) -> str:
    """A KL in nats as a table cell of 8 characters: 4 decimals, or 3 significant digits (8.07e-06) below 0.001,
    where 4 decimals would print a W8A8 model's small but nonzero KL as 0.0000 and hide which method is closer."""
    return f"{value:.4f}" if value == 0 or value >= 1e-3 else f"{value:.2e}"


def val_text(description: dict) -> str:
    """Which text a validation split is, from its `Splits.description`: the source (the bundled corpus's version or
    the user's file(s)), the held-out plays when the bundled corpus is split by play, and its length in characters
    (tokens for pre-tokenized ids without text). Runs whose splits have different descriptions measured their loss
    on different text, whatever their tokenizers."""
    plays = description.get("val_plays")
    size = (f"{description['val_chars']:,} chars" if description.get("val_chars") is not None
            else f"{description.get('val_tokens', 0):,} tokens")
    return f"{description.get('source')}" + (f", plays {','.join(plays)}" if plays else "") + f", {size}"


_TEXT_KEYS: dict[tuple[str, str, str], int] = {}  # `val_text_key`s decoded in this process, by `_split_identity`


def _split_identity(val_tokens: np.ndarray, tokenizer) -> tuple[str, str, str]:
    """What a split's decoded text depends on: a digest of its ids (read in place, no copy of a memmapped file),
    their dtype, and the tokenizer's description (a tokenizer.json's sha256; the byte tokenizer has one)."""
    ids = np.ascontiguousarray(val_tokens)
    return (hashlib.blake2b(memoryview(ids).cast("B"), digest_size=16).hexdigest(), ids.dtype.str,
            json.dumps(tokenizer.describe(), sort_keys=True))


def val_text_key(val_tokens: np.ndarray, tokenizer) -> int:
    """CRC-32 of a validation split's text, decoded by `tokenizer` (so the same text at another path, or under
    another tokenizer, has the same key), or of its token ids when there is no text (pre-tokenized ids). The whole
    split is decoded once per process for each split and tokenizer (`_split_identity`), however many runs
    `evaluate_workdir` reads."""
    if tokenizer.kind == "none":
        return crc32(val_tokens)
    identity = _split_identity(val_tokens, tokenizer)
    if identity not in _TEXT_KEYS:
        _TEXT_KEYS[identity] = zlib.crc32(tokenizer.decode(val_tokens).encode("utf-8", errors="surrogatepass"))
    return _TEXT_KEYS[identity]


def conversion_rows(source: Path, out: Path, batches: int, batch_size: int) -> list[dict]:
    """`evaluate_workdir` rows of a conversion's source and its serving run `out`: the source at the step `out` was
    converted from (not its latest, which a run still training has moved past), or only `out`'s row, whose
    'kl_absent' says why, when that step is no longer there."""
    converted = evaluate_workdir(out, batches, batch_size)  # a serving run's step is the one it was converted from
    if "kl_absent" in converted:
        return [converted]
    return [evaluate_workdir(source, batches, batch_size, step=converted["step"]), converted]


def format_table(rows: list[dict]) -> str:
    """`evaluate_workdir` rows as an aligned text table, one line per run; KL mean / p99 and top-1 columns (vs the
    parent run) when any row has them; then the validation windows the losses average (one line when all runs used
    the same, else one per run), a note for each serving run whose parent was absent and for each run whose text
    changed since it was trained (`text_changes`), and one when the runs' validation text differs (by
    `val_text_key` where rows have it, else `val_text`)."""
    kl = any("kl_mean" in r for r in rows)
    width = max(28, *(len(str(r["workdir"])) for r in rows))  # the longest workdir sets the first column
    header = (f"{'workdir':<{width}} {'step':>6} {'quant':>6} {'val loss':>9} {'ppl':>8} {'bits/char':>9} "
              f"{'param MB':>9}")
    header += f" {'KL mean':>8} {'KL p99':>8} {'top-1':>7}" if kl else ""
    lines, notes = [header, "-" * len(header)], []
    for r in rows:
        line = (f"{str(r['workdir']):<{width}} {r['step']:>6} {r['quant']:>6} {r['loss']:>9.4f} "
                f"{r['perplexity']:>8.3f} {format_bits(r['bits_per_char']):>9} {r['param_bytes'] / 1e6:>9.3f}")
        if kl:
            line += (f" {format_kl(r['kl_mean']):>8} {format_kl(r['kl_p99']):>8} {r['top1']:>7.2%}" if "kl_mean" in r
                     else f" {'-':>8} {'-':>8} {'-':>7}")
        lines.append(line)
        if "kl_absent" in r:
            notes.append(f"no KL for {r['workdir']}: {r['kl_absent']}")
        if "text_changed" in r:
            notes.append(f"note: the text of {r['workdir']} changed since it was trained ({r['text_changed']}): its "
                         f"validation split is not the text held out in training and may hold text it trained on")
    if len({r["val_windows"] for r in rows}) == 1:
        lines.append(f"val loss over {rows[0]['val_windows']} of each run's validation split")
    else:
        lines += [f"val loss of {r['workdir']} over {r['val_windows']}" for r in rows]
    if len({r.get("val_text_key", r.get("val_text")) for r in rows}) > 1:  # different text: not a comparison
        notes.append("note: these runs' validation text differs, so their losses measure different text: "
                     + "; ".join(f"{r['workdir']}: {r.get('val_text') or 'unknown'}" for r in rows))
    if kl:
        notes.insert(0, "KL: nats per token, KL(parent || run) of next-token distributions; top-1: argmax agreement")
    return "\n".join(lines + notes)
