"""A run's weights as a GGUF file for llama.cpp (architecture `llama`), written with the `gguf` package's writer.

Float and QAT weights are written as F32/F16/BF16 or quantized here with gguf's own Q8_0/Q4_0 quantizer; a serving
run in a ggml scheme has its stored codes and float16 scales packed into ggml blocks unchanged. q and k rows are
permuted from slm-jax's split-half rotary layout to the adjacent pairs llama.cpp's `llama` graph rotates.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import MODEL_TENSOR

from checkpoints.gguf_vocab import Vocab
from quant import ggml
from quant.config import QuantConfig
from quant.plan import LayerPlan, Path as LayerPath, make_plan
from quant.serving import quantized_weights
from slm_jax.config import ModelConfig
from slm_jax.layers import rope_frequencies
from slm_jax.errors import UserError

ARCH = gguf.MODEL_ARCH.LLAMA
TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0,
         "q4_0": GGMLType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
SCHEME_TYPES = {ggml.Q8_0: "q8_0", ggml.Q4_0: "q4_0"}
EXPORTABLE_KINDS = ("train", "imported", "serving")  # checkpoint metadata "kind"; an imported run is a float run
TOKEN_ID_WRITERS = {"bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id",
                    "pad_token_id": "add_pad_token_id"}
# slm-jax module path inside a block -> llama.cpp tensor; the model's own names read straight across.
BLOCK_MATRICES = {("attn", "q"): MODEL_TENSOR.ATTN_Q, ("attn", "k"): MODEL_TENSOR.ATTN_K,
                  ("attn", "v"): MODEL_TENSOR.ATTN_V, ("attn", "o"): MODEL_TENSOR.ATTN_OUT,
                  ("mlp", "gate"): MODEL_TENSOR.FFN_GATE, ("mlp", "up"): MODEL_TENSOR.FFN_UP,
                  ("mlp", "down"): MODEL_TENSOR.FFN_DOWN}
BLOCK_NORMS = {"attn_norm": MODEL_TENSOR.ATTN_NORM, "mlp_norm": MODEL_TENSOR.FFN_NORM}


def tensor_name(tensor: MODEL_TENSOR, block: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=block) + ".weight"


def rotary_rows(heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns a q or k projection's output rows [heads * head_dim] from split halves (slm-jax and
    Hugging Face rotate (x[i], x[i + d/2])) into adjacent pairs (llama.cpp's `llama` rotates (x[2i], x[2i+1])):
    new row 2i + j of each head is old row j * d/2 + i, the permutation llama.cpp's convert_hf_to_gguf applies."""
    order = np.arange(heads * head_dim).reshape(heads, 2, head_dim // 2)
    return order.transpose(0, 2, 1).reshape(-1)


def _node(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def _float_matrix(matrix: np.ndarray, out_type: str) -> tuple[np.ndarray, GGMLType]:
    """A float matrix [rows, cols] as stored for `out_type` (quantized by gguf's own quantizer for q8_0/q4_0)."""
    matrix = np.ascontiguousarray(matrix, np.float32)
    if out_type == "f32":
        return matrix, GGMLType.F32
    if out_type == "f16":
        return matrix.astype(np.float16), GGMLType.F16
    return gguf.quants.quantize(matrix, TYPES[out_type]), TYPES[out_type]


def check_kind(kind: str) -> None:
    """UserError unless a run of this kind (checkpoint metadata "kind") holds plain weights: "train" (float or QAT),
    "imported" (float, from Hugging Face) or "serving"."""
    if kind == "lora":
        raise UserError("a LoRA run holds unmerged adapters; merge them first (python -m quant.merge --workdir RUN "
                        "--out MERGED) and export the merged run")
    if kind not in EXPORTABLE_KINDS:
        raise UserError(f"a run of kind {kind!r} cannot be exported to GGUF (float, imported, QAT and serving runs "
                        f"can)")


def export_type(kind: str, quant_cfg: QuantConfig, requested: str | None) -> str:
    """The GGUF type of a run's quantized matrices: `requested`, or the run's own ggml scheme's type (a serving
    run can only be written in its own scheme: no re-quantization). UserError for a type with no ggml equivalent."""
    if requested is not None and requested not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)}, got {requested!r}")
    own = SCHEME_TYPES.get(quant_cfg.scheme) if quant_cfg.mode != "none" else None
    if kind == "serving":
        if own is None:
            raise UserError(f"this serving run stores AQT int{quant_cfg.weight_bits} {quant_cfg.granularity} weights, "
                            f"which have no ggml type; convert its float run with --scheme ggml_q8_0 or ggml_q4_0")
        if requested not in (None, own):
            raise UserError(f"a {quant_cfg.scheme} serving run is written as {own} (its codes as they are), not "
                            f"{requested}; export the float or QAT run it came from for other types")
        return own
    return requested or own or "f16"


