"""The device mesh in the memory model: which mesh a candidate runs on, and the tensors one rank holds
under tensor parallel (tp) before FSDP/ZeRO shards them over dp_shard × cp.

TP layout (transformers 5.23, the model's own plan, which the runtime applies with DTensor
`parallelize_module`): models/llama/configuration_llama.py `base_model_tp_plan` makes q/k/v/gate/up
"colwise" (weight (out, in) split on dim 0 = out_features) and o_proj/down_proj "rowwise" (split on
dim 1 = in_features); `embed_tokens` and the norms are not in the plan (replicated on every tp rank);
modeling_llama.py `LlamaForCausalLM._tp_plan = {"lm_head": "colwise_gather_output"}`: lm_head's weight
split on the vocab dim, its output all-gathered to the full vocab on every tp rank. No entry is a
SequenceParallel style, so norms and residuals hold every token on every tp rank
(TP_SEQUENCE_PARALLEL = False). Biases follow their weight: a colwise bias is split, a rowwise one
replicated (torch/distributed/tensor/parallel/style.py ColwiseParallel/RowwiseParallel:
`bias` Shard(0) / Replicate()).
LoRA on a tp-sharded Linear (peft/tuners/lora/layer.py Linear keeps lora_A (r, in) and lora_B (out, r)
as plain nn.Linear children, which the plan's module patterns do not name): the adapters are
replicated on every tp rank at their full size. This module models that (conservative if a runtime
shards them as Megatron does: colwise base -> lora_B split on out, rowwise -> lora_A split on in).
FSDP2 then shards each tp-local tensor on its dim 0 (torch _fully_shard/_fsdp_param.py: a DTensor
parameter's local tensor is chunked on dim 0 over the dp mesh), which is what memory.py applies to the
groups returned here; a rowwise weight is thus split dim 1 by tp and dim 0 by FSDP.
"""
from __future__ import annotations

from dataclasses import replace

from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.specs import HardwareSpec, ParallelDims, Strategy

TP_SEQUENCE_PARALLEL = False
"""Whether tp ranks split the tokens outside attention/MLP (Korthikanti et al. 2022 sequence parallel).
transformers 5.23 Llama's tp plan has no SequenceParallel entry, so no (see module docstring)."""

COLWISE = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj"})
"""Linear layers split on out_features (dim 0) by tp: configuration_llama.py base_model_tp_plan
"colwise" (Phi-3's fused qkv_proj / gate_up_proj are colwise in its own plan)."""
ROWWISE = frozenset({"o_proj", "down_proj"})
"""Linear layers split on in_features (dim 1) by tp: base_model_tp_plan "rowwise"."""
VOCAB_COLWISE = frozenset({"lm_head"})
"""LlamaForCausalLM._tp_plan {"lm_head": "colwise_gather_output"}: weight (V, h) split on dim 0."""


def mesh_of(strategy: Strategy, hw: HardwareSpec, parallel: ParallelDims | None) -> ParallelDims:
    """The mesh a candidate runs on: `parallel`, or the strategy's 1-D meaning when None
    (ParallelDims.for_strategy). A mesh that does not multiply out to the world size is refused."""
    if parallel is None:
        return ParallelDims.for_strategy(strategy, hw.world_size, hw.gpus_per_node)
    if parallel.world != hw.world_size:
        raise ValueError(f"parallel: {parallel.label()} is {parallel.world} ranks but the hardware has "
                         f"{hw.world_size} (nodes × gpus_per_node); make the dims multiply to {hw.world_size}")
    return parallel


def mesh_shard_size(strategy: Strategy, parallel: ParallelDims) -> int:
    """Ranks sharing one copy of the (tp-local) sharded model state: dp_shard × cp; DDP shards nothing."""
    return 1 if strategy is Strategy.DDP else parallel.fsdp_shard


def tp_local_group(g: TensorGroup, tp: int) -> TensorGroup:
    """One tensor group as one tp rank holds it (see the module docstring for the plan)."""
    if tp == 1:
        return g
    base = g.name.removesuffix(".bias")
    if base in COLWISE or base in VOCAB_COLWISE:
        # weight (out, in) / bias (out,): Shard(0); torch pads nothing, the legality check makes
        # tp divide heads (and so out_features); ceil keeps odd sizes conservative
        return replace(g, shape=(-(-g.shape[0] // tp),) + g.shape[1:])
    if base in ROWWISE and not g.name.endswith(".bias") and len(g.shape) == 2:
        return replace(g, shape=(g.shape[0], -(-g.shape[1] // tp)))
    return g   # norms, embedding, rowwise biases, LoRA adapters, router: replicated over tp


def tp_local_groups(groups: tuple[TensorGroup, ...], tp: int) -> tuple[TensorGroup, ...]:
    """Every tensor group as one tp rank holds it (identity for tp 1)."""
    if tp == 1:
        return groups
    return tuple(tp_local_group(g, tp) for g in groups)
