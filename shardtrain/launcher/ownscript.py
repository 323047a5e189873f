"""The plan applied to the user's OWN training script (`shardtrain launch ... -- python train.py ARGS`).

Pure functions (no process, no environment read, no file write):

- :func:`parse_command`: the user's command -> a :class:`~shardtrain.launcher.rankstart.Entrypoint`
  (``python SCRIPT``, ``python -m MODULE`` or another program) and the interpreter it names;
- :func:`accelerate_env`: the plan as accelerate's OWN environment contract, the variables
  ``accelerate launch`` exports for its ranks (accelerate 1.15 ``utils/launch.py``
  ``prepare_multi_gpu_env`` / ``prepare_deepspeed_cmd_env``), so an unmodified ``Accelerator()`` or HF
  ``Trainer`` picks up FSDP2, DeepSpeed (the Trainer-flavoured JSON in the run dir) and mixed precision.
  The values are those of emit's accelerate YAML (:func:`shardtrain.emit.accelerate.accelerate_config`):
  one decision, two spellings;
- :func:`trainer_argv`: opt-in (``--trainer-args``) ``TrainingArguments`` flags for scripts that parse
  them with ``HfArgumentParser`` (HF examples, TRL): micro batch, accumulation, checkpointing, precision,
  optimizer, and ``--deepspeed FILE`` / ``--use_cpu`` where that is how the Trainer reads them. They are
  appended after the user's own arguments, so they win (argparse keeps the last value).

CPU ranks (gloo), from accelerate 1.15's ``state.py``: ``ACCELERATE_USE_CPU=true`` makes ``PartialState``
start a MULTI_CPU gloo group under torchrun; without it, a CPU rank sees no accelerator and runs alone.
But the same variable makes ``AcceleratorState`` skip DeepSpeed (``... and not cpu``), so DeepSpeed plans
on CPU are read through ``TrainingArguments(use_cpu=True, deepspeed=FILE)`` (``--trainer-args``), which
sets ``cpu`` for the process group only. accelerate has no FSDP on CPU (its FSDP branch needs a
MULTI_GPU-like type): there an FSDP plan's variables are read (``FullyShardedDataParallelPlugin()`` gets
version 2 and the wrap policy) but the ranks run DistributedType.MULTI_CPU (DDP).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

from shardtrain.compiler.specs import Engine
from shardtrain.emit.trainer import HF_DS_CONFIG_JSON as SCRIPT_DS_CONFIG  # noqa: F401 (re-exported)
from shardtrain.launcher.rankstart import EntryKind, Entrypoint

# SCRIPT_DS_CONFIG: the Trainer-facing DeepSpeed JSON own scripts get in the run dir (lr/weight decay/clipping
# "auto"; emit/trainer.py trainer_deepspeed_config, the bundle's hf_ds_config.json).
#: ``python``, ``python3``, ``python3.11``, ``/venv/bin/python`` ...
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")
#: interpreter options that take no value and change nothing the launchers need to know
_PYTHON_FLAGS = {"-u", "-B", "-O", "-OO", "-s", "-E", "-b", "-bb"}
#: TrainingArguments defaults (transformers 5 training_args.py) the plan's betas/eps are compared with
_ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


class OwnScriptError(ValueError):
    """A user command the launchers cannot run as given (one line: what, and the fix)."""


@dataclass(frozen=True)
class OwnScript:
    """Everything a launch of the user's command adds to the plan's launch."""
    entry: Entrypoint
    python: str | None
    """The interpreter the command names (``python``), None for another program."""
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)
    """Run-dir file name -> text (the Trainer-facing DeepSpeed JSON)."""
    trainer_args: tuple[str, ...] = ()
    """The flags appended to the user's arguments (empty unless --trainer-args)."""


def is_python(word: str) -> bool:
    return bool(_PYTHON.match(PurePath(word).name))


