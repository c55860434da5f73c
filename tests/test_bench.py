"""`python -m train.bench --micro` runs every section end to end and writes well-formed results (no timing asserts)."""
import importlib.util
import json
import math

import pytest

from train.bench.common import device_name
from train.bench.main import main as bench_main
from train.bench.report import write_report
from train.bench.trust import busy_warning

SECTIONS = {"matmul": ("dtype", "gflops"), "throughput": ("variant", "ms_per_step", "tokens_per_s", "mfu"),
            "quality": ("name", "loss", "perplexity", "bits_per_char", "command"),
            "serving": ("name", "checkpoint_bytes", "made_by"), "finetune": ("name", "label", "loss")}


def numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def reject_constant(name):
    raise ValueError(f"results.json holds {name}")


def test_micro_bench_writes_results_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, started outside the repository (the children run inside it)
    bench_main(["--micro", "--out", "bench"])
    tmp_path = tmp_path / "bench"

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=reject_constant)
    assert results["profile"] == "micro" and results["command"].startswith("python -m train.bench --micro")
    assert results["machine"]["name"] == device_name()
    for section, keys in SECTIONS.items():
        assert results[section]["rows"], section
        for row in results[section]["rows"]:
            assert all(key in row for key in keys), (section, row)
    assert all(math.isfinite(x) for x in numbers(results))
    speeds = [s for row in results["serving"]["rows"] for s in row.get("speed", [])]
    assert speeds and all(s["decode_tokens_per_s"] is None or s["decode_tokens_per_s"] > 0 for s in speeds)
    assert {s["kv_bits"] for s in speeds} == {None, 8}
    assert any(row.get("peak_rss_bytes") for row in results["serving"]["rows"])
    assert {row["kind"] for row in results["quality"]["rows"]} >= {"trained", "ptq"}

    report = (tmp_path / "results.md").read_text()
    for section in SECTIONS:  # the load around every section, and the busy verdict said in results.md iff found
        load, busy = results[section]["load"], results[section]["busy"]
        assert set(load) == {"load_before", "load_after", "own_cpu", "others_cpu", "others_load"} and isinstance(busy, list)
        assert f"before / after: {load['load_before']} /" in report
        if busy:
            assert busy_warning(busy) in report
    any_busy = any(results[s]["busy"] for s in SECTIONS)
    assert ("UNRELIABLE: the machine was busy (or its host noisy)" in report) == any_busy
    assert ("BUSY MACHINE" in report) == any_busy
    for row in results["matmul"]["rows"]:
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
    for row in results["throughput"]["rows"]:
        assert row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"]
    assert {"micro fp32 step", "matmul float32"} <= set(results["throughput"]["spreads"]) | set(
        results["matmul"]["spreads"])
    (floor,) = results["throughput"]["floors"]  # the step's matmuls alone, for the profile's one speed size
    fp32 = next(r for r in results["throughput"]["rows"] if r["size"] == "micro" and r["variant"] == "fp32")
    assert floor["size"] == "micro" and floor["model_flops"] == fp32["flops_per_token"] * 4 * 16
    assert floor["mfu_ceiling"] * results["throughput"]["peak_gflops"] * 1e9 * floor["median_s"] == pytest.approx(
        floor["model_flops"])
    assert floor["share"]["fp32"] == pytest.approx(1000 * floor["median_s"] / fp32["ms_per_step"])
    assert "micro matmul floor" in results["throughput"]["spreads"]
    real = {row["variant"]: row for row in results["throughput"]["rows"] if row["size"] == "micro tied"}
    assert list(real) == ["fp32", "int4_w4", "int4_lora"]  # the profile's real-sized slot, timed after its sizes
    assert real["int4_lora"]["frozen_params"] > 0 and real["fp32"]["frozen_params"] == 0
    assert real["int4_lora"]["params"] < real["fp32"]["params"] / 5  # adapters only
    assert real["int4_lora"]["flops_per_token"] == real["fp32"]["flops_per_token"]
    assert real["int4_lora"]["vs_fp32"] == real["int4_lora"]["ms_per_step"] / real["fp32"]["ms_per_step"]
    assert "micro tied int4_lora step" in results["throughput"]["spreads"]
    assert all(s["generate_spread"]["n"] == 1 for s in speeds) and "decode tok/s b=1 (all 1 seqs" in report
    torch_section = results["torch"]  # the PyTorch reference: measured with torch installed, else one skip line
    if torch_section.get("skipped"):
        assert not torch_section["rows"] and "torch is not installed" in torch_section["skipped"]
        assert f"## 2b. PyTorch eager reference ({device_name()})" in report and torch_section["skipped"] in report
    else:
        assert [row["precision"] for row in torch_section["rows"]] == ["fp32"] and "## 2b. PyTorch eager" in report
        assert all(row["jax_ms"] > 0 and row["torch_ms"] > 0 for row in torch_section["rows"])
    tuned = {row["name"]: row for row in results["finetune"]["rows"]}
    assert {"float_ft", "int4_lora"} <= set(tuned)  # micro runs two of the five methods
    assert all("error" not in row for row in tuned.values()), tuned
    assert tuned["int4_lora"]["trainable_params"] < tuned["float_ft"]["trainable_params"] / 5
    assert tuned["int4_lora"]["frozen_bytes"] > 0 and tuned["float_ft"]["frozen_bytes"] == 0
    for name in ("float_ft", "int4_lora"):  # fine-tune step times carry their spread into the busy rule
        row = tuned[name]
        assert row["ms_per_step_min"] <= row["ms_per_step"] <= row["ms_per_step_max"]
        assert results["finetune"]["spreads"][f"finetune {name} step"]["median"] == row["ms_per_step"] / 1000
    assert "Matmul floor: every matmul of one step's forward and backward pass" in report
    assert f"| micro | {floor['matmuls']} |" in report
    for heading in ("## 1. Matmul peak", "## 2. Training throughput", "## 3. Quality", "## 4. Serving",
                    "## 5. Fine-tuning"):
        assert heading in report
    for plot in ("throughput.png", "loss_curves.png", "quality.png", "serving.png", "finetune.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in report

    # without matplotlib (the `bench` extra) the same results give the tables and a line saying the plots were skipped
    bare = tmp_path / "bare"
    bare.mkdir()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    write_report(results, bare)
    text = (bare / "results.md").read_text()
    assert "## 4. Serving" in text and "Plots skipped: matplotlib is not installed" in text
    assert ".png" not in text and not list(bare.glob("*.png"))
