"""final/: the trained model as `run.export` asks (issue 22: LoRA runs also offer merged full weights).

    adapter  final/ = the peft adapter + tokenizer (PeftModel.from_pretrained)       [runtime/checkpoint.py]
    merged   final/ = full weights with the adapter merged in + tokenizer (AutoModelForCausalLM.from_pretrained)
    both     final/ = the adapter, final/merged/ = the merged full weights

Full fine-tuning always writes the full weights (run.export has no effect; config/ignored.py warns).
The merge is peft's own: the gathered state dict (checkpoint.full_state_dict: every engine, sharded or
not) is loaded into a meta-device copy of the same peft model (no second allocation of the weights),
`merge_and_unload()` adds B·A·(alpha/r) into each adapted Linear and drops the adapter modules, and the
result is saved with `save_pretrained` (safetensors). QLoRA keeps the adapter only: its base weights are
4-bit NF4 and peft's merge into them rounds the merged weights back to 4 bits (config/schema.py refuses
merged for qlora; a planner switch to qlora is logged here).
"""
from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from shardtrain import rundir_format as rf
from shardtrain.compiler.specs import Export
from shardtrain.runtime import checkpoint as ckpt
from shardtrain.runtime.dist import barrier

log = logging.getLogger("shardtrain.export")


def _peft_config(model):
    """The peft adapter config of a PeftModel (None for a plain model)."""
    cfg = getattr(model, "peft_config", None)
    return cfg.get(getattr(model, "active_adapter", "default")) if isinstance(cfg, dict) else None


def _is_4bit(model) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Params4bit") for m in model.modules()) or \
        any(type(p).__name__ == "Params4bit" for p in model.parameters())


def merged_model(peft_model, state_dict: dict) -> torch.nn.Module:
    """A plain transformers model with the adapter merged in, built from ``state_dict`` (the peft model's
    full state dict, on the host) without touching ``peft_model``'s own (possibly sharded) weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    base_cfg = copy.deepcopy(peft_model.get_base_model().config)
    dtype = next((v.dtype for k, v in state_dict.items() if k.endswith(".weight") and v.is_floating_point()),
                 torch.float32)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_cfg, dtype=dtype)
        shadow = get_peft_model(skeleton, copy.deepcopy(_peft_config(peft_model)))
    missing, unexpected = shadow.load_state_dict(state_dict, strict=False, assign=True)
    # non-persistent buffers (rotary inv_freq) are not in a state dict and are not saved either
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"merging the adapter: the gathered state dict does not match the model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    merged = shadow.merge_and_unload()
    merged.config.dtype = dtype
    return merged


def _save_merged(peft_model, state_dict: dict, out: Path, tokenizer) -> None:
    merged = merged_model(peft_model, state_dict)
    sd = {k: v for k, v in merged.state_dict().items() if v.device.type != "meta"}
    merged.save_pretrained(str(out), state_dict=sd)
    tokenizer.save_pretrained(str(out))


def save_final(eng, out: Path, tokenizer, export: Export | str = Export.ADAPTER) -> Path:
    """COLLECTIVE. Write final/ per ``export`` (module docstring); returns ``out``."""
    export = Export(export)
    peft_cfg = _peft_config(eng.model)
    if export is Export.ADAPTER or peft_cfg is None:
        return ckpt.save_final(eng, out, tokenizer)
    if _is_4bit(eng.model):
        if dist.get_rank() == 0:
            log.warning("run.export: %s: the base weights are 4-bit (QLoRA): final/ holds the adapter only; merge "
                        "it onto the 16-bit base with PeftModel.from_pretrained(base, final).merge_and_unload()",
                        export.value)
        return ckpt.save_final(eng, out, tokenizer)
    out = Path(out)
    sd = ckpt.full_state_dict(eng)  # COLLECTIVE: the full peft state dict on rank 0
    if dist.get_rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        target = out
        if export is Export.BOTH:
            eng.model.save_pretrained(str(out), state_dict=sd)  # peft keeps the adapter's tensors only
            tokenizer.save_pretrained(str(out))
            target = out / rf.FINAL_MERGED
        _save_merged(eng.model, sd, target, tokenizer)
        log.info("final: %s%s", "adapter in final/, " if export is Export.BOTH else "",
                 f"merged full weights in {target}")
    barrier()
    return out
