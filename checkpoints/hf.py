"""Hugging Face Llama folders in and out: config.json <-> ModelConfig and safetensors tensors <-> model params.

Two tables say everything about the format (`CONFIG_FIELDS`, `TENSORS`); reading goes tensor by tensor through
`safetensors` (one file or a sharded index), after every name, shape and dtype has been checked against config.json,
so what the model cannot represent is refused before anything is read or written.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from slm_jax.config import ModelConfig, RopeScaling
from slm_jax.errors import UserError
from slm_jax.model import Transformer

# config.json field -> ModelConfig field (transformers' LlamaConfig names; defaults as LlamaConfig's below).
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "intermediate_size": "mlp_hidden",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_size",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings",
    "max_position_embeddings": "max_context",
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "max_position_embeddings": 2048}
INTEGER_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # optional integers (null: default)
NUMBER_FIELDS = ("rms_norm_eps", "rope_theta")

# HF tensor name -> (slm-jax param path, transposed?). HF stores a linear layer as [out, in], slm-jax as [in, out].
TENSORS = {
    "model.embed_tokens.weight": ("embed/embedding", False),
    "model.layers.{i}.input_layernorm.weight": ("layer_{i}/attn_norm/scale", False),
    "model.layers.{i}.self_attn.q_proj.weight": ("layer_{i}/attn/q/kernel", True),
    "model.layers.{i}.self_attn.k_proj.weight": ("layer_{i}/attn/k/kernel", True),
    "model.layers.{i}.self_attn.v_proj.weight": ("layer_{i}/attn/v/kernel", True),
    "model.layers.{i}.self_attn.o_proj.weight": ("layer_{i}/attn/o/kernel", True),
    "model.layers.{i}.post_attention_layernorm.weight": ("layer_{i}/mlp_norm/scale", False),
    "model.layers.{i}.mlp.gate_proj.weight": ("layer_{i}/mlp/gate/kernel", True),
    "model.layers.{i}.mlp.up_proj.weight": ("layer_{i}/mlp/up/kernel", True),
    "model.layers.{i}.mlp.down_proj.weight": ("layer_{i}/mlp/down/kernel", True),
    "model.norm.weight": ("final_norm/scale", False),
    "lm_head.weight": ("lm_head/kernel", True),  # absent when tie_word_embeddings
}
ACCEPTED_TYPES = ("llama", "mistral")  # mistral only without sliding-window attention: then it is a Llama
UNSUPPORTED_TRUE = ("attention_bias", "mlp_bias", "use_sliding_window")
UNSUPPORTED_SET = ("sliding_window", "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
                   "moe_intermediate_size")
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
EXPORT_DTYPES = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # kept by an import, written back by an export
IGNORED_SUFFIX = ".rotary_emb.inv_freq"  # a buffer that older transformers saved; recomputed from config.json


def read_config(folder: Path) -> dict:
    """config.json of a Hugging Face model folder as a dict (UserError if missing or not JSON)."""
    path = Path(folder) / "config.json"
    try:
        values = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{folder} is not a Hugging Face model folder (no readable config.json)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object")
    return values


def _number(hf: dict, key: str, default, integer: bool = False, where: str = ""):
    """config.json's `key` (in `where`, e.g. "rope_scaling.") as a finite number (an integer with `integer`), or
    `default` when absent or null; UserError naming the key otherwise."""
    value = hf.get(key)
    if value is None:
        return default
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config.json {where}{key} must be an integer, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"config.json {where}{key} must be a finite number, got {value!r}")
    return value


def _rope_dict(hf: dict, key: str) -> dict | None:
    """config.json's rope_parameters or rope_scaling: a JSON object or null (UserError naming `key` otherwise)."""
    value = hf.get(key)
    if value is not None and not isinstance(value, dict):
        raise UserError(f"config.json {key} must be a JSON object such as {{\"rope_type\": \"llama3\", ...}} or "
                        f"null, got {value!r}")
    return value or None


