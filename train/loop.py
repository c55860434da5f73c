"""The training loop: resume or initialise, step, log, evaluate, checkpoint, and finish with a sample.

Batches are a pure function of (seed, step) and the RNG lives in the state, so a resumed run continues the
uninterrupted run's loss trajectory exactly.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from checkpoints.manager import CheckpointStore, build_metadata, param_count
from quant.plan import format_plan, make_plan, plan_to_json
from slm_jax.errors import UserError
from slm_jax.sampling import generate_chunks
from train.config import Config, save_yaml
from train.data import batch_starts, check_splits, ignored_text_note, load_splits, windows
from train.evaluation import eval_windows, format_bits_per_char, loss_summary, mean_loss, unigram_loss
from train.interrupts import STOP, signals_held, stop_exception
from train.metrics import MetricsLog, Throughput, format_duration
from train.observe import StepProfiler, TensorBoardLog
from train.optim import learning_rate_schedule
from train.precision import all_finite
from train.recipe import make_recipe
from train.run import check_resumable, check_schedule, config_from_metadata, keep_init_from, same_folder
from train.sharding import (batch_sharding, check_batch_rows, load_sharded, make_mesh, rows_sharding,
                            shard_train_step)
from train.steps import make_eval_step, make_train_step, merge_variables, steps_compiler_options
from train.tokenizer import save_tokenizer


class TrainingDiverged(UserError):
    """The loss, the gradients or the state became NaN/inf: training stops without saving, and the last checkpoint
    (which is finite: every save is checked) stays as it was."""


def diverged(what: str, step: int, last_good: int | None, store: CheckpointStore, precision: str,
             first: int | None = None) -> TrainingDiverged:
    """The stop message: what became non-finite, and the last checkpoint saved (finite: every save is checked).
    `first`: the step this session started from, when `step` is its first step: there the input (the data, the
    resumed checkpoint) is as likely a cause as the learning rate, so the message names it first."""
    check = ("" if first is None else "check the data (data.path, the token cache)"
             + (f" and the checkpoint of step {first} it resumed from" if first else "") + "; ")
    return TrainingDiverged(
        f"{what} at step {step}{'' if first is None else ' (the first step of this session)'}; stopped without "
        f"saving (last good checkpoint: {last_good if last_good is not None else 'none'} in {store.directory}); "
        f"{check}try a lower train.learning_rate or train.grad_clip"
        + (", or train.precision=fp32" if precision != "fp32" else ""))


def train_batch(tokens: np.ndarray, config: Config, step: int, sharding):
    """(inputs, targets) of `step`, each a global int32 [grad_accum, batch, seq] Array split by `sharding`; each
    process reads only the windows of the rows its own devices hold."""
    cfg, seq_len = config.train, config.model.seq_len
    check_batch_rows(cfg.batch_size, sharding)
    starts = batch_starts(tokens, cfg.seed, step, cfg.batch_size * cfg.grad_accum, seq_len)
    starts = starts.reshape(cfg.grad_accum, cfg.batch_size)
    return load_sharded((*starts.shape, seq_len), sharding, lambda index: windows(tokens, starts[index[:2]], seq_len),
                        count=2)


def eval_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int, mesh):
    """(inputs, targets) of an evaluation batch, each a global int32 [len(starts), seq] Array split along the mesh's
    batch axes (data, fsdp) where they divide it; each process reads only its own rows."""
    return load_sharded((len(starts), seq_len), rows_sharding(mesh, len(starts)),
                        lambda index: windows(tokens, starts[index[0]], seq_len), count=2)


def describe_quant_plan(config: Config, plan, workdir: Path | None, log) -> dict | None:
    """Print the resolved per-layer quantization `plan` (`make_plan`'s, None for a float run) and save it as
    `quant_plan.json` in `workdir` (None: not saved); returns it as JSON (None for float runs)."""
    if plan is None:
        return None
    log(f"quantization plan ({config.quant.mode}):\n{format_plan(plan)}")
    if workdir is not None:
        (workdir / "quant_plan.json").write_text(json.dumps(plan_to_json(plan), indent=1))
    return plan_to_json(plan)


def run_training(config: Config, workdir: Path, log=print, profile_steps: int = 0) -> dict:
    """Train `config` in `workdir`; returns the final summary (also written to metrics.jsonl, and as TensorBoard
    scalars to <workdir>/tensorboard with train.tensorboard). What trains (every param, or adapters over a frozen
    base) is the recipe's business; this loop is the same for all. `profile_steps` > 0: a jax.profiler trace of
    that many steps after the first compiled one, to <workdir>/profile (process 0).

    In a multi-process run every process calls this (and takes part in every step, evaluation and Orbax save);
    only process 0 logs and writes config.yaml, tokenizer.json, quant_plan.json and metrics.jsonl."""
    primary = jax.process_index() == 0
    log = log if primary else _silent
    recipe = make_recipe(config)
    config, model = recipe.config, recipe.model  # LoRA: the base supplies the model and quant sections
    cfg = config.train
    workdir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(config.data, recipe.inherited_tokenizer())
    check_splits(splits, config.model.seq_len)  # before any step, so a too-short split wastes no training
    tokenizer = splits.tokenizer
    if cfg.sample_tokens and tokenizer.kind != "none":  # refuse a prompt it cannot encode now, not after training
        tokenizer.encode(cfg.sample_prompt, source="train.sample_prompt")
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids, more than model.vocab_size="
                        f"{config.model.vocab_size}; leave model.vocab_size unset to take it from the tokenizer")
    # made (and its rules checked) now; printed and saved once the workdir's checkpoints are known to match, so a
    # refused resume prints one line and leaves the workdir's quant_plan.json as it was
    plan = make_plan(config.model, config.quant) if config.quant.mode != "none" else None
    tensorboard = TensorBoardLog(workdir / "tensorboard") if primary and cfg.tensorboard else None
    store = CheckpointStore(workdir / "checkpoints", keep=config.checkpoint.keep,
                            async_save=config.checkpoint.async_save)
    try:  # a resume of another model is refused before the model is laid out (minutes for a very deep one)
        if store.latest_step() is not None:
            check_resumable(store.metadata(store.latest_step()), config, store.directory)
    except BaseException:
        store.close()
        raise
    mesh = make_mesh(config.mesh)
    shardings = recipe.shardings(mesh)
    place = batch_sharding(mesh)
    state_finite = jax.jit(lambda s: all_finite((s.params, s.opt_state)))
    try:
        check_same_tokenizer(store, tokenizer)
        state = recipe.initial_state(store, log, shardings)
        check_schedule(store, config, log)
        config = keep_init_from(store, config, log)
        check_same_data(store, config, splits)
        if not bool(state_finite(state)):  # saved by a version that did not check
            raise UserError(f"checkpoint {store.directory}/{store.latest_step()} holds a non-finite state (NaN or "
                            f"inf); remove that step folder to resume from an earlier one (have: {store.steps()})")
    except BaseException:
        store.close()
        raise
    quant_plan = describe_quant_plan(config, plan, workdir if primary else None, log)
    start = int(state.step)
    if primary:
        if start < cfg.steps or not (workdir / "config.yaml").is_file():  # with nothing to train, the run's config
            save_yaml(config, workdir / "config.yaml")  # stays that of the steps its checkpoints hold
        save_tokenizer(tokenizer, workdir)
    if tensorboard:
        tensorboard.open(start)
    metrics_log = MetricsLog(workdir / "metrics.jsonl" if primary else None, tensorboard)
    metrics_log.rewind(start)  # records past the restored step were never saved: they are redone
    n_params = param_count(state.params)
    log(f"model: {n_params:,} params | train {len(splits.train):,} tokens, val {len(splits.val):,} tokens | "
        f"precision {cfg.precision} | quant {config.quant.mode} | mesh {dict(mesh.shape)}")
    for note in (ignored_text_note(config.data), bpe_size_note(config, tokenizer), warmup_note(cfg),
                 bundled_only_note(config.data)):
        if note:
            log(note)

    schedule = learning_rate_schedule(cfg)
    fp16 = cfg.precision == "fp16"
    compiler_options = steps_compiler_options(config.quant)
    train_step = shard_train_step(make_train_step(model, recipe.optimizer, schedule, fp16),
                                  shardings, place, compiler_options)
    eval_step = jax.jit(make_eval_step(model), out_shardings=NamedSharding(mesh, PartitionSpec()),
                        compiler_options=compiler_options)
    cpt = splits.chars_per_token
    seq_len = config.model.seq_len
    eval_count = cfg.eval_batches * cfg.grad_accum  # micro-batches: the same windows for the same effective batch
    val_windows = eval_windows(splits.val, cfg.batch_size, seq_len, eval_count)

    def validate() -> dict:
        loss = mean_loss(eval_step, state.params, state.frozen, splits.val, cfg.batch_size, seq_len,
                         eval_count, place=lambda starts: eval_batch(splits.val, starts, seq_len, mesh))
        if not math.isfinite(loss):
            raise diverged(f"validation loss became {loss}", int(state.step), last_good, store, cfg.precision)
        return loss_summary(loss, cpt)

    def save(step: int) -> None:
        if not bool(state_finite(state)):
            raise diverged("the parameters or optimizer state became non-finite", step, last_good, store,
                           cfg.precision)
        meta = build_metadata(config.to_dict(), step, state.params, splits.description["tokenizer"],
                              quant_plan=quant_plan, data=splits.description)
        store.save(step, *recipe.checkpoint(state, meta))

    def save_on_interrupt(saved: int | None, done: int) -> int:
        """Save the steps trained since the last checkpoint (`saved`, None for none) before a stop, so a preempted or
        stopped job loses none of them; returns the step the checkpoints now reach. A first signal stops at a step
        boundary (`StopRequests`), where the state is step `done` and its records are written; every process of a
        multi-process run stops at the same boundary (`check_stop`) and takes part in the save. Not after a
        second signal that landed mid-step (the state then may be a step ahead of its records, or deleted by
        donation) or cut its training record or evaluation short (a resume from it would skip them), nor for a
        non-finite state: each is said in one line."""
        reason = None
        if jax.process_count() > 1 and agreed != [done]:
            reason = ("a second signal stopped a multi-process run midway, where its processes may stand at "
                      "different steps")
        elif any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state) if isinstance(leaf, jax.Array)) \
                or int(state.step) != done:
            reason = f"a second signal stopped step {done + 1} midway"
        elif done == (saved if saved is not None else start):
            return done
        elif evaluating or (written != done and (done % cfg.log_every == 0 or done == cfg.steps)):
            reason = f"a second signal stopped the records or evaluation of step {done} midway"  # a resume would
            # skip them
        elif not bool(state_finite(state)):
            reason = "the state is not finite"
        if reason:
            log(f"not saving the steps since the last checkpoint: {reason}")
            return done
        save(done)
        since = "the last checkpoint" if saved is not None else "the start"
        log(f"saved step {done} on the interrupt: the {done - (saved or 0)} step(s) trained since {since}")
        return done

    noted, unigram = [], []  # the unigram loss is a pass over the training split: made once, when first needed

    def note_no_learning(val_loss: float, step: int) -> None:
        """Say once, from half the run on (earlier, a model learning well may still be behind them), that the
        validation loss is no better than token frequencies alone."""
        if noted or step < max(cfg.warmup_steps, cfg.steps / 2):
            return
        if not unigram:
            unigram.append(unigram_loss(splits.train, splits.val, config.model.vocab_size))
        if val_loss >= unigram[0]:
            noted.append(step)
            log(f"note: val loss {val_loss:.4f} at step {step} is no better than the training split's token "
                f"frequencies alone (unigram model: {unigram[0]:.4f}): the model has learned no context or has "
                f"collapsed; try a lower train.learning_rate or more steps")

    speed = Throughput(cfg.batch_size * cfg.grad_accum * seq_len, cfg.steps)
    wall_start = time.perf_counter()
    last_good = store.latest_step()
    profiler = StepProfiler(workdir / "profile", profile_steps, start + 1, log) if profile_steps and primary else None
    done, skipped = start, 0
    stop, written, evaluating = STOP, start, False  # written: the last step whose training record was written
    agreed: list[int] = []  # multi-process: the step boundary where every process agreed to stop

    def check_stop() -> None:
        """At a step boundary: raise the stop exception if this process was asked to stop or, in a multi-process
        run, if any process was (one all-gather of each process's first signal, so all stop at the same step
        whichever of them the signals reached first, or whether they reached them all; about 3.5 ms per step with
        gloo on the 2-core test machine)."""
        if jax.process_count() == 1:
            return stop.check()
        asked = stop.signals[0] if stop.signals else 0
        anywhere = int(np.max(multihost_utils.process_allgather(np.int32(asked))))
        if anywhere:
            agreed[:] = [done]
            raise stop_exception(asked or anywhere)
    try:
        with stop.installed():  # a first Ctrl-C or SIGTERM stops at the next step boundary, a second at once
            for step in range(start, cfg.steps):
                check_stop()
                batch = train_batch(splits.train, config, step, place)
                if profiler:
                    profiler.before(step)
                tic = time.perf_counter()
                state, metrics = train_step(state, batch)
                loss = float(metrics["loss"])
                if profiler:
                    profiler.after(step, state)
                if step > start:  # the first step of a process includes compilation
                    speed.add(time.perf_counter() - tic)
                first = start if step == start else None  # a NaN here may come from the input, not the learning rate
                if not math.isfinite(loss):
                    raise diverged(f"loss became {loss}", step + 1, last_good, store, cfg.precision, first)
                if not bool(metrics["grads_finite"]):
                    if not fp16:  # fp16 skips such a step and lowers its loss scale
                        raise diverged(f"gradient norm became {float(metrics['grad_norm'])}", step + 1, last_good,
                                       store, cfg.precision, first)
                    skipped += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    rates = speed.rates(done)
                    # fp16: the loss scale this step ran with, and the steps dropped for overflowing grads since the
                    # last record (their updates were not applied)
                    scaling = {"loss_scale": float(metrics["loss_scale"]), "skipped_steps": skipped} if fp16 else {}
                    record = {"step": done, "loss": loss, "lr": float(metrics["lr"]),
                              "grad_norm": float(metrics["grad_norm"]), **scaling, **rates}
                    metrics_log.write(**record)
                    written = done
                    log(f"step {done:>6}/{cfg.steps} | loss {loss:.4f} | lr {record['lr']:.2e}"
                        + (f" | loss scale {scaling['loss_scale']:g}, {skipped} skipped" if fp16 else "")
                        + (f" | {rates['tokens_per_s']:,.0f} tok/s | {rates['ms_per_step']:.1f} ms/step | "
                           f"ETA {format_duration(rates['eta_s'])}" if rates else ""))
                    skipped = 0
                if done % cfg.eval_every == 0 and done != cfg.steps:
                    evaluating = True
                    val = validate()
                    metrics_log.write(step=done, val_loss=val["loss"], val_perplexity=val["perplexity"])
                    evaluating = False
                    log(f"eval   {done:>6} | val loss {val['loss']:.4f} | perplexity {val['perplexity']:.2f} | "
                        f"over {val_windows}")
                    note_no_learning(val["loss"], done)
                if done % config.checkpoint.every == 0 or done == cfg.steps:
                    with signals_held():  # an interrupt never cuts a save short while it is being started
                        save(done)
                        last_good = done
            val = validate()  # a stop asked for meanwhile waits for the summary (stop.check below)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated): keep the save in flight, add the steps since
        metrics_log.close()
        with signals_held(deliver=False):  # already stopping: more signals change nothing now
            done = save_on_interrupt(last_good, done)
            keep_latest_checkpoint(store, done, log)
        raise
    except BaseException:
        metrics_log.close()  # the curves up to the failure stay readable
        raise
    finally:
        if profiler:
            profiler.close()
        store.close()
    wall = time.perf_counter() - wall_start
    rates = speed.rates(cfg.steps) if start < cfg.steps else {}
    summary = {"step": cfg.steps, "final": True, "params": n_params, "wall_s": wall,
               "val_loss": val["loss"], "val_perplexity": val["perplexity"],
               "val_bits_per_char": val["bits_per_char"],
               **{k: v for k, v in rates.items() if k != "eta_s"}}
    if start < cfg.steps:  # a re-run of a finished run trained nothing: its record is already there
        metrics_log.write(**summary)
    metrics_log.close()
    if stop.signals:  # asked for during the final validation: the run is complete and its summary written
        log(f"interrupted after the final validation: the run is complete at step {cfg.steps}")
        stop.check()
    val_line = (f"val loss {val['loss']:.4f} | perplexity {val['perplexity']:.2f} | "
                + format_bits_per_char(val["bits_per_char"]) + f" | over {val_windows}")
    if start >= cfg.steps:  # a resume of a finished run: no training, no sample
        log(f"already trained to step {start}; nothing to do (train.steps = {cfg.steps}) | {val_line}")
        return summary
    resumed = f" (steps {start + 1}-{cfg.steps} in this session)" if start else ""
    log(f"done: {cfg.steps} steps{resumed} in {format_duration(wall)}"
        + (f" | {rates['tokens_per_s']:,.0f} tok/s" if rates else "") + f" | {val_line}")
    note_no_learning(val["loss"], cfg.steps)
    if cfg.sample_tokens and tokenizer.kind == "none":
        log("no sample: the run reads pre-tokenized ids without a tokenizer (set data.tokenizer to have text)")
    elif cfg.sample_tokens:
        log(f"sampling {cfg.sample_tokens} tokens from {cfg.sample_prompt!r} (train.sample_tokens) ...")
        text = sample_text(model, merge_variables(state.params, state.frozen), tokenizer, cfg.sample_prompt,
                           cfg.sample_tokens, seq_len, seed=cfg.seed, source="train.sample_prompt")
        log(f"sample:\n{cfg.sample_prompt}{text}")
        summary["sample"] = text
    return summary


def keep_latest_checkpoint(store: CheckpointStore, done: int, log) -> None:
    """After an interrupt at step `done`: wait for a checkpoint still being written to finish (bounded by the save
    itself: Orbax's writer threads would be joined at exit anyway; a SIGKILL meanwhile leaves the previous checkpoint
    and an unfinished folder that the next start removes), and say in one line which step is the latest checkpoint,
    the one the same command resumes from."""
    store.wait()
    latest = store.latest_step()
    log(f"interrupted after step {done}: " + (
        f"the latest checkpoint is step {latest} in {store.directory}; the same command resumes from it"
        if latest is not None else f"no checkpoint saved yet in {store.directory}; the same command starts over"))


def _silent(*args, **kwargs) -> None:
    """The log of processes other than process 0 in a multi-process run: they print nothing."""


def bundled_only_note(data) -> str | None:
    """A note when `data.val_plays` or `data.genres` differ from their defaults although `data.path` names the text:
    they choose plays of the bundled corpus, so they go unused (a config such as finetune_int4_lora sets them, and
    `--set data.path=...` over it trains on the whole of the user's text, split by data.val_fraction)."""
    default = type(data)()
    unused = [f"data.{key}" for key in ("val_plays", "genres")
              if data.path is not None and getattr(data, key) != getattr(default, key)]
    if not unused:
        return None
    verb = "choose plays of the bundled corpus, not used" if len(unused) > 1 else "chooses plays of the bundled " \
        "corpus, not used"
    return (f"note: {' and '.join(unused)} {verb} with data.path ({data.path}), whose last data.val_fraction="
            f"{data.val_fraction} is validation")


def warmup_note(cfg) -> str | None:
    """A note when `train.warmup_steps` is not below `train.steps`: the schedule (train.optim.learning_rate_schedule)
    then warms up over steps - 1 steps, so the peak learning rate comes at the last step and nothing decays."""
    if cfg.warmup_steps < cfg.steps:
        return None
    return (f"note: train.warmup_steps={cfg.warmup_steps} is not below train.steps={cfg.steps}: the learning rate "
            f"warms up over {cfg.steps - 1} step{'' if cfg.steps == 2 else 's'} instead and reaches its peak "
            f"{cfg.learning_rate:g} at the last step, with no decay; set train.warmup_steps below train.steps for a "
            f"schedule that decays")


def bpe_size_note(config: Config, tokenizer) -> str | None:
    """A note when a BPE tokenizer trained here learned fewer tokens than `data.vocab_size` asked for (a corpus with
    no more pairs to merge): the model keeps the asked size (it is fixed before the corpus is read), so the rest of
    its embedding and LM head rows are never used, and its first losses are those of the larger vocabulary."""
    if tokenizer.kind != "bpe" or config.data.tokenizer != "bpe" or tokenizer.vocab_size >= config.data.vocab_size:
        return None
    unused = config.model.vocab_size - tokenizer.vocab_size
    return (f"note: the BPE tokenizer learned {tokenizer.vocab_size:,} tokens, fewer than data.vocab_size="
            f"{config.data.vocab_size:,} (this text has no more pairs to merge); model.vocab_size "
            f"{config.model.vocab_size:,} leaves {unused:,} embedding and LM-head rows unused: set data.vocab_size="
            f"{tokenizer.vocab_size} in a new --workdir to drop them")


# The config keys a resume must keep as they were, besides the model, quant and tokenizer (`check_resumable`,
# `check_same_tokenizer`) and the learning-rate schedule (`check_schedule`, which train.extend opens): the data keys
# decide which text is training and which validation text (a change could train on held-out text), and the batch
# keys which windows each step reads (a change breaks the exact continuation). Every other key may change on
# resume: logging, evaluation and checkpoint cadence, tensorboard, sampling, data.cache_dir (derived data), the
# mesh, train.precision and the optimizer's other settings.
RESUME_FIXED = ("data.path", "data.val_plays", "data.genres", "data.val_fraction",
                "train.seed", "train.batch_size", "train.grad_accum")


def same_file(key: str, saved, now) -> bool:
    """True when `key` is data.path and both values name the same existing file or folder, however written
    (relative or absolute, through a link); the text in it is compared by its split sizes and CRC-32s."""
    if key != "data.path" or not isinstance(saved, str) or not isinstance(now, str):
        return False
    if os.path.abspath(os.path.expanduser(saved)) == now:  # a relative path (a glob too) recorded before
        return True  # train.config.load_config made data.path absolute, read from here as it was then
    return same_folder(saved, now)


def check_same_data(store: CheckpointStore, config: Config, splits) -> None:
    """A run resumes only with the data split and batches its checkpoints were trained with: UserError naming each
    changed `RESUME_FIXED` key (old -> new), or the split sizes or CRC-32s when the text at the same data.path
    changed."""
    latest = store.latest_step()
    if latest is None:
        return
    metadata = store.metadata(latest)
    saved = config_from_metadata(metadata, store.directory).to_dict()
    now = config.to_dict()
    value = lambda values, key: values[key.split(".")[0]][key.split(".")[1]]
    changes = [f"{key} {value(saved, key)!r} -> {value(now, key)!r}" for key in RESUME_FIXED
               if value(saved, key) != value(now, key) and not same_file(key, value(saved, key), value(now, key))]
    recorded = metadata.get("data") or {}
    if not changes:
        changes = [f"{key} {recorded[key]} -> {splits.description.get(key)}" for key in ("train_tokens", "val_tokens")
                   if key in recorded and recorded[key] != splits.description.get(key)]
    now_crc = splits.description.get("crc32") or {}
    if not changes:  # the same split sizes: an edit that kept the length shows in the token files' CRC-32
        changes = [f"{name} CRC-32 {recorded['crc32'][name]} -> {now_crc[name]}" for name in ("train.bin", "val.bin")
                   if name in (recorded.get("crc32") or {}) and name in now_crc
                   and int(recorded["crc32"][name]) != int(now_crc[name])]
    if changes:
        raise UserError(f"{store.directory} was trained to step {latest} with other data or batches "
                        f"({'; '.join(changes)}); resuming would change which text trains or which windows each step "
                        f"reads: use the same settings, or another --workdir (train.init_from starts a new run from "
                        f"its weights)")


def check_same_tokenizer(store: CheckpointStore, tokenizer) -> None:
    """A run resumes only with the tokenizer its checkpoints were trained with."""
    latest = store.latest_step()
    if latest is None:
        return
    recorded = store.metadata(latest).get("tokenizer") or {"kind": "byte", "vocab_size": 256}
    if recorded != tokenizer.describe():
        raise UserError(f"{store.directory} holds a run trained with another tokenizer ({recorded.get('kind')}, "
                        f"{recorded.get('vocab_size')} ids) than data.* now gives ({tokenizer.kind}, "
                        f"{tokenizer.vocab_size} ids); use another --workdir or the same data settings")


def sample_text(model, variables, tokenizer, prompt: str, max_new_tokens: int, seq_len: int, seed: int = 0,
                temperature: float = 0.8, top_k: int | None = 40, batch: int = 1,
                source: str = "--prompt", kv_bits: int | None = None,
                progress: Callable[[int], None] | None = None, chunks: list | None = None) -> str | list[str]:
    """`batch` continuations of `prompt` (encoded by the run's `tokenizer` with its special tokens, e.g. a BOS;
    the last `seq_len` ids kept; a newline when empty), decoded without the prompt, sampled with a KV cache of
    `kv_bits` (None: the compute dtype; 8: int8) a chunk of decode steps at a time (slm_jax.sampling.generate_chunks:
    a Ctrl-C stops it between chunks); `progress(tokens so far per sequence)` after each chunk; each chunk's ids
    ([batch, n] int32) are appended to `chunks` when given, so a caller stopped by Ctrl-C still has them. Raises
    UserError naming `source` when the tokenizer cannot encode the prompt."""
    ids = tokenizer.encode(prompt, add_special_tokens=True, source=source)[-seq_len:]
    if len(ids) == 0:
        ids = tokenizer.encode("\n", source=source)
    if len(ids) == 0:
        raise UserError(f"{source}: {prompt!r} encodes to no tokens; give a prompt with text")
    prompt_ids = jnp.asarray(np.tile(ids.astype(np.int32), (batch, 1)))
    chunks, done = [] if chunks is None else chunks, 0
    for chunk in generate_chunks(model, variables, prompt_ids, jax.random.PRNGKey(seed), max_new_tokens, temperature,
                                 top_k, kv_bits):
        chunks.append(chunk)
        done += chunk.shape[1]
        if progress is not None:
            progress(done)
    texts = [tokenizer.decode(row) for row in np.concatenate(chunks, axis=1)]
    return texts[0] if batch == 1 else texts
