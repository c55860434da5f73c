"""The bos/eos/pad token ids a run's exports write (Hugging Face config.json and generation_config.json, GGUF's
tokenizer.ggml.*), from one source for both, and the note either export gives when the run has no end-of-text id.
"""
from __future__ import annotations

from pathlib import Path

from checkpoints.gguf_vocab import affix_ids
from train.run import imported_token_ids


def first_id(value) -> int | None:
    """A config.json token id as one int: the int, a list's first (eos_token_id may list several), else None."""
    value = (value[0] if value else None) if isinstance(value, list) else value
    return value if isinstance(value, int) else None


def export_token_ids(workdir: Path, metadata: dict | None, tokenizer) -> dict:
    """{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}, the keys known, for the run in `workdir`:
    an imported model's own ids (its config.json's, up the run's lineage: `train.run.imported_token_ids`) as they
    are, and for a bos or eos they do not name, the one token the run's `tokenizer` puts before or after a text it
    encodes with its special tokens (`checkpoints.gguf_vocab.affix_ids`). The byte tokenizer and a BPE trained here
    add none, so their runs get no ids."""
    ids = imported_token_ids(workdir, metadata)
    prefix, suffix = affix_ids(tokenizer) or ([], [])
    for key, side in (("bos_token_id", prefix), ("eos_token_id", suffix)):
        if len(side) == 1 and first_id(ids.get(key)) is None:
            ids[key] = side[0]
    return ids


def eos_note(workdir: Path, kind: str, token_ids: dict, consequence: str) -> str | None:
    """A note when `token_ids` (`export_token_ids`) has no eos_token_id: neither the tokenizer (of `kind`) adds an
    end token after a text nor an imported model up the run's lineage names one; `consequence` says what the export
    then holds and what its reader does. The byte tokenizer has none to give (its 256 ids are the bytes and training
    text is joined by newlines, with no end marker), nor has a BPE trained here (no special tokens), so none is
    invented."""
    if first_id(token_ids.get("eos_token_id")) is not None:
        return None
    why = ("its 256 ids are the bytes, and its training text has no end marker" if kind == "byte" else
           "it adds none after a text, and no imported model in the run's lineage names one")
    return f"note: the tokenizer of {workdir} has no end-of-text token ({why}), so {consequence}"
