"""Tokenizers as llama.cpp's byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`), so that llama.cpp turns text
into the same ids as slm-jax: the byte tokenizer as the 256 GPT-2 byte symbols, a BPE `tokenizer.json` as its own
vocabulary and merges.
"""
from __future__ import annotations

import dataclasses

from gguf import TokenType

from slm_jax.errors import UserError


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (Radford et al. 2019, `bytes_to_unicode`): bytes that are
    printable Latin-1 characters other than the space stand for themselves; the other 68 take the code points
    256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


@dataclasses.dataclass(frozen=True)
class Vocab:
    """What GGUF's `tokenizer.ggml.*` keys hold: token strings by id, their TokenType, merges ("a b", by rank),
    llama.cpp's name for the pre-tokenizer (how text is split before merging) and the ids the tokenizer puts before
    (`bos`) and after (`eos`) a text it encodes with its special tokens, None where it adds none (`special_affixes`:
    `tokenizer.ggml.add_bos_token` / `add_eos_token`)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None = None
    eos: int | None = None


def byte_vocab() -> Vocab:
    """The byte tokenizer (id = byte value). llama.cpp refuses a byte-level BPE vocabulary without merges, so it
    gets one that never applies in text: two NUL bytes, whose merged symbol is not a token (were it ever to apply,
    llama.cpp would fall back to the bytes of the unknown symbol)."""
    symbols = byte_symbols()
    return Vocab(symbols, [TokenType.NORMAL] * 256, [f"{symbols[0]} {symbols[0]}"], "gpt-2")


def bpe_vocab(tokenizer_json: dict) -> Vocab:
    """A Hugging Face `tokenizer.json` of a byte-level BPE model (`model.type` BPE over GPT-2 byte symbols, with a
    ByteLevel pre-tokenizer, as GPT-2 or SmolLM2 split text: `llama_cpp_pre`) as a Vocab. Its added tokens keep
    their ids, in the model's vocabulary or after it, with their text as it is: special ones as CONTROL tokens,
    the others USER_DEFINED (as llama.cpp's convert_hf_to_gguf writes them), so llama.cpp matches them in text and
    decodes them as the run does. UserError for another kind of tokenizer, which llama.cpp's gpt2 vocabulary
    cannot reproduce."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer.json holds a {model.get('type')!r} model; GGUF export needs byte-level BPE")
    pre = llama_cpp_pre(tokenizer_json)
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    added = {}  # id -> TokenType of the added tokens, which need not be in the model's vocabulary (ids after it)
    for token in tokenizer_json.get("added_tokens", []):
        by_id[token["id"]] = token["content"]
        added[token["id"]] = TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError("tokenizer.json vocabulary ids (its model's and its added tokens') must be 0..n-1 without "
                        "gaps")
    tokens = [by_id[token_id] for token_id in range(len(by_id))]
    types = [added.get(token_id, TokenType.NORMAL) for token_id in range(len(by_id))]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return Vocab(tokens, types, merges or byte_vocab().merges, pre)


DIGITS = {"type": "Digits", "individual_digits": True}  # each digit its own piece (SmolLM's tokenizers)


def llama_cpp_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how a byte-level BPE tokenizer.json splits text before merging:
    "gpt-2" for a lone ByteLevel pre-tokenizer with GPT-2's regex; "smollm" for SmolLM/SmolLM2's Sequence of
    Digits(individual_digits) then that ByteLevel (llama.cpp's SMOLLM pre-tokenizer: every \\p{N} alone, then
    GPT-2's regex). Either with no prefix space and no normalizer. UserError for any other split, which llama.cpp
    would reproduce differently."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    digits = [{key: step.get(key) for key in DIGITS} for step in steps[:-1]]
    last = steps[-1] if steps else {}
    gpt2 = last.get("type") == "ByteLevel" and last.get("use_regex", True) and not last.get("add_prefix_space")
    if gpt2 and not tokenizer_json.get("normalizer") and digits in ([], [DIGITS]):
        return "smollm" if digits else "gpt-2"
    raise UserError("tokenizer.json must split text as GPT-2 does (a lone ByteLevel pre-tokenizer with its regex, "
                    "no prefix space, no normalizer) or as SmolLM2 does (Digits with individual_digits, then that "
                    "ByteLevel); llama.cpp would split it differently")


AFFIX_PROBE = "a b"  # any text its tokenizer encodes: what encoding it with special tokens adds around it


def affix_ids(tokenizer) -> tuple[list[int], list[int]] | None:
    """(prefix, suffix): the ids `tokenizer` (a `train.tokenizer` tokenizer) puts before and after a text when it
    encodes it with its special tokens, as `train.generate` encodes a prompt (a tokenizer.json post-processor such
    as TemplateProcessing "<s> $A </s>"); ([], []) where it adds none, None where the text's own ids are not found
    inside (a post-processor that changes them). The one source of the bos/eos an export takes from a tokenizer."""
    if tokenizer.kind == "none":  # pre-tokenized ids: no text goes in
        return [], []
    plain = [int(i) for i in tokenizer.encode(AFFIX_PROBE)]
    full = [int(i) for i in tokenizer.encode(AFFIX_PROBE, add_special_tokens=True)]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    return None if start is None else (full[:start], full[start + len(plain):])


def special_affixes(tokenizer) -> dict[str, int | None]:
    """{"bos": id or None, "eos": id or None}: the token `tokenizer` puts before and after a text (`affix_ids`),
    which llama.cpp adds when the file says add_bos_token / add_eos_token. UserError for more than one token on a
    side, which those keys cannot express."""
    affixes = affix_ids(tokenizer)
    if affixes is None or len(affixes[0]) > 1 or len(affixes[1]) > 1:
        plain = [int(i) for i in tokenizer.encode(AFFIX_PROBE)]
        full = [int(i) for i in tokenizer.encode(AFFIX_PROBE, add_special_tokens=True)]
        raise UserError(f"the tokenizer encodes {AFFIX_PROBE!r} with its special tokens as {full} (without them: "
                        f"{plain}); llama.cpp can add one token before a text (add_bos_token) and one after "
                        f"(add_eos_token), not this")
    prefix, suffix = affixes
    return {"bos": prefix[0] if prefix else None, "eos": suffix[0] if suffix else None}


def pad_vocab(vocab: Vocab, size: int) -> Vocab:
    """`vocab` with UNUSED tokens "[PAD{id}]" appended up to `size` ids, as llama.cpp's converters pad a model whose
    embedding has more rows than its tokenizer has tokens. UserError when the tokenizer has more than `size`."""
    if len(vocab.tokens) > size:
        raise UserError(f"the tokenizer has {len(vocab.tokens)} tokens but model.vocab_size is {size}")
    pads = range(len(vocab.tokens), size)
    return dataclasses.replace(vocab, tokens=[*vocab.tokens, *(f"[PAD{i}]" for i in pads)],
                               types=[*vocab.types, *([TokenType.UNUSED] * len(pads))])
