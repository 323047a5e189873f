"""Tensor parallelism (issue 18) from the model's OWN plan: transformers' `config.base_model_tp_plan`
(Llama, transformers 5.23 models/llama/configuration_llama.py: q/k/v/gate/up "colwise", o/down
"rowwise"), applied with torch DTensor `parallelize_module` (torch/distributed/tensor/parallel/style.py
ColwiseParallel / RowwiseParallel: Megatron-LM's column/row split, Shoeybi et al. 2019).

Without sequence parallel: a colwise layer takes the replicated hidden states and returns its
slice of the output features (local heads: Llama's attention reshapes with `view(*shape, -1, head_dim)`,
so each rank runs num_heads / tp heads and num_kv_heads / tp kv heads with the same grouping ratio);
a rowwise layer takes that slice and all-reduces its output. lm_head follows the causal LM's own
`_tp_plan` ({"lm_head": "colwise_gather_output"}: its weight split over the vocabulary, the logits
all-gathered, so the loss reads full logits as before; as compiler/mesh_memory.py counts it), unless
it is tied to the embedding or LoRA-wrapped (then whole). Embeddings and norms stay replicated over tp
(the plans do not name them). FSDP2 then shards every parameter over the dp mesh, TP-sharded ones as
2-D DTensors.

LoRA (peft) on a TP-split linear: the frozen base layer gets the layer's style; for colwise the
adapter's B is colwise too (A, r × in, sees the replicated input), for rowwise A is rowwise (its
output is all-reduced) and B is replicated. The adapter's product B·A then has the split of the base
weight it is added to, so the sum equals the 1-D run's (tests/runtime/test_mesh_runs.py).
"""
from __future__ import annotations

from torch import nn

COLWISE, ROWWISE = "colwise", "rowwise"
#: set on an lm_head split over tp (runtime/loss.py: the chunked loss then keeps one position, not none)
TP_SPLIT_HEAD = "_shardtrain_tp_split"
_LAYER_PREFIX = "layers.*."


class TensorParallelError(ValueError):
    """The model or mesh cannot run tensor parallel as planned (one line with the fix)."""


def base_model(model: nn.Module) -> nn.Module:
    """The decoder (LlamaModel) inside peft / the *ForCausalLM."""
    from shardtrain.runtime.loss import causal_lm
    lm = causal_lm(model)
    return getattr(lm, lm.base_model_prefix)


def layer_plan(config) -> dict[str, str]:
    """The per-decoder-layer part of `config.base_model_tp_plan`: {"self_attn.q_proj": "colwise", ...}."""
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not plan:
        raise TensorParallelError(f"{type(config).__name__} has no base_model_tp_plan (transformers names none "
                                  "for this model); set parallel.tp: 1")
    out = {}
    for key, style in plan.items():
        if not key.startswith(_LAYER_PREFIX):
            raise TensorParallelError(f"base_model_tp_plan key {key!r} is outside the decoder layers; shardtrain "
                                      "applies only per-layer colwise/rowwise plans; set parallel.tp: 1")
        if style not in (COLWISE, ROWWISE):
            raise TensorParallelError(f"base_model_tp_plan {key!r}: style {style!r} is not supported (only "
                                      "colwise/rowwise); set parallel.tp: 1")
        out[key[len(_LAYER_PREFIX):]] = style
    return out


def check_heads(config, tp: int) -> None:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp or kv % tp:
        raise TensorParallelError(f"parallel.tp: {tp} does not divide the model's {heads} attention heads and "
                                  f"{kv} key/value heads; use a tp that divides both")


def _styles(module: nn.Module, name: str, style: str) -> dict:
    """parallelize_module plan entries for one planned linear (plain or peft LoRA-wrapped)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    split = ColwiseParallel if style == COLWISE else RowwiseParallel
    if not hasattr(module, "base_layer"):
        return {name: split()}
    out = {f"{name}.base_layer": split()}
    for adapter in module.lora_A:
        if style == COLWISE:
            out[f"{name}.lora_B.{adapter}"] = ColwiseParallel()
        else:
            out[f"{name}.lora_A.{adapter}"] = RowwiseParallel()
    return out


def apply_tensor_parallel(model: nn.Module, tp_mesh, layers: list[nn.Module]) -> int:
    """parallelize_module every decoder layer over `tp_mesh` per the model's plan; returns the number
    of linears split. Call before fully_shard (FSDP2 then shards the DTensors over the dp mesh)."""
    from torch.distributed.tensor.parallel import parallelize_module
    config = base_model(model).config
    tp = tp_mesh.size()
    check_heads(config, tp)
    plan = layer_plan(config)
    n = 0
    for layer in layers:
        entries = {}
        for name, style in plan.items():
            sub = layer.get_submodule(name)
            entries.update(_styles(sub, name, style))
        parallelize_module(layer, tp_mesh, entries)
        n += len(plan)
    return n + _split_lm_head(model, tp_mesh)


def _split_lm_head(model: nn.Module, tp_mesh) -> int:
    """lm_head per `<CausalLM>._tp_plan` "colwise_gather_output" (transformers' name for a colwise split
    whose output is gathered: torch ColwiseParallel(output_layouts=Replicate())); 1 if split."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from shardtrain.runtime.loss import causal_lm
    lm = causal_lm(model)
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if (getattr(lm, "_tp_plan", None) or {}).get("lm_head") != "colwise_gather_output" or head is None:
        return 0
    if hasattr(head, "base_layer") or (emb is not None and head.weight is emb.weight):
        return 0  # a LoRA-wrapped or tied head stays whole (replicated over tp)
    name = next(n for n, m in lm.named_children() if m is head)
    parallelize_module(lm, tp_mesh, {name: ColwiseParallel(output_layouts=Replicate())})
    setattr(head, TP_SPLIT_HEAD, True)
    return 1