def _rope_kind(rope: dict, key: str) -> str:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(kind, str):
        raise UserError(f"config.json {key}.rope_type must be a string such as \"llama3\", got {kind!r}")
    return kind


ROPE_LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_settings(hf: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from config.json, in transformers 4's form (rope_theta, rope_scaling) or 5's
    (rope_parameters with rope_type and rope_theta inside). UserError, naming the config.json key, for a value of
    the wrong type, a scaling other than llama3, or rope_parameters and rope_scaling that disagree."""
    given = {key: rope for key in ("rope_parameters", "rope_scaling") if (rope := _rope_dict(hf, key)) is not None}
    kinds = {key: _rope_kind(rope, key) for key, rope in given.items()}
    disagree = UserError(f"config.json rope_parameters ({kinds.get('rope_parameters')}) and rope_scaling "
                         f"({kinds.get('rope_scaling')}) disagree; keep one of them")
    if len(set(kinds.values())) > 1:  # before either is checked: a second, conflicting key is the first problem
        raise disagree
    meanings = {key: _rope_meaning(rope, key) for key, rope in given.items()}
    if len({repr(meaning) for meaning in meanings.values()}) > 1:
        raise disagree
    key, rope = next(iter(given.items()), ("rope_parameters", {}))
    inner = _number(rope, "rope_theta", None, where=f"{key}.")
    theta = _number(hf, "rope_theta", DEFAULTS["rope_theta"] if inner is None else inner)
    if inner is not None and "rope_theta" in hf and hf["rope_theta"] is not None and inner != theta:
        raise UserError(f"config.json rope_theta ({theta}) and {key}.rope_theta ({inner}) disagree; keep one of them")
    if meanings.get(key) is None:
        return float(theta), None
    return float(theta), RopeScaling(**meanings[key])


def _rope_meaning(rope: dict, key: str) -> dict | None:
    """The scaling a rope_parameters/rope_scaling object stands for: None (plain rotary) or the RopeScaling fields
    of llama3 scaling; UserError naming `key` for another type or a missing or non-numeric field."""
    kind = _rope_kind(rope, key)
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"config.json {key} type {kind!r} is not supported (accepted: default, llama3)")
    missing = [f for f in ROPE_LLAMA3 if rope.get(f) is None]
    if missing:
        raise UserError(f"config.json {key} of type llama3 needs a number for {missing[0]}")
    values = {f: _number(rope, f, None, integer=f == "original_max_position_embeddings", where=f"{key}.")
              for f in ROPE_LLAMA3}
    return {f: (int(v) if f == "original_max_position_embeddings" else float(v)) for f, v in values.items()}


def model_config(hf: dict, seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a config.json (a dict), refusing in one line what the model cannot represent.

    seq_len (the training window) defaults to min(max_position_embeddings, 512); max_context is
    max_position_embeddings, so the model attends to its whole prefix as the original does.
    """
    if hf.get("model_type") not in ACCEPTED_TYPES:
        raise UserError(f"config.json model_type {hf.get('model_type')!r} is not a Llama-architecture model "
                        f"(accepted: {', '.join(ACCEPTED_TYPES)})")
    for key in UNSUPPORTED_TRUE:
        if hf.get(key):
            raise UserError(f"config.json {key} is true; the model has no attention/MLP biases or sliding windows")
    for key in UNSUPPORTED_SET:
        if hf.get(key) not in (None, 0):
            raise UserError(f"config.json {key} is {hf[key]!r}; sliding-window attention and mixtures of experts "
                            f"are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json hidden_act {hf['hidden_act']!r} is not supported (the MLP is SwiGLU: silu)")
    for key in REQUIRED:
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool):
            raise UserError(f"config.json {key} must be an integer, got {hf.get(key)!r}")
    values = {field: hf[key] for key, field in CONFIG_FIELDS.items() if key in REQUIRED}
    for key in INTEGER_FIELDS:
        values[CONFIG_FIELDS[key]] = _number(hf, key, DEFAULTS.get(key), integer=True)
    for key in NUMBER_FIELDS:
        values[CONFIG_FIELDS[key]] = _number(hf, key, DEFAULTS[key])
    tie = hf.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise UserError(f"config.json tie_word_embeddings must be true or false, got {tie!r}")
    values["tie_embeddings"] = DEFAULTS["tie_word_embeddings"] if tie is None else tie
    for key in TOKEN_IDS:
        token_id = hf.get(key)
        ids = token_id if isinstance(token_id, list) else [token_id]
        if token_id is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise UserError(f"config.json {key} must be a token id (an integer >= 0), a list of them or null, "
                            f"got {token_id!r}")
    if hf["num_attention_heads"] > 0 and values["head_size"] == hf["hidden_size"] // hf["num_attention_heads"] \
            and hf["hidden_size"] % hf["num_attention_heads"] == 0:  # (ModelConfig refuses 0 heads, in one line)
        values["head_size"] = None  # the default width: no need to record it
    context = values["max_context"]
    if context < 1:  # else refused below as the default --seq-len min(context, 512), which the user never gave
        raise UserError(f"config.json max_position_embeddings must be a positive integer or null, got {context}")
    try:
        values["rope_theta"], values["rope_scaling"] = rope_settings(hf)  # RopeScaling validates itself
        return ModelConfig(**values, seq_len=seq_len or min(context, 512))
    except UserError as err:  # name config.json's keys, not the model section's it maps them to
        raise UserError(config_json_names(str(err), hf)) from None


