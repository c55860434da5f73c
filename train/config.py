"""The root `Config`: one frozen dataclass per section, loaded from `configs/NAME.yaml` plus `--set` overrides.

The resolved config is saved with every checkpoint and read back by every later command (one source of truth).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
from pathlib import Path

import yaml

from quant.config import QuantConfig
from slm_jax.config import ModelConfig, bounded, check_positive
from slm_jax.errors import UserError
from train.config_loader import build, to_dict
from train.data import DataConfig, tokenizer_vocab_size
from train.sharding import MeshConfig

CONFIG_DIR = Path(str(importlib.resources.files("configs")))  # package data: found by editable and wheel installs
PRECISIONS = ("fp32", "bf16", "fp16")
METHODS = ("none", "qat", "lora")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = bounded(0, 0)
    steps: int = bounded(1000, 1)
    batch_size: int = bounded(16, 1)
    grad_accum: int = bounded(1, 1)  # micro-batches per optimizer step
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    warmup_steps: int = bounded(100, 0)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (f32 master params, bf16 compute) | fp16 (plus dynamic loss scaling)
    log_every: int = bounded(50, 1)
    eval_every: int = bounded(250, 1)
    # of the effective batch (batch_size x grad_accum windows), so the windows a validation loss averages depend on
    # the effective batch only, not on how it is split into micro-batches
    eval_batches: int = bounded(20, 1)
    init_from: str | None = None  # a workdir whose latest params start this run (e.g. QAT from a float model)
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = bounded(200, 0)
    tensorboard: bool = False  # also write metrics.jsonl's scalars as TensorBoard events to <workdir>/tensorboard
    extend: bool = False  # resume with another learning-rate schedule (train.steps, learning_rate, ...) on purpose

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches"):
            if getattr(self, key) <= 0:
                raise UserError(f"train.{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("seed", "warmup_steps", "sample_tokens"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        check_positive(self, ("learning_rate",), "train.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise UserError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        check_positive(self, ("grad_clip",), "train.")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"train.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = bounded(500, 1)  # steps between saves (the last step is always saved)
    keep: int = bounded(3, 1)  # how many recent checkpoints to keep
    async_save: bool = True  # Orbax writes in the background while training goes on

    def __post_init__(self):
        for key in ("every", "keep"):
            if getattr(self, key) <= 0:
                raise UserError(f"checkpoint.{key} must be a positive integer, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The `finetune` section: full fine-tuning, continued QAT with frozen layers, or LoRA over a serving run."""

    base: str | None = None  # lora: the serving (integer) workdir whose frozen weights the adapters train on
    method: str = "none"  # none (full fine-tuning from train.init_from) | qat (continued QAT) | lora
    lora_rank: int = bounded(8, 1)
    lora_alpha: float = 16.0  # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapter's input only
    lora_targets: str = "attn/(q|v)|mlp/(gate|up|down)"  # regex searched in layer paths such as layer_0/attn/q
    freeze: str | None = None  # none/qat: regex searched in param paths (layer_0/attn/q/kernel); matches stay fixed

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"finetune.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise UserError(f"finetune.lora_rank must be a positive integer, got {self.lora_rank!r}")
        check_positive(self, ("lora_alpha",), "finetune.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for key in ("lora_targets", "freeze"):
            try:
                re.compile(getattr(self, key) or "")
            except re.error as err:
                raise UserError(f"finetune.{key} is not a valid regex ({err})") from None
        if self.method == "lora":
            if not self.base:
                raise UserError("finetune.base must name the serving workdir LoRA trains over (finetune.method=lora)")
            if self.freeze is not None:
                raise UserError("finetune.freeze does not apply to finetune.method=lora (every base weight is frozen)")
        elif self.base is not None:
            raise UserError(f"finetune.base is only read by finetune.method=lora (method is {self.method}); "
                            f"full and QAT fine-tuning start from train.init_from")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    quant: QuantConfig = QuantConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        if not isinstance(values, dict):
            raise UserError(f"a config must be a mapping of sections, got {type(values).__name__}")
        return build(cls, values)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last value without a word, so
    `steps: 5` then `steps: 7` would train 7 steps silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str = "config"):
    """A YAML file's values; an unreadable file, bytes that are not UTF-8, invalid YAML or a repeated key in a
    mapping is a one-line UserError naming `what` it is."""
    try:
        return yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        f"YAML files are read as UTF-8") from None
    except yaml.YAMLError as err:
        raise UserError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None


def _read_yaml(path: Path) -> dict:
    values = read_yaml(path)
    if values is None:  # an empty file, or only comments: never meant as "train the defaults"
        raise UserError(f"config {path} is empty; give its sections, or `inherit: baseline` to start from a named "
                        f"config")
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of sections")
    return values


