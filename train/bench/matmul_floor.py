"""`python -m train.bench.matmul_floor --config baseline [--set KEY=VALUE ...]`: one config's matmul floor
(train.bench.floor: every matmul of a training step at its own shape, alone in one jit) and the MFU ceiling it sets:
the matmuls' FLOPs (the bench's model FLOPs when the heads span d_model) over their time, against a [2048, 2048]
float32 product timed in the same process.
"""
from __future__ import annotations

from train.bench.floor import measure_floor, peak_gflops
from train.cli import ArgumentParser, main_guard, positive_int
from train.config import load_config


@main_guard
def main(argv=None):
    parser = ArgumentParser(prog="python -m train.bench.matmul_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="baseline", help="a config name or YAML path (default baseline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--reps", type=positive_int, default=30, help="timed runs of the matmuls (default 30)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    m, batch = config.model, config.train.batch_size
    floor = measure_floor(m, batch, args.reps)
    peak = peak_gflops(2048, 10)
    print(f"{args.config} (batch {batch} x seq_len {m.seq_len}): {floor['matmuls']} matmuls, "
          f"{floor['flops'] / 1e9:.2f} GFLOP, alone in one jit {1000 * floor['median_s']:.1f} ms (median of "
          f"{args.reps}; {1000 * floor['min_s']:.1f}..{1000 * floor['max_s']:.1f}), {floor['gflops']:.0f} GFLOP/s; "
          f"float32 [2048, 2048] peak {peak:.0f} GFLOP/s: MFU ceiling {100 * floor['gflops'] / peak:.1f}%")


if __name__ == "__main__":
    main()
