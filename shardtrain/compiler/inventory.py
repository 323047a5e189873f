"""Tensor inventory of a model: which tensors exist, their shapes, and which are trainable.

Optimizer state size depends on tensor shapes, not only on counts: bitsandbytes keeps 32-bit state
for tensors below `min_8bit_size` (4096 elements) and Adafactor factors the second moment of every
matrix into rows + cols. LoRA adds A (r × in) and B (out × r) per adapted Linear (Hu et al. 2021).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from shardtrain.compiler.lora_presets import PRESET_NAMES, as_preset, preset_targets
from shardtrain.compiler.memo import by_identity
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import Method


@dataclass(frozen=True)
class TensorGroup:
    """`count` tensors of one shape."""
    name: str
    shape: tuple[int, ...]
    count: int
    trainable: bool
    quantizable: bool = False
    """A frozen nn.Linear weight inside a decoder layer: what QLoRA stores in NF4."""

    # cached (the instance is frozen): the planner reads them millions of times per `plan --max`
    @functools.cached_property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @functools.cached_property
    def total(self) -> int:
        return self.numel * self.count


class LoraTargetError(ValueError):
    pass


def resolve_lora_targets(model: ModelSpec, targets: tuple[str, ...] | str) -> tuple[str, ...]:
    """Expand a preset (compiler/lora_presets.py: peft, torchtune, axolotl, llama-factory, all-linear —
    peft's meaning: every nn.Linear in the decoder layers, not lm_head) and check that named targets
    exist in this architecture (Phi-3 fuses qkv_proj/gate_up_proj).
    `lm_head` (an untied output projection) may be named too: peft adapts it like any Linear."""
    if isinstance(targets, str):
        targets = (targets,)
    preset = as_preset(targets)
    if preset is not None:
        try:
            return preset_targets(model, preset)
        except ValueError as e:
            raise LoraTargetError(str(e)) from None
    valid = {s.name for s in model.linear_shapes()} | ({"lm_head"} if not model.tie_word_embeddings else set())
    bad = [t for t in targets if t not in valid]
    if bad:
        raise LoraTargetError(
            f"lora.targets: {bad} are not modules of {model.model_type} (decoder layers have "
            f"{sorted(valid)}); use one of those or a preset: {' | '.join(PRESET_NAMES)}")
    return tuple(targets)


def tensor_inventory(model: ModelSpec, method: Method, lora_rank: int = 16,
                     lora_targets: tuple[str, ...] | str = "all-linear") -> tuple[TensorGroup, ...]:
    """Every parameter tensor of the (possibly LoRA-wrapped) model, grouped by shape."""
    if isinstance(lora_targets, list):
        lora_targets = tuple(lora_targets)
    try:
        return _cached_inventory(model, method, lora_rank, lora_targets)
    except TypeError:   # an unhashable spec (hand-built in a test): computed, not cached
        return _inventory(model, method, lora_rank, lora_targets)


def _inventory(model: ModelSpec, method: Method, lora_rank: int,
               lora_targets: tuple[str, ...] | str) -> tuple[TensorGroup, ...]:
    full = method is Method.FULL
    L, h, V = model.num_layers, model.hidden_size, model.vocab_size
    groups: list[TensorGroup] = [TensorGroup("embed_tokens", (V, h), 1, full)]
    if not model.tie_word_embeddings:
        groups.append(TensorGroup("lm_head", (V, h), 1, full))
    groups.append(TensorGroup("norm", (h,), 1, full))
    groups.append(TensorGroup("layer_norms", (h,), L * model.norms_per_layer, full))
    for s in model.linear_shapes():
        if s.fused_parameter:  # transformers-5 MoE experts: one 3-D parameter per layer
            groups.append(TensorGroup(s.name, (s.count_per_layer, s.out_features, s.in_features), L, full))
        else:
            groups.append(TensorGroup(s.name, (s.out_features, s.in_features), L * s.count_per_layer,
                                      full, quantizable=True))
        if s.bias:
            groups.append(TensorGroup(s.name + ".bias", (s.out_features,), L * s.count_per_layer, full))
    if model.is_moe:
        groups.append(TensorGroup("router", (model.num_experts, h), L, full))
    counted = sum(g.total for g in groups)
    if counted != model.num_params:  # any layout detail the spec knows and we do not: keep totals exact
        groups.append(TensorGroup("other", (model.num_params - counted,), 1, full))
    if not full:
        by_name = {s.name: s for s in model.linear_shapes()}
        for t in resolve_lora_targets(model, lora_targets):
            if t == "lm_head":
                groups.append(TensorGroup("lm_head.lora_A", (lora_rank, h), 1, True))
                groups.append(TensorGroup("lm_head.lora_B", (V, lora_rank), 1, True))
                continue
            s = by_name[t]
            n = L * s.count_per_layer
            groups.append(TensorGroup(f"{t}.lora_A", (lora_rank, s.in_features), n, True))
            groups.append(TensorGroup(f"{t}.lora_B", (s.out_features, lora_rank), n, True))
    return tuple(groups)


# one tuple per (model, method, LoRA): the identity-keyed memos (memo.py) hit across plans
_cached_inventory = functools.lru_cache(maxsize=64)(_inventory)


@by_identity
def trainable_params(groups: tuple[TensorGroup, ...]) -> int:
    """Trainable elements: what gets gradients, master copies and optimizer states."""
    return sum(g.total for g in groups if g.trainable)

