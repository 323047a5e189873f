"""Settings a run config sets that this run will ignore: one warning line each at config load (issue 22:
a `lora:` section was silently dropped when train.method is full).

A setting counts as *set* when it differs from its schema default (the run.yaml a launch writes carries
every key, at its default when the user did not set it, so "present in the mapping" would warn about
keys nobody wrote). Each rule names the key, why it has no effect, and what would make it count.
"""
from __future__ import annotations

import dataclasses
import sys

from shardtrain.compiler.specs import (ActivationOffload, CkptOffload, Export, GradCkpt, LossMode, Method,
                                       OffloadDevice, Runner, Strategy)

#: Warnings already printed by this process (the config is re-validated after every override and by
#: the OOM re-plan: one line per setting, not one per validation).
_PRINTED: set[str] = set()


def _changed(section) -> list[str]:
    """Fields of a config section whose value differs from the schema default."""
    out = []
    for f in dataclasses.fields(section):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if getattr(section, f.name) != default:
            out.append(f.name)
    return out


def _method_may_be_adapter(t) -> bool:
    """LoRA settings count when the method is lora/qlora, or when the planner may switch to them."""
    return t.method is not Method.FULL or t.allow_method_change


def ignored_settings(cfg) -> list[str]:
    """One line per setting that has no effect on this run (empty when every setting counts)."""
    t, hw, m, d, run = cfg.train, cfg.hardware, cfg.model, cfg.data, cfg.run
    out = []
    lora = _changed(cfg.lora)
    if lora and not _method_may_be_adapter(t):
        keys = ", ".join(f"lora.{k}" for k in lora)
        out.append(f"{keys}: ignored, train.method is full (the lora section applies to lora/qlora; set "
                   "train.method: lora, or allow_method_change: true to let the planner switch)")
    if run.export is not Export.ADAPTER and not _method_may_be_adapter(t):
        out.append(f"run.export: {run.export.value}: ignored, train.method is full (final/ holds the full weights "
                   "already; run.export applies to LoRA adapters)")
    if m.name is not None:
        dims = [k for k in ("hidden", "layers", "heads", "kv_heads", "vocab", "intermediate") if getattr(m, k) is not None]
        if dims:
            out.append(f"{', '.join('model.' + k for k in dims)}: ignored with model.name {m.name!r} (the dimensions "
                       "come from its config.json; they apply to model.params)")
    if t.grad_ckpt in (GradCkpt.NONE, GradCkpt.FULL, GradCkpt.OP) and "selective_every" in _changed(t):
        out.append(f"train.selective_every: {t.selective_every}: ignored, train.grad_ckpt is {t.grad_ckpt.value} "
                   "(it applies to selective, or auto when the planner picks selective)")
    if t.runner_transformers is not None and t.runner is Runner.SHARDTRAIN:
        out.append(f"train.runner_transformers: {t.runner_transformers}: ignored, train.runner is shardtrain (our "
                   "runtime's loss path does not depend on it; set train.runner: hf_trainer or accelerate)")
    if t.loss is LossMode.FULL and "loss_chunk_tokens" in _changed(t):
        out.append(f"train.loss_chunk_tokens: {t.loss_chunk_tokens}: ignored, train.loss is full (set train.loss: "
                   "chunked or auto)")
    if t.ckpt_offload is CkptOffload.CPU and t.grad_ckpt is GradCkpt.NONE:
        out.append("train.ckpt_offload: cpu: ignored, train.grad_ckpt is none (no layer is checkpointed, so there "
                   "are no checkpointed inputs to move; set train.grad_ckpt: full, selective or auto)")
    elif t.ckpt_offload is CkptOffload.CPU and t.activation_offload is ActivationOffload.CPU:
        # save_on_cpu packs the checkpointed layers' inputs too (torch/utils/checkpoint.py
        # _CheckpointFrame.save_inputs runs the active saved-tensor hooks): the planner plans activation
        # offload alone, so the same bytes are not moved twice
        out.append("train.ckpt_offload: cpu: ignored, train.activation_offload is cpu, which already keeps the "
                   "checkpointed layer inputs in host RAM (planned as activation offload alone; set "
                   "train.activation_offload: none to offload only the checkpointed inputs)")
    if hw.nvme_capacity is not None and not hw.nvme_path:
        out.append("hardware.nvme_capacity: ignored without hardware.nvme_path (no NVMe plan is made)")
    if (hw.nvme_path and isinstance(t.strategy, Strategy)
            and OffloadDevice.NVME not in (t.strategy.offload_optimizer, t.strategy.offload_params)):
        out.append(f"hardware.nvme_path: ignored, train.strategy is {t.strategy.value} (it does not offload to "
                   "NVMe; set train.strategy: auto or zero_infinity)")
    if hw.inter_node_bandwidth is not None and hw.nodes == 1:
        out.append("hardware.inter_node_bandwidth: ignored on one node (hardware.nodes: 1)")
    if d.eval and "eval_fraction" in _changed(d):
        out.append(f"data.eval_fraction: {d.eval_fraction}: ignored, data.eval is set (the held-out data is "
                   "data.eval, nothing is split off data.train)")
    if run.eval_every == 0 and "eval_batches" in _changed(run):
        out.append(f"run.eval_batches: {run.eval_batches}: ignored, run.eval_every is 0 (evaluation is off)")
    if "headroom" in _changed(t):
        # not ignored, but its meaning changed (issue 19): one line, so an old config's 0.05 is not doubled
        # silently with the fragmentation the allocator model now adds
        out.append(f"train.headroom: {t.headroom} is kept free ON TOP of the modelled reserved peak + CUDA "
                   "context (compiler/allocator.py); it no longer stands for allocator fragmentation (the old "
                   "0.05 default), which is modelled now: set 0 unless you want that extra margin")
    return out


def warn_ignored(cfg, stream=None) -> list[str]:
    """Print each new ignored-setting line once per process as `shardtrain: warning: ...` (stderr)."""
    lines = [ln for ln in ignored_settings(cfg) if ln not in _PRINTED]
    for ln in lines:
        _PRINTED.add(ln)
        print(f"shardtrain: warning: {ln}", file=stream or sys.stderr, flush=True)
    return lines
