"""Fine-tuning quantized models: LoRA adapters over frozen INT4 weights train alone, leave the integers untouched,
are saved on their own tied to their base, and merge back into integers; layers can be frozen for continued QAT."""
import dataclasses
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from checkpoints.manager import CheckpointStore, build_metadata, param_count
from quant.config import QuantConfig
from quant.lora import LoraProvider, split_adapters, target_layers
from quant.lora_merge import merged_float_params
from quant.merge import merge_note, merge_workdir
from quant.plan import make_plan, plan_to_json
from quant.provider import make_matmul
from quant.serving import convert
from slm_jax import Transformer
from slm_jax.errors import UserError
from train.build import build_model
from train.config import FinetuneConfig, load_config
from train.data import load_splits
from train.finetune import with_frozen
from train.loop import run_training, train_batch
from train.sharding import batch_sharding, make_mesh
from train.lora_run import fingerprint, rank_note
from train.optim import make_optimizer
from train.recipe import make_recipe
from train.run import load_run, open_lora_base
from train.steps import cross_entropy, make_train_step, merge_variables
from train.tokenizer import ByteTokenizer

INT4 = QuantConfig(mode="serve", weight_bits=4, granularity="per_group", group_size=32)
quiet = dict(log=lambda *_: None)


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_serving_base(workdir, config, quant, seed=0):
    """An INT4 serving run of a freshly initialised tiny model, written as train.run writes converted runs."""
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    variables = convert(config.model, quant, nn.unbox(params))
    serving = dataclasses.replace(config, quant=quant)
    store = CheckpointStore(workdir / "checkpoints", keep=1, async_save=False)
    store.save(0, variables, build_metadata(serving.to_dict(), 0, variables, ByteTokenizer().describe(),
                                            kind="serving", quant_plan=plan_to_json(make_plan(config.model, quant))))
    store.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An INT4 serving base, 30 LoRA steps over it on a small text, and the adapters merged into a new INT4 model."""
    root = tmp_path_factory.mktemp("lora")
    target = root / "target.txt"
    target.write_text("".join(f"CLOWN{i % 5}:\nA merry jest, good sir, for {i} pence and a song of ale!\n\n"
                              for i in range(800)))

    def tiny(corpus, *overrides):
        return load_config("tiny", [f"data.path={corpus}", f"data.cache_dir={root / 'cache'}", "model.n_layers=1",
                                    "train.sample_tokens=0", "train.eval_every=1000", *overrides])

    save_serving_base(root / "base", tiny(target), INT4)
    lora_config = tiny(target, "finetune.method=lora", f"finetune.base={root / 'base'}", "finetune.lora_rank=4",
                       "finetune.lora_targets=attn/(q|v)|mlp|lm_head", "train.steps=30", "train.learning_rate=1e-2",
                       "checkpoint.every=30")
    summary = run_training(lora_config, root / "lora", **quiet)
    merged = merge_workdir(root / "lora", root / "merged", batches=2, batch_size=8, **quiet)
    return dataclasses.make_dataclass("Runs", ["root", "base", "lora", "config", "summary", "merged"])(
        root, root / "base", root / "lora", lora_config, summary, merged)


def fresh_lora(config, precision="fp32"):
    """(model, state) of fresh adapters over the base named by `config`, computing in `precision`."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    recipe = make_recipe(config)
    return recipe.config, recipe.model, jax.jit(recipe.initializer)().replace(frozen=recipe.base.variables)


def test_zero_initialised_adapters_reproduce_the_base_logits_exactly(runs):
    config, model, state = fresh_lora(runs.config, "bf16")  # the precision training runs in
    serving = build_model(dataclasses.replace(config, finetune=FinetuneConfig()))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, config.model.seq_len), 0, 256)
    with_adapters, _ = jax.jit(model.apply)(merge_variables(state.params, state.frozen), tokens)
    base, _ = jax.jit(serving.apply)(load_run(runs.base).variables, tokens)
    np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(base))


