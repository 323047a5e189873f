"""Experiment trackers (`run.report_to: [tensorboard, wandb, mlflow]`), fed by rank 0 each step.

`with_trackers(metrics, run)` returns the MetricsWriter wrapped: every record it writes to
metrics.jsonl also goes to the trackers, so the worker needs no other change. Per train step:
loss, lr, grad_norm, tokens_per_s, step_time_s, and per-phase memory as measured
(CUDA: allocated / max_allocated / reserved; CPU: model_states / rss; runtime/telemetry.py
PhaseMemory) next to the plan's prediction (memory/predicted_per_gpu_bytes, per term too).
Eval records: eval_loss, eval_ppl. The run name and the plan (strategy, batch split, per-GPU terms)
go in as config (wandb) / params (mlflow) / hparams text (tensorboard).
- TensorBoard: torch.utils.tensorboard.SummaryWriter into RUN_DIR/tensorboard/ (flushed per record,
  so a killed run keeps its curves); `tensorboard --logdir RUN_DIR/tensorboard`.
- wandb: wandb.init(project=WANDB_PROJECT or "shardtrain", name=run name, dir=RUN_DIR, config=plan);
  WANDB_MODE=offline works without an account.
- mlflow: the tracking URI from MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns
  (MLFLOW_ALLOW_FILE_STORE=true is set for it: mlflow 3 refuses file stores otherwise).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from shardtrain import rundir_format as rf

log = logging.getLogger("shardtrain.trackers")
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "eval_loss", "eval_ppl")


def flat_metrics(rec: dict, predicted: dict[str, int]) -> dict[str, float]:
    """One metrics.jsonl record -> {tag: number} as sent to every tracker."""
    out = {f"{'eval' if rec.get('kind') == 'eval' else 'train'}/{k}": float(rec[k])
           for k in SCALARS if isinstance(rec.get(k), (int, float))}
    for phase, vals in (rec.get("memory") or {}).items():
        for k, v in vals.items():
            out[f"memory/{phase}/{k}_bytes"] = float(v)
    if rf.is_train(rec):
        for k, v in predicted.items():
            out[f"memory/predicted/{k}_bytes"] = float(v)
    return out


def plan_params(run) -> dict[str, object]:
    """The run name and the plan, flat, as tracker config/params."""
    c = run.plan.chosen
    d = {"run_name": run_name(run), "strategy": c.strategy.value, "world_size": c.world_size,
         "micro_batch_size": c.micro_batch_size, "grad_accum_steps": c.grad_accum_steps,
         "gradient_checkpointing": c.gradient_checkpointing.value, "precision": c.precision.value,
         "optimizer": c.optimizer.value, "method": c.method.value, "seq_len": run.plan.train.seq_len,
         "model": run.plan.model.name, "num_params": run.plan.model.num_params,
         "gpu_memory_bytes": run.plan.gpu_memory_bytes, "lr": run.cfg.train.lr, "steps": run.cfg.train.steps}
    d.update({f"predicted_{k}_bytes": v for k, v in _predicted(run).items()})
    return d


def run_name(run) -> str:
    return run.cfg.run.name or Path(run.run_dir).name


def _predicted(run) -> dict[str, int]:
    pg = run.plan.chosen.per_gpu
    keys = ("params", "grads", "master_params", "optimizer_states", "activations", "logits", "buffers", "total")
    return {k: int(getattr(pg, k)) for k in keys if isinstance(getattr(pg, k, None), (int, float))}


class _TensorBoard:
    def __init__(self, run, params):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(log_dir=str(Path(run.run_dir) / "tensorboard"))
        self.w.add_text("plan", "```\n" + json.dumps(params, indent=1) + "\n```", 0)

    def log(self, step, values):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self):
        self.w.close()


class _Wandb:
    def __init__(self, run, params):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "shardtrain"), name=run_name(run),
                              dir=str(run.run_dir), config=params, reinit="finish_previous")

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class _Mlflow:
    def __init__(self, run, params):
        import mlflow
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # mlflow >= 3.x refuses the file store unless asked: it is what "no server" means here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(run.run_dir) / "mlruns").absolute().as_uri())
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.start_run(run_name=run_name(run))
        mlflow.log_params({k: str(v) for k, v in params.items()})

    def log(self, step, values):
        # mlflow metric names allow [A-Za-z0-9_-./ ]: our tags already fit
        self.mlflow.log_metrics(values, step=step)

    def close(self):
        self.mlflow.end_run()


_KINDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class TrackedMetrics:
    """A MetricsWriter that also feeds the trackers (same write/truncate_after interface)."""

    def __init__(self, inner, trackers: list, predicted: dict[str, int]):
        self.inner, self.trackers, self.predicted = inner, trackers, predicted

    def truncate_after(self, step: int) -> None:
        self.inner.truncate_after(step)

    def write(self, rec: dict) -> None:
        self.inner.write(rec)
        values = flat_metrics(rec, self.predicted)
        for t in self.trackers:
            t.log(int(rec.get("step", 0)), values)

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()  # MetricsWriter batches its lines (telemetry.py)
        for t in self.trackers:
            t.close()
        self.trackers = []

    def __getattr__(self, name):
        return getattr(self.inner, name)


_OPEN: list[TrackedMetrics] = []


def with_trackers(metrics, run):
    """Wrap `metrics` with the trackers in run.report_to (rank 0 only; others get `metrics` back).
    A tracker that is not installed is a one-line error naming the key and the package."""
    wanted = tuple(getattr(run.cfg.run, "report_to", None) or ())
    if not wanted or not run.info.is_main:
        return metrics
    while _OPEN:  # several runs in one process (tests): close the previous run's trackers
        _OPEN.pop().close()
    params = plan_params(run)
    trackers = []
    for name in wanted:
        try:
            trackers.append(_KINDS[name](run, params))
        except ImportError:
            raise RuntimeError(f"run.report_to: {name!r} needs the {_INSTALL[name]} package; fix: pip install "
                               f"{_INSTALL[name]}, or remove it from run.report_to") from None
    log.info("reporting to %s", ", ".join(wanted))
    tm = TrackedMetrics(metrics, trackers, _predicted(run))
    _OPEN.append(tm)
    import atexit
    atexit.register(tm.close)
    return tm