def _matrix_type(plan: LayerPlan | None, kind: str, quant_cfg: QuantConfig, out_type: str) -> str:
    """Which type one projection gets: a float run's every projection takes out_type; a QAT or serving run's
    layers that its plan keeps float stay float (F16, or F32 for an f32 file). A QAT run written in its own ggml
    scheme's type keeps each layer's own ggml type (rules may switch layers between Q8_0 and Q4_0); written in
    another quantized type, its quantized layers take that type, by gguf's quantizer, as a float run's would."""
    float_type = "f32" if out_type == "f32" else "f16"
    if out_type in ("f32", "f16", "bf16") or quant_cfg.mode == "none":
        return out_type
    if plan is None:
        return float_type
    if kind != "serving" and out_type != SCHEME_TYPES.get(quant_cfg.scheme):
        return out_type
    return SCHEME_TYPES[plan.scheme] if plan.scheme in SCHEME_TYPES else out_type


def gguf_tensors(model_cfg: ModelConfig, quant_cfg: QuantConfig, variables: dict, kind: str,
                 out_type: str) -> list[tuple[str, np.ndarray, GGMLType]]:
    """(name, data, type) of every tensor of the GGUF file, in llama.cpp's layout: matrices [out, in] row-major
    (the kernel [in, out] transposed), quantized ones as uint8 block bytes [out, in // 32 * bytes per block].

    `variables` are the run's ({"params"} for float/QAT, plus "aqt" for serving); norms are always F32, the token
    table F32 for an f32 file and F16 otherwise. `out_type` comes from `export_type`.
    """
    params = variables["params"]
    plan = make_plan(model_cfg, quant_cfg) if quant_cfg.mode != "none" else {}
    stored = quantized_weights(variables.get("aqt", {})) if kind == "serving" else {}
    embed_type = "f32" if out_type == "f32" else "f16"
    tensors = [(tensor_name(MODEL_TENSOR.TOKEN_EMBD), *_float_matrix(_node(params, ("embed", "embedding")),
                                                                      embed_type))]

    def matrix(path: LayerPath, rows: np.ndarray | None = None) -> tuple[np.ndarray, GGMLType]:
        layer_type = _matrix_type(plan.get(path), kind, quant_cfg, out_type)
        if path in stored:
            value, scale = (np.asarray(stored[path][key]) for key in ("value", "scale"))
            codes, scales = value.astype(np.int8), scale.reshape(scale.shape[0], -1)
            if rows is not None:
                codes, scales = codes[..., rows], scales[:, rows]
            return ggml.to_block_bytes(codes, scales, plan[path].scheme), TYPES[layer_type]
        weight = _node(params, path + ("kernel",)).T
        return _float_matrix(weight if rows is None else weight[rows], layer_type)

    for block in range(model_cfg.n_layers):
        prefix = f"layer_{block}"
        for name, tensor in BLOCK_NORMS.items():
            norm = _node(params, (prefix, name, "scale")).astype(np.float32)
            tensors.append((tensor_name(tensor, block), norm, GGMLType.F32))
        for sub, tensor in BLOCK_MATRICES.items():
            heads = {"q": model_cfg.n_heads, "k": model_cfg.kv_heads}.get(sub[1])
            rows = None if heads is None else rotary_rows(heads, model_cfg.head_dim)
            tensors.append((tensor_name(tensor, block), *matrix((prefix, *sub), rows)))
    tensors.append((tensor_name(MODEL_TENSOR.OUTPUT_NORM), _node(params, ("final_norm", "scale")).astype(np.float32),
                    GGMLType.F32))
    if model_cfg.rope_scaling is not None:
        tensors.append((tensor_name(MODEL_TENSOR.ROPE_FREQS), rope_factors(model_cfg), GGMLType.F32))
    if not model_cfg.tie_embeddings:  # a tied head is llama.cpp's default: no output tensor, token_embd reused
        tensors.append((tensor_name(MODEL_TENSOR.OUTPUT), *matrix(("lm_head",))))
    return tensors


