"""`python -m checkpoints.gguf_check --reference ref.npz A.gguf [B.gguf ...]`: run GGUF files in llama.cpp (through
llama-cpp-python, the optional `llamacpp` extra) and compare them with slm-jax's saved logits.

Per file: whether llama.cpp tokenizes text into slm-jax's ids, logits max |diff|, KL(slm-jax || llama.cpp) and top-1
agreement, validation loss and perplexity from llama.cpp's own logits, and decode tokens/s at batch 1.
`--llama-quantize SRC DST --type q4_0` quantizes a file with llama.cpp's own quantizer instead (the baseline to beat).
Needs numpy and llama_cpp only, no jax: run it with the venv that has llama-cpp-python.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:  # the optional `llamacpp` extra: without it --help still works and a check says what to install
    import llama_cpp
except ImportError:
    llama_cpp = None

FTYPE_NAMES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}  # llama_cpp constants
GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type ids (ggml.h), for the per-tensor overrides


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def load(path: Path, n_ctx: int, threads: int, repack: bool) -> llama_cpp.Llama:
    """The model in llama.cpp's CPU backend. repack=False turns off its extra buffer types (weights repacked for
    AMX / AVX512 kernels; the AMX path crashes on these small Q8_0/Q4_0 models in llama.cpp as of 0.3.36), which
    llama-cpp-python does not expose, so its default model params are wrapped."""
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        model_params = default_params()
        model_params.use_extra_bufts = repack
        return model_params

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                               n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params


def window_logits(llm: llama_cpp.Llama, tokens: np.ndarray) -> np.ndarray:
    """llama.cpp's logits [len(tokens), vocab] for one window evaluated from an empty cache."""
    llm.reset()
    llm.eval([int(t) for t in tokens])
    return np.array(llm.scores[: len(tokens)], np.float32)


def decode_speed(llm: llama_cpp.Llama, prompt: np.ndarray, new_tokens: int, reps: int = 3) -> float:
    """Greedy decode tokens/s at batch 1 after a prompt (prefill not counted), median of `reps`."""
    rates = []
    for _ in range(reps):
        llm.reset()
        llm.eval([int(t) for t in prompt])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def check_file(path: Path, ref: dict, threads: int, repack: bool) -> dict:
    seq_len = int(ref["seq_len"])
    llm = load(path, seq_len, threads, repack)
    text_ids = llm.tokenize(ref["text"].tobytes(), add_bos=False, special=False)
    ref_logits, targets = ref["logits"], ref["targets"]
    max_diff, kl, top1, nll, ours_nll = 0.0, [], [], [], []
    for window, ours, target in zip(ref["inputs"], ref_logits, targets):
        theirs = window_logits(llm, window)
        max_diff = max(max_diff, float(np.abs(theirs - ours).max()))
        p_log, q_log = log_softmax(ours), log_softmax(theirs)
        kl.append(float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean()))
        top1.append(float((theirs.argmax(-1) == ours.argmax(-1)).mean()))
        nll.append(float(-np.take_along_axis(q_log, target[:, None], -1).mean()))
        ours_nll.append(float(-np.take_along_axis(p_log, target[:, None], -1).mean()))
    loss = statistics.fmean(nll)
    return {"file": str(path), "bytes": path.stat().st_size,
            "tokenizer_matches": list(text_ids) == [int(t) for t in ref["text_ids"]],
            "max_abs_logit_diff": max_diff, "kl": statistics.fmean(kl), "top1_agreement": statistics.fmean(top1),
            "llama_cpp_val_loss": loss, "llama_cpp_perplexity": math.exp(loss),
            "slm_jax_val_loss": statistics.fmean(ours_nll),
            "llama_cpp_decode_tokens_per_s": decode_speed(llm, ref["inputs"][0][: seq_len // 2], seq_len // 2),
            "slm_jax_decode_tokens_per_s": float(ref["decode_tokens_per_s"])}


def llama_quantize(source: Path, dest: Path, type_name: str, token_embd: str, output: str, threads: int) -> None:
    """Quantize `source` (an F16/F32 GGUF) to `type_name` with llama.cpp's own quantizer (llama_model_quantize),
    the token table as `token_embd` and the output matrix as `output` (so the mix of types can match ours)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPE_NAMES[type_name])
    params.nthread = threads
    params.token_embedding_type = GGML_TYPES[token_embd]
    params.output_tensor_type = GGML_TYPES[output]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {source}")


def format_rows(rows: list[dict]) -> str:
    header = (f"{'file':<34} {'MB':>6} {'tok ok':>6} {'max|dlogit|':>11} {'KL':>9} {'top-1':>6} {'loss':>7} "
              f"{'ppl':>7} {'slm loss':>8} {'llama tok/s':>11} {'slm tok/s':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{Path(r['file']).name:<34} {r['bytes'] / 1e6:>6.2f} {str(r['tokenizer_matches']):>6} "
                     f"{r['max_abs_logit_diff']:>11.2e} {r['kl']:>9.2e} {r['top1_agreement']:>6.3f} "
                     f"{r['llama_cpp_val_loss']:>7.4f} {r['llama_cpp_perplexity']:>7.3f} {r['slm_jax_val_loss']:>8.4f} "
                     f"{r['llama_cpp_decode_tokens_per_s']:>11,.0f} {r['slm_jax_decode_tokens_per_s']:>9,.0f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m checkpoints.gguf_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="GGUF files exported from the reference's run")
    parser.add_argument("--reference", type=Path, help="the .npz written by python -m checkpoints.gguf_reference")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="llama.cpp threads (default: every core; on a loaded machine 1 avoids its spin-waits)")
    parser.add_argument("--repack", action="store_true", help="let llama.cpp repack weights for AMX/AVX512 kernels")
    parser.add_argument("--llama-quantize", nargs=2, type=Path, metavar=("SRC", "DST"),
                        help="quantize SRC with llama.cpp's own quantizer into DST instead of checking")
    parser.add_argument("--type", choices=sorted(FTYPE_NAMES), default="q4_0", help="with --llama-quantize")
    parser.add_argument("--token-embd", choices=sorted(GGML_TYPES), default="f16", help="with --llama-quantize")
    parser.add_argument("--output", choices=sorted(GGML_TYPES), help="with --llama-quantize (default: --type)")
    args = parser.parse_args(argv)
    if llama_cpp is None:
        parser.exit(2, "error: python -m checkpoints.gguf_check needs llama-cpp-python: pip install "
                       "'slm-jax[llamacpp]' in a virtualenv of its own (it builds llama.cpp)\n")
    if args.llama_quantize:
        source, dest = args.llama_quantize
        if not source.is_file():
            parser.error(f"{source} does not exist")
        llama_quantize(source, dest, args.type, args.token_embd, args.output or args.type, args.threads)
        print(f"wrote {dest} ({dest.stat().st_size:,} bytes) with llama.cpp's {args.type} quantizer")
        return
    if args.reference is None or not args.files:
        parser.error("give --reference ref.npz and at least one .gguf file (or --llama-quantize SRC DST)")
    for path in [args.reference, *args.files]:
        if not path.is_file():
            parser.error(f"{path} does not exist")
    ref = dict(np.load(args.reference))
    rows = [check_file(path, ref, args.threads, args.repack) for path in args.files]
    print(f"llama.cpp via llama-cpp-python {llama_cpp.__version__}; {len(ref['inputs'])} validation windows of "
          f"{int(ref['seq_len'])} tokens")
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "rows": rows}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
