"""LoRA target presets: the modules other fine-tuning tools adapt by default (`lora.targets: <preset>`).

A published LoRA run is only comparable with a plan when the same Linear layers carry adapters: peft's
default adapts 2 of a Llama layer's 7 projections, torchtune's recipes 6, axolotl / LLaMA-Factory all 7.
Each preset is the leaf module names in Hugging Face spelling (what peft's ``target_modules`` matches),
expanded by :func:`preset_targets` for one architecture; ``inventory.resolve_lora_targets`` calls it.
Pure: no peft/torch import (the names are copied from the sources cited per member).
"""
from __future__ import annotations

import enum

from shardtrain.compiler.model import ModelSpec


class LoraPreset(str, enum.Enum):
    """A named default set of LoRA targets (``lora.targets: peft | torchtune | axolotl | llama-factory |
    all-linear``)."""

    PEFT = "peft"
    """peft's default when ``target_modules`` is unset: TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    [model_type] (peft 0.21.2 peft/utils/constants.py: llama, mistral, mixtral, qwen2, qwen3, gemma,
    gemma2 -> ["q_proj", "v_proj"]). peft has no entry for phi3 and raises "Please specify
    `target_modules`"; so does this preset."""
    TORCHTUNE = "torchtune"
    """torchtune's LoRA recipes (pytorch/torchtune@bd2a0fc recipes/configs/llama3_1/8B_lora_single_device.yaml:
    ``lora_attn_modules: ['q_proj', 'v_proj', 'output_proj']``, ``apply_lora_to_mlp: True`` (w1, w2, w3),
    ``apply_lora_to_output: False``), in HF names q_proj, v_proj, o_proj, gate_proj, down_proj, up_proj.
    On fused layouts (phi3's qkv_proj / gate_up_proj) the fused module that holds a target is adapted."""
    AXOLOTL = "axolotl"
    """axolotl ``lora_target_linear: true`` (axolotl-ai-cloud/axolotl@b78dab1 src/axolotl/loaders/adapter.py
    find_all_linear_names: every Linear leaf name, minus the output embedding lm_head): all-linear."""
    LLAMA_FACTORY = "llama-factory"
    """LLaMA-Factory ``lora_target: all`` (hiyouga/LLaMA-Factory@e8e6af2 src/llamafactory/model/model_utils/
    misc.py find_all_linear_modules: every Linear leaf name, ``forbidden_modules = {"lm_head"}``): all-linear."""
    ALL_LINEAR = "all-linear"
    """peft's ``target_modules="all-linear"``: every nn.Linear of the decoder layers, not lm_head
    (peft tuners_utils _maybe_include_all_linear_layers excludes the output layer)."""


#: peft TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, the model types a ModelSpec describes.
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    t: ("q_proj", "v_proj") for t in ("llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                                      "gemma2", "gemma3_text", "stablelm")}
TORCHTUNE_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
#: fused HF modules and the unfused names they hold (phi3: Phi3Attention.qkv_proj, Phi3MLP.gate_up_proj)
FUSED_HOLDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

PRESET_NAMES = tuple(p.value for p in LoraPreset)


def as_preset(targets: tuple[str, ...] | str) -> LoraPreset | None:
    """The preset a ``lora.targets`` value names (one string, or a one-item list of it), else None."""
    if isinstance(targets, str):
        targets = (targets,)
    if len(targets) == 1 and targets[0] in PRESET_NAMES:
        return LoraPreset(targets[0])
    return None


def preset_targets(model: ModelSpec, preset: LoraPreset) -> tuple[str, ...]:
    """The leaf names ``preset`` adapts on ``model``, in its module order (raises ValueError with the fix
    when the tool has no default for this architecture)."""
    linear = [s.name for s in model.linear_shapes() if not s.fused_parameter]
    if preset in (LoraPreset.ALL_LINEAR, LoraPreset.AXOLOTL, LoraPreset.LLAMA_FACTORY):
        return tuple(linear)
    if preset is LoraPreset.PEFT:
        wanted = PEFT_DEFAULT_TARGETS.get(model.model_type)
        if wanted is None:
            raise ValueError(f"lora.targets: peft has no default target_modules for model_type "
                             f"{model.model_type!r} (peft/utils/constants.py); name the modules, e.g. "
                             f"[{', '.join(linear[:2])}], or use all-linear")
    else:
        wanted = TORCHTUNE_TARGETS
    picked = [n for n in linear if n in wanted or any(w in FUSED_HOLDS.get(n, ()) for w in wanted)]
    if not picked:
        raise ValueError(f"lora.targets: preset {preset.value} names {list(wanted)}, none of which is a "
                         f"module of {model.model_type} ({linear}); name the modules or use all-linear")
    return tuple(picked)
