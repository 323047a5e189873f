"""`train.compile`: torch.compile applied to the model before an engine wraps it (issue 11).

blocks — each decoder layer compiled in place with `nn.Module.compile` (torch/nn/modules/module.py:
sets `_compiled_call_impl`, so the module object, its parameters and its name stay the same). This is
torchtitan's per-block compile (torchtitan/models/llama3/infra/parallelize.py `apply_compile`: each
TransformerBlock compiled before `fully_shard`): the repeated blocks share one compiled graph (dynamo
caches on the code object), compile time does not grow with depth, and the engines' per-layer wrapping
(FSDP2 `fully_shard` on every layer, HF activation checkpointing's `GradientCheckpointingLayer.__call__`,
which calls the compiled `Module.__call__` inside `checkpoint`) and LoRA (peft replaced the Linears
before this point) keep working.
model — the whole (HF or peft) model compiled in place, one graph per input shape.
Dynamic shapes stay at torch's default (`dynamic=None`: recompile once with dynamic sizes when a new
sequence length shows up, which padded micro-batches can cause).
"""
from __future__ import annotations

import logging

from torch import nn

from shardtrain.compiler.specs import CompileMode
from shardtrain.runtime.modeling import decoder_layers

log = logging.getLogger("shardtrain.worker")


def apply_compile(model: nn.Module, mode: CompileMode | str, layer_class: str) -> int:
    """Compile `model` in place per `mode`; returns the number of modules compiled."""
    mode = CompileMode(mode)
    if mode is CompileMode.NONE:
        return 0
    if mode is CompileMode.MODEL:
        model.compile()
        log.info("train.compile=model: torch.compile on the whole model")
        return 1
    layers = decoder_layers(model, layer_class)
    if not layers:
        raise ValueError(f"train.compile=blocks: no {layer_class} modules in the model to compile; "
                         "fix: set train.compile to model or none")
    for layer in layers:
        layer.compile()
    log.info("train.compile=blocks: torch.compile on %d %s blocks", len(layers), layer_class)
    return len(layers)


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None

