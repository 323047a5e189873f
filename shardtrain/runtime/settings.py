"""The run.yaml values a rank reads, as plain frozen dataclasses (no config/ parsing on the ranks).

run.yaml is `RunConfig.to_dict()` written by the launcher after the config package validated it, so this
module only picks the keys the training loop, the data pipeline and the trackers use; what the plan
decided (batch shape, strategy, model source, engine configs) comes from plan.json instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shardtrain.compiler.specs import CompileMode, Resume
from shardtrain.rundir_format import RUN_YAML


@dataclass(frozen=True)
class TrainSettings:
    """train.*: the seed, the LR schedule (runtime/optim.py lr_at), the optimizer's hyper-parameters,
    clipping and torch.compile (runtime/compiling.py)."""
    seed: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    steps: int
    compile: CompileMode
    max_nonfinite_steps: int = 10
    """Stop (exit code exitcodes.EXIT_NONFINITE) after this many steps in a row whose loss or gradient
    norm is not finite (each is skipped: no optimizer update). Default for run.yaml files written before
    the key existed."""


@dataclass(frozen=True)
class DataSettings:
    """data.*: how the documents become samples (runtime/data.py). The sources themselves, data.train and
    data.eval, come from plan.json's runtime facts (Hub dataset ids resolved to their snapshot)."""
    eval_fraction: float
    format: str
    """auto | jsonl | text (runtime/records.py detect_format)."""
    packing: bool
    chat_template: str | None = None


@dataclass(frozen=True)
class RunSettings:
    """run.*: logging, evaluation, checkpointing and resume cadence of the loop (runtime/worker.py)."""
    name: str | None
    checkpoint_every: int
    eval_every: int
    eval_batches: int
    log_every: int
    resume: Resume
    max_requeues: int
    keep_checkpoints: int
    report_to: tuple[str, ...] | None = None
    memory_trace: bool = False
    export: str = "adapter"
    """run.export (compiler/specs.py Export): adapter | merged | both (runtime/export.py)."""


@dataclass(frozen=True)
class ModelSettings:
    tokenizer: str | None = None


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    train: TrainSettings
    data: DataSettings
    run: RunSettings

    @staticmethod
    def from_mapping(raw: dict, where: str = RUN_YAML) -> "Settings":
        """Pick the keys each section needs from a run.yaml mapping; a missing key names the file and the fix."""
        def section(cls, name: str):
            got = raw.get(name) or {}
            kw = {}
            for f in dataclasses.fields(cls):
                if f.name in got:
                    kw[f.name] = got[f.name]
                elif f.default is dataclasses.MISSING:
                    raise ValueError(f"{where}: {name}.{f.name} is missing; re-create the run directory with "
                                     "`shardtrain launch` (it writes every key)")
            return cls(**kw)
        train = section(TrainSettings, "train")
        run = section(RunSettings, "run")
        report = run.report_to
        return Settings(model=section(ModelSettings, "model"),
                        train=dataclasses.replace(train, compile=CompileMode(train.compile)),
                        data=section(DataSettings, "data"),
                        run=dataclasses.replace(run, resume=Resume(run.resume),
                                                report_to=tuple(report) if report is not None else None))
