"""Prepare the run directory: write the run files a launch needs, keep or move aside the training state.

The layout and every file name are defined in :mod:`shardtrain.rundir_format` (``<run.output_dir>/
<run.name or config stem>/`` unless ``--run-dir`` says otherwise).

Preparing is idempotent: re-preparing an existing run dir with the same config (a resume, a Slurm
requeue, every node of a multi-node job on a shared file system) rewrites the same files and keeps
checkpoints, metrics and logs. Checkpoints are portable (another world size or strategy loads them), so
a resume may change the hardware, the strategy and the batch split, and says what was re-planned; only a
change of what the checkpoint depends on (model, method, LoRA shape, optimizer kind, data, sequence
length, global batch, seed) is refused — :mod:`shardtrain.launcher.resume_check` decides. Start fresh
with ``--no-resume`` (moves the old state aside into ``previous/<timestamp>/``) or pick another ``--run-dir``.

All file writes are atomic (temp file + rename) so that a worker or another node never reads half a file.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from shardtrain import rundir_format as rf
from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Resume
from shardtrain.config import pipeline
from shardtrain.config.schema import ConfigError, RunConfig

from shardtrain.launcher import resume_check
from shardtrain.launcher.resume_check import config_diff  # noqa: F401  (re-exported: callers use rundir's)


@dataclass(frozen=True)
class PreparedRun:
    run_dir: Path
    config: RunConfig
    plan: Plan
    files: tuple[str, ...]
    """Run files written (names relative to run_dir)."""
    has_state: bool
    """The run dir already held checkpoints/metrics that this launch continues from."""
    moved_aside: Path | None = None
    """Where --no-resume moved the previous state, if anything was there."""
    notes: tuple[str, ...] = ()
    """What a resume re-planned, and a changed LR schedule (printed by :func:`write_run_dir`)."""


# --------------------------------------------------------------------------- pure parts
def check_plan_matches(cfg: RunConfig, p: Plan) -> None:
    """A plan given with --plan must describe the hardware the config launches on."""
    hw = p.hardware
    if (hw.nodes, hw.gpus_per_node) != (cfg.hardware.nodes, cfg.hardware.gpus_per_node):
        raise ConfigError(
            f"--plan: the plan was compiled for {hw.nodes} node(s) × {hw.gpus_per_node} GPUs, but this launch "
            f"is {cfg.hardware.nodes} × {cfg.hardware.gpus_per_node}; recompile it (`shardtrain plan ... "
            f"--nodes {cfg.hardware.nodes} --gpus-per-node {cfg.hardware.gpus_per_node} --json --full-json`) "
            f"or drop --plan")


def run_file_names(cfg: RunConfig, p: Plan) -> list[str]:
    """The run files :func:`write_run_dir` writes for this plan, in order (what `launch --dry-run` lists)."""
    from shardtrain.emit.runtime import engine_files
    return [rf.RUN_YAML, rf.PLAN_JSON, *engine_files(plan_with_facts(cfg, p)), rf.COMMAND_TXT]


def plan_with_facts(cfg: RunConfig, p: Plan) -> Plan:
    """The plan with the runtime facts the ranks read from plan.json (emit/runtime.py); emitter errors
    (e.g. DeepSpeedConfigError: the key, the value and the fix) become ConfigError."""
    from shardtrain.emit.runtime import with_runtime_facts
    try:
        return with_runtime_facts(cfg, p)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def default_run_dir(cfg: RunConfig, config_path: str | os.PathLike | None) -> Path:
    """``<run.output_dir>/<run.name or config file stem>``, absolute (as `shardtrain sbatch`)."""
    name = cfg.run.name or (Path(config_path).stem if isinstance(config_path, (str, os.PathLike)) else None)
    if not name:
        name = f"{cfg.model.name or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
        name = name.replace("/", "_")
    return Path(cfg.run.output_dir, name).absolute()


#: command.txt of a multi-node run dir prepared without a launch: where every node's launcher meets.
HEAD_PLACEHOLDER = "NODE0_ADDRESS"


def default_command_text(cfg: RunConfig, p: Plan, run_dir: Path) -> str:
    """command.txt for a run dir prepared without a launch (`prepare_run_dir`; `shardtrain sbatch` writes
    its batch script instead, `shardtrain launch` the command it runs): node 0's launcher command for the
    PLAN's hardware. The device comes from the config and the plan, never from the machine that writes
    the file (a login node without GPUs prepares GPU jobs): CPU/gloo only for run.device: cpu; auto is
    CUDA/nccl, the plan's hardware being GPUs (the ranks still use CPU where none is visible)."""
    from shardtrain.compiler.specs import Device
    from shardtrain.launcher.rankstart import (build_launch, choose_launcher, render_launch_script,
                                               rendezvous_port, run_dir_key)
    from shardtrain.slurm.resources import cpus_per_task  # pure: the CPUs a node's ranks get
    device = Device.CPU if cfg.run.device == Device.CPU else Device.CUDA
    nodes, nproc = p.hardware.nodes, p.hardware.gpus_per_node
    run_dir = Path(run_dir).absolute()
    multi = {} if nodes == 1 else dict(nnodes=nodes, node_rank=0, rdzv_endpoint=(
        f"{HEAD_PLACEHOLDER}:{rendezvous_port(run_dir_key(str(run_dir)))}"))
    spec = build_launch(run_dir=run_dir, launcher=choose_launcher(None, cfg, p), nproc_per_node=nproc,
                        gpus=0 if device is Device.CPU else nproc, device=device.value,
                        cpu_count=cpus_per_task(p), expandable_segments=p.hardware.expandable_segments, **multi)
    comment = (f"{spec.launcher}: {nodes} node(s) × {nproc} processes, node rank 0, "
               f"{'CPU/gloo' if device is Device.CPU else 'CUDA/nccl'} (run.device: {cfg.run.device}; "
               "from the plan, prepared without a launch)")
    if nodes > 1:
        comment += (f"\nevery node runs this with its own node rank; {HEAD_PLACEHOLDER} = the first node's "
                    "address")
    return render_launch_script(spec.argv, spec.env, comment=comment)


