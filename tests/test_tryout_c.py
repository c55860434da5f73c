"""Found in a new user's tryout (c): `--set` values that training would drop without a word (a model field that
train.init_from or a LoRA base decides, a LoRA base's quant field, a quantization setting of a float run) are
refused in one line, and the checks before training (memory, CPU device split) measure the model that trains;
a ggml QAT run exported to GGUF as another quantized type holds that type."""
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType

import train.main as train_main_module
from checkpoints.gguf_export import export_workdir
from checkpoints.inspect import main as inspect_main
from quant.config import QuantConfig
from train.main import main as train_main
from train.ptq import convert_workdir
from train.run import load_run

TINY = ("model.n_layers=1", "train.sample_tokens=0", "train.eval_every=1000", "train.steps=4", "checkpoint.every=4")


def sets(*overrides):
    return [arg for text in overrides for arg in ("--set", text)]


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def trained(tiny_run, tmp_path):
    """A tiny float run (d_model 32, 1 layer) and an INT4 serving copy of it, and the --set that read its data."""
    run = tiny_run(tmp_path / "float", *TINY)
    convert_workdir(run.workdir, tmp_path / "int4", QuantConfig(mode="serve", weight_bits=4,
                                                                 granularity="per_group"), log=lambda _: None)
    return run, tmp_path / "int4", (f"data.path={run.corpus}", f"data.cache_dir={run.cache}")


@pytest.mark.parametrize("source, override, shown", [
    ("init_from", "model.d_model=64", "model section comes from train.init_from={path}, which has model.d_model=32"),
    ("lora", "model.n_layers=3", "model section comes from finetune.base={path}, which has model.n_layers=1"),
    ("lora", "quant.weight_bits=8", "quant section comes from finetune.base={path}, which has quant.weight_bits=4"),
])
def test_a_set_that_the_source_run_decides_is_refused_not_dropped(trained, tmp_path, capsys, source, override,
                                                                   shown):
    run, base, data = trained
    path = run.workdir if source == "init_from" else base
    start = (f"train.init_from={path}",) if source == "init_from" else ("finetune.method=lora", f"finetune.base={path}")
    out = tmp_path / "new"
    err = refused(capsys, ["--config", "tiny", *sets(*data, *start, override), "--workdir", str(out)])
    assert err.startswith(f"error: --set {override}: this run's ") and shown.format(path=path) in err, err
    assert not out.exists()


def test_quantization_settings_of_a_float_run_are_refused(tmp_path, capsys):
    out = tmp_path / "new"
    err = refused(capsys, ["--config", "tiny", *sets("quant.weight_bits=4", "quant.act_bits=8"),
                           "--workdir", str(out)])
    assert err.startswith("error: --set quant.weight_bits: quant.mode is none (float training), which quantizes "
                          "nothing; add --set quant.mode=qat"), err
    assert not out.exists()


@pytest.fixture
def no_training(monkeypatch):
    """train.main's pre-flight as it is, training replaced by a record of its config; split_cpu_host records the
    step FLOPs it was given."""
    seen = {}
    monkeypatch.setattr(train_main_module, "run_training", lambda config, workdir, **_: seen.update(config=config))
    split = train_main_module.split_cpu_host

    def record_split(mesh, batch_size, flops=None):
        seen["flops"] = flops
        return split(mesh, batch_size, flops=flops)
    monkeypatch.setattr(train_main_module, "split_cpu_host", record_split)
    return seen


def test_pre_flight_checks_measure_the_model_that_trains_not_the_configs(trained, tmp_path, no_training):
    # A config whose own model would need petabytes, starting from a 1-layer d_model-32 run: the model that trains
    # is the run's (train.init_from decides the shape), so neither the memory check nor the CPU split reads 2e6.
    run, _, data = trained
    config = tmp_path / "huge.yaml"
    config.write_text(f"inherit: tiny\nmodel:\n  d_model: 2000000\ntrain:\n  init_from: {run.workdir}\n")
    train_main(["--config", str(config), *sets(*data, "train.batch_size=8"), "--workdir", str(tmp_path / "new")])
    assert no_training["config"].model.d_model == 2000000  # the recipe, not train.main, takes the run's shape
    small = 6.0 * 8 * 32 * (1 * (4 * 32 * 32 + 3 * 32 * 96) + 256 * 32)  # tiny's window 32, untied head
    assert no_training["flops"] == pytest.approx(small, rel=0.05)


def test_sets_that_a_float_run_or_the_source_run_uses_are_accepted(trained, tmp_path, no_training):
    run, _, data = trained
    train_main(["--config", "tiny", *sets(*data, f"train.init_from={run.workdir}", "model.d_model=32",
                                          "model.seq_len=16", "quant.kv_bits=8", "quant.weight_bits=8"),
                "--workdir", str(tmp_path / "new")])
    assert no_training["config"].model.seq_len == 16 and no_training["config"].quant.kv_bits == 8
    assert Path(tmp_path / "new").is_dir()


def test_a_ggml_qat_run_exported_as_another_quantized_type_holds_that_type(tiny_run, tmp_path):
    # A Q4_0 QAT run asked for --type q8_0 wrote Q4_0 blocks under a q8_0 file type (and said q8_0): every quantized
    # matrix must be the type asked for, gguf's own quantization of the trained weights; the default stays Q4_0.
    run = tiny_run(tmp_path / "qat", *TINY, "quant.mode=qat", "quant.scheme=ggml_q4_0")
    params = load_run(run.workdir).variables["params"]
    files = {kind: export_workdir(run.workdir, tmp_path / f"{kind}.gguf", kind, log=lambda *_: None)
             for kind in ("q8_0", None)}
    for kind, want in (("q8_0", GGMLType.Q8_0), (None, GGMLType.Q4_0)):
        reader = gguf.GGUFReader(files[kind])
        assert reader.fields["general.file_type"].contents() == {GGMLType.Q8_0: 7, GGMLType.Q4_0: 2}[want]
        tensors = {t.name: t for t in reader.tensors}
        for name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight", "output.weight"):
            assert tensors[name].tensor_type == want, (kind, name, tensors[name].tensor_type)
        kernel = np.asarray(params["layer_0"]["attn"]["v"]["kernel"], np.float32).T
        assert np.array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data).ravel(),
                              gguf.quants.quantize(kernel, want).ravel())


def test_inspect_says_a_file_is_a_file_and_a_missing_path_is_missing(tmp_path, capsys):
    # It said '<file> does not exist or is not a folder' of a .gguf file that exists.
    exported = tmp_path / "model.gguf"
    exported.write_bytes(b"GGUF")
    for path, line in ((exported, f"error: {exported} is a file, not a run folder (give a workdir, its checkpoints/ "
                                  f"folder or one step folder in it)\n"),
                       (tmp_path / "missing", f"error: {tmp_path / 'missing'} does not exist\n")):
        with pytest.raises(SystemExit) as exit_info:
            inspect_main([str(path)])
        assert exit_info.value.code == 2 and capsys.readouterr().err == line