def rope_factors(model_cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor [head_dim // 2] (float32): the divisor of each rotary frequency, i.e. the
    plain frequency over the scaled one that slm-jax computes (`slm_jax.layers.rope_frequencies` with Llama 3.1
    scaling), so llama.cpp rotates by exactly slm-jax's angles."""
    plain = np.asarray(rope_frequencies(model_cfg.head_dim, model_cfg.rope_theta), np.float32)
    scaled = np.asarray(rope_frequencies(model_cfg.head_dim, model_cfg.rope_theta, model_cfg.rope_scaling), np.float32)
    return plain / scaled


def check_exportable(model_cfg: ModelConfig, quant_cfg: QuantConfig, out_type: str) -> None:
    """UserError for a model llama.cpp's `llama` graph cannot run as slm-jax does, or a type its widths forbid."""
    if quant_cfg.mode != "none" and model_cfg.quantize_attention and quant_cfg.scheme == "aqt":
        raise UserError("model.quantize_attention: llama.cpp computes attention in float; this run was trained "
                        "with quantized attention einsums, which a GGUF file cannot express")
    if out_type in ("q8_0", "q4_0"):
        narrow = [name for name, width in (("d_model", model_cfg.d_model), ("mlp_hidden", model_cfg.hidden))
                  if width % ggml.BLOCK]
        if narrow:
            raise UserError(f"--type {out_type} needs input widths that are multiples of {ggml.BLOCK}; "
                            f"model.{narrow[0]} is not")


@contextlib.contextmanager
def new_file(out: Path, what: str) -> Iterator[Path]:
    """A temporary path beside `out` (same suffix, so writers that add one keep its name) for the block to write;
    renamed to `out` when the block ends, removed when it fails, so a failure never leaves a partial file. UserError
    "--out {out} already exists; {what}" if `out` appeared meanwhile: it is never overwritten."""
    temporary = out.with_name(f".{out.stem}.{os.getpid()}.partial{out.suffix}")
    try:
        yield temporary
        if out.exists():  # made while this command ran
            raise UserError(f"--out {out} already exists; {what}")
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)


def write_gguf(out: Path, model_cfg: ModelConfig, tensors, vocab: Vocab, out_type: str, name: str,
               token_ids: dict | None = None) -> Path:
    """Write the GGUF file: llama hyperparameters, the vocabulary (with add_bos_token / add_eos_token and those
    tokens' ids where `vocab` says its tokenizer adds them), `token_ids` ({"bos_token_id": 1, ...} as a Hugging Face
    config.json has them; of a list of eos ids the first) and `tensors` (from `gguf_tensors`). Written
    to a temporary name beside `out` and renamed at the end, so a failure never leaves a partial .gguf behind;
    UserError if `out` exists (it is never overwritten)."""
    out = Path(out)
    if len(vocab.tokens) != model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(vocab.tokens)} tokens but model.vocab_size is "
                        f"{model_cfg.vocab_size}")
    with new_file(out, "an export writes a new file") as temporary:
        writer = gguf.GGUFWriter(temporary, gguf.MODEL_ARCH_NAMES[ARCH])
        try:
            writer.add_name(name)
            writer.add_file_type(FILE_TYPES[out_type])
            if out_type in ("q8_0", "q4_0"):
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_context_length(model_cfg.context)
            writer.add_embedding_length(model_cfg.d_model)
            writer.add_block_count(model_cfg.n_layers)
            writer.add_feed_forward_length(model_cfg.hidden)
            writer.add_head_count(model_cfg.n_heads)
            writer.add_head_count_kv(model_cfg.kv_heads)
            writer.add_layer_norm_rms_eps(model_cfg.norm_eps)
            writer.add_rope_freq_base(model_cfg.rope_theta)
            writer.add_rope_dimension_count(model_cfg.head_dim)
            if model_cfg.head_dim * model_cfg.n_heads != model_cfg.d_model:  # llama.cpp assumes d_model / n_heads
                writer.add_key_length(model_cfg.head_dim)
                writer.add_value_length(model_cfg.head_dim)
            writer.add_vocab_size(model_cfg.vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(vocab.pre)
            writer.add_token_list(vocab.tokens)
            writer.add_token_types(vocab.types)
            writer.add_token_merges(vocab.merges)
            writer.add_add_bos_token(vocab.bos is not None)  # as train.generate encodes a prompt
            if vocab.eos is not None:
                writer.add_add_eos_token(True)
            added = {key: token_id for key, token_id in (("bos_token_id", vocab.bos), ("eos_token_id", vocab.eos))
                     if token_id is not None}  # the tokens the tokenizer adds, whatever config.json said
            for key, token_id in {**(token_ids or {}), **added}.items():
                token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
                if isinstance(token_id, int) and key in TOKEN_ID_WRITERS:
                    getattr(writer, TOKEN_ID_WRITERS[key])(token_id)
            for tensor_name_, data, dtype in tensors:
                writer.add_tensor(tensor_name_, data, raw_dtype=dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out
