"""The bench's busy-machine rule: a figure whose median repeat is more than 1.3x its fastest, or a load average
(less the bench's own CPU use) above 0.75 x the cores, marks a section unreliable; and the report says so in plain
words."""
import time

import numpy as np
import pytest

from train.bench.finetune import interval_step_times
from train.bench.report import decode_cell, section_markdown, timing_ratio
from train.bench.trust import SectionLoad, busy_reasons, busy_warning, cpu_seconds, machine_cpu_seconds, spread
from train.metrics import Throughput

QUIET_LOAD = {"load_before": 0.4, "load_after": 1.9, "own_cpu": 1.6, "others_load": 0.3}  # no /proc/stat figure
QUIET_CPU = {**QUIET_LOAD, "load_after": 5.3, "others_load": 3.7, "others_cpu": 0.1}  # thread pools lift the load


def test_spread_is_min_median_max_of_the_repeats():
    assert spread([0.3, 0.1, 0.2, 0.4]) == {"min": 0.1, "median": pytest.approx(0.25), "max": 0.4, "n": 4}


@pytest.mark.parametrize("seconds, load, cores, expected", [
    ([1.0, 1.29, 1.3, 3.0], QUIET_LOAD, 2, []),  # median 1.295x, one hiccup, others at 0.3 of 1.5 allowed: quiet
    ([1.0, 1.34, 1.36, 1.5], QUIET_LOAD, 2, ["step's median repeat took 1.35x its fastest (median/min > 1.3)"]),
    ([1.0, 1.0], {**QUIET_LOAD, "load_after": 3.2, "others_load": 1.6}, 2,
     ["load average 3.2 less the bench's own 1.6 cores = 1.6 > 1.5 (0.75 x 2 cores)"]),
    ([1.0, 1.0], {**QUIET_LOAD, "load_after": 3.2, "others_load": 1.6}, 16, []),  # 1.6 of 12 allowed on 16 cores
    ([1.0, 1.0], {**QUIET_LOAD, "load_after": None, "others_load": None}, 2, []),  # no load average: spread only
    ([1.0, 1.0], QUIET_CPU, 2, []),  # measured CPU use of other processes wins over an inflated load average
    ([1.0, 1.0], {**QUIET_CPU, "others_cpu": 0.6}, 2, ["other processes used 0.6 cores > 0.5 (0.25 x 2 cores)"]),
])
def test_busy_reasons(seconds, load, cores, expected):
    assert busy_reasons({"step": spread(seconds)}, load, cores) == expected


def test_section_load_subtracts_the_bench_s_own_cpu_use():
    # reference: the process's CPU clock and a monotonic wall clock read just outside start() and finish()
    wall0, cpu0 = time.monotonic(), time.process_time()
    load = SectionLoad().start()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:  # this thread keeps a core busy for half a second, as far as the machine lets it
        sum(i * i for i in range(10_000))
    result = load.finish()
    expected = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    # own use in cores, whatever the load: on a quiet machine about one (plus threads earlier tests left running in
    # this worker), on a crowded one less; os.times ticks every 10 ms, so 0.05 of 0.5 s either way
    assert result["own_cpu"] > 0
    assert result["own_cpu"] == pytest.approx(expected, abs=0.1)
    assert result["others_load"] == pytest.approx(max(result["load_after"] - result["own_cpu"], 0), abs=0.011)
    assert result["others_cpu"] is None or result["others_cpu"] >= 0  # None where /proc/stat is missing


def test_machine_cpu_seconds_count_this_process_s_work():
    before, own = machine_cpu_seconds(), cpu_seconds()
    if before is None:
        pytest.skip("no /proc/stat on this OS")
    sum(i * i for i in range(3_000_000))
    # the whole machine's busy time grew by at least this process's own (clock ticks of 10 ms aside)
    assert machine_cpu_seconds() - before >= (cpu_seconds() - own) - 0.05


def test_a_busy_section_says_so_and_marks_its_ratios():
    row = {"dtype": "float32", "n": 64, "gflops": 5.0, "best_gflops": 9.0, "worst_gflops": 2.0, "median_s": 0.1,
           "min_s": 0.05, "max_s": 0.2, "first_call_s": 0.3}
    reasons = ["matmul float32's median repeat took 2.00x its fastest (median/min > 1.3)"]
    results = {"machine": {"name": "cpu-2core"},
               "matmul": {"how": "h", "rows": [row], "busy": reasons, "load": QUIET_LOAD}}
    text = section_markdown("matmul", results)
    assert text.splitlines()[2] == f"**{busy_warning(reasons)}**"
    assert busy_warning(reasons).startswith("BUSY MACHINE: these timings are unreliable")
    assert "Load average before / after: 0.4 / 1.9" in text and "| 0.0500..0.2000 |" in text
    assert timing_ratio(results["matmul"], 1.234) == "1.23?"
    results["matmul"]["busy"] = []
    assert "BUSY" not in section_markdown("matmul", results) and timing_ratio(results["matmul"], 1.234) == "1.23"


def test_interval_step_times_recover_each_logging_interval_from_the_loop_s_running_means():
    """Records written as the training loop writes them (train.metrics.Throughput's running mean, first step
    untimed, a log every 3 steps and a final summary) give back each interval's own mean step time."""
    seconds = np.random.default_rng(0).uniform(0.05, 0.4, 12)  # steps 2..13; step 1 compiles
    speed, records = Throughput(tokens_per_step=64, total_steps=13), []
    for step, s in enumerate(seconds, start=2):
        speed.add(float(s))
        if step % 3 == 0 or step == 13:
            records.append({"step": step, "loss": 1.0, **speed.rates(step)})
    records.append({"step": 13, "final": True, "ms_per_step": speed.rates(13)["ms_per_step"]})
    intervals = [seconds[0:2], seconds[2:5], seconds[5:8], seconds[8:11], seconds[11:12]]  # to steps 3, 6, 9, 12, 13
    np.testing.assert_allclose(interval_step_times(records), [c.mean() for c in intervals], rtol=1e-12)
    assert interval_step_times([{"step": 1, "loss": 1.0}]) == []  # one step: only the compiling one


def test_decode_cell_range_uses_the_same_baseline_as_its_median():
    """generate(16 tokens) took 0.30/0.32/0.40 s over the repeats, generate(0 tokens) a median of 0.10 s: the median
    rate is 16 / 0.22 and the range 16 / 0.30 .. 16 / 0.20, which contains it (a prefill-only baseline did not)."""
    speed = {"batch": 1, "new_tokens": 16, "prefill_s": 0.02, "generate_s": 0.32,
             "generate_spread": spread([0.30, 0.32, 0.40]), "decode_tokens_per_s": 16 / 0.22}
    assert decode_cell(speed) == f"{16 / 0.22:,.0f} ({16 / 0.30:,.0f}..{16 / 0.20:,.0f})" == "73 (53..80)"
