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
Chunked loss (shardtrain/runtime/loss.py; torchtune CEWithChunkedOutputLoss, Liger-Kernel
LigerFusedLinearCrossEntropyLoss): the final norm output is computed once (already counted in the
activations' head term), then lm_head + fp32 CE run chunk by chunk under non-reentrant checkpointing,
so only one chunk of c tokens holds logits. Its peak is in backward, where log_softmax_backward_data
reads the fp32 log_softmax output and its incoming fp32 gradient and writes the fp32 logits gradient:
12·c·V in every precision (the 16-bit chunk logits are not kept: `.float()` saves nothing; measured
with torch's MemTracker in tests/runtime/test_memory_savers.py). Plus the gradient of the final
norm output, p·b·s·h, which accumulates across the chunks.
Activation offload (torch.autograd.graph.save_on_cpu): every tensor saved for backward outside a
checkpointed region — and the checkpointed layers' inputs (torch/utils/checkpoint.py
_CheckpointFrame.save_inputs packs them with the active saved-tensor hooks) — goes to host RAM; the
GPU keeps one layer's backward working set and the head tensors.
"""
from __future__ import annotations

import math

from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.mesh_memory import TP_SEQUENCE_PARALLEL
from shardtrain.compiler.specs import ActivationOffload, Attention, CpMode, GradCkpt, LossMode, ParallelDims, Precision


CHUNK_FP32_TERMS = 12
"""Bytes per token per vocab entry of one loss chunk at its backward peak (3 fp32 tensors)."""
MLP_SAVED_INTERMEDIATES = 4
"""Intermediates of one MLP per token that an untiled MLP saves (gate, up, silu(gate), product), I wide each;
a tiled MLP (compiler/savers.py) saves none of them."""


def tokens_per_rank(micro_batch: int, seq_len: int, parallel: ParallelDims | None = None) -> int:
    """Tokens one rank holds per micro-step: every cp rank holds seq_len / cp of each of its dp rank's
    micro_batch sequences (tp peers hold the same tokens); ceil for a seq_len cp does not divide."""
    cp = parallel.cp if parallel is not None else 1
    return micro_batch * (-(-seq_len // cp))


def hidden_per_rank(model: ModelSpec, parallel: ParallelDims | None = None) -> int:
    """Width of the tensors outside attention/MLP (norms, residual stream, layer inputs) on one rank:
    h, or h / tp with sequence parallel (Korthikanti et al. 2022 §4.2.2; not in the installed Llama
    tp plan: mesh_memory.TP_SEQUENCE_PARALLEL)."""
    tp = parallel.tp if parallel is not None else 1
    return -(-model.hidden_size // tp) if TP_SEQUENCE_PARALLEL and tp > 1 else model.hidden_size


def layer_bytes_per_token(model: ModelSpec, precision: Precision, attention: Attention, seq_len: int, *,
                          parallel: ParallelDims | None = None, tiled_mlp: bool = False) -> int:
    """Activation bytes saved for backward by one decoder layer, per token the rank holds
    (tokens_per_rank of them); `parallel` None = tp 1, cp 1; `tiled_mlp`: the MLP saves no intermediates.

    On a mesh (Korthikanti et al. 2022 Table 2: tensor parallel sbh(10 + 24/t + 5as/(ht)), with sequence
    parallel sbh/t(34 + 5as/h); Megatron-LM megatron/training/theoretical_memory_usage.py
    compute_activation_memory: `(s·b·h)(18 + 4·ffn/h)/t` with SP): tp splits what lives between a
    column- and a row-parallel linear — q, k, v, the attention output, the MLP intermediates and the
    eager score matrices (heads / tp) — while the norms and the inputs of q/k/v and of the MLP stay
    whole on every tp rank without sequence parallel (the GPT "10" of Table 2; here 2·(4h + ph) + 2·ph).
    cp leaves the per-token bytes alone (each rank holds seq_len / cp tokens; tokens_per_rank): a ring
    rank's queries still see all seq_len keys; a Ulysses rank, after its all-to-all, holds heads / cp
    heads over the full sequence, the same elements per local token (heads/(tp·cp) · s² scores over
    s / cp tokens = heads/tp · s per token). Ulysses repeats kv heads up to cp when a rank would get
    fewer than one (DeepSpeed 0.19.8 runtime/sequence_parallel/ulysses_sp.py `kv_replication_factor`)."""
    tp = parallel.tp if parallel is not None else 1
    cp = parallel.cp if parallel is not None else 1
    hd = model.head_dim
    heads = -(-model.num_heads // tp)
    kv_heads = -(-model.num_kv_heads // tp)   # tp > kv heads: a rank keeps one (replicated, as DeepSpeed does)
    if cp > 1 and parallel.cp_mode is CpMode.ULYSSES:
        kv_heads = max(kv_heads, cp)
    kvd, qd = kv_heads * hd, heads * hd
    h_in = hidden_per_rank(model, parallel)
    p = precision.param_bytes
    norm = 4 * h_in + p * h_in if p == 2 else 8 * h_in  # fp32 input + 16-bit normalised copy
    attn = p * (h_in + qd + 2 * kvd + qd + qd)          # norm out, q_rot, k, v, sdpa out, o_proj input
    if attention is Attention.EAGER:
        # scores: fp32 softmax (4) + 16-bit cast (p) per head per key; repeat_kv expands k, v
        attn += (4 + p) * heads * seq_len + p * 2 * (qd - kvd)
    return 2 * norm + attn + mlp_saved_bytes_per_token(model, precision, parallel, tiled=tiled_mlp)


def mlp_width_per_rank(model: ModelSpec, parallel: ParallelDims | None = None) -> int:
    """I on one tp rank, times the experts a token visits (MoE): the width of each MLP intermediate."""
    tp = parallel.tp if parallel is not None else 1
    k = model.experts_per_token if model.is_moe else 1
    return -(-model.intermediate_size // tp) * k


def mlp_intermediates_bytes_per_token(model: ModelSpec, precision: Precision,
                                      parallel: ParallelDims | None = None) -> int:
    """The intermediates an untiled MLP saves per token (MLP_SAVED_INTERMEDIATES): what a tiled MLP does not."""
    return precision.param_bytes * MLP_SAVED_INTERMEDIATES * mlp_width_per_rank(model, parallel)


def mlp_saved_bytes_per_token(model: ModelSpec, precision: Precision, parallel: ParallelDims | None = None, *,
                              tiled: bool = False) -> int:
    """What one layer's MLP saves for backward per token (module docstring): its input (the norm output) and,
    untiled, the 4 intermediates (gate, up, silu(gate), product); MoE: also the router logits (E) and the
    top-k routed copies of the input."""
    p, h_in = precision.param_bytes, hidden_per_rank(model, parallel)
    mlp = p * h_in + (0 if tiled else mlp_intermediates_bytes_per_token(model, precision, parallel))
    if model.is_moe:
        mlp += p * model.num_experts + p * h_in * model.experts_per_token
    return mlp


def head_bytes_per_token(model: ModelSpec, elem_bytes: int, parallel: ParallelDims | None = None) -> int:
    """Bytes per token held outside the decoder layers from the forward to the loss backward (transformers
    5.23 LlamaModel.forward / LlamaRMSNorm): the final norm's saved tensors — pow() saves its fp32 input
    (4h: the last layer's output in fp32, its upcast copy in 16-bit), the weight multiply saves the
    normalised tensor (`.to(input_dtype)`, e·h) — its output, the lm_head / loss-chunk input (e·h), and
    the RoPE cos/sin every layer reads and recomputes with (LlamaRotaryEmbedding: `cos.to(x.dtype)`, 2·head_dim
    per position; counted per token: conservative for micro batches sharing position ids). The embedding
    output is no extra tensor: it is the first layer's input (kept) or saved by that layer. `elem_bytes`: the
    residual stream's element size (fp32 under DDP autocast). Measured (tests/runtime/test_long_seq_truth.py,
    fp32, real MemTracker): the old 2·e·h missed one h-tensor and cos/sin, 8.4 MB at seq 16,384, h 64."""
    h = hidden_per_rank(model, parallel)
    return 4 * h + 2 * elem_bytes * h + 2 * model.head_dim * elem_bytes


def mlp_backward_extra_per_token(model: ModelSpec, precision: Precision, parallel: ParallelDims | None = None) -> int:
    """Bytes per token an (untiled) MLP's backward holds beyond its saved tensors, at its peak, the
    product's backward (HF LlamaMLP `down_proj(act_fn(gate_proj(x)) * up_proj(x))`; torch
    tools/autograd/derivatives.yaml `mul`: self: grad * other, other: grad * self): down_proj's input
    gradient (the mm) and the two mul gradients are live while gate (saved by SiLU), silu(gate) and up
    (saved by mul) still are; the product (down_proj's saved input) was released after down_proj's
    backward (autograd frees a node's saved tensors once it ran). 6 I-wide tensors against the 4 saved:
    +2·p·I (per routed expert for MoE; tp-local I). Measured: real MemTracker, fp32, seq 16,384
    (tests/runtime/test_long_seq_truth.py: six I-sized tensors live at the MLP backward)."""
    return 2 * precision.param_bytes * mlp_width_per_rank(model, parallel)


def resolved_ckpt_fraction(grad_ckpt: GradCkpt, num_layers: int, selective_every: int) -> float:
    """Fraction of layers whose activations are (wholly or, with op, partly) recomputed."""
    if grad_ckpt in (GradCkpt.FULL, GradCkpt.OP):
        return 1.0
    if grad_ckpt is GradCkpt.SELECTIVE:
        return math.ceil(num_layers / selective_every) / num_layers
    return 0.0


def checkpointed_layer_count(grad_ckpt: GradCkpt, num_layers: int, selective_every: int) -> int:
    """Decoder layers whose activations are recomputed (selective: layers 0, k, 2k, ..., as
    runtime/modeling.py checkpoints them; op: every layer, each keeping its saved ops' outputs too:
    compiler/op_ckpt.py)."""
    return round(resolved_ckpt_fraction(grad_ckpt, num_layers, selective_every) * num_layers)


def activation_host_bytes(model: ModelSpec, *, micro_batch: int, seq_len: int, precision: Precision,
                          attention: Attention, grad_ckpt: GradCkpt, selective_every: int = 2,
                          offload: ActivationOffload = ActivationOffload.NONE,
                          parallel: ParallelDims | None = None, tiled_mlp: bool = False) -> int:
    """Host bytes per rank that activation offload holds (and moves over PCIe twice per micro-step):
    the saved tensors of every non-checkpointed layer and the inputs of the checkpointed ones.
    ``tiled_mlp``: every layer's MLP tiled (compiler/savers.py), saving no intermediates."""
    if offload is ActivationOffload.NONE:
        return 0
    tokens = tokens_per_rank(micro_batch, seq_len, parallel)
    per_layer = layer_bytes_per_token(model, precision, attention, seq_len, parallel=parallel,
                                      tiled_mlp=tiled_mlp) * tokens
    n_ckpt = checkpointed_layer_count(grad_ckpt, model.num_layers, selective_every)
    kept = (model.num_layers - n_ckpt) * per_layer + n_ckpt * precision.param_bytes * hidden_per_rank(model, parallel) * tokens
    return int(kept)


def logits_bytes(model: ModelSpec, *, micro_batch: int, seq_len: int, precision: Precision,
                 loss: LossMode = LossMode.FULL, chunk_tokens: int = 512,
                 parallel: ParallelDims | None = None) -> int:
    """Peak bytes of the logits + fp32 loss path for one loss mode (see module docstring);
    `auto` is the smaller of the two (resolve_loss says which). On a mesh: the rank's tokens / cp, and
    the FULL vocabulary on every tp rank — lm_head is "colwise_gather_output" (transformers 5.23
    LlamaForCausalLM._tp_plan; DeepSpeed AutoTP training: LinearLayer(gather_output=True)), so the
    logits are all-gathered before the loss (the tp-local slice at the gather: phases.py)."""
    p = precision.param_bytes
    fp32_terms = 12 if p == 2 else 8  # the upcast is a no-op in fp32
    tokens = tokens_per_rank(micro_batch, seq_len, parallel)
    full = tokens * model.vocab_size * (p + fp32_terms)
    if loss is LossMode.FULL:
        return full
    chunk = min(chunk_tokens, tokens)
    chunked = CHUNK_FP32_TERMS * chunk * model.vocab_size + p * tokens * model.hidden_size
    return chunked if loss is LossMode.CHUNKED else min(full, chunked)


def resolve_loss(model: ModelSpec, *, micro_batch: int, seq_len: int, precision: Precision,
                 loss: LossMode, chunk_tokens: int, parallel: ParallelDims | None = None) -> LossMode:
    """auto -> chunked when the full logits path costs more than the chunked one, else full."""
    if loss is not LossMode.AUTO:
        return loss
    kw = dict(micro_batch=micro_batch, seq_len=seq_len, precision=precision, chunk_tokens=chunk_tokens,
              parallel=parallel)
    full = logits_bytes(model, loss=LossMode.FULL, **kw)
    return LossMode.CHUNKED if full > logits_bytes(model, loss=LossMode.CHUNKED, **kw) else LossMode.FULL