def parse_command(argv: Sequence[str]) -> tuple[Entrypoint, str | None]:
    """``["python", "train.py", "--lr", "1e-4"]`` -> (SCRIPT train.py with its args, "python");
    ``python -m pkg.train ...`` -> MODULE; ``./train.sh ...`` -> PROGRAM (the launchers' --no-python)."""
    argv = [str(a) for a in argv]
    if not argv or not argv[0]:
        raise OwnScriptError("the command after `--` is empty; write e.g. `shardtrain launch RUN.yaml -- python "
                             "train.py ARGS`")
    if not is_python(argv[0]):
        return Entrypoint(EntryKind.PROGRAM, argv[0], tuple(argv[1:])), None
    python, rest = argv[0], argv[1:]
    while rest and rest[0] in _PYTHON_FLAGS:
        rest = rest[1:]
    if not rest:
        raise OwnScriptError(f"`{python}` without a script: give the training script, e.g. -- {python} train.py")
    if rest[0] == "-m":
        if len(rest) < 2:
            raise OwnScriptError(f"`{python} -m` without a module name; write -- {python} -m pkg.train ARGS")
        return Entrypoint(EntryKind.MODULE, rest[1], tuple(rest[2:])), python
    if rest[0].startswith("-"):
        raise OwnScriptError(f"`{python} {rest[0]}`: the launchers run a script file or -m MODULE on every rank; "
                             f"put the code in a file and write -- {python} train.py ARGS")
    return Entrypoint(EntryKind.SCRIPT, rest[0], tuple(rest[1:])), python


def _flag(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def accelerate_env(plan, *, device: str, ds_config_path: str | None = None) -> dict[str, str]:
    """accelerate's environment for the plan: what ``accelerate launch --config_file <emitted YAML>`` exports
    (variable names and spellings of accelerate 1.15 utils/launch.py)."""
    from shardtrain.emit.accelerate import accelerate_config
    d = accelerate_config(plan, ds_config_path=ds_config_path or SCRIPT_DS_CONFIG,
                          main_process_ip="127.0.0.1" if plan.hardware.nodes > 1 else None)
    # DeepSpeed plans: "no", as accelerate's launcher exports it; precision lives in the DeepSpeed JSON
    env = {"ACCELERATE_MIXED_PRECISION": d.get("mixed_precision", "no")}
    kind = d["distributed_type"]
    if kind == "DEEPSPEED":
        ds = d["deepspeed_config"]
        env.update({"ACCELERATE_USE_DEEPSPEED": "true",
                    # the keys the config set (accelerate launch_command): DeepSpeedPlugin checks them against the JSON
                    "ACCELERATE_CONFIG_DS_FIELDS": ",".join(ds),
                    "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds["deepspeed_config_file"]),
                    "ACCELERATE_DEEPSPEED_ZERO3_INIT": _flag(ds["zero3_init_flag"])})
    elif kind == "FSDP":
        f = d["fsdp_config"]
        env.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(f["fsdp_version"]),
                    "FSDP_RESHARD_AFTER_FORWARD": _flag(f["fsdp_reshard_after_forward"]),
                    "FSDP_OFFLOAD_PARAMS": _flag(f["fsdp_offload_params"]),
                    "FSDP_AUTO_WRAP_POLICY": f["fsdp_auto_wrap_policy"],
                    "FSDP_STATE_DICT_TYPE": f["fsdp_state_dict_type"],
                    "FSDP_CPU_RAM_EFFICIENT_LOADING": _flag(f["fsdp_cpu_ram_efficient_loading"]),
                    "FSDP_SYNC_MODULE_STATES": _flag(f["fsdp_sync_module_states"]),
                    "FSDP_ACTIVATION_CHECKPOINTING": _flag(f["fsdp_activation_checkpointing"])})
        if f.get("fsdp_transformer_layer_cls_to_wrap"):
            env["FSDP_TRANSFORMER_CLS_TO_WRAP"] = str(f["fsdp_transformer_layer_cls_to_wrap"])
        pc = d.get("parallelism_config")
        if pc:  # HYBRID_SHARD: accelerate's prepare_extend_env_parallelism_config
            env.update({"ACCELERATE_USE_PARALLELISM_CONFIG": "true",
                        "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": str(pc["parallelism_config_dp_replicate_size"]),
                        "PARALLELISM_CONFIG_DP_SHARD_SIZE": str(pc["parallelism_config_dp_shard_size"]),
                        "PARALLELISM_CONFIG_TP_SIZE": "1", "PARALLELISM_CONFIG_CP_SIZE": "1"})
    if device == "cpu" and kind != "DEEPSPEED":
        env["ACCELERATE_USE_CPU"] = "true"  # a gloo MULTI_CPU group (see the module docstring)
    return env


