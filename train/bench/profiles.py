"""The bench's profiles (full, quick, micro): which training set-ups each section compares and how much of each it
measures. Plain data, read by the entry point and by every section.
"""
from __future__ import annotations

import dataclasses

# name -> (label, config, overrides on it): the training set-ups the sections compare
VARIANTS = {
    "fp32": ("fp32", "baseline", ("train.precision=fp32",)),
    "bf16": ("bf16 mixed precision", "baseline", ()),
    "int8_w8a8": ("INT8 QAT w8a8", "int8_qat", ()),
    "int4_w4": ("INT4 QAT w4 (g32)", "int4_qat", ()),
    "int4_w4a8": ("INT4 QAT w4a8 (g32)", "int4_qat", ("quant.act_bits=8",)),
}
SPEED_VARIANTS = tuple(VARIANTS)
# name -> (label, config, overrides): timed as well where the bench's CPU is split one device per core
# (train.cpu_devices), to show what the split gives; references are still "bf16" and "fp32"
ONE_DEVICE_VARIANTS = {
    "fp32_1dev": ("fp32 on one CPU device", "baseline", ("train.precision=fp32", "mesh.cpu_devices=1")),
    "bf16_1dev": ("bf16 on one CPU device", "baseline", ("mesh.cpu_devices=1",)),
}
# name -> (label, config, overrides): LoRA adapters over the INT4 serving form of the float variant's random init;
# the same weight scheme as int4_w4 (the embedding follows the size's quant.embed_bits)
LORA_VARIANTS = {
    "int4_lora": ("LoRA over INT4 weights (w4 g32, rank 8)", "finetune_int4_lora",
                  ("quant.mode=serve", "quant.weight_bits=4", "quant.granularity=per_group", "quant.group_size=32",
                   "quant.scale_dtype=bfloat16")),
}
ALL_PTQ = ("ptq_int8", "ptq_int4_channel", "ptq_int4_group")
NANOGPT_CPU = ("model.n_layers=4", "model.n_heads=4", "model.d_model=128", "model.seq_len=64", "train.batch_size=12")
SMOLLM2_135M = ("model.d_model=576", "model.n_layers=30", "model.n_heads=9", "model.n_kv_heads=3",
                "model.mlp_hidden=1536", "model.tie_embeddings=true")
# SmolLM2-135M's vocabulary (a padded byte model: ids past 255 are never in the data, but random speed batches use
# them all); a quantized embedding cannot be tied to the LM head, so every variant keeps it float
SMOLLM2_SPEED = (*SMOLLM2_135M, "model.vocab_size=49152", "quant.embed_bits=null", "model.seq_len=256",
                 "train.batch_size=1")
NANOGPT_TIED = (*NANOGPT_CPU, "model.tie_embeddings=true")  # the PyTorch reference's size: nanoGPT ties its head
MICRO_MODEL = ("model.n_layers=1", "model.n_heads=2", "model.d_model=32", "model.seq_len=16", "train.batch_size=4")


@dataclasses.dataclass(frozen=True)
class LargerSize:
    """The serving section's larger model: overrides on the baseline config, batches, new tokens, rounds."""

    overrides: tuple[str, ...]
    batches: tuple[int, ...]
    new_tokens: int
    rounds: int


LARGER = ("model.d_model=512", "model.n_layers=8", "model.n_heads=8")


@dataclasses.dataclass(frozen=True)
class SpeedSize:
    """A training-speed size timed apart from `Profile.speed_sizes`, with its own variants (names in VARIANTS or
    LORA_VARIANTS; the first must not be a LoRA one) and fewer steps: a real-sized model on a CPU."""

    label: str
    overrides: tuple[str, ...]
    variants: tuple[str, ...]
    warmup: int
    rounds: int
    steps: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """How much of each section a run measures. Sizes are (label, overrides on the variant's config)."""

    name: str
    matmul_n: int
    matmul_reps: int
    speed_sizes: tuple[tuple[str, tuple[str, ...]], ...]
    speed_variants: tuple[str, ...]
    speed_warmup: int  # untimed steps after the first call
    speed_rounds: int  # variants are timed in turn, round after round, so load changes hit all of them alike
    speed_steps: int  # timed steps per variant per round
    quality_overrides: tuple[str, ...]  # model size and budget of every quality run ("" = the baseline config's)
    quality_trained: tuple[str, ...]  # variants trained from scratch; the first is the float run
    ptq: tuple[str, ...]  # post-training quantizations of the float run (names in train.bench.quality.PTQ)
    finetunes: tuple[str, ...]  # QAT variants fine-tuned from the float run
    finetune_steps: int
    eval_batches: int
    eval_batch_size: int
    serve_batches: tuple[int, ...]
    serve_new_tokens: int
    serve_reps: int
    adapt_overrides: tuple[str, ...] = ()  # model size and batch of the fine-tuning section's base and runs
    adapt_base_steps: int = 1000  # the base's training on tragedies + histories
    adapt_steps: int = 300  # each fine-tune's steps on the comedies
    adapt_methods: tuple[str, ...] | None = None  # names in train.bench.finetune.methods (None: all five)
    rss_models: int | None = None  # how many serving models get a peak-RSS subprocess (None: all)
    ptq_settings: tuple[str, ...] = ()  # calibrated-PTQ section (names in train.bench.ptq.SETTINGS); () skips it
    ptq_calib_batches: int = 128  # training windows each calibrated method sees
    serve_kv_bits: tuple[int | None, ...] = (None, 8)  # KV caches the serving section decodes with
    serve_larger: LargerSize | None = None  # decode speed at a larger size (random weights)
    speed_real: SpeedSize | None = None  # training speed at a real model's shape (random weights)
    reference_overrides: tuple[str, ...] = NANOGPT_TIED  # size of the PyTorch reference section (baseline config)
    reference_precisions: tuple[str, ...] = ("fp32", "bf16")
    reference_rounds: int = 6  # slm-jax and torch take turns, round after round
    reference_steps: int = 5


