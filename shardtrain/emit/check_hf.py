"""`shardtrain check` for the files a user's own script reads: trainer_args.json (TrainingArguments),
lora_config.json (peft LoraConfig), bnb_config.json (BitsAndBytesConfig). Judged by the installed
transformers / peft themselves; the DeepSpeed JSON trainer_args.json points at goes through transformers'
HfTrainerDeepSpeedConfig.trainer_config_process (the mismatches TrainingArguments(deepspeed=...) raises).

A `check` module: it imports transformers / peft inside the checks, when `shardtrain check` runs (judging a
file by the code that reads it is the point). `shardtrain emit` never imports them (tests/test_runtime_facts.py
names the check modules that may, and runs emit to see that none is loaded).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import types
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.emit import deepspeed as K
from shardtrain.emit import engine_schema as S
from shardtrain.emit.check import ERROR, WARNING, Finding, check_deepspeed

# bitsandbytes (imported by peft / transformers here) logs on a CPU with AVX512-bf16 that an optional CPU kernel
# package is missing (backends/cpu/ops.py): noise for a check that runs no kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

#: fsdp_config keys TrainingArguments reads (transformers training_args.py _process_fsdp_args; "fsdp_" prefix stripped)
TRAINER_FSDP_KEYS = {"version", "reshard_after_forward", "cpu_offload", "activation_checkpointing",
                     "cpu_ram_efficient_loading", "state_dict_type", "auto_wrap_policy", "transformer_layer_cls_to_wrap",
                     "min_num_params", "xla", "xla_fsdp_settings", "xla_fsdp_grad_ckpt", "forward_prefetch",
                     "backward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers"}


def sibling(path: Path, name: str) -> Path | None:
    p = path.parent / name
    return p if p.is_file() else None


def resolve_ref(ref: str, path: Path, what: str, out: list) -> Path | None:
    """A file another file points at (absolute, or relative to where you launch). A bundle that was moved
    (emitted on a login node, copied to the cluster) still has the file next to this one: check that, and
    warn that the path written in the file is wrong here."""
    p = Path(ref)
    if p.is_file():
        return p
    if (path.parent / p).is_file() and not p.is_absolute():
        return path.parent / p
    near = sibling(path, p.name)
    if near is not None:
        out.append(Finding(WARNING, what, f"{ref} does not exist here; checked {near.name} next to this file instead "
                           "(the bundle was moved?)", "launch from where the path is valid, or re-emit with "
                           "--run-dir set to where the bundle lives"))
        return near
    out.append(Finding(ERROR, what, f"{ref} does not exist", "point it at the file (relative paths resolve from "
                       "where you launch)"))
    return None


# ---------------------------------------------------------------- trainer_args.json
def _training_arguments_defaults() -> dict | None:
    try:
        from transformers import TrainingArguments
    except ImportError:
        return None
    return {f.name: (f.default if f.default is not dataclasses.MISSING else
                     f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            for f in dataclasses.fields(TrainingArguments) if f.init}


def check_trainer_args(d: dict, path: Path, world_size: int | None = None) -> list[Finding]:
    """Keys TrainingArguments takes; the Trainer's own rules (FSDP checkpointing twice); the DeepSpeed JSON it
    points at run through transformers' HfTrainerDeepSpeedConfig.trainer_config_process with these values."""
    defaults = _training_arguments_defaults()
    if defaults is None:
        return [Finding(WARNING, "<top level>", "transformers is not installed here, so TrainingArguments keys were "
                        "not checked", "run `shardtrain check` where transformers is installed")]
    out = []
    for k in d:
        if k not in defaults:
            hit = S.near_miss(k, defaults)
            out.append(Finding(ERROR, str(k), "TrainingArguments has no such argument (TypeError)",
                               f"rename it to '{hit}'" if hit else "delete it"))
    fc = d.get("fsdp_config")
    if isinstance(fc, dict):
        for k in fc:
            if str(k).removeprefix("fsdp_") not in TRAINER_FSDP_KEYS:
                out.append(Finding(WARNING, f"fsdp_config.{k}", "the Trainer does not read this key", "delete it"))
        if fc.get("activation_checkpointing") and d.get("activation_checkpointing"):
            out.append(Finding(ERROR, "activation_checkpointing", "set together with fsdp_config.activation_"
                               "checkpointing: the Trainer refuses both", "keep the fsdp_config one"))
        if not d.get("fsdp"):
            out.append(Finding(WARNING, "fsdp", "fsdp_config without fsdp: the Trainer ignores it", "set fsdp: true"))
    out += _against_the_plan(d, path)
    ds = d.get("deepspeed")
    if isinstance(ds, str):
        p = resolve_ref(ds, path, "deepspeed", out)
        if p is not None:
            from shardtrain.config.safe_io import load_mapping
            ds = load_mapping(p, fmt="json", what="deepspeed", fix="point deepspeed at a DeepSpeed JSON")
    if isinstance(ds, dict):
        out += [Finding(f.severity, f"deepspeed: {f.key}", f.problem, f.fix)
                for f in check_deepspeed(ds, consumer="trainer", world_size=world_size)]
        out += _trainer_mismatches(ds, {**defaults, **d}, world_size)
    return out


