"""`shardtrain check` for every other file `emit --out` writes: what kind a file is, and its lint.

A file's kind comes from its name and content (never from the name alone: a renamed file still is what it
is): DeepSpeed JSON and accelerate YAML (emit/check.py), FSDP2 settings (fsdp.json), TrainingArguments
(trainer_args.json), peft LoraConfig, BitsAndBytesConfig, plan.json, run.yaml, launch.sh, the DeepSpeed
hostfile and the bundle README. Each is judged by the code that reads it where that code is installed:
transformers' HfTrainerDeepSpeedConfig for the Trainer's DeepSpeed mismatches, peft's LoraConfig,
transformers' BitsAndBytesConfig, DeepSpeed's hostfile parser, `bash -n`, shardtrain's own Plan and run-config
parsers. Findings name the key, the problem and the fix (emit/check.py Finding).
"""
from __future__ import annotations

import dataclasses
import enum
import math
import subprocess
from pathlib import Path

from shardtrain.emit import deepspeed as K
from shardtrain.emit import engine_schema as S
from shardtrain.emit.check import ERROR, INFO, WARNING, Finding
from shardtrain.emit.check_hf import check_bnb, check_lora, check_trainer_args

_FSDP_KEYS = {"sharding", "mesh_shape", "wrap_class", "param_dtype", "reduce_dtype"}
_DS_KEYS = {K.ZERO, K.MICRO_BATCH, K.TRAIN_BATCH_SIZE}
_TRAINER_HINTS = {"per_device_train_batch_size", "learning_rate", "output_dir", "activation_checkpointing",
                  "gradient_checkpointing", "num_train_epochs", "fsdp_config", "deepspeed"}
_DTYPES = {"bfloat16", "float16", "float32"}
_LAUNCHERS = ("torchrun", "deepspeed")



class Kind(str, enum.Enum):
    DEEPSPEED = "deepspeed"
    ACCELERATE = "accelerate"
    FSDP = "fsdp settings"
    TRAINER_ARGS = "trainer arguments"
    LORA = "peft LoraConfig"
    BNB = "BitsAndBytesConfig"
    PLAN = "plan"
    RUN_CONFIG = "run config"
    LAUNCH_SCRIPT = "launch script"
    HOSTFILE = "hostfile"
    README = "bundle README"
    COMMAND = "launch command"


def kind_of_text(path: Path, text: str) -> Kind | None:
    """Kinds that are not a JSON/YAML mapping: the launch script, the hostfile, the README."""
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if path.suffix == ".sh" or first.startswith("#!"):
        return Kind.LAUNCH_SCRIPT
    if path.suffix.lower() == ".md":
        return Kind.README
    if path.name == "hostfile":
        return Kind.HOSTFILE
    if len(text.strip().splitlines()) == 1 and first.split(" ", 1)[0] in _LAUNCHERS:
        return Kind.COMMAND  # `emit --format torchrun / deepspeed-cmd` saved to a file
    return None


def _run_config_sections() -> set[str]:
    """The run config's top-level sections, from the schema itself (a new section, e.g. `parallel:`, is
    recognised without an edit here)."""
    import dataclasses

    from shardtrain.config.schema import RunConfig
    return {f.name for f in dataclasses.fields(RunConfig)}


def kind_of_mapping(data: dict) -> Kind:
    """A mapping's kind by its keys (DeepSpeed when nothing else matches: its checker names unknown keys)."""
    keys = set(data)
    if "distributed_type" in keys or "compute_environment" in keys:
        return Kind.ACCELERATE
    if _FSDP_KEYS <= keys:
        return Kind.FSDP
    if {"strategy", "reasons"} <= keys or {"strategy", "spec"} <= keys:
        return Kind.PLAN
    if "model" in keys and keys <= _run_config_sections():
        return Kind.RUN_CONFIG
    if "target_modules" in keys or ("r" in keys and "lora_alpha" in keys) or data.get("peft_type") == "LORA":
        return Kind.LORA
    if any(str(k).startswith("bnb_4bit_") or k in ("load_in_4bit", "load_in_8bit") for k in keys):
        return Kind.BNB
    if keys & _TRAINER_HINTS and not keys & _DS_KEYS:
        return Kind.TRAINER_ARGS
    return Kind.DEEPSPEED


# ---------------------------------------------------------------- fsdp.json (FSDP2 settings of our worker)
def check_fsdp_settings(d: dict, wrap_class: str | None = None) -> list[Finding]:
    from shardtrain.compiler.facts import FsdpSettings
    known = {f.name for f in dataclasses.fields(FsdpSettings)}
    out = [Finding(ERROR, str(k), "not an FSDP2 setting of shardtrain's worker", f"rename it to "
                   f"'{S.near_miss(k, known)}'" if S.near_miss(k, known) else "delete it") for k in d if k not in known]
    if out:
        return out
    try:
        f = FsdpSettings.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        return [Finding(ERROR, "<top level>", f"not readable as FSDP2 settings ({e})", "re-emit it with shardtrain emit")]
    if math.prod(f.mesh_shape) != f.world_size or len(f.mesh_shape) != len(f.mesh_dim_names):
        out.append(Finding(ERROR, "mesh_shape", f"{list(f.mesh_shape)} (dims {list(f.mesh_dim_names)}) does not "
                           f"multiply to world_size {f.world_size}", "one dim per name; their product = world_size"))
    if f.sharding == "SHARD_GRAD_OP" and f.reshard_after_forward:
        out.append(Finding(ERROR, "reshard_after_forward", "true, but SHARD_GRAD_OP keeps params gathered", "set false"))
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(f, key) not in _DTYPES:
            out.append(Finding(ERROR, key, f"{getattr(f, key)!r} is not a dtype", f"one of {sorted(_DTYPES)}"))
    every = {"none": 0, "full": 1}.get(f.activation_checkpointing)
    if f.activation_checkpointing not in ("none", "full", "selective") or (every is not None and f.checkpoint_every
                                                                          != every):
        out.append(Finding(ERROR, "activation_checkpointing", f"{f.activation_checkpointing!r} with checkpoint_every "
                           f"{f.checkpoint_every}", "none/0, full/1 or selective/k"))
    if f.quant_storage_dtype not in (None, f.param_dtype):
        out.append(Finding(ERROR, "quant_storage_dtype", f"{f.quant_storage_dtype} != param_dtype {f.param_dtype}: "
                           "4-bit weights must be stored in the sharded dtype", f"set it to {f.param_dtype}"))
    if wrap_class and f.wrap_class != wrap_class:
        out.append(Finding(ERROR, "wrap_class", f"{f.wrap_class!r} is not the model's decoder layer ({wrap_class})",
                           f"set it to {wrap_class}"))
    return out