PROFILES = {
    "full": Profile(
        name="full", matmul_n=2048, matmul_reps=10,
        speed_sizes=(("nanoGPT-cpu", NANOGPT_CPU), ("baseline", ())), speed_variants=SPEED_VARIANTS,
        speed_warmup=3, speed_rounds=6, speed_steps=5,
        quality_overrides=("train.sample_tokens=0",), quality_trained=("bf16", "int8_w8a8", "int4_w4"), ptq=ALL_PTQ,
        finetunes=("int8_w8a8", "int4_w4"), finetune_steps=200, eval_batches=50, eval_batch_size=16,
        serve_batches=(1, 8), serve_new_tokens=256, serve_reps=5, adapt_base_steps=1000, adapt_steps=300,
        ptq_settings=("int2_g32", "int4_g32"), serve_larger=LargerSize(LARGER, (1, 8), 64, 3),
        speed_real=SpeedSize("SmolLM2-135M", SMOLLM2_SPEED, ("bf16", "int8_w8a8", "int4_w4", "int4_lora"),
                             warmup=1, rounds=2, steps=2),
        reference_rounds=10, reference_steps=10),
    "quick": Profile(
        name="quick", matmul_n=2048, matmul_reps=5,
        speed_sizes=(("nanoGPT-cpu", NANOGPT_CPU), ("baseline", ())), speed_variants=SPEED_VARIANTS,
        speed_warmup=1, speed_rounds=3, speed_steps=3,
        quality_overrides=("model.n_layers=2", "model.n_heads=4", "model.d_model=64", "model.seq_len=64",
                           "train.batch_size=16", "train.steps=150", "train.warmup_steps=15",
                           "train.learning_rate=3e-3", "train.log_every=10", "train.eval_every=50",
                           "train.eval_batches=10", "train.sample_tokens=0"),
        quality_trained=("bf16", "int8_w8a8", "int4_w4"), ptq=ALL_PTQ, finetunes=("int4_w4",), finetune_steps=50,
        eval_batches=20, eval_batch_size=16, serve_batches=(1, 8), serve_new_tokens=64, serve_reps=3,
        serve_larger=LargerSize(LARGER, (1,), 16, 1),
        adapt_overrides=("model.n_layers=2", "model.n_heads=4", "model.d_model=64", "model.seq_len=64",
                         "train.batch_size=16"), adapt_base_steps=150, adapt_steps=40),
    "micro": Profile(
        name="micro", matmul_n=128, matmul_reps=3, speed_sizes=(("micro", MICRO_MODEL),), speed_variants=("fp32",),
        speed_warmup=1, speed_rounds=1, speed_steps=2,
        quality_overrides=(*MICRO_MODEL, "train.steps=3", "train.warmup_steps=1", "train.log_every=1",
                           "train.eval_every=3", "train.eval_batches=1", "train.sample_tokens=0"),
        quality_trained=("bf16",), ptq=("ptq_int4_group",), finetunes=(), finetune_steps=1, eval_batches=1,
        eval_batch_size=4, serve_batches=(1,), serve_new_tokens=4, serve_reps=1, rss_models=1, serve_kv_bits=(None, 8),
        adapt_overrides=MICRO_MODEL, adapt_base_steps=2, adapt_steps=2, adapt_methods=("float_ft", "int4_lora"),
        speed_real=SpeedSize("micro tied", (*MICRO_MODEL, "model.tie_embeddings=true", "quant.embed_bits=null"),
                             ("fp32", "int4_w4", "int4_lora"), warmup=1, rounds=1, steps=2),
        reference_overrides=MICRO_MODEL, reference_precisions=("fp32",), reference_rounds=1, reference_steps=2),
}
