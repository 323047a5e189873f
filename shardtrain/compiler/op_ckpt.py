"""Op-level selective activation checkpointing (`grad_ckpt: op`): torchtitan's ``op`` SAC policy.

Source: pytorch/torchtitan@575674a (2025-12-08) torchtitan/distributed/activation_checkpoint.py
``_apply_op_sac`` with torchtitan/models/llama3/infra/parallelize.py ``_op_sac_save_list``
(unchanged in substance at @b5bcd76, 2026-08, ``SelectiveAC``): every decoder layer is wrapped in a
non-reentrant checkpoint whose policy (torch.utils.checkpoint.create_selective_checkpoint_contexts)
MUST_SAVEs the outputs of the ops in the save list — ``aten.mm``, the SDPA kernels (flash, efficient,
cuDNN, math; our runtime adds the CPU one, ``aten._scaled_dot_product_flash_attention_for_cpu``),
``_c10d_functional.reduce_scatter_tensor`` and ``aten.max`` — except every second mm: a counter per
layer forward counts mms and saves when the count is odd (1st, 3rd, 5th, ...). Everything else (norms,
RoPE, SiLU, the product, residual adds, dropout) is recomputed in backward.

What a checkpointed layer keeps between forward and backward (per token on the rank): its input
(p·h, counted by phases.py as for full checkpointing) plus the saved outputs, which are NOT passed
through saved-tensor hooks (the SAC cache stores them directly: torch/utils/checkpoint.py
_CachingTorchDispatchMode), so activation offload leaves them on the device.

The mm order of a Hugging Face Llama layer (transformers 5.23 modeling_llama.py: q, k, v in
LlamaAttention.forward, o_proj, then ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``): q_proj (1,
saved), k_proj (2), v_proj (3, saved), o_proj (4), gate_proj (5, saved), up_proj (6), down_proj (7,
saved). A peft LoRA Linear adds two mms after its base one (lora/layer.py Linear.forward:
``result = base_layer(x)``, then ``lora_B(lora_A(dropout(x)))``), which shifts the parity of every
later mm: the counter sees base, A, B per adapted module. SDPA saves its output (p per element) and
its logsumexp (fp32, one per head and query).
Recompute FLOPs per token: 2·in·out for every mm not saved (attention is saved, elementwise ops are
negligible against the matmuls).
"""
from __future__ import annotations

from dataclasses import dataclass

from shardtrain.compiler.activations import mlp_saved_bytes_per_token
from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import ParallelDims, Precision

_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
"""Linears whose output tp splits (Llama tp plan: colwise); o_proj / down_proj are rowwise (full h)."""
SDPA_LSE_BYTES = 4
"""The SDPA logsumexp is fp32 in every kernel (flash, efficient, the CPU flash kernel)."""


@dataclass(frozen=True)
class LayerMm:
    """One matmul of a decoder layer's forward, in execution order."""
    name: str
    in_features: int
    out_features: int
    saved: bool
    """torchtitan's policy: the mm counter is odd (1st, 3rd, ...)."""


def lora_adapted(groups: tuple[TensorGroup, ...]) -> dict[str, int]:
    """{adapted module leaf name: rank} from a tensor inventory (its ``<name>.lora_A`` groups)."""
    return {g.name[:-len(".lora_A")]: g.shape[0] for g in groups
            if g.name.endswith(".lora_A") and g.name != "lm_head.lora_A"}


def layer_mms(model: ModelSpec, lora: dict[str, int] | None = None,
              parallel: ParallelDims | None = None) -> tuple[LayerMm, ...]:
    """The mms of one decoder layer's forward on one rank, each marked saved or recomputed.
    MoE experts (fused parameters, grouped kernels) are not mms here: see saved_bytes_per_token."""
    lora = lora or {}
    tp = parallel.tp if parallel is not None else 1
    seq: list[tuple[str, int, int]] = []
    for s in model.linear_shapes():
        if s.fused_parameter:
            continue
        out = -(-s.out_features // tp) if s.name in _COLUMN_PARALLEL else s.out_features
        inp = s.in_features if s.name in _COLUMN_PARALLEL else -(-s.in_features // tp)
        for _ in range(s.count_per_layer):
            seq.append((s.name, inp, out))
            if s.name in lora:
                r = lora[s.name]
                seq += [(f"{s.name}.lora_A", inp, r), (f"{s.name}.lora_B", r, out)]
    return tuple(LayerMm(n, i, o, saved=(k % 2 == 1)) for k, (n, i, o) in enumerate(seq, start=1))


def saved_bytes_per_token(model: ModelSpec, precision: Precision, *, lora: dict[str, int] | None = None,
                          parallel: ParallelDims | None = None) -> int:
    """Bytes one op-checkpointed layer keeps per token beyond its input: the saved mm outputs and the
    SDPA output + logsumexp. A mixture-of-experts MLP (not nn.Linear mms) is counted whole, as if not
    checkpointed (conservative: the router's topk output is saved too)."""
    p = precision.param_bytes
    tp = parallel.tp if parallel is not None else 1
    heads = -(-model.num_heads // tp)
    mm = sum(p * m.out_features for m in layer_mms(model, lora, parallel) if m.saved)
    sdpa = p * heads * model.head_dim + SDPA_LSE_BYTES * heads
    moe = mlp_saved_bytes_per_token(model, precision, parallel) if model.is_moe else 0
    return mm + sdpa + moe


def recompute_flops_per_token(model: ModelSpec, lora: dict[str, int] | None = None,
                              parallel: ParallelDims | None = None) -> int:
    """Forward FLOPs recomputed in backward per token, all layers: 2·in·out per mm not saved (per rank
    on a tp mesh: the tp-local shapes)."""
    return model.num_layers * sum(2 * m.in_features * m.out_features
                                  for m in layer_mms(model, lora, parallel) if not m.saved)


def recompute_fraction(model: ModelSpec, grad_ckpt, selective_every: int, seq_len: int,
                       groups: tuple[TensorGroup, ...] = ()) -> float:
    """The ``ckpt_fraction`` compiler/cost.py step_time takes: recomputed forward FLOPs as a fraction of
    one forward (its ``fwd = 2·N + attn / 3`` per token, attn = 12·L·s·heads·hd·0.5). Per-layer modes:
    the checkpointed layers' share; op: recompute_flops_per_token / fwd (whole-model shapes: step_time
    divides by tp itself)."""
    from shardtrain.compiler.activations import resolved_ckpt_fraction
    from shardtrain.compiler.specs import GradCkpt
    if grad_ckpt is not GradCkpt.OP:
        return resolved_ckpt_fraction(grad_ckpt, model.num_layers, selective_every)
    attn = 12 * model.num_layers * seq_len * model.num_heads * model.head_dim * 0.5
    fwd = 2 * model.active_params + attn / 3
    return recompute_flops_per_token(model, lora_adapted(groups)) / fwd