# ---------------------------------------------------------------- plan.json, run.yaml, launch.sh, hostfile, README
def check_plan(d: dict) -> list[Finding]:
    from shardtrain.compiler.plan import Plan
    try:
        p = Plan.from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return [Finding(ERROR, "<top level>", f"not a full plan ({type(e).__name__}: {e})",
                        "write one with `shardtrain plan ... --json --full-json` or `shardtrain emit --out`")]
    mesh = p.parallel
    if mesh.world != p.chosen.world_size:
        return [Finding(ERROR, "parallel", f"the mesh {mesh.label()} multiplies to {mesh.world} ranks, but the "
                        f"plan's world size is {p.chosen.world_size}", "re-plan (`shardtrain emit --out`); do not edit "
                        "the mesh of a plan by hand")]
    if not p.chosen.fits:
        return [Finding(WARNING, "chosen", f"the {p.strategy.value} plan does not fit: {'; '.join(p.chosen.why_not)}",
                        "re-plan with another strategy or a smaller job")]
    return []


def check_run_config(path: Path) -> list[Finding]:
    from shardtrain.config.schema import ConfigError, load_run_config
    try:
        load_run_config(path)
    except ConfigError as e:
        return [Finding(ERROR, "<run config>", str(e), "fix the key it names")]
    return []


def check_launch_script(path: Path) -> list[Finding]:
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    if r.returncode:
        return [Finding(ERROR, "<script>", f"bash -n: {r.stderr.strip().splitlines()[-1]}", "re-emit it")]
    return []


def check_hostfile(text: str) -> list[Finding]:
    try:
        import contextlib
        import sys
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.launcher.runner import _parse_hostfile
    except ImportError:
        return [Finding(WARNING, "<top level>", "DeepSpeed is not installed here", "check where it is installed")]
    try:
        _parse_hostfile(text.splitlines())
    except ValueError as e:
        return [Finding(ERROR, "<hostfile>", str(e), "one `HOST slots=N` line per node")]
    return []


def check_command(text: str) -> list[Finding]:
    """A torchrun / deepspeed command line, parsed by that launcher's own argument parser."""
    import contextlib
    import shlex
    import sys
    argv = shlex.split(text)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its accelerator choice on import
            if argv[0] == "torchrun":
                from torch.distributed.run import get_args_parser
                parse = get_args_parser().parse_args
            else:
                from deepspeed.launcher.runner import parse_args as parse
    except ImportError:
        return [Finding(WARNING, "<command>", f"{argv[0]} is not installed here", "check where it is installed")]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            parse(argv[1:])
    except SystemExit:
        return [Finding(ERROR, "<command>", f"{argv[0]}'s argument parser refuses it", "re-emit it")]
    return []


def check_readme(path: Path, text: str) -> list[Finding]:
    from shardtrain.emit.readme import FILES_HEADING, TITLE_PREFIX
    if not text.startswith(TITLE_PREFIX):
        return [Finding(ERROR, "<top level>", "not a shardtrain bundle README", "check a file `shardtrain emit` wrote")]
    part = text.split(FILES_HEADING, 1)[-1].split("\n## ", 1)[0]
    names = [line.split("`")[1] for line in part.splitlines() if line.startswith("- `")]
    return [Finding(WARNING, n, "listed in the README but not next to it", "copy the whole bundle directory")
            for n in names if not (path.parent / n).is_file()]


def check_other(kind: Kind, data, path: Path, *, world_size: int | None, wrap_class: str | None) -> list[Finding]:
    """Lint one of the non-engine kinds."""
    if kind is Kind.FSDP:
        return check_fsdp_settings(data, wrap_class)
    if kind is Kind.TRAINER_ARGS:
        return check_trainer_args(data, path, world_size)
    if kind is Kind.LORA:
        return check_lora(data)
    if kind is Kind.BNB:
        return check_bnb(data, path)
    if kind is Kind.PLAN:
        return check_plan(data)
    if kind is Kind.RUN_CONFIG:
        return check_run_config(path)
    if kind is Kind.LAUNCH_SCRIPT:
        return check_launch_script(path)
    if kind is Kind.HOSTFILE:
        return check_hostfile(data)
    if kind is Kind.README:
        return check_readme(path, data)
    if kind is Kind.COMMAND:
        return check_command(data)
    return [Finding(INFO, "<top level>", f"{kind.value}: nothing to check", "")]
