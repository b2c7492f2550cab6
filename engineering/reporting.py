"""
What the master process says while a stage runs: the progress bar, OUT/metrics.jsonl (every log_every
steps, every non-finite step and the last) and --report-to's targets (TensorBoard, wandb). A reader of
the method may skip this file.

    python train.py --report-to tensorboard    # then: tensorboard --logdir out/demo
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

from engineering.flags import UsageError, import_optional

if TYPE_CHECKING:
    from engineering.batches import Batches
    from engineering.config import TrainConfig


class StageLog:
    """What the master process says while a stage runs: the progress bar, metrics.jsonl (every log_every
    steps, every non-finite step and the last) and --report-to's targets. The other processes say nothing."""

    def __init__(self, cfg: TrainConfig, stage: str, first_step: int, total_steps: int, master: bool,
                 reporter: MetricsReporter, skipped_before: int = 0):
        self.cfg, self.stage, self.master, self.reporter, self.total = cfg, stage, master, reporter, total_steps
        self.metrics, self.first_step = None, first_step
        if self.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            path = os.path.join(cfg.out_dir, "metrics.jsonl")
            kept = rows_up_to(path, first_step) if first_step else []  # a resume: no step appears twice
            self.metrics = open(path, "w")
            self.metrics.writelines(kept)
            reporter.start(cfg.out_dir, stage, dataclasses.asdict(cfg))
        # off a terminal (a file, a pipe, a scheduler's log) no bar is redrawn: a plain line per logged row
        self.plain = self.master and not bars_wanted()
        self.bar = tqdm(range(first_step, total_steps), initial=first_step, total=total_steps,
                        desc=f"stage {stage}", disable=not self.master or self.plain, dynamic_ncols=True)
        self.t0, self.samples, self.logged_skips = time.time(), 0, skipped_before  # (a resumed run's skips: logged)

    def step(self, row: dict, finite: bool, batches: Batches):
        """One step's numbers (step, losses, lr, grad_norm), with the throughput and skip counts added."""
        self.samples += self.cfg.global_batch_size
        row.update(samples_per_s=self.samples / (time.time() - self.t0), skipped=len(batches.skipped),
                   truncated=len(batches.truncated), **({} if finite else {"nonfinite": True}))
        if not self.master:
            return
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lm=f"{row['lm_loss']:.3f}", rec=f"{row['recon_loss']:.3f}",
                             lr=f"{row['lr']:.1e}", sps=f"{row['samples_per_s']:.0f}")
        if row["step"] % self.cfg.log_every == 0 or row["step"] == self.total or not finite:
            if len(batches.skipped) > self.logged_skips:  # this process's newly skipped records, by id
                row["skipped_ids"] = [rid for rid, _ in batches.skipped[self.logged_skips:]]
                self.logged_skips = len(batches.skipped)
            self.write(row)
            self.reporter.log(row)
            if self.plain:
                print(self.plain_line(row), flush=True)

    def plain_line(self, row: dict) -> str:
        """'stage 2 step 40/2000 loss 1.234 (lm 1.234, recon 0.000) lr 5.0e-04 19 samples/s 0:00:32 elapsed,
        0:26:08 to go': the bar's content as one line, for logs."""
        elapsed = time.time() - self.t0
        left = elapsed / max(row["step"] - self.first_step, 1) * (self.total - row["step"])
        clock = lambda s: str(datetime.timedelta(seconds=round(s)))  # noqa: E731
        return (f"stage {self.stage} step {row['step']}/{self.total} loss {row['loss']:.3f} (lm {row['lm_loss']:.3f}, "
                f"recon {row['recon_loss']:.3f}) lr {row['lr']:.1e} {row['samples_per_s']:.0f} samples/s "
                f"{clock(elapsed)} elapsed, {clock(left)} to go")

    def write(self, row: dict):
        self.metrics.write(json.dumps({"stage": self.stage, **row}) + "\n")
        self.metrics.flush()

    def close(self, final_row: dict):
        self.write(final_row)
        self.metrics.close()
        self.reporter.close()


def bars_wanted() -> bool:
    """Progress bars only on a terminal, and not under TQDM_DISABLE=1 (HF Trainer's and tqdm's convention)."""
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0")


def rows_up_to(path: str, step: int) -> list[str]:
    """metrics.jsonl's lines of the steps up to `step` (the one a resumed run continues from)."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return []
    return [line for line in lines if line.strip() and not json.loads(line).get("done")
            and json.loads(line).get("step", 0) <= step]


class MetricsReporter:
    """--report-to: the rows written to metrics.jsonl go to TensorBoard (out_dir/tensorboard) and/or wandb
    as well. Both are optional packages, imported only when asked for: a missing one fails when the
    reporter is made, before any training."""
    TARGETS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}

    def __init__(self, report_to: str):
        targets = [t.strip() for t in report_to.split(",") if t.strip()]
        unknown = [t for t in targets if t not in self.TARGETS]
        if unknown:
            raise UsageError(f"--report-to {report_to!r}: unknown {unknown}; choose from {sorted(self.TARGETS)}, "
                             f"comma-separated")
        self.modules = {t: import_optional(*self.TARGETS[t], flag=f"--report-to {t}") for t in targets}
        self.writer = self.run = None

    def start(self, out_dir: str, stage: str, config: dict):
        if "tensorboard" in self.modules:
            self.writer = self.modules["tensorboard"].SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
        if "wandb" in self.modules:  # one wandb run per stage; WANDB_PROJECT (default "victor") groups them
            self.run = self.modules["wandb"].init(project=os.environ.get("WANDB_PROJECT", "victor"), dir=out_dir,
                                                  name=f"{os.path.basename(os.path.normpath(out_dir))} (stage {stage})",
                                                  config=config)

    def log(self, row: dict):
        """One metrics.jsonl row: its numbers, at its step."""
        values = {k: v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, row["step"])
        if self.run is not None:
            self.run.log(values, step=row["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