def resolve_path(name: str) -> Path:
    """A config name (`int8_qat`) or a path to a YAML file. UserError for an empty name (Path('') is the current
    folder), a folder, a missing file or an unknown name."""
    if not str(name).strip():
        raise UserError("--config is empty: give a config name (e.g. baseline) or a path to a .yaml file")
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file {path} " + ("is a folder, not a YAML file" if path.is_dir() else
                                                      "does not exist"))
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))
        raise UserError(f"unknown config '{name}' (known: {', '.join(known)}; or give a path to a .yaml file)")
    return path


def check_sections(values: dict, source: str, hint: str = "give its keys or remove it") -> None:
    """UserError when a known section of a config (`train:`) holds no mapping of its keys: `train: 5`, or an empty
    `train:` whose keys are all commented out. Merged over an inherited config, such a value replaced the base's whole
    section, and a later `--set train.steps=3` then rebuilt it from the defaults alone without a word."""
    sections = {field.name for field in dataclasses.fields(Config)}
    for key, value in values.items():
        if key in sections and not isinstance(value, dict):
            what = "is empty" if value is None else f"must be a mapping of its keys, got {value!r}"
            raise UserError(f"{source}: section {key} {what}; {hint.format(key=key)}")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, applying its `inherit:` base (a config name or a path next to it) underneath."""
    if path.resolve() in seen:
        raise UserError(f"config {path} inherits from itself")
    values = _read_yaml(path)
    parent = values.pop("inherit", None)
    check_sections(values, f"config {path}")
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise UserError(f"inherit: in {path} must be a config name, got {parent!r}")
    is_file = Path(parent).suffix in (".yaml", ".yml")
    sibling = path.parent / (parent if is_file else f"{parent}.yaml")  # an absolute parent stays as it is
    if sibling.is_file():
        parent_path = sibling
    elif is_file and not Path(parent).is_file():
        raise UserError(f"inherit: in {path}: config file {parent} does not exist (looked for {sibling})")
    else:
        parent_path = resolve_path(parent)
    return merge(load_yaml_tree(parent_path, (*seen, path.resolve())), values)


def parse_override(text: str) -> dict:
    """`section.key=value` (value parsed as YAML: 3, 1e-3, null, [a, b], true) -> nested dict."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(name: str, overrides: list[str] = ()) -> Config:
    """The named config plus `--set` overrides, checked across sections. `model.vocab_size` left unset anywhere
    is taken from the tokenizer (`data.tokenizer`); a set one must hold every token id (larger pads the embedding
    with rows no id reaches, as nanoGPT's 50304 and many Hugging Face checkpoints do). A relative `data.path` (a
    file, folder or glob) is made absolute against the current folder, as the run records it for later commands."""
    values = load_yaml_tree(resolve_path(name))
    for text in overrides:
        override = parse_override(text)
        check_sections(override, f"--set {text}", "set one key with --set {key}.KEY=VALUE")
        values = merge(values, override)
    config = Config.from_dict(values)
    if config.data.path is not None:  # the run records it: later commands (evaluate, convert) may run elsewhere
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, path=os.path.abspath(os.path.expanduser(config.data.path))))
    if "vocab_size" not in (values.get("model") or {}):
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, vocab_size=tokenizer_vocab_size(config.data)))
    check_consistency(config)
    return config


def check_finetune(config: Config) -> None:
    """Rules between `finetune` and the other sections of a root Config (called by check_consistency)."""
    method = config.finetune.method
    if method == "lora" and config.train.init_from:
        raise UserError("train.init_from does not apply to finetune.method=lora; the adapters start from "
                        "finetune.base")
    if method == "qat":
        if config.quant.mode != "qat":
            raise UserError(f"finetune.method=qat continues quantization-aware training: quant.mode must be qat, "
                            f"got {config.quant.mode}")
        if not config.train.init_from:
            raise UserError("finetune.method=qat needs train.init_from: the QAT (or float) workdir to continue")


def check_consistency(config: Config) -> None:
    """Rules that span sections."""
    if config.data.path is None and config.data.val_fraction != DataConfig.val_fraction:
        raise UserError(f"data.val_fraction={config.data.val_fraction} splits your own text (data.path); the bundled "
                        f"corpus is split by play: choose the held-out plays with data.val_plays")
    tokens = tokenizer_vocab_size(config.data)
    if config.model.vocab_size < tokens:
        raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokens} ids "
                        f"(data.tokenizer={config.data.tokenizer}); leave model.vocab_size unset to take it from "
                        f"the tokenizer")
    check_finetune(config)


def save_yaml(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
