"""Reference fixtures from Hugging Face transformers, and the check that exported runs load there with the same logits.

Needs torch and transformers (the `reference` extra; never imported by the test suite), so run it with a Python
that has them:

    python -m checkpoints.make_hf_fixtures --out tests/fixtures/hf
        writes small random `LlamaForCausalLM` folders (GQA, tied and untied embeddings, llama3 rope scaling,
        head_dim != hidden / heads, bf16 sharded), each with a tiny byte-level BPE tokenizer.json, the token ids
        ids.npy [1, seq] and transformers' float32 logits.npy [1, seq, vocab] for them.
    python -m checkpoints.make_hf_fixtures --smollm2 DIR
        writes a random bf16 model of SmolLM2-135M's shape (for measurements; not a test fixture).
    python -m checkpoints.make_hf_fixtures --check-export RUN_DIR... --slm-python .venv/bin/python
        exports each slm-jax run with `checkpoints.hf_export` (through --slm-python, the environment with JAX),
        loads the folder with AutoModelForCausalLM and its tokenizer.json with PreTrainedTokenizerFast, and prints the
        largest logit difference from slm-jax's own logits; exit 1 if any exceeds --tolerance.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

try:  # the optional `reference` extra: without it --help still works and a run says what to install
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
except ImportError:
    torch = None

VOCAB = 300
SEQ = 32
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
              initializer_range=0.1, bos_token_id=1, eos_token_id=2)
FIXTURES = {
    # name: (LlamaConfig overrides, dtype of the saved weights, shard size or None)
    "gqa_tied": (dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), "float32", None),
    "llama3_head_dim": (dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                             rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 64}),
                        "float32", None),
    "bf16_sharded": (dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False),
                     "bfloat16", "40KB"),
}
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
# slm-jax's float32 logits of a run for the ids in argv[2], saved to argv[3] (run by --slm-python, where JAX lives).
SLM_LOGITS = """
import sys, numpy as np, jax, jax.numpy as jnp
from train.run import load_run
run = load_run(sys.argv[1])
logits, _ = jax.jit(run.model.clone(dtype=jnp.float32).apply)(run.variables, np.load(sys.argv[2]))
np.save(sys.argv[3], np.asarray(logits, np.float32))
"""


def corpus() -> list[str]:
    words = ("to", "be", "or", "not", "the", "question", "whether", "tis", "nobler", "in", "mind", "suffer")
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE of VOCAB tokens (256 bytes + merges) trained on a few lines of text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def randomize_norms(model, generator) -> None:
    """RMSNorm weights start at one; perturb them so the fixture pins which norm goes where."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def reference_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [1, seq, vocab] of the weights stored in `folder`."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def make_fixture(name: str, out: Path, seed: int) -> None:
    overrides, dtype, shard = FIXTURES[name]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**COMMON, **overrides)).eval()
    randomize_norms(model, torch.Generator().manual_seed(seed))
    folder = out / name
    model.to(getattr(torch, dtype)).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    ids = ((np.arange(SEQ) * 37 + 5) % VOCAB).astype(np.int32)[None]
    np.save(folder / "ids.npy", ids)
    np.save(folder / "logits.npy", reference_logits(folder, ids))
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote {folder}: {sorted(p.name for p in folder.iterdir())}, {size / 1024:.0f} KB")


def make_smollm2_shaped(folder: Path) -> None:
    """Random weights in SmolLM2-135M's shape, bf16 as published, with the tiny tokenizer."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    print(f"wrote {folder}: {sum(p.stat().st_size for p in folder.iterdir()) / 2**20:.0f} MiB")


def check_export(run: Path, slm_python: str, tolerance: float) -> bool:
    """Export `run`, load it in transformers, compare logits with slm-jax's; True if within `tolerance`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        subprocess.run([slm_python, "-m", "checkpoints.hf_export", "--workdir", str(run), "--out", str(folder),
                        "--dtype", "f32"], check=True)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        ids = ((np.arange(SEQ) * 37 + 5) % vocab).astype(np.int32)[None]
        np.save(Path(tmp) / "ids.npy", ids)
        subprocess.run([slm_python, "-c", SLM_LOGITS, str(run), str(Path(tmp) / "ids.npy"),
                        str(Path(tmp) / "slm.npy")], check=True)
        diff = float(np.abs(reference_logits(folder, ids) - np.load(Path(tmp) / "slm.npy")).max())
        text = "ROMEO: What light through yonder window breaks? é ✓"
        fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        same_ids = fast(text)["input_ids"] == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
        round_trip = fast.decode(fast(text)["input_ids"]) == text
    ok = diff <= tolerance and same_ids and round_trip
    print(f"{'ok  ' if ok else 'FAIL'} {run}: max |logits(transformers) - logits(slm-jax)| = {diff:.2e} "
          f"(tolerance {tolerance:g}); tokenizer ids agree: {same_ids}; decode(encode(text)) == text: {round_trip}")
    return ok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m checkpoints.make_hf_fixtures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the fixtures, e.g. tests/fixtures/hf")
    parser.add_argument("--smollm2", type=Path, metavar="DIR", help="write a random SmolLM2-135M-shaped model")
    parser.add_argument("--check-export", type=Path, nargs="+", metavar="RUN_DIR", help="slm-jax runs to export")
    parser.add_argument("--slm-python", default=sys.executable, help="a Python with slm-jax and JAX installed")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted logit difference")
    args = parser.parse_args(argv)
    if torch is None:
        parser.exit(2, "error: python -m checkpoints.make_hf_fixtures needs torch and transformers: pip install "
                       "'slm-jax[reference]'\n")
    if not (args.out or args.smollm2 or args.check_export):
        parser.error("give --out, --smollm2 or --check-export")
    if args.smollm2:
        make_smollm2_shaped(args.smollm2)
    if args.out:
        for i, name in enumerate(FIXTURES):
            make_fixture(name, args.out, seed=i)
    if args.check_export:
        results = [check_export(run, args.slm_python, args.tolerance) for run in args.check_export]
        sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