def config_json_names(message: str, hf: dict) -> str:
    """A ModelConfig validation message with each `model.FIELD` read from config.json named by its config.json key
    (and model.seq_len as --seq-len, model.rope_scaling as the rope key config.json used, model.rope_theta as that
    key's rope_theta when only it gives one)."""
    names = {field: f"config.json {key}" for key, field in CONFIG_FIELDS.items()}
    names["seq_len"] = "--seq-len"
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    names["rope_scaling"] = f"config.json {rope_key}"
    rope = hf.get(rope_key)
    if hf.get("rope_theta") is None and isinstance(rope, dict) and rope.get("rope_theta") is not None:
        names["rope_theta"] = f"config.json {rope_key}.rope_theta"
    return re.sub(r"\bmodel\.([a-z_]+)", lambda m: names.get(m.group(1), m.group(0)), message)


def hf_config(cfg: ModelConfig, dtype: str = "bf16", extra: dict | None = None) -> dict:
    """config.json for `cfg` (transformers 4's form, which transformers 5 reads too); `extra` adds token ids."""
    scaling = None if cfg.rope_scaling is None else {
        "rope_type": cfg.rope_scaling.type, "factor": cfg.rope_scaling.factor,
        "low_freq_factor": cfg.rope_scaling.low_freq_factor, "high_freq_factor": cfg.rope_scaling.high_freq_factor,
        "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}
    values = {key: getattr(cfg, field) for key, field in CONFIG_FIELDS.items()}
    values.update(intermediate_size=cfg.hidden, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.context)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **values, "rope_scaling": scaling,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype], **(extra or {})}


def tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """TENSORS expanded for `cfg`'s layers (without lm_head.weight when the embeddings are tied)."""
    out = {}
    for name, (path, transposed) in TENSORS.items():
        for i in range(cfg.n_layers) if "{i}" in name else [None]:
            out[name.format(i=i)] = (path.format(i=i), transposed)
    if cfg.tie_embeddings:
        del out["lm_head.weight"]
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{param path "layer_0/attn/q/kernel": shape} of the float model of `cfg` (traced abstractly)."""
    abstract = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0),
                                                                      jnp.zeros((1, 1), jnp.int32))))
    leaves = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def is_model_folder(folder: Path) -> bool:
    """Whether `folder` holds a Hugging Face model: config.json and model.safetensors or its shard index."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def import_first(folder: Path) -> UserError:
    """The one-line refusal for a command that reads runs, pointed at a Hugging Face model folder."""
    return UserError(f"{folder} is a Hugging Face model folder, not an slm-jax run; import it first: "
                     f"python -m checkpoints.hf_import {shlex.quote(str(folder))} --out runs/NAME")