def trainer_argv(plan, *, device: str, ds_config_path: str | None = None) -> list[str]:
    """``TrainingArguments`` flags (HfArgumentParser spelling) for the plan's decisions."""
    from shardtrain.emit.trainer import trainer_arguments
    kw = trainer_arguments(plan)
    out = ["--per_device_train_batch_size", str(kw["per_device_train_batch_size"]),
           "--gradient_accumulation_steps", str(kw["gradient_accumulation_steps"]),
           "--bf16", _flag(kw["bf16"]), "--fp16", _flag(kw["fp16"])]
    ckpt = kw.get("activation_checkpointing", kw.get("gradient_checkpointing", False))
    fsdp_ckpt = plan.chosen.strategy.engine is Engine.FSDP and ckpt
    if ckpt and not fsdp_ckpt:  # FSDP checkpoints through FSDP_ACTIVATION_CHECKPOINTING (the Trainer refuses both)
        out.append("--gradient_checkpointing")
    for key in ("optim",):
        if key in kw:
            out += [f"--{key}", str(kw[key])]
    if kw.get("use_liger_kernel"):
        out.append("--use_liger_kernel")
    for key, default in _ADAM_DEFAULTS.items():
        if key in kw and float(kw[key]) != default:
            out += [f"--{key}", str(kw[key])]
    if plan.chosen.strategy.engine is Engine.DEEPSPEED:
        out += ["--deepspeed", str(ds_config_path or SCRIPT_DS_CONFIG)]
    if device == "cpu":
        out.append("--use_cpu")
    return out


def script_files(plan, cfg) -> dict[str, dict]:
    """{SCRIPT_DS_CONFIG: the Trainer/accelerate DeepSpeed JSON} for DeepSpeed plans, else {}. The run dir's
    ds_config.json is our worker's (explicit lr): the Trainer would refuse its lr against learning_rate."""
    if plan.chosen.strategy.engine is not Engine.DEEPSPEED:
        return {}
    from shardtrain.emit.trainer import trainer_deepspeed_config
    return {SCRIPT_DS_CONFIG: trainer_deepspeed_config(plan, cfg)}


def own_script(command: Sequence[str], plan, cfg, *, run_dir: str, device: str, trainer_args: bool = False,
               environ: Mapping[str, str] | None = None) -> OwnScript:
    """The whole own-script addition for a launch: entry point, interpreter, env, run-dir files, Trainer flags.
    ``environ``: variables the user already exported win over ours (their explicit choice)."""
    import json
    entry, python = parse_command(command)
    files = {name: json.dumps(d, indent=2) + "\n" for name, d in script_files(plan, cfg).items()}
    ds_path = f"{run_dir.rstrip('/')}/{SCRIPT_DS_CONFIG}" if files else None
    env = {k: v for k, v in accelerate_env(plan, device=device, ds_config_path=ds_path).items()
           if k not in (environ or {})}
    extra: tuple[str, ...] = ()
    if trainer_args:
        extra = tuple(trainer_argv(plan, device=device, ds_config_path=ds_path))
        entry = Entrypoint(entry.kind, entry.target, entry.args + extra)
    return OwnScript(entry=entry, python=python, env=env, files=files, trainer_args=extra)