def test_lora_steps_leave_every_integer_weight_and_scale_bit_identical_fp16(runs):
    config, model, state = fresh_lora(runs.config, "fp16")
    adapters_before = leaves(state.params)
    step = jax.jit(make_train_step(model, make_optimizer(config.train), skip_nonfinite=True), donate_argnums=0)
    tokens, place = load_splits(config.data).train, batch_sharding(make_mesh(config.mesh))
    for i in range(4):
        state, metrics = step(state, train_batch(tokens, config, i, place))
        assert np.isfinite(float(metrics["loss"]))
    base = leaves(load_run(runs.base).variables)
    frozen = leaves(state.frozen)
    assert frozen.keys() == base.keys() and any("qrhs" in k for k in base)
    for key, value in base.items():
        assert frozen[key].dtype == value.dtype and frozen[key].tobytes() == value.tobytes(), key
    assert any(not np.array_equal(adapters_before[k], v) for k, v in leaves(state.params).items())


def test_only_adapters_train_and_only_they_are_checkpointed(runs):
    run = load_run(runs.lora)
    store = CheckpointStore(runs.lora / "checkpoints", create=False)
    arrays = store.arrays()
    store.close()
    saved = {a.path: a for a in arrays}
    trained = [p for p in saved if p.startswith(("params/", "opt_state/"))]
    assert trained and all("/lora/lora_" in p for p in trained if saved[p].shape)  # scalars: Adam's step count
    assert not any(p.startswith("frozen/") for p in saved)  # the base is never copied into the adapter checkpoint
    assert all(np.dtype(saved[p].dtype).kind == "f" for p in trained if saved[p].shape)
    n_adapter = sum(int(np.prod(a.shape)) for p, a in saved.items() if p.startswith("params/"))
    n_state = sum(int(np.prod(a.shape)) for p, a in saved.items() if p.startswith("opt_state/") and a.shape)
    assert n_state == 2 * n_adapter  # Adam's two moments, for the adapters only
    assert run.metadata["kind"] == "lora" and run.metadata["base"]["fingerprint"] == fingerprint(
        load_run(runs.base).variables)