def shard_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a folder with model.safetensors or model.safetensors.index.json."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


@contextlib.contextmanager
def open_safetensors(file: Path):
    """`safe_open(file)` for numpy, with a truncated or corrupt file (its header does not describe its bytes) a
    UserError naming the file."""
    try:
        handle = safe_open(file, framework="np")
    except SafetensorError as err:
        raise UserError(f"{file} is not a readable safetensors file ({err}); download it again") from None
    with handle as f:
        yield f


def check_tensors(folder: Path, cfg: ModelConfig) -> dict[str, Path]:
    """{tensor name: file} of the tensors the model takes, after checking every name, dtype and shape (read from
    the safetensors headers only) against `cfg`: UserError naming the first tensor that does not fit."""
    files, wanted, shapes = shard_files(folder), tensor_map(cfg), param_shapes(cfg)
    for name in files:
        if name not in wanted and not name.endswith(IGNORED_SUFFIX) and not (name == "lm_head.weight"
                                                                               and cfg.tie_embeddings):
            raise UserError(f"{folder}: tensor {name} has no place in a Llama model of this config.json "
                            f"(biases, experts or another architecture?)")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        if name not in files:
            raise UserError(f"{folder}: tensor {name} is missing")
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        if not file.is_file():
            raise UserError(f"{folder}: shard {file.name} named in the index is missing")
        with open_safetensors(file) as f:
            for name in names:
                info = f.get_slice(name)
                path, transposed = wanted[name]
                expected = shapes[path][::-1] if transposed else shapes[path]
                if info.get_dtype() not in DTYPES:
                    raise UserError(f"{folder}: tensor {name} is {info.get_dtype()}; only F32, F16 and BF16 are read")
                if tuple(info.get_shape()) != expected:
                    raise UserError(f"{folder}: tensor {name} has shape {list(info.get_shape())}, config.json "
                                    f"implies {list(expected)}")
    return {name: files[name] for name in wanted}


def read_tensors(files: dict[str, Path], cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(param path, float32 array in slm-jax layout) for each checked tensor, one at a time, file by file; UserError
    naming the first tensor that holds NaN or inf (a checkpoint is finite)."""
    wanted, by_file = tensor_map(cfg), {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in names:
                path, transposed = wanted[name]
                array = f.get_tensor(name).astype(np.float32)
                if not np.isfinite(array).all():
                    raise UserError(f"{file}: tensor {name} holds {int((~np.isfinite(array)).sum()):,} non-finite "
                                    f"values (NaN or inf); a model with them cannot be imported")
                yield path, np.ascontiguousarray(array.T) if transposed else array


def read_params(folder: Path, cfg: ModelConfig) -> dict:
    """The float32 "params" tree of `cfg` from a Hugging Face folder's safetensors (checked first)."""
    params: dict = {}
    for path, array in read_tensors(check_tensors(folder, cfg), cfg):
        *parents, leaf = path.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = array
    return params


def write_safetensors(file: Path, params: dict, cfg: ModelConfig, dtype: str = "bf16") -> None:
    """model.safetensors of float `params` ({"embed": {"embedding": [vocab, d]}, ...}) in HF names and layout,
    cast to `dtype` (bf16 | f16 | f32, rounding to nearest even)."""
    def param(param_path: str):
        node = params
        for key in param_path.split("/"):
            node = node[key]
        return np.asarray(node, np.float32)

    tensors = {}
    for name, (path, transposed) in tensor_map(cfg).items():
        array = param(path)
        tensors[name] = np.ascontiguousarray((array.T if transposed else array).astype(EXPORT_DTYPES[dtype]))
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})
    os.chmod(file, 0o666 & ~current_umask())  # safetensors writes owner-only (0600): the mode any other file gets


def current_umask() -> int:
    """This process's file mode creation mask, read without changing it where Linux shows it (/proc/self/status),
    so threads creating files meanwhile keep the real mask; elsewhere by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
