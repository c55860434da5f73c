"""Bench output: Markdown tables (to `results.md` and stdout) and PNG plots, made from `results.json` alone."""
from __future__ import annotations

import importlib.util

from pathlib import Path

from train.bench.trust import busy_warning

PLOTS = ("throughput.png", "loss_curves.png", "quality.png", "serving.png", "finetune.png")


def fmt(value, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None:
        return "—"
    return format(value * scale if scale != 1.0 else value, spec)


def timing_ratio(section: dict, value, spec: str = ".2f", scale: float = 1.0) -> str:
    """A timing ratio as a cell, marked "?" when the section ran on a busy machine (`train.bench.trust`)."""
    return fmt(value, spec, scale) + ("?" if section.get("busy") and value is not None else "")


def span(low, high, spec: str) -> str:
    """The spread of a timed figure's repeats as a cell: "low..high"."""
    return "—" if low is None or high is None else f"{format(low, spec)}..{format(high, spec)}"


def code(text) -> str:
    return f"`{text}`" if text else ""


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; a header starting with '>' is a right-aligned (numeric) column."""
    align = ["---:" if h.startswith(">") else "---" for h in headers]
    lines = ["| " + " | ".join(h.lstrip(">") for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def matmul_markdown(section: dict, device: str) -> str:
    rows = [[r["dtype"], str(r["n"]), fmt(r["gflops"], ".1f"), span(r.get("worst_gflops"), r["best_gflops"], ".1f"),
             fmt(r["median_s"], ".4f"), span(r.get("min_s"), r.get("max_s"), ".4f"), fmt(r["first_call_s"], ".2f")]
            for r in section["rows"]]
    return (f"## 1. Matmul peak ({device})\n\n{section['how']}.\n\n"
            + table(["dtype", ">n", ">GFLOP/s (median)", ">GFLOP/s worst..best", ">median s", ">min..max s",
                     ">first call s"], rows))


def throughput_markdown(section: dict, device: str) -> str:
    sizes = {}
    for r in section["rows"]:
        sizes.setdefault(r["size"], r)
    size_lines = "\n".join(f"- **{name}**: batch {r['batch_size']} x seq_len {r['seq_len']}, {r['params']:,} params "
                           f"({r['matmul_params']:,} in matmuls), {r['flops_per_token']:,} FLOPs/token"
                           for name, r in sizes.items())
    rows = [[r["size"], r["label"], code(r["config"]), " ".join(code(o) for o in r["variant_overrides"]),
             fmt(r.get("devices", 1), "d"), fmt(r["first_call_s"], ".1f"), fmt(r["ms_per_step"], ".1f"),
             span(r["ms_per_step_min"], r.get("ms_per_step_max"), ".1f"), fmt(r["tokens_per_s"], ",.0f"),
             timing_ratio(section, r["mfu"], ".1f", 100), timing_ratio(section, r.get("vs_bf16")),
             timing_ratio(section, r.get("vs_fp32"))]
            for r in section["rows"]]
    overrides = "; ".join(f"{name}: {' '.join(code(o) for o in r['size_overrides']) or 'none'}"
                          for name, r in sizes.items())
    return (f"## 2. Training throughput ({device})\n\n{section['how']}. Peak: {section['peak_gflops']:.1f} GFLOP/s "
            f"(float32, section 1).\n\nModel FLOPs: {section['flops_formula']}\n\n{size_lines}\n\nEach size's "
            f"overrides come first, then the variant's ({overrides}).\n\n"
            + table(["size", "variant", "config", "overrides", ">devices", ">first call s", ">ms/step (median)",
                     ">ms/step min..max", ">tokens/s", ">MFU %",
                     ">x bf16 time", ">x fp32 time"], rows) + floor_markdown(section))


def floor_markdown(section: dict) -> str:
    """The matmul floor of each size (train.bench.floor), or nothing for results without one."""
    floors = section.get("floors")
    if not floors:
        return ""
    rows = [[f["size"], fmt(f["matmuls"], "d"), fmt(f["flops"] / 1e9, ".2f"), fmt(1000 * f["median_s"], ".1f"),
             span(1000 * f["min_s"], 1000 * f["max_s"], ".1f"), fmt(f["gflops"], ".0f"),
             timing_ratio(section, f["mfu_ceiling"], ".1f", 100),
             ", ".join(f"{name} {timing_ratio(section, share, '.0f', 100)}%" for name, share in f["share"].items())]
            for f in floors]
    return ("\n\nMatmul floor: every matmul of one step's forward and backward pass at its own shape (weights x 3 over "
            "the batch's tokens, attention x 6 per layer), float32, alone in one jit on one device with the whole "
            "batch (`train.bench.floor`), timed as often as a variant's steps. MFU ceiling = model FLOPs / "
            "that time / peak: the MFU a step would reach if everything but its matmuls were free; share = that "
            "time / the variant's step time.\n\n"
            + table(["size", ">matmuls", ">GFLOP", ">ms (median)", ">min..max ms", ">GFLOP/s", ">MFU ceiling %",
                     "share of each variant's step"], rows))


def torch_markdown(section: dict, device: str) -> str:
    heading = f"## 2b. PyTorch eager reference ({device})"
    if section.get("skipped"):
        return f"{heading}\n\n{section['skipped']}."
    rows = [[r["precision"], fmt(r.get("devices", 1), "d"), fmt(r["jax_ms"], ".1f"),
             span(r["jax_ms_min"], r["jax_ms_max"], ".1f"), fmt(r.get("jax_1dev_ms"), ".1f"),
             fmt(r["torch_ms"], ".1f"), span(r["torch_ms_min"], r["torch_ms_max"], ".1f"),
             timing_ratio(section, r["ratio"]), timing_ratio(section, r.get("ratio_1dev"))] for r in section["rows"]]
    size = " ".join(code(o) for o in section["overrides"])
    return (f"{heading}\n\nslm-jax's training step (`baseline` config with {size}) against a PyTorch eager model "
            f"of the same architecture (`train.bench.torch_model`: RMSNorm, RoPE, SwiGLU, AdamW with clipping), torch "
            f"{section['torch']} on {section['torch_threads']} threads. {section['how']}.\n\n"
            + table(["precision", ">devices", ">slm-jax ms/step", ">min..max", ">on 1 device", ">torch ms/step",
                     ">min..max", ">slm-jax / torch", ">1 device / torch"], rows))


def quality_markdown(section: dict, device: str) -> str:
    rows = [[r["name"], r["label"], fmt(r["steps"], "d") if r["steps"] else "—", fmt(r["loss"], ".4f"),
             fmt(r["loss_vs_float"], "+.4f"), fmt(r["perplexity"], ".2f"), fmt(r["bits_per_char"], ".3f"),
             fmt(r["param_bytes"], ",.0f"), fmt(r["make_s"], ".0f")] for r in section["rows"]]
    commands = "\n".join(f"- `{r['name']}`: `{r['command']}`" for r in section["rows"])
    return (f"## 3. Quality on the bundled corpus ({device})\n\n{section['how']}.\n\n"
            + table(["run", "model", ">steps", ">val loss", ">vs float", ">perplexity", ">bits/char", ">param bytes",
                     ">made in s"], rows)
            + f"\n\nHow each run was made (then `python -m train.evaluate --workdir W --batches ... --batch-size ...` "
              f"as in `eval_command` of results.json):\n\n{commands}")


def decode_cell(speed: dict) -> str:
    """Decode tokens/s (median) and its range over the generate repeats, each less the same median of the baseline
    generate that the median rate subtracts (so the median always lies within the range). Results written before
    `decode_steps` existed subtracted generate(0) over all new tokens."""
    tokens, rate = speed["batch"] * speed.get("decode_steps", speed["new_tokens"]), speed["decode_tokens_per_s"]
    rates = [None, None]
    if rate and "generate_spread" in speed:
        no_new_tokens_s = speed["generate_s"] - tokens / rate  # the baseline's median, as decode_speed measured it
        rates = [tokens / max(speed["generate_spread"][k] - no_new_tokens_s, 1e-9) for k in ("max", "min")]
    return f"{fmt(speed['decode_tokens_per_s'], ',.0f')} ({span(*rates, ',.0f')})"


def serving_markdown(section: dict, device: str) -> str:
    batches = sorted({s["batch"] for r in section["rows"] for s in r.get("speed", [])})
    headers = ["model", "compute", ">param bytes", ">x float", ">checkpoint bytes", ">x float params"]
    headers += [f">prefill tok/s b={b} (all {b} seqs)" for b in batches]
    headers += [f">decode tok/s b={b} (all {b} seqs; slowest..fastest)" for b in batches]
    headers += [">save s", ">restore s", ">peak RSS MB"]
    rows = []
    for r in section["rows"]:
        speed = {s["batch"]: s for s in r.get("speed", []) if not s.get("kv_bits")}
        compute = r.get("compute_dtype", "") + (f", {r['numerics']} int" if r.get("numerics") else "")
        cells = [r["label"], compute, fmt(r.get("param_bytes"), ",.0f"), fmt(r.get("params_vs_float"), ".3f"),
                 fmt(r.get("checkpoint_bytes"), ",.0f"), fmt(r.get("checkpoint_vs_float_params"), ".3f")]
        cells += [fmt(speed[b]["prefill_tokens_per_s"], ",.0f") if b in speed else "—" for b in batches]
        cells += [decode_cell(speed[b]) if b in speed else "—" for b in batches]
        cells += [fmt(r.get("save_s"), ".3f"), fmt(r.get("restore_s"), ".3f"), fmt(r.get("peak_rss_bytes"), ".0f", 1e-6)]
        rows.append(cells)
    runtime = section["runtime_rss"]
    notes = [f"- `{r['name']}` made by `{r['made_by']}`" + (f"; RSS: `{r['rss_command']}`" if "rss_command" in r
                                                             else "") + (f"; **failed**: {r['error']}" if "error" in r
                                                                         else "") for r in section["rows"]]
    return (f"## 4. Serving ({device})\n\n{section['how']}. Numerics `fake` = dequantize, then float matmul (AQT on "
            f"CPU); checkpoint bytes = files of the checkpoint step folder; save/restore s = median time to write and "
            f"read the model's variables (params only for float) as a checkpoint. Peak RSS of the runtime alone "
            f"(`{runtime['command']}`): {fmt(runtime.get('peak_rss_bytes'), '.0f', 1e-6)} MB.\n\n"
            + table(headers, rows) + "\n\n" + "\n".join(notes) + kv_cache_markdown(section)
            + larger_markdown(section.get("larger")))


def kv_cache_markdown(section: dict) -> str:
    """Decode with the KV cache in the compute dtype against int8 (a scale per token and KV head), per model."""
    rows = [[r["label"], str(s["batch"]), "int8" if s.get("kv_bits") else "compute dtype",
             fmt(s.get("kv_cache_bytes"), ",.0f"), fmt(s.get("prefill_tokens_per_s"), ",.0f"),
             fmt(s.get("decode_tokens_per_s"), ",.0f")]
            for r in section["rows"] for s in r.get("speed", []) if "kv_cache_bytes" in s]
    if not rows:
        return ""
    headers = ["model", ">batch", "KV cache", ">cache bytes", ">prefill tok/s", ">decode tok/s"]
    return "\n\nKV cache in the compute dtype and in int8 (`train.generate --kv-bits 8`):\n\n" + table(headers, rows)


def larger_markdown(larger: dict | None) -> str:
    """The larger size's speeds and per-round ratios to the bf16 and the f32-compute float (min / median over
    rounds)."""
    if not larger:
        return ""
    ratio = lambda r, key, base="float": (f"{fmt(r.get(f'{key}_x_{base}_min'), '.2f')} / "
                                          f"{fmt(r.get(f'{key}_x_{base}_median'), '.2f')}")
    rss = larger.get("rss", {})
    peak = lambda name: fmt(rss.get(name, {}).get("peak_rss_bytes"), ".0f", 1e-6)
    rows = [[r["name"], str(r["batch"]), fmt(r["param_bytes"], ",.0f"), fmt(r["prefill_tokens_per_s_median"], ",.0f"),
             ratio(r, "prefill_tokens_per_s"), ratio(r, "prefill_tokens_per_s", "float_f32"),
             fmt(r["decode_tokens_per_s_median"], ",.0f"), ratio(r, "decode_tokens_per_s"),
             ratio(r, "decode_tokens_per_s", "float_f32"), peak(r["name"])] for r in larger["rows"]]
    headers = ["model", ">batch", ">param bytes", ">prefill tok/s", ">x bf16 (min / median)",
               ">x f32 (min / median)", ">decode tok/s", ">x bf16 (min / median)", ">x f32 (min / median)",
               ">peak RSS MB"]
    runtime = f" The runtime alone peaks at {peak('runtime')} MB." if "runtime" in rss else ""
    return (f"\n\nLarger size (`{' '.join(larger['overrides'])}`, random weights made in each variant's serving "
            f"layout; {larger['rounds']} round(s) of variants in turn, {larger['new_tokens']} new tokens; peak RSS of "
            f"a child that builds the variant and generates at batch 1):{runtime}\n\n" + table(headers, rows))


def finetune_markdown(section: dict, device: str) -> str:
    rows = [[r["label"], fmt(r.get("loss"), ".4f"), fmt(r.get("loss_vs_float_ft"), "+.1%"),
             fmt(r.get("trainable_params"), ",.0f"), fmt(r.get("state_bytes"), ",.0f"),
             fmt(r.get("state_bytes_vs_float_ft"), ".3f"), fmt(r.get("peak_rss_bytes"), ".0f", 1e-6),
             fmt(r.get("ms_per_step"), ".1f"), span(r.get("ms_per_step_min"), r.get("ms_per_step_max"), ".1f"),
             timing_ratio(section, r.get("ms_per_step_vs_float_ft"))]
            for r in section["rows"]]
    commands = "\n".join(f"- `{r['name']}`: `{r['command']}`" + (f" **failed**: {r['error']}" if "error" in r else "")
                         for r in section["rows"] if r.get("command"))
    return (f"## 5. Fine-tuning to new text ({device})\n\n{section['how']}.\n\n"
            + table(["method", ">val loss (target)", ">vs float FT", ">trainable params", ">train-state bytes",
                     ">x float FT", ">peak RSS MB", ">ms/step (median)", ">ms/step min..max", ">x float FT time"],
                    rows)
            + f"\n\nBase: `{section['base_command']}`, converted to INT8/INT4 serving runs with "
              f"`python -m quant.convert`.\n\n{commands}")


def ptq_markdown(section: dict, device: str) -> str:
    rows = [[r["setting"], r["method"], fmt(r.get("loss"), ".4f"), fmt(r.get("loss_vs_float"), "+.2%"),
             fmt(r.get("kl_mean"), ".4f"), fmt(r.get("kl_p99"), ".3f"), fmt(r.get("top1"), ".1%"),
             fmt(r.get("quantize_s"), ".1f"), fmt(r.get("convert_wall_s"), ".0f"), fmt(r.get("train_s"), ".0f"),
             fmt(r.get("peak_rss_bytes"), ".0f", 1e-6)] for r in section["rows"]]
    commands = "\n".join(f"- {r['setting']} {r['method']}: `{r['command']}`"
                         + (f" after `{r['train_command']}`" if r.get("train_command") else "")
                         + (f" (failed: {r['error']})" if r.get("error") else "") for r in section["rows"])
    return (f"## 6. Calibrated PTQ ({device})\n\nFloat parent `{section['float_run']}`, val loss "
            f"{section['float_loss']:.4f}. {section['how']}.\n\n"
            + table(["setting", "method", ">val loss", ">vs float", ">KL mean", ">KL p99", ">top-1", ">quantize s",
                     ">convert wall s", ">QAT train s", ">peak RSS MB"], rows)
            + f"\n\n{commands}")


SECTIONS = {"matmul": matmul_markdown, "throughput": throughput_markdown, "torch": torch_markdown,
            "quality": quality_markdown,
            "serving": serving_markdown, "finetune": finetune_markdown, "ptq": ptq_markdown}


def section_markdown(key: str, results: dict) -> str:
    """A section's Markdown: its heading, a plain busy-machine warning when `train.bench.trust` found one, the
    load around it, then its tables."""
    section = results[key]
    heading, _, body = SECTIONS[key](section, results["machine"]["name"]).partition("\n\n")
    load = section.get("load")
    notes = ([f"**{busy_warning(section['busy'])}**"] if section.get("busy") else []) + (
        [f"Load average before / after: {load['load_before']} / {load['load_after']} (the bench itself used "
         f"{load['own_cpu']} cores on average" + (f", other processes {load['others_cpu']}"
                                                   if load.get("others_cpu") is not None else "") + ")."]
        if load else [])
    return "\n\n".join([heading, *notes, body])


def header_markdown(results: dict) -> str:
    m = results["machine"]
    busy = [key for key in SECTIONS if results.get(key, {}).get("busy")]
    sections = ", ".join(f"{k} {v:.0f} s" for k, v in results["section_s"].items())
    return (f"# slm-jax benchmarks: {m['name']} ({results['profile']})\n\n"
            f"- command: `{results['command']}` (commit {results['git'] or 'unknown'}, {results['started']})\n"
            f"- device: {m['device_kind']} ({m['platform']}, {m['device_count']} device(s), {m['cpu_count']} CPU "
            f"cores), jax {m['jax']}, Python {m['python']}\n"
            f"- load average at start / end: {m['load_average_at_start']} / {m.get('load_average_at_end')}\n"
            f"- total {results['total_s']:.0f} s ({sections})\n\n"
            + (f"**UNRELIABLE: the machine was busy (or its host noisy) during {', '.join(busy)}; their timings and "
               f"ratios (marked ?) are noise, not results. Rerun on a quiet machine.**\n" if busy else
               "Absolute times hold for this device and its load only; compare ratios within one run.\n"))


def write_report(results: dict, out: Path) -> None:
    """results.md (and the PNG plots when matplotlib, the `bench` extra, is installed; otherwise results.md says
    they were skipped) in `out`."""
    device = results["machine"]["name"]
    has_plots = importlib.util.find_spec("matplotlib") is not None
    plots = make_plots(results, out) if has_plots else []
    parts = [header_markdown(results)]
    if not has_plots:
        parts.append("Plots skipped: matplotlib is not installed (`pip install -e '.[bench]'`).")
    for key, plot in zip(SECTIONS, ("", "throughput.png", "", "quality.png", "serving.png", "finetune.png", "")):
        if key not in results:  # a section the profile skips
            continue
        parts.append(section_markdown(key, results))
        if key == "quality" and has_plots:
            parts.append("![loss curves](loss_curves.png)")
        if plot in plots:
            parts.append(f"![{key} on {device}]({plot})")
    (out / "results.md").write_text("\n\n".join(parts) + "\n")


def make_plots(results: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = results["machine"]["name"]
    style = dict(figsize=(8, 3.4), dpi=80)

    def busy(key: str) -> str:
        return " - BUSY MACHINE, unreliable" if results[key].get("busy") else ""

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)

    rows = results["throughput"]["rows"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), squeeze=False, **style)
    for ax, size in zip(axes[0], sizes):
        these = [r for r in rows if r["size"] == size]
        ax.barh([r["label"] for r in these], [r["tokens_per_s"] for r in these], color="tab:blue")
        for i, r in enumerate(these):
            ratio = r.get("vs_bf16") or r.get("vs_fp32")
            ax.text(r["tokens_per_s"], i, f" x{ratio:.2f} time{'?' if busy('throughput') else ''}" if ratio else "",
                    va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{size}: training tokens/s ({device}){busy('throughput')}", fontsize=9,
                     color="red" if busy("throughput") else "black")
        ax.tick_params(labelsize=8)
        ax.margins(x=0.25)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(**style)
    for name, curve in results["quality"]["curves"].items():
        line, = ax.plot(curve["step"], curve["loss"], label=name, linewidth=1.2)
        ax.plot(curve["val_step"], curve["val_loss"], "o", color=line.get_color(), markersize=4)
    ax.set_xlabel("step (fine-tunes count from their own start)", fontsize=8)
    ax.set_ylabel("loss (nats/token)", fontsize=8)
    ax.set_title(f"training loss (lines) and validation loss (dots), {device}", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7)
    save(fig, "loss_curves.png")

    rows = results["quality"]["rows"]
    fig, ax = plt.subplots(**style)
    ax.barh([r["label"] for r in rows], [r["loss"] for r in rows],
            color=["tab:gray" if r["kind"] == "trained" else "tab:orange" if r["kind"] == "ptq" else "tab:green"
                   for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["loss"], i, f" {r['loss']:.3f} ({fmt(r['bits_per_char'], '.2f')} bits/char)", va="center",
                fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(min(r["loss"] for r in rows) * 0.9, max(r["loss"] for r in rows) * 1.12)
    ax.set_title(f"validation loss: trained (gray), PTQ (orange), QAT fine-tuned (green); {device}", fontsize=9)
    ax.tick_params(labelsize=8)
    save(fig, "quality.png")

    rows = results["serving"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, **style)
    sized = [r for r in rows if r.get("checkpoint_bytes")]
    left.barh([r["name"] for r in sized], [r["checkpoint_bytes"] / 1e6 for r in sized], color="tab:purple")
    left.invert_yaxis()
    left.set_title("checkpoint on disk (MB)", fontsize=9)
    timed = [r for r in rows if r.get("speed")]
    batches = sorted({s["batch"] for r in timed for s in r["speed"]})
    width = 0.8 / len(batches)
    for j, batch in enumerate(batches):
        values = [next((s["decode_tokens_per_s"] or 0 for s in r["speed"]
                        if s["batch"] == batch and not s.get("kv_bits")), 0) for r in timed]
        right.bar([i + j * width for i in range(len(timed))], values, width, label=f"batch {batch}")
    right.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(timed))], [r["name"] for r in timed])
    right.set_title(f"decode tokens/s with KV cache, all sequences ({device}){busy('serving')}", fontsize=9,
                    color="red" if busy("serving") else "black")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.tick_params(labelsize=8)
    save(fig, "serving.png")

    rows = [r for r in results["finetune"]["rows"] if "loss" in r]
    fig, ax = plt.subplots(**style)
    ax.barh([r["label"] for r in rows], [r["loss"] for r in rows],
            color=["tab:gray" if not r.get("command") else "tab:blue" if "lora" not in r["name"] else "tab:green"
                   for r in rows])
    for i, r in enumerate(rows):
        note = f" {r['loss']:.3f}" + (f", state x{r['state_bytes_vs_float_ft']:.2f}"
                                      if r.get("state_bytes_vs_float_ft") else "")
        ax.text(r["loss"], i, note, va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(min(r["loss"] for r in rows) * 0.9, max(r["loss"] for r in rows) * 1.15)
    ax.set_title(f"target-domain validation loss after fine-tuning; LoRA in green ({device})", fontsize=9)
    ax.tick_params(labelsize=8)
    save(fig, "finetune.png")
    return list(PLOTS)
