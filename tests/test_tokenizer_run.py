"""A run keeps its own tokenizer: train `tiny` with a BPE, move the folder, generate and evaluate from it; a prompt
its tokenizer cannot encode is one line and exit 2."""
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from slm_jax.errors import UserError
from train import evaluate, generate
from train.config import load_config
from train.loop import run_training
from train.metrics import read_metrics


def tiny(corpus_file, *overrides):
    return load_config("tiny", [f"data.path={corpus_file}", "train.steps=10", "train.eval_every=10",
                                "checkpoint.every=10", "train.sample_tokens=0", *overrides])


def test_bpe_run_trains_moves_and_generates(tmp_path, corpus_file, capsys):
    config = tiny(corpus_file, "data.tokenizer=bpe", "data.vocab_size=512")
    assert config.model.vocab_size == 512
    summary = run_training(config, tmp_path / "run", log=lambda *_: None)
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    final = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert final["val_bits_per_char"] < final["val_loss"] / 0.693  # BPE tokens hold more than one character
    shutil.move(tmp_path / "run", tmp_path / "moved")  # the run alone: no corpus path or cache needed to read text
    generate.main(["--workdir", str(tmp_path / "moved"), "--prompt", "SPEAKER3:", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("SPEAKER3:")
    row = evaluate.evaluate_workdir(tmp_path / "moved", batches=2, batch_size=4)
    assert row["loss"] == pytest.approx(final["val_loss"], rel=0.2)


def test_a_prompt_the_run_tokenizer_cannot_encode_exits_2(tmp_path, capsys):
    corpus = tmp_path / "words.txt"  # whole lines, so that the 50% cut falls between words
    corpus.write_text("".join(f"SPEAKER{i % 7}:\nThe quick brown fox jumps over the lazy dog.\n\n" for i in range(800)))
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))  # no byte fallback: unseen words are unknown
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train([str(corpus)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    words.save(str(tmp_path / "tokenizer.json"))
    settings = (f"data.tokenizer={tmp_path / 'tokenizer.json'}", "data.val_fraction=0.5")
    config = tiny(corpus, *settings)
    assert config.model.vocab_size == words.get_vocab_size()
    with pytest.raises(UserError, match="^train.sample_prompt: the tokenizer cannot encode 'ROMEO'"):  # before training
        run_training(tiny(corpus, *settings, "train.sample_tokens=8"), tmp_path / "refused", log=lambda *_: None)
    run_training(config, tmp_path / "run", log=lambda *_: None)
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--workdir", str(tmp_path / "run"), "--prompt", "SPEAKER3: Ærø"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --prompt: the tokenizer cannot encode 'Ærø' (characters 10-13)")