def test_generate_samples_from_base_plus_adapters(runs, capsys):
    from train.generate import main as generate_main
    generate_main(["--workdir", str(runs.lora), "--prompt", "CLOWN1:", "--max-new-tokens", "40", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.startswith("CLOWN1:") and f"step 30 of {runs.lora}" in out


def test_lora_finetuning_lowers_the_target_validation_loss(runs):
    losses = runs.merged["val_loss"]  # base and base + adapters through the same evaluation code
    assert losses["base + adapters"] < losses["base"] - 0.5, losses


def test_a_lora_rank_reaching_a_target_layers_smaller_dimension_is_noted_at_start_with_the_largest_useful_rank(
        runs, tmp_path):
    """Rank 40 on d_model 32: every target's update is full rank (min(in, out) = 32), with more parameters than its
    layer. Allowed (PEFT allows it), but said once, before the LoRA line; rank 31 says nothing."""
    config = dataclasses.replace(runs.config, finetune=dataclasses.replace(runs.config.finetune, lora_rank=40))
    recipe, lines = make_recipe(config), []
    store = CheckpointStore(tmp_path / "checkpoints")
    recipe.initial_state(store, lines.append, recipe.shardings(make_mesh(config.mesh)))
    store.close()
    model_params = param_count(recipe.base.variables)
    assert lines[0] == (  # q, v: 32 x 32; gate, up: 32 x 96; down: 96 x 32; lm_head: 32 x 256
        f"note: finetune.lora_rank 40 is at least the smaller dimension of layer_0/attn/q (32 x 32) and 5 other "
        f"target layers, so an adapter there is a full-rank update with more parameters than its layer; the largest "
        f"useful rank here is 31 ({40 * (64 + 64 + 128 + 128 + 128 + 288):,} adapter parameters for a "
        f"{model_params:,}-parameter model)")
    assert lines[1].startswith("LoRA over") and len(lines) == 2
    assert rank_note(jax.eval_shape(recipe.initializer).params, 31, model_params) is None
    shape = jax.ShapeDtypeStruct
    gqa = {"layer_0": {"attn": {name: {"lora": {"lora_a": shape((32, 8), jnp.float32),
                                                "lora_b": shape((8, out), jnp.float32)}}
                                for name, out in (("q", 32), ("k", 8))}}}  # k: 2 kv heads of 4
    assert rank_note(gqa, 8, 1000) == (
        "note: finetune.lora_rank 8 is at least the smaller dimension of layer_0/attn/k (32 x 8), so an adapter there "
        "is a full-rank update with more parameters than its layer; the largest useful rank here is 7 (832 adapter "
        "parameters for a 1,000-parameter model)")


def test_adapters_refuse_a_base_they_were_not_trained_on(runs, tmp_path):
    other = load_run(runs.base)
    store = CheckpointStore(runs.base / "checkpoints", create=False)
    metadata = store.metadata()
    store.close()
    variables = jax.tree_util.tree_map(np.asarray, other.variables)
    variables["params"]["embed"]["embedding"] = variables["params"]["embed"]["embedding"] * 1.01
    writer = CheckpointStore(tmp_path / "other" / "checkpoints", async_save=False)
    writer.save(metadata["step"], variables, metadata)  # same shapes and step, other weights
    writer.close()
    with pytest.raises(UserError, match="trained on base .* use the base they were trained on"):
        load_run(runs.lora, base=tmp_path / "other")
    shutil.copytree(runs.lora, tmp_path / "resume")
    config = dataclasses.replace(runs.config, finetune=dataclasses.replace(
        runs.config.finetune, base=str(tmp_path / "other")), train=dataclasses.replace(runs.config.train, steps=40))
    with pytest.raises(UserError, match="trained on base"):
        run_training(config, tmp_path / "resume", **quiet)
    with pytest.raises(UserError, match="is a lora run; LoRA trains over a serving"):
        open_lora_base(runs.lora)


def test_a_moved_base_is_found_with_base_and_checked_by_its_fingerprint(runs, tmp_path, capsys):
    from checkpoints.hf_export import main as hf_export_main
    from quant.merge import main as merge_main
    from train.evaluate import main as evaluate_main
    from train.generate import main as generate_main
    base, moved, lora = tmp_path / "base", tmp_path / "moved_base", tmp_path / "lora"
    shutil.copytree(runs.base, base)
    config = dataclasses.replace(runs.config, finetune=dataclasses.replace(runs.config.finetune, base=str(base)),
                                 train=dataclasses.replace(runs.config.train, steps=4),
                                 checkpoint=dataclasses.replace(runs.config.checkpoint, every=4))
    run_training(config, lora, **quiet)
    adapted = load_run(lora).variables
    base.rename(moved)  # the base moves after the adapters were trained on it
    with pytest.raises(SystemExit):
        evaluate_main(["--workdir", str(lora), "--batches", "1"])
    err = capsys.readouterr().err
    assert f"cannot open the base model {base} (" in err and "give its new folder with --base" in err, err
    chex.assert_trees_all_equal(load_run(lora, base=moved).variables, adapted)  # the same model, read from there
    evaluate_main(["--workdir", str(lora), "--batches", "1", "--batch-size", "8", "--base", str(moved)])
    generate_main(["--workdir", str(lora), "--base", str(moved), "--max-new-tokens", "4", "--temperature", "0"])
    merge_main(["--workdir", str(lora), "--base", str(moved), "--out", str(tmp_path / "merged"), "--batches", "1",
                "--batch-size", "8"])
    hf_export_main(["--workdir", str(lora), "--base", str(moved), "--out", str(tmp_path / "hf")])
    assert (tmp_path / "merged" / "checkpoints").is_dir() and (tmp_path / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # another run at --base is refused by its fingerprint
        evaluate_main(["--workdir", str(lora), "--base", str(runs.root / "merged")])
    assert "use the base they were trained on" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a mistyped --base is refused, not silently unused
        evaluate_main(["--workdir", str(lora), "--base", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert f"argument --base: {tmp_path / 'nowhere'} does not exist" in err[0]


def test_merged_int4_model_stays_close_to_base_plus_adapters(runs):
    report = runs.merged
    merged, base = report["logits"]["merged_vs_adapted"], report["logits"]["base_vs_adapted"]
    assert merged["rel_err"] < 0.15 and merged["rel_err"] < base["rel_err"] / 2  # it keeps what the adapters learned
    assert report["val_loss"]["merged"] < report["val_loss"]["base"]
    assert all(row.weight_rel_err < 0.2 for row in report["rows"])
    run = load_run(runs.root / "merged")
    assert run.metadata["kind"] == "serving" and run.config.finetune.method == "none"


def test_merge_note_says_when_the_merged_run_lost_most_of_the_fine_tunes_gain():
    lost = merge_note({"base": 2.4443, "base + adapters": 2.4341, "merged": 2.4519})  # a tryout's INT4 merge
    assert lost.startswith("note: the merged run keeps 0% of the fine-tune's gain (0.0102 nats; merged 2.4519 "
                           "against base 2.4443)")
    assert "keeps 25% of the fine-tune's gain (0.2000 nats" in merge_note(
        {"base": 2.0, "base + adapters": 1.8, "merged": 1.95})
    assert merge_note({"base": 2.0, "base + adapters": 1.8, "merged": 1.9}) is None  # half kept
    assert merge_note({"base": 2.0, "base + adapters": 2.1, "merged": 2.2}) is None  # nothing gained to lose


class FloatKernels:
    """A MatmulProvider that computes every layer in float from its kernel param."""

    def keeps_float_kernel(self, path):
        return True

    def dot_general(self, path):
        return jax.lax.dot_general


def test_adapter_gradients_through_int4_layers_equal_those_of_the_dequantized_float_model(runs):
    base = load_run(runs.base)
    cfg, serving = base.config.model, base.variables
    dequantized, _, _ = merged_float_params(serving, alpha=1.0)  # no adapters yet: the int4 weights in float
    targets = target_layers(cfg, "attn/(q|v)|mlp/down")
    int4 = Transformer(cfg, matmul=LoraProvider(make_matmul(cfg, base.config.quant), targets, rank=4, alpha=8.0))
    dense = Transformer(cfg, matmul=LoraProvider(FloatKernels(), targets, rank=4, alpha=8.0))
    x, y = jax.random.randint(jax.random.PRNGKey(1), (2, 2, 16), 0, 256)
    shapes, _ = split_adapters(jax.eval_shape(int4.init, jax.random.PRNGKey(0), x)["params"])
    adapters = jax.tree_util.tree_map(lambda a: 0.1 * jax.random.normal(jax.random.PRNGKey(3), a.shape), shapes)

    def grads(model, frozen):
        loss = lambda ad: cross_entropy(model.apply(merge_variables(ad, frozen), x)[0], y)
        return jax.jit(jax.grad(loss))(adapters)

    chex.assert_trees_all_close(grads(int4, serving), grads(dense, {"params": dequantized}), rtol=1e-4, atol=1e-6)


def test_frozen_params_get_no_update_and_no_optimizer_state():
    params = {"embed": {"embedding": jnp.ones((4, 3))}, "layer_0": {"attn": {"q": {"kernel": jnp.ones((3, 3))}}},
              "layer_1": {"attn": {"q": {"kernel": jnp.ones((3, 3))}}}}
    tx = with_frozen(optax.adam(0.1), "embed|layer_0/")
    opt_state = tx.init(params)
    assert sum(x.size for x in jax.tree_util.tree_leaves(opt_state)) == 2 * 9 + 1  # mu, nu of layer_1; count
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), opt_state, params)
    assert not jnp.any(updates["embed"]["embedding"]) and not jnp.any(updates["layer_0"]["attn"]["q"]["kernel"])
    assert jnp.all(updates["layer_1"]["attn"]["q"]["kernel"] != 0)
    with pytest.raises(UserError, match="finetune.freeze 'nothing' matches no parameter"):
        with_frozen(optax.adam(0.1), "nothing").init(params)


@pytest.mark.parametrize("overrides, message", [
    (["finetune.method=lora"], "finetune.base must name the serving workdir"),
    (["finetune.method=adapters"], "finetune.method must be one of none, qat, lora"),
    (["finetune.method=lora", "finetune.base=b", "finetune.lora_rank=0"], "finetune.lora_rank must be a positive"),
    (["finetune.method=lora", "finetune.base=b", "finetune.lora_dropout=1"], "finetune.lora_dropout must be in"),
    (["finetune.lora_targets=attn/(q"], "finetune.lora_targets is not a valid regex"),
    (["finetune.method=lora", "finetune.base=b", "finetune.freeze=embed"], "finetune.freeze does not apply"),
    (["finetune.method=qat", "train.init_from=runs/x"], "quant.mode must be qat"),
    (["finetune.base=b"], "finetune.base is only read by finetune.method=lora"),
])
def test_bad_finetune_settings_are_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config("tiny", overrides)
