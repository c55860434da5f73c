"""Faults a new-user tryout of training on one's own data, resuming, evaluation, QAT and LoRA configs, inspect, the
micro bench and the launcher found: each gives one `error:` line and exit 2 before any work, or the right number."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.manager import CheckpointStore
from slm_jax import ModelConfig, Transformer
from slm_jax.errors import UserError
from train import main as train_main
from train.bench.floor import matmul_flops, step_matmuls
from train.bench.speed import flops_per_token, matmul_params
from train.build import build_model, state_initializer
from tests.test_lora import INT4, save_serving_base
from train.config import load_config
from train.evaluation import evaluate_workdir, format_table
from train.loop import run_training, same_file
from train.memory_check import attention_bytes, physical_memory, training_bytes


def test_attention_bound_is_below_what_xla_allocates_for_a_training_step():
    """The attention term of the memory bound is a lower bound: XLA's own compiled memory analysis of a forward and
    backward pass, with attention dominating (long window, tiny width), needs more than it."""
    cfg = ModelConfig(vocab_size=16, seq_len=512, n_layers=1, n_heads=2, d_model=8)
    model = Transformer(cfg)
    tokens = jnp.zeros((2, cfg.seq_len), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)

    def loss(p):
        return jnp.mean(model.apply(p, tokens)[0] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    held = compiled.memory_analysis().temp_size_in_bytes
    assert attention_bytes(cfg, 2, 512, 512) == 2 * 2 * 2 * 512 * 512
    assert held >= attention_bytes(cfg, 2, 512, 512), held


def test_train_main_refuses_a_window_whose_attention_cannot_fit(tmp_path, capsys):
    """`model.seq_len=100000` passes every range check, but its attention scores need terabytes: refused in one line
    (it used to end in an XLA RESOURCE_EXHAUSTED traceback after building the token cache and compiling)."""
    with pytest.raises(SystemExit) as exited:
        train_main.main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--set", "model.seq_len=100000"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: training this model (model.d_model 32, model.n_layers 2, model.seq_len 100000) at "
                          "train.batch_size 8 needs at least"), err
    cfg = ModelConfig(vocab_size=256, seq_len=100000, n_layers=2, n_heads=2, d_model=32, tie_embeddings=False)
    assert f"{training_bytes(cfg, 8) / 1e9:,.1f} GB" in err and training_bytes(cfg, 8) > physical_memory()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, said", [
    ("inherit: tiny\ntrain:\n  # steps: 100\n", "section train is empty; give its keys or remove it"),
    ("inherit: tiny\ntrain: 5\n", "section train must be a mapping of its keys, got 5; give its keys or remove it")])
def test_a_config_section_that_is_no_mapping_is_refused_even_under_a_set(tmp_path, text, said):
    """`train:` with every key commented out (or `train: 5`) replaced tiny's whole train section; a `--set
    train.steps=3` then rebuilt it from the defaults (batch 16, 20 eval batches, 200 sample tokens), silently."""
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    for overrides in ([], ["train.steps=3"]):
        with pytest.raises(UserError) as err:
            load_config(str(path), overrides)
        assert str(err.value) == f"config {path}: {said}"
    with pytest.raises(UserError) as err:
        load_config("tiny", ["train=5", "train.steps=3"])
    assert str(err.value) == ("--set train=5: section train must be a mapping of its keys, got 5; set one key with "
                              "--set train.KEY=VALUE")
    assert load_config("tiny", ["train.steps=3"]).train.batch_size == 8  # a key still merges into the section


def test_inherit_names_a_yaml_file_next_to_the_config(tmp_path, monkeypatch):
    """`inherit: base.yaml` and `inherit: ../base.yaml` are read next to the inheriting file, as `inherit: base`
    was; they were looked up from the current folder instead ('config file base.yaml does not exist')."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("inherit: tiny\ntrain:\n  steps: 7\n  batch_size: 4\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\ntrain:\n  steps: 9\n")
    (tmp_path / "sub" / "child.yaml").write_text("inherit: ../base.yaml\ntrain:\n  steps: 11\n")
    (tmp_path / "sub" / "missing.yaml").write_text("inherit: nosuch.yaml\n")
    monkeypatch.chdir(tmp_path / "sub")  # neither base.yaml nor ../ from here is the file's own folder's
    for child, steps in ((tmp_path / "child.yaml", 9), (tmp_path / "sub" / "child.yaml", 11)):
        config = load_config(str(child))
        assert (config.train.steps, config.train.batch_size, config.model.d_model) == (steps, 4, 32)
    with pytest.raises(UserError) as err:
        load_config(str(tmp_path / "sub" / "missing.yaml"))
    assert str(err.value) == (f"inherit: in {tmp_path / 'sub' / 'missing.yaml'}: config file nosuch.yaml does not "
                              f"exist (looked for {tmp_path / 'sub' / 'nosuch.yaml'})")


@pytest.mark.parametrize("changed, said", [
    ("finetune.lora_alpha=32", "finetune.lora_alpha: 16.0 -> 32.0"),
    ("finetune.lora_dropout=0.2", "finetune.lora_dropout: 0.0 -> 0.2"),
    ("finetune.lora_rank=2", "finetune.lora_rank: 4 -> 2"),
    ("finetune.lora_targets=attn/q", "finetune.lora_targets: 'attn/(q|v)' -> 'attn/q'")])
def test_a_lora_run_resumes_only_with_its_own_adapter_settings(tmp_path, corpus_file, changed, said):
    """A new lora_alpha (or dropout) on resume went through without a word, rescaling the trained adapters
    (alpha / rank) mid-run; a new rank or target set failed on the restored state's shapes. Each is now refused
    naming the key, and nothing is trained or saved; the same settings resume (here: extended by one step)."""
    sets = [f"data.path={corpus_file}", f"data.cache_dir={tmp_path / 'cache'}", "model.n_layers=1",
            "train.sample_tokens=0", "train.eval_every=1000", "train.eval_batches=1"]
    save_serving_base(tmp_path / "base", load_config("tiny", sets), INT4)
    lora = [*sets, "finetune.method=lora", f"finetune.base={tmp_path / 'base'}", "finetune.lora_rank=4",
            "finetune.lora_targets=attn/(q|v)", "train.steps=2", "checkpoint.every=2"]
    run_training(load_config("tiny", lora), tmp_path / "lora", log=lambda *_: None)
    extended = [*lora, "train.steps=3", "train.extend=true"]
    with pytest.raises(UserError) as err:
        run_training(load_config("tiny", [*extended, changed]), tmp_path / "lora", log=lambda *_: None)
    assert f"holds a run with a different finetune config ({said})" in str(err.value), err.value
    assert CheckpointStore(tmp_path / "lora" / "checkpoints").steps() == [2]
    run_training(load_config("tiny", extended), tmp_path / "lora", log=lambda *_: None)
    assert CheckpointStore(tmp_path / "lora" / "checkpoints").steps() == [2, 3]


def test_a_bpe_that_learns_fewer_tokens_than_asked_is_noted_with_the_unused_rows(tmp_path, corpus_file):
    """`data.tokenizer=bpe data.vocab_size=2000` on a text with few distinct words learns a few hundred tokens; the
    model keeps 2000 rows (its size is fixed before the corpus is read), which went unsaid."""
    sets = [f"data.path={corpus_file}", f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer=bpe",
            "data.vocab_size=2000", "train.steps=1", "train.sample_tokens=0", "train.eval_batches=1"]
    printed = []
    run_training(load_config("tiny", sets), tmp_path / "run", log=printed.append)
    learned = len(json.loads((tmp_path / "run" / "tokenizer.json").read_text())["model"]["vocab"])
    assert 256 < learned < 2000
    notes = [line for line in map(str, printed) if line.startswith("note: the BPE tokenizer")]
    assert notes == [f"note: the BPE tokenizer learned {learned:,} tokens, fewer than data.vocab_size=2,000 (this text "
                     f"has no more pairs to merge); model.vocab_size 2,000 leaves {2000 - learned:,} embedding and "
                     f"LM-head rows unused: set data.vocab_size={learned} in a new --workdir to drop them"], printed
    printed.clear()
    run_training(load_config("tiny", [*sets, f"data.vocab_size={learned}"]), tmp_path / "exact",
                 log=printed.append)
    assert not any(str(line).startswith("note: the BPE") for line in printed)


@pytest.mark.parametrize("tied", [True, False])
def test_the_bench_flops_count_the_lm_head_matmul_of_a_tied_model(tied):
    """The bench's model FLOPs (6N + attention) left a tied LM head out of N (its weight is the embedding table, no
    `kernel` leaf), though the logits are a [tokens, d] x [d, vocab] matmul all the same: SmolLM2-135M's MFU rows
    counted 106M of its 134M matmul weights. Reference: the matmul floor's own list of the step's matmul shapes."""
    config = load_config("baseline", ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=32",
                                      "train.batch_size=3", f"model.tie_embeddings={str(tied).lower()}",
                                      "quant.embed_bits=null"])
    state = jax.eval_shape(state_initializer(config, build_model(config)))
    n_matmul = matmul_params(state.params, config.model)
    tokens = config.train.batch_size * config.model.seq_len
    assert flops_per_token(config, n_matmul) * tokens == matmul_flops(step_matmuls(config.model, 3))
    assert n_matmul == 2 * config.model.layer_matmul_params + config.model.vocab_size * 64


def test_a_warmup_not_below_the_steps_is_noted_with_the_schedule_it_gives(tmp_path, corpus_file):
    """`--config finetune_int8_qat --set train.steps=14` keeps its warmup_steps 30: the schedule clamps the warmup to
    13 steps, so the run ends at the peak learning rate and never decays, which went unsaid."""
    sets = [f"data.path={corpus_file}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=4", "train.log_every=1",
            "train.warmup_steps=30", "train.sample_tokens=0", "train.eval_batches=1", "train.learning_rate=1e-3"]
    printed = []
    run_training(load_config("tiny", sets), tmp_path / "run", log=printed.append)
    notes = [line for line in map(str, printed) if line.startswith("note: train.warmup_steps")]
    assert notes == ["note: train.warmup_steps=30 is not below train.steps=4: the learning rate warms up over 3 steps "
                     "instead and reaches its peak 0.001 at the last step, with no decay; set train.warmup_steps below "
                     "train.steps for a schedule that decays"], printed
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(line)]
    assert lrs == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])  # what the note says: linear warmup to the end
    printed.clear()
    run_training(load_config("tiny", [*sets, "train.warmup_steps=3"]), tmp_path / "decays", log=printed.append)
    assert not any(str(line).startswith("note: train.warmup") for line in printed)


def test_val_fraction_on_the_bundled_corpus_is_refused_not_ignored(tmp_path, corpus_file):
    """The bundled plays are split by play (data.val_plays); `--set data.val_fraction=0.5` trained on the same split
    as 0.1 without a word. Own text still takes it."""
    with pytest.raises(UserError) as err:
        load_config("tiny", ["data.val_fraction=0.5"])
    assert str(err.value) == ("data.val_fraction=0.5 splits your own text (data.path); the bundled corpus is split by "
                              "play: choose the held-out plays with data.val_plays")
    assert load_config("tiny", [f"data.path={corpus_file}", "data.val_fraction=0.5"]).data.val_fraction == 0.5
    assert load_config("tiny").data.val_fraction == 0.1


def test_a_relative_data_path_is_recorded_absolute_so_later_commands_run_from_anywhere(tmp_path, monkeypatch,
                                                                                        corpus_file):
    """`--set data.path=my.txt` was recorded as given, so `train.evaluate` (or a calibrated convert) of the run from
    another folder failed with 'data.path: my.txt does not exist'. Resuming with the relative path still works."""
    monkeypatch.chdir(corpus_file.parent)
    sets = [f"data.path={corpus_file.name}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2",
            "train.sample_tokens=0", "train.eval_batches=1", "checkpoint.every=2"]
    config = load_config("tiny", sets)
    assert config.data.path == str(corpus_file)
    run_training(config, tmp_path / "run", log=lambda *_: None)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = evaluate_workdir(tmp_path / "run", batches=1, batch_size=2)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    monkeypatch.chdir(corpus_file.parent)
    run_training(load_config("tiny", [*sets, "train.steps=3", "train.extend=true"]), tmp_path / "run",
                 log=lambda *_: None)
    assert same_file("data.path", "texts/*.txt", str(corpus_file.parent / "texts" / "*.txt"))  # an older record


def test_evaluate_notes_a_run_whose_text_changed_since_it_was_trained(tmp_path):
    """Text appended to a run's data.path moves its validation cut: `train.evaluate` then measured the run on text it
    may have trained on (here: a copy of its own first lines), without a word. The counts in the note are the token
    files' own (byte tokens: one per character), and the CRC-32s those the checkpoint recorded."""
    corpus = tmp_path / "mine.txt"
    original = "".join(f"SPEAKER{i % 7}:\nThe quick brown fox {i} jumps over the lazy dog.\n\n" for i in range(600))
    corpus.write_text(original)
    sets = [f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.sample_tokens=0",
            "train.eval_batches=1", "checkpoint.every=2"]
    run_training(load_config("tiny", sets), tmp_path / "run", log=lambda *_: None)
    assert "text_changed" not in evaluate_workdir(tmp_path / "run", batches=1, batch_size=2)
    corpus.write_text(original + "\n" + original[:20000])
    row = evaluate_workdir(tmp_path / "run", batches=1, batch_size=2)
    cut_before, cut_now = int(len(original) * 0.9), int((len(original) + 20001) * 0.9)
    assert row["text_changed"].startswith(f"train_tokens {cut_before:,} -> {cut_now:,}; val_tokens "
                                          f"{len(original) - cut_before:,} -> {len(original) + 20001 - cut_now:,}; "
                                          f"train.bin CRC-32 "), row["text_changed"]
    assert (f"note: the text of {tmp_path / 'run'} changed since it was trained ({row['text_changed']}): its "
            "validation split is not the text held out in training") in format_table([row])


def test_bundled_corpus_settings_beside_a_data_path_are_noted_as_unused(tmp_path, corpus_file):
    """`--config finetune_int4_lora --set data.path=my.txt` keeps that config's data.genres and data.val_plays, which
    only choose bundled plays: the run trained on all of the user's text without saying they were unused."""
    sets = [f"data.path={corpus_file}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=1",
            "train.sample_tokens=0", "train.eval_batches=1", "train.warmup_steps=0"]
    for extra, said in ((["data.genres=[comedies]", "data.val_plays=[twelfth-night]"],
                         "data.val_plays and data.genres choose plays of the bundled corpus, not used"),
                        (["data.genres=[comedies]"], "data.genres chooses plays of the bundled corpus, not used"),
                        ([], None)):
        printed = []
        run_training(load_config("tiny", [*sets, *extra]), tmp_path / f"run{len(extra)}", log=printed.append)
        notes = [line for line in map(str, printed) if line.startswith("note: data.")]
        assert notes == ([f"note: {said} with data.path ({corpus_file}), whose last data.val_fraction=0.1 is "
                          f"validation"] if said else []), printed
