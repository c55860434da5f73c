"""Faults a README tryout and a look at the exports found: the Hugging Face export takes its bos/eos ids from the
same source as the GGUF export (`train.token_ids`) and says when it has no end-of-text id; validation over two CPU
devices no longer dispatches all its steps at once; a run started from another splits the CPU host as any."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, processors

from checkpoints.hf_export import export_run
from checkpoints.hf_import import import_folder
from checkpoints.manager import CheckpointStore, peek_metadata, with_metadata_checksum
from train.config import load_config
from train.evaluation import IN_FLIGHT, mean_loss
from train.run import model_source, peeked_metadata
from train.token_ids import export_token_ids
from train.tokenizer import HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
HF_FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "gqa_tied"


def with_template(single: str) -> Tokenizer:
    """The Hugging Face fixture's byte-level BPE with a TemplateProcessing `single` adding ids 298 (<s>) and 299
    (</s>) of its vocabulary, so the model's 300 rows still hold every id."""
    tokenizer = Tokenizer.from_file(str(HF_FIXTURE / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 298),
                                                                                            ("</s>", 299)])
    return tokenizer


def exported(folder: Path) -> tuple[dict, dict]:
    return (json.loads((folder / "config.json").read_text()),
            json.loads((folder / "generation_config.json").read_text()))


def notes(printed: list) -> list:
    return [line for line in printed if line.startswith("note:")]


@pytest.mark.parametrize("single", ["$A </s>", "<s> $A </s>"])
def test_hf_export_takes_bos_and_eos_from_the_tokenizer_as_the_gguf_export_does(tmp_path, single):
    """A run whose tokenizer.json appends </s> (TemplateProcessing) and whose lineage names no eos exported no
    eos_token_id to Hugging Face, where the GGUF export wrote that token as its eos, so transformers' generate never
    stopped at it. Both exports now read train.token_ids.export_token_ids."""
    shutil.copytree(HF_FIXTURE, tmp_path / "src")
    with_template(single).save(str(tmp_path / "src" / "tokenizer.json"))
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "bos_token_id": None, "eos_token_id": None}))
    import_folder(tmp_path / "src", tmp_path / "run", log=lambda _: None)
    printed = []
    export_run(tmp_path / "run", tmp_path / "hf", "f32", log=printed.append)
    config, generation = exported(tmp_path / "hf")
    want = {"eos_token_id": 299, **({"bos_token_id": 298} if single.startswith("<s>") else {})}
    assert generation == want and {key: config.get(key) for key in want} == want and not notes(printed)


def test_hf_export_of_a_byte_run_notes_that_it_has_no_end_of_text_token(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "v2_tiny", run)
    printed = []
    export_run(run, tmp_path / "hf", "f32", log=printed.append)
    config, generation = exported(tmp_path / "hf")
    assert "eos_token_id" not in config and generation == {}
    assert notes(printed) == [
        f"note: the tokenizer of {run} has no end-of-text token (its 256 ids are the bytes, and its training text "
        f"has no end marker), so config.json and generation_config.json hold no eos_token_id; transformers' "
        f"generate then never stops early: it generates until max_new_tokens (else max_length, 20 tokens with the "
        f"prompt by default)"]


def test_an_imported_models_own_ids_win_over_its_tokenizers_and_pass_through_unchanged(tmp_path):
    import_folder(HF_FIXTURE, tmp_path / "a", log=lambda _: None)
    printed = []
    export_run(tmp_path / "a", tmp_path / "hf", "f32", log=printed.append)
    config, generation = exported(tmp_path / "hf")
    assert generation == {"bos_token_id": 1, "eos_token_id": 2} and config["eos_token_id"] == 2
    assert not notes(printed)
    appends = HFTokenizer(with_template("<s> $A </s>").to_str())
    metadata = {"imported_from": {"bos_token_id": 1, "eos_token_id": [2, 7]}}
    assert export_token_ids(tmp_path / "a", metadata, appends) == {"bos_token_id": 1, "eos_token_id": [2, 7]}
    none = {"imported_from": {"bos_token_id": 1}}
    assert export_token_ids(tmp_path / "a", none, appends) == {"bos_token_id": 1, "eos_token_id": 299}


def test_validation_waits_for_its_steps_rather_than_dispatching_them_all_at_once(monkeypatch):
    """`python -m train.main --config baseline --set train.batch_size=4 --set train.grad_accum=4` (README) dispatched
    its 80 validation steps at once; over two CPU devices XLA's in-process all-reduce deadlocked and aborted the run
    after 40 s at its first validation (reproduced every time, 77 s; `tiny` with 80 batches did not). Now at most
    IN_FLIGHT steps run ahead of the one waited for, whatever the count."""
    dispatched, done = [], set()

    def eval_step(params, frozen, inputs, targets):
        assert len(dispatched) - len(done) <= IN_FLIGHT, (len(dispatched), sorted(done))
        dispatched.append(inputs.shape)
        return np.float32(len(dispatched))

    monkeypatch.setattr(jax, "block_until_ready", lambda loss: done.update(range(int(loss))) or loss)
    tokens = np.arange(2000, dtype=np.uint16) % 50
    assert mean_loss(eval_step, {}, {}, tokens, 2, 8, 20) == pytest.approx(10.5)
    assert dispatched == [(2, 8)] * 20


def test_the_model_a_run_starts_from_is_read_without_starting_jax(tmp_path, monkeypatch):
    """`python -m train.main --config int8_qat --set train.init_from=runs/baseline` (README) trained a `baseline`
    model on one CPU device of two: reading init_from's shape through Orbax, whose CheckpointManager asks JAX for
    the process index, started JAX's backend before train.main split the host, and the split silently did nothing
    (also for LoRA over a serving run). train.main now reads it as plain JSON first (peek_metadata), as migrated and
    CRC-checked as Orbax's read."""
    for version in ("v1_tiny", "v2_tiny"):
        store = CheckpointStore(ROOT / "tests" / "fixtures" / version / "checkpoints", create=False)
        try:
            assert peek_metadata(ROOT / "tests" / "fixtures" / version / "checkpoints") == store.metadata()
        finally:
            store.close()
    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "v2_tiny", run)
    config = load_config("int8_qat", [f"train.init_from={run}"])
    for name in ("process_index", "default_backend", "devices"):
        monkeypatch.setattr(jax, name, lambda *_, name=name: pytest.fail(f"jax.{name} called"))
    source = model_source(config, metadata_of=peeked_metadata)
    assert source.config.model.d_model == 16 and source.config.model.seq_len == config.model.seq_len
    with pytest.raises(BaseException, match="jax.(process_index|default_backend) called"):
        model_source(config)
    step = max(run.glob("checkpoints/[0-9]*"), key=lambda path: int(path.name))
    saved = with_metadata_checksum(json.loads((step / "metadata" / "metadata").read_text()))
    (step / "metadata" / "metadata").write_text(json.dumps(saved))
    assert peek_metadata(run / "checkpoints")["metadata_crc32"] == saved["metadata_crc32"]
    (step / "metadata" / "metadata").write_text(json.dumps({**saved, "step": saved["step"] + 1}))  # edited by hand
    assert peek_metadata(run / "checkpoints") is None and model_source(config, metadata_of=peeked_metadata) is None