# --------------------------------------------------------------------------- effects
def _atomic_write(path: Path, text: str) -> None:
    from shardtrain.config.safe_io import write_text_atomic  # temp file + rename, mode from the umask (issue 22)
    write_text_atomic(path, text)


def has_state(run_dir: Path) -> bool:
    """True when the workers have written checkpoints or metrics here."""
    ck = run_dir / rf.CHECKPOINTS
    return (ck.is_dir() and any(ck.iterdir())) or (run_dir / rf.METRICS_JSONL).is_file() or (run_dir / rf.FINAL).exists()


def record_config_and_plan(run_dir: Path, cfg: RunConfig, p: Plan) -> None:
    """Rewrite run.yaml and plan.json only (a re-plan after OOM records its new batch split before
    :func:`write_run_dir` compares the run dir's config with the launch's)."""
    for name, text in ((rf.RUN_YAML, rf.config_text(cfg.to_dict())), (rf.PLAN_JSON, rf.json_text(p.to_json()))):
        _atomic_write(Path(run_dir) / name, text)


def move_state_aside(run_dir: Path) -> Path | None:
    """--no-resume: move checkpoints, metrics, final/, memory reports and logs to previous/<timestamp>/."""
    entries = [run_dir / e for e in rf.STATE_ENTRIES] + sorted(run_dir.glob(rf.MEMORY_RANK_GLOB))
    entries = [e for e in entries if e.exists()]
    if not entries:
        return None
    dest = run_dir / rf.PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    for e in entries:
        shutil.move(str(e), str(dest / e.name))
    return dest


