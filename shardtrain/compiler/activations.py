"""Activation and logits memory per GPU for Llama-style decoder blocks (derived, not the GPT constant).

Derivation (bytes saved for backward per token per layer, 16-bit compute, HF transformers modules;
Korthikanti et al. 2022 "Reducing Activation Recomputation in Large Transformer Models", §4 method,
applied to the Llama block instead of GPT's):
  RMSNorm (HF LlamaRMSNorm upcasts to fp32): pow() saves the fp32 input (4h), the weight multiply
  saves the normalised 16-bit tensor (2h)                                  -> 6h, twice per layer
  q/k/v projections share one saved input (the norm output)                 -> 2h
  RoPE multiplies by cos/sin, which need no grad: q, k are not saved; SDPA saves the rotated
  q (2h), k and v (2·kv·hd each: GQA kv heads) and its output (2h)          -> 4h + 4·kvd
  o_proj saves its contiguous input                                        -> 2h
  MLP: gate/up share the norm output (2h); SiLU saves gate (2I); the product saves silu(gate) and
  up (4I); down_proj saves its input (2I)                                  -> 2h + 8I
  No dropout in Llama (attention_dropout = 0), so no masks (GPT's 34 includes 4sbh of masks).
  Total: 22h + 4·kvd + 8I bytes/token/layer (Llama-3.1-8B: 51.0·h vs GPT's 34·h).
Eager attention adds the score matrices: fp32 softmax output (4·a·s) + 16-bit copy (2·a·s) per token,
and repeat_kv expands k, v to all heads (Korthikanti's 5as/h term, here 6as + 4(h - kvd)).
fp32 compute doubles every 16-bit term (norm terms become 4h + 4h).
Full recomputation keeps only each layer's input (2h per token per layer, Korthikanti's 2sbh) plus
one layer's full working set during its recomputation.
Logits (architecture notes): lm_head output b·s·V in 16-bit is kept in the model output; HF's
ForCausalLMLoss upcasts to fp32 (4bsV) and log_softmax saves its fp32 output (4bsV); backward holds
the fp32 gradient (4bsV) while the 16-bit grad is formed -> (p + 12)·bsV peak for p = 2.
"""
from __future__ import annotations

import math

from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import Attention, GradCkpt, Precision


def layer_bytes_per_token(model: ModelSpec, precision: Precision, attention: Attention, seq_len: int) -> float:
    """Activation bytes saved for backward by one decoder layer, per token."""
    h, I = model.hidden_size, model.intermediate_size
    kvd = model.num_kv_heads * model.head_dim
    qd = model.num_heads * model.head_dim
    p = precision.param_bytes
    norm = 4 * h + p * h if p == 2 else 8 * h  # fp32 input + 16-bit normalised copy
    attn = p * (h + qd + 2 * kvd + qd + qd)    # norm out, q_rot, k, v, sdpa out, o_proj input
    if attention is Attention.EAGER:
        # scores: fp32 softmax (4) + 16-bit cast (p) per head per key; repeat_kv expands k, v
        attn += (4 + p) * model.num_heads * seq_len + p * 2 * (qd - kvd)
    if model.is_moe:
        # router logits (E) and top-k routed copies of the MLP activations per token
        mlp = p * (h + model.num_experts) + p * 4 * I * model.experts_per_token + p * h * model.experts_per_token
    else:
        mlp = p * (h + 4 * I)
    return 2 * norm + attn + mlp


def resolved_ckpt_fraction(grad_ckpt: GradCkpt, num_layers: int, selective_every: int) -> float:
    """Fraction of layers whose activations are recomputed."""
    if grad_ckpt is GradCkpt.FULL:
        return 1.0
    if grad_ckpt is GradCkpt.SELECTIVE:
        return math.ceil(num_layers / selective_every) / num_layers
    return 0.0


def activation_bytes(model: ModelSpec, *, micro_batch: int, seq_len: int, precision: Precision,
                     attention: Attention, grad_ckpt: GradCkpt, selective_every: int = 2) -> int:
    """Peak activation bytes on one GPU (decoder layers + embeddings + final norm)."""
    tokens = micro_batch * seq_len
    p = precision.param_bytes
    per_layer = layer_bytes_per_token(model, precision, attention, seq_len) * tokens
    frac = resolved_ckpt_fraction(grad_ckpt, model.num_layers, selective_every)
    n_ckpt = round(frac * model.num_layers)
    kept = (model.num_layers - n_ckpt) * per_layer + n_ckpt * p * model.hidden_size * tokens
    # backward working set: the layer being recomputed/differentiated plus its input grads (2 x h)
    working = per_layer + 2 * p * model.hidden_size * tokens
    head = 2 * p * model.hidden_size * tokens  # embedding output, final norm output
    return int(kept + working + head)


def logits_bytes(model: ModelSpec, *, micro_batch: int, seq_len: int, precision: Precision) -> int:
    """Peak bytes of logits + fp32 loss path (see module docstring)."""
    p = precision.param_bytes
    fp32_terms = 12 if p == 2 else 8  # the upcast is a no-op in fp32
    return micro_batch * seq_len * model.vocab_size * (p + fp32_terms)
