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
DeepSpeed 0.19.8 AutoTP in training mode (module_inject/auto_tp.py `_replace`) splits the same way:
o_proj/down_proj `LinearAllreduce` (in_features), every other Linear `LinearLayer` (out_features), the
lm_head `LinearLayer(..., gather_output=True)`; nn.Embedding is left whole (vocab_parallel_lm_head
defaults to False).
MoE (transformers 5.23 configuration_mixtral.py base_model_tp_plan): the fused experts
gate_up_proj (E, 2I, h) "packed_colwise" and down_proj (E, h, I) "rowwise": split on their out / in
dim (-2 / -1); the router is replicated.
LoRA on a tp-sharded Linear (peft 0.21.2 tuners/lora/model.py `_create_and_replace`, TP branch): for a
"colwise" base layer lora_B (out, r) is sharded on dim 0 and lora_A is replicated (broadcast from tp
rank 0, lora/layer.py `update_layer`); for "rowwise" lora_A (r, in) is sharded on dim 1 and lora_B
replicated. Adapters of lm_head ("colwise_gather_output" is not in peft's supported plans) stay whole.
FSDP2 then shards each tp-local tensor on its dim 0 (torch _fully_shard/_fsdp_param.py: a DTensor
parameter's local tensor is chunked on dim 0 over the dp mesh), which is what memory.py applies to the
groups returned here; a rowwise weight is thus split dim 1 by tp and dim 0 by FSDP.
"""
from __future__ import annotations

from dataclasses import replace

from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.memo import by_identity
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import CpMode, Engine, HardwareSpec, ParallelDims, Precision, Strategy

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
    """Ranks sharing one copy of the (tp-local) sharded model state: FSDP2 dp_shard × cp (HSDP
    replicates it over dp_replicate); DDP shards nothing; DeepSpeed has no replicate dim: ZeRO
    partitions over its whole data × sequence-parallel group (0.19.8 runtime/engine.py
    `dp_process_group=self.seq_data_parallel_group`), dp × cp — the same as dp_shard × cp whenever
    dp_replicate is 1, as every DeepSpeed mesh is meant to be."""
    if strategy is Strategy.DDP:
        return 1
    return parallel.grad_reduce if strategy.engine is Engine.DEEPSPEED else parallel.fsdp_shard


def _split(shape: tuple[int, ...], dim: int, tp: int) -> tuple[int, ...]:
    # torch pads nothing; the legality check makes tp divide heads (and so out_features); ceil keeps
    # an odd size conservative
    s = list(shape)
    s[dim] = -(-s[dim] // tp)
    return tuple(s)


def tp_local_group(g: TensorGroup, tp: int) -> TensorGroup:
    """One tensor group as one tp rank holds it (see the module docstring for the plan)."""
    if tp == 1:
        return g
    name = g.name.removeprefix("experts.")
    for suffix, dim_col, dim_row in ((".lora_A", None, -1), (".lora_B", 0, None)):
        if name.endswith(suffix):     # peft: colwise base -> lora_B on dim 0; rowwise -> lora_A on dim 1
            base = name.removesuffix(suffix)
            dim = dim_col if base in COLWISE else dim_row if base in ROWWISE else None
            return g if dim is None else replace(g, shape=_split(g.shape, dim, tp))
    if name.endswith(".bias"):        # ColwiseParallel: bias Shard(0); RowwiseParallel: bias Replicate()
        return replace(g, shape=_split(g.shape, 0, tp)) if name.removesuffix(".bias") in COLWISE else g
    if name in COLWISE or name in VOCAB_COLWISE:
        return replace(g, shape=_split(g.shape, -2, tp))      # weight (..., out, in): out
    if name in ROWWISE:
        return replace(g, shape=_split(g.shape, -1, tp))      # weight (..., out, in): in
    return g   # norms, embedding, router: replicated over tp


def tp_local_groups(groups: tuple[TensorGroup, ...], tp: int) -> tuple[TensorGroup, ...]:
    """Every tensor group as one tp rank holds it (identity for tp 1)."""
    if tp == 1:
        return groups
    return _tp_local_groups(groups, tp)


@by_identity   # the same tuple back for the same inventory: the identity memos downstream hit
def _tp_local_groups(groups: tuple[TensorGroup, ...], tp: int) -> tuple[TensorGroup, ...]:
    # cached: the planner asks for the same inventory at the same tp for every candidate of a mesh
    return tuple(tp_local_group(g, tp) for g in groups)


def tp_layer_params(model: ModelSpec, tp: int) -> int:
    """Parameters of one decoder layer on one tp rank (the base model; tp_local_group's rule)."""
    if tp == 1:
        return model.per_layer_params
    saved = 0
    for s in model.linear_shapes():
        name = s.name.removeprefix("experts.")
        if name in COLWISE:
            saved += (s.out_features - -(-s.out_features // tp)) * (s.in_features + (1 if s.bias else 0)) * s.count_per_layer
        elif name in ROWWISE:
            saved += s.out_features * (s.in_features - -(-s.in_features // tp)) * s.count_per_layer
    return model.per_layer_params - saved


def tp_lm_head_params(model: ModelSpec, tp: int) -> int:
    """lm_head elements on one tp rank (colwise_gather_output: vocab / tp; 0 when tied)."""
    if not model.lm_head_params:
        return 0
    return -(-model.vocab_size // tp) * model.hidden_size


def tp_largest_unit_params(model: ModelSpec, tp: int) -> int:
    """Largest FSDP unit / ZeRO-3 gathered module on one tp rank (memory.largest_unit_params at tp 1)."""
    return max(tp_layer_params(model, tp), model.embedding_params, tp_lm_head_params(model, tp))


def tp_num_params(model: ModelSpec, tp: int) -> int:
    """Parameters one tp rank holds (the whole base model at tp 1)."""
    if tp == 1:
        return model.num_params
    return (model.num_params - model.num_layers * (model.per_layer_params - tp_layer_params(model, tp))
            - (model.lm_head_params - tp_lm_head_params(model, tp)))


def cp_transient_bytes(model: ModelSpec, precision: Precision, tokens: int,
                       parallel: ParallelDims | None) -> tuple[int, int]:
    """(forward, backward) bytes one layer's context-parallel attention holds for a moment beyond the
    saved activations, on one rank holding `tokens` tokens (activations.tokens_per_rank).

    Ulysses (DeepSpeed 0.19.8 runtime/sequence_parallel/ulysses_sp.py, all_to_all_single on a
    contiguous copy): the send copies of q, k, v (kv heads repeated up to cp: `kv_replication_factor`)
    in the forward; in the backward the same all-to-alls carry the gradients of the output and of
    q, k, v. Ring (torch 2.13 distributed/tensor/experimental/_context_parallel/_attention.py): forward
    `next_kv = torch.cat([key, value])` is exchanged while the received block is used (2 K/V blocks in
    flight) and the merger keeps an fp32 output; backward exchanges K/V and `next_grad_kv` and keeps
    fp32 grad_query/key/value accumulators plus one step's fp32 grads (`accum_dtype` float32)."""
    if parallel is None or parallel.cp == 1:
        return 0, 0
    tp, cp, hd, p = parallel.tp, parallel.cp, model.head_dim, precision.param_bytes
    qd = -(-model.num_heads // tp) * hd
    kv_heads = -(-model.num_kv_heads // tp)
    if parallel.cp_mode is CpMode.ULYSSES:
        kvd = max(kv_heads, cp) * hd
        return p * tokens * (qd + 2 * kvd), p * tokens * (2 * qd + 2 * kvd)
    kv_block = tokens * 2 * kv_heads * hd          # one rank's K and V, elements
    return 2 * p * kv_block + 4 * tokens * qd, 2 * p * kv_block + 4 * (2 * tokens * qd + 3 * kv_block)


def tp_gather_transient_bytes(model: ModelSpec, precision: Precision, tokens: int,
                              parallel: ParallelDims | None) -> int:
    """lm_head "colwise_gather_output": the tp-local logits (vocab / tp) next to the all-gathered ones
    (transformers 5.23 integrations/tensor_parallel.py; DeepSpeed AutoTP LinearLayer gather_output)."""
    if parallel is None or parallel.tp == 1:
        return 0
    return precision.param_bytes * tokens * -(-model.vocab_size // parallel.tp)