def write_run_dir(run_dir: str | os.PathLike, cfg: RunConfig, p: Plan, *, command_text: str | None = None,
                  resume: bool = True, move_aside: bool = True) -> PreparedRun:
    """Write (or re-write) the run files; see the module docstring for the resume rules.

    ``resume=False`` starts fresh: existing state is moved aside when ``move_aside`` (only node 0 of a
    multi-node launch should do that on a shared file system).
    """
    run_dir = Path(run_dir).absolute()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} exists and is not a directory; pick another --run-dir")
    new_cfg = cfg.to_dict()
    p = plan_with_facts(cfg, p)
    new_plan = p.to_json()
    moved, notes = None, ()
    state = run_dir.is_dir() and has_state(run_dir)
    if state and not resume:
        moved = move_state_aside(run_dir) if move_aside else None
        state = False
    elif state:
        notes = _check_resume(run_dir, new_cfg, new_plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rf.LOGS).mkdir(exist_ok=True)
    (run_dir / rf.CHECKPOINTS).mkdir(exist_ok=True)
    files = {rf.RUN_YAML: rf.config_text(new_cfg), rf.PLAN_JSON: rf.json_text(new_plan)}
    from shardtrain.emit.runtime import engine_files
    for name, d in engine_files(p).items():  # the configs the facts above were built with
        files[name] = rf.json_text(d)
    files[rf.COMMAND_TXT] = command_text if command_text is not None else default_command_text(cfg, p, run_dir)
    for name in rf.RUN_FILES:  # a stale engine config from an earlier strategy would mislead the worker
        if name not in files:
            (run_dir / name).unlink(missing_ok=True)
    for name, text in files.items():
        _atomic_write(run_dir / name, text)
    return PreparedRun(run_dir=run_dir, config=cfg, plan=p, files=tuple(files), has_state=state, moved_aside=moved,
                       notes=notes)


def _read_mapping(path: Path, parse) -> dict:
    """A run file as a dict; a damaged or missing one compares as empty (so every key counts as changed)."""
    try:
        got = parse(path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return {}
    return got if isinstance(got, dict) else {}


def _check_resume(run_dir: Path, new_cfg: dict, new_plan: dict) -> tuple[str, ...]:
    """Refuse (ConfigError, one change per line) a resume that changes what the checkpoints depend on;
    else print and return what was re-planned and whether the LR schedule changed (resume_check.py)."""
    old_cfg = _read_mapping(run_dir / rf.RUN_YAML, yaml.safe_load) if (run_dir / rf.RUN_YAML).is_file() else new_cfg
    old_plan = _read_mapping(run_dir / rf.PLAN_JSON, json.loads) if (run_dir / rf.PLAN_JSON).is_file() else {}
    verdict = resume_check.check(old_cfg, new_cfg, old_plan, new_plan)
    if verdict.refused:
        raise ConfigError(verdict.error(run_dir))
    notes = tuple(n for n in (verdict.replanned, verdict.schedule and f"warning: {verdict.schedule}") if n)
    for n in notes:
        print(f"[shardtrain] {n}", flush=True)
    return notes


def prepare_run_dir(config_path_or_dict, overrides: dict, run_dir, *, command_text: str | None = None) -> Path:
    """Compile the run config (a YAML path or a raw dict, plus dotted overrides such as
    ``{"train.steps": 20}``) and write the run dir; returns its absolute path.

    Used by `shardtrain sbatch` (stable signature). Keeps existing checkpoints and metrics when the config
    is the same (resume); raises ConfigError when it changed in a way that invalidates them, and
    NoFitError (a PlanningError) when the plan does not fit. ``command_text``: command.txt (default:
    :func:`default_command_text`; a Slurm job passes its own batch script).
    """
    cfg, p = pipeline.compile(config_path_or_dict, overrides, must_fit=True)
    return write_run_dir(run_dir, cfg, p, command_text=command_text,
                         resume=cfg.run.resume is not Resume.NEVER).run_dir
