"""config.json -> ModelSpec: which parameters each Hugging Face ``model_type`` has.

The layouts come from the HF implementations in transformers 5.23 (counted in compiler/model.py,
checked against real models on the meta device in tests/test_model_spec.py):

* ``llama`` / ``mistral`` / ``qwen2`` — q/k/v/o projections, SwiGLU MLP (gate/up/down), 2 RMSNorms
  per layer. Llama: ``attention_bias`` applies to q, k, v *and* o; ``mlp_bias`` to the MLP.
  Mistral: never biased. Qwen2: q/k/v always biased, o never (ignores ``attention_bias``).
* ``gemma2`` — as Llama (``attention_bias`` on q/k/v/o) plus 4 RMSNorms per layer
  (input, post_attention, pre_feedforward, post_feedforward); ``head_dim`` is explicit and
  ``hidden != heads * head_dim`` is normal (9B: 3584 vs 16 * 256); embeddings tied by default.
* ``phi3`` — fused ``qkv_proj`` and ``gate_up_proj``; no biases.
* ``mixtral`` — attention as Mistral; a router and fused 3-D expert parameters per layer (see
  compiler/model.py for why they are not ``nn.Linear``).

Any other ``model_type`` carrying the standard Llama keys is treated as Llama-like (recorded in
``notes``); a mixture-of-experts config of an unknown type is rejected rather than miscounted.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shardtrain.compiler.model import ModelSpec

__all__ = ["KNOWN_MODEL_TYPES", "model_spec_from_hf_config"]

#: model_type -> HF decoder-layer class name, for the layouts counted exactly.
KNOWN_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "mixtral": "MixtralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "gemma2": "Gemma2DecoderLayer",
    "phi3": "Phi3DecoderLayer",
}

# Default of `tie_word_embeddings` per config class in transformers 5 (PreTrainedConfig's own
# default is False; Gemma2Config sets True).
_TIE_DEFAULT = {"gemma2": True}


_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size")


def _int_key(cfg: Mapping[str, Any], key: str, where: str) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v <= 0:
        raise ValueError(f"{where}: key {key!r} must be a positive integer, got {v!r}")
    return int(v)


def model_spec_from_hf_config(cfg: Mapping[str, Any], name: str = "custom", *,
                              source: str | None = None) -> ModelSpec:
    """ModelSpec from a parsed HF ``config.json`` dict.

    ``source`` (a file path) only improves error messages; it defaults to ``name``.
    Raises ValueError naming the missing/bad key and the file.
    """
    where = f"model config {source or name!r}"
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{where}: missing required key 'model_type'")
    for key in _REQUIRED:
        if cfg.get(key) is None:
            raise ValueError(f"{where}: missing required key {key!r} (model_type={model_type!r})")
    h = _int_key(cfg, "hidden_size", where)
    L = _int_key(cfg, "num_hidden_layers", where)
    nh = _int_key(cfg, "num_attention_heads", where)
    I = _int_key(cfg, "intermediate_size", where)
    V = _int_key(cfg, "vocab_size", where)
    nkv = _int_key(cfg, "num_key_value_heads", where) if cfg.get("num_key_value_heads") else nh
    hd = _int_key(cfg, "head_dim", where) if cfg.get("head_dim") else h // nh
    if nh % nkv:
        raise ValueError(f"{where}: num_key_value_heads={nkv} does not divide "
                         f"num_attention_heads={nh}")
    tie = bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT.get(model_type, False)))
    mpe = cfg.get("max_position_embeddings")
    mpe = int(mpe) if isinstance(mpe, (int, float)) and not isinstance(mpe, bool) else None
    notes: list[str] = []
    layout: dict[str, Any] = {}
    attn_bias = bool(cfg.get("attention_bias", False))
    if model_type in ("llama", "gemma2"):
        layout.update(attention_qkv_bias=attn_bias, attention_out_bias=attn_bias)
        if model_type == "llama":
            layout["mlp_bias"] = bool(cfg.get("mlp_bias", False))
        else:
            layout["norms_per_layer"] = 4
    elif model_type == "qwen2":
        layout.update(attention_qkv_bias=True, attention_out_bias=False)
    elif model_type == "phi3":
        layout.update(fused_qkv=True, fused_gate_up=True)
    elif model_type == "mixtral":
        for key in ("num_local_experts", "num_experts_per_tok"):
            if cfg.get(key) is None:
                raise ValueError(f"{where}: missing required key {key!r} (model_type='mixtral')")
        layout.update(num_experts=_int_key(cfg, "num_local_experts", where),
                      experts_per_token=_int_key(cfg, "num_experts_per_tok", where))
    elif model_type == "mistral":
        pass
    else:
        moe_keys = [k for k in ("num_local_experts", "num_experts", "n_routed_experts",
                                "moe_intermediate_size") if cfg.get(k)]
        if moe_keys:
            raise ValueError(f"{where}: model_type {model_type!r} is a mixture-of-experts layout "
                             f"({', '.join(moe_keys)}) that shardtrain cannot count exactly; "
                             f"supported: {', '.join(sorted(KNOWN_MODEL_TYPES))}, or use --params")
        layout.update(attention_qkv_bias=attn_bias, attention_out_bias=attn_bias,
                      mlp_bias=bool(cfg.get("mlp_bias", False)))
        notes.append(f"model_type {model_type!r} is not one of {sorted(KNOWN_MODEL_TYPES)}; "
                     "parameter counts assume the Llama layout")
        if "tie_word_embeddings" not in cfg:
            notes.append("tie_word_embeddings absent; assumed False")
    if model_type in KNOWN_MODEL_TYPES:
        layer_cls = KNOWN_MODEL_TYPES[model_type]
    else:
        arch = (cfg.get("architectures") or [""])[0]
        stem = arch.split("For")[0] if "For" in arch else ""
        layer_cls = f"{stem}DecoderLayer" if stem else "LlamaDecoderLayer"
        notes.append(f"decoder layer class guessed as {layer_cls!r}")
    return ModelSpec.build(name=name, model_type=model_type, hidden_size=h, num_layers=L,
                           num_heads=nh, num_kv_heads=nkv, head_dim=hd, intermediate_size=I,
                           vocab_size=V, tie_word_embeddings=tie, decoder_layer_class=layer_cls,
                           max_position_embeddings=mpe, notes=tuple(notes), **layout)
