"""The plan flags of every command (plan, emit, check, launch, sbatch), generated from ONE table.

Each flag is only a spelling of one run-config key: ``--seq-len 2048`` is ``--set train.seq_len=2048``,
so everything a flag can say, a key can say, and every command takes the same flags. Values stay
strings (or ints, where argparse has always converted them): the schema's coercion (config/coerce.py)
validates them exactly as it validates the YAML, with the same one-line errors. Flags beat ``--set``,
which beats the file.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass

from shardtrain.config.schema import ConfigError


@dataclass(frozen=True)
class Flag:
    flag: str
    """The option as typed, e.g. --gpu-memory."""
    key: str
    """The run-config key it sets, e.g. hardware.gpu_memory."""
    help: str | None = None
    type: type | None = None
    """argparse converter (int where the flag always converted); None: the schema coerces the string."""

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


_DIMS = ("hidden", "layers", "heads", "kv-heads", "vocab", "intermediate")

#: (argparse group, flags) in --help order. The stable interface of architecture.md: keep names.
PLAN_FLAG_GROUPS: tuple[tuple[str, tuple[Flag, ...]], ...] = (
    ("model", (
        Flag("--model", "model.name", "preset name, config.json, HF checkpoint dir or Hub id ORG/NAME[@REVISION]"),
        Flag("--params", "model.params", "parameter count instead of --model, e.g. 7.5e9"),
        *(Flag(f"--{k}", f"model.{k.replace('-', '_')}", f"{k} (with --params)", int) for k in _DIMS))),
    ("hardware", (
        Flag("--nodes", "hardware.nodes", type=int),
        Flag("--gpus-per-node", "hardware.gpus_per_node", type=int),
        Flag("--gpu", "hardware.gpu", "GPU preset, e.g. h100-80gb (see `shardtrain presets`)"),
        Flag("--gpu-memory", "hardware.gpu_memory", "per-GPU memory WITH its unit, e.g. 80GiB or 80GB (a bare 80 "
                                                   "is refused, not guessed)"),
        Flag("--cpu-memory", "hardware.cpu_memory", "host RAM per node WITH its unit, e.g. 1TiB"),
        Flag("--nvme-path", "hardware.nvme_path"),
        Flag("--nvme-capacity", "hardware.nvme_capacity", "free NVMe per node WITH its unit, e.g. 2TB"),
        Flag("--expandable-segments", "hardware.expandable_segments",
             "true|false: the ranks run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (default true)"))),
    ("job", (
        Flag("--seq-len", "train.seq_len", type=int),
        Flag("--micro-batch", "train.micro_batch", "auto or N"),
        Flag("--global-batch", "train.global_batch", type=int),
        Flag("--precision", "train.precision", "bf16|fp16|fp32|bf16_pure"),
        Flag("--method", "train.method", "full|lora|qlora"),
        Flag("--lora-rank", "lora.rank", type=int),
        Flag("--optimizer", "train.optimizer", "adamw|adamw8bit|adafactor|lion|sgd"),
        Flag("--grad-ckpt", "train.grad_ckpt", "auto|none|full|selective|op (op: torchtitan's op-level SAC)"),
        Flag("--attention", "train.attention", "sdpa|flash|eager"),
        Flag("--runner", "train.runner", "shardtrain|hf_trainer|accelerate (what runs the plan: its loss path)"),
        Flag("--loss", "train.loss", "full|chunked|auto (chunked: never the whole fp32 logits)"),
        Flag("--activation-offload", "train.activation_offload", "none|cpu (allow saved activations in host RAM)"),
        Flag("--tiled-mlp", "train.tiled_mlp", "auto|off|N (each MLP in N sequence tiles, ALST tiled MLP)"),
        Flag("--ckpt-offload", "train.ckpt_offload", "auto|off|cpu (checkpointed layer inputs in host RAM)"),
        Flag("--strategy", "train.strategy", "auto|ddp|zero1|zero2|zero3|fsdp_full_shard|fsdp_shard_grad_op|"
                                             "fsdp_hybrid_shard|zero2_offload|zero3_opt_offload|fsdp_offload|"
                                             "zero3_offload|zero_infinity"),
        Flag("--steps", "train.steps", type=int))),
    ("mesh", (
        Flag("--dp-replicate", "parallel.dp_replicate", "auto or N: replicas of the sharded state (HSDP)"),
        Flag("--dp-shard", "parallel.dp_shard", "auto or N: ranks the model state is sharded over"),
        Flag("--tp", "parallel.tp", "auto or N: tensor parallel (1 = off)"),
        Flag("--cp", "parallel.cp", "auto or N: context parallel, seq_len / N tokens per rank (1 = off)"),
        Flag("--cp-mode", "parallel.cp_mode", "auto|ulysses|ring"))),
)
PLAN_FLAGS: tuple[Flag, ...] = tuple(f for _, group in PLAN_FLAG_GROUPS for f in group)


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """The config positional, --set and every plan flag (PLAN_FLAG_GROUPS) on one subcommand."""
    p.add_argument("config", nargs="?", help="run config YAML (flags override it)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=1e-4")
    for title, flags in PLAN_FLAG_GROUPS:
        g = p.add_argument_group(title)
        for f in flags:
            g.add_argument(f.flag, help=f.help, **({"type": f.type} if f.type else {}))


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (--set, and the overrides a Slurm script passes back) -> {key: value}."""
    out: dict[str, str] = {}
    for s in items:
        k, sep, v = s.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--set {s!r}: write KEY=VALUE, e.g. --set train.seq_len=2048")
        out[k.strip()] = v
    return out


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Flag values and --set pairs as dotted config overrides (flags beat --set, which beats the file)."""
    out: dict[str, object] = parse_sets(getattr(args, "sets", ()))
    for f in PLAN_FLAGS:
        v = getattr(args, f.dest, None)
        if v is not None:
            out[f.key] = v
    if out.get("model.params") is not None and out.get("model.name") is not None:
        raise ConfigError(f"--model {out['model.name']!r} and --params {out['model.params']!r} conflict: give one "
                          "(a preset/config.json with --model, or a parameter count with --params)")
    # model.name and model.params exclude each other: the one given here replaces the file's other one
    if "model.params" in out and "model.name" not in out:
        out["model.name"] = None
    if "model.name" in out and out["model.name"] is not None:
        out["model.params"] = None
    return out