def _against_the_plan(d: dict, path: Path) -> list[Finding]:
    """The plan's decisions in trainer_args.json vs the plan.json beside it (an emitted bundle): an edited
    micro batch, accumulation, precision or checkpointing no longer runs the plan that was checked to fit.
    Under DeepSpeed the Trainer itself refuses a batch mismatch (:func:`_trainer_mismatches`); under DDP/FSDP
    nothing else would."""
    plan_file = sibling(path, rf.PLAN_JSON)
    if plan_file is None:
        return []
    from shardtrain.compiler.plan import Plan
    from shardtrain.emit.trainer import training_arguments
    try:
        want = training_arguments(Plan.from_json(json.loads(plan_file.read_text())))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return []  # plan.json's own check reports it
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "activation_checkpointing")
    pairs = [(k, d.get(k, False if isinstance(want[k], bool) else None), want[k]) for k in keys if k in want]
    if isinstance(want.get("fsdp_config"), dict):  # FSDP: its own checkpointing is the plan's
        got = d.get("fsdp_config") if isinstance(d.get("fsdp_config"), dict) else {}
        pairs.append(("fsdp_config.activation_checkpointing", got.get("activation_checkpointing", False),
                      want["fsdp_config"]["activation_checkpointing"]))
    return [Finding(ERROR, k, f"{got!r}, but the plan next to this file says {w!r}",
                    f"set it to {w!r} (or re-plan: `shardtrain emit --out` with your change)")
            for k, got, w in pairs if got != w]


def _trainer_mismatches(ds: dict, args: dict, world_size: int | None) -> list[Finding]:
    """What TrainingArguments(deepspeed=...) itself would refuse: HfTrainerDeepSpeedConfig's mismatches."""
    try:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    except ImportError:
        return []
    if world_size is None:
        nums = [ds.get(k) for k in (K.TRAIN_BATCH_SIZE, K.MICRO_BATCH, K.GRAD_ACCUM)]
        ok = all(isinstance(v, int) and v > 0 for v in nums)
        world_size = nums[0] // (nums[1] * nums[2]) if ok and nums[0] % (nums[1] * nums[2]) == 0 else 1
    ns = types.SimpleNamespace(**args, world_size=world_size)
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(ds)))
    try:
        hf.trainer_config_process(ns)
    except (AttributeError, TypeError, ValueError) as e:
        return [Finding(ERROR, "deepspeed", f"transformers cannot read it with these arguments ({e})", "re-emit it")]
    return [Finding(ERROR, "deepspeed", f"TrainingArguments refuses it: {m.strip('- ')} (world size {world_size})",
                    "make the argument and the DeepSpeed JSON agree (or write \"auto\" there)") for m in hf.mismatches]


# ---------------------------------------------------------------- peft / bitsandbytes
def check_lora(d: dict) -> list[Finding]:
    try:
        from peft import LoraConfig
    except ImportError:
        return [Finding(WARNING, "<top level>", "peft is not installed here", "check where peft is installed")]
    try:
        LoraConfig(**d)
    except (TypeError, ValueError) as e:
        return [Finding(ERROR, "<top level>", f"peft's LoraConfig refuses it ({e})", "fix the key it names")]
    return []


def check_bnb(d: dict, path: Path) -> list[Finding]:
    try:
        from transformers import BitsAndBytesConfig
    except ImportError:
        return [Finding(WARNING, "<top level>", "transformers is not installed here", "check where it is installed")]
    try:
        BitsAndBytesConfig(**d)
    except (TypeError, ValueError) as e:
        return [Finding(ERROR, "<top level>", f"BitsAndBytesConfig refuses it ({e})", "fix the key it names")]
    plan_file = sibling(path, rf.PLAN_JSON)
    if plan_file is None or not d.get("load_in_4bit"):
        return []
    from shardtrain.compiler.plan import Plan
    from shardtrain.emit.trainer import quant_storage_dtype
    want = quant_storage_dtype(Plan.from_json(json.loads(plan_file.read_text())))
    got = str(d.get("bnb_4bit_quant_storage") or "uint8").replace("torch.", "")
    if got != want:
        return [Finding(ERROR, "bnb_4bit_quant_storage", f"{got}, but the plan next to this file shards parameters "
                        f"stored as {want}", f"set it to {want}")]
    return []
