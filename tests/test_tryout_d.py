"""Faults found by a first-time user's tryout (session 17, A): each test pins the corrected behaviour against an
independent reference (Hugging Face `tokenizers`, gguf's reader, numpy) or a known value."""
import json
from pathlib import Path

import gguf
from tokenizers import Tokenizer

from checkpoints.gguf_vocab import bpe_vocab

ROOT = Path(__file__).resolve().parent.parent
HF_TOKENIZER = ROOT / "tests" / "fixtures" / "hf" / "gqa_tied" / "tokenizer.json"


def test_gguf_vocabulary_keeps_added_tokens_beyond_the_bpe_model_at_their_ids():
    # Tokens added to a tokenizer.json after training (chat markers, a user's words) get ids after the BPE model's
    # vocabulary and are listed only under added_tokens; they were written as unused "[PAD300]" tokens, so llama.cpp
    # split "<|im_start|>" into bytes and printed id 300 as "[PAD300]".
    tokenizer = Tokenizer.from_file(str(HF_TOKENIZER))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.add_tokens(["ROMEO"])
    vocab = bpe_vocab(json.loads(tokenizer.to_str()))
    assert len(vocab.tokens) == tokenizer.get_vocab_size(with_added_tokens=True) == 303
    assert vocab.tokens == [tokenizer.id_to_token(i) for i in range(303)]
    ids = tokenizer.encode("<|im_start|>ROMEO<|im_end|>").ids
    assert [vocab.tokens[i] for i in ids] == ["<|im_start|>", "ROMEO", "<|im_end|>"]
    assert vocab.types[300:] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED]
    assert set(vocab.types[:300]) == {gguf.TokenType.NORMAL}
