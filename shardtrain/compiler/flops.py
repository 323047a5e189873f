"""Training FLOPs per token and model FLOPs utilisation (MFU); pure (no torch).

Per token of a decoder-only transformer with L layers, attention width h_a = heads·head_dim,
sequence length s (Chowdhery et al. 2022, PaLM, appendix B; Narayanan et al. 2021, Megatron-LM §5.1):

    forward  = 2·N + 4·L·h_a·s       (2 FLOPs per multiply-add of every weight; QKᵀ and A·V: 2·2·h_a·s)
    backward = 2 × forward            (gradients w.r.t. the inputs and w.r.t. the weights)
    model FLOPs = 6·N + 12·L·h_a·s    (PaLM's formula; causal masking is not discounted, as in PaLM)

N counts the weights that take part in a matmul: every decoder-layer parameter (norm weights are a
negligible elementwise cost, counted as PaLM does with "all parameters") plus the output projection
V·h, which is a matmul even when tied to the input embedding; the input embedding is a lookup (no FLOPs)
and is left out. MoE layers count only the experts a token visits (experts_per_token of num_experts).

LoRA / QLoRA: the frozen base weights get no weight gradient, so their backward is 2·N (inputs only):
4·N for them; the adapters (r·(in+out) per linear, r ≪ h) are left out.

Activation checkpointing recomputes the forward of the checkpointed layers during backward
(Megatron-LM §5.1: 4× forward instead of 3× → 8·N with full checkpointing), except what backward
does not need: non-reentrant checkpointing stops recomputing once every saved tensor is back
(torch/utils/checkpoint.py, `early_stop=True` by default), so the layer's last projection (the MLP
down_proj, I·h weights per visited expert) is not recomputed — measured with FlopCounterMode in
tests/test_flops.py. Recomputation is work the hardware does but not model progress: MFU (PaLM's
definition) uses model FLOPs only; HFU (hardware FLOPs utilisation) includes it.
"""
from __future__ import annotations

from dataclasses import dataclass

from shardtrain.compiler.model import ModelSpec


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs per trained token (all counted on the full sequence)."""
    model: float
    """Model FLOPs (PaLM): forward + backward, no recomputation."""
    hardware: float
    """Model FLOPs + the forward recomputed under activation checkpointing."""


def _matmul_params(m: ModelSpec) -> tuple[float, float]:
    """(decoder-layer params a token passes through, output projection params)."""
    layer = m.per_layer_params
    if m.num_experts > 1 and m.per_layer_expert_params:
        # a token visits experts_per_token of the num_experts experts (Switch/Mixtral top-k routing)
        layer -= m.per_layer_expert_params * (1 - m.experts_per_token / m.num_experts)
    return float(m.num_layers * layer), float(m.vocab_size * m.hidden_size)


def train_flops_per_token(m: ModelSpec, seq_len: int, *, full_finetune: bool = True,
                          checkpointed_layers: int = 0) -> TokenFlops:
    """FLOPs per token of one training step (see the module docstring for the formula)."""
    layers_n, head_n = _matmul_params(m)
    n = layers_n + head_n
    attn_fwd = 4.0 * m.num_layers * m.num_heads * m.head_dim * seq_len
    weight_grad = 2.0 * n if full_finetune else 0.0
    model = 2.0 * n + 2.0 * n + weight_grad + 3.0 * attn_fwd  # fwd + input grads + weight grads + attention
    k = max(0, min(checkpointed_layers, m.num_layers))
    last_proj = float(m.intermediate_size * m.hidden_size * (m.experts_per_token if m.num_experts > 1 else 1))
    recompute = k * (2.0 * (layers_n / m.num_layers - last_proj) + attn_fwd / m.num_layers) if m.num_layers else 0.0
    return TokenFlops(model=model, hardware=model + recompute)
