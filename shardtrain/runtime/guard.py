"""The non-finite guard of the training loop (issue 21): a step whose loss or gradient norm is not finite
makes no optimizer update, is counted, and too many in a row stop the run.

Why skip rather than stop at once: a single NaN or inf (one bad batch, an fp16 overflow, a rare kernel
glitch) is survivable if the update it would have made never happens, and that is what fp16 loss
scaling has always done (torch GradScaler.step, DeepSpeed's overflow skip). Why stop after
``train.max_nonfinite_steps`` in a row: then it is not one batch but the run diverging (learning rate,
data), and every further step only burns compute; the checkpoints written so far hold the last good
parameters (skipped steps leave them unchanged), so the run can resume from them after a fix.

The per-step check itself lives in the engines (runtime/engines.py ``guard``); :func:`finite_guard`
builds it for one step, :class:`NonFiniteSteps` keeps the counts across steps.
"""
from __future__ import annotations

import math

import torch

from shardtrain import rundir_format as rf
from shardtrain.exitcodes import EXIT_NONFINITE
from shardtrain.runtime.dist import reduce_sum


def finite_guard(loss_sum: torch.Tensor, summed: list):
    """The engine's guard for one step: ONE all-reduce of [the step's loss sum, "this rank's grad norm is
    not finite"], so every rank reaches the same verdict and none steps alone. The global loss sum is left
    in ``summed`` (this is the step's loss collective, moved before the update)."""
    def guard(norm) -> bool:
        bad = torch.zeros((), dtype=torch.float64, device=loss_sum.device)
        if norm is not None:
            bad += (~torch.isfinite(norm.detach().reshape(()))).to(bad.device, torch.float64)
        total, nonfinite = reduce_sum(torch.stack([loss_sum, bad]))
        summed[:] = [total]
        return math.isfinite(total) and nonfinite == 0
    return guard


class NonFiniteSteps:
    """Counts skipped steps: in total over the run (carried in trainer_state.json across resumes) and in a
    row (reset by any step that updated)."""

    def __init__(self, limit: int, total: int = 0):
        self.limit = int(limit)
        self.total = int(total)
        self.in_a_row = 0

    def update(self, rec: dict) -> bool:
        """Count the step's record (adds ``nonfinite_steps`` to it); True when the run must stop."""
        if rec.get(rf.STEP_SKIPPED):
            self.total += 1
            self.in_a_row += 1
        else:
            self.in_a_row = 0
        rec[rf.NONFINITE_STEPS] = self.total
        return self.in_a_row >= self.limit

    def warning(self, rec: dict) -> str:
        return (f"step {rec[rf.STEP]}: loss {rec[rf.LOSS]:.4g}, grad norm {rec['grad_norm']:.4g}: not finite, "
                f"skipped (no optimizer update); {self.in_a_row} in a row, the run stops at {self.limit} "
                "(train.max_nonfinite_steps)")

    def stop_message(self, step: int, last_checkpoint: int | None) -> str:
        where = (f"the last checkpoint (step {last_checkpoint}) is intact" if last_checkpoint
                 else "no checkpoint was written")
        return (f"[shardtrain] stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss or "
                f"gradient norm (train.max_nonfinite_steps: {self.limit}); none of them updated the parameters and "
                f"{where}. Lower train.lr (or raise train.warmup_steps), check the data around these steps, then "
                f"run again to resume. Exit code {EXIT_NONFINITE}.")
