"""The views of a run that users of other ML tools expect: TensorBoard event files of the scalars `metrics.jsonl`
records (opt-in `train.tensorboard`, written with tensorboardX, an optional extra) and a `jax.profiler` trace of a
few training steps (`python -m train.main --profile N`).
"""
from __future__ import annotations

import math
from pathlib import Path

import jax

from slm_jax.errors import UserError

try:
    from tensorboardX import SummaryWriter
except ImportError:  # the `tensorboard` extra is not installed; TensorBoardLog refuses with one line
    SummaryWriter = None

NOT_SCALARS = ("step", "time")  # a record's x axis and wall time, not curves


class TensorBoardLog:
    """Writes each `metrics.jsonl` record's numeric fields as TensorBoard scalars, tagged by their key ("loss",
    "val_loss", "tokens_per_s", ...), at the record's step and wall time, as event files under `directory`.

    Made before any work (UserError at once when tensorboardX is not installed); `open(resume_step)` starts the
    writer once the step training resumes from is known, purging events past it (tensorboardX's purge_step), as
    a resume overwrites them."""

    def __init__(self, directory: Path):
        if SummaryWriter is None:
            raise UserError("train.tensorboard: true needs tensorboardX; install it with "
                            "pip install -e \".[tensorboard]\" or set train.tensorboard=false")
        self.directory, self.writer = Path(directory), None
        self.last_step: dict[str, int] = {}  # tag -> the step it was last written at

    def open(self, resume_step: int) -> None:
        self.writer = SummaryWriter(str(self.directory), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        """Add every int/float field of `record` (not bools, None or NaN/inf, not `step`/`time`) at record['step'],
        each tag once per step: the final summary repeats the last step's ms_per_step and tokens_per_s, which
        TensorBoard would draw as a second point at that step."""
        step = record["step"]
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value) and self.last_step.get(key) != step:
                self.writer.add_scalar(key, value, global_step=step, walltime=record.get("time"))
                self.last_step[key] = step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepProfiler:
    """A `jax.profiler` trace of `steps` training steps from step index `first` (the caller passes the step after
    the first compiled one, so compilation stays out), written to `directory` (plugins/profile/<run>/*.xplane.pb,
    read by TensorBoard's profile plugin or XProf). `before(step)` / `after(step, outputs)` wrap each step; the
    trace stops after the last one (its outputs waited for) or at `close()`."""

    def __init__(self, directory: Path, steps: int, first: int, log=print):
        self.directory, self.first, self.last, self.log = Path(directory), first, first + steps - 1, log
        self.active, self.traced = False, None

    def before(self, step: int) -> None:
        if step == self.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active:
            self.traced = step
            if step == self.last:
                jax.block_until_ready(outputs)
                self.close()

    def close(self) -> None:
        """Stop a trace still running (training ended or failed before the last step) and say where it went."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self.log(f"profile: steps {self.first + 1}..{self.traced + 1} traced to {self.directory} "
                     f"(open with TensorBoard's profile plugin or XProf)")
