"""`python -m checkpoints.gguf_export` on real tiny runs, read back with gguf's own reader and dequantizer: served
Q8_0/Q4_0 weights bit for bit, metadata, a BPE run's vocabulary and merges, the rotary row permutation against an
adjacent-pair RoPE, refusals. Where llama-cpp-python is importable (extra coverage): llama.cpp's tokenization and
logits of the exported files against slm-jax's."""
import json
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType

from checkpoints import gguf as gguf_export_lib
from checkpoints.gguf_export import main as export_main
from checkpoints.gguf_reference import main as reference_main
from checkpoints.gguf_vocab import bpe_vocab, byte_symbols
from tokenizers import Tokenizer, models, pre_tokenizers
from quant.config import QuantConfig
from quant.serving import dequantize, quantized_weights
from slm_jax.layers import apply_rope
from train.config import load_config
from train import memory_check
from train.loop import run_training
from train.ptq import convert_workdir
from train.run import load_run

TINY = ("train.steps=8", "train.sample_tokens=0", "train.eval_every=1000", "checkpoint.every=8", "model.n_layers=1",
        "model.n_kv_heads=1")
MATRICES = {"attn_q": ("attn", "q"), "attn_k": ("attn", "k"), "attn_v": ("attn", "v"), "attn_output": ("attn", "o"),
            "ffn_gate": ("mlp", "gate"), "ffn_up": ("mlp", "up"), "ffn_down": ("mlp", "down")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("gguf")
    trained = tiny_run(root / "float", *TINY, lines=400)
    common = (*TINY, f"data.path={trained.corpus}", f"data.cache_dir={trained.cache}")
    quiet = dict(log=lambda *_: None)
    run_training(load_config("tiny", (*common, "quant.mode=qat", "quant.scheme=ggml_q4_0", "train.steps=4",
                                      "checkpoint.every=4", f"train.init_from={root / 'float'}",
                                      "quant.rules=[{match: lm_head, weight_bits: null}]")), root / "qat", **quiet)
    for scheme in ("ggml_q8_0", "ggml_q4_0"):
        convert_workdir(root / "float", root / scheme, QuantConfig(mode="serve", scheme=scheme), **quiet)
    convert_workdir(root / "float", root / "aqt_int8", QuantConfig(mode="serve", weight_bits=8), **quiet)
    run_training(load_config("tiny", (*common, "data.tokenizer=bpe", "data.vocab_size=300", "model.vocab_size=320")),
                 root / "bpe", **quiet)  # embedding rows beyond the tokenizer's ids: padded in the GGUF vocabulary
    return root


def export(workdir, out, *extra):
    export_main(["--workdir", str(workdir), "--out", str(out), *extra])
    return {t.name: t for t in gguf.GGUFReader(out).tensors}


def matrix(tensor) -> np.ndarray:
    """A GGUF matrix as float32 [rows, cols], dequantized by gguf.quants."""
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(tensor.shape[::-1])


def bits_of(x) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("scheme, ggml_type", [("ggml_q8_0", GGMLType.Q8_0), ("ggml_q4_0", GGMLType.Q4_0)])
def test_serving_run_file_holds_the_served_weights_bit_for_bit(runs, tmp_path, scheme, ggml_type):
    tensors = export(runs / scheme, tmp_path / "model.gguf")
    run = load_run(runs / scheme)
    cfg, stored = run.config.model, quantized_weights(run.variables["aqt"])
    assert tensors["token_embd.weight"].tensor_type == GGMLType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLType.F32
    for path, name in [(("lm_head",), "output.weight")] + [
            (("layer_0", *sub), f"blk.0.{short}.weight") for short, sub in MATRICES.items()]:
        assert tensors[name].tensor_type == ggml_type, name
        served = dequantize(stored[path]["value"], stored[path]["scale"]).T  # [out, in]
        rows = {"attn_q": cfg.n_heads, "attn_k": cfg.kv_heads}.get(name.split(".")[-2])
        if rows is not None:
            served = served[gguf_export_lib.rotary_rows(rows, cfg.head_dim)]
        np.testing.assert_array_equal(bits_of(matrix(tensors[name])), bits_of(served), err_msg=name)


def test_metadata_round_trips(runs, tmp_path):
    export(runs / "float", tmp_path / "new" / "folders" / "model.gguf", "--type", "f32")  # made, as hf_export does
    reader = gguf.GGUFReader(tmp_path / "new" / "folders" / "model.gguf")
    value = lambda key: reader.fields[key].contents()
    cfg = load_run(runs / "float").config.model
    assert value("general.architecture") == "llama"
    assert value("llama.context_length") == cfg.seq_len and value("llama.embedding_length") == cfg.d_model
    assert value("llama.block_count") == 1 and value("llama.feed_forward_length") == cfg.hidden
    assert value("llama.attention.head_count") == 2 and value("llama.attention.head_count_kv") == 1
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert value("llama.rope.freq_base") == cfg.rope_theta and value("llama.rope.dimension_count") == cfg.head_dim
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.tokens") == byte_symbols()
    assert len(value("tokenizer.ggml.merges")) == 1
    symbols = byte_symbols()
    assert symbols[ord("A")] == "A" and symbols[ord(" ")] == "Ġ" and symbols[ord("\n")] == "Ċ"  # GPT-2's own symbols
    tensors = {t.name: t for t in reader.tensors}
    params = load_run(runs / "float").variables["params"]
    np.testing.assert_array_equal(matrix(tensors["token_embd.weight"]), np.asarray(params["embed"]["embedding"]))
    np.testing.assert_array_equal(matrix(tensors["blk.0.ffn_down.weight"]),
                                  np.asarray(params["layer_0"]["mlp"]["down"]["kernel"]).T)


def test_bpe_run_exports_its_tokenizer_json_vocabulary_and_merges(runs, tmp_path):
    export(runs / "bpe", tmp_path / "model.gguf", "--type", "f32")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    value = lambda key: reader.fields[key].contents()
    model = json.loads((runs / "bpe" / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab, merges = model["vocab"], [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 320 and len(vocab) == load_run(runs / "bpe").tokenizer.vocab_size < 320
    assert tokens[:len(vocab)] == sorted(vocab, key=vocab.get) and value("tokenizer.ggml.merges") == merges
    assert len(merges) == len(vocab) - 256 > 0  # one merge per token beyond the byte alphabet
    types = value("tokenizer.ggml.token_type")
    assert set(types[:len(vocab)]) == {gguf.TokenType.NORMAL} and set(types[len(vocab):]) == {gguf.TokenType.UNUSED}
    assert value("tokenizer.ggml.pre") == "gpt-2"


@pytest.mark.parametrize("pre_tokenizer", [{"type": "Whitespace"},
                                           {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True},
                                           {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}])
def test_tokenizer_json_llama_cpp_would_split_differently_is_refused(pre_tokenizer):
    tokenizer = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": pre_tokenizer}
    with pytest.raises(gguf_export_lib.UserError, match="split text as GPT-2 does"):
        bpe_vocab(tokenizer)


# llama.cpp's SMOLLM pre-tokenizer (llama-vocab.cpp): "\p{N}" pieces, then GPT-2's regex on every piece; on ASCII
# text \p{L} and \p{N} are [A-Za-z] and [0-9], which Python's re writes as below
GPT2_ASCII = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def llama_cpp_smollm_pieces(text: str) -> list[tuple[int, int]]:
    """(start, end) of each piece llama.cpp's SMOLLM pre-tokenizer cuts ASCII `text` into: every digit alone, the
    text between digits as it is; then each of those cut by GPT-2's regex."""
    cuts = [(m.start(), m.end()) for m in re.finditer(r"[0-9]", text)]
    first, position = [], 0
    for start, end in cuts:
        first += [(position, start)] if start > position else []
        first.append((start, end))
        position = end
    first += [(position, len(text))] if position < len(text) else []
    return [(start + m.start(), start + m.end()) for start, end in first
            for m in GPT2_ASCII.finditer(text[start:end])]


def test_smollm2_pre_tokenizer_exports_as_llama_cpps_smollm_and_splits_text_as_it_does():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer_json = json.loads(tokenizer.to_str())
    tokenizer_json["model"].update(vocab={"a": 0}, merges=[])
    assert bpe_vocab(tokenizer_json).pre == "smollm"
    text = "In 2024, 15 apples cost $3.50 each.\n\nWe'll see   x 7b"
    pieces = [offsets for _, offsets in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == llama_cpp_smollm_pieces(text)
    assert [text[a:b] for a, b in pieces][:6] == ["In", " ", "2", "0", "2", "4"]  # each digit alone, as SmolLM2
    for refused in ([pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)],
                    [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Digits(individual_digits=True)],
                    [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=True)]):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(refused)
        with pytest.raises(gguf_export_lib.UserError, match="llama.cpp would split it differently"):
            bpe_vocab({**json.loads(tokenizer.to_str()), "model": tokenizer_json["model"]})


def test_permuted_q_rows_under_adjacent_pair_rope_give_slm_jax_rotary_output(runs, tmp_path):
    """llama.cpp's `llama` rotates pairs (2i, 2i+1) by pos * base^(-2i/d); on the exported rows that must equal
    slm-jax's split-half rotation of the original q, row for row (an independent numpy reference of llama.cpp)."""
    tensors = export(runs / "float", tmp_path / "model.gguf", "--type", "f32")
    cfg = load_run(runs / "float").config.model
    kernel = np.asarray(load_run(runs / "float").variables["params"]["layer_0"]["attn"]["q"]["kernel"])
    x = np.random.default_rng(0).normal(size=(1, 5, cfg.d_model)).astype(np.float32)
    positions = np.arange(5)
    ours = np.asarray(apply_rope(jnp.asarray((x @ kernel).reshape(1, 5, cfg.n_heads, cfg.head_dim)),
                                 jnp.asarray(positions)[None], cfg.rope_theta))
    q = (x @ matrix(tensors["blk.0.attn_q.weight"]).T).reshape(1, 5, cfg.n_heads, cfg.head_dim // 2, 2)
    angle = positions[:, None] * cfg.rope_theta ** (-2 * np.arange(cfg.head_dim // 2) / cfg.head_dim)
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
    theirs = np.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 0] * sin + q[..., 1] * cos], axis=-1)
    rows = gguf_export_lib.rotary_rows(cfg.n_heads, cfg.head_dim)
    np.testing.assert_allclose(theirs.reshape(1, 5, -1), ours.reshape(1, 5, -1)[..., rows], rtol=1e-5, atol=1e-5)


def test_qat_run_quantizes_with_gguf_and_keeps_rule_layers_float(runs, tmp_path):
    tensors = export(runs / "qat", tmp_path / "model.gguf")
    params = load_run(runs / "qat").variables["params"]
    assert tensors["output.weight"].tensor_type == GGMLType.F16  # the run's rule kept the LM head float
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.ffn_up.weight"].data), gguf.quants.quantize(
        np.asarray(params["layer_0"]["mlp"]["up"]["kernel"]).T, GGMLType.Q4_0))


@pytest.mark.parametrize("run, extra, message", [
    ("aqt_int8", (), "AQT int8 per_channel weights, which have no ggml type"),
    ("ggml_q4_0", ("--type", "q8_0"), "is written as q4_0"),
    ("float", ("--type", "q5_1"), "--type must be one of"),
])
def test_refusals_are_one_line_and_leave_no_file(runs, tmp_path, capsys, run, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--workdir", str(runs / run), "--out", str(tmp_path / "model.gguf"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_unmerged_lora_run_is_refused():
    with pytest.raises(gguf_export_lib.UserError, match="merge them first"):
        gguf_export_lib.check_kind("lora")


def test_failed_write_leaves_no_partial_file(runs, tmp_path, monkeypatch, capsys):
    def fail(self, **_):
        raise OSError(28, "No space left on device")

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(SystemExit) as exited:
        export_main(["--workdir", str(runs / "float"), "--out", str(out / "model.gguf")])
    assert exited.value.code == 2 and list(out.iterdir()) == []  # one line (main_guard's OSError), no partial file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]


def test_reference_is_written_to_a_new_npz_file_and_never_overwrites_one(runs, tmp_path, capsys):
    out = tmp_path / "ref.npz"
    args = ["--workdir", str(runs / "float"), "--out", str(out), "--windows", "2", "--new-tokens", "2"]
    reference_main(args)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left beside it
    with np.load(out) as ref:
        assert ref["logits"].shape[0] == 2 and np.isfinite(ref["logits"]).all()
    before = out.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        reference_main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "already exists" in err and err.count("\n") == 1
    assert out.read_bytes() == before


def test_reference_says_when_the_split_holds_fewer_windows_and_refuses_logits_beyond_memory(runs, tmp_path, capsys,
                                                                                          monkeypatch):
    out = tmp_path / "ref.npz"
    reference_main(["--workdir", str(runs / "float"), "--out", str(out), "--windows", "100000", "--new-tokens", "2"])
    with np.load(out) as ref:
        found, seq_len = ref["inputs"].shape
    said = capsys.readouterr().out
    assert 0 < found < 100000 and (f"[--windows 100000: the validation split holds {found} windows of {seq_len} "
                                   f"tokens; all are used]") in said
    monkeypatch.setattr(memory_check, "physical_memory", lambda: 1000)  # bytes: no reference logits fit
    with pytest.raises(SystemExit) as exited:
        reference_main(["--workdir", str(runs / "float"), "--out", str(tmp_path / "big.npz"), "--windows", "3"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: the reference logits of 3 windows x {seq_len} tokens x ") and "GB of memory" in err
    assert not (tmp_path / "big.npz").exists()


@pytest.mark.parametrize("name", ["ref.txt", "folder"])
def test_reference_out_that_is_not_an_npz_file_is_refused_before_any_work(runs, tmp_path, capsys, name):
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit) as exited:  # numpy would write ref.txt.npz, or folder.npz beside the folder
        reference_main(["--workdir", str(runs / "float"), "--out", str(tmp_path / name), "--windows", "2"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--out must name a .npz file" in err and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["folder"] and not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("run", ["float", "bpe"])
def test_llama_cpp_tokenizes_and_computes_as_slm_jax(runs, tmp_path, run):
    """Extra coverage where llama-cpp-python is importable: the exported F32 file in llama.cpp turns text into the
    run's own token ids and gives slm-jax's logits (float32 both sides; llama.cpp sums in another order)."""
    pytest.importorskip("llama_cpp")
    from checkpoints.gguf_check import load  # needs llama_cpp, so only past the skip

    export(runs / run, tmp_path / "model.gguf", "--type", "f32")
    loaded = load_run(runs / run)
    text = "SPEAKER3:\nThe quick brown fox 17 jumps over the lazy dog. Ünïcode, tabs\tand  spaces.\n"
    ids = [int(i) for i in loaded.tokenizer.encode(text)]
    llm = load(tmp_path / "model.gguf", n_ctx=loaded.config.model.seq_len, threads=1, repack=False)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
    window = np.asarray(ids[:loaded.config.model.seq_len], np.int32)
    ours = np.asarray(jax.jit(loaded.model.apply)(loaded.variables, window[None])[0][0], np.float32)
    llm.eval([int(t) for t in window])
    theirs = np.array(llm.scores[:len(window)], np.float32)
    np.testing.assert_allclose(theirs, ours, atol=2e-3)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_head_width_and_llama3_rope_scaling_are_written_as_llama_cpp_reads_them(tmp_path):
    import flax.linen as nn
    from slm_jax import ModelConfig, Transformer
    from slm_jax.config import RopeScaling
    from checkpoints.gguf_vocab import byte_vocab
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    cfg = ModelConfig(vocab_size=256, seq_len=16, max_context=512, n_layers=1, n_heads=2, n_kv_heads=1, d_model=32,
                      head_size=24, rope_theta=500000.0, rope_scaling=scaling)
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32)))["params"]
    tensors = gguf_export_lib.gguf_tensors(cfg, QuantConfig(), {"params": params}, "train", "f32")
    gguf_export_lib.write_gguf(tmp_path / "m.gguf", cfg, tensors, byte_vocab(), "f32", "probe")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    value = lambda key: reader.fields[key].contents()
    assert value("llama.context_length") == 512
    assert value("llama.attention.key_length") == 24 and value("llama.attention.value_length") == 24
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, 24, 2) / 24)  # float64 reference of Llama 3.1's scaling
    wavelen = 2 * np.pi / inv_freq
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < 64 / 4.0, 1.0, np.where(wavelen > 64 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    np.testing.assert_allclose(factors, expected, rtol=1e-5)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
